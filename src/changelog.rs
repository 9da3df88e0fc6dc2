//! State hand-over between daemons through Pulsar (docs/TAKEOVER.md).
//!
//! - Every commit also puts a [`ChangeRecord`] in the outbox, after the commit's output events:
//!   the aggregate's whole new state and version, the idempotency key, the charges it asked for
//!   and its output events. The outbox publishes it to the changelog topic keyed by aggregate, and
//!   the input message is acked only once the outbox has published everything committed up to
//!   its commit (`SledStore::wait_published`): the changelog covers every acked message.
//! - A record goes to the changelog partition of its events' input partition ([`record_topic`]).
//!   A daemon owns the partitions it receives messages of, follows ([`run`]) those and
//!   `standby_partitions` more ([`Ownership`]), and imports the records of newer versions than it
//!   holds (`SledStore::import`), so it can take over an aggregate. It remembers how far it has
//!   read each partition in its store (`SledStore::remember_changelog_position`): a restart, or a
//!   partition taken over again, resumes there, not at the partition's first record.
//! - Before handling a message of a partition it does not hold, or an aggregate it has not handled
//!   lately, a daemon waits for a [`Follower`] barrier: a marker written to the partitions it
//!   follows and read back. Whatever another daemon did with that aggregate is then in the local
//!   store; its redelivered messages are duplicates. A partition another daemon writes while this
//!   one no longer receives it is handed back: no longer followed.

use crate::backoff::Backoff;
use crate::broker::{self, Client};
use crate::config::{BrokerConfig, ChangelogConfig, InputConfig, Standbys, SubscriptionKind};
use crate::partitions::{partition_of, partition_topic, Partitions};
use crate::store::{Position, SledStore};
use crate::telemetry::{CHANGELOG_BARRIERS, CHANGELOG_IMPORTED, CHANGELOG_READ, CHANGELOG_RESUBSCRIPTIONS};
use aerostream_actors::gateway::Charge;
use aerostream_actors::ports::{AppliedEvent, Commit, EventRef};
use aerostream_actors::{AggregateKey, DeliveryId, OutputEvent, Registry};
use pulsar::consumer::InitialPosition;
use pulsar::proto::MessageIdData;
use pulsar::{ConsumerOptions, SubType};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    /// The input partition of the commit's events, whose changelog partition the record is
    /// published to; `None` (events made by the daemon, shared inputs, older records): by its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
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
            partition: commit.partition,
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

/// The topic a record of input partition `partition` is published to, on a changelog `topic` of
/// `partitions` partitions (0: not partitioned): the changelog partition of the same number (modulo
/// the count), or the topic itself (routed by the record's key) for a record without one.
pub fn record_topic(topic: &str, partitions: u32, partition: Option<u32>) -> String {
    match partition {
        Some(partition) if partitions > 0 => partition_topic(topic, partition % partitions),
        _ => topic.to_owned(),
    }
}

/// Which changelog partitions a barrier reads to their end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The changelog partition of input partition `n` (`n` modulo the changelog's partitions):
    /// the state of the input partition's aggregates. This daemon owns and follows it from then on.
    Partition(u32),
    /// Every partition: an input whose partitions daemons share (Shared, Key_Shared) may bring any
    /// aggregate. This daemon follows every partition from then on.
    Every,
    /// The partitions followed now (the report service: one per daemon, of no input partition).
    Followed,
}

/// Which changelog partitions this daemon owns, follows and holds.
#[derive(Debug, Default)]
struct Ownership {
    /// The changelog's partition count (1 for a topic that is not partitioned); 0 until known.
    partitions: u32,
    /// Partitions whose input partitions this daemon receives (and has not handed back), as
    /// claimed: reduced modulo `partitions` when it is known.
    owned: BTreeSet<u32>,
    /// When a batch of each owned partition last asked (`Follower::holds`): a partition still
    /// receiving is not handed back.
    touched: HashMap<u32, Instant>,
    /// A barrier asked for every partition.
    every: bool,
    /// What the current subscription reads.
    followed: BTreeSet<u32>,
    /// Followed partitions read to a marker written after they were first followed (and followed
    /// on since): everything written to them before that marker is in the store.
    held: BTreeSet<u32>,
}

impl Ownership {
    /// The changelog partition of input partition `partition` (itself while the count is unknown).
    fn index(&self, partition: u32) -> u32 {
        match self.partitions {
            0 => partition,
            count => partition % count,
        }
    }

    fn holds(&self, scope: Scope) -> bool {
        self.partitions > 0
            && match scope {
                Scope::Partition(partition) => self.held.contains(&self.index(partition)),
                Scope::Every => self.held.len() as u32 == self.partitions,
                Scope::Followed => self.held == self.followed,
            }
    }

    fn covers(&self, scope: Scope) -> bool {
        self.partitions > 0
            && match scope {
                Scope::Partition(partition) => self.followed.contains(&self.index(partition)),
                Scope::Every => self.followed.len() as u32 == self.partitions,
                Scope::Followed => true,
            }
    }

    fn claim(&mut self, scope: Scope) {
        match scope {
            Scope::Partition(partition) => {
                let partition = self.index(partition);
                self.owned.insert(partition);
                self.touched.insert(partition, Instant::now());
            }
            Scope::Every => self.every = true,
            Scope::Followed => {}
        }
    }

    /// The partitions to follow: every one (`everything`, a barrier for every one, or standbys
    /// `all`), else the owned ones and `standbys` more, the next ones after them in order.
    fn wanted(&mut self, standbys: Standbys, everything: bool) -> BTreeSet<u32> {
        let partitions = self.partitions.max(1);
        self.owned = self.owned.iter().map(|p| p % partitions).collect();
        let count = match standbys {
            _ if everything || self.every => return (0..partitions).collect(),
            Standbys::All => return (0..partitions).collect(),
            Standbys::Count(count) => count as usize,
        };
        let start = self.owned.last().map_or(0, |last| last + 1);
        let warm = (0..partitions)
            .map(|offset| (start + offset) % partitions)
            .filter(|partition| !self.owned.contains(partition))
            .take(count);
        self.owned.iter().copied().chain(warm).collect()
    }

    /// A record of another daemon read on `partition` after this daemon held it: that daemon is
    /// active for it now, unless this one still receives it (two inputs whose partitions of that
    /// number went to different daemons). True when it is handed back.
    fn hand_back(&mut self, partition: u32, quiet: Duration) -> bool {
        let quiet = self
            .touched
            .get(&partition)
            .map_or(true, |touched| touched.elapsed() >= quiet);
        if !self.every && self.held.contains(&partition) && quiet && self.owned.remove(&partition) {
            self.held.remove(&partition);
            self.touched.remove(&partition);
            return true;
        }
        false
    }
}

/// A barrier request: its scope, and where to answer.
type Request = (Scope, oneshot::Sender<()>);

/// Asks the follower for barriers. Cheap to clone.
#[derive(Clone)]
pub struct Follower {
    requests: mpsc::UnboundedSender<Request>,
    seen: Arc<Seen>,
}

/// What the follower has seen, shared with the [`Follower`] handles and /health.
#[derive(Default)]
pub struct Seen {
    /// A record of another daemon was read: several daemons share the work.
    others: AtomicBool,
    /// When the oldest marker not yet read back was written (ms since the epoch), 0 for none.
    marker_pending_since_ms: AtomicU64,
    /// How often the follower subscribed again because its markers stopped coming back.
    resubscriptions: AtomicU64,
    ownership: Mutex<Ownership>,
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

    /// The changelog partitions this daemon owns and the ones it follows, for /health.
    pub fn partitions(&self) -> (Vec<u32>, Vec<u32>) {
        let ownership = self.ownership();
        let owned = ownership
            .owned
            .iter()
            .map(|p| ownership.index(*p))
            .collect::<BTreeSet<_>>();
        (
            owned.into_iter().collect(),
            ownership.followed.iter().copied().collect(),
        )
    }

    fn ownership(&self) -> std::sync::MutexGuard<'_, Ownership> {
        self.ownership
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    receiver: mpsc::UnboundedReceiver<Request>,
    seen: Arc<Seen>,
}

impl Follower {
    /// What the follower has seen, for /health.
    pub fn status(&self) -> Arc<Seen> {
        self.seen.clone()
    }

    /// Whether the partitions of `scope` are followed and were read to a marker since their
    /// subscription started (notes that a batch of its partition came).
    pub fn holds(&self, scope: Scope) -> bool {
        let mut ownership = self.seen.ownership();
        if let Scope::Partition(partition) = scope {
            let partition = ownership.index(partition);
            ownership.touched.insert(partition, Instant::now());
        }
        ownership.holds(scope)
    }

    /// Resolves once the changelog partitions of `scope` have been read, and imported, up to the
    /// end they have now; a partition not followed yet is followed from then on (from where this
    /// store read it to). Never resolves while the broker is unreachable (the caller holds its
    /// message unacked).
    ///
    /// A daemon that holds the partitions and has never read a record of another daemon writes
    /// them alone: nothing can be missing from its store, and it does not wait.
    pub async fn barrier(&self, scope: Scope) {
        if self.seen.ownership().holds(scope) && !self.seen.others.load(Ordering::Acquire) {
            return;
        }
        loop {
            let (done, wait) = oneshot::channel();
            self.seen.ownership().claim(scope);
            if self.requests.send((scope, done)).is_err() {
                // The follower is gone (shutting down): never proceed unchecked; the message stays
                // unacked and is redelivered.
                std::future::pending::<()>().await;
            }
            if wait.await.is_ok() {
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
/// It reads the partitions this daemon owns and `standby_partitions` more (every one while
/// aggregates withdrawn at start wait to be settled); a barrier for a partition it does not follow
/// subscribes again with that partition added, read from where the store had read it to. A
/// barrier writes a marker with a fresh number to every partition followed and resolves once the
/// follower has read that marker back on each: by then it has read, and imported, everything
/// written to them before the barrier was asked for.
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
    let mut deaf = false;
    loop {
        let followed = {
            let mut ownership = requests.seen.ownership();
            ownership.partitions = markers.keys.len() as u32;
            let followed = ownership.wanted(config.standby_partitions, store.any_unconfirmed());
            // A partition followed before and still is stays held: the new subscription reads it
            // on from where the last one had read it to.
            ownership.held.retain(|partition| followed.contains(partition));
            ownership.followed = followed.clone();
            followed
        };
        let topics: Vec<String> = followed
            .iter()
            .map(|partition| markers.topic_of(*partition))
            .collect();
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
            Partitions::subscribe_to(&client, topics.clone(), |builder, _, partition| {
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
        // A deaf subscription stays so when it is replaced for a change of partitions: only its
        // failure replaces the fault.
        deaf = deaf
            || (!topics.is_empty()
                && (|| {
                    fail::fail_point!(FAILPOINT_DEAF_SUBSCRIPTION, |_| true);
                    false
                })());
        let following = std::time::Instant::now();
        let stale = past_the_end(&mut consumer, &resume).await;
        let ended = if stale.is_empty() {
            let resumed = topics
                .iter()
                .filter(|partition| resume.contains_key(*partition))
                .count();
            tracing::info!(%topic, partitions = ?followed, resumed, "Following the changelog.");
            follow(
                &mut consumer,
                &instance,
                &store,
                &registry,
                &mut markers,
                &mut requests,
                &config,
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
                requests.seen.ownership().held.clear();
                Ended::Resubscribe
            } else {
                Ended::Failed
            }
        };
        // A non-durable subscription ends with its consumers.
        let _ = consumer
            .close(Duration::from_millis(100), Duration::from_secs(2))
            .await;
        match ended {
            Ended::Shutdown => return,
            Ended::Resubscribe => continue,
            Ended::Failed => deaf = false,
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

/// Warns about each Failover input whose partition count differs from the changelog's: its
/// partitions then share changelog partitions (their owners import each other's records) or
/// leave some empty, and the work does not divide by partition as docs/TAKEOVER.md says.
pub async fn check_partition_counts(
    client: &Client,
    broker_config: &BrokerConfig,
    config: &ChangelogConfig,
    inputs: &BTreeMap<String, InputConfig>,
) {
    let count = |topic: String| async move { client.partitions(&topic).await.map(|n| n.max(1)) };
    let Ok(changelog) = count(broker_config.topic(&config.topic)).await else {
        return;
    };
    for (name, input) in inputs {
        if input.subscription_type != SubscriptionKind::Failover {
            continue;
        }
        match count(broker_config.topic(&input.topic)).await {
            Ok(partitions) if partitions != changelog => tracing::warn!(
                input = %name,
                input_partitions = partitions,
                changelog_partitions = changelog,
                "The changelog does not have this input's partition count: its partitions cannot be owned one by one (docs/TAKEOVER.md); give the changelog topic the inputs' count."
            ),
            _ => {}
        }
    }
}

/// Why [`follow`] returned.
enum Ended {
    Shutdown,
    /// The partitions to follow changed (a barrier for one not followed, one handed back, the
    /// withdrawn commits settled): subscribe again from the kept positions, at once.
    Resubscribe,
    /// A receive, import or marker failed, or the subscription stalled: subscribe again after
    /// the backoff.
    Failed,
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

/// Remembers how far each partition was read (by message id); false if the store refused.
fn remember_positions(store: &SledStore, markers: &Markers, read: &HashMap<u32, (u64, u64, i32)>) -> bool {
    read.iter().all(|(partition, (ledger, entry, _))| {
        let position = Position {
            ledger: *ledger,
            entry: *entry,
        };
        store
            .remember_changelog_position(&markers.topic_of(*partition), position)
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

/// Writes markers to the partitions followed and tracks which of this daemon's markers were read
/// back.
struct Markers {
    /// Names this run's markers: the instance id and a fresh uuid. A restarted daemon keeps its
    /// instance id and numbers its markers from 1 again, so its earlier runs' markers, still in
    /// the changelog, must not count as read back.
    writer: String,
    producer: broker::Producer,
    /// The changelog topic, and whether it is partitioned.
    topic: String,
    partitioned: bool,
    /// A key the producer routes to each partition, by partition number (one for a topic that is
    /// not partitioned).
    keys: Vec<String>,
    written: u64,
    /// Per partition, the highest number of this run's markers read back.
    read: HashMap<u32, u64>,
}

impl Markers {
    async fn new(client: &Client, topic: &str, instance: &str) -> Result<Markers, pulsar::Error> {
        let writer = format!("{instance}/{}", uuid::Uuid::new_v4());
        let count = client.partitions(topic).await?;
        let (partitioned, partitions) = (count > 0, count.max(1) as usize);
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
            topic: topic.to_owned(),
            partitioned,
            keys,
            written: 0,
            read: HashMap::new(),
        })
    }

    /// The topic of `partition`, as a consumer of it names it.
    fn topic_of(&self, partition: u32) -> String {
        if self.partitioned {
            partition_topic(&self.topic, partition)
        } else {
            self.topic.clone()
        }
    }

    /// Writes the next marker to each of `partitions`; returns its number.
    async fn write(&mut self, partitions: &BTreeSet<u32>) -> Result<u64, pulsar::Error> {
        self.written += 1;
        let payload = serde_json::to_vec(&Marker {
            marker: self.writer.clone(),
            number: self.written,
        })
        .expect("markers serialize");
        let mut receipts = Vec::with_capacity(partitions.len());
        for partition in partitions {
            let message = self
                .producer
                .create_message()
                .with_content(payload.clone())
                .with_key(self.keys[*partition as usize].clone());
            receipts.push(message.send_non_blocking().await?);
        }
        for receipt in receipts {
            receipt.await?;
        }
        Ok(self.written)
    }

    /// Notes a marker read on `partition`, if it is one of this run's.
    fn read(&mut self, partition: u32, payload: &[u8]) -> bool {
        match serde_json::from_slice::<Marker>(payload) {
            Ok(marker) => {
                if marker.marker == self.writer {
                    let at = self.read.entry(partition).or_default();
                    *at = (*at).max(marker.number);
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Whether marker `number` was read back on `partition`.
    fn reached_on(&self, partition: u32, number: u64) -> bool {
        self.read.get(&partition).is_some_and(|read| *read >= number)
    }

    /// Whether marker `number` was read back on each of `partitions`.
    fn reached(&self, partitions: &BTreeSet<u32>, number: u64) -> bool {
        partitions
            .iter()
            .all(|partition| self.reached_on(*partition, number))
    }

    /// For a warning: the newest marker written and, per partition, the newest read back.
    fn progress(&self) -> String {
        format!("written {}, read back {:?}", self.written, self.read)
    }
}

/// Reads the subscription until shutdown, or until it must be made again ([`Ended`]): after a
/// receive or marker error, or when no record at all arrived for `stall_timeout_ms` while a marker
/// was pending (the marker is on the broker, so a live subscription must bring it back; one that
/// does not is replaced rather than waited on for ever), or when the partitions to follow change.
#[allow(clippy::too_many_arguments)]
async fn follow(
    consumer: &mut Partitions,
    instance: &str,
    store: &SledStore,
    registry: &Registry,
    markers: &mut Markers,
    requests: &mut Requests,
    config: &ChangelogConfig,
    deaf: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let Requests {
        receiver: barriers,
        seen,
    } = requests;
    let stall_timeout = Duration::from_millis(config.stall_timeout_ms);
    let followed = seen.ownership().followed.clone();
    // A partition is held once a marker written from now on is read back on it.
    let fresh = markers.written + 1;
    // Barriers waiting for their marker to come back.
    let mut waiting: Vec<(u64, oneshot::Sender<()>)> = Vec::new();
    let mut unacked: HashMap<u32, u32> = HashMap::new();
    // Per partition, the id (ledger, entry, batch index) of the last message read: the position
    // to remember once it is handled (everything up to it is in the store then), and where a copy
    // the broker sends again is told apart.
    let mut read: HashMap<u32, (u64, u64, i32)> = HashMap::new();
    // Aggregates withdrawn at start are settled once the changelog is read to its end: at the
    // return of a marker written now, and before any barrier resolves.
    let mut settle_at = None;
    if store.any_unconfirmed() {
        match tokio::time::timeout(Duration::from_secs(10), markers.write(&followed)).await {
            Ok(Ok(number)) => {
                settle_at = Some(number);
                seen.marker_pending(true);
            }
            _ => {
                tracing::warn!("Cannot write a changelog marker; subscribing again.");
                return Ended::Failed;
            }
        }
    }
    // Whether the partitions to follow changed.
    let changed = |seen: &Seen| {
        let mut ownership = seen.ownership();
        ownership.wanted(config.standby_partitions, store.any_unconfirmed()) != followed
    };
    // A partition was handed back, or the withdrawn commits settled: the partitions to follow may
    // have changed, to be seen to once no marker is pending.
    let mut recheck = false;
    let mut last_read = Instant::now();
    loop {
        let pending = settle_at.is_some() || !waiting.is_empty();
        let stalled_at = tokio::time::Instant::from_std(last_read + stall_timeout);
        tokio::select! {
            _ = shutdown.changed() => return Ended::Shutdown,
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
                return Ended::Failed;
            }
            Some(first) = barriers.recv() => {
                // Every request waiting now shares one marker: it is written after each.
                let mut asked = vec![first];
                while let Ok(more) = barriers.try_recv() {
                    asked.push(more);
                }
                // A partition not followed yet: follow it (its callers ask again meanwhile).
                if !asked.iter().all(|(scope, _)| seen.ownership().covers(*scope)) {
                    if !remember_positions(store, markers, &read) {
                        return Ended::Failed;
                    }
                    return Ended::Resubscribe;
                }
                if followed.is_empty() {
                    // Nothing to read: the report service of a daemon that owns no partition.
                    for (_, done) in asked {
                        let _ = done.send(());
                    }
                    continue;
                }
                metrics::counter!(CHANGELOG_BARRIERS).increment(1);
                match tokio::time::timeout(Duration::from_secs(10), markers.write(&followed)).await {
                    Ok(Ok(number)) => {
                        if waiting.is_empty() && settle_at.is_none() {
                            // Nothing was pending: the stall clock starts with this marker.
                            last_read = Instant::now();
                        }
                        waiting.extend(asked.into_iter().map(|(_, done)| (number, done)));
                        seen.marker_pending(true);
                    }
                    // Dropping the requests makes their callers ask again.
                    Ok(Err(error)) => {
                        tracing::warn!(error = %error, "Cannot write a changelog marker; subscribing again.");
                        return Ended::Failed;
                    }
                    Err(_) => {
                        tracing::warn!("Writing a changelog marker timed out; subscribing again.");
                        return Ended::Failed;
                    }
                }
            }
            received = consumer.next() => match received {
                Some(Ok(_)) if deaf => {}
                Some(Ok(message)) => {
                    last_read = Instant::now();
                    let partition = partition_of(&message.topic);
                    // A message at or before the last one read on its partition is a copy the
                    // broker sent again (pulsar-lite does, to a consumer that holds acks,
                    // docs/BENCHMARKS.md): read already, nothing to do.
                    let id = message.message_id();
                    let at = (id.ledger_id, id.entry_id, id.batch_index.unwrap_or(-1));
                    if read.get(&partition).is_some_and(|last| at <= *last) {
                        metrics::counter!(CHANGELOG_READ, "kind" => "copy").increment(1);
                        continue;
                    }
                    // Remembered only after it is handled: every return before that fails.
                    read.insert(partition, at);
                    // Records carry the daemon that wrote them; markers do not.
                    let own = message
                        .payload
                        .metadata
                        .properties
                        .iter()
                        .any(|kv| kv.key == "instance" && kv.value == instance);
                    let marker = !own && markers.read(partition, &message.payload.data);
                    // Held once read to a fresh marker, and never before withdrawn commits settle.
                    if marker && settle_at.is_none() && markers.reached_on(partition, fresh) {
                        seen.ownership().held.insert(partition);
                    }
                    metrics::counter!(CHANGELOG_READ, "kind" => if marker { "marker" } else { "record" }).increment(1);
                    // This daemon's records are in its store already, unless it withdrew their
                    // aggregate at start (a record published just before a crash is in the
                    // changelog and was withdrawn too).
                    let record = if own { store.any_unconfirmed() } else { !marker };
                    if record {
                        match serde_json::from_slice::<ChangeRecord>(&message.payload.data) {
                            Ok(record) if own && !store.is_unconfirmed(&record.aggregate).unwrap_or(true) => {}
                            Ok(record) => {
                                if !own && !seen.others.swap(true, Ordering::AcqRel) {
                                    if let Err(error) = store.remember_changelog_others() {
                                        seen.others.store(false, Ordering::Release);
                                        tracing::error!(error = %error, "Cannot remember a record of another daemon; reading again.");
                                        return Ended::Failed;
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
                                        return Ended::Failed;
                                    }
                                }
                                // A record of an input message shows its writer receives the
                                // partition; one of the gateway worker's (of no message) does not.
                                let gap = Duration::from_millis(config.takeover_gap_ms);
                                if !own && record.delivery.is_some() && seen.ownership().hand_back(partition, gap) {
                                    tracing::info!(partition, "Another daemon writes this changelog partition now: handed back.");
                                    recheck = true;
                                }
                            }
                            Err(error) => tracing::error!(error = %error, "Unreadable changelog record skipped."),
                        }
                        // No flush here: an import becomes durable with the next commit's flush,
                        // and a position written after it is lost with it (`store/checkpoint.rs`).
                    }
                    // The subscription is this run's alone and read from the store's position at
                    // each (re)subscription, so acks only keep the broker's unacked count down:
                    // one cumulative ack per partition every ACK_EVERY records, when the position
                    // is remembered too.
                    let unacked = unacked.entry(partition).or_insert(0);
                    *unacked += 1;
                    if *unacked >= ACK_EVERY {
                        *unacked = 0;
                        if !remember_positions(store, markers, &read) {
                            return Ended::Failed;
                        }
                        let _ = consumer.cumulative_ack(&message).await;
                    }
                    if settle_at.is_some_and(|number| markers.reached(&followed, number)) {
                        match store.settle_unconfirmed() {
                            Ok(removed) => {
                                for aggregate in removed {
                                    registry.forget(aggregate.kind, &aggregate.id);
                                }
                                settle_at = None;
                                recheck = true;
                                // Read to the settle marker on every partition followed: all are held.
                                seen.ownership().held.extend(followed.iter().copied());
                                tracing::info!("Withdrawn commits settled against the changelog.");
                            }
                            Err(error) => {
                                tracing::error!(error = %error, "Cannot settle withdrawn commits; reading again.");
                                return Ended::Failed;
                            }
                        }
                    }
                    let (done, pending): (Vec<_>, Vec<_>) =
                        waiting.drain(..).partition(|(number, _)| markers.reached(&followed, *number));
                    waiting = pending;
                    // Read to the changelog's end as of the marker: a restart may resume here.
                    if !done.is_empty() && !remember_positions(store, markers, &read) {
                        return Ended::Failed;
                    }
                    for (_, barrier) in done {
                        let _ = barrier.send(());
                    }
                    if settle_at.is_none() && waiting.is_empty() {
                        seen.marker_pending(false);
                        // Settled, or a partition handed back: follow only what is wanted now.
                        if std::mem::take(&mut recheck) && changed(seen) {
                            if !remember_positions(store, markers, &read) {
                                return Ended::Failed;
                            }
                            return Ended::Resubscribe;
                        }
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(error = %error, "Changelog receive failed.");
                    return Ended::Failed;
                }
                None => return Ended::Failed,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ownership(partitions: u32, owned: &[u32]) -> Ownership {
        Ownership {
            partitions,
            owned: owned.iter().copied().collect(),
            ..Ownership::default()
        }
    }

    fn set(partitions: &[u32]) -> BTreeSet<u32> {
        partitions.iter().copied().collect()
    }

    #[test]
    fn a_record_goes_to_the_changelog_partition_of_its_input_partition() {
        assert_eq!(record_topic("t", 4, Some(2)), "t-partition-2");
        assert_eq!(record_topic("t", 2, Some(3)), "t-partition-1");
        assert_eq!(record_topic("t", 4, None), "t");
        assert_eq!(record_topic("t", 0, Some(3)), "t");
        assert_eq!(partition_of("persistent://p/d/t-partition-12"), 12);
        assert_eq!(partition_of("persistent://p/d/t"), 0);
    }

    #[test]
    fn a_daemon_follows_what_it_owns_and_its_standbys_after_them() {
        assert_eq!(ownership(4, &[]).wanted(Standbys::Count(0), false), set(&[]));
        assert_eq!(ownership(4, &[]).wanted(Standbys::Count(1), false), set(&[0]));
        assert_eq!(ownership(4, &[1]).wanted(Standbys::Count(0), false), set(&[1]));
        assert_eq!(
            ownership(4, &[1]).wanted(Standbys::Count(2), false),
            set(&[1, 2, 3])
        );
        assert_eq!(
            ownership(4, &[2, 3]).wanted(Standbys::Count(1), false),
            set(&[0, 2, 3])
        );
        assert_eq!(
            ownership(4, &[2, 3]).wanted(Standbys::Count(9), false),
            set(&[0, 1, 2, 3])
        );
        assert_eq!(
            ownership(4, &[1]).wanted(Standbys::All, false),
            set(&[0, 1, 2, 3])
        );
        // Withdrawn commits to settle: every partition.
        assert_eq!(
            ownership(4, &[1]).wanted(Standbys::Count(0), true),
            set(&[0, 1, 2, 3])
        );
        // Input partitions beyond the changelog's count share its partitions.
        assert_eq!(ownership(2, &[3]).wanted(Standbys::Count(0), false), set(&[1]));
        let mut every = ownership(4, &[1]);
        every.claim(Scope::Every);
        assert_eq!(every.wanted(Standbys::Count(0), false), set(&[0, 1, 2, 3]));
    }

    #[test]
    fn a_partition_is_held_once_read_to_a_marker_and_covered_once_followed() {
        let mut ownership = ownership(4, &[]);
        ownership.claim(Scope::Partition(6));
        assert_eq!(ownership.owned, set(&[2]));
        ownership.followed = ownership.wanted(Standbys::Count(0), false);
        assert!(ownership.covers(Scope::Partition(2)) && !ownership.covers(Scope::Partition(1)));
        assert!(!ownership.covers(Scope::Every) && ownership.covers(Scope::Followed));
        assert!(!ownership.holds(Scope::Partition(2)) && !ownership.holds(Scope::Followed));
        ownership.held.insert(2);
        assert!(ownership.holds(Scope::Partition(6)) && ownership.holds(Scope::Followed));
        assert!(!ownership.holds(Scope::Every));
        // Claimed before the count is known: reduced once it is.
        let mut early = Ownership::default();
        early.claim(Scope::Partition(5));
        early.partitions = 4;
        assert_eq!(early.wanted(Standbys::Count(0), false), set(&[1]));
    }

    #[test]
    fn a_partition_is_handed_back_when_another_daemon_writes_it_and_this_one_no_longer_receives_it() {
        let quiet = Duration::from_millis(50);
        let mut ownership = ownership(4, &[]);
        ownership.claim(Scope::Partition(1));
        // Read before this daemon held it: a predecessor's record, restored.
        assert!(!ownership.hand_back(1, Duration::ZERO));
        ownership.held.insert(1);
        // Still receiving it (another input's partition of that number is the other daemon's).
        assert!(!ownership.hand_back(1, quiet));
        std::thread::sleep(quiet);
        assert!(ownership.hand_back(1, quiet));
        assert!(ownership.owned.is_empty() && ownership.held.is_empty());
        assert!(!ownership.hand_back(1, quiet), "handed back once");
        // Following every partition: nothing is handed back.
        let mut every = self::ownership(4, &[1]);
        every.every = true;
        every.held.insert(1);
        assert!(!every.hand_back(1, Duration::ZERO));
    }
}
