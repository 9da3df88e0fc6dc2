//! `AggregateActor<A>`: one actor per aggregate instance, run under an actix `Supervisor`.
//!
//! Per event: idempotency check → `A::decide` → one atomic commit (state + idempotency record +
//! outbox), which the store may write in one transaction with other actors' commits → reply. A
//! panic while handling is caught, the actor stops and its supervisor restarts it with its state
//! reloaded from the store; the caller gets `ApplyError::Crashed` and must not ack.

use crate::aggregate::Aggregate;
use crate::events::Envelope;
use crate::events::{AggregateKey, Incoming};
use crate::gateway::Charge;
use crate::outcome::{Outcome, RejectReason, Rejection};
use crate::ports::{
    ActorObserver, AppliedEvent, Clock, CommitResult, OwnedCommit, SeenEntry, StateStore, StoreError,
};
use crate::snapshot::{JournalEntry, Snapshot, SnapshotPlan, SnapshotPolicy};
use actix::dev::{MessageResponse, OneshotSender};
use actix::prelude::*;
use serde::Serialize;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Why an event could not be handled now; it must not be acked and will be retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored state of {0:?} is unreadable: {1}")]
    CorruptState(AggregateKey, String),
    #[error("actor for {0:?} panicked and is being restarted")]
    Crashed(AggregateKey),
    #[error("actor mailbox closed")]
    MailboxClosed,
    #[error("the stored state of {0:?} moved under the actor; it reloads and the event is retried")]
    Stale(AggregateKey),
}

/// What every aggregate actor shares.
#[derive(Clone)]
pub struct ActorEnv {
    pub store: Arc<dyn StateStore>,
    pub observer: Arc<dyn ActorObserver>,
    pub clock: Arc<dyn Clock>,
    pub mailbox_capacity: usize,
    /// Snapshot cadence and retention, for kinds that keep snapshots.
    pub snapshots: SnapshotPolicy,
}

/// Apply one event (the report service's; aggregate actors take [`ApplyBatch`]).
#[derive(Debug)]
pub struct Apply(pub Arc<Incoming>);

impl Message for Apply {
    type Result = Result<Outcome, ApplyError>;
}

/// Read the actor's current state (loading it from the store if needed).
#[derive(Debug)]
pub struct GetState<A>(std::marker::PhantomData<A>);

impl<A> Default for GetState<A> {
    fn default() -> Self {
        GetState(std::marker::PhantomData)
    }
}

impl<A: Aggregate> Message for GetState<A> {
    type Result = Result<Option<A>, ApplyError>;
}

/// Chaos: make the actor panic now, as a bug in a handler would.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Crash;

pub struct AggregateActor<A: Aggregate> {
    key: AggregateKey,
    env: ActorEnv,
    /// `None` until loaded from the store; reset on restart.
    state: Option<Option<A>>,
    /// Versions of the retained snapshots, oldest first (kinds that keep snapshots).
    retained: Vec<u64>,
}

/// A batch's commits being written, and what the actor keeps of each until the store answers.
struct Committing<A> {
    /// Per event of the batch: its outcome when known without a commit, else `None` (its chunk's).
    outcomes: Vec<Option<Result<Outcome, ApplyError>>>,
    chunks: Vec<Chunk<A>>,
    /// One per chunk, handed to the store.
    commits: Vec<OwnedCommit>,
}

/// Consecutive events of a batch folded into one commit, and the state they lead to.
struct Chunk<A> {
    /// The events' indices in the batch, with the output events each made.
    members: Vec<(usize, usize)>,
    state: A,
    snapshot_written: bool,
    /// Snapshot versions retained once the commit is written.
    retained: Vec<u64>,
}

/// The chunk being built: its events so far and the state before its first one.
struct OpenChunk<A> {
    before: Option<A>,
    events: Vec<AppliedEvent>,
    members: Vec<(usize, usize)>,
    /// The input partition of its last event: where its commit's record goes.
    partition: Option<u32>,
}

/// A journal entry as written, borrowing the event being applied.
#[derive(Serialize)]
struct JournalRef<'a, E> {
    envelope: &'a Envelope,
    event: &'a E,
}

impl<A: Aggregate> AggregateActor<A> {
    pub fn new(id: String, env: ActorEnv) -> Self {
        AggregateActor {
            key: AggregateKey { kind: A::KIND, id },
            env,
            state: None,
            retained: Vec::new(),
        }
    }

    fn corrupt(&self, detail: impl std::fmt::Display) -> ApplyError {
        ApplyError::CorruptState(self.key.clone(), detail.to_string())
    }

    fn loaded(&mut self) -> Result<Option<&A>, ApplyError> {
        if self.state.is_none() {
            let stored = if A::SNAPSHOTS {
                self.restore()?
            } else {
                self.latest()?
            };
            self.state = Some(stored);
        }
        Ok(self.state.as_ref().and_then(Option::as_ref))
    }

    /// The latest stored state.
    fn latest(&self) -> Result<Option<A>, ApplyError> {
        match self.env.store.load(&self.key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| self.corrupt(e)),
        }
    }

    /// Rebuilds the state from the newest snapshot that passes its checksum and the journal after
    /// it. Falls back to the latest stored state when the journal cannot bridge the gap.
    fn restore(&mut self) -> Result<Option<A>, ApplyError> {
        let stored = self.env.store.snapshots(&self.key)?;
        self.retained = stored.iter().rev().map(|(version, _)| *version).collect();
        let mut base = None;
        for (version, bytes) in &stored {
            match Snapshot::<A>::verified(bytes) {
                Some(snapshot) => {
                    base = Some(snapshot.state);
                    break;
                }
                None => {
                    self.env.observer.snapshot_rejected(A::KIND);
                    tracing::warn!(kind = A::KIND.as_str(), id = %self.key.id, version, "Snapshot failed its checksum; trying an older one.");
                }
            }
        }
        let from = base.as_ref().map_or(0, A::version);
        let journal = self.env.store.journal(&self.key, from)?;
        let contiguous = journal
            .iter()
            .zip(from + 1..)
            .all(|((version, _), expected)| *version == expected);
        if !contiguous {
            tracing::error!(kind = A::KIND.as_str(), id = %self.key.id, from, "Journal does not continue the usable snapshot; using the latest stored state.");
            return self.latest();
        }
        if base.is_none() && journal.is_empty() {
            return self.latest();
        }
        let mut state = base;
        for (version, bytes) in &journal {
            let entry: JournalEntry<A::Event> = serde_json::from_slice(bytes).map_err(|e| self.corrupt(e))?;
            let decision = A::decide(state.as_ref(), &entry.event, &entry.envelope).map_err(|rejection| {
                self.corrupt(format!("journal entry {version} does not apply: {rejection}"))
            })?;
            state = Some(decision.state);
        }
        self.env.observer.restored(A::KIND, journal.len());
        Ok(state)
    }

    /// Decides `events` (all of this actor's aggregate) in order on the current state, without
    /// writing: duplicates and rejections are answered at once; the applied events are folded into
    /// commits, one per run of events between snapshots, each carrying every event's idempotency
    /// record, outputs and journal entry and the state after its last event.
    fn decide(&mut self, events: &[Arc<Incoming>]) -> Result<Committing<A>, ApplyError> {
        let mut outcomes: Vec<Option<Result<Outcome, ApplyError>>> = Vec::with_capacity(events.len());
        let mut current: Option<A> = self.loaded()?.cloned();
        let mut retained = self.retained.clone();
        // Keys applied earlier in this batch, not in the store yet.
        let mut applied: HashMap<&str, SeenEntry> = HashMap::new();
        let mut open: Option<OpenChunk<A>> = None;
        let mut commits = Vec::new();
        let mut chunks = Vec::new();
        for (index, incoming) in events.iter().enumerate() {
            let seen = match applied.get(incoming.idempotency_key.as_str()) {
                Some(seen) => Some(seen.clone()),
                None => self.env.store.seen(&incoming.idempotency_key)?,
            };
            if let Some(seen) = seen {
                outcomes.push(Some(Ok(seen_outcome(incoming, &seen))));
                continue;
            }
            let Some(event) = A::select(&incoming.event) else {
                unreachable!(
                    "event for {:?} routed to a {:?} actor",
                    incoming.aggregate(),
                    A::KIND
                )
            };
            let mut decision = match A::decide(current.as_ref(), event, &incoming.envelope) {
                Ok(decision) => decision,
                Err(rejection) => {
                    outcomes.push(Some(Ok(Outcome::Rejected(rejection))));
                    continue;
                }
            };
            outcomes.push(None);
            let version = decision.state.version();
            let forced = A::snapshot_now(current.as_ref(), &decision.state);
            let plan = if A::SNAPSHOTS {
                self.env.snapshots.plan(&retained, version, forced)
            } else {
                SnapshotPlan::default()
            };
            let journal = if A::SNAPSHOTS {
                let entry = JournalRef {
                    envelope: &incoming.envelope,
                    event,
                };
                Some(serde_json::to_vec(&entry).map_err(|e| self.corrupt(e))?)
            } else {
                None
            };
            let snapshot = match plan.snapshot_at {
                Some(_) => {
                    let snapshot = Snapshot::of(&decision.state);
                    decision
                        .outputs
                        .extend(A::snapshot_output(&snapshot, &incoming.envelope));
                    Some(serde_json::to_vec(&snapshot).map_err(|e| self.corrupt(e))?)
                }
                None => None,
            };
            let chunk = open.get_or_insert_with(|| OpenChunk {
                before: current.clone(),
                events: Vec::new(),
                members: Vec::new(),
                partition: None,
            });
            chunk.partition = incoming.partition;
            chunk.members.push((index, decision.outputs.len()));
            let seen_at_ms = self.env.clock.now_ms();
            applied.insert(
                &incoming.idempotency_key,
                SeenEntry {
                    content_hash: incoming.content_hash.clone(),
                    first_seen_ms: seen_at_ms,
                    delivery: incoming.delivery,
                },
            );
            chunk.events.push(AppliedEvent {
                version,
                idempotency_key: incoming.idempotency_key.clone(),
                content_hash: incoming.content_hash.clone(),
                seen_at_ms,
                delivery: incoming.delivery,
                outputs: decision.outputs,
                charges: decision
                    .charges
                    .into_iter()
                    .map(|charge| Charge {
                        partition: incoming.partition,
                        ..charge
                    })
                    .collect(),
                journal,
            });
            current = Some(decision.state);
            // A snapshot ends the chunk: it is written at its event's version, as if alone.
            if let Some(snapshot) = snapshot {
                retained = plan.retained;
                let chunk = open.take().expect("opened above");
                let state = current.clone().expect("decided above");
                let mut commit = self.close(chunk.before.as_ref(), &state, chunk.events, chunk.partition)?;
                commit.snapshot = Some((version, snapshot));
                commit.drop_snapshots = plan.drop_snapshots;
                commit.truncate_journal = plan.truncate_journal;
                commits.push(commit);
                chunks.push(Chunk {
                    members: chunk.members,
                    state,
                    snapshot_written: true,
                    retained: retained.clone(),
                });
            }
        }
        if let Some(chunk) = open.take() {
            let state = current.expect("a chunk holds a decided event");
            commits.push(self.close(chunk.before.as_ref(), &state, chunk.events, chunk.partition)?);
            chunks.push(Chunk {
                members: chunk.members,
                state,
                snapshot_written: false,
                retained,
            });
        }
        Ok(Committing {
            outcomes,
            chunks,
            commits,
        })
    }

    /// The commit of `events`, which lead from `before` to `after`.
    fn close(
        &self,
        before: Option<&A>,
        after: &A,
        mut events: Vec<AppliedEvent>,
        partition: Option<u32>,
    ) -> Result<OwnedCommit, ApplyError> {
        let last = events.pop().expect("a chunk holds an event");
        Ok(OwnedCommit {
            aggregate: self.key.clone(),
            state: serde_json::to_vec(after).map_err(|e| self.corrupt(e))?,
            version: last.version,
            idempotency_key: last.idempotency_key,
            content_hash: last.content_hash,
            seen_at_ms: last.seen_at_ms,
            delivery: last.delivery,
            partition,
            outbox: last.outputs,
            charges: last.charges,
            journal: last.journal.map(|entry| (last.version, entry)),
            snapshot: None,
            drop_snapshots: Vec::new(),
            truncate_journal: None,
            read_model: A::read_model_changes(before, after),
            earlier: events,
        })
    }

    /// Takes the store's answers to a batch's commits: each event's outcome. A refused commit
    /// refuses the ones after it (they were decided on it): their events are retried, with the
    /// state reloaded when the stored one moved under the actor.
    fn committed(
        &mut self,
        events: &[Arc<Incoming>],
        committing: Committing<A>,
        results: Vec<Result<CommitResult, StoreError>>,
    ) -> Vec<Result<Outcome, ApplyError>> {
        let Committing {
            mut outcomes, chunks, ..
        } = committing;
        let mut refused: Option<ApplyError> = None;
        let mut results = results.into_iter();
        for chunk in chunks {
            let result = results
                .next()
                .unwrap_or_else(|| Err(StoreError::Internal("the store left a commit unanswered".into())));
            if refused.is_none() {
                match result {
                    Ok(CommitResult::Committed) => {
                        if A::SNAPSHOTS {
                            if chunk.snapshot_written {
                                self.env.observer.snapshot_written(A::KIND);
                            }
                            self.retained = chunk.retained;
                        }
                        self.state = Some(Some(chunk.state));
                    }
                    // A lone event whose key was recorded meanwhile: a duplicate after all.
                    Ok(CommitResult::AlreadySeen(seen)) if chunk.members.len() == 1 => {
                        let (index, _) = chunk.members[0];
                        outcomes[index] = Some(Ok(seen_outcome(&events[index], &seen)));
                        refused = Some(ApplyError::Stale(self.key.clone()));
                        continue;
                    }
                    // Nothing was written; the state in memory is still the committed one.
                    Ok(CommitResult::AlreadySeen(_)) => refused = Some(ApplyError::Stale(self.key.clone())),
                    Ok(CommitResult::Stale) => {
                        self.state = None;
                        self.retained.clear();
                        refused = Some(ApplyError::Stale(self.key.clone()));
                    }
                    // The commit may or may not have been written: reload, and a retry of its
                    // events finds their keys if it was.
                    Err(error) => {
                        self.state = None;
                        self.retained.clear();
                        for (index, _) in &chunk.members {
                            outcomes[*index] = Some(Err(error.clone().into()));
                        }
                        refused = Some(ApplyError::Stale(self.key.clone()));
                        continue;
                    }
                }
            }
            for (index, outputs) in chunk.members {
                outcomes[index] = Some(match &refused {
                    Some(error) => Err(error.clone()),
                    None => Ok(Outcome::Applied { outputs }),
                });
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or(Err(ApplyError::Stale(self.key.clone()))))
            .collect()
    }

    /// Runs `f`, turning a panic into a restart of this actor.
    fn guarded<R>(
        &mut self,
        ctx: &mut Context<Self>,
        f: impl FnOnce(&mut Self) -> Result<R, ApplyError>,
    ) -> Result<R, ApplyError> {
        let key = self.key.clone();
        guarded(&key, ctx, || f(self))
    }
}

/// Runs `f` for the actor of `key`, turning a panic into a restart of the actor: it stops, its
/// supervisor restarts it, and the caller gets [`ApplyError::Crashed`].
pub(crate) fn guarded<R>(
    key: &AggregateKey,
    ctx: &mut impl ActorContext,
    f: impl FnOnce() -> Result<R, ApplyError>,
) -> Result<R, ApplyError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic_message(&panic);
            tracing::error!(kind = key.kind.as_str(), id = %key.id, panic = %message, "Actor panicked; restarting it.");
            ctx.stop();
            Err(ApplyError::Crashed(key.clone()))
        }
    }
}

/// What an event whose key is in the window comes to: the same message again is a redelivery,
/// another message with the same content a duplicate, other content a reused key.
pub(crate) fn seen_outcome(incoming: &Incoming, seen: &SeenEntry) -> Outcome {
    if seen.same_content(&incoming.content_hash) {
        match (seen.delivery, incoming.delivery) {
            (Some(first), Some(now)) if first == now => Outcome::Redelivered,
            _ => Outcome::Duplicate,
        }
    } else {
        Outcome::Rejected(Rejection::new(
            RejectReason::IdempotencyKeyReused,
            format!(
                "idempotency key {:?} was first seen with other content",
                incoming.idempotency_key
            ),
        ))
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

impl<A: Aggregate> Actor for AggregateActor<A> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.env.mailbox_capacity);
        self.env.observer.started(A::KIND);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.env.observer.stopped(A::KIND);
    }
}

impl<A: Aggregate> Supervised for AggregateActor<A> {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // Whatever was in memory may be half-updated: come back from the committed state.
        self.state = None;
        self.retained.clear();
        self.env.observer.restarted(A::KIND);
    }
}

impl<A: Aggregate> AggregateActor<A> {
    /// Decides `events` at once, then waits for their commits without holding the arbiter: the
    /// store may write them in one transaction with other actors' commits
    /// (`StateStore::commit_batched`), and the arbiter runs those actors meanwhile. The wait is
    /// atomic: this actor handles no other message until its commits are answered, so it always
    /// decides on its committed state.
    fn apply_batch(&mut self, events: Vec<Arc<Incoming>>, ctx: &mut Context<Self>) -> Reply<A> {
        let n = events.len();
        let decided = self.guarded(ctx, |actor| {
            let mut committing = actor.decide(&events)?;
            let written = (!committing.commits.is_empty()).then(|| {
                actor
                    .env
                    .store
                    .commit_batched(std::mem::take(&mut committing.commits))
            });
            Ok((committing, written))
        });
        match decided {
            Ok((committing, Some(written))) => Reply::Later(AtomicResponse::new(Box::pin(
                written.into_actor(self).map(move |results, actor, ctx| {
                    actor
                        .guarded(ctx, |actor| Ok(actor.committed(&events, committing, results)))
                        .unwrap_or_else(|error| vec![Err(error); n])
                }),
            ))),
            Ok((committing, None)) => Reply::Now(
                committing
                    .outcomes
                    .into_iter()
                    .map(|outcome| outcome.expect("no commit: every outcome is known"))
                    .collect(),
            ),
            Err(error) => Reply::Now(vec![Err(error); n]),
        }
    }
}

/// Applies a batch of events of this actor's aggregate, in order; one answer per event.
#[derive(Debug)]
pub struct ApplyBatch(pub Vec<Arc<Incoming>>);

impl Message for ApplyBatch {
    type Result = Vec<Result<Outcome, ApplyError>>;
}

impl<A: Aggregate> Handler<ApplyBatch> for AggregateActor<A> {
    type Result = Reply<A>;

    fn handle(&mut self, msg: ApplyBatch, ctx: &mut Context<Self>) -> Self::Result {
        self.apply_batch(msg.0, ctx)
    }
}

/// The answers to an [`ApplyBatch`]: now (duplicates, rejections, a crash — answered even by an
/// actor that is stopping), or once the commits are written.
pub enum Reply<A: Aggregate> {
    Now(Vec<Result<Outcome, ApplyError>>),
    Later(AtomicResponse<AggregateActor<A>, Vec<Result<Outcome, ApplyError>>>),
}

impl<A: Aggregate> MessageResponse<AggregateActor<A>, ApplyBatch> for Reply<A> {
    fn handle(
        self,
        ctx: &mut Context<AggregateActor<A>>,
        tx: Option<OneshotSender<Vec<Result<Outcome, ApplyError>>>>,
    ) {
        match self {
            Reply::Now(results) => MessageResponse::<AggregateActor<A>, ApplyBatch>::handle(results, ctx, tx),
            Reply::Later(response) => {
                MessageResponse::<AggregateActor<A>, ApplyBatch>::handle(response, ctx, tx)
            }
        }
    }
}

impl<A: Aggregate> Handler<GetState<A>> for AggregateActor<A> {
    type Result = Result<Option<A>, ApplyError>;

    fn handle(&mut self, _msg: GetState<A>, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |actor| Ok(actor.loaded()?.cloned()))
    }
}

impl<A: Aggregate> Handler<Crash> for AggregateActor<A> {
    type Result = ();

    fn handle(&mut self, _msg: Crash, ctx: &mut Context<Self>) {
        let _ = self.guarded(ctx, |actor| -> Result<(), ApplyError> {
            panic!("chaos: kill-actor {:?}", actor.key)
        });
    }
}
