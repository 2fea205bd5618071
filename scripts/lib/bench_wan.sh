# shellcheck shell=bash
# Sourced by scripts/bench.sh: the WAN rows (BENCH_ONLY=wan).
#
# The same registry and nginx, each behind examples/wan_proxy (tests/common/shaper.rs):
# BENCH_WAN_RTT (40ms) round trip, BENCH_WAN_CONN (25MB) per second per connection,
# BENCH_WAN_TOTAL (200MB) per second for all connections together — a registry 20 ms
# away over a link whose single TCP connection is rate-bound. Everything measured goes
# through the shaper: regfs, curl, the xargs -P 8 curl pipeline, rclone over nginx.
# BENCH_WAN_FLAGS: extra flags for these rows' regfs mounts (e.g. --block-size 256KiB).
# Uses bench.sh's helpers: log, row, secs, calc, holds, verdict, median, regfs_mount …

wan_rtt=${BENCH_WAN_RTT:-40ms}
wan_conn=${BENCH_WAN_CONN:-25MB}
wan_total=${BENCH_WAN_TOTAL:-200MB}
read -r -a wan_flags <<<"${BENCH_WAN_FLAGS:-}" # extra regfs mount flags, e.g. --block-size 256KiB
wan_pids=()

# rtt_ms: the round trip in milliseconds (from BENCH_WAN_RTT, e.g. 40ms or 0.04s).
rtt_ms() {
    case $wan_rtt in
    *ms) echo "${wan_rtt%ms}" ;;
    *s) calc "${wan_rtt%s} * 1000" 0 ;;
    *) echo "$wan_rtt" ;;
    esac
}

# start_wan UPSTREAM NAME: a shaper in front of UPSTREAM (host:port); its host:port in
# $wan_addr. Not to be run in a subshell: its pid must reach stop_wan.
start_wan() {
    local out=$tmp/wan-$2.out
    "$wan_proxy" --upstream "$1" --rtt "$wan_rtt" --per-connection "$wan_conn" --total "$wan_total" \
        >"$out" 2>>"$tmp/wan.log" &
    wan_pids+=($!)
    wait_until 10 grep -q 'listening on' "$out" || { echo "wan_proxy did not start" >&2; exit 1; }
    wan_addr=$(sed -n 's/^listening on //p' "$out")
}

# shaper_counts: "CONNECTIONS REQUESTS" the registry's shaper has counted so far (it
# prints them as they change, every 5 ms): each connection is a handshake's round trip,
# each request one more (examples/wan_proxy.rs).
shaper_counts() {
    sleep 0.05
    awk '/^connections / { c = $2; r = $4 } END { print c + 0, r + 0 }' "$tmp/wan-registry.out"
}

stop_wan() {
    local pid
    for pid in "${wan_pids[@]}"; do stop_pid "$pid"; done
    wan_pids=()
}

wan_rows() {
    log "building examples/wan_proxy"
    cargo build --release -q --example wan_proxy >&2
    wan_proxy=$root/target/release/examples/wan_proxy
    local direct=$registry wan_registry wan_nginx
    start_wan "$direct" registry
    wan_registry=$wan_addr
    if [[ -n ${nginx_pid:-} ]]; then
        start_wan "127.0.0.1:$nginx_port" nginx
        wan_nginx=$wan_addr
    fi
    local shape="RTT $wan_rtt, $wan_conn/s per connection, $wan_total/s in all"
    log "WAN: $shape; registry at $wan_registry${wan_nginx:+, nginx at $wan_nginx}"
    # Every mount, curl and pipeline below talks to the shaper.
    registry=$wan_registry
    local url=http://$wan_registry/v2/$blob_path
    local i t c_curl=() c_regfs=() c_base=() u_base=() c_rclone=() ttfb=() curl_ttfb=() cold50=() out c50 c99 w50 bad
    local c0 r0 c1 r1 hs=() rq=() curl_hs=() curl_rq=() ranges=() json
    for ((i = 1; i <= runs; i++)); do
        log "wan run $i/$runs: curl, regfs${base:+ and $base_name} (sequential), rclone, first 4 KiB, random reads"
        c_curl+=("$(curl -fsS -o /dev/null -w '%{time_total}' --max-time "$read_timeout" "$url")")
        read -r c0 r0 < <(shaper_counts)
        curl_ttfb+=("$(curl -fsS -o /dev/null -r 0-4095 -w '%{time_starttransfer}' --max-time 30 "$url")")
        read -r c1 r1 < <(shaper_counts)
        curl_hs+=("$((c1 - c0))") curl_rq+=("$((r1 - r0))")
        regfs_mount "${wan_flags[@]}"
        read -r c0 r0 < <(shaper_counts)
        t=$(timeout -k 5 60 python3 "$py" first "$mnt/$blob_path") || t=error
        read -r c1 r1 < <(shaper_counts)
        ttfb+=("$t") hs+=("$((c1 - c0))") rq+=("$((r1 - r0))")
        regfs_umount
        ((i % 2 == 1)) || seq_base
        regfs_mount "${wan_flags[@]}"
        t=$(read_seq "$mnt/$blob_path") || t=error
        c_regfs+=("$t")
        ((i > 1)) || verify_blob "$mnt/$blob_path" "regfs sequential read over the WAN"
        regfs_umount
        ((i % 2 == 0)) || seq_base
        regfs_mount "${wan_flags[@]}"
        if out=$(timeout -k 5 "$read_timeout" python3 "$py" random "$mnt/$blob_path" "$blob_data" "$i" 50 "$size" "$block"); then
            read -r c50 c99 w50 bad <<<"$out"
            cold50+=("$c50")
            ((bad == 0)) || problems+=("WAN random reads, run $i: $bad preads returned wrong bytes")
        else
            cold50+=(error)
        fi
        json=$(timeout -k 2 10 cat "$(stats_file)" 2>/dev/null) || json='{}'
        ranges+=("$(jq -r '.requests.blob_range // "error"' <<<"$json")")
        regfs_umount
        if [[ -n ${wan_nginx:-} && -z ${peer_na[rclone]:-} ]]; then
            RCLONE_CONFIG=$tmp/rclone.conf rclone mount :http: "$rclone_mnt" \
                --http-url "http://$wan_nginx/" --read-only 2>>"$tmp/rclone.log" &
            rclone_pid=$!
            wait_until 30 peer_ready "$rclone_mnt/blob.bin" "$rclone_pid" || true
            t=$(read_seq "$rclone_mnt/blob.bin") || t=error
            c_rclone+=("$t")
            unmount "$rclone_mnt" "$rclone_pid"
            rclone_pid=
        fi
    done
    log "wan samples (s): curl ${c_curl[*]} | regfs ${c_regfs[*]} | ${base_name:-base} ${c_base[*]:-} | rclone ${c_rclone[*]:-} | first 4 KiB regfs ${ttfb[*]} (handshakes ${hs[*]}, requests ${rq[*]}) curl ${curl_ttfb[*]} (handshakes ${curl_hs[*]}, requests ${curl_rq[*]}) | random p50 (µs) ${cold50[*]}, range requests per mount ${ranges[*]}"

    local label="WAN ($shape): cold sequential read, ${size_mib} MiB" curl_s regfs_s cell
    curl_s=$(median "${c_curl[@]}")
    if all_numeric "${c_regfs[@]}"; then
        regfs_s=$(median "${c_regfs[@]}")
        cell="$(secs "$regfs_s") ($(mibps "$regfs_s") MiB/s)"
        row "$label vs curl" "$cell" "curl: $(secs "$curl_s") ($(mibps "$curl_s") MiB/s)" \
            "$(calc "$curl_s / $regfs_s") × curl speed" "≥ 3 × curl" "$(verdict "$curl_s / $regfs_s >= 3")"
        if all_numeric "${c_rclone[@]}" && ((${#c_rclone[@]} > 0)); then
            local rclone_s
            rclone_s=$(median "${c_rclone[@]}")
            row "$label vs rclone mount over nginx" "$cell" "rclone: $(secs "$rclone_s") ($(mibps "$rclone_s") MiB/s)" \
                "$(calc "$rclone_s / $regfs_s") × rclone speed" "≥ 3 × rclone" "$(verdict "$rclone_s / $regfs_s >= 3")"
        else
            row "$label vs rclone mount over nginx" "$cell" "n/a (${peer_na[rclone]:-rclone read failed})" "—" "≥ 3 × rclone" "n/a"
        fi
    else
        row "$label vs curl" "error (see log)" "curl: $(secs "$curl_s")" "—" "≥ 3 × curl" "**missed**"
    fi
    if [[ -n $base ]] && all_numeric "${c_base[@]}" "${c_regfs[@]}"; then
        local base_s
        base_s=$(median "${c_base[@]}")
        row "$label: the speed over curl's, against $base_name's" "$(calc "$curl_s / $(median "${c_regfs[@]}")") × curl" \
            "$base_name: $(calc "$curl_s / $base_s") × curl" "—" "≥ $base_name's" \
            "$(verdict "$base_s >= $(median "${c_regfs[@]}")")"
    fi
    base_row "$label"

    local rtt target c_ttfb trips curl_trips reads
    rtt=$(rtt_ms)
    c_ttfb=$(median "${curl_ttfb[@]}")
    curl_trips="$(median "${curl_hs[@]}" | cut -d. -f1) handshake + $(median "${curl_rq[@]}" | cut -d. -f1) request"
    if all_numeric "${ttfb[@]}"; then
        t=$(median "${ttfb[@]}")
        trips="$(median "${hs[@]}" | cut -d. -f1) handshakes + $(median "${rq[@]}" | cut -d. -f1) requests"
        target="$(calc "$c_ttfb * 1000 + $rtt + 5" 0) ms"
        row "WAN: first 4 KiB of a blob, fresh mount (open + read; round trips counted by the shaper)" \
            "$(calc "$t * 1000" 0) ms, $trips" \
            "curl -r 0-4095, new connection: $(calc "$c_ttfb * 1000" 0) ms, $curl_trips" "$(calc "$t / $c_ttfb") × curl" \
            "≤ curl + 1 RTT + 5 ms ($target)" "$(verdict "$t * 1000 <= $c_ttfb * 1000 + $rtt + 5")"
    else
        row "WAN: first 4 KiB of a blob, fresh mount" "error (see log)" "—" "—" "≤ curl + 1 RTT + 5 ms" "**missed**"
    fi
    reads=$(pyh offsets 1 50 "$size" "$block" | grep -c .)
    if all_numeric "${cold50[@]}" "${ranges[@]}"; then
        c50=$(median "${cold50[@]}")
        row "WAN: random 4 KiB reads, cold ($reads per fresh mount, one per block): p50; range requests per read" \
            "$(calc "$c50 / 1000" 1) ms; $(calc "$(median "${ranges[@]}") / $reads" 2)" "RTT: $rtt ms" \
            "$(calc "$c50 / 1000 / $rtt") × RTT" "≤ 1.5 × RTT + 5 ms; 1 request each" \
            "$(verdict "$c50 / 1000 <= 1.5 * $rtt + 5 && $(median "${ranges[@]}") <= $reads")"
    else
        row "WAN: random 4 KiB reads, cold: p50" "error (see log)" "RTT: $rtt ms" "—" "≤ 1.5 × RTT + 5 ms" "**missed**"
    fi

    if [[ -n ${pushed_manifests:-} ]]; then
        local c_pipe=() c_grep=() t0 pipe_us grep_us n
        for ((i = 1; i <= runs; i++)); do
            log "wan grep run $i/$runs"
            t0=$(now_us)
            n=$(grep_pipeline | grep -c .) || n=0
            c_pipe+=("$(($(now_us) - t0))")
            regfs_mount "${wan_flags[@]}"
            t0=$(now_us)
            # shellcheck disable=SC2016 # $1 is expanded by the inner bash
            if n=$(timeout -k 5 "$read_timeout" bash -c 'grep -rl arm64 "$1"/bench/r*/tags | wc -l' _ "$mnt"); then
                c_grep+=("$(($(now_us) - t0))")
                ((n == repos * tags / 2)) || problems+=("WAN grep run $i: regfs found $n manifests with arm64")
            else
                c_grep+=(error)
            fi
            regfs_umount
        done
        log "wan grep samples (µs): pipeline ${c_pipe[*]} | regfs ${c_grep[*]}"
        pipe_us=$(median "${c_pipe[@]}")
        if all_numeric "${c_grep[@]}"; then
            grep_us=$(median "${c_grep[@]}")
            row "WAN: \`grep -rl\` over $((repos * tags)) manifests, fresh mount" "$(secs "$grep_us / 1000000")" \
                "xargs -P 8 curl pipeline: $(secs "$pipe_us / 1000000")" "$(calc "$grep_us / $pipe_us") × pipeline" \
                "≤ 0.25 × pipeline" "$(verdict "$grep_us / $pipe_us <= 0.25")"
        else
            row "WAN: \`grep -rl\` over $((repos * tags)) manifests" "error (see log)" "pipeline: $(secs "$pipe_us / 1000000")" "—" "≤ 0.25 × pipeline" "**missed**"
        fi
    fi
    registry=$direct
    stop_wan
}
