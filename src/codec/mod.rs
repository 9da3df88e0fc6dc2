//! Avro codec: turns Pulsar payloads into domain events and domain events back into payloads.
//!
//! The wire contract (SPEC §3): a payload is the raw Avro datum (no container header, no
//! single-object marker) of a record whose top-level fields are the CloudEvents envelope and whose
//! `data` field is the event body. The writer schema is named by the message property
//! `ce_dataschema` = `<full record name>/<version>`; the codec decodes with that schema and resolves
//! the value to the subject's latest version (the reader schema), so older producers keep working.
//!
//! # Layout
//! - [`registry`]: [`SchemaRegistry`], the subjects of `schemas/manifest.toml` and their parsed
//!   versions, loaded from a directory or embedded at compile time.
//! - [`compat`]: compatibility of a subject's versions under its mode (BACKWARD, FORWARD, FULL,
//!   transitive or not).
//! - [`decode`]: payload → [`Incoming`](aerostream_actors::Incoming) / [`OutputEvent`], a consumed
//!   message's key and `ce_type` checked against its record ([`MessageMeta`]), and
//!   [`DecodeError`] with its dead-letter reason.
//! - [`encode`]: domain event / output event → [`Encoded`] payload.
//! - [`json`]: structured-mode CloudEvents JSON → [`Encoded`] payload (the event collector).
//! - this file: [`Codec`], [`WireType`] (the table of event types and their subjects).

pub mod compat;
pub mod decode;
pub mod encode;
pub mod json;
pub mod registry;

#[cfg(test)]
mod tests;

use aerostream_actors::{CampaignEvent, Event, OutputBody, PaymentEvent, ReportEvent};
use std::sync::Arc;

pub use decode::{DecodeError, DecodeReason, MessageMeta};
pub use encode::{EncodeError, Encoded};
pub use registry::{Compatibility, SchemaError, SchemaRegistry, SchemaVersion, Subject};

/// Decodes and encodes events against one schema registry. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Codec {
    registry: Arc<SchemaRegistry>,
}

impl Codec {
    pub fn new(registry: Arc<SchemaRegistry>) -> Codec {
        Codec { registry }
    }

    /// A codec over the schemas shipped in the binary.
    pub fn shipped() -> Codec {
        Codec::new(Arc::new(SchemaRegistry::shipped()))
    }

    pub fn registry(&self) -> &SchemaRegistry {
        &self.registry
    }
}

/// Every event type on the wire. Explicit table: adding an event type means adding a variant here,
/// its schema under `schemas/`, and its arms in `decode.rs` / `encode.rs` (the compiler finds them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireType {
    CampanaCreada,
    CampanaActivada,
    CampanaPausada,
    CampanaCompletada,
    PresupuestoActualizado,
    ImpresionRegistrada,
    ClickRegistrado,
    ConversionRegistrada,
    PagoSolicitado,
    PagoProcesado,
    PagoExitoso,
    PagoFallido,
    ComisionCalculada,
    BudgetAlert,
    CampanaEstadoCompleto,
    ReporteSolicitado,
    VersionReporteCambiada,
    ReporteGenerado,
}

impl WireType {
    pub const ALL: [WireType; 18] = [
        WireType::CampanaCreada,
        WireType::CampanaActivada,
        WireType::CampanaPausada,
        WireType::CampanaCompletada,
        WireType::PresupuestoActualizado,
        WireType::ImpresionRegistrada,
        WireType::ClickRegistrado,
        WireType::ConversionRegistrada,
        WireType::PagoSolicitado,
        WireType::PagoProcesado,
        WireType::PagoExitoso,
        WireType::PagoFallido,
        WireType::ComisionCalculada,
        WireType::BudgetAlert,
        WireType::CampanaEstadoCompleto,
        WireType::ReporteSolicitado,
        WireType::VersionReporteCambiada,
        WireType::ReporteGenerado,
    ];

    /// The subject: the full name of the top-level Avro record.
    pub fn subject(self) -> &'static str {
        match self {
            WireType::CampanaCreada => "com.aeropartners.campanas.CampanaCreada",
            WireType::CampanaActivada => "com.aeropartners.campanas.CampanaActivada",
            WireType::CampanaPausada => "com.aeropartners.campanas.CampanaPausada",
            WireType::CampanaCompletada => "com.aeropartners.campanas.CampanaCompletada",
            WireType::PresupuestoActualizado => "com.aeropartners.campanas.PresupuestoActualizado",
            WireType::ImpresionRegistrada => "com.aeropartners.tracking.ImpresionRegistrada",
            WireType::ClickRegistrado => "com.aeropartners.tracking.ClickRegistrado",
            WireType::ConversionRegistrada => "com.aeropartners.tracking.ConversionRegistrada",
            WireType::PagoSolicitado => "com.aeropartners.idempotencia.PagoSolicitado",
            WireType::PagoProcesado => "com.aeropartners.idempotencia.PagoProcesado",
            WireType::PagoExitoso => "com.aeropartners.integracion.PagoExitoso",
            WireType::PagoFallido => "com.aeropartners.integracion.PagoFallido",
            WireType::ComisionCalculada => "com.aeropartners.integracion.ComisionCalculada",
            WireType::BudgetAlert => "com.aeropartners.integracion.BudgetAlert",
            WireType::CampanaEstadoCompleto => "com.aeropartners.confiabilidad.CampanaEstadoCompleto",
            WireType::ReporteSolicitado => "com.aeropartners.mantenibilidad.ReporteSolicitado",
            WireType::VersionReporteCambiada => "com.aeropartners.mantenibilidad.VersionReporteCambiada",
            WireType::ReporteGenerado => "com.aeropartners.mantenibilidad.ReporteGenerado",
        }
    }

    /// The CloudEvents `type`: the record's short name, such as `PagoProcesado`.
    pub fn name(self) -> &'static str {
        let subject = self.subject();
        subject.rsplit('.').next().unwrap_or(subject)
    }

    /// Output events are published by the daemon, never consumed by it.
    pub fn is_output(self) -> bool {
        matches!(
            self,
            WireType::PagoExitoso
                | WireType::PagoFallido
                | WireType::ComisionCalculada
                | WireType::BudgetAlert
                | WireType::CampanaEstadoCompleto
                | WireType::ReporteGenerado
        )
    }

    pub fn from_name(name: &str) -> Option<WireType> {
        WireType::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn from_subject(subject: &str) -> Option<WireType> {
        WireType::ALL.into_iter().find(|t| t.subject() == subject)
    }

    pub fn of_event(event: &Event) -> WireType {
        match event {
            Event::Campaign(e) => match e {
                CampaignEvent::Created { .. } => WireType::CampanaCreada,
                CampaignEvent::Activated { .. } => WireType::CampanaActivada,
                CampaignEvent::Paused { .. } => WireType::CampanaPausada,
                CampaignEvent::Completed { .. } => WireType::CampanaCompletada,
                CampaignEvent::BudgetUpdated { .. } => WireType::PresupuestoActualizado,
                CampaignEvent::ImpressionRecorded { .. } => WireType::ImpresionRegistrada,
                CampaignEvent::ClickRecorded { .. } => WireType::ClickRegistrado,
                CampaignEvent::ConversionRecorded { .. } => WireType::ConversionRegistrada,
            },
            Event::Payment(e) => match e {
                PaymentEvent::Requested { .. } => WireType::PagoSolicitado,
                PaymentEvent::Processed { .. } => WireType::PagoProcesado,
            },
            Event::Report(e) => match e {
                ReportEvent::Requested { .. } => WireType::ReporteSolicitado,
                ReportEvent::VersionChanged { .. } => WireType::VersionReporteCambiada,
            },
        }
    }

    pub fn of_output(body: &OutputBody) -> WireType {
        match body {
            OutputBody::BudgetAlert { .. } => WireType::BudgetAlert,
            OutputBody::CommissionCalculated { .. } => WireType::ComisionCalculada,
            OutputBody::PaymentSucceeded { .. } => WireType::PagoExitoso,
            OutputBody::PaymentFailed { .. } => WireType::PagoFallido,
            OutputBody::CampaignState { .. } => WireType::CampanaEstadoCompleto,
            OutputBody::ReportGenerated { .. } => WireType::ReporteGenerado,
        }
    }
}

/// The CloudEvents `type` of an input event, such as `ClickRegistrado`.
pub fn wire_type(event: &Event) -> &'static str {
    WireType::of_event(event).name()
}

/// The subject (full record name) of an event type, such as
/// `PagoProcesado` → `com.aeropartners.idempotencia.PagoProcesado`.
pub fn subject_of(event_type: &str) -> Option<&'static str> {
    WireType::from_name(event_type).map(WireType::subject)
}
