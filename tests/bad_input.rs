//! Bad input (SPEC §9): each kind lands in the dead-letter topic once, with its reason; counters
//! move by the number of bad messages; the state is unchanged and the daemon keeps consuming, even
//! when the broker delivers a bad message again. The event collector refuses what is not JSON.

mod support;

use aerostream::codec::{self, Codec, SchemaRegistry};
use aerostream::views::CampaignView;
use aerostream_actors::events::CommissionRule;
use aerostream_actors::{CampaignEvent, CampaignStatus, Envelope, Event, Money, PaymentEvent};
use pulsar::{Pulsar, SubType, TokioExecutor};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use support::daemon::{wait_for, Daemon};
use support::events;
use support::topic::{send_raw, send_raw_with_key, Received, TopicReader};
use support::Harness;

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
    let harness = Harness::started();
    let daemon = harness.start();

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

    let (runtime, client) = (harness.runtime(), harness.client());
    let mut dlq = harness.reader(PAYMENTS_DLQ);
    for (name, payload, dataschema, _) in &cases {
        let properties = [("ce_id", *name), ("ce_dataschema", *dataschema)];
        runtime
            .block_on(send_raw(client, PAYMENTS, name, &properties, payload.clone()))
            .unwrap();
    }
    let properties = [("ce_dataschema", valid.dataschema.as_str())];
    runtime
        .block_on(send_raw(
            client,
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
    let harness = Harness::started();
    let daemon = harness.start();
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
    let (runtime, client) = (harness.runtime(), harness.client());
    let mut dlq = harness.reader(CAMPAIGNS_DLQ);
    let properties = [("ce_dataschema", click.dataschema.as_str())];
    runtime
        .block_on(send_raw(
            client,
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

// ---- Messages that contradict themselves, or carry no schema or key (SPEC §3) ------------------

/// A message as published: its `ce_id`, key and `ce_*` properties, and payload.
struct Raw {
    id: String,
    key: Option<String>,
    ce_type: Option<String>,
    dataschema: Option<String>,
    payload: Vec<u8>,
}

impl Raw {
    /// A valid PagoSolicitado for `payment_id`, keyed by it, with every SPEC §3 property.
    fn payment(payment_id: &str) -> Raw {
        let encoded = Codec::shipped()
            .encode_input(
                &envelope(payment_id, "PagoSolicitado"),
                None,
                &requested(payment_id, 2_500),
            )
            .unwrap();
        Raw {
            id: payment_id.into(),
            key: Some(encoded.key),
            ce_type: Some(encoded.event_type.into()),
            dataschema: Some(encoded.dataschema),
            payload: encoded.payload,
        }
    }

    /// The payment with the top-level string field `field` of its record set to `to`.
    fn with_field(mut self, field: &str, to: &str) -> Raw {
        use apache_avro::types::Value;
        let registry = SchemaRegistry::shipped();
        let schema = registry.writer(REQUESTED).unwrap();
        let mut value = apache_avro::from_avro_datum(schema, &mut self.payload.as_slice(), None).unwrap();
        let Value::Record(fields) = &mut value else {
            unreachable!("a record")
        };
        fields.iter_mut().find(|(name, _)| name == field).unwrap().1 = Value::String(to.into());
        self.payload = apache_avro::to_avro_datum(schema, value).unwrap();
        self
    }
}

/// A harness, a daemon on it, and a reader of the payments dead-letter topic that subscribed
/// before anything was published. Fields drop in order: the daemon before the harness's broker.
struct Bench {
    dlq: TopicReader,
    dlq_topic: String,
    daemon: Daemon,
    harness: Harness,
}

impl Bench {
    fn start() -> Bench {
        Bench::start_reading(PAYMENTS_DLQ)
    }

    /// A bench whose reader reads the dead-letter topic `dlq`.
    fn start_reading(dlq_topic: &str) -> Bench {
        let harness = Harness::started();
        let daemon = harness.start();
        Bench {
            dlq_topic: dlq_topic.to_owned(),
            dlq: harness.reader(dlq_topic),
            daemon,
            harness,
        }
    }

    fn send(&self, topic: &str, message: &Raw) {
        let mut properties = vec![("ce_id", message.id.as_str())];
        properties.extend(message.ce_type.as_deref().map(|t| ("ce_type", t)));
        properties.extend(message.dataschema.as_deref().map(|d| ("ce_dataschema", d)));
        self.harness
            .runtime()
            .block_on(send_raw_with_key(
                self.harness.client(),
                topic,
                message.key.as_deref(),
                &properties,
                message.payload.clone(),
            ))
            .unwrap();
    }

    /// Reads the dead-letter topic until `count` letters have arrived in all.
    fn dead_letters(&mut self, count: usize) -> &[Received] {
        self.harness
            .runtime()
            .block_on(
                self.dlq
                    .collect_until(Duration::from_secs(60), |received| received.len() >= count),
            )
            .unwrap();
        &self.dlq.received
    }

    /// Stops the daemon cleanly (it acks everything it holds), rewinds its subscription of `input`
    /// on `topic` to the start, and starts it again; returns once it has received `count` messages.
    fn restart_rewound(&mut self, input: &str, topic: &str, count: usize) {
        let status = self.daemon.terminate(Duration::from_secs(30)).unwrap();
        assert!(status.success(), "{status}");
        rewind_subscription(self, input, topic);
        self.daemon = self.harness.start();
        let labels = [format!("input=\"{input}\"")];
        wait_for("the messages delivered again", Duration::from_secs(60), || {
            let consumed = self
                .daemon
                .metric("aerostream_events_consumed_total", &[&labels[0]])
                .ok()?;
            (consumed >= count as f64).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.daemon.log_tail()));
    }

    /// Every letter of the dead-letter topic: the daemon stops (finishing what it holds), then a
    /// marker published to the topic closes it; the letters before the marker.
    fn every_dead_letter(&mut self) -> Vec<Received> {
        let status = self.daemon.terminate(Duration::from_secs(30)).unwrap();
        assert!(status.success(), "{status}");
        let marker = Raw {
            id: "marcador".into(),
            ..Raw::payment("marcador")
        };
        self.send(&self.dlq_topic.clone(), &marker);
        self.dead_letter_of("marcador");
        let mut letters = self.dlq.received.clone();
        letters.retain(|l| l.property("ce_id") != Some("marcador"));
        letters
    }

    /// Reads the dead-letter topic until a letter for `ce_id` has arrived.
    fn dead_letter_of(&mut self, ce_id: &str) {
        self.harness
            .runtime()
            .block_on(self.dlq.collect_until(Duration::from_secs(60), |received| {
                received.iter().any(|l| l.property("ce_id") == Some(ce_id))
            }))
            .unwrap();
    }

    fn payment_applied(&self, payment_id: &str) {
        wait_for(payment_id, Duration::from_secs(30), || {
            (self.daemon.status(&format!("/api/payments/{payment_id}")).ok()? == 200).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.daemon.log_tail()));
    }

    fn dead_lettered_total(&self, labels: &[&str]) -> f64 {
        self.daemon
            .metric("aerostream_events_dead_lettered_total", labels)
            .unwrap()
    }
}

/// Letters whose `ce_id` is `id`.
fn letters_of<'a>(letters: &'a [Received], id: &str) -> Vec<&'a Received> {
    letters
        .iter()
        .filter(|l| l.property("ce_id") == Some(id))
        .collect()
}

/// Publishes a good payment, the `bad` messages, then another good payment (one partition, in
/// that order) and checks: each bad message is dead-lettered once with `reason`, a detail and its
/// source message id; `aerostream_events_dead_lettered_total` moves by exactly their number; the
/// good payments around them are applied and the bad ones' are not.
fn refused_between_good_payments(bad: &[Raw], reason: &str) {
    let mut bench = Bench::start();
    let (before, after) = (Raw::payment("pago-antes"), Raw::payment("pago-despues"));
    // SPEC §3: a message without a ce_type property is fine.
    let after = Raw {
        ce_type: None,
        ..after
    };
    bench.send(PAYMENTS, &before);
    for message in bad {
        bench.send(PAYMENTS, message);
    }
    bench.send(PAYMENTS, &after);

    bench.payment_applied("pago-antes");
    bench.payment_applied("pago-despues");
    let letters = bench.dead_letters(bad.len()).to_vec();
    // Acks leave in receive order: the good payment after the bad ones is acked after their dead
    // letters are stored; the counters move before the ack.
    bench
        .daemon
        .wait_metric("aerostream_events_dead_lettered_total", &[], bad.len() as f64)
        .unwrap();
    let labels = [format!("reason=\"{reason}\"")];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    assert_eq!(bench.dead_lettered_total(&labels), bad.len() as f64);
    // The good payments only.
    bench
        .daemon
        .wait_metric(
            "aerostream_events_applied_total",
            &["event_type=\"PagoSolicitado\""],
            2.0,
        )
        .unwrap();
    assert_eq!(letters.len(), bad.len(), "{letters:?}");
    for message in bad {
        let of = letters_of(&letters, &message.id);
        assert_eq!(of.len(), 1, "{}: {letters:?}", message.id);
        let letter = of[0];
        assert_eq!(
            letter.property("reason"),
            Some(reason),
            "{}: {letter:?}",
            message.id
        );
        assert!(!letter.property("detail").unwrap_or_default().is_empty());
        assert!(letter.property("source_message_id").is_some(), "{letter:?}");
        assert_eq!(letter.payload, message.payload, "the original bytes");
        assert_eq!(
            bench
                .daemon
                .status(&format!("/api/payments/{}", message.id))
                .unwrap(),
            404,
            "{}: nothing applied",
            message.id
        );
    }
}

#[test]
fn a_ce_type_property_that_contradicts_the_record_is_dead_lettered() {
    let bad = Raw {
        ce_type: Some("PagoProcesado".into()),
        ..Raw::payment("pago-tipo")
    };
    refused_between_good_payments(&[bad], "type_mismatch");
}

#[test]
fn a_record_that_contradicts_its_ce_dataschema_is_dead_lettered() {
    // Decodes under the schema ce_dataschema names, but says it is another type, or was written
    // with another version of the schema.
    let other_type = Raw::payment("pago-otro-tipo").with_field("type", "PagoProcesado");
    let other_version = Raw::payment("pago-otra-version").with_field("schema_version", "v2");
    refused_between_good_payments(&[other_type, other_version], "dataschema_mismatch");
}

#[test]
fn a_message_without_ce_dataschema_is_dead_lettered_when_its_input_has_no_default() {
    let bad = Raw {
        dataschema: None,
        ..Raw::payment("pago-sin-esquema")
    };
    refused_between_good_payments(&[bad], "missing_dataschema");
}

#[test]
fn a_message_without_a_key_is_dead_lettered() {
    let bad = Raw {
        key: None,
        ..Raw::payment("pago-sin-clave")
    };
    refused_between_good_payments(&[bad], "missing_key");
}

#[test]
fn a_message_keyed_by_another_id_than_its_aggregate_s_is_dead_lettered() {
    // The affiliate id (a partner's likely mistake), and another payment's id.
    let by_affiliate = Raw {
        key: Some("af-1".into()),
        ..Raw::payment("pago-clave-afiliado")
    };
    let by_other_payment = Raw {
        key: Some("pago-antes".into()),
        ..Raw::payment("pago-clave-ajena")
    };
    refused_between_good_payments(&[by_affiliate, by_other_payment], "key_mismatch");
}

// ---- Redelivery ------------------------------------------------------------------------------

/// Rewinds the daemon's subscription of `input` to the start of `topic` (the daemon stopped): the
/// broker delivers every message again, acked or not.
fn rewind_subscription(bench: &Bench, input: &str, topic: &str) {
    let subscription = bench.harness.config().inputs[input].subscription.clone();
    bench.harness.runtime().block_on(async {
        // A client of its own, dropped at the end: the client's seek subscribes again afterwards
        // (under a new consumer id, hence none given here) and leaves the first consumer open
        // until its connection closes.
        let client = Pulsar::builder(bench.harness.broker.url(), TokioExecutor)
            .build()
            .await
            .unwrap();
        let mut consumer = client
            .consumer()
            .with_topic(topic)
            .with_subscription(subscription)
            .with_subscription_type(SubType::Failover)
            .build::<Vec<u8>>()
            .await
            .unwrap();
        consumer.seek(None, None, Some(0), client.clone()).await.unwrap();
        consumer.close().await.unwrap();
    });
}

#[test]
fn a_bad_message_delivered_again_is_dead_lettered_and_counted_once() {
    let mut bench = Bench::start();
    // 1 MiB that is no Avro, between two good payments.
    let big = Raw {
        id: "grande".into(),
        key: Some("grande".into()),
        ce_type: Some("PagoSolicitado".into()),
        dataschema: Some(REQUESTED.into()),
        payload: vec![0xff; 1 << 20],
    };
    bench.send(PAYMENTS, &Raw::payment("pago-antes"));
    bench.send(PAYMENTS, &big);
    bench.send(PAYMENTS, &Raw::payment("pago-despues"));
    bench.payment_applied("pago-despues");
    bench.dead_letter_of("grande");
    bench
        .daemon
        .wait_metric("aerostream_events_dead_lettered_total", &[], 1.0)
        .unwrap();

    // Stopped cleanly (everything acked), the subscription rewound, started again: the broker
    // delivers all three messages again.
    bench.restart_rewound("payments", PAYMENTS, 3);
    // A new bad message after them is dead-lettered as usual, and alone counted.
    let sentinel = Raw {
        key: None,
        ..Raw::payment("pago-centinela")
    };
    bench.send(PAYMENTS, &sentinel);
    bench.dead_letter_of("pago-centinela");
    bench
        .daemon
        .wait_metric(
            "aerostream_events_dead_lettered_total",
            &["reason=\"missing_key\""],
            1.0,
        )
        .unwrap();
    assert_eq!(
        bench.dead_lettered_total(&[]),
        1.0,
        "the copy is not counted again"
    );
    assert_eq!(
        bench
            .daemon
            .metric("aerostream_events_applied_total", &[])
            .unwrap(),
        0.0,
        "the good payments are not applied twice"
    );

    // No second letter for the big message, even one published late.
    let letters = bench.every_dead_letter();
    assert_eq!(letters_of(&letters, "grande").len(), 1, "{letters:?}");
    assert_eq!(letters_of(&letters, "pago-centinela").len(), 1);
    assert_eq!(letters.len(), 2, "the big message and the sentinel: {letters:?}");
}

#[test]
fn a_rejected_message_delivered_again_is_not_applied_once_its_aggregate_would_take_it() {
    let mut bench = Bench::start_reading(CAMPAIGNS_DLQ);
    let codec = Codec::shipped();
    let event = |id: &str, event: CampaignEvent| {
        let event = Event::Campaign(event);
        let encoded = codec
            .encode_input(&envelope(id, codec::wire_type(&event)), None, &event)
            .unwrap();
        Raw {
            id: id.into(),
            key: Some(encoded.key),
            ce_type: Some(encoded.event_type.into()),
            dataschema: Some(encoded.dataschema),
            payload: encoded.payload,
        }
    };
    let click = |id: &str| {
        event(
            id,
            CampaignEvent::ClickRecorded {
                campaign_id: "c-tarde".into(),
                affiliate_id: "af-1".into(),
            },
        )
    };
    // A click for a campaign not created yet: rejected. Then the campaign is created and
    // activated: the same click, delivered again, would now be applied.
    bench.send(CAMPAIGNS, &click("click-temprano"));
    bench.dead_letter_of("click-temprano");
    let created = CampaignEvent::Created {
        campaign_id: "c-tarde".into(),
        name: "Tarde".into(),
        budget: Money::positive(100_000, "USD").unwrap(),
        cost_per_click_minor: 10,
        cost_per_conversion_minor: 100,
        commission: CommissionRule::Percentage { basis_points: 1_000 },
    };
    bench.send(CAMPAIGNS, &event("creada", created));
    let activated = CampaignEvent::Activated {
        campaign_id: "c-tarde".into(),
    };
    bench.send(CAMPAIGNS, &event("activada", activated));
    let campaign = |bench: &Bench, status: CampaignStatus| {
        wait_for("the campaign's status", Duration::from_secs(30), || {
            let view: CampaignView = bench.daemon.get("/api/campaigns/c-tarde").ok()?;
            (view.status == status).then_some(view)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", bench.daemon.log_tail()))
    };
    campaign(&bench, CampaignStatus::Active);

    bench.restart_rewound("campaigns", CAMPAIGNS, 3);
    // A new click after the three, then a pause: once the campaign is paused, every earlier
    // event of it was handled (one aggregate, in order). The new click is the only one.
    bench.send(CAMPAIGNS, &click("click-nuevo"));
    let paused = CampaignEvent::Paused {
        campaign_id: "c-tarde".into(),
        reason: "fin".into(),
    };
    bench.send(CAMPAIGNS, &event("pausada", paused));
    let view = campaign(&bench, CampaignStatus::Paused);
    assert_eq!(view.metrics.clicks, 1, "{view:?}");
    assert_eq!(
        view.version, 4,
        "created, activated, the new click, paused: {view:?}"
    );
    assert_eq!(
        bench.dead_lettered_total(&[]),
        0.0,
        "the copy is not counted again"
    );

    let letters = bench.every_dead_letter();
    assert_eq!(letters_of(&letters, "click-temprano").len(), 1, "{letters:?}");
    assert_eq!(letters.len(), 1, "{letters:?}");
}

// ---- The event collector ----------------------------------------------------------------------

fn collected_payment(payment_id: &str) -> serde_json::Value {
    json!({
        "specversion": "1.0",
        "id": payment_id,
        "type": "PagoSolicitado",
        "source": "partner/acme",
        "time": "2026-11-24T10:00:00Z",
        "data": {
            "id_pago": payment_id,
            "id_afiliado": "af-1",
            "monto": { "monto_centavos": 1500, "moneda": "USD" }
        }
    })
}

#[test]
fn the_collector_answers_415_to_a_body_that_is_not_sent_as_json() {
    let bench = Bench::start();
    let http = reqwest::blocking::Client::new();
    let post = |content_type: Option<&str>, body: &serde_json::Value| {
        let mut request = http
            .post(format!("{}/event-collector/events", bench.daemon.base_url))
            .body(serde_json::to_vec(body).unwrap());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        (status, response.json::<serde_json::Value>().unwrap_or_default())
    };
    let refused = [
        Some("text/plain"),
        Some("text/plain; charset=utf-8"),
        Some("application/xml"),
        Some("application/x-www-form-urlencoded"),
        Some("application/json-seq"),
        Some("not a media type"),
        None,
    ];
    for (i, content_type) in refused.iter().enumerate() {
        let (status, answer) = post(*content_type, &collected_payment(&format!("pago-415-{i}")));
        assert_eq!(status, 415, "{content_type:?}: {answer}");
        assert_eq!(answer["error"], "unsupported_media_type", "{answer}");
        let detail = answer["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("application/cloudevents+json"), "{detail}");
    }
    let accepted = [
        ("application/json", collected_payment("pago-json")),
        (
            "application/json; charset=utf-8",
            collected_payment("pago-json-utf8"),
        ),
        ("Application/JSON", collected_payment("pago-json-mayusculas")),
        (
            "application/cloudevents+json",
            collected_payment("pago-cloudevents"),
        ),
        (
            "application/cloudevents-batch+json; charset=UTF-8",
            json!([collected_payment("pago-lote-1"), collected_payment("pago-lote-2")]),
        ),
    ];
    for (content_type, body) in &accepted {
        let (status, answer) = post(Some(content_type), body);
        assert_eq!(status, 202, "{content_type}: {answer}");
    }
    // The refused events went first to the same topic: had one been published, it would be
    // applied by now.
    for id in [
        "pago-json",
        "pago-json-utf8",
        "pago-json-mayusculas",
        "pago-cloudevents",
        "pago-lote-1",
        "pago-lote-2",
    ] {
        bench.payment_applied(id);
    }
    for i in 0..refused.len() {
        assert_eq!(
            bench
                .daemon
                .status(&format!("/api/payments/pago-415-{i}"))
                .unwrap(),
            404
        );
    }
    assert_eq!(
        bench
            .daemon
            .metric("aerostream_collector_events_total", &["outcome=\"invalid\""])
            .unwrap(),
        refused.len() as f64
    );
}
