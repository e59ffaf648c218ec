//! Templates: named sandbox recipes, and spawning from them.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::policy::SandboxAsk;
use super::{Error, Result, Sandbox, Service, SpawnRequest};
use crate::auth::Caller;
use crate::duration;

/// A template as clients see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Template {
    pub name: String,
    pub image: String,
    pub memory_mb: u32,
    pub vcpus: u32,
    /// Writable disk in MiB (`defaults.disk_mb` when the template sets none).
    pub disk_mb: u32,
    /// Go duration string.
    pub ttl: String,
    pub provider: String,
    pub metadata: BTreeMap<String, String>,
    /// Labels a worker must carry to get this template's sandboxes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub worker_labels: BTreeMap<String, String>,
    /// How many sandboxes of this template are kept warm.
    pub pool_size: u32,
    pub owner_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a client sends to create or replace a template.
#[derive(Debug, Clone, Default)]
pub struct TemplateInput {
    pub name: String,
    pub image: String,
    pub memory_mb: Option<u32>,
    pub vcpus: Option<u32>,
    pub disk_mb: Option<u32>,
    pub ttl: Option<String>,
    pub provider: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub worker_labels: BTreeMap<String, String>,
    /// Warm sandboxes to keep; `None` keeps what a replaced template had
    /// (0 for a new one). Above 0 needs an operator or admin: a pool is
    /// capacity the server spends ahead of demand.
    pub pool_size: Option<u32>,
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "invalid template name {name:?}: use 1-64 letters, digits, '-', '_' or '.'"
        )))
    }
}

impl Service {
    fn to_template(&self, m: entity::template::Model) -> Result<Template> {
        Ok(Template {
            metadata: crate::store::json_to_map(&m.metadata)?,
            worker_labels: serde_json::from_str(&m.worker_labels)
                .map_err(|e| Error::internal(format!("template {}: worker_labels: {e}", m.name)))?,
            name: m.name,
            image: m.image,
            memory_mb: u32::try_from(m.memory_mb).unwrap_or_default(),
            vcpus: u32::try_from(m.vcpus).unwrap_or_default(),
            disk_mb: m
                .disk_mb
                .and_then(|d| u32::try_from(d).ok())
                .unwrap_or(self.config().defaults.disk_mb),
            ttl: duration::format(Duration::from_millis(u64::try_from(m.ttl_ms).unwrap_or(0))),
            provider: m.provider,
            pool_size: u32::try_from(m.pool_size).unwrap_or_default(),
            owner_id: m.owner_id,
            created_at: m.created_at,
            updated_at: m.updated_at,
        })
    }

    /// A stored template as clients see it.
    pub fn template_view(&self, m: entity::template::Model) -> Result<Template> {
        self.to_template(m)
    }

    /// Creates the template, or replaces it when the name exists.
    pub async fn save_template(&self, caller: &Caller, input: TemplateInput) -> Result<Template> {
        let exists = self
            .store()
            .get_template((&caller.tenant_id, &caller.owner_id), &input.name)
            .await?
            .is_some();
        if exists {
            let name = input.name.clone();
            self.update_template(caller, &name, input).await
        } else {
            self.create_template(caller, input).await
        }
    }

    /// A template of `owner` (of the caller's tenant) the caller may use.
    /// Names are per owner: one owner's names neither collide with nor
    /// reveal another's, and a name is resolved for the owner acting (the
    /// caller, or the owner a spawn is made for).
    pub(super) async fn get_template_model(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
    ) -> Result<entity::template::Model> {
        match self
            .store()
            .get_template((&caller.tenant_id, owner), name)
            .await?
        {
            Some(t) if caller.can_access(&t.tenant_id, &t.owner_id) => Ok(t),
            _ => Err(Error::NotFound(format!("template {name:?} not found"))),
        }
    }

    /// A template of the owner acting for a spawn's owner (the key behind
    /// `X-User-ID`, an operator): visible to it by construction.
    pub(super) async fn template_of_acting(
        &self,
        caller: &Caller,
        acting: &str,
        name: &str,
    ) -> Result<entity::template::Model> {
        self.store()
            .get_template((&caller.tenant_id, acting), name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("template {name:?} not found")))
    }

    /// Validates an input into a record for `owner` (of the caller's
    /// tenant): its TTL maximum and size bounds apply, the policy of the
    /// caller's role and tenant.
    async fn template_model(
        &self,
        caller: &Caller,
        owner: &str,
        input: TemplateInput,
        existing: Option<&entity::template::Model>,
    ) -> Result<entity::template::Model> {
        validate_name(&input.name)?;
        let pool_size = match input.pool_size {
            Some(size) => size,
            None => existing.map_or(0, |t| u32::try_from(t.pool_size).unwrap_or(0)),
        };
        let max_warm = self.config().pool.max_warm;
        if pool_size > max_warm {
            return Err(Error::BadRequest(format!(
                "pool_size {pool_size} exceeds the server's pool.max_warm ({max_warm})"
            )));
        }
        let unchanged = existing.is_some_and(|t| i64::from(t.pool_size) == i64::from(pool_size));
        if pool_size > 0 && !unchanged && !caller.may_act_for_others() {
            return Err(Error::Forbidden(
                "a warm pool (pool_size) needs an operator or admin key".into(),
            ));
        }
        if input.image.trim().is_empty() {
            return Err(Error::BadRequest("image is required".into()));
        }
        crate::image_ref::check(&input.image).map_err(|e| Error::BadRequest(e.to_string()))?;
        let defaults = &self.config().defaults;
        let ttl = self.parse_ttl(input.ttl.as_deref())?;
        let max = self.max_ttl_for(&caller.tenant_id, owner).await?;
        if ttl > max {
            return Err(Error::BadRequest(format!(
                "ttl exceeds the maximum of {}",
                duration::format(max)
            )));
        }
        let provider = input.provider.unwrap_or_default();
        if !provider.is_empty() && !self.scheduler().knows_provider(&provider) {
            return Err(Error::BadRequest(format!("unknown provider {provider:?}")));
        }
        let memory_mb = input
            .memory_mb
            .filter(|m| *m > 0)
            .unwrap_or(defaults.memory_mb);
        let vcpus = input.vcpus.filter(|v| *v > 0).unwrap_or(defaults.vcpus);
        let disk_mb = input.disk_mb.filter(|d| *d > 0);
        self.check_sandbox_rules(
            caller,
            (&caller.tenant_id, owner),
            &SandboxAsk {
                provider: if provider.is_empty() {
                    self.scheduler().default_provider()
                } else {
                    &provider
                },
                image: &input.image,
                memory_mb,
                vcpus,
                disk_mb: disk_mb.unwrap_or(defaults.disk_mb),
            },
        )
        .await?;
        crate::worker::labels::check_all(&input.worker_labels)
            .map_err(|e| Error::BadRequest(format!("worker_labels: {e}")))?;
        let now = Utc::now();
        Ok(entity::template::Model {
            tenant_id: caller.tenant_id.clone(),
            name: input.name,
            owner_id: owner.to_string(),
            image: input.image,
            provider,
            memory_mb: memory_mb as i32,
            vcpus: vcpus as i32,
            disk_mb: disk_mb.map(|d| d as i32),
            ttl_ms: ttl.as_millis() as i64,
            metadata: serde_json::to_value(&input.metadata)
                .map_err(|e| Error::internal(e.to_string()))?,
            worker_labels: serde_json::to_string(&input.worker_labels)
                .map_err(|e| Error::internal(e.to_string()))?,
            pool_size: pool_size as i32,
            created_at: now,
            updated_at: now,
        })
    }

    /// Creates a template; a taken name is 409.
    pub async fn create_template(&self, caller: &Caller, input: TemplateInput) -> Result<Template> {
        let name = input.name.clone();
        let outcome = async {
            self.require_write(caller)?;
            let model = self
                .template_model(caller, &caller.owner_id, input, None)
                .await?;
            let saved = self
                .store()
                .insert_template(model)
                .await
                .map_err(|e| match e {
                    crate::store::StoreError::AlreadyExists(what) => {
                        Error::Conflict(format!("{what} already exists"))
                    }
                    other => other.into(),
                })?;
            self.to_template(saved)
        }
        .await;
        self.audit(
            caller,
            super::AuditAction::TemplateCreate,
            &name,
            outcome.as_ref().map(drop),
        )
        .await;
        outcome
    }

    /// Replaces an existing template.
    pub async fn update_template(
        &self,
        caller: &Caller,
        name: &str,
        mut input: TemplateInput,
    ) -> Result<Template> {
        let outcome = async {
            self.require_write(caller)?;
            let existing = self
                .get_template_model(caller, &caller.owner_id, name)
                .await?;
            input.name = name.to_string();
            let mut model = self
                .template_model(caller, &existing.owner_id, input, Some(&existing))
                .await?;
            model.created_at = existing.created_at;
            let saved = self.store().update_template(model).await?;
            self.to_template(saved)
        }
        .await;
        self.audit(
            caller,
            super::AuditAction::TemplateUpdate,
            name,
            outcome.as_ref().map(drop),
        )
        .await;
        outcome
    }

    pub async fn get_template(&self, caller: &Caller, name: &str) -> Result<Template> {
        let model = self
            .get_template_model(caller, &caller.owner_id, name)
            .await?;
        self.to_template(model)
    }

    /// Templates the caller may use (of its tenant), by name.
    pub async fn list_templates(&self, caller: &Caller) -> Result<Vec<Template>> {
        self.store()
            .list_templates(&caller.tenant_id)
            .await?
            .into_iter()
            .filter(|t| caller.can_access(&t.tenant_id, &t.owner_id))
            .map(|t| self.to_template(t))
            .collect()
    }

    pub async fn delete_template(&self, caller: &Caller, name: &str) -> Result<()> {
        let outcome = async {
            self.require_write(caller)?;
            self.get_template_model(caller, &caller.owner_id, name)
                .await?;
            self.store()
                .delete_template((&caller.tenant_id, &caller.owner_id), name)
                .await?;
            Ok(())
        }
        .await;
        self.audit(
            caller,
            super::AuditAction::TemplateDelete,
            name,
            outcome.as_ref().map(drop),
        )
        .await;
        outcome
    }

    /// Spawns a sandbox from a template; `provider` and `ttl` override it.
    pub async fn spawn_from_template(
        &self,
        caller: &Caller,
        name: &str,
        provider: Option<String>,
        ttl: Option<String>,
    ) -> Result<Sandbox> {
        // An unknown template is 404 from the spawn's plan.
        self.spawn(
            caller,
            SpawnRequest {
                template: Some(name.to_string()),
                provider,
                ttl,
                ..Default::default()
            },
        )
        .await
    }
}
