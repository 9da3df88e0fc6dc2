//! Black-box tests of the local broker harness: the `pulsar` crate against real pulsar-lite through
//! the relay (`tests/support`), one broker per test on free ports, plus relay unit tests on
//! synthetic frames.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use prost::Message as _;
use pulsar::consumer::{DeadLetterPolicy, InitialPosition, Message};
use pulsar::message::proto::{
    base_command, command_lookup_topic_response, command_subscribe::SubType, BaseCommand,
    CommandLookupTopicResponse, CommandMessage, MessageIdData, MessageMetadata,
};
use pulsar::{Consumer, ConsumerOptions, ProducerOptions, Pulsar, TokioExecutor};
use support::relay::rewrite_frame;
use support::{unique_consumer_id, LocalBroker};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

/// Upper bound for any one wait on the broker; tests normally finish in well under a second.
const DEADLINE: Duration = Duration::from_secs(30);

type StringConsumer = Consumer<String, TokioExecutor>;

async fn client(broker: &LocalBroker) -> Pulsar<TokioExecutor> {
    Pulsar::builder(broker.url(), TokioExecutor)
        .build()
        .await
        .expect("client connects through the relay")
}

/// A consumer reading from the start of `topic`, with a unique consumer id and a receiver queue
/// of `queue` messages.
async fn consumer(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    subscription: &str,
    sub_type: SubType,
    queue: u32,
) -> StringConsumer {
    pulsar
        .consumer()
        .with_topic(topic)
        .with_subscription(subscription)
        .with_subscription_type(sub_type)
        .with_consumer_id(unique_consumer_id())
        .with_batch_size(queue)
        .with_options(ConsumerOptions::default().with_initial_position(InitialPosition::Earliest))
        .build()
        .await
        .expect("consumer subscribes")
}

/// A producer on `topic` that waits when its queue is full.
async fn producer(pulsar: &Pulsar<TokioExecutor>, topic: &str) -> pulsar::Producer<TokioExecutor> {
    batching_producer(pulsar, topic, None).await
}

/// A producer on `topic` that waits when its queue is full and, given `batch`, puts what it is sent
/// within 1 ms in one broker entry of at most `batch` messages.
async fn batching_producer(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    batch: Option<u32>,
) -> pulsar::Producer<TokioExecutor> {
    producer_with(pulsar, topic, batch, Duration::from_millis(1)).await
}

/// A producer whose broker entries hold `size` messages each: an entry goes out when full, never
/// for time (with a 1 ms wait, a test's entry was split in two on a loaded machine).
async fn whole_entries_producer(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    size: u32,
) -> pulsar::Producer<TokioExecutor> {
    producer_with(pulsar, topic, Some(size), Duration::from_secs(600)).await
}

/// A producer batching up to `batch` messages per entry, an entry going out after `wait`.
async fn producer_with(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    batch: Option<u32>,
    wait: Duration,
) -> pulsar::Producer<TokioExecutor> {
    pulsar
        .producer()
        .with_topic(topic)
        .with_options(ProducerOptions {
            // Otherwise a burst beyond the 100-frame outbound queue fails with SlowDown.
            block_queue_if_full: true,
            batch_size: batch,
            batch_timeout: batch.map(|_| wait),
            ..Default::default()
        })
        .build()
        .await
        .expect("producer registers")
}

/// Sends `(key, payload)` pairs and waits for every receipt.
async fn produce(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    messages: impl IntoIterator<Item = (Option<String>, String)>,
) {
    let mut producer = producer(pulsar, topic).await;
    let mut receipts = Vec::new();
    for (key, payload) in messages {
        let mut message = producer.create_message().with_content(payload);
        if let Some(key) = key {
            message = message.with_key(key);
        }
        receipts.push(message.send_non_blocking().await.expect("message queued"));
    }
    for receipt in receipts {
        receipt.await.expect("message persisted");
    }
}

fn numbered(prefix: &str, count: usize) -> Vec<(Option<String>, String)> {
    (0..count).map(|i| (None, format!("{prefix}-{i}"))).collect()
}

fn text(message: &Message<String>) -> String {
    String::from_utf8(message.payload.data.clone()).expect("UTF-8 payload")
}

/// The next message from `consumer`; panics once `until` has passed.
async fn next(consumer: &mut StringConsumer, until: Instant) -> Message<String> {
    tokio::time::timeout_at(until, consumer.try_next())
        .await
        .expect("a message before the deadline")
        .expect("stream healthy")
        .expect("stream open")
}

/// The next message from either consumer, tagged 0 or 1, or `None` once `until` has passed.
async fn next_of_two(
    first: &mut StringConsumer,
    second: &mut StringConsumer,
    until: Instant,
) -> Option<(usize, Message<String>)> {
    let next = async {
        tokio::select! {
            message = first.try_next() => (0, message),
            message = second.try_next() => (1, message),
        }
    };
    match tokio::time::timeout_at(until, next).await {
        Ok((index, Ok(Some(message)))) => Some((index, message)),
        Ok((index, other)) => panic!("consumer {index} stream ended: {other:?}"),
        Err(_) => None,
    }
}

/// Reads and acks from both consumers until `expected` distinct payloads were seen; returns each
/// consumer's payloads.
async fn drain_two(
    first: &mut StringConsumer,
    second: &mut StringConsumer,
    expected: usize,
) -> [Vec<String>; 2] {
    let until = Instant::now() + DEADLINE;
    let mut seen = [Vec::new(), Vec::new()];
    let mut distinct = BTreeSet::new();
    while distinct.len() < expected {
        let Some((index, message)) = next_of_two(first, second, until).await else {
            panic!(
                "only {} of {expected} messages before the deadline",
                distinct.len()
            );
        };
        let consumer = if index == 0 { &mut *first } else { &mut *second };
        consumer.ack(&message).await.expect("ack");
        distinct.insert(text(&message));
        seen[index].push(text(&message));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produces_and_consumes_a_thousand_messages_through_the_relay() {
    let broker = LocalBroker::start().expect("broker starts");
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/thousand";
    let sent = numbered("m", 1000);
    produce(&pulsar, topic, sent.clone()).await;

    let mut consumer = consumer(&pulsar, topic, "all", SubType::Exclusive, 1000).await;
    let until = Instant::now() + DEADLINE;
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let message = tokio::time::timeout_at(until, consumer.try_next())
            .await
            .expect("all messages before the deadline")
            .expect("stream healthy")
            .expect("stream open");
        consumer.ack(&message).await.expect("ack");
        received.push(text(&message));
    }

    let expected: BTreeSet<String> = sent.into_iter().map(|(_, payload)| payload).collect();
    assert_eq!(received.len(), expected.len(), "no duplicates");
    assert_eq!(received.into_iter().collect::<BTreeSet<_>>(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_standby_receives_everything_the_active_consumer_did_not_ack() {
    let broker = LocalBroker::start().expect("broker starts");
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/failover";
    let mut consumers = [
        consumer(&pulsar, topic, "fo", SubType::Failover, 1000).await,
        consumer(&pulsar, topic, "fo", SubType::Failover, 1000).await,
    ];
    produce(&pulsar, topic, numbered("f", 200)).await;

    // The active consumer gets every message; ack the first 50 of them.
    let until = Instant::now() + DEADLINE;
    let mut acked = BTreeSet::new();
    let mut active = None;
    while acked.len() < 50 {
        let [first, second] = &mut consumers;
        let (index, message) = next_of_two(first, second, until)
            .await
            .expect("the active consumer receives before the deadline");
        assert_eq!(*active.get_or_insert(index), index, "one active consumer");
        consumers[index].ack(&message).await.expect("ack");
        acked.insert(text(&message));
    }
    let active = active.expect("an active consumer");

    // Drop it (its remaining deliveries stay unacked); the standby takes over.
    let [first, second] = consumers;
    let (closed, mut standby) = if active == 0 {
        (first, second)
    } else {
        (second, first)
    };
    drop(closed);
    let all: BTreeSet<String> = numbered("f", 200).into_iter().map(|(_, p)| p).collect();
    let not_acked: BTreeSet<String> = all.difference(&acked).cloned().collect();
    let mut redelivered = BTreeSet::new();
    let until = Instant::now() + DEADLINE;
    while !not_acked.is_subset(&redelivered) {
        let message = tokio::time::timeout_at(until, standby.try_next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "standby got {} of the {} messages not acked before the failover",
                    redelivered.intersection(&not_acked).count(),
                    not_acked.len()
                )
            })
            .expect("stream healthy")
            .expect("stream open");
        standby.ack(&message).await.expect("ack");
        redelivered.insert(text(&message));
    }

    assert_eq!(acked.union(&redelivered).cloned().collect::<BTreeSet<_>>(), all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_spreads_messages_over_both_consumers() {
    let broker = LocalBroker::start().expect("broker starts");
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/shared";
    let mut first = consumer(&pulsar, topic, "sh", SubType::Shared, 10).await;
    let mut second = consumer(&pulsar, topic, "sh", SubType::Shared, 10).await;
    produce(&pulsar, topic, numbered("s", 200)).await;

    let [by_first, by_second] = drain_two(&mut first, &mut second, 200).await;

    assert!(
        !by_first.is_empty() && !by_second.is_empty(),
        "both consumers get work: {} / {}",
        by_first.len(),
        by_second.len()
    );
    let union: BTreeSet<String> = by_first.iter().chain(&by_second).cloned().collect();
    let all: BTreeSet<String> = numbered("s", 200).into_iter().map(|(_, p)| p).collect();
    assert_eq!(union, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_shared_subscription_delivers_each_key_to_one_consumer() {
    let broker = LocalBroker::start().expect("broker starts");
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/key-shared";
    let mut first = consumer(&pulsar, topic, "ks", SubType::KeyShared, 10).await;
    let mut second = consumer(&pulsar, topic, "ks", SubType::KeyShared, 10).await;
    let sent: Vec<(Option<String>, String)> = (0..200)
        .map(|i| (Some(format!("key-{}", i % 16)), format!("key-{}/{i}", i % 16)))
        .collect();
    produce(&pulsar, topic, sent.clone()).await;

    let seen = drain_two(&mut first, &mut second, sent.len()).await;

    let mut owner: HashMap<String, usize> = HashMap::new();
    for (index, payloads) in seen.iter().enumerate() {
        for payload in payloads {
            let key = payload.split('/').next().expect("key prefix").to_owned();
            assert_eq!(*owner.entry(key.clone()).or_insert(index), index, "{key} split");
        }
    }
    assert_eq!(owner.len(), 16, "every key delivered");
    let union: BTreeSet<&String> = seen.iter().flatten().collect();
    assert_eq!(union.len(), sent.len());
}

/// A probe of the `pulsar` crate's own reconnection, not of the daemon (which renews a client that
/// stays on a dead connection and subscribes again when a consumer's stream ends: `broker::Client`,
/// `ingest::run_input`, tests/broker_restart.rs). 2026-12-01: in one clean-clone `.ci/run` under
/// the suite's load the consumer's stream ended right after the broker restart (`try_next` gave
/// `None`), the client alone, no daemon involved; 6 of 6 runs of it alone passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a probe of the pulsar crate: its consumer's stream once ended after a broker restart under load; the daemon does not rely on it; run with --run-ignored all"]
async fn clients_resume_after_a_broker_restart_and_lose_nothing() {
    let broker = LocalBroker::start().expect("broker starts");
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/restart";
    let mut producer = pulsar
        .producer()
        .with_topic(topic)
        .build()
        .await
        .expect("producer registers");
    produce(&pulsar, topic, numbered("before", 100)).await;
    let mut consumer = consumer(&pulsar, topic, "restart", SubType::Exclusive, 1000).await;
    let mut received = BTreeSet::new();
    let until = Instant::now() + DEADLINE;
    while received.len() < 30 {
        let message = next(&mut consumer, until).await;
        consumer.ack(&message).await.expect("ack");
        received.insert(text(&message));
    }

    broker.stop_broker().expect("broker stops");
    broker.start_broker().expect("broker restarts");

    // The same producer and consumer reconnect on their own (an ack may race the restart and
    // be lost, so redeliveries are allowed).
    for i in 0..10 {
        let receipt = producer
            .send_non_blocking(format!("after-{i}"))
            .await
            .expect("queued after the restart");
        receipt.await.expect("persisted after the restart");
    }
    let mut all: BTreeSet<String> = numbered("before", 100).into_iter().map(|(_, p)| p).collect();
    all.extend(numbered("after", 10).into_iter().map(|(_, p)| p));
    let until = Instant::now() + DEADLINE;
    while !all.is_subset(&received) {
        let message = next(&mut consumer, until).await;
        // Acks of messages delivered before the restart may fail; they come back instead.
        let _ = consumer.ack(&message).await;
        received.insert(text(&message));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_messages_are_redelivered_then_dead_lettered() {
    let broker = LocalBroker::start().expect("broker starts");
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/poison";
    let dead_letter_topic = "persistent://public/default/poison-DLQ";
    let mut dead_letters = consumer(&pulsar, dead_letter_topic, "dlq", SubType::Exclusive, 10).await;
    let mut consumer: StringConsumer = pulsar
        .consumer()
        .with_topic(topic)
        .with_subscription("poison")
        .with_subscription_type(SubType::Shared)
        .with_consumer_id(unique_consumer_id())
        .with_options(ConsumerOptions::default().with_initial_position(InitialPosition::Earliest))
        .with_dead_letter_policy(DeadLetterPolicy {
            max_redeliver_count: 2,
            dead_letter_topic: dead_letter_topic.into(),
        })
        .build()
        .await
        .expect("consumer subscribes");
    produce(&pulsar, topic, numbered("poison", 1)).await;

    // Delivered with redelivery counts 0 and 1; the third delivery goes to the DLQ instead.
    let until = Instant::now() + DEADLINE;
    for _ in 0..2 {
        let message = next(&mut consumer, until).await;
        assert_eq!(text(&message), "poison-0");
        consumer.nack(&message).await.expect("nack");
    }
    let dead = next(&mut dead_letters, until).await;
    assert_eq!(text(&dead), "poison-0");
    dead_letters.ack(&dead).await.expect("ack");
}

// ---- Relay unit tests on synthetic frames -------------------------------------------------

const RELAY_URL: &str = "pulsar://127.0.0.1:7777";

fn message_command() -> BaseCommand {
    BaseCommand {
        r#type: base_command::Type::Message as i32,
        message: Some(CommandMessage {
            consumer_id: 7,
            message_id: MessageIdData {
                ledger_id: 1,
                entry_id: 2,
                ..Default::default()
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `[totalSize][commandSize][command]` followed by `rest`.
fn frame(command: &BaseCommand, rest: &[u8]) -> Vec<u8> {
    let command = command.encode_to_vec();
    let mut frame = Vec::new();
    frame.extend_from_slice(&((4 + command.len() + rest.len()) as u32).to_be_bytes());
    frame.extend_from_slice(&(command.len() as u32).to_be_bytes());
    frame.extend_from_slice(&command);
    frame.extend_from_slice(rest);
    frame
}

/// `[metadataSize][metadata][payload]`, the part a checksum covers.
fn metadata_and_payload() -> Vec<u8> {
    let metadata = MessageMetadata {
        producer_name: "p".into(),
        sequence_id: 3,
        publish_time: 1_700_000_000_000,
        ..Default::default()
    }
    .encode_to_vec();
    let mut bytes = (metadata.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&metadata);
    bytes.extend_from_slice(b"hello");
    bytes
}

#[test]
fn crc32c_crate_is_castagnoli() {
    assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
}

#[test]
fn relay_adds_magic_and_checksum_to_a_bare_message_frame() {
    let covered = metadata_and_payload();
    let bare = frame(&message_command(), &covered);

    let fixed = rewrite_frame(bare.clone(), RELAY_URL).expect("valid frame");

    let mut expected_rest = vec![0x0e, 0x01];
    expected_rest.extend_from_slice(&crc32c::crc32c(&covered).to_be_bytes());
    expected_rest.extend_from_slice(&covered);
    assert_eq!(fixed, frame(&message_command(), &expected_rest));
    assert_eq!(fixed.len(), bare.len() + 6);
}

#[test]
fn relay_passes_a_checksummed_message_frame_through_unchanged() {
    let covered = metadata_and_payload();
    let mut rest = vec![0x0e, 0x01];
    rest.extend_from_slice(&crc32c::crc32c(&covered).to_be_bytes());
    rest.extend_from_slice(&covered);
    let checksummed = frame(&message_command(), &rest);

    assert_eq!(
        rewrite_frame(checksummed.clone(), RELAY_URL).unwrap(),
        checksummed
    );
}

/// A PING frame, which the relay passes through as it is.
fn ping_frame() -> Vec<u8> {
    frame(
        &BaseCommand {
            r#type: base_command::Type::Ping as i32,
            ping: Some(Default::default()),
            ..Default::default()
        },
        &[],
    )
}

#[test]
fn relay_passes_other_commands_through_unchanged() {
    let ping = ping_frame();
    assert_eq!(rewrite_frame(ping.clone(), RELAY_URL).unwrap(), ping);
}

#[test]
fn relay_points_lookup_answers_at_itself() {
    let lookup = |url: &str| BaseCommand {
        r#type: base_command::Type::LookupResponse as i32,
        lookup_topic_response: Some(CommandLookupTopicResponse {
            broker_service_url: Some(url.into()),
            response: Some(command_lookup_topic_response::LookupType::Connect as i32),
            request_id: 42,
            authoritative: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };

    let rewritten =
        rewrite_frame(frame(&lookup("pulsar://127.0.0.1:6650"), &[]), RELAY_URL).expect("valid frame");

    assert_eq!(rewritten, frame(&lookup(RELAY_URL), &[]));
}

#[test]
fn relay_rejects_a_truncated_frame() {
    let mut bare = frame(&message_command(), &[]);
    bare.truncate(bare.len() - 1);
    assert!(rewrite_frame(bare, RELAY_URL).is_err());
}

/// A client that dies with bytes unread ends its TCP connection with a reset. The relay must not
/// pass that on: pulsar-lite handles a reset without removing the connection's consumers, and a
/// Failover subscription then keeps the dead consumer as its active one for good
/// (`support::relay::close_broker_side`). Here a fake broker streams to a client that reads
/// nothing until every buffer between them is full (the relay holds unread bytes), then the
/// client resets its connection: the broker must see an orderly end and its writes still taken.
#[tokio::test]
async fn relay_ends_the_broker_connection_in_order_when_its_client_resets() {
    let broker = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let broker_addr = broker.local_addr().expect("address");
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let relay_addr = relay.local_addr().expect("address");
    tokio::spawn(support::relay::serve(
        relay,
        broker_addr,
        RELAY_URL.to_owned(),
        Default::default(),
    ));

    let client = tokio::net::TcpStream::connect(relay_addr).await.expect("connect");
    let (upstream, _) = tokio::time::timeout(DEADLINE, broker.accept())
        .await
        .expect("the relay connects to the broker")
        .expect("accept");
    let (mut from_relay, mut to_relay) = upstream.into_split();
    // Frames the relay accepts, written until one cannot be written for a while: every buffer
    // from here to the client is full and the relay has stopped reading.
    let ping = ping_frame();
    let chunk = ping.repeat(64 * 1024 / ping.len());
    let (written, mut writes) = tokio::sync::mpsc::unbounded_channel();
    let writer = tokio::spawn(async move {
        loop {
            let result = to_relay.write_all(&chunk).await;
            let failed = result.is_err();
            let _ = written.send(result);
            if failed {
                return;
            }
        }
    });
    // Full once no chunk has gone out for half a second.
    while tokio::time::timeout(Duration::from_millis(500), writes.recv())
        .await
        .is_ok()
    {}

    client.set_zero_linger().expect("SO_LINGER 0");
    drop(client);

    // The broker hears the end of the connection, and what it still sends is taken (pulsar-lite
    // keeps dispatching for a moment): a reset would fail these writes.
    let mut buf = [0u8; 1024];
    let end = tokio::time::timeout(DEADLINE, from_relay.read(&mut buf)).await;
    assert!(
        matches!(end, Ok(Ok(0))),
        "the broker hears an orderly end, not {end:?}"
    );
    for _ in 0..16 {
        match tokio::time::timeout(DEADLINE, writes.recv()).await {
            Ok(Some(Ok(()))) => {}
            other => panic!("a write after the client's end: {other:?}, not taken by the relay"),
        }
    }
    writer.abort();
}

/// Sends `texts` through a batching producer, all queued before any receipt is awaited, and
/// returns the broker entries (ledger, entry) they were stored in.
async fn send_batched(
    producer: &mut pulsar::Producer<TokioExecutor>,
    texts: impl IntoIterator<Item = String>,
) -> BTreeSet<(u64, u64)> {
    let mut receipts = Vec::new();
    for text in texts {
        receipts.push(producer.send_non_blocking(text).await.expect("queued"));
    }
    let mut entries = BTreeSet::new();
    for receipt in receipts {
        let id = receipt
            .await
            .expect("persisted")
            .message_id
            .expect("a receipt names its message");
        entries.insert((id.ledger_id, id.entry_id));
    }
    entries
}

/// An ack of one message of a batch entry acks the whole entry. The `pulsar` crate sends a batched
/// message's ack with its batch index and no ack set, and the broker then acks the entry's
/// position, as Apache Pulsar does without batch-index acks (the Java client holds such acks until
/// every message of the entry is acked). So a consumer that acks the first messages of an entry
/// and dies before finishing the others loses them: the daemon acks an entry only once it has
/// finished every message of it (`acking::Entries`, `tests/batch_entries.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_of_one_message_of_a_batch_entry_acks_the_whole_entry() {
    const IN_ENTRY: usize = 10;
    let broker = LocalBroker::start().expect("broker starts");
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/batch-entry-ack";
    let mut batching = whole_entries_producer(&pulsar, topic, IN_ENTRY as u32).await;
    let entries = send_batched(&mut batching, (0..IN_ENTRY).map(|i| format!("in-entry-{i}"))).await;
    assert_eq!(
        entries.len(),
        1,
        "the producer put the {IN_ENTRY} messages in one entry"
    );
    produce(&pulsar, topic, [(None, "after".to_owned())]).await;

    let dies = client(&broker).await;
    let mut first = consumer(&dies, topic, "entry", SubType::Exclusive, 100).await;
    let until = Instant::now() + DEADLINE;
    let mut batch_indexes = Vec::new();
    for i in 0..IN_ENTRY {
        let message = next(&mut first, until).await;
        batch_indexes.push(message.message_id().batch_index);
        if i == 0 {
            first.ack(&message).await.expect("ack");
        }
    }
    assert_eq!(
        batch_indexes,
        (0..IN_ENTRY as i32).map(Some).collect::<Vec<_>>(),
        "the entry's messages, in order"
    );
    first.close().await.expect("the consumer closes");
    drop(dies);

    let successor = client(&broker).await;
    let mut second = consumer(&successor, topic, "entry", SubType::Exclusive, 100).await;
    let message = next(&mut second, Instant::now() + DEADLINE).await;
    assert_eq!(
        text(&message),
        "after",
        "the first message the successor receives: the nine unacked messages of the entry were acked with the first one"
    );
}

/// A cumulative ack at the last message of a batch entry acks that entry and every one before it,
/// and nothing after: what lets the daemon's Failover inputs ack a run of whole batch entries with
/// one ack (`acking::Runs`). The `pulsar` crate sends the message's id with its batch index and no
/// ack set, which the broker takes as the entry's position, as Apache Pulsar does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cumulative_ack_at_the_last_message_of_a_batch_entry_acks_up_to_that_entry() {
    const IN_ENTRY: usize = 5;
    let broker = LocalBroker::start().expect("broker starts");
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/batch-entry-cumulative";
    let mut batching = whole_entries_producer(&pulsar, topic, IN_ENTRY as u32).await;
    let mut entries = BTreeSet::new();
    for entry in ["a", "b"] {
        entries.extend(send_batched(&mut batching, (0..IN_ENTRY).map(|i| format!("{entry}-{i}"))).await);
    }
    assert_eq!(
        entries.len(),
        2,
        "the producer made two entries of {IN_ENTRY} messages"
    );
    produce(&pulsar, topic, [(None, "after".to_owned())]).await;

    let texts = |messages: &[Message<String>]| messages.iter().map(text).collect::<Vec<_>>();
    let expected = |from: &str| -> Vec<String> {
        let mut all: Vec<String> = ["a", "b"]
            .iter()
            .flat_map(|entry| (0..IN_ENTRY).map(move |i| format!("{entry}-{i}")))
            .collect();
        all.push("after".to_owned());
        let at = all
            .iter()
            .position(|t| t == from)
            .expect("a message of the stream");
        all.split_off(at)
    };
    // Receives everything left, cumulatively acks `ack_at` and dies.
    let round = |ack_at: Option<&'static str>| {
        let broker = &broker;
        async move {
            let connection = client(broker).await;
            let mut consumer = consumer(&connection, topic, "cumulative", SubType::Failover, 100).await;
            let until = Instant::now() + DEADLINE;
            let mut received = vec![next(&mut consumer, until).await];
            while text(received.last().expect("one")) != "after" {
                received.push(next(&mut consumer, until).await);
            }
            if let Some(ack_at) = ack_at {
                let message = received.iter().find(|m| text(m) == ack_at).expect("received");
                assert_eq!(message.message_id().batch_index, Some(IN_ENTRY as i32 - 1));
                consumer.cumulative_ack(message).await.expect("ack");
            }
            consumer.close().await.expect("the consumer closes");
            received
        }
    };
    let first = round(Some("a-4")).await;
    assert_eq!(texts(&first), expected("a-0"));
    let second = round(Some("b-4")).await;
    assert_eq!(
        texts(&second),
        expected("b-0"),
        "entry a acked, entry b whole again"
    );
    let third = round(None).await;
    assert_eq!(texts(&third), expected("after"), "entries a and b acked");
}

/// The one consumer of a subscription dies (it closes holding unacknowledged messages, as a
/// SIGKILLed daemon's connection ends) and another subscribes in its place: the successor must
/// receive every message the dead one did not ack, and every message published after. Returns
/// how many of those the successor received before the deadline, and how many there were.
async fn successor_probe(broker: &LocalBroker, topic: &str, sub_type: SubType) -> (usize, usize) {
    let producer_client = client(broker).await;
    let keyed = |prefix: &str, count: usize| -> Vec<(Option<String>, String)> {
        (0..count)
            .map(|i| (Some(format!("key-{}", i % 20)), format!("{prefix}-{i}")))
            .collect()
    };
    let dead = client(broker).await;
    let mut first = consumer(&dead, topic, "successor", sub_type, 50).await;
    produce(&producer_client, topic, keyed("before", 200)).await;
    let until = Instant::now() + DEADLINE;
    let mut acked = BTreeSet::new();
    for i in 0..100 {
        let message = next(&mut first, until).await;
        if i < 50 {
            first.ack(&message).await.expect("ack");
            acked.insert(text(&message));
        }
    }
    drop(first);
    drop(dead);

    let successor_client = client(broker).await;
    let mut successor = consumer(&successor_client, topic, "successor", sub_type, 50).await;
    produce(&producer_client, topic, keyed("after", 100)).await;
    let mut expected: BTreeSet<String> = keyed("before", 200)
        .into_iter()
        .chain(keyed("after", 100))
        .map(|(_, payload)| payload)
        .collect();
    expected.retain(|payload| !acked.contains(payload));
    let until = Instant::now() + DEADLINE;
    let mut received = BTreeSet::new();
    while !expected.is_subset(&received) {
        let Ok(Some(Ok(message))) = tokio::time::timeout_at(until, successor.next()).await else {
            break;
        };
        successor.ack(&message).await.expect("ack");
        received.insert(text(&message));
    }
    (received.intersection(&expected).count(), expected.len())
}

/// Measured 2026-12-01: all 250 in 2 of 3 runs, 172 of 250 within 30 s in the third. On
/// 2026-12-02, with the relay closing connections in order, 4 runs in 12 still fail, and
/// pulsar-lite's log (info) shows why: the successor subscribes before the dead consumer's
/// CloseConsumer arrives (the `pulsar` client sends it when the consumer is dropped), so it
/// waits as a standby; the close then removes the active consumer without rewinding its unacked
/// messages (no "Failover active consumer … closed; rewound" line, which a close with no standby
/// logs), and the successor receives only what is dispatched afterwards. A fault of pulsar-lite's
/// Failover dispatcher, shown here with the raw client alone; Apache Pulsar redelivers a removed
/// active consumer's unacked messages to the next active one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "pulsar-lite does not rewind a closed active Failover consumer's unacked messages when a standby is already subscribed (4 runs in 12, 2026-12-02); a probe of the broker, run with --run-ignored all"]
async fn failover_successor_receives_what_a_dead_consumer_did_not_ack() {
    let broker = LocalBroker::start().expect("broker starts");
    let topic = "persistent://public/default/failover-successor";
    let (received, expected) = successor_probe(&broker, topic, SubType::Failover).await;
    assert_eq!(received, expected, "messages the successor received");
}

/// The same probe on Key_Shared shows pulsar-lite's fault (docs/TAKEOVER.md, "Status and
/// limits"): measured 2026-12-01, the successor received 20 and 24 of the 250 messages within
/// 30 s in two runs (the Failover probe above: all 250 in half a second in 2 of 3 runs).
/// Apache Pulsar hands a closed consumer's keys and unacked messages to the remaining consumers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "pulsar-lite's Key_Shared dispatcher stops delivering after a consumer leaves holding unacked messages; run with --run-ignored all to see it, or against Apache Pulsar"]
async fn key_shared_successor_receives_what_a_dead_consumer_did_not_ack() {
    let broker = LocalBroker::start().expect("broker starts");
    let topic = "persistent://public/default/key-shared-successor";
    let (received, expected) = successor_probe(&broker, topic, SubType::KeyShared).await;
    assert_eq!(received, expected, "messages the successor received");
}

/// An attempt to show pulsar-lite's Failover dispatcher stopping with permits and a backlog with
/// the raw client alone, as its own debug log showed it under the daemon (README, "Known
/// limitation of the local broker"; the daemon's starvation watchdog,
/// `ingest::starved_partitions`, recovers from it). One consumer consumes a backlog as the daemon does: a receiver queue and batch of 512,
/// up to 512 messages held unacked at once, each acked a little later and out of order (as
/// concurrent aggregates finish), in rounds. It counts what arrives; a round in which nothing
/// arrives for 5 s while messages are missing is the stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a probe of pulsar-lite's Failover dispatcher, seen to stop with permits and a backlog under the daemon; 8 of 8 runs of this probe received everything (2026-12-01), so what triggers it is not reproduced with the raw client yet; run with --run-ignored all"]
async fn failover_consumer_holding_unacked_messages_receives_the_whole_backlog() {
    const BACKLOG: usize = 30_000;
    const HELD: usize = 512;
    let broker = LocalBroker::start().expect("broker starts");
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/failover-backlog";
    // The subscription exists before the backlog is written.
    drop(consumer(&pulsar, topic, "backlog", SubType::Failover, HELD as u32).await);
    produce(&pulsar, topic, numbered("m", BACKLOG)).await;
    let mut backlog = consumer(&pulsar, topic, "backlog", SubType::Failover, HELD as u32).await;
    // On the same connection, as the daemon's changelog: a record published per message received,
    // read back by an exclusive consumer that acks cumulatively every 64.
    let side = "persistent://public/default/failover-backlog-side";
    let mut records = producer(&pulsar, side).await;
    let mut follower = consumer(&pulsar, side, "side", SubType::Exclusive, 1000).await;
    let following = tokio::spawn(async move {
        let mut read = 0u64;
        while let Some(Ok(message)) = follower.next().await {
            read += 1;
            if read % 64 == 0 {
                let _ = follower.cumulative_ack(&message).await;
            }
        }
    });
    let mut held: Vec<Message<String>> = Vec::new();
    let mut received = BTreeSet::new();
    let mut rng_state = 0x2545_f491_4f6c_dd1d_u64;
    while received.len() < BACKLOG {
        match tokio::time::timeout(Duration::from_secs(5), backlog.next()).await {
            Ok(Some(Ok(message))) => {
                let _receipt = records
                    .create_message()
                    .with_content(text(&message))
                    .send_non_blocking()
                    .await
                    .expect("record queued");
                received.insert(text(&message));
                held.push(message);
            }
            Ok(other) => panic!("consumer stream: {other:?}"),
            Err(_) if held.is_empty() => break,
            Err(_) => {}
        }
        if held.len() >= HELD || (!held.is_empty() && received.len() == BACKLOG) {
            // Ack the held messages in a shuffled order, a few at a time, as finished work is.
            while !held.is_empty() {
                rng_state ^= rng_state << 13;
                rng_state ^= rng_state >> 7;
                rng_state ^= rng_state << 17;
                let at = (rng_state % held.len() as u64) as usize;
                let message = held.swap_remove(at);
                backlog.ack(&message).await.expect("ack");
                if held.len() % 64 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
    following.abort();
    assert_eq!(
        received.len(),
        BACKLOG,
        "messages received before 5 s of silence with nothing held"
    );
}

/// How [`held_ack_probe`] publishes and consumes.
#[derive(Debug, Clone, Copy)]
struct HeldAcks {
    /// Publish rate, messages/s; 0 publishes the whole stream before subscribing (a backlog).
    rate: f64,
    /// Producer batching: messages per broker entry at most (1 ms wait), or one entry each.
    batch: Option<u32>,
    /// How long each message stays unacked after it arrived, and how many at most.
    hold: Duration,
    max_held: usize,
    /// The consumer's receiver queue (its flow permits).
    queue: u32,
    /// Partitions of the topic (0: not partitioned).
    partitions: u32,
}

/// Publishes `count` messages as `how` says while one Failover consumer receives them, holding
/// acks as the daemon holds what it has not committed; returns how many deliveries were of a
/// message received before. `PROBE_BROKER_DIR` keeps the broker's data and log (with
/// `AEROSTREAM_BROKER_LOG=debug`, every dispatch). Also returns the longest time nothing arrived
/// while the consumer had room, and how long receiving took.
async fn held_ack_probe(count: usize, how: HeldAcks) -> (usize, Duration, Duration) {
    let broker = LocalBroker::start_with(support::BrokerOptions {
        data_dir: std::env::var_os("PROBE_BROKER_DIR").map(Into::into),
        default_partitions: how.partitions,
        ..Default::default()
    })
    .expect("broker starts");
    let pulsar = client(&broker).await;
    let topic = format!("persistent://public/default/held-{}", unique_consumer_id());
    let publisher = {
        let (pulsar, topic) = (pulsar.clone(), topic.clone());
        tokio::spawn(async move {
            let mut producer = batching_producer(&pulsar, &topic, how.batch).await;
            let started = Instant::now();
            let mut receipts = futures::stream::FuturesUnordered::new();
            for i in 0..count {
                if how.rate > 0.0 {
                    let due = started + Duration::from_secs_f64(i as f64 / how.rate);
                    tokio::time::sleep_until(due).await;
                }
                receipts.push(
                    producer
                        .send_non_blocking(format!("m-{i}"))
                        .await
                        .expect("queued"),
                );
                while receipts.len() >= 1000 {
                    receipts.next().await.expect("non-empty").expect("persisted");
                }
            }
            while let Some(receipt) = receipts.next().await {
                receipt.expect("persisted");
            }
        })
    };
    let publisher = if how.rate > 0.0 {
        Some(publisher)
    } else {
        publisher.await.expect("publisher");
        None
    };
    // Subscribes from the earliest message, so that a backlog is all there.
    let mut consumer = consumer(&pulsar, &topic, "held", SubType::Failover, how.queue).await;
    let started = Instant::now();
    let until = started + DEADLINE * 4;
    let mut distinct = BTreeSet::new();
    let mut again = 0;
    let (mut last_arrival, mut longest_gap) = (started, Duration::ZERO);
    let mut held: std::collections::VecDeque<(Instant, Message<String>)> = Default::default();
    while distinct.len() < count {
        let due = held.front().map(|(at, _)| *at + how.hold);
        tokio::select! {
            _ = tokio::time::sleep_until(due.unwrap_or(until)), if due.is_some() => {
                let (_, message) = held.pop_front().expect("held");
                consumer.ack(&message).await.expect("ack");
            }
            message = next(&mut consumer, until), if held.len() < how.max_held => {
                // A gap counts only while the consumer had room: it was waiting for the broker.
                longest_gap = longest_gap.max(last_arrival.elapsed());
                if !distinct.insert(text(&message)) {
                    again += 1;
                }
                if how.hold.is_zero() {
                    consumer.ack(&message).await.expect("ack");
                } else {
                    held.push_back((Instant::now(), message));
                }
                last_arrival = Instant::now();
            }
        }
        if held.len() >= how.max_held {
            last_arrival = Instant::now();
        }
    }
    let receiving = started.elapsed();
    if let Some(publisher) = publisher {
        publisher.await.expect("publisher");
    }
    (again, longest_gap, receiving)
}

/// pulsar-lite sends copies of messages its consumer has been sent already, the raw client alone
/// (no daemon), in amounts that change from run to run. Measured 2026-12-01, two to four runs of
/// each (`PROBE_COUNT` 40 000 or 100 000, `PROBE_RATE` 8 000 or 0 for a backlog), copies per
/// message:
///
/// | published | entries | acked | copies |
/// | --- | --- | --- | --- |
/// | 8 000/s | one per message | at once | 0.07–1.3 |
/// | 8 000/s | one per message | 20 ms late (≤ 4 096 held) | 1.4–3.3 |
/// | 8 000/s | batches of ≤ 256 | at once, or 20 ms or 200 ms late | 0 in every run |
/// | backlog | one per message | at once | 0–0.02 |
/// | backlog | one per message | 20 ms late, receive queue 1 000 | 0.06–0.16 |
/// | backlog | one per message | 20 ms late, receive queue 4 096 | 0–0.10 |
/// | backlog | batches of ≤ 256 | at once | 0–0.09 |
/// | backlog | batches of ≤ 256 | 20 ms late | 0–0.25 |
///
/// Its debug log shows the copies sent back to back by dispatch passes running at once (one per
/// publish, flow or ack) from the same position, and the first copy's ack then refused as stale.
/// A consumer that acks after a commit, as the daemon does, holds messages by design; its
/// idempotency window drops the copies. The longest gap while the consumer had room stayed under
/// 120 ms in every run, on a topic of two partitions too (`PROBE_PARTITIONS=2`, a 100 000
/// backlog: 0–978 copies): the multi-second dispatch stalls the daemon's watchdog handles
/// (`ingest::starved_partitions`) did not show here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a probe of the broker, a minute or two; run with --run-ignored all --no-capture"]
async fn probe_redeliveries_by_ack_delay() {
    let count = std::env::var("PROBE_COUNT").map_or(40_000, |n| n.parse().expect("a count"));
    let rate = std::env::var("PROBE_RATE").map_or(8_000.0, |n| n.parse().expect("a rate"));
    let partitions = std::env::var("PROBE_PARTITIONS").map_or(0, |n| n.parse().expect("a count"));
    let at_once = (Duration::ZERO, 1);
    let late = (Duration::from_millis(20), 4096);
    for (batch, (hold, max_held), queue) in [
        (None, at_once, 1000),
        (None, late, 1000),
        (None, late, 4096),
        (Some(256), at_once, 1000),
        (Some(256), late, 1000),
    ] {
        let how = HeldAcks {
            rate,
            batch,
            hold,
            max_held,
            queue,
            partitions,
        };
        let (again, gap, took) = held_ack_probe(count, how).await;
        eprintln!(
            "{how:?}: {again} of {count} delivered again; received in {took:?}, nothing for {gap:?} at most"
        );
    }
}

/// Publish → received through the broker alone, split at the broker's receipt: what (d) in
/// `benches/throughput.rs` can reach at best. One topic of `PROBE_PARTITIONS` (2) partitions,
/// `PROBE_LANES` (8) batching producers (≤ 256 messages, 1 ms wait) and one Failover consumer with
/// a receive queue of `PROBE_QUEUE` (1 000) that acks at once what it receives, on a client of its
/// own unless `PROBE_SHARED_CLIENT` is set; each rate of `PROBE_RATES` (1000,5000,11000) for
/// `PROBE_SECONDS` (10). `PROBE_ACK`: `message` (each message's own ack, the default), `entry` (an
/// entry's own ack at its last message) or `cumulative` (one cumulative ack per partition for what
/// arrived together, at its last whole entry). Measured 2026-12-02, ms, p50 / p99:
///
/// | messages/s | connections | sent → persisted | persisted → received | sent → received |
/// | --- | --- | --- | --- | --- |
/// | 1 000 | two | 3.4 / 5.1 | 0.0 / 0.1 | 2.9 / 4.1 |
/// | 5 000 | two | 3.9 / 5.9 | 0.0 / 0.5 | 3.2 / 4.8 |
/// | 11 000 | two | 3.1 / 5.6 | 0.0 / 1.0 | 2.8 / 5.3 |
/// | 11 000 | one, shared | 49.9 / 134.9 | 0.2 / 9.3 | 50.1 / 136.0 |
///
/// With the consumer's acks on the publisher's connection, the sends wait (sent → persisted):
/// whether in the `pulsar` client, which writes acks ahead of data, or in the broker is not told
/// apart here. The daemon's inputs each have a connection of their own (`partitions.rs`), and so
/// do the bench's raw consumers.
///
/// The number of acks counts (2026-12-03, 7 000 messages/s, sent → received p50 / p99 ms, copies,
/// acks): by message 26.6 / 532.2, 257 278, 327 278 and 26.5 / 443.0, 270 826, 340 826; by entry
/// 3.3 / 270.1, 65 179, 80 788; cumulative 3.3 / 169.3, 76 173, 30 482 and 4.2 / 323.1, 148 682,
/// 28 789. At 2 000 messages/s, cumulative and by entry alike: 3.1–3.3 / 4.8–5.6 ms.
///
/// `PROBE_HOLD_MS` (0): with `PROBE_ACK=cumulative`, each ack is sent that long after its messages
/// arrived, as the daemon acks after its commit. 2026-12-03 evening, 6 600 messages/s, copies for
/// 99 000 messages (sent → received p99 ms): held 0: 72 518 (6.4), 91 901 (219.4); 30 ms: 119 340
/// (325.7), 73 478 (7.5); 300 ms: 697 905 (1 584.9); 2 s: 949 954 (3 823.4). Minutes later, with
/// the hypervisor stealing time: 0: 294 155 (505.5), 164 437 (435.3); 15 ms: 332 195 (646.4);
/// 30 ms: 358 133 (512.9); 60 ms: 294 666 (652.1), 210 964 (505.1); 120 ms: 269 042 (764.0);
/// 200 ms: 407 614 (663.8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a probe of the broker, a minute; run with --run-ignored all --no-capture"]
async fn probe_latency_floor() {
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let partitions: u32 = env("PROBE_PARTITIONS", "2").parse().expect("a count");
    let lanes: usize = env("PROBE_LANES", "8").parse().expect("a count");
    let seconds: f64 = env("PROBE_SECONDS", "10").parse().expect("seconds");
    let shared = std::env::var_os("PROBE_SHARED_CLIENT").is_some();
    let queue: u32 = env("PROBE_QUEUE", "1000").parse().expect("a count");
    let ack = env("PROBE_ACK", "message");
    let hold = Duration::from_millis(env("PROBE_HOLD_MS", "0").parse().expect("milliseconds"));
    for rate in env("PROBE_RATES", "1000,5000,11000").split(',') {
        let rate: f64 = rate.parse().expect("a rate");
        let count = (rate * seconds) as usize;
        let broker = LocalBroker::start_with(support::BrokerOptions {
            default_partitions: partitions,
            ..Default::default()
        })
        .expect("broker starts");
        let publishing = client(&broker).await;
        let receiving = if shared {
            publishing.clone()
        } else {
            client(&broker).await
        };
        let topic = format!("persistent://public/default/floor-{}", unique_consumer_id());
        let mut consumer = consumer(&receiving, &topic, "floor", SubType::Failover, queue).await;
        let sent = std::sync::Arc::new(std::sync::Mutex::new(vec![None::<Instant>; count]));
        let persisted = std::sync::Arc::new(std::sync::Mutex::new(vec![None::<Instant>; count]));
        let publisher = {
            let (sent, persisted, topic) = (sent.clone(), persisted.clone(), topic.clone());
            tokio::spawn(async move {
                let mut producers = Vec::new();
                for _ in 0..lanes {
                    producers.push(batching_producer(&publishing, &topic, Some(256)).await);
                }
                let started = Instant::now();
                let mut receipts = futures::stream::FuturesUnordered::new();
                for i in 0..count {
                    tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / rate)).await;
                    sent.lock().unwrap()[i] = Some(Instant::now());
                    let receipt = producers[i % lanes]
                        .create_message()
                        .with_content(format!("{i}"))
                        .with_key(format!("k{}", i % 500))
                        .send_non_blocking()
                        .await
                        .expect("queued");
                    let persisted = persisted.clone();
                    receipts.push(async move {
                        receipt.await.expect("persisted");
                        persisted.lock().unwrap()[i] = Some(Instant::now());
                    });
                    while receipts.len() >= 1000 {
                        receipts.next().await;
                    }
                    // Polls the receipts so that each is timed when it comes, not when awaited.
                    while let Some(Some(())) = futures::FutureExt::now_or_never(receipts.next()) {}
                }
                while receipts.next().await.is_some() {}
            })
        };
        let until = Instant::now() + DEADLINE * 4;
        let mut received = vec![None::<Instant>; count];
        let (mut distinct, mut again, mut acks) = (0, 0, 0usize);
        let mut held: std::collections::VecDeque<(Instant, Message<String>)> = Default::default();
        while distinct < count {
            // What has arrived, as one burst.
            let mut burst = vec![next(&mut consumer, until).await];
            while let Some(Some(Ok(message))) = futures::FutureExt::now_or_never(consumer.next()) {
                burst.push(message);
            }
            let at = Instant::now();
            let mut last_of_entry: HashMap<String, Message<String>> = HashMap::new();
            for message in burst {
                let i: usize = text(&message).parse().expect("a number");
                if received[i].is_none() {
                    received[i] = Some(at);
                    distinct += 1;
                } else {
                    again += 1;
                }
                let id = message.message_id();
                let entry_ends = id.batch_index.map_or(true, |index| {
                    index + 1 == message.payload.metadata.num_messages_in_batch.unwrap_or(1)
                });
                match ack.as_str() {
                    "message" => {
                        consumer.ack(&message).await.expect("ack");
                        acks += 1;
                    }
                    "entry" if entry_ends => {
                        consumer.ack(&message).await.expect("ack");
                        acks += 1;
                    }
                    "cumulative" if entry_ends => {
                        last_of_entry.insert(message.topic.clone(), message);
                    }
                    _ => {}
                }
            }
            held.extend(last_of_entry.into_values().map(|message| (at, message)));
            while held.front().is_some_and(|(at, _)| at.elapsed() >= hold) {
                let (_, message) = held.pop_front().expect("held");
                consumer.cumulative_ack(&message).await.expect("ack");
                acks += 1;
            }
        }
        publisher.await.expect("publisher");
        let (sent, persisted) = (sent.lock().unwrap().clone(), persisted.lock().unwrap().clone());
        let spans = |from: &[Option<Instant>], to: &[Option<Instant>]| {
            let mut spans: Vec<Duration> = from
                .iter()
                .zip(to)
                .filter_map(|(a, b)| Some(b.as_ref()?.saturating_duration_since(*a.as_ref()?)))
                .collect();
            spans.sort_unstable();
            let q = |p: f64| spans[((spans.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
            format!("{:.1} / {:.1} / {:.1}", q(0.5), q(0.99), q(1.0))
        };
        eprintln!(
            "{rate} msg/s, {count} messages, {partitions} partitions, {lanes} lanes, queue {queue}, shared client {shared}, acks by {ack} held {hold:?}: \
             sent→persisted {} ms; persisted→received {} ms; sent→received {} ms (p50 / p99 / max); {again} copies; {acks} acks",
            spans(&sent, &persisted),
            spans(&persisted, &received),
            spans(&sent, &received),
        );
    }
}

/// A non-durable subscription given a start message id (what the changelog follower resumes from
/// after a restart) begins at that message on pulsar-lite, the message included, and misses
/// nothing after it. The broker tells a topic's last message id (the follower's check that a kept
/// position is not past the topic's end), and answers an error for an empty topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_durable_subscription_starts_after_its_start_message_id() {
    let broker = LocalBroker::start().expect("broker starts");
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/resume-from";
    produce(&pulsar, topic, numbered("m", 100)).await;

    let read = |start: Option<pulsar::proto::MessageIdData>, count: usize| {
        let pulsar = pulsar.clone();
        async move {
            let mut options = ConsumerOptions::default()
                .with_initial_position(InitialPosition::Earliest)
                .durable(false);
            if let Some(start) = start {
                options = options.starting_on_message(start);
            }
            let mut consumer: StringConsumer = pulsar
                .consumer()
                .with_topic(topic)
                .with_subscription(format!("resume-{}", unique_consumer_id()))
                .with_subscription_type(SubType::Exclusive)
                .with_consumer_id(unique_consumer_id())
                .with_options(options)
                .build()
                .await
                .expect("consumer subscribes");
            let until = Instant::now() + DEADLINE;
            let mut messages = Vec::new();
            while messages.len() < count {
                messages.push(next(&mut consumer, until).await);
            }
            let last = consumer.get_last_message_id().await.expect("last message id");
            consumer.close().await.expect("consumer closes");
            (messages, last)
        }
    };
    let (all, last) = read(None, 100).await;
    assert_eq!(text(&all[0]), "m-0");
    let id = |id: &pulsar::proto::MessageIdData| (id.ledger_id, id.entry_id);
    assert_eq!(
        last.iter().map(id).collect::<Vec<_>>(),
        [id(all[99].message_id())],
        "the last message's id"
    );
    let (resumed, _) = read(Some(all[39].message_id().clone()), 61).await;
    let texts: Vec<String> = resumed.iter().map(text).collect();
    let expected: Vec<String> = (39..100).map(|i| format!("m-{i}")).collect();
    assert_eq!(texts, expected, "resumes at the start message, in order");

    // An empty topic has no last message id: the broker answers with an error.
    let mut empty = consumer(
        &pulsar,
        "persistent://public/default/resume-empty",
        "e",
        SubType::Exclusive,
        10,
    )
    .await;
    assert!(empty.get_last_message_id().await.is_err());
}
