# shellcheck shell=bash
# Sourced by scripts/bench.sh: the shared-index rows (BENCH_ONLY=soci).
#
# The plain gzip image of the image rows (bench/image:plain, BENCH_IMAGE_MIB, one layer
# made by umoci), built here if the image rows did not run. Every mount is fresh with an
# empty disk cache. In order, so that each row sees the registry it means:
#   1. one small file with no index anywhere: the first look reads the layer whole (the
#      pass), BENCH_RUNS times;
#   2. the same with --publish-indexes: the pass, then a SOCI v1 index pushed as a
#      referrer of the image (once: later mounts find it and are lazy);
#   3. another small file on a fresh mount that finds that index: a few spans and the
#      zTOC, BENCH_RUNS times; bytes are what the read needed (fetched less background).
# Uses bench.sh's helpers: log, row, secs, calc, verdict, median, regfs_mount …

soci_rows() {
    [[ -n ${image_bytes:-} ]] || image_build
    local rootfs=() t_plain=() i s
    log "soci: one small file of the plain image, no index (the pass)"
    for ((i = 0; i < runs; i++)); do
        regfs_mount
        t_plain+=("$(elapsed_s cat "$mnt/$image_repo/tags/plain/rootfs/etc/os-release" || echo error)")
        regfs_umount
    done

    log "soci: the same with --publish-indexes"
    local t_pub published
    regfs_mount --publish-indexes
    t_pub=$(elapsed_s cat "$mnt/$image_repo/tags/plain/rootfs/etc/os-release" || echo error)
    wait_until 300 soci_published || log "no index published within 300 s"
    published=$(stat_json .images.indexes_published || echo error)
    regfs_umount

    log "soci: another small file, fresh mount, the index found"
    local t_idx=() f_idx=() found=() fetched background
    for ((i = 0; i < runs; i++)); do
        regfs_mount
        t_idx+=("$(elapsed_s cat "$mnt/$image_repo/tags/plain/rootfs/usr/share/doc/doc-1234.txt" || echo error)")
        fetched=$(stat_json .fetched_bytes || echo error)
        background=$(stat_json .images.background_bytes || echo error)
        found+=("$(stat_json .images.layers_from_index || echo error)")
        if all_numeric "$fetched" "$background"; then f_idx+=("$((fetched - background))"); else f_idx+=(error); fi
        regfs_umount
    done

    local p label="one small file, fresh mount, ${image_mib} MiB plain gzip image: with a SOCI index vs without"
    if all_numeric "${t_plain[@]}" "${t_idx[@]}" "${f_idx[@]}" "${found[@]}"; then
        local a b f
        p=$(median "${t_plain[@]}") a=$(median "${t_idx[@]}") f=$(median "${f_idx[@]}")
        b=$(median "${found[@]}")
        row "$label" "$(secs "$a"), $(human_bytes "$f") for the read, $(calc "$b" 0) layer(s) from the index" \
            "no index: $(secs "$p") (the pass)" "$(calc "$a / $p" 3) × time, $(calc "100 * $f / $image_bytes" 2) % of bytes" \
            "≤ 0.05 ×" "$(verdict "$a / $p <= 0.05 && $b >= 1")"
    else
        row "$label" "error (see log)" "—" "—" "≤ 0.05 ×" "**missed**"
    fi
    label="publishing: the first look with \`--publish-indexes\` vs without (one run)"
    if all_numeric "${t_plain[@]}" "$t_pub" "$published"; then
        p=$(median "${t_plain[@]}")
        row "$label" "$(secs "$t_pub"), $(calc "$published" 0) index(es) published" "without: $(secs "$p")" \
            "$(calc "$t_pub / $p") ×" "≤ 1.10 ×" "$(verdict "$t_pub / $p <= 1.10 && $published >= 1")"
    else
        row "$label" "error (see log)" "—" "—" "≤ 1.10 ×" "**missed**"
    fi
}

soci_published() { [[ $(stat_json .images.indexes_published 2>/dev/null) -ge 1 ]]; }
