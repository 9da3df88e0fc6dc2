//! What applying one event did: applied, skipped as a duplicate, or rejected with a reason.

use serde::{Deserialize, Serialize};

/// Why an event was not applied. The `as_str` values are metric labels and dead-letter reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    UnknownCampaign,
    CampaignExists,
    CampaignCompleted,
    InvalidTransition,
    CurrencyMismatch,
    InvalidMoney,
    PaymentAlreadyFinal,
    AmountMismatch,
    IdempotencyKeyReused,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::UnknownCampaign,
        RejectReason::CampaignExists,
        RejectReason::CampaignCompleted,
        RejectReason::InvalidTransition,
        RejectReason::CurrencyMismatch,
        RejectReason::InvalidMoney,
        RejectReason::PaymentAlreadyFinal,
        RejectReason::AmountMismatch,
        RejectReason::IdempotencyKeyReused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::UnknownCampaign => "unknown_campaign",
            RejectReason::CampaignExists => "campaign_exists",
            RejectReason::CampaignCompleted => "campaign_completed",
            RejectReason::InvalidTransition => "invalid_transition",
            RejectReason::CurrencyMismatch => "currency_mismatch",
            RejectReason::InvalidMoney => "invalid_money",
            RejectReason::PaymentAlreadyFinal => "payment_already_final",
            RejectReason::AmountMismatch => "amount_mismatch",
            RejectReason::IdempotencyKeyReused => "idempotency_key_reused",
        }
    }
}

/// A business-rule rejection: the state is unchanged and the event goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// State changed and committed together with the idempotency record and `outputs` outbox entries.
    Applied {
        outputs: usize,
    },
    /// Seen before within the idempotency window with the same content: nothing to do.
    Duplicate,
    Rejected(Rejection),
}

impl Outcome {
    /// Stable label value for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Rejected(_) => "rejected",
        }
    }
}
