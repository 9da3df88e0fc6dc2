//! One consumer per input topic: receive → decode → actor (dedupe, decide, atomic commit) → flush → ack.
//!
//! At most `max_in_flight` messages are held at once; events of one aggregate are applied in arrival
//! order, others concurrently (see [`crate::dispatch`]). Nothing is acked before its commit is
//! durable; rejected and undecodable messages are acked only once their dead letter is published.
//! Acks leave in receive order, so the subscription's acknowledged range stays contiguous and a
//! consumer that takes over resumes from one position.
//!
//! The daemon, not the client, owns redelivery and dead-lettering: nothing is nacked and the
//! client has no ack timeout, so a message held for long (behind a barrier, a backlog, its
//! aggregate's earlier events) is neither redelivered nor dead-lettered while it waits. A message
//! whose processing fails (a store error, an actor that keeps crashing) is retried in place, its
//! aggregate's later events kept behind it, after a [`Backoff`]; once `max_redeliveries` retries
//! have failed too, it is dead-lettered with reason `max_redeliveries`, counted, and acked. While
//! the store cannot write, nothing is received, held messages wait without counting against
//! them, and consumption resumes by itself once the store writes again.

use crate::acking::{self, Runs};
use crate::backoff::Backoff;
use crate::broker::{self, BrokerError, Client, DeadLetter, Producer};
use crate::changelog::Scope;
use crate::codec::{Codec, MessageMeta};
use crate::config::{BrokerConfig, InputConfig, SubscriptionKind};
use crate::dispatch::{InOrder, KeyedQueue};
use crate::partitions::Partitions;
use crate::starvation;
use crate::store::SledStore;
use crate::telemetry::*;
use aerostream_actors::{AggregateKey, AggregateKind, ApplyError, DeliveryId, Incoming, Outcome, Registry};
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt};
use metrics::{counter, histogram};
use pulsar::consumer::Message;
use pulsar::{ConsumerBuilder, ConsumerOptions, TokioExecutor};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Mutex};
use tracing::Instrument as _;

/// Per-message log lines, each let through once per period with a count of those held back.
mod repeated {
    use crate::logging::{RateLimit, REPEATED_EVERY};
    pub static DEAD_LETTERING: RateLimit = RateLimit::new(REPEATED_EVERY);
    pub static NOT_DEAD_LETTERED: RateLimit = RateLimit::new(REPEATED_EVERY);
    pub static DEAD_LETTERED_COPY: RateLimit = RateLimit::new(REPEATED_EVERY);
    pub static RETRYING: RateLimit = RateLimit::new(REPEATED_EVERY);
    pub static STORE_WAIT: RateLimit = RateLimit::new(REPEATED_EVERY);
    pub static ACK_FAILED: RateLimit = RateLimit::new(REPEATED_EVERY);
}

/// What the processing of every input shares.
pub struct Pipeline {
    pub registry: Arc<Registry>,
    pub codec: Arc<Codec>,
    pub store: Arc<SledStore>,
    /// Changelog barriers (`None`: this daemon runs alone, without a changelog).
    pub follower: Option<crate::changelog::Follower>,
    /// An aggregate not handled for this long is caught up from the changelog first.
    pub takeover_gap: Duration,
    /// Input partitions this daemon asks to be active for (`daemon.preferred_partitions`).
    pub preferred_partitions: Vec<u32>,
}

/// What /health reads of one input: whether it is subscribed, and whether the messages it holds
/// are moving.
#[derive(Debug, Default)]
pub struct InputStatus {
    pub subscribed: AtomicBool,
    /// Messages received and not yet acked, nacked or dead-lettered.
    pub held: AtomicUsize,
    /// When a held message last finished, or the input last held none (ms since the epoch).
    progressed_ms: AtomicU64,
    /// Since start: messages received (every delivery), events applied (durable), and messages
    /// dead-lettered (rejected or refused). The same counts as the `consumed`, `applied`,
    /// `rejected` and `dead_lettered` counters, read without rendering /metrics.
    pub consumed: AtomicU64,
    pub applied: AtomicU64,
    pub dead_lettered: AtomicU64,
}

impl InputStatus {
    /// A message of input `name` arrived (any delivery): the `consumed` counter and count.
    fn received(&self, name: &str) {
        counter!(EVENTS_CONSUMED, "input" => name.to_string()).increment(1);
        self.consumed.fetch_add(1, Ordering::Relaxed);
    }

    /// How long the input has held messages without finishing any (`None` while it progresses).
    pub fn stalled_for(&self) -> Option<Duration> {
        if self.held.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let since = self.progressed_ms.load(Ordering::Relaxed);
        Some(Duration::from_millis(epoch_ms().saturating_sub(since)))
    }

    fn progressed(&self) {
        self.progressed_ms.store(epoch_ms(), Ordering::Relaxed);
    }

    fn holding(&self, held: usize) {
        if held == 0 || self.held.load(Ordering::Relaxed) == 0 {
            self.progressed();
        }
        self.held.store(held, Ordering::Relaxed);
    }
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What to do with a message once processing is over.
enum Verdict {
    Ack,
    /// Shutting down before it was done: neither acked nor nacked; the broker redelivers it once
    /// this consumer has closed.
    Leave,
}

/// Fail point (chaos only), `return(INPUT)` or `return(INPUT:N)`: on the first subscription of
/// input INPUT, once N messages (100 by default) have arrived, every later one is dropped unseen,
/// as by a broker that stops dispatching to a consumer that has permits: for the starvation
/// watchdog to notice.
pub const FAILPOINT_STARVE: &str = "ingest::starve";

/// Messages each partition's consumer asks the broker for ahead of time, at most. The `pulsar`
/// client asks for more when half of its queue is taken, and pulsar-lite dispatches what those
/// permits allow: with 4 096 instead of 1 024 a 100 000-event drain ran 28 000–37 000 events/s
/// instead of 23 000–27 000 at 34–42 ms of daemon CPU per 1 000 events instead of 43–50, peak RSS
/// 143–157 MiB instead of 106–111 (docs/BENCHMARKS.md, 2026-12-03 night).
const RECEIVE_QUEUE: usize = 4_096;

/// The receive queue (and batch size) of each partition's consumer of `input`: what it asks the
/// broker for ahead of time.
pub fn receive_queue(input: &InputConfig) -> u32 {
    RECEIVE_QUEUE.min(input.max_in_flight) as u32
}

/// The dead-letter reason of a message whose retries all failed.
pub const MAX_REDELIVERIES: &str = "max_redeliveries";

/// The input's dead-letter policy, carried out by the daemon (the client has none): a message
/// whose processing fails is retried in place, `backoff` apart, and dead-lettered once
/// `max_redeliveries` retries have failed too.
struct DeadLetters {
    producer: Mutex<Producer>,
    /// Remembers which messages were dead-lettered (`SledStore::dead_lettered`), so a copy the
    /// broker delivers again is neither dead-lettered nor counted twice.
    store: Arc<SledStore>,
    max_redeliveries: usize,
    backoff: Backoff,
    /// Ends the waits between attempts: the message is left unacked, for the broker to redeliver.
    shutdown: watch::Receiver<bool>,
}

/// What a piece of work finished: messages with their verdicts.
struct Done {
    /// The aggregate whose batch this was (free again), `None` for a message that did not decode.
    key: Option<AggregateKey>,
    /// Receive sequence number (acks are sent in this order, see [`InOrder`]), message, verdict.
    messages: Vec<(u64, Received, Verdict)>,
    /// What is left to do before the acks once the aggregate is free again: making the events
    /// durable, then waiting for the outbox to publish their changelog records. It ends in a
    /// `Done` of its own, with these messages.
    then: Option<Work>,
}

type Work = Pin<Box<dyn Future<Output = Done>>>;

/// A message as received, boxed once: it moves through the queues, its batch and the acks as a
/// pointer, not as the `pulsar` crate's 552 bytes (the copies were 2 % of a backlog's profile).
type Received = Box<Message<Vec<u8>>>;

/// A message ready to be applied, parked while its aggregate is busy.
struct Ready {
    seq: u64,
    message: Received,
    incoming: Arc<Incoming>,
    received: Instant,
    /// The aggregate was not handled lately here: catch up from the changelog first.
    catch_up: bool,
}

/// When this consumer last handled each aggregate, to tell which need a changelog catch-up.
struct Recent {
    at: HashMap<AggregateKey, Instant>,
    gap: Duration,
    since_prune: usize,
}

impl Recent {
    fn new(gap: Duration) -> Self {
        Recent {
            at: HashMap::new(),
            gap,
            since_prune: 0,
        }
    }

    /// Records that `key` is handled now; true when it was not handled within the gap.
    fn touch(&mut self, key: &AggregateKey, now: Instant) -> bool {
        self.since_prune += 1;
        if self.since_prune >= 10_000 {
            let gap = self.gap;
            self.at.retain(|_, at| now.duration_since(*at) <= gap);
            self.since_prune = 0;
        }
        match self.at.insert(key.clone(), now) {
            Some(at) => now.duration_since(at) > self.gap,
            None => true,
        }
    }
}

/// Consumes one input until shutdown, subscribing again when the consumer fails. `up` tells
/// /health whether the input is subscribed.
pub async fn run_input(
    name: String,
    input: InputConfig,
    broker: BrokerConfig,
    client: Client,
    pipeline: Arc<Pipeline>,
    status: Arc<InputStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BrokerError> {
    let name: Arc<str> = name.into();
    let dead_letters = {
        let topic = broker.topic(&input.dead_letter_topic);
        let producer = broker::with_backoff("dead-letter producer", &mut shutdown, || {
            broker::producer(&client, topic.clone())
        })
        .await?;
        Arc::new(DeadLetters {
            producer: Mutex::new(producer),
            store: pipeline.store.clone(),
            max_redeliveries: input.max_redeliveries,
            backoff: input.retry_backoff(),
            shutdown: shutdown.clone(),
        })
    };
    let mut first_subscription = true;
    loop {
        let mut consumer = broker::with_backoff("subscribe", &mut shutdown, || {
            subscribe(&client, &broker, &input, &name, &pipeline.preferred_partitions)
        })
        .await?;
        status.subscribed.store(true, Ordering::Relaxed);
        tracing::info!(input = %name, topic = %input.topic, subscription = %input.subscription, "Consuming.");
        let finished = consume(
            &name,
            std::mem::take(&mut first_subscription),
            &input,
            &mut consumer,
            &pipeline,
            &dead_letters,
            &status,
            &mut shutdown,
        )
        .await;
        status.subscribed.store(false, Ordering::Relaxed);
        status.holding(0);
        if let Err(error) = consumer.close(CLOSE_ATTEMPT, CLOSE_TIMEOUT).await {
            tracing::warn!(input = %name, error = %error, "Consumer did not close cleanly; the broker redelivers what it holds.");
        }
        if finished {
            tracing::info!(input = %name, "Consumer closed.");
            return Ok(());
        }
        tracing::warn!(input = %name, "Consumer stream ended; subscribing again.");
    }
}

/// Failover ranks consumers by name (after priority). A consumer of a partition this daemon
/// prefers (`daemon.preferred_partitions`) ranks before every consumer of a daemon that does not
/// prefer it; then, named by process start, the longest-running daemon comes first, so that the
/// ranking is stable: a topic whose one consumer is active keeps its active daemon when another
/// (re)joins. Apache Pulsar spreads the partitions of a partitioned topic over the ranked
/// consumers; pulsar-lite makes the first one active on each partition.
fn consumer_name(input: &str, partition: &str, preferred: &[u32], consumer_id: u64) -> String {
    let rank = if preferred.contains(&crate::partitions::partition_of(partition)) {
        0
    } else {
        1
    };
    format!(
        "aerostream-{input}-{rank}-{:016}-{consumer_id}",
        broker::process_started_ms()
    )
}

async fn subscribe(
    client: &Client,
    broker: &BrokerConfig,
    input: &InputConfig,
    name: &str,
    preferred: &[u32],
) -> Result<Partitions, pulsar::Error> {
    Partitions::subscribe(
        client,
        &broker.topic(&input.topic),
        |builder, consumer_id, partition| {
            input_consumer(builder, input, name, preferred, consumer_id, partition)
        },
    )
    .await
}

/// The consumer of one partition of `input`.
fn input_consumer(
    builder: ConsumerBuilder<TokioExecutor>,
    input: &InputConfig,
    name: &str,
    preferred: &[u32],
    consumer_id: u64,
    partition: &str,
) -> ConsumerBuilder<TokioExecutor> {
    builder
        .with_subscription(input.subscription.clone())
        .with_subscription_type(input.subscription_type.sub_type())
        .with_consumer_name(consumer_name(name, partition, preferred, consumer_id))
        .with_batch_size(receive_queue(input))
        .with_options(ConsumerOptions::default().with_receiver_queue_size(receive_queue(input)))
    // No dead-letter policy and no ack timeout here: the daemon retries and dead-letters (see
    // the module comment).
}

/// The receive loop. Returns true on shutdown (all in-flight work finished), false when the
/// consumer stream ended and must be re-created.
#[allow(clippy::too_many_arguments)]
async fn consume(
    name: &Arc<str>,
    first_subscription: bool,
    input: &InputConfig,
    consumer: &mut Partitions,
    pipeline: &Arc<Pipeline>,
    dead_letters: &Arc<DeadLetters>,
    status: &Arc<InputStatus>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut running: FuturesUnordered<Work> = FuturesUnordered::new();
    let mut order: KeyedQueue<AggregateKey, Ready> = KeyedQueue::default();
    let mut acks: InOrder<(Received, Verdict)> = InOrder::default();
    let mut acker = Acker::new(input.subscription_type);
    // Where the messages held sit: a broker's copy of one of them is dropped on arrival.
    let mut holding: HashSet<MessagePosition> = HashSet::new();
    // Nothing is received while the store cannot write.
    let mut store_problem = pipeline.store.writability();
    let mut recent = Recent::new(pipeline.takeover_gap);
    // Committed, waiting for the outbox before their ack.
    let mut publishing: FuturesUnordered<Work> = FuturesUnordered::new();
    let mut stopping = *shutdown.borrow();
    let mut stream_ended = false;
    // The starvation watchdog: the position of the last message received per partition, and
    // when one last arrived. Failover only: a consumer of a Shared or Key_Shared subscription
    // sees others take messages it never gets.
    let watch_starvation = input.subscription_type == crate::config::SubscriptionKind::Failover;
    let mut last_received: HashMap<String, (u64, u64)> = HashMap::new();
    let mut quiet_since = Instant::now();
    let mut starve_check = tokio::time::interval(starvation::TICK);
    starve_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watchdog = starvation::Watchdog::default();
    let mut starve_after: Option<usize> = (|| {
        fail::fail_point!(FAILPOINT_STARVE, |arg: Option<String>| {
            let arg = arg.unwrap_or_default();
            let (input, after) = arg.split_once(':').unwrap_or((&arg, "100"));
            (first_subscription && input == &**name).then(|| after.parse().unwrap_or(100))
        });
        None
    })();
    let mut arrived = 0usize;
    let mut receiver = Receiver {
        name,
        input,
        pipeline,
        dead_letters,
        status,
        recent: &mut recent,
        last_received: &mut last_received,
    };
    loop {
        // Received and not acked yet (or left): every message held, whatever it waits for.
        let in_flight = acks.len();
        status.holding(in_flight);
        if (stopping || stream_ended) && in_flight == 0 {
            return !stream_ended;
        }
        let writable = store_problem.borrow_and_update().is_none();
        let can_receive = !stopping && !stream_ended && writable && in_flight < input.max_in_flight;
        tokio::select! {
            _ = shutdown.changed(), if !stopping => stopping = true,
            Ok(()) = store_problem.changed() => {}
            Some(mut done) = running.next(), if !running.is_empty() => {
                // The aggregate is free as soon as its events are durable; the acks may wait.
                if let Some(key) = done.key.take() {
                    order.finish(&key);
                    start_ready(&mut order, &mut running, &receiver);
                }
                match done.then.take() {
                    Some(then) => publishing.push(then),
                    None => release(name, status, consumer, &mut acks, &mut holding, &mut acker, done).await,
                }
            }
            Some(done) = publishing.next(), if !publishing.is_empty() => {
                release(name, status, consumer, &mut acks, &mut holding, &mut acker, done).await;
            }
            _ = starve_check.tick(), if watch_starvation && can_receive && in_flight == 0 => {
                let look = watchdog.look(Instant::now(), quiet_since);
                if look != starvation::Look::Wait && !receiver.last_received.is_empty() {
                    let starved = starved_partitions(consumer, receiver.last_received).await;
                    if watchdog.answer(look, Instant::now(), !starved.is_empty()) {
                        counter!(INPUT_RESUBSCRIPTIONS, "input" => name.to_string()).increment(1);
                        tracing::warn!(
                            input = %name,
                            partitions = ?starved,
                            quiet_ms = quiet_since.elapsed().as_millis() as u64,
                            "The broker holds messages beyond the last one received and sends none; subscribing to those partitions again."
                        );
                        // Those partitions alone, holding nothing: the others keep their consumers
                        // (on a Failover subscription, where this daemon is active it stays so;
                        // a partition another daemon took over looks the same as a starved one,
                        // and must not cost the partitions this daemon still has).
                        for partition in &starved {
                            receiver.last_received.remove(partition);
                            let renewed = tokio::time::timeout(
                                CLOSE_TIMEOUT,
                                consumer.renew(partition, |builder, consumer_id, partition| {
                                    input_consumer(builder, input, name, &pipeline.preferred_partitions, consumer_id, partition)
                                }),
                            )
                            .await
                            .unwrap_or_else(|_| Err(pulsar::Error::Custom("no answer in time".into())));
                            if let Err(error) = renewed {
                                tracing::warn!(input = %name, error = %error, "Cannot subscribe to a partition again; subscribing to the whole input again.");
                                return false;
                            }
                        }
                        quiet_since = Instant::now();
                        // The fault the fail point makes belongs to the consumer replaced.
                        starve_after = None;
                    }
                }
            }
            received = consumer.next(), if can_receive => {
                // This message and whatever else has arrived already, as one batch.
                let mut next = Some(received);
                let mut room = input.max_in_flight - in_flight;
                while let Some(received) = next.take() {
                    match received {
                        Some(Ok(_)) if starve_after.is_some_and(|after| {
                            arrived += 1;
                            arrived > after
                        }) => {}
                        // A copy of an entry finished already, or of a message held (the
                        // guard records every other message as held): the run's cumulative ack,
                        // or the original's ack after its commit, acks this delivery too (one
                        // message id). Dropped before it is decoded: a pulsar-lite that sends
                        // copies sends more of them the busier the machine is (docs/BENCHMARKS.md).
                        Some(Ok(message)) if acker.covers(&message) || !holding.insert(position(&message)) => {
                            quiet_since = Instant::now();
                            status.received(name);
                            let event_type = property(&message, "ce_type")
                                .unwrap_or_else(|| UNDECODED_EVENT_TYPE.to_owned());
                            counter!(EVENTS_REDELIVERED, "input" => name.to_string(), "event_type" => event_type)
                                .increment(1);
                        }
                        Some(Ok(message)) => {
                            quiet_since = Instant::now();
                            let seq = acks.receive();
                            if let Some(work) = receiver.receive(seq, Box::new(message), &mut order) {
                                running.push(work);
                            }
                            room -= 1;
                        }
                        Some(Err(error)) => tracing::warn!(input = %name, error = %error, "Receive failed."),
                        None => stream_ended = true,
                    }
                    if room > 0 && !stream_ended {
                        next = consumer.next().now_or_never();
                    }
                }
                start_ready(&mut order, &mut running, &receiver);
            }
        }
    }
}

/// What the receive loop needs to turn a message into work.
struct Receiver<'a> {
    name: &'a Arc<str>,
    input: &'a InputConfig,
    pipeline: &'a Arc<Pipeline>,
    dead_letters: &'a Arc<DeadLetters>,
    status: &'a Arc<InputStatus>,
    recent: &'a mut Recent,
    last_received: &'a mut HashMap<String, (u64, u64)>,
}

impl Receiver<'_> {
    /// Decodes `message` and parks it for its aggregate's next batch; a message that does not
    /// decode becomes its dead-lettering, returned as work to run.
    fn receive(
        &mut self,
        seq: u64,
        message: Received,
        order: &mut KeyedQueue<AggregateKey, Ready>,
    ) -> Option<Work> {
        let name = self.name;
        let (ledger, entry, _, _) = position(&message);
        // Per message: the partition's name is copied only the first time.
        match self.last_received.get_mut(&message.topic) {
            Some(at) => *at = (ledger, entry),
            None => {
                self.last_received.insert(message.topic.clone(), (ledger, entry));
            }
        }
        self.status.received(name);
        let received = Instant::now();
        let dataschema = property(&message, "ce_dataschema").or_else(|| {
            (!self.input.default_dataschema.is_empty()).then(|| self.input.default_dataschema.clone())
        });
        let (key, ce_type) = (message_key(&message), property(&message, "ce_type"));
        let meta = MessageMeta {
            key: key.as_deref(),
            ce_type: ce_type.as_deref(),
            dataschema: dataschema.as_deref(),
        };
        match self.pipeline.codec.decode_message(meta, &message.payload.data) {
            Ok(mut incoming) => {
                incoming.delivery = Some(delivery(&message));
                // One daemon at a time owns a Failover partition, and the state of its aggregates
                // goes to the changelog partition of the same number (docs/TAKEOVER.md).
                if self.input.subscription_type == SubscriptionKind::Failover {
                    incoming.partition = Some(crate::partitions::partition_of(&message.topic));
                }
                let aggregate = incoming.aggregate();
                let catch_up = self.recent.touch(&aggregate, received);
                let ready = Ready {
                    seq,
                    message,
                    incoming: Arc::new(incoming),
                    received,
                    catch_up,
                };
                order.park(&aggregate, ready);
                None
            }
            Err(error) => {
                let letter = Letter {
                    reason: error.reason(),
                    detail: error.to_string(),
                    event_type: None,
                    counter: EVENTS_DEAD_LETTERED,
                };
                Some(dead_letter(
                    name.clone(),
                    self.dead_letters.clone(),
                    self.status.clone(),
                    seq,
                    message,
                    letter,
                ))
            }
        }
    }
}

/// Starts a batch for every aggregate that is free and has messages waiting.
fn start_ready(
    order: &mut KeyedQueue<AggregateKey, Ready>,
    running: &mut FuturesUnordered<Work>,
    receiver: &Receiver<'_>,
) {
    for (key, batch) in order.start() {
        running.push(apply_batch(
            receiver.name.clone(),
            receiver.pipeline.clone(),
            receiver.dead_letters.clone(),
            receiver.status.clone(),
            key,
            batch,
        ));
    }
}

/// How long closing a consumer may take before it is abandoned.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one close attempt waits before the receive queue is drained again.
const CLOSE_ATTEMPT: Duration = Duration::from_millis(100);

fn property(message: &Message<Vec<u8>>, key: &str) -> Option<String> {
    message
        .payload
        .metadata
        .properties
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| kv.value.clone())
}

/// The message key as text (a Base64-encoded key decoded; a non-UTF-8 key can match no id).
fn message_key(message: &Message<Vec<u8>>) -> Option<String> {
    match message.key_bytes() {
        Ok(bytes) => bytes.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
        Err(_) => message.key(),
    }
}

/// Where a message sits on its topic: ledger, entry, partition and batch index.
type MessagePosition = (u64, u64, Option<i32>, Option<i32>);

fn position(message: &Message<Vec<u8>>) -> MessagePosition {
    let id = message.message_id();
    (id.ledger_id, id.entry_id, id.partition, id.batch_index)
}

/// The partitions (their topics) whose last message, as the broker tells it, lies beyond the last
/// one received from them. A partition that received nothing in this subscription is not judged,
/// nor one whose last message id the broker does not give.
///
/// Why: pulsar-lite's Failover dispatcher was seen to stop sending to a consumer that had permits
/// and a backlog (its debug log: "Dispatching messages for subscription …, consumers=1,
/// permits=257", then nothing, for good; about 1 backlog run in 3 of the throughput bench; not
/// reproduced with the raw client yet). The daemon then held nothing and waited for ever, /health
/// answering 200. A new subscription is served again, from the first message not acknowledged.
async fn starved_partitions(
    consumer: &mut Partitions,
    last_received: &HashMap<String, (u64, u64)>,
) -> Vec<String> {
    consumer
        .last_message_ids(Duration::from_secs(2))
        .await
        .into_iter()
        .filter_map(|(topic, last)| {
            let received = last_received.get(&topic)?;
            let last = last.ok()?;
            (*received < (last.ledger_id, last.entry_id)).then_some(topic)
        })
        .collect()
}

/// The message's id as the dead-letter memory keys it, the same for every delivery of the
/// message: its topic, then ledger, entry, partition and batch index (absent: -1).
fn message_ref(message: &Message<Vec<u8>>) -> Vec<u8> {
    let (ledger, entry, partition, batch) = position(message);
    [
        message.topic.as_bytes(),
        &[0],
        &ledger.to_be_bytes(),
        &entry.to_be_bytes(),
        &partition.unwrap_or(-1).to_be_bytes(),
        &batch.unwrap_or(-1).to_be_bytes(),
    ]
    .concat()
}

/// The message id as the dead letter's `source_message_id` property: `ledger:entry:partition` and
/// `:batch index` inside a batch (the form the Pulsar clients give `ORIGIN_MESSAGE_ID`).
fn source_message_id(message: &Message<Vec<u8>>) -> String {
    let (ledger, entry, partition, batch) = position(message);
    let partition = partition.unwrap_or(-1);
    match batch {
        Some(batch) => format!("{ledger}:{entry}:{partition}:{batch}"),
        None => format!("{ledger}:{entry}:{partition}"),
    }
}

/// The message's identity, the same at every delivery: recorded with the key of the event it
/// applies, it tells a redelivery of this message from a partner's duplicate.
fn delivery(message: &Message<Vec<u8>>) -> DeliveryId {
    let id = message.message_id();
    DeliveryId::of(
        &message.topic,
        id.partition,
        id.ledger_id,
        id.entry_id,
        id.batch_index,
    )
}

/// Acks what `done` completes, in receive order. A message stops being held before its ack is
/// sent: a copy the broker sends after that ack is taken as a new delivery (the idempotency
/// window drops it) and acked on its own (an individual ack of the original may be refused as
/// stale once a copy was sent), unless its entry is one a Failover run's cumulative ack covers.
async fn release(
    name: &str,
    status: &InputStatus,
    consumer: &mut Partitions,
    acks: &mut InOrder<(Received, Verdict)>,
    holding: &mut HashSet<MessagePosition>,
    acker: &mut Acker,
    done: Done,
) {
    for (seq, message, verdict) in done.messages {
        for (message, verdict) in acks.finish(seq, (message, verdict)) {
            status.progressed();
            holding.remove(&position(&message));
            acker.finished(name, consumer, message, verdict).await;
        }
    }
    acker.send_pending(name, consumer).await;
}

/// Sends an input's acks, in receive order: each entry's own, or on a Failover subscription one
/// cumulative ack per partition for a run of consecutive entries ([`acking`] decides which); a
/// batch entry is acked at its last message, once none of its messages is left unacked.
struct Acker {
    /// `None`: every message is acked on its own (Shared and Key_Shared allow nothing else).
    runs: Option<Runs>,
    /// Per partition, the last message of its run so far: its cumulative ack covers the run.
    pending: Vec<Received>,
    entries: acking::Entries,
}

impl Acker {
    fn new(kind: crate::config::SubscriptionKind) -> Acker {
        Acker {
            runs: (kind == crate::config::SubscriptionKind::Failover).then(Runs::default),
            pending: Vec::new(),
            entries: acking::Entries::default(),
        }
    }

    async fn finished(&mut self, name: &str, consumer: &mut Partitions, message: Received, verdict: Verdict) {
        let id = message.message_id();
        let at = acking::Position {
            ledger: id.ledger_id,
            entry: id.entry_id,
            batch_index: id.batch_index,
        };
        let in_entry = message.payload.metadata.num_messages_in_batch.unwrap_or(1);
        let entry = self
            .entries
            .finished(&message.topic, at, in_entry, matches!(verdict, Verdict::Ack));
        let ack = entry == acking::EntryAck::Ack;
        let Some(runs) = &mut self.runs else {
            return finish(name, consumer, message, ack).await;
        };
        match runs.finished(&message.topic, at, entry) {
            // Its entry's last message acks it.
            acking::Ack::Hold => return,
            acking::Ack::Cover => {
                match self
                    .pending
                    .iter_mut()
                    .find(|pending| pending.topic == message.topic)
                {
                    Some(pending) => *pending = message,
                    None => self.pending.push(message),
                }
                return;
            }
            acking::Ack::Alone => {}
            acking::Ack::Apart => {
                if let Some(at) = self
                    .pending
                    .iter()
                    .position(|pending| pending.topic == message.topic)
                {
                    let pending = self.pending.swap_remove(at);
                    cumulative_ack(name, consumer, &pending).await;
                }
            }
        }
        finish(name, consumer, message, ack).await;
    }

    /// Whether `message` is a copy of an entry finished and acked already, on a Failover input.
    fn covers(&self, message: &Message<Vec<u8>>) -> bool {
        let id = message.message_id();
        self.runs
            .as_ref()
            .is_some_and(|runs| runs.covers(&message.topic, id.ledger_id, id.entry_id))
    }

    /// Sends the pending cumulative acks (at the end of each release).
    async fn send_pending(&mut self, name: &str, consumer: &mut Partitions) {
        for pending in self.pending.drain(..) {
            cumulative_ack(name, consumer, &pending).await;
        }
    }
}

async fn cumulative_ack(name: &str, consumer: &mut Partitions, message: &Message<Vec<u8>>) {
    if let Err(error) = consumer.cumulative_ack(message).await {
        crate::limited!(repeated::ACK_FAILED, warn, input = %name, error = %error, "Ack failed; the message will be redelivered.");
    }
}

/// Sends `message`'s own ack if `ack`.
async fn finish(name: &str, consumer: &mut Partitions, message: Received, ack: bool) {
    if ack {
        if let Err(error) = consumer.ack(&message).await {
            // The broker will redeliver; the idempotency window makes that harmless.
            crate::limited!(repeated::ACK_FAILED, warn, input = %name, error = %error, "Ack failed; the message will be redelivered.");
        }
    }
}

/// The changelog partitions a batch of `aggregate` waits for: its input partition's, on an input
/// whose partitions one daemon owns at a time; every one, where daemons share an input's
/// partitions (Shared, Key_Shared); for the report service (one per daemon, of no partition), the
/// ones followed already.
fn barrier_scope(aggregate: &AggregateKey, batch: &VecDeque<Ready>) -> Scope {
    match batch.back().and_then(|ready| ready.incoming.partition) {
        Some(partition) => Scope::Partition(partition),
        None if aggregate.kind == AggregateKind::Report => Scope::Followed,
        None => Scope::Every,
    }
}

/// Attempts at an event whose actor crashed while handling it, in one attempt at its message.
const CRASH_ATTEMPTS: u32 = 5;
/// Between those attempts, while the supervisor restarts the actor.
const CRASH_BACKOFF: Backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));

/// Applies a batch of one aggregate's messages, in order, in one message to its actor, and makes
/// them durable with one flush. An event whose attempt fails is retried in place with the events
/// behind it: at once when its actor reloaded (stale), after a short pause while the supervisor
/// restarts a crashed actor, after the input's backoff otherwise (dead-lettered once
/// `max_redeliveries` retries failed), or once the store writes again. Rejected events are
/// dead-lettered where they stand; the others go on.
fn apply_batch(
    name: Arc<str>,
    pipeline: Arc<Pipeline>,
    dead_letters: Arc<DeadLetters>,
    status: Arc<InputStatus>,
    key: AggregateKey,
    batch: Vec<Ready>,
) -> Work {
    // Everything logged about these events carries these (a debug log follows an aggregate).
    let span = tracing::debug_span!("events", input = %name, aggregate = %key.id, count = batch.len());
    Box::pin(async move {
        let mut messages = Vec::with_capacity(batch.len());
        let mut pending: VecDeque<Ready> = VecDeque::with_capacity(batch.len());
        let catch_up = batch.iter().any(|ready| ready.catch_up);
        for ready in batch {
            tracing::debug!(event_id = %ready.incoming.envelope.id, event_type = %ready.incoming.envelope.event_type, "Event received.");
            // A copy of a message rejected and dead-lettered already (an aggregate's messages are
            // applied in order, so an earlier copy has finished): acked, never applied after all.
            if already_dead_lettered(&name, &pipeline.store, &ready.message, Some(&ready.incoming.envelope.event_type)) {
                messages.push((ready.seq, ready.message, Verdict::Ack));
            } else {
                pending.push_back(ready);
            }
        }
        // An aggregate not handled lately may have been another daemon's meanwhile, and a
        // partition this daemon does not follow up to date was (or is) another's.
        if let (false, Some(follower)) = (pending.is_empty(), &pipeline.follower) {
            let scope = barrier_scope(&key, &pending);
            if catch_up || !follower.holds(scope) {
                let waiting = Instant::now();
                follower.barrier(scope).await;
                histogram!(CHANGELOG_BARRIER_WAIT).record(waiting.elapsed().as_secs_f64());
            }
        }
        let started = Instant::now();
        let mut shutdown = dead_letters.shutdown.clone();
        // Applied (or duplicates), durable once flushed: with the counter of their outcome.
        let mut applied: Vec<(Ready, &'static str)> = Vec::with_capacity(pending.len());
        // The front event's attempts: while its actor crashes or reloads, and failed ones.
        let mut crashes = 1u32;
        let mut failures = 0u32;
        let mut leave = false;
        while !pending.is_empty() {
            let events = pending.iter().map(|ready| ready.incoming.clone()).collect();
            let mut error = None;
            for result in pipeline.registry.apply_batch(events).await {
                let counter_name = match result {
                    Ok(Outcome::Applied { .. }) => EVENTS_APPLIED,
                    Ok(Outcome::Duplicate) => EVENTS_DEDUPLICATED,
                    Ok(Outcome::Redelivered) => EVENTS_REDELIVERED,
                    Ok(Outcome::Rejected(rejection)) => {
                        let ready = pending.pop_front().expect("one result per event");
                        let letter = Letter {
                            reason: rejection.reason.as_str(),
                            detail: rejection.detail,
                            event_type: Some(ready.incoming.envelope.event_type.clone()),
                            counter: EVENTS_REJECTED,
                        };
                        let verdict = send_dead_letter(&name, &dead_letters, &status, &ready.message, letter).await;
                        messages.push((ready.seq, ready.message, verdict));
                        (crashes, failures) = (1, 0);
                        continue;
                    }
                    Err(failed) => {
                        error = Some(failed);
                        break;
                    }
                };
                applied.push((pending.pop_front().expect("one result per event"), counter_name));
                (crashes, failures) = (1, 0);
            }
            let Some(error) = error else { continue };
            match &error {
                // A stale actor has reloaded: retry at once.
                ApplyError::Stale(_) if crashes < CRASH_ATTEMPTS => {
                    crashes += 1;
                    continue;
                }
                // The supervisor restarts the actor from its committed state.
                ApplyError::Crashed(_) | ApplyError::MailboxClosed if crashes < CRASH_ATTEMPTS => {
                    tokio::time::sleep(CRASH_BACKOFF.delay(crashes)).await;
                    crashes += 1;
                    continue;
                }
                // A store that cannot write is no failure of the event.
                ApplyError::Store(store_error) if store_error.is_unavailable() => {
                    pipeline.store.note_failure(store_error);
                    crate::limited!(repeated::STORE_WAIT, warn, input = %name, error = %error, "The store cannot write; the event waits for it.");
                    tokio::select! {
                        _ = pipeline.store.wait_writable() => continue,
                        _ = shutdown.wait_for(|stop| *stop) => {
                            leave = true;
                            break;
                        }
                    }
                }
                _ => {}
            }
            crashes = 1;
            failures += 1;
            if failures as usize > dead_letters.max_redeliveries {
                let ready = pending.pop_front().expect("the failed event");
                let letter = Letter {
                    reason: MAX_REDELIVERIES,
                    detail: format!("{failures} attempts failed; the last: {error}"),
                    event_type: Some(ready.incoming.envelope.event_type.clone()),
                    counter: EVENTS_DEAD_LETTERED,
                };
                let verdict = send_dead_letter(&name, &dead_letters, &status, &ready.message, letter).await;
                messages.push((ready.seq, ready.message, verdict));
                failures = 0;
                continue;
            }
            counter!(EVENTS_RETRIED, "input" => name.to_string()).increment(1);
            crate::limited!(repeated::RETRYING, warn, input = %name, error = %error, failures, "Event not applied; retrying it.");
            if !dead_letters.backoff.wait(failures, &mut shutdown).await {
                leave = true;
                break;
            }
        }
        // Shutting down: what is not done is left unacked, for the broker to redeliver.
        messages.extend(pending.into_iter().map(|ready| (ready.seq, ready.message, Verdict::Leave)));
        if applied.is_empty() {
            return Done { key: Some(key), messages, then: None };
        }
        // The aggregate is free once its commits are written: its next batch is decided on them
        // and committed after them, and sled recovers a prefix of its writes, so nothing a later
        // commit builds on can be lost without it. The counts and acks wait until they are durable.
        // Everything committed so far, these events' commits included, is in the outbox up to here.
        let outbox_mark = pipeline.store.outbox_high_water();
        let written = Instant::now();
        let then = async move {
            let durable = !leave && flushed(&name, &pipeline.store, &dead_letters.backoff, &mut shutdown).await;
            // Made once per batch, not per event.
            let processing = histogram!(PROCESSING_DURATION, "input" => name.to_string());
            let [queued, applying, flushing] =
                STAGES.map(|stage| histogram!(PROCESSING_STAGE, "input" => name.to_string(), "stage" => stage));
            let (apply, flush) = (written - started, written.elapsed());
            for (ready, counter_name) in applied {
                if !durable {
                    messages.push((ready.seq, ready.message, Verdict::Leave));
                    continue;
                }
                let event_type = ready.incoming.envelope.event_type.clone();
                counter!(counter_name, "input" => name.to_string(), "event_type" => event_type).increment(1);
                if counter_name == EVENTS_APPLIED {
                    status.applied.fetch_add(1, Ordering::Relaxed);
                }
                processing.record(ready.received.elapsed().as_secs_f64());
                queued.record(started.saturating_duration_since(ready.received).as_secs_f64());
                applying.record(apply.as_secs_f64());
                flushing.record(flush.as_secs_f64());
                messages.push((ready.seq, ready.message, Verdict::Ack));
            }
            tracing::debug!(count = messages.len(), durable, "Events done.");
            // Checkpointed acks, when a changelog is kept: the changelog must cover these events.
            if durable && pipeline.follower.is_some() {
                pipeline.store.wait_published(outbox_mark).await;
            }
            Done { key: None, messages, then: None }
        };
        Done {
            key: Some(key),
            messages: Vec::new(),
            then: Some(Box::pin(then.instrument(tracing::Span::current()))),
        }
    }
    .instrument(span))
}

/// Makes the store's writes durable, waiting while it cannot write and retrying failed flushes
/// after `backoff` (the writes are made: only their durability is missing). False on shutdown.
async fn flushed(
    name: &str,
    store: &SledStore,
    backoff: &Backoff,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut failures = 0;
    loop {
        let error = match store.flush().await {
            Ok(()) => return true,
            Err(error) => error,
        };
        crate::limited!(repeated::STORE_WAIT, warn, input = %name, error = %error, "The store cannot make writes durable; the events wait for it.");
        if error.is_unavailable() {
            tokio::select! {
                _ = store.wait_writable() => continue,
                _ = shutdown.wait_for(|stop| *stop) => return false,
            }
        }
        failures += 1;
        if !backoff.wait(failures, shutdown).await {
            return false;
        }
    }
}

#[derive(Clone)]
struct Letter {
    reason: &'static str,
    detail: String,
    event_type: Option<String>,
    /// The message's outcome, counted by `reason` once the dead letter is stored:
    /// [`EVENTS_REJECTED`] for a business rule, [`EVENTS_DEAD_LETTERED`] for any other refusal.
    counter: &'static str,
}

/// Why a dead letter was not published and remembered: the message is retried.
#[derive(Debug, thiserror::Error)]
enum DeadLetterError {
    #[error("dead-letter publish failed: {0}")]
    Publish(#[from] pulsar::Error),
    #[error("dead-letter memory failed: {0}")]
    Store(#[from] aerostream_actors::ports::StoreError),
}

/// Whether `message` was dead-lettered already: then this is a redelivered copy, to ack, counted
/// as `redelivered` (its dead letter and its `rejected` or `dead_lettered` count are the first
/// copy's). `event_type`: the decoded copy's, when it decoded.
fn already_dead_lettered(
    name: &str,
    store: &SledStore,
    message: &Message<Vec<u8>>,
    event_type: Option<&str>,
) -> bool {
    match store.dead_lettered(&message_ref(message)) {
        Ok(remembered) => {
            if remembered {
                crate::limited!(repeated::DEAD_LETTERED_COPY, info, input = %name, source_message_id = %source_message_id(message), "Message dead-lettered already; acking this copy.");
                let event_type = event_type.unwrap_or(UNDECODED_EVENT_TYPE).to_owned();
                counter!(EVENTS_REDELIVERED, "input" => name.to_owned(), "event_type" => event_type)
                    .increment(1);
            }
            remembered
        }
        Err(error) => {
            // Processing goes on and meets the store again.
            tracing::warn!(input = %name, error = %error, "Dead-letter memory unreadable.");
            false
        }
    }
}

/// Publishes `message` to the dead-letter topic with `letter`'s reason, counts it and remembers it,
/// unless a copy of it was dead-lettered already (within the idempotency window, by this process
/// or an earlier one); the ack waits until the memory is durable. Checked and remembered under the
/// producer's lock, so a copy received while the first is still being dead-lettered waits for it.
async fn publish_dead_letter(
    name: &str,
    letters: &DeadLetters,
    status: &InputStatus,
    message: &Message<Vec<u8>>,
    letter: Letter,
) -> Result<(), DeadLetterError> {
    let id = message_ref(message);
    {
        let mut producer = letters.producer.lock().await;
        if already_dead_lettered(name, &letters.store, message, letter.event_type.as_deref()) {
            return Ok(());
        }
        crate::limited!(repeated::DEAD_LETTERING, warn, input = %name, reason = letter.reason, detail = %letter.detail, "Dead-lettering message.");
        let properties: Vec<(String, String)> = message
            .payload
            .metadata
            .properties
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .filter(|(k, _)| !matches!(k.as_str(), "reason" | "detail" | "source_message_id"))
            .chain(letter.event_type.map(|t| ("event_type".to_owned(), t)))
            .chain([("source_message_id".to_owned(), source_message_id(message))])
            .collect();
        broker::send_dead_letter(
            &mut producer,
            DeadLetter {
                payload: &message.payload.data,
                key: message.key(),
                reason: letter.reason,
                detail: letter.detail,
                source_topic: &message.topic,
                properties: &properties,
            },
        )
        .await?;
        counter!(letter.counter, "input" => name.to_owned(), "reason" => letter.reason).increment(1);
        status.dead_lettered.fetch_add(1, Ordering::Relaxed);
        letters.store.remember_dead_letter(&id)?;
    }
    letters.store.flush().await?;
    Ok(())
}

/// Dead-letters `message` ([`publish_dead_letter`]), retrying while the broker or the store
/// refuses it (a message is acked only once its dead letter is stored and remembered); on
/// shutdown it is left unacked instead.
async fn send_dead_letter(
    name: &str,
    dead_letters: &DeadLetters,
    status: &InputStatus,
    message: &Message<Vec<u8>>,
    letter: Letter,
) -> Verdict {
    let mut shutdown = dead_letters.shutdown.clone();
    let mut failures = 0;
    loop {
        match publish_dead_letter(name, dead_letters, status, message, letter.clone()).await {
            Ok(()) => return Verdict::Ack,
            Err(error) => {
                failures += 1;
                crate::limited!(repeated::NOT_DEAD_LETTERED, error, input = %name, error = %error, failures, "Message not dead-lettered; not acking, retrying.");
                if !dead_letters.backoff.wait(failures, &mut shutdown).await {
                    return Verdict::Leave;
                }
            }
        }
    }
}

/// [`send_dead_letter`] as work of its own, for a message that did not decode.
fn dead_letter(
    name: Arc<str>,
    dead_letters: Arc<DeadLetters>,
    status: Arc<InputStatus>,
    seq: u64,
    message: Received,
    letter: Letter,
) -> Work {
    let span =
        tracing::debug_span!("message", input = %name, source_message_id = %source_message_id(&message));
    Box::pin(
        async move {
            let verdict = send_dead_letter(&name, &dead_letters, &status, &message, letter).await;
            Done {
                key: None,
                messages: vec![(seq, message, verdict)],
                then: None,
            }
        }
        .instrument(span),
    )
}

#[cfg(test)]
mod tests {
    use super::consumer_name;

    #[test]
    fn a_consumer_of_a_preferred_partition_ranks_before_any_daemons_consumer_that_does_not_prefer_it() {
        let topic = "persistent://public/default/t-partition-2";
        let preferred = consumer_name("campaigns", topic, &[2, 3], u64::MAX);
        let other = consumer_name("campaigns", topic, &[0, 1], 0);
        assert!(preferred < other, "{preferred} / {other}");
        // Preferring other partitions is preferring none of this one.
        assert_eq!(consumer_name("campaigns", topic, &[], 0), other);
    }
}
