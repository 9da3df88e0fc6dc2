//! The accounting of an input's messages (README, "Metrics"), against the real broker: every
//! message received ends in exactly one outcome, so that per input, once nothing is in flight,
//!
//!     consumed = applied + deduplicated + redelivered + rejected + dead_lettered
//!
//! through a stream with partners' duplicates, reused keys and undecodable messages, a SIGKILL
//! mid-stream, and a forced redelivery of everything: the subscriptions rewound to their start
//! (a seek), so that every message comes back with its original identity. The rewound run must
//! count each message whose event was applied as `redelivered`, each partner's duplicate as
//! `deduplicated`, and apply nothing.
//!
//! A fresh daemon exports every counter with known label values at 0, each metric with its
//! `# HELP` line.

mod support;

use aerostream::generator::{self, Input, Options, Planned};
use aerostream::telemetry::{self, *};
use aerostream_actors::RejectReason;
use pulsar::{Pulsar, SubType, TokioExecutor};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use support::daemon::{wait_for, Daemon};
use support::state::wait_for_state;
use support::topic::send_raw;
use support::{unique_consumer_id, Harness};

/// One scrape's outcome counters of one input.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    consumed: u64,
    applied: u64,
    deduplicated: u64,
    redelivered: u64,
    rejected: u64,
    dead_lettered: u64,
}

impl Tally {
    fn outcomes(&self) -> u64 {
        self.applied + self.deduplicated + self.redelivered + self.rejected + self.dead_lettered
    }

    fn balanced(&self) -> bool {
        self.consumed == self.outcomes()
    }
}

/// Sum of the samples of `name` whose labels contain every one of `labels`.
fn sample_sum(exposition: &str, name: &str, labels: &[&str]) -> u64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split(['{', ' ']).next() == Some(name))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Every input's tally, from one scrape (so that the figures are of one moment).
fn tallies(daemon: &Daemon, inputs: &[String]) -> BTreeMap<String, Tally> {
    let exposition = daemon.metrics_text().unwrap();
    inputs
        .iter()
        .map(|input| {
            let label = format!("input=\"{input}\"");
            let count = |name| sample_sum(&exposition, name, &[&label]);
            let tally = Tally {
                consumed: count(EVENTS_CONSUMED),
                applied: count(EVENTS_APPLIED),
                deduplicated: count(EVENTS_DEDUPLICATED),
                redelivered: count(EVENTS_REDELIVERED),
                rejected: count(EVENTS_REJECTED),
                dead_lettered: count(EVENTS_DEAD_LETTERED),
            };
            (input.clone(), tally)
        })
        .collect()
}

/// Waits until every input is balanced and `done` holds, and returns that scrape.
fn wait_balanced(
    what: &str,
    daemon: &Daemon,
    inputs: &[String],
    done: impl Fn(&BTreeMap<String, Tally>) -> bool,
) -> BTreeMap<String, Tally> {
    wait_for(what, Duration::from_secs(120), || {
        let tallies = tallies(daemon, inputs);
        (tallies.values().all(Tally::balanced) && done(&tallies)).then_some(tallies)
    })
    .unwrap_or_else(|e| panic!("{e}: {:#?}\n{}", tallies(daemon, inputs), daemon.log_tail()))
}

/// The names of the exposition's `# TYPE` lines that have no `# HELP` line.
fn without_help(exposition: &str) -> Vec<&str> {
    let named = |prefix: &str| -> Vec<&str> {
        exposition
            .lines()
            .filter_map(|line| line.strip_prefix(prefix)?.split(' ').next())
            .collect()
    };
    let helped: BTreeSet<&str> = named("# HELP ").into_iter().collect();
    named("# TYPE ")
        .into_iter()
        .filter(|metric| !helped.contains(metric))
        .collect()
}

fn input_name(input: Input) -> &'static str {
    match input {
        Input::Campaigns => "campaigns",
        Input::Payments => "payments",
    }
}

/// How many of `events` go to each input.
fn per_input(events: &[Planned]) -> BTreeMap<&'static str, u64> {
    let mut counts = BTreeMap::new();
    for planned in events {
        *counts.entry(input_name(planned.input)).or_default() += 1;
    }
    counts
}

/// Rewinds `subscription` on `topic` to its first message, as an operator resetting a
/// subscription would: every message is delivered again, with its original identity.
async fn rewind(client: &Pulsar<TokioExecutor>, topic: &str, subscription: &str) -> anyhow::Result<()> {
    let mut consumer = client
        .consumer()
        .with_topic(topic)
        .with_subscription(subscription)
        .with_subscription_type(SubType::Failover)
        .with_consumer_id(unique_consumer_id())
        .build::<Vec<u8>>()
        .await?;
    // Once it has moved the cursor, the broker disconnects the subscription's consumers (Apache
    // Pulsar does too), which the client reports as the seek's answer. Whether the rewind took is
    // seen in what the daemon receives next.
    match consumer.seek(None, None, Some(0), client.clone()).await {
        Ok(()) | Err(pulsar::Error::Connection(pulsar::error::ConnectionError::Disconnected)) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

#[test]
fn every_message_ends_in_one_outcome_through_duplicates_a_sigkill_and_a_forced_redelivery() {
    let harness = Harness::started();
    let (config, runtime, client) = (harness.config(), harness.runtime(), harness.client());
    let inputs: Vec<String> = config.inputs.keys().cloned().collect();

    // A fresh daemon: every counter with known label values is there at 0, with its help.
    let mut daemon = harness.start();
    let fresh = daemon.metrics_text().unwrap();
    assert_eq!(without_help(&fresh), Vec::<&str>::new(), "{fresh}");
    let at_zero = |name: &str, labels: String| {
        let line = format!("{name}{{{labels}}} 0");
        assert!(fresh.lines().any(|l| l == line), "a fresh daemon exports {line}");
    };
    for input in &inputs {
        at_zero(EVENTS_CONSUMED, format!("input=\"{input}\""));
        for event_type in telemetry::input_event_types() {
            for name in [EVENTS_APPLIED, EVENTS_DEDUPLICATED, EVENTS_REDELIVERED] {
                at_zero(name, format!("input=\"{input}\",event_type=\"{event_type}\""));
            }
        }
        for reason in RejectReason::ALL {
            at_zero(
                EVENTS_REJECTED,
                format!("input=\"{input}\",reason=\"{}\"", reason.as_str()),
            );
        }
        for reason in telemetry::dead_letter_reasons() {
            at_zero(
                EVENTS_DEAD_LETTERED,
                format!("input=\"{input}\",reason=\"{reason}\""),
            );
        }
    }

    // A stream with partners' duplicates, reordered, and events that reuse keys.
    let plan = generator::plan(&Options {
        seed: 19,
        campaigns: 10,
        payments: 200,
        events: 3_000,
        duplicate_fraction: 0.1,
        reorder_window: 4,
        conflict_fraction: 0.1,
        ..Options::for_daemon(config)
    });
    let duplicates = (plan.stream.len() - plan.distinct) as u64;
    assert!(duplicates >= 200 && !plan.conflicts.is_empty());

    // SIGKILL mid-stream: its counters die with it; the restarted daemon gets what was not acked.
    let publisher = {
        let (config, events) = (config.clone(), plan.stream.clone());
        runtime.spawn(async move {
            aerostream::produce::publish(&config, &aerostream::codec::Codec::shipped(), &events, 1_000).await
        })
    };
    let applied = wait_for("a third of the stream applied", Duration::from_secs(60), || {
        let applied: u64 = tallies(&daemon, &inputs).values().map(|t| t.applied).sum();
        (applied * 3 >= plan.distinct as u64).then_some(applied)
    })
    .unwrap();
    daemon.kill().unwrap();
    assert!(applied < plan.distinct as u64, "the SIGKILL comes mid-stream");
    let mut daemon = harness.spawn();
    runtime.block_on(publisher).unwrap().unwrap();
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));

    // Then the reused keys and undecodable messages.
    support::events::publish(runtime, config, &plan.conflicts);
    let bad: [(&str, &[u8]); 3] = [
        ("payments", &[0xff, 0x00, 0x13]),
        ("payments", b"not avro"),
        ("campaigns", &[0x02]),
    ];
    for (input, payload) in bad {
        let topic = config.broker.topic(&config.inputs[input].topic);
        let schema = match input {
            "payments" => "com.aeropartners.idempotencia.PagoSolicitado/v1",
            _ => "com.aeropartners.campanas.ClickRegistrado/v1",
        };
        runtime
            .block_on(send_raw(
                client,
                &topic,
                "bad",
                &[("ce_dataschema", schema)],
                payload.to_vec(),
            ))
            .unwrap();
    }
    let conflicts = plan.conflicts.len() as u64;
    let bad_count = bad.len() as u64;
    let restarted = wait_balanced(
        "the restarted daemon to account for every message",
        &daemon,
        &inputs,
        |tallies| {
            let sum = |f: fn(&Tally) -> u64| tallies.values().map(f).sum::<u64>();
            sum(|t| t.rejected) >= conflicts && sum(|t| t.dead_lettered) >= bad_count
        },
    );
    println!("after the SIGKILL and restart: {restarted:#?}");
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(30));
    let exposition = daemon.metrics_text().unwrap();
    assert_eq!(without_help(&exposition), Vec::<&str>::new());
    assert_eq!(
        sample_sum(
            &exposition,
            EVENTS_DEAD_LETTERED,
            &["reason=\"idempotency_key_reused\""]
        ),
        0,
        "a rejection is dead-lettered but counted as rejected only"
    );

    // A forced redelivery of everything: the daemon stopped cleanly (every message acked), its
    // subscriptions rewound to their first message.
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());
    let published = {
        let mut published = per_input(&plan.stream);
        for (input, count) in per_input(&plan.conflicts) {
            *published.entry(input).or_default() += count;
        }
        for (input, _) in bad {
            *published.entry(input).or_default() += 1;
        }
        published
    };
    for input in published.keys() {
        let input = &config.inputs[*input];
        runtime
            .block_on(rewind(
                client,
                &config.broker.topic(&input.topic),
                &input.subscription,
            ))
            .unwrap();
    }
    let daemon = harness.spawn();
    let replayed = wait_balanced(
        "the rewound daemon to account for every message again",
        &daemon,
        &inputs,
        |tallies| {
            published
                .iter()
                .all(|(input, count)| tallies[*input].consumed >= *count)
        },
    );
    println!("after the rewind: {replayed:#?}");
    let total = |f: fn(&Tally) -> u64| replayed.values().map(f).sum::<u64>();
    let sent: u64 = published.values().sum();
    // pulsar-lite may deliver a message more than once; each extra copy ends in one outcome too.
    let extra = total(|t| t.consumed) - sent;
    let within = |figure: &str, got: u64, expected: u64| {
        assert!(
            (expected..=expected + extra).contains(&got),
            "{figure}: {got}, expected {expected} (+ up to {extra} extra deliveries): {replayed:#?}"
        );
    };
    assert_eq!(
        total(|t| t.applied),
        0,
        "a rewound subscription applies nothing again"
    );
    // Every applied message and every message dead-lettered before is a redelivery now: the
    // dead letters are remembered (`SledStore::dead_lettered`), so none is dead-lettered again.
    within(
        "redelivered",
        total(|t| t.redelivered),
        plan.distinct as u64 + conflicts + bad_count,
    );
    within("deduplicated", total(|t| t.deduplicated), duplicates);
    within("rejected", total(|t| t.rejected), 0);
    within("dead-lettered", total(|t| t.dead_lettered), 0);
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(30));
}
