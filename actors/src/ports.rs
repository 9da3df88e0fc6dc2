//! Ports: what the actors need from the outside world, implemented by the daemon (`src/`).

use crate::events::{AggregateKey, AggregateKind, DeliveryId, ReportVersion};
use crate::gateway::Charge;
use crate::output::OutputEvent;
use crate::readmodel::{Change, ReadModel};
use serde::{Deserialize, Serialize};

/// A failure of the state store. The event it concerned is not acked: what happens to it
/// depends on the class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot write now (an I/O error: disk full, read-only or failing disk). Nothing
    /// is wrong with the event: consumption stops and the event waits until the store writes
    /// again, without counting against it.
    #[error("state store cannot write: {0}")]
    Unavailable(String),
    /// A stored value does not parse. Retrying may not help: the event is retried a few times,
    /// then dead-lettered.
    #[error("state store holds a corrupt value: {0}")]
    Corrupt(String),
    /// Anything else (the committer stopped, a batch panicked): retried a few times, then
    /// dead-lettered.
    #[error("state store: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether the store as a whole cannot write, rather than this one operation failing.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// The class as a short word (`unavailable`, `corrupt`, `internal`), for logs.
    pub fn class(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Corrupt(_) => "corrupt",
            StoreError::Internal(_) => "internal",
        }
    }
}

/// What the idempotency window remembers of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenEntry {
    /// The hash of the content the key was applied with, hex, as the window keeps it: whole, or a
    /// prefix of it (the store keeps 8 bytes). Compare with [`SeenEntry::same_content`].
    pub content_hash: String,
    pub first_seen_ms: i64,
    /// The message whose event was applied under the key (`None`: an event the daemon made, or a
    /// key recorded before deliveries were).
    pub delivery: Option<DeliveryId>,
}

impl SeenEntry {
    /// Whether an event whose whole content hash is `content_hash` has the content this key was
    /// applied with.
    pub fn same_content(&self, content_hash: &str) -> bool {
        !self.content_hash.is_empty() && content_hash.starts_with(self.content_hash.as_str())
    }
}

/// An event a commit applied before its last one: a commit may apply several consecutive events of
/// its aggregate (an actor's batch), and the idempotency window, the journal, the ledgers and the
/// changelog keep each of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedEvent {
    /// The aggregate's version once this event was applied.
    pub version: u64,
    pub idempotency_key: String,
    pub content_hash: String,
    pub seen_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<OutputEvent>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub charges: Vec<Charge>,
    /// Snapshot kinds: the journal entry (kept locally, never carried by the changelog).
    #[serde(skip)]
    pub journal: Option<Vec<u8>>,
}

/// One event of a commit, as the store writes it: an [`AppliedEvent`] or the commit's last event.
#[derive(Debug, Clone, Copy)]
pub struct EventRef<'a> {
    pub version: u64,
    pub idempotency_key: &'a str,
    pub content_hash: &'a str,
    pub seen_at_ms: i64,
    pub delivery: Option<DeliveryId>,
    pub outputs: &'a [OutputEvent],
    pub charges: &'a [Charge],
    pub journal: Option<&'a [u8]>,
}

impl AppliedEvent {
    pub fn as_ref(&self) -> EventRef<'_> {
        EventRef {
            version: self.version,
            idempotency_key: &self.idempotency_key,
            content_hash: &self.content_hash,
            seen_at_ms: self.seen_at_ms,
            delivery: self.delivery,
            outputs: &self.outputs,
            charges: &self.charges,
            journal: self.journal.as_deref(),
        }
    }
}

/// Everything applied events change, committed in one atomic step: the aggregate's new state and
/// each event's idempotency record, outputs, charges and journal entry. The fields below name the
/// commit's last event; `earlier` holds the events it applied before that one, in order.
#[derive(Debug, Clone, Copy)]
pub struct Commit<'a> {
    pub aggregate: &'a AggregateKey,
    /// The aggregate's whole new state, serialized.
    pub state: &'a [u8],
    /// The new state's version (events applied to the aggregate).
    pub version: u64,
    pub idempotency_key: &'a str,
    pub content_hash: &'a str,
    /// When the key was seen (event processing time), for the window's eviction.
    pub seen_at_ms: i64,
    /// The message the event came in, recorded with the key ([`Incoming::delivery`](crate::Incoming::delivery)).
    pub delivery: Option<DeliveryId>,
    /// The changelog partition of the commit's record: its events' input partition
    /// ([`Incoming::partition`](crate::Incoming::partition)); `None` routes it by its key.
    pub partition: Option<u32>,
    pub outbox: &'a [OutputEvent],
    /// Payments to charge through the gateway.
    pub charges: &'a [Charge],
    /// Snapshot kinds: the journal entry of this event, at the aggregate's new version.
    pub journal: Option<(u64, &'a [u8])>,
    /// A full-state snapshot to write at this version (see [`crate::snapshot`]).
    pub snapshot: Option<(u64, &'a [u8])>,
    /// Snapshot versions to delete.
    pub drop_snapshots: &'a [u64],
    /// Journal versions to delete, inclusive.
    pub truncate_journal: Option<(u64, u64)>,
    /// Read-model counters the commit moves (see [`crate::readmodel`]).
    pub read_model: &'a [Change],
    /// Events applied before the last one, versions `version - earlier.len()` on, in order.
    pub earlier: &'a [AppliedEvent],
}

impl<'a> Commit<'a> {
    /// A commit of `state` and the idempotency record alone; set the other fields with struct
    /// update syntax.
    pub fn of(
        aggregate: &'a AggregateKey,
        state: &'a [u8],
        version: u64,
        idempotency_key: &'a str,
        content_hash: &'a str,
        seen_at_ms: i64,
    ) -> Self {
        Commit {
            aggregate,
            state,
            version,
            idempotency_key,
            content_hash,
            seen_at_ms,
            delivery: None,
            partition: None,
            outbox: &[],
            charges: &[],
            journal: None,
            snapshot: None,
            drop_snapshots: &[],
            truncate_journal: None,
            read_model: &[],
            earlier: &[],
        }
    }

    /// Every event the commit applies, oldest first (the last one is named by the commit's fields).
    pub fn events(&self) -> impl Iterator<Item = EventRef<'a>> + '_ {
        self.earlier
            .iter()
            .map(AppliedEvent::as_ref)
            .chain(std::iter::once(EventRef {
                version: self.version,
                idempotency_key: self.idempotency_key,
                content_hash: self.content_hash,
                seen_at_ms: self.seen_at_ms,
                delivery: self.delivery,
                outputs: self.outbox,
                charges: self.charges,
                journal: self.journal.map(|(_, entry)| entry),
            }))
    }

    /// The version before the commit's first event.
    pub fn base_version(&self) -> u64 {
        self.version.saturating_sub(self.earlier.len() as u64 + 1)
    }
}

/// A [`Commit`] that owns its data, so that it can wait on another thread to be written together
/// with other actors' commits ([`StateStore::commit_batched`]).
#[derive(Debug, Clone)]
pub struct OwnedCommit {
    pub aggregate: AggregateKey,
    pub state: Vec<u8>,
    pub version: u64,
    pub idempotency_key: String,
    pub content_hash: String,
    pub seen_at_ms: i64,
    pub delivery: Option<DeliveryId>,
    pub partition: Option<u32>,
    pub outbox: Vec<OutputEvent>,
    pub charges: Vec<Charge>,
    pub journal: Option<(u64, Vec<u8>)>,
    pub snapshot: Option<(u64, Vec<u8>)>,
    pub drop_snapshots: Vec<u64>,
    pub truncate_journal: Option<(u64, u64)>,
    pub read_model: Vec<Change>,
    pub earlier: Vec<AppliedEvent>,
}

impl OwnedCommit {
    pub fn borrow(&self) -> Commit<'_> {
        Commit {
            aggregate: &self.aggregate,
            state: &self.state,
            version: self.version,
            idempotency_key: &self.idempotency_key,
            content_hash: &self.content_hash,
            seen_at_ms: self.seen_at_ms,
            delivery: self.delivery,
            partition: self.partition,
            outbox: &self.outbox,
            charges: &self.charges,
            journal: self
                .journal
                .as_ref()
                .map(|(version, entry)| (*version, entry.as_slice())),
            snapshot: self
                .snapshot
                .as_ref()
                .map(|(version, bytes)| (*version, bytes.as_slice())),
            drop_snapshots: &self.drop_snapshots,
            truncate_journal: self.truncate_journal,
            read_model: &self.read_model,
            earlier: &self.earlier,
        }
    }
}

/// The answers to a [`StateStore::commit_batched`], one per commit in order, once written or refused.
pub type CommitFuture = futures::future::BoxFuture<'static, Vec<Result<CommitResult, StoreError>>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitResult {
    Committed,
    /// The key was recorded meanwhile (by another aggregate): nothing was written.
    AlreadySeen(SeenEntry),
    /// The stored state is no longer the one this change was decided on (another writer moved
    /// it, such as a state imported from another daemon): nothing was written.
    Stale,
}

/// Durable state: aggregate states, the idempotency window and the outbox.
pub trait StateStore: Send + Sync + 'static {
    fn load(&self, key: &AggregateKey) -> Result<Option<Vec<u8>>, StoreError>;

    /// The window's entry for `idempotency_key`, if it is inside the window.
    fn seen(&self, idempotency_key: &str) -> Result<Option<SeenEntry>, StoreError>;

    /// Writes state, idempotency record and outbox atomically, unless the key is already recorded.
    fn commit(&self, commit: Commit<'_>) -> Result<CommitResult, StoreError>;

    /// Commits as [`StateStore::commit`] does, in order, but may write `commits` in one
    /// transaction with other actors' commits and answers when they are written, so the caller's
    /// thread is free meanwhile. Each commit keeps its own answer: one refused commit refuses no
    /// other (a later commit of the same aggregate then finds the version it was decided on
    /// missing). The default commits at once, one by one.
    fn commit_batched(&self, commits: Vec<OwnedCommit>) -> CommitFuture {
        let results = commits
            .iter()
            .map(|commit| self.commit(commit.borrow()))
            .collect();
        Box::pin(std::future::ready(results))
    }

    /// The stored snapshots of `key`, newest first, as (version, bytes).
    fn snapshots(&self, _key: &AggregateKey) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(Vec::new())
    }

    /// The journal of `key` after version `after`, oldest first, as (version, bytes).
    fn journal(&self, _key: &AggregateKey, _after: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(Vec::new())
    }

    /// The report read model as committed so far.
    fn read_model(&self) -> Result<ReadModel, StoreError> {
        Ok(ReadModel::default())
    }
}

/// Life events of actors, for metrics. All methods default to doing nothing.
pub trait ActorObserver: Send + Sync + 'static {
    fn started(&self, _kind: AggregateKind) {}
    fn stopped(&self, _kind: AggregateKind) {}
    fn restarted(&self, _kind: AggregateKind) {}
    fn snapshot_written(&self, _kind: AggregateKind) {}
    /// A snapshot failed its checksum (or did not parse) and was passed over.
    fn snapshot_rejected(&self, _kind: AggregateKind) {}
    /// An actor rebuilt its state from a snapshot and `replayed` journal entries.
    fn restored(&self, _kind: AggregateKind, _replayed: usize) {}
    /// The report service answers in `active` (at start and after each switch).
    fn report_version(&self, _active: ReportVersion) {}
    /// The report service switched versions.
    fn report_switched(&self, _from: ReportVersion, _to: ReportVersion) {}
}

/// An observer that ignores everything.
pub struct NoObserver;
impl ActorObserver for NoObserver {}

/// A clock, so tests control time.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;
impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}
