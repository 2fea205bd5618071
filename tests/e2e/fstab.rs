//! regfs at boot (issue 14): fstab lines of type `fuse.regfs` and the `PROGRAM#REGISTRY`
//! form of type `fuse`, through util-linux `mount` and fuse3's `mount.fuse3`, options as
//! `-o key=value`, `umount`; and `Type=notify` readiness for a systemd unit.

use crate::common;

use std::fs;
use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use common::{Mount, MountInput, Registry, is_mounted, push_tiny_image};

fn regfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_regfs")
}

/// `mount ARGS…` (util-linux; it runs helpers with a PATH of its own).
fn mount_cmd(args: &[&str]) -> Output {
    Command::new("mount")
        .args(args)
        .output()
        .expect("run mount")
}

/// The regfs daemons serving `dir`, by their command lines.
fn daemons_of(dir: &Path) -> Vec<u32> {
    let dir = dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let words: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        if words.iter().any(|w| w.ends_with("regfs")) && words.contains(&dir) {
            pids.push(pid);
        }
    }
    pids
}

/// Unmounts with `umount` and waits (10 s at most) for the daemon to exit.
fn umount_and_wait(dir: &Path) {
    let out = Command::new("umount").arg(dir).output().expect("umount");
    assert!(
        out.status.success(),
        "umount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(dir));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemons_of(dir).is_empty() {
        assert!(Instant::now() < deadline, "regfs still runs after umount");
        thread::sleep(Duration::from_millis(50));
    }
}

struct Setup {
    registry: Registry,
    tmp: tempfile::TempDir,
}

/// A test that fails half way leaves no mount behind.
impl Drop for Setup {
    fn drop(&mut self) {
        for entry in fs::read_dir(self.tmp.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if is_mounted(&entry.path()) {
                let _ = Command::new("umount").arg("-l").arg(entry.path()).status();
            }
        }
    }
}

fn setup() -> Setup {
    common::require_tools();
    let registry = Registry::start();
    push_tiny_image(&registry, "team/app", "v1", 7);
    Setup {
        registry,
        tmp: tempfile::tempdir().expect("tempdir"),
    }
}

impl Setup {
    fn dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        fs::create_dir_all(&d).expect("mkdir");
        d.canonicalize().expect("canonical")
    }
}

#[test]
fn mount_t_fuse_with_options_and_umount() {
    let s = setup();
    let dir = s.dir("mnt");
    let log = s.tmp.path().join("regfs.log");
    let cache = s.dir("cache");
    let opts = format!(
        "ro,_netdev,nofail,allow_other,cache_dir={},tag_ttl=5s,repo=team/app,log_file={}",
        cache.display(),
        log.display()
    );
    // The program by its path: the form for a regfs that is not on mount's PATH.
    let source = format!("{}#{}", regfs_bin(), s.registry.url());
    let dir_s = dir.to_string_lossy().into_owned();
    let out = mount_cmd(&["-t", "fuse", &source, &dir_s, "-o", &opts]);
    assert!(
        out.status.success(),
        "mount: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        fs::read_to_string(&log).unwrap_or_default()
    );
    // mount returned once the daemon was serving.
    assert!(is_mounted(&dir));
    assert_eq!(common::ls(&dir.join("team/app/tags")), ["v1"]);
    let manifest = fs::read(dir.join("team/app/tags/v1/manifest.json")).expect("read");
    assert!(!manifest.is_empty());
    // ro was honoured; the cache and the log went where the options said.
    let e = fs::write(dir.join("team/app/uploads/x"), b"x").expect_err("a write on ro");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert!(fs::read_dir(&cache).expect("cache dir").next().is_some());
    assert!(fs::metadata(&log).is_ok_and(|m| m.len() > 0));
    umount_and_wait(&dir);
}

/// An fstab line of type `fuse.regfs`, mounted and unmounted by `mount -T FSTAB DIR`
/// and `umount`, with regfs where an install puts it (/usr/local/bin): in a mount
/// namespace of its own, so that the machine's /usr/local/bin is left alone.
#[test]
fn an_fstab_line_of_type_fuse_regfs() {
    let s = setup();
    let dir = s.dir("mnt");
    let bin = s.dir("bin");
    std::os::unix::fs::symlink(regfs_bin(), bin.join("regfs")).expect("symlink");
    let fstab = s.tmp.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "# regfs at boot\n{} {} fuse.regfs _netdev,nofail,no_disk_cache,page_size=50 0 0\n",
            s.registry.url(),
            dir.display()
        ),
    )
    .expect("write fstab");
    let data = common::noise(70_000, 9);
    let upload = s.tmp.path().join("b.bin");
    fs::write(&upload, &data).expect("write");
    let script = r#"set -e
mount --bind "$1" /usr/local/bin
mount -T "$2" "$3"
ls "$3/team/app/tags"
cp "$4" "$3/team/app/uploads/b.bin"
umount "$3"
"#;
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&bin)
        .arg(&fstab)
        .arg(&dir)
        .arg(&upload)
        .output()
        .expect("unshare");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v1\n");
    // It was read-write: the blob copied in was pushed.
    let digest = common::sha256_digest(&data);
    assert_eq!(
        common::blob_status(s.registry.addr, "team/app", &digest),
        200
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemons_of(&dir).is_empty() {
        assert!(Instant::now() < deadline, "regfs still runs after umount");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_bad_option_fails_the_mount_with_its_name() {
    let s = setup();
    let dir = s.dir("mnt");
    let dir_s = dir.to_string_lossy().into_owned();
    let source = format!("{}#{}", regfs_bin(), s.registry.url());
    let out = mount_cmd(&["-t", "fuse", &source, &dir_s, "-o", "ro,no_such_option=3"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-option"), "{stderr}");
    assert!(!is_mounted(&dir));
}

#[test]
fn systemd_hears_ready_once_the_mount_serves() {
    let s = setup();
    let socket_path = s.tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let input = MountInput {
        env: vec![(
            "NOTIFY_SOCKET".into(),
            socket_path.to_string_lossy().into_owned(),
        )],
        ..MountInput::default()
    };
    let mount = Mount::start_with(&s.registry.url(), &["--no-disk-cache"], &input)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(20);
    let n = loop {
        match socket.recv(&mut buf) {
            Ok(n) => break n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                assert!(Instant::now() < deadline, "no READY=1 from regfs");
            }
            Err(e) => panic!("notify socket: {e}"),
        }
    };
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(common::ls(&mount.path("team/app/tags")), ["v1"]);
    mount.terminate();
}
