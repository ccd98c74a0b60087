#!/usr/bin/env bash
# Installs the supply-chain tools (cargo-deny, cargo-audit) from crates.io, pinned, into a cache
# outside the clone keyed by version (several minutes each, once). Prints the bin folder.
set -euo pipefail
CACHE="${PACER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pacer}"
DENY_VERSION="${CARGO_DENY_VERSION:-0.20.2}"
AUDIT_VERSION="${CARGO_AUDIT_VERSION:-0.22.2}"
ROOT="$CACHE/cargo-tools-deny-$DENY_VERSION-audit-$AUDIT_VERSION"
for tool in "cargo-deny@$DENY_VERSION" "cargo-audit@$AUDIT_VERSION"; do
  name=${tool%@*}
  if [ ! -x "$ROOT/bin/$name" ]; then
    echo "cargo-tools: installing $tool (first time: several minutes)" >&2
    CARGO_TARGET_DIR="$CACHE/work/cargo-tools-target" \
      cargo install --quiet --locked --root "$ROOT" "$tool" >&2
  fi
done
echo "$ROOT/bin"
