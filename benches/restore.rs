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

use actix::Arbiter;
use aerostream::config::Config;
use aerostream::store::SledStore;
use aerostream_actors::events::CommissionRule;
use aerostream_actors::ports::{Clock, NoObserver, SystemClock};
use aerostream_actors::snapshot::SnapshotPolicy;
use aerostream_actors::{ActorEnv, CampaignEvent, Envelope, Event, Incoming, Money, Outcome, Registry};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CAMPAIGN: &str = "camp-bench";

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

/// Creates and activates the campaign (a snapshot at version 2, forced by the activation), then
/// journals `replay` events, through the campaign actor in batches of 64 as the daemon applies a
/// receive burst: its commits go through the committer thread, the changelog is on, and the outbox
/// is drained as the publisher does.
async fn prepare(store: &Arc<SledStore>, clock: &Arc<dyn Clock>, replay: u64) {
    let env = ActorEnv {
        store: store.clone(),
        observer: Arc::new(NoObserver),
        clock: clock.clone(),
        mailbox_capacity: 16,
        // No periodic snapshots: every event after the first snapshot stays in the journal.
        snapshots: SnapshotPolicy {
            every_events: 0,
            keep: 2,
        },
    };
    let registry = Registry::new(env, vec![Arbiter::current()]);
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
    let incoming: Vec<Arc<Incoming>> = events
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            let envelope = envelope(i as u64);
            Arc::new(Incoming {
                idempotency_key: envelope.id.clone(),
                envelope,
                event: Event::Campaign(event),
                content_hash: hash.clone(),
                delivery: None,
            })
        })
        .collect();
    for batch in incoming.chunks(64) {
        let outcomes = registry.apply_batch(batch.to_vec()).await;
        assert!(
            outcomes.iter().all(|o| matches!(o, Ok(Outcome::Applied { .. }))),
            "{outcomes:?}"
        );
        store.flush().await.expect("flush");
        loop {
            let entries = store.outbox_entries(4_096).expect("outbox readable");
            if entries.is_empty() {
                break;
            }
            let seqs: Vec<_> = entries.into_iter().map(|(seq, _)| seq).collect();
            store.outbox_remove(&seqs).expect("outbox entries deleted");
        }
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
        let store = SledStore::open_with_cache(
            dir.path(),
            config.idempotency.window_seconds,
            config.daemon.cache_mib << 20,
            clock.clone(),
        )
        .expect("store")
        .with_changelog("bench".into());
        let store = Arc::new(store);
        store.start_committer().expect("committer starts");
        let timings = actix_rt::System::new().block_on(async {
            prepare(&store, &clock, replay).await;
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
