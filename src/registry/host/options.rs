//! What a mount tells the client of each host: page size, timeouts, retries, TLS roots,
//! credentials, upload chunk size.

use std::time::Duration;

use super::credentials::Credentials;

/// Upload chunk size unless told otherwise: see README, "Performance", for the measurement.
pub const DEFAULT_CHUNK_SIZE: usize = 16 << 20;

#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// `n=` for catalog and tag-list pages.
    pub page_size: u32,
    pub connect_timeout: Duration,
    /// Longest silence while waiting for any part of an answer.
    pub read_timeout: Duration,
    /// Retries of an idempotent request after a transient failure (connect error,
    /// reset, 5xx, 429), with exponential backoff and jitter from `retry_delay`.
    pub max_retries: usize,
    pub retry_delay: Duration,
    /// Total time for one idempotent operation, retries included (`--timeout`).
    pub total_timeout: Duration,
    /// Extra trusted roots (PEM) besides the system's (`--ca-file`).
    pub ca_file: Option<std::path::PathBuf>,
    /// Skip certificate verification (`--insecure`).
    pub insecure: bool,
    pub credentials: Credentials,
    /// Bytes per PATCH of a blob upload (raised to the registry's
    /// `OCI-Chunk-Min-Length` if it asks for more). An upload holds about two.
    pub chunk_size: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            page_size: 1000,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            max_retries: 5,
            retry_delay: Duration::from_millis(100),
            total_timeout: Duration::from_secs(60),
            ca_file: None,
            insecure: false,
            credentials: Credentials::default(),
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}
