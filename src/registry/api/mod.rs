//! The calls of the Distribution API on one [`Host`](super::host::Host), one file per
//! group: what each sends, and how its answer is checked before use.

pub mod blobs;
pub mod deletes;
pub mod lists;
pub mod manifests;
pub mod referrers;
pub mod uploads;
