//! The worker that runs inside the server process: the providers in
//! process, their health cached between checks.

use crate::provider::certify::CertificationSummary;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::fence::{Fence, Operation};
use super::{
    ProviderHealth, ProviderInfo, RuntimeCall, RuntimeRef, RuntimeReply, Worker, WorkerResult,
    WorkerSnapshot, record_health,
};
use crate::provider::{
    ExecExit, ExecSpec, InventoryItem, OutputSink, Provider, ProviderError, RuntimeHandle,
    SpawnSpec,
};
use crate::store::Store;

/// How long one provider health probe may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// The outcome of one sandbox's spawn, shared by its retries.
type SpawnCell = Arc<tokio::sync::OnceCell<WorkerResult<RuntimeHandle>>>;

/// The worker inside the server process.
pub struct LocalWorker {
    id: String,
    /// The installation's instance id (`data_dir/instance_id`).
    instance: String,
    hostname: String,
    providers: BTreeMap<String, Arc<dyn Provider>>,
    health: RwLock<BTreeMap<String, ProviderHealth>>,
    max_vcpus: u32,
    /// The host's memory in MiB (0 when /proc/meminfo cannot be read).
    memory_mb: u64,
    labels: BTreeMap<String, String>,
    max_sandboxes: u32,
    fence: Fence,
    /// Spawns in flight or done, by sandbox id, until the sandbox is
    /// destroyed: a retried spawn waits for (or returns) the first one's
    /// runtime. Bounded by the live sandboxes.
    spawns: Mutex<HashMap<String, SpawnCell>>,
    /// The data dir whose `certification.json` (`stacyvm certify`) is read
    /// at each health check, and what it held.
    certified_in: Option<std::path::PathBuf>,
    certifications: RwLock<BTreeMap<String, CertificationSummary>>,
}

impl LocalWorker {
    /// A worker over `providers`. Its id comes from the installation's
    /// instance id (`data_dir/instance_id`), so it is stable across
    /// restarts and two servers on one host never share it.
    pub fn new(instance: &str, providers: Vec<Arc<dyn Provider>>) -> LocalWorker {
        let max_vcpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        LocalWorker {
            id: Self::id_for(instance),
            instance: instance.to_string(),
            hostname: hostname(),
            providers: providers
                .into_iter()
                .map(|p| (p.name().to_string(), p))
                .collect(),
            health: RwLock::new(BTreeMap::new()),
            max_vcpus,
            memory_mb: host_memory_mb(),
            labels: BTreeMap::new(),
            max_sandboxes: 0,
            fence: Fence::in_memory(),
            spawns: Mutex::new(HashMap::new()),
            certified_in: None,
            certifications: RwLock::new(BTreeMap::new()),
        }
    }

    /// The same worker reporting the certifications `stacyvm certify`
    /// keeps in `data_dir`.
    pub fn with_certifications(mut self, data_dir: &std::path::Path) -> LocalWorker {
        self.certified_in = Some(data_dir.to_path_buf());
        self
    }

    /// The same worker describing itself with `labels`.
    pub fn with_labels(mut self, labels: BTreeMap<String, String>) -> LocalWorker {
        self.labels = labels;
        self
    }

    /// The same worker taking at most `max` live sandboxes (0: no limit).
    pub fn with_max_sandboxes(mut self, max: u32) -> LocalWorker {
        self.max_sandboxes = max;
        self
    }

    /// The same worker keeping its lease fence in `fence` (its data dir),
    /// so that it survives restarts.
    pub fn with_fence(mut self, fence: Fence) -> LocalWorker {
        self.fence = fence;
        self
    }

    fn spawns(&self) -> std::sync::MutexGuard<'_, HashMap<String, SpawnCell>> {
        match self.spawns.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A runtime a previous process of this worker made for `sandbox_id`.
    async fn existing_runtime(
        &self,
        provider: &dyn Provider,
        sandbox_id: &str,
    ) -> WorkerResult<Option<RuntimeHandle>> {
        Ok(provider
            .inventory()
            .await?
            .into_iter()
            .find(|item| item.sandbox_id == sandbox_id)
            .map(|item| RuntimeHandle {
                runtime_id: item.runtime_id,
            }))
    }

    /// The installation this worker runs from.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The same worker under an explicit id (`stacyvm worker --id`).
    pub fn with_id(mut self, id: &str) -> LocalWorker {
        self.id = id.to_string();
        self
    }

    /// The local worker id of installation `instance`.
    pub fn id_for(instance: &str) -> String {
        format!("wk-local-{}", instance.trim_start_matches("in-"))
    }

    /// The id local workers had before it came from the instance id (the
    /// host name), for records written by those versions.
    pub fn legacy_id() -> String {
        format!("wk-local-{}", hostname())
    }

    fn provider(&self, name: &str) -> WorkerResult<&Arc<dyn Provider>> {
        self.providers.get(name).ok_or_else(|| {
            ProviderError::Unavailable(format!(
                "provider {name} is not configured on worker {}",
                self.id
            ))
        })
    }

    fn health_of(&self, name: &str) -> Option<ProviderHealth> {
        self.health.read().ok()?.get(name).cloned()
    }

    /// Registers this worker in the store.
    pub async fn register(&self, store: &Store) -> Result<(), crate::store::StoreError> {
        let now = Utc::now();
        store
            .upsert_worker(entity::worker::Model {
                id: self.id.clone(),
                hostname: self.hostname.clone(),
                endpoint: "local".into(),
                status: "online".into(),
                providers: serde_json::json!(self.providers.keys().collect::<Vec<_>>()),
                capacity: 0,
                last_heartbeat: now,
                created_at: now,
                admin_state: super::AdminState::Active.as_str().into(),
                labels: "{}".into(),
                snapshot: String::new(),
                instance: self.instance.clone(),
            })
            .await
    }

    /// Heartbeats and provider health checks until `shutdown` fires.
    pub async fn run(
        self: Arc<Self>,
        store: Store,
        heartbeat_every: Duration,
        health_every: Duration,
        shutdown: CancellationToken,
    ) {
        let mut heartbeat = crate::ticker::every(heartbeat_every);
        let mut health = crate::ticker::every(health_every);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = heartbeat.tick() => {
                    if let Err(e) = store.worker_heartbeat(&self.id, Utc::now()).await {
                        tracing::warn!(error = %e, "worker heartbeat failed");
                    }
                }
                _ = health.tick() => {
                    let results = self.check_health().await;
                    record_health(&store, &results).await;
                }
            }
        }
    }
}

/// `MemTotal` of /proc/meminfo in MiB; 0 when it cannot be read.
fn host_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib / 1024)
        })
        .unwrap_or(0)
}

/// This host's name.
pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

#[async_trait]
impl Worker for LocalWorker {
    fn id(&self) -> &str {
        &self.id
    }

    fn hostname(&self) -> &str {
        &self.hostname
    }

    fn in_process(&self) -> bool {
        true
    }

    fn snapshot(&self) -> WorkerSnapshot {
        WorkerSnapshot {
            providers: self
                .providers
                .values()
                .map(|p| ProviderInfo {
                    name: p.name().to_string(),
                    capabilities: p.capabilities(),
                    isolation: p.isolation().to_string(),
                    health: self.health_of(p.name()),
                    certification: self
                        .certifications
                        .read()
                        .ok()
                        .and_then(|c| c.get(p.name()).cloned()),
                })
                .collect(),
            max_vcpus: self.max_vcpus,
            memory_mb: self.memory_mb,
            labels: self.labels.clone(),
            max_sandboxes: self.max_sandboxes,
        }
    }

    async fn check_health(&self) -> BTreeMap<String, ProviderHealth> {
        let checks = self.providers.iter().map(|(name, provider)| async move {
            let started = Instant::now();
            let result = tokio::time::timeout(HEALTH_TIMEOUT, provider.health()).await;
            let error = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!(
                    "health check timed out after {}s",
                    HEALTH_TIMEOUT.as_secs()
                )),
            };
            let health = ProviderHealth {
                healthy: error.is_none(),
                error,
                latency: started.elapsed(),
                checked_at: Utc::now(),
            };
            (name.clone(), health)
        });
        let results: BTreeMap<_, _> = futures::future::join_all(checks)
            .await
            .into_iter()
            .collect();
        for (name, health) in &results {
            let previous = self.health_of(name);
            if previous.as_ref().map(|p| p.healthy) != Some(health.healthy) {
                match &health.error {
                    None => tracing::info!(provider = %name, "provider healthy"),
                    Some(e) => tracing::warn!(provider = %name, error = %e, "provider unhealthy"),
                }
            }
        }
        if let Ok(mut cache) = self.health.write() {
            cache.extend(results.clone());
        }
        if let Some(dir) = &self.certified_in {
            let found = crate::provider::certify::load(dir)
                .iter()
                .map(|(name, c)| (name.clone(), CertificationSummary::from(c)))
                .collect();
            if let Ok(mut certifications) = self.certifications.write() {
                *certifications = found;
            }
        }
        results
    }

    async fn recover_at_startup(&self) -> WorkerResult<usize> {
        let mut fixed = 0;
        for provider in self.providers.values() {
            match provider.recover_at_startup().await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(
                        provider = provider.name(),
                        fixed = n,
                        "recovered provider state left by the previous process"
                    );
                    fixed += n;
                }
                // One provider's failure does not stop the others'.
                Err(e) => {
                    tracing::warn!(provider = provider.name(), error = %e, "provider start-up recovery failed")
                }
            }
        }
        Ok(fixed)
    }

    async fn image_available(&self, provider: &str, image: &str) -> WorkerResult<bool> {
        self.provider(provider)?.image_available(image).await
    }

    async fn spawn(
        &self,
        provider: &str,
        spec: &SpawnSpec,
        lease: u64,
    ) -> WorkerResult<RuntimeHandle> {
        let p = self.provider(provider)?;
        let seen_before = self
            .fence
            .admit(&spec.sandbox_id, lease, Operation::Spawn)?;
        let (cell, first) = {
            let mut spawns = self.spawns();
            match spawns.get(&spec.sandbox_id) {
                Some(cell) => (cell.clone(), false),
                None => {
                    let cell = SpawnCell::default();
                    spawns.insert(spec.sandbox_id.clone(), cell.clone());
                    (cell, true)
                }
            }
        };
        let result = cell
            .get_or_init(|| async {
                // A retry reaching a restarted worker: the first attempt's
                // runtime may exist already.
                if first
                    && seen_before
                    && let Some(handle) =
                        self.existing_runtime(p.as_ref(), &spec.sandbox_id).await?
                {
                    tracing::info!(sandbox = %spec.sandbox_id, "retried spawn: the runtime exists already");
                    return Ok(handle);
                }
                p.spawn(spec).await
            })
            .await
            .clone();
        if result.is_err() {
            // A failed spawn may be tried again.
            let mut spawns = self.spawns();
            if spawns
                .get(&spec.sandbox_id)
                .is_some_and(|c| Arc::ptr_eq(c, &cell))
            {
                spawns.remove(&spec.sandbox_id);
            }
        }
        result
    }

    async fn inventory(&self, provider: &str) -> WorkerResult<Vec<InventoryItem>> {
        self.provider(provider)?.inventory().await
    }

    async fn exec(
        &self,
        runtime: &RuntimeRef,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> WorkerResult<ExecExit> {
        let handle = handle(runtime)?;
        let p = self.provider(&runtime.provider)?;
        self.fence
            .admit(&runtime.sandbox_id, runtime.lease, Operation::Runtime)?;
        p.exec(handle, spec, sink).await
    }

    async fn exec_terminal(
        &self,
        runtime: &RuntimeRef,
        spec: &ExecSpec,
        terminal: crate::provider::Terminal,
        sink: OutputSink,
    ) -> WorkerResult<ExecExit> {
        let handle = handle(runtime)?;
        let p = self.provider(&runtime.provider)?;
        self.fence
            .admit(&runtime.sandbox_id, runtime.lease, Operation::Runtime)?;
        p.exec_terminal(handle, spec, terminal, sink).await
    }

    async fn call(&self, runtime: &RuntimeRef, call: RuntimeCall) -> WorkerResult<RuntimeReply> {
        let p = self.provider(&runtime.provider)?;
        self.fence
            .admit(&runtime.sandbox_id, runtime.lease, Operation::Runtime)?;
        let h = || handle(runtime);
        Ok(match call {
            RuntimeCall::Destroy => {
                match &runtime.runtime_id {
                    // No handle was recorded (the spawn failed, or the
                    // server died mid-spawn): remove whatever exists under
                    // the sandbox id.
                    None => p.destroy_by_sandbox_id(&runtime.sandbox_id).await?,
                    Some(handle) => p.destroy(handle).await?,
                }
                self.fence.retire(&runtime.sandbox_id, runtime.lease);
                self.spawns().remove(&runtime.sandbox_id);
                RuntimeReply::Done
            }
            RuntimeCall::Inspect => RuntimeReply::Status(p.inspect(h()?).await?),
            RuntimeCall::WriteFile {
                path,
                content,
                mode,
            } => {
                p.write_file(h()?, &path, content, mode).await?;
                RuntimeReply::Done
            }
            RuntimeCall::ReadFile { path } => RuntimeReply::Bytes(p.read_file(h()?, &path).await?),
            RuntimeCall::ListFiles { path } => {
                RuntimeReply::Entries(p.list_files(h()?, &path).await?)
            }
            RuntimeCall::StatFile { path } => RuntimeReply::Entry(p.stat_file(h()?, &path).await?),
            RuntimeCall::MoveFile { from, to } => {
                p.move_file(h()?, &from, &to).await?;
                RuntimeReply::Done
            }
            RuntimeCall::ChmodFile { path, mode } => {
                p.chmod_file(h()?, &path, mode).await?;
                RuntimeReply::Done
            }
            RuntimeCall::DeleteFile { path, recursive } => {
                p.delete_file(h()?, &path, recursive).await?;
                RuntimeReply::Done
            }
            RuntimeCall::GlobFiles { pattern } => {
                RuntimeReply::Paths(p.glob_files(h()?, &pattern).await?)
            }
            RuntimeCall::Logs { lines } => RuntimeReply::Lines(p.logs(h()?, lines).await?),
            RuntimeCall::Stats => RuntimeReply::Stats(p.stats(h()?).await?),
        })
    }
}

/// The provider's handle of a runtime that must have one.
fn handle(runtime: &RuntimeRef) -> WorkerResult<&str> {
    runtime
        .runtime_id
        .as_deref()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| ProviderError::RuntimeNotFound(runtime.sandbox_id.clone()))
}
