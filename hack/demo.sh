#!/usr/bin/env bash
# `make demo`: the whole system on local real parts. Brings up kube-apiserver + etcd and moto
# behind the AWS proxy, the fake GitHub and the runner simulator (pacer-testbed), runs two
# `pacer run` replicas (one leads), applies the example RunnerPools (pointed at moto's fixtures),
# delivers signed workflow_job webhooks, and shows the jobs run on instances that boot the real
# user-data. Ctrl-C ends it all.
#
# This script is the supervisor: each part it starts runs in a session of its own, so a signal
# meant for the demo (Ctrl-C, SIGTERM, SIGHUP when the terminal closes) reaches the script alone,
# which then ends every part with everything the part started (a simulated instance's
# user-data, its notice watcher, the ground's servers): SIGTERM to the part's process group,
# SIGKILL to what is left a few seconds later. Nothing outlives it.
#
# Usage: hack/demo.sh [PACER_BINARY]
# Environment: DEMO_STATE (default .tools/demo), DEMO_PORTS (pacer-a, pacer-b, their metrics;
# default "8080 8081 9090 9091"). Without a terminal on stdout the job table is printed when it
# changes instead of redrawn.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
pacer=$(cd "$(dirname "${1:-$root/target/debug/pacer}")" && pwd)/$(basename "${1:-pacer}")
testbed="$(dirname "$pacer")/pacer-testbed"
state=${DEMO_STATE:-$root/.tools/demo}
read -r port_a port_b metrics_a metrics_b <<<"${DEMO_PORTS:-8080 8081 9090 9091}"
started=$(date +%s)
mkdir -p "$(dirname "$state")"

# The process groups of the parts started so far, the most recent last.
parts=()
# part LOG COMMAND...: starts COMMAND in a session of its own, output to LOG; its pid, which is
# also its process group's id, ends up in ${parts[-1]}.
part() {
  local log=$1; shift
  setsid "$@" </dev/null >"$log" 2>&1 &
  parts+=($!)
}
stop() {
  trap '' INT TERM HUP
  local pending
  # The newest first: the replicas before the testbed and the ground they talk to.
  for ((i = ${#parts[@]} - 1; i >= 0; i--)); do kill -TERM -- "-${parts[i]}" 2>/dev/null || true; done
  # Pacer drains its listener for 10 s on SIGTERM, for a load balancer the demo does not have.
  for _ in $(seq 1 50); do
    pending=0
    for g in "${parts[@]}"; do kill -0 -- "-$g" 2>/dev/null && pending=1; done
    [ $pending -eq 0 ] && break
    sleep 0.1
  done
  for g in "${parts[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
  # This script's own children (a kubectl or curl it was waiting on).
  local own=()
  mapfile -t own < <(jobs -p)
  [ ${#own[@]} -eq 0 ] || kill "${own[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

rm -rf "$state" "$state-crds"
"$pacer" crds --dir "$state-crds" >/dev/null
part "$state.ground.log" "$here/ground.sh" --crds "$state-crds" "$state"
ground=${parts[-1]}
while [ ! -f "$state/env" ]; do
  kill -0 "$ground" 2>/dev/null || { echo "demo: the test ground failed to start:" >&2; cat "$state.ground.log" >&2; exit 1; }
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
part "$state/logs/testbed.log" "$testbed" serve --state "$bed" --controller-id demo
while [ ! -f "$bed/ready" ]; do
  kill -0 "${parts[-1]}" 2>/dev/null || { echo "demo: pacer-testbed failed; see $state/logs/testbed.log" >&2; exit 1; }
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
  public_url: http://127.0.0.1:$port_a
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
  release_source: $GITHUB_URL/repos/actions/runner/releases
  release_cache_dir: $state/releases-$name
controller:
  id: demo
CONFIG
  PACER_LOG_FORMAT=text POD_NAME=$name POD_NAMESPACE=default \
    part "$state/logs/$name.log" "$pacer" run --config "$conf/$name.yaml"
}
# ready NAME PORT PID: waits until the replica's listener answers, or says why it stopped.
ready() {
  local name=$1 port=$2 pid=$3
  until curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port/healthz" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || {
      echo "demo: $name stopped; last lines of $state/logs/$name.log:" >&2
      tail -n 5 "$state/logs/$name.log" >&2
      exit 1
    }
    sleep 0.2
  done
}

step "pacer validate examples/*.yaml (offline, the same rules as the API server)"
"$pacer" validate "$root"/examples/*.yaml

step "two pacer replicas: pacer-a on :$port_a, pacer-b on :$port_b (logs in $state/logs); one leads"
replica pacer-a "$port_a" "$metrics_a"
replica pacer-b "$port_b" "$metrics_b"
ready pacer-a "$port_a" "${parts[-2]}"
ready pacer-b "$port_b" "${parts[-1]}"

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
# In the background, so a signal ends the demo without waiting for it.
k wait --for condition=Ready --timeout 60s runnerpools --all -n ci >/dev/null &
wait $! || true
k get runnerpools -n ci -o wide
echo "first screen after $(($(date +%s) - started)) s"

step "GitHub queues jobs: signed workflow_job webhooks, shaped like GitHub's, to pacer-a"
hook() { "$testbed" webhook --url "http://127.0.0.1:$port_a" --secret-file "$conf/webhook-secret" "$@"; }
# The warm pool's two instances prepare and are stopped before its jobs come.
deadline=$(($(date +%s) + 90))
until [ "$(k get runnerpool linux-warm -n ci -o jsonpath='{.status.warm.ready}')" = 2 ]; do
  [ "$(date +%s)" -gt "$deadline" ] && { echo "demo: the warm pool is not ready after 90 s"; break; }
  sleep 1
done
k get runnerpool linux-warm -n ci
for id in 45001 45002 45003; do hook --job-id $id --labels self-hosted,linux,warm; done
echo "jobs 45001-45003 ask for warm: two start the warm pool's stopped instances, the third launches"
for id in 41001 41002 41003 41004; do hook --job-id $id --labels self-hosted,linux,x64; done
for id in 42001 42002; do hook --job-id $id --labels self-hosted,linux,arm64; done
hook --job-id 43001 --labels self-hosted,windows
echo "job 43001 asks for windows: no pool serves it, so no RunnerJob"
hook --job-id 44001 --labels self-hosted,linux,x64
hook --job-id 44001 --labels self-hosted,linux,x64 --cancel
echo "job 44001 was cancelled while queued: its RunnerJob gives up its runner"

step "RunnerJobs through their phases (the simulator boots each instance's real user-data)"
deadline=$(($(date +%s) + 120))
shown=""
while :; do
  table=$(k get runnerjobs -n ci -o wide 2>/dev/null || true)
  if [ -t 1 ]; then
    printf '\033[2J\033[H== RunnerJobs in ci (%s)\n%s\n' "$(date +%T)" "$table"
  elif [ "$(sed -E 's/ +[0-9smhd]+$//' <<<"$table")" != "$shown" ]; then
    printf '== RunnerJobs in ci (%s)\n%s\n' "$(date +%T)" "$table"
  fi
  shown=$(sed -E 's/ +[0-9smhd]+$//' <<<"$table")
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
print("launch calls: %d (CreateFleet/RunInstances), warm starts: %d (StartInstances), "
      "TerminateInstances calls: %d"
      % (count({"CreateFleet", "RunInstances"}), count({"StartInstances"}),
         count({"TerminateInstances"})))'
leader=$(k get lease pacer-demo -n default -o jsonpath='{.spec.holderIdentity}')
echo "leader: $leader"

cat <<MSG

The ground, the testbed and both replicas stay up until Ctrl-C. In another shell:
  export KUBECONFIG=$KUBECONFIG
  $KUBECTL get runnerjobs -n ci -w
  $KUBECTL get events -n ci
  curl -s http://127.0.0.1:$metrics_a/metrics | grep ^pacer_      # pacer-a's metrics (pacer-b: :$metrics_b)
  curl -s $AWS_PROXY_URL/_proxy/calls | python3 -m json.tool | less   # every AWS call
  ls $bed/instances/*/state/boot.log                       # each instance's boot log
MSG
wait "$ground"
