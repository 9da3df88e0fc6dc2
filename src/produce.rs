//! `aerostream produce`: publishes a generated stream (see [`crate::generator`]) and writes the
//! state it must produce as JSON.

use crate::broker::{self, BrokerError};
use crate::codec::Codec;
use crate::config::Config;
use crate::generator::{self, Input, Planned};
use futures::StreamExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("pulsar: {0}")]
    Pulsar(#[from] pulsar::Error),
    #[error("encoding {event_type}: {detail}")]
    Encode { event_type: String, detail: String },
    #[error("the config has no input named {0:?}")]
    MissingInput(&'static str),
    #[error("writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

/// What `produce` reports when done.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Messages published, duplicates and conflicts included.
    pub published: usize,
    /// Distinct events of the stream (conflicts not counted).
    pub distinct: usize,
    pub conflicts: usize,
    pub elapsed: Duration,
}

const MAX_OUTSTANDING: usize = 1_000;

/// Publishes `events` in order at up to `rate` events/s (0: as fast as possible) and waits for
/// the broker's receipts.
pub async fn publish(
    config: &Config,
    codec: &Codec,
    events: &[Planned],
    rate: u32,
) -> Result<(), ProduceError> {
    let (_never, mut shutdown) = watch::channel(false);
    let client = broker::connect(&config.broker, &mut shutdown).await?;
    let topic = |name: &'static str| {
        config
            .inputs
            .get(name)
            .map(|i| config.broker.topic(&i.topic))
            .ok_or(ProduceError::MissingInput(name))
    };
    let mut campaigns = broker::producer(&client, topic("campaigns")?).await?;
    let mut payments = broker::producer(&client, topic("payments")?).await?;
    let started = Instant::now();
    let mut receipts = futures::stream::FuturesUnordered::new();
    for (i, planned) in events.iter().enumerate() {
        if rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / f64::from(rate));
            tokio::time::sleep_until(due.into()).await;
        }
        let encoded = codec
            .encode_input(
                &planned.envelope,
                planned.idempotency_key.as_deref(),
                &planned.event,
            )
            .map_err(|e| ProduceError::Encode {
                event_type: planned.envelope.event_type.clone(),
                detail: e.to_string(),
            })?;
        let producer = match planned.input {
            Input::Campaigns => &mut campaigns,
            Input::Payments => &mut payments,
        };
        let receipt = broker::send_event(producer, planned.envelope.id.clone(), encoded).await?;
        receipts.push(receipt);
        while receipts.len() >= MAX_OUTSTANDING {
            receipts.next().await.expect("non-empty")?;
        }
    }
    while let Some(receipt) = receipts.next().await {
        receipt?;
    }
    Ok(())
}

/// Generates, writes the expected state to `expected_out`, publishes the stream and then the
/// conflicts (reused idempotency keys), which the daemon must dead-letter.
pub async fn run(
    config: &Config,
    codec: &Codec,
    options: &generator::Options,
    rate: u32,
    expected_out: &PathBuf,
) -> Result<Report, ProduceError> {
    let plan = generator::plan(options);
    let json = serde_json::to_vec_pretty(&plan.expected).expect("views serialize");
    std::fs::write(expected_out, json).map_err(|e| ProduceError::Write(expected_out.clone(), e))?;
    let started = Instant::now();
    publish(config, codec, &plan.stream, rate).await?;
    publish(config, codec, &plan.conflicts, rate).await?;
    Ok(Report {
        published: plan.stream.len() + plan.conflicts.len(),
        distinct: plan.distinct,
        conflicts: plan.conflicts.len(),
        elapsed: started.elapsed(),
    })
}
