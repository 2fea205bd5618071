#!/usr/bin/env bash
# Everything CI checks: system packages, formatting, lints, all tests (FUSE ones included).
# Says how long each step took; the build's own breakdown (each crate, each link) is in
# target/cargo-timings/cargo-timing.html.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "test.sh: $name took $((SECONDS - start)) s" >&2
}

step setup scripts/setup.sh
# The house rules the compiler does not check: files over 700 lines, import circles, layers.
step layout python3 scripts/check-layout.py
step fmt cargo fmt --all -- --check
# In the test profile, as the build below: the two then share build scripts (libzstd's C,
# ring's) and proc macros instead of compiling each twice. The lints are the same.
step clippy cargo clippy --all-targets --profile test -- -D warnings
step build cargo test --all-targets --no-run --timings
step tests cargo test --all-targets
