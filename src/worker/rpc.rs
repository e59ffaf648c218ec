//! The worker protocol: what the control plane sends a `stacyvm worker`
//! and what it answers, over HTTP on the worker's `--listen` address.
//!
//! Every request is a `POST /rpc/v1/<operation>` with a JSON body and a
//! credential of the worker as `Authorization: Bearer <token>`: a
//! short-lived signed token for this direction, or the static secret (see
//! [`super::token`]). A unary answer is `{"ok": value}` or `{"err": WireError}`.
//! An exec answers a stream of NDJSON [`ExecFrame`]s: output chunks in
//! order, then one `exit` or `error` frame. Closing the stream early
//! cancels the command on the worker, as dropping a local exec does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ProviderHealth, RuntimeCall, RuntimeRef, WorkerSnapshot};
use crate::provider::{ExecExit, ExecSpec, ProviderError, SpawnSpec, StreamKind};

/// The path prefix of every operation.
pub const PREFIX: &str = "/rpc/v1";

/// A provider error as it crosses the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireError {
    ImageNotFound { image: String, reason: String },
    RuntimeNotFound { message: String },
    FileNotFound { message: String },
    InvalidRequest { message: String },
    Unavailable { message: String },
    Fenced { message: String },
    Conflict { message: String },
    Runtime { message: String },
}

impl From<ProviderError> for WireError {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::ImageNotFound { image, reason } => {
                WireError::ImageNotFound { image, reason }
            }
            ProviderError::RuntimeNotFound(message) => WireError::RuntimeNotFound { message },
            ProviderError::FileNotFound(message) => WireError::FileNotFound { message },
            ProviderError::InvalidRequest(message) => WireError::InvalidRequest { message },
            e @ ProviderError::Unsupported { .. } => WireError::InvalidRequest {
                message: e.to_string(),
            },
            ProviderError::Unavailable(message) => WireError::Unavailable { message },
            ProviderError::Fenced(message) => WireError::Fenced { message },
            ProviderError::Conflict(message) => WireError::Conflict { message },
            ProviderError::Runtime(message) => WireError::Runtime { message },
        }
    }
}

impl From<WireError> for ProviderError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::ImageNotFound { image, reason } => {
                ProviderError::ImageNotFound { image, reason }
            }
            WireError::RuntimeNotFound { message } => ProviderError::RuntimeNotFound(message),
            WireError::FileNotFound { message } => ProviderError::FileNotFound(message),
            WireError::InvalidRequest { message } => ProviderError::InvalidRequest(message),
            WireError::Unavailable { message } => ProviderError::Unavailable(message),
            WireError::Fenced { message } => ProviderError::Fenced(message),
            WireError::Conflict { message } => ProviderError::Conflict(message),
            WireError::Runtime { message } => ProviderError::Runtime(message),
        }
    }
}

/// A unary answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer<T> {
    Ok(T),
    Err(WireError),
}

impl<T> From<Result<T, ProviderError>> for Answer<T> {
    fn from(result: Result<T, ProviderError>) -> Self {
        match result {
            Ok(value) => Answer::Ok(value),
            Err(e) => Answer::Err(e.into()),
        }
    }
}

impl<T> Answer<T> {
    pub fn into_result(self) -> Result<T, ProviderError> {
        match self {
            Answer::Ok(value) => Ok(value),
            Answer::Err(e) => Err(e.into()),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ImageAvailable {
    pub provider: String,
    pub image: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Spawn {
    pub provider: String,
    pub spec: SpawnSpec,
    /// The generation of the sandbox's lease.
    pub lease: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Inventory {
    pub provider: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Call {
    pub runtime: RuntimeRef,
    pub call: RuntimeCall,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Exec {
    pub runtime: RuntimeRef,
    pub spec: ExecSpec,
}

/// The first message of a terminal's WebSocket (`{PREFIX}/terminal`):
/// what to run. Then the control plane sends typed input as binary
/// messages and [`TerminalControl`] as text; the worker sends the output
/// as binary messages and one [`TerminalEnd`] as text.
#[derive(Debug, Serialize, Deserialize)]
pub struct TerminalOpen {
    pub runtime: RuntimeRef,
    pub spec: ExecSpec,
    pub size: crate::provider::TerminalSize,
}

/// What the control plane sends about a running terminal, besides input.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminalControl {
    Resize(crate::provider::TerminalSize),
}

/// How a terminal's command ended.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminalEnd {
    Exit(ExecExit),
    Error(WireError),
}

/// One line of an exec's answer stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecFrame {
    Output {
        stream: StreamKind,
        #[serde(with = "base64_bytes")]
        data: bytes::Bytes,
    },
    Exit(ExecExit),
    Error(WireError),
}

/// What a worker tells the control plane on every heartbeat (the first
/// one registers it): who it is, where it answers, what it offers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Heartbeat {
    pub id: String,
    /// `http://host:port` where the worker's RPC answers.
    pub endpoint: String,
    pub hostname: String,
    pub version: String,
    pub snapshot: WorkerSnapshot,
    /// The worker's installation (`data_dir/instance_id`): the same worker
    /// restarted keeps it, another host taking the id does not.
    #[serde(default)]
    pub instance: String,
}

/// Health results by provider.
pub type HealthResults = BTreeMap<String, ProviderHealth>;

/// Bytes as base64 text in JSON.
pub mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &bytes::Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bytes::Bytes, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map(bytes::Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

/// A worker's RPC address as the control plane will call it: an
/// `http(s)://host[:port]` URL with no user, path, query or fragment (so no
/// operation path can be steered elsewhere). Returns it without a trailing
/// slash.
pub fn checked_endpoint(endpoint: &str) -> Result<String, String> {
    let refuse = |why: &str| Err(format!("worker endpoint {endpoint:?} {why}"));
    if endpoint.len() > 512 {
        return refuse("is longer than 512 bytes");
    }
    let Ok(url) = reqwest::Url::parse(endpoint) else {
        return refuse("is not a URL");
    };
    match url.scheme() {
        "http" => {}
        // This build's HTTP client has no TLS: say so at registration
        // rather than fail every call later.
        "https" => return refuse("uses https://, which the worker RPC does not support yet"),
        _ => return refuse("must be http://"),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return refuse("has no host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return refuse("must not carry credentials");
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return refuse("must have no path, query or fragment");
    }
    if url
        .host_str()
        .is_some_and(|h| h == "0.0.0.0" || h == "[::]")
    {
        return refuse("names no host to reach (an unspecified address)");
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// Whether `presented` (an `Authorization` header value) carries `token`,
/// compared in constant time.
pub fn bearer_matches(presented: Option<&str>, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    let Some(given) = presented.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    !token.is_empty() && bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_cross_the_wire_unchanged() {
        for e in [
            ProviderError::FileNotFound("/x".into()),
            ProviderError::RuntimeNotFound("r".into()),
            ProviderError::Unavailable("down".into()),
            ProviderError::ImageNotFound {
                image: "i".into(),
                reason: "gone".into(),
            },
        ] {
            let text = e.to_string();
            let wire = serde_json::to_string(&WireError::from(e)).expect("json");
            let back: ProviderError = serde_json::from_str::<WireError>(&wire)
                .expect("parse")
                .into();
            assert_eq!(back.to_string(), text);
        }
    }

    #[test]
    fn bytes_travel_as_base64_and_back() {
        let frame = ExecFrame::Output {
            stream: StreamKind::Stderr,
            data: bytes::Bytes::from_static(b"\0\xff\n"),
        };
        let text = serde_json::to_string(&frame).expect("json");
        assert_eq!(text, r#"{"output":{"stream":"stderr","data":"AP8K"}}"#);
        match serde_json::from_str(&text).expect("parse") {
            ExecFrame::Output { data, .. } => assert_eq!(data.as_ref(), b"\0\xff\n"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn endpoints_name_a_host_and_nothing_else() {
        assert_eq!(
            checked_endpoint("http://127.0.0.1:7424/").as_deref(),
            Ok("http://127.0.0.1:7424")
        );
        let https = checked_endpoint("https://w1.internal:7424").unwrap_err();
        assert!(https.contains("does not support yet"), "{https}");
        for bad in [
            "file:///etc/passwd",
            "http://10.0.0.5/admin?x=",
            "http://10.0.0.5/path",
            "http://user:pw@10.0.0.5:1",
            "http://10.0.0.5:1/#frag",
            "http://0.0.0.0:7424",
            "not a url",
        ] {
            assert!(checked_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_the_exact_bearer_token_matches() {
        assert!(bearer_matches(Some("Bearer s3cret"), "s3cret"));
        assert!(!bearer_matches(Some("Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(Some("s3cret"), "s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
        assert!(!bearer_matches(Some("Bearer "), ""));
    }
}
