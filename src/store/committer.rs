//! The committer: one thread that writes the commits actors hand over, many per sled transaction.
//!
//! Why: a sled 0.34 transaction costs about the same whatever it writes (a process-wide lock, two
//! log buffers sealed and synced), and one per event took two thirds of the daemon's CPU
//! (docs/BENCHMARKS.md). Actors hand their commits over (`StateStore::commit_batched`) and wait
//! without holding their arbiter, their values encoded on their own thread
//! (`SledStore::encode`: JSON, compression); this thread takes every commit waiting, gives their
//! outbox entries sequence numbers, writes them with `SledStore::commit_encoded`, makes them
//! durable (`Flusher::flush_here`: the flush the acks of these commits wait for, made here instead
//! of on the flusher thread, which a waiter would have to wake and be woken by) and answers each
//! actor with its own result. Batches form by themselves: the commits that arrive while one batch
//! is written and flushed are the next batch, so a lone commit is written at once and a busy
//! daemon writes large batches. With `daemon.min_commit_interval_ms` set, a transaction starts at
//! most once per that interval (group commit, as Kafka's `linger.ms` or PostgreSQL's
//! `commit_delay`): at a steady pace, where each commit would otherwise find the committer idle and
//! go alone, the commits of an interval share one transaction and one flush, each of which wakes
//! sled's I/O pool (seven threads per log buffer sealed) and the threads answered. A commit after a
//! pause longer than the interval still goes at once. It trades latency for CPU
//! (docs/BENCHMARKS.md); off by default.
//!
//! A transaction writes the commits to the commit log (`log.rs`); between transactions, and every
//! [`APPLY_CHECK`] when idle, the thread applies the logged commits to the trees once they are due
//! (`SledStore::apply_if_due`), off the answers' way.
//!
//! Nothing is lost or applied twice when something fails: a batch that panics or fails answers
//! each of its commits with an error (the event is retried; if its commit was written, the retry
//! finds its idempotency key, and the actor's next commit finds the moved version).

use super::{Encoded, SledStore};
use crate::telemetry::{STORE_COMMITTED_EVENTS, STORE_TRANSACTIONS};
use aerostream_actors::ports::{CommitFuture, CommitResult, OwnedCommit, StoreError};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Events written in one transaction at most (a commit may hold several): bounds the time the
/// other writers of the store (imports, the report actor, eviction) wait for sled's lock, and the
/// memory a transaction takes.
const MAX_BATCH: usize = 512;

/// How often an idle committer looks whether logged commits are due to be applied.
const APPLY_CHECK: Duration = Duration::from_millis(25);

type Answer = oneshot::Sender<Vec<Result<CommitResult, StoreError>>>;

/// One actor's commits, in order, their values encoded by the actor's thread, and where their
/// answers go.
struct Job {
    commits: Vec<OwnedCommit>,
    encoded: Vec<Result<Encoded, StoreError>>,
    answer: Answer,
}

/// The handle the store keeps: where commits are handed over.
pub struct Committer {
    jobs: mpsc::Sender<Job>,
    /// Transactions written so far (read by tests; the metric counts them for everyone else).
    #[cfg_attr(not(test), allow(dead_code))]
    transactions: Arc<AtomicU64>,
}

impl Committer {
    /// Transactions written so far.
    #[cfg(test)]
    pub fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }

    /// Queues `commits` (with their values, `encoded`) for the next batch; the future resolves
    /// with their results once written.
    pub fn submit(
        &self,
        commits: Vec<OwnedCommit>,
        encoded: Vec<Result<Encoded, StoreError>>,
    ) -> CommitFuture {
        let n = commits.len();
        let (answer, answered) = oneshot::channel();
        let queued = self.jobs.send(Job {
            commits,
            encoded,
            answer,
        });
        Box::pin(async move {
            let failed = |why: &str| vec![Err(StoreError::Internal(why.into())); n];
            if queued.is_err() {
                return failed("the committer has stopped");
            }
            answered
                .await
                .unwrap_or_else(|_| failed("the committer dropped a commit unanswered"))
        })
    }
}

/// Starts the committer thread of `store`: from now on its `commit_batched` goes through it,
/// one transaction at most every `min_interval`. The thread ends once the store is dropped.
/// Calling it again does nothing.
pub(super) fn start(store: &Arc<SledStore>, min_interval: Duration) -> std::io::Result<()> {
    let (jobs, queue) = mpsc::channel();
    let transactions = Arc::new(AtomicU64::new(0));
    let committer = Committer {
        jobs,
        transactions: transactions.clone(),
    };
    if store.committer.set(committer).is_err() {
        return Ok(());
    }
    let store = Arc::downgrade(store);
    std::thread::Builder::new()
        .name("committer".into())
        .spawn(move || run(store, queue, min_interval, &transactions))?;
    Ok(())
}

fn run(store: Weak<SledStore>, queue: mpsc::Receiver<Job>, min_interval: Duration, transactions: &AtomicU64) {
    // The store holds the sending side, so `recv` fails once the store is gone.
    let events = |commits: &[OwnedCommit]| commits.iter().map(|c| c.earlier.len() + 1).sum::<usize>();
    let mut last_start: Option<Instant> = None;
    loop {
        let first = match queue.recv_timeout(APPLY_CHECK) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                match store.upgrade() {
                    Some(store) => store.apply_if_due(),
                    None => return,
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        // The commits that arrive until the interval since the last transaction has passed join
        // this one.
        if let Some(wait) = last_start.and_then(|at| min_interval.checked_sub(at.elapsed())) {
            std::thread::sleep(wait);
        }
        last_start = Some(Instant::now());
        let mut size = events(&first.commits);
        let mut batch = vec![first];
        while size < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => {
                    size += events(&job.commits);
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let Some(store) = store.upgrade() else {
            return;
        };
        let encoded: Vec<_> = batch.iter_mut().flat_map(|job| job.encoded.drain(..)).collect();
        let commits: Vec<_> = batch
            .iter()
            .flat_map(|job| job.commits.iter().map(OwnedCommit::borrow))
            .collect();
        let results = catch_unwind(AssertUnwindSafe(|| store.commit_encoded(&commits, &encoded)));
        drop(commits);
        match results {
            Ok(results) => {
                // Durable before the answers leave: the waiters' own flush finds it done, with no
                // wake-up of the flusher thread and back on an event's way to its ack.
                store.flusher.flush_here();
                transactions.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(STORE_TRANSACTIONS).increment(1);
                metrics::counter!(STORE_COMMITTED_EVENTS).increment(size as u64);
                let mut results = results.into_iter();
                for job in batch {
                    let _ = job
                        .answer
                        .send(results.by_ref().take(job.commits.len()).collect());
                }
                // Off every answer's way: the logged commits applied to the trees when due.
                store.apply_if_due();
            }
            Err(_) => {
                tracing::error!(
                    commits = size,
                    "A commit batch panicked; its events will be retried."
                );
                for job in batch {
                    let panicked = StoreError::Internal("the commit batch panicked".into());
                    let _ = job.answer.send(vec![Err(panicked); job.commits.len()]);
                }
            }
        }
    }
}
