//! Structured-mode CloudEvents JSON → the Avro payload of the same event (the event collector).
//!
//! The JSON event's attributes are the top-level fields of the event's record and its `data` is
//! the body, so one walk over the writer schema checks the whole event and names the first field
//! that is missing, unknown or of the wrong type (`data.monto.moneda`). The payload is then decoded
//! back like any consumed message, so the collector accepts exactly what the consumers accept.

use super::{Codec, DecodeError, Encoded, WireType};
use aerostream_actors::Incoming;
use apache_avro::schema::{Name, ResolvedSchema, Schema};
use apache_avro::types::Value;
use serde_json::Value as Json;
use std::collections::HashMap;

/// CloudEvents attributes that carry no event content: accepted and not written.
const TRANSPORT_ATTRIBUTES: [&str; 2] = ["datacontenttype", "dataschema"];
/// The spec version structured-mode events must declare.
const SPEC_VERSION: &str = "1.0";

impl Codec {
    /// Validates one structured-mode CloudEvent and encodes it as its Avro payload; also returns
    /// the event as the daemon will see it.
    pub fn encode_json(&self, event: &Json) -> Result<(Encoded, Incoming), DecodeError> {
        let Json::Object(attributes) = event else {
            return Err(invalid("", "an event must be a JSON object"));
        };
        let text = |name: &str| match attributes.get(name) {
            None | Some(Json::Null) => Err(DecodeError::MissingField { field: name.into() }),
            Some(Json::String(s)) => Ok(s.as_str()),
            Some(_) => Err(invalid(name, "expected a string")),
        };
        if text("specversion")? != SPEC_VERSION {
            return Err(invalid("specversion", "expected \"1.0\""));
        }
        let event_type = text("type")?;
        let wire = WireType::from_name(event_type)
            .filter(|wire| !wire.is_output())
            .ok_or_else(|| DecodeError::UnknownEventType {
                event_type: event_type.to_owned(),
                detail: "not an input event type of aerostream".into(),
            })?;
        let subject = self
            .registry()
            .subject(wire.subject())
            .ok_or_else(|| DecodeError::UnknownSchema {
                detail: format!("{} is not in the schema registry", wire.subject()),
            })?;
        // The writer version: `schema_version`, else the version `dataschema` names, else the latest.
        let named = attributes
            .get("schema_version")
            .and_then(Json::as_str)
            .or_else(|| {
                attributes
                    .get("dataschema")
                    .and_then(Json::as_str)
                    .and_then(|d| d.rsplit_once('/'))
                    .map(|(_, version)| version)
            });
        let writer = match named {
            None => subject.latest(),
            Some(version) => subject
                .version(version)
                .ok_or_else(|| DecodeError::UnknownSchema {
                    detail: format!("{} has no version {version:?}", wire.subject()),
                })?,
        };
        let mut record = attributes.clone();
        for attribute in TRANSPORT_ATTRIBUTES {
            record.remove(attribute);
        }
        // CloudEvents extension names are lowercase alphanumerics: `idempotencykey` is accepted
        // for the envelope's `idempotency_key`.
        if let Some(key) = record.remove("idempotencykey") {
            record.entry("idempotency_key").or_insert(key);
        }
        record
            .entry("schema_version")
            .or_insert_with(|| Json::String(writer.version.clone()));
        let resolved = ResolvedSchema::try_from(&writer.schema).map_err(|e| DecodeError::UnknownSchema {
            detail: format!("{}: {e}", wire.subject()),
        })?;
        let walker = Walker {
            names: resolved.get_names(),
        };
        let value = walker.value(&writer.schema, &Json::Object(record), "")?;
        let dataschema = subject.dataschema(writer);
        let invalid_avro = |detail: String| DecodeError::InvalidAvro {
            dataschema: dataschema.clone(),
            detail,
        };
        let value = value
            .resolve(&writer.schema)
            .map_err(|e| invalid_avro(e.to_string()))?;
        let payload =
            apache_avro::to_avro_datum(&writer.schema, value).map_err(|e| invalid_avro(e.to_string()))?;
        let incoming = self.decode(Some(&dataschema), &payload)?;
        let encoded = Encoded {
            payload,
            dataschema,
            event_type: wire.name(),
            key: incoming.aggregate().id,
        };
        Ok((encoded, incoming))
    }
}

fn invalid(field: &str, detail: &str) -> DecodeError {
    DecodeError::InvalidField {
        field: field.to_owned(),
        detail: detail.to_owned(),
    }
}

fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// Walks a schema and a JSON value together.
struct Walker<'s> {
    names: &'s HashMap<Name, &'s Schema>,
}

impl Walker<'_> {
    fn value(&self, schema: &Schema, json: &Json, path: &str) -> Result<Value, DecodeError> {
        let wrong = |expected: &str| {
            let detail = format!("expected {expected}, got {}", kind(json));
            Err(DecodeError::InvalidField {
                field: path.to_owned(),
                detail,
            })
        };
        match (schema, json) {
            (Schema::Ref { name }, _) => match self.names.get(name) {
                Some(schema) => self.value(schema, json, path),
                None => Err(invalid(path, &format!("schema refers to unknown type {name}"))),
            },
            (Schema::Null, Json::Null) => Ok(Value::Null),
            (Schema::Boolean, Json::Bool(b)) => Ok(Value::Boolean(*b)),
            (Schema::String, Json::String(s)) => Ok(Value::String(s.clone())),
            (Schema::Int, Json::Number(n)) => match n.as_i64().and_then(|n| i32::try_from(n).ok()) {
                Some(n) => Ok(Value::Int(n)),
                None => wrong("a 32-bit integer"),
            },
            (Schema::Long, Json::Number(n)) => match n.as_i64() {
                Some(n) => Ok(Value::Long(n)),
                None => wrong("an integer"),
            },
            (Schema::Double, Json::Number(n)) => Ok(Value::Double(n.as_f64().unwrap_or_default())),
            (Schema::Float, Json::Number(n)) => Ok(Value::Float(n.as_f64().unwrap_or_default() as f32)),
            (Schema::TimestampMillis, Json::Number(n)) => match n.as_i64() {
                Some(ms) => Ok(Value::TimestampMillis(ms)),
                None => wrong("milliseconds since the epoch"),
            },
            (Schema::TimestampMillis, Json::String(s)) => match chrono::DateTime::parse_from_rfc3339(s) {
                Ok(time) => Ok(Value::TimestampMillis(time.timestamp_millis())),
                Err(e) => Err(invalid(path, &format!("expected an RFC 3339 time: {e}"))),
            },
            (Schema::Array(array), Json::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| self.value(&array.items, item, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()
                .map(Value::Array),
            (Schema::Map(map), Json::Object(entries)) => entries
                .iter()
                .map(|(key, item)| Ok((key.clone(), self.value(&map.types, item, &child(path, key))?)))
                .collect::<Result<_, _>>()
                .map(Value::Map),
            (Schema::Enum(e), Json::String(s)) => match e.symbols.iter().position(|symbol| symbol == s) {
                Some(index) => Ok(Value::Enum(index as u32, s.clone())),
                None => wrong(&format!("one of {:?}", e.symbols)),
            },
            (Schema::Union(union), _) => {
                let branches = union.variants();
                if json.is_null() {
                    return match branches.iter().position(|b| matches!(b, Schema::Null)) {
                        Some(index) => Ok(Value::Union(index as u32, Box::new(Value::Null))),
                        None => wrong("a value"),
                    };
                }
                let mut first_error = None;
                for (index, branch) in branches
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| !matches!(b, Schema::Null))
                {
                    match self.value(branch, json, path) {
                        Ok(value) => return Ok(Value::Union(index as u32, Box::new(value))),
                        Err(error) => {
                            first_error.get_or_insert(error);
                        }
                    }
                }
                Err(first_error.unwrap_or_else(|| invalid(path, "no branch of the union matches")))
            }
            (Schema::Record(record), Json::Object(fields)) => {
                if let Some(unknown) = fields.keys().find(|name| !record.lookup.contains_key(*name)) {
                    return Err(invalid(&child(path, unknown), "unknown field"));
                }
                let mut values = Vec::with_capacity(record.fields.len());
                for field in &record.fields {
                    match fields.get(&field.name) {
                        Some(json) => values.push((
                            field.name.clone(),
                            self.value(&field.schema, json, &child(path, &field.name))?,
                        )),
                        // Resolution fills in the default afterwards.
                        None if field.default.is_some() => {}
                        None => {
                            return Err(DecodeError::MissingField {
                                field: child(path, &field.name),
                            })
                        }
                    }
                }
                Ok(Value::Record(values))
            }
            (Schema::Record(_), _) => wrong("an object"),
            (Schema::Map(_), _) => wrong("an object of values"),
            (Schema::Array(_), _) => wrong("an array"),
            (Schema::String | Schema::Enum(_), _) => wrong("a string"),
            (Schema::Int | Schema::Long | Schema::Double | Schema::Float, _) => wrong("a number"),
            (Schema::TimestampMillis, _) => wrong("an RFC 3339 time or milliseconds since the epoch"),
            (Schema::Boolean, _) => wrong("a boolean"),
            (Schema::Null, _) => wrong("null"),
            (other, _) => Err(invalid(
                path,
                &format!("schema type {other:?} is not supported in JSON"),
            )),
        }
    }
}

fn kind(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn click() -> Json {
        json!({
            "specversion": "1.0",
            "id": "evt-1",
            "type": "ClickRegistrado",
            "source": "partner/acme",
            "time": "2026-11-24T10:00:00Z",
            "datacontenttype": "application/json",
            "data": { "id_campana": "c1", "id_afiliado": "a1" }
        })
    }

    fn field_error(event: Json) -> String {
        match Codec::shipped().encode_json(&event) {
            Ok(_) => panic!("accepted {event}"),
            Err(DecodeError::MissingField { field } | DecodeError::InvalidField { field, .. }) => field,
            Err(other) => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn a_valid_event_round_trips_through_avro() {
        let (encoded, incoming) = Codec::shipped().encode_json(&click()).unwrap();
        assert_eq!(encoded.dataschema, "com.aeropartners.tracking.ClickRegistrado/v1");
        assert_eq!(encoded.key, "c1");
        assert_eq!(incoming.envelope.id, "evt-1");
        assert_eq!(incoming.envelope.time_ms, 1_795_514_400_000);
        let decoded = Codec::shipped()
            .decode(Some(&encoded.dataschema), &encoded.payload)
            .unwrap();
        assert_eq!(decoded, incoming);
    }

    #[test]
    fn errors_name_the_field() {
        let mut missing = click();
        missing["data"].as_object_mut().unwrap().remove("id_afiliado");
        assert_eq!(field_error(missing), "data.id_afiliado");
        let mut wrong_type = click();
        wrong_type["data"]["id_campana"] = json!(7);
        assert_eq!(field_error(wrong_type), "data.id_campana");
        let mut unknown = click();
        unknown["data"]["colour"] = json!("red");
        assert_eq!(field_error(unknown), "data.colour");
        let mut bad_time = click();
        bad_time["time"] = json!("yesterday");
        assert_eq!(field_error(bad_time), "time");
    }

    #[test]
    fn business_rules_apply_as_for_consumed_events() {
        let payment = json!({
            "specversion": "1.0", "id": "evt-2", "type": "PagoSolicitado", "source": "s",
            "time": 1_700_000_000_000_i64,
            "data": { "id_pago": "p1", "id_afiliado": "a1",
                      "monto": { "monto_centavos": -5, "moneda": "USD" } }
        });
        let error = Codec::shipped().encode_json(&payment).unwrap_err();
        assert_eq!(error.reason(), "invalid_money", "{error}");
    }

    #[test]
    fn output_types_are_refused() {
        let mut output = click();
        output["type"] = json!("PagoExitoso");
        let error = Codec::shipped().encode_json(&output).unwrap_err();
        assert_eq!(error.reason(), "unknown_event_type");
    }
}
