//! The campaign aggregate (`Campana`): lifecycle, tracking metrics, spend and budget alerts.
//!
//! Rules (SPEC §2), chosen so that tracking events commute with each other:
//! - lifecycle: CREATED → ACTIVE ⇄ PAUSED → COMPLETED; COMPLETED is final and rejects every event;
//! - impressions, clicks and conversions are counters; a click costs `cost_per_click_minor`, a
//!   conversion `cost_per_conversion_minor`, and spend always accrues (tracking events are facts);
//! - budget alerts WARNING (80 %), CRITICAL (95 %), EXHAUSTED (100 %) are emitted once each;
//! - an ACTIVE campaign whose spend reached its budget is reported PAUSED until the budget is raised;
//! - each conversion earns the affiliate a commission by the campaign's rule (`ComisionCalculada`).

use crate::aggregate::{Aggregate, Decision};
use crate::events::{AggregateKind, CampaignEvent, CommissionRule, Envelope, Event};
use crate::money::Money;
use crate::outcome::{RejectReason, Rejection};
use crate::output::{AlertLevel, OutputBody, OutputEvent};
use crate::snapshot::{AvroBinary, Snapshot};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CampaignStatus {
    #[serde(rename = "CREATED")]
    Created,
    #[serde(rename = "ACTIVE")]
    Active,
    #[serde(rename = "PAUSED")]
    Paused,
    #[serde(rename = "COMPLETED")]
    Completed,
}

impl CampaignStatus {
    pub fn wire_name(self) -> &'static str {
        match self {
            CampaignStatus::Created => "CREATED",
            CampaignStatus::Active => "ACTIVE",
            CampaignStatus::Paused => "PAUSED",
            CampaignStatus::Completed => "COMPLETED",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub impressions: u64,
    pub clicks: u64,
    pub conversions: u64,
    /// Sum of conversion values, minor units of the campaign currency.
    pub conversion_value_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Campaign {
    pub id: String,
    pub name: String,
    /// The status set by lifecycle events; see [`Campaign::status`] for the effective one.
    pub lifecycle: CampaignStatus,
    pub budget: Money,
    pub spend_minor: i64,
    pub cost_per_click_minor: i64,
    pub cost_per_conversion_minor: i64,
    pub commission: CommissionRule,
    pub metrics: Metrics,
    /// Alert levels already emitted; each is emitted once.
    pub alerts_emitted: BTreeSet<AlertLevel>,
    /// Number of events applied to this campaign.
    pub version: u64,
}

impl Campaign {
    pub fn is_exhausted(&self) -> bool {
        self.spend_minor >= self.budget.amount_minor
    }

    /// The status an operator sees: an ACTIVE campaign with its budget exhausted is PAUSED.
    pub fn status(&self) -> CampaignStatus {
        if self.lifecycle == CampaignStatus::Active && self.is_exhausted() {
            CampaignStatus::Paused
        } else {
            self.lifecycle
        }
    }

    /// Emits every alert level reached and not yet emitted.
    fn raise_alerts(&mut self, cause: &Envelope, outputs: &mut Vec<OutputEvent>) {
        let Some(reached) = AlertLevel::reached(self.spend_minor, self.budget.amount_minor) else {
            return;
        };
        for level in AlertLevel::ALL.into_iter().filter(|l| *l <= reached) {
            if self.alerts_emitted.insert(level) {
                let body = OutputBody::BudgetAlert {
                    campaign_id: self.id.clone(),
                    level,
                    budget: self.budget,
                    spend_minor: self.spend_minor,
                };
                outputs.push(OutputEvent::derived(cause, level.wire_name(), body));
            }
        }
    }

    fn transition(&mut self, to: CampaignStatus) -> Result<(), Rejection> {
        use CampaignStatus::*;
        let allowed = match (self.lifecycle, to) {
            (Completed, _) => false,
            (_, Completed) => true,
            (Created | Active | Paused, Active | Paused) => true,
            (_, Created) => false,
        };
        if !allowed {
            return Err(Rejection::new(
                RejectReason::InvalidTransition,
                format!(
                    "campaign {} cannot go from {:?} to {:?}",
                    self.id, self.lifecycle, to
                ),
            ));
        }
        self.lifecycle = to;
        Ok(())
    }
}

fn create(event: &CampaignEvent) -> Result<Campaign, Rejection> {
    match event {
        CampaignEvent::Created {
            campaign_id,
            name,
            budget,
            cost_per_click_minor,
            cost_per_conversion_minor,
            commission,
        } => {
            if *cost_per_click_minor < 0 || *cost_per_conversion_minor < 0 {
                return Err(Rejection::new(
                    RejectReason::InvalidMoney,
                    "costs per click and conversion must not be negative",
                ));
            }
            Ok(Campaign {
                id: campaign_id.clone(),
                name: name.clone(),
                lifecycle: CampaignStatus::Created,
                budget: *budget,
                spend_minor: 0,
                cost_per_click_minor: *cost_per_click_minor,
                cost_per_conversion_minor: *cost_per_conversion_minor,
                commission: *commission,
                metrics: Metrics::default(),
                alerts_emitted: BTreeSet::new(),
                version: 0,
            })
        }
        other => Err(Rejection::new(
            RejectReason::UnknownCampaign,
            format!("campaign {} does not exist", other.campaign_id()),
        )),
    }
}

impl Aggregate for Campaign {
    const KIND: AggregateKind = AggregateKind::Campaign;
    const SNAPSHOTS: bool = true;
    type Event = CampaignEvent;

    fn version(&self) -> u64 {
        self.version
    }

    /// `id_campana` … `version` of `CampanaEstadoCompleto`'s `data`, as published: the effective
    /// `estado` ([`Campaign::status`]), money as `{monto_centavos, moneda}`, alerts by wire name.
    fn write_snapshot_state(&self, out: &mut AvroBinary) {
        let (rule, value) = self.commission.wire();
        out.string(&self.id)
            .string(&self.name)
            .string(self.status().wire_name())
            .long(self.budget.amount_minor)
            .string(self.budget.currency.code())
            .long(self.spend_minor)
            .long(self.cost_per_click_minor)
            .long(self.cost_per_conversion_minor)
            .string(rule)
            .long(value)
            .long(self.metrics.impressions as i64)
            .long(self.metrics.clicks as i64)
            .long(self.metrics.conversions as i64)
            .long(self.metrics.conversion_value_minor)
            .strings(self.alerts_emitted.iter().map(|level| level.wire_name()))
            .long(self.version as i64);
    }

    fn snapshot_output(snapshot: &Snapshot<Campaign>, cause: &Envelope) -> Option<OutputEvent> {
        let body = OutputBody::CampaignState {
            snapshot: Box::new(snapshot.clone()),
        };
        Some(OutputEvent::derived(cause, "state", body))
    }

    fn snapshot_now(before: Option<&Campaign>, after: &Campaign) -> bool {
        let status = |c: Option<&Campaign>| c.map(Campaign::status);
        let (was, is) = (status(before), after.status());
        was != Some(is) && matches!(is, CampaignStatus::Paused | CampaignStatus::Completed)
    }

    fn select(event: &Event) -> Option<&CampaignEvent> {
        match event {
            Event::Campaign(e) => Some(e),
            Event::Payment(_) | Event::Report(_) => None,
        }
    }

    fn read_model_changes(before: Option<&Self>, after: &Self) -> Vec<crate::readmodel::Change> {
        crate::readmodel::changes(before, after)
    }

    fn decide(
        current: Option<&Campaign>,
        event: &CampaignEvent,
        envelope: &Envelope,
    ) -> Result<Decision<Campaign>, Rejection> {
        let mut outputs = Vec::new();
        let mut state = match current {
            None => create(event)?,
            Some(existing) => {
                if existing.lifecycle == CampaignStatus::Completed {
                    return Err(Rejection::new(
                        RejectReason::CampaignCompleted,
                        format!("campaign {} is completed", existing.id),
                    ));
                }
                let mut state = existing.clone();
                apply_to_existing(&mut state, event, envelope, &mut outputs)?;
                state
            }
        };
        state.version += 1;
        Ok(Decision {
            state,
            outputs,
            charges: Vec::new(),
        })
    }
}

fn apply_to_existing(
    state: &mut Campaign,
    event: &CampaignEvent,
    envelope: &Envelope,
    outputs: &mut Vec<OutputEvent>,
) -> Result<(), Rejection> {
    match event {
        CampaignEvent::Created { campaign_id, .. } => {
            return Err(Rejection::new(
                RejectReason::CampaignExists,
                format!("campaign {campaign_id} already exists"),
            ))
        }
        CampaignEvent::Activated { .. } => state.transition(CampaignStatus::Active)?,
        CampaignEvent::Paused { .. } => state.transition(CampaignStatus::Paused)?,
        CampaignEvent::Completed { .. } => state.transition(CampaignStatus::Completed)?,
        CampaignEvent::BudgetUpdated { budget, .. } => {
            same_currency(state, budget)?;
            state.budget = *budget;
            state.raise_alerts(envelope, outputs);
        }
        CampaignEvent::ImpressionRecorded { .. } => state.metrics.impressions += 1,
        CampaignEvent::ClickRecorded { .. } => {
            state.metrics.clicks += 1;
            state.spend_minor += state.cost_per_click_minor;
            state.raise_alerts(envelope, outputs);
        }
        CampaignEvent::ConversionRecorded {
            affiliate_id, value, ..
        } => {
            same_currency(state, value)?;
            state.metrics.conversions += 1;
            state.metrics.conversion_value_minor += value.amount_minor;
            state.spend_minor += state.cost_per_conversion_minor;
            let commission = Money {
                amount_minor: state.commission.apply(value.amount_minor),
                currency: value.currency,
            };
            let body = OutputBody::CommissionCalculated {
                affiliate_id: affiliate_id.clone(),
                campaign_id: state.id.clone(),
                conversion_event_id: envelope.id.clone(),
                commission,
            };
            outputs.push(OutputEvent::derived(envelope, "commission", body));
            state.raise_alerts(envelope, outputs);
        }
    }
    Ok(())
}

fn same_currency(state: &Campaign, money: &Money) -> Result<(), Rejection> {
    if money.currency == state.budget.currency {
        Ok(())
    } else {
        Err(Rejection::new(
            RejectReason::CurrencyMismatch,
            format!(
                "campaign {} is in {}, event is in {}",
                state.id, state.budget.currency, money.currency
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{campaign_created, envelope, run};

    fn click(id: &str) -> CampaignEvent {
        CampaignEvent::ClickRecorded {
            campaign_id: id.into(),
            affiliate_id: "af-1".into(),
        }
    }

    #[test]
    fn tracking_for_unknown_campaign_is_rejected() {
        let err = Campaign::decide(None, &click("c1"), &envelope("e1")).unwrap_err();
        assert_eq!(err.reason, RejectReason::UnknownCampaign);
    }

    #[test]
    fn lifecycle_moves_forward_and_completed_is_final() {
        let (state, _) = run(&[
            campaign_created("c1", 10_000),
            CampaignEvent::Activated {
                campaign_id: "c1".into(),
            },
            CampaignEvent::Paused {
                campaign_id: "c1".into(),
                reason: "manual".into(),
            },
            CampaignEvent::Activated {
                campaign_id: "c1".into(),
            },
            CampaignEvent::Completed {
                campaign_id: "c1".into(),
            },
        ]);
        let state = state.unwrap();
        assert_eq!(state.status(), CampaignStatus::Completed);
        assert_eq!(state.version, 5);
        let err = Campaign::decide(Some(&state), &click("c1"), &envelope("late")).unwrap_err();
        assert_eq!(err.reason, RejectReason::CampaignCompleted);
    }

    #[test]
    fn alerts_fire_once_per_threshold_and_exhaustion_pauses() {
        // Budget 1000, click costs 100: 8 clicks → WARNING, 10 → CRITICAL and EXHAUSTED.
        let mut events = vec![
            campaign_created("c1", 1_000),
            CampaignEvent::Activated {
                campaign_id: "c1".into(),
            },
        ];
        events.extend((0..12).map(|_| click("c1")));
        let (state, outputs) = run(&events);
        let state = state.unwrap();
        let alerts: Vec<_> = outputs
            .iter()
            .filter_map(|o| match &o.body {
                OutputBody::BudgetAlert { level, .. } => Some(*level),
                _ => None,
            })
            .collect();
        assert_eq!(
            alerts,
            vec![AlertLevel::Warning, AlertLevel::Critical, AlertLevel::Exhausted]
        );
        assert_eq!(state.spend_minor, 1_200);
        assert_eq!(state.status(), CampaignStatus::Paused);

        // Raising the budget above spend resumes it, and no alert repeats.
        let raise = CampaignEvent::BudgetUpdated {
            campaign_id: "c1".into(),
            budget: Money::positive(10_000, "USD").unwrap(),
        };
        let d = Campaign::decide(Some(&state), &raise, &envelope("raise")).unwrap();
        assert_eq!(d.state.status(), CampaignStatus::Active);
        assert!(d.outputs.is_empty());
    }

    #[test]
    fn conversion_earns_commission_by_rule() {
        let (_, outputs) = run(&[
            campaign_created("c1", 1_000_000),
            CampaignEvent::ConversionRecorded {
                campaign_id: "c1".into(),
                affiliate_id: "af-9".into(),
                value: Money::positive(10_050, "USD").unwrap(),
            },
        ]);
        // The test campaign pays 10 % (1 000 basis points): 1 005 minor units.
        match &outputs[0].body {
            OutputBody::CommissionCalculated {
                affiliate_id,
                commission,
                ..
            } => {
                assert_eq!(affiliate_id, "af-9");
                assert_eq!(commission.amount_minor, 1_005);
            }
            other => panic!("unexpected output {other:?}"),
        }
    }

    #[test]
    fn conversion_in_another_currency_is_rejected() {
        let (state, _) = run(&[campaign_created("c1", 1_000)]);
        let conv = CampaignEvent::ConversionRecorded {
            campaign_id: "c1".into(),
            affiliate_id: "af".into(),
            value: Money::positive(5, "EUR").unwrap(),
        };
        let err = Campaign::decide(state.as_ref(), &conv, &envelope("x")).unwrap_err();
        assert_eq!(err.reason, RejectReason::CurrencyMismatch);
    }
}
