//! The HTTP surface. Only this module knows axum, HTTP and JSON shapes; it
//! translates requests into service calls and answers back.

pub mod caller;
pub mod graphql;
pub mod internal;
pub mod mcp;
pub mod metrics;
pub mod playground;
pub mod rest;
pub mod server;

use axum::Router;
use axum::http::HeaderName;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::service::Service;

/// The header that carries the request id, echoed on every answer.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client request id kept.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether a client's `X-Request-ID` is kept: up to
/// [`MAX_REQUEST_ID_LEN`] letters, digits and `-_.:`. Another one is
/// replaced by a fresh id (it is echoed and stored in audit events, so it
/// must be small and inert in logs, CSV and HTML).
pub fn valid_request_id(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= MAX_REQUEST_ID_LEN
        && value
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

/// Drops an `X-Request-ID` that [`valid_request_id`] refuses, so that
/// `SetRequestIdLayer` gives the request a fresh one.
async fn bound_request_id(mut req: axum::extract::Request) -> axum::extract::Request {
    let values = req.headers().get_all(&REQUEST_ID);
    let keep = values.iter().count() == 1 && values.iter().all(|v| valid_request_id(v.as_bytes()));
    if !keep {
        req.headers_mut().remove(&REQUEST_ID);
    }
    req
}

/// The whole HTTP application.
pub fn router(service: Service) -> Router {
    Router::new()
        .merge(rest::router(service.clone()))
        .merge(graphql::router(service.clone()))
        .merge(playground::router())
        .merge(internal::router(service.clone()))
        .merge(metrics::router(service.clone()))
        .merge(mcp::router(service.clone()))
        .fallback(rest::not_found)
        .layer(axum::middleware::from_fn_with_state(
            service.clone(),
            caller::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            service.clone(),
            metrics::record,
        ))
        .layer(TraceLayer::new_for_http())
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(axum::middleware::map_request(bound_request_id))
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_short_and_plain() {
        assert!(super::valid_request_id(b"req-ivy-1"));
        assert!(super::valid_request_id(b"0f8c.42:a_b"));
        assert!(super::valid_request_id(&[b'a'; super::MAX_REQUEST_ID_LEN]));
        assert!(!super::valid_request_id(
            &[b'a'; super::MAX_REQUEST_ID_LEN + 1]
        ));
        assert!(!super::valid_request_id(b""));
        assert!(!super::valid_request_id(b"=cmd|' /C calc'!A0"));
        assert!(!super::valid_request_id(b"<script>"));
        assert!(!super::valid_request_id("caf\u{e9}".as_bytes()));
    }
}
