//! Reads what landed on a topic: a [`TopicReader`] subscribes before traffic starts (so it sees
//! every message) and later collects messages until a condition holds.

use futures::StreamExt;
use pulsar::{Consumer, Pulsar, SubType, TokioExecutor};
use std::collections::BTreeMap;
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
    let mut producer = client.producer().with_topic(topic).build().await?;
    let mut message = producer.create_message().with_content(payload).with_key(key);
    for (name, value) in properties {
        message = message.with_property(*name, *value);
    }
    message.send_non_blocking().await?.await?;
    Ok(())
}

/// One message as a test cares about it: its properties and payload.
#[derive(Debug, Clone)]
pub struct Received {
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
