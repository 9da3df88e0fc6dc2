//! Crash-restart liveness (issue: a restarted daemon that withdrew unpublished commits stalled for
//! good while /health said 200). One daemon on partitioned topics is SIGKILLed again and again
//! mid-stream, right after it has applied a few events, so that most restarts find commits the
//! changelog never received and withdraw them. After every restart the daemon must settle them
//! and apply again; at the end the served state is exact and every output was published.

mod support;

use aerostream::codec::Codec;
use aerostream::config::Config;
use aerostream::generator::{self, Options, Plan};
use aerostream::produce;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;
use support::daemon::{wait_for, Daemon};
use support::state::wait_for_state;
use support::topic::collect_outputs;
use support::Harness;

fn applied(daemon: &Daemon) -> f64 {
    daemon
        .metric("aerostream_events_applied_total", &[])
        .unwrap_or(0.0)
}

/// Messages that ended in an outcome other than `redelivered` (the broker's copies): each of a
/// stream's events once it is handled, whether applied, a duplicate, rejected or dead-lettered.
fn handled(daemon: &Daemon) -> f64 {
    ["applied", "deduplicated", "rejected", "dead_lettered"]
        .iter()
        .map(|outcome| {
            daemon
                .metric(&format!("aerostream_events_{outcome}_total"), &[])
                .unwrap_or(0.0)
        })
        .sum()
}

/// Waits until `daemon` has handled `count` messages (see [`handled`]).
fn wait_handled(daemon: &Daemon, what: &str, count: usize, timeout: Duration) {
    wait_for(what, timeout, || (handled(daemon) >= count as f64).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
}

/// A stream with 10 % duplicates and reordering within 4 events.
fn plan(config: &Config, seed: u64, campaigns: usize, payments: usize, events: usize) -> Plan {
    generator::plan(&Options {
        seed,
        campaigns,
        payments,
        events,
        duplicate_fraction: 0.1,
        reorder_window: 4,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    })
}

/// Publishes `plan`'s stream at 1 000 messages/s in the background.
fn publish(
    runtime: &tokio::runtime::Runtime,
    config: &Config,
    plan: &Plan,
) -> tokio::task::JoinHandle<Result<(), produce::ProduceError>> {
    publish_events(runtime, config, &plan.stream)
}

/// Publishes `events` at 1 000 events/s in the background.
fn publish_events(
    runtime: &tokio::runtime::Runtime,
    config: &Config,
    events: &[generator::Planned],
) -> tokio::task::JoinHandle<Result<(), produce::ProduceError>> {
    let (config, events) = (config.clone(), events.to_vec());
    runtime.spawn(async move { produce::publish(&config, &Codec::shipped(), &events, 1_000).await })
}

#[test]
fn every_restart_after_withdrawals_settles_and_applies_again() {
    let kills: usize = std::env::var("AEROSTREAM_RESTART_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let harness = Harness::new().partitions(2).admin_token("t").chaos(true).build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let plan = plan(config, 5, 20, 600, 4_000 + 1_200 * kills);
    let mut outputs = harness.output_readers();

    let mut daemon = harness.start();
    let publisher = publish(runtime, config, &plan);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut withdrawing_restarts = 0;
    let mut killed = 0;
    for kill in 1..=kills {
        if rng.gen_bool(0.5) {
            // Killed at a random moment of its start: maybe while it settles withdrawn commits.
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..2_500)));
        } else {
            // A restarted daemon must apply again: a stall here is the failure this test is for.
            // Once the whole stream is published, what is left may be fewer events than that:
            // the final state check below then decides whether this daemon applies the rest.
            let at = applied(&daemon) + rng.gen_range(20.0..300.0);
            wait_for("the restarted daemon to apply", Duration::from_secs(60), || {
                (applied(&daemon) >= at || publisher.is_finished()).then_some(())
            })
            .unwrap_or_else(|e| panic!("life {kill}: {e}\n{}", daemon.log_tail()));
            if publisher.is_finished() {
                break;
            }
            for _ in 0..2 {
                let id = format!("camp-{:05}", rng.gen_range(0..20));
                let _ = daemon.post(
                    "/admin/chaos/kill-actor",
                    Some("t"),
                    &serde_json::json!({ "kind": "campaign", "id": id }),
                );
            }
            let log = daemon.log_text();
            if log.contains("Withdrew commits") {
                withdrawing_restarts += 1;
                assert!(
                    log.contains("Withdrawn commits settled"),
                    "life {kill}: withdrawn commits never settled\n{}",
                    daemon.log_tail()
                );
            }
        }
        if publisher.is_finished() {
            break;
        }
        daemon.kill().unwrap();
        killed += 1;
        daemon = harness.spawn();
    }
    runtime.block_on(publisher).unwrap().unwrap();
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
    let published = collect_outputs(runtime, &mut outputs, &plan.expected_outputs);
    assert_eq!(published.distinct, plan.expected_outputs, "output event ids");
    println!(
        "{killed} SIGKILLs, {withdrawing_restarts} restarts withdrew unpublished commits; state exact, {} output ids published",
        published.distinct.len()
    );
}

#[test]
fn a_broker_restart_while_settling_does_not_stall_the_restarted_daemon() {
    let rounds: usize = std::env::var("AEROSTREAM_RESTART_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let harness = Harness::new().partitions(2).build();
    let (broker, config, runtime) = (&harness.broker, harness.config(), harness.runtime());
    let plan = plan(config, 6, 20, 600, 8_000 * rounds);
    let mut daemon = harness.start();
    let publisher = publish(runtime, config, &plan);
    for round in 1..=rounds {
        let at = applied(&daemon) + 1_500.0;
        wait_for("the daemon to apply", Duration::from_secs(60), || {
            (applied(&daemon) >= at).then_some(())
        })
        .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", daemon.log_tail()));
        daemon.kill().unwrap();
        daemon = harness.spawn();
        wait_for("the follower to subscribe", Duration::from_secs(30), || {
            daemon
                .log_text()
                .contains("Following the changelog")
                .then_some(())
        })
        .unwrap();
        broker.stop_broker().unwrap();
        broker.start_broker().unwrap();
        println!("round {round}: broker restarted while the daemon settled");
    }
    runtime.block_on(publisher).unwrap().unwrap();
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
}

#[test]
fn a_restart_that_cannot_settle_says_why_and_sigterm_still_ends_it_in_time() {
    let harness = Harness::new()
        .partitions(2)
        .shutdown_timeout(4)
        .daemon_key("stall_timeout_seconds = 2")
        .build();
    let (broker, config, runtime) = (&harness.broker, harness.config(), harness.runtime());
    let plan = plan(config, 7, 10, 200, 12_000);
    let mut daemon = harness.start();
    let publisher = publish(runtime, config, &plan);

    // Killed mid-stream until a kill leaves commits the changelog never received.
    let mut withdrew = false;
    while !withdrew {
        let at = applied(&daemon) + 300.0;
        wait_for("the daemon to apply", Duration::from_secs(60), || {
            (applied(&daemon) >= at).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
        assert!(!publisher.is_finished(), "the kill must come mid-stream");
        daemon.kill().unwrap();
        broker.stop_broker().unwrap();
        daemon = harness.spawn();
        withdrew = wait_for("the withdrawal at start", Duration::from_secs(10), || {
            let log = daemon.log_text();
            log.contains("Starting.")
                .then(|| log.contains("Withdrew commits"))
        })
        .unwrap();
        if !withdrew {
            broker.start_broker().unwrap();
        }
    }

    // It cannot settle while the broker is away: /health says so.
    let (status, body, _) = daemon
        .send(reqwest::Method::GET, "/health", None, Vec::new())
        .unwrap();
    assert_eq!(status, 503, "{body}");
    let reasons = body["reasons"].to_string();
    assert!(reasons.contains("settling"), "{body}");
    assert_eq!(body["components"]["changelog"]["settled"], false, "{body}");

    // SIGTERM ends it within its grace period although its start never finished.
    let stopping = std::time::Instant::now();
    daemon
        .terminate(Duration::from_secs(4 + 10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    println!("stuck daemon exited {:?} after SIGTERM", stopping.elapsed());

    // With the broker back, a new start settles and answers 200.
    broker.start_broker().unwrap();
    daemon = harness.spawn();
    daemon.wait_healthy(Duration::from_secs(60)).unwrap();
    let (_, body, _) = daemon
        .send(reqwest::Method::GET, "/health", None, Vec::new())
        .unwrap();
    assert_eq!(body["components"]["changelog"]["settled"], true, "{body}");

    // A daemon holding messages it cannot ack (the broker is gone, so the outbox cannot publish
    // their changelog records) also ends within its grace period on SIGTERM.
    let at = applied(&daemon) + 300.0;
    wait_for("the daemon to apply", Duration::from_secs(60), || {
        (applied(&daemon) >= at).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
    assert!(!publisher.is_finished(), "the stop must come mid-stream");
    broker.stop_broker().unwrap();
    // Its inputs hold messages and finish none: /health names them.
    wait_for(
        "/health to report the stalled input",
        Duration::from_secs(20),
        || {
            let (status, body, _) = daemon
                .send(reqwest::Method::GET, "/health", None, Vec::new())
                .ok()?;
            (status == 503 && body["reasons"].to_string().contains("finished none")).then_some(())
        },
    )
    .unwrap();
    let stopping = std::time::Instant::now();
    daemon
        .terminate(Duration::from_secs(4 + 10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "daemon with unackable messages exited {:?} after SIGTERM",
        stopping.elapsed()
    );
    broker.start_broker().unwrap();
    daemon = harness.spawn();
    runtime.block_on(publisher).unwrap().unwrap();
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
}

/// A changelog subscription that delivers nothing (made so by a fail point, as a broker or client
/// fault could) would hold a restarted daemon's settling, and every barrier, for ever: the follower
/// must notice that no record comes while its marker is pending, subscribe again and go on.
#[test]
fn a_changelog_subscription_that_delivers_nothing_is_replaced_and_the_restart_settles() {
    let harness = Harness::new()
        .partitions(2)
        .admin_token("t")
        .extra(
            "[chaos]\nenabled = true\n\
             failpoints = { \"changelog::deaf_subscription\" = \"1*return\" }\n\n\
             [changelog]\nstall_timeout_ms = 1500\n",
        )
        .build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let plan = plan(config, 8, 10, 200, 14_000);
    let mut daemon = harness.spawn();
    // Not healthy yet (its first barrier waits for the deaf subscription to be replaced), but
    // subscribed: what is published from now on is delivered.
    daemon.wait_subscribed(Duration::from_secs(30)).unwrap();
    // Each life starts on a deaf subscription and is SIGKILLed while its part of the stream is
    // published; the next part follows the restart, however slow the daemon is.
    const LIVES: usize = 4;
    let parts: Vec<&[generator::Planned]> = plan
        .stream
        .chunks(plan.stream.len().div_ceil(LIVES + 1))
        .collect();
    let mut withdrawing_lives = 0;
    for part in &parts[..LIVES] {
        let publisher = publish_events(runtime, config, part);
        let at = applied(&daemon) + 300.0;
        wait_for("the daemon to apply", Duration::from_secs(60), || {
            (applied(&daemon) >= at).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
        assert!(
            daemon
                .metric("aerostream_changelog_resubscriptions_total", &[])
                .unwrap()
                >= 1.0,
            "the deaf subscription was replaced\n{}",
            daemon.log_tail()
        );
        // A life that withdrew commits applies only once they are settled.
        let log = daemon.log_text();
        if log.contains("Withdrew commits") {
            assert!(log.contains("Withdrawn commits settled"), "{}", daemon.log_tail());
            withdrawing_lives += 1;
        }
        daemon.kill().unwrap();
        daemon = harness.spawn();
        runtime.block_on(publisher).unwrap().unwrap();
    }
    runtime
        .block_on(publish_events(runtime, config, parts[LIVES]))
        .unwrap()
        .unwrap();
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
    let log = daemon.log_text();
    if log.contains("Withdrew commits") {
        withdrawing_lives += 1;
    }
    assert!(
        withdrawing_lives >= 1,
        "no SIGKILL left commits to withdraw: the restart path was not exercised"
    );
}

/// SIGTERM while some inputs finish at once and others hold messages they can never finish (here:
/// every changelog subscription delivers nothing, so every barrier waits): the stuck ones are
/// abandoned after their share of the grace period and the daemon still stops cleanly.
#[test]
fn sigterm_with_some_inputs_stuck_stops_cleanly() {
    let harness = Harness::new()
        .admin_token("t")
        .shutdown_timeout(4)
        .extra(
            "[chaos]\nenabled = true\n\
             failpoints = { \"changelog::deaf_subscription\" = \"return\" }\n",
        )
        .build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let plan = generator::plan(&Options {
        seed: 9,
        campaigns: 5,
        payments: 20,
        events: 200,
        duplicate_fraction: 0.0,
        reorder_window: 1,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    });
    let mut daemon = harness.start();
    runtime
        .block_on(produce::publish(config, &Codec::shipped(), &plan.stream, 0))
        .unwrap();
    wait_for(
        "the campaigns input to hold messages",
        Duration::from_secs(30),
        || {
            let (_, body, _) = daemon
                .send(reqwest::Method::GET, "/health", None, Vec::new())
                .ok()?;
            (body["components"]["inputs"]["campaigns"]["held"].as_u64()? > 0).then_some(())
        },
    )
    .unwrap();
    let status = daemon
        .terminate(Duration::from_secs(4 + 10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let log = daemon.log_text();
    assert!(
        status.success() && log.contains("Stopped."),
        "{status:?}\n{}",
        daemon.log_tail()
    );
}

/// A restarted daemon resumes the changelog where it had read it to (the positions its follower
/// keeps in the store), not at the changelog's first record: after a run that wrote hundreds of
/// records, a restart with the same data directory reads at most what came after the last
/// position it kept (one per partition every 64 records, and whenever a marker of its own comes
/// back), and the state stays exact.
#[test]
fn a_restart_resumes_the_changelog_where_it_was_read_to() {
    let harness = Harness::new().partitions(2).build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let plan = plan(config, 7, 10, 100, 1_500);
    let mut daemon = harness.start();
    runtime
        .block_on(publish(runtime, config, &plan))
        .unwrap()
        .unwrap();
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
    let written = daemon
        .metric("aerostream_outbox_published_total", &["event_type=\"changelog\""])
        .unwrap();
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "SIGTERM ends the first run cleanly: {status}");

    let daemon = harness.start();
    // The same stream again, every event a duplicate: its first message waits for a barrier (the
    // restarted follower's first), which resolves once the changelog is read to its end.
    runtime
        .block_on(publish(runtime, config, &plan))
        .unwrap()
        .unwrap();
    wait_handled(
        &daemon,
        "every republished event handled",
        plan.stream.len(),
        Duration::from_secs(120),
    );
    let read = daemon.metric("aerostream_changelog_read_total", &[]).unwrap();
    // Per partition: the records since the last kept position (under 64, and the one at it), the
    // markers written since.
    let bound = 2.0 * (64.0 + 4.0);
    assert!(
        written >= 4.0 * bound,
        "the first run wrote {written} changelog records: too few for the bound to mean anything"
    );
    assert!(
        read <= bound,
        "the restart read {read} changelog messages of the {written} records the first run wrote\n{}",
        daemon.log_tail()
    );
    assert_eq!(
        daemon.metric("aerostream_events_applied_total", &[]).unwrap(),
        0.0,
        "nothing applied twice"
    );
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(60));
    println!("first run wrote {written} changelog records; the restart read {read}");
}

/// A broker that lost its data (or a changelog topic deleted and made again) numbers its messages
/// from the start again, below the positions a restarted daemon kept. The daemon must read that
/// changelog from its start: at its kept positions it would never read its first barrier's marker
/// back, and that barrier, and every event behind it, would wait for ever.
#[test]
fn a_changelog_that_ends_before_the_kept_positions_is_read_from_its_start() {
    let harness = Harness::new().partitions(2).build();
    let (broker, config, runtime) = (&harness.broker, harness.config(), harness.runtime());
    let first = plan(config, 7, 10, 100, 1_000);
    let mut daemon = harness.start();
    runtime
        .block_on(publish(runtime, config, &first))
        .unwrap()
        .unwrap();
    wait_for_state(&daemon, &first.expected, Duration::from_secs(120));
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());

    broker.stop_broker().unwrap();
    // Its database (`--db-path <dir>/pulsar-lite`): the log and the topics' metadata.
    std::fs::remove_dir_all(broker.data_dir().join("pulsar-lite.rocksdb")).unwrap();
    std::fs::remove_file(broker.data_dir().join("pulsar-lite.metadata.json")).unwrap();
    broker.start_broker().unwrap();

    let daemon = harness.start();
    daemon.wait_subscribed(Duration::from_secs(60)).unwrap();
    let more = plan(config, 99, 3, 5, 20);
    runtime
        .block_on(publish(runtime, config, &more))
        .unwrap()
        .unwrap();
    wait_handled(
        &daemon,
        "the new events handled",
        more.stream.len(),
        Duration::from_secs(60),
    );
    assert!(
        daemon
            .log_text()
            .contains("reading those partitions from their start"),
        "{}",
        daemon.log_tail()
    );
}
