//! One error type for everything the registry client can report, and the one place
//! where it becomes an errno (DESIGN §3).

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The registry says the repository, tag or digest does not exist.
    NotFound(String),
    /// 401/403 that authentication did not cure.
    Denied(String),
    /// The registry could not be reached or is failing: connect errors, resets,
    /// timeouts, 5xx, 429. Worth retrying.
    Unavailable(String),
    /// 429 or 503 with `Retry-After`: the registry says when to come back.
    Busy { msg: String, retry_after: Duration },
    /// The registry answered something that cannot be right: malformed JSON, a digest
    /// that does not match the bytes, a short body, an unexpected status.
    BadAnswer(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The errno a program sees for this error. A network failure is never ENOENT.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound(_) => libc::ENOENT,
            Error::Denied(_) => libc::EACCES,
            Error::Unavailable(_) | Error::Busy { .. } | Error::BadAnswer(_) => libc::EIO,
        }
    }

    /// Whether trying the same request again may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Busy { .. })
    }

    /// How long the registry asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Busy { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Maps a non-success HTTP answer to an error, using the OCI error body when there is
    /// one. `retry_after` is the answer's `Retry-After` header, if any.
    pub fn from_status_with(
        what: &str,
        status: u16,
        retry_after: Option<&str>,
        body: &[u8],
    ) -> Error {
        let err = Error::from_status(what, status, body);
        match (err, retry_after.and_then(parse_retry_after)) {
            (Error::Unavailable(msg), Some(retry_after)) if matches!(status, 429 | 503) => {
                Error::Busy { msg, retry_after }
            }
            (err, _) => err,
        }
    }

    /// Maps a non-success HTTP answer to an error, using the OCI error body when there is one.
    pub fn from_status(what: &str, status: u16, body: &[u8]) -> Error {
        let detail = oci_error_summary(body).unwrap_or_else(|| format!("HTTP {status}"));
        let msg = format!("{what}: {detail}");
        match status {
            404 => Error::NotFound(msg),
            401 | 403 => Error::Denied(msg),
            408 | 429 | 500..=599 => Error::Unavailable(msg),
            _ => Error::BadAnswer(msg),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFound(m) => write!(f, "not found: {m}"),
            Error::Denied(m) => write!(f, "access denied: {m}"),
            Error::Unavailable(m) => write!(f, "registry unavailable: {m}"),
            Error::Busy { msg, retry_after } => write!(
                f,
                "registry busy: {msg} (asked to retry after {}s)",
                retry_after.as_secs()
            ),
            Error::BadAnswer(m) => write!(f, "bad answer from registry: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// `Retry-After` in seconds. (The HTTP-date form is rare from registries and would need a
/// clock we cannot trust; it is treated as absent, which falls back to our backoff.)
fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[derive(Deserialize)]
struct OciErrors {
    errors: Vec<OciError>,
}

#[derive(Deserialize)]
struct OciError {
    code: String,
    #[serde(default)]
    message: String,
}

/// "CODE: message; CODE2: message2" from an OCI error body, if the body is one.
fn oci_error_summary(body: &[u8]) -> Option<String> {
    let parsed: OciErrors = serde_json::from_slice(body).ok()?;
    let parts: Vec<String> = parsed
        .errors
        .iter()
        .map(|e| {
            // The message is untrusted text bound for a log line: keep it short and on one line.
            let msg: String = e
                .message
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            format!("{}: {}", e.code, msg)
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_maps_to_errno() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
        let e = Error::from_status("GET manifest", 404, body);
        assert_eq!(e.errno(), libc::ENOENT);
        assert!(e.to_string().contains("MANIFEST_UNKNOWN: manifest unknown"));
        assert_eq!(Error::from_status("x", 401, b"").errno(), libc::EACCES);
        assert_eq!(Error::from_status("x", 503, b"").errno(), libc::EIO);
        assert_eq!(Error::from_status("x", 429, b"").errno(), libc::EIO);
        assert_eq!(Error::from_status("x", 418, b"<html>").errno(), libc::EIO);
    }

    #[test]
    fn error_body_is_sanitised() {
        let body = br#"{"errors":[{"code":"DENIED","message":"line1\nline2"}]}"#;
        let e = Error::from_status("x", 403, body);
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn retry_after_is_kept_for_429_and_503() {
        let e = Error::from_status_with("x", 429, Some("3"), b"");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        assert!(e.is_transient());
        let e = Error::from_status_with("x", 503, Some("Wed, 21 Oct 2015 07:28:00 GMT"), b"");
        assert_eq!((e.retry_after(), e.is_transient()), (None, true));
        assert!(!Error::from_status_with("x", 404, Some("3"), b"").is_transient());
        assert!(!Error::from_status_with("x", 400, None, b"").is_transient());
    }
}
