//! Token scopes (`repository:team/app:pull,push`): what a request needs, derived from
//! its method and path as distribution checks it, and what a cached token covers.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::Method;
use url::Url;

/// Scopes as the token spec writes them: `repository:team/app:pull,push`, grouped so
/// that scopes can be joined without repeating a resource.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes(BTreeMap<(String, String), BTreeSet<String>>);

impl Scopes {
    fn add(&mut self, kind: &str, name: &str, actions: &str) {
        self.0
            .entry((kind.to_owned(), name.to_owned()))
            .or_default()
            .extend(
                actions
                    .split(',')
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned),
            );
    }

    /// Parses the challenge's `scope` parameter: space-separated `type:name:actions`.
    pub fn parse(s: &str) -> Scopes {
        let mut scopes = Scopes::default();
        for item in s.split_whitespace() {
            let Some((kind, rest)) = item.split_once(':') else {
                continue;
            };
            let Some((name, actions)) = rest.rsplit_once(':') else {
                continue;
            };
            scopes.add(kind, name, actions);
        }
        scopes
    }

    /// The scopes a request needs, from its method and path (what distribution checks).
    pub fn for_request(method: &Method, url: &Url) -> Scopes {
        let mut scopes = Scopes::default();
        let Some(rest) = url.path().strip_prefix("/v2/") else {
            return scopes;
        };
        if rest == "_catalog" {
            scopes.add("registry", "catalog", "*");
            return scopes;
        }
        let Some(repo) = repository_of(rest) else {
            return scopes;
        };
        let actions = match *method {
            Method::GET | Method::HEAD => "pull",
            Method::DELETE => "delete",
            _ => "pull,push",
        };
        scopes.add("repository", repo, actions);
        // A cross-repository mount reads the blob from `from`.
        if let Some((_, from)) = url.query_pairs().find(|(k, _)| k == "from") {
            scopes.add("repository", &from, "pull");
        }
        scopes
    }

    pub fn join(&self, other: &Scopes) -> Scopes {
        let mut joined = self.clone();
        for ((kind, name), actions) in &other.0 {
            joined
                .0
                .entry((kind.clone(), name.clone()))
                .or_default()
                .extend(actions.iter().cloned());
        }
        joined
    }

    /// One `scope` value per resource, as token endpoints take them.
    pub fn to_strings(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|((kind, name), actions)| {
                let actions: Vec<&str> = actions.iter().map(String::as_str).collect();
                format!("{kind}:{name}:{}", actions.join(","))
            })
            .collect()
    }

    pub fn key(&self) -> String {
        self.to_strings().join(" ")
    }

    /// Whether a token asked for with these scopes should also do for `needed` (a
    /// `pull,push` token serves a pull).
    pub fn covers(&self, needed: &Scopes) -> bool {
        needed.0.iter().all(|(resource, actions)| {
            self.0
                .get(resource)
                .is_some_and(|have| have.contains("*") || actions.is_subset(have))
        })
    }
}

/// The repository name in a `/v2/` path (after `/v2/`): `<name>/tags/list`,
/// `<name>/manifests/<ref>`, `<name>/blobs/<digest>`, `<name>/blobs/uploads/[<id>]`.
/// Names may themselves contain `blobs` or `manifests` components, so match at the end.
fn repository_of(rest: &str) -> Option<&str> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(name);
    }
    if let Some(i) = rest.rfind("/blobs/uploads/")
        && !rest[i + "/blobs/uploads/".len()..].contains('/')
    {
        return Some(&rest[..i]);
    }
    let (prefix, _) = rest.rsplit_once('/')?;
    prefix
        .strip_suffix("/manifests")
        .or_else(|| prefix.strip_suffix("/blobs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(method: Method, url: &str) -> Vec<String> {
        Scopes::for_request(&method, &Url::parse(url).expect("url")).to_strings()
    }

    #[test]
    fn scopes_from_method_and_path() {
        let r = "https://r.example/v2";
        assert_eq!(
            scopes(Method::GET, &format!("{r}/_catalog?n=10")),
            ["registry:catalog:*"]
        );
        assert_eq!(
            scopes(Method::GET, &format!("{r}/team/app/tags/list")),
            ["repository:team/app:pull"]
        );
        assert_eq!(
            scopes(Method::HEAD, &format!("{r}/a/blobs/x/blobs/sha256:ab")),
            ["repository:a/blobs/x:pull"]
        );
        assert_eq!(
            scopes(Method::PUT, &format!("{r}/a/manifests/v1")),
            ["repository:a:pull,push"]
        );
        assert_eq!(
            scopes(Method::PATCH, &format!("{r}/a/b/blobs/uploads/1234-abcd")),
            ["repository:a/b:pull,push"]
        );
        assert_eq!(
            scopes(
                Method::POST,
                &format!("{r}/dst/blobs/uploads/?mount=sha256:ab&from=src/x")
            ),
            ["repository:dst:pull,push", "repository:src/x:pull"]
        );
        assert_eq!(
            scopes(Method::DELETE, &format!("{r}/a/manifests/sha256:ab")),
            ["repository:a:delete"]
        );
        assert!(scopes(Method::GET, &format!("{r}/")).is_empty());
    }

    #[test]
    fn a_push_token_covers_a_pull_not_another_repository() {
        let push = Scopes::parse("repository:team/app:pull,push");
        assert!(push.covers(&Scopes::parse("repository:team/app:pull")));
        assert!(!push.covers(&Scopes::parse("repository:other/app:pull")));
        assert!(!Scopes::parse("repository:team/app:pull").covers(&push));
        assert!(Scopes::parse("registry:catalog:*").covers(&Scopes::parse("registry:catalog:*")));
    }

    #[test]
    fn challenge_scopes_join_derived_ones() {
        let derived = Scopes::for_request(
            &Method::GET,
            &Url::parse("https://r/v2/a/manifests/v1").expect("url"),
        );
        let asked = Scopes::parse("repository:a:pull,push repository:b:pull bogus");
        assert_eq!(
            derived.join(&asked).to_strings(),
            ["repository:a:pull,push", "repository:b:pull"]
        );
    }
}
