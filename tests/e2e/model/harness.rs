//! Running a sequence against regfs and the model side by side: each operation is done
//! on the tree and its result compared with what the model says, then the whole tree.
//! Under a fault (or right after one) EIO is allowed, and a write or delete that failed
//! must have changed nothing in the registry.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use regfs::cache::memo::FAILURE_MEMORY;
use regfs::fs::Kind;

use super::generators::{Object, Op};
use super::reference::{Entry, Model, RepoModel, Res};
use super::trees::Tree;
use crate::common::{self, Proxy, ProxyRules, Registry, noise, push_image};

/// How long after a fault regfs may still answer EIO for what failed: FAILURE_MEMORY,
/// counted from the failure (before the fault ended), and a second for an answer
/// that was on its way when the fault ended, on a loaded machine.
pub const AFTER_FAULT: Duration = FAILURE_MEMORY.saturating_add(Duration::from_secs(1));
const REPOS: [&str; 2] = ["app", "db"];

/// proptest's failures, kept and run again first (see `sequences_that_failed_once_stay_fixed`
/// for why the sequences are kept by name too).
const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/e2e/model/model.regressions"
);

/// A proptest runner of `cases` sequences (or as many as `var` says), its failures kept
/// in `model.regressions` and run again first.
pub fn runner(var: &str, cases: u32, max_shrink_iters: u32) -> TestRunner {
    let cases = std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    TestRunner::new(Config {
        cases,
        max_shrink_iters,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..Config::default()
    })
}

/// The real registry, and the proxy that injects the faults in front of it.
pub fn registry_behind_a_proxy() -> (Registry, Proxy) {
    common::require_tools();
    let registry = Registry::start();
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    (registry, proxy)
}

/// One run: a namespace of its own in the shared registry, seeded with two images.
pub struct Run<'a> {
    pub(super) registry: &'a Registry,
    pub(super) proxy: &'a Proxy,
    pub(super) model: Model,
    /// `--allow-delete`: else every delete is EPERM.
    pub(super) allow_delete: bool,
    /// When the last fault ended: until AFTER_FAULT has passed, EIO is acceptable.
    pub(super) last_fault: Option<Instant>,
    pub(super) names: u32,
}

/// Namespaces of runs: each its own, in a registry the runs of a test share.
static RUNS: AtomicU32 = AtomicU32::new(0);

impl<'a> Run<'a> {
    pub fn new(registry: &'a Registry, proxy: &'a Proxy, tag: &str, allow_delete: bool) -> Run<'a> {
        let ns = format!("m{}{tag}", RUNS.fetch_add(1, Ordering::SeqCst));
        let mut model = Model::new(&ns);
        for (i, repo) in REPOS.iter().enumerate() {
            let full = format!("{ns}/{repo}");
            let (a, b) = (noise(300_000, 7 * i as u32), noise(5_000, 7 * i as u32 + 1));
            let (_, layers) = push_image(registry, &full, "v1", &[&a, &b]);
            let (_, _, bytes) = common::get_manifest(registry, &full, "v1");
            let json: serde_json::Value = serde_json::from_slice(&bytes).expect("manifest JSON");
            let config = json["config"]["digest"]
                .as_str()
                .expect("config")
                .to_owned();
            let config_bytes = common::get_blob(registry, &full, &config);
            let mut r = RepoModel::default();
            r.tags.insert("v1".into(), bytes);
            r.contents = BTreeMap::from([
                (config, config_bytes),
                (layers[0].clone(), a),
                (layers[1].clone(), b),
            ]);
            model.repos.insert((*repo).to_owned(), r);
        }
        Run {
            registry,
            proxy,
            model,
            allow_delete,
            last_fault: None,
            names: 0,
        }
    }

    pub(super) fn lenient(&self) -> bool {
        self.last_fault.is_some_and(|at| at.elapsed() < AFTER_FAULT)
    }

    pub(super) fn pick<T: Clone>(items: &[T], i: usize) -> Option<T> {
        (!items.is_empty()).then(|| items[i % items.len()].clone())
    }

    pub(super) fn repo(&self, i: usize) -> String {
        let names = self.model.repo_names();
        names[i % names.len()].clone()
    }

    pub(super) fn fresh(&mut self, prefix: &str) -> String {
        self.names += 1;
        format!("{prefix}{}", self.names)
    }

    /// `<ns>/<repo>`, as the registry names it.
    pub(super) fn full(&self, repo: &str) -> String {
        format!("{}/{repo}", self.model.ns)
    }

    /// A result where the model expects `expected`: equal, or (when lenient) EIO.
    pub(super) fn check<T: PartialEq + std::fmt::Debug>(
        &self,
        what: &str,
        got: Res<T>,
        expected: Res<T>,
    ) -> Result<(), TestCaseError> {
        if got == expected {
            return Ok(());
        }
        if self.lenient() && got == Err(libc::EIO) {
            return Ok(());
        }
        Err(TestCaseError::fail(format!(
            "{what}: regfs gave {got:?}, the model says {expected:?}"
        )))
    }

    pub(super) fn expected_stat(&self, path: &str) -> Res<(Kind, u64)> {
        match self.model.entry(path) {
            Some(Entry::Dir) => Ok((Kind::Dir, 0)),
            Some(Entry::File(b)) => Ok((Kind::File, b.len() as u64)),
            Some(Entry::Written(size)) => Ok((Kind::File, size)),
            Some(Entry::Link(t)) => Ok((Kind::Symlink, t.len() as u64)),
            None => Err(libc::ENOENT),
        }
    }

    /// The whole tree of this run, as the model has it.
    pub(super) fn compare_all(&self, tree: &mut dyn Tree) -> Result<(), TestCaseError> {
        for dir in self.model.dirs() {
            let expected = self.model.list(&dir).ok_or(libc::ENOENT);
            self.check(&format!("ls {dir}"), tree.list(&dir), expected)?;
            if let Some(names) = self.model.list(&dir) {
                for name in names {
                    let path = format!("{dir}/{name}");
                    // Directories are compared by their own listing.
                    if self.model.list(&path).is_none() {
                        self.check(
                            &format!("stat {path}"),
                            stat_dirs_as_zero(tree.stat(&path)),
                            self.expected_stat(&path),
                        )?;
                    }
                }
            }
        }
        for file in self.model.files() {
            if let Some(Entry::Link(target)) = self.model.entry(&file) {
                self.check(
                    &format!("readlink {file}"),
                    tree.readlink(&file),
                    Ok(target),
                )?;
            }
        }
        Ok(())
    }

    fn apply(&mut self, tree: &mut dyn Tree, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Faulty(inner) => {
                self.proxy.set_upstream_down(true);
                let result = self.apply_faulty(tree, inner);
                self.proxy.set_upstream_down(false);
                self.last_fault = Some(Instant::now());
                result
            }
            op => self.apply_plain(tree, op, false),
        }
    }

    fn apply_faulty(&mut self, tree: &mut dyn Tree, op: &Op) -> Result<(), TestCaseError> {
        self.last_fault = Some(Instant::now() + Duration::from_secs(3600));
        self.apply_plain(tree, op, true)
    }

    /// `faulty`: the registry is failing every request now.
    fn apply_plain(
        &mut self,
        tree: &mut dyn Tree,
        op: &Op,
        faulty: bool,
    ) -> Result<(), TestCaseError> {
        match op {
            Op::List(i) => self.list(tree, *i),
            Op::Stat(i) => self.stat(tree, *i),
            Op::Read { file, at, len } => self.read(tree, *file, *at, *len),
            Op::Upload { repo, size, piece } => self.upload(tree, *repo, *size, *piece, faulty),
            Op::OutOfOrder { repo } => self.out_of_order(tree, *repo, faulty),
            Op::TempAndRename { repo, size } => self.temp_and_rename(tree, *repo, *size, faulty),
            Op::Mkdir { id } => self.mkdir(tree, &format!("new{id}"), faulty),
            Op::MkdirP { ids } => self.mkdir_p(tree, ids, faulty),
            Op::Link { from, blob, to } => self.link(tree, *from, *blob, *to, faulty),
            Op::Tag {
                repo,
                config,
                layer,
            } => self.tag(tree, *repo, (*config, *layer), faulty),
            Op::RmTag {
                repo,
                tag,
                recursive,
            } => self.rm_tag(tree, *repo, *tag, *recursive, faulty),
            Op::RmManifest { repo, manifest } => {
                self.rm_object(tree, (*repo, Object::Manifest), *manifest, faulty)
            }
            Op::RmBlob { repo, blob } => self.rm_object(tree, (*repo, Object::Blob), *blob, faulty),
            Op::RmLink { repo, link } => self.rm_link(tree, *repo, *link, faulty),
            Op::Faulty(inner) => self.apply_faulty(tree, inner),
        }
    }

    /// Runs `ops`, comparing after each; at the end, once any fault is long enough
    /// past, everything strictly.
    pub fn run(&mut self, tree: &mut dyn Tree, ops: &[Op]) -> Result<(), TestCaseError> {
        for (i, op) in ops.iter().enumerate() {
            self.apply(tree, op)
                .map_err(|e| TestCaseError::fail(format!("step {i} {op:?}: {e}")))?;
            self.compare_all(tree)
                .map_err(|e| TestCaseError::fail(format!("after step {i} {op:?}: {e}")))?;
        }
        if let Some(at) = self.last_fault {
            std::thread::sleep(AFTER_FAULT.saturating_sub(at.elapsed()));
            self.last_fault = None;
        }
        self.compare_all(tree)
            .map_err(|e| TestCaseError::fail(format!("at the end: {e}")))
    }

    fn list(&self, tree: &mut dyn Tree, i: usize) -> Result<(), TestCaseError> {
        let Some(dir) = Self::pick(&self.model.dirs(), i) else {
            return Ok(());
        };
        let expected = self.model.list(&dir).ok_or(libc::ENOENT);
        self.check(&format!("ls {dir}"), tree.list(&dir), expected)
    }

    fn stat(&self, tree: &mut dyn Tree, i: usize) -> Result<(), TestCaseError> {
        let Some(file) = Self::pick(&self.model.files(), i) else {
            return Ok(());
        };
        self.check(
            &format!("stat {file}"),
            tree.stat(&file),
            self.expected_stat(&file),
        )
    }

    fn read(
        &self,
        tree: &mut dyn Tree,
        file: usize,
        at: u16,
        len: u32,
    ) -> Result<(), TestCaseError> {
        let Some(path) = Self::pick(&self.model.files(), file) else {
            return Ok(());
        };
        let expected = match self.model.entry(&path) {
            Some(Entry::File(bytes)) => bytes,
            // A link reads as what it points to.
            Some(Entry::Link(target)) => {
                let dir = path.rsplit_once("/uploads/").map_or("", |(d, _)| d);
                match self
                    .model
                    .entry(&format!("{dir}/{}", target.trim_start_matches("../")))
                {
                    Some(Entry::File(bytes)) => bytes,
                    // Its blob was deleted: the link stays, and leads nowhere.
                    None => {
                        let read = tree.read(&path, 0, len as usize).map(|_| ());
                        return self.check(&format!("read {path}"), read, Err(libc::ENOENT));
                    }
                    other => {
                        return Err(TestCaseError::fail(format!("{path}: link to {other:?}")));
                    }
                }
            }
            _ => return Ok(()),
        };
        let offset = (expected.len() as u64 * u64::from(at)) >> 16;
        let start = offset as usize;
        let end = (start + len as usize).min(expected.len());
        let want = Ok(expected[start..end].to_vec());
        self.check(
            &format!("read {path} at {offset}+{len}"),
            tree.read(&path, offset, len as usize),
            want,
        )
    }
}

/// A directory's size is whatever regfs says; compare kinds only for those.
fn stat_dirs_as_zero(got: Res<(Kind, u64)>) -> Res<(Kind, u64)> {
    got.map(|(kind, size)| {
        if kind == Kind::Dir {
            (kind, 0)
        } else {
            (kind, size)
        }
    })
}
