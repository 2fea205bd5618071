//! regfs: a container registry as a folder.
//!
//! Dependencies point one way: `mount → fuse → fs → {image, cache, registry}` (see ARCHITECTURE.md).

pub mod buf;
pub mod cache;
pub mod fs;
pub mod fuse;
pub mod image;
pub mod mount;
pub mod passthrough;
pub mod registry;
pub mod runtime;
pub mod stats;
pub mod status;
