//! `/quotas`: per-owner overrides, usage, and the redacted summary.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use super::extract::JsonBody;
use crate::auth::Caller;
use crate::service::{QuotaInput, QuotaPolicy, QuotaUsage, Service};
use crate::store::QuotaSummary;

pub fn router() -> Router<Service> {
    Router::new()
        .route("/quotas", get(list))
        .route("/admin/quotas", get(list))
        .route("/quotas/summary", get(summary))
        .route("/quotas/{owner}", get(get_one).put(put).delete(delete))
        .route("/quotas/{owner}/usage", get(usage))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaBody {
    max_sandboxes: Option<u64>,
    max_ttl: Option<String>,
    max_exec_timeout: Option<String>,
    max_memory_mb: Option<u32>,
    max_vcpus: Option<u32>,
    max_disk_mb: Option<u32>,
    /// Accepted (the SDK shape carries it) but the path names the owner.
    #[allow(dead_code)]
    owner_id: Option<String>,
}

async fn list(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<Vec<QuotaPolicy>>, ApiError> {
    Ok(Json(service.list_quotas(&caller).await?))
}

async fn summary(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<QuotaSummary>, ApiError> {
    Ok(Json(service.quota_summary(&caller).await?))
}

async fn get_one(
    State(service): State<Service>,
    caller: Caller,
    Path(owner): Path<String>,
) -> Result<Json<QuotaPolicy>, ApiError> {
    Ok(Json(service.get_quota(&caller, &owner).await?))
}

async fn put(
    State(service): State<Service>,
    caller: Caller,
    Path(owner): Path<String>,
    JsonBody(body): JsonBody<QuotaBody>,
) -> Result<Json<QuotaPolicy>, ApiError> {
    let input = QuotaInput {
        max_sandboxes: body.max_sandboxes,
        max_ttl: body.max_ttl,
        max_exec_timeout: body.max_exec_timeout,
        max_memory_mb: body.max_memory_mb,
        max_vcpus: body.max_vcpus,
        max_disk_mb: body.max_disk_mb,
    };
    Ok(Json(service.set_quota(&caller, &owner, input).await?))
}

async fn delete(
    State(service): State<Service>,
    caller: Caller,
    Path(owner): Path<String>,
) -> Result<Json<Value>, ApiError> {
    service.delete_quota(&caller, &owner).await?;
    Ok(Json(json!({ "status": "deleted" })))
}

async fn usage(
    State(service): State<Service>,
    caller: Caller,
    Path(owner): Path<String>,
) -> Result<Json<QuotaUsage>, ApiError> {
    Ok(Json(service.quota_usage(&caller, &owner).await?))
}
