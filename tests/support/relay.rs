//! TCP relay between the `pulsar` crate and pulsar-lite (test and dev tooling only, SPEC §11).
//!
//! Client → broker bytes are copied unchanged. Broker → client frames are read one at a time and
//! repaired by [`rewrite_frame`]:
//! - a MESSAGE frame without the magic number gets `0x0e01` + CRC32C, which the `pulsar` crate
//!   requires (it drops the connection otherwise);
//! - a LOOKUP_RESPONSE gets its `brokerServiceUrl` pointed at the relay, so the client's next
//!   connection also goes through the relay.
//!
//! Frame layout (Pulsar binary protocol):
//! `[totalSize u32][commandSize u32][BaseCommand][magic u16][checksum u32][metadataSize u32]
//! [MessageMetadata][payload]`, big-endian, everything after the command optional; `totalSize`
//! counts every byte after itself and the checksum covers everything after itself.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use pulsar::message::proto::{base_command, BaseCommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Magic number announcing a checksummed payload.
const MAGIC_CRC32C: u16 = 0x0e01;
/// Largest frame the relay accepts; pulsar-lite's own limit is 5 MiB.
const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// How long a closing connection waits for the broker to close its side.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Faults the relay can put between a broker and its clients, for tests.
#[derive(Default)]
pub struct Faults {
    /// Answers dropped: of these command types, between these instants.
    lost: std::sync::Mutex<Vec<(Vec<i32>, tokio::time::Instant, tokio::time::Instant)>>,
}

impl Faults {
    /// Drops the broker's frames of the command types `answers` from `from` to `to` after now:
    /// a broker that carries requests out but answers after the client has given up (with
    /// `Type::Success`, the answer to a subscribe or a close). Everything else goes through.
    pub fn lose_answers(&self, answers: &[base_command::Type], from: Duration, to: Duration) {
        let now = tokio::time::Instant::now();
        let answers = answers.iter().map(|answer| *answer as i32).collect();
        self.lost
            .lock()
            .expect("faults lock")
            .push((answers, now + from, now + to));
    }

    /// Whether `frame` is to be dropped now.
    fn loses(&self, frame: &[u8]) -> bool {
        let lost = self.lost.lock().expect("faults lock");
        let now = tokio::time::Instant::now();
        let mut active = lost
            .iter()
            .filter(|(_, from, to)| (*from..*to).contains(&now))
            .peekable();
        if active.peek().is_none() {
            return false;
        }
        let Some(command) = be_u32(frame, 4)
            .ok()
            .and_then(|size| frame.get(8..8 + size as usize))
            .and_then(|bytes| BaseCommand::decode(bytes).ok())
        else {
            return false;
        };
        active.any(|(answers, _, _)| answers.contains(&command.r#type))
    }
}

/// Accepts client connections on `listener` for ever, relaying each to `upstream`.
///
/// `advertised_url` is the relay's own `pulsar://` URL, written into lookup answers. A client
/// whose upstream connection fails is disconnected at once; the `pulsar` crate takes that reset as
/// fatal, so whoever runs the relay should close the listener while the broker is down (see
/// `broker::Supervisor`), making clients see a refused connection, which they retry.
pub async fn serve(listener: TcpListener, upstream: SocketAddr, advertised_url: String, faults: Arc<Faults>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(error) => {
                eprintln!("relay: accept failed: {error}");
                // Out of file descriptors, typically: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let advertised_url = advertised_url.clone();
        let faults = faults.clone();
        tokio::spawn(async move {
            if let Ok(broker) = TcpStream::connect(upstream).await {
                relay_connection(client, broker, &advertised_url, &faults).await;
            }
        });
    }
}

/// Relays one connection until either side closes it or a frame cannot be parsed, then closes
/// the broker's side as [`close_broker_side`] does.
async fn relay_connection(client: TcpStream, broker: TcpStream, advertised_url: &str, faults: &Faults) {
    let _ = client.set_nodelay(true);
    let _ = broker.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (broker_read, mut broker_write) = broker.into_split();
    let mut broker_read = BufReader::new(broker_read);

    let upstream = tokio::io::copy(&mut client_read, &mut broker_write);
    let downstream = pump_frames(&mut broker_read, &mut client_write, advertised_url, faults);
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
    drop(client_write);
    close_broker_side(broker_read, broker_write).await;
}

/// Ends the broker connection with a FIN, never a reset: the write side is shut down, then what
/// the broker still sends is read and dropped until it closes its side (or [`DRAIN_TIMEOUT`]).
///
/// Why: a socket closed with unread bytes in its receive buffer sends a reset, and pulsar-lite
/// handles a reset on read without removing the connection's consumers. A Failover
/// subscription then keeps the dead consumer as its active one, dispatching to it for good, and
/// every later consumer waits as a standby. A client killed while messages stream to it (the
/// chaos test's SIGKILL) left the relay exactly that way about one time in six. Shown without the
/// relay too: the official Python client SIGKILLed mid-stream, directly against pulsar-lite
/// (`scripts/quirks/failover-ghost-consumer.py`).
async fn close_broker_side(
    mut broker_read: impl AsyncReadExt + Unpin,
    mut broker_write: impl AsyncWriteExt + Unpin,
) {
    let _ = broker_write.shutdown().await;
    let mut sink = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Ok(read) = broker_read.read(&mut sink).await {
            if read == 0 {
                break;
            }
        }
    })
    .await;
}

/// Copies broker → client frame by frame, repairing each; returns on the first error or EOF.
async fn pump_frames(
    broker: &mut (impl AsyncReadExt + Unpin),
    client: &mut (impl AsyncWriteExt + Unpin),
    advertised_url: &str,
    faults: &Faults,
) -> io::Result<()> {
    loop {
        let frame = read_frame(broker).await?;
        if faults.loses(&frame) {
            continue;
        }
        client.write_all(&rewrite_frame(frame, advertised_url)?).await?;
    }
}

/// Reads one whole frame, size prefix included.
async fn read_frame(reader: &mut (impl AsyncReadExt + Unpin)) -> io::Result<Vec<u8>> {
    let total_size = reader.read_u32().await? as usize;
    if total_size > MAX_FRAME_BYTES {
        return Err(invalid(format!("frame of {total_size} bytes")));
    }
    let mut frame = Vec::with_capacity(4 + total_size);
    frame.extend_from_slice(&(total_size as u32).to_be_bytes());
    frame.resize(4 + total_size, 0);
    reader.read_exact(&mut frame[4..]).await?;
    Ok(frame)
}

/// Repairs one broker → client frame (size prefix included); other frames come back unchanged.
pub fn rewrite_frame(frame: Vec<u8>, advertised_url: &str) -> io::Result<Vec<u8>> {
    let command_size = be_u32(&frame, 4)? as usize;
    let command_end = 8 + command_size;
    let command_bytes = frame
        .get(8..command_end)
        .ok_or_else(|| invalid("command larger than frame".into()))?;
    let mut command = BaseCommand::decode(command_bytes).map_err(|e| invalid(e.to_string()))?;
    let payload = &frame[command_end..];

    if command.r#type == base_command::Type::Message as i32 && !has_magic(payload) {
        // payload = [metadataSize][metadata][data]: exactly what the checksum covers.
        let mut fixed = Vec::with_capacity(frame.len() + 6);
        fixed.extend_from_slice(&((frame.len() - 4 + 6) as u32).to_be_bytes());
        fixed.extend_from_slice(&frame[4..command_end]);
        fixed.extend_from_slice(&MAGIC_CRC32C.to_be_bytes());
        fixed.extend_from_slice(&crc32c::crc32c(payload).to_be_bytes());
        fixed.extend_from_slice(payload);
        return Ok(fixed);
    }

    let lookup = command.lookup_topic_response.as_mut();
    match lookup.and_then(|lookup| lookup.broker_service_url.as_mut()) {
        Some(url) if url != advertised_url => {
            advertised_url.clone_into(url);
            let mut fixed = Vec::with_capacity(frame.len() + advertised_url.len());
            let command_size = command.encoded_len();
            fixed.extend_from_slice(&((4 + command_size + payload.len()) as u32).to_be_bytes());
            fixed.extend_from_slice(&(command_size as u32).to_be_bytes());
            command.encode(&mut fixed).map_err(|e| invalid(e.to_string()))?;
            fixed.extend_from_slice(payload);
            Ok(fixed)
        }
        _ => Ok(frame),
    }
}

fn has_magic(payload: &[u8]) -> bool {
    payload.len() >= 2 && u16::from_be_bytes([payload[0], payload[1]]) == MAGIC_CRC32C
}

fn be_u32(bytes: &[u8], at: usize) -> io::Result<u32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| invalid("truncated frame".into()))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}
