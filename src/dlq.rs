//! Dead letters read back and sent home: `aerostream dlq list|show|replay`.
//!
//! An input's dead-letter topic is read through a subscription of its own per partition
//! ([`Partitions`], so every consumer id is unique: SPEC §11): non-durable, exclusive, starting
//! from the earliest message, named `aerostream-dlq-<unique id>` and unsubscribed at the end. The
//! subscriptions of other readers are never touched, and reading twice shows the same messages. A
//! read ends at the last message each partition held when it began (`GetLastMessageId`): letters
//! dead-lettered meanwhile wait for the next run. A partition whose last message id the broker
//! does not give (pulsar-lite answers an error for an empty topic) is read until no message comes
//! for [`QUIET`]; a partition whose end never arrives (trimmed by retention) is given up after
//! [`STALLED`], and the read says it is incomplete.
//!
//! A replay republishes chosen dead letters to their input's topic with their key, their payload
//! and their properties, less the ones dead-lettering added ([`DEAD_LETTER_PROPERTIES`]), plus
//! [`REPLAYED_FROM`]. The daemon then handles them like any message, through the idempotency
//! window: a replayed event that was applied before (replayed twice, within
//! `idempotency.window_seconds`) is a duplicate, not applied again.

use crate::broker::{self, Client};
use crate::codec::{Codec, MessageMeta};
use crate::config::{Config, InputConfig};
use crate::partitions::Partitions;
use crate::tables;
use futures::stream::FuturesOrdered;
use futures::TryStreamExt;
use pulsar::consumer::{InitialPosition, Message};
use pulsar::proto::MessageIdData;
use pulsar::{ConsumerOptions, SubType};
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt;
use std::ops::ControlFlow;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The properties dead-lettering adds to a message (`broker::send_dead_letter` and
/// `ingest::publish_dead_letter`); a replay leaves them out.
pub const DEAD_LETTER_PROPERTIES: [&str; 5] = [
    "reason",
    "detail",
    "source_topic",
    "source_message_id",
    "event_type",
];

/// The property a replayed message carries: the id of the dead letter it came from.
pub const REPLAYED_FROM: &str = "replayed_from";

/// A partition that has not told its end is read until no message comes for this long.
pub const QUIET: Duration = Duration::from_secs(2);
/// A partition whose end is known but not reached gives up after this long without a message.
pub const STALLED: Duration = Duration::from_secs(15);
/// Connecting to the broker, asking a partition's end, unsubscribing: each bounded by this.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `detail` shown in a `list` table (`show` prints it whole).
const DETAIL_CHARS: usize = 60;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("no input {name:?} in the configuration; the inputs are: {known}")]
    UnknownInput { name: String, known: String },
    #[error("pulsar: {0}")]
    Pulsar(#[from] pulsar::Error),
    #[error("no answer from the broker at {0} within {BROKER_TIMEOUT:?}")]
    BrokerTimeout(String),
    #[error(
        "{0:?} is not a message id: expected ledger:entry:partition[:batch index], as `dlq list` prints it"
    )]
    BadId(String),
    #[error("{0:?} is not a time: expected RFC 3339 in UTC (2026-01-31T12:00:00Z) or a duration ago (90s, 30m, 2h, 1d)")]
    BadTime(String),
    #[error("no message {id} in {topic}")]
    NotFound { id: DeadLetterId, topic: String },
    #[error("{0}; nothing replayed")]
    Selection(String),
    #[error("{matching} messages match, more than --max {max}; nothing replayed: narrow the selection or raise --max")]
    TooMany { matching: usize, max: usize },
    #[error("replay needs a selection: --id, a filter (--reason, --type, --since, --until) or --all")]
    NoSelection,
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Where a message sits on its topic, as `source_message_id` and `dlq list` write it:
/// `ledger:entry:partition` (partition -1: not partitioned) and `:batch index` inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeadLetterId {
    pub ledger: u64,
    pub entry: u64,
    pub partition: i32,
    pub batch: Option<i32>,
}

impl DeadLetterId {
    fn of(id: &MessageIdData) -> DeadLetterId {
        DeadLetterId {
            ledger: id.ledger_id,
            entry: id.entry_id,
            partition: id.partition.unwrap_or(-1),
            batch: id.batch_index.filter(|index| *index >= 0),
        }
    }
}

impl fmt::Display for DeadLetterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.ledger, self.entry, self.partition)?;
        if let Some(batch) = self.batch {
            write!(f, ":{batch}")?;
        }
        Ok(())
    }
}

impl FromStr for DeadLetterId {
    type Err = DlqError;

    fn from_str(text: &str) -> Result<DeadLetterId, DlqError> {
        let bad = || DlqError::BadId(text.to_owned());
        let parts: Vec<&str> = text.trim().split(':').collect();
        let (ledger, entry, partition, batch) = match parts.as_slice() {
            [l, e, p] => (l, e, p, None),
            [l, e, p, b] => (l, e, p, Some(b.parse().map_err(|_| bad())?)),
            _ => return Err(bad()),
        };
        Ok(DeadLetterId {
            ledger: ledger.parse().map_err(|_| bad())?,
            entry: entry.parse().map_err(|_| bad())?,
            partition: partition.parse().map_err(|_| bad())?,
            batch,
        })
    }
}

/// A time given on the command line: RFC 3339 (UTC), or a duration meaning that long ago.
/// Milliseconds since the epoch.
pub fn parse_time(text: &str) -> Result<u64, DlqError> {
    let bad = || DlqError::BadTime(text.to_owned());
    let at = match humantime::parse_rfc3339_weak(text.trim()) {
        Ok(at) => at,
        Err(_) => {
            let ago = humantime::parse_duration(text.trim()).map_err(|_| bad())?;
            SystemTime::now().checked_sub(ago).ok_or_else(bad)?
        }
    };
    Ok(at.duration_since(UNIX_EPOCH).map_err(|_| bad())?.as_millis() as u64)
}

fn format_time(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// One message of a dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetterMessage {
    pub id: DeadLetterId,
    /// The (partition) topic it was read from.
    pub topic: String,
    /// When it was dead-lettered: its publish time, ms since the epoch.
    pub publish_time_ms: u64,
    pub key: Option<String>,
    /// In the order the message carries them.
    pub properties: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl DeadLetterMessage {
    fn of(message: &Message<Vec<u8>>) -> DeadLetterMessage {
        DeadLetterMessage {
            id: DeadLetterId::of(message.message_id()),
            topic: message.topic.clone(),
            publish_time_ms: message.metadata().publish_time,
            key: message.key(),
            properties: message
                .metadata()
                .properties
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.clone()))
                .collect(),
            payload: message.payload.data.clone(),
        }
    }

    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn reason(&self) -> Option<&str> {
        self.property("reason")
    }

    /// The event type: the decoded record's (`event_type`, added when the message decoded),
    /// else the producer's `ce_type`.
    pub fn event_type(&self) -> Option<&str> {
        self.property("event_type").or_else(|| self.property("ce_type"))
    }

    /// Whether it was dead-lettered from `topic` or one of its partitions; a letter that does
    /// not say where it comes from is taken to be from there.
    fn comes_from(&self, topic: &str) -> bool {
        match self.property("source_topic") {
            None => true,
            Some(source) => {
                source == topic
                    || source
                        .strip_prefix(topic)
                        .is_some_and(|rest| rest.starts_with("-partition-"))
            }
        }
    }

    /// Its key, properties (without the dead-letter ones) and payload, for the input again.
    fn replay_properties(&self) -> Vec<(String, String)> {
        self.properties
            .iter()
            .filter(|(key, _)| !DEAD_LETTER_PROPERTIES.contains(&key.as_str()) && key != REPLAYED_FROM)
            .cloned()
            .chain([(REPLAYED_FROM.to_owned(), self.id.to_string())])
            .collect()
    }
}

/// Which dead letters a command is about; an empty filter takes every one.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub ids: Vec<DeadLetterId>,
    /// Any of these `reason`s.
    pub reasons: Vec<String>,
    /// Any of these event types ([`DeadLetterMessage::event_type`]), case-insensitive.
    pub types: Vec<String>,
    /// Dead-lettered at or after (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Dead-lettered before (ms since the epoch).
    pub until_ms: Option<u64>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.reasons.is_empty()
            && self.types.is_empty()
            && self.since_ms.is_none()
            && self.until_ms.is_none()
    }

    pub fn matches(&self, message: &DeadLetterMessage) -> bool {
        let any = |wanted: &[String], have: Option<&str>, same: fn(&str, &str) -> bool| {
            wanted.is_empty() || have.is_some_and(|have| wanted.iter().any(|w| same(w, have)))
        };
        (self.ids.is_empty() || self.ids.contains(&message.id))
            && any(&self.reasons, message.reason(), |a, b| a == b)
            && any(&self.types, message.event_type(), |a, b| {
                a.eq_ignore_ascii_case(b)
            })
            && self
                .since_ms
                .map_or(true, |since| message.publish_time_ms >= since)
            && self
                .until_ms
                .map_or(true, |until| message.publish_time_ms < until)
    }
}

/// How a read of a dead-letter topic went.
#[derive(Debug, Clone, Default)]
pub struct ReadStats {
    /// Messages read.
    pub read: usize,
    /// Partitions given up before their known end ([`STALLED`]): what they hold past that point
    /// was not seen.
    pub incomplete: Vec<String>,
}

/// Where a partition's reading ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// At this entry (ledger, entry), its last batch index included.
    At(u64, u64),
    /// Read until quiet: the broker did not tell.
    Quiet,
    Reached,
}

impl End {
    fn of(last: Result<MessageIdData, pulsar::Error>) -> End {
        match last {
            // Apache Pulsar answers entry -1 for a topic without messages.
            Ok(id) if (id.ledger_id as i64) < 0 || (id.entry_id as i64) < 0 => End::Reached,
            Ok(id) => End::At(id.ledger_id, id.entry_id),
            Err(_) => End::Quiet,
        }
    }

    /// Takes `message`: whether it is before the end (to keep), and the end afterwards.
    fn take(self, message: &Message<Vec<u8>>) -> (bool, End) {
        let id = message.message_id();
        match self {
            End::Reached => (false, End::Reached),
            End::Quiet => (true, End::Quiet),
            End::At(ledger, entry) => match (id.ledger_id, id.entry_id).cmp(&(ledger, entry)) {
                std::cmp::Ordering::Less => (true, self),
                std::cmp::Ordering::Greater => (false, End::Reached),
                std::cmp::Ordering::Equal => {
                    let in_batch = message.metadata().num_messages_in_batch.unwrap_or(1);
                    let last = id.batch_index.map_or(true, |index| index + 1 >= in_batch);
                    (true, if last { End::Reached } else { self })
                }
            },
        }
    }
}

/// Connects to the broker of `config`, giving up after [`BROKER_TIMEOUT`].
pub async fn connect(config: &Config) -> Result<Client, DlqError> {
    let url = config.broker.url.clone();
    tokio::time::timeout(BROKER_TIMEOUT, Client::open(&url))
        .await
        .map_err(|_| DlqError::BrokerTimeout(url))?
        .map_err(DlqError::from)
}

/// The input named `name` in `config`.
pub fn input<'a>(config: &'a Config, name: &str) -> Result<&'a InputConfig, DlqError> {
    config.inputs.get(name).ok_or_else(|| DlqError::UnknownInput {
        name: name.to_owned(),
        known: config.inputs.keys().cloned().collect::<Vec<_>>().join(", "),
    })
}

/// Reads `topic` from its earliest message to its end (see the module comment), handing each
/// message to `visit` until it breaks.
pub async fn read(
    client: &Client,
    topic: &str,
    mut visit: impl FnMut(DeadLetterMessage) -> ControlFlow<()>,
) -> Result<ReadStats, DlqError> {
    let subscription = format!("aerostream-dlq-{}", broker::unique_consumer_id());
    let mut partitions = Partitions::subscribe(client, topic, |builder, _, _| {
        builder
            .with_subscription(subscription.clone())
            .with_subscription_type(SubType::Exclusive)
            .with_options(
                ConsumerOptions::default()
                    .durable(false)
                    .with_initial_position(InitialPosition::Earliest),
            )
    })
    .await?;
    let mut ends: HashMap<String, End> = partitions
        .last_message_ids(BROKER_TIMEOUT)
        .await
        .into_iter()
        .map(|(topic, last)| (topic, End::of(last)))
        .collect();
    let mut stats = ReadStats::default();
    let outcome = loop {
        let open = |ends: &HashMap<String, End>, end: End| ends.values().any(|e| *e == end);
        let waiting_for_known = ends.values().any(|end| matches!(end, End::At(..)));
        if !waiting_for_known && !open(&ends, End::Quiet) {
            break Ok(());
        }
        let patience = if waiting_for_known { STALLED } else { QUIET };
        let message = match tokio::time::timeout(patience, partitions.next()).await {
            Err(_elapsed) => {
                stats.incomplete = ends
                    .iter()
                    .filter(|(_, end)| matches!(end, End::At(..)))
                    .map(|(topic, _)| topic.clone())
                    .collect();
                break Ok(());
            }
            Ok(None) => break Err(pulsar::Error::Custom("the broker ended the subscription".into())),
            Ok(Some(Err(error))) => break Err(error),
            Ok(Some(Ok(message))) => message,
        };
        let end = ends.entry(message.topic.clone()).or_insert(End::Quiet);
        let (keep, after) = end.take(&message);
        *end = after;
        if keep {
            stats.read += 1;
            if visit(DeadLetterMessage::of(&message)).is_break() {
                break Ok(());
            }
        }
    };
    // The subscription is this read's alone; a failure to end it leaves a non-durable
    // subscription that the broker drops with the connection.
    let _ = partitions.unsubscribe(BROKER_TIMEOUT).await;
    outcome?;
    Ok(stats)
}

/// A dead letter as `list` and `show` print it.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub id: String,
    pub publish_time: String,
    pub publish_time_ms: u64,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub event_type: Option<String>,
    pub key: Option<String>,
    pub topic: String,
    pub properties: BTreeMap<String, String>,
}

impl From<&DeadLetterMessage> for Entry {
    fn from(message: &DeadLetterMessage) -> Entry {
        Entry {
            id: message.id.to_string(),
            publish_time: format_time(message.publish_time_ms),
            publish_time_ms: message.publish_time_ms,
            reason: message.reason().map(str::to_owned),
            detail: message.property("detail").map(str::to_owned),
            event_type: message.event_type().map(str::to_owned),
            key: message.key.clone(),
            topic: message.topic.clone(),
            properties: message.properties.iter().cloned().collect(),
        }
    }
}

/// What `list` found: the oldest `limit` matching letters, by publish time.
#[derive(Debug, Clone)]
pub struct Listing {
    pub topic: String,
    pub entries: Vec<Entry>,
    pub matching: usize,
    pub stats: ReadStats,
}

/// The dead letters of `topic` that `filter` takes: the oldest `limit` (0: all) of them.
pub async fn list(client: &Client, topic: &str, filter: &Filter, limit: usize) -> Result<Listing, DlqError> {
    let limit = if limit == 0 { usize::MAX } else { limit };
    // The `limit` oldest so far: a max-heap on (publish time, id) that drops its newest.
    let mut oldest: BinaryHeap<(u64, DeadLetterId, Reverse<usize>)> = BinaryHeap::new();
    let mut kept: HashMap<usize, Entry> = HashMap::new();
    let mut matching = 0;
    let stats = read(client, topic, |message| {
        if filter.matches(&message) {
            oldest.push((message.publish_time_ms, message.id, Reverse(matching)));
            kept.insert(matching, Entry::from(&message));
            if oldest.len() > limit {
                if let Some((_, _, Reverse(dropped))) = oldest.pop() {
                    kept.remove(&dropped);
                }
            }
            matching += 1;
        }
        ControlFlow::Continue(())
    })
    .await?;
    let entries = oldest
        .into_sorted_vec()
        .into_iter()
        .filter_map(|(_, _, Reverse(at))| kept.remove(&at))
        .collect();
    Ok(Listing {
        topic: topic.to_owned(),
        entries,
        matching,
        stats,
    })
}

fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

fn or_dash(value: &Option<String>) -> &str {
    value.as_deref().unwrap_or("-")
}

impl Listing {
    /// A table: id, publish time, reason, type, key, detail (shortened), then a count line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.entries.is_empty() {
            let mut rows = tables::plain(&["ID", "PUBLISHED", "REASON", "TYPE", "KEY", "DETAIL"]);
            for entry in &self.entries {
                rows.add_row(vec![
                    entry.id.clone(),
                    entry.publish_time.clone(),
                    or_dash(&entry.reason).to_owned(),
                    or_dash(&entry.event_type).to_owned(),
                    or_dash(&entry.key).to_owned(),
                    shorten(or_dash(&entry.detail), DETAIL_CHARS),
                ]);
            }
            out.push_str(&tables::render(rows));
            out.push('\n');
        }
        out.push_str(&format!(
            "{} of {} dead letters in {} match",
            self.matching, self.stats.read, self.topic
        ));
        if self.entries.len() < self.matching {
            out.push_str(&format!(
                "; the oldest {} shown (--limit 0 shows all)",
                self.entries.len()
            ));
        }
        out.push('\n');
        out
    }

    /// One JSON object per line.
    pub fn render_json(&self) -> Result<String, DlqError> {
        let mut out = String::new();
        for entry in &self.entries {
            out.push_str(&serde_json::to_string(entry)?);
            out.push('\n');
        }
        Ok(out)
    }
}

/// What `show` prints of one dead letter: its entry, its payload decoded with the writer schema
/// its `ce_dataschema` names (else the input's `default_dataschema`), and what the daemon's codec
/// makes of it now.
#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    #[serde(flatten)]
    pub entry: Entry,
    pub dataschema: Option<String>,
    /// The Avro record as JSON (fields in alphabetical order), when the payload decodes.
    pub record: Option<serde_json::Value>,
    /// Why the daemon's codec refuses the message today, with its dead-letter reason.
    pub decode_error: Option<String>,
    pub decode_reason: Option<String>,
    /// The payload in hex, when it is not an Avro record of its schema.
    pub payload_hex: Option<String>,
}

/// Finds dead letter `id` in `topic` and decodes it.
pub async fn show(
    client: &Client,
    topic: &str,
    id: DeadLetterId,
    input: &InputConfig,
    codec: &Codec,
) -> Result<Shown, DlqError> {
    let mut found = None;
    read(client, topic, |message| {
        if message.id == id {
            found = Some(message);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })
    .await?;
    let message = found.ok_or_else(|| DlqError::NotFound {
        id,
        topic: topic.to_owned(),
    })?;
    Ok(describe(&message, input, codec))
}

fn describe(message: &DeadLetterMessage, input: &InputConfig, codec: &Codec) -> Shown {
    let dataschema = message
        .property("ce_dataschema")
        .map(str::to_owned)
        .or_else(|| (!input.default_dataschema.is_empty()).then(|| input.default_dataschema.clone()));
    let record = dataschema
        .as_deref()
        .and_then(|dataschema| codec.registry().writer(dataschema))
        .and_then(|writer| {
            let mut rest = message.payload.as_slice();
            let value = apache_avro::from_avro_datum(writer, &mut rest, None).ok()?;
            rest.is_empty().then_some(value)
        })
        .and_then(|value| serde_json::Value::try_from(value).ok());
    let meta = MessageMeta {
        key: message.key.as_deref(),
        ce_type: message.property("ce_type"),
        dataschema: dataschema.as_deref(),
    };
    let decoded = codec.decode_message(meta, &message.payload);
    let payload_hex = record.is_none().then(|| hex::encode(&message.payload));
    Shown {
        entry: Entry::from(message),
        dataschema,
        record,
        decode_error: decoded.as_ref().err().map(ToString::to_string),
        decode_reason: decoded.as_ref().err().map(|e| e.reason().to_owned()),
        payload_hex,
    }
}

impl Shown {
    pub fn render(&self) -> Result<String, DlqError> {
        let entry = &self.entry;
        let mut fields = tables::plain(&[]);
        let rows: [(&str, String); 7] = [
            ("id", entry.id.clone()),
            ("topic", entry.topic.clone()),
            ("published", entry.publish_time.clone()),
            ("reason", or_dash(&entry.reason).to_owned()),
            ("detail", or_dash(&entry.detail).to_owned()),
            ("type", or_dash(&entry.event_type).to_owned()),
            ("key", or_dash(&entry.key).to_owned()),
        ];
        for (name, value) in rows {
            fields.add_row(vec![name.to_owned(), value]);
        }
        let mut properties = tables::plain(&["PROPERTY", "VALUE"]);
        for (name, value) in &entry.properties {
            properties.add_row(vec![name.clone(), value.clone()]);
        }
        let mut out = format!("{}\n\n{}\n\n", tables::render(fields), tables::render(properties));
        match &self.decode_error {
            None => out.push_str("decodes: the daemon's codec accepts it as it is\n"),
            Some(error) => out.push_str(&format!(
                "does not decode ({}): {error}\n",
                or_dash(&self.decode_reason)
            )),
        }
        match (&self.record, &self.payload_hex) {
            (Some(record), _) => out.push_str(&format!(
                "record ({}):\n{}\n",
                or_dash(&self.dataschema),
                serde_json::to_string_pretty(record)?
            )),
            (None, Some(hex)) => out.push_str(&format!(
                "payload ({} bytes, not a record of {}):\n{hex}\n",
                hex.len() / 2,
                or_dash(&self.dataschema)
            )),
            (None, None) => {}
        }
        Ok(out)
    }
}

/// A replay's selection: a filter, or everything with `all`.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub filter: Filter,
    pub all: bool,
    /// More matching messages than this refuses the replay.
    pub max: usize,
}

/// One dead letter replayed (or, in a dry run, that would be).
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    #[serde(flatten)]
    pub entry: Entry,
    /// Its message id on the input's topic (`None`: a dry run).
    pub replayed_as: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Replay {
    pub input_topic: String,
    pub dry_run: bool,
    pub replayed: Vec<Replayed>,
    /// Matching letters left out because they came from another topic.
    pub other_topics: usize,
    pub stats: ReadStats,
}

/// Replays the dead letters of `dlq_topic` that `selection` takes to `input_topic` (see the
/// module comment), or with `dry_run` only says which. Nothing is published unless every
/// requested id was found, came from `input_topic`, and at most `max` messages match.
pub async fn replay(
    client: &Client,
    dlq_topic: &str,
    input_topic: &str,
    selection: &Selection,
    dry_run: bool,
) -> Result<Replay, DlqError> {
    if selection.filter.is_empty() && !selection.all {
        return Err(DlqError::NoSelection);
    }
    let filter = &selection.filter;
    let mut chosen: Vec<DeadLetterMessage> = Vec::new();
    let (mut matching, mut other_topics) = (0, Vec::new());
    let stats = read(client, dlq_topic, |message| {
        if filter.matches(&message) {
            if !message.comes_from(input_topic) {
                other_topics.push(message.id);
            } else {
                matching += 1;
                if chosen.len() < selection.max {
                    chosen.push(message);
                }
            }
        }
        ControlFlow::Continue(())
    })
    .await?;
    if matching > selection.max {
        return Err(DlqError::TooMany {
            matching,
            max: selection.max,
        });
    }
    let foreign: Vec<String> = filter
        .ids
        .iter()
        .filter(|id| other_topics.contains(id))
        .map(ToString::to_string)
        .collect();
    if !foreign.is_empty() {
        return Err(DlqError::Selection(format!(
            "{} came from another topic than {input_topic} (see their source_topic)",
            foreign.join(", ")
        )));
    }
    let missing: Vec<String> = filter
        .ids
        .iter()
        .filter(|id| !chosen.iter().any(|m| m.id == **id))
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(DlqError::Selection(format!(
            "not found in {dlq_topic}, or not taken by the other options: {}",
            missing.join(", ")
        )));
    }
    chosen.sort_by_key(|message| (message.publish_time_ms, message.id));
    let mut replayed: Vec<Replayed> = chosen
        .iter()
        .map(|message| Replayed {
            entry: Entry::from(message),
            replayed_as: None,
        })
        .collect();
    if !dry_run && !chosen.is_empty() {
        let mut producer = broker::producer(client, input_topic.to_owned()).await?;
        let mut receipts = FuturesOrdered::new();
        for message in &chosen {
            let mut builder = producer.create_message().with_content(message.payload.clone());
            if let Some(key) = &message.key {
                builder = builder.with_key(key.clone());
            }
            for (name, value) in message.replay_properties() {
                builder = builder.with_property(name, value);
            }
            receipts.push_back(builder.send_non_blocking().await?);
        }
        let receipts: Vec<_> = receipts.try_collect().await?;
        for (replayed, receipt) in replayed.iter_mut().zip(receipts) {
            replayed.replayed_as = receipt
                .message_id
                .as_ref()
                .map(|id| DeadLetterId::of(id).to_string());
        }
        let _ = producer.close().await;
    }
    Ok(Replay {
        input_topic: input_topic.to_owned(),
        dry_run,
        replayed,
        other_topics: other_topics.len(),
        stats,
    })
}

impl Replay {
    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.replayed.is_empty() {
            let mut rows = tables::plain(&["ID", "REASON", "TYPE", "KEY", "REPLAYED AS"]);
            for replayed in &self.replayed {
                let entry = &replayed.entry;
                rows.add_row(vec![
                    entry.id.clone(),
                    or_dash(&entry.reason).to_owned(),
                    or_dash(&entry.event_type).to_owned(),
                    or_dash(&entry.key).to_owned(),
                    replayed.replayed_as.clone().unwrap_or_else(|| "(dry run)".into()),
                ]);
            }
            out.push_str(&tables::render(rows));
            out.push('\n');
        }
        let verb = if self.dry_run { "would replay" } else { "replayed" };
        out.push_str(&format!(
            "{verb} {} of {} dead letters to {}",
            self.replayed.len(),
            self.stats.read,
            self.input_topic
        ));
        if self.other_topics > 0 {
            out.push_str(&format!(
                "; {} matching letters came from other topics and were left out",
                self.other_topics
            ));
        }
        out.push('\n');
        out
    }

    pub fn render_json(&self) -> Result<String, DlqError> {
        let mut out = String::new();
        for replayed in &self.replayed {
            out.push_str(&serde_json::to_string(replayed)?);
            out.push('\n');
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(properties: &[(&str, &str)], publish_time_ms: u64) -> DeadLetterMessage {
        DeadLetterMessage {
            id: "3:7:-1".parse().unwrap(),
            topic: "persistent://public/default/t-DLQ".into(),
            publish_time_ms,
            key: Some("k".into()),
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            payload: vec![1, 2],
        }
    }

    #[test]
    fn ids_read_back_as_they_print() {
        for text in ["0:4:-1", "12:0:3", "5:9:1:2"] {
            let id: DeadLetterId = text.parse().unwrap();
            assert_eq!(id.to_string(), text);
        }
        for bad in ["", "1:2", "a:b:c", "1:2:3:4:5", "1:-2:0"] {
            assert!(bad.parse::<DeadLetterId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn times_are_rfc3339_or_durations_ago() {
        assert_eq!(parse_time("2026-01-01T00:00:00Z").unwrap(), 1_767_225_600_000);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let ago = parse_time("30m").unwrap();
        assert!(now - ago >= 30 * 60_000 && now - ago < 31 * 60_000, "{now} {ago}");
        assert!(parse_time("yesterday-ish").is_err());
    }

    #[test]
    fn a_filter_takes_any_of_its_values_and_every_option() {
        let message = letter(
            &[("reason", "unknown_campaign"), ("ce_type", "ClickRegistrado")],
            1_000,
        );
        assert!(Filter::default().matches(&message));
        let reasons = |r: &[&str]| Filter {
            reasons: r.iter().map(|s| s.to_string()).collect(),
            ..Filter::default()
        };
        assert!(reasons(&["invalid_avro", "unknown_campaign"]).matches(&message));
        assert!(!reasons(&["invalid_avro"]).matches(&message));
        let typed = Filter {
            types: vec!["clickregistrado".into()],
            since_ms: Some(1_000),
            until_ms: Some(1_001),
            ..reasons(&["unknown_campaign"])
        };
        assert!(typed.matches(&message));
        assert!(!Filter {
            until_ms: Some(1_000),
            ..typed.clone()
        }
        .matches(&message));
        assert!(!Filter {
            since_ms: Some(1_001),
            ..typed
        }
        .matches(&message));
        let other_id = Filter {
            ids: vec!["3:8:-1".parse().unwrap()],
            ..Filter::default()
        };
        assert!(!other_id.matches(&message));
    }

    #[test]
    fn the_decoded_type_comes_before_the_producers() {
        let message = letter(&[("ce_type", "Nada"), ("event_type", "ClickRegistrado")], 0);
        assert_eq!(message.event_type(), Some("ClickRegistrado"));
    }

    #[test]
    fn a_replay_drops_what_dead_lettering_added_and_says_where_it_comes_from() {
        let message = letter(
            &[
                ("ce_id", "e-1"),
                ("reason", "unknown_campaign"),
                ("detail", "campaign c does not exist"),
                ("source_topic", "persistent://public/default/t"),
                ("source_message_id", "0:1:-1"),
                ("event_type", "ClickRegistrado"),
                ("ce_type", "ClickRegistrado"),
                (REPLAYED_FROM, "0:0:-1"),
            ],
            0,
        );
        assert_eq!(
            message.replay_properties(),
            vec![
                ("ce_id".to_owned(), "e-1".to_owned()),
                ("ce_type".to_owned(), "ClickRegistrado".to_owned()),
                (REPLAYED_FROM.to_owned(), "3:7:-1".to_owned()),
            ]
        );
    }

    #[test]
    fn a_letter_comes_from_its_source_topic_or_a_partition_of_it() {
        let from = |source: &str| letter(&[("source_topic", source)], 0);
        let topic = "persistent://public/default/t";
        assert!(from(topic).comes_from(topic));
        assert!(from("persistent://public/default/t-partition-1").comes_from(topic));
        assert!(!from("persistent://public/default/t2").comes_from(topic));
        assert!(letter(&[], 0).comes_from(topic));
    }
}
