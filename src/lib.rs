//! regfs: a container registry as a folder.
//!
//! Dependencies point one way: `mount → fuse → fs → {image, cache, registry}` (see ARCHITECTURE.md).

pub mod cache;
pub mod daemon;
pub mod fs;
pub mod fuse;
pub mod image;
pub mod kernel_mount;
pub mod mount;
pub mod mount_helper;
pub mod passthrough;
pub mod registry;
pub mod stats;
pub mod unmount;
