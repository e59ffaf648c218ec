//! The MCP server: the tools an agent needs (create a sandbox, run a
//! command, write, read and list files, list and destroy sandboxes),
//! served over streamable HTTP at `/mcp` by the server itself and over
//! stdio by `stacyvm mcp` (a client of a server's REST API). The tools are
//! written once, over a [`Backend`]: in the server it is the service layer
//! with the request's caller (the same identity, quotas and rules as
//! REST); in `stacyvm mcp` it is the REST API.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::schemars::JsonSchema;
use rmcp::{ServerHandler, tool, tool_handler, tool_router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::service::{ExecRequest, FileWrite, Service, SpawnRequest};

/// A tool call that failed: `CODE: message`, shown to the agent.
pub type ToolError = String;

/// Where the tools' calls go.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    async fn create(&self, who: Option<&Caller>, args: CreateSandbox) -> Result<Value, ToolError>;
    async fn list(&self, who: Option<&Caller>) -> Result<Value, ToolError>;
    async fn run(&self, who: Option<&Caller>, args: RunCommand) -> Result<Value, ToolError>;
    async fn write(
        &self,
        who: Option<&Caller>,
        id: &str,
        path: &str,
        content: Vec<u8>,
    ) -> Result<(), ToolError>;
    async fn read(&self, who: Option<&Caller>, id: &str, path: &str) -> Result<Vec<u8>, ToolError>;
    async fn list_files(
        &self,
        who: Option<&Caller>,
        id: &str,
        path: &str,
    ) -> Result<Value, ToolError>;
    async fn destroy(&self, who: Option<&Caller>, id: &str) -> Result<(), ToolError>;
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct CreateSandbox {
    /// The image, e.g. alpine:latest (default: the server's).
    pub image: Option<String>,
    /// docker, native, proot, ... (default: the server's).
    pub provider: Option<String>,
    /// A template to spawn from.
    pub template: Option<String>,
    /// Time to live, a Go duration such as 30m.
    pub ttl: Option<String>,
    /// Labels kept with the sandbox.
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct RunCommand {
    pub sandbox_id: String,
    /// Shell text run by `sh -c` (pipes, redirections, variables).
    pub command: String,
    /// The working directory (absolute).
    pub workdir: Option<String>,
    /// Environment variables.
    pub env: Option<BTreeMap<String, String>>,
    /// Kill the command after this long, a Go duration such as 30s.
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SandboxId {
    pub sandbox_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct FilePath {
    pub sandbox_id: String,
    /// An absolute path in the sandbox.
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct WriteFile {
    pub sandbox_id: String,
    /// An absolute path in the sandbox; parents are created.
    pub path: String,
    pub content: String,
    /// utf-8 (the default) or base64 (for binary content).
    pub encoding: Option<String>,
}

/// The MCP server over one backend.
#[derive(Clone)]
pub struct Tools {
    backend: Arc<dyn Backend>,
    tool_router: ToolRouter<Tools>,
}

fn ok_json(value: Value) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(
        serde_json::to_string_pretty(&value).unwrap_or_default(),
    )])
}

fn failed(message: ToolError) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message)])
}

fn answer(result: Result<Value, ToolError>) -> CallToolResult {
    result.map_or_else(failed, ok_json)
}

/// The caller the server's authentication gave this HTTP request (none
/// over stdio, where the REST API authenticates each call).
fn who(ctx: &Ctx) -> Option<Caller> {
    ctx.extensions
        .get::<axum::http::request::Parts>()
        .and_then(|p| p.extensions.get::<Caller>().cloned())
}

type Ctx = rmcp::service::RequestContext<rmcp::RoleServer>;

#[tool_router]
impl Tools {
    pub fn new(backend: Arc<dyn Backend>) -> Tools {
        Tools {
            backend,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "Create a sandbox (an isolated Linux machine) and return it; its id is what the other tools take."
    )]
    async fn create_sandbox(
        &self,
        ctx: Ctx,
        Parameters(args): Parameters<CreateSandbox>,
    ) -> CallToolResult {
        answer(self.backend.create(who(&ctx).as_ref(), args).await)
    }

    #[tool(description = "List your sandboxes that are not destroyed.")]
    async fn list_sandboxes(&self, ctx: Ctx) -> CallToolResult {
        answer(self.backend.list(who(&ctx).as_ref()).await)
    }

    #[tool(
        description = "Run a shell command in a sandbox and return its exit code, stdout and stderr. A non-zero exit code is an answer, not an error."
    )]
    async fn run_command(
        &self,
        ctx: Ctx,
        Parameters(args): Parameters<RunCommand>,
    ) -> CallToolResult {
        answer(self.backend.run(who(&ctx).as_ref(), args).await)
    }

    #[tool(description = "Write a file in a sandbox (text, or base64 with encoding=base64).")]
    async fn write_file(
        &self,
        ctx: Ctx,
        Parameters(args): Parameters<WriteFile>,
    ) -> CallToolResult {
        // The files API's one rule for content encodings.
        let decoded =
            crate::service::ContentEncoding::parse(args.encoding.as_deref().unwrap_or_default())
                .and_then(|encoding| encoding.decode(args.content));
        let content = match decoded {
            Ok(bytes) => bytes.to_vec(),
            Err(e) => return failed(tool_error(e)),
        };
        let size = content.len();
        match self
            .backend
            .write(who(&ctx).as_ref(), &args.sandbox_id, &args.path, content)
            .await
        {
            Ok(()) => ok_json(json!({ "written": args.path, "bytes": size })),
            Err(e) => failed(e),
        }
    }

    #[tool(
        description = "Read a file of a sandbox: its text, or base64 when it is not UTF-8 (the answer says which)."
    )]
    async fn read_file(&self, ctx: Ctx, Parameters(args): Parameters<FilePath>) -> CallToolResult {
        match self
            .backend
            .read(who(&ctx).as_ref(), &args.sandbox_id, &args.path)
            .await
        {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => {
                    ok_json(json!({ "path": args.path, "encoding": "utf-8", "content": text }))
                }
                Err(e) => ok_json(json!({
                    "path": args.path,
                    "encoding": "base64",
                    "content": base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
                })),
            },
            Err(e) => failed(e),
        }
    }

    #[tool(
        description = "List a directory of a sandbox: name, size, mode, is_dir, mod_time of each entry."
    )]
    async fn list_files(&self, ctx: Ctx, Parameters(args): Parameters<FilePath>) -> CallToolResult {
        answer(
            self.backend
                .list_files(who(&ctx).as_ref(), &args.sandbox_id, &args.path)
                .await,
        )
    }

    #[tool(description = "Destroy a sandbox and everything in it.")]
    async fn destroy_sandbox(
        &self,
        ctx: Ctx,
        Parameters(args): Parameters<SandboxId>,
    ) -> CallToolResult {
        match self
            .backend
            .destroy(who(&ctx).as_ref(), &args.sandbox_id)
            .await
        {
            Ok(()) => ok_json(json!({ "destroyed": args.sandbox_id })),
            Err(e) => failed(e),
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("stacyvm", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Disposable, isolated sandboxes: create one, run commands and use files in it, destroy it.",
            )
    }
}

/// The service layer as a backend, with the caller of each HTTP request.
pub struct InProcess(pub Service);

fn tool_error(e: crate::service::Error) -> ToolError {
    format!("{}: {e}", e.code().as_str())
}

fn caller(who: Option<&Caller>) -> Result<&Caller, ToolError> {
    who.ok_or_else(|| "UNAUTHORIZED: authentication required".to_string())
}

#[async_trait::async_trait]
impl Backend for InProcess {
    async fn create(&self, who: Option<&Caller>, args: CreateSandbox) -> Result<Value, ToolError> {
        let req = SpawnRequest {
            image: args.image,
            provider: args.provider,
            template: args.template,
            ttl: args.ttl,
            metadata: args.metadata.unwrap_or_default(),
            ..Default::default()
        };
        let sandbox = self.0.spawn(caller(who)?, req).await.map_err(tool_error)?;
        Ok(serde_json::to_value(sandbox).unwrap_or_default())
    }

    async fn list(&self, who: Option<&Caller>) -> Result<Value, ToolError> {
        let all = self
            .0
            .list_sandboxes(caller(who)?)
            .await
            .map_err(tool_error)?;
        Ok(serde_json::to_value(all).unwrap_or_default())
    }

    async fn run(&self, who: Option<&Caller>, args: RunCommand) -> Result<Value, ToolError> {
        let req = ExecRequest {
            command: args.command,
            mode: Some("shell".into()),
            env: args.env.unwrap_or_default(),
            workdir: args.workdir,
            timeout: args.timeout,
            ..Default::default()
        };
        let done = self
            .0
            .exec(caller(who)?, &args.sandbox_id, req)
            .await
            .map_err(tool_error)?;
        Ok(json!({
            "exit_code": done.result.exit_code,
            "timed_out": done.result.timed_out,
            "stdout": done.stdout,
            "stderr": done.stderr,
            "truncated": done.truncated,
            "duration": crate::duration::format(done.result.duration),
        }))
    }

    async fn write(
        &self,
        who: Option<&Caller>,
        id: &str,
        path: &str,
        content: Vec<u8>,
    ) -> Result<(), ToolError> {
        let write = FileWrite {
            path: path.to_string(),
            content: content.into(),
            mode: None,
        };
        self.0
            .write_file(caller(who)?, id, write)
            .await
            .map_err(tool_error)
    }

    async fn read(&self, who: Option<&Caller>, id: &str, path: &str) -> Result<Vec<u8>, ToolError> {
        let bytes = self
            .0
            .read_file(caller(who)?, id, path)
            .await
            .map_err(tool_error)?;
        Ok(bytes.to_vec())
    }

    async fn list_files(
        &self,
        who: Option<&Caller>,
        id: &str,
        path: &str,
    ) -> Result<Value, ToolError> {
        let entries = self
            .0
            .list_files(caller(who)?, id, path)
            .await
            .map_err(tool_error)?;
        Ok(serde_json::to_value(entries).unwrap_or_default())
    }

    async fn destroy(&self, who: Option<&Caller>, id: &str) -> Result<(), ToolError> {
        self.0
            .destroy_sandbox(caller(who)?, id)
            .await
            .map_err(tool_error)
    }
}

/// `/mcp`: the MCP streamable HTTP transport, for authenticated callers.
pub fn router(service: Service) -> axum::Router {
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    };
    let backend: Arc<dyn Backend> = Arc::new(InProcess(service.clone()));
    // Stateless: no session is kept between requests (nothing to bound or
    // to expire, and any replica answers any request). Host headers must
    // be loopback names (rmcp's DNS-rebinding guard) or ones the operator
    // names in `server.allowed_hosts`.
    let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    hosts.extend(service.config().server.allowed_hosts.iter().cloned());
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_max_request_body_bytes(service.config().server.max_body_bytes);
    let mcp = StreamableHttpService::new(
        move || Ok(Tools::new(backend.clone())),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    axum::Router::new()
        .nest_service("/mcp", mcp)
        .layer(axum::middleware::from_fn(require_caller))
}

/// Refuses `/mcp` to a request the server's authentication gave no caller.
async fn require_caller(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if req.extensions().get::<Caller>().is_some() {
        return next.run(req).await;
    }
    let message = req
        .extensions()
        .get::<crate::api::caller::AuthFailure>()
        .map_or_else(
            || "authentication required".to_string(),
            |f| f.0.to_string(),
        );
    crate::api::rest::ApiError(crate::service::Error::Unauthorized(message)).into_response()
}
