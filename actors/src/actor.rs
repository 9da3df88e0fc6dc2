//! `AggregateActor<A>`: one actor per aggregate instance, run under an actix `Supervisor`.
//!
//! Per event: idempotency check → `A::decide` → one atomic commit (state + idempotency record +
//! outbox) → reply. A panic while handling is caught, the actor stops and its supervisor restarts it
//! with its state reloaded from the store; the caller gets `ApplyError::Crashed` and must not ack.

use crate::aggregate::Aggregate;
use crate::events::{AggregateKey, Incoming};
use crate::outcome::{Outcome, RejectReason, Rejection};
use crate::ports::{ActorObserver, Clock, Commit, CommitResult, SeenEntry, StateStore, StoreError};
use actix::prelude::*;
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
}

/// What every aggregate actor shares.
#[derive(Clone)]
pub struct ActorEnv {
    pub store: Arc<dyn StateStore>,
    pub observer: Arc<dyn ActorObserver>,
    pub clock: Arc<dyn Clock>,
    pub mailbox_capacity: usize,
}

/// Apply one event to the actor's aggregate.
#[derive(Debug)]
pub struct Apply(pub Incoming);

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

/// Stop for good: the registry has dropped this actor (passivation).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Passivate;

/// Chaos: make the actor panic now, as a bug in a handler would.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Crash;

pub struct AggregateActor<A: Aggregate> {
    key: AggregateKey,
    env: ActorEnv,
    /// `None` until loaded from the store; reset on restart.
    state: Option<Option<A>>,
}

impl<A: Aggregate> AggregateActor<A> {
    pub fn new(id: String, env: ActorEnv) -> Self {
        AggregateActor {
            key: AggregateKey { kind: A::KIND, id },
            env,
            state: None,
        }
    }

    fn loaded(&mut self) -> Result<Option<&A>, ApplyError> {
        if self.state.is_none() {
            let stored = match self.env.store.load(&self.key)? {
                None => None,
                Some(bytes) => Some(
                    serde_json::from_slice::<A>(&bytes)
                        .map_err(|e| ApplyError::CorruptState(self.key.clone(), e.to_string()))?,
                ),
            };
            self.state = Some(stored);
        }
        Ok(self.state.as_ref().and_then(Option::as_ref))
    }

    fn apply(&mut self, incoming: &Incoming) -> Result<Outcome, ApplyError> {
        if let Some(seen) = self.env.store.seen(&incoming.idempotency_key)? {
            return Ok(seen_outcome(incoming, &seen));
        }
        let Some(event) = A::select(&incoming.event) else {
            unreachable!(
                "event for {:?} routed to a {:?} actor",
                incoming.aggregate(),
                A::KIND
            )
        };
        let decision = match A::decide(self.loaded()?, event, &incoming.envelope) {
            Ok(decision) => decision,
            Err(rejection) => return Ok(Outcome::Rejected(rejection)),
        };
        let state = serde_json::to_vec(&decision.state)
            .map_err(|e| ApplyError::CorruptState(self.key.clone(), e.to_string()))?;
        let commit = Commit {
            aggregate: &self.key,
            state: &state,
            idempotency_key: &incoming.idempotency_key,
            content_hash: &incoming.content_hash,
            seen_at_ms: self.env.clock.now_ms(),
            outbox: &decision.outputs,
            charges: &decision.charges,
        };
        match self.env.store.commit(commit)? {
            CommitResult::Committed => {
                let outputs = decision.outputs.len();
                self.state = Some(Some(decision.state));
                Ok(Outcome::Applied { outputs })
            }
            CommitResult::AlreadySeen(seen) => Ok(seen_outcome(incoming, &seen)),
        }
    }

    /// Runs `f`, turning a panic into a restart of this actor.
    fn guarded<R>(
        &mut self,
        ctx: &mut Context<Self>,
        f: impl FnOnce(&mut Self) -> Result<R, ApplyError>,
    ) -> Result<R, ApplyError> {
        match catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(result) => result,
            Err(panic) => {
                let message = panic_message(&panic);
                tracing::error!(kind = self.key.kind.as_str(), id = %self.key.id, panic = %message, "Actor panicked; restarting it.");
                ctx.stop();
                Err(ApplyError::Crashed(self.key.clone()))
            }
        }
    }
}

fn seen_outcome(incoming: &Incoming, seen: &SeenEntry) -> Outcome {
    if seen.content_hash == incoming.content_hash {
        Outcome::Duplicate
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
        self.env.observer.restarted(A::KIND);
    }
}

impl<A: Aggregate> Handler<Apply> for AggregateActor<A> {
    type Result = Result<Outcome, ApplyError>;

    fn handle(&mut self, msg: Apply, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |actor| actor.apply(&msg.0))
    }
}

impl<A: Aggregate> Handler<GetState<A>> for AggregateActor<A> {
    type Result = Result<Option<A>, ApplyError>;

    fn handle(&mut self, _msg: GetState<A>, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |actor| Ok(actor.loaded()?.cloned()))
    }
}

impl<A: Aggregate> Handler<Passivate> for AggregateActor<A> {
    type Result = ();

    fn handle(&mut self, _msg: Passivate, ctx: &mut Context<Self>) {
        ctx.stop();
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
