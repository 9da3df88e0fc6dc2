//! Metric names (SPEC §10), the Prometheus recorder, the actor observer and log set-up.
//!
//! Labels are bounded: input name, event type, aggregate kind, outcome, reason — never an id.

use crate::config::{DaemonConfig, LogFormat};
use aerostream_actors::ports::ActorObserver;
use aerostream_actors::{AggregateKind, ReportVersion};
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const EVENTS_CONSUMED: &str = "aerostream_events_consumed_total";
pub const EVENTS_APPLIED: &str = "aerostream_events_applied_total";
pub const EVENTS_DEDUPLICATED: &str = "aerostream_events_deduplicated_total";
pub const EVENTS_REJECTED: &str = "aerostream_events_rejected_total";
pub const EVENTS_DEAD_LETTERED: &str = "aerostream_events_dead_lettered_total";
pub const EVENTS_RETRIED: &str = "aerostream_events_retried_total";
pub const CONSUMER_REDELIVERIES: &str = "aerostream_consumer_redeliveries_total";
pub const PROCESSING_DURATION: &str = "aerostream_processing_duration_seconds";
pub const ACTORS_ACTIVE: &str = "aerostream_actors_active";
pub const ACTOR_RESTARTS: &str = "aerostream_actor_restarts_total";
pub const ACTORS_PASSIVATED: &str = "aerostream_actors_passivated_total";
pub const SNAPSHOTS_WRITTEN: &str = "aerostream_snapshots_written_total";
pub const SNAPSHOT_RESTORES: &str = "aerostream_snapshot_restores_total";
pub const SNAPSHOT_CHECKSUM_FAILURES: &str = "aerostream_snapshot_checksum_failures_total";
pub const SNAPSHOT_REPLAYED: &str = "aerostream_snapshot_replayed_events_total";
pub const IDEMPOTENCY_WINDOW_KEYS: &str = "aerostream_idempotency_window_keys";
pub const IDEMPOTENCY_EVICTED: &str = "aerostream_idempotency_evicted_total";
pub const OUTBOX_BACKLOG: &str = "aerostream_outbox_backlog_events";
pub const OUTBOX_PUBLISHED: &str = "aerostream_outbox_published_total";
pub const OUTBOX_POISONED: &str = "aerostream_outbox_poisoned_total";
pub const STORE_WRITABLE: &str = "aerostream_store_writable";
pub const BROKER_UP: &str = "aerostream_broker_up";
pub const HTTP_REQUESTS: &str = "aerostream_http_requests_total";
pub const GATEWAY_CALLS: &str = "aerostream_gateway_calls_total";
pub const GATEWAY_PENDING_CHARGES: &str = "aerostream_gateway_pending_charges";
pub const REPORT_VERSION: &str = "aerostream_report_version";
pub const REPORT_SWITCHES: &str = "aerostream_report_switches_total";
pub const COLLECTOR_EVENTS: &str = "aerostream_collector_events_total";
pub const CHANGELOG_IMPORTED: &str = "aerostream_changelog_imported_total";
pub const CHANGELOG_BARRIERS: &str = "aerostream_changelog_barriers_total";
pub const CHANGELOG_BARRIER_WAIT: &str = "aerostream_changelog_barrier_wait_seconds";

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(CHANGELOG_BARRIER_WAIT.into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ],
                )
                .expect("static buckets are valid")
                .set_buckets_for_metric(
                    Matcher::Full(PROCESSING_DURATION.into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ],
                )
                .expect("static buckets are valid")
                .install_recorder()
                .expect("the Prometheus recorder is installed once")
        })
        .clone()
}

/// Registers the counters whose label values are known up front at zero, so dashboards and alert
/// rules see 0 rather than no data before the first event of a kind.
pub fn zero_counters<'a>(inputs: impl IntoIterator<Item = &'a str>) {
    for input in inputs {
        counter!(EVENTS_CONSUMED, "input" => input.to_owned()).increment(0);
        counter!(EVENTS_RETRIED, "input" => input.to_owned()).increment(0);
        counter!(CONSUMER_REDELIVERIES, "input" => input.to_owned()).increment(0);
    }
    for kind in AggregateKind::ALL {
        counter!(ACTOR_RESTARTS, "kind" => kind.as_str()).increment(0);
        gauge!(ACTORS_ACTIVE, "kind" => kind.as_str()).increment(0.0);
    }
    for name in [
        SNAPSHOTS_WRITTEN,
        SNAPSHOT_RESTORES,
        SNAPSHOT_CHECKSUM_FAILURES,
        SNAPSHOT_REPLAYED,
    ] {
        counter!(name, "kind" => AggregateKind::Campaign.as_str()).increment(0);
    }
    for result in ["approved", "declined", "unavailable"] {
        counter!(GATEWAY_CALLS, "result" => result).increment(0);
    }
    for outcome in ["accepted", "invalid", "rate_limited"] {
        counter!(COLLECTOR_EVENTS, "outcome" => outcome).increment(0);
    }
    counter!(REPORT_SWITCHES).increment(0);
    counter!(CHANGELOG_IMPORTED).increment(0);
    counter!(CHANGELOG_BARRIERS).increment(0);
    counter!(ACTORS_PASSIVATED).increment(0);
    counter!(IDEMPOTENCY_EVICTED).increment(0);
    for kind in crate::outbox::ENTRY_KINDS {
        counter!(OUTBOX_POISONED, "kind" => kind).increment(0);
    }
}

/// Counts actor starts, stops and restarts.
pub struct MetricsObserver;

impl ActorObserver for MetricsObserver {
    fn started(&self, kind: AggregateKind) {
        gauge!(ACTORS_ACTIVE, "kind" => kind.as_str()).increment(1.0);
    }

    fn stopped(&self, kind: AggregateKind) {
        gauge!(ACTORS_ACTIVE, "kind" => kind.as_str()).decrement(1.0);
    }

    fn restarted(&self, kind: AggregateKind) {
        counter!(ACTOR_RESTARTS, "kind" => kind.as_str()).increment(1);
    }

    fn snapshot_written(&self, kind: AggregateKind) {
        counter!(SNAPSHOTS_WRITTEN, "kind" => kind.as_str()).increment(1);
    }

    fn snapshot_rejected(&self, kind: AggregateKind) {
        counter!(SNAPSHOT_CHECKSUM_FAILURES, "kind" => kind.as_str()).increment(1);
    }

    fn restored(&self, kind: AggregateKind, replayed: usize) {
        counter!(SNAPSHOT_RESTORES, "kind" => kind.as_str()).increment(1);
        counter!(SNAPSHOT_REPLAYED, "kind" => kind.as_str()).increment(replayed as u64);
    }

    fn report_version(&self, active: ReportVersion) {
        for version in ReportVersion::ALL {
            let value = if version == active { 1.0 } else { 0.0 };
            gauge!(REPORT_VERSION, "version" => version.as_str()).set(value);
        }
    }

    fn report_switched(&self, _from: ReportVersion, _to: ReportVersion) {
        counter!(REPORT_SWITCHES).increment(1);
    }
}

/// Initialises `tracing` as configured; `RUST_LOG` overrides the configured level.
pub fn init_logging(config: &DaemonConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log_format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
