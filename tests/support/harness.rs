//! [`Harness`]: the set-up every black-box test shares — a [`LocalBroker`], a temporary directory,
//! a free HTTP port, a config file written for them and loaded, the daemon(s) started on it, and a
//! tokio runtime with a pulsar client for the test's own readers and producers.
//!
//! ```ignore
//! let harness = Harness::new().partitions(2).extra("[snapshot]\nevery_events = 10\n").build();
//! let daemon = harness.start(); // started and healthy
//! ```
//!
//! More daemons on the same broker (a standby, a daemon with another config) are [`Node`]s:
//! [`Harness::node`] and [`Harness::node_with`] give each its own directory, port and config.

use aerostream::config::Config;
use pulsar::{Pulsar, TokioExecutor};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use super::broker::{free_port, BrokerOptions, LocalBroker};
use super::daemon::{write_config_file, Daemon};
use super::topic::TopicReader;

/// How long [`Node::start`] waits for /health to answer 200.
pub const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

/// The options of a [`Harness`]: call [`Harness::new`], chain options, then [`Builder::build`].
#[derive(Debug, Clone, Default)]
pub struct Builder {
    partitions: u32,
    broker_data_in_dir: bool,
    admin_token: Option<String>,
    chaos: Option<bool>,
    daemon_keys: Vec<String>,
    extra: String,
}

impl Builder {
    /// Partitions of every topic the broker creates (0, the default: non-partitioned topics).
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Keeps pulsar-lite's data under the harness's directory (`broker/`), so that it outlives
    /// `stop_broker`/`start_broker`.
    pub fn broker_data_in_dir(mut self) -> Self {
        self.broker_data_in_dir = true;
        self
    }

    /// `[http] admin_token`.
    pub fn admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.to_owned());
        self
    }

    /// `[chaos] enabled`.
    pub fn chaos(mut self, enabled: bool) -> Self {
        self.chaos = Some(enabled);
        self
    }

    /// `[daemon] shutdown_timeout_seconds` (20 unless set).
    pub fn shutdown_timeout(self, seconds: u64) -> Self {
        self.daemon_key(&format!("shutdown_timeout_seconds = {seconds}"))
    }

    /// Another `[daemon]` line, `key = value`.
    pub fn daemon_key(mut self, line: &str) -> Self {
        self.daemon_keys.push(line.to_owned());
        self
    }

    /// TOML appended to the config: tables other than `[daemon]`, `[broker]`, `[http]`, `[chaos]`
    /// (and any `[inputs.*]` it names is overlaid on the shipped one).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra = toml.to_owned();
        self
    }

    /// Starts the broker and writes and loads the config of the harness's first [`Node`].
    pub fn build(self) -> Harness {
        let dir = test_dir();
        let broker = LocalBroker::start_with(BrokerOptions {
            default_partitions: self.partitions,
            data_dir: self.broker_data_in_dir.then(|| dir.path().join("broker")),
            ..BrokerOptions::default()
        })
        .unwrap();
        let node = Node::new(&broker, &self, Some(dir));
        Harness {
            node,
            client: OnceLock::new(),
            runtime: tokio::runtime::Runtime::new().unwrap(),
            builder: self,
            broker,
        }
    }
}

/// A broker, the test's first daemon [`Node`], a runtime and a lazily built pulsar client. Fields
/// drop in order: the client before its runtime, everything before the broker. Daemons are the
/// test's own values: declared after the harness, they are killed before it goes.
pub struct Harness {
    node: Node,
    client: OnceLock<Pulsar<TokioExecutor>>,
    runtime: tokio::runtime::Runtime,
    builder: Builder,
    pub broker: LocalBroker,
}

impl Harness {
    /// The options, defaulted: one non-partitioned broker, payments on Failover, no extra TOML.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> Builder {
        Builder::default()
    }

    /// A harness with every option at its default.
    pub fn started() -> Harness {
        Harness::new().build()
    }

    /// Starts a daemon on the first node's config and waits until /health answers 200.
    pub fn start(&self) -> Daemon {
        self.node.start()
    }

    /// Starts a daemon on the first node's config; returns once its HTTP listener answers, healthy
    /// or not.
    pub fn spawn(&self) -> Daemon {
        self.node.spawn()
    }

    /// The first node's loaded config.
    pub fn config(&self) -> &Config {
        &self.node.config
    }

    /// The first node's config file.
    pub fn config_path(&self) -> &Path {
        &self.node.config_path
    }

    /// The first node's `[daemon] data_dir`.
    pub fn data_dir(&self) -> &Path {
        &self.node.config.daemon.data_dir
    }

    /// The first node's directory (its config, logs and data).
    pub fn dir(&self) -> &Path {
        self.node.dir()
    }

    /// The first node's HTTP port.
    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// Another daemon's directory, port and config on the same broker, with the harness's options.
    pub fn node(&self) -> Node {
        Node::new(&self.broker, &self.builder, None)
    }

    /// Another daemon's directory, port and config on the same broker, with the config options of
    /// `options` (its broker options do not apply).
    pub fn node_with(&self, options: Builder) -> Node {
        Node::new(&self.broker, &options, None)
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// A pulsar client on the broker, built on first use.
    pub fn client(&self) -> &Pulsar<TokioExecutor> {
        self.client.get_or_init(|| {
            self.runtime
                .block_on(Pulsar::builder(self.broker.url(), TokioExecutor).build())
                .unwrap()
        })
    }

    /// The full name of topic `name` (`config.broker.topic`).
    pub fn topic(&self, name: &str) -> String {
        self.node.config.broker.topic(name)
    }

    /// A reader of topic `topic` (a full name), subscribed now: it sees every later message.
    pub fn reader(&self, topic: &str) -> TopicReader {
        self.runtime
            .block_on(TopicReader::subscribe(self.client(), topic))
            .unwrap()
    }

    /// Readers of the payments, commissions and alerts output topics, subscribed now.
    pub fn output_readers(&self) -> Vec<TopicReader> {
        let outputs = &self.node.config.outputs;
        [
            &outputs.payments_topic,
            &outputs.commissions_topic,
            &outputs.alerts_topic,
        ]
        .iter()
        .map(|name| self.reader(&self.topic(name)))
        .collect()
    }
}

/// A fresh directory for a test; with `AEROSTREAM_TEST_KEEP` set it outlives the test (its path is
/// printed), for reading the daemons' logs and stores after a failure.
fn test_dir() -> tempfile::TempDir {
    let mut dir = tempfile::tempdir().unwrap();
    if std::env::var_os("AEROSTREAM_TEST_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("test directory kept: {}", dir.path().display());
    }
    dir
}

/// One daemon's directory, HTTP port and config file (written and loaded) on a broker.
pub struct Node {
    pub config: Config,
    pub config_path: PathBuf,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Node {
    /// `dir`: the directory to use (the harness's, which may hold the broker's data too), or a new one.
    fn new(broker: &LocalBroker, options: &Builder, dir: Option<tempfile::TempDir>) -> Node {
        let dir = dir.unwrap_or_else(test_dir);
        let port = free_port().unwrap();
        let mut daemon_keys = options.daemon_keys.clone();
        if !daemon_keys
            .iter()
            .any(|k| k.starts_with("shutdown_timeout_seconds"))
        {
            daemon_keys.push("shutdown_timeout_seconds = 20".into());
        }
        let mut http = String::new();
        if let Some(token) = &options.admin_token {
            http.push_str(&format!("admin_token = {token:?}\n"));
        }
        let mut extra = String::new();
        if let Some(enabled) = options.chaos {
            extra.push_str(&format!("[chaos]\nenabled = {enabled}\n\n"));
        }
        extra.push_str(&options.extra);
        let config_path = write_config_file(
            dir.path(),
            &broker.url(),
            port,
            &daemon_keys.join("\n"),
            &http,
            &extra,
        )
        .unwrap();
        let config = Config::load(Some(&config_path)).unwrap();
        Node {
            config,
            config_path,
            port,
            dir,
        }
    }

    /// Starts a daemon on this config and waits until /health answers 200.
    pub fn start(&self) -> Daemon {
        let daemon = self.spawn();
        daemon.wait_healthy(HEALTHY_WITHIN).unwrap();
        daemon
    }

    /// Starts a daemon on this config; returns once its HTTP listener answers.
    pub fn spawn(&self) -> Daemon {
        Daemon::start(&self.config_path, self.port).unwrap()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
