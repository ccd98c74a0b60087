#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and etcd from pinned upstream sources through
# the Go module proxy, into a cache outside the clone keyed by version. A second run is a no-op.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
CACHE="${PACER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pacer}"
KUBE_BIN="$CACHE/kube-$KUBE_VERSION"
ETCD_BIN="$CACHE/etcd-$ETCD_VERSION"

# A kube-apiserver built with Go 1.27 serves OpenAPI that kubectl cannot read; insist on 1.26.
go_minor=$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
if [ "$go_minor" != "26" ]; then
  echo "build-kube: need Go 1.26.x to build Kubernetes $KUBE_VERSION, found $(go env GOVERSION)" >&2
  exit 1
fi

export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0

# Writes a throwaway module at $1 that requires $2@$3 and pins each module the upstream go.mod
# replaces with a local path (Kubernetes' staging modules) to the release tag $4.
wrapper() {
  local dir=$1 module=$2 version=$3 staging_version=$4
  rm -rf "$dir" && mkdir -p "$dir"
  local gomod
  gomod=$(go mod download -json "$module@$version" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  {
    echo "module pacer.dev/tools"
    echo "go 1.26"
    echo "require $module $version"
    { grep -E '^\s*[^ ]+ => \./' "$gomod" || true; } | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } >"$dir/go.mod"
}

build_kube() {
  local missing=()
  for cmd in kube-apiserver kube-controller-manager kubectl; do
    [ -x "$KUBE_BIN/$cmd" ] || missing+=("k8s.io/kubernetes/cmd/$cmd")
  done
  [ ${#missing[@]} -eq 0 ] && return
  echo "build-kube: building ${missing[*]##*/} $KUBE_VERSION (first time: several minutes)" >&2
  local work="$CACHE/work/kube-$KUBE_VERSION"
  [ -f "$work/go.mod" ] || wrapper "$work" k8s.io/kubernetes "$KUBE_VERSION" "v0.${KUBE_VERSION#v1.}"
  mkdir -p "$KUBE_BIN" "$work/out"
  (cd "$work" && go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION" \
    -o "$work/out/" "${missing[@]}")
  for pkg in "${missing[@]}"; do mv "$work/out/${pkg##*/}" "$KUBE_BIN/"; done
}

build_etcd() {
  if [ -x "$ETCD_BIN/etcd" ]; then return; fi
  echo "build-kube: building etcd $ETCD_VERSION" >&2
  local work="$CACHE/work/etcd-$ETCD_VERSION"
  wrapper "$work" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_VERSION"
  mkdir -p "$ETCD_BIN.tmp"
  (cd "$work" && go build -trimpath -ldflags "-s -w" -o "$ETCD_BIN.tmp/etcd" go.etcd.io/etcd/server/v3)
  rm -rf "$ETCD_BIN" && mv "$ETCD_BIN.tmp" "$ETCD_BIN"
}

build_etcd
build_kube
echo "$KUBE_BIN"
echo "$ETCD_BIN"
