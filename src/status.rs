//! `aerostream status`: one screen about a running daemon, read from its HTTP API. `/health` gives
//! the health and its reasons, the inputs (subscribed, messages held, stalled), the idempotency
//! window and the outbox backlog; two `/metrics` samples give the rates of applied, rejected,
//! dead-lettered and duplicate messages per input, the actors in memory and the report version.
//! The daemon does not know its subscriptions' backlog on the broker, so there is no lag column
//! (the broker's topic stats have it).

use crate::tables;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::telemetry::{
    ACTORS_ACTIVE, EVENTS_APPLIED, EVENTS_CONSUMED, EVENTS_DEAD_LETTERED, EVENTS_DEDUPLICATED,
    EVENTS_REDELIVERED, EVENTS_REJECTED, REPORT_VERSION,
};

/// How long one request to the daemon may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client keeps an idle connection to the daemon for the next request: less than the
/// daemon's keep-alive (actix-web's 5 s), or a request may go out on a connection the daemon is
/// closing and fail with "connection closed before message completed" (a test that read
/// /health 5.4 s after its last request did).
pub const IDLE_CONNECTION: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {body}")]
    Answer { url: String, status: u16, body: String },
}

/// One sample of a metric: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A Prometheus text exposition, by metric name (comments and histograms' own series kept as
/// they are named).
#[derive(Debug, Clone, Default)]
pub struct Metrics(BTreeMap<String, Vec<Series>>);

impl Metrics {
    /// Reads the text format: `name{label="value",…} value` lines; others are skipped.
    pub fn parse(text: &str) -> Metrics {
        let mut metrics: BTreeMap<String, Vec<Series>> = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            metrics
                .entry(name.to_owned())
                .or_default()
                .push(Series { labels, value });
        }
        Metrics(metrics)
    }

    /// The sum of `name`'s series whose labels include every one of `with`.
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.0
            .get(name)
            .into_iter()
            .flatten()
            .filter(|series| {
                with.iter()
                    .all(|(k, v)| series.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|series| series.value)
            .sum()
    }

    pub fn series(&self, name: &str) -> &[Series] {
        self.0.get(name).map_or(&[], Vec::as_slice)
    }
}

/// `a="x",b="y"` → {a: x, b: y} (label values with escaped quotes are not the daemon's).
fn labels(text: &str) -> BTreeMap<String, String> {
    text.split("\",")
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key.trim().to_owned(), value.trim_matches('"').to_owned()))
        })
        .collect()
}

/// What one look at the daemon saw.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    /// The /health answer (200 or 503 both carry it).
    pub health: Value,
    pub metrics: Metrics,
}

impl Sample {
    pub fn healthy(&self) -> bool {
        self.health["status"] == "ok"
    }

    pub fn reasons(&self) -> Vec<String> {
        self.health["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|reason| reason.as_str().map(str::to_owned))
            .collect()
    }
}

/// Reads /health and /metrics of the daemon at `base_url`.
pub fn sample(client: &reqwest::blocking::Client, base_url: &str) -> Result<Sample, StatusError> {
    let get = |path: &str| -> Result<(u16, String), StatusError> {
        let url = format!("{base_url}{path}");
        let http = |source| StatusError::Http {
            url: url.clone(),
            source,
        };
        let response = client.get(&url).send().map_err(http)?;
        let status = response.status().as_u16();
        Ok((status, response.text().map_err(http)?))
    };
    let (status, body) = get("/health")?;
    let health = match serde_json::from_str::<Value>(&body) {
        Ok(health) if status == 200 || status == 503 => health,
        _ => {
            return Err(StatusError::Answer {
                url: format!("{base_url}/health"),
                status,
                body,
            })
        }
    };
    let (status, text) = get("/metrics")?;
    if status != 200 {
        return Err(StatusError::Answer {
            url: format!("{base_url}/metrics"),
            status,
            body: text,
        });
    }
    Ok(Sample {
        at: Instant::now(),
        health,
        metrics: Metrics::parse(&text),
    })
}

/// Outcomes per input, each shown with its rate: (column, counters summed).
const OUTCOMES: [(&str, &[&str]); 5] = [
    ("CONSUMED", &[EVENTS_CONSUMED]),
    ("APPLIED", &[EVENTS_APPLIED]),
    ("REJECTED", &[EVENTS_REJECTED]),
    ("DEAD-LETTERED", &[EVENTS_DEAD_LETTERED]),
    ("DUPLICATES", &[EVENTS_DEDUPLICATED, EVENTS_REDELIVERED]),
];

fn yes_no(value: &Value, yes: &str, no: &str) -> String {
    match value.as_bool() {
        Some(true) => yes.to_owned(),
        Some(false) => no.to_owned(),
        None => "-".to_owned(),
    }
}

fn count(value: &Value) -> String {
    value.as_u64().map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// The screen: health and reasons, a summary, then one row per input with each outcome's total
/// and its rate between `before` and `now`.
pub fn render(base_url: &str, before: &Sample, now: &Sample) -> String {
    let health = &now.health;
    let components = &health["components"];
    let mut out = format!(
        "aerostream at {base_url}: {}\n",
        if now.healthy() { "ok" } else { "UNAVAILABLE" }
    );
    for reason in now.reasons() {
        out.push_str(&format!("  - {reason}\n"));
    }
    out.push('\n');

    let mut summary = tables::plain(&[]);
    let version = now
        .metrics
        .series(REPORT_VERSION)
        .iter()
        .find(|series| series.value == 1.0)
        .and_then(|series| series.labels.get("version").cloned())
        .unwrap_or_else(|| "-".into());
    let actors: Vec<String> = now
        .metrics
        .series(ACTORS_ACTIVE)
        .iter()
        .filter(|series| series.value > 0.0)
        .filter_map(|series| Some(format!("{} {}", series.labels.get("kind")?, series.value)))
        .collect();
    let actors_total = now.metrics.sum(ACTORS_ACTIVE, &[]);
    let changelog = match &components["changelog"] {
        Value::Null => "off".to_owned(),
        changelog => yes_no(&changelog["settled"], "settled", "settling"),
    };
    let rows: [(&str, String); 7] = [
        ("broker", yes_no(&components["broker"], "up", "DOWN")),
        ("store", yes_no(&components["store"], "writable", "NOT WRITABLE")),
        ("changelog", changelog),
        ("report version", version),
        (
            "idempotency window",
            format!("{} keys", count(&health["idempotency_window_keys"])),
        ),
        ("outbox backlog", count(&health["outbox_backlog"])),
        (
            "actors in memory",
            match actors.is_empty() {
                true => format!("{actors_total}"),
                false => format!("{actors_total} ({})", actors.join(", ")),
            },
        ),
    ];
    for (name, value) in rows {
        summary.add_row(vec![name.to_owned(), value]);
    }
    out.push_str(&tables::render(summary));
    out.push_str("\n\n");

    let seconds = now.at.duration_since(before.at).as_secs_f64();
    let mut header = vec!["INPUT", "SUBSCRIBED", "HELD", "STALLED"];
    header.extend(OUTCOMES.iter().map(|(column, _)| *column));
    let mut inputs = tables::plain(&header);
    let empty = serde_json::Map::new();
    for (name, input) in components["inputs"].as_object().unwrap_or(&empty) {
        let mut row = vec![
            name.clone(),
            yes_no(&input["subscribed"], "yes", "NO"),
            count(&input["held"]),
            yes_no(&input["stalled"], "YES", "no"),
        ];
        for (_, counters) in OUTCOMES {
            let total = |sample: &Sample| -> f64 {
                counters
                    .iter()
                    .map(|counter| sample.metrics.sum(counter, &[("input", name)]))
                    .sum()
            };
            let (then, total_now) = (total(before), total(now));
            let rate = if seconds > 0.0 {
                (total_now - then).max(0.0) / seconds
            } else {
                0.0
            };
            row.push(format!("{total_now} ({rate:.1}/s)"));
        }
        inputs.add_row(row);
    }
    out.push_str(&tables::render(inputs));
    out.push_str(&format!(
        "\n\ntotals since the daemon started; rates over the last {seconds:.1} s\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EXPOSITION: &str = "\
# HELP aerostream_events_applied_total Events applied.
# TYPE aerostream_events_applied_total counter
aerostream_events_applied_total{input=\"campaigns\",event_type=\"CampanaCreada\"} 3
aerostream_events_applied_total{input=\"campaigns\",event_type=\"ClickRegistrado\"} 7
aerostream_events_applied_total{input=\"payments\",event_type=\"PagoSolicitado\"} 5
aerostream_actors_active{kind=\"campaign\"} 2
aerostream_actors_active{kind=\"payment\"} 0
aerostream_report_version{version=\"v1\"} 0
aerostream_report_version{version=\"v2\"} 1
aerostream_outbox_backlog_events 4
";

    #[test]
    fn metrics_are_summed_by_name_and_labels() {
        let metrics = Metrics::parse(EXPOSITION);
        assert_eq!(metrics.sum(EVENTS_APPLIED, &[("input", "campaigns")]), 10.0);
        assert_eq!(metrics.sum(EVENTS_APPLIED, &[]), 15.0);
        assert_eq!(metrics.sum("aerostream_outbox_backlog_events", &[]), 4.0);
        assert_eq!(metrics.sum("missing", &[]), 0.0);
        assert_eq!(
            metrics.series(ACTORS_ACTIVE)[0]
                .labels
                .get("kind")
                .map(String::as_str),
            Some("campaign")
        );
    }

    #[test]
    fn the_screen_has_health_summary_and_rates_per_input() {
        let health = json!({
            "status": "unavailable",
            "reasons": ["broker: did not answer the last probe"],
            "components": {
                "broker": false, "store": true, "changelog": null,
                "inputs": { "campaigns": { "subscribed": true, "held": 2, "stalled": false } },
            },
            "idempotency_window_keys": 42,
            "outbox_backlog": 4,
        });
        let at = Instant::now();
        let before = Sample {
            at,
            health: health.clone(),
            metrics: Metrics::parse(
                "aerostream_events_applied_total{input=\"campaigns\",event_type=\"X\"} 4\n",
            ),
        };
        let now = Sample {
            at: at + Duration::from_secs(2),
            health,
            metrics: Metrics::parse(EXPOSITION),
        };
        let screen = render("http://daemon", &before, &now);
        for expected in [
            "aerostream at http://daemon: UNAVAILABLE",
            "  - broker: did not answer the last probe",
            "DOWN",
            "report version",
            "v2",
            "42 keys",
            "2 (campaign 2)",
            "10 (3.0/s)",
            "rates over the last 2.0 s",
        ] {
            assert!(screen.contains(expected), "{expected:?} not in:\n{screen}");
        }
    }
}
