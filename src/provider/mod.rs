//! The runtime plane: every way StacyVM can run a sandbox sits behind [`Provider`].
//!
//! A provider knows nothing about owners, quotas, TTLs or the store. It turns
//! "make a runtime from this image", "run this argv", "read this file" into
//! runtime calls, and reports what happened. All product rules live in
//! `service/`; this module only states the contract and hosts one file per
//! implementation.

pub mod agent;
pub mod certify;
pub mod custom;
pub mod docker;
pub mod hostfs;
pub mod image_store;
pub mod memory;
pub mod microvm;
pub mod native;
pub mod proot;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    Stdout,
    Stderr,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        }
    }
}

/// One piece of output, in the order the runtime produced it.
#[derive(Debug, Clone)]
pub struct OutputChunk {
    pub stream: StreamKind,
    pub data: Bytes,
}

/// Where a provider sends output while a command runs. A closed receiver
/// means nobody listens any more; providers keep running the command and
/// drop further output (the exec result still carries the exit code).
pub type OutputSink = mpsc::Sender<OutputChunk>;

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    pub cols: u16,
    pub rows: u16,
}

/// What a terminal's user does while its command runs.
#[derive(Debug, Clone)]
pub enum TerminalInput {
    /// Bytes typed (or pasted).
    Data(Bytes),
    Resize(TerminalSize),
}

/// A terminal for a command: its size at the start, and what its user
/// types and resizes while it runs.
pub struct Terminal {
    pub size: TerminalSize,
    pub input: mpsc::Receiver<TerminalInput>,
}

/// The capabilities a sandbox's root keeps (Linux names without `CAP_`):
/// what ordinary root-in-a-container work needs (installing packages,
/// chown). The docker provider passes them as `cap_add` after dropping all, the
/// native provider reduces every set to them. What is left out includes
/// `SYS_ADMIN` (mounts, namespaces), `NET_RAW`, `MKNOD`, `SYS_CHROOT` and
/// `SYS_PTRACE`.
pub const SANDBOX_CAPABILITIES: [&str; 7] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "SETUID",
    "SETGID",
    "KILL",
];

/// An absolute sandbox path with `.`, `..` and empty components resolved
/// without looking at the filesystem; `..` at the root stays at the root.
/// The service normalizes every path with it; providers that must decide
/// by a path's place (the docker provider's tmpfs `/tmp`) use it too.
pub fn resolve_lexically(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The largest file a provider reads into memory for one `read_file` where
/// it must buffer (the docker provider's reads from a tmpfs `/tmp`).
pub const MAX_READ_BYTES: usize = 256 << 20;

/// What to create. Limits are already validated and defaulted by the service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnSpec {
    /// The StacyVM sandbox id; providers label or name the runtime with it
    /// so that an inventory can always be matched back to a record.
    pub sandbox_id: String,
    pub image: String,
    pub memory_mb: u32,
    pub vcpus: u32,
    /// Size of the sandbox's writable disk in MiB (see `defaults.disk_mb`).
    pub disk_mb: u32,
}

/// What a successful spawn returns: the provider's own handle for the runtime.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuntimeHandle {
    pub runtime_id: String,
}

/// The one rule for what a command may carry, checked by the service on
/// every request and again by a provider whose helper protocol depends on
/// it (the native provider's NUL-separated one): a non-empty argv, no NUL
/// byte anywhere, environment names non-empty and without `=`.
pub fn check_command(
    argv: &[String],
    env: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err("command is required".into());
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err("command and args may not contain NUL bytes".into());
    }
    for (key, value) in env {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(format!("invalid environment variable name {key:?}"));
        }
        if value.contains('\0') {
            return Err(format!("environment variable {key:?} holds a NUL byte"));
        }
    }
    Ok(())
}

/// A command to run. The service has already turned shell/argv modes into a
/// plain argv, so providers never parse shell syntax.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Working directory inside the sandbox; `None` means the runtime default.
    pub workdir: Option<String>,
    /// The provider kills the command (and its children) when this elapses.
    pub timeout: Duration,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecExit {
    /// The process exited; a signal death is reported as 128 + signal.
    Exited(i32),
    /// The timeout elapsed and the provider killed the command.
    TimedOut,
}

/// How an exec ended, in words, for provider logs.
pub fn describe_exit(result: &ProviderResult<ExecExit>) -> String {
    match result {
        Ok(ExecExit::Exited(code)) => format!("exit {code}"),
        Ok(ExecExit::TimedOut) => "timed out".to_string(),
        Err(e) => format!("failed: {e}"),
    }
}

/// One directory entry or the answer to a stat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FileEntry {
    /// Absolute path inside the sandbox.
    pub path: String,
    pub name: String,
    pub size: u64,
    /// Permission bits in octal text, e.g. "644", as StacyVM clients expect.
    pub mode: String,
    pub is_dir: bool,
    /// RFC 3339 modification time.
    pub mod_time: String,
}

/// Resource usage of one runtime, when the provider can measure it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuntimeStats {
    pub supported: bool,
    pub cpu_pct: f64,
    pub mem_bytes: u64,
    pub mem_limit_bytes: u64,
    /// Processes in the runtime now, where the provider counts them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

/// What the runtime behind a handle is doing, as its provider sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RuntimeStatus {
    /// Alive and able to run commands.
    Running,
    /// It still exists but no longer runs: its init ended. `cause` says
    /// why in a user's words ("killed by the kernel OOM killer", "exited
    /// with code 137").
    Stopped { cause: String },
    /// Nothing exists behind the handle any more (removed from outside).
    Missing,
}

/// One runtime a provider holds for StacyVM, as listed by
/// [`Provider::inventory`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InventoryItem {
    /// The sandbox id the runtime was labelled or named with at spawn.
    pub sandbox_id: String,
    pub runtime_id: String,
    /// When the runtime was created, if the provider knows.
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether it runs. `Stopped` causes here may be terse; call
    /// [`Provider::inspect`] for the detailed cause.
    pub status: RuntimeStatus,
}

/// Features a provider may or may not have; listed by `/providers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Exec,
    ExecStream,
    Files,
    Logs,
    Stats,
    MemoryLimit,
    CpuLimit,
    NetworkIsolation,
    /// Spawns restore from a snapshot of a booted VM of the same image
    /// and shape (microVMs that support it).
    SnapshotRestore,
}

/// Everything that can go wrong inside a provider. The service maps these to
/// API errors; the `Display` text is what a client will read, so it says what
/// went wrong in the caller's terms.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The image is not available and could not be obtained.
    #[error("image {image:?} is not available: {reason}")]
    ImageNotFound { image: String, reason: String },
    /// The runtime behind the handle is gone (removed, never existed).
    #[error("runtime {0} not found")]
    RuntimeNotFound(String),
    /// A path inside the sandbox does not exist.
    #[error("no such file or directory: {0}")]
    FileNotFound(String),
    /// The request is invalid for this provider (bad path, bad mode, not a
    /// directory, ...).
    #[error("{0}")]
    InvalidRequest(String),
    /// The operation is not supported by this provider.
    #[error("provider {provider} does not support {operation}")]
    Unsupported {
        provider: &'static str,
        operation: &'static str,
    },
    /// The runtime is in a state the operation cannot act on (stopped,
    /// being removed).
    #[error("{0}")]
    Conflict(String),
    /// The runtime backend cannot be reached (daemon down, binary missing).
    #[error("{0}")]
    Unavailable(String),
    /// The operation carried a lease generation older than the newest the
    /// worker has seen: its sender no longer manages the runtime.
    #[error("fenced off: {0}")]
    Fenced(String),
    /// Anything else: an unexpected runtime failure.
    #[error("{0}")]
    Runtime(String),
}

pub type ProviderResult<T> = Result<T, ProviderError>;

/// The provider contract from the architecture reference: spawn, exec,
/// stream, files, destroy, health, logs.
///
/// Every method may be called concurrently for different runtimes; an
/// implementation holds no lock across runtime calls.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The stable name clients use to pick this provider (`docker`, `native`, ...).
    fn name(&self) -> &'static str;

    /// What this provider can do.
    fn capabilities(&self) -> Vec<Capability>;

    /// What a sandbox of this provider is isolated by, in one sentence
    /// for operators (`GET /api/v1/providers`, GraphQL `providers`).
    fn isolation(&self) -> &'static str;

    /// Is the backend usable right now? `Err` carries the reason.
    async fn health(&self) -> ProviderResult<()>;

    /// Is this image available to spawn from (locally, or obtainable)?
    /// Spawn checks again; this exists so admission can refuse early.
    async fn image_available(&self, image: &str) -> ProviderResult<bool>;

    /// Create and start an isolated runtime. On error nothing is left behind.
    async fn spawn(&self, spec: &SpawnSpec) -> ProviderResult<RuntimeHandle>;

    /// Tear the runtime down. Idempotent: a runtime that is already gone is
    /// not an error.
    async fn destroy(&self, runtime_id: &str) -> ProviderResult<()>;

    /// Destroys whatever runtime exists for `sandbox_id` when its handle was
    /// never recorded (a spawn interrupted by a crash). Idempotent. The
    /// default suits providers whose runtime id is the sandbox id.
    async fn destroy_by_sandbox_id(&self, sandbox_id: &str) -> ProviderResult<()> {
        self.destroy(sandbox_id).await
    }

    /// What the runtime behind `runtime_id` is doing now. A cheap,
    /// provider-specific check: the reconciler calls it for runtimes its
    /// inventory reports as not running, to learn why.
    async fn inspect(&self, runtime_id: &str) -> ProviderResult<RuntimeStatus>;

    /// Every runtime this provider holds for StacyVM (containers labelled
    /// with a sandbox id, sandbox directories), whatever their state. The
    /// reconciler compares it with the store.
    async fn inventory(&self) -> ProviderResult<Vec<InventoryItem>>;

    /// Brings the provider's own state back to something the reconciler
    /// can judge after the previous process ended: removes what interrupted
    /// operations left behind (half-built or half-deleted directories) and
    /// upgrades runtimes made by an older version. Called once at start-up,
    /// before any spawn can be in flight. Returns how many things it fixed.
    async fn recover_at_startup(&self) -> ProviderResult<usize> {
        Ok(0)
    }

    /// Run a command, sending output to `sink` as it is produced, and return
    /// how it ended. On timeout the provider kills the command and its
    /// children before returning.
    async fn exec(
        &self,
        runtime_id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> ProviderResult<ExecExit>;

    /// Runs a command on a terminal (a PTY in the sandbox): what it prints
    /// comes to `sink` as stdout, `terminal.input` goes to it. Dropping the
    /// future kills it and what it started.
    async fn exec_terminal(
        &self,
        _runtime_id: &str,
        _spec: &ExecSpec,
        _terminal: Terminal,
        _sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        Err(ProviderError::Unsupported {
            provider: self.name(),
            operation: "terminals",
        })
    }

    /// Write a file, creating parent directories. `mode` is the permission bits.
    async fn write_file(
        &self,
        runtime_id: &str,
        path: &str,
        content: Bytes,
        mode: u32,
    ) -> ProviderResult<()>;

    /// Read a whole file.
    async fn read_file(&self, runtime_id: &str, path: &str) -> ProviderResult<Bytes>;

    /// List a directory (not recursive), sorted by name.
    async fn list_files(&self, runtime_id: &str, path: &str) -> ProviderResult<Vec<FileEntry>>;

    /// Describe one file or directory.
    async fn stat_file(&self, runtime_id: &str, path: &str) -> ProviderResult<FileEntry>;

    /// Rename a file or directory.
    async fn move_file(&self, runtime_id: &str, from: &str, to: &str) -> ProviderResult<()>;

    /// Change permission bits.
    async fn chmod_file(&self, runtime_id: &str, path: &str, mode: u32) -> ProviderResult<()>;

    /// Delete a file, or a directory (non-empty only with `recursive`).
    async fn delete_file(
        &self,
        runtime_id: &str,
        path: &str,
        recursive: bool,
    ) -> ProviderResult<()>;

    /// Absolute paths matching a shell glob pattern, sorted.
    async fn glob_files(&self, runtime_id: &str, pattern: &str) -> ProviderResult<Vec<String>>;

    /// The last `lines` lines of the runtime's diagnostics.
    async fn logs(&self, runtime_id: &str, lines: usize) -> ProviderResult<Vec<String>>;

    /// Resource usage, or `supported: false`.
    async fn stats(&self, _runtime_id: &str) -> ProviderResult<RuntimeStats> {
        Ok(RuntimeStats::default())
    }

    /// Checks of the host this provider needs beyond its health (KVM for
    /// the microVMs), for `stacyvm certify`.
    async fn host_checks(&self) -> Vec<certify::Check> {
        Vec::new()
    }
}

/// Refuses a runtime id that is not a plain name, for providers that use
/// it as a path component (a sandbox's directory).
pub(crate) fn check_runtime_id(id: &str) -> ProviderResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(ProviderError::InvalidRequest(format!(
            "invalid sandbox id {id:?}"
        )));
    }
    Ok(())
}

/// Lines kept per runtime for `logs`.
const LOG_CAPACITY: usize = 200;

/// The lifecycle lines a provider keeps per runtime in memory (spawned,
/// each exec and how it ended), stamped, at most [`LOG_CAPACITY`] each:
/// what `logs` answers for runtimes that have no log of their own.
#[derive(Debug, Default)]
pub(crate) struct RuntimeLogs(
    std::sync::Mutex<std::collections::HashMap<String, std::collections::VecDeque<String>>>,
);

impl RuntimeLogs {
    fn lines(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<String, std::collections::VecDeque<String>>,
    > {
        // Plain inserts and removes: a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn log(&self, id: &str, line: String) {
        let stamped = format!(
            "{} {line}",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        );
        let mut logs = self.lines();
        let log = logs.entry(id.to_string()).or_default();
        if log.len() == LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(stamped);
    }

    /// The last `lines` lines of `id`.
    pub(crate) fn tail(&self, id: &str, lines: usize) -> Vec<String> {
        let logs = self.lines();
        let Some(log) = logs.get(id) else {
            return Vec::new();
        };
        log.iter()
            .skip(log.len().saturating_sub(lines))
            .cloned()
            .collect()
    }

    pub(crate) fn forget(&self, id: &str) {
        self.lines().remove(id);
    }
}

/// An HTTP answer's body, at most `limit` bytes (`who` names the peer in
/// the error): a peer cannot make StacyVM buffer more than it expects.
pub(crate) async fn read_capped(
    resp: reqwest::Response,
    limit: usize,
    who: &str,
) -> ProviderResult<Vec<u8>> {
    use futures::StreamExt;
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(part) = stream.next().await {
        let part =
            part.map_err(|e| ProviderError::Unavailable(format!("{who} unreachable: {e}")))?;
        if body.len() + part.len() > limit {
            return Err(ProviderError::Runtime(format!(
                "{who} sent an answer over {} MiB",
                limit >> 20
            )));
        }
        body.extend_from_slice(&part);
    }
    Ok(body)
}

/// Best-effort work (cleanup of what a failed step left, a goodbye to a
/// peer): its failure never fails the caller, and is logged, at `warn`
/// for cleanups that leave something behind.
pub(crate) fn best_effort<T, E: std::fmt::Display>(what: &str, result: Result<T, E>) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "{what} failed (best effort)");
    }
}

/// Like [`best_effort`] for signals and messages to processes and peers
/// that may be gone already, which is no news: logged at `debug`.
pub(crate) fn best_effort_quiet<T, E: std::fmt::Display>(what: &str, result: Result<T, E>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "{what} failed (best effort; it may be gone already)");
    }
}
