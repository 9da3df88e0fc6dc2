//! Full-state snapshots and the journal behind them (SPEC §6, seed 000 scenario #2:
//! `CampanaEstadoCompleto`).
//!
//! An aggregate kind that keeps snapshots (`Aggregate::SNAPSHOTS`) journals every applied event
//! and, every `every_events` events or when its rules ask (a campaign paused or completed), writes a
//! snapshot in the same commit. The last `keep` snapshots are retained; the journal is truncated
//! behind the oldest of them, so recovery can fall back from a corrupt snapshot to an older one and
//! replay from there. [`SnapshotPlan`] decides what one commit writes and deletes; it is pure.

use crate::aggregate::Aggregate;
use crate::events::Envelope;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Schema version of the snapshot record (`version_esquema`).
pub const SNAPSHOT_SCHEMA_VERSION: &str = "v1";

/// A snapshot: the full state, its checksum and the journal position it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot<A> {
    pub state: A,
    pub version_esquema: String,
    /// SHA-256 (hex) of the state's canonical JSON.
    pub checksum_datos: String,
    /// Events applied up to this snapshot: the journal resumes after it.
    pub watermark: u64,
}

fn checksum<A: Serialize>(state: &A) -> String {
    let json = serde_json::to_vec(state).expect("aggregate states serialize");
    hex::encode(Sha256::digest(json))
}

impl<A: Aggregate> Snapshot<A> {
    pub fn of(state: &A) -> Snapshot<A> {
        Snapshot {
            state: state.clone(),
            version_esquema: SNAPSHOT_SCHEMA_VERSION.into(),
            checksum_datos: checksum(state),
            watermark: state.version(),
        }
    }

    /// Parses a stored snapshot and checks its checksum; `None` for anything that does not hold.
    pub fn verified(bytes: &[u8]) -> Option<Snapshot<A>> {
        let snapshot: Snapshot<A> = serde_json::from_slice(bytes).ok()?;
        let intact = snapshot.checksum_datos == checksum(&snapshot.state)
            && snapshot.watermark == snapshot.state.version();
        intact.then_some(snapshot)
    }
}

/// One journaled event: what replay feeds back to `Aggregate::decide`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry<E> {
    pub envelope: Envelope,
    pub event: E,
}

/// Snapshot retention policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPolicy {
    pub every_events: u64,
    pub keep: usize,
}

/// What one commit writes and deletes for snapshots and the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotPlan {
    /// Write a snapshot at this version.
    pub snapshot_at: Option<u64>,
    /// Snapshot versions to delete (beyond `keep`).
    pub drop_snapshots: Vec<u64>,
    /// Journal versions to delete, inclusive.
    pub truncate_journal: Option<(u64, u64)>,
    /// The retained snapshot versions after this commit, oldest first.
    pub retained: Vec<u64>,
}

impl SnapshotPolicy {
    /// Plans the commit that brings an aggregate to `version`; `retained` are its snapshot
    /// versions, oldest first; `forced` when its rules ask for a snapshot now.
    pub fn plan(&self, retained: &[u64], version: u64, forced: bool) -> SnapshotPlan {
        let due = forced || (self.every_events > 0 && version % self.every_events == 0);
        if !due {
            return SnapshotPlan {
                retained: retained.to_vec(),
                ..SnapshotPlan::default()
            };
        }
        let mut kept: Vec<u64> = retained.iter().copied().chain([version]).collect();
        let excess = kept.len().saturating_sub(self.keep.max(1));
        let drop_snapshots: Vec<u64> = kept.drain(..excess).collect();
        // The journal is kept from the oldest retained snapshot on, once there is a newer one to
        // fall back from (or when only one is kept): before it, nothing is needed.
        let needed = self.keep.clamp(1, 2);
        let truncated_before = if retained.len() >= needed { retained[0] } else { 0 };
        let oldest = kept[0];
        let truncate_journal =
            (kept.len() >= needed && oldest > truncated_before).then(|| (truncated_before + 1, oldest));
        SnapshotPlan {
            snapshot_at: Some(version),
            drop_snapshots,
            truncate_journal,
            retained: kept,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::Campaign;
    use crate::testkit::{campaign_created, run};

    #[test]
    fn snapshots_verify_and_a_changed_byte_is_caught() {
        let (state, _) = run(&[campaign_created("c1", 10_000)]);
        let snapshot = Snapshot::of(&state.unwrap());
        let bytes = serde_json::to_vec(&snapshot).unwrap();
        assert_eq!(Snapshot::<Campaign>::verified(&bytes), Some(snapshot.clone()));
        let tampered = String::from_utf8(bytes)
            .unwrap()
            .replace("\"spend_minor\":0", "\"spend_minor\":7");
        assert_eq!(Snapshot::<Campaign>::verified(tampered.as_bytes()), None);
        assert_eq!(Snapshot::<Campaign>::verified(b"{not json"), None);
    }

    #[test]
    fn plan_keeps_the_last_snapshots_and_truncates_behind_the_oldest() {
        let policy = SnapshotPolicy {
            every_events: 10,
            keep: 2,
        };
        assert_eq!(policy.plan(&[], 9, false).snapshot_at, None);
        let first = policy.plan(&[], 10, false);
        assert_eq!(first.snapshot_at, Some(10));
        assert_eq!(
            first.truncate_journal, None,
            "no older snapshot to fall back to yet"
        );
        let second = policy.plan(&[10], 20, false);
        assert_eq!(
            (second.retained.clone(), second.truncate_journal),
            (vec![10, 20], Some((1, 10)))
        );
        let third = policy.plan(&[10, 20], 30, false);
        assert_eq!(third.drop_snapshots, vec![10]);
        assert_eq!(third.truncate_journal, Some((11, 20)));
        assert_eq!(third.retained, vec![20, 30]);
        let forced = policy.plan(&[20, 30], 33, true);
        assert_eq!(
            (forced.snapshot_at, forced.truncate_journal),
            (Some(33), Some((21, 30)))
        );

        let single = SnapshotPolicy {
            every_events: 10,
            keep: 1,
        };
        assert_eq!(single.plan(&[], 10, false).truncate_journal, Some((1, 10)));
        assert_eq!(single.plan(&[10], 20, false).drop_snapshots, vec![10]);
        assert_eq!(single.plan(&[10], 20, false).truncate_journal, Some((11, 20)));
    }
}
