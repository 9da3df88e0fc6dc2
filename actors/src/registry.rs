//! The actor registry: finds or starts the supervised actor of an aggregate and routes to it.
//!
//! Actors are spread over a fixed set of arbiters (threads) by a hash of their key, so one busy
//! aggregate never blocks the others. At most `mailbox_capacity` applies are in flight to one actor;
//! further callers wait in `apply`: that is the backpressure that keeps memory flat. (`Addr::send`
//! alone does not bound anything here: every `Addr` clone has its own guaranteed mailbox slot, and
//! each call sends through a fresh clone.)
//!
//! Passivation: [`Registry::passivate_idle`] drops the registry's address of actors with nothing
//! in flight for a while; an actor stops once its last address is gone. It decides under the same
//! lock that admits applies, so an apply either keeps the actor alive or finds no actor and starts
//! a fresh one from the stored state.

use crate::actor::{ActorEnv, AggregateActor, Apply, ApplyBatch, ApplyError, Crash, GetState};
use crate::aggregate::Aggregate;
use crate::campaign::Campaign;
use crate::events::{AggregateKind, Incoming};
use crate::outcome::Outcome;
use crate::payment::Payment;
use crate::ports::Clock;
use crate::report::Report;
use crate::report_actor::{Query, ReportActor, ReportService, Status};
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
    /// Applies in flight, the callers waiting for one of them to finish, and when the last one
    /// finished (ms, the registry's clock).
    state: Mutex<Slots>,
}

struct Slots {
    in_flight: usize,
    waiting: Vec<Waker>,
    last_used_ms: i64,
}

/// One apply's place in flight, given back on drop (also when the caller gives up waiting).
struct Permit(Arc<InFlight>, Arc<dyn Clock>);

impl InFlight {
    async fn acquire(self: Arc<Self>, clock: Arc<dyn Clock>) -> Permit {
        futures::future::poll_fn(|cx| {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.in_flight < self.limit {
                state.in_flight += 1;
                return Poll::Ready(());
            }
            if !state.waiting.iter().any(|w| w.will_wake(cx.waker())) {
                state.waiting.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
        Permit(self, clock)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let waiting = {
            let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            state.in_flight -= 1;
            state.last_used_ms = self.1.now_ms();
            std::mem::take(&mut state.waiting)
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
    /// The one report service actor, started with the registry and never passivated.
    reports: Addr<ReportActor>,
}

impl Registry {
    /// A registry whose actors run on `arbiters` (at least one).
    pub fn new(env: ActorEnv, arbiters: Vec<ArbiterHandle>) -> Self {
        assert!(!arbiters.is_empty(), "a registry needs at least one arbiter");
        let report_env = env.clone();
        let reports = Supervisor::start_in_arbiter(&arbiters[0], move |_| ReportActor::new(report_env));
        Registry {
            reports,
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
    /// Shared, so that a caller retrying after a crash does not copy the event.
    pub async fn apply(&self, incoming: Arc<Incoming>) -> Result<Outcome, ApplyError> {
        let mut results = self.apply_batch(vec![incoming]).await;
        results.pop().unwrap_or(Err(ApplyError::MailboxClosed))
    }

    /// Applies `events`, all of one aggregate, in order, in one message to its actor (which
    /// commits them together); one answer per event. Waits while the actor's mailbox is full.
    pub async fn apply_batch(&self, events: Vec<Arc<Incoming>>) -> Vec<Result<Outcome, ApplyError>> {
        let Some(key) = events.first().map(|incoming| incoming.aggregate()) else {
            return Vec::new();
        };
        debug_assert!(events.iter().all(|incoming| incoming.aggregate() == key));
        match key.kind {
            AggregateKind::Campaign => self.send_apply(&self.campaigns, &key.id, events).await,
            AggregateKind::Payment => self.send_apply(&self.payments, &key.id, events).await,
            AggregateKind::Report => {
                let mut results = Vec::with_capacity(events.len());
                for incoming in events {
                    let sent = self.reports.send(Apply(incoming)).await;
                    results.push(sent.unwrap_or(Err(ApplyError::MailboxClosed)));
                }
                results
            }
        }
    }

    /// The report in the report service's active version.
    pub async fn report(&self) -> Result<Report, ApplyError> {
        self.reports
            .send(Query)
            .await
            .unwrap_or(Err(ApplyError::MailboxClosed))
    }

    /// The report service's active version and counters.
    pub async fn report_service(&self) -> Result<ReportService, ApplyError> {
        self.reports
            .send(Status)
            .await
            .unwrap_or(Err(ApplyError::MailboxClosed))
    }

    async fn send_apply<A: Aggregate>(
        &self,
        kind: &Kind<A>,
        id: &str,
        events: Vec<Arc<Incoming>>,
    ) -> Vec<Result<Outcome, ApplyError>>
    where
        AggregateActor<A>: Actor<Context = Context<AggregateActor<A>>>,
    {
        let in_flight = kind
            .in_flight
            .entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(InFlight {
                    limit: self.env.mailbox_capacity.max(1),
                    state: Mutex::new(Slots {
                        in_flight: 0,
                        waiting: Vec::new(),
                        last_used_ms: self.env.clock.now_ms(),
                    }),
                })
            })
            .clone();
        let _permit = in_flight.acquire(self.env.clock.clone()).await;
        let n = events.len();
        let sent = self.addr(kind, id).send(ApplyBatch(events)).await;
        // A closed mailbox means the actor went away mid-message: the events were not committed.
        sent.unwrap_or_else(|_| vec![Err(ApplyError::MailboxClosed); n])
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
            AggregateKind::Report if id == crate::events::REPORT_SERVICE_ID => self.reports.send(Crash).await,
            AggregateKind::Report => return false,
        };
        sent.is_ok()
    }

    /// Stops the actors that have had nothing in flight for `idle_ms`; returns how many.
    pub fn passivate_idle(&self, idle_ms: i64) -> usize {
        let now = self.env.clock.now_ms();
        passivate(&self.campaigns, now, idle_ms) + passivate(&self.payments, now, idle_ms)
    }

    /// Drops the actor of (`kind`, `id`) if one runs, so the next event loads the stored state
    /// afresh (after the store was changed behind the actor's back: a changelog import).
    pub fn forget(&self, kind: AggregateKind, id: &str) {
        match kind {
            AggregateKind::Campaign => forget(&self.campaigns, id),
            AggregateKind::Payment => forget(&self.payments, id),
            // The report actor reloads on restart; a crash is its way to forget.
            AggregateKind::Report => self.reports.do_send(crate::report_actor::Reload),
        }
    }

    /// Number of actors of `kind` currently registered.
    pub fn active(&self, kind: AggregateKind) -> usize {
        match kind {
            AggregateKind::Campaign => self.campaigns.actors.len(),
            AggregateKind::Payment => self.payments.actors.len(),
            AggregateKind::Report => usize::from(self.reports.connected()),
        }
    }
}

fn passivate<A: Aggregate>(kind: &Kind<A>, now_ms: i64, idle_ms: i64) -> usize
where
    AggregateActor<A>: Actor<Context = Context<AggregateActor<A>>>,
{
    let mut stopped = 0;
    kind.in_flight.retain(|id, in_flight| {
        // Holding the lock that admits applies: none can start while the actor is removed.
        let slots = in_flight.state.lock().unwrap_or_else(|e| e.into_inner());
        if slots.in_flight > 0 || now_ms - slots.last_used_ms < idle_ms {
            return true;
        }
        // An actor stops once its last address is gone, and its supervisor does not restart an
        // actor nobody can reach: dropping the registry's address is the whole passivation.
        if kind.actors.remove(id).is_some() {
            stopped += 1;
        }
        false
    });
    stopped
}

/// Drops the registry's address of an actor with nothing in flight (under the lock that admits
/// applies, as passivation does). An actor busy now keeps running: its next commit finds the stored
/// version moved, and it reloads (`ApplyError::Stale`).
fn forget<A: Aggregate>(kind: &Kind<A>, id: &str) {
    match kind.in_flight.get(id) {
        Some(in_flight) => {
            let slots = in_flight.state.lock().unwrap_or_else(|e| e.into_inner());
            if slots.in_flight == 0 {
                kind.actors.remove(id);
            }
        }
        None => {
            kind.actors.remove(id);
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
