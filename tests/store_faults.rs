//! Store faults (SPEC §9), against the real broker:
//! - a store that cannot write (the `store::write` fail point: every write fails as on a full or
//!   read-only disk) stops consumption, answers 503 naming the reason, acks nothing and counts
//!   nothing against the messages it holds; once writes succeed again consumption resumes by itself
//!   and the state is exact, each message received once;
//! - a store that hangs (the `store::flush` fail point paused) answers 503 once a write check has
//!   not finished for 5 s, and recovers by itself when it answers again;
//! - nothing of a commit leaves the daemon before the commit is durable (the `store::flush` fail
//!   point: writes succeed, making them durable fails): no changelog record, no output event;
//! - an outbox entry that can never be published (here: one this version cannot read) is set aside
//!   and counted, and the inputs, whose acks wait for the outbox, go on.

mod support;

use aerostream::generator::{self, Options};
use aerostream::store::SledStore;
use aerostream_actors::ports::SystemClock;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use support::daemon::{wait_for, Daemon};
use support::events;
use support::state::wait_for_state;
use support::Harness;

const TOKEN: &str = "store-faults-test-token";

fn metric(daemon: &Daemon, name: &str) -> f64 {
    daemon.metric(name, &[]).unwrap()
}

/// /health's status code and body.
fn health(daemon: &Daemon) -> (u16, Value) {
    let (status, body, _) = daemon
        .send(reqwest::Method::GET, "/health", None, Vec::new())
        .unwrap();
    (status, body)
}

fn failpoint(daemon: &Daemon, name: &str, actions: &str) {
    let body = json!({ "name": name, "actions": actions });
    let status = daemon.post("/admin/chaos/failpoint", Some(TOKEN), &body).unwrap();
    assert_eq!(status, 200, "setting fail point {name} to {actions}");
}

#[test]
fn a_store_that_cannot_write_stops_consumption_answers_503_and_resumes_exactly() {
    let harness = Harness::new().admin_token(TOKEN).chaos(true).build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let daemon = harness.start();
    let plan = generator::plan(&Options {
        seed: 91,
        campaigns: 5,
        payments: 40,
        events: 1_500,
        duplicate_fraction: 0.05,
        reorder_window: 4,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    });
    let (first, second) = plan.stream.split_at(plan.stream.len() / 2);

    // The store stops writing while the first half streams in: what is in flight is held.
    let publisher = {
        let (config, first) = (config.clone(), first.to_vec());
        runtime.spawn(async move {
            aerostream::produce::publish(&config, &aerostream::codec::Codec::shipped(), &first, 1_000).await
        })
    };
    wait_for("300 events applied", Duration::from_secs(60), || {
        (metric(&daemon, "aerostream_events_applied_total") >= 300.0).then_some(())
    })
    .unwrap();
    failpoint(&daemon, "store::write", "return");
    let body = wait_for("/health to answer 503", Duration::from_secs(30), || {
        let (status, body) = health(&daemon);
        (status == 503).then_some(body)
    })
    .unwrap();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["components"]["store"], false);
    assert_eq!(body["components"]["broker"], true);
    let reasons = body["reasons"].to_string();
    assert!(
        reasons.contains("store") && reasons.contains("cannot write") && reasons.contains("store::write"),
        "the reason names the store and its error: {reasons}"
    );
    runtime.block_on(publisher).unwrap().unwrap();

    // Nothing more is received: the second half, published now, stays at the broker.
    let consumed = metric(&daemon, "aerostream_events_consumed_total");
    events::publish(runtime, config, second);
    assert_eq!(
        metric(&daemon, "aerostream_events_consumed_total"),
        consumed,
        "nothing received while the store could not write"
    );
    assert_eq!(health(&daemon).0, 503, "still unable to write");
    assert_eq!(daemon.metric("aerostream_store_writable", &[]).unwrap(), 0.0);

    // Writes succeed again: consumption resumes by itself, and everything is applied once.
    failpoint(&daemon, "store::write", "off");
    daemon.wait_healthy(Duration::from_secs(30)).unwrap();
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
    // Every message received ends applied or deduplicated, once: none dead-lettered, none given
    // back. (A retry whose commit was written before its flush failed finds its key: deduplicated,
    // or counted as a redelivery where that is counted apart. pulsar-lite itself now and then
    // delivers a message twice, so more may be received than were published.)
    let outcomes = || {
        metric(&daemon, "aerostream_events_applied_total")
            + metric(&daemon, "aerostream_events_deduplicated_total")
            + metric(&daemon, "aerostream_events_redelivered_total")
    };
    let consumed = wait_for("every message's outcome", Duration::from_secs(30), || {
        let consumed = metric(&daemon, "aerostream_events_consumed_total");
        (consumed >= plan.stream.len() as f64 && outcomes() == consumed).then_some(consumed)
    })
    .unwrap();
    println!("{} messages published, {consumed} received", plan.stream.len());
    // Holding messages for the store counted nothing against them.
    assert_eq!(metric(&daemon, "aerostream_events_retried_total"), 0.0);
    assert_eq!(metric(&daemon, "aerostream_events_dead_lettered_total"), 0.0);
    assert_eq!(daemon.metric("aerostream_store_writable", &[]).unwrap(), 1.0);
}

/// A store that hangs answers no error: here the `store::flush` fail point pauses the flusher
/// thread, as sled 0.34.7 does after `ENOSPC` mid-write (docs/OPERATIONS.md). The write check that
/// has not finished after 5 s makes /health answer 503 naming it; when the store answers again the
/// check finishes, /health is 200 and what was published meanwhile is applied once.
#[test]
fn a_store_that_hangs_answers_503_and_recovers_when_it_answers_again() {
    let harness = Harness::new().admin_token(TOKEN).chaos(true).build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let daemon = harness.start();
    let plan = generator::plan(&Options {
        seed: 94,
        campaigns: 3,
        payments: 10,
        events: 200,
        duplicate_fraction: 0.0,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    });

    failpoint(&daemon, "store::flush", "pause");
    events::publish(runtime, config, &plan.stream);
    let body = wait_for("/health to answer 503", Duration::from_secs(30), || {
        let (status, body) = health(&daemon);
        (status == 503).then_some(body)
    })
    .unwrap();
    assert_eq!(body["components"]["store"], false);
    let reasons = body["reasons"].to_string();
    assert!(
        reasons.contains("store") && reasons.contains("write check has not finished"),
        "the reason names the hung write check: {reasons}"
    );
    assert_eq!(daemon.metric("aerostream_store_writable", &[]).unwrap(), 0.0);
    assert_eq!(
        metric(&daemon, "aerostream_events_applied_total"),
        0.0,
        "nothing is counted applied before it is durable"
    );

    failpoint(&daemon, "store::flush", "off");
    daemon.wait_healthy(Duration::from_secs(30)).unwrap();
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(60));
    assert_eq!(daemon.metric("aerostream_store_writable", &[]).unwrap(), 1.0);
    assert_eq!(metric(&daemon, "aerostream_events_dead_lettered_total"), 0.0);
}

#[test]
fn nothing_of_a_commit_is_published_before_it_is_durable() {
    let harness = Harness::new().admin_token(TOKEN).chaos(true).build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let daemon = harness.start();
    let mut changelog = harness.reader(&harness.topic(&config.changelog.topic));
    let plan = generator::plan(&Options {
        seed: 93,
        campaigns: 3,
        payments: 10,
        events: 120,
        duplicate_fraction: 0.0,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    });

    // Commits are written but cannot be made durable: a crash now would lose them, so the
    // changelog (and every output topic) must not have them either.
    failpoint(&daemon, "store::flush", "return");
    events::publish(runtime, config, &plan.stream);
    let committed = wait_for("a commit written", Duration::from_secs(30), || {
        let campaigns: Vec<Value> = support::state::every_page(&daemon, "/api/campaigns", 100).ok()?;
        (!campaigns.is_empty()).then_some(campaigns.len())
    })
    .unwrap();
    // An observation window, not a readiness wait: published records would arrive within
    // milliseconds of their commit.
    let _ = runtime.block_on(changelog.collect_until(Duration::from_secs(2), |_| false));
    let records = |changelog: &support::topic::TopicReader| {
        changelog
            .received
            .iter()
            .filter(|m| m.property("instance").is_some())
            .count()
    };
    assert_eq!(
        records(&changelog),
        0,
        "{committed} campaigns committed, not durable: none of their records may be published"
    );
    // An aggregate goes on with its next events once its commits are written (the store's write
    // problem soon stops receiving), but nothing counts as applied before it is durable, and every
    // message received is held: none acked.
    let (_, body) = health(&daemon);
    assert_eq!(
        metric(&daemon, aerostream::telemetry::EVENTS_APPLIED),
        0.0,
        "{body}"
    );
    let inputs = body["components"]["inputs"].as_object().unwrap();
    let count = |name: &str| -> u64 { inputs.values().map(|input| input[name].as_u64().unwrap()).sum() };
    assert!(count("held") as usize >= committed, "{body}");
    assert_eq!(count("applied"), 0, "{body}");

    // Durable again: everything is published and applied once.
    failpoint(&daemon, "store::flush", "off");
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(60));
    // A record covers its commit's events: the last one and those folded in before it.
    let events_covered = |received: &[support::topic::Received]| -> usize {
        received
            .iter()
            .filter(|m| m.property("instance").is_some())
            .map(|m| {
                let record: Value = serde_json::from_slice(&m.payload).expect("records are JSON");
                1 + record["earlier"].as_array().map_or(0, Vec::len)
            })
            .sum()
    };
    runtime
        .block_on(changelog.collect_until(Duration::from_secs(30), |received| {
            events_covered(received) >= plan.distinct
        }))
        .unwrap();
}

#[test]
fn a_poison_outbox_entry_is_set_aside_counted_and_the_inputs_go_on() {
    // Few messages held at once, so a stalled outbox would stop the inputs early.
    let harness = Harness::new()
        .extra("[inputs.campaigns]\nmax_in_flight = 8\n")
        .build();
    let (config, runtime) = (harness.config(), harness.runtime());

    // The oldest outbox entry is one this version cannot read (as a newer version might have
    // left it): every commit's changelog record, and so every ack, queues behind it.
    let poison = br#"{"Output":{"id":"from-a-newer-version","body":{"Teleported":{"to":"nowhere"}}}}"#;
    {
        let db = aerostream::store::sled_config(&config.daemon.data_dir)
            .open()
            .unwrap();
        db.open_tree("outbox")
            .unwrap()
            .insert(0u64.to_be_bytes(), &poison[..])
            .unwrap();
        db.flush().unwrap();
    }
    let mut daemon = harness.start();
    let plan = generator::plan(&Options {
        seed: 93,
        campaigns: 3,
        payments: 20,
        events: 400,
        duplicate_fraction: 0.05,
        reorder_window: 4,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    });
    events::publish(runtime, config, &plan.stream);
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
    wait_for("every message received", Duration::from_secs(30), || {
        let consumed = metric(&daemon, "aerostream_events_consumed_total");
        (consumed >= plan.stream.len() as f64).then_some(())
    })
    .unwrap();
    daemon
        .wait_metric("aerostream_outbox_poisoned_total", &["kind=\"unreadable\""], 1.0)
        .unwrap();
    assert_eq!(metric(&daemon, "aerostream_outbox_poisoned_total"), 1.0);
    wait_for("the outbox published", Duration::from_secs(30), || {
        (health(&daemon).1["outbox_backlog"] == 0).then_some(())
    })
    .unwrap();

    // Set aside, with its reason and its bytes, for an operator to look at.
    daemon.terminate(Duration::from_secs(30)).unwrap();
    let store = SledStore::open(&config.daemon.data_dir, 60, Arc::new(SystemClock)).unwrap();
    let set_aside = store.outbox_poison().unwrap();
    assert_eq!(set_aside.len(), 1, "{set_aside:?}");
    assert_eq!(set_aside[0]["entry"], std::str::from_utf8(poison).unwrap());
    let reason = set_aside[0]["reason"].as_str().unwrap();
    assert!(reason.contains("Teleported"), "the reason says why: {reason}");
    assert_eq!(store.outbox_len(), 0);
}

/// A small tmpfs mounted for the test (root only), unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test mounts a tmpfs, which needs root (as the project's machines and CI run)"
        );
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs at {}", at.display());
        Tmpfs(at.to_owned())
    }

    /// Fills the file system with a ballast file until less than `left` bytes are available.
    fn fill_to_within(&self, left: u64) {
        use std::io::Write;
        let mut ballast = std::fs::File::create(self.0.join("ballast")).unwrap();
        let block = vec![0u8; 256 << 10];
        while fs2::available_space(&self.0).unwrap() >= left {
            ballast.write_all(&block).unwrap();
        }
        ballast.sync_all().unwrap();
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("ballast")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The same on a real disk filling up (a tmpfs filled by a ballast file to within 2 MiB, below
/// the 8 MiB `daemon.min_free_mib`): no write starts, consumption stops, /health answers 503
/// naming the space left, nothing is acked or counted against the messages; once the ballast is
/// gone the daemon resumes by itself and ends exact. The ballast is laid while the daemon is idle
/// and leaves space, so that sled itself never meets `ENOSPC` (sled 0.34.7 does not survive it in
/// the middle of a write: `SledStore::with_min_free`).
#[test]
fn a_filling_disk_stops_consumption_with_503_before_it_is_full_and_freeing_space_resumes_exactly() {
    let harness = Harness::new().daemon_key("min_free_mib = 8").build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let disk = Tmpfs::mount(harness.data_dir(), "48m");
    let daemon = harness.start();
    let plan = generator::plan(&Options {
        seed: 95,
        campaigns: 4,
        payments: 20,
        events: 600,
        duplicate_fraction: 0.05,
        reorder_window: 4,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    });
    let (first, second) = plan.stream.split_at(plan.stream.len() / 2);
    events::publish(runtime, config, first);
    wait_for(
        "the first half done and the daemon idle",
        Duration::from_secs(60),
        || {
            let (_, body) = health(&daemon);
            let idle = metric(&daemon, "aerostream_events_consumed_total") >= first.len() as f64
                && body["outbox_backlog"] == 0
                && body["components"]["inputs"]
                    .as_object()?
                    .values()
                    .all(|input| input["held"] == 0)
                && metric(&daemon, "aerostream_gateway_pending_charges") == 0.0;
            idle.then_some(())
        },
    )
    .unwrap();

    disk.fill_to_within(2 << 20);
    events::publish(runtime, config, second);
    let body = wait_for("/health to answer 503", Duration::from_secs(30), || {
        let (status, body) = health(&daemon);
        (status == 503).then_some(body)
    })
    .map_err(|e| {
        let consumed = metric(&daemon, "aerostream_events_consumed_total");
        let applied = metric(&daemon, "aerostream_events_applied_total");
        anyhow::anyhow!(
            "{e}: {consumed} consumed, {applied} applied of {} published\n{}",
            plan.stream.len(),
            daemon.log_tail()
        )
    })
    .unwrap();
    let reasons = body["reasons"].to_string();
    assert!(
        reasons.contains("store") && reasons.contains("MiB available") && reasons.contains("min_free_mib"),
        "the reason names the store, the space left and the setting: {reasons}"
    );
    assert_eq!(body["components"]["store"], false);
    assert_eq!(metric(&daemon, "aerostream_events_retried_total"), 0.0);
    assert_eq!(metric(&daemon, "aerostream_events_dead_lettered_total"), 0.0);
    let applied_while_full = metric(&daemon, "aerostream_events_applied_total");

    // Space back: the write check finds it within a second and consumption resumes, no restart.
    disk.free();
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
    assert!(metric(&daemon, "aerostream_events_applied_total") > applied_while_full);
    assert_eq!(metric(&daemon, "aerostream_events_dead_lettered_total"), 0.0);
    assert_eq!(health(&daemon).0, 200);
    drop(daemon);
    drop(disk);
}
