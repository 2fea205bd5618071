# shellcheck shell=bash
# Sourced by scripts/demo.sh and scripts/bench.sh: a throw-away docker-registry on loopback.

# registry_start DIR: starts docker-registry with its config, storage and log
# (DIR/registry.log) under DIR. Sets `registry` (host:port) and `registry_pid`.
# Returns 1, with the registry's log on stderr, if it does not answer /v2/ within 20 s.
registry_start() {
    local dir=$1 _
    # Port 0: the registry picks a free port and logs it ("listening on 127.0.0.1:PORT").
    cat >"$dir/registry.yml" <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:0
EOF
    docker-registry serve "$dir/registry.yml" >"$dir/registry.log" 2>&1 &
    registry_pid=$!
    registry=
    for _ in $(seq 200); do
        registry=$(sed -n 's/.*msg="listening on \(127\.0\.0\.1:[0-9]*\)".*/\1/p' "$dir/registry.log")
        if [[ -n $registry ]] && curl -fsS --max-time 5 -o /dev/null "http://$registry/v2/"; then
            return 0
        fi
        kill -0 "$registry_pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "registry did not start:" >&2
    cat "$dir/registry.log" >&2
    return 1
}
