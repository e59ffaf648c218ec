//! Extractors that answer bad input in StacyVM's error shape (axum's own
//! rejections are plain text and sometimes 422), and the caller identity.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::ApiError;
use crate::service::{Error, Service};

/// A JSON body. An empty body reads as `T::default()`, because some SDK
/// calls POST without one.
pub struct JsonBody<T>(pub T);

impl<T> FromRequest<Service> for JsonBody<T>
where
    T: DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Service) -> Result<Self, Self::Rejection> {
        let limit = state.config().server.max_body_bytes;
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError(Error::BadRequest(
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    format!("request body is larger than {limit} bytes")
                } else {
                    format!("cannot read request body: {e}")
                },
            ))
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBody(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError(Error::BadRequest(format!("invalid JSON body: {e}"))))
    }
}

/// Query parameters, with parse errors as 400 BAD_REQUEST.
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| ApiError(Error::BadRequest(e.body_text())))
    }
}
