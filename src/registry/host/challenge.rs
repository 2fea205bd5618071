//! `WWW-Authenticate` challenges: what a 401 asks for, parsed from the header as
//! registries write it.

use std::collections::HashMap;

use reqwest::header::{self, HeaderMap};

/// What a 401 asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `WWW-Authenticate` headers, preferring Bearer over Basic when both are offered.
pub fn challenge(headers: &HeaderMap) -> Option<Challenge> {
    let mut basic = false;
    for value in headers.get_all(header::WWW_AUTHENTICATE) {
        let Ok(value) = value.to_str() else { continue };
        let value = value.trim();
        let (scheme, params) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            let params = auth_params(params);
            let realm = params.get("realm")?.clone();
            return Some(Challenge::Bearer {
                realm,
                service: params.get("service").cloned(),
                scope: params.get("scope").cloned(),
            });
        }
        basic |= scheme.eq_ignore_ascii_case("basic");
    }
    basic.then_some(Challenge::Basic)
}

/// `realm="https://a/token",service="x",scope="repository:a:pull,push"` → map.
/// Values may be quoted (with commas inside) or bare tokens.
fn auth_params(s: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut rest = s.trim();
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = rest[eq + 1..].trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.insert(key, value);
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    params
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_str(v).expect("header"),
            );
        }
        h
    }

    #[test]
    fn challenges() {
        assert_eq!(
            challenge(&headers(&[
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ])),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            challenge(&headers(&[r#"Basic realm="Registry Realm""#])),
            Some(Challenge::Basic)
        );
        assert_eq!(
            challenge(&headers(&[
                r#"Basic realm="x""#,
                r#"bearer realm=https://t/x, service=s"#
            ])),
            Some(Challenge::Bearer {
                realm: "https://t/x".into(),
                service: Some("s".into()),
                scope: None,
            })
        );
        assert_eq!(challenge(&headers(&["Bearer service=\"no realm\""])), None);
        assert_eq!(challenge(&headers(&["Negotiate"])), None);
        assert_eq!(challenge(&HeaderMap::new()), None);
    }

    #[test]
    fn auth_params_with_escapes_and_commas() {
        let p = auth_params(r#"realm="a\"b,c", error="insufficient_scope" ,x=y"#);
        assert_eq!(p["realm"], "a\"b,c");
        assert_eq!(p["error"], "insufficient_scope");
        assert_eq!(p["x"], "y");
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        /// How a header writes an auth parameter value: quoted, with `\\` and `"`
        /// escaped.
        fn quoted(value: &str) -> String {
            format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
        }

        proptest! {
            #[test]
            fn auth_params_never_panic(s in any::<String>()) {
                let _ = auth_params(&s);
            }

            #[test]
            fn challenges_never_panic(values in prop::collection::vec("[ -~]{0,80}", 0..4)) {
                let mut headers = HeaderMap::new();
                for v in &values {
                    if let Ok(v) = HeaderValue::from_str(v) {
                        headers.append(header::WWW_AUTHENTICATE, v);
                    }
                }
                let _ = challenge(&headers);
            }

            /// Parameters written as registries write them come back as they were.
            #[test]
            fn quoted_parameters_round_trip(
                params in prop::collection::btree_map("[a-z]{1,10}", "[ -~]{0,40}", 1..6),
                spaces in any::<bool>(),
            ) {
                let separator = if spaces { " , " } else { "," };
                let written = params
                    .iter()
                    .map(|(k, v)| format!("{k}={}", quoted(v)))
                    .collect::<Vec<_>>()
                    .join(separator);
                let parsed = auth_params(&written);
                for (k, v) in &params {
                    prop_assert_eq!(parsed.get(k), Some(v), "{}", written);
                }
                prop_assert_eq!(parsed.len(), params.len());
            }

            #[test]
            fn a_bearer_challenge_gives_its_realm_service_and_scope(
                realm in "https://[a-z]{1,12}\\.example/[a-z/]{0,12}",
                service in "[a-z.]{1,20}",
                scope in "repository:[a-z/]{1,20}:pull(,push)?",
            ) {
                let value = format!(
                    "Bearer realm={},service={},scope={}",
                    quoted(&realm), quoted(&service), quoted(&scope)
                );
                let mut headers = HeaderMap::new();
                headers.append(header::WWW_AUTHENTICATE, HeaderValue::from_str(&value).expect("header"));
                prop_assert_eq!(
                    challenge(&headers),
                    Some(Challenge::Bearer { realm, service: Some(service), scope: Some(scope) })
                );
            }
        }
    }
}
