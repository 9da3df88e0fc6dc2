//! When a Failover input should ask the broker whether it is being starved, and when to believe
//! the answer (the decisions of `ingest`'s starvation watchdog, kept apart from the I/O).
//!
//! pulsar-lite can end a dispatch pass with permits and a backlog left and start no other until
//! something triggers one (a publish, a flow, a subscribe), while the `pulsar` client sends its
//! next flow only after half of its receive queue has arrived: both wait, and the input hears
//! nothing. Seen in a 100 000-event drain with the broker's debug log: 1 006 permits granted,
//! 454 messages sent, then no dispatch pass for that subscription until the watchdog subscribed
//! again, three times in one drain (docs/BENCHMARKS.md).
//!
//! An input that holds nothing and has heard nothing for [`QUIET`] looks (one `GetLastMessageId`
//! per partition); a partition with messages beyond the last one received makes it suspect, and
//! a second look at least [`CONFIRM_AFTER`] later, with still nothing received, confirms it: then
//! the input subscribes again. A broker that is only slow to dispatch a message published just
//! before the first look has sent it by the second. While idle and not starved, one look per
//! [`IDLE_LOOK_EVERY`].

use std::time::{Duration, Instant};

/// Silence (nothing held, nothing received) before the first look. A stall costs about this
/// much plus [`CONFIRM_AFTER`]; it cost up to 2 s with a 1 s threshold looked at once a second.
pub const QUIET: Duration = Duration::from_millis(250);
/// Between the look that raised a suspicion and the one that confirms it.
pub const CONFIRM_AFTER: Duration = Duration::from_millis(100);
/// Between looks while the input is idle and not starved.
pub const IDLE_LOOK_EVERY: Duration = Duration::from_secs(1);
/// How often the watchdog considers looking.
pub const TICK: Duration = Duration::from_millis(50);

/// What the watchdog should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Nothing.
    Wait,
    /// Ask the broker; a starved answer raises a suspicion.
    First,
    /// Ask the broker; a starved answer confirms the suspicion.
    Confirm,
}

#[derive(Debug, Default)]
pub struct Watchdog {
    looked_at: Option<Instant>,
    suspected_at: Option<Instant>,
}

impl Watchdog {
    /// Whether to look at `now`, for an input that holds nothing and last received at
    /// `quiet_since`.
    pub fn look(&mut self, now: Instant, quiet_since: Instant) -> Look {
        if now.saturating_duration_since(quiet_since) < QUIET {
            return Look::Wait;
        }
        // A suspicion stands only while nothing has arrived since it was raised.
        if let Some(at) = self.suspected_at.filter(|at| *at >= quiet_since) {
            if now.saturating_duration_since(at) < CONFIRM_AFTER {
                return Look::Wait;
            }
            self.looked_at = Some(now);
            return Look::Confirm;
        }
        self.suspected_at = None;
        // Spaced out only while nothing has arrived since the last look.
        if self
            .looked_at
            .is_some_and(|at| at >= quiet_since && now.saturating_duration_since(at) < IDLE_LOOK_EVERY)
        {
            return Look::Wait;
        }
        self.looked_at = Some(now);
        Look::First
    }

    /// The broker's answer to `look`, made at `now`: true when the input should subscribe again.
    pub fn answer(&mut self, look: Look, now: Instant, starved: bool) -> bool {
        match (look, starved) {
            (_, false) | (Look::Wait, true) => {
                self.suspected_at = None;
                false
            }
            (Look::First, true) => {
                self.suspected_at = Some(now);
                false
            }
            (Look::Confirm, true) => {
                self.suspected_at = None;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_starved_input_subscribes_again_after_two_looks() {
        let start = Instant::now();
        let mut dog = Watchdog::default();
        assert_eq!(dog.look(start + ms(100), start), Look::Wait);
        let first = start + QUIET;
        assert_eq!(dog.look(first, start), Look::First);
        assert!(!dog.answer(Look::First, first, true));
        assert_eq!(dog.look(first + ms(50), start), Look::Wait);
        let second = first + CONFIRM_AFTER;
        assert_eq!(dog.look(second, start), Look::Confirm);
        assert!(dog.answer(Look::Confirm, second, true));
    }

    #[test]
    fn a_message_after_the_first_look_clears_the_suspicion() {
        let start = Instant::now();
        let mut dog = Watchdog::default();
        let first = start + QUIET;
        assert_eq!(dog.look(first, start), Look::First);
        assert!(!dog.answer(Look::First, first, true));
        // A message arrived after the look: the input is quiet again from then on, and a new
        // silence is looked at as soon as it is long enough, as a first look.
        let arrived = first + ms(20);
        assert_eq!(dog.look(arrived + ms(100), arrived), Look::Wait);
        assert_eq!(dog.look(arrived + QUIET, arrived), Look::First);
    }

    #[test]
    fn a_broker_that_answers_not_starved_is_asked_once_a_second_while_idle() {
        let start = Instant::now();
        let mut dog = Watchdog::default();
        let first = start + QUIET;
        assert_eq!(dog.look(first, start), Look::First);
        assert!(!dog.answer(Look::First, first, false));
        assert_eq!(dog.look(first + CONFIRM_AFTER, start), Look::Wait);
        assert_eq!(dog.look(first + IDLE_LOOK_EVERY - ms(1), start), Look::Wait);
        assert_eq!(dog.look(first + IDLE_LOOK_EVERY, start), Look::First);
    }

    #[test]
    fn a_confirmation_that_finds_the_input_fed_does_not_resubscribe() {
        let start = Instant::now();
        let mut dog = Watchdog::default();
        let first = start + QUIET;
        dog.look(first, start);
        dog.answer(Look::First, first, true);
        let second = first + CONFIRM_AFTER;
        assert_eq!(dog.look(second, start), Look::Confirm);
        assert!(!dog.answer(Look::Confirm, second, false));
        assert_eq!(dog.look(second + CONFIRM_AFTER, start), Look::Wait);
    }
}
