#!/usr/bin/env bash
# Brings up Pacer's test ground on loopback: etcd + kube-apiserver + kube-controller-manager,
# and moto behind the recording, fault-injecting AWS proxy with the fixtures Pacer's tests use.
#
#   hack/ground.sh [--kube] [--aws] [--crds DIR] [--until-stdin-closes] STATE_DIR
#
# With neither --kube nor --aws, both. When everything is ready it writes STATE_DIR/env (shell
# assignments: KUBECONFIG, KUBECTL, AWS_ENDPOINT_URL, AWS_PROXY_URL, fixture ids) and then waits:
# for Ctrl-C, or, with --until-stdin-closes, for its stdin to close, so a test binary that
# started it takes everything down with it when it exits. Nothing outlives the script.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
want_kube=0 want_aws=0 crds="" stdin_mode=0
while [ $# -gt 1 ]; do
  case "$1" in
    --kube) want_kube=1 ;;
    --aws) want_aws=1 ;;
    --crds) crds=$2; shift ;;
    --until-stdin-closes) stdin_mode=1 ;;
    *) echo "ground: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ $# -eq 1 ] || { echo "usage: ground.sh [--kube] [--aws] [--crds DIR] [--until-stdin-closes] STATE_DIR" >&2; exit 2; }
if [ $want_kube -eq 0 ] && [ $want_aws -eq 0 ]; then want_kube=1 want_aws=1; fi
state=$1
rm -rf "$state" && mkdir -p "$state/logs"
state=$(cd "$state" && pwd)

pids=()
cleanup() {
  # A second signal must not cut the cleanup short.
  trap '' INT TERM HUP
  trap - EXIT
  [ ${#pids[@]} -eq 0 ] && return
  # The API server's restart loop stops its child; the pid is there for the SIGKILL below.
  if [ -f "$state/kube-apiserver.pid" ]; then pids+=("$(cat "$state/kube-apiserver.pid")"); fi
  kill "${pids[@]}" 2>/dev/null || true
  # kube-apiserver drains its watches for a while on SIGTERM; a test ground need not wait.
  for _ in $(seq 1 30); do
    kill -0 "${pids[@]}" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  rm -rf "$state/etcd"  # the logs stay for a post-mortem
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

free_ports() { python3 "$here/free-ports.py" "$1" 16000 20000; }

# wait_for NAME PID URL [CURL_ARGS...]: polls URL until it answers 2xx, or the process dies.
wait_for() {
  local name=$1 pid=$2 url=$3; shift 3
  for _ in $(seq 1 600); do
    if curl -fsS -o /dev/null --max-time 2 "$@" "$url" 2>/dev/null; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "ground: $name exited; last lines of $state/logs/$name.log:" >&2
      tail -n 30 "$state/logs/$name.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "ground: $name did not become ready at $url within 60 s; see $state/logs/$name.log" >&2
  exit 1
}

env_file="$state/env.partial"
: >"$env_file"

start_kube() {
  local bins kube_bin etcd_bin
  bins=$("$here/build-kube.sh")
  kube_bin=$(sed -n 1p <<<"$bins")
  etcd_bin=$(sed -n 2p <<<"$bins")
  read -r etcd_client etcd_peer api_port <<<"$(free_ports 3)"
  local pki="$state/pki"
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=pacer-test-ca" \
      -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout apiserver.key \
      -out apiserver.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' >san.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
      -extfile san.ext -out apiserver.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
  local token
  token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  echo "$token,admin,admin,system:masters" >"$pki/tokens.csv"

  "$etcd_bin/etcd" --name default --data-dir "$state/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_client" --advertise-client-urls "http://127.0.0.1:$etcd_client" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "default=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync --log-level warn \
    >"$state/logs/etcd.log" 2>&1 &
  pids+=($!)
  wait_for etcd $! "http://127.0.0.1:$etcd_client/health"

  # Requests made as a service account are audited (metadata only): the RBAC test compares
  # the calls Pacer makes with what its chart grants.
  cat >"$pki/audit-policy.yaml" <<'POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
POLICY
  # Restarted whenever it exits, as the kubelet restarts a static pod: a test restarts the API
  # server by killing the pid in KUBE_APISERVER_PID_FILE. Told to stop, the loop stops the one
  # it runs now, so none is left whatever the moment.
  (
    # jobs -p: the running child even before $! is read.
    trap 'kill $(jobs -p) 2>/dev/null || true; exit 0' TERM INT HUP
    while :; do
      "$kube_bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_client" \
        --audit-policy-file "$pki/audit-policy.yaml" --audit-log-path "$state/logs/audit.log" \
        --audit-log-format json --audit-log-mode blocking \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
        --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
        --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" --authorization-mode RBAC \
        --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$pki/sa.pub" \
        --service-account-signing-key-file "$pki/sa.key" --service-cluster-ip-range 10.96.0.0/24 \
        --endpoint-reconciler-type none --profiling=false --enable-priority-and-fairness=false \
        >>"$state/logs/kube-apiserver.log" 2>&1 &
      echo $! >"$state/kube-apiserver.pid"
      wait $! || true
      sleep 0.2
    done
  ) &
  pids+=($!)
  wait_for kube-apiserver $! "https://127.0.0.1:$api_port/readyz" --cacert "$pki/ca.crt" \
    -H "Authorization: Bearer $token"

  local kubeconfig="$state/kubeconfig"
  cat >"$kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: pacer-test
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: admin
  user:
    token: $token
contexts:
- name: pacer-test
  context: {cluster: pacer-test, user: admin, namespace: default}
current-context: pacer-test
KUBECONFIG

  "$kube_bin/kube-controller-manager" --kubeconfig "$kubeconfig" --authentication-kubeconfig "$kubeconfig" \
    --authorization-kubeconfig "$kubeconfig" --leader-elect=false --secure-port 0 \
    --controllers namespace-controller,garbage-collector-controller \
    >"$state/logs/kube-controller-manager.log" 2>&1 &
  pids+=($!)

  if [ -n "$crds" ]; then
    "$kube_bin/kubectl" --kubeconfig "$kubeconfig" apply --server-side -f "$crds" >/dev/null
    "$kube_bin/kubectl" --kubeconfig "$kubeconfig" wait --for condition=Established --timeout 60s \
      -f "$crds" >/dev/null
  fi
  {
    echo "KUBECONFIG=$kubeconfig"
    echo "KUBECTL=$kube_bin/kubectl"
    echo "AUDIT_LOG=$state/logs/audit.log"
    echo "KUBE_APISERVER_PID_FILE=$state/kube-apiserver.pid"
    echo "KUBE_CONTROLLER_MANAGER_PID=${pids[-1]}"
  } >>"$env_file"
}

start_aws() {
  local venv
  venv=$("$here/moto-venv.sh")
  read -r moto_port proxy_port <<<"$(free_ports 2)"
  MOTO_AMIS_PATH="$here/moto-amis.json" "$venv/bin/moto_server" -H 127.0.0.1 -p "$moto_port" \
    >"$state/logs/moto.log" 2>&1 &
  pids+=($!)
  "$venv/bin/python" "$here/aws-proxy.py" "$proxy_port" "http://127.0.0.1:$moto_port" \
    >"$state/logs/aws-proxy.log" 2>&1 &
  pids+=($!)
  wait_for moto "${pids[-2]}" "http://127.0.0.1:$moto_port/moto-api/"
  wait_for aws-proxy "${pids[-1]}" "http://127.0.0.1:$proxy_port/_proxy/health"
  AWS_ENDPOINT_URL="http://127.0.0.1:$proxy_port" "$venv/bin/python" "$here/aws-fixtures.py" \
    >>"$env_file" 2>"$state/logs/aws-fixtures.log" || {
    echo "ground: creating the AWS fixtures failed:" >&2; cat "$state/logs/aws-fixtures.log" >&2; exit 1; }
  {
    echo "AWS_ENDPOINT_URL=http://127.0.0.1:$proxy_port"
    echo "AWS_PROXY_URL=http://127.0.0.1:$proxy_port"
    echo "MOTO_URL=http://127.0.0.1:$moto_port"
    echo "AWS_REGION=us-east-1"
    echo "AWS_ACCESS_KEY_ID=testing"
    echo "AWS_SECRET_ACCESS_KEY=testing"
  } >>"$env_file"
}

# Start the slow parts first: moto's start overlaps the apiserver's.
[ $want_aws -eq 1 ] && start_aws
[ $want_kube -eq 1 ] && start_kube
mv "$env_file" "$state/env"
echo "ground: ready; environment in $state/env" >&2

if [ $stdin_mode -eq 1 ]; then
  cat >/dev/null || true
else
  sed 's/^/export /' "$state/env"
  echo "# Ctrl-C stops everything" >&2
  wait -n "${pids[@]}" || true
fi
