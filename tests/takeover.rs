//! Standby takeover through the changelog (docs/TAKEOVER.md), against the real broker with
//! partitioned topics: daemons with their own data directories share one subscription, the
//! active one is SIGKILLed mid-stream again and again (or, with Key_Shared, one of three restarts),
//! and the daemon that owns the partitions at the end (every daemon, where they follow every
//! partition) serves exactly the expected state, with every output event published (after dedupe
//! by id).

mod support;

use aerostream::codec::Codec;
use aerostream::config::Config;
use aerostream::generator::{self, Options, Plan};
use aerostream::produce;
use std::time::{Duration, Instant};
use support::daemon::{wait_for, Daemon};
use support::harness::Node;
use support::topic::collect_outputs;
use support::Harness;

const PARTITIONS: u32 = 2;

/// One of the daemons sharing the broker: its own directory, port and config, and its process
/// while it runs.
struct Instance {
    daemon: Option<Daemon>,
    node: Node,
}

impl Instance {
    fn new(harness: &Harness) -> Instance {
        Instance {
            daemon: None,
            node: harness.node(),
        }
    }

    fn start(&mut self) {
        self.daemon = Some(self.node.start());
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("running")
    }

    fn applied(&self) -> f64 {
        self.daemon
            .as_ref()
            .and_then(|d| d.metric("aerostream_events_applied_total", &[]).ok())
            .unwrap_or(0.0)
    }
}

fn logs(instances: &[Instance]) -> String {
    instances
        .iter()
        .enumerate()
        .map(|(i, instance)| match &instance.daemon {
            Some(daemon) => format!("--- daemon {i}\n{}", daemon.log_tail()),
            None => String::new(),
        })
        .collect()
}

/// Waits until the daemons numbered in `which` serve exactly the expected state; on time-out,
/// fails with the first difference, each daemon's event counters and the tail of its log.
fn wait_exact(instances: &[Instance], which: &[usize], plan: &Plan, timeout: Duration) {
    for (i, instance) in instances.iter().enumerate().filter(|(i, _)| which.contains(i)) {
        let exact = wait_for("the exact state", timeout, || {
            let served = support::state::served_state(instance.daemon(), &plan.expected).ok()?;
            (served == plan.expected).then_some(())
        });
        if let Err(e) = exact {
            let difference = support::state::served_state(instance.daemon(), &plan.expected)
                .map(|served| support::state::first_difference(&served, &plan.expected));
            let counters: Vec<String> = instances
                .iter()
                .map(|other| {
                    let text = other.daemon().metrics_text().unwrap_or_default();
                    text.lines()
                        .filter(|line| {
                            !line.starts_with('#')
                                && [
                                    "applied",
                                    "changelog",
                                    "dedup",
                                    "outbox_backlog",
                                    "dead_letter",
                                    "retried",
                                ]
                                .iter()
                                .any(|name| line.contains(name))
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .collect();
            panic!(
                "daemon {i}: {e}: {difference:?}\n{counters:#?}\n{}",
                logs(instances)
            );
        }
    }
}

fn plan(config: &Config, seed: u64, events: usize) -> Plan {
    generator::plan(&Options {
        seed,
        campaigns: 20,
        payments: 300,
        events,
        duplicate_fraction: 0.05,
        reorder_window: 4,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    })
}

/// A daemon that follows every changelog partition as a standby has the state of the ones it
/// takes over already: both daemons serve the exact state at the end.
#[test]
fn the_standby_takes_over_after_each_sigkill_with_nothing_lost_or_applied_twice() {
    takeover("all");
}

/// With no standby partitions the surviving daemon restores each partition it takes over from
/// where it last read it, and serves the exact state at the end; the restarted one owns nothing.
#[test]
fn a_daemon_without_standby_partitions_restores_what_it_takes_over_with_nothing_lost_or_applied_twice() {
    takeover("0");
}

/// Five SIGKILLs of the active daemon, with `changelog.standby_partitions = standbys`.
fn takeover(standbys: &str) {
    let kills: usize = std::env::var("AEROSTREAM_TAKEOVER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let standby_partitions = if standbys == "all" { "\"all\"" } else { standbys };
    let harness = Harness::new()
        .partitions(PARTITIONS)
        .extra(&format!(
            "[changelog]\nstandby_partitions = {standby_partitions}\n"
        ))
        .build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let mut instances = [Instance::new(&harness), Instance::new(&harness)];
    let plan = plan(config, 71, 9_000);
    let mut outputs = harness.output_readers();

    // The first to subscribe is active; the other follows the changelog as a standby.
    instances[0].start();
    instances[1].start();
    // The stream in one part per kill and one after the last: each kill comes while its part is
    // being published, and the next part follows it, however slow the daemons are.
    let parts: Vec<Vec<_>> = plan
        .stream
        .chunks(plan.stream.len().div_ceil(kills + 1))
        .map(<[_]>::to_vec)
        .collect();
    let publish = |part: &[generator::Planned]| {
        let (config, events) = (config.clone(), part.to_vec());
        runtime.spawn(async move { produce::publish(&config, &Codec::shipped(), &events, 500).await })
    };
    let mut takeovers = Vec::new();
    let mut killed_order = Vec::new();
    for (kill, part) in parts
        .iter()
        .take(kills)
        .enumerate()
        .map(|(i, part)| (i + 1, part))
    {
        let publisher = publish(part);
        // Whichever daemon is active now (the broker may hand the subscription to a daemon that
        // rejoins), once it has applied a share of the stream: kill it.
        let from = [instances[0].applied(), instances[1].applied()];
        let active = wait_for("a daemon at work", Duration::from_secs(60), || {
            (0..2).find(|&i| instances[i].applied() >= from[i] + 300.0)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&instances)));
        let standby = 1 - active;
        let before = instances[standby].applied();
        instances[active].daemon.as_mut().unwrap().kill().unwrap();
        let killed = Instant::now();
        wait_for("the standby to take over", Duration::from_secs(60), || {
            (instances[standby].applied() > before).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&instances)));
        takeovers.push(killed.elapsed());
        if killed.elapsed() > Duration::from_secs(2) {
            println!("{}", logs(&instances));
        }
        killed_order.push(active);
        println!(
            "kill {kill}: daemon {active} killed; daemon {standby} applying after {:?}",
            killed.elapsed()
        );
        // The killed daemon comes back, as the standby or to take the work back.
        instances[active].start();
        runtime.block_on(publisher).unwrap().unwrap();
    }
    for part in &parts[kills..] {
        runtime.block_on(publish(part)).unwrap().unwrap();
    }
    // The survivor of the last kill owns every partition (pulsar-lite makes the longest-running
    // consumer active): it serves the exact state, and so does the other where it follows them all.
    let survivor = 1 - killed_order.last().copied().unwrap_or(1);
    let exact: Vec<usize> = if standbys == "all" {
        vec![0, 1]
    } else {
        vec![survivor]
    };
    wait_exact(&instances, &exact, &plan, Duration::from_secs(60));
    let published = collect_outputs(runtime, &mut outputs, &plan.expected_outputs);
    assert_eq!(published.distinct, plan.expected_outputs, "output event ids");
    takeovers.sort();
    println!(
        "\n| standby takeover ({kills} SIGKILLs of the active daemon: {killed_order:?}, {PARTITIONS} partitions, standby_partitions = {standbys}) | result |\n| --- | --- |\n\
         | distinct events | {} |\n| served state (daemons {exact:?}) | exact |\n\
         | output events expected = published | {} |\n| output copies re-published (same id) | {} |\n\
         | takeover (SIGKILL → survivor applying), median | {:.2?} |\n| takeover, max | {:.2?} |",
        plan.distinct,
        published.distinct.len(),
        published.copies - published.distinct.len(),
        takeovers[takeovers.len() / 2],
        takeovers.last().unwrap(),
    );
}

#[test]
#[ignore = "fails on pulsar-lite: its Key_Shared dispatcher spins at full CPU while consumers hold unacked messages and stops dispatching (docs/TAKEOVER.md); run with --run-ignored all against a broker without that fault"]
fn three_daemons_share_a_key_shared_subscription_and_one_restarts_mid_stream() {
    let harness = Harness::new()
        .partitions(PARTITIONS)
        .extra("[inputs.campaigns]\nsubscription_type = \"key_shared\"\n")
        .build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let mut instances = [
        Instance::new(&harness),
        Instance::new(&harness),
        Instance::new(&harness),
    ];
    let plan = plan(config, 73, 6_000);
    let mut outputs = harness.output_readers();
    for instance in &mut instances {
        instance.start();
    }
    let publisher = {
        let (config, events) = (config.clone(), plan.stream.clone());
        runtime.spawn(async move { produce::publish(&config, &Codec::shipped(), &events, 500).await })
    };
    let applied = |instances: &[Instance]| instances.iter().map(Instance::applied).sum::<f64>();
    wait_for("a third of the stream applied", Duration::from_secs(60), || {
        (applied(&instances) >= plan.distinct as f64 / 3.0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&instances)));
    // One daemon stops (SIGTERM: it finishes and acks what it holds) and comes back.
    let status = instances[1]
        .daemon
        .as_mut()
        .unwrap()
        .terminate(Duration::from_secs(30))
        .unwrap();
    assert!(status.success());
    assert!(!publisher.is_finished(), "the restart must come mid-stream");
    instances[1].start();
    runtime.block_on(publisher).unwrap().unwrap();
    wait_exact(&instances, &[0, 1, 2], &plan, Duration::from_secs(90));
    let published = collect_outputs(runtime, &mut outputs, &plan.expected_outputs);
    assert_eq!(published.distinct, plan.expected_outputs, "output event ids");
    let shares: Vec<f64> = instances.iter().map(Instance::applied).collect();
    println!("key_shared over 3 daemons, one restarted mid-stream: state exact on all three; applied by each since its (re)start: {shares:?}");
}
