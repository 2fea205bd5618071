//! The harness of the end-to-end tests (`tests/e2e/`), one file per kind of fixture.
//! Real parts only, all on loopback and bounded in time:
//! - [`registry`]: `docker-registry` (CNCF distribution 2.8) with temp storage, the
//!   registry API by hand ([`registry::api`]) and a pull-through cache
//!   ([`registry::pull_through`]);
//! - [`layout`]: images built with `umoci` and pushed with `skopeo`, plus hand-made indexes;
//!   [`images`]: images with rich contents, converted ones, hostile layers;
//! - [`proxy`]: a small HTTP/1.1 proxy in front of a registry that injects faults and counts;
//! - [`mount`]: the regfs binary mounted on a temp directory through the kernel;
//! - [`shaper`]: a wide-area link in userspace; [`auth`]: certificates, htpasswd, a token
//!   issuer; [`rss`]: a process's memory; [`http`]: the tiny HTTP/1.1 they all speak.
//!
//! Children (registry, regfs) get a parent-death signal so that a crashed test leaves nothing
//! behind. Linux delivers it when the *thread* that spawned the child ends, so create and drop
//! these objects in the same test thread (do not share them through statics).

pub mod auth;
pub mod http;
pub mod images;
pub mod layout;
pub mod mount;
pub mod process;
pub mod proxy;
pub mod registry;
pub mod rss;
pub mod shaper;

use std::fs::File;
use std::io;
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest as _, Sha256};

pub use http::{Response, header, http, http_get, read_response, try_http};
pub use layout::{Layout, layers, skopeo_copy, skopeo_copy_to_oci, skopeo_raw_manifest};
pub use mount::{Mount, MountInput, is_mounted, ls, stat, unmount_below};
pub use proxy::{ANNOUNCE_LENGTH, LocationRewrite, Proxy, ProxyRules, Tamper};
pub use registry::api::{
    blob_status, catalog, get_blob, get_manifest, get_manifest_at, manifest_status, next_link,
    oci_manifest, push_blob, push_image, push_tiny_image, push_untagged_image, put_manifest, tags,
};
pub use registry::pull_through::PullThrough;
pub use registry::{Registry, RegistryOptions};
pub use rss::{RssSampler, proc_status_kib};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Accept header for manifest GETs: every kind we may push, so the registry never converts.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

// Tools

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

/// Bytes gzip cannot shrink (xorshift from `seed`), so a layer is about as large as
/// its content; different seeds give different layers.
pub fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut s = seed.max(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s as u8
        })
        .collect()
}

/// `sha256:<hex>` of some bytes, as the registry API writes digests.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// close(2) of a file, with its error (dropping a `File` ignores it): for a file
/// written into a mount, this is the commit.
pub fn close(file: File) -> io::Result<()> {
    let fd = file.into_raw_fd();
    // SAFETY: `fd` was just released by `file`, so it is open and closed exactly once.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
