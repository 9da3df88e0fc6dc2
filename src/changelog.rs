//! State hand-over between daemons through Pulsar (docs/TAKEOVER.md).
//!
//! - Every commit also puts a [`ChangeRecord`] in the outbox, after the commit's output events:
//!   the aggregate's whole new state and version, the idempotency key, the charges it asked for
//!   and its output events. The outbox publishes it to the changelog topic keyed by aggregate, and
//!   the input message is acked only once the outbox has published everything committed up to
//!   its commit (`SledStore::wait_published`): the changelog covers every acked message.
//! - Every daemon follows the changelog ([`run`]) and imports the records of newer versions than it
//!   holds (`SledStore::import`), so any daemon can take over an aggregate. It remembers how far it
//!   has read each partition in its store (`SledStore::remember_changelog_position`) and a restart
//!   resumes there, not at the changelog's first record.
//! - Before handling an aggregate it has not handled lately, a daemon waits for a [`Follower`]
//!   barrier: a marker written to every changelog partition and read back. Whatever another daemon
//!   did with that aggregate is then in the local store; its redelivered messages are duplicates.

use crate::backoff::Backoff;
use crate::broker::{self, Client};
use crate::config::{BrokerConfig, ChangelogConfig};
use crate::partitions::Partitions;
use crate::store::{Position, SledStore};
use crate::telemetry::{CHANGELOG_BARRIERS, CHANGELOG_IMPORTED, CHANGELOG_READ, CHANGELOG_RESUBSCRIPTIONS};
use aerostream_actors::gateway::Charge;
use aerostream_actors::ports::{AppliedEvent, Commit, EventRef};
use aerostream_actors::{AggregateKey, DeliveryId, OutputEvent, Registry};
use pulsar::consumer::InitialPosition;
use pulsar::proto::MessageIdData;
use pulsar::{ConsumerOptions, SubType};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Fail point (chaos only): the follower's next subscription delivers nothing, as a broker or
/// client fault could make it, for the stall watchdog to replace.
pub const FAILPOINT_DEAF_SUBSCRIPTION: &str = "changelog::deaf_subscription";

/// The follower acks cumulatively, and remembers its position, once per this many records of a
/// partition (and whenever a marker of its own comes back).
const ACK_EVERY: u32 = 64;
/// Between re-subscriptions after the follower failed (a record it could not import, a marker it
/// could not write): each reads the changelog again from the positions the store keeps.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// One commit as another daemon needs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// The daemon that committed it (`daemon.instance_id`).
    pub instance: String,
    pub aggregate: AggregateKey,
    pub version: u64,
    /// The aggregate's whole state after the commit, as stored (JSON text).
    pub state: String,
    pub idempotency_key: String,
    pub content_hash: String,
    pub seen_at_ms: i64,
    /// The message the event came in, recorded with the key by the importer too, so that its
    /// redelivery to another daemon counts as a redelivery. Absent in records of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryId>,
    pub charges: Vec<Charge>,
    /// Already published (before this record); carried for the ledgers they move.
    pub outputs: Vec<OutputEvent>,
    /// The events the commit applied before the one named above, in order (a commit may apply
    /// several events of its aggregate); absent in records of older versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<AppliedEvent>,
}

impl ChangeRecord {
    /// The record of `commit`, made by `instance`.
    pub fn of(instance: &str, commit: &Commit<'_>) -> ChangeRecord {
        ChangeRecord {
            instance: instance.to_owned(),
            aggregate: commit.aggregate.clone(),
            version: commit.version,
            state: String::from_utf8_lossy(commit.state).into_owned(),
            idempotency_key: commit.idempotency_key.to_owned(),
            content_hash: commit.content_hash.to_owned(),
            seen_at_ms: commit.seen_at_ms,
            delivery: commit.delivery,
            charges: commit.charges.to_vec(),
            outputs: commit.outbox.to_vec(),
            earlier: commit
                .earlier
                .iter()
                .map(|event| AppliedEvent {
                    journal: None,
                    ..event.clone()
                })
                .collect(),
        }
    }

    /// Every event the record's commit applied, oldest first.
    pub fn events(&self) -> impl Iterator<Item = EventRef<'_>> {
        self.earlier
            .iter()
            .map(AppliedEvent::as_ref)
            .chain(std::iter::once(EventRef {
                version: self.version,
                idempotency_key: &self.idempotency_key,
                content_hash: &self.content_hash,
                seen_at_ms: self.seen_at_ms,
                delivery: self.delivery,
                outputs: &self.outputs,
                charges: &self.charges,
                journal: None,
            }))
    }

    /// The version of the record's first event.
    pub fn first_version(&self) -> u64 {
        self.version.saturating_sub(self.earlier.len() as u64)
    }

    /// The message key: the aggregate, so a compacted topic keeps its latest state.
    pub fn key(&self) -> String {
        record_key(&self.aggregate)
    }
}

/// The message key of `aggregate`'s records.
pub fn record_key(aggregate: &AggregateKey) -> String {
    format!("{}/{}", aggregate.kind.as_str(), aggregate.id)
}

/// Asks the follower for barriers. Cheap to clone.
#[derive(Clone)]
pub struct Follower {
    requests: mpsc::UnboundedSender<oneshot::Sender<()>>,
    seen: Arc<Seen>,
}

/// What the follower has seen, shared with the [`Follower`] handles and /health.
#[derive(Default)]
pub struct Seen {
    /// A record of another daemon was read: several daemons share the work.
    others: AtomicBool,
    /// A barrier has completed: the changelog as it was at start is imported.
    caught_up: AtomicBool,
    /// When the oldest marker not yet read back was written (ms since the epoch), 0 for none.
    marker_pending_since_ms: AtomicU64,
    /// How often the follower subscribed again because its markers stopped coming back.
    resubscriptions: AtomicU64,
}

impl Seen {
    /// How long the oldest marker not yet read back has been waiting.
    pub fn marker_wait(&self) -> Option<Duration> {
        match self.marker_pending_since_ms.load(Ordering::Acquire) {
            0 => None,
            since => Some(Duration::from_millis(now_ms().saturating_sub(since))),
        }
    }

    /// Times the follower re-subscribed because no record came while a marker was pending.
    pub fn resubscriptions(&self) -> u64 {
        self.resubscriptions.load(Ordering::Relaxed)
    }

    fn marker_pending(&self, pending: bool) {
        let since = if pending { now_ms().max(1) } else { 0 };
        let _ = self
            .marker_pending_since_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |at| match (pending, at) {
                (true, 0) | (false, _) => Some(since),
                (true, _) => None,
            });
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The follower's end of the barrier requests, for [`run`].
pub struct Requests {
    receiver: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    seen: Arc<Seen>,
}

impl Follower {
    /// What the follower has seen, for /health.
    pub fn status(&self) -> Arc<Seen> {
        self.seen.clone()
    }

    /// Resolves once the changelog has been read, and imported, up to the end it has now.
    /// Never resolves while the broker is unreachable (the caller holds its message unacked).
    ///
    /// A daemon that has caught up once and has never read a record of another daemon writes
    /// the changelog alone: nothing can be missing from its store, and it does not wait.
    pub async fn barrier(&self) {
        if self.seen.caught_up.load(Ordering::Acquire) && !self.seen.others.load(Ordering::Acquire) {
            return;
        }
        loop {
            let (done, wait) = oneshot::channel();
            if self.requests.send(done).is_err() {
                // The follower is gone (shutting down): never proceed unchecked; the message stays
                // unacked and is redelivered.
                std::future::pending::<()>().await;
            }
            if wait.await.is_ok() {
                self.seen.caught_up.store(true, Ordering::Release);
                return;
            }
            // The follower re-subscribed before answering: ask again.
        }
    }
}

/// A follower and the receiving end of its barrier requests, for [`run`].
pub fn follower() -> (Follower, Requests) {
    let (requests, receiver) = mpsc::unbounded_channel();
    let seen = Arc::new(Seen::default());
    (
        Follower {
            requests,
            seen: seen.clone(),
        },
        Requests { receiver, seen },
    )
}

/// Follows the changelog until shutdown: imports other daemons' records and answers barriers.
///
/// A barrier writes a marker with a fresh number to every partition of the changelog and resolves
/// once the follower has read that marker back on every partition: by then it has read, and
/// imported, everything written to the changelog before the barrier was asked for.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    broker_config: BrokerConfig,
    config: ChangelogConfig,
    instance: String,
    store: Arc<SledStore>,
    registry: Arc<Registry>,
    mut requests: Requests,
    mut shutdown: watch::Receiver<bool>,
) {
    let topic = broker_config.topic(&config.topic);
    let markers = broker::with_backoff("changelog markers", &mut shutdown, || {
        Markers::new(&client, &topic, &instance)
    })
    .await;
    let Ok(mut markers) = markers else { return };
    // A daemon that ever read another daemon's record keeps waiting for barriers, across restarts
    // too: the records that told it so may lie before where it now resumes.
    if store.changelog_others().unwrap_or(true) {
        requests.seen.others.store(true, Ordering::Release);
    }
    // Failures in a row; a follower that ran for a while before failing starts the count again.
    let mut failures = 0;
    loop {
        // A fresh subscription from where the store says each partition was read to (its earliest
        // record when it says nothing): importing a record twice changes nothing, and every
        // marker written from now on is read. One consumer per partition, each with a fresh id
        // (see `crate::partitions`).
        let resume = resume_from(&store);
        let subscription = format!(
            "aerostream-changelog-{}-{}",
            instance.replace(|c: char| !c.is_ascii_alphanumeric(), "-"),
            broker::unique_consumer_id()
        );
        let subscribed = broker::with_backoff("changelog follower", &mut shutdown, || {
            Partitions::subscribe(&client, &topic, |builder, _, partition| {
                let mut options = ConsumerOptions::default()
                    .with_initial_position(InitialPosition::Earliest)
                    .durable(false);
                if let Some(position) = resume.get(partition) {
                    // The broker starts at this record, itself included.
                    options = options.starting_on_message(MessageIdData {
                        ledger_id: position.ledger,
                        entry_id: position.entry,
                        ..Default::default()
                    });
                }
                builder
                    .with_subscription(subscription.clone())
                    .with_subscription_type(SubType::Exclusive)
                    .with_options(options)
            })
        })
        .await;
        let Ok(mut consumer) = subscribed else { return };
        let deaf = (|| {
            fail::fail_point!(FAILPOINT_DEAF_SUBSCRIPTION, |_| true);
            false
        })();
        let following = std::time::Instant::now();
        let stale = past_the_end(&mut consumer, &resume).await;
        let stopped = if stale.is_empty() {
            tracing::info!(%topic, resumed = resume.len(), "Following the changelog.");
            follow(
                &mut consumer,
                &instance,
                &store,
                &registry,
                &mut markers,
                &mut requests,
                Duration::from_millis(config.stall_timeout_ms),
                deaf,
                &mut shutdown,
            )
            .await
        } else {
            tracing::warn!(
                partitions = ?stale,
                "The changelog ends before where this store had read it to (a broker that lost its data, or a topic made again): reading those partitions from their start."
            );
            let forgotten = stale.iter().all(|partition| {
                store
                    .forget_changelog_position(partition)
                    .inspect_err(
                        |error| tracing::error!(error = %error, "Cannot forget a changelog position."),
                    )
                    .is_ok()
            });
            if forgotten {
                let _ = consumer
                    .close(Duration::from_millis(100), Duration::from_secs(2))
                    .await;
                continue;
            }
            false
        };
        // A non-durable subscription ends with its consumers.
        let _ = consumer
            .close(Duration::from_millis(100), Duration::from_secs(2))
            .await;
        if stopped {
            return;
        }
        if following.elapsed() > BACKOFF.max {
            failures = 0;
        }
        failures += 1;
        tracing::warn!(%topic, failures, "Changelog follower lost its consumer; subscribing again.");
        if !BACKOFF.wait(failures, &mut shutdown).await {
            return;
        }
        // The markers' producer may be bound to a connection that broke (seen on a starved
        // broker: its sends failed on the old connection after the client had a new one).
        match broker::with_backoff("changelog markers", &mut shutdown, || {
            broker::producer(&client, topic.clone())
        })
        .await
        {
            Ok(producer) => markers.producer = producer,
            Err(_) => return,
        }
    }
}

/// Where each changelog partition (its topic) is read from: where the store says it was read to,
/// or nowhere (its earliest record) while aggregates withdrawn at start wait for the changelog to
/// restore them: the records that do may lie before that position.
fn resume_from(store: &SledStore) -> HashMap<String, Position> {
    if store.any_unconfirmed() {
        return HashMap::new();
    }
    store.changelog_positions().map_or_else(
        |error| {
            tracing::warn!(error = %error, "Cannot read where the changelog was read to; reading it from its start.");
            HashMap::new()
        },
        |positions| positions.into_iter().collect(),
    )
}

/// The partitions whose kept position lies past their last message, or whose last message the
/// broker does not tell (an empty partition answers with an error): a changelog other than the one
/// that was read — a broker that lost its data, a topic deleted and made again — whose message ids
/// start again, so that a subscription at the position would skip everything written below it.
async fn past_the_end(consumer: &mut Partitions, resume: &HashMap<String, Position>) -> Vec<String> {
    if resume.is_empty() {
        return Vec::new();
    }
    consumer
        .last_message_ids(Duration::from_secs(10))
        .await
        .into_iter()
        .filter(|(partition, last)| {
            resume.get(partition).is_some_and(|position| match last {
                Ok(last) => (last.ledger_id, last.entry_id) < (position.ledger, position.entry),
                Err(_) => true,
            })
        })
        .map(|(partition, _)| partition)
        .collect()
}

/// Remembers how far each partition was read; false if the store refused.
fn remember_positions(store: &SledStore, read: &HashMap<String, Position>) -> bool {
    read.iter().all(|(partition, position)| {
        store
            .remember_changelog_position(partition, *position)
            .inspect_err(|error| tracing::error!(error = %error, "Cannot remember how far the changelog was read; reading again."))
            .is_ok()
    })
}

/// A barrier's marker: which daemon wrote it and its number.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    marker: String,
    number: u64,
}

/// Writes markers to every partition and tracks which of this daemon's markers were read back.
struct Markers {
    /// Names this run's markers: the instance id and a fresh uuid. A restarted daemon keeps its
    /// instance id and numbers its markers from 1 again, so its earlier runs' markers, still in
    /// the changelog, must not count as read back.
    writer: String,
    producer: broker::Producer,
    /// A key the producer routes to each partition.
    keys: Vec<String>,
    written: u64,
    /// Per partition (its topic), the highest number of this run's markers read back.
    read: HashMap<String, u64>,
}

impl Markers {
    async fn new(client: &Client, topic: &str, instance: &str) -> Result<Markers, pulsar::Error> {
        let writer = format!("{instance}/{}", uuid::Uuid::new_v4());
        let partitions = client.partitions(topic).await?.max(1) as usize;
        let keys = (0..partitions)
            .map(|partition| {
                (0u64..)
                    .map(|n| format!("marker/{writer}/{n}"))
                    .find(|key| {
                        partitions == 1
                            || pulsar::routing_policy::RoutingPolicy::compute_partition_index_for_key(
                                key, partitions,
                            ) == partition
                    })
                    .expect("some key lands on every partition")
            })
            .collect();
        Ok(Markers {
            writer,
            producer: broker::producer(client, topic.to_owned()).await?,
            keys,
            written: 0,
            read: HashMap::new(),
        })
    }

    /// Writes the next marker to every partition; returns its number.
    async fn write(&mut self) -> Result<u64, pulsar::Error> {
        self.written += 1;
        let payload = serde_json::to_vec(&Marker {
            marker: self.writer.clone(),
            number: self.written,
        })
        .expect("markers serialize");
        let mut receipts = Vec::with_capacity(self.keys.len());
        for key in &self.keys {
            let message = self
                .producer
                .create_message()
                .with_content(payload.clone())
                .with_key(key.clone());
            receipts.push(message.send_non_blocking().await?);
        }
        for receipt in receipts {
            receipt.await?;
        }
        Ok(self.written)
    }

    /// Notes a marker read on `partition` (its topic), if it is one of this run's.
    fn read(&mut self, partition: &str, payload: &[u8]) -> bool {
        match serde_json::from_slice::<Marker>(payload) {
            Ok(marker) => {
                if marker.marker == self.writer {
                    let at = self.read.entry(partition.to_owned()).or_default();
                    *at = (*at).max(marker.number);
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Whether marker `number` was read back on every partition.
    fn reached(&self, number: u64) -> bool {
        self.read.values().filter(|read| **read >= number).count() >= self.keys.len()
    }

    /// For a warning: the newest marker written and, per partition, the newest read back.
    fn progress(&self) -> String {
        format!("written {}, read back {:?}", self.written, self.read)
    }
}

/// Returns true on shutdown, false when the consumer must be re-created: after a receive or
/// marker error, or when no record at all arrived for `stall_timeout` while a marker was pending
/// (the marker is on the broker, so a live subscription must bring it back; one that does not is
/// replaced rather than waited on for ever).
#[allow(clippy::too_many_arguments)]
async fn follow(
    consumer: &mut Partitions,
    instance: &str,
    store: &SledStore,
    registry: &Registry,
    markers: &mut Markers,
    requests: &mut Requests,
    stall_timeout: Duration,
    deaf: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let Requests {
        receiver: barriers,
        seen,
    } = requests;
    // Barriers waiting for their marker to come back.
    let mut waiting: Vec<(u64, oneshot::Sender<()>)> = Vec::new();
    let mut unacked: HashMap<String, u32> = HashMap::new();
    // Per partition, the last message read and handled: everything up to it is in the store.
    let mut read: HashMap<String, Position> = HashMap::new();
    // Aggregates withdrawn at start are settled once the changelog is read to its end: at the
    // return of a marker written now, and before any barrier resolves.
    let mut settle_at = None;
    if store.any_unconfirmed() {
        match tokio::time::timeout(Duration::from_secs(10), markers.write()).await {
            Ok(Ok(number)) => {
                settle_at = Some(number);
                seen.marker_pending(true);
            }
            _ => {
                tracing::warn!("Cannot write a changelog marker; subscribing again.");
                return false;
            }
        }
    }
    let mut last_read = Instant::now();
    loop {
        let pending = settle_at.is_some() || !waiting.is_empty();
        let stalled_at = tokio::time::Instant::from_std(last_read + stall_timeout);
        tokio::select! {
            _ = shutdown.changed() => return true,
            _ = tokio::time::sleep_until(stalled_at), if pending => {
                seen.resubscriptions.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(CHANGELOG_RESUBSCRIPTIONS).increment(1);
                tracing::warn!(
                    stalled_ms = stall_timeout.as_millis() as u64,
                    markers = %markers.progress(),
                    settling = settle_at.is_some(),
                    barriers = waiting.len(),
                    "No changelog record arrived while a marker was pending; subscribing again."
                );
                // Dropped barriers are asked again by their callers; the settle marker is
                // written again by the next subscription.
                return false;
            }
            Some(first) = barriers.recv() => {
                // Every request waiting now shares one marker: it is written after each.
                let mut asked = vec![first];
                while let Ok(more) = barriers.try_recv() {
                    asked.push(more);
                }
                metrics::counter!(CHANGELOG_BARRIERS).increment(1);
                match tokio::time::timeout(Duration::from_secs(10), markers.write()).await {
                    Ok(Ok(number)) => {
                        if waiting.is_empty() && settle_at.is_none() {
                            // Nothing was pending: the stall clock starts with this marker.
                            last_read = Instant::now();
                        }
                        waiting.extend(asked.into_iter().map(|done| (number, done)));
                        seen.marker_pending(true);
                    }
                    // Dropping the requests makes their callers ask again.
                    Ok(Err(error)) => {
                        tracing::warn!(error = %error, "Cannot write a changelog marker; subscribing again.");
                        return false;
                    }
                    Err(_) => {
                        tracing::warn!("Writing a changelog marker timed out; subscribing again.");
                        return false;
                    }
                }
            }
            received = consumer.next() => match received {
                Some(Ok(_)) if deaf => {}
                Some(Ok(message)) => {
                    last_read = Instant::now();
                    metrics::counter!(CHANGELOG_READ).increment(1);
                    let partition = message.topic.clone();
                    let own = message
                        .payload
                        .metadata
                        .properties
                        .iter()
                        .any(|kv| kv.key == "instance" && kv.value == instance);
                    // This daemon's records are in its store already, unless it withdrew their
                    // aggregate at start (a record published just before a crash is in the
                    // changelog and was withdrawn too).
                    let record = if own {
                        store.any_unconfirmed()
                    } else {
                        !markers.read(&partition, &message.payload.data)
                    };
                    if record {
                        match serde_json::from_slice::<ChangeRecord>(&message.payload.data) {
                            Ok(record) if own && !store.is_unconfirmed(&record.aggregate).unwrap_or(true) => {}
                            Ok(record) => {
                                if !own && !seen.others.swap(true, Ordering::AcqRel) {
                                    if let Err(error) = store.remember_changelog_others() {
                                        seen.others.store(false, Ordering::Release);
                                        tracing::error!(error = %error, "Cannot remember a record of another daemon; reading again.");
                                        return false;
                                    }
                                }
                                match store.import(&record) {
                                    Ok(true) => {
                                        metrics::counter!(CHANGELOG_IMPORTED).increment(1);
                                        registry.forget(record.aggregate.kind, &record.aggregate.id);
                                    }
                                    Ok(false) => {}
                                    Err(error) => {
                                        tracing::error!(error = %error, "Cannot import a changelog record; reading again.");
                                        return false;
                                    }
                                }
                            }
                            Err(error) => tracing::error!(error = %error, "Unreadable changelog record skipped."),
                        }
                        // No flush here: an import becomes durable with the next commit's flush,
                        // and a position written after it is lost with it (`store/checkpoint.rs`).
                    }
                    let id = message.message_id();
                    read.insert(partition.clone(), Position { ledger: id.ledger_id, entry: id.entry_id });
                    // The subscription is this run's alone and read from the store's position at
                    // each (re)subscription, so acks only keep the broker's unacked count down:
                    // one cumulative ack per partition every ACK_EVERY records, when the position
                    // is remembered too.
                    let unacked = unacked.entry(partition).or_insert(0);
                    *unacked += 1;
                    if *unacked >= ACK_EVERY {
                        *unacked = 0;
                        if !remember_positions(store, &read) {
                            return false;
                        }
                        let _ = consumer.cumulative_ack(&message).await;
                    }
                    if settle_at.is_some_and(|number| markers.reached(number)) {
                        match store.settle_unconfirmed() {
                            Ok(removed) => {
                                for aggregate in removed {
                                    registry.forget(aggregate.kind, &aggregate.id);
                                }
                                settle_at = None;
                                tracing::info!("Withdrawn commits settled against the changelog.");
                            }
                            Err(error) => {
                                tracing::error!(error = %error, "Cannot settle withdrawn commits; reading again.");
                                return false;
                            }
                        }
                    }
                    let (done, pending): (Vec<_>, Vec<_>) =
                        waiting.drain(..).partition(|(number, _)| markers.reached(*number));
                    waiting = pending;
                    // Read to the changelog's end as of the marker: a restart may resume here.
                    if !done.is_empty() && !remember_positions(store, &read) {
                        return false;
                    }
                    for (_, barrier) in done {
                        let _ = barrier.send(());
                    }
                    if settle_at.is_none() && waiting.is_empty() {
                        seen.marker_pending(false);
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(error = %error, "Changelog receive failed.");
                    return false;
                }
                None => return false,
            },
        }
    }
}
