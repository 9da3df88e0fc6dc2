//! Campaign actor restart-to-serving benchmark (SPEC §12: p99 < 50 ms with a snapshot): the time
//! from starting a campaign actor to its first answer, when its state must be rebuilt from the
//! newest snapshot plus 0, 1 000 or 100 000 journaled events.
//!
//! ```text
//! cargo bench --bench restore
//! ```
//!
//! The store is the daemon's sled store with the shipped cache size and the changelog on, written
//! by the campaign actor through the committer thread, as the daemon writes it; each measurement
//! starts a fresh registry, so the actor loads from disk (sled's page cache is warm).

mod common;

use actix::Arbiter;
use aerostream::config::Config;
use aerostream::store::SledStore;
use aerostream_actors::events::CommissionRule;
use aerostream_actors::ports::{Clock, NoObserver, SystemClock};
use aerostream_actors::snapshot::SnapshotPolicy;
use aerostream_actors::{ActorEnv, CampaignEvent, Incoming, Money, Outcome, Registry};
use common::{daemon_store, drain_outbox, incoming};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CAMPAIGN: &str = "camp-bench";

/// The actors' environment on `store`, with snapshots every `every_events` (0: only forced ones).
fn env(store: &Arc<SledStore>, clock: &Arc<dyn Clock>, every_events: u64) -> ActorEnv {
    ActorEnv {
        store: store.clone(),
        observer: Arc::new(NoObserver),
        clock: clock.clone(),
        mailbox_capacity: 16,
        snapshots: SnapshotPolicy {
            every_events,
            keep: 2,
        },
    }
}

/// Creates and activates the campaign (a snapshot at version 2, forced by the activation), then
/// journals `replay` events, through the campaign actor in batches of 64 as the daemon applies a
/// receive burst: its commits go through the committer thread, the changelog is on, and the outbox
/// is drained as the publisher does.
async fn prepare(store: &Arc<SledStore>, clock: &Arc<dyn Clock>, replay: u64) {
    // No periodic snapshots: every event after the first snapshot stays in the journal.
    let registry = Registry::new(env(store, clock, 0), vec![Arbiter::current()]);
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
    let events: Vec<Arc<Incoming>> = events
        .into_iter()
        .enumerate()
        .map(|(i, event)| incoming(format!("evt-{i}"), i as i64, event))
        .collect();
    for batch in events.chunks(64) {
        let outcomes = registry.apply_batch(batch.to_vec()).await;
        assert!(
            outcomes.iter().all(|o| matches!(o, Ok(Outcome::Applied { .. }))),
            "{outcomes:?}"
        );
        store.flush().await.expect("flush");
        drain_outbox(store);
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
        let config = Config::load(None).expect("the shipped configuration loads");
        let store = daemon_store(dir.path(), &config, clock.clone());
        let timings = actix_rt::System::new().block_on(async {
            prepare(&store, &clock, replay).await;
            let mut timings = Vec::with_capacity(runs);
            for _ in 0..runs {
                let registry = Registry::new(env(&store, &clock, 100), vec![Arbiter::current()]);
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
