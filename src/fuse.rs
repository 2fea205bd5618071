//! The thin fuser adapter: decode a kernel request, run it on the tokio runtime, reply.
//!
//! The FUSE thread never waits on the network: every operation that may ask the
//! registry is spawned as a task, and the reply is sent from that task. Those a program
//! waits on for an answer are held to `--timeout` (fs/deadline.rs).

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;

use crate::fs::deadline::within;
use crate::fs::{Attr, Fs, Kind};
use crate::passthrough::Passthrough;

/// Asks the kernel for reads this large (with FUSE_MAX_PAGES) and lets it read ahead as
/// far: fewer, larger range requests.
const MAX_READAHEAD: u32 = 1 << 20;
/// Largest write request to ask of the kernel.
const MAX_WRITE: u32 = 1 << 20;

pub struct FuseAdapter {
    fs: Arc<Fs>,
    runtime: Handle,
    owner: Owner,
    passthrough: Arc<Passthrough>,
}

/// Registry objects belong to the user who mounted; files inside images keep the
/// owners their layers give them.
#[derive(Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
    }
}

impl Owner {
    fn attr(&self, a: &Attr) -> FileAttr {
        let kind = file_type(a.kind);
        let nlink = match (a.nlink, a.kind) {
            (0, Kind::Dir) => 2,
            (0, _) => 1,
            (n, _) => n,
        };
        let (uid, gid) = a.owner.unwrap_or((self.uid, self.gid));
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: a.mtime,
            mtime: a.mtime,
            ctime: a.mtime,
            crtime: a.mtime,
            kind,
            perm: a.perm,
            nlink,
            uid,
            gid,
            rdev: a.rdev,
            blksize: 1 << 20,
            flags: 0,
        }
    }
}

impl FuseAdapter {
    pub fn new(fs: Arc<Fs>, runtime: Handle) -> FuseAdapter {
        let owner = Owner {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        };
        FuseAdapter {
            fs,
            runtime,
            owner,
            passthrough: Arc::default(),
        }
    }

    /// Runs `work` as a task on the runtime, so this thread can take the next request.
    fn spawn<F, Fut>(&self, work: F)
    where
        F: FnOnce(Arc<Fs>, Owner) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(work(self.fs.clone(), self.owner));
    }
}

fn errno(e: crate::fs::Errno) -> Errno {
    Errno::from_i32(e.0)
}

/// An xattr answer: its size when asked for the size (0), the bytes if they fit.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    match u32::try_from(value.len()) {
        Ok(len) if size == 0 => reply.size(len),
        Ok(len) if len <= size => reply.data(value),
        _ => reply.error(errno(crate::fs::Errno::ERANGE)),
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_readahead(MAX_READAHEAD) {
            let _ = config.set_max_readahead(max);
        }
        // Uploads arrive in writes as large as FUSE allows.
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(max);
        }
        // Many readers at once should not queue behind each other in the kernel.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // Verified blobs on disk are read by the kernel itself where it can (Linux ≥ 6.9).
        // Stack depth 1: cache files on a plain filesystem, and this mount may still be
        // a lower layer of an overlay.
        if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough.enable();
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_owned();
        self.spawn(move |fs, a| async move {
            let what = || format!("lookup of {name:?} in inode {}", parent.0);
            match within(fs.deadline_at(parent.0), what, fs.lookup(parent.0, &name)).await {
                Ok(attr) => reply.entry(&attr.ttl, &a.attr(&attr), Generation(0)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.spawn(move |fs, a| async move {
            let what = || format!("stat of inode {}", ino.0);
            match within(fs.deadline_at(ino.0), what, fs.getattr(ino.0)).await {
                Ok(attr) => reply.attr(&attr.ttl, &a.attr(&attr)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.spawn(move |fs, _| async move {
            let what = || format!("listing of inode {}", ino.0);
            match within(fs.deadline_at(ino.0), what, fs.opendir(ino.0)).await {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // The listing was made at opendir: this only copies it out, no network.
        match self.fs.readdir(fh.0, offset) {
            Ok(entries) => {
                for (i, e) in entries.iter().enumerate() {
                    let name = OsStr::from_bytes(&e.name);
                    // The offset handed back is where the next readdir should start.
                    if reply.add(
                        INodeNo(e.ino),
                        offset + i as u64 + 1,
                        file_type(e.kind),
                        name,
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let pid = req.pid();
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let passthrough = self.passthrough.clone();
        self.spawn(move |fs, _| async move {
            let what = || format!("open of inode {}", ino.0);
            match within(fs.deadline_at(ino.0), what, fs.open(ino.0, write, pid)).await {
                Ok(mut opened) => {
                    let local = opened.local_file.take();
                    if let Some(id) = passthrough.open(&reply, ino.0, opened.fh, local) {
                        fs.passthrough_opened();
                        return reply.opened_passthrough(
                            FileHandle(opened.fh),
                            FopenFlags::empty(),
                            &id,
                        );
                    }
                    let mut flags = FopenFlags::empty();
                    if opened.keep_cache {
                        flags |= FopenFlags::FOPEN_KEEP_CACHE;
                    }
                    if opened.direct_io {
                        flags |= FopenFlags::FOPEN_DIRECT_IO;
                    }
                    reply.opened(FileHandle(opened.fh), flags)
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn(move |fs, _| async move {
            let what = || format!("read of {size} bytes at {offset} (handle {})", fh.0);
            match within(fs.deadline(), what, fs.read(fh.0, offset, size)).await {
                Ok(bytes) => reply.data(&bytes),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        self.passthrough.release(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 1 << 20, 255, 1 << 20);
    }

    // Writes (docs/SEMANTICS.md, "Writes"): files under a repository become uploads and
    // pushes.

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.spawn(move |fs, a| async move {
            match fs.setattr(ino.0, size).await {
                Ok(attr) => reply.attr(&attr.ttl, &a.attr(&attr)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let name = name.to_owned();
        self.spawn(move |fs, a| async move {
            match fs.mkdir(parent.0, &name).await {
                Ok(attr) => reply.entry(&attr.ttl, &a.attr(&attr), Generation(0)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let (name, target) = (link_name.to_owned(), target.to_owned());
        self.spawn(move |fs, a| async move {
            match fs.symlink(parent.0, &name, &target).await {
                Ok(attr) => reply.entry(&attr.ttl, &a.attr(&attr), Generation(0)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let (name, pid) = (name.to_owned(), req.pid());
        self.spawn(move |fs, a| async move {
            match fs.create(parent.0, &name, pid).await {
                Ok((attr, opened)) => reply.created(
                    &attr.ttl,
                    &a.attr(&attr),
                    Generation(0),
                    FileHandle(opened.fh),
                    FopenFlags::FOPEN_DIRECT_IO,
                ),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        let owner = lock_owner.map(|o| o.0);
        self.spawn(move |fs, _| async move {
            match fs.write(fh.0, offset, &data, owner).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let pid = req.pid();
        self.spawn(move |fs, _| async move {
            match fs.flush(fh.0, lock_owner.0, pid).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Bytes are on their way to the registry; they are safe only once committed
        // (close or rename), which is when errors are reported.
        reply.ok();
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn(move |fs, _| async move {
            match fs.unlink(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn(move |fs, _| async move {
            match fs.rmdir(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.spawn(move |fs, _| async move {
            match fs.rename(parent.0, &name, newparent.0, &newname).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let newname = newname.to_owned();
        self.spawn(move |fs, a| async move {
            match fs.link(ino.0, newparent.0, &newname).await {
                Ok(attr) => reply.entry(&attr.ttl, &a.attr(&attr), Generation(0)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(move |fs, _| async move {
            match fs.readlink(ino.0).await {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.to_owned();
        self.spawn(move |fs, _| async move {
            match fs.getxattr(ino.0, &name).await {
                Ok(value) => reply_xattr(reply, size, &value),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.spawn(move |fs, _| async move {
            match fs.listxattr(ino.0).await {
                Ok(names) => reply_xattr(reply, size, &names),
                Err(e) => reply.error(errno(e)),
            }
        });
    }
}
