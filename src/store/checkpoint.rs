//! Where the changelog follower resumes after a restart: per changelog partition, the position of
//! the last record it read with everything before it in the store, and whether it has ever read a
//! record of another daemon.
//!
//! Why: a follower that read the changelog from its earliest record at every start paid for the
//! changelog's whole history at each restart. A position is remembered in the store's own
//! database after the imports it covers and is not flushed on its own: sled recovers a prefix of
//! its log, so a crash that loses an import loses every later position with it, and a restart
//! never resumes past a record whose import is gone.

use super::{store_error, SledStore};
use aerostream_actors::ports::StoreError;

/// The key of a partition's position: this prefix, then the partition's topic.
const POSITION: &[u8] = b"p/";
/// Present once the follower has read a record of another daemon.
const OTHERS: &[u8] = b"others";

/// A record's place in its partition: the broker's ledger and entry ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub ledger: u64,
    pub entry: u64,
}

impl Position {
    fn encode(self) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&self.ledger.to_be_bytes());
        bytes[8..].copy_from_slice(&self.entry.to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Position, StoreError> {
        let bytes: [u8; 16] = bytes
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("malformed changelog position {bytes:?}")))?;
        let (ledger, entry) = bytes.split_at(8);
        let number = |half: &[u8]| u64::from_be_bytes(half.try_into().expect("8 bytes"));
        Ok(Position {
            ledger: number(ledger),
            entry: number(entry),
        })
    }
}

impl SledStore {
    /// The position the follower reached in each changelog partition (its topic), everything
    /// before which is in the store.
    pub fn changelog_positions(&self) -> Result<Vec<(String, Position)>, StoreError> {
        self.checkpoint
            .scan_prefix(POSITION)
            .map(|entry| {
                let (key, value) = entry.map_err(store_error)?;
                let topic = String::from_utf8_lossy(&key[POSITION.len()..]).into_owned();
                Ok((topic, Position::decode(&value)?))
            })
            .collect()
    }

    /// Remembers that the follower has read `partition` up to `position`, every record before it
    /// imported (or found in the store). Durable with the next flush, after those imports.
    pub fn remember_changelog_position(&self, partition: &str, position: Position) -> Result<(), StoreError> {
        self.writing(|| {
            let key = [POSITION, partition.as_bytes()].concat();
            self.checkpoint
                .insert(key, &position.encode())
                .map(drop)
                .map_err(store_error)
        })
    }

    /// Forgets where the follower read `partition` to: it is read from its start next time.
    pub fn forget_changelog_position(&self, partition: &str) -> Result<(), StoreError> {
        self.writing(|| {
            let key = [POSITION, partition.as_bytes()].concat();
            self.checkpoint.remove(key).map(drop).map_err(store_error)
        })
    }

    /// Whether the follower has ever read a record of another daemon in this data directory.
    pub fn changelog_others(&self) -> Result<bool, StoreError> {
        self.checkpoint.contains_key(OTHERS).map_err(store_error)
    }

    /// Remembers that the follower has read a record of another daemon.
    pub fn remember_changelog_others(&self) -> Result<(), StoreError> {
        self.writing(|| self.checkpoint.insert(OTHERS, &[]).map(drop).map_err(store_error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aerostream_actors::ports::SystemClock;
    use std::sync::Arc;

    #[test]
    fn positions_and_others_outlive_the_store_and_forgotten_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 10, Arc::new(SystemClock)).unwrap();
            assert!(store.changelog_positions().unwrap().is_empty());
            assert!(!store.changelog_others().unwrap());
            let first = Position { ledger: 1, entry: 7 };
            store
                .remember_changelog_position("log-partition-0", first)
                .unwrap();
            let later = Position { ledger: 2, entry: 3 };
            store
                .remember_changelog_position("log-partition-0", later)
                .unwrap();
            store
                .remember_changelog_position("log-partition-1", first)
                .unwrap();
            store
                .remember_changelog_position("log-partition-2", first)
                .unwrap();
            store.forget_changelog_position("log-partition-2").unwrap();
            store.remember_changelog_others().unwrap();
            store.flusher.flush_here();
        }
        let store = SledStore::open(dir.path(), 10, Arc::new(SystemClock)).unwrap();
        assert_eq!(
            store.changelog_positions().unwrap(),
            vec![
                ("log-partition-0".to_owned(), Position { ledger: 2, entry: 3 }),
                ("log-partition-1".to_owned(), Position { ledger: 1, entry: 7 }),
            ]
        );
        assert!(store.changelog_others().unwrap());
    }

    #[test]
    fn a_malformed_position_is_corrupt_not_a_start() {
        assert!(matches!(
            Position::decode(&[1, 2, 3]),
            Err(StoreError::Corrupt(_))
        ));
        let position = Position {
            ledger: 9,
            entry: u64::MAX,
        };
        assert_eq!(Position::decode(&position.encode()).unwrap(), position);
    }
}
