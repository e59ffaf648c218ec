//! `/admin/...`: the audit trail (JSON or CSV), worker listing, and
//! cordon, uncordon and drain of a worker.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiError;
use super::extract::Query;
use crate::auth::Caller;
use crate::events::AuditRecord;
use crate::service::{Error, Service, WorkerStatus};
use crate::store::AuditFilter;
use crate::worker::AdminState;

pub fn router() -> OpenApiRouter<Service> {
    OpenApiRouter::new()
        .routes(routes!(audit))
        .routes(routes!(workers))
        .routes(routes!(replicas))
        .routes(routes!(worker))
        .routes(routes!(set_admin_state))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// Events per page (default 100).
    limit: Option<u64>,
    actor: Option<String>,
    /// An audit action such as `sandbox.spawn`.
    action: Option<String>,
    target: Option<String>,
    /// Cursor from the previous page's `X-Next-Cursor` header.
    after: Option<String>,
    /// `json` (the default) or `csv`.
    format: Option<String>,
}

/// One CSV field: a value a spreadsheet would run as a formula (it starts
/// with `=`, `+`, `-`, `@`, a tab or a carriage return; OWASP's list) gets
/// a leading `'`, and the field is quoted when it needs it (RFC 4180).
/// Request ids and details come from callers, even unauthenticated ones.
fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_string()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

/// The audit trail the caller may see, newest first, a page at a time.
#[utoipa::path(get, operation_id = "listAuditEvents", path = "/admin/audit", tag = "admin",
    params(AuditQuery),
    responses((status = 200, description = "A page of audit events",
        headers(("x-next-cursor" = String, description = "The next page's `after`, when there is one")),
        content((Vec<AuditRecord> = "application/json"), (String = "text/csv")))))]
async fn audit(
    State(service): State<Service>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    let filter = AuditFilter {
        actor: q.actor,
        action: q.action,
        target: q.target,
        ..Default::default()
    };
    let page = service
        .audit_page(&caller, filter, Some(q.limit.unwrap_or(100)), q.after)
        .await?;
    let next = page
        .has_next_page
        .then(|| page.items.last().map(|(cursor, _)| cursor.clone()))
        .flatten();
    let events: Vec<AuditRecord> = page.items.into_iter().map(|(_, m)| m.into()).collect();
    let mut response = match q.format.as_deref() {
        None | Some("json") => Json(events).into_response(),
        Some("csv") => {
            let mut out = String::from(
                "id,created_at,actor,tenant_id,action,target,outcome,request_id,detail\n",
            );
            for e in &events {
                let row = [
                    e.id.as_str(),
                    &e.created_at.to_rfc3339(),
                    &e.actor,
                    &e.tenant_id,
                    &e.action,
                    &e.target,
                    &e.outcome,
                    &e.request_id,
                    e.detail.as_deref().unwrap_or(""),
                ]
                .map(csv_field)
                .join(",");
                out.push_str(&row);
                out.push('\n');
            }
            ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response()
        }
        Some(other) => {
            return Err(ApiError(Error::BadRequest(format!(
                "format must be json or csv, not {other:?}"
            ))));
        }
    };
    if let Some(next) = next
        && let Ok(value) = header::HeaderValue::from_str(&next)
    {
        response.headers_mut().insert("x-next-cursor", value);
    }
    Ok(response)
}

/// Every worker with its admin state and live sandboxes (admins).
#[utoipa::path(get, operation_id = "adminListWorkers", path = "/admin/workers", tag = "admin",
    responses((status = 200, description = "Workers by id", body = Vec<WorkerStatus>)))]
async fn workers(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<Vec<WorkerStatus>>, ApiError> {
    Ok(Json(service.admin_workers(&caller).await?))
}

/// The control-plane replicas sharing this store (admins).
#[utoipa::path(get, operation_id = "listReplicas", path = "/admin/replicas", tag = "admin",
    responses((status = 200, description = "Replicas", body = Vec<crate::service::cluster::ReplicaStatus>)))]
async fn replicas(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<Vec<crate::service::cluster::ReplicaStatus>>, ApiError> {
    Ok(Json(service.admin_replicas(&caller).await?))
}

/// One worker (admins).
#[utoipa::path(get, operation_id = "adminGetWorker", path = "/admin/workers/{id}", tag = "admin",
    params(("id" = String, Path, description = "Worker id")),
    responses((status = 200, description = "The worker", body = WorkerStatus)))]
async fn worker(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<WorkerStatus>, ApiError> {
    Ok(Json(service.admin_worker(&caller, &id).await?))
}

/// Cordons (no new sandboxes), uncordons or drains a worker (admins).
#[utoipa::path(post, operation_id = "setWorkerAdminState", path = "/admin/workers/{id}/{action}", tag = "admin",
    params(("id" = String, Path, description = "Worker id"),
        ("action" = String, Path, description = "`cordon`, `uncordon` or `drain`")),
    responses((status = 200, description = "The worker with its new admin state", body = WorkerStatus)))]
async fn set_admin_state(
    State(service): State<Service>,
    caller: Caller,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<WorkerStatus>, ApiError> {
    let state = match action.as_str() {
        "cordon" => AdminState::Cordoned,
        "uncordon" => AdminState::Active,
        "drain" => AdminState::Draining,
        other => {
            return Err(Error::NotFound(format!(
                "no worker action {:?}: use cordon, uncordon or drain",
                other.chars().take(40).collect::<String>()
            ))
            .into());
        }
    };
    Ok(Json(
        service.set_worker_admin_state(&caller, &id, state).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::csv_field;

    #[test]
    fn csv_fields_never_start_a_formula() {
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("+1"), "'+1");
        assert_eq!(csv_field("-2+3"), "'-2+3");
        assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_field("\tx"), "'\tx");
        assert_eq!(csv_field("\r=x"), "\"'\r=x\"");
        assert_eq!(csv_field("sandbox.spawn"), "sandbox.spawn");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field(""), "");
    }
}
