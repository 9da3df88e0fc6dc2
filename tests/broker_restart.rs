//! Broker down and back (SPEC §9): while the broker is stopped the daemon stays up and /health
//! answers 503; once it is back /health answers 200 again and consumption resumes without loss —
//! the final state is exact.

mod support;

use aerostream::generator::{self, Options};
use pulsar::message::proto::base_command::Type;
use std::time::Duration;
use support::daemon::wait_for;
use support::events;
use support::state::wait_for_state;
use support::Harness;

#[test]
fn health_follows_the_broker_and_nothing_is_lost_across_a_restart() {
    let harness = Harness::new().broker_data_in_dir().build();
    let (broker, config) = (&harness.broker, harness.config());
    let daemon = harness.start();
    let plan = generator::plan(&Options {
        seed: 61,
        campaigns: 10,
        payments: 100,
        events: 4_000,
        ..Options::for_daemon(config)
    });
    let (first, second) = plan.stream.split_at(plan.stream.len() / 2);
    let publish = |planned: &[generator::Planned]| events::publish(harness.runtime(), config, planned);

    publish(first);
    broker.stop_broker().unwrap();
    wait_for("/health to answer 503", Duration::from_secs(30), || {
        (daemon.status("/health").ok()? == 503).then_some(())
    })
    .unwrap();

    broker.start_broker().unwrap();
    daemon.wait_healthy(Duration::from_secs(60)).unwrap();
    publish(second);
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
}

/// The `pulsar` client can keep a connection that died with a broker restart and fail every
/// lookup on it (src/broker.rs, `Client`). Here the fail point holds the daemon's first client in
/// that state from the start: no input can subscribe, /health answers 503, and the probe replaces
/// the client by a fresh one; every input then subscribes on it and the stream is applied exactly.
#[test]
fn a_client_stuck_on_a_dead_connection_is_replaced_and_consumption_resumes() {
    let harness = Harness::new()
        .extra("[chaos]\nenabled = true\nfailpoints = { \"broker::stuck_client\" = \"return\" }\n")
        .build();
    let config = harness.config();
    let daemon = harness.spawn();
    let plan = generator::plan(&Options {
        seed: 62,
        campaigns: 5,
        payments: 50,
        events: 500,
        ..Options::for_daemon(config)
    });
    // Subscribed once the client was replaced (a new subscription starts at the latest message).
    daemon.wait_healthy(Duration::from_secs(60)).unwrap();
    events::publish(harness.runtime(), config, &plan.stream);
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(60));
    assert_eq!(
        daemon
            .metric("aerostream_broker_client_renewals_total", &[])
            .unwrap(),
        1.0,
        "{}",
        daemon.log_tail()
    );
    assert!(
        daemon.log_text().contains("Replaced the Pulsar client"),
        "the renewal is logged\n{}",
        daemon.log_tail()
    );
}

/// A broker that stops dispatching to a Failover consumer with permits and a backlog (seen with
/// pulsar-lite: `ingest::starved_partitions`). The fail point drops every message after the
/// 100th of the first subscription unseen, as such a broker leaves it: the input holds nothing,
/// hears nothing, finds the broker's last message beyond the last one it received, and subscribes
/// again; the broker redelivers what was not acknowledged and the state is exact. The consumer
/// given up goes with its own connection (`partitions`): the daemon holds as many connections to
/// the broker afterwards as before.
#[test]
fn an_input_the_broker_stops_serving_subscribes_again_and_loses_nothing() {
    let harness = Harness::new()
        .extra("[chaos]\nenabled = true\nfailpoints = { \"ingest::starve\" = \"return(campaigns:100)\" }\n")
        .build();
    let config = harness.config();
    let daemon = harness.start();
    let broker_port = harness.broker.url().rsplit(':').next().unwrap().parse().unwrap();
    let connections = daemon.connections_to(broker_port).unwrap();
    let plan = generator::plan(&Options {
        seed: 63,
        campaigns: 3,
        payments: 0,
        events: 400,
        duplicate_fraction: 0.0,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    });
    events::publish(harness.runtime(), config, &plan.stream);
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(60));
    assert_eq!(
        daemon
            .metric("aerostream_input_resubscriptions_total", &["input=\"campaigns\""])
            .unwrap(),
        1.0,
        "{}",
        daemon.log_tail()
    );
    wait_for(
        "the given-up consumer's connection to close",
        Duration::from_secs(10),
        || (daemon.connections_to(broker_port).unwrap() == connections).then_some(()),
    )
    .unwrap_or_else(|error| {
        panic!(
            "{error}: {} connections before the input subscribed again, {} now",
            connections,
            daemon.connections_to(broker_port).unwrap()
        )
    });
}

/// A broker that carries out a subscribe but answers after the client has given up on it (seen
/// in a chaos run: pulsar-lite busy for a minute). The broker then holds a consumer that nobody
/// reads and that has no permits, and on a Failover subscription it is the active one: unless
/// it goes, every later consumer of the subscription waits for good. Here the daemon restarts
/// while the relay drops the broker's answers to subscribes for 30 s, and to lookups from 8 s
/// to 30 s: each input's first subscribe is carried out and times out (10 s), the `pulsar`
/// client's own retry of it fails at its lookup, and the daemon's next subscribe, with a new
/// consumer id, is answered. The daemon must then apply the whole backlog.
#[test]
fn a_subscribe_the_broker_answers_too_late_leaves_no_consumer_in_the_way() {
    let harness = Harness::new().build();
    let config = harness.config();
    let plan = generator::plan(&Options {
        seed: 64,
        campaigns: 3,
        payments: 20,
        events: 400,
        duplicate_fraction: 0.0,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    });
    // The subscriptions exist before the backlog is written.
    harness.start().kill().unwrap();
    events::publish(harness.runtime(), config, &plan.stream);
    let faults = harness.broker.faults();
    faults.lose_answers(&[Type::Success], Duration::ZERO, Duration::from_secs(30));
    faults.lose_answers(
        &[Type::LookupResponse, Type::PartitionedMetadataResponse],
        Duration::from_secs(8),
        Duration::from_secs(30),
    );
    let daemon = harness.spawn();
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
}
