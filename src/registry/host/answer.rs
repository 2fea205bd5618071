//! Reading a registry's answer: its body, within a bound, and the error a non-success
//! answer stands for (error.rs maps statuses and the registry's error codes).

use bytes::{Bytes, BytesMut};

use super::headers::{content_length, header_str};
use super::http::transport;
use crate::registry::error::{Error, Result};

/// Reads a whole answer body, refusing more than `limit` bytes.
pub async fn body(what: &str, mut resp: reqwest::Response, limit: usize) -> Result<Bytes> {
    if content_length(resp.headers()).is_some_and(|n| n > limit as u64) {
        return Err(Error::BadAnswer(format!(
            "{what}: answer larger than {limit} bytes"
        )));
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport(what, &e))? {
        if buf.len() + chunk.len() > limit {
            return Err(Error::BadAnswer(format!(
                "{what}: answer larger than {limit} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Turns a non-success answer into an error, reading (a bounded part of) its body.
pub async fn error(what: &str, resp: reqwest::Response) -> Error {
    answer_error(what, resp, Error::from_status_with).await
}

/// [`error`] for the answer to a write: a 4xx is the registry's refusal.
pub async fn write_error(what: &str, resp: reqwest::Response) -> Error {
    answer_error(what, resp, Error::from_write_status).await
}

/// [`error`] for the answer to a DELETE: a 4xx is the registry not permitting it.
pub async fn delete_error(what: &str, resp: reqwest::Response) -> Error {
    answer_error(what, resp, Error::from_delete_status).await
}

/// The error for a non-success answer to a HEAD (which has no body).
pub fn head_error(what: &str, resp: &reqwest::Response) -> Error {
    let retry_after = header_str(resp.headers(), "retry-after");
    Error::from_status_with(what, resp.status().as_u16(), retry_after, b"")
}

async fn answer_error(
    what: &str,
    resp: reqwest::Response,
    to_error: fn(&str, u16, Option<&str>, &[u8]) -> Error,
) -> Error {
    let status = resp.status().as_u16();
    let retry_after = header_str(resp.headers(), "retry-after").map(str::to_owned);
    let body = body(what, resp, 64 << 10).await.unwrap_or_default();
    to_error(what, status, retry_after.as_deref(), &body)
}
