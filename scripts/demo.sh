#!/usr/bin/env bash
# The regfs demo: a throw-away registry on loopback with a few images, mounted on ./mnt.
#
#   scripts/demo.sh                 mount, show a few things, wait for Ctrl-C
#   DEMO_NO_WAIT=1 scripts/demo.sh  exit right after the checks (for CI-like runs)
#
# Everything it starts (registry, regfs, the mount, temp dirs) is cleaned up on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib/registry.sh
source scripts/lib/registry.sh
root=$PWD
mnt=$root/mnt

for tool in docker-registry skopeo umoci fusermount3 jq curl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        scripts/setup.sh
        break
    fi
done

if [[ -t 1 ]]; then
    section() { printf '\n\033[1m== %s ==\033[0m\n' "$*"; }
else
    section() { printf '\n== %s ==\n' "$*"; }
fi

# Whether a FUSE filesystem is mounted on $1 (also true for a dead one: ENOTCONN).
is_mounted() {
    awk -v m="${1// /\\040}" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo
}

tmp=$(mktemp -d -t regfs-demo.XXXXXX)
registry_pid=
regfs_pid=

cleanup() {
    trap - EXIT INT TERM
    set +e
    if is_mounted "$mnt"; then
        fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -u -z "$mnt"
    fi
    # regfs exits by itself once unmounted; give it a moment, then insist.
    if [[ -n $regfs_pid ]]; then
        for _ in $(seq 50); do kill -0 "$regfs_pid" 2>/dev/null || break; sleep 0.1; done
        kill "$regfs_pid" 2>/dev/null
        wait "$regfs_pid" 2>/dev/null
    fi
    if [[ -n $registry_pid ]]; then
        kill "$registry_pid" 2>/dev/null
        wait "$registry_pid" 2>/dev/null
    fi
    rm -rf "$tmp"
    rmdir "$mnt" 2>/dev/null
    return 0
}
trap cleanup EXIT
trap 'exit 0' INT # Ctrl-C is the normal way to stop the demo
trap 'exit 143' TERM

section "Building regfs (release)"
cargo build --release
regfs=$root/target/release/regfs

section "Starting a registry on loopback"
registry_start "$tmp" || exit 1
echo "registry at http://$registry"

section "Building sample images with umoci and pushing them with skopeo"
layout=$tmp/oci
umoci init --layout "$layout"

# new_image TAG ARCH PATH=CONTENT... : a linux/ARCH image with one layer holding those files.
new_image() {
    local tag=$1 arch=$2 bundle=$tmp/bundle
    shift 2
    umoci new --image "$layout:$tag"
    umoci unpack --rootless --image "$layout:$tag" "$bundle"
    local spec path
    for spec in "$@"; do
        path=$bundle/rootfs/${spec%%=*}
        mkdir -p "$(dirname "$path")"
        printf '%s\n' "${spec#*=}" >"$path"
    done
    # Some incompressible bytes, so that the layer is not tiny.
    head -c 262144 /dev/urandom >"$bundle/rootfs/random.bin"
    umoci repack --image "$layout:$tag" "$bundle"
    # Without --tag, umoci config moves TAG onto the new manifest.
    umoci config --image "$layout:$tag" --os linux --architecture "$arch"
    rm -rf "$bundle"
}

# descriptor TAG : the index.json descriptor of TAG, with the platform read from its config.
descriptor() {
    local desc manifest config
    desc=$(jq -c --arg t "$1" \
        '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t)' \
        "$layout/index.json")
    manifest=$layout/blobs/sha256/$(jq -r '.digest | ltrimstr("sha256:")' <<<"$desc")
    config=$layout/blobs/sha256/$(jq -r '.config.digest | ltrimstr("sha256:")' "$manifest")
    jq -c --slurpfile c "$config" \
        '{mediaType, digest, size, platform: {architecture: $c[0].architecture, os: $c[0].os}}' \
        <<<"$desc"
}

# add_index INDEX_TAG TAG... : an OCI image index over the images TAG..., tagged INDEX_TAG.
add_index() {
    local index_tag=$1 manifests="" tag blob digest
    shift
    for tag in "$@"; do manifests+=${manifests:+,}$(descriptor "$tag"); done
    blob=$tmp/index.json
    jq -cn --argjson m "[$manifests]" \
        '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: $m}' \
        | tr -d '\n' >"$blob"
    digest=$(sha256sum "$blob" | cut -d' ' -f1)
    mv "$blob" "$layout/blobs/sha256/$digest"
    jq --arg t "$index_tag" --arg d "sha256:$digest" --argjson s "$(stat -c %s "$layout/blobs/sha256/$digest")" \
        '.manifests += [{mediaType: "application/vnd.oci.image.index.v1+json", digest: $d, size: $s,
                         annotations: {"org.opencontainers.image.ref.name": $t}}]' \
        "$layout/index.json" >"$tmp/index.new"
    mv "$tmp/index.new" "$layout/index.json"
}

# push TAG DEST : copy TAG of the layout to the registry as DEST, digests unchanged.
push() {
    skopeo --insecure-policy copy --quiet --all --preserve-digests --dest-tls-verify=false \
        "oci:$layout:$1" "docker://$registry/$2"
    echo "pushed $2"
}

new_image hello amd64 "etc/motd=Hello from regfs"
new_image app-amd64 amd64 "app/version=1" "app/arch=amd64"
new_image app-arm64 arm64 "app/version=1" "app/arch=arm64"
add_index app-multi app-amd64 app-arm64
push hello demo/hello:latest
push hello demo/hello:1.0
push app-amd64 team/app:v1
push app-multi team/app:multi

section "Mounting http://$registry on ./mnt"
if is_mounted "$mnt"; then
    echo "./mnt is still mounted from an earlier run; unmounting it"
    fusermount3 -u -z "$mnt"
fi
mkdir -p "$mnt"
"$regfs" mount --log-file "$tmp/regfs.log" "http://$registry" "$mnt" &
regfs_pid=$!
for _ in $(seq 200); do
    is_mounted "$mnt" && break
    if ! kill -0 "$regfs_pid" 2>/dev/null; then
        wait "$regfs_pid" || true
        regfs_pid=
        echo "regfs exited before mounting" >&2
        exit 1
    fi
    sleep 0.1
done
is_mounted "$mnt" || { echo "regfs did not mount ./mnt within 20 s" >&2; exit 1; }

section "The tree"
# Listed in full first, then cut: `| head` could kill the lister with SIGPIPE under pipefail.
if command -v tree >/dev/null 2>&1; then
    listing=$(tree -L 6 mnt)
else
    listing=$(find mnt -maxdepth 6 | sort)
fi
head -60 <<<"$listing"
lines=$(wc -l <<<"$listing")
if ((lines > 60)); then echo "… ($((lines - 60)) more lines)"; fi

section "Tags that have a linux/arm64 image"
# The index lists {"architecture":"arm64","os":"linux"} among its platforms.
grep -l '"architecture":"arm64"' mnt/*/*/tags/*/manifest.json || echo "(none)"

section "cat mnt/team/app/tags/v1/manifest.json | jq ."
jq . mnt/team/app/tags/v1/manifest.json

section "Reading a layer blob and checking its digest"
layer=$(jq -r '.layers[0].digest' mnt/team/app/tags/v1/manifest.json)
size=$(jq -r '.layers[0].size' mnt/team/app/tags/v1/manifest.json)
ls -l "mnt/team/app/blobs/$layer"
actual=$(sha256sum <"mnt/team/app/blobs/$layer" | cut -d' ' -f1)
echo "name:   $layer ($size bytes in the manifest)"
echo "sha256: sha256:$actual"
if [[ sha256:$actual == "$layer" ]]; then
    echo "digest OK"
else
    echo "digest MISMATCH" >&2
    exit 1
fi

section "Writing: cp into uploads/ is a blob upload, committed on close"
head -c 1048576 /dev/urandom >"$tmp/upload.bin"
cp "$tmp/upload.bin" mnt/team/app/uploads/upload.bin
ls -l mnt/team/app/uploads/
echo "sha256 of the file: sha256:$(sha256sum <"$tmp/upload.bin" | cut -d' ' -f1)"

section "Backup and restore with rsync: team/app into a new repository, restored/app"
rsync -a mnt/team/app/ "$tmp/backup/"
mkdir -p mnt/restored/app
rsync -a "$tmp/backup/" mnt/restored/app/
for dir in mnt/team/app/tags/*/; do
    tag=$(basename "$dir")
    a=$(sha256sum <"mnt/team/app/tags/$tag/manifest.json" | cut -c1-16)
    b=$(sha256sum <"mnt/restored/app/tags/$tag/manifest.json" | cut -c1-16)
    echo "tag $tag: team/app sha256:$a… restored/app sha256:$b…"
    [[ $a == "$b" ]] || { echo "restored tag $tag differs" >&2; exit 1; }
done

if [[ ${DEMO_NO_WAIT:-} == 1 ]]; then
    exit 0
fi
echo
echo "Mounted at ./mnt — press Ctrl-C to unmount and stop the registry"
wait "$regfs_pid"
