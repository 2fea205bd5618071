//! The memory a process holds, from `/proc/<pid>/status`: one field, or the peak over
//! a stretch of a test ([`RssSampler`]).

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};

use super::process::POLL;

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
