//! The report service: one supervised actor that answers report queries in the active version,
//! switches versions, and answers `ReporteSolicitado` events with `ReporteGenerado` output events.
//!
//! Everything goes through its mailbox in order, so a query that arrived before a switch is
//! answered in the old version and every query after it in the new one; nothing waits for a
//! restart. A switch is an event like any other (from the control topic or `PUT
//! /api/reports/version`): deduplicated, and committed with the service's state (the active
//! version), so the active version survives a restart.

use crate::actor::{guarded, seen_outcome, ActorEnv, Apply, ApplyError, Crash};
use crate::events::{
    AggregateKey, AggregateKind, Event, Incoming, ReportEvent, ReportVersion, REPORT_SERVICE_ID,
};
use crate::outcome::Outcome;
use crate::output::{OutputBody, OutputEvent};
use crate::ports::{Commit, CommitResult};
use crate::report::Report;
use actix::prelude::*;
use serde::{Deserialize, Serialize};

/// The report service's stored state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportService {
    pub active: ReportVersion,
    /// Version switches applied (a switch to the active version changes nothing and is not one).
    pub switches: u64,
    /// `ReporteSolicitado` events answered.
    pub answered: u64,
    /// Events applied: the service's version.
    pub version: u64,
}

/// The report in the active version.
#[derive(Debug, Message)]
#[rtype(result = "Result<Report, ApplyError>")]
pub struct Query;

/// Forget the state in memory: the stored one changed (a changelog import).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Reload;

/// The service's state: active version and counters.
#[derive(Debug, Message)]
#[rtype(result = "Result<ReportService, ApplyError>")]
pub struct Status;

pub struct ReportActor {
    key: AggregateKey,
    env: ActorEnv,
    /// `None` until loaded from the store; reset on restart.
    state: Option<ReportService>,
}

impl ReportActor {
    pub fn new(env: ActorEnv) -> Self {
        ReportActor {
            key: AggregateKey {
                kind: AggregateKind::Report,
                id: REPORT_SERVICE_ID.to_owned(),
            },
            env,
            state: None,
        }
    }

    fn loaded(&mut self) -> Result<&ReportService, ApplyError> {
        if self.state.is_none() {
            let service: ReportService = match self.env.store.load(&self.key)? {
                None => ReportService::default(),
                Some(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| ApplyError::CorruptState(self.key.clone(), e.to_string()))?,
            };
            self.env.observer.report_version(service.active);
            self.state = Some(service);
        }
        Ok(self.state.as_ref().expect("loaded above"))
    }

    fn report(&mut self, version: Option<ReportVersion>) -> Result<Report, ApplyError> {
        let version = version.unwrap_or(self.loaded()?.active);
        Ok(Report::build(version, &self.env.store.read_model()?))
    }

    fn apply(&mut self, incoming: &Incoming) -> Result<Outcome, ApplyError> {
        if let Some(seen) = self.env.store.seen(&incoming.idempotency_key)? {
            return Ok(seen_outcome(incoming, &seen));
        }
        let Event::Report(event) = &incoming.event else {
            unreachable!("event for {:?} routed to the report actor", incoming.aggregate())
        };
        let before = self.loaded()?.clone();
        let mut after = ReportService {
            version: before.version + 1,
            ..before.clone()
        };
        let mut outputs = Vec::new();
        match event {
            ReportEvent::Requested {
                request_id,
                version,
                parameters: _,
            } => {
                let report = self.report(*version)?;
                let report_json = serde_json::to_string(&report).expect("reports serialize to JSON");
                outputs.push(OutputEvent::derived(
                    &incoming.envelope,
                    "report",
                    OutputBody::ReportGenerated {
                        request_id: request_id.clone(),
                        version: report.version,
                        report_json,
                    },
                ));
                after.answered += 1;
            }
            ReportEvent::VersionChanged { version } => {
                if *version != before.active {
                    after.active = *version;
                    after.switches += 1;
                }
            }
        }
        let state = serde_json::to_vec(&after).expect("the report service state serializes");
        let commit = Commit {
            outbox: &outputs,
            delivery: incoming.delivery,
            ..Commit::of(
                &self.key,
                &state,
                after.version,
                &incoming.idempotency_key,
                &incoming.content_hash,
                self.env.clock.now_ms(),
            )
        };
        match self.env.store.commit(commit)? {
            CommitResult::Committed => {
                if after.active != before.active {
                    tracing::info!(from = %before.active, to = %after.active, "Report version switched.");
                    self.env.observer.report_switched(before.active, after.active);
                    self.env.observer.report_version(after.active);
                }
                self.state = Some(after);
                Ok(Outcome::Applied {
                    outputs: outputs.len(),
                })
            }
            CommitResult::AlreadySeen(seen) => Ok(seen_outcome(incoming, &seen)),
            CommitResult::Stale => {
                self.state = None;
                Err(ApplyError::Stale(self.key.clone()))
            }
        }
    }
}

impl Actor for ReportActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.env.mailbox_capacity);
        self.env.observer.started(AggregateKind::Report);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.env.observer.stopped(AggregateKind::Report);
    }
}

impl Supervised for ReportActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.state = None;
        self.env.observer.restarted(AggregateKind::Report);
    }
}

impl Handler<Apply> for ReportActor {
    type Result = Result<Outcome, ApplyError>;

    fn handle(&mut self, msg: Apply, ctx: &mut Context<Self>) -> Self::Result {
        let key = self.key.clone();
        guarded(&key, ctx, || self.apply(&msg.0))
    }
}

impl Handler<Query> for ReportActor {
    type Result = Result<Report, ApplyError>;

    fn handle(&mut self, _msg: Query, ctx: &mut Context<Self>) -> Self::Result {
        let key = self.key.clone();
        guarded(&key, ctx, || self.report(None))
    }
}

impl Handler<Status> for ReportActor {
    type Result = Result<ReportService, ApplyError>;

    fn handle(&mut self, _msg: Status, ctx: &mut Context<Self>) -> Self::Result {
        let key = self.key.clone();
        guarded(&key, ctx, || self.loaded().cloned())
    }
}

impl Handler<Reload> for ReportActor {
    type Result = ();

    fn handle(&mut self, _msg: Reload, _ctx: &mut Context<Self>) {
        self.state = None;
    }
}

impl Handler<Crash> for ReportActor {
    type Result = ();

    fn handle(&mut self, _msg: Crash, ctx: &mut Context<Self>) {
        let key = self.key.clone();
        let _ = guarded(&key, ctx, || -> Result<(), ApplyError> {
            panic!("chaos: kill-actor {key:?}")
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::DeliveryId;
    use crate::testkit::{envelope, MemoryStore};
    use std::sync::Arc;

    fn switch(id: &str, version: ReportVersion) -> Arc<Incoming> {
        let event = Event::Report(ReportEvent::VersionChanged { version });
        Arc::new(Incoming {
            envelope: envelope(id),
            idempotency_key: id.into(),
            content_hash: format!("{version}"),
            delivery: None,
            partition: None,
            event,
        })
    }

    #[actix::test]
    async fn a_switch_is_committed_and_survives_a_new_actor() {
        let store = Arc::new(MemoryStore::default());
        let addr = ReportActor::new(crate::testkit::env(store.clone())).start();
        let applied = addr.send(Apply(switch("s1", ReportVersion::V2))).await.unwrap();
        assert_eq!(applied, Ok(Outcome::Applied { outputs: 0 }));
        assert_eq!(
            addr.send(Query).await.unwrap().unwrap().version,
            ReportVersion::V2
        );
        let again = addr.send(Apply(switch("s1", ReportVersion::V2))).await.unwrap();
        assert_eq!(again, Ok(Outcome::Duplicate));

        let fresh = ReportActor::new(crate::testkit::env(store)).start();
        let status = fresh.send(Status).await.unwrap().unwrap();
        assert_eq!((status.active, status.switches), (ReportVersion::V2, 1));
    }

    #[actix::test]
    async fn the_same_message_again_is_a_redelivery_and_another_with_the_same_content_a_duplicate() {
        let store = Arc::new(MemoryStore::default());
        let addr = ReportActor::new(crate::testkit::env(store)).start();
        let from = |delivery: Option<u64>| {
            let mut incoming = (*switch("s1", ReportVersion::V2)).clone();
            incoming.delivery = delivery.map(DeliveryId);
            Arc::new(incoming)
        };
        let outcome = |incoming| async { addr.send(Apply(incoming)).await.unwrap() };
        assert_eq!(outcome(from(Some(7))).await, Ok(Outcome::Applied { outputs: 0 }));
        assert_eq!(outcome(from(Some(7))).await, Ok(Outcome::Redelivered));
        assert_eq!(outcome(from(Some(8))).await, Ok(Outcome::Duplicate));
        // A key recorded without a delivery (an event the daemon made, an older store) tells
        // nothing about the message: a duplicate.
        assert_eq!(outcome(from(None)).await, Ok(Outcome::Duplicate));
        let store = Arc::new(MemoryStore::default());
        let addr = ReportActor::new(crate::testkit::env(store)).start();
        addr.send(Apply(from(None))).await.unwrap().unwrap();
        assert_eq!(
            addr.send(Apply(from(Some(7)))).await.unwrap(),
            Ok(Outcome::Duplicate)
        );
    }

    #[actix::test]
    async fn a_request_is_answered_with_a_report_generated_event() {
        let store = Arc::new(MemoryStore::default());
        let addr = ReportActor::new(crate::testkit::env(store.clone())).start();
        let request = Arc::new(Incoming {
            envelope: envelope("r1"),
            idempotency_key: "r1".into(),
            content_hash: "h".into(),
            delivery: None,
            partition: None,
            event: Event::Report(ReportEvent::Requested {
                request_id: "req-1".into(),
                version: Some(ReportVersion::V2),
                parameters: Default::default(),
            }),
        });
        let applied = addr.send(Apply(request)).await.unwrap();
        assert_eq!(applied, Ok(Outcome::Applied { outputs: 1 }));
        let outbox = store.outbox();
        let OutputBody::ReportGenerated {
            request_id,
            version,
            report_json,
        } = &outbox[0].body
        else {
            panic!("expected ReporteGenerado, got {:?}", outbox[0].body)
        };
        assert_eq!((request_id.as_str(), *version), ("req-1", ReportVersion::V2));
        let report: serde_json::Value = serde_json::from_str(report_json).unwrap();
        assert!(report.get("breakdowns").is_some(), "{report}");
    }
}
