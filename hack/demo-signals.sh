#!/usr/bin/env bash
# `make demo` leaves nothing behind, whatever signal ends it. Starts `make demo` once per case
# (in a session of its own, on free ports, with its state in a temporary folder), waits until
# its jobs are running on simulated instances, then sends the signal as it arrives in real use:
#
#   INT  to the process group   Ctrl-C in the terminal
#   HUP  to the process group   the terminal closing
#   TERM to make alone          `kill`, a service manager
#   TERM to the process group   `timeout`
#
# and checks that make exits and that, a few seconds later, no process it started remains:
# none carries the run's marker in its environment, none names the run's state folder in its
# arguments. Usage: hack/demo-signals.sh [PACER_BINARY] [CASE...] (CASE: int-group, hup-group,
# term-make, term-group; default all).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
pacer=$(cd "$(dirname "${1:-$root/target/debug/pacer}")" && pwd)/$(basename "${1:-pacer}")
shift || true
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(int-group hup-group term-make term-group)
work=$(mktemp -d)

# The demo starts a test ground of its own after this choice: its ports come from another range.
free_ports() { python3 "$here/free-ports.py" "$1" 12000 16000; }

# left MARK DIR: the pids of processes with MARK in their environment or DIR in their arguments.
left() {
  local mark=$1 dir=$2 p pid
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [ "$pid" = $$ ] && continue
    if grep -qsaF "DEMO_TEST_MARK=$mark" "$p/environ" || grep -qsaF "$dir" "$p/cmdline"; then
      echo "$pid"
    fi
  done
}

demo="" mark="" state=""
# Whatever happens here, this run's demo does not outlive it either.
# shellcheck disable=SC2317  # run by the EXIT trap
finish() {
  local rest=()
  [ -z "$demo" ] || kill -KILL -- "-$demo" 2>/dev/null || true
  [ -z "$mark" ] || mapfile -t rest < <(left "$mark" "$state")
  [ ${#rest[@]} -eq 0 ] || kill -KILL "${rest[@]}" 2>/dev/null || true
  rm -rf "$work"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

failed=0
for case in "${cases[@]}"; do
  signal=${case%%-*}
  signal=${signal^^}
  mark="$case-$$-$RANDOM"
  state="$work/$case"
  out="$work/$case.out"
  began=$(date +%s)
  # As a terminal's foreground job: a process group of its own, and the signals' default
  # actions (a background job of a script would start with SIGINT ignored, and cannot trap it).
  DEMO_TEST_MARK=$mark DEMO_STATE=$state DEMO_PORTS="$(free_ports 4)" python3 -c '
import os, signal, sys
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
    signal.signal(s, signal.SIG_DFL)
os.setsid()
os.execvp(sys.argv[1], sys.argv[1:])' make -s --no-print-directory -C "$root" demo PACER="$pacer" \
    </dev/null >"$out" 2>&1 &
  demo=$!
  up=0
  for _ in $(seq 1 1200); do
    if grep -qs "RunnerJobs through their phases" "$out"; then up=1; break; fi
    kill -0 "$demo" 2>/dev/null || break
    sleep 0.2
  done
  if [ $up -eq 0 ]; then
    echo "demo-signals: $case: the demo did not get its jobs running; its output:" >&2
    cat "$out" >&2
    kill -TERM -- "-$demo" 2>/dev/null || true
    failed=1
    continue
  fi
  running=$(left "$mark" "$state" | wc -l)
  case $case in
    *-group) kill "-$signal" -- "-$demo" ;;
    *-make) kill "-$signal" "$demo" ;;
  esac
  signalled=$(date +%s)
  ended=0
  {
    for _ in $(seq 1 300); do
      if ! kill -0 "$demo" 2>/dev/null; then ended=1; break; fi
      sleep 0.1
    done
    [ $ended -eq 0 ] || wait "$demo" || true
  } 2>/dev/null  # not bash's report that the job ended on the signal
  remaining=()
  for _ in $(seq 1 50); do
    mapfile -t remaining < <(left "$mark" "$state")
    [ ${#remaining[@]} -eq 0 ] && break
    sleep 0.2
  done
  if [ $ended -eq 0 ] || [ ${#remaining[@]} -gt 0 ]; then
    echo "demo-signals: $case: make still running: $((1 - ended)); processes left: ${#remaining[@]}" >&2
    [ ${#remaining[@]} -eq 0 ] || ps -o pid,pgid,sid,args -p "$(IFS=,; echo "${remaining[*]}")" | cut -c1-160 >&2
    kill -KILL -- "-$demo" 2>/dev/null || true
    [ ${#remaining[@]} -eq 0 ] || kill -KILL "${remaining[@]}" 2>/dev/null || true
    failed=1
  else
    echo "demo-signals: $case: up after $((signalled - began)) s with $running processes; all gone $(($(date +%s) - signalled)) s after SIG$signal"
  fi
done
exit $failed
