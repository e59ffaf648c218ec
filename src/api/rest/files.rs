//! `/sandboxes/{id}/files...`: the files API.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use super::extract::{JsonBody, Query};
use crate::auth::Caller;
use crate::provider::FileEntry;
use crate::service::{ContentEncoding, Error, FileWrite, Service};

pub fn router() -> Router<Service> {
    Router::new()
        .route(
            "/sandboxes/{id}/files",
            post(write).get(read).delete(delete),
        )
        .route("/sandboxes/{id}/files/list", get(list))
        .route("/sandboxes/{id}/files/stat", get(stat))
        .route("/sandboxes/{id}/files/glob", get(glob))
        .route("/sandboxes/{id}/files/move", post(move_file))
        .route("/sandboxes/{id}/files/chmod", post(chmod))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteBody {
    path: String,
    content: String,
    mode: Option<String>,
    /// `utf-8` (the default) or `base64` for binary content.
    encoding: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PathQuery {
    #[serde(default)]
    path: String,
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    path: String,
    #[serde(default)]
    recursive: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GlobQuery {
    #[serde(default)]
    pattern: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveBody {
    old_path: String,
    new_path: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChmodBody {
    path: String,
    mode: String,
}

async fn write(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<WriteBody>,
) -> Result<Json<Value>, ApiError> {
    let encoding = ContentEncoding::parse(body.encoding.as_deref().unwrap_or_default())?;
    let write = FileWrite {
        path: body.path,
        content: encoding.decode(body.content)?,
        mode: body.mode,
    };
    service.write_file(&caller, &id, write).await?;
    Ok(Json(json!({ "status": "written" })))
}

async fn read(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let bytes = service.read_file(&caller, &id, &q.path).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes))
}

async fn delete(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<Json<Value>, ApiError> {
    let recursive = match q.recursive.as_deref() {
        None | Some("") | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(ApiError(Error::BadRequest(format!(
                "recursive must be true or false, got {other:?}"
            ))));
        }
    };
    service
        .delete_file(&caller, &id, &q.path, recursive)
        .await?;
    Ok(Json(json!({ "status": "deleted" })))
}

async fn list(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Json<Vec<FileEntry>>, ApiError> {
    Ok(Json(service.list_files(&caller, &id, &q.path).await?))
}

async fn stat(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Json<FileEntry>, ApiError> {
    Ok(Json(service.stat_file(&caller, &id, &q.path).await?))
}

async fn glob(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<GlobQuery>,
) -> Result<Json<Vec<String>>, ApiError> {
    Ok(Json(service.glob_files(&caller, &id, &q.pattern).await?))
}

async fn move_file(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<MoveBody>,
) -> Result<Json<Value>, ApiError> {
    service
        .move_file(&caller, &id, &body.old_path, &body.new_path)
        .await?;
    Ok(Json(json!({ "status": "moved" })))
}

async fn chmod(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ChmodBody>,
) -> Result<Json<Value>, ApiError> {
    service
        .chmod_file(&caller, &id, &body.path, &body.mode)
        .await?;
    Ok(Json(json!({ "status": "chmod applied" })))
}
