//! The report service against the real broker (SPEC §7): version switches under load, the version
//! across a restart, the control topic, and `ReporteSolicitado` → `ReporteGenerado`.

mod support;

use aerostream::codec::Codec;
use aerostream::generator::{self, Options};
use aerostream::views::StateView;
use aerostream_actors::report::Report;
use aerostream_actors::{Event, OutputBody, ReportEvent, ReportVersion};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::daemon::{wait_for, Daemon};
use support::events;
use support::state::wait_for_state;
use support::topic::send_raw;
use support::Harness;

const TOKEN: &str = "report-admin";

/// One GET of the report: when it started and ended, its status, and its version if valid.
type Answer = (Instant, Instant, u16, Result<ReportVersion, String>);
const SWITCHES: usize = 100;

fn switch(daemon: &Daemon, version: &str) -> (u16, Value) {
    let body = serde_json::to_vec(&json!({ "version": version })).unwrap();
    let (status, answer, _) = daemon
        .send(Method::PUT, "/api/reports/version", Some(TOKEN), body)
        .unwrap();
    (status, answer)
}

fn active_version(daemon: &Daemon) -> String {
    let answer: Value = daemon.get("/api/reports/version").unwrap();
    answer["version"].as_str().unwrap().to_owned()
}

/// Checks one answer is a well-formed v1 or v2 report and returns it.
fn validated(body: &Value) -> Result<Report, String> {
    let report: Report = serde_json::from_value(body.clone()).map_err(|e| format!("{e}: {body}"))?;
    let has_detail = ["success_rate", "processing_time_ms", "breakdowns"]
        .iter()
        .all(|field| body.get(field).is_some());
    match (report.version, has_detail) {
        (ReportVersion::V1, false) | (ReportVersion::V2, true) => Ok(report),
        _ => Err(format!("fields do not match the version: {body}")),
    }
}

/// The v1 totals the expected state calls for: (status, currency) → (count, amount).
fn expected_totals(expected: &StateView) -> BTreeMap<(String, String), (i64, i64)> {
    let mut totals = BTreeMap::new();
    for payment in &expected.payments {
        let key = (
            payment.status.wire_name().to_owned(),
            payment.amount.currency.code().to_owned(),
        );
        let entry = totals.entry(key).or_insert((0, 0));
        entry.0 += 1;
        entry.1 += payment.amount.amount_minor;
    }
    totals
}

fn served_totals(report: &Report) -> BTreeMap<(String, String), (i64, i64)> {
    report
        .totals
        .payments
        .totals
        .iter()
        .map(|l| ((l.status.clone(), l.currency.clone()), (l.count, l.amount_minor)))
        .collect()
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn version_switches_under_load_fail_no_request_and_the_totals_end_exact() {
    let harness = Harness::new().admin_token(TOKEN).build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let mut daemon = harness.start();
    assert_eq!(active_version(&daemon), "v1");

    let plan = generator::plan(&Options {
        seed: 67,
        campaigns: 10,
        payments: 300,
        events: 6_000,
        duplicate_fraction: 0.05,
        reorder_window: 4,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    });
    let reading = AtomicBool::new(true);
    let answers: Mutex<Vec<Answer>> = Mutex::new(Vec::new());
    let mut puts: Vec<(Instant, Instant)> = Vec::new();

    std::thread::scope(|scope| {
        scope.spawn(|| events::publish(runtime, config, &plan.stream));
        scope.spawn(|| {
            while reading.load(Ordering::Relaxed) {
                let start = Instant::now();
                let answer = daemon.send(Method::GET, "/api/reports/payments", None, Vec::new());
                let end = Instant::now();
                let (status, body, _) = answer.unwrap();
                let version = validated(&body).map(|r| r.version);
                answers.lock().unwrap().push((start, end, status, version));
            }
        });
        for i in 0..SWITCHES {
            let version = if i % 2 == 0 { "v2" } else { "v1" };
            let start = Instant::now();
            let (status, answer) = switch(&daemon, version);
            puts.push((start, Instant::now()));
            assert_eq!(status, 200, "switch {i} to {version}: {answer}");
            assert_eq!(answer["version"], version, "{answer}");
            // The switch is visible in the next answer.
            let next: Value = daemon.get("/api/reports/payments").unwrap();
            assert_eq!(next["version"], version, "the answer after switch {i}");
        }
        wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
        reading.store(false, Ordering::Relaxed);
    });

    let answers = answers.into_inner().unwrap();
    let failed: Vec<_> = answers
        .iter()
        .filter(|(_, _, status, _)| *status != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} GETs failed",
        failed.len(),
        answers.len()
    );
    let invalid: Vec<_> = answers
        .iter()
        .filter_map(|(_, _, _, v)| v.as_ref().err())
        .collect();
    assert!(
        invalid.is_empty(),
        "invalid answers: {:?}",
        &invalid[..invalid.len().min(3)]
    );
    let in_v2 = answers.iter().filter(|a| a.3 == Ok(ReportVersion::V2)).count();
    assert!(in_v2 > 0 && in_v2 < answers.len(), "answers in both versions");
    assert_eq!(active_version(&daemon), "v1", "an even number of switches");
    assert_eq!(
        daemon.metric("aerostream_report_switches_total", &[]).unwrap(),
        SWITCHES as f64
    );
    assert_eq!(
        daemon
            .metric("aerostream_report_version", &["version=\"v1\""])
            .unwrap(),
        1.0
    );

    // The pause clients see: GETs in flight while a switch was, against all GETs.
    let mut all: Vec<Duration> = answers.iter().map(|(s, e, _, _)| *e - *s).collect();
    let mut during: Vec<Duration> = answers
        .iter()
        .filter(|(s, e, _, _)| puts.iter().any(|(ps, pe)| s < pe && ps < e))
        .map(|(s, e, _, _)| *e - *s)
        .collect();
    all.sort();
    during.sort();
    let mut switch_times: Vec<Duration> = puts.iter().map(|(s, e)| *e - *s).collect();
    switch_times.sort();
    println!(
        "report switch under load: {} GETs ({} during a switch), {SWITCHES} switches\n\
         | requests | p50 | p99 | max |\n|---|---|---|---|\n\
         | GET, all | {:.2?} | {:.2?} | {:.2?} |\n\
         | GET, during a switch | {:.2?} | {:.2?} | {:.2?} |\n\
         | PUT (switch, durable) | {:.2?} | {:.2?} | {:.2?} |",
        all.len(),
        during.len(),
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or_default(),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.last().copied().unwrap_or_default(),
        percentile(&switch_times, 0.5),
        percentile(&switch_times, 0.99),
        switch_times.last().copied().unwrap_or_default(),
    );

    // Final totals, exact, in v1; v2 holds the same v1 fields plus the breakdowns.
    let v1: Value = daemon.get("/api/reports/payments").unwrap();
    let report = validated(&v1).unwrap();
    assert_eq!(served_totals(&report), expected_totals(&plan.expected));
    assert_eq!(
        report.totals.campaigns.count,
        plan.expected.campaigns.len() as i64
    );
    assert_eq!(switch(&daemon, "v2").0, 200);
    let v2: Value = daemon.get("/api/reports/payments").unwrap();
    for (field, value) in v1.as_object().unwrap() {
        if field != "version" {
            assert_eq!(&v2[field], value, "v2 repeats v1's {field}");
        }
    }
    let detail = validated(&v2).unwrap().detail.unwrap();
    assert_eq!(detail.breakdowns.by_campaign.len(), plan.expected.campaigns.len());
    for (line, campaign) in detail.breakdowns.by_campaign.iter().zip(&plan.expected.campaigns) {
        assert_eq!(line.campaign_id, campaign.id);
        assert_eq!(line.spend_minor, campaign.spend_minor, "{}", campaign.id);
        assert_eq!(line.clicks, campaign.metrics.clicks as i64, "{}", campaign.id);
    }
    let affiliates: i64 = detail
        .breakdowns
        .by_affiliate
        .iter()
        .flat_map(|a| &a.payments)
        .map(|l| l.count)
        .sum();
    assert_eq!(affiliates, plan.expected.payments.len() as i64);

    // Unknown versions are refused with the allowed values; switching needs the token.
    let (status, answer) = switch(&daemon, "v3");
    assert_eq!(status, 400, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("v1, v2"), "{answer}");
    let body = serde_json::to_vec(&json!({ "version": "v1" })).unwrap();
    let (status, _, _) = daemon
        .send(Method::PUT, "/api/reports/version", None, body)
        .unwrap();
    assert_eq!(status, 401);

    // The active version (v2) survives a restart.
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());
    let daemon = harness.start();
    assert_eq!(active_version(&daemon), "v2");
    assert_eq!(
        validated(&daemon.get("/api/reports/payments").unwrap())
            .unwrap()
            .version,
        ReportVersion::V2
    );
}

#[test]
fn control_topic_switches_and_report_requests_are_answered_on_the_output_topic() {
    let harness = Harness::started();
    let (config, runtime) = (harness.config(), harness.runtime());
    let daemon = harness.start();
    let topic = |name: &str| harness.topic(name);
    let mut answers = harness.reader(&topic(&config.outputs.reports_topic));
    let codec = Codec::shipped();
    let send = |input: &str, id: &str, event_type: &str, schema_version: &str, event: Event| {
        let mut envelope = events::envelope(id, event_type, 1_767_225_600_000, None);
        envelope.schema_version = schema_version.into();
        let encoded = codec.encode_input(&envelope, None, &event).unwrap();
        let properties = [
            ("ce_id", id),
            ("ce_type", event_type),
            ("ce_dataschema", encoded.dataschema.as_str()),
        ];
        runtime
            .block_on(send_raw(
                harness.client(),
                &topic(&config.inputs[input].topic),
                &encoded.key,
                &properties,
                encoded.payload,
            ))
            .unwrap();
    };

    // A control message switches the version, with no restart.
    let to_v2 = Event::Report(ReportEvent::VersionChanged {
        version: ReportVersion::V2,
    });
    send("report_control", "ctl-1", "VersionReporteCambiada", "v1", to_v2);
    wait_for(
        "the switch from the control topic",
        Duration::from_secs(30),
        || (active_version(&daemon) == "v2").then_some(()),
    )
    .unwrap();

    // Requests written with v1 and v2 schemas; "latest" answers in the active version.
    let request = |request_id: &str, version: Option<ReportVersion>| {
        Event::Report(ReportEvent::Requested {
            request_id: request_id.into(),
            version,
            parameters: BTreeMap::from([("periodo".to_owned(), "2026-11".to_owned())]),
        })
    };
    send(
        "reports",
        "req-evt-1",
        "ReporteSolicitado",
        "v1",
        request("req-1", Some(ReportVersion::V1)),
    );
    send(
        "reports",
        "req-evt-2",
        "ReporteSolicitado",
        "v2",
        request("req-2", None),
    );
    // The same request again: deduplicated, answered once.
    send(
        "reports",
        "req-evt-1",
        "ReporteSolicitado",
        "v1",
        request("req-1", Some(ReportVersion::V1)),
    );
    daemon
        .wait_metric(
            "aerostream_events_deduplicated_total",
            &["input=\"reports\""],
            1.0,
        )
        .unwrap();
    runtime
        .block_on(answers.collect_until(Duration::from_secs(30), |received| received.len() >= 2))
        .unwrap();
    let mut generated: BTreeMap<String, (ReportVersion, Value)> = BTreeMap::new();
    for message in &answers.received {
        let output = codec
            .decode_output(message.property("ce_dataschema"), &message.payload)
            .unwrap();
        let OutputBody::ReportGenerated {
            request_id,
            version,
            report_json,
        } = output.body
        else {
            panic!("expected ReporteGenerado, got {:?}", output.body)
        };
        generated.insert(request_id, (version, serde_json::from_str(&report_json).unwrap()));
    }
    assert_eq!(generated["req-1"].0, ReportVersion::V1);
    assert_eq!(
        generated["req-2"].0,
        ReportVersion::V2,
        "latest = the active version"
    );
    assert!(validated(&generated["req-2"].1).is_ok());
    assert_eq!(generated.len(), 2);
    let service: Value = daemon.get("/api/reports/version").unwrap();
    assert_eq!(service["switches"], 1);
}
