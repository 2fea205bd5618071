//! Caches: the metadata memo now; the block cache for blob bytes arrives with issue 3.

pub mod memo;

pub use memo::Memo;
