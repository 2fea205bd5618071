//! One error type for everything the registry client can report, and the one place
//! where it becomes an errno (docs/SEMANTICS.md, "Errors").

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
    /// Content that must hash to a digest does not: an upload whose bytes are not the
    /// blob it was named after, or a manifest pushed by a digest it does not have.
    Mismatch(String),
    /// The registry refused a push (a 4xx other than auth, not-found and rate limits),
    /// e.g. a manifest naming a blob the repository lacks. Carries the registry's text.
    Refused(String),
    /// What was to be pushed is refused before any request: not a manifest, too large,
    /// a digest algorithm uploads cannot produce.
    Invalid(String),
    /// The registry refused a delete (405 `UNSUPPORTED` where deleting is disabled, or
    /// another 4xx). Carries the registry's text.
    NotPermitted(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The errno a program sees for this error. A network failure is never ENOENT.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound(_) => libc::ENOENT,
            Error::Denied(_) => libc::EACCES,
            Error::Unavailable(_)
            | Error::Busy { .. }
            | Error::BadAnswer(_)
            | Error::Mismatch(_)
            | Error::Refused(_) => libc::EIO,
            Error::Invalid(_) => libc::EINVAL,
            Error::NotPermitted(_) => libc::EPERM,
        }
    }

    /// Whether trying the same request again may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Busy { .. })
    }

    /// The same error with `note` added to its message, e.g. how many retries it survived.
    pub fn with_note(self, note: &str) -> Error {
        let add = |m: String| format!("{m} ({note})");
        match self {
            Error::NotFound(m) => Error::NotFound(add(m)),
            Error::Denied(m) => Error::Denied(add(m)),
            Error::Unavailable(m) => Error::Unavailable(add(m)),
            Error::Busy { msg, retry_after } => Error::Busy {
                msg: add(msg),
                retry_after,
            },
            Error::BadAnswer(m) => Error::BadAnswer(add(m)),
            Error::Mismatch(m) => Error::Mismatch(add(m)),
            Error::Refused(m) => Error::Refused(add(m)),
            Error::Invalid(m) => Error::Invalid(add(m)),
            Error::NotPermitted(m) => Error::NotPermitted(add(m)),
        }
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

    /// Like [`Error::from_status_with`], for the answer to a write: a 4xx that is not
    /// about auth, existence or rate is the registry refusing what was sent.
    pub fn from_write_status(
        what: &str,
        status: u16,
        retry_after: Option<&str>,
        body: &[u8],
    ) -> Error {
        Error::refusal(what, status, retry_after, body, Error::Refused)
    }

    /// Like [`Error::from_status_with`], for the answer to a DELETE: a 4xx that is not
    /// about auth, existence or rate is the registry not permitting it.
    pub fn from_delete_status(
        what: &str,
        status: u16,
        retry_after: Option<&str>,
        body: &[u8],
    ) -> Error {
        Error::refusal(what, status, retry_after, body, Error::NotPermitted)
    }

    /// [`Error::from_status_with`], with `as_refusal` for a 4xx it has no other name for.
    fn refusal(
        what: &str,
        status: u16,
        retry_after: Option<&str>,
        body: &[u8],
        as_refusal: fn(String) -> Error,
    ) -> Error {
        match Error::from_status_with(what, status, retry_after, body) {
            Error::BadAnswer(msg) if (400..500).contains(&status) => as_refusal(msg),
            err => err,
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
            Error::Mismatch(m) => write!(f, "digest mismatch: {m}"),
            Error::Refused(m) => write!(f, "registry refused: {m}"),
            Error::Invalid(m) => write!(f, "refused before sending: {m}"),
            Error::NotPermitted(m) => write!(f, "registry does not permit it: {m}"),
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
    fn a_refused_write_keeps_the_registry_text() {
        let body = br#"{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#;
        let e = Error::from_write_status("PUT m", 400, None, body);
        assert!(matches!(e, Error::Refused(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains("MANIFEST_BLOB_UNKNOWN: blob unknown to registry")
        );
        assert_eq!(e.errno(), libc::EIO);
        assert!(matches!(
            Error::from_write_status("x", 404, None, b""),
            Error::NotFound(_)
        ));
        assert!(Error::from_write_status("x", 503, None, b"").is_transient());
    }

    #[test]
    fn a_refused_delete_is_eperm_with_the_registry_text() {
        let body =
            br#"{"errors":[{"code":"UNSUPPORTED","message":"The operation is unsupported."}]}"#;
        let e = Error::from_delete_status("DELETE m", 405, None, body);
        assert!(matches!(e, Error::NotPermitted(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains("UNSUPPORTED: The operation is unsupported.")
        );
        assert_eq!(e.errno(), libc::EPERM);
        assert_eq!(
            Error::from_delete_status("x", 404, None, b"").errno(),
            libc::ENOENT
        );
        assert!(Error::from_delete_status("x", 503, None, b"").is_transient());
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
