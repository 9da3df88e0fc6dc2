//! The commission ledger of one affiliate (SPEC §2): commissions earned per campaign and in all,
//! and what successful payments settled.
//!
//! It is a projection of output events: a `ComisionCalculada` (a campaign's conversion) adds to
//! what the affiliate earned, a `PagoExitoso` to what was paid. The store applies it in the same
//! atomic commit as the event that caused the output, so the ledger changes exactly once per
//! applied event, whatever the broker redelivers.

use crate::money::Currency;
use crate::output::OutputBody;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Amounts in minor units, per currency.
pub type Amounts = BTreeMap<Currency, i64>;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommissionLedger {
    pub affiliate_id: String,
    /// Commissions earned, per campaign.
    pub earned_by_campaign: BTreeMap<String, Amounts>,
    /// Commissions earned in all.
    pub earned: Amounts,
    /// Settled by successful payments to the affiliate.
    pub paid: Amounts,
    /// Number of commissions earned.
    pub commissions: u64,
    /// Number of successful payments.
    pub payments: u64,
}

impl CommissionLedger {
    pub fn new(affiliate_id: impl Into<String>) -> Self {
        CommissionLedger {
            affiliate_id: affiliate_id.into(),
            ..CommissionLedger::default()
        }
    }

    /// The affiliate whose ledger `body` moves, if it moves one.
    pub fn affiliate_of(body: &OutputBody) -> Option<&str> {
        match body {
            OutputBody::CommissionCalculated { affiliate_id, .. }
            | OutputBody::PaymentSucceeded { affiliate_id, .. } => Some(affiliate_id),
            OutputBody::PaymentFailed { .. }
            | OutputBody::BudgetAlert { .. }
            | OutputBody::CampaignState { .. }
            | OutputBody::ReportGenerated { .. } => None,
        }
    }

    /// Records `body` if it concerns this affiliate's ledger.
    pub fn record(&mut self, body: &OutputBody) {
        self.add(body, 1);
    }

    /// Takes back an earlier [`record`](Self::record) of `body`: a commit withdrawn because it
    /// never reached the changelog. Amounts that fall to zero are dropped, so the ledger equals
    /// one that never recorded `body`.
    pub fn revert(&mut self, body: &OutputBody) {
        self.add(body, -1);
        self.earned_by_campaign.values_mut().for_each(drop_zeros);
        self.earned_by_campaign.retain(|_, amounts| !amounts.is_empty());
        drop_zeros(&mut self.earned);
        drop_zeros(&mut self.paid);
    }

    fn add(&mut self, body: &OutputBody, sign: i64) {
        if Self::affiliate_of(body) != Some(self.affiliate_id.as_str()) {
            return;
        }
        match body {
            OutputBody::CommissionCalculated {
                campaign_id,
                commission,
                ..
            } => {
                *self
                    .earned_by_campaign
                    .entry(campaign_id.clone())
                    .or_default()
                    .entry(commission.currency)
                    .or_default() += sign * commission.amount_minor;
                *self.earned.entry(commission.currency).or_default() += sign * commission.amount_minor;
                self.commissions = self.commissions.saturating_add_signed(sign);
            }
            OutputBody::PaymentSucceeded { amount, .. } => {
                *self.paid.entry(amount.currency).or_default() += sign * amount.amount_minor;
                self.payments = self.payments.saturating_add_signed(sign);
            }
            OutputBody::PaymentFailed { .. }
            | OutputBody::BudgetAlert { .. }
            | OutputBody::CampaignState { .. }
            | OutputBody::ReportGenerated { .. } => {}
        }
    }

    /// Earned and not yet paid, per currency (negative when payments exceeded commissions).
    pub fn outstanding(&self) -> Amounts {
        let mut outstanding = self.earned.clone();
        for (currency, paid) in &self.paid {
            *outstanding.entry(*currency).or_default() -= paid;
        }
        outstanding
    }
}

fn drop_zeros(amounts: &mut Amounts) {
    amounts.retain(|_, minor| *minor != 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Money;

    fn commission(affiliate: &str, campaign: &str, minor: i64) -> OutputBody {
        OutputBody::CommissionCalculated {
            affiliate_id: affiliate.into(),
            campaign_id: campaign.into(),
            conversion_event_id: "e".into(),
            commission: Money::positive(minor, "USD").unwrap(),
        }
    }

    #[test]
    fn commissions_add_up_per_campaign_and_payments_settle_them() {
        let mut ledger = CommissionLedger::new("af-1");
        ledger.record(&commission("af-1", "c1", 100));
        ledger.record(&commission("af-1", "c2", 50));
        ledger.record(&commission("af-1", "c1", 25));
        ledger.record(&commission("af-2", "c1", 1_000));
        ledger.record(&OutputBody::PaymentSucceeded {
            payment_id: "p".into(),
            affiliate_id: "af-1".into(),
            amount: Money::positive(120, "USD").unwrap(),
        });
        ledger.record(&OutputBody::PaymentFailed {
            payment_id: "q".into(),
            affiliate_id: "af-1".into(),
            amount: Money::positive(999, "USD").unwrap(),
        });
        assert_eq!(ledger.earned[&Currency::Usd], 175);
        assert_eq!(ledger.earned_by_campaign["c1"][&Currency::Usd], 125);
        assert_eq!(ledger.paid[&Currency::Usd], 120);
        assert_eq!(ledger.outstanding()[&Currency::Usd], 55);
        assert_eq!((ledger.commissions, ledger.payments), (3, 1));
    }

    #[test]
    fn a_reverted_record_leaves_the_ledger_as_if_never_recorded() {
        let mut ledger = CommissionLedger::new("af-1");
        ledger.record(&commission("af-1", "c1", 100));
        let before = ledger.clone();
        let paid = OutputBody::PaymentSucceeded {
            payment_id: "p".into(),
            affiliate_id: "af-1".into(),
            amount: Money::positive(30, "EUR").unwrap(),
        };
        ledger.record(&commission("af-1", "c2", 50));
        ledger.record(&paid);
        ledger.revert(&paid);
        ledger.revert(&commission("af-1", "c2", 50));
        assert_eq!(ledger, before);
    }
}
