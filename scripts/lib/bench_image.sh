# shellcheck shell=bash
# Sourced by scripts/bench.sh: the image-contents rows (BENCH_ONLY=image).
#
# An image of BENCH_IMAGE_MIB (default 512) MiB of random files, busybox and 2,000 small
# files, built with umoci and pushed with skopeo as bench/image:plain (tar+gzip); the same
# image converted by ctr-remote (private containerd) to eStargz and zstd:chunked. The peer
# is what a user runs today to see a file of an image: `skopeo copy docker://… oci:…` then
# `umoci unpack`. Plus the memory of a daemon that indexed a layer of 100,000 files.
# Uses bench.sh's helpers: log, row, secs, calc, holds, verdict, median, regfs_mount …

image_mib=${BENCH_IMAGE_MIB:-512}
image_repo=bench/image

# stat_json FILTER: a value of the mounted regfs's /.regfs/stats.
stat_json() { timeout -k 2 10 cat "$(stats_file)" | jq -r "$1"; }
blob_requests() { stat_json '.requests.blob_range + .requests.blob_stream'; }

image_build() {
    local d=$tmp/image r n i
    log "building a ${image_mib} MiB image with umoci"
    mkdir -p "$d"
    umoci init --layout "$d/oci" >&2
    umoci new --image "$d/oci:big" >&2
    umoci unpack --image "$d/oci:big" "$d/bundle" >&2
    r=$d/bundle/rootfs
    mkdir -p "$r/bin" "$r/etc" "$r/data" "$r/usr/share/doc"
    cp "$(command -v busybox)" "$r/bin/busybox"
    ln -s busybox "$r/bin/sh"
    printf 'NAME=regfs-bench\nID=regfs\n' >"$r/etc/os-release"
    echo bench-host >"$r/etc/hostname"
    python3 -c "
import os, sys
for i in range(2000):
    open(os.path.join(sys.argv[1], f'doc-{i:04}.txt'), 'w').write(f'small file {i}\n' * (1 + i % 40))
" "$r/usr/share/doc"
    n=$((image_mib / 64))
    for i in $(seq "$n"); do head -c 64M /dev/urandom >"$r/data/random-$i.bin"; done
    umoci repack --image "$d/oci:big" "$d/bundle" >&2
    umoci config --image "$d/oci:big" --os linux --architecture amd64 >&2
    rm -rf "$d/bundle"
    skopeo --insecure-policy copy --quiet --preserve-digests --dest-tls-verify=false \
        "oci:$d/oci:big" "docker://$registry/$image_repo:plain" >&2
    rm -rf "$d/oci"
    image_bytes=$(curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        "http://$registry/v2/$image_repo/manifests/plain" | jq '[.layers[].size] | add')
}

# containerd_start DIR [SNAPSHOTTER_SOCKET]: a private containerd (own root, state and
# socket under DIR; CRI off), with the proxy snapshotter `regfs` on SNAPSHOTTER_SOCKET
# when one is given. Sets containerd_pid and containerd_sock; false if it does not answer
# within 30 s.
containerd_start() {
    local c=$1
    mkdir -p "$c"
    containerd_sock=$c/containerd.sock
    {
        cat <<EOF
version = 2
root = "$c/root"
state = "$c/state"
[grpc]
  address = "$containerd_sock"
[plugins."io.containerd.grpc.v1.cri"]
  disable = true
EOF
        [[ -z ${2:-} ]] || printf '[proxy_plugins.regfs]\n  type = "snapshot"\n  address = "%s"\n' "$2"
    } >"$c/config.toml"
    containerd --config "$c/config.toml" >"$c/log" 2>&1 &
    containerd_pid=$!
    if ! wait_until 30 ctr --address "$containerd_sock" version >/dev/null 2>&1; then
        log "containerd did not start; its log:"
        tail -5 "$c/log" >&2
        stop_pid "$containerd_pid"
        containerd_pid=
        return 1
    fi
}

# image_convert [REPO]: REPO:plain (default the image rows' repository) converted by
# ctr-remote in a private containerd to eStargz and zstd:chunked, pushed as REPO:estargz
# and REPO:zstdchunked.
image_convert() {
    local repo=${1:-$image_repo} kind failed=0
    containerd_start "$tmp/containerd" || return 1
    local src=$registry/$repo:plain
    ctr-remote --address "$containerd_sock" image pull --plain-http "$src" >&2 || failed=1
    for kind in estargz zstdchunked; do
        log "converting $repo to $kind (ctr-remote)"
        ctr-remote --address "$containerd_sock" image convert "--$kind" --oci "$src" "$registry/$repo:$kind" >&2 || failed=1
        ctr-remote --address "$containerd_sock" image push --plain-http "$registry/$repo:$kind" >&2 || failed=1
    done
    stop_pid "$containerd_pid"
    containerd_pid=
    rm -rf --one-file-system "$tmp/containerd"
    return "$failed"
}

# The peer: skopeo copy to an OCI layout, then umoci unpack. Prints seconds.
peer_unpack() {
    local d=$tmp/peer t0
    rm -rf "$d"
    mkdir -p "$d"
    t0=$(now_us)
    timeout -k 5 "$read_timeout" skopeo --insecure-policy copy --quiet --src-tls-verify=false \
        "docker://$registry/$image_repo:plain" "oci:$d/oci:x" >&2 || return 1
    timeout -k 5 "$read_timeout" umoci unpack --image "$d/oci:x" "$d/bundle" >/dev/null 2>&1 || return 1
    calc "($(now_us) - $t0) / 1000000" 6
    rm -rf "$d"
}

image_rows() {
    image_build
    image_convert || problems+=("ctr-remote conversion failed: the TOC rows are missing")
    local rootfs peer=() runs_peer i
    log "peer: skopeo copy + umoci unpack of the plain image"
    for ((i = 0; i < runs; i++)); do peer+=("$(peer_unpack || echo error)"); done
    if ! all_numeric "${peer[@]}"; then
        row "image rows" "—" "skopeo copy + umoci unpack failed (see stderr)" "—" "—" "n/a"
        return
    fi
    local p
    p=$(median "${peer[@]}")
    local peer_cell="skopeo copy + umoci unpack: $(secs "$p"), $(human_bytes "$image_bytes")"

    # One small file of a cold image, fresh mount each run.
    local tag label
    for tag in estargz zstdchunked plain; do
        local t=() f=() s
        for ((i = 0; i < runs; i++)); do
            regfs_mount
            rootfs=$mnt/$image_repo/tags/$tag/rootfs
            s=$(elapsed_s cat "$rootfs/etc/os-release" || echo error)
            t+=("$s")
            f+=("$(stat_json .fetched_bytes || echo error)")
            regfs_umount
        done
        case $tag in
        plain) label="cold ${image_mib} MiB image, one small file, plain gzip (the first reader indexes the layer)" ;;
        *) label="cold ${image_mib} MiB image, one small file, $tag" ;;
        esac
        if all_numeric "${t[@]}" "${f[@]}"; then
            local tm fm
            tm=$(median "${t[@]}") fm=$(median "${f[@]}")
            if [[ $tag == plain ]]; then
                row "$label" "$(secs "$tm"), $(human_bytes "$fm")" "$peer_cell" "$(calc "$tm / $p") × time" \
                    "≤ 0.5 × time" "$(verdict "$tm / $p <= 0.5")"
            else
                row "$label" "$(secs "$tm"), $(human_bytes "$fm")" "$peer_cell" \
                    "$(calc "$tm / $p" 3) × time, $(calc "100 * $fm / $image_bytes" 2) % of bytes" \
                    "≤ 0.05 × time, ≤ 1 % of bytes" "$(verdict "$tm / $p <= 0.05 && $fm / $image_bytes <= 0.01")"
            fi
        else
            row "$label" "error (see log)" "$peer_cell" "—" "—" "**missed**"
        fi
    done

    # Plain gzip: a second file with the index in memory, then in a fresh mount with
    # the index in the disk cache (the memory cache is smaller than the layer).
    local disk=$tmp/disk-cache-image t2=() r2=() t3=() r3=() from_disk=()
    for ((i = 0; i < runs; i++)); do
        rm -rf "$disk"
        regfs_mount --cache-size 64MiB --cache-dir "$disk"
        rootfs=$mnt/$image_repo/tags/plain/rootfs
        cat "$rootfs/etc/os-release" >/dev/null
        local before
        before=$(blob_requests)
        t2+=("$(elapsed_s cat "$rootfs/etc/hostname" || echo error)")
        r2+=("$(($(blob_requests) - before))")
        regfs_umount
        regfs_mount --cache-size 64MiB --cache-dir "$disk"
        t3+=("$(elapsed_s cat "$rootfs/usr/share/doc/doc-1234.txt" || echo error)")
        r3+=("$(blob_requests)")
        from_disk+=("$(stat_json .images.indexes_from_disk)")
        regfs_umount
    done
    label="plain gzip image, a second file, same mount (index in memory; 64 MiB block cache)"
    if all_numeric "${t2[@]}" "${r2[@]}"; then
        local a b
        a=$(median "${t2[@]}") b=$(median "${r2[@]}")
        row "$label" "$(secs "$a"), $(calc "$b" 0) blob requests" "$peer_cell" "$(calc "$a / $p" 4) × time" \
            "≤ 2 range requests, ≤ 0.05 ×" "$(verdict "$b <= 2 && $a / $p <= 0.05")"
    else
        row "$label" "error (see log)" "$peer_cell" "—" "≤ 2 range requests, ≤ 0.05 ×" "**missed**"
    fi
    label="same, fresh mount, index from the disk cache"
    if all_numeric "${t3[@]}" "${r3[@]}" "${from_disk[@]}"; then
        local a b
        a=$(median "${t3[@]}") b=$(median "${r3[@]}")
        row "$label" "$(secs "$a"), $(calc "$b" 0) blob requests, $(median "${from_disk[@]}" | cut -d. -f1) index(es) from disk" \
            "$peer_cell" "$(calc "$a / $p" 4) × time" "≤ 2 range requests, ≤ 0.05 ×" "$(verdict "$b <= 2 && $a / $p <= 0.05")"
    else
        row "$label" "error (see log)" "$peer_cell" "—" "≤ 2 range requests, ≤ 0.05 ×" "**missed**"
    fi

    # The whole image as files, cold: tar of the view (index pass included).
    local tt=()
    for ((i = 0; i < runs; i++)); do
        regfs_mount
        rootfs=$mnt/$image_repo/tags/plain/rootfs
        tt+=("$(elapsed_s sh -c "tar -C '$rootfs' -cf - . | wc -c" || echo error)")
        regfs_umount
    done
    label="\`tar -c rootfs/ | wc -c\` of the whole cold image (plain gzip)"
    if all_numeric "${tt[@]}"; then
        local a
        a=$(median "${tt[@]}")
        row "$label" "$(secs "$a")" "$peer_cell" "$(calc "$p / $a") × faster" "≥ 1 × (faster)" "$(verdict "$p / $a >= 1")"
    else
        row "$label" "error (see log)" "$peer_cell" "—" "≥ 1 ×" "**missed**"
    fi

    image_rss_row
}

# Peak RSS of a daemon that indexed a layer of 100,000 files (64 MiB block cache).
image_rss_row() {
    local gen=$tmp/gen layer digest cfg hwm index
    python3 -c "
import io, sys, tarfile, gzip
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode='w') as tar:
    for d in range(100):
        info = tarfile.TarInfo(f'dir-{d:03}'); info.type = tarfile.DIRTYPE; info.mode = 0o755
        tar.addfile(info)
        for f in range(1000):
            data = f'{d}/{f}\n'.encode()
            info = tarfile.TarInfo(f'dir-{d:03}/a-file-with-a-longish-name-{f:04}.txt'); info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
open(sys.argv[1], 'wb').write(gzip.compress(buf.getvalue(), 6))
" "$gen/many.tar.gz"
    digest=$(push_blob bench/many "$gen/many.tar.gz")
    printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' >"$gen/many.cfg"
    cfg=$(push_blob bench/many "$gen/many.cfg")
    manifest "$(descriptor "$config_type" "$cfg" "$gen/many.cfg")" \
        "$(descriptor "$layer_type" "$digest" "$gen/many.tar.gz")" '{}' >"$gen/many.json"
    push_manifest bench/many v1 "$gen/many.json"
    regfs_mount --cache-size 64MiB
    ls "$mnt/bench/many/tags/v1/rootfs/dir-042" | wc -l >/dev/null
    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$regfs_pid/status")
    index=$(stat_json .images.index_bytes)
    regfs_umount
    local label="daemon peak RSS after indexing a layer of 100,000 files, \`--cache-size 64MiB\`"
    if all_numeric "$hwm" "$index"; then
        row "$label" "$(calc "$hwm / 1024" 1) MiB (index $(human_bytes "$index"))" "—" \
            "$(calc "$hwm / 1024 / 128") × limit" "≤ 128 MiB (the cache + 64 MiB)" "$(verdict "$hwm / 1024 <= 128")"
    else
        row "$label" "error (see log)" "—" "—" "≤ 64 MiB beyond the cache" "**missed**"
    fi
}
