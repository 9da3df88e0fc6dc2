//! The idempotency window: which keys were applied within the last `window` (SPEC §5).
//!
//! Keys are kept in one sled tree per time bucket (`window@<bucket>`, a quarter of the window
//! each), under the first 16 bytes of their SHA-256: a bucket all of whose keys are past the
//! window is dropped whole, so the window costs neither a time index written per key nor a scan
//! to evict, and its size follows the rate times the window, not the history.
//!
//! A bucket's tree is written in order: each write appends *packs* of up to [`PACK_KEYS`] keys
//! under increasing numbers, and a pack is never touched again (but by a withdrawal, which is
//! rare). A tree keyed by the digests themselves took its keys in random order, so every write
//! changed a page somewhere in it, and sled's log kept the segments holding those pages alive:
//! the data directory grew with every event until the first bucket was dropped, 28 times the
//! data it held (docs/BENCHMARKS.md). Pages written once and never changed again leave the
//! segments around them free to be cleaned.
//!
//! Which pack holds a key is kept in memory, one index per bucket (digest → pack number), filled
//! from the packs at open: a key never seen — the common case — costs no sled read, and a key
//! seen costs one. Writers of the window hold one lock from their lookups to their index update
//! ([`Window::writer`]), so the lookups a commit makes before its transaction stay true through
//! it, and sled's transaction does not have to read the window.

use super::{store_error, StoreError};
use fxhash::FxHashMap;
use sha2::{Digest, Sha256};
use sled::transaction::{TransactionalTree, UnabortableTransactionError};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

const PREFIX: &str = "window@";
/// Buckets of the layout before packs: one entry per key, under its digest.
const LEGACY_PREFIX: &str = "seen@";
/// Buckets per window.
const BUCKETS: i64 = 4;
/// Keys per pack: a full pack (~4 KiB) stays well under the size at which sled writes a page as
/// a file of its own (a quarter segment).
const PACK_KEYS: usize = 64;

/// A key as the window stores it.
pub type Digest16 = [u8; 16];

pub fn digest(key: &str) -> Digest16 {
    let hash = Sha256::digest(key.as_bytes());
    hash[..16].try_into().expect("a SHA-256 has 32 bytes")
}

pub struct Window {
    db: sled::Db,
    window_ms: i64,
    bucket_ms: i64,
    buckets: RwLock<BTreeMap<i64, Arc<Bucket>>>,
    /// Held by every write from its lookups to its index update ([`Writer`]), and by eviction.
    writer: Mutex<()>,
}

/// One bucket: its tree of packs and the index of the digests they hold.
struct Bucket {
    tree: sled::Tree,
    /// Digest → number of the pack that holds it.
    index: RwLock<FxHashMap<Digest16, u32>>,
    /// The number of the next pack written (changed only under the window's writer lock).
    next: AtomicU32,
}

impl Bucket {
    fn open(tree: sled::Tree) -> Result<Bucket, StoreError> {
        let mut index = FxHashMap::default();
        let mut next = 0;
        for entry in tree.iter() {
            let (number, pack) = entry.map_err(store_error)?;
            let number = pack_number(&number).map_err(store_error)?;
            for (key, _) in records(&pack).map_err(store_error)? {
                index.insert(key, number);
            }
            next = number + 1;
        }
        Ok(Bucket {
            tree,
            index: RwLock::new(index),
            next: AtomicU32::new(next),
        })
    }

    /// The pack holding `key`, if any.
    fn pack_of(&self, key: &Digest16) -> Option<u32> {
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }

    /// The stored value of `key`.
    fn get(&self, key: &Digest16) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(number) = self.pack_of(key) else {
            return Ok(None);
        };
        let Some(pack) = self.tree.get(number.to_be_bytes()).map_err(store_error)? else {
            return Ok(None);
        };
        Ok(find(&pack, key).map_err(store_error)?.map(<[u8]>::to_vec))
    }

    fn len(&self) -> usize {
        self.index.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn index_bytes(&self) -> usize {
        let capacity = self.index.read().unwrap_or_else(|e| e.into_inner()).capacity();
        // A hash table's slots (one control byte each) at its largest load, 7 in 8.
        capacity * (std::mem::size_of::<(Digest16, u32)>() + 1) * 8 / 7
    }

    /// Appends `keys` as packs, in one sled batch, and indexes them (under the writer lock).
    fn append(&self, keys: &[(Digest16, Vec<u8>)]) -> Result<(), StoreError> {
        let first = self.next.load(Ordering::Acquire);
        let mut batch = sled::Batch::default();
        for (number, chunk) in (first..).zip(keys.chunks(PACK_KEYS)) {
            batch.insert(
                &number.to_be_bytes(),
                encode_pack(chunk.iter().map(|(k, v)| (k, v.as_slice()))),
            );
        }
        self.tree.apply_batch(batch).map_err(store_error)?;
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        for (number, chunk) in (first..).zip(keys.chunks(PACK_KEYS)) {
            for (key, _) in chunk {
                index.insert(*key, number);
            }
            self.next.store(number + 1, Ordering::Release);
        }
        Ok(())
    }
}

impl Window {
    /// The window kept in `db`'s bucket trees (moving those of the layout before packs).
    pub fn open(db: &sled::Db, window_ms: i64) -> Result<Window, StoreError> {
        let window = Window {
            db: db.clone(),
            window_ms,
            bucket_ms: (window_ms / BUCKETS).max(1_000),
            buckets: RwLock::new(BTreeMap::new()),
            writer: Mutex::new(()),
        };
        let mut legacy = Vec::new();
        for name in db.tree_names() {
            let Some(name) = std::str::from_utf8(&name).ok() else {
                continue;
            };
            if let Some(bucket) = name.strip_prefix(PREFIX).and_then(|n| n.parse::<i64>().ok()) {
                let tree = db.open_tree(name).map_err(store_error)?;
                window
                    .write_buckets()
                    .insert(bucket, Arc::new(Bucket::open(tree)?));
            } else if let Some(bucket) = name
                .strip_prefix(LEGACY_PREFIX)
                .and_then(|n| n.parse::<i64>().ok())
            {
                legacy.push((bucket, name.to_owned()));
            }
        }
        for (bucket, name) in legacy {
            let tree = db.open_tree(&name).map_err(store_error)?;
            let keys = tree
                .iter()
                .filter_map(|entry| match entry {
                    Ok((key, value)) => Some(Ok((<Digest16>::try_from(key.as_ref()).ok()?, value.to_vec()))),
                    Err(error) => Some(Err(store_error(error))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            window.append(bucket, &keys)?;
            drop(tree);
            db.drop_tree(&name).map_err(store_error)?;
        }
        Ok(window)
    }

    /// The bucket a key written at `now` with first-seen time `seen_at_ms` goes to.
    pub fn bucket_for(&self, now: i64, seen_at_ms: i64) -> i64 {
        now.max(seen_at_ms).div_euclid(self.bucket_ms)
    }

    /// `bucket`, created if missing.
    fn bucket(&self, bucket: i64) -> Result<Arc<Bucket>, StoreError> {
        if let Some(found) = self.read().get(&bucket) {
            return Ok(found.clone());
        }
        let tree = self
            .db
            .open_tree(format!("{PREFIX}{bucket}"))
            .map_err(store_error)?;
        let mut buckets = self.write_buckets();
        match buckets.get(&bucket) {
            Some(found) => Ok(found.clone()),
            None => {
                let opened = Arc::new(Bucket::open(tree)?);
                buckets.insert(bucket, opened.clone());
                Ok(opened)
            }
        }
    }

    /// Writes `keys` to `bucket` outside any transaction (moving keys of an earlier layout).
    pub fn append(&self, bucket: i64, keys: &[(Digest16, Vec<u8>)]) -> Result<(), StoreError> {
        let _writer = self.lock();
        self.bucket(bucket)?.append(keys)
    }

    /// The stored value of `key`, from the newest bucket within the window at `now` that has it.
    pub fn get(&self, now: i64, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = digest(key);
        let horizon = (now - self.window_ms).div_euclid(self.bucket_ms);
        let buckets: Vec<Arc<Bucket>> = self
            .read()
            .range(horizon..)
            .rev()
            .map(|(_, b)| b.clone())
            .collect();
        for bucket in buckets {
            if let Some(value) = bucket.get(&key)? {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    /// Starts a write that may add keys to `buckets`, once it has looked `keys` up: takes the
    /// writer lock, which the write holds until [`Writer::finish`], and reads the stored values of
    /// those of `keys` the window holds, in any bucket, before the transaction.
    pub fn writer<'a>(
        &self,
        buckets: impl IntoIterator<Item = i64>,
        keys: impl IntoIterator<Item = &'a Digest16>,
    ) -> Result<Writer<'_>, StoreError> {
        let lock = self.lock();
        let mut targets: Vec<(i64, Arc<Bucket>)> = Vec::new();
        for id in buckets {
            if !targets.iter().any(|(known, _)| *known == id) {
                targets.push((id, self.bucket(id)?));
            }
        }
        let all: Vec<Arc<Bucket>> = self.read().values().rev().cloned().collect();
        let mut stored = HashMap::new();
        for key in keys {
            for bucket in &all {
                if let Some(value) = bucket.get(key)? {
                    stored.insert(*key, value);
                    break;
                }
            }
        }
        Ok(Writer {
            _lock: lock,
            targets,
            stored,
        })
    }

    /// Starts a withdrawal of `keys` from every bucket that holds them: takes the writer lock and
    /// finds their packs.
    pub fn withdrawal<'a>(&self, keys: impl IntoIterator<Item = &'a Digest16>) -> Withdrawal<'_> {
        let lock = self.lock();
        let buckets: Vec<Arc<Bucket>> = self.read().values().cloned().collect();
        let mut packs: BTreeMap<(usize, u32), Vec<Digest16>> = BTreeMap::new();
        for key in keys {
            for (at, bucket) in buckets.iter().enumerate() {
                if let Some(number) = bucket.pack_of(key) {
                    packs.entry((at, number)).or_default().push(*key);
                }
            }
        }
        Withdrawal {
            _lock: lock,
            buckets,
            packs,
        }
    }

    /// Memory held by the buckets' indexes.
    pub fn index_bytes(&self) -> usize {
        self.read().values().map(|bucket| bucket.index_bytes()).sum()
    }

    /// Keys in the buckets kept (a key written to two buckets counts twice).
    pub fn len(&self) -> u64 {
        self.read().values().map(|bucket| bucket.len() as u64).sum()
    }

    /// Drops the buckets whose every key is past the window at `now`; returns the keys dropped.
    pub fn evict(&self, now: i64) -> Result<u64, StoreError> {
        let _writer = self.lock();
        let expired: Vec<i64> = self
            .read()
            .keys()
            .take_while(|bucket| (**bucket + 1) * self.bucket_ms + self.window_ms <= now)
            .copied()
            .collect();
        let mut dropped = 0;
        for bucket in expired {
            if let Some(removed) = self.write_buckets().remove(&bucket) {
                dropped += removed.len() as u64;
            }
            self.db
                .drop_tree(format!("{PREFIX}{bucket}"))
                .map_err(store_error)?;
        }
        Ok(dropped)
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<i64, Arc<Bucket>>> {
        self.buckets.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_buckets(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<i64, Arc<Bucket>>> {
        self.buckets.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// A write to the window under way: the writer lock, the buckets it may add keys to (their trees
/// join the transaction, in [`Writer::trees`]'s order) and what the window held of the keys it
/// looked up.
pub struct Writer<'w> {
    _lock: MutexGuard<'w, ()>,
    targets: Vec<(i64, Arc<Bucket>)>,
    stored: HashMap<Digest16, Vec<u8>>,
}

impl<'w> Writer<'w> {
    /// The trees of the buckets the write may add keys to, for the transaction.
    pub fn trees(&self) -> impl Iterator<Item = &sled::Tree> {
        self.targets.iter().map(|(_, bucket)| &bucket.tree)
    }

    /// The keys added by one run of the transaction (made inside it: sled may run it again).
    pub fn staging<'v>(&self) -> Staging<'_, 'v> {
        Staging {
            writer: self,
            added: Vec::new(),
            positions: HashMap::new(),
        }
    }

    /// Indexes the keys the committed transaction wrote and releases the writer lock.
    pub fn finish(self, written: Written) {
        for (target, number, keys) in written.packs {
            let bucket = &self.targets[target].1;
            let mut index = bucket.index.write().unwrap_or_else(|e| e.into_inner());
            for key in keys {
                index.insert(key, number);
            }
            bucket.next.fetch_max(number + 1, Ordering::AcqRel);
        }
    }
}

/// The keys one run of a transaction adds, and the lookups it makes: the keys it added, then what
/// the window held before it.
pub struct Staging<'a, 'v> {
    writer: &'a Writer<'a>,
    /// Per key added: the target bucket's position, the key and its value.
    added: Vec<(usize, Digest16, &'v [u8])>,
    positions: HashMap<Digest16, usize>,
}

impl<'a, 'v> Staging<'a, 'v> {
    /// The value of `key`: added by this transaction, or stored before it.
    pub fn get(&self, key: &Digest16) -> Option<&[u8]> {
        match self.positions.get(key) {
            Some(at) => Some(self.added[*at].2),
            None => self.writer.stored.get(key).map(Vec::as_slice),
        }
    }

    /// Adds `key` with `value` to `bucket`, one of the writer's buckets.
    pub fn add(&mut self, bucket: i64, key: Digest16, value: &'v [u8]) {
        let target = self
            .writer
            .targets
            .iter()
            .position(|(id, _)| *id == bucket)
            .expect("a key goes to a bucket its writer named");
        self.positions.insert(key, self.added.len());
        self.added.push((target, key, value));
    }

    /// Writes the added keys as packs through `trees`, the transaction's views of
    /// [`Writer::trees`]; returns what [`Writer::finish`] indexes once the transaction commits.
    pub fn write(self, trees: &[TransactionalTree]) -> Result<Written, UnabortableTransactionError> {
        let mut packs = Vec::new();
        for (target, (_, bucket)) in self.writer.targets.iter().enumerate() {
            let keys: Vec<(Digest16, &[u8])> = self
                .added
                .iter()
                .filter(|(at, _, _)| *at == target)
                .map(|(_, key, value)| (*key, *value))
                .collect();
            let first = bucket.next.load(Ordering::Acquire);
            for (number, chunk) in (first..).zip(keys.chunks(PACK_KEYS)) {
                trees[target].insert(
                    &number.to_be_bytes(),
                    encode_pack(chunk.iter().map(|(k, v)| (k, *v))),
                )?;
                packs.push((target, number, chunk.iter().map(|(key, _)| *key).collect()));
            }
        }
        Ok(Written { packs })
    }
}

/// The packs a transaction wrote: per pack, its bucket's position among the writer's, its number
/// and its keys.
pub struct Written {
    packs: Vec<(usize, u32, Vec<Digest16>)>,
}

/// A withdrawal of keys under way (see [`Window::withdrawal`]).
pub struct Withdrawal<'w> {
    _lock: MutexGuard<'w, ()>,
    buckets: Vec<Arc<Bucket>>,
    /// Per pack (its bucket's position, its number): the keys to take out of it.
    packs: BTreeMap<(usize, u32), Vec<Digest16>>,
}

impl<'w> Withdrawal<'w> {
    /// Every bucket's tree, for the transaction.
    pub fn trees(&self) -> impl Iterator<Item = &sled::Tree> {
        self.buckets.iter().map(|bucket| &bucket.tree)
    }

    /// Rewrites the packs holding the keys without them, through `trees` (the transaction's views
    /// of [`Withdrawal::trees`]); returns how many keys were taken out.
    pub fn remove(&self, trees: &[TransactionalTree]) -> Result<i64, UnabortableTransactionError> {
        let mut removed = 0;
        for ((at, number), keys) in &self.packs {
            let tree = &trees[*at];
            let Some(pack) = tree.get(number.to_be_bytes())? else {
                continue;
            };
            let kept: Vec<(Digest16, &[u8])> = records(&pack)?
                .into_iter()
                .filter(|(key, _)| !keys.contains(key))
                .collect();
            removed += (records(&pack)?.len() - kept.len()) as i64;
            if kept.is_empty() {
                tree.remove(&number.to_be_bytes())?;
            } else {
                tree.insert(
                    &number.to_be_bytes(),
                    encode_pack(kept.iter().map(|(k, v)| (k, *v))),
                )?;
            }
        }
        Ok(removed)
    }

    /// Takes the withdrawn keys out of the indexes once the transaction committed.
    pub fn finish(self) {
        for ((at, _), keys) in &self.packs {
            let mut index = self.buckets[*at].index.write().unwrap_or_else(|e| e.into_inner());
            for key in keys {
                index.remove(key);
            }
        }
    }
}

/// A pack: per key, its digest, its value's length (2 bytes BE) and its value.
fn encode_pack<'k>(keys: impl Iterator<Item = (&'k Digest16, &'k [u8])>) -> Vec<u8> {
    let mut pack = Vec::new();
    for (key, value) in keys {
        let length = u16::try_from(value.len()).expect("a window value is a few dozen bytes");
        pack.extend_from_slice(key);
        pack.extend_from_slice(&length.to_be_bytes());
        pack.extend_from_slice(value);
    }
    pack
}

/// The keys and values of a pack.
fn records(pack: &[u8]) -> Result<Vec<(Digest16, &[u8])>, sled::Error> {
    let mut found = Vec::new();
    let mut rest = pack;
    while !rest.is_empty() {
        let truncated = || sled::Error::Unsupported("corrupt idempotency window pack: truncated".into());
        let (key, after) = rest.split_at_checked(16).ok_or_else(truncated)?;
        let (length, after) = after.split_at_checked(2).ok_or_else(truncated)?;
        let length = u16::from_be_bytes(length.try_into().expect("2 bytes")) as usize;
        let (value, after) = after.split_at_checked(length).ok_or_else(truncated)?;
        found.push((key.try_into().expect("16 bytes"), value));
        rest = after;
    }
    Ok(found)
}

/// The value of `key` in `pack`.
fn find<'p>(pack: &'p [u8], key: &Digest16) -> Result<Option<&'p [u8]>, sled::Error> {
    Ok(records(pack)?
        .into_iter()
        .find(|(found, _)| found == key)
        .map(|(_, value)| value))
}

fn pack_number(key: &[u8]) -> Result<u32, sled::Error> {
    Ok(u32::from_be_bytes(key.try_into().map_err(|_| {
        sled::Error::Unsupported("corrupt idempotency window: a pack number of other than 4 bytes".into())
    })?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> (tempfile::TempDir, sled::Db, Window) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let window = Window::open(&db, 60_000).unwrap();
        (dir, db, window)
    }

    #[test]
    fn packs_hold_keys_in_order_and_a_reopened_window_finds_them() {
        let (dir, db, window) = window();
        let keys: Vec<(Digest16, Vec<u8>)> = (0..150)
            .map(|n| (digest(&format!("k{n}")), format!("value {n}").into_bytes()))
            .collect();
        window.append(7, &keys).unwrap();
        let tree = db.open_tree(format!("{PREFIX}7")).unwrap();
        let numbers: Vec<u32> = tree
            .iter()
            .keys()
            .map(|k| pack_number(&k.unwrap()).unwrap())
            .collect();
        assert_eq!(numbers, [0, 1, 2], "150 keys make three packs, numbered in order");
        drop((window, tree, db));
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let window = Window::open(&db, 60_000).unwrap();
        assert_eq!(window.len(), 150);
        assert_eq!(
            window.get(7 * 15_000, "k149").unwrap(),
            Some(b"value 149".to_vec())
        );
        assert_eq!(window.get(7 * 15_000, "k150").unwrap(), None);
        window.append(7, &[(digest("k150"), b"later".to_vec())]).unwrap();
        assert_eq!(
            window.read()[&7].next.load(Ordering::Acquire),
            4,
            "appends after the packs it found"
        );
    }

    #[test]
    fn a_bucket_of_the_layout_before_packs_is_moved_into_packs() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let legacy = db.open_tree(format!("{LEGACY_PREFIX}3")).unwrap();
        legacy.insert(digest("old"), b"old value".as_slice()).unwrap();
        drop(legacy);
        let window = Window::open(&db, 60_000).unwrap();
        assert_eq!(
            window.get(3 * 15_000, "old").unwrap(),
            Some(b"old value".to_vec())
        );
        assert!(!db
            .tree_names()
            .iter()
            .any(|name| name.starts_with(LEGACY_PREFIX.as_bytes())));
    }

    #[test]
    fn a_truncated_pack_is_an_error_not_a_miss() {
        let mut pack = encode_pack([(&digest("a"), b"value".as_slice())].into_iter());
        pack.pop();
        assert!(records(&pack).is_err());
    }
}
