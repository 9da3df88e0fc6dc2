//! Bad input (SPEC §9): each kind lands in the dead-letter topic with its reason, counters move,
//! and the daemon keeps consuming.

mod support;

use aerostream::codec::{Codec, SchemaRegistry};
use aerostream_actors::{Envelope, Event, Money, PaymentEvent};
use pulsar::{Pulsar, TokioExecutor};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use support::daemon::{self, wait_for, Daemon};
use support::events;
use support::topic::{send_raw, TopicReader};
use support::{free_port, LocalBroker};

const PAYMENTS: &str = "persistent://public/default/idempotencia.pagos.procesado.v1";
const PAYMENTS_DLQ: &str = "persistent://public/default/idempotencia.pagos.procesado.v1-DLQ";
const CAMPAIGNS: &str = "persistent://public/default/marketing.campanas.eventos.v1";
const CAMPAIGNS_DLQ: &str = "persistent://public/default/marketing.campanas.eventos.v1-DLQ";
const REQUESTED: &str = "com.aeropartners.idempotencia.PagoSolicitado/v1";

fn envelope(id: &str, event_type: &str) -> Envelope {
    events::envelope(id, event_type, 1_767_225_600_000, None)
}

fn requested(payment_id: &str, amount_minor: i64) -> Event {
    Event::Payment(PaymentEvent::Requested {
        payment_id: payment_id.into(),
        affiliate_id: "af-1".into(),
        amount: Money::positive(amount_minor, "USD").unwrap(),
    })
}

/// A PagoSolicitado whose amount is `amount_minor`, even a negative one: encodes a valid event and
/// patches the amount in the Avro value, since the domain cannot build negative money.
fn payment_with_amount(codec: &Codec, registry: &SchemaRegistry, id: &str, amount_minor: i64) -> Vec<u8> {
    let valid = codec
        .encode_input(&envelope(id, "PagoSolicitado"), None, &requested(id, 1))
        .unwrap();
    let schema = registry.writer(REQUESTED).unwrap();
    let mut value = apache_avro::from_avro_datum(schema, &mut valid.payload.as_slice(), None).unwrap();
    patch_long(&mut value, "monto_centavos", amount_minor);
    apache_avro::to_avro_datum(schema, value).unwrap()
}

fn patch_long(value: &mut apache_avro::types::Value, field: &str, to: i64) {
    use apache_avro::types::Value;
    match value {
        Value::Record(fields) => {
            for (name, v) in fields {
                if name == field {
                    *v = Value::Long(to);
                } else {
                    patch_long(v, field, to);
                }
            }
        }
        Value::Union(_, inner) => patch_long(inner, field, to),
        _ => {}
    }
}

#[test]
fn bad_payloads_are_dead_lettered_with_their_reason_and_consumption_goes_on() {
    let broker = LocalBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let config = daemon::write_config(dir.path(), &broker.url(), port, "").unwrap();
    let daemon = Daemon::start(&config, port).unwrap();
    daemon.wait_healthy(Duration::from_secs(30)).unwrap();

    let registry = Arc::new(SchemaRegistry::shipped());
    let codec = Codec::new(registry.clone());
    let click = codec
        .encode_input(
            &envelope("click-1", "ClickRegistrado"),
            None,
            &Event::Campaign(aerostream_actors::CampaignEvent::ClickRecorded {
                campaign_id: "c-1".into(),
                affiliate_id: "af-1".into(),
            }),
        )
        .unwrap();
    // (payload, dataschema, expected reason)
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "random",
            vec![0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0xff],
            REQUESTED,
            "invalid_avro",
        ),
        ("other-schema", click.payload.clone(), REQUESTED, "invalid_avro"),
        (
            "unknown-schema",
            click.payload.clone(),
            "com.aeropartners.nada.Nada/v9",
            "unknown_schema",
        ),
        (
            "negative",
            payment_with_amount(&codec, &registry, "neg-1", -500),
            REQUESTED,
            "invalid_money",
        ),
    ];
    let valid = codec
        .encode_input(
            &envelope("ok-1", "PagoSolicitado"),
            None,
            &requested("pago-ok", 1_000),
        )
        .unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime
        .block_on(Pulsar::builder(broker.url(), TokioExecutor).build())
        .unwrap();
    let mut dlq = runtime
        .block_on(TopicReader::subscribe(&client, PAYMENTS_DLQ))
        .unwrap();
    for (name, payload, dataschema, _) in &cases {
        let properties = [("ce_id", *name), ("ce_dataschema", *dataschema)];
        runtime
            .block_on(send_raw(&client, PAYMENTS, name, &properties, payload.clone()))
            .unwrap();
    }
    let properties = [("ce_dataschema", valid.dataschema.as_str())];
    runtime
        .block_on(send_raw(
            &client,
            PAYMENTS,
            &valid.key,
            &properties,
            valid.payload.clone(),
        ))
        .unwrap();
    runtime
        .block_on(dlq.collect_until(Duration::from_secs(60), |received| received.len() >= cases.len()))
        .unwrap();
    let reasons: BTreeMap<&str, &str> = dlq
        .received
        .iter()
        .map(|m| {
            (
                m.property("ce_id").unwrap_or_default(),
                m.property("reason").unwrap_or_default(),
            )
        })
        .collect();
    for (name, _, _, reason) in &cases {
        assert_eq!(reasons.get(*name), Some(reason), "case {name}: {reasons:?}");
    }

    // Later valid events are applied, and the counters moved.
    wait_for("the valid payment", Duration::from_secs(30), || {
        daemon.get::<serde_json::Value>("/api/payments/pago-ok").ok()
    })
    .unwrap();
    daemon
        .wait_metric("aerostream_events_dead_lettered_total", &[], cases.len() as f64)
        .unwrap();
    daemon
        .wait_metric(
            "aerostream_events_dead_lettered_total",
            &["reason=\"invalid_avro\""],
            2.0,
        )
        .unwrap();
    assert_eq!(
        daemon.status("/api/payments/neg-1").unwrap(),
        404,
        "nothing applied for a bad payload"
    );
}

#[test]
fn business_rule_violations_are_rejected_with_reason_and_state_unchanged() {
    let broker = LocalBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let config = daemon::write_config(dir.path(), &broker.url(), port, "").unwrap();
    let daemon = Daemon::start(&config, port).unwrap();
    daemon.wait_healthy(Duration::from_secs(30)).unwrap();
    let codec = Codec::new(Arc::new(SchemaRegistry::shipped()));
    // A click for a campaign that does not exist.
    let click = codec
        .encode_input(
            &envelope("click-unknown", "ClickRegistrado"),
            None,
            &Event::Campaign(aerostream_actors::CampaignEvent::ClickRecorded {
                campaign_id: "nope".into(),
                affiliate_id: "af-1".into(),
            }),
        )
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime
        .block_on(Pulsar::builder(broker.url(), TokioExecutor).build())
        .unwrap();
    let mut dlq = runtime
        .block_on(TopicReader::subscribe(&client, CAMPAIGNS_DLQ))
        .unwrap();
    let properties = [("ce_dataschema", click.dataschema.as_str())];
    runtime
        .block_on(send_raw(
            &client,
            CAMPAIGNS,
            &click.key,
            &properties,
            click.payload.clone(),
        ))
        .unwrap();
    runtime
        .block_on(dlq.collect_until(Duration::from_secs(60), |received| !received.is_empty()))
        .unwrap();
    let reason = dlq.received[0].property("reason");
    assert_eq!(reason, Some("unknown_campaign"));
    // Counted once its dead letter is stored: the broker's receipt may reach the daemon after
    // the dead letter reached this reader.
    daemon
        .wait_metric(
            "aerostream_events_rejected_total",
            &["reason=\"unknown_campaign\""],
            1.0,
        )
        .unwrap();
    assert_eq!(daemon.status("/api/campaigns/nope").unwrap(), 404);
}
