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
    /// Output past `defaults.max_exec_output_bytes` (per stream) was cut.
    truncated: bool,
    /// The command was killed at its timeout (`exit_code` is then the
    /// kill's).
    timed_out: bool,
}

/// `?trailer=true`: a streamed exec ends with one more line saying how the
/// command ended. Off by default: SDK 0.1.1 reads every line as output.
#[derive(Debug, Default, Deserialize)]
struct ExecQuery {
    trailer: Option<bool>,
}

/// The trailer line: `{"type":"end", ...}` (output lines have no `type`).
#[derive(Serialize)]
struct Trailer<'a> {
    r#type: &'static str,
    execution_id: &'a str,
    exit_code: Option<i32>,
    duration: Option<String>,
    timed_out: bool,
    error: Option<String>,
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
    super::extract::Query(query): super::extract::Query<ExecQuery>,
    JsonBody(body): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let trailer = query.trailer.unwrap_or(false);
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
            truncated: collected.truncated,
            timed_out: collected.result.timed_out,
        })
        .into_response());
    }

    let running = service.start_exec(&caller, &id, req).await?;
    let lines = futures::stream::unfold(Some(running), move |state| async move {
        let mut running = state?;
        if let Some(out) = running.output.recv().await {
            let line = ndjson_line(out.stream.as_str(), &out.data);
            return Some((Ok::<_, std::convert::Infallible>(line), Some(running)));
        }
        // Output is over; say how it ended only when it ended badly, as a
        // last stderr line (the SDK yields every line as a chunk), and in
        // the trailer when asked for.
        let outcome = running.result.await;
        let note = match &outcome {
            Ok(Ok(result)) if result.timed_out => Some(format!(
                "stacyvm: command timed out after {}\n",
                duration::format(result.timeout)
            )),
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("stacyvm: {e}\n")),
            Err(_) => Some("stacyvm: exec ended without a result\n".to_string()),
        };
        let mut tail = note
            .map(|n| ndjson_line("stderr", &n).to_vec())
            .unwrap_or_default();
        if trailer {
            let (exit_code, duration, timed_out, error) = match &outcome {
                Ok(Ok(r)) => (
                    (!r.timed_out).then_some(r.exit_code),
                    Some(duration::format(r.duration)),
                    r.timed_out,
                    None,
                ),
                Ok(Err(e)) => (None, None, false, Some(e.to_string())),
                Err(_) => (
                    None,
                    None,
                    false,
                    Some("exec ended without a result".into()),
                ),
            };
            let line = Trailer {
                r#type: "end",
                execution_id: &running.execution_id,
                exit_code,
                duration,
                timed_out,
                error,
            };
            tail.extend(serde_json::to_vec(&line).unwrap_or_default());
            tail.push(b'\n');
        }
        (!tail.is_empty()).then(|| (Ok(Bytes::from(tail)), None))
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
