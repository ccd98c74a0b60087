#!/usr/bin/env bash
# Installs moto's server into a virtualenv in the cache outside the clone, keyed by version.
# Prints the venv's path. A second run is a no-op.
set -euo pipefail
MOTO_VERSION="${MOTO_VERSION:-5.2.5}"
exec "$(dirname "$0")/pip-venv.sh" moto "$MOTO_VERSION" "moto[server]==$MOTO_VERSION"
