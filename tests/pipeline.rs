//! End to end against the real broker: generated traffic with duplicates and reordering must
//! produce exactly the generator's expected state; a backlog is consumed with bounded memory; a
//! SIGTERM mid-stream exits cleanly and a restart applies the rest exactly.

mod support;

use std::time::{Duration, Instant};
use support::daemon::{self, wait_for};
use support::state::{read_expected, wait_for_state};
use support::Harness;

/// "published N messages (D distinct events) ...": (N, D).
fn produced_counts(stdout: &str) -> (f64, f64) {
    let words: Vec<&str> = stdout.split_whitespace().collect();
    let number = |i: usize| {
        words
            .get(i)
            .and_then(|w| w.trim_start_matches('(').parse().ok())
            .expect("produce reports its counts")
    };
    (number(1), number(3))
}

/// Payments on Key_Shared, the subscription that spreads them over daemons by key on Apache
/// Pulsar, end to end with no consumer churn (pulsar-lite's Key_Shared dispatcher stalls only when
/// a consumer leaves mid-backlog: README, "Known limitation of the local broker"); every other
/// test runs the shipped subscriptions (payments on Failover). With group commit on
/// (`daemon.min_commit_interval_ms`, off by default), so that commits of different aggregates and
/// inputs wait for and share transactions.
#[test]
fn generated_stream_with_duplicates_and_reordering_gives_the_exact_expected_state() {
    let harness = Harness::new()
        .daemon_key("min_commit_interval_ms = 5")
        .extra("[inputs.payments]\nsubscription_type = \"key_shared\"\n")
        .build();
    assert_eq!(
        harness.config().inputs["payments"].subscription_type,
        aerostream::config::SubscriptionKind::KeyShared,
        "payments on Key_Shared"
    );
    assert_eq!(
        harness.config().daemon.min_commit_interval_ms,
        5,
        "group commit on"
    );
    let config = harness.config_path();
    let daemon = harness.start();

    let expected_path = harness.dir().join("expected.json");
    let started = Instant::now();
    let stdout = daemon::produce(
        config,
        &[
            "--seed",
            "11",
            "--campaigns",
            "50",
            "--payments",
            "500",
            "--events",
            "10000",
            "--duplicates",
            "0.05",
            "--reorder-window",
            "8",
            "--expected-out",
            expected_path.to_str().unwrap(),
        ],
    )
    .unwrap();
    let (published, distinct) = produced_counts(&stdout);
    assert!(published >= distinct * 1.04, "5 % duplicates: {stdout}");
    let expected = read_expected(&expected_path);
    assert_eq!(expected.campaigns.len(), 50);
    assert_eq!(expected.payments.len(), 500);
    wait_for_state(&daemon, &expected, Duration::from_secs(180));
    let elapsed = started.elapsed();
    println!(
        "applied {distinct} events ({published} messages) in {:.1}s: {:.0} events/s end to end",
        elapsed.as_secs_f64(),
        distinct / elapsed.as_secs_f64()
    );

    // Every distinct event applied once; every duplicate (and broker redelivery) skipped.
    daemon
        .wait_metric("aerostream_events_applied_total", &[], distinct)
        .unwrap();
    wait_for("every duplicate skipped", Duration::from_secs(30), || {
        let deduplicated = daemon.metric("aerostream_events_deduplicated_total", &[]).ok()?;
        (deduplicated >= published - distinct).then_some(())
    })
    .unwrap();
    assert_eq!(
        daemon
            .metric("aerostream_events_dead_lettered_total", &[])
            .unwrap(),
        0.0
    );
}

/// Peak RSS allowed while 50 000 events wait in the backlog. It follows the messages held at once,
/// not the backlog: measured (debug build) 107 MiB with `max_in_flight = 512`, 117 MiB with 1 024,
/// 145 to 162 MiB with the shipped 4 096, 165 MiB once each partition consumer's receive queue
/// went from 1 024 to 4 096 (`ingest::receive_queue`).
const BACKLOG_RSS_BOUND_BYTES: u64 = 200 * 1024 * 1024;

#[test]
fn backlog_is_consumed_in_bounded_memory_and_sigterm_mid_stream_loses_nothing() {
    let harness = Harness::started();
    let config = harness.config_path();
    let expected_path = harness.dir().join("expected.json");

    // Subscribe first (so the backlog is retained for the subscription), then stop the daemon.
    let mut first = harness.start();
    assert!(first.terminate(Duration::from_secs(30)).unwrap().success());

    let stdout = daemon::produce(
        config,
        &[
            "--seed",
            "23",
            "--campaigns",
            "200",
            "--payments",
            "2000",
            "--events",
            "50000",
            "--duplicates",
            "0.02",
            "--reorder-window",
            "4",
            "--expected-out",
            expected_path.to_str().unwrap(),
        ],
    )
    .unwrap();
    let (published, distinct) = produced_counts(&stdout);

    let mut second = harness.spawn();
    wait_for("consumption to be under way", Duration::from_secs(120), || {
        (second.metric("aerostream_events_applied_total", &[]).ok()? > 5_000.0).then_some(())
    })
    .unwrap();
    let peak = second.peak_rss_bytes().unwrap();
    let applied = second.metric("aerostream_events_applied_total", &[]).unwrap();
    assert!(
        applied < distinct,
        "SIGTERM must come mid-stream: {applied} of {distinct} applied"
    );
    let status = second.terminate(Duration::from_secs(60)).unwrap();
    assert!(
        status.success(),
        "SIGTERM exits 0: {status:?}\n{}",
        second.log_tail()
    );

    let third = harness.spawn();
    let expected = read_expected(&expected_path);
    wait_for_state(&third, &expected, Duration::from_secs(300));
    let peak = peak.max(third.peak_rss_bytes().unwrap());
    println!("published {published} messages ({distinct} distinct events); peak RSS while draining the backlog: {} MiB", peak / (1024 * 1024));
    assert!(peak < BACKLOG_RSS_BOUND_BYTES, "peak RSS {peak} bytes");
}
