#!/usr/bin/env bash
# Installs the real GitHub webhook examples (npm @octokit/webhooks-examples, pinned by
# tests/webhooks/package-lock.json) into tests/webhooks/node_modules. A second run is a no-op.
set -euo pipefail
cd "$(dirname "$0")/../tests/webhooks"
index=node_modules/@octokit/webhooks-examples/api.github.com/index.json
if [ -f "$index" ] && [ node_modules/.package-lock.json -nt package-lock.json ]; then
  exit 0
fi
npm ci --no-audit --no-fund --ignore-scripts >/dev/null
test -f "$index"
echo "webhook fixtures: $(pwd)/$index"
