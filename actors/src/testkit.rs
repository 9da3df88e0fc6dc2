//! Builders shared by the crate's unit and property tests.

use crate::actor::ActorEnv;
use crate::aggregate::Aggregate;
use crate::campaign::Campaign;
use crate::events::{AggregateKey, AggregateKind};
use crate::events::{CampaignEvent, CommissionRule, Envelope};
use crate::money::Money;
use crate::output::OutputEvent;
use crate::ports::{Clock, Commit, CommitResult, NoObserver, SeenEntry, StateStore, StoreError};
use crate::readmodel::ReadModel;
use crate::snapshot::SnapshotPolicy;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

pub fn usd(amount_minor: i64) -> Money {
    Money::positive(amount_minor, "USD").expect("valid test money")
}

pub fn envelope_at(id: &str, time_ms: i64) -> Envelope {
    Envelope {
        id: id.into(),
        event_type: "test".into(),
        source: "test".into(),
        time_ms,
        subject: None,
        correlation_id: None,
        causation_id: None,
        schema_version: "v1".into(),
    }
}

pub fn envelope(id: &str) -> Envelope {
    envelope_at(id, 0)
}

/// A campaign with the given budget (USD), 100 per click, 500 per conversion, 10 % commission.
pub fn campaign_created(id: &str, budget_minor: i64) -> CampaignEvent {
    CampaignEvent::Created {
        campaign_id: id.into(),
        name: format!("campaign {id}"),
        budget: usd(budget_minor),
        cost_per_click_minor: 100,
        cost_per_conversion_minor: 500,
        commission: CommissionRule::Percentage { basis_points: 1_000 },
    }
}

/// Applies `events` in order, each with its own envelope id, panicking on a rejection.
pub fn run(events: &[CampaignEvent]) -> (Option<Campaign>, Vec<OutputEvent>) {
    let mut state: Option<Campaign> = None;
    let mut outputs = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let d = Campaign::decide(state.as_ref(), event, &envelope(&format!("e{i}")))
            .unwrap_or_else(|r| panic!("event {i} rejected: {r}"));
        outputs.extend(d.outputs);
        state = Some(d.state);
    }
    (state, outputs)
}

#[derive(Default)]
pub struct MemoryData {
    pub states: HashMap<AggregateKey, Vec<u8>>,
    pub window: HashMap<String, SeenEntry>,
    pub outbox: Vec<OutputEvent>,
    pub read_model: ReadModel,
}

/// An in-memory state store: everything behind one mutex, so a commit is atomic.
#[derive(Default)]
pub struct MemoryStore {
    pub data: Mutex<MemoryData>,
    /// Successful commits, shareable with an observer to see where in a stream a restart happened.
    pub commits: Arc<AtomicUsize>,
    pub loads: AtomicUsize,
}

impl MemoryStore {
    pub fn state<A: DeserializeOwned>(&self, kind: AggregateKind, id: &str) -> Option<A> {
        let key = AggregateKey { kind, id: id.into() };
        let data = self.data.lock().unwrap();
        data.states
            .get(&key)
            .map(|bytes| serde_json::from_slice(bytes).expect("stored state is valid JSON"))
    }

    pub fn campaign(&self, id: &str) -> Option<Campaign> {
        self.state(AggregateKind::Campaign, id)
    }

    pub fn outbox(&self) -> Vec<OutputEvent> {
        self.data.lock().unwrap().outbox.clone()
    }
}

impl StateStore for MemoryStore {
    fn load(&self, key: &AggregateKey) -> Result<Option<Vec<u8>>, StoreError> {
        self.loads.fetch_add(1, SeqCst);
        Ok(self.data.lock().unwrap().states.get(key).cloned())
    }

    fn seen(&self, idempotency_key: &str) -> Result<Option<SeenEntry>, StoreError> {
        Ok(self.data.lock().unwrap().window.get(idempotency_key).cloned())
    }

    fn commit(&self, commit: Commit<'_>) -> Result<CommitResult, StoreError> {
        let mut data = self.data.lock().unwrap();
        for event in commit.events() {
            if let Some(seen) = data.window.get(event.idempotency_key) {
                return Ok(CommitResult::AlreadySeen(seen.clone()));
            }
        }
        data.states
            .insert(commit.aggregate.clone(), commit.state.to_vec());
        for event in commit.events() {
            data.window.insert(
                event.idempotency_key.to_owned(),
                SeenEntry {
                    content_hash: event.content_hash.to_owned(),
                    first_seen_ms: event.seen_at_ms,
                    delivery: event.delivery,
                },
            );
            data.outbox.extend_from_slice(event.outputs);
        }
        data.read_model.apply(commit.read_model);
        self.commits.fetch_add(1, SeqCst);
        Ok(CommitResult::Committed)
    }

    fn read_model(&self) -> Result<ReadModel, StoreError> {
        Ok(self.data.lock().unwrap().read_model.clone())
    }
}

/// A clock stopped at 1 000 ms.
pub struct FixedClock;
impl Clock for FixedClock {
    fn now_ms(&self) -> i64 {
        1_000
    }
}

/// An actor environment over `store`, observing nothing, with a fixed clock.
pub fn env(store: Arc<dyn StateStore>) -> ActorEnv {
    ActorEnv {
        store,
        observer: Arc::new(NoObserver),
        clock: Arc::new(FixedClock),
        mailbox_capacity: 16,
        snapshots: SnapshotPolicy {
            every_events: 100,
            keep: 2,
        },
    }
}
