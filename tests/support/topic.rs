//! Reads what landed on a topic: a [`TopicReader`] subscribes before traffic starts (so it sees
//! every message) and later collects messages until a condition holds.

use futures::StreamExt;
use pulsar::{Consumer, Pulsar, SubType, TokioExecutor};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::unique_consumer_id;

/// Publishes `payload` to `topic` as is (bad payloads included) and waits for the receipt.
pub async fn send_raw(
    client: &Pulsar<TokioExecutor>,
    topic: &str,
    key: &str,
    properties: &[(&str, &str)],
    payload: Vec<u8>,
) -> anyhow::Result<()> {
    send_raw_with_key(client, topic, Some(key), properties, payload).await
}

/// [`send_raw`] with the key optional: `None` publishes a message without a key.
pub async fn send_raw_with_key(
    client: &Pulsar<TokioExecutor>,
    topic: &str,
    key: Option<&str>,
    properties: &[(&str, &str)],
    payload: Vec<u8>,
) -> anyhow::Result<()> {
    let mut producer = client.producer().with_topic(topic).build().await?;
    let mut message = producer.create_message().with_content(payload);
    if let Some(key) = key {
        message = message.with_key(key);
    }
    for (name, value) in properties {
        message = message.with_property(*name, *value);
    }
    message.send_non_blocking().await?.await?;
    Ok(())
}

/// One message as a test cares about it: its key, properties and payload.
#[derive(Debug, Clone)]
pub struct Received {
    pub key: Option<String>,
    pub properties: BTreeMap<String, String>,
    pub payload: Vec<u8>,
}

impl Received {
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties.get(key).map(String::as_str)
    }
}

/// An exclusive subscription on one topic.
pub struct TopicReader {
    topic: String,
    consumer: Consumer<Vec<u8>, TokioExecutor>,
    pub received: Vec<Received>,
}

impl TopicReader {
    /// Subscribes to `topic` (fully qualified) on `client`.
    pub async fn subscribe(client: &Pulsar<TokioExecutor>, topic: &str) -> anyhow::Result<TopicReader> {
        let consumer = client
            .consumer()
            .with_topic(topic)
            .with_subscription(format!("test-reader-{}", unique_consumer_id()))
            .with_subscription_type(SubType::Exclusive)
            .with_consumer_id(unique_consumer_id())
            .build::<Vec<u8>>()
            .await?;
        Ok(TopicReader {
            topic: topic.to_owned(),
            consumer,
            received: Vec::new(),
        })
    }

    /// Receives (and acks) messages until `done(received so far)` holds; fails after `timeout`.
    pub async fn collect_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(&self.received) {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = match tokio::time::timeout(left, self.consumer.next()).await {
                Ok(Some(message)) => message?,
                Ok(None) => anyhow::bail!("{}: consumer stream ended", self.topic),
                Err(_) => anyhow::bail!(
                    "{}: condition not met within {timeout:?} ({} messages received)",
                    self.topic,
                    self.received.len()
                ),
            };
            self.consumer.ack(&message).await?;
            self.received.push(Received {
                key: message.key(),
                properties: message
                    .payload
                    .metadata
                    .properties
                    .iter()
                    .map(|kv| (kv.key.clone(), kv.value.clone()))
                    .collect(),
                payload: message.payload.data.clone(),
            });
        }
        Ok(())
    }
}

/// Output events read back: distinct ids, and every copy received.
pub struct Published {
    pub distinct: BTreeSet<String>,
    pub copies: usize,
}

/// Reads the output topics until every expected output id has arrived.
#[cfg(test)]
pub fn collect_outputs(
    runtime: &tokio::runtime::Runtime,
    readers: &mut [TopicReader],
    expected: &BTreeSet<String>,
) -> Published {
    let ids = |readers: &[TopicReader]| -> BTreeSet<String> {
        readers
            .iter()
            .flat_map(|r| {
                r.received
                    .iter()
                    .filter_map(|m| m.property("ce_id").map(str::to_owned))
            })
            .collect()
    };
    super::daemon::wait_for("every expected output event", Duration::from_secs(120), || {
        for reader in readers.iter_mut() {
            // A short pass over each topic, then check the union.
            let _ = runtime.block_on(reader.collect_until(Duration::from_millis(200), |_| false));
        }
        ids(readers).is_superset(expected).then_some(())
    })
    .unwrap_or_else(|e| {
        let missing = expected.difference(&ids(readers)).count();
        panic!("{e}: {missing} expected output events missing")
    });
    Published {
        distinct: ids(readers),
        copies: readers.iter().map(|r| r.received.len()).sum(),
    }
}
