//! The daemon owns redelivery and dead-lettering (SPEC §9), against the real broker: a message
//! whose commit keeps failing is retried in place and, once `max_redeliveries` retries have
//! failed too, dead-lettered by the daemon with reason `max_redeliveries`, counted and only then
//! acked; one whose failures stop before that is applied once. A message held for 10 s (its commit
//! slowed by a fail point) is neither redelivered nor dead-lettered, and is applied once.
//!
//! Failures are injected through the chaos route's fail points (`POST /admin/chaos/failpoint`),
//! in the real binary.

mod support;

use aerostream::views::CampaignView;
use aerostream_actors::CampaignStatus;
use serde_json::json;
use std::time::Duration;
use support::daemon::{wait_for, Daemon};
use support::events;
use support::topic::{send_raw, TopicReader};
use support::Harness;

const TOKEN: &str = "retries-test-token";
const CAMPAIGNS: &str = "persistent://public/default/marketing.campanas.eventos.v1";
const CAMPAIGNS_DLQ: &str = "persistent://public/default/marketing.campanas.eventos.v1-DLQ";

/// Chaos on (for the fail points), and campaigns retried quickly: 4 retries, 50 ms then doubling.
/// Campaigns on a Key_Shared subscription (the shipped payments' type): pulsar-lite honours a
/// client's redelivery requests (an ack timeout, a nack) only on shared subscriptions, so this is
/// where a client-side redelivery would show.
fn harness() -> Harness {
    Harness::new()
        .admin_token(TOKEN)
        .chaos(true)
        .extra(
            "[inputs.campaigns]\nsubscription_type = \"key_shared\"\nmax_redeliveries = 4\n\
             retry_delay_ms = 50\nretry_max_delay_ms = 200\n",
        )
        .build()
}

fn failpoint(daemon: &Daemon, name: &str, actions: &str) {
    let body = json!({ "name": name, "actions": actions });
    let status = daemon.post("/admin/chaos/failpoint", Some(TOKEN), &body).unwrap();
    assert_eq!(status, 200, "setting fail point {name} to {actions}");
}

fn metric(daemon: &Daemon, name: &str, labels: &[&str]) -> f64 {
    daemon.metric(name, labels).unwrap()
}

#[test]
fn a_commit_that_keeps_failing_is_dead_lettered_by_the_daemon_and_one_that_recovers_is_applied() {
    let harness = harness();
    let (config, runtime) = (harness.config(), harness.runtime());
    let mut daemon = harness.start();
    let mut dlq = harness.reader(CAMPAIGNS_DLQ);

    // 5 failures: the first attempt and the 4 retries allowed. Dead-lettered by the daemon.
    failpoint(&daemon, "store::commit", "5*return(corrupt)");
    events::publish(runtime, config, &[events::created("camp-dead", "ev-dead")]);
    runtime
        .block_on(dlq.collect_until(Duration::from_secs(60), |received| !received.is_empty()))
        .unwrap();
    let letter = &dlq.received[0];
    assert_eq!(letter.property("ce_id"), Some("ev-dead"));
    assert_eq!(letter.property("reason"), Some("max_redeliveries"));
    let detail = letter.property("detail").unwrap_or_default();
    assert!(
        detail.contains("5 attempts failed") && detail.contains("store::commit"),
        "the detail names the attempts and the last error: {detail}"
    );
    assert_eq!(letter.property("event_type"), Some("CampanaCreada"));
    daemon
        .wait_metric(
            "aerostream_events_dead_lettered_total",
            &["reason=\"max_redeliveries\""],
            1.0,
        )
        .unwrap();
    assert_eq!(metric(&daemon, "aerostream_events_retried_total", &[]), 4.0);
    assert_eq!(daemon.status("/api/campaigns/camp-dead").unwrap(), 404);

    // 4 failures: the fifth attempt, the last retry allowed, commits. Applied once, no dead letter.
    failpoint(&daemon, "store::commit", "4*return(corrupt)");
    events::publish(runtime, config, &[events::created("camp-late", "ev-late")]);
    let late: CampaignView = wait_for("camp-late applied", Duration::from_secs(60), || {
        daemon.get("/api/campaigns/camp-late").ok()
    })
    .unwrap();
    assert_eq!((late.status, late.version), (CampaignStatus::Created, 1));
    daemon
        .wait_metric("aerostream_events_applied_total", &[], 1.0)
        .unwrap();
    assert_eq!(metric(&daemon, "aerostream_events_retried_total", &[]), 8.0);
    assert_eq!(metric(&daemon, "aerostream_events_dead_lettered_total", &[]), 1.0);

    // Both were acked: a new consumer gets neither back. A sentinel on the dead-lettered
    // message's key (so its partition) comes after anything left unacked there.
    daemon.terminate(Duration::from_secs(30)).unwrap();
    let daemon = harness.start();
    events::publish(runtime, config, &[events::created("camp-dead", "ev-sentinel")]);
    wait_for("the sentinel applied", Duration::from_secs(60), || {
        daemon.get::<CampaignView>("/api/campaigns/camp-dead").ok()
    })
    .unwrap();
    daemon
        .wait_metric("aerostream_events_applied_total", &[], 1.0)
        .unwrap();
    assert_eq!(
        metric(&daemon, "aerostream_events_consumed_total", &[]),
        1.0,
        "nothing came back after the restart"
    );
    assert_eq!(metric(&daemon, "aerostream_events_dead_lettered_total", &[]), 0.0);
    // The client dead-letters nothing itself: the daemon's letter is the only one.
    let ids = dead_letters_up_to_a_sentinel(&harness, &mut dlq);
    assert_eq!(ids, [Some("ev-dead".into()), Some("bad-sentinel".into())]);
}

/// The `ce_id` of every dead letter `dlq` read, up to that of an undecodable message sent now: its
/// dead letter marks a point after everything published before it.
fn dead_letters_up_to_a_sentinel(harness: &Harness, dlq: &mut TopicReader) -> Vec<Option<String>> {
    let properties = [
        ("ce_id", "bad-sentinel"),
        ("ce_dataschema", "com.aeropartners.marketing.CampanaCreada/v1"),
    ];
    let runtime = harness.runtime();
    runtime
        .block_on(send_raw(
            harness.client(),
            CAMPAIGNS,
            "bad-sentinel",
            &properties,
            vec![0xff, 0x01],
        ))
        .unwrap();
    runtime
        .block_on(dlq.collect_until(Duration::from_secs(60), |received| {
            received
                .iter()
                .any(|m| m.property("ce_id") == Some("bad-sentinel"))
        }))
        .unwrap();
    dlq.received
        .iter()
        .map(|m| m.property("ce_id").map(str::to_owned))
        .collect()
}

#[test]
fn a_message_held_for_10_seconds_is_neither_redelivered_nor_dead_lettered() {
    let harness = harness();
    let (config, runtime) = (harness.config(), harness.runtime());
    let daemon = harness.start();
    let mut dlq = harness.reader(CAMPAIGNS_DLQ);

    // The first commit takes 10 s (a stalled disk); the campaign's later events wait behind it.
    failpoint(&daemon, "store::commit", "1*sleep(10000)");
    let mut stream = vec![
        events::created("camp-held", "held-created"),
        events::activated("camp-held", "held-activated"),
    ];
    stream.extend((0..3).map(|i| events::impression("camp-held", &format!("held-imp-{i}"))));
    events::publish(runtime, config, &stream);
    let served: CampaignView = wait_for("camp-held applied", Duration::from_secs(60), || {
        let served: CampaignView = daemon.get("/api/campaigns/camp-held").ok()?;
        (served.metrics.impressions == 3).then_some(served)
    })
    .unwrap();
    assert_eq!((served.status, served.version), (CampaignStatus::Active, 5));
    daemon
        .wait_metric("aerostream_events_applied_total", &[], 5.0)
        .unwrap();
    // It was held: an event took longer than the histogram's last finite bucket (2.5 s).
    let count = metric(&daemon, "aerostream_processing_duration_seconds_count", &[]);
    let quick = metric(
        &daemon,
        "aerostream_processing_duration_seconds_bucket",
        &["le=\"2.5\""],
    );
    assert!(
        quick < count,
        "some event was held: {quick} of {count} under 2.5 s"
    );

    // Each message received once, applied once: no redelivered copy, no dead letter.
    let ids = dead_letters_up_to_a_sentinel(&harness, &mut dlq);
    assert_eq!(
        ids,
        [Some("bad-sentinel".into())],
        "only the sentinel was dead-lettered"
    );
    daemon
        .wait_metric("aerostream_events_dead_lettered_total", &[], 1.0)
        .unwrap();
    assert_eq!(metric(&daemon, "aerostream_events_consumed_total", &[]), 6.0);
    assert_eq!(metric(&daemon, "aerostream_events_deduplicated_total", &[]), 0.0);
    assert_eq!(metric(&daemon, "aerostream_events_retried_total", &[]), 0.0);
}
