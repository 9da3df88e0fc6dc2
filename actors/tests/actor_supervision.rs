//! `AggregateActor` and `Registry` on a real actix System, with an in-memory state store: exactly-once
//! commits, supervision after panics and store errors, mailbox backpressure and routing.
//!
//! Nothing here sleeps to wait: tests await the futures they start, or poll a condition with a
//! deadline (`eventually`).

mod common;

use actix::Arbiter;
use aerostream_actors::ports::{
    ActorObserver, Clock, Commit, CommitFuture, CommitResult, OwnedCommit, SeenEntry, StateStore, StoreError,
};
use aerostream_actors::snapshot::SnapshotPolicy;
use aerostream_actors::testkit::MemoryStore as MemStore;
use aerostream_actors::{
    ActorEnv, AggregateKey, AggregateKind, ApplyError, Campaign, Event, Incoming, Outcome, PaymentStatus,
    Registry, RejectReason,
};
use common::*;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `condition` until it holds, failing the test after `DEADLINE`.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        actix_rt::task::yield_now().await;
    }
}

// ---------------------------------------------------------------------------------------------------
// Ports written for the tests
// ---------------------------------------------------------------------------------------------------

/// Holds commits while closed. Waits are bounded so a failing test cannot hang an arbiter forever.
#[derive(Default)]
struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
    /// Commits that arrived while the gate was closed.
    held: AtomicUsize,
}

impl Gate {
    fn close(&self) {
        *self.closed.lock().unwrap() = true;
    }

    fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.opened.notify_all();
    }

    fn pass(&self) {
        let closed = self.closed.lock().unwrap();
        if *closed {
            self.held.fetch_add(1, SeqCst);
            let _ = self
                .opened
                .wait_timeout_while(closed, DEADLINE, |closed| *closed)
                .unwrap();
        }
    }
}

/// Wraps the store with injectable faults; each counter is how many of the next calls misbehave.
struct FaultyStore {
    inner: Arc<MemStore>,
    panic_commits: AtomicUsize,
    fail_commits: AtomicUsize,
    /// `seen` answers "never seen" this many times, as if another aggregate recorded the key
    /// between the actor's check and its commit.
    blind_seen: AtomicUsize,
    gate: Gate,
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok()
}

impl StateStore for FaultyStore {
    fn load(&self, key: &AggregateKey) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.load(key)
    }

    fn seen(&self, idempotency_key: &str) -> Result<Option<SeenEntry>, StoreError> {
        if take_one(&self.blind_seen) {
            return Ok(None);
        }
        self.inner.seen(idempotency_key)
    }

    fn commit(&self, commit: Commit<'_>) -> Result<CommitResult, StoreError> {
        self.gate.pass();
        if take_one(&self.panic_commits) {
            panic!("injected: commit panicked");
        }
        if take_one(&self.fail_commits) {
            return Err(StoreError::Unavailable("injected: disk full".into()));
        }
        self.inner.commit(commit)
    }
}

/// Counts actor life events (all kinds together) and notes the commit count at each restart.
struct CountingObserver {
    started: AtomicUsize,
    stopped: AtomicUsize,
    restarted: AtomicUsize,
    commits: Arc<AtomicUsize>,
    commits_at_restart: Mutex<Vec<usize>>,
}

impl ActorObserver for CountingObserver {
    // The report service's actor starts with every registry: these count aggregate actors.
    fn started(&self, kind: AggregateKind) {
        if kind != AggregateKind::Report {
            self.started.fetch_add(1, SeqCst);
        }
    }

    fn stopped(&self, kind: AggregateKind) {
        if kind != AggregateKind::Report {
            self.stopped.fetch_add(1, SeqCst);
        }
    }

    fn restarted(&self, _kind: AggregateKind) {
        self.commits_at_restart
            .lock()
            .unwrap()
            .push(self.commits.load(SeqCst));
        self.restarted.fetch_add(1, SeqCst);
    }
}

struct FixedClock;
impl Clock for FixedClock {
    fn now_ms(&self) -> i64 {
        1_700_000_000_000
    }
}

struct Harness {
    registry: Rc<Registry>,
    mem: Arc<MemStore>,
    store: Arc<FaultyStore>,
    observer: Arc<CountingObserver>,
    arbiters: Vec<Arbiter>,
}

impl Harness {
    /// A registry whose actors run on `arbiters` new threads, so a blocked commit never blocks the test.
    fn new(arbiters: usize, mailbox_capacity: usize) -> Self {
        let mem = Arc::new(MemStore::default());
        let store = Arc::new(FaultyStore {
            inner: mem.clone(),
            panic_commits: AtomicUsize::new(0),
            fail_commits: AtomicUsize::new(0),
            blind_seen: AtomicUsize::new(0),
            gate: Gate::default(),
        });
        let observer = Arc::new(CountingObserver {
            started: AtomicUsize::new(0),
            stopped: AtomicUsize::new(0),
            restarted: AtomicUsize::new(0),
            commits: mem.commits.clone(),
            commits_at_restart: Mutex::new(Vec::new()),
        });
        let env = ActorEnv {
            store: store.clone(),
            observer: observer.clone(),
            clock: Arc::new(FixedClock),
            mailbox_capacity,
            snapshots: SnapshotPolicy {
                every_events: 1_000_000,
                keep: 2,
            },
        };
        let arbiters: Vec<Arbiter> = (0..arbiters).map(|_| Arbiter::new()).collect();
        let registry = Registry::new(env, arbiters.iter().map(Arbiter::handle).collect());
        Harness {
            registry: Rc::new(registry),
            mem,
            store,
            observer,
            arbiters,
        }
    }

    async fn apply(&self, incoming: &Incoming) -> Result<Outcome, ApplyError> {
        self.registry.apply(Arc::new(incoming.clone())).await
    }

    async fn campaign(&self, id: &str) -> Campaign {
        self.registry
            .campaign(id)
            .await
            .expect("campaign state readable")
            .expect("campaign exists")
    }

    fn restarts(&self) -> usize {
        self.observer.restarted.load(SeqCst)
    }

    fn stop(self) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}

fn campaign_event(id: &str, event: aerostream_actors::CampaignEvent) -> Incoming {
    incoming(id, Event::Campaign(event))
}

fn campaign_key(id: &str) -> AggregateKey {
    AggregateKey {
        kind: AggregateKind::Campaign,
        id: id.into(),
    }
}

const APPLIED: Result<Outcome, ApplyError> = Ok(Outcome::Applied { outputs: 0 });

// ---------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------

/// A redelivered event is skipped without a second outbox entry; a reused idempotency key with other
/// content is rejected as `idempotency_key_reused` and changes nothing.
#[actix_rt::test]
async fn duplicate_is_skipped_and_reused_key_is_rejected() {
    let h = Harness::new(1, 16);
    assert_eq!(
        h.apply(&campaign_event("e-created", created("c-1", 100_000)))
            .await,
        APPLIED
    );

    let first = campaign_event("e-conv", conversion("c-1", 1_000));
    assert_eq!(h.apply(&first).await, Ok(Outcome::Applied { outputs: 1 }));
    assert_eq!(h.apply(&first).await, Ok(Outcome::Duplicate));
    let outbox = h.mem.outbox();
    assert_eq!(outbox.len(), 1, "one commission, committed once: {outbox:?}");
    assert_eq!(outbox[0].causation_id, "e-conv");
    assert_eq!(h.mem.commits.load(SeqCst), 2);

    let before = h.campaign("c-1").await;
    assert_eq!(before.metrics.conversions, 1);
    let reused = campaign_event("e-conv", conversion("c-1", 2_000));
    assert_ne!(reused.content_hash, first.content_hash);
    match h.apply(&reused).await {
        Ok(Outcome::Rejected(rejection)) => {
            assert_eq!(rejection.reason, RejectReason::IdempotencyKeyReused)
        }
        other => panic!("expected idempotency_key_reused, got {other:?}"),
    }
    assert_eq!(h.campaign("c-1").await, before, "the actor's state is unchanged");
    assert_eq!(
        h.mem.campaign("c-1").as_ref(),
        Some(&before),
        "the stored state is unchanged"
    );
    assert_eq!(h.mem.outbox().len(), 1);
    assert_eq!(h.mem.commits.load(SeqCst), 2);
    h.stop();
}

/// When the key is recorded between the actor's `seen` check and its commit (the store answers
/// `AlreadySeen`), the event counts as a duplicate and the actor's in-memory state does not move.
#[actix_rt::test]
async fn key_recorded_during_commit_is_a_duplicate() {
    let h = Harness::new(1, 16);
    assert_eq!(
        h.apply(&campaign_event("e-created", created("c-1", 100_000)))
            .await,
        APPLIED
    );
    let event = campaign_event("e-click", click("c-1"));
    assert_eq!(h.apply(&event).await, APPLIED);

    h.store.blind_seen.store(1, SeqCst);
    assert_eq!(h.apply(&event).await, Ok(Outcome::Duplicate));
    let state = h.campaign("c-1").await;
    assert_eq!((state.metrics.clicks, state.version), (1, 2));
    assert_eq!(h.mem.commits.load(SeqCst), 2);
    h.stop();
}

/// `Registry::crash` restarts the actor exactly once; it then continues from the committed state.
#[actix_rt::test]
async fn crash_restarts_once_and_continues_from_committed_state() {
    let h = Harness::new(1, 16);
    assert_eq!(
        h.apply(&campaign_event("e-created", created("c-1", 100_000)))
            .await,
        APPLIED
    );
    for i in 1..=3 {
        assert_eq!(
            h.apply(&campaign_event(&format!("e-click-{i}"), click("c-1")))
                .await,
            APPLIED
        );
    }
    assert_eq!(h.mem.loads.load(SeqCst), 1, "loaded once, then kept in memory");

    assert!(h.registry.crash(AggregateKind::Campaign, "c-1").await);
    eventually("the restart", || h.restarts() == 1).await;

    for i in 4..=5 {
        assert_eq!(
            h.apply(&campaign_event(&format!("e-click-{i}"), click("c-1")))
                .await,
            APPLIED
        );
    }
    let state = h.campaign("c-1").await;
    assert_eq!(
        state.metrics.clicks, 5,
        "every click counted exactly once across the restart"
    );
    assert_eq!(state.spend_minor, 5 * CLICK_COST);
    assert_eq!(state.version, 6);
    assert_eq!(h.mem.campaign("c-1").as_ref(), Some(&state));
    assert_eq!(
        h.mem.loads.load(SeqCst),
        2,
        "reloaded from the store once after the restart"
    );
    assert_eq!(h.restarts(), 1);
    assert_eq!(
        h.observer.started.load(SeqCst),
        2,
        "started, then started again by the supervisor"
    );
    assert_eq!(h.observer.stopped.load(SeqCst), 1);

    assert!(
        !h.registry
            .crash(AggregateKind::Campaign, "no-such-campaign")
            .await
    );
    assert_eq!(h.restarts(), 1);
    h.stop();
}

/// A panic inside the commit surfaces as `Crashed`, restarts the actor, commits nothing; the same
/// event applied again is applied exactly once.
#[actix_rt::test]
async fn panic_in_commit_restarts_and_the_retry_applies_once() {
    let h = Harness::new(1, 16);
    assert_eq!(
        h.apply(&campaign_event("e-created", created("c-1", 100_000)))
            .await,
        APPLIED
    );

    let event = campaign_event("e-click", click("c-1"));
    h.store.panic_commits.store(1, SeqCst);
    assert_eq!(
        h.apply(&event).await,
        Err(ApplyError::Crashed(campaign_key("c-1")))
    );
    eventually("the restart", || h.restarts() == 1).await;
    assert_eq!(h.mem.commits.load(SeqCst), 1, "nothing was committed");

    assert_eq!(h.apply(&event).await, APPLIED);
    assert_eq!(h.apply(&event).await, Ok(Outcome::Duplicate));
    let state = h.campaign("c-1").await;
    assert_eq!((state.metrics.clicks, state.version), (1, 2));
    assert_eq!(h.mem.campaign("c-1").as_ref(), Some(&state));
    assert_eq!(h.restarts(), 1);
    h.stop();
}

/// A store error surfaces as `Store`, applies nothing and does not restart the actor; a retry works.
#[actix_rt::test]
async fn store_error_applies_nothing_and_the_retry_works() {
    let h = Harness::new(1, 16);
    assert_eq!(
        h.apply(&campaign_event("e-created", created("c-1", 100_000)))
            .await,
        APPLIED
    );

    let event = campaign_event("e-click", click("c-1"));
    h.store.fail_commits.store(1, SeqCst);
    assert!(matches!(h.apply(&event).await, Err(ApplyError::Store(_))));
    let state = h.campaign("c-1").await;
    assert_eq!(
        (state.metrics.clicks, state.version),
        (0, 1),
        "the actor's state did not move"
    );
    assert_eq!(h.mem.campaign("c-1").as_ref(), Some(&state));

    assert_eq!(h.apply(&event).await, APPLIED);
    assert_eq!(h.campaign("c-1").await.metrics.clicks, 1);
    assert_eq!(h.restarts(), 0);
    h.stop();
}

/// While an actor is stuck in a commit, concurrent `Registry::apply` calls do not all get queued in
/// its mailbox.
///
/// The mailbox is not visible from outside, so a probe measures it: `Registry::crash` sends one
/// message straight to the mailbox, where it lands behind every `Apply` already accepted. The
/// observer notes how many commits had happened when the crash restarted the actor: that is the
/// blocked event, the creation, and the applies accepted ahead of the probe.
#[actix_rt::test]
async fn a_busy_actor_accepts_a_bounded_number_of_messages() {
    const CAPACITY: usize = 2;
    const SENDERS: usize = 50;
    let h = Harness::new(1, CAPACITY);
    assert_eq!(
        h.apply(&campaign_event("e-created", created("c-1", 100_000)))
            .await,
        APPLIED
    );

    h.store.gate.close();
    let polled = Rc::new(Cell::new(0));
    let mut applies = Vec::new();
    for i in 0..SENDERS {
        let (registry, polled) = (h.registry.clone(), polled.clone());
        let event = campaign_event(&format!("e-click-{i}"), click("c-1"));
        applies.push(actix_rt::spawn(async move {
            polled.set(polled.get() + 1);
            registry.apply(Arc::new(event)).await
        }));
        if i == 0 {
            // The first click is now inside its commit, holding the actor.
            eventually("the first commit to block", || {
                h.store.gate.held.load(SeqCst) == 1
            })
            .await;
        }
    }
    eventually("every apply to try to send", || polled.get() == SENDERS).await;

    let probe_sent = Rc::new(Cell::new(false));
    let probe = actix_rt::spawn({
        let (registry, probe_sent) = (h.registry.clone(), probe_sent.clone());
        async move {
            probe_sent.set(true);
            registry.crash(AggregateKind::Campaign, "c-1").await
        }
    });
    eventually("the probe to be sent", || probe_sent.get()).await;
    assert_eq!(
        h.store.gate.held.load(SeqCst),
        1,
        "the actor is still stuck in the first commit"
    );

    h.store.gate.open();
    for apply in applies {
        assert_eq!(apply.await.expect("apply task"), APPLIED);
    }
    assert!(probe.await.expect("probe task"));
    eventually("the probe's restart", || h.restarts() == 1).await;

    let commits_at_restart = h.observer.commits_at_restart.lock().unwrap()[0];
    let accepted_ahead = commits_at_restart - 2; // minus the creation and the blocked click
    assert!(
        accepted_ahead <= CAPACITY,
        "{accepted_ahead} of {} waiting applies were accepted into a mailbox of capacity {CAPACITY}",
        SENDERS - 1
    );
    assert_eq!(h.campaign("c-1").await.metrics.clicks, SENDERS as u64);
    h.stop();
}

/// Events for two campaigns on a two-arbiter registry both apply; `active` counts actors per kind.
#[actix_rt::test]
async fn two_campaigns_on_two_arbiters() {
    let h = Harness::new(2, 16);
    let (created_a, created_b) = (
        campaign_event("e-created-a", created("c-a", 100_000)),
        campaign_event("e-created-b", created("c-b", 100_000)),
    );
    let (a, b) = futures::join!(h.apply(&created_a), h.apply(&created_b),);
    assert_eq!((a, b), (APPLIED, APPLIED));
    let clicks: Vec<Incoming> = (0..10)
        .map(|i| {
            let campaign = if i % 2 == 0 { "c-a" } else { "c-b" };
            campaign_event(&format!("e-click-{i}"), click(campaign))
        })
        .collect();
    let outcomes = futures::future::join_all(clicks.iter().map(|c| h.apply(c))).await;
    assert!(outcomes.iter().all(|o| *o == APPLIED), "{outcomes:?}");

    assert_eq!(h.campaign("c-a").await.metrics.clicks, 5);
    assert_eq!(h.campaign("c-b").await.metrics.clicks, 5);
    assert_eq!(h.registry.active(AggregateKind::Campaign), 2);
    assert_eq!(h.registry.active(AggregateKind::Payment), 0);

    let payment = incoming(
        "e-pay",
        Event::Payment(processed("p-1", 1_000, PaymentStatus::Succeeded, 1)),
    );
    assert_eq!(h.apply(&payment).await, Ok(Outcome::Applied { outputs: 1 }));
    assert_eq!(h.registry.active(AggregateKind::Payment), 1);
    assert_eq!(h.registry.active(AggregateKind::Campaign), 2);
    h.stop();
}

/// An actor with nothing in flight is passivated: removed from the registry and stopped for good
/// (its supervisor does not restart it); the next event starts a fresh actor from the stored state.
#[actix_rt::test]
async fn idle_actors_are_passivated_and_come_back_from_the_store() {
    let h = Harness::new(1, 4);
    assert_eq!(
        h.apply(&campaign_event("e-created", created("c-1", 100_000)))
            .await,
        APPLIED
    );
    assert_eq!(h.apply(&campaign_event("e-click-1", click("c-1"))).await, APPLIED);
    assert_eq!(h.registry.active(AggregateKind::Campaign), 1);

    assert_eq!(
        h.registry.passivate_idle(1),
        0,
        "the fixed clock has not moved: not idle yet"
    );
    assert_eq!(h.registry.passivate_idle(0), 1);
    assert_eq!(h.registry.active(AggregateKind::Campaign), 0);
    eventually("the actor to stop", || h.observer.stopped.load(SeqCst) == 1).await;
    assert_eq!(h.restarts(), 0, "a passivated actor is not restarted");

    assert_eq!(h.apply(&campaign_event("e-click-2", click("c-1"))).await, APPLIED);
    assert_eq!(
        h.apply(&campaign_event("e-click-1", click("c-1"))).await,
        Ok(Outcome::Duplicate),
        "the idempotency window outlives the actor"
    );
    let state = h.campaign("c-1").await;
    assert_eq!((state.metrics.clicks, state.version), (2, 3));
    assert_eq!(h.observer.started.load(SeqCst), 2);
    assert_eq!(h.registry.active(AggregateKind::Campaign), 1);
    h.stop();
}

/// The daemon may run `apply` on a multi-threaded runtime: its future must stay `Send`.
#[allow(dead_code)]
fn apply_future_is_send(registry: &Registry, incoming: Incoming) {
    fn is_send<T: Send>(_: T) {}
    is_send(registry.apply(Arc::new(incoming)));
}

/// Where handed-over commits' answers go.
type Answer = futures::channel::oneshot::Sender<Vec<Result<CommitResult, StoreError>>>;

/// Hands commits over and holds them until the test answers them, as a batching store does.
#[derive(Default)]
struct DeferredStore {
    inner: MemStore,
    handed_over: Mutex<Vec<(Vec<OwnedCommit>, Answer)>>,
}

impl DeferredStore {
    fn waiting(&self) -> usize {
        self.handed_over.lock().unwrap().len()
    }

    /// Writes every commit handed over so far and answers each.
    fn answer(&self) {
        for (commits, answer) in self.handed_over.lock().unwrap().drain(..) {
            let _ = answer.send(
                commits
                    .iter()
                    .map(|commit| self.inner.commit(commit.borrow()))
                    .collect(),
            );
        }
    }
}

impl StateStore for DeferredStore {
    fn load(&self, key: &AggregateKey) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.load(key)
    }

    fn seen(&self, idempotency_key: &str) -> Result<Option<SeenEntry>, StoreError> {
        self.inner.seen(idempotency_key)
    }

    fn commit(&self, commit: Commit<'_>) -> Result<CommitResult, StoreError> {
        self.inner.commit(commit)
    }

    fn commit_batched(&self, commits: Vec<OwnedCommit>) -> CommitFuture {
        let (answer, answered) = futures::channel::oneshot::channel();
        self.handed_over.lock().unwrap().push((commits, answer));
        Box::pin(async move { answered.await.expect("the test answers every commit") })
    }
}

/// While an actor waits for its commit, its arbiter serves other actors (their commits can join
/// the same batch), and the actor itself takes its next event only once its commit is answered,
/// so it decides on its committed state.
#[actix_rt::test]
async fn an_actor_waiting_for_its_commit_leaves_its_arbiter_free_and_keeps_its_order() {
    let store = Arc::new(DeferredStore::default());
    let arbiter = Arbiter::new();
    let registry = Registry::new(
        aerostream_actors::testkit::env(store.clone()),
        vec![arbiter.handle()],
    );
    let apply = |incoming: Incoming| registry.apply(Arc::new(incoming));
    let answering = async {
        // c-a's creation and c-b's, on the one arbiter, wait together; c-a's activation waits
        // behind its creation.
        eventually("two commits handed over", || store.waiting() == 2).await;
        store.answer();
        eventually("the activation's commit", || store.waiting() == 1).await;
        store.answer();
    };
    let (created_a, activated_a, created_b, ()) = futures::join!(
        apply(campaign_event("e-created-a", created("c-a", 100_000))),
        apply(campaign_event("e-activated-a", activated("c-a"))),
        apply(campaign_event("e-created-b", created("c-b", 100_000))),
        answering,
    );
    assert_eq!((created_a, activated_a, created_b), (APPLIED, APPLIED, APPLIED));
    assert_eq!(store.inner.campaign("c-a").unwrap().version, 2);
    assert_eq!(store.inner.commits.load(SeqCst), 3);
    arbiter.stop();
}
