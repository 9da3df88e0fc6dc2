//! Exactly-once under faults (SPEC §5, §6, §9, §12): a generated stream with duplicates,
//! reordering and reused idempotency keys flows while, at seeded random points of the stream,
//! actors are killed through the chaos route, the daemon is SIGKILLed and restarted, and the
//! broker is stopped and started again (the daemon stays up, /health answers 503 while the broker
//! is down and 200 once it is back). Afterwards the served state equals the expected state, every
//! expected output event was published (at least once, nothing else), and every reused key is in
//! the dead-letter topic. Campaign events are published with producer batching (several to a
//! broker entry), payment events one to an entry.
//!
//! The suite runs a short version; `scripts/chaos` runs SPEC §12's full one through the
//! `AEROSTREAM_CHAOS_*` environment overrides. Both print a summary table and the list of faults.

mod support;

use aerostream::broker;
use aerostream::codec::Codec;
use aerostream::config::Config;
use aerostream::generator::{self, Options, Planned};
use aerostream::produce;
use aerostream::views::StateView;
use aerostream_actors::AggregateKind;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::daemon::{self, wait_for, Daemon};
use support::state::{first_difference, served_state};
use support::topic::{collect_outputs, TopicReader};
use support::{free_port, BrokerOptions, LocalBroker};

const TOKEN: &str = "chaos-test-token";
const KILL_ACTOR: &str = "/admin/chaos/kill-actor";
/// How far the generator moves an event from its place (only across events it commutes with).
const REORDER_WINDOW: usize = 8;

/// Chaos parameters: environment overrides let `scripts/chaos` run the long version.
struct Chaos {
    seed: u64,
    events: usize,
    campaigns: usize,
    payments: usize,
    /// SIGKILLs of the daemon, each followed by a restart.
    kills: usize,
    /// Actors killed through the chaos route, campaign and payment actors in turn.
    actor_kills: usize,
    broker_restarts: usize,
    /// How long the broker stays down once the daemon has noticed (/health answers 503).
    broker_down: Duration,
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
            actor_kills: var("AEROSTREAM_CHAOS_ACTOR_KILLS", 2) as usize,
            broker_restarts: var("AEROSTREAM_CHAOS_BROKER_RESTARTS", 1) as usize,
            broker_down: Duration::from_secs(var("AEROSTREAM_CHAOS_BROKER_DOWN_SECONDS", 3)),
            rate: var("AEROSTREAM_CHAOS_RATE", 1_500) as u32,
        }
    }
}

/// A SIGKILL or an actor kill waits until the daemon has applied this many events since it
/// started: it hits a daemon at work, not one still starting.
const APPLIED_BEFORE_FAULT: f64 = 100.0;

/// A fault the run injects.
#[derive(Debug, Clone, Copy)]
enum Fault {
    ActorKill(AggregateKind),
    Sigkill,
    BrokerRestart,
}

impl Fault {
    fn name(self) -> String {
        match self {
            Fault::ActorKill(kind) => format!("{} actor kill", kind.as_str()),
            Fault::Sigkill => "SIGKILL + restart".into(),
            Fault::BrokerRestart => "broker restart".into(),
        }
    }
}

/// The faults in a seeded random order, each at a seeded random stream position (messages sent):
/// the stretch between 5 % and 85 % of the stream is cut into one slot per fault, and each fault
/// falls somewhere inside its slot, so that they are spread over the stream and each finds the
/// daemon working again after the one before.
fn schedule(chaos: &Chaos, rng: &mut ChaCha8Rng, stream_len: usize) -> Vec<(usize, Fault)> {
    let mut faults: Vec<Fault> = (0..chaos.actor_kills)
        .map(|i| {
            Fault::ActorKill(if i % 2 == 0 {
                AggregateKind::Campaign
            } else {
                AggregateKind::Payment
            })
        })
        .chain(std::iter::repeat(Fault::Sigkill).take(chaos.kills))
        .chain(std::iter::repeat(Fault::BrokerRestart).take(chaos.broker_restarts))
        .collect();
    faults.shuffle(rng);
    let slot = 0.8 / faults.len().max(1) as f64;
    faults
        .into_iter()
        .enumerate()
        .map(|(i, fault)| {
            let at = 0.05 + slot * (i as f64 + rng.gen_range(0.1..0.9));
            ((at * stream_len as f64) as usize, fault)
        })
        .collect()
}

/// Where the run is: time since the stream started, messages sent.
struct Clock<'a> {
    started: Instant,
    progress: &'a Progress,
}

impl Clock<'_> {
    /// A fault lands now.
    fn landed(&self, detail: String) -> Landed {
        Landed {
            at: self.started.elapsed(),
            position: self.progress.sent(),
            detail,
        }
    }
}

/// When and where a fault landed, and what it did.
struct Landed {
    at: Duration,
    position: usize,
    detail: String,
}

/// Waits until `daemon` has applied [`APPLIED_BEFORE_FAULT`] events; returns how many it has.
fn at_work(daemon: &Daemon) -> f64 {
    wait_for("events applied by this daemon", Duration::from_secs(120), || {
        let applied = all_applied(daemon);
        (applied >= APPLIED_BEFORE_FAULT).then_some(applied)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", explain(daemon)))
}

fn all_applied(daemon: &Daemon) -> f64 {
    daemon
        .metric("aerostream_events_applied_total", &[])
        .unwrap_or(0.0)
}

fn restarts(daemon: &Daemon, kind: AggregateKind) -> f64 {
    daemon
        .metric(
            "aerostream_actor_restarts_total",
            &[&format!("kind=\"{}\"", kind.as_str())],
        )
        .unwrap_or(0.0)
}

#[test]
fn faults_mid_stream_lose_nothing_and_apply_nothing_twice() {
    let chaos = Chaos::from_env();
    let started = Instant::now();
    let dir = RunDir::new();
    let broker = LocalBroker::start_with(BrokerOptions {
        data_dir: Some(dir.path().join("broker")),
        ..BrokerOptions::default()
    })
    .unwrap();
    let port = free_port().unwrap();
    let admin = format!("admin_token = {TOKEN:?}\n\n[chaos]\nenabled = true\n");
    let config_path = daemon::write_config(dir.path(), &broker.url(), port, &admin).unwrap();
    let config = Config::load(Some(&config_path)).unwrap();
    let plan = generator::plan(&Options {
        seed: chaos.seed,
        campaigns: chaos.campaigns,
        payments: chaos.payments,
        events: chaos.events,
        duplicate_fraction: 0.12,
        reorder_window: REORDER_WINDOW,
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

    // The stream flows at a bounded rate while the faults land at seeded random points of it.
    let mut rng = ChaCha8Rng::seed_from_u64(chaos.seed);
    let faults = schedule(&chaos, &mut rng, plan.stream.len());
    let progress = Arc::new(Progress::default());
    let clock = Clock {
        started: Instant::now(),
        progress: &progress,
    };
    let publisher = runtime.spawn(publish_through_faults(
        config.clone(),
        plan.stream.clone(),
        chaos.rate,
        progress.clone(),
    ));
    let mut injected: Vec<(Fault, Landed)> = Vec::new();
    for (n, (position, fault)) in faults.into_iter().enumerate() {
        wait_for("the fault's stream position", Duration::from_secs(600), || {
            (progress.sent() >= position || publisher.is_finished()).then_some(())
        })
        .unwrap();
        assert!(
            !publisher.is_finished(),
            "fault {} ({}) must come mid-stream",
            n + 1,
            fault.name()
        );
        let landed = match fault {
            Fault::ActorKill(kind) => kill_an_actor(&daemon, kind, &plan.stream, &clock)
                .unwrap_or_else(|e| panic!("{e:#}\n{}", explain(&daemon))),
            Fault::Sigkill => {
                let applied = at_work(&daemon);
                let pid = daemon.pid();
                daemon.kill().unwrap();
                let landed = clock.landed(format!(
                    "pid {pid} after {applied} events applied in its life; restarted"
                ));
                daemon = Daemon::start(&config_path, port).unwrap();
                landed
            }
            Fault::BrokerRestart => restart_broker(&broker, &mut daemon, chaos.broker_down, &clock)
                .unwrap_or_else(|e| panic!("{e:#}\n{}", explain(&daemon))),
        };
        println!(
            "fault {}: {} at {:.1} s, message {}: {}",
            n + 1,
            fault.name(),
            landed.at.as_secs_f64(),
            landed.position,
            landed.detail
        );
        injected.push((fault, landed));
    }
    runtime.block_on(publisher).unwrap().unwrap();
    let stream_elapsed = clock.started.elapsed();
    wait_for_exact_state(&daemon, &plan.expected, Duration::from_secs(300));

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
    wait_for_exact_state(&daemon, &plan.expected, Duration::from_secs(30));

    // Every expected output event was published, at least once, and nothing else.
    let published = collect_outputs(&runtime, &mut outputs, &plan.expected_outputs);
    assert_eq!(published.distinct, plan.expected_outputs, "output event ids");

    // Nothing stuck: every message received was acked (an ack waits for the outbox), and /health
    // says so.
    wait_for("every input to hold no message", Duration::from_secs(60), || {
        let (status, body) = health(&daemon)?;
        let inputs = body["components"]["inputs"].as_object()?;
        (status == 200 && inputs.values().all(|input| input["held"] == 0)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", explain(&daemon)));

    let count = |pick: fn(&Fault) -> bool| injected.iter().filter(|(f, _)| pick(f)).count();
    let rows = [
        ("distinct events", plan.distinct.to_string()),
        ("duplicate messages", duplicates.to_string()),
        ("reordering window", format!("{REORDER_WINDOW} events")),
        ("reused keys (conflicts)", plan.conflicts.len().to_string()),
        (
            "actor kills (chaos route, 202)",
            count(|f| matches!(f, Fault::ActorKill(_))).to_string(),
        ),
        (
            "SIGKILLs of the daemon",
            count(|f| matches!(f, Fault::Sigkill)).to_string(),
        ),
        (
            "broker restarts",
            count(|f| matches!(f, Fault::BrokerRestart)).to_string(),
        ),
        (
            "messages the publisher sent again after a broker error",
            progress.resent.load(Ordering::Relaxed).to_string(),
        ),
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
        (
            "stream published in",
            format!("{:.1} s", stream_elapsed.as_secs_f64()),
        ),
        ("elapsed", format!("{:.1} s", started.elapsed().as_secs_f64())),
    ];
    println!(
        "\n| chaos run (seed {}, {} events/s) | result |\n| --- | --- |",
        chaos.seed, chaos.rate
    );
    for (figure, value) in rows {
        println!("| {figure} | {value} |");
    }
    println!(
        "\n| fault | at (s into the stream) | message (of {}) | detail |\n| --- | --- | --- | --- |",
        plan.stream.len()
    );
    for (fault, landed) in &injected {
        println!(
            "| {} | {:.1} | {} | {} |",
            fault.name(),
            landed.at.as_secs_f64(),
            landed.position,
            landed.detail
        );
    }
}

/// The run's directory (config, daemon data and logs, broker data and log): removed after a
/// passing run, kept for inspection after a failing one (its path is printed).
struct RunDir(Option<tempfile::TempDir>);

impl RunDir {
    fn new() -> RunDir {
        let dir = tempfile::Builder::new()
            .prefix("aerostream-chaos-")
            .tempdir()
            .unwrap();
        RunDir(Some(dir))
    }

    fn path(&self) -> &std::path::Path {
        self.0.as_ref().expect("present until dropped").path()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.0.take() {
                eprintln!("chaos run directory kept: {}", dir.keep().display());
            }
        }
    }
}

/// Waits until the daemon serves exactly `expected`; else fails with the first difference and what
/// the daemon says of itself: /health, its counters and gauges, and its log without the client's
/// reconnection chatter.
fn wait_for_exact_state(daemon: &Daemon, expected: &StateView, timeout: Duration) {
    let exact = wait_for("the exact expected state", timeout, || {
        (served_state(daemon, expected).ok()? == *expected).then_some(())
    });
    if let Err(error) = exact {
        let difference = served_state(daemon, expected).map(|served| first_difference(&served, expected));
        panic!("{error}: {difference:?}\n{}", explain(daemon));
    }
}

/// /health, the daemon's `aerostream_*` counters and gauges, and its log's last lines without the
/// `pulsar` client's own lines.
fn explain(daemon: &Daemon) -> String {
    let health = health(daemon).map(|(status, body)| format!("{status} {body}"));
    let metrics = daemon
        .metrics_text()
        .map(|text| {
            text.lines()
                .filter(|line| line.starts_with("aerostream_") && !line.contains("_bucket{"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|e| format!("no metrics: {e}"));
    let log = daemon.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| !line.contains("pulsar::") && !line.trim_start().starts_with("at "))
        .collect();
    format!(
        "/health: {health:?}\nmetrics:\n{metrics}\ndaemon log ({}), last lines without the client's:\n{}\n{}",
        daemon.log.display(),
        lines[lines.len().saturating_sub(60)..].join("\n"),
        thread_dump(daemon)
    )
}

/// Every thread's stack of the running daemon, written next to its log when gdb is installed: where
/// a stalled daemon waits.
fn thread_dump(daemon: &Daemon) -> String {
    let path = daemon.log.with_extension("threads.txt");
    let dumped = std::process::Command::new("gdb")
        .args([
            "-p",
            &daemon.pid().to_string(),
            "-batch",
            "-ex",
            "thread apply all bt",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    match dumped {
        Ok(output) if output.status.success() => match std::fs::write(&path, &output.stdout) {
            Ok(()) => format!("thread stacks: {}", path.display()),
            Err(e) => format!("thread stacks not written: {e}"),
        },
        Ok(output) => format!("no thread stacks: gdb exited with {}", output.status),
        Err(e) => format!("no thread stacks (gdb: {e})"),
    }
}

/// Kills a running actor of `kind` through the chaos route and waits for its supervisor to
/// restart it. The route answers 404 for an actor not in memory, so it tries the aggregates of the
/// messages sent last (newest first; the newest may not be applied yet) until one is running.
fn kill_an_actor(
    daemon: &Daemon,
    kind: AggregateKind,
    stream: &[Planned],
    clock: &Clock,
) -> anyhow::Result<Landed> {
    at_work(daemon);
    let before = restarts(daemon, kind);
    let mut tried = 0usize;
    let (id, landed) = wait_for(
        &format!("a running {} actor to kill", kind.as_str()),
        Duration::from_secs(60),
        || {
            for id in recent_aggregates(stream, clock.progress.sent(), kind, 200) {
                tried += 1;
                let body = json!({ "kind": kind.as_str(), "id": id });
                match daemon.post(KILL_ACTOR, Some(TOKEN), &body) {
                    Ok(202) => return Some((id, clock.landed(String::new()))),
                    Ok(404) | Err(_) => {}
                    Ok(status) => panic!("kill-actor answered {status}"),
                }
            }
            None
        },
    )?;
    wait_for(
        "the supervisor to restart the killed actor",
        Duration::from_secs(30),
        || (restarts(daemon, kind) > before).then_some(()),
    )?;
    Ok(Landed {
        detail: format!("{id} killed ({tried} ids tried); its supervisor restarted it"),
        ..landed
    })
}

/// Up to `n` distinct aggregate ids of `kind` among the first `sent` messages, newest first.
fn recent_aggregates(stream: &[Planned], sent: usize, kind: AggregateKind, n: usize) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for planned in stream[..sent.min(stream.len())].iter().rev() {
        let aggregate = planned.event.aggregate();
        if aggregate.kind == kind && !ids.contains(&aggregate.id) {
            ids.push(aggregate.id);
            if ids.len() == n {
                break;
            }
        }
    }
    ids
}

/// Stops the broker, checks that the daemon stays up answering 503 on /health while it is down
/// for `down`, starts it again and waits until /health answers 200.
fn restart_broker(
    broker: &LocalBroker,
    daemon: &mut Daemon,
    down: Duration,
    clock: &Clock,
) -> anyhow::Result<Landed> {
    // A daemon at work loses its broker (not one still starting, already answering 503).
    daemon.wait_healthy(Duration::from_secs(120))?;
    let stopped = Instant::now();
    broker.stop_broker()?;
    let landed = clock.landed(String::new());
    let noticed = wait_for(
        "/health to answer 503, broker down",
        Duration::from_secs(30),
        || {
            let (status, body) = health(daemon)?;
            (status == 503 && body["components"]["broker"] == false).then(|| stopped.elapsed())
        },
    )?;
    // The outage lasts `down` more: its length is the fault, not a wait for readiness. Throughout,
    // the daemon runs and answers 503.
    let until = Instant::now() + down;
    while Instant::now() < until {
        anyhow::ensure!(daemon.running(), "the daemon exited while the broker was down");
        let status = daemon.status("/health")?;
        anyhow::ensure!(
            status == 503,
            "/health answered {status} while the broker was down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    broker.start_broker()?;
    let back = Instant::now();
    let outage = stopped.elapsed();
    daemon.wait_healthy(Duration::from_secs(120))?;
    anyhow::ensure!(daemon.running(), "the daemon exited");
    let detail = format!(
        "down {:.1} s; /health 503 after {:.1} s, 200 again {:.1} s after the broker was back; \
         daemon pid {} up throughout",
        outage.as_secs_f64(),
        noticed.as_secs_f64(),
        back.elapsed().as_secs_f64(),
        daemon.pid()
    );
    Ok(Landed { detail, ..landed })
}

/// /health's status and JSON body.
fn health(daemon: &Daemon) -> Option<(u16, serde_json::Value)> {
    let (status, body, _) = daemon
        .send(reqwest::Method::GET, "/health", None, Vec::new())
        .ok()?;
    Some((status, body))
}

/// How far the publisher got: messages handed to the client (the stream position the faults wait
/// for), and messages sent a second time after a broker error.
#[derive(Default)]
struct Progress {
    sent: AtomicUsize,
    resent: AtomicUsize,
}

impl Progress {
    fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }
}

/// Attempts the publisher makes before it gives up on the broker.
const PUBLISH_ATTEMPTS: usize = 10;
/// Bound on connecting, on handing one message to the client and on one receipt; the client
/// itself retries a broken connection (`broker::connect`: 10 s per operation).
const PUBLISH_STEP_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_OUTSTANDING: usize = 1_000;
/// How far behind its schedule the publisher may fall and still catch up.
const CATCH_UP: Duration = Duration::from_millis(100);

/// Publishes `stream` in order at up to `rate` messages/s, like `produce::publish`, through
/// broker restarts: when a send or a receipt fails, it connects again and sends everything from
/// the first message without a receipt, as a partner's producer would (the copies carry the same
/// event id). Messages reach the broker in stream order the first time either way.
async fn publish_through_faults(
    config: Config,
    stream: Vec<Planned>,
    rate: u32,
    progress: Arc<Progress>,
) -> anyhow::Result<()> {
    let codec = Codec::shipped();
    let mut confirmed = 0;
    let mut attempts = 0;
    while confirmed < stream.len() {
        attempts += 1;
        match publish_from(&config, &codec, &stream, rate, &mut confirmed, &progress).await {
            Ok(()) => {}
            Err(error) if attempts < PUBLISH_ATTEMPTS => {
                let again = progress.sent().saturating_sub(confirmed);
                progress.resent.fetch_add(again, Ordering::Relaxed);
                println!("publisher: {error:#}; sending again from message {confirmed} ({again} sent without a receipt)");
            }
            Err(error) => return Err(error.context(format!("publishing failed {attempts} times"))),
        }
    }
    Ok(())
}

/// One connection's worth of [`publish_through_faults`]: sends from `*confirmed` on, advancing it
/// with every receipt (receipts come back in order).
async fn publish_from(
    config: &Config,
    codec: &Codec,
    stream: &[Planned],
    rate: u32,
    confirmed: &mut usize,
    progress: &Progress,
) -> anyhow::Result<()> {
    let step =
        |what: &'static str| move |_| anyhow::anyhow!("{what}: no answer within {PUBLISH_STEP_TIMEOUT:?}");
    let (_never, mut shutdown) = tokio::sync::watch::channel(false);
    let client = tokio::time::timeout(
        PUBLISH_STEP_TIMEOUT,
        broker::connect(&config.broker, &mut shutdown),
    )
    .await
    .map_err(step("connecting"))??;
    let topic = |input: &str| config.broker.topic(&config.inputs[input].topic);
    // Campaigns as Pulsar's Java client publishes by default, several messages per broker entry
    // (an entry's ack acks all of it: the daemon acks it once every message is done, and a kill
    // in between must lose none); payments one entry per message.
    let mut campaigns = batching_producer(&client, topic("campaigns")).await?;
    let mut payments = broker::producer(&client, topic("payments")).await?;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut due = Instant::now();
    let mut receipts = FuturesOrdered::new();
    for (i, planned) in stream.iter().enumerate().skip(*confirmed) {
        if rate > 0 {
            tokio::time::sleep_until(due.into()).await;
            // After a stall (the broker away, the client reconnecting) the stream goes on at
            // `rate` instead of catching up in a burst.
            let behind = Instant::now().checked_sub(CATCH_UP).unwrap_or(due);
            due = (due + interval).max(behind);
        }
        let encoded = codec.encode_input(
            &planned.envelope,
            planned.idempotency_key.as_deref(),
            &planned.event,
        )?;
        let producer = match planned.input {
            generator::Input::Campaigns => &mut campaigns,
            generator::Input::Payments => &mut payments,
        };
        let send = broker::send_event(producer, planned.envelope.id.clone(), encoded);
        let receipt = tokio::time::timeout(PUBLISH_STEP_TIMEOUT, send)
            .await
            .map_err(step("sending"))??;
        receipts.push_back(async move { (i, receipt.await) });
        progress.sent.fetch_max(i + 1, Ordering::Relaxed);
        while receipts.len() >= MAX_OUTSTANDING {
            settle(&mut receipts, confirmed).await?;
        }
    }
    while !receipts.is_empty() {
        settle(&mut receipts, confirmed).await?;
    }
    Ok(())
}

/// A producer that puts what it is sent within 10 ms in one broker entry, up to 64 messages: at
/// the suite's 1 500 events/s, entries of about 15 events, most of them for several campaigns.
async fn batching_producer(
    client: &broker::Client,
    topic: String,
) -> Result<broker::Producer, pulsar::Error> {
    client
        .get()
        .producer()
        .with_topic(topic)
        .with_options(pulsar::ProducerOptions {
            block_queue_if_full: true,
            batch_size: Some(64),
            batch_timeout: Some(Duration::from_millis(10)),
            routing_policy: Some(pulsar::routing_policy::RoutingPolicy::RoundRobin),
            ..Default::default()
        })
        .build()
        .await
}

/// Waits for the oldest outstanding receipt.
async fn settle<F, T>(receipts: &mut FuturesOrdered<F>, confirmed: &mut usize) -> anyhow::Result<()>
where
    F: std::future::Future<Output = (usize, Result<T, pulsar::Error>)>,
{
    let next = tokio::time::timeout(PUBLISH_STEP_TIMEOUT, receipts.next())
        .await
        .map_err(|_| anyhow::anyhow!("receipt: no answer within {PUBLISH_STEP_TIMEOUT:?}"))?;
    let (i, receipt) = next.expect("a receipt is outstanding");
    receipt?;
    *confirmed = i + 1;
    Ok(())
}

fn ids_with_reason(received: &[support::topic::Received], reason: &str) -> BTreeSet<String> {
    received
        .iter()
        .filter(|m| m.property("reason") == Some(reason))
        .filter_map(|m| m.property("ce_id").map(str::to_owned))
        .collect()
}
