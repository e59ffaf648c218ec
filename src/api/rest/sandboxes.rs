//! `/sandboxes`: spawn, admission, list, get, extend, destroy, prune.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::JsonBody;
use super::{ApiError, Pruned, Status};
use crate::auth::Caller;
use crate::service::{AdmissionDecision, Error, Sandbox, Service, SpawnRequest};

pub fn router() -> OpenApiRouter<Service> {
    OpenApiRouter::new()
        .routes(routes!(spawn, list, prune))
        .routes(routes!(admission))
        .routes(routes!(get_one, destroy))
        .routes(routes!(extend))
}

/// The body of `POST /sandboxes` and `/sandboxes/admission`; every field
/// is optional (the template's, then the server's defaults apply).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"ttl": "10m", "metadata": {"purpose": "demo"}}))]
pub struct SpawnBody {
    /// Image reference; defaults to `defaults.image`.
    image: Option<String>,
    /// Provider name (`docker`, `native`, ...); defaults to the server's.
    provider: Option<String>,
    memory_mb: Option<u32>,
    vcpus: Option<u32>,
    /// Writable disk in MiB.
    disk_mb: Option<u32>,
    /// Time to live as a Go duration (`90s`, `1h30m`).
    ttl: Option<String>,
    /// A template whose settings this spawn starts from.
    template: Option<String>,
    /// Whom the sandbox belongs to (admins, or the caller itself).
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

/// Spawns a sandbox. A retry with the same `Idempotency-Key` answers the
/// sandbox the first request made.
#[utoipa::path(post, operation_id = "spawnSandbox", path = "/sandboxes", tag = "sandboxes",
    request_body(content = Option<SpawnBody>, description = "What to spawn; an empty body takes every default"),
    params(("Idempotency-Key" = Option<String>, Header, description = "A client's key for this spawn (printable ASCII)")),
    responses((status = 201, description = "Spawned and running", body = Sandbox)))]
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

/// Whether a spawn with this body would be admitted now, and why not.
#[utoipa::path(post, operation_id = "checkAdmission", path = "/sandboxes/admission", tag = "sandboxes",
    request_body(content = Option<SpawnBody>),
    responses((status = 200, description = "The admission decision", body = AdmissionDecision)))]
async fn admission(
    State(service): State<Service>,
    caller: Caller,
    JsonBody(body): JsonBody<SpawnBody>,
) -> Result<Json<AdmissionDecision>, ApiError> {
    Ok(Json(service.admission(&caller, body.into()).await?))
}

/// The sandboxes the caller may see.
#[utoipa::path(get, operation_id = "listSandboxes", path = "/sandboxes", tag = "sandboxes",
    responses((status = 200, description = "Live sandboxes, oldest first", body = Vec<Sandbox>)))]
async fn list(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<Vec<Sandbox>>, ApiError> {
    Ok(Json(service.list_sandboxes(&caller).await?))
}

/// Destroys the caller's sandboxes whose TTL has passed.
#[utoipa::path(delete, operation_id = "pruneSandboxes", path = "/sandboxes", tag = "sandboxes",
    responses((status = 200, description = "How many were destroyed", body = Pruned)))]
async fn prune(State(service): State<Service>, caller: Caller) -> Result<Json<Pruned>, ApiError> {
    let pruned = service.prune_expired(&caller).await?;
    Ok(Json(Pruned { pruned }))
}

/// One sandbox.
#[utoipa::path(get, operation_id = "getSandbox", path = "/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, description = "The sandbox", body = Sandbox)))]
async fn get_one(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(service.get_sandbox(&caller, &id).await?))
}

/// Destroys a sandbox: its runtime, processes and files.
#[utoipa::path(delete, operation_id = "destroySandbox", path = "/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, description = "`{\"status\":\"destroyed\"}`", body = Status)))]
async fn destroy(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Status>, ApiError> {
    service.destroy_sandbox(&caller, &id).await?;
    Ok(Json(Status::new("destroyed")))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"ttl": "30m"}))]
struct ExtendBody {
    /// The time to live from now, as a Go duration.
    #[schema(required = true)]
    ttl: Option<String>,
}

/// Sets a running sandbox's expiry to now + `ttl` (at most the owner's
/// maximum TTL).
#[utoipa::path(post, operation_id = "extendSandbox", path = "/sandboxes/{id}/extend", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body(content = ExtendBody),
    responses((status = 200, description = "The sandbox with its new expiry", body = Sandbox)))]

async fn extend(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ExtendBody>,
) -> Result<Json<Sandbox>, ApiError> {
    let ttl = body.ttl.unwrap_or_default();
    Ok(Json(service.extend_sandbox(&caller, &id, &ttl).await?))
}
