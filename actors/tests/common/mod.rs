//! Builders shared by the integration tests: envelopes, incoming events and campaign/payment events.
//!
//! Each test binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use aerostream_actors::events::CommissionRule;
use aerostream_actors::{CampaignEvent, Event, Incoming, PaymentEvent, PaymentStatus};
use sha2::{Digest, Sha256};

pub use aerostream_actors::testkit::{envelope_at, usd};

pub const AFFILIATE: &str = "af-1";
/// Cost of one click in the test campaigns, minor units.
pub const CLICK_COST: i64 = 100;
/// Cost of one conversion in the test campaigns, minor units.
pub const CONVERSION_COST: i64 = 500;

/// SHA-256 (hex) of the event's JSON, standing in for the codec's canonical body hash.
pub fn content_hash(event: &Event) -> String {
    let json = serde_json::to_vec(event).expect("events serialize");
    hex::encode(Sha256::digest(json))
}

/// An incoming event whose idempotency key is its envelope id.
pub fn incoming(id: &str, event: Event) -> Incoming {
    Incoming {
        envelope: envelope_at(id, 0),
        content_hash: content_hash(&event),
        idempotency_key: id.into(),
        delivery: None,
        partition: None,
        event,
    }
}

/// A USD campaign: 100 per click, 500 per conversion, 10 % commission.
pub fn created(campaign: &str, budget_minor: i64) -> CampaignEvent {
    CampaignEvent::Created {
        campaign_id: campaign.into(),
        name: format!("campaign {campaign}"),
        budget: usd(budget_minor),
        cost_per_click_minor: CLICK_COST,
        cost_per_conversion_minor: CONVERSION_COST,
        commission: CommissionRule::Percentage { basis_points: 1_000 },
    }
}

pub fn activated(campaign: &str) -> CampaignEvent {
    CampaignEvent::Activated {
        campaign_id: campaign.into(),
    }
}

pub fn paused(campaign: &str) -> CampaignEvent {
    CampaignEvent::Paused {
        campaign_id: campaign.into(),
        reason: "manual".into(),
    }
}

pub fn completed(campaign: &str) -> CampaignEvent {
    CampaignEvent::Completed {
        campaign_id: campaign.into(),
    }
}

pub fn budget_updated(campaign: &str, budget_minor: i64) -> CampaignEvent {
    CampaignEvent::BudgetUpdated {
        campaign_id: campaign.into(),
        budget: usd(budget_minor),
    }
}

pub fn impression(campaign: &str) -> CampaignEvent {
    CampaignEvent::ImpressionRecorded {
        campaign_id: campaign.into(),
        affiliate_id: AFFILIATE.into(),
    }
}

pub fn click(campaign: &str) -> CampaignEvent {
    CampaignEvent::ClickRecorded {
        campaign_id: campaign.into(),
        affiliate_id: AFFILIATE.into(),
    }
}

pub fn conversion(campaign: &str, value_minor: i64) -> CampaignEvent {
    CampaignEvent::ConversionRecorded {
        campaign_id: campaign.into(),
        affiliate_id: AFFILIATE.into(),
        value: usd(value_minor),
    }
}

pub fn requested(payment: &str, amount_minor: i64) -> PaymentEvent {
    PaymentEvent::Requested {
        payment_id: payment.into(),
        affiliate_id: AFFILIATE.into(),
        amount: usd(amount_minor),
    }
}

pub fn processed(payment: &str, amount_minor: i64, status: PaymentStatus, attempts: u32) -> PaymentEvent {
    PaymentEvent::Processed {
        payment_id: payment.into(),
        affiliate_id: AFFILIATE.into(),
        amount: usd(amount_minor),
        status,
        declared_hash: String::new(),
        attempts,
    }
}
