//! The wire shapes of StacyVM's custom provider contract (v1), shared by
//! the client ([`super::CustomProvider`]) and the reference server
//! ([`super::server`]). JSON throughout, but for a file's bytes
//! (`GET /files`, raw) and a streamed exec (NDJSON).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::provider::RuntimeStats;

#[allow(unused_imports)] // Named in the docs.
use crate::provider::Capability;

/// `GET /health`: 2xx when usable; what the provider can do, optionally.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Health {
    #[serde(default)]
    pub status: String,
    /// [`Capability`] names; missing: exec, streaming, files and logs
    /// are assumed. Names a client does not know are skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<String>,
}

/// `GET /images/available?image=`: whether a spawn could use it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageAvailable {
    pub available: bool,
}

/// `POST /spawn`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spawn {
    pub sandbox_id: String,
    pub image: String,
    pub memory_mb: u32,
    pub vcpus: u32,
    pub disk_mb: u32,
}

/// `POST /spawn`'s answer: the runtime's id, used in every later call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spawned {
    pub id: String,
}

/// `GET /status/{id}`, and each entry of `GET /sandboxes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Only in `GET /sandboxes`: the runtime's id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// Only in `GET /sandboxes`: the sandbox it was spawned for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox_id: String,
    /// `running`, or anything else for a runtime that no longer runs.
    pub status: String,
    /// Why it stopped, in a user's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `POST /exec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Exec {
    pub id: String,
    /// The program and its arguments (never shell text).
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: Option<String>,
    /// The server kills the command and its children at this.
    pub timeout_ms: u64,
    /// Answer NDJSON [`Frame`]s as output is produced.
    #[serde(default)]
    pub stream: bool,
}

/// One NDJSON line of a streamed exec: output (`data` as text, or
/// `data_base64` for bytes that are not UTF-8), and last an `exit` frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Frame {
    /// The command could not go on after its output began:
    /// `{"type":"error","message"}`, the last line.
    Failed { r#type: String, message: String },
    Exit {
        /// Always `exit`.
        r#type: String,
        /// `null` when the command timed out.
        exit_code: Option<i32>,
        #[serde(default)]
        timed_out: bool,
    },
    Output {
        /// `stdout` or `stderr`.
        stream: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_base64: Option<String>,
    },
}

/// `POST /exec` answered whole (`stream: false`, or a server that does not
/// stream).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecResult {
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
    #[serde(default)]
    pub timed_out: bool,
}

/// `POST /files`: content as base64 (any bytes) or as `content` text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteFile {
    pub id: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Permission bits in octal text, e.g. `644`.
    pub mode: String,
}

/// `POST /files/move`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveFile {
    pub id: String,
    pub old_path: String,
    pub new_path: String,
}

/// `POST /files/chmod`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChmodFile {
    pub id: String,
    pub path: String,
    pub mode: String,
}

/// Every refusal: `{"code","message"}` with the status the code maps to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

/// The codes a refusal may carry (with their statuses).
pub mod codes {
    /// 404: no such sandbox.
    pub const NOT_FOUND: &str = "NOT_FOUND";
    /// 404: no such file or directory.
    pub const FILE_NOT_FOUND: &str = "FILE_NOT_FOUND";
    /// 404 on `POST /spawn`: the image is not there.
    pub const IMAGE_NOT_FOUND: &str = "IMAGE_NOT_FOUND";
    /// 400.
    pub const BAD_REQUEST: &str = "BAD_REQUEST";
    /// 409.
    pub const CONFLICT: &str = "CONFLICT";
    /// 410: the sandbox was destroyed.
    pub const GONE: &str = "GONE";
    /// 429: at capacity.
    pub const RESOURCE_LIMIT: &str = "RESOURCE_LIMIT";
    /// 503.
    pub const UNAVAILABLE: &str = "UNAVAILABLE";
    /// 500.
    pub const INTERNAL: &str = "INTERNAL_ERROR";
}

/// `GET /stats/{id}`.
pub type Stats = RuntimeStats;
