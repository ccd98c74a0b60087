#!/usr/bin/env bash
# The supply-chain checks of `make test`:
# - cargo deny: the licences, the bans in deny.toml (one major version of the HTTP/TLS stack,
#   no ring, no OpenSSL) and the sources (crates.io only);
# - cargo audit: every crate in Cargo.lock against the RustSec advisory database, offline.
# The database is $PACER_ADVISORY_DB, else ../shared/advisory-db next to the clone (a snapshot;
# copied into the cache so that later clones elsewhere on this machine find it), else that
# cached copy.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
CACHE="${PACER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pacer}"
bin=$("$here/cargo-tools.sh")

(cd "$root" && "$bin/cargo-deny" --log-level error check bans licenses sources)

db="${PACER_ADVISORY_DB:-}"
if [ -z "$db" ] && [ -f "$root/../shared/advisory-db/SNAPSHOT" ]; then
  db="$CACHE/advisory-db"
  if ! cmp -s "$root/../shared/advisory-db/SNAPSHOT" "$db/SNAPSHOT" 2>/dev/null; then
    rm -rf "$db.tmp" && cp -R "$root/../shared/advisory-db" "$db.tmp"
    rm -rf "$db" && mv "$db.tmp" "$db"
  fi
elif [ -z "$db" ] && [ -f "$CACHE/advisory-db/SNAPSHOT" ]; then
  db="$CACHE/advisory-db"
fi
if [ -z "$db" ]; then
  echo "supply-chain: NO ADVISORY DATABASE (set PACER_ADVISORY_DB): cargo audit SKIPPED" >&2
  exit 0
fi
echo "supply-chain: advisories from $(head -c 120 "$db/SNAPSHOT" 2>/dev/null || echo "$db")"
(cd "$root" && "$bin/cargo-audit" audit --db "$db" --no-fetch --quiet)
echo "supply-chain: cargo deny and cargo audit found nothing"
