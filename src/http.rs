//! The HTTP listener: health, metrics, the read API, reports, the event collector and admin routes
//! (SPEC §8). Aggregate reads come from the store; reports and version switches go through the
//! report service's actor.

use crate::broker::BrokerHealth;
use crate::codec::decode::content_hash;
use crate::collector::{CollectError, Collector};
use crate::config::Secret;
use crate::store::SledStore;
use crate::telemetry::HTTP_REQUESTS;
use crate::views::{CampaignView, LedgerView, PaymentView};
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::error::JsonPayloadError;
use actix_web::http::{header, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpMessage, HttpRequest, HttpResponse, HttpServer};
use aerostream_actors::events::AggregateKey;
use aerostream_actors::ports::StateStore;
use aerostream_actors::ports::{Clock, SystemClock};
use aerostream_actors::{
    AggregateKind, Campaign, Envelope, Event, Incoming, Payment, Registry, ReportEvent, ReportVersion,
};
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Running state of each input's consumer, for /health.
pub type InputsUp = Arc<BTreeMap<String, crate::ingest::InputStatus>>;

#[derive(Clone)]
pub struct HttpState {
    pub store: Arc<SledStore>,
    pub registry: Arc<Registry>,
    pub prometheus: PrometheusHandle,
    pub broker: BrokerHealth,
    pub inputs: InputsUp,
    /// An input holding messages and finishing none for this long is reported.
    pub stall_timeout: std::time::Duration,
    /// Bearer token of the admin routes; empty refuses them.
    pub admin_token: Secret,
    /// Whether the chaos routes (kill-actor, failpoint) are allowed.
    pub chaos_enabled: bool,
    pub collector: Arc<Collector>,
    /// The changelog follower's progress (`None`: no changelog).
    pub changelog: Option<ChangelogHealth>,
}

/// What /health reads of the changelog follower.
#[derive(Clone)]
pub struct ChangelogHealth {
    pub seen: Arc<crate::changelog::Seen>,
    /// A marker not read back for longer than this is reported as a fault.
    pub stall_timeout: std::time::Duration,
}

fn error(status: StatusCode, error: &str, detail: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": error, "detail": detail.into() }))
}

async fn health(state: web::Data<HttpState>) -> HttpResponse {
    let broker = state.broker.is_up();
    let store_problem = state.store.write_problem();
    let store = store_problem.is_none();
    let mut reasons: Vec<String> = Vec::new();
    if !broker {
        reasons.push("broker: did not answer the last probe".into());
    }
    if let Some(problem) = store_problem {
        reasons.push(format!(
            "store: {problem}; consumption is stopped until it writes again"
        ));
    }
    let inputs: BTreeMap<&str, serde_json::Value> = state
        .inputs
        .iter()
        .map(|(name, input)| {
            let subscribed = input.subscribed.load(Ordering::Relaxed);
            let held = input.held.load(Ordering::Relaxed);
            let stalled = input
                .stalled_for()
                .filter(|stalled| *stalled > state.stall_timeout);
            if !subscribed {
                reasons.push(format!("input {name}: not subscribed"));
            }
            if let Some(stalled) = stalled {
                reasons.push(format!(
                    "input {name}: holds {held} messages and finished none for {} s",
                    stalled.as_secs()
                ));
            }
            let value = json!({ "subscribed": subscribed, "held": held, "stalled": stalled.is_some() });
            (name.as_str(), value)
        })
        .collect();
    let changelog = state.changelog.as_ref().map(|changelog| {
        let settling = state.store.any_unconfirmed();
        let marker_wait = changelog.seen.marker_wait();
        if settling {
            reasons.push(
                "changelog: settling the commits a crash left unpublished; consumption waits until the changelog is read to its end"
                    .into(),
            );
        }
        if let Some(wait) = marker_wait.filter(|wait| *wait > changelog.stall_timeout) {
            reasons.push(format!(
                "changelog: a marker written {} s ago has not been read back ({} re-subscriptions so far)",
                wait.as_secs(),
                changelog.seen.resubscriptions()
            ));
        }
        json!({
            "settled": !settling,
            "marker_wait_seconds": marker_wait.map(|wait| wait.as_secs_f64()),
            "resubscriptions": changelog.seen.resubscriptions(),
        })
    });
    let ok = reasons.is_empty();
    let body = json!({
        "status": if ok { "ok" } else { "unavailable" },
        "reasons": reasons,
        "components": { "broker": broker, "store": store, "inputs": inputs, "changelog": changelog },
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
    #[error("{0}")]
    BadRequest(String),
    #[error("admin routes need the header `Authorization: Bearer <http.admin_token>`")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Collect(#[from] CollectError),
}

impl actix_web::ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Collect(CollectError::RateLimited { .. }) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Collect(CollectError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Collect(CollectError::UnsupportedMediaType { .. }) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            ApiError::Collect(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let code = match self {
            ApiError::NotFound(_) => "not_found",
            ApiError::Store(_) => "store",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::Collect(collect) => collect.code(),
        };
        let mut response = error(self.status_code(), code, self.to_string());
        if let ApiError::Collect(CollectError::RateLimited { retry_after, .. }) = self {
            let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(value) = header::HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
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

async fn commissions(state: web::Data<HttpState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let ledger = state
        .store
        .ledger(&id)
        .map_err(store_error)?
        .ok_or_else(|| ApiError::NotFound(format!("no commissions for affiliate {id}")))?;
    Ok(HttpResponse::Ok().json(LedgerView::from(&ledger)))
}

/// Admits a request to an admin route: a token must be configured and presented.
fn authorize(state: &HttpState, request: &HttpRequest) -> Result<(), ApiError> {
    if state.admin_token.is_empty() {
        return Err(ApiError::Forbidden(
            "admin routes are disabled: http.admin_token is not set",
        ));
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match presented {
        Some(token) if state.admin_token.matches(token) => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

/// Admits a request to a chaos route: the admin token, and `chaos.enabled`.
fn authorize_chaos(state: &HttpState, request: &HttpRequest) -> Result<(), ApiError> {
    authorize(state, request)?;
    if !state.chaos_enabled {
        return Err(ApiError::Forbidden(
            "chaos routes are disabled: set chaos.enabled = true",
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetFailpoint {
    name: String,
    /// The `fail` crate's actions (`return`, `3*return(corrupt)`, `sleep(10000)`, `off`, …).
    actions: String,
}

/// The fail points a chaos request (or `chaos.failpoints`) may set.
const FAILPOINTS: [&str; 5] = [
    crate::broker::FAILPOINT_STUCK_CLIENT,
    crate::store::FAILPOINT_WRITE,
    crate::store::FAILPOINT_FLUSH,
    crate::store::FAILPOINT_COMMIT,
    crate::changelog::FAILPOINT_DEAF_SUBSCRIPTION,
];

/// Sets one of [`FAILPOINTS`] to `actions` (the `fail` crate's form); refuses any other name.
pub fn set_known_failpoint(name: &str, actions: &str) -> Result<(), String> {
    if !FAILPOINTS.contains(&name) {
        return Err(format!("unknown fail point {name:?}; known: {FAILPOINTS:?}"));
    }
    fail::cfg(name, actions)
}

/// Chaos: sets the actions of a fail point, as the `fail` crate reads them; `off` clears them.
async fn set_failpoint(
    state: web::Data<HttpState>,
    request: HttpRequest,
    body: web::Json<SetFailpoint>,
) -> Result<HttpResponse, ApiError> {
    authorize_chaos(&state, &request)?;
    set_known_failpoint(&body.name, &body.actions).map_err(ApiError::BadRequest)?;
    tracing::warn!(name = %body.name, actions = %body.actions, "Chaos: fail point set.");
    Ok(HttpResponse::Ok().json(json!({ "failpoint": body.name, "actions": body.actions })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KillActor {
    kind: String,
    id: String,
}

/// Chaos: makes the named actor panic now; its supervisor restarts it from its committed state.
async fn kill_actor(
    state: web::Data<HttpState>,
    request: HttpRequest,
    body: web::Json<KillActor>,
) -> Result<HttpResponse, ApiError> {
    authorize_chaos(&state, &request)?;
    let kind: AggregateKind = body.kind.parse().map_err(ApiError::BadRequest)?;
    if !state.registry.crash(kind, &body.id).await {
        return Err(ApiError::NotFound(format!(
            "no running {} actor {}",
            kind.as_str(),
            body.id
        )));
    }
    tracing::warn!(kind = kind.as_str(), id = %body.id, "Chaos: actor killed.");
    Ok(HttpResponse::Accepted().json(json!({ "killed": { "kind": kind.as_str(), "id": body.id } })))
}

/// The report in the active version.
async fn report(state: web::Data<HttpState>) -> Result<HttpResponse, ApiError> {
    let report = state.registry.report().await.map_err(store_error)?;
    Ok(HttpResponse::Ok().json(report))
}

async fn report_version(state: web::Data<HttpState>) -> Result<HttpResponse, ApiError> {
    let service = state.registry.report_service().await.map_err(store_error)?;
    Ok(HttpResponse::Ok().json(json!({
        "version": service.active,
        "switches": service.switches,
        "allowed": ReportVersion::ALL,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetVersion {
    version: String,
}

/// Switches the report version: the switch is applied like a control-topic event, through the
/// report actor, and is durable before the answer.
async fn set_report_version(
    state: web::Data<HttpState>,
    request: HttpRequest,
    body: web::Json<SetVersion>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &request)?;
    let version: ReportVersion = body.version.parse().map_err(ApiError::BadRequest)?;
    let event = Event::Report(ReportEvent::VersionChanged { version });
    let id = uuid::Uuid::new_v4().to_string();
    let incoming = Incoming {
        envelope: Envelope {
            id: id.clone(),
            event_type: crate::codec::wire_type(&event).to_owned(),
            source: "aerostream/http".into(),
            time_ms: SystemClock.now_ms(),
            subject: None,
            correlation_id: None,
            causation_id: None,
            schema_version: "v1".into(),
        },
        idempotency_key: id,
        content_hash: content_hash(&event),
        event,
        delivery: None,
    };
    state
        .registry
        .apply(Arc::new(incoming))
        .await
        .map_err(store_error)?;
    state.store.flush().await.map_err(store_error)?;
    report_version(state).await
}

/// Reads the body up to `limit` bytes.
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(format!(
                "the body exceeds collector.max_body_bytes = {limit}"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The event collector: CloudEvents JSON in, Avro published, 202 with the ids.
async fn collect(
    state: web::Data<HttpState>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let essence = request.mime_type().ok().flatten();
    let header = request
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    state
        .collector
        .check_media_type(essence.as_ref().map(|mime| mime.essence_str()), header.as_deref())?;
    let body = read_body(payload, state.collector.max_body_bytes).await?;
    let prepared = state.collector.prepare(&body)?;
    let ids = state.collector.publish(prepared).await?;
    let mut answer = json!({ "accepted": ids.len(), "ids": ids });
    if let [id] = ids.as_slice() {
        answer["id"] = json!(id);
    }
    Ok(HttpResponse::Accepted().json(answer))
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

/// Largest JSON request body accepted.
const MAX_JSON_BYTES: usize = 64 * 1024;

/// Starts the listener on `listener` (bound by the caller, so tests can use port 0).
pub fn serve(listener: TcpListener, state: HttpState) -> std::io::Result<actix_web::dev::Server> {
    let data = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(
                web::JsonConfig::default()
                    .limit(MAX_JSON_BYTES)
                    .error_handler(|error, _| {
                        // Malformed bodies answer in the API's error shape, like every other error.
                        match error {
                            JsonPayloadError::Overflow { .. }
                            | JsonPayloadError::OverflowKnownLength { .. } => {
                                ApiError::TooLarge(error.to_string()).into()
                            }
                            other => ApiError::BadRequest(other.to_string()).into(),
                        }
                    }),
            )
            .wrap(from_fn(count_requests))
            .route("/health", web::get().to(health))
            .route("/metrics", web::get().to(metrics))
            .route("/api/campaigns", web::get().to(campaigns))
            .route("/api/campaigns/{id}", web::get().to(campaign))
            .route("/api/payments/{id}", web::get().to(payment))
            .route("/api/affiliates/{id}/commissions", web::get().to(commissions))
            .route("/api/reports/payments", web::get().to(report))
            .route("/api/reports/version", web::get().to(report_version))
            .route("/api/reports/version", web::put().to(set_report_version))
            .route("/event-collector/events", web::post().to(collect))
            .route("/admin/chaos/kill-actor", web::post().to(kill_actor))
            .route("/admin/chaos/failpoint", web::post().to(set_failpoint))
            .default_service(web::to(not_found))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    Ok(server)
}
