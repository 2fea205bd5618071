//! `--daemon`: detach from the terminal, but only after the mount is ready, so the
//! exit status of `regfs mount --daemon` tells whether the mount worked.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use nix::unistd::{ForkResult, fork, pipe, setsid};

/// Tells whoever waits for the mount how it went: the parent of a daemon through a
/// pipe, or nobody when running in the foreground.
pub struct Readiness {
    pipe: Option<OwnedFd>,
}

impl Readiness {
    pub fn foreground() -> Readiness {
        Readiness { pipe: None }
    }

    pub fn ready(self) {
        self.send(b"ok");
    }

    pub fn failed(self, msg: &str) {
        self.send(msg.as_bytes());
    }

    fn send(self, msg: &[u8]) {
        if let Some(fd) = self.pipe {
            // If the parent is gone there is nobody left to tell.
            let _ = std::fs::File::from(fd).write_all(msg);
        }
    }
}

/// Forks. The parent waits for the child's word and exits with it (0 when mounted,
/// 1 with the child's message otherwise); only the child returns. Must be called
/// before any thread is started.
pub fn detach() -> Result<Readiness, String> {
    let (read_end, write_end) = pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
    // SAFETY: no other thread exists yet (the caller's contract), so the child owns a
    // consistent copy of the process.
    match unsafe { fork() }.map_err(|e| format!("cannot fork: {e}"))? {
        ForkResult::Parent { .. } => {
            drop(write_end);
            let mut word = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut word);
            match word.as_str() {
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
            // Nothing reads stdin; stdout/stderr stay where the caller sent them (logs).
            if let Ok(null) = std::fs::File::open("/dev/null") {
                let _ = nix::unistd::dup2_stdin(null);
            }
            Ok(Readiness {
                pipe: Some(write_end),
            })
        }
    }
}
