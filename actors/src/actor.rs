//! `AggregateActor<A>`: one actor per aggregate instance, run under an actix `Supervisor`.
//!
//! Per event: idempotency check → `A::decide` → one atomic commit (state + idempotency record +
//! outbox), which the store may write in one transaction with other actors' commits → reply. A
//! panic while handling is caught, the actor stops and its supervisor restarts it with its state
//! reloaded from the store; the caller gets `ApplyError::Crashed` and must not ack.

use crate::aggregate::Aggregate;
use crate::events::Envelope;
use crate::events::{AggregateKey, Incoming};
use crate::outcome::{Outcome, RejectReason, Rejection};
use crate::ports::{
    ActorObserver, Clock, CommitFuture, CommitResult, OwnedCommit, SeenEntry, StateStore, StoreError,
};
use crate::snapshot::{JournalEntry, Snapshot, SnapshotPlan, SnapshotPolicy};
use actix::dev::{MessageResponse, OneshotSender};
use actix::prelude::*;
use serde::Serialize;
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

/// Apply one event to the actor's aggregate.
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

/// What [`AggregateActor::decide`] found: an outcome, or a commit being written.
enum Step<A> {
    Done(Outcome),
    Committing(CommitFuture, Decided<A>),
}

/// What the actor keeps of a decision while its commit is being written.
struct Decided<A> {
    state: A,
    outputs: usize,
    snapshot_written: bool,
    /// Snapshot versions retained once the commit is written.
    retained: Vec<u64>,
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

    /// Decides `incoming` on the current state: either an outcome at once (a duplicate, a
    /// rejection), or its commit handed to the store and what to keep of the decision until the
    /// store answers.
    fn decide(&mut self, incoming: &Incoming) -> Result<Step<A>, ApplyError> {
        if let Some(seen) = self.env.store.seen(&incoming.idempotency_key)? {
            return Ok(Step::Done(seen_outcome(incoming, &seen)));
        }
        let Some(event) = A::select(&incoming.event) else {
            unreachable!(
                "event for {:?} routed to a {:?} actor",
                incoming.aggregate(),
                A::KIND
            )
        };
        let current = self.loaded()?;
        let mut decision = match A::decide(current, event, &incoming.envelope) {
            Ok(decision) => decision,
            Err(rejection) => return Ok(Step::Done(Outcome::Rejected(rejection))),
        };
        let forced = A::snapshot_now(current, &decision.state);
        let read_model = A::read_model_changes(current, &decision.state);
        let state = serde_json::to_vec(&decision.state).map_err(|e| self.corrupt(e))?;
        let version = decision.state.version();
        let (journal, plan, snapshot) = if A::SNAPSHOTS {
            let entry = JournalRef {
                envelope: &incoming.envelope,
                event,
            };
            let journal = serde_json::to_vec(&entry).map_err(|e| self.corrupt(e))?;
            let plan = self.env.snapshots.plan(&self.retained, version, forced);
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
            (Some(journal), plan, snapshot)
        } else {
            (None, SnapshotPlan::default(), None)
        };
        let decided = Decided {
            outputs: decision.outputs.len(),
            snapshot_written: snapshot.is_some(),
            retained: plan.retained,
            state: decision.state,
        };
        let commit = OwnedCommit {
            aggregate: self.key.clone(),
            state,
            version,
            idempotency_key: incoming.idempotency_key.clone(),
            content_hash: incoming.content_hash.clone(),
            seen_at_ms: self.env.clock.now_ms(),
            delivery: incoming.delivery,
            outbox: decision.outputs,
            charges: decision.charges,
            journal: journal.map(|entry| (version, entry)),
            snapshot: snapshot.map(|snapshot| (version, snapshot)),
            drop_snapshots: plan.drop_snapshots,
            truncate_journal: plan.truncate_journal,
            read_model,
        };
        Ok(Step::Committing(self.env.store.commit_batched(commit), decided))
    }

    /// Takes the store's answer to the commit of `decided`: the new state on success; a reload
    /// when the stored state moved under the actor.
    fn committed(
        &mut self,
        incoming: &Incoming,
        decided: Decided<A>,
        result: Result<CommitResult, StoreError>,
    ) -> Result<Outcome, ApplyError> {
        match result {
            Ok(CommitResult::Committed) => {
                if A::SNAPSHOTS {
                    if decided.snapshot_written {
                        self.env.observer.snapshot_written(A::KIND);
                    }
                    self.retained = decided.retained;
                }
                self.state = Some(Some(decided.state));
                Ok(Outcome::Applied {
                    outputs: decided.outputs,
                })
            }
            Ok(CommitResult::AlreadySeen(seen)) => Ok(seen_outcome(incoming, &seen)),
            Ok(CommitResult::Stale) => {
                self.state = None;
                self.retained.clear();
                Err(ApplyError::Stale(self.key.clone()))
            }
            // The commit may or may not have been written: the next commit's version check
            // finds out, and a retry of this event finds its key if it was.
            Err(error) => Err(error.into()),
        }
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
    if seen.content_hash == incoming.content_hash {
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

/// Decides at once, then waits for the commit without holding the arbiter: the store may write it
/// in one transaction with other actors' commits (`StateStore::commit_batched`), and the arbiter
/// runs those actors meanwhile. The wait is atomic: this actor handles no other message until its
/// commit is answered, so it always decides on its committed state.
impl<A: Aggregate> Handler<Apply> for AggregateActor<A> {
    type Result = Reply<A>;

    fn handle(&mut self, msg: Apply, ctx: &mut Context<Self>) -> Self::Result {
        let incoming = msg.0;
        match self.guarded(ctx, |actor| actor.decide(&incoming)) {
            Ok(Step::Committing(written, decided)) => Reply::Later(AtomicResponse::new(Box::pin(
                written.into_actor(self).map(move |result, actor, ctx| {
                    actor.guarded(ctx, |actor| actor.committed(&incoming, decided, result))
                }),
            ))),
            Ok(Step::Done(outcome)) => Reply::Now(Ok(outcome)),
            Err(error) => Reply::Now(Err(error)),
        }
    }
}

/// The answer to an [`Apply`]: now (a duplicate, a rejection, a crash — answered even by an actor
/// that is stopping), or once the commit is written.
pub enum Reply<A: Aggregate> {
    Now(Result<Outcome, ApplyError>),
    Later(AtomicResponse<AggregateActor<A>, Result<Outcome, ApplyError>>),
}

impl<A: Aggregate> MessageResponse<AggregateActor<A>, Apply> for Reply<A> {
    fn handle(
        self,
        ctx: &mut Context<AggregateActor<A>>,
        tx: Option<OneshotSender<Result<Outcome, ApplyError>>>,
    ) {
        match self {
            Reply::Now(result) => MessageResponse::<AggregateActor<A>, Apply>::handle(result, ctx, tx),
            Reply::Later(response) => MessageResponse::<AggregateActor<A>, Apply>::handle(response, ctx, tx),
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
