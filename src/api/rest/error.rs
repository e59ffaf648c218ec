//! The REST error body `{"code","message"}` and the one mapping from error
//! codes to HTTP status codes.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::service::{Error, ErrorCode};

/// A service error on its way out as HTTP.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

/// Every error answer: `{"code","message"}` (the document's `default`
/// response of each operation).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// Written for the caller; internal details never reach it.
    pub message: String,
}

/// The HTTP status for each StacyVM error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Timeout => StatusCode::REQUEST_TIMEOUT,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::ResourceLimit => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The error code an HTTP status stands for (the inverse of
/// [`status_of`]), for this API's own clients (the CLI, `stacyvm mcp`).
pub fn code_of_status(status: u16) -> Option<ErrorCode> {
    ErrorCode::ALL
        .into_iter()
        .find(|code| status_of(*code).as_u16() == status)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.code();
        // Internal details were logged where the error was made; the
        // client learns only that something broke on our side.
        let message = match &self.0 {
            Error::Internal(_) => "internal server error".to_string(),
            other => other.to_string(),
        };
        let mut response =
            (status_of(code), axum::Json(ErrorBody { code, message })).into_response();
        if let Error::ResourceLimit {
            retry_after_secs, ..
        } = &self.0
            && let Ok(value) = HeaderValue::from_str(&retry_after_secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::{code_of_status, status_of};
    use crate::service::ErrorCode;

    /// Each code has a status of its own, so a client can read the code
    /// back from the status alone.
    #[test]
    fn statuses_map_back_to_their_codes() {
        for code in ErrorCode::ALL {
            assert_eq!(code_of_status(status_of(code).as_u16()), Some(code));
        }
        assert_eq!(code_of_status(200), None);
        assert_eq!(code_of_status(418), None);
    }
}
