//! Campaign actor restart-to-serving benchmark (SPEC §12: p99 < 50 ms with a snapshot): the time
//! from starting a campaign actor to its first answer, when its state must be rebuilt from the
//! newest snapshot plus 0, 1 000 or 100 000 journaled events.
//!
//! ```text
//! cargo bench --bench restore
//! ```
//!
//! The store is the daemon's sled store, written through the same commit path; each measurement
//! starts a fresh registry, so the actor loads from disk (sled's page cache is warm).

use actix::Arbiter;
use aerostream::store::SledStore;
use aerostream_actors::events::{AggregateKey, AggregateKind, CommissionRule};
use aerostream_actors::ports::{Clock, Commit, NoObserver, StateStore, SystemClock};
use aerostream_actors::snapshot::{Snapshot, SnapshotPolicy};
use aerostream_actors::{ActorEnv, Aggregate, Campaign, CampaignEvent, Envelope, Money, Registry};
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CAMPAIGN: &str = "camp-bench";

#[derive(Serialize)]
struct Entry<'a> {
    envelope: &'a Envelope,
    event: &'a CampaignEvent,
}

fn envelope(i: u64) -> Envelope {
    Envelope {
        id: format!("evt-{i}"),
        event_type: "bench".into(),
        source: "bench".into(),
        time_ms: i as i64,
        subject: None,
        correlation_id: None,
        causation_id: None,
        schema_version: "v1".into(),
    }
}

/// Creates and activates the campaign (snapshot at version 2), then journals `replay` events.
fn prepare(store: &SledStore, replay: u64) {
    let key = AggregateKey {
        kind: AggregateKind::Campaign,
        id: CAMPAIGN.into(),
    };
    let mut events = vec![
        CampaignEvent::Created {
            campaign_id: CAMPAIGN.into(),
            name: "bench".into(),
            budget: Money::positive(i64::MAX / 2, "USD").unwrap(),
            cost_per_click_minor: 1,
            cost_per_conversion_minor: 5,
            commission: CommissionRule::Percentage { basis_points: 100 },
        },
        CampaignEvent::Activated {
            campaign_id: CAMPAIGN.into(),
        },
    ];
    events.extend((0..replay).map(|i| match i % 3 {
        0 => CampaignEvent::ClickRecorded {
            campaign_id: CAMPAIGN.into(),
            affiliate_id: format!("af-{}", i % 50),
        },
        _ => CampaignEvent::ImpressionRecorded {
            campaign_id: CAMPAIGN.into(),
            affiliate_id: format!("af-{}", i % 50),
        },
    }));
    let hash = hex::encode([0u8; 32]);
    let mut state: Option<Campaign> = None;
    for (i, event) in events.iter().enumerate() {
        let envelope = envelope(i as u64);
        let decision = Campaign::decide(state.as_ref(), event, &envelope).expect("bench events apply");
        let version = decision.state.version();
        let bytes = serde_json::to_vec(&decision.state).unwrap();
        let journal = serde_json::to_vec(&Entry {
            envelope: &envelope,
            event,
        })
        .unwrap();
        let snapshot = (version == 2).then(|| serde_json::to_vec(&Snapshot::of(&decision.state)).unwrap());
        store
            .commit(Commit {
                journal: Some((version, &journal)),
                snapshot: snapshot.as_deref().map(|s| (version, s)),
                ..Commit::of(&key, &bytes, version, &envelope.id, &hash, SystemClock.now_ms())
            })
            .expect("commit");
        state = Some(decision.state);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    println!("| events replayed after the snapshot | restore p50 | restore p99 | runs |");
    println!("| --- | --- | --- | --- |");
    for (replay, runs) in [(0u64, 200usize), (1_000, 100), (100_000, 5)] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store = Arc::new(SledStore::open(dir.path(), 3_600, clock.clone()).expect("store"));
        prepare(&store, replay);
        let timings = actix_rt::System::new().block_on(async {
            let mut timings = Vec::with_capacity(runs);
            for _ in 0..runs {
                let env = ActorEnv {
                    store: store.clone(),
                    observer: Arc::new(NoObserver),
                    clock: clock.clone(),
                    mailbox_capacity: 16,
                    snapshots: SnapshotPolicy {
                        every_events: 100,
                        keep: 2,
                    },
                };
                let registry = Registry::new(env, vec![Arbiter::current()]);
                let started = Instant::now();
                let campaign = registry
                    .campaign(CAMPAIGN)
                    .await
                    .expect("restored")
                    .expect("exists");
                timings.push(started.elapsed());
                assert_eq!(campaign.version, 2 + replay);
            }
            timings
        });
        let mut sorted = timings;
        sorted.sort_unstable();
        println!(
            "| {replay} | {:.2} ms | {:.2} ms | {runs} |",
            percentile(&sorted, 0.5).as_secs_f64() * 1e3,
            percentile(&sorted, 0.99).as_secs_f64() * 1e3,
        );
    }
}
