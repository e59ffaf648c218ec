//! Owners and their quota overrides.

use entity::owner::{Column, Entity};
use sea_orm::{ColumnTrait, Condition, EntityTrait, PaginatorTrait, QueryFilter};
use serde::Serialize;

use super::{Store, StoreResult};

/// Owners with at least one quota override (the SQL twin of [`overrides_quota`]).
fn has_override() -> Condition {
    Condition::any()
        .add(Column::MaxSandboxes.is_not_null())
        .add(Column::MaxTtlMs.is_not_null())
        .add(Column::MaxExecTimeoutMs.is_not_null())
        .add(Column::MaxMemoryMb.is_not_null())
        .add(Column::MaxVcpus.is_not_null())
        .add(Column::MaxDiskMb.is_not_null())
}

/// Whether an owner has at least one quota override.
pub fn overrides_quota(owner: &entity::owner::Model) -> bool {
    owner.max_sandboxes.is_some()
        || owner.max_ttl_ms.is_some()
        || owner.max_exec_timeout_ms.is_some()
        || owner.max_memory_mb.is_some()
        || owner.max_vcpus.is_some()
        || owner.max_disk_mb.is_some()
}

/// How many owners have each kind of override; reveals no owner names.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct QuotaSummary {
    pub total: u64,
    pub with_max_sandboxes: u64,
    pub with_max_ttl: u64,
    pub with_max_exec_timeout: u64,
}

/// Which owner records a count covers.
#[derive(Debug, Clone, Copy)]
pub enum OwnerScope<'a> {
    All,
    Tenant(&'a str),
    Owner(&'a str, &'a str),
}

impl OwnerScope<'_> {
    fn condition(self) -> Condition {
        match self {
            OwnerScope::All => Condition::all(),
            OwnerScope::Tenant(tenant) => Condition::all().add(Column::TenantId.eq(tenant)),
            OwnerScope::Owner(tenant, owner) => Condition::all()
                .add(Column::TenantId.eq(tenant))
                .add(Column::Id.eq(owner)),
        }
    }
}

impl Store {
    /// Counts owners with quota overrides, within `scope`.
    pub async fn quota_summary(&self, scope: OwnerScope<'_>) -> StoreResult<QuotaSummary> {
        let db = self.conn();
        let find = || Entity::find().filter(scope.condition());
        let with_max_sandboxes = find()
            .filter(Column::MaxSandboxes.is_not_null())
            .count(db)
            .await?;
        let with_max_ttl = find()
            .filter(Column::MaxTtlMs.is_not_null())
            .count(db)
            .await?;
        let with_max_exec_timeout = find()
            .filter(Column::MaxExecTimeoutMs.is_not_null())
            .count(db)
            .await?;
        let total = find().filter(has_override()).count(db).await?;
        Ok(QuotaSummary {
            total,
            with_max_sandboxes,
            with_max_ttl,
            with_max_exec_timeout,
        })
    }

    /// An owner's record (tenant, id), if any (it holds the quota overrides).
    pub async fn get_owner(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> StoreResult<Option<entity::owner::Model>> {
        Ok(Entity::find_by_id((tenant_id.to_string(), id.to_string()))
            .one(self.conn())
            .await?)
    }
}

/// Quota overrides for one owner; `None` fields fall back to the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerQuota {
    pub max_sandboxes: Option<i32>,
    pub max_ttl_ms: Option<i64>,
    pub max_exec_timeout_ms: Option<i64>,
    pub max_memory_mb: Option<i32>,
    pub max_vcpus: Option<i32>,
    pub max_disk_mb: Option<i32>,
}

impl Store {
    /// Creates the owner if needed and sets its quota overrides.
    pub async fn set_owner_quota(
        &self,
        tenant_id: &str,
        id: &str,
        quota: OwnerQuota,
    ) -> StoreResult<()> {
        use sea_orm::sea_query::OnConflict;
        use sea_orm::{IntoActiveModel, Set};
        let now = chrono::Utc::now();
        let model = entity::owner::Model {
            tenant_id: tenant_id.to_string(),
            id: id.to_string(),
            api_key_hash: None,
            max_sandboxes: quota.max_sandboxes,
            max_ttl_ms: quota.max_ttl_ms,
            max_exec_timeout_ms: quota.max_exec_timeout_ms,
            max_memory_mb: quota.max_memory_mb,
            max_vcpus: quota.max_vcpus,
            max_disk_mb: quota.max_disk_mb,
            created_at: now,
            updated_at: now,
        };
        let mut active = model.into_active_model();
        active.updated_at = Set(now);
        Entity::insert(active)
            .on_conflict(
                OnConflict::columns([Column::TenantId, Column::Id])
                    .update_columns([
                        Column::MaxSandboxes,
                        Column::MaxTtlMs,
                        Column::MaxExecTimeoutMs,
                        Column::MaxMemoryMb,
                        Column::MaxVcpus,
                        Column::MaxDiskMb,
                        Column::UpdatedAt,
                    ])
                    .to_owned(),
            )
            .exec(self.conn())
            .await?;
        Ok(())
    }
}

impl Store {
    /// Owners with at least one quota override, by id; of one tenant, or
    /// of all when `tenant_id` is `None`.
    pub async fn list_owner_quotas(
        &self,
        tenant_id: Option<&str>,
    ) -> StoreResult<Vec<entity::owner::Model>> {
        use sea_orm::QueryOrder;
        let mut query = Entity::find().filter(has_override());
        if let Some(tenant) = tenant_id {
            query = query.filter(Column::TenantId.eq(tenant));
        }
        Ok(query
            .order_by_asc(Column::TenantId)
            .order_by_asc(Column::Id)
            .all(self.conn())
            .await?)
    }

    /// Clears an owner's overrides; returns whether it had any.
    pub async fn clear_owner_quota(&self, tenant_id: &str, id: &str) -> StoreResult<bool> {
        let had = self
            .get_owner(tenant_id, id)
            .await?
            .is_some_and(|o| overrides_quota(&o));
        if had {
            self.set_owner_quota(tenant_id, id, OwnerQuota::default())
                .await?;
        }
        Ok(had)
    }
}
