pub mod calls;
pub mod deletes;
pub mod files;
