//! Exactly-once under SIGKILL (SPEC §5, §9): a generated stream with duplicates, reordering and
//! reused idempotency keys flows while the daemon is killed and restarted. Afterwards the served
//! state equals the expected state, every expected output event was published (at least once,
//! nothing else), and every reused key is in the dead-letter topic.
//!
//! The long version of this run is `scripts/chaos`.

mod support;

use aerostream::codec::Codec;
use aerostream::config::Config;
use aerostream::generator::{self, Options};
use aerostream::produce;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::time::Duration;
use support::daemon::{self, wait_for, Daemon};
use support::state::wait_for_state;
use support::topic::{collect_outputs, TopicReader};
use support::{free_port, LocalBroker};

/// Chaos parameters: environment overrides let `scripts/chaos` run the long version.
struct Chaos {
    seed: u64,
    events: usize,
    campaigns: usize,
    payments: usize,
    kills: usize,
    rate: u32,
}

impl Chaos {
    fn from_env() -> Chaos {
        let var = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Chaos {
            seed: var("AEROSTREAM_CHAOS_SEED", 31),
            events: var("AEROSTREAM_CHAOS_EVENTS", 20_000) as usize,
            campaigns: var("AEROSTREAM_CHAOS_CAMPAIGNS", 40) as usize,
            payments: var("AEROSTREAM_CHAOS_PAYMENTS", 1_500) as usize,
            kills: var("AEROSTREAM_CHAOS_KILLS", 2) as usize,
            rate: var("AEROSTREAM_CHAOS_RATE", 1_500) as u32,
        }
    }
}

fn all_applied(daemon: &Daemon) -> f64 {
    daemon
        .metric("aerostream_events_applied_total", &[])
        .unwrap_or(0.0)
}

#[test]
fn sigkill_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let chaos = Chaos::from_env();
    let started = std::time::Instant::now();
    let broker = LocalBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let config_path = daemon::write_config(dir.path(), &broker.url(), port, "").unwrap();
    let config = Config::load(Some(&config_path)).unwrap();
    let plan = generator::plan(&Options {
        seed: chaos.seed,
        campaigns: chaos.campaigns,
        payments: chaos.payments,
        events: chaos.events,
        duplicate_fraction: 0.12,
        reorder_window: 8,
        conflict_fraction: 0.05,
        ..Options::for_daemon(&config)
    });
    let duplicates = plan.stream.len() - plan.distinct;
    assert!(duplicates * 10 >= plan.distinct, "at least 10 % duplicates");
    assert!(!plan.conflicts.is_empty());

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime
        .block_on(pulsar::Pulsar::builder(broker.url(), pulsar::TokioExecutor).build())
        .unwrap();
    // Readers subscribe before any traffic, so they see every message.
    let topic = |name: &str| config.broker.topic(name);
    let output_topics = [
        &config.outputs.payments_topic,
        &config.outputs.commissions_topic,
        &config.outputs.alerts_topic,
    ];
    let mut outputs: Vec<TopicReader> = output_topics
        .iter()
        .map(|name| {
            runtime
                .block_on(TopicReader::subscribe(&client, &topic(name)))
                .unwrap()
        })
        .collect();
    let mut dead_letters = runtime
        .block_on(TopicReader::subscribe(
            &client,
            &topic(&config.inputs["payments"].dead_letter_topic),
        ))
        .unwrap();

    let mut daemon = Daemon::start(&config_path, port).unwrap();
    daemon.wait_healthy(Duration::from_secs(30)).unwrap();

    // The stream flows at a bounded rate while the daemon is killed at seeded random points.
    let publisher = {
        let (config, events) = (config.clone(), plan.stream.clone());
        runtime.spawn(async move { produce::publish(&config, &Codec::shipped(), &events, chaos.rate).await })
    };
    let mut rng = ChaCha8Rng::seed_from_u64(chaos.seed);
    let per_life = plan.distinct as f64 / (chaos.kills + 1) as f64;
    for kill in 1..=chaos.kills {
        let at = rng.gen_range(0.2..0.6) * per_life;
        wait_for("the kill point", Duration::from_secs(120), || {
            (all_applied(&daemon) >= at).then_some(())
        })
        .unwrap();
        daemon.kill().unwrap();
        println!("kill {kill}: SIGKILL after {at:.0} events applied by this run");
        assert!(!publisher.is_finished(), "kill {kill} must come mid-stream");
        daemon = Daemon::start(&config_path, port).unwrap();
    }
    runtime.block_on(publisher).unwrap().unwrap();
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(300));

    // Reused keys arrive once their originals are applied: each must be dead-lettered and must
    // change nothing.
    runtime
        .block_on(produce::publish(&config, &Codec::shipped(), &plan.conflicts, 0))
        .unwrap();
    let conflict_ids: BTreeSet<String> = plan.conflicts.iter().map(|c| c.envelope.id.clone()).collect();
    runtime
        .block_on(dead_letters.collect_until(Duration::from_secs(120), |received| {
            ids_with_reason(received, "idempotency_key_reused").is_superset(&conflict_ids)
        }))
        .unwrap();
    assert_eq!(
        ids_with_reason(&dead_letters.received, "idempotency_key_reused"),
        conflict_ids,
        "exactly the reused keys are conflicts"
    );
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(30));

    // Every expected output event was published, at least once, and nothing else.
    let published = collect_outputs(&runtime, &mut outputs, &plan.expected_outputs);
    assert_eq!(published.distinct, plan.expected_outputs, "output event ids");
    let rows = [
        ("distinct events", plan.distinct.to_string()),
        ("duplicate messages", duplicates.to_string()),
        ("reused keys (conflicts)", plan.conflicts.len().to_string()),
        ("SIGKILLs of the daemon", chaos.kills.to_string()),
        ("served state", "exact".to_owned()),
        (
            "output events expected = published",
            published.distinct.len().to_string(),
        ),
        (
            "output copies re-published (same id)",
            (published.copies - published.distinct.len()).to_string(),
        ),
        ("conflicts dead-lettered", conflict_ids.len().to_string()),
        ("elapsed", format!("{:.1} s", started.elapsed().as_secs_f64())),
    ];
    println!("\n| chaos run (seed {}) | result |\n| --- | --- |", chaos.seed);
    for (figure, value) in rows {
        println!("| {figure} | {value} |");
    }
}

fn ids_with_reason(received: &[support::topic::Received], reason: &str) -> BTreeSet<String> {
    received
        .iter()
        .filter(|m| m.property("reason") == Some(reason))
        .filter_map(|m| m.property("ce_id").map(str::to_owned))
        .collect()
}
