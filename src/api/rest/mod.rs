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
mod terminal;

use std::sync::LazyLock;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{self, RefOr};
use utoipa_axum::router::OpenApiRouter;

use crate::service::{Error, Service};

pub use error::{ApiError, ErrorBody, code_of_status};

/// Where `stacyvm worker` heartbeats; authenticated by the worker token
/// in the handler, not by the API's caller middleware.
pub const WORKER_HEARTBEAT_PATH: &str = "/api/v1/workers/heartbeat";

/// Where the OpenAPI document is served (to anyone: it is the API's shape).
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

/// Every REST route under `/api/v1`, plus the OpenAPI document of exactly
/// these routes at [`OPENAPI_PATH`].
pub fn router(service: Service) -> Router {
    let body_limit = service.config().server.max_body_bytes;
    let (routes, _) = routes().split_for_parts();
    routes
        .merge(terminal::router())
        .layer(DefaultBodyLimit::max(body_limit))
        .route(OPENAPI_PATH, axum::routing::get(document))
        .with_state(service)
}

/// The routes with their operations: what is served and what is
/// documented come from the same `#[utoipa::path]` annotations, so the
/// document cannot drift from the router.
fn routes() -> OpenApiRouter<Service> {
    let v1 = OpenApiRouter::new()
        .merge(sandboxes::router())
        .merge(exec::router())
        .merge(events::router())
        .merge(files::router())
        .merge(templates::router())
        .merge(system::router())
        .merge(quotas::router())
        .merge(admin::router());
    OpenApiRouter::with_openapi(ApiDoc::openapi()).nest("/api/v1", v1)
}

/// The OpenAPI 3.1 document of the REST API.
pub fn openapi() -> openapi::OpenApi {
    let mut doc = routes().into_openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    link_created_resources(&mut doc);
    // Every operation answers its errors in one shape, with the status its
    // code maps to (`status_of`): said once here, as a shared response,
    // rather than on ~45 annotations.
    let error = openapi::ResponseBuilder::new()
        .description(
            "An error: `{\"code\",\"message\"}`; the status follows the code \
             (BAD_REQUEST 400, UNAUTHORIZED 401, FORBIDDEN 403, NOT_FOUND 404, TIMEOUT 408, \
             CONFLICT 409, RESOURCE_LIMIT 429 with Retry-After, INTERNAL_ERROR 500, UNAVAILABLE 503)",
        )
        .content(
            "application/json",
            openapi::ContentBuilder::new()
                .schema(Some(RefOr::Ref(openapi::Ref::from_schema_name("ErrorBody"))))
                .build(),
        )
        .build();
    doc.components
        .get_or_insert_with(Default::default)
        .responses
        .insert(ERROR_RESPONSE.to_string(), RefOr::T(error));
    let statuses: std::collections::BTreeSet<u16> = crate::service::ErrorCode::ALL
        .into_iter()
        .map(|code| error::status_of(code).as_u16())
        .collect();
    for item in doc.paths.paths.values_mut() {
        for operation in operations_mut(item) {
            for status in &statuses {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| {
                        RefOr::Ref(openapi::Ref::from_response_name(ERROR_RESPONSE))
                    });
            }
        }
    }
    doc
}

/// The shared error response's name under `components/responses`.
const ERROR_RESPONSE: &str = "Error";

/// The operations of a path, whatever their method.
fn operations(item: &openapi::PathItem) -> impl Iterator<Item = &openapi::path::Operation> {
    [
        &item.get,
        &item.put,
        &item.post,
        &item.delete,
        &item.options,
        &item.head,
        &item.patch,
        &item.trace,
    ]
    .into_iter()
    .flatten()
}

fn operations_mut(
    item: &mut openapi::PathItem,
) -> impl Iterator<Item = &mut openapi::path::Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
}

/// Links from the operations that create a sandbox or a template to every
/// operation on it (`$response.body#/id`), so a client (and schemathesis'
/// stateful phase) can follow a spawn with an exec on what it made.
fn link_created_resources(doc: &mut openapi::OpenApi) {
    let families = [
        (
            "/api/v1/sandboxes/{id}",
            "id",
            ["spawnSandbox", "spawnFromTemplate"].as_slice(),
        ),
        (
            "/api/v1/templates/{name}",
            "name",
            ["createTemplate"].as_slice(),
        ),
    ];
    for (prefix, parameter, creators) in families {
        let mut targets = Vec::new();
        for (path, item) in &doc.paths.paths {
            if path.starts_with(prefix) {
                targets.extend(operations(item).filter_map(|op| op.operation_id.clone()));
            }
        }
        for item in doc.paths.paths.values_mut() {
            let Some(operation) = item.post.as_mut() else {
                continue;
            };
            if !operation
                .operation_id
                .as_deref()
                .is_some_and(|id| creators.contains(&id))
            {
                continue;
            }
            let Some(RefOr::T(created)) = operation.responses.responses.get_mut("201") else {
                continue;
            };
            for target in &targets {
                let link = openapi::link::LinkBuilder::new()
                    .operation_id(target.clone())
                    .parameter(parameter, format!("$response.body#/{parameter}"))
                    .build();
                created.links.insert(target.clone(), RefOr::T(link));
            }
        }
    }
}

/// The document, rendered once.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| match openapi().to_json() {
    Ok(json) => json,
    Err(e) => {
        tracing::error!(error = %e, "the OpenAPI document does not serialise");
        "{}".to_string()
    }
});

async fn document() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        DOCUMENT.as_str(),
    )
        .into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "StacyVM",
        description = "Disposable, isolated sandboxes for AI agents and code runners: spawn one, \
run commands, stream their output, read and write its files, destroy it. \
Errors answer `{\"code\",\"message\"}`. Authenticate with `X-API-Key` (or \
`X-Admin-API-Key`, or `Authorization: Bearer <JWT>`) unless the server runs open.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(ErrorBody)),
    modifiers(&Security),
    security(("api_key" = []), ("admin_api_key" = []), ("bearer" = [])),
    tags(
        (name = "sandboxes", description = "Spawn, list, inspect, extend and destroy sandboxes"),
        (name = "exec", description = "Run commands, whole or streamed"),
        (name = "files", description = "A sandbox's files"),
        (name = "templates", description = "Named spawn settings and their warm pools"),
        (name = "events", description = "Server-sent events"),
        (name = "quotas", description = "Per-owner limits"),
        (name = "workers", description = "The execution plane"),
        (name = "admin", description = "Audit trail, workers and replicas, for admins"),
        (name = "system", description = "Health, readiness, providers and pools"),
    )
)]
struct ApiDoc;

/// The ways a caller authenticates.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let header = |name: &str| SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(name)));
        components.add_security_scheme("api_key", header("X-API-Key"));
        components.add_security_scheme("admin_api_key", header("X-Admin-API-Key"));
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "worker_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// `{"status": "..."}`: what an action without a resource to answer says.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Status {
    pub status: &'static str,
}

impl Status {
    pub fn new(status: &'static str) -> Status {
        Status { status }
    }
}

/// `DELETE /sandboxes`: how many expired sandboxes were destroyed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Pruned {
    pub pruned: u64,
}

/// Unknown paths answer in StacyVM's error shape.
pub async fn not_found() -> impl IntoResponse {
    ApiError(Error::NotFound("no such route".into()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use utoipa::openapi::RefOr;

    /// Client generators name methods by operation id: each is unique, and
    /// every operation says what it answers on success and, with the
    /// shared error response, on every status an error code maps to.
    #[test]
    fn every_operation_has_its_own_id_a_success_and_the_error_shape() {
        let doc = super::openapi();
        let mut ids = BTreeSet::new();
        let mut count = 0;
        let error = format!("#/components/responses/{}", super::ERROR_RESPONSE);
        for (path, item) in &doc.paths.paths {
            assert!(path.starts_with("/api/v1/"), "{path}");
            for operation in super::operations(item) {
                count += 1;
                let id = operation.operation_id.clone();
                assert!(id.is_some(), "{path}: no operation id");
                assert!(ids.insert(id.clone()), "{path}: operation id {id:?} twice");
                assert!(operation.summary.is_some(), "{path} {id:?}: no summary");
                let responses = &operation.responses.responses;
                assert!(responses.keys().any(|c| c.starts_with('2')), "{path}");
                for code in crate::service::ErrorCode::ALL {
                    let status = super::error::status_of(code).as_u16().to_string();
                    match responses.get(&status) {
                        Some(RefOr::Ref(r)) => assert_eq!(r.ref_location, error, "{path}"),
                        Some(RefOr::T(_)) => panic!("{path} {status}: not the shared one"),
                        None => panic!("{path}: no {status} answer"),
                    }
                }
                assert!(
                    !responses.contains_key("default"),
                    "{path}: any status would do"
                );
            }
        }
        // A route dropped from the router drops out of the document too.
        assert!(count >= 45, "{count} operations");
        let shared = doc.components.as_ref().map(|c| &c.responses);
        assert!(shared.is_some_and(|r| r.contains_key(super::ERROR_RESPONSE)));
    }
}
