#!/usr/bin/env bash
# Builds Pebble, Let's Encrypt's ACME test server, from its pinned module through the Go module
# proxy into a cache outside the clone keyed by version, with the test certificates its module
# ships (its API's TLS certificate, and the CA that signed it). Prints the folder. A second run
# is a no-op.
set -euo pipefail
PEBBLE_VERSION="${PEBBLE_VERSION:-v2.10.3}"
CACHE="${PACER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pacer}"
DIR="$CACHE/pebble-$PEBBLE_VERSION"
if [ ! -f "$DIR/.complete" ]; then
  echo "build-pebble: building pebble $PEBBLE_VERSION" >&2
  rm -rf "$DIR" && mkdir -p "$DIR"
  GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOBIN="$DIR" \
    go install "github.com/letsencrypt/pebble/v2/cmd/pebble@$PEBBLE_VERSION"
  src=$(go mod download -json "github.com/letsencrypt/pebble/v2@$PEBBLE_VERSION" |
    sed -n 's/.*"Dir": "\(.*\)",*/\1/p')
  cp "$src/test/certs/localhost/cert.pem" "$DIR/api-cert.pem"
  cp "$src/test/certs/localhost/key.pem" "$DIR/api-key.pem"
  cp "$src/test/certs/pebble.minica.pem" "$DIR/api-ca.pem"
  chmod u+w "$DIR"/*.pem
  touch "$DIR/.complete"
fi
echo "$DIR"
