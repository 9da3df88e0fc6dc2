//! The outbox publisher: publishes committed entries in commit order, then deletes them.
//!
//! Entries are output events (to their output topic) and changelog records (to the changelog
//! topic, see [`crate::changelog`]). A batch is sent without waiting between messages; entries are
//! deleted in order as their receipts arrive, and at the first failure the rest of the batch is
//! left for the next attempt. An entry is deleted only after the broker's receipt, so a crash
//! re-publishes it; output ids are derived from the input event, so consumers deduplicate the
//! re-publish by id, and a changelog record is imported by version, so a repeat changes nothing.
//!
//! Only durable entries are published: the publisher flushes the store (the group commit the acks
//! share) before it sends a batch. An entry published before its commit was durable could outlive
//! that commit: after a crash the store would have lost the commit while the changelog and the
//! output topics had its effects, and the follower does not import this daemon's own records (it
//! holds them), so their ledger moves were lost (seen in the takeover test: a commission missing
//! on a daemon restarted after a SIGKILL).
//!
//! An entry that can never be published (it does not parse or cannot be encoded: written by
//! another version, or damaged) is poison: retried, it would hold every later entry, and every ack
//! waiting for them, forever. It is set aside in the `outbox_poison` tree with its reason
//! ([`SledStore::outbox_set_aside`]), counted (`aerostream_outbox_poisoned_total`) and logged, and
//! the publisher goes on.

use crate::backoff::Backoff;
use crate::broker::{self, Client, Producer};
use crate::codec::{Codec, Encoded};
use crate::config::{BrokerConfig, ChangelogConfig, OutputsConfig};
use crate::store::{Publishable, SledStore};
use crate::telemetry::{CHANGELOG_RECORD, OUTBOX_BACKLOG, OUTBOX_POISONED, OUTBOX_PUBLISHED};
use aerostream_actors::OutputBody;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Entries read (and published) at once.
pub const BATCH: usize = 256;
/// Longest wait between looks at an empty outbox (a commit wakes the publisher sooner).
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Between attempts while publishing fails.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));

/// The `kind` label of `aerostream_outbox_poisoned_total`: an output event that cannot be
/// encoded, or an entry that does not parse (a changelog record is published as stored, so only
/// a record that does not parse is set aside, as `unreadable`).
pub const ENTRY_KINDS: [&str; 2] = ["output", "unreadable"];

/// Why an entry can never be published.
struct Poison {
    kind: &'static str,
    reason: String,
}

fn topic_of<'a>(outputs: &'a OutputsConfig, body: &OutputBody) -> &'a str {
    match body {
        OutputBody::BudgetAlert { .. } => &outputs.alerts_topic,
        OutputBody::CommissionCalculated { .. } => &outputs.commissions_topic,
        OutputBody::PaymentSucceeded { .. } | OutputBody::PaymentFailed { .. } => &outputs.payments_topic,
        OutputBody::CampaignState { .. } => &outputs.state_topic,
        OutputBody::ReportGenerated { .. } => &outputs.reports_topic,
    }
}

/// Where the publisher sends entries.
pub struct Destinations {
    pub broker: BrokerConfig,
    pub outputs: OutputsConfig,
    pub changelog: ChangelogConfig,
}

/// One entry as it goes on the wire.
struct Outgoing {
    topic: String,
    key: String,
    payload: Vec<u8>,
    properties: Vec<(&'static str, String)>,
    /// Metric label.
    event_type: &'static str,
}

/// `entry` as it goes on the wire; `changelog_partitions` is the changelog topic's partition count
/// (0: not partitioned).
fn outgoing(
    destinations: &Destinations,
    changelog_partitions: u32,
    codec: &Codec,
    entry: Publishable,
) -> Result<Outgoing, Poison> {
    let poison = |kind| move |reason: String| Poison { kind, reason };
    match entry {
        Publishable::Output(event) => {
            let Encoded {
                payload,
                dataschema,
                event_type,
                key,
            } = codec
                .encode_output(&event)
                .map_err(|e| format!("cannot encode output {}: {e}", event.id))
                .map_err(poison("output"))?;
            Ok(Outgoing {
                topic: destinations
                    .broker
                    .topic(topic_of(&destinations.outputs, &event.body)),
                key,
                payload,
                properties: vec![
                    ("ce_id", event.id),
                    ("ce_type", event_type.to_owned()),
                    ("ce_dataschema", dataschema),
                ],
                event_type,
            })
        }
        Publishable::Change {
            key,
            instance,
            partition,
            payload,
        } => Ok(Outgoing {
            topic: crate::changelog::record_topic(
                &destinations.broker.topic(&destinations.changelog.topic),
                changelog_partitions,
                partition,
            ),
            key,
            payload,
            properties: vec![("instance", instance)],
            event_type: CHANGELOG_RECORD,
        }),
    }
}

pub async fn run(
    client: Client,
    destinations: Destinations,
    codec: Arc<Codec>,
    store: Arc<SledStore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut producers: HashMap<String, Producer> = HashMap::new();
    // Records go to the changelog partition of their input partition (docs/TAKEOVER.md).
    let changelog_partitions = if destinations.changelog.enabled {
        let topic = destinations.broker.topic(&destinations.changelog.topic);
        match broker::with_backoff("changelog partitions", &mut shutdown, || {
            client.partitions(&topic)
        })
        .await
        {
            Ok(partitions) => partitions,
            Err(_) => return,
        }
    } else {
        0
    };
    // Failed attempts in a row, for the backoff.
    let mut failures = 0;
    loop {
        metrics::gauge!(OUTBOX_BACKLOG).set(store.outbox_len() as f64);
        let batch = match store.outbox_publishable(BATCH) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(error = %error, "Cannot read the outbox.");
                failures += 1;
                if !BACKOFF.wait(failures, &mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = store.outbox_added() => continue,
                _ = tokio::time::sleep(IDLE_POLL) => continue,
                _ = shutdown.changed() => return,
            }
        }
        // The batch's commits durable first (see the module's doc).
        if let Err(error) = store.flush().await {
            tracing::error!(error = %error, "Cannot make the outbox durable before publishing it.");
            failures += 1;
            if !BACKOFF.wait(failures, &mut shutdown).await {
                return;
            }
            continue;
        }
        // Send the whole batch, then take the receipts in order.
        let mut receipts = Vec::with_capacity(batch.len());
        let mut failed = false;
        for (seq, entry) in batch {
            let message = entry
                .map_err(|error| Poison {
                    kind: "unreadable",
                    reason: error.to_string(),
                })
                .and_then(|entry| outgoing(&destinations, changelog_partitions, &codec, entry));
            let message = match message {
                Ok(message) => message,
                Err(poison) => match store.outbox_set_aside(&seq, &poison.reason) {
                    Ok(()) => {
                        metrics::counter!(OUTBOX_POISONED, "kind" => poison.kind).increment(1);
                        tracing::error!(kind = poison.kind, reason = %poison.reason, "An outbox entry can never be published; set aside in the outbox_poison tree.");
                        continue;
                    }
                    Err(error) => {
                        tracing::error!(error = %error, "Cannot set a poison outbox entry aside.");
                        failed = true;
                        break;
                    }
                },
            };
            if !producers.contains_key(&message.topic) {
                let built = broker::with_backoff("outbox producer", &mut shutdown, || {
                    broker::batching_producer(&client, message.topic.clone())
                })
                .await;
                match built {
                    Ok(p) => producers.insert(message.topic.clone(), p),
                    Err(_) => return,
                };
            }
            let producer = producers.get_mut(&message.topic).expect("inserted above");
            let mut builder = producer
                .create_message()
                .with_content(message.payload)
                .with_key(message.key);
            for (name, value) in message.properties {
                builder = builder.with_property(name, value);
            }
            match builder.send_non_blocking().await {
                Ok(receipt) => receipts.push((seq, message.topic, message.event_type, receipt)),
                Err(error) => {
                    tracing::warn!(error = %error, topic = %message.topic, "Outbox publish failed; retrying.");
                    producers.remove(&message.topic);
                    failed = true;
                    break;
                }
            }
        }
        // Published entries are deleted at once, in one write.
        let mut published = Vec::with_capacity(receipts.len());
        for (seq, topic, event_type, receipt) in receipts {
            if failed {
                // An earlier entry is not published: later ones are published again with it.
                continue;
            }
            match receipt.await {
                Ok(_) => {
                    metrics::counter!(OUTBOX_PUBLISHED, "event_type" => event_type).increment(1);
                    published.push(seq);
                }
                Err(error) => {
                    tracing::warn!(error = %error, topic = %topic, "Outbox publish failed; retrying.");
                    producers.remove(&topic);
                    failed = true;
                }
            }
        }
        if let Err(error) = store.outbox_remove(&published) {
            // Published again later (deduplicable by id), once the store writes.
            tracing::error!(error = %error, "Cannot delete published outbox entries.");
            failed = true;
        }
        store.outbox_published();
        if failed {
            failures += 1;
            if !BACKOFF.wait(failures, &mut shutdown).await {
                return;
            }
        } else {
            failures = 0;
        }
    }
}
