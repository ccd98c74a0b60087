#!/usr/bin/env bash
# Installs the npm packages the tests use (GitHub's webhook examples, the IAM policy simulator
# and its data), pinned by tests/npm/package-lock.json, into tests/npm/node_modules. A second
# run is a no-op.
set -euo pipefail
cd "$(dirname "$0")/../tests/npm"
if [ -f node_modules/.package-lock.json ] && [ node_modules/.package-lock.json -nt package-lock.json ]; then
  exit 0
fi
npm ci --no-audit --no-fund --ignore-scripts >/dev/null
echo "npm tools: $(pwd)/node_modules"
