//! GraphQL object types, scalars and enums: wrappers over the service's
//! domain types, so the domain never depends on GraphQL.

use std::collections::BTreeMap;
use std::time::Duration;

use async_graphql::dataloader::DataLoader;
use async_graphql::{
    ComplexObject, Context, Enum, ID, InputValueError, InputValueResult, Json, Object, Scalar,
    ScalarType, SimpleObject, Union, Value,
};
use base64::Engine;
use chrono::{DateTime, Utc};

use super::errors::GqlResult;
use super::loaders::{AuditOf, ExecutionsOf, StoreLoader, TemplateNamed, WorkerId};
use crate::duration;
use crate::service::{self, OutputEvent};

/// A Go-style duration string ("30s", "1h30m", "127ms").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

#[Scalar(name = "Duration")]
impl ScalarType for GoDuration {
    fn parse(value: Value) -> InputValueResult<Self> {
        match &value {
            Value::String(s) => duration::parse(s)
                .map(GoDuration)
                .map_err(|e| InputValueError::custom(e.to_string())),
            _ => Err(InputValueError::expected_type(value)),
        }
    }

    fn to_value(&self) -> Value {
        Value::String(duration::format(self.0))
    }
}

/// Where a sandbox is in its life.
#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "crate::lifecycle::SandboxState")]
pub enum SandboxState {
    Creating,
    Running,
    Unhealthy,
    Expired,
    Destroying,
    Destroyed,
    Error,
}

/// Which output stream a chunk came from.
#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "crate::provider::StreamKind")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// How a command is run.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Default)]
pub enum ExecMode {
    /// `sh -c` with the arguments shell-quoted and appended.
    #[default]
    Shell,
    /// The command and arguments as they are, no shell.
    Argv,
}

/// A sandbox.
pub struct Sandbox(pub service::Sandbox);

/// A sandbox: an isolated runtime with a TTL.
#[Object]
impl Sandbox {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn state(&self) -> SandboxState {
        self.0.state.into()
    }
    /// Why the sandbox is in its state (set for errors).
    async fn state_reason(&self) -> Option<&str> {
        self.0.state_reason.as_deref()
    }
    async fn provider(&self) -> &str {
        &self.0.provider
    }
    async fn image(&self) -> &str {
        &self.0.image
    }
    async fn memory_mb(&self) -> u32 {
        self.0.memory_mb
    }
    async fn vcpus(&self) -> u32 {
        self.0.vcpus
    }
    async fn owner_id(&self) -> &str {
        &self.0.owner_id
    }
    async fn tenant_id(&self) -> &str {
        &self.0.tenant_id
    }
    async fn worker_id(&self) -> &str {
        &self.0.worker_id
    }
    async fn template_name(&self) -> Option<&str> {
        self.0.template.as_deref()
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn expires_at(&self) -> DateTime<Utc> {
        self.0.expires_at
    }
    /// Labels given at spawn, as a JSON object of strings.
    async fn metadata(&self) -> Json<BTreeMap<String, String>> {
        Json(self.0.metadata.clone())
    }
    async fn preview_domain(&self) -> &str {
        &self.0.preview_domain
    }
    /// The most recent executions (up to `last`, oldest first).
    async fn executions(
        &self,
        cx: &Context<'_>,
        #[graphql(default = 10, validator(minimum = 1, maximum = 100))] last: usize,
    ) -> async_graphql::Result<Vec<Execution>> {
        let loader = cx.data::<DataLoader<StoreLoader>>()?;
        let all = loader.load_one(ExecutionsOf(self.0.id.clone())).await?;
        let all = all.unwrap_or_default();
        let skip = all.len().saturating_sub(last);
        Ok(all
            .into_iter()
            .skip(skip)
            .map(|m| Execution(m.into()))
            .collect())
    }
    /// The worker that runs this sandbox.
    async fn worker(&self, cx: &Context<'_>) -> async_graphql::Result<Option<Worker>> {
        let loader = cx.data::<DataLoader<StoreLoader>>()?;
        let caller = cx.data::<crate::auth::Caller>()?;
        Ok(loader
            .load_one(WorkerId(self.0.worker_id.clone()))
            .await?
            .map(|m| Worker::from(service::WorkerStatus::from(m).seen_by(caller))))
    }
    /// The template this sandbox was spawned from.
    async fn template(&self, cx: &Context<'_>) -> async_graphql::Result<Option<Template>> {
        let Some(name) = &self.0.template else {
            return Ok(None);
        };
        let loader = cx.data::<DataLoader<StoreLoader>>()?;
        let model = loader
            .load_one(TemplateNamed(
                self.0.tenant_id.clone(),
                self.0.owner_id.clone(),
                name.clone(),
            ))
            .await?;
        let service = cx.data::<service::Service>()?;
        model
            .map(|m| service.template_view(m).map(Template).gql())
            .transpose()
    }
    /// Audit events about this sandbox, newest first.
    async fn audit_events(
        &self,
        cx: &Context<'_>,
        #[graphql(default = 20, validator(minimum = 1, maximum = 100))] last: usize,
    ) -> async_graphql::Result<Vec<AuditEvent>> {
        let loader = cx.data::<DataLoader<StoreLoader>>()?;
        let events = loader
            .load_one(AuditOf(self.0.id.clone()))
            .await?
            .unwrap_or_default();
        Ok(events.into_iter().take(last).map(AuditEvent).collect())
    }
}

/// One command run in a sandbox.
pub struct Execution(pub service::Execution);

#[Object]
impl Execution {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn sandbox_id(&self) -> ID {
        ID(self.0.sandbox_id.clone())
    }
    /// running, completed, timeout, failed or interrupted.
    async fn status(&self) -> &str {
        self.0.status.as_str()
    }
    async fn exit_code(&self) -> Option<i32> {
        self.0.exit_code
    }
    async fn duration(&self) -> Option<GoDuration> {
        self.0.duration.map(GoDuration)
    }
    async fn argv(&self) -> &[String] {
        &self.0.argv
    }
    /// The last bytes of stdout (bounded).
    async fn stdout_tail(&self) -> &str {
        &self.0.stdout_tail
    }
    /// The last bytes of stderr (bounded).
    async fn stderr_tail(&self) -> &str {
        &self.0.stderr_tail
    }
    async fn error(&self) -> Option<&str> {
        self.0.error.as_deref()
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn finished_at(&self) -> Option<DateTime<Utc>> {
        self.0.finished_at
    }
}

/// The answer of a command run to completion.
#[derive(SimpleObject)]
pub struct ExecResult {
    pub execution_id: ID,
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub duration: GoDuration,
    /// Output past the server's cap (`defaults.max_exec_output_bytes` per
    /// stream) was cut.
    pub truncated: bool,
}

/// A control-plane replica sharing the database.
#[derive(SimpleObject)]
pub struct Replica {
    pub id: ID,
    /// Where other replicas reach it (empty: they cannot).
    pub endpoint: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// Heard from within `cluster.replica_stale_after` and not stopped.
    pub alive: bool,
    /// Runs the background work.
    pub leader: bool,
}

impl From<crate::service::cluster::ReplicaStatus> for Replica {
    fn from(r: crate::service::cluster::ReplicaStatus) -> Self {
        Replica {
            id: ID(r.id),
            endpoint: r.endpoint,
            started_at: r.started_at,
            heartbeat_at: r.heartbeat_at,
            alive: r.alive,
            leader: r.leader,
        }
    }
}

/// A worker: where sandboxes run.
#[derive(SimpleObject)]
pub struct Worker {
    pub id: ID,
    pub hostname: String,
    pub status: String,
    pub providers: Vec<String>,
    pub capacity: i32,
    pub last_heartbeat: DateTime<Utc>,
    /// Not `online`: silent past `lifecycle.worker_stale_after`.
    pub stale: bool,
    /// What admins allow: active, cordoned or draining.
    pub admin_state: String,
    /// What the worker says it is (`--label`).
    pub labels: Json<BTreeMap<String, String>>,
    /// Its live sandboxes (a drain is done at 0); null where not counted
    /// (a sandbox's `worker`).
    pub sandboxes: Option<u64>,
}

impl From<service::WorkerStatus> for Worker {
    fn from(w: service::WorkerStatus) -> Self {
        Worker {
            id: ID(w.id),
            hostname: w.hostname,
            status: w.status,
            providers: w.providers,
            capacity: w.capacity,
            last_heartbeat: w.last_heartbeat,
            stale: w.stale,
            admin_state: w.admin_state,
            labels: Json(w.labels),
            sandboxes: w.sandboxes,
        }
    }
}

/// A runtime provider and its last health check.
#[derive(SimpleObject)]
pub struct Provider {
    pub name: String,
    pub healthy: bool,
    pub default: bool,
    pub latency_ms: u64,
    pub last_checked: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub capabilities: Vec<String>,
    /// What a sandbox of this provider is isolated by.
    pub isolation: String,
    /// Whether the last `stacyvm certify` on its host passed; null if it
    /// never ran.
    pub certified: Option<bool>,
    /// When that was.
    pub certified_at: Option<DateTime<Utc>>,
    /// The required checks that failed then (`spawn`, `network_isolation`, ...).
    pub certification_failed: Vec<String>,
}

impl From<service::ProviderStatus> for Provider {
    fn from(p: service::ProviderStatus) -> Self {
        Provider {
            capabilities: p
                .capabilities
                .iter()
                .map(|c| {
                    serde_json::to_value(c)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                })
                .collect(),
            error: (!p.error.is_empty()).then_some(p.error),
            certified: p.certification.as_ref().map(|c| c.certified),
            certified_at: p.certification.as_ref().map(|c| c.at),
            certification_failed: p
                .certification
                .iter()
                .flat_map(|c| c.failed.iter().map(|k| k.as_str().to_string()))
                .collect(),
            isolation: p.isolation,
            name: p.name,
            healthy: p.healthy,
            default: p.default,
            latency_ms: p.latency_ms,
            last_checked: p.last_checked,
        }
    }
}

/// A named sandbox recipe.
pub struct Template(pub service::Template);

#[Object]
impl Template {
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn image(&self) -> &str {
        &self.0.image
    }
    async fn memory_mb(&self) -> u32 {
        self.0.memory_mb
    }
    async fn vcpus(&self) -> u32 {
        self.0.vcpus
    }
    /// Writable disk in MiB.
    async fn disk_mb(&self) -> u32 {
        self.0.disk_mb
    }
    async fn ttl(&self) -> &str {
        &self.0.ttl
    }
    /// Empty means the default provider.
    async fn provider(&self) -> &str {
        &self.0.provider
    }
    async fn metadata(&self) -> Json<BTreeMap<String, String>> {
        Json(self.0.metadata.clone())
    }
    /// Labels a worker must carry to get this template's sandboxes.
    async fn worker_labels(&self) -> Json<BTreeMap<String, String>> {
        Json(self.0.worker_labels.clone())
    }
    /// How many sandboxes of this template are kept warm.
    async fn pool_size(&self) -> u32 {
        self.0.pool_size
    }
    async fn owner_id(&self) -> &str {
        &self.0.owner_id
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
}

/// Who did what to which target, and how it ended.
pub struct AuditEvent(pub crate::events::AuditRecord);

#[Object]
impl AuditEvent {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn actor(&self) -> &str {
        &self.0.actor
    }
    async fn tenant_id(&self) -> &str {
        &self.0.tenant_id
    }
    async fn action(&self) -> &str {
        &self.0.action
    }
    async fn target(&self) -> &str {
        &self.0.target
    }
    /// success or failure.
    async fn outcome(&self) -> &str {
        &self.0.outcome
    }
    async fn request_id(&self) -> &str {
        &self.0.request_id
    }
    async fn detail(&self) -> Option<&str> {
        self.0.detail.as_deref()
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

/// Server health.
#[derive(SimpleObject)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub uptime: String,
    /// The replica that answered.
    pub replica_id: String,
    /// Whether that replica runs the background work.
    pub leader: bool,
}

/// A piece of output. `data` is text that never splits a character;
/// `dataBase64` carries the exact bytes (binary output is not UTF-8).
#[derive(SimpleObject)]
#[graphql(complex)]
pub struct OutputChunk {
    pub seq: u64,
    pub stream: OutputStream,
    pub data: String,
    #[graphql(skip)]
    pub bytes: bytes::Bytes,
}

#[ComplexObject]
impl OutputChunk {
    async fn data_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.bytes)
    }
}

/// Chunks `fromSeq..toSeq` were dropped before this subscriber read them
/// (it fell behind the server's bounded buffer).
#[derive(SimpleObject)]
pub struct OutputTruncated {
    pub from_seq: u64,
    pub to_seq: u64,
}

/// How the command ended; always the last event.
#[derive(SimpleObject)]
pub struct ExecExit {
    pub exit_code: Option<i32>,
    pub duration: GoDuration,
    pub timed_out: bool,
    pub error: Option<String>,
}

/// One event of a command's output stream.
#[derive(Union)]
pub enum ExecEvent {
    OutputChunk(OutputChunk),
    OutputTruncated(OutputTruncated),
    ExecExit(ExecExit),
}

impl From<OutputEvent> for ExecEvent {
    fn from(e: OutputEvent) -> Self {
        match e {
            OutputEvent::Chunk(c) => ExecEvent::OutputChunk(OutputChunk {
                seq: c.seq,
                stream: c.stream.into(),
                data: c.text,
                bytes: c.bytes,
            }),
            OutputEvent::Truncated { from_seq, to_seq } => {
                ExecEvent::OutputTruncated(OutputTruncated { from_seq, to_seq })
            }
            OutputEvent::End(end) => ExecEvent::ExecExit(ExecExit {
                exit_code: end.exit_code,
                duration: GoDuration(end.duration),
                timed_out: end.timed_out,
                error: end.error,
            }),
        }
    }
}

/// A sandbox changed state.
#[derive(SimpleObject)]
pub struct SandboxEvent {
    pub sandbox_id: ID,
    pub owner_id: String,
    pub state: SandboxState,
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

/// An owner's quota overrides (0 / "" = not overridden).
#[derive(SimpleObject)]
pub struct QuotaPolicy {
    pub owner_id: String,
    pub max_sandboxes: u64,
    pub max_ttl: String,
    pub max_exec_timeout: String,
    /// Overrides of `defaults.max_memory_mb`, `max_vcpus`, `max_disk_mb`
    /// (0 = not overridden); the host still caps them.
    pub max_memory_mb: u32,
    pub max_vcpus: u32,
    pub max_disk_mb: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<service::QuotaPolicy> for QuotaPolicy {
    fn from(q: service::QuotaPolicy) -> Self {
        QuotaPolicy {
            owner_id: q.owner_id,
            max_sandboxes: q.max_sandboxes,
            max_ttl: q.max_ttl,
            max_exec_timeout: q.max_exec_timeout,
            max_memory_mb: q.max_memory_mb,
            max_vcpus: q.max_vcpus,
            max_disk_mb: q.max_disk_mb,
            created_at: q.created_at,
            updated_at: q.updated_at,
        }
    }
}

/// An owner's usage against its effective limits.
#[derive(SimpleObject)]
pub struct QuotaUsage {
    pub owner_id: String,
    pub active_sandboxes: u64,
    /// 0 = unlimited.
    pub max_sandboxes: u64,
    pub max_ttl: String,
    pub max_exec_timeout: String,
    pub quota_configured: bool,
}

impl From<service::QuotaUsage> for QuotaUsage {
    fn from(u: service::QuotaUsage) -> Self {
        QuotaUsage {
            owner_id: u.owner_id,
            active_sandboxes: u.active_sandboxes,
            max_sandboxes: u.max_sandboxes,
            max_ttl: u.max_ttl,
            max_exec_timeout: u.max_exec_timeout,
            quota_configured: u.quota_configured,
        }
    }
}

/// Warm pools the caller may see: sandboxes spawned ahead and handed out
/// on spawn.
#[derive(SimpleObject)]
pub struct PoolStatus {
    /// Whether any pool is kept.
    pub enabled: bool,
    /// The most warm sandboxes over all pools.
    pub max_warm: u32,
    pub warm: u32,
    pub creating: u32,
    pub hits: u64,
    pub misses: u64,
    pub pools: Vec<Pool>,
}

/// One warm pool.
#[derive(SimpleObject)]
pub struct Pool {
    /// The template; null for the pool of spawns without one.
    pub template: Option<String>,
    pub owner_id: Option<String>,
    pub provider: String,
    pub image: String,
    pub memory_mb: u32,
    pub vcpus: u32,
    /// How many it keeps warm.
    pub target: u32,
    /// Running and unclaimed now.
    pub warm: u32,
    /// Being spawned now.
    pub creating: u32,
    /// Spawns it served (on this replica, since it started).
    pub hits: u64,
    /// Spawns of its recipe that found it empty.
    pub misses: u64,
}

impl From<service::PoolStatus> for PoolStatus {
    fn from(s: service::PoolStatus) -> Self {
        PoolStatus {
            enabled: s.enabled,
            max_warm: s.max_warm,
            warm: s.warm,
            creating: s.creating,
            hits: s.hits,
            misses: s.misses,
            pools: s
                .pools
                .into_iter()
                .map(|p| Pool {
                    template: p.template,
                    owner_id: p.owner_id,
                    provider: p.provider,
                    image: p.image,
                    memory_mb: p.memory_mb,
                    vcpus: p.vcpus,
                    target: p.target,
                    warm: p.warm,
                    creating: p.creating,
                    hits: p.hits,
                    misses: p.misses,
                })
                .collect(),
        }
    }
}
