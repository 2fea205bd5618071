//! The Distribution API client. Knows nothing of FUSE.
//!
//! `host/` is one host's connection (auth, retries, errors, the SSRF guard); `api/` the
//! calls made on a host, one file per group; `client.rs` the [`RegistryClient`] that
//! routes each call to the origin or its mirrors (`mirrors.rs`).

mod api;
pub mod client;
pub mod error;
mod host;
mod mirrors;
pub mod types;

pub use api::blobs::BlobBody;
pub use api::manifests::{FetchedManifest, MAX_MANIFEST_BYTES};
pub use api::referrers::Referrer;
pub use api::uploads::{MountOutcome, Upload};
pub use client::RegistryClient;
pub use error::{Error, Result};
pub use host::{ClientOptions, Credentials, is_docker_hub, parse_registry_url};
pub use mirrors::{MirrorSpec, mark_insecure};
pub use types::{Descriptor, Digest, DigestHasher, ManifestLinks, Reference, RepoName, Tag};

/// The paths src/fs uses for uploads and referrers (`registry::upload::Upload`,
/// `registry::referrers::fallback_tag`).
pub use api::{referrers, uploads as upload};
