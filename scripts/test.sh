#!/usr/bin/env bash
# Everything CI checks: system packages, formatting, lints, all tests (FUSE ones included).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
