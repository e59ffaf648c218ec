//! The caller of an HTTP request (REST, GraphQL and its WebSocket alike).

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;

use crate::api::rest::ApiError;
use crate::auth::Caller;
use crate::service::{Error, Service};

impl<S> FromRequestParts<S> for Caller
where
    Service: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let request_id = header("x-request-id").unwrap_or_else(crate::ids::request);
        let mut caller = Caller::anonymous(request_id);
        // The SDK's pool-mode user: in open mode it names the owner.
        if let Some(user) = header("x-user-id") {
            if user.len() > 128 || user.chars().any(char::is_control) {
                return Err(ApiError(Error::BadRequest("invalid X-User-ID".into())));
            }
            caller.owner_id = user;
        }
        Ok(caller)
    }
}
