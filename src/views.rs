//! JSON views of aggregates, as the HTTP API serves them and the generator predicts them.

use aerostream_actors::campaign::{Campaign, CampaignStatus, Metrics};
use aerostream_actors::ledger::{Amounts, CommissionLedger};
use aerostream_actors::payment::{HistoryEntry, Payment};
use aerostream_actors::{Money, PaymentStatus};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignView {
    pub id: String,
    pub name: String,
    pub status: CampaignStatus,
    pub budget: Money,
    pub spend_minor: i64,
    pub metrics: Metrics,
    pub alerts: Vec<String>,
    /// Events applied; the version of the state a snapshot would carry.
    pub version: u64,
}

impl From<&Campaign> for CampaignView {
    fn from(c: &Campaign) -> Self {
        CampaignView {
            id: c.id.clone(),
            name: c.name.clone(),
            status: c.status(),
            budget: c.budget,
            spend_minor: c.spend_minor,
            metrics: c.metrics,
            alerts: c
                .alerts_emitted
                .iter()
                .map(|a| a.wire_name().to_owned())
                .collect(),
            version: c.version,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentView {
    pub id: String,
    pub affiliate_id: String,
    pub amount: Money,
    pub status: PaymentStatus,
    pub attempts: u32,
    pub history: Vec<HistoryEntry>,
    pub version: u64,
}

impl From<&Payment> for PaymentView {
    fn from(p: &Payment) -> Self {
        PaymentView {
            id: p.id.clone(),
            affiliate_id: p.affiliate_id.clone(),
            amount: p.amount,
            status: p.status,
            attempts: p.attempts,
            history: p.history.clone(),
            version: p.version,
        }
    }
}

/// An affiliate's commission ledger, with what is still outstanding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerView {
    #[serde(flatten)]
    pub ledger: CommissionLedger,
    /// Earned minus paid, per currency.
    pub outstanding: Amounts,
}

impl From<&CommissionLedger> for LedgerView {
    fn from(ledger: &CommissionLedger) -> Self {
        LedgerView {
            ledger: ledger.clone(),
            outstanding: ledger.outstanding(),
        }
    }
}

/// The whole queryable state; what `aerostream produce` writes as its expectation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateView {
    pub campaigns: Vec<CampaignView>,
    pub payments: Vec<PaymentView>,
    /// Commission ledgers of every affiliate that earned or was paid anything.
    #[serde(default)]
    pub affiliates: Vec<LedgerView>,
}

/// One page of a list route (`GET /api/campaigns`, `/api/payments`, `/api/affiliates`): items in
/// id order, and the cursor of the next page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The id of the page's last item, to pass as `after` for the next page; `None` on the last
    /// page.
    pub next: Option<String>,
}
