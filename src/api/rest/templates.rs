//! `/templates`: CRUD and spawn-from-template.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use super::extract::JsonBody;
use crate::auth::Caller;
use crate::service::{Sandbox, Service, Template, TemplateInput};

pub fn router() -> Router<Service> {
    Router::new()
        .route("/templates", get(list).post(create))
        .route("/templates/{name}", get(get_one).put(update).delete(delete))
        .route("/templates/{name}/spawn", post(spawn))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateBody {
    #[serde(default)]
    name: String,
    #[serde(default)]
    image: String,
    memory_mb: Option<u32>,
    vcpus: Option<u32>,
    disk_mb: Option<u32>,
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

async fn list(
    State(service): State<Service>,
    caller: Caller,
) -> Result<Json<Vec<Template>>, ApiError> {
    Ok(Json(service.list_templates(&caller).await?))
}

async fn create(
    State(service): State<Service>,
    caller: Caller,
    JsonBody(body): JsonBody<TemplateBody>,
) -> Result<(StatusCode, Json<Template>), ApiError> {
    let template = service.create_template(&caller, body.into()).await?;
    Ok((StatusCode::CREATED, Json(template)))
}

async fn get_one(
    State(service): State<Service>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Template>, ApiError> {
    Ok(Json(service.get_template(&caller, &name).await?))
}

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

async fn delete(
    State(service): State<Service>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    service.delete_template(&caller, &name).await?;
    Ok(Json(json!({ "status": "deleted" })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnOverrides {
    provider: Option<String>,
    ttl: Option<String>,
}

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
