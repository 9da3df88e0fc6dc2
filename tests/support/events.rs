//! Events the black-box tests publish by hand, and publishing them.

use aerostream::codec::Codec;
use aerostream::config::Config;
use aerostream::generator::{Input, Planned};
use aerostream::produce;
use aerostream_actors::{CampaignEvent, Envelope, Event};

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
