//! `stacyvm mcp`: the MCP tools over stdio, each call a REST call to a
//! running server with the user's key (so the server's identity, quotas
//! and rules apply as they do to every client).

use std::time::Duration;

use base64::Engine;
use reqwest::Method;
use serde_json::{Value, json};

use super::{CliError, Target};
use crate::api::mcp::{Backend, CreateSandbox, RunCommand, ToolError};
use crate::auth::Caller;

/// The REST API as the tools' backend.
pub struct Rest(pub Target);

fn tool_error(e: CliError) -> ToolError {
    match e {
        CliError::Refused {
            status,
            code,
            message,
        } => {
            let code = if code.is_empty() {
                crate::api::rest::code_of_status(status)
                    .unwrap_or(crate::service::ErrorCode::Internal)
                    .as_str()
            } else {
                code.as_str()
            };
            format!("{code}: {message}")
        }
        other => format!("UNAVAILABLE: {other}"),
    }
}

fn sandbox(id: &str) -> Result<String, ToolError> {
    super::sandbox_path(id).map_err(|e| format!("BAD_REQUEST: {e}"))
}

const LONG: Duration = Duration::from_secs(24 * 3600);

#[async_trait::async_trait]
impl Backend for Rest {
    async fn create(&self, _who: Option<&Caller>, args: CreateSandbox) -> Result<Value, ToolError> {
        let body = super::SpawnBody {
            image: args.image,
            template: args.template,
            provider: args.provider,
            ttl: args.ttl,
            metadata: args.metadata.unwrap_or_default(),
            ..Default::default()
        };
        self.0
            .send_json(
                Method::POST,
                "/sandboxes",
                Some(body.to_json()),
                Duration::from_secs(600),
            )
            .await
            .map_err(tool_error)
    }

    async fn list(&self, _who: Option<&Caller>) -> Result<Value, ToolError> {
        self.0
            .send(Method::GET, "/sandboxes")
            .await
            .map_err(tool_error)
    }

    async fn run(&self, _who: Option<&Caller>, args: RunCommand) -> Result<Value, ToolError> {
        let mut body = json!({ "command": args.command, "mode": "shell" });
        if let Some(env) = args.env {
            body["env"] = serde_json::to_value(env).unwrap_or_default();
        }
        if let Some(dir) = args.workdir {
            body["workdir"] = Value::String(dir);
        }
        if let Some(t) = args.timeout {
            body["timeout"] = Value::String(t);
        }
        let path = format!("{}/exec", sandbox(&args.sandbox_id)?);
        let done = self
            .0
            .send_json(Method::POST, &path, Some(body), LONG)
            .await
            .map_err(tool_error)?;
        Ok(json!({
            "exit_code": done["exit_code"],
            "timed_out": done["timed_out"],
            "stdout": done["stdout"],
            "stderr": done["stderr"],
            "truncated": done["truncated"],
            "duration": done["duration"],
        }))
    }

    async fn write(
        &self,
        _who: Option<&Caller>,
        id: &str,
        path: &str,
        content: Vec<u8>,
    ) -> Result<(), ToolError> {
        let body = json!({
            "path": path,
            "content": base64::engine::general_purpose::STANDARD.encode(content),
            "encoding": "base64",
        });
        let files = format!("{}/files", sandbox(id)?);
        self.0
            .send_json(Method::POST, &files, Some(body), Duration::from_secs(300))
            .await
            .map(drop)
            .map_err(tool_error)
    }

    async fn read(
        &self,
        _who: Option<&Caller>,
        id: &str,
        path: &str,
    ) -> Result<Vec<u8>, ToolError> {
        sandbox(id)?;
        self.0
            .read_file(id, path)
            .await
            .map(|b| b.to_vec())
            .map_err(tool_error)
    }

    async fn list_files(
        &self,
        _who: Option<&Caller>,
        id: &str,
        path: &str,
    ) -> Result<Value, ToolError> {
        sandbox(id)?;
        let query = super::files_path(id, "/list", path).map_err(tool_error)?;
        self.0.send(Method::GET, &query).await.map_err(tool_error)
    }

    async fn destroy(&self, _who: Option<&Caller>, id: &str) -> Result<(), ToolError> {
        self.0
            .send(Method::DELETE, &sandbox(id)?)
            .await
            .map(drop)
            .map_err(tool_error)
    }
}

/// Serves the tools on stdin/stdout until the client closes them.
pub async fn serve_stdio(target: Target) -> Result<(), CliError> {
    use rmcp::ServiceExt;
    let tools = crate::api::mcp::Tools::new(std::sync::Arc::new(Rest(target)));
    let running = tools
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| CliError::Other(format!("MCP handshake failed: {e}")))?;
    running
        .waiting()
        .await
        .map_err(|e| CliError::Other(format!("MCP session ended: {e}")))?;
    Ok(())
}
