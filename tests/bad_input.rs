//! Bad input (SPEC §9): each kind lands in the dead-letter topic with its reason, counters move,
//! and the daemon keeps consuming.

mod support;

use aerostream::codec::{Codec, SchemaRegistry};
use aerostream_actors::{Envelope, Event, Money, PaymentEvent};
use futures::StreamExt;
use pulsar::{Pulsar, SubType, TokioExecutor};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use support::daemon::{self, wait_for, Daemon};
use support::{free_port, unique_consumer_id, LocalBroker};

const PAYMENTS: &str = "persistent://public/default/idempotencia.pagos.procesado.v1";
const PAYMENTS_DLQ: &str = "persistent://public/default/idempotencia.pagos.procesado.v1-DLQ";
const REQUESTED: &str = "com.aeropartners.idempotencia.PagoSolicitado/v1";

fn envelope(id: &str, event_type: &str) -> Envelope {
    Envelope {
        id: id.into(),
        event_type: event_type.into(),
        source: "test".into(),
        time_ms: 1_767_225_600_000,
        subject: None,
        correlation_id: None,
        causation_id: None,
        schema_version: "v1".into(),
    }
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
    let reasons: BTreeMap<String, String> = runtime.block_on(async {
        let client: Pulsar<TokioExecutor> = Pulsar::builder(broker.url(), TokioExecutor)
            .build()
            .await
            .unwrap();
        let mut dlq = client
            .consumer()
            .with_topic(PAYMENTS_DLQ)
            .with_subscription("test-dlq")
            .with_subscription_type(SubType::Exclusive)
            .with_consumer_id(unique_consumer_id())
            .build::<Vec<u8>>()
            .await
            .unwrap();
        let mut producer = client.producer().with_topic(PAYMENTS).build().await.unwrap();
        for (name, payload, dataschema, _) in &cases {
            producer
                .create_message()
                .with_content(payload.clone())
                .with_key(*name)
                .with_property("ce_id", *name)
                .with_property("ce_dataschema", *dataschema)
                .send_non_blocking()
                .await
                .unwrap()
                .await
                .unwrap();
        }
        producer
            .create_message()
            .with_content(valid.payload.clone())
            .with_key(valid.key.clone())
            .with_property("ce_dataschema", valid.dataschema.clone())
            .send_non_blocking()
            .await
            .unwrap()
            .await
            .unwrap();

        let mut reasons = BTreeMap::new();
        while reasons.len() < cases.len() {
            let message = tokio::time::timeout(Duration::from_secs(60), dlq.next())
                .await
                .expect("dead letters arrive")
                .unwrap()
                .unwrap();
            let property = |key: &str| {
                message
                    .payload
                    .metadata
                    .properties
                    .iter()
                    .find(|kv| kv.key == key)
                    .map(|kv| kv.value.clone())
            };
            reasons.insert(
                property("ce_id").unwrap_or_default(),
                property("reason").unwrap_or_default(),
            );
            dlq.ack(&message).await.unwrap();
        }
        reasons
    });
    for (name, _, _, reason) in &cases {
        assert_eq!(
            reasons.get(*name).map(String::as_str),
            Some(*reason),
            "case {name}: {reasons:?}"
        );
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
    let reason = runtime.block_on(async {
        let client: Pulsar<TokioExecutor> = Pulsar::builder(broker.url(), TokioExecutor)
            .build()
            .await
            .unwrap();
        let mut dlq = client
            .consumer()
            .with_topic("persistent://public/default/marketing.campanas.eventos.v1-DLQ")
            .with_subscription("test-dlq")
            .with_subscription_type(SubType::Exclusive)
            .with_consumer_id(unique_consumer_id())
            .build::<Vec<u8>>()
            .await
            .unwrap();
        let mut producer = client
            .producer()
            .with_topic("persistent://public/default/marketing.campanas.eventos.v1")
            .build()
            .await
            .unwrap();
        producer
            .create_message()
            .with_content(click.payload.clone())
            .with_key(click.key.clone())
            .with_property("ce_dataschema", click.dataschema.clone())
            .send_non_blocking()
            .await
            .unwrap()
            .await
            .unwrap();
        let message = tokio::time::timeout(Duration::from_secs(60), dlq.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        message
            .payload
            .metadata
            .properties
            .iter()
            .find(|kv| kv.key == "reason")
            .map(|kv| kv.value.clone())
    });
    assert_eq!(reason.as_deref(), Some("unknown_campaign"));
    assert_eq!(
        daemon
            .metric(
                "aerostream_events_rejected_total",
                &["reason=\"unknown_campaign\""]
            )
            .unwrap(),
        1.0
    );
    assert_eq!(daemon.status("/api/campaigns/nope").unwrap(), 404);
}
