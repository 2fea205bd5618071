//! `regfs status` (docs/SEMANTICS.md, "Under faults", and README "regfs status"): a
//! mount reading a large plain layer slowly shows the layer being indexed with its
//! progress; after a file of the image is read, the image is listed with the bytes
//! fetched of it against the bytes read; `--json` is the stats; a mount whose daemon
//! died is reported dead, with exit status 1.

use crate::common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use common::{Layout, Mount, Proxy, ProxyRules, Registry, noise, require_tools};

const MIB: usize = 1 << 20;
const SMALL: &str = "etc/hello.txt";
const SMALL_TEXT: &[u8] = b"hello from a large image\n";

fn status(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_regfs"))
        .arg("status")
        .args(args)
        .output()
        .expect("run regfs status")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An image of one gzip layer: 24 MiB of noise (the pass reads all of it) and a small
/// file.
fn push_large_image(registry: &Registry) {
    let layout = Layout::new();
    let big = noise(24 * MIB, 7);
    let files: [(&str, &[u8]); 2] = [("data/big.bin", &big), (SMALL, SMALL_TEXT)];
    layout.new_image("v1", "amd64", &files);
    layout.push("v1", registry, "team/app:v1");
}

/// Waits until `regfs status` on `dir` prints a line that `wanted` accepts; its output.
fn wait_for_status(dir: &Path, wanted: impl Fn(&str) -> bool, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        let out = status(&[&dir.to_string_lossy()]);
        last = text(&out);
        if out.status.success() && last.lines().any(&wanted) {
            return last;
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!("regfs status never showed {what}; last output:\n{last}");
}

#[test]
fn status_shows_indexing_progress_then_what_was_fetched_against_what_was_read() {
    require_tools();
    let registry = Registry::start();
    push_large_image(&registry);
    // 4 MiB/s: the pass over the 24 MiB layer takes seconds, long enough to watch.
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    proxy.set_trickle(4 * MIB);
    let mount = Mount::start(&proxy.url(), &["--timeout", "120s"]);

    let dir = mount.dir.clone();
    let reader = thread::spawn(move || fs::read(dir.join("team/app/tags/v1/rootfs").join(SMALL)));
    let shown = wait_for_status(
        &mount.dir,
        |l| l.contains("indexing") && l.contains("sha256:") && !l.contains("(0 B of"),
        "a layer being indexed with bytes done",
    );
    let line = shown
        .lines()
        .find(|l| l.contains("indexing"))
        .unwrap_or_default();
    assert!(line.contains('%') && line.contains(" of "), "{shown}");

    let read = reader.join().expect("reader thread");
    assert_eq!(read.expect("read the small file"), SMALL_TEXT);
    proxy.set_trickle(0);

    let shown = wait_for_status(
        &mount.dir,
        |l| l.contains("team/app:v1") && l.contains("fetched of"),
        "the image with its fetched and read bytes",
    );
    let line = shown
        .lines()
        .find(|l| l.contains("team/app:v1"))
        .unwrap_or_default();
    assert!(
        line.contains(&format!("{} B read", SMALL_TEXT.len())),
        "{shown}"
    );
    assert!(
        !shown.contains("indexing"),
        "nothing is being indexed now:\n{shown}"
    );

    let json = status(&["--json", &mount.dir.to_string_lossy()]);
    assert!(json.status.success(), "{}", text(&json));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("--json is JSON");
    let recent = value.to_string();
    assert!(recent.contains("\"recent\""), "{recent}");
    // The image's fetched bytes are those of its layer blobs: the whole layer, here.
    let stats = mount.stats();
    let image = stats["recent"]
        .as_array()
        .and_then(|list| list.iter().find(|o| o["name"] == "team/app:v1"))
        .unwrap_or_else(|| panic!("team/app:v1 not in {stats}"));
    assert_eq!(image["kind"], "image");
    assert_eq!(image["read"], SMALL_TEXT.len() as u64);
    assert!(
        image["fetched"].as_u64() >= image["size"].as_u64().map(|s| s * 9 / 10),
        "the pass read the layer whole: {image}"
    );
}

#[test]
fn status_of_a_dead_mount_says_so_and_fails() {
    require_tools();
    let registry = Registry::start();
    common::push_tiny_image(&registry, "team/app", "v1", 1);
    let mut mount = Mount::start(&registry.url(), &[]);
    assert!(mount.path("team/app/tags/v1").exists());
    let alive = status(&[&mount.dir.to_string_lossy()]);
    assert!(alive.status.success(), "{}", text(&alive));

    // The watchdog first, so nothing unmounts the dead mount behind the daemon's back.
    for pid in mount.children() {
        // SAFETY: kill(2) on a process this test's child started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    thread::sleep(Duration::from_millis(100));
    assert!(mount.kill().is_some(), "regfs did not die from SIGKILL");
    thread::sleep(Duration::from_millis(200));

    let dead = status(&[&mount.dir.to_string_lossy()]);
    let said = text(&dead);
    assert_eq!(dead.status.code(), Some(1), "{said}");
    assert!(said.to_lowercase().contains("dead"), "{said}");
    let _ = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(&mount.dir)
        .status();
}
