pub mod layer_blob;
pub mod trees;
