//! Schema evolution on the wire (SPEC §3, §4): a v1 producer and a v2 producer of
//! PagoProcesado publish to the same topic; the daemon resolves both writer schemas to its reader
//! schema and applies every event.

mod support;

use aerostream::codec::Codec;
use aerostream::generator::{Input, Planned};
use aerostream::views::PaymentView;
use aerostream_actors::events::processed_idempotency_key;
use aerostream_actors::{Envelope, Event, Money, PaymentEvent, PaymentStatus};
use std::time::Duration;
use support::daemon::wait_for;
use support::events;
use support::Harness;

fn processed(payment_id: &str, status: PaymentStatus, schema_version: &str, at: i64) -> Planned {
    Planned {
        input: Input::Payments,
        envelope: Envelope {
            source: format!("partner-{schema_version}"),
            schema_version: schema_version.into(),
            ..events::envelope(
                &format!("{payment_id}-{}", status.wire_name()),
                "PagoProcesado",
                1_767_225_600_000 + at,
                Some(payment_id),
            )
        },
        idempotency_key: Some(processed_idempotency_key(payment_id, status, "af-7")),
        event: Event::Payment(PaymentEvent::Processed {
            payment_id: payment_id.into(),
            affiliate_id: "af-7".into(),
            amount: Money::positive(4_200, "COP").unwrap(),
            status,
            declared_hash: String::new(),
            attempts: 1,
        }),
    }
}

#[test]
fn v1_and_v2_producers_on_one_topic_are_both_applied() {
    let harness = Harness::started();
    let daemon = harness.start();

    let planned = [
        processed("pago-v1", PaymentStatus::Processing, "v1", 1),
        processed("pago-v2", PaymentStatus::Processing, "v2", 2),
        processed("pago-v1", PaymentStatus::Succeeded, "v2", 3),
        processed("pago-v2", PaymentStatus::Failed, "v1", 4),
    ];
    let codec = Codec::shipped();
    let dataschemas: Vec<String> = planned
        .iter()
        .map(|e| {
            codec
                .encode_input(&e.envelope, e.idempotency_key.as_deref(), &e.event)
                .unwrap()
                .dataschema
        })
        .collect();
    assert!(
        dataschemas[0].ends_with("/v1") && dataschemas[1].ends_with("/v2"),
        "{dataschemas:?}"
    );
    events::publish(harness.runtime(), harness.config(), &planned);

    for (payment, status) in [
        ("pago-v1", PaymentStatus::Succeeded),
        ("pago-v2", PaymentStatus::Failed),
    ] {
        wait_for(payment, Duration::from_secs(30), || {
            let served: PaymentView = daemon.get(&format!("/api/payments/{payment}")).ok()?;
            (served.status == status && served.history.len() == 2).then_some(())
        })
        .unwrap();
    }
    assert_eq!(
        daemon
            .metric("aerostream_events_dead_lettered_total", &[])
            .unwrap(),
        0.0
    );
}
