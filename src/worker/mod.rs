//! The execution plane. A worker owns a set of providers and keeps their
//! health current. Today there is one worker, in the server process; remote
//! workers (`stacyvm worker`) will implement the same surface over RPC.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::provider::Provider;
use crate::store::Store;

/// The last health check of one provider.
#[derive(Debug, Clone)]
pub struct ProviderHealth {
    pub healthy: bool,
    pub error: Option<String>,
    pub latency: Duration,
    pub checked_at: DateTime<Utc>,
}

/// The worker that runs inside the server process.
pub struct LocalWorker {
    pub id: String,
    pub hostname: String,
    providers: BTreeMap<String, Arc<dyn Provider>>,
    health: RwLock<BTreeMap<String, ProviderHealth>>,
    /// CPUs of this host: a sandbox may not ask for more.
    pub max_vcpus: u32,
}

impl LocalWorker {
    /// A worker over `providers`; its id is stable across restarts of the
    /// same host so that records keep pointing at it.
    pub fn new(providers: Vec<Arc<dyn Provider>>) -> LocalWorker {
        let hostname = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        let max_vcpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        LocalWorker {
            id: format!("wk-local-{hostname}"),
            hostname,
            providers: providers
                .into_iter()
                .map(|p| (p.name().to_string(), p))
                .collect(),
            health: RwLock::new(BTreeMap::new()),
            max_vcpus,
        }
    }

    /// The provider called `name`, if this worker has it.
    pub fn provider(&self, name: &str) -> Option<Arc<dyn Provider>> {
        self.providers.get(name).cloned()
    }

    /// Every provider, by name.
    pub fn providers(&self) -> impl Iterator<Item = &Arc<dyn Provider>> {
        self.providers.values()
    }

    /// The last known health of `name`; `None` before the first check.
    pub fn health_of(&self, name: &str) -> Option<ProviderHealth> {
        self.health.read().ok()?.get(name).cloned()
    }

    /// Probes every provider now, records the results and returns them.
    pub async fn check_health(&self, store: &Store) -> BTreeMap<String, ProviderHealth> {
        let checks = self.providers.iter().map(|(name, provider)| async move {
            let started = Instant::now();
            let result = tokio::time::timeout(Duration::from_secs(5), provider.health()).await;
            let error = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("health check timed out after 5s".to_string()),
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
            let record = entity::provider::Model {
                name: name.clone(),
                healthy: health.healthy,
                latency_ms: health.latency.as_millis() as i64,
                error: health.error.clone(),
                last_checked: health.checked_at,
            };
            if let Err(e) = store.record_provider_health(record).await {
                tracing::warn!(provider = %name, error = %e, "cannot record provider health");
            }
        }
        if let Ok(mut cache) = self.health.write() {
            cache.extend(results.clone());
        }
        results
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
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        let mut health = tokio::time::interval(health_every);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = heartbeat.tick() => {
                    if let Err(e) = store.worker_heartbeat(&self.id, Utc::now()).await {
                        tracing::warn!(error = %e, "worker heartbeat failed");
                    }
                }
                _ = health.tick() => { self.check_health(&store).await; }
            }
        }
    }
}
