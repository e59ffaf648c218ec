//! `/admin/...`: the audit trail (JSON or CSV), worker listing, and
//! cordon, uncordon and drain of a worker.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::ApiError;
use super::extract::Query;
use crate::auth::Caller;
use crate::events::AuditRecord;
use crate::service::{Error, Service, WorkerStatus};
use crate::store::AuditFilter;
use crate::worker::AdminState;

pub fn router() -> Router<Service> {
    Router::new()
        .route("/admin/audit", get(audit))
        .route("/admin/workers", get(workers))
        .route("/admin/replicas", get(replicas))
        .route("/admin/workers/{id}", get(worker))
        .route("/admin/workers/{id}/{action}", post(set_admin_state))
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<u64>,
    actor: Option<String>,
    action: Option<String>,
    target: Option<String>,
    /// Cursor from the previous page's `X-Next-Cursor` header.
    after: Option<String>,
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

async fn workers(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<Vec<WorkerStatus>>, ApiError> {
    Ok(Json(service.admin_workers(&caller).await?))
}

async fn replicas(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<Vec<crate::service::cluster::ReplicaStatus>>, ApiError> {
    Ok(Json(service.admin_replicas(&caller).await?))
}

async fn worker(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<WorkerStatus>, ApiError> {
    Ok(Json(service.admin_worker(&caller, &id).await?))
}

/// `POST /admin/workers/{id}/cordon|uncordon|drain`.
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
