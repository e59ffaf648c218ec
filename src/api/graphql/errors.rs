//! Error codes on every GraphQL error: service errors carry their own
//! (`NOT_FOUND`, `BAD_REQUEST`, ...); parse and validation errors (syntax,
//! unknown fields, depth and complexity limits) get `BAD_REQUEST`.

use std::sync::Arc;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextRequest, NextSubscribe,
};
use async_graphql::{ErrorExtensions, Response, ServerError};
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::service::{Error, ErrorCode};

/// Converts a service error into a GraphQL error with `extensions.code`.
pub fn gql_error(e: Error) -> async_graphql::Error {
    let code = e.code();
    let message = match &e {
        // Details were logged where the error was made.
        Error::Internal(_) => "internal server error".to_string(),
        other => other.to_string(),
    };
    async_graphql::Error::new(message).extend_with(|_, ext| ext.set("code", code.as_str()))
}

/// `result.gql()?` in resolvers.
pub trait GqlResult<T> {
    fn gql(self) -> async_graphql::Result<T>;
}

impl<T> GqlResult<T> for Result<T, Error> {
    fn gql(self) -> async_graphql::Result<T> {
        self.map_err(gql_error)
    }
}

fn with_code(mut error: ServerError) -> ServerError {
    let has_code = error
        .extensions
        .as_ref()
        .is_some_and(|ext| ext.get("code").is_some());
    if !has_code {
        error
            .extensions
            .get_or_insert_with(Default::default)
            .set("code", ErrorCode::BadRequest.as_str());
    }
    error
}

fn fill_codes(mut response: Response) -> Response {
    response.errors = response.errors.into_iter().map(with_code).collect();
    response
}

/// The extension that fills in missing error codes.
pub struct ErrorCodes;

impl ExtensionFactory for ErrorCodes {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(ErrorCodesExtension)
    }
}

struct ErrorCodesExtension;

#[async_trait::async_trait]
impl Extension for ErrorCodesExtension {
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        fill_codes(next.run(ctx).await)
    }

    fn subscribe<'s>(
        &self,
        ctx: &ExtensionContext<'_>,
        stream: BoxStream<'s, Response>,
        next: NextSubscribe<'_>,
    ) -> BoxStream<'s, Response> {
        next.run(ctx, stream).map(fill_codes).boxed()
    }
}
