//! The Distribution API client. Knows nothing of FUSE.

pub mod auth;
mod blob_get;
pub mod client;
pub mod credentials;
pub mod delete;
pub mod error;
pub mod hosts;
pub mod referrers;
mod socket_body;
pub mod ssrf;
pub mod types;
pub mod upload;

pub use blob_get::BlobBody;
pub use client::{ClientOptions, FetchedManifest, RegistryClient, parse_registry_url};
pub use credentials::Credentials;
pub use error::{Error, Result};
pub use hosts::MirrorSpec;
pub use types::{Descriptor, Digest, DigestHasher, ManifestLinks, Reference, RepoName, Tag};
pub use upload::{MountOutcome, Upload};
