//! One consumer per partition of an input topic, read as one stream.
//!
//! The `pulsar` client can consume a partitioned topic itself, but it then numbers the partition
//! consumers from 0 in every process, ignoring the consumer id it is given; brokers that key
//! consumers by id across connections (SPEC §11) then confuse two daemons' consumers of one
//! partition. Subscribing to each `<topic>-partition-<n>` on its own keeps every consumer id
//! unique (`broker::unique_consumer_id`).
//!
//! The consumers of one [`Partitions`] run on a `pulsar` client of their own, made for them and
//! dropped with them, or with the subscription attempt that failed, so that nothing else holds
//! their connection. The reason is a subscribe the client gives up on (no answer within the
//! operation timeout) that the broker carries out later: the broker then holds a consumer nobody
//! reads, with no permits, in the way of every later consumer of the subscription (the active one
//! of a Failover subscription, the one of an Exclusive one), for as long as its connection lives.
//! Seen in a chaos run: a broker busy for a minute carried out each input's abandoned subscribe
//! just before the retry, on the daemon's shared connection, and the daemon heard nothing more
//! (`tests/broker_restart.rs`, `a_subscribe_the_broker_answers_too_late_leaves_no_consumer_in_the_way`).
//! The Java client closes such a consumer; the `pulsar` crate cannot, so the connection goes:
//! a failed attempt drops its client, the connection closes, and the broker drops every consumer
//! on it.

use crate::broker::{self, Client};
use futures::{FutureExt, StreamExt};
use pulsar::consumer::Message;
use pulsar::proto::MessageIdData;
use pulsar::{Consumer, ConsumerBuilder, Pulsar, TokioExecutor};
use std::task::Poll;
use std::time::{Duration, Instant};

type PartitionConsumer = Consumer<Vec<u8>, TokioExecutor>;

/// The topic of partition `partition` of the partitioned `topic`.
pub fn partition_topic(topic: &str, partition: u32) -> String {
    format!("{topic}-partition-{partition}")
}

/// The partition number of a partition's topic (`<topic>-partition-<n>`); 0 for a topic that is
/// not a partition.
pub fn partition_of(topic: &str) -> u32 {
    topic
        .rsplit_once("-partition-")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

pub struct Partitions {
    consumers: Vec<PartitionConsumer>,
    /// The client the consumers were built on, theirs alone (see the module's doc); declared
    /// after them, so dropped after them.
    client: Pulsar<TokioExecutor>,
    /// The topic of each consumer's partition, in the order of `consumers`.
    topics: Vec<String>,
    /// The consumer [`Partitions::next`] polls first: each in turn, so that no partition waits
    /// behind a busy one.
    next_first: usize,
}

impl Partitions {
    /// Subscribes to every partition of `topic` (or to `topic` when it is not partitioned), each
    /// consumer built by `build` from a builder with the partition's topic, a fresh id and that
    /// topic, on a client of their own.
    pub async fn subscribe(
        client: &Client,
        topic: &str,
        build: impl Fn(ConsumerBuilder<TokioExecutor>, u64, &str) -> ConsumerBuilder<TokioExecutor>,
    ) -> Result<Partitions, pulsar::Error> {
        let topics = match client.partitions(topic).await? {
            0 => vec![topic.to_owned()],
            n => (0..n).map(|i| partition_topic(topic, i)).collect(),
        };
        Partitions::subscribe_to(client, topics, build).await
    }

    /// Subscribes to each of `topics` (partitions of one topic, or the topic itself), each
    /// consumer built as for [`Partitions::subscribe`]. With no topics, nothing ever arrives.
    pub async fn subscribe_to(
        client: &Client,
        topics: Vec<String>,
        build: impl Fn(ConsumerBuilder<TokioExecutor>, u64, &str) -> ConsumerBuilder<TokioExecutor>,
    ) -> Result<Partitions, pulsar::Error> {
        let own = client.fresh().await?;
        let mut consumers = Vec::with_capacity(topics.len());
        for partition in &topics {
            let id = broker::unique_consumer_id();
            let builder = own.consumer().with_topic(partition).with_consumer_id(id);
            consumers.push(build(builder, id, partition).build::<Vec<u8>>().await?);
        }
        // As the client names them on the messages it delivers.
        let topics = consumers.iter().flat_map(|c| c.topics()).collect();
        Ok(Partitions {
            consumers,
            client: own,
            topics,
            next_first: 0,
        })
    }

    /// Replaces the consumer of partition `topic` (as the client names it) with a new one, built
    /// by `build` as at [`Partitions::subscribe`] with a fresh id, on the same client: the old one
    /// is closed first, so what it held goes back to the subscription.
    pub async fn renew(
        &mut self,
        topic: &str,
        build: impl Fn(ConsumerBuilder<TokioExecutor>, u64, &str) -> ConsumerBuilder<TokioExecutor>,
    ) -> Result<(), pulsar::Error> {
        let Some(at) = self.topics.iter().position(|t| t == topic) else {
            return Ok(());
        };
        while let Some(Some(_released)) = self.consumers[at].next().now_or_never() {}
        self.consumers[at].close().await?;
        let id = broker::unique_consumer_id();
        let builder = self.client.consumer().with_topic(topic).with_consumer_id(id);
        self.consumers[at] = build(builder, id, topic).build::<Vec<u8>>().await?;
        Ok(())
    }

    /// The next message of any partition; `None` once a partition's stream ended.
    pub async fn next(&mut self) -> Option<Result<Message<Vec<u8>>, pulsar::Error>> {
        std::future::poll_fn(|cx| {
            let count = self.consumers.len();
            for turn in 0..count {
                let at = (self.next_first + turn) % count;
                if let Poll::Ready(received) = self.consumers[at].poll_next_unpin(cx) {
                    self.next_first = (at + 1) % count;
                    return Poll::Ready(received);
                }
            }
            Poll::Pending
        })
        .await
    }

    fn of(&mut self, message: &Message<Vec<u8>>) -> &mut PartitionConsumer {
        let at = self
            .topics
            .iter()
            .position(|topic| *topic == message.topic)
            .unwrap_or(0);
        &mut self.consumers[at]
    }

    pub async fn ack(&mut self, message: &Message<Vec<u8>>) -> Result<(), pulsar::Error> {
        Ok(self.of(message).ack(message).await?)
    }

    pub async fn nack(&mut self, message: &Message<Vec<u8>>) -> Result<(), pulsar::Error> {
        Ok(self.of(message).nack(message).await?)
    }

    /// Acks everything up to `message` on its partition.
    pub async fn cumulative_ack(&mut self, message: &Message<Vec<u8>>) -> Result<(), pulsar::Error> {
        Ok(self.of(message).cumulative_ack(message).await?)
    }

    /// The topic of each partition (the topic itself when it is not partitioned).
    pub fn topics(&self) -> Vec<String> {
        self.topics.clone()
    }

    /// The id of the last message on each partition when asked, by partition topic: a reader that
    /// started from the earliest message has read the partition to its end once it reaches it.
    /// Each answer is bounded by `timeout`.
    pub async fn last_message_ids(
        &mut self,
        timeout: Duration,
    ) -> Vec<(String, Result<MessageIdData, pulsar::Error>)> {
        let mut ids = Vec::with_capacity(self.consumers.len());
        for consumer in &mut self.consumers {
            let topic = consumer.topics().into_iter().next().unwrap_or_default();
            let answer = match tokio::time::timeout(timeout, consumer.get_last_message_id()).await {
                Ok(Ok(ids)) => ids
                    .into_iter()
                    .next()
                    .ok_or_else(|| pulsar::Error::Custom("the broker answered no message id".into())),
                Ok(Err(error)) => Err(error),
                Err(_) => Err(pulsar::Error::Custom(format!(
                    "no last message id within {timeout:?}"
                ))),
            };
            ids.push((topic, answer));
        }
        ids
    }

    /// Ends every partition's subscription (a reader's own, which nobody else uses), each attempt
    /// bounded by `attempt`. Like [`Partitions::close`], it drops what is still queued first.
    pub async fn unsubscribe(&mut self, attempt: Duration) -> Result<(), pulsar::Error> {
        for consumer in &mut self.consumers {
            while let Some(Some(_dropped)) = consumer.next().now_or_never() {}
            match tokio::time::timeout(attempt, consumer.unsubscribe()).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(pulsar::Error::Custom(format!(
                        "unsubscribing took more than {attempt:?}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Closes every partition's consumer after the acks already given have reached the broker.
    ///
    /// The `pulsar` client routes acks and the close request through its consumer engine, which
    /// stalls while the receive queue is full. Messages still queued are therefore taken and
    /// dropped unacked (the broker redelivers them to the next consumer) until the close goes
    /// through, each attempt bounded by `attempt`, all of them by `timeout`.
    pub async fn close(&mut self, attempt: Duration, timeout: Duration) -> Result<(), pulsar::Error> {
        let deadline = Instant::now() + timeout;
        for consumer in &mut self.consumers {
            loop {
                while let Some(Some(_released)) = consumer.next().now_or_never() {}
                match tokio::time::timeout(attempt, consumer.close()).await {
                    Ok(result) => {
                        result?;
                        break;
                    }
                    Err(_) if Instant::now() < deadline => continue,
                    Err(_) => {
                        return Err(pulsar::Error::Custom(format!(
                            "closing the consumer took more than {timeout:?}"
                        )))
                    }
                }
            }
        }
        Ok(())
    }
}
