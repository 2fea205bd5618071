//! What the headers of a registry's answer say: lengths, ranges, the next page, the
//! digest it names. Each is parsed without trusting it.

use reqwest::header::{self, HeaderMap};

use crate::registry::error::{Error, Result};
use crate::registry::types::Digest;

/// A header's value, if it is there and text.
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_str(headers, header::CONTENT_LENGTH.as_str()).and_then(|v| v.trim().parse().ok())
}

/// The first byte position of `Content-Range: bytes 100-199/1000`.
pub fn content_range_start(v: &str) -> Option<u64> {
    let range = v.trim().strip_prefix("bytes ")?;
    let (start, _) = range.split_once('-')?;
    start.trim().parse().ok()
}

/// `Docker-Content-Digest`, if the answer has one; Err if it is not a digest.
pub fn digest_header(what: &str, headers: &HeaderMap) -> Result<Option<Digest>> {
    match header_str(headers, "docker-content-digest") {
        None => Ok(None),
        Some(v) => Digest::parse(v.trim()).map(Some).ok_or_else(|| {
            Error::BadAnswer(format!("{what}: invalid Docker-Content-Digest {v:?}"))
        }),
    }
}

/// The `rel="next"` target of a `Link` header, e.g.
/// `</v2/_catalog?last=b&n=2>; rel="next"`. Returns None when there is no next page.
pub fn next_link(header: &str) -> Option<&str> {
    let mut rest = header;
    loop {
        let start = rest.find('<')?;
        let end = start + rest[start..].find('>')?;
        let target = &rest[start + 1..end];
        // Parameters run up to the next link (the next '<'), or the end.
        let after = &rest[end + 1..];
        let params_end = after.find('<').unwrap_or(after.len());
        let is_next = after[..params_end].split(';').any(|p| {
            let p = p.trim().trim_end_matches(',').trim();
            p.strip_prefix("rel=")
                .map(|v| v.trim_matches('"').split_whitespace().any(|r| r == "next"))
                .unwrap_or(false)
        });
        if is_next {
            return Some(target);
        }
        rest = &after[params_end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_next() {
        assert_eq!(
            next_link(r#"</v2/_catalog?last=b&n=2>; rel="next""#),
            Some("/v2/_catalog?last=b&n=2")
        );
        assert_eq!(
            next_link(r#"<https://r.example/v2/x/tags/list?n=1&last=a>; rel=next"#),
            Some("https://r.example/v2/x/tags/list?n=1&last=a")
        );
        // Several links; only the one with rel="next" counts.
        assert_eq!(
            next_link(r#"</prev>; rel="prev", </next?a=1>; title="x"; rel="next""#),
            Some("/next?a=1")
        );
        assert_eq!(next_link(r#"</first>; rel="first""#), None);
        assert_eq!(next_link(""), None);
        assert_eq!(next_link("garbage <unclosed"), None);
    }

    #[test]
    fn content_range() {
        assert_eq!(content_range_start("bytes 100-199/1000"), Some(100));
        assert_eq!(content_range_start("bytes 0-0/*"), Some(0));
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        /// A link target: a path and query, without the characters that end one.
        fn target() -> impl Strategy<Value = String> {
            "/v2/[a-z0-9/_.-]{1,30}(\\?[a-z]=[a-z0-9]{1,8}(&[a-z]=[a-z0-9]{1,8}){0,2})?"
        }

        proptest! {
            #[test]
            fn link_parsing_never_panics(header in any::<String>()) {
                let _ = next_link(&header);
            }

            /// Several links, some `rel="next"`: the first of those is the answer.
            #[test]
            fn the_first_next_link_is_found(
                links in prop::collection::vec((target(), prop::sample::select(vec!["next", "prev", "first", "last"]), any::<bool>()), 0..5)
            ) {
                let header = links
                    .iter()
                    .map(|(url, rel, quoted)| if *quoted {
                        format!("<{url}>; rel=\"{rel}\"")
                    } else {
                        format!("<{url}>; rel={rel}")
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let expected = links.iter().find(|(_, rel, _)| *rel == "next").map(|(u, _, _)| u.as_str());
                prop_assert_eq!(next_link(&header), expected);
            }

            #[test]
            fn content_range_never_panics(value in any::<String>()) {
                let _ = content_range_start(&value);
            }

            #[test]
            fn content_range_gives_its_first_byte(start in any::<u64>(), len in 0..u64::MAX / 2, total in any::<Option<u64>>()) {
                let end = start.saturating_add(len);
                let total = total.map_or_else(|| "*".to_owned(), |t| t.to_string());
                prop_assert_eq!(content_range_start(&format!("bytes {start}-{end}/{total}")), Some(start));
                prop_assert_eq!(content_range_start(&format!("items {start}-{end}/{total}")), None);
            }
        }
    }
}
