//! Snapshots (SPEC §6): a campaign's newest snapshot is corrupted on disk while the daemon is
//! stopped; after a restart the campaign's actor rejects it (counted), falls back to the previous
//! snapshot plus the journal, and the campaign's state is exact. Every snapshot is also published
//! to the state topic, and its `checksum_datos` is recomputed from the published message alone by
//! an independent implementation (`tests/checksum/verify.py`: Python and fastavro).

mod support;

use aerostream::codec::wire_type;
use aerostream::codec::SchemaRegistry;
use aerostream::generator::{self, Input, Options, Planned};
use aerostream::views::CampaignView;
use aerostream_actors::events::CommissionRule;
use aerostream_actors::{CampaignEvent, CampaignStatus, Event, Money};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::daemon::wait_for;
use support::events;
use support::state::wait_for_state;
use support::Harness;

const SNAPSHOTS: &str = "[snapshot]\nevery_events = 10\nkeep = 2\n";

/// Changes the state inside the newest snapshot of `campaign_id`, keeping its checksum, as a
/// flipped bit on disk would. Returns the version of the corrupted snapshot.
fn corrupt_newest_snapshot(data_dir: &std::path::Path, campaign_id: &str) -> u64 {
    let db = aerostream::store::sled_config(data_dir).open().unwrap();
    let snapshots = db.open_tree("snapshots").unwrap();
    let (key, value) = snapshots
        .scan_prefix(format!("campaign/{campaign_id}/"))
        .last()
        .expect("the campaign has snapshots")
        .unwrap();
    let mut snapshot: serde_json::Value = serde_json::from_slice(&value).unwrap();
    let impressions = &mut snapshot["state"]["metrics"]["impressions"];
    *impressions = (impressions.as_u64().unwrap() + 1_000).into();
    snapshots
        .insert(&key, serde_json::to_vec(&snapshot).unwrap())
        .unwrap();
    db.flush().unwrap();
    snapshot["watermark"].as_u64().unwrap()
}

fn field<'a>(value: &'a apache_avro::types::Value, name: &str) -> &'a apache_avro::types::Value {
    match value {
        apache_avro::types::Value::Record(fields) => {
            &fields.iter().find(|(n, _)| n == name).expect("field present").1
        }
        other => panic!("not a record: {other:?}"),
    }
}

#[test]
fn a_corrupt_snapshot_is_detected_and_recovery_falls_back_exactly() {
    let harness = Harness::new().extra(SNAPSHOTS).build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let plan = generator::plan(&Options {
        seed: 71,
        campaigns: 3,
        payments: 5,
        events: 400,
        duplicate_fraction: 0.0,
        reorder_window: 0,
        ..Options::for_daemon(config)
    });
    let publish = |events: &[Planned]| events::publish(runtime, config, events);
    let mut states = harness.reader(&harness.topic(&config.outputs.state_topic));

    let mut first = harness.start();
    publish(&plan.stream);
    wait_for_state(&first, &plan.expected, Duration::from_secs(60));
    let written = first.metric("aerostream_snapshots_written_total", &[]).unwrap();
    assert!(written >= 6.0, "{written} snapshots");

    // Every snapshot is also published to the state topic, as CampanaEstadoCompleto.
    runtime
        .block_on(states.collect_until(Duration::from_secs(30), |received| {
            received.len() as f64 >= written
        }))
        .unwrap();
    let registry = SchemaRegistry::shipped();
    for message in &states.received {
        assert_eq!(message.property("ce_type"), Some("CampanaEstadoCompleto"));
        let dataschema = message.property("ce_dataschema").unwrap();
        let schema = registry.writer(dataschema).unwrap();
        let value = apache_avro::from_avro_datum(schema, &mut message.payload.as_slice(), None).unwrap();
        let data = field(&value, "data");
        let checksum = field(data, "checksum_datos");
        assert!(matches!(checksum, apache_avro::types::Value::String(s) if s.len() == 64));
        assert!(matches!(field(data, "watermark"), apache_avro::types::Value::Long(w) if *w > 0));
    }
    assert!(first.terminate(Duration::from_secs(30)).unwrap().success());

    let before = plan
        .expected
        .campaigns
        .iter()
        .find(|c| c.status != CampaignStatus::Completed && c.version >= 30)
        .expect("a running campaign with at least two snapshots")
        .clone();
    let corrupted = corrupt_newest_snapshot(harness.data_dir(), &before.id);
    assert!(corrupted >= 20, "snapshot at version {corrupted}");

    let second = harness.start();
    publish(&[events::impression(&before.id, "late-impression")]);
    let mut expected = before.clone();
    expected.metrics.impressions += 1;
    expected.version += 1;
    wait_for(
        "the campaign rebuilt and updated",
        Duration::from_secs(30),
        || {
            let served: CampaignView = second.get(&format!("/api/campaigns/{}", before.id)).ok()?;
            (served == expected).then_some(())
        },
    )
    .unwrap();
    assert_eq!(
        second
            .metric("aerostream_snapshot_checksum_failures_total", &[])
            .unwrap(),
        1.0,
        "the corrupt snapshot is counted once"
    );
    assert_eq!(
        second.metric("aerostream_snapshot_restores_total", &[]).unwrap(),
        1.0
    );
}

/// A campaign event as a partner would publish it, with event id `id`.
fn campaign_event(id: &str, event: CampaignEvent) -> Planned {
    let event = Event::Campaign(event);
    let subject = event.aggregate().id;
    Planned {
        input: Input::Campaigns,
        envelope: events::envelope(id, wire_type(&event), 1_767_225_700_000, Some(&subject)),
        idempotency_key: None,
        event,
    }
}

/// Campaign `id` created (fixed commission of 700), activated, then `rest`; its events are
/// numbered `<id>-<n>`.
fn campaign_stream(
    id: &str,
    name: &str,
    budget: Money,
    cost_per_click_minor: i64,
    rest: Vec<CampaignEvent>,
) -> Vec<Planned> {
    let created = CampaignEvent::Created {
        campaign_id: id.into(),
        name: name.into(),
        budget,
        cost_per_click_minor,
        cost_per_conversion_minor: 2_500,
        commission: CommissionRule::Fixed { amount_minor: 700 },
    };
    let activated = CampaignEvent::Activated {
        campaign_id: id.into(),
    };
    [created, activated]
        .into_iter()
        .chain(rest)
        .enumerate()
        .map(|(n, event)| campaign_event(&format!("{id}-{n}"), event))
        .collect()
}

/// One line of `tests/checksum/verify.py`'s output.
#[derive(Debug, serde::Deserialize)]
struct Verified {
    id_campana: String,
    estado: String,
    version: u64,
    checksum_datos: String,
    recomputed: String,
    ok: bool,
}

/// Runs the independent checker on `payloads` (message bodies written with `schema`).
fn verify_with_fastavro(schema: &Path, payloads: &[std::path::PathBuf]) -> (bool, Vec<Verified>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/checksum/verify.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(schema)
        .args(payloads)
        .output()
        .expect("python3 runs (scripts/prereqs installs fastavro)");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<Verified> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert_eq!(
        lines.len(),
        payloads.len(),
        "verify.py checked every payload; stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), lines)
}

/// SPEC §6 / README: `checksum_datos` is the SHA-256 of the Avro binary of the published `data`
/// record without that field. Python with fastavro, given only the shipped `.avsc` and each message's
/// body, recomputes it for an active campaign, a paused one and one whose spent budget shows it
/// PAUSED while its lifecycle is ACTIVE; a message whose state was changed after the fact fails.
#[test]
fn published_snapshot_checksums_are_recomputed_from_the_message_alone() {
    let harness = Harness::new()
        .extra("[snapshot]\nevery_events = 3\nkeep = 2\n")
        .build();
    let (config, runtime, dir) = (harness.config(), harness.runtime(), harness.dir());
    let mut states = harness.reader(&harness.topic(&config.outputs.state_topic));

    let money = |amount_minor, currency| Money::positive(amount_minor, currency).unwrap();
    let impression = |id: &str| CampaignEvent::ImpressionRecorded {
        campaign_id: id.into(),
        affiliate_id: "af-0001".into(),
    };
    let click = |id: &str| CampaignEvent::ClickRecorded {
        campaign_id: id.into(),
        affiliate_id: "af-0002".into(),
    };
    // Snapshots at versions 3 and 6, both ACTIVE; a multi-byte name and long amounts.
    let active = campaign_stream(
        "cs-activa",
        "Campaña de verano ☀ — Bogotá",
        money(9_000_000_000_000, "COP"),
        1_500,
        vec![
            impression("cs-activa"),
            CampaignEvent::ConversionRecorded {
                campaign_id: "cs-activa".into(),
                affiliate_id: "af-0003".into(),
                value: money(123_456_789, "COP"),
            },
            click("cs-activa"),
            impression("cs-activa"),
        ],
    );
    // Snapshots at 3 (ACTIVE) and 4 (paused by an event).
    let paused = campaign_stream(
        "cs-pausada",
        "Pausada",
        money(50_000, "EUR"),
        100,
        vec![
            click("cs-pausada"),
            CampaignEvent::Paused {
                campaign_id: "cs-pausada".into(),
                reason: "revisión".into(),
            },
        ],
    );
    // Snapshots at 3 (half spent) and 4: budget spent, every alert emitted, lifecycle still ACTIVE
    // and published PAUSED.
    let exhausted = campaign_stream(
        "cs-agotada",
        "Agotada",
        money(1_000, "USD"),
        500,
        vec![click("cs-agotada"), click("cs-agotada")],
    );
    let stream: Vec<Planned> = [active, paused, exhausted].concat();

    let mut daemon = harness.start();
    events::publish(runtime, config, &stream);
    for (id, version, status) in [
        ("cs-activa", 6, CampaignStatus::Active),
        ("cs-pausada", 4, CampaignStatus::Paused),
        ("cs-agotada", 4, CampaignStatus::Paused),
    ] {
        wait_for(
            &format!("{id} at version {version}"),
            Duration::from_secs(60),
            || {
                let served: CampaignView = daemon.get(&format!("/api/campaigns/{id}")).ok()?;
                (served.version == version && served.status == status).then_some(())
            },
        )
        .unwrap();
    }
    daemon
        .wait_metric("aerostream_snapshots_written_total", &[], 6.0)
        .unwrap();
    // Six snapshots, each at least once: the outbox may publish one again (same content).
    runtime
        .block_on(states.collect_until(Duration::from_secs(30), |received| {
            let distinct: std::collections::BTreeSet<&[u8]> =
                received.iter().map(|m| m.payload.as_slice()).collect();
            distinct.len() >= 6
        }))
        .unwrap();
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());

    // What an outside reader has: each message's body and the schema its ce_dataschema names.
    let registry = SchemaRegistry::shipped();
    let dataschema = states.received[0].property("ce_dataschema").unwrap().to_owned();
    let (subject, version) = dataschema.rsplit_once('/').unwrap();
    let file = &registry.subject(subject).unwrap().version(version).unwrap().file;
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas").join(file);
    let payloads: Vec<_> = states
        .received
        .iter()
        .enumerate()
        .map(|(n, message)| {
            assert_eq!(message.property("ce_dataschema"), Some(dataschema.as_str()));
            let path = dir.join(format!("state-{n}.avro"));
            std::fs::write(&path, &message.payload).unwrap();
            path
        })
        .collect();
    let (success, verified) = verify_with_fastavro(&schema, &payloads);
    let mismatched: Vec<&Verified> = verified
        .iter()
        .filter(|v| !v.ok || v.checksum_datos != v.recomputed)
        .collect();
    assert!(
        success && mismatched.is_empty(),
        "checksums that do not match: {mismatched:#?}"
    );
    let seen: std::collections::BTreeSet<(&str, u64, &str)> = verified
        .iter()
        .map(|v| (v.id_campana.as_str(), v.version, v.estado.as_str()))
        .collect();
    for expected in [
        ("cs-activa", 3, "ACTIVE"),
        ("cs-activa", 6, "ACTIVE"),
        ("cs-pausada", 4, "PAUSED"),
        ("cs-agotada", 3, "ACTIVE"),
        ("cs-agotada", 4, "PAUSED"),
    ] {
        assert!(seen.contains(&expected), "{expected:?} not among {seen:?}");
    }

    // The same message with its spend changed and its checksum kept fails the check.
    let n = verified
        .iter()
        .position(|v| (v.id_campana.as_str(), v.version) == ("cs-agotada", 4))
        .unwrap();
    let writer = registry.writer(&dataschema).unwrap();
    let mut value =
        apache_avro::from_avro_datum(writer, &mut states.received[n].payload.as_slice(), None).unwrap();
    let apache_avro::types::Value::Record(fields) = &mut value else {
        panic!("not a record")
    };
    let data = &mut fields.iter_mut().find(|(name, _)| name == "data").unwrap().1;
    let apache_avro::types::Value::Record(data) = data else {
        panic!("data is not a record")
    };
    data.iter_mut()
        .find(|(name, _)| name == "gasto_centavos")
        .unwrap()
        .1 = apache_avro::types::Value::Long(999);
    let tampered = dir.join("tampered.avro");
    std::fs::write(&tampered, apache_avro::to_avro_datum(writer, value).unwrap()).unwrap();
    let (success, verified) = verify_with_fastavro(&schema, &[tampered]);
    assert!(
        !success && !verified[0].ok,
        "a changed spend is caught: {verified:?}"
    );
}
