//! `/templates`: CRUD and spawn-from-template.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::JsonBody;
use super::{ApiError, Status};
use crate::auth::Caller;
use crate::service::{Sandbox, Service, Template, TemplateInput};

pub fn router() -> OpenApiRouter<Service> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(get_one, update, delete))
        .routes(routes!(spawn))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "small", "image": "alpine:latest", "memory_mb": 256, "ttl": "15m"}))]
struct TemplateBody {
    /// Required on create; on update it must be the path's name or absent.
    #[serde(default)]
    name: String,
    /// Required.
    #[serde(default)]
    image: String,
    memory_mb: Option<u32>,
    vcpus: Option<u32>,
    disk_mb: Option<u32>,
    /// A Go duration.
    ttl: Option<String>,
    provider: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
    worker_labels: Option<BTreeMap<String, String>>,
    pool_size: Option<u32>,
}

impl From<TemplateBody> for TemplateInput {
    fn from(b: TemplateBody) -> Self {
        TemplateInput {
            name: b.name,
            image: b.image,
            memory_mb: b.memory_mb,
            vcpus: b.vcpus,
            disk_mb: b.disk_mb,
            ttl: b.ttl,
            provider: b.provider,
            metadata: b.metadata.unwrap_or_default(),
            worker_labels: b.worker_labels.unwrap_or_default(),
            pool_size: b.pool_size,
        }
    }
}

/// The templates the caller may see.
#[utoipa::path(get, operation_id = "listTemplates", path = "/templates", tag = "templates",
    responses((status = 200, description = "Templates by name", body = Vec<Template>)))]
async fn list(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<Vec<Template>>, ApiError> {
    Ok(Json(service.list_templates(&caller).await?))
}

/// Creates a template.
#[utoipa::path(post, operation_id = "createTemplate", path = "/templates", tag = "templates",
    request_body(content = TemplateBody),
    responses((status = 201, description = "Created", body = Template)))]
async fn create(
    State(service): State<Service>,
    caller: Caller,
    JsonBody(body): JsonBody<TemplateBody>,
) -> Result<(StatusCode, Json<Template>), ApiError> {
    let template = service.create_template(&caller, body.into()).await?;
    Ok((StatusCode::CREATED, Json(template)))
}

/// One template.
#[utoipa::path(get, operation_id = "getTemplate", path = "/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses((status = 200, description = "The template", body = Template)))]
async fn get_one(
    State(service): State<Service>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Template>, ApiError> {
    Ok(Json(service.get_template(&caller, &name).await?))
}

/// Replaces a template.
#[utoipa::path(put, operation_id = "updateTemplate", path = "/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    request_body(content = TemplateBody),
    responses((status = 200, description = "The template as now stored", body = Template)))]
async fn update(
    State(service): State<Service>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<TemplateBody>,
) -> Result<Json<Template>, ApiError> {
    Ok(Json(
        service.update_template(&caller, &name, body.into()).await?,
    ))
}

/// Deletes a template.
#[utoipa::path(delete, operation_id = "deleteTemplate", path = "/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses((status = 200, description = "`{\"status\":\"deleted\"}`", body = Status)))]
async fn delete(
    State(service): State<Service>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Status>, ApiError> {
    service.delete_template(&caller, &name).await?;
    Ok(Json(Status::new("deleted")))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SpawnOverrides {
    provider: Option<String>,
    /// A Go duration.
    ttl: Option<String>,
}

/// Spawns a sandbox from a template (from its warm pool when one is kept).
#[utoipa::path(post, operation_id = "spawnFromTemplate", path = "/templates/{name}/spawn", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    request_body(content = Option<SpawnOverrides>),
    responses((status = 201, description = "Spawned and running", body = Sandbox)))]

async fn spawn(
    State(service): State<Service>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<SpawnOverrides>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let sandbox = service
        .spawn_from_template(&caller, &name, body.provider, body.ttl)
        .await?;
    Ok((StatusCode::CREATED, Json(sandbox)))
}
