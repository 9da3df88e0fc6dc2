//! End-to-end throughput against the raw `pulsar` client (SPEC §12), in one run on a fresh local
//! pulsar-lite broker (127.0.0.1, behind the test relay):
//!
//! - (a) raw `pulsar` consume+ack rate of a generated backlog, with the daemon's default topics,
//!   subscription types (campaigns Failover, payments Key_Shared), consumer options and Avro payloads;
//! - (b) `target/release/aerostream run` draining the same backlog (decode, dedupe, actor, commit,
//!   flush, ack), timed from its first consumed message to its last applied one (`/health`'s counts);
//! - (c) the ratio b/a;
//! - (d) publish→applied latency at half of (b), event time = publish time, the stream published
//!   with producer batching (the default of Pulsar's Java client) and read by a raw consumer beside
//!   the daemon; its floor (the raw consumer alone); (d″) the daemon alone; and (d′) one broker
//!   entry per message (pulsar-lite then sends held messages again: `tests/broker.rs`, the
//!   redelivery probe);
//! - (e) the daemon's peak RSS (VmHWM);
//! - cost growth: events/s and peak RSS at 10, 1 000 and 100 000 live campaigns, passivation on.
//!
//! ```text
//! scripts/bench                                     (builds, runs, appends to docs/BENCHMARKS.md)
//! cargo bench --bench throughput -- [--backlog N] [--latency-seconds S] [--growth 10,1000,100000]
//!     [--latency-rate R] [--growth-events N] [--poll-ms MS] [--markdown FILE] [--perf DIR] [--keep DIR] [--throughput-only]
//! ```
//!
//! `--perf DIR` records the daemon with `perf record` and `perf stat` during the backlog run, and
//! runs nothing else: a profiling run, not a measurement. `--throughput-only` runs (a) to (c) alone.
//! Neither writes Markdown. `--keep DIR` keeps the broker's and the daemons' data, logs and metrics.

#[path = "common/machine.rs"]
mod machine;
#[path = "../tests/support/mod.rs"]
mod support;

use aerostream::broker::{self, unique_consumer_id};
use aerostream::codec::Codec;
use aerostream::config::Config;
use aerostream::generator::{self, Input, Planned};
use anyhow::{bail, Context as _};
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt};
use machine::Machine;
use pulsar::{ConsumerOptions, Pulsar, SubType, TokioExecutor};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{free_port, LocalBroker};

type Client = Pulsar<TokioExecutor>;

/// Receipts awaited at once while publishing.
const MAX_OUTSTANDING: usize = 1_000;
/// Batching producers per topic when the publisher batches.
const BATCHING_LANES: usize = 8;
/// How long any one wait may take before the run fails (bounds the run on a stuck daemon).
const PHASE_TIMEOUT: Duration = Duration::from_secs(240);
/// Poll interval while a backlog drains: the drain's end is known within 10 ms (a quarter of a
/// percent of a 4 s drain, on the slow side). The polls read `/health`'s counts, a few atomics
/// (see [`Poller`]). The latency run polls every `--poll-ms` (2 ms by default).
const BACKLOG_POLL: Duration = Duration::from_millis(10);

struct Args {
    backlog: usize,
    latency_seconds: u64,
    /// The latency runs' rate; half of (b) when not given.
    latency_rate: Option<f64>,
    growth: Vec<usize>,
    growth_events: usize,
    poll: Duration,
    markdown: Option<PathBuf>,
    perf: Option<PathBuf>,
    keep: Option<PathBuf>,
    throughput_only: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        backlog: 100_000,
        latency_seconds: 20,
        latency_rate: None,
        growth: vec![10, 1_000, 100_000],
        growth_events: 20_000,
        poll: Duration::from_millis(2),
        markdown: None,
        perf: None,
        keep: None,
        throughput_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--backlog" => args.backlog = value()?.parse()?,
            "--latency-seconds" => args.latency_seconds = value()?.parse()?,
            "--latency-rate" => args.latency_rate = Some(value()?.parse()?),
            "--growth" => {
                args.growth = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--growth-events" => args.growth_events = value()?.parse()?,
            "--poll-ms" => args.poll = Duration::from_millis(value()?.parse()?),
            "--markdown" => args.markdown = Some(value()?.into()),
            "--perf" => args.perf = Some(value()?.into()),
            "--keep" => args.keep = Some(value()?.into()),
            "--throughput-only" => args.throughput_only = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let scratch = tempfile::Builder::new().prefix("aerostream-bench-").tempdir()?;
    let work = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.canonicalize()?
        }
        None => scratch.path().to_path_buf(),
    };
    let broker = LocalBroker::start_with(support::BrokerOptions {
        data_dir: Some(work.join("broker")),
        ..Default::default()
    })?;
    let client = runtime.block_on(connect(&broker))?;
    let bench = Bench {
        args: &args,
        runtime: &runtime,
        work: &work,
        broker: &broker,
        client: &client,
        codec: Codec::shipped(),
        procs: Procs::find(),
    };
    let mut table = Table::default();
    let e2e_rate = bench.throughput(&mut table)?;
    if args.perf.is_none() && !args.throughput_only {
        let rate = args.latency_rate.unwrap_or(e2e_rate / 2.0);
        bench.latency(&mut table, rate, LatencyRun::Batched)?;
        bench.latency_floor(&mut table, rate)?;
        bench.latency(&mut table, rate, LatencyRun::Alone)?;
        bench.latency(&mut table, rate, LatencyRun::PerMessage)?;
        for &campaigns in &args.growth {
            bench.growth(&mut table, campaigns)?;
        }
    }
    let rendered = table.render();
    println!("{rendered}");
    if let (Some(path), None, false) = (&args.markdown, &args.perf, args.throughput_only) {
        std::fs::write(path, rendered).with_context(|| format!("writing {}", path.display()))?;
    }
    drop(client);
    drop(broker);
    Ok(())
}

/// What every phase shares.
struct Bench<'a> {
    args: &'a Args,
    runtime: &'a tokio::runtime::Runtime,
    work: &'a Path,
    broker: &'a LocalBroker,
    client: &'a Client,
    codec: Codec,
    procs: Procs,
}

/// The inputs the bench drives: (config name, generator input).
const INPUTS: [(&str, Input); 2] = [("campaigns", Input::Campaigns), ("payments", Input::Payments)];

impl Bench<'_> {
    /// (a), (b), (c), (e): one backlog, drained by the raw client, then by the daemon. Returns (b).
    fn throughput(&self, table: &mut Table) -> anyhow::Result<f64> {
        let args = self.args;
        eprintln!("== backlog of {} events", args.backlog);
        let phase = Phase::new(self.work, self.broker, "tput", "")?;
        let plan = generator::plan(&generator::Options {
            events: args.backlog,
            duplicate_fraction: 0.0,
            ..generator::Options::for_daemon(&phase.config)
        });
        self.runtime.block_on(async {
            phase.create_subscriptions(self.broker).await?;
            for (input, _) in INPUTS {
                let (topic, kind, queue) = phase.input(input);
                let subscription = format!("bench-raw-{input}");
                subscribe(self.broker, &topic, &subscription, kind, queue)
                    .await?
                    .1
                    .close()
                    .await?;
            }
            anyhow::Ok(())
        })?;
        let published = self.runtime.block_on(publish(
            self.client,
            &self.codec,
            &phase.config,
            plan.stream,
            Entries::PerMessage,
            None,
            None,
        ))?;
        let total = published.total();
        eprintln!(
            "published {total} messages at {:.0}/s",
            total as f64 / published.elapsed.as_secs_f64()
        );
        table.row(
            "backlog (generator defaults: 50 campaigns, 500 payments; no duplicates)",
            format!(
                "{total} events: campaigns {} msgs, {:.0} B avg Avro payload (Failover); payments {} msgs, \
                 {:.0} B avg (Key_Shared)",
                published.count(Input::Campaigns),
                published.average(Input::Campaigns),
                published.count(Input::Payments),
                published.average(Input::Payments),
            ),
        );

        eprintln!("== raw pulsar consume+ack");
        let cpu_before = self.procs.sample(None);
        let raw = self.runtime.block_on(async {
            let runs = INPUTS.map(|(input, kind)| {
                let (topic, sub_type, queue) = phase.input(input);
                let subscription = format!("bench-raw-{input}");
                let expected = published.count(kind);
                async move {
                    let consumer = subscribe(self.broker, &topic, &subscription, sub_type, queue).await?;
                    drain(consumer, expected, None).await
                }
            });
            futures::future::try_join_all(runs).await
        })?;
        let raw_cpu = self.procs.sample(None).since(&cpu_before);
        let raw_first = raw.iter().map(|r| r.first).min().expect("two inputs");
        let raw_last = raw.iter().map(|r| r.last).max().expect("two inputs");
        let raw_elapsed = raw_last - raw_first;
        let raw_rate = total as f64 / raw_elapsed.as_secs_f64();
        let raw_redelivered: usize = raw.iter().map(|r| r.redelivered).sum();
        eprintln!("raw: {raw_rate:.0} events/s");

        eprintln!("== aerostream end to end");
        let cpu_before = self.procs.sample(None);
        let daemon = Daemon::start(&phase)?;
        let perf = match &args.perf {
            Some(dir) => Some(Perf::record(dir, daemon.pid())?),
            None => None,
        };
        let expected = total as f64;
        let samples = Poller::spawn(&daemon, BACKLOG_POLL, move |s| s.done() >= expected).join()?;
        let (consuming_from, applied_at) = consumption_window(&samples, daemon.spawned);
        let e2e_elapsed = applied_at - consuming_from;
        let e2e_rate = expected / e2e_elapsed.as_secs_f64();
        if let Some(perf) = perf {
            perf.stop()?;
        }
        let e2e_cpu = self.procs.sample(Some(daemon.pid())).since(&cpu_before);
        let e2e_rss = daemon.peak_rss()?;
        let spawned = daemon.spawned;
        let metrics = daemon.metrics()?;
        std::fs::write(phase.dir.join("metrics.txt"), &metrics)?;
        daemon.stop()?;
        eprintln!(
            "aerostream: {e2e_rate:.0} events/s, peak RSS {} MiB",
            e2e_rss >> 20
        );

        table.row(
            "(a) raw `pulsar` consume+ack: one consumer per topic, as the daemon subscribes, individual acks",
            format!("**{raw_rate:.0} events/s** ({:.2} s)", raw_elapsed.as_secs_f64()),
        );
        table.row(
            "(b) aerostream end to end (decode, dedupe, actor, commit, flush, ack), shipped config",
            format!(
                "**{e2e_rate:.0} events/s** ({:.2} s from first consumed to all applied; process start to \
                 first consumed {:.2} s)",
                e2e_elapsed.as_secs_f64(),
                (consuming_from - spawned).as_secs_f64(),
            ),
        );
        table.row("(c) ratio b/a", format!("**{:.2}**", e2e_rate / raw_rate));
        table.row(
            "(e) peak RSS of the daemon (VmHWM), backlog run",
            format!("**{:.0} MiB**", mib(e2e_rss)),
        );
        table.row(
            "CPU per 1 000 events, raw run: client / relay / broker",
            raw_cpu.per_thousand(total, &["client", "relay", "broker"]),
        );
        table.row(
            "CPU per 1 000 events, aerostream run: daemon / relay / broker",
            e2e_cpu.per_thousand(total, &["daemon", "relay", "broker"]),
        );
        table.row(
            "backlog runs: messages the broker delivered twice, raw / daemon (redelivered)",
            format!(
                "{raw_redelivered} / {:.0}",
                metric_sum(&metrics, "aerostream_events_redelivered_total", None)
            ),
        );
        table.row(
            "backlog run: the committer's transactions / events per transaction",
            transactions(&metrics),
        );
        Ok(e2e_rate)
    }

    /// (d): publish → applied at `rate` events/s, event time = publish time.
    fn latency(&self, table: &mut Table, rate: f64, run: LatencyRun) -> anyhow::Result<()> {
        let rate = rate.max(1.0);
        let (tag, how, label) = match run {
            LatencyRun::Batched => ("latency", "producer batching", "(d)"),
            LatencyRun::Alone => (
                "latency-alone",
                "producer batching",
                "(d″) the daemon alone, no raw consumer beside it:",
            ),
            LatencyRun::PerMessage => (
                "latency-unbatched",
                "one broker entry per message",
                "(d′) one broker entry per message:",
            ),
        };
        let raw = run.raw_beside();
        eprintln!(
            "== latency at {rate:.0} events/s for {} s, {how}",
            self.args.latency_seconds
        );
        let phase = Phase::new(self.work, self.broker, tag, "")?;
        let (plan, expected) = self.latency_plan(&phase, rate);
        let daemon = Daemon::start(&phase)?;
        daemon.wait_healthy()?;
        let stamps = Stamps::default();
        let (cpu_before, machine_before) = (self.procs.sample(Some(daemon.pid())), Machine::sample());
        let poller = Poller::spawn(&daemon, self.args.poll, move |s| {
            s.campaigns >= expected[0] as f64 && s.payments >= expected[1] as f64
        });
        let received = self.publish_and_receive(&phase, plan.stream, expected, rate, run, &stamps);
        let samples = poller.join()?;
        let cpu = self.procs.sample(Some(daemon.pid())).since(&cpu_before);
        let machine = Machine::sample().since(&machine_before);
        let (transit, published) = received?;
        let metrics = daemon.metrics()?;
        std::fs::write(phase.dir.join("metrics.txt"), &metrics)?;
        let rss = daemon.peak_rss()?;
        daemon.stop()?;

        let applied = INPUTS.map(|(_, input)| stamps.applied_latencies(input, &samples));
        let all = sorted(applied.iter().flatten().copied());
        let transit_all = sorted(transit.iter().flat_map(|r| r.latencies.iter().copied()));
        let processing = histogram_quantiles(
            &metrics,
            "aerostream_processing_duration_seconds",
            None,
            &[0.5, 0.99, 0.999],
        );
        let bound = |q: Option<f64>| q.map_or("> 2.5 s".into(), |s| format!("≤ {:.1} ms", s * 1e3));
        let stages = aerostream::telemetry::STAGES
            .map(|stage| {
                let only = format!("stage=\"{stage}\"");
                let [p50, p99] = [0.5, 0.99].map(|q| {
                    bound(
                        histogram_quantiles(
                            &metrics,
                            "aerostream_processing_stage_seconds",
                            Some(&only),
                            &[q],
                        )[0],
                    )
                });
                format!("{stage} {p50} / {p99}")
            })
            .join("; ");
        table.row(
            &format!(
                "{label} publish→applied at {rate:.0} events/s ({}), {} events over {:.0} s, \
                 {how}: p50 / p99 / p999 / max",
                if self.args.latency_rate.is_some() {
                    "--latency-rate"
                } else {
                    "half of b"
                },
                published.total(),
                published.elapsed.as_secs_f64()
            ),
            match run {
                LatencyRun::Batched => format!("**{}**", quantiles(&all)),
                LatencyRun::Alone | LatencyRun::PerMessage => quantiles(&all),
            },
        );
        table.row(
            &format!("{label} publish→applied by topic: campaigns (Failover) ; payments (Key_Shared)"),
            format!("{} ; {}", quantiles(&applied[0]), quantiles(&applied[1])),
        );
        if raw {
            table.row(
                &format!(
                    "{label} publish→received by a raw consumer on the same stream (broker + relay + \
                     client): p50 / p99 / p999 / max"
                ),
                quantiles(&transit_all),
            );
        }
        table.row(
            &format!(
                "{label} received→durable inside the daemon (processing histogram, bucket upper \
                 bounds): p50 / p99 / p999"
            ),
            processing
                .iter()
                .map(|q| bound(*q))
                .collect::<Vec<_>>()
                .join(" / "),
        );
        table.row(
            &format!("{label} received→durable by stage (stage histogram, bucket upper bounds): p50 / p99"),
            stages,
        );
        table.row(
            &format!("{label} peak RSS / messages delivered twice, raw / daemon"),
            format!(
                "{:.0} MiB / {} / {:.0}",
                mib(rss),
                if raw {
                    transit.iter().map(|r| r.redelivered).sum::<usize>().to_string()
                } else {
                    "—".into()
                },
                metric_sum(&metrics, "aerostream_events_redelivered_total", None)
            ),
        );
        table.row(
            &format!("{label} the committer's transactions / events per transaction"),
            transactions(&metrics),
        );
        table.row(
            &format!(
                "{label} CPU per 1 000 events while it ran: daemon / bench (publisher, poller{}) / relay / \
                 broker; the machine's CPUs busy / stolen by the hypervisor",
                if raw { ", raw consumer" } else { "" }
            ),
            format!(
                "{}; {}",
                cpu.per_thousand(published.total(), &["daemon", "client", "relay", "broker"]),
                machine.shares()
            ),
        );
        Ok(())
    }

    /// The latency runs' stream (the same in each): `--latency-seconds` at `rate`, no duplicates;
    /// and how many of its events go to each input.
    fn latency_plan(&self, phase: &Phase, rate: f64) -> (generator::Plan, [usize; 2]) {
        let plan = generator::plan(&generator::Options {
            seed: 2,
            events: (rate * self.args.latency_seconds as f64) as usize,
            duplicate_fraction: 0.0,
            ..generator::Options::for_daemon(&phase.config)
        });
        let count = |input| plan.stream.iter().filter(|e| e.input == input).count();
        let expected = INPUTS.map(|(_, input)| count(input));
        (plan, expected)
    }

    /// Publishes `stream` at `rate` (stamping each event) on the bench's client while a raw consumer
    /// per input, on its own subscription and client, receives and acks it: what the broker, the
    /// relay and the client take.
    fn publish_and_receive(
        &self,
        phase: &Phase,
        stream: Vec<Planned>,
        expected: [usize; 2],
        rate: f64,
        run: LatencyRun,
        stamps: &Stamps,
    ) -> anyhow::Result<(Vec<Drained>, Published)> {
        self.runtime.block_on(async {
            let mut consumers = Vec::new();
            let raw = run.raw_beside();
            for ((input, kind), expected) in INPUTS.into_iter().zip(expected).filter(|_| raw) {
                let (topic, sub_type, queue) = phase.input(input);
                let subscription = format!("bench-transit-{input}");
                let consumer = subscribe(self.broker, &topic, &subscription, sub_type, queue).await?;
                consumers.push(drain(consumer, expected, Some((stamps.clone(), kind))));
            }
            let consumers = futures::future::try_join_all(consumers);
            let publisher = publish(
                self.client,
                &self.codec,
                &phase.config,
                stream,
                run.entries(),
                Some(rate),
                Some(stamps),
            );
            futures::future::try_join(consumers, publisher).await
        })
    }

    /// The floor under (d): the same batched stream at the same rate with no daemon running, only
    /// the raw consumer.
    fn latency_floor(&self, table: &mut Table, rate: f64) -> anyhow::Result<()> {
        let rate = rate.max(1.0);
        eprintln!("== latency floor at {rate:.0} events/s, no daemon");
        let phase = Phase::new(self.work, self.broker, "latency-floor", "")?;
        let (plan, expected) = self.latency_plan(&phase, rate);
        let stamps = Stamps::default();
        let (transit, published) =
            self.publish_and_receive(&phase, plan.stream, expected, rate, LatencyRun::Batched, &stamps)?;
        let all = sorted(transit.iter().flat_map(|r| r.latencies.iter().copied()));
        table.row(
            &format!(
                "(d) floor, no daemon: publish→received by the raw consumer alone, same rate and \
                 publisher, {} events over {:.0} s: p50 / p99 / p999 / max; delivered twice",
                published.total(),
                published.elapsed.as_secs_f64()
            ),
            format!(
                "{}; {}",
                quantiles(&all),
                transit.iter().map(|r| r.redelivered).sum::<usize>()
            ),
        );
        Ok(())
    }

    /// Cost growth: a backlog over `campaigns` campaigns, passivation after 1 s idle.
    fn growth(&self, table: &mut Table, campaigns: usize) -> anyhow::Result<()> {
        // Every campaign needs a creation and an activation; tracking events fill the rest.
        let events = self.args.growth_events.max(campaigns * 5 / 2);
        eprintln!("== growth: {campaigns} live campaigns, {events} events");
        let phase = Phase::new(
            self.work,
            self.broker,
            &format!("growth{campaigns}"),
            "[actors]\nidle_seconds = 1\n",
        )?;
        let plan = generator::plan(&generator::Options {
            seed: 3,
            campaigns,
            payments: 100,
            events,
            duplicate_fraction: 0.0,
            ..generator::Options::for_daemon(&phase.config)
        });
        self.runtime.block_on(phase.create_subscriptions(self.broker))?;
        let published = self.runtime.block_on(publish(
            self.client,
            &self.codec,
            &phase.config,
            plan.stream,
            Entries::PerMessage,
            None,
            None,
        ))?;
        let daemon = Daemon::start(&phase)?;
        let expected = published.total() as f64;
        let samples = Poller::spawn(&daemon, BACKLOG_POLL, move |s| s.done() >= expected).join()?;
        let (from, to) = consumption_window(&samples, daemon.spawned);
        let metrics = daemon.metrics()?;
        std::fs::write(phase.dir.join("metrics.txt"), &metrics)?;
        let rss = daemon.peak_rss()?;
        daemon.stop()?;
        table.row(
            &format!(
                "cost growth: {campaigns} live campaigns ({} events, 100 payments, actors.idle_seconds = 1)",
                published.total()
            ),
            format!(
                "**{:.0} events/s, peak RSS {:.0} MiB**; passivations {:.0}, snapshot restores {:.0}, \
                 sled on disk {:.0} MiB",
                expected / (to - from).as_secs_f64(),
                mib(rss),
                metric_sum(&metrics, "aerostream_actors_passivated_total", None),
                metric_sum(&metrics, "aerostream_snapshot_restores_total", None),
                mib(dir_size(&phase.data_dir())),
            ),
        );
        Ok(())
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn sorted(latencies: impl Iterator<Item = Duration>) -> Vec<Duration> {
    let mut all: Vec<Duration> = latencies.collect();
    all.sort_unstable();
    all
}

/// From the last sample before anything was consumed to the first with everything applied.
fn consumption_window(samples: &[Sample], spawned: Instant) -> (Instant, Instant) {
    let from = samples
        .iter()
        .rev()
        .find(|s| s.consumed == 0.0)
        .map_or(spawned, |s| s.at);
    (from, samples.last().map_or(from, |s| s.at))
}

/// One Markdown table, `| figure | value |`.
#[derive(Default)]
struct Table(Vec<(String, String)>);

impl Table {
    fn row(&mut self, figure: &str, value: String) {
        eprintln!("  {figure}: {value}");
        self.0.push((figure.to_owned(), value));
    }

    fn render(&self) -> String {
        let mut out = String::from("| figure | value |\n| --- | --- |\n");
        for (figure, value) in &self.0 {
            let _ = writeln!(out, "| {figure} | {value} |");
        }
        out
    }
}

/// A daemon configuration with its own topics (`bench-<tag>.*`), data directory and HTTP port.
struct Phase {
    dir: PathBuf,
    config_path: PathBuf,
    config: Config,
    port: u16,
}

impl Phase {
    fn new(work: &Path, broker: &LocalBroker, tag: &str, extra: &str) -> anyhow::Result<Phase> {
        let dir = work.join(tag);
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let body = format!(
            "[daemon]\ndata_dir = {data:?}\nshutdown_timeout_seconds = 20\n\n\
             [broker]\nurl = {url:?}\n\n\
             [http]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [inputs.campaigns]\ntopic = \"bench-{tag}.campanas\"\ndead_letter_topic = \"bench-{tag}.campanas-DLQ\"\n\n\
             [inputs.payments]\ntopic = \"bench-{tag}.pagos\"\ndead_letter_topic = \"bench-{tag}.pagos-DLQ\"\n\n\
             [changelog]\ntopic = \"bench-{tag}.changelog\"\n\n\
             {extra}",
            data = dir.join("data").display().to_string(),
            url = broker.url(),
        );
        let config_path = dir.join("aerostream.toml");
        std::fs::write(&config_path, body)?;
        let config = Config::load(Some(&config_path))?;
        Ok(Phase {
            dir,
            config_path,
            config,
            port,
        })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The fully qualified topic, subscription type and receive queue of input `name`.
    fn input(&self, name: &str) -> (String, SubType, u32) {
        let input = &self.config.inputs[name];
        (
            self.config.broker.topic(&input.topic),
            input.subscription_type.sub_type(),
            aerostream::ingest::receive_queue(input),
        )
    }

    /// Creates the daemon's subscriptions, so that a backlog published now waits for it.
    async fn create_subscriptions(&self, broker: &LocalBroker) -> anyhow::Result<()> {
        for (name, _) in INPUTS {
            let (topic, kind, queue) = self.input(name);
            let subscription = &self.config.inputs[name].subscription;
            subscribe(broker, &topic, subscription, kind, queue)
                .await?
                .1
                .close()
                .await?;
        }
        Ok(())
    }
}

/// A raw consumer and the client it was built on.
type RawConsumer = (Client, pulsar::Consumer<Vec<u8>, TokioExecutor>);

/// A consumer set up as `ingest::subscribe` sets up the daemon's: on a client (a connection) of its
/// own, fresh consumer id, the daemon's batch size and receive queue (`ingest::receive_queue`).
///
/// A connection of its own, as each of the daemon's inputs has (`partitions.rs`): a consumer's acks
/// on the publisher's connection hold its sends back (`tests/broker.rs`, `probe_latency_floor`: at
/// 11 000 messages/s, sent → received p99 5.3 ms on two connections, 136 ms on one).
async fn subscribe(
    broker: &LocalBroker,
    topic: &str,
    subscription: &str,
    kind: SubType,
    queue: u32,
) -> anyhow::Result<RawConsumer> {
    let consumer_id = unique_consumer_id();
    let client = connect(broker).await?;
    let consumer = client
        .consumer()
        .with_topic(topic)
        .with_subscription(subscription)
        .with_subscription_type(kind)
        .with_consumer_id(consumer_id)
        .with_consumer_name(format!("bench-{consumer_id}"))
        .with_batch_size(queue)
        .with_options(ConsumerOptions::default().with_receiver_queue_size(queue))
        .build::<Vec<u8>>()
        .await?;
    Ok((client, consumer))
}

/// A client of its own to the bench's broker.
async fn connect(broker: &LocalBroker) -> anyhow::Result<Client> {
    Ok(Pulsar::builder(broker.url(), TokioExecutor).build().await?)
}

struct Drained {
    first: Instant,
    last: Instant,
    /// Messages the broker delivered again after they were received (and acked).
    redelivered: usize,
    /// Publish → first receipt, when publish instants were given.
    latencies: Vec<Duration>,
}

/// Receives and acks (one by one, as the daemon does) until `expected` distinct messages have
/// arrived. pulsar-lite sometimes delivers a message again although it was acked: those are
/// acked again and counted, not counted as progress.
async fn drain(
    (_client, mut consumer): RawConsumer,
    expected: usize,
    stamps: Option<(Stamps, Input)>,
) -> anyhow::Result<Drained> {
    let mut seen = HashSet::with_capacity(expected);
    let mut first = None;
    let mut redelivered = 0;
    let mut latencies = Vec::new();
    while seen.len() < expected {
        let message = tokio::time::timeout(PHASE_TIMEOUT, consumer.next())
            .await
            .with_context(|| format!("raw consumer: {} of {expected} messages received", seen.len()))?
            .context("consumer stream ended")??;
        let now = Instant::now();
        first.get_or_insert(now);
        let id = message.message_id();
        if seen.insert((id.ledger_id, id.entry_id, id.batch_index)) {
            if let Some((stamps, _)) = &stamps {
                let ce_id = message
                    .payload
                    .metadata
                    .properties
                    .iter()
                    .find(|kv| kv.key == "ce_id");
                if let Some(published) = ce_id.and_then(|kv| stamps.published(&kv.value)) {
                    latencies.push(now.saturating_duration_since(published));
                }
            }
        } else {
            redelivered += 1;
        }
        consumer.ack(&message).await?;
    }
    let last = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(5), consumer.close()).await;
    Ok(Drained {
        first: first.unwrap_or(last),
        last,
        redelivered,
        latencies,
    })
}

/// Messages and payload bytes published, per input.
#[derive(Default)]
struct Published {
    sent: [(usize, usize); 2],
    elapsed: Duration,
}

impl Published {
    fn slot(input: Input) -> usize {
        match input {
            Input::Campaigns => 0,
            Input::Payments => 1,
        }
    }

    fn count(&self, input: Input) -> usize {
        self.sent[Self::slot(input)].0
    }

    fn average(&self, input: Input) -> f64 {
        let (count, bytes) = self.sent[Self::slot(input)];
        bytes as f64 / count.max(1) as f64
    }

    fn total(&self) -> usize {
        self.sent.iter().map(|(count, _)| count).sum()
    }
}

/// When each event was published: in publish order per input, and by event id.
#[derive(Clone, Default)]
struct Stamps(Arc<Mutex<StampsInner>>);

#[derive(Default)]
struct StampsInner {
    in_order: [Vec<Instant>; 2],
    by_id: HashMap<String, Instant>,
}

impl Stamps {
    fn record(&self, input: Input, id: &str, at: Instant) {
        let mut inner = self.0.lock().expect("stamps");
        inner.in_order[Published::slot(input)].push(at);
        inner.by_id.insert(id.to_owned(), at);
    }

    fn published(&self, id: &str) -> Option<Instant> {
        self.0.lock().expect("stamps").by_id.get(id).copied()
    }

    /// Publish → applied for every event of `input`, sorted: the n-th event counts as applied at
    /// the first `/health` sample whose applied count for that input reaches n + 1. That is an
    /// upper bound within one poll interval, exact as long as an input's events are applied in
    /// publish order; aggregates run concurrently, which at this load moves an event by a few
    /// places at most.
    fn applied_latencies(&self, input: Input, samples: &[Sample]) -> Vec<Duration> {
        let inner = self.0.lock().expect("stamps");
        let count = |s: &Sample| match input {
            Input::Campaigns => s.campaigns,
            Input::Payments => s.payments,
        };
        let latencies = inner.in_order[Published::slot(input)]
            .iter()
            .enumerate()
            .filter_map(|(n, at)| {
                let i = samples.partition_point(|s| count(s) < (n + 1) as f64);
                Some(samples.get(i)?.at.saturating_duration_since(*at))
            });
        sorted(latencies)
    }
}

/// The latency runs under (d): the stream published with producer batching with a raw consumer
/// reading it beside the daemon, the same with the daemon alone (the broker then serves the daemon
/// only, as in the floor it serves the raw consumer only), and one broker entry per message.
#[derive(Clone, Copy, PartialEq)]
enum LatencyRun {
    Batched,
    Alone,
    PerMessage,
}

impl LatencyRun {
    fn entries(self) -> Entries {
        match self {
            LatencyRun::Batched | LatencyRun::Alone => Entries::Batched,
            LatencyRun::PerMessage => Entries::PerMessage,
        }
    }

    /// Whether a raw consumer reads the stream (beside the daemon, or alone in the floor).
    fn raw_beside(self) -> bool {
        self != LatencyRun::Alone
    }
}

/// How the bench's publisher puts messages in broker entries.
#[derive(Clone, Copy, PartialEq)]
enum Entries {
    /// One entry per message, as `aerostream produce` publishes.
    PerMessage,
    /// Pulsar's producer batching (on by default in its Java client): what is sent within a
    /// millisecond goes in one entry.
    Batched,
}

/// Publishes `events` as `produce::publish` does (or batched); at `rate` events/s with event
/// time = publish time when a rate is given, as fast as the broker takes them otherwise.
async fn publish(
    client: &Client,
    codec: &Codec,
    config: &Config,
    mut events: Vec<Planned>,
    entries: Entries,
    rate: Option<f64>,
    stamps: Option<&Stamps>,
) -> anyhow::Result<Published> {
    let topic = |name: &str| config.broker.topic(&config.inputs[name].topic);
    // The `pulsar` crate's batching producer has one batch in flight at a time: its rate is a
    // batch per round trip. Several, an aggregate always on the same one, keep up with the rate.
    let lanes = match entries {
        Entries::PerMessage => 1,
        Entries::Batched => BATCHING_LANES,
    };
    let producers = |name: &'static str| {
        futures::future::try_join_all((0..lanes).map(move |_| match entries {
            Entries::PerMessage => broker::producer_on(client, topic(name)).boxed(),
            Entries::Batched => broker::batching_producer_on(client, topic(name)).boxed(),
        }))
    };
    let mut campaigns = producers("campaigns").await?;
    let mut payments = producers("payments").await?;
    let mut published = Published::default();
    let mut receipts = FuturesUnordered::new();
    let started = Instant::now();
    for (i, planned) in events.iter_mut().enumerate() {
        if let Some(rate) = rate {
            tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / rate)).into()).await;
            planned.envelope.time_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
        }
        let encoded = codec.encode_input(
            &planned.envelope,
            planned.idempotency_key.as_deref(),
            &planned.event,
        )?;
        let sent = &mut published.sent[Published::slot(planned.input)];
        sent.0 += 1;
        sent.1 += encoded.payload.len();
        let lane = (crc32c::crc32c(encoded.key.as_bytes()) as usize) % lanes;
        let producer = match planned.input {
            Input::Campaigns => &mut campaigns[lane],
            Input::Payments => &mut payments[lane],
        };
        if let Some(stamps) = stamps {
            stamps.record(planned.input, &planned.envelope.id, Instant::now());
        }
        let receipt = broker::send_event(producer, planned.envelope.id.clone(), encoded).await?;
        receipts.push(receipt);
        while receipts.len() >= MAX_OUTSTANDING {
            receipts.next().await.expect("non-empty")?;
        }
    }
    while let Some(receipt) = receipts.next().await {
        receipt?;
    }
    published.elapsed = started.elapsed();
    Ok(published)
}

/// The `aerostream` binary cargo built with this bench (release profile).
struct Daemon {
    child: Child,
    base_url: String,
    http: reqwest::blocking::Client,
    spawned: Instant,
    log: PathBuf,
}

impl Daemon {
    /// Starts `aerostream run` for `phase` and waits until `/metrics` answers.
    fn start(phase: &Phase) -> anyhow::Result<Daemon> {
        let log = phase.dir.join("daemon.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_aerostream"));
        command
            .args(["run", "--config"])
            .arg(&phase.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        die_with_parent(&mut command);
        let spawned = Instant::now();
        let child = command.spawn().context("starting target/release/aerostream")?;
        let daemon = Daemon {
            child,
            base_url: format!("http://127.0.0.1:{}", phase.port),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            spawned,
            log,
        };
        daemon.wait("the HTTP listener", |d| d.metrics().ok().map(|_| ()))?;
        Ok(daemon)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait<T>(&self, what: &str, mut check: impl FnMut(&Daemon) -> Option<T>) -> anyhow::Result<T> {
        let deadline = Instant::now() + PHASE_TIMEOUT;
        loop {
            if let Some(value) = check(self) {
                return Ok(value);
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}\n{}", self.log_tail());
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn wait_healthy(&self) -> anyhow::Result<()> {
        self.wait("a healthy daemon", |d| {
            let response = d.http.get(format!("{}/health", d.base_url)).send().ok()?;
            response.status().is_success().then_some(())
        })
    }

    fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.base_url))
            .send()?
            .error_for_status()?
            .text()?)
    }

    /// Peak resident set size so far (VmHWM), in bytes.
    fn peak_rss(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .context("no VmHWM")?
            .parse()?;
        Ok(kib * 1024)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "daemon log tail:\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }

    /// SIGTERM, then SIGKILL if it has not exited within 30 s.
    fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                eprintln!("daemon did not exit on SIGTERM; killing it\n{}", self.log_tail());
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Has a child killed when this thread (the bench's main thread) ends, however it ends.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs between fork and exec and only makes an async-signal-safe syscall.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// One reading of the inputs' counts on `/health`.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// When the answer arrived.
    at: Instant,
    consumed: f64,
    /// Distinct events done with (applied, or dead-lettered), per input. Deduplicated deliveries
    /// are not counted: the bench publishes no duplicates, so they are broker redeliveries.
    campaigns: f64,
    payments: f64,
}

impl Sample {
    fn done(&self) -> f64 {
        self.campaigns + self.payments
    }
}

fn done_count(inputs: &serde_json::Value, input: &str) -> f64 {
    ["applied", "dead_lettered"]
        .into_iter()
        .filter_map(|count| inputs[input][count].as_f64())
        .sum()
}

/// Reads the inputs' counts on `/health` every `interval` on its own thread until `done(sample)` (or
/// the phase timeout). Not `/metrics`: rendering it costs the daemon ~0.6 ms of CPU, and read every
/// 2 ms it took a quarter to a third of the daemon's samples (docs/BENCHMARKS.md).
struct Poller(thread::JoinHandle<anyhow::Result<Vec<Sample>>>);

impl Poller {
    fn spawn(daemon: &Daemon, interval: Duration, done: impl Fn(&Sample) -> bool + Send + 'static) -> Poller {
        let url = format!("{}/health", daemon.base_url);
        let http = daemon.http.clone();
        Poller(thread::spawn(move || {
            let deadline = Instant::now() + PHASE_TIMEOUT;
            let mut samples = Vec::new();
            let mut next = Instant::now();
            loop {
                // /health answers 503 while the broker or the store is unwell: its counts still hold.
                let health: serde_json::Value = http.get(&url).send()?.json()?;
                let inputs = &health["components"]["inputs"];
                let sample = Sample {
                    at: Instant::now(),
                    consumed: ["campaigns", "payments"]
                        .iter()
                        .filter_map(|input| inputs[input]["consumed"].as_f64())
                        .sum(),
                    campaigns: done_count(inputs, "campaigns"),
                    payments: done_count(inputs, "payments"),
                };
                samples.push(sample);
                if done(&sample) {
                    return Ok(samples);
                }
                if Instant::now() > deadline {
                    bail!("timed out: last /health sample {sample:?}");
                }
                next += interval;
                let now = Instant::now();
                if next > now {
                    thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
        }))
    }

    fn join(self) -> anyhow::Result<Vec<Sample>> {
        self.0.join().map_err(|_| anyhow::anyhow!("poller panicked"))?
    }
}

/// The committer's transactions in a daemon's `/metrics` and the events each carried on average.
fn transactions(metrics: &str) -> String {
    let transactions = metric_sum(metrics, "aerostream_store_transactions_total", None);
    let events = metric_sum(metrics, "aerostream_store_committed_events_total", None);
    format!("{transactions:.0} / {:.1}", events / transactions.max(1.0))
}

/// Sum of every sample of metric `name` whose labels contain `label` (`k="v"`), if given.
fn metric_sum(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split(['{', ' ']).next() == Some(name))
        .filter(|line| label.map_or(true, |l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Quantiles of a Prometheus histogram (summed over its label sets, those whose line holds `only`
/// when given) as bucket upper bounds, in seconds; `None` beyond the last finite bucket.
fn histogram_quantiles(text: &str, name: &str, only: Option<&str>, quantiles: &[f64]) -> Vec<Option<f64>> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with(&bucket) && only.map_or(true, |only| l.contains(only)))
    {
        let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let count: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        match buckets.iter_mut().find(|(b, _)| *b == bound) {
            Some((_, c)) => *c += count,
            None => buckets.push((bound, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |(_, c)| *c);
    quantiles
        .iter()
        .map(|q| {
            buckets
                .iter()
                .find(|(_, c)| *c >= q * total)
                .map(|(b, _)| *b)
                .filter(|b| b.is_finite())
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn quantiles(sorted: &[Duration]) -> String {
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
    format!(
        "{} / {} / {} / {} ms",
        ms(percentile(sorted, 0.5)),
        ms(percentile(sorted, 0.99)),
        ms(percentile(sorted, 0.999)),
        ms(sorted.last().copied().unwrap_or_default()),
    )
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// CPU time of the processes and threads the bench involves: this process (the raw client and
/// the relay's thread, `local-broker`), the pulsar-lite broker and a daemon.
struct Procs {
    relay_tid: Option<u32>,
    broker_pid: Option<u32>,
}

#[derive(Clone)]
struct CpuSample(Vec<(&'static str, f64)>);

impl Procs {
    fn find() -> Procs {
        let me = std::process::id();
        let relay_tid = std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .find(|task| {
                std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim() == "local-broker")
            })
            .and_then(|task| task.file_name().to_str()?.parse().ok());
        let broker_pid = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                stat_fields(&format!("/proc/{pid}/stat"))
                    .is_some_and(|(comm, ppid, _)| ppid == me && comm.starts_with("pulsar-lite"))
            });
        Procs {
            relay_tid,
            broker_pid,
        }
    }

    /// Seconds of CPU so far: `client` (this process minus the relay thread), `relay`, `broker`,
    /// and `daemon` when given.
    fn sample(&self, daemon: Option<u32>) -> CpuSample {
        let cpu = |path: String| stat_fields(&path).map_or(0.0, |(_, _, seconds)| seconds);
        let process = cpu("/proc/self/stat".into());
        let relay = self
            .relay_tid
            .map_or(0.0, |tid| cpu(format!("/proc/self/task/{tid}/stat")));
        let broker = self
            .broker_pid
            .map_or(0.0, |pid| cpu(format!("/proc/{pid}/stat")));
        let daemon = daemon.map_or(0.0, |pid| cpu(format!("/proc/{pid}/stat")));
        CpuSample(vec![
            ("client", process - relay),
            ("relay", relay),
            ("broker", broker),
            ("daemon", daemon),
        ])
    }
}

impl CpuSample {
    fn since(&self, before: &CpuSample) -> CpuSample {
        CpuSample(
            self.0
                .iter()
                .map(|(name, now)| {
                    let then = before.0.iter().find(|(n, _)| n == name).map_or(0.0, |(_, s)| *s);
                    (*name, now - then)
                })
                .collect(),
        )
    }

    fn per_thousand(&self, events: usize, names: &[&str]) -> String {
        names
            .iter()
            .map(|name| {
                let seconds = self.0.iter().find(|(n, _)| n == name).map_or(0.0, |(_, s)| *s);
                format!("{:.0} ms", seconds * 1e3 * 1_000.0 / events.max(1) as f64)
            })
            .collect::<Vec<_>>()
            .join(" / ")
    }
}

/// `(comm, ppid, utime + stime in seconds)` from a `/proc/.../stat` file.
fn stat_fields(path: &str) -> Option<(String, u32, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    // Fields after the command: state (3), ppid (4), ..., utime (14), stime (15).
    let ppid = fields.get(1)?.parse().ok()?;
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((comm, ppid, ticks / hz))
}

/// `perf record` (call graphs from DWARF unwind tables) and `perf stat` attached to the daemon.
struct Perf(Vec<Child>);

/// What `perf stat` counts in the daemon during a profiling run (`BENCH_PERF_STAT_EVENTS` overrides).
const PERF_STAT_EVENTS: &str =
    "task-clock,context-switches,cpu-migrations,syscalls:sys_enter_sync_file_range,\
syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync,syscalls:sys_enter_pwrite64,syscalls:sys_enter_futex,\
syscalls:sys_enter_clone3,syscalls:sys_enter_sendto,syscalls:sys_enter_write";

impl Perf {
    fn record(dir: &Path, pid: u32) -> anyhow::Result<Perf> {
        std::fs::create_dir_all(dir)?;
        let mut children = Vec::new();
        // BENCH_PERF_RECORD=0: counts only (sampling with DWARF call graphs slows the daemon).
        if std::env::var("BENCH_PERF_RECORD").map_or(true, |v| v != "0") {
            let mut command = Command::new("perf");
            command
                .args(["record", "-F", "499", "--call-graph", "dwarf,32768", "-o"])
                .arg(dir.join("perf.data"))
                .args(["-p", &pid.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("perf.log"))?);
            die_with_parent(&mut command);
            children.push(
                command
                    .spawn()
                    .context("starting perf (apt-get install linux-perf)")?,
            );
        }
        let mut command = Command::new("perf");
        command
            .args([
                "stat",
                "-e",
                &std::env::var("BENCH_PERF_STAT_EVENTS").unwrap_or(PERF_STAT_EVENTS.into()),
            ])
            .arg("-o")
            .arg(dir.join("stat.txt"))
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        children.push(command.spawn().context("starting perf stat")?);
        Ok(Perf(children))
    }

    fn stop(self) -> anyhow::Result<()> {
        for mut child in self.0 {
            // SAFETY: plain syscall on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            child.wait()?;
        }
        Ok(())
    }
}
