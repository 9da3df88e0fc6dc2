//! The payment aggregate (`Pago`): PENDIENTE → PROCESANDO → EXITOSO | FALLIDO, never backwards.
//!
//! A late lower-rank event is recorded in the history but does not move the state back; a terminal
//! payment is never reprocessed, and a second, different terminal outcome is rejected. A
//! `PagoSolicitado` that creates the payment asks for a charge through the gateway (see
//! [`crate::gateway`]); its result comes back as a `PagoProcesado`. The history
//! is kept sorted by (event time, event id) so it does not depend on arrival order.

use crate::aggregate::{Aggregate, Decision};
use crate::events::{AggregateKind, Envelope, Event, PaymentEvent, PaymentStatus};
use crate::gateway::Charge;
use crate::money::Money;
use crate::outcome::{RejectReason, Rejection};
use crate::output::{OutputBody, OutputEvent};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub status: PaymentStatus,
    pub event_id: String,
    pub time_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub id: String,
    pub affiliate_id: String,
    pub amount: Money,
    pub status: PaymentStatus,
    /// Gateway attempts reported by the highest-rank event.
    pub attempts: u32,
    pub history: Vec<HistoryEntry>,
    /// Number of events applied to this payment.
    pub version: u64,
}

struct Fields<'a> {
    payment_id: &'a str,
    affiliate_id: &'a str,
    amount: Money,
    status: PaymentStatus,
    attempts: u32,
}

fn fields(event: &PaymentEvent) -> Fields<'_> {
    match event {
        PaymentEvent::Requested {
            payment_id,
            affiliate_id,
            amount,
        } => Fields {
            payment_id,
            affiliate_id,
            amount: *amount,
            status: PaymentStatus::Pending,
            attempts: 0,
        },
        PaymentEvent::Processed {
            payment_id,
            affiliate_id,
            amount,
            status,
            attempts,
            ..
        } => Fields {
            payment_id,
            affiliate_id,
            amount: *amount,
            status: *status,
            attempts: *attempts,
        },
    }
}

impl Payment {
    fn record(&mut self, status: PaymentStatus, envelope: &Envelope) {
        let entry = HistoryEntry {
            status,
            event_id: envelope.id.clone(),
            time_ms: envelope.time_ms,
        };
        let at = self
            .history
            .partition_point(|e| (e.time_ms, &e.event_id) < (entry.time_ms, &entry.event_id));
        self.history.insert(at, entry);
    }
}

fn outcome_output(payment: &Payment, envelope: &Envelope) -> Option<OutputEvent> {
    let (payment_id, affiliate_id, amount) =
        (payment.id.clone(), payment.affiliate_id.clone(), payment.amount);
    let body = match payment.status {
        PaymentStatus::Succeeded => OutputBody::PaymentSucceeded {
            payment_id,
            affiliate_id,
            amount,
        },
        PaymentStatus::Failed => OutputBody::PaymentFailed {
            payment_id,
            affiliate_id,
            amount,
        },
        PaymentStatus::Pending | PaymentStatus::Processing => return None,
    };
    Some(OutputEvent::derived(envelope, "outcome", body))
}

impl Aggregate for Payment {
    const KIND: AggregateKind = AggregateKind::Payment;
    type Event = PaymentEvent;

    fn version(&self) -> u64 {
        self.version
    }

    fn select(event: &Event) -> Option<&PaymentEvent> {
        match event {
            Event::Payment(e) => Some(e),
            Event::Campaign(_) | Event::Report(_) => None,
        }
    }

    fn read_model_changes(before: Option<&Self>, after: &Self) -> Vec<crate::readmodel::Change> {
        crate::readmodel::changes(before, after)
    }

    fn decide(
        current: Option<&Payment>,
        event: &PaymentEvent,
        envelope: &Envelope,
    ) -> Result<Decision<Payment>, Rejection> {
        let f = fields(event);
        let mut state = match current {
            None => Payment {
                id: f.payment_id.to_owned(),
                affiliate_id: f.affiliate_id.to_owned(),
                amount: f.amount,
                status: f.status,
                attempts: f.attempts,
                history: Vec::new(),
                version: 0,
            },
            Some(existing) => {
                if existing.amount != f.amount || existing.affiliate_id != f.affiliate_id {
                    return Err(Rejection::new(
                        RejectReason::AmountMismatch,
                        format!(
                            "payment {} is {} {} for {}, event says {} {} for {}",
                            existing.id,
                            existing.amount.amount_minor,
                            existing.amount.currency,
                            existing.affiliate_id,
                            f.amount.amount_minor,
                            f.amount.currency,
                            f.affiliate_id
                        ),
                    ));
                }
                if existing.status.is_terminal() && f.status.is_terminal() && existing.status != f.status {
                    return Err(Rejection::new(
                        RejectReason::PaymentAlreadyFinal,
                        format!(
                            "payment {} is already {}, not reprocessed as {}",
                            existing.id,
                            existing.status.wire_name(),
                            f.status.wire_name()
                        ),
                    ));
                }
                existing.clone()
            }
        };
        let advances = current.map_or(true, |c| f.status.rank() > c.status.rank());
        let mut outputs = Vec::new();
        if advances {
            state.status = f.status;
            state.attempts = f.attempts;
            outputs.extend(outcome_output(&state, envelope));
        }
        state.record(f.status, envelope);
        state.version += 1;
        // A request that creates the payment asks aerostream to charge it; a payment first seen
        // through PagoProcesado is processed elsewhere.
        let charges = match (current, event) {
            (None, PaymentEvent::Requested { .. }) => vec![Charge::requested_by(&state, envelope)],
            _ => Vec::new(),
        };
        Ok(Decision {
            state,
            outputs,
            charges,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{envelope_at, usd};

    fn processed(status: PaymentStatus) -> PaymentEvent {
        PaymentEvent::Processed {
            payment_id: "p1".into(),
            affiliate_id: "af".into(),
            amount: usd(1_000),
            status,
            declared_hash: String::new(),
            attempts: 1,
        }
    }

    fn requested() -> PaymentEvent {
        PaymentEvent::Requested {
            payment_id: "p1".into(),
            affiliate_id: "af".into(),
            amount: usd(1_000),
        }
    }

    #[test]
    fn moves_forward_and_emits_outcome_once() {
        let d1 = Payment::decide(None, &requested(), &envelope_at("a", 1)).unwrap();
        assert_eq!(d1.state.status, PaymentStatus::Pending);
        let d2 = Payment::decide(
            Some(&d1.state),
            &processed(PaymentStatus::Succeeded),
            &envelope_at("b", 2),
        )
        .unwrap();
        assert_eq!(d2.state.status, PaymentStatus::Succeeded);
        assert_eq!(d2.outputs.len(), 1);
        assert_eq!(d2.outputs[0].body.wire_type(), "PagoExitoso");
    }

    #[test]
    fn late_lower_rank_event_is_recorded_without_regress() {
        let d1 = Payment::decide(None, &processed(PaymentStatus::Failed), &envelope_at("b", 2)).unwrap();
        let d2 = Payment::decide(Some(&d1.state), &requested(), &envelope_at("a", 1)).unwrap();
        assert_eq!(d2.state.status, PaymentStatus::Failed);
        assert!(d2.outputs.is_empty());
        let ids: Vec<_> = d2.state.history.iter().map(|h| h.event_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn terminal_payment_is_not_reprocessed() {
        let d1 = Payment::decide(None, &processed(PaymentStatus::Succeeded), &envelope_at("a", 1)).unwrap();
        let err = Payment::decide(
            Some(&d1.state),
            &processed(PaymentStatus::Failed),
            &envelope_at("b", 2),
        )
        .unwrap_err();
        assert_eq!(err.reason, RejectReason::PaymentAlreadyFinal);
        let again = Payment::decide(
            Some(&d1.state),
            &processed(PaymentStatus::Succeeded),
            &envelope_at("c", 3),
        )
        .unwrap();
        assert!(
            again.outputs.is_empty(),
            "a terminal payment emits its outcome once"
        );
    }

    #[test]
    fn amount_mismatch_is_rejected() {
        let d1 = Payment::decide(None, &requested(), &envelope_at("a", 1)).unwrap();
        let other = PaymentEvent::Requested {
            payment_id: "p1".into(),
            affiliate_id: "af".into(),
            amount: usd(2_000),
        };
        let err = Payment::decide(Some(&d1.state), &other, &envelope_at("b", 2)).unwrap_err();
        assert_eq!(err.reason, RejectReason::AmountMismatch);
    }
}
