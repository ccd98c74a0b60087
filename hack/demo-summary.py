"""Summarises `kubectl get runnerjobs -o json` (stdin) for `make demo`: jobs by phase and reason,
queue, boot and run times (queue to runner for warm starts and launches apart), and what they
cost."""
import json
import sys
from collections import Counter
from datetime import datetime


def at(value):
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def seconds(start, end):
    start, end = at(start), at(end)
    return (end - start).total_seconds() if start and end else None


jobs = json.load(sys.stdin)["items"]
outcomes = Counter()
spans = {"queue (created -> launch)": [], "boot (launch -> running)": [], "run (running -> completing)": []}
# Queue to runner (created -> running), for jobs that started a warm instance and for the rest.
to_runner = {"warm start": [], "launched": []}
cost = 0.0
for job in jobs:
    status = job.get("status", {})
    reason = (status.get("lastError") or {}).get("reason", "")
    outcomes[status.get("phase", "Pending") + (f" ({reason})" if reason else "")] += 1
    times = status.get("phaseTimes", {})
    for span, (start, end) in zip(spans, [
        (job["metadata"]["creationTimestamp"], times.get("launching")),
        (times.get("launching"), times.get("running")),
        (times.get("running"), times.get("completing")),
    ]):
        value = seconds(start, end)
        if value is not None:
            spans[span].append(value)
    waited = seconds(job["metadata"]["creationTimestamp"], times.get("running"))
    if waited is not None:
        warm = bool((status.get("launch") or {}).get("warm"))
        to_runner["warm start" if warm else "launched"].append(waited)
    estimated = (status.get("cost") or {}).get("estimatedCost")
    if estimated:
        cost += float(estimated)

print("jobs: " + ", ".join(f"{n} {phase}" for phase, n in sorted(outcomes.items())))
for span, values in spans.items():
    if values:
        print(f"{span}: mean {sum(values) / len(values):.1f} s, max {max(values):.1f} s over {len(values)} jobs")
for kind, values in to_runner.items():
    if values:
        print(f"queue to runner, {kind}: mean {sum(values) / len(values):.1f} s, "
              f"max {max(values):.1f} s over {len(values)} jobs")
print("(the simulator boots in about a second, so the two hardly differ here; on EC2 a warm "
      "start skips the placement, the pool's script and the runner download, and keeps only "
      "the OS boot: see docs/warm-pools.md)")
print(f"estimated cost: {cost:.6f} USD")
