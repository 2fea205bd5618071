//! What a path is (node.rs, numbered by inodes.rs), and, per area of the tree, its
//! children, attributes and opens: the registry's directories (registry.rs), `/.regfs`
//! (control.rs), the files of images (images.rs), `.oci/` (oci_layout.rs),
//! `.referrers/` (referrers.rs) and `/.layerstore` (layer_store.rs, with the image
//! references it is asked for, image_ref.rs). `Fs` hands each request to the area of
//! its node.

mod control;
mod image_ref;
mod images;
mod inodes;
pub mod layer_store;
pub mod node;
pub mod oci_layout;
mod open_file;
pub mod referrers;
mod registry;
mod warming;

pub use control::ControlFiles;
pub use image_ref::RegistryDomain;
pub use images::ImageDirs;
pub use inodes::{InodeTable, ROOT_INO};
pub use layer_store::LayerStore;
pub use node::Node;
pub use open_file::{OpenFile, Opened, Opening};
pub use registry::RegistryDirs;
