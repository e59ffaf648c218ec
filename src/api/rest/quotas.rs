//! `/quotas`: per-owner overrides, usage, and the redacted summary.

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::JsonBody;
use super::{ApiError, Status};
use crate::auth::Caller;
use crate::service::{QuotaInput, QuotaPolicy, QuotaUsage, Service};
use crate::store::QuotaSummary;

pub fn router() -> OpenApiRouter<Service> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(admin_list))
        .routes(routes!(summary))
        .routes(routes!(get_one, put, delete))
        .routes(routes!(usage))
}

/// An owner's overrides; a field left out clears that override.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"max_sandboxes": 5, "max_ttl": "2h"}))]
struct QuotaBody {
    max_sandboxes: Option<u64>,
    /// A Go duration.
    max_ttl: Option<String>,
    /// A Go duration.
    max_exec_timeout: Option<String>,
    max_memory_mb: Option<u32>,
    max_vcpus: Option<u32>,
    max_disk_mb: Option<u32>,
    /// Accepted (the SDK shape carries it) but the path names the owner.
    #[allow(dead_code)]
    owner_id: Option<String>,
}

/// Every owner's overrides (admins).
#[utoipa::path(get, operation_id = "listQuotas", path = "/quotas", tag = "quotas",
    responses((status = 200, description = "Overrides by owner", body = Vec<QuotaPolicy>)))]
async fn list(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<Vec<QuotaPolicy>>, ApiError> {
    Ok(Json(service.list_quotas(&caller).await?))
}

/// The same as `GET /quotas`, where the original server has it.
#[utoipa::path(get, operation_id = "adminListQuotas", path = "/admin/quotas", tag = "quotas",
    responses((status = 200, description = "Overrides by owner", body = Vec<QuotaPolicy>)))]
async fn admin_list(
    state: State<Service>,
    caller: Caller,
) -> Result<Json<Vec<QuotaPolicy>>, ApiError> {
    list(state, caller).await
}

/// How many owners have each kind of override (names no owner).
#[utoipa::path(get, operation_id = "quotaSummary", path = "/quotas/summary", tag = "quotas",
    responses((status = 200, description = "Counts of overrides", body = QuotaSummary)))]
async fn summary(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<QuotaSummary>, ApiError> {
    Ok(Json(service.quota_summary(&caller).await?))
}

/// One owner's overrides.
#[utoipa::path(get, operation_id = "getQuota", path = "/quotas/{owner}", tag = "quotas",
    params(("owner" = String, Path, description = "Owner id")),
    responses((status = 200, description = "The overrides", body = QuotaPolicy)))]
async fn get_one(
    State(service): State<Service>,
    caller: Caller,
    Path(owner): Path<String>,
) -> Result<Json<QuotaPolicy>, ApiError> {
    Ok(Json(service.get_quota(&caller, &owner).await?))
}

/// Sets one owner's overrides (admins).
#[utoipa::path(put, operation_id = "setQuota", path = "/quotas/{owner}", tag = "quotas",
    params(("owner" = String, Path, description = "Owner id")),
    request_body(content = Option<QuotaBody>),
    responses((status = 200, description = "The overrides as now stored", body = QuotaPolicy)))]
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

/// Clears one owner's overrides (admins).
#[utoipa::path(delete, operation_id = "deleteQuota", path = "/quotas/{owner}", tag = "quotas",
    params(("owner" = String, Path, description = "Owner id")),
    responses((status = 200, description = "`{\"status\":\"deleted\"}`", body = Status)))]
async fn delete(
    State(service): State<Service>,
    caller: Caller,
    Path(owner): Path<String>,
) -> Result<Json<Status>, ApiError> {
    service.delete_quota(&caller, &owner).await?;
    Ok(Json(Status::new("deleted")))
}

/// One owner's usage against its effective limits.
#[utoipa::path(get, operation_id = "quotaUsage", path = "/quotas/{owner}/usage", tag = "quotas",
    params(("owner" = String, Path, description = "Owner id")),
    responses((status = 200, description = "Usage and limits", body = QuotaUsage)))]
async fn usage(
    State(service): State<Service>,
    caller: Caller,
    Path(owner): Path<String>,
) -> Result<Json<QuotaUsage>, ApiError> {
    Ok(Json(service.quota_usage(&caller, &owner).await?))
}
