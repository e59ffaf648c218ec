//! `/sandboxes`: spawn, admission, list, get, extend, destroy, prune.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use super::extract::JsonBody;
use crate::auth::Caller;
use crate::service::{AdmissionDecision, Error, Sandbox, Service, SpawnRequest};

pub fn router() -> Router<Service> {
    Router::new()
        .route("/sandboxes", post(spawn).get(list).delete(prune))
        .route("/sandboxes/admission", post(admission))
        .route("/sandboxes/{id}", get(get_one).delete(destroy))
        .route("/sandboxes/{id}/extend", post(extend))
}

/// The body of `POST /sandboxes` and `/sandboxes/admission`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnBody {
    image: Option<String>,
    provider: Option<String>,
    memory_mb: Option<u32>,
    vcpus: Option<u32>,
    disk_mb: Option<u32>,
    ttl: Option<String>,
    template: Option<String>,
    owner_id: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
    /// Labels the worker must carry (an extension; the SDK never sends it).
    worker_labels: Option<BTreeMap<String, String>>,
}

impl From<SpawnBody> for SpawnRequest {
    fn from(b: SpawnBody) -> Self {
        SpawnRequest {
            image: b.image,
            provider: b.provider,
            memory_mb: b.memory_mb,
            vcpus: b.vcpus,
            disk_mb: b.disk_mb,
            ttl: b.ttl,
            template: b.template,
            owner_id: b.owner_id,
            metadata: b.metadata.unwrap_or_default(),
            idempotency_key: None,
            worker_labels: b.worker_labels.unwrap_or_default(),
        }
    }
}

/// The header a client retrying a spawn sends with the same value.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

async fn spawn(
    State(service): State<Service>,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(body): JsonBody<SpawnBody>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let mut req = SpawnRequest::from(body);
    req.idempotency_key = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| {
                    Error::BadRequest("the Idempotency-Key header is not printable ASCII".into())
                })?
                .to_string(),
        ),
    };
    let sandbox = service.spawn(&caller, req).await?;
    Ok((StatusCode::CREATED, Json(sandbox)))
}

async fn admission(
    State(service): State<Service>,
    caller: Caller,
    JsonBody(body): JsonBody<SpawnBody>,
) -> Result<Json<AdmissionDecision>, ApiError> {
    Ok(Json(service.admission(&caller, body.into()).await?))
}

async fn list(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<Vec<Sandbox>>, ApiError> {
    Ok(Json(service.list_sandboxes(&caller).await?))
}

async fn prune(State(service): State<Service>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let pruned = service.prune_expired(&caller).await?;
    Ok(Json(json!({ "pruned": pruned })))
}

async fn get_one(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(service.get_sandbox(&caller, &id).await?))
}

async fn destroy(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    service.destroy_sandbox(&caller, &id).await?;
    Ok(Json(json!({ "status": "destroyed" })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtendBody {
    ttl: Option<String>,
}

async fn extend(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ExtendBody>,
) -> Result<Json<Sandbox>, ApiError> {
    let ttl = body.ttl.unwrap_or_default();
    Ok(Json(service.extend_sandbox(&caller, &id, &ttl).await?))
}
