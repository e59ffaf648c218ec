//! The GraphQL API: one endpoint for dashboards and web UIs.
//!
//! `POST /graphql` runs queries and mutations; `GET /graphql/ws` speaks
//! both WebSocket subprotocols (graphql-transport-ws and the legacy
//! graphql-ws) for subscriptions. Every resolver is a thin adapter over
//! `Service`: it reads the [`Caller`] and the service from the context and
//! makes one call. Errors carry `extensions.code` from the one API error type.

mod errors;
mod limits;
mod loaders;
mod mutation;
mod query;
mod subscription;
mod terminal;
mod types;
mod ws;

pub use limits::{MAX_DEPTH, MAX_INTROSPECTION_DEPTH, MAX_SELECTIONS};
pub use ws::MAX_WS_MESSAGE_BYTES;

use async_graphql::dataloader::DataLoader;
use async_graphql::{Context, Data, Schema};
use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};

use crate::auth::Caller;
use crate::service::Service;

pub use errors::ErrorCodes;
pub use mutation::MutationRoot;
pub use query::QueryRoot;
pub use subscription::SubscriptionRoot;

/// The StacyVM schema.
pub type StacySchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// Largest `POST /graphql` body.
pub const MAX_GRAPHQL_BODY: usize = 256 * 1024;

/// Largest query complexity accepted (a field costs 1).
pub const MAX_COMPLEXITY: usize = 2000;

/// Builds the schema; tests and `stacyvm schema` call it without HTTP.
pub fn build_schema(service: Service) -> StacySchema {
    let introspection = service.config().server.graphql_introspection;
    let builder = Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .data(service)
        .extension(ErrorCodes)
        // Its `prepare_request` parses and checks the document before
        // async-graphql's own checks walk it.
        .extension(limits::QueryLimits)
        // A backstop; data depth is bounded tighter by `limits`.
        .limit_depth(limits::MAX_INTROSPECTION_DEPTH)
        // The parser's nesting (it counts selection sets and fields): the
        // standard introspection query needs more than the default 32.
        .limit_recursive_depth(limits::MAX_PARSE_NESTING)
        .limit_complexity(MAX_COMPLEXITY);
    if introspection {
        builder.finish()
    } else {
        builder.disable_introspection().finish()
    }
}

/// The schema in SDL, as committed in `schema.graphql`.
pub fn sdl() -> String {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .finish()
        .sdl()
}

/// Per-request data: who calls, and batch loaders scoped to this request.
fn request_data(service: &Service, caller: Caller) -> Data {
    let mut data = Data::default();
    let loader = loaders::StoreLoader::new(service.clone(), caller.clone());
    data.insert(caller);
    // A few milliseconds of batching window: a page's resolvers all ask
    // within it even on a busy machine.
    data.insert(DataLoader::new(loader, tokio::spawn).delay(std::time::Duration::from_millis(3)));
    data
}

/// The service and caller of a resolver.
pub(crate) fn ctx<'a>(cx: &'a Context<'_>) -> async_graphql::Result<(&'a Service, &'a Caller)> {
    Ok((cx.data::<Service>()?, cx.data::<Caller>()?))
}

#[derive(Clone)]
struct GraphqlState {
    schema: StacySchema,
    service: Service,
    sockets: std::sync::Arc<ws::OpenSockets>,
}

impl axum::extract::FromRef<GraphqlState> for Service {
    fn from_ref(state: &GraphqlState) -> Service {
        state.service.clone()
    }
}

/// The GraphQL routes: `POST /graphql` and `GET /graphql/ws`.
pub fn router(service: Service) -> Router {
    let per_credential = service.config().server.max_websockets_per_credential;
    let state = GraphqlState {
        schema: build_schema(service.clone()),
        service,
        sockets: std::sync::Arc::new(ws::OpenSockets::new(per_credential)),
    };
    Router::new()
        .route("/graphql", post(execute).get(execute_get))
        // A document is small; its cost is bounded by `limits` too.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_GRAPHQL_BODY))
        .route("/graphql/ws", get(ws::upgrade))
        .with_state(state)
}

/// A request refused before it reaches the schema, answered as GraphQL
/// errors with a code.
fn refusal(status: axum::http::StatusCode, e: crate::service::Error) -> axum::response::Response {
    use axum::response::IntoResponse;
    let error = errors::gql_error(e).into_server_error(async_graphql::Pos::default());
    let response = async_graphql::Response::from_errors(vec![error]);
    (status, axum::Json(response)).into_response()
}

/// `GET /graphql`: with a `query` parameter, runs it (GraphQL over HTTP:
/// queries only, a mutation is 405); without, the playground page.
async fn execute_get(
    State(state): State<GraphqlState>,
    caller: Result<Caller, crate::api::rest::ApiError>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let raw = raw.unwrap_or_default();
    let wants_query = raw
        .split('&')
        .any(|pair| pair == "query" || pair.starts_with("query="));
    if !wants_query {
        return crate::api::playground::page().await;
    }
    let caller = match caller {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let mut request = match async_graphql::http::parse_query_string(&raw) {
        Ok(request) => request,
        Err(e) => {
            return refusal(
                axum::http::StatusCode::BAD_REQUEST,
                crate::service::Error::BadRequest(format!("invalid GraphQL request: {e}")),
            );
        }
    };
    let only_queries = match request.parsed_query() {
        Ok(doc) => doc
            .operations
            .iter()
            .all(|(_, op)| op.node.ty == async_graphql::parser::types::OperationType::Query),
        // Parse errors are answered by the execution below, with a code.
        Err(_) => true,
    };
    if !only_queries {
        let mut response = refusal(
            axum::http::StatusCode::METHOD_NOT_ALLOWED,
            crate::service::Error::BadRequest(
                "GET runs queries only; send mutations and subscriptions with POST".into(),
            ),
        );
        response.headers_mut().insert(
            axum::http::header::ALLOW,
            axum::http::HeaderValue::from_static("POST"),
        );
        return response;
    }
    request.data = request_data(&state.service, caller);
    async_graphql_axum::GraphQLResponse::from(state.schema.execute(request).await).into_response()
}

async fn execute(
    State(state): State<GraphqlState>,
    caller: Caller,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            return refusal(
                rejection.status(),
                crate::service::Error::BadRequest(format!(
                    "the request body was refused: {rejection} (at most {MAX_GRAPHQL_BODY} bytes)"
                )),
            );
        }
    };
    // Parsed here rather than by the stock extractor so that a malformed
    // body is a GraphQL error with a code, not a plain-text 400.
    let mut request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return refusal(
                axum::http::StatusCode::BAD_REQUEST,
                crate::service::Error::BadRequest(format!("invalid GraphQL request body: {e}")),
            );
        }
    };
    request.data = request_data(&state.service, caller);
    async_graphql_axum::GraphQLResponse::from(state.schema.execute(request).await).into_response()
}
