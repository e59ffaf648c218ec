//! The GraphQL playground: GraphiQL served by the binary itself.
//!
//! `GET /graphql` and `GET /playground` answer the page (`POST /graphql` is
//! the GraphQL endpoint, routed elsewhere); `GET /playground/assets/{file}`
//! answers the scripts and stylesheets it loads.
//!
//! Why it is built this way:
//! - **No internet needed.** Sandboxes often run on machines without outside
//!   access, and a playground that loads GraphiQL from a CDN is a blank page
//!   there (and leaks usage to a third party). The browser builds of GraphiQL,
//!   React and the `graphql-ws` client are vendored from npm into
//!   `playground/assets/` (pinned versions and the rebuild steps are in
//!   `playground/README.md`), and the page names no other host.
//! - **Embedded at build time.** Every file is `include_bytes!`-ed, so the
//!   binary serves the page from any working directory and a release is one
//!   file.
//! - **Cacheable without going stale.** Asset names carry no content hash, so
//!   the page asks for them as `...?v=<hash of all assets>`: the assets can be
//!   cached for a year (`immutable`), and a binary with other assets changes
//!   the query string. The page itself is `no-cache`.
//! - **Subscriptions** go over the WebSocket endpoint `/graphql/ws` of the
//!   page's own origin (`ws:` or `wss:` to match), protocol
//!   `graphql-transport-ws`; that is configured in `assets/playground.js`.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One embedded file under `/playground/assets/`.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file the page may load. Vendored ones come from npm (see
/// `playground/vendor.mjs`); `playground.js` and `playground.css` are ours.
const ASSETS: &[Asset] = &[
    Asset {
        name: "react.production.min.js",
        content_type: JS,
        body: include_bytes!("../../playground/assets/react.production.min.js"),
    },
    Asset {
        name: "react-dom.production.min.js",
        content_type: JS,
        body: include_bytes!("../../playground/assets/react-dom.production.min.js"),
    },
    Asset {
        name: "graphql-ws.min.js",
        content_type: JS,
        body: include_bytes!("../../playground/assets/graphql-ws.min.js"),
    },
    Asset {
        name: "graphiql.min.js",
        content_type: JS,
        body: include_bytes!("../../playground/assets/graphiql.min.js"),
    },
    Asset {
        name: "graphiql.min.css",
        content_type: CSS,
        body: include_bytes!("../../playground/assets/graphiql.min.css"),
    },
    Asset {
        name: "playground.js",
        content_type: JS,
        body: include_bytes!("../../playground/assets/playground.js"),
    },
    Asset {
        name: "playground.css",
        content_type: CSS,
        body: include_bytes!("../../playground/assets/playground.css"),
    },
    Asset {
        name: "dashboard.js",
        content_type: JS,
        body: include_bytes!("../../playground/assets/dashboard.js"),
    },
    Asset {
        name: "dashboard.css",
        content_type: CSS,
        body: include_bytes!("../../playground/assets/dashboard.css"),
    },
    Asset {
        name: "swagger-ui-bundle.js",
        content_type: JS,
        body: include_bytes!("../../playground/assets/swagger-ui-bundle.js"),
    },
    Asset {
        name: "swagger-ui.css",
        content_type: CSS,
        body: include_bytes!("../../playground/assets/swagger-ui.css"),
    },
    Asset {
        name: "docs.js",
        content_type: JS,
        body: include_bytes!("../../playground/assets/docs.js"),
    },
];

/// The page as committed; asset URLs carry the placeholder [`VERSION_MARK`].
const TEMPLATE: &str = include_str!("../../playground/index.html");
const VERSION_MARK: &str = "__ASSET_VERSION__";

/// Where the assets are served; the page refers to them by this prefix.
pub const ASSETS_PREFIX: &str = "/playground/assets/";

/// Assets are immutable for a given `?v=`: cache them for a year.
const ASSET_CACHE: &str = "public, max-age=31536000, immutable";

/// The page, with every asset URL versioned by a hash of all assets.
static PAGE: LazyLock<String> =
    LazyLock::new(|| TEMPLATE.replace(VERSION_MARK, &format!("{:016x}", assets_hash())));

/// The dashboard (`/dashboard`): sandboxes live, a terminal view of a
/// command, files, workers and audit events, over the same API.
const DASHBOARD_TEMPLATE: &str = include_str!("../../playground/dashboard.html");
static DASHBOARD: LazyLock<String> =
    LazyLock::new(|| DASHBOARD_TEMPLATE.replace(VERSION_MARK, &format!("{:016x}", assets_hash())));

/// The REST API's reference (`/api/v1/docs`): Swagger UI over the OpenAPI
/// document.
pub const DOCS_PATH: &str = "/api/v1/docs";
const DOCS_TEMPLATE: &str = include_str!("../../playground/docs.html");
static DOCS: LazyLock<String> =
    LazyLock::new(|| DOCS_TEMPLATE.replace(VERSION_MARK, &format!("{:016x}", assets_hash())));

/// FNV-1a over every asset's name and bytes: changes whenever any asset does.
fn assets_hash() -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for asset in ASSETS {
        for &byte in asset.name.as_bytes().iter().chain(b"\0").chain(asset.body) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// The playground routes: `GET /playground` (the page) and
/// `GET /playground/assets/{file}`. Generic over the state so it merges into
/// any router; it holds no state of its own. `GET /graphql` serves the
/// page too, from the GraphQL router (which runs a query given there).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/playground", get(page))
        .route("/dashboard", get(dashboard))
        .route(DOCS_PATH, get(docs))
        .route("/playground/assets/{file}", get(asset))
}

/// The playground page (also usable as a handler on its own, e.g.
/// `get(playground::page).post_service(graphql)`).
pub async fn page() -> Response {
    html(PAGE.as_str())
}

/// The dashboard page.
pub async fn dashboard() -> Response {
    html(DASHBOARD.as_str())
}

/// The API reference page.
pub async fn docs() -> Response {
    html(DOCS.as_str())
}

/// A page of ours with the headers every one carries.
fn html(page: &'static str) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            // Enforced in the browser as well: the page may talk to its own
            // origin only (scripts, styles, fetch and the WebSocket); fonts
            // are inlined as data: URLs in GraphiQL's stylesheet.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                     font-src 'self' data:; img-src 'self' data:; connect-src 'self'; \
                     base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                ),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        page,
    )
        .into_response()
}

/// One embedded asset, or the API's usual 404 for an unknown name.
async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == file) {
        Some(asset) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(asset.content_type),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static(ASSET_CACHE)),
                (
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                ),
            ],
            asset.body,
        )
            .into_response(),
        None => super::rest::not_found().await.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body, to_bytes};
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    async fn get(path: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let response = router::<()>()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, headers, body.to_vec())
    }

    fn header(headers: &axum::http::HeaderMap, name: header::HeaderName) -> &str {
        headers
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Every `src="..."`/`href="..."` value of the page.
    fn references(html: &str) -> Vec<String> {
        let mut out = Vec::new();
        for attr in ["src=\"", "href=\""] {
            let mut rest = html;
            while let Some(at) = rest.find(attr) {
                rest = &rest[at + attr.len()..];
                let end = rest.find('"').expect("unterminated attribute");
                out.push(rest[..end].to_string());
                rest = &rest[end..];
            }
        }
        out
    }

    #[tokio::test]
    async fn the_dashboard_names_no_other_host() {
        let (status, headers, body) = get("/dashboard").await;
        assert_eq!(status, StatusCode::OK);
        assert!(header(&headers, header::CONTENT_SECURITY_POLICY).contains("default-src 'self'"));
        let html = String::from_utf8(body).unwrap();
        assert!(html.contains("id=\"sandboxes\""), "{html}");
        let lower = html.to_ascii_lowercase();
        assert!(
            !lower.contains("http://") && !lower.contains("https://"),
            "{html}"
        );
        assert!(!html.contains(VERSION_MARK), "placeholder left in the page");
    }

    #[tokio::test]
    async fn the_api_reference_names_no_other_host() {
        let (status, headers, body) = get(DOCS_PATH).await;
        assert_eq!(status, StatusCode::OK);
        assert!(header(&headers, header::CONTENT_SECURITY_POLICY).contains("default-src 'self'"));
        let html = String::from_utf8(body).unwrap();
        assert!(html.contains("id=\"swagger-ui\""), "{html}");
        let lower = html.to_ascii_lowercase();
        assert!(
            !lower.contains("http://") && !lower.contains("https://"),
            "{html}"
        );
        assert!(!html.contains(VERSION_MARK), "placeholder left in the page");
        // Swagger UI would send the document to validator.swagger.io.
        let (_, _, script) = get(&format!("{ASSETS_PREFIX}docs.js")).await;
        let script = String::from_utf8(script).unwrap();
        assert!(script.contains("validatorUrl: null"), "{script}");
    }

    #[tokio::test]
    async fn the_page_names_no_other_host() {
        let (status, headers, body) = get("/playground").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            header(&headers, header::CONTENT_TYPE),
            "text/html; charset=utf-8"
        );
        assert_eq!(header(&headers, header::CACHE_CONTROL), "no-cache");
        assert!(header(&headers, header::CONTENT_SECURITY_POLICY).contains("default-src 'self'"));
        let html = String::from_utf8(body).unwrap();
        assert!(html.contains("<div id=\"graphiql\">"), "{html}");
        let lower = html.to_ascii_lowercase();
        assert!(
            !lower.contains("http://") && !lower.contains("https://"),
            "{html}"
        );
        assert!(
            !lower.contains("//cdn") && !lower.contains("src=\"//"),
            "{html}"
        );
        assert!(!html.contains(VERSION_MARK), "placeholder left in the page");

        let (status, _, other) = get("/playground").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(other, html.as_bytes());
    }

    #[tokio::test]
    async fn every_referenced_asset_is_served_with_its_type_and_cache_headers() {
        let mut refs: Vec<String> = Vec::new();
        for page in ["/playground", "/dashboard", DOCS_PATH] {
            let (_, _, body) = get(page).await;
            let html = String::from_utf8(body).unwrap();
            for r in references(&html) {
                if !r.starts_with("data:") && !refs.contains(&r) {
                    refs.push(r);
                }
            }
        }
        // The five vendored files plus ours, each used by a page.
        assert_eq!(refs.len(), ASSETS.len(), "{refs:?}");
        let version = format!("?v={:016x}", assets_hash());
        for url in &refs {
            assert!(url.starts_with(ASSETS_PREFIX), "{url} is not a local asset");
            assert!(url.ends_with(&version), "{url} is not versioned");
            let (status, headers, body) = get(url).await;
            assert_eq!(status, StatusCode::OK, "{url}");
            let expected = if url.contains(".css?") {
                "text/css; charset=utf-8"
            } else if url.contains(".js?") {
                "text/javascript; charset=utf-8"
            } else {
                panic!("unexpected asset kind: {url}")
            };
            assert_eq!(header(&headers, header::CONTENT_TYPE), expected, "{url}");
            assert_eq!(
                header(&headers, header::CACHE_CONTROL),
                ASSET_CACHE,
                "{url}"
            );
            assert_eq!(header(&headers, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
            let name = &url[ASSETS_PREFIX.len()..url.find('?').unwrap()];
            let embedded = ASSETS.iter().find(|a| a.name == name).unwrap();
            assert_eq!(body, embedded.body, "{url}");
            assert!(body.len() > 100, "{url} is suspiciously small");
        }
        // And nothing embedded that the page never loads.
        for asset in ASSETS {
            assert!(
                refs.iter()
                    .any(|r| r.starts_with(&format!("{ASSETS_PREFIX}{}?", asset.name))),
                "{} is embedded but not referenced",
                asset.name
            );
        }
    }

    #[tokio::test]
    async fn unknown_assets_are_404() {
        for path in [
            "/playground/assets/nope.js",
            "/playground/assets/..%2FCargo.toml",
            "/playground/assets/index.html",
        ] {
            let (status, _, _) = get(path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        }
    }
}
