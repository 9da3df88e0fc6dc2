//! The gateway worker: charges the payments that a `PagoSolicitado` asked for, through the
//! `PaymentGateway` port, and applies each result as a `PagoProcesado` through the actors — the
//! same exactly-once path as a consumed event (idempotency key, atomic commit, outbox).
//!
//! A charge is recorded in the same commit as the request. It is deleted only after its
//! `PagoProcesado` is durable and published, so a crash in between charges again: the gateway answers a repeated
//! charge of a payment with its first answer (never charging twice), and the repeated
//! `PagoProcesado` is recognised by its idempotency key.

use crate::backoff::Backoff;
use crate::codec::decode::content_hash;
use crate::store::SledStore;
use crate::telemetry::{GATEWAY_CALLS, GATEWAY_PENDING_CHARGES};
use aerostream_actors::gateway::{Charge, ChargeResult, Charged, GatewayError, PaymentGateway, RetryPolicy};
use aerostream_actors::{Incoming, Outcome, Registry};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Per-payment log lines, each let through once per period with a count of those held back.
mod repeated {
    use crate::logging::{RateLimit, REPEATED_EVERY};
    pub static NOT_APPLIED: RateLimit = RateLimit::new(REPEATED_EVERY);
    pub static RETRYING: RateLimit = RateLimit::new(REPEATED_EVERY);
    pub static UNAVAILABLE: RateLimit = RateLimit::new(REPEATED_EVERY);
}

/// How often the worker looks for new charges when there are none.
const IDLE_POLL: Duration = Duration::from_millis(20);
/// Between rounds in which a charge could not be settled (its result not applied or not durable).
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// What the worker needs.
pub struct Worker {
    pub store: Arc<SledStore>,
    pub registry: Arc<Registry>,
    pub gateway: Arc<dyn PaymentGateway>,
    pub policy: RetryPolicy,
    /// Payments charged at once.
    pub concurrency: usize,
}

impl Worker {
    /// Charges pending payments until shutdown.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        // Rounds in a row in which some charge was not settled.
        let mut failures = 0;
        loop {
            // Payments withdrawn at start wait for the changelog to restore them (`SledStore::
            // withdraw_unpublished`): a result applied before would be decided on a state about
            // to be replaced.
            let batch = match self.store.pending_charges(self.concurrency) {
                Ok(_) if self.store.any_unconfirmed() => Vec::new(),
                Ok(batch) => batch,
                Err(error) => {
                    tracing::error!(error = %error, "Cannot read pending charges.");
                    Vec::new()
                }
            };
            metrics::gauge!(GATEWAY_PENDING_CHARGES).set(batch.len() as f64);
            let work = async {
                if batch.is_empty() {
                    tokio::time::sleep(IDLE_POLL).await;
                    true
                } else {
                    let settled =
                        futures::future::join_all(batch.iter().map(|charge| self.settle(charge))).await;
                    settled.into_iter().all(|settled| settled)
                }
            };
            let settled = tokio::select! {
                settled = work => settled,
                _ = shutdown.changed() => return,
            };
            if settled {
                failures = 0;
            } else {
                failures += 1;
                if !BACKOFF.wait(failures, &mut shutdown).await {
                    return;
                }
            }
        }
    }

    /// Charges one payment and applies the result; on failure the charge stays pending (false).
    async fn settle(&self, charge: &Charge) -> bool {
        let charged = self.charge(charge).await;
        let (envelope, idempotency_key, event) = charge.processed(charged);
        let incoming = Incoming {
            content_hash: content_hash(&event),
            idempotency_key,
            envelope,
            event,
            delivery: None,
            partition: charge.partition,
        };
        let applied = match self.registry.apply(Arc::new(incoming)).await {
            Ok(Outcome::Applied { .. } | Outcome::Duplicate | Outcome::Redelivered) => true,
            Ok(Outcome::Rejected(rejection)) => {
                // The payment was settled otherwise meanwhile (a partner's PagoProcesado).
                crate::limited!(repeated::NOT_APPLIED, warn, payment = %charge.payment_id, reason = rejection.reason.as_str(), detail = %rejection.detail, "Charge result not applied.");
                true
            }
            Err(error) => {
                crate::limited!(repeated::RETRYING, warn, payment = %charge.payment_id, error = %error, "Charge result not applied; retrying.");
                false
            }
        };
        if !applied {
            return false;
        }
        // Done once the result is durable and published, its changelog record included: a daemon
        // that crashes before then withdraws the result at restart (`SledStore::
        // withdraw_unpublished`) and must find the charge still pending, to apply it again (unless
        // the request was withdrawn too: its charge comes back with it).
        let published_through = self.store.outbox_high_water();
        let done = async {
            self.store.flush().await?;
            self.store.wait_published(published_through).await;
            self.store.charge_done(&charge.payment_id)
        };
        match done.await {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(payment = %charge.payment_id, error = %error, "Cannot settle the charge; retrying.");
                false
            }
        }
    }

    /// Calls the gateway until it answers or the attempts run out.
    async fn charge(&self, charge: &Charge) -> Charged {
        let backoff = Backoff::new(self.policy.initial_backoff, self.policy.max_backoff);
        let mut attempt = 1;
        loop {
            tokio::time::sleep(self.gateway.latency()).await;
            let answer = self.gateway.charge(&charge.request(attempt));
            let label = match answer {
                Ok(ChargeResult::Approved) => "approved",
                Ok(ChargeResult::Declined) => "declined",
                Err(GatewayError::Unavailable) => "unavailable",
            };
            metrics::counter!(GATEWAY_CALLS, "result" => label).increment(1);
            match answer {
                Ok(result) => return Charged::from_attempts(attempt, Some(result)),
                Err(_) if attempt >= self.policy.max_attempts => {
                    crate::limited!(repeated::UNAVAILABLE, warn, payment = %charge.payment_id, attempts = attempt, "Gateway unavailable; payment failed.");
                    return Charged::from_attempts(attempt, None);
                }
                Err(_) => {
                    tokio::time::sleep(backoff.delay(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }
}
