//! The HTTP listener: health, metrics and the read API (SPEC §8). Reads come from the store.

use crate::broker::BrokerHealth;
use crate::store::SledStore;
use crate::telemetry::HTTP_REQUESTS;
use crate::views::{CampaignView, PaymentView};
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpResponse, HttpServer};
use aerostream_actors::events::AggregateKey;
use aerostream_actors::ports::StateStore;
use aerostream_actors::{AggregateKind, Campaign, Payment};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Running state of each input's consumer, for /health.
pub type InputsUp = Arc<BTreeMap<String, AtomicBool>>;

#[derive(Clone)]
pub struct HttpState {
    pub store: Arc<SledStore>,
    pub prometheus: PrometheusHandle,
    pub broker: BrokerHealth,
    pub inputs: InputsUp,
}

fn error(status: StatusCode, error: &str, detail: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": error, "detail": detail.into() }))
}

async fn health(state: web::Data<HttpState>) -> HttpResponse {
    let broker = state.broker.is_up();
    let store = state.store.healthy();
    let inputs: BTreeMap<&str, bool> = state
        .inputs
        .iter()
        .map(|(name, up)| (name.as_str(), up.load(Ordering::Relaxed)))
        .collect();
    let ok = broker && store && inputs.values().all(|up| *up);
    let body = json!({
        "status": if ok { "ok" } else { "unavailable" },
        "components": { "broker": broker, "store": store, "inputs": inputs },
        "idempotency_window_keys": state.store.window_len(),
        "outbox_backlog": state.store.outbox_len(),
    });
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics(state: web::Data<HttpState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.prometheus.render())
}

/// What an API request can fail with; rendered as `{"error": ..., "detail": ...}`.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Store(String),
}

impl actix_web::ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let code = match self {
            ApiError::NotFound(_) => "not_found",
            ApiError::Store(_) => "store",
        };
        error(self.status_code(), code, self.to_string())
    }
}

fn store_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::Store(e.to_string())
}

fn load<A: DeserializeOwned>(store: &SledStore, kind: AggregateKind, id: String) -> Result<A, ApiError> {
    let key = AggregateKey { kind, id };
    let bytes = store
        .load(&key)
        .map_err(store_error)?
        .ok_or_else(|| ApiError::NotFound(format!("no {} {}", key.kind.as_str(), key.id)))?;
    serde_json::from_slice(&bytes).map_err(store_error)
}

async fn campaigns(state: web::Data<HttpState>) -> Result<HttpResponse, ApiError> {
    let mut views = Vec::new();
    for bytes in state.store.states(AggregateKind::Campaign) {
        let campaign: Campaign = serde_json::from_slice(&bytes.map_err(store_error)?).map_err(store_error)?;
        views.push(CampaignView::from(&campaign));
    }
    Ok(HttpResponse::Ok().json(views))
}

async fn campaign(state: web::Data<HttpState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let campaign: Campaign = load(&state.store, AggregateKind::Campaign, id.into_inner())?;
    Ok(HttpResponse::Ok().json(CampaignView::from(&campaign)))
}

async fn payment(state: web::Data<HttpState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let payment: Payment = load(&state.store, AggregateKind::Payment, id.into_inner())?;
    Ok(HttpResponse::Ok().json(PaymentView::from(&payment)))
}

async fn not_found() -> HttpResponse {
    error(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// Counts requests by matched route pattern (bounded) and status.
async fn count_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let response = next.call(req).await?;
    let route = response
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".into());
    let status = response.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS, "route" => route, "status" => status).increment(1);
    Ok(response)
}

/// Starts the listener on `listener` (bound by the caller, so tests can use port 0).
pub fn serve(listener: TcpListener, state: HttpState) -> std::io::Result<actix_web::dev::Server> {
    let data = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .wrap(from_fn(count_requests))
            .route("/health", web::get().to(health))
            .route("/metrics", web::get().to(metrics))
            .route("/api/campaigns", web::get().to(campaigns))
            .route("/api/campaigns/{id}", web::get().to(campaign))
            .route("/api/payments/{id}", web::get().to(payment))
            .default_service(web::to(not_found))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    Ok(server)
}
