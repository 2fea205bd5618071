//! One host of a registry (the origin or a mirror): its connection, authentication,
//! credentials, retries, the errors its answers stand for, and where it may send regfs.

mod address;
pub mod answer;
mod auth;
mod challenge;
mod connection;
mod credentials;
pub mod headers;
mod http;
mod options;
mod resolved;
mod retry;
mod scopes;
mod ssrf;

pub use address::{HostShape, is_docker_hub, parse_registry_url, with_scheme};
pub use connection::Host;
pub use credentials::Credentials;
pub use http::{MAX_REDIRECTS, USER_AGENT, transport};
pub use options::ClientOptions;
pub use retry::Retries;
