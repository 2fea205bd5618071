#!/usr/bin/env bash
# Everything CI checks: system packages, formatting, lints, all tests (FUSE ones included).
# Says how long each step took, wall clock and CPU (on a shared machine the CPU time is
# the steadier figure); the build's own breakdown (each crate, each link) is in
# target/cargo-timings/cargo-timing.html.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    local name=$1
    shift
    local TIMEFORMAT="test.sh: $name took %0R s (CPU %0U s user, %0S s system)"
    time "$@"
}

step setup scripts/setup.sh
# The house rules the compiler does not check: files over 700 lines, import circles, layers.
step layout python3 scripts/check-layout.py
step fmt cargo fmt --all -- --check

# Clippy's lints in the build itself. `cargo clippy -- -D warnings` is `cargo check` with
# clippy-driver as the compiler of the workspace's own targets (RUSTC_WORKSPACE_WRAPPER)
# and its arguments in CLIPPY_ARGS, separated by __CLIPPY_HACKERY__; run before the build,
# it compiled every dependency a second time, as metadata the build cannot use. Here the
# build's compiles of regfs's targets are clippy-driver's: the same lints with the same
# -D warnings (rustc's warnings included) over a superset of `--all-targets`' units, and
# the dependencies, compiled by rustc, once. The tests step keeps the variables: cargo
# rebuilds a target whose compiler or CLIPPY_ARGS changed.
export RUSTC_WORKSPACE_WRAPPER
RUSTC_WORKSPACE_WRAPPER="$(rustc --print sysroot)/bin/clippy-driver"
export CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
step clippy+build cargo test --all-targets --no-run --timings
# One test more than cores: most end-to-end tests wait on a registry, a daemon or the
# kernel, and two at a time on two cores left a core idle half the time (e2e 320 s with 2,
# 240 s with 3 on a loaded machine; every timing bound held). tests/alone/ runs its tests
# one at a time whatever this says.
step tests cargo test --all-targets -- --test-threads "$(($(nproc) + 1))"
