//! Operator commands that talk to a running control plane over its REST
//! API (the server's rules stay in the server): `stacyvm workers ...`.

pub mod bench;
pub mod workers;

use std::time::Duration;

/// A failed command: what to print.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{status}: {message}")]
    Refused { status: u16, message: String },
    #[error("{0}")]
    Other(String),
}

/// Where the control plane is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Target {
    /// Base URL, e.g. `http://127.0.0.1:7423`.
    pub server: String,
    /// Sent as `X-Admin-API-Key`.
    pub admin_key: Option<String>,
}

impl Target {
    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default()
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<serde_json::Value, CliError> {
        let url = format!("{}/api/v1{path}", self.server.trim_end_matches('/'));
        let mut req = Self::client().request(method, &url);
        if let Some(key) = &self.admin_key {
            req = req.header("X-Admin-API-Key", key);
        }
        let resp = req.send().await.map_err(|source| CliError::Unreachable {
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            let message = body
                .get("message")
                .and_then(|m| m.as_str())
                .unwrap_or("no message")
                .to_string();
            return Err(CliError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        Ok(body)
    }
}
