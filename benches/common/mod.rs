//! What the idempotency, restore and commit-path benches share: the daemon's store as the daemon
//! opens it, the outbox drained as its publisher does, campaign events as they come in, and the
//! machine's CPU time (`machine`, which the throughput bench includes on its own).

pub mod machine;

use aerostream::config::Config;
use aerostream::store::SledStore;
use aerostream_actors::ports::Clock;
use aerostream_actors::{CampaignEvent, Envelope, Event, Incoming};
use std::path::Path;
use std::sync::Arc;

/// The store in `dir` as the daemon opens it with `config`: its cache and window, the changelog
/// on unless `config` turns it off, the committer thread started.
pub fn daemon_store(dir: &Path, config: &Config, clock: Arc<dyn Clock>) -> Arc<SledStore> {
    let mut store = SledStore::open_with_cache(
        dir,
        config.idempotency.window_seconds,
        config.daemon.cache_mib << 20,
        clock,
    )
    .expect("store opens");
    if config.changelog.enabled {
        store = store.with_changelog("bench".into());
    }
    let store = Arc::new(store);
    store
        .start_committer(config.min_commit_interval())
        .expect("committer starts");
    store
}

/// Reads and deletes what the outbox holds, as the publisher does (`outbox::run`: what it reads
/// to publish, in reads of as many entries) once the broker has it.
pub fn drain_outbox(store: &SledStore) {
    loop {
        let entries = store
            .outbox_publishable(aerostream::outbox::BATCH)
            .expect("outbox readable");
        if entries.is_empty() {
            return;
        }
        let seqs: Vec<_> = entries.into_iter().map(|(seq, _)| seq).collect();
        store.outbox_remove(&seqs).expect("outbox entries deleted");
    }
}

/// A campaign event whose idempotency key is its id, as decoded from the wire.
pub fn incoming(id: String, time_ms: i64, event: CampaignEvent) -> Arc<Incoming> {
    Arc::new(Incoming {
        envelope: Envelope {
            id: id.clone(),
            event_type: "bench".into(),
            source: "bench".into(),
            time_ms,
            subject: None,
            correlation_id: None,
            causation_id: None,
            schema_version: "v1".into(),
        },
        event: Event::Campaign(event),
        idempotency_key: id,
        content_hash: hex::encode([7u8; 32]),
        delivery: None,
        partition: None,
    })
}
