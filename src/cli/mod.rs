//! Commands that talk to a running control plane over its REST API (the
//! server's rules stay in the server): `stacyvm workers ...` for
//! operators, `stacyvm sandbox ...`, `stacyvm files ...` and `stacyvm
//! shell` for users.

pub mod bench;
pub mod certify;
pub mod client;
pub mod mcp;
pub mod shell;
pub mod workers;

use std::time::Duration;

/// A failed command: what to print.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{status}: {message}")]
    Refused {
        status: u16,
        /// The API's error code (`NOT_FOUND`, ...); empty when the answer
        /// had none (a proxy's page, say).
        code: String,
        message: String,
    },
    #[error("{0}")]
    Other(String),
}

/// `/sandboxes/{id}`, for an id that can only name a sandbox (letters,
/// digits, `-`): never another path of the API.
pub(crate) fn sandbox_path(id: &str) -> Result<String, CliError> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(CliError::Other(format!("not a sandbox id: {id:?}")));
    }
    Ok(format!("/sandboxes/{id}"))
}

/// `/sandboxes/{id}/files{route}?path=...`, the path percent-encoded.
pub(crate) fn files_path(id: &str, route: &str, path: &str) -> Result<String, CliError> {
    let encoded = percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC);
    Ok(format!("{}/files{route}?path={encoded}", sandbox_path(id)?))
}

/// The body of `POST /sandboxes` as this API's own clients send it (the
/// CLI's `sandbox create`, `stacyvm mcp`'s `create_sandbox`): only what
/// was given, so the server's defaults apply to the rest.
#[derive(Debug, Default, serde::Serialize)]
pub struct SpawnBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl SpawnBody {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// Where the control plane is and how to authenticate.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// Base URL, e.g. `http://127.0.0.1:7423`.
    pub server: String,
    /// Sent as `X-Admin-API-Key`.
    pub admin_key: Option<String>,
    /// Sent as `X-API-Key`.
    pub api_key: Option<String>,
}

impl Target {
    /// A request to `/api/v1{path}` with the credentials, answered within
    /// `timeout`.
    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        timeout: Duration,
    ) -> reqwest::RequestBuilder {
        let url = format!("{}/api/v1{path}", self.server.trim_end_matches('/'));
        // One client per process: its connections are reused (`stacyvm
        // mcp` makes a call per tool use).
        static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
        let client = CLIENT.get_or_init(|| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "HTTP client without its connect timeout");
                    reqwest::Client::new()
                })
        });
        let mut req = client.request(method, url).timeout(timeout);
        if let Some(key) = &self.admin_key {
            req = req.header("X-Admin-API-Key", key);
        }
        if let Some(key) = &self.api_key {
            req = req.header("X-API-Key", key);
        }
        req
    }

    fn unreachable(&self, source: reqwest::Error) -> CliError {
        CliError::Unreachable {
            url: self.server.clone(),
            source,
        }
    }

    /// The response when it is a success, else the API's `{code, message}`
    /// as an error.
    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, CliError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let field = |k: &str| body.get(k).and_then(|m| m.as_str()).map(str::to_string);
        // Not the API's error shape (a proxy's page): its first line.
        let message = field("message").unwrap_or_else(|| {
            let line = text.lines().next().unwrap_or("no message");
            line.chars().take(200).collect()
        });
        Err(CliError::Refused {
            status: status.as_u16(),
            code: field("code").unwrap_or_default(),
            message,
        })
    }

    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<serde_json::Value, CliError> {
        self.send_json(method, path, None, Duration::from_secs(30))
            .await
    }

    pub(crate) async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<serde_json::Value, CliError> {
        let mut req = self.request(method, path, timeout);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let resp = Self::check(resp).await?;
        let text = resp
            .text()
            .await
            .map_err(|e| CliError::Other(format!("reading the server's answer: {e}")))?;
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| {
            CliError::Other(format!(
                "the server's answer is not JSON ({e}): {}",
                text.chars().take(120).collect::<String>()
            ))
        })
    }

    /// A sandbox file's bytes.
    pub(crate) async fn read_file(&self, id: &str, path: &str) -> Result<bytes::Bytes, CliError> {
        let resp = self
            .request(
                reqwest::Method::GET,
                &files_path(id, "", path)?,
                Duration::from_secs(300),
            )
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Self::check(resp)
            .await?
            .bytes()
            .await
            .map_err(|e| CliError::Other(format!("reading {path}: {e}")))
    }
}

#[cfg(test)]
mod spawn_body_tests {
    use super::SpawnBody;

    /// What was not given is not sent: the server's defaults apply.
    #[test]
    fn a_spawn_body_carries_only_what_was_given() {
        assert_eq!(SpawnBody::default().to_json(), serde_json::json!({}));
        let body = SpawnBody {
            image: Some("alpine:latest".into()),
            ttl: Some("10m".into()),
            metadata: [("team".to_string(), "blue".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(
            body.to_json(),
            serde_json::json!({"image": "alpine:latest", "ttl": "10m", "metadata": {"team": "blue"}})
        );
    }
}
