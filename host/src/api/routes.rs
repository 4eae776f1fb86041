//! The axum router: ingest, deploy, state, status, health.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;

use super::ingest::{parse_batch, IngestLimits};
use crate::host::{DeployError, Host};

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct ApiState {
    /// The host.
    pub host: Arc<Host>,
    /// Producer input limits.
    pub ingest: Arc<IngestLimits>,
    /// Largest deployable component.
    pub max_component_bytes: usize,
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
    Router::new()
        .route("/v1/topics/{topic}/messages", post(produce))
        .route("/v1/handlers/{name}", put(deploy))
        .route(
            "/v1/handlers/{name}/state/{partition_key}/{state_key}",
            get(state_get),
        )
        .route("/v1/status", get(status))
        .route("/healthz", get(healthz))
        .layer(DefaultBodyLimit::max(body_cap))
        .with_state(state)
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
}

async fn deploy(
    State(api): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<DeployQuery>,
    body: Bytes,
) -> Response {
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
        .deploy(&name, &topic, body.to_vec(), from_latest, q.comment)
        .await
    {
        Ok(v) => (
            StatusCode::CREATED,
            Json(json!({
                "name": v.name, "version": v.version, "topic": v.topic,
                "content_hash": v.content_hash, "size": v.size, "deployed_at_ms": v.deployed_at_ms,
            })),
        )
            .into_response(),
        Err(DeployError::Invalid(e)) => error(StatusCode::BAD_REQUEST, e.to_string(), Some("body")),
        Err(DeployError::BadRequest(e)) => error(StatusCode::BAD_REQUEST, e, None),
        Err(DeployError::Conflict(e)) => error(StatusCode::CONFLICT, e, None),
        Err(e @ DeployError::Internal(_)) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None)
        }
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
    match api.host.status() {
        Ok(handlers) => {
            Json(json!({ "handlers": handlers, "healthy": api.host.healthy() })).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"), None),
    }
}

async fn healthz(State(api): State<ApiState>) -> Response {
    if api.host.healthy() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "ledger flush failed").into_response()
    }
}
