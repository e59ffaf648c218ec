//! The execution plane: workers own runtimes.
//!
//! A [`Worker`] holds providers and runs every runtime operation on a
//! placed sandbox: spawn, destroy, inspect and inventory, exec with
//! streaming output, files, logs, stats, health. The control plane (the
//! service and the scheduler) owns records and rules and reaches runtimes
//! only through this trait, routed by the sandbox's recorded `worker_id`
//! (see [`crate::scheduler::Scheduler::worker_for`]); it never names a
//! provider object.
//!
//! [`LocalWorker`] is the in-process implementation over the providers of
//! the server. A remote worker implements the same trait over RPC, which is
//! why one-shot calls on a runtime travel as one [`RuntimeCall`] value with
//! a [`RuntimeReply`]: the typed helpers on `dyn Worker` unpack them, so the
//! service stays typed and the wire stays one message pair.

pub mod agent;
pub mod fence;
pub mod labels;
mod local;
mod remote;
pub mod rpc;
pub mod token;

pub use local::{LocalWorker, hostname};
pub use remote::RemoteWorker;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::provider::{
    Capability, ExecExit, ExecSpec, FileEntry, InventoryItem, OutputSink, ProviderError,
    ProviderResult, RuntimeHandle, RuntimeStats, RuntimeStatus, SpawnSpec,
};

/// Errors crossing the worker boundary are the providers' own: a worker
/// that cannot be reached, or lacks the provider, answers `Unavailable`.
pub type WorkerResult<T> = ProviderResult<T>;

/// Whether a worker is in reach, as `/workers` and GraphQL show it (the
/// store keeps the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Heard from within `lifecycle.worker_stale_after` (or in process).
    Online,
    /// Silent past `worker_stale_after`: no new sandboxes, its sandboxes
    /// `unhealthy`.
    Stale,
    /// Silent past `worker_lost_after`: its sandboxes are lost.
    Offline,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Online => "online",
            WorkerState::Stale => "stale",
            WorkerState::Offline => "offline",
        }
    }
}

/// What admins allow on a worker. Kept in the store (`workers.admin_state`)
/// and across heartbeats and restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdminState {
    /// Takes new sandboxes.
    #[default]
    Active,
    /// Takes no new sandboxes; its sandboxes run on.
    Cordoned,
    /// Cordoned while its sandboxes end (destroyed or expired); a drain
    /// is done when none is left.
    Draining,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Cordoned => "cordoned",
            AdminState::Draining => "draining",
        }
    }

    /// Whether the scheduler may place new sandboxes on the worker.
    pub fn schedulable(self) -> bool {
        self == AdminState::Active
    }
}

impl std::str::FromStr for AdminState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(AdminState::Active),
            "cordoned" => Ok(AdminState::Cordoned),
            "draining" => Ok(AdminState::Draining),
            other => Err(format!("unknown worker admin state {other:?}")),
        }
    }
}

/// Whether a worker last heard from at `heard_from` (`None`: in process)
/// is in reach: heard from within `stale_after`. The one freshness rule;
/// the scheduler and the remote worker's calls both use it.
pub fn is_fresh(heard_from: Option<DateTime<Utc>>, stale_after: Duration) -> bool {
    heard_from.is_none_or(|since| {
        (Utc::now() - since)
            .to_std()
            .map_or(true, |silent| silent < stale_after)
    })
}

/// The last health check of one provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderHealth {
    pub healthy: bool,
    pub error: Option<String>,
    pub latency: Duration,
    pub checked_at: DateTime<Utc>,
}

/// One provider as a worker offers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderInfo {
    pub name: String,
    pub capabilities: Vec<Capability>,
    /// What a sandbox of this provider is isolated by.
    pub isolation: String,
    /// `None` before the first check.
    pub health: Option<ProviderHealth>,
    /// The last `stacyvm certify` of this provider on the worker's host.
    #[serde(default)]
    pub certification: Option<crate::provider::certify::CertificationSummary>,
}

/// What a worker offers now, for placement and for `/providers`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerSnapshot {
    pub providers: Vec<ProviderInfo>,
    /// CPUs of the worker's host: a sandbox may not ask for more.
    pub max_vcpus: u32,
    /// What the operator says the worker is (`worker.labels`, `--label`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Most live sandboxes it takes (`worker.max_sandboxes`); 0: no limit.
    #[serde(default)]
    pub max_sandboxes: u32,
    /// Memory of the worker's host in MiB: a sandbox may not ask for more
    /// (0: not said).
    #[serde(default)]
    pub memory_mb: u64,
}

impl WorkerSnapshot {
    pub fn provider(&self, name: &str) -> Option<&ProviderInfo> {
        self.providers.iter().find(|p| p.name == name)
    }
}

/// One runtime on a worker: the sandbox, its provider, the provider's
/// handle (`None` when the spawn never recorded one: destroy then removes
/// whatever exists under the sandbox id) and the generation of the
/// sandbox's lease, which the worker fences on (see [`fence`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeRef {
    pub sandbox_id: String,
    pub provider: String,
    pub runtime_id: Option<String>,
    pub lease: u64,
}

/// A one-shot operation on a runtime.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeCall {
    Destroy,
    Inspect,
    WriteFile {
        path: String,
        #[serde(with = "rpc::base64_bytes")]
        content: Bytes,
        mode: u32,
    },
    ReadFile {
        path: String,
    },
    ListFiles {
        path: String,
    },
    StatFile {
        path: String,
    },
    MoveFile {
        from: String,
        to: String,
    },
    ChmodFile {
        path: String,
        mode: u32,
    },
    DeleteFile {
        path: String,
        recursive: bool,
    },
    GlobFiles {
        pattern: String,
    },
    Logs {
        lines: usize,
    },
    Stats,
}

/// The answer to a [`RuntimeCall`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeReply {
    Done,
    Status(RuntimeStatus),
    Bytes(#[serde(with = "rpc::base64_bytes")] Bytes),
    Entries(Vec<FileEntry>),
    Entry(FileEntry),
    Paths(Vec<String>),
    Lines(Vec<String>),
    Stats(RuntimeStats),
}

/// A worker: the runtime side of every operation on a placed sandbox.
#[async_trait]
pub trait Worker: Send + Sync {
    /// Stable across restarts of the same installation.
    fn id(&self) -> &str;

    fn hostname(&self) -> &str;

    /// Whether the worker lives in this process: its commands end with
    /// the process, and so may its sandboxes at shutdown.
    fn in_process(&self) -> bool;

    /// When the worker was last heard from; `None` for a worker in this
    /// process, which is never out of reach.
    fn heard_from(&self) -> Option<DateTime<Utc>> {
        None
    }

    /// Providers with their last known health, and capacity.
    fn snapshot(&self) -> WorkerSnapshot;

    /// Probes every provider now and returns the results.
    async fn check_health(&self) -> BTreeMap<String, ProviderHealth>;

    /// Finishes provider work a previous process of this worker left
    /// half-done; how many items were fixed.
    async fn recover_at_startup(&self) -> WorkerResult<usize>;

    async fn image_available(&self, provider: &str, image: &str) -> WorkerResult<bool>;

    /// Makes the runtime of a new sandbox under lease generation `lease`.
    /// Idempotent: a retried spawn of the same sandbox returns the runtime
    /// the first one made (or is making) instead of making another.
    async fn spawn(
        &self,
        provider: &str,
        spec: &SpawnSpec,
        lease: u64,
    ) -> WorkerResult<RuntimeHandle>;

    /// Every runtime `provider` holds for this installation.
    async fn inventory(&self, provider: &str) -> WorkerResult<Vec<InventoryItem>>;

    /// Runs a command, streaming its output into `sink`. Dropping the
    /// future cancels the command (its process tree is killed).
    async fn exec(
        &self,
        runtime: &RuntimeRef,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> WorkerResult<ExecExit>;

    /// Runs a command on a terminal (see [`crate::provider::Provider::exec_terminal`]).
    /// Dropping the future ends it.
    async fn exec_terminal(
        &self,
        runtime: &RuntimeRef,
        spec: &ExecSpec,
        terminal: crate::provider::Terminal,
        sink: OutputSink,
    ) -> WorkerResult<ExecExit>;

    /// Any one-shot operation on a runtime.
    async fn call(&self, runtime: &RuntimeRef, call: RuntimeCall) -> WorkerResult<RuntimeReply>;
}

/// A reply of the wrong kind: a worker bug or a protocol mismatch.
fn unexpected(call: &str, reply: RuntimeReply) -> ProviderError {
    let reply: String = format!("{reply:?}").chars().take(200).collect();
    ProviderError::Runtime(format!(
        "worker answered {call} with an unexpected reply: {reply}"
    ))
}

/// Typed forms of [`Worker::call`], for the service.
impl dyn Worker + '_ {
    pub async fn destroy(&self, runtime: &RuntimeRef) -> WorkerResult<()> {
        match self.call(runtime, RuntimeCall::Destroy).await? {
            RuntimeReply::Done => Ok(()),
            other => Err(unexpected("destroy", other)),
        }
    }

    pub async fn inspect(&self, runtime: &RuntimeRef) -> WorkerResult<RuntimeStatus> {
        match self.call(runtime, RuntimeCall::Inspect).await? {
            RuntimeReply::Status(status) => Ok(status),
            other => Err(unexpected("inspect", other)),
        }
    }

    pub async fn write_file(
        &self,
        runtime: &RuntimeRef,
        path: &str,
        content: Bytes,
        mode: u32,
    ) -> WorkerResult<()> {
        let call = RuntimeCall::WriteFile {
            path: path.to_string(),
            content,
            mode,
        };
        match self.call(runtime, call).await? {
            RuntimeReply::Done => Ok(()),
            other => Err(unexpected("write_file", other)),
        }
    }

    pub async fn read_file(&self, runtime: &RuntimeRef, path: &str) -> WorkerResult<Bytes> {
        let call = RuntimeCall::ReadFile {
            path: path.to_string(),
        };
        match self.call(runtime, call).await? {
            RuntimeReply::Bytes(bytes) => Ok(bytes),
            other => Err(unexpected("read_file", other)),
        }
    }

    pub async fn list_files(
        &self,
        runtime: &RuntimeRef,
        path: &str,
    ) -> WorkerResult<Vec<FileEntry>> {
        let call = RuntimeCall::ListFiles {
            path: path.to_string(),
        };
        match self.call(runtime, call).await? {
            RuntimeReply::Entries(entries) => Ok(entries),
            other => Err(unexpected("list_files", other)),
        }
    }

    pub async fn stat_file(&self, runtime: &RuntimeRef, path: &str) -> WorkerResult<FileEntry> {
        let call = RuntimeCall::StatFile {
            path: path.to_string(),
        };
        match self.call(runtime, call).await? {
            RuntimeReply::Entry(entry) => Ok(entry),
            other => Err(unexpected("stat_file", other)),
        }
    }

    pub async fn move_file(&self, runtime: &RuntimeRef, from: &str, to: &str) -> WorkerResult<()> {
        let call = RuntimeCall::MoveFile {
            from: from.to_string(),
            to: to.to_string(),
        };
        match self.call(runtime, call).await? {
            RuntimeReply::Done => Ok(()),
            other => Err(unexpected("move_file", other)),
        }
    }

    pub async fn chmod_file(
        &self,
        runtime: &RuntimeRef,
        path: &str,
        mode: u32,
    ) -> WorkerResult<()> {
        let call = RuntimeCall::ChmodFile {
            path: path.to_string(),
            mode,
        };
        match self.call(runtime, call).await? {
            RuntimeReply::Done => Ok(()),
            other => Err(unexpected("chmod_file", other)),
        }
    }

    pub async fn delete_file(
        &self,
        runtime: &RuntimeRef,
        path: &str,
        recursive: bool,
    ) -> WorkerResult<()> {
        let call = RuntimeCall::DeleteFile {
            path: path.to_string(),
            recursive,
        };
        match self.call(runtime, call).await? {
            RuntimeReply::Done => Ok(()),
            other => Err(unexpected("delete_file", other)),
        }
    }

    pub async fn glob_files(
        &self,
        runtime: &RuntimeRef,
        pattern: &str,
    ) -> WorkerResult<Vec<String>> {
        let call = RuntimeCall::GlobFiles {
            pattern: pattern.to_string(),
        };
        match self.call(runtime, call).await? {
            RuntimeReply::Paths(paths) => Ok(paths),
            other => Err(unexpected("glob_files", other)),
        }
    }

    pub async fn logs(&self, runtime: &RuntimeRef, lines: usize) -> WorkerResult<Vec<String>> {
        match self.call(runtime, RuntimeCall::Logs { lines }).await? {
            RuntimeReply::Lines(lines) => Ok(lines),
            other => Err(unexpected("logs", other)),
        }
    }

    pub async fn stats(&self, runtime: &RuntimeRef) -> WorkerResult<RuntimeStats> {
        match self.call(runtime, RuntimeCall::Stats).await? {
            RuntimeReply::Stats(stats) => Ok(stats),
            other => Err(unexpected("stats", other)),
        }
    }
}

/// Records health results in the store's provider table (best effort: a
/// failed write is logged).
pub async fn record_health(
    store: &crate::store::Store,
    results: &BTreeMap<String, ProviderHealth>,
) {
    for (name, health) in results {
        let record = entity::provider::Model {
            name: name.clone(),
            healthy: health.healthy,
            latency_ms: health.latency.as_millis() as i64,
            error: health.error.clone(),
            last_checked: health.checked_at,
        };
        if let Err(e) = store.record_provider_health(record).await {
            tracing::warn!(provider = %name, error = %e, "cannot record provider health (best effort)");
        }
    }
}
