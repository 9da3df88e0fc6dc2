//! The idempotency window: which keys were applied within the last `window` (SPEC §5).
//!
//! Keys are kept in one sled tree per time bucket (`seen@<bucket>`, a quarter of the window
//! each), under the first 16 bytes of their SHA-256: a bucket all of whose keys are past the
//! window is dropped whole, so the window costs neither a time index written per key nor a scan
//! to evict, and its size follows the rate times the window, not the history.
//!
//! Writes go to the bucket of the time they are made (or of a later `seen_at`, for an imported
//! key stamped ahead of this clock), so only the newest buckets ever change: a write checks those
//! inside its transaction ([`Live::recent`]) and the older ones, which no writer touches any
//! more, outside it ([`Live::older`]).
//!
//! Each bucket has a [`KeyFilter`] in memory that every write of a key to the bucket's tree goes
//! through first: a lookup reads a bucket's tree only for a key its filter may hold, so a key
//! never seen — the common case — costs no sled read. The filters of the buckets a store holds
//! when it opens are filled from their trees by a thread of its own; until then a lookup reads the
//! tree.

use super::filter::{KeyFilter, MIN_CAPACITY};
use super::{store_error, StoreError};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

const PREFIX: &str = "seen@";
/// Buckets per window.
const BUCKETS: i64 = 4;

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
    buckets: RwLock<BTreeMap<i64, Bucket>>,
    /// Keys written to the buckets still kept (a key written again counts again).
    keys: AtomicU64,
    fill: Option<Fill>,
}

/// One bucket: its tree and the filter of the digests written to it.
#[derive(Clone)]
pub struct Bucket {
    pub id: i64,
    pub tree: sled::Tree,
    pub keys: Arc<KeyFilter>,
}

impl Bucket {
    /// The value of `key` in the tree, read only if the filter may hold it.
    pub fn get(&self, key: &Digest16) -> Result<Option<sled::IVec>, StoreError> {
        if !self.keys.may_contain(key) {
            return Ok(None);
        }
        self.tree.get(key).map_err(store_error)
    }
}

/// The buckets a write at some time reads: the ones writes may still go to, to read inside the
/// write's transaction, and the older ones within the window, to read outside it.
pub struct Live {
    pub recent: Vec<Bucket>,
    pub older: Vec<Bucket>,
}

impl Live {
    /// The position in `recent` of `bucket`'s tree.
    pub fn position(&self, bucket: i64) -> usize {
        self.recent
            .iter()
            .position(|b| b.id == bucket)
            .expect("the bucket written to is among the recent ones")
    }
}

impl Window {
    /// The window kept in `db`'s bucket trees.
    pub fn open(db: &sled::Db, window_ms: i64) -> Result<Window, StoreError> {
        let mut buckets = BTreeMap::new();
        let mut keys = 0;
        for name in db.tree_names() {
            let Some(bucket) = std::str::from_utf8(&name)
                .ok()
                .and_then(|name| name.strip_prefix(PREFIX))
                .and_then(|number| number.parse::<i64>().ok())
            else {
                continue;
            };
            let tree = db.open_tree(&name).map_err(store_error)?;
            let count = tree.len();
            keys += count as u64;
            buckets.insert(
                bucket,
                Bucket {
                    id: bucket,
                    tree,
                    keys: Arc::new(KeyFilter::to_fill(count)),
                },
            );
        }
        let fill = fill(buckets.values().cloned().collect())?;
        Ok(Window {
            db: db.clone(),
            window_ms,
            bucket_ms: (window_ms / BUCKETS).max(1_000),
            buckets: RwLock::new(buckets),
            keys: AtomicU64::new(keys),
            fill,
        })
    }

    /// The bucket a key written at `now` with first-seen time `seen_at_ms` goes to.
    pub fn bucket_for(&self, now: i64, seen_at_ms: i64) -> i64 {
        now.max(seen_at_ms).div_euclid(self.bucket_ms)
    }

    /// The trees of `bucket_for` buckets a write at `now` needs, created if missing, and every
    /// live bucket split into the recent ones (any writer may still write them: read them inside
    /// the transaction) and the older ones.
    pub fn live(&self, now: i64, writes_to: impl IntoIterator<Item = i64>) -> Result<Live, StoreError> {
        for bucket in writes_to {
            self.bucket(bucket)?;
        }
        // Writers choose their bucket by their own clock reading: one just before a boundary may
        // still write the bucket before this one.
        let current = now.div_euclid(self.bucket_ms) - 1;
        let horizon = (now - self.window_ms).div_euclid(self.bucket_ms);
        let buckets = self.read();
        let mut live = Live {
            recent: Vec::new(),
            older: Vec::new(),
        };
        for (id, bucket) in buckets.range(horizon..).rev() {
            if *id >= current {
                live.recent.push(bucket.clone());
            } else {
                live.older.push(bucket.clone());
            }
        }
        Ok(live)
    }

    /// `bucket`, created if missing (its filter sized for as many keys as the newest bucket holds).
    pub fn bucket(&self, bucket: i64) -> Result<Bucket, StoreError> {
        if let Some(found) = self.read().get(&bucket) {
            return Ok(found.clone());
        }
        let tree = self
            .db
            .open_tree(format!("{PREFIX}{bucket}"))
            .map_err(store_error)?;
        let mut buckets = self.buckets.write().unwrap_or_else(|e| e.into_inner());
        let capacity = buckets.values().next_back().map_or(MIN_CAPACITY, |newest| {
            let added = newest.keys.added();
            added + added / 4
        });
        Ok(buckets
            .entry(bucket)
            .or_insert_with(|| Bucket {
                id: bucket,
                tree,
                keys: Arc::new(KeyFilter::with_capacity(capacity)),
            })
            .clone())
    }

    /// Every bucket kept, newest first (for withdrawals, which look a key up wherever it is).
    pub fn all(&self) -> Vec<Bucket> {
        self.read().values().rev().cloned().collect()
    }

    /// The stored value of `key`, from the newest bucket that has it.
    pub fn get(&self, now: i64, key: &str) -> Result<Option<sled::IVec>, StoreError> {
        let key = digest(key);
        let horizon = (now - self.window_ms).div_euclid(self.bucket_ms);
        for (_, bucket) in self.read().range(horizon..).rev() {
            if let Some(value) = bucket.get(&key)? {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    /// Memory held by the buckets' filters.
    pub fn filter_bytes(&self) -> usize {
        self.read().values().map(|bucket| bucket.keys.bytes()).sum()
    }

    /// Counts keys written (`n` may be negative for keys withdrawn).
    pub fn counted(&self, n: i64) {
        let _ = self
            .keys
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |keys| {
                Some(keys.saturating_add_signed(n))
            });
    }

    /// Keys in the buckets kept.
    pub fn len(&self) -> u64 {
        self.keys.load(Ordering::Acquire)
    }

    /// Drops the buckets whose every key is past the window at `now`; returns the keys dropped.
    pub fn evict(&self, now: i64) -> Result<u64, StoreError> {
        let expired: Vec<(i64, sled::Tree)> = {
            let buckets = self.read();
            buckets
                .iter()
                .take_while(|(bucket, _)| (*bucket + 1) * self.bucket_ms + self.window_ms <= now)
                .map(|(bucket, found)| (*bucket, found.tree.clone()))
                .collect()
        };
        let mut dropped = 0;
        for (bucket, tree) in expired {
            let keys = tree.len() as u64;
            self.buckets
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&bucket);
            drop(tree);
            self.db
                .drop_tree(format!("{PREFIX}{bucket}"))
                .map_err(store_error)?;
            self.counted(-(keys as i64));
            dropped += keys;
        }
        Ok(dropped)
    }

    /// Whether every bucket's filter is filled (and lookups of keys never seen read no tree).
    pub fn filled(&self) -> bool {
        self.read().values().all(|bucket| bucket.keys.is_filled())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<i64, Bucket>> {
        self.buckets.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// The thread filling the filters of the buckets a store held at open.
struct Fill {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// Fills the filters of buckets written before this start from their trees, newest first, on a
/// thread of its own (stopped and joined when the window is dropped: its trees hold the database
/// open). A bucket whose tree cannot be read (or is dropped meanwhile) keeps a filter that may hold
/// anything: its lookups read the tree, as they would without a filter.
fn fill(buckets: Vec<Bucket>) -> Result<Option<Fill>, StoreError> {
    if buckets.is_empty() {
        return Ok(None);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::Builder::new()
        .name("window-filter".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            let mut added = 0u64;
            for bucket in buckets.iter().rev() {
                let mut keys = bucket.tree.iter().keys();
                let read: Result<(), sled::Error> = loop {
                    if stopped.load(Ordering::Acquire) {
                        return;
                    }
                    match keys.next() {
                        None => break Ok(()),
                        Some(Err(error)) => break Err(error),
                        Some(Ok(key)) => {
                            if let Ok(digest) = <Digest16>::try_from(key.as_ref()) {
                                bucket.keys.add(&digest);
                                added += 1;
                            }
                        }
                    }
                };
                match read {
                    Ok(()) => bucket.keys.mark_filled(),
                    Err(error) => tracing::warn!(
                        bucket = bucket.id,
                        error = %error,
                        "The idempotency window's filter of a bucket cannot be filled: its lookups read the disk."
                    ),
                }
            }
            tracing::debug!(
                keys = added,
                seconds = started.elapsed().as_secs_f64(),
                "The idempotency window's filters are filled."
            );
        })
        .map_err(|e| StoreError::Internal(format!("cannot start the window's filter thread: {e}")))?;
    Ok(Some(Fill { stop, thread }))
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some(fill) = self.fill.take() {
            fill.stop.store(true, Ordering::Release);
            let _ = fill.thread.join();
        }
    }
}
