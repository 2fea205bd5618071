//! One error type for everything the registry client can report, and the one place
//! where it becomes an errno (DESIGN §3).

use std::fmt;

use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The registry says the repository, tag or digest does not exist.
    NotFound(String),
    /// 401/403 that authentication did not cure.
    Denied(String),
    /// The registry could not be reached or is failing: connect errors, timeouts, 5xx, 429.
    Unavailable(String),
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
            Error::Unavailable(_) | Error::BadAnswer(_) => libc::EIO,
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
            Error::BadAnswer(m) => write!(f, "bad answer from registry: {m}"),
        }
    }
}

impl std::error::Error for Error {}

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
}
