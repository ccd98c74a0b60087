#!/usr/bin/env bash
# Builds crane (go-containerregistry's registry and image tool) from its pinned module through
# the Go module proxy into a cache outside the clone keyed by version (under a minute, once).
# `make image` packs the image with it, daemonless. Prints the binary's path.
set -euo pipefail
CRANE_VERSION="${CRANE_VERSION:-v0.22.1}"
CACHE="${PACER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pacer}"
DIR="$CACHE/crane-$CRANE_VERSION"
if [ ! -x "$DIR/crane" ]; then
  echo "build-crane: building crane $CRANE_VERSION" >&2
  rm -rf "$DIR.tmp" && mkdir -p "$DIR.tmp"
  GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOBIN="$DIR.tmp" go install -ldflags "-s -w" \
    "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION"
  rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
fi
echo "$DIR/crane"
