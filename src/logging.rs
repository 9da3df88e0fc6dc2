//! The log an operator reads: set-up (filter, format, colour only on a terminal), the pulsar
//! client's own records moved to DEBUG, and [`RateLimit`] for lines repeated per message.
//!
//! The pulsar client logs (through the `log` crate) every connection attempt, retry and
//! reconnection at WARN or ERROR: a healthy start writes a `Retry #0 -> connecting …` line per
//! producer and consumer, a broker restart hundreds of lines, and dropping a producer whose
//! connection died writes `could not close producer` at ERROR. Every failure of the client that
//! matters reaches aerostream as an error or an ended stream, which it logs once in its own words
//! (the broker health probe: one WARN when the broker goes down, one INFO when it is back; an
//! operation that keeps failing; a consumer subscribing again). So the client's records are its
//! diagnostic trail: they are logged at DEBUG, their own level kept in the message
//! (`[WARN] Retry #0 -> …`), and shown with `log_level = "info,pulsar=debug"`. apache-avro logs
//! at ERROR every value that fails validation, with the whole value: the codec says why a payload
//! is bad in its dead letter and its own rate-limited line, so those records are DEBUG too.

use crate::config::{DaemonConfig, LogFormat};
use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing_subscriber::EnvFilter;

/// The crates whose `log` records are logged at DEBUG (see the module comment).
pub const DEMOTED_CRATES: &[&str] = &["pulsar", "apache_avro"];

/// Installs the global subscriber as configured: `RUST_LOG`, when set, overrides
/// `daemon.log_level`; ANSI colours only when stderr is a terminal (and `NO_COLOR` is unset).
pub fn init(config: &DaemonConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let installed = match config.log_format {
        LogFormat::Human => tracing::subscriber::set_global_default(builder.finish()),
        LogFormat::Json => tracing::subscriber::set_global_default(builder.json().finish()),
    };
    if installed.is_ok() && log::set_boxed_logger(Box::new(LibraryLogs::default())).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
}

/// Forwards `log` records to tracing, those of [`DEMOTED_CRATES`] at DEBUG.
#[derive(Default)]
struct LibraryLogs(tracing_log::LogTracer);

/// Whether `target` (a `log` target: `pulsar::retry_op`) belongs to a demoted crate.
fn demoted(target: &str) -> bool {
    DEMOTED_CRATES.iter().any(|krate| {
        target
            .strip_prefix(krate)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

impl log::Log for LibraryLogs {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        let level = if demoted(metadata.target()) {
            metadata.level().max(log::Level::Debug)
        } else {
            metadata.level()
        };
        self.0.enabled(
            &log::Metadata::builder()
                .level(level)
                .target(metadata.target())
                .build(),
        )
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = record.level();
        if !demoted(record.target()) || level >= log::Level::Debug {
            return self.0.log(record);
        }
        self.0.log(
            &log::Record::builder()
                .level(log::Level::Debug)
                .args(format_args!("[{level}] {}", record.args()))
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {}
}

/// How often a line repeated per message is let through.
pub const REPEATED_EVERY: Duration = Duration::from_secs(10);

/// A log line written per message (a dead letter, a rejection, a retry), let through at most once
/// per period: the first at once, then one per period saying how many were held back since the
/// last one. Those held back are still counted by the metrics, and logged at DEBUG by
/// [`limited!`](crate::limited).
pub struct RateLimit {
    every: Duration,
    state: Mutex<Held>,
}

struct Held {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(every: Duration) -> RateLimit {
        RateLimit {
            every,
            state: Mutex::new(Held {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(held back since the last line)` when this line may be written now, else `None`
    /// (and it is counted as held back).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut held = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match held.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                held.suppressed += 1;
                None
            }
            _ => {
                held.last = Some(now);
                Some(std::mem::take(&mut held.suppressed))
            }
        }
    }
}

/// Logs at `$level` (`warn`, `info`, `error`) through the [`RateLimit`] `$limit`, with a
/// `suppressed` field counting the lines held back since the last one; a line held back is
/// logged at DEBUG instead.
///
/// ```ignore
/// static DEAD_LETTERS: RateLimit = RateLimit::new(REPEATED_EVERY);
/// limited!(DEAD_LETTERS, warn, input = %name, reason, "Dead-lettering message.");
/// ```
#[macro_export]
macro_rules! limited {
    ($limit:expr, $level:ident, $($field:tt)+) => {
        match $limit.allow() {
            Some(suppressed) => ::tracing::$level!(suppressed, $($field)+),
            None => ::tracing::debug!($($field)+),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_line_passes_once_per_period_with_the_count_held_back() {
        let limit = RateLimit::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(limit.allow_at(start), Some(0));
        for second in 1..=9 {
            assert_eq!(limit.allow_at(start + Duration::from_secs(second)), None);
        }
        assert_eq!(limit.allow_at(start + Duration::from_secs(10)), Some(9));
        assert_eq!(limit.allow_at(start + Duration::from_secs(11)), None);
        assert_eq!(limit.allow_at(start + Duration::from_secs(25)), Some(1));
        assert_eq!(limit.allow_at(start + Duration::from_secs(40)), Some(0));
    }

    #[test]
    fn only_the_client_and_avro_crates_are_demoted() {
        for target in [
            "pulsar",
            "pulsar::retry_op",
            "pulsar::consumer::engine",
            "apache_avro::types",
        ] {
            assert!(demoted(target), "{target}");
        }
        for target in [
            "pulsar_lite",
            "aerostream::broker",
            "actix_server::worker",
            "pulsarx",
        ] {
            assert!(!demoted(target), "{target}");
        }
    }
}
