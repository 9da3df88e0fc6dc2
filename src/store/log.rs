//! The commit log: what a transaction of the committer writes, and what is later applied to the
//! trees.
//!
//! Why: a commit wrote its state, version, outbox entries, journal run and snapshot to a tree
//! each, and sled 0.34 copies a leaf at every insert (and rewrites it whole into its log every
//! few): a commit's own work was ~145–200 µs of CPU, and a paced stream pays one per event
//! (docs/BENCHMARKS.md). Now a transaction writes its commits as one value of the `log` tree,
//! beside the window's keys, and is durable once that is flushed; [`Planned`] commits wait in
//! memory ([`Pending`]) until they are applied to the trees together, each aggregate's state and
//! version once per pass, the outbox entries published meanwhile never written, and the log's
//! values removed in the same transaction (`SledStore::apply_pending`). Reads that need the trees
//! apply what waits first; the publisher reads the waiting outbox entries from memory. After a
//! crash the log's values are decoded and applied at open, before anything reads the store.
//!
//! A value is its commits one after the other, each as fields of a 4-byte big-endian length then
//! their bytes (numbers as 8 bytes big-endian), in [`Planned::encode`]'s order.

use super::packed;
use crate::store::OutboxEntry;
use aerostream_actors::output::OutputEvent;
use aerostream_actors::ports::StoreError;
use aerostream_actors::readmodel::{Change, Tally};
use std::collections::{BTreeMap, HashMap, HashSet};

/// A key and its value, as stored.
pub(super) type Pair = (Vec<u8>, Vec<u8>);

/// One commit's writes to the trees, decided and logged, not yet applied.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Planned {
    pub state_key: Vec<u8>,
    pub state: Vec<u8>,
    pub version: u64,
    /// Outbox entries (their JSON, packed only when applied to the tree), under their sequence
    /// numbers.
    pub outbox: Vec<(u64, Vec<u8>)>,
    /// The output events of the commit's events, for the commission ledgers (not logged: read
    /// back from the outbox entries).
    pub outputs: Vec<OutputEvent>,
    /// Charges to make: payment id, the charge as stored.
    pub charges: Vec<Pair>,
    /// The journal run written (its key, the run as stored).
    pub journal: Option<Pair>,
    pub snapshot: Option<Pair>,
    /// Snapshot keys to remove.
    pub dropped: Vec<Vec<u8>>,
    /// Journal runs to remove: those whose keys fall in this range, inclusive.
    pub truncated: Option<Pair>,
    pub read_model: Vec<Change>,
}

impl Planned {
    /// Appends the commit to a log value.
    pub fn encode(&self, value: &mut Vec<u8>) {
        let mut w = Writer(value);
        w.bytes(&self.state_key);
        w.bytes(&self.state);
        w.number(self.version);
        w.number(self.outbox.len() as u64);
        for (seq, entry) in &self.outbox {
            w.number(*seq);
            w.bytes(entry);
        }
        w.pairs(&self.charges);
        w.optional(&self.journal);
        w.optional(&self.snapshot);
        w.number(self.dropped.len() as u64);
        for key in &self.dropped {
            w.bytes(key);
        }
        w.optional(&self.truncated);
        w.number(self.read_model.len() as u64);
        for change in &self.read_model {
            w.bytes(change.group.as_bytes());
            w.bytes(change.counter.as_bytes());
            w.number(change.delta.count as u64);
            w.number(change.delta.amount as u64);
        }
    }

    /// The commits of a log value, in order.
    pub fn decode_all(value: &[u8]) -> Result<Vec<Planned>, StoreError> {
        let mut r = Reader(value);
        let mut commits = Vec::new();
        while !r.0.is_empty() {
            commits.push(Planned::decode(&mut r)?);
        }
        Ok(commits)
    }

    fn decode(r: &mut Reader<'_>) -> Result<Planned, StoreError> {
        let state_key = r.bytes()?.to_vec();
        let state = r.bytes()?.to_vec();
        let version = r.number()?;
        let outbox = (0..r.number()?)
            .map(|_| Ok((r.number()?, r.bytes()?.to_vec())))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let outputs = outbox
            .iter()
            .filter_map(|(_, entry)| output_of(entry).transpose())
            .collect::<Result<_, _>>()?;
        Ok(Planned {
            state_key,
            state,
            version,
            outbox,
            outputs,
            charges: r.pairs()?,
            journal: r.optional()?,
            snapshot: r.optional()?,
            dropped: (0..r.number()?)
                .map(|_| Ok(r.bytes()?.to_vec()))
                .collect::<Result<_, StoreError>>()?,
            truncated: r.optional()?,
            read_model: (0..r.number()?)
                .map(|_| {
                    Ok(Change {
                        group: r.text()?,
                        counter: r.text()?,
                        delta: Tally {
                            count: r.number()? as i64,
                            amount: r.number()? as i64,
                        },
                    })
                })
                .collect::<Result<_, StoreError>>()?,
        })
    }
}

/// The output event an outbox entry holds, if it holds one (not a changelog record).
fn output_of(entry: &[u8]) -> Result<Option<OutputEvent>, StoreError> {
    let json = packed::unpack(entry)?;
    match serde_json::from_slice(&json) {
        Ok(OutboxEntry::Output(event)) => Ok(Some(event)),
        Ok(OutboxEntry::Change(_)) => Ok(None),
        Err(e) => Err(StoreError::Corrupt(format!("logged outbox entry: {e}"))),
    }
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn number(&mut self, n: u64) {
        self.0.extend_from_slice(&n.to_be_bytes());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        self.0.extend_from_slice(bytes);
    }

    fn pairs(&mut self, pairs: &[Pair]) {
        self.number(pairs.len() as u64);
        for (a, b) in pairs {
            self.bytes(a);
            self.bytes(b);
        }
    }

    fn optional(&mut self, pair: &Option<Pair>) {
        self.pairs(pair.as_slice());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn malformed() -> StoreError {
        StoreError::Corrupt("malformed commit log value".into())
    }

    fn number(&mut self) -> Result<u64, StoreError> {
        let (n, rest) = self.0.split_first_chunk::<8>().ok_or_else(Self::malformed)?;
        self.0 = rest;
        Ok(u64::from_be_bytes(*n))
    }

    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let (len, rest) = self.0.split_first_chunk::<4>().ok_or_else(Self::malformed)?;
        let (bytes, rest) = rest
            .split_at_checked(u32::from_be_bytes(*len) as usize)
            .ok_or_else(Self::malformed)?;
        self.0 = rest;
        Ok(bytes)
    }

    fn text(&mut self) -> Result<String, StoreError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| Self::malformed())
    }

    fn pairs(&mut self) -> Result<Vec<Pair>, StoreError> {
        (0..self.number()?)
            .map(|_| Ok((self.bytes()?.to_vec(), self.bytes()?.to_vec())))
            .collect()
    }

    fn optional(&mut self) -> Result<Option<Pair>, StoreError> {
        let mut pairs = self.pairs()?;
        match pairs.len() {
            0 | 1 => Ok(pairs.pop()),
            _ => Err(Self::malformed()),
        }
    }
}

/// The commits logged and not yet applied to the trees, and what reads need of them meanwhile.
/// Held (a mutex of the store) by every write to the trees a commit writes, from its checks to
/// its end, so the checks see every commit before it, applied or not.
#[derive(Default)]
pub(super) struct Pending {
    pub commits: Vec<Planned>,
    /// The log's values that hold them.
    pub log_keys: Vec<u64>,
    /// State key → (the newest version logged, the commit of `commits` that wrote it).
    pub versions: HashMap<Vec<u8>, (u64, usize)>,
    /// Outbox entries logged and neither published nor applied: sequence number → where the
    /// entry is (its commit in `commits`, its place in the commit's `outbox`).
    pub outbox: BTreeMap<u64, (usize, usize)>,
    /// When the oldest waiting commit was logged.
    pub since: Option<std::time::Instant>,
    /// Read-model groups and ledgers whose stored values are known to parse (checked once, at
    /// the first commit that moves them; every value written since is the store's own), so that
    /// an application does not fail on a stored value: a commit that would is refused instead.
    pub parsed_groups: HashSet<String>,
    pub parsed_ledgers: HashSet<String>,
}

impl Pending {
    /// Adds commits logged under `log_key`.
    pub fn add(&mut self, log_key: u64, commits: Vec<Planned>) {
        self.log_keys.push(log_key);
        self.since.get_or_insert_with(std::time::Instant::now);
        for commit in commits {
            let at = self.commits.len();
            self.versions
                .insert(commit.state_key.clone(), (commit.version, at));
            self.outbox.extend(
                commit
                    .outbox
                    .iter()
                    .enumerate()
                    .map(|(i, (seq, _))| (*seq, (at, i))),
            );
            self.commits.push(commit);
        }
    }

    /// The newest logged state of `state_key`, if one waits.
    pub fn state(&self, state_key: &[u8]) -> Option<&[u8]> {
        let (_, at) = self.versions.get(state_key)?;
        Some(&self.commits[*at].state)
    }

    /// The waiting outbox entries, oldest first, as stored.
    pub fn outbox_entries(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.outbox
            .iter()
            .map(|(seq, (commit, at))| (*seq, self.commits[*commit].outbox[*at].1.as_slice()))
    }

    /// Forgets waiting outbox entry `seq` (the application will not write it); its bytes, if it
    /// was waiting.
    pub fn remove_outbox(&mut self, seq: u64) -> Option<&[u8]> {
        let (commit, at) = self.outbox.remove(&seq)?;
        Some(&self.commits[commit].outbox[at].1)
    }

    pub fn version(&self, state_key: &[u8]) -> Option<u64> {
        self.versions.get(state_key).map(|(version, _)| *version)
    }

    /// Forgets the commits applied (the outbox entries left were written to the outbox tree).
    pub fn clear(&mut self) {
        *self = Pending {
            parsed_groups: std::mem::take(&mut self.parsed_groups),
            parsed_ledgers: std::mem::take(&mut self.parsed_ledgers),
            ..Pending::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_value_decodes_to_the_commits_encoded() {
        let output = OutputEvent {
            id: "o1".into(),
            causation_id: "e1".into(),
            correlation_id: None,
            time_ms: 5,
            body: aerostream_actors::output::OutputBody::PaymentSucceeded {
                payment_id: "p1".into(),
                affiliate_id: "af1".into(),
                amount: aerostream_actors::Money::positive(1_250, "EUR").unwrap(),
            },
        };
        let entry = packed::pack(&serde_json::to_vec(&OutboxEntry::Output(output.clone())).unwrap());
        let commits = vec![
            Planned {
                state_key: b"payment/p1".to_vec(),
                state: b"{\"id\":\"p1\"}".to_vec(),
                version: 3,
                outbox: vec![(41, entry)],
                outputs: vec![output],
                charges: vec![(b"p1".to_vec(), b"{}".to_vec())],
                journal: None,
                snapshot: None,
                dropped: Vec::new(),
                truncated: None,
                read_model: Vec::new(),
            },
            Planned {
                state_key: b"campaign/c1".to_vec(),
                state: vec![0; 700],
                version: u64::MAX,
                outbox: Vec::new(),
                outputs: Vec::new(),
                charges: Vec::new(),
                journal: Some((b"campaign/c1/1".to_vec(), vec![1, 2, 3])),
                snapshot: Some((b"campaign/c1/0".to_vec(), Vec::new())),
                dropped: vec![b"x".to_vec(), Vec::new()],
                truncated: Some((b"a".to_vec(), b"b".to_vec())),
                read_model: vec![Change {
                    group: "campaign:c1".into(),
                    counter: "clicks".into(),
                    delta: Tally {
                        count: -1,
                        amount: i64::MIN,
                    },
                }],
            },
        ];
        let mut value = Vec::new();
        for commit in &commits {
            commit.encode(&mut value);
        }
        assert_eq!(Planned::decode_all(&value).unwrap(), commits);
        assert!(Planned::decode_all(&value[..value.len() - 1]).is_err());
    }
}
