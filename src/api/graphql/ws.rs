//! The GraphQL WebSocket endpoint: both subprotocols, a message size
//! limit, and server pings so idle subscriptions survive proxies.

use std::time::Duration;

use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::extract::State;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::response::Response;
use futures::{SinkExt, StreamExt};

use super::{GraphqlState, request_data};
use crate::auth::Caller;

/// Largest client message accepted; a bigger one closes the connection
/// with 1009 (message too big).
pub const MAX_WS_MESSAGE_BYTES: usize = 64 * 1024;
/// How often the server pings an open connection.
const PING_EVERY: Duration = Duration::from_secs(20);

pub async fn upgrade(
    State(state): State<GraphqlState>,
    caller: Caller,
    protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(MAX_WS_MESSAGE_BYTES)
        .on_upgrade(move |socket| async move {
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
            let data = request_data(&state.service, caller);
            GraphQLWebSocket::new_with_pair(tx, socket_stream, state.schema.clone(), protocol)
                .with_data(data)
                .serve()
                .await;
            if let Err(e) = pump.await {
                tracing::debug!(error = %e, "websocket pump ended abnormally");
            }
        })
}
