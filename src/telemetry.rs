//! Metric names (SPEC §10) and their help texts, the Prometheus recorder, the actor observer and
//! log set-up.
//!
//! Labels are bounded: input name, event type, aggregate kind, outcome, reason — never an id.
//!
//! # Accounting of an input's messages
//!
//! Every message received (`consumed`, redeliveries included) ends in exactly one of five
//! outcomes, so that, per input, once nothing is in flight:
//!
//! ```text
//! consumed = applied + deduplicated + redelivered + rejected + dead_lettered
//! ```
//!
//! - `applied`: its event was committed.
//! - `deduplicated`: its idempotency key was applied before from another message (a partner sent
//!   the event twice).
//! - `redelivered`: its key was applied before from this very message (the broker delivered it
//!   again: a crash or a lost ack before the ack, a reset subscription). Told apart from
//!   `deduplicated` by the message's [`DeliveryId`](aerostream_actors::DeliveryId), stored with
//!   the key. A redelivered copy of a partner's duplicate counts as `deduplicated`.
//! - `rejected`: a business rule refused its event; counted once its dead letter is stored.
//! - `dead_lettered`: refused before reaching an aggregate (undecodable, invalid); counted once
//!   its dead letter is stored. Rejections are dead-lettered too but counted as `rejected` only.
//!
//! A message whose processing fails and is retried is counted once, by its final outcome. One
//! that the daemon gives back to the broker unfinished (`retried`, a shutdown past its timeout)
//! has no outcome here: its next delivery is consumed and counted again.

use crate::codec::{DecodeReason, WireType};
use crate::config::DaemonConfig;
use aerostream_actors::ports::ActorObserver;
use aerostream_actors::{AggregateKind, RejectReason, ReportVersion};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const EVENTS_CONSUMED: &str = "aerostream_events_consumed_total";
pub const EVENTS_APPLIED: &str = "aerostream_events_applied_total";
pub const EVENTS_DEDUPLICATED: &str = "aerostream_events_deduplicated_total";
pub const EVENTS_REDELIVERED: &str = "aerostream_events_redelivered_total";
/// The `event_type` label of a redelivered copy of a message that never decoded.
pub const UNDECODED_EVENT_TYPE: &str = "undecoded";
pub const EVENTS_REJECTED: &str = "aerostream_events_rejected_total";
pub const EVENTS_DEAD_LETTERED: &str = "aerostream_events_dead_lettered_total";
pub const INPUT_RESUBSCRIPTIONS: &str = "aerostream_input_resubscriptions_total";
pub const EVENTS_RETRIED: &str = "aerostream_events_retried_total";
pub const PROCESSING_DURATION: &str = "aerostream_processing_duration_seconds";
pub const PROCESSING_STAGE: &str = "aerostream_processing_stage_seconds";
/// The `stage` label of [`PROCESSING_STAGE`]: a message's processing duration in three parts.
pub const STAGES: [&str; 3] = ["queued", "applied", "durable"];
pub const ACTORS_ACTIVE: &str = "aerostream_actors_active";
pub const ACTOR_RESTARTS: &str = "aerostream_actor_restarts_total";
pub const ACTORS_PASSIVATED: &str = "aerostream_actors_passivated_total";
pub const SNAPSHOTS_WRITTEN: &str = "aerostream_snapshots_written_total";
pub const SNAPSHOT_RESTORES: &str = "aerostream_snapshot_restores_total";
pub const SNAPSHOT_CHECKSUM_FAILURES: &str = "aerostream_snapshot_checksum_failures_total";
pub const SNAPSHOT_REPLAYED: &str = "aerostream_snapshot_replayed_events_total";
pub const IDEMPOTENCY_WINDOW_KEYS: &str = "aerostream_idempotency_window_keys";
pub const IDEMPOTENCY_EVICTED: &str = "aerostream_idempotency_evicted_total";
pub const IDEMPOTENCY_INDEX_BYTES: &str = "aerostream_idempotency_index_bytes";
pub const STORE_DISK_BYTES: &str = "aerostream_store_disk_bytes";
pub const STORE_TRANSACTIONS: &str = "aerostream_store_transactions_total";
pub const STORE_COMMITTED_EVENTS: &str = "aerostream_store_committed_events_total";
pub const STORE_LOG_APPLICATIONS: &str = "aerostream_store_log_applications_total";
pub const STORE_LOG_APPLIED_COMMITS: &str = "aerostream_store_log_applied_commits_total";
pub const OUTBOX_BACKLOG: &str = "aerostream_outbox_backlog_events";
pub const OUTBOX_PUBLISHED: &str = "aerostream_outbox_published_total";
pub const OUTBOX_POISONED: &str = "aerostream_outbox_poisoned_total";
pub const STORE_WRITABLE: &str = "aerostream_store_writable";
pub const BROKER_UP: &str = "aerostream_broker_up";
pub const BROKER_CLIENT_RENEWALS: &str = "aerostream_broker_client_renewals_total";
pub const HTTP_REQUESTS: &str = "aerostream_http_requests_total";
pub const GATEWAY_CALLS: &str = "aerostream_gateway_calls_total";
pub const GATEWAY_PENDING_CHARGES: &str = "aerostream_gateway_pending_charges";
pub const REPORT_VERSION: &str = "aerostream_report_version";
pub const REPORT_SWITCHES: &str = "aerostream_report_switches_total";
pub const COLLECTOR_EVENTS: &str = "aerostream_collector_events_total";
pub const CHANGELOG_IMPORTED: &str = "aerostream_changelog_imported_total";
pub const CHANGELOG_READ: &str = "aerostream_changelog_read_total";
pub const CHANGELOG_BARRIERS: &str = "aerostream_changelog_barriers_total";
pub const CHANGELOG_RESUBSCRIPTIONS: &str = "aerostream_changelog_resubscriptions_total";
pub const CHANGELOG_BARRIER_WAIT: &str = "aerostream_changelog_barrier_wait_seconds";

/// The `event_type` of [`OUTBOX_PUBLISHED`] for changelog records.
pub const CHANGELOG_RECORD: &str = "changelog";

/// What a metric is, for its `# TYPE` and `# HELP` lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric's kind, unit and help text (the README's metrics table says the same, with labels).
#[derive(Debug, Clone, Copy)]
pub struct Described {
    pub name: &'static str,
    pub kind: MetricKind,
    pub unit: Option<Unit>,
    pub help: &'static str,
}

const fn described(
    name: &'static str,
    kind: MetricKind,
    unit: Option<Unit>,
    help: &'static str,
) -> Described {
    Described {
        name,
        kind,
        unit,
        help,
    }
}

use MetricKind::{Counter, Gauge, Histogram};
const COUNT: Option<Unit> = Some(Unit::Count);
const SECONDS: Option<Unit> = Some(Unit::Seconds);
const BYTES: Option<Unit> = Some(Unit::Bytes);

/// Every metric the daemon emits, with its help text. A metric missing here has no `# HELP`
/// line (a unit test compares this table with the names above and with the README).
pub const METRICS: &[Described] = &[
    described(EVENTS_CONSUMED, Counter, COUNT, "Messages received from the input's topic, every delivery counted: once nothing is in flight, consumed = applied + deduplicated + redelivered + rejected + dead_lettered."),
    described(EVENTS_APPLIED, Counter, COUNT, "Events applied: state, idempotency record and outputs committed."),
    described(EVENTS_DEDUPLICATED, Counter, COUNT, "Events skipped because another message with the same idempotency key and content was applied (a partner's duplicate)."),
    described(EVENTS_REDELIVERED, Counter, COUNT, "Messages skipped because this same message was applied before (a broker redelivery)."),
    described(EVENTS_REJECTED, Counter, COUNT, "Events refused by a business rule, by reason; each is dead-lettered with that reason."),
    described(EVENTS_DEAD_LETTERED, Counter, COUNT, "Messages dead-lettered before reaching an aggregate (undecodable or invalid), by reason; rejections are counted as rejected."),
    described(INPUT_RESUBSCRIPTIONS, Counter, COUNT, "Times an input subscribed again because the broker held messages beyond the last one received and sent none for a while."),
    described(EVENTS_RETRIED, Counter, COUNT, "Messages given back to the broker for redelivery after a failure."),
    described(PROCESSING_DURATION, Histogram, SECONDS, "Time from receiving a message to its durable commit (applied, deduplicated or redelivered)."),
    described(PROCESSING_STAGE, Histogram, SECONDS, "The processing duration in parts, by stage: queued (received until its aggregate's batch starts, behind the aggregate's running batch or a changelog barrier), applied (the actor's decision, the commit written and flushed), durable (until the commit is known durable: a flush again when the committer's failed)."),
    described(ACTORS_ACTIVE, Gauge, COUNT, "Running aggregate actors."),
    described(ACTOR_RESTARTS, Counter, COUNT, "Aggregate actors restarted by their supervisor after a panic."),
    described(ACTORS_PASSIVATED, Counter, COUNT, "Idle actors stopped (actors.idle_seconds)."),
    described(SNAPSHOTS_WRITTEN, Counter, COUNT, "Full-state snapshots written."),
    described(SNAPSHOT_RESTORES, Counter, COUNT, "Actors rebuilt from a snapshot and the journal after it."),
    described(SNAPSHOT_CHECKSUM_FAILURES, Counter, COUNT, "Snapshots passed over because their checksum did not hold."),
    described(SNAPSHOT_REPLAYED, Counter, COUNT, "Journal entries replayed by actor rebuilds."),
    described(IDEMPOTENCY_WINDOW_KEYS, Gauge, COUNT, "Idempotency keys in the window."),
    described(IDEMPOTENCY_EVICTED, Counter, COUNT, "Idempotency keys evicted past the window."),
    described(IDEMPOTENCY_INDEX_BYTES, Gauge, BYTES, "Memory the idempotency window's indexes take (which pack holds each key: about 30 to 60 bytes per key), measured at each eviction."),
    described(STORE_TRANSACTIONS, Counter, COUNT, "Transactions the committer wrote, each holding every commit handed over while the one before was written."),
    described(STORE_COMMITTED_EVENTS, Counter, COUNT, "Events in the committer's transactions: divided by aerostream_store_transactions_total, the events a transaction carries."),
    described(STORE_LOG_APPLICATIONS, Counter, COUNT, "Applications of the commit log to the store's trees (src/store/log.rs)."),
    described(STORE_LOG_APPLIED_COMMITS, Counter, COUNT, "Commits those applications wrote: divided by aerostream_store_log_applications_total, the commits applied together."),
    described(STORE_DISK_BYTES, Gauge, BYTES, "Disk space the data directory takes (blocks allocated), measured at each eviction."),
    described(OUTBOX_BACKLOG, Gauge, COUNT, "Committed output events and changelog records not yet published."),
    described(OUTBOX_PUBLISHED, Counter, COUNT, "Output events and changelog records published, by event type (changelog for records)."),
    described(OUTBOX_POISONED, Counter, COUNT, "Outbox entries that can never be published (unreadable or not encodable), set aside in the outbox_poison tree, by kind."),
    described(STORE_WRITABLE, Gauge, None, "1 while the store's write check succeeds, 0 while it cannot write (consumption stopped)."),
    described(BROKER_UP, Gauge, None, "1 when the broker answered the last health probe, else 0."),
    described(BROKER_CLIENT_RENEWALS, Counter, COUNT, "Times the Pulsar client was replaced because its connection stayed broken while a fresh client reached the broker."),
    described(HTTP_REQUESTS, Counter, COUNT, "HTTP requests served, by route and status."),
    described(GATEWAY_CALLS, Counter, COUNT, "Payment gateway calls, by result."),
    described(GATEWAY_PENDING_CHARGES, Gauge, COUNT, "Requested payments waiting to be charged (up to one batch)."),
    described(REPORT_VERSION, Gauge, None, "1 for the report version the report service answers in, 0 for the others."),
    described(REPORT_SWITCHES, Counter, COUNT, "Report version switches applied (HTTP or control topic)."),
    described(COLLECTOR_EVENTS, Counter, COUNT, "Events posted to the event collector, by outcome (invalid counts refused requests)."),
    described(CHANGELOG_IMPORTED, Counter, COUNT, "Changelog records of other daemons imported (newer than the local state)."),
    described(CHANGELOG_READ, Counter, COUNT, "Changelog messages the follower read, every daemon's records and markers, since the process started: a restart reads from its checkpoint."),
    described(CHANGELOG_BARRIERS, Counter, COUNT, "Changelog barriers written (markers shared by the events waiting for them)."),
    described(CHANGELOG_RESUBSCRIPTIONS, Counter, COUNT, "Times the changelog follower subscribed again because no record came while a marker was pending (changelog.stall_timeout_ms)."),
    described(CHANGELOG_BARRIER_WAIT, Histogram, SECONDS, "Time an event waited for the changelog before its aggregate was handled."),
];

/// Registers every metric's help text and unit with the installed recorder.
fn describe() {
    for metric in METRICS {
        let (name, help) = (metric.name, metric.help);
        match (metric.kind, metric.unit) {
            (Counter, Some(unit)) => describe_counter!(name, unit, help),
            (Counter, None) => describe_counter!(name, help),
            (Gauge, Some(unit)) => describe_gauge!(name, unit, help),
            (Gauge, None) => describe_gauge!(name, help),
            (Histogram, Some(unit)) => describe_histogram!(name, unit, help),
            (Histogram, None) => describe_histogram!(name, help),
        }
    }
}

/// The event types an input can apply: every type on the wire but the daemon's outputs.
pub fn input_event_types() -> impl Iterator<Item = &'static str> {
    WireType::ALL
        .into_iter()
        .filter(|wire| !wire.is_output())
        .map(WireType::name)
}

/// Every `reason` of [`EVENTS_DEAD_LETTERED`]: why a message was refused before its event reached
/// an aggregate. Each kind of refusal lists its reasons in one table next to its enum; chain a
/// new one here (expected: `ce_type`/`ce_dataschema` mismatches, a missing or wrong key,
/// `max_redeliveries`). Rejections ([`RejectReason::ALL`]) are [`EVENTS_REJECTED`]'s.
pub fn dead_letter_reasons() -> impl Iterator<Item = &'static str> {
    DecodeReason::ALL
        .iter()
        .map(|reason| reason.as_str())
        .chain([crate::ingest::MAX_REDELIVERIES])
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Buckets of the processing histograms, in seconds; 20 ms is SPEC §12's p99 target for publish →
/// applied, of which these are the daemon's part.
const PROCESSING_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Installs the Prometheus recorder once per process, with every metric's help text, and returns
/// its handle.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(CHANGELOG_BARRIER_WAIT.into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ],
                )
                .expect("static buckets are valid")
                .set_buckets_for_metric(Matcher::Full(PROCESSING_STAGE.into()), PROCESSING_BUCKETS)
                .expect("static buckets are valid")
                .set_buckets_for_metric(Matcher::Full(PROCESSING_DURATION.into()), PROCESSING_BUCKETS)
                .expect("static buckets are valid")
                .install_recorder()
                .expect("the Prometheus recorder is installed once");
            describe();
            handle
        })
        .clone()
}

/// Registers the counters whose label values are known up front at zero, so dashboards and alert
/// rules see 0 rather than no data before the first event of a kind: an alert on "consumed but
/// none applied" needs an `applied` series that is there and stays at 0.
pub fn zero_counters<'a>(inputs: impl IntoIterator<Item = &'a str>) {
    for input in inputs {
        counter!(EVENTS_CONSUMED, "input" => input.to_owned()).increment(0);
        counter!(EVENTS_RETRIED, "input" => input.to_owned()).increment(0);
        counter!(INPUT_RESUBSCRIPTIONS, "input" => input.to_owned()).increment(0);
        for event_type in input_event_types() {
            for name in [EVENTS_APPLIED, EVENTS_DEDUPLICATED, EVENTS_REDELIVERED] {
                counter!(name, "input" => input.to_owned(), "event_type" => event_type).increment(0);
            }
        }
        for reason in RejectReason::ALL {
            counter!(EVENTS_REJECTED, "input" => input.to_owned(), "reason" => reason.as_str()).increment(0);
        }
        for reason in dead_letter_reasons() {
            counter!(EVENTS_DEAD_LETTERED, "input" => input.to_owned(), "reason" => reason).increment(0);
        }
    }
    let outputs = WireType::ALL
        .into_iter()
        .filter(|wire| wire.is_output())
        .map(WireType::name);
    for event_type in outputs.chain([CHANGELOG_RECORD]) {
        counter!(OUTBOX_PUBLISHED, "event_type" => event_type).increment(0);
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
    counter!(CHANGELOG_READ).increment(0);
    counter!(CHANGELOG_BARRIERS).increment(0);
    counter!(CHANGELOG_RESUBSCRIPTIONS).increment(0);
    counter!(BROKER_CLIENT_RENEWALS).increment(0);
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

/// Initialises `tracing` as configured (see [`crate::logging`]); `RUST_LOG` overrides the
/// configured level.
pub fn init_logging(config: &DaemonConfig) {
    crate::logging::init(config);
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::histogram;
    use std::collections::BTreeSet;

    /// The names of `exposition`'s `# TYPE` lines that no `# HELP` line describes.
    fn without_help(exposition: &str) -> Vec<&str> {
        let helped: BTreeSet<&str> = exposition
            .lines()
            .filter_map(|line| line.strip_prefix("# HELP "))
            .filter_map(|rest| rest.split(' ').next())
            .collect();
        exposition
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split(' ').next())
            .filter(|name| !helped.contains(name))
            .collect()
    }

    #[test]
    fn the_table_describes_every_metric_name_here_and_in_the_readme() {
        let source = include_str!("telemetry.rs");
        let constants: BTreeSet<&str> = source
            .lines()
            .filter(|line| line.starts_with("pub const ") && line.contains(": &str = \"aerostream_"))
            .filter_map(|line| line.split('"').nth(1))
            .collect();
        let described: BTreeSet<&str> = METRICS.iter().map(|metric| metric.name).collect();
        assert_eq!(described.len(), METRICS.len(), "one row per metric");
        assert_eq!(described, constants, "METRICS against the name constants");
        let documented: BTreeSet<&str> = include_str!("../README.md")
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|rest| rest.split('`').next())
            .filter(|name| name.starts_with("aerostream_"))
            .collect();
        assert_eq!(
            described, documented,
            "METRICS against the README's metrics table"
        );
        for metric in METRICS {
            assert!(!metric.help.is_empty(), "{}", metric.name);
            let suffix_fits = match metric.kind {
                MetricKind::Counter => metric.name.ends_with("_total"),
                MetricKind::Gauge => !metric.name.ends_with("_total"),
                MetricKind::Histogram => metric.name.ends_with("_seconds"),
            };
            assert!(suffix_fits, "{} is a {:?}", metric.name, metric.kind);
        }
    }

    #[test]
    fn every_metric_has_help_and_every_known_label_value_starts_at_zero() {
        let handle = prometheus();
        zero_counters(["orders"]);
        for metric in METRICS {
            match metric.kind {
                MetricKind::Counter => counter!(metric.name, "input" => "touched").increment(0),
                MetricKind::Gauge => gauge!(metric.name, "input" => "touched").increment(0.0),
                MetricKind::Histogram => histogram!(metric.name, "input" => "touched").record(0.0),
            }
        }
        let exposition = handle.render();
        assert_eq!(without_help(&exposition), Vec::<&str>::new(), "{exposition}");
        assert!(exposition.contains(&format!(
            "# HELP {EVENTS_REDELIVERED} Messages skipped because this same message was applied before"
        )));

        let zero = |name: &str, labels: &str| {
            let line = format!("{name}{{{labels}}} 0");
            assert!(exposition.lines().any(|l| l == line), "{line} in\n{exposition}");
        };
        for event_type in input_event_types() {
            for name in [EVENTS_APPLIED, EVENTS_DEDUPLICATED, EVENTS_REDELIVERED] {
                zero(name, &format!("input=\"orders\",event_type=\"{event_type}\""));
            }
        }
        assert_eq!(input_event_types().count(), 12);
        assert!(
            !input_event_types().any(|t| t == "PagoExitoso"),
            "outputs are not consumed"
        );
        for reason in RejectReason::ALL {
            zero(
                EVENTS_REJECTED,
                &format!("input=\"orders\",reason=\"{}\"", reason.as_str()),
            );
        }
        for reason in DecodeReason::ALL {
            zero(
                EVENTS_DEAD_LETTERED,
                &format!("input=\"orders\",reason=\"{}\"", reason.as_str()),
            );
        }
        zero(EVENTS_CONSUMED, "input=\"orders\"");
        zero(OUTBOX_PUBLISHED, "event_type=\"ComisionCalculada\"");
        zero(OUTBOX_PUBLISHED, "event_type=\"changelog\"");
    }
}
