//! Warm pools: sandboxes spawned ahead of demand and handed out on spawn.
//!
//! A pool is a recipe (image, provider, size, worker labels: what makes
//! two unused sandboxes interchangeable) kept at a target size: the
//! defaults' pool (`pool.size`, for spawns naming no template) and one per
//! template with a `pool_size`. Its sandboxes are ordinary records owned by
//! `system` and marked with the pool's key; they count against nobody, are
//! listed to nobody and publish no events. A spawn whose plan resolves to
//! exactly a pool's recipe claims the oldest running one inside the same
//! admission step that would have inserted a record (so the caller's
//! quotas hold exactly as for a fresh spawn): one UPDATE gives it the
//! caller's owner, TTL (from now), metadata and idempotency key. The
//! caller then sees the events and audit of a fresh spawn. A miss spawns
//! as usual.
//!
//! The leader tops the pools up (`run_pools`), every `pool.refill_interval`
//! and right after each claim: warm sandboxes of a recipe no longer wanted
//! (a template changed, lost its pool or was deleted), beyond a pool's
//! target, older than `pool.max_age`, unhealthy or failed are destroyed;
//! then each pool short of its target gets new ones, within `pool.max_warm`
//! over all pools, with a backoff per pool after a failed spawn. At
//! shutdown the pools are drained.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use serde::Serialize;
use sha2::Digest;
use tokio_util::sync::CancellationToken;

use super::admission::Placed;
use super::sandboxes::{Recipe, RecipeAsk, SpawnPlan};
use super::{Result, Sandbox, Service};
use crate::auth::Caller;
use crate::config::Config;
use crate::lifecycle::SandboxState;
use crate::provider::SpawnSpec;

/// The owner (and tenant) of warm sandboxes: a name no caller can have.
const POOL_OWNER: &str = "system";
/// Warm sandboxes started at once by one pass.
const FILL_PARALLEL: usize = 4;
/// The longest wait before a pool whose spawns fail is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Pools whose hits and misses are counted at once (recipes asked of a
/// pool vary: each is a key until a pass forgets the ones not kept).
const MAX_COUNTED: usize = 256;

/// Which pool may serve a spawn.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum PoolOf {
    /// Spawns that name no template.
    Defaults,
    /// A template's own pool.
    Template {
        tenant_id: String,
        owner_id: String,
        name: String,
    },
}

impl PoolOf {
    /// The pool a spawn from `template` (or from none) may be served by,
    /// if that pool is kept.
    pub(super) fn for_spawn(
        config: &Config,
        template: Option<&entity::template::Model>,
    ) -> Option<PoolOf> {
        if config.pool.max_warm == 0 {
            return None;
        }
        match template {
            Some(t) if t.pool_size > 0 => Some(PoolOf::Template {
                tenant_id: t.tenant_id.clone(),
                owner_id: t.owner_id.clone(),
                name: t.name.clone(),
            }),
            Some(_) => None,
            None => (config.pool.size > 0).then_some(PoolOf::Defaults),
        }
    }
}

/// The key warm sandboxes of `pool` made to `recipe` carry: a template's
/// sandboxes never serve another's, and a changed recipe is a new pool.
fn pool_key(pool: &PoolOf, recipe: &Recipe, default_provider: &str) -> String {
    let mut recipe = recipe.clone();
    recipe
        .provider
        .get_or_insert_with(|| default_provider.to_string());
    let canonical = serde_json::to_vec(&(pool, &recipe)).unwrap_or_default();
    sha2::Sha256::digest(&canonical)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A pool the leader keeps, as this pass sees it.
#[derive(Debug, Clone)]
struct Wanted {
    of: PoolOf,
    recipe: Recipe,
    key: String,
    target: u32,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    hits: u64,
    misses: u64,
}

#[derive(Debug)]
struct Backoff {
    failures: u32,
    until: tokio::time::Instant,
}

/// What the pools remember in this process: hits and misses per pool, and
/// the backoff of pools whose spawns fail. Both are bounded by the pools
/// kept (each pass forgets the rest).
#[derive(Default)]
pub(super) struct PoolState {
    counters: Mutex<HashMap<String, Counters>>,
    backoff: Mutex<HashMap<String, Backoff>>,
    /// Wakes the filler after a claim.
    refill: tokio::sync::Notify,
}

impl PoolState {
    fn count(&self, key: &str, hit: bool) {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        if counters.len() >= MAX_COUNTED && !counters.contains_key(key) {
            return;
        }
        let c = counters.entry(key.to_string()).or_default();
        if hit {
            c.hits += 1;
        } else {
            c.misses += 1;
        }
    }

    fn counters(&self, key: &str) -> Counters {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        counters.get(key).copied().unwrap_or_default()
    }

    fn in_backoff(&self, key: &str, now: tokio::time::Instant) -> bool {
        let backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        backoff.get(key).is_some_and(|b| b.until > now)
    }

    fn failed(&self, key: &str, now: tokio::time::Instant) -> Duration {
        let mut backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        let b = backoff.entry(key.to_string()).or_insert(Backoff {
            failures: 0,
            until: now,
        });
        b.failures = b.failures.saturating_add(1);
        let wait = Duration::from_secs(1u64 << b.failures.min(6)).min(MAX_BACKOFF);
        b.until = now + wait;
        wait
    }

    fn succeeded(&self, key: &str) {
        let mut backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        backoff.remove(key);
    }

    /// Forgets pools no longer kept.
    fn retain(&self, keys: &[&str]) {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        counters.retain(|k, _| keys.contains(&k.as_str()));
        drop(counters);
        let mut backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        backoff.retain(|k, _| keys.contains(&k.as_str()));
    }
}

/// One pool as a caller sees it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PoolView {
    /// The template, or `None` for the defaults' pool.
    #[schema(required = true)]
    pub template: Option<String>,
    /// The template's owner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    pub provider: String,
    pub image: String,
    pub memory_mb: u32,
    pub vcpus: u32,
    /// How many the pool keeps warm.
    pub target: u32,
    /// Running and unclaimed now.
    pub warm: u32,
    /// Being spawned now.
    pub creating: u32,
    /// Spawns served from the pool (by this replica, since it started).
    pub hits: u64,
    /// Spawns of the pool's recipe that found it empty.
    pub misses: u64,
}

/// The pools a caller may see, and their totals.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PoolStatus {
    /// Whether any pool is kept.
    pub enabled: bool,
    pub max_warm: u32,
    pub warm: u32,
    pub creating: u32,
    pub hits: u64,
    pub misses: u64,
    pub pools: Vec<PoolView>,
}

/// What one pass of the filler did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolReport {
    pub spawned: usize,
    pub failed: usize,
    pub destroyed: usize,
}

impl Service {
    /// Hands the plan a warm sandbox of its pool, admitted exactly as a
    /// fresh spawn would be. `None`: no pool serves the plan, the pool is
    /// empty, or the caller is over a cap (the ordinary path then refuses
    /// or queues it with the precise reason).
    pub(super) async fn claim_warm(&self, plan: &SpawnPlan) -> Result<Option<Sandbox>> {
        let Some(of) = &plan.pool else {
            return Ok(None);
        };
        let recipe = Recipe {
            image: plan.image.clone(),
            provider: plan.provider.clone(),
            memory_mb: plan.memory_mb,
            vcpus: plan.vcpus,
            disk_mb: plan.disk_mb,
            worker_labels: plan.worker_labels.clone(),
        };
        let key = pool_key(of, &recipe, self.scheduler().default_provider());
        let now = Utc::now();
        let claim = crate::store::PoolClaim {
            tenant_id: plan.tenant_id.clone(),
            owner_id: plan.owner_id.clone(),
            template: plan.template.clone(),
            metadata: serde_json::to_value(&plan.metadata)
                .map_err(|e| super::Error::internal(e.to_string()))?,
            created_at: now,
            expires_at: now
                + chrono::Duration::from_std(plan.ttl)
                    .map_err(|_| super::Error::BadRequest("ttl too large".into()))?,
            idempotency_key: plan.idempotency_key.clone(),
        };
        // Where a fresh spawn could be placed: fresh, schedulable workers.
        let workers: Vec<String> = self
            .scheduler()
            .workers()
            .iter()
            .filter(|w| {
                self.scheduler().is_fresh(w.as_ref())
                    && self.scheduler().admin_state(w.id()).schedulable()
            })
            .map(|w| w.id().to_string())
            .collect();
        let candidates = self.store().pool_candidates(&key, &workers).await?;
        if candidates.is_empty() {
            self.inner.pool.count(&key, false);
            self.inner.pool.refill.notify_one();
            return Ok(None);
        }
        let limits = self.limits_for(plan).await?;
        // Spawns waiting for a slot under a cap every owner shares keep
        // their turn: a claim would take the slot freed for the first.
        if limits.shared_cap() && self.inner.spawn_queue.waiting() > 0 {
            return Ok(None);
        }
        let claimed = {
            let _guard = self.inner.admission.lock().await;
            self.store()
                .claim_pooled(&key, candidates, &claim, |counts| {
                    let decision = self.decide(plan, Placed::Yes, &limits, counts);
                    if decision.allowed { Ok(()) } else { Err(()) }
                })
                // A reused idempotency key is a Conflict, as for an insert.
                .await?
        };
        let Ok(claimed) = claimed else {
            return Ok(None);
        };
        self.inner.pool.count(&key, claimed.is_some());
        self.inner.pool.refill.notify_one();
        let Some(model) = claimed else {
            return Ok(None);
        };
        // What a fresh spawn's watchers see.
        self.publish_state(&model, SandboxState::Creating, None);
        self.publish_state(&model, SandboxState::Running, None);
        self.to_sandbox(model).map(Some)
    }

    /// The pools kept now: the defaults' and every template's with a
    /// `pool_size`, each capped at `pool.max_warm`.
    async fn wanted_pools(&self) -> Result<Vec<Wanted>> {
        let pool = &self.config().pool;
        if pool.max_warm == 0 {
            return Ok(Vec::new());
        }
        let default_provider = self.scheduler().default_provider();
        let mut wanted = Vec::new();
        if pool.size > 0 {
            let recipe = self.recipe(None, RecipeAsk::default())?;
            wanted.push(Wanted {
                key: pool_key(&PoolOf::Defaults, &recipe, default_provider),
                of: PoolOf::Defaults,
                recipe,
                target: pool.size.min(pool.max_warm),
            });
        }
        for t in self.store().pooled_templates().await? {
            let of = PoolOf::Template {
                tenant_id: t.tenant_id.clone(),
                owner_id: t.owner_id.clone(),
                name: t.name.clone(),
            };
            match self.recipe(Some(&t), RecipeAsk::default()) {
                Ok(recipe) => wanted.push(Wanted {
                    key: pool_key(&of, &recipe, default_provider),
                    of,
                    recipe,
                    target: u32::try_from(t.pool_size).unwrap_or(0).min(pool.max_warm),
                }),
                Err(e) => {
                    tracing::warn!(template = %t.name, owner = %t.owner_id, error = %e, "template's pool skipped")
                }
            }
        }
        Ok(wanted)
    }

    /// One pass of the filler: lets go of warm sandboxes nobody will
    /// claim, then tops every pool up within `pool.max_warm`.
    pub async fn refill_pools(&self) -> Result<PoolReport> {
        let mut report = PoolReport::default();
        if self.is_draining() {
            return Ok(report);
        }
        let wanted = self.wanted_pools().await?;
        let keys: Vec<&str> = wanted.iter().map(|w| w.key.as_str()).collect();
        self.inner.pool.retain(&keys);
        let now = Utc::now();
        let mut live: HashMap<&str, u32> = HashMap::new();
        let mut doomed = Vec::new();
        // Newest last, so the excess of a pool is its newest sandboxes.
        for record in self.store().pooled_sandboxes().await? {
            let state = record.state.parse::<SandboxState>().ok();
            let key = record.pool_key.as_deref().unwrap_or_default();
            let target = wanted.iter().find(|w| w.key == key).map(|w| w.target);
            let counted = live.get(key).copied().unwrap_or(0);
            // A cordoned or draining worker gets no new sandboxes, and a
            // drain waits for its warm ones too: they go.
            let schedulable = self
                .scheduler()
                .admin_state(&record.worker_id)
                .schedulable();
            let keep = match state {
                Some(SandboxState::Creating) => true,
                // The reconciler retries failed destroys, with backoff.
                Some(SandboxState::Error) => continue,
                Some(SandboxState::Running) => {
                    schedulable && record.expires_at > now && target.is_some_and(|t| counted < t)
                }
                // Being destroyed already.
                Some(SandboxState::Destroying | SandboxState::Expired) => continue,
                _ => false,
            };
            if keep {
                if let Some(w) = wanted.iter().find(|w| w.key == key) {
                    *live.entry(w.key.as_str()).or_default() += 1;
                }
            } else {
                doomed.push(record);
            }
        }
        report.destroyed = self.let_go(doomed).await;

        let mut room = self
            .config()
            .pool
            .max_warm
            .saturating_sub(live.values().sum());
        let clock = tokio::time::Instant::now();
        let mut fills = Vec::new();
        for w in &wanted {
            let have = live.get(w.key.as_str()).copied().unwrap_or(0);
            let missing = w.target.saturating_sub(have).min(room);
            if missing == 0 || self.inner.pool.in_backoff(&w.key, clock) {
                continue;
            }
            room -= missing;
            fills.extend(std::iter::repeat_n(w.clone(), missing as usize));
        }
        let outcomes = futures::stream::iter(fills)
            .map(|w| async move {
                let outcome = self.fill_one(&w).await;
                (w, outcome)
            })
            .buffer_unordered(FILL_PARALLEL)
            .collect::<Vec<_>>()
            .await;
        for (w, outcome) in outcomes {
            match outcome {
                Ok(()) => {
                    report.spawned += 1;
                    self.inner.pool.succeeded(&w.key);
                }
                Err(e) => {
                    report.failed += 1;
                    let wait = self.inner.pool.failed(&w.key, tokio::time::Instant::now());
                    tracing::warn!(pool = ?w.of, error = %e, retry_in = ?wait, "warm sandbox spawn failed");
                }
            }
        }
        Ok(report)
    }

    /// Spawns one warm sandbox for `w`. A failed one is destroyed by the
    /// next pass.
    async fn fill_one(&self, w: &Wanted) -> Result<()> {
        let ask = crate::scheduler::Ask {
            provider: w.recipe.provider.as_deref(),
            vcpus: w.recipe.vcpus,
            memory_mb: w.recipe.memory_mb,
            labels: &w.recipe.worker_labels,
        };
        let placement = self.scheduler().place(&ask)?;
        // As a fresh spawn: docker pulls it here if it can.
        if !placement
            .worker
            .image_available(&placement.provider, &w.recipe.image)
            .await?
        {
            return Err(super::Error::BadRequest(format!(
                "image {:?} is not available on provider {}",
                w.recipe.image, placement.provider
            )));
        }
        let now = Utc::now();
        let record = entity::sandbox::Model {
            id: crate::ids::sandbox(),
            owner_id: POOL_OWNER.into(),
            tenant_id: POOL_OWNER.into(),
            worker_id: placement.worker.id().to_string(),
            provider: placement.provider.clone(),
            runtime_id: None,
            image: w.recipe.image.clone(),
            template: None,
            memory_mb: w.recipe.memory_mb as i32,
            vcpus: w.recipe.vcpus as i32,
            state: SandboxState::Creating.as_str().into(),
            state_reason: None,
            metadata: serde_json::Value::Object(Default::default()),
            created_at: now,
            updated_at: now,
            expires_at: now
                + chrono::Duration::from_std(self.config().pool.max_age.0)
                    .unwrap_or(chrono::TimeDelta::MAX),
            destroyed_at: None,
            idempotency_key: None,
            replica_id: self.store().replica().to_string(),
            pool_key: Some(w.key.clone()),
        };
        let record = self
            .store()
            .insert_sandbox(record, self.lease_until())
            .await?;
        let spec = SpawnSpec {
            sandbox_id: record.id.clone(),
            image: w.recipe.image.clone(),
            memory_mb: w.recipe.memory_mb,
            vcpus: w.recipe.vcpus,
            disk_mb: w.recipe.disk_mb,
        };
        self.start_runtime(&record, &placement, &spec)
            .await
            .map(drop)
    }

    /// Destroys warm sandboxes (unaudited: no caller ever had them), at
    /// most `FILL_PARALLEL` at once, each only if no claim took it first.
    /// Returns how many went.
    async fn let_go(&self, records: Vec<entity::sandbox::Model>) -> usize {
        futures::stream::iter(records)
            .map(|record| async move {
                let id = record.id.clone();
                let key = record.pool_key.clone().unwrap_or_default();
                let retired = match self.store().retire_pooled(&id, &key).await {
                    Ok(Some(retired)) => retired,
                    // Claimed (or moved) meanwhile: not the pool's any more.
                    Ok(None) => return false,
                    Err(e) => {
                        tracing::warn!(sandbox = %id, error = %e, "retiring a warm sandbox failed");
                        return false;
                    }
                };
                match self.remove_runtime(retired, None).await {
                    Ok(()) => true,
                    Err(e) => {
                        // Best effort: the record is in `error` now, and the
                        // reconciler retries its destroy with backoff.
                        tracing::warn!(sandbox = %id, error = %e, "warm sandbox destroy failed");
                        false
                    }
                }
            })
            .buffer_unordered(FILL_PARALLEL)
            .filter(|gone| std::future::ready(*gone))
            .count()
            .await
    }

    /// Destroys the warm sandboxes at shutdown: all of them with `all` (the
    /// last replica standing: nobody else would claim or refill them),
    /// else those of workers in this process. Returns how many went.
    pub async fn drain_pools(&self, all: bool) -> Result<usize> {
        let here: Vec<String> = self
            .scheduler()
            .in_process_workers()
            .iter()
            .map(|w| w.id().to_string())
            .collect();
        let records = self
            .store()
            .pooled_sandboxes()
            .await?
            .into_iter()
            .filter(|r| all || here.contains(&r.worker_id))
            .filter(|r| {
                matches!(
                    r.state.parse::<SandboxState>(),
                    Ok(SandboxState::Running | SandboxState::Unhealthy | SandboxState::Error)
                )
            })
            .collect();
        Ok(self.let_go(records).await)
    }

    /// The pools the caller may see: the defaults' pool, and the pools of
    /// templates it may use.
    pub async fn pool_status(&self, caller: &Caller) -> Result<PoolStatus> {
        let wanted = self.wanted_pools().await?;
        let mut warm: HashMap<String, (u32, u32)> = HashMap::new();
        for record in self.store().pooled_sandboxes().await? {
            let entry = warm
                .entry(record.pool_key.clone().unwrap_or_default())
                .or_default();
            match record.state.parse::<SandboxState>() {
                Ok(SandboxState::Running) => entry.0 += 1,
                Ok(SandboxState::Creating) => entry.1 += 1,
                _ => {}
            }
        }
        let pools: Vec<PoolView> = wanted
            .into_iter()
            .filter(|w| match &w.of {
                PoolOf::Defaults => true,
                PoolOf::Template {
                    tenant_id,
                    owner_id,
                    ..
                } => caller.can_access(tenant_id, owner_id),
            })
            .map(|w| {
                let (running, creating) = warm.get(&w.key).copied().unwrap_or_default();
                let counters = self.inner.pool.counters(&w.key);
                let (template, owner_id) = match w.of {
                    PoolOf::Defaults => (None, None),
                    PoolOf::Template { name, owner_id, .. } => (Some(name), Some(owner_id)),
                };
                PoolView {
                    template,
                    owner_id,
                    provider: w
                        .recipe
                        .provider
                        .unwrap_or_else(|| self.scheduler().default_provider().to_string()),
                    image: w.recipe.image,
                    memory_mb: w.recipe.memory_mb,
                    vcpus: w.recipe.vcpus,
                    target: w.target,
                    warm: running,
                    creating,
                    hits: counters.hits,
                    misses: counters.misses,
                }
            })
            .collect();
        Ok(PoolStatus {
            enabled: !pools.is_empty(),
            max_warm: self.config().pool.max_warm,
            warm: pools.iter().map(|p| p.warm).sum(),
            creating: pools.iter().map(|p| p.creating).sum(),
            hits: pools.iter().map(|p| p.hits).sum(),
            misses: pools.iter().map(|p| p.misses).sum(),
            pools,
        })
    }

    /// Keeps the pools topped up until `shutdown` fires (leader only).
    pub async fn run_pools(self, shutdown: CancellationToken) {
        let mut tick = crate::ticker::every(self.config().pool.refill_interval.0);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                () = self.inner.pool.refill.notified() => {}
            }
            if !self.is_leader() {
                // Followers count claims too: forget the pools not kept.
                match self.wanted_pools().await {
                    Ok(wanted) => {
                        let keys: Vec<&str> = wanted.iter().map(|w| w.key.as_str()).collect();
                        self.inner.pool.retain(&keys);
                    }
                    Err(e) => tracing::debug!(error = %e, "reading the pools failed"),
                }
                continue;
            }
            match self.refill_pools().await {
                Ok(report) if report != PoolReport::default() => {
                    tracing::debug!(?report, "pools topped up");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pool pass failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn recipe(image: &str) -> Recipe {
        Recipe {
            image: image.into(),
            provider: None,
            memory_mb: 256,
            vcpus: 1,
            disk_mb: 1024,
            worker_labels: BTreeMap::new(),
        }
    }

    #[test]
    fn a_pool_key_names_its_pool_and_its_recipe() {
        let t = |name: &str| PoolOf::Template {
            tenant_id: "default".into(),
            owner_id: "alice".into(),
            name: name.into(),
        };
        let base = pool_key(&t("py"), &recipe("python:3"), "docker");
        assert_eq!(base, pool_key(&t("py"), &recipe("python:3"), "docker"));
        // The default provider spelled out is the same recipe.
        let mut explicit = recipe("python:3");
        explicit.provider = Some("docker".into());
        assert_eq!(base, pool_key(&t("py"), &explicit, "docker"));
        // Another template, image, provider or size is another pool.
        assert_ne!(base, pool_key(&t("js"), &recipe("python:3"), "docker"));
        assert_ne!(base, pool_key(&t("py"), &recipe("python:2"), "docker"));
        assert_ne!(base, pool_key(&t("py"), &recipe("python:3"), "native"));
        let mut bigger = recipe("python:3");
        bigger.memory_mb = 512;
        assert_ne!(base, pool_key(&t("py"), &bigger, "docker"));
        assert_ne!(
            base,
            pool_key(&PoolOf::Defaults, &recipe("python:3"), "docker")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_pool_backs_off_and_recovers() {
        let state = PoolState::default();
        let now = tokio::time::Instant::now();
        assert!(!state.in_backoff("k", now));
        assert_eq!(state.failed("k", now), Duration::from_secs(2));
        assert!(state.in_backoff("k", now + Duration::from_secs(1)));
        assert!(!state.in_backoff("k", now + Duration::from_secs(2)));
        assert_eq!(state.failed("k", now), Duration::from_secs(4));
        for _ in 0..10 {
            state.failed("k", now);
        }
        assert_eq!(state.failed("k", now), MAX_BACKOFF);
        state.succeeded("k");
        assert!(!state.in_backoff("k", now));
        // Forgotten with its pool.
        state.failed("gone", now);
        state.count("gone", true);
        state.retain(&["k"]);
        assert!(!state.in_backoff("gone", now));
        assert_eq!(state.counters("gone").hits, 0);
    }
}
