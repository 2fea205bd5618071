//! The repository names regfs knows: the registry's catalog, and the names given with
//! `--repo` or found by lookups. Both are kept sorted and shared, so that a lookup of
//! one name, or a listing of one namespace, costs a search in them rather than a copy
//! of them (a registry of 5,000 repositories is looked up thousands of times a walk).

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::Arc;

use crate::registry::RepoName;

#[derive(Clone, Debug, Default)]
pub struct KnownRepos {
    /// The catalog, if the registry lists it.
    listed: Option<Arc<BTreeSet<RepoName>>>,
    /// Named with `--repo`, or found to exist.
    found: Arc<BTreeSet<RepoName>>,
}

impl KnownRepos {
    pub fn new(listed: Option<Arc<BTreeSet<RepoName>>>, found: Arc<BTreeSet<RepoName>>) -> Self {
        KnownRepos { listed, found }
    }

    /// Whether these are the registry's whole catalog (so a name missing from them
    /// does not exist).
    pub fn complete(&self) -> bool {
        self.listed.is_some()
    }

    fn sets(&self) -> impl Iterator<Item = &BTreeSet<RepoName>> {
        self.listed.as_deref().into_iter().chain([&*self.found])
    }

    pub fn contains(&self, repo: &RepoName) -> bool {
        self.sets().any(|set| set.contains(repo.as_str()))
    }

    /// The known names that start with `prefix` (e.g. "team/" for what is below
    /// `team`; "" for all), from each set in order; a name in both comes twice.
    pub fn starting_with<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a RepoName> {
        self.sets().flat_map(move |set| {
            set.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
                .take_while(move |name| name.as_str().starts_with(prefix))
        })
    }

    /// Whether a known repository lies below `path` (`path/...`).
    pub fn any_below(&self, path: &str) -> bool {
        let prefix = format!("{path}/");
        self.starting_with(&prefix).next().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> Arc<BTreeSet<RepoName>> {
        Arc::new(
            names
                .iter()
                .map(|n| RepoName::parse(n).expect("name"))
                .collect(),
        )
    }

    #[test]
    fn membership_and_what_lies_below() {
        let known = KnownRepos::new(
            Some(set(&["a", "a/b", "ab/c", "team/app", "team/db"])),
            set(&["team/app", "zz/top"]),
        );
        let repo = |n: &str| RepoName::parse(n).expect("name");
        assert!(known.complete());
        assert!(known.contains(&repo("a/b")) && known.contains(&repo("zz/top")));
        assert!(!known.contains(&repo("team")));
        assert!(known.any_below("team") && known.any_below("zz") && known.any_below("a"));
        assert!(!known.any_below("ab/c") && !known.any_below("t"));
        let below: Vec<&str> = known.starting_with("team/").map(RepoName::as_str).collect();
        assert_eq!(below, ["team/app", "team/db", "team/app"]);
        assert_eq!(known.starting_with("").count(), 7);
        assert!(!KnownRepos::new(None, set(&["x"])).complete());
    }
}
