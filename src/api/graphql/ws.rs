//! The GraphQL WebSocket endpoint: both subprotocols, a message size
//! limit, and server pings so idle subscriptions survive proxies.

use std::time::Duration;

use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::extract::State;
use axum::extract::ws::{Message, WebSocketUpgrade};
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
fn payload_credentials(payload: &serde_json::Value, request_id: String) -> Option<Credentials> {
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
    let creds = crate::api::caller::credentials(get, request_id);
    let any = creds.api_key.is_some() || creds.admin_api_key.is_some() || creds.bearer.is_some();
    any.then_some(creds)
}

pub async fn upgrade(
    State(state): State<GraphqlState>,
    caller: Option<axum::Extension<Caller>>,
    failure: Option<axum::Extension<AuthFailure>>,
    protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> Response {
    let from_headers: Result<Caller, String> = match (caller, failure) {
        (Some(axum::Extension(caller)), _) => Ok(caller),
        (None, Some(axum::Extension(AuthFailure(e)))) => Err(e.to_string()),
        (None, None) => Err("authentication required".into()),
    };
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(MAX_WS_MESSAGE_BYTES)
        .on_upgrade(move |socket| async move {
            // Shutdown waits for this session's goodbye.
            let _open = state.service.stream_guard();
            let (mut socket_sink, socket_stream) = socket.split();
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
            let on_init = move |payload: serde_json::Value| async move {
                let caller = match payload_credentials(&payload, crate::ids::request()) {
                    Some(creds) => service
                        .authenticate(creds)
                        .await
                        .map_err(errors::gql_error)?,
                    None => from_headers.map_err(|message| {
                        errors::gql_error(crate::service::Error::Unauthorized(message))
                    })?,
                };
                Ok(request_data(&service, caller))
            };
            let session =
                GraphQLWebSocket::new_with_pair(tx, socket_stream, state.schema.clone(), protocol)
                    .on_connection_init(on_init)
                    .serve();
            let mut session = Box::pin(session);
            let server_closing = tokio::select! {
                () = &mut session => false,
                () = closing => true,
            };
            let mut close_tx = close_tx;
            if server_closing {
                // Subscriptions are ending: let the session send their
                // final `complete` messages, then say goodbye.
                let _still_open =
                    tokio::time::timeout(Duration::from_millis(300), &mut session).await;
                let goodbye = axum::extract::ws::CloseFrame {
                    code: axum::extract::ws::close_code::AWAY,
                    reason: "server shutting down".into(),
                };
                let _peer_gone = close_tx.send(Message::Close(Some(goodbye))).await;
            }
            // The pump ends once every sender is gone (the session holds one).
            drop(session);
            drop(close_tx);
            if let Err(e) = pump.await {
                tracing::debug!(error = %e, "websocket pump ended abnormally");
            }
        })
}
