//! Indexes held for their children (docs/SEMANTICS.md, "Writes"), as kept on disk so
//! that an unmount does not lose them: the repository, the reference, then the body.

use bytes::Bytes;

use crate::registry::{Reference, RepoName};

/// An index held until its children are pushed, as kept on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldIndex {
    pub repo: RepoName,
    pub reference: Reference,
    pub body: Bytes,
}

pub fn encode_held(held: &HeldIndex) -> Vec<u8> {
    let mut body = format!("{}\n{}\n", held.repo, held.reference).into_bytes();
    body.extend_from_slice(&held.body);
    body
}

pub fn decode_held(body: Bytes) -> Option<HeldIndex> {
    let mut parts = body.splitn(3, |&b| b == b'\n');
    let repo = RepoName::parse(std::str::from_utf8(parts.next()?).ok()?)?;
    let reference = Reference::parse(std::str::from_utf8(parts.next()?).ok()?)?;
    let rest = parts.next()?.len();
    Some(HeldIndex {
        repo,
        reference,
        body: body.slice(body.len() - rest..),
    })
}
