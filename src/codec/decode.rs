//! Decoding: an Avro payload plus its writer schema → the domain's `Incoming` or `OutputEvent`.
//!
//! Steps: find the writer schema named by `ce_dataschema`, decode the datum (the whole payload must
//! be consumed), resolve it to the subject's reader schema, then map the record field by field into
//! the envelope and the typed event, validating money and enumerations; the record's `type` and
//! `schema_version` must be the ones `ce_dataschema` names. A consumed message is then checked
//! against what the broker carries besides the payload ([`Codec::decode_message`]): the `ce_type`
//! property, when present, must be the record's type, and the key must be the aggregate id
//! (SPEC §3). Every failure is a [`DecodeError`] whose [`reason`](DecodeError::reason) is the
//! dead-letter reason and metric label.

use super::{Codec, WireType};
use aerostream_actors::events::CommissionRule;
use aerostream_actors::money::MoneyError;
use aerostream_actors::output::AlertLevel;
use aerostream_actors::{
    CampaignEvent, Envelope, Event, Incoming, Money, OutputBody, OutputEvent, PaymentEvent, PaymentStatus,
    ReportEvent, ReportVersion,
};
use apache_avro::error::Details;
use apache_avro::types::{Value, ValueKind};
use apache_avro::Schema;
use sha2::{Digest, Sha256};

/// Longest Avro error detail kept in a message: apache-avro prints whole values in some errors.
const MAX_DETAIL_CHARS: usize = 300;

/// Why a payload could not become an event. All of them are permanent: dead-letter, don't retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, strum::EnumDiscriminants)]
#[strum_discriminants(
    name(DecodeReason),
    derive(Hash, strum::VariantArray),
    doc = "The kind of a [`DecodeError`]: its dead-letter reason and metric label ([`DecodeReason::as_str`])."
)]
pub enum DecodeError {
    #[error("the message has no ce_dataschema property and its input has no default_dataschema")]
    MissingDataschema,
    #[error("unknown schema: {detail}")]
    UnknownSchema { detail: String },
    #[error("payload is not valid Avro for {dataschema}: {detail}")]
    InvalidAvro { dataschema: String, detail: String },
    #[error("missing required field `{field}`")]
    MissingField { field: String },
    #[error("invalid field `{field}`: {detail}")]
    InvalidField { field: String, detail: String },
    #[error("invalid money in `{field}`: {detail}")]
    InvalidMoney { field: String, detail: String },
    #[error("unknown event type {event_type:?}: {detail}")]
    UnknownEventType { event_type: String, detail: String },
    /// The payload decodes under the schema `ce_dataschema` names, but its record says otherwise.
    #[error("the record contradicts ce_dataschema {dataschema:?}: {detail}")]
    DataschemaMismatch { dataschema: String, detail: String },
    #[error("the ce_type property {property:?} contradicts the record's type {record:?}")]
    TypeMismatch { property: String, record: String },
    #[error("the message has no key; its key must be the aggregate id {aggregate_id:?}")]
    MissingKey { aggregate_id: String },
    #[error("the message key {key:?} is not the aggregate id {aggregate_id:?}")]
    KeyMismatch { key: String, aggregate_id: String },
}

impl DecodeError {
    /// The dead-letter reason and metric label.
    pub fn reason(&self) -> &'static str {
        DecodeReason::from(self).as_str()
    }
}

impl DecodeReason {
    /// Every reason (derived from [`DecodeError`]'s variants, so none is left out of the counters
    /// registered at 0).
    pub const ALL: &'static [DecodeReason] = <DecodeReason as strum::VariantArray>::VARIANTS;

    pub fn as_str(self) -> &'static str {
        match self {
            DecodeReason::MissingDataschema => "missing_dataschema",
            DecodeReason::UnknownSchema => "unknown_schema",
            DecodeReason::InvalidAvro => "invalid_avro",
            DecodeReason::MissingField => "missing_field",
            DecodeReason::InvalidField => "invalid_field",
            DecodeReason::InvalidMoney => "invalid_money",
            DecodeReason::UnknownEventType => "unknown_event_type",
            DecodeReason::DataschemaMismatch => "dataschema_mismatch",
            DecodeReason::TypeMismatch => "type_mismatch",
            DecodeReason::MissingKey => "missing_key",
            DecodeReason::KeyMismatch => "key_mismatch",
        }
    }
}

/// What a consumed message carries besides its payload (SPEC §3).
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageMeta<'a> {
    /// The message key: it must be the aggregate id.
    pub key: Option<&'a str>,
    /// The `ce_type` property: when present, it must be the record's `type`.
    pub ce_type: Option<&'a str>,
    /// The `ce_dataschema` property, else the input's `default_dataschema`.
    pub dataschema: Option<&'a str>,
}

/// SHA-256 (hex) of the domain event's JSON: independent of the envelope and of the schema
/// version it was written with, so the same content always has the same hash.
pub fn content_hash(event: &Event) -> String {
    let json = serde_json::to_vec(event).expect("domain events always serialize to JSON");
    hex::encode(Sha256::digest(json))
}

impl Codec {
    /// Decodes a consumed message: [`Codec::decode`], then the checks of the message's key and
    /// `ce_type` against the record (SPEC §3: the key is the aggregate id; a missing `ce_type`
    /// property is allowed).
    pub fn decode_message(&self, message: MessageMeta<'_>, payload: &[u8]) -> Result<Incoming, DecodeError> {
        let incoming = self.decode(message.dataschema, payload)?;
        check_message(&message, &incoming)?;
        Ok(incoming)
    }

    /// Decodes an input event. `dataschema` is the `ce_dataschema` property (or the topic's
    /// default); `None` is a `missing_dataschema` error.
    pub fn decode(&self, dataschema: Option<&str>, payload: &[u8]) -> Result<Incoming, DecodeError> {
        let (wire, record) = self.read(dataschema, payload)?;
        let root = Fields::root(&record);
        let (envelope, idempotency_key) = envelope(&root, wire, dataschema)?;
        let event = input_event(wire, &root.record("data")?)?;
        Ok(Incoming {
            idempotency_key: idempotency_key.unwrap_or_else(|| envelope.id.clone()),
            content_hash: content_hash(&event),
            envelope,
            event,
            delivery: None,
            partition: None,
        })
    }

    /// Decodes an output event, as published by [`Codec::encode_output`].
    pub fn decode_output(
        &self,
        dataschema: Option<&str>,
        payload: &[u8],
    ) -> Result<OutputEvent, DecodeError> {
        let (wire, record) = self.read(dataschema, payload)?;
        let root = Fields::root(&record);
        let (envelope, _) = envelope(&root, wire, dataschema)?;
        let body = output_body(wire, &root.record("data")?)?;
        let causation_id = envelope.causation_id.ok_or_else(|| DecodeError::MissingField {
            field: "causationid".into(),
        })?;
        Ok(OutputEvent {
            id: envelope.id,
            causation_id,
            correlation_id: envelope.correlation_id,
            time_ms: envelope.time_ms,
            body,
        })
    }

    /// Decodes with the writer schema and resolves to the reader schema: the top-level record.
    fn read(
        &self,
        dataschema: Option<&str>,
        payload: &[u8],
    ) -> Result<(WireType, Vec<(String, Value)>), DecodeError> {
        let dataschema = dataschema.ok_or(DecodeError::MissingDataschema)?;
        let unknown = |detail: String| DecodeError::UnknownSchema { detail };
        let (subject, _) = dataschema.split_once('/').ok_or_else(|| {
            unknown(format!(
                "{dataschema:?} is not of the form <record full name>/<version>"
            ))
        })?;
        let writer = self
            .registry()
            .writer(dataschema)
            .ok_or_else(|| unknown(format!("{dataschema:?} is not in the schema registry")))?;
        let reader = self
            .registry()
            .reader(subject)
            .ok_or_else(|| unknown(format!("{subject:?} is not in the schema registry")))?;
        let wire = WireType::from_subject(subject).ok_or_else(|| DecodeError::UnknownEventType {
            event_type: subject.to_owned(),
            detail: "the schema is registered but aerostream has no event type for it".into(),
        })?;

        let invalid = |detail: String| DecodeError::InvalidAvro {
            dataschema: dataschema.to_owned(),
            detail: shorten(detail),
        };
        let mut rest = payload;
        // apache-avro's `from_avro_datum` (and `Value::validate`) index the schema's named types
        // anew at every call, a quarter of a message's decoding: a schema that refers to none by
        // name is decoded without that index.
        let plain = !refers_by_name(writer);
        let decoded = if plain {
            apache_avro::from_avro_datum_reader_schemata(writer, Vec::new(), &mut rest, None, Vec::new())
        } else {
            apache_avro::from_avro_datum(writer, &mut rest, None)
        };
        let value = decoded.map_err(|e| invalid(format!("cannot decode the datum: {e}")))?;
        if !rest.is_empty() {
            return Err(invalid(format!("{} bytes left over after the datum", rest.len())));
        }
        // apache-avro decodes a string cut short by the end of the payload as null: the value is
        // checked against the reader schema even when the writer's is the same version. Then a
        // validation is that check, without the copy of the value a resolution builds; a value
        // decoded with its own plain schema can only fail it by such a null.
        let value = if std::ptr::eq(writer, reader) {
            let valid = if plain {
                !stray_null(&value, reader)
            } else {
                value.validate(reader)
            };
            if !valid {
                return Err(invalid(
                    "does not match the reader schema (a value of the wrong type, or a string cut short)"
                        .into(),
                ));
            }
            value
        } else {
            value.resolve(reader).map_err(|e| match e.into_details() {
                Details::GetField(field) => DecodeError::MissingField { field },
                other => invalid(format!("does not match the reader schema: {other}")),
            })?
        };
        match value {
            Value::Record(fields) => Ok((wire, fields)),
            other => Err(invalid(format!(
                "expected a record, got {:?}",
                ValueKind::from(&other)
            ))),
        }
    }
}

/// Whether `schema` refers to a named type by its name (decoding it needs the index of names).
fn refers_by_name(schema: &Schema) -> bool {
    match schema {
        Schema::Ref { .. } => true,
        Schema::Record(record) => record.fields.iter().any(|field| refers_by_name(&field.schema)),
        Schema::Union(union) => union.variants().iter().any(refers_by_name),
        Schema::Array(array) => refers_by_name(&array.items),
        Schema::Map(map) => refers_by_name(&map.types),
        _ => false,
    }
}

/// Whether `value`, decoded with `schema` (which refers to no type by name), holds a null where
/// the schema has none: what apache-avro makes of a string or a boolean cut short by the end of
/// the payload. Every other part of such a value has its schema's type.
fn stray_null(value: &Value, schema: &Schema) -> bool {
    match (value, schema) {
        (Value::Null, Schema::Null) => false,
        (Value::Null, _) => true,
        (Value::Record(fields), Schema::Record(record)) => fields
            .iter()
            .zip(&record.fields)
            .any(|((_, value), field)| stray_null(value, &field.schema)),
        (Value::Union(index, value), Schema::Union(union)) => union
            .variants()
            .get(*index as usize)
            .map_or(true, |variant| stray_null(value, variant)),
        (Value::Array(items), Schema::Array(array)) => {
            items.iter().any(|item| stray_null(item, &array.items))
        }
        (Value::Map(entries), Schema::Map(map)) => {
            entries.values().any(|value| stray_null(value, &map.types))
        }
        _ => false,
    }
}

/// The message's key and `ce_type` property against the decoded record.
fn check_message(message: &MessageMeta<'_>, incoming: &Incoming) -> Result<(), DecodeError> {
    if let Some(property) = message.ce_type {
        if property != incoming.envelope.event_type {
            return Err(DecodeError::TypeMismatch {
                property: shorten(property.to_owned()),
                record: incoming.envelope.event_type.clone(),
            });
        }
    }
    let aggregate_id = incoming.aggregate().id;
    match message.key {
        None | Some("") => Err(DecodeError::MissingKey { aggregate_id }),
        Some(key) if key != aggregate_id => Err(DecodeError::KeyMismatch {
            key: shorten(key.to_owned()),
            aggregate_id,
        }),
        Some(_) => Ok(()),
    }
}

/// The envelope, plus the event's own idempotency key if it carries one. `dataschema` (checked by
/// [`Codec::read`]) names the record's type and schema version: a record that says otherwise
/// contradicts it.
fn envelope(
    root: &Fields,
    wire: WireType,
    dataschema: Option<&str>,
) -> Result<(Envelope, Option<String>), DecodeError> {
    let dataschema = dataschema.unwrap_or_default();
    let mismatch = |detail: String| DecodeError::DataschemaMismatch {
        dataschema: dataschema.to_owned(),
        detail,
    };
    let event_type = root.string("type")?;
    if event_type != wire.name() {
        return Err(match WireType::from_name(&event_type) {
            None => DecodeError::UnknownEventType {
                event_type,
                detail: format!("the payload was written with the {} schema", wire.name()),
            },
            Some(_) => mismatch(format!("the record's type is {event_type:?}")),
        });
    }
    let idempotency_key = root.optional_string("idempotency_key")?;
    if idempotency_key.as_deref() == Some("") {
        return Err(root.invalid("idempotency_key", "must not be empty (use null)".into()));
    }
    let envelope = Envelope {
        id: root.id("id")?,
        event_type,
        source: root.string("source")?,
        time_ms: root.timestamp_millis("time")?,
        subject: root.optional_string("subject")?,
        correlation_id: root.optional_string("correlationid")?,
        causation_id: root.optional_string("causationid")?,
        schema_version: root.string("schema_version")?,
    };
    let version = dataschema.split_once('/').map_or("", |(_, version)| version);
    if envelope.schema_version != version {
        return Err(mismatch(format!(
            "the record's schema_version is {:?}",
            shorten(envelope.schema_version)
        )));
    }
    Ok((envelope, idempotency_key))
}

fn input_event(wire: WireType, data: &Fields) -> Result<Event, DecodeError> {
    let campaign = |event| Ok(Event::Campaign(event));
    let payment = |event| Ok(Event::Payment(event));
    match wire {
        WireType::CampanaCreada => campaign(CampaignEvent::Created {
            campaign_id: data.id("id_campana")?,
            name: data.string("nombre")?,
            budget: data.money("presupuesto")?,
            cost_per_click_minor: data.minor_units("costo_por_click_centavos")?,
            cost_per_conversion_minor: data.minor_units("costo_por_conversion_centavos")?,
            commission: commission_rule(&data.record("regla_comision")?)?,
        }),
        WireType::CampanaActivada => campaign(CampaignEvent::Activated {
            campaign_id: data.id("id_campana")?,
        }),
        WireType::CampanaPausada => campaign(CampaignEvent::Paused {
            campaign_id: data.id("id_campana")?,
            reason: data.string("motivo")?,
        }),
        WireType::CampanaCompletada => campaign(CampaignEvent::Completed {
            campaign_id: data.id("id_campana")?,
        }),
        WireType::PresupuestoActualizado => campaign(CampaignEvent::BudgetUpdated {
            campaign_id: data.id("id_campana")?,
            budget: data.money("presupuesto")?,
        }),
        WireType::ImpresionRegistrada => campaign(CampaignEvent::ImpressionRecorded {
            campaign_id: data.id("id_campana")?,
            affiliate_id: data.id("id_afiliado")?,
        }),
        WireType::ClickRegistrado => campaign(CampaignEvent::ClickRecorded {
            campaign_id: data.id("id_campana")?,
            affiliate_id: data.id("id_afiliado")?,
        }),
        WireType::ConversionRegistrada => campaign(CampaignEvent::ConversionRecorded {
            campaign_id: data.id("id_campana")?,
            affiliate_id: data.id("id_afiliado")?,
            value: data.money("valor")?,
        }),
        WireType::PagoSolicitado => payment(PaymentEvent::Requested {
            payment_id: data.id("id_pago")?,
            affiliate_id: data.id("id_afiliado")?,
            amount: data.money("monto")?,
        }),
        WireType::PagoProcesado => {
            let metadata = data.record("metadatos_idempotencia")?;
            let attempts = metadata.int("intentos_procesamiento")?;
            payment(PaymentEvent::Processed {
                payment_id: data.id("id_pago")?,
                affiliate_id: data.id("id_afiliado")?,
                amount: data.money("monto")?,
                status: data.parse::<PaymentStatus>("estado")?,
                declared_hash: metadata.string("hash_contenido")?,
                attempts: u32::try_from(attempts).map_err(|_| {
                    metadata.invalid(
                        "intentos_procesamiento",
                        format!("must be zero or more, got {attempts}"),
                    )
                })?,
            })
        }
        WireType::ReporteSolicitado => Ok(Event::Report(ReportEvent::Requested {
            request_id: data.id("id_solicitud")?,
            version: match data.str("version_servicio_datos")? {
                "latest" => None,
                _ => Some(data.parse::<ReportVersion>("version_servicio_datos")?),
            },
            parameters: data.string_map("parametros")?,
        })),
        WireType::VersionReporteCambiada => Ok(Event::Report(ReportEvent::VersionChanged {
            version: data.parse("version_servicio_datos")?,
        })),
        WireType::PagoExitoso
        | WireType::PagoFallido
        | WireType::ComisionCalculada
        | WireType::BudgetAlert
        | WireType::CampanaEstadoCompleto
        | WireType::ReporteGenerado => Err(DecodeError::UnknownEventType {
            event_type: wire.name().into(),
            detail: "an output event: aerostream publishes it and does not consume it".into(),
        }),
    }
}

fn output_body(wire: WireType, data: &Fields) -> Result<OutputBody, DecodeError> {
    match wire {
        WireType::PagoExitoso => Ok(OutputBody::PaymentSucceeded {
            payment_id: data.id("id_pago")?,
            affiliate_id: data.id("id_afiliado")?,
            amount: data.money("monto")?,
        }),
        WireType::PagoFallido => Ok(OutputBody::PaymentFailed {
            payment_id: data.id("id_pago")?,
            affiliate_id: data.id("id_afiliado")?,
            amount: data.money("monto")?,
        }),
        WireType::ComisionCalculada => Ok(OutputBody::CommissionCalculated {
            affiliate_id: data.id("id_afiliado")?,
            campaign_id: data.id("id_campana")?,
            conversion_event_id: data.id("id_evento_conversion")?,
            // A rule can round a small conversion's commission down to zero.
            commission: data.money_or_zero("comision")?,
        }),
        WireType::BudgetAlert => Ok(OutputBody::BudgetAlert {
            campaign_id: data.id("id_campana")?,
            level: alert_level(data)?,
            budget: data.money("presupuesto")?,
            spend_minor: data.minor_units("gasto_centavos")?,
        }),
        WireType::ReporteGenerado => Ok(OutputBody::ReportGenerated {
            request_id: data.id("id_solicitud")?,
            version: data.parse("version_servicio_datos")?,
            report_json: data.string("reporte_json")?,
        }),
        WireType::CampanaEstadoCompleto => Err(DecodeError::UnknownEventType {
            event_type: wire.name().into(),
            detail: "full-state events are read back by a standby (not implemented yet)".into(),
        }),
        input => Err(DecodeError::UnknownEventType {
            event_type: input.name().into(),
            detail: "an input event, not an output event".into(),
        }),
    }
}

/// `regla_comision`: PORCENTAJE in basis points (0..=10000) or FIJO in minor units (≥ 0).
fn commission_rule(rule: &Fields) -> Result<CommissionRule, DecodeError> {
    let value = rule.long("valor")?;
    match rule.str("tipo")? {
        "PORCENTAJE" => match u32::try_from(value) {
            Ok(basis_points) if basis_points <= 10_000 => Ok(CommissionRule::Percentage { basis_points }),
            _ => Err(rule.invalid(
                "valor",
                format!("PORCENTAJE takes basis points from 0 to 10000, got {value}"),
            )),
        },
        "FIJO" => Ok(CommissionRule::Fixed {
            amount_minor: rule.minor_units("valor")?,
        }),
        other => Err(rule.invalid("tipo", format!("expected PORCENTAJE or FIJO, got {other:?}"))),
    }
}

fn alert_level(data: &Fields) -> Result<AlertLevel, DecodeError> {
    let level = data.str("nivel")?;
    AlertLevel::ALL
        .into_iter()
        .find(|l| l.wire_name() == level)
        .ok_or_else(|| {
            data.invalid(
                "nivel",
                format!("expected WARNING, CRITICAL or EXHAUSTED, got {level:?}"),
            )
        })
}

fn shorten(mut detail: String) -> String {
    if let Some((cut, _)) = detail.char_indices().nth(MAX_DETAIL_CHARS) {
        detail.truncate(cut);
        detail.push('…');
    }
    detail
}

/// Typed access to the fields of a resolved record; errors name the field by its path.
struct Fields<'a> {
    /// `""` for the top level, `"data."`, `"data.monto."`, … below it.
    prefix: String,
    fields: &'a [(String, Value)],
}

impl<'a> Fields<'a> {
    fn root(fields: &'a [(String, Value)]) -> Fields<'a> {
        Fields {
            prefix: String::new(),
            fields,
        }
    }

    fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn invalid(&self, name: &str, detail: String) -> DecodeError {
        DecodeError::InvalidField {
            field: self.path(name),
            detail,
        }
    }

    fn wrong_type(&self, name: &str, expected: &str, got: &Value) -> DecodeError {
        self.invalid(
            name,
            format!("expected {expected}, got {:?}", ValueKind::from(got)),
        )
    }

    fn get(&self, name: &str) -> Result<&'a Value, DecodeError> {
        self.fields
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value)
            .ok_or_else(|| DecodeError::MissingField {
                field: self.path(name),
            })
    }

    fn str(&self, name: &str) -> Result<&'a str, DecodeError> {
        match self.get(name)? {
            Value::String(s) => Ok(s),
            other => Err(self.wrong_type(name, "a string", other)),
        }
    }

    fn string(&self, name: &str) -> Result<String, DecodeError> {
        self.str(name).map(str::to_owned)
    }

    /// A non-empty string: event ids and aggregate ids (the message key).
    fn id(&self, name: &str) -> Result<String, DecodeError> {
        match self.str(name)? {
            "" => Err(self.invalid(name, "must not be empty".into())),
            id => Ok(id.to_owned()),
        }
    }

    /// A `["null", "string"]` field.
    fn optional_string(&self, name: &str) -> Result<Option<String>, DecodeError> {
        let value = match self.get(name)? {
            Value::Union(_, inner) => inner.as_ref(),
            plain => plain,
        };
        match value {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s.clone())),
            other => Err(self.wrong_type(name, "null or a string", other)),
        }
    }

    /// A `{"type": "map", "values": "string"}` field.
    fn string_map(&self, name: &str) -> Result<std::collections::BTreeMap<String, String>, DecodeError> {
        match self.get(name)? {
            Value::Map(entries) => entries
                .iter()
                .map(|(key, value)| match value {
                    Value::String(s) => Ok((key.clone(), s.clone())),
                    other => Err(self.wrong_type(&format!("{name}.{key}"), "a string", other)),
                })
                .collect(),
            other => Err(self.wrong_type(name, "a map of strings", other)),
        }
    }

    fn long(&self, name: &str) -> Result<i64, DecodeError> {
        match self.get(name)? {
            Value::Long(n) => Ok(*n),
            Value::Int(n) => Ok(i64::from(*n)),
            other => Err(self.wrong_type(name, "a long", other)),
        }
    }

    fn int(&self, name: &str) -> Result<i32, DecodeError> {
        match self.get(name)? {
            Value::Int(n) => Ok(*n),
            other => Err(self.wrong_type(name, "an int", other)),
        }
    }

    fn timestamp_millis(&self, name: &str) -> Result<i64, DecodeError> {
        match self.get(name)? {
            Value::TimestampMillis(ms) | Value::Long(ms) => Ok(*ms),
            other => Err(self.wrong_type(name, "a timestamp-millis", other)),
        }
    }

    fn record(&self, name: &str) -> Result<Fields<'a>, DecodeError> {
        match self.get(name)? {
            Value::Record(fields) => Ok(Fields {
                prefix: format!("{}{name}.", self.prefix),
                fields,
            }),
            other => Err(self.wrong_type(name, "a record", other)),
        }
    }

    /// A string naming one of `T`'s wire values (`estado` → [`PaymentStatus`]).
    fn parse<T: std::str::FromStr<Err = String>>(&self, name: &str) -> Result<T, DecodeError> {
        self.str(name)?
            .parse()
            .map_err(|detail| self.invalid(name, detail))
    }

    /// An amount of money in minor units that may be zero but not negative (costs, spend).
    fn minor_units(&self, name: &str) -> Result<i64, DecodeError> {
        match self.long(name)? {
            n if n >= 0 => Ok(n),
            n => Err(DecodeError::InvalidMoney {
                field: self.path(name),
                detail: format!("amount must not be negative, got {n} minor units"),
            }),
        }
    }

    /// A `Dinero` record: amount greater than zero in a supported currency.
    fn money(&self, name: &str) -> Result<Money, DecodeError> {
        let (amount, currency) = self.dinero(name)?;
        Money::positive(amount, currency).map_err(|e| self.invalid_money(name, e))
    }

    /// A `Dinero` record that may also be zero.
    fn money_or_zero(&self, name: &str) -> Result<Money, DecodeError> {
        match self.dinero(name)? {
            (0, currency) => Ok(Money {
                amount_minor: 0,
                currency: currency.parse().map_err(|e| self.invalid_money(name, e))?,
            }),
            _ => self.money(name),
        }
    }

    fn invalid_money(&self, name: &str, error: MoneyError) -> DecodeError {
        DecodeError::InvalidMoney {
            field: self.path(name),
            detail: error.to_string(),
        }
    }

    fn dinero(&self, name: &str) -> Result<(i64, &'a str), DecodeError> {
        let dinero = self.record(name)?;
        Ok((dinero.long("monto_centavos")?, dinero.str("moneda")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_REF: &str = r#"{"type": "record", "name": "Pair", "fields": [
        {"name": "first", "type": {"type": "record", "name": "Money", "fields": [{"name": "cents", "type": "long"}]}},
        {"name": "second", "type": "Money"}]}"#;

    const PLAIN: &str = r#"{"type": "record", "name": "Plain", "fields": [
        {"name": "text", "type": "string"},
        {"name": "maybe", "type": ["null", "string"]},
        {"name": "list", "type": {"type": "array", "items": "string"}},
        {"name": "tags", "type": {"type": "map", "values": "boolean"}}]}"#;

    #[test]
    fn a_schema_that_names_a_type_again_refers_by_name() {
        assert!(refers_by_name(&Schema::parse_str(WITH_REF).unwrap()));
        assert!(!refers_by_name(&Schema::parse_str(PLAIN).unwrap()));
    }

    #[test]
    fn a_null_is_stray_wherever_the_schema_has_no_null() {
        let schema = Schema::parse_str(PLAIN).unwrap();
        let record = |text: Value, maybe: Value, item: Value, tag: Value| {
            Value::Record(vec![
                ("text".into(), text),
                ("maybe".into(), maybe),
                ("list".into(), Value::Array(vec![Value::String("a".into()), item])),
                ("tags".into(), Value::Map([("k".to_owned(), tag)].into())),
            ])
        };
        let (s, b) = (|| Value::String("s".into()), || Value::Boolean(true));
        let none = || Value::Union(0, Box::new(Value::Null));
        assert!(!stray_null(&record(s(), none(), s(), b()), &schema));
        assert!(!stray_null(
            &record(s(), Value::Union(1, Box::new(s())), s(), b()),
            &schema
        ));
        assert!(stray_null(&record(Value::Null, none(), s(), b()), &schema));
        assert!(stray_null(
            &record(s(), Value::Union(1, Box::new(Value::Null)), s(), b()),
            &schema
        ));
        assert!(stray_null(&record(s(), none(), Value::Null, b()), &schema));
        assert!(stray_null(&record(s(), none(), s(), Value::Null), &schema));
        assert!(stray_null(
            &record(s(), Value::Union(7, Box::new(s())), s(), b()),
            &schema
        ));
    }

    #[test]
    fn a_string_cut_short_decodes_as_a_stray_null() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "Last", "fields": [
                {"name": "n", "type": "long"}, {"name": "text", "type": "string"}]}"#,
        )
        .unwrap();
        let value = Value::Record(vec![
            ("n".into(), Value::Long(1)),
            ("text".into(), Value::String("some text".into())),
        ]);
        let payload = apache_avro::to_avro_datum(&schema, value.clone()).unwrap();
        let decode = |bytes: &[u8]| {
            apache_avro::from_avro_datum_reader_schemata(
                &schema,
                Vec::new(),
                &mut &bytes[..],
                None,
                Vec::new(),
            )
            .unwrap()
        };
        assert_eq!(decode(&payload), value);
        assert!(!stray_null(&decode(&payload), &schema));
        let cut = decode(&payload[..payload.len() - 3]);
        assert!(stray_null(&cut, &schema), "{cut:?}");
    }
}
