//! Sandboxes: spawn, look up, list, extend, destroy.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::admission::Placed;
use super::policy::SandboxAsk;
use super::spawn_queue::{Admission, QueueError};
use super::{Error, Result, Service};
use crate::auth::Caller;
use crate::duration;
use crate::lifecycle::SandboxState;
use crate::provider::SpawnSpec;
use crate::store::SandboxFilter;

/// A sandbox as clients see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub state: SandboxState,
    /// Why the sandbox is in this state (set for `error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    pub provider: String,
    pub image: String,
    pub memory_mb: u32,
    pub vcpus: u32,
    pub owner_id: String,
    pub tenant_id: String,
    pub worker_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub metadata: BTreeMap<String, String>,
    pub preview_domain: String,
    /// The provider's handle; internal, never serialized.
    #[serde(skip)]
    pub runtime_id: Option<String>,
}

/// What a client may ask for when spawning. Every field is optional.
#[derive(Debug, Clone, Default)]
pub struct SpawnRequest {
    pub image: Option<String>,
    pub provider: Option<String>,
    pub memory_mb: Option<u32>,
    pub vcpus: Option<u32>,
    /// Writable disk in MiB; defaults to the template's, then `defaults.disk_mb`.
    pub disk_mb: Option<u32>,
    /// A Go duration string.
    pub ttl: Option<String>,
    pub template: Option<String>,
    pub owner_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// A client's key for this spawn (REST `Idempotency-Key`): a retry
    /// with the same key answers the sandbox the first one made.
    pub idempotency_key: Option<String>,
    /// Labels the worker must carry (added to the template's).
    pub worker_labels: BTreeMap<String, String>,
}

/// A spawn request with defaults applied and every field validated.
#[derive(Debug, Clone)]
pub(super) struct SpawnPlan {
    pub image: String,
    pub provider: Option<String>,
    pub memory_mb: u32,
    pub vcpus: u32,
    pub disk_mb: u32,
    pub ttl: Duration,
    pub template: Option<String>,
    /// The owner is (tenant_id, owner_id).
    pub tenant_id: String,
    pub owner_id: String,
    pub metadata: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    pub worker_labels: BTreeMap<String, String>,
    /// The warm pool that may serve it (its template's, or the defaults').
    pub pool: Option<super::pool::PoolOf>,
}

/// What makes two sandboxes interchangeable before anyone used them: the
/// runtime they run on and their size. A spawn's request (falling back on
/// its template, then the server's defaults) resolves into one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(super) struct Recipe {
    pub image: String,
    /// `None`: the default provider.
    pub provider: Option<String>,
    pub memory_mb: u32,
    pub vcpus: u32,
    pub disk_mb: u32,
    pub worker_labels: BTreeMap<String, String>,
}

/// The parts of a spawn request that choose the recipe.
#[derive(Debug, Clone, Default)]
pub(super) struct RecipeAsk {
    pub image: Option<String>,
    pub provider: Option<String>,
    pub memory_mb: Option<u32>,
    pub vcpus: Option<u32>,
    pub disk_mb: Option<u32>,
    pub worker_labels: BTreeMap<String, String>,
}

impl SpawnPlan {
    /// What the plan needs from a worker.
    pub(super) fn ask(&self) -> crate::scheduler::Ask<'_> {
        crate::scheduler::Ask {
            provider: self.provider.as_deref(),
            vcpus: self.vcpus,
            memory_mb: self.memory_mb,
            labels: &self.worker_labels,
        }
    }
}

/// The longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;
/// How long a retried spawn waits for the first one to leave `creating`.
const IDEMPOTENT_WAIT: Duration = Duration::from_secs(120);

/// The least memory one sandbox may have, in MiB (the most is
/// `defaults.max_memory_mb`, checked with the other bounds).
const MIN_MEMORY_MB: u32 = 16;
/// The generation of the lease a sandbox gets with its record.
const FIRST_GENERATION: u64 = 1;
const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_BYTES: usize = 16 * 1024;

impl Service {
    pub(super) fn to_sandbox(&self, m: entity::sandbox::Model) -> Result<Sandbox> {
        let state = m
            .state
            .parse()
            .map_err(|e: crate::lifecycle::UnknownState| Error::internal(e.to_string()))?;
        let metadata = crate::store::json_to_map(&m.metadata)?;
        Ok(Sandbox {
            id: m.id,
            state,
            state_reason: m.state_reason,
            provider: m.provider,
            image: m.image,
            memory_mb: u32::try_from(m.memory_mb).unwrap_or_default(),
            vcpus: u32::try_from(m.vcpus).unwrap_or_default(),
            owner_id: m.owner_id,
            tenant_id: m.tenant_id,
            worker_id: m.worker_id,
            template: m.template,
            created_at: m.created_at,
            expires_at: m.expires_at,
            metadata,
            preview_domain: self.config().server.preview_domain.clone(),
            runtime_id: m.runtime_id,
        })
    }

    /// Parses a TTL and checks it against the owner's maximum.
    pub(super) fn parse_ttl(&self, ttl: Option<&str>) -> Result<Duration> {
        let defaults = &self.config().defaults;
        let ttl = match ttl {
            None | Some("") => defaults.ttl.0,
            Some(text) => {
                duration::parse(text).map_err(|e| Error::BadRequest(format!("ttl: {e}")))?
            }
        };
        if ttl.is_zero() {
            return Err(Error::BadRequest("ttl must be positive".into()));
        }
        Ok(ttl)
    }

    /// Applies defaults (and the template, if named) and validates.
    pub(super) async fn plan_spawn(&self, caller: &Caller, req: SpawnRequest) -> Result<SpawnPlan> {
        let owner_id = caller.effective_owner(req.owner_id.as_deref());
        // The template is the sandbox owner's; failing that, the one of
        // whoever acts for it (a pool's key naming its user with
        // X-User-ID, an operator spawning for an owner).
        let template = match req.template.as_deref() {
            Some(name) if !name.is_empty() => {
                let fallback = caller
                    .delegated_by
                    .clone()
                    .or_else(|| (caller.owner_id != owner_id).then(|| caller.owner_id.clone()));
                match self.get_template_model(caller, &owner_id, name).await {
                    Err(Error::NotFound(_)) if fallback.is_some() => {
                        let acting = fallback.unwrap_or_default();
                        Some(self.template_of_acting(caller, &acting, name).await?)
                    }
                    other => Some(other?),
                }
            }
            _ => None,
        };
        let Recipe {
            image,
            provider,
            memory_mb,
            vcpus,
            disk_mb,
            worker_labels: mut labels,
        } = self.recipe(
            template.as_ref(),
            RecipeAsk {
                image: req.image,
                provider: req.provider,
                memory_mb: req.memory_mb,
                vcpus: req.vcpus,
                disk_mb: req.disk_mb,
                worker_labels: BTreeMap::new(),
            },
        )?;
        let ttl = match (req.ttl.as_deref(), &template) {
            (Some(t), _) if !t.is_empty() => self.parse_ttl(Some(t))?,
            (_, Some(t)) => Duration::from_millis(u64::try_from(t.ttl_ms).unwrap_or(0))
                .max(Duration::from_secs(1)),
            _ => self.parse_ttl(None)?,
        };
        let mut metadata = template
            .as_ref()
            .map(|t| crate::store::json_to_map(&t.metadata))
            .transpose()?
            .unwrap_or_default();
        metadata.extend(req.metadata);
        if let Some(t) = &template {
            metadata.insert("template".into(), t.name.clone());
        }
        let metadata_bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if metadata.len() > MAX_METADATA_ENTRIES || metadata_bytes > MAX_METADATA_BYTES {
            return Err(Error::BadRequest(format!(
                "metadata is limited to {MAX_METADATA_ENTRIES} entries and {MAX_METADATA_BYTES} bytes"
            )));
        }
        let idempotency_key = match req.idempotency_key {
            None => None,
            Some(key)
                if !key.is_empty()
                    && key.len() <= MAX_IDEMPOTENCY_KEY
                    && key.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Some(key)
            }
            Some(_) => {
                return Err(Error::BadRequest(format!(
                    "an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
                )));
            }
        };
        labels.extend(req.worker_labels);
        crate::worker::labels::check_all(&labels)
            .map_err(|e| Error::BadRequest(format!("worker_labels: {e}")))?;
        let worker_labels = labels;
        self.check_sandbox_rules(
            caller,
            (&caller.tenant_id, &owner_id),
            &SandboxAsk {
                provider: provider
                    .as_deref()
                    .unwrap_or(self.scheduler().default_provider()),
                image: &image,
                memory_mb,
                vcpus,
                disk_mb,
            },
        )
        .await?;
        let pool = super::pool::PoolOf::for_spawn(self.config(), template.as_ref());
        Ok(SpawnPlan {
            image,
            provider,
            memory_mb,
            vcpus,
            disk_mb,
            ttl,
            template: template.map(|t| t.name),
            tenant_id: caller.tenant_id.clone(),
            owner_id,
            metadata,
            idempotency_key,
            worker_labels,
            pool,
        })
    }

    /// Resolves what a spawn asks for into a recipe: each field from the
    /// request, else the template, else `defaults`; validated.
    pub(super) fn recipe(
        &self,
        template: Option<&entity::template::Model>,
        ask: RecipeAsk,
    ) -> Result<Recipe> {
        let defaults = &self.config().defaults;
        let image = ask
            .image
            .filter(|i| !i.trim().is_empty())
            .or_else(|| template.map(|t| t.image.clone()))
            .unwrap_or_else(|| defaults.image.clone());
        crate::image_ref::check(&image).map_err(|e| Error::BadRequest(e.to_string()))?;
        let provider = ask.provider.filter(|p| !p.is_empty()).or_else(|| {
            template
                .map(|t| t.provider.clone())
                .filter(|p| !p.is_empty())
        });
        let memory_mb = ask
            .memory_mb
            .filter(|m| *m > 0)
            .or_else(|| template.and_then(|t| u32::try_from(t.memory_mb).ok()))
            .unwrap_or(defaults.memory_mb);
        if memory_mb < MIN_MEMORY_MB {
            return Err(Error::BadRequest(format!(
                "memory_mb must be at least {MIN_MEMORY_MB}, got {memory_mb}"
            )));
        }
        let vcpus = ask
            .vcpus
            .filter(|v| *v > 0)
            .or_else(|| template.and_then(|t| u32::try_from(t.vcpus).ok()))
            .unwrap_or(defaults.vcpus);
        let disk_mb = ask
            .disk_mb
            .filter(|d| *d > 0)
            .or_else(|| {
                template
                    .and_then(|t| t.disk_mb)
                    .and_then(|d| u32::try_from(d).ok())
            })
            .unwrap_or(defaults.disk_mb);
        let mut worker_labels: BTreeMap<String, String> = match template {
            Some(t) => serde_json::from_str(&t.worker_labels)
                .map_err(|e| Error::internal(format!("template {}: worker_labels: {e}", t.name)))?,
            None => BTreeMap::new(),
        };
        worker_labels.extend(ask.worker_labels);
        Ok(Recipe {
            image,
            provider,
            memory_mb,
            vcpus,
            disk_mb,
            worker_labels,
        })
    }

    /// The sandbox an earlier spawn with the plan's idempotency key made,
    /// once it is past `creating` (waited for, bounded). A key reused for
    /// a different spawn is refused.
    async fn earlier_spawn(&self, plan: &SpawnPlan) -> Result<Option<Sandbox>> {
        let Some(key) = plan.idempotency_key.as_deref() else {
            return Ok(None);
        };
        let deadline = tokio::time::Instant::now() + IDEMPOTENT_WAIT;
        loop {
            let Some(model) = self
                .store()
                .sandbox_by_idempotency_key(&plan.tenant_id, &plan.owner_id, key)
                .await?
            else {
                return Ok(None);
            };
            let same = model.image == plan.image
                && plan.provider.as_ref().is_none_or(|p| *p == model.provider)
                && u32::try_from(model.memory_mb).ok() == Some(plan.memory_mb)
                && u32::try_from(model.vcpus).ok() == Some(plan.vcpus)
                && model.template == plan.template;
            if !same {
                return Err(Error::Conflict(format!(
                    "idempotency key {key:?} was used for a different spawn (sandbox {})",
                    model.id
                )));
            }
            match model.state.parse::<SandboxState>() {
                Ok(SandboxState::Creating) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(SandboxState::Creating) => {
                    return Err(Error::Conflict(format!(
                        "sandbox {} of idempotency key {key:?} is still being created",
                        model.id
                    )));
                }
                Ok(SandboxState::Destroyed | SandboxState::Error) => {
                    let reason = model
                        .state_reason
                        .as_deref()
                        .unwrap_or("no reason recorded");
                    return Err(Error::Conflict(format!(
                        "sandbox {} of idempotency key {key:?} is {} ({reason}); use a new key",
                        model.id, model.state
                    )));
                }
                _ => return self.to_sandbox(model).map(Some),
            }
        }
    }

    /// Creates a sandbox and returns it `running`.
    ///
    /// Order: validate, admit (quotas), place (scheduler), check the image,
    /// persist `creating`, spawn, persist `running`. A spawn that fails
    /// leaves no runtime behind and the record in `error` with the reason.
    pub async fn spawn(&self, caller: &Caller, req: SpawnRequest) -> Result<Sandbox> {
        // Run to completion even if the client goes away: a spawn cut off
        // between "record created" and "runtime started" would leave a
        // record that lies (and maybe a runtime nobody tracks).
        let (service, task_caller) = (self.clone(), caller.clone());
        let started = std::time::Instant::now();
        let asked = req.provider.clone().unwrap_or_default();
        let outcome = tokio::spawn(async move { service.spawn_inner(&task_caller, req).await })
            .await
            .unwrap_or_else(|e| Err(Error::internal(format!("spawn task failed: {e}"))));
        // A refused spawn is labelled with what it asked for only when a
        // worker offers that provider: clients choose the text, and the
        // label set must stay as small as the installation.
        let provider = match &outcome {
            Ok(s) => s.provider.clone(),
            Err(_) if asked.is_empty() => "default".to_string(),
            Err(_) if self.providers().iter().any(|p| p.name == asked) => asked,
            Err(_) => "other".to_string(),
        };
        self.metrics()
            .spawned(&provider, &outcome, started.elapsed());
        let target = outcome.as_ref().map(|s| s.id.clone()).unwrap_or_default();
        self.audit(
            caller,
            super::AuditAction::SandboxSpawn,
            &target,
            outcome.as_ref().map(drop),
        )
        .await;
        outcome
    }

    async fn spawn_inner(&self, caller: &Caller, req: SpawnRequest) -> Result<Sandbox> {
        self.require_write(caller)?;
        self.refuse_if_draining()?;
        let plan = self.plan_spawn(caller, req).await?;
        // A retry: the first spawn's sandbox, before any quota counts it twice.
        if let Some(earlier) = self.earlier_spawn(&plan).await? {
            return Ok(earlier);
        }
        match self.spawn_planned(plan.clone()).await {
            // A retry racing its first attempt: that one may have taken
            // the last slot, and its sandbox is the answer.
            Err(e @ (Error::ResourceLimit { .. } | Error::Unavailable(_)))
                if plan.idempotency_key.is_some() =>
            {
                match self.earlier_spawn(&plan).await? {
                    Some(earlier) => Ok(earlier),
                    None => Err(e),
                }
            }
            other => other,
        }
    }

    /// Admits, places and makes a planned sandbox (or hands out a warm
    /// one of the plan's pool).
    async fn spawn_planned(&self, plan: SpawnPlan) -> Result<Sandbox> {
        match self.claim_warm(&plan).await {
            Ok(Some(claimed)) => return Ok(claimed),
            Ok(None) => {}
            // A concurrent retry with the same key claimed or inserted first.
            Err(Error::Conflict(_)) if plan.idempotency_key.is_some() => {
                return self
                    .earlier_spawn(&plan)
                    .await?
                    .ok_or_else(|| Error::internal("idempotent spawn vanished"));
            }
            Err(e) => return Err(e),
        }
        let decision = self.admission_for_plan(&plan, Placed::No).await?;
        if decision.reason == super::admission::AdmissionReason::WorkerUnavailable {
            // The scheduler says precisely why (unknown provider, unhealthy, ...).
            self.scheduler().choose(&plan.ask())?;
        }
        let queueing = self.config().defaults.spawn_overflow == "queue";
        if !(decision.allowed || queueing && decision.queueable) {
            return Err(self.refuse(decision));
        }
        let placement = self.scheduler().place(&plan.ask())?;
        if !placement
            .worker
            .image_available(&placement.provider, &plan.image)
            .await?
        {
            let fix = match placement.provider.as_str() {
                "docker" => format!(
                    "pull it on the Docker host (`docker pull {}`) or `docker import` a rootfs \
                     under that name; the pull from its registry failed",
                    plan.image
                ),
                _ => format!(
                    "import a root filesystem under that name (`stacyvm image import {} \
                     ROOTFS.tar[.gz]`) on the worker; `stacyvm image list` shows what is there",
                    plan.image
                ),
            };
            return Err(Error::BadRequest(format!(
                "image {:?} is not available on provider {}: {fix}",
                plan.image, placement.provider
            )));
        }

        let now = Utc::now();
        let expires_at = now
            + chrono::Duration::from_std(plan.ttl)
                .map_err(|_| Error::BadRequest("ttl too large".into()))?;
        let record = entity::sandbox::Model {
            id: crate::ids::sandbox(),
            owner_id: plan.owner_id.clone(),
            tenant_id: plan.tenant_id.clone(),
            worker_id: placement.worker.id().to_string(),
            provider: placement.provider.clone(),
            runtime_id: None,
            image: plan.image.clone(),
            template: plan.template.clone(),
            memory_mb: plan.memory_mb as i32,
            vcpus: plan.vcpus as i32,
            state: SandboxState::Creating.as_str().into(),
            state_reason: None,
            metadata: serde_json::to_value(&plan.metadata)
                .map_err(|e| Error::internal(e.to_string()))?,
            created_at: now,
            updated_at: now,
            expires_at,
            destroyed_at: None,
            idempotency_key: plan.idempotency_key.clone(),
            replica_id: self.store().replica().to_string(),
            pool_key: None,
        };
        // Re-check quotas and insert under one lock so that concurrent
        // spawns cannot both take the last slot.
        let record = if queueing {
            // Over a queueable cap, wait (bounded, FIFO) for capacity.
            let wait = self.config().defaults.spawn_queue_timeout.0;
            self.inner
                .spawn_queue
                .wait_for_capacity(|| self.try_reserve(&plan, record.clone()))
                .await
                .map_err(|e| match e {
                    QueueError::Full => Error::ResourceLimit {
                        message: "at capacity and the spawn queue is full".into(),
                        retry_after_secs: 5,
                    },
                    QueueError::Timeout => Error::ResourceLimit {
                        message: format!(
                            "at capacity: no sandbox was freed within {}",
                            crate::duration::format(wait)
                        ),
                        retry_after_secs: 5,
                    },
                    QueueError::Admit(e) => e,
                })
        } else {
            match self.reserve(&plan, record).await {
                Ok(Ok(record)) => Ok(record),
                Ok(Err(refused)) => Err(self.refuse(refused)),
                Err(e) => Err(e),
            }
        };
        let record = match record {
            // A concurrent retry with the same key inserted first.
            Err(Error::Conflict(_)) if plan.idempotency_key.is_some() => {
                return self
                    .earlier_spawn(&plan)
                    .await?
                    .ok_or_else(|| Error::internal("idempotent spawn vanished"));
            }
            other => other?,
        };
        let spec = SpawnSpec {
            sandbox_id: record.id.clone(),
            image: plan.image,
            memory_mb: plan.memory_mb,
            vcpus: plan.vcpus,
            disk_mb: plan.disk_mb,
        };
        self.start_runtime(&record, &placement, &spec).await
    }

    /// Makes the runtime of a `creating` record on its placement and
    /// moves the record to `running`; a failed spawn leaves it in `error`
    /// with the reason, and a record destroyed meanwhile takes its
    /// runtime with it.
    pub(super) async fn start_runtime(
        &self,
        record: &entity::sandbox::Model,
        placement: &crate::scheduler::Placement,
        spec: &SpawnSpec,
    ) -> Result<Sandbox> {
        let id = record.id.clone();
        self.publish_state(record, SandboxState::Creating, None);
        match placement
            .worker
            .spawn(&placement.provider, spec, FIRST_GENERATION)
            .await
        {
            Ok(handle) => {
                crate::failpoint::hit("spawn.runtime_started");
                let running = self
                    .transition(
                        &id,
                        SandboxState::Running,
                        None,
                        Some(handle.runtime_id.clone()),
                    )
                    .await?;
                match running {
                    Some(model) => self.to_sandbox(model),
                    None => {
                        // Someone destroyed it while it was being created.
                        // At the lease's generation now: the destroy that
                        // raced may have reclaimed it.
                        let lease = self.store().lease(&id).await?;
                        let runtime = crate::worker::RuntimeRef {
                            sandbox_id: id.clone(),
                            provider: placement.provider.clone(),
                            runtime_id: Some(handle.runtime_id.clone()),
                            lease: lease_generation(lease.as_ref()).max(FIRST_GENERATION),
                        };
                        placement
                            .worker
                            .destroy(&runtime)
                            .await
                            .unwrap_or_else(|e| tracing::warn!(sandbox = %id, error = %e, "cleanup of a sandbox destroyed during spawn failed"));
                        Err(Error::Conflict(format!(
                            "sandbox {id} was destroyed while it was being created"
                        )))
                    }
                }
            }
            Err(e) => {
                let reason = format!("spawn failed: {e}");
                self.transition(&id, SandboxState::Error, Some(reason), None)
                    .await?;
                Err(e.into())
            }
        }
    }

    /// Re-checks quotas and inserts the record under the admission lock.
    /// Over a queueable cap it answers `StillFull` for the spawn queue.
    async fn try_reserve(
        &self,
        plan: &SpawnPlan,
        record: entity::sandbox::Model,
    ) -> Result<Admission<entity::sandbox::Model>> {
        // The TTL counts from admission, not from the start of a wait.
        let mut record = record;
        let now = Utc::now();
        record.expires_at = now + (record.expires_at - record.created_at);
        record.created_at = now;
        record.updated_at = now;
        match self.reserve(plan, record).await? {
            Ok(record) => Ok(Admission::Admitted(record)),
            Err(refused) if refused.queueable => Ok(Admission::StillFull),
            Err(refused) => Err(self.refuse(refused)),
        }
    }

    /// The error a refused spawn answers with, counted by its reason.
    fn refuse(&self, decision: super::AdmissionDecision) -> Error {
        self.metrics().refused(decision.reason);
        decision.refusal()
    }

    /// Re-checks the caps and inserts the record with its lease as one
    /// step of the store (one transaction under an installation-wide lock
    /// on PostgreSQL), so concurrent spawns on any replica cannot both
    /// take the last slot. The refusal is the decision that refused.
    async fn reserve(
        &self,
        plan: &SpawnPlan,
        record: entity::sandbox::Model,
    ) -> Result<std::result::Result<entity::sandbox::Model, super::AdmissionDecision>> {
        let limits = self.limits_for(plan).await?;
        // In-process spawns queue here rather than on the database lock.
        let _guard = self.inner.admission.lock().await;
        Ok(self
            .store()
            .admit_sandbox(record, self.lease_until(), |counts| {
                let decision = self.decide(plan, Placed::Yes, &limits, counts);
                if decision.allowed {
                    Ok(())
                } else {
                    Err(decision)
                }
            })
            .await?)
    }

    /// Loads a sandbox the caller may see, in a state other than destroyed.
    /// Sandboxes of other owners answer exactly like missing ones.
    pub(super) async fn visible_sandbox(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<entity::sandbox::Model> {
        if !crate::ids::is_sandbox_id(id) {
            return Err(Error::sandbox_not_found(id));
        }
        match self.store().get_sandbox(id).await? {
            // A warm sandbox is nobody's, not even an admin's: whatever
            // touched it would reach the owner who claims it.
            Some(m) if m.pool_key.is_some() => Err(Error::sandbox_not_found(id)),
            Some(m) if caller.can_access(&m.tenant_id, &m.owner_id) => {
                if m.state != SandboxState::Destroyed.as_str() {
                    return Ok(m);
                }
                // Still 404 (clients rely on it), but the owner learns why
                // the sandbox is gone, e.g. that the OOM killer struck.
                Err(Error::NotFound(match &m.state_reason {
                    Some(reason) => format!("sandbox {id} not found: it was destroyed ({reason})"),
                    None => format!("sandbox {id} not found: it was destroyed"),
                }))
            }
            _ => Err(Error::sandbox_not_found(id)),
        }
    }

    /// Loads a sandbox that can run commands and file calls: running or unhealthy.
    pub(super) async fn usable_sandbox(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<entity::sandbox::Model> {
        let model = self.visible_sandbox(caller, id).await?;
        let usable = SandboxState::USABLE
            .iter()
            .any(|s| s.as_str() == model.state);
        if !usable || model.runtime_id.is_none() {
            return Err(Error::Conflict(format!(
                "sandbox {id} is {}, not running",
                model.state
            )));
        }
        Ok(model)
    }

    /// A usable sandbox with the worker that holds it and its runtime.
    pub(super) async fn sandbox_runtime(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(
        entity::sandbox::Model,
        std::sync::Arc<dyn crate::worker::Worker>,
        crate::worker::RuntimeRef,
    )> {
        let model = self.usable_sandbox(caller, id).await?;
        let (worker, runtime) = self.runtime_of(&model).await?;
        Ok((model, worker, runtime))
    }

    /// The worker recorded on a sandbox and its runtime there, at the
    /// generation of the sandbox's lease.
    pub(super) async fn runtime_of(
        &self,
        model: &entity::sandbox::Model,
    ) -> Result<(
        std::sync::Arc<dyn crate::worker::Worker>,
        crate::worker::RuntimeRef,
    )> {
        let worker = self.worker_of(&model.worker_id).await?;
        let lease = self.store().lease(&model.id).await?;
        Ok((worker, runtime_ref(model, lease_generation(lease.as_ref()))))
    }

    /// A sandbox by id (404 when destroyed or not the caller's).
    pub async fn get_sandbox(&self, caller: &Caller, id: &str) -> Result<Sandbox> {
        let model = self.visible_sandbox(caller, id).await?;
        self.to_sandbox(model)
    }

    /// The caller's sandboxes that are not destroyed, oldest first.
    pub async fn list_sandboxes(&self, caller: &Caller) -> Result<Vec<Sandbox>> {
        let filter = SandboxFilter {
            tenant_id: caller.tenant_scope(),
            owner_id: super::listing::owner_filter(caller, None).flatten(),
            states: None,
            ..Default::default()
        };
        self.store()
            .list_sandboxes(&filter)
            .await?
            .into_iter()
            .map(|m| self.to_sandbox(m))
            .collect()
    }

    /// Sets the expiry to now + `ttl`. Only for running or unhealthy sandboxes.
    pub async fn extend_sandbox(&self, caller: &Caller, id: &str, ttl: &str) -> Result<Sandbox> {
        let outcome = async {
            self.require_write(caller)?;
            if ttl.is_empty() {
                return Err(Error::BadRequest("ttl is required, e.g. \"30m\"".into()));
            }
            let ttl = self.parse_ttl(Some(ttl))?;
            let model = self.usable_sandbox(caller, id).await?;
            let max = self.max_ttl_for(&model.tenant_id, &model.owner_id).await?;
            if ttl > max {
                return Err(Error::BadRequest(format!(
                    "ttl {} exceeds the maximum of {}",
                    duration::format(ttl),
                    duration::format(max)
                )));
            }
            let expires_at = Utc::now()
                + chrono::Duration::from_std(ttl)
                    .map_err(|_| Error::BadRequest("ttl too large".into()))?;
            let model = self
                .store()
                .set_sandbox_expiry(id, expires_at)
                .await?
                .ok_or_else(|| Error::sandbox_not_found(id))?;
            self.to_sandbox(model)
        }
        .await;
        self.audit(
            caller,
            super::AuditAction::SandboxExtend,
            id,
            outcome.as_ref().map(drop),
        )
        .await;
        outcome
    }

    /// Destroys a sandbox. Idempotent at the runtime level; a second call
    /// on a destroyed sandbox is 404.
    pub async fn destroy_sandbox(&self, caller: &Caller, id: &str) -> Result<()> {
        // Like spawn, a destroy runs to completion once started.
        let (service, task_caller, task_id) = (self.clone(), caller.clone(), id.to_string());
        tokio::spawn(async move { service.destroy_sandbox_now(&task_caller, &task_id).await })
            .await
            .unwrap_or_else(|e| Err(Error::internal(format!("destroy task failed: {e}"))))
    }

    async fn destroy_sandbox_now(&self, caller: &Caller, id: &str) -> Result<()> {
        let checked = async {
            self.require_write(caller)?;
            let model = self.visible_sandbox(caller, id).await?;
            if model.state == SandboxState::Destroying.as_str() {
                return Err(Error::Conflict(format!(
                    "sandbox {id} is already being destroyed"
                )));
            }
            if model.state == SandboxState::Creating.as_str() {
                return Err(Error::Conflict(format!(
                    "sandbox {id} is still being created; try again in a moment"
                )));
            }
            Ok(model)
        }
        .await;
        let audit = super::lifecycle::DestroyAudit {
            caller,
            action: super::AuditAction::SandboxDestroy,
        };
        match checked {
            // The destroy audits its own outcome.
            Ok(model) => {
                let (started, provider) = (std::time::Instant::now(), model.provider.clone());
                let outcome = self.destroy_record(model, None, audit).await;
                self.metrics()
                    .destroyed(&provider, &outcome, started.elapsed());
                outcome
            }
            Err(e) => {
                self.audit(caller, audit.action, id, Err(&e)).await;
                Err(e)
            }
        }
    }
}

/// A sandbox's runtime as its worker knows it, at lease generation `lease`.
pub(super) fn runtime_ref(model: &entity::sandbox::Model, lease: u64) -> crate::worker::RuntimeRef {
    crate::worker::RuntimeRef {
        sandbox_id: model.id.clone(),
        provider: model.provider.clone(),
        runtime_id: model.runtime_id.clone(),
        lease,
    }
}

/// The generation a lease row carries (0 without one: a record from
/// before leases, which every worker fence refuses once it saw a lease).
pub(super) fn lease_generation(lease: Option<&entity::lease::Model>) -> u64 {
    lease.map_or(0, |l| u64::try_from(l.generation).unwrap_or(0))
}

/// The generation a runtime that no record owns is destroyed at: the
/// last one, so nothing can reach it after.
pub(super) const FINAL_GENERATION: u64 = u64::MAX;
