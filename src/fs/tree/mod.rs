pub mod node;
pub mod oci_layout;
