//! Which acks a Failover input may send as one cumulative ack (the decisions of `ingest`'s acks,
//! kept apart from the I/O).
//!
//! A cumulative ack acks every message of its partition up to it, so it may stand only for
//! messages this consumer received and finished itself. Per partition, a *run* starts at the first
//! entry finished in a subscription (the first the broker sent it: everything before it is acked)
//! and goes on while each finished entry is the one right after the previous one, or the first
//! entry of a later ledger (the broker rolls a topic's ledger over: pulsar-lite every 50 000
//! entries; entries skipped at the end of a ledger cannot be told from a roll-over, and the broker
//! skips none for an active Failover consumer); the last of them is the one to ack cumulatively.
//! A batch entry (a producer's batch) counts as finished at its last message, once every message
//! of its delivery was finished with an ack ([`Entries`]); the cumulative ack at that message acks
//! the whole entry (`tests/broker.rs`). A run ends for good, and every later ack of that partition
//! is an entry's own, at
//! - a message left unacked (shutting down): a later cumulative ack would ack it;
//! - a gap (an entry skipped: the broker should never skip one for an active Failover consumer,
//!   and if it did, acking the message on its own leaves the skipped one to be redelivered);
//! - a batch entry whose delivery is not whole (messages of it were copies dropped on arrival).
//!
//! A message behind the run (a broker's copy of one finished already) is acked on its own, or not
//! at all when its delivery of a batch entry is not whole or it is left unacked (the run covers
//! its entry); the run goes on. Measured on a 100 000-event backlog, six alternating rounds
//! against one ack per message (docs/BENCHMARKS.md): the broker's CPU per event down a quarter
//! (25 against 33 ms per 1 000 events), the daemon's 114 against 132 ms, 10 % more events/s; on a
//! stream of batch entries, 14 to 17 times fewer ack commands than one per entry.
//!
//! A message of a batch entry is acked only with its entry: the `pulsar` crate acks a batched
//! message by its batch index without an ack set, and the broker then acks the whole entry, as
//! Apache Pulsar does (`tests/broker.rs`). So an entry's ack, its own or a cumulative one, is sent
//! at its last message, once every message of the entry was finished and none is left unacked
//! ([`Entries`]); until then a death of the daemon has the broker send the whole entry again, and
//! the idempotency window drops what was applied of it.

use std::collections::HashMap;

/// A message's place on its partition: ledger, entry, and its index in a batch entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub ledger: u64,
    pub entry: u64,
    pub batch_index: Option<i32>,
}

/// What a finished message means for its entry ([`Entries::finished`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryAck {
    /// The entry is finished and acked: this message's ack acks it.
    Ack,
    /// A message of a batch entry whose later messages are still to come, all acked so far.
    Wait,
    /// Nothing of the entry is to be acked by this delivery: the message is left unacked, or its
    /// delivery of the entry is not whole.
    None,
}

/// What to do with a finished message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Its partition's cumulative ack now stands at it (covering the one that stood before).
    Cover,
    /// Behind the run (a copy of a message finished already): its own ack; the run and the ack
    /// that stands for it go on.
    Alone,
    /// Outside any run (the partition's run is over): the cumulative ack standing for the run, if
    /// one does, is sent first, then the message's own ack, or none if it is left unacked.
    Apart,
    /// No ack now, and the run goes on: a message of a batch entry that continues the run, whose
    /// last message is still to come, or a copy of an entry the run covers already that is not
    /// acked on its own (a delivery of it that is not whole, or left unacked).
    Hold,
}

#[derive(Debug, Default)]
struct Run {
    /// The entry that continues the run; `None` before the first message.
    next: Option<(u64, u64)>,
    ended: bool,
}

/// The runs of one subscription's partitions.
#[derive(Debug, Default)]
pub struct Runs {
    partitions: HashMap<String, Run>,
}

impl Runs {
    /// Whether the entry at `ledger`, `entry` of `partition` is behind its run: finished, and
    /// acked by the cumulative ack that stands for the run (sent, or sent at the end of the
    /// release that finished it).
    pub fn covers(&self, partition: &str, ledger: u64, entry: u64) -> bool {
        self.partitions
            .get(partition)
            .is_some_and(|run| !run.ended && run.next.is_some_and(|next| (ledger, entry) < next))
    }

    /// Decides for a message of `partition` at `at`, finished in receive order, given what it
    /// means for its entry (`entry`, from [`Entries::finished`]).
    pub fn finished(&mut self, partition: &str, at: Position, entry: EntryAck) -> Ack {
        let run = match self.partitions.get_mut(partition) {
            Some(run) => run,
            None => self.partitions.entry(partition.to_owned()).or_default(),
        };
        let here = (at.ledger, at.entry);
        let follows =
            |(ledger, entry): (u64, u64)| here == (ledger, entry) || (at.ledger > ledger && at.entry == 0);
        let continues = !run.ended && run.next.map_or(true, follows);
        let behind = !run.ended && run.next.is_some_and(|next| here < next);
        match entry {
            // A copy of an entry the run covers already: its own ack if its delivery was whole,
            // none otherwise (the run's ack covers it); the run goes on.
            EntryAck::Ack if behind => Ack::Alone,
            _ if behind => Ack::Hold,
            EntryAck::Wait if continues => Ack::Hold,
            EntryAck::Ack if continues => {
                run.next = Some((at.ledger, at.entry + 1));
                Ack::Cover
            }
            _ => {
                run.ended = true;
                Ack::Apart
            }
        }
    }
}

/// The batch entry being finished on each partition: its messages reach [`Entries::finished`] in
/// receive order, one after the other (a broker sends an entry whole), so a delivery of an entry
/// is whole when its indexes came in a row from 0 to the last.
#[derive(Debug, Default)]
pub struct Entries {
    partitions: HashMap<String, Entry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    ledger: u64,
    entry: u64,
    /// The index that continues this delivery of the entry.
    next: i32,
    /// Every message of it so far was finished with an ack.
    acked: bool,
}

impl Entries {
    /// Decides for a message at `at` of a batch entry of `size` messages, finished in receive
    /// order (`acked`: its verdict is an ack): whether its ack, sent now, acks the whole entry
    /// ([`EntryAck::Ack`]: the entry's last message, the messages before it in this delivery in a
    /// row from index 0, all acked), or the entry's later messages are still to come
    /// ([`EntryAck::Wait`]). A message outside any batch entry is its own entry.
    pub fn finished(&mut self, partition: &str, at: Position, size: i32, acked: bool) -> EntryAck {
        let whole = |acked: bool| if acked { EntryAck::Ack } else { EntryAck::None };
        let Some(index) = at.batch_index else {
            return whole(acked);
        };
        let (ledger, entry) = (at.ledger, at.entry);
        let current = self.partitions.get(partition).copied();
        let delivery = if index == 0 {
            Some(Entry {
                ledger,
                entry,
                next: 1,
                acked,
            })
        } else {
            current
                .filter(|run| (run.ledger, run.entry, run.next) == (ledger, entry, index))
                .map(|run| Entry {
                    next: index + 1,
                    acked: run.acked && acked,
                    ..run
                })
        };
        match delivery {
            Some(run) if run.next < size => {
                match self.partitions.get_mut(partition) {
                    Some(slot) => *slot = run,
                    None => {
                        self.partitions.insert(partition.to_owned(), run);
                    }
                }
                if run.acked {
                    EntryAck::Wait
                } else {
                    EntryAck::None
                }
            }
            Some(run) => {
                self.partitions.remove(partition);
                whole(run.acked)
            }
            // Not a whole delivery (messages of it were copies dropped on arrival): its entry is
            // acked by the delivery that is whole.
            None => {
                self.partitions.remove(partition);
                EntryAck::None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(entry: u64) -> Position {
        Position {
            ledger: 7,
            entry,
            batch_index: None,
        }
    }

    #[test]
    fn consecutive_entries_make_one_cumulative_ack() {
        let mut runs = Runs::default();
        assert_eq!(runs.finished("p0", at(10), EntryAck::Ack), Ack::Cover);
        assert_eq!(runs.finished("p0", at(11), EntryAck::Ack), Ack::Cover);
        assert_eq!(runs.finished("p1", at(3), EntryAck::Ack), Ack::Cover);
        assert_eq!(runs.finished("p0", at(12), EntryAck::Ack), Ack::Cover);
    }

    #[test]
    fn a_gap_ends_the_run_for_good() {
        let mut runs = Runs::default();
        assert_eq!(runs.finished("p0", at(1), EntryAck::Ack), Ack::Cover);
        assert_eq!(runs.finished("p0", at(3), EntryAck::Ack), Ack::Apart);
        assert_eq!(runs.finished("p0", at(4), EntryAck::Ack), Ack::Apart);
    }

    #[test]
    fn a_message_left_unacked_ends_the_run_and_is_never_covered() {
        let mut runs = Runs::default();
        assert_eq!(runs.finished("p0", at(1), EntryAck::Ack), Ack::Cover);
        // A copy of entry 1 left unacked: the run covers it already.
        assert_eq!(runs.finished("p0", at(1), EntryAck::None), Ack::Hold);
        assert_eq!(runs.finished("p0", at(2), EntryAck::None), Ack::Apart);
        assert_eq!(runs.finished("p0", at(3), EntryAck::Ack), Ack::Apart);
        assert_eq!(runs.finished("p0", at(4), EntryAck::None), Ack::Apart);
    }

    #[test]
    fn a_copy_behind_the_run_is_acked_alone_and_the_run_goes_on() {
        let mut runs = Runs::default();
        assert_eq!(runs.finished("p0", at(5), EntryAck::Ack), Ack::Cover);
        assert_eq!(runs.finished("p0", at(6), EntryAck::Ack), Ack::Cover);
        assert_eq!(runs.finished("p0", at(5), EntryAck::Ack), Ack::Alone);
        assert_eq!(runs.finished("p0", at(7), EntryAck::Ack), Ack::Cover);
    }

    #[test]
    fn a_run_covers_the_entries_behind_it_while_it_stands() {
        let mut runs = Runs::default();
        assert!(!runs.covers("p0", 7, 5), "nothing finished yet");
        assert_eq!(runs.finished("p0", at(5), EntryAck::Ack), Ack::Cover);
        assert_eq!(runs.finished("p0", batched(6, 0), EntryAck::Wait), Ack::Hold);
        assert!(runs.covers("p0", 7, 5));
        assert!(runs.covers("p0", 6, 900), "an earlier ledger");
        assert!(
            !runs.covers("p0", 7, 6),
            "its entry's last message is still to come"
        );
        assert!(!runs.covers("p1", 7, 5), "another partition");
        assert_eq!(runs.finished("p0", batched(6, 1), EntryAck::Ack), Ack::Cover);
        assert!(runs.covers("p0", 7, 6));
        assert!(!runs.covers("p0", 7, 7));
        // A gap ends the run: what it covered is no longer told from what it did not.
        assert_eq!(runs.finished("p0", at(9), EntryAck::Ack), Ack::Apart);
        assert!(!runs.covers("p0", 7, 5));
    }

    #[test]
    fn a_whole_batch_entry_continues_the_run_at_its_last_message() {
        let mut runs = Runs::default();
        assert_eq!(runs.finished("p0", at(1), EntryAck::Ack), Ack::Cover);
        assert_eq!(runs.finished("p0", batched(2, 0), EntryAck::Wait), Ack::Hold);
        assert_eq!(runs.finished("p0", batched(2, 1), EntryAck::Ack), Ack::Cover);
        assert_eq!(runs.finished("p0", at(3), EntryAck::Ack), Ack::Cover);
        // A copy of the entry, behind the run: its own ack at its last message.
        assert_eq!(runs.finished("p0", batched(2, 0), EntryAck::Wait), Ack::Hold);
        assert_eq!(runs.finished("p0", batched(2, 1), EntryAck::Ack), Ack::Alone);
        // A copy missing its first message (dropped on arrival while the original was held).
        assert_eq!(runs.finished("p0", batched(2, 1), EntryAck::None), Ack::Hold);
        assert_eq!(runs.finished("p0", batched(4, 0), EntryAck::Wait), Ack::Hold);
        assert_eq!(runs.finished("p0", batched(4, 1), EntryAck::Ack), Ack::Cover);
    }

    #[test]
    fn a_batch_entry_not_acked_whole_ends_the_run() {
        let mut runs = Runs::default();
        assert_eq!(runs.finished("p0", batched(1, 0), EntryAck::Wait), Ack::Hold);
        assert_eq!(runs.finished("p0", batched(1, 1), EntryAck::Ack), Ack::Cover);
        // Its second message left unacked: the run's ack covers entry 1, never entry 2.
        assert_eq!(runs.finished("p0", batched(2, 0), EntryAck::Wait), Ack::Hold);
        assert_eq!(runs.finished("p0", batched(2, 1), EntryAck::None), Ack::Apart);
        assert_eq!(runs.finished("p0", at(3), EntryAck::Ack), Ack::Apart);
        assert_eq!(runs.finished("p0", batched(4, 0), EntryAck::Wait), Ack::Apart);
    }

    #[test]
    fn an_entry_that_does_not_follow_the_run_ends_it() {
        let mut runs = Runs::default();
        assert_eq!(runs.finished("p0", at(1), EntryAck::Ack), Ack::Cover);
        // Entry 2's delivery lost its last message (a copy dropped on arrival); entry 3 is a gap.
        assert_eq!(runs.finished("p0", batched(2, 0), EntryAck::Wait), Ack::Hold);
        assert_eq!(runs.finished("p0", batched(3, 0), EntryAck::Wait), Ack::Apart);
    }

    #[test]
    fn a_later_ledger_goes_on_from_its_first_entry() {
        let mut runs = Runs::default();
        assert_eq!(runs.finished("p0", at(49_999), EntryAck::Ack), Ack::Cover);
        let rolled = Position {
            ledger: 9,
            entry: 0,
            batch_index: None,
        };
        assert_eq!(runs.finished("p0", rolled, EntryAck::Ack), Ack::Cover);
        assert_eq!(
            runs.finished("p0", Position { entry: 1, ..rolled }, EntryAck::Ack),
            Ack::Cover
        );
        assert_eq!(runs.finished("p0", at(12), EntryAck::Ack), Ack::Alone);
        let skipped = Position {
            ledger: 10,
            entry: 3,
            batch_index: None,
        };
        assert_eq!(runs.finished("p0", skipped, EntryAck::Ack), Ack::Apart);
    }

    fn batched(entry: u64, index: i32) -> Position {
        Position {
            batch_index: Some(index),
            ..at(entry)
        }
    }

    #[test]
    fn an_entry_is_acked_at_its_last_message_once_all_were_acked() {
        let mut entries = Entries::default();
        assert_eq!(entries.finished("p0", batched(4, 0), 3, true), EntryAck::Wait);
        assert_eq!(entries.finished("p1", batched(9, 0), 2, true), EntryAck::Wait);
        assert_eq!(entries.finished("p0", batched(4, 1), 3, true), EntryAck::Wait);
        assert_eq!(entries.finished("p1", batched(9, 1), 2, true), EntryAck::Ack);
        assert_eq!(entries.finished("p0", batched(4, 2), 3, true), EntryAck::Ack);
        // An entry of one message, and a message outside any batch entry.
        assert_eq!(entries.finished("p0", batched(5, 0), 1, true), EntryAck::Ack);
        assert_eq!(entries.finished("p0", at(6), 1, true), EntryAck::Ack);
        assert_eq!(entries.finished("p0", at(7), 1, false), EntryAck::None);
    }

    #[test]
    fn an_entry_with_a_message_left_unacked_is_never_acked() {
        let mut entries = Entries::default();
        assert_eq!(entries.finished("p0", batched(4, 0), 3, true), EntryAck::Wait);
        assert_eq!(entries.finished("p0", batched(4, 1), 3, false), EntryAck::None);
        assert_eq!(entries.finished("p0", batched(4, 2), 3, true), EntryAck::None);
        // Its next delivery, whole and acked, acks it.
        for index in 0..2 {
            assert_eq!(entries.finished("p0", batched(4, index), 3, true), EntryAck::Wait);
        }
        assert_eq!(entries.finished("p0", batched(4, 2), 3, true), EntryAck::Ack);
    }

    #[test]
    fn a_delivery_missing_messages_acks_nothing() {
        let mut entries = Entries::default();
        // A copy whose first messages were dropped on arrival (held at the time).
        assert_eq!(entries.finished("p0", batched(4, 2), 3, true), EntryAck::None);
        // One whose middle message was.
        assert_eq!(entries.finished("p0", batched(6, 0), 3, true), EntryAck::Wait);
        assert_eq!(entries.finished("p0", batched(6, 2), 3, true), EntryAck::None);
        // Messages of another entry in between.
        assert_eq!(entries.finished("p0", batched(8, 0), 2, true), EntryAck::Wait);
        assert_eq!(entries.finished("p0", batched(9, 0), 2, true), EntryAck::Wait);
        assert_eq!(entries.finished("p0", batched(8, 1), 2, true), EntryAck::None);
    }
}
