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
    StreamKind,
};
use contract::codes;

/// How long a call other than exec may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
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
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(format!("url {url:?} must be http(s)://host[:port]"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() || !parsed.username().is_empty()
        {
            return Err(format!("url {url:?} may carry no user, query or fragment"));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
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
        let text = resp.text().await.unwrap_or_default();
        let refusal: contract::Refusal = serde_json::from_str(&text).unwrap_or(contract::Refusal {
            code: String::new(),
            message: text.chars().take(300).collect(),
        });
        Err(self.refused(status, refusal, file))
    }

    fn refused(&self, status: StatusCode, r: contract::Refusal, file: bool) -> ProviderError {
        let message = if r.message.is_empty() {
            format!("custom provider {} answered {status}", self.name)
        } else {
            r.message
        };
        match status.as_u16() {
            400 => ProviderError::InvalidRequest(message),
            404 if r.code == codes::FILE_NOT_FOUND || (file && r.code != codes::NOT_FOUND) => {
                ProviderError::FileNotFound(message)
            }
            404 | 410 => ProviderError::RuntimeNotFound(message),
            409 => ProviderError::Conflict(message),
            429 | 503 => ProviderError::Unavailable(message),
            _ => ProviderError::Runtime(message),
        }
    }

    async fn json<T: DeserializeOwned>(&self, resp: reqwest::Response) -> ProviderResult<T> {
        resp.json().await.map_err(|e| {
            ProviderError::Runtime(format!("custom provider {} answered badly: {e}", self.name))
        })
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
        if let Some(capabilities) = health.capabilities {
            *self.capabilities.lock().unwrap_or_else(|e| e.into_inner()) = Some(capabilities);
        }
        Ok(())
    }

    async fn image_available(&self, image: &str) -> ProviderResult<bool> {
        match self
            .get::<contract::ImageAvailable>("/images/available", &[("image", image)], false)
            .await
        {
            Ok(answer) => Ok(answer.available),
            // Not offered: the spawn will say.
            Err(ProviderError::RuntimeNotFound(_)) => Ok(true),
            Err(e) => Err(e),
        }
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
            .json(&body)
            .send()
            .await;
        let resp = resp.map_err(|e| self.unreachable(e))?;
        if resp.status() == StatusCode::NOT_FOUND {
            let refusal: contract::Refusal = resp.json().await.unwrap_or(contract::Refusal {
                code: String::new(),
                message: String::new(),
            });
            return Err(ProviderError::ImageNotFound {
                image: spec.image.clone(),
                reason: refusal.message,
            });
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let refusal = resp.json().await.unwrap_or(contract::Refusal {
                code: String::new(),
                message: String::new(),
            });
            return Err(self.refused(status, refusal, false));
        }
        let spawned: contract::Spawned = self.json(resp).await?;
        if spawned.id.is_empty() || spawned.id.len() > 256 {
            return Err(ProviderError::Runtime(format!(
                "custom provider {} answered a spawn without a usable id",
                self.name
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
            Ok(s) if s.status == "running" => Ok(RuntimeStatus::Running),
            Ok(s) => Ok(RuntimeStatus::Stopped {
                cause: s.reason.unwrap_or(s.status),
            }),
            Err(ProviderError::RuntimeNotFound(_)) => Ok(RuntimeStatus::Missing),
            Err(e) => Err(e),
        }
    }

    async fn inventory(&self) -> ProviderResult<Vec<InventoryItem>> {
        let listed = match self
            .get::<Vec<contract::Status>>("/sandboxes", &[], false)
            .await
        {
            Ok(listed) => listed,
            // Not offered: the reconciler asks each sandbox's status.
            Err(ProviderError::RuntimeNotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(listed
            .into_iter()
            .filter(|s| !s.id.is_empty() && !s.sandbox_id.is_empty())
            .map(|s| InventoryItem {
                status: if s.status == "running" {
                    RuntimeStatus::Running
                } else {
                    RuntimeStatus::Stopped {
                        cause: s.reason.unwrap_or(s.status),
                    }
                },
                sandbox_id: s.sandbox_id,
                runtime_id: s.id,
                created_at: s.created_at,
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
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let line = &line[..line.len() - 1];
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
                        exit_code,
                        timed_out,
                        ..
                    } => {
                        return exit_of(exit_code, timed_out, self.name);
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
        self.get(&path, &[("lines", lines.as_str())], false).await
    }

    async fn stats(&self, runtime_id: &str) -> ProviderResult<RuntimeStats> {
        let path = format!("/stats/{}", Self::segment(runtime_id));
        self.get(&path, &[], false).await
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
