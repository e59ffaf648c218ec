//! `/internal/v1/...`: calls between control-plane replicas, authenticated
//! by the cluster's signed token (not an API key), checked by the service
//! before anything else is read.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::api::rest::ApiError;
use crate::service::Service;
use crate::service::output::WireOutput;

/// Every path under this prefix is exempt from the API's caller middleware.
pub const PREFIX: &str = "/internal/v1/";

pub fn router(service: Service) -> Router {
    Router::new()
        .route("/internal/v1/executions/{id}/output", get(output))
        .with_state(service)
}

#[derive(Deserialize)]
struct From {
    #[serde(default)]
    from_seq: u64,
}

/// The live output of a command this replica runs, as NDJSON
/// [`WireOutput`] lines ending with its end.
async fn output(
    State(service): State<Service>,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::extract::Query(from): axum::extract::Query<From>,
) -> Result<Response, ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let follower = service.relay_output(authorization, &id, from.from_seq)?;
    let mut beat = tokio::time::interval(crate::service::cluster::RELAY_KEEPALIVE);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.reset();
    let lines = futures::stream::unfold((follower, beat), |(mut follower, mut beat)| async move {
        // A quiet command still says it is there, so the follower can tell
        // it from a replica gone silent.
        let wire = tokio::select! {
            event = follower.next() => WireOutput::from(event?),
            _ = beat.tick() => WireOutput::KeepAlive,
        };
        let mut line = serde_json::to_vec(&wire).unwrap_or_default();
        line.push(b'\n');
        Some((
            Ok::<_, std::convert::Infallible>(Bytes::from(line)),
            (follower, beat),
        ))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}
