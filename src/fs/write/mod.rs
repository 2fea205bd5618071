//! The write side (docs/SEMANTICS.md, "Writes" and "Deletes"): what a written name
//! becomes (targets.rs), files in flight and their commits (files.rs), manifest pushes
//! and held indexes (held_indexes.rs), the tree's overlay of what the mount made
//! (overlay.rs), deletes (deletes.rs), and the write calls of `Fs` (calls.rs).

mod calls;
mod deletes;
mod files;
mod held_indexes;
mod overlay;
mod targets;

pub use deletes::Deletes;
pub use files::{WrittenFile, WrittenFiles};
pub use held_indexes::HeldIndexes;
pub use overlay::Overlay;
pub use targets::final_node;
