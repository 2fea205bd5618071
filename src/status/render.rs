//! The status of mounts as text for people, or as one JSON document. Fields are read
//! by name from `/.regfs/stats`, so a section whose counters a mount does not have (an
//! older daemon) is left out rather than shown as zero.

use std::fmt::Write;

use serde_json::{Value, json};

use super::{Health, MountStatus};
use crate::cache::disk::admin::human as bytes;

/// Every mount's stats as one JSON object keyed by mount point (`null` when it did not
/// answer), for scripts.
pub fn json(statuses: &[MountStatus]) -> String {
    let mut all = serde_json::Map::new();
    for s in statuses {
        let value = match &s.health {
            Health::Answering(stats) => stats.clone(),
            Health::Dead(why) => json!({ "dead": why }),
            Health::Silent => Value::Null,
        };
        all.insert(s.mountpoint.display().to_string(), value);
    }
    let mut text = Value::Object(all).to_string();
    text.push('\n');
    text
}

pub fn text(statuses: &[MountStatus]) -> String {
    if statuses.is_empty() {
        return "no regfs mounts\n".to_owned();
    }
    let mut out = String::new();
    for s in statuses {
        let _ = write!(out, "{}  {}  ", s.mountpoint.display(), s.source);
        match &s.health {
            Health::Answering(stats) => {
                out.push_str("answering\n");
                mount(&mut out, stats);
            }
            Health::Dead(why) => {
                let _ = writeln!(out, "DEAD: {why}");
            }
            Health::Silent => {
                let _ = writeln!(
                    out,
                    "NOT ANSWERING: its stats took longer than {} s (a registry that does \
                     not answer holds reads for up to --timeout; the mount may be hung)",
                    super::ANSWER_WITHIN.as_secs()
                );
            }
        }
        out.push('\n');
    }
    out
}

/// A counter at `path` in the stats, if the mount has it.
fn get(stats: &Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(stats, |v, k| v.get(k))?.as_u64()
}

fn n(stats: &Value, path: &[&str]) -> u64 {
    get(stats, path).unwrap_or(0)
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".to_owned()
    } else {
        format!("{:.0} %", part as f64 * 100.0 / whole as f64)
    }
}

fn line(out: &mut String, label: &str, text: &str) {
    let _ = writeln!(out, "  {label:<10} {text}");
}

fn mount(out: &mut String, stats: &Value) {
    hosts(out, stats);
    caches(out, stats);
    let s = stats;
    line(
        out,
        "traffic",
        &format!(
            "{} fetched, {} uploaded; {} requests in flight, {} retries",
            bytes(n(s, &["fetched_bytes"])),
            bytes(n(s, &["uploaded_bytes"])),
            n(s, &["in_flight"]),
            n(s, &["retries"]),
        ),
    );
    objects(out, stats);
    images(out, stats);
    problems(out, stats);
}

fn hosts(out: &mut String, stats: &Value) {
    let Some(hosts) = stats.get("hosts").and_then(Value::as_object) else {
        return;
    };
    for (url, h) in hosts {
        let role = h.get("role").and_then(Value::as_str).unwrap_or("host");
        line(
            out,
            role,
            &format!(
                "{url}: {} requests, {} failed, {} fetched{}",
                n(h, &["requests"]),
                n(h, &["failures"]),
                bytes(n(h, &["fetched_bytes"])),
                match n(h, &["passed_on"]) {
                    0 => String::new(),
                    p => format!(", {p} reads passed on to the next host"),
                }
            ),
        );
    }
}

fn caches(out: &mut String, s: &Value) {
    let (hits, misses) = (n(s, &["cache", "hits"]), n(s, &["cache", "misses"]));
    line(
        out,
        "memory",
        &format!(
            "{} of {} (block {}); {} of reads from it",
            bytes(n(s, &["cache", "bytes"])),
            bytes(n(s, &["cache", "budget"])),
            bytes(n(s, &["cache", "block_size"])),
            percent(hits, hits + misses),
        ),
    );
    let budget = n(s, &["disk", "budget"]);
    if budget == 0 {
        line(out, "disk", "off (--no-disk-cache, or no cache directory)");
        return;
    }
    line(
        out,
        "disk",
        &format!(
            "{} of {}; {} verified blobs, {} passthrough opens{}",
            bytes(n(s, &["disk", "bytes"])),
            bytes(budget),
            n(s, &["disk", "verified_blobs"]),
            n(s, &["disk", "passthrough_opens"]),
            match n(s, &["disk", "dropped_writes"]) {
                0 => String::new(),
                d => format!(", {d} writes dropped (disk full or busy)"),
            }
        ),
    );
}

/// Per blob and per image: what was fetched against what programs read and the size,
/// so "is it lazy?" is one look.
fn objects(out: &mut String, stats: &Value) {
    let Some(list) = stats.get("recent").and_then(Value::as_array) else {
        return;
    };
    for o in list {
        let name = o.get("name").and_then(Value::as_str).unwrap_or("?");
        let kind = o.get("kind").and_then(Value::as_str).unwrap_or("blob");
        let (size, fetched) = (n(o, &["size"]), n(o, &["fetched"]));
        line(
            out,
            kind,
            &format!(
                "{name}: {} fetched of {} ({}), {} read",
                bytes(fetched),
                bytes(size),
                percent(fetched, size),
                bytes(n(o, &["read"])),
            ),
        );
    }
}

fn images(out: &mut String, s: &Value) {
    if s.get("images").is_none() {
        return;
    }
    let mut text = format!(
        "{} layers indexed ({} indexes from disk), {} decodes, {} of layers read for files",
        n(s, &["images", "layers_indexed"]),
        n(s, &["images", "indexes_from_disk"]),
        n(s, &["images", "decodes"]),
        bytes(n(s, &["images", "fetched_bytes"])),
    );
    if let Some(bg) = get(s, &["images", "background_bytes"]) {
        let _ = write!(text, ", {} in the background", bytes(bg));
    }
    if let Some(kept) = get(s, &["images", "decoded_from_disk"]).filter(|&k| k > 0) {
        let _ = write!(text, ", {} of files read back from disk", bytes(kept));
    }
    line(out, "images", &text);
    shared_indexes(out, s);
    indexing(out, s);
    if let Some(why) = s
        .get("images")
        .and_then(|i| i.get("toc_unused_why"))
        .and_then(Value::as_object)
    {
        for (layer, reason) in why {
            let reason = reason.as_str().unwrap_or("?");
            line(out, "fallback", &format!("{layer}: read whole: {reason}"));
        }
    }
}

/// SOCI indexes (docs/SEMANTICS.md, "Shared indexes"), when the mount met any.
fn shared_indexes(out: &mut String, s: &Value) {
    let count = |k: &str| n(s, &["images", k]);
    let (found, published) = (count("indexes_found"), count("indexes_published"));
    if found == 0 && published == 0 {
        return;
    }
    let text = format!(
        "{found} SOCI indexes found, {published} published, {} layers served from one, {} checked whole in the background",
        count("layers_from_index"),
        count("background_checks"),
    );
    line(out, "indexes", &text);
}

/// Layers being read whole (an index pass), with progress and an estimate of the rest.
fn indexing(out: &mut String, s: &Value) {
    let Some(list) = s
        .get("images")
        .and_then(|i| i.get("indexing"))
        .and_then(Value::as_array)
    else {
        return;
    };
    for l in list {
        let layer = l.get("layer").and_then(Value::as_str).unwrap_or("?");
        let (done, total, ms) = (n(l, &["done"]), n(l, &["total"]), n(l, &["elapsed_ms"]));
        let left = match (done, ms) {
            (0, _) | (_, 0) => "estimating".to_owned(),
            _ => {
                let rate = done as f64 / ms as f64; // bytes per ms
                let secs = total.saturating_sub(done) as f64 / rate / 1000.0;
                format!("about {secs:.0} s left")
            }
        };
        line(
            out,
            "indexing",
            &format!(
                "{layer}: {} ({} of {}), {left}",
                percent(done, total),
                bytes(done),
                bytes(total),
            ),
        );
    }
}

fn problems(out: &mut String, s: &Value) {
    let mut notes = Vec::new();
    let failed = n(s, &["verify_failures"]);
    if failed > 0 {
        notes.push(format!("{failed} blobs did not match their digest"));
    }
    let unused = n(s, &["images", "toc_unused"]);
    if unused > 0 {
        notes.push(format!("{unused} TOC layers read whole"));
    }
    let refused = n(s, &["images", "indexes_refused"]);
    if refused > 0 {
        notes.push(format!(
            "{refused} SOCI indexes refused (the log names them)"
        ));
    }
    let pending = n(s, &["pending_manifests"]);
    if pending > 0 {
        notes.push(format!(
            "{pending} indexes held until their children are pushed"
        ));
    }
    let failures: u64 = s
        .get("hosts")
        .and_then(Value::as_object)
        .map_or(0, |h| h.values().map(|v| n(v, &["failures"])).sum());
    if failures > 0 {
        notes.push(format!("{failures} requests failed (see the log)"));
    }
    let text = if notes.is_empty() {
        "none".to_owned()
    } else {
        notes.join("; ")
    };
    line(out, "problems", &text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_in_words_and_missing_sections_left_out() {
        let stats = json!({
            "cache": {"hits": 3, "misses": 1, "bytes": 2097152, "budget": 268435456,
                      "block_size": 2097152},
            "disk": {"budget": 0},
            "fetched_bytes": 1048576,
            "hosts": {"http://r:5000": {"role": "origin", "requests": 7, "failures": 1,
                                        "fetched_bytes": 1048576, "passed_on": 0}},
            "images": {"layers_indexed": 2, "indexing": [
                {"layer": "sha256:ab", "done": 50, "total": 100, "elapsed_ms": 1000}]},
        });
        let text = text(&[MountStatus {
            mountpoint: "/mnt/reg".into(),
            source: "regfs:r:5000".into(),
            health: Health::Answering(stats),
        }]);
        assert!(text.contains("/mnt/reg  regfs:r:5000  answering"), "{text}");
        assert!(text.contains("75 % of reads from it"), "{text}");
        assert!(text.contains("disk       off"), "{text}");
        assert!(
            text.contains("sha256:ab: 50 % (50 B of 100 B), about 1 s left"),
            "{text}"
        );
        assert!(text.contains("1 requests failed"), "{text}");
        assert!(
            !text.contains("fetched of"),
            "no per-object counters given: {text}"
        );
    }

    #[test]
    fn dead_and_silent_mounts_say_so() {
        let text = text(&[
            MountStatus {
                mountpoint: "/a".into(),
                source: "regfs:x".into(),
                health: Health::Dead("gone".into()),
            },
            MountStatus {
                mountpoint: "/b".into(),
                source: "regfs:y".into(),
                health: Health::Silent,
            },
        ]);
        assert!(text.contains("/a  regfs:x  DEAD: gone"), "{text}");
        assert!(text.contains("/b  regfs:y  NOT ANSWERING"), "{text}");
    }
}
