//! The report read model: a projection of payments and campaigns into counters, shared by every
//! report version.
//!
//! Each aggregate state maps to its *contributions*: (group, counter, count, amount) entries, such as
//! "this payment adds 1 and 2 500 cents to `payments/EXITOSO/USD`". A commit moves the read model by
//! the difference between the contributions of the new and the old state ([`changes`]), in the same
//! atomic step as the state itself, so the read model counts every applied event exactly once and
//! is never rebuilt. A group is stored as one value, so it is always read whole:
//! - [`SUMMARY`]: payment totals per status and currency, processing-time buckets, campaigns per
//!   status, campaign budget and spend per currency, tracking totals;
//! - `affiliate/<id>`: that affiliate's payment totals per status and currency;
//! - `campaign/<id>`: that campaign's row (status, currency, budget, spend, metrics).

use crate::campaign::Campaign;
use crate::events::PaymentStatus;
use crate::payment::Payment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The group holding the totals.
pub const SUMMARY: &str = "summary";
const AFFILIATE: &str = "affiliate/";
const CAMPAIGN: &str = "campaign/";

/// Upper bounds (inclusive, ms) of the processing-time buckets; the last bucket is unbounded.
pub const PROCESSING_BUCKETS_MS: [i64; 16] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 300_000,
];

/// A counter: how many, and an amount (minor units, or milliseconds for processing times).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub count: i64,
    pub amount: i64,
}

/// The counters of one group, by counter name.
pub type Counters = BTreeMap<String, Tally>;

/// One counter moved by a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub group: String,
    pub counter: String,
    pub delta: Tally,
}

/// Aggregates that feed the read model.
pub trait Projected {
    /// What this state adds to the read model, as (group, counter, tally).
    fn contributions(&self) -> Vec<(String, String, Tally)>;
}

/// The counter changes that turn the contributions of `before` into those of `after`.
pub fn changes<P: Projected>(before: Option<&P>, after: &P) -> Vec<Change> {
    let mut net: BTreeMap<(String, String), Tally> = BTreeMap::new();
    let mut add = |entries: Vec<(String, String, Tally)>, sign: i64| {
        for (group, counter, tally) in entries {
            let total = net.entry((group, counter)).or_default();
            total.count += sign * tally.count;
            total.amount += sign * tally.amount;
        }
    };
    add(after.contributions(), 1);
    if let Some(before) = before {
        add(before.contributions(), -1);
    }
    net.into_iter()
        .filter(|(_, delta)| *delta != Tally::default())
        .map(|((group, counter), delta)| Change {
            group,
            counter,
            delta,
        })
        .collect()
}

/// Adds `changes` of `group` to its counters, dropping counters that fall to zero.
pub fn apply_changes<'a>(counters: &mut Counters, changes: impl IntoIterator<Item = &'a Change>) {
    for change in changes {
        let tally = counters.entry(change.counter.clone()).or_default();
        tally.count += change.delta.count;
        tally.amount += change.delta.amount;
        if *tally == Tally::default() {
            counters.remove(&change.counter);
        }
    }
}

fn entry(group: &str, counter: String, count: i64, amount: i64) -> (String, String, Tally) {
    (group.to_owned(), counter, Tally { count, amount })
}

/// The bucket (index into [`PROCESSING_BUCKETS_MS`], or its length for the overflow) of `ms`.
pub fn processing_bucket(ms: i64) -> usize {
    PROCESSING_BUCKETS_MS.partition_point(|bound| *bound < ms)
}

/// Milliseconds from the payment's request to its terminal outcome, by event time, once both are
/// known (never negative: clocks of different producers may disagree).
pub fn processing_ms(payment: &Payment) -> Option<i64> {
    if !payment.status.is_terminal() {
        return None;
    }
    let requested = payment
        .history
        .iter()
        .find(|e| e.status == PaymentStatus::Pending)?;
    let finished = payment.history.iter().find(|e| e.status == payment.status)?;
    Some((finished.time_ms - requested.time_ms).max(0))
}

impl Projected for Payment {
    fn contributions(&self) -> Vec<(String, String, Tally)> {
        let (status, currency) = (self.status.wire_name(), self.amount.currency.code());
        let amount = self.amount.amount_minor;
        let mut entries = vec![
            entry(SUMMARY, format!("payments/{status}/{currency}"), 1, amount),
            entry(
                &format!("{AFFILIATE}{}", self.affiliate_id),
                format!("{status}/{currency}"),
                1,
                amount,
            ),
        ];
        if let Some(ms) = processing_ms(self) {
            entries.push(entry(
                SUMMARY,
                format!("processing/{:02}", processing_bucket(ms)),
                1,
                ms,
            ));
        }
        entries
    }
}

impl Projected for Campaign {
    fn contributions(&self) -> Vec<(String, String, Tally)> {
        let (status, currency) = (self.status().wire_name(), self.budget.currency.code());
        let group = format!("{CAMPAIGN}{}", self.id);
        let metrics = &self.metrics;
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        vec![
            entry(SUMMARY, format!("campaigns/{status}"), 1, 0),
            entry(SUMMARY, format!("budget/{currency}"), 1, self.budget.amount_minor),
            entry(SUMMARY, format!("spend/{currency}"), 1, self.spend_minor),
            entry(
                SUMMARY,
                "tracking/impressions".into(),
                count(metrics.impressions),
                0,
            ),
            entry(SUMMARY, "tracking/clicks".into(), count(metrics.clicks), 0),
            entry(
                SUMMARY,
                "tracking/conversions".into(),
                count(metrics.conversions),
                metrics.conversion_value_minor,
            ),
            entry(&group, format!("status/{status}"), 1, 0),
            entry(&group, format!("budget/{currency}"), 1, self.budget.amount_minor),
            entry(&group, "spend".into(), 1, self.spend_minor),
            entry(&group, "impressions".into(), count(metrics.impressions), 0),
            entry(&group, "clicks".into(), count(metrics.clicks), 0),
            entry(
                &group,
                "conversions".into(),
                count(metrics.conversions),
                metrics.conversion_value_minor,
            ),
        ]
    }
}

/// The read model as a report reads it: every group's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadModel {
    pub summary: Counters,
    /// Affiliate id → counters `<status>/<currency>`.
    pub affiliates: BTreeMap<String, Counters>,
    /// Campaign id → counters of its row.
    pub campaigns: BTreeMap<String, Counters>,
}

impl ReadModel {
    /// Files a group read from the store under its place.
    pub fn insert(&mut self, group: &str, counters: Counters) {
        if group == SUMMARY {
            self.summary = counters;
        } else if let Some(id) = group.strip_prefix(AFFILIATE) {
            self.affiliates.insert(id.to_owned(), counters);
        } else if let Some(id) = group.strip_prefix(CAMPAIGN) {
            self.campaigns.insert(id.to_owned(), counters);
        }
    }

    /// Applies changes in memory, as the store does (tests and tools).
    pub fn apply(&mut self, changes: &[Change]) {
        for change in changes {
            let mut counters = self.group(&change.group);
            apply_changes(&mut counters, [change]);
            self.insert(&change.group, counters);
        }
    }

    fn group(&self, group: &str) -> Counters {
        let found = if group == SUMMARY {
            Some(&self.summary)
        } else if let Some(id) = group.strip_prefix(AFFILIATE) {
            self.affiliates.get(id)
        } else {
            group.strip_prefix(CAMPAIGN).and_then(|id| self.campaigns.get(id))
        };
        found.cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{CampaignEvent, Envelope, PaymentEvent};
    use crate::testkit::{campaign_created, envelope, envelope_at as at, usd};
    use crate::Aggregate;

    fn pay(current: Option<&Payment>, event: PaymentEvent, env: &Envelope) -> Payment {
        Payment::decide(current, &event, env).unwrap().state
    }

    fn processed(status: PaymentStatus) -> PaymentEvent {
        PaymentEvent::Processed {
            payment_id: "p1".into(),
            affiliate_id: "a1".into(),
            amount: usd(2_500),
            status,
            declared_hash: "h".into(),
            attempts: 1,
        }
    }

    fn requested() -> PaymentEvent {
        PaymentEvent::Requested {
            payment_id: "p1".into(),
            affiliate_id: "a1".into(),
            amount: usd(2_500),
        }
    }

    #[test]
    fn a_payment_moves_between_status_totals_and_gets_its_processing_time() {
        let mut model = ReadModel::default();
        let pending = pay(None, requested(), &at("e1", 1_000));
        model.apply(&changes(None, &pending));
        assert_eq!(
            model.summary["payments/PENDIENTE/USD"],
            Tally {
                count: 1,
                amount: 2_500
            }
        );

        let done = pay(
            Some(&pending),
            processed(PaymentStatus::Succeeded),
            &at("e2", 1_040),
        );
        model.apply(&changes(Some(&pending), &done));
        assert!(!model.summary.contains_key("payments/PENDIENTE/USD"));
        assert_eq!(
            model.summary["payments/EXITOSO/USD"],
            Tally {
                count: 1,
                amount: 2_500
            }
        );
        let bucket = format!("processing/{:02}", processing_bucket(40));
        assert_eq!(model.summary[&bucket], Tally { count: 1, amount: 40 });
        assert_eq!(model.affiliates["a1"]["EXITOSO/USD"].count, 1);
    }

    #[test]
    fn an_outcome_before_its_request_gets_the_time_when_the_request_arrives() {
        let mut model = ReadModel::default();
        let done = pay(None, processed(PaymentStatus::Failed), &at("e2", 5_000));
        model.apply(&changes(None, &done));
        assert!(!model.summary.keys().any(|k| k.starts_with("processing/")));
        let late = pay(Some(&done), requested(), &at("e1", 4_000));
        model.apply(&changes(Some(&done), &late));
        let bucket = format!("processing/{:02}", processing_bucket(1_000));
        assert_eq!(
            model.summary[&bucket],
            Tally {
                count: 1,
                amount: 1_000
            }
        );
        assert_eq!(model.summary["payments/FALLIDO/USD"].count, 1);
    }

    #[test]
    fn a_campaign_row_follows_its_state() {
        let created = campaign_created("c1", 10_000);
        let c0 = Campaign::decide(None, &created, &envelope("e1")).unwrap().state;
        let activated = CampaignEvent::Activated {
            campaign_id: "c1".into(),
        };
        let c1 = Campaign::decide(Some(&c0), &activated, &envelope("e2"))
            .unwrap()
            .state;
        let click = CampaignEvent::ClickRecorded {
            campaign_id: "c1".into(),
            affiliate_id: "a1".into(),
        };
        let c2 = Campaign::decide(Some(&c1), &click, &envelope("e3"))
            .unwrap()
            .state;
        let mut model = ReadModel::default();
        model.apply(&changes(None, &c0));
        model.apply(&changes(Some(&c0), &c1));
        model.apply(&changes(Some(&c1), &c2));
        assert_eq!(model.summary["campaigns/ACTIVE"].count, 1);
        assert!(!model.summary.contains_key("campaigns/CREATED"));
        assert_eq!(model.summary["spend/USD"].amount, 100);
        assert_eq!(model.summary["tracking/clicks"].count, 1);
        assert_eq!(model.campaigns["c1"]["status/ACTIVE"].count, 1);
        assert_eq!(model.campaigns["c1"]["clicks"].count, 1);
    }

    #[test]
    fn buckets_are_inclusive_upper_bounds() {
        assert_eq!(processing_bucket(0), 0);
        assert_eq!(processing_bucket(1), 0);
        assert_eq!(processing_bucket(2), 1);
        assert_eq!(processing_bucket(3), 2);
        assert_eq!(processing_bucket(1_000_000), PROCESSING_BUCKETS_MS.len());
    }
}
