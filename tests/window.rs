//! The idempotency window (SPEC §5) against the real broker, with a 2-second window: a repeat
//! inside the window is skipped; keys older than the window are evicted, so the window shrinks;
//! a repeat after eviction is applied again (documented behaviour: the window bounds memory, not
//! history).

mod support;

use aerostream::generator::{Input, Planned};
use aerostream::views::PaymentView;
use aerostream_actors::events::processed_idempotency_key;
use aerostream_actors::{Event, Money, PaymentEvent, PaymentStatus};
use std::time::Duration;
use support::daemon::{wait_for, Daemon};
use support::events;
use support::Harness;

const WINDOW: &str = "[idempotency]\nwindow_seconds = 2\neviction_interval_seconds = 1\n";

/// A partner's PagoProcesado (PROCESANDO), keyed: it changes the payment and asks for no charge.
fn processing(payment_id: &str) -> Planned {
    Planned {
        input: Input::Payments,
        envelope: events::envelope(
            &format!("evt-{payment_id}"),
            "PagoProcesado",
            1_767_225_600_000,
            Some(payment_id),
        ),
        idempotency_key: Some(processed_idempotency_key(
            payment_id,
            PaymentStatus::Processing,
            "af-1",
        )),
        event: Event::Payment(PaymentEvent::Processed {
            payment_id: payment_id.into(),
            affiliate_id: "af-1".into(),
            amount: Money::positive(1_000, "EUR").unwrap(),
            status: PaymentStatus::Processing,
            declared_hash: String::new(),
            attempts: 1,
        }),
    }
}

fn version(daemon: &Daemon, payment_id: &str) -> Option<u64> {
    daemon
        .get::<PaymentView>(&format!("/api/payments/{payment_id}"))
        .ok()
        .map(|p| p.version)
}

#[test]
fn repeats_are_skipped_inside_the_window_and_applied_again_after_eviction() {
    let harness = Harness::new().extra(WINDOW).build();
    let daemon = harness.start();
    let event = [processing("pago-w")];
    let publish = || events::publish(harness.runtime(), harness.config(), &event);
    let metric = |name: &str| daemon.metric(name, &[]).unwrap();

    publish();
    wait_for("the first delivery applied", Duration::from_secs(30), || {
        (version(&daemon, "pago-w") == Some(1)).then_some(())
    })
    .unwrap();

    publish();
    wait_for("the repeat skipped", Duration::from_secs(30), || {
        (metric("aerostream_events_deduplicated_total") == 1.0).then_some(())
    })
    .unwrap();
    assert_eq!(
        version(&daemon, "pago-w"),
        Some(1),
        "a repeat inside the window changes nothing"
    );

    wait_for("the key evicted", Duration::from_secs(30), || {
        (metric("aerostream_idempotency_evicted_total") >= 1.0
            && metric("aerostream_idempotency_window_keys") == 0.0)
            .then_some(())
    })
    .unwrap();

    publish();
    wait_for(
        "the repeat after the window applied",
        Duration::from_secs(30),
        // The state is readable once committed; the counter moves once it is durable.
        || {
            (version(&daemon, "pago-w") == Some(2) && metric("aerostream_events_applied_total") == 2.0)
                .then_some(())
        },
    )
    .unwrap();
    assert_eq!(metric("aerostream_events_deduplicated_total"), 1.0);
}
