//! The lists of a registry: its catalog and a repository's tags, paginated with `n=` and
//! `Link` headers.

use std::collections::HashSet;

use bytes::Bytes;
use reqwest::Method;
use serde::Deserialize;
use tracing::warn;
use url::Url;

use crate::registry::error::{Error, Result};
use crate::registry::host::headers::{header_str, next_link};
use crate::registry::host::{Host, answer};
use crate::registry::types::{RepoName, Tag};
use crate::stats::RequestKind;

/// A list that needs more pages than this is treated as a broken `Link` loop.
const MAX_PAGES: usize = 100_000;

#[derive(Deserialize)]
struct ListPage {
    #[serde(default)]
    repositories: Option<Vec<String>>,
    #[serde(default)]
    tags: Option<Vec<String>>,
}

impl Host {
    /// All repositories in the catalog, in the registry's order.
    pub async fn catalog(&self) -> Result<Vec<RepoName>> {
        let names = self
            .paginated(RequestKind::Catalog, "GET /v2/_catalog", "/v2/_catalog")
            .await?;
        Ok(names
            .into_iter()
            .filter_map(|n| {
                let parsed = RepoName::parse(&n);
                if parsed.is_none() {
                    warn!(name = %n.escape_debug(), "catalog lists an invalid repository name; skipped");
                }
                parsed
            })
            .collect())
    }

    /// All tags of a repository.
    pub async fn tags(&self, repo: &RepoName) -> Result<Vec<Tag>> {
        let what = format!("GET /v2/{repo}/tags/list");
        let names = self
            .paginated(RequestKind::Tags, &what, &format!("/v2/{repo}/tags/list"))
            .await?;
        Ok(names
            .into_iter()
            .filter_map(|n| {
                let parsed = Tag::parse(&n);
                if parsed.is_none() {
                    warn!(%repo, tag = %n.escape_debug(), "tag list has an invalid tag; skipped");
                }
                parsed
            })
            .collect())
    }

    /// Follows `Link: <…>; rel="next"` until the last page. Links must stay on the
    /// registry's own origin: credentials are never sent elsewhere.
    async fn paginated(&self, kind: RequestKind, what: &str, path: &str) -> Result<Vec<String>> {
        let mut url = self.url(path)?;
        url.query_pairs_mut()
            .append_pair("n", &self.options().page_size.to_string());
        let mut seen = HashSet::new();
        let mut items = Vec::new();
        for _ in 0..MAX_PAGES {
            if !seen.insert(url.clone()) {
                return Err(Error::BadAnswer(format!(
                    "{what}: Link header loops to {url}"
                )));
            }
            let (next, body) = self.retrying(|| self.page(kind, what, &url)).await?;
            let page: ListPage = serde_json::from_slice(&body)
                .map_err(|e| Error::BadAnswer(format!("{what}: invalid JSON: {e}")))?;
            items.extend(page.repositories.or(page.tags).unwrap_or_default());
            match next {
                None => return Ok(items),
                Some(link) => {
                    let next_url = url.join(&link).map_err(|e| {
                        Error::BadAnswer(format!("{what}: invalid Link {link:?}: {e}"))
                    })?;
                    if next_url.origin() != self.base().origin() {
                        return Err(Error::BadAnswer(format!(
                            "{what}: Link points to another host: {next_url}"
                        )));
                    }
                    url = next_url;
                }
            }
        }
        Err(Error::BadAnswer(format!(
            "{what}: more than {MAX_PAGES} pages"
        )))
    }

    /// One page of a list: its `Link` to the next page, and its body.
    async fn page(
        &self,
        kind: RequestKind,
        what: &str,
        url: &Url,
    ) -> Result<(Option<String>, Bytes)> {
        let _in_flight = self.stats().request(kind);
        let resp = self
            .send(what, self.request(Method::GET, url.clone()))
            .await?;
        if !resp.status().is_success() {
            return Err(answer::error(what, resp).await);
        }
        let next = header_str(resp.headers(), "link")
            .and_then(next_link)
            .map(str::to_owned);
        Ok((next, answer::body(what, resp, 64 << 20).await?))
    }
}
