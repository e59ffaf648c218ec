//! `/sandboxes/{id}/files...`: the files API.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{JsonBody, Query};
use super::{ApiError, Status};
use crate::auth::Caller;
use crate::provider::FileEntry;
use crate::service::{ContentEncoding, Error, FileWrite, Service};

pub fn router() -> OpenApiRouter<Service> {
    OpenApiRouter::new()
        .routes(routes!(write, read, delete))
        .routes(routes!(list))
        .routes(routes!(stat))
        .routes(routes!(glob))
        .routes(routes!(move_file))
        .routes(routes!(chmod))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"path": "/tmp/hello.txt", "content": "hello\n"}))]
struct WriteBody {
    /// Absolute path inside the sandbox; parents are created.
    path: String,
    content: String,
    /// Permission bits in octal text, e.g. `644`.
    mode: Option<String>,
    /// `utf-8` (the default) or `base64` for binary content.
    encoding: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PathQuery {
    /// Absolute path inside the sandbox.
    #[serde(default)]
    path: String,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct DeleteQuery {
    /// Absolute path inside the sandbox.
    #[serde(default)]
    path: String,
    /// `true` to delete a directory with what it holds.
    #[serde(default)]
    recursive: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct GlobQuery {
    /// A glob such as `/work/**/*.py`.
    #[serde(default)]
    pattern: String,
}

/// A file's bytes, as they are (the document's name for them).
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)] // Only the document reads it.
struct FileBytes(Vec<u8>);

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"old_path": "/tmp/hello.txt", "new_path": "/tmp/greeting.txt"}))]
struct MoveBody {
    old_path: String,
    new_path: String,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"path": "/tmp/hello.txt", "mode": "600"}))]
struct ChmodBody {
    path: String,
    /// Permission bits in octal text, e.g. `755`.
    mode: String,
}

/// Writes a file (text, or binary as base64).
#[utoipa::path(post, operation_id = "writeFile", path = "/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body(content = WriteBody),
    responses((status = 200, description = "`{\"status\":\"written\"}`", body = Status)))]
async fn write(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<WriteBody>,
) -> Result<Json<Status>, ApiError> {
    let encoding = ContentEncoding::parse(body.encoding.as_deref().unwrap_or_default())?;
    let write = FileWrite {
        path: body.path,
        content: encoding.decode(body.content)?,
        mode: body.mode,
    };
    service.write_file(&caller, &id, write).await?;
    Ok(Json(Status::new("written")))
}

/// Reads a file's bytes.
#[utoipa::path(get, operation_id = "readFile", path = "/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), PathQuery),
    responses((status = 200, description = "The file's content", content_type = "application/octet-stream", body = FileBytes)))]
async fn read(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let bytes = service.read_file(&caller, &id, &q.path).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes))
}

/// Deletes a file, or a directory with `recursive`.
#[utoipa::path(delete, operation_id = "deleteFile", path = "/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), DeleteQuery),
    responses((status = 200, description = "`{\"status\":\"deleted\"}`", body = Status)))]
async fn delete(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<Json<Status>, ApiError> {
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
    Ok(Json(Status::new("deleted")))
}

/// Lists a directory.
#[utoipa::path(get, operation_id = "listFiles", path = "/sandboxes/{id}/files/list", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), PathQuery),
    responses((status = 200, description = "Its entries", body = Vec<FileEntry>)))]
async fn list(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Json<Vec<FileEntry>>, ApiError> {
    Ok(Json(service.list_files(&caller, &id, &q.path).await?))
}

/// Describes one file or directory.
#[utoipa::path(get, operation_id = "statFile", path = "/sandboxes/{id}/files/stat", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), PathQuery),
    responses((status = 200, description = "The entry", body = FileEntry)))]
async fn stat(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Json<FileEntry>, ApiError> {
    Ok(Json(service.stat_file(&caller, &id, &q.path).await?))
}

/// The paths matching a glob.
#[utoipa::path(get, operation_id = "globFiles", path = "/sandboxes/{id}/files/glob", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), GlobQuery),
    responses((status = 200, description = "Matching absolute paths", body = Vec<String>)))]
async fn glob(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<GlobQuery>,
) -> Result<Json<Vec<String>>, ApiError> {
    Ok(Json(service.glob_files(&caller, &id, &q.pattern).await?))
}

/// Moves or renames a file or directory.
#[utoipa::path(post, operation_id = "moveFile", path = "/sandboxes/{id}/files/move", tag = "files",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body(content = MoveBody),
    responses((status = 200, description = "`{\"status\":\"moved\"}`", body = Status)))]
async fn move_file(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<MoveBody>,
) -> Result<Json<Status>, ApiError> {
    service
        .move_file(&caller, &id, &body.old_path, &body.new_path)
        .await?;
    Ok(Json(Status::new("moved")))
}

/// Changes a file's permission bits.
#[utoipa::path(post, operation_id = "chmodFile", path = "/sandboxes/{id}/files/chmod", tag = "files",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body(content = ChmodBody),
    responses((status = 200, description = "`{\"status\":\"chmod applied\"}`", body = Status)))]
async fn chmod(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ChmodBody>,
) -> Result<Json<Status>, ApiError> {
    service
        .chmod_file(&caller, &id, &body.path, &body.mode)
        .await?;
    Ok(Json(Status::new("chmod applied")))
}
