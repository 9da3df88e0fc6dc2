//! Encoding: a domain event or output event → the Avro payload, `ce_dataschema`, type and key.
//!
//! Writes with the schema version the envelope's `schema_version` names (a v1 producer writes v1),
//! or the subject's latest when it names none or one the subject lacks. Encoding does not validate business
//! rules (a test or the generator may deliberately produce a negative amount); decoding does.

use super::{Codec, WireType};
use aerostream_actors::events::CommissionRule;
use aerostream_actors::snapshot::Snapshot;
use aerostream_actors::Campaign;
use aerostream_actors::{
    CampaignEvent, Envelope, Event, Money, OutputBody, OutputEvent, PaymentEvent, ReportEvent, ReportVersion,
};
use apache_avro::types::Value;

/// CloudEvents `specversion` written on every event.
pub const SPEC_VERSION: &str = "1.0";
/// CloudEvents `source` of the output events the daemon publishes.
pub const OUTPUT_SOURCE: &str = "aerostream";
/// `ventana_idempotencia_segundos` written on `PagoProcesado` (informational on the wire).
pub const IDEMPOTENCY_WINDOW_SECONDS_ON_WIRE: i64 = 3600;

/// A payload ready to publish, with the message properties and key it needs (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The raw Avro datum.
    pub payload: Vec<u8>,
    /// `ce_dataschema`: `<full record name>/<version>`.
    pub dataschema: String,
    /// `ce_type`: the wire type, such as `PagoProcesado`.
    pub event_type: &'static str,
    /// The message key: the aggregate id.
    pub key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("no schema for subject {subject} in the registry")]
    UnknownSubject { subject: &'static str },
    #[error("envelope type {envelope_type:?} does not match the event, a {event_type}")]
    TypeMismatch {
        envelope_type: String,
        event_type: &'static str,
    },
    #[error("field `{field}` cannot be written: {detail}")]
    InvalidField { field: &'static str, detail: String },
    #[error("cannot encode {dataschema}: {source}")]
    Avro {
        dataschema: String,
        #[source]
        source: apache_avro::Error,
    },
}

/// The envelope fields as written; `schema_version: None` means the version being written.
struct WireEnvelope<'a> {
    id: &'a str,
    source: &'a str,
    time_ms: i64,
    subject: Option<&'a str>,
    correlation_id: Option<&'a str>,
    causation_id: Option<&'a str>,
    schema_version: Option<&'a str>,
    idempotency_key: Option<&'a str>,
}

impl Codec {
    /// Encodes an input event (generator, HTTP collector). The envelope is written as given; its
    /// `event_type` must be the event's wire type.
    pub fn encode_input(
        &self,
        envelope: &Envelope,
        idempotency_key: Option<&str>,
        event: &Event,
    ) -> Result<Encoded, EncodeError> {
        let wire = WireType::of_event(event);
        if envelope.event_type != wire.name() {
            return Err(EncodeError::TypeMismatch {
                envelope_type: envelope.event_type.clone(),
                event_type: wire.name(),
            });
        }
        let head = WireEnvelope {
            id: &envelope.id,
            source: &envelope.source,
            time_ms: envelope.time_ms,
            subject: envelope.subject.as_deref(),
            correlation_id: envelope.correlation_id.as_deref(),
            causation_id: envelope.causation_id.as_deref(),
            schema_version: Some(&envelope.schema_version),
            idempotency_key,
        };
        self.encode(wire, head, input_data(event)?, event.aggregate().id)
    }

    /// Encodes an output event for the outbox publisher: envelope id = `out.id`, source
    /// `aerostream`, `causationid` = the input event that caused it.
    pub fn encode_output(&self, out: &OutputEvent) -> Result<Encoded, EncodeError> {
        let head = WireEnvelope {
            id: &out.id,
            source: OUTPUT_SOURCE,
            time_ms: out.time_ms,
            subject: None,
            correlation_id: out.correlation_id.as_deref(),
            causation_id: Some(&out.causation_id),
            schema_version: None,
            idempotency_key: None,
        };
        let wire = WireType::of_output(&out.body);
        self.encode(wire, head, output_data(&out.body), out.body.key().to_owned())
    }

    fn encode(
        &self,
        wire: WireType,
        head: WireEnvelope<'_>,
        data: Value,
        key: String,
    ) -> Result<Encoded, EncodeError> {
        let subject = self
            .registry()
            .subject(wire.subject())
            .ok_or(EncodeError::UnknownSubject {
                subject: wire.subject(),
            })?;
        // The writer version: the one the envelope names when the subject has it, else the latest.
        let writer = head
            .schema_version
            .and_then(|version| subject.version(version))
            .unwrap_or_else(|| subject.latest());
        let value = record(vec![
            ("id", string(head.id)),
            ("type", string(wire.name())),
            ("source", string(head.source)),
            ("time", Value::TimestampMillis(head.time_ms)),
            ("specversion", string(SPEC_VERSION)),
            ("subject", optional(head.subject)),
            ("correlationid", optional(head.correlation_id)),
            ("causationid", optional(head.causation_id)),
            ("schema_version", string(&writer.version)),
            ("idempotency_key", optional(head.idempotency_key)),
            ("data", data),
        ]);
        let dataschema = subject.dataschema(writer);
        let avro_error = |source| EncodeError::Avro {
            dataschema: dataschema.clone(),
            source,
        };
        // apache-avro's encoder does not fill in defaults; resolving does. So a newer schema that
        // adds fields with defaults (unknown to this code) can still be written.
        let value = value.resolve(&writer.schema).map_err(avro_error)?;
        let payload = apache_avro::to_avro_datum(&writer.schema, value).map_err(avro_error)?;
        Ok(Encoded {
            payload,
            dataschema,
            event_type: wire.name(),
            key,
        })
    }
}

fn input_data(event: &Event) -> Result<Value, EncodeError> {
    Ok(match event {
        Event::Campaign(event) => match event {
            CampaignEvent::Created {
                campaign_id,
                name,
                budget,
                cost_per_click_minor,
                cost_per_conversion_minor,
                commission,
            } => record(vec![
                ("id_campana", string(campaign_id)),
                ("nombre", string(name)),
                ("presupuesto", money(budget)),
                ("costo_por_click_centavos", Value::Long(*cost_per_click_minor)),
                (
                    "costo_por_conversion_centavos",
                    Value::Long(*cost_per_conversion_minor),
                ),
                ("regla_comision", commission_rule(commission)),
            ]),
            CampaignEvent::Activated { campaign_id } | CampaignEvent::Completed { campaign_id } => {
                record(vec![("id_campana", string(campaign_id))])
            }
            CampaignEvent::Paused { campaign_id, reason } => record(vec![
                ("id_campana", string(campaign_id)),
                ("motivo", string(reason)),
            ]),
            CampaignEvent::BudgetUpdated { campaign_id, budget } => record(vec![
                ("id_campana", string(campaign_id)),
                ("presupuesto", money(budget)),
            ]),
            CampaignEvent::ImpressionRecorded {
                campaign_id,
                affiliate_id,
            }
            | CampaignEvent::ClickRecorded {
                campaign_id,
                affiliate_id,
            } => record(vec![
                ("id_campana", string(campaign_id)),
                ("id_afiliado", string(affiliate_id)),
            ]),
            CampaignEvent::ConversionRecorded {
                campaign_id,
                affiliate_id,
                value,
            } => record(vec![
                ("id_campana", string(campaign_id)),
                ("id_afiliado", string(affiliate_id)),
                ("valor", money(value)),
            ]),
        },
        Event::Payment(event) => match event {
            PaymentEvent::Requested {
                payment_id,
                affiliate_id,
                amount,
            } => payment_data(payment_id, affiliate_id, amount),
            PaymentEvent::Processed {
                payment_id,
                affiliate_id,
                amount,
                status,
                declared_hash,
                attempts,
            } => {
                let attempts = i32::try_from(*attempts).map_err(|_| EncodeError::InvalidField {
                    field: "data.metadatos_idempotencia.intentos_procesamiento",
                    detail: format!("{attempts} does not fit an Avro int"),
                })?;
                record(vec![
                    ("id_pago", string(payment_id)),
                    ("id_afiliado", string(affiliate_id)),
                    ("monto", money(amount)),
                    ("estado", string(status.wire_name())),
                    (
                        "metadatos_idempotencia",
                        record(vec![
                            ("hash_contenido", string(declared_hash)),
                            ("intentos_procesamiento", Value::Int(attempts)),
                            (
                                "ventana_idempotencia_segundos",
                                Value::Long(IDEMPOTENCY_WINDOW_SECONDS_ON_WIRE),
                            ),
                        ]),
                    ),
                ])
            }
        },
        Event::Report(event) => match event {
            ReportEvent::Requested {
                request_id,
                version,
                parameters,
            } => record(vec![
                ("id_solicitud", string(request_id)),
                (
                    "version_servicio_datos",
                    string(version.map_or("latest", ReportVersion::as_str)),
                ),
                (
                    "parametros",
                    Value::Map(parameters.iter().map(|(k, v)| (k.clone(), string(v))).collect()),
                ),
            ]),
            ReportEvent::VersionChanged { version } => {
                record(vec![("version_servicio_datos", string(version.as_str()))])
            }
        },
    })
}

fn output_data(body: &OutputBody) -> Value {
    match body {
        OutputBody::PaymentSucceeded {
            payment_id,
            affiliate_id,
            amount,
        }
        | OutputBody::PaymentFailed {
            payment_id,
            affiliate_id,
            amount,
        } => payment_data(payment_id, affiliate_id, amount),
        OutputBody::CommissionCalculated {
            affiliate_id,
            campaign_id,
            conversion_event_id,
            commission,
        } => record(vec![
            ("id_afiliado", string(affiliate_id)),
            ("id_campana", string(campaign_id)),
            ("id_evento_conversion", string(conversion_event_id)),
            ("comision", money(commission)),
        ]),
        OutputBody::BudgetAlert {
            campaign_id,
            level,
            budget,
            spend_minor,
        } => record(vec![
            ("id_campana", string(campaign_id)),
            ("nivel", string(level.wire_name())),
            ("presupuesto", money(budget)),
            ("gasto_centavos", Value::Long(*spend_minor)),
        ]),
        OutputBody::CampaignState { snapshot } => campaign_state(snapshot),
        OutputBody::ReportGenerated {
            request_id,
            version,
            report_json,
        } => record(vec![
            ("id_solicitud", string(request_id)),
            ("version_servicio_datos", string(version.as_str())),
            ("reporte_json", string(report_json)),
        ]),
    }
}

/// The body of CampanaEstadoCompleto: the campaign's full state and the snapshot's checksum.
/// The fields and their order are those `Campaign::write_snapshot_state` writes for the checksum
/// (`codec::tests` checks that the two agree).
fn campaign_state(snapshot: &Snapshot<Campaign>) -> Value {
    let campaign = &snapshot.state;
    let alerts = campaign
        .alerts_emitted
        .iter()
        .map(|level| string(level.wire_name()))
        .collect();
    record(vec![
        ("id_campana", string(&campaign.id)),
        ("nombre", string(&campaign.name)),
        ("estado", string(campaign.status().wire_name())),
        ("presupuesto", money(&campaign.budget)),
        ("gasto_centavos", Value::Long(campaign.spend_minor)),
        (
            "costo_por_click_centavos",
            Value::Long(campaign.cost_per_click_minor),
        ),
        (
            "costo_por_conversion_centavos",
            Value::Long(campaign.cost_per_conversion_minor),
        ),
        ("regla_comision", commission_rule(&campaign.commission)),
        (
            "metricas",
            record(vec![
                ("impresiones", Value::Long(campaign.metrics.impressions as i64)),
                ("clicks", Value::Long(campaign.metrics.clicks as i64)),
                ("conversiones", Value::Long(campaign.metrics.conversions as i64)),
                (
                    "valor_conversiones_centavos",
                    Value::Long(campaign.metrics.conversion_value_minor),
                ),
            ]),
        ),
        ("alertas_emitidas", Value::Array(alerts)),
        ("version", Value::Long(campaign.version as i64)),
        ("version_esquema", string(&snapshot.version_esquema)),
        ("checksum_datos", string(&snapshot.checksum_datos)),
        ("watermark", Value::Long(snapshot.watermark as i64)),
    ])
}

/// `{id_pago, id_afiliado, monto}`: the body of PagoSolicitado, PagoExitoso and PagoFallido.
fn payment_data(payment_id: &str, affiliate_id: &str, amount: &Money) -> Value {
    record(vec![
        ("id_pago", string(payment_id)),
        ("id_afiliado", string(affiliate_id)),
        ("monto", money(amount)),
    ])
}

fn commission_rule(rule: &CommissionRule) -> Value {
    let (kind, value) = rule.wire();
    record(vec![("tipo", string(kind)), ("valor", Value::Long(value))])
}

fn money(money: &Money) -> Value {
    record(vec![
        ("monto_centavos", Value::Long(money.amount_minor)),
        ("moneda", string(money.currency.code())),
    ])
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(
        fields
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
    )
}

fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

/// A `["null", "string"]` union value.
fn optional(s: Option<&str>) -> Value {
    match s {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(string(s))),
    }
}
