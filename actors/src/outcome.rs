//! What applying one event did: applied, skipped as a duplicate or a redelivery, or rejected
//! with a reason.

use serde::{Deserialize, Serialize};

/// Why an event was not applied. The `as_str` values are metric labels and dead-letter reasons;
/// [`RejectReason::ALL`] lists every variant (derived, so a new reason is never left out of the
/// counters registered at 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, strum::VariantArray)]
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
    /// Every reason, in declaration order.
    pub const ALL: &'static [RejectReason] = <RejectReason as strum::VariantArray>::VARIANTS;

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
    /// Seen before within the idempotency window with the same content, from another message (a
    /// partner sent the event twice): nothing to do.
    Duplicate,
    /// Seen before within the idempotency window, from this very message
    /// ([`Incoming::delivery`](crate::Incoming::delivery)): the broker delivered it again (after a
    /// crash, a lost ack, a reset subscription). Nothing to do.
    Redelivered,
    Rejected(Rejection),
}

impl Outcome {
    /// Stable label value for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Redelivered => "redelivered",
            Outcome::Rejected(_) => "rejected",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_reason_has_its_own_label_and_serializes_as_it() {
        let labels: HashSet<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), RejectReason::ALL.len(), "labels are unique");
        for reason in RejectReason::ALL {
            assert_eq!(
                serde_json::to_value(reason).unwrap(),
                serde_json::Value::from(reason.as_str())
            );
        }
    }
}
