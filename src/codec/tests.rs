//! Codec tests: the shipped schemas, round trips for every event type, each decode error's reason,
//! content hashes, schema evolution (v1 writer, v2 reader) and robustness on arbitrary bytes.

use super::decode::{content_hash, DecodeReason};
use super::*;
use aerostream_actors::campaign::Metrics;
use aerostream_actors::events::CommissionRule;
use aerostream_actors::output::AlertLevel;
use aerostream_actors::snapshot::{self, Snapshot};
use aerostream_actors::{Campaign, CampaignStatus, Currency, Envelope, Money, OutputEvent, PaymentStatus};
use apache_avro::types::Value;
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use std::path::Path;

fn codec() -> Codec {
    Codec::shipped()
}

fn envelope_for(event: &Event) -> Envelope {
    Envelope {
        id: "evt-1".into(),
        event_type: wire_type(event).into(),
        source: "tests".into(),
        time_ms: 1_700_000_000_000,
        subject: None,
        correlation_id: Some("corr-1".into()),
        causation_id: None,
        schema_version: "v1".into(),
    }
}

fn usd(amount_minor: i64) -> Money {
    Money {
        amount_minor,
        currency: Currency::Usd,
    }
}

fn processed(status: PaymentStatus) -> Event {
    Event::Payment(PaymentEvent::Processed {
        payment_id: "pago-1".into(),
        affiliate_id: "afiliado-1".into(),
        amount: usd(10_050),
        status,
        declared_hash: "abc".into(),
        attempts: 1,
    })
}

fn encode(event: &Event) -> Encoded {
    codec().encode_input(&envelope_for(event), None, event).unwrap()
}

fn decode_err(dataschema: Option<&str>, payload: &[u8]) -> DecodeError {
    codec().decode(dataschema, payload).unwrap_err()
}

/// Re-encodes `encoded` with the field at `path` replaced: payloads no encoder of ours produces.
fn rewrite(encoded: &Encoded, path: &[&str], new: Value) -> Vec<u8> {
    fn set(value: &mut Value, path: &[&str], new: Value) {
        let Value::Record(fields) = value else {
            panic!("{path:?} does not go through records")
        };
        let (_, field) = fields.iter_mut().find(|(n, _)| n == path[0]).unwrap();
        match path {
            [_] => *field = new,
            [_, rest @ ..] => set(field, rest, new),
            [] => unreachable!(),
        }
    }
    let codec = codec();
    let schema = codec.registry().writer(&encoded.dataschema).unwrap();
    let mut value = apache_avro::from_avro_datum(schema, &mut &encoded.payload[..], None).unwrap();
    set(&mut value, path, new);
    apache_avro::to_avro_datum(schema, value).unwrap()
}

// ---- strategies -------------------------------------------------------------------------------

fn id() -> impl Strategy<Value = String> {
    "[a-z0-9-]{1,16}"
}

fn money() -> impl Strategy<Value = Money> {
    (1..i64::MAX, prop::sample::select(Currency::ALL.to_vec())).prop_map(|(amount_minor, currency)| Money {
        amount_minor,
        currency,
    })
}

fn status() -> impl Strategy<Value = PaymentStatus> {
    prop::sample::select(vec![
        PaymentStatus::Pending,
        PaymentStatus::Processing,
        PaymentStatus::Succeeded,
        PaymentStatus::Failed,
    ])
}

fn commission() -> impl Strategy<Value = CommissionRule> {
    prop_oneof![
        (0..=10_000u32).prop_map(|basis_points| CommissionRule::Percentage { basis_points }),
        (0..i64::MAX).prop_map(|amount_minor| CommissionRule::Fixed { amount_minor }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let campaign = prop_oneof![
        (id(), ".*", money(), 0..i64::MAX, 0..i64::MAX, commission()).prop_map(
            |(campaign_id, name, budget, click, conversion, commission)| CampaignEvent::Created {
                campaign_id,
                name,
                budget,
                cost_per_click_minor: click,
                cost_per_conversion_minor: conversion,
                commission,
            }
        ),
        id().prop_map(|campaign_id| CampaignEvent::Activated { campaign_id }),
        (id(), ".*").prop_map(|(campaign_id, reason)| CampaignEvent::Paused { campaign_id, reason }),
        id().prop_map(|campaign_id| CampaignEvent::Completed { campaign_id }),
        (id(), money())
            .prop_map(|(campaign_id, budget)| CampaignEvent::BudgetUpdated { campaign_id, budget }),
        (id(), id()).prop_map(|(campaign_id, affiliate_id)| {
            CampaignEvent::ImpressionRecorded {
                campaign_id,
                affiliate_id,
            }
        }),
        (id(), id()).prop_map(|(campaign_id, affiliate_id)| CampaignEvent::ClickRecorded {
            campaign_id,
            affiliate_id
        }),
        (id(), id(), money()).prop_map(|(campaign_id, affiliate_id, value)| {
            CampaignEvent::ConversionRecorded {
                campaign_id,
                affiliate_id,
                value,
            }
        }),
    ];
    let payment = prop_oneof![
        (id(), id(), money()).prop_map(|(payment_id, affiliate_id, amount)| {
            PaymentEvent::Requested {
                payment_id,
                affiliate_id,
                amount,
            }
        }),
        (id(), id(), money(), status(), ".*", 0..=i32::MAX as u32).prop_map(
            |(payment_id, affiliate_id, amount, status, declared_hash, attempts)| {
                PaymentEvent::Processed {
                    payment_id,
                    affiliate_id,
                    amount,
                    status,
                    declared_hash,
                    attempts,
                }
            }
        ),
    ];
    prop_oneof![
        campaign.prop_map(Event::Campaign),
        payment.prop_map(Event::Payment)
    ]
}

fn envelope(event_type: &'static str) -> impl Strategy<Value = Envelope> {
    (
        id(),
        ".*",
        any::<i64>(),
        proptest::option::of(".*"),
        proptest::option::of(".*"),
        proptest::option::of(".*"),
        // The writer version: every subject has a v1.
        Just("v1".to_owned()),
    )
        .prop_map(
            move |(id, source, time_ms, subject, correlation_id, causation_id, schema_version)| Envelope {
                id,
                event_type: event_type.into(),
                source,
                time_ms,
                subject,
                correlation_id,
                causation_id,
                schema_version,
            },
        )
}

fn incoming() -> impl Strategy<Value = (Envelope, Option<String>, Event)> {
    event().prop_flat_map(|event| {
        (
            envelope(wire_type(&event)),
            proptest::option::of("[a-z0-9_]{1,32}"),
            Just(event),
        )
    })
}

fn output() -> impl Strategy<Value = OutputEvent> {
    let body = prop_oneof![
        (
            id(),
            prop::sample::select(AlertLevel::ALL.to_vec()),
            money(),
            0..i64::MAX
        )
            .prop_map(|(campaign_id, level, budget, spend_minor)| {
                OutputBody::BudgetAlert {
                    campaign_id,
                    level,
                    budget,
                    spend_minor,
                }
            }),
        (id(), id(), id(), money(), any::<bool>()).prop_map(
            |(affiliate_id, campaign_id, conversion_event_id, commission, zero)| {
                OutputBody::CommissionCalculated {
                    affiliate_id,
                    campaign_id,
                    conversion_event_id,
                    commission: Money {
                        amount_minor: if zero { 0 } else { commission.amount_minor },
                        ..commission
                    },
                }
            }
        ),
        (id(), id(), money()).prop_map(|(payment_id, affiliate_id, amount)| {
            OutputBody::PaymentSucceeded {
                payment_id,
                affiliate_id,
                amount,
            }
        }),
        (id(), id(), money()).prop_map(|(payment_id, affiliate_id, amount)| {
            OutputBody::PaymentFailed {
                payment_id,
                affiliate_id,
                amount,
            }
        }),
    ];
    (id(), id(), proptest::option::of(id()), any::<i64>(), body).prop_map(
        |(id, causation_id, correlation_id, time_ms, body)| OutputEvent {
            id,
            causation_id,
            correlation_id,
            time_ms,
            body,
        },
    )
}

// ---- schemas and the wire-type table ----------------------------------------------------------

#[test]
fn every_wire_type_has_a_shipped_subject_and_back() {
    let codec = codec();
    let registry = codec.registry();
    for wire in WireType::ALL {
        let subject = registry
            .subject(wire.subject())
            .unwrap_or_else(|| panic!("{} has no schema", wire.subject()));
        for version in &subject.versions {
            assert_eq!(version.file, format!("{}.{}.avsc", wire.name(), version.version));
        }
        assert_eq!(subject_of(wire.name()), Some(wire.subject()));
    }
    assert_eq!(registry.subjects().count(), WireType::ALL.len());
    assert_eq!(subject_of("NoSuchEvent"), None);
}

#[test]
fn shipped_compatibility_modes_follow_the_seed_rule() {
    // Seed 000: full-state events FULL; idempotency, report and every other event BACKWARD.
    for subject in codec().registry().subjects() {
        let expected = if subject.name.ends_with("EstadoCompleto") {
            Compatibility::Full
        } else {
            Compatibility::Backward
        };
        assert_eq!(subject.compatibility, expected, "{}", subject.name);
    }
}

#[test]
fn output_wire_types_agree_with_the_domain() {
    let bodies = [
        OutputBody::BudgetAlert {
            campaign_id: "c".into(),
            level: AlertLevel::Warning,
            budget: usd(1),
            spend_minor: 0,
        },
        OutputBody::CommissionCalculated {
            affiliate_id: "a".into(),
            campaign_id: "c".into(),
            conversion_event_id: "e".into(),
            commission: usd(1),
        },
        OutputBody::PaymentSucceeded {
            payment_id: "p".into(),
            affiliate_id: "a".into(),
            amount: usd(1),
        },
        OutputBody::PaymentFailed {
            payment_id: "p".into(),
            affiliate_id: "a".into(),
            amount: usd(1),
        },
    ];
    for body in &bodies {
        let wire = WireType::of_output(body);
        assert_eq!(wire.name(), body.wire_type());
        assert!(wire.is_output());
    }
}

// ---- round trips ------------------------------------------------------------------------------

proptest! {
    #[test]
    fn input_events_round_trip((envelope, key, event) in incoming()) {
        let codec = codec();
        let encoded = codec.encode_input(&envelope, key.as_deref(), &event).unwrap();
        prop_assert_eq!(encoded.event_type, wire_type(&event));
        prop_assert_eq!(&encoded.key, &event.aggregate().id);
        prop_assert_eq!(
            &encoded.dataschema,
            &format!("{}/v1", subject_of(encoded.event_type).unwrap())
        );
        let incoming = codec.decode(Some(&encoded.dataschema), &encoded.payload).unwrap();
        prop_assert_eq!(&incoming.idempotency_key, key.as_ref().unwrap_or(&envelope.id));
        prop_assert_eq!(&incoming.content_hash, &content_hash(&event));
        prop_assert_eq!(incoming.envelope, envelope);
        prop_assert_eq!(incoming.event, event);
    }

    #[test]
    fn output_events_round_trip(out in output()) {
        let codec = codec();
        let encoded = codec.encode_output(&out).unwrap();
        prop_assert_eq!(encoded.event_type, out.body.wire_type());
        prop_assert_eq!(encoded.key.as_str(), out.body.key());
        prop_assert_eq!(codec.decode_output(Some(&encoded.dataschema), &encoded.payload).unwrap(), out);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        wire in prop::sample::select(WireType::ALL.to_vec()),
        payload in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let dataschema = format!("{}/v1", wire.subject());
        let errors = [
            codec().decode(Some(&dataschema), &payload).err(),
            codec().decode_output(Some(&dataschema), &payload).err(),
        ];
        for error in errors.iter().flatten() {
            prop_assert!(DecodeReason::ALL.iter().any(|reason| reason.as_str() == error.reason()));
        }
    }

    #[test]
    fn decoding_corrupted_payloads_never_panics(
        (envelope, key, event) in incoming(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let codec = codec();
        let encoded = codec.encode_input(&envelope, key.as_deref(), &event).unwrap();
        let mut payload = encoded.payload.clone();
        for (at, byte) in flips {
            let at = at.index(payload.len());
            payload[at] = byte;
        }
        let _ = codec.decode(Some(&encoded.dataschema), &payload);
        let _ = codec.decode(Some(&encoded.dataschema), &encoded.payload[..cut.index(encoded.payload.len())]);
    }
}

#[test]
fn processed_payment_writes_its_idempotency_metadata() {
    let event = processed(PaymentStatus::Succeeded);
    let encoded = encode(&event);
    let codec = codec();
    let schema = codec.registry().writer(&encoded.dataschema).unwrap();
    let value = apache_avro::from_avro_datum(schema, &mut &encoded.payload[..], None).unwrap();
    let Value::Record(fields) = value else { panic!() };
    let Value::Record(data) = &fields.iter().find(|(n, _)| n == "data").unwrap().1 else {
        panic!()
    };
    let Value::Record(meta) = &data
        .iter()
        .find(|(n, _)| n == "metadatos_idempotencia")
        .unwrap()
        .1
    else {
        panic!()
    };
    assert_eq!(
        meta[2],
        ("ventana_idempotencia_segundos".into(), Value::Long(3600))
    );
    let spec = fields.iter().find(|(n, _)| n == "specversion").unwrap();
    assert_eq!(spec.1, Value::String("1.0".into()));
}

#[test]
fn outputs_carry_source_and_causation() {
    let cause = envelope_for(&processed(PaymentStatus::Succeeded));
    let out = OutputEvent::derived(
        &cause,
        "ok",
        OutputBody::PaymentSucceeded {
            payment_id: "pago-1".into(),
            affiliate_id: "afiliado-1".into(),
            amount: usd(5),
        },
    );
    let codec = codec();
    let encoded = codec.encode_output(&out).unwrap();
    assert_eq!(encoded.dataschema, "com.aeropartners.integracion.PagoExitoso/v1");
    assert_eq!(encoded.key, "pago-1");
    let schema = codec.registry().writer(&encoded.dataschema).unwrap();
    let Value::Record(fields) =
        apache_avro::from_avro_datum(schema, &mut &encoded.payload[..], None).unwrap()
    else {
        panic!()
    };
    let field = |name: &str| fields.iter().find(|(n, _)| n == name).unwrap().1.clone();
    assert_eq!(field("source"), Value::String("aerostream".into()));
    assert_eq!(field("id"), Value::String(out.id.clone()));
    assert_eq!(
        field("causationid"),
        Value::Union(1, Box::new(Value::String("evt-1".into())))
    );
    // An output is not an input event.
    let error = codec
        .decode(Some(&encoded.dataschema), &encoded.payload)
        .unwrap_err();
    assert_eq!(error.reason(), "unknown_event_type");
}

#[test]
fn encode_rejects_an_envelope_of_another_type() {
    let event = processed(PaymentStatus::Pending);
    let mut envelope = envelope_for(&event);
    envelope.event_type = "PagoSolicitado".into();
    let error = codec().encode_input(&envelope, None, &event).unwrap_err();
    assert!(matches!(error, EncodeError::TypeMismatch { .. }), "{error}");
}

// ---- decode errors and their reasons ----------------------------------------------------------

#[test]
fn no_dataschema_is_missing_dataschema() {
    let payload = encode(&processed(PaymentStatus::Pending)).payload;
    let error = decode_err(None, &payload);
    assert_eq!(error, DecodeError::MissingDataschema);
    assert_eq!(error.reason(), "missing_dataschema");
}

#[test]
fn unknown_schema() {
    let payload = encode(&processed(PaymentStatus::Pending)).payload;
    for dataschema in [
        Some("com.aeropartners.idempotencia.PagoProcesado"),
        Some("com.aeropartners.idempotencia.PagoProcesado/v9"),
        Some("com.example.Nope/v1"),
    ] {
        let error = decode_err(dataschema, &payload);
        assert_eq!(error.reason(), "unknown_schema", "{dataschema:?}: {error}");
    }
    assert_eq!(
        decode_err(Some("com.example.Nope/v1"), &payload).to_string(),
        "unknown schema: \"com.example.Nope/v1\" is not in the schema registry"
    );
}

#[test]
fn random_bytes_are_invalid_avro() {
    let dataschema = "com.aeropartners.idempotencia.PagoProcesado/v1";
    for payload in [&b""[..], &[0xff; 3], &[0x02, 0xc3, 0x28], b"not avro at all"] {
        let error = decode_err(Some(dataschema), payload);
        assert_eq!(error.reason(), "invalid_avro", "{payload:?}: {error}");
    }
}

#[test]
fn trailing_bytes_are_invalid_avro() {
    let mut encoded = encode(&processed(PaymentStatus::Pending));
    encoded.payload.push(0);
    let error = decode_err(Some(&encoded.dataschema), &encoded.payload);
    assert_eq!(error.reason(), "invalid_avro");
    assert!(error.to_string().contains("1 bytes left over"), "{error}");
}

#[test]
fn truncated_payload_is_invalid_avro() {
    // The body's last field is a string: apache-avro decodes a string cut short by the end of the
    // payload as null instead of failing; resolution to the reader schema must catch it.
    let paused = Event::Campaign(CampaignEvent::Paused {
        campaign_id: "c".into(),
        reason: "presupuesto agotado".into(),
    });
    let encoded = encode(&paused);
    let cut = &encoded.payload[..encoded.payload.len() - 3];
    let codec = codec();
    let schema = codec.registry().writer(&encoded.dataschema).unwrap();
    let raw = apache_avro::from_avro_datum(schema, &mut &cut[..], None);
    assert!(raw.is_ok(), "apache-avro now rejects truncated strings: {raw:?}");
    let error = decode_err(Some(&encoded.dataschema), cut);
    assert_eq!(error.reason(), "invalid_avro", "{error}");
    assert!(error.to_string().contains("reader schema"), "{error}");
}

#[test]
fn payload_of_another_schema() {
    // Same shape (ids only): Avro accepts it, the envelope type gives it away.
    let click = Event::Campaign(CampaignEvent::ClickRecorded {
        campaign_id: "c".into(),
        affiliate_id: "a".into(),
    });
    let payload = encode(&click).payload;
    let error = decode_err(Some("com.aeropartners.tracking.ImpresionRegistrada/v1"), &payload);
    assert_eq!(error.reason(), "dataschema_mismatch");
    assert_eq!(
        error.to_string(),
        "the record contradicts ce_dataschema \"com.aeropartners.tracking.ImpresionRegistrada/v1\": \
         the record's type is \"ClickRegistrado\""
    );

    // Different shape: a PagoSolicitado read as PagoProcesado runs out of bytes.
    let requested = Event::Payment(PaymentEvent::Requested {
        payment_id: "p".into(),
        affiliate_id: "a".into(),
        amount: usd(1),
    });
    let payload = encode(&requested).payload;
    let error = decode_err(Some("com.aeropartners.idempotencia.PagoProcesado/v1"), &payload);
    assert_eq!(error.reason(), "invalid_avro", "{error}");
}

#[test]
fn a_schema_version_other_than_the_dataschema_s_is_a_dataschema_mismatch() {
    // A PagoProcesado v1 payload that says it was written with v2: the writer schema is unsure.
    let encoded = encode(&processed(PaymentStatus::Pending));
    for version in ["v2", "", "1"] {
        let payload = rewrite(&encoded, &["schema_version"], Value::String(version.into()));
        let error = decode_err(Some(&encoded.dataschema), &payload);
        assert_eq!(error.reason(), "dataschema_mismatch", "{version:?}: {error}");
        assert!(
            error
                .to_string()
                .ends_with(&format!("the record's schema_version is {version:?}")),
            "{error}"
        );
    }
    // The same record under its own version decodes.
    assert!(codec()
        .decode(Some(&encoded.dataschema), &encoded.payload)
        .is_ok());
}

fn meta<'a>(encoded: &'a Encoded, key: Option<&'a str>, ce_type: Option<&'a str>) -> MessageMeta<'a> {
    MessageMeta {
        key,
        ce_type,
        dataschema: Some(&encoded.dataschema),
    }
}

#[test]
fn a_message_with_its_aggregate_id_as_key_and_its_type_or_no_ce_type_decodes() {
    let encoded = encode(&processed(PaymentStatus::Pending));
    let codec = codec();
    for ce_type in [Some("PagoProcesado"), None] {
        let incoming = codec
            .decode_message(meta(&encoded, Some("pago-1"), ce_type), &encoded.payload)
            .unwrap();
        assert_eq!(incoming.aggregate().id, "pago-1");
    }
    // Report events: one aggregate, the report service.
    let report = Event::Report(ReportEvent::VersionChanged {
        version: aerostream_actors::ReportVersion::V2,
    });
    let encoded = encode(&report);
    assert_eq!(encoded.key, aerostream_actors::events::REPORT_SERVICE_ID);
    let message = meta(&encoded, Some(&encoded.key), Some(encoded.event_type));
    assert!(codec.decode_message(message, &encoded.payload).is_ok());
}

#[test]
fn a_ce_type_property_that_contradicts_the_record_is_a_type_mismatch() {
    let encoded = encode(&processed(PaymentStatus::Pending));
    for ce_type in ["PagoSolicitado", "pagoprocesado", "", "Nada"] {
        let error = codec()
            .decode_message(meta(&encoded, Some("pago-1"), Some(ce_type)), &encoded.payload)
            .unwrap_err();
        assert_eq!(error.reason(), "type_mismatch", "{ce_type:?}: {error}");
    }
    let error = codec()
        .decode_message(
            meta(&encoded, Some("pago-1"), Some("PagoSolicitado")),
            &encoded.payload,
        )
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the ce_type property \"PagoSolicitado\" contradicts the record's type \"PagoProcesado\""
    );
}

#[test]
fn a_message_without_a_key_or_keyed_by_another_id_is_refused() {
    let encoded = encode(&processed(PaymentStatus::Pending));
    let codec = codec();
    for key in [None, Some("")] {
        let error = codec
            .decode_message(meta(&encoded, key, None), &encoded.payload)
            .unwrap_err();
        assert_eq!(error.reason(), "missing_key", "{key:?}: {error}");
    }
    for key in ["pago-2", "afiliado-1", "evt-1", "PAGO-1", "pago-1 "] {
        let error = codec
            .decode_message(meta(&encoded, Some(key), None), &encoded.payload)
            .unwrap_err();
        assert_eq!(error.reason(), "key_mismatch", "{key:?}: {error}");
    }
    assert_eq!(
        codec
            .decode_message(meta(&encoded, Some("afiliado-1"), None), &encoded.payload)
            .unwrap_err()
            .to_string(),
        "the message key \"afiliado-1\" is not the aggregate id \"pago-1\""
    );
    // A payload error comes first: a bad payload has no aggregate to compare the key with.
    let error = codec
        .decode_message(meta(&encoded, None, Some("Nada")), b"not avro")
        .unwrap_err();
    assert_eq!(error.reason(), "invalid_avro");
}

#[test]
fn every_reason_is_listed_once() {
    let listed: std::collections::BTreeSet<&str> =
        DecodeReason::ALL.iter().map(|reason| reason.as_str()).collect();
    assert_eq!(listed.len(), DecodeReason::ALL.len());
    let errors = [
        DecodeError::MissingDataschema,
        DecodeError::UnknownSchema {
            detail: String::new(),
        },
        DecodeError::InvalidAvro {
            dataschema: String::new(),
            detail: String::new(),
        },
        DecodeError::MissingField { field: String::new() },
        DecodeError::InvalidField {
            field: String::new(),
            detail: String::new(),
        },
        DecodeError::InvalidMoney {
            field: String::new(),
            detail: String::new(),
        },
        DecodeError::UnknownEventType {
            event_type: String::new(),
            detail: String::new(),
        },
        DecodeError::DataschemaMismatch {
            dataschema: String::new(),
            detail: String::new(),
        },
        DecodeError::TypeMismatch {
            property: String::new(),
            record: String::new(),
        },
        DecodeError::MissingKey {
            aggregate_id: String::new(),
        },
        DecodeError::KeyMismatch {
            key: String::new(),
            aggregate_id: String::new(),
        },
    ];
    let reasons: std::collections::BTreeSet<&str> = errors.iter().map(DecodeError::reason).collect();
    assert_eq!(reasons, listed);
}

#[test]
fn unknown_envelope_type() {
    let encoded = encode(&processed(PaymentStatus::Pending));
    let payload = rewrite(&encoded, &["type"], Value::String("PagoReembolsado".into()));
    let error = decode_err(Some(&encoded.dataschema), &payload);
    assert_eq!(error.reason(), "unknown_event_type", "{error}");
}

#[test]
fn not_positive_amounts_are_invalid_money() {
    for amount in [0, -1, i64::MIN] {
        let event = processed(PaymentStatus::Pending);
        let Event::Payment(PaymentEvent::Processed {
            payment_id,
            affiliate_id,
            status,
            declared_hash,
            attempts,
            ..
        }) = event
        else {
            unreachable!()
        };
        let event = Event::Payment(PaymentEvent::Processed {
            payment_id,
            affiliate_id,
            amount: usd(amount),
            status,
            declared_hash,
            attempts,
        });
        let encoded = encode(&event);
        let error = decode_err(Some(&encoded.dataschema), &encoded.payload);
        assert_eq!(error.reason(), "invalid_money", "{amount}: {error}");
        assert!(error.to_string().contains("`data.monto`"), "{error}");
    }
}

#[test]
fn negative_costs_are_invalid_money() {
    let event = Event::Campaign(CampaignEvent::Created {
        campaign_id: "c".into(),
        name: "n".into(),
        budget: usd(100),
        cost_per_click_minor: -5,
        cost_per_conversion_minor: 0,
        commission: CommissionRule::Fixed { amount_minor: 0 },
    });
    let encoded = encode(&event);
    let error = decode_err(Some(&encoded.dataschema), &encoded.payload);
    assert_eq!(error.reason(), "invalid_money");
    assert!(error.to_string().contains("costo_por_click_centavos"), "{error}");
}

#[test]
fn unknown_currency_is_invalid_money() {
    let encoded = encode(&processed(PaymentStatus::Pending));
    let payload = rewrite(
        &encoded,
        &["data", "monto", "moneda"],
        Value::String("GBP".into()),
    );
    let error = decode_err(Some(&encoded.dataschema), &payload);
    assert_eq!(error.reason(), "invalid_money");
    assert!(error.to_string().contains("GBP"), "{error}");
}

#[test]
fn bad_estado_is_invalid_field() {
    let encoded = encode(&processed(PaymentStatus::Pending));
    let payload = rewrite(&encoded, &["data", "estado"], Value::String("PAGADO".into()));
    let error = decode_err(Some(&encoded.dataschema), &payload);
    assert_eq!(error.reason(), "invalid_field");
    assert!(
        error.to_string().starts_with("invalid field `data.estado`"),
        "{error}"
    );
}

#[test]
fn other_invalid_fields() {
    let created = Event::Campaign(CampaignEvent::Created {
        campaign_id: "c".into(),
        name: "n".into(),
        budget: usd(100),
        cost_per_click_minor: 1,
        cost_per_conversion_minor: 1,
        commission: CommissionRule::Percentage { basis_points: 500 },
    });
    let encoded = encode(&created);
    let cases = [
        (
            vec!["data", "regla_comision", "tipo"],
            Value::String("MIXTO".into()),
            "data.regla_comision.tipo",
        ),
        (
            vec!["data", "regla_comision", "valor"],
            Value::Long(10_001),
            "data.regla_comision.valor",
        ),
        (
            vec!["data", "id_campana"],
            Value::String(String::new()),
            "data.id_campana",
        ),
        (vec!["id"], Value::String(String::new()), "id"),
        (
            vec!["idempotency_key"],
            Value::Union(1, Box::new(Value::String(String::new()))),
            "idempotency_key",
        ),
    ];
    for (path, value, field) in cases {
        let payload = rewrite(&encoded, &path, value);
        let error = decode_err(Some(&encoded.dataschema), &payload);
        assert_eq!(error.reason(), "invalid_field", "{field}: {error}");
        assert!(error.to_string().contains(&format!("`{field}`")), "{error}");
    }

    let encoded = encode(&processed(PaymentStatus::Pending));
    let payload = rewrite(
        &encoded,
        &["data", "metadatos_idempotencia", "intentos_procesamiento"],
        Value::Int(-1),
    );
    let error = decode_err(Some(&encoded.dataschema), &payload);
    assert_eq!(error.reason(), "invalid_field", "{error}");
}

// ---- content hash -----------------------------------------------------------------------------

#[test]
fn content_hash_depends_on_the_event_only() {
    let codec = codec();
    let event = processed(PaymentStatus::Succeeded);
    let first = encode(&event);
    let mut envelope = envelope_for(&event);
    envelope.id = "evt-2".into();
    envelope.time_ms += 1;
    let second = codec.encode_input(&envelope, Some("key"), &event).unwrap();
    let a = codec.decode(Some(&first.dataschema), &first.payload).unwrap();
    let b = codec.decode(Some(&second.dataschema), &second.payload).unwrap();
    assert_eq!(a.content_hash, b.content_hash);
    assert_eq!(a.content_hash.len(), 64);

    let changed = encode(&processed(PaymentStatus::Failed));
    let c = codec.decode(Some(&changed.dataschema), &changed.payload).unwrap();
    assert_ne!(a.content_hash, c.content_hash);
}

// ---- schema evolution -------------------------------------------------------------------------

/// A copy of the shipped schemas whose manifest line for PagoProcesado's versions is `versions`,
/// with `extra` files written beside them.
fn registry_variant(versions: &str, extra: &[(&str, String)]) -> tempfile::TempDir {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    for (file, text) in extra {
        std::fs::write(dir.path().join(file), text).unwrap();
    }
    let manifest = std::fs::read_to_string(shipped.join("manifest.toml")).unwrap();
    let start = manifest.find("PagoProcesado.v1.avsc").unwrap();
    let open = manifest[..start].rfind("versions = [").unwrap();
    let close = open + manifest[open..].find("\n]").map(|i| i + 2).unwrap();
    let manifest = format!("{}{versions}{}", &manifest[..open], &manifest[close..]);
    std::fs::write(dir.path().join("manifest.toml"), manifest).unwrap();
    dir
}

/// The shipped schemas plus a PagoProcesado v3: v2 whose body gains `extra_field`.
fn registry_with_v3(extra_field: serde_json::Value) -> tempfile::TempDir {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let v2 = std::fs::read_to_string(shipped.join("PagoProcesado.v2.avsc")).unwrap();
    let mut v3: serde_json::Value = serde_json::from_str(&v2).unwrap();
    let data = v3["fields"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|f| f["name"] == "data")
        .unwrap();
    data["type"]["fields"].as_array_mut().unwrap().push(extra_field);
    registry_variant(
        r#"versions = [{ version = "v1", file = "PagoProcesado.v1.avsc" }, { version = "v2", file = "PagoProcesado.v2.avsc" }, { version = "v3", file = "PagoProcesado.v3.avsc" }]"#,
        &[(
            "PagoProcesado.v3.avsc",
            serde_json::to_string_pretty(&v3).unwrap(),
        )],
    )
}

fn with_version(mut envelope: Envelope, version: &str) -> Envelope {
    envelope.schema_version = version.into();
    envelope
}

#[test]
fn v1_and_v2_writers_are_read_by_the_v2_reader() {
    let codec = codec();
    let event = processed(PaymentStatus::Failed);
    let v1 = codec
        .encode_input(&with_version(envelope_for(&event), "v1"), None, &event)
        .unwrap();
    let v2 = codec
        .encode_input(&with_version(envelope_for(&event), "v2"), None, &event)
        .unwrap();
    assert_eq!(v1.dataschema, "com.aeropartners.idempotencia.PagoProcesado/v1");
    assert_eq!(v2.dataschema, "com.aeropartners.idempotencia.PagoProcesado/v2");
    assert_ne!(v1.payload, v2.payload, "v2 writes the new field");
    let from_v1 = codec.decode(Some(&v1.dataschema), &v1.payload).unwrap();
    let from_v2 = codec.decode(Some(&v2.dataschema), &v2.payload).unwrap();
    assert_eq!(from_v1.event, event);
    assert_eq!(from_v2.event, event);
    assert_eq!(from_v1.content_hash, from_v2.content_hash);

    // A daemon that only knows v1 dead-letters v2 payloads as an unknown schema.
    let dir = registry_variant(
        r#"versions = [{ version = "v1", file = "PagoProcesado.v1.avsc" }]"#,
        &[],
    );
    std::fs::remove_file(dir.path().join("PagoProcesado.v2.avsc")).unwrap();
    let v1_only = Codec::new(Arc::new(SchemaRegistry::load(dir.path()).unwrap()));
    let error = v1_only.decode(Some(&v2.dataschema), &v2.payload).unwrap_err();
    assert_eq!(error.reason(), "unknown_schema");
}

#[test]
fn a_new_required_field_is_missing_from_old_payloads() {
    let dir = registry_with_v3(serde_json::json!({"name": "canal", "type": "string"}));
    let v3 = Codec::new(Arc::new(SchemaRegistry::load(dir.path()).unwrap()));
    let v1_payload = encode(&processed(PaymentStatus::Failed));
    let error = v3
        .decode(Some(&v1_payload.dataschema), &v1_payload.payload)
        .unwrap_err();
    assert_eq!(error.reason(), "missing_field");
    assert!(error.to_string().contains("`canal`"), "{error}");
}

// ---- the snapshot checksum over the published record ------------------------------------------

fn campaign() -> impl Strategy<Value = Campaign> {
    let lifecycle = prop::sample::select(vec![
        CampaignStatus::Created,
        CampaignStatus::Active,
        CampaignStatus::Paused,
        CampaignStatus::Completed,
    ]);
    let metrics = (
        0..=i64::MAX as u64,
        0..=i64::MAX as u64,
        0..=i64::MAX as u64,
        any::<i64>(),
    )
        .prop_map(
            |(impressions, clicks, conversions, conversion_value_minor)| Metrics {
                impressions,
                clicks,
                conversions,
                conversion_value_minor,
            },
        );
    let alerts = prop::sample::subsequence(AlertLevel::ALL.to_vec(), 0..=3);
    (
        (id(), "\\PC{0,24}", lifecycle, money(), any::<i64>()),
        (
            0..i64::MAX,
            0..i64::MAX,
            commission(),
            metrics,
            alerts,
            1..=i64::MAX as u64,
        ),
    )
        .prop_map(
            |(
                (id, name, lifecycle, budget, spend_minor),
                (click, conversion, commission, metrics, alerts, version),
            )| {
                Campaign {
                    id,
                    name,
                    lifecycle,
                    budget,
                    spend_minor,
                    cost_per_click_minor: click,
                    cost_per_conversion_minor: conversion,
                    commission,
                    metrics,
                    alerts_emitted: alerts.into_iter().collect(),
                    version,
                }
            },
        )
}

/// The schema `checksum_datos` is computed with, built from the shipped `.avsc` as a reader would:
/// CampanaEstadoCompleto's `data` record without its `checksum_datos` field.
fn checksum_schema() -> apache_avro::Schema {
    let message: serde_json::Value =
        serde_json::from_str(include_str!("../../schemas/CampanaEstadoCompleto.v1.avsc")).unwrap();
    let fields = message["fields"].as_array().unwrap();
    let mut data = fields.iter().find(|f| f["name"] == "data").unwrap()["type"].clone();
    data["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != "checksum_datos");
    apache_avro::Schema::parse(&data).unwrap()
}

proptest! {
    /// The daemon's checksum (built in the actors crate, which has no Avro library) is the SHA-256
    /// of what apache-avro writes for the published record's fields, read back from the message.
    #[test]
    fn the_snapshot_checksum_is_recomputed_from_the_published_record(campaign in campaign()) {
        let snapshot = Snapshot::of(&campaign);
        let out = OutputEvent {
            id: "out-1".into(),
            causation_id: "evt-1".into(),
            correlation_id: None,
            time_ms: 1_700_000_000_000,
            body: OutputBody::CampaignState { snapshot: Box::new(snapshot.clone()) },
        };
        let codec = codec();
        let encoded = codec.encode_output(&out).unwrap();
        let schema = codec.registry().writer(&encoded.dataschema).unwrap();
        let Value::Record(message) = apache_avro::from_avro_datum(schema, &mut &encoded.payload[..], None).unwrap() else {
            panic!("not a record")
        };
        let Some((_, Value::Record(mut data))) = message.into_iter().find(|(name, _)| name == "data") else {
            panic!("no data record")
        };
        let published = data.iter().find(|(name, _)| name == "checksum_datos").unwrap().1.clone();
        prop_assert_eq!(published, Value::String(snapshot.checksum_datos.clone()));
        data.retain(|(name, _)| name != "checksum_datos");
        let covered = apache_avro::to_avro_datum(&checksum_schema(), Value::Record(data)).unwrap();
        prop_assert_eq!(
            &covered,
            &snapshot::canonical(&campaign, &snapshot.version_esquema, snapshot.watermark)
        );
        prop_assert_eq!(hex::encode(Sha256::digest(&covered)), snapshot.checksum_datos);
    }
}
