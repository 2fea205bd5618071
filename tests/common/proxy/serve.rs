//! How the fault proxy serves a client connection: each request is read, counted, put
//! through the rules in force, forwarded upstream on a fresh connection (or answered by
//! the proxy itself), and the answer buffered and re-framed, then paced by the stall and
//! trickle rules.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::rules::LocationRewrite;
use super::shared::{ProxyShared, STALL_LIMIT, Seen};
use crate::common::http::{
    ANNOUNCE_LENGTH, IO_TIMEOUT, Request, Response, connect, header, json_response,
    method_has_body, push_headers, read_body, read_request_head, read_response,
    write_response_with,
};
use crate::common::registry::api::json_strings;

pub(super) fn accept_loop(listener: TcpListener, shared: Arc<ProxyShared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let id = shared.next_client.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = stream.try_clone() {
            shared
                .clients
                .lock()
                .expect("proxy clients lock")
                .insert(id, clone);
        }
        let shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name(format!("test-proxy-conn-{id}"))
            .spawn(move || {
                serve_client(&shared, stream);
                shared
                    .clients
                    .lock()
                    .expect("proxy clients lock")
                    .remove(&id);
            });
        if spawned.is_err() {
            eprintln!("test proxy: cannot spawn a connection thread");
        }
    }
}

fn serve_client(shared: &ProxyShared, client: TcpStream) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(120)));
    let _ = client.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(read_half) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = client;
    while !shared.stopping.load(Ordering::SeqCst) {
        let mut request = match read_request_head(&mut reader) {
            Ok(Some(request)) => request,
            Ok(None) | Err(_) => return,
        };
        shared.seen.lock().expect("proxy log lock").push(Seen {
            line: format!("{} {}", request.method, request.target),
            range: header(&request.headers, "range").map(String::from),
            authorization: header(&request.headers, "authorization").is_some(),
        });
        if request.method == "PATCH"
            && !take_one(&shared.cut_patch_after)
            && take_one(&shared.cut_patches)
        {
            cut_request(shared, &request, &mut reader);
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
        request.body = match read_body(&mut reader, &request.headers, false) {
            Ok(body) => body,
            Err(_) => return,
        };
        let close =
            header(&request.headers, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let mut response = handle(shared, &request);
        if let Some(tamper) = &shared.tamper {
            response = (tamper.0)(&request.method, &request.target, response);
        }
        let close = close || response.header(ANNOUNCE_LENGTH).is_some();
        if is_blob_get(&request) && response.status / 100 == 2 {
            if take_one(&shared.cut_blob_gets) {
                let full = response.body.len();
                response.body.truncate(full / 2);
                // Announce the full length, send half, hang up: a reset mid-transfer.
                let _ = write_cut_response(&mut writer, &response, full);
                let _ = writer.shutdown(Shutdown::Both);
                return;
            }
            if shared.corrupt_blob_gets.load(Ordering::SeqCst)
                && let Some(first) = response.body.first_mut()
            {
                *first ^= 0xff;
            }
        }
        let head = request.method == "HEAD";
        let paced = |w: &mut TcpStream, body: &[u8]| write_body(shared, w, body);
        if write_response_with(&mut writer, &response, head, close, paced).is_err() || close {
            return;
        }
    }
}

fn is_blob_get(request: &Request) -> bool {
    let path = request.target.split('?').next().unwrap_or("");
    request.method == "GET" && path.contains("/blobs/") && !path.contains("/blobs/uploads/")
}

/// Decrements `counter` if it is above zero; true if it did.
fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// Headers announcing `full` bytes, then only the bytes in `response.body`.
fn write_cut_response(w: &mut impl Write, response: &Response, full: usize) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", response.status, response.reason);
    push_headers(
        &mut out,
        &response.headers,
        &["connection", "transfer-encoding", "content-length"],
    );
    out.push_str(&format!("Content-Length: {full}\r\n\r\n"));
    w.write_all(out.as_bytes())?;
    w.write_all(&response.body)?;
    w.flush()
}

fn handle(shared: &ProxyShared, request: &Request) -> Response {
    let path = request.target.split('?').next().unwrap_or("");
    let get = request.method == "GET";
    wait_while_stalled(shared);
    if shared.upstream_down.load(Ordering::SeqCst) {
        return json_response(
            502,
            "Bad Gateway",
            br#"{"errors":[{"code":"UNAVAILABLE","message":"test proxy: registry is down"}]}"#,
        );
    }
    if path.contains("/blobs/uploads/") {
        return handle_upload(shared, request, path);
    }
    if is_blob_get(request) {
        if let Some(base) = &shared.redirect_blob_gets_to {
            let mut response = json_response(307, "Temporary Redirect", b"");
            response
                .headers
                .push(("Location".into(), format!("{base}{}", request.target)));
            return response;
        }
        if take_one(&shared.fail_blob_gets) {
            return come_back_later();
        }
        if take_one(&shared.throttle_blob_gets) {
            let mut response = json_response(
                429,
                "Too Many Requests",
                br#"{"errors":[{"code":"TOOMANYREQUESTS","message":"test proxy says slow down"}]}"#,
            );
            response.headers.push(("Retry-After".into(), "1".into()));
            return response;
        }
    }
    if get && path.starts_with("/v2/_catalog") && shared.refuse_catalog.load(Ordering::SeqCst) {
        return json_response(
            401,
            "Unauthorized",
            br#"{"errors":[{"code":"UNAUTHORIZED","message":"catalog refused by test proxy"}]}"#,
        );
    }
    if get
        && path.contains("/blobs/")
        && !path.contains("/blobs/uploads/")
        && shared.stall_blob_gets.load(Ordering::SeqCst)
    {
        hold(shared);
    }
    if get && path.ends_with("/tags/list") && shared.paginate_tags.load(Ordering::SeqCst) {
        return paginated_tags(shared, request, path);
    }
    forward(shared, request, &request.target)
}

/// Requests under `/blobs/uploads/`: the upload faults and rewrites.
fn handle_upload(shared: &ProxyShared, request: &Request, path: &str) -> Response {
    if request.method == "PATCH" && take_one(&shared.fail_patches) {
        return come_back_later();
    }
    let is_mount = request.method == "POST" && request.target.contains("mount=");
    let target = if is_mount && shared.decline_mounts.load(Ordering::SeqCst) {
        path
    } else {
        &request.target
    };
    let mut response = forward(shared, request, target);
    if let Some(rewrite) = &shared.upload_locations {
        for (name, value) in &mut response.headers {
            if name.eq_ignore_ascii_case("location") {
                *value = rewrite_location(value, rewrite);
            }
        }
    }
    response
}

/// `http://host:port/v2/…?q` → `/v2/…?q`, or the same on another origin.
fn rewrite_location(location: &str, rewrite: &LocationRewrite) -> String {
    let path_and_query = match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => location,
    };
    match rewrite {
        LocationRewrite::Relative => path_and_query.to_string(),
        LocationRewrite::OtherOrigin(origin) => format!("{origin}{path_and_query}"),
    }
}

/// Blocks until `release_stalls`, the rule is turned off, the proxy stops, or 60 s.
fn hold(shared: &ProxyShared) {
    let deadline = Instant::now() + STALL_LIMIT;
    let mut stall = shared.stall.lock().expect("proxy stall lock");
    let generation = stall.generation;
    stall.held += 1;
    while stall.generation == generation
        && shared.stall_blob_gets.load(Ordering::SeqCst)
        && !shared.stopping.load(Ordering::SeqCst)
    {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        stall = shared
            .stall_changed
            .wait_timeout(stall, deadline - now)
            .expect("proxy stall lock")
            .0;
    }
    stall.held -= 1;
}

/// 503 with `Retry-After: 1`, as a registry under load answers.
fn come_back_later() -> Response {
    let mut response = json_response(
        503,
        "Service Unavailable",
        br#"{"errors":[{"code":"UNAVAILABLE","message":"test proxy says come back later"}]}"#,
    );
    response.headers.push(("Retry-After".into(), "1".into()));
    response
}

/// The head of `request` as sent upstream: hop-by-hop headers dropped, the body framed by
/// a Content-Length of `body_len`, and `Connection: close`.
fn upstream_head(request: &Request, target: &str, body_len: usize) -> String {
    let mut head = format!("{} {target} HTTP/1.1\r\n", request.method);
    push_headers(
        &mut head,
        &request.headers,
        &[
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "content-length",
        ],
    );
    if body_len > 0 || method_has_body(&request.method) {
        head.push_str(&format!("Content-Length: {body_len}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    head
}

/// The `cut_patches` fault: reads half of the request's body from the client, sends the
/// head (announcing the whole body) and the first `cut_patch_forward` bytes upstream, then
/// hangs up on the registry. The caller then hangs up on the client.
fn cut_request(shared: &ProxyShared, request: &Request, client: &mut impl BufRead) {
    let announced: usize = header(&request.headers, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut half = vec![0; announced / 2];
    if client.read_exact(&mut half).is_err() {
        return;
    }
    let forwarded = &half[..shared.cut_patch_forward.min(half.len())];
    if let Ok(mut upstream) = connect(shared.upstream) {
        let head = upstream_head(request, &request.target, announced);
        let _ = upstream.write_all(head.as_bytes());
        let _ = upstream.write_all(forwarded);
        let _ = upstream.flush();
        // Let the registry read what was sent before the connection goes.
        thread::sleep(Duration::from_millis(100));
        let _ = upstream.shutdown(Shutdown::Both);
    }
}

/// Sends the request upstream on a fresh connection and reads the whole answer; 502 on failure.
fn forward(shared: &ProxyShared, request: &Request, target: &str) -> Response {
    let attempt = || -> io::Result<Response> {
        let mut upstream = connect(shared.upstream)?;
        let head = upstream_head(request, target, request.body.len());
        upstream.write_all(head.as_bytes())?;
        upstream.write_all(&request.body)?;
        read_response(&mut BufReader::new(upstream), request.method == "HEAD")
    };
    attempt().unwrap_or_else(|e| Response {
        status: 502,
        reason: "Bad Gateway".into(),
        headers: vec![("Content-Type".into(), "text/plain".into())],
        body: format!("test proxy: upstream {} failed: {e}", shared.upstream).into_bytes(),
    })
}

/// Tag-list pagination done by the proxy: all tags from upstream, sorted, `last` excluded,
/// `n` kept, and a Link header in the format distribution uses for the catalog.
fn paginated_tags(shared: &ProxyShared, request: &Request, path: &str) -> Response {
    let query = request.target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let param = |key: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    };
    let Some(n) = param("n").and_then(|n| n.parse::<usize>().ok()) else {
        return forward(shared, request, &request.target);
    };
    let last = param("last");
    let mut response = forward(shared, request, path);
    if response.status != 200 {
        return response;
    }
    let Ok(mut list) = serde_json::from_slice::<serde_json::Value>(&response.body) else {
        return response;
    };
    let mut tags: Vec<String> = json_strings(&response.body, "tags");
    tags.sort();
    let after: Vec<String> = tags
        .into_iter()
        .filter(|t| last.as_ref().is_none_or(|l| t.as_str() > l.as_str()))
        .collect();
    let page: Vec<String> = after.iter().take(n).cloned().collect();
    response
        .headers
        .retain(|(k, _)| !k.eq_ignore_ascii_case("link"));
    if after.len() > n
        && let Some(last_of_page) = page.last()
    {
        response.headers.push((
            "Link".into(),
            format!("<{path}?last={last_of_page}&n={n}>; rel=\"next\""),
        ));
    }
    list["tags"] = serde_json::json!(page);
    response.body = serde_json::to_vec(&list).expect("serialize tag list");
    response
}

/// While `stall_all` is on (at most [`STALL_LIMIT`]), waits.
fn wait_while_stalled(shared: &ProxyShared) {
    let deadline = Instant::now() + STALL_LIMIT;
    while shared.stall_all.load(Ordering::SeqCst)
        && !shared.stopping.load(Ordering::SeqCst)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(10));
    }
}

/// How many of `want` body bytes may be sent now: all, unless a stall is planned
/// ([`Proxy::stall_after_bytes`]); when the planned bytes are spent, the stall begins
/// (a piece already past the wait of another connection may still go).
fn take_before_stall(shared: &ProxyShared, want: usize) -> usize {
    let mut left = shared.stall_after.lock().expect("stall lock");
    match *left {
        None => want,
        Some(0) => {
            *left = None;
            shared.stall_all.store(true, Ordering::SeqCst);
            *shared.stalled_at.lock().expect("stall lock") = Some(Instant::now());
            0
        }
        Some(n) => {
            let take = want.min(usize::try_from(n).unwrap_or(usize::MAX));
            *left = Some(n - take as u64);
            take
        }
    }
}

/// Writes a body in pieces, pausing while the registry stalls and pacing it when it
/// trickles.
fn write_body(shared: &ProxyShared, w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let mut rest = body;
    while !rest.is_empty() {
        wait_while_stalled(shared);
        let rate = shared.trickle_bytes_per_sec.load(Ordering::SeqCst);
        // Ten pieces a second when trickling; 64 KiB at a time otherwise.
        let piece = if rate > 0 {
            (rate / 10).max(1)
        } else {
            64 << 10
        };
        let take = take_before_stall(shared, piece.min(rest.len()));
        if take == 0 {
            // The planned stall has begun: wait at the top.
            continue;
        }
        let (now, later) = rest.split_at(take);
        w.write_all(now)?;
        w.flush()?;
        rest = later;
        if rate > 0 {
            thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}
