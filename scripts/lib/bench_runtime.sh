# shellcheck shell=bash
# Sourced by scripts/bench.sh: the container runtime rows (BENCH_ONLY=runtime; needs root).
#
# The image, bench/runtime (about 330 MiB in 3 gzip layers, built with umoci, pushed
# with skopeo):
#   1. an OS-like base: busybox-static as /bin/sh and friends, /etc, 176 MiB of random
#      files under /data/base;
#   2. Python: Debian's /usr/bin/python3.11, the shared libraries ldd lists for it and
#      for its extension modules, the dynamic loader, /usr/lib/python3.11 (about 54 MiB
#      here) and /etc/python3.11, plus 128 MiB of random files under /data/python;
#   3. the app: /app/main.py, which imports a dozen standard modules (json, re, email,
#      http.client, sqlite3, decimal, argparse, logging, xml.etree, csv, pathlib,
#      subprocess) and prints one line.
# The program is `/usr/bin/python3 /app/main.py`. It opens about 90 regular files of
# the image, 12 MiB of them (the interpreter 6.5 MiB, its libraries, some 80 modules;
# the build counts them with strace in a chroot, and the peer's row says the numbers);
# the other 96 % of the image's bytes are never read.
# ctr-remote (the private containerd of bench_image.sh) converts it to eStargz and
# zstd:chunked (`image convert --estargz|--zstdchunked --oci`), pushed beside it.
#
# Each start is timed from nothing to the program's first line of output, page cache
# dropped (`echo 3 > /proc/sys/vm/drop_caches`), in a fresh private containerd (own
# root, state and socket; CRI off) with, for regfs, a fresh `regfs snapshotter` (own
# root, empty disk cache, --cache-size 64MiB) as its proxy plugin `regfs`:
#   peer:  ctr image pull + ctr run (overlayfs)
#   regfs: ctr-remote image rpull --plain-http --snapshotter regfs + ctr run --snapshotter regfs
# Bytes moved are the snapshotter's mount of the registry host's (ROOT/mounts/<host>/
# .regfs/stats), read at the first output: fetched_bytes less images.background_bytes.
# Plain gzip starts a second time after `ctr image rm --sync`, on a fresh mount (the
# snapshotter restarted, its host mount unmounted) over the same disk cache. Peak RSS
# is VmHWM of the snapshotter plus its mount process, read once the start's background
# fetch has settled (at most 60 s after the first output).
# The podman row: `podman pull` + `podman run` of the eStargz image (own root, runroot,
# storage.conf), without a layer store and with a fresh regfs mount's /.layerstore/.
# A start that fails is a row with "error (see log)"; the logs of containerd, the
# snapshotter and its mount are kept in $tmp/rt-logs (BENCH_KEEP=1 keeps them).
# Uses bench.sh's helpers: log, row, secs, calc, holds, verdict, median, human_bytes …

rt_repo=bench/runtime
rt_base_mib=176 rt_python_mib=128
rt_cache=64MiB rt_cache_mib=64
rt_marker=regfs-bench-app
rt_rig='' rt_snap_pid='' rt_opens='' rt_open_bytes=''
declare -A rt_bytes=()

# ---------------------------------------------------------------------------------------
# The image

rt_build() {
    local d=$tmp/rt-image img
    img=$d/oci:app
    log "runtime: building the three-layer image with umoci"
    mkdir -p "$d"
    umoci init --layout "$d/oci" >&2
    umoci new --image "$img" >&2
    rt_layer "$img" "$d/bundle" rt_base_files
    rt_layer "$img" "$d/bundle" rt_python_files
    rt_layer "$img" "$d/bundle" rt_app_files
    umoci config --image "$img" --os linux --architecture amd64 \
        --config.cmd /usr/bin/python3 --config.cmd /app/main.py >&2
    rt_count_opens "$d/bundle/rootfs"
    rm -rf "$d/bundle"
    skopeo --insecure-policy copy --quiet --preserve-digests --dest-tls-verify=false \
        "oci:$img" "docker://$registry/$rt_repo:plain" >&2
    rm -rf "$d"
}

# rt_layer IMAGE BUNDLE FILL: unpack, FILL the rootfs, repack as a new layer. The last
# bundle stays (the program is run in it once).
rt_layer() {
    rm -rf "$2"
    umoci unpack --image "$1" "$2" >&2
    "$3" "$2/rootfs"
    umoci repack --image "$1" "$2" >&2
}

rt_base_files() {
    local r=$1 i t
    mkdir -p "$r/bin" "$r/etc" "$r/root" "$r/tmp" "$r/data/base"
    chmod 1777 "$r/tmp"
    cp "$(command -v busybox)" "$r/bin/busybox"
    for t in sh ls cat echo env sleep; do ln -s busybox "$r/bin/$t"; done
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$r/etc/passwd"
    printf 'root:x:0:\n' >"$r/etc/group"
    printf 'NAME=regfs-bench\nID=regfs\n' >"$r/etc/os-release"
    for ((i = 1; i <= rt_base_mib / 16; i++)); do head -c 16M /dev/urandom >"$r/data/base/random-$i.bin"; done
}

rt_python_files() {
    local r=$1 py=/usr/bin/python3.11 lib i
    [[ -x $py && -d /usr/lib/python3.11 ]] || { echo "the runtime rows need Debian's python3.11" >&2; return 1; }
    mkdir -p "$r/usr/bin" "$r/usr/lib" "$r/etc" "$r/data/python"
    cp "$py" "$r/usr/bin/python3.11"
    ln -s python3.11 "$r/usr/bin/python3"
    cp -a /usr/lib/python3.11 "$r/usr/lib/"
    [[ ! -d /etc/python3.11 ]] || cp -a /etc/python3.11 "$r/etc/"
    # The libraries of the interpreter and of its extension modules, and the loader,
    # at the paths the loader looks in.
    for lib in $({ ldd "$py" && for i in /usr/lib/python3.11/lib-dynload/*.so; do ldd "$i"; done; } |
        awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\/.*ld-linux/ { print $1 }' | sort -u); do
        cp -L --parents "$lib" "$r"
    done
    for ((i = 1; i <= rt_python_mib / 16; i++)); do head -c 16M /dev/urandom >"$r/data/python/random-$i.bin"; done
}

rt_app_files() {
    mkdir -p "$1/app"
    cat >"$1/app/main.py" <<'EOF'
import argparse, csv, decimal, email.message, email.parser, http.client, json, logging
import pathlib, re, subprocess, sys, xml.etree.ElementTree as ET
try:
    import sqlite3
except ImportError:
    sqlite3 = None
doc = ET.fromstring("<a><b>1</b></a>")
total = decimal.Decimal(doc.find("b").text) + decimal.Decimal("0.5")
print(f"regfs-bench-app: {len(sys.modules)} modules, {total}, sqlite3 {'yes' if sqlite3 else 'no'}")
EOF
}

# rt_count_opens ROOTFS: the files the program opens (strace in a chroot of the image),
# in rt_opens and rt_open_bytes (their sizes). Also the proof that the image runs.
rt_count_opens() {
    local r=$1 out=$tmp/rt-strace.out files
    if ! command -v strace >/dev/null; then
        if ! chroot "$r" /usr/bin/python3 /app/main.py >&2; then
            problems+=("runtime: the image's program does not run in a chroot of the image")
        fi
        return 0
    fi
    if ! strace -f -qq -e trace=open,openat,execve -o "$out" chroot "$r" /usr/bin/python3 /app/main.py >&2; then
        problems+=("runtime: the image's program does not run in a chroot of the image")
        return 0
    fi
    # Opens that succeeded once python runs (chroot's own come before its exec), of
    # regular files of the image (not directories), each file once.
    files=$(awk '/execve\("\/usr\/bin\/python3"/ { started = 1 } started && /open/ && !/ = -1 /' "$out" |
        sed -n 's/.*open[a-z]*([^"]*"\([^"]*\)".*/\1/p' | sort -u |
        while IFS= read -r f; do [[ $f != /* || ! -f $r/$f ]] || echo "$f"; done)
    rt_opens=$(grep -c . <<<"$files") || rt_opens=0
    rt_open_bytes=$(while IFS= read -r f; do [[ -z $f ]] || stat -c %s "$r/$f"; done <<<"$files" |
        awk '{ s += $1 } END { print s + 0 }')
    log "runtime: the program opens $rt_opens files of the image, $(human_bytes "$rt_open_bytes")"
}

# rt_image_bytes TAG: the sum of the layer sizes of bench/runtime:TAG.
rt_image_bytes() {
    curl -fsS --max-time 30 -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        "http://$registry/v2/$rt_repo/manifests/$1" | jq '[.layers[].size] | add'
}

# ---------------------------------------------------------------------------------------
# A rig per start: private containerd, and regfs snapshotter when asked

# rt_rig_start NAME [regfs]: $tmp/rt-NAME holds everything of this rig.
rt_rig_start() {
    rt_rig=$tmp/rt-$1
    mkdir -p "$rt_rig"
    local proxy=''
    if [[ ${2:-} == regfs ]]; then
        mkdir -p "$rt_rig/certs.d/$registry"
        printf 'server = "http://%s"\n' "$registry" >"$rt_rig/certs.d/$registry/hosts.toml"
        rt_snapshotter_start || return 1
        proxy=$rt_rig/snapshotter.sock
    fi
    containerd_start "$rt_rig/containerd" "$proxy"
}

rt_snapshotter_start() {
    rm -f "$rt_rig/snapshotter.sock"
    "$REGFS" snapshotter --root "$rt_rig/snap" --address "$rt_rig/snapshotter.sock" \
        --hosts-dir "$rt_rig/certs.d" --cache-dir "$rt_rig/cache" --cache-size "$rt_cache" \
        >>"$rt_rig/snapshotter.log" 2>&1 &
    rt_snap_pid=$!
    if ! wait_until 20 rt_snapshotter_up || ! test -S "$rt_rig/snapshotter.sock"; then
        log "regfs snapshotter did not listen within 20 s; its log:"
        tail -5 "$rt_rig/snapshotter.log" >&2
        return 1
    fi
}

rt_snapshotter_up() { test -S "$rt_rig/snapshotter.sock" || gone "$rt_snap_pid"; }

rt_ctr() { timeout -k 5 "$read_timeout" ctr-remote --address "$containerd_sock" "$@"; }

# rt_rig_stop: tasks killed, containerd and the snapshotter stopped, every mount under
# the rig unmounted (its regfs daemons exit), the logs kept, the rest removed.
rt_rig_stop() {
    [[ -n $rt_rig ]] || return 0
    local - id
    set +e # a teardown goes on past what failed
    if [[ -n ${containerd_pid:-} ]] && alive "$containerd_pid"; then
        for id in $(timeout 20 ctr --address "$containerd_sock" task ls -q 2>/dev/null); do
            timeout 20 ctr --address "$containerd_sock" task kill -s SIGKILL "$id" >/dev/null 2>&1
            timeout 20 ctr --address "$containerd_sock" task delete -f "$id" >/dev/null 2>&1
        done
        for id in $(timeout 20 ctr --address "$containerd_sock" container ls -q 2>/dev/null); do
            timeout 20 ctr --address "$containerd_sock" container delete "$id" >/dev/null 2>&1
        done
    fi
    stop_pid "${containerd_pid:-}"
    containerd_pid=
    stop_pid "$rt_snap_pid"
    rt_snap_pid=
    rt_unmount_below "$rt_rig"
    local keep=$tmp/rt-logs/${rt_rig##*/rt-}
    mkdir -p "$keep"
    cp "$rt_rig"/*.log "$rt_rig"/snap/logs/*.log "$rt_rig/snap/stats.json" "$keep/" 2>/dev/null
    cp "$rt_rig/containerd/log" "$keep/containerd.log" 2>/dev/null
    if grep -qF " $rt_rig/" /proc/self/mountinfo; then
        log "something is still mounted under $rt_rig; leaving it in place"
    else
        rm -rf --one-file-system "$rt_rig"
    fi
    rt_rig=
}

# rt_mount_pids DIR: the regfs mount daemons serving mounts under DIR/snap/mounts/.
rt_mount_pids() { pgrep -f -- " $1/snap/mounts/" || true; }

# rt_unmount_below DIR: unmount everything under DIR, deepest first; its regfs daemons
# then exit (10 s, else killed), and the cgroup the snapshotter made for one is removed.
rt_unmount_below() {
    local - dir=${1%/snap} m pid pids cg
    set +e
    pids=$(rt_mount_pids "$dir")
    while IFS= read -r m; do
        [[ -z $m ]] || umount -l "$m" 2>/dev/null || fusermount3 -u -z "$m" 2>/dev/null || true
    done < <(awk -v d="$1/" 'index($5, d) == 1 { print length($5), $5 }' /proc/self/mountinfo | sort -rn | cut -d' ' -f2-)
    for pid in $pids; do
        wait_until 10 gone "$pid" || { log "regfs mount pid $pid still running after its unmount; killing it"; kill -9 "$pid" 2>/dev/null; }
    done
    cg=$(findmnt -n -t cgroup2 -o TARGET 2>/dev/null | head -1)
    if [[ -n $cg && -d $cg/regfs-mount-${registry//:/-} ]]; then
        wait_until 5 rmdir "$cg/regfs-mount-${registry//:/-}" 2>/dev/null || true
    fi
}

# Called by bench.sh's cleanup: whatever rig is up, and the converter's containerd.
stop_runtime() {
    rt_rig_stop
    stop_pid "${containerd_pid:-}"
    containerd_pid=
}

# ---------------------------------------------------------------------------------------
# One start

rt_drop_caches() {
    timeout 120 sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || log "cannot drop the page cache (not root?)"
}

# rt_start TAG ID [regfs] [nopull]: drop the page cache, then pull (or rpull) TAG and run
# the program in container ID; prints the seconds to its first line of output.
rt_start() {
    local image=$registry/$rt_repo:$1 t0 tp out t1 first snap=()
    [[ ${3:-} != regfs ]] || snap=(--snapshotter regfs)
    rt_drop_caches
    t0=$(now_us)
    if [[ ${4:-} != nopull ]]; then
        if [[ ${3:-} == regfs ]]; then
            rt_ctr image rpull --plain-http --snapshotter regfs "$image" >/dev/null 2>>"$rt_rig/ctr.log" || return 1
        else
            rt_ctr image pull --plain-http "$image" >/dev/null 2>>"$rt_rig/ctr.log" || return 1
        fi
    fi
    tp=$(now_us)
    out=$(rt_ctr run --rm "${snap[@]}" "$image" "$2" /usr/bin/python3 /app/main.py 2>>"$rt_rig/ctr.log" |
        { IFS= read -r first || exit 1; echo "$(now_us) $first"; cat >/dev/null; }) || return 1
    read -r t1 first <<<"$out"
    [[ $first == "$rt_marker"* ]] || { log "runtime: unexpected first line: $first"; return 1; }
    log "runtime: $2: pull $(calc "($tp - $t0) / 1000000" 3) s, run to the first output $(calc "($t1 - $tp) / 1000000" 3) s"
    calc "($t1 - $t0) / 1000000" 6
}

# rt_stat [JQ ARGS] FILTER: a value of the snapshotter's host mount's /.regfs/stats.
rt_stat() {
    local f
    for f in "$rt_rig"/snap/mounts/*/.regfs/stats; do
        timeout -k 2 10 cat "$f" | jq -r "$@"
        return
    done
    return 1
}

# rt_hwm: VmHWM (kB) of the snapshotter plus its mount daemons.
rt_hwm() {
    local pid kb=0 v mounts
    mounts=$(rt_mount_pids "$rt_rig")
    [[ -n $mounts ]] || return 1
    for pid in "$rt_snap_pid" $mounts; do
        v=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || return 1
        [[ -n $v ]] || return 1
        kb=$((kb + v))
    done
    echo "$kb"
}

# rt_settle: waits (at most 60 s) until the mount's fetched and disk cache bytes stop
# moving, so that a fresh mount finds what this one wrote.
rt_settle() {
    local prev='' now i
    for ((i = 0; i < 60; i++)); do
        now=$(rt_stat '"\(.fetched_bytes) \(.disk.bytes) \(.in_flight)"') || return 0
        [[ $now != "$prev" ]] || return 0
        prev=$now
        sleep 1
    done
}

# ---------------------------------------------------------------------------------------
# Rows

runtime_rows() {
    if [[ $(id -u) -ne 0 ]]; then
        row "container runtime rows" "n/a (they run containerd and mount: run as root)" "—" "—" "—" "n/a"
        return
    fi
    if ! "$REGFS" snapshotter --help >/dev/null 2>&1; then
        row "container runtime rows" "n/a ($REGFS has no \`snapshotter\`)" "—" "—" "—" "n/a"
        return
    fi
    rt_build
    image_convert "$rt_repo" || problems+=("runtime: ctr-remote conversion failed: the TOC rows are missing")
    local tag
    for tag in plain estargz zstdchunked; do rt_bytes[$tag]=$(rt_image_bytes "$tag" || echo error); done
    log "runtime: image bytes plain ${rt_bytes[plain]}, estargz ${rt_bytes[estargz]}, zstdchunked ${rt_bytes[zstdchunked]}"

    local i s p=() u=()
    for ((i = 1; i <= runs; i++)); do
        log "runtime: peer run $i/$runs (ctr image pull + ctr run, overlayfs)"
        if rt_rig_start "peer-$i"; then
            s=$(rt_start plain "rt-$$-peer-$i") || s=error
            p+=("$s")
            log "runtime: peer start: $s s"
            s=$(rt_start plain "rt-$$-peer-$i-again" "" nopull) || s=error
            u+=("$s")
            log "runtime: peer start of the image already unpacked: $s s"
        else
            p+=(error) u+=(error)
        fi
        rt_rig_stop
    done
    log "runtime: peer samples (s): ${p[*]} | already unpacked: ${u[*]}"
    local peer='' unpacked='' peer_cell
    all_numeric "${p[@]}" && peer=$(median "${p[@]}")
    all_numeric "${u[@]}" && unpacked=$(median "${u[@]}")
    local mib
    mib=$(calc "${rt_bytes[plain]} / 1048576" 0)
    local what="$mib MiB image in 3 layers, \`python3 /app/main.py\`${rt_opens:+ (opens $rt_opens files, $(human_bytes "$rt_open_bytes"))}"
    if [[ -n $peer ]]; then
        peer_cell="ctr pull + run: $(secs "$peer")"
        row "containerd overlayfs: \`ctr image pull\` + \`ctr run\` to the first output, $what (the peer)" "—" \
            "$(secs "$peer")${unpacked:+; \`ctr run\` alone, already unpacked: $(secs "$unpacked")}" "—" "report" "—"
    else
        peer_cell="ctr pull + run: error (see log)"
        row "containerd overlayfs: \`ctr image pull\` + \`ctr run\`, $what (the peer)" "—" "error (see log)" "—" "report" "n/a"
    fi
    rt_regfs_rows
    rt_soci_row
    rt_wan_row
    rt_podman_row
}

# The snapshotter rows: each format cold, plain gzip's second start, peak RSS.
rt_regfs_rows() {
    local tag i s id rss_worst='' rss_tag=''
    for tag in estargz zstdchunked plain; do
        local t=() moved=() bg=() remote=() fallbacks=() hwm=() t2=() moved2=() layer2=() kept2=()
        for ((i = 1; i <= runs; i++)); do
            id=rt-$$-$tag-$i
            log "runtime: regfs $tag run $i/$runs (rpull + ctr run --snapshotter regfs)"
            s=error
            if rt_rig_start "$tag-$i" regfs; then s=$(rt_start "$tag" "$id" regfs) || s=error; fi
            t+=("$s")
            log "runtime: regfs $tag start: $s s"
            [[ $s == error ]] || rt_cold_counters
            if [[ $tag == plain ]]; then
                # Not in a subshell: it restarts the snapshotter, whose pid rt_rig_stop needs.
                if [[ $s != error ]] && rt_second_start "$id-again"; then
                    t2+=("$rt_second_s")
                    moved2+=("$(rt_moved || echo error)")
                    layer2+=("$(rt_stat .images.fetched_bytes || echo error)")
                    kept2+=("$(rt_stat '.disk.passthrough_opens // 0' || echo error)")
                    log "runtime: mount stats at the second start's first output: $(rt_stat -c '{fetched_bytes, images, disk}' 2>/dev/null | head -c 1500)"
                else
                    t2+=(error)
                fi
            fi
            rt_rig_stop
        done
        log "runtime: regfs $tag samples (s): ${t[*]} | moved ${moved[*]} | background ${bg[*]} | remote ${remote[*]} | fallbacks ${fallbacks[*]} | VmHWM kB ${hwm[*]}"
        rt_cold_row "$tag"
        if all_numeric "${hwm[@]}"; then
            s=$(median "${hwm[@]}")
            if [[ -z $rss_worst ]] || holds "$s > $rss_worst"; then rss_worst=$s rss_tag=$tag; fi
        fi
        if [[ $tag == plain ]]; then
            log "runtime: plain second start samples (s): ${t2[*]} | moved ${moved2[*]} | layer bytes ${layer2[*]} | passthrough opens ${kept2[*]}"
            rt_second_row
        fi
    done
    local label="snapshotter + its mount, peak RSS (VmHWM) over a cold start and the background fetch after it, \`--cache-size $rt_cache\`" limit=$((rt_cache_mib + 64))
    if [[ -n $rss_worst ]]; then
        row "$label" "$(calc "$rss_worst / 1024" 1) MiB (worst format: $rss_tag)" "—" \
            "$(calc "$rss_worst / 1024 / $limit") × limit" "≤ the cache + 64 MiB ($limit MiB)" "$(verdict "$rss_worst / 1024 <= $limit")"
    else
        row "$label" "error (see log)" "—" "—" "≤ the cache + 64 MiB ($limit MiB)" "**missed**"
    fi
}

# The plain gzip image once a SOCI index has been published for it (docs/SEMANTICS.md,
# "Shared indexes"): a regfs mount with --publish-indexes looks at the image once, then
# fresh snapshotters start it cold. After rt_regfs_rows: from here on the plain image
# has an index, which every later mount finds.
rt_soci_row() {
    local d=$tmp/rt-publish i s pid t=() moved=() from=()
    local label="regfs snapshotter, plain gzip with a SOCI index another mount published (\`--publish-indexes\`), cold"
    local target="≤ 0.15 ×, ≤ 15 % of bytes" bytes=${rt_bytes[plain]}
    mkdir -p "$d/mnt"
    log "runtime: publishing a SOCI index of the plain image (regfs mount --publish-indexes)"
    "$REGFS" mount --publish-indexes --cache-dir "$d/cache" "http://$registry" "$d/mnt" 2>>"$d/log" &
    pid=$!
    if wait_until 20 is_mounted "$d/mnt"; then
        cat "$d/mnt/$rt_repo/tags/plain/rootfs/app/main.py" >/dev/null || true
        wait_until 300 rt_published "$d/mnt" || log "runtime: no SOCI index published within 300 s"
    fi
    unmount "$d/mnt" "$pid"
    for ((i = 1; i <= runs; i++)); do
        s=error
        if rt_rig_start "soci-$i" regfs; then s=$(rt_start plain "rt-$$-soci-$i" regfs) || s=error; fi
        t+=("$s")
        if [[ $s != error ]]; then
            moved+=("$(rt_moved || echo error)")
            from+=("$(rt_stat '.images.layers_from_index // 0' || echo error)")
        fi
        log "runtime: regfs plain with an index: $s s, moved ${moved[*]: -1}"
        rt_rig_stop
    done
    if [[ -z $peer ]] || ! all_numeric "${t[@]}" "${moved[@]}" "${from[@]}" || ! numeric "$bytes"; then
        row "$label" "error (see log)" "$peer_cell" "—" "$target" "**missed**"
        return
    fi
    local a m f
    a=$(median "${t[@]}") m=$(median "${moved[@]}") f=$(median "${from[@]}" | cut -d. -f1)
    row "$label" "$(secs "$a"), $(human_bytes "$m") moved ($(calc "100 * $m / $bytes" 1) % of $(human_bytes "$bytes")), $f layers from the index" \
        "$peer_cell" "$(calc "$a / $peer") × peer, $(calc "100 * $m / $bytes" 1) % of bytes" "$target" \
        "$(verdict "$a / $peer <= 0.15 && $m / $bytes <= 0.15 && $f >= 1")"
}

rt_published() {
    [[ $(timeout -k 2 10 cat "$1/.regfs/stats" | jq -r '.images.indexes_published // 0') -ge 1 ]]
}

# rt_moved: layer bytes the mount fetched for the reads programs waited on.
# One read of the counters: background bytes arrive at any moment.
rt_moved() { rt_stat "$rt_moved_filter"; }
rt_moved_filter='.fetched_bytes - (.images.background_bytes // 0)'

# After a cold start (rt_regfs_rows' locals): what it moved, in the background, how
# the snapshotter served the layers, its memory.
rt_cold_counters() {
    local m b
    read -r m b < <(rt_stat "\"\\($rt_moved_filter) \\(.images.background_bytes // 0)\"" || echo error error)
    moved+=("${m:-error}")
    bg+=("${b:-error}")
    remote+=("$(jq -r '.remote_snapshots // 0' "$rt_rig/snap/stats.json" 2>/dev/null || echo error)")
    fallbacks+=("$(jq -r '.fallbacks // 0' "$rt_rig/snap/stats.json" 2>/dev/null || echo error)")
    log "runtime: mount stats at the first output: $(rt_stat -c '{fetched_bytes, images, requests}' 2>/dev/null | head -c 1500)"
    # Peak memory over the start and the background fetch that follows it.
    rt_settle
    hwm+=("$(rt_hwm || echo error)")
}

# rt_second_start ID: the image removed, the snapshotter restarted and its host mount
# unmounted, the disk cache kept; then the same start again. Its seconds in rt_second_s.
rt_second_start() {
    rt_settle
    rt_ctr image rm --sync "$registry/$rt_repo:plain" >/dev/null 2>>"$rt_rig/ctr.log" || return 1
    stop_pid "$rt_snap_pid"
    rt_unmount_below "$rt_rig/snap"
    rt_snapshotter_start || return 1
    wait_until 20 rt_ctr snapshots --snapshotter regfs ls >/dev/null 2>&1 || return 1
    rt_second_s=$(rt_start plain "$1" regfs)
}

# rt_cold_row TAG (rt_regfs_rows' locals): the cold row of one format.
rt_cold_row() {
    local tag=$1 label target bytes=${rt_bytes[$1]} a m b r f
    case $tag in
    estargz) label="regfs snapshotter, eStargz, cold: rpull + \`ctr run\` to the first output" ;;
    zstdchunked) label="regfs snapshotter, zstd:chunked, cold: rpull + \`ctr run\` to the first output" ;;
    plain) label="regfs snapshotter, plain gzip, cold: rpull + \`ctr run\` to the first output" ;;
    esac
    if [[ $tag == plain ]]; then target="≤ 0.4 ×"; else target="≤ 0.15 ×, ≤ 10 % of bytes"; fi
    if ! all_numeric "${t[@]}" "${moved[@]}" "${bg[@]}" || ! numeric "$bytes"; then
        row "$label" "error (see log)" "$peer_cell" "—" "$target" "**missed**"
        return
    fi
    a=$(median "${t[@]}") m=$(median "${moved[@]}") b=$(median "${bg[@]}")
    r=$(median "${remote[@]}" | cut -d. -f1) f=$(median "${fallbacks[@]}" | cut -d. -f1)
    local cell="$(secs "$a"), $(human_bytes "$m") moved ($(calc "100 * $m / $bytes" 1) % of $(human_bytes "$bytes"); $(human_bytes "$b") in the background), $r remote layers, $f fallbacks"
    if [[ -z $peer ]]; then
        row "$label" "$cell" "$peer_cell" "—" "$target" "n/a"
    elif [[ $tag == plain ]]; then
        row "$label" "$cell" "$peer_cell" "$(calc "$a / $peer") × peer" "$target" "$(verdict "$a / $peer <= 0.4")"
    else
        row "$label" "$cell" "$peer_cell" "$(calc "$a / $peer") × peer, $(calc "100 * $m / $bytes" 1) % of bytes" \
            "$target" "$(verdict "$a / $peer <= 0.15 && $m / $bytes <= 0.10")"
    fi
}

# rt_wan_row: the peer (plain gzip) and the eStargz row again with the registry behind
# bench_wan.sh's shaper (examples/wan_proxy): containerd, the snapshotter and its mount
# all reach it through the shaper, whose address stands in for the registry's.
rt_wan_row() {
    local label="the eStargz row through the WAN shaper ($wan_rtt RTT, $wan_conn/s per connection, $wan_total/s in all): rpull + \`ctr run\` vs \`ctr pull\` + \`ctr run\` through it"
    local target="≤ 0.25 × the peer through it" direct=$registry i s p=() t=() moved=() a m q
    log "building examples/wan_proxy"
    if ! cargo build --release -q --example wan_proxy >&2; then
        row "$label" "error (see log)" "—" "—" "$target" "**missed**"
        return
    fi
    wan_proxy=$root/target/release/examples/wan_proxy
    start_wan "$direct" registry
    registry=$wan_addr
    for ((i = 1; i <= runs; i++)); do
        log "runtime: WAN run $i/$runs: the peer, then regfs eStargz"
        s=error
        if rt_rig_start "wan-peer-$i"; then s=$(rt_start plain "rt-$$-wan-peer-$i") || s=error; fi
        p+=("$s")
        rt_rig_stop
        s=error
        if rt_rig_start "wan-$i" regfs; then s=$(rt_start estargz "rt-$$-wan-$i" regfs) || s=error; fi
        t+=("$s")
        [[ $s == error ]] || moved+=("$(rt_moved || echo error)")
        rt_rig_stop
    done
    registry=$direct
    stop_wan
    log "runtime: WAN samples (s): peer ${p[*]} | regfs eStargz ${t[*]} | moved ${moved[*]}"
    if ! all_numeric "${p[@]}" "${t[@]}" "${moved[@]}"; then
        row "$label" "error (see log)" "—" "—" "$target" "**missed**"
        return
    fi
    a=$(median "${t[@]}") q=$(median "${p[@]}") m=$(median "${moved[@]}")
    row "$label" "$(secs "$a"), $(human_bytes "$m") moved" "ctr pull + run through it: $(secs "$q")" \
        "$(calc "$a / $q") × peer" "$target" "$(verdict "$a / $q <= 0.25")"
}

# rt_second_row (rt_regfs_rows' locals): plain gzip started again over the disk cache.
rt_second_row() {
    local label="regfs snapshotter, plain gzip, second start after \`ctr image rm --sync\` (fresh mount, disk cache kept)"
    local target="≤ 0.1 × peer, 0 layer bytes, ≤ 2 × \`ctr run\` already unpacked" a m l k
    if ! all_numeric "${t2[@]}" "${moved2[@]}" "${layer2[@]}" "${kept2[@]}"; then
        row "$label" "error (see log)" "$peer_cell" "—" "$target" "**missed**"
        return
    fi
    a=$(median "${t2[@]}") m=$(median "${moved2[@]}") l=$(median "${layer2[@]}") k=$(median "${kept2[@]}")
    local cell="$(secs "$a"), $(human_bytes "$m") fetched, $(human_bytes "$l") of layers, $(calc "$k" 0) files opened from the disk cache (passthrough)"
    if [[ -z $peer || -z $unpacked ]]; then
        row "$label" "$cell" "$peer_cell" "—" "$target" "n/a"
        return
    fi
    row "$label" "$cell" "$peer_cell; already unpacked: $(secs "$unpacked")" \
        "$(calc "$a / $peer") × peer, $(calc "$a / $unpacked") × unpacked" "$target" \
        "$(verdict "$a / $peer <= 0.1 && $l == 0 && $a / $unpacked <= 2")"
}

# ---------------------------------------------------------------------------------------
# podman: pull + run of the eStargz image, with regfs's /.layerstore/ and without

# rt_podman DIR [STORE] ARGS...: podman with its own root, runroot, storage.conf and
# registries.conf under DIR (made by rt_podman_setup), STORE as its additional layer
# store unless it is empty. `--root` drops storage.conf's driver options: the store is
# given again as --storage-opt (as tests/layerstore.rs does).
rt_podman() {
    local d=$1 store=$2 opt=()
    shift 2
    [[ -z $store ]] || opt=(--storage-opt "overlay.additionallayerstore=$store:ref")
    CONTAINERS_STORAGE_CONF=$d/storage.conf CONTAINERS_REGISTRIES_CONF=$d/registries.conf TMPDIR=$d/tmp \
        timeout -k 5 "$read_timeout" podman --root "$d/root" --runroot "$d/run" "${opt[@]}" "$@"
}

rt_podman_setup() {
    local d=$1 store=${2:-}
    mkdir -p "$d/tmp"
    {
        printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n[storage.options]\n' "$d/root" "$d/run"
        [[ -z $store ]] || printf 'additionallayerstores = ["%s:ref"]\n' "$store"
    } >"$d/storage.conf"
    printf 'unqualified-search-registries = []\n[[registry]]\nlocation = "%s"\ninsecure = true\n' "$registry" >"$d/registries.conf"
}

# rt_podman_teardown DIR [STORE]: containers and images removed, mounts under DIR gone.
rt_podman_teardown() {
    local -
    set +e
    rt_podman "$1" "${2:-}" rm --all --force >/dev/null 2>&1
    rt_podman "$1" "${2:-}" rmi --all --force >/dev/null 2>&1
    rt_unmount_below "$1"
    if grep -qF " $1/" /proc/self/mountinfo; then
        log "something is still mounted under $1; leaving it in place"
    else
        rm -rf --one-file-system "$1"
    fi
}

# rt_podman_start DIR STORE: page cache dropped, pull + run to the first line; seconds.
rt_podman_start() {
    local image=$registry/$rt_repo:estargz t0 out t1 first
    rt_drop_caches
    t0=$(now_us)
    rt_podman "$1" "$2" pull -q "$image" >/dev/null 2>>"$tmp/rt-logs/podman.log" || return 1
    out=$(rt_podman "$1" "$2" run --rm --network none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
        "$image" /usr/bin/python3 /app/main.py 2>>"$tmp/rt-logs/podman.log" |
        { IFS= read -r first || exit 1; echo "$(now_us) $first"; cat >/dev/null; }) || return 1
    read -r t1 first <<<"$out"
    [[ $first == "$rt_marker"* ]] || { log "runtime: podman's unexpected first line: $first"; return 1; }
    calc "($t1 - $t0) / 1000000" 6
}

rt_podman_row() {
    local label="podman pull + run of the eStargz image to the first output: regfs's \`/.layerstore/\` vs without"
    local target="≤ 0.3 ×" i s d with=() without=() moved=() stored=()
    if ! command -v podman >/dev/null; then
        row "$label" "n/a (no podman: scripts/setup.sh installs it)" "—" "—" "$target" "n/a"
        return
    fi
    mkdir -p "$tmp/rt-logs"
    for ((i = 1; i <= runs; i++)); do
        log "runtime: podman run $i/$runs without the layer store, then with it"
        d=$tmp/rt-podman-$i
        rt_podman_setup "$d"
        s=$(rt_podman_start "$d" "") || s=error
        without+=("$s")
        rt_podman_teardown "$d"
        regfs_mount --cache-size "$rt_cache"
        rt_podman_setup "$d" "$mnt/.layerstore"
        s=$(rt_podman_start "$d" "$mnt/.layerstore") || s=error
        with+=("$s")
        moved+=("$(stat_json "$rt_moved_filter" || echo error)")
        stored+=("$(find "$d/root/overlay" -mindepth 2 -maxdepth 2 -name additionallayer 2>/dev/null | wc -l)")
        log "runtime: podman samples (s): without ${without[*]} | with ${with[*]} | moved ${moved[*]} | layers from the store ${stored[*]}"
        rt_podman_teardown "$d" "$mnt/.layerstore"
        regfs_umount
    done
    if ! all_numeric "${without[@]}"; then
        row "$label" "—" "podman without: error (see log)" "—" "$target" "n/a"
    elif ! all_numeric "${with[@]}" "${moved[@]}"; then
        row "$label" "error (see log)" "without: $(secs "$(median "${without[@]}")")" "—" "$target" "**missed**"
    else
        local a p m n
        a=$(median "${with[@]}") p=$(median "${without[@]}") m=$(median "${moved[@]}") n=$(median "${stored[@]}" | cut -d. -f1)
        row "$label" "$(secs "$a"), $(human_bytes "$m") moved, $n layers from the store" "without: $(secs "$p")" \
            "$(calc "$a / $p") ×" "$target" "$(verdict "$a / $p <= 0.3 && $n >= 1")"
    fi
}
