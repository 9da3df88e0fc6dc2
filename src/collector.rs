//! The event collector behind `POST /event-collector/events`: partners send structured-mode
//! CloudEvents JSON, one event or an array; every event is validated (schema of its type, then the
//! same decoding and rules as a consumed message) before any is published, then each is published
//! in its Avro form with the SPEC §3 properties to the topic of the input that consumes its kind,
//! and the answer waits for the broker's receipts.
//!
//! The body must be sent as JSON (`Content-Type` one of [`MEDIA_TYPES`], parameters such as
//! `charset` allowed); any other content type is refused with 415 before the body is read.
//!
//! A batch is validated whole: one invalid event refuses the batch and publishes nothing. A
//! publish failure midway (broker down) answers 503 after some events may have been published; the
//! client sends the batch again and the consumers drop the repeats by event id.

use crate::broker::{self, Client, Producer};
use crate::codec::{Codec, DecodeError, Encoded};
use crate::config::Config;
use crate::telemetry::COLLECTOR_EVENTS;
use aerostream_actors::{AggregateKind, Incoming};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The content types the collector takes: JSON, and structured-mode CloudEvents JSON (one event
/// or a batch).
pub const MEDIA_TYPES: [&str; 3] = [
    "application/json",
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
];

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("unsupported Content-Type {content_type}; send one of {}", MEDIA_TYPES.join(", "))]
    UnsupportedMediaType { content_type: String },
    #[error("the body is not JSON: {0}")]
    InvalidJson(String),
    #[error("the body holds no event")]
    Empty,
    #[error("event {index}: {error}")]
    Invalid { index: usize, error: DecodeError },
    #[error("event {index}: {kind} events are not accepted by the collector")]
    NotAccepted { index: usize, kind: &'static str },
    #[error("over the collector's rate of {per_second} events/s; retry after {retry_after:?}")]
    RateLimited { per_second: u32, retry_after: Duration },
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
}

impl CollectError {
    /// The `error` code of the API answer.
    pub fn code(&self) -> &'static str {
        match self {
            CollectError::UnsupportedMediaType { .. } => "unsupported_media_type",
            CollectError::InvalidJson(_) => "invalid_json",
            CollectError::Empty => "empty_batch",
            CollectError::Invalid { error, .. } => error.reason(),
            CollectError::NotAccepted { .. } => "not_accepted",
            CollectError::RateLimited { .. } => "rate_limited",
            CollectError::Unavailable(_) => "unavailable",
        }
    }
}

/// A validated event, ready to publish.
pub struct Prepared {
    pub encoded: Encoded,
    pub incoming: Incoming,
    topic: String,
}

pub struct Collector {
    codec: Arc<Codec>,
    /// Full topic name per aggregate kind.
    topics: HashMap<AggregateKind, String>,
    limiter: DefaultDirectRateLimiter,
    per_second: u32,
    pub max_body_bytes: usize,
    /// Set once the daemon is connected to the broker.
    client: OnceLock<Client>,
    producers: tokio::sync::Mutex<HashMap<String, Producer>>,
}

impl Collector {
    pub fn new(config: &Config, codec: Arc<Codec>) -> Collector {
        let collector = &config.collector;
        let topic = |input: &str| config.broker.topic(&config.inputs[input].topic);
        let positive = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        Collector {
            codec,
            topics: HashMap::from([
                (AggregateKind::Campaign, topic(&collector.campaign_input)),
                (AggregateKind::Payment, topic(&collector.payment_input)),
                (AggregateKind::Report, topic(&collector.report_input)),
            ]),
            limiter: RateLimiter::direct(
                Quota::per_second(positive(collector.rate_per_second)).allow_burst(positive(collector.burst)),
            ),
            per_second: collector.rate_per_second,
            max_body_bytes: collector.max_body_bytes,
            client: OnceLock::new(),
            producers: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The broker connection to publish with.
    pub fn connected(&self, client: Client) {
        let _ = self.client.set(client);
    }

    /// Checks a request's media type: `essence` is its `Content-Type` without parameters (`None`:
    /// no header, or one that does not parse), `header` the header as sent, for the answer.
    pub fn check_media_type(&self, essence: Option<&str>, header: Option<&str>) -> Result<(), CollectError> {
        if essence.is_some_and(|essence| MEDIA_TYPES.contains(&essence)) {
            return Ok(());
        }
        metrics::counter!(COLLECTOR_EVENTS, "outcome" => "invalid").increment(1);
        let content_type = header.map_or_else(|| "(none)".to_owned(), |header| format!("{header:?}"));
        tracing::info!(content_type = %content_type, "Event collector refused a request's content type.");
        Err(CollectError::UnsupportedMediaType { content_type })
    }

    /// Parses and validates a request body: one event or an array of them.
    pub fn prepare(&self, body: &[u8]) -> Result<Vec<Prepared>, CollectError> {
        let json: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| CollectError::InvalidJson(e.to_string()))?;
        let events = match json {
            serde_json::Value::Array(events) => events,
            single => vec![single],
        };
        if events.is_empty() {
            return Err(CollectError::Empty);
        }
        let prepared: Result<Vec<Prepared>, CollectError> = events
            .iter()
            .enumerate()
            .map(|(index, event)| {
                let (encoded, incoming) = self
                    .codec
                    .encode_json(event)
                    .map_err(|error| CollectError::Invalid { index, error })?;
                let kind = incoming.aggregate().kind;
                // Switching the report version is an admin action (PUT /api/reports/version).
                if matches!(
                    incoming.event,
                    aerostream_actors::Event::Report(aerostream_actors::ReportEvent::VersionChanged { .. })
                ) {
                    return Err(CollectError::NotAccepted {
                        index,
                        kind: "VersionReporteCambiada",
                    });
                }
                let topic = self.topics[&kind].clone();
                Ok(Prepared {
                    encoded,
                    incoming,
                    topic,
                })
            })
            .collect();
        if let Err(error) = &prepared {
            metrics::counter!(COLLECTOR_EVENTS, "outcome" => "invalid").increment(1);
            tracing::info!(error = %error, "Event collector refused a batch.");
        }
        prepared
    }

    /// Publishes validated events, within the rate limit; returns their ids.
    pub async fn publish(&self, events: Vec<Prepared>) -> Result<Vec<String>, CollectError> {
        let count = u32::try_from(events.len())
            .ok()
            .and_then(NonZeroU32::new)
            .unwrap_or(NonZeroU32::MIN);
        let limited = |retry_after| {
            metrics::counter!(COLLECTOR_EVENTS, "outcome" => "rate_limited")
                .increment(u64::from(count.get()));
            CollectError::RateLimited {
                per_second: self.per_second,
                retry_after,
            }
        };
        match self.limiter.check_n(count) {
            Ok(Ok(())) => {}
            Ok(Err(not_until)) => {
                return Err(limited(not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ))))
            }
            // More events in one request than the burst allows: never admissible as one batch.
            Err(_) => return Err(limited(Duration::from_secs(1))),
        }
        let client = self
            .client
            .get()
            .ok_or_else(|| CollectError::Unavailable("not connected to the broker yet".into()))?;
        let mut producers = self.producers.lock().await;
        let mut receipts = Vec::with_capacity(events.len());
        let mut ids = Vec::with_capacity(events.len());
        for event in events {
            let producer = match producers.entry(event.topic.clone()) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    let producer = broker::producer(client, event.topic.clone())
                        .await
                        .map_err(|e| CollectError::Unavailable(e.to_string()))?;
                    entry.insert(producer)
                }
            };
            let id = event.incoming.envelope.id.clone();
            let sent = broker::send_event(producer, id.clone(), event.encoded).await;
            match sent {
                Ok(receipt) => receipts.push(receipt),
                Err(e) => {
                    producers.remove(&event.topic);
                    return Err(CollectError::Unavailable(e.to_string()));
                }
            }
            ids.push(id);
        }
        drop(producers);
        for receipt in receipts {
            receipt
                .await
                .map_err(|e| CollectError::Unavailable(e.to_string()))?;
        }
        metrics::counter!(COLLECTOR_EVENTS, "outcome" => "accepted").increment(ids.len() as u64);
        Ok(ids)
    }
}
