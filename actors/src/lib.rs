//! aerostream's domain logic and actors. No I/O: storage, clocks and gateways come in through ports.
//!
//! # Layout
//! - [`money`]: `Dinero`, exact amounts in minor units and the supported currencies.
//! - [`events`]: the envelope and typed input events; aggregate keys.
//! - [`aggregate`]: the `Aggregate` trait, a pure `decide(state, event) -> Decision | Rejection`.
//! - [`campaign`], [`payment`]: the two aggregates and their rules (SPEC §2).
//! - [`output`]: output events (alerts, commissions, payment outcomes) with derived ids.
//! - [`ledger`]: an affiliate's commission ledger, a projection of output events.
//! - [`outcome`]: applied / duplicate / redelivered / rejected, and the rejection reasons.
//! - [`ports`]: the state store, observer and clock traits the daemon implements.
//! - [`gateway`]: the payment gateway port and its simulated adapter.
//! - [`actor`]: `AggregateActor<A>`, supervised, committing each event atomically.
//! - [`registry`]: finds or starts actors by aggregate key and routes events to them.
//! - [`snapshot`]: full-state snapshots with checksums, the journal behind them, retention.
//! - [`readmodel`]: the report read model, counters moved by each commit.
//! - [`report`]: report documents v1 and v2 built from the read model.
//! - [`report_actor`]: the report service's actor: active version, switches, report requests.

pub mod actor;
pub mod aggregate;
pub mod campaign;
pub mod events;
pub mod gateway;
pub mod ledger;
pub mod money;
pub mod outcome;
pub mod output;
pub mod payment;
pub mod ports;
pub mod readmodel;
pub mod registry;
pub mod report;
pub mod report_actor;
pub mod snapshot;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

pub use actor::{ActorEnv, ApplyError};
pub use aggregate::{Aggregate, Decision};
pub use campaign::{Campaign, CampaignStatus};
pub use events::{
    AggregateKey, AggregateKind, CampaignEvent, DeliveryId, Envelope, Event, Incoming, PaymentEvent,
    PaymentStatus, ReportEvent, ReportVersion,
};
pub use ledger::CommissionLedger;
pub use money::{Currency, Money};
pub use outcome::{Outcome, RejectReason, Rejection};
pub use output::{OutputBody, OutputEvent};
pub use payment::Payment;
pub use registry::Registry;
