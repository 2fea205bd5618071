//! The writing operations of a run (docs/SEMANTICS.md, "Writes"): uploads, out-of-order writes,
//! temp file and rename, mkdir (-p), `ln`, tags pushed; each checked in the registry
//! too: what succeeded is there, what failed left nothing.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::AFTER_FAULT;
use super::harness::Run;
use super::reference::Res;
use super::trees::Tree;
use crate::common::{self, blob_status, noise, sha256_digest};

impl Run<'_> {
    pub(super) fn upload(
        &mut self,
        tree: &mut dyn Tree,
        repo: usize,
        size: usize,
        piece: usize,
        faulty: bool,
    ) -> Result<(), TestCaseError> {
        let repo = self.repo(repo);
        let name = self.fresh("f");
        let content = noise(size, self.names * 7919 + self.model.ns.len() as u32);
        let pieces: Vec<(u64, &[u8])> = content
            .chunks(piece.max(1))
            .scan(0u64, |at, c| {
                let here = *at;
                *at += c.len() as u64;
                Some((here, c))
            })
            .collect();
        let path = format!("{}/{repo}/uploads/{name}", self.model.ns);
        let result = tree.write(&path, &pieces);
        self.wrote(&repo, Some(&name), content, result, faulty, &path)
    }

    pub(super) fn out_of_order(
        &mut self,
        tree: &mut dyn Tree,
        repo: usize,
        faulty: bool,
    ) -> Result<(), TestCaseError> {
        let repo = self.repo(repo);
        let name = self.fresh("bad");
        let content = noise(70_000, self.names);
        let path = format!("{}/{repo}/uploads/{name}", self.model.ns);
        // The second piece skips ahead.
        let pieces = [(0, &content[..30_000]), (40_000, &content[40_000..])];
        let result = tree.write(&path, &pieces);
        let may_fail = faulty || self.lenient();
        if !(result == Err(libc::EINVAL) || (may_fail && result == Err(libc::EIO))) {
            return Err(TestCaseError::fail(format!(
                "{path}: an out-of-order write gave {result:?}"
            )));
        }
        self.nothing_pushed(&repo, &content)
    }

    pub(super) fn temp_and_rename(
        &mut self,
        tree: &mut dyn Tree,
        repo: usize,
        size: usize,
        faulty: bool,
    ) -> Result<(), TestCaseError> {
        let repo = self.repo(repo);
        let (temp, name) = (self.fresh(".f"), self.fresh("f"));
        let content = noise(size, self.names * 31 + 3);
        let dir = format!("{}/{repo}/uploads", self.model.ns);
        let written = tree.write(&format!("{dir}/{temp}"), &[(0, &content)]);
        if written.is_err() {
            // (Under a fault, the upload may not even start.)
            if !((faulty || self.lenient()) && written == Err(libc::EIO)) {
                return Err(TestCaseError::fail(format!(
                    "{dir}/{temp}: writing a temp file gave {written:?}"
                )));
            }
            self.nothing_pushed(&repo, &content)?;
            // The temp file stays until removed, as rsync removes it after a
            // failure: once the registry answers again (and regfs has let go of
            // the failures it remembers), rm must work.
            self.proxy.set_upstream_down(false);
            std::thread::sleep(AFTER_FAULT);
            let removed = tree.unlink(&format!("{dir}/{temp}"));
            // ENOENT: the failure came before the file was created.
            prop_assert!(
                removed == Ok(()) || removed == Err(libc::ENOENT),
                "rm {}/{} after a failed write: {:?}",
                dir,
                temp,
                removed
            );
            return Ok(());
        }
        // Closed, not renamed yet: listed with its size, nothing pushed.
        self.model
            .repos
            .entry(repo.clone())
            .or_default()
            .temps
            .insert(temp.clone(), content.len() as u64);
        let listed = tree.list(&dir);
        self.check(
            &format!("ls {dir}"),
            listed,
            self.model.list(&dir).ok_or(libc::ENOENT),
        )?;
        let renamed = tree.rename(&format!("{dir}/{temp}"), &format!("{dir}/{name}"));
        if let Some(r) = self.model.repos.get_mut(&repo) {
            r.temps.remove(&temp);
        }
        self.wrote(
            &repo,
            Some(&name),
            content,
            renamed,
            faulty,
            &format!("rename onto {dir}/{name}"),
        )
    }

    /// `mkdir <ns>/<rel>`.
    pub(super) fn mkdir(
        &mut self,
        tree: &mut dyn Tree,
        rel: &str,
        faulty: bool,
    ) -> Result<(), TestCaseError> {
        let path = format!("{}/{rel}", self.model.ns);
        let exists = self.model.exists(rel);
        let result = tree.mkdir(&path);
        let expected = if exists { Err(libc::EEXIST) } else { Ok(()) };
        if result.is_ok() && !exists {
            self.model.made_dir(rel);
        }
        // mkdir asks the registry whether the name exists: under a fault, EIO.
        if (faulty || self.lenient()) && result == Err(libc::EIO) {
            return Ok(());
        }
        self.check(&format!("mkdir {path}"), result, expected)
    }

    /// `mkdir -p`: each directory on the way, those that exist being EEXIST.
    pub(super) fn mkdir_p(
        &mut self,
        tree: &mut dyn Tree,
        ids: &[u8],
        faulty: bool,
    ) -> Result<(), TestCaseError> {
        let mut rel = String::new();
        for (i, id) in ids.iter().enumerate() {
            rel = if i == 0 {
                format!("new{id}")
            } else {
                format!("{rel}/sub{id}")
            };
            self.mkdir(tree, &rel, faulty)?;
            if !self.model.exists(&rel) {
                // Failed under a fault: `mkdir -p` stops there.
                return Ok(());
            }
        }
        Ok(())
    }

    pub(super) fn link(
        &mut self,
        tree: &mut dyn Tree,
        from: usize,
        blob: usize,
        to: usize,
        faulty: bool,
    ) -> Result<(), TestCaseError> {
        let (from, to) = (self.repo(from), self.repo(to));
        let Some(blobs) = self.model.repos.get(&from).map(|r| r.blobs()) else {
            return Ok(());
        };
        let digests: Vec<String> = blobs.keys().cloned().collect();
        let Some(digest) = Self::pick(&digests, blob) else {
            return Ok(());
        };
        let ns = self.model.ns.clone();
        let result = tree.link(
            &format!("{ns}/{from}/blobs/{digest}"),
            &format!("{ns}/{to}/blobs/{digest}"),
        );
        let there = self
            .model
            .repos
            .get(&to)
            .is_some_and(|r| r.contents.contains_key(&digest));
        if there {
            let what = format!("ln to {to}/blobs/{digest}, which exists");
            return self.check(&what, result, Err(libc::EEXIST));
        }
        match result {
            Ok(()) => {
                self.model.pushed_blob(&to, None, blobs[&digest].clone());
                Ok(())
            }
            Err(libc::EIO) if faulty || self.lenient() => Ok(()),
            other => Err(TestCaseError::fail(format!(
                "ln {from}/blobs/{digest} {to}/blobs/: {other:?}"
            ))),
        }
    }

    /// `mkdir <repo>/tags/<new>`, then a manifest over the blobs picked as config and
    /// layer written into its `manifest.json`.
    pub(super) fn tag(
        &mut self,
        tree: &mut dyn Tree,
        repo: usize,
        (config, layer): (usize, usize),
        faulty: bool,
    ) -> Result<(), TestCaseError> {
        let repo = self.repo(repo);
        let Some(r) = self.model.repos.get(&repo) else {
            return Ok(());
        };
        let blobs: Vec<(String, usize)> = r
            .blobs()
            .iter()
            .map(|(d, b)| (d.clone(), b.len()))
            .collect();
        let (Some(config), Some(layer)) = (Self::pick(&blobs, config), Self::pick(&blobs, layer))
        else {
            return Ok(());
        };
        let manifest = common::oci_manifest(&config.0, config.1, &[(&layer.0, layer.1)]);
        let tag = self.fresh("t");
        let dir = format!("{}/{repo}/tags/{tag}", self.model.ns);
        let may_fail = faulty || self.lenient();
        match tree.mkdir(&dir) {
            Ok(()) => {}
            Err(libc::EIO) if may_fail => return Ok(()),
            other => return self.check(&format!("mkdir {dir}"), other, Ok(())),
        }
        let made = self.model.repos.entry(repo.clone()).or_default();
        made.tag_dirs.insert(tag.clone());
        let result = tree.write(&format!("{dir}/manifest.json"), &[(0, &manifest)]);
        let full = self.full(&repo);
        match result {
            Ok(()) => {
                prop_assert_eq!(
                    common::manifest_status(self.registry.addr, &full, &tag),
                    200,
                    "{}/manifest.json: committed, but the registry lacks the tag",
                    dir
                );
                self.model.pushed_tag(&repo, &tag, manifest);
                Ok(())
            }
            Err(libc::EIO) if may_fail => {
                let status = common::manifest_status(self.registry.addr, &full, &tag);
                prop_assert_eq!(status, 404, "a failed manifest write pushed {}", tag);
                Ok(())
            }
            other => Err(TestCaseError::fail(format!(
                "{dir}/manifest.json: {other:?}"
            ))),
        }
    }

    /// After a write that should have pushed `content` into `repo` (linked as `link`):
    /// success means the registry has it, and the model too; a failure (only under a
    /// fault) means nothing was pushed.
    fn wrote(
        &mut self,
        repo: &str,
        link: Option<&str>,
        content: Vec<u8>,
        result: Res<()>,
        faulty: bool,
        what: &str,
    ) -> Result<(), TestCaseError> {
        let full = self.full(repo);
        let digest = sha256_digest(&content);
        match result {
            Ok(()) => {
                prop_assert_eq!(
                    blob_status(self.registry.addr, &full, &digest),
                    200,
                    "{}: committed, but the registry lacks it",
                    what
                );
                self.model.pushed_blob(repo, link, content);
                Ok(())
            }
            Err(libc::EIO) if faulty || self.lenient() => self.nothing_pushed(repo, &content),
            other => Err(TestCaseError::fail(format!("{what}: {other:?}"))),
        }
    }

    fn nothing_pushed(&self, repo: &str, content: &[u8]) -> Result<(), TestCaseError> {
        let full = self.full(repo);
        let status = blob_status(self.registry.addr, &full, &sha256_digest(content));
        prop_assert_eq!(status, 404, "a failed write left its blob in the registry");
        Ok(())
    }
}
