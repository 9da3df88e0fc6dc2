//! Ordering for concurrent processing, pure bookkeeping with no I/O:
//! - [`KeyedQueue`]: events of one aggregate run one batch after another, in order, batches of
//!   different aggregates run concurrently;
//! - [`InOrder`]: what finished is released (acked) in the order it was received, so the broker's
//!   acknowledged range stays contiguous and a successor resumes from one position instead of a
//!   scatter of individually acked messages.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Holds items per key until their key is free, then hands them out as one batch: a key has at
/// most one batch running, and the items that arrive meanwhile make its next batch.
pub struct KeyedQueue<K, T> {
    /// Keys with a batch running, and the items waiting behind it.
    busy: HashMap<K, Vec<T>>,
    /// Free keys with items: the batches ready to start, in arrival order of their first item.
    ready: Vec<(K, Vec<T>)>,
    parked: usize,
}

impl<K: Hash + Eq + Clone, T> Default for KeyedQueue<K, T> {
    fn default() -> Self {
        KeyedQueue {
            busy: HashMap::new(),
            ready: Vec::new(),
            parked: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, T> KeyedQueue<K, T> {
    /// Adds `item` to the next batch of `key`.
    pub fn park(&mut self, key: &K, item: T) {
        self.parked += 1;
        if let Some(waiting) = self.busy.get_mut(key) {
            waiting.push(item);
            return;
        }
        match self.ready.iter_mut().find(|(k, _)| k == key) {
            Some((_, batch)) => batch.push(item),
            None => self.ready.push((key.clone(), vec![item])),
        }
    }

    /// The batches that may start now, one per free key; their keys become busy.
    pub fn start(&mut self) -> Vec<(K, Vec<T>)> {
        let ready = std::mem::take(&mut self.ready);
        for (key, batch) in &ready {
            self.parked -= batch.len();
            self.busy.insert(key.clone(), Vec::new());
        }
        ready
    }

    /// The batch of `key` finished: the items that waited behind it are ready to start.
    pub fn finish(&mut self, key: &K) {
        if let Some(waiting) = self.busy.remove(key) {
            if !waiting.is_empty() {
                self.ready.push((key.clone(), waiting));
            }
        }
    }

    /// Items waiting to start.
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

    /// Items received and not released yet.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
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
        assert_eq!(order.len(), 3);
        assert_eq!(order.finish(a, "a"), vec!["a", "b"]);
        let d = order.receive();
        assert!(order.finish(d, "d").is_empty(), "waits for c");
        assert_eq!(order.finish(c, "c"), vec!["c", "d"]);
        assert!(order.is_empty());
    }

    #[test]
    fn a_key_runs_one_batch_at_a_time_and_what_arrives_meanwhile_is_its_next_batch() {
        let mut q = KeyedQueue::default();
        q.park(&"a", 1);
        q.park(&"b", 2);
        q.park(&"a", 3);
        assert_eq!(q.parked(), 3);
        assert_eq!(q.start(), vec![("a", vec![1, 3]), ("b", vec![2])]);
        assert_eq!(q.parked(), 0);
        q.park(&"a", 4);
        q.park(&"a", 5);
        assert!(q.start().is_empty(), "a is busy");
        q.finish(&"b");
        assert!(q.start().is_empty(), "nothing waits for b");
        q.finish(&"a");
        assert_eq!(q.start(), vec![("a", vec![4, 5])]);
        q.finish(&"a");
        q.park(&"a", 6);
        assert_eq!(q.start(), vec![("a", vec![6])], "a is free again");
    }
}
