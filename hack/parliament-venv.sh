#!/usr/bin/env bash
# Installs parliament (an IAM policy linter, PyPI) into a virtualenv in the cache outside the
# clone, keyed by version. Prints the venv's path. A second run is a no-op.
set -euo pipefail
PARLIAMENT_VERSION="${PARLIAMENT_VERSION:-1.6.4}"
exec "$(dirname "$0")/pip-venv.sh" parliament "$PARLIAMENT_VERSION" "parliament==$PARLIAMENT_VERSION"
