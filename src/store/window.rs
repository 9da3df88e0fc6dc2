//! The idempotency window: which keys were applied within the last `window` (SPEC §5).
//!
//! Keys are kept per time bucket (a quarter of the window each), under the first 16 bytes of their
//! SHA-256: a bucket all of whose keys are past the window is dropped whole, so the window costs
//! neither a time index written per key nor a scan to evict, and its size follows the rate times
//! the window, not the history.
//!
//! Keys are written in *packs* of up to [`PACK_KEYS`], under increasing numbers, never touched
//! again (but by a withdrawal, which is rare). A commit writes its packs to the store's database,
//! in its own transaction, to the `window_staged` tree; every second the packs staged are moved to
//! a database of their own (`<data dir>/window`, one tree `window@<bucket>` per bucket) that
//! nothing else writes. Why two databases: sled 0.34 does not reclaim log segments that hold a
//! page written once and kept while the pages around it are rewritten, and the store rewrites
//! states, journal runs and outbox entries with every commit. With the window's keys among them,
//! the data directory kept about all that was ever written until the first bucket was dropped —
//! 28 times the data it held (docs/BENCHMARKS.md). Staged packs live about a second; the keys'
//! own database only grows by appends and shrinks by whole buckets.
//!
//! Which pack holds a key is kept in memory, one index per bucket (digest → pack number), filled
//! from both databases at open. A move joins a bucket's staged packs into packs of up to
//! [`PACK_KEYS`], numbered as the first staged pack each takes, and points the index at them. A
//! key never seen — the common case — costs no sled read, and a key seen costs one or two (the
//! staged pack, else the moved one: a move writes the keys' database before it points the index
//! there and deletes the staged packs after). Writers hold one lock from their lookups to their
//! index update ([`Window::writer`]), so the lookups a commit makes before its transaction stay
//! true through it and sled's transaction does not read the window; moves, withdrawals and
//! eviction hold it too.

use super::{open_db, sled_config, store_error, Classify, StoreError};
use fxhash::FxHashMap;
use sha2::{Digest, Sha256};
use sled::transaction::{TransactionalTree, UnabortableTransactionError};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

const PREFIX: &str = "window@";
/// Buckets of earlier layouts, in the store's database: one entry per key, under its digest.
const LEGACY_PREFIX: &str = "seen@";
/// The store's tree of packs not moved yet: pack number → bucket (8 bytes BE) ‖ pack.
const STAGED: &str = "window_staged";
/// The keys' database, in the data directory.
pub(super) const DIRECTORY: &str = "window";
/// Buckets per window.
const BUCKETS: i64 = 4;
/// Keys per pack. A key takes 42 bytes in its pack (66 in stores written before the window kept 8
/// bytes of the content's hash), and a sled leaf holds up to 17 entries before it splits: with 12
/// keys a full leaf (~9 KiB; ~14 KiB with the older values) stays under the size at which sled
/// writes a page as a file of its own (a quarter of the 64 KiB segment). Packs of 64 made 70 KiB
/// leaves, each appended pack then rewrote a blob file, and the window's directory grew by
/// ~0.1 MiB/s at a steady 1 000 keys/s (`scripts/capacity`, docs/BENCHMARKS.md).
const PACK_KEYS: usize = 12;
/// Packs one write may number from the id it takes (a write of 786 432 keys).
const PACKS_PER_WRITE: u64 = 1 << 16;
/// How often staged packs move to the keys' database.
const MOVE_EVERY: Duration = Duration::from_secs(1);

/// A key as the window stores it.
pub type Digest16 = [u8; 16];

pub fn digest(key: &str) -> Digest16 {
    let hash = Sha256::digest(key.as_bytes());
    hash[..16].try_into().expect("a SHA-256 has 32 bytes")
}

pub struct Window {
    shared: Arc<Shared>,
    mover: Option<Mover>,
}

struct Shared {
    /// The store's database: staged packs, and pack numbers from its id generator.
    db: sled::Db,
    staged: sled::Tree,
    /// The keys' database: one tree of moved packs per bucket.
    keys: sled::Db,
    window_ms: i64,
    bucket_ms: i64,
    buckets: RwLock<BTreeMap<i64, Arc<Bucket>>>,
    /// Held by every write from its lookups to its index update ([`Writer`]), by moves,
    /// withdrawals and eviction.
    writer: Mutex<()>,
    /// Moves wait while the file system has less than this available (the store's write floor).
    min_free_bytes: AtomicU64,
    directory: std::path::PathBuf,
}

/// One bucket: its tree of moved packs and the index of the digests of all its packs.
struct Bucket {
    tree: sled::Tree,
    /// Digest → number of the pack that holds it (staged or moved).
    index: RwLock<FxHashMap<Digest16, u64>>,
}

impl Bucket {
    fn new(tree: sled::Tree) -> Bucket {
        Bucket {
            tree,
            index: RwLock::new(FxHashMap::default()),
        }
    }

    fn index_pack(&self, number: u64, pack: &[u8]) -> Result<(), StoreError> {
        let keys = records(pack).map_err(store_error)?;
        self.index_keys(number, keys.iter().map(|(key, _)| key));
        Ok(())
    }

    fn index_keys<'k>(&self, number: u64, keys: impl IntoIterator<Item = &'k Digest16>) {
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            index.insert(*key, number);
        }
    }

    /// The pack holding `key`, if any.
    fn pack_of(&self, key: &Digest16) -> Option<u64> {
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }

    /// The stored value of `key`: from its staged pack, else from the moved one. (A move writes
    /// the moved pack before the index points at it and deletes the staged one after, so one of
    /// the two holds the key whenever a reader looks.)
    /// A reader that took the pack's number just before a move pointed the index elsewhere may
    /// find neither: it looks again while the index changes under it.
    fn get(&self, staged: &sled::Tree, key: &Digest16) -> Result<Option<Vec<u8>>, StoreError> {
        let mut looked = None;
        while let Some(number) = self.pack_of(key).filter(|number| looked != Some(*number)) {
            if let Some(entry) = staged.get(number.to_be_bytes()).map_err(store_error)? {
                let pack = staged_pack(&entry).map_err(store_error)?.1;
                if let Some(value) = find(pack, key).map_err(store_error)? {
                    return Ok(Some(value.to_vec()));
                }
            }
            if let Some(pack) = self.tree.get(number.to_be_bytes()).map_err(store_error)? {
                if let Some(value) = find(&pack, key).map_err(store_error)? {
                    return Ok(Some(value.to_vec()));
                }
            }
            looked = Some(number);
        }
        Ok(None)
    }

    fn len(&self) -> usize {
        self.index.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn index_bytes(&self) -> usize {
        let capacity = self.index.read().unwrap_or_else(|e| e.into_inner()).capacity();
        // A hash table's slots (one control byte each) at its largest load, 7 in 8.
        capacity * (std::mem::size_of::<(Digest16, u64)>() + 1) * 8 / 7
    }
}

impl Window {
    /// The window of the store whose database is `db`, in directory `dir`: the keys' database
    /// opened (created if missing) with a page cache of `cache_bytes` and both read into the
    /// indexes, buckets of earlier layouts moved in. (Only lookups of keys seen read that cache:
    /// one pack each.)
    pub fn open(db: &sled::Db, dir: &Path, window_ms: i64, cache_bytes: u64) -> Result<Window, StoreError> {
        let directory = dir.join(DIRECTORY);
        let keys = open_db(&sled_config(&directory).cache_capacity(cache_bytes)).map_err(|e| {
            e.class()(format!(
                "cannot open the idempotency window's database at {}: {e}",
                directory.display()
            ))
        })?;
        let shared = Arc::new(Shared {
            db: db.clone(),
            staged: db.open_tree(STAGED).map_err(store_error)?,
            keys,
            window_ms,
            bucket_ms: (window_ms / BUCKETS).max(1_000),
            buckets: RwLock::new(BTreeMap::new()),
            writer: Mutex::new(()),
            min_free_bytes: AtomicU64::new(0),
            directory: dir.to_path_buf(),
        });
        shared.load()?;
        // A move the last run stopped half way is finished before anything else writes.
        shared.move_staged()?;
        let mover = Mover::start(shared.clone())?;
        Ok(Window {
            shared,
            mover: Some(mover),
        })
    }

    /// The bucket a key written at `now` with first-seen time `seen_at_ms` goes to.
    pub fn bucket_for(&self, now: i64, seen_at_ms: i64) -> i64 {
        now.max(seen_at_ms).div_euclid(self.shared.bucket_ms)
    }

    /// Writes `keys` to `bucket` outside any transaction (keys of an earlier layout, moved in).
    pub fn append(&self, bucket: i64, keys: &[(Digest16, Vec<u8>)]) -> Result<(), StoreError> {
        let _writer = self.shared.lock();
        self.shared.append(bucket, keys)
    }

    /// The stored value of `key`, from the newest bucket within the window at `now` that has it.
    pub fn get(&self, now: i64, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = digest(key);
        let horizon = (now - self.shared.window_ms).div_euclid(self.shared.bucket_ms);
        let buckets: Vec<Arc<Bucket>> = self
            .shared
            .read()
            .range(horizon..)
            .rev()
            .map(|(_, b)| b.clone())
            .collect();
        for bucket in buckets {
            if let Some(value) = bucket.get(&self.shared.staged, &key)? {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    /// Starts a write that may add keys to `buckets`, once it has looked `keys` up: takes the
    /// writer lock, which the write holds until [`Writer::finish`], reads the stored values of
    /// those of `keys` the window holds, in any bucket, and takes the numbers its packs will have.
    pub fn writer<'a>(
        &self,
        buckets: impl IntoIterator<Item = i64>,
        keys: impl IntoIterator<Item = &'a Digest16>,
    ) -> Result<Writer<'_>, StoreError> {
        let shared = &*self.shared;
        let lock = shared.lock();
        let mut targets: Vec<(i64, Arc<Bucket>)> = Vec::new();
        for id in buckets {
            if !targets.iter().any(|(known, _)| *known == id) {
                targets.push((id, shared.bucket(id)?));
            }
        }
        let all: Vec<Arc<Bucket>> = shared.read().values().rev().cloned().collect();
        let mut stored = HashMap::new();
        for key in keys {
            for bucket in &all {
                if let Some(value) = bucket.get(&shared.staged, key)? {
                    stored.insert(*key, value);
                    break;
                }
            }
        }
        Ok(Writer {
            _lock: lock,
            staged: &shared.staged,
            targets,
            stored,
            first_pack: shared.db.generate_id().map_err(store_error)? * PACKS_PER_WRITE,
        })
    }

    /// Starts a withdrawal of `keys` from every bucket that holds them: takes the writer lock,
    /// finds their packs and rewrites the moved ones without them, durably, before the transaction
    /// that rewrites the staged ones ([`Withdrawal::remove`]). Should the process stop between the
    /// two, the commits whose keys these are are still in the outbox, and withdrawn again.
    pub fn withdrawal<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a Digest16>,
    ) -> Result<Withdrawal<'_>, StoreError> {
        let shared = &*self.shared;
        let lock = shared.lock();
        let buckets: Vec<Arc<Bucket>> = shared.read().values().cloned().collect();
        let mut packs: BTreeMap<(usize, u64), Vec<Digest16>> = BTreeMap::new();
        for key in keys {
            for (at, bucket) in buckets.iter().enumerate() {
                if let Some(number) = bucket.pack_of(key) {
                    packs.entry((at, number)).or_default().push(*key);
                }
            }
        }
        for ((at, number), keys) in &packs {
            let tree = &buckets[*at].tree;
            let Some(pack) = tree.get(number.to_be_bytes()).map_err(store_error)? else {
                continue;
            };
            match without(&pack, keys).map_err(store_error)? {
                Some(kept) => tree.insert(number.to_be_bytes(), kept),
                None => tree.remove(number.to_be_bytes()),
            }
            .map_err(store_error)?;
        }
        shared.keys.flush().map_err(store_error)?;
        Ok(Withdrawal {
            _lock: lock,
            buckets,
            packs,
        })
    }

    /// The trees a write's or a withdrawal's transaction writes of the window: the staged packs.
    pub fn staged_tree(&self) -> &sled::Tree {
        &self.shared.staged
    }

    /// Moves the staged packs to the keys' database now (as the mover does every second); returns
    /// how many.
    #[cfg(test)]
    pub fn move_staged(&self) -> Result<usize, StoreError> {
        let _writer = self.shared.lock();
        self.shared.move_staged()
    }

    /// Moves wait while the data directory's file system has less than `bytes` available.
    pub fn set_min_free(&self, bytes: u64) {
        self.shared.min_free_bytes.store(bytes, Ordering::Release);
    }

    /// Memory held by the buckets' indexes.
    pub fn index_bytes(&self) -> usize {
        self.shared
            .read()
            .values()
            .map(|bucket| bucket.index_bytes())
            .sum()
    }

    /// Keys in the buckets kept (a key written to two buckets counts twice).
    pub fn len(&self) -> u64 {
        self.shared
            .read()
            .values()
            .map(|bucket| bucket.len() as u64)
            .sum()
    }

    /// Drops the buckets whose every key is past the window at `now`, with their staged packs;
    /// returns the keys dropped.
    pub fn evict(&self, now: i64) -> Result<u64, StoreError> {
        let shared = &*self.shared;
        let _writer = shared.lock();
        let expired: Vec<i64> = shared
            .read()
            .keys()
            .take_while(|bucket| (**bucket + 1) * shared.bucket_ms + shared.window_ms <= now)
            .copied()
            .collect();
        if expired.is_empty() {
            return Ok(0);
        }
        let mut dropped = 0;
        for bucket in &expired {
            if let Some(removed) = shared.write_buckets().remove(bucket) {
                dropped += removed.len() as u64;
            }
            shared
                .keys
                .drop_tree(format!("{PREFIX}{bucket}"))
                .map_err(store_error)?;
        }
        let mut batch = sled::Batch::default();
        for entry in shared.staged.iter() {
            let (number, value) = entry.map_err(store_error)?;
            if expired.contains(&staged_pack(&value).map_err(store_error)?.0) {
                batch.remove(number);
            }
        }
        shared.staged.apply_batch(batch).map_err(store_error)?;
        Ok(dropped)
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some(mover) = self.mover.take() {
            mover.stop.store(true, Ordering::Release);
            mover.thread.thread().unpark();
            let _ = mover.thread.join();
        }
        if let Err(error) = self.shared.keys.flush() {
            tracing::warn!(error = %error, "The idempotency window's database could not be flushed at close.");
        }
    }
}

impl Shared {
    /// Fills the indexes from the moved packs, then from the staged ones (a pack in both — a move
    /// stopped before it deleted the staged one — is the same pack), and moves in the buckets of
    /// the layout before packs.
    fn load(&self) -> Result<(), StoreError> {
        for name in self.keys.tree_names() {
            let Some(bucket) = bucket_named(&name, PREFIX) else {
                continue;
            };
            let opened = self.bucket(bucket)?;
            for entry in opened.tree.iter() {
                let (number, pack) = entry.map_err(store_error)?;
                opened.index_pack(pack_number(&number).map_err(store_error)?, &pack)?;
            }
        }
        for entry in self.staged.iter() {
            let (number, value) = entry.map_err(store_error)?;
            let (bucket, pack) = staged_pack(&value).map_err(store_error)?;
            self.bucket(bucket)?
                .index_pack(pack_number(&number).map_err(store_error)?, pack)?;
        }
        for name in self.db.tree_names() {
            let Some(bucket) = bucket_named(&name, LEGACY_PREFIX) else {
                continue;
            };
            let tree = self.db.open_tree(&name).map_err(store_error)?;
            let keys = tree
                .iter()
                .filter_map(|entry| match entry {
                    Ok((key, value)) => Some(Ok((<Digest16>::try_from(key.as_ref()).ok()?, value.to_vec()))),
                    Err(error) => Some(Err(store_error(error))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.append(bucket, &keys)?;
            drop(tree);
            self.db.drop_tree(&name).map_err(store_error)?;
        }
        Ok(())
    }

    /// `bucket`, created if missing.
    fn bucket(&self, bucket: i64) -> Result<Arc<Bucket>, StoreError> {
        if let Some(found) = self.read().get(&bucket) {
            return Ok(found.clone());
        }
        let tree = self
            .keys
            .open_tree(format!("{PREFIX}{bucket}"))
            .map_err(store_error)?;
        Ok(self
            .write_buckets()
            .entry(bucket)
            .or_insert_with(|| Arc::new(Bucket::new(tree)))
            .clone())
    }

    /// Writes `keys` to `bucket`'s moved packs, durably, and indexes them (under the writer lock).
    fn append(&self, bucket: i64, keys: &[(Digest16, Vec<u8>)]) -> Result<(), StoreError> {
        let opened = self.bucket(bucket)?;
        let first = self.db.generate_id().map_err(store_error)? * PACKS_PER_WRITE;
        let mut batch = sled::Batch::default();
        let mut packs = Vec::new();
        for (number, chunk) in (first..).zip(keys.chunks(PACK_KEYS)) {
            let pack = encode_pack(chunk.iter().map(|(k, v)| (k, v.as_slice())));
            batch.insert(&number.to_be_bytes(), pack.as_slice());
            packs.push((number, pack));
        }
        opened.tree.apply_batch(batch).map_err(store_error)?;
        self.keys.flush().map_err(store_error)?;
        for (number, pack) in packs {
            opened.index_pack(number, &pack)?;
        }
        Ok(())
    }

    /// Moves every staged pack to its bucket's tree in the keys' database, flushes that database,
    /// points the indexes at the moved packs, then deletes the staged ones; returns how many.
    /// Under the writer lock.
    ///
    /// A commit at 1 000 events/s stages a key or two: a bucket's staged packs, in number order,
    /// are joined into packs of up to [`PACK_KEYS`], each numbered as the first staged pack it
    /// takes. The joins depend only on the staged packs, so a move that stopped half way, made
    /// again from the same staged packs (at the next open, before anything else writes), writes
    /// the same packs over the ones it wrote.
    fn move_staged(&self) -> Result<usize, StoreError> {
        let mut staged: BTreeMap<i64, Vec<(u64, sled::IVec)>> = BTreeMap::new();
        let mut deleted = sled::Batch::default();
        let mut count = 0;
        for entry in self.staged.iter() {
            let (number, value) = entry.map_err(store_error)?;
            let bucket = staged_pack(&value).map_err(store_error)?.0;
            staged
                .entry(bucket)
                .or_default()
                .push((pack_number(&number).map_err(store_error)?, value));
            deleted.remove(number);
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        // Per join: its bucket, number and keys, indexed once the keys' database is flushed.
        let mut moved: Vec<(Arc<Bucket>, u64, Vec<Digest16>)> = Vec::new();
        for (bucket, packs) in staged {
            let opened = self.bucket(bucket)?;
            let mut batch = sled::Batch::default();
            // The bucket's joins: each one's number, bytes and keys.
            let mut joins: Vec<(u64, Vec<u8>, Vec<Digest16>)> = Vec::new();
            for (number, value) in &packs {
                let pack = staged_pack(value).map_err(store_error)?.1;
                let keys: Vec<Digest16> = records(pack)
                    .map_err(store_error)?
                    .into_iter()
                    .map(|(key, _)| key)
                    .collect();
                match joins.last_mut() {
                    Some((_, bytes, held)) if held.len() + keys.len() <= PACK_KEYS => {
                        bytes.extend_from_slice(pack);
                        held.extend(keys);
                    }
                    _ => joins.push((*number, pack.to_vec(), keys)),
                }
            }
            for (number, bytes, keys) in joins {
                batch.insert(&number.to_be_bytes(), bytes);
                moved.push((opened.clone(), number, keys));
            }
            opened.tree.apply_batch(batch).map_err(store_error)?;
        }
        self.keys.flush().map_err(store_error)?;
        for (bucket, number, keys) in &moved {
            bucket.index_keys(*number, keys);
        }
        self.staged.apply_batch(deleted).map_err(store_error)?;
        Ok(count)
    }

    fn may_move(&self) -> bool {
        let floor = self.min_free_bytes.load(Ordering::Acquire);
        floor == 0 || fs2::available_space(&self.directory).is_ok_and(|available| available >= floor)
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

/// The thread moving staged packs every [`MOVE_EVERY`] (stopped and joined when the window is
/// dropped: it holds both databases open).
struct Mover {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Mover {
    fn start(shared: Arc<Shared>) -> Result<Mover, StoreError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("window-mover".into())
            .spawn(move || {
                let mut failing = false;
                while !stopped.load(Ordering::Acquire) {
                    std::thread::park_timeout(MOVE_EVERY);
                    if stopped.load(Ordering::Acquire) || !shared.may_move() {
                        continue;
                    }
                    let result = {
                        let _writer = shared.lock();
                        shared.move_staged()
                    };
                    match result {
                        Ok(_) if failing => {
                            failing = false;
                            tracing::info!("The idempotency window's staged keys move again.");
                        }
                        Ok(_) => {}
                        Err(error) if !failing => {
                            failing = true;
                            tracing::warn!(error = %error, "The idempotency window's staged keys cannot be moved to its database: they stay in the store's, and the move is tried again every second.");
                        }
                        Err(_) => {}
                    }
                }
            })
            .map_err(|e| StoreError::Internal(format!("cannot start the window's mover thread: {e}")))?;
        Ok(Mover { stop, thread })
    }
}

/// A write to the window under way: the writer lock, the buckets it may add keys to, what the
/// window held of the keys it looked up, and the first number its packs take.
pub struct Writer<'w> {
    _lock: MutexGuard<'w, ()>,
    staged: &'w sled::Tree,
    targets: Vec<(i64, Arc<Bucket>)>,
    stored: HashMap<Digest16, Vec<u8>>,
    first_pack: u64,
}

impl<'w> Writer<'w> {
    /// The tree the write's transaction writes packs to (the staged packs).
    pub fn tree(&self) -> &sled::Tree {
        self.staged
    }

    /// The keys added by one run of the transaction (made inside it: sled may run it again).
    pub fn staging<'v>(&self) -> Staging<'_, 'v> {
        Staging {
            writer: self,
            added: Vec::new(),
            positions: HashMap::new(),
        }
    }

    /// Indexes the packs the committed transaction wrote and releases the writer lock.
    pub fn finish(self, written: Written) {
        for (target, number, keys) in written.packs {
            self.targets[target].1.index_keys(number, &keys);
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

    /// Writes the added keys as staged packs through `staged`, the transaction's view of
    /// [`Writer::tree`]; returns what [`Writer::finish`] indexes once the transaction commits.
    pub fn write(self, staged: &TransactionalTree) -> Result<Written, UnabortableTransactionError> {
        let mut packs = Vec::new();
        let mut number = self.writer.first_pack;
        for (target, (bucket, _)) in self.writer.targets.iter().enumerate() {
            let keys: Vec<(Digest16, &[u8])> = self
                .added
                .iter()
                .filter(|(at, _, _)| *at == target)
                .map(|(_, key, value)| (*key, *value))
                .collect();
            for chunk in keys.chunks(PACK_KEYS) {
                assert!(
                    number < self.writer.first_pack + PACKS_PER_WRITE,
                    "a write of at most {} keys",
                    PACKS_PER_WRITE as usize * PACK_KEYS
                );
                let pack = encode_pack(chunk.iter().map(|(k, v)| (k, *v)));
                staged.insert(&number.to_be_bytes(), encode_staged(*bucket, &pack))?;
                packs.push((target, number, chunk.iter().map(|(key, _)| *key).collect()));
                number += 1;
            }
        }
        Ok(Written { packs })
    }
}

/// The packs a transaction wrote: per pack, its bucket's position among the writer's, its number
/// and its keys.
pub struct Written {
    packs: Vec<(usize, u64, Vec<Digest16>)>,
}

/// A withdrawal of keys under way (see [`Window::withdrawal`]).
pub struct Withdrawal<'w> {
    _lock: MutexGuard<'w, ()>,
    buckets: Vec<Arc<Bucket>>,
    /// Per pack (its bucket's position, its number): the keys to take out of it.
    packs: BTreeMap<(usize, u64), Vec<Digest16>>,
}

impl<'w> Withdrawal<'w> {
    /// Keys found in the window's packs, staged or moved.
    pub fn keys(&self) -> usize {
        self.packs.values().map(Vec::len).sum()
    }

    /// Rewrites the staged packs holding the keys without them, through `staged` (the
    /// transaction's view of [`Window::staged_tree`]).
    pub fn remove(&self, staged: &TransactionalTree) -> Result<(), UnabortableTransactionError> {
        for ((_, number), keys) in &self.packs {
            let Some(entry) = staged.get(number.to_be_bytes())? else {
                continue;
            };
            let (bucket, pack) = staged_pack(&entry)?;
            match without(pack, keys)? {
                Some(kept) => {
                    staged.insert(&number.to_be_bytes(), encode_staged(bucket, &kept))?;
                }
                None => {
                    staged.remove(&number.to_be_bytes())?;
                }
            }
        }
        Ok(())
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
        let truncated = || corrupt("a truncated pack");
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

/// `pack` without `keys` (`None` when nothing is left).
fn without(pack: &[u8], keys: &[Digest16]) -> Result<Option<Vec<u8>>, sled::Error> {
    let kept: Vec<(Digest16, &[u8])> = records(pack)?
        .into_iter()
        .filter(|(key, _)| !keys.contains(key))
        .collect();
    Ok((!kept.is_empty()).then(|| encode_pack(kept.iter().map(|(k, v)| (k, *v)))))
}

/// A staged pack as the store's tree holds it: its bucket, then the pack.
fn encode_staged(bucket: i64, pack: &[u8]) -> Vec<u8> {
    [bucket.to_be_bytes().as_slice(), pack].concat()
}

/// A staged pack's bucket and pack.
fn staged_pack(value: &[u8]) -> Result<(i64, &[u8]), sled::Error> {
    let (bucket, pack) = value
        .split_first_chunk::<8>()
        .ok_or_else(|| corrupt("a staged pack without its bucket"))?;
    Ok((i64::from_be_bytes(*bucket), pack))
}

/// The bucket a tree named `<prefix><bucket>` holds.
fn bucket_named(name: &[u8], prefix: &str) -> Option<i64> {
    std::str::from_utf8(name).ok()?.strip_prefix(prefix)?.parse().ok()
}

fn pack_number(key: &[u8]) -> Result<u64, sled::Error> {
    Ok(u64::from_be_bytes(
        key.try_into()
            .map_err(|_| corrupt("a pack number of other than 8 bytes"))?,
    ))
}

fn corrupt(what: &str) -> sled::Error {
    sled::Error::Unsupported(format!("corrupt idempotency window: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (sled::Db, Window) {
        // As the store opens it: a database dropped a moment ago may still be locked.
        let db = open_db(&sled::Config::new().path(dir)).unwrap();
        let window = Window::open(&db, dir, 60_000, 1 << 20).unwrap();
        (db, window)
    }

    /// Writes `keys` to `bucket` as a commit does: staged in a transaction on the store's database.
    fn commit(window: &Window, bucket: i64, keys: &[(&str, &[u8])]) {
        let digests: Vec<(Digest16, &[u8])> = keys.iter().map(|(k, v)| (digest(k), *v)).collect();
        let writer = window.writer([bucket], digests.iter().map(|(k, _)| k)).unwrap();
        let written = writer
            .tree()
            .transaction(|staged| {
                let mut seen = writer.staging();
                for (key, value) in &digests {
                    assert!(seen.get(key).is_none());
                    seen.add(bucket, *key, value);
                }
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(seen.write(staged)?)
            })
            .unwrap();
        writer.finish(written);
    }

    /// A commit's keys are staged in the store's database, found there, moved to the window's own
    /// database with their pack numbers, found there, and found again by a window opened anew.
    #[test]
    fn staged_keys_move_to_the_window_database_and_are_found_wherever_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let (db, window) = open(dir.path());
        let count = 2 * PACK_KEYS + 6;
        let keys: Vec<(String, Vec<u8>)> = (0..count)
            .map(|n| (format!("k{n}"), format!("value {n}").into_bytes()))
            .collect();
        let borrowed: Vec<(&str, &[u8])> = keys.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        commit(&window, 7, &borrowed);
        let now = 7 * 15_000;
        let last = format!("k{}", count - 1);
        let value = format!("value {}", count - 1).into_bytes();
        assert_eq!(window.staged_tree().len(), 3, "two full packs and a third");
        assert_eq!(window.get(now, &last).unwrap(), Some(value.clone()));
        assert_eq!(window.move_staged().unwrap(), 3);
        assert!(window.staged_tree().is_empty());
        assert_eq!(window.get(now, &last).unwrap(), Some(value));
        assert_eq!(window.get(now, "k999").unwrap(), None);
        commit(&window, 7, &[("k999", b"staged at the stop")]);
        drop((window, db));
        let (_db, window) = open(dir.path());
        assert_eq!(window.len(), count as u64 + 1);
        assert_eq!(window.get(now, "k0").unwrap(), Some(b"value 0".to_vec()));
        assert_eq!(
            window.get(now, "k999").unwrap(),
            Some(b"staged at the stop".to_vec())
        );
    }

    /// A move stopped after it wrote the window's database and before it deleted the staged packs
    /// leaves the first pack of each join in both, under one number: a withdrawal takes the key out
    /// of both, and neither a lookup nor a window opened anew finds it.
    #[test]
    fn a_withdrawal_takes_a_key_out_of_a_pack_staged_and_moved_alike() {
        let dir = tempfile::tempdir().unwrap();
        let (db, window) = open(dir.path());
        commit(&window, 7, &[("gone", b"1"), ("kept", b"2")]);
        // The move's first half: the staged packs copied to the window's database.
        for entry in window.staged_tree().iter() {
            let (number, value) = entry.unwrap();
            let (bucket, pack) = staged_pack(&value).unwrap();
            window
                .shared
                .bucket(bucket)
                .unwrap()
                .tree
                .insert(number, pack)
                .unwrap();
        }
        let gone = digest("gone");
        let withdrawal = window.withdrawal([&gone]).unwrap();
        assert_eq!(withdrawal.keys(), 1);
        window
            .staged_tree()
            .transaction(|staged| {
                withdrawal.remove(staged)?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .unwrap();
        withdrawal.finish();
        let now = 7 * 15_000;
        assert_eq!(window.get(now, "gone").unwrap(), None);
        assert_eq!(window.get(now, "kept").unwrap(), Some(b"2".to_vec()));
        drop((window, db));
        let (_db, window) = open(dir.path());
        assert_eq!(window.get(now, "gone").unwrap(), None);
        assert_eq!(window.get(now, "kept").unwrap(), Some(b"2".to_vec()));
        assert_eq!(window.len(), 1);
    }

    /// A move joins a bucket's staged packs into packs of up to [`PACK_KEYS`], each numbered as the first
    /// staged pack it takes; made again from the same staged packs (a move that stopped before it
    /// deleted them, finished at the next open), it writes the same packs over the ones it wrote.
    #[test]
    fn a_move_joins_staged_packs_and_a_move_made_again_writes_the_same_packs() {
        let dir = tempfile::tempdir().unwrap();
        let (db, window) = open(dir.path());
        let count = PACK_KEYS + PACK_KEYS / 2;
        let keys: Vec<String> = (0..count).map(|n| format!("k{n}")).collect();
        for key in &keys {
            commit(&window, 7, &[(key.as_str(), b"v")]);
        }
        let staged: Vec<(sled::IVec, sled::IVec)> = window.staged_tree().iter().map(Result::unwrap).collect();
        assert_eq!(staged.len(), count, "one staged pack per commit");
        assert_eq!(window.move_staged().unwrap(), count);
        let tree = window.shared.keys.open_tree(format!("{PREFIX}7")).unwrap();
        let moved: Vec<(sled::IVec, sled::IVec)> = tree.iter().map(Result::unwrap).collect();
        assert_eq!(moved.len(), 2, "joined into a full pack and a half one");
        assert_eq!(
            moved[0].0, staged[0].0,
            "numbered as the first staged pack each takes"
        );
        assert_eq!(moved[1].0, staged[PACK_KEYS].0);
        // The staged packs back, as if the move had stopped before deleting them.
        for (number, value) in &staged {
            window.staged_tree().insert(number, value).unwrap();
        }
        drop((tree, window, db));
        let (_db, window) = open(dir.path());
        assert!(window.staged_tree().is_empty(), "finished at open");
        let tree = window.shared.keys.open_tree(format!("{PREFIX}7")).unwrap();
        let again: Vec<(sled::IVec, sled::IVec)> = tree.iter().map(Result::unwrap).collect();
        assert_eq!(again, moved);
        assert_eq!(window.len(), count as u64);
        for key in &keys {
            assert_eq!(window.get(7 * 15_000, key).unwrap(), Some(b"v".to_vec()), "{key}");
        }
    }

    /// Eviction drops a bucket's tree in the window's database and its packs still staged.
    #[test]
    fn eviction_drops_a_bucket_moved_and_staged() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, window) = open(dir.path());
        commit(&window, 1, &[("moved", b"1")]);
        window.move_staged().unwrap();
        commit(&window, 1, &[("staged", b"2")]);
        commit(&window, 9, &[("later", b"3")]);
        // Bucket 1 ends at 30 s; with a 60 s window it is past at 90 s.
        assert_eq!(window.evict(90_000).unwrap(), 2);
        assert_eq!(window.len(), 1);
        assert_eq!(window.staged_tree().len(), 1, "the later bucket's pack stays");
        assert!(!window
            .shared
            .keys
            .tree_names()
            .iter()
            .any(|name| name.as_ref() == b"window@1"));
    }

    #[test]
    fn a_bucket_of_the_layout_before_packs_is_moved_into_packs() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let legacy = db.open_tree(format!("{LEGACY_PREFIX}3")).unwrap();
        legacy.insert(digest("old"), b"old value".as_slice()).unwrap();
        drop(legacy);
        let window = Window::open(&db, dir.path(), 60_000, 1 << 20).unwrap();
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
