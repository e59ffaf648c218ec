//! Health, readiness, providers, workers, pool and quota summary, plus a
//! sandbox's logs and stats.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use super::extract::Query;
use crate::auth::Caller;
use crate::provider::RuntimeStats;
use crate::service::{HealthReport, ProviderStatus, Service, WorkerStatus};

pub fn router() -> Router<Service> {
    Router::new()
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/providers", get(providers))
        .route("/providers/test", post(test_providers))
        .route("/workers", get(workers))
        // A heartbeat is small: its cap keeps an unauthenticated body cheap.
        .route(
            "/workers/heartbeat",
            post(worker_heartbeat).layer(axum::extract::DefaultBodyLimit::max(64 * 1024)),
        )
        .route("/pool/status", get(pool_status))
        .route("/sandboxes/{id}/logs", get(logs))
        .route("/sandboxes/{id}/stats", get(stats))
}

async fn health(State(service): State<Service>) -> Json<HealthReport> {
    Json(service.health())
}

async fn live() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(service): State<Service>) -> Result<Json<Value>, ApiError> {
    service.ready().await?;
    Ok(Json(json!({ "status": "ready" })))
}

async fn providers(State(service): State<Service>) -> Json<Vec<ProviderStatus>> {
    Json(service.providers())
}

async fn test_providers(State(service): State<Service>) -> Json<BTreeMap<String, bool>> {
    Json(service.test_providers().await)
}

async fn workers(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<Vec<WorkerStatus>>, ApiError> {
    Ok(Json(service.workers(&caller).await?))
}

/// A `stacyvm worker` registering or heartbeating; authenticated by its
/// worker token, not an API key.
async fn worker_heartbeat(
    State(service): State<Service>,
    headers: axum::http::HeaderMap,
    super::extract::JsonBody(beat): super::extract::JsonBody<crate::worker::rpc::Heartbeat>,
) -> Result<Json<Value>, ApiError> {
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    service.worker_heartbeat(authorization, beat).await?;
    Ok(Json(json!({ "status": "ok" })))
}

/// Warm pools: `{"enabled": false}` when the caller sees none (as the
/// original server answers), else the pools with `vms` and `max_vms`, the
/// original's names for what is warm now and the cap. Pool mode (users
/// sharing one sandbox) does not exist here.
async fn pool_status(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let status = service.pool_status(&caller).await?;
    // The original server's answer when there is no pool.
    if !status.enabled {
        return Ok(Json(json!({ "enabled": false })));
    }
    let mut answer = serde_json::to_value(&status).map_err(|e| {
        ApiError::from(crate::service::Error::internal(format!("pool status: {e}")))
    })?;
    if let Some(object) = answer.as_object_mut() {
        object.insert("vms".into(), json!(status.warm));
        object.insert("max_vms".into(), json!(status.max_warm));
    }
    Ok(Json(answer))
}

#[derive(Debug, Deserialize)]
struct LogsQuery {
    lines: Option<usize>,
}

async fn logs(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Json<Vec<String>>, ApiError> {
    let lines = q.lines.unwrap_or(100);
    Ok(Json(service.sandbox_logs(&caller, &id, lines).await?))
}

async fn stats(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RuntimeStats>, ApiError> {
    Ok(Json(service.sandbox_stats(&caller, &id).await?))
}
