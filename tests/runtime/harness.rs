//! The parts the runtime tests share: tools they need, a child process that dies with
//! the test, bounded waits.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

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

/// The child gets SIGKILL when the test's thread ends: a failed test leaves no
/// snapshotter or containerd behind.
pub fn die_with_test(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other("parent exited before exec"));
            }
            Ok(())
        });
    }
}

/// Waits until `ready` holds, at most `limit`; panics with `what` otherwise.
pub fn wait_until(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} (waited {limit:?})");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A directory for build products that outlive one test run (Go's build cache).
pub fn build_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).expect("make a build dir under target/");
    dir
}

/// Unmounts (lazily) every mount at or below `dir`, deepest first: what a test's
/// containerd, snapshotter and regfs mounts leave when it fails half-way.
pub fn unmount_below(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(regfs::mount::unescape_mountinfo)
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in points {
        let _ = nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
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
    require(&["go"]);
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
