//! The flusher: one thread that makes the store's writes durable, for every waiter at once.
//!
//! Group commit without a lock per caller: a waiter asks for a flush and waits on a watch for the
//! durable watermark to pass the writes it made; the thread flushes whenever asked, each flush
//! covering every write made before it started, so the waiters that arrive during one flush share
//! the next. (Before it, every ack ran its own `spawn_blocking` flush behind a mutex: one flush
//! per three events and five thread switches per event.) The committer flushes on its own thread
//! after each transaction (`flush_here`), so the acks of its commits find them durable without
//! waking this thread; the thread serves every other writer. One flush runs at a time, so flushes
//! finish in the order they start, whichever thread runs them.

use aerostream_actors::ports::StoreError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use tokio::sync::watch;

/// What the flushes so far have achieved.
#[derive(Debug, Clone, Default)]
struct Flushed {
    /// Flushes finished, failed ones included (they finish in the order they start).
    attempts: u64,
    /// Writes known durable (a count of [`Flusher::wrote`]).
    durable: u64,
    /// Why the last flush failed; `None` after a success.
    error: Option<StoreError>,
}

struct Shared {
    /// Makes the store's writes durable; one flush runs at a time (`running`).
    flush: Box<dyn Fn() -> Result<(), StoreError> + Send + Sync>,
    running: Mutex<()>,
    /// Writes made so far.
    writes: AtomicU64,
    /// A flush is wanted; `closed` ends the thread.
    wanted: Mutex<Wanted>,
    ask: Condvar,
    flushed: watch::Sender<Flushed>,
}

#[derive(Default)]
struct Wanted {
    pending: bool,
    /// Flushes started so far.
    started: u64,
    closed: bool,
}

/// The store's handle on its flusher thread; dropping it ends the thread (and waits for it).
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Starts the thread; `flush` makes the store's writes durable (and may fail, as an fsync can).
    pub fn start(
        flush: impl Fn() -> Result<(), StoreError> + Send + Sync + 'static,
    ) -> std::io::Result<Flusher> {
        let shared = Arc::new(Shared {
            flush: Box::new(flush),
            running: Mutex::new(()),
            writes: AtomicU64::new(0),
            wanted: Mutex::new(Wanted::default()),
            ask: Condvar::new(),
            flushed: watch::Sender::new(Flushed::default()),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("flusher".into())
                .spawn(move || run(&shared))?
        };
        Ok(Flusher {
            shared,
            thread: Some(thread),
        })
    }

    /// Flushes on the calling thread now (the committer, after a transaction), covering every
    /// write counted before the call; nothing to do when those are durable already. A failure
    /// reaches the waiters as the flusher thread's would.
    pub fn flush_here(&self) {
        let wanted = self.shared.writes.load(Ordering::Acquire);
        if self.shared.flushed.borrow().durable < wanted {
            flush_once(&self.shared, |_| {});
        }
    }

    /// Counts a write: the next flush asked for must cover it.
    pub fn wrote(&self) {
        self.shared.writes.fetch_add(1, Ordering::AcqRel);
    }

    /// Resolves once every write counted before the call is durable, or with the error of a flush
    /// that started after the call.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let wanted = self.shared.writes.load(Ordering::Acquire);
        let mut flushed = self.shared.flushed.subscribe();
        if flushed.borrow_and_update().durable >= wanted {
            return Ok(());
        }
        // The next flush to start covers this call's writes (one running now may not).
        let covering = {
            let mut asked = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
            asked.pending = true;
            asked.started + 1
        };
        self.shared.ask.notify_one();
        let done = flushed
            .wait_for(|f| f.durable >= wanted || f.attempts >= covering)
            .await
            .map_err(|_| StoreError::Internal("the flusher has stopped".into()))?;
        match &done.error {
            _ if done.durable >= wanted => Ok(()),
            Some(error) => Err(error.clone()),
            None => Err(StoreError::Internal(
                "a flush ended without making the writes durable".into(),
            )),
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared
            .wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.ask.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(shared: &Shared) {
    loop {
        {
            let mut wanted = shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
            while !wanted.pending && !wanted.closed {
                wanted = shared.ask.wait(wanted).unwrap_or_else(|e| e.into_inner());
            }
            if wanted.closed {
                return;
            }
        }
        flush_once(shared, |wanted| wanted.pending = false);
    }
}

/// One flush, started (`start` marks it in `wanted`) and finished in turn with any other.
fn flush_once(shared: &Shared, start: impl FnOnce(&mut Wanted)) {
    let _turn = shared.running.lock().unwrap_or_else(|e| e.into_inner());
    {
        let mut wanted = shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
        start(&mut wanted);
        wanted.started += 1;
    }
    let target = shared.writes.load(Ordering::Acquire);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&shared.flush))
        .unwrap_or_else(|_| Err(StoreError::Internal("a flush panicked".into())));
    shared.flushed.send_modify(|flushed| {
        flushed.attempts += 1;
        match result {
            Ok(()) => {
                flushed.durable = flushed.durable.max(target);
                flushed.error = None;
            }
            Err(error) => flushed.error = Some(error),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A flusher whose flushes are counted and fail while `failing` is set.
    fn counting_flusher() -> (Flusher, Arc<AtomicBool>, Arc<AtomicU64>) {
        let failing = Arc::new(AtomicBool::new(false));
        let flushes = Arc::new(AtomicU64::new(0));
        let flusher = {
            let (failing, flushes) = (failing.clone(), flushes.clone());
            Flusher::start(move || {
                flushes.fetch_add(1, Ordering::SeqCst);
                match failing.load(Ordering::SeqCst) {
                    true => Err(StoreError::Unavailable("disk gone".into())),
                    false => Ok(()),
                }
            })
            .unwrap()
        };
        (flusher, failing, flushes)
    }

    #[tokio::test]
    async fn a_flush_covers_the_writes_before_it_and_a_failure_reaches_its_waiters() {
        let (flusher, failing, flushes) = counting_flusher();
        flusher.flush().await.unwrap();
        assert_eq!(
            flushes.load(Ordering::SeqCst),
            0,
            "nothing written: nothing to flush"
        );
        flusher.wrote();
        flusher.flush().await.unwrap();
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
        flusher.flush().await.unwrap();
        assert_eq!(flushes.load(Ordering::SeqCst), 1, "durable already");
        failing.store(true, Ordering::SeqCst);
        flusher.wrote();
        assert_eq!(
            flusher.flush().await,
            Err(StoreError::Unavailable("disk gone".into()))
        );
        failing.store(false, Ordering::SeqCst);
        flusher.flush().await.unwrap();
        // Many waiters at once share flushes.
        let before = flushes.load(Ordering::SeqCst);
        for _ in 0..50 {
            flusher.wrote();
        }
        let waits: Vec<_> = (0..50).map(|_| flusher.flush()).collect();
        for result in futures::future::join_all(waits).await {
            result.unwrap();
        }
        assert!(flushes.load(Ordering::SeqCst) - before <= 2);
    }

    #[tokio::test]
    async fn a_flush_on_the_writers_thread_spares_its_waiters_one_and_a_failure_still_reaches_them() {
        let (flusher, failing, flushes) = counting_flusher();
        flusher.wrote();
        flusher.flush_here();
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
        flusher.flush().await.unwrap();
        assert_eq!(
            flushes.load(Ordering::SeqCst),
            1,
            "durable already: no flush asked for"
        );
        flusher.flush_here();
        assert_eq!(
            flushes.load(Ordering::SeqCst),
            1,
            "nothing new written: nothing to flush"
        );
        failing.store(true, Ordering::SeqCst);
        flusher.wrote();
        flusher.flush_here();
        assert_eq!(
            flusher.flush().await,
            Err(StoreError::Unavailable("disk gone".into())),
            "the writes are not durable: the waiter's flush fails too"
        );
        failing.store(false, Ordering::SeqCst);
        flusher.flush().await.unwrap();
    }
}
