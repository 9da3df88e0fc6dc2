//! The payment gateway port (`PasarelaDePagos`) and a simulated adapter.
//!
//! The simulated adapter decides success or failure from a hash of (seed, payment id, attempt), so a
//! run is reproducible and a retry of the same attempt gets the same answer: it never double-charges.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    pub payment_id: String,
    pub amount: crate::money::Money,
    /// 1 for the first attempt; a retry of the same attempt is answered the same way.
    pub attempt: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChargeResult {
    Approved,
    Declined,
}

/// A payment gateway. `latency` is how long the real call would take: the caller waits it out.
pub trait PaymentGateway: Send + Sync + 'static {
    fn charge(&self, request: &ChargeRequest) -> (ChargeResult, Duration);
}

/// Simulated gateway with a configurable latency and failure rate.
#[derive(Debug, Clone)]
pub struct SimulatedGateway {
    pub latency: Duration,
    /// Fraction of attempts declined, 0.0 to 1.0.
    pub failure_rate: f64,
    pub seed: u64,
}

impl PaymentGateway for SimulatedGateway {
    fn charge(&self, request: &ChargeRequest) -> (ChargeResult, Duration) {
        let digest = Sha256::new()
            .chain_update(self.seed.to_be_bytes())
            .chain_update(request.payment_id.as_bytes())
            .chain_update(request.attempt.to_be_bytes())
            .finalize();
        let draw = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
        let result = if draw < self.failure_rate {
            ChargeResult::Declined
        } else {
            ChargeResult::Approved
        };
        (result, self.latency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::usd;

    fn request(i: u32) -> ChargeRequest {
        ChargeRequest {
            payment_id: format!("p{i}"),
            amount: usd(100),
            attempt: 1,
        }
    }

    #[test]
    fn failure_rate_is_respected_and_answers_are_reproducible() {
        let gw = SimulatedGateway {
            latency: Duration::from_millis(3),
            failure_rate: 0.25,
            seed: 7,
        };
        let declined = (0..4_000)
            .filter(|i| gw.charge(&request(*i)).0 == ChargeResult::Declined)
            .count();
        assert!((800..1_200).contains(&declined), "declined {declined} of 4000");
        assert_eq!(gw.charge(&request(3)), gw.charge(&request(3)));
        assert_eq!(gw.charge(&request(3)).1, Duration::from_millis(3));
    }

    #[test]
    fn extreme_rates() {
        let never = SimulatedGateway {
            latency: Duration::ZERO,
            failure_rate: 0.0,
            seed: 1,
        };
        let always = SimulatedGateway {
            failure_rate: 1.0,
            ..never.clone()
        };
        assert!((0..100).all(|i| never.charge(&request(i)).0 == ChargeResult::Approved));
        assert!((0..100).all(|i| always.charge(&request(i)).0 == ChargeResult::Declined));
    }
}
