//! Configuration: the shipped `config.toml` (embedded) overlaid by a user file and
//! `AEROSTREAM__<TABLE>__<KEY>` environment variables.
//!
//! Loading checks everything and reports every problem at once, each named as the user wrote it:
//! the file's dotted key (`daemon.cache_mb`) or the variable's name (`AEROSTREAM__HTTP__LISTNE`).
//! Each value the user set is first tried alone on the shipped defaults, so an unknown key or a
//! bad value is found wherever it is and whatever else is wrong; then the whole config is checked
//! for what types cannot say ([`Config::validate`]). [`Loaded`] keeps where every value came from,
//! for `aerostream config print`.

use aerostream_actors::gateway::{RetryPolicy, SimulatedGateway};
use aerostream_actors::snapshot::SnapshotPolicy;
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The shipped defaults, with a comment on every option.
pub const DEFAULT_TOML: &str = include_str!("../config.toml");

/// The prefix of the environment variables that override options.
pub const ENV_PREFIX: &str = "AEROSTREAM__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
    #[error("cannot read configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration, {} problem(s):\n{}", .0.len(), Problem::list(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The problems found (none for a missing or unreadable file).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(problems) => problems,
            _ => &[],
        }
    }
}

/// One thing wrong with the configuration, named as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file's dotted key with the file (`` `daemon.cache_mb` in my.toml ``), the environment
    /// variable (`AEROSTREAM__HTTP__LISTNE`), or a key left at its default.
    pub name: String,
    pub message: String,
}

impl Problem {
    fn list(problems: &[Problem]) -> String {
        problems
            .iter()
            .map(|problem| format!("  - {problem}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.message)
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The shipped `config.toml`.
    Default,
    /// The `--config` file.
    File(PathBuf),
    /// An environment variable, by its exact name.
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(path) => write!(f, "file {}", path.display()),
            Origin::Env(name) => write!(f, "env {name}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub broker: BrokerConfig,
    pub idempotency: IdempotencyConfig,
    pub actors: ActorsConfig,
    pub http: HttpConfig,
    pub chaos: ChaosConfig,
    pub gateway: GatewayConfig,
    pub snapshot: SnapshotConfig,
    /// Input topics by name (`campaigns`, `payments`, …).
    pub inputs: BTreeMap<String, InputConfig>,
    pub outputs: OutputsConfig,
    pub collector: CollectorConfig,
    pub changelog: ChangelogConfig,
}

/// State hand-over between daemons through Pulsar (docs/TAKEOVER.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChangelogConfig {
    pub enabled: bool,
    pub topic: String,
    /// An aggregate this daemon has not handled for this long is caught up from the changelog
    /// before its next event.
    pub takeover_gap_ms: u64,
    /// While a marker is pending, a follower that reads no record at all for this long
    /// subscribes again.
    pub stall_timeout_ms: u64,
    /// Changelog partitions followed beyond the ones this daemon owns, kept warm for a takeover.
    pub standby_partitions: Standbys,
}

/// `changelog.standby_partitions`: a number of partitions, or `"all"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standbys {
    Count(u32),
    All,
}

impl Serialize for Standbys {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Standbys::Count(count) => serializer.serialize_u32(*count),
            Standbys::All => serializer.serialize_str("all"),
        }
    }
}

impl<'de> Deserialize<'de> for Standbys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Standbys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of partitions or \"all\"")
            }
            fn visit_u64<E: serde::de::Error>(self, count: u64) -> Result<Standbys, E> {
                u32::try_from(count)
                    .map(Standbys::Count)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(count), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, count: i64) -> Result<Standbys, E> {
                u64::try_from(count)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(count), &self))
                    .and_then(|count| self.visit_u64(count))
            }
            fn visit_str<E: serde::de::Error>(self, word: &str) -> Result<Standbys, E> {
                match word {
                    "all" => Ok(Standbys::All),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(word), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `POST /event-collector/events`: which input's topic each kind of event is published to, and
/// the request limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    pub campaign_input: String,
    pub payment_input: String,
    pub report_input: String,
    pub max_body_bytes: usize,
    pub rate_per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Names this daemon on the changelog; empty: the host name and the data directory.
    pub instance_id: String,
    /// Directory of the sled database.
    pub data_dir: PathBuf,
    /// sled's page cache, in MiB, of each of the two databases (the store's, the window's).
    pub cache_mib: u64,
    /// No store write starts while the data directory's file system has less available (MiB).
    pub min_free_mib: u64,
    /// A commit transaction (and its flush) starts at most once per this many milliseconds.
    pub min_commit_interval_ms: u64,
    /// Grace period on SIGTERM/SIGINT.
    pub shutdown_timeout_seconds: u64,
    /// An input that holds messages and finishes none for this long makes /health answer 503.
    pub stall_timeout_seconds: u64,
    /// Input partitions this daemon asks to be active for on Failover subscriptions.
    pub preferred_partitions: Vec<u32>,
    pub log_format: LogFormat,
    /// tracing filter directive.
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub url: String,
    pub tenant: String,
    pub namespace: String,
    pub health_probe_interval_seconds: u64,
}

impl BrokerConfig {
    /// `persistent://tenant/namespace/name` unless `name` is already fully qualified.
    pub fn topic(&self, name: &str) -> String {
        if name.contains("://") {
            name.to_owned()
        } else {
            format!("persistent://{}/{}/{}", self.tenant, self.namespace, name)
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    pub window_seconds: u64,
    pub eviction_interval_seconds: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActorsConfig {
    pub mailbox_capacity: usize,
    pub arbiters: usize,
    /// An actor with nothing to do for this long is stopped; its next event restarts it from
    /// the stored state.
    pub idle_seconds: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Bearer token for admin routes; empty refuses them.
    pub admin_token: Secret,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosConfig {
    pub enabled: bool,
    /// Fail points set at start (name → the `fail` crate's actions), only with `enabled`; the
    /// names are those of `POST /admin/chaos/failpoint`.
    #[serde(default)]
    pub failpoints: std::collections::BTreeMap<String, String>,
}

/// Campaign snapshots (`CampanaEstadoCompleto`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// A snapshot every this many events of a campaign (and whenever it is paused or completed).
    pub every_events: u64,
    /// Snapshots kept per campaign; the journal is kept back to the oldest.
    pub keep: usize,
}

impl SnapshotConfig {
    pub fn policy(&self) -> SnapshotPolicy {
        SnapshotPolicy {
            every_events: self.every_events,
            keep: self.keep,
        }
    }
}

/// The payment gateway that charges payments requested with `PagoSolicitado` (simulated).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// How long one call takes.
    pub latency_ms: u64,
    /// Fraction of calls that fail as unavailable and are retried, 0.0 to 1.0.
    pub failure_rate: f64,
    /// Fraction of payments declined (FALLIDO), 0.0 to 1.0.
    pub decline_rate: f64,
    /// Seed of the simulated answers: the same seed gives the same outcomes.
    pub seed: u64,
    /// Calls per payment before it is declared FALLIDO for an unavailable gateway.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Payments charged at once.
    pub concurrency: usize,
}

impl GatewayConfig {
    pub fn simulated(&self) -> SimulatedGateway {
        SimulatedGateway {
            latency: Duration::from_millis(self.latency_ms),
            failure_rate: self.failure_rate,
            decline_rate: self.decline_rate,
            seed: self.seed,
        }
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff: Duration::from_millis(self.initial_backoff_ms),
            max_backoff: Duration::from_millis(self.max_backoff_ms),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionKind {
    Failover,
    Shared,
    KeyShared,
}

impl SubscriptionKind {
    /// The `pulsar` client's name for it.
    pub fn sub_type(self) -> pulsar::SubType {
        match self {
            SubscriptionKind::Failover => pulsar::SubType::Failover,
            SubscriptionKind::Shared => pulsar::SubType::Shared,
            SubscriptionKind::KeyShared => pulsar::SubType::KeyShared,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub topic: String,
    pub subscription: String,
    pub subscription_type: SubscriptionKind,
    /// Messages received and not yet acked, at most.
    pub max_in_flight: usize,
    /// Retries of a message whose processing failed (a store error, an actor that keeps
    /// crashing) before the daemon dead-letters it with reason `max_redeliveries`.
    pub max_redeliveries: usize,
    pub dead_letter_topic: String,
    /// Wait before the first retry of a failed message; it doubles at each retry (jittered).
    pub retry_delay_ms: u64,
    /// The longest wait between two retries.
    pub retry_max_delay_ms: u64,
    /// Writer schema for messages without `ce_dataschema`; empty for none.
    pub default_dataschema: String,
}

impl InputConfig {
    /// The wait between retries of a failed message.
    pub fn retry_backoff(&self) -> crate::backoff::Backoff {
        crate::backoff::Backoff::new(
            Duration::from_millis(self.retry_delay_ms),
            Duration::from_millis(self.retry_max_delay_ms),
        )
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputsConfig {
    /// Campaign full-state snapshots (CampanaEstadoCompleto), keyed by campaign id.
    pub state_topic: String,
    pub payments_topic: String,
    pub commissions_topic: String,
    pub alerts_topic: String,
    /// Answers to report requests (ReporteGenerado), keyed by request id.
    pub reports_topic: String,
}

/// A secret string whose Debug output and serialized form (`config print`) are redacted.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

/// What a secret shows instead of its value.
pub const REDACTED: &str = "<redacted>";

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { REDACTED })
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares with `presented` in time independent of where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"<redacted>\""
        })
    }
}

impl Config {
    /// Shipped defaults, then `path` (if given), then the environment; every problem at once.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Ok(Loaded::read(path, std::env::vars_os())?.config)
    }

    /// Checks what types cannot say, naming each key as dotted path.
    fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut positive = |key: String, value: u64| {
            if value == 0 {
                problems.push((key, "must be greater than 0".to_owned()));
            }
        };
        positive(
            "idempotency.window_seconds".into(),
            self.idempotency.window_seconds,
        );
        positive(
            "idempotency.eviction_interval_seconds".into(),
            self.idempotency.eviction_interval_seconds,
        );
        positive(
            "actors.mailbox_capacity".into(),
            self.actors.mailbox_capacity as u64,
        );
        positive("actors.arbiters".into(), self.actors.arbiters as u64);
        positive("actors.idle_seconds".into(), self.actors.idle_seconds);
        positive(
            "gateway.max_attempts".into(),
            u64::from(self.gateway.max_attempts),
        );
        positive("gateway.concurrency".into(), self.gateway.concurrency as u64);
        positive("daemon.cache_mib".into(), self.daemon.cache_mib);
        positive("snapshot.every_events".into(), self.snapshot.every_events);
        positive("snapshot.keep".into(), self.snapshot.keep as u64);
        positive(
            "broker.health_probe_interval_seconds".into(),
            self.broker.health_probe_interval_seconds,
        );
        for (name, input) in &self.inputs {
            positive(format!("inputs.{name}.max_in_flight"), input.max_in_flight as u64);
            positive(format!("inputs.{name}.retry_delay_ms"), input.retry_delay_ms);
        }
        let collector = &self.collector;
        positive("collector.max_body_bytes".into(), collector.max_body_bytes as u64);
        positive(
            "collector.rate_per_second".into(),
            u64::from(collector.rate_per_second),
        );
        positive("collector.burst".into(), u64::from(collector.burst));
        if let Err(problem) = check_broker_url(&self.broker.url) {
            problems.push(("broker.url".into(), problem));
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.daemon.log_level) {
            problems.push((
                "daemon.log_level".into(),
                format!("not a tracing filter ({error}): {:?}", self.daemon.log_level),
            ));
        }
        for (key, rate) in [
            ("gateway.failure_rate", self.gateway.failure_rate),
            ("gateway.decline_rate", self.gateway.decline_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                problems.push((key.into(), format!("must be between 0.0 and 1.0, got {rate}")));
            }
        }
        if self.inputs.is_empty() {
            problems.push(("inputs".into(), "must name at least one input topic".into()));
        }
        for (name, input) in &self.inputs {
            if input.retry_max_delay_ms < input.retry_delay_ms {
                problems.push((
                    format!("inputs.{name}.retry_max_delay_ms"),
                    format!(
                        "({}) must be at least `inputs.{name}.retry_delay_ms` ({})",
                        input.retry_max_delay_ms, input.retry_delay_ms
                    ),
                ));
            }
        }
        for (key, input) in [
            ("campaign_input", &collector.campaign_input),
            ("payment_input", &collector.payment_input),
            ("report_input", &collector.report_input),
        ] {
            if !self.inputs.contains_key(input) {
                problems.push((format!("collector.{key}"), format!("names no input: {input:?}")));
            }
        }
        problems
    }

    /// `daemon.instance_id`, or the host name and data directory when it is empty.
    pub fn instance_id(&self) -> String {
        if !self.daemon.instance_id.is_empty() {
            return self.daemon.instance_id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        format!("{host}:{}", self.daemon.data_dir.display())
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.daemon.shutdown_timeout_seconds)
    }

    /// The committer's group-commit interval (`daemon.min_commit_interval_ms`).
    pub fn min_commit_interval(&self) -> Duration {
        Duration::from_millis(self.daemon.min_commit_interval_ms)
    }
}

/// Refuses a broker URL the client cannot connect to: another scheme, or no host
/// (`pulsar://`), which would otherwise be retried for ever.
fn check_broker_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|error| format!("not a URL ({error}): {url:?}"))?;
    if !matches!(parsed.scheme(), "pulsar" | "pulsar+ssl") {
        return Err(format!("must start with pulsar:// or pulsar+ssl://, got {url:?}"));
    }
    if parsed.host_str().filter(|host| !host.is_empty()).is_none() {
        return Err(format!(
            "names no host, got {url:?} (e.g. pulsar://127.0.0.1:6650)"
        ));
    }
    Ok(())
}

/// One value the user set: its key path, the value, and where it was written.
#[derive(Debug, Clone)]
struct Assignment {
    path: Vec<String>,
    value: Value,
    origin: Origin,
}

impl Assignment {
    /// The key as the user wrote it: the file's dotted key (with the file) or the variable.
    fn name(&self) -> String {
        name_in(&self.origin, &self.path)
    }

    /// The value alone, nested under its path, to merge over the defaults.
    fn provider(&self) -> Serialized<Value> {
        let nested = self.path.iter().rev().fold(self.value.clone(), |inner, key| {
            let mut dict = Dict::new();
            dict.insert(key.clone(), inner);
            Value::from(dict)
        });
        Serialized::defaults(nested)
    }
}

/// `path` as it is written where `origin` says.
fn name_in(origin: &Origin, path: &[String]) -> String {
    let dotted = dotted(path);
    match origin {
        Origin::Default => format!("`{dotted}` (default)"),
        Origin::File(file) => format!("`{dotted}` in {}", file.display()),
        // A key under a variable's (a map's entry, a table set as a whole) is named after it.
        Origin::Env(name) => name.clone(),
    }
}

/// TOML's dotted form of a key path, quoting the parts that need it.
fn dotted(path: &[String]) -> String {
    path.iter()
        .map(|key| {
            let bare = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if bare {
                key.clone()
            } else {
                format!("{key:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The shipped defaults as a tree, to tell which keys are tables.
fn shipped_tree() -> &'static toml::Table {
    static TREE: std::sync::OnceLock<toml::Table> = std::sync::OnceLock::new();
    TREE.get_or_init(|| toml::from_str(DEFAULT_TOML).expect("the shipped config.toml parses"))
}

/// Whether `path` is a table in the shipped defaults.
fn is_default_table(path: &[String]) -> bool {
    let mut table = shipped_tree();
    for key in path {
        match table.get(key) {
            Some(toml::Value::Table(inner)) => table = inner,
            _ => return false,
        }
    }
    true
}

/// The part of `path` checked as one: down to its first key that the defaults have no table
/// for. An input named in no default (`inputs.orders`) is checked whole, a known option alone.
fn unit_of(path: &[String]) -> &[String] {
    (1..=path.len())
        .find(|&len| !is_default_table(&path[..len]))
        .map_or(path, |len| &path[..len])
}

/// A configuration loaded, with where each of its values came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The file's values, then the environment's (a later one wins).
    assignments: Vec<Assignment>,
}

impl Loaded {
    /// Loads the shipped defaults overlaid by `path` and by the `AEROSTREAM__` variables among
    /// `vars`, checking everything: every problem is reported, named as the user wrote it.
    pub fn read(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> Result<Loaded, ConfigError> {
        let mut problems = Vec::new();
        let mut assignments = Vec::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Missing(path.to_owned()));
            }
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            match text.parse::<toml::Table>() {
                Ok(table) => file_assignments(path, &table, &mut Vec::new(), &mut assignments, &mut problems),
                Err(error) => problems.push(Problem {
                    name: path.display().to_string(),
                    message: format!("not valid TOML: {}", error.to_string().trim_end()),
                }),
            }
        }
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .map(|(name, value)| {
                (
                    name.to_string_lossy().into_owned(),
                    value.to_string_lossy().into_owned(),
                )
            })
            .filter(|(name, _)| {
                name.len() >= ENV_PREFIX.len() && name[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX)
            })
            .collect();
        vars.sort();
        for (name, value) in vars {
            let path: Vec<String> = name[ENV_PREFIX.len()..]
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect();
            if path.iter().any(String::is_empty) {
                problems.push(Problem {
                    name,
                    message: format!("names no option: write {ENV_PREFIX}<TABLE>__<KEY>"),
                });
                continue;
            }
            let value = value
                .parse::<Value>()
                .expect("parsing an env value is infallible");
            assignments.push(Assignment {
                path,
                value,
                origin: Origin::Env(name),
            });
        }

        let defaults = Figment::from(Toml::string(DEFAULT_TOML));
        // Every error figment found (it chains them), each to be described.
        let extract = |parts: &[&Assignment]| -> Result<Config, Vec<figment::Error>> {
            parts
                .iter()
                .fold(defaults.clone(), |figment, part| figment.merge(part.provider()))
                .extract()
                .map_err(|errors| errors.into_iter().collect())
        };
        // Each known option alone; the keys of a table the defaults do not have (a new input)
        // together, wherever they were written.
        let mut units: Vec<(&[String], Vec<&Assignment>)> = Vec::new();
        for assignment in &assignments {
            let unit = unit_of(&assignment.path);
            if unit.len() == assignment.path.len() {
                units.push((unit, vec![assignment]));
            } else if let Some((_, parts)) = units.iter_mut().find(|(u, _)| *u == unit) {
                parts.push(assignment);
            } else {
                units.push((unit, vec![assignment]));
            }
        }
        // Values that fail alone are reported; the others make the config checked as a whole.
        let mut valid = Vec::new();
        for (_, parts) in &units {
            match extract(parts) {
                Ok(_) => valid.extend(parts.iter().copied()),
                Err(error) => problems.extend(error.into_iter().map(|error| described(&error, parts))),
            }
        }
        let config = extract(&valid).map_err(|errors| {
            let mut problems = problems.clone();
            problems.extend(errors.into_iter().map(|error| described(&error, &valid)));
            ConfigError::Invalid(problems)
        })?;
        let loaded = Loaded {
            config,
            assignments: valid.into_iter().cloned().collect(),
        };
        problems.extend(loaded.config.validate().into_iter().map(|(key, message)| {
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            Problem {
                name: name_in(&loaded.origin(&path), &path),
                message,
            }
        }));
        if problems.is_empty() {
            Ok(loaded)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The `AEROSTREAM__` variables that set values.
    pub fn env_vars(&self) -> impl Iterator<Item = &str> {
        self.assignments
            .iter()
            .filter_map(|assignment| match &assignment.origin {
                Origin::Env(name) => Some(name.as_str()),
                _ => None,
            })
    }

    /// Where the value at `path` came from: the last variable or file value that set it (or a
    /// table above it), else the shipped default.
    pub fn origin(&self, path: &[String]) -> Origin {
        self.assignments
            .iter()
            .rev()
            .find(|assignment| path.starts_with(&assignment.path))
            .map_or(Origin::Default, |assignment| assignment.origin.clone())
    }

    /// The effective configuration as TOML, secrets masked, each value followed by where it
    /// came from (`# default`, `# file PATH`, `# env AEROSTREAM__…`).
    pub fn print(&self) -> String {
        let mut document =
            toml_edit::ser::to_document(&self.config).expect("the configuration serializes to TOML");
        self.annotate(document.as_table_mut(), &mut Vec::new());
        document.to_string()
    }

    fn annotate(&self, table: &mut toml_edit::Table, path: &mut Vec<String>) {
        for (key, item) in table.iter_mut() {
            path.push(key.get().to_owned());
            // A table of its own per struct and map, as in the shipped file, not inline.
            if let toml_edit::Item::Value(toml_edit::Value::InlineTable(inline)) = item {
                *item = toml_edit::Item::Table(std::mem::take(inline).into_table());
            }
            match item {
                toml_edit::Item::Table(inner) => self.annotate(inner, path),
                toml_edit::Item::Value(value) => {
                    let origin = self.origin(path);
                    value.decor_mut().set_suffix(format!("  # {origin}"));
                }
                _ => {}
            }
            path.pop();
        }
    }
}

/// The values of the file under `path`, leaf by leaf (a table the defaults do not have counts
/// as one value, see [`unit_of`]).
fn file_assignments(
    file: &Path,
    table: &toml::Table,
    path: &mut Vec<String>,
    assignments: &mut Vec<Assignment>,
    problems: &mut Vec<Problem>,
) {
    for (key, value) in table {
        path.push(key.clone());
        match value {
            toml::Value::Table(inner) if is_default_table(path) => {
                file_assignments(file, inner, path, assignments, problems)
            }
            _ => match Value::serialize(value) {
                Ok(value) => assignments.push(Assignment {
                    path: path.clone(),
                    value,
                    origin: Origin::File(file.to_owned()),
                }),
                Err(error) => problems.push(Problem {
                    name: name_in(&Origin::File(file.to_owned()), path),
                    message: error.kind.to_string(),
                }),
            },
        }
        path.pop();
    }
}

/// `error`, met while loading `parts` over the defaults, named after the part it is about.
fn described(error: &figment::Error, parts: &[&Assignment]) -> Problem {
    let at = &error.path;
    // The part whose key leads to the error (the longest), else the one the error leads into.
    let part = parts
        .iter()
        .filter(|part| at.starts_with(&part.path))
        .max_by_key(|part| part.path.len())
        .or_else(|| parts.iter().find(|part| part.path.starts_with(at)))
        .or(parts.first());
    let name = match part {
        // A file's table set whole (a new input): name the key inside it.
        Some(
            part @ Assignment {
                origin: Origin::File(_),
                ..
            },
        ) if at.starts_with(&part.path) => name_in(&part.origin, at),
        Some(part) => part.name(),
        None => name_in(&Origin::Default, at),
    };
    let message = match &error.kind {
        figment::error::Kind::UnknownField(field, expected) => format!(
            "unknown key `{field}`; the keys here are {}",
            expected
                .iter()
                .map(|key| format!("`{key}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        figment::error::Kind::MissingField(field) => format!("missing key `{field}`"),
        figment::error::Kind::UnknownVariant(found, expected) => format!(
            "unknown value {found:?}; one of {}",
            expected
                .iter()
                .map(|value| format!("{value:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        kind => kind.to_string(),
    };
    Problem { name, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::io::Write;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    fn load(toml: &str, env: &[(&str, &str)]) -> (tempfile::NamedTempFile, Result<Loaded, ConfigError>) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        let loaded = Loaded::read(Some(file.path()), vars(env));
        (file, loaded)
    }

    fn load_str(toml: &str) -> Result<Config, ConfigError> {
        load(toml, &[]).1.map(|loaded| loaded.config)
    }

    /// The names of the problems loading `toml` with `env` finds.
    fn problem_names(toml: &str, env: &[(&str, &str)]) -> Vec<String> {
        let (file, loaded) = load(toml, env);
        let at = format!(" in {}", file.path().display());
        loaded
            .unwrap_err()
            .problems()
            .iter()
            .map(|problem| problem.name.replace(&at, ""))
            .collect()
    }

    #[test]
    fn shipped_config_parses_and_uses_both_subscription_kinds() {
        let config = Loaded::read(None, vars(&[])).unwrap().config;
        let kinds: Vec<_> = config.inputs.values().map(|i| i.subscription_type).collect();
        assert!(kinds.contains(&SubscriptionKind::Failover));
        assert!(kinds
            .iter()
            .any(|k| matches!(k, SubscriptionKind::Shared | SubscriptionKind::KeyShared)));
        assert_eq!(config.idempotency.window_seconds, 3600);
        assert_eq!(config.broker.topic("x.v1"), "persistent://public/default/x.v1");
    }

    #[test]
    fn standby_partitions_take_a_count_or_all_from_the_file_and_the_environment() {
        let standbys = |toml: &str, env: &[(&str, &str)]| {
            load(toml, env)
                .1
                .map(|loaded| loaded.config.changelog.standby_partitions)
        };
        assert_eq!(standbys("", &[]).unwrap(), Standbys::Count(0));
        assert_eq!(
            standbys("[changelog]\nstandby_partitions = 2\n", &[]).unwrap(),
            Standbys::Count(2)
        );
        assert_eq!(
            standbys("[changelog]\nstandby_partitions = \"all\"\n", &[]).unwrap(),
            Standbys::All
        );
        assert_eq!(
            standbys("", &[("AEROSTREAM__CHANGELOG__STANDBY_PARTITIONS", "all")]).unwrap(),
            Standbys::All
        );
        assert_eq!(
            standbys("", &[("AEROSTREAM__CHANGELOG__STANDBY_PARTITIONS", "3")]).unwrap(),
            Standbys::Count(3)
        );
        for bad in ["\"some\"", "-1"] {
            let names = problem_names(&format!("[changelog]\nstandby_partitions = {bad}\n"), &[]);
            assert_eq!(names, ["`changelog.standby_partitions`"], "{bad}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load_str("[http]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        assert!(err.to_string().contains("`http.lisen`"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = load_str("[actors]\nmailbox_capacity = \"many\"\n").unwrap_err();
        assert!(err.to_string().contains("`actors.mailbox_capacity`"), "{err}");
        let err = load_str("[idempotency]\nwindow_seconds = 0\n").unwrap_err();
        assert!(err.to_string().contains("idempotency.window_seconds"), "{err}");
    }

    #[test]
    fn every_problem_is_named_as_written_in_the_file_and_the_environment() {
        let names = problem_names(
            "[broker]\nurl = \"pulsar://\"\n\n[daemon]\ncache_mb = 5\nlog_format = \"xml\"\n\n\
             [http]\nlisten = \"nowhere\"\n\n[inputs.payments]\nmax_in_flight = \"lots\"\n",
            &[
                ("AEROSTREAM__HTTP__LISTNE", "127.0.0.1:1"),
                ("AEROSTREAM__ACTORS__ARBITERS", "two"),
                ("AEROSTREAM_DEMO_EVENTS", "5"),
                ("PATH", "/bin"),
            ],
        );
        assert_eq!(
            names,
            [
                "`daemon.cache_mb`",
                "`daemon.log_format`",
                "`http.listen`",
                "`inputs.payments.max_in_flight`",
                "AEROSTREAM__ACTORS__ARBITERS",
                "AEROSTREAM__HTTP__LISTNE",
                // Checked with the values that are valid alone.
                "`broker.url`",
            ]
        );
    }

    #[test]
    fn a_new_input_is_checked_whole_with_its_keys_named() {
        let input = "topic = \"t\"\nsubscription = \"s\"\nsubscription_type = \"failover\"\n\
                     max_in_flight = 8\nmax_redeliveries = 1\ndead_letter_topic = \"t-DLQ\"\n\
                     retry_delay_ms = 10\nretry_max_delay_ms = 20\ndefault_dataschema = \"\"\n";
        let (_file, loaded) = load(&format!("[inputs.orders]\n{input}"), &[]);
        assert_eq!(loaded.unwrap().config.inputs["orders"].max_in_flight, 8);
        let names = problem_names(
            &format!(
                "[inputs.orders]\n{}",
                input.replace("max_in_flight = 8", "max_in_flight = -1")
            ),
            &[],
        );
        assert_eq!(names, ["`inputs.orders.max_in_flight`"]);
        // Set by variables alone, the new input's keys are checked together.
        let env: Vec<(String, String)> = input
            .lines()
            .map(|line| {
                let (key, value) = line.split_once(" = ").unwrap();
                (
                    format!("AEROSTREAM__INPUTS__ORDERS__{}", key.to_uppercase()),
                    value.trim_matches('"').to_owned(),
                )
            })
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let loaded = Loaded::read(None, vars(&env)).unwrap();
        assert_eq!(loaded.config.inputs["orders"].dead_letter_topic, "t-DLQ");
    }

    #[test]
    fn a_broker_url_without_a_host_is_refused() {
        for url in ["pulsar://", "pulsar:///x", "http://broker:6650", "127.0.0.1:6650"] {
            let names = problem_names("", &[("AEROSTREAM__BROKER__URL", url)]);
            assert_eq!(names, ["AEROSTREAM__BROKER__URL"], "{url}");
        }
        let names = problem_names("[broker]\nurl = \"pulsar://\"\n", &[]);
        assert_eq!(names, ["`broker.url`"]);
        for url in [
            "pulsar://127.0.0.1:6650",
            "pulsar+ssl://broker.example:6651",
            "pulsar://b",
        ] {
            let (_file, loaded) = load(&format!("[broker]\nurl = {url:?}\n"), &[]);
            assert!(loaded.is_ok(), "{url}");
        }
    }

    #[test]
    fn a_value_checked_with_others_is_named_where_it_was_set() {
        let names = problem_names(
            "[inputs.campaigns]\nretry_max_delay_ms = 1\n",
            &[("AEROSTREAM__GATEWAY__DECLINE_RATE", "2.0")],
        );
        assert_eq!(
            names,
            [
                "AEROSTREAM__GATEWAY__DECLINE_RATE",
                "`inputs.campaigns.retry_max_delay_ms`"
            ]
        );
    }

    #[test]
    fn invalid_toml_is_one_problem_naming_the_file() {
        let (file, loaded) = load("[http\nlisten = 1\n", &[]);
        let problems = loaded.unwrap_err().problems().to_vec();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].name, file.path().display().to_string());
    }

    #[test]
    fn print_names_every_source_and_masks_secrets() {
        let (file, loaded) = load(
            "[http]\nadmin_token = \"hunter2\"\n\n[chaos.failpoints]\n\"store::commit\" = \"off\"\n",
            &[("AEROSTREAM__BROKER__URL", "pulsar://b:1")],
        );
        let printed = loaded.unwrap().print();
        assert!(!printed.contains("hunter2"), "{printed}");
        let line = |start: &str| {
            printed
                .lines()
                .find(|line| line.starts_with(start))
                .unwrap_or_else(|| panic!("no {start:?} in\n{printed}"))
                .to_owned()
        };
        let file = file.path().display().to_string();
        assert_eq!(
            line("admin_token"),
            format!("admin_token = \"{REDACTED}\"  # file {file}")
        );
        assert_eq!(
            line("url"),
            "url = \"pulsar://b:1\"  # env AEROSTREAM__BROKER__URL"
        );
        assert_eq!(line("cache_mib"), "cache_mib = 64  # default");
        assert!(line("\"store::commit\"").ends_with(&format!("# file {file}")));
        // What is printed loads back to the same configuration (less the secret).
        let reloaded: Config = toml::from_str(&printed).unwrap();
        assert_eq!(reloaded.broker.url, "pulsar://b:1");
    }

    #[test]
    fn secret_is_redacted_in_debug() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "\"<redacted>\"");
    }
}
