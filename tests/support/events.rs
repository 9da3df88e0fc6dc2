//! Events the black-box tests publish by hand, and publishing them.

use aerostream::codec::Codec;
use aerostream::config::Config;
use aerostream::generator::{Input, Planned};
use aerostream::produce;
use aerostream_actors::events::CommissionRule;
use aerostream_actors::{CampaignEvent, Envelope, Event, Money};

/// An envelope from the test source, written with schema v1.
pub fn envelope(id: &str, event_type: &str, time_ms: i64, subject: Option<&str>) -> Envelope {
    Envelope {
        id: id.into(),
        event_type: event_type.into(),
        source: "test".into(),
        time_ms,
        subject: subject.map(str::to_owned),
        correlation_id: None,
        causation_id: None,
        schema_version: "v1".into(),
    }
}

/// Campaign event `event` of type `event_type` (its CloudEvents type), with event id `id`, keyed by
/// its campaign.
pub fn campaign_event(id: &str, event_type: &str, event: CampaignEvent) -> Planned {
    let subject = event.campaign_id().to_owned();
    Planned {
        input: Input::Campaigns,
        envelope: envelope(id, event_type, 1_767_225_600_000, Some(&subject)),
        idempotency_key: None,
        event: Event::Campaign(event),
    }
}

/// `CampanaCreada` for `campaign_id` (a budget of 1 000 000 USD cents, a 10 % commission), with
/// event id `id`.
pub fn created(campaign_id: &str, id: &str) -> Planned {
    campaign_event(
        id,
        "CampanaCreada",
        CampaignEvent::Created {
            campaign_id: campaign_id.into(),
            name: format!("Campaign {campaign_id}"),
            budget: Money::positive(1_000_000, "USD").unwrap(),
            cost_per_click_minor: 10,
            cost_per_conversion_minor: 100,
            commission: CommissionRule::Percentage { basis_points: 1_000 },
        },
    )
}

/// `CampanaActivada` for `campaign_id`, with event id `id`.
pub fn activated(campaign_id: &str, id: &str) -> Planned {
    campaign_event(
        id,
        "CampanaActivada",
        CampaignEvent::Activated {
            campaign_id: campaign_id.into(),
        },
    )
}

/// An impression for `campaign_id`, with event id `id`.
pub fn impression(campaign_id: &str, id: &str) -> Planned {
    Planned {
        input: Input::Campaigns,
        envelope: envelope(id, "ImpresionRegistrada", 1_767_225_700_000, Some(campaign_id)),
        idempotency_key: None,
        event: Event::Campaign(CampaignEvent::ImpressionRecorded {
            campaign_id: campaign_id.into(),
            affiliate_id: "af-0001".into(),
        }),
    }
}

/// Publishes `events` to the inputs of `config` as fast as the broker takes them.
pub fn publish(runtime: &tokio::runtime::Runtime, config: &Config, events: &[Planned]) {
    runtime
        .block_on(produce::publish(config, &Codec::shipped(), events, 0))
        .expect("events published");
}
