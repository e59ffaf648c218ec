//! `GET /api/v1/sandboxes/{id}/pty`: a terminal in a sandbox over a
//! WebSocket (`service::terminals` holds the sessions).
//!
//! Query: `session` (come back to an open session: its scrollback is
//! replayed), or `command` (a shell command line; default: the sandbox's
//! shell), `cols` and `rows` for a new one.
//!
//! The server sends a text message `{"type":"session","id":...}` first,
//! then the terminal's output as binary messages, and at the end
//! `{"type":"exit","exit_code":N}` (or `{"type":"error","message":...}`)
//! before it closes. `{"type":"skipped","bytes":N}` says output was lost
//! to the scrollback's bound, `{"type":"taken_over"}` that another client
//! attached. The client sends what is typed as binary (or
//! `{"type":"input","data":...}`) and `{"type":"resize","cols":C,"rows":R}`.
//! Closing the socket detaches: the session waits for a client to come
//! back (`service::terminals::GRACE`).
//!
//! Not in the OpenAPI document: it is a WebSocket, not a REST operation.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;

use super::ApiError;
use crate::auth::Caller;
use crate::provider::{ExecExit, TerminalInput, TerminalSize};
use crate::service::Service;
use crate::service::terminals::{Attachment, Output, TerminalRequest};

/// The largest message a client may send.
const MAX_MESSAGE: usize = 64 << 10;

/// How long a client may be silent (it is pinged every third of it).
const LIVENESS: std::time::Duration = std::time::Duration::from_secs(90);

pub fn router() -> axum::Router<Service> {
    axum::Router::new().route("/api/v1/sandboxes/{id}/pty", axum::routing::get(pty))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PtyQuery {
    session: Option<String>,
    command: Option<String>,
    cols: Option<u16>,
    rows: Option<u16>,
}

/// What a client sends as text.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    Input { data: String },
    Resize { cols: u16, rows: u16 },
}

async fn pty(
    State(service): State<Service>,
    caller: Caller,
    Path(id): Path<String>,
    super::extract::Query(query): super::extract::Query<PtyQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // The session is opened (or found) before the upgrade: a refusal is
    // an ordinary `{"code","message"}` answer.
    let attachment = match query.session.as_deref() {
        Some(session) => service.attach_terminal(&caller, &id, session).await?,
        None => {
            let req = TerminalRequest {
                command: query.command,
                cols: query.cols,
                rows: query.rows,
            };
            service.open_terminal(&caller, &id, req).await?
        }
    };
    Ok(upgrade
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| serve(socket, attachment)))
}

fn text(value: serde_json::Value) -> Message {
    Message::Text(value.to_string().into())
}

async fn serve(mut socket: WebSocket, mut attachment: Attachment) {
    let hello = serde_json::json!({"type": "session", "id": attachment.session.id});
    if socket.send(text(hello)).await.is_err() {
        return;
    }
    let taken_over = attachment.taken_over.clone();
    let mut heard = tokio::time::Instant::now();
    let mut ping = tokio::time::interval(LIVENESS / 3);
    loop {
        tokio::select! {
            _ = ping.tick() => {
                // A client gone without a word detaches, so the session's
                // grace begins.
                if heard.elapsed() > LIVENESS || socket.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            output = attachment.next() => {
                let message = match output {
                    Some(Output::Data { data, skipped }) => {
                        if skipped > 0 {
                            let note = serde_json::json!({"type": "skipped", "bytes": skipped});
                            if socket.send(text(note)).await.is_err() {
                                return;
                            }
                        }
                        Message::Binary(data)
                    }
                    Some(Output::End(end)) => {
                        let last = match end {
                            Ok(ExecExit::Exited(code)) => serde_json::json!({"type": "exit", "exit_code": code}),
                            Ok(ExecExit::TimedOut) => serde_json::json!({"type": "exit", "exit_code": 137, "timed_out": true}),
                            Err(message) => serde_json::json!({"type": "error", "message": message}),
                        };
                        crate::provider::best_effort_quiet("telling a terminal client the end", socket.send(text(last)).await);
                        crate::provider::best_effort_quiet("closing a terminal's socket", socket.send(Message::Close(None)).await);
                        return;
                    }
                    None => return,
                };
                if socket.send(message).await.is_err() {
                    return;
                }
            }
            message = socket.recv() => {
                heard = tokio::time::Instant::now();
                let input = match message {
                    Some(Ok(Message::Binary(data))) => TerminalInput::Data(data),
                    Some(Ok(Message::Text(body))) => match serde_json::from_str::<ClientMessage>(&body) {
                        Ok(ClientMessage::Input { data }) => TerminalInput::Data(data.into_bytes().into()),
                        Ok(ClientMessage::Resize { cols, rows }) => TerminalInput::Resize(TerminalSize { cols, rows }),
                        Err(e) => {
                            let error = serde_json::json!({"type": "error", "code": "BAD_REQUEST", "message": format!("not a terminal message: {e}")});
                            crate::provider::best_effort_quiet("answering a bad terminal message", socket.send(text(error)).await);
                            continue;
                        }
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    // Closed or broken: the session waits for a client to come back.
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                };
                if let Err(e) = attachment.send(input) {
                    let error = serde_json::json!({"type": "error", "code": e.code().as_str(), "message": e.to_string()});
                    crate::provider::best_effort_quiet("answering a refused terminal input", socket.send(text(error)).await);
                }
            }
            () = taken_over.cancelled() => {
                crate::provider::best_effort_quiet("telling a terminal client it was taken over", socket.send(text(serde_json::json!({"type": "taken_over"}))).await);
                crate::provider::best_effort_quiet("closing a terminal's socket", socket.send(Message::Close(None)).await);
                return;
            }
        }
    }
}
