//! The operations a sequence is made of, and proptest's strategies for them. Indexes
//! (`usize`) pick among what the model has when the operation runs.

use proptest::prelude::*;

/// What `rm` of a registry object names by digest.
#[derive(Clone, Copy, Debug)]
pub enum Object {
    Manifest,
    Blob,
}

#[derive(Clone, Debug)]
pub enum Op {
    /// `ls` of one of the model's directories (picked by index).
    List(usize),
    /// lstat of one of the model's files.
    Stat(usize),
    /// A read of `len` bytes at a fraction of a file's size.
    Read { file: usize, at: u16, len: u32 },
    /// `cp` of fresh content into `<repo>/uploads/<name>`, written in pieces.
    Upload {
        repo: usize,
        size: usize,
        piece: usize,
    },
    /// A write at the wrong offset in an upload: EINVAL, and nothing committed.
    OutOfOrder { repo: usize },
    /// rsync's way: a temp name, closed, then renamed onto the final name.
    TempAndRename { repo: usize, size: usize },
    /// `mkdir <ns>/new<i>`.
    Mkdir { id: u8 },
    /// `mkdir -p <ns>/new<i>/sub<j>[/sub<k>]`: new repositories below new namespaces.
    MkdirP { ids: Vec<u8> },
    /// `ln <a>/blobs/<d> <b>/blobs/<d>` of one of a's blobs.
    Link { from: usize, blob: usize, to: usize },
    /// `mkdir <repo>/tags/<new>`, then a manifest over two of the repository's blobs
    /// written into its `manifest.json`: a tag pushed as rsync restores one.
    Tag {
        repo: usize,
        config: usize,
        layer: usize,
    },
    /// `rm <repo>/tags/<tag>/manifest.json` (untag), then with `recursive` the tag's
    /// directory too, as `rm -r <repo>/tags/<tag>` does.
    RmTag {
        repo: usize,
        tag: usize,
        recursive: bool,
    },
    /// `rm <repo>/manifests/<digest>`: the manifest and the tags naming it.
    RmManifest { repo: usize, manifest: usize },
    /// `rm <repo>/blobs/<digest>`.
    RmBlob { repo: usize, blob: usize },
    /// `rm <repo>/uploads/<name>`: the link only, the blob stays.
    RmLink { repo: usize, link: usize },
    /// One of the above while the registry answers every request with 502.
    Faulty(Box<Op>),
}

/// What one sequence runs: its operations, on a mount with or without `--allow-delete`.
#[derive(Clone, Debug)]
pub struct Sequence {
    pub allow_delete: bool,
    pub ops: Vec<Op>,
}

fn write_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (any::<usize>(), 0..400_000usize, 1..200_000usize).prop_map(|(repo, size, piece)| Op::Upload { repo, size, piece }),
        1 => any::<usize>().prop_map(|repo| Op::OutOfOrder { repo }),
        1 => (any::<usize>(), 1..200_000usize).prop_map(|(repo, size)| Op::TempAndRename { repo, size }),
        1 => (0..3u8).prop_map(|id| Op::Mkdir { id }),
        1 => prop::collection::vec(0..3u8, 2..=3).prop_map(|ids| Op::MkdirP { ids }),
        1 => (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(from, blob, to)| Op::Link { from, blob, to }),
        1 => (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(repo, config, layer)| Op::Tag { repo, config, layer }),
    ]
}

fn delete_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<usize>(), any::<usize>(), any::<bool>()).prop_map(|(repo, tag, recursive)| {
            Op::RmTag {
                repo,
                tag,
                recursive,
            }
        }),
        (any::<usize>(), any::<usize>())
            .prop_map(|(repo, manifest)| Op::RmManifest { repo, manifest }),
        (any::<usize>(), any::<usize>()).prop_map(|(repo, blob)| Op::RmBlob { repo, blob }),
        (any::<usize>(), any::<usize>()).prop_map(|(repo, link)| Op::RmLink { repo, link }),
    ]
}

/// Any operation, without faults.
pub fn plain_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<usize>().prop_map(Op::List),
        2 => any::<usize>().prop_map(Op::Stat),
        4 => (any::<usize>(), any::<u16>(), 1..300_000u32).prop_map(|(file, at, len)| Op::Read { file, at, len }),
        8 => write_op(),
        3 => delete_op(),
    ]
}

/// Any operation, one in ten under a fault.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        9 => plain_op(),
        1 => plain_op().prop_map(|op| Op::Faulty(Box::new(op))),
    ]
}

/// `len` operations from `ops`, on a mount that deletes or not.
pub fn sequence(
    ops: impl Strategy<Value = Op>,
    len: std::ops::Range<usize>,
) -> impl Strategy<Value = Sequence> {
    (any::<bool>(), prop::collection::vec(ops, len))
        .prop_map(|(allow_delete, ops)| Sequence { allow_delete, ops })
}
