//! Blob uploads: the session's requests (session.rs) and the upload the filesystem
//! fills and commits (upload.rs).

mod session;
mod upload;

pub use upload::{MountOutcome, Upload};
