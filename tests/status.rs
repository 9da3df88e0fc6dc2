//! `aerostream status` against a running daemon: its health, the summary (broker, store, report
//! version, idempotency window, outbox backlog, actors) and each input's outcome counts, as the
//! daemon's HTTP API has them; refreshed with `--watch`; a non-zero exit with the reasons when
//! the daemon is unavailable, and an error naming the address when nothing answers.

mod support;

use aerostream::generator::Planned;
use aerostream::telemetry::{
    ACTORS_ACTIVE, EVENTS_APPLIED, EVENTS_CONSUMED, EVENTS_DEAD_LETTERED, EVENTS_DEDUPLICATED,
    EVENTS_REDELIVERED, EVENTS_REJECTED,
};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::daemon::{binary, wait_for, Daemon};
use support::{events, free_port, Harness};

fn created(campaign_id: &str) -> Planned {
    events::created(campaign_id, &format!("created-{campaign_id}"))
}

struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

fn status(args: &[&str]) -> Run {
    let output = Command::new(binary())
        .arg("status")
        .args(args)
        .output()
        .expect("running aerostream status");
    Run {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The words of the screen's line that starts with `first`.
fn row<'a>(screen: &'a str, first: &str) -> Vec<&'a str> {
    screen
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|words| words.first() == Some(&first))
        .unwrap_or_else(|| panic!("no line starting with {first:?} in:\n{screen}"))
}

/// The value after the summary label `label` (its words) on the screen.
fn summary<'a>(screen: &'a str, label: &str) -> &'a str {
    let line = screen
        .lines()
        .find(|line| line.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} in:\n{screen}"));
    line[label.len()..].trim()
}

fn health(daemon: &Daemon) -> Value {
    daemon.get("/health").unwrap()
}

#[test]
fn status_shows_what_the_running_daemon_reports() {
    let harness = Harness::started();
    let daemon = harness.start();
    let (config, runtime) = (harness.config(), harness.runtime());
    let url = daemon.base_url.clone();

    // Two campaigns created and an impression for one that does not exist (rejected).
    events::publish(
        runtime,
        config,
        &[
            created("c-1"),
            created("c-2"),
            events::impression("c-nada", "imp-1"),
        ],
    );
    daemon
        .wait_metric(EVENTS_APPLIED, &["input=\"campaigns\""], 2.0)
        .unwrap();
    daemon
        .wait_metric(EVENTS_REJECTED, &["input=\"campaigns\""], 1.0)
        .unwrap();
    // At rest: everything published and acked.
    wait_for(
        "an empty outbox, no message held",
        Duration::from_secs(30),
        || {
            let health = health(&daemon);
            let held = health["components"]["inputs"]
                .as_object()?
                .values()
                .any(|input| input["held"] != 0);
            (health["outbox_backlog"] == 0 && !held).then_some(())
        },
    )
    .unwrap();
    // /health counts each input's progress as its counters do (read without rendering /metrics).
    let campaigns = &health(&daemon)["components"]["inputs"]["campaigns"];
    for (count, counters) in [
        ("consumed", &[EVENTS_CONSUMED][..]),
        ("applied", &[EVENTS_APPLIED]),
        ("dead_lettered", &[EVENTS_REJECTED, EVENTS_DEAD_LETTERED]),
    ] {
        let metrics: f64 = counters
            .iter()
            .map(|counter| daemon.metric(counter, &["input=\"campaigns\""]).unwrap())
            .sum();
        assert_eq!(campaigns[count].as_f64(), Some(metrics), "{count}: {campaigns}");
    }
    // Every delivery is consumed: pulsar-lite may deliver a message twice.
    assert!(campaigns["consumed"].as_u64() >= Some(3), "{campaigns}");
    assert_eq!(
        (&campaigns["applied"], &campaigns["dead_lettered"]),
        (&2.into(), &1.into()),
        "{campaigns}"
    );

    let run = status(&["--url", &url, "--sample-seconds", "0.2"]);
    assert!(run.success, "{}\n{}", run.stdout, run.stderr);
    let screen = run.stdout;
    assert!(
        screen.starts_with(&format!("aerostream at {url}: ok\n")),
        "{screen}"
    );
    assert_eq!(summary(&screen, "broker"), "up");
    assert_eq!(summary(&screen, "store"), "writable");
    assert_eq!(summary(&screen, "changelog"), "settled");
    assert_eq!(summary(&screen, "report version"), "v1");
    let window = health(&daemon)["idempotency_window_keys"].as_u64().unwrap();
    assert_eq!(window, 2, "the two applied events' keys");
    assert_eq!(summary(&screen, "idempotency window"), format!("{window} keys"));
    assert_eq!(summary(&screen, "outbox backlog"), "0");
    let actors = daemon.metric(ACTORS_ACTIVE, &[]).unwrap();
    let campaign_actors = daemon.metric(ACTORS_ACTIVE, &["kind=\"campaign\""]).unwrap();
    assert!(campaign_actors >= 2.0, "{campaign_actors}");
    let in_memory = summary(&screen, "actors in memory");
    assert!(
        in_memory.starts_with(&format!("{actors} ("))
            && in_memory.contains(&format!("campaign {campaign_actors}")),
        "{in_memory:?}: {actors} actors, {campaign_actors} campaigns"
    );

    let header = row(&screen, "INPUT");
    assert_eq!(
        header,
        [
            "INPUT",
            "SUBSCRIBED",
            "HELD",
            "STALLED",
            "CONSUMED",
            "APPLIED",
            "REJECTED",
            "DEAD-LETTERED",
            "DUPLICATES"
        ]
    );
    // Each count is "total (rate/s)", as the daemon's counters have it: nothing flows while the
    // screen is sampled. The broker may deliver a message more than once (seen here: the three
    // messages consumed 5 and 9 times, state exact); the copies are duplicates.
    let total = |names: &[&str]| -> f64 {
        names
            .iter()
            .map(|name| daemon.metric(name, &["input=\"campaigns\""]).unwrap())
            .sum()
    };
    let duplicates = total(&[EVENTS_DEDUPLICATED, EVENTS_REDELIVERED]);
    assert_eq!(total(&[EVENTS_CONSUMED]), 3.0 + duplicates);
    let (consumed, duplicates) = (format!("{}", 3.0 + duplicates), format!("{duplicates}"));
    let campaigns = row(&screen, "campaigns");
    assert_eq!(
        campaigns,
        [
            "campaigns",
            "yes",
            "0",
            "no",
            &consumed,
            "(0.0/s)",
            "2",
            "(0.0/s)",
            "1",
            "(0.0/s)",
            "0",
            "(0.0/s)",
            &duplicates,
            "(0.0/s)"
        ]
    );
    for input in config.inputs.keys() {
        assert_eq!(row(&screen, input)[1], "yes", "{input}");
    }
    assert!(screen.contains("rates over the last"), "{screen}");

    // The address from the configuration's http.listen.
    let from_config = status(&[
        "--config",
        harness.config_path().to_str().unwrap(),
        "--sample-seconds",
        "0",
    ]);
    assert!(
        from_config.success
            && from_config
                .stdout
                .starts_with(&format!("aerostream at {url}: ok")),
        "{}\n{}",
        from_config.stdout,
        from_config.stderr
    );

    // --watch: a screen per interval, with no terminal control codes when not on a terminal.
    let mut watch = Command::new(binary())
        .args(["status", "--url", &url, "--watch", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, received) = mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    // Screens, each ending with the line about its rates.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut screens: Vec<Vec<String>> = vec![Vec::new()];
    let next_screen = |screens: &mut Vec<Vec<String>>| loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = received
            .recv_timeout(left)
            .unwrap_or_else(|error| panic!("no screen within 60 s ({error}): {screens:#?}"));
        let last = line.starts_with("totals since");
        screens.last_mut().unwrap().push(line);
        if last {
            screens.push(Vec::new());
            return;
        }
    };
    // The first screen is printed before these events are published: a later one sees them
    // applied, at a rate above zero over its interval.
    next_screen(&mut screens);
    let more: Vec<Planned> = (1..=20).map(|i| created(&format!("c-w-{i}"))).collect();
    events::publish(runtime, config, &more);
    let applied = |screen: &[String]| -> (u64, f64) {
        let words = screen
            .iter()
            .find(|line| line.starts_with("campaigns "))
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no campaigns row: {screen:#?}"));
        let rate = words[7]
            .trim_matches(|c| c == '(' || c == ')')
            .trim_end_matches("/s");
        (words[6].parse().unwrap(), rate.parse().unwrap())
    };
    while applied(&screens[screens.len() - 2]).0 < 22 {
        next_screen(&mut screens);
    }
    watch.kill().unwrap();
    watch.wait().unwrap();
    screens.pop();
    let seen: Vec<&String> = screens.iter().flatten().collect();
    assert!(seen.iter().all(|line| !line.contains('\x1b')), "{seen:#?}");
    assert!(
        screens
            .iter()
            .all(|screen| screen[..2] == ["".to_owned(), format!("aerostream at {url}: ok")]),
        "{screens:#?}"
    );
    assert_eq!(applied(&screens[0]).0, 2, "{screens:#?}");
    assert!(
        screens.iter().any(|screen| applied(screen).1 > 0.0),
        "{screens:#?}"
    );

    // The broker goes away: the daemon answers 503 and status says why, exiting non-zero.
    harness.broker.stop_broker().unwrap();
    wait_for("/health 503", Duration::from_secs(30), || {
        (daemon.status("/health").ok()? == 503).then_some(())
    })
    .unwrap();
    let down = status(&["--url", &url, "--sample-seconds", "0"]);
    assert!(!down.success, "{}", down.stdout);
    assert!(
        down.stdout
            .starts_with(&format!("aerostream at {url}: UNAVAILABLE\n")),
        "{}",
        down.stdout
    );
    assert!(
        down.stdout.contains("  - broker: did not answer the last probe"),
        "{}",
        down.stdout
    );
    assert_eq!(summary(&down.stdout, "broker"), "DOWN");
    assert!(down.stderr.contains("is unavailable"), "{}", down.stderr);
}

#[test]
fn status_names_the_address_that_does_not_answer() {
    let url = format!("http://127.0.0.1:{}", free_port().unwrap());
    let run = status(&["--url", &url, "--sample-seconds", "0"]);
    assert!(!run.success, "{}", run.stdout);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(run.stderr.contains(&format!("{url}/health")), "{}", run.stderr);
}
