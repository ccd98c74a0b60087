#!/usr/bin/env bash
# Assembles Pacer's image without a container daemon or a base image from a registry: a root
# filesystem holding the binary, the shared libraries it links (ldd), the CA bundle and a
# non-root user, packed as an OCI image layout with crane (hack/build-crane.sh). It is the
# image the Dockerfile builds on distroless: same paths, user and entrypoint, which this script
# checks against the Dockerfile.
#
# Usage: hack/image.sh [--smoke] BINARY OUT REF
#   OUT/rootfs   the root filesystem
#   OUT/oci      the OCI image layout, its manifest annotated with REF's tag
# --smoke then unpacks the layer as packed and runs `pacer --version` and `pacer crds` inside
# it as the image's user.
set -euo pipefail
smoke=false
if [ "${1:-}" = --smoke ]; then smoke=true; shift; fi
if [ $# -ne 3 ]; then
  echo "usage: $0 [--smoke] BINARY OUT REF" >&2
  exit 2
fi
binary=$1 out=$2 ref=$3
root=$(cd "$(dirname "$0")/.." && pwd)
crane=$("$root/hack/build-crane.sh")

# What the Dockerfile's runtime stage sets; the assembled image must agree.
entrypoint=/usr/local/bin/pacer
user=65532:65532
dockerfile_says() {
  grep -qxF "$1" "$root/Dockerfile" ||
    { echo "image: the Dockerfile has no line '$1': keep it and $0 in step" >&2; exit 1; }
}
dockerfile_says "COPY --from=build /pacer $entrypoint"
dockerfile_says "USER $user"
dockerfile_says "ENTRYPOINT [\"$entrypoint\"]"

case "$(uname -m)" in
  x86_64) platform=linux/amd64 ;;
  aarch64) platform=linux/arm64 ;;
  *) echo "image: no image platform for $(uname -m)" >&2; exit 1 ;;
esac
ca_bundle=/etc/ssl/certs/ca-certificates.crt
if [ ! -s "$ca_bundle" ]; then
  echo "image: $ca_bundle is missing (Debian's ca-certificates package provides it)" >&2
  exit 1
fi

rootfs=$out/rootfs
rm -rf "$rootfs" "$out/oci" "$out/layer.tar" "$out/unpacked"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/home/nonroot"
install -m 0755 "$binary" "$rootfs$entrypoint"
# The dynamic loader and every library ldd resolves, at the paths the binary asks for (a
# static binary has none). distroless/cc ships the same glibc, libgcc and libm.
ldd "$binary" | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r lib; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
cp "$ca_bundle" "$rootfs$ca_bundle"
cat > "$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat > "$rootfs/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
echo "hosts: files dns" > "$rootfs/etc/nsswitch.conf"

# One layer, reproducible: sorted, owned by root (the home by the user), times at the epoch.
python3 - "$rootfs" "$out/layer.tar" <<'EOF'
import os, sys, tarfile
rootfs, layer = sys.argv[1], sys.argv[2]
modes = {"tmp": 0o1777, "home/nonroot": 0o700}
def entries():
    for dirpath, dirnames, filenames in os.walk(rootfs):
        dirnames.sort()
        if dirpath != rootfs:
            yield dirpath
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)
with tarfile.open(layer, "w") as tar:
    for path in entries():
        rel = os.path.relpath(path, rootfs)
        info = tar.gettarinfo(path, rel)
        info.uid = info.gid = 65532 if rel == "home/nonroot" else 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = modes.get(rel, info.mode & 0o7777)
        if info.isfile():
            with open(path, "rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)
EOF

# crane edits image configs only in a registry: one of its own, in memory, on a free port.
log=$(mktemp)
"$crane" registry serve --address 127.0.0.1:0 2>"$log" &
registry_pid=$!
trap 'kill "$registry_pid" 2>/dev/null || true; rm -f "$log"' EXIT
port=
for _ in $(seq 100); do
  port=$(sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$log")
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { cat "$log" >&2; echo "image: crane's registry did not start" >&2; exit 1; }
staging=127.0.0.1:$port/pacer:staging
# crane reports each blob it moves; show that only when it fails.
quiet() {
  local output
  output=$("$@" 2>&1) || { echo "$output" >&2; return 1; }
}
version=${ref##*:}
quiet "$crane" append --oci-empty-base -f "$out/layer.tar" -t "$staging"
quiet "$crane" mutate "$staging" -t "$staging" --set-platform "$platform" \
  --entrypoint "$entrypoint" --user "$user" --workdir / \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --label org.opencontainers.image.title=pacer \
  --label "org.opencontainers.image.version=$version" \
  --label org.opencontainers.image.licenses=Apache-2.0
quiet "$crane" pull --format oci "$staging" "$out/oci"
# The layout names the image by its tag, as `crane push OUT/oci REF` and skopeo's
# oci:OUT/oci:TAG expect.
python3 - "$out/oci/index.json" "$version" <<'EOF'
import json, sys
path, tag = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["org.opencontainers.image.ref.name"] = tag
json.dump(index, open(path, "w"))
EOF
rm -f "$out/layer.tar"

size() { du -sb "$1" | cut -f1 | awk '{printf "%.1f MB", $1 / 1e6}'; }
echo "image: $ref ($platform) in $out/oci: $(size "$out/oci/blobs") compressed, root filesystem $(size "$rootfs")"

if $smoke; then
  # Run what was packed: the layer as stored in the layout, unpacked.
  manifest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"].split(":")[1])' "$out/oci/index.json")
  blob=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["layers"][0]["digest"].split(":")[1])' "$out/oci/blobs/sha256/$manifest")
  config=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["config"]["digest"].split(":")[1])' "$out/oci/blobs/sha256/$manifest")
  python3 - "$out/oci/blobs/sha256/$config" "$entrypoint" "$user" <<'EOF'
import json, sys
config = json.load(open(sys.argv[1]))["config"]
assert config["Entrypoint"] == [sys.argv[2]] and config["User"] == sys.argv[3], config
EOF
  unpacked=$out/unpacked
  mkdir -p "$unpacked"
  tar -xzf "$out/oci/blobs/sha256/$blob" --no-same-owner -C "$unpacked"
  # A user namespace maps the caller to the image's user, and the root is the image's: the
  # binary finds only the image's loader, libraries and files, and runs as 65532. It needs no
  # privilege where unprivileged user namespaces are allowed (as on this project's machines);
  # elsewhere, the image's own loader runs it on the image's libraries, as the caller.
  unshare=$(command -v unshare || true)
  if [ -n "$unshare" ] && "$unshare" --user --map-user=65532 --map-group=65532 --root="$unpacked" "$entrypoint" --version >/dev/null 2>&1; then
    inside() { env -i "$unshare" --user --map-user=65532 --map-group=65532 --root="$unpacked" "$entrypoint" "$@"; }
    how="chrooted in a user namespace as 65532"
  else
    loader=$(ldd "$binary" | awk '/^\t\// {print $1}')
    libs=$(ldd "$binary" | awk '/=> \// {print $3}' | xargs -rn1 dirname | sort -u | sed "s|^|$unpacked|" | paste -sd:)
    as=()
    if [ "$(id -u)" = 0 ]; then as=(setpriv --reuid=65532 --regid=65532 --clear-groups); fi
    inside() { env -i "${as[@]}" "$unpacked$loader" --library-path "$libs" "$unpacked$entrypoint" "$@"; }
    how="on the image's loader and libraries as $(if [ ${#as[@]} -gt 0 ]; then echo 65532; else id -u; fi), without user namespaces"
  fi
  want="pacer $(sed -n 's/^appVersion: "\(.*\)"/\1/p' "$root/charts/pacer/Chart.yaml")"
  got=$(inside --version)
  [ "$got" = "$want" ] || { echo "image: --version says '$got', the chart's appVersion '$want'" >&2; exit 1; }
  crds=$(inside crds | grep -c '^kind: CustomResourceDefinition$')
  [ "$crds" = 2 ] || { echo "image: pacer crds printed $crds CRDs" >&2; exit 1; }
  # The layout pushes as it is: the digest a registry gets is the layout's.
  pushed=$("$crane" push "$out/oci" "127.0.0.1:$port/pacer:$version" 2>/dev/null)
  [ "${pushed##*@}" = "sha256:$manifest" ] || { echo "image: crane push gave $pushed" >&2; exit 1; }
  echo "image: smoke run OK ($how): '$got', $crds CRDs; crane push sends sha256:$manifest"
fi
