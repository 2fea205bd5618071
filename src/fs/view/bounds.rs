//! How much the view of the registry may hold and ask at once: memos are weighed in
//! bytes, and walks keep a few requests in flight.

use std::future::Future;
use std::pin::Pin;

use futures_util::stream::{self, StreamExt};

/// Requests in flight at once when walking a repository's manifests.
const WALK_CONCURRENCY: usize = 8;
/// Roughly what a memo entry costs besides its own bytes (key, slot, map node).
pub const ENTRY_OVERHEAD: usize = 128;

type BoxedFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs the futures, at most WALK_CONCURRENCY at once, and gives their outputs (in the
/// order they finish). The futures are boxed so the compiler can see they are Send (a
/// known limit of its inference for closures in stream adapters).
pub async fn bounded<'a, T, F>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: Future<Output = T> + Send + 'a,
    T: 'a,
{
    let boxed: Vec<BoxedFuture<'a, T>> =
        futures.map(|f| Box::pin(f) as BoxedFuture<'a, T>).collect();
    stream::iter(boxed)
        .buffer_unordered(WALK_CONCURRENCY)
        .collect()
        .await
}
