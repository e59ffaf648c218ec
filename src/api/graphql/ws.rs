//! The GraphQL WebSocket endpoint: both subprotocols, a message size
//! limit, and server pings so idle subscriptions survive proxies.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use futures::{SinkExt, StreamExt};

use super::{GraphqlState, errors, request_data};
use crate::api::caller::AuthFailure;
use crate::auth::Caller;
use crate::service::Credentials;

/// Largest client message accepted; a bigger one closes the connection
/// with 1009 (message too big).
pub const MAX_WS_MESSAGE_BYTES: usize = 64 * 1024;
/// How often the server pings an open connection.
const PING_EVERY: Duration = Duration::from_secs(20);

/// Credentials in a `connection_init` payload: header names as keys, at
/// the top level or under `headers` (what GraphiQL's header editor sends).
fn payload_credentials(
    payload: &serde_json::Value,
    request_id: String,
    peer: Option<std::net::IpAddr>,
) -> Option<Credentials> {
    let object = payload.get("headers").unwrap_or(payload).as_object()?;
    let get = |name: &str| {
        object
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_str())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let creds = crate::api::caller::credentials(get, request_id, peer);
    let any = creds.api_key.is_some() || creds.admin_api_key.is_some() || creds.bearer.is_some();
    any.then_some(creds)
}

/// The GraphQL WebSockets open on this server: in total, and per
/// credential (the service's per-key counter, with its own cap).
pub(super) struct OpenSockets {
    total: std::sync::atomic::AtomicUsize,
    per_credential: crate::service::InFlightLimiter,
}

impl OpenSockets {
    pub(super) fn new(per_credential: usize) -> OpenSockets {
        OpenSockets {
            total: Default::default(),
            per_credential: crate::service::InFlightLimiter::new(per_credential),
        }
    }

    /// A place for one more socket, unless `max` are open.
    fn open(self: &Arc<Self>, max: usize) -> Option<SocketSlot> {
        let taken = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        taken.ok().map(|_| SocketSlot {
            sockets: self.clone(),
            credential: None,
        })
    }
}

/// One open socket's place; given back when dropped.
struct SocketSlot {
    sockets: Arc<OpenSockets>,
    credential: Option<crate::service::InFlightGuard>,
}

impl SocketSlot {
    /// Counts the socket against `credential`, unless it holds its cap.
    fn claim(&mut self, credential: &str) -> bool {
        self.credential = self.sockets.per_credential.try_hold(credential);
        self.credential.is_some()
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.sockets.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a read error is tungstenite refusing a message over the limit.
fn too_big(e: &axum::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}

/// How a session ended.
enum Ending {
    /// The client left or the protocol ended it.
    Session,
    /// The server is shutting down.
    Shutdown,
    /// No `connection_init` in time (graphql-transport-ws: 4408).
    InitTimeout,
}

/// What a WebSocket reads from its TCP stream at once.
const WS_READ_BUFFER: usize = 4 * 1024;
/// The most a WebSocket buffers for a client that does not read (writes
/// past it fail and the session ends).
const WS_MAX_WRITE_BUFFER: usize = 1024 * 1024;

pub async fn upgrade(
    State(state): State<GraphqlState>,
    caller: Option<axum::Extension<Caller>>,
    failure: Option<axum::Extension<AuthFailure>>,
    connect: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> Response {
    use axum::response::IntoResponse;
    let from_headers: Result<Caller, String> = match (caller, failure) {
        (Some(axum::Extension(caller)), _) => Ok(caller),
        (None, Some(axum::Extension(AuthFailure(e)))) => Err(e.to_string()),
        (None, None) => Err("authentication required".into()),
    };
    let peer = connect.map(|axum::Extension(ConnectInfo(addr))| addr.ip());
    let server = &state.service.config().server;
    let (init_timeout, per_credential) = (
        server.websocket_init_timeout.0,
        server.max_websockets_per_credential,
    );
    let Some(slot) = state.sockets.open(server.max_websockets) else {
        return crate::api::rest::ApiError(crate::service::Error::Unavailable(format!(
            "too many open WebSockets ({}); try again later",
            server.max_websockets
        )))
        .into_response();
    };
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(MAX_WS_MESSAGE_BYTES)
        // tungstenite reserves 128 KiB each way by default: most of what
        // an idle subscription held. Messages in are small (a 64 KiB cap);
        // what goes out is written as it comes, and a client that stops
        // reading holds at most `WS_MAX_WRITE_BUFFER` here.
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(WS_MAX_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            // Shutdown waits for this session's goodbye.
            let _open = state.service.stream_guard();
            let slot = Arc::new(Mutex::new(slot));
            let (mut socket_sink, socket_stream) = socket.split();
            // A message over the limit ends the stream with an error; the
            // session then closes with 1009 as documented.
            let oversized = Arc::new(AtomicBool::new(false));
            let socket_stream = {
                let oversized = oversized.clone();
                socket_stream.inspect(move |item| {
                    if let Err(e) = item
                        && too_big(e)
                    {
                        oversized.store(true, Ordering::Relaxed);
                    }
                })
            };
            let initialised = Arc::new(AtomicBool::new(false));
            // GraphQL writes into a channel; this task forwards it and
            // interleaves pings.
            let (tx, mut rx) = futures::channel::mpsc::channel::<Message>(32);
            let pump = tokio::spawn(async move {
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.tick().await;
                loop {
                    let message = tokio::select! {
                        next = rx.next() => match next {
                            Some(m) => m,
                            None => break,
                        },
                        _ = ping.tick() => Message::Ping(Default::default()),
                    };
                    if socket_sink.send(message).await.is_err() {
                        break;
                    }
                }
                // Best effort: the peer may already be gone.
                let _closed = socket_sink.close().await;
            });
            let close_tx = tx.clone();
            let service = state.service.clone();
            let closing = state.service.streams_closed();
            // Credentials in the init message win over the upgrade request's
            // headers (browsers cannot set headers on a WebSocket).
            let on_init = {
                let (initialised, slot) = (initialised.clone(), slot.clone());
                move |payload: serde_json::Value| async move {
                    initialised.store(true, Ordering::Relaxed);
                    let caller = match payload_credentials(&payload, crate::ids::request(), peer) {
                        Some(creds) => service
                            .authenticate(creds)
                            .await
                            .map_err(errors::gql_error)?,
                        None => from_headers.map_err(|message| {
                            errors::gql_error(crate::service::Error::Unauthorized(message))
                        })?,
                    };
                    let credential = caller
                        .credential
                        .clone()
                        .unwrap_or_else(|| format!("open:{}", caller.owner_id));
                    let claimed = slot
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .claim(&credential);
                    if !claimed {
                        return Err(errors::gql_error(crate::service::Error::ResourceLimit {
                            message: format!(
                                "this credential holds {per_credential} open WebSockets already (server.max_websockets_per_credential)"
                            ),
                            retry_after_secs: 1,
                        }));
                    }
                    Ok(request_data(&service, caller))
                }
            };
            let session =
                GraphQLWebSocket::new_with_pair(tx, socket_stream, state.schema.clone(), protocol)
                    .on_connection_init(on_init)
                    .serve();
            let mut session = Box::pin(session);
            let init_deadline = tokio::time::sleep(init_timeout);
            tokio::pin!(init_deadline, closing);
            let mut waiting_for_init = true;
            let ending = loop {
                tokio::select! {
                    () = &mut session => break Ending::Session,
                    () = &mut closing => break Ending::Shutdown,
                    () = &mut init_deadline, if waiting_for_init => {
                        if !initialised.load(Ordering::Relaxed) {
                            break Ending::InitTimeout;
                        }
                        waiting_for_init = false;
                    }
                }
            };
            let mut close_tx = close_tx;
            let goodbye = |code, reason: &'static str| {
                Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                }))
            };
            match ending {
                Ending::Session if oversized.load(Ordering::Relaxed) => {
                    let _peer_gone = close_tx
                        .send(goodbye(close_code::SIZE, "message too big"))
                        .await;
                }
                Ending::Session => {}
                Ending::InitTimeout => {
                    let _peer_gone = close_tx
                        .send(goodbye(4408, "Connection initialisation timeout"))
                        .await;
                }
                Ending::Shutdown => {
                // Subscriptions are ending: let the session send their
                // final `complete` messages, then say goodbye.
                    let _still_open =
                        tokio::time::timeout(Duration::from_millis(300), &mut session).await;
                    let _peer_gone = close_tx
                        .send(goodbye(close_code::AWAY, "server shutting down"))
                        .await;
                }
            }
            // The pump ends once every sender is gone (the session holds one).
            drop(session);
            drop(close_tx);
            if let Err(e) = pump.await {
                tracing::debug!(error = %e, "websocket pump ended abnormally");
            }
        })
}
