//! The payment gateway port (`PasarelaDePagos`), its simulated adapter, and the retry policy.
//!
//! A `PagoSolicitado` asks aerostream to charge a payment: the payment aggregate emits a
//! [`ChargeRequested`](crate::output::OutputBody::ChargeRequested) effect, the daemon's gateway
//! worker charges through this port (retrying unavailability with backoff) and reports the result
//! as a `PagoProcesado`. The simulated adapter answers from a hash of (seed, payment id, attempt),
//! so a run is reproducible, the generator can predict every outcome, and a repeated charge of the
//! same payment gets the same answer: it never charges twice.

use crate::events::{processed_idempotency_key, Envelope, Event, PaymentEvent, PaymentStatus};
use crate::money::Money;
use crate::payment::Payment;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// A payment to charge, committed together with the request that asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub payment_id: String,
    pub affiliate_id: String,
    pub amount: Money,
    /// The `PagoSolicitado` that asked for it.
    pub request_id: String,
    pub request_time_ms: i64,
    pub correlation_id: Option<String>,
    /// The input partition of the request ([`crate::Incoming::partition`]): the gateway's result
    /// is committed to the same changelog partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
}

/// Source of the `PagoProcesado` events the gateway worker reports.
pub const GATEWAY_SOURCE: &str = "aerostream-gateway";

impl Charge {
    pub fn requested_by(payment: &Payment, request: &Envelope) -> Charge {
        Charge {
            payment_id: payment.id.clone(),
            affiliate_id: payment.affiliate_id.clone(),
            amount: payment.amount,
            request_id: request.id.clone(),
            request_time_ms: request.time_ms,
            correlation_id: request.correlation_id.clone(),
            partition: None,
        }
    }

    pub fn request(&self, attempt: u32) -> ChargeRequest {
        ChargeRequest {
            payment_id: self.payment_id.clone(),
            amount: self.amount,
            attempt,
        }
    }

    /// The `PagoProcesado` that reports `charged`: its envelope (id derived from the request, so a
    /// repeat after a crash is the same event), idempotency key and body.
    pub fn processed(&self, charged: Charged) -> (Envelope, String, Event) {
        let name = format!("{}/gateway", self.request_id);
        let envelope = Envelope {
            id: uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string(),
            event_type: "PagoProcesado".into(),
            source: GATEWAY_SOURCE.into(),
            time_ms: self.request_time_ms,
            subject: Some(self.payment_id.clone()),
            correlation_id: self.correlation_id.clone(),
            causation_id: Some(self.request_id.clone()),
            schema_version: "v1".into(),
        };
        let key = processed_idempotency_key(&self.payment_id, charged.status, &self.affiliate_id);
        let event = Event::Payment(PaymentEvent::Processed {
            payment_id: self.payment_id.clone(),
            affiliate_id: self.affiliate_id.clone(),
            amount: self.amount,
            status: charged.status,
            declared_hash: String::new(),
            attempts: charged.attempts,
        });
        (envelope, key, event)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    /// Also the charge's idempotency key at the gateway.
    pub payment_id: String,
    pub amount: Money,
    /// 1 for the first attempt.
    pub attempt: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChargeResult {
    Approved,
    Declined,
}

impl ChargeResult {
    /// The payment status the result leads to.
    pub fn status(self) -> PaymentStatus {
        match self {
            ChargeResult::Approved => PaymentStatus::Succeeded,
            ChargeResult::Declined => PaymentStatus::Failed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The call failed before an answer (timeout, 5xx): retry it.
    #[error("payment gateway unavailable")]
    Unavailable,
}

/// A payment gateway. Charging the same payment id again returns the first answer without
/// charging again (gateways key charges by an idempotency key).
pub trait PaymentGateway: Send + Sync + 'static {
    fn charge(&self, request: &ChargeRequest) -> Result<ChargeResult, GatewayError>;

    /// How long a call takes; the caller waits it out.
    fn latency(&self) -> Duration;
}

/// How a charge is retried while the gateway is unavailable: the daemon waits between attempts
/// by its one backoff (`aerostream::backoff`), doubling from `initial_backoff` up to `max_backoff`,
/// jittered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// The outcome of charging one payment under a retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charged {
    pub status: PaymentStatus,
    /// Attempts made, the successful one included.
    pub attempts: u32,
}

impl Charged {
    /// After `attempts` attempts: the result, or FALLIDO when the gateway stayed unavailable.
    pub fn from_attempts(attempts: u32, result: Option<ChargeResult>) -> Charged {
        Charged {
            status: result.map_or(PaymentStatus::Failed, ChargeResult::status),
            attempts,
        }
    }
}

/// Simulated gateway with a configurable latency, unavailability and decline rate.
#[derive(Debug, Clone)]
pub struct SimulatedGateway {
    pub latency: Duration,
    /// Fraction of attempts that fail as unavailable (retried), 0.0 to 1.0.
    pub failure_rate: f64,
    /// Fraction of payments declined (FALLIDO), 0.0 to 1.0.
    pub decline_rate: f64,
    pub seed: u64,
}

impl SimulatedGateway {
    /// A reproducible draw in [0, 1) for (`payment_id`, `salt`).
    fn draw(&self, payment_id: &str, salt: u32) -> f64 {
        let digest = Sha256::new()
            .chain_update(self.seed.to_be_bytes())
            .chain_update(payment_id.as_bytes())
            .chain_update(salt.to_be_bytes())
            .finalize();
        let bits = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        (bits >> 11) as f64 / (1u64 << 53) as f64
    }

    /// What charging `payment_id` under `policy` ends in: the worker's behaviour, for whoever
    /// must predict it (the traffic generator).
    pub fn predict(&self, payment_id: &str, policy: &RetryPolicy) -> Charged {
        for attempt in 1..=policy.max_attempts.max(1) {
            if self.draw(payment_id, attempt) >= self.failure_rate {
                let result = self.answer(payment_id);
                return Charged::from_attempts(attempt, Some(result));
            }
        }
        Charged::from_attempts(policy.max_attempts.max(1), None)
    }

    fn answer(&self, payment_id: &str) -> ChargeResult {
        // Salt 0 is never an attempt number: the decline draw is independent of retries.
        if self.draw(payment_id, 0) < self.decline_rate {
            ChargeResult::Declined
        } else {
            ChargeResult::Approved
        }
    }
}

impl PaymentGateway for SimulatedGateway {
    fn charge(&self, request: &ChargeRequest) -> Result<ChargeResult, GatewayError> {
        if self.draw(&request.payment_id, request.attempt) < self.failure_rate {
            return Err(GatewayError::Unavailable);
        }
        Ok(self.answer(&request.payment_id))
    }

    fn latency(&self) -> Duration {
        self.latency
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::usd;

    fn request(i: u32, attempt: u32) -> ChargeRequest {
        ChargeRequest {
            payment_id: format!("p{i}"),
            amount: usd(100),
            attempt,
        }
    }

    fn gateway(failure_rate: f64, decline_rate: f64) -> SimulatedGateway {
        SimulatedGateway {
            latency: Duration::from_millis(3),
            failure_rate,
            decline_rate,
            seed: 7,
        }
    }

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(25),
    };

    #[test]
    fn rates_are_respected_and_answers_are_reproducible() {
        let gw = gateway(0.25, 0.1);
        let unavailable = (0..4_000).filter(|i| gw.charge(&request(*i, 1)).is_err()).count();
        assert!(
            (800..1_200).contains(&unavailable),
            "unavailable {unavailable} of 4000"
        );
        let declined = (0..4_000)
            .filter_map(|i| gw.charge(&request(i, 1)).ok())
            .filter(|r| *r == ChargeResult::Declined)
            .count();
        assert!((200..400).contains(&declined), "declined {declined}");
        assert_eq!(gw.charge(&request(3, 1)), gw.charge(&request(3, 1)));
    }

    #[test]
    fn a_payment_gets_one_answer_whatever_the_attempt() {
        let gw = gateway(0.5, 0.5);
        for i in 0..200 {
            let answers: Vec<_> = (1..20).filter_map(|a| gw.charge(&request(i, a)).ok()).collect();
            assert!(
                answers.windows(2).all(|w| w[0] == w[1]),
                "payment {i}: {answers:?}"
            );
        }
    }

    #[test]
    fn prediction_matches_charging_attempt_by_attempt() {
        let gw = gateway(0.6, 0.2);
        for i in 0..500 {
            let mut outcome = None;
            for attempt in 1..=POLICY.max_attempts {
                if let Ok(result) = gw.charge(&request(i, attempt)) {
                    outcome = Some(Charged::from_attempts(attempt, Some(result)));
                    break;
                }
            }
            let outcome = outcome.unwrap_or(Charged::from_attempts(POLICY.max_attempts, None));
            assert_eq!(gw.predict(&format!("p{i}"), &POLICY), outcome);
        }
    }
}
