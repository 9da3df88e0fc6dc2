//! The `aerostream` binary: parses arguments and calls into the library.

use aerostream::codec::{compat, Codec, SchemaRegistry};
use aerostream::config::{Config, Loaded};
use aerostream::dlq::{self, DeadLetterId};
use aerostream::{daemon, generator, produce, status, telemetry};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;

/// jemalloc, not glibc's malloc: a sixth less of the daemon's CPU per event in 100 000-event drains
/// at the same peak RSS (docs/BENCHMARKS.md, "jemalloc").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation (`_RJEM_MALLOC_CONF` in the environment
/// overrides them): freed pages go back to the system within a second, by a thread of its own.
/// With the default ten seconds the 100 000-campaign run's peak RSS was a third above glibc's.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string's address, as jemalloc reads `malloc_conf`.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: it points to a string literal, never written.
unsafe impl Sync for MallocConf {}

#[derive(Parser)]
#[command(
    name = "aerostream",
    version,
    about = "Pulsar event streams into exact, queryable state"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Said under every command that reads the configuration.
const CONFIG_HELP: &str = "Configuration: the shipped defaults (config.toml, built in), overlaid by \
--config FILE, overlaid by environment variables named AEROSTREAM__<TABLE>__<KEY> (for example \
AEROSTREAM__BROKER__URL=pulsar://broker:6650 or AEROSTREAM__HTTP__ADMIN_TOKEN=secret). \
RUST_LOG overrides daemon.log_level. `aerostream config check` names every problem; \
`aerostream config print` shows each value and where it came from.";

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    #[command(after_help = CONFIG_HELP)]
    Run {
        /// Configuration file, overlaid on the shipped defaults (see below).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Publish a generated, reproducible event stream and write the state it must produce.
    ///
    /// Shows a progress line (rate, published, elapsed, ETA) on a terminal and a plain line every
    /// few seconds otherwise, then a summary.
    #[command(after_help = CONFIG_HELP)]
    Produce {
        /// Configuration file: the broker and the input topics to publish to (see below).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Random seed: the same seed gives the same stream.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Campaigns in the stream (ids camp-00000, camp-00001, …).
        #[arg(long, default_value_t = 50)]
        campaigns: usize,
        /// Payments in the stream (ids pago-000000, pago-000001, …).
        #[arg(long, default_value_t = 500)]
        payments: usize,
        /// Distinct events in all.
        #[arg(long, default_value_t = 10_000)]
        events: usize,
        /// Events per second; 0 publishes as fast as the broker takes them.
        #[arg(long, default_value_t = 0)]
        rate: u32,
        /// Fraction of events published twice.
        #[arg(long, default_value_t = 0.05)]
        duplicates: f64,
        /// How many places an event may move from its generated position.
        #[arg(long, default_value_t = 8)]
        reorder_window: usize,
        /// Fraction of keyed payment events whose key is reused afterwards with other content.
        #[arg(long, default_value_t = 0.0)]
        conflicts: f64,
        /// Where to write the expected final state (JSON).
        #[arg(long, default_value = "expected-state.json", value_name = "FILE")]
        expected_out: PathBuf,
    },
    /// Check or show the configuration without starting the daemon.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Work with the Avro schemas (those built into this binary, or a directory of them).
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
    /// Read an input's dead-letter topic (without taking its messages from anyone) and send
    /// chosen dead letters back to the input.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// One screen about a running daemon: health, inputs and their rates, outbox backlog,
    /// idempotency window, actors, report version.
    Status(StatusArgs),
}

/// Which input's dead letters, on which broker.
#[derive(clap::Args)]
struct DlqTarget {
    /// Configuration file (the daemon's): the broker, the input's topic and dead-letter topic.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The input, as named in the configuration's `[inputs.<name>]` (campaigns, payments, …).
    #[arg(long)]
    input: String,
}

/// Which dead letters: every option given must hold; a repeated option takes any of its values.
#[derive(clap::Args)]
struct DlqFilter {
    /// Only dead letters with this `reason` (unknown_campaign, invalid_avro, …).
    #[arg(long = "reason", value_name = "REASON")]
    reasons: Vec<String>,
    /// Only dead letters of this event type (the record's, else the ce_type property), e.g.
    /// ClickRegistrado; case-insensitive.
    #[arg(long = "type", value_name = "TYPE")]
    types: Vec<String>,
    /// Only dead letters published at or after this time: RFC 3339 in UTC
    /// (2026-01-31T12:00:00Z) or a duration ago (30m, 2h, 1d).
    #[arg(long, value_name = "TIME", value_parser = dlq::parse_time)]
    since: Option<u64>,
    /// Only dead letters published before this time (same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = dlq::parse_time)]
    until: Option<u64>,
}

impl DlqFilter {
    fn filter(self, ids: Vec<DeadLetterId>) -> dlq::Filter {
        dlq::Filter {
            ids,
            reasons: self.reasons,
            types: self.types,
            since_ms: self.since,
            until_ms: self.until,
        }
    }
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first: id, publish time, reason, type, key, detail.
    List {
        #[command(flatten)]
        target: DlqTarget,
        #[command(flatten)]
        filter: DlqFilter,
        /// Show at most this many (the oldest); 0 shows all.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line (every property included) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: its properties, its payload decoded to JSON, and what the daemon's
    /// codec makes of it.
    Show {
        #[command(flatten)]
        target: DlqTarget,
        /// Its id, as `dlq list` prints it (ledger:entry:partition[:batch index]).
        id: DeadLetterId,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish chosen dead letters to their input's topic again, with their key and properties
    /// (less reason, detail and the other dead-letter properties). The daemon deduplicates them
    /// like any message: an event applied before is not applied again.
    Replay {
        #[command(flatten)]
        target: DlqTarget,
        /// A dead letter to replay (repeatable), as `dlq list` prints its id.
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<DeadLetterId>,
        #[command(flatten)]
        filter: DlqFilter,
        /// Replay every dead letter of the input (needed when no --id or filter is given).
        #[arg(long)]
        all: bool,
        /// Say what would be replayed, publish nothing.
        #[arg(long)]
        dry_run: bool,
        /// Refuse, replaying nothing, when more dead letters than this match.
        #[arg(long, default_value_t = 10_000)]
        max: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

impl DlqCommand {
    fn target(&self) -> &DlqTarget {
        match self {
            DlqCommand::List { target, .. }
            | DlqCommand::Show { target, .. }
            | DlqCommand::Replay { target, .. } => target,
        }
    }
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The daemon's HTTP address, e.g. http://127.0.0.1:8080; default: the configuration's
    /// http.listen.
    #[arg(long)]
    url: Option<String>,
    /// Configuration file whose http.listen is used when --url is not given.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Refresh every SECS seconds until interrupted (rates over each interval).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    watch: Option<u64>,
    /// Without --watch: seconds between the two samples the rates are computed from.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    sample_seconds: f64,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load the configuration as `run` would and name every problem; exits non-zero on any.
    #[command(after_help = CONFIG_HELP)]
    Check {
        /// Configuration file, overlaid on the shipped defaults.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration as TOML, secrets masked, each value followed by where
    /// it came from (default, file, or env variable).
    #[command(after_help = CONFIG_HELP)]
    Print {
        /// Configuration file, overlaid on the shipped defaults.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SchemasCommand {
    /// Parse every schema in the manifest and check each subject's compatibility rule between its
    /// versions.
    Check {
        /// A directory holding manifest.toml and the .avsc files; without it, the schemas built
        /// into this binary.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("aerostream: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let config = load_config(config.as_deref())?;
            telemetry::init_logging(&config.daemon);
            let listener = std::net::TcpListener::bind(config.http.listen)
                .with_context(|| format!("binding http.listen {}", config.http.listen))?;
            actix_rt::System::with_tokio_rt(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime")
            })
            .block_on(daemon::run(config.clone(), listener, async move {
                shutdown_signal().await;
                exit_after(config.shutdown_timeout());
            }))
        }
        Command::Produce {
            config,
            seed,
            campaigns,
            payments,
            events,
            rate,
            duplicates,
            reorder_window,
            conflicts,
            expected_out,
        } => {
            let config = load_config(config.as_deref())?;
            telemetry::init_logging(&config.daemon);
            let codec = Codec::new(Arc::new(SchemaRegistry::shipped()));
            let options = generator::Options {
                seed,
                campaigns,
                payments,
                events,
                duplicate_fraction: duplicates,
                reorder_window,
                conflict_fraction: conflicts,
                ..generator::Options::for_daemon(&config)
            };
            let report = tokio::runtime::Runtime::new()?.block_on(produce::run(
                &config,
                &codec,
                &options,
                rate,
                &expected_out,
            ))?;
            println!(
                "published {} messages ({} distinct events, {} conflicts) in {:.1}s ({:.0}/s); expected state in {}",
                report.published,
                report.distinct,
                report.conflicts,
                report.elapsed.as_secs_f64(),
                report.published as f64 / report.elapsed.as_secs_f64().max(0.001),
                expected_out.display()
            );
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let loaded = Loaded::read(config.as_deref(), std::env::vars_os())?;
            let file = config.map_or("no file".to_owned(), |path| path.display().to_string());
            println!(
                "configuration ok (shipped defaults, {file}, {} environment variable(s)); {} input(s), broker {}",
                loaded.env_vars().count(),
                loaded.config.inputs.len(),
                loaded.config.broker.url
            );
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Print { config },
        } => {
            let loaded = Loaded::read(config.as_deref(), std::env::vars_os())?;
            let written = std::io::Write::write_all(&mut std::io::stdout(), loaded.print().as_bytes());
            match written {
                // Read by a pager or `head` that stopped early.
                Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                written => Ok(written?),
            }
        }
        Command::Schemas {
            command: SchemasCommand::Check { dir },
        } => {
            let registry = match &dir {
                Some(dir) => {
                    println!("schemas in {}", dir.display());
                    SchemaRegistry::load(dir)?
                }
                None => {
                    println!("schemas built into this binary");
                    SchemaRegistry::shipped()
                }
            };
            let mut broken = 0;
            for subject in registry.subjects() {
                let versions: Vec<&str> = subject.versions.iter().map(|v| v.version.as_str()).collect();
                let problems = compat::check(subject);
                let verdict = if problems.is_empty() { "ok  " } else { "FAIL" };
                println!(
                    "{verdict}  {}  {}  [{}]",
                    subject.name,
                    subject.compatibility.as_str(),
                    versions.join(", ")
                );
                for problem in &problems {
                    eprintln!("aerostream: {problem}");
                }
                broken += problems.len();
            }
            anyhow::ensure!(broken == 0, "{broken} incompatible schema version pair(s)");
            Ok(())
        }
        Command::Dlq { command } => dlq_command(command),
        Command::Status(args) => status_command(args),
    }
}

/// `aerostream dlq …`: tables or JSON lines on stdout, warnings on stderr.
fn dlq_command(command: DlqCommand) -> anyhow::Result<()> {
    let target = command.target();
    let config = load_config(target.config.as_deref())?;
    // Only warnings and errors: the output is the tables. The client's own lines (a retry
    // warning per subscription, an error for each consumer dropped at exit) say nothing the
    // command's errors do not; RUST_LOG=pulsar=debug shows them.
    telemetry::init_logging(&aerostream::config::DaemonConfig {
        log_level: "warn,pulsar=off".into(),
        ..config.daemon.clone()
    });
    let input = dlq::input(&config, &target.input)?.clone();
    let dlq_topic = config.broker.topic(&input.dead_letter_topic);
    let warn_incomplete = |stats: &dlq::ReadStats| {
        for partition in &stats.incomplete {
            eprintln!(
                "aerostream: warning: {partition} sent nothing for {:?} before its last message; what follows was not read",
                dlq::STALLED
            );
        }
    };
    tokio::runtime::Runtime::new()?.block_on(async {
        let client = dlq::connect(&config).await?;
        match command {
            DlqCommand::List {
                filter, limit, json, ..
            } => {
                let listing = dlq::list(&client, &dlq_topic, &filter.filter(Vec::new()), limit).await?;
                warn_incomplete(&listing.stats);
                if json {
                    print!("{}", listing.render_json()?);
                } else {
                    print!("{}", listing.render());
                }
            }
            DlqCommand::Show { id, json, .. } => {
                let shown = dlq::show(&client, &dlq_topic, id, &input, &Codec::shipped()).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&shown)?);
                } else {
                    print!("{}", shown.render()?);
                }
            }
            DlqCommand::Replay {
                ids,
                filter,
                all,
                dry_run,
                max,
                json,
                ..
            } => {
                let selection = dlq::Selection {
                    filter: filter.filter(ids),
                    all,
                    max,
                };
                let input_topic = config.broker.topic(&input.topic);
                let replay = dlq::replay(&client, &dlq_topic, &input_topic, &selection, dry_run).await?;
                warn_incomplete(&replay.stats);
                if json {
                    print!("{}", replay.render_json()?);
                } else {
                    print!("{}", replay.render());
                }
            }
        }
        anyhow::Ok(())
    })
}

/// `aerostream status`: one screen, or one every `--watch` seconds.
fn status_command(args: StatusArgs) -> anyhow::Result<()> {
    let url = match args.url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            let mut listen = load_config(args.config.as_deref())?.http.listen;
            if listen.ip().is_unspecified() {
                listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{listen}")
        }
    };
    let client = reqwest::blocking::Client::builder()
        .timeout(status::REQUEST_TIMEOUT)
        .pool_idle_timeout(status::IDLE_CONNECTION)
        .build()?;
    let Some(every) = args.watch else {
        let before = status::sample(&client, &url)?;
        std::thread::sleep(std::time::Duration::from_secs_f64(args.sample_seconds.max(0.0)));
        let now = status::sample(&client, &url)?;
        print!("{}", status::render(&url, &before, &now));
        anyhow::ensure!(now.healthy(), "the daemon at {url} is unavailable");
        return Ok(());
    };
    use std::io::{IsTerminal, Write};
    let terminal = std::io::stdout().is_terminal();
    let mut before: Option<status::Sample> = None;
    loop {
        match status::sample(&client, &url) {
            Ok(now) => {
                if let Some(before) = &before {
                    let screen = status::render(&url, before, &now);
                    // Redrawn in place on a terminal; one screen after another otherwise.
                    print!("{}{screen}", if terminal { "\x1b[2J\x1b[H" } else { "\n" });
                }
                before = Some(now);
            }
            Err(error) => println!("aerostream at {url}: unreachable: {error}"),
        }
        std::io::stdout().flush()?;
        std::thread::sleep(std::time::Duration::from_secs(every));
    }
}

/// Ends the process once `grace` has passed, whatever is still running: a shutdown never hangs.
/// What was in flight is unacked and is redelivered, as after a crash; nothing committed is lost
/// (every commit is durable before its ack).
fn exit_after(grace: std::time::Duration) {
    let watchdog = std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || {
            std::thread::sleep(grace);
            tracing::error!(
                grace_seconds = grace.as_secs(),
                "Shutdown did not finish within daemon.shutdown_timeout_seconds; exiting now."
            );
            std::process::exit(1);
        });
    if let Err(error) = watchdog {
        tracing::error!(error = %error, "Cannot start the shutdown watchdog.");
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("Signal received.");
}
