#!/usr/bin/env bash
# Installs a PyPI requirement into a virtualenv in the cache outside the clone, keyed by name
# and version. Prints the venv's path. A second run is a no-op.
# Usage: hack/pip-venv.sh NAME VERSION REQUIREMENT
set -euo pipefail
name=$1 version=$2 requirement=$3
CACHE="${PACER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pacer}"
VENV="$CACHE/$name-$version"
if [ ! -f "$VENV/.complete" ]; then
  echo "$name-venv: installing $requirement into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$requirement" >&2
  touch "$VENV/.complete"
fi
echo "$VENV"
