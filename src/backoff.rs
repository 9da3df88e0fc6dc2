//! The one backoff of the daemon: every retry loop (connecting to the broker, an actor that
//! crashed, a message whose processing failed, the outbox, the payment gateway) waits by it.
//!
//! Exponential with "equal jitter": the wait after failure `n` is drawn from
//! `[d/2, d]` where `d = initial · 2^(n-1)`, capped at `max`. Half of it is fixed, so a retry
//! never comes back at once; the other half is random, so the messages, consumers or daemons that
//! failed together do not all retry together.

use rand::Rng;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The longest wait after the first failure.
    pub initial: Duration,
    /// The longest wait at all.
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max }
    }

    /// The wait before retrying after the `failures`-th failure in a row (from 1), jittered.
    pub fn delay(&self, failures: u32) -> Duration {
        let ceiling = self.ceiling(failures);
        let half = ceiling / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=ceiling - half)
    }

    /// The wait after the `failures`-th failure before jitter: `initial · 2^(failures-1)`, capped.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial
            .checked_mul(1 << doublings)
            .map_or(self.max, |wait| wait.min(self.max))
    }

    /// Waits [`delay`](Self::delay)`(failures)`; false, at once, when `shutdown` is (or becomes)
    /// true or its sender is gone.
    pub async fn wait(&self, failures: u32, shutdown: &mut watch::Receiver<bool>) -> bool {
        if *shutdown.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(self.delay(failures)) => true,
            _ = shutdown.wait_for(|stop| *stop) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1_000));

    #[test]
    fn the_ceiling_doubles_up_to_the_cap_and_never_overflows() {
        let ceilings: Vec<u64> = (1..=6).map(|n| BACKOFF.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(BACKOFF.ceiling(0), Duration::from_millis(100));
        assert_eq!(BACKOFF.ceiling(u32::MAX), Duration::from_millis(1_000));
        let huge = Backoff::new(Duration::from_secs(u64::MAX / 4), Duration::MAX);
        assert_eq!(huge.ceiling(40), Duration::MAX, "an overflow is capped");
    }

    #[test]
    fn the_delay_is_jittered_between_half_the_ceiling_and_the_ceiling() {
        for failures in 1..=6 {
            let ceiling = BACKOFF.ceiling(failures);
            let delays: Vec<Duration> = (0..200).map(|_| BACKOFF.delay(failures)).collect();
            assert!(
                delays.iter().all(|d| *d >= ceiling / 2 && *d <= ceiling),
                "after {failures} failures: {delays:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
            assert!(
                distinct.len() > 100,
                "jittered: {} distinct of 200",
                distinct.len()
            );
        }
    }

    #[tokio::test]
    async fn a_wait_ends_at_once_on_shutdown() {
        let long = Backoff::new(Duration::from_secs(3_600), Duration::from_secs(3_600));
        let (stop, mut shutdown) = watch::channel(false);
        let waiting = tokio::spawn(async move { long.wait(1, &mut shutdown).await });
        stop.send(true).unwrap();
        assert!(!waiting.await.unwrap(), "shutdown ends the wait");

        let (_stop, mut stopped) = watch::channel(true);
        assert!(!long.wait(1, &mut stopped).await, "already shutting down");
        let (gone, mut orphan) = watch::channel(false);
        drop(gone);
        assert!(!long.wait(1, &mut orphan).await, "the sender is gone");

        let short = Backoff::new(Duration::from_millis(1), Duration::from_millis(1));
        let (_stop, mut running) = watch::channel(false);
        assert!(short.wait(1, &mut running).await, "waited it out");
    }
}
