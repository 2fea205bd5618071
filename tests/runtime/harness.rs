//! The parts the runtime tests share: tools they need, a child process that dies with
//! the test, bounded waits.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Fails with a message naming setup.sh unless every tool exists.
pub fn require(tools: &[&str]) {
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{tool} is missing: run scripts/setup.sh (installs it with apt-get)"
        );
    }
}

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
