//! The harness of the end-to-end tests (`tests/e2e/`), one file per kind of fixture.
//! Real parts only, all on loopback and bounded in time:
//! - [`registry`]: `docker-registry` (CNCF distribution 2.8) with temp storage, the
//!   registry API by hand ([`registry::api`]) and a pull-through cache
//!   ([`registry::pull_through`]);
//! - [`layout`]: images built with `umoci` and pushed with `skopeo`, plus hand-made indexes;
//!   [`images`]: images with rich contents, converted ones, hostile layers;
//! - [`proxy`]: a small HTTP/1.1 proxy in front of a registry that injects faults and counts;
//! - [`mount`]: the regfs binary mounted on a temp directory through the kernel;
//! - [`shaper`]: a wide-area link in userspace; [`auth`]: certificates, htpasswd, a token
//!   issuer; [`rss`]: a process's memory; [`http`]: the tiny HTTP/1.1 they all speak;
//! - [`tools`]: the system tools tests run; [`content`]: seeded bytes, digests, media
//!   types; [`process`]: children that die with their test, bounded waits.
//!
//! This file only lists the parts and re-exports what tests import, so the parts import
//! each other through it without an import circle (scripts/check-layout.py).
//!
//! Children (registry, regfs) get a parent-death signal so that a crashed test leaves nothing
//! behind. Linux delivers it when the *thread* that spawned the child ends, so create and drop
//! these objects in the same test thread (do not share them through statics).

pub mod auth;
pub mod content;
pub mod http;
pub mod images;
pub mod layout;
pub mod mount;
pub mod podman;
pub mod process;
pub mod proxy;
pub mod registry;
pub mod rss;
pub mod shaper;
pub mod tools;

pub use content::{MANIFEST_ACCEPT, OCI_INDEX, OCI_MANIFEST, noise, sha256_digest};
pub use http::{Response, header, http, http_get, read_response, try_http};
pub use layout::{Layout, layers, skopeo_copy, skopeo_copy_to_oci, skopeo_raw_manifest};
pub use mount::{Mount, MountInput, close, is_mounted, ls, stat, unmount_below};
pub use proxy::{ANNOUNCE_LENGTH, LocationRewrite, Proxy, ProxyRules, Tamper};
pub use registry::api::{
    blob_status, catalog, get_blob, get_manifest, get_manifest_at, manifest_status, next_link,
    oci_manifest, push_blob, push_image, push_tiny_image, push_untagged_image, put_manifest, tags,
};
pub use registry::pull_through::PullThrough;
pub use registry::{Registry, RegistryOptions};
pub use rss::{RssSampler, proc_status_kib};
pub use tools::{assert_success, find_in_path, require_commands, require_tools, run, run_bytes};
