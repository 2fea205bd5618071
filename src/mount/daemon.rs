//! `--daemon`: detach from the terminal, but only after the mount is ready, so the
//! exit status of `regfs mount --daemon` tells whether the mount worked.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;

use nix::fcntl::OFlag;
use nix::unistd::{ForkResult, fork, pipe2, setsid};

/// Tells whoever waits for the mount how it went: the parent of a daemon through a
/// pipe, or nobody when running in the foreground.
pub struct Readiness {
    pipe: Option<OwnedFd>,
}

impl Readiness {
    pub fn foreground() -> Readiness {
        Readiness { pipe: None }
    }

    /// Whether this process was detached by `--daemon`.
    pub fn is_daemon(&self) -> bool {
        self.pipe.is_some()
    }

    /// The mount works. A daemon also lets go of the caller's stdout and stderr here:
    /// `out=$(regfs mount --daemon ...)` or a supervisor reading the pipes would otherwise
    /// wait for as long as the mount lives. Logs meant to outlive this go to `--log-file`.
    pub fn ready(self) {
        let daemon = self.pipe.is_some();
        if !daemon {
            notify_systemd();
        }
        self.send(b"ok");
        if daemon && let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(&null);
            let _ = nix::unistd::dup2_stderr(&null);
        }
    }

    /// The mount could not be made. A daemon hands `msg` to its waiting parent, which
    /// prints it, and exits quietly so the message appears once; in the foreground this
    /// returns and the caller reports the error itself.
    pub fn failed(self, msg: &str) {
        if self.pipe.is_some() {
            self.send(msg.as_bytes());
            std::process::exit(1);
        }
    }

    /// One line: the parent reads up to its end, not to the end of the pipe (the
    /// watchdog, a fork of this process, holds the pipe open for the mount's life).
    fn send(self, msg: &[u8]) {
        if let Some(fd) = self.pipe {
            let mut line: Vec<u8> = msg
                .iter()
                .map(|&b| if b == b'\n' { b' ' } else { b })
                .collect();
            line.push(b'\n');
            // If the parent is gone there is nobody left to tell.
            let _ = std::fs::File::from(fd).write_all(&line);
        }
    }
}

/// Under systemd (`Type=notify`, `NOTIFY_SOCKET` set): the service is up. Nothing
/// otherwise, or if the socket cannot be reached (the mount works all the same).
fn notify_systemd() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(std::path::Path::new(&path)),
    };
    let sent = UnixDatagram::unbound().and_then(|s| {
        let addr = addr?;
        s.send_to_addr(b"READY=1", &addr)
    });
    if let Err(e) = sent {
        tracing::warn!("cannot tell systemd the mount is ready (NOTIFY_SOCKET): {e}");
    }
}

/// Forks. The parent waits for the child's word and exits with it (0 when mounted,
/// 1 with the child's message otherwise); only the child returns. Must be called
/// before any thread is started.
pub fn detach() -> Result<Readiness, String> {
    // Close-on-exec: no program the daemon starts may hold the parent's pipe open.
    let (read_end, write_end) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("cannot create a pipe: {e}"))?;
    // SAFETY: no other thread exists yet (the caller's contract), so the child owns a
    // consistent copy of the process.
    match unsafe { fork() }.map_err(|e| format!("cannot fork: {e}"))? {
        ForkResult::Parent { .. } => {
            drop(write_end);
            let mut word = String::new();
            let _ = BufReader::new(std::fs::File::from(read_end)).read_line(&mut word);
            match word.trim_end_matches('\n') {
                "ok" => std::process::exit(0),
                "" => {
                    eprintln!("regfs: the mount daemon exited before the mount was ready");
                    std::process::exit(1)
                }
                msg => {
                    eprintln!("regfs: {msg}");
                    std::process::exit(1)
                }
            }
        }
        ForkResult::Child => {
            drop(read_end);
            // A session of its own: closing the terminal does not hang up the mount.
            let _ = setsid();
            // Nothing reads stdin; stdout/stderr are let go once the mount is ready.
            if let Ok(null) = std::fs::File::open("/dev/null") {
                let _ = nix::unistd::dup2_stdin(null);
            }
            Ok(Readiness {
                pipe: Some(write_end),
            })
        }
    }
}
