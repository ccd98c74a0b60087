#!/usr/bin/env bash
# Installs parliament (an IAM policy linter, PyPI) into a virtualenv in the cache outside the
# clone, keyed by version. Prints the venv's path. A second run is a no-op.
set -euo pipefail
PARLIAMENT_VERSION="${PARLIAMENT_VERSION:-1.6.4}"
CACHE="${PACER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pacer}"
VENV="$CACHE/parliament-$PARLIAMENT_VERSION"
if [ ! -f "$VENV/.complete" ]; then
  echo "parliament-venv: installing parliament==$PARLIAMENT_VERSION into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "parliament==$PARLIAMENT_VERSION" >&2
  touch "$VENV/.complete"
fi
echo "$VENV"
