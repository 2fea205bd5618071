//! The Distribution API client. Knows nothing of FUSE.

pub mod client;
pub mod error;
pub mod types;

pub use client::{parse_registry_url, ClientOptions, FetchedManifest, RegistryClient};
pub use error::{Error, Result};
pub use types::{Descriptor, Digest, ManifestLinks, Reference, RepoName, Tag};
