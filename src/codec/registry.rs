//! The schema registry: `schemas/manifest.toml` and every `.avsc` it lists, parsed and checked.
//!
//! A subject is a record full name (`com.aeropartners.idempotencia.PagoProcesado`) with a
//! compatibility mode and its versions, oldest first. A writer schema is addressed as
//! `<subject>/<version>` (the `ce_dataschema` property); the reader schema of a subject is its latest
//! version. Loading fails with a [`SchemaError`] naming the file and the problem, so a broken schema
//! stops the daemon at start (SPEC §4).

use apache_avro::Schema;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// The manifest's file name inside the schema directory.
pub const MANIFEST_FILE: &str = "manifest.toml";

/// Top-level fields every schema must have: the CloudEvents envelope and the body (SPEC §3).
pub const ENVELOPE_FIELDS: [&str; 11] = [
    "id",
    "type",
    "source",
    "time",
    "specversion",
    "subject",
    "correlationid",
    "causationid",
    "schema_version",
    "idempotency_key",
    "data",
];

const SHIPPED_MANIFEST: &str = include_str!("../../schemas/manifest.toml");

/// The shipped `schemas/` directory, file by file. A test checks it matches the directory.
const SHIPPED_FILES: [(&str, &str); 20] = [
    (
        "BudgetAlert.v1.avsc",
        include_str!("../../schemas/BudgetAlert.v1.avsc"),
    ),
    (
        "CampanaActivada.v1.avsc",
        include_str!("../../schemas/CampanaActivada.v1.avsc"),
    ),
    (
        "CampanaCompletada.v1.avsc",
        include_str!("../../schemas/CampanaCompletada.v1.avsc"),
    ),
    (
        "CampanaCreada.v1.avsc",
        include_str!("../../schemas/CampanaCreada.v1.avsc"),
    ),
    (
        "CampanaEstadoCompleto.v1.avsc",
        include_str!("../../schemas/CampanaEstadoCompleto.v1.avsc"),
    ),
    (
        "CampanaPausada.v1.avsc",
        include_str!("../../schemas/CampanaPausada.v1.avsc"),
    ),
    (
        "ClickRegistrado.v1.avsc",
        include_str!("../../schemas/ClickRegistrado.v1.avsc"),
    ),
    (
        "ComisionCalculada.v1.avsc",
        include_str!("../../schemas/ComisionCalculada.v1.avsc"),
    ),
    (
        "ConversionRegistrada.v1.avsc",
        include_str!("../../schemas/ConversionRegistrada.v1.avsc"),
    ),
    (
        "ImpresionRegistrada.v1.avsc",
        include_str!("../../schemas/ImpresionRegistrada.v1.avsc"),
    ),
    (
        "PagoExitoso.v1.avsc",
        include_str!("../../schemas/PagoExitoso.v1.avsc"),
    ),
    (
        "PagoFallido.v1.avsc",
        include_str!("../../schemas/PagoFallido.v1.avsc"),
    ),
    (
        "PagoProcesado.v1.avsc",
        include_str!("../../schemas/PagoProcesado.v1.avsc"),
    ),
    (
        "PagoProcesado.v2.avsc",
        include_str!("../../schemas/PagoProcesado.v2.avsc"),
    ),
    (
        "PagoSolicitado.v1.avsc",
        include_str!("../../schemas/PagoSolicitado.v1.avsc"),
    ),
    (
        "PresupuestoActualizado.v1.avsc",
        include_str!("../../schemas/PresupuestoActualizado.v1.avsc"),
    ),
    (
        "ReporteGenerado.v1.avsc",
        include_str!("../../schemas/ReporteGenerado.v1.avsc"),
    ),
    (
        "ReporteSolicitado.v1.avsc",
        include_str!("../../schemas/ReporteSolicitado.v1.avsc"),
    ),
    (
        "ReporteSolicitado.v2.avsc",
        include_str!("../../schemas/ReporteSolicitado.v2.avsc"),
    ),
    (
        "VersionReporteCambiada.v1.avsc",
        include_str!("../../schemas/VersionReporteCambiada.v1.avsc"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    // The cause is the source, shown once by whoever prints the chain.
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: invalid manifest: {detail}")]
    Manifest { file: String, detail: String },
    #[error("{file}: {detail}")]
    Schema { file: String, detail: String },
    #[error("subject {subject}: {detail}")]
    Subject { subject: String, detail: String },
}

/// How the versions of a subject must relate (the Confluent/Pulsar names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Compatibility {
    /// A reader with the new version reads data written with the previous one.
    Backward,
    /// A reader with the previous version reads data written with the new one.
    Forward,
    /// Both backward and forward.
    Full,
    BackwardTransitive,
    ForwardTransitive,
    FullTransitive,
}

impl Compatibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Compatibility::Backward => "BACKWARD",
            Compatibility::Forward => "FORWARD",
            Compatibility::Full => "FULL",
            Compatibility::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Compatibility::ForwardTransitive => "FORWARD_TRANSITIVE",
            Compatibility::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// Newer versions must read data of older ones.
    pub fn requires_backward(self) -> bool {
        !matches!(self, Compatibility::Forward | Compatibility::ForwardTransitive)
    }

    /// Older versions must read data of newer ones.
    pub fn requires_forward(self) -> bool {
        !matches!(self, Compatibility::Backward | Compatibility::BackwardTransitive)
    }

    /// Checked against every earlier version, not only the previous one.
    pub fn is_transitive(self) -> bool {
        matches!(
            self,
            Compatibility::BackwardTransitive
                | Compatibility::ForwardTransitive
                | Compatibility::FullTransitive
        )
    }
}

impl fmt::Display for Compatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One parsed version of a subject.
#[derive(Debug, Clone)]
pub struct SchemaVersion {
    /// `v1`, `v2`, …
    pub version: String,
    /// File name inside the schema directory, such as `PagoProcesado.v1.avsc`.
    pub file: String,
    pub schema: Schema,
}

/// A subject: one record full name, its compatibility mode and its versions, oldest first.
#[derive(Debug, Clone)]
pub struct Subject {
    pub name: String,
    pub compatibility: Compatibility,
    /// Never empty; the last one is the reader schema.
    pub versions: Vec<SchemaVersion>,
}

impl Subject {
    pub fn latest(&self) -> &SchemaVersion {
        self.versions
            .last()
            .expect("the registry never holds a subject without versions")
    }

    pub fn version(&self, version: &str) -> Option<&SchemaVersion> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// `<subject>/<version>`, the `ce_dataschema` naming that version.
    pub fn dataschema(&self, version: &SchemaVersion) -> String {
        format!("{}/{}", self.name, version.version)
    }
}

/// Every subject of a schema directory, parsed and checked.
#[derive(Debug, Clone)]
pub struct SchemaRegistry {
    /// In manifest order.
    subjects: Vec<Subject>,
    by_name: HashMap<String, usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    subject: Vec<ManifestSubject>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestSubject {
    name: String,
    compatibility: Compatibility,
    versions: Vec<ManifestVersion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestVersion {
    version: String,
    file: String,
}

impl SchemaRegistry {
    /// Loads `dir/manifest.toml` and every schema it lists. Every `.avsc` in `dir` must be listed.
    pub fn load(dir: &Path) -> Result<SchemaRegistry, SchemaError> {
        let read =
            |path: PathBuf| std::fs::read_to_string(&path).map_err(|source| SchemaError::Io { path, source });
        let manifest = read(dir.join(MANIFEST_FILE))?;
        let entries = std::fs::read_dir(dir).map_err(|source| SchemaError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let mut files = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|source| SchemaError::Io {
                path: dir.to_owned(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".avsc") {
                files.insert(name, read(entry.path())?);
            }
        }
        SchemaRegistry::from_sources(&manifest, &files)
    }

    /// The schemas shipped in the binary (the repository's `schemas/`, embedded at compile time).
    pub fn shipped() -> SchemaRegistry {
        let files = SHIPPED_FILES
            .iter()
            .map(|(name, text)| ((*name).to_owned(), (*text).to_owned()))
            .collect();
        SchemaRegistry::from_sources(SHIPPED_MANIFEST, &files)
            .unwrap_or_else(|error| panic!("the shipped schemas are broken: {error}"))
    }

    /// Builds the registry from the manifest text and the `.avsc` files by name.
    fn from_sources(manifest: &str, files: &BTreeMap<String, String>) -> Result<SchemaRegistry, SchemaError> {
        let manifest: Manifest = toml::from_str(manifest).map_err(|e| SchemaError::Manifest {
            file: MANIFEST_FILE.to_owned(),
            detail: e.to_string(),
        })?;
        let mut listed = BTreeSet::new();
        let mut subjects = Vec::with_capacity(manifest.subject.len());
        let mut by_name = HashMap::new();
        for entry in manifest.subject {
            let subject_error = |detail: String| SchemaError::Subject {
                subject: entry.name.clone(),
                detail,
            };
            if by_name.contains_key(&entry.name) {
                return Err(subject_error("listed twice in the manifest".into()));
            }
            if entry.versions.is_empty() {
                return Err(subject_error("has no versions".into()));
            }
            let mut previous: Option<(u32, &str)> = None;
            for version in &entry.versions {
                let number = version_number(&version.version).ok_or_else(|| {
                    subject_error(format!("version {:?} is not of the form v<N>", version.version))
                })?;
                if let Some((previous_number, previous_name)) = previous {
                    if previous_number >= number {
                        return Err(subject_error(format!(
                            "versions must be listed oldest first: {} after {previous_name}",
                            version.version
                        )));
                    }
                }
                previous = Some((number, &version.version));
            }
            let mut versions = Vec::with_capacity(entry.versions.len());
            for version in entry.versions {
                if !listed.insert(version.file.clone()) {
                    return Err(SchemaError::Schema {
                        file: version.file,
                        detail: "listed more than once in the manifest".into(),
                    });
                }
                let text = files.get(&version.file).ok_or_else(|| SchemaError::Schema {
                    file: version.file.clone(),
                    detail: format!("listed in {MANIFEST_FILE} but not found"),
                })?;
                let schema = parse_schema(&entry.name, text).map_err(|detail| SchemaError::Schema {
                    file: version.file.clone(),
                    detail,
                })?;
                versions.push(SchemaVersion {
                    version: version.version,
                    file: version.file,
                    schema,
                });
            }
            by_name.insert(entry.name.clone(), subjects.len());
            subjects.push(Subject {
                name: entry.name,
                compatibility: entry.compatibility,
                versions,
            });
        }
        if let Some(unlisted) = files.keys().find(|file| !listed.contains(*file)) {
            return Err(SchemaError::Schema {
                file: unlisted.clone(),
                detail: format!("not listed in {MANIFEST_FILE}"),
            });
        }
        Ok(SchemaRegistry { subjects, by_name })
    }

    /// Every subject, in manifest order.
    pub fn subjects(&self) -> impl Iterator<Item = &Subject> {
        self.subjects.iter()
    }

    pub fn subject(&self, name: &str) -> Option<&Subject> {
        self.by_name.get(name).map(|&i| &self.subjects[i])
    }

    /// The writer schema named by a `ce_dataschema` value, `<subject>/<version>`.
    pub fn writer(&self, dataschema: &str) -> Option<&Schema> {
        let (subject, version) = dataschema.split_once('/')?;
        Some(&self.subject(subject)?.version(version)?.schema)
    }

    /// The reader schema of a subject: its latest version.
    pub fn reader(&self, subject: &str) -> Option<&Schema> {
        Some(&self.subject(subject)?.latest().schema)
    }
}

/// `v12` → 12.
fn version_number(version: &str) -> Option<u32> {
    let digits = version.strip_prefix('v')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Parses one `.avsc` and checks it is the subject's record with the envelope fields.
fn parse_schema(subject: &str, text: &str) -> Result<Schema, String> {
    let schema = Schema::parse_str(text).map_err(|e| format!("invalid Avro schema: {e}"))?;
    let Schema::Record(record) = &schema else {
        return Err("the top-level schema must be a record".into());
    };
    let name = record.name.fullname(None);
    if name != subject {
        return Err(format!(
            "record is named {name}, but the manifest lists it under subject {subject}"
        ));
    }
    for field in ENVELOPE_FIELDS {
        if !record.lookup.contains_key(field) {
            return Err(format!("missing top-level field `{field}` (SPEC §3 envelope)"));
        }
    }
    let data = &record.fields[record.lookup["data"]];
    if !matches!(data.schema, Schema::Record(_)) {
        return Err("field `data` must be a record".into());
    }
    Ok(schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped_files() -> BTreeMap<String, String> {
        SHIPPED_FILES
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect()
    }

    fn error_of(manifest: &str, files: &BTreeMap<String, String>) -> String {
        SchemaRegistry::from_sources(manifest, files)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn shipped_table_lists_exactly_the_schema_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".avsc"))
            .collect();
        let embedded: BTreeSet<String> = SHIPPED_FILES.iter().map(|(n, _)| (*n).to_owned()).collect();
        assert_eq!(on_disk, embedded);
        let loaded = SchemaRegistry::load(&dir).unwrap();
        let shipped = SchemaRegistry::shipped();
        let names = |r: &SchemaRegistry| r.subjects().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&loaded), names(&shipped));
    }

    #[test]
    fn writer_and_reader_lookup() {
        let registry = SchemaRegistry::shipped();
        let subject = "com.aeropartners.idempotencia.PagoProcesado";
        assert!(registry.writer(&format!("{subject}/v1")).is_some());
        assert!(registry.writer(&format!("{subject}/v9")).is_none());
        assert!(registry.writer(subject).is_none());
        assert!(registry.writer("com.example.Nope/v1").is_none());
        assert!(registry.reader(subject).is_some());
        assert!(registry.reader("com.example.Nope").is_none());
    }

    #[test]
    fn broken_schema_names_file_and_problem() {
        let mut files = shipped_files();
        files.insert(
            "PagoFallido.v1.avsc".into(),
            r#"{"type": "record", "name": "#.into(),
        );
        let error = error_of(SHIPPED_MANIFEST, &files);
        assert!(
            error.starts_with("PagoFallido.v1.avsc: invalid Avro schema"),
            "{error}"
        );
    }

    #[test]
    fn schema_must_match_its_subject_and_carry_the_envelope() {
        let mut files = shipped_files();
        let click = files["ClickRegistrado.v1.avsc"].clone();
        files.insert("ImpresionRegistrada.v1.avsc".into(), click);
        let error = error_of(SHIPPED_MANIFEST, &files);
        assert!(
            error.contains("ImpresionRegistrada.v1.avsc: record is named"),
            "{error}"
        );

        let mut files = shipped_files();
        let bare = r#"{"type": "record", "name": "PagoFallido", "namespace": "com.aeropartners.integracion",
                       "fields": [{"name": "id", "type": "string"}]}"#;
        files.insert("PagoFallido.v1.avsc".into(), bare.into());
        let error = error_of(SHIPPED_MANIFEST, &files);
        assert!(error.contains("missing top-level field `type`"), "{error}");
    }

    #[test]
    fn manifest_and_files_must_agree() {
        let mut files = shipped_files();
        files.insert("Extra.v1.avsc".into(), "{}".into());
        assert_eq!(
            error_of(SHIPPED_MANIFEST, &files),
            "Extra.v1.avsc: not listed in manifest.toml"
        );

        let mut files = shipped_files();
        files.remove("BudgetAlert.v1.avsc");
        assert_eq!(
            error_of(SHIPPED_MANIFEST, &files),
            "BudgetAlert.v1.avsc: listed in manifest.toml but not found"
        );

        let bad_mode = SHIPPED_MANIFEST.replacen("\"BACKWARD\"", "\"SIDEWAYS\"", 1);
        let error = error_of(&bad_mode, &shipped_files());
        assert!(error.starts_with("manifest.toml: invalid manifest"), "{error}");
        assert!(error.contains("SIDEWAYS"), "{error}");
    }

    #[test]
    fn versions_are_ordered() {
        let manifest = r#"
            [[subject]]
            name = "com.aeropartners.integracion.PagoFallido"
            compatibility = "FULL_TRANSITIVE"
            versions = [{ version = "v2", file = "a.avsc" }, { version = "v1", file = "b.avsc" }]
        "#;
        let files = shipped_files();
        assert_eq!(
            error_of(manifest, &files),
            "subject com.aeropartners.integracion.PagoFallido: versions must be listed oldest first: v1 after v2"
        );
        assert_eq!(version_number("v10"), Some(10));
        assert_eq!(version_number("v"), None);
        assert_eq!(version_number("1"), None);
        assert_eq!(version_number("v+1"), None);
    }

    #[test]
    fn compatibility_modes() {
        use Compatibility::*;
        assert!(Backward.requires_backward() && !Backward.requires_forward());
        assert!(!Forward.requires_backward() && Forward.requires_forward());
        assert!(FullTransitive.requires_backward() && FullTransitive.requires_forward());
        assert!(FullTransitive.is_transitive() && !Full.is_transitive());
        assert_eq!(BackwardTransitive.to_string(), "BACKWARD_TRANSITIVE");
    }
}
