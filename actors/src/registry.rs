//! The actor registry: finds or starts the supervised actor of an aggregate and routes to it.
//!
//! Actors are spread over a fixed set of arbiters (threads) by a hash of their key, so one busy
//! aggregate never blocks the others. Messages go through `Addr::send`, which waits while a mailbox is
//! full: that is the backpressure that keeps memory flat.

use crate::actor::{AggregateActor, Apply, ApplyError, Crash, GetState, ActorEnv};
use crate::aggregate::Aggregate;
use crate::campaign::Campaign;
use crate::events::{AggregateKind, Incoming};
use crate::outcome::Outcome;
use crate::payment::Payment;
use actix::prelude::*;
use dashmap::DashMap;
use std::hash::{BuildHasher, RandomState};

struct Kind<A: Aggregate> {
    actors: DashMap<String, Addr<AggregateActor<A>>>,
}

impl<A: Aggregate> Kind<A> {
    fn new() -> Self {
        Kind {
            actors: DashMap::new(),
        }
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
        let sent = match key.kind {
            AggregateKind::Campaign => self.addr(&self.campaigns, &key.id).send(Apply(incoming)).await,
            AggregateKind::Payment => self.addr(&self.payments, &key.id).send(Apply(incoming)).await,
        };
        // A closed mailbox means the actor went away mid-message: the event was not committed.
        sent.unwrap_or(Err(ApplyError::MailboxClosed))
    }

    pub async fn campaign(&self, id: &str) -> Result<Option<Campaign>, ApplyError> {
        let addr = self.addr(&self.campaigns, id);
        addr.send(GetState::default()).await.unwrap_or(Err(ApplyError::MailboxClosed))
    }

    pub async fn payment(&self, id: &str) -> Result<Option<Payment>, ApplyError> {
        let addr = self.addr(&self.payments, id);
        addr.send(GetState::default()).await.unwrap_or(Err(ApplyError::MailboxClosed))
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
