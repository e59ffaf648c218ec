//! The one error type of the API: every service call fails with [`Error`],
//! and each adapter maps [`ErrorCode`] once (REST to status codes, GraphQL
//! to `extensions.code`).

use crate::provider::ProviderError;
use crate::scheduler::ScheduleError;
use crate::store::StoreError;

/// The StacyVM error codes, as clients read them (serialized as
/// [`ErrorCode::as_str`] says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Timeout,
    Conflict,
    ResourceLimit,
    #[serde(rename = "INTERNAL_ERROR")]
    Internal,
    Unavailable,
}

impl ErrorCode {
    /// Every code (keep in step with the enum: the OpenAPI document lists
    /// the statuses of these).
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Timeout,
        ErrorCode::Conflict,
        ErrorCode::ResourceLimit,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::ResourceLimit => "RESOURCE_LIMIT",
            ErrorCode::Internal => "INTERNAL_ERROR",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }
}

/// A failed service call. The message is written for the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{message}")]
    ResourceLimit {
        message: String,
        /// Seconds after which a retry may succeed.
        retry_after_secs: u64,
    },
    #[error("{0}")]
    Unavailable(String),
    /// Something broke inside StacyVM. The client sees only a generic
    /// message; the details are logged where the error is converted.
    #[error("internal error")]
    Internal(String),
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::Unauthorized(_) => ErrorCode::Unauthorized,
            Error::Forbidden(_) => ErrorCode::Forbidden,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::Conflict(_) => ErrorCode::Conflict,
            Error::Timeout(_) => ErrorCode::Timeout,
            Error::ResourceLimit { .. } => ErrorCode::ResourceLimit,
            Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The sandbox answer for ids that do not exist, are destroyed, or
    /// belong to someone else: all three look the same to the caller.
    pub fn sandbox_not_found(id: &str) -> Error {
        Error::NotFound(format!("sandbox {id} not found"))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An internal error, logged here once with where it was made (the
    /// client only sees "internal error"; the detail also reaches the
    /// audit trail).
    #[track_caller]
    pub fn internal(detail: impl Into<String>) -> Error {
        let detail = detail.into();
        let location = std::panic::Location::caller();
        tracing::error!(error = %detail, %location, "internal error");
        Error::Internal(detail)
    }
}

impl From<StoreError> for Error {
    #[track_caller]
    fn from(e: StoreError) -> Self {
        if let StoreError::AlreadyExists(_) = e {
            return Error::Conflict(e.to_string());
        }
        let location = std::panic::Location::caller();
        tracing::error!(error = %e, %location, "store error");
        Error::Internal(e.to_string())
    }
}

impl From<ScheduleError> for Error {
    fn from(e: ScheduleError) -> Self {
        match e {
            ScheduleError::UnknownProvider { .. }
            | ScheduleError::TooManyVcpus { .. }
            | ScheduleError::TooMuchMemory { .. } => Error::BadRequest(e.to_string()),
            ScheduleError::ProviderUnavailable { .. }
            | ScheduleError::UnknownWorker(_)
            | ScheduleError::NoWorker(_) => Error::Unavailable(e.to_string()),
        }
    }
}

impl From<ProviderError> for Error {
    #[track_caller]
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::ImageNotFound { .. }
            | ProviderError::InvalidRequest(_)
            | ProviderError::Unsupported { .. } => Error::BadRequest(e.to_string()),
            ProviderError::FileNotFound(_) => Error::NotFound(e.to_string()),
            ProviderError::RuntimeNotFound(_) => {
                Error::Conflict("the sandbox's runtime is gone; destroy the sandbox".into())
            }
            ProviderError::Unavailable(_) => Error::Unavailable(e.to_string()),
            // Another manager took the sandbox over (its lease moved on).
            ProviderError::Fenced(_) => Error::Conflict(e.to_string()),
            ProviderError::Conflict(m) => Error::Conflict(format!("the sandbox's runtime: {m}")),
            ProviderError::Runtime(_) => {
                let location = std::panic::Location::caller();
                tracing::error!(error = %e, %location, "provider error");
                Error::Internal(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    /// The OpenAPI document lists the serialized names; clients read
    /// `as_str`: they are one and the same.
    #[test]
    fn error_codes_serialize_as_clients_read_them() {
        for code in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_value(code).ok(),
                Some(serde_json::Value::from(code.as_str()))
            );
        }
    }
}
