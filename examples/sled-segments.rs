//! sled 0.34's log keeps segments alive that hold a page written once and kept while the pages
//! around it are rewritten: shown with sled alone, no aerostream code (docs/BENCHMARKS.md, "The
//! idempotency window in a database of its own").
//!
//! ```text
//! cargo run --release --example sled-segments -- [SECONDS=15]
//! ```
//!
//! Each commit, as a store commits an event: an aggregate's state rewritten (400 bytes, 550
//! aggregates), an outbox entry written (1 500 bytes) and the one 50 commits older deleted, and —
//! in all but the first run — a 66-byte entry appended to a tree that only grows, as the
//! idempotency window's keys do. Prints the database's size on disk per run: the appended tree
//! holds ~66 bytes per commit, yet with it in the same database the size grows by about all the
//! outbox ever written; in a database of its own, both stay near what they hold.

use sled::transaction::ConflictableTransactionError;
use sled::Transactional;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq)]
enum Appended {
    Nowhere,
    SameDatabase,
    OwnDatabase,
}

fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("SECONDS is a number"))
        .unwrap_or(15);
    println!("| appended tree | commits | store's database | appended tree's database |");
    println!("| --- | --- | --- | --- |");
    for (what, appended) in [
        ("none", Appended::Nowhere),
        ("in the same database", Appended::SameDatabase),
        ("in a database of its own", Appended::OwnDatabase),
    ] {
        let (commits, store, own) = run(appended, Duration::from_secs(seconds));
        println!(
            "| {what} | {commits} | {:.1} MiB | {} |",
            mib(store),
            own.map_or("—".into(), |b| format!("{:.1} MiB", mib(b)))
        );
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn open(dir: &std::path::Path) -> sled::Db {
    sled::Config::new()
        .path(dir)
        .segment_size(64 * 1024)
        .cache_capacity(64 << 20)
        .open()
        .expect("sled opens")
}

/// Commits for `time`; returns the commits made and each database's size on disk.
fn run(appended: Appended, time: Duration) -> (u64, u64, Option<u64>) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = open(&dir.path().join("store"));
    let own = open(&dir.path().join("appended"));
    let state = db.open_tree("state").unwrap();
    let outbox = db.open_tree("outbox").unwrap();
    let same = db.open_tree("appended").unwrap();
    let separate = own.open_tree("appended").unwrap();
    let (state_value, outbox_value, appended_value) = (vec![1u8; 400], vec![2u8; 1_500], vec![3u8; 66]);
    let started = Instant::now();
    let mut commits = 0u64;
    while started.elapsed() < time {
        let aggregate = (commits.wrapping_mul(2_654_435_761) % 550).to_be_bytes();
        (&state, &outbox, &same)
            .transaction(|(state, outbox, same)| {
                state.insert(&aggregate, state_value.as_slice())?;
                outbox.insert(&commits.to_be_bytes(), outbox_value.as_slice())?;
                if appended == Appended::SameDatabase {
                    same.insert(&commits.to_be_bytes(), appended_value.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .unwrap();
        if appended == Appended::OwnDatabase {
            separate
                .insert(commits.to_be_bytes(), appended_value.as_slice())
                .unwrap();
        }
        if commits >= 50 {
            outbox.remove((commits - 50).to_be_bytes()).unwrap();
        }
        commits += 1;
        if commits % 200 == 0 {
            db.flush().unwrap();
            own.flush().unwrap();
        }
    }
    let own_size = (appended == Appended::OwnDatabase).then(|| own.size_on_disk().unwrap());
    (commits, db.size_on_disk().unwrap(), own_size)
}
