#!/usr/bin/env bash
# regfs benchmark: prints one markdown table of medians, regfs against its peers.
#
#   scripts/bench.sh                          full run (1 GiB blob, 3 runs per row)
#   BENCH_SIZE_MIB=128 scripts/bench.sh       quick run while developing
#   BENCH_ONLY=seq,random,grep,rss,upload,disk,image,soci,wan,runtime   rows to run (default:
#                                             all; random includes the bytes-per-cold-read row;
#                                             runtime runs containerd: root only)
#   BENCH_IMAGE_MIB=512                       size of the image of the image rows
#   BENCH_RUNS=5                              runs per row (default 3; medians are reported)
#   REGFS=/path/to/regfs                      binary to measure (default: cargo build --release here)
#   BENCH_BASE=/path/to/regfs                 another build (e.g. the base commit's) measured too,
#                                             in alternated pairs with REGFS, in the seq and WAN
#                                             sequential rows (BENCH_BASE_NAME names it in the table)
#   BENCH_KEEP=1                              keep the temp dir (logs of regfs, registry, peers)
#
# It starts its own docker-registry (loopback, temp storage) holding a random blob of
# BENCH_SIZE_MIB and 400 small manifests (bench/r00..r39, 10 tags each). The peers are
# curl on the same registry (the physical limit), and rclone mount / httpfs2 over an
# nginx that serves the registry's own copy of the blob. Missing peers are installed with
# apt-get; one that cannot be installed or mounted is reported as n/a. The upload row
# writes a BENCH_SIZE_MIB file with cp into a fresh mount's uploads/, against curl's
# monolithic upload of the same file (POST, then one PUT ?digest= with the whole body).
# Every regfs mount gets a fresh, empty disk cache (--cache-dir in the temp dir), so the
# other rows stay cold; the disk rows reuse one on purpose, against a local file and
# `rclone mount --vfs-cache-mode full` (page caches dropped with posix_fadvise, only for
# the files measured).
#
# The report goes to stdout, progress to stderr. Everything started here (registry, nginx,
# mounts, daemons, temp files) is torn down on any exit, and every wait has a timeout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
# shellcheck source=scripts/lib/registry.sh
source scripts/lib/registry.sh
# shellcheck source=scripts/lib/bench_image.sh
source scripts/lib/bench_image.sh
# shellcheck source=scripts/lib/bench_soci.sh
source scripts/lib/bench_soci.sh
# shellcheck source=scripts/lib/bench_wan.sh
source scripts/lib/bench_wan.sh
# shellcheck source=scripts/lib/bench_runtime.sh
source scripts/lib/bench_runtime.sh

runs=${BENCH_RUNS:-3}
size_mib=${BENCH_SIZE_MIB:-1024}
only=${BENCH_ONLY:-seq,random,grep,rss,upload,disk,image,soci,wan,runtime}
read_timeout=${BENCH_TIMEOUT:-600} # seconds for any single read/grep/pipeline
size=$((size_mib * 1024 * 1024))
random_reads=200 # 4 KiB preads per cold/warm random pass (at most one per block of the blob)
curl_ranges=50   # curl range requests per run for the latency reference
repos=40 tags=10 # 400 manifests for the grep row

[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_RUNS must be a positive integer" >&2; exit 2; }
[[ $size_mib =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_SIZE_MIB must be a positive integer" >&2; exit 2; }
for row in ${only//,/ }; do
    case $row in seq | random | grep | rss | upload | disk | image | soci | wan | runtime) ;; *) echo "BENCH_ONLY: unknown row '$row'" >&2; exit 2 ;; esac
done
want() { [[ ,$only, == *,$1,* ]]; }

log() { printf '[bench %(%T)T] %s\n' -1 "$*" >&2; }

# ---------------------------------------------------------------------------------------
# Setup: tools, temp dir, cleanup

for tool in docker-registry fusermount3 jq curl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        scripts/setup.sh
        break
    fi
done
command -v python3 >/dev/null || { echo "bench.sh needs python3" >&2; exit 1; }

sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)

# Peers are optional: install what is missing, remember why one is unavailable.
declare -A peer_na=()
bench_setup() {
    local -A pkg_of=([nginx]=nginx [rclone]=rclone [httpfs2]=httpfs2)
    local tool updated=
    for tool in nginx rclone httpfs2; do
        command -v "$tool" >/dev/null 2>&1 && continue
        if [[ -z $updated ]]; then
            log "installing missing peers with apt-get"
            "${sudo[@]}" apt-get update -qq >&2 || true
            updated=1
        fi
        # No recommends: httpfs2 recommends the fuse 2 package, which would remove fuse3.
        if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${pkg_of[$tool]}" >&2; then
            peer_na[$tool]="apt-get install ${pkg_of[$tool]} failed"
        fi
        command -v "$tool" >/dev/null 2>&1 || peer_na[$tool]=${peer_na[$tool]:-"$tool not installed"}
    done
    # Both FUSE peers read through nginx.
    if [[ -n ${peer_na[nginx]:-} ]]; then
        peer_na[rclone]="needs nginx: ${peer_na[nginx]}"
        peer_na[httpfs2]="needs nginx: ${peer_na[nginx]}"
    fi
}

tmp=$(mktemp -d -t regfs-bench.XXXXXX)
mnt=$tmp/mnt rclone_mnt=$tmp/rclone-mnt httpfs_mnt=$tmp/httpfs-mnt
mkdir -p "$mnt" "$rclone_mnt" "$httpfs_mnt"
blob_digest='' pushed_manifests='' registry_pid='' nginx_pid='' regfs_pid='' rclone_pid='' httpfs_pid=''

# Whether a FUSE filesystem is mounted on $1 (also true for a dead one: ENOTCONN).
is_mounted() {
    awk -v m="${1// /\\040}" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# wait_until SECONDS COMMAND...: poll every 0.1 s; false if COMMAND never succeeded.
wait_until() {
    local deadline=$((${EPOCHREALTIME//[!0-9]/} + $1 * 1000000))
    shift
    until "$@"; do
        ((${EPOCHREALTIME//[!0-9]/} < deadline)) || return 1
        sleep 0.1
    done
}

alive() { kill -0 "$1" 2>/dev/null; }
gone() { ! kill -0 "$1" 2>/dev/null; }

# stop_pid PID: TERM, up to 5 s to exit, then KILL; always reaps it.
stop_pid() {
    [[ -n $1 ]] || return 0
    if alive "$1"; then
        kill "$1" 2>/dev/null || true
        wait_until 5 gone "$1" || kill -9 "$1" 2>/dev/null || true
    fi
    wait "$1" 2>/dev/null || true
}

# unmount MOUNTPOINT PID: unmount, let the daemon exit by itself (10 s), then insist.
unmount() {
    if is_mounted "$1"; then
        fusermount3 -u "$1" 2>/dev/null || fusermount3 -u -z "$1" 2>/dev/null || umount -l "$1" 2>/dev/null || true
    fi
    if [[ -n $2 ]]; then
        wait_until 10 gone "$2" || log "pid $2 still running 10 s after unmounting $1; killing it"
        stop_pid "$2"
    fi
}

cleanup() {
    trap - EXIT INT TERM
    set +e
    unmount "$mnt" "$regfs_pid"
    unmount "$rclone_mnt" "$rclone_pid"
    unmount "$httpfs_mnt" "$httpfs_pid"
    stop_wan
    stop_runtime
    stop_pid "$nginx_pid"
    stop_pid "$registry_pid"
    # Never recurse into a mount that refused to go away.
    if [[ -n ${BENCH_KEEP:-} ]]; then
        log "kept $tmp"
    elif grep -qF " $tmp/" /proc/self/mountinfo; then
        log "something is still mounted under $tmp; leaving it in place"
    else
        rm -rf --one-file-system "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
# Python helper: precise timing (perf_counter_ns), preads, percentiles.

py=$tmp/bench.py
cat >"$py" <<'EOF'
import json, os, random, re, socket, subprocess, sys, time

def pct(xs, p):  # nearest-rank percentile
    xs = sorted(xs)
    return xs[max(0, -(-len(xs) * p // 100) - 1)]

def offsets(seed, count, size, block):
    """Random 4 KiB-aligned offsets, each in a different BLOCK-sized region, so that every
    cold read is a cache miss (a small blob gets fewer than COUNT of them)."""
    rng, size, block = random.Random(int(seed)), int(size), int(block)
    blocks = rng.sample(range(size // block), min(int(count), size // block))
    return [b * block + rng.randrange(block // 4096) * 4096 for b in blocks]

def cmd_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()

def cmd_offsets(seed, count, size, block):
    print("\n".join(map(str, offsets(seed, count, size, block))))

def cmd_seq(path, expect):
    """Seconds to open and read PATH to the end in 1 MiB reads (like dd bs=1M)."""
    buf = bytearray(1 << 20)
    t0 = time.perf_counter_ns()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
    dt = (time.perf_counter_ns() - t0) / 1e9
    if n != int(expect):
        sys.exit(f"short read of {path}: {n} of {expect} bytes")
    print(f"{dt:.6f}")

def cmd_first(path):
    """Seconds to open PATH and read its first 4 KiB (the time to the first byte)."""
    t0 = time.perf_counter_ns()
    fd = os.open(path, os.O_RDONLY)
    if len(os.pread(fd, 4096, 0)) == 0:
        sys.exit(f"nothing read from {path}")
    os.close(fd)
    print(f"{(time.perf_counter_ns() - t0) / 1e9:.6f}")

def cmd_random(path, ref, seed, count, size, block):
    """Cold then warm pass of 4 KiB preads at the same offsets; latencies in microseconds.
    The bytes are checked against REF (the registry's own file) after the timing."""
    offs = offsets(seed, count, size, block)
    fd = os.open(path, os.O_RDONLY)
    passes, got = [], []
    for _ in range(2):
        lat = []
        for off in offs:
            t0 = time.perf_counter_ns()
            b = os.pread(fd, 4096, off)
            lat.append((time.perf_counter_ns() - t0) / 1e3)
            got.append(b)
        passes.append(lat)
    os.close(fd)
    rfd = os.open(ref, os.O_RDONLY)
    bad = sum(os.pread(rfd, 4096, off) != b for off, b in zip(offs * 2, got))
    os.close(rfd)
    cold, warm = passes
    print(f"{pct(cold, 50):.1f} {pct(cold, 99):.1f} {pct(warm, 50):.1f} {bad}")

def cmd_drop(*paths):
    """Drops the page cache of each file (posix_fadvise DONTNEED): the next read is from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)  # dirty pages would stay
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

def cmd_cpu(pid):
    """CPU seconds (user + system) the process has used so far, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    print(f"{ticks / os.sysconf('SC_CLK_TCK'):.2f}")

def rchar(pid):
    with open(f"/proc/{pid}/io") as f:
        return int(next(l for l in f if l.startswith("rchar:")).split()[1])

def fetched(stats):
    try:
        with open(stats) as f:
            s = json.load(f)
        return s["fetched_bytes"], s["cache"]["block_size"]
    except (OSError, ValueError, KeyError):
        return None, None

def sock_bytes(pid, port):
    """bytes_received summed over PID's TCP connections to PORT (HTTP headers included)."""
    out = subprocess.run(["ss", "-tinpH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    total, mine = 0, False
    for line in out.splitlines():
        if not line[:1].isspace():  # socket line; its details follow, indented
            mine = f"pid={pid}," in line
        elif mine:
            m = re.search(r"\bbytes_received:(\d+)", line)
            total += int(m.group(1)) if m else 0
    return total

def cmd_onebyte(path, stats, pid, port, offset):
    """What the daemon fetched for one cold 4 KiB read: stats fetched_bytes delta, socket
    bytes_received delta, rchar delta, block size. Counters are read after a short pause,
    so that a prefetch started by the read is counted too."""
    fd = os.open(path, os.O_RDONLY)  # lookup and open happen before the counters are read
    time.sleep(0.2)
    f0, s0, r0 = fetched(stats)[0], sock_bytes(pid, port), rchar(pid)
    if len(os.pread(fd, 4096, int(offset))) != 4096:
        sys.exit("short 4 KiB read")
    time.sleep(0.5)
    f1, s1, r1 = fetched(stats)[0], sock_bytes(pid, port), rchar(pid)
    block = fetched(stats)[1]
    os.close(fd)
    delta = "n/a" if f0 is None or f1 is None else f1 - f0
    print(delta, s1 - s0, r1 - r0, block if block is not None else "n/a")

getattr(sys.modules[__name__], "cmd_" + sys.argv[1])(*sys.argv[2:])
EOF
pyh() { python3 "$py" "$@"; }

# Arithmetic and formatting (awk: always there, floats).
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }
holds() { awk "BEGIN { exit !($1) }"; }
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { printf "%.6f", (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
numeric() { [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]]; }
all_numeric() {
    local v
    for v in "$@"; do numeric "$v" || return 1; done
    (($# > 0))
}
secs() { if holds "$1 < 10"; then echo "$(calc "$1" 3) s"; else echo "$(calc "$1" 2) s"; fi; }
mibps() { calc "$size / 1048576 / $1" 0; } # seconds → MiB/s for the test blob
human_bytes() {
    set -- "${1%.*}"
    if (($1 >= 1048576)); then echo "$(calc "$1 / 1048576" 2) MiB"; elif (($1 >= 1024)); then echo "$(calc "$1 / 1024" 1) KiB"; else echo "$1 B"; fi
}

# now_us: a clock in microseconds.
now_us() { echo "${EPOCHREALTIME//[!0-9]/}"; }

# elapsed_s CMD...: runs CMD (its stdout discarded), prints the seconds it took; fails with it.
elapsed_s() {
    local t0
    t0=$(now_us)
    timeout -k 5 "$read_timeout" "$@" >/dev/null || return 1
    calc "($(now_us) - $t0) / 1000000" 6
}

rows=() notes=() problems=()
# row LABEL REGFS PEER RATIO TARGET STATUS
row() { rows+=("| $1 | $2 | $3 | $4 | $5 | $6 |"); }
verdict() { if holds "$1"; then echo met; else echo "**missed**"; fi; }

# ---------------------------------------------------------------------------------------
# regfs binary and its features

if [[ -z ${REGFS:-} ]]; then
    log "building regfs (cargo build --release)"
    cargo build --release >&2
    REGFS=$root/target/release/regfs
fi
[[ -x $REGFS ]] || { echo "REGFS=$REGFS is not an executable" >&2; exit 1; }
base=${BENCH_BASE:-}
[[ -z $base || -x $base ]] || { echo "BENCH_BASE=$base is not an executable" >&2; exit 1; }
base_name=${BENCH_BASE_NAME:-${base:+$(basename "$base")}}
regfs_bin=$REGFS # what regfs_mount runs
regfs_commit=$(git -C "$(dirname "$REGFS")" describe --always --dirty 2>/dev/null || echo unknown)
mount_help=$("$REGFS" mount --help 2>&1 || true)
has_cache_size='' has_block_size='' has_stats='' has_disk_cache=''
grep -q -- --cache-size <<<"$mount_help" && has_cache_size=1
grep -q -- --cache-dir <<<"$mount_help" && has_disk_cache=1
grep -q -- --block-size <<<"$mount_help" && has_block_size=1

# regfs_mount [FLAGS...]: a fresh regfs on $mnt (empty caches unless FLAGS name a
# --cache-dir or --no-disk-cache), foreground as a background job.
mounts=0
regfs_mount() {
    local disk=()
    mounts=$((mounts + 1))
    if [[ -n $has_disk_cache && " $* " != *" --cache-dir "* && " $* " != *" --no-disk-cache "* ]]; then
        rm -rf "$tmp/disk-cache-cold"
        disk=(--cache-dir "$tmp/disk-cache-cold")
    fi
    "$regfs_bin" mount "${disk[@]}" "$@" "http://$registry" "$mnt" 2>>"$tmp/regfs.log" &
    regfs_pid=$!
    if ! wait_until 20 regfs_ready; then
        log "regfs did not mount within 20 s; its log:"
        tail -20 "$tmp/regfs.log" >&2
        exit 1
    fi
    if timeout -k 2 10 test -f "$(stats_file)"; then has_stats=1; fi
}
regfs_ready() {
    is_mounted "$mnt" && return 0
    alive "$regfs_pid" || { log "regfs exited before mounting:"; tail -20 "$tmp/regfs.log" >&2; exit 1; }
    return 1
}
regfs_umount() {
    check_stats
    unmount "$mnt" "$regfs_pid"
    regfs_pid=
}
stats_file() { echo "$mnt/.regfs/stats"; }

# block: the mount's block size from its stats file (1 MiB when there is none), by a short mount.
block=1048576
detect_block_size() {
    local json b=''
    regfs_mount
    json=$(timeout -k 2 10 cat "$(stats_file)" 2>/dev/null) && b=$(jq -r '.cache.block_size // empty' <<<"$json")
    regfs_umount
    if [[ $b =~ ^[0-9]+$ ]] && ((b >= 4096)); then block=$b; fi
}

# Before each unmount: what the daemon itself says went wrong (retries, digest mismatches).
stats_retries=0
check_stats() {
    local json retries failures
    json=$(timeout -k 2 10 cat "$(stats_file)" 2>/dev/null) || return 0
    read -r retries failures < <(jq -r '"\(.retries // 0) \(.verify_failures // 0)"' <<<"$json") || return 0
    stats_retries=$((stats_retries + retries))
    ((failures == 0)) || problems+=("regfs stats report verify_failures=$failures (a blob did not match its digest)")
}

# ---------------------------------------------------------------------------------------
# Registry with the test data

start_registry() {
    registry_start "$tmp" || exit 1
    log "registry at http://$registry"
}

# push_blob REPO FILE [DIGEST]: monolithic upload (POST, then PUT with the whole body);
# prints the digest (computed unless given).
push_blob() {
    local digest=${3:-} loc
    [[ -n $digest ]] || digest=sha256:$(sha256sum "$2" | cut -d' ' -f1)
    loc=$(curl -fsS --max-time 30 -X POST -D - -o /dev/null "http://$registry/v2/$1/blobs/uploads/" |
        tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
    [[ $loc == /* ]] && loc=http://$registry$loc
    [[ $loc == *\?* ]] && loc+="&" || loc+="?"
    curl -fsS --max-time "$read_timeout" -X PUT -H 'Content-Type: application/octet-stream' -H 'Expect:' \
        -T "$2" -o /dev/null "${loc}digest=$digest"
    echo "$digest"
}

# push_manifest REPO TAG FILE
push_manifest() {
    curl -fsS --max-time 30 -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
        --data-binary "@$3" -o /dev/null "http://$registry/v2/$1/manifests/$2"
}

# descriptor MEDIATYPE DIGEST FILE
descriptor() { printf '{"mediaType":"%s","digest":"%s","size":%d}' "$1" "$2" "$(stat -c %s "$3")"; }

# manifest CONFIG_DESC LAYERS_JSON ANNOTATIONS_JSON
manifest() {
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":%s,"layers":[%s],"annotations":%s}' "$1" "$2" "$3"
}

config_type=application/vnd.oci.image.config.v1+json
layer_type=application/vnd.oci.image.layer.v1.tar+gzip

# big/blob:latest: one config and the random blob as its layer.
push_big_blob() {
    local gen=$tmp/gen cfg_digest
    log "pushing a ${size_mib} MiB random blob as big/blob"
    head -c "$size" /dev/urandom >"$gen/big"
    blob_digest=$(push_blob big/blob "$gen/big")
    printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' >"$gen/big.cfg"
    cfg_digest=$(push_blob big/blob "$gen/big.cfg")
    manifest "$(descriptor "$config_type" "$cfg_digest" "$gen/big.cfg")" \
        "$(descriptor "$layer_type" "$blob_digest" "$gen/big")" '{}' >"$gen/big.json"
    push_manifest big/blob latest "$gen/big.json"
    rm -f "$gen/big" # the registry has its own copy, which nginx serves below
    local hex=${blob_digest#sha256:}
    blob_data=$tmp/storage/docker/registry/v2/blobs/sha256/${hex:0:2}/$hex/data
    [[ $(stat -c %s "$blob_data") -eq $size ]] || { echo "blob data file not where expected: $blob_data" >&2; exit 1; }
    blob_path=big/blob/blobs/$blob_digest
    blob_url=http://$registry/v2/$blob_path
}

# bench/r00..r39, tags v0..v9: small OCI manifests, half of them saying arm64.
push_manifests() {
    local gen=$tmp/gen r t repo cfg_digest cfg_desc layer_desc layers arch
    log "pushing $((repos * tags)) manifests (bench/r00..r$((repos - 1)), $tags tags each)"
    for ((r = 0; r < repos; r++)); do
        repo=$(printf 'bench/r%02d' "$r")
        # The registry checks that a manifest's blobs exist in the repository: upload them first.
        printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{"Labels":{"repo":"%s"}}}' "$repo" >"$gen/cfg"
        cfg_digest=$(push_blob "$repo" "$gen/cfg")
        cfg_desc=$(descriptor "$config_type" "$cfg_digest" "$gen/cfg")
        head -c 64 /dev/urandom >"$gen/layer"
        layer_desc=$(descriptor "$layer_type" "$(push_blob "$repo" "$gen/layer")" "$gen/layer")
        for ((t = 0; t < tags; t++)); do
            # Even tags say arm64 (half of all manifests), odd tags carry one tiny layer.
            if ((t % 2)); then arch=amd64 layers=$layer_desc; else arch=arm64 layers=; fi
            manifest "$cfg_desc" "$layers" \
                "{\"org.opencontainers.image.ref.name\":\"v$t\",\"bench.platform\":\"linux/$arch\"}" >"$gen/m.json"
            push_manifest "$repo" "v$t" "$gen/m.json"
        done
    done
    pushed_manifests=$((repos * tags))
}

# ---------------------------------------------------------------------------------------
# Peers: nginx serving the blob, rclone and httpfs2 mounting it

start_nginx() {
    [[ -z ${peer_na[nginx]:-} ]] || return 0
    nginx_port=$(pyh port)
    mkdir -p "$tmp/www" "$tmp/nginx"
    ln -s "$blob_data" "$tmp/www/blob.bin"
    cat >"$tmp/nginx.conf" <<EOF
daemon off;
user root;
worker_processes 1;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log;
events { worker_connections 256; }
http {
    access_log off;
    sendfile on;
    client_body_temp_path $tmp/nginx/body;
    proxy_temp_path $tmp/nginx/proxy;
    fastcgi_temp_path $tmp/nginx/fastcgi;
    uwsgi_temp_path $tmp/nginx/uwsgi;
    scgi_temp_path $tmp/nginx/scgi;
    types { application/octet-stream bin; }
    server {
        listen 127.0.0.1:$nginx_port;
        root $tmp/www;
        autoindex on;   # rclone's http backend lists the directory
        # httpfs2 insists on Accept-Ranges in 206 answers too; nginx sends it only with 200.
        add_header Accept-Ranges bytes;
    }
}
EOF
    nginx -e "$tmp/nginx/error.log" -p "$tmp/nginx" -c "$tmp/nginx.conf" 2>>"$tmp/nginx/stderr.log" &
    nginx_pid=$!
    if ! wait_until 10 curl -fs --max-time 5 -o /dev/null -r 0-0 "http://127.0.0.1:$nginx_port/blob.bin"; then
        peer_na[nginx]="nginx did not start ($(tail -1 "$tmp/nginx/error.log" 2>/dev/null))"
        peer_na[rclone]="needs nginx: ${peer_na[nginx]}"
        peer_na[httpfs2]="needs nginx: ${peer_na[nginx]}"
        stop_pid "$nginx_pid"
        nginx_pid=
        return 0
    fi
    log "nginx at http://127.0.0.1:$nginx_port/blob.bin"
}

# peer_ready FILE PID: the file is there, or the daemon has given up
peer_ready() { timeout -k 2 5 test -f "$1" || ! alive "$2"; }

# peer_mount NAME MOUNTPOINT: start rclone or httpfs2 (pid in ${NAME}_pid); false if it failed.
# The file a peer mount shows the blob as.
peer_file() { if [[ $1 == httpfs2-registry ]]; then echo "$blob_digest"; else echo blob.bin; fi; }

peer_mount() {
    local pid
    case $1 in
    httpfs2-registry)
        httpfs2 -f "$blob_url" "$2" >>"$tmp/httpfs2.log" 2>&1 &
        pid=$!
        httpfs_pid=$pid
        ;;
    rclone)
        RCLONE_CONFIG=$tmp/rclone.conf rclone mount :http: "$2" \
            --http-url "http://127.0.0.1:$nginx_port/" --read-only 2>>"$tmp/rclone.log" &
        pid=$!
        rclone_pid=$pid
        ;;
    httpfs2)
        httpfs2 -f "http://127.0.0.1:$nginx_port/blob.bin" "$2" >>"$tmp/httpfs2.log" 2>&1 &
        pid=$!
        httpfs_pid=$pid
        ;;
    esac
    wait_until 20 peer_ready "$2/$(peer_file "$1")" "$pid" || true
    if ! timeout -k 2 5 test -f "$2/$(peer_file "$1")"; then
        peer_na[$1]="mount failed: $(tail -1 "$tmp/$1.log" 2>/dev/null || echo 'no blob.bin after 20 s')"
        unmount "$2" "$pid"
        return 1
    fi
}

# ---------------------------------------------------------------------------------------
# Measurements (each prints one number, or fails)

# seconds to read the whole blob at PATH (open included)
read_seq() { timeout -k 5 "$read_timeout" python3 "$py" seq "$1" "$size"; }

# seconds for curl to download the blob from the registry
curl_seq() { curl -fsS -o /dev/null -w '%{time_total}' --max-time "$read_timeout" "$blob_url"; }

# cmp the mounted blob with the registry's file (after the timing; from the page cache)
verify_blob() {
    if ! timeout -k 5 "$read_timeout" cmp "$1" "$blob_data" >&2; then
        problems+=("$2: \`cmp $1 <registry blob>\` failed: wrong or missing bytes")
    fi
}

# ---------------------------------------------------------------------------------------
# Rows

# cpu_of PID: its CPU seconds so far ("error" if it is gone).
cpu_of() { pyh cpu "$1" 2>/dev/null || echo error; }
# per_gib BEFORE AFTER: CPU seconds per GiB of the test blob.
per_gib() { if all_numeric "$1" "$2"; then calc "($2 - $1) * 1073741824 / $size" 3; else echo error; fi; }

# seq_base: one cold sequential read by BENCH_BASE on a fresh mount, into c_base (its
# daemon's CPU seconds per GiB into u_base).
seq_base() {
    [[ -n $base ]] || return 0
    local t c0
    regfs_bin=$base regfs_mount
    c0=$(cpu_of "$regfs_pid")
    t=$(read_seq "$mnt/$blob_path") || t=error
    c_base+=("$t")
    u_base+=("$(per_gib "$c0" "$(cpu_of "$regfs_pid")")")
    regfs_umount
}

# base_row LABEL: REGFS against BENCH_BASE from the alternated pairs c_regfs / c_base.
base_row() {
    [[ -n $base ]] || return 0
    if ! all_numeric "${c_regfs[@]}" "${c_base[@]}"; then
        row "$1 vs $base_name" "error (see log)" "—" "—" "not slower" "**missed**"
        return 0
    fi
    local k ratios=() won=0 r b ratio
    for k in "${!c_regfs[@]}"; do
        ratios+=("$(calc "${c_base[$k]} / ${c_regfs[$k]}" 4)")
        holds "${c_regfs[$k]} <= ${c_base[$k]}" && won=$((won + 1))
    done
    r=$(median "${c_regfs[@]}") b=$(median "${c_base[@]}") ratio=$(median "${ratios[@]}")
    row "$1 vs $base_name ($runs alternated pairs)" "$(secs "$r") ($(mibps "$r") MiB/s)" \
        "$base_name: $(secs "$b") ($(mibps "$b") MiB/s)" "$(calc "$ratio" 2) × its speed (median of pairs; faster in $won of ${#c_regfs[@]})" \
        "not slower (≥ 1.0 ×)" "$(verdict "$ratio >= 1.0")"
}

seq_rows() {
    local i t c0 c_curl=() c_base=() u_base=() c_regfs=() c_warm=() c_rclone=() c_httpfs=() c_nodisk=() c_dgst=() c_httpreg=() peer
    local u_regfs=() u_nodisk=() u_rclone=() u_httpfs=() u_httpreg=() u_registry=()
    for ((i = 1; i <= runs; i++)); do
        log "seq run $i/$runs: curl, regfs cold+warm, regfs --no-disk-cache, rclone, httpfs2"
        c_curl+=("$(curl_seq)")
        c_dgst+=("$(elapsed_s sh -c "curl -fsS '$blob_url' | openssl dgst -sha256" || echo error)")
        ((i % 2 == 1)) || seq_base
        regfs_mount
        c0=$(cpu_of "$regfs_pid")
        local r0
        r0=$(cpu_of "$registry_pid")
        t=$(read_seq "$mnt/$blob_path") || t=error
        c_regfs+=("$t")
        u_regfs+=("$(per_gib "$c0" "$(cpu_of "$regfs_pid")")")
        u_registry+=("$(per_gib "$r0" "$(cpu_of "$registry_pid")")")
        t=$(read_seq "$mnt/$blob_path") || t=error
        c_warm+=("$t")
        ((i > 1)) || verify_blob "$mnt/$blob_path" "regfs sequential read"
        regfs_umount
        ((i % 2 == 0)) || seq_base
        regfs_mount --no-disk-cache
        c0=$(cpu_of "$regfs_pid")
        t=$(read_seq "$mnt/$blob_path") || t=error
        c_nodisk+=("$t")
        u_nodisk+=("$(per_gib "$c0" "$(cpu_of "$regfs_pid")")")
        regfs_umount
        for peer in rclone httpfs2 httpfs2-registry; do
            [[ -z ${peer_na[${peer%-registry}]:-} ]] || continue
            local pm=$rclone_mnt ppid
            [[ $peer == rclone ]] || pm=$httpfs_mnt
            peer_mount "$peer" "$pm" || continue
            if [[ $peer == rclone ]]; then ppid=$rclone_pid; else ppid=$httpfs_pid; fi
            c0=$(cpu_of "$ppid")
            t=$(read_seq "$pm/$(peer_file "$peer")") || t=error
            case $peer in
            rclone) c_rclone+=("$t") u_rclone+=("$(per_gib "$c0" "$(cpu_of "$ppid")")") ;;
            httpfs2) c_httpfs+=("$t") u_httpfs+=("$(per_gib "$c0" "$(cpu_of "$ppid")")") ;;
            *) c_httpreg+=("$t") u_httpreg+=("$(per_gib "$c0" "$(cpu_of "$ppid")")") ;;
            esac
            ((i > 1)) || verify_blob "$pm/$(peer_file "$peer")" "$peer"
            if [[ $peer == rclone ]]; then unmount "$pm" "$rclone_pid"; rclone_pid=; else unmount "$pm" "$httpfs_pid"; httpfs_pid=; fi
        done
    done

    log "seq samples (s): curl ${c_curl[*]} | regfs cold ${c_regfs[*]} | ${base_name:-base} ${c_base[*]:-} | warm ${c_warm[*]} | rclone ${c_rclone[*]:-} | httpfs2 ${c_httpfs[*]:-}"
    log "seq CPU samples (s/GiB): regfs ${u_regfs[*]} | ${base_name:-base} ${u_base[*]:-} | --no-disk-cache ${u_nodisk[*]} | registry ${u_registry[*]} | httpfs2 ${u_httpfs[*]:-} | rclone ${u_rclone[*]:-}"
    local label="cold sequential read, ${size_mib} MiB, fresh mount"
    local curl_s regfs_s warm_s regfs_cell
    curl_s=$(median "${c_curl[@]}")
    if all_numeric "${c_regfs[@]}"; then
        regfs_s=$(median "${c_regfs[@]}")
        regfs_cell="$(secs "$regfs_s") ($(mibps "$regfs_s") MiB/s)"
        row "$label vs curl" "$regfs_cell" "curl: $(secs "$curl_s") ($(mibps "$curl_s") MiB/s)" \
            "$(calc "$curl_s / $regfs_s") × curl speed" "≥ 0.9 × curl" "$(verdict "$curl_s / $regfs_s >= 0.9")"
    else
        regfs_cell="error (see log)"
        row "$label vs curl" "$regfs_cell" "curl: $(secs "$curl_s")" "—" "≥ 0.9 × curl" "**missed**"
    fi
    base_row "$label"

    local name samples peer_s
    for name in rclone httpfs2; do
        if [[ $name == rclone ]]; then samples=("${c_rclone[@]}"); else samples=("${c_httpfs[@]}"); fi
        if [[ -n ${peer_na[$name]:-} ]]; then
            row "$label vs $name" "$regfs_cell" "n/a (${peer_na[$name]})" "—" "faster than $name" "n/a"
        elif ! all_numeric "${samples[@]}"; then
            row "$label vs $name" "$regfs_cell" "n/a ($name read failed, see stderr)" "—" "faster than $name" "n/a"
        elif [[ -z ${regfs_s:-} ]]; then
            peer_s=$(median "${samples[@]}")
            row "$label vs $name" "$regfs_cell" "$name: $(secs "$peer_s")" "—" "faster than $name" "**missed**"
        else
            peer_s=$(median "${samples[@]}")
            row "$label vs $name" "$regfs_cell" "$name: $(secs "$peer_s") ($(mibps "$peer_s") MiB/s)" \
                "$(calc "$peer_s / $regfs_s") × $name speed" "faster than $name" "$(verdict "$peer_s / $regfs_s > 1")"
        fi
    done

    if [[ -n ${regfs_s:-} ]] && all_numeric "${c_dgst[@]}"; then
        local d
        d=$(median "${c_dgst[@]}")
        row "$label vs \`curl | openssl dgst -sha256\` (a verified download)" "$regfs_cell" \
            "curl | openssl: $(secs "$d") ($(mibps "$d") MiB/s)" "$(calc "$d / $regfs_s") × faster" \
            "≥ 1.5 × faster" "$(verdict "$d / $regfs_s >= 1.5")"
    fi
    if all_numeric "${c_nodisk[@]}"; then
        local n
        n=$(median "${c_nodisk[@]}")
        row "same, \`--no-disk-cache\`" "$(secs "$n") ($(mibps "$n") MiB/s)" "regfs with the disk cache: ${regfs_cell}" \
            "$(calc "$n / ${regfs_s:-$n}") × the time" "—" "—"
    fi
    if all_numeric "${c_httpreg[@]}"; then
        local h
        h=$(median "${c_httpreg[@]}")
        row "httpfs2 pointed at the registry's blob URL (what a user could point it at)" "$regfs_cell" \
            "httpfs2 on the registry: $(secs "$h") ($(mibps "$h") MiB/s)" "$(calc "$h / ${regfs_s:-$h}") × httpfs2 speed" "report" "—"
    fi
    if all_numeric "${u_regfs[@]}"; then
        local ur un uh=n/a urc=n/a uhr=n/a ureg limit
        ur=$(median "${u_regfs[@]}")
        un=$(median "${u_nodisk[@]}")
        all_numeric "${u_httpfs[@]}" && uh=$(calc "$(median "${u_httpfs[@]}")" 2)
        all_numeric "${u_rclone[@]}" && urc=$(calc "$(median "${u_rclone[@]}")" 2)
        all_numeric "${u_httpreg[@]}" && uhr=$(calc "$(median "${u_httpreg[@]}")" 2)
        ureg=$(median "${u_registry[@]}")
        limit=1.0
        numeric "$uh" && holds "$uh + 0.6 < 1.0" && limit=$(calc "$uh + 0.6" 2)
        row "daemon CPU seconds per GiB, cold sequential (user + sys)" \
            "regfs $(calc "$ur" 2) s ($(calc "$un" 2) s with \`--no-disk-cache\`)" \
            "httpfs2 $uh s, on the registry $uhr s; rclone $urc s; the registry itself $(calc "$ureg" 2) s" \
            "—" "regfs ≤ $limit s (≤ 1.0, ≤ httpfs2 + the hash's 0.6)" "$(verdict "$un <= $limit")"
    fi
    if [[ -n $base ]] && all_numeric "${u_regfs[@]}" "${u_base[@]}"; then
        row "same, against $base_name (with the disk cache; alternated pairs)" "regfs $(calc "$(median "${u_regfs[@]}")" 2) s" \
            "$base_name $(calc "$(median "${u_base[@]}")" 2) s" "—" "not more" \
            "$(verdict "$(median "${u_regfs[@]}") <= $(median "${u_base[@]}")")"
    fi

    if [[ -n ${regfs_s:-} ]] && all_numeric "${c_warm[@]}"; then
        warm_s=$(median "${c_warm[@]}")
        row "warm re-read, same mount" "$(secs "$warm_s") ($(mibps "$warm_s") MiB/s)" "regfs cold: $(secs "$regfs_s")" \
            "$(calc "$regfs_s / $warm_s") × cold speed" "≥ 3 × cold" "$(verdict "$regfs_s / $warm_s >= 3")"
    else
        row "warm re-read, same mount" "error (see log)" "—" "—" "≥ 3 × cold" "**missed**"
    fi
}

random_rows() {
    local i out curl_run=() curl_med=() cold50=() cold99=() warm50=() off lat c50 c99 w50 bad curl_us
    detect_block_size # offsets go one per block, so that every cold read is a miss
    for ((i = 1; i <= runs; i++)); do
        log "random run $i/$runs: $curl_ranges curl range requests, $random_reads cold + warm preads"
        curl_run=()
        while read -r off; do
            lat=$(curl -fsS -o /dev/null -r "$off-$((off + 4095))" -w '%{time_total}' --max-time 30 "$blob_url")
            curl_run+=("$(calc "$lat * 1000000" 1)")
        done < <(pyh offsets "$((1000 + i))" "$curl_ranges" "$size" "$block")
        curl_med+=("$(median "${curl_run[@]}")")

        regfs_mount
        if out=$(timeout -k 5 "$read_timeout" python3 "$py" random "$mnt/$blob_path" "$blob_data" "$i" "$random_reads" "$size" "$block"); then
            read -r c50 c99 w50 bad <<<"$out"
            cold50+=("$c50") cold99+=("$c99") warm50+=("$w50")
            ((bad == 0)) || problems+=("random 4 KiB reads, run $i: $bad of $((2 * random_reads)) preads returned wrong bytes")
        else
            cold50+=(error) cold99+=(error) warm50+=(error)
        fi
        regfs_umount
    done

    log "random samples (µs): curl -r medians ${curl_med[*]} | cold p50 ${cold50[*]} | cold p99 ${cold99[*]} | warm p50 ${warm50[*]}"
    curl_us=$(median "${curl_med[@]}")
    if all_numeric "${cold50[@]}"; then
        c50=$(median "${cold50[@]}") c99=$(median "${cold99[@]}") w50=$(median "${warm50[@]}")
        row "random 4 KiB reads, cold ($(pyh offsets 1 "$random_reads" "$size" "$block" | grep -c .) per fresh mount, one per $(human_bytes "$block") block): p50 / p99" "$(calc "$c50" 0) µs / $(calc "$c99" 0) µs" \
            "curl -r median: $(calc "$curl_us" 0) µs" "p50 $(calc "$c50 / $curl_us") × curl" "p50 ≤ 2 × curl" "$(verdict "$c50 / $curl_us <= 2")"
        row "random 4 KiB reads, warm (same offsets again): p50" "$(calc "$w50" 1) µs" \
            "curl -r median: $(calc "$curl_us" 0) µs" "$(calc "$w50 / $curl_us" 3) × curl" "≤ 100 µs" "$(verdict "$w50 <= 100")"
    else
        row "random 4 KiB reads, cold: p50 / p99" "error (see log)" "curl -r median: $(calc "$curl_us" 0) µs" "—" "p50 ≤ 2 × curl" "**missed**"
        row "random 4 KiB reads, warm: p50" "error (see log)" "—" "—" "≤ 100 µs" "**missed**"
    fi

    bytes_row
}

# One cold 4 KiB read in the middle of the blob: how much did the daemon fetch? Judged by
# the stats file; without one, by the bytes its sockets received. rchar is shown because the
# issue asks for it, but it counts only read() calls (files, /dev/fuse), not socket recv().
bytes_row() {
    local i out f s r b fetched=() socks=() rchars=() block=n/a
    local offset=$(((size / 2 / 4096 + 3) * 4096)) # inside a block, not on its edge
    for ((i = 1; i <= runs; i++)); do
        log "bytes run $i/$runs: one cold 4 KiB read"
        regfs_mount
        if out=$(timeout -k 5 60 python3 "$py" onebyte "$mnt/$blob_path" "$(stats_file)" "$regfs_pid" "${registry##*:}" "$offset"); then
            read -r f s r b <<<"$out"
            fetched+=("$f") socks+=("$s") rchars+=("$r")
            [[ $b == n/a ]] || block=$b
        else
            fetched+=(error) socks+=(error) rchars+=(error)
        fi
        regfs_umount
    done
    log "bytes samples: stats ${fetched[*]} | sockets ${socks[*]} | rchar ${rchars[*]}"
    local label="bytes fetched by one cold 4 KiB read (stats fetched_bytes Δ; socket bytes received Δ; daemon rchar Δ)"
    local stats_cell=n/a sock_cell=n/a rchar_cell=n/a judged='' block_cell
    all_numeric "${rchars[@]}" && rchar_cell=$(human_bytes "$(median "${rchars[@]}")")
    all_numeric "${socks[@]}" && s=$(median "${socks[@]}") && sock_cell=$(human_bytes "$s") && judged=$s
    if all_numeric "${fetched[@]}"; then
        f=$(median "${fetched[@]}")
        stats_cell=$(human_bytes "$f") judged=$f
    else
        stats_cell="n/a (no .regfs/stats)"
        notes+=("bytes row: this regfs has no MNT/.regfs/stats, so it is judged by the bytes its TCP connections to the registry received (ss bytes_received, HTTP headers included) against a 1 MiB block.")
    fi
    numeric "$block" || block=1048576
    block_cell="block: $(human_bytes "$block")"
    [[ $stats_cell != n/a* ]] || block_cell+=" (assumed)"
    if [[ -n $judged ]]; then
        row "$label" "stats $stats_cell; sockets $sock_cell; rchar $rchar_cell" "$block_cell" \
            "$(calc "$judged / $block" 3) blocks" "≤ 2 blocks" "$(verdict "$judged <= 2 * $block")"
    else
        row "$label" "error (see log)" "$block_cell" "—" "≤ 2 blocks" "**missed**"
    fi
}

rss_row() {
    local i hwm=() flags=() label="peak RSS (VmHWM) of the daemon during the cold ${size_mib} MiB read"
    if [[ -n $has_cache_size ]]; then
        flags=(--cache-size 64MiB)
        label+=" with --cache-size 64MiB"
    else
        label+=" (no --cache-size in this build: defaults)"
    fi
    for ((i = 1; i <= runs; i++)); do
        log "rss run $i/$runs"
        regfs_mount "${flags[@]}"
        read_seq "$mnt/$blob_path" >/dev/null || hwm+=(error)
        hwm+=("$(awk '/^VmHWM:/ { print $2 }' "/proc/$regfs_pid/status")") # kB
        regfs_umount
    done
    log "rss samples (kB): ${hwm[*]}"
    if all_numeric "${hwm[@]}"; then
        local kb
        kb=$(median "${hwm[@]}")
        row "$label" "$(calc "$kb / 1024" 1) MiB" "—" "$(calc "$kb / 1024 / 128") × limit" "≤ 128 MiB" "$(verdict "$kb / 1024 <= 128")"
    else
        row "$label" "error (see log)" "—" "—" "≤ 128 MiB" "**missed**"
    fi
}

# blob_exists REPO DIGEST: the registry itself serves the blob (HEAD 200)
blob_exists() { curl -fsS --max-time 30 -I -o /dev/null "http://$registry/v2/$1/blobs/$2"; }

# cp of a random file into a fresh mount's uploads/ (a new repository each run) against
# curl's monolithic upload of the same file to the same registry, alternating. The file
# is in the page cache for both; its digest is computed beforehand (curl needs it for the
# PUT; regfs computes it while uploading, inside its timing).
upload_row() {
    local i t0 file=$tmp/gen/upload digest repo c_curl=() c_regfs=()
    log "writing a ${size_mib} MiB random file to upload"
    head -c "$size" /dev/urandom >"$file"
    digest=sha256:$(sha256sum "$file" | cut -d' ' -f1)
    for ((i = 1; i <= runs; i++)); do
        log "upload run $i/$runs: curl POST + PUT, regfs cp"
        repo=upload/curl$i
        t0=${EPOCHREALTIME//[!0-9]/}
        if push_blob "$repo" "$file" "$digest" >/dev/null && blob_exists "$repo" "$digest"; then
            c_curl+=("$(calc "(${EPOCHREALTIME//[!0-9]/} - $t0) / 1000000" 6)")
        else
            c_curl+=(error)
        fi

        repo=upload/regfs$i
        regfs_mount
        # mkdir of a new repository is outside the timing.
        if mkdir -p "$mnt/$repo" >&2 && t0=${EPOCHREALTIME//[!0-9]/} &&
            timeout -k 5 "$read_timeout" cp "$file" "$mnt/$repo/uploads/blob" >&2; then
            c_regfs+=("$(calc "(${EPOCHREALTIME//[!0-9]/} - $t0) / 1000000" 6)")
            [[ $(readlink "$mnt/$repo/uploads/blob") == "../blobs/$digest" ]] ||
                problems+=("upload run $i: uploads/blob is not a symlink to ../blobs/$digest")
            blob_exists "$repo" "$digest" || problems+=("upload run $i: the registry does not serve $digest in $repo")
        else
            c_regfs+=(error)
        fi
        regfs_umount
    done
    rm -f "$file"

    log "upload samples (s): curl ${c_curl[*]} | regfs ${c_regfs[*]}"
    local label="upload: \`cp\` of a ${size_mib} MiB file into uploads/, fresh mount" curl_s regfs_s
    local target="≥ 0.8 × curl"
    if ! all_numeric "${c_curl[@]}"; then
        row "$label" "—" "curl: error (see log)" "—" "$target" "n/a"
    elif all_numeric "${c_regfs[@]}"; then
        curl_s=$(median "${c_curl[@]}") regfs_s=$(median "${c_regfs[@]}")
        row "$label" "$(secs "$regfs_s") ($(mibps "$regfs_s") MiB/s)" \
            "curl POST + one PUT: $(secs "$curl_s") ($(mibps "$curl_s") MiB/s)" \
            "$(calc "$curl_s / $regfs_s") × curl speed" "$target" "$(verdict "$curl_s / $regfs_s >= 0.8")"
    else
        curl_s=$(median "${c_curl[@]}")
        row "$label" "error (see log)" "curl POST + one PUT: $(secs "$curl_s")" "—" "$target" "**missed**"
    fi
}

# The same question without a filesystem: catalog → tag lists → manifests, 8 in parallel, grep.
grep_pipeline() {
    local d=$tmp/pipeline reg=http://$registry
    rm -rf "$d"
    mkdir -p "$d"
    curl -fsS --max-time 30 "$reg/v2/_catalog?n=1000" | jq -r '.repositories[] | select(startswith("bench/"))' >"$d/repos"
    xargs -P 8 -I{} curl -fsS --max-time 30 --create-dirs -o "$d/tags/{}.json" "$reg/v2/{}/tags/list" <"$d/repos"
    find "$d/tags" -name '*.json' -exec jq -r '.name + "/manifests/" + .tags[]' {} + >"$d/refs"
    xargs -P 8 -I{} curl -fsS --max-time 30 --create-dirs -o "$d/m/{}" \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$reg/v2/{}" <"$d/refs"
    grep -rl arm64 "$d/m"
}

grep_row() {
    local i t0 out c_regfs=() c_pipe=() n_regfs n_pipe
    for ((i = 1; i <= runs; i++)); do
        log "grep run $i/$runs: curl pipeline, regfs"
        t0=${EPOCHREALTIME//[!0-9]/}
        n_pipe=$(grep_pipeline | grep -c .) || n_pipe=0
        c_pipe+=("$((${EPOCHREALTIME//[!0-9]/} - t0))")

        regfs_mount
        t0=${EPOCHREALTIME//[!0-9]/}
        # The glob is expanded inside the timing: listing bench/ is part of the job.
        # shellcheck disable=SC2016 # $1 is expanded by the inner bash
        if out=$(timeout -k 5 "$read_timeout" bash -c 'grep -rl arm64 "$1"/bench/r*/tags' _ "$mnt"); then
            c_regfs+=("$((${EPOCHREALTIME//[!0-9]/} - t0))")
            n_regfs=$(grep -c . <<<"$out") || n_regfs=0
        else
            c_regfs+=(error) n_regfs=0
        fi
        regfs_umount
        ((n_regfs == repos * tags / 2)) || problems+=("grep run $i: regfs found $n_regfs manifests with arm64, expected $((repos * tags / 2))")
        ((n_pipe == repos * tags / 2)) || problems+=("grep run $i: the curl pipeline found $n_pipe manifests with arm64, expected $((repos * tags / 2))")
    done
    local pipe_us regfs_us label="\`grep -rl arm64 mnt/bench/r*/tags\` ($((repos * tags)) manifests), fresh mount"
    log "grep samples (µs): pipeline ${c_pipe[*]} | regfs ${c_regfs[*]}"
    pipe_us=$(median "${c_pipe[@]}")
    if all_numeric "${c_regfs[@]}"; then
        regfs_us=$(median "${c_regfs[@]}")
        row "$label" "$(secs "$regfs_us / 1000000")" "curl pipeline (xargs -P 8): $(secs "$pipe_us / 1000000")" \
            "$(calc "$regfs_us / $pipe_us") × pipeline" "≤ 0.5 × pipeline" "$(verdict "$regfs_us / $pipe_us <= 0.5")"
    else
        row "$label" "error (see log)" "curl pipeline: $(secs "$pipe_us / 1000000")" "—" "≤ 0.5 × pipeline" "**missed**"
    fi
}

# The disk cache: a first mount fills one cache directory, fresh mounts read from it.
disk_rows() {
    if [[ -z $has_disk_cache ]]; then
        row "disk cache rows" "n/a (this regfs has no --cache-dir)" "—" "—" "—" "n/a"
        return
    fi
    local dc=$tmp/disk-cache-warm i t out c50 w50 bad
    local on=() off=() dcold=() dwarm=() lcold=() lwarm=() rwarm=() r_drop=() r_warm=() l_drop=()
    local kept=$dc/blobs/$blob_digest
    detect_block_size # random offsets one per block, as in the random rows
    for ((i = 1; i <= runs; i++)); do
        log "disk run $i/$runs: cold with the disk cache off/on, then disk-warm fresh mounts, a local file, rclone full cache"
        rm -rf "$dc"
        regfs_mount --no-disk-cache
        t=$(read_seq "$mnt/$blob_path") || t=error
        off+=("$t")
        regfs_umount
        regfs_mount --cache-dir "$dc"
        t=$(read_seq "$mnt/$blob_path") || t=error
        on+=("$t")
        wait_until 60 test -f "$kept" || problems+=("disk run $i: the blob was not kept whole in the disk cache")
        regfs_umount

        pyh drop "$kept"
        regfs_mount --cache-dir "$dc"
        t=$(read_seq "$mnt/$blob_path") || t=error
        dcold+=("$t")
        regfs_umount
        regfs_mount --cache-dir "$dc"
        t=$(read_seq "$mnt/$blob_path") || t=error
        dwarm+=("$t")
        ((i > 1)) || verify_blob "$mnt/$blob_path" "regfs read from the disk cache"
        regfs_umount

        pyh drop "$kept"
        regfs_mount --cache-dir "$dc"
        if out=$(timeout -k 5 "$read_timeout" python3 "$py" random "$mnt/$blob_path" "$blob_data" "$((100 + i))" "$random_reads" "$size" "$block"); then
            read -r c50 _ w50 bad <<<"$out"
            r_drop+=("$c50") r_warm+=("$w50")
            ((bad == 0)) || problems+=("disk-warm random reads, run $i: $bad preads returned wrong bytes")
        else
            r_drop+=(error) r_warm+=(error)
        fi
        regfs_umount

        # The same file read locally: the registry's own copy of the blob.
        pyh drop "$blob_data"
        lcold+=("$(read_seq "$blob_data")")
        lwarm+=("$(read_seq "$blob_data")")
        pyh drop "$blob_data"
        out=$(python3 "$py" random "$blob_data" "$blob_data" "$((100 + i))" "$random_reads" "$size" "$block")
        l_drop+=("$(awk '{ print $1 }' <<<"$out")")

        if [[ -z ${peer_na[rclone]:-} ]]; then
            rm -rf "$tmp/rclone-cache"
            RCLONE_CONFIG=$tmp/rclone.conf rclone mount :http: "$rclone_mnt" --http-url "http://127.0.0.1:$nginx_port/" \
                --read-only --vfs-cache-mode full --cache-dir "$tmp/rclone-cache" 2>>"$tmp/rclone.log" &
            rclone_pid=$!
            wait_until 20 peer_ready "$rclone_mnt/blob.bin" "$rclone_pid" || true
            if read_seq "$rclone_mnt/blob.bin" >/dev/null; then
                t=$(read_seq "$rclone_mnt/blob.bin") || t=error
                rwarm+=("$t")
            else
                rwarm+=(error)
            fi
            unmount "$rclone_mnt" "$rclone_pid"
            rclone_pid=
        fi
    done
    log "disk samples (s): off ${off[*]} | on ${on[*]} | disk-warm dropped ${dcold[*]} warm ${dwarm[*]} | local ${lcold[*]} / ${lwarm[*]} | rclone full warm ${rwarm[*]:-}"
    log "disk random p50 (µs): regfs dropped ${r_drop[*]} warm ${r_warm[*]} | local dropped ${l_drop[*]}"

    local a b label="${size_mib} MiB blob from the disk cache, fresh mount"
    if all_numeric "${dcold[@]}" "${lcold[@]}"; then
        a=$(median "${dcold[@]}") b=$(median "${lcold[@]}")
        row "$label, page cache dropped, vs \`cat\` of a local file (dropped)" "$(secs "$a") ($(mibps "$a") MiB/s)" \
            "local file: $(secs "$b") ($(mibps "$b") MiB/s)" "$(calc "$b / $a") × local" "≥ 0.9 ×" "$(verdict "$b / $a >= 0.9")"
    else
        row "$label, page cache dropped" "error (see log)" "—" "—" "≥ 0.9 ×" "**missed**"
    fi
    if all_numeric "${dwarm[@]}" "${lwarm[@]}"; then
        a=$(median "${dwarm[@]}") b=$(median "${lwarm[@]}")
        row "$label, page cache warm, vs a warm local file" "$(secs "$a") ($(mibps "$a") MiB/s)" \
            "local file: $(secs "$b") ($(mibps "$b") MiB/s)" "$(calc "$b / $a") × local" "≥ 0.9 ×" "$(verdict "$b / $a >= 0.9")"
        if [[ -n ${peer_na[rclone]:-} ]]; then
            row "same warm case vs rclone --vfs-cache-mode full" "$(secs "$a")" "n/a (${peer_na[rclone]})" "—" "faster than rclone" "n/a"
        elif all_numeric "${rwarm[@]}"; then
            b=$(median "${rwarm[@]}")
            row "same warm case vs rclone --vfs-cache-mode full (second read)" "$(secs "$a") ($(mibps "$a") MiB/s)" \
                "rclone: $(secs "$b") ($(mibps "$b") MiB/s)" "$(calc "$b / $a") × rclone" "faster than rclone" "$(verdict "$b / $a > 1")"
        else
            row "same warm case vs rclone --vfs-cache-mode full" "$(secs "$a")" "n/a (rclone read failed, see log)" "—" "faster than rclone" "n/a"
        fi
    else
        row "$label, page cache warm" "error (see log)" "—" "—" "≥ 0.9 ×" "**missed**"
    fi
    if all_numeric "${r_drop[@]}" "${r_warm[@]}" "${l_drop[@]}"; then
        a=$(median "${r_drop[@]}") b=$(median "${l_drop[@]}")
        row "random 4 KiB reads from the disk cache, fresh mount: p50 page cache dropped / same offsets again" \
            "$(calc "$a" 1) µs / $(calc "$(median "${r_warm[@]}")" 1) µs" "local file, dropped: $(calc "$b" 1) µs" \
            "$(calc "$a / $b") × local" "≤ 50 µs" "$(verdict "$a <= 50")"
    else
        row "random 4 KiB reads from the disk cache: p50" "error (see log)" "—" "—" "≤ 50 µs" "**missed**"
    fi
    if all_numeric "${on[@]}" "${off[@]}"; then
        a=$(median "${on[@]}") b=$(median "${off[@]}")
        row "cold sequential read, disk cache on vs \`--no-disk-cache\`" "on: $(secs "$a") ($(mibps "$a") MiB/s)" \
            "off: $(secs "$b") ($(mibps "$b") MiB/s)" "$(calc "$b / $a") × off" "≥ 0.95 ×" "$(verdict "$b / $a >= 0.95")"
    else
        row "cold sequential read, disk cache on vs off" "error (see log)" "—" "—" "≥ 0.95 ×" "**missed**"
    fi
}

# ---------------------------------------------------------------------------------------
# Main

if want seq || want disk || want wan; then bench_setup; fi
start_registry
mkdir -p "$tmp/gen"
if want seq || want random || want rss || want disk || want wan; then push_big_blob; fi
if want grep || want wan; then push_manifests; fi
if want seq || want disk || want wan; then start_nginx; fi

want seq && seq_rows
want random && random_rows
want rss && rss_row
want grep && grep_row
want upload && upload_row
want disk && disk_rows
want image && image_rows
want soci && soci_rows
want runtime && runtime_rows
if want wan; then
    detect_block_size
    wan_rows
fi

((stats_retries == 0)) || notes+=("regfs retried $stats_retries requests in total (stats \`retries\`)")
if [[ -s $tmp/regfs.log ]] && grep -qiE 'error|panic' "$tmp/regfs.log"; then
    problems+=("the regfs log has errors; first ones: $(grep -iE 'error|panic' "$tmp/regfs.log" | head -3 | tr '\n' ' ')")
fi

peers="curl $(curl --version | awk 'NR == 1 { print $2 }')"
for p in nginx rclone httpfs2; do
    if { want seq || want disk || want wan; } && [[ -z ${peer_na[$p]:-} ]]; then
        case $p in
        nginx) peers+=", nginx $(nginx -v 2>&1 | sed 's|.*/||')" ;;
        rclone) peers+=", rclone $(rclone version 2>/dev/null | awk 'NR == 1 { print $2 }')" ;;
        httpfs2) peers+=", httpfs2 $(dpkg-query -W -f '${Version}' httpfs2 2>/dev/null)" ;;
        esac
    fi
done
supported() { if [[ -n $1 ]]; then echo supported; else echo "not supported"; fi; }
mem_gib=$(awk '/^MemTotal:/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
cat <<EOF
# regfs benchmark

- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')
- machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), ${mem_gib} GiB RAM, kernel $(uname -r)
- regfs: commit $regfs_commit ($REGFS)${base:+; against $base_name ($base)}; --cache-size $(supported "$has_cache_size"), --block-size $(supported "$has_block_size"), stats file $(supported "$has_stats")
- registry: $(docker-registry --version | awk '{ print $NF }') on loopback; ${blob_digest:+random blob of ${size_mib} MiB}${blob_digest:+${pushed_manifests:+; }}${pushed_manifests:+$pushed_manifests manifests}
- peers: $peers
- medians of $runs runs (BENCH_RUNS); rows: $only

| row | regfs | peer | ratio | target | status |
|---|---|---|---|---|---|
EOF
printf '%s\n' "${rows[@]}"
if ((${#notes[@]} + ${#problems[@]} > 0)); then
    echo
    for n in "${notes[@]}"; do echo "- note: $n"; done
    for p in "${problems[@]}"; do echo "- PROBLEM: $p"; done
fi
