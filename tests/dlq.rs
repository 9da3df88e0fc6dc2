//! `aerostream dlq list|show|replay` against a running daemon and the real broker: bad messages
//! dead-lettered by the daemon are listed (filtered by reason, type and time, the same on every
//! read), shown with their properties and decoded body, and a rejected event replayed once its
//! cause is gone is applied, once, however often it is replayed.

mod support;

use aerostream::dlq;
use aerostream::generator::Planned;
use aerostream::telemetry::{EVENTS_APPLIED, EVENTS_DEAD_LETTERED, EVENTS_DEDUPLICATED, EVENTS_REJECTED};
use aerostream::views::CampaignView;
use aerostream_actors::{CampaignEvent, CampaignStatus};
use serde_json::Value;
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::daemon::{binary, wait_for, Daemon};
use support::events;
use support::topic::send_raw;
use support::Harness;

const IMPRESSION_SCHEMA: &str = "com.aeropartners.tracking.ImpresionRegistrada/v1";

fn created(campaign_id: &str) -> Planned {
    events::created(campaign_id, &format!("created-{campaign_id}"))
}

fn activated(campaign_id: &str) -> Planned {
    events::activated(campaign_id, &format!("activated-{campaign_id}"))
}

fn click(campaign_id: &str, id: &str) -> Planned {
    events::campaign_event(
        id,
        "ClickRegistrado",
        CampaignEvent::ClickRecorded {
            campaign_id: campaign_id.into(),
            affiliate_id: "af-1".into(),
        },
    )
}

/// What one `aerostream` command printed, and whether it succeeded.
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

fn aerostream(config: &Path, args: &[&str]) -> Run {
    let (command, rest) = args.split_first().expect("a subcommand");
    let output = Command::new(binary())
        .args(["dlq", command, "--config"])
        .arg(config)
        .args(rest)
        .output()
        .expect("running aerostream dlq");
    Run {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs a `dlq` command that must succeed; its stdout.
fn dlq(config: &Path, args: &[&str]) -> String {
    let run = aerostream(config, args);
    assert!(
        run.success,
        "aerostream dlq {args:?} failed:\n{}\n{}",
        run.stdout, run.stderr
    );
    run.stdout
}

/// `dlq list --json` with `args`: the entries by `ce_id`.
fn listed(config: &Path, args: &[&str]) -> BTreeMap<String, Value> {
    let mut all = vec!["list", "--input", "campaigns", "--json"];
    all.extend_from_slice(args);
    dlq(config, &all)
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("a JSON line"))
        .map(|entry| {
            (
                entry["properties"]["ce_id"].as_str().unwrap_or("").to_owned(),
                entry,
            )
        })
        .collect()
}

fn ce_ids(entries: &BTreeMap<String, Value>) -> Vec<&str> {
    entries.keys().map(String::as_str).collect()
}

fn campaign(daemon: &Daemon, id: &str, check: impl Fn(&CampaignView) -> bool) -> CampaignView {
    wait_for(&format!("campaign {id}"), Duration::from_secs(30), || {
        let view: CampaignView = daemon.get(&format!("/api/campaigns/{id}")).ok()?;
        check(&view).then_some(view)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()))
}

/// The labels of the campaigns input's impressions.
const IMPRESSIONS: &[&str] = &["input=\"campaigns\"", "event_type=\"ImpresionRegistrada\""];

fn impressions_metric(daemon: &Daemon, name: &str) -> f64 {
    daemon.metric(name, IMPRESSIONS).unwrap()
}

/// How many messages on `topic` (read whole) were replayed from each dead letter.
fn replays_on(harness: &Harness, topic: &str) -> BTreeMap<String, usize> {
    let mut replays = BTreeMap::new();
    let client = harness
        .runtime()
        .block_on(aerostream::broker::Client::open(&harness.config().broker.url))
        .unwrap();
    harness
        .runtime()
        .block_on(dlq::read(&client, topic, |message| {
            if let Some(from) = message.property("replayed_from") {
                *replays.entry(from.to_owned()).or_default() += 1;
            }
            ControlFlow::Continue(())
        }))
        .unwrap();
    replays
}

/// The campaigns input's counters and held messages, for failure messages.
fn campaigns_counters(daemon: &Daemon) -> String {
    let metrics = daemon.metrics_text().unwrap_or_default();
    let counters = metrics
        .lines()
        .filter(|line| line.starts_with("aerostream_events_") && line.contains("input=\"campaigns\""))
        .filter(|line| !line.ends_with(" 0"))
        .collect::<Vec<_>>()
        .join("\n");
    let health: Value = daemon.get("/health").unwrap_or_default();
    format!("{counters}\nhealth: {health}")
}

#[test]
fn dead_letters_are_listed_filtered_and_shown_and_a_replayed_one_applies_once() {
    let harness = Harness::started();
    let daemon = harness.start();
    let (config, runtime, path) = (harness.config(), harness.runtime(), harness.config_path());
    let campaigns_topic = harness.topic(&config.inputs["campaigns"].topic);

    // Two events for campaigns that do not exist yet (rejected) and a payload that is no Avro
    // record of its schema (dead-lettered).
    events::publish(
        runtime,
        config,
        &[
            events::impression("c-late", "imp-early"),
            click("c-other", "click-early"),
        ],
    );
    let properties = [("ce_id", "garbage-1"), ("ce_dataschema", IMPRESSION_SCHEMA)];
    runtime
        .block_on(send_raw(
            harness.client(),
            &campaigns_topic,
            "c-late",
            &properties,
            vec![0xde, 0xad, 0xbe, 0xef],
        ))
        .unwrap();
    daemon
        .wait_metric(EVENTS_REJECTED, &["input=\"campaigns\""], 2.0)
        .unwrap();
    daemon
        .wait_metric(EVENTS_DEAD_LETTERED, &["input=\"campaigns\""], 1.0)
        .unwrap();

    // list: a table of all three, and the same three on every read.
    let table = dlq(path, &["list", "--input", "campaigns"]);
    for expected in [
        "ID",
        "PUBLISHED",
        "REASON",
        "TYPE",
        "KEY",
        "DETAIL",
        "unknown_campaign",
        "invalid_avro",
        "ClickRegistrado",
        "c-late",
        "3 of 3 dead letters in persistent://public/default/marketing.campanas.eventos.v1-DLQ match",
    ] {
        assert!(table.contains(expected), "{expected:?} not in:\n{table}");
    }
    let all = listed(path, &[]);
    assert_eq!(ce_ids(&all), ["click-early", "garbage-1", "imp-early"], "{all:?}");
    assert_eq!(listed(path, &[]), all, "a second read shows the same letters");
    let letter = &all["imp-early"];
    assert_eq!(letter["reason"], "unknown_campaign");
    assert_eq!(letter["event_type"], "ImpresionRegistrada");
    assert_eq!(letter["key"], "c-late");
    assert!(letter["detail"].as_str().unwrap().contains("c-late"), "{letter}");
    let imp_id = letter["id"].as_str().unwrap().to_owned();
    let garbage_id = all["garbage-1"]["id"].as_str().unwrap().to_owned();

    // Filters: by reason, by type, by time; repeated values take any of them.
    assert_eq!(
        ce_ids(&listed(path, &["--reason", "unknown_campaign"])),
        ["click-early", "imp-early"]
    );
    assert_eq!(
        ce_ids(&listed(path, &["--reason", "invalid_avro"])),
        ["garbage-1"]
    );
    assert_eq!(
        ce_ids(&listed(path, &["--type", "clickregistrado"])),
        ["click-early"]
    );
    assert_eq!(
        ce_ids(&listed(
            path,
            &["--reason", "unknown_campaign", "--type", "ImpresionRegistrada"]
        )),
        ["imp-early"]
    );
    assert_eq!(
        ce_ids(&listed(
            path,
            &["--type", "ClickRegistrado", "--type", "ImpresionRegistrada"]
        )),
        ["click-early", "imp-early"],
        "the garbage has no ce_type and did not decode: it has no type"
    );
    assert_eq!(ce_ids(&listed(path, &["--since", "1h"])).len(), 3);
    assert!(listed(path, &["--until", "2000-01-01T00:00:00Z"]).is_empty());
    let first_ms = all
        .values()
        .map(|e| e["publish_time_ms"].as_u64().unwrap())
        .min()
        .unwrap();
    let after_first =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(first_ms + 1))
            .to_string();
    assert_eq!(
        listed(path, &["--since", &after_first]).len() + listed(path, &["--until", &after_first]).len(),
        3,
        "--since and --until split the letters at one time"
    );
    let limited = dlq(path, &["list", "--input", "campaigns", "--limit", "1"]);
    assert!(
        limited.contains("3 of 3 dead letters") && limited.contains("the oldest 1 shown"),
        "{limited}"
    );

    // show: properties, the record decoded to JSON, and the codec's verdict.
    let shown = dlq(path, &["show", "--input", "campaigns", &imp_id]);
    for expected in [
        "unknown_campaign",
        "source_topic",
        "persistent://public/default/marketing.campanas.eventos.v1",
        "ce_dataschema",
        "decodes: the daemon's codec accepts it as it is",
        "record (com.aeropartners.tracking.ImpresionRegistrada/v1)",
        "\"imp-early\"",
    ] {
        assert!(shown.contains(expected), "{expected:?} not in:\n{shown}");
    }
    let json: Value =
        serde_json::from_str(&dlq(path, &["show", "--input", "campaigns", &imp_id, "--json"])).unwrap();
    assert_eq!(json["record"]["id"], "imp-early", "{json}");
    assert_eq!(json["record"]["type"], "ImpresionRegistrada", "{json}");
    assert_eq!(json["record"]["data"]["id_campana"], "c-late", "{json}");
    let garbage = dlq(path, &["show", "--input", "campaigns", &garbage_id]);
    assert!(
        garbage.contains("does not decode (invalid_avro)") && garbage.contains("deadbeef"),
        "{garbage}"
    );
    let missing = aerostream(path, &["show", "--input", "campaigns", "999:999:-1"]);
    assert!(
        !missing.success && missing.stderr.contains("no message 999:999:-1"),
        "{}",
        missing.stderr
    );
    let unknown = aerostream(path, &["list", "--input", "nada"]);
    assert!(
        !unknown.success
            && unknown.stderr.contains("no input \"nada\"")
            && unknown.stderr.contains("campaigns"),
        "{}",
        unknown.stderr
    );

    // The cause goes away: the campaign is created. A dry run publishes nothing; a message
    // published after it comes first on the input.
    events::publish(runtime, config, &[created("c-late"), activated("c-late")]);
    campaign(&daemon, "c-late", |view| view.status == CampaignStatus::Active);
    let mut input = harness.reader(&campaigns_topic);
    let dry = dlq(
        path,
        &[
            "replay",
            "--input",
            "campaigns",
            "--reason",
            "unknown_campaign",
            "--type",
            "ImpresionRegistrada",
            "--dry-run",
        ],
    );
    assert!(
        dry.contains(&imp_id) && dry.contains("(dry run)") && dry.contains("would replay 1 of 3"),
        "{dry}"
    );
    events::publish(runtime, config, &[click("c-late", "sentinel")]);
    runtime
        .block_on(input.collect_until(Duration::from_secs(30), |r| !r.is_empty()))
        .unwrap();
    assert_eq!(
        input.received[0].property("ce_id"),
        Some("sentinel"),
        "the dry run published nothing"
    );

    // replay: applied, with its key and properties less the dead-letter ones.
    let replayed = dlq(path, &["replay", "--input", "campaigns", "--id", &imp_id]);
    assert!(
        replayed.contains(
            "replayed 1 of 3 dead letters to persistent://public/default/marketing.campanas.eventos.v1"
        ),
        "{replayed}"
    );
    let view = campaign(&daemon, "c-late", |view| view.metrics.impressions == 1);
    assert_eq!((view.metrics.clicks, view.version), (1, 4), "{view:?}");
    runtime
        .block_on(input.collect_until(Duration::from_secs(30), |r| r.len() >= 2))
        .unwrap();
    let copy = &input.received[1];
    assert_eq!(copy.key.as_deref(), Some("c-late"));
    assert_eq!(copy.property("ce_id"), Some("imp-early"));
    assert_eq!(copy.property("ce_dataschema"), Some(IMPRESSION_SCHEMA));
    assert_eq!(copy.property("replayed_from"), Some(imp_id.as_str()));
    for dropped in [
        "reason",
        "detail",
        "source_topic",
        "source_message_id",
        "event_type",
    ] {
        assert_eq!(copy.property(dropped), None, "{dropped}: {copy:?}");
    }
    // Counted once durable, a moment after its state is served.
    daemon.wait_metric(EVENTS_APPLIED, IMPRESSIONS, 1.0).unwrap();

    // replay again: a duplicate, not applied twice. A click published after it is handled
    // after it (one campaign: one partition, in order).
    dlq(path, &["replay", "--input", "campaigns", "--id", &imp_id]);
    events::publish(runtime, config, &[click("c-late", "sentinel-2")]);
    let view = campaign(&daemon, "c-late", |view| view.metrics.clicks == 2);
    assert_eq!((view.metrics.impressions, view.version), (1, 5), "{view:?}");
    wait_for(
        "the replayed copy counted as a duplicate",
        Duration::from_secs(30),
        || (impressions_metric(&daemon, EVENTS_DEDUPLICATED) >= 1.0).then_some(()),
    )
    .map_err(|e| anyhow::anyhow!("{e}: {}", campaigns_counters(&daemon)))
    .unwrap();
    assert_eq!(impressions_metric(&daemon, EVENTS_APPLIED), 1.0);

    // An undecodable letter replayed is dead-lettered again, saying where it came from.
    dlq(
        path,
        &["replay", "--input", "campaigns", "--reason", "invalid_avro"],
    );
    daemon
        .wait_metric(EVENTS_DEAD_LETTERED, &["input=\"campaigns\""], 2.0)
        .unwrap();
    let again = dlq(
        path,
        &[
            "list",
            "--input",
            "campaigns",
            "--reason",
            "invalid_avro",
            "--json",
        ],
    );
    let from: Vec<Value> = again
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["properties"]["replayed_from"].clone())
        .collect();
    assert_eq!(from, [Value::Null, Value::from(garbage_id.as_str())], "{again}");

    // A replay needs a selection, and names what it cannot find, replaying nothing.
    let unselected = aerostream(path, &["replay", "--input", "campaigns"]);
    assert!(
        !unselected.success && unselected.stderr.contains("needs a selection"),
        "{}",
        unselected.stderr
    );
    let partly = aerostream(
        path,
        &[
            "replay",
            "--input",
            "campaigns",
            "--id",
            &imp_id,
            "--id",
            "999:1:-1",
        ],
    );
    assert!(
        !partly.success && partly.stderr.contains("999:1:-1") && partly.stderr.contains("nothing replayed"),
        "{}",
        partly.stderr
    );
    let too_many = aerostream(path, &["replay", "--input", "campaigns", "--all", "--max", "2"]);
    assert!(
        !too_many.success && too_many.stderr.contains("more than --max 2"),
        "{}",
        too_many.stderr
    );
    // What reached the input: the impression replayed twice, the garbage once, nothing else.
    let expected = BTreeMap::from([(imp_id.clone(), 2), (garbage_id.clone(), 1)]);
    assert_eq!(replays_on(&harness, &campaigns_topic), expected);
}

#[test]
fn a_partitioned_dead_letter_topic_is_read_whole_and_replayed_by_filter_once() {
    let harness = Harness::new().partitions(2).build();
    let daemon = harness.start();
    let (config, runtime, path) = (harness.config(), harness.runtime(), harness.config_path());
    let ids: Vec<String> = (1..=6).map(|i| format!("c-{i}")).collect();

    // An empty dead-letter topic: every partition read to its end, nothing found.
    let empty = dlq(path, &["list", "--input", "payments"]);
    assert_eq!(
        empty.trim(),
        "0 of 0 dead letters in persistent://public/default/idempotencia.pagos.procesado.v1-DLQ match"
    );

    let impressions: Vec<Planned> = ids
        .iter()
        .map(|id| events::impression(id, &format!("imp-{id}")))
        .collect();
    events::publish(runtime, config, &impressions);
    daemon
        .wait_metric(EVENTS_REJECTED, &["input=\"campaigns\""], 6.0)
        .unwrap();
    let all = listed(path, &[]);
    assert_eq!(all.len(), 6, "{all:?}");
    let partitions: std::collections::BTreeSet<&str> = all
        .values()
        .map(|entry| entry["topic"].as_str().unwrap())
        .collect();
    assert_eq!(
        partitions.len(),
        2,
        "the keys hash to both partitions: {partitions:?}"
    );
    assert_eq!(listed(path, &["--reason", "unknown_campaign"]), all);

    let fixes: Vec<Planned> = ids.iter().flat_map(|id| [created(id), activated(id)]).collect();
    events::publish(runtime, config, &fixes);
    for id in &ids {
        campaign(&daemon, id, |view| view.status == CampaignStatus::Active);
    }
    for round in 1..=2 {
        let out = dlq(
            path,
            &[
                "replay",
                "--input",
                "campaigns",
                "--reason",
                "unknown_campaign",
                "--since",
                "1h",
            ],
        );
        assert!(out.contains("replayed 6 of 6"), "round {round}: {out}");
    }
    // A click published after the replays is handled after them (per campaign, in order).
    let clicks: Vec<Planned> = ids.iter().map(|id| click(id, &format!("click-{id}"))).collect();
    events::publish(runtime, config, &clicks);
    for id in &ids {
        let view = campaign(&daemon, id, |view| view.metrics.clicks == 1);
        assert_eq!((view.metrics.impressions, view.version), (1, 4), "{view:?}");
    }
    assert_eq!(impressions_metric(&daemon, EVENTS_APPLIED), 6.0);
    // Every second-round copy was a duplicate (so is a broker redelivery of one).
    assert!(
        impressions_metric(&daemon, EVENTS_DEDUPLICATED) >= 6.0,
        "{}",
        campaigns_counters(&daemon)
    );
    let letters: BTreeMap<String, usize> = all
        .values()
        .map(|entry| (entry["id"].as_str().unwrap().to_owned(), 2))
        .collect();
    let input_topic = harness.topic(&config.inputs["campaigns"].topic);
    assert_eq!(replays_on(&harness, &input_topic), letters);
}
