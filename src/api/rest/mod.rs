//! The REST compatibility layer under `/api/v1`: exactly the paths, bodies
//! and answers that the published `stacyvm` SDKs use. One file per resource.

mod admin;
mod error;
mod events;
mod exec;
mod extract;
mod files;
mod quotas;
mod sandboxes;
mod system;
mod templates;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;

use crate::service::{Error, Service};

pub use error::ApiError;

/// Where `stacyvm worker` heartbeats; authenticated by the worker token
/// in the handler, not by the API's caller middleware.
pub const WORKER_HEARTBEAT_PATH: &str = "/api/v1/workers/heartbeat";

/// Every REST route.
pub fn router(service: Service) -> Router {
    let body_limit = service.config().server.max_body_bytes;
    Router::new()
        .merge(sandboxes::router())
        .merge(exec::router())
        .merge(events::router())
        .merge(files::router())
        .merge(templates::router())
        .merge(system::router())
        .merge(quotas::router())
        .merge(admin::router())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(service)
}

/// Unknown paths answer in StacyVM's error shape.
pub async fn not_found() -> impl IntoResponse {
    ApiError(Error::NotFound("no such route".into()))
}
