//! Builders shared by the crate's unit and property tests.

use crate::aggregate::Aggregate;
use crate::campaign::Campaign;
use crate::events::{CampaignEvent, CommissionRule, Envelope};
use crate::money::Money;
use crate::output::OutputEvent;

pub fn usd(amount_minor: i64) -> Money {
    Money::positive(amount_minor, "USD").expect("valid test money")
}

pub fn envelope_at(id: &str, time_ms: i64) -> Envelope {
    Envelope {
        id: id.into(),
        event_type: "test".into(),
        source: "test".into(),
        time_ms,
        subject: None,
        correlation_id: None,
        causation_id: None,
        schema_version: "v1".into(),
    }
}

pub fn envelope(id: &str) -> Envelope {
    envelope_at(id, 0)
}

/// A campaign with the given budget (USD), 100 per click, 500 per conversion, 10 % commission.
pub fn campaign_created(id: &str, budget_minor: i64) -> CampaignEvent {
    CampaignEvent::Created {
        campaign_id: id.into(),
        name: format!("campaign {id}"),
        budget: usd(budget_minor),
        cost_per_click_minor: 100,
        cost_per_conversion_minor: 500,
        commission: CommissionRule::Percentage { basis_points: 1_000 },
    }
}

/// Applies `events` in order, each with its own envelope id, panicking on a rejection.
pub fn run(events: &[CampaignEvent]) -> (Option<Campaign>, Vec<OutputEvent>) {
    let mut state: Option<Campaign> = None;
    let mut outputs = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let d = Campaign::decide(state.as_ref(), event, &envelope(&format!("e{i}")))
            .unwrap_or_else(|r| panic!("event {i} rejected: {r}"));
        outputs.extend(d.outputs);
        state = Some(d.state);
    }
    (state, outputs)
}
