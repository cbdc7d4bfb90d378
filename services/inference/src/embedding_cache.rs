//! Sentence embeddings of recently classified texts, by content digest (sha256). System prompts,
//! tool schemas, greetings and the message both the gateway and the router classify repeat; a
//! hit costs a hash and a map look-up instead of an encoder pass.
//!
//! Bounded and recency-ordered with two generations: new entries go into the young map; when it
//! holds half the capacity it becomes the old one (the previous old map is dropped whole), and a
//! hit in the old map moves the entry back to the young one. So at most `capacity` entries are
//! kept, everything used within the last `capacity / 2` insertions survives, and every operation
//! is O(1) with no per-entry bookkeeping.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

/// The sha256 of a text.
pub type TextDigest = [u8; 32];

/// The digest a text is cached under.
pub fn digest(text: &str) -> TextDigest {
    Sha256::digest(text.as_bytes()).into()
}

/// A bounded cache of embeddings by text digest; safe to share between requests.
pub struct EmbeddingCache {
    generations: Mutex<Generations>,
    /// Entries per generation (half the capacity); 0 disables the cache.
    half: usize,
}

#[derive(Default)]
struct Generations {
    young: HashMap<TextDigest, Arc<[f32]>>,
    old: HashMap<TextDigest, Arc<[f32]>>,
}

impl EmbeddingCache {
    /// A cache keeping at most `capacity` embeddings (0: keeps none).
    pub fn new(capacity: usize) -> Self {
        Self { generations: Mutex::new(Generations::default()), half: capacity / 2 }
    }

    /// The embedding of the text with this digest, if cached.
    pub fn get(&self, key: &TextDigest) -> Option<Arc<[f32]>> {
        if self.half == 0 {
            return None;
        }
        let mut g = self.generations.lock();
        if let Some(found) = g.young.get(key) {
            return Some(found.clone());
        }
        let found = g.old.remove(key)?;
        self.insert_young(&mut g, *key, found.clone());
        Some(found)
    }

    /// Keeps `embedding` for the text with this digest.
    pub fn insert(&self, key: TextDigest, embedding: Arc<[f32]>) {
        if self.half == 0 {
            return;
        }
        let mut g = self.generations.lock();
        g.old.remove(&key);
        self.insert_young(&mut g, key, embedding);
    }

    fn insert_young(&self, g: &mut Generations, key: TextDigest, embedding: Arc<[f32]>) {
        if g.young.len() >= self.half && !g.young.contains_key(&key) {
            g.old = std::mem::take(&mut g.young);
        }
        g.young.insert(key, embedding);
    }

    /// Embeddings held now.
    pub fn len(&self) -> usize {
        let g = self.generations.lock();
        g.young.len() + g.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(v: f32) -> Arc<[f32]> {
        Arc::from(vec![v])
    }

    #[test]
    fn entries_come_back_by_the_digest_of_their_text() {
        let cache = EmbeddingCache::new(8);
        cache.insert(digest("hello"), vector(1.0));
        assert_eq!(cache.get(&digest("hello")).as_deref(), Some(&[1.0][..]));
        assert!(cache.get(&digest("hello ")).is_none());
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity_and_keeps_what_is_used() {
        let cache = EmbeddingCache::new(4);
        let key = |i: usize| digest(&format!("text {i}"));
        cache.insert(key(0), vector(0.0));
        for i in 1..100 {
            cache.insert(key(i), vector(i as f32));
            // Text 0 is read between insertions (a system prompt every request carries).
            assert!(cache.get(&key(0)).is_some(), "text 0 evicted after {i} insertions");
            assert!(cache.len() <= 4, "{} entries", cache.len());
        }
        // Older texts that nobody read again are gone.
        assert!(cache.get(&key(1)).is_none());
        assert!(cache.get(&key(99)).is_some());
    }

    #[test]
    fn a_zero_capacity_keeps_nothing() {
        let cache = EmbeddingCache::new(0);
        cache.insert(digest("a"), vector(1.0));
        assert!(cache.get(&digest("a")).is_none());
        assert!(cache.is_empty());
    }
}
