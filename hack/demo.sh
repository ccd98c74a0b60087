#!/usr/bin/env bash
# `make demo`: brings the local ground up (real kube-apiserver, moto), installs the CRDs, checks
# and applies the example RunnerPools and shows them. Ctrl-C takes everything down.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
pacer=${1:-$root/target/debug/pacer}
state="$root/.tools/demo"

"$pacer" crds --dir "$state-crds" >/dev/null
"$here/ground.sh" --crds "$state-crds" "$state" >/dev/null &
ground=$!
trap 'kill $ground 2>/dev/null || true; wait $ground 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
while [ ! -f "$state/env" ]; do
  kill -0 $ground 2>/dev/null || { echo "demo: the test ground failed to start" >&2; exit 1; }
  sleep 0.2
done
set -a; source "$state/env"; set +a
k() { "$KUBECTL" "$@"; }

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
step "pacer validate examples/*.yaml (offline, the same rules as the API server)"
"$pacer" validate "$root"/examples/*.yaml
step "kubectl apply the example pools"
k create namespace ci --dry-run=client -o yaml | k apply -f - >/dev/null
k apply -f "$root/examples/"
step "kubectl get runnerpools -n ci"
k get runnerpools -n ci -o wide
step "an invalid pool is refused by the API server, naming the field"
sed 's/ami: ami-0a1b2c3d4e5f60001/ami: ubuntu-24.04/; s/name: linux-x64/name: broken/' \
  "$root/examples/runnerpool-org-spot.yaml" | k apply -f - || true
step "AWS fixtures in moto (through the recording proxy at $AWS_PROXY_URL)"
grep '^FIXTURE_' "$state/env"
cat <<MSG

The ground stays up until Ctrl-C. In another shell:
  export KUBECONFIG=$KUBECONFIG
  $KUBECTL get runnerpools -A
  curl -s $AWS_PROXY_URL/_proxy/calls | python3 -m json.tool | head
MSG
wait $ground
