//! An actor takes a batch of its aggregate's events in one message: duplicates and rejections are
//! answered where they stand, the applied events are folded into as few commits as snapshots
//! allow, and a refused commit sends its events (and the ones after it) back to be retried.

mod common;

use actix::Arbiter;
use aerostream_actors::ports::{Commit, CommitResult, SeenEntry, StateStore, StoreError};
use aerostream_actors::snapshot::SnapshotPolicy;
use aerostream_actors::testkit::MemoryStore;
use aerostream_actors::{AggregateKey, ApplyError, Event, Incoming, Outcome, Registry, RejectReason};
use common::*;
use std::sync::{Arc, Mutex};

/// A memory store that records what each commit carried: (first version, last version, snapshot).
#[derive(Default)]
struct Recording {
    inner: MemoryStore,
    commits: Mutex<Vec<(u64, u64, bool)>>,
    /// Refuse the next commit as stale (as when a changelog import moved the state).
    refuse_next: Mutex<bool>,
}

impl StateStore for Recording {
    fn load(&self, key: &AggregateKey) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.load(key)
    }

    fn seen(&self, key: &str) -> Result<Option<SeenEntry>, StoreError> {
        self.inner.seen(key)
    }

    fn commit(&self, commit: Commit<'_>) -> Result<CommitResult, StoreError> {
        if std::mem::take(&mut *self.refuse_next.lock().unwrap()) {
            return Ok(CommitResult::Stale);
        }
        let first = commit.events().next().expect("a commit applies an event").version;
        self.commits
            .lock()
            .unwrap()
            .push((first, commit.version, commit.snapshot.is_some()));
        self.inner.commit(commit)
    }
}

fn registry(store: Arc<Recording>, every_events: u64) -> (Registry, Arbiter) {
    let arbiter = Arbiter::new();
    let mut env = aerostream_actors::testkit::env(store);
    env.snapshots = SnapshotPolicy {
        every_events,
        keep: 2,
    };
    (Registry::new(env, vec![arbiter.handle()]), arbiter)
}

fn batch(events: Vec<Incoming>) -> Vec<Arc<Incoming>> {
    events.into_iter().map(Arc::new).collect()
}

fn campaign_event(id: &str, event: aerostream_actors::CampaignEvent) -> Incoming {
    incoming(id, Event::Campaign(event))
}

#[actix_rt::test]
async fn a_batch_is_one_commit_with_duplicates_and_rejections_answered_in_place() {
    let store = Arc::new(Recording::default());
    let (registry, arbiter) = registry(store.clone(), 100);
    let outcomes = registry
        .apply_batch(batch(vec![
            campaign_event("e1", created("c-1", 100_000)),
            campaign_event("e1", created("c-1", 100_000)),
            // Another creation of the same campaign is refused by the domain.
            campaign_event("e2", created("c-1", 5_000)),
            campaign_event("e3", activated("c-1")),
            campaign_event("e4", click("c-1")),
        ]))
        .await;
    let rejected = |outcome: &Result<Outcome, ApplyError>| matches!(outcome, Ok(Outcome::Rejected(r)) if r.reason == RejectReason::CampaignExists);
    assert_eq!(outcomes[0], Ok(Outcome::Applied { outputs: 0 }));
    assert_eq!(
        outcomes[1],
        Ok(Outcome::Duplicate),
        "the same key again in the batch"
    );
    assert!(rejected(&outcomes[2]), "{:?}", outcomes[2]);
    assert!(matches!(outcomes[3], Ok(Outcome::Applied { .. })));
    assert!(matches!(outcomes[4], Ok(Outcome::Applied { .. })));
    assert_eq!(
        *store.commits.lock().unwrap(),
        vec![(1, 3, false)],
        "one commit, versions 1 to 3"
    );
    let campaign = store.inner.campaign("c-1").unwrap();
    assert_eq!((campaign.version, campaign.metrics.clicks), (3, 1));
    for key in ["e1", "e3", "e4"] {
        assert!(store.inner.seen(key).unwrap().is_some(), "{key} recorded");
    }
    assert!(
        store.inner.seen("e2").unwrap().is_none(),
        "a rejection records nothing"
    );
    arbiter.stop();
}

#[actix_rt::test]
async fn a_snapshot_ends_a_commit_so_it_is_written_at_its_own_version() {
    let store = Arc::new(Recording::default());
    let (registry, arbiter) = registry(store.clone(), 2);
    let mut events = vec![
        campaign_event("e1", created("c-1", 100_000)),
        campaign_event("e2", activated("c-1")),
    ];
    events.extend((3..=6).map(|i| campaign_event(&format!("e{i}"), click("c-1"))));
    let outcomes = registry.apply_batch(batch(events)).await;
    assert!(
        outcomes.iter().all(|o| matches!(o, Ok(Outcome::Applied { .. }))),
        "{outcomes:?}"
    );
    assert_eq!(
        *store.commits.lock().unwrap(),
        vec![(1, 2, true), (3, 4, true), (5, 6, true)]
    );
    arbiter.stop();
}

#[actix_rt::test]
async fn a_refused_commit_sends_its_events_back_and_the_retry_applies_them_once() {
    let store = Arc::new(Recording::default());
    let (registry, arbiter) = registry(store.clone(), 100);
    let first = registry
        .apply_batch(batch(vec![campaign_event("e1", created("c-1", 100_000))]))
        .await;
    assert_eq!(first, vec![Ok(Outcome::Applied { outputs: 0 })]);
    *store.refuse_next.lock().unwrap() = true;
    let events = batch(vec![
        campaign_event("e2", activated("c-1")),
        campaign_event("e3", click("c-1")),
    ]);
    let refused = registry.apply_batch(events.clone()).await;
    assert!(
        refused.iter().all(|o| matches!(o, Err(ApplyError::Stale(_)))),
        "{refused:?}"
    );
    let retried = registry.apply_batch(events).await;
    assert!(
        retried.iter().all(|o| matches!(o, Ok(Outcome::Applied { .. }))),
        "{retried:?}"
    );
    let campaign = store.inner.campaign("c-1").unwrap();
    assert_eq!((campaign.version, campaign.metrics.clicks), (3, 1));
    arbiter.stop();
}
