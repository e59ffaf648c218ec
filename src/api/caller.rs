//! Authentication for every HTTP surface: one middleware turns the
//! credentials into a [`Caller`] (or a refusal), applies the per-key rate
//! limit, and leaves the caller in the request for the handlers.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::rest::ApiError;
use crate::auth::Caller;
use crate::service::{Credentials, Error, Service};

/// Paths anyone may read: liveness probes, the static pages (playground,
/// dashboard, API reference) and the OpenAPI document.
fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/api/v1/health"
            | "/api/v1/live"
            | "/api/v1/ready"
            | "/playground"
            | "/dashboard"
            | crate::api::playground::DOCS_PATH
            | crate::api::rest::OPENAPI_PATH
    ) || path.starts_with("/playground/assets/")
        || path == "/graphql"
}

/// Credentials as headers carry them (also used for WebSocket init payloads).
pub fn credentials(
    get: impl Fn(&str) -> Option<String>,
    request_id: String,
    peer: Option<std::net::IpAddr>,
) -> Credentials {
    let bearer = get("authorization").and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .map(|t| t.trim().to_string())
    });
    Credentials {
        api_key: get("x-api-key"),
        admin_api_key: get("x-admin-api-key"),
        bearer,
        user_id: get("x-user-id"),
        request_id,
        peer,
        host: get("host"),
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// Why a request has no caller; kept so the WebSocket endpoint can retry
/// with the credentials of its init message.
#[derive(Clone)]
pub struct AuthFailure(pub std::sync::Arc<Error>);

/// The middleware.
pub async fn authenticate(
    State(service): State<Service>,
    mut req: Request,
    next: Next,
) -> Response {
    // A worker's heartbeat carries its worker token, which the service
    // checks; it is no caller of the API.
    if req.uri().path() == crate::api::rest::WORKER_HEARTBEAT_PATH
        && req.method() == axum::http::Method::POST
    {
        return next.run(req).await;
    }
    // Another replica, with the cluster's token, checked by the service.
    if req.uri().path().starts_with(crate::api::internal::PREFIX) {
        return next.run(req).await;
    }
    let headers = req.headers();
    let request_id = header(headers, "x-request-id").unwrap_or_else(crate::ids::request);
    let peer = crate::api::server::peer(req.extensions()).map(|a| a.ip());
    let creds = credentials(|name| header(headers, name), request_id, peer);
    let path = req.uri().path().to_string();
    let is_get = req.method() == axum::http::Method::GET;
    match service.authenticate(creds).await {
        Ok(caller) => {
            let decision = service.check_rate(&caller);
            if let Some(decision) = &decision
                && !decision.allowed
            {
                let mut response = ApiError(Error::ResourceLimit {
                    message: "rate limit exceeded; slow down".into(),
                    retry_after_secs: decision
                        .retry_after
                        .map_or(1, |d| d.as_secs_f64().ceil() as u64),
                })
                .into_response();
                add_headers(&mut response, decision.headers());
                return response;
            }
            let held = match service.hold_request(&caller) {
                Ok(held) => held,
                Err(e) => return ApiError(e).into_response(),
            };
            req.extensions_mut().insert(caller);
            let mut response = next.run(req).await;
            // The place is given back when the body has been sent (or
            // dropped): a stream holds it while it runs.
            let response_body = std::mem::take(response.body_mut());
            *response.body_mut() = axum::body::Body::new(Holding {
                body: response_body,
                _held: held,
            });
            if let Some(decision) = decision {
                add_headers(&mut response, decision.headers());
            }
            response
        }
        // Public pages need no caller; the WebSocket may authenticate in
        // its init message instead of headers (browsers cannot set them).
        Err(e) if (is_public(&path) && is_get) || path == "/graphql/ws" => {
            req.extensions_mut()
                .insert(AuthFailure(std::sync::Arc::new(e)));
            next.run(req).await
        }
        Err(e) => ApiError(e).into_response(),
    }
}

/// A response body that keeps its request's in-flight place until it ends.
struct Holding {
    body: axum::body::Body,
    _held: crate::service::InFlightGuard,
}

impl http_body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.body)
    }
}

fn add_headers(response: &mut Response, headers: Vec<(&'static str, String)>) {
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        let error = match parts.extensions.get::<AuthFailure>() {
            Some(AuthFailure(e)) => match e.code() {
                crate::service::ErrorCode::Forbidden => Error::Forbidden(e.to_string()),
                crate::service::ErrorCode::BadRequest => Error::BadRequest(e.to_string()),
                _ => Error::Unauthorized(e.to_string()),
            },
            None => Error::Unauthorized("authentication required".into()),
        };
        Err(ApiError(error))
    }
}
