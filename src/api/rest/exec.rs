//! `/sandboxes/{id}/exec`: run a command, answered whole or streamed as
//! NDJSON lines `{"stream","data"}` flushed as they are produced.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiError;
use super::extract::JsonBody;
use crate::auth::Caller;
use crate::duration;
use crate::service::{ExecRequest, Service};

pub fn router() -> OpenApiRouter<Service> {
    OpenApiRouter::new().routes(routes!(exec))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"command": "echo hello && ls /", "timeout": "30s"}))]
struct ExecBody {
    /// A shell command line (mode `shell`, the default) or the program
    /// to run (mode `argv`, with `args`).
    command: String,
    args: Option<Vec<String>>,
    /// `shell` or `argv`.
    mode: Option<String>,
    env: Option<BTreeMap<String, String>>,
    workdir: Option<String>,
    /// A Go duration; the whole process tree is killed at its end.
    timeout: Option<String>,
    /// Answer NDJSON lines as the output is produced.
    stream: Option<bool>,
}

/// The answer of an exec that was not streamed.
#[derive(Serialize, utoipa::ToSchema)]
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
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ExecQuery {
    /// With `stream`: end with a line saying how the command ended.
    trailer: Option<bool>,
}

/// The trailer line: `{"type":"end", ...}` (output lines have no `type`).
#[derive(Serialize, utoipa::ToSchema)]
struct Trailer<'a> {
    /// Always `end`.
    r#type: &'static str,
    execution_id: &'a str,
    /// `null` when the command timed out or could not run.
    #[schema(required = true)]
    exit_code: Option<i32>,
    #[schema(required = true)]
    duration: Option<String>,
    timed_out: bool,
    #[schema(required = true)]
    error: Option<String>,
}

/// One line of a streamed exec: a piece of output.
#[derive(Serialize, utoipa::ToSchema)]
struct StreamLine<'a> {
    /// `stdout` or `stderr`.
    stream: &'a str,
    data: &'a str,
}

/// One NDJSON line of a streamed exec (`application/x-ndjson`).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Only the document reads it.
enum NdjsonLine<'a> {
    Output(StreamLine<'a>),
    End(Trailer<'a>),
}

fn ndjson_line(stream: &str, data: &str) -> Bytes {
    let mut line = serde_json::to_vec(&StreamLine { stream, data }).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Runs a command in a sandbox: answered whole (JSON) or, with `stream`,
/// as NDJSON lines flushed as the output is produced.
#[utoipa::path(post, operation_id = "execCommand", path = "/sandboxes/{id}/exec", tag = "exec",
    params(("id" = String, Path, description = "Sandbox id"), ExecQuery),
    request_body(content = ExecBody),
    responses((status = 200, description = "How the command ended, or its output as a stream",
        content((ExecAnswer = "application/json"), (NdjsonLine = "application/x-ndjson")))))]
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
