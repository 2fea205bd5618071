//! A podman 4.3 of a test's own (root, runroot, storage.conf, registries.conf; overlay
//! driver, as root), with regfs's `/.layerstore/` as its Additional Layer Store or
//! without: what podman and CRI-O users do, checked as they would check it.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use super::images::require_image_tools;
use super::{require_commands, require_tools};

/// What a podman command may take at most.
const PODMAN_TIMEOUT_SECS: &str = "180";
/// What podman 4.3 logs when a layer store answers `use` or `rmdir` with anything but
/// ENOENT.
pub const STORE_COMPLAINT: &str = "Unexpected error by Additional Layer Store";
/// Options every `podman run` here needs on this machine, and no network.
pub const RUN: [&str; 8] = [
    "run",
    "--rm",
    "--network",
    "none",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

/// podman and what it runs with are installed (scripts/setup.sh), and this is root.
pub fn require_podman() {
    require_tools();
    require_image_tools();
    require_commands(&["podman", "runc", "conmon", "fuse-overlayfs", "newuidmap"]);
    // SAFETY: no arguments, no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the podman tests run podman as root (overlay driver): run them as root"
    );
}

/// A podman with its own storage (root, runroot, storage.conf) and registries.conf,
/// pulling the registry's images through `mirror`, with regfs's layer store or without.
pub struct Podman {
    dir: tempfile::TempDir,
    layer_store: Option<PathBuf>,
}

impl Podman {
    pub fn new(registry: SocketAddr, mirror: SocketAddr, layer_store: Option<PathBuf>) -> Podman {
        let dir = tempfile::Builder::new()
            .prefix("regfs-podman-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let stores = match &layer_store {
            Some(store) => format!("additionallayerstores = [\"{}:ref\"]\n", store.display()),
            None => String::new(),
        };
        let storage = format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n\
             [storage.options]\n{stores}",
            d.join("root").display(),
            d.join("run").display(),
        );
        fs::write(d.join("storage.conf"), storage).expect("storage.conf");
        let registries = format!(
            "unqualified-search-registries = []\n\
             [[registry]]\nlocation = \"{registry}\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n"
        );
        fs::write(d.join("registries.conf"), registries).expect("registries.conf");
        fs::create_dir(d.join("tmp")).expect("tmp");
        Podman { dir, layer_store }
    }

    /// `podman <args>` with this storage, within PODMAN_TIMEOUT_SECS. `--root` and
    /// `--runroot` on the command line make podman drop the driver options of
    /// storage.conf, so the layer store is given again as `--storage-opt`.
    pub fn command(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        let mut cmd = Command::new("timeout");
        cmd.args([PODMAN_TIMEOUT_SECS, "podman", "--root"])
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"));
        if let Some(store) = &self.layer_store {
            cmd.arg("--storage-opt").arg(format!(
                "overlay.additionallayerstore={}:ref",
                store.display()
            ));
        }
        cmd.args(args)
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("TMPDIR", d.join("tmp"))
            .stdin(Stdio::null())
            .output()
            .expect("run podman")
    }

    /// `podman <args>`, which must succeed without the layer store being blamed for
    /// anything; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.command(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        super::assert_success(&out, &format!("podman {args:?}"));
        assert!(
            !stderr.contains(STORE_COMPLAINT),
            "podman {args:?} complained about the layer store:\n{stderr}"
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The layers of podman's storage that are the layer store's (their `diff` a
    /// link into it).
    pub fn layers_from_store(&self) -> usize {
        let overlay = self.dir.path().join("root/overlay");
        fs::read_dir(&overlay)
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .filter(|e| e.path().join("additionallayer").exists())
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers and images first: their overlay mounts go with them.
        let _ = self.command(&["rm", "--all", "--force"]);
        let _ = self.command(&["rmi", "--all", "--force"]);
    }
}
