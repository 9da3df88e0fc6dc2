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

use super::{store_error, StoreError};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

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
    buckets: RwLock<BTreeMap<i64, sled::Tree>>,
    /// Keys written to the buckets still kept (a key written again counts again).
    keys: AtomicU64,
}

/// The buckets a write at some time reads: the ones writes may still go to, to read inside the
/// write's transaction, and the older ones within the window, to read outside it.
pub struct Live {
    pub recent: Vec<(i64, sled::Tree)>,
    pub older: Vec<sled::Tree>,
}

impl Live {
    /// The position in `recent` of `bucket`'s tree.
    pub fn position(&self, bucket: i64) -> usize {
        self.recent
            .iter()
            .position(|(b, _)| *b == bucket)
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
            keys += tree.len() as u64;
            buckets.insert(bucket, tree);
        }
        Ok(Window {
            db: db.clone(),
            window_ms,
            bucket_ms: (window_ms / BUCKETS).max(1_000),
            buckets: RwLock::new(buckets),
            keys: AtomicU64::new(keys),
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
            self.tree(bucket)?;
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
        for (bucket, tree) in buckets.range(horizon..).rev() {
            if *bucket >= current {
                live.recent.push((*bucket, tree.clone()));
            } else {
                live.older.push(tree.clone());
            }
        }
        Ok(live)
    }

    /// The tree of `bucket`, created if missing.
    pub fn tree(&self, bucket: i64) -> Result<sled::Tree, StoreError> {
        if let Some(tree) = self.read().get(&bucket) {
            return Ok(tree.clone());
        }
        let tree = self
            .db
            .open_tree(format!("{PREFIX}{bucket}"))
            .map_err(store_error)?;
        Ok(self
            .buckets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(bucket)
            .or_insert(tree)
            .clone())
    }

    /// Every bucket kept, newest first (for withdrawals, which look a key up wherever it is).
    pub fn all(&self) -> Vec<(i64, sled::Tree)> {
        self.read().iter().rev().map(|(b, t)| (*b, t.clone())).collect()
    }

    /// The stored value of `key`, from the newest bucket that has it.
    pub fn get(&self, now: i64, key: &str) -> Result<Option<sled::IVec>, StoreError> {
        let key = digest(key);
        let horizon = (now - self.window_ms).div_euclid(self.bucket_ms);
        for (_, tree) in self.read().range(horizon..).rev() {
            if let Some(value) = tree.get(key).map_err(store_error)? {
                return Ok(Some(value));
            }
        }
        Ok(None)
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
                .map(|(bucket, tree)| (*bucket, tree.clone()))
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

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<i64, sled::Tree>> {
        self.buckets.read().unwrap_or_else(|e| e.into_inner())
    }
}
