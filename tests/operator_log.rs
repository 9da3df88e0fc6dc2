//! The daemon's log as an operator reads it in a file: no colour codes, nothing at WARN on a
//! healthy start (the pulsar client's connection chatter is at DEBUG), one WARN when the broker
//! goes down and one INFO when it is back, no ERROR on a normal shutdown (even after a broker
//! restart, when the client cannot close producers on its dead connection), and per-message
//! warnings rate-limited with a count.

mod support;

use std::time::Duration;
use support::daemon::{wait_for, Daemon};
use support::topic::send_raw;
use support::Harness;

/// The log's lines at `level` (`WARN`, `ERROR`), as tracing's human format writes them.
fn lines_at<'a>(log: &'a str, level: &str) -> Vec<&'a str> {
    let tag = format!(" {level} ");
    log.lines().filter(|line| line.contains(&tag)).collect()
}

fn log_of(daemon: &Daemon) -> String {
    std::fs::read_to_string(&daemon.log).unwrap()
}

/// Waits until every input consumes and the changelog is followed: the start is over.
fn wait_started(daemon: &Daemon, inputs: usize) {
    wait_for("every input consuming", Duration::from_secs(30), || {
        let log = log_of(daemon);
        (log.matches("Consuming.").count() >= inputs && log.contains("Following the changelog."))
            .then_some(())
    })
    .unwrap();
}

/// Sends SIGTERM, checks the exit status, and returns the whole log.
fn stop(mut daemon: Daemon) -> String {
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status:?}\n{}", daemon.log_tail());
    let log = log_of(&daemon);
    assert!(log.contains("Stopped."), "{log}");
    log
}

#[test]
fn a_healthy_start_and_stop_log_no_colour_no_warning_and_no_error() {
    let harness = Harness::started();
    let daemon = harness.start();
    wait_started(&daemon, harness.config().inputs.len());
    let log = stop(daemon);
    assert!(!log.contains('\x1b'), "ANSI codes in a log file:\n{log}");
    assert_eq!(lines_at(&log, "WARN"), Vec::<&str>::new(), "{log}");
    assert_eq!(lines_at(&log, "ERROR"), Vec::<&str>::new(), "{log}");
    assert!(
        !log.contains("pulsar::"),
        "the client's lines are at DEBUG:\n{log}"
    );
}

#[test]
fn a_broker_outage_is_one_warning_and_one_info_and_the_shutdown_after_it_logs_no_error() {
    let harness = Harness::new().broker_data_in_dir().build();
    let daemon = harness.start();
    wait_started(&daemon, harness.config().inputs.len());

    harness.broker.stop_broker().unwrap();
    wait_for("/health to answer 503", Duration::from_secs(30), || {
        (daemon.status("/health").ok()? == 503).then_some(())
    })
    .unwrap();
    harness.broker.start_broker().unwrap();
    daemon.wait_healthy(Duration::from_secs(60)).unwrap();
    wait_for("the broker back in the log", Duration::from_secs(30), || {
        log_of(&daemon).contains("Broker back.").then_some(())
    })
    .unwrap();

    let log = stop(daemon);
    let warnings = lines_at(&log, "WARN");
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("Broker down"), "{log}");
    assert!(
        lines_at(&log, "INFO")
            .iter()
            .any(|line| line.contains("Broker back.") && line.contains("down_seconds=")),
        "{log}"
    );
    assert_eq!(lines_at(&log, "ERROR"), Vec::<&str>::new(), "{log}");
}

#[test]
fn dead_letter_warnings_are_rate_limited_and_every_message_is_still_counted() {
    const BAD: usize = 40;
    let harness = Harness::started();
    let daemon = harness.start();
    let topic = harness.topic(&harness.config().inputs["payments"].topic);
    let properties = [("ce_dataschema", "com.aeropartners.idempotencia.PagoProcesado/v1")];
    for i in 0..BAD {
        harness
            .runtime()
            .block_on(send_raw(
                harness.client(),
                &topic,
                &format!("pago-{i}"),
                &properties,
                b"not avro".to_vec(),
            ))
            .unwrap();
    }
    daemon
        .wait_metric(
            "aerostream_events_dead_lettered_total",
            &["input=\"payments\""],
            BAD as f64,
        )
        .unwrap();
    let log = stop(daemon);
    let warnings: Vec<&str> = lines_at(&log, "WARN")
        .into_iter()
        .filter(|line| line.contains("Dead-lettering message."))
        .collect();
    assert!(
        !warnings.is_empty() && warnings.len() < BAD,
        "{} warnings for {BAD} dead letters:\n{log}",
        warnings.len()
    );
    assert!(warnings[0].contains("suppressed=0"), "{log}");
    // Each later line counts those held back before it: never more than were dead-lettered.
    let suppressed: usize = warnings
        .iter()
        .filter_map(|line| {
            line.split("suppressed=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert!(warnings.len() + suppressed <= BAD, "{log}");
}

/// A broker that does not answer at start: the client retries for long within one attempt (at
/// DEBUG), so aerostream says it once, and /health answers 503 meanwhile.
#[test]
fn a_broker_unreachable_at_start_is_said_once_at_warn() {
    let dir = tempfile::tempdir().unwrap();
    let (broker_port, http_port) = (support::free_port().unwrap(), support::free_port().unwrap());
    let config = support::daemon::write_config(
        dir.path(),
        &format!("pulsar://127.0.0.1:{broker_port}"),
        http_port,
        "",
    )
    .unwrap();
    let daemon = Daemon::start(&config, http_port).unwrap();
    wait_for("the broker said unreachable", Duration::from_secs(30), || {
        log_of(&daemon).contains("Broker not reachable yet").then_some(())
    })
    .unwrap();
    assert_eq!(daemon.status("/health").unwrap(), 503);
    let log = stop(daemon);
    let warnings = lines_at(&log, "WARN");
    assert!(warnings[0].contains("Broker not reachable yet"), "{log}");
    assert!(
        warnings[0].contains(&format!("url=pulsar://127.0.0.1:{broker_port}")),
        "{log}"
    );
    assert_eq!(lines_at(&log, "ERROR"), Vec::<&str>::new(), "{log}");
}

/// `produce` writing to a file (no terminal): plain progress lines, no redrawn bar, and a summary
/// with the rate. At 250 events/s, 1 500 events take 6 s, past the first line's 5 s.
#[test]
fn produce_without_a_terminal_writes_plain_progress_lines_and_a_summary() {
    let harness = Harness::started();
    let expected = harness.dir().join("expected.json");
    let out = std::process::Command::new(support::daemon::binary())
        .args(["produce", "--config"])
        .arg(harness.config_path())
        .args(["--events", "1500", "--rate", "250", "--expected-out"])
        .arg(&expected)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    let progress: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("produce: "))
        .collect();
    assert!(!progress.is_empty(), "no progress line in:\n{stderr}");
    for line in &progress {
        for part in ["published (", "/s, ", "s elapsed, ETA "] {
            assert!(line.contains(part), "{part:?} missing in {line:?}");
        }
    }
    assert!(!stderr.contains('\r') && !stderr.contains('\x1b'), "{stderr:?}");
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("published ") && summary.contains("/s); expected state in"),
        "{stdout}"
    );
}
