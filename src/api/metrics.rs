//! `/metrics/prometheus` (the original's path) and `/metrics`: the
//! service's metrics in Prometheus' text format; and the middleware that
//! counts every HTTP answer by route template and status.

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::api::rest::ApiError;
use crate::auth::Caller;
use crate::service::Service;

/// What prometheus-client writes: the OpenMetrics text format (which
/// Prometheus asks for first), `# EOF` included.
const TEXT_FORMAT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `/metrics` and `/metrics/prometheus`; `/api/v1/metrics/prometheus` is
/// the REST router's (it is in the OpenAPI document).
pub fn router(service: Service) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/metrics/prometheus", get(scrape))
        .with_state(service)
}

/// The server's metrics in the OpenMetrics text format (admins and
/// operators; also at `/metrics` and `/metrics/prometheus`).
#[utoipa::path(get, operation_id = "prometheusMetrics", path = "/metrics/prometheus", tag = "system",
    responses((status = 200, description = "Sandboxes by state, latencies, admission, workers, HTTP answers",
        content_type = TEXT_FORMAT, body = String)))]
pub async fn scrape(State(service): State<Service>, caller: Caller) -> Result<Response, ApiError> {
    let text = service.prometheus_text(&caller).await?;
    Ok(([(header::CONTENT_TYPE, TEXT_FORMAT)], text).into_response())
}

/// Counts the answer under its route's template (`/api/v1/sandboxes/{id}`),
/// `unmatched` for paths no route takes (so that scanners cannot grow the
/// label set).
pub async fn record(State(service): State<Service>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    // A fixed set: clients may send any token as a method.
    let method = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let response = next.run(req).await;
    service.metrics().http(
        method,
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}
