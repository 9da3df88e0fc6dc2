//! `aerostream produce`: publishes a generated stream (see [`crate::generator`]) and writes the
//! state it must produce as JSON, showing its progress ([`Progress`]) on stderr.

use crate::broker::{self, BrokerError};
use crate::codec::Codec;
use crate::config::Config;
use crate::generator::{self, Input, Planned};
use futures::StreamExt;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("pulsar: {0}")]
    Pulsar(#[from] pulsar::Error),
    #[error("encoding {event_type}: {detail}")]
    Encode { event_type: String, detail: String },
    #[error("the config has no input named {0:?}")]
    MissingInput(&'static str),
    #[error("writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

/// What `produce` reports when done.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Messages published, duplicates and conflicts included.
    pub published: usize,
    /// Distinct events of the stream (conflicts not counted).
    pub distinct: usize,
    pub conflicts: usize,
    pub elapsed: Duration,
}

const MAX_OUTSTANDING: usize = 1_000;

/// How often [`Progress`] writes a plain line when stderr is no terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// What `produce` shows while it publishes (messages the broker has received): on a terminal a
/// progress line redrawn in place (published, rate, elapsed, ETA); otherwise, for a log file, a
/// plain line every [`PLAIN_EVERY`].
pub struct Progress {
    total: u64,
    published: u64,
    started: Instant,
    bar: Option<indicatif::ProgressBar>,
    /// When the last plain line was written; `None`: write none (silent).
    last_line: Option<Instant>,
}

impl Progress {
    /// Progress of `total` messages on stderr, drawn as a terminal line when stderr is one.
    pub fn stderr(total: u64) -> Progress {
        let now = Instant::now();
        let bar = std::io::stderr().is_terminal().then(|| {
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} {pos}/{len} published [{bar:30}] {rate}, {elapsed} elapsed, ETA {eta}",
            )
            .expect("a valid template")
            .with_key(
                "rate",
                |state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write| {
                    let _ = write!(out, "{:.0}/s", state.per_sec());
                },
            )
            .progress_chars("=> ");
            indicatif::ProgressBar::new(total).with_style(style)
        });
        Progress {
            total,
            published: 0,
            started: now,
            bar,
            last_line: Some(now),
        }
    }

    /// Counts without showing anything.
    pub fn silent() -> Progress {
        Progress {
            total: 0,
            published: 0,
            started: Instant::now(),
            bar: None,
            last_line: None,
        }
    }

    fn published(&mut self, messages: u64) {
        self.published += messages;
        if let Some(bar) = &self.bar {
            bar.inc(messages);
        } else if let Some(last) = self.last_line {
            if last.elapsed() >= PLAIN_EVERY {
                eprintln!("produce: {}", self.line());
                self.last_line = Some(Instant::now());
            }
        }
    }

    /// `published/total (percent), rate/s, elapsed, ETA`.
    fn line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = self.published as f64 / elapsed.max(0.001);
        let left = self.total.saturating_sub(self.published) as f64;
        let eta = if rate > 0.0 {
            format!("{:.0}s", left / rate)
        } else {
            "unknown".to_owned()
        };
        format!(
            "{}/{} published ({:.0}%), {rate:.0}/s, {elapsed:.0}s elapsed, ETA {eta}",
            self.published,
            self.total,
            100.0 * self.published as f64 / self.total.max(1) as f64,
        )
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Publishes `events` in order at up to `rate` events/s (0: as fast as possible) and waits for
/// the broker's receipts.
pub async fn publish(
    config: &Config,
    codec: &Codec,
    events: &[Planned],
    rate: u32,
) -> Result<(), ProduceError> {
    publish_counted(config, codec, events, rate, &mut Progress::silent()).await
}

/// [`publish`], counting each message the broker has received in `progress`.
async fn publish_counted(
    config: &Config,
    codec: &Codec,
    events: &[Planned],
    rate: u32,
    progress: &mut Progress,
) -> Result<(), ProduceError> {
    let (_never, mut shutdown) = watch::channel(false);
    let client = broker::connect(&config.broker, &mut shutdown).await?;
    let topic = |name: &'static str| {
        config
            .inputs
            .get(name)
            .map(|i| config.broker.topic(&i.topic))
            .ok_or(ProduceError::MissingInput(name))
    };
    let mut campaigns = broker::producer(&client, topic("campaigns")?).await?;
    let mut payments = broker::producer(&client, topic("payments")?).await?;
    let started = Instant::now();
    let mut receipts = futures::stream::FuturesUnordered::new();
    for (i, planned) in events.iter().enumerate() {
        if rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / f64::from(rate));
            tokio::time::sleep_until(due.into()).await;
        }
        let encoded = codec
            .encode_input(
                &planned.envelope,
                planned.idempotency_key.as_deref(),
                &planned.event,
            )
            .map_err(|e| ProduceError::Encode {
                event_type: planned.envelope.event_type.clone(),
                detail: e.to_string(),
            })?;
        let producer = match planned.input {
            Input::Campaigns => &mut campaigns,
            Input::Payments => &mut payments,
        };
        let receipt = broker::send_event(producer, planned.envelope.id.clone(), encoded).await?;
        receipts.push(receipt);
        // Receipts that have come back, without waiting, then waiting while too many are out.
        while let Some(Some(receipt)) = futures::FutureExt::now_or_never(receipts.next()) {
            receipt?;
            progress.published(1);
        }
        while receipts.len() >= MAX_OUTSTANDING {
            receipts.next().await.expect("non-empty")?;
            progress.published(1);
        }
    }
    while let Some(receipt) = receipts.next().await {
        receipt?;
        progress.published(1);
    }
    Ok(())
}

/// Generates, writes the expected state to `expected_out`, publishes the stream and then the
/// conflicts (reused idempotency keys), which the daemon must dead-letter.
pub async fn run(
    config: &Config,
    codec: &Codec,
    options: &generator::Options,
    rate: u32,
    expected_out: &PathBuf,
) -> Result<Report, ProduceError> {
    let plan = generator::plan(options);
    let json = serde_json::to_vec_pretty(&plan.expected).expect("views serialize");
    std::fs::write(expected_out, json).map_err(|e| ProduceError::Write(expected_out.clone(), e))?;
    let started = Instant::now();
    let mut progress = Progress::stderr((plan.stream.len() + plan.conflicts.len()) as u64);
    let published = async {
        publish_counted(config, codec, &plan.stream, rate, &mut progress).await?;
        publish_counted(config, codec, &plan.conflicts, rate, &mut progress).await
    }
    .await;
    progress.finish();
    published?;
    Ok(Report {
        published: plan.stream.len() + plan.conflicts.len(),
        distinct: plan.distinct,
        conflicts: plan.conflicts.len(),
        elapsed: started.elapsed(),
    })
}
