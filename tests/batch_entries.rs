//! Messages a producer batched into one broker entry, against the real broker. An ack of one
//! message of a batch entry acks the whole entry (`tests/broker.rs` shows it with the raw client),
//! so the daemon acks an entry only once it has finished every message of it: a message of the
//! entry that is not done when the daemon stops comes back at the next start, even though the
//! messages before it in the entry were applied (and acked, as far as the daemon is concerned)
//! long before.

mod support;

use aerostream::broker;
use aerostream::codec::Codec;
use aerostream::generator::Planned;
use aerostream::views::CampaignView;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;
use support::daemon::{wait_for, Daemon};
use support::events;
use support::Harness;

const TOKEN: &str = "batch-entries-test-token";
const CAMPAIGNS: &str = "persistent://public/default/marketing.campanas.eventos.v1";

fn failpoint(daemon: &Daemon, name: &str, actions: &str) {
    let body = json!({ "name": name, "actions": actions });
    let status = daemon.post("/admin/chaos/failpoint", Some(TOKEN), &body).unwrap();
    assert_eq!(status, 200, "setting fail point {name} to {actions}");
}

/// Publishes `events` (campaign events) with a batching producer and checks that the broker put
/// them in one entry.
fn publish_in_one_entry(harness: &Harness, events: &[Planned]) {
    let (codec, client) = (Codec::shipped(), harness.client());
    let entries: BTreeSet<(u64, u64)> = harness.runtime().block_on(async {
        // The entry goes out once it holds every event, never for time: with the outbox's 1 ms
        // wait it was split on a loaded machine.
        let mut producer = client
            .producer()
            .with_topic(CAMPAIGNS)
            .with_options(pulsar::ProducerOptions {
                block_queue_if_full: true,
                batch_size: Some(events.len() as u32),
                batch_timeout: Some(Duration::from_secs(600)),
                ..Default::default()
            })
            .build()
            .await
            .expect("producer registers");
        let mut receipts = Vec::new();
        for planned in events {
            let encoded = codec
                .encode_input(
                    &planned.envelope,
                    planned.idempotency_key.as_deref(),
                    &planned.event,
                )
                .expect("event encodes");
            receipts.push(
                broker::send_event(&mut producer, planned.envelope.id.clone(), encoded)
                    .await
                    .expect("message queued"),
            );
        }
        let mut entries = BTreeSet::new();
        for receipt in receipts {
            let id = receipt.await.expect("persisted").message_id.expect("message id");
            entries.insert((id.ledger_id, id.entry_id));
        }
        entries
    });
    assert_eq!(entries.len(), 1, "the producer put the events in one entry");
}

#[test]
fn a_message_of_a_batch_entry_left_undone_at_a_stop_is_applied_after_the_restart() {
    // Campaigns on the shipped Failover subscription, a failing commit retried for long.
    let harness = Harness::new()
        .admin_token(TOKEN)
        .chaos(true)
        .extra(
            "[inputs.campaigns]\nmax_redeliveries = 100000\nretry_delay_ms = 50\nretry_max_delay_ms = 200\n",
        )
        .build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let mut daemon = harness.start();
    events::publish(runtime, config, &[events::created("camp-a", "ev-a")]);
    wait_for("camp-a applied", Duration::from_secs(60), || {
        daemon.get::<CampaignView>("/api/campaigns/camp-a").ok()
    })
    .unwrap();

    // One entry: a copy of ev-a (a duplicate: finished without a commit) then camp-b's creation,
    // whose commit fails until the daemon stops.
    failpoint(&daemon, "store::commit", "return(corrupt)");
    publish_in_one_entry(
        &harness,
        &[
            events::created("camp-a", "ev-a"),
            events::created("camp-b", "ev-b"),
        ],
    );
    daemon
        .wait_metric("aerostream_events_deduplicated_total", &[], 1.0)
        .unwrap();
    daemon
        .wait_metric("aerostream_events_retried_total", &[], 2.0)
        .unwrap();
    assert_eq!(daemon.status("/api/campaigns/camp-b").unwrap(), 404);
    let stopped = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert!(stopped.success(), "SIGTERM ends the daemon cleanly: {stopped:?}");

    // The whole entry comes back: ev-a is dropped as a redelivery, camp-b is applied.
    let daemon = harness.start();
    let b: CampaignView = wait_for(
        "camp-b applied after the restart",
        Duration::from_secs(60),
        || daemon.get("/api/campaigns/camp-b").ok(),
    )
    .unwrap();
    assert_eq!(b.version, 1);
    daemon
        .wait_metric("aerostream_events_applied_total", &[], 1.0)
        .unwrap();
    let a: CampaignView = daemon.get("/api/campaigns/camp-a").unwrap();
    assert_eq!(a.version, 1, "ev-a applied once");
    assert_eq!(
        daemon
            .metric("aerostream_events_dead_lettered_total", &[])
            .unwrap(),
        0.0
    );
}
