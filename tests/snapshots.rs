//! Snapshots (SPEC §6): a campaign's newest snapshot is corrupted on disk while the daemon is
//! stopped; after a restart the campaign's actor rejects it (counted), falls back to the previous
//! snapshot plus the journal, and the campaign's state is exact. Every snapshot is also published
//! to the state topic.

mod support;

use aerostream::codec::SchemaRegistry;
use aerostream::config::Config;
use aerostream::generator::{self, Options, Planned};
use aerostream::views::CampaignView;
use aerostream_actors::CampaignStatus;
use std::time::Duration;
use support::daemon::{self, wait_for, Daemon};
use support::events;
use support::state::wait_for_state;
use support::topic::TopicReader;
use support::{free_port, LocalBroker};

const SNAPSHOTS: &str = "[snapshot]\nevery_events = 10\nkeep = 2\n";

/// Changes the state inside the newest snapshot of `campaign_id`, keeping its checksum, as a
/// flipped bit on disk would. Returns the version of the corrupted snapshot.
fn corrupt_newest_snapshot(data_dir: &std::path::Path, campaign_id: &str) -> u64 {
    let db = sled::open(data_dir).unwrap();
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
    let broker = LocalBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let config_path = daemon::write_config(dir.path(), &broker.url(), port, SNAPSHOTS).unwrap();
    let config = Config::load(Some(&config_path)).unwrap();
    let plan = generator::plan(&Options {
        seed: 71,
        campaigns: 3,
        payments: 5,
        events: 400,
        duplicate_fraction: 0.0,
        reorder_window: 0,
        ..Options::for_daemon(&config)
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let publish = |events: &[Planned]| events::publish(&runtime, &config, events);

    let client = runtime
        .block_on(pulsar::Pulsar::builder(broker.url(), pulsar::TokioExecutor).build())
        .unwrap();
    let state_topic = config.broker.topic(&config.outputs.state_topic);
    let mut states = runtime
        .block_on(TopicReader::subscribe(&client, &state_topic))
        .unwrap();

    let mut first = Daemon::start(&config_path, port).unwrap();
    first.wait_healthy(Duration::from_secs(30)).unwrap();
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
    let corrupted = corrupt_newest_snapshot(&dir.path().join("data"), &before.id);
    assert!(corrupted >= 20, "snapshot at version {corrupted}");

    let second = Daemon::start(&config_path, port).unwrap();
    second.wait_healthy(Duration::from_secs(30)).unwrap();
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
