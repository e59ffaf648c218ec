//! Custom providers: a runtime someone else runs, behind StacyVM's HTTP
//! provider contract (v1, [`contract`]), one per `providers.custom.<name>`
//! (`{url, api_key}`), spawned on as `<name>`.
//!
//! The contract, relative to the provider's `url`, every call with
//! `Authorization: Bearer <api_key>` when a key is set:
//!
//! | call | answer |
//! |---|---|
//! | `GET /health` | 2xx `{"status", "capabilities"?, "isolation"?}` |
//! | `GET /images/available?image=` | `{"available"}` (404: every image is tried at spawn) |
//! | `POST /spawn` `{sandbox_id, image, memory_mb, vcpus, disk_mb}` | `{"id"}` |
//! | `GET /status/{id}` | `{"status": "running"\|..., "reason"?}` |
//! | `GET /sandboxes` | `[{"id", "sandbox_id", "status", "reason"?, "created_at"?}]` (404: none listed) |
//! | `DELETE /sandboxes/{id}` | 2xx (404, 410: already gone) |
//! | `POST /exec` `{id, argv, env, workdir, timeout_ms, stream}` | NDJSON `{"stream","data"}` or `{"stream","data_base64"}`, last `{"type":"exit","exit_code","timed_out"}`; or whole `{"exit_code","stdout","stderr","timed_out"}` |
//! | `POST /files` `{id, path, content_base64 \| content, mode}` | 2xx |
//! | `GET /files?id=&path=` | the bytes |
//! | `DELETE /files?id=&path=&recursive=` | 2xx |
//! | `GET /files/list?id=&path=`, `/files/stat`, `/files/glob?id=&pattern=` | entries, one entry, paths |
//! | `POST /files/move` `{id, old_path, new_path}`, `/files/chmod` `{id, path, mode}` | 2xx |
//! | `GET /logs/{id}?lines=` | `["line", ...]` (404: none) |
//! | `GET /stats/{id}` | `{"supported", "cpu_pct", "mem_bytes", "mem_limit_bytes", "pids"?}` (404: unsupported) |
//!
//! Refusals are `{"code","message"}`: 400 bad request, 404 not found
//! (`FILE_NOT_FOUND` for a path, `IMAGE_NOT_FOUND` on spawn), 408 timeout,
//! 409 conflict, 410 destroyed, 429 at capacity, 503 unavailable.
//! Compared with the original server's contract: file content is
//! binary-safe (base64), a streamed exec ends with its exit frame, and
//! `/health` says what the provider can do.
//!
//! [`server`] serves the contract over any of StacyVM's own providers
//! (`stacyvm custom-provider`): the reference implementation the tests
//! run this client against, in its own process.

pub mod contract;
pub mod server;

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    Capability, ExecExit, ExecSpec, FileEntry, InventoryItem, OutputChunk, OutputSink, Provider,
    ProviderError, ProviderResult, RuntimeHandle, RuntimeStats, RuntimeStatus, SpawnSpec,
    StreamKind, read_capped,
};
use contract::codes;

/// How long a call other than exec and spawn may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a spawn may take (an image pull on the provider's side).
const SPAWN_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest JSON answer read (a file's bytes are capped apart).
const MAX_ANSWER_BYTES: usize = 16 << 20;
/// The largest refusal body read.
const MAX_REFUSAL_BYTES: usize = 64 << 10;
/// How long past its timeout an exec's answer is waited for.
const EXEC_GRACE: Duration = Duration::from_secs(30);
/// The longest NDJSON line read from a streamed exec.
const MAX_FRAME_BYTES: usize = 4 << 20;

/// The capabilities assumed of a provider whose `/health` does not say.
const ASSUMED: [Capability; 4] = [
    Capability::Exec,
    Capability::ExecStream,
    Capability::Files,
    Capability::Logs,
];

/// One custom provider.
pub struct CustomProvider {
    name: &'static str,
    base: String,
    api_key: Option<String>,
    http: reqwest::Client,
    /// What its `/health` said it can do, once it said.
    capabilities: std::sync::Mutex<Option<Vec<Capability>>>,
}

impl CustomProvider {
    /// `name` lives as long as the process (providers are made once, from
    /// the configuration). `url` is `http(s)://host[:port][/prefix]`.
    pub fn new(name: &str, url: &str, api_key: &str) -> Result<CustomProvider, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
        if parsed.scheme() == "https" {
            return Err(format!(
                "url {url:?}: https is not supported yet (this build has no TLS client); \
                 reach the provider over a private network or a local TLS proxy"
            ));
        }
        if parsed.scheme() != "http" || parsed.host_str().is_none() {
            return Err(format!("url {url:?} must be http://host[:port]"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() || !parsed.username().is_empty()
        {
            return Err(format!("url {url:?} may carry no user, query or fragment"));
        }
        // No redirects: a provider cannot send a call (and its body) on to
        // another address.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(CustomProvider {
            name: Box::leak(name.to_string().into_boxed_str()),
            base: url.trim_end_matches('/').to_string(),
            api_key: (!api_key.is_empty()).then(|| api_key.to_string()),
            http,
            capabilities: std::sync::Mutex::new(None),
        })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(CALL_TIMEOUT);
        match &self.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> ProviderError {
        ProviderError::Unavailable(format!("custom provider {} unreachable: {e}", self.name))
    }

    /// Sends `req`; a refusal becomes the provider error its status and
    /// code say (`file`: a 404 is about a path).
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        file: bool,
    ) -> ProviderResult<reqwest::Response> {
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let refusal = self.refusal(resp).await;
        Err(self.refused(status, refusal, file))
    }

    /// A refusal's `{"code","message"}`, or its text as the message.
    async fn refusal(&self, resp: reqwest::Response) -> contract::Refusal {
        let body = read_capped(resp, MAX_REFUSAL_BYTES, &self.who())
            .await
            .unwrap_or_default();
        serde_json::from_slice(&body).unwrap_or_else(|_| contract::Refusal {
            code: String::new(),
            message: String::from_utf8_lossy(&body).chars().take(300).collect(),
        })
    }

    fn who(&self) -> String {
        format!("custom provider {}", self.name)
    }

    /// The one mapping from a refusal to a provider error. A sandbox is
    /// gone only when the provider says so (410, or 404 `NOT_FOUND`): a 404
    /// without a code (a wrong URL, a proxy) must never make the reconciler
    /// fail sandboxes. On file calls it is a missing path, as the original
    /// contract answers one.
    fn refused(&self, status: StatusCode, r: contract::Refusal, file: bool) -> ProviderError {
        let message = if r.message.is_empty() {
            format!("{} answered {status}", self.who())
        } else {
            r.message
        };
        match (status.as_u16(), r.code.as_str()) {
            (400, _) => ProviderError::InvalidRequest(message),
            (404, codes::FILE_NOT_FOUND) => ProviderError::FileNotFound(message),
            (404, codes::NOT_FOUND) | (410, _) => ProviderError::RuntimeNotFound(message),
            (404, "") if file => ProviderError::FileNotFound(message),
            (404, _) => ProviderError::Runtime(format!(
                "{} answered 404 without saying what is missing (is its url right?): {message}",
                self.who()
            )),
            (409, _) => ProviderError::Conflict(message),
            (429 | 503, _) => ProviderError::Unavailable(message),
            _ => ProviderError::Runtime(message),
        }
    }

    /// Whether a refusal says the endpoint is not offered (an optional
    /// part of the contract): 404 without a code, 405, 501.
    fn not_offered(status: StatusCode, r: &contract::Refusal) -> bool {
        matches!(status.as_u16(), 405 | 501)
            || (status == StatusCode::NOT_FOUND && r.code.is_empty())
    }

    async fn json<T: DeserializeOwned>(&self, resp: reqwest::Response) -> ProviderResult<T> {
        let body = read_capped(resp, MAX_ANSWER_BYTES, &self.who()).await?;
        serde_json::from_slice(&body)
            .map_err(|e| ProviderError::Runtime(format!("{} answered badly: {e}", self.who())))
    }

    /// A GET of an optional part of the contract: `None` when not offered.
    async fn get_optional<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> ProviderResult<Option<T>> {
        let resp = self
            .request(Method::GET, path)
            .query(query)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            return self.json(resp).await.map(Some);
        }
        let status = resp.status();
        let refusal = self.refusal(resp).await;
        if Self::not_offered(status, &refusal) {
            return Ok(None);
        }
        Err(self.refused(status, refusal, false))
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
        file: bool,
    ) -> ProviderResult<T> {
        let resp = self
            .send(self.request(Method::GET, path).query(query), file)
            .await?;
        self.json(resp).await
    }

    async fn post(
        &self,
        path: &str,
        body: &impl Serialize,
        file: bool,
    ) -> ProviderResult<reqwest::Response> {
        self.send(self.request(Method::POST, path).json(body), file)
            .await
    }

    /// A path segment: runtime ids are the provider's, so they are encoded.
    fn segment(id: &str) -> String {
        percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
    }
}

fn mode_text(mode: u32) -> String {
    format!("{mode:o}")
}

#[async_trait]
impl Provider for CustomProvider {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capabilities(&self) -> Vec<Capability> {
        let said = self.capabilities.lock().unwrap_or_else(|e| e.into_inner());
        said.clone().unwrap_or_else(|| ASSUMED.to_vec())
    }

    fn isolation(&self) -> &'static str {
        "whatever the custom provider's runtime gives (outside StacyVM's control)"
    }

    async fn health(&self) -> ProviderResult<()> {
        let health: contract::Health = self.get("/health", &[], false).await?;
        if let Some(said) = health.capabilities {
            // Names this version does not know are skipped, not an error.
            let known = said
                .into_iter()
                .filter_map(|c| serde_json::from_value::<Capability>(c).ok())
                .collect();
            *self.capabilities.lock().unwrap_or_else(|e| e.into_inner()) = Some(known);
        }
        Ok(())
    }

    async fn image_available(&self, image: &str) -> ProviderResult<bool> {
        // Not offered: the spawn will say.
        Ok(self
            .get_optional::<contract::ImageAvailable>("/images/available", &[("image", image)])
            .await?
            .is_none_or(|answer| answer.available))
    }

    async fn spawn(&self, spec: &SpawnSpec) -> ProviderResult<RuntimeHandle> {
        let body = contract::Spawn {
            sandbox_id: spec.sandbox_id.clone(),
            image: spec.image.clone(),
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
            disk_mb: spec.disk_mb,
        };
        let resp = self
            .request(Method::POST, "/spawn")
            .timeout(SPAWN_TIMEOUT)
            .json(&body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let refusal = self.refusal(resp).await;
            // On a spawn, what can be missing is the image.
            if status == StatusCode::NOT_FOUND
                && matches!(refusal.code.as_str(), codes::IMAGE_NOT_FOUND | "")
            {
                return Err(ProviderError::ImageNotFound {
                    image: spec.image.clone(),
                    reason: refusal.message,
                });
            }
            return Err(self.refused(status, refusal, false));
        }
        let spawned: contract::Spawned = self.json(resp).await?;
        if spawned.id.is_empty() || spawned.id.len() > 256 {
            return Err(ProviderError::Runtime(format!(
                "{} answered a spawn without a usable id",
                self.who()
            )));
        }
        Ok(RuntimeHandle {
            runtime_id: spawned.id,
        })
    }

    async fn destroy(&self, runtime_id: &str) -> ProviderResult<()> {
        let path = format!("/sandboxes/{}", Self::segment(runtime_id));
        match self.send(self.request(Method::DELETE, &path), false).await {
            Ok(_) | Err(ProviderError::RuntimeNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn destroy_by_sandbox_id(&self, sandbox_id: &str) -> ProviderResult<()> {
        // The runtime id is the provider's: find it by the sandbox it was
        // spawned for.
        for item in self.inventory().await? {
            if item.sandbox_id == sandbox_id {
                self.destroy(&item.runtime_id).await?;
            }
        }
        Ok(())
    }

    async fn inspect(&self, runtime_id: &str) -> ProviderResult<RuntimeStatus> {
        let path = format!("/status/{}", Self::segment(runtime_id));
        match self.get::<contract::Status>(&path, &[], false).await {
            Ok(s) => runtime_status(s.status, s.reason).ok_or_else(|| {
                // Not a verdict: a failed observation (with hysteresis).
                ProviderError::Runtime(format!("{} answered an unknown status", self.who()))
            }),
            Err(ProviderError::RuntimeNotFound(_)) => Ok(RuntimeStatus::Missing),
            Err(e) => Err(e),
        }
    }

    async fn inventory(&self) -> ProviderResult<Vec<InventoryItem>> {
        // Not offered: the reconciler asks each sandbox's status.
        let Some(listed) = self
            .get_optional::<Vec<contract::Status>>("/sandboxes", &[])
            .await?
        else {
            return Ok(Vec::new());
        };
        Ok(listed
            .into_iter()
            .filter(|s| !s.id.is_empty() && !s.sandbox_id.is_empty())
            .filter_map(|s| {
                // An entry whose status is not understood is left out: the
                // reconciler then asks for it by id.
                Some(InventoryItem {
                    status: runtime_status(s.status, s.reason)?,
                    sandbox_id: s.sandbox_id,
                    runtime_id: s.id,
                    created_at: s.created_at,
                })
            })
            .collect())
    }

    async fn exec(
        &self,
        runtime_id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        let body = contract::Exec {
            id: runtime_id.to_string(),
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            workdir: spec.workdir.clone(),
            timeout_ms: u64::try_from(spec.timeout.as_millis()).unwrap_or(u64::MAX),
            stream: true,
        };
        let req = self
            .request(Method::POST, "/exec")
            .json(&body)
            .timeout(spec.timeout + EXEC_GRACE);
        let resp = self.send(req, false).await?;
        let streamed = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/x-ndjson"));
        if !streamed {
            let whole: contract::ExecResult = self.json(resp).await?;
            for (stream, text) in [
                (StreamKind::Stdout, whole.stdout),
                (StreamKind::Stderr, whole.stderr),
            ] {
                if !text.is_empty() {
                    super::best_effort_quiet(
                        "passing output on",
                        sink.send(OutputChunk {
                            stream,
                            data: Bytes::from(text),
                        })
                        .await,
                    );
                }
            }
            return exit_of(whole.exit_code, whole.timed_out, self.name);
        }
        let mut body = resp.bytes_stream();
        let mut buffer: Vec<u8> = Vec::new();
        loop {
            let mut start = 0;
            while let Some(at) = buffer[start..].iter().position(|b| *b == b'\n') {
                let line = &buffer[start..start + at];
                start += at + 1;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let frame: contract::Frame = serde_json::from_slice(line).map_err(|e| {
                    ProviderError::Runtime(format!(
                        "custom provider {} sent a bad exec line: {e}",
                        self.name
                    ))
                })?;
                match frame {
                    contract::Frame::Exit {
                        r#type,
                        exit_code,
                        timed_out,
                    } => {
                        if r#type != "exit" {
                            return Err(ProviderError::Runtime(format!(
                                "{} sent an exec frame of unknown type {:?}",
                                self.who(),
                                r#type.chars().take(40).collect::<String>()
                            )));
                        }
                        return exit_of(exit_code, timed_out, self.name);
                    }
                    contract::Frame::Failed { message, .. } => {
                        return Err(ProviderError::Runtime(format!(
                            "{}: the command failed: {message}",
                            self.who()
                        )));
                    }
                    contract::Frame::Output {
                        stream,
                        data,
                        data_base64,
                    } => {
                        let stream = if stream == "stderr" {
                            StreamKind::Stderr
                        } else {
                            StreamKind::Stdout
                        };
                        let data = match (data, data_base64) {
                            (_, Some(b64)) => Bytes::from(STANDARD.decode(b64).map_err(|e| {
                                ProviderError::Runtime(format!(
                                    "custom provider {}: bad base64 output: {e}",
                                    self.name
                                ))
                            })?),
                            (Some(text), None) => Bytes::from(text),
                            (None, None) => continue,
                        };
                        super::best_effort_quiet(
                            "passing output on",
                            sink.send(OutputChunk { stream, data }).await,
                        );
                    }
                }
            }
            buffer.drain(..start);
            if buffer.len() > MAX_FRAME_BYTES {
                return Err(ProviderError::Runtime(format!(
                    "custom provider {} sent an exec line over {MAX_FRAME_BYTES} bytes",
                    self.name
                )));
            }
            match body.next().await {
                Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    return Err(ProviderError::Runtime(format!(
                        "custom provider {}: exec stream broke: {e}",
                        self.name
                    )));
                }
                None => {
                    return Err(ProviderError::Runtime(format!(
                        "custom provider {}: exec stream ended without its exit frame",
                        self.name
                    )));
                }
            }
        }
    }

    async fn write_file(
        &self,
        runtime_id: &str,
        path: &str,
        content: Bytes,
        mode: u32,
    ) -> ProviderResult<()> {
        let body = contract::WriteFile {
            id: runtime_id.to_string(),
            path: path.to_string(),
            content_base64: Some(STANDARD.encode(&content)),
            content: None,
            mode: mode_text(mode),
        };
        self.post("/files", &body, true).await.map(|_| ())
    }

    async fn read_file(&self, runtime_id: &str, path: &str) -> ProviderResult<Bytes> {
        let req = self
            .request(Method::GET, "/files")
            .query(&[("id", runtime_id), ("path", path)]);
        let resp = self.send(req, true).await?;
        if resp
            .content_length()
            .is_some_and(|n| n > super::MAX_READ_BYTES as u64)
        {
            return Err(ProviderError::InvalidRequest(format!(
                "{path} is larger than {} bytes",
                super::MAX_READ_BYTES
            )));
        }
        let mut body = resp.bytes_stream();
        let mut out = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.unreachable(e))?;
            if out.len() + chunk.len() > super::MAX_READ_BYTES {
                return Err(ProviderError::InvalidRequest(format!(
                    "{path} is larger than {} bytes",
                    super::MAX_READ_BYTES
                )));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(out))
    }

    async fn list_files(&self, runtime_id: &str, path: &str) -> ProviderResult<Vec<FileEntry>> {
        self.get("/files/list", &[("id", runtime_id), ("path", path)], true)
            .await
    }

    async fn stat_file(&self, runtime_id: &str, path: &str) -> ProviderResult<FileEntry> {
        self.get("/files/stat", &[("id", runtime_id), ("path", path)], true)
            .await
    }

    async fn move_file(&self, runtime_id: &str, from: &str, to: &str) -> ProviderResult<()> {
        let body = contract::MoveFile {
            id: runtime_id.to_string(),
            old_path: from.to_string(),
            new_path: to.to_string(),
        };
        self.post("/files/move", &body, true).await.map(|_| ())
    }

    async fn chmod_file(&self, runtime_id: &str, path: &str, mode: u32) -> ProviderResult<()> {
        let body = contract::ChmodFile {
            id: runtime_id.to_string(),
            path: path.to_string(),
            mode: mode_text(mode),
        };
        self.post("/files/chmod", &body, true).await.map(|_| ())
    }

    async fn delete_file(
        &self,
        runtime_id: &str,
        path: &str,
        recursive: bool,
    ) -> ProviderResult<()> {
        let recursive = if recursive { "true" } else { "false" };
        let req = self.request(Method::DELETE, "/files").query(&[
            ("id", runtime_id),
            ("path", path),
            ("recursive", recursive),
        ]);
        self.send(req, true).await.map(|_| ())
    }

    async fn glob_files(&self, runtime_id: &str, pattern: &str) -> ProviderResult<Vec<String>> {
        self.get(
            "/files/glob",
            &[("id", runtime_id), ("pattern", pattern)],
            true,
        )
        .await
    }

    async fn logs(&self, runtime_id: &str, lines: usize) -> ProviderResult<Vec<String>> {
        let path = format!("/logs/{}", Self::segment(runtime_id));
        let lines = lines.to_string();
        // Not offered: no diagnostics.
        Ok(self
            .get_optional(&path, &[("lines", lines.as_str())])
            .await?
            .unwrap_or_default())
    }

    async fn stats(&self, runtime_id: &str) -> ProviderResult<RuntimeStats> {
        let path = format!("/stats/{}", Self::segment(runtime_id));
        // Not offered: `supported: false`.
        Ok(self.get_optional(&path, &[]).await?.unwrap_or_default())
    }
}

/// A runtime's status as the contract names it; `None` for a name it does
/// not have (never a verdict).
fn runtime_status(status: String, reason: Option<String>) -> Option<RuntimeStatus> {
    match status.as_str() {
        "running" => Some(RuntimeStatus::Running),
        "stopped" | "exited" | "dead" | "failed" => Some(RuntimeStatus::Stopped {
            cause: reason.unwrap_or(status),
        }),
        _ => None,
    }
}

/// How an exec ended, from its exit frame or whole answer.
fn exit_of(exit_code: Option<i32>, timed_out: bool, name: &str) -> ProviderResult<ExecExit> {
    match (exit_code, timed_out) {
        (_, true) => Ok(ExecExit::TimedOut),
        (Some(code), false) => Ok(ExecExit::Exited(code)),
        (None, false) => Err(ProviderError::Runtime(format!(
            "custom provider {name}: the command ended without an exit code"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::CustomProvider;

    /// A custom provider's URL is where its calls go and nothing else: no
    /// user, query or fragment that could steer them.
    #[test]
    fn urls_are_plain_http() {
        let ok = CustomProvider::new("p", "http://127.0.0.1:7480/runtime/", "k");
        assert_eq!(
            ok.map(|p| p.base).ok().as_deref(),
            Some("http://127.0.0.1:7480/runtime")
        );
        for bad in [
            "ftp://host",
            "http://user@host",
            "http://host/?q=1",
            "http://host/#f",
            "not a url",
        ] {
            assert!(CustomProvider::new("p", bad, "").is_err(), "{bad}");
        }
    }
}

/// The client against small misbehaving servers (real HTTP on loopback):
/// what a broken or hostile custom provider can and cannot make it do.
#[cfg(test)]
mod against_bad_servers {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::{get, post};

    use super::CustomProvider;
    use crate::provider::{ExecSpec, Provider, ProviderError, RuntimeStatus};

    async fn serve(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        url
    }

    /// A 404 without a code is not "gone": a wrong URL must never fail
    /// sandboxes. A coded one is; optional parts not offered read as none.
    #[tokio::test]
    async fn only_a_provider_that_says_so_makes_a_sandbox_gone() {
        let bare = serve(Router::new()).await;
        let p = CustomProvider::new("bare", &bare, "").unwrap();
        assert!(matches!(
            p.inspect("r1").await,
            Err(ProviderError::Runtime(_))
        ));
        assert!(
            p.destroy("r1").await.is_err(),
            "a bare 404 is no proof it is gone"
        );
        assert!(p.inventory().await.unwrap().is_empty());
        assert!(p.logs("r1", 10).await.unwrap().is_empty());
        assert!(!p.stats("r1").await.unwrap().supported);
        assert!(p.image_available("any").await.unwrap());

        let coded = serve(Router::new().fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                r#"{"code":"NOT_FOUND","message":"no such sandbox"}"#,
            )
        }))
        .await;
        let p = CustomProvider::new("coded", &coded, "").unwrap();
        assert!(matches!(p.inspect("r1").await, Ok(RuntimeStatus::Missing)));
        assert!(p.destroy("r1").await.is_ok());
        assert!(matches!(
            p.logs("r1", 10).await,
            Err(ProviderError::RuntimeNotFound(_))
        ));

        let odd = serve(
            Router::new().route("/status/{id}", get(|| async { r#"{"status":"Starting"}"# })),
        )
        .await;
        let p = CustomProvider::new("odd", &odd, "").unwrap();
        assert!(matches!(
            p.inspect("r1").await,
            Err(ProviderError::Runtime(_))
        ));
    }

    /// Redirects are not followed: a call and its body never go elsewhere.
    #[tokio::test]
    async fn redirects_are_not_followed() {
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&hits);
        let elsewhere = serve(Router::new().fallback(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { "{}" }
        }))
        .await;
        let target = format!("{elsewhere}/health");
        let redirecting = serve(Router::new().fallback(move || {
            let target = target.clone();
            async move { (StatusCode::TEMPORARY_REDIRECT, [("location", target)], "") }
        }))
        .await;
        let p = CustomProvider::new("redirecting", &redirecting, "key").unwrap();
        assert!(p.health().await.is_err());
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    }

    /// An exec stream ends with an exit or an error frame; anything else
    /// is an error, never a made-up exit code. Answers are capped.
    #[tokio::test]
    async fn exec_streams_end_with_their_frame_and_answers_are_capped() {
        let url = serve(
            Router::new()
                .route(
                    "/exec",
                    post(|| async {
                        (
                            [("content-type", "application/x-ndjson")],
                            "{\"stream\":\"stdout\",\"data\":\"hi\\n\"}\n{\"type\":\"error\",\"message\":\"disk full\"}\n",
                        )
                    }),
                )
                .route("/files/list", get(|| async { "x".repeat(17 << 20) })),
        )
        .await;
        let p = CustomProvider::new("failing", &url, "").unwrap();
        let (sink, mut out) = tokio::sync::mpsc::channel(8);
        let spec = ExecSpec {
            argv: vec!["true".into()],
            env: Default::default(),
            workdir: None,
            timeout: std::time::Duration::from_secs(5),
        };
        match p.exec("r1", &spec, sink).await {
            Err(ProviderError::Runtime(m)) => assert!(m.contains("disk full"), "{m}"),
            other => panic!("expected the error frame's message, got {other:?}"),
        }
        assert_eq!(
            out.recv().await.map(|c| c.data),
            Some(bytes::Bytes::from("hi\n"))
        );
        match p.list_files("r1", "/").await {
            Err(ProviderError::Runtime(m)) => assert!(m.contains("MiB"), "{m}"),
            other => panic!("expected the cap, got {other:?}"),
        }
    }
}
