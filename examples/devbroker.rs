//! Development broker: pulsar-lite behind the checksum-adding relay, in the foreground (SPEC §11).
//!
//! ```text
//! cargo run --example devbroker -- --port 6650 --data-dir .aerostream/broker
//! ```
//!
//! Prints the relay's `pulsar://` URL on stdout once the broker accepts connections, optionally
//! also writes it to `--print-url-file` (scripts poll for that file), and runs until SIGINT or
//! SIGTERM. The data directory is kept between runs.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Parser;
use support::{BrokerOptions, LocalBroker};

/// Runs pulsar-lite behind the relay for local development.
#[derive(Debug, Parser)]
struct Args {
    /// Port clients connect to (the relay's); 0 picks a free port.
    #[arg(long, default_value_t = 6650)]
    port: u16,
    /// Directory for pulsar-lite's database, config and log.
    #[arg(long, default_value = ".aerostream/broker")]
    data_dir: PathBuf,
    /// File to write the URL to once the broker is ready; removed on exit.
    #[arg(long)]
    print_url_file: Option<PathBuf>,
    /// Partitions of every topic the broker creates (0: not partitioned).
    #[arg(long, default_value_t = 2)]
    partitions: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(path) = &args.print_url_file {
        // A file left by a killed run must not announce a broker that is not up yet.
        let _ = std::fs::remove_file(path);
    }
    let broker = LocalBroker::start_with(BrokerOptions {
        relay_port: args.port,
        data_dir: Some(args.data_dir),
        default_partitions: args.partitions,
        ..BrokerOptions::default()
    })?;
    eprintln!(
        "devbroker: pulsar-lite on {}, log {}",
        broker.broker_addr(),
        broker.data_dir().join("pulsar-lite.log").display()
    );
    println!("{}", broker.url());
    std::io::stdout().flush()?;
    if let Some(path) = &args.print_url_file {
        write_atomically(path, &format!("{}\n", broker.url()))?;
    }

    let signal = wait_for_shutdown_signal();
    eprintln!("devbroker: {signal}, stopping");
    if let Some(path) = &args.print_url_file {
        let _ = std::fs::remove_file(path);
    }
    drop(broker);
    Ok(())
}

/// Writes through a temporary file and a rename, so a poller never reads half a URL.
fn write_atomically(path: &Path, contents: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents)
        .and_then(|()| std::fs::rename(&temporary, path))
        .with_context(|| format!("writing {}", path.display()))
}

/// Blocks until SIGINT or SIGTERM and names the one received.
fn wait_for_shutdown_signal() -> &'static str {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the signal runtime");
    runtime.block_on(async {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        }
    })
}
