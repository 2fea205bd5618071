//! The files of images over src/image (docs/SEMANTICS.md, "Image contents"): merged
//! trees (trees.rs) of indexed layers (layers.rs), whose bytes come through the block
//! cache (layer_blob.rs).

mod image_tree;
mod layer_blob;
mod layers;
mod trees;

pub use image_tree::ImageTree;
pub use trees::Images;
