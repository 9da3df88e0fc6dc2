//! Which digests a window bucket may hold: a Bloom filter kept in memory beside the bucket's
//! tree, so that a key the window has never seen — nearly every key a daemon looks up — is
//! answered without reading sled.
//!
//! A filter never forgets a digest added to it (a key withdrawn from its tree stays, and is then
//! read from the tree and found absent) and has no false negatives. Its bits are set before the
//! tree holds the key (inside the writing transaction, which excludes every other writer and every
//! transactional reader), so a reader that finds no bit set knows the tree does not hold the key
//! either, unless a writer is adding it at that moment — which a read of the tree could not have
//! seen either.
//!
//! The digests are SHA-256 prefixes, uniformly random already: the filter takes its bit positions
//! from the digest's two halves (double hashing) instead of hashing again. It grows by layers,
//! each twice the capacity of the last, so no bucket size is assumed in advance; a lookup checks
//! every layer.
//!
//! A bucket written before the process started gets its filter filled from its tree by a thread
//! of its own ([`Window::open`](super::window::Window::open)), so a start does not wait for it;
//! until it is filled the filter may hold anything, and its tree is read for every lookup.

use super::window::Digest16;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::RwLock;

/// Bits set per digest: with 10 bits per digest of capacity, one absent digest in a hundred is
/// taken for present (and read from the tree).
const PROBES: u64 = 7;
const BITS_PER_DIGEST: usize = 10;
/// The first layer's capacity when nothing better is known.
pub const MIN_CAPACITY: usize = 1 << 14;

pub struct KeyFilter {
    layers: RwLock<Vec<Layer>>,
    /// False while the filter is being filled from a bucket written before this process started:
    /// until then it may hold anything.
    filled: AtomicBool,
}

struct Layer {
    bits: Box<[AtomicU64]>,
    /// Bit positions are taken modulo a power of two.
    mask: u64,
    capacity: usize,
    added: AtomicUsize,
}

impl KeyFilter {
    /// An empty filter whose first layer holds `capacity` digests before a second one is added.
    pub fn with_capacity(capacity: usize) -> KeyFilter {
        KeyFilter {
            layers: RwLock::new(vec![Layer::new(capacity.max(MIN_CAPACITY))]),
            filled: AtomicBool::new(true),
        }
    }

    /// A filter for a bucket that holds keys already: it may hold anything until
    /// [`mark_filled`](Self::mark_filled), called once every key of the bucket was added.
    pub fn to_fill(capacity: usize) -> KeyFilter {
        KeyFilter {
            filled: AtomicBool::new(false),
            ..KeyFilter::with_capacity(capacity)
        }
    }

    pub fn mark_filled(&self) {
        self.filled.store(true, Ordering::Release);
    }

    pub fn is_filled(&self) -> bool {
        self.filled.load(Ordering::Acquire)
    }

    pub fn add(&self, digest: &Digest16) {
        {
            let layers = self.layers.read().unwrap_or_else(|e| e.into_inner());
            let last = layers.last().expect("a filter has a layer");
            if last.added.load(Ordering::Relaxed) < last.capacity {
                last.add(digest);
                return;
            }
        }
        let mut layers = self.layers.write().unwrap_or_else(|e| e.into_inner());
        let last = layers.last().expect("a filter has a layer");
        if last.added.load(Ordering::Relaxed) >= last.capacity {
            let capacity = last.capacity * 2;
            layers.push(Layer::new(capacity));
        }
        layers.last().expect("a filter has a layer").add(digest);
    }

    /// False only if `digest` was never added (and the filter is filled).
    pub fn may_contain(&self, digest: &Digest16) -> bool {
        if !self.is_filled() {
            return true;
        }
        let layers = self.layers.read().unwrap_or_else(|e| e.into_inner());
        layers.iter().any(|layer| layer.may_contain(digest))
    }

    /// Digests added (counting a digest added twice twice).
    pub fn added(&self) -> usize {
        let layers = self.layers.read().unwrap_or_else(|e| e.into_inner());
        layers
            .iter()
            .map(|layer| layer.added.load(Ordering::Relaxed))
            .sum()
    }

    /// Memory held by the filter's bits.
    pub fn bytes(&self) -> usize {
        let layers = self.layers.read().unwrap_or_else(|e| e.into_inner());
        layers.iter().map(|layer| layer.bits.len() * 8).sum()
    }
}

impl Layer {
    fn new(capacity: usize) -> Layer {
        let bits = (capacity * BITS_PER_DIGEST).next_power_of_two().max(64);
        Layer {
            bits: (0..bits / 64).map(|_| AtomicU64::new(0)).collect(),
            mask: bits as u64 - 1,
            capacity,
            added: AtomicUsize::new(0),
        }
    }

    fn positions(&self, digest: &Digest16) -> impl Iterator<Item = u64> + '_ {
        let (low, high) = digest.split_at(8);
        let h1 = u64::from_le_bytes(low.try_into().expect("8 bytes"));
        let h2 = u64::from_le_bytes(high.try_into().expect("8 bytes")) | 1;
        (0..PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) & self.mask)
    }

    fn add(&self, digest: &Digest16) {
        for bit in self.positions(digest) {
            self.bits[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Release);
        }
        self.added.fetch_add(1, Ordering::Relaxed);
    }

    fn may_contain(&self, digest: &Digest16) -> bool {
        self.positions(digest)
            .all(|bit| self.bits[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::window::digest;

    #[test]
    fn every_digest_added_is_found_and_few_others_are_taken_for_present() {
        let filter = KeyFilter::with_capacity(1_000);
        // Far beyond the first layer: the filter grows by layers.
        let added: Vec<Digest16> = (0..100_000).map(|i| digest(&format!("key-{i}"))).collect();
        for key in &added {
            filter.add(key);
        }
        assert!(added.iter().all(|key| filter.may_contain(key)));
        assert_eq!(filter.added(), 100_000);
        let absent = (0..100_000)
            .filter(|i| filter.may_contain(&digest(&format!("other-{i}"))))
            .count();
        // Seven layers of ~1 % each at most; the larger layers are not full.
        assert!(
            absent < 5_000,
            "{absent} of 100 000 absent digests taken for present"
        );
    }

    #[test]
    fn a_filter_being_filled_may_hold_anything_until_it_is_filled() {
        let filter = KeyFilter::to_fill(MIN_CAPACITY);
        assert!(filter.may_contain(&digest("anything")));
        filter.add(&digest("key"));
        filter.mark_filled();
        assert!(filter.may_contain(&digest("key")));
        assert!(!filter.may_contain(&digest("anything")));
    }

    #[test]
    fn an_empty_filter_holds_nothing_and_a_full_layer_adds_a_larger_one() {
        let filter = KeyFilter::with_capacity(MIN_CAPACITY);
        assert!(!filter.may_contain(&digest("anything")));
        let first = filter.bytes();
        for i in 0..=MIN_CAPACITY {
            filter.add(&digest(&format!("key-{i}")));
        }
        assert_eq!(filter.bytes(), first * 3, "a second layer twice the first");
    }
}
