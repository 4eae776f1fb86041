//! The axum router: ingest, deploy, state, status, health.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::ingest::{parse_batch, IngestLimits};
use crate::host::{AdminError, DeployOptions, DlqSelector, Host, PolicyOverrides};
use crate::ledger::DlqAction;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct ApiState {
    /// The host.
    pub host: Arc<Host>,
    /// Producer input limits.
    pub ingest: Arc<IngestLimits>,
    /// Largest deployable component.
    pub max_component_bytes: usize,
    /// When set, every `/v1` request needs `Authorization: Bearer <token>`.
    pub admin_token: Option<Arc<str>>,
}

/// A JSON error response: `{"error": message, "field": field?}`.
pub fn error(status: StatusCode, message: impl Into<String>, field: Option<&str>) -> Response {
    let mut body = json!({ "error": message.into() });
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    (status, Json(body)).into_response()
}

/// Builds the router.
pub fn router(state: ApiState) -> Router {
    let body_cap = state.ingest.max_body_bytes.max(state.max_component_bytes) + 1024;
    let v1 = Router::new()
        .route("/v1/topics/{topic}/messages", post(produce))
        .route("/v1/handlers/{name}", put(deploy))
        .route(
            "/v1/handlers/{name}/state/{partition_key}/{state_key}",
            get(state_get),
        )
        .route("/v1/handlers/{name}", axum::routing::delete(undeploy))
        .route("/v1/handlers/{name}/versions", get(versions))
        .route("/v1/handlers/{name}/rollback", post(rollback))
        .route("/v1/handlers/{name}/pause", post(pause))
        .route("/v1/handlers/{name}/canary/promote", post(canary_promote))
        .route("/v1/handlers/{name}/canary/abort", post(canary_abort))
        .route("/v1/handlers/{name}/resume", post(resume))
        .route("/v1/handlers/{name}/keys/{key}", get(key_info))
        .route("/v1/handlers/{name}/keys/{key}/pause", post(pause_key))
        .route("/v1/handlers/{name}/keys/{key}/resume", post(resume_key))
        .route(
            "/v1/handlers/{name}/dedup/{idempotency_key}",
            get(dedup_record),
        )
        .route("/v1/status", get(status))
        .route("/v1/dlq", get(dlq_list))
        .route("/v1/dlq/replay", post(dlq_replay))
        .route("/v1/dlq/drop", post(dlq_drop))
        .route("/v1/audit", get(audit))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .merge(v1)
        .route("/", get(status_page))
        .route("/ui", get(status_page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(body_cap))
        .with_state(state)
}

/// Rejects `/v1` requests without the admin token (when one is set), with
/// a constant-time comparison.
async fn require_token(
    State(api): State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use subtle::ConstantTimeEq;
    let Some(token) = &api.admin_token else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let message = match presented {
        Some(p) if bool::from(p.as_bytes().ct_eq(token.as_bytes())) => {
            return next.run(request).await
        }
        Some(_) => "wrong admin token",
        None => "this host requires `Authorization: Bearer <ORDO_ADMIN_TOKEN>`",
    };
    // Read (and discard) the body first, bounded like any request: a client
    // still sending a large body would otherwise see the connection drop
    // instead of this answer.
    let cap = api.ingest.max_body_bytes.max(api.max_component_bytes) + 1024;
    let _ = axum::body::to_bytes(request.into_body(), cap).await;
    error(StatusCode::UNAUTHORIZED, message, None)
}

async fn produce(State(api): State<ApiState>, Path(topic): Path<String>, body: Bytes) -> Response {
    if let Err(e) = crate::source::validate_topic_name(&topic) {
        return error(StatusCode::BAD_REQUEST, e, Some("topic"));
    }
    if !api.host.healthy() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ledger is not durable (a flush failed); restart the host",
            None,
        );
    }
    let limits = api.ingest.clone();
    let parsed = tokio::task::spawn_blocking(move || parse_batch(&body, &limits)).await;
    let messages = match parsed {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            return error(status, e.to_string(), Some(e.field()));
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    };
    match api.host.ingest(&topic, messages).await {
        Ok(offsets) => Json(json!({ "offsets": offsets })).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not appended: {e:#}"),
            None,
        ),
    }
}

#[derive(serde::Deserialize)]
struct DeployQuery {
    topic: Option<String>,
    from: Option<String>,
    comment: Option<String>,
    // Listed here rather than flattened: serde_urlencoded cannot parse
    // numbers inside a flattened struct.
    max_attempts: Option<u32>,
    initial_backoff_ms: Option<u64>,
    backoff_factor: Option<f64>,
    max_backoff_ms: Option<u64>,
    on_failure: Option<String>,
    canary: Option<u8>,
}

async fn deploy(
    State(api): State<ApiState>,
    Path(name): Path<String>,
    query: Result<Query<DeployQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text(), Some("query")),
    };
    let Some(topic) = q.topic else {
        return error(
            StatusCode::BAD_REQUEST,
            "query parameter `topic` is required",
            Some("topic"),
        );
    };
    let from_latest = match q.from.as_deref() {
        None | Some("earliest") => false,
        Some("latest") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("`from` must be `earliest` or `latest`, got {other:?}"),
                Some("from"),
            )
        }
    };
    if body.len() > api.max_component_bytes {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "component is {} bytes, over the {}-byte limit",
                body.len(),
                api.max_component_bytes
            ),
            Some("body"),
        );
    }
    match api
        .host
        .deploy(
            &name,
            &topic,
            body.to_vec(),
            DeployOptions {
                from_latest,
                comment: q.comment,
                policy: PolicyOverrides {
                    max_attempts: q.max_attempts,
                    initial_backoff_ms: q.initial_backoff_ms,
                    backoff_factor: q.backoff_factor,
                    max_backoff_ms: q.max_backoff_ms,
                    on_failure: q.on_failure,
                },
                canary: q.canary,
                limits: None,
            },
        )
        .await
    {
        Ok(v) => (
            StatusCode::CREATED,
            Json(json!({
                "name": v.name, "version": v.version, "topic": v.topic,
                "content_hash": v.content_hash, "size": v.size, "deployed_at_ms": v.deployed_at_ms,
                "policy": v.policy,
            })),
        )
            .into_response(),
        Err(e) => admin_error(e),
    }
}

fn admin_error(e: AdminError) -> Response {
    match e {
        AdminError::Invalid(e) => error(StatusCode::BAD_REQUEST, e.to_string(), Some("body")),
        AdminError::BadRequest(e) => error(StatusCode::BAD_REQUEST, e, None),
        AdminError::NotFound(e) => error(StatusCode::NOT_FOUND, e, None),
        AdminError::Conflict(e) => error(StatusCode::CONFLICT, e, None),
        e @ AdminError::Internal(_) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None)
        }
    }
}

/// `GET /v1/handlers/{name}/versions`.
async fn versions(State(api): State<ApiState>, Path(name): Path<String>) -> Response {
    match api.host.versions(&name) {
        Ok((versions, control)) => Json(json!({
            "name": name,
            "active": control.active_version,
            "paused": control.paused,
            "undeployed": control.undeployed,
            "versions": versions,
        }))
        .into_response(),
        Err(e) => admin_error(e),
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    to: Option<u64>,
}

/// `POST /v1/handlers/{name}/rollback` with optional `{"to": N}`.
async fn rollback(State(api): State<ApiState>, Path(name): Path<String>, body: Bytes) -> Response {
    let req: RollbackBody = if body.is_empty() {
        RollbackBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("malformed JSON body: {e}"),
                    Some("body"),
                )
            }
        }
    };
    match api.host.rollback(&name, req.to).await {
        Ok(v) => {
            Json(json!({ "name": v.name, "version": v.version, "content_hash": v.content_hash }))
                .into_response()
        }
        Err(e) => admin_error(e),
    }
}

async fn canary_promote(State(api): State<ApiState>, Path(name): Path<String>) -> Response {
    match api.host.end_canary(&name, true).await {
        Ok(v) => Json(json!({ "name": name, "version": v })).into_response(),
        Err(e) => admin_error(e),
    }
}

async fn canary_abort(State(api): State<ApiState>, Path(name): Path<String>) -> Response {
    match api.host.end_canary(&name, false).await {
        Ok(v) => Json(json!({ "name": name, "version": v })).into_response(),
        Err(e) => admin_error(e),
    }
}

/// `GET /v1/handlers/{name}/keys/{key}`: parked?, dead letters, state.
async fn key_info(
    State(api): State<ApiState>,
    Path((name, key)): Path<(String, String)>,
) -> Response {
    match api.host.key_info(&name, &key) {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no handler {name:?} is deployed"),
            None,
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"), None),
    }
}

async fn pause_key(
    State(api): State<ApiState>,
    Path((name, key)): Path<(String, String)>,
) -> Response {
    set_key_paused(api, name, key, true).await
}

async fn resume_key(
    State(api): State<ApiState>,
    Path((name, key)): Path<(String, String)>,
) -> Response {
    set_key_paused(api, name, key, false).await
}

async fn set_key_paused(api: ApiState, name: String, key: String, paused: bool) -> Response {
    match api.host.pause_key(&name, &key, paused).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({ "name": name, "key": key, "paused": paused })),
        )
            .into_response(),
        Err(e) => admin_error(e),
    }
}

async fn pause(State(api): State<ApiState>, Path(name): Path<String>) -> Response {
    match api.host.set_paused(&name, true).await {
        Ok(()) => Json(json!({ "name": name, "paused": true })).into_response(),
        Err(e) => admin_error(e),
    }
}

async fn resume(State(api): State<ApiState>, Path(name): Path<String>) -> Response {
    match api.host.set_paused(&name, false).await {
        Ok(()) => Json(json!({ "name": name, "paused": false })).into_response(),
        Err(e) => admin_error(e),
    }
}

#[derive(serde::Deserialize)]
struct UndeployQuery {
    #[serde(default)]
    purge: bool,
}

/// `DELETE /v1/handlers/{name}[?purge=true]`.
async fn undeploy(
    State(api): State<ApiState>,
    Path(name): Path<String>,
    query: Result<Query<UndeployQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text(), Some("query")),
    };
    match api.host.undeploy(&name, q.purge).await {
        Ok(()) => {
            Json(json!({ "name": name, "undeployed": true, "purged": q.purge })).into_response()
        }
        Err(e) => admin_error(e),
    }
}

/// `GET /v1/handlers/{name}/dedup/{idempotency_key}`: what happened to a message.
async fn dedup_record(
    State(api): State<ApiState>,
    Path((name, idempotency_key)): Path<(String, String)>,
) -> Response {
    // Off the async workers: right after a start the lookup waits for the
    // idempotency index to be filled.
    let (host, n, k) = (api.host.clone(), name.clone(), idempotency_key.clone());
    let found = tokio::task::spawn_blocking(move || host.dedup_record(&n, &k))
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the lookup failed: {e}")));
    match found {
        Ok(Some(r)) => Json(json!({
            "handler": name,
            "idempotency_key": idempotency_key,
            "partition": r.partition,
            "offset": r.offset,
            "version": r.version,
            "outcome": r.outcome.as_str(),
            "committed_at_ms": r.committed_at_ms,
            "payload_sha256_128": hex::encode(r.payload_hash),
        }))
        .into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "no record of this idempotency key",
            None,
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"), None),
    }
}

#[derive(serde::Deserialize)]
struct DlqQuery {
    handler: Option<String>,
    key: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/dlq?handler=&key=&limit=`: dead letters, oldest first.
async fn dlq_list(State(api): State<ApiState>, Query(q): Query<DlqQuery>) -> Response {
    let handlers = match q.handler {
        Some(h) => vec![h],
        None => api.host.handler_names(),
    };
    let limit = q.limit.unwrap_or(1000);
    let mut entries = Vec::new();
    for h in handlers {
        match api
            .host
            .dlq_list(&h, q.key.as_deref(), limit - entries.len().min(limit))
        {
            Ok(list) => entries.extend(list),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"), None),
        }
    }
    Json(json!({ "entries": entries })).into_response()
}

/// Body of `POST /v1/dlq/replay` and `/v1/dlq/drop`: a handler and exactly
/// one of `seq`, `key`, `all`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DlqActionBody {
    handler: String,
    seq: Option<u64>,
    key: Option<String>,
    #[serde(default)]
    all: bool,
    reason: Option<String>,
}

async fn dlq_action(api: ApiState, body: Bytes, action: DlqAction) -> Response {
    let req: DlqActionBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("malformed JSON body: {e}"),
                Some("body"),
            )
        }
    };
    let selector = match (req.seq, req.key, req.all) {
        (Some(s), None, false) => DlqSelector::Seq(s),
        (None, Some(k), false) => DlqSelector::Key(k),
        (None, None, true) => DlqSelector::All,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of `seq`, `key`, `all: true`",
                Some("body"),
            )
        }
    };
    match api
        .host
        .dlq_request(&req.handler, selector, action, req.reason)
        .await
    {
        Ok(n) => (StatusCode::ACCEPTED, Json(json!({ "scheduled": n }))).into_response(),
        Err(e) => admin_error(e),
    }
}

async fn dlq_replay(State(api): State<ApiState>, body: Bytes) -> Response {
    dlq_action(api, body, DlqAction::Replay).await
}

async fn dlq_drop(State(api): State<ApiState>, body: Bytes) -> Response {
    dlq_action(api, body, DlqAction::Drop).await
}

#[derive(serde::Deserialize)]
struct AuditQuery {
    handler: Option<String>,
}

/// `GET /v1/audit?handler=`: operator actions, oldest first.
async fn audit(State(api): State<ApiState>, Query(q): Query<AuditQuery>) -> Response {
    match api.host.audit(q.handler.as_deref()) {
        Ok(records) => {
            let records: Vec<_> = records
                .into_iter()
                .map(|(seq, r)| json!({ "seq": seq, "at_ms": r.at_ms, "action": r.action, "handler": r.handler, "detail": r.detail }))
                .collect();
            Json(json!({ "records": records })).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"), None),
    }
}

async fn state_get(
    State(api): State<ApiState>,
    Path((name, partition_key, state_key)): Path<(String, String, String)>,
) -> Response {
    match api.host.state_get(&name, &partition_key, &state_key) {
        Ok(Some(bytes)) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "no such state", None),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"), None),
    }
}

async fn status(State(api): State<ApiState>) -> Response {
    let topics = match api.host.topics_info() {
        Ok(t) => t,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"), None),
    };
    let (backlog, relayed, relay_failures) = api.host.outbox_status();
    let jetstream: Vec<Value> = api
        .host
        .jetstreams()
        .all()
        .map(|js| {
            json!({
                "topic": js.topic,
                "stream": js.stream,
                "subject": js.subject,
                "partitions": js.config.partitions,
                "url": js.config.url,
            })
        })
        .collect();
    match api.host.status() {
        Ok(handlers) => Json(json!({
            "handlers": handlers,
            "topics": topics,
            "jetstream": jetstream,
            "outbox": {"backlog": backlog, "relayed": relayed, "relay_failures": relay_failures},
            "healthy": api.host.healthy(),
        }))
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"), None),
    }
}

async fn metrics(State(api): State<ApiState>) -> Response {
    let host = api.host.clone();
    match tokio::task::spawn_blocking(move || host.metrics_text()).await {
        Ok(Ok(text)) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"), None),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

/// The status page: static HTML whose script reads `/v1/status` and
/// `/v1/dlq` (with `#token=...` as the bearer token when one is needed).
async fn status_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        include_str!("status.html"),
    )
        .into_response()
}

async fn healthz(State(api): State<ApiState>) -> Response {
    if api.host.healthy() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "ledger flush failed").into_response()
    }
}
