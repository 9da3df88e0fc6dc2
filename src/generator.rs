//! A reproducible stream of campaign, tracking and payment events, with duplicates and bounded
//! reordering, and the state it must produce.
//!
//! The expected state and output events are computed by applying each distinct event once, in
//! publish order, with the domain's own `decide`: what the daemon serves must equal it whatever
//! the broker redelivers. Reordering only swaps events that commute (different aggregates, two
//! tracking events of one campaign, two events of one payment), so the state does not depend on
//! it; which event crosses a budget threshold does, and a campaign's events are applied in publish
//! order. Conflicts (a reused idempotency key with other content) are a separate list, published
//! after the stream.

use crate::views::{CampaignView, LedgerView, PaymentView, StateView};
use aerostream_actors::campaign::Campaign;
use aerostream_actors::events::processed_idempotency_key;
use aerostream_actors::events::CommissionRule;
use aerostream_actors::gateway::{Charge, RetryPolicy, SimulatedGateway};
use aerostream_actors::{
    Aggregate, CampaignEvent, Envelope, Event, Money, Payment, PaymentEvent, PaymentStatus,
};
use aerostream_actors::{CommissionLedger, OutputEvent};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub campaigns: usize,
    pub payments: usize,
    /// Distinct events in all; never fewer than the lifecycle events need (3 per payment, 2 to 6 per
    /// campaign), the rest are tracking events.
    pub events: usize,
    /// Fraction of events sent a second time, 0.0 to 1.0.
    pub duplicate_fraction: f64,
    /// How far an event may move from its generated position.
    pub reorder_window: usize,
    /// Fraction of keyed payment events whose idempotency key is reused later by another event
    /// with other content (a conflict the daemon must dead-letter), 0.0 to 1.0.
    pub conflict_fraction: f64,
    /// The daemon's gateway (`[gateway]` in its config): half the payments are only requested
    /// (PagoSolicitado) and charged by the daemon, whose outcome this predicts; the other half are
    /// processed by partners, who report PagoProcesado events.
    pub gateway: SimulatedGateway,
    pub retry: RetryPolicy,
}

impl Options {
    /// Options whose gateway is the one `config` gives the daemon.
    pub fn for_daemon(config: &crate::config::Config) -> Options {
        Options {
            seed: 1,
            campaigns: 50,
            payments: 500,
            events: 10_000,
            duplicate_fraction: 0.05,
            reorder_window: 8,
            conflict_fraction: 0.0,
            gateway: config.gateway.simulated(),
            retry: config.gateway.retry_policy(),
        }
    }
}

/// Which input topic an event goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Input {
    Campaigns,
    Payments,
}

#[derive(Debug, Clone)]
pub struct Planned {
    pub input: Input,
    pub envelope: Envelope,
    pub idempotency_key: Option<String>,
    pub event: Event,
}

pub struct Plan {
    /// In the order to publish, duplicates included.
    pub stream: Vec<Planned>,
    pub distinct: usize,
    pub expected: StateView,
    /// Ids of the output events the stream must cause, each exactly once after dedupe by id.
    pub expected_outputs: BTreeSet<String>,
    /// Events reusing an idempotency key of `stream` with other content, to publish after it:
    /// each must be dead-lettered with reason `idempotency_key_reused` and change nothing.
    pub conflicts: Vec<Planned>,
}

impl Plan {
    /// The idempotency keys that `conflicts` reuse.
    pub fn reused_keys(&self) -> BTreeSet<String> {
        self.conflicts
            .iter()
            .filter_map(|c| c.idempotency_key.clone())
            .collect()
    }
}

const BASE_TIME_MS: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

pub fn plan(options: &Options) -> Plan {
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut queues: Vec<VecDeque<(Input, Event, Option<String>)>> = Vec::new();
    let shapes: Vec<Lifecycle> = (0..options.campaigns)
        .map(|_| Lifecycle::draw(&mut rng))
        .collect();
    let via_gateway: Vec<bool> = (0..options.payments).map(|_| rng.gen_bool(0.5)).collect();
    let payment_events_total: usize = via_gateway.iter().map(|g| if *g { 1 } else { 2 }).sum();
    let fixed = payment_events_total + shapes.iter().map(Lifecycle::events).sum::<usize>();
    let tracking_total = options.events.saturating_sub(fixed);
    let mut tracking_per_campaign = vec![0usize; options.campaigns];
    if options.campaigns > 0 {
        for _ in 0..tracking_total {
            tracking_per_campaign[rng.gen_range(0..options.campaigns)] += 1;
        }
    }
    for (c, (tracking, shape)) in tracking_per_campaign.into_iter().zip(shapes).enumerate() {
        queues.push(campaign_events(&mut rng, c, tracking, shape));
    }
    for (p, via_gateway) in via_gateway.into_iter().enumerate() {
        queues.push(payment_events(&mut rng, p, via_gateway));
    }

    // Interleave the aggregates at random, each keeping its own order: every remaining event is
    // equally likely next, so a long campaign's events spread over the whole stream.
    let mut order: Vec<usize> = queues
        .iter()
        .enumerate()
        .flat_map(|(i, queue)| std::iter::repeat(i).take(queue.len()))
        .collect();
    order.shuffle(&mut rng);
    let mut canonical = Vec::with_capacity(order.len());
    for next in order {
        let (input, event, key) = queues[next].pop_front().expect("one slot per queued event");
        let index = canonical.len();
        canonical.push(Planned {
            input,
            envelope: Envelope {
                id: uuid::Uuid::from_u128(rng.gen()).to_string(),
                event_type: crate::codec::wire_type(&event).to_owned(),
                source: "aerostream-generator".into(),
                time_ms: BASE_TIME_MS + index as i64,
                subject: Some(event.aggregate().id),
                correlation_id: None,
                causation_id: None,
                schema_version: "v1".into(),
            },
            idempotency_key: key,
            event,
        });
    }
    let distinct = canonical.len();
    let conflicts = conflicts(&mut rng, &canonical, options.conflict_fraction);
    let mut stream = canonical;
    reorder(&mut rng, &mut stream, options.reorder_window);
    // Per aggregate, the daemon applies events in publish order; which event crosses a budget
    // threshold (and so the id of the alert it causes) depends on that order.
    let (expected, expected_outputs) = expected_state(&stream, options);
    let stream = duplicate(
        &mut rng,
        stream,
        options.duplicate_fraction,
        options.reorder_window.max(1) * 4,
    );
    Plan {
        stream,
        distinct,
        expected,
        expected_outputs,
        conflicts,
    }
}

/// For a fraction of the keyed events, another event with the same idempotency key and other
/// content (the partner's `hash_contenido` differs), under a new event id.
fn conflicts(rng: &mut ChaCha8Rng, canonical: &[Planned], fraction: f64) -> Vec<Planned> {
    let mut conflicts = Vec::new();
    for original in canonical
        .iter()
        .filter(|planned| planned.idempotency_key.is_some())
    {
        if rng.gen_bool(fraction.clamp(0.0, 1.0)) {
            let mut conflict = original.clone();
            conflict.envelope.id = uuid::Uuid::from_u128(rng.gen()).to_string();
            if let Event::Payment(PaymentEvent::Processed { declared_hash, .. }) = &mut conflict.event {
                *declared_hash = format!("{:016x}", rng.gen::<u64>());
            }
            conflicts.push(conflict);
        }
    }
    conflicts
}

/// The lifecycle events of one campaign besides creation and activation, drawn before its
/// tracking events so that the stream has exactly the number of events asked for.
#[derive(Debug, Clone, Copy)]
struct Lifecycle {
    /// Paused and activated again once.
    pause: bool,
    /// Budget doubled once.
    raise_budget: bool,
    /// Completed at the end.
    complete: bool,
}

impl Lifecycle {
    fn draw(rng: &mut ChaCha8Rng) -> Lifecycle {
        Lifecycle {
            pause: rng.gen_bool(0.2),
            raise_budget: rng.gen_bool(0.2),
            complete: rng.gen_bool(0.1),
        }
    }

    /// Lifecycle events in all, creation and activation included.
    fn events(&self) -> usize {
        2 + 2 * usize::from(self.pause) + usize::from(self.raise_budget) + usize::from(self.complete)
    }
}

fn campaign_events(
    rng: &mut ChaCha8Rng,
    c: usize,
    tracking: usize,
    shape: Lifecycle,
) -> VecDeque<(Input, Event, Option<String>)> {
    let id = format!("camp-{c:05}");
    let cpc = rng.gen_range(5..50);
    let cpa = rng.gen_range(100..500);
    // Budgets around the expected spend, so some campaigns cross the alert thresholds.
    let expected_spend = (tracking as i64) * (cpc + cpa) / 4 + 1;
    let budget = (expected_spend as f64 * rng.gen_range(0.6..2.5)) as i64 + 100;
    let commission = if rng.gen_bool(0.5) {
        CommissionRule::Percentage {
            basis_points: rng.gen_range(100..2_000),
        }
    } else {
        CommissionRule::Fixed {
            amount_minor: rng.gen_range(50..500),
        }
    };
    let currency = *["USD", "EUR", "COP"].choose(rng).expect("non-empty");
    let money = |amount| Money::positive(amount, currency).expect("generated money is valid");
    let mut events = vec![
        CampaignEvent::Created {
            campaign_id: id.clone(),
            name: format!("Campaign {c}"),
            budget: money(budget),
            cost_per_click_minor: cpc,
            cost_per_conversion_minor: cpa,
            commission,
        },
        CampaignEvent::Activated {
            campaign_id: id.clone(),
        },
    ];
    let pause_at = shape.pause.then(|| rng.gen_range(0..=tracking));
    let budget_at = shape.raise_budget.then(|| rng.gen_range(0..=tracking));
    for t in 0..=tracking {
        if pause_at == Some(t) {
            events.push(CampaignEvent::Paused {
                campaign_id: id.clone(),
                reason: "manual".into(),
            });
            events.push(CampaignEvent::Activated {
                campaign_id: id.clone(),
            });
        }
        if budget_at == Some(t) {
            events.push(CampaignEvent::BudgetUpdated {
                campaign_id: id.clone(),
                budget: money(budget * 2),
            });
        }
        if t == tracking {
            break;
        }
        let affiliate_id = format!("af-{:04}", rng.gen_range(0..200));
        events.push(match rng.gen_range(0..10) {
            0..=5 => CampaignEvent::ImpressionRecorded {
                campaign_id: id.clone(),
                affiliate_id,
            },
            6..=8 => CampaignEvent::ClickRecorded {
                campaign_id: id.clone(),
                affiliate_id,
            },
            _ => CampaignEvent::ConversionRecorded {
                campaign_id: id.clone(),
                affiliate_id,
                value: money(rng.gen_range(1_000..100_000)),
            },
        });
    }
    if shape.complete {
        events.push(CampaignEvent::Completed {
            campaign_id: id.clone(),
        });
    }
    events
        .into_iter()
        .map(|e| (Input::Campaigns, Event::Campaign(e), None))
        .collect()
}

/// A payment requested from aerostream (charged by its gateway), or one processed by a partner,
/// who reports PROCESANDO and then the outcome.
fn payment_events(
    rng: &mut ChaCha8Rng,
    p: usize,
    via_gateway: bool,
) -> VecDeque<(Input, Event, Option<String>)> {
    let payment_id = format!("pago-{p:06}");
    let affiliate_id = format!("af-{:04}", rng.gen_range(0..200));
    let currency = *["USD", "EUR", "COP"].choose(rng).expect("non-empty");
    let amount = Money::positive(rng.gen_range(100..1_000_000), currency).expect("valid");
    if via_gateway {
        let requested = PaymentEvent::Requested {
            payment_id,
            affiliate_id,
            amount,
        };
        return VecDeque::from([(Input::Payments, Event::Payment(requested), None)]);
    }
    let outcome = if rng.gen_bool(0.85) {
        PaymentStatus::Succeeded
    } else {
        PaymentStatus::Failed
    };
    let processed = |status: PaymentStatus| {
        let event = PaymentEvent::Processed {
            payment_id: payment_id.clone(),
            affiliate_id: affiliate_id.clone(),
            amount,
            status,
            declared_hash: String::new(),
            attempts: 1,
        };
        let key = processed_idempotency_key(&payment_id, status, &affiliate_id);
        (Input::Payments, Event::Payment(event), Some(key))
    };
    VecDeque::from([processed(PaymentStatus::Processing), processed(outcome)])
}

/// Whether two events may be delivered in either order with the same result.
fn commute(a: &Event, b: &Event) -> bool {
    if a.aggregate() != b.aggregate() {
        return true;
    }
    match (a, b) {
        (Event::Campaign(a), Event::Campaign(b)) => a.is_tracking() && b.is_tracking(),
        (Event::Payment(_), Event::Payment(_)) => true,
        _ => false,
    }
}

/// Moves events up to `window` places, only across events they commute with.
fn reorder(rng: &mut ChaCha8Rng, stream: &mut [Planned], window: usize) {
    if window == 0 || stream.len() < 2 {
        return;
    }
    for i in 0..stream.len() {
        let j = (i + rng.gen_range(1..=window)).min(stream.len() - 1);
        let movable = (i + 1..=j).all(|k| commute(&stream[i].event, &stream[k].event))
            && (i..j).all(|k| commute(&stream[k].event, &stream[j].event));
        if j > i && movable {
            stream.swap(i, j);
        }
    }
}

/// Re-sends a fraction of events a little later, with the same id and content.
fn duplicate(rng: &mut ChaCha8Rng, stream: Vec<Planned>, fraction: f64, distance: usize) -> Vec<Planned> {
    let mut due: BTreeMap<usize, Vec<Planned>> = BTreeMap::new();
    let mut out = Vec::with_capacity(stream.len() + (stream.len() as f64 * fraction) as usize + 1);
    for (i, planned) in stream.into_iter().enumerate() {
        if rng.gen_bool(fraction.clamp(0.0, 1.0)) {
            due.entry(i + rng.gen_range(1..=distance))
                .or_default()
                .push(planned.clone());
        }
        out.push(planned);
        if let Some(copies) = due.remove(&i) {
            out.extend(copies);
        }
    }
    out.extend(due.into_values().flatten());
    out
}

/// Applies each distinct event once, in `stream` order, with the domain's rules: the state and
/// the ids of the output events.
fn expected_state(stream: &[Planned], options: &Options) -> (StateView, BTreeSet<String>) {
    let mut campaigns: BTreeMap<String, Campaign> = BTreeMap::new();
    let mut payments: BTreeMap<String, Payment> = BTreeMap::new();
    let mut outputs = Vec::new();
    let mut seen = HashSet::new();
    for planned in stream.iter().filter(|p| seen.insert(p.envelope.id.as_str())) {
        match &planned.event {
            Event::Campaign(e) => {
                step(&mut campaigns, e, &planned.envelope, &mut outputs);
            }
            Event::Payment(e) => {
                // The daemon charges what a request asks for and applies the result.
                for charge in step(&mut payments, e, &planned.envelope, &mut outputs) {
                    let charged = options.gateway.predict(&charge.payment_id, &options.retry);
                    let (envelope, _key, processed) = charge.processed(charged);
                    let Event::Payment(processed) = processed else {
                        unreachable!("a charge reports a payment event")
                    };
                    step(&mut payments, &processed, &envelope, &mut outputs);
                }
            }
            // The generator plans no report traffic.
            Event::Report(_) => {}
        }
    }
    let mut ledgers: BTreeMap<String, CommissionLedger> = BTreeMap::new();
    for output in &outputs {
        if let Some(affiliate) = CommissionLedger::affiliate_of(&output.body) {
            ledgers
                .entry(affiliate.to_owned())
                .or_insert_with(|| CommissionLedger::new(affiliate))
                .record(&output.body);
        }
    }
    let state = StateView {
        campaigns: campaigns.values().map(CampaignView::from).collect(),
        payments: payments.values().map(PaymentView::from).collect(),
        affiliates: ledgers.values().map(LedgerView::from).collect(),
    };
    (state, outputs.into_iter().map(|output| output.id).collect())
}

fn step<A: Aggregate>(
    states: &mut BTreeMap<String, A>,
    event: &A::Event,
    envelope: &Envelope,
    outputs: &mut Vec<OutputEvent>,
) -> Vec<Charge>
where
    A::Event: HasId,
{
    let id = event.id().to_owned();
    match A::decide(states.get(&id), event, envelope) {
        Ok(decision) => {
            states.insert(id, decision.state);
            outputs.extend(decision.outputs);
            decision.charges
        }
        Err(rejection) => panic!("the generator produced an event its own rules reject: {rejection}"),
    }
}

trait HasId {
    fn id(&self) -> &str;
}

impl HasId for CampaignEvent {
    fn id(&self) -> &str {
        self.campaign_id()
    }
}

impl HasId for PaymentEvent {
    fn id(&self) -> &str {
        self.payment_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(seed: u64) -> Options {
        Options {
            seed,
            campaigns: 10,
            payments: 20,
            events: 500,
            duplicate_fraction: 0.1,
            reorder_window: 8,
            conflict_fraction: 0.1,
            gateway: SimulatedGateway {
                latency: std::time::Duration::ZERO,
                failure_rate: 0.3,
                decline_rate: 0.1,
                seed: 1,
            },
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: std::time::Duration::ZERO,
                max_backoff: std::time::Duration::ZERO,
            },
        }
    }

    #[test]
    fn same_seed_same_stream() {
        let a = plan(&options(3));
        let b = plan(&options(3));
        let ids = |p: &Plan| p.stream.iter().map(|e| e.envelope.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        assert_eq!(a.expected, b.expected);
        assert_ne!(ids(&a), ids(&plan(&options(4))));
    }

    #[test]
    fn counts_duplicates_and_per_campaign_order() {
        let p = plan(&options(5));
        assert_eq!(p.distinct, 500);
        assert!(p.stream.len() > 520 && p.stream.len() < 600, "{}", p.stream.len());
        // Every campaign's creation comes before any other event of it.
        let mut created = std::collections::HashSet::new();
        for e in &p.stream {
            if let Event::Campaign(c) = &e.event {
                match c {
                    CampaignEvent::Created { campaign_id, .. } => {
                        created.insert(campaign_id.clone());
                    }
                    other => assert!(created.contains(other.campaign_id())),
                }
            }
        }
        assert_eq!(p.expected.campaigns.len(), 10);
        assert_eq!(p.expected.payments.len(), 20);
        assert!(
            !p.expected.affiliates.is_empty(),
            "conversions and payments move ledgers"
        );
    }

    #[test]
    fn conflicts_reuse_keys_with_other_content_and_outputs_are_predicted() {
        let p = plan(&options(6));
        assert!(!p.conflicts.is_empty());
        for conflict in &p.conflicts {
            let original = p
                .stream
                .iter()
                .find(|e| e.idempotency_key == conflict.idempotency_key)
                .expect("a conflict reuses a key of the stream");
            assert_ne!(original.envelope.id, conflict.envelope.id);
            assert_ne!(original.event, conflict.event, "other content");
        }
        assert_eq!(p.reused_keys().len(), p.conflicts.len());
        // Every payment reaches a final state and announces it once.
        assert!(p.expected_outputs.len() >= 20, "{}", p.expected_outputs.len());
        assert_eq!(p.expected_outputs, plan(&options(6)).expected_outputs);
    }
}
