//! What `stacyvm worker` runs: a [`LocalWorker`] over this host's
//! providers, served over the protocol of [`super::rpc`] on `--listen`, and
//! a heartbeat to the control plane that registers it and says what it
//! offers. The worker has no store: records and rules stay on the control
//! plane.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::rpc::{self, Answer, ExecFrame, Heartbeat};
use super::token::{Audience, WorkerCredentials};
use super::{LocalWorker, Worker};
use crate::provider::OutputChunk;

/// How long one heartbeat request may take.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct AgentState {
    worker: Arc<LocalWorker>,
    credentials: Arc<WorkerCredentials>,
}

/// The worker's RPC server. `max_body_bytes` bounds a request (a file
/// write arrives base64-encoded, a third larger than the file).
pub fn router(
    worker: Arc<LocalWorker>,
    credentials: WorkerCredentials,
    max_body_bytes: usize,
) -> Router {
    let state = AgentState {
        worker,
        credentials: Arc::new(credentials),
    };
    Router::new()
        .route(&format!("{}/snapshot", rpc::PREFIX), post(snapshot))
        .route(&format!("{}/check_health", rpc::PREFIX), post(check_health))
        .route(
            &format!("{}/image_available", rpc::PREFIX),
            post(image_available),
        )
        .route(&format!("{}/spawn", rpc::PREFIX), post(spawn))
        .route(&format!("{}/inventory", rpc::PREFIX), post(inventory))
        .route(&format!("{}/call", rpc::PREFIX), post(call))
        .route(&format!("{}/exec", rpc::PREFIX), post(exec))
        .route(
            &format!("{}/terminal", rpc::PREFIX),
            axum::routing::get(terminal),
        )
        // The token is checked before any body is read.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .layer(DefaultBodyLimit::max(max_body_bytes / 3 * 4 + 64 * 1024))
        .with_state(state)
}

/// Refuses a caller without the worker's token, before its body is read.
async fn require_token(
    State(state): State<AgentState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if state.credentials.verify(presented, Audience::Worker) {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({
            "code": "UNAUTHORIZED",
            "message": "a worker RPC needs the worker's token"
        })),
    )
        .into_response()
}

async fn snapshot(State(s): State<AgentState>) -> Response {
    Json(Answer::<_>::Ok(s.worker.snapshot())).into_response()
}

async fn check_health(State(s): State<AgentState>) -> Response {
    Json(Answer::<_>::Ok(s.worker.check_health().await)).into_response()
}

async fn image_available(
    State(s): State<AgentState>,
    Json(req): Json<rpc::ImageAvailable>,
) -> Response {
    let answer: Answer<bool> = s
        .worker
        .image_available(&req.provider, &req.image)
        .await
        .into();
    Json(answer).into_response()
}

async fn spawn(State(s): State<AgentState>, Json(req): Json<rpc::Spawn>) -> Response {
    // A spawn runs to its end even if the control plane hangs up: a
    // runtime cut off half-way would be an orphan (the reconciler removes
    // one without a record, but not a half-built one).
    let worker = s.worker.clone();
    let answer: Answer<_> =
        match tokio::spawn(async move { worker.spawn(&req.provider, &req.spec, req.lease).await })
            .await
        {
            Ok(result) => result.into(),
            Err(e) => Answer::Err(rpc::WireError::Runtime {
                message: format!("spawn task failed: {e}"),
            }),
        };
    Json(answer).into_response()
}

async fn inventory(State(s): State<AgentState>, Json(req): Json<rpc::Inventory>) -> Response {
    let answer: Answer<_> = s.worker.inventory(&req.provider).await.into();
    Json(answer).into_response()
}

async fn call(State(s): State<AgentState>, Json(req): Json<rpc::Call>) -> Response {
    let answer: Answer<_> = s.worker.call(&req.runtime, req.call).await.into();
    Json(answer).into_response()
}

/// Streams a command's output as NDJSON frames. The command belongs to
/// the response: when the control plane closes the stream, the task is
/// aborted and the command's future dropped, which kills it.
async fn exec(State(s): State<AgentState>, Json(req): Json<rpc::Exec>) -> Response {
    let (frames, rx) = mpsc::channel::<ExecFrame>(64);
    let worker = s.worker.clone();
    let task = tokio::spawn(async move {
        let (sink, mut chunks) = mpsc::channel::<OutputChunk>(64);
        let run = worker.exec(&req.runtime, &req.spec, sink);
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                biased;
                Some(chunk) = chunks.recv() => {
                    let frame = ExecFrame::Output { stream: chunk.stream, data: chunk.data };
                    if frames.send(frame).await.is_err() {
                        return; // the stream is gone: dropping `run` kills the command
                    }
                }
                result = &mut run => break result,
            }
        };
        // The sink is gone with the finished future: drain what it left.
        while let Some(chunk) = chunks.recv().await {
            let frame = ExecFrame::Output {
                stream: chunk.stream,
                data: chunk.data,
            };
            if frames.send(frame).await.is_err() {
                return;
            }
        }
        let last = match result {
            Ok(exit) => ExecFrame::Exit(exit),
            Err(e) => ExecFrame::Error(e.into()),
        };
        if frames.send(last).await.is_err() {
            tracing::debug!("the control plane left before the exit status");
        }
    });
    let guard = AbortOnDropHandle::new(task);
    let body = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        let frame = rx.recv().await?;
        let mut line = serde_json::to_vec(&frame).unwrap_or_else(|e| {
            serde_json::to_vec(&ExecFrame::Error(rpc::WireError::Runtime {
                message: format!("cannot encode a frame: {e}"),
            }))
            .unwrap_or_default()
        });
        line.push(b'\n');
        Some((Ok::<_, Infallible>(line), (rx, guard)))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())
}

/// The largest message of a terminal's WebSocket.
const MAX_TERMINAL_MESSAGE: usize = 64 << 10;

/// How long the control plane has to say what the terminal runs.
const TERMINAL_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// A terminal's command over a WebSocket (see [`rpc::TerminalOpen`]). The
/// command belongs to the socket: when it closes, the command is killed.
async fn terminal(
    State(s): State<AgentState>,
    upgrade: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    upgrade
        .max_message_size(MAX_TERMINAL_MESSAGE)
        .on_upgrade(move |socket| serve_terminal(socket, s.worker.clone()))
}

async fn serve_terminal(mut socket: axum::extract::ws::WebSocket, worker: Arc<LocalWorker>) {
    use axum::extract::ws::Message;
    let open = match tokio::time::timeout(TERMINAL_OPEN_TIMEOUT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<rpc::TerminalOpen>(&text),
        _ => return,
    };
    let end = |end: rpc::TerminalEnd| {
        Message::Text(serde_json::to_string(&end).unwrap_or_default().into())
    };
    let open = match open {
        Ok(open) => open,
        Err(e) => {
            let refused = rpc::TerminalEnd::Error(rpc::WireError::InvalidRequest {
                message: format!("not a terminal request: {e}"),
            });
            crate::provider::best_effort_quiet(
                "refusing a terminal request",
                socket.send(end(refused)).await,
            );
            return;
        }
    };
    let (input, input_rx) = mpsc::channel(32);
    let (sink, mut chunks) = mpsc::channel::<OutputChunk>(64);
    let terminal = crate::provider::Terminal {
        size: open.size,
        input: input_rx,
    };
    let run = worker.exec_terminal(&open.runtime, &open.spec, terminal, sink);
    tokio::pin!(run);
    let mut output_open = true;
    let mut heard = tokio::time::Instant::now();
    let mut ping = tokio::time::interval(super::remote::TERMINAL_LIVENESS / 3);
    let result = loop {
        tokio::select! {
            _ = ping.tick() => {
                // A control plane gone without a word: the command ends.
                if heard.elapsed() > super::remote::TERMINAL_LIVENESS
                    || socket.send(Message::Ping(Default::default())).await.is_err()
                {
                    return;
                }
            }
            chunk = chunks.recv(), if output_open => match chunk {
                Some(chunk) => {
                    if socket.send(Message::Binary(chunk.data)).await.is_err() {
                        return; // the control plane left: dropping `run` kills the command
                    }
                }
                None => output_open = false,
            },
            message = socket.recv() => {
                heard = tokio::time::Instant::now();
                let sent = match message {
                    Some(Ok(Message::Binary(data))) => input.try_send(crate::provider::TerminalInput::Data(data)),
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<rpc::TerminalControl>(&text) {
                        Ok(rpc::TerminalControl::Resize(size)) => input.try_send(crate::provider::TerminalInput::Resize(size)),
                        Err(e) => {
                            tracing::debug!(error = %e, "a terminal message that is not one");
                            Ok(())
                        }
                    },
                    Some(Ok(_)) => Ok(()),
                    Some(Err(_)) | None => return,
                };
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "terminal input dropped: its command does not keep up");
                }
            }
            result = &mut run => break result,
        }
    };
    while let Ok(chunk) = chunks.try_recv() {
        if socket.send(Message::Binary(chunk.data)).await.is_err() {
            return;
        }
    }
    let last = match result {
        Ok(exit) => rpc::TerminalEnd::Exit(exit),
        Err(e) => rpc::TerminalEnd::Error(e.into()),
    };
    crate::provider::best_effort_quiet(
        "telling the control plane a terminal's end",
        socket.send(end(last)).await,
    );
}

/// Where and how the worker reports to the control plane.
#[derive(Debug, Clone)]
pub struct HeartbeatTarget {
    /// The control plane's base URL, e.g. `http://10.0.0.1:7423`.
    pub control_plane: String,
    pub credentials: WorkerCredentials,
    /// This worker's RPC address as the control plane reaches it.
    pub endpoint: String,
}

/// Checks provider health and heartbeats to the control plane until
/// `shutdown` fires. A refused heartbeat (wrong token, duplicate id) is
/// logged each time and retried: the operator may fix the control plane.
pub async fn heartbeat_loop(
    worker: Arc<LocalWorker>,
    target: HeartbeatTarget,
    heartbeat_every: Duration,
    health_every: Duration,
    shutdown: CancellationToken,
) {
    let client = reqwest::Client::builder()
        .timeout(HEARTBEAT_TIMEOUT)
        // Below the server's idle keep-alive close (server.header_read_timeout).
        .pool_idle_timeout(crate::api::server::CLIENT_IDLE_TIMEOUT)
        .build()
        .unwrap_or_default();
    let url = format!(
        "{}{}",
        target.control_plane.trim_end_matches('/'),
        crate::api::rest::WORKER_HEARTBEAT_PATH
    );
    let mut heartbeat = crate::ticker::every(heartbeat_every);
    let mut health = crate::ticker::every(health_every);
    let mut registered = false;
    // Consecutive failures: the first is logged as a warning, then one in
    // every `LOG_EVERY`, so a partition does not flood the log.
    let mut failures: u64 = 0;
    const LOG_EVERY: u64 = 50;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = health.tick() => { worker.check_health().await; }
            _ = heartbeat.tick() => {
                let beat = Heartbeat {
                    id: worker.id().to_string(),
                    endpoint: target.endpoint.clone(),
                    hostname: worker.hostname().to_string(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    snapshot: worker.snapshot(),
                    instance: worker.instance().to_string(),
                };
                let sent = client
                    .post(&url)
                    .bearer_auth(target.credentials.bearer(Audience::ControlPlane))
                    .json(&beat)
                    .send()
                    .await;
                let failure = match sent {
                    Ok(resp) if resp.status().is_success() => {
                        if !std::mem::replace(&mut registered, true) {
                            tracing::info!(control_plane = %target.control_plane, "registered with the control plane");
                        }
                        if failures > 0 {
                            tracing::info!(failures, "heartbeats reach the control plane again");
                        }
                        failures = 0;
                        continue;
                    }
                    Ok(resp) => {
                        let status = resp.status();
                        let text: String = resp.text().await.unwrap_or_default().chars().take(500).collect();
                        format!("the control plane refused the heartbeat: {status}: {text}")
                    }
                    Err(e) => format!("heartbeat to the control plane failed: {e}"),
                };
                failures += 1;
                if failures % LOG_EVERY == 1 {
                    tracing::warn!(failures, "{failure}");
                } else {
                    tracing::debug!(failures, "{failure}");
                }
            }
        }
    }
}
