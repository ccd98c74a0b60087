#!/usr/bin/env bash
# `make demo`: the whole system on local real parts. Brings up kube-apiserver + etcd and moto
# behind the AWS proxy, the fake GitHub and the runner simulator (pacer-testbed), runs two
# `pacer run` replicas (one leads), applies the example RunnerPools (pointed at moto's fixtures),
# delivers signed workflow_job webhooks, and shows the jobs run on instances that boot the real
# user-data. Ctrl-C ends it all.
# Usage: hack/demo.sh [PACER_BINARY]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
pacer=$(cd "$(dirname "${1:-$root/target/debug/pacer}")" && pwd)/$(basename "${1:-pacer}")
testbed="$(dirname "$pacer")/pacer-testbed"
state="$root/.tools/demo"
started=$(date +%s)
mkdir -p "$root/.tools"

rm -rf "$state" "$state-crds"
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

step "the fake GitHub and the runner simulator (pacer-testbed; log in $state/logs/testbed.log)"
bed="$state/testbed"
"$testbed" serve --state "$bed" --controller-id demo >"$state/logs/testbed.log" 2>&1 &
pids+=($!)
while [ ! -f "$bed/ready" ]; do
  kill -0 "${pids[-1]}" 2>/dev/null || { echo "demo: pacer-testbed failed; see $state/logs/testbed.log" >&2; exit 1; }
  sleep 0.2
done
# shellcheck source=/dev/null
source "$bed/github.env"
echo "GitHub API at $GITHUB_URL; instances prove who they are with documents signed by $bed/signer.pem"

# Pacer's configuration for the local ground, one file per replica.
conf="$state/pacer"
mkdir -p "$conf"
printf 'demo-webhook-secret\n' >"$conf/webhook-secret"
openssl rand -hex 32 >"$conf/callback-key"
replica() {
  local name=$1 port=$2 metrics=$3
  cat >"$conf/$name.yaml" <<CONFIG
# Loopback only: the demo's listener and fake GitHub speak plain HTTP.
allow_insecure_http: true
aws:
  region: $AWS_REGION
  endpoint_url: $AWS_ENDPOINT_URL
server:
  public_url: http://127.0.0.1:8080
  listen: 127.0.0.1:$port
  metrics_listen: 127.0.0.1:$metrics
github:
  app_id: $GITHUB_APP_ID
  api_url: $GITHUB_URL
  private_key_file: $bed/github-key.pem
  webhook_secret_file: $conf/webhook-secret
runners:
  callback_key_file: $conf/callback-key
  identity_certificates_file: $bed/signer.pem
controller:
  id: demo
CONFIG
  PACER_LOG_FORMAT=text POD_NAME=$name POD_NAMESPACE=default "$pacer" run --config "$conf/$name.yaml" \
    >"$state/logs/$name.log" 2>&1 &
  pids+=($!)
}

step "pacer validate examples/*.yaml (offline, the same rules as the API server)"
"$pacer" validate "$root"/examples/*.yaml

step "two pacer replicas: pacer-a on :8080, pacer-b on :8081 (logs in $state/logs); one leads"
replica pacer-a 8080 9090
replica pacer-b 8081 9091

step "kubectl apply the example pools, pointed at moto's VPC, subnets, security group and AMIs"
k create namespace ci --dry-run=client -o yaml | k apply -f - >/dev/null
me=$(id -un)
for f in "$root"/examples/runnerpool-*.yaml; do
  sed -e "s/subnet-0a1b2c3d4e5f60001/$FIXTURE_SUBNET_A/; s/subnet-0a1b2c3d4e5f60002/$FIXTURE_SUBNET_B/" \
      -e "s/sg-0a1b2c3d4e5f60001/$FIXTURE_SECURITY_GROUP/" \
      -e "s/ami-0a1b2c3d4e5f60001/$FIXTURE_AMI_X86_64/; s/ami-0a1b2c3d4e5f60002/$FIXTURE_AMI_ARM64/" "$f" |
    k apply -f -
done
# The simulator runs each instance's user-data on this machine: as this user (no users are
# created here), and with the pools' own scripts (package installs) replaced by an echo.
for pool in $(k get runnerpools -n ci -o name); do
  k patch "$pool" -n ci --type merge \
    -p "{\"spec\":{\"runnerUser\":\"$me\",\"userData\":\"echo here runs the pool userData\"}}" >/dev/null
done
# moto's fixture AMIs have no root snapshot for EC2 to take a volume size from.
k patch runnerpool arm64-builds -n ci --type merge -p '{"spec":{"rootVolume":{"sizeGiB":30}}}' >/dev/null
k wait --for condition=Ready --timeout 60s runnerpools --all -n ci >/dev/null || true
k get runnerpools -n ci -o wide
echo "first screen after $(($(date +%s) - started)) s"

step "GitHub queues jobs: signed workflow_job webhooks, shaped like GitHub's, to pacer-a"
hook() { "$testbed" webhook --url http://127.0.0.1:8080 --secret-file "$conf/webhook-secret" "$@"; }
for id in 41001 41002 41003 41004; do hook --job-id $id --labels self-hosted,linux,x64; done
for id in 42001 42002; do hook --job-id $id --labels self-hosted,linux,arm64; done
hook --job-id 43001 --labels self-hosted,windows
echo "job 43001 asks for windows: no pool serves it, so no RunnerJob"
hook --job-id 44001 --labels self-hosted,linux,x64
hook --job-id 44001 --labels self-hosted,linux,x64 --cancel
echo "job 44001 was cancelled while queued: its RunnerJob gives up its runner"

step "RunnerJobs through their phases (the simulator boots each instance's real user-data)"
deadline=$(($(date +%s) + 120))
while :; do
  table=$(k get runnerjobs -n ci -o wide 2>/dev/null || true)
  printf '\033[2J\033[H== RunnerJobs in ci (%s)\n%s\n' "$(date +%T)" "$table"
  open=$(k get runnerjobs -n ci -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' |
    grep -cvE '^(Succeeded|Failed)$' || true)
  [ "$open" -eq 0 ] && break
  [ "$(date +%s)" -gt "$deadline" ] && { echo "demo: jobs still open after 2 minutes"; break; }
  sleep 2
done

step "summary"
k get runnerjobs -n ci -o json | python3 "$here/demo-summary.py"
curl -s "$AWS_PROXY_URL/_proxy/calls" | python3 -c '
import json, sys
calls = json.load(sys.stdin)
def count(actions):
    return sum(1 for c in calls if c["action"] in actions and c.get("status") == 200
               and "DryRun" not in json.dumps(c.get("params")))
print("instances launched: %d (CreateFleet/RunInstances), TerminateInstances calls: %d"
      % (count({"CreateFleet", "RunInstances"}), count({"TerminateInstances"})))'
leader=$(k get lease pacer-demo -n default -o jsonpath='{.spec.holderIdentity}')
echo "leader: $leader"

cat <<MSG

The ground, the testbed and both replicas stay up until Ctrl-C. In another shell:
  export KUBECONFIG=$KUBECONFIG
  $KUBECTL get runnerjobs -n ci -w
  $KUBECTL get events -n ci
  curl -s http://127.0.0.1:9090/metrics | grep ^pacer_      # pacer-a's metrics (pacer-b: :9091)
  curl -s $AWS_PROXY_URL/_proxy/calls | python3 -m json.tool | less   # every AWS call
  ls $bed/instances/*/state/boot.log                       # each instance's boot log
MSG
wait $ground
