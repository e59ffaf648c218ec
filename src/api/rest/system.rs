//! Health, readiness, providers, workers, pool and quota summary, plus a
//! sandbox's logs and stats.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::Query;
use super::{ApiError, Status};
use crate::auth::Caller;
use crate::provider::RuntimeStats;
use crate::service::{HealthReport, PoolStatus, ProviderStatus, Service, WorkerStatus};

pub fn router() -> OpenApiRouter<Service> {
    // A heartbeat is small: its cap keeps an unauthenticated body cheap.
    let (schemas, paths, heartbeat) = routes!(worker_heartbeat);
    let heartbeat = heartbeat.layer(axum::extract::DefaultBodyLimit::max(64 * 1024));
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(providers))
        .routes(routes!(test_providers))
        .routes(routes!(workers))
        .routes((schemas, paths, heartbeat))
        .routes(routes!(pool_status))
        .routes(routes!(logs))
        .routes(routes!(stats))
        .routes(routes!(crate::api::metrics::scrape))
}

/// This replica's health; anyone may read it.
#[utoipa::path(get, operation_id = "health", path = "/health", tag = "system", security(()),
    responses((status = 200, description = "Up", body = HealthReport)))]
async fn health(State(service): State<Service>) -> Json<HealthReport> {
    Json(service.health())
}

/// Liveness: the process answers.
#[utoipa::path(get, operation_id = "live", path = "/live", tag = "system", security(()),
    responses((status = 200, description = "`{\"status\":\"ok\"}`", body = Status)))]
async fn live() -> Json<Status> {
    Json(Status::new("ok"))
}

/// Readiness: not shutting down, the store answers and the default
/// provider is healthy.
#[utoipa::path(get, operation_id = "ready", path = "/ready", tag = "system", security(()),
    responses((status = 200, description = "`{\"status\":\"ready\"}`", body = Status)))]
async fn ready(State(service): State<Service>) -> Result<Json<Status>, ApiError> {
    service.ready().await?;
    Ok(Json(Status::new("ready")))
}

/// The providers and their last health check.
#[utoipa::path(get, operation_id = "listProviders", path = "/providers", tag = "system",
    responses((status = 200, description = "Providers by name", body = Vec<ProviderStatus>)))]
async fn providers(State(service): State<Service>) -> Json<Vec<ProviderStatus>> {
    Json(service.providers())
}

/// Checks every provider's health now.
#[utoipa::path(post, operation_id = "testProviders", path = "/providers/test", tag = "system",
    responses((status = 200, description = "Whether each provider is healthy", body = BTreeMap<String, bool>)))]
async fn test_providers(State(service): State<Service>) -> Json<BTreeMap<String, bool>> {
    Json(service.test_providers().await)
}

/// The workers and what they offer.
#[utoipa::path(get, operation_id = "listWorkers", path = "/workers", tag = "workers",
    responses((status = 200, description = "Workers by id", body = Vec<WorkerStatus>)))]
async fn workers(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<Vec<WorkerStatus>>, ApiError> {
    Ok(Json(service.workers(&caller).await?))
}

/// A `stacyvm worker` registering or heartbeating; authenticated by its
/// worker token (`Authorization: Bearer <token>`), not an API key.
#[utoipa::path(post, operation_id = "workerHeartbeat", path = "/workers/heartbeat", tag = "workers", security(("worker_token" = [])),
    request_body(content = serde_json::Value, description = "The worker's id, endpoint, version and snapshot of its providers"),
    responses((status = 200, description = "`{\"status\":\"ok\"}`", body = Status)))]
async fn worker_heartbeat(
    State(service): State<Service>,
    headers: axum::http::HeaderMap,
    super::extract::JsonBody(beat): super::extract::JsonBody<crate::worker::rpc::Heartbeat>,
) -> Result<Json<Status>, ApiError> {
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    service.worker_heartbeat(authorization, beat).await?;
    Ok(Json(Status::new("ok")))
}

/// `GET /pool/status`: `{"enabled": false}` when the caller sees no pool
/// (the original server's answer), else the pools.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
enum PoolAnswer {
    Disabled(PoolOff),
    Enabled(PoolOn),
}

/// No pool the caller may see.
#[derive(Serialize, utoipa::ToSchema)]
// Nothing else is in this answer, and the document says so.
#[serde(deny_unknown_fields)]
struct PoolOff {
    /// Always `false`.
    enabled: bool,
}

/// The pools, with `vms` and `max_vms`, the original's names for what is
/// warm now and the cap.
#[derive(Serialize, utoipa::ToSchema)]
struct PoolOn {
    #[serde(flatten)]
    status: PoolStatus,
    vms: u32,
    max_vms: u32,
}

/// Warm pools. Pool mode (users sharing one sandbox) does not exist here.
#[utoipa::path(get, operation_id = "poolStatus", path = "/pool/status", tag = "system",
    responses((status = 200, description = "The warm pools the caller may see", body = PoolAnswer)))]
async fn pool_status(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<PoolAnswer>, ApiError> {
    let status = service.pool_status(&caller).await?;
    if !status.enabled {
        return Ok(Json(PoolAnswer::Disabled(PoolOff { enabled: false })));
    }
    Ok(Json(PoolAnswer::Enabled(PoolOn {
        vms: status.warm,
        max_vms: status.max_warm,
        status,
    })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct LogsQuery {
    /// How many of the last lines (default 100).
    lines: Option<usize>,
}

/// The last lines of a sandbox's diagnostics.
#[utoipa::path(get, operation_id = "sandboxLogs", path = "/sandboxes/{id}/logs", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id"), LogsQuery),
    responses((status = 200, description = "Lines, oldest first", body = Vec<String>)))]
async fn logs(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Json<Vec<String>>, ApiError> {
    let lines = q.lines.unwrap_or(100);
    Ok(Json(service.sandbox_logs(&caller, &id, lines).await?))
}

/// A sandbox's resource usage now.
#[utoipa::path(get, operation_id = "sandboxStats", path = "/sandboxes/{id}/stats", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, description = "CPU, memory and processes", body = RuntimeStats)))]
async fn stats(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RuntimeStats>, ApiError> {
    Ok(Json(service.sandbox_stats(&caller, &id).await?))
}
