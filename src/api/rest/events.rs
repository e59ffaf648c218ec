//! `GET /api/v1/events`: the event bus as server-sent events, the
//! original's names (`sandbox.created`, `exec.completed`, ...), each with
//! an `id:`; a client that sends `Last-Event-ID` (browsers' `EventSource`
//! does on its own) resumes after it without a gap. Filtered by what the
//! caller may see, by the same rule as the GraphQL subscriptions.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiError;
use super::extract::Query;
use crate::auth::Caller;
use crate::service::{Service, Streamed};

/// A comment line this often keeps proxies from closing a quiet stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub fn router() -> OpenApiRouter<Service> {
    OpenApiRouter::new().routes(routes!(events))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// The same as the `Last-Event-ID` header, for clients that cannot set
    /// headers; the header wins when both are given.
    last_event_id: Option<String>,
}

/// The events the caller may see as server-sent events, named as the
/// original server names them (`sandbox.created`, `exec.completed`, ...),
/// each with an `id:`; after a `gap` event, read the current state again.
#[utoipa::path(get, operation_id = "streamEvents", path = "/events", tag = "events",
    params(EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "An endless event stream",
        headers(("x-stacyvm-replica" = String, description = "The replica whose ids these are")),
        content_type = "text/event-stream", body = String)))]
async fn events(
    State(service): State<Service>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let header = match headers.get("last-event-id") {
        Some(value) => Some(value.to_str().map_err(|_| {
            ApiError(crate::service::Error::BadRequest(
                "Last-Event-ID is not visible ASCII".into(),
            ))
        })?),
        None => None,
    };
    let after = header.or(q.last_event_id.as_deref());
    let stream = service.follow_events_from(&caller, after)?;
    let events = Sse::new(stream.map(|item| Ok::<_, Infallible>(to_sse(item))))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE));
    // Ids number one replica's events: behind a load balancer a client
    // that resumes on another replica gets a gap, and this says why.
    Ok((
        [("x-stacyvm-replica", service.replica_id().to_string())],
        events,
    ))
}

fn to_sse(item: Streamed) -> SseEvent {
    match item {
        Streamed::Event { id, event } => {
            let data = serde_json::to_string(&event).unwrap_or_else(|e| {
                tracing::error!(error = %e, "an event does not serialise");
                "{}".into()
            });
            SseEvent::default()
                .event(event.name())
                .id(id.to_string())
                .data(data)
        }
        Streamed::Gap => SseEvent::default().event("gap").data(
            json!({ "message": "events were missed here; read current state again" }).to_string(),
        ),
    }
}
