//! The sled store: aggregate states, the idempotency window and the outbox, written atomically.
//!
//! A commit is written to the commit log with its idempotency keys, then applied to the other
//! trees with the commits logged near it (`log.rs`).
//!
//! Trees:
//! - `log`: transaction id (8 bytes BE) → its commits' writes (`log::Planned`, LZ4-compressed),
//!   removed once applied
//! - `state`:   `<kind>/<id>` → aggregate state (JSON)
//! - `window_staged`: the idempotency window's keys of the last second ([`window`]): pack number
//!   (8 bytes BE) → bucket (8 bytes BE) ‖ up to 12 keys, each the first 16 bytes of the key's
//!   SHA-256, its value's length (2 bytes BE) and its value: first-seen ms (8 bytes BE) ‖ the first
//!   8 bytes of the content's SHA-256 (all 32 in stores written before 2026-12-02 evening) ‖ the
//!   [`DeliveryId`] of the message applied under the key (8 bytes BE; absent for events the daemon
//!   made and for keys written before deliveries were recorded). See `encode_seen`.
//!   Moved every second to the window's own database (`window/` in the data directory: a tree
//!   `window@<bucket>` of packs per quarter of the window, under the same numbers).
//! - `outbox`:  sequence (8 bytes BE) → output event or changelog record (JSON, LZ4-compressed:
//!   `packed`), deleted once published
//! - `outbox_poison`: same keys → an entry that can never be published, with its reason (JSON)
//! - `ledgers`: affiliate id → commission ledger (JSON), moved by the output events of each commit
//! - `charges`: payment id → payment to charge through the gateway (JSON), deleted once reported
//! - `journal`: `<kind>/<id>/<version, 20 digits>` → the run of events applied from that version
//!   (one commit's, or the consecutive commits of one application up to a snapshot; JSON each,
//!   the run LZ4-compressed: `packed`), for kinds with snapshots
//! - `snapshots`: same keys → full-state snapshot with checksum (JSON), the last few kept
//! - `report`:  read-model group (`summary`, `affiliate/<id>`, `campaign/<id>`) → its counters
//!   (JSON), moved by each commit (see `aerostream_actors::readmodel`)
//! - `versions`: `<kind>/<id>` → the stored state's version (8 bytes BE)
//! - `unconfirmed`: `<kind>/<id>` → [`Unconfirmed`] (JSON), aggregates whose newest versions were
//!   withdrawn at start because they never reached the changelog
//! - `dead_lettered`: the messages already dead-lettered within the idempotency window, so that a
//!   redelivered copy is acked without a second dead letter: `m` ‖ message id → dead-lettered ms
//!   (8 bytes BE), and `t` ‖ ms (8 bytes BE) ‖ message id → (), the index that eviction walks

mod checkpoint;
mod committer;
mod flusher;
mod log;
mod packed;
mod window;

pub use checkpoint::Position;

use crate::changelog::ChangeRecord;
use crate::telemetry::{STORE_LOG_APPLICATIONS, STORE_LOG_APPLIED_COMMITS, STORE_WRITABLE};
use aerostream_actors::events::{AggregateKey, DeliveryId};
use aerostream_actors::gateway::Charge;
use aerostream_actors::output::{OutputBody, OutputEvent};
use aerostream_actors::ports::{
    Commit, CommitFuture, CommitResult, OwnedCommit, SeenEntry, StateStore, StoreError,
};
use aerostream_actors::readmodel::{apply_changes, Change, Counters, ReadModel};
use aerostream_actors::snapshot::Snapshot;
use aerostream_actors::{Aggregate, AggregateKind, Campaign, CommissionLedger, Payment};
use log::{Pending, Planned};
use serde::{Deserialize, Serialize};
use sled::transaction::TransactionalTree;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub struct SledStore {
    db: sled::Db,
    state: sled::Tree,
    window: window::Window,
    /// The data directory.
    dir: std::path::PathBuf,
    outbox: sled::Tree,
    ledgers: sled::Tree,
    charges: sled::Tree,
    journal: sled::Tree,
    snapshots: sled::Tree,
    report: sled::Tree,
    /// `<kind>/<id>` → the stored state's version (8 bytes BE), for optimistic concurrency.
    versions: sled::Tree,
    unconfirmed: sled::Tree,
    /// The commit log: transactions of commits not yet applied to the trees (`log.rs`).
    log: sled::Tree,
    /// The logged commits not yet applied; held by every write to the trees a commit writes.
    pending: std::sync::Mutex<Pending>,
    /// Where the changelog follower resumes after a restart (`checkpoint.rs`).
    checkpoint: sled::Tree,
    /// Whether `unconfirmed` has entries (checked for every record the follower reads).
    any_unconfirmed: AtomicBool,
    dead_lettered: sled::Tree,
    /// Messages in `dead_lettered` (checked for every message applied).
    dead_lettered_len: AtomicU64,
    window_ms: i64,
    /// This daemon's instance id when commits also write changelog records.
    changelog: Option<String>,
    /// Newest outbox sequence committed, and the oldest still pending (`u64::MAX`: none).
    outbox_high: AtomicU64,
    outbox_low: tokio::sync::watch::Sender<u64>,
    outbox_added: tokio::sync::Notify,
    clock: std::sync::Arc<dyn aerostream_actors::ports::Clock>,
    /// Group commit: the thread that makes writes durable for every waiter at once.
    flusher: flusher::Flusher,
    outbox_pending: AtomicU64,
    /// The thread that writes actors' commits in batches, once started (`committer::start`).
    committer: std::sync::OnceLock<committer::Committer>,
    /// Outbox entries that can never be published, set aside with their reason.
    outbox_poison: sled::Tree,
    /// `None` while the store writes; why it cannot, from a write that failed for want of
    /// storage until a write check succeeds ([`SledStore::check_writable`]).
    write_problem: tokio::sync::watch::Sender<Option<String>>,
    /// Space the data directory's file system must keep available for a write to start (0: no
    /// floor); see [`SledStore::with_min_free`].
    min_free_bytes: u64,
}

/// What the outbox publishes: an output event, or a changelog record (after its commit's outputs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OutboxEntry {
    Output(OutputEvent),
    Change(Box<ChangeRecord>),
}

/// An outbox entry as read back: the entry, or why it does not parse.
pub type StoredEntry = Result<OutboxEntry, StoreError>;

/// Outbox entries as read back, oldest first: each with its sequence key, parsed or why it does not
/// parse.
pub type OutboxRead<T> = Vec<(sled::IVec, Result<T, StoreError>)>;

/// An outbox entry as the publisher reads it: an output event to encode, or a changelog record as
/// it goes on the wire — the JSON stored inside the entry, checked as JSON and parsed only for its
/// key and instance. Parsing a record whole to write it again was about 6 % of the daemon's
/// samples in a backlog profile (docs/BENCHMARKS.md); a record whose shape is wrong is the
/// followers' to skip, as one published by another version would be.
#[derive(Debug)]
pub enum Publishable {
    Output(OutputEvent),
    Change {
        key: String,
        instance: String,
        /// The changelog partition it goes to (`ChangeRecord::partition`), else routed by `key`.
        partition: Option<u32>,
        payload: Vec<u8>,
    },
}

impl Publishable {
    fn parse(stored: &[u8]) -> Result<Publishable, serde_json::Error> {
        /// [`OutboxEntry`] as stored, the record left as its JSON text.
        #[derive(Deserialize)]
        enum Stored {
            Output(OutputEvent),
            Change(Box<serde_json::value::RawValue>),
        }
        /// The fields of a [`ChangeRecord`] the publisher needs.
        #[derive(Deserialize)]
        struct Head {
            instance: String,
            aggregate: AggregateKey,
            #[serde(default)]
            partition: Option<u32>,
        }
        Ok(match serde_json::from_slice(stored)? {
            Stored::Output(event) => Publishable::Output(event),
            Stored::Change(record) => {
                let head: Head = serde_json::from_str(record.get())?;
                Publishable::Change {
                    key: crate::changelog::record_key(&head.aggregate),
                    instance: head.instance,
                    partition: head.partition,
                    payload: Box::<str>::from(record).into_boxed_bytes().into_vec(),
                }
            }
        })
    }
}

/// An aggregate whose versions from `from` on were withdrawn at start
/// ([`SledStore::withdraw_unpublished`]): the changelog decides them.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Unconfirmed {
    aggregate: AggregateKey,
    from: u64,
    /// A changelog record has replaced the withdrawn state; from then on records import as usual.
    resolved: bool,
}

impl Unconfirmed {
    fn decode(bytes: &[u8]) -> Result<Unconfirmed, sled::Error> {
        serde_json::from_slice(bytes).map_err(|e| corrupt("unconfirmed mark", e))
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("marks serialize")
    }
}

/// Which [`StoreError`] class a failure of the store's dependencies belongs to.
trait Classify: std::fmt::Display {
    fn class(&self) -> fn(String) -> StoreError;
}

impl Classify for sled::Error {
    fn class(&self) -> fn(String) -> StoreError {
        match self {
            sled::Error::Io(_) => StoreError::Unavailable,
            // `Unsupported` is also what [`corrupt`] makes of a stored value that does not parse.
            sled::Error::Corruption { .. } | sled::Error::Unsupported(_) => StoreError::Corrupt,
            _ => StoreError::Internal,
        }
    }
}

impl Classify for serde_json::Error {
    fn class(&self) -> fn(String) -> StoreError {
        StoreError::Corrupt
    }
}

impl Classify for tokio::task::JoinError {
    fn class(&self) -> fn(String) -> StoreError {
        StoreError::Internal
    }
}

fn store_error(e: impl Classify) -> StoreError {
    e.class()(e.to_string())
}

/// The error of a transaction that never aborts on purpose.
fn unaborted_error(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Abort(()) => StoreError::Internal("transaction aborted".into()),
        TransactionError::Storage(e) => store_error(e),
    }
}

/// Fail point (the `fail` crate): every write of the store fails as on a full or read-only disk
/// (commits, flushes, imports, outbox and charge deletions, the write check). Configured only
/// through `POST /admin/chaos/failpoint`, which needs `chaos.enabled` and the admin token.
pub const FAILPOINT_WRITE: &str = "store::write";
/// Fail point: a commit transaction fails with the class its action names
/// (`return(unavailable|corrupt|internal)`, internal by default), or is slowed (`sleep(ms)`).
pub const FAILPOINT_COMMIT: &str = "store::commit";

/// Fail point (tests only): between a commit's transaction and its update of the outbox's
/// published mark, where the publisher may delete the commit's entries first.
pub const FAILPOINT_OUTBOX_MARK: &str = "store::outbox_mark";

/// Fail point: making writes durable fails (as an fsync can), while writes themselves succeed.
pub const FAILPOINT_FLUSH: &str = "store::flush";

fn injected_flush_failure() -> Result<(), StoreError> {
    fail::fail_point!(FAILPOINT_FLUSH, |_| Err(StoreError::Unavailable(format!(
        "injected by fail point {FAILPOINT_FLUSH}"
    ))));
    Ok(())
}

fn injected_write_failure() -> Result<(), StoreError> {
    fail::fail_point!(FAILPOINT_WRITE, |_| Err(StoreError::Unavailable(format!(
        "injected by fail point {FAILPOINT_WRITE}"
    ))));
    Ok(())
}

fn injected_commit_failure() -> Result<(), StoreError> {
    fail::fail_point!(FAILPOINT_COMMIT, |class: Option<String>| {
        let detail = format!("injected by fail point {FAILPOINT_COMMIT}");
        Err(match class.as_deref() {
            Some("unavailable") => StoreError::Unavailable(detail),
            Some("corrupt") => StoreError::Corrupt(detail),
            _ => StoreError::Internal(detail),
        })
    });
    Ok(())
}

/// A stored value that no longer parses: surfaced as a storage error, so the event is retried
/// rather than applied on top of garbage.
fn corrupt(what: &str, e: serde_json::Error) -> sled::Error {
    sled::Error::Unsupported(format!("corrupt {what}: {e}"))
}

/// Key of a journal entry or snapshot: versions sort numerically under the aggregate's prefix.
fn versioned_key(key: &AggregateKey, version: u64) -> Vec<u8> {
    format!("{}/{}/{version:020}", key.kind.as_str(), key.id).into_bytes()
}

fn versioned_prefix(key: &AggregateKey) -> Vec<u8> {
    format!("{}/{}/", key.kind.as_str(), key.id).into_bytes()
}

/// Marks a journal value holding the entries of a commit's consecutive events (keyed by the first
/// one's version), each as a 4-byte big-endian length then the entry; a value without it is one
/// entry (JSON, as written before commits held several events).
const JOURNAL_RUN: u8 = 0xff;

fn journal_run<'a>(entries: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut value = vec![JOURNAL_RUN];
    for entry in entries {
        value.extend_from_slice(&(entry.len() as u32).to_be_bytes());
        value.extend_from_slice(entry);
    }
    value
}

/// The entries of a journal value, oldest first.
fn journal_entries(value: &[u8]) -> Result<Vec<&[u8]>, StoreError> {
    let Some(mut rest) = value.strip_prefix(&[JOURNAL_RUN]) else {
        return Ok(vec![value]);
    };
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let malformed = || StoreError::Corrupt("malformed journal run".into());
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(malformed)?;
        let len = u32::from_be_bytes(*len) as usize;
        let (entry, tail) = tail.split_at_checked(len).ok_or_else(malformed)?;
        entries.push(entry);
        rest = tail;
    }
    Ok(entries)
}

/// Reads the version back from a [`versioned_key`].
fn version_of(stored_key: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(&stored_key[stored_key.len().saturating_sub(20)..])
        .ok()
        .and_then(|digits| digits.parse().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("malformed versioned key {stored_key:?}")))
}

/// Up to `limit` entries of `tree` under `prefix` whose rest of the key (an id) sorts after
/// `after`, with that id; every entry when `after` is `None`.
fn page_after(
    tree: &sled::Tree,
    prefix: &[u8],
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let start = match after {
        Some(after) => std::ops::Bound::Excluded([prefix, after.as_bytes()].concat()),
        None => std::ops::Bound::Included(prefix.to_vec()),
    };
    tree.range((start, std::ops::Bound::Unbounded))
        .take_while(|entry| entry.as_ref().map_or(true, |(key, _)| key.starts_with(prefix)))
        .take(limit)
        .map(|entry| {
            let (key, value) = entry.map_err(store_error)?;
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            Ok((id, value.to_vec()))
        })
        .collect()
}

/// sled's segment size for a new store. sled's log reclaims space a segment at a time, so smaller
/// segments come back sooner: on the idempotency bench's path (300 000 keys), disk per live key
/// was 1 192 bytes with sled's 512 KiB, 561 with 64 KiB (and the writes faster), 404 with 16 KiB
/// (the writes slower). docs/BENCHMARKS.md.
const SEGMENT_SIZE: usize = 64 * 1024;

/// The segment size of the store in `dir`: the one it was created with (sled refuses to open a
/// store with another), else [`SEGMENT_SIZE`].
fn segment_size(dir: &Path) -> usize {
    // sled's `conf` file: `key: value` lines, then a checksum.
    std::fs::read(dir.join("conf"))
        .ok()
        .and_then(|conf| {
            String::from_utf8_lossy(&conf)
                .lines()
                .find_map(|line| line.strip_prefix("segment_size: "))
                .and_then(|size| size.trim().parse().ok())
        })
        .unwrap_or(SEGMENT_SIZE)
}

/// The sled configuration of the store in `dir` (its segment size), for whatever opens the
/// database itself (tests, tools): sled opens a database only with the segment size it has.
pub fn sled_config(dir: &Path) -> sled::Config {
    sled::Config::new().path(dir).segment_size(segment_size(dir))
}

/// How long an open waits for the database's lock to be released.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens the database, waiting up to [`LOCK_WAIT`] for its file lock: sled's I/O threads may hold
/// a database dropped a moment ago a little longer (a store reopened in the same process failed
/// 2 runs in 25 of the store's unit tests), as may a daemon still exiting. A lock held longer is
/// an error naming it.
fn open_db(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            // sled says so only in the message (`ErrorKind::Other`, "could not acquire lock on …").
            Err(sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// The key [`SledStore::check_writable`] writes, in the default tree.
const HEALTH_KEY: &[u8] = b"__health";

fn state_key(key: &AggregateKey) -> Vec<u8> {
    format!("{}/{}", key.kind.as_str(), key.id).into_bytes()
}

/// Bytes allocated to the files under `dir`.
fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        // sled deletes blob files as it writes: one gone since the listing takes no space.
        let metadata = match entry.metadata() {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            metadata => metadata?,
        };
        bytes += if metadata.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            std::os::unix::fs::MetadataExt::blocks(&metadata) * 512
        };
    }
    Ok(bytes)
}

/// Bytes of an event's SHA-256 that the window keeps with its key: 64 bits tell content reused
/// under a key apart (`SeenEntry::same_content`), and the 24 bytes saved are ~40 bytes of disk a
/// key once sled's overhead counts (docs/BENCHMARKS.md).
const SEEN_HASH: usize = 8;

/// Length of a `seen` value that records its delivery: time, the hash's first bytes, delivery.
const SEEN_WITH_DELIVERY: usize = 8 + SEEN_HASH + 8;

/// The same, as stores written before 2026-12-02 evening keep it: with the whole SHA-256.
const SEEN_WITH_DELIVERY_WHOLE_HASH: usize = 8 + 32 + 8;

fn encode_seen(first_seen_ms: i64, content_hash: &str, delivery: Option<DeliveryId>) -> Vec<u8> {
    let mut value = first_seen_ms.to_be_bytes().to_vec();
    match hex::decode(content_hash) {
        Ok(raw) if raw.len() == 32 => {
            value.extend_from_slice(&raw[..SEEN_HASH]);
            // Only after a SHA-256, so that the length tells whether a delivery follows.
            if let Some(delivery) = delivery {
                value.extend_from_slice(&delivery.0.to_be_bytes());
            }
        }
        Ok(raw) => value.extend_from_slice(&raw),
        Err(_) => value.extend_from_slice(content_hash.as_bytes()),
    }
    value
}

fn decode_seen(value: &[u8]) -> SeenEntry {
    let (time, rest) = value.split_at(8.min(value.len()));
    let hash_len = match value.len() {
        SEEN_WITH_DELIVERY => Some(SEEN_HASH),
        SEEN_WITH_DELIVERY_WHOLE_HASH => Some(32),
        _ => None,
    };
    let (hash, delivery) = match hash_len.and_then(|len| rest.split_at_checked(len)) {
        Some((hash, delivery)) => (
            hash,
            Some(DeliveryId(u64::from_be_bytes(
                delivery.try_into().expect("8 bytes"),
            ))),
        ),
        None => (rest, None),
    };
    SeenEntry {
        first_seen_ms: i64::from_be_bytes(time.try_into().unwrap_or([0; 8])),
        content_hash: hex::encode(hash),
        delivery,
    }
}

impl SledStore {
    /// Opens the store with sled's default page cache (1 GiB).
    pub fn open(
        dir: &Path,
        window_seconds: u64,
        clock: std::sync::Arc<dyn aerostream_actors::ports::Clock>,
    ) -> Result<SledStore, StoreError> {
        Self::open_with_cache(dir, window_seconds, 1 << 30, clock)
    }

    /// Opens the store with a page cache of `cache_bytes`.
    pub fn open_with_cache(
        dir: &Path,
        window_seconds: u64,
        cache_bytes: u64,
        clock: std::sync::Arc<dyn aerostream_actors::ports::Clock>,
    ) -> Result<SledStore, StoreError> {
        let db = open_db(&sled_config(dir).cache_capacity(cache_bytes))
            .map_err(|e| e.class()(format!("cannot open sled database at {}: {e}", dir.display())))?;
        let tree = |name: &str| db.open_tree(name).map_err(store_error);
        let outbox = tree("outbox")?;
        let window_ms = (window_seconds as i64).saturating_mul(1_000);
        // As much cache again for the window's own database (src/store/window.rs): with half,
        // a lookup of a key seen took 69 µs at p99 for 1 000 000 live keys, 9 µs with as much.
        let window = window::Window::open(&db, dir, window_ms, cache_bytes)?;
        migrate_window(&db, &window, window_ms, clock.now_ms())?;
        let unconfirmed = tree("unconfirmed")?;
        let dead_lettered = tree("dead_lettered")?;
        let outbox_poison = tree("outbox_poison")?;
        let flusher = {
            let db = db.clone();
            flusher::Flusher::start(move || {
                injected_write_failure()?;
                injected_flush_failure()?;
                db.flush().map(drop).map_err(store_error)
            })
            .map_err(|e| StoreError::Internal(format!("cannot start the flusher thread: {e}")))?
        };
        let store = SledStore {
            dead_lettered_len: AtomicU64::new(dead_lettered.scan_prefix(DEAD_LETTERED).count() as u64),
            dead_lettered,
            state: tree("state")?,
            ledgers: tree("ledgers")?,
            charges: tree("charges")?,
            journal: tree("journal")?,
            snapshots: tree("snapshots")?,
            report: tree("report")?,
            versions: tree("versions")?,
            any_unconfirmed: AtomicBool::new(!unconfirmed.is_empty()),
            unconfirmed,
            checkpoint: tree("changelog_checkpoint")?,
            log: tree("log")?,
            pending: std::sync::Mutex::new(Pending::default()),
            db,
            window_ms,
            changelog: None,
            outbox_high: AtomicU64::new(0),
            outbox_low: tokio::sync::watch::Sender::new(u64::MAX),
            outbox_added: tokio::sync::Notify::new(),
            clock,
            flusher,
            outbox_pending: AtomicU64::new(0),
            outbox,
            window,
            dir: dir.to_path_buf(),
            committer: std::sync::OnceLock::new(),
            outbox_poison,
            write_problem: tokio::sync::watch::Sender::new(None),
            min_free_bytes: 0,
        };
        store.recover_log()?;
        store
            .outbox_pending
            .store(store.outbox.len() as u64, Ordering::Release);
        store.outbox_low.send_replace(first_seq(&store.outbox)?);
        Ok(store)
    }

    /// Applies the commits a previous run logged and did not apply (it stopped first).
    fn recover_log(&self) -> Result<(), StoreError> {
        let mut pending = self.pending();
        for entry in self.log.iter() {
            let (key, value) = entry.map_err(store_error)?;
            let key = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt(format!("malformed commit log key {key:?}")))?,
            );
            pending.add(key, Planned::decode_all(&packed::unpack(&value)?)?);
        }
        if !pending.commits.is_empty() {
            tracing::info!(
                commits = pending.commits.len(),
                "Applying the commits the last run logged and did not apply."
            );
        }
        self.apply_pending(&mut pending)
    }

    /// No write starts while the data directory's file system has less than `bytes` available:
    /// it fails as a full disk would (consumption stops, /health answers 503) and the store writes
    /// again, by itself, once the write check finds the space back.
    ///
    /// Why a floor rather than the disk's own error: sled 0.34.7 does not survive `ENOSPC` in the
    /// middle of a write. A value written as a blob file that fails to be written leaves its log
    /// buffer with a writer that never leaves (`Log::reserve_inner` returns the error after
    /// claiming the buffer), so every later flush waits for ever; and a transaction that fails
    /// there has written part of its trees, which recovery may bring back without the rest.
    /// Measured with a tmpfs filled while the daemon wrote, under load with debug logging: 6 runs
    /// in 40 ended in a hung flush, an event applied twice or an event lost.
    pub fn with_min_free(mut self, bytes: u64) -> Self {
        self.min_free_bytes = bytes;
        self.window.set_min_free(bytes);
        self
    }

    /// Whether a new write may start: the write fail point, then the space left on the data
    /// directory's file system against [`with_min_free`](Self::with_min_free).
    fn may_write(&self) -> Result<(), StoreError> {
        injected_write_failure()?;
        if self.min_free_bytes == 0 {
            return Ok(());
        }
        let available = fs2::available_space(&self.dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot read the space left on {}: {e}",
                self.dir.display()
            ))
        })?;
        if available < self.min_free_bytes {
            return Err(StoreError::Unavailable(format!(
                "the file system of {} has {} MiB available, less than daemon.min_free_mib ({} MiB): \
                 writes stop before the disk is full",
                self.dir.display(),
                available >> 20,
                self.min_free_bytes >> 20
            )));
        }
        Ok(())
    }

    /// Runs `write` when [`may_write`](Self::may_write) allows it; a failure that means the store
    /// cannot write is noted ([`note_failure`](Self::note_failure)), whoever wrote.
    fn writing<T>(&self, write: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let result = self.may_write().and_then(|()| write());
        if let Err(error) = &result {
            self.note_failure(error);
        }
        result
    }

    /// Commits also write a changelog record for the other daemons, naming this one `instance`.
    pub fn with_changelog(mut self, instance: String) -> Self {
        self.changelog = Some(instance);
        self
    }

    /// Makes every commit so far durable. The ack of an event waits for this.
    ///
    /// Group commit: one thread flushes (`flusher`), each flush covering every write made before
    /// it started, so callers that arrive during a flush share the next one.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let flushed = self.flusher.flush().await;
        if let Err(error) = &flushed {
            self.note_failure(error);
        }
        flushed
    }

    /// Starts the committer thread: from now on `commit_batched` goes through it, one transaction
    /// at most every `min_interval` (see [`committer`]). Calling it again does nothing.
    pub fn start_committer(
        self: &std::sync::Arc<Self>,
        min_interval: std::time::Duration,
    ) -> std::io::Result<()> {
        committer::start(self, min_interval)
    }

    /// Why the store cannot write, when it cannot (for /health); `None` while it writes.
    pub fn write_problem(&self) -> Option<String> {
        self.write_problem.borrow().clone()
    }

    /// Follows [`write_problem`](Self::write_problem): consumption stops while it is `Some`.
    pub fn writability(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.write_problem.subscribe()
    }

    /// Resolves once the store writes again (at once when it does).
    pub async fn wait_writable(&self) {
        let _ = self.writability().wait_for(Option::is_none).await;
    }

    /// A write failed: when the store as a whole cannot write, it is marked so until a write
    /// check succeeds.
    pub fn note_failure(&self, error: &StoreError) {
        if !error.is_unavailable() {
            return;
        }
        let reason = error.to_string();
        self.write_problem.send_if_modified(|problem| {
            if problem.is_none() {
                tracing::error!(error = %reason, "The store cannot write: consumption stops until it can.");
                metrics::gauge!(STORE_WRITABLE).set(0.0);
            }
            let changed = problem.as_deref() != Some(reason.as_str());
            *problem = Some(reason);
            changed
        });
    }

    /// Writes a probe key and makes it durable: the health of the store is whether this works.
    /// A success ends an earlier write problem (consumption resumes); a failure starts one.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        let written = self.may_write().and_then(|()| {
            let now = self.clock.now_ms().to_be_bytes();
            self.db.insert(HEALTH_KEY, &now).map_err(store_error)
        });
        let result = match written {
            Ok(_) => {
                self.wrote();
                self.flush().await
            }
            Err(error) => Err(error),
        };
        match &result {
            Ok(()) => {
                self.write_problem.send_if_modified(|problem| {
                    let was = problem.take();
                    if was.is_some() {
                        tracing::info!("The store writes again: consumption resumes.");
                    }
                    metrics::gauge!(STORE_WRITABLE).set(1.0);
                    was.is_some()
                });
            }
            // Any failure of this write means the store cannot write, whatever its class.
            Err(error) if error.is_unavailable() => self.note_failure(error),
            Err(error) => self.note_failure(&StoreError::Unavailable(error.to_string())),
        }
        result
    }

    fn wrote(&self) {
        self.flusher.wrote();
    }

    /// Forgets the idempotency keys past the window, a bucket at a time; returns how many.
    pub fn evict_expired(&self) -> Result<usize, StoreError> {
        self.writing(|| {
            let evicted = self.window.evict(self.clock.now_ms())?;
            if evicted > 0 {
                self.wrote();
            }
            Ok(evicted as usize)
        })
    }

    /// Idempotency keys currently remembered (keys past the window until their bucket goes).
    pub fn window_len(&self) -> usize {
        self.window.len() as usize
    }

    /// Memory held by the window's indexes (which pack holds each key).
    pub fn window_index_bytes(&self) -> usize {
        self.window.index_bytes()
    }

    /// Disk space the data directory takes: the blocks allocated to its files (what `du` shows;
    /// sled's files are sparse, so their lengths say more than the disk holds).
    pub fn disk_bytes(&self) -> std::io::Result<u64> {
        dir_bytes(&self.dir)
    }

    /// The part of [`SledStore::disk_bytes`] the idempotency window's own database takes.
    pub fn window_disk_bytes(&self) -> std::io::Result<u64> {
        dir_bytes(&self.dir.join(window::DIRECTORY))
    }

    /// Bytes the database takes on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(store_error)
    }

    /// Output events committed and not yet published (kept as a counter: `Tree::len` is a scan).
    pub fn outbox_len(&self) -> usize {
        self.outbox_pending.load(Ordering::Acquire) as usize
    }

    /// The oldest `limit` outbox entries, with their sequence keys; fails on an entry that does
    /// not parse.
    pub fn outbox_batch(&self, limit: usize) -> Result<Vec<(sled::IVec, OutboxEntry)>, StoreError> {
        self.outbox_entries(limit)?
            .into_iter()
            .map(|(seq, entry)| Ok((seq, entry?)))
            .collect()
    }

    /// The oldest `limit` outbox entries, with their sequence keys; an entry that does not parse
    /// (written by another version, or damaged) comes as its error.
    pub fn outbox_entries(&self, limit: usize) -> Result<Vec<(sled::IVec, StoredEntry)>, StoreError> {
        let stored = self.outbox_stored(&self.pending(), limit)?;
        Ok(parse_stored(stored, |json| serde_json::from_slice(json)))
    }

    /// The oldest `limit` outbox entries as the publisher reads them ([`Publishable`]); an entry
    /// that does not parse comes as its error, for the publisher to set aside.
    pub fn outbox_publishable(&self, limit: usize) -> Result<OutboxRead<Publishable>, StoreError> {
        let stored = self.outbox_stored(&self.pending(), limit)?;
        Ok(parse_stored(stored, Publishable::parse))
    }

    /// The oldest `limit` outbox entries as stored: the tree's, then those of the commits not
    /// applied yet (newer: an application writes every entry still waiting). Read under
    /// `pending`'s lock, parsed after it ([`parse_stored`]): the committer waits for that lock.
    fn outbox_stored(
        &self,
        pending: &Pending,
        limit: usize,
    ) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
        let mut stored: Vec<(sled::IVec, sled::IVec)> = self
            .outbox
            .iter()
            .take(limit)
            .collect::<Result<_, _>>()
            .map_err(store_error)?;
        let logged = pending.outbox_entries().take(limit - stored.len());
        stored.extend(logged.map(|(seq, value)| (sled::IVec::from(&seq.to_be_bytes()), value.into())));
        Ok(stored)
    }

    /// Moves outbox entry `seq`, which can never be published, to the `outbox_poison` tree with
    /// `reason` (JSON: `reason`, `set_aside_ms`, `entry` as it was stored). Nothing waits for it
    /// any more: the publisher goes on with the next entries, and acks waiting for the outbox
    /// ([`wait_published`](Self::wait_published)) go on once [`outbox_published`](Self::outbox_published)
    /// has run.
    pub fn outbox_set_aside(&self, seq: &[u8], reason: &str) -> Result<(), StoreError> {
        self.writing(|| {
            let at_ms = self.clock.now_ms();
            let poisoned = |entry: &[u8]| {
                let stored = packed::unpack(entry).unwrap_or(std::borrow::Cow::Borrowed(entry));
                let record = serde_json::json!({
                    "reason": reason,
                    "set_aside_ms": at_ms,
                    "entry": String::from_utf8_lossy(&stored),
                });
                serde_json::to_vec(&record).expect("JSON values serialize")
            };
            let mut pending = self.pending();
            let logged = <[u8; 8]>::try_from(seq)
                .ok()
                .and_then(|number| pending.remove_outbox(u64::from_be_bytes(number)));
            let moved = match logged {
                // Not applied yet: the application will not write it.
                Some(entry) => {
                    self.outbox_poison
                        .insert(seq, poisoned(entry))
                        .map_err(store_error)?;
                    true
                }
                None => (&self.outbox, &self.outbox_poison)
                    .transaction(|(outbox, poison)| {
                        let Some(entry) = outbox.remove(seq)? else {
                            return Ok(false);
                        };
                        poison.insert(seq, poisoned(&entry))?;
                        Ok(true)
                    })
                    .map_err(unaborted_error)?,
            };
            drop(pending);
            if moved {
                self.outbox_pending.fetch_sub(1, Ordering::AcqRel);
            }
            self.wrote();
            Ok(())
        })
    }

    /// Outbox entries set aside as poison, with their reasons (JSON, see
    /// [`outbox_set_aside`](Self::outbox_set_aside)).
    pub fn outbox_poison(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        self.outbox_poison
            .iter()
            .values()
            .map(|value| serde_json::from_slice(&value.map_err(store_error)?).map_err(store_error))
            .collect()
    }

    pub fn outbox_remove(&self, seqs: &[sled::IVec]) -> Result<(), StoreError> {
        self.writing(|| {
            // Entries of commits not applied yet are forgotten, never written; the lock keeps an
            // application from writing one between the two removals.
            let mut pending = self.pending();
            let mut batch = sled::Batch::default();
            for seq in seqs {
                if let Ok(number) = <[u8; 8]>::try_from(seq.as_ref()) {
                    pending.remove_outbox(u64::from_be_bytes(number));
                }
                batch.remove(seq.clone());
            }
            self.outbox.apply_batch(batch).map_err(store_error)?;
            drop(pending);
            let _ = self
                .outbox_pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    Some(n.saturating_sub(seqs.len() as u64))
                });
            self.wrote();
            Ok(())
        })
    }

    /// Up to `limit` stored states of `kind` (raw JSON) with their ids, in id order (bytewise),
    /// starting after id `after` (from the first when `None`). A range scan: a page costs its
    /// own size, wherever it starts.
    pub fn states_after(
        &self,
        kind: AggregateKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.settle()?;
        let prefix = format!("{}/", kind.as_str()).into_bytes();
        page_after(&self.state, &prefix, after, limit)
    }

    /// Up to `limit` commission ledgers in affiliate id order (bytewise), starting after
    /// affiliate `after` (from the first when `None`).
    pub fn ledgers_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, CommissionLedger)>, StoreError> {
        self.settle()?;
        page_after(&self.ledgers, b"", after, limit)?
            .into_iter()
            .map(|(id, bytes)| Ok((id, serde_json::from_slice(&bytes).map_err(store_error)?)))
            .collect()
    }

    /// The commission ledger of `affiliate_id`, if it has earned or been paid anything.
    pub fn ledger(&self, affiliate_id: &str) -> Result<Option<CommissionLedger>, StoreError> {
        self.settle()?;
        self.ledgers
            .get(affiliate_id)
            .map_err(store_error)?
            .map(|bytes| serde_json::from_slice(&bytes).map_err(store_error))
            .transpose()
    }

    /// Up to `limit` payments waiting to be charged, in payment id order.
    /// Read beside the logged commits, without applying them: the gateway worker asks often.
    pub fn pending_charges(&self, limit: usize) -> Result<Vec<Charge>, StoreError> {
        let pending = self.pending();
        let mut charges: BTreeMap<Vec<u8>, Vec<u8>> = self
            .charges
            .iter()
            .take(limit)
            .map(|entry| entry.map(|(id, charge)| (id.to_vec(), charge.to_vec())))
            .collect::<Result<_, _>>()
            .map_err(store_error)?;
        charges.extend(
            pending
                .commits
                .iter()
                .flat_map(|commit| commit.charges.iter().cloned()),
        );
        drop(pending);
        charges
            .values()
            .take(limit)
            .map(|value| serde_json::from_slice(value).map_err(store_error))
            .collect()
    }

    /// The charge of `payment_id` is reported (its `PagoProcesado` is committed). A charge of a
    /// commit not applied yet is dropped from it, without applying the others; should the
    /// process stop before they are, the log brings the charge back at the next start and the
    /// worker asks again, as after a stop before this call (the gateway knows the payment: its
    /// id is the charge's idempotency key, and the result is a duplicate by then).
    pub fn charge_done(&self, payment_id: &str) -> Result<(), StoreError> {
        self.writing(|| {
            let mut pending = self.pending();
            for commit in &mut pending.commits {
                commit.charges.retain(|(id, _)| id != payment_id.as_bytes());
            }
            self.charges.remove(payment_id).map_err(store_error)?;
            drop(pending);
            self.wrote();
            Ok(())
        })
    }
}

/// Prefixes of the `dead_lettered` tree: message id → time, and the time index.
const DEAD_LETTERED: &[u8] = b"m";
const DEAD_LETTERED_BY_TIME: &[u8] = b"t";

fn dead_lettered_key(message: &[u8]) -> Vec<u8> {
    [DEAD_LETTERED, message].concat()
}

fn dead_lettered_index(at_ms: i64, message: &[u8]) -> Vec<u8> {
    [DEAD_LETTERED_BY_TIME, &at_ms.to_be_bytes(), message].concat()
}

/// The dead-letter memory: which messages (by broker message id: topic, partition, ledger, entry,
/// batch index) were dead-lettered within the idempotency window. Kept apart from the `seen` tree:
/// a dead-lettered message has no idempotency key to go by (it may not even decode).
impl SledStore {
    /// Whether `message` was dead-lettered within the window.
    pub fn dead_lettered(&self, message: &[u8]) -> Result<bool, StoreError> {
        if self.dead_lettered_len.load(Ordering::Acquire) == 0 {
            return Ok(false);
        }
        self.dead_lettered
            .contains_key(dead_lettered_key(message))
            .map_err(store_error)
    }

    /// Records that `message` is dead-lettered (durable with the next [`SledStore::flush`]).
    pub fn remember_dead_letter(&self, message: &[u8]) -> Result<(), StoreError> {
        self.writing(|| {
            let at_ms = self.clock.now_ms();
            let key = dead_lettered_key(message);
            let added = self
                .dead_lettered
                .transaction(|tree| {
                    let previous = tree.insert(key.as_slice(), &at_ms.to_be_bytes())?;
                    if let Some(previous) = &previous {
                        let previous = i64::from_be_bytes(previous.as_ref().try_into().unwrap_or([0; 8]));
                        tree.remove(dead_lettered_index(previous, message))?;
                    }
                    tree.insert(dead_lettered_index(at_ms, message), &[])?;
                    Ok::<_, ConflictableTransactionError<()>>(previous.is_none())
                })
                .map_err(unaborted_error)?;
            if added {
                self.dead_lettered_len.fetch_add(1, Ordering::AcqRel);
            }
            self.wrote();
            Ok(())
        })
    }

    /// Forgets the messages dead-lettered before the idempotency window; returns how many.
    pub fn evict_dead_letters(&self) -> Result<usize, StoreError> {
        self.writing(|| {
            let horizon = self.clock.now_ms() - self.window_ms;
            let start = DEAD_LETTERED_BY_TIME.to_vec();
            let end = [DEAD_LETTERED_BY_TIME, &horizon.to_be_bytes()].concat();
            let mut evicted = 0;
            for entry in self.dead_lettered.range(start..end) {
                let (index, _) = entry.map_err(store_error)?;
                let (at, message) = index[DEAD_LETTERED_BY_TIME.len()..].split_at(8);
                let key = dead_lettered_key(message);
                // The message is forgotten only if it was not dead-lettered afresh since.
                let removed = self
                    .dead_lettered
                    .transaction(|tree| {
                        tree.remove(index.as_ref())?;
                        let current = tree.get(key.as_slice())?;
                        let expired = current.is_some_and(|current| current.as_ref() == at);
                        if expired {
                            tree.remove(key.as_slice())?;
                        }
                        Ok::<_, ConflictableTransactionError<()>>(expired)
                    })
                    .map_err(unaborted_error)?;
                if removed {
                    self.dead_lettered_len.fetch_sub(1, Ordering::AcqRel);
                    evicted += 1;
                }
            }
            if evicted > 0 {
                self.wrote();
            }
            Ok(evicted)
        })
    }
}

impl StateStore for SledStore {
    fn read_model(&self) -> Result<ReadModel, StoreError> {
        self.settle()?;
        let mut model = ReadModel::default();
        for entry in self.report.iter() {
            let (group, bytes) = entry.map_err(store_error)?;
            let group = String::from_utf8_lossy(&group);
            let counters =
                serde_json::from_slice(&bytes).map_err(|e| store_error(corrupt("read model", e)))?;
            model.insert(&group, counters);
        }
        Ok(model)
    }

    fn snapshots(&self, key: &AggregateKey) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.settle_aggregate(key)?;
        self.snapshots
            .scan_prefix(versioned_prefix(key))
            .rev()
            .map(|entry| {
                let (stored_key, value) = entry.map_err(store_error)?;
                Ok((version_of(&stored_key)?, value.to_vec()))
            })
            .collect()
    }

    fn journal(&self, key: &AggregateKey, after: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.settle_aggregate(key)?;
        let mut entries = Vec::new();
        for stored in self.journal.scan_prefix(versioned_prefix(key)) {
            let (stored_key, value) = stored.map_err(store_error)?;
            let first = version_of(&stored_key)?;
            let value = packed::unpack(&value)?;
            for (version, entry) in (first..).zip(journal_entries(&value)?) {
                if version > after {
                    entries.push((version, entry.to_vec()));
                }
            }
        }
        Ok(entries)
    }

    fn load(&self, key: &AggregateKey) -> Result<Option<Vec<u8>>, StoreError> {
        let key = state_key(key);
        if let Some(state) = self.pending().state(&key) {
            return Ok(Some(state.to_vec()));
        }
        self.state
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(store_error)
    }

    fn seen(&self, idempotency_key: &str) -> Result<Option<SeenEntry>, StoreError> {
        let Some(value) = self.window.get(self.clock.now_ms(), idempotency_key)? else {
            return Ok(None);
        };
        let entry = decode_seen(&value);
        // Eviction runs periodically; a key past the window is already forgotten.
        Ok((entry.first_seen_ms > self.clock.now_ms() - self.window_ms).then_some(entry))
    }

    /// Commits alone, on the caller's thread (the report actor, tools, tests).
    fn commit(&self, commit: Commit<'_>) -> Result<CommitResult, StoreError> {
        self.commit_batch(&[commit]).remove(0)
    }

    /// Hands `commit` to the committer thread when it runs (`committer::start`), so that it is
    /// written in one transaction with the commits other actors hand over meanwhile.
    fn commit_batched(&self, commits: Vec<OwnedCommit>) -> CommitFuture {
        match self.committer.get() {
            Some(committer) => {
                let encoded = commits
                    .iter()
                    .map(|commit| self.encode(&commit.borrow()))
                    .collect();
                committer.submit(commits, encoded)
            }
            None => {
                let borrowed: Vec<_> = commits.iter().map(OwnedCommit::borrow).collect();
                Box::pin(std::future::ready(self.commit_batch(&borrowed)))
            }
        }
    }
}

/// A commit's values encoded ([`SledStore::encode`]), before any sequence number is given: on the
/// actor's thread for a commit handed to the committer, which every commit crosses one at a time.
struct Encoded {
    /// Per event: its key's digest and its `seen` value.
    keys: Vec<(window::Digest16, Vec<u8>)>,
    /// Each event's output events, then the commit's changelog record, as stored.
    outbox: Vec<Vec<u8>>,
    /// The commit's charges, in order, as stored.
    charges: Vec<Vec<u8>>,
    /// Snapshot kinds: the journal run of the commit's events (packed when it is applied).
    journal: Option<Vec<u8>>,
}

/// One commit prepared before the transaction: its keys, and its writes to the trees with their
/// outbox sequence numbers.
struct Staged<'a> {
    commit: Commit<'a>,
    /// Per event: its key's digest and its `seen` value.
    keys: &'a [(window::Digest16, Vec<u8>)],
    planned: Planned,
}

impl SledStore {
    /// Writes `commits` in one sled transaction, in order, and answers each.
    ///
    /// Why batches: sled 0.34 makes every transaction costly whatever its size (a process-wide
    /// lock, and two log buffers sealed and synced to disk), so one transaction for the commits
    /// that wait together divides that cost by their number (docs/BENCHMARKS.md).
    ///
    /// Each commit keeps the guarantees of a commit alone. It is refused (`AlreadySeen`, `Stale`)
    /// by checks that see the commits before it, logged or applied — two commits of one
    /// aggregate or one idempotency key in a batch are decided in order — and a refused commit
    /// writes nothing and refuses no other. The accepted ones go to the commit log as one value
    /// (`log.rs`), applied to the trees later. Outbox sequence numbers increase in commit order,
    /// each commit's outputs then its changelog record. If the batch fails (a stored read-model
    /// group or ledger it moves does not parse, say), nothing was written and each commit is
    /// retried alone, so a failure only fails the commit it belongs to.
    pub fn commit_batch(&self, commits: &[Commit<'_>]) -> Vec<Result<CommitResult, StoreError>> {
        let encoded: Vec<_> = commits.iter().map(|commit| self.encode(commit)).collect();
        self.commit_encoded(commits, &encoded)
    }

    /// [`commit_batch`](Self::commit_batch) of commits encoded already, `encoded[i]` from
    /// `commits[i]` ([`SledStore::encode`]).
    fn commit_encoded(
        &self,
        commits: &[Commit<'_>],
        encoded: &[Result<Encoded, StoreError>],
    ) -> Vec<Result<CommitResult, StoreError>> {
        let results = self.try_commit_batch(commits, encoded);
        for error in results.iter().filter_map(|result| result.as_ref().err()) {
            self.note_failure(error);
        }
        results
    }

    fn try_commit_batch(
        &self,
        commits: &[Commit<'_>],
        encoded: &[Result<Encoded, StoreError>],
    ) -> Vec<Result<CommitResult, StoreError>> {
        match self.write_batch(commits, encoded) {
            Ok(results) => results.into_iter().map(Ok).collect(),
            Err(_) if commits.len() > 1 => commits
                .iter()
                .zip(encoded)
                .map(|(commit, encoded)| {
                    self.write_batch(std::slice::from_ref(commit), std::slice::from_ref(encoded))
                        .map(|mut one| one.remove(0))
                })
                .collect(),
            Err(error) => vec![Err(error)],
        }
    }

    /// Encodes `commit`'s values: its events' `seen` values, outbox entries (each event's outputs,
    /// then the commit's changelog record: published in this order), charges and journal run.
    fn encode(&self, commit: &Commit<'_>) -> Result<Encoded, StoreError> {
        let mut entries: Vec<OutboxEntry> = commit
            .events()
            .flat_map(|event| event.outputs.iter().cloned().map(OutboxEntry::Output))
            .collect();
        if let Some(instance) = &self.changelog {
            entries.push(OutboxEntry::Change(Box::new(ChangeRecord::of(instance, commit))));
        }
        Ok(Encoded {
            keys: commit
                .events()
                .map(|event| {
                    (
                        window::digest(event.idempotency_key),
                        encode_seen(event.seen_at_ms, event.content_hash, event.delivery),
                    )
                })
                .collect(),
            // Packed when written to the outbox's tree, if still unpublished then (most are not).
            outbox: entries
                .iter()
                .map(|entry| serde_json::to_vec(entry).map_err(store_error))
                .collect::<Result<_, StoreError>>()?,
            charges: commit
                .events()
                .flat_map(|event| event.charges)
                .map(|charge| serde_json::to_vec(charge).expect("charges serialize"))
                .collect(),
            journal: commit
                .journal
                .is_some()
                .then(|| journal_run(commit.events().filter_map(|event| event.journal))),
        })
    }

    fn stage<'a>(&self, commit: Commit<'a>, encoded: &'a Encoded) -> Result<Staged<'a>, StoreError> {
        let outbox = encoded
            .outbox
            .iter()
            .map(|value| Ok((self.db.generate_id().map_err(store_error)?, value.clone())))
            .collect::<Result<_, StoreError>>()?;
        let versioned = |version: &u64| versioned_key(commit.aggregate, *version);
        let planned = Planned {
            state_key: state_key(commit.aggregate),
            state: commit.state.to_vec(),
            version: commit.version,
            outbox,
            outputs: commit
                .events()
                .flat_map(|event| event.outputs.iter().cloned())
                .collect(),
            charges: commit
                .events()
                .flat_map(|event| event.charges)
                .map(|charge| charge.payment_id.as_bytes().to_vec())
                .zip(encoded.charges.iter().cloned())
                .collect(),
            journal: encoded
                .journal
                .as_ref()
                .map(|run| (versioned(&(commit.base_version() + 1)), run.clone())),
            snapshot: commit
                .snapshot
                .map(|(version, snapshot)| (versioned(&version), snapshot.to_vec())),
            dropped: commit.drop_snapshots.iter().map(versioned).collect(),
            truncated: commit
                .truncate_journal
                .map(|(from, to)| (versioned(&from), versioned(&to))),
            read_model: commit.read_model.to_vec(),
        };
        Ok(Staged {
            commit,
            keys: &encoded.keys,
            planned,
        })
    }

    /// One transaction for `commits`; see [`SledStore::commit_batch`]: the commits accepted
    /// are written to the commit log, as one value, with their idempotency keys, and wait in
    /// [`Pending`] to be applied to the trees ([`apply_pending`](Self::apply_pending)).
    fn write_batch(
        &self,
        commits: &[Commit<'_>],
        encoded: &[Result<Encoded, StoreError>],
    ) -> Result<Vec<CommitResult>, StoreError> {
        self.may_write()?;
        injected_commit_failure()?;
        let mut pending = self.pending();
        // Commits wait in memory only as long as they can be applied: when they cannot, new
        // ones fail (and are retried) rather than pile up.
        if pending.commits.len() >= APPLY_COMMITS {
            self.apply_pending(&mut pending)?;
        }
        let staged: Vec<Staged> = commits
            .iter()
            .zip(encoded)
            .map(|(commit, encoded)| self.stage(*commit, encoded.as_ref().map_err(Clone::clone)?))
            .collect::<Result<_, _>>()?;
        for staged in &staged {
            self.check_applicable(&mut pending, &staged.planned)?;
        }
        // The version each aggregate's first commit of the batch is decided against: the newest
        // logged, else the stored one. (Every writer of versions holds `pending`.)
        let mut stored: HashMap<&[u8], Option<u64>> = HashMap::new();
        for staged in &staged {
            let key = staged.planned.state_key.as_slice();
            if !stored.contains_key(key) {
                let version = match pending.version(key) {
                    Some(version) => Some(version),
                    None => self
                        .versions
                        .get(key)
                        .map_err(store_error)?
                        .map(|v| decode_version(&v)),
                };
                stored.insert(key, version);
            }
        }
        let now = self.clock.now_ms();
        let horizon = now - self.window_ms;
        // Every key of the batch goes to the bucket of now (a commit's keys are stamped before).
        let bucket = self.window.bucket_for(now, now);
        let writer = self.window.writer(
            [bucket],
            staged.iter().flat_map(|s| s.keys.iter().map(|(key, _)| key)),
        )?;
        let log_key = self.db.generate_id().map_err(store_error)?;
        let result = (&self.log, writer.tree()).transaction(|(log, window)| {
            let mut seen = writer.staging();
            let mut versions = stored.clone();
            let mut results = Vec::with_capacity(staged.len());
            let mut value = Vec::new();
            'commits: for staged in &staged {
                let commit = &staged.commit;
                for (key, _) in staged.keys {
                    if let Some(existing) = seen.get(key) {
                        let entry = decode_seen(existing);
                        if entry.first_seen_ms > horizon {
                            results.push(CommitResult::AlreadySeen(entry));
                            continue 'commits;
                        }
                    }
                }
                // Optimistic concurrency: the change was decided on the version stored now.
                let version = versions
                    .get_mut(staged.planned.state_key.as_slice())
                    .expect("every aggregate of the batch was looked up");
                if version.is_some_and(|stored| stored != commit.base_version()) {
                    results.push(CommitResult::Stale);
                    continue;
                }
                *version = Some(commit.version);
                for (key, value) in staged.keys {
                    seen.add(bucket, *key, value);
                }
                staged.planned.encode(&mut value);
                results.push(CommitResult::Committed);
            }
            if !value.is_empty() {
                log.insert(&log_key.to_be_bytes(), packed::pack(&value))?;
            }
            Ok((results, seen.write(window)?))
        });
        let (results, written) = result.map_err(unaborted_error)?;
        writer.finish(written);
        self.wrote();
        let mut added = false;
        let mut logged = Vec::new();
        for (staged, result) in staged.into_iter().zip(&results) {
            tracing::debug!(
                aggregate = ?staged.commit.aggregate,
                version = staged.commit.version,
                key = %staged.commit.idempotency_key,
                result = ?result,
                "Commit written."
            );
            if *result != CommitResult::Committed {
                continue;
            }
            let outbox = &staged.planned.outbox;
            self.outbox_pending
                .fetch_add(outbox.len() as u64, Ordering::AcqRel);
            if let Some((last, _)) = outbox.last() {
                self.outbox_high.fetch_max(*last, Ordering::AcqRel);
                added = true;
            }
            logged.push(staged.planned);
        }
        if !logged.is_empty() {
            pending.add(log_key, logged);
        }
        drop(pending);
        if added {
            // Read from the outbox, not lowered to this batch's first entry: the publisher may
            // have published and deleted the batch's entries already, and a mark lowered to an
            // entry that is gone would hold every later ack until the next deletion.
            fail::fail_point!(FAILPOINT_OUTBOX_MARK);
            self.outbox_published();
            self.outbox_added.notify_one();
        }
        Ok(results)
    }

    /// Fails when a stored value `planned` would move does not parse (a read-model group, a
    /// ledger): its application would fail, after the commit, so the commit fails now.
    fn check_applicable(&self, pending: &mut Pending, planned: &Planned) -> Result<(), StoreError> {
        for change in &planned.read_model {
            let group = change.group.as_str();
            parses::<Counters>(&self.report, &mut pending.parsed_groups, group, "read model")?;
        }
        for output in &planned.outputs {
            if let Some(affiliate) = CommissionLedger::affiliate_of(&output.body) {
                parses::<CommissionLedger>(&self.ledgers, &mut pending.parsed_ledgers, affiliate, "ledger")?;
            }
        }
        Ok(())
    }

    /// The commits logged and not applied; held by every write to the trees a commit writes.
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`pending`](Self::pending), with every logged commit applied to the trees first.
    fn settled(&self) -> Result<std::sync::MutexGuard<'_, Pending>, StoreError> {
        let mut pending = self.pending();
        self.apply_pending(&mut pending)?;
        Ok(pending)
    }

    /// Applies every logged commit to the trees (for a read of them, and at shutdown).
    pub fn settle(&self) -> Result<(), StoreError> {
        self.settled().map(drop)
    }

    /// Applies the logged commits when some are `aggregate`'s: an actor restored reads its
    /// snapshots and journal, and with many aggregates passivated and restored, applying every
    /// time would apply a few commits at a time (docs/BENCHMARKS.md).
    fn settle_aggregate(&self, aggregate: &AggregateKey) -> Result<(), StoreError> {
        let mut pending = self.pending();
        if pending.versions.contains_key(&state_key(aggregate)) {
            self.apply_pending(&mut pending)?;
        }
        Ok(())
    }

    /// Applies the logged commits when the oldest has waited [`APPLY_AFTER`] or there are
    /// [`APPLY_COMMITS`] of them; the committer calls it between its transactions.
    pub fn apply_if_due(&self) {
        let mut pending = self.pending();
        let due = pending.commits.len() >= APPLY_COMMITS
            || pending.since.is_some_and(|since| since.elapsed() >= APPLY_AFTER);
        if !due {
            return;
        }
        if let Err(error) = self.apply_pending(&mut pending) {
            tracing::warn!(error = %error, "Cannot apply the logged commits to the trees yet; reads wait for it.");
            self.note_failure(&error);
        }
    }

    /// Writes the logged commits to the trees, in one transaction that also removes their log
    /// values: each aggregate's newest state and version once, the outbox entries not yet
    /// published, the ledgers, charges, journal runs, snapshots and read model of each commit in
    /// order.
    fn apply_pending(&self, pending: &mut Pending) -> Result<(), StoreError> {
        if pending.commits.is_empty() {
            return Ok(());
        }
        self.may_write()?;
        let runs = self.journal_plan(&pending.commits)?;
        let mut read_model: BTreeMap<&str, Vec<&Change>> = BTreeMap::new();
        for change in pending.commits.iter().flat_map(|commit| &commit.read_model) {
            read_model.entry(change.group.as_str()).or_default().push(change);
        }
        let unpublished: Vec<(u64, Vec<u8>)> = pending
            .outbox_entries()
            .map(|(seq, entry)| (seq, packed::pack(entry)))
            .collect();
        let pending_ref = &*pending;
        let mut trees = self.trees().to_vec();
        trees.push(&self.log);
        trees
            .as_slice()
            .transaction(|views| {
                let [report, state, out, ledgers, pending_charges, journal, snapshots, versions, log] =
                    views.as_slice()
                else {
                    unreachable!("the store's trees, then the log")
                };
                for key in &runs.removed {
                    journal.remove(key)?;
                }
                for (key, run) in &runs.written {
                    journal.insert(key.as_slice(), run.as_slice())?;
                }
                for (at, commit) in pending_ref.commits.iter().enumerate() {
                    let key = commit.state_key.as_slice();
                    if pending_ref
                        .versions
                        .get(key)
                        .is_some_and(|(_, newest)| *newest == at)
                    {
                        state.insert(key, commit.state.as_slice())?;
                        versions.insert(key, &commit.version.to_be_bytes())?;
                    }
                    move_ledgers(ledgers, &commit.outputs)?;
                    for (payment_id, charge) in &commit.charges {
                        pending_charges.insert(payment_id.as_slice(), charge.as_slice())?;
                    }
                    if let Some((key, snapshot)) = &commit.snapshot {
                        snapshots.insert(key.as_slice(), snapshot.as_slice())?;
                    }
                    for key in &commit.dropped {
                        snapshots.remove(key.as_slice())?;
                    }
                }
                for (seq, entry) in &unpublished {
                    out.insert(&seq.to_be_bytes(), entry.as_slice())?;
                }
                move_read_model::<()>(report, &read_model)?;
                for key in &pending_ref.log_keys {
                    log.remove(&key.to_be_bytes())?;
                }
                Ok(())
            })
            .map_err(unaborted_error)?;
        self.wrote();
        metrics::counter!(STORE_LOG_APPLICATIONS).increment(1);
        metrics::counter!(STORE_LOG_APPLIED_COMMITS).increment(pending.commits.len() as u64);
        pending.clear();
        Ok(())
    }
}

/// Fails when `tree`'s value under `key`, unless `parsed` holds it, does not parse as a `T`;
/// remembers it in `parsed` when it does (or is absent).
fn parses<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    parsed: &mut std::collections::HashSet<String>,
    key: &str,
    what: &str,
) -> Result<(), StoreError> {
    if parsed.contains(key) {
        return Ok(());
    }
    if let Some(bytes) = tree.get(key).map_err(store_error)? {
        serde_json::from_slice::<T>(&bytes).map_err(|e| store_error(corrupt(what, e)))?;
    }
    parsed.insert(key.to_owned());
    Ok(())
}

/// What an application does to the journal: runs written (packed), stored runs removed.
struct JournalPlan {
    written: Vec<(Vec<u8>, Vec<u8>)>,
    removed: Vec<sled::IVec>,
}

impl SledStore {
    /// The journal writes of `commits`, applied in order: each commit's run joins the run of
    /// its aggregate's commit before it in the pass, unless that one ended at a snapshot (a run
    /// ends where a snapshot is written, so a truncation up to a snapshot's version takes whole
    /// runs); a truncation removes the stored runs in its range (no one else writes the journal
    /// while `pending` is held) and the pass's runs started there.
    fn journal_plan(&self, commits: &[Planned]) -> Result<JournalPlan, StoreError> {
        // Runs of the pass: key, run, whether removed; and each aggregate's open run.
        let mut runs: Vec<(Vec<u8>, Vec<u8>, bool)> = Vec::new();
        let mut open: HashMap<&[u8], usize> = HashMap::new();
        let mut removed = Vec::new();
        for commit in commits {
            let aggregate = commit.state_key.as_slice();
            match &commit.journal {
                Some((key, run)) => match open.get(aggregate) {
                    Some(&at) if !runs[at].2 => runs[at].1.extend_from_slice(&run[1..]),
                    _ => {
                        open.insert(aggregate, runs.len());
                        runs.push((key.clone(), run.clone(), false));
                    }
                },
                None => {
                    open.remove(aggregate);
                }
            }
            // A commit's truncation may take its own run (a snapshot at its version, one kept).
            if let Some((from, to)) = &commit.truncated {
                let range = from.as_slice()..=to.as_slice();
                for stored in self.journal.range(range.clone()).keys() {
                    removed.push(stored.map_err(store_error)?);
                }
                for run in runs.iter_mut().filter(|run| range.contains(&run.0.as_slice())) {
                    run.2 = true;
                }
            }
            if commit.snapshot.is_some() {
                open.remove(aggregate);
            }
        }
        let written = runs
            .into_iter()
            .filter(|run| !run.2)
            .map(|(key, run, _)| (key, packed::pack(&run)))
            .collect();
        Ok(JournalPlan { written, removed })
    }
}

/// Logged commits are applied to the trees once the oldest has waited this long...
const APPLY_AFTER: std::time::Duration = std::time::Duration::from_millis(50);
/// ...or once this many wait.
const APPLY_COMMITS: usize = 4096;

/// Moves the idempotency keys of a store written before the window had buckets (a `seen` tree by
/// key and a `seen_by_time` index) into the buckets, then drops the old trees. Runs at open.
fn migrate_window(
    db: &sled::Db,
    window: &window::Window,
    window_ms: i64,
    now: i64,
) -> Result<(), StoreError> {
    if !db.tree_names().iter().any(|name| name.as_ref() == b"seen") {
        return Ok(());
    }
    let legacy = db.open_tree("seen").map_err(store_error)?;
    let mut buckets: BTreeMap<i64, Vec<(window::Digest16, Vec<u8>)>> = BTreeMap::new();
    let mut moved = 0;
    for entry in legacy.iter() {
        let (key, value) = entry.map_err(store_error)?;
        let first_seen = decode_seen(&value).first_seen_ms;
        if first_seen <= now - window_ms {
            continue;
        }
        let digest = window::digest(&String::from_utf8_lossy(&key));
        let bucket = window.bucket_for(first_seen, first_seen);
        buckets.entry(bucket).or_default().push((digest, value.to_vec()));
        moved += 1;
    }
    for (bucket, keys) in buckets {
        window.append(bucket, &keys)?;
    }
    tracing::info!(
        keys = moved,
        "Idempotency keys moved to the window's time buckets."
    );
    for name in ["seen", "seen_by_time"] {
        db.drop_tree(name).map_err(store_error)?;
    }
    db.flush().map_err(store_error)?;
    Ok(())
}

/// Outbox entries as stored ([`SledStore::outbox_stored`]), each parsed by `parse` or with why it
/// does not parse.
fn parse_stored<T>(
    stored: Vec<(sled::IVec, sled::IVec)>,
    parse: impl Fn(&[u8]) -> Result<T, serde_json::Error>,
) -> OutboxRead<T> {
    let parse = |value: &[u8]| packed::unpack(value).and_then(|json| parse(&json).map_err(store_error));
    stored
        .into_iter()
        .map(|(seq, value)| {
            let parsed = parse(&value);
            (seq, parsed)
        })
        .collect()
}

/// Trees a commit writes besides the window's ([`SledStore::trees`]).
const TREES: usize = 8;

/// The oldest sequence in the outbox, `u64::MAX` when it is empty.
/// The oldest entry's sequence number, `u64::MAX` when the outbox is empty. An outbox that cannot
/// be read is not empty: an error must never release the acks that wait for it.
fn first_seq(outbox: &sled::Tree) -> Result<u64, StoreError> {
    Ok(match outbox.first().map_err(store_error)? {
        Some((seq, _)) => u64::from_be_bytes(seq.as_ref().try_into().unwrap_or([0; 8])),
        None => u64::MAX,
    })
}

type Abort<E> = ConflictableTransactionError<E>;

fn decode_version(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().unwrap_or([0; 8]))
}

/// Read-model changes grouped by the group they move.
fn by_group(changes: &[Change]) -> BTreeMap<&str, Vec<&Change>> {
    let mut groups: BTreeMap<&str, Vec<&Change>> = BTreeMap::new();
    for change in changes {
        groups.entry(change.group.as_str()).or_default().push(change);
    }
    groups
}

fn move_read_model<E>(
    report: &TransactionalTree,
    groups: &BTreeMap<&str, Vec<&Change>>,
) -> Result<(), Abort<E>> {
    for (group, changes) in groups {
        let mut counters: Counters = match report.get(group)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ConflictableTransactionError::Storage(corrupt("read model", e)))?,
            None => Counters::new(),
        };
        apply_changes(&mut counters, changes.iter().copied());
        if counters.is_empty() {
            report.remove(group.as_bytes())?;
        } else {
            let bytes = serde_json::to_vec(&counters).expect("counters serialize");
            report.insert(group.as_bytes(), bytes)?;
        }
    }
    Ok(())
}

/// Records output events in the commission ledgers they move.
fn move_ledgers<E>(ledgers: &TransactionalTree, outputs: &[OutputEvent]) -> Result<(), Abort<E>> {
    edit_ledgers(ledgers, outputs, CommissionLedger::record)
}

/// Takes back what [`move_ledgers`] recorded; a ledger left empty is removed.
fn revert_ledgers<E>(ledgers: &TransactionalTree, outputs: &[OutputEvent]) -> Result<(), Abort<E>> {
    edit_ledgers(ledgers, outputs, CommissionLedger::revert)
}

fn edit_ledgers<E>(
    ledgers: &TransactionalTree,
    outputs: &[OutputEvent],
    edit: fn(&mut CommissionLedger, &OutputBody),
) -> Result<(), Abort<E>> {
    for output in outputs {
        let Some(affiliate) = CommissionLedger::affiliate_of(&output.body) else {
            continue;
        };
        let mut ledger = match ledgers.get(affiliate)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ConflictableTransactionError::Storage(corrupt("ledger", e)))?,
            None => CommissionLedger::new(affiliate),
        };
        edit(&mut ledger, &output.body);
        if ledger == CommissionLedger::new(affiliate) {
            ledgers.remove(affiliate.as_bytes())?;
        } else {
            let bytes = serde_json::to_vec(&ledger).expect("ledgers serialize");
            ledgers.insert(affiliate.as_bytes(), bytes)?;
        }
    }
    Ok(())
}

/// The read-model changes from the stored state `before` to `after`, both as stored (JSON).
fn read_model_changes(
    kind: AggregateKind,
    before: Option<&[u8]>,
    after: &[u8],
) -> serde_json::Result<Vec<Change>> {
    fn typed<A: Aggregate>(before: Option<&[u8]>, after: &[u8]) -> serde_json::Result<Vec<Change>> {
        let before: Option<A> = before.map(serde_json::from_slice).transpose()?;
        Ok(A::read_model_changes(
            before.as_ref(),
            &serde_json::from_slice::<A>(after)?,
        ))
    }
    match kind {
        AggregateKind::Campaign => typed::<Campaign>(before, after),
        AggregateKind::Payment => typed::<Payment>(before, after),
        AggregateKind::Report => Ok(Vec::new()),
    }
}

impl SledStore {
    /// The trees a commit writes besides the window's, in the order `write_batch` names them.
    fn trees(&self) -> [&sled::Tree; TREES] {
        [
            &self.report,
            &self.state,
            &self.outbox,
            &self.ledgers,
            &self.charges,
            &self.journal,
            &self.snapshots,
            &self.versions,
        ]
    }

    /// Resolves when a commit has added outbox entries since the last call (or now, if one did).
    pub async fn outbox_added(&self) {
        self.outbox_added.notified().await
    }

    /// The sequence number of the newest outbox entry committed so far.
    pub fn outbox_high_water(&self) -> u64 {
        self.outbox_high.load(Ordering::Acquire)
    }

    /// Waits until every outbox entry up to `through` is published (deleted by the publisher).
    pub async fn wait_published(&self, through: u64) {
        let _ = self.outbox_low.subscribe().wait_for(|low| *low > through).await;
    }

    /// The outbox changed (a commit added entries, the publisher deleted some): recompute the
    /// oldest pending entry, from the tree and the entries of commits not applied yet, both read
    /// under the lock an application holds (it moves entries from one to the other). Every change
    /// is followed by a recompute under the watch's lock, so the last one always reads an outbox
    /// with every finished change in it.
    pub fn outbox_published(&self) {
        self.outbox_low.send_if_modified(|low| {
            let pending = self.pending();
            let logged = pending.outbox.keys().next().copied().unwrap_or(u64::MAX);
            match first_seq(&self.outbox) {
                Ok(first) => {
                    *low = first.min(logged);
                    true
                }
                Err(error) => {
                    tracing::error!(error = %error, "Cannot read the outbox; acks waiting for it keep waiting.");
                    false
                }
            }
        });
    }

    /// Imports a changelog record when it is newer than the stored state of its aggregate: state,
    /// version, idempotency record, ledger moves, read model, charges still to make; drops the
    /// aggregate's local journal and snapshots (a snapshot of the imported state replaces them).
    /// An older or equal version only records the idempotency key. True when imported.
    ///
    /// For an aggregate with withdrawn versions ([`withdraw_unpublished`](Self::withdraw_unpublished))
    /// the stored state does not count until a record replaces it: the record of the version before
    /// the withdrawn ones restores it (its ledger moves and charges are in the store already), and
    /// any later one imports as new.
    pub fn import(&self, record: &ChangeRecord) -> Result<bool, StoreError> {
        self.writing(|| {
            let _applied = self.settled()?;
            let key = state_key(&record.aggregate);
            let (old_journal, old_snapshots) = self.journal_and_snapshot_keys(&record.aggregate)?;
            let now = self.clock.now_ms();
            // Per key: its digest, its value and the window's bucket it goes to.
            let keys: Vec<(window::Digest16, Vec<u8>, i64)> = record
                .events()
                .map(|event| {
                    (
                        window::digest(event.idempotency_key),
                        encode_seen(event.seen_at_ms, event.content_hash, event.delivery),
                        self.window.bucket_for(now, event.seen_at_ms),
                    )
                })
                .collect();
            let kind = record.aggregate.kind;
            let snapshot = match kind {
                AggregateKind::Campaign => {
                    let campaign: Campaign = serde_json::from_str(&record.state).map_err(store_error)?;
                    Some((
                        versioned_key(&record.aggregate, record.version),
                        serde_json::to_vec(&Snapshot::of(&campaign)).map_err(store_error)?,
                    ))
                }
                _ => None,
            };
            let settled = match kind {
                AggregateKind::Payment => {
                    let payment: Payment = serde_json::from_str(&record.state).map_err(store_error)?;
                    payment.status.is_terminal().then_some(payment.id)
                }
                _ => None,
            };
            let mut trees = vec![
                &self.report,
                &self.state,
                &self.ledgers,
                &self.charges,
                &self.journal,
                &self.snapshots,
                &self.versions,
                &self.unconfirmed,
            ];
            let writer = self.window.writer(
                keys.iter().map(|(_, _, bucket)| *bucket),
                keys.iter().map(|(key, _, _)| key),
            )?;
            trees.push(writer.tree());
            let result = trees.as_slice().transaction(|views| {
                let (fixed, window) = views.split_at(8);
                let [report, state, ledgers, pending_charges, journal, snapshots, versions, unconfirmed] =
                    fixed
                else {
                    unreachable!("the import's trees, then the window's")
                };
                let mut seen = writer.staging();
                for (key, value, bucket) in &keys {
                    if seen.get(key).is_none() {
                        seen.add(*bucket, *key, value);
                    }
                }
                let written = seen.write(&window[0])?;
                let withdrawn = match unconfirmed.get(key.as_slice())? {
                    Some(bytes) => Some(Unconfirmed::decode(&bytes)?).filter(|mark| !mark.resolved),
                    None => None,
                };
                // `base`: the version the store's ledgers and charges count up to.
                let (newer, restores, base) = match &withdrawn {
                    Some(mark) => (
                        record.version >= mark.from,
                        record.version + 1 == mark.from,
                        mark.from - 1,
                    ),
                    None => {
                        let local = versions.get(key.as_slice())?.map_or(0, |v| decode_version(&v));
                        (record.version > local, false, local)
                    }
                };
                if !newer && !restores {
                    return Ok((false, written));
                }
                let before = state.get(key.as_slice())?;
                let changes = read_model_changes(kind, before.as_deref(), record.state.as_bytes())
                    .map_err(|e| ConflictableTransactionError::Storage(corrupt("imported state", e)))?;
                state.insert(key.as_slice(), record.state.as_bytes())?;
                versions.insert(key.as_slice(), &record.version.to_be_bytes())?;
                move_read_model(report, &by_group(&changes))?;
                if newer {
                    // Only the events the store does not count yet move ledgers and charges.
                    for event in record.events().filter(|event| event.version > base) {
                        move_ledgers(ledgers, event.outputs)?;
                        for charge in event.charges {
                            let bytes = serde_json::to_vec(charge).expect("charges serialize");
                            pending_charges.insert(charge.payment_id.as_bytes(), bytes)?;
                        }
                    }
                }
                if let Some(payment_id) = &settled {
                    pending_charges.remove(payment_id.as_bytes())?;
                }
                for old in &old_journal {
                    journal.remove(old)?;
                }
                for old in &old_snapshots {
                    snapshots.remove(old)?;
                }
                if let Some((at, bytes)) = &snapshot {
                    snapshots.insert(at.as_slice(), bytes.as_slice())?;
                }
                if let Some(mark) = withdrawn {
                    let resolved = Unconfirmed {
                        resolved: true,
                        ..mark
                    };
                    unconfirmed.insert(key.as_slice(), resolved.encode())?;
                }
                Ok((true, written))
            });
            let (imported, written) = result.map_err(unaborted_error)?;
            writer.finish(written);
            tracing::debug!(
                aggregate = %record.key(),
                version = record.version,
                from = %record.instance,
                key = %record.idempotency_key,
                imported,
                "Changelog record read."
            );
            self.wrote();
            Ok(imported)
        })
    }

    /// Run once at start, before anything else uses the store: withdraws the changelog records a
    /// previous run committed and never published, and returns how many.
    ///
    /// Their input messages were never acked (an ack waits for the record to be published), so
    /// their events come back, to this daemon or to another one, which may decide them in another
    /// order. Keeping them would leave this daemon with versions nobody else has; publishing them
    /// now could override what another daemon decided since. So each withdrawn commit gives back
    /// its idempotency key (its event is applied again when redelivered), its ledger moves and the
    /// charges it asked for (the request asks again when it is decided again, here or elsewhere;
    /// charged from here, its result would create the payment a second time, on another path),
    /// and its aggregate is marked: the changelog restores it ([`import`](Self::import)) and
    /// [`settle_unconfirmed`](Self::settle_unconfirmed) finishes the job once the changelog has
    /// been read to its end. Output events stay in the outbox: they carry the ids their
    /// re-decided copies will have.
    pub fn withdraw_unpublished(&self) -> Result<usize, StoreError> {
        let applied = self.settled()?;
        // An entry that does not parse is left to the publisher, which sets it aside.
        let stored = self.outbox_stored(&applied, usize::MAX)?;
        let withdrawn: Vec<(sled::IVec, ChangeRecord)> =
            parse_stored(stored, |json| serde_json::from_slice(json))
                .into_iter()
                .filter_map(|(seq, entry)| match entry {
                    Ok(OutboxEntry::Change(record)) => Some((seq, *record)),
                    Ok(OutboxEntry::Output(_)) | Err(_) => None,
                })
                .collect();
        if withdrawn.is_empty() {
            return Ok(0);
        }
        let mut marks: BTreeMap<Vec<u8>, Unconfirmed> = BTreeMap::new();
        for (_, record) in &withdrawn {
            marks
                .entry(state_key(&record.aggregate))
                .and_modify(|mark| mark.from = mark.from.min(record.first_version()))
                .or_insert_with(|| Unconfirmed {
                    aggregate: record.aggregate.clone(),
                    from: record.first_version(),
                    resolved: false,
                });
        }
        // Withdrawn keys are wherever they were written: every bucket that holds one is rewritten.
        let keys: Vec<window::Digest16> = withdrawn
            .iter()
            .flat_map(|(_, record)| record.events().map(|event| window::digest(event.idempotency_key)))
            .collect();
        let withdrawal = self.window.withdrawal(&keys)?;
        let mut trees = vec![&self.outbox, &self.ledgers, &self.charges, &self.unconfirmed];
        trees.push(self.window.staged_tree());
        trees
            .as_slice()
            .transaction(|views| {
                let (fixed, window) = views.split_at(4);
                let [out, ledgers, pending_charges, unconfirmed] = fixed else {
                    unreachable!("the withdrawal's trees, then the window's")
                };
                withdrawal.remove(&window[0])?;
                for (seq, record) in &withdrawn {
                    out.remove(seq)?;
                    for event in record.events() {
                        revert_ledgers(ledgers, event.outputs)?;
                        for charge in event.charges {
                            pending_charges.remove(charge.payment_id.as_bytes())?;
                        }
                    }
                }
                for (key, mark) in &marks {
                    let from = match unconfirmed.get(key.as_slice())? {
                        Some(bytes) => Unconfirmed::decode(&bytes)?.from.min(mark.from),
                        None => mark.from,
                    };
                    unconfirmed.insert(key.as_slice(), Unconfirmed { from, ..mark.clone() }.encode())?;
                }
                Ok(())
            })
            .map_err(unaborted_error)?;
        let forgotten = withdrawal.keys();
        withdrawal.finish();
        for (_, record) in &withdrawn {
            tracing::debug!(aggregate = %record.key(), from = record.first_version(), version = record.version, key = %record.idempotency_key, "Commit withdrawn.");
        }
        tracing::debug!(keys = forgotten, "Idempotency keys withdrawn.");
        self.outbox_pending
            .fetch_sub(withdrawn.len() as u64, Ordering::AcqRel);
        drop(applied);
        self.outbox_published();
        self.any_unconfirmed.store(true, Ordering::Release);
        self.wrote();
        Ok(withdrawn.len())
    }

    /// Whether some aggregate still waits for the changelog to confirm it.
    pub fn any_unconfirmed(&self) -> bool {
        self.any_unconfirmed.load(Ordering::Acquire)
    }

    /// Whether `aggregate` waits for the changelog to confirm it.
    pub fn is_unconfirmed(&self, aggregate: &AggregateKey) -> Result<bool, StoreError> {
        if !self.any_unconfirmed() {
            return Ok(false);
        }
        self.unconfirmed
            .contains_key(state_key(aggregate))
            .map_err(store_error)
    }

    /// Once the changelog has been read to its end: the withdrawn aggregates no record restored
    /// were created by a withdrawn commit (nothing before it in the changelog) and are removed;
    /// any other (its older records no longer kept by the broker) keeps its local state, with a
    /// warning. Clears the marks; returns the aggregates whose stored state changed here.
    pub fn settle_unconfirmed(&self) -> Result<Vec<AggregateKey>, StoreError> {
        let mut removed = Vec::new();
        for entry in self.unconfirmed.iter() {
            let (key, bytes) = entry.map_err(store_error)?;
            let mark = Unconfirmed::decode(&bytes).map_err(store_error)?;
            tracing::debug!(aggregate = ?mark.aggregate, from = mark.from, resolved = mark.resolved, "Withdrawn aggregate settled.");
            if !mark.resolved && mark.from == 1 {
                self.remove_aggregate(&mark.aggregate)?;
                removed.push(mark.aggregate);
            } else if !mark.resolved {
                tracing::warn!(aggregate = ?mark.aggregate, from = mark.from, "The changelog no longer holds the versions before this aggregate's withdrawn ones; keeping the local state.");
            }
            self.unconfirmed.remove(key).map_err(store_error)?;
        }
        self.any_unconfirmed.store(false, Ordering::Release);
        self.wrote();
        Ok(removed)
    }

    /// The keys of an aggregate's journal entries and of its snapshots.
    fn journal_and_snapshot_keys(
        &self,
        aggregate: &AggregateKey,
    ) -> Result<(Vec<sled::IVec>, Vec<sled::IVec>), StoreError> {
        let prefix = versioned_prefix(aggregate);
        let keys = |tree: &sled::Tree| -> Result<Vec<sled::IVec>, StoreError> {
            tree.scan_prefix(&prefix)
                .keys()
                .map(|k| k.map_err(store_error))
                .collect()
        };
        Ok((keys(&self.journal)?, keys(&self.snapshots)?))
    }

    /// Removes an aggregate's state, version, journal and snapshots, and its read-model counts.
    fn remove_aggregate(&self, aggregate: &AggregateKey) -> Result<(), StoreError> {
        let _applied = self.settled()?;
        let key = state_key(aggregate);
        let (journal_keys, snapshot_keys) = self.journal_and_snapshot_keys(aggregate)?;
        let trees = (
            &self.report,
            &self.state,
            &self.versions,
            &self.journal,
            &self.snapshots,
        );
        trees
            .transaction(|(report, state, versions, journal, snapshots)| {
                if let Some(before) = state.remove(key.as_slice())? {
                    let mut changes = read_model_changes(aggregate.kind, None, &before)
                        .map_err(|e| ConflictableTransactionError::Storage(corrupt("stored state", e)))?;
                    for change in &mut changes {
                        change.delta.count = -change.delta.count;
                        change.delta.amount = -change.delta.amount;
                    }
                    move_read_model(report, &by_group(&changes))?;
                }
                versions.remove(key.as_slice())?;
                for old in &journal_keys {
                    journal.remove(old)?;
                }
                for old in &snapshot_keys {
                    snapshots.remove(old)?;
                }
                Ok(())
            })
            .map_err(unaborted_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aerostream_actors::events::PaymentStatus;
    use aerostream_actors::ports::Clock;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    struct TestClock(AtomicI64);
    impl Clock for TestClock {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// A first commit (version 1, state `{}`) of campaign `id`, as an actor hands it over.
    fn owned_commit(id: &str, idempotency_key: &str, content_hash: &str) -> OwnedCommit {
        OwnedCommit {
            aggregate: key(id),
            state: b"{}".to_vec(),
            version: 1,
            idempotency_key: idempotency_key.into(),
            content_hash: content_hash.into(),
            seen_at_ms: 0,
            delivery: None,
            partition: None,
            outbox: Vec::new(),
            charges: Vec::new(),
            journal: None,
            snapshot: None,
            drop_snapshots: Vec::new(),
            truncate_journal: None,
            read_model: Vec::new(),
            earlier: Vec::new(),
        }
    }

    fn key(id: &str) -> AggregateKey {
        AggregateKey {
            kind: AggregateKind::Campaign,
            id: id.into(),
        }
    }

    fn commit<'a>(agg: &'a AggregateKey, idem: &'a str, hash: &'a str, at: i64) -> Commit<'a> {
        Commit::of(agg, b"{}", 1, idem, hash, at)
    }

    /// A store created with sled's default segment size keeps it (sled opens no other); a new
    /// store gets [`SEGMENT_SIZE`].
    #[test]
    fn a_store_keeps_the_segment_size_it_was_created_with() {
        let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        drop(sled::open(old.path()).unwrap());
        let clock = || Arc::new(TestClock(AtomicI64::new(0)));
        drop(SledStore::open(old.path(), 10, clock()).unwrap());
        assert_eq!(segment_size(old.path()), 512 * 1024);
        drop(SledStore::open(new.path(), 10, clock()).unwrap());
        assert_eq!(segment_size(new.path()), SEGMENT_SIZE);
        drop(SledStore::open(new.path(), 10, clock()).unwrap());
    }

    /// A data directory of an earlier version (one `seen` tree by key and a time index) opens
    /// with its keys in the window's buckets, the old trees gone.
    #[test]
    fn keys_of_an_earlier_version_move_into_the_window_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let hash = hex::encode([7u8; 32]);
        {
            let db = sled::open(dir.path()).unwrap();
            let legacy = db.open_tree("seen").unwrap();
            legacy
                .insert("recent", encode_seen(995_000, &hash, None))
                .unwrap();
            legacy
                .insert("expired", encode_seen(900_000, &hash, None))
                .unwrap();
            db.open_tree("seen_by_time")
                .unwrap()
                .insert(b"index", b"")
                .unwrap();
            db.flush().unwrap();
        }
        let clock = Arc::new(TestClock(AtomicI64::new(1_000_000)));
        let store = SledStore::open(dir.path(), 10, clock).unwrap();
        assert_eq!(store.seen("recent").unwrap().unwrap().first_seen_ms, 995_000);
        assert_eq!(store.seen("expired").unwrap(), None);
        assert_eq!(store.window_len(), 1);
        let names = store.db.tree_names();
        assert!(!names
            .iter()
            .any(|n| n.as_ref() == b"seen" || n.as_ref() == b"seen_by_time"));
    }

    /// A key in an older bucket of the window (two buckets back: no writer touches it any more)
    /// still refuses a commit and an import, and reading it never waits on the commit's own
    /// transaction (it once did: the store hung for good a quarter window after its first commit).
    #[test]
    fn a_key_in_an_older_bucket_is_seen_by_commits_and_imports() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(1_000_000)));
        let store = Arc::new(SledStore::open(dir.path(), 10, clock.clone()).unwrap());
        let (agg, other) = (key("c1"), report_key("r1"));
        let hash = hex::encode([7u8; 32]);
        assert_eq!(
            store.commit(commit(&agg, "k1", &hash, 1_000_000)).unwrap(),
            CommitResult::Committed
        );
        // Two buckets (2.5 s each) later, still within the 10 s window.
        clock.0.store(1_006_000, Ordering::SeqCst);
        let (done, finished) = std::sync::mpsc::channel();
        let writer = store.clone();
        std::thread::spawn(move || {
            let (agg, other, hash) = (key("c1"), report_key("r1"), hex::encode([7u8; 32]));
            let again = Commit {
                version: 2,
                ..commit(&agg, "k1", &hash, 1_006_000)
            };
            let refused = writer.commit(again).unwrap();
            let record = ChangeRecord {
                instance: "b".into(),
                aggregate: other,
                version: 1,
                state: "{}".into(),
                idempotency_key: "k1".into(),
                content_hash: hash,
                seen_at_ms: 1_006_000,
                delivery: None,
                partition: None,
                charges: Vec::new(),
                outputs: Vec::new(),
                earlier: Vec::new(),
            };
            writer.import(&record).unwrap();
            let _ = done.send(refused);
        });
        let refused = finished
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the commit and the import finish (no wait on the store's own transaction)");
        assert!(matches!(refused, CommitResult::AlreadySeen(_)), "{refused:?}");
        assert_eq!(
            store.window_len(),
            1,
            "the import recorded no second copy of the key"
        );
        assert!(
            store.load(&other).unwrap().is_some(),
            "the import applied its state"
        );
    }

    /// A store open in this process holds its directory: a second open waits for the lock, then
    /// fails naming it (a store dropped a moment ago is waited for instead).
    #[test]
    fn a_store_held_open_cannot_be_opened_twice() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(1_000_000)));
        let held = SledStore::open(dir.path(), 10, clock.clone()).unwrap();
        let second = SledStore::open(dir.path(), 10, clock.clone());
        let error = second.err().expect("the directory is held").to_string();
        assert!(error.contains("lock"), "{error}");
        drop(held);
        SledStore::open(dir.path(), 10, clock).expect("free once the first store is dropped");
    }

    /// The window's indexes live in memory: a reopened store fills them from its buckets' packs, so
    /// a key committed before the restart is still seen, by a lookup and by a commit.
    #[test]
    fn a_reopened_store_sees_the_keys_committed_before() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(1_000_000)));
        let (agg, hash) = (key("c1"), hex::encode([7u8; 32]));
        let store = SledStore::open(dir.path(), 10, clock.clone()).unwrap();
        for (version, idempotency_key) in [(1, "k1"), (2, "k2")] {
            let committed = store
                .commit(Commit {
                    version,
                    ..commit(&agg, idempotency_key, &hash, 1_000_000)
                })
                .unwrap();
            assert_eq!(committed, CommitResult::Committed);
        }
        drop(store);
        let store = SledStore::open(dir.path(), 10, clock).unwrap();
        assert!(store.seen("k1").unwrap().is_some());
        assert!(store.seen("k2").unwrap().is_some());
        assert!(store.seen("k3").unwrap().is_none());
        let again = store
            .commit(Commit {
                version: 3,
                ..commit(&agg, "k1", &hash, 1_000_000)
            })
            .unwrap();
        assert!(matches!(again, CommitResult::AlreadySeen(_)), "{again:?}");
    }

    /// Below its free-space floor the store starts no write: a commit, an outbox deletion and a
    /// charge report fail as on a full disk, each noted as the store's write problem (/health
    /// answers 503, consumption stops), and nothing is written.
    #[test]
    fn below_the_free_space_floor_no_write_starts_and_the_problem_is_noted() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(1_000_000)));
        let store = SledStore::open(dir.path(), 10, clock)
            .unwrap()
            .with_min_free(u64::MAX);
        let agg = key("c1");
        let hash = hex::encode([7u8; 32]);
        let refused = store.commit(commit(&agg, "k1", &hash, 1_000_000)).unwrap_err();
        assert!(refused.is_unavailable(), "{refused}");
        assert!(refused.to_string().contains("min_free_mib"), "{refused}");
        assert_eq!(store.write_problem(), Some(refused.to_string()));
        assert_eq!(store.seen("k1").unwrap(), None);
        assert_eq!(store.window_len(), 0);
        assert!(store.charge_done("p1").unwrap_err().is_unavailable());
        assert!(store.outbox_remove(&[]).unwrap_err().is_unavailable());

        let other = tempfile::tempdir().unwrap();
        let unbounded = SledStore::open(other.path(), 10, Arc::new(TestClock(AtomicI64::new(0)))).unwrap();
        assert!(unbounded.charge_done("p1").is_ok());
        assert_eq!(unbounded.write_problem(), None);
    }

    #[test]
    fn commit_is_refused_for_a_key_in_the_window_and_eviction_forgets_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(1_000_000)));
        let store = SledStore::open(dir.path(), 10, clock.clone()).unwrap();
        let agg = key("c1");
        let hash = hex::encode([7u8; 32]);
        assert_eq!(
            store.commit(commit(&agg, "k1", &hash, 1_000_000)).unwrap(),
            CommitResult::Committed
        );
        assert!(matches!(
            store.commit(commit(&agg, "k1", &hash, 1_000_001)).unwrap(),
            CommitResult::AlreadySeen(e) if e.same_content(&hash)
        ));
        let seen = store.seen("k1").unwrap().unwrap();
        assert!(seen.same_content(&hash), "{seen:?}");
        assert!(!seen.same_content(&hex::encode([8u8; 32])), "{seen:?}");

        clock.0.store(1_000_000 + 10_001, Ordering::SeqCst);
        assert_eq!(store.seen("k1").unwrap(), None, "past the window");
        assert_eq!(
            store.evict_expired().unwrap(),
            0,
            "kept until its whole bucket (a quarter of the window) is past"
        );
        clock.0.store(1_002_500 + 10_000, Ordering::SeqCst);
        assert_eq!(store.evict_expired().unwrap(), 1);
        assert_eq!(store.window_len(), 0);
        let again = Commit {
            version: 2,
            ..commit(&agg, "k1", &hash, 1_010_001)
        };
        assert_eq!(store.commit(again).unwrap(), CommitResult::Committed);
        // A change decided on an older version than the stored one writes nothing.
        let stale = Commit {
            version: 2,
            ..commit(&agg, "k2", &hash, 1_010_002)
        };
        assert_eq!(store.commit(stale).unwrap(), CommitResult::Stale);
    }

    #[test]
    fn a_key_keeps_the_delivery_it_was_applied_from_and_reads_keys_stored_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(1_000)));
        let store = SledStore::open(dir.path(), 60, clock)
            .unwrap()
            .with_changelog("a".into());
        // A report aggregate: its state imports without parsing as a campaign or payment.
        let agg = report_key("service");
        let hash = hex::encode([7u8; 32]);
        let delivery = Some(DeliveryId(0x0102_0304_0506_0708));
        let with_delivery = Commit {
            delivery,
            ..commit(&agg, "k1", &hash, 1_000)
        };
        assert_eq!(store.commit(with_delivery).unwrap(), CommitResult::Committed);
        let seen = store.seen("k1").unwrap().unwrap();
        assert!(seen.same_content(&hash), "{seen:?}");
        assert_eq!(seen.delivery, delivery);
        assert_eq!(
            seen.content_hash,
            hash[..2 * SEEN_HASH],
            "the window keeps the hash's first bytes"
        );
        assert!(matches!(
            store.commit(Commit { version: 2, ..commit(&agg, "k1", &hash, 1_001) }).unwrap(),
            CommitResult::AlreadySeen(entry) if entry.delivery == delivery
        ));
        // The changelog record carries the delivery to the daemons that import it.
        let records = publish(&store);
        assert_eq!(records[0].delivery, delivery);
        let other = tempfile::tempdir().unwrap();
        let importer = SledStore::open(other.path(), 60, Arc::new(TestClock(AtomicI64::new(1_000)))).unwrap();
        assert!(importer.import(&records[0]).unwrap());
        assert_eq!(importer.seen("k1").unwrap().unwrap().delivery, delivery);

        // Written by a version before deliveries: time and hash alone, read as no delivery; a
        // record of such a version has no `delivery` field.
        let mut old = 1_000i64.to_be_bytes().to_vec();
        old.extend_from_slice(&[9u8; 32]);
        assert_eq!(
            decode_seen(&old),
            SeenEntry {
                first_seen_ms: 1_000,
                content_hash: hex::encode([9u8; 32]),
                delivery: None
            }
        );
        // Written before the window kept a prefix of the hash: the whole SHA-256, then a delivery.
        old.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        let whole = decode_seen(&old);
        assert_eq!(
            (whole.content_hash.as_str(), whole.delivery),
            (hex::encode([9u8; 32]).as_str(), delivery)
        );
        assert!(whole.same_content(&hex::encode([9u8; 32])));
        let mut json = serde_json::to_value(&records[0]).unwrap();
        json.as_object_mut().unwrap().remove("delivery");
        let old_record: ChangeRecord = serde_json::from_value(json).unwrap();
        assert_eq!(old_record.delivery, None);
        assert_eq!(decode_seen(&encode_seen(5, &hash, None)).delivery, None);
    }

    fn report_key(id: &str) -> AggregateKey {
        AggregateKey {
            kind: AggregateKind::Report,
            id: id.into(),
        }
    }

    fn commission(id: &str, minor: i64) -> OutputEvent {
        OutputEvent {
            id: id.into(),
            causation_id: id.into(),
            correlation_id: None,
            time_ms: 0,
            body: OutputBody::CommissionCalculated {
                affiliate_id: "af-1".into(),
                campaign_id: "c1".into(),
                conversion_event_id: id.into(),
                commission: aerostream_actors::Money::positive(minor, "USD").unwrap(),
            },
        }
    }

    /// What affiliate af-1 earned in all, in minor units.
    fn earned_by_af1(store: &SledStore) -> i64 {
        store.ledger("af-1").unwrap().unwrap().earned.values().sum()
    }

    /// Publishes the outbox as the outbox task would; returns the changelog records in it.
    fn publish(store: &SledStore) -> Vec<ChangeRecord> {
        let mut records = Vec::new();
        for (seq, entry) in store.outbox_batch(100).unwrap() {
            if let OutboxEntry::Change(record) = entry {
                records.push(*record);
            }
            store.outbox_remove(std::slice::from_ref(&seq)).unwrap();
        }
        records
    }

    fn applied(version: u64, key: &str, output: OutputEvent) -> aerostream_actors::ports::AppliedEvent {
        aerostream_actors::ports::AppliedEvent {
            version,
            idempotency_key: key.into(),
            content_hash: hex::encode([3u8; 32]),
            seen_at_ms: 0,
            delivery: None,
            outputs: vec![output],
            charges: Vec::new(),
            journal: None,
        }
    }

    /// A commit of several events: every key recorded, every output in the ledgers and in the
    /// outbox, one changelog record; withdrawn whole; imported elsewhere counting only the events
    /// the importer does not hold yet.
    #[test]
    fn a_commit_of_several_events_is_recorded_withdrawn_and_imported_event_by_event() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(0)));
        let store = SledStore::open(dir.path(), 60, clock.clone())
            .unwrap()
            .with_changelog("a".into());
        let hash = hex::encode([3u8; 32]);
        let x = report_key("x");
        let earlier = [
            applied(1, "k1", commission("o1", 10)),
            applied(2, "k2", commission("o2", 20)),
        ];
        let last = [commission("o3", 30)];
        let commit = Commit {
            outbox: &last,
            earlier: &earlier,
            ..Commit::of(&x, br#"{"n":3}"#, 3, "k3", &hash, 0)
        };
        assert_eq!(commit.base_version(), 0);
        assert_eq!(store.commit(commit).unwrap(), CommitResult::Committed);
        assert_eq!(earned_by_af1(&store), 60);
        assert_eq!(store.window_len(), 3);
        let entries = store.outbox_batch(100).unwrap();
        assert_eq!(entries.len(), 4, "three outputs, then one record");
        let OutboxEntry::Change(record) = &entries[3].1 else {
            panic!("the record comes last")
        };
        assert_eq!(
            (record.first_version(), record.version, record.earlier.len()),
            (1, 3, 2)
        );
        let record = (**record).clone();
        // The publisher takes the record as it goes on the wire: the stored JSON, not parsed whole.
        let publishable = store.outbox_publishable(100).unwrap();
        assert!(matches!(publishable[0].1, Ok(Publishable::Output(_))));
        let Ok(Publishable::Change {
            key,
            instance,
            payload,
            ..
        }) = &publishable[3].1
        else {
            panic!("the record comes last")
        };
        assert_eq!((key.as_str(), instance.as_str()), (record.key().as_str(), "a"));
        assert_eq!(payload, &serde_json::to_vec(&record).unwrap());

        // A crash before it was published: the whole commit is withdrawn.
        assert_eq!(store.withdraw_unpublished().unwrap(), 1);
        for key in ["k1", "k2", "k3"] {
            assert_eq!(store.seen(key).unwrap(), None, "{key} given back");
        }
        assert!(
            store.ledger("af-1").unwrap().is_none(),
            "every ledger move reverted"
        );
        assert!(store.is_unconfirmed(&x).unwrap());

        // Another daemon's store imports it, then a record that overlaps what it holds.
        let other_dir = tempfile::tempdir().unwrap();
        let other = SledStore::open(other_dir.path(), 60, clock).unwrap();
        let first_two = ChangeRecord {
            version: 2,
            idempotency_key: "k2".into(),
            outputs: vec![commission("o2", 20)],
            earlier: vec![applied(1, "k1", commission("o1", 10))],
            ..record.clone()
        };
        assert!(other.import(&first_two).unwrap());
        assert_eq!(earned_by_af1(&other), 30);
        assert!(other.import(&record).unwrap(), "version 3 is newer");
        assert_eq!(
            earned_by_af1(&other),
            60,
            "only version 3's commission moves the ledger"
        );
        assert!(other.seen("k3").unwrap().is_some());
        assert_eq!(other.window_len(), 3);
    }

    #[test]
    fn unpublished_commits_are_withdrawn_and_the_changelog_decides_their_versions() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(0)));
        let store = SledStore::open(dir.path(), 60, clock)
            .unwrap()
            .with_changelog("a".into());
        let hash = hex::encode([3u8; 32]);
        let (x, y) = (report_key("x"), report_key("y"));
        let earned = [commission("o1", 5)];
        let first = Commit {
            outbox: &earned,
            ..Commit::of(&x, br#"{"n":1}"#, 1, "k1", &hash, 0)
        };
        assert_eq!(store.commit(first).unwrap(), CommitResult::Committed);
        let published = publish(&store);
        // A crash now: these two commits, and x's second, never reach the changelog.
        let more = [commission("o2", 7)];
        let second = Commit {
            outbox: &more,
            ..Commit::of(&x, br#"{"n":2}"#, 2, "k2", &hash, 0)
        };
        assert_eq!(store.commit(second).unwrap(), CommitResult::Committed);
        let created = Commit::of(&y, br#"{"n":1}"#, 1, "k3", &hash, 0);
        assert_eq!(store.commit(created).unwrap(), CommitResult::Committed);
        assert_eq!(earned_by_af1(&store), 12);

        assert_eq!(store.withdraw_unpublished().unwrap(), 2);
        assert!(store.any_unconfirmed());
        assert_eq!(store.outbox_len(), 1, "the output event stays, to be published");
        assert_eq!(
            (store.seen("k2").unwrap(), store.seen("k3").unwrap()),
            (None, None)
        );
        assert!(store.seen("k1").unwrap().is_some());
        assert_eq!(earned_by_af1(&store), 5);

        // The changelog: this daemon's first record of x (restores it), then another daemon's
        // second version of x, decided on another event.
        assert!(store.import(&published[0]).unwrap());
        assert_eq!(store.load(&x).unwrap().unwrap(), br#"{"n":1}"#);
        assert_eq!(earned_by_af1(&store), 5);
        let theirs = ChangeRecord {
            instance: "b".into(),
            state: r#"{"n":20}"#.into(),
            version: 2,
            idempotency_key: "k4".into(),
            outputs: vec![commission("o4", 100)],
            ..published[0].clone()
        };
        assert!(store.import(&theirs).unwrap());
        assert!(
            !store.import(&theirs).unwrap(),
            "a version already held is not imported again"
        );
        assert_eq!(store.load(&x).unwrap().unwrap(), br#"{"n":20}"#);
        assert_eq!(earned_by_af1(&store), 105);
        assert!(store.seen("k4").unwrap().is_some());

        // y never reached the changelog: it goes once the changelog has been read to its end.
        assert_eq!(store.settle_unconfirmed().unwrap(), vec![y.clone()]);
        assert!(!store.any_unconfirmed());
        assert_eq!(store.load(&y).unwrap(), None);
        assert_eq!(store.load(&x).unwrap().unwrap(), br#"{"n":20}"#);
        // Commits go on from the changelog's version.
        let next = Commit::of(&x, br#"{"n":21}"#, 3, "k2", &hash, 0);
        assert_eq!(store.commit(next).unwrap(), CommitResult::Committed);
    }

    fn payment_key(id: &str) -> AggregateKey {
        AggregateKey {
            kind: AggregateKind::Payment,
            id: id.into(),
        }
    }

    /// The charge a request for payment `id` (USD 1.00 to affiliate `af`) records.
    fn charge(id: &str) -> Charge {
        Charge {
            payment_id: id.into(),
            affiliate_id: "af".into(),
            amount: aerostream_actors::Money::positive(100, "USD").unwrap(),
            request_id: format!("r-{id}"),
            request_time_ms: 5,
            correlation_id: None,
            partition: None,
        }
    }

    #[test]
    fn a_charge_is_committed_with_its_request_and_removed_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 10, Arc::new(TestClock(AtomicI64::new(0)))).unwrap();
        let charge = charge("p1");
        let agg = payment_key("p1");
        let hash = hex::encode([1u8; 32]);
        let charges = [charge.clone()];
        let with_charge = Commit {
            charges: &charges,
            ..commit(&agg, "r1", &hash, 0)
        };
        assert_eq!(store.commit(with_charge).unwrap(), CommitResult::Committed);
        assert_eq!(store.pending_charges(10).unwrap(), vec![charge.clone()]);
        store.charge_done("p1").unwrap();
        assert!(store.pending_charges(10).unwrap().is_empty());
        store.settle().unwrap();
        assert!(
            store.pending_charges(10).unwrap().is_empty(),
            "its commit applied without it"
        );
        assert_eq!(store.window_len(), 1);
        // Read beside the commits not applied, in payment id order, up to the limit.
        let (p0, p2) = (payment_key("p0"), payment_key("p2"));
        let (c0, c2) = ([self::charge("p0")], [self::charge("p2")]);
        for (agg, idem, charges) in [(&p2, "r2", &c2), (&p0, "r0", &c0)] {
            store
                .commit(Commit {
                    charges,
                    ..commit(agg, idem, &hash, 0)
                })
                .unwrap();
            store.settle().unwrap();
        }
        let committed = store
            .commit(Commit {
                version: 2,
                charges: &charges,
                ..commit(&agg, "r1b", &hash, 0)
            })
            .unwrap();
        assert_eq!(committed, CommitResult::Committed);
        let ids = |limit| -> Vec<String> {
            store
                .pending_charges(limit)
                .unwrap()
                .into_iter()
                .map(|c| c.payment_id)
                .collect()
        };
        assert_eq!(ids(10), ["p0", "p1", "p2"]);
        assert_eq!(ids(2), ["p0", "p1"]);
    }

    /// A withdrawn request takes its charge with it: charged from here, its result would create
    /// the payment again while the redelivered request is decided elsewhere (two histories, one
    /// payment counted twice). A withdrawn result leaves the charge of a published request.
    #[test]
    fn a_withdrawn_request_withdraws_its_charge_and_a_withdrawn_result_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 10, Arc::new(TestClock(AtomicI64::new(0))))
            .unwrap()
            .with_changelog("a".into());
        let hash = hex::encode([1u8; 32]);
        let state = |id: &str, status: PaymentStatus, version: u64| {
            serde_json::to_vec(&aerostream_actors::Payment {
                id: id.into(),
                affiliate_id: "af".into(),
                amount: charge(id).amount,
                status,
                attempts: 0,
                history: Vec::new(),
                version,
            })
            .unwrap()
        };
        let (p1, p2) = (payment_key("p1"), payment_key("p2"));
        let (charges1, charges2) = ([charge("p1")], [charge("p2")]);
        // p1's request reaches the changelog; its result and p2's request do not.
        let requested1 = state("p1", PaymentStatus::Pending, 1);
        let request1 = Commit {
            charges: &charges1,
            ..Commit::of(&p1, &requested1, 1, "r-p1", &hash, 0)
        };
        assert_eq!(store.commit(request1).unwrap(), CommitResult::Committed);
        publish(&store);
        let succeeded1 = state("p1", PaymentStatus::Succeeded, 2);
        let result1 = Commit::of(&p1, &succeeded1, 2, "pago_p1", &hash, 0);
        assert_eq!(store.commit(result1).unwrap(), CommitResult::Committed);
        let requested2 = state("p2", PaymentStatus::Pending, 1);
        let request2 = Commit {
            charges: &charges2,
            ..Commit::of(&p2, &requested2, 1, "r-p2", &hash, 0)
        };
        assert_eq!(store.commit(request2).unwrap(), CommitResult::Committed);
        assert_eq!(store.pending_charges(10).unwrap().len(), 2);

        assert_eq!(store.withdraw_unpublished().unwrap(), 2);
        assert_eq!(
            store.pending_charges(10).unwrap(),
            vec![charge("p1")],
            "p1's result is withdrawn, its request is not: charged again; p2's request is withdrawn"
        );
        assert_eq!(store.settle_unconfirmed().unwrap(), vec![p2]);
        assert_eq!(store.pending_charges(10).unwrap(), vec![charge("p1")]);
    }

    #[test]
    fn an_outbox_entry_that_does_not_parse_is_set_aside_and_nothing_waits_for_it() {
        use futures::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(7)));
        // An entry this version cannot read, as a newer version might have written it.
        let poison_seq = (u64::MAX - 1).to_be_bytes();
        let poison = br#"{"Output":{"id":"o-2","body":{"Teleported":{}}}}"#;
        {
            let store = SledStore::open(dir.path(), 10, clock.clone()).unwrap();
            let agg = key("c1");
            let hash = hex::encode([3u8; 32]);
            let outputs = [commission("o-1", 100)];
            let with_output = Commit {
                outbox: &outputs,
                ..commit(&agg, "k1", &hash, 0)
            };
            assert_eq!(store.commit(with_output).unwrap(), CommitResult::Committed);
            store.outbox.insert(poison_seq, &poison[..]).unwrap();
            store.db.flush().unwrap();
        }
        // sled's flusher thread lets go of the database's file lock a moment after the last
        // handle is dropped: reopen once it has.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let store = loop {
            match SledStore::open(dir.path(), 10, clock.clone()) {
                Ok(store) => break store,
                Err(error) if std::time::Instant::now() < deadline && error.to_string().contains("lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(error) => panic!("{error}"),
            }
        };
        assert_eq!(store.outbox_len(), 2);
        let entries = store.outbox_entries(10).unwrap();
        assert!(matches!(entries[0].1, Ok(OutboxEntry::Output(ref out)) if out.id == "o-1"));
        assert!(
            matches!(entries[1].1, Err(StoreError::Corrupt(_))),
            "{:?}",
            entries[1].1
        );
        assert!(store.outbox_batch(10).is_err(), "outbox_batch refuses it");
        assert_eq!(
            store.withdraw_unpublished().unwrap(),
            0,
            "a start is not stopped by it"
        );

        let good_seq = entries[0].0.clone();
        store.outbox_set_aside(&poison_seq, "cannot be read").unwrap();
        assert_eq!(store.outbox_len(), 1);
        let set_aside = store.outbox_poison().unwrap();
        assert_eq!(set_aside.len(), 1);
        assert_eq!(set_aside[0]["reason"], "cannot be read");
        assert_eq!(set_aside[0]["set_aside_ms"], 7);
        assert_eq!(set_aside[0]["entry"], std::str::from_utf8(poison).unwrap());

        // Once the good entry is published, a wait for everything up to the poison's place ends.
        store.outbox_remove(std::slice::from_ref(&good_seq)).unwrap();
        store.outbox_published();
        assert_eq!(store.outbox_len(), 0);
        assert!(
            store.wait_published(u64::MAX - 1).now_or_never().is_some(),
            "nothing waits for the set-aside entry"
        );
    }

    fn payment_output(cause: &str, affiliate: &str) -> OutputEvent {
        OutputEvent {
            id: format!("out-{cause}"),
            causation_id: cause.into(),
            correlation_id: None,
            time_ms: 0,
            body: aerostream_actors::output::OutputBody::PaymentSucceeded {
                payment_id: cause.into(),
                affiliate_id: affiliate.into(),
                amount: aerostream_actors::Money::positive(100, "USD").unwrap(),
            },
        }
    }

    fn tally(group: &str, count: i64) -> Change {
        Change {
            group: group.into(),
            counter: "n".into(),
            delta: aerostream_actors::readmodel::Tally { count, amount: 0 },
        }
    }

    #[test]
    fn a_batch_decides_each_commit_in_order_and_a_refusal_refuses_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 10, Arc::new(TestClock(AtomicI64::new(0)))).unwrap();
        let hash = hex::encode([3u8; 32]);
        let (c1, c2) = (key("c1"), key("c2"));
        assert_eq!(
            store.commit(commit(&c2, "old", &hash, 0)).unwrap(),
            CommitResult::Committed
        );
        let one = [tally("summary", 1)];
        let batch = [
            // Two commits of one aggregate: the second is decided on the first's version.
            Commit {
                read_model: &one,
                ..commit(&c1, "k1", &hash, 0)
            },
            Commit {
                version: 2,
                read_model: &one,
                ..commit(&c1, "k2", &hash, 0)
            },
            // A key recorded before the batch, and one recorded earlier in the batch.
            commit(&c2, "old", &hash, 0),
            Commit {
                version: 3,
                ..commit(&c1, "k1", &hash, 0)
            },
            // Decided on a version the batch has already moved past.
            Commit {
                version: 2,
                ..commit(&c1, "k3", &hash, 0)
            },
            Commit {
                version: 2,
                read_model: &one,
                ..commit(&c2, "k4", &hash, 0)
            },
        ];
        let results: Vec<CommitResult> = store
            .commit_batch(&batch)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let seen = |key: &str| CommitResult::AlreadySeen(store.seen(key).unwrap().unwrap());
        assert_eq!(
            results,
            vec![
                CommitResult::Committed,
                CommitResult::Committed,
                seen("old"),
                seen("k1"),
                CommitResult::Stale,
                CommitResult::Committed,
            ]
        );
        assert_eq!(store.seen("k3").unwrap(), None, "a refused commit writes nothing");
        assert_eq!(store.window_len(), 4);
        let model = store.read_model().unwrap();
        assert_eq!(
            model.summary["n"].count, 3,
            "the committed commits' changes, each once"
        );
    }

    /// The publisher deletes a commit's entries before the commit has updated the published mark:
    /// the mark must not be left on the deleted entries, or the acks waiting for it would wait for
    /// ever (seen after a SIGKILL restart in the chaos run).
    #[tokio::test]
    async fn entries_published_before_their_commit_updates_the_mark_hold_no_ack() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SledStore::open(dir.path(), 10, Arc::new(TestClock(AtomicI64::new(0))))
                .unwrap()
                .with_changelog("here".into()),
        );
        // Only the committing thread below stops at the fail point, until told to go on.
        let (reached, at_point) = std::sync::mpsc::channel();
        let (go, wait_go) = std::sync::mpsc::channel::<()>();
        let wait_go = std::sync::Mutex::new(wait_go);
        fail::cfg_callback(FAILPOINT_OUTBOX_MARK, move || {
            if std::thread::current().name() == Some("racing-commit") {
                reached.send(()).unwrap();
                wait_go.lock().unwrap().recv().unwrap();
            }
        })
        .unwrap();
        let committing = {
            let store = store.clone();
            std::thread::Builder::new()
                .name("racing-commit".into())
                .spawn(move || {
                    let hash = hex::encode([5u8; 32]);
                    let aggregate = key("race");
                    store.commit_batch(&[commit(&aggregate, "k-race", &hash, 0)]);
                })
                .unwrap()
        };
        at_point.recv().unwrap();
        // The publisher's turn: it publishes and deletes the entries, and recomputes the mark.
        for (seq, _) in store.outbox_entries(100).unwrap() {
            store.outbox_remove(std::slice::from_ref(&seq)).unwrap();
        }
        store.outbox_published();
        go.send(()).unwrap();
        committing.join().unwrap();
        fail::remove(FAILPOINT_OUTBOX_MARK);
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            store.wait_published(store.outbox_high_water()),
        )
        .await
        .expect("nothing left in the outbox: nothing to wait for");
    }

    /// The published mark counts the entries of commits not applied yet, and holds them through
    /// the application that moves them to the tree.
    #[tokio::test]
    async fn the_published_mark_holds_logged_entries_before_and_after_their_application() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 10, Arc::new(TestClock(AtomicI64::new(0))))
            .unwrap()
            .with_changelog("here".into());
        let hash = hex::encode([9u8; 32]);
        let c1 = key("c1");
        store.commit(commit(&c1, "k1", &hash, 0)).unwrap();
        let through = store.outbox_high_water();
        let published = |store: &SledStore| *store.outbox_low.borrow() > through;
        assert!(!published(&store), "logged, not published");
        store.settle().unwrap();
        store.outbox_published();
        assert!(!published(&store), "applied, not published");
        let entries = store.outbox_entries(100).unwrap();
        assert_eq!(entries.len(), 1);
        store.outbox_remove(&[entries[0].0.clone()]).unwrap();
        store.outbox_published();
        assert!(published(&store));
        tokio::time::timeout(std::time::Duration::from_secs(5), store.wait_published(through))
            .await
            .expect("the entry is published");
    }

    #[test]
    fn a_batch_numbers_the_outbox_in_commit_order_and_moves_the_high_water_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 10, Arc::new(TestClock(AtomicI64::new(0))))
            .unwrap()
            .with_changelog("here".into());
        let hash = hex::encode([4u8; 32]);
        let (c1, c2) = (key("c1"), key("c2"));
        let first = [payment_output("e1", "af"), payment_output("e2", "af")];
        let second = [payment_output("e3", "af")];
        let batch = [
            Commit {
                outbox: &first,
                ..commit(&c1, "k1", &hash, 0)
            },
            // Refused: its entries must not appear.
            Commit {
                outbox: &second,
                ..commit(&c2, "k1", &hash, 0)
            },
            Commit {
                outbox: &second,
                ..commit(&c2, "k2", &hash, 0)
            },
        ];
        let results = store.commit_batch(&batch);
        assert!(matches!(results[1], Ok(CommitResult::AlreadySeen(_))));
        let entries = store.outbox_batch(100).unwrap();
        let order: Vec<String> = entries
            .iter()
            .map(|(_, entry)| match entry {
                OutboxEntry::Output(output) => output.causation_id.clone(),
                OutboxEntry::Change(change) => format!("change of {}", change.idempotency_key),
            })
            .collect();
        assert_eq!(order, ["e1", "e2", "change of k1", "e3", "change of k2"]);
        let seqs: Vec<u64> = entries
            .iter()
            .map(|(seq, _)| u64::from_be_bytes(seq.as_ref().try_into().unwrap()))
            .collect();
        assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(store.outbox_high_water(), *seqs.last().unwrap());
        assert_eq!(store.outbox_len(), 5);
        let ledger = store.ledger("af").unwrap().unwrap();
        assert_eq!(ledger, {
            let mut ledger = CommissionLedger::new("af");
            for output in first.iter().chain(&second) {
                ledger.record(&output.body);
            }
            ledger
        });
    }

    /// A commit is logged and read back at once; a store reopened with commits logged and not
    /// applied (the process stopped first) applies them before anything reads it.
    #[test]
    fn logged_commits_are_read_before_they_are_applied_and_applied_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let clock = || Arc::new(TestClock(AtomicI64::new(0)));
        let hash = hex::encode([6u8; 32]);
        let c1 = key("c1");
        let earned = [commission("e1", 700), commission("e2", 300)];
        let tallies = [tally("summary", 1)];
        let state2 = br#"{"v":2}"#;
        {
            let store = SledStore::open(dir.path(), 10, clock())
                .unwrap()
                .with_changelog("here".into());
            let batch = [
                Commit {
                    outbox: &earned[..1],
                    read_model: &tallies,
                    journal: Some((1, b"j1")),
                    snapshot: Some((1, b"snap1")),
                    ..commit(&c1, "k1", &hash, 0)
                },
                Commit {
                    version: 2,
                    state: state2,
                    outbox: &earned[1..],
                    read_model: &tallies,
                    journal: Some((2, b"j2")),
                    snapshot: Some((2, b"snap")),
                    drop_snapshots: &[1],
                    truncate_journal: Some((1, 1)),
                    ..commit(&c1, "k2", &hash, 0)
                },
            ];
            let results = store.commit_batch(&batch);
            assert!(
                results.iter().all(|r| r == &Ok(CommitResult::Committed)),
                "{results:?}"
            );
            assert_eq!(store.pending().commits.len(), 2, "logged, not applied");
            assert_eq!(store.log.len(), 1, "one value per transaction");
            assert!(store.state.is_empty() && store.outbox.is_empty());
            assert_eq!(store.load(&c1).unwrap().as_deref(), Some(state2.as_slice()));
            assert_eq!(
                store.outbox_entries(100).unwrap().len(),
                4,
                "two outputs, two records"
            );
            // A later commit is decided on the logged version.
            assert_eq!(
                store.commit(commit(&c1, "k3", &hash, 0)).unwrap(),
                CommitResult::Stale
            );
            store.db.flush().unwrap();
        }
        let store = SledStore::open(dir.path(), 10, clock()).unwrap();
        assert!(store.log.is_empty() && store.pending().commits.is_empty());
        assert_eq!(
            store.state.get(state_key(&c1)).unwrap().as_deref(),
            Some(state2.as_slice())
        );
        assert_eq!(
            decode_version(&store.versions.get(state_key(&c1)).unwrap().unwrap()),
            2
        );
        assert_eq!(store.outbox_len(), 4);
        assert_eq!(earned_by_af1(&store), 1_000);
        assert_eq!(store.read_model().unwrap().summary["n"].count, 2);
        assert_eq!(store.snapshots(&c1).unwrap(), vec![(2, b"snap".to_vec())]);
        let journal: Vec<u64> = store
            .journal(&c1, 0)
            .unwrap()
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        assert_eq!(
            journal,
            [2],
            "the run of version 1 truncated, by the commit after it"
        );
        assert_eq!(store.seen("k2").unwrap().map(|e| e.first_seen_ms), Some(0));
    }

    /// Applied together, an aggregate's commits write one journal run up to each snapshot, and a
    /// truncation takes whole runs, stored or of the same pass.
    #[test]
    fn an_application_joins_an_aggregates_runs_up_to_each_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 10, Arc::new(TestClock(AtomicI64::new(0)))).unwrap();
        let hash = hex::encode([8u8; 32]);
        let c1 = key("c1");
        let idems: Vec<String> = (1..=7).map(|v| format!("k{v}")).collect();
        let entries: Vec<Vec<u8>> = (1..=7).map(|v| format!("j{v}").into_bytes()).collect();
        let at = |version: u64| Commit {
            version,
            journal: Some((version, entries[version as usize - 1].as_slice())),
            ..commit(&c1, &idems[version as usize - 1], &hash, 0)
        };
        let versions = |store: &SledStore| -> Vec<u64> {
            store
                .journal(&c1, 0)
                .unwrap()
                .into_iter()
                .map(|(v, _)| v)
                .collect()
        };
        let stored_runs = |store: &SledStore| store.journal.len();
        // A stored run from an earlier pass.
        store.commit(at(1)).unwrap();
        store.settle().unwrap();
        let pass = [
            at(2),
            Commit {
                snapshot: Some((3, b"s3")),
                ..at(3)
            },
            at(4),
            Commit {
                snapshot: Some((5, b"s5")),
                truncate_journal: Some((1, 3)),
                ..at(5)
            },
            at(6),
        ];
        for commit in pass {
            assert_eq!(store.commit(commit).unwrap(), CommitResult::Committed);
        }
        assert_eq!(versions(&store), [4, 5, 6]);
        assert_eq!(stored_runs(&store), 2, "4–5 ended at a snapshot, 6 on its own");
        let journal = store.journal(&c1, 0).unwrap();
        assert_eq!(journal[1], (5, b"j5".to_vec()));
        store.commit(at(7)).unwrap();
        assert_eq!(versions(&store), [4, 5, 6, 7]);
        assert_eq!(stored_runs(&store), 3, "no run of an earlier pass is extended");
    }

    /// Applied together, commits of one aggregate write its state and version once (the newest),
    /// and outbox entries published before the application are never written.
    #[test]
    fn an_application_writes_the_newest_state_and_no_entry_published_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 10, Arc::new(TestClock(AtomicI64::new(0))))
            .unwrap()
            .with_changelog("here".into());
        let hash = hex::encode([7u8; 32]);
        let c1 = key("c1");
        for (version, idem) in [(1, "k1"), (2, "k2"), (3, "k3")] {
            let state = format!("{{\"v\":{version}}}");
            let committed = store.commit(Commit {
                version,
                state: state.as_bytes(),
                ..commit(&c1, idem, &hash, 0)
            });
            assert_eq!(committed.unwrap(), CommitResult::Committed);
        }
        let entries = store.outbox_entries(100).unwrap();
        assert_eq!(entries.len(), 3);
        store
            .outbox_remove(&[entries[0].0.clone(), entries[1].0.clone()])
            .unwrap();
        store.settle().unwrap();
        assert!(store.log.is_empty());
        assert_eq!(
            store.state.get(state_key(&c1)).unwrap().as_deref(),
            Some(br#"{"v":3}"#.as_slice())
        );
        let written: Vec<sled::IVec> = store.outbox.iter().keys().map(Result::unwrap).collect();
        assert_eq!(written, [entries[2].0.clone()], "only the entry not published");
        assert_eq!(store.outbox_len(), 1);
    }

    #[test]
    fn a_commit_whose_writes_fail_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 10, Arc::new(TestClock(AtomicI64::new(0)))).unwrap();
        store
            .report
            .insert("campaign/bad", b"not json".as_slice())
            .unwrap();
        let hash = hex::encode([5u8; 32]);
        let (c1, c2, c3) = (key("c1"), key("c2"), key("c3"));
        let bad = [tally("campaign/bad", 1)];
        let batch = [
            commit(&c1, "k1", &hash, 0),
            Commit {
                read_model: &bad,
                ..commit(&c2, "k2", &hash, 0)
            },
            commit(&c3, "k3", &hash, 0),
        ];
        let results = store.commit_batch(&batch);
        assert_eq!(results[0], Ok(CommitResult::Committed));
        assert!(results[1].is_err());
        assert_eq!(results[2], Ok(CommitResult::Committed));
        assert_eq!(store.seen("k2").unwrap(), None);
        assert_eq!(store.load(&c2).unwrap(), None);
    }

    #[tokio::test]
    async fn the_committer_answers_each_commit_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(SledStore::open(dir.path(), 10, Arc::new(TestClock(AtomicI64::new(0)))).unwrap());
        store.start_committer(Duration::ZERO).unwrap();
        let hash = hex::encode([6u8; 32]);
        let owned = |id: &str, idem: &str| owned_commit(id, idem, &hash);
        let answers: Vec<_> = futures::future::join_all((0..50).map(|i| {
            let idem = if i == 25 {
                "k0".to_string()
            } else {
                format!("k{i}")
            };
            store.commit_batched(vec![owned(&format!("c{i}"), &idem)])
        }))
        .await
        .into_iter()
        .map(|mut answer| answer.remove(0))
        .collect();
        assert_eq!(
            answers
                .iter()
                .filter(|a| **a == Ok(CommitResult::Committed))
                .count(),
            49
        );
        assert!(matches!(answers[25], Ok(CommitResult::AlreadySeen(_))));
        assert_eq!(store.window_len(), 49);
    }

    #[tokio::test]
    async fn commits_handed_over_within_the_minimum_interval_share_a_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(SledStore::open(dir.path(), 10, Arc::new(TestClock(AtomicI64::new(0)))).unwrap());
        // Long enough that the commits below are all handed over before the interval passes, on
        // any machine; the test waits that long once.
        store.start_committer(Duration::from_secs(2)).unwrap();
        let transactions = || store.committer.get().unwrap().transactions();
        let hash = hex::encode([7u8; 32]);
        let owned = |id: &str| owned_commit(id, &format!("k-{id}"), &hash);
        // The first commit finds no transaction before it: written at once.
        let first = store.commit_batched(vec![owned("c0")]).await;
        assert_eq!(first, vec![Ok(CommitResult::Committed)]);
        assert_eq!(transactions(), 1);
        // Handed over one by one, 10 ms apart (as a paced stream's actors do), while the interval
        // since the first runs: without it, each would find the committer idle and go alone.
        let mut answers = Vec::new();
        for i in 1..=10 {
            answers.push(store.commit_batched(vec![owned(&format!("c{i}"))]));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let answers = futures::future::join_all(answers).await;
        assert!(answers.iter().all(|a| a == &vec![Ok(CommitResult::Committed)]));
        assert_eq!(transactions(), 2, "the ten commits share the second transaction");
        assert_eq!(store.window_len(), 11);
    }

    #[tokio::test]
    async fn dead_lettered_messages_are_remembered_across_a_restart_and_forgotten_after_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(1_000_000)));
        let (first, second) = (b"topic-a\x00\x01".as_slice(), b"topic-a\x00\x02".as_slice());
        {
            let store = SledStore::open(dir.path(), 10, clock.clone()).unwrap();
            assert!(!store.dead_lettered(first).unwrap());
            store.remember_dead_letter(first).unwrap();
            assert!(store.dead_lettered(first).unwrap());
            assert!(!store.dead_lettered(second).unwrap(), "another message");
            // The memory is apart from the idempotency window.
            assert_eq!(store.window_len(), 0);
            store.flush().await.unwrap();
        }
        let store = SledStore::open(dir.path(), 10, clock.clone()).unwrap();
        assert!(store.dead_lettered(first).unwrap(), "remembered across a restart");
        clock.0.store(1_005_000, Ordering::SeqCst);
        store.remember_dead_letter(second).unwrap();
        assert_eq!(store.evict_dead_letters().unwrap(), 0, "both within the window");

        clock.0.store(1_000_000 + 10_001, Ordering::SeqCst);
        assert_eq!(store.evict_dead_letters().unwrap(), 1);
        assert!(!store.dead_lettered(first).unwrap(), "past the window");
        assert!(store.dead_lettered(second).unwrap());
        // Dead-lettered again (after its window): remembered from the new time on.
        store.remember_dead_letter(first).unwrap();
        clock.0.store(1_005_000 + 10_001, Ordering::SeqCst);
        assert_eq!(store.evict_dead_letters().unwrap(), 1);
        assert!(store.dead_lettered(first).unwrap());
        assert!(!store.dead_lettered(second).unwrap());
        clock.0.store(1_010_001 + 10_001, Ordering::SeqCst);
        assert_eq!(store.evict_dead_letters().unwrap(), 1);
        assert!(!store.dead_lettered(first).unwrap());
        assert_eq!(store.dead_lettered.len(), 0, "the time index is emptied too");
    }

    #[test]
    fn pages_of_states_hold_every_aggregate_of_their_kind_once_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 60, Arc::new(TestClock(AtomicI64::new(1_000)))).unwrap();
        let hash = hex::encode([7u8; 32]);
        // Ids that share prefixes, hold the separator, or sort around the kind's prefix.
        let ids = ["a", "a/b", "a0", "ab", "b", "\u{10ffff}"];
        for (n, id) in ids.iter().enumerate() {
            let campaign = key(id);
            let payment = AggregateKey {
                kind: AggregateKind::Payment,
                id: (*id).into(),
            };
            for (agg, idem) in [(&campaign, format!("c{n}")), (&payment, format!("p{n}"))] {
                let committed = store.commit(commit(agg, &idem, &hash, 1_000)).unwrap();
                assert_eq!(committed, CommitResult::Committed);
            }
        }
        for limit in 1..=ids.len() + 1 {
            let mut read = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = store
                    .states_after(AggregateKind::Campaign, after.as_deref(), limit)
                    .unwrap();
                assert!(page.len() <= limit);
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                read.extend(page.into_iter().map(|(id, _)| id));
            }
            assert_eq!(read, ids, "pages of {limit}");
        }
        // A cursor that names no stored id still starts right after it.
        let page = store
            .states_after(AggregateKind::Payment, Some("a1"), 10)
            .unwrap();
        let ids_after: Vec<&str> = page.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids_after, ["ab", "b", "\u{10ffff}"]);
        assert!(store
            .states_after(AggregateKind::Report, None, 10)
            .unwrap()
            .is_empty());
    }
}
