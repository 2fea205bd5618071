//! The Go programs the runtime tests run (tests/go/): containerd's conformance suite and
//! a CRI-style pull, built in GOPATH mode against Debian's containerd sources.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::require_commands;

/// Fails with a message naming setup.sh unless `path` exists (a package's files).
pub fn require_path(path: &Path, package: &str) {
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup.sh (installs {package} with apt-get)",
        path.display()
    );
}

/// A directory for build products that outlive one test run (Go's build cache).
pub fn build_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).expect("make a build dir under target/");
    dir
}

/// Where Debian's golang-github-containerd-containerd-dev puts containerd's sources.
const GOCODE: &str = "/usr/share/gocode";

pub enum GoBuild {
    /// `go test -c`: the package's tests as a program.
    Test,
    /// `go build`: the package's `main`.
    Program,
}

/// Builds tests/go/`package` in GOPATH mode (Go 1.19, containerd's sources from
/// Debian, no module download) and returns the binary. Go's build cache stays under
/// target/, so only the first build takes a minute.
pub fn go_build(package: &str, kind: GoBuild) -> PathBuf {
    require_commands(&["go"]);
    require_path(
        &Path::new(GOCODE).join("src/github.com/containerd/containerd/snapshots/testsuite"),
        "golang-github-containerd-containerd-dev",
    );
    let dir = build_dir("go");
    let linked = dir.join("gopath/src/regfs").join(package);
    std::fs::create_dir_all(linked.parent().expect("a parent")).expect("make GOPATH");
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/go")
        .join(package);
    let _ = std::fs::remove_file(&linked);
    std::os::unix::fs::symlink(&source, &linked).expect("link the Go package into GOPATH");
    let binary = dir.join(package);
    let mut cmd = Command::new("go");
    match kind {
        GoBuild::Test => cmd.args(["test", "-c", "-o"]),
        GoBuild::Program => cmd.args(["build", "-o"]),
    };
    let out = cmd
        .arg(&binary)
        .arg(".")
        .current_dir(&linked)
        .env(
            "GOPATH",
            format!("{}:{GOCODE}", dir.join("gopath").display()),
        )
        .env("GO111MODULE", "off")
        .env("GOCACHE", dir.join("cache"))
        .env("GOFLAGS", "")
        .output()
        .expect("run go (scripts/setup.sh installs golang-go)");
    assert!(
        out.status.success(),
        "building tests/go/{package} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}
