//! Crash-restart liveness (issue: a restarted daemon that withdrew unpublished commits stalled for
//! good while /health said 200). One daemon on partitioned topics is SIGKILLed again and again
//! mid-stream, right after it has applied a few events, so that most restarts find commits the
//! changelog never received and withdraw them. After every restart the daemon must settle them
//! and apply again; at the end the served state is exact and every output was published.

mod support;

use aerostream::codec::Codec;
use aerostream::config::Config;
use aerostream::generator::{self, Options};
use aerostream::produce;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;
use support::daemon::{self, wait_for, Daemon};
use support::state::wait_for_state;
use support::topic::{collect_outputs, TopicReader};
use support::{free_port, BrokerOptions, LocalBroker};

fn applied(daemon: &Daemon) -> f64 {
    daemon
        .metric("aerostream_events_applied_total", &[])
        .unwrap_or(0.0)
}

fn log_text(daemon: &Daemon) -> String {
    std::fs::read_to_string(&daemon.log).unwrap_or_default()
}

#[test]
fn every_restart_after_withdrawals_settles_and_applies_again() {
    let kills: usize = std::env::var("AEROSTREAM_RESTART_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let broker = LocalBroker::start_with(BrokerOptions {
        default_partitions: 2,
        ..BrokerOptions::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let config_path = daemon::write_config(
        dir.path(),
        &broker.url(),
        port,
        "admin_token = \"t\"\n\n[chaos]\nenabled = true\n",
    )
    .unwrap();
    let config = Config::load(Some(&config_path)).unwrap();
    let plan = generator::plan(&Options {
        seed: 5,
        campaigns: 20,
        payments: 600,
        events: 4_000 + 1_200 * kills,
        duplicate_fraction: 0.1,
        reorder_window: 4,
        conflict_fraction: 0.0,
        ..Options::for_daemon(&config)
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime
        .block_on(pulsar::Pulsar::builder(broker.url(), pulsar::TokioExecutor).build())
        .unwrap();
    let mut outputs: Vec<TopicReader> = [
        &config.outputs.payments_topic,
        &config.outputs.commissions_topic,
        &config.outputs.alerts_topic,
    ]
    .iter()
    .map(|name| {
        runtime
            .block_on(TopicReader::subscribe(&client, &config.broker.topic(name)))
            .unwrap()
    })
    .collect();

    let mut daemon = Daemon::start(&config_path, port).unwrap();
    daemon.wait_healthy(Duration::from_secs(30)).unwrap();
    let publisher = {
        let (config, events) = (config.clone(), plan.stream.clone());
        runtime.spawn(async move { produce::publish(&config, &Codec::shipped(), &events, 1_000).await })
    };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut withdrawing_restarts = 0;
    let mut killed = 0;
    for kill in 1..=kills {
        if rng.gen_bool(0.5) {
            // Killed at a random moment of its start: maybe while it settles withdrawn commits.
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..2_500)));
        } else {
            // A restarted daemon must apply again: a stall here is the failure this test is for.
            let at = applied(&daemon) + rng.gen_range(20.0..300.0);
            wait_for("the restarted daemon to apply", Duration::from_secs(60), || {
                (applied(&daemon) >= at).then_some(())
            })
            .unwrap_or_else(|e| panic!("life {kill}: {e}\n{}", daemon.log_tail()));
            for _ in 0..2 {
                let id = format!("camp-{:05}", rng.gen_range(0..20));
                let _ = daemon.post(
                    "/admin/chaos/kill-actor",
                    Some("t"),
                    &serde_json::json!({ "kind": "campaign", "id": id }),
                );
            }
            let log = log_text(&daemon);
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
        daemon = Daemon::start(&config_path, port).unwrap();
    }
    runtime.block_on(publisher).unwrap().unwrap();
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
    let published = collect_outputs(&runtime, &mut outputs, &plan.expected_outputs);
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
    let broker = LocalBroker::start_with(BrokerOptions {
        default_partitions: 2,
        ..BrokerOptions::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let config_path = daemon::write_config(dir.path(), &broker.url(), port, "").unwrap();
    let config = Config::load(Some(&config_path)).unwrap();
    let plan = generator::plan(&Options {
        seed: 6,
        campaigns: 20,
        payments: 600,
        events: 8_000 * rounds,
        duplicate_fraction: 0.1,
        reorder_window: 4,
        conflict_fraction: 0.0,
        ..Options::for_daemon(&config)
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut daemon = Daemon::start(&config_path, port).unwrap();
    daemon.wait_healthy(Duration::from_secs(30)).unwrap();
    let publisher = {
        let (config, events) = (config.clone(), plan.stream.clone());
        runtime.spawn(async move { produce::publish(&config, &Codec::shipped(), &events, 1_000).await })
    };
    for round in 1..=rounds {
        let at = applied(&daemon) + 1_500.0;
        wait_for("the daemon to apply", Duration::from_secs(60), || {
            (applied(&daemon) >= at).then_some(())
        })
        .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", daemon.log_tail()));
        daemon.kill().unwrap();
        daemon = Daemon::start(&config_path, port).unwrap();
        wait_for("the follower to subscribe", Duration::from_secs(30), || {
            log_text(&daemon)
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

/// The config of `daemon::write_config` with another shutdown grace period.
fn with_shutdown_timeout(config_path: &std::path::Path, seconds: u64) {
    let text = std::fs::read_to_string(config_path).unwrap();
    assert!(text.contains("shutdown_timeout_seconds = 20\n"));
    let text = text.replace(
        "shutdown_timeout_seconds = 20\n",
        &format!("shutdown_timeout_seconds = {seconds}\n"),
    );
    std::fs::write(config_path, text).unwrap();
}

#[test]
fn a_restart_that_cannot_settle_says_why_and_sigterm_still_ends_it_in_time() {
    let broker = LocalBroker::start_with(BrokerOptions {
        default_partitions: 2,
        ..BrokerOptions::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let config_path = daemon::write_config(dir.path(), &broker.url(), port, "").unwrap();
    with_shutdown_timeout(&config_path, 4);
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        text.replace("[daemon]\n", "[daemon]\nstall_timeout_seconds = 2\n"),
    )
    .unwrap();
    let config = Config::load(Some(&config_path)).unwrap();
    let plan = generator::plan(&Options {
        seed: 7,
        campaigns: 10,
        payments: 200,
        events: 12_000,
        duplicate_fraction: 0.1,
        reorder_window: 4,
        conflict_fraction: 0.0,
        ..Options::for_daemon(&config)
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut daemon = Daemon::start(&config_path, port).unwrap();
    daemon.wait_healthy(Duration::from_secs(30)).unwrap();
    let publisher = {
        let (config, events) = (config.clone(), plan.stream.clone());
        runtime.spawn(async move { produce::publish(&config, &Codec::shipped(), &events, 1_000).await })
    };

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
        daemon = Daemon::start(&config_path, port).unwrap();
        withdrew = wait_for("the withdrawal at start", Duration::from_secs(10), || {
            let log = log_text(&daemon);
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
    daemon = Daemon::start(&config_path, port).unwrap();
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
    daemon = Daemon::start(&config_path, port).unwrap();
    runtime.block_on(publisher).unwrap().unwrap();
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
}
