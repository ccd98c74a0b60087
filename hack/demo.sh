#!/usr/bin/env bash
# `make demo`: the whole system on local real parts. Brings up kube-apiserver + etcd and moto
# behind the AWS proxy, installs the CRDs, runs `pacer run` against them, applies the example
# RunnerPools (pointed at moto's fixtures) and shows them reconciled. Ctrl-C ends it all.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
pacer=$(cd "$(dirname "${1:-$root/target/debug/pacer}")" && pwd)/$(basename "${1:-pacer}")
state="$root/.tools/demo"
mkdir -p "$root/.tools"

rm -rf "$state"
"$pacer" crds --dir "$state-crds" >/dev/null
"$here/ground.sh" --crds "$state-crds" "$state" >/dev/null &
ground=$!
pids=("$ground")
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
while [ ! -f "$state/env" ]; do
  kill -0 $ground 2>/dev/null || { echo "demo: the test ground failed to start" >&2; exit 1; }
  sleep 0.2
done
set -a
# shellcheck source=/dev/null
source "$state/env"
set +a
k() { "$KUBECTL" "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Pacer's configuration for the local ground. The GitHub App key is a throwaway one: no
# GitHub is reached from here.
conf="$state/pacer"
mkdir -p "$conf"
openssl genrsa -out "$conf/github-key.pem" 2048 2>/dev/null
printf 'demo-webhook-secret\n' >"$conf/webhook-secret"
openssl rand -hex 32 >"$conf/callback-key"
# Instances here prove who they are with documents signed by this key instead of AWS's.
openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj /CN=demo-identity-signer \
  -keyout "$conf/identity-signer.key" -out "$conf/identity-signer.pem" 2>/dev/null
cat >"$conf/config.yaml" <<CONFIG
aws:
  region: $AWS_REGION
  endpoint_url: $AWS_ENDPOINT_URL
server:
  public_url: http://127.0.0.1:8080
github:
  app_id: 1
  private_key_file: $conf/github-key.pem
  webhook_secret_file: $conf/webhook-secret
runners:
  callback_key_file: $conf/callback-key
  identity_certificates_file: $conf/identity-signer.pem
controller:
  id: demo
CONFIG

step "pacer validate examples/*.yaml (offline, the same rules as the API server)"
"$pacer" validate "$root"/examples/*.yaml

step "pacer run (log in $state/logs/pacer.log)"
"$pacer" run --config "$conf/config.yaml" >"$state/logs/pacer.log" 2>&1 &
pids+=($!)

step "kubectl apply the example pools, pointed at moto's VPC, subnets, security group and AMIs"
k create namespace ci --dry-run=client -o yaml | k apply -f - >/dev/null
for f in "$root"/examples/runnerpool-*.yaml; do
  sed -e "s/subnet-0a1b2c3d4e5f60001/$FIXTURE_SUBNET_A/; s/subnet-0a1b2c3d4e5f60002/$FIXTURE_SUBNET_B/" \
      -e "s/sg-0a1b2c3d4e5f60001/$FIXTURE_SECURITY_GROUP/" "$f" | k apply -f -
done
k wait --for condition=Ready --timeout 60s runnerpools --all -n ci >/dev/null || true

step "kubectl get runnerpools -n ci"
k get runnerpools -n ci -o wide
step "kubectl get events -n ci"
k get events -n ci --sort-by .metadata.creationTimestamp | tail -n 8

step "a queued job: a RunnerJob gets one tagged instance in moto"
cat <<JOB | k apply -f -
apiVersion: pacer.dev/v1alpha1
kind: RunnerJob
metadata: {name: job-29679449, namespace: ci}
spec: {poolName: linux-x64, jobId: 29679449, runId: 10834231556, repository: example-org/api, labels: [self-hosted, linux, x64], installationId: 41234567}
JOB
k wait --for jsonpath='{.status.phase}'=Booting --timeout 60s runnerjob/job-29679449 -n ci >/dev/null || true
k get runnerjobs -n ci -o wide
step "the job is over: pacer terminates the instance"
k patch runnerjob job-29679449 -n ci --subresource status --type merge -p '{"status":{"completion":{"result":"success"}}}' >/dev/null
k wait --for jsonpath='{.status.phase}'=Succeeded --timeout 60s runnerjob/job-29679449 -n ci >/dev/null || true
k get runnerjobs -n ci -o wide
k get runnerjob job-29679449 -n ci -o jsonpath='cost: {.status.cost}{"\n"}'

step "an invalid pool is refused by the API server, naming the field"
sed 's/ami: ami-0a1b2c3d4e5f60001/ami: ubuntu-24.04/; s/name: linux-x64/name: broken/' \
  "$root/examples/runnerpool-org-spot.yaml" | k apply -f - || true

step "a pool whose subnet does not exist is refused by the controller, naming the field"
sed -e "s/name: linux-x64/name: missing-subnet/; s/sg-0a1b2c3d4e5f60001/$FIXTURE_SECURITY_GROUP/" \
  "$root/examples/runnerpool-org-spot.yaml" | k apply -f - >/dev/null
sleep 3
k get runnerpool missing-subnet -n ci -o jsonpath='{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}'

cat <<MSG

The ground and pacer stay up until Ctrl-C. In another shell:
  export KUBECONFIG=$KUBECONFIG
  $KUBECTL get runnerpools -A
  curl -s $AWS_PROXY_URL/_proxy/calls | python3 -m json.tool | less   # every AWS call pacer made
MSG
wait $ground
