//! Which trees of image files are current (docs/SEMANTICS.md, "Shared indexes"). Files
//! shown from a zTOC that is refused later may have been shown under names or at places
//! the layer does not have; a node number handed out for them must never be answered
//! from the layer's pass, where the same number may name another file. So each root
//! carries the generation of what it shows (an image manifest, or a layer), and a
//! refused index moves every tree that used it to the next generation: nodes of the old
//! one fail (EIO), and the next lookup of the root (whose entry lives `--tag-ttl`)
//! shows the layer as its pass reads it, under new node numbers.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use crate::registry::Digest;

#[derive(Default)]
pub struct Generations {
    /// Of what a root shows; 0 when absent.
    current: Mutex<HashMap<Digest, u32>>,
    /// Layers served from a zTOC, and the images whose trees use them.
    users: Mutex<HashMap<Digest, HashSet<Digest>>>,
}

impl Generations {
    /// The generation of what shows `shown` (an image manifest or a layer digest).
    pub fn of(&self, shown: &Digest) -> u32 {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.get(shown).copied().unwrap_or(0)
    }

    /// The tree of `image` uses `layer`, whose index came from a zTOC.
    pub fn uses(&self, image: &Digest, layer: &Digest) {
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        users
            .entry(layer.clone())
            .or_default()
            .insert(image.clone());
    }

    /// The zTOC of `layer` was refused: every tree that used it is stale.
    pub fn refused(&self, layer: &Digest) {
        let images = self
            .users
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(layer)
            .unwrap_or_default();
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        for shown in images.iter().chain([layer]) {
            *current.entry(shown.clone()).or_default() += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_moves_the_trees_that_used_the_layer_only() {
        let g = Generations::default();
        let (image, other, layer) = (
            Digest::sha256_of(b"image"),
            Digest::sha256_of(b"other"),
            Digest::sha256_of(b"layer"),
        );
        g.uses(&image, &layer);
        assert_eq!((g.of(&image), g.of(&layer)), (0, 0));
        g.refused(&layer);
        assert_eq!((g.of(&image), g.of(&layer), g.of(&other)), (1, 1, 0));
        g.refused(&layer);
        assert_eq!(
            (g.of(&image), g.of(&layer)),
            (1, 2),
            "the image no longer uses it"
        );
    }
}
