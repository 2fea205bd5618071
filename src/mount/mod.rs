//! One mount's life: prepare (mountpoint, registry probe, caches), the kernel mount,
//! serving, unmounting (also after a crash), mountinfo, the mount(8) helper and
//! `--daemon`.

pub mod daemon;
pub mod helper;
mod kernel;
pub mod mountinfo;
mod run;
pub mod unmount;

pub use mountinfo::unescape_mountinfo;
pub use run::{DiskCacheConfig, MountConfig, run};
