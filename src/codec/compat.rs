//! Compatibility of a subject's versions under its mode (SPEC §4), by Avro schema resolution.
//!
//! BACKWARD: a reader with the newer version reads data written with the older one. FORWARD: a
//! reader with the older version reads data written with the newer one. FULL: both. The plain
//! modes check each version against the previous one; the TRANSITIVE modes against every earlier
//! one (so v1→v2 and v2→v3 can pass while v1→v3 fails).

use super::registry::{SchemaVersion, Subject};
use apache_avro::error::CompatibilityError;
use apache_avro::schema_compatibility::SchemaCompatibility;
use std::fmt;

/// Which direction of reading failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The newer version cannot read data of the older one.
    Backward,
    /// The older version cannot read data of the newer one.
    Forward,
}

impl Rule {
    fn as_str(self) -> &'static str {
        match self {
            Rule::Backward => "BACKWARD: the newer version cannot read data written with the older",
            Rule::Forward => "FORWARD: the older version cannot read data written with the newer",
        }
    }
}

/// One incompatible pair of versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatibility {
    pub subject: String,
    pub older: String,
    pub newer: String,
    pub rule: Rule,
    /// The field where reading fails, as a dotted path from the record root (empty at the root).
    pub field: String,
    pub detail: String,
}

impl fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = if self.field.is_empty() {
            "the record itself".to_owned()
        } else {
            format!("field `{}`", self.field)
        };
        write!(
            f,
            "subject {}: {} → {} breaks {}: {field}: {}",
            self.subject,
            self.older,
            self.newer,
            self.rule.as_str(),
            self.detail
        )
    }
}

/// Every incompatible pair of `subject`'s versions under its mode; empty when it holds.
pub fn check(subject: &Subject) -> Vec<Incompatibility> {
    let mode = subject.compatibility;
    let mut found = Vec::new();
    for (n, newer) in subject.versions.iter().enumerate().skip(1) {
        let earlier = if mode.is_transitive() { 0..n } else { n - 1..n };
        for older in &subject.versions[earlier] {
            if mode.requires_backward() {
                found.extend(pair(subject, older, newer, Rule::Backward));
            }
            if mode.requires_forward() {
                found.extend(pair(subject, older, newer, Rule::Forward));
            }
        }
    }
    found
}

fn pair(
    subject: &Subject,
    older: &SchemaVersion,
    newer: &SchemaVersion,
    rule: Rule,
) -> Option<Incompatibility> {
    let (writer, reader) = match rule {
        Rule::Backward => (&older.schema, &newer.schema),
        Rule::Forward => (&newer.schema, &older.schema),
    };
    let error = SchemaCompatibility::can_read(writer, reader).err()?;
    let (field, detail) = locate(&error);
    Some(Incompatibility {
        subject: subject.name.clone(),
        older: older.version.clone(),
        newer: newer.version.clone(),
        rule,
        field,
        detail,
    })
}

/// Follows nested field mismatches down to the field that fails, and says why it fails there.
fn locate(error: &CompatibilityError) -> (String, String) {
    let mut path = Vec::new();
    let mut current = error;
    while let CompatibilityError::FieldTypeMismatch(field, inner) = current {
        path.push(field.clone());
        current = inner;
    }
    if let CompatibilityError::MissingDefaultValue(field) = current {
        path.push(field.clone());
        let detail = "the reader has it without a default, the writer does not have it".to_owned();
        return (path.join("."), detail);
    }
    (path.join("."), current.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::registry::Compatibility;
    use apache_avro::Schema;

    fn record(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type": "record", "name": "R", "fields": [{fields}]}}"#
        ))
        .unwrap()
    }

    fn subject(mode: Compatibility, schemas: &[Schema]) -> Subject {
        Subject {
            name: "test.R".into(),
            compatibility: mode,
            versions: schemas
                .iter()
                .enumerate()
                .map(|(i, schema)| SchemaVersion {
                    version: format!("v{}", i + 1),
                    file: format!("R.v{}.avsc", i + 1),
                    schema: schema.clone(),
                })
                .collect(),
        }
    }

    const A: &str = r#"{"name": "a", "type": "string"}"#;
    const B_DEFAULT: &str = r#"{"name": "b", "type": "string", "default": "x"}"#;
    const B_REQUIRED: &str = r#"{"name": "b", "type": "string"}"#;
    const C_REQUIRED: &str = r#"{"name": "c", "type": "long"}"#;

    #[test]
    fn a_field_with_a_default_is_fully_compatible() {
        let versions = [record(A), record(&format!("{A}, {B_DEFAULT}"))];
        for mode in [
            Compatibility::Backward,
            Compatibility::Forward,
            Compatibility::Full,
        ] {
            assert_eq!(check(&subject(mode, &versions)), vec![], "{mode}");
        }
    }

    #[test]
    fn a_required_field_added_breaks_backward_only() {
        let versions = [record(A), record(&format!("{A}, {B_REQUIRED}"))];
        let problems = check(&subject(Compatibility::Backward, &versions));
        assert_eq!(problems.len(), 1);
        assert_eq!(
            (problems[0].rule, problems[0].field.as_str()),
            (Rule::Backward, "b")
        );
        assert_eq!(
            (problems[0].older.as_str(), problems[0].newer.as_str()),
            ("v1", "v2")
        );
        assert_eq!(check(&subject(Compatibility::Forward, &versions)), vec![]);
        assert_eq!(check(&subject(Compatibility::Full, &versions)).len(), 1);
    }

    #[test]
    fn a_required_field_removed_breaks_forward_only() {
        let versions = [record(&format!("{A}, {C_REQUIRED}")), record(A)];
        let problems = check(&subject(Compatibility::Forward, &versions));
        assert_eq!(problems.len(), 1);
        assert_eq!(
            (problems[0].rule, problems[0].field.as_str()),
            (Rule::Forward, "c")
        );
        assert_eq!(check(&subject(Compatibility::Backward, &versions)), vec![]);
        assert_eq!(check(&subject(Compatibility::FullTransitive, &versions)).len(), 1);
    }

    #[test]
    fn transitive_modes_check_every_earlier_version() {
        // v1 → v2 adds b with a default, v2 → v3 drops the default: each step reads the previous
        // one's data, but v3 cannot read v1's.
        let versions = [
            record(A),
            record(&format!("{A}, {B_DEFAULT}")),
            record(&format!("{A}, {B_REQUIRED}")),
        ];
        assert_eq!(check(&subject(Compatibility::Backward, &versions)), vec![]);
        let problems = check(&subject(Compatibility::BackwardTransitive, &versions));
        assert_eq!(problems.len(), 1);
        assert_eq!(
            (problems[0].older.as_str(), problems[0].newer.as_str()),
            ("v1", "v3")
        );
        let message = problems[0].to_string();
        assert!(
            message.contains("test.R") && message.contains("v1 → v3") && message.contains("`b`"),
            "{message}"
        );
    }

    #[test]
    fn a_nested_type_change_names_the_field_path() {
        let nested = |t: &str| {
            record(&format!(
                r#"{{"name": "data", "type": {{"type": "record", "name": "D", "fields": [{{"name": "x", "type": "{t}"}}]}}}}"#
            ))
        };
        let problems = check(&subject(
            Compatibility::Backward,
            &[nested("long"), nested("string")],
        ));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field, "data.x");
        // Promotions are compatible: int data read as long.
        assert_eq!(
            check(&subject(
                Compatibility::Backward,
                &[nested("int"), nested("long")]
            )),
            vec![]
        );
    }
}
