//! Output (integration) events an aggregate emits; they leave through the outbox.

use crate::campaign::Campaign;
use crate::events::ReportVersion;
use crate::money::Money;
use crate::snapshot::Snapshot;
use serde::{Deserialize, Serialize};

/// Budget consumption thresholds: each is emitted once per campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AlertLevel {
    #[serde(rename = "WARNING")]
    Warning,
    #[serde(rename = "CRITICAL")]
    Critical,
    #[serde(rename = "EXHAUSTED")]
    Exhausted,
}

impl AlertLevel {
    pub const ALL: [AlertLevel; 3] = [AlertLevel::Warning, AlertLevel::Critical, AlertLevel::Exhausted];

    /// Threshold in percent of the budget.
    pub fn percent(self) -> i64 {
        match self {
            AlertLevel::Warning => 80,
            AlertLevel::Critical => 95,
            AlertLevel::Exhausted => 100,
        }
    }

    /// The highest level reached by `spend` on `budget` (both minor units), if any.
    pub fn reached(spend: i64, budget: i64) -> Option<AlertLevel> {
        AlertLevel::ALL
            .into_iter()
            .rev()
            .find(|level| i128::from(spend) * 100 >= i128::from(budget) * i128::from(level.percent()))
    }

    pub fn wire_name(self) -> &'static str {
        match self {
            AlertLevel::Warning => "WARNING",
            AlertLevel::Critical => "CRITICAL",
            AlertLevel::Exhausted => "EXHAUSTED",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputBody {
    /// `BudgetAlert`
    BudgetAlert {
        campaign_id: String,
        level: AlertLevel,
        budget: Money,
        spend_minor: i64,
    },
    /// `ComisionCalculada`
    CommissionCalculated {
        affiliate_id: String,
        campaign_id: String,
        conversion_event_id: String,
        commission: Money,
    },
    /// `PagoExitoso`
    PaymentSucceeded {
        payment_id: String,
        affiliate_id: String,
        amount: Money,
    },
    /// `PagoFallido`
    PaymentFailed {
        payment_id: String,
        affiliate_id: String,
        amount: Money,
    },
    /// `CampanaEstadoCompleto`: a campaign's full-state snapshot, for the state topic.
    CampaignState { snapshot: Box<Snapshot<Campaign>> },
    /// `ReporteGenerado`: the answer to a `ReporteSolicitado`, the report as JSON.
    ReportGenerated {
        request_id: String,
        version: ReportVersion,
        report_json: String,
    },
}

impl OutputBody {
    pub fn wire_type(&self) -> &'static str {
        match self {
            OutputBody::BudgetAlert { .. } => "BudgetAlert",
            OutputBody::CommissionCalculated { .. } => "ComisionCalculada",
            OutputBody::PaymentSucceeded { .. } => "PagoExitoso",
            OutputBody::PaymentFailed { .. } => "PagoFallido",
            OutputBody::CampaignState { .. } => "CampanaEstadoCompleto",
            OutputBody::ReportGenerated { .. } => "ReporteGenerado",
        }
    }

    /// The message key: the aggregate the output is about.
    pub fn key(&self) -> &str {
        match self {
            OutputBody::BudgetAlert { campaign_id, .. } => campaign_id,
            OutputBody::CommissionCalculated { affiliate_id, .. } => affiliate_id,
            OutputBody::PaymentSucceeded { payment_id, .. }
            | OutputBody::PaymentFailed { payment_id, .. } => payment_id,
            OutputBody::CampaignState { snapshot } => &snapshot.state.id,
            OutputBody::ReportGenerated { request_id, .. } => request_id,
        }
    }
}

/// An output event with an id derived from its cause, so a re-publish is itself deduplicable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputEvent {
    pub id: String,
    /// The input event id that caused it (CloudEvents `causationid`).
    pub causation_id: String,
    pub correlation_id: Option<String>,
    pub time_ms: i64,
    pub body: OutputBody,
}

impl OutputEvent {
    /// Derives the output id from the cause and a discriminator (UUID v5), so it is stable across retries.
    pub fn derived(cause: &crate::events::Envelope, discriminator: &str, body: OutputBody) -> Self {
        let name = format!("{}/{}/{}", cause.id, body.wire_type(), discriminator);
        OutputEvent {
            id: uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string(),
            causation_id: cause.id.clone(),
            correlation_id: cause.correlation_id.clone(),
            time_ms: cause.time_ms,
            body,
        }
    }
}
