//! Idempotency window benchmark (SPEC §12): commits (state + idempotency record) per second,
//! lookups per second with latency percentiles, and disk bytes per live key, for N live keys.
//!
//! ```text
//! cargo bench --bench idempotency -- [KEYS]        (default 1 000 000)
//! ```
//!
//! Keys look like the generator's (`pago_pago-000123_EXITOSO_af-0042`, ~34 bytes); each commit also
//! writes a small aggregate state, as the daemon does. Prints one Markdown table.

use aerostream::store::SledStore;
use aerostream_actors::events::{AggregateKey, AggregateKind};
use aerostream_actors::ports::{Clock, Commit, CommitResult, StateStore, SystemClock};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn key(i: u64) -> String {
    format!("pago_pago-{:06}_EXITOSO_af-{:04}", i, i % 10_000)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

fn main() {
    let keys: u64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temporary directory");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = SledStore::open(dir.path(), 3_600, clock.clone()).expect("store opens");
    let hash = hex::encode([7u8; 32]);
    let state = br#"{"id":"p","status":"EXITOSO","version":3}"#;

    let started = Instant::now();
    for i in 0..keys {
        let aggregate = AggregateKey {
            kind: AggregateKind::Payment,
            id: format!("pago-{:06}", i % 100_000),
        };
        let idempotency_key = key(i);
        // Each aggregate is written once per 100 000 keys: its next version.
        let version = i / 100_000 + 1;
        let commit = Commit::of(
            &aggregate,
            state,
            version,
            &idempotency_key,
            &hash,
            clock.now_ms(),
        );
        assert_eq!(store.commit(commit).expect("commit"), CommitResult::Committed);
    }
    let insert_elapsed = started.elapsed();
    let flush_started = Instant::now();
    runtime.block_on(store.flush()).expect("flush");
    let flush_elapsed = flush_started.elapsed();

    // Lookups: hits spread over the whole key space, plus misses.
    let lookups = 200_000u64;
    let mut latencies = Vec::with_capacity(lookups as usize);
    let mut state_rng = 0x2545_f491_4f6c_dd1du64;
    let started = Instant::now();
    for n in 0..lookups {
        state_rng ^= state_rng << 13;
        state_rng ^= state_rng >> 7;
        state_rng ^= state_rng << 17;
        let probe = if n % 10 == 0 {
            format!("missing-{n}")
        } else {
            key(state_rng % keys)
        };
        let t = Instant::now();
        let found = store.seen(&probe).expect("lookup");
        latencies.push(t.elapsed());
        assert_eq!(found.is_some(), n % 10 != 0);
    }
    let lookup_elapsed = started.elapsed();
    latencies.sort_unstable();

    // Settle sled's log before measuring the disk.
    runtime.block_on(store.flush()).expect("flush");
    let disk = store.size_on_disk().expect("size");
    let raw_key_bytes: usize =
        (0..keys.min(1_000)).map(|i| key(i).len()).sum::<usize>() / keys.min(1_000) as usize;

    println!("| idempotency window, {keys} live keys | value |");
    println!("| --- | --- |");
    println!(
        "| commits/s (state + key + time index, one transaction) | {:.0} |",
        keys as f64 / insert_elapsed.as_secs_f64()
    );
    println!("| flush of all commits | {:.2} s |", flush_elapsed.as_secs_f64());
    println!(
        "| lookups/s (90 % hits, 10 % misses) | {:.0} |",
        lookups as f64 / lookup_elapsed.as_secs_f64()
    );
    println!(
        "| lookup p50 / p99 / p999 | {:.1} µs / {:.1} µs / {:.1} µs |",
        percentile(&latencies, 0.50).as_secs_f64() * 1e6,
        percentile(&latencies, 0.99).as_secs_f64() * 1e6,
        percentile(&latencies, 0.999).as_secs_f64() * 1e6
    );
    println!(
        "| disk, whole database | {:.1} MiB |",
        disk as f64 / (1024.0 * 1024.0)
    );
    println!(
        "| disk bytes per live key (state trees included) | {:.0} |",
        disk as f64 / keys as f64
    );
    println!("| raw key length | {raw_key_bytes} bytes |");
}
