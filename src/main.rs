//! The `aerostream` binary: parses arguments and calls into the library.

use aerostream::codec::{compat, Codec, SchemaRegistry};
use aerostream::config::Config;
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

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// Configuration file, overlaid on the shipped defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Publish a generated, reproducible event stream and write the state it must produce.
    Produce {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Random seed: the same seed gives the same stream.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 50)]
        campaigns: usize,
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
        #[arg(long, default_value = "expected-state.json")]
        expected_out: PathBuf,
    },
    /// Work with the Avro schemas under schemas/.
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
}

#[derive(Subcommand)]
enum SchemasCommand {
    /// Load and parse every schema in the manifest.
    Check {
        #[arg(long, default_value = "schemas")]
        dir: PathBuf,
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
                "published {} messages ({} distinct events, {} conflicts) in {:.1}s; expected state in {}",
                report.published,
                report.distinct,
                report.conflicts,
                report.elapsed.as_secs_f64(),
                expected_out.display()
            );
            Ok(())
        }
        Command::Schemas {
            command: SchemasCommand::Check { dir },
        } => {
            let registry = SchemaRegistry::load(&dir)?;
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
