//! Files served through a zTOC (content.rs): right bytes for an honest zTOC, and for
//! every lie an error, never a wrong byte, with the index refused once.

use std::sync::{Arc, Mutex};

use super::layer_index::index_from_ztoc;
use super::tests::{Indexed, sample_layer, ztoc_of};
use super::ztoc::{Zinfo, Ztoc};
use crate::cache::BlockCache;
use crate::image::codec::Codec;
use crate::image::content::{LayerContent, Readers};
use crate::image::entry::DataRef;
use crate::image::index::IndexSource;
use crate::image::source::mem::MemSource;
use crate::registry::Digest;
use crate::stats::Stats;

/// A layer served from `z`, and the refusals its hook was told of.
fn served(l: &Indexed, z: &Ztoc, vouched: bool) -> (LayerContent, Arc<Mutex<Vec<String>>>) {
    let pieces = Arc::new(BlockCache::new(1 << 20, 64 << 20, Arc::default()));
    served_with(l, z, vouched, pieces)
}

/// [`served`] with checked pieces kept in `pieces` (and counted in its budget).
fn served_with(
    l: &Indexed,
    z: &Ztoc,
    vouched: bool,
    pieces: Arc<BlockCache>,
) -> (LayerContent, Arc<Mutex<Vec<String>>>) {
    let bytes = z.encode();
    let source = IndexSource::Soci {
        index: Digest::sha256_of(b"the index"),
        ztoc: Digest::sha256_of(&bytes),
        vouched,
        checked: false,
    };
    let (index, _) =
        index_from_ztoc(&bytes, Codec::Gzip, l.blob.len() as u64, source).expect("a zTOC");
    let told = Arc::new(Mutex::new(Vec::new()));
    let hook_told = told.clone();
    let stats = Arc::new(Stats::default());
    let readers = Readers {
        pieces,
        ahead: Arc::new(BlockCache::new(1 << 20, 16 << 20, stats.clone())),
        stats,
        refused: Some(Arc::new(move |_: &Digest, _: &IndexSource, why: &str| {
            hook_told.lock().expect("lock").push(why.to_owned())
        })),
    };
    let blob = Arc::new(MemSource::new(l.blob.clone()));
    (LayerContent::new(Arc::new(index), blob, readers), told)
}

/// Reads `len` bytes at `offset` of entry `i`, and what the tar says they are.
async fn read(
    c: &LayerContent,
    tar: &[u8],
    i: usize,
    offset: u64,
    len: u64,
) -> (Result<Vec<u8>, String>, Vec<u8>) {
    let entry = &c.index().entries[i];
    let DataRef::Stream(at) = entry.data else {
        panic!("a file with data");
    };
    let start = (at + offset) as usize;
    let want = tar[start..start + len as usize].to_vec();
    let got = c
        .read(entry, offset, len)
        .await
        .map(|b| b.to_vec())
        .map_err(|e| e.to_string());
    (got, want)
}

/// A read decodes within its working memory, given back when it is done; the decoder
/// it leaves for the next read counts in the budget until the layer lets it go.
#[tokio::test]
async fn decoders_count_in_the_memory_budget() {
    let (tar, l) = sample_layer();
    let stats = Arc::new(Stats::default());
    let pieces = Arc::new(BlockCache::new(1 << 20, 64 << 20, stats.clone()));
    let (c, _) = served_with(&l, &ztoc_of(&l), true, pieces.clone());
    let limit = pieces.limit().expect("a budget").clone();
    let (got, want) = read(&c, &tar, 1, 11 << 20, 5000).await;
    assert!(got.as_deref() == Ok(&want[..]));
    let working = stats
        .memory_working
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(working, 0, "given back");
    assert!(
        limit.room_for_cache() < 64 << 20,
        "a decoder kept idle counts beside the cache"
    );
    drop(c);
    assert_eq!(limit.room_for_cache(), 64 << 20);
}

#[tokio::test]
async fn an_honest_ztoc_serves_every_file() {
    let (tar, l) = sample_layer();
    let (c, told) = served(&l, &ztoc_of(&l), false);
    for (i, e) in c.index().entries.clone().iter().enumerate() {
        let (got, want) = read(&c, &tar, i, 0, e.size).await;
        assert!(got.as_deref() == Ok(&want[..]), "{:?}", e.path);
    }
    // Deep inside the big file: its checkpoint proven from the span before it.
    let (got, want) = read(&c, &tar, 1, 11 << 20, 5000).await;
    assert!(got.as_deref() == Ok(&want[..]));
    assert!(told.lock().expect("lock").is_empty());
    assert_eq!(c.refusal(), None);
}

#[tokio::test]
async fn a_tampered_span_digest_is_an_error_and_refuses_the_index() {
    let (tar, l) = sample_layer();
    let mut z = ztoc_of(&l);
    z.span_digests[2][0] ^= 1;
    let (c, told) = served(&l, &z, false);
    let (got, _) = read(&c, &tar, 1, 9 << 20, 1000).await;
    assert!(
        got.expect_err("span 2")
            .contains("does not match its digest")
    );
    assert_eq!(told.lock().expect("lock").len(), 1);
    // Refused: even what was right before fails now.
    assert!(read(&c, &tar, 0, 0, 5).await.0.is_err());
}

#[tokio::test]
async fn a_changed_window_is_never_decoded_into_bytes() {
    let (tar, l) = sample_layer();
    let mut z = ztoc_of(&l);
    if let Zinfo::Gzip(g) = &mut z.zinfo {
        g.checkpoints[2].window.iter_mut().for_each(|b| *b = b'#');
    }
    let at = l.checkpoints[2].out;
    let (c, told) = served(&l, &z, false);
    let DataRef::Stream(big) = c.index().entries[1].data else {
        panic!("data");
    };
    let (got, _) = read(&c, &tar, 1, at - big, 4096).await;
    assert!(got.expect_err("window").contains("checkpoint 2"));
    assert_eq!(told.lock().expect("lock").len(), 1);
    // Vouched for by the image: used as it is (nothing proves it), so the lie shows
    // as wrong bytes only the background check can catch; this is why only an index
    // the image names is vouched for.
    let (c, _) = served(&l, &z, true);
    let (got, want) = read(&c, &tar, 1, at - big, 4096).await;
    assert!(got.is_err() || got.as_deref() != Ok(&want[..]));
}

#[tokio::test]
async fn files_swapped_or_overlapping_are_caught() {
    let (tar, l) = sample_layer();
    let mut z = ztoc_of(&l);
    // Two files swap names and sizes: each points at the other's genuine bytes.
    let (a, b) = (z.files[0].clone(), z.files[2].clone());
    (z.files[0].name, z.files[0].size) = (b.name.clone(), b.size);
    (z.files[2].name, z.files[2].size) = (a.name.clone(), a.size);
    let (c, told) = served(&l, &z, false);
    for i in [0, 2] {
        let entry = &c.index().entries[i];
        assert!(
            c.read(entry, 0, entry.size).await.is_err(),
            "{:?}",
            entry.path
        );
    }
    assert_eq!(told.lock().expect("lock").len(), 1, "refused once");
    // A file placed inside another's data is refused when the zTOC is read.
    let mut z = ztoc_of(&l);
    z.files[2].header_offset = z.files[1].offset + 4096;
    z.files[2].offset = z.files[2].header_offset + 512;
    let bytes = z.encode();
    let size = l.blob.len() as u64;
    assert!(index_from_ztoc(&bytes, Codec::Gzip, size, IndexSource::Pass).is_err());
    let _ = tar;
}
