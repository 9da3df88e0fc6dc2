//! The `aerostream` binary: parses arguments and calls into the library.

use aerostream::codec::{compat, Codec, SchemaRegistry};
use aerostream::config::{Config, Loaded};
use aerostream::{daemon, generator, produce, telemetry};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;

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
