//! The files of an image: its layers applied in order as the OCI image spec says
//! (`rootfs/`), or one layer shown the way overlayfs expects a lower directory
//! (`.layers/<digest>/`).
//!
//! Applying a layer (image-spec "Applying Changesets"): first its whiteouts remove what
//! lower layers had (`.wh.<name>` one name, `.wh..wh..opq` every child of that
//! directory), so a whiteout never hides a file of its own layer; then its entries are
//! added in order, a later entry replacing an earlier one of the same path, except that
//! a directory over a directory only takes the new metadata and keeps the children.
//! Hardlinks name the same node from several directories (one inode, `nlink` names).
//! Nodes are numbered in the order they are made, so the same layers always give the
//! same numbers: an inode survives the tree being dropped and rebuilt.

use std::collections::BTreeMap;

use tracing::warn;

use super::entry::{Entry, EntryKind, shown, split_last};

pub const ROOT: u32 = 0;

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// Where a node's metadata (and content) comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A directory no entry declared (a parent implied by a deeper path).
    Implicit,
    /// `entries[index]` of layer `layer` (0 is the lowest).
    Entry { layer: u16, index: u32 },
}

#[derive(Clone, Debug)]
pub struct Node {
    pub origin: Origin,
    /// The node's own kind (a hardlink entry's node is the file it names).
    pub kind: EntryKind,
    /// Overlay view only: a whiteout shown as the char device 0:0 overlayfs expects.
    pub whiteout: bool,
    /// Overlay view only: `trusted.overlay.opaque=y`.
    pub opaque: bool,
    pub children: BTreeMap<Box<[u8]>, u32>,
    /// A directory's parent (for `..`); the root is its own.
    pub parent: u32,
    /// Names this node has (files), or 2 plus subdirectories (directories).
    pub nlink: u32,
    alive: bool,
}

impl Node {
    fn new(origin: Origin, kind: EntryKind, parent: u32) -> Node {
        Node {
            origin,
            kind,
            whiteout: false,
            opaque: false,
            children: BTreeMap::new(),
            parent,
            nlink: 1,
            alive: true,
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == EntryKind::Dir && !self.whiteout
    }
}

pub struct Tree {
    nodes: Vec<Node>,
    /// Memory held, roughly (set when the tree is finished).
    bytes: usize,
}

/// How entries are applied.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Whiteouts remove from lower layers (rootfs).
    Merge,
    /// Whiteouts are kept as overlayfs markers (one layer as a lowerdir).
    Overlay,
}

impl Tree {
    fn empty() -> Tree {
        let mut root = Node::new(Origin::Implicit, EntryKind::Dir, ROOT);
        root.nlink = 2;
        Tree {
            nodes: vec![root],
            bytes: 0,
        }
    }

    /// The image's files: `layers` from the lowest to the highest.
    pub fn merge(layers: &[&[Entry]]) -> Tree {
        let mut tree = Tree::empty();
        for (l, entries) in layers.iter().enumerate() {
            let layer = u16::try_from(l).unwrap_or(u16::MAX);
            for entry in entries.iter() {
                if let Some(target) = whiteout_target(entry) {
                    tree.whiteout(entry, target);
                }
            }
            for (i, entry) in entries.iter().enumerate() {
                // Whiteouts did their work above; `.wh.` names are never files of a
                // merged tree (the spec reserves the prefix).
                if !entry.name().starts_with(WHITEOUT) {
                    tree.add(layer, i as u32, entry, Mode::Merge);
                }
            }
        }
        tree.finish();
        tree
    }

    /// One layer as overlayfs expects a lower directory.
    pub fn overlay(entries: &[Entry]) -> Tree {
        let mut tree = Tree::empty();
        for (i, entry) in entries.iter().enumerate() {
            tree.add(0, i as u32, entry, Mode::Overlay);
        }
        tree.finish();
        tree
    }

    pub fn node(&self, id: u32) -> Option<&Node> {
        self.nodes.get(id as usize).filter(|n| n.alive)
    }

    /// The child `name` of directory `dir`.
    pub fn child(&self, dir: u32, name: &[u8]) -> Option<u32> {
        self.node(dir)?.children.get(name).copied()
    }

    /// The node at a normalised path.
    pub fn lookup(&self, path: &[u8]) -> Option<u32> {
        if path.is_empty() {
            return Some(ROOT);
        }
        path.split(|&b| b == b'/')
            .try_fold(ROOT, |dir, name| self.child(dir, name))
    }

    /// Live nodes (for stats and tests).
    pub fn len(&self) -> usize {
        self.nodes.iter().filter(|n| n.alive).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate memory held (for the budget of kept trees).
    pub fn heap_bytes(&self) -> usize {
        self.bytes
    }

    fn whiteout(&mut self, entry: &Entry, target: &[u8]) {
        let Some(dir) = self.lookup(entry.parent()) else {
            return; // nothing below to hide
        };
        if target.is_empty() {
            let names: Vec<Box<[u8]>> = self.nodes[dir as usize].children.keys().cloned().collect();
            for name in names {
                self.unlink(dir, &name);
            }
        } else {
            self.unlink(dir, target);
        }
    }

    fn add(&mut self, layer: u16, index: u32, entry: &Entry, mode: Mode) {
        let origin = Origin::Entry { layer, index };
        if entry.path.is_empty() {
            self.nodes[ROOT as usize].origin = origin; // the root's own metadata
            return;
        }
        let Some(dir) = self.make_dirs(entry.parent()) else {
            warn!(
                "{}: a parent is not a directory; entry not shown",
                shown(&entry.path)
            );
            return;
        };
        let name = entry.name();
        if mode == Mode::Overlay && name == OPAQUE {
            self.nodes[dir as usize].opaque = true;
            return;
        }
        let (name, whiteout) = match (mode, name.strip_prefix(WHITEOUT)) {
            (Mode::Overlay, Some(hidden)) if !hidden.is_empty() => (hidden, true),
            _ => (name, false),
        };
        if entry.kind == EntryKind::Hardlink {
            let target = entry
                .link
                .as_deref()
                .and_then(|t| self.lookup(t))
                .filter(|&t| !self.nodes[t as usize].is_dir() && !self.nodes[t as usize].whiteout);
            let Some(target) = target else {
                warn!(
                    "{}: hardlink to {}, which is not a file here; entry not shown",
                    shown(&entry.path),
                    shown(entry.link.as_deref().unwrap_or_default())
                );
                return;
            };
            if self.child(dir, name) == Some(target) {
                return;
            }
            self.unlink(dir, name);
            self.nodes[target as usize].nlink += 1;
            self.nodes[dir as usize]
                .children
                .insert(name.into(), target);
            return;
        }
        if let Some(existing) = self.child(dir, name) {
            let old = &mut self.nodes[existing as usize];
            if old.is_dir() && entry.kind == EntryKind::Dir && !whiteout {
                old.origin = origin;
                return;
            }
            self.unlink(dir, name);
        }
        let id = self.nodes.len() as u32;
        let mut node = Node::new(origin, entry.kind, dir);
        node.whiteout = whiteout;
        self.nodes.push(node);
        self.nodes[dir as usize].children.insert(name.into(), id);
    }

    /// The directory at `path`, made (implicitly) where missing; `None` if a component
    /// is not a directory.
    fn make_dirs(&mut self, path: &[u8]) -> Option<u32> {
        let mut dir = ROOT;
        if path.is_empty() {
            return Some(dir);
        }
        for name in path.split(|&b| b == b'/') {
            dir = match self.child(dir, name) {
                Some(id) if self.nodes[id as usize].is_dir() => id,
                Some(_) => return None,
                None => {
                    let id = self.nodes.len() as u32;
                    self.nodes
                        .push(Node::new(Origin::Implicit, EntryKind::Dir, dir));
                    self.nodes[dir as usize].children.insert(name.into(), id);
                    id
                }
            };
        }
        Some(dir)
    }

    /// Removes the name `name` from `dir`, and the node with its last name (a
    /// directory with everything below it).
    fn unlink(&mut self, dir: u32, name: &[u8]) {
        let Some(id) = self.nodes[dir as usize].children.remove(name) else {
            return;
        };
        let mut doomed = vec![id];
        while let Some(id) = doomed.pop() {
            let node = &mut self.nodes[id as usize];
            node.nlink = node.nlink.saturating_sub(1);
            if node.is_dir() || node.nlink == 0 {
                node.alive = false;
                doomed.extend(std::mem::take(&mut node.children).into_values());
            }
        }
    }

    fn finish(&mut self) {
        // A node, and per child name its bytes and a B-tree slot.
        self.bytes = self.nodes.len() * std::mem::size_of::<Node>()
            + self
                .nodes
                .iter()
                .flat_map(|n| n.children.keys())
                .map(|name| name.len() + 48)
                .sum::<usize>();
        for i in 0..self.nodes.len() {
            if self.nodes[i].alive && self.nodes[i].is_dir() {
                let subdirs = self.nodes[i]
                    .children
                    .values()
                    .filter(|&&c| self.nodes[c as usize].is_dir())
                    .count();
                self.nodes[i].nlink = 2 + subdirs as u32;
            }
        }
    }
}

/// For a whiteout entry, what it hides in its directory: a name, or empty for all
/// (opaque). `None` for other entries (and the reserved `.wh..wh.` names).
fn whiteout_target(entry: &Entry) -> Option<&[u8]> {
    let name = split_last(&entry.path).1;
    if name == OPAQUE {
        return Some(&[]);
    }
    let hidden = name.strip_prefix(WHITEOUT)?;
    (!hidden.is_empty() && !hidden.starts_with(WHITEOUT)).then_some(hidden)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::entry::DataRef;

    fn e(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.as_bytes().into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            link: None,
            rdev: (0, 0),
            xattrs: Vec::new(),
            data: DataRef::None,
        }
    }

    fn link(path: &str, target: &str) -> Entry {
        let mut l = e(path, EntryKind::Hardlink);
        l.link = Some(target.as_bytes().into());
        l
    }

    fn names(tree: &Tree, path: &str) -> Vec<String> {
        let dir = tree.lookup(path.as_bytes()).expect("dir exists");
        tree.node(dir)
            .expect("alive")
            .children
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    #[test]
    fn whiteouts_hide_lower_layers_only() {
        use EntryKind::*;
        let lower = vec![
            e("etc", Dir),
            e("etc/a", File),
            e("etc/b", File),
            e("opt", Dir),
            e("opt/x", File),
            e("opt/sub", Dir),
            e("opt/sub/y", File),
        ];
        let upper = vec![
            e("etc/.wh.a", File),
            e("etc/c", File),
            e("opt/new", File),
            e("opt/.wh..wh..opq", File),
            e("etc/.wh.c", File), // its own layer's c stays
        ];
        let tree = Tree::merge(&[&lower, &upper]);
        assert_eq!(names(&tree, "etc"), ["b", "c"]);
        assert_eq!(names(&tree, "opt"), ["new"]);
        assert_eq!(tree.lookup(b"opt/sub/y"), None);
    }

    #[test]
    fn later_entries_replace_and_dirs_merge() {
        use EntryKind::*;
        let l0 = vec![e("d", Dir), e("d/f", File), e("x", Dir), e("x/in", File)];
        let mut d_again = e("d", Dir);
        d_again.mode = 0o700;
        let l1 = vec![d_again, e("x", File)];
        let tree = Tree::merge(&[&l0, &l1]);
        let d = tree.lookup(b"d").expect("d");
        assert_eq!(
            tree.node(d).map(|n| n.origin),
            Some(Origin::Entry { layer: 1, index: 0 })
        );
        assert_eq!(names(&tree, "d"), ["f"]);
        let x = tree.lookup(b"x").expect("x");
        assert_eq!(tree.node(x).map(|n| n.kind), Some(File));
        assert_eq!(tree.lookup(b"x/in"), None);
    }

    #[test]
    fn hardlinks_share_a_node_and_count_names() {
        use EntryKind::*;
        let l0 = vec![
            e("a", File),
            link("b", "a"),
            link("dir/c", "a"),
            link("broken", "missing"),
        ];
        let tree = Tree::merge(&[&l0]);
        let a = tree.lookup(b"a").expect("a");
        assert_eq!(tree.lookup(b"b"), Some(a));
        assert_eq!(tree.lookup(b"dir/c"), Some(a));
        assert_eq!(tree.node(a).map(|n| n.nlink), Some(3));
        assert_eq!(tree.lookup(b"broken"), None);
        // A later layer deletes one name and replaces another.
        let l1 = vec![e(".wh.b", File), e("a", File)];
        let tree = Tree::merge(&[&l0, &l1]);
        let c = tree.lookup(b"dir/c").expect("c");
        assert_eq!(tree.node(c).map(|n| n.nlink), Some(1));
        assert_ne!(tree.lookup(b"a"), Some(c));
    }

    #[test]
    fn implicit_parents_and_blocked_paths() {
        use EntryKind::*;
        let l0 = vec![
            e("deep/er/file", File),
            e("plain", File),
            e("plain/under", File),
        ];
        let tree = Tree::merge(&[&l0]);
        assert!(tree.lookup(b"deep/er/file").is_some());
        let deep = tree.lookup(b"deep").expect("deep");
        assert_eq!(tree.node(deep).map(|n| n.origin), Some(Origin::Implicit));
        assert_eq!(tree.lookup(b"plain/under"), None);
        assert_eq!(tree.node(ROOT).map(|n| n.nlink), Some(3));
    }

    #[test]
    fn overlay_view_keeps_markers() {
        use EntryKind::*;
        let l = vec![
            e("etc", Dir),
            e("etc/.wh.gone", File),
            e("opt/.wh..wh..opq", File),
            e("opt/kept", File),
        ];
        let tree = Tree::overlay(&l);
        let gone = tree.lookup(b"etc/gone").expect("whiteout shown");
        assert!(tree.node(gone).is_some_and(|n| n.whiteout));
        let opt = tree.lookup(b"opt").expect("opt");
        assert!(tree.node(opt).is_some_and(|n| n.opaque));
        assert_eq!(names(&tree, "opt"), ["kept"]);
    }

    #[test]
    fn same_layers_same_numbers() {
        use EntryKind::*;
        let l0 = vec![e("a", Dir), e("a/b", File), e("c", File)];
        let (t1, t2) = (Tree::merge(&[&l0]), Tree::merge(&[&l0]));
        assert_eq!(t1.lookup(b"a/b"), t2.lookup(b"a/b"));
        assert_eq!(t1.lookup(b"c"), t2.lookup(b"c"));
    }
}
