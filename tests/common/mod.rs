//! Harness shared by the end-to-end tests (each `tests/*.rs` does `mod common;`).
//!
//! Real parts only, all on loopback and bounded in time:
//! - [`Registry`]: `docker-registry` (CNCF distribution 2.8) with temp storage;
//! - [`Layout`]: images built with `umoci` and pushed with `skopeo`, plus hand-made indexes;
//! - [`Proxy`]: a small HTTP/1.1 proxy in front of a registry that injects faults and counts;
//! - [`Mount`]: the regfs binary mounted on a temp directory through the kernel.
//!
//! Every test binary uses a different subset, hence `dead_code` is allowed for the module.
//!
//! Children (registry, regfs) get a parent-death signal so that a crashed test leaves nothing
//! behind. Linux delivers it when the *thread* that spawned the child ends, so create and drop
//! these objects in the same test thread (do not share them through statics).
#![allow(dead_code)]

pub mod auth;
pub mod images;
pub mod podman;
pub mod shaper;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Accept header for manifest GETs: every kind we may push, so the registry never converts.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// How long we wait for a server (registry, regfs) to come up or go away.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);
/// Socket timeouts of the HTTP helpers and the proxy: nothing in a test may hang forever.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

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

fn find_in_path(tool: &str) -> Option<PathBuf> {
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

/// Makes the child receive `signal` when the spawning thread dies, so a crashed or killed test
/// does not leave registries or mounts behind.
fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    let parent = std::process::id();
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would signal us.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other("parent exited before exec"));
            }
            Ok(())
        });
    }
}

fn send_signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child we have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// Waits up to `timeout` for the child to exit.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            Ok(None) => return None,
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
    }
}

/// `sha256:<hex>` of some bytes, as the registry API writes digests.
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

pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

// ---------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client and parser (std only)
// ---------------------------------------------------------------------------------------------

pub type Headers = Vec<(String, String)>;

/// First value of a header, by case-insensitive name.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// Replaces (or adds) a header.
    pub fn set_header(&mut self, name: &str, value: &str) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.headers.push((name.to_string(), value.to_string()));
    }

    /// A response of its own (not the registry's), e.g. for a [`Tamper`] to answer.
    pub fn new(status: u16, headers: &[(&str, &str)], body: Vec<u8>) -> Response {
        Response {
            status,
            reason: "Tampered".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One line without its CRLF. `Ok(None)` on a clean end of stream before any byte.
fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\n") {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "truncated line",
        ));
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "non-UTF-8 header line"))
}

fn must_line(r: &mut impl BufRead) -> io::Result<String> {
    read_line(r)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"))
}

/// Start line and headers of a message; `Ok(None)` if the peer closed before sending anything.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<(String, Headers)>> {
    let Some(start) = read_line(r)? else {
        return Ok(None);
    };
    let mut headers = Vec::new();
    loop {
        let line = must_line(r)?;
        if line.is_empty() {
            return Ok(Some((start, headers)));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "header without colon"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
}

/// Decodes a `Transfer-Encoding: chunked` body (chunk extensions and trailers are skipped).
pub fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = must_line(r)?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad chunk size {line:?}"),
            )
        })?;
        if size == 0 {
            // Trailer section: header lines up to an empty line.
            while !must_line(r)?.is_empty() {}
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        if !must_line(r)?.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "chunk without CRLF",
            ));
        }
    }
}

/// Reads a body framed by the headers. `to_eof` says what an unframed body means: the rest of
/// the stream (responses) or nothing (requests).
fn read_body(
    r: &mut impl BufRead,
    headers: &[(String, String)],
    to_eof: bool,
) -> io::Result<Vec<u8>> {
    let chunked = header(headers, "transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if chunked {
        return read_chunked(r);
    }
    if let Some(len) = header(headers, "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?;
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        return Ok(body);
    }
    let mut body = Vec::new();
    if to_eof {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

/// Reads one response. `head_request`: the request was HEAD, so there is no body whatever the
/// headers say (Content-Length is kept in `headers`).
pub fn read_response(r: &mut impl BufRead, head_request: bool) -> io::Result<Response> {
    let (start, headers) =
        read_head(r)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no response"))?;
    // "HTTP/1.1 200 OK"
    let mut parts = start.splitn(3, ' ');
    let _version = parts.next();
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad status line {start:?}"),
        )
    })?;
    let reason = parts.next().unwrap_or("").to_string();
    let no_body = head_request || status < 200 || status == 204 || status == 304;
    let body = if no_body {
        Vec::new()
    } else {
        read_body(r, &headers, true)?
    };
    Ok(Response {
        status,
        reason,
        headers,
        body,
    })
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

fn method_has_body(method: &str) -> bool {
    matches!(method, "POST" | "PUT" | "PATCH")
}

/// One request on a fresh connection (`Connection: close`), the whole response read.
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut stream = connect(addr)?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method_has_body(method) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    read_response(&mut BufReader::new(stream), method == "HEAD")
}

/// Like [`try_http`], panicking with a clear message on a network error.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_http(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path} failed: {e}"))
}

/// GET → (status, headers, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, Headers, Vec<u8>) {
    let r = http(addr, "GET", path, &[], &[]);
    (r.status, r.headers, r.body)
}

/// Splits "team/app:v1" (or "team/app@sha256:…") into repository and reference.
pub fn split_reference(dest: &str) -> (&str, &str) {
    if let Some((repo, digest)) = dest.split_once('@') {
        return (repo, digest);
    }
    match dest.rfind(':') {
        Some(i) if !dest[i..].contains('/') => (&dest[..i], &dest[i + 1..]),
        _ => (dest, "latest"),
    }
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

/// A `docker-registry` on a free loopback port with storage in a temp dir. Killed on drop.
pub struct Registry {
    pub addr: SocketAddr,
    dir: TempDir,
    child: Child,
    tls: bool,
    storage: PathBuf,
}

/// What [`Registry::start_with`] adds to the plain test registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// YAML appended at the top level of config.yml, e.g. an `auth:` section.
    pub extra_config: String,
    /// Serve https with this certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Serve this storage directory (e.g. another registry's) instead of a fresh one.
    pub storage: Option<PathBuf>,
    /// Refuse deletes (`storage.delete.enabled: false`, distribution's default).
    pub delete_disabled: bool,
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with(&RegistryOptions::default())
    }

    pub fn start_with(options: &RegistryOptions) -> Registry {
        // The port is free when we pick it but may be taken before the registry binds it:
        // retry a few times on that (rare) race.
        let mut last_error = String::new();
        for _ in 0..3 {
            match Registry::try_start(options) {
                Ok(registry) => return registry,
                Err(log) if log.contains("address already in use") => last_error = log,
                Err(log) => panic!("docker-registry did not start:\n{log}"),
            }
        }
        panic!("docker-registry did not start (port races):\n{last_error}");
    }

    fn try_start(options: &RegistryOptions) -> Result<Registry, String> {
        let dir = tempfile::Builder::new()
            .prefix("regfs-registry-")
            .tempdir()
            .expect("create temp dir for the registry");
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let storage = options
            .storage
            .clone()
            .unwrap_or_else(|| dir.path().join("storage"));
        let tls = match &options.tls {
            Some((cert, key)) => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: {delete}\n\
             http:\n  addr: {addr}\n{tls}{extra}",
            storage = storage.display(),
            delete = !options.delete_disabled,
            extra = options.extra_config,
        );
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).expect("write registry config.yml");
        let log_path = dir.path().join("registry.log");
        let log = File::create(&log_path).expect("create registry log file");
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log file handle"))
            .stderr(log);
        die_with_parent(&mut cmd, libc::SIGKILL);
        let child = cmd
            .spawn()
            .expect("spawn docker-registry (missing? run scripts/setup.sh)");
        let mut registry = Registry {
            addr,
            dir,
            child,
            tls: options.tls.is_some(),
            storage,
        };

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = registry.child.try_wait() {
                return Err(format!("exited with {status}:\n{}", registry.log()));
            }
            // Any answer means it serves: 401 with auth, 400 (plain http to https) with TLS.
            if matches!(try_http(addr, "GET", "/v2/", &[], &[]), Ok(r) if matches!(r.status, 200 | 400 | 401))
            {
                return Ok(registry);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no answer on {addr} after {STARTUP_TIMEOUT:?}:\n{}",
                    registry.log()
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// "http://127.0.0.1:PORT" ("https://" when serving TLS)
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// What the registry logged (errors only).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Where the registry keeps its data (to corrupt or inspect it).
    pub fn storage_dir(&self) -> PathBuf {
        self.storage.clone()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            // Only the end: skopeo's existence checks log many harmless 404s at level error.
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            if !tail.trim().is_empty() {
                eprintln!("--- docker-registry log (last 20 lines) ---\n{tail}");
            }
        }
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener
        .local_addr()
        .expect("local addr of probe listener")
        .port()
}

// ---------------------------------------------------------------------------------------------
// Registry API helpers
// ---------------------------------------------------------------------------------------------

/// GET a manifest → (digest from Docker-Content-Digest, media type, bytes). Panics unless 200.
pub fn get_manifest(registry: &Registry, repo: &str, reference: &str) -> (String, String, Vec<u8>) {
    get_manifest_at(registry.addr, repo, reference)
}

/// [`get_manifest`] against any address (a registry or a [`Proxy`]).
pub fn get_manifest_at(addr: SocketAddr, repo: &str, reference: &str) -> (String, String, Vec<u8>) {
    let path = format!("/v2/{repo}/manifests/{reference}");
    let r = http(addr, "GET", &path, &[("Accept", MANIFEST_ACCEPT)], &[]);
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    let digest = r
        .header("docker-content-digest")
        .unwrap_or_else(|| panic!("GET {path}: no Docker-Content-Digest"))
        .to_string();
    let media_type = r.header("content-type").unwrap_or("").to_string();
    (digest, media_type, r.body)
}

/// PUT a manifest under a tag or digest; returns the digest the registry computed.
pub fn put_manifest(
    registry: &Registry,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> String {
    let path = format!("/v2/{repo}/manifests/{reference}");
    let r = http(
        registry.addr,
        "PUT",
        &path,
        &[("Content-Type", media_type)],
        body,
    );
    assert_eq!(r.status, 201, "PUT {path}: {}", r.text());
    r.header("docker-content-digest")
        .unwrap_or_else(|| panic!("PUT {path}: no Docker-Content-Digest"))
        .to_string()
}

/// Status of `HEAD /v2/<repo>/blobs/<digest>` at `addr` (a registry or a [`Proxy`]).
pub fn blob_status(addr: SocketAddr, repo: &str, digest: &str) -> u16 {
    http(
        addr,
        "HEAD",
        &format!("/v2/{repo}/blobs/{digest}"),
        &[],
        &[],
    )
    .status
}

/// Status of `HEAD /v2/<repo>/manifests/<reference>` at `addr`.
pub fn manifest_status(addr: SocketAddr, repo: &str, reference: &str) -> u16 {
    let path = format!("/v2/{repo}/manifests/{reference}");
    http(addr, "HEAD", &path, &[("Accept", MANIFEST_ACCEPT)], &[]).status
}

/// Monolithic blob upload (POST, then PUT `?digest=` with the whole body), as `curl -T`
/// would do it; returns the digest. Panics unless the registry answers 201.
pub fn push_blob(addr: SocketAddr, repo: &str, bytes: &[u8]) -> String {
    let digest = sha256_digest(bytes);
    let start = http(
        addr,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        &[],
    );
    assert_eq!(start.status, 202, "POST upload to {repo}: {}", start.text());
    let location = start
        .header("location")
        .unwrap_or_else(|| panic!("POST upload to {repo}: no Location"));
    // Absolute (distribution 2.8) or relative: keep the path and query only.
    let target = match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]).to_string(),
        None => location.to_string(),
    };
    let separator = if target.contains('?') { '&' } else { '?' };
    let put = http(
        addr,
        "PUT",
        &format!("{target}{separator}digest={digest}"),
        &[("Content-Type", "application/octet-stream")],
        bytes,
    );
    assert_eq!(
        put.status,
        201,
        "PUT blob {digest} to {repo}: {}",
        put.text()
    );
    digest
}

/// A one-config image (no layers) pushed with plain HTTP: enough to make `repo` exist with
/// a tag. Returns (manifest digest, config digest); `seed` makes the config unique.
pub fn push_tiny_image(registry: &Registry, repo: &str, tag: &str, seed: u32) -> (String, String) {
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [] },
        "config": { "Labels": { "seed": seed.to_string() } },
    });
    let config = serde_json::to_vec(&config).expect("serialize config");
    let config_digest = push_blob(registry.addr, repo, &config);
    let manifest = oci_manifest(&config_digest, config.len(), &[]);
    let digest = put_manifest(registry, repo, tag, OCI_MANIFEST, &manifest);
    (digest, config_digest)
}

/// An image over `layers` (raw bytes, pushed as they are) pushed with plain HTTP as
/// `repo:tag`. Returns (manifest digest, layer digests).
pub fn push_image(
    registry: &Registry,
    repo: &str,
    tag: &str,
    layers: &[&[u8]],
) -> (String, Vec<String>) {
    let (manifest, digests) = image_manifest(registry, repo, tag, layers);
    let digest = put_manifest(registry, repo, tag, OCI_MANIFEST, &manifest);
    (digest, digests)
}

/// [`push_image`] without a tag (pushed by digest); `label` makes it unique. Returns
/// (manifest digest, manifest bytes).
pub fn push_untagged_image(
    registry: &Registry,
    repo: &str,
    label: &str,
    layers: &[&[u8]],
) -> (String, Vec<u8>) {
    let (manifest, _) = image_manifest(registry, repo, label, layers);
    let digest = put_manifest(
        registry,
        repo,
        &sha256_digest(&manifest),
        OCI_MANIFEST,
        &manifest,
    );
    (digest, manifest)
}

/// Pushes the blobs of an image (a config labelled `label`, and `layers`); returns the
/// manifest over them, and the layer digests.
fn image_manifest(
    registry: &Registry,
    repo: &str,
    label: &str,
    layers: &[&[u8]],
) -> (Vec<u8>, Vec<String>) {
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [] },
        "config": { "Labels": { "tag": label } },
    });
    let config = serde_json::to_vec(&config).expect("serialize config");
    let config_digest = push_blob(registry.addr, repo, &config);
    let digests: Vec<String> = layers
        .iter()
        .map(|l| push_blob(registry.addr, repo, l))
        .collect();
    let described: Vec<(&str, usize)> = digests
        .iter()
        .zip(layers)
        .map(|(d, l)| (d.as_str(), l.len()))
        .collect();
    (
        oci_manifest(&config_digest, config.len(), &described),
        digests,
    )
}

/// close(2) of a file, with its error (dropping a `File` ignores it): for a file
/// written into a mount, this is the commit.
pub fn close(file: File) -> io::Result<()> {
    use std::os::fd::IntoRawFd;
    let fd = file.into_raw_fd();
    // SAFETY: `fd` was just released by `file`, so it is open and closed exactly once.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The bytes of an OCI image manifest over a config and layers (digest, size).
pub fn oci_manifest(config_digest: &str, config_size: usize, layers: &[(&str, usize)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(digest, size)| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest,
                "size": size,
            })
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers,
    });
    serde_json::to_vec(&manifest).expect("serialize manifest")
}

/// GET a whole blob; panics unless 200.
pub fn get_blob(registry: &Registry, repo: &str, digest: &str) -> Vec<u8> {
    let path = format!("/v2/{repo}/blobs/{digest}");
    let r = http(registry.addr, "GET", &path, &[], &[]);
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r.body
}

/// Every repository in the catalog, following the `Link: <…>; rel="next"` pages
/// (distribution 2.8 refuses `n` > 1000 with 400 PAGINATION_NUMBER_INVALID).
pub fn catalog(registry: &Registry) -> Vec<String> {
    let mut repositories = Vec::new();
    let mut next = Some("/v2/_catalog?n=1000".to_string());
    while let Some(path) = next {
        let (status, headers, body) = http_get(registry.addr, &path);
        assert_eq!(
            status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        repositories.extend(json_strings(&body, "repositories"));
        next = header(&headers, "link").and_then(next_link);
    }
    repositories
}

/// The URL of a `Link: <URL>; rel="next"` header.
pub fn next_link(link: &str) -> Option<String> {
    let (url, params) = link.trim().strip_prefix('<')?.split_once('>')?;
    params.contains("rel=\"next\"").then(|| url.to_string())
}

/// The tags of a repository (distribution 2.8 returns them all, in no particular order).
pub fn tags(registry: &Registry, repo: &str) -> Vec<String> {
    let path = format!("/v2/{repo}/tags/list");
    let (status, _, body) = http_get(registry.addr, &path);
    assert_eq!(
        status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&body)
    );
    json_strings(&body, "tags")
}

/// The strings in array `key` of a JSON object (a null or missing array is empty).
fn json_strings(body: &[u8], key: &str) -> Vec<String> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)));
    value[key]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Images: umoci builds, skopeo pushes
// ---------------------------------------------------------------------------------------------

/// An OCI image layout in a temp dir, where tests build images by tag.
pub struct Layout {
    dir: TempDir,
}

impl Layout {
    pub fn new() -> Layout {
        let dir = tempfile::Builder::new()
            .prefix("regfs-layout-")
            .tempdir()
            .expect("create temp dir for an OCI layout");
        let layout = Layout { dir };
        run(Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(layout.oci_dir()));
        layout
    }

    /// The layout directory (index.json, blobs/).
    pub fn oci_dir(&self) -> PathBuf {
        self.dir.path().join("oci")
    }

    /// A path inside the layout's temp dir (not created), for bundles and such.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.oci_dir().display())
    }

    /// Builds a linux/`arch` image with one layer holding `files` (path in the rootfs, content),
    /// tagged `tag` in the layout.
    pub fn new_image(&self, tag: &str, arch: &str, files: &[(&str, &[u8])]) {
        let image = self.image(tag);
        let bundle = self.dir.path().join(format!("bundle-{tag}"));
        run(Command::new("umoci").args(["new", "--image", &image]));
        run(Command::new("umoci")
            .args(["unpack", "--rootless", "--image", &image])
            .arg(&bundle));
        let rootfs = bundle.join("rootfs");
        for (path, content) in files {
            let target = rootfs.join(path.trim_start_matches('/'));
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)
                    .unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
            }
            fs::write(&target, content)
                .unwrap_or_else(|e| panic!("write {}: {e}", target.display()));
        }
        run(Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle));
        self.set_platform(tag, arch);
        fs::remove_dir_all(&bundle).unwrap_or_else(|e| panic!("remove {}: {e}", bundle.display()));
    }

    /// Makes `tag` a linux/`arch` image. Without --tag, umoci config writes a new
    /// manifest and moves `tag` onto it.
    pub fn set_platform(&self, tag: &str, arch: &str) {
        let image = self.image(tag);
        run(Command::new("umoci").args([
            "config",
            "--image",
            &image,
            "--os",
            "linux",
            "--architecture",
            arch,
        ]));
    }

    /// The descriptor (JSON) of the manifest that `tag` names in index.json.
    pub fn descriptor(&self, tag: &str) -> serde_json::Value {
        let index = self.index_json();
        index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "tag {tag} not in {}",
                    self.oci_dir().join("index.json").display()
                )
            })
    }

    /// Digest of the manifest (or index) that `tag` names.
    pub fn manifest_digest(&self, tag: &str) -> String {
        self.descriptor(tag)["digest"]
            .as_str()
            .expect("descriptor digest is a string")
            .to_string()
    }

    /// Bytes of a blob in the layout.
    pub fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        let path = self.oci_dir().join("blobs/sha256").join(hex);
        fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    fn index_json(&self) -> serde_json::Value {
        let path = self.oci_dir().join("index.json");
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
    }

    /// Pushes `tag` of the layout to `registry` as `dest` ("team/app:v1"), digests unchanged.
    pub fn push(&self, tag: &str, registry: &Registry, dest: &str) {
        self.push_as(tag, registry, dest, None);
    }

    /// [`Layout::push`] with `user:password` credentials (`--dest-creds`).
    pub fn push_as(&self, tag: &str, registry: &Registry, dest: &str, creds: Option<&str>) {
        let mut options = vec!["--preserve-digests", "--dest-tls-verify=false"];
        if let Some(creds) = creds {
            options.extend(["--dest-creds", creds]);
        }
        skopeo_copy(
            &options,
            &format!("oci:{}", self.image(tag)),
            &format!("docker://{}/{dest}", registry.addr),
        );
    }

    /// Writes an OCI image index over the images tagged `tags` (platforms read from their
    /// configs) into the layout as `index_tag`; returns its digest.
    pub fn add_index(&self, index_tag: &str, tags: &[&str]) -> String {
        self.add_index_with(index_tag, tags, &serde_json::Value::Null)
    }

    /// [`Layout::add_index`] with `annotations` (a JSON object; null for none) on the index,
    /// e.g. to give it another digest.
    pub fn add_index_with(
        &self,
        index_tag: &str,
        tags: &[&str],
        annotations: &serde_json::Value,
    ) -> String {
        let manifests: Vec<serde_json::Value> = tags
            .iter()
            .map(|tag| {
                let desc = self.descriptor(tag);
                let digest = desc["digest"].as_str().expect("descriptor digest");
                let manifest: serde_json::Value =
                    serde_json::from_slice(&self.blob(digest)).expect("manifest blob is JSON");
                let config_digest = manifest["config"]["digest"]
                    .as_str()
                    .expect("config digest");
                let config: serde_json::Value =
                    serde_json::from_slice(&self.blob(config_digest)).expect("config blob is JSON");
                serde_json::json!({
                    "mediaType": desc["mediaType"],
                    "digest": desc["digest"],
                    "size": desc["size"],
                    "platform": { "architecture": config["architecture"], "os": config["os"] },
                })
            })
            .collect();
        let mut index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        if !annotations.is_null() {
            index["annotations"] = annotations.clone();
        }
        let bytes = serde_json::to_vec(&index).expect("serialize index");
        let digest = self.write_blob(&bytes);
        self.set_ref(index_tag, OCI_INDEX, &digest, bytes.len());
        digest
    }

    /// Stores bytes as a blob of the layout; returns the digest.
    pub fn write_blob(&self, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let path = self
            .oci_dir()
            .join("blobs/sha256")
            .join(&digest["sha256:".len()..]);
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        digest
    }

    /// Points ref name `tag` of index.json at a descriptor (replacing an older one).
    pub fn set_ref(&self, tag: &str, media_type: &str, digest: &str, size: usize) {
        let mut index = self.index_json();
        let manifests = index["manifests"]
            .as_array_mut()
            .expect("index.json has manifests");
        manifests.retain(|d| d["annotations"]["org.opencontainers.image.ref.name"] != tag);
        manifests.push(serde_json::json!({
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }));
        let path = self.oci_dir().join("index.json");
        let bytes = serde_json::to_vec(&index).expect("serialize index.json");
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Pushes a multi-arch index over the images tagged `tags` as `dest` ("team/app:multi").
    /// The children are pushed by digest only (untagged). Returns the index digest.
    pub fn push_index(&self, tags: &[&str], registry: &Registry, dest: &str) -> String {
        self.push_index_with(tags, registry, dest, &serde_json::Value::Null)
    }

    /// [`Layout::push_index`] with `annotations` on the index (see [`Layout::add_index_with`]).
    pub fn push_index_with(
        &self,
        tags: &[&str],
        registry: &Registry,
        dest: &str,
        annotations: &serde_json::Value,
    ) -> String {
        let index_tag = format!(
            "index-{}",
            dest.replace(|c: char| !c.is_ascii_alphanumeric() && c != '.', "-")
        );
        let digest = self.add_index_with(&index_tag, tags, annotations);
        self.push(&index_tag, registry, dest);
        // skopeo must not have converted it: the registry serves our exact bytes as an index.
        let (repo, reference) = split_reference(dest);
        let (served, media_type, _) = get_manifest(registry, repo, reference);
        assert_eq!(media_type, OCI_INDEX, "{dest} did not land as an OCI index");
        assert_eq!(served, digest, "{dest} was pushed with another digest");
        digest
    }
}

impl Default for Layout {
    fn default() -> Self {
        Layout::new()
    }
}

/// `skopeo inspect --raw docker://<addr>/<reference>`: the manifest bytes as skopeo gets them.
pub fn skopeo_raw_manifest(addr: SocketAddr, reference: &str) -> Vec<u8> {
    run_bytes(Command::new("skopeo").args([
        "--command-timeout",
        "60s",
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{addr}/{reference}"),
    ]))
}

/// `skopeo copy --all [options] src dest`; panics if skopeo fails.
pub fn skopeo_copy(options: &[&str], src: &str, dest: &str) {
    run(Command::new("skopeo")
        .args([
            // The policy is irrelevant here; this also works without /etc/containers/policy.json.
            "--insecure-policy",
            "--command-timeout",
            "120s",
            "copy",
            "--quiet",
            "--all",
        ])
        .args(options)
        .args([src, dest]));
}

/// `skopeo copy --all docker://<addr>/<reference> oci:<dir>:<tag>` (panics if skopeo fails).
pub fn skopeo_copy_to_oci(addr: SocketAddr, reference: &str, dir: &Path, tag: &str) {
    skopeo_copy(
        &["--src-tls-verify=false"],
        &format!("docker://{addr}/{reference}"),
        &format!("oci:{}:{tag}", dir.display()),
    );
}

// ---------------------------------------------------------------------------------------------
// Fault-injecting proxy
// ---------------------------------------------------------------------------------------------

/// Initial rules of a [`Proxy`]; each can be flipped later through the proxy's setters.
#[derive(Debug, Clone, Default)]
pub struct ProxyRules {
    /// `GET /v2/_catalog…` answers 401 UNAUTHORIZED, like most public registries.
    pub refuse_catalog: bool,
    /// Blob downloads (`GET …/blobs/<digest>`) are held until [`Proxy::release_stalls`]
    /// (or 60 s). Upload URLs (`/blobs/uploads/`) are never held.
    pub stall_blob_gets: bool,
    /// Emulates tag-list pagination (`?n=&last=` with a `Link: <…>; rel="next"` header),
    /// which distribution 2.8 ignores: it always returns every tag.
    pub paginate_tags: bool,
    /// The next this-many blob downloads send their headers and half their body, then
    /// the connection is cut (a reset in the middle of a transfer).
    pub cut_blob_gets: usize,
    /// The next this-many blob downloads answer 503 with `Retry-After: 1`.
    pub fail_blob_gets: usize,
    /// The next this-many blob downloads answer 429 Too Many Requests with `Retry-After: 1`.
    pub throttle_blob_gets: usize,
    /// Blob downloads come back with their first byte changed (a corrupting middlebox).
    pub corrupt_blob_gets: bool,
    /// Blob downloads answer `307` to this base URL with the same path and query,
    /// like a registry that sends clients to object storage.
    pub redirect_blob_gets_to: Option<String>,
    /// The next this-many `PATCH` requests (upload chunks) are cut in the middle of their
    /// body: the proxy reads half of it from the client, forwards the head and the first
    /// [`ProxyRules::cut_patch_forward`] body bytes upstream, then drops both connections.
    pub cut_patches: usize,
    /// How many body bytes of a cut `PATCH` reach the registry (0: only the head).
    pub cut_patch_forward: usize,
    /// How many `PATCH` requests go through untouched before [`ProxyRules::cut_patches`]
    /// starts cutting (0: the very first one is cut), so that a cut lands mid-upload.
    pub cut_patch_after: usize,
    /// The next this-many `PATCH` requests answer 503 with `Retry-After: 1`, unforwarded.
    pub fail_patches: usize,
    /// Blob mounts (`POST …/blobs/uploads/?mount=&from=`) are forwarded without their
    /// query, so the registry opens a plain upload session (202): a declined mount.
    pub decline_mounts: bool,
    /// Rewrites the `Location` of upload answers (`/blobs/uploads/`).
    pub upload_locations: Option<LocationRewrite>,
    /// Answer bodies are sent at this many bytes per second (0: at full speed), like a
    /// registry behind a link that barely moves.
    pub trickle_bytes_per_sec: usize,
    /// Rewrites answers, last of all rules: a registry that lies.
    pub tamper: Option<Tamper>,
}

/// A registry that lies: gets each request's method and target ("/v2/…?q") and the
/// answer the registry gave (or the proxy's other rules made), and returns what the
/// client gets instead. A response with header [`ANNOUNCE_LENGTH`] is framed by that
/// length whatever its body, and the connection is closed after it.
#[derive(Clone)]
pub struct Tamper(pub Arc<TamperFn>);

/// (method, target, the registry's answer) → the answer the client gets.
pub type TamperFn = dyn Fn(&str, &str, Response) -> Response + Send + Sync;

/// See [`Tamper`]: announce this Content-Length instead of the body's.
pub const ANNOUNCE_LENGTH: &str = "X-Test-Announce-Length";

impl Tamper {
    pub fn new(f: impl Fn(&str, &str, Response) -> Response + Send + Sync + 'static) -> Tamper {
        Tamper(Arc::new(f))
    }
}

impl std::fmt::Debug for Tamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tamper(..)")
    }
}

/// How [`ProxyRules::upload_locations`] rewrites an upload answer's `Location`.
#[derive(Debug, Clone)]
pub enum LocationRewrite {
    /// Path and query only, as registries may send.
    Relative,
    /// The same path and query on another origin, e.g. "http://127.0.0.2:1".
    OtherOrigin(String),
}

/// A request the proxy saw.
#[derive(Debug, Clone)]
struct Seen {
    /// "GET /v2/team/app/blobs/sha256:…"
    line: String,
    range: Option<String>,
    authorization: bool,
}

#[derive(Default)]
struct StallState {
    /// Bumped by each `release_stalls`; a held request waits for it to change.
    generation: u64,
    held: usize,
}

struct ProxyShared {
    upstream: SocketAddr,
    refuse_catalog: AtomicBool,
    stall_blob_gets: AtomicBool,
    paginate_tags: AtomicBool,
    cut_blob_gets: AtomicUsize,
    fail_blob_gets: AtomicUsize,
    throttle_blob_gets: AtomicUsize,
    corrupt_blob_gets: AtomicBool,
    redirect_blob_gets_to: Option<String>,
    cut_patches: AtomicUsize,
    cut_patch_forward: usize,
    cut_patch_after: AtomicUsize,
    fail_patches: AtomicUsize,
    decline_mounts: AtomicBool,
    upload_locations: Option<LocationRewrite>,
    /// Every request answers 502, as a reverse proxy does when its registry is down.
    upstream_down: AtomicBool,
    /// The registry stops answering: new requests are held, and answers being sent
    /// stop in the middle of their bodies, until turned off (or 60 s).
    stall_all: AtomicBool,
    /// A stall planned at a point of the traffic: how many more body bytes go before
    /// `stall_all` turns itself on, and when it did.
    stall_after: Mutex<Option<u64>>,
    stalled_at: Mutex<Option<Instant>>,
    trickle_bytes_per_sec: AtomicUsize,
    tamper: Option<Tamper>,
    stopping: AtomicBool,
    stall: Mutex<StallState>,
    stall_changed: Condvar,
    seen: Mutex<Vec<Seen>>,
    /// Open client connections, to shut them down when the proxy is dropped.
    clients: Mutex<HashMap<u64, TcpStream>>,
    next_client: AtomicU64,
}

/// An HTTP/1.1 proxy on loopback in front of `upstream` (std threads, one per connection).
/// Requests are forwarded one at a time over a fresh upstream connection each; responses are
/// buffered and re-framed with Content-Length, and client connections are kept alive.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

const STALL_LIMIT: Duration = Duration::from_secs(60);

impl Proxy {
    pub fn start(upstream: SocketAddr, rules: ProxyRules) -> Proxy {
        Proxy::start_on("127.0.0.1", upstream, rules)
    }

    /// A proxy listening on another loopback address (127.0.0.2 is "another host").
    pub fn start_on(ip: &str, upstream: SocketAddr, rules: ProxyRules) -> Proxy {
        let listener = TcpListener::bind((ip, 0)).expect("bind the proxy on loopback");
        let addr = listener.local_addr().expect("proxy local addr");
        let shared = Arc::new(ProxyShared {
            upstream,
            refuse_catalog: AtomicBool::new(rules.refuse_catalog),
            stall_blob_gets: AtomicBool::new(rules.stall_blob_gets),
            paginate_tags: AtomicBool::new(rules.paginate_tags),
            cut_blob_gets: AtomicUsize::new(rules.cut_blob_gets),
            fail_blob_gets: AtomicUsize::new(rules.fail_blob_gets),
            throttle_blob_gets: AtomicUsize::new(rules.throttle_blob_gets),
            corrupt_blob_gets: AtomicBool::new(rules.corrupt_blob_gets),
            redirect_blob_gets_to: rules.redirect_blob_gets_to,
            cut_patches: AtomicUsize::new(rules.cut_patches),
            cut_patch_forward: rules.cut_patch_forward,
            cut_patch_after: AtomicUsize::new(rules.cut_patch_after),
            fail_patches: AtomicUsize::new(rules.fail_patches),
            decline_mounts: AtomicBool::new(rules.decline_mounts),
            upload_locations: rules.upload_locations,
            upstream_down: AtomicBool::new(false),
            stall_all: AtomicBool::new(false),
            stall_after: Mutex::new(None),
            stalled_at: Mutex::new(None),
            trickle_bytes_per_sec: AtomicUsize::new(rules.trickle_bytes_per_sec),
            tamper: rules.tamper,
            stopping: AtomicBool::new(false),
            stall: Mutex::new(StallState::default()),
            stall_changed: Condvar::new(),
            seen: Mutex::new(Vec::new()),
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(0),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("test-proxy-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn proxy accept thread")
        };
        Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// "http://127.0.0.1:PORT" of the proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_refuse_catalog(&self, on: bool) {
        self.shared.refuse_catalog.store(on, Ordering::SeqCst);
    }

    pub fn set_paginate_tags(&self, on: bool) {
        self.shared.paginate_tags.store(on, Ordering::SeqCst);
    }

    /// Turning stalls off also lets the held requests go.
    pub fn set_stall_blob_gets(&self, on: bool) {
        self.shared.stall_blob_gets.store(on, Ordering::SeqCst);
        let _guard = self.shared.stall.lock().expect("proxy stall lock");
        self.shared.stall_changed.notify_all();
    }

    /// Lets every request held so far go on (new blob GETs are still held if the rule is on).
    pub fn release_stalls(&self) {
        let mut stall = self.shared.stall.lock().expect("proxy stall lock");
        stall.generation += 1;
        self.shared.stall_changed.notify_all();
    }

    /// How many requests are held right now.
    pub fn stalled_count(&self) -> usize {
        self.shared.stall.lock().expect("proxy stall lock").held
    }

    /// Waits (bounded) until at least `n` requests are held; false on timeout.
    pub fn wait_stalled(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.stalled_count() < n {
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// How many requests seen so far have `substr` in "METHOD /path?query",
    /// e.g. `requests_matching("GET /v2/team/app/blobs/")` or `requests_matching("/_catalog")`.
    pub fn requests_matching(&self, substr: &str) -> usize {
        let seen = self.shared.seen.lock().expect("proxy log lock");
        seen.iter().filter(|s| s.line.contains(substr)).count()
    }

    /// Every request seen so far, as "METHOD /path?query".
    pub fn requests(&self) -> Vec<String> {
        let seen = self.shared.seen.lock().expect("proxy log lock");
        seen.iter().map(|s| s.line.clone()).collect()
    }

    /// How many requests seen so far carried an `Authorization` header.
    pub fn requests_with_authorization(&self) -> usize {
        let seen = self.shared.seen.lock().expect("proxy log lock");
        seen.iter().filter(|s| s.authorization).count()
    }

    /// The `Range` header values seen so far, in order.
    pub fn ranges_seen(&self) -> Vec<String> {
        let seen = self.shared.seen.lock().expect("proxy log lock");
        seen.iter().filter_map(|s| s.range.clone()).collect()
    }

    /// How many of the `fail_blob_gets` / `cut_blob_gets` / `fail_patches` /
    /// `cut_patches` faults are still to come.
    pub fn faults_left(&self) -> usize {
        self.shared.fail_blob_gets.load(Ordering::SeqCst)
            + self.shared.throttle_blob_gets.load(Ordering::SeqCst)
            + self.shared.cut_blob_gets.load(Ordering::SeqCst)
            + self.shared.fail_patches.load(Ordering::SeqCst)
            + self.shared.cut_patches.load(Ordering::SeqCst)
    }

    /// While on, every request answers 502 Bad Gateway without reaching the registry.
    pub fn set_upstream_down(&self, on: bool) {
        self.shared.upstream_down.store(on, Ordering::SeqCst);
    }

    /// While on, the registry stops answering altogether: requests are held and bodies
    /// being sent stop where they are (a registry that hangs mid-transfer). Off lets
    /// everything go on.
    pub fn set_stall_all(&self, on: bool) {
        self.shared.stall_all.store(on, Ordering::SeqCst);
    }

    /// Stalls as [`Proxy::set_stall_all`] does once `bytes` more bytes of answer bodies
    /// have been sent: a registry that hangs at a known point of a transfer, however
    /// fast the client happens to read. [`Proxy::stalled_at`] says when.
    pub fn stall_after_bytes(&self, bytes: u64) {
        *self.shared.stalled_at.lock().expect("stall lock") = None;
        *self.shared.stall_after.lock().expect("stall lock") = Some(bytes);
    }

    /// When the stall planned by [`Proxy::stall_after_bytes`] began.
    pub fn stalled_at(&self) -> Option<Instant> {
        *self.shared.stalled_at.lock().expect("stall lock")
    }

    /// Bodies from now on go at this many bytes per second (0: full speed).
    pub fn set_trickle(&self, bytes_per_sec: usize) {
        self.shared
            .trickle_bytes_per_sec
            .store(bytes_per_sec, Ordering::SeqCst);
    }

    pub fn set_corrupt_blob_gets(&self, on: bool) {
        self.shared.corrupt_blob_gets.store(on, Ordering::SeqCst);
    }

    /// Forgets the requests seen so far.
    pub fn reset_counters(&self) {
        self.shared.seen.lock().expect("proxy log lock").clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.stall.lock();
            self.shared.stall_changed.notify_all();
        }
        // Unblock accept() with a connection of our own, then end the client connections.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        if let Ok(clients) = self.shared.clients.lock() {
            for stream in clients.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<ProxyShared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let id = shared.next_client.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = stream.try_clone() {
            shared
                .clients
                .lock()
                .expect("proxy clients lock")
                .insert(id, clone);
        }
        let shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name(format!("test-proxy-conn-{id}"))
            .spawn(move || {
                serve_client(&shared, stream);
                shared
                    .clients
                    .lock()
                    .expect("proxy clients lock")
                    .remove(&id);
            });
        if spawned.is_err() {
            eprintln!("test proxy: cannot spawn a connection thread");
        }
    }
}

/// A request as read from the client.
struct Request {
    method: String,
    target: String,
    headers: Headers,
    body: Vec<u8>,
}

fn read_request(r: &mut impl BufRead) -> io::Result<Option<Request>> {
    let Some(mut request) = read_request_head(r)? else {
        return Ok(None);
    };
    request.body = read_body(r, &request.headers, false)?;
    Ok(Some(request))
}

/// A request's line and headers; its body (still unread) is left empty.
fn read_request_head(r: &mut impl BufRead) -> io::Result<Option<Request>> {
    let Some((start, headers)) = read_head(r)? else {
        return Ok(None);
    };
    let mut parts = start.split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad request line {start:?}"),
        ));
    };
    let version = parts.next().unwrap_or("HTTP/1.0");
    let mut headers = headers;
    if version == "HTTP/1.0" && header(&headers, "connection").is_none() {
        headers.push(("Connection".into(), "close".into()));
    }
    Ok(Some(Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        body: Vec::new(),
    }))
}

fn serve_client(shared: &ProxyShared, client: TcpStream) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(120)));
    let _ = client.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(read_half) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = client;
    while !shared.stopping.load(Ordering::SeqCst) {
        let mut request = match read_request_head(&mut reader) {
            Ok(Some(request)) => request,
            Ok(None) | Err(_) => return,
        };
        shared.seen.lock().expect("proxy log lock").push(Seen {
            line: format!("{} {}", request.method, request.target),
            range: header(&request.headers, "range").map(String::from),
            authorization: header(&request.headers, "authorization").is_some(),
        });
        if request.method == "PATCH"
            && !take_one(&shared.cut_patch_after)
            && take_one(&shared.cut_patches)
        {
            cut_request(shared, &request, &mut reader);
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
        request.body = match read_body(&mut reader, &request.headers, false) {
            Ok(body) => body,
            Err(_) => return,
        };
        let close =
            header(&request.headers, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let mut response = handle(shared, &request);
        if let Some(tamper) = &shared.tamper {
            response = (tamper.0)(&request.method, &request.target, response);
        }
        let close = close || response.header(ANNOUNCE_LENGTH).is_some();
        if is_blob_get(&request) && response.status / 100 == 2 {
            if take_one(&shared.cut_blob_gets) {
                let full = response.body.len();
                response.body.truncate(full / 2);
                // Announce the full length, send half, hang up: a reset mid-transfer.
                let _ = write_cut_response(&mut writer, &response, full);
                let _ = writer.shutdown(Shutdown::Both);
                return;
            }
            if shared.corrupt_blob_gets.load(Ordering::SeqCst)
                && let Some(first) = response.body.first_mut()
            {
                *first ^= 0xff;
            }
        }
        let head = request.method == "HEAD";
        if write_response_paced(Some(shared), &mut writer, &response, head, close).is_err() || close
        {
            return;
        }
    }
}

fn is_blob_get(request: &Request) -> bool {
    let path = request.target.split('?').next().unwrap_or("");
    request.method == "GET" && path.contains("/blobs/") && !path.contains("/blobs/uploads/")
}

/// Decrements `counter` if it is above zero; true if it did.
fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// Headers announcing `full` bytes, then only the bytes in `response.body`.
fn write_cut_response(w: &mut impl Write, response: &Response, full: usize) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", response.status, response.reason);
    push_headers(
        &mut out,
        &response.headers,
        &["connection", "transfer-encoding", "content-length"],
    );
    out.push_str(&format!("Content-Length: {full}\r\n\r\n"));
    w.write_all(out.as_bytes())?;
    w.write_all(&response.body)?;
    w.flush()
}

fn handle(shared: &ProxyShared, request: &Request) -> Response {
    let path = request.target.split('?').next().unwrap_or("");
    let get = request.method == "GET";
    wait_while_stalled(shared);
    if shared.upstream_down.load(Ordering::SeqCst) {
        return json_response(
            502,
            "Bad Gateway",
            br#"{"errors":[{"code":"UNAVAILABLE","message":"test proxy: registry is down"}]}"#,
        );
    }
    if path.contains("/blobs/uploads/") {
        return handle_upload(shared, request, path);
    }
    if is_blob_get(request) {
        if let Some(base) = &shared.redirect_blob_gets_to {
            let mut response = json_response(307, "Temporary Redirect", b"");
            response
                .headers
                .push(("Location".into(), format!("{base}{}", request.target)));
            return response;
        }
        if take_one(&shared.fail_blob_gets) {
            return come_back_later();
        }
        if take_one(&shared.throttle_blob_gets) {
            let mut response = json_response(
                429,
                "Too Many Requests",
                br#"{"errors":[{"code":"TOOMANYREQUESTS","message":"test proxy says slow down"}]}"#,
            );
            response.headers.push(("Retry-After".into(), "1".into()));
            return response;
        }
    }
    if get && path.starts_with("/v2/_catalog") && shared.refuse_catalog.load(Ordering::SeqCst) {
        return json_response(
            401,
            "Unauthorized",
            br#"{"errors":[{"code":"UNAUTHORIZED","message":"catalog refused by test proxy"}]}"#,
        );
    }
    if get
        && path.contains("/blobs/")
        && !path.contains("/blobs/uploads/")
        && shared.stall_blob_gets.load(Ordering::SeqCst)
    {
        hold(shared);
    }
    if get && path.ends_with("/tags/list") && shared.paginate_tags.load(Ordering::SeqCst) {
        return paginated_tags(shared, request, path);
    }
    forward(shared, request, &request.target)
}

/// Requests under `/blobs/uploads/`: the upload faults and rewrites.
fn handle_upload(shared: &ProxyShared, request: &Request, path: &str) -> Response {
    if request.method == "PATCH" && take_one(&shared.fail_patches) {
        return come_back_later();
    }
    let is_mount = request.method == "POST" && request.target.contains("mount=");
    let target = if is_mount && shared.decline_mounts.load(Ordering::SeqCst) {
        path
    } else {
        &request.target
    };
    let mut response = forward(shared, request, target);
    if let Some(rewrite) = &shared.upload_locations {
        for (name, value) in &mut response.headers {
            if name.eq_ignore_ascii_case("location") {
                *value = rewrite_location(value, rewrite);
            }
        }
    }
    response
}

/// `http://host:port/v2/…?q` → `/v2/…?q`, or the same on another origin.
fn rewrite_location(location: &str, rewrite: &LocationRewrite) -> String {
    let path_and_query = match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => location,
    };
    match rewrite {
        LocationRewrite::Relative => path_and_query.to_string(),
        LocationRewrite::OtherOrigin(origin) => format!("{origin}{path_and_query}"),
    }
}

/// Blocks until `release_stalls`, the rule is turned off, the proxy stops, or 60 s.
fn hold(shared: &ProxyShared) {
    let deadline = Instant::now() + STALL_LIMIT;
    let mut stall = shared.stall.lock().expect("proxy stall lock");
    let generation = stall.generation;
    stall.held += 1;
    while stall.generation == generation
        && shared.stall_blob_gets.load(Ordering::SeqCst)
        && !shared.stopping.load(Ordering::SeqCst)
    {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        stall = shared
            .stall_changed
            .wait_timeout(stall, deadline - now)
            .expect("proxy stall lock")
            .0;
    }
    stall.held -= 1;
}

/// 503 with `Retry-After: 1`, as a registry under load answers.
fn come_back_later() -> Response {
    let mut response = json_response(
        503,
        "Service Unavailable",
        br#"{"errors":[{"code":"UNAVAILABLE","message":"test proxy says come back later"}]}"#,
    );
    response.headers.push(("Retry-After".into(), "1".into()));
    response
}

fn json_response(status: u16, reason: &str, body: &[u8]) -> Response {
    Response {
        status,
        reason: reason.to_string(),
        headers: vec![
            (
                "Content-Type".into(),
                "application/json; charset=utf-8".into(),
            ),
            (
                "Docker-Distribution-Api-Version".into(),
                "registry/2.0".into(),
            ),
        ],
        body: body.to_vec(),
    }
}

/// Appends `name: value` lines for the headers not named in `skip` (framing the proxy
/// redoes itself).
fn push_headers(out: &mut String, headers: &[(String, String)], skip: &[&str]) {
    for (name, value) in headers {
        if !skip.iter().any(|h| name.eq_ignore_ascii_case(h)) {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
    }
}

/// The head of `request` as sent upstream: hop-by-hop headers dropped, the body framed by
/// a Content-Length of `body_len`, and `Connection: close`.
fn upstream_head(request: &Request, target: &str, body_len: usize) -> String {
    let mut head = format!("{} {target} HTTP/1.1\r\n", request.method);
    push_headers(
        &mut head,
        &request.headers,
        &[
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "content-length",
        ],
    );
    if body_len > 0 || method_has_body(&request.method) {
        head.push_str(&format!("Content-Length: {body_len}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    head
}

/// The `cut_patches` fault: reads half of the request's body from the client, sends the
/// head (announcing the whole body) and the first `cut_patch_forward` bytes upstream, then
/// hangs up on the registry. The caller then hangs up on the client.
fn cut_request(shared: &ProxyShared, request: &Request, client: &mut impl BufRead) {
    let announced: usize = header(&request.headers, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut half = vec![0; announced / 2];
    if client.read_exact(&mut half).is_err() {
        return;
    }
    let forwarded = &half[..shared.cut_patch_forward.min(half.len())];
    if let Ok(mut upstream) = connect(shared.upstream) {
        let head = upstream_head(request, &request.target, announced);
        let _ = upstream.write_all(head.as_bytes());
        let _ = upstream.write_all(forwarded);
        let _ = upstream.flush();
        // Let the registry read what was sent before the connection goes.
        thread::sleep(Duration::from_millis(100));
        let _ = upstream.shutdown(Shutdown::Both);
    }
}

/// Sends the request upstream on a fresh connection and reads the whole answer; 502 on failure.
fn forward(shared: &ProxyShared, request: &Request, target: &str) -> Response {
    let attempt = || -> io::Result<Response> {
        let mut upstream = connect(shared.upstream)?;
        let head = upstream_head(request, target, request.body.len());
        upstream.write_all(head.as_bytes())?;
        upstream.write_all(&request.body)?;
        read_response(&mut BufReader::new(upstream), request.method == "HEAD")
    };
    attempt().unwrap_or_else(|e| Response {
        status: 502,
        reason: "Bad Gateway".into(),
        headers: vec![("Content-Type".into(), "text/plain".into())],
        body: format!("test proxy: upstream {} failed: {e}", shared.upstream).into_bytes(),
    })
}

/// Tag-list pagination done by the proxy: all tags from upstream, sorted, `last` excluded,
/// `n` kept, and a Link header in the format distribution uses for the catalog.
fn paginated_tags(shared: &ProxyShared, request: &Request, path: &str) -> Response {
    let query = request.target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let param = |key: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    };
    let Some(n) = param("n").and_then(|n| n.parse::<usize>().ok()) else {
        return forward(shared, request, &request.target);
    };
    let last = param("last");
    let mut response = forward(shared, request, path);
    if response.status != 200 {
        return response;
    }
    let Ok(mut list) = serde_json::from_slice::<serde_json::Value>(&response.body) else {
        return response;
    };
    let mut tags: Vec<String> = json_strings(&response.body, "tags");
    tags.sort();
    let after: Vec<String> = tags
        .into_iter()
        .filter(|t| last.as_ref().is_none_or(|l| t.as_str() > l.as_str()))
        .collect();
    let page: Vec<String> = after.iter().take(n).cloned().collect();
    response
        .headers
        .retain(|(k, _)| !k.eq_ignore_ascii_case("link"));
    if after.len() > n
        && let Some(last_of_page) = page.last()
    {
        response.headers.push((
            "Link".into(),
            format!("<{path}?last={last_of_page}&n={n}>; rel=\"next\""),
        ));
    }
    list["tags"] = serde_json::json!(page);
    response.body = serde_json::to_vec(&list).expect("serialize tag list");
    response
}

/// While `stall_all` is on (at most [`STALL_LIMIT`]), waits.
fn wait_while_stalled(shared: &ProxyShared) {
    let deadline = Instant::now() + STALL_LIMIT;
    while shared.stall_all.load(Ordering::SeqCst)
        && !shared.stopping.load(Ordering::SeqCst)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(10));
    }
}

/// How many of `want` body bytes may be sent now: all, unless a stall is planned
/// ([`Proxy::stall_after_bytes`]); when the planned bytes are spent, the stall begins
/// (a piece already past the wait of another connection may still go).
fn take_before_stall(shared: &ProxyShared, want: usize) -> usize {
    let mut left = shared.stall_after.lock().expect("stall lock");
    match *left {
        None => want,
        Some(0) => {
            *left = None;
            shared.stall_all.store(true, Ordering::SeqCst);
            *shared.stalled_at.lock().expect("stall lock") = Some(Instant::now());
            0
        }
        Some(n) => {
            let take = want.min(usize::try_from(n).unwrap_or(usize::MAX));
            *left = Some(n - take as u64);
            take
        }
    }
}

/// Writes a body in pieces, pausing while the registry stalls and pacing it when it
/// trickles.
fn write_body(shared: &ProxyShared, w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let mut rest = body;
    while !rest.is_empty() {
        wait_while_stalled(shared);
        let rate = shared.trickle_bytes_per_sec.load(Ordering::SeqCst);
        // Ten pieces a second when trickling; 64 KiB at a time otherwise.
        let piece = if rate > 0 {
            (rate / 10).max(1)
        } else {
            64 << 10
        };
        let take = take_before_stall(shared, piece.min(rest.len()));
        if take == 0 {
            // The planned stall has begun: wait at the top.
            continue;
        }
        let (now, later) = rest.split_at(take);
        w.write_all(now)?;
        w.flush()?;
        rest = later;
        if rate > 0 {
            thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Writes a buffered response, framed by Content-Length (HEAD keeps the upstream's).
fn write_response(
    w: &mut impl Write,
    response: &Response,
    head_request: bool,
    close: bool,
) -> io::Result<()> {
    write_response_paced(None, w, response, head_request, close)
}

/// [`write_response`], the body paced by the proxy's stall and trickle rules.
fn write_response_paced(
    shared: Option<&ProxyShared>,
    w: &mut impl Write,
    response: &Response,
    head_request: bool,
    close: bool,
) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", response.status, response.reason);
    push_headers(
        &mut out,
        &response.headers,
        &[
            "connection",
            "keep-alive",
            "transfer-encoding",
            "content-length",
            ANNOUNCE_LENGTH,
        ],
    );
    let bodiless_status = response.status < 200 || response.status == 204 || response.status == 304;
    if let Some(announced) = response.header(ANNOUNCE_LENGTH) {
        out.push_str(&format!("Content-Length: {announced}\r\n"));
    } else if head_request {
        if let Some(len) = response.header("content-length") {
            out.push_str(&format!("Content-Length: {len}\r\n"));
        }
    } else if !bodiless_status {
        out.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    w.write_all(out.as_bytes())?;
    if !head_request && !bodiless_status {
        match shared {
            Some(shared) => write_body(shared, w, &response.body)?,
            None => w.write_all(&response.body)?,
        }
    }
    w.flush()
}

// ---------------------------------------------------------------------------------------------
// regfs mount
// ---------------------------------------------------------------------------------------------

/// `regfs mount` running in the foreground on a temp mountpoint, stopped on drop.
pub struct Mount {
    /// The mountpoint (canonical path, as /proc/self/mountinfo shows it).
    pub dir: PathBuf,
    tmp: Option<TempDir>,
    child: Option<Child>,
    log_path: PathBuf,
}

/// What [`Mount::start_with`] gives the regfs process besides its arguments.
#[derive(Debug, Clone, Default)]
pub struct MountInput {
    /// Written to its stdin (then closed), e.g. the password for `--password-stdin`.
    pub stdin: Option<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl Mount {
    /// Runs `regfs mount [extra_args] REGISTRY_URL MOUNTPOINT` and waits until it is mounted.
    pub fn start(registry_url: &str, extra_args: &[&str]) -> Mount {
        Mount::start_with(registry_url, extra_args, &MountInput::default())
            .unwrap_or_else(|failure| panic!("{failure}"))
    }

    /// Like [`Mount::start`], with stdin and environment; `Err` (with the log) when regfs
    /// exits without mounting.
    pub fn start_with(
        registry_url: &str,
        extra_args: &[&str],
        input: &MountInput,
    ) -> Result<Mount, String> {
        let tmp = tempfile::Builder::new()
            .prefix("regfs-mount-")
            .tempdir()
            .expect("create temp dir for a mount");
        // Canonical before mounting: afterwards a stat would go through FUSE.
        let root = tmp.path().canonicalize().expect("canonicalize temp dir");
        let dir = root.join("mnt");
        fs::create_dir(&dir).expect("create mountpoint");
        let log_path = root.join("regfs.log");
        Mount::spawn(Some(tmp), dir, log_path, registry_url, extra_args, input)
    }

    /// Another `regfs mount` on the directory of `self` (whose regfs has exited or was
    /// killed), logging to `<dir>/../regfs-<n>.log`. The directory stays `self`'s.
    pub fn start_again(&self, registry_url: &str, extra_args: &[&str]) -> Result<Mount, String> {
        let parent = self.dir.parent().expect("mountpoint has a parent");
        let n = fs::read_dir(parent).map_or(0, |d| d.count());
        let log_path = parent.join(format!("regfs-{n}.log"));
        Mount::spawn(
            None,
            self.dir.clone(),
            log_path,
            registry_url,
            extra_args,
            &MountInput::default(),
        )
    }

    fn spawn(
        tmp: Option<TempDir>,
        dir: PathBuf,
        log_path: PathBuf,
        registry_url: &str,
        extra_args: &[&str],
        input: &MountInput,
    ) -> Result<Mount, String> {
        let log = File::create(&log_path).expect("create regfs log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regfs"));
        cmd.arg("mount").args(extra_args);
        // Every mount gets a disk cache of its own unless the test says otherwise, so
        // tests never share one (nor use the machine's).
        if !extra_args
            .iter()
            .any(|a| *a == "--cache-dir" || *a == "--no-disk-cache")
        {
            // Next to the mountpoint: a mount started again there finds it, as a
            // restarted daemon does.
            let root = dir.parent().expect("mountpoint has a parent");
            cmd.arg("--cache-dir").arg(root.join("cache"));
        }
        cmd.arg(registry_url)
            .arg(&dir)
            .env("RUST_LOG", "regfs=debug")
            .envs(input.env.iter().map(|(k, v)| (k, v)))
            .stdin(if input.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(log.try_clone().expect("clone log file handle"))
            .stderr(log);
        // SIGTERM, not SIGKILL: regfs unmounts on SIGTERM.
        die_with_parent(&mut cmd, libc::SIGTERM);
        let mut child = cmd.spawn().expect("spawn the regfs binary");
        if let (Some(text), Some(mut stdin)) = (&input.stdin, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).expect("write regfs stdin");
        }
        let mut mount = Mount {
            dir,
            tmp,
            child: Some(child),
            log_path,
        };

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        // Mounted and answering: a dead mount left at the directory is listed in
        // mountinfo too, but fails with ENOTCONN until regfs has replaced it. The stats
        // file asks the daemon every time (no cached attributes) and not the registry.
        let answers = |dir: &Path| fs::metadata(dir.join(".regfs/stats")).is_ok();
        while !(is_mounted(&mount.dir) && answers(&mount.dir)) {
            let child = mount.child.as_mut().expect("child present while starting");
            let failure = match child.try_wait() {
                Ok(Some(status)) => Some(format!("regfs exited with {status} before mounting")),
                _ if Instant::now() > deadline => {
                    Some(format!("regfs did not mount within {STARTUP_TIMEOUT:?}"))
                }
                _ => None,
            };
            if let Some(failure) = failure {
                // Clean up before reporting, so that Drop does not print the log a second time.
                let (dir, log) = (mount.dir.clone(), mount.log());
                drop(mount);
                return Err(format!("{failure} {}:\n{log}", dir.display()));
            }
            thread::sleep(POLL);
        }
        Ok(mount)
    }

    /// `/.regfs/stats`, parsed.
    pub fn stats(&self) -> serde_json::Value {
        let path = self.dir.join(".regfs/stats");
        let text = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_slice(&text).expect("/.regfs/stats is JSON")
    }

    /// A path inside the mount: `mount.path("team/app/tags/v1/manifest.json")`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel.trim_start_matches('/'))
    }

    /// What regfs logged so far (stdout and stderr, RUST_LOG=regfs=debug).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL: the daemon dies without unmounting (as after a crash or the OOM
    /// killer). Waits for it to be gone.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        send_signal(child, libc::SIGKILL);
        wait_timeout(child, STARTUP_TIMEOUT)
    }

    /// The processes regfs started (e.g. fusermount3 watching the mount).
    pub fn children(&self) -> Vec<u32> {
        let pid = self.pid();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&p| {
                // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
                fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                    stat.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                        == Some(pid)
                })
            })
            .collect()
    }

    /// Waits (bounded) for regfs to exit by itself, e.g. after `fusermount3 -u`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_timeout(self.child.as_mut()?, timeout)
    }

    /// SIGTERM, then waits up to 20 s for regfs to unmount and exit; then cleans up by force.
    pub fn terminate(mut self) -> ExitStatus {
        let (status, left_mounted) = self.stop();
        if left_mounted {
            eprintln!(
                "regfs exited ({status}) but left {} mounted; unmounted lazily",
                self.dir.display()
            );
        }
        status
    }

    /// Like [`Mount::terminate`], and also tells whether regfs left its mount behind
    /// (the harness unmounts it anyway).
    pub fn terminate_checked(mut self) -> (ExitStatus, bool) {
        self.stop()
    }

    fn stop(&mut self) -> (ExitStatus, bool) {
        let Some(mut child) = self.child.take() else {
            return (ExitStatus::from_raw(0), false);
        };
        let status = match child.try_wait() {
            Ok(Some(status)) => status,
            _ => {
                send_signal(&child, libc::SIGTERM);
                wait_timeout(&mut child, STARTUP_TIMEOUT).unwrap_or_else(|| {
                    eprintln!("regfs ignored SIGTERM for {STARTUP_TIMEOUT:?}; killing it");
                    let _ = child.kill();
                    child.wait().expect("wait for killed regfs")
                })
            }
        };
        let left_mounted = is_mounted(&self.dir);
        if left_mounted {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        (status, left_mounted)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!("--- regfs log ({}) ---\n{}", self.dir.display(), self.log());
        }
        // Never let TempDir's cleanup walk into a mount that is still there: it would try to
        // delete a registry's content. Leak the directory instead.
        if is_mounted(&self.dir)
            && let Some(tmp) = self.tmp.take()
        {
            std::mem::forget(tmp);
        }
    }
}

/// Sorted names in a directory (of a mount, typically).
pub fn ls(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(path)
        .unwrap_or_else(|e| panic!("ls {}: {e}", path.display()))
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .into_string()
                .expect("UTF-8 name")
        })
        .collect();
    names.sort();
    names
}

/// A field of `/proc/<pid>/status` in KiB, e.g. `proc_status_kib(pid, "VmHWM")`.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// Samples a process's resident set (`VmRSS`) every 50 ms on a thread until stopped.
pub struct RssSampler {
    pid: u32,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(usize, u64)>>,
}

/// What an [`RssSampler`] saw.
#[derive(Debug, Clone, Copy)]
pub struct RssPeak {
    /// How many samples were taken.
    pub samples: usize,
    /// The largest `VmRSS` sampled, KiB.
    pub max_rss_kib: u64,
    /// `VmHWM` (the kernel's own peak RSS over the process's life) when stopped, KiB.
    pub hwm_kib: u64,
}

impl RssPeak {
    /// The larger of the two peaks, in MiB.
    pub fn peak_mib(&self) -> u64 {
        self.max_rss_kib.max(self.hwm_kib) / 1024
    }
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name("test-rss-sampler".into())
                .spawn(move || {
                    let (mut samples, mut max) = (0, 0);
                    while !stop.load(Ordering::SeqCst) {
                        if let Some(rss) = proc_status_kib(pid, "VmRSS") {
                            samples += 1;
                            max = max.max(rss);
                        }
                        thread::sleep(POLL);
                    }
                    (samples, max)
                })
                .expect("spawn the RSS sampler")
        };
        RssSampler {
            pid,
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) -> RssPeak {
        self.stop.store(true, Ordering::SeqCst);
        let (samples, max_rss_kib) = self
            .thread
            .take()
            .expect("sampler thread present")
            .join()
            .expect("RSS sampler thread panicked");
        RssPeak {
            samples,
            max_rss_kib,
            hwm_kib: proc_status_kib(self.pid, "VmHWM").unwrap_or(0),
        }
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Whether a FUSE filesystem is mounted exactly at `path` (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    mountinfo.lines().any(|line| {
        // "36 35 0:45 / /tmp/x\040y rw,relatime shared:1 - fuse.regfs regfs rw,…"
        let Some((before, after)) = line.split_once(" - ") else {
            return false;
        };
        let mount_point = before
            .split(' ')
            .nth(4)
            .map(regfs::mount::unescape_mountinfo);
        let fs_type = after.split(' ').next().unwrap_or("");
        fs_type.starts_with("fuse") && mount_point.is_some_and(|p| Path::new(&p) == path)
    })
}

// ---------------------------------------------------------------------------------------------

/// A layer blob in the registry, with its bytes as the registry serves them.
pub struct Layer {
    pub repo: String,
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Layer {
    pub fn path(&self, mnt: &Mount) -> PathBuf {
        mnt.path(&format!("{}/blobs/{}", self.repo, self.digest))
    }

    /// Reads the whole blob through the mount and checks the bytes.
    pub fn read_through(&self, mnt: &Mount) {
        let got = fs::read(self.path(mnt)).expect("read blob through the mount");
        assert!(
            got == self.bytes,
            "{}: wrong bytes through the mount",
            self.digest
        );
    }
}

/// Pushes one image per `(repo, size, seed)` whose only layer holds that much noise.
pub fn layers(registry: &Registry, specs: &[(&str, usize, u32)]) -> Vec<Layer> {
    let layout = Layout::new();
    specs
        .iter()
        .map(|&(repo, size, seed)| {
            let tag = format!("img{seed}");
            layout.new_image(&tag, "amd64", &[("noise.bin", &noise(size, seed))]);
            layout.push(&tag, registry, &format!("{repo}:v1"));
            let (_, _, manifest) = get_manifest(registry, repo, "v1");
            let json: serde_json::Value = serde_json::from_slice(&manifest).expect("JSON");
            let digest = json["layers"][0]["digest"]
                .as_str()
                .expect("digest")
                .to_owned();
            let bytes = get_blob(registry, repo, &digest);
            Layer {
                repo: repo.to_owned(),
                digest,
                bytes,
            }
        })
        .collect()
}

/// A number in `/.regfs/stats`, by its path of keys.
pub fn stat(mnt: &Mount, key: &[&str]) -> u64 {
    let mut v = mnt.stats();
    for k in key {
        v = v[*k].clone();
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("stats {key:?} missing: {}", mnt.stats()))
}
