//! Idempotency window benchmark (SPEC §12) on the daemon's own write path: events applied per
//! second, lookups per second with latency percentiles (hits and misses apart), disk bytes per
//! live key, the memory of the window's indexes and the time a start takes to open the store, for
//! N live keys.
//!
//! ```text
//! cargo bench --bench idempotency -- [KEYS]        (default 1 000 000)
//! ```
//!
//! What the daemon does, with the shipped `config.toml` (cache, window, snapshots, arbiters): the
//! events are clicks on 1 000 campaigns, applied by the campaign actors in batches of 64 per
//! aggregate (as a receive burst hands them over), 64 aggregates at a time; the actors hand their
//! commits to the committer thread; the changelog is on, and the outbox is drained after each
//! round as the publisher does; each round waits for the flusher, as the acks do. Keys look like
//! the generator's (~30 bytes). Prints one Markdown table.

use actix::Arbiter;
mod common;

use aerostream::config::Config;
use aerostream_actors::events::CommissionRule;
use aerostream_actors::ports::{Clock, NoObserver, SystemClock};
use aerostream_actors::{ActorEnv, CampaignEvent, Money, Outcome, Registry};
use common::{daemon_store, drain_outbox, incoming};
use futures::future::join_all;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CAMPAIGNS: u64 = 1_000;
/// Events of one aggregate in one batch, and aggregates applied at once.
const BATCH: u64 = 64;
const CONCURRENT: u64 = 64;

fn campaign(c: u64) -> String {
    format!("camp-{c:05}")
}

fn key(campaign: u64, n: u64) -> String {
    format!("click_camp-{campaign:05}_{n:012}")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).expect("data directory readable") {
        let entry = entry.expect("data directory readable");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            std::fs::create_dir_all(&target).expect("directory created");
            copy_dir(&entry.path(), &target);
        } else {
            // sled deletes blob files as it writes: one gone since the listing is not copied.
            match std::fs::copy(entry.path(), &target) {
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                copied => {
                    copied.expect("file copied");
                }
            }
        }
    }
}

fn main() {
    let keys: u64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let config = Config::load(None).expect("the shipped configuration loads");
    let dir = tempfile::tempdir().expect("temporary directory");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = daemon_store(dir.path(), &config, clock.clone());

    let system = actix_rt::System::new();
    let (applied, apply_elapsed) = system.block_on(async {
        let arbiters: Vec<Arbiter> = (0..config.actors.arbiters).map(|_| Arbiter::new()).collect();
        let env = ActorEnv {
            store: store.clone(),
            observer: Arc::new(NoObserver),
            clock: clock.clone(),
            mailbox_capacity: config.actors.mailbox_capacity,
            snapshots: config.snapshot.policy(),
        };
        let registry = Registry::new(env, arbiters.iter().map(Arbiter::handle).collect());
        let created = (0..CAMPAIGNS).map(|c| {
            let id = campaign(c);
            registry.apply_batch(vec![
                incoming(
                    format!("create_{id}"),
                    0,
                    CampaignEvent::Created {
                        campaign_id: id.clone(),
                        name: id.clone(),
                        budget: Money::positive(i64::MAX / 4, "USD").unwrap(),
                        cost_per_click_minor: 1,
                        cost_per_conversion_minor: 5,
                        commission: CommissionRule::Percentage { basis_points: 100 },
                    },
                ),
                incoming(
                    format!("activate_{id}"),
                    0,
                    CampaignEvent::Activated { campaign_id: id },
                ),
            ])
        });
        for outcomes in join_all(created).await {
            assert!(outcomes.iter().all(|o| matches!(o, Ok(Outcome::Applied { .. }))));
        }
        store.flush().await.expect("flush");
        drain_outbox(&store);

        let started = Instant::now();
        let mut applied = 0u64;
        let mut round = 0u64;
        while applied < keys {
            let batches = (0..CONCURRENT).map(|i| {
                let c = (round * CONCURRENT + i) % CAMPAIGNS;
                let n0 = round * BATCH;
                let events = (n0..n0 + BATCH)
                    .map(|n| {
                        incoming(
                            key(c, n),
                            0,
                            CampaignEvent::ClickRecorded {
                                campaign_id: campaign(c),
                                affiliate_id: format!("af-{:03}", n % 100),
                            },
                        )
                    })
                    .collect();
                registry.apply_batch(events)
            });
            for outcomes in join_all(batches).await {
                for outcome in outcomes {
                    assert!(matches!(outcome, Ok(Outcome::Applied { .. })), "{outcome:?}");
                    applied += 1;
                }
            }
            store.flush().await.expect("flush");
            drain_outbox(&store);
            round += 1;
        }
        let elapsed = started.elapsed();
        for arbiter in arbiters {
            arbiter.stop();
        }
        (applied, elapsed)
    });

    // Lookups: hits spread over the keys written, plus misses.
    let lookups = 200_000u64;
    let rounds = applied / (CONCURRENT * BATCH);
    let (mut hits, mut misses) = (Vec::with_capacity(lookups as usize), Vec::new());
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let started = Instant::now();
    for n in 0..lookups {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let (round, i, offset) = (rng % rounds, (rng >> 20) % CONCURRENT, (rng >> 40) % BATCH);
        let missing = n % 10 == 0;
        let probe = if missing {
            format!("missing-{n}")
        } else {
            key((round * CONCURRENT + i) % CAMPAIGNS, round * BATCH + offset)
        };
        let t = Instant::now();
        let found = aerostream_actors::ports::StateStore::seen(&*store, &probe).expect("lookup");
        let took = t.elapsed();
        assert_eq!(found.is_some(), !missing, "{probe}");
        if missing { &mut misses } else { &mut hits }.push(took);
    }
    let lookup_elapsed = started.elapsed();
    hits.sort_unstable();
    misses.sort_unstable();

    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(store.flush()).expect("flush");
    let disk = store.disk_bytes().expect("data directory readable");
    let window_disk = store.window_disk_bytes().expect("data directory readable");
    let live = store.window_len() as f64;
    let index = store.window_index_bytes();

    // A start: a copy of the flushed store opened as the daemon opens it (the window's indexes
    // filled from every key it holds).
    let copy = tempfile::tempdir().expect("temporary directory");
    copy_dir(dir.path(), copy.path());
    let started = Instant::now();
    let reopened = daemon_store(copy.path(), &config, clock.clone());
    let open_elapsed = started.elapsed();
    assert!(
        aerostream_actors::ports::StateStore::seen(&*reopened, &key(0, 0))
            .expect("lookup")
            .is_some(),
        "the reopened store sees the first key"
    );

    println!("| idempotency window on the daemon's path, {applied} keys | value |");
    println!("| --- | --- |");
    println!(
        "| events applied/s (clicks on {CAMPAIGNS} campaigns, batches of {BATCH}, {CONCURRENT} aggregates at once, changelog on) | {:.0} |",
        applied as f64 / apply_elapsed.as_secs_f64()
    );
    println!(
        "| lookups/s (90 % hits, 10 % misses) | {:.0} |",
        lookups as f64 / lookup_elapsed.as_secs_f64()
    );
    for (what, latencies) in [("hit", &hits), ("miss", &misses)] {
        println!(
            "| lookup p50 / p99 / p999, {what} | {:.1} µs / {:.1} µs / {:.1} µs |",
            percentile(latencies, 0.50).as_secs_f64() * 1e6,
            percentile(latencies, 0.99).as_secs_f64() * 1e6,
            percentile(latencies, 0.999).as_secs_f64() * 1e6
        );
    }
    println!(
        "| window indexes in memory | {:.1} MiB ({:.1} bytes per key) |",
        index as f64 / (1024.0 * 1024.0),
        index as f64 / live
    );
    println!(
        "| start: store open, the window's indexes filled from every key | {:.2} s |",
        open_elapsed.as_secs_f64()
    );
    println!(
        "| data directory (blocks allocated) | {:.1} MiB |",
        disk as f64 / (1024.0 * 1024.0)
    );
    println!(
        "| of which the window's own database (`window/`) | {:.1} MiB ({:.0} bytes per key) |",
        window_disk as f64 / (1024.0 * 1024.0),
        window_disk as f64 / live
    );
    println!(
        "| disk bytes per live key (everything the daemon keeps included) | {:.0} |",
        disk as f64 / live
    );
    println!(
        "| key length | {} bytes (stored as a 16-byte digest) |",
        key(0, 0).len()
    );
}
