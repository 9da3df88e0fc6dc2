//! The Pulsar client: connecting with backoff, the broker health probe, and dead-letter publishing.

use crate::backoff::Backoff;
use crate::config::BrokerConfig;
use crate::telemetry::{BROKER_CLIENT_RENEWALS, BROKER_UP};
use pulsar::{Pulsar, TokioExecutor};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;
use tokio::sync::watch;

pub type Producer = pulsar::Producer<TokioExecutor>;

/// The Pulsar client, shared by every task of the daemon, and replaced by a fresh one when its
/// connection stays broken while the broker answers (see [`probe`]).
///
/// Why: the `pulsar` crate (6.9.1) can keep handing out a connection that died with a broker
/// restart. Its consumer engine reads the connection's error with `Connection::error()`, which
/// also clears it, so the connection manager takes the dead connection for a valid one; from
/// then on every lookup on it fails with "Disconnected" without marking it again, and every
/// subscribe and producer starts with a lookup. Seen about once in 60 broker restarts
/// (`tests/restart.rs`). A fresh client has fresh connections; tasks pick it up at their next
/// (re)subscription or producer, and those whose consumers still work keep them.
#[derive(Clone)]
pub struct Client {
    current: Arc<RwLock<Pulsar<TokioExecutor>>>,
    url: String,
    renewals: Arc<AtomicU64>,
}

impl Client {
    /// Connects once to the broker at `url`.
    pub async fn open(url: &str) -> Result<Client, pulsar::Error> {
        Ok(Client {
            current: Arc::new(RwLock::new(build(url).await?)),
            url: url.to_owned(),
            renewals: Arc::default(),
        })
    }

    /// The client to build consumers and producers and look topics up with now.
    pub fn get(&self) -> Pulsar<TokioExecutor> {
        self.current.read().expect("client lock").clone()
    }

    /// Puts `fresh` in the place of the current client.
    fn replace(&self, fresh: Pulsar<TokioExecutor>) {
        *self.current.write().expect("client lock") = fresh;
        self.renewals.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(BROKER_CLIENT_RENEWALS).increment(1);
    }

    /// A new client of its own to the same broker, with its own connections: for consumers that
    /// must not share theirs (`partitions`), and the probe's check that the broker is reachable.
    pub async fn fresh(&self) -> Result<Pulsar<TokioExecutor>, pulsar::Error> {
        build(&self.url).await
    }

    /// How often the client was replaced.
    pub fn renewals(&self) -> u64 {
        self.renewals.load(Ordering::Relaxed)
    }

    /// The number of partitions of `topic` (0 for a topic without partitions).
    pub async fn partitions(&self, topic: &str) -> Result<u32, pulsar::Error> {
        self.check_stuck()?;
        self.get().lookup_partitioned_topic_number(topic).await
    }

    /// Looks `topic` up: whether the broker answers.
    async fn lookup(&self, topic: &str) -> Result<(), pulsar::Error> {
        self.check_stuck()?;
        self.get().lookup_topic(topic).await.map(|_| ())
    }

    /// Fails as a stuck connection does while [`FAILPOINT_STUCK_CLIENT`] holds the daemon's first
    /// client.
    fn check_stuck(&self) -> Result<(), pulsar::Error> {
        fail::fail_point!(FAILPOINT_STUCK_CLIENT, self.renewals() == 0, |_| Err(
            pulsar::Error::Connection(pulsar::error::ConnectionError::Disconnected)
        ));
        Ok(())
    }
}

async fn build(url: &str) -> Result<Pulsar<TokioExecutor>, pulsar::Error> {
    Pulsar::builder(url.to_owned(), TokioExecutor)
        .with_operation_retry_options(pulsar::OperationRetryOptions {
            operation_timeout: Duration::from_secs(10),
            ..Default::default()
        })
        .build()
        .await
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("pulsar: {0}")]
    Pulsar(#[from] pulsar::Error),
    #[error("shutting down")]
    ShuttingDown,
}

/// Reconnecting, re-subscribing, building producers.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// Failures of one operation after which they are logged at WARN: the first ones are the
/// quick retries of a broker that is (re)starting, logged at DEBUG.
const WARN_AFTER_FAILURES: u32 = 3;

/// Failures of operations that keep failing, logged at WARN at most this often.
static FAILING: crate::logging::RateLimit = crate::logging::RateLimit::new(Duration::from_secs(30));

/// Runs `attempt` until it succeeds, waiting [`BACKOFF`] between failures; gives up on shutdown.
/// A broker outage is logged by the health probe ([`probe`]); an operation that keeps failing
/// logs a WARN (rate-limited), and an INFO once it succeeds after that.
pub async fn with_backoff<T, F, Fut>(
    what: &str,
    shutdown: &mut watch::Receiver<bool>,
    mut attempt: F,
) -> Result<T, BrokerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, pulsar::Error>>,
{
    let mut failures = 0;
    loop {
        if *shutdown.borrow() {
            return Err(BrokerError::ShuttingDown);
        }
        match attempt().await {
            Ok(value) => {
                if failures >= WARN_AFTER_FAILURES {
                    tracing::info!(what, failures, "Broker operation succeeded after failing.");
                }
                return Ok(value);
            }
            Err(error) => {
                failures += 1;
                if failures < WARN_AFTER_FAILURES {
                    tracing::debug!(what, error = %error, failures, "Broker operation failed; retrying.");
                } else {
                    crate::limited!(FAILING, warn, what, error = %error, failures, "Broker operation keeps failing; retrying.");
                }
                if !BACKOFF.wait(failures, shutdown).await {
                    return Err(BrokerError::ShuttingDown);
                }
            }
        }
    }
}

/// How long connecting may take before a WARN says the broker is not reachable yet (the client
/// retries a connection for long within one attempt, and logs that at DEBUG only).
const CONNECT_WARN_AFTER: Duration = Duration::from_secs(5);

/// Connects to the broker, retrying until it answers or shutdown.
pub async fn connect(
    config: &BrokerConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Client, BrokerError> {
    let connecting = with_backoff("connect", shutdown, || Client::open(&config.url));
    tokio::pin!(connecting);
    tokio::select! {
        connected = &mut connecting => connected,
        _ = tokio::time::sleep(CONNECT_WARN_AFTER) => {
            tracing::warn!(url = %config.url, waited_seconds = CONNECT_WARN_AFTER.as_secs(), "Broker not reachable yet; still trying.");
            connecting.await
        }
    }
}

/// A producer on `topic` that waits, instead of failing, when its send queue is full. On a
/// partitioned topic a message goes to the partition its key hashes to, so an aggregate's events
/// stay on one partition, in order (without a routing policy the client spreads keyed messages
/// round robin).
pub async fn producer(client: &Client, topic: String) -> Result<Producer, pulsar::Error> {
    client.check_stuck()?;
    producer_on(&client.get(), topic).await
}

/// [`producer`] on a plain Pulsar client (tools and benchmarks).
pub async fn producer_on(pulsar: &Pulsar<TokioExecutor>, topic: String) -> Result<Producer, pulsar::Error> {
    pulsar
        .producer()
        .with_topic(topic)
        .with_options(producer_options())
        .build()
        .await
}

fn producer_options() -> pulsar::ProducerOptions {
    pulsar::ProducerOptions {
        block_queue_if_full: true,
        routing_policy: Some(pulsar::routing_policy::RoutingPolicy::RoundRobin),
        ..Default::default()
    }
}

/// Messages a [`batching_producer`] puts in one broker entry at most, and how long the first one
/// waits for others.
const BATCH_MESSAGES: u32 = 256;
const BATCH_WAIT: Duration = Duration::from_millis(1);

/// A [`producer`] that sends what it is given within [`BATCH_WAIT`] as one broker entry (Pulsar's
/// producer batching): the outbox's way to publish, where the broker's cost is per entry.
pub async fn batching_producer(client: &Client, topic: String) -> Result<Producer, pulsar::Error> {
    client.check_stuck()?;
    batching_producer_on(&client.get(), topic).await
}

/// [`batching_producer`] on a given client, as Pulsar's own clients publish by default.
pub async fn batching_producer_on(
    pulsar: &Pulsar<TokioExecutor>,
    topic: String,
) -> Result<Producer, pulsar::Error> {
    pulsar
        .producer()
        .with_topic(topic)
        .with_options(pulsar::ProducerOptions {
            batch_size: Some(BATCH_MESSAGES),
            batch_byte_size: Some(1 << 20),
            batch_timeout: Some(BATCH_WAIT),
            ..producer_options()
        })
        .build()
        .await
}

/// When this process started (ms since the epoch), taken on first use.
pub fn process_started_ms() -> u64 {
    static STARTED: OnceLock<u64> = OnceLock::new();
    *STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    })
}

/// Sends an encoded event keyed by its aggregate, with the SPEC §3 properties (`ce_id`,
/// `ce_type`, `ce_dataschema`); the returned receipt resolves once the broker has it.
pub async fn send_event(
    producer: &mut Producer,
    id: String,
    encoded: crate::codec::Encoded,
) -> Result<pulsar::producer::SendFuture, pulsar::Error> {
    producer
        .create_message()
        .with_content(encoded.payload)
        .with_key(encoded.key)
        .with_property("ce_id", id)
        .with_property("ce_type", encoded.event_type)
        .with_property("ce_dataschema", encoded.dataschema)
        .send_non_blocking()
        .await
}

/// A consumer id used by no other consumer, in this process or another: some brokers key
/// consumers by id across connections (SPEC §11), and a consumer whose connection broke may
/// linger there for a while, so every subscribe takes a fresh one. Process id in the high bits,
/// the start time and a counter below.
pub fn unique_consumer_id() -> u64 {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    NEXT.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64);
        AtomicU64::new(((u64::from(std::process::id()) << 40) ^ (nanos << 16)) & 0x7fff_ffff_ffff_0000)
    })
    .fetch_add(1, Ordering::Relaxed)
}

/// Whether the broker answered the last probe.
#[derive(Clone, Default)]
pub struct BrokerHealth(Arc<AtomicBool>);

impl BrokerHealth {
    pub fn is_up(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, up: bool) {
        self.0.store(up, Ordering::Relaxed);
        metrics::gauge!(BROKER_UP).set(if up { 1.0 } else { 0.0 });
    }
}

/// Fail point (chaos only): lookups and new producers on the daemon's first client fail, as on
/// the dead connection [`Client`] describes, while the broker answers a fresh client.
pub const FAILPOINT_STUCK_CLIENT: &str = "broker::stuck_client";

/// Failed probes in a row, each while a fresh client did connect, before the client is replaced
/// by a fresh one ([`Client`]): the old client's own reconnection after a broker restart gets
/// that long.
const RENEW_AFTER_STRIKES: u32 = 3;

/// Probes the broker (a topic lookup with a timeout) until shutdown. The broker going down is
/// logged once at WARN, its coming back once at INFO, with how long it was down. A client whose
/// probes keep failing while a fresh client connects is replaced (see [`RENEW_AFTER_STRIKES`]).
pub async fn probe(
    client: Client,
    config: BrokerConfig,
    health: BrokerHealth,
    mut shutdown: watch::Receiver<bool>,
) {
    let interval = Duration::from_secs(config.health_probe_interval_seconds);
    let topic = config.topic("aerostream.health");
    let mut strikes = 0u32;
    let mut down_since: Option<std::time::Instant> = None;
    loop {
        let answer = tokio::time::timeout(interval.max(Duration::from_secs(1)), client.lookup(&topic)).await;
        let up = matches!(answer, Ok(Ok(_)));
        match (up, down_since) {
            (false, None) => {
                let error = match answer {
                    Ok(Err(error)) => error.to_string(),
                    _ => "no answer within the probe's timeout".to_owned(),
                };
                tracing::warn!(url = %config.url, error = %error, "Broker down: consuming and publishing wait until it is back.");
                down_since = Some(std::time::Instant::now());
            }
            (true, Some(since)) => {
                tracing::info!(url = %config.url, down_seconds = since.elapsed().as_secs(), "Broker back.");
                down_since = None;
            }
            _ => {}
        }
        health.set(up);
        // A failed probe while a fresh client reaches the broker is a strike against the current
        // client; a probe that succeeds, or a broker no fresh client reaches, clears them.
        strikes = match up {
            true => 0,
            false => match tokio::time::timeout(interval.max(Duration::from_secs(1)), client.fresh()).await {
                Ok(Ok(fresh)) if strikes + 1 >= RENEW_AFTER_STRIKES => {
                    client.replace(fresh);
                    tracing::info!(url = %config.url, "Replaced the Pulsar client: its connection stayed broken while a fresh client reached the broker.");
                    0
                }
                Ok(Ok(_)) => strikes + 1,
                _ => 0,
            },
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// A message for a dead-letter topic: the original bytes and key, with the reason as properties.
pub struct DeadLetter<'a> {
    pub payload: &'a [u8],
    pub key: Option<String>,
    pub reason: &'static str,
    pub detail: String,
    pub source_topic: &'a str,
    pub properties: &'a [(String, String)],
}

/// Publishes `letter` and waits for the broker's receipt. A property added here is one
/// `dlq replay` leaves out: list it in [`crate::dlq::DEAD_LETTER_PROPERTIES`].
pub async fn send_dead_letter(producer: &mut Producer, letter: DeadLetter<'_>) -> Result<(), pulsar::Error> {
    let mut message = producer
        .create_message()
        .with_content(letter.payload.to_vec())
        .with_property("reason", letter.reason)
        .with_property("detail", truncate(&letter.detail, 1_000))
        .with_property("source_topic", letter.source_topic);
    for (key, value) in letter.properties {
        message = message.with_property(key.clone(), value.clone());
    }
    if let Some(key) = letter.key {
        message = message.with_key(key);
    }
    message.send_non_blocking().await?.await?;
    Ok(())
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}
