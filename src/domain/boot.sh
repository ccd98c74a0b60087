#!/bin/bash
# Pacer's runner boot script: the user-data of every instance Pacer launches.
#
# Pacer renders it into a pool's launch template by putting these assignments first:
#   PACER_URL          where Pacer listens (server.public_url)
#   PACER_POOL         namespace/name of the RunnerPool
#   RUNNER_USER        the user the runner runs as; root only with RUNNER_ALLOW_RUNASROOT=1
#   PACER_POOL_SCRIPT  the pool's own script (spec.userData), run before the runner; may be empty
#   PACER_CA_PEM       CA certificate(s) to trust for PACER_URL (runners.ca_file); may be empty
# Nothing here is secret: the instance proves who it is with its signed identity document and
# receives its just-in-time runner config and a callback token once, over HTTPS.
#
# A warm pool's instance is told to prepare instead: it runs the pool's script, unpacks the
# runner, arranges for this script to run at every later start, reports `prepared` and waits for
# Pacer to stop it. Started again for a job, it skips what it prepared and takes the job.
#
# Needs bash, curl, jq, tar, sudo and coreutils (and systemd on a warm pool's instance), and a
# route to PACER_URL only (IMDS aside):
# the runner release comes from Pacer too. Every failure posts the tail of the boot log to
# Pacer and shuts down; the launch template makes shutdown terminate the instance.
set -Eeuo pipefail
umask 077

: "${PACER_URL:?rendered by Pacer}" "${PACER_POOL:?rendered by Pacer}" "${RUNNER_USER:=runner}"
: "${PACER_POOL_SCRIPT:=}" "${PACER_CA_PEM:=}"
# How long a call keeps retrying what may pass on a later try: Pacer answers 503 while it has not
# recorded this instance's launch yet or GitHub is slow; a transient must never end the boot.
: "${PACER_RETRY_FOR:=600}"
IMDS="${PACER_IMDS_URL:-http://169.254.169.254}"
STATE="${PACER_STATE_DIR:-/var/lib/pacer}"
RUNNER_DIR="${PACER_RUNNER_DIR:-/opt/actions-runner}"
LOG="$STATE/boot.log"
AUTH="$STATE/callback.headers"
LOG_TAIL_BYTES=65536

mkdir -p "$STATE"
# A token from an earlier boot of this instance (a warm one's preparation) is not this boot's.
rm -f "$AUTH"
exec > >(tee -a "$LOG") 2>&1
tee_pid=$!
# Pacer's listener may use a private CA; other endpoints keep the AMI's trust store.
pacer_tls=()
if [ -n "$PACER_CA_PEM" ]; then
  printf '%s\n' "$PACER_CA_PEM" >"$STATE/pacer-ca.pem"
  pacer_tls=(--cacert "$STATE/pacer-ca.pem")
fi
echo "pacer: booting a runner for pool $PACER_POOL ($(date -u +%FT%TZ))"

# Posts the end of the boot log to Pacer (once a callback token is held) and shuts down.
on_error() {
  local status=$? line=$1
  trap - ERR
  echo "pacer: boot failed at line $line with status $status"
  if [ -n "${notices:-}" ]; then kill "$notices" 2>/dev/null || true; fi
  # Everything said so far reaches the log before its tail is sent: tee ends once nothing
  # writes to it any more (at most 2 s).
  exec >>"$LOG" 2>&1
  for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    kill -0 "$tee_pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -s "$AUTH" ]; then
    tail -c "$LOG_TAIL_BYTES" "$LOG" | curl -sS --max-time 30 --retry 3 --retry-all-errors \
      "${pacer_tls[@]}" -X POST -H @"$AUTH" -H 'Content-Type: text/plain' --data-binary @- \
      "$PACER_URL/api/runner/error" >/dev/null || echo "pacer: could not report the failure"
  fi
  shutdown -h now || true
  exit 1
}
trap 'on_error $LINENO' ERR

# call METHOD URL OUT [curl options...]: an HTTP call that retries, with backoff, what may pass
# on a later try (no answer, 408, 429, 5xx) for PACER_RETRY_FOR seconds, and fails at once on any
# other error.
call() {
  local method=$1 url=$2 out=$3 attempt=1 delay=1 code deadline=$((SECONDS + PACER_RETRY_FOR))
  shift 3
  while :; do
    code=$(curl -sS -o "$out" -w '%{http_code}' --connect-timeout 10 --max-time 300 \
      -X "$method" "$@" "$url") || code=000
    case $code in
      2??) return 0 ;;
      000 | 408 | 429 | 5??) ;;
      *)
        echo "pacer: $method $url answered $code: $(head -c 1024 "$out")"
        return 1
        ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "pacer: $method $url failed $attempt times in $PACER_RETRY_FOR s; the last answer was $code"
      return 1
    fi
    echo "pacer: $method $url answered $code; retrying in $delay s"
    sleep "$delay"
    attempt=$((attempt + 1))
    delay=$((delay * 2 > 30 ? 30 : delay * 2))
  done
}

# 1. Who am I: the identity document and AWS's RSA-2048 signature over it, through IMDSv2.
call PUT "$IMDS/latest/api/token" "$STATE/imds-token" \
  -H 'X-aws-ec2-metadata-token-ttl-seconds: 300'
imds_header="X-aws-ec2-metadata-token: $(cat "$STATE/imds-token")"
call GET "$IMDS/latest/dynamic/instance-identity/document" "$STATE/identity.json" \
  -H "$imds_header"
call GET "$IMDS/latest/dynamic/instance-identity/rsa2048" "$STATE/identity.rsa2048" \
  -H "$imds_header"

# 2. Bootstrap, once: the JIT runner config, a callback token and the runner release (the
#    pool's runnerVersion, or the latest) to use.
prepared=false
[ -e "$STATE/prepared" ] && prepared=true
jq -n --rawfile document "$STATE/identity.json" --rawfile signature "$STATE/identity.rsa2048" \
  --argjson prepared "$prepared" '{document: $document, signature: $signature, prepared: $prepared}' \
  >"$STATE/bootstrap-request.json"
call POST "$PACER_URL/api/runner/bootstrap" "$STATE/bootstrap.json" "${pacer_tls[@]}" \
  -H 'Content-Type: application/json' --data-binary @"$STATE/bootstrap-request.json"
printf 'Authorization: Bearer %s\n' "$(jq -er .callbackToken "$STATE/bootstrap.json")" >"$AUTH"
version=$(jq -er .runner.version "$STATE/bootstrap.json")
mode=$(jq -r '.mode // "job"' "$STATE/bootstrap.json")
echo "pacer: bootstrapped ($mode); runner $version"

# EC2 warns two minutes before it reclaims a spot instance, and may recommend a rebalance
# sooner: each kind of notice is reported to Pacer once, from the background, until the end.
watch_notices() {
  trap - ERR
  set +e
  local kind path token notice
  while sleep "${PACER_NOTICE_POLL:-5}"; do
    for kind in spot-interruption rebalance; do
      [ -e "$STATE/noticed-$kind" ] && continue
      path=spot/instance-action
      [ "$kind" = rebalance ] && path=events/recommendations/rebalance
      token=$(curl -sf --max-time 2 -X PUT "$IMDS/latest/api/token" \
        -H 'X-aws-ec2-metadata-token-ttl-seconds: 300') || continue
      notice=$(curl -sf --max-time 2 -H "X-aws-ec2-metadata-token: $token" \
        "$IMDS/latest/meta-data/$path") || continue
      echo "pacer: EC2 gave notice ($kind): $notice"
      jq -n --arg kind "$kind" --arg notice "$notice" '{kind: $kind, notice: $notice}' |
        curl -sSf --max-time 10 "${pacer_tls[@]}" -X POST -H @"$AUTH" \
          -H 'Content-Type: application/json' --data-binary @- \
          "$PACER_URL/api/runner/interrupted" >/dev/null && touch "$STATE/noticed-$kind"
    done
  done
}
if [ "$mode" = job ]; then
  watch_notices &
  notices=$!
fi

# 3. The pool's own preparation (once: a warm instance ran it before it was stopped).
if [ -n "$PACER_POOL_SCRIPT" ] && [ "$prepared" = false ]; then
  echo "pacer: running the pool's userData script"
  bash -c "$PACER_POOL_SCRIPT"
fi

# 4. The runner release: kept when the AMI has it, else downloaded from Pacer (which fetched it
#    from its release source and checked it) and checked again.
if [ -x "$RUNNER_DIR/bin/Runner.Listener" ] &&
  [ "$("$RUNNER_DIR/bin/Runner.Listener" --version 2>/dev/null || true)" = "$version" ]; then
  echo "pacer: the AMI has runner $version"
else
  url=$(jq -er .runner.url "$STATE/bootstrap.json")
  sha256=$(jq -er .runner.sha256 "$STATE/bootstrap.json")
  # The callback token goes to Pacer only.
  case $url in
    "$PACER_URL"/*) ;;
    *)
      echo "pacer: the runner release is not at $PACER_URL: $url"
      false
      ;;
  esac
  echo "pacer: downloading $url"
  call GET "$url" "$STATE/runner.tar.gz" "${pacer_tls[@]}" -H @"$AUTH"
  echo "$sha256  $STATE/runner.tar.gz" | sha256sum --check --strict --quiet -
  mkdir -p "$RUNNER_DIR"
  tar -xzf "$STATE/runner.tar.gz" -C "$RUNNER_DIR"
  rm -f "$STATE/runner.tar.gz"
fi

# 5. Who runs it.
run_as=()
if [ "$RUNNER_USER" = root ]; then
  export RUNNER_ALLOW_RUNASROOT=1
elif [ "$(id -un)" != "$RUNNER_USER" ]; then
  id -u "$RUNNER_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$RUNNER_USER"
  chown -R "$RUNNER_USER" "$RUNNER_DIR"
  run_as=(sudo -H -u "$RUNNER_USER" --)
fi

# A warm instance's preparation ends here: this script runs again at every start (systemd's
# unit on a real instance), Pacer hears it is prepared and stops it. The report is repeated
# until then, so a stop that failed is asked for again.
if [ "$mode" = prepare ]; then
  units="${PACER_SYSTEMD_DIR:-/etc/systemd/system}"
  if ! command -v systemctl >/dev/null 2>&1 || [ ! -d "$units" ] || [ ! -f "$0" ]; then
    echo "pacer: a warm instance needs systemd and this script as a file, to run it again at its next start"
    false
  fi
  if [ "$0" != "$STATE/boot.sh" ]; then cp -- "$0" "$STATE/boot.sh"; fi
  printf '%s\n' '[Unit]' \
    "Description=Pacer's runner boot, for the job this warm instance is started for" \
    'Wants=network-online.target' 'After=network-online.target' '' '[Service]' \
    'Type=simple' "ExecStart=/bin/bash $STATE/boot.sh" '' '[Install]' \
    'WantedBy=multi-user.target' >"$units/pacer-runner.service"
  systemctl enable pacer-runner.service
  touch "$STATE/prepared"
  echo "pacer: prepared; waiting to be stopped"
  while :; do
    call POST "$PACER_URL/api/runner/prepared" "$STATE/prepared.json" "${pacer_tls[@]}" \
      -H @"$AUTH" -H 'Content-Type: application/json' --data-binary '{}'
    sleep "${PACER_PREPARED_REPEAT:-30}"
  done
fi

# 6. Register, run the one job, report how it ended.
call POST "$PACER_URL/api/runner/register" "$STATE/register.json" "${pacer_tls[@]}" -H @"$AUTH" \
  -H 'Content-Type: application/json' --data-binary '{}'
echo "pacer: registered; starting the runner"
# The JIT config is the runner's credential: never on a command line (any local process reads
# /proc/*/cmdline, and sudo logs its command to the journal). It reaches the runner on standard
# input from this script's memory, as ACTIONS_RUNNER_INPUT_JITCONFIG, which Runner.Listener
# reads and removes from its environment before it starts a job.
jitconfig=$(jq -er .jitConfig "$STATE/bootstrap.json")
jq 'del(.jitConfig)' "$STATE/bootstrap.json" >"$STATE/bootstrap.json.kept"
mv "$STATE/bootstrap.json.kept" "$STATE/bootstrap.json"
status=0
# shellcheck disable=SC2016 # expanded by the runner user's shell, not this one
(cd "$RUNNER_DIR" && "${run_as[@]}" bash -c \
  'IFS= read -r ACTIONS_RUNNER_INPUT_JITCONFIG && export ACTIONS_RUNNER_INPUT_JITCONFIG &&
   exec ./run.sh </dev/null' pacer-runner <<<"$jitconfig") || status=$?
unset jitconfig
rm -f "$STATE/bootstrap.json"
echo "pacer: the runner exited with status $status"
kill "$notices" 2>/dev/null || true
call POST "$PACER_URL/api/runner/complete" "$STATE/complete.json" "${pacer_tls[@]}" -H @"$AUTH" \
  -H 'Content-Type: application/json' --data-binary "{\"exitCode\": $status}"
shutdown -h now
