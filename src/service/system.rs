//! Server-wide views: health, readiness, providers, workers, quotas, and a
//! sandbox's logs and resource usage.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Error, Result, Service};
use crate::auth::Caller;
use crate::provider::{Capability, RuntimeStats};
use crate::store::QuotaSummary;

/// `/health`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HealthReport {
    pub status: &'static str,
    pub version: &'static str,
    /// Go duration string.
    pub uptime: String,
    /// This replica's id (several `serve` processes may share a database).
    pub replica_id: String,
    /// Whether this replica runs the background work (reaper, reconciler).
    pub leader: bool,
}

/// One provider and its last health check.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ProviderStatus {
    pub name: String,
    pub healthy: bool,
    pub default: bool,
    pub latency_ms: u64,
    #[schema(required = true)]
    pub last_checked: Option<DateTime<Utc>>,
    pub error: String,
    pub capabilities: Vec<Capability>,
    /// What a sandbox of this provider is isolated by.
    pub isolation: String,
    /// The last `stacyvm certify` of this provider on the host it runs on
    /// (the best one where several workers offer it); none if never run.
    #[schema(required = true)]
    pub certification: Option<crate::provider::certify::CertificationSummary>,
}

/// One worker.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WorkerStatus {
    pub id: String,
    pub hostname: String,
    pub status: String,
    pub providers: Vec<String>,
    pub capabilities: Vec<String>,
    pub capacity: i32,
    pub last_heartbeat: DateTime<Utc>,
    /// Not `online`: silent past `lifecycle.worker_stale_after`.
    pub stale: bool,
    /// What admins allow: active, cordoned or draining.
    pub admin_state: String,
    /// What the worker says it is (`--label`).
    pub labels: BTreeMap<String, String>,
    /// Its live sandboxes (a drain is done at 0); `None` where not counted.
    #[schema(required = true)]
    pub sandboxes: Option<u64>,
}

impl WorkerStatus {
    /// What `caller` may see of a worker: its host's name is for admins
    /// (it names the machines behind the service); the rest (state,
    /// providers, labels a template may ask for) is for every caller.
    pub fn seen_by(mut self, caller: &Caller) -> WorkerStatus {
        if !caller.is_admin() {
            self.hostname = String::new();
        }
        self
    }
}

impl From<entity::worker::Model> for WorkerStatus {
    fn from(w: entity::worker::Model) -> Self {
        let providers: Vec<String> = serde_json::from_value(w.providers).unwrap_or_default();
        WorkerStatus {
            admin_state: w.admin_state,
            labels: serde_json::from_str(&w.labels).unwrap_or_default(),
            sandboxes: None,
            // Set by the reconciler from `lifecycle.worker_stale_after`.
            stale: w.status != crate::worker::WorkerState::Online.as_str(),
            capabilities: providers.clone(),
            providers,
            id: w.id,
            hostname: w.hostname,
            status: w.status,
            capacity: w.capacity,
            last_heartbeat: w.last_heartbeat,
        }
    }
}

/// Most log lines one request may ask for.
const MAX_LOG_LINES: usize = 10_000;

impl Service {
    pub fn health(&self) -> HealthReport {
        let uptime = self.inner.started_at.elapsed();
        HealthReport {
            status: "ok",
            version: env!("CARGO_PKG_VERSION"),
            uptime: crate::duration::format(std::time::Duration::from_secs(uptime.as_secs())),
            replica_id: self.replica_id().to_string(),
            leader: self.is_leader(),
        }
    }

    /// Ready when the server is not shutting down, the store answers and
    /// the default provider (where a spawn without a provider goes) is
    /// healthy.
    pub async fn ready(&self) -> Result<()> {
        self.refuse_if_draining()?;
        // Not ready while the database does not answer (quickly).
        match tokio::time::timeout(std::time::Duration::from_secs(2), self.store().ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Error::Unavailable(format!(
                    "the database does not answer: {e}"
                )));
            }
            Err(_) => {
                return Err(Error::Unavailable(
                    "the database did not answer within 2 s".into(),
                ));
            }
        }
        let default = self.scheduler().default_provider();
        let mut reason = None;
        for worker in self.scheduler().live_workers() {
            match worker
                .snapshot()
                .provider(default)
                .map(|p| p.health.clone())
            {
                Some(Some(h)) if h.healthy => return Ok(()),
                Some(Some(h)) => {
                    reason.get_or_insert(format!(
                        "provider {default} is unavailable: {}",
                        h.error.unwrap_or_else(|| "unhealthy".into())
                    ));
                }
                Some(None) => {
                    reason.get_or_insert(format!("provider {default} has not been checked yet"));
                }
                None => {}
            }
        }
        Err(Error::Unavailable(reason.unwrap_or_else(|| {
            format!("no worker offers the default provider {default}")
        })))
    }

    /// Every provider with its last health check: one entry per name,
    /// healthy when it is healthy on some worker.
    pub fn providers(&self) -> Vec<ProviderStatus> {
        let default = self.scheduler().default_provider();
        let mut by_name: BTreeMap<String, ProviderStatus> = BTreeMap::new();
        for worker in self.scheduler().live_workers() {
            for p in worker.snapshot().providers {
                let health = p.health.as_ref();
                let status = ProviderStatus {
                    name: p.name.clone(),
                    healthy: health.is_some_and(|h| h.healthy),
                    default: p.name == default,
                    latency_ms: health.map_or(0, |h| h.latency.as_millis() as u64),
                    last_checked: health.map(|h| h.checked_at),
                    error: health.and_then(|h| h.error.clone()).unwrap_or_default(),
                    capabilities: p.capabilities.clone(),
                    isolation: p.isolation.clone(),
                    certification: p.certification.clone(),
                };
                match by_name.get(&p.name) {
                    Some(known) if known.healthy || !status.healthy => {}
                    _ => {
                        by_name.insert(p.name, status);
                    }
                }
            }
        }
        by_name.into_values().collect()
    }

    /// Probes every provider of every worker now; a name is healthy when
    /// it is healthy on some worker.
    pub async fn test_providers(&self) -> BTreeMap<String, bool> {
        let mut healthy = BTreeMap::new();
        for worker in self.scheduler().live_workers() {
            let results = worker.check_health().await;
            crate::worker::record_health(self.store(), &results).await;
            for (name, h) in results {
                *healthy.entry(name).or_insert(false) |= h.healthy;
            }
        }
        healthy
    }

    /// The workers, as `caller` may see them.
    pub async fn workers(&self, caller: &Caller) -> Result<Vec<WorkerStatus>> {
        Ok(self
            .all_workers()
            .await?
            .into_iter()
            .map(|w| w.seen_by(caller))
            .collect())
    }

    pub(super) async fn all_workers(&self) -> Result<Vec<WorkerStatus>> {
        let counts = self.store().live_sandboxes_per_worker().await?;
        Ok(self
            .store()
            .list_workers()
            .await?
            .into_iter()
            .map(|w| {
                let sandboxes = counts.get(&w.id).copied().unwrap_or(0);
                WorkerStatus {
                    sandboxes: Some(sandboxes),
                    ..WorkerStatus::from(w)
                }
            })
            .collect())
    }

    /// Workers with admin detail (the admin route).
    pub async fn admin_workers(&self, caller: &Caller) -> Result<Vec<WorkerStatus>> {
        self.require_admin(caller)?;
        self.all_workers().await
    }

    /// Counts of quota overrides: over every owner for admins, over the
    /// tenant's owners for operators, over the caller's own record for
    /// anyone else.
    pub async fn quota_summary(&self, caller: &Caller) -> Result<QuotaSummary> {
        let scope = if caller.is_admin() {
            crate::store::OwnerScope::All
        } else if caller.may_act_for_others() {
            crate::store::OwnerScope::Tenant(&caller.tenant_id)
        } else {
            crate::store::OwnerScope::Owner(&caller.tenant_id, &caller.owner_id)
        };
        Ok(self.store().quota_summary(scope).await?)
    }

    /// The last `lines` lines of a sandbox's diagnostics.
    pub async fn sandbox_logs(
        &self,
        caller: &Caller,
        id: &str,
        lines: usize,
    ) -> Result<Vec<String>> {
        if lines == 0 || lines > MAX_LOG_LINES {
            return Err(Error::BadRequest(format!(
                "lines must be between 1 and {MAX_LOG_LINES}"
            )));
        }
        let (_, worker, runtime) = self.sandbox_runtime(caller, id).await?;
        Ok(worker.logs(&runtime, lines).await?)
    }

    /// Resource usage of a sandbox, when its provider can measure it.
    pub async fn sandbox_stats(&self, caller: &Caller, id: &str) -> Result<RuntimeStats> {
        let (_, worker, runtime) = self.sandbox_runtime(caller, id).await?;
        Ok(worker.stats(&runtime).await?)
    }
}
