//! A pull-through cache as people run one: distribution in `proxy:` mode whose origin is
//! another registry, with a fault proxy on each side to count what is asked (and, on
//! the origin's side, to shape the link between the two).

use super::api::push_image;
use super::{Registry, RegistryOptions};
use crate::common::proxy::{Proxy, ProxyRules};
use crate::common::require_tools;

/// origin ← `origin_front` ← cache ← `cache_front` ← regfs.
pub struct PullThrough {
    /// Holds `team/app:v1`, an image over [`PullThrough::layers`].
    pub origin: Registry,
    /// The cache's link to the origin: counts what the origin is asked (by the cache,
    /// and by regfs when mounted on it), and applies the link's rules.
    pub origin_front: Proxy,
    /// distribution in `proxy:` mode, pulling from `origin_front`.
    _cache: Registry,
    /// In front of the cache, counting what regfs asks.
    pub cache_front: Proxy,
    /// `team/app:v1`'s layers: (digest, bytes).
    pub layers: Vec<(String, Vec<u8>)>,
}

impl PullThrough {
    /// An origin with `team/app:v1` over `layers`, and a cold cache in front of it whose
    /// link to the origin follows `link` (e.g. a trickle, so the cache is still pulling
    /// a blob while regfs reads it).
    pub fn start(layers: Vec<Vec<u8>>, link: ProxyRules) -> PullThrough {
        require_tools();
        let origin = Registry::start();
        let blobs: Vec<&[u8]> = layers.iter().map(Vec::as_slice).collect();
        let (_, digests) = push_image(&origin, "team/app", "v1", &blobs);
        let origin_front = Proxy::start(origin.addr, link);
        let cache = Registry::start_with(&RegistryOptions {
            extra_config: format!("proxy:\n  remoteurl: {}\n", origin_front.url()),
            ..RegistryOptions::default()
        });
        let cache_front = Proxy::start(cache.addr, ProxyRules::default());
        PullThrough {
            origin,
            origin_front,
            _cache: cache,
            cache_front,
            layers: digests.into_iter().zip(layers).collect(),
        }
    }
}
