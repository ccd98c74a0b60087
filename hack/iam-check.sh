#!/usr/bin/env bash
# Checks Pacer's IAM policy: lints it with parliament, then simulates against it every AWS call
# Pacer made in the integration tests (recorded by the test proxy into CALL_LOG_DIR).
# Usage: hack/iam-check.sh PACER_BINARY CALL_LOG_DIR
set -euo pipefail
pacer=$1 calls=$2
here=$(cd "$(dirname "$0")" && pwd)
venv=$("$here/parliament-venv.sh")

# parliament reads the policy on stdin, with real-looking values (it flags placeholders as
# malformed ARNs). RESOURCE_MISMATCH is expected: EC2 policies split one launch action over
# several statements (tag-conditioned instance/volume, our launch template, the read-only
# inputs), and parliament wants each statement to cover every resource type of its actions.
findings=$("$pacer" iam-policy --account 123456789012 --region us-east-1 --controller-id lint \
  --runner-role pacer-runner | "$venv/bin/parliament" --json --minimum_severity LOW || true)
problems=$(grep -v '"issue": "RESOURCE_MISMATCH"' <<<"$findings" | grep -c . || true)
if [ "$problems" -gt 0 ]; then
  echo "parliament found problems in the IAM policy:" >&2
  grep -v '"issue": "RESOURCE_MISMATCH"' <<<"$findings" >&2
  exit 1
fi
echo "parliament: no unknown action, prefix or condition key ($(grep -c . <<<"$findings" || true) expected RESOURCE_MISMATCH notes)"

node "$here/../tests/npm/iam-simulate.mjs" "$pacer" "$calls"
