//! What a path is (node.rs, numbered by inodes.rs), and, per area of the tree, its
//! children, attributes and opens: the registry's directories (registry.rs), `/.regfs`
//! (control.rs), the files of images (images.rs), `.oci/` (oci_layout.rs) and
//! `.referrers/` (referrers.rs). `Fs` hands each request to the area of its node.

mod control;
mod images;
mod inodes;
pub mod node;
pub mod oci_layout;
mod open_file;
pub mod referrers;
mod registry;
mod warming;

pub use control::ControlFiles;
pub use images::ImageDirs;
pub use inodes::{InodeTable, ROOT_INO};
pub use node::Node;
pub use open_file::{OpenFile, Opened, Opening};
pub use registry::RegistryDirs;
