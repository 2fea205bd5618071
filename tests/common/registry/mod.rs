//! `docker-registry` (CNCF distribution 2.8, Debian's package) as the tests run it: on a
//! free loopback port with a temp storage directory, killed on drop; [`api`] talks to it
//! with plain HTTP as any client would; [`pull_through`] puts one in `proxy:` mode in
//! front of another.

pub mod api;
pub mod pull_through;

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Instant;

use tempfile::TempDir;

use super::http::try_http;
use super::process::{POLL, STARTUP_TIMEOUT, die_with_parent};

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
