//! Errors as programs see them: an errno for every operation, and the log line that
//! says why (docs/SEMANTICS.md, "Errors").

use std::fmt::Display;

use tracing::{debug, warn};

use crate::registry::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
}

/// Logs a registry error against the path it happened on, and gives its errno.
pub fn fail(path: &dyn Display, e: Error) -> Errno {
    match e {
        Error::NotFound(_) => debug!(%path, "{e}"),
        _ => warn!(%path, "{e}"),
    }
    Errno(e.errno())
}
