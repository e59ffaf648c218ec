//! `/sandboxes/{id}/exec`: run a command, answered whole or streamed as
//! NDJSON lines `{"stream","data"}` flushed as they are produced.

use std::collections::BTreeMap;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::ApiError;
use super::extract::JsonBody;
use crate::auth::Caller;
use crate::duration;
use crate::service::{ExecRequest, Service};

pub fn router() -> Router<Service> {
    Router::new().route("/sandboxes/{id}/exec", post(exec))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    command: String,
    args: Option<Vec<String>>,
    mode: Option<String>,
    env: Option<BTreeMap<String, String>>,
    workdir: Option<String>,
    timeout: Option<String>,
    stream: Option<bool>,
}

#[derive(Serialize)]
struct ExecAnswer {
    exit_code: i32,
    stdout: String,
    stderr: String,
    duration: String,
    execution_id: String,
}

#[derive(Serialize)]
struct StreamLine<'a> {
    stream: &'a str,
    data: &'a str,
}

fn ndjson_line(stream: &str, data: &str) -> Bytes {
    let mut line = serde_json::to_vec(&StreamLine { stream, data }).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn exec(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let streaming = body.stream.unwrap_or(false);
    let req = ExecRequest {
        command: body.command,
        args: body.args.unwrap_or_default(),
        mode: body.mode,
        env: body.env.unwrap_or_default(),
        workdir: body.workdir,
        timeout: body.timeout,
    };
    if !streaming {
        let collected = service.exec(&caller, &id, req).await?;
        return Ok(Json(ExecAnswer {
            exit_code: collected.result.exit_code,
            stdout: collected.stdout,
            stderr: collected.stderr,
            duration: duration::format(collected.result.duration),
            execution_id: collected.result.execution_id,
        })
        .into_response());
    }

    let running = service.start_exec(&caller, &id, req).await?;
    let lines = futures::stream::unfold(Some(running), |state| async move {
        let mut running = state?;
        if let Some(out) = running.output.recv().await {
            let line = ndjson_line(out.stream.as_str(), &out.data);
            return Some((Ok::<_, std::convert::Infallible>(line), Some(running)));
        }
        // Output is over; say how it ended only when it ended badly, as a
        // last stderr line (the SDK yields every line as a chunk).
        let note = match running.result.await {
            Ok(Ok(result)) if result.timed_out => Some(format!(
                "stacyvm: command timed out after {}\n",
                duration::format(result.timeout)
            )),
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("stacyvm: {e}\n")),
            Err(_) => Some("stacyvm: exec ended without a result\n".to_string()),
        };
        note.map(|n| (Ok(ndjson_line("stderr", &n)), None))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(lines),
    )
        .into_response())
}
