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
///
/// Published as the body (`data`) of `CampanaEstadoCompleto`: the state's fields
/// ([`Aggregate::write_snapshot_state`]), then `version_esquema`, `checksum_datos` and `watermark`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot<A> {
    pub state: A,
    pub version_esquema: String,
    /// SHA-256 (lowercase hex) of the published record without this field: see [`canonical`].
    pub checksum_datos: String,
    /// Events applied up to this snapshot: the journal resumes after it.
    pub watermark: u64,
}

/// The bytes `checksum_datos` is the SHA-256 of: the Avro binary encoding of the published snapshot
/// record without its `checksum_datos` field, that is every other field in schema order — the
/// state's fields, `version_esquema`, `watermark`. A reader recomputes it from the message alone
/// (README, "Campaign snapshots and recovery"); a stored snapshot is verified the same way.
///
/// A campaign's internal lifecycle is not published (an ACTIVE campaign with its budget spent is
/// published PAUSED), so the checksum does not tell those two apart.
pub fn canonical<A: Aggregate>(state: &A, version_esquema: &str, watermark: u64) -> Vec<u8> {
    let mut out = AvroBinary::default();
    state.write_snapshot_state(&mut out);
    out.string(version_esquema).long(watermark as i64);
    out.into_bytes()
}

fn checksum<A: Aggregate>(state: &A, version_esquema: &str, watermark: u64) -> String {
    hex::encode(Sha256::digest(canonical(state, version_esquema, watermark)))
}

impl<A: Aggregate> Snapshot<A> {
    pub fn of(state: &A) -> Snapshot<A> {
        let watermark = state.version();
        Snapshot {
            state: state.clone(),
            version_esquema: SNAPSHOT_SCHEMA_VERSION.into(),
            checksum_datos: checksum(state, SNAPSHOT_SCHEMA_VERSION, watermark),
            watermark,
        }
    }

    /// Parses a stored snapshot and checks its checksum; `None` for anything that does not hold.
    pub fn verified(bytes: &[u8]) -> Option<Snapshot<A>> {
        let snapshot: Snapshot<A> = serde_json::from_slice(bytes).ok()?;
        let expected = checksum(&snapshot.state, &snapshot.version_esquema, snapshot.watermark);
        let intact = snapshot.checksum_datos == expected && snapshot.watermark == snapshot.state.version();
        intact.then_some(snapshot)
    }
}

/// Avro binary encoding (the Avro specification's "Binary Encoding") of the types a snapshot record
/// has: a record is its fields' encodings one after another, in schema order, with no names.
#[derive(Debug, Default)]
pub struct AvroBinary(Vec<u8>);

impl AvroBinary {
    /// `long`: zig-zag encoded, then written 7 bits a byte, low bits first, high bit set on every
    /// byte but the last.
    pub fn long(&mut self, value: i64) -> &mut Self {
        let mut n = ((value << 1) ^ (value >> 63)) as u64;
        while n >= 0x80 {
            self.0.push((n & 0x7f) as u8 | 0x80);
            n >>= 7;
        }
        self.0.push(n as u8);
        self
    }

    /// `string`: its length in UTF-8 bytes as a `long`, then those bytes.
    pub fn string(&mut self, value: &str) -> &mut Self {
        self.long(value.len() as i64);
        self.0.extend_from_slice(value.as_bytes());
        self
    }

    /// An array of strings in one block, as Avro's writers (Java, fastavro, apache-avro) write it:
    /// the item count and the items, then a zero count; an empty array is the zero count alone.
    pub fn strings<'a>(&mut self, items: impl ExactSizeIterator<Item = &'a str>) -> &mut Self {
        if items.len() > 0 {
            self.long(items.len() as i64);
            for item in items {
                self.string(item);
            }
        }
        self.long(0)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
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
    use crate::campaign::{Campaign, CampaignStatus};
    use crate::events::CampaignEvent;
    use crate::testkit::{campaign_created, run};

    fn exhausted() -> Campaign {
        let (state, _) = run(&[
            campaign_created("c1", 200),
            CampaignEvent::Activated {
                campaign_id: "c1".into(),
            },
            click("c1"),
            click("c1"),
        ]);
        state.unwrap()
    }

    fn click(id: &str) -> CampaignEvent {
        CampaignEvent::ClickRecorded {
            campaign_id: id.into(),
            affiliate_id: "af-1".into(),
        }
    }

    #[test]
    fn snapshots_verify_and_a_changed_byte_is_caught() {
        let (state, _) = run(&[campaign_created("c1", 10_000)]);
        let snapshot = Snapshot::of(&state.unwrap());
        let bytes = serde_json::to_vec(&snapshot).unwrap();
        assert_eq!(Snapshot::<Campaign>::verified(&bytes), Some(snapshot.clone()));
        let tampered = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("\"spend_minor\":0", "\"spend_minor\":7");
        assert_eq!(Snapshot::<Campaign>::verified(tampered.as_bytes()), None);
        let tampered = String::from_utf8(bytes)
            .unwrap()
            .replace("\"version_esquema\":\"v1\"", "\"version_esquema\":\"v2\"");
        assert_eq!(Snapshot::<Campaign>::verified(tampered.as_bytes()), None);
        assert_eq!(Snapshot::<Campaign>::verified(b"{not json"), None);
    }

    /// The bytes and checksum fastavro gives for this campaign's published record (the schema of
    /// `tests/checksum/verify.py`: CampanaEstadoCompleto's `data` without `checksum_datos`).
    #[test]
    fn the_checksum_covers_the_published_record() {
        let campaign = exhausted();
        assert_eq!(
            (campaign.lifecycle, campaign.status()),
            (CampaignStatus::Active, CampaignStatus::Paused)
        );
        // Field by field: a string is its length (zig-zag) and UTF-8 bytes, a long zig-zag.
        let expected = concat!(
            "046331",                     // id_campana "c1"
            "1663616d706169676e206331",   // nombre "campaign c1"
            "0c504155534544",             // estado "PAUSED", as published
            "900306555344",               // presupuesto 200 USD
            "9003c801e807",               // gasto 200, per click 100, per conversion 500
            "14504f5243454e54414a45d00f", // regla_comision PORCENTAJE 1000
            "00040000",                   // metricas 0, 2, 0, 0
            // alertas_emitidas: a block of 3 (WARNING, CRITICAL, EXHAUSTED), then 0
            "060e5741524e494e4710435249544943414c1245584841555354454400",
            "08",     // version 4
            "047631", // version_esquema "v1"
            "08",     // watermark 4
        );
        assert_eq!(hex::encode(canonical(&campaign, "v1", 4)), expected);
        assert_eq!(
            Snapshot::of(&campaign).checksum_datos,
            "697e7fbd79b21b0571c289e3bdf5f73937c1156451c44cc993dcc95b9e750b80"
        );
    }

    #[test]
    fn longs_are_zigzag_varints() {
        let cases: [(i64, &str); 8] = [
            (0, "00"),
            (-1, "01"),
            (1, "02"),
            (-64, "7f"),
            (64, "8001"),
            (8_192, "808001"),
            (i64::MAX, "feffffffffffffffff01"),
            (i64::MIN, "ffffffffffffffffff01"),
        ];
        for (value, expected) in cases {
            let mut out = AvroBinary::default();
            out.long(value);
            assert_eq!(hex::encode(out.into_bytes()), expected, "{value}");
        }
        let mut out = AvroBinary::default();
        out.string("año")
            .strings(std::iter::empty())
            .strings(["a"].into_iter());
        assert_eq!(hex::encode(out.into_bytes()), "0861c3b16f0002026100");
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
