//! The system tools the tests run: present (or the test fails naming scripts/setup.sh),
//! run to completion, their failures shown whole.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Panics with a helpful message unless the system tools the end-to-end tests need are present.
pub fn require_tools() {
    let missing: Vec<&str> = ["docker-registry", "skopeo", "umoci", "fusermount3"]
        .into_iter()
        .filter(|tool| find_in_path(tool).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "missing tools {missing:?}: run scripts/setup.sh (installs them with apt-get)"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: FUSE tests need it (see scripts/setup.sh; in a container pass \
         --device /dev/fuse --cap-add SYS_ADMIN)"
    );
}

/// Fails with a message naming setup.sh unless every one of `tools` is a command.
pub fn require_commands(tools: &[&str]) {
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

pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// Runs a command to completion and returns its stdout; panics with its stderr on failure.
pub fn run(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_bytes(cmd)).into_owned()
}

/// [`run`], stdout as bytes.
pub fn run_bytes(cmd: &mut Command) -> Vec<u8> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e} (run scripts/setup.sh?)"));
    assert_success(&out, &shown);
    out.stdout
}

/// Panics with the command's output unless it exited 0.
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed with {}:\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
