//! Observability (SPEC §10) against a real Prometheus (Debian package `prometheus`): it scrapes a
//! daemon under generated traffic with duplicates, conflicts, a bad payload and an actor kill;
//! every query of the Grafana dashboards returns data, every alert rule evaluates, `promtool`
//! accepts the configuration and the rules, and every metric of the README's table is emitted
//! with its help text. A fresh daemon whose every message of an input fails trips
//! `AerostreamNoEventsApplied` for that input (deploy/alerts.test.yml has the rule's unit tests).

mod support;

use aerostream::generator::{self, Options};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::daemon::wait_for;
use support::events;
use support::state::wait_for_state;
use support::topic::send_raw;
use support::{free_port, Harness};

const TOKEN: &str = "observability-token";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A Prometheus process, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    http: reqwest::blocking::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, target_port: u16) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {:?}\n\
                 scrape_configs:\n  - job_name: aerostream\n    static_configs:\n      - targets: [\"127.0.0.1:{target_port}\"]\n",
                repo("deploy/alerts.yml").display().to_string()
            ),
        )
        .unwrap();
        let port = free_port().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus is installed (scripts/prereqs installs it)");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::blocking::Client::new(),
        }
    }

    /// Runs an instant query; `None` when Prometheus is not answering yet.
    fn query(&self, expr: &str) -> Option<Value> {
        let response = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .ok()?;
        response.json().ok()
    }

    fn results(&self, expr: &str) -> usize {
        self.query(expr)
            .and_then(|answer| answer["data"]["result"].as_array().map(Vec::len))
            .unwrap_or(0)
    }
}

/// Every `expr` of every panel of every dashboard under grafana/dashboards.
fn dashboard_queries() -> Vec<String> {
    let mut queries = Vec::new();
    for entry in std::fs::read_dir(repo("grafana/dashboards")).unwrap() {
        let dashboard: Value =
            serde_json::from_slice(&std::fs::read(entry.unwrap().path()).unwrap()).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                queries.push(target["expr"].as_str().unwrap().to_owned());
            }
        }
    }
    queries
}

/// Every alert `expr` of deploy/alerts.yml (one per `expr:` line).
fn alert_queries() -> Vec<String> {
    std::fs::read_to_string(repo("deploy/alerts.yml"))
        .unwrap()
        .lines()
        .filter_map(|line| line.trim().strip_prefix("expr: "))
        .map(str::to_owned)
        .collect()
}

/// The metric names of the README's metrics table.
fn documented_metrics() -> Vec<String> {
    std::fs::read_to_string(repo("README.md"))
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("| `aerostream_"))
        .map(|rest| format!("aerostream_{}", rest.split('`').next().unwrap()))
        .collect()
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool is installed");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn dashboards_and_alerts_run_against_a_real_prometheus() {
    promtool(&["check", "config", repo("deploy/prometheus.yml").to_str().unwrap()]);
    promtool(&["check", "rules", repo("deploy/alerts.yml").to_str().unwrap()]);

    let harness = Harness::new()
        .admin_token(TOKEN)
        .chaos(true)
        .extra("[actors]\nidle_seconds = 1\n\n[snapshot]\nevery_events = 5\nkeep = 2\n")
        .build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let daemon = harness.start();
    let prometheus = Prometheus::start(harness.dir(), harness.port());

    // Traffic that moves every metric: duplicates, conflicts, a bad payload, an actor kill.
    let plan = generator::plan(&Options {
        seed: 81,
        campaigns: 5,
        payments: 40,
        events: 1_500,
        duplicate_fraction: 0.1,
        reorder_window: 4,
        conflict_fraction: 0.2,
        ..Options::for_daemon(config)
    });
    events::publish(runtime, config, &plan.stream);
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(60));
    events::publish(runtime, config, &plan.conflicts);
    let payments = config.broker.topic(&config.inputs["payments"].topic);
    let properties = [("ce_dataschema", "com.aeropartners.idempotencia.PagoSolicitado/v1")];
    runtime
        .block_on(send_raw(
            harness.client(),
            &payments,
            "bad",
            &properties,
            vec![0xff, 0x00, 0x13],
        ))
        .unwrap();
    let kill = json!({ "kind": "campaign", "id": "camp-00000" });
    let mut wakes = 0;
    wait_for("a campaign actor to kill", Duration::from_secs(30), || {
        if daemon.post("/admin/chaos/kill-actor", Some(TOKEN), &kill).ok()? == 202 {
            return Some(());
        }
        // Passivated already: an event brings the actor back.
        wakes += 1;
        events::publish(
            runtime,
            config,
            &[events::impression("camp-00000", &format!("wake-{wakes}"))],
        );
        None
    })
    .unwrap();
    daemon
        .wait_metric(
            "aerostream_events_dead_lettered_total",
            &["reason=\"invalid_avro\""],
            1.0,
        )
        .unwrap();

    // Prometheus has scraped the daemon long enough for rates over a window.
    wait_for("Prometheus to scrape the daemon", Duration::from_secs(60), || {
        (prometheus.results(r#"up{job="aerostream"} == 1"#) == 1).then_some(())
    })
    .unwrap();
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} dashboard queries", queries.len());
    wait_for(
        "every dashboard query to return data",
        Duration::from_secs(60),
        || {
            queries
                .iter()
                .all(|expr| prometheus.results(expr) > 0)
                .then_some(())
        },
    )
    .unwrap_or_else(|e| {
        let empty: Vec<&String> = queries
            .iter()
            .filter(|expr| prometheus.results(expr) == 0)
            .collect();
        panic!("{e}: no data for {empty:#?}")
    });
    for expr in alert_queries() {
        let answer = prometheus.query(&expr).expect("Prometheus answers");
        assert_eq!(answer["status"], "success", "alert expression {expr}: {answer}");
    }

    let exposition = daemon.metrics_text().unwrap();
    for metric in documented_metrics() {
        assert!(
            exposition.lines().any(|line| line.starts_with(&metric)),
            "{metric} is documented but not emitted"
        );
    }
    let typed = names_after(&exposition, "# TYPE ");
    let helped = names_after(&exposition, "# HELP ");
    let without_help: Vec<&String> = typed.iter().filter(|name| !helped.contains(*name)).collect();
    assert!(typed.len() >= 30, "{typed:?}");
    assert!(without_help.is_empty(), "# TYPE without # HELP: {without_help:?}");
}

/// The metric names of the exposition's lines that start with `prefix` (`# TYPE `, `# HELP `).
fn names_after(exposition: &str, prefix: &str) -> Vec<String> {
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix(prefix)?.split(' ').next())
        .map(str::to_owned)
        .collect()
}

/// The issue #19 case, end to end: a daemon starts, and every message of one input fails. Its
/// counters start at 0, so the rule sees "consumed, none applied" for that input at once and the
/// alert is pending (it fires after its 10 minutes; deploy/alerts.test.yml checks that part),
/// while an input that applies stays quiet.
#[test]
fn a_fresh_daemon_whose_every_message_fails_trips_no_events_applied() {
    let harness = Harness::started();
    let (config, runtime) = (harness.config(), harness.runtime());
    let daemon = harness.start();
    let prometheus = Prometheus::start(harness.dir(), harness.port());
    wait_for("Prometheus to scrape the daemon", Duration::from_secs(60), || {
        (prometheus.results(r#"aerostream_events_applied_total{input="payments"} == 0"#) > 0).then_some(())
    })
    .unwrap();

    let payments = config.broker.topic(&config.inputs["payments"].topic);
    let properties = [("ce_dataschema", "com.aeropartners.idempotencia.PagoSolicitado/v1")];
    for n in 0..5u8 {
        runtime
            .block_on(send_raw(
                harness.client(),
                &payments,
                "bad",
                &properties,
                vec![0xff, n],
            ))
            .unwrap();
    }
    // Meanwhile campaigns apply: their events of a small generated stream.
    let plan = generator::plan(&Options {
        seed: 7,
        campaigns: 2,
        payments: 1,
        events: 40,
        duplicate_fraction: 0.0,
        reorder_window: 0,
        ..Options::for_daemon(config)
    });
    let campaign_events: Vec<_> = plan
        .stream
        .into_iter()
        .filter(|planned| planned.input == generator::Input::Campaigns)
        .collect();
    events::publish(runtime, config, &campaign_events);
    daemon
        .wait_metric(
            "aerostream_events_dead_lettered_total",
            &["input=\"payments\""],
            5.0,
        )
        .unwrap();
    daemon
        .wait_metric(
            "aerostream_events_applied_total",
            &["input=\"campaigns\""],
            campaign_events.len() as f64,
        )
        .unwrap();

    let alert = r#"ALERTS{alertname="AerostreamNoEventsApplied"}"#;
    let alerting = wait_for(
        "AerostreamNoEventsApplied to be pending",
        Duration::from_secs(60),
        || {
            let answer = prometheus.query(alert)?;
            let inputs: Vec<String> = answer["data"]["result"]
                .as_array()?
                .iter()
                .filter_map(|series| series["metric"]["input"].as_str().map(str::to_owned))
                .collect();
            (!inputs.is_empty()).then_some(inputs)
        },
    )
    .unwrap();
    assert_eq!(alerting, ["payments"], "only the input whose every message fails");
}
