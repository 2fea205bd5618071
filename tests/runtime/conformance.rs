//! containerd's snapshotter conformance suite (`snapshots/testsuite`, from Debian's
//! golang-github-containerd-containerd-dev) through containerd's proxy client against
//! `regfs snapshotter`: a Rust test, so `cargo test` runs it like every other and a
//! failure shows the Go test's own output. tests/go/snapshotter_conformance/ starts
//! one snapshotter per subtest on its own root. Built in GOPATH mode with Debian's Go
//! 1.19 (about a minute the first time; Go's build cache under target/ after that).

use std::process::Command;
use std::time::Duration;

use super::harness::{GoBuild, go_build};

/// Cases that containerd's own overlayfs snapshotter passes in 1.6 (Rename is skipped
/// by the suite itself).
const PASSING_CASES: usize = 20;

#[test]
fn containerd_snapshotter_suite_passes() {
    let binary = go_build("snapshotter_conformance", GoBuild::Test);
    // Root, in a mount namespace of its own: the suite mounts what it is handed.
    let out = Command::new("timeout")
        .arg(Duration::from_secs(240).as_secs().to_string())
        .args(["unshare", "--mount", "--propagation", "private"])
        .arg(&binary)
        .args(["-test.root", "-test.v", "-test.timeout", "200s"])
        .env("REGFS_BIN", env!("CARGO_BIN_EXE_regfs"))
        .output()
        .expect("run the conformance suite");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let shown = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the suite failed:\n{shown}");
    let passed = stdout.matches("    --- PASS: ").count();
    assert_eq!(passed, PASSING_CASES, "cases passed:\n{shown}");
    assert!(
        stdout.contains("--- SKIP: TestRegfsSnapshotter/Rename"),
        "{shown}"
    );
    assert!(!stdout.contains("--- FAIL"), "{shown}");
}
