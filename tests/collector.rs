//! The event collector (`POST /event-collector/events`) against the real broker: valid events are
//! published and applied end to end; malformed, incomplete, mistyped and oversize bodies are
//! refused with the reason and publish nothing; over the rate limit the answer is 429.

mod support;

use aerostream::views::CampaignView;
use aerostream_actors::CampaignStatus;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;
use support::daemon::{wait_for, Daemon};
use support::Harness;

const PATH: &str = "/event-collector/events";

fn event(id: &str, event_type: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "type": event_type,
        "source": "partner/acme",
        "time": "2026-11-24T10:00:00Z",
        "datacontenttype": "application/json",
        "data": data,
    })
}

fn post(daemon: &Daemon, body: Vec<u8>) -> (u16, Value, Option<String>) {
    daemon.send(Method::POST, PATH, None, body).unwrap()
}

fn post_json(daemon: &Daemon, body: &Value) -> (u16, Value, Option<String>) {
    post(daemon, serde_json::to_vec(body).unwrap())
}

#[test]
fn collected_events_are_validated_published_and_applied() {
    // A burst of 3 events, then one a second.
    let harness = Harness::new()
        .extra("[collector]\nrate_per_second = 1\nburst = 3\nmax_body_bytes = 16384\n")
        .build();
    let daemon = harness.start();

    let created = event(
        "col-1",
        "CampanaCreada",
        json!({
            "id_campana": "c-col",
            "nombre": "Collected",
            "presupuesto": { "monto_centavos": 100000, "moneda": "USD" },
            "costo_por_click_centavos": 25,
            "costo_por_conversion_centavos": 400,
            "regla_comision": { "tipo": "PORCENTAJE", "valor": 1000 }
        }),
    );
    let activated = event("col-2", "CampanaActivada", json!({ "id_campana": "c-col" }));
    let click = || {
        event(
            "col-3",
            "ClickRegistrado",
            json!({ "id_campana": "c-col", "id_afiliado": "af-1" }),
        )
    };
    let (status, answer, _) = post_json(&daemon, &json!([created, activated, click()]));
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["ids"], json!(["col-1", "col-2", "col-3"]));

    // The bucket is empty: the next batch is refused whole, with Retry-After.
    let impressions: Vec<Value> = (0..3)
        .map(|i| {
            event(
                &format!("col-limited-{i}"),
                "ImpresionRegistrada",
                json!({ "id_campana": "c-col", "id_afiliado": "af-1" }),
            )
        })
        .collect();
    let (status, answer, retry_after) = post_json(&daemon, &Value::Array(impressions));
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"], "rate_limited");
    assert!(retry_after.is_some());

    // Bad input: refused with the reason, whatever the rate.
    let (status, answer, _) = post(&daemon, b"{\"specversion\": \"1.0\", ".to_vec());
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_json")),
        "{answer}"
    );
    let mut missing = click();
    missing["data"].as_object_mut().unwrap().remove("id_afiliado");
    missing["id"] = json!("col-bad-1");
    let (status, answer, _) = post_json(&daemon, &missing);
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("missing_field")),
        "{answer}"
    );
    assert!(
        answer["detail"].as_str().unwrap().contains("data.id_afiliado"),
        "{answer}"
    );
    let mut mistyped = click();
    mistyped["data"]["id_campana"] = json!(42);
    mistyped["id"] = json!("col-bad-2");
    let (status, answer, _) = post_json(&daemon, &mistyped);
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_field")),
        "{answer}"
    );
    assert!(
        answer["detail"].as_str().unwrap().contains("data.id_campana"),
        "{answer}"
    );
    // One bad event refuses its whole batch.
    let batch = json!([
        event(
            "col-bad-3",
            "ClickRegistrado",
            json!({ "id_campana": "c-col", "id_afiliado": "af-1" })
        ),
        mistyped
    ]);
    let (status, answer, _) = post_json(&daemon, &batch);
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().starts_with("event 1:"),
        "{answer}"
    );
    let mut oversize = click();
    oversize["id"] = json!("col-bad-4");
    oversize["subject"] = json!("x".repeat(20_000));
    let (status, answer, _) = post_json(&daemon, &oversize);
    assert_eq!(
        (status, answer["error"].as_str()),
        (413, Some("payload_too_large")),
        "{answer}"
    );
    let mut output = click();
    output["type"] = json!("PagoExitoso");
    let (status, answer, _) = post_json(&daemon, &output);
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("unknown_event_type")),
        "{answer}"
    );

    // One more event once the bucket refills (one a second).
    let impression = event(
        "col-4",
        "ImpresionRegistrada",
        json!({ "id_campana": "c-col", "id_afiliado": "af-1" }),
    );
    let answer = wait_for("a token for one event", Duration::from_secs(10), || {
        let (status, answer, _) = post_json(&daemon, &impression);
        (status == 202).then_some(answer)
    })
    .unwrap();
    assert_eq!(answer["id"], "col-4");

    let served = wait_for("the collected campaign", Duration::from_secs(30), || {
        let campaign: CampaignView = daemon.get("/api/campaigns/c-col").ok()?;
        (campaign.metrics.impressions == 1).then_some(campaign)
    })
    .unwrap();
    assert_eq!(served.status, CampaignStatus::Active);
    assert_eq!((served.metrics.clicks, served.spend_minor), (1, 25));
    // Exactly the four accepted events were applied: nothing refused was published (the refused
    // clicks and impressions would show in the campaign's metrics).
    daemon
        .wait_metric("aerostream_events_applied_total", &["input=\"campaigns\""], 4.0)
        .unwrap();
    assert_eq!(
        daemon.get::<CampaignView>("/api/campaigns/c-col").unwrap(),
        served
    );
    assert_eq!(
        daemon
            .metric("aerostream_events_dead_lettered_total", &[])
            .unwrap(),
        0.0
    );
    assert_eq!(
        daemon
            .metric("aerostream_collector_events_total", &["outcome=\"accepted\""])
            .unwrap(),
        4.0
    );
    assert!(
        daemon
            .metric("aerostream_collector_events_total", &["outcome=\"rate_limited\""])
            .unwrap()
            >= 3.0
    );
}
