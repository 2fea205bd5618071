//! The deleting operations of a run (docs/SEMANTICS.md, "Deletes"): EPERM without
//! `--allow-delete`; with it, an untag, a manifest, a blob or an `uploads/` link goes,
//! and never more than it names (EBUSY instead). Checked in the registry too: what was
//! deleted is gone there, and a delete that failed deleted nothing.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::generators::Object;
use super::harness::Run;
use super::reference::Res;
use super::trees::Tree;
use crate::common::{blob_status, manifest_status};

/// What the registry holds of what a delete names: a tag, a manifest or a blob.
enum Named<'a> {
    Tag(&'a str),
    Manifest(&'a str),
    Blob(&'a str),
}

impl Run<'_> {
    /// `expected` if deletes are allowed, else EPERM.
    fn allowed(&self, expected: Res<()>) -> Res<()> {
        if self.allow_delete {
            expected
        } else {
            Err(libc::EPERM)
        }
    }

    /// The registry's status (200 or 404) for what a delete in `repo` names.
    fn status(&self, repo: &str, named: &Named) -> u16 {
        let (addr, full) = (self.registry.addr, self.full(repo));
        match named {
            Named::Tag(reference) | Named::Manifest(reference) => {
                manifest_status(addr, &full, reference)
            }
            Named::Blob(digest) => blob_status(addr, &full, digest),
        }
    }

    /// Checks a delete's result against the model's; true if it deleted, which the
    /// registry must show. A delete that failed (EIO, under a fault) deleted nothing.
    fn deleted(
        &self,
        what: &str,
        result: Res<()>,
        expected: Res<()>,
        (repo, named): (&str, Named),
        faulty: bool,
    ) -> Result<bool, TestCaseError> {
        if result == Err(libc::EIO) && (faulty || self.lenient()) {
            prop_assert_eq!(
                self.status(repo, &named),
                200,
                "{} failed, yet deleted",
                what
            );
            return Ok(false);
        }
        self.check(what, result, expected)?;
        if result.is_ok() {
            prop_assert_eq!(
                self.status(repo, &named),
                404,
                "{}: the registry still has it",
                what
            );
        }
        Ok(result.is_ok())
    }

    /// `rm <repo>/tags/<tag>/manifest.json`, then `rmdir` of the tag's directory when
    /// `recursive` (that is `rm -r <repo>/tags/<tag>`).
    pub(super) fn rm_tag(
        &mut self,
        tree: &mut dyn Tree,
        repo: usize,
        tag: usize,
        recursive: bool,
        faulty: bool,
    ) -> Result<(), TestCaseError> {
        let repo = self.repo(repo);
        let tags: Vec<String> = match self.model.repos.get(&repo) {
            Some(r) => r.tags.keys().cloned().collect(),
            None => return Ok(()),
        };
        let Some(tag) = Self::pick(&tags, tag) else {
            return Ok(());
        };
        let dir = format!("{}/{repo}/tags/{tag}", self.model.ns);
        let what = format!("rm {dir}/manifest.json");
        let result = tree.unlink(&format!("{dir}/manifest.json"));
        let expected = self.allowed(self.model.untag(&repo, &tag));
        if !self.deleted(&what, result, expected, (&repo, Named::Tag(&tag)), faulty)? {
            return Ok(());
        }
        self.model.untagged(&repo, &tag);
        if !recursive {
            return Ok(());
        }
        match tree.rmdir(&dir) {
            Ok(()) => {
                if let Some(r) = self.model.repos.get_mut(&repo) {
                    r.tag_dirs.remove(&tag);
                }
                Ok(())
            }
            Err(libc::EIO) if faulty || self.lenient() => Ok(()),
            other => self.check(&format!("rmdir {dir}"), other, Ok(())),
        }
    }

    /// `rm <repo>/manifests/<digest>` (it goes with the tags naming it) or `rm
    /// <repo>/blobs/<digest>` (EBUSY while a tagged image uses it).
    pub(super) fn rm_object(
        &mut self,
        tree: &mut dyn Tree,
        (repo, object): (usize, Object),
        i: usize,
        faulty: bool,
    ) -> Result<(), TestCaseError> {
        let repo = self.repo(repo);
        let digests: Vec<String> = match (self.model.repos.get(&repo), object) {
            (Some(r), Object::Manifest) => r.manifests().into_keys().collect(),
            (Some(r), Object::Blob) => r.blobs().into_keys().collect(),
            (None, _) => return Ok(()),
        };
        let Some(digest) = Self::pick(&digests, i) else {
            return Ok(());
        };
        let (dir, expected, named) = match object {
            Object::Manifest => ("manifests", Ok(()), Named::Manifest(&digest)),
            Object::Blob => {
                let expected = self.model.delete_blob(&repo, &digest);
                ("blobs", expected, Named::Blob(&digest))
            }
        };
        let path = format!("{}/{repo}/{dir}/{digest}", self.model.ns);
        let result = tree.unlink(&path);
        let (what, expected) = (format!("rm {path}"), self.allowed(expected));
        if self.deleted(&what, result, expected, (&repo, named), faulty)? {
            match object {
                Object::Manifest => self.model.deleted_manifest(&repo, &digest),
                Object::Blob => self.model.deleted_blob(&repo, &digest),
            }
        }
        Ok(())
    }

    /// `rm <repo>/uploads/<name>`: the link goes (a name this mount keeps), the blob
    /// stays.
    pub(super) fn rm_link(
        &mut self,
        tree: &mut dyn Tree,
        repo: usize,
        link: usize,
        faulty: bool,
    ) -> Result<(), TestCaseError> {
        let repo = self.repo(repo);
        let names: Vec<String> = match self.model.repos.get(&repo) {
            Some(r) => r.links.keys().cloned().collect(),
            None => return Ok(()),
        };
        let Some(name) = Self::pick(&names, link) else {
            return Ok(());
        };
        let path = format!("{}/{repo}/uploads/{name}", self.model.ns);
        let result = tree.unlink(&path);
        if result == Err(libc::EIO) && (faulty || self.lenient()) {
            return Ok(());
        }
        self.check(&format!("rm {path}"), result, self.allowed(Ok(())))?;
        if result.is_ok()
            && let Some(r) = self.model.repos.get_mut(&repo)
        {
            r.links.remove(&name);
        }
        Ok(())
    }
}
