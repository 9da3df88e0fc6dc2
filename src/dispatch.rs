//! Ordering for concurrent processing, pure bookkeeping with no I/O:
//! - [`KeyedQueue`]: events of one aggregate run one after another, events of different aggregates
//!   run concurrently;
//! - [`InOrder`]: what finished is released (acked) in the order it was received, so the broker's
//!   acknowledged range stays contiguous and a successor resumes from one position instead of a
//!   scatter of individually acked messages.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Holds the items waiting behind a busy key.
pub struct KeyedQueue<K, T> {
    busy: HashMap<K, VecDeque<T>>,
    parked: usize,
}

impl<K: Hash + Eq + Clone, T> Default for KeyedQueue<K, T> {
    fn default() -> Self {
        KeyedQueue {
            busy: HashMap::new(),
            parked: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, T> KeyedQueue<K, T> {
    /// Returns `Some(item)` when it may start now (its key becomes busy), `None` when it was parked.
    pub fn admit(&mut self, key: &K, item: T) -> Option<T> {
        match self.busy.get_mut(key) {
            Some(waiting) => {
                waiting.push_back(item);
                self.parked += 1;
                None
            }
            None => {
                self.busy.insert(key.clone(), VecDeque::new());
                Some(item)
            }
        }
    }

    /// The item for `key` finished: returns the next one to start, keeping the key busy, if any.
    pub fn finish(&mut self, key: &K) -> Option<T> {
        let waiting = self.busy.get_mut(key)?;
        match waiting.pop_front() {
            Some(next) => {
                self.parked -= 1;
                Some(next)
            }
            None => {
                self.busy.remove(key);
                None
            }
        }
    }

    /// Items parked behind a busy key.
    pub fn parked(&self) -> usize {
        self.parked
    }
}

/// Hands out sequence numbers on receipt and releases finished items in sequence order.
pub struct InOrder<T> {
    /// Sequence number of `slots[0]`.
    head: u64,
    /// One slot per received item not yet released; `Some` once it finished.
    slots: VecDeque<Option<T>>,
}

impl<T> Default for InOrder<T> {
    fn default() -> Self {
        InOrder {
            head: 0,
            slots: VecDeque::new(),
        }
    }
}

impl<T> InOrder<T> {
    /// Registers a received item; its sequence number is what `finish` takes.
    pub fn receive(&mut self) -> u64 {
        self.slots.push_back(None);
        self.head + self.slots.len() as u64 - 1
    }

    /// Item `seq` finished; returns every item now releasable, oldest first.
    pub fn finish(&mut self, seq: u64, item: T) -> Vec<T> {
        let slot = seq
            .checked_sub(self.head)
            .and_then(|at| self.slots.get_mut(at as usize))
            .expect("finish takes a sequence number from receive, once");
        assert!(slot.is_none(), "item {seq} finished twice");
        *slot = Some(item);
        let mut released = Vec::new();
        while let Some(Some(_)) = self.slots.front() {
            released.extend(self.slots.pop_front().flatten());
            self.head += 1;
        }
        released
    }

    /// Finished items waiting for an earlier one.
    pub fn waiting(&self) -> usize {
        self.slots.iter().filter(|slot| slot.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_items_are_released_in_receive_order() {
        let mut order = InOrder::default();
        let (a, b, c) = (order.receive(), order.receive(), order.receive());
        assert!(order.finish(b, "b").is_empty(), "waits for a");
        assert_eq!(order.waiting(), 1);
        assert_eq!(order.finish(a, "a"), vec!["a", "b"]);
        let d = order.receive();
        assert!(order.finish(d, "d").is_empty(), "waits for c");
        assert_eq!(order.finish(c, "c"), vec!["c", "d"]);
        assert_eq!(order.waiting(), 0);
    }

    #[test]
    fn same_key_runs_in_order_other_keys_run_at_once() {
        let mut q = KeyedQueue::default();
        assert_eq!(q.admit(&"a", 1), Some(1));
        assert_eq!(q.admit(&"a", 2), None);
        assert_eq!(q.admit(&"b", 3), Some(3));
        assert_eq!(q.admit(&"a", 4), None);
        assert_eq!(q.parked(), 2);
        assert_eq!(q.finish(&"a"), Some(2));
        assert_eq!(q.finish(&"a"), Some(4));
        assert_eq!(q.finish(&"a"), None);
        assert_eq!(q.admit(&"a", 5), Some(5), "key is free again");
        assert_eq!(q.finish(&"b"), None);
        assert_eq!(q.parked(), 0);
    }
}
