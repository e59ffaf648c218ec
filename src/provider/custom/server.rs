//! The custom provider contract served over one of StacyVM's own providers
//! (`stacyvm custom-provider --provider native`): the reference
//! implementation of [`super::contract`], in its own process. The tests run
//! [`super::CustomProvider`] against it; a runtime author can read it as
//! the contract's worked example.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use tokio::sync::mpsc;

use tokio_util::task::AbortOnDropHandle;

use super::contract::{self, codes};

/// The longest command the reference server runs.
const MAX_EXEC_MS: u64 = 24 * 3600 * 1000;
use crate::provider::{ExecExit, ExecSpec, Provider, ProviderError, SpawnSpec};

/// The provider served and the key callers must present (empty: none).
#[derive(Clone)]
struct Served {
    provider: Arc<dyn Provider>,
    api_key: Arc<str>,
}

/// Every route of the contract over `provider`.
pub fn router(provider: Arc<dyn Provider>, api_key: &str) -> Router {
    let served = Served {
        provider,
        api_key: Arc::from(api_key),
    };
    Router::new()
        .route("/health", get(health))
        .route("/images/available", get(image_available))
        .route("/spawn", post(spawn))
        .route("/status/{id}", get(status))
        .route("/sandboxes", get(inventory))
        .route("/sandboxes/{id}", axum::routing::delete(destroy))
        .route("/exec", post(exec))
        .route("/files", post(write).get(read).delete(delete))
        .route("/files/list", get(list))
        .route("/files/stat", get(stat))
        .route("/files/glob", get(glob))
        .route("/files/move", post(move_file))
        .route("/files/chmod", post(chmod))
        .route("/logs/{id}", get(logs))
        .route("/stats/{id}", get(stats))
        .layer(axum::middleware::from_fn_with_state(
            served.clone(),
            authorize,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(served)
}

async fn authorize(State(s): State<Served>, req: Request, next: Next) -> Response {
    if !s.api_key.is_empty() {
        let want = format!("Bearer {}", s.api_key);
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !bool::from(subtle::ConstantTimeEq::ct_eq(given, want.as_bytes())) {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "a valid bearer key is required",
            );
        }
    }
    next.run(req).await
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(contract::Refusal {
            code: code.into(),
            message: message.into(),
        }),
    )
        .into_response()
}

/// A provider error as the contract answers it.
struct Refused(ProviderError);

impl From<ProviderError> for Refused {
    fn from(e: ProviderError) -> Self {
        Refused(e)
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let (status, code) = match &self.0 {
            ProviderError::ImageNotFound { .. } => (StatusCode::NOT_FOUND, codes::IMAGE_NOT_FOUND),
            ProviderError::RuntimeNotFound(_) => (StatusCode::NOT_FOUND, codes::NOT_FOUND),
            ProviderError::FileNotFound(_) => (StatusCode::NOT_FOUND, codes::FILE_NOT_FOUND),
            ProviderError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, codes::BAD_REQUEST),
            ProviderError::Unsupported { .. } => (StatusCode::BAD_REQUEST, codes::BAD_REQUEST),
            ProviderError::Conflict(_) => (StatusCode::CONFLICT, codes::CONFLICT),
            ProviderError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE),
            ProviderError::Fenced(_) | ProviderError::Runtime(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL)
            }
        };
        refuse(status, code, &self.0.to_string())
    }
}

type Answer<T> = Result<T, Refused>;

fn bad(message: String) -> Refused {
    Refused(ProviderError::InvalidRequest(message))
}

fn mode_of(text: &str) -> Answer<u32> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| bad(format!("mode {text:?} is not octal permission bits")))
}

async fn health(State(s): State<Served>) -> Answer<Json<contract::Health>> {
    s.provider.health().await?;
    Ok(Json(contract::Health {
        status: "ok".into(),
        capabilities: Some(
            s.provider
                .capabilities()
                .into_iter()
                .filter_map(|c| serde_json::to_value(c).ok())
                .collect(),
        ),
        isolation: Some(s.provider.isolation().to_string()),
    }))
}

#[derive(Deserialize)]
struct ImageQuery {
    image: String,
}

async fn image_available(
    State(s): State<Served>,
    Query(q): Query<ImageQuery>,
) -> Answer<Json<contract::ImageAvailable>> {
    let available = s.provider.image_available(&q.image).await?;
    Ok(Json(contract::ImageAvailable { available }))
}

async fn spawn(
    State(s): State<Served>,
    Json(b): Json<contract::Spawn>,
) -> Answer<Json<contract::Spawned>> {
    let handle = s
        .provider
        .spawn(&SpawnSpec {
            sandbox_id: b.sandbox_id,
            image: b.image,
            memory_mb: b.memory_mb,
            vcpus: b.vcpus,
            disk_mb: b.disk_mb,
        })
        .await?;
    Ok(Json(contract::Spawned {
        id: handle.runtime_id,
    }))
}

fn status_of(status: crate::provider::RuntimeStatus) -> Option<(String, Option<String>)> {
    use crate::provider::RuntimeStatus;
    match status {
        RuntimeStatus::Running => Some(("running".into(), None)),
        RuntimeStatus::Stopped { cause } => Some(("stopped".into(), Some(cause))),
        RuntimeStatus::Missing => None,
    }
}

async fn status(State(s): State<Served>, Path(id): Path<String>) -> Answer<Json<contract::Status>> {
    let Some((status, reason)) = status_of(s.provider.inspect(&id).await?) else {
        return Err(Refused(ProviderError::RuntimeNotFound(id)));
    };
    Ok(Json(contract::Status {
        id: String::new(),
        sandbox_id: String::new(),
        status,
        reason,
        created_at: None,
    }))
}

async fn inventory(State(s): State<Served>) -> Answer<Json<Vec<contract::Status>>> {
    Ok(Json(
        s.provider
            .inventory()
            .await?
            .into_iter()
            .filter_map(|item| {
                let (status, reason) = status_of(item.status)?;
                Some(contract::Status {
                    id: item.runtime_id,
                    sandbox_id: item.sandbox_id,
                    status,
                    reason,
                    created_at: item.created_at,
                })
            })
            .collect(),
    ))
}

async fn destroy(State(s): State<Served>, Path(id): Path<String>) -> Answer<StatusCode> {
    s.provider.destroy(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A streamed exec: NDJSON output frames as produced, then the exit frame.
async fn exec(State(s): State<Served>, Json(b): Json<contract::Exec>) -> Answer<Response> {
    let spec = ExecSpec {
        argv: b.argv,
        env: b.env,
        workdir: b.workdir,
        // A day at most, whatever the caller asks.
        timeout: Duration::from_millis(b.timeout_ms.min(MAX_EXEC_MS)),
    };
    let (sink, mut output) = mpsc::channel(64);
    let provider = Arc::clone(&s.provider);
    let id = b.id;
    // Aborted when the answer is dropped (the caller went away): the
    // command ends with it, as on every exec path.
    let mut run = AbortOnDropHandle::new(tokio::spawn(async move {
        provider.exec(&id, &spec, sink).await
    }));
    // The first output or the end decides the answer's status: a refusal
    // (no such sandbox or workdir) is an error status, not a stream.
    let first = tokio::select! {
        Some(chunk) = output.recv() => Some(chunk),
        ended = &mut run => {
            let exit = ended.map_err(|e| Refused(ProviderError::Runtime(e.to_string())))??;
            let mut lines = Vec::new();
            while let Ok(chunk) = output.try_recv() {
                lines.push(frame_line(&chunk));
            }
            lines.push(exit_line(exit));
            return Ok(ndjson(Body::from(lines.concat())));
        }
    };
    let frames = futures::stream::unfold(
        (first, output, Some(run)),
        |(pending, mut output, run)| async move {
            if let Some(chunk) = pending {
                return Some((
                    Ok::<_, std::convert::Infallible>(Bytes::from(frame_line(&chunk))),
                    (None, output, run),
                ));
            }
            if let Some(chunk) = output.recv().await {
                return Some((Ok(Bytes::from(frame_line(&chunk))), (None, output, run)));
            }
            let run = run?;
            let line = match run.await {
                Ok(Ok(exit)) => exit_line(exit),
                // Past the first output a refusal can only be the last
                // line: an error frame.
                Ok(Err(e)) => error_line(&e.to_string()),
                Err(e) => error_line(&format!("the exec task failed: {e}")),
            };
            Some((Ok(Bytes::from(line)), (None, output, None)))
        },
    );
    Ok(ndjson(Body::from_stream(frames)))
}

fn ndjson(body: Body) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        body,
    )
        .into_response()
}

fn frame_line(chunk: &crate::provider::OutputChunk) -> Vec<u8> {
    let stream = chunk.stream.as_str().to_string();
    let frame = match std::str::from_utf8(&chunk.data) {
        Ok(text) => contract::Frame::Output {
            stream,
            data: Some(text.to_string()),
            data_base64: None,
        },
        Err(_) => contract::Frame::Output {
            stream,
            data: None,
            data_base64: Some(STANDARD.encode(&chunk.data)),
        },
    };
    line_of(&frame)
}

fn error_line(message: &str) -> Vec<u8> {
    line_of(&contract::Frame::Failed {
        r#type: "error".into(),
        message: message.to_string(),
    })
}

fn exit_line(exit: ExecExit) -> Vec<u8> {
    let (exit_code, timed_out) = match exit {
        ExecExit::Exited(code) => (Some(code), false),
        ExecExit::TimedOut => (None, true),
    };
    line_of(&contract::Frame::Exit {
        r#type: "exit".into(),
        exit_code,
        timed_out,
    })
}

fn line_of(frame: &contract::Frame) -> Vec<u8> {
    let mut line = serde_json::to_vec(frame).unwrap_or_default();
    line.push(b'\n');
    line
}

async fn write(State(s): State<Served>, Json(b): Json<contract::WriteFile>) -> Answer<StatusCode> {
    let content = match (b.content_base64, b.content) {
        (Some(b64), _) => Bytes::from(
            STANDARD
                .decode(b64)
                .map_err(|e| bad(format!("content_base64: {e}")))?,
        ),
        (None, Some(text)) => Bytes::from(text),
        (None, None) => Bytes::new(),
    };
    s.provider
        .write_file(&b.id, &b.path, content, mode_of(&b.mode)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct PathQuery {
    id: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    recursive: Option<String>,
    #[serde(default)]
    pattern: String,
}

async fn read(State(s): State<Served>, Query(q): Query<PathQuery>) -> Answer<Response> {
    let bytes = s.provider.read_file(&q.id, &q.path).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        bytes,
    )
        .into_response())
}

async fn delete(State(s): State<Served>, Query(q): Query<PathQuery>) -> Answer<StatusCode> {
    let recursive = q.recursive.as_deref() == Some("true");
    s.provider.delete_file(&q.id, &q.path, recursive).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list(
    State(s): State<Served>,
    Query(q): Query<PathQuery>,
) -> Answer<Json<Vec<crate::provider::FileEntry>>> {
    Ok(Json(s.provider.list_files(&q.id, &q.path).await?))
}

async fn stat(
    State(s): State<Served>,
    Query(q): Query<PathQuery>,
) -> Answer<Json<crate::provider::FileEntry>> {
    Ok(Json(s.provider.stat_file(&q.id, &q.path).await?))
}

async fn glob(State(s): State<Served>, Query(q): Query<PathQuery>) -> Answer<Json<Vec<String>>> {
    Ok(Json(s.provider.glob_files(&q.id, &q.pattern).await?))
}

async fn move_file(
    State(s): State<Served>,
    Json(b): Json<contract::MoveFile>,
) -> Answer<StatusCode> {
    s.provider
        .move_file(&b.id, &b.old_path, &b.new_path)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn chmod(State(s): State<Served>, Json(b): Json<contract::ChmodFile>) -> Answer<StatusCode> {
    s.provider
        .chmod_file(&b.id, &b.path, mode_of(&b.mode)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct LinesQuery {
    #[serde(default)]
    lines: Option<usize>,
}

async fn logs(
    State(s): State<Served>,
    Path(id): Path<String>,
    Query(q): Query<LinesQuery>,
) -> Answer<Json<Vec<String>>> {
    Ok(Json(s.provider.logs(&id, q.lines.unwrap_or(100)).await?))
}

async fn stats(State(s): State<Served>, Path(id): Path<String>) -> Answer<Json<contract::Stats>> {
    Ok(Json(s.provider.stats(&id).await?))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use crate::provider::memory::MemoryProvider;

    /// Every route of the reference server refuses a caller without the
    /// key, or with another one, before it reads the body; with the key
    /// the same calls reach the provider.
    #[tokio::test]
    async fn every_route_wants_the_key() {
        let router = super::router(Arc::new(MemoryProvider::new(4)), "the-key");
        let calls = [
            ("GET", "/health", ""),
            ("GET", "/images/available?image=x", ""),
            (
                "POST",
                "/spawn",
                r#"{"sandbox_id":"sb-1","image":"x","memory_mb":1,"vcpus":1,"disk_mb":1}"#,
            ),
            ("GET", "/status/r1", ""),
            ("GET", "/sandboxes", ""),
            ("DELETE", "/sandboxes/r1", ""),
            (
                "POST",
                "/exec",
                r#"{"id":"r1","argv":["id"],"timeout_ms":1000}"#,
            ),
            (
                "POST",
                "/files",
                r#"{"id":"r1","path":"/x","content":"x","mode":"644"}"#,
            ),
            ("GET", "/files?id=r1&path=/etc/passwd", ""),
            ("DELETE", "/files?id=r1&path=/x", ""),
            ("GET", "/files/list?id=r1&path=/", ""),
            ("GET", "/files/stat?id=r1&path=/", ""),
            ("GET", "/files/glob?id=r1&pattern=/*", ""),
            (
                "POST",
                "/files/move",
                r#"{"id":"r1","old_path":"/a","new_path":"/b"}"#,
            ),
            (
                "POST",
                "/files/chmod",
                r#"{"id":"r1","path":"/a","mode":"777"}"#,
            ),
            ("GET", "/logs/r1", ""),
            ("GET", "/stats/r1", ""),
        ];
        for (method, path, body) in calls {
            for key in [
                None,
                Some("Bearer not-the-key"),
                Some("the-key"),
                Some("Bearer the-key "),
            ] {
                let mut req = Request::builder()
                    .method(method)
                    .uri(path)
                    .header("content-type", "application/json");
                if let Some(key) = key {
                    req = req.header("authorization", key);
                }
                let resp = router
                    .clone()
                    .oneshot(req.body(Body::from(body)).unwrap())
                    .await
                    .unwrap();
                assert_eq!(
                    resp.status(),
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} with {key:?}"
                );
            }
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("content-type", "application/json")
                .header("authorization", "Bearer the-key")
                .body(Body::from(body))
                .unwrap();
            let resp = router.clone().oneshot(req).await.unwrap();
            assert_ne!(
                resp.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} with the key"
            );
        }
    }
}
