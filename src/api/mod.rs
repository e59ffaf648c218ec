//! The HTTP surface. Only this module knows axum, HTTP and JSON shapes; it
//! translates requests into service calls and answers back.

pub mod caller;
pub mod graphql;
pub mod internal;
pub mod playground;
pub mod rest;

use axum::Router;
use axum::http::HeaderName;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::service::Service;

/// The header that carries the request id, echoed on every answer.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole HTTP application.
pub fn router(service: Service) -> Router {
    Router::new()
        .nest("/api/v1", rest::router(service.clone()))
        .merge(graphql::router(service.clone()))
        .merge(playground::router())
        .merge(internal::router(service.clone()))
        .fallback(rest::not_found)
        .layer(axum::middleware::from_fn_with_state(
            service.clone(),
            caller::authenticate,
        ))
        .layer(TraceLayer::new_for_http())
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}
