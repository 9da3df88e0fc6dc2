//! Scale-out against the real broker (docs/TAKEOVER.md): one stream on topics of 4 partitions,
//! consumed by one daemon, then by two daemons sharing the subscriptions, each asking for two
//! partitions (`daemon.preferred_partitions`) and following no other (`standby_partitions = 0`).
//! Each of the two owns, follows and writes only its partitions' changelog and imports nothing
//! of the other's, and the state read from the daemon that owns each aggregate (ledgers, which
//! both daemons' commissions and payments move, summed) is exact. Both runs' CPU seconds are
//! printed; `scripts/scale-bench` runs this at scale for docs/BENCHMARKS.md, and with
//! `AEROSTREAM_SCALE_STANDBYS=all` has the two daemons follow every partition, as every daemon did
//! before partitions were owned, for comparison.

mod support;

use aerostream::codec::Codec;
use aerostream::config::Config;
use aerostream::generator::{self, Options, Plan};
use aerostream::produce;
use aerostream::views::{CampaignView, LedgerView, PaymentView, StateView};
use aerostream_actors::ledger::{Amounts, CommissionLedger};
use pulsar::routing_policy::RoutingPolicy;
use std::time::Duration;
use support::daemon::{wait_for, Daemon};
use support::state::{every_page, first_difference};
use support::Harness;

const PARTITIONS: u32 = 4;

fn plan(config: &Config) -> Plan {
    let events = std::env::var("AEROSTREAM_SCALE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6_000);
    generator::plan(&Options {
        seed: 17,
        campaigns: 40,
        payments: 400,
        events,
        duplicate_fraction: 0.05,
        reorder_window: 4,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    })
}

/// The input partition of an aggregate's events: the `pulsar` producer's routing of the message
/// key, which is the aggregate's id (SPEC §3).
fn partition_of(id: &str) -> u32 {
    RoutingPolicy::compute_partition_index_for_key(id, PARTITIONS as usize) as u32
}

/// A daemon's CPU time so far (user and system), from /proc.
fn cpu_seconds(daemon: &Daemon) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", daemon.pid())).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// The changelog partitions a daemon owns and follows, from /health.
fn partitions(daemon: &Daemon) -> (Vec<u32>, Vec<u32>) {
    let health: serde_json::Value = daemon.get("/health").unwrap();
    let list = |name: &str| serde_json::from_value(health["components"]["changelog"][name].clone()).unwrap();
    (list("owned_partitions"), list("followed_partitions"))
}

/// Publishes the plan's stream at full speed and waits until the daemons have finished every
/// message ([`handled`]), holding none and with nothing left to publish; returns their CPU
/// seconds then.
fn publish_and_finish(harness: &Harness, daemons: &[&Daemon], plan: &Plan) -> Vec<f64> {
    let before: Vec<f64> = daemons.iter().map(|daemon| cpu_seconds(daemon)).collect();
    let config = harness.config().clone();
    let events = plan.stream.clone();
    harness
        .runtime()
        .block_on(async move { produce::publish(&config, &Codec::shipped(), &events, 0).await })
        .unwrap();
    let total = plan.stream.len() as f64;
    wait_for("every message finished", Duration::from_secs(120), || {
        let idle = daemons.iter().all(|daemon| {
            let health: serde_json::Value = daemon.get("/health").unwrap_or_default();
            health["outbox_backlog"] == 0
                && health["components"]["inputs"]
                    .as_object()
                    .is_some_and(|inputs| inputs.values().all(|input| input["held"] == 0))
        });
        (handled(daemons) >= total && idle).then_some(())
    })
    .unwrap();
    daemons
        .iter()
        .zip(before)
        .map(|(daemon, before)| cpu_seconds(daemon) - before)
        .collect()
}

/// The state as its owners serve it: each campaign and payment from the daemon that owns its
/// input partition, each ledger summed over the daemons (read from the first alone where each
/// follows every partition: `whole`).
fn served_by_owners(
    daemons: &[(&Daemon, Vec<u32>)],
    expected: &StateView,
    whole: bool,
) -> anyhow::Result<StateView> {
    let owner = |id: &str| {
        daemons
            .iter()
            .find(|(_, owned)| owned.contains(&partition_of(id)))
            .map(|(daemon, _)| *daemon)
            .expect("every partition has an owner")
    };
    let mut campaigns: Vec<CampaignView> = Vec::new();
    for (daemon, owned) in daemons {
        let listed = every_page::<CampaignView>(daemon, "/api/campaigns", 1_000)?;
        campaigns.extend(
            listed
                .into_iter()
                .filter(|campaign| owned.contains(&partition_of(&campaign.id))),
        );
    }
    campaigns.sort_by(|a, b| a.id.cmp(&b.id));
    let payments = expected
        .payments
        .iter()
        .map(|p| owner(&p.id).get::<PaymentView>(&format!("/api/payments/{}", p.id)))
        .collect::<Result<_, _>>()?;
    let affiliates = expected
        .affiliates
        .iter()
        .map(|expected| {
            let id = &expected.ledger.affiliate_id;
            let mut sum = CommissionLedger::new(id.clone());
            for (daemon, _) in daemons.iter().take(if whole { 1 } else { daemons.len() }) {
                if let Ok(ledger) = daemon.get::<LedgerView>(&format!("/api/affiliates/{id}/commissions")) {
                    add(&mut sum, &ledger.ledger);
                }
            }
            LedgerView::from(&sum)
        })
        .collect();
    Ok(StateView {
        campaigns,
        payments,
        affiliates,
    })
}

/// Waits until the owners serve exactly `expected`; fails with the first difference and the
/// daemons' logs.
fn wait_exact(owners: &[(&Daemon, Vec<u32>)], expected: &StateView, whole: bool) {
    let exact = wait_for("the exact state", Duration::from_secs(60), || {
        (served_by_owners(owners, expected, whole).ok()? == *expected).then_some(())
    });
    if let Err(e) = exact {
        let difference =
            served_by_owners(owners, expected, whole).map(|served| first_difference(&served, expected));
        let logs: String = owners.iter().map(|(daemon, _)| daemon.log_tail()).collect();
        panic!("{e}: {difference:?}\n{logs}");
    }
}

/// Adds `other`'s commissions and payments to `sum`.
fn add(sum: &mut CommissionLedger, other: &CommissionLedger) {
    fn add_amounts(sum: &mut Amounts, other: &Amounts) {
        for (currency, amount) in other {
            *sum.entry(*currency).or_default() += amount;
        }
    }
    for (campaign, amounts) in &other.earned_by_campaign {
        add_amounts(
            sum.earned_by_campaign.entry(campaign.clone()).or_default(),
            amounts,
        );
    }
    add_amounts(&mut sum.earned, &other.earned);
    add_amounts(&mut sum.paid, &other.paid);
    sum.commissions += other.commissions;
    sum.payments += other.payments;
}

#[test]
fn two_daemons_divide_the_partitions_and_their_state_is_exact_where_it_is_owned() {
    // One daemon: owns every partition.
    let single = {
        let harness = Harness::new().partitions(PARTITIONS).build();
        let plan = plan(harness.config());
        let daemon = harness.start();
        daemon.wait_subscribed(Duration::from_secs(30)).unwrap();
        let cpu = publish_and_finish(&harness, &[&daemon], &plan);
        let owned = (0..PARTITIONS).collect::<Vec<_>>();
        let owners = [(&daemon, owned.clone())];
        wait_exact(&owners, &plan.expected, true);
        assert_eq!(partitions(&daemon), (owned.clone(), owned));
        cpu[0]
    };

    // Two daemons, two partitions each.
    let standbys = std::env::var("AEROSTREAM_SCALE_STANDBYS").unwrap_or_else(|_| "0".into());
    let every = standbys == "all";
    let node = |preferred: &str| {
        let standbys = if every { "\"all\"" } else { standbys.as_str() };
        Harness::new()
            .daemon_key(&format!("preferred_partitions = {preferred}"))
            .extra(&format!("[changelog]\nstandby_partitions = {standbys}\n"))
    };
    let harness = Harness::new().partitions(PARTITIONS).build();
    let plan = plan(harness.config());
    let nodes = [
        harness.node_with(node("[0, 1]")),
        harness.node_with(node("[2, 3]")),
    ];
    let daemons: Vec<Daemon> = nodes.iter().map(|node| node.start()).collect();
    for daemon in &daemons {
        daemon.wait_subscribed(Duration::from_secs(30)).unwrap();
    }
    let cpu = publish_and_finish(&harness, &daemons.iter().collect::<Vec<_>>(), &plan);
    let shares = [vec![0, 1], vec![2, 3]];
    let owners: Vec<(&Daemon, Vec<u32>)> = daemons.iter().zip(shares.clone()).collect();
    wait_exact(&owners, &plan.expected, every);
    for (daemon, share) in daemons.iter().zip(&shares) {
        let (owned, followed) = partitions(daemon);
        assert_eq!(owned, *share);
        let imported = daemon
            .metric("aerostream_changelog_imported_total", &[])
            .unwrap_or(0.0);
        if every {
            assert_eq!(followed, (0..PARTITIONS).collect::<Vec<_>>());
            assert!(imported > 0.0, "each imports the other's records");
        } else if standbys == "0" {
            // Each follows its share and imported nothing: no work done twice.
            assert_eq!(followed, *share);
            assert_eq!(imported, 0.0);
        }
    }
    let applied: Vec<f64> = daemons
        .iter()
        .map(|d| d.metric("aerostream_events_applied_total", &[]).unwrap())
        .collect();
    assert!(
        applied.iter().all(|applied| *applied > 0.0),
        "both daemons work: {applied:?}"
    );
    let pair: f64 = cpu.iter().sum();
    println!(
        "\n| {} events, topics of {PARTITIONS} partitions | CPU seconds |\n| --- | --- |\n\
         | 1 daemon | {single:.2} |\n| 2 daemons (2 partitions each, standby_partitions = {standbys}) | {:.2} + {:.2} = {pair:.2} |\n\
         | ratio 2 daemons / 1 | {:.2} |\n| events applied by each of the 2 | {:?} |",
        plan.stream.len(),
        cpu[0],
        cpu[1],
        pair / single,
        applied,
    );
}

/// A daemon that owned every partition hands two back to a daemon that prefers them (it reads
/// that daemon's records there, and stops following them), and when that daemon is SIGKILLed it
/// takes them over again, reading only what was written to them since it handed them back: its
/// kept position, not the partitions' history. It then serves the exact state of everything.
#[test]
fn a_partition_handed_back_is_restored_from_where_it_was_read_to() {
    let harness = Harness::new().partitions(PARTITIONS).build();
    let plan = plan(harness.config());
    // A long history, then a short share for the second daemon, then a short end.
    let (history, rest) = plan.stream.split_at(plan.stream.len() * 3 / 5);
    let (second_share, end) = rest.split_at(rest.len() / 2);
    let parts = [history, second_share, end];
    let publish = |part: &[generator::Planned]| {
        let (config, events) = (harness.config().clone(), part.to_vec());
        harness
            .runtime()
            .block_on(async move { produce::publish(&config, &Codec::shipped(), &events, 0).await })
            .unwrap();
    };
    let first = harness.start();
    first.wait_subscribed(Duration::from_secs(30)).unwrap();
    publish(parts[0]);
    wait_handled(&[&first], parts[0].len());
    let all: Vec<u32> = (0..PARTITIONS).collect();
    assert_eq!(partitions(&first), (all.clone(), all.clone()));

    let records_written = |daemon: &Daemon| {
        daemon
            .metric("aerostream_outbox_published_total", &["event_type=\"changelog\""])
            .unwrap()
    };
    let records_read = |daemon: &Daemon| {
        daemon
            .metric("aerostream_changelog_read_total", &["kind=\"record\""])
            .unwrap()
    };
    // Counted once the first daemon has published its records and read them back.
    let caught_up = |daemon: &Daemon| {
        let mut last = -1.0;
        wait_for("the follower caught up", Duration::from_secs(30), || {
            let health: serde_json::Value = daemon.get("/health").ok()?;
            let read = records_read(daemon);
            let idle = health["outbox_backlog"] == 0 && read == std::mem::replace(&mut last, read);
            idle.then_some(())
        })
        .unwrap();
    };
    caught_up(&first);
    let (history, written_before) = (records_read(&first), records_written(&first));

    // A second daemon asks for partitions 2 and 3: the broker makes it active there.
    let node = harness.node_with(Harness::new().daemon_key("preferred_partitions = [2, 3]"));
    let mut second = node.start();
    second.wait_subscribed(Duration::from_secs(30)).unwrap();
    publish(parts[1]);
    wait_handled(&[&first, &second], parts[0].len() + parts[1].len());
    wait_for("partitions 2 and 3 handed back", Duration::from_secs(30), || {
        (partitions(&first) == (vec![0, 1], vec![0, 1])).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", first.log_tail(), second.log_tail()));
    wait_for(
        "the second daemon owning partitions 2 and 3",
        Duration::from_secs(30),
        || (partitions(&second) == (vec![2, 3], vec![2, 3])).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", second.log_tail()));
    assert!(second.metric("aerostream_events_applied_total", &[]).unwrap() > 0.0);

    // The second daemon dies: the first takes 2 and 3 back from where it had read them.
    caught_up(&first);
    let written_by_second = records_written(&second);
    let read_before = records_read(&first);
    second.kill().unwrap();
    publish(parts[2]);
    let owners = [(&first, all.clone())];
    wait_exact(&owners, &plan.expected, true);
    assert_eq!(partitions(&first), (all.clone(), all));
    let read = records_read(&first) - read_before;
    let written_by_first = records_written(&first) - written_before;
    // What it read since: at most what both daemons wrote since the second one started (its
    // own last commits of partitions 2 and 3 included), and the record each new subscription
    // starts at (inclusive). Not the partitions' history, which it had read already.
    assert!(
        read <= written_by_second + written_by_first + 16.0,
        "read {read} records; since the second daemon started, it wrote {written_by_second}, the first {written_by_first}"
    );
    assert!(
        read < history,
        "read {read} records, the history alone is {history}"
    );
    println!(
        "handed back and restored: {read} records read after the second daemon's death; since the second daemon started, it wrote {written_by_second} records, the first {written_by_first}; {history} records read before it started"
    );
}

/// The messages the daemons together have finished: applied, deduplicated, rejected or
/// dead-lettered (a broker's copy of a message is counted apart, as redelivered).
fn handled(daemons: &[&Daemon]) -> f64 {
    let outcomes = ["applied", "deduplicated", "rejected", "dead_lettered"];
    daemons
        .iter()
        .flat_map(|d| {
            outcomes.iter().map(|outcome| {
                d.metric(&format!("aerostream_events_{outcome}_total"), &[])
                    .unwrap_or(0.0)
            })
        })
        .sum()
}

/// Waits until the daemons together have finished `count` messages.
fn wait_handled(daemons: &[&Daemon], count: usize) {
    wait_for("the messages handled", Duration::from_secs(60), || {
        (handled(daemons) >= count as f64).then_some(())
    })
    .unwrap_or_else(|e| {
        let logs: String = daemons
            .iter()
            .map(|d| {
                format!(
                    "{}\n{}\n",
                    d.get::<serde_json::Value>("/health")
                        .map_or_else(|e| e.to_string(), |h| h.to_string()),
                    d.log_tail()
                )
            })
            .collect();
        panic!("{e}: {} of {count}\n{logs}", handled(daemons))
    });
}

/// A changelog whose partition count is not the inputs' cannot be owned partition by partition:
/// the daemon says so at start, naming each Failover input, and works on (its records share the
/// changelog's partitions). Here the changelog is one partition of a partitioned topic, a topic
/// of no partitions of its own, and the inputs have 4.
#[test]
fn a_changelog_without_the_inputs_partition_count_is_named_at_start() {
    let harness = Harness::new()
        .partitions(PARTITIONS)
        .extra("[changelog]\ntopic = \"aerostream-changelog-partition-0\"\n")
        .build();
    let plan = plan(harness.config());
    let daemon = harness.start();
    daemon.wait_subscribed(Duration::from_secs(30)).unwrap();
    wait_for("the warning", Duration::from_secs(30), || {
        let log = daemon.log_text();
        let warned = |input: &str| {
            log.lines().any(|line| {
                line.contains("WARN")
                    && line.contains("does not have this input's partition count")
                    && line.contains(&format!("input={input}"))
                    && line.contains("input_partitions=4 changelog_partitions=1")
            })
        };
        (warned("campaigns") && warned("payments")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
    publish_and_finish(&harness, &[&daemon], &plan);
    let all: Vec<u32> = (0..PARTITIONS).collect();
    wait_exact(&[(&daemon, all)], &plan.expected, true);
}
