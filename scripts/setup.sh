#!/usr/bin/env bash
# Installs the system packages regfs needs to build, test and demo.
# Idempotent: does nothing when every tool is already present.
# Used by scripts/test.sh (CI), scripts/demo.sh and the Vagrant box.
set -euo pipefail

# Image-content tests also convert images (containerd + ctr-remote, podman's
# zstd:chunked), run a rootfs (busybox-static) and write hostile layers (python3). The
# SOCI zTOC tests check regfs's codec against the code flatc generates from the schema
# (flatbuffers-compiler, python3-flatbuffers). The runtime tests run containers (runc)
# under containerd and podman (with conmon, fuse-overlayfs and uidmap, which it uses),
# and build containerd's snapshotter conformance suite (Go 1.19 in GOPATH mode on
# Debian's containerd sources).
tools=(docker-registry skopeo umoci fusermount3 rsync jq curl openssl htpasswd
    containerd ctr-remote busybox python3 unshare findmnt flatc
    podman runc conmon fuse-overlayfs newuidmap go)
packages=(fuse3 docker-registry skopeo umoci rsync jq curl openssl apache2-utils
    containerd stargz-snapshotter busybox-static python3 util-linux
    flatbuffers-compiler python3-flatbuffers
    podman runc conmon fuse-overlayfs uidmap golang-go
    golang-github-containerd-containerd-dev)
# Files of packages that bring no command.
files=(/usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite)

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
fi

missing=()
for t in "${tools[@]}"; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
for f in "${files[@]}"; do
    [[ -e $f ]] || missing+=("$f")
done

/usr/bin/python3 -c 'import flatbuffers' 2>/dev/null || missing+=(python3-flatbuffers)

if ((${#missing[@]} > 0)); then
    echo "setup.sh: missing ${missing[*]}; installing ${packages[*]}" >&2
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
fi

# FUSE needs the kernel device; packages cannot create it (containers must pass it in).
if [[ ! -c /dev/fuse ]]; then
    echo "setup.sh: ERROR: /dev/fuse does not exist." >&2
    echo "  Load the module (modprobe fuse) or, in a container, run it with --device /dev/fuse" >&2
    echo "  (and --cap-add SYS_ADMIN)." >&2
    exit 1
fi

# The kernel's FUSE connection counters (/sys/fs/fuse/connections/*/waiting, read by
# tests/soak.rs) need the fusectl filesystem; systemd mounts it, containers often not.
if [[ -d /sys/fs/fuse/connections ]] && ! grep -q " /sys/fs/fuse/connections fusectl " /proc/mounts; then
    "${sudo[@]}" mount -t fusectl fusectl /sys/fs/fuse/connections ||
        echo "setup.sh: warning: cannot mount fusectl on /sys/fs/fuse/connections" >&2
fi
