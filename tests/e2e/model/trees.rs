//! The two ways the model drives regfs: [`Direct`], `regfs::fs::Fs` called as the FUSE
//! adapter calls it (`--timeout` backstop included), and [`Kernel`], `std::fs` through a
//! real mount.

use std::ffi::OsStr;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;
use std::time::Duration;

use regfs::cache::BlockCache;
use regfs::fs::deadline::within;
use regfs::fs::{Errno, Fs, FsOptions, Kind, ROOT_INO};
use regfs::image::manifest::Platform;
use regfs::registry::{ClientOptions, RegistryClient, parse_registry_url};
use regfs::stats::Stats;

use super::reference::Res;
use crate::common::{self, Mount};

/// What a tree (regfs, either way) offers the operations.
pub trait Tree {
    fn list(&mut self, path: &str) -> Res<Vec<String>>;
    /// lstat: (kind, size)
    fn stat(&mut self, path: &str) -> Res<(Kind, u64)>;
    fn read(&mut self, path: &str, offset: u64, len: usize) -> Res<Vec<u8>>;
    fn readlink(&mut self, path: &str) -> Res<String>;
    /// create, write each piece at `offsets[i]`, close: the first error.
    fn write(&mut self, path: &str, pieces: &[(u64, &[u8])]) -> Res<()>;
    fn rename(&mut self, from: &str, to: &str) -> Res<()>;
    fn mkdir(&mut self, path: &str) -> Res<()>;
    fn link(&mut self, from: &str, to: &str) -> Res<()>;
    fn unlink(&mut self, path: &str) -> Res<()>;
    fn rmdir(&mut self, path: &str) -> Res<()>;
}

/// `regfs::fs::Fs` driven directly, as the FUSE adapter drives it.
pub struct Direct {
    fs: Arc<Fs>,
    runtime: tokio::runtime::Runtime,
}

impl Direct {
    fn run<T>(&self, work: impl std::future::Future<Output = Result<T, Errno>>) -> Res<T> {
        let limit = self.fs.deadline();
        self.runtime
            .block_on(within(limit, || "a model operation", work))
            .map_err(|e| e.0)
    }

    /// The inode at `path`, by lookups from the root.
    fn resolve(&self, path: &str) -> Res<u64> {
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = self.run(self.fs.lookup(ino, OsStr::new(part)))?.ino;
        }
        Ok(ino)
    }

    fn parent_and_name<'a>(&self, path: &'a str) -> Res<(u64, &'a str)> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        Ok((self.resolve(dir)?, name))
    }
}

/// A fixed "process" for the lock owner and pid the kernel would pass.
const OWNER: u64 = 42;
const PID: u32 = 4242;

impl Tree for Direct {
    fn list(&mut self, path: &str) -> Res<Vec<String>> {
        let ino = self.resolve(path)?;
        let fh = self.run(self.fs.opendir(ino))?;
        let entries = self.fs.readdir(fh, 0).map_err(|e| e.0);
        self.fs.releasedir(fh);
        let mut names: Vec<String> = entries?
            .into_iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        names.sort();
        Ok(names)
    }

    fn stat(&mut self, path: &str) -> Res<(Kind, u64)> {
        let ino = self.resolve(path)?;
        let attr = self.run(self.fs.getattr(ino))?;
        Ok((attr.kind, attr.size))
    }

    fn read(&mut self, path: &str, offset: u64, len: usize) -> Res<Vec<u8>> {
        let mut ino = self.resolve(path)?;
        // open(2) follows a symlink (the kernel resolves it first).
        if self.run(self.fs.getattr(ino))?.kind == Kind::Symlink {
            let target = String::from_utf8_lossy(&self.run(self.fs.readlink(ino))?).into_owned();
            let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
            ino = self.resolve(&normalize(&format!("{dir}/{target}")))?;
        }
        let opened = self.run(self.fs.open(ino, false, PID))?;
        let mut out = Vec::new();
        let mut at = offset;
        let result = loop {
            // The kernel asks in pieces of at most 1 MiB.
            let want = (len - out.len()).min(1 << 20) as u32;
            if want == 0 {
                break Ok(());
            }
            match self.run(self.fs.read(opened.fh, at, want)) {
                Ok(bytes) if bytes.is_empty() => break Ok(()),
                Ok(bytes) => {
                    at += bytes.len() as u64;
                    out.extend_from_slice(&bytes);
                }
                Err(e) => break Err(e),
            }
        };
        self.fs.release(opened.fh);
        result.map(|()| out)
    }

    fn readlink(&mut self, path: &str) -> Res<String> {
        let ino = self.resolve(path)?;
        let target = self.run(self.fs.readlink(ino))?;
        Ok(String::from_utf8_lossy(&target).into_owned())
    }

    fn write(&mut self, path: &str, pieces: &[(u64, &[u8])]) -> Res<()> {
        let (dir, name) = self.parent_and_name(path)?;
        let (_, opened) = self.run(self.fs.create(dir, OsStr::new(name), PID))?;
        let mut first_error = None;
        for (offset, piece) in pieces {
            if let Err(e) = self.run(self.fs.write(opened.fh, *offset, piece, Some(OWNER))) {
                first_error = Some(e);
                break;
            }
        }
        let closed = self.run(self.fs.flush(opened.fh, OWNER, PID));
        self.fs.release(opened.fh);
        match first_error {
            Some(e) => Err(e),
            None => closed,
        }
    }

    fn rename(&mut self, from: &str, to: &str) -> Res<()> {
        let (from_dir, from_name) = self.parent_and_name(from)?;
        let (to_dir, to_name) = self.parent_and_name(to)?;
        let work = self
            .fs
            .rename(from_dir, OsStr::new(from_name), to_dir, OsStr::new(to_name));
        self.run(work)
    }

    fn mkdir(&mut self, path: &str) -> Res<()> {
        let (dir, name) = self.parent_and_name(path)?;
        self.run(self.fs.mkdir(dir, OsStr::new(name))).map(|_| ())
    }

    fn link(&mut self, from: &str, to: &str) -> Res<()> {
        let ino = self.resolve(from)?;
        let (dir, name) = self.parent_and_name(to)?;
        self.run(self.fs.link(ino, dir, OsStr::new(name)))
            .map(|_| ())
    }

    fn unlink(&mut self, path: &str) -> Res<()> {
        let (dir, name) = self.parent_and_name(path)?;
        self.run(self.fs.unlink(dir, OsStr::new(name)))
    }

    fn rmdir(&mut self, path: &str) -> Res<()> {
        let (dir, name) = self.parent_and_name(path)?;
        self.run(self.fs.rmdir(dir, OsStr::new(name)))
    }
}

/// The same through a real mount.
pub struct Kernel<'a> {
    pub mount: &'a Mount,
}

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

impl Tree for Kernel<'_> {
    fn list(&mut self, path: &str) -> Res<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.mount.path(path)).map_err(errno)? {
            let entry = entry.map_err(errno)?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn stat(&mut self, path: &str) -> Res<(Kind, u64)> {
        let meta = fs::symlink_metadata(self.mount.path(path)).map_err(errno)?;
        let kind = if meta.is_dir() {
            Kind::Dir
        } else if meta.file_type().is_symlink() {
            Kind::Symlink
        } else {
            Kind::File
        };
        Ok((kind, meta.size()))
    }

    fn read(&mut self, path: &str, offset: u64, len: usize) -> Res<Vec<u8>> {
        let file = fs::File::open(self.mount.path(path)).map_err(errno)?;
        let mut out = vec![0; len];
        let mut got = 0;
        while got < len {
            match file
                .read_at(&mut out[got..], offset + got as u64)
                .map_err(errno)?
            {
                0 => break,
                n => got += n,
            }
        }
        out.truncate(got);
        Ok(out)
    }

    fn readlink(&mut self, path: &str) -> Res<String> {
        let target = fs::read_link(self.mount.path(path)).map_err(errno)?;
        Ok(target.to_string_lossy().into_owned())
    }

    fn write(&mut self, path: &str, pieces: &[(u64, &[u8])]) -> Res<()> {
        let mut file = fs::File::create(self.mount.path(path)).map_err(errno)?;
        let mut first_error = None;
        for (offset, piece) in pieces {
            let written = if file.metadata().is_ok_and(|m| m.len() == *offset) {
                file.write_all(piece)
            } else {
                file.write_all_at(piece, *offset)
            };
            if let Err(e) = written {
                first_error = Some(errno(e));
                break;
            }
        }
        let closed = common::close(file).map_err(errno);
        match first_error {
            Some(e) => Err(e),
            None => closed,
        }
    }

    fn rename(&mut self, from: &str, to: &str) -> Res<()> {
        fs::rename(self.mount.path(from), self.mount.path(to)).map_err(errno)
    }

    fn mkdir(&mut self, path: &str) -> Res<()> {
        fs::create_dir(self.mount.path(path)).map_err(errno)
    }

    fn link(&mut self, from: &str, to: &str) -> Res<()> {
        fs::hard_link(self.mount.path(from), self.mount.path(to)).map_err(errno)
    }

    fn unlink(&mut self, path: &str) -> Res<()> {
        fs::remove_file(self.mount.path(path)).map_err(errno)
    }

    fn rmdir(&mut self, path: &str) -> Res<()> {
        fs::remove_dir(self.mount.path(path)).map_err(errno)
    }
}

/// A fresh `Fs` on the registry at `url`, deleting from it when `allow_delete`.
pub fn direct_fs(url: &str, allow_delete: bool) -> Direct {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let options = ClientOptions {
        // A fault makes an operation fail fast: one retry, a short wait.
        max_retries: 1,
        retry_delay: Duration::from_millis(10),
        total_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        chunk_size: 64 << 10,
        ..ClientOptions::default()
    };
    let stats = Arc::new(Stats::default());
    let client = runtime.block_on(async {
        RegistryClient::new(
            parse_registry_url(url).expect("url"),
            options,
            stats.clone(),
        )
        .expect("client")
    });
    let cache = Arc::new(BlockCache::new(64 << 10, 4 << 20, stats));
    let options = FsOptions {
        repos: Vec::new(),
        tag_ttl: Duration::from_secs(3600),
        read_only: false,
        allow_delete,
        platform: Platform::host(),
        background_fetch: true,
        indexes: Default::default(),
    };
    let fs = Fs::new(client, cache, None, options);
    Direct {
        fs: Arc::new(fs),
        runtime,
    }
}

/// `a/b/../c` → `a/c`.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}
