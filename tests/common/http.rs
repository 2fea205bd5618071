//! A tiny HTTP/1.1 client, and the parsing and framing the harness's servers (the fault
//! proxy, the token issuer) share. std only: the harness must not depend on the HTTP
//! stack regfs uses, or a bug there would hide in both.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Socket timeouts of the HTTP helpers and the proxy: nothing in a test may hang forever.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A response with this header is framed by its value whatever its body, and the
/// connection is closed after it: a length that lies (see `proxy::Tamper`).
pub const ANNOUNCE_LENGTH: &str = "X-Test-Announce-Length";

// A client

pub type Headers = Vec<(String, String)>;

/// First value of a header, by case-insensitive name.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// Replaces (or adds) a header.
    pub fn set_header(&mut self, name: &str, value: &str) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.headers.push((name.to_string(), value.to_string()));
    }

    /// A response of its own (not the registry's), e.g. for a [`Tamper`] to answer.
    pub fn new(status: u16, headers: &[(&str, &str)], body: Vec<u8>) -> Response {
        Response {
            status,
            reason: "Tampered".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One line without its CRLF. `Ok(None)` on a clean end of stream before any byte.
pub fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\n") {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "truncated line",
        ));
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "non-UTF-8 header line"))
}

pub fn must_line(r: &mut impl BufRead) -> io::Result<String> {
    read_line(r)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"))
}

/// Start line and headers of a message; `Ok(None)` if the peer closed before sending anything.
pub fn read_head(r: &mut impl BufRead) -> io::Result<Option<(String, Headers)>> {
    let Some(start) = read_line(r)? else {
        return Ok(None);
    };
    let mut headers = Vec::new();
    loop {
        let line = must_line(r)?;
        if line.is_empty() {
            return Ok(Some((start, headers)));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "header without colon"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
}

/// Decodes a `Transfer-Encoding: chunked` body (chunk extensions and trailers are skipped).
pub fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = must_line(r)?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad chunk size {line:?}"),
            )
        })?;
        if size == 0 {
            // Trailer section: header lines up to an empty line.
            while !must_line(r)?.is_empty() {}
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        if !must_line(r)?.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "chunk without CRLF",
            ));
        }
    }
}

/// Reads a body framed by the headers. `to_eof` says what an unframed body means: the rest of
/// the stream (responses) or nothing (requests).
pub fn read_body(
    r: &mut impl BufRead,
    headers: &[(String, String)],
    to_eof: bool,
) -> io::Result<Vec<u8>> {
    let chunked = header(headers, "transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if chunked {
        return read_chunked(r);
    }
    if let Some(len) = header(headers, "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?;
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        return Ok(body);
    }
    let mut body = Vec::new();
    if to_eof {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

/// Reads one response. `head_request`: the request was HEAD, so there is no body whatever the
/// headers say (Content-Length is kept in `headers`).
pub fn read_response(r: &mut impl BufRead, head_request: bool) -> io::Result<Response> {
    let (start, headers) =
        read_head(r)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no response"))?;
    // "HTTP/1.1 200 OK"
    let mut parts = start.splitn(3, ' ');
    let _version = parts.next();
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad status line {start:?}"),
        )
    })?;
    let reason = parts.next().unwrap_or("").to_string();
    let no_body = head_request || status < 200 || status == 204 || status == 304;
    let body = if no_body {
        Vec::new()
    } else {
        read_body(r, &headers, true)?
    };
    Ok(Response {
        status,
        reason,
        headers,
        body,
    })
}

pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

pub fn method_has_body(method: &str) -> bool {
    matches!(method, "POST" | "PUT" | "PATCH")
}

/// One request on a fresh connection (`Connection: close`), the whole response read.
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut stream = connect(addr)?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method_has_body(method) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    read_response(&mut BufReader::new(stream), method == "HEAD")
}

/// Like [`try_http`], panicking with a clear message on a network error.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_http(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path} failed: {e}"))
}

/// GET → (status, headers, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, Headers, Vec<u8>) {
    let r = http(addr, "GET", path, &[], &[]);
    (r.status, r.headers, r.body)
}

// What servers share

/// A request as read from the client.
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Headers,
    pub body: Vec<u8>,
}

pub fn read_request(r: &mut impl BufRead) -> io::Result<Option<Request>> {
    let Some(mut request) = read_request_head(r)? else {
        return Ok(None);
    };
    request.body = read_body(r, &request.headers, false)?;
    Ok(Some(request))
}

/// A request's line and headers; its body (still unread) is left empty.
pub fn read_request_head(r: &mut impl BufRead) -> io::Result<Option<Request>> {
    let Some((start, headers)) = read_head(r)? else {
        return Ok(None);
    };
    let mut parts = start.split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad request line {start:?}"),
        ));
    };
    let version = parts.next().unwrap_or("HTTP/1.0");
    let mut headers = headers;
    if version == "HTTP/1.0" && header(&headers, "connection").is_none() {
        headers.push(("Connection".into(), "close".into()));
    }
    Ok(Some(Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        body: Vec::new(),
    }))
}

pub fn json_response(status: u16, reason: &str, body: &[u8]) -> Response {
    Response {
        status,
        reason: reason.to_string(),
        headers: vec![
            (
                "Content-Type".into(),
                "application/json; charset=utf-8".into(),
            ),
            (
                "Docker-Distribution-Api-Version".into(),
                "registry/2.0".into(),
            ),
        ],
        body: body.to_vec(),
    }
}

/// Appends `name: value` lines for the headers not named in `skip` (framing the proxy
/// redoes itself).
pub fn push_headers(out: &mut String, headers: &[(String, String)], skip: &[&str]) {
    for (name, value) in headers {
        if !skip.iter().any(|h| name.eq_ignore_ascii_case(h)) {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
    }
}

/// Writes the head of a buffered response, framed by Content-Length (HEAD keeps the
/// upstream's); whether its body is to follow.
fn write_response_head(
    w: &mut impl Write,
    response: &Response,
    head_request: bool,
    close: bool,
) -> io::Result<bool> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", response.status, response.reason);
    push_headers(
        &mut out,
        &response.headers,
        &[
            "connection",
            "keep-alive",
            "transfer-encoding",
            "content-length",
            ANNOUNCE_LENGTH,
        ],
    );
    let bodiless_status = response.status < 200 || response.status == 204 || response.status == 304;
    if let Some(announced) = response.header(ANNOUNCE_LENGTH) {
        out.push_str(&format!("Content-Length: {announced}\r\n"));
    } else if head_request {
        if let Some(len) = response.header("content-length") {
            out.push_str(&format!("Content-Length: {len}\r\n"));
        }
    } else if !bodiless_status {
        out.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    w.write_all(out.as_bytes())?;
    Ok(!head_request && !bodiless_status)
}

/// Writes a buffered response, framed by Content-Length (HEAD keeps the upstream's).
pub fn write_response(
    w: &mut impl Write,
    response: &Response,
    head_request: bool,
    close: bool,
) -> io::Result<()> {
    write_response_with(w, response, head_request, close, |w, body| {
        w.write_all(body)
    })
}

/// [`write_response`], its body (if it has one) written by `send_body`: at once, or
/// paced as the fault proxy's rules say.
pub fn write_response_with<W: Write>(
    w: &mut W,
    response: &Response,
    head_request: bool,
    close: bool,
    send_body: impl FnOnce(&mut W, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    if write_response_head(w, response, head_request, close)? {
        send_body(w, &response.body)?;
    }
    w.flush()
}
