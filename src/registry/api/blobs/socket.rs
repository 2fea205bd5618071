//! Blob streams read straight from their socket into block buffers (plain HTTP/1.1).
//!
//! A sequential reader's stream carries a whole blob, and through hyper each of its
//! bytes is copied twice in user space: from the socket into hyper's read buffer, which
//! another task hands out in chunks of tens of kilobytes, then from each chunk into its
//! block. For a registry spoken to in plain HTTP (on loopback, inside a cluster) with no
//! proxy configured, the stream's GET goes out on a connection of its own instead, and
//! its body is read from the socket into the block buffers themselves.
//!
//! Only the plain answer is taken here: `206 Partial Content` from the offset asked for,
//! with a `Content-Length` and neither a transfer coding nor a content coding. Anything
//! else (a 401 to authenticate, a redirect, an error, a chunked body) closes the
//! connection, and the caller asks again through the HTTP client, which knows what to do
//! with every other answer.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use url::{Host, Url};

use crate::registry::host::headers::content_range_start;

/// The most an answer's head may take; a registry's is a few hundred bytes.
const MAX_HEAD: usize = 64 << 10;
const MAX_HEADERS: usize = 64;
/// Read size while the head is awaited (body bytes that come with it are kept).
const HEAD_READ: usize = 16 << 10;

/// The body of a `206` answer, read from its connection.
pub(super) struct SocketBody {
    stream: TcpStream,
    /// Body bytes that arrived with the head.
    early: Bytes,
    /// Body bytes still to deliver (`early` included): the rest of `Content-Length`.
    left: u64,
}

impl SocketBody {
    /// Sends `request` (a GET with `Range: bytes=<offset>-`) on a new connection (made
    /// within `connect`) and reads the answer's head (within `answer`). Err says why the
    /// answer is not one to read here (the caller then asks through the client).
    pub(super) async fn open(
        request: &reqwest::Request,
        offset: u64,
        user_agent: &str,
        connect: Duration,
        answer: Duration,
    ) -> Result<SocketBody, String> {
        let head = request_head(request, user_agent)?;
        let stream = tokio::time::timeout(connect, Self::connect(request.url()))
            .await
            .map_err(|_| "no connection in time".to_owned())??;
        tokio::time::timeout(answer, Self::exchange(stream, &head, offset))
            .await
            .map_err(|_| "no answer in time".to_owned())?
    }

    async fn connect(url: &Url) -> Result<TcpStream, String> {
        let port = url.port_or_known_default().ok_or("no port")?;
        let connected = match url.host() {
            Some(Host::Domain(name)) => TcpStream::connect((name, port)).await,
            Some(Host::Ipv4(addr)) => TcpStream::connect((addr, port)).await,
            Some(Host::Ipv6(addr)) => TcpStream::connect((addr, port)).await,
            None => return Err("no host".into()),
        };
        connected.map_err(|e| format!("cannot connect: {e}"))
    }

    async fn exchange(
        mut stream: TcpStream,
        head: &[u8],
        offset: u64,
    ) -> Result<SocketBody, String> {
        // The request goes out in one write; Nagle would only hold it.
        let _ = stream.set_nodelay(true);
        stream
            .write_all(head)
            .await
            .map_err(|e| format!("cannot send: {e}"))?;
        let mut received = BytesMut::with_capacity(HEAD_READ);
        loop {
            if let Some((head_len, length)) = parse_head(&received, offset)? {
                let early = received.split_off(head_len).freeze();
                if early.len() as u64 > length {
                    return Err("more bytes than its Content-Length".into());
                }
                return Ok(SocketBody {
                    stream,
                    early,
                    left: length,
                });
            }
            if received.len() >= MAX_HEAD {
                return Err(format!("answer head longer than {MAX_HEAD} bytes"));
            }
            received.reserve(HEAD_READ);
            let n = stream
                .read_buf(&mut received)
                .await
                .map_err(|e| format!("cannot read the answer: {e}"))?;
            if n == 0 {
                return Err("connection closed before the answer's head".into());
            }
        }
    }

    /// Reads body bytes into `buf`: how many (0 at the end of the body, or when the
    /// connection closed before it: the caller knows how many it expected).
    pub(super) async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let room = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if room == 0 {
            return Ok(0);
        }
        let n = if self.early.is_empty() {
            self.stream.read(&mut buf[..room]).await?
        } else {
            let n = room.min(self.early.len());
            buf[..n].copy_from_slice(&self.early[..n]);
            self.early.advance(n);
            n
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// The request line and headers of `request` (a bodyless GET), closing the connection
/// after the answer: the stream is the connection's only use.
fn request_head(request: &reqwest::Request, user_agent: &str) -> Result<Vec<u8>, String> {
    let url = request.url();
    let host = url.host_str().ok_or("no host")?;
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(url.path().as_bytes());
    if let Some(query) = url.query() {
        head.push(b'?');
        head.extend_from_slice(query.as_bytes());
    }
    head.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    head.extend_from_slice(host.as_bytes());
    if let Some(port) = url.port() {
        head.extend_from_slice(format!(":{port}").as_bytes());
    }
    head.extend_from_slice(b"\r\nUser-Agent: ");
    head.extend_from_slice(user_agent.as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in request.headers() {
        // Header values cannot hold CR or LF (HeaderValue refuses them).
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(head)
}

/// Judges the answer head at the start of `received`, to a GET from `offset`: None if
/// it is not complete yet; its length and the body's `Content-Length` if it is a plain
/// `206` from `offset`; Err naming what makes it one for the client.
fn parse_head(received: &[u8], offset: u64) -> Result<Option<(usize, u64)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut headers);
    let head_len = match answer.parse(received) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("unreadable answer head: {e}")),
    };
    match answer.code {
        Some(206) => {}
        Some(code) => return Err(format!("answered {code}")),
        None => return Err("answer without a status".into()),
    }
    let mut length = None;
    let mut range_start = None;
    for header in answer.headers.iter() {
        let value = std::str::from_utf8(header.value).map_err(|_| {
            format!(
                "header {} is not text",
                header.name.chars().take(40).collect::<String>()
            )
        })?;
        let value = value.trim();
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<u64>()
                .map_err(|_| format!("Content-Length {value:?}"))?;
            if length.is_some_and(|m| m != n) {
                return Err("two different Content-Lengths".into());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("Transfer-Encoding {value:?}"));
        } else if name.eq_ignore_ascii_case("content-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(format!("Content-Encoding {value:?}"));
        } else if name.eq_ignore_ascii_case("content-range") {
            range_start = content_range_start(value);
        }
    }
    if range_start != Some(offset) {
        return Err(format!("Content-Range does not start at {offset}"));
    }
    let length = length.ok_or("no Content-Length")?;
    Ok(Some((head_len, length)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 100-199/200\r\n\
        Content-Length: 100\r\nDocker-Content-Digest: sha256:00\r\n\r\nbody";

    #[test]
    fn a_plain_206_gives_its_head_length_and_body_length() {
        let head_len = HEAD.len() - 4;
        assert_eq!(parse_head(HEAD, 100), Ok(Some((head_len, 100))));
        // Not complete until the blank line has come.
        assert_eq!(parse_head(&HEAD[..head_len - 1], 100), Ok(None));
    }

    #[test]
    fn other_answers_are_left_to_the_client() {
        let wrong_offset = parse_head(HEAD, 0);
        assert!(wrong_offset.is_err(), "{wrong_offset:?}");
        for head in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"[..],
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://x/\r\n\r\n",
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10\r\n\
              Transfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10\r\n\r\n",
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10\r\n\
              Content-Length: 10\r\nContent-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10\r\n\
              Content-Length: 10\r\nContent-Length: 11\r\n\r\n",
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10\r\n\
              Content-Length: -1\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            let judged = parse_head(head, 0);
            assert!(
                judged.is_err(),
                "{:?}: {judged:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn the_request_names_its_host_range_and_credentials() {
        let url =
            Url::parse("http://reg.example:5000/v2/team/app/blobs/sha256:ab?ns=x").expect("url");
        let mut request = reqwest::Request::new(reqwest::Method::GET, url);
        let headers = request.headers_mut();
        headers.insert("range", "bytes=5-".parse().expect("value"));
        headers.insert("authorization", "Bearer t".parse().expect("value"));
        let head =
            String::from_utf8(request_head(&request, "regfs/test").expect("head")).expect("text");
        assert!(
            head.starts_with("GET /v2/team/app/blobs/sha256:ab?ns=x HTTP/1.1\r\n"),
            "{head}"
        );
        for line in [
            "Host: reg.example:5000\r\n",
            "User-Agent: regfs/test\r\n",
            "range: bytes=5-\r\n",
            "authorization: Bearer t\r\n",
            "Connection: close\r\n\r\n",
        ] {
            assert!(head.contains(line), "{line:?} in {head}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_answer_head_is_judged_without_panicking(
                received in proptest::collection::vec(any::<u8>(), 0..512),
                offset in any::<u64>(),
            ) {
                let _ = parse_head(&received, offset);
            }

            #[test]
            fn a_206_is_taken_only_from_its_offset(offset in any::<u64>(), asked in any::<u64>(), length in any::<u64>()) {
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {offset}-{}/*\r\nContent-Length: {length}\r\n\r\n",
                    offset.saturating_add(length)
                );
                let judged = parse_head(head.as_bytes(), asked);
                prop_assert_eq!(judged.is_ok(), offset == asked);
                if offset == asked {
                    prop_assert_eq!(judged, Ok(Some((head.len(), length))));
                }
            }
        }
    }
}
