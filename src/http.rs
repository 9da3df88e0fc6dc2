//! The HTTP listener: health, metrics, the read API, reports, the event collector and admin routes
//! (SPEC §8). Aggregate reads come from the store, on actix's blocking pool (`web::block`) so that
//! a page being read never delays /health or /metrics on the worker; lists are paged (`limit`,
//! `after`). Reports and version switches go through the report service's actor.

use crate::broker::BrokerHealth;
use crate::codec::decode::content_hash;
use crate::collector::{CollectError, Collector};
use crate::config::Secret;
use crate::store::SledStore;
use crate::telemetry::HTTP_REQUESTS;
use crate::views::{CampaignView, LedgerView, Page, PaymentView};
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
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Running state of each input's consumer, for /health.
pub type InputsUp = Arc<BTreeMap<String, Arc<crate::ingest::InputStatus>>>;

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
            let value = json!({
                "subscribed": subscribed,
                "held": held,
                "stalled": stalled.is_some(),
                "consumed": input.consumed.load(Ordering::Relaxed),
                "applied": input.applied.load(Ordering::Relaxed),
                "dead_lettered": input.dead_lettered.load(Ordering::Relaxed),
            });
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
        let (owned, followed) = changelog.seen.partitions();
        json!({
            "settled": !settling,
            "marker_wait_seconds": marker_wait.map(|wait| wait.as_secs_f64()),
            "resubscriptions": changelog.seen.resubscriptions(),
            "owned_partitions": owned,
            "followed_partitions": followed,
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

/// What each input holds now (`subscribed`, `held`): what a 404 can tell of events in flight.
fn inputs_now(state: &HttpState) -> serde_json::Value {
    state
        .inputs
        .iter()
        .map(|(name, input)| {
            let status = json!({
                "subscribed": input.subscribed.load(Ordering::Relaxed),
                "held": input.held.load(Ordering::Relaxed),
            });
            (name.clone(), status)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

async fn metrics(state: web::Data<HttpState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.prometheus.render())
}

/// What an API request can fail with; rendered as `{"error": ..., "detail": ...}`, and a 404 of
/// the read API or kill-actor with its `reason` (`not_applied`, `not_in_memory`).
#[derive(Debug, thiserror::Error)]
enum ApiError {
    /// No state for this aggregate or ledger. The daemon cannot tell an id never sent from one
    /// whose events are not applied yet; it says so, with what its inputs hold now.
    #[error(
        "{what}. The daemon cannot tell an id that was never sent from one whose events are not \
         applied yet: they may still wait in an input's backlog or be in flight (`inputs`: what \
         each input holds now), or have been dead-lettered or rejected (the input's dead-letter \
         topic, with a `reason`)"
    )]
    NotApplied {
        /// What is missing, in a sentence.
        what: String,
        inputs: serde_json::Value,
    },
    /// The chaos route found no actor of this aggregate in memory.
    #[error("{}", not_in_memory(*.kind, .id, *.stored))]
    NotInMemory {
        kind: AggregateKind,
        id: String,
        /// Whether the store holds the aggregate's state.
        stored: bool,
    },
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

/// Why kill-actor found no actor: an aggregate that exists runs an actor only while it is used.
fn not_in_memory(kind: AggregateKind, id: &str, stored: bool) -> String {
    let kind = kind.as_str();
    if stored {
        format!(
            "no {kind} actor {id} in memory: the aggregate has state, but its actor is not running \
             (stopped after actors.idle_seconds without events, or not needed since the daemon \
             started); its next event starts it again, and then it can be killed"
        )
    } else {
        format!("no {kind} {id} in this daemon's state, so no actor to kill")
    }
}

impl actix_web::ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::NotApplied { .. } | ApiError::NotInMemory { .. } => StatusCode::NOT_FOUND,
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
            ApiError::NotApplied { .. } | ApiError::NotInMemory { .. } => "not_found",
            ApiError::Store(_) => "store",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::Collect(collect) => collect.code(),
        };
        let mut body = json!({ "error": code, "detail": self.to_string() });
        match self {
            ApiError::NotApplied { inputs, .. } => {
                body["reason"] = json!("not_applied");
                body["inputs"] = inputs.clone();
            }
            ApiError::NotInMemory { stored, .. } => {
                body["reason"] = json!(if *stored { "not_in_memory" } else { "not_applied" });
            }
            _ => {}
        }
        let mut response = HttpResponse::build(self.status_code()).json(body);
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

/// Runs `read` on actix's blocking pool: store reads (a page scan, a cold page from disk) never
/// hold the worker that answers /health and /metrics.
async fn off_worker<R: Send + 'static>(
    state: &HttpState,
    read: impl FnOnce(&SledStore) -> Result<R, ApiError> + Send + 'static,
) -> Result<R, ApiError> {
    let store = state.store.clone();
    web::block(move || read(&store)).await.map_err(store_error)?
}

/// The state of aggregate (`kind`, `id`), or [`ApiError::NotApplied`].
async fn load<A: DeserializeOwned + Send + 'static>(
    state: &HttpState,
    kind: AggregateKind,
    id: String,
) -> Result<A, ApiError> {
    let key = AggregateKey { kind, id };
    let what = format!(
        "{} {} has no state in this daemon: none of its events has been applied here nor imported \
         from another daemon's changelog",
        key.kind.as_str(),
        key.id
    );
    let loaded = off_worker(state, move |store| {
        let Some(bytes) = store.load(&key).map_err(store_error)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(store_error)
    })
    .await?;
    loaded.ok_or_else(|| ApiError::NotApplied {
        what,
        inputs: inputs_now(state),
    })
}

/// Items a list route answers when the request names no `limit`.
pub const DEFAULT_PAGE_LIMIT: usize = 100;
/// The largest `limit` a list route takes: a page is read and encoded in one piece.
pub const MAX_PAGE_LIMIT: usize = 1_000;

/// Bounds the pages read at once to half the cores (at least one): however many clients list,
/// their scans leave CPU to the worker that answers /health and /metrics, and to consumption.
/// Further page requests wait for a permit without holding the worker.
pub struct PageReads(tokio::sync::Semaphore);

impl PageReads {
    fn for_this_machine() -> PageReads {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        PageReads(tokio::sync::Semaphore::new((cores / 2).max(1)))
    }
}

/// `?limit=N&after=ID` of a list route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    limit: Option<usize>,
    /// The `next` of the previous page: this page starts after that id.
    after: Option<String>,
}

/// Reads one page off the worker: `read(store, after, n)` answers up to `n` items with their ids
/// in id order; one more than `limit` is read to know whether a next page exists. The page is
/// encoded to JSON there too.
async fn page<T: Serialize + Send + 'static>(
    state: &HttpState,
    reads: &PageReads,
    query: PageQuery,
    read: impl FnOnce(&SledStore, Option<&str>, usize) -> Result<Vec<(String, T)>, ApiError> + Send + 'static,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE_LIMIT);
    if !(1..=MAX_PAGE_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE_LIMIT} (default {DEFAULT_PAGE_LIMIT}), not {limit}"
        )));
    }
    let _permit = reads.0.acquire().await.map_err(store_error)?;
    let body = off_worker(state, move |store| {
        let mut rows = read(store, query.after.as_deref(), limit + 1)?;
        let next = (rows.len() > limit).then(|| {
            rows.truncate(limit);
            rows.last().map(|(id, _)| id.clone())
        });
        let page = Page {
            items: rows.into_iter().map(|(_, item)| item).collect(),
            next: next.flatten(),
        };
        serde_json::to_vec(&page).map_err(store_error)
    })
    .await?;
    Ok(HttpResponse::Ok().content_type("application/json").body(body))
}

/// Parses stored states of `A` and makes each a view.
fn views<A: DeserializeOwned, V>(
    rows: Vec<(String, Vec<u8>)>,
    view: impl Fn(&A) -> V,
) -> Result<Vec<(String, V)>, ApiError> {
    rows.into_iter()
        .map(|(id, bytes)| {
            let aggregate: A = serde_json::from_slice(&bytes).map_err(store_error)?;
            Ok((id, view(&aggregate)))
        })
        .collect()
}

/// A page of the stored states of aggregate kind `A`, each as its view `V`.
async fn aggregates<A, V>(
    state: web::Data<HttpState>,
    reads: web::Data<PageReads>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError>
where
    A: aerostream_actors::Aggregate + DeserializeOwned,
    V: for<'a> From<&'a A> + Serialize + Send + 'static,
{
    page(&state, &reads, query.into_inner(), |store, after, limit| {
        let rows = store.states_after(A::KIND, after, limit).map_err(store_error)?;
        views(rows, |aggregate: &A| V::from(aggregate))
    })
    .await
}

async fn affiliates(
    state: web::Data<HttpState>,
    reads: web::Data<PageReads>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    page(&state, &reads, query.into_inner(), |store, after, limit| {
        let ledgers = store.ledgers_after(after, limit).map_err(store_error)?;
        Ok(ledgers
            .into_iter()
            .map(|(id, ledger)| (id, LedgerView::from(&ledger)))
            .collect())
    })
    .await
}

async fn campaign(state: web::Data<HttpState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let campaign: Campaign = load(&state, AggregateKind::Campaign, id.into_inner()).await?;
    Ok(HttpResponse::Ok().json(CampaignView::from(&campaign)))
}

async fn payment(state: web::Data<HttpState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let payment: Payment = load(&state, AggregateKind::Payment, id.into_inner()).await?;
    Ok(HttpResponse::Ok().json(PaymentView::from(&payment)))
}

async fn commissions(state: web::Data<HttpState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let affiliate = id.clone();
    let ledger = off_worker(&state, move |store| store.ledger(&affiliate).map_err(store_error)).await?;
    let ledger = ledger.ok_or_else(|| ApiError::NotApplied {
        what: format!(
            "affiliate {id} has no commission ledger in this daemon: no commission earned by it \
             and no payment to it has been applied here nor imported from another daemon's \
             changelog"
        ),
        inputs: inputs_now(&state),
    })?;
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
const FAILPOINTS: [&str; 6] = [
    crate::broker::FAILPOINT_STUCK_CLIENT,
    crate::ingest::FAILPOINT_STARVE,
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
        let key = AggregateKey {
            kind,
            id: body.id.clone(),
        };
        let stored = off_worker(&state, move |store| store.load(&key).map_err(store_error)).await?;
        return Err(ApiError::NotInMemory {
            kind,
            id: body.id.clone(),
            stored: stored.is_some(),
        });
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
        partition: None,
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
    let page_reads = web::Data::new(PageReads::for_this_machine());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(page_reads.clone())
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
            .app_data(web::QueryConfig::default().error_handler(|error, _| {
                ApiError::BadRequest(format!(
                    "{error}; list routes take `limit` (1 to {MAX_PAGE_LIMIT}) and `after` (an id)"
                ))
                .into()
            }))
            .wrap(from_fn(count_requests))
            .route("/health", web::get().to(health))
            .route("/metrics", web::get().to(metrics))
            .route(
                "/api/campaigns",
                web::get().to(aggregates::<Campaign, CampaignView>),
            )
            .route("/api/campaigns/{id}", web::get().to(campaign))
            .route("/api/payments", web::get().to(aggregates::<Payment, PaymentView>))
            .route("/api/payments/{id}", web::get().to(payment))
            .route("/api/affiliates", web::get().to(affiliates))
            .route("/api/affiliates/{id}/commissions", web::get().to(commissions))
            .route("/api/reports/payments", web::get().to(report))
            .route("/api/reports/version", web::get().to(report_version))
            .route("/api/reports/version", web::put().to(set_report_version))
            .route("/event-collector/events", web::post().to(collect))
            .route("/admin/chaos/kill-actor", web::post().to(kill_actor))
            .route("/admin/chaos/failpoint", web::post().to(set_failpoint))
            .default_service(web::to(not_found))
    })
    // One worker is enough once every store read runs on the blocking pool: with two, /health
    // answered no faster while six clients read pages (issue #18; docs/OPERATIONS.md, "HTTP").
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    Ok(server)
}
