//! The outbox publisher: publishes committed output events in commit order, then deletes them.
//!
//! An entry is deleted only after the broker's receipt, so a crash re-publishes it; its id is
//! derived from the input event, so consumers deduplicate the re-publish by id.

use crate::broker::{self, Client, Producer};
use crate::codec::Codec;
use crate::config::{BrokerConfig, OutputsConfig};
use crate::store::SledStore;
use crate::telemetry::{OUTBOX_BACKLOG, OUTBOX_PUBLISHED};
use aerostream_actors::OutputBody;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const BATCH: usize = 256;
const IDLE_POLL: Duration = Duration::from_millis(50);

fn topic_of<'a>(outputs: &'a OutputsConfig, body: &OutputBody) -> &'a str {
    match body {
        OutputBody::BudgetAlert { .. } => &outputs.alerts_topic,
        OutputBody::CommissionCalculated { .. } => &outputs.commissions_topic,
        OutputBody::PaymentSucceeded { .. } | OutputBody::PaymentFailed { .. } => &outputs.payments_topic,
        OutputBody::CampaignState { .. } => &outputs.state_topic,
        OutputBody::ReportGenerated { .. } => &outputs.reports_topic,
    }
}

pub async fn run(
    client: Client,
    broker: BrokerConfig,
    outputs: OutputsConfig,
    codec: Arc<Codec>,
    store: Arc<SledStore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut producers: HashMap<String, Producer> = HashMap::new();
    loop {
        metrics::gauge!(OUTBOX_BACKLOG).set(store.outbox_len() as f64);
        let batch = match store.outbox_batch(BATCH) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(error = %error, "Cannot read the outbox.");
                Vec::new()
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(IDLE_POLL) => continue,
                _ = shutdown.changed() => return,
            }
        }
        for (seq, event) in batch {
            let topic = broker.topic(topic_of(&outputs, &event.body));
            let encoded = match codec.encode_output(&event) {
                Ok(encoded) => encoded,
                Err(error) => {
                    // Cannot happen with shipped schemas; keep the entry and make it visible.
                    tracing::error!(error = %error, id = %event.id, "Cannot encode output event.");
                    break;
                }
            };
            if !producers.contains_key(&topic) {
                let built = broker::with_backoff("outbox producer", &mut shutdown, || {
                    broker::producer(&client, topic.clone())
                })
                .await;
                match built {
                    Ok(p) => producers.insert(topic.clone(), p),
                    Err(_) => return,
                };
            }
            let producer = producers.get_mut(&topic).expect("inserted above");
            let sent = async {
                producer
                    .create_message()
                    .with_content(encoded.payload)
                    .with_key(encoded.key)
                    .with_property("ce_id", event.id.clone())
                    .with_property("ce_type", encoded.event_type)
                    .with_property("ce_dataschema", encoded.dataschema)
                    .send_non_blocking()
                    .await?
                    .await
            }
            .await;
            match sent {
                Ok(_) => {
                    if let Err(error) = store.outbox_remove(&seq) {
                        tracing::error!(error = %error, "Cannot delete a published outbox entry.");
                    }
                    metrics::counter!(OUTBOX_PUBLISHED, "event_type" => encoded.event_type).increment(1);
                }
                Err(error) => {
                    tracing::warn!(error = %error, topic = %topic, "Outbox publish failed; retrying.");
                    producers.remove(&topic);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = shutdown.changed() => return,
                    }
                    break;
                }
            }
        }
    }
}
