//! The Distribution API client. Knows nothing of FUSE.

pub mod client;
pub mod error;
pub mod types;
pub mod upload;

pub use client::{ClientOptions, FetchedManifest, RegistryClient, parse_registry_url};
pub use error::{Error, Result};
pub use types::{Descriptor, Digest, DigestHasher, ManifestLinks, Reference, RepoName, Tag};
pub use upload::{MountOutcome, Upload};
