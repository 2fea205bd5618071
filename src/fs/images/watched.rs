//! A layer's bytes for the index pass, watched: while the pass streams the layer, its
//! progress is listed in `/.regfs/stats` (`images.indexing`) for `regfs status`.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::cache::Reservation;
use crate::image::source::BlobSource;
use crate::registry::{Digest, Result};
use crate::stats::Stats;

pub struct Watched {
    pub inner: Arc<dyn BlobSource>,
    pub stats: Arc<Stats>,
}

impl BlobSource for Watched {
    fn digest(&self) -> &Digest {
        self.inner.digest()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes>> {
        self.inner.read(offset, len)
    }

    fn fetch_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes>> {
        self.inner.fetch_range(offset, len)
    }

    /// The whole blob, listed as being indexed until the stream is dropped.
    fn stream(&self) -> BoxStream<'_, Result<Bytes>> {
        let tracked = self
            .stats
            .indexing
            .start(self.digest().to_string(), self.size());
        Box::pin(self.inner.stream().inspect(move |piece| {
            if let Ok(bytes) = piece {
                tracked.advance(bytes.len() as u64);
            }
        }))
    }

    fn distrust(&self) {
        self.inner.distrust()
    }

    fn stream_piece(&self) -> u64 {
        self.inner.stream_piece()
    }

    fn working_memory(&self, bytes: u64) -> BoxFuture<'_, Option<Reservation>> {
        self.inner.working_memory(bytes)
    }
}
