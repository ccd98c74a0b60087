#!/usr/bin/env bash
# Installs moto's server into a virtualenv in the cache outside the clone, keyed by version.
# Prints the venv's path. A second run is a no-op.
set -euo pipefail
MOTO_VERSION="${MOTO_VERSION:-5.2.5}"
CACHE="${PACER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pacer}"
VENV="$CACHE/moto-$MOTO_VERSION"
if [ ! -f "$VENV/.complete" ]; then
  echo "moto-venv: installing moto[server]==$MOTO_VERSION into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2
  touch "$VENV/.complete"
fi
echo "$VENV"
