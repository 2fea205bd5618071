//! The files of images over src/image (docs/SEMANTICS.md, "Image contents"): merged
//! trees (trees.rs) of indexed layers (layers.rs), whose bytes come through the block
//! cache (layer_blob.rs); layers as the manifest they are reached through describes them
//! (described.rs), and the layer store's record of one (layer_record.rs); a pass's
//! progress shown in the stats (watched.rs).

mod background;
mod described;
mod generations;
mod image_tree;
mod index_check;
mod layer_blob;
mod layer_record;
mod layers;
mod priority;
mod publish;
mod soci_found;
mod trees;
mod watched;

pub use image_tree::ImageTree;
pub use trees::{Images, IndexOptions};
