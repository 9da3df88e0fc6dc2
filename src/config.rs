//! Configuration: the shipped `config.toml` (embedded) overlaid by a user file and
//! `AEROSTREAM__<TABLE>__<KEY>` environment variables. Unknown keys and bad values are errors that
//! name the key.

use aerostream_actors::gateway::{RetryPolicy, SimulatedGateway};
use aerostream_actors::snapshot::SnapshotPolicy;
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The shipped defaults, with a comment on every option.
pub const DEFAULT_TOML: &str = include_str!("../config.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration:\n{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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
}

/// `POST /event-collector/events`: which input's topic each kind of event is published to, and
/// the request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    pub campaign_input: String,
    pub payment_input: String,
    pub report_input: String,
    pub max_body_bytes: usize,
    pub rate_per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Names this daemon on the changelog; empty: the host name and the data directory.
    pub instance_id: String,
    /// Directory of the sled database.
    pub data_dir: PathBuf,
    /// sled's page cache, in MiB.
    pub cache_mib: u64,
    /// Grace period on SIGTERM/SIGINT.
    pub shutdown_timeout_seconds: u64,
    /// An input that holds messages and finishes none for this long makes /health answer 503.
    pub stall_timeout_seconds: u64,
    pub log_format: LogFormat,
    /// tracing filter directive.
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    pub window_seconds: u64,
    pub eviction_interval_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorsConfig {
    pub mailbox_capacity: usize,
    pub arbiters: usize,
    /// An actor with nothing to do for this long is stopped; its next event restarts it from
    /// the stored state.
    pub idle_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Bearer token for admin routes; empty refuses them.
    pub admin_token: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosConfig {
    pub enabled: bool,
    /// Fail points set at start (name → the `fail` crate's actions), only with `enabled`; the
    /// names are those of `POST /admin/chaos/failpoint`.
    #[serde(default)]
    pub failpoints: std::collections::BTreeMap<String, String>,
}

/// Campaign snapshots (`CampanaEstadoCompleto`).
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
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

/// A secret string whose Debug output is redacted.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

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
    /// Shipped defaults, then `path` (if given), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, Env::prefixed("AEROSTREAM__").split("__"))
    }

    fn load_with_env(path: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Missing(path.to_owned()));
            }
            figment = figment.merge(Toml::file(path));
        }
        let config: Config = figment.merge(env).extract().map_err(|errors| {
            ConfigError::Invalid(
                errors
                    .into_iter()
                    .map(|e| format!("  - {e}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types cannot say; reports every problem at once.
    fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut positive = |key: String, value: u64| {
            if value == 0 {
                problems.push(format!("  - `{key}` must be greater than 0"));
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
        if !self.broker.url.starts_with("pulsar://") && !self.broker.url.starts_with("pulsar+ssl://") {
            problems.push(format!(
                "  - `broker.url` must start with pulsar:// or pulsar+ssl://, got {:?}",
                self.broker.url
            ));
        }
        for (key, rate) in [
            ("gateway.failure_rate", self.gateway.failure_rate),
            ("gateway.decline_rate", self.gateway.decline_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                problems.push(format!("  - `{key}` must be between 0.0 and 1.0, got {rate}"));
            }
        }
        if self.inputs.is_empty() {
            problems.push("  - `inputs` must name at least one input topic".into());
        }
        for (name, input) in &self.inputs {
            if input.retry_max_delay_ms < input.retry_delay_ms {
                problems.push(format!(
                    "  - `inputs.{name}.retry_max_delay_ms` ({}) must be at least `inputs.{name}.retry_delay_ms` ({})",
                    input.retry_max_delay_ms, input.retry_delay_ms
                ));
            }
        }
        for (key, input) in [
            ("campaign_input", &collector.campaign_input),
            ("payment_input", &collector.payment_input),
            ("report_input", &collector.report_input),
        ] {
            if !self.inputs.contains_key(input) {
                problems.push(format!("  - `collector.{key}` names no input: {input:?}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("\n")))
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_str(toml: &str) -> Result<Config, ConfigError> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        Config::load_with_env(Some(file.path()), Env::prefixed("AEROSTREAM_TEST_NONE__"))
    }

    #[test]
    fn shipped_config_parses_and_uses_both_subscription_kinds() {
        let config = Config::load_with_env(None, Env::prefixed("AEROSTREAM_TEST_NONE__")).unwrap();
        let kinds: Vec<_> = config.inputs.values().map(|i| i.subscription_type).collect();
        assert!(kinds.contains(&SubscriptionKind::Failover));
        assert!(kinds
            .iter()
            .any(|k| matches!(k, SubscriptionKind::Shared | SubscriptionKind::KeyShared)));
        assert_eq!(config.idempotency.window_seconds, 3600);
        assert_eq!(config.broker.topic("x.v1"), "persistent://public/default/x.v1");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load_str("[http]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = load_str("[actors]\nmailbox_capacity = \"many\"\n").unwrap_err();
        assert!(err.to_string().contains("mailbox_capacity"), "{err}");
        let err = load_str("[idempotency]\nwindow_seconds = 0\n").unwrap_err();
        assert!(err.to_string().contains("idempotency.window_seconds"), "{err}");
    }

    #[test]
    fn secret_is_redacted_in_debug() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "\"<redacted>\"");
    }
}
