//! The actor registry: finds or starts the supervised actor of an aggregate and routes to it.
//!
//! Actors are spread over a fixed set of arbiters (threads) by a hash of their key, so one busy
//! aggregate never blocks the others. At most `mailbox_capacity` applies are in flight to one actor;
//! further callers wait in `apply`: that is the backpressure that keeps memory flat. (`Addr::send`
//! alone does not bound anything here: every `Addr` clone has its own guaranteed mailbox slot, and
//! each call sends through a fresh clone.)

use crate::actor::{ActorEnv, AggregateActor, Apply, ApplyError, Crash, GetState};
use crate::aggregate::Aggregate;
use crate::campaign::Campaign;
use crate::events::{AggregateKind, Incoming};
use crate::outcome::Outcome;
use crate::payment::Payment;
use actix::prelude::*;
use dashmap::DashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

struct Kind<A: Aggregate> {
    actors: DashMap<String, Addr<AggregateActor<A>>>,
    in_flight: DashMap<String, Arc<InFlight>>,
}

impl<A: Aggregate> Kind<A> {
    fn new() -> Self {
        Kind {
            actors: DashMap::new(),
            in_flight: DashMap::new(),
        }
    }
}

/// Counts the applies in flight to one actor and parks callers beyond `limit`.
struct InFlight {
    limit: usize,
    /// Applies in flight, and the callers waiting for one of them to finish.
    state: Mutex<(usize, Vec<Waker>)>,
}

/// One apply's place in flight, given back on drop (also when the caller gives up waiting).
struct Permit(Arc<InFlight>);

impl InFlight {
    async fn acquire(self: Arc<Self>) -> Permit {
        futures::future::poll_fn(|cx| {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.0 < self.limit {
                state.0 += 1;
                return Poll::Ready(());
            }
            if !state.1.iter().any(|w| w.will_wake(cx.waker())) {
                state.1.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
        Permit(self)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let waiting = {
            let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            state.0 -= 1;
            std::mem::take(&mut state.1)
        };
        // Wake every waiter: one gets the place, the others park again. No wake-up is lost when a
        // woken caller is dropped before it polls.
        waiting.into_iter().for_each(Waker::wake);
    }
}

pub struct Registry {
    env: ActorEnv,
    arbiters: Vec<ArbiterHandle>,
    hasher: RandomState,
    campaigns: Kind<Campaign>,
    payments: Kind<Payment>,
}

impl Registry {
    /// A registry whose actors run on `arbiters` (at least one).
    pub fn new(env: ActorEnv, arbiters: Vec<ArbiterHandle>) -> Self {
        assert!(!arbiters.is_empty(), "a registry needs at least one arbiter");
        Registry {
            env,
            arbiters,
            hasher: RandomState::new(),
            campaigns: Kind::new(),
            payments: Kind::new(),
        }
    }

    fn addr<A: Aggregate>(&self, kind: &Kind<A>, id: &str) -> Addr<AggregateActor<A>>
    where
        AggregateActor<A>: Actor<Context = Context<AggregateActor<A>>>,
    {
        if let Some(addr) = kind.actors.get(id) {
            if addr.connected() {
                return addr.clone();
            }
        }
        let arbiter = &self.arbiters[self.hasher.hash_one(id) as usize % self.arbiters.len()];
        kind.actors
            .entry(id.to_owned())
            .and_modify(|addr| {
                if !addr.connected() {
                    *addr = start::<A>(arbiter, id, &self.env);
                }
            })
            .or_insert_with(|| start::<A>(arbiter, id, &self.env))
            .clone()
    }

    /// Applies `incoming` on its aggregate's actor, waiting while the actor's mailbox is full.
    pub async fn apply(&self, incoming: Incoming) -> Result<Outcome, ApplyError> {
        let key = incoming.aggregate();
        match key.kind {
            AggregateKind::Campaign => self.send_apply(&self.campaigns, &key.id, incoming).await,
            AggregateKind::Payment => self.send_apply(&self.payments, &key.id, incoming).await,
        }
    }

    async fn send_apply<A: Aggregate>(
        &self,
        kind: &Kind<A>,
        id: &str,
        incoming: Incoming,
    ) -> Result<Outcome, ApplyError>
    where
        AggregateActor<A>: Actor<Context = Context<AggregateActor<A>>>,
    {
        let in_flight = kind
            .in_flight
            .entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(InFlight {
                    limit: self.env.mailbox_capacity.max(1),
                    state: Mutex::new((0, Vec::new())),
                })
            })
            .clone();
        let _permit = in_flight.acquire().await;
        let sent = self.addr(kind, id).send(Apply(incoming)).await;
        // A closed mailbox means the actor went away mid-message: the event was not committed.
        sent.unwrap_or(Err(ApplyError::MailboxClosed))
    }

    pub async fn campaign(&self, id: &str) -> Result<Option<Campaign>, ApplyError> {
        let addr = self.addr(&self.campaigns, id);
        addr.send(GetState::default())
            .await
            .unwrap_or(Err(ApplyError::MailboxClosed))
    }

    pub async fn payment(&self, id: &str) -> Result<Option<Payment>, ApplyError> {
        let addr = self.addr(&self.payments, id);
        addr.send(GetState::default())
            .await
            .unwrap_or(Err(ApplyError::MailboxClosed))
    }

    /// Makes the actor of (`kind`, `id`) panic now; false when no such actor is running.
    pub async fn crash(&self, kind: AggregateKind, id: &str) -> bool {
        let sent = match kind {
            AggregateKind::Campaign => match self.campaigns.actors.get(id).map(|a| a.clone()) {
                Some(addr) => addr.send(Crash).await,
                None => return false,
            },
            AggregateKind::Payment => match self.payments.actors.get(id).map(|a| a.clone()) {
                Some(addr) => addr.send(Crash).await,
                None => return false,
            },
        };
        sent.is_ok()
    }

    /// Number of actors of `kind` currently registered.
    pub fn active(&self, kind: AggregateKind) -> usize {
        match kind {
            AggregateKind::Campaign => self.campaigns.actors.len(),
            AggregateKind::Payment => self.payments.actors.len(),
        }
    }
}

fn start<A: Aggregate>(arbiter: &ArbiterHandle, id: &str, env: &ActorEnv) -> Addr<AggregateActor<A>>
where
    AggregateActor<A>: Actor<Context = Context<AggregateActor<A>>>,
{
    let (id, env) = (id.to_owned(), env.clone());
    Supervisor::start_in_arbiter(arbiter, move |_| AggregateActor::<A>::new(id, env))
}
