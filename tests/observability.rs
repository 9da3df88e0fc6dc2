//! Observability (SPEC §10) against a real Prometheus (Debian package `prometheus`): it scrapes two
//! daemons on one broker (an active one and its standby) under generated traffic with duplicates,
//! conflicts, a bad payload and an actor kill; the Grafana dashboards are valid JSON with
//! `$datasource` and `$instance` variables, one unit and a description per panel, and every
//! metric of the README's table on a panel; every panel query filters each metric by
//! `$instance`, returns data, and keeps the daemons apart (each series names its instance); every
//! alert rule evaluates, `promtool` accepts the configuration and the rules, and every metric of
//! the README's table is emitted with its help text. A fresh daemon whose every message of an
//! input fails trips `AerostreamNoEventsApplied` for that input (deploy/alerts.test.yml has the
//! rule's unit tests).

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
    /// Prometheus scraping the daemons on `target_ports` every second, with deploy/alerts.yml.
    fn start(dir: &Path, target_ports: &[u16]) -> Prometheus {
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = target_ports
            .iter()
            .map(|port| format!("\"127.0.0.1:{port}\""))
            .collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {:?}\n\
                 scrape_configs:\n  - job_name: aerostream\n    static_configs:\n      - targets: [{}]\n",
                repo("deploy/alerts.yml").display().to_string(),
                targets.join(", ")
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

    /// The series an instant query answers (empty when Prometheus is not answering yet).
    fn series(&self, expr: &str) -> Vec<Value> {
        self.query(expr)
            .and_then(|answer| answer["data"]["result"].as_array().cloned())
            .unwrap_or_default()
    }
}

/// One panel of a dashboard under grafana/dashboards.
struct Panel {
    /// `<dashboard file>: <panel title>`, for messages.
    name: String,
    exprs: Vec<String>,
}

/// Every dashboard under grafana/dashboards, checked: valid JSON; a `$datasource` variable
/// (Prometheus data sources) and an `$instance` variable (several instances, or all) read from
/// it; every panel and query on `${datasource}`, with a description and exactly one unit (none
/// set apart by an override); every metric named in a query filtered by `$instance`. Answers
/// their panels.
fn dashboard_panels() -> Vec<Panel> {
    let mut panels = Vec::new();
    for entry in std::fs::read_dir(repo("grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let dashboard: Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
            .unwrap_or_else(|e| panic!("{file} is not valid JSON: {e}"));
        let variables = dashboard["templating"]["list"].as_array().unwrap();
        let variable = |name: &str| {
            variables
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("{file}: no ${name} variable"))
        };
        let datasource = variable("datasource");
        assert_eq!(
            (&datasource["type"], &datasource["query"]),
            (&json!("datasource"), &json!("prometheus")),
            "{file}: $datasource"
        );
        let instance = variable("instance");
        assert_eq!(
            instance["datasource"]["uid"], "${datasource}",
            "{file}: $instance"
        );
        assert!(
            instance["definition"].as_str().unwrap().contains("instance")
                && instance["multi"] == true
                && instance["includeAll"] == true,
            "{file}: $instance lists the instances, several or all: {instance}"
        );
        let mut ids = std::collections::BTreeSet::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            let name = format!("{file}: {}", panel["title"].as_str().unwrap());
            assert!(ids.insert(panel["id"].as_u64().unwrap()), "{name}: id repeated");
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{name}");
            let description = panel["description"].as_str().unwrap_or_default();
            assert!(description.len() > 20, "{name}: no description");
            let unit = panel["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .unwrap_or_default();
            assert!(!unit.is_empty(), "{name}: no unit");
            let overridden = panel["fieldConfig"]["overrides"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|o| o["properties"].as_array().into_iter().flatten())
                .any(|property| property["id"] == "unit");
            assert!(!overridden, "{name}: a second unit in an override");
            let mut exprs = Vec::new();
            for target in panel["targets"].as_array().unwrap() {
                assert_eq!(target["datasource"]["uid"], "${datasource}", "{name}");
                let expr = target["expr"].as_str().unwrap().to_owned();
                assert_filters_every_metric_by_instance(&name, &expr);
                exprs.push(expr);
            }
            assert!(!exprs.is_empty(), "{name}: no query");
            panels.push(Panel { name, exprs });
        }
    }
    panels
}

/// Every metric a query names is selected with `{instance=~"$instance"` first, so no metric of
/// another instance enters it.
fn assert_filters_every_metric_by_instance(panel: &str, expr: &str) {
    let mut rest = expr;
    let mut metrics = 0;
    while let Some(at) = rest.find("aerostream_") {
        let after = &rest[at..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        assert!(
            after[name_len..].starts_with(r#"{instance=~"$instance""#),
            "{panel}: {} is not filtered by $instance in {expr}",
            &after[..name_len]
        );
        metrics += 1;
        rest = &after[name_len..];
    }
    assert!(metrics > 0, "{panel}: no aerostream metric in {expr}");
}

/// The metric names (histograms without their `_bucket` suffix) that `exprs` select.
fn metrics_named(exprs: &[&String]) -> std::collections::BTreeSet<String> {
    exprs
        .iter()
        .flat_map(|expr| expr.match_indices("aerostream_").map(|(at, _)| &expr[at..]))
        .map(|from| {
            let name = from
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap();
            name.strip_suffix("_bucket").unwrap_or(name).to_owned()
        })
        .collect()
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
    // What needs no daemon first: the dashboards' shape, and the README's metrics all shown.
    let panels = dashboard_panels();
    let queries: Vec<&String> = panels.iter().flat_map(|panel| &panel.exprs).collect();
    assert!(panels.len() >= 20, "{} panels", panels.len());
    let shown = metrics_named(&queries);
    let hidden: Vec<String> = documented_metrics()
        .into_iter()
        .filter(|metric| !shown.contains(metric))
        .collect();
    assert!(
        hidden.is_empty(),
        "in the README's table but on no panel: {hidden:?}"
    );

    // Two daemons on one broker: whichever the broker makes active applies, the other imports
    // its changelog records (docs/TAKEOVER.md). One Prometheus scrapes both.
    let harness = Harness::new()
        .admin_token(TOKEN)
        .chaos(true)
        .extra("[actors]\nidle_seconds = 1\n\n[snapshot]\nevery_events = 5\nkeep = 2\n")
        .build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let second = harness.node();
    let daemons = [harness.start(), second.start()];
    let instances = [harness.port(), second.port].map(|port| format!("127.0.0.1:{port}"));
    let prometheus = Prometheus::start(harness.dir(), &[harness.port(), second.port]);

    // Traffic that moves every metric: duplicates, conflicts, a bad payload, an actor kill.
    let plan = generator::plan(&Options {
        seed: 81,
        campaigns: 5,
        payments: 20,
        events: 600,
        duplicate_fraction: 0.1,
        reorder_window: 4,
        conflict_fraction: 0.2,
        ..Options::for_daemon(config)
    });
    events::publish(runtime, config, &plan.stream);
    wait_for_state(&daemons[0], &plan.expected, Duration::from_secs(60));
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
        let killed = daemons
            .iter()
            .any(|daemon| daemon.post("/admin/chaos/kill-actor", Some(TOKEN), &kill).ok() == Some(202));
        if killed {
            return Some(());
        }
        // Passivated already (or never loaded by that daemon): an event brings the actor back.
        wakes += 1;
        events::publish(
            runtime,
            config,
            &[events::impression("camp-00000", &format!("wake-{wakes}"))],
        );
        None
    })
    .unwrap();
    wait_for("the bad payload dead-lettered", Duration::from_secs(30), || {
        let dead: f64 = daemons
            .iter()
            .filter_map(|daemon| {
                daemon
                    .metric(
                        "aerostream_events_dead_lettered_total",
                        &["reason=\"invalid_avro\""],
                    )
                    .ok()
            })
            .sum();
        (dead == 1.0).then_some(())
    })
    .unwrap();

    // Every query with both instances selected (Grafana's "All") returns data, each series
    // naming its instance: the daemons are never summed together.
    wait_for(
        "Prometheus to scrape both daemons",
        Duration::from_secs(60),
        || (prometheus.results(r#"up{job="aerostream"} == 1"#) == 2).then_some(()),
    )
    .unwrap();
    let both = instances.join("|");
    let for_instances = |expr: &str, selected: &str| expr.replace("$instance", selected);
    wait_for(
        "every dashboard query to return data",
        Duration::from_secs(60),
        || {
            queries
                .iter()
                .all(|expr| prometheus.results(&for_instances(expr, &both)) > 0)
                .then_some(())
        },
    )
    .unwrap_or_else(|e| {
        let empty: Vec<&&String> = queries
            .iter()
            .filter(|expr| prometheus.results(&for_instances(expr, &both)) == 0)
            .collect();
        panic!("{e}: no data for {empty:#?}")
    });
    for panel in &panels {
        for expr in &panel.exprs {
            for series in prometheus.series(&for_instances(expr, &both)) {
                let instance = series["metric"]["instance"].as_str().unwrap_or_default();
                assert!(
                    instances.iter().any(|i| i == instance),
                    "{}: a series without its instance: {series} of {expr}",
                    panel.name
                );
            }
        }
    }
    // One instance selected: only its series. The gauges' queries (no rate over a window, no
    // histogram) answer for each daemon, the standby included.
    let gauges: Vec<&&String> = queries
        .iter()
        .filter(|expr| {
            !["rate(", "increase(", "histogram_quantile("]
                .iter()
                .any(|f| expr.contains(f))
        })
        .collect();
    assert!(gauges.len() >= 5, "{gauges:?}");
    for instance in &instances {
        wait_for(
            &format!("the gauges' queries to answer for {instance}"),
            Duration::from_secs(30),
            || {
                gauges
                    .iter()
                    .all(|expr| prometheus.results(&for_instances(expr, instance)) > 0)
                    .then_some(())
            },
        )
        .unwrap_or_else(|e| {
            let empty: Vec<&&&String> = gauges
                .iter()
                .filter(|expr| prometheus.results(&for_instances(expr, instance)) == 0)
                .collect();
            panic!("{e}: no data for {empty:#?}")
        });
        for expr in &queries {
            for series in prometheus.series(&for_instances(expr, instance)) {
                assert_eq!(
                    series["metric"]["instance"],
                    json!(instance),
                    "{expr} for {instance}: {series}"
                );
            }
        }
    }
    for expr in alert_queries() {
        let answer = prometheus.query(&expr).expect("Prometheus answers");
        assert_eq!(answer["status"], "success", "alert expression {expr}: {answer}");
    }

    let exposition = daemons[0].metrics_text().unwrap();
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
    let prometheus = Prometheus::start(harness.dir(), &[harness.port()]);
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
