//! Report documents, built from the read model ([`crate::readmodel`]) in either version.
//!
//! v2 is a superset of v1: a v2 report holds every v1 field with the same value (the `version`
//! tag aside), so a v1 client reads a v2 answer. Amounts are in minor units, per currency.

use crate::events::ReportVersion;
use crate::readmodel::{Counters, ReadModel, Tally, PROCESSING_BUCKETS_MS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub version: ReportVersion,
    #[serde(flatten)]
    pub totals: Totals,
    /// v2 only.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Detail>,
}

/// The v1 report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub payments: PaymentTotals,
    pub campaigns: CampaignTotals,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentTotals {
    pub count: i64,
    /// One line per (status, currency) with payments.
    pub totals: Vec<StatusLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusLine {
    pub status: String,
    pub currency: String,
    pub count: i64,
    pub amount_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignTotals {
    pub count: i64,
    pub by_status: BTreeMap<String, i64>,
}

/// What v2 adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detail {
    /// Successful payments over payments with an outcome; `None` before the first outcome.
    pub success_rate: Option<f64>,
    pub processing_time_ms: ProcessingTimes,
    pub breakdowns: Breakdowns,
}

/// Request → outcome times of payments (event time), from fixed buckets: a percentile is the
/// upper bound of the bucket it falls in (`None` past the last bound).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessingTimes {
    pub count: i64,
    pub mean: Option<f64>,
    pub p50: Option<i64>,
    pub p90: Option<i64>,
    pub p99: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breakdowns {
    /// Status → currency → totals.
    pub by_status: BTreeMap<String, BTreeMap<String, Amount>>,
    /// Currency → totals over every status.
    pub by_currency: BTreeMap<String, Amount>,
    pub by_affiliate: Vec<AffiliateLine>,
    pub by_campaign: Vec<CampaignLine>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amount {
    pub count: i64,
    pub amount_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffiliateLine {
    pub affiliate_id: String,
    pub payments: Vec<StatusLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignLine {
    pub campaign_id: String,
    pub status: String,
    pub currency: String,
    pub budget_minor: i64,
    pub spend_minor: i64,
    pub impressions: i64,
    pub clicks: i64,
    pub conversions: i64,
    pub conversion_value_minor: i64,
}

impl Report {
    pub fn build(version: ReportVersion, model: &ReadModel) -> Report {
        let totals = totals(&model.summary);
        let detail = (version == ReportVersion::V2).then(|| detail(model, &totals.payments.totals));
        Report {
            version,
            totals,
            detail,
        }
    }
}

/// The counters under `prefix/`, with the prefix removed.
fn under<'a>(counters: &'a Counters, prefix: &'a str) -> impl Iterator<Item = (&'a str, Tally)> + 'a {
    counters
        .iter()
        .filter_map(move |(name, tally)| Some((name.strip_prefix(prefix)?.strip_prefix('/')?, *tally)))
}

/// `<status>/<currency>` counters as lines.
fn status_lines<'a>(entries: impl Iterator<Item = (&'a str, Tally)>) -> Vec<StatusLine> {
    entries
        .filter_map(|(name, tally)| {
            let (status, currency) = name.split_once('/')?;
            Some(StatusLine {
                status: status.to_owned(),
                currency: currency.to_owned(),
                count: tally.count,
                amount_minor: tally.amount,
            })
        })
        .collect()
}

fn totals(summary: &Counters) -> Totals {
    let lines = status_lines(under(summary, "payments"));
    let by_status: BTreeMap<String, i64> = under(summary, "campaigns")
        .map(|(status, tally)| (status.to_owned(), tally.count))
        .collect();
    Totals {
        payments: PaymentTotals {
            count: lines.iter().map(|l| l.count).sum(),
            totals: lines,
        },
        campaigns: CampaignTotals {
            count: by_status.values().sum(),
            by_status,
        },
    }
}

/// What v2 adds, from the read model and the v1 payment lines.
fn detail(model: &ReadModel, lines: &[StatusLine]) -> Detail {
    let mut by_status: BTreeMap<String, BTreeMap<String, Amount>> = BTreeMap::new();
    let mut by_currency: BTreeMap<String, Amount> = BTreeMap::new();
    for line in lines {
        let add = |total: &mut Amount| {
            total.count += line.count;
            total.amount_minor += line.amount_minor;
        };
        add(by_status
            .entry(line.status.clone())
            .or_default()
            .entry(line.currency.clone())
            .or_insert(Amount::ZERO));
        add(by_currency.entry(line.currency.clone()).or_insert(Amount::ZERO));
    }
    let outcomes = |status: &str| {
        lines
            .iter()
            .filter(|l| l.status == status)
            .map(|l| l.count)
            .sum::<i64>()
    };
    let (succeeded, failed) = (outcomes("EXITOSO"), outcomes("FALLIDO"));
    Detail {
        success_rate: (succeeded + failed > 0).then(|| succeeded as f64 / (succeeded + failed) as f64),
        processing_time_ms: processing_times(&model.summary),
        breakdowns: Breakdowns {
            by_status,
            by_currency,
            by_affiliate: model
                .affiliates
                .iter()
                .map(|(id, counters)| AffiliateLine {
                    affiliate_id: id.clone(),
                    payments: status_lines(counters.iter().map(|(name, tally)| (name.as_str(), *tally))),
                })
                .collect(),
            by_campaign: model
                .campaigns
                .iter()
                .map(|(id, row)| campaign_line(id, row))
                .collect(),
        },
    }
}

impl Amount {
    const ZERO: Amount = Amount {
        count: 0,
        amount_minor: 0,
    };
}

fn campaign_line(id: &str, row: &Counters) -> CampaignLine {
    let first = |prefix: &str| under(row, prefix).next().map(|(name, _)| name.to_owned());
    let tally = |name: &str| row.get(name).copied().unwrap_or_default();
    let budget = under(row, "budget").next().map(|(_, t)| t.amount).unwrap_or(0);
    CampaignLine {
        campaign_id: id.to_owned(),
        status: first("status").unwrap_or_default(),
        currency: first("budget").unwrap_or_default(),
        budget_minor: budget,
        spend_minor: tally("spend").amount,
        impressions: tally("impressions").count,
        clicks: tally("clicks").count,
        conversions: tally("conversions").count,
        conversion_value_minor: tally("conversions").amount,
    }
}

fn processing_times(summary: &Counters) -> ProcessingTimes {
    let buckets: Vec<(usize, Tally)> = under(summary, "processing")
        .filter_map(|(index, tally)| Some((index.parse().ok()?, tally)))
        .collect();
    let count: i64 = buckets.iter().map(|(_, t)| t.count).sum();
    let sum: i64 = buckets.iter().map(|(_, t)| t.amount).sum();
    let percentile = |q: f64| -> Option<i64> {
        if count == 0 {
            return None;
        }
        let rank = (q * count as f64).ceil().max(1.0) as i64;
        let mut seen = 0;
        let (index, _) = buckets.iter().find(|(_, t)| {
            seen += t.count;
            seen >= rank
        })?;
        PROCESSING_BUCKETS_MS.get(*index).copied()
    };
    ProcessingTimes {
        count,
        mean: (count > 0).then(|| sum as f64 / count as f64),
        p50: percentile(0.50),
        p90: percentile(0.90),
        p99: percentile(0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readmodel::SUMMARY;

    fn model() -> ReadModel {
        let mut model = ReadModel::default();
        let tally = |count, amount| Tally { count, amount };
        let summary: Counters = [
            ("payments/EXITOSO/USD", tally(3, 3_000)),
            ("payments/FALLIDO/USD", tally(1, 500)),
            ("payments/PENDIENTE/EUR", tally(2, 200)),
            ("campaigns/ACTIVE", tally(2, 0)),
            ("campaigns/PAUSED", tally(1, 0)),
            ("processing/03", tally(3, 24)),
            ("processing/05", tally(1, 40)),
        ]
        .into_iter()
        .map(|(k, t)| (k.to_owned(), t))
        .collect();
        model.insert(SUMMARY, summary);
        model.insert(
            "affiliate/a1",
            [("EXITOSO/USD".to_owned(), tally(3, 3_000))]
                .into_iter()
                .collect(),
        );
        model.insert(
            "campaign/c1",
            [
                ("status/ACTIVE".to_owned(), tally(1, 0)),
                ("budget/USD".to_owned(), tally(1, 10_000)),
                ("spend".to_owned(), tally(1, 700)),
                ("clicks".to_owned(), tally(7, 0)),
            ]
            .into_iter()
            .collect(),
        );
        model
    }

    #[test]
    fn v1_has_totals_per_status_and_currency() {
        let report = Report::build(ReportVersion::V1, &model());
        assert_eq!(report.totals.payments.count, 6);
        assert_eq!(report.totals.payments.totals.len(), 3);
        assert_eq!(report.totals.campaigns.count, 3);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["version"], "v1");
        assert!(json.get("breakdowns").is_none());
    }

    #[test]
    fn v2_is_a_superset_of_v1_with_the_same_values() {
        let v1 = serde_json::to_value(Report::build(ReportVersion::V1, &model())).unwrap();
        let v2 = serde_json::to_value(Report::build(ReportVersion::V2, &model())).unwrap();
        for (field, value) in v1.as_object().unwrap() {
            if field != "version" {
                assert_eq!(&v2[field], value, "{field}");
            }
        }
        assert_eq!(v2["success_rate"], 0.75);
        assert_eq!(v2["processing_time_ms"]["count"], 4);
        assert_eq!(v2["processing_time_ms"]["mean"], 16.0);
        assert_eq!(v2["processing_time_ms"]["p50"], 10);
        assert_eq!(v2["processing_time_ms"]["p99"], 50);
        assert_eq!(v2["breakdowns"]["by_currency"]["USD"]["amount_minor"], 3_500);
        assert_eq!(v2["breakdowns"]["by_affiliate"][0]["payments"][0]["count"], 3);
        assert_eq!(v2["breakdowns"]["by_campaign"][0]["clicks"], 7);
        assert_eq!(v2["breakdowns"]["by_campaign"][0]["budget_minor"], 10_000);
        // A v1 client reading a v2 answer gets the v1 document.
        let as_v1: Report = serde_json::from_value(v2).unwrap();
        assert_eq!(as_v1.totals, Report::build(ReportVersion::V1, &model()).totals);
    }

    #[test]
    fn an_empty_read_model_gives_empty_reports() {
        let report = Report::build(ReportVersion::V2, &ReadModel::default());
        let detail = report.detail.unwrap();
        assert_eq!(detail.success_rate, None);
        assert_eq!(detail.processing_time_ms.p50, None);
        assert_eq!(report.totals.payments.count, 0);
    }
}
