//! Per-owner quota overrides and usage. Setting and clearing quotas is for
//! admins; an owner may read its own. An owner is (tenant, owner id): every
//! quota call names an owner of the caller's tenant, so `alice` of one
//! tenant never shares, reads or changes the quota of `alice` of another.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Error, Result, Service};
use crate::auth::Caller;
use crate::duration;
use crate::store::{OwnerQuota, overrides_quota};

/// An owner's overrides as clients see them (0 / "" = not overridden).
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct QuotaPolicy {
    pub owner_id: String,
    pub max_sandboxes: u64,
    pub max_ttl: String,
    pub max_exec_timeout: String,
    /// Overrides of the size bounds; 0 = not overridden.
    pub max_memory_mb: u32,
    pub max_vcpus: u32,
    pub max_disk_mb: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What an admin sets; a missing field clears that override.
#[derive(Debug, Clone, Default)]
pub struct QuotaInput {
    pub max_sandboxes: Option<u64>,
    pub max_ttl: Option<String>,
    pub max_exec_timeout: Option<String>,
    /// Overrides of `defaults.max_memory_mb`, `max_vcpus`, `max_disk_mb`
    /// for this owner (up or down); the host's capacity still caps them.
    pub max_memory_mb: Option<u32>,
    pub max_vcpus: Option<u32>,
    pub max_disk_mb: Option<u32>,
}

/// An owner's usage against its effective limits.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct QuotaUsage {
    pub owner_id: String,
    pub active_sandboxes: u64,
    /// 0 = unlimited.
    pub max_sandboxes: u64,
    pub max_ttl: String,
    pub max_exec_timeout: String,
    /// Whether the owner has its own overrides.
    pub quota_configured: bool,
}

fn ms_text(ms: Option<i64>) -> String {
    ms.and_then(|m| u64::try_from(m).ok())
        .map(|m| duration::format(Duration::from_millis(m)))
        .unwrap_or_default()
}

fn policy(o: entity::owner::Model) -> QuotaPolicy {
    QuotaPolicy {
        max_sandboxes: o
            .max_sandboxes
            .and_then(|m| u64::try_from(m).ok())
            .unwrap_or(0),
        max_ttl: ms_text(o.max_ttl_ms),
        max_exec_timeout: ms_text(o.max_exec_timeout_ms),
        max_memory_mb: size(o.max_memory_mb),
        max_vcpus: size(o.max_vcpus),
        max_disk_mb: size(o.max_disk_mb),
        owner_id: o.id,
        created_at: o.created_at,
        updated_at: o.updated_at,
    }
}

fn size(v: Option<i32>) -> u32 {
    v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0)
}

/// A size override: 0 or missing clears it.
fn size_limit(name: &str, v: Option<u32>) -> Result<Option<i32>> {
    v.filter(|v| *v > 0)
        .map(|v| i32::try_from(v).map_err(|_| Error::BadRequest(format!("{name} too large"))))
        .transpose()
}

fn parse_limit(name: &str, text: Option<&str>) -> Result<Option<i64>> {
    match text {
        None | Some("") => Ok(None),
        Some(t) => {
            let d = duration::parse(t).map_err(|e| Error::BadRequest(format!("{name}: {e}")))?;
            if d.is_zero() {
                return Err(Error::BadRequest(format!("{name} must be positive")));
            }
            Ok(Some(d.as_millis() as i64))
        }
    }
}

impl Service {
    /// Every owner with overrides (admins).
    pub async fn list_quotas(&self, caller: &Caller) -> Result<Vec<QuotaPolicy>> {
        self.require_admin(caller)?;
        Ok(self
            .store()
            .list_owner_quotas(Some(&caller.tenant_id))
            .await?
            .into_iter()
            .map(policy)
            .collect())
    }

    /// One owner's overrides (admins, or the owner itself).
    pub async fn get_quota(&self, caller: &Caller, owner: &str) -> Result<QuotaPolicy> {
        let tenant = caller.tenant_id.as_str();
        if !caller.is_admin() && !caller.is_owner(tenant, owner) {
            return Err(Error::NotFound(format!("no quota for owner {owner}")));
        }
        match self.store().get_owner(tenant, owner).await? {
            Some(o) if overrides_quota(&o) => Ok(policy(o)),
            _ => Err(Error::NotFound(format!("no quota for owner {owner}"))),
        }
    }

    /// Sets an owner's overrides (admins).
    pub async fn set_quota(
        &self,
        caller: &Caller,
        owner: &str,
        input: QuotaInput,
    ) -> Result<QuotaPolicy> {
        let outcome = async {
            self.require_admin(caller)?;
            if owner.is_empty() || owner.len() > 128 {
                return Err(Error::BadRequest("invalid owner".into()));
            }
            let quota = OwnerQuota {
                max_sandboxes: input
                    .max_sandboxes
                    .filter(|m| *m > 0)
                    .map(|m| {
                        i32::try_from(m)
                            .map_err(|_| Error::BadRequest("max_sandboxes too large".into()))
                    })
                    .transpose()?,
                max_ttl_ms: parse_limit("max_ttl", input.max_ttl.as_deref())?,
                max_exec_timeout_ms: parse_limit(
                    "max_exec_timeout",
                    input.max_exec_timeout.as_deref(),
                )?,
                max_memory_mb: size_limit("max_memory_mb", input.max_memory_mb)?,
                max_vcpus: size_limit("max_vcpus", input.max_vcpus)?,
                max_disk_mb: size_limit("max_disk_mb", input.max_disk_mb)?,
            };
            let tenant = caller.tenant_id.as_str();
            self.store().set_owner_quota(tenant, owner, quota).await?;
            let saved = self
                .store()
                .get_owner(tenant, owner)
                .await?
                .ok_or_else(|| Error::internal("quota vanished after write"))?;
            Ok(policy(saved))
        }
        .await;
        self.audit(
            caller,
            super::AuditAction::QuotaSet,
            owner,
            outcome.as_ref().map(drop),
        )
        .await;
        outcome
    }

    /// Clears an owner's overrides (admins).
    pub async fn delete_quota(&self, caller: &Caller, owner: &str) -> Result<()> {
        let outcome = async {
            self.require_admin(caller)?;
            if self
                .store()
                .clear_owner_quota(&caller.tenant_id, owner)
                .await?
            {
                Ok(())
            } else {
                Err(Error::NotFound(format!("no quota for owner {owner}")))
            }
        }
        .await;
        self.audit(
            caller,
            super::AuditAction::QuotaDelete,
            owner,
            outcome.as_ref().map(drop),
        )
        .await;
        outcome
    }

    /// An owner's usage (admins, or the owner itself).
    pub async fn quota_usage(&self, caller: &Caller, owner: &str) -> Result<QuotaUsage> {
        let tenant = caller.tenant_id.as_str();
        if !caller.is_admin() && !caller.is_owner(tenant, owner) {
            return Err(Error::NotFound(format!("no quota for owner {owner}")));
        }
        let defaults = &self.config().defaults;
        let record = self.store().get_owner(tenant, owner).await?;
        let configured = record.as_ref().is_some_and(overrides_quota);
        let max_sandboxes = record
            .as_ref()
            .and_then(|o| o.max_sandboxes)
            .and_then(|m| u64::try_from(m).ok())
            .unwrap_or(u64::from(defaults.max_sandboxes_per_owner));
        Ok(QuotaUsage {
            owner_id: owner.to_string(),
            active_sandboxes: self
                .store()
                .count_live_sandboxes(Some((tenant, owner)))
                .await?,
            max_sandboxes,
            max_ttl: duration::format(self.max_ttl_for(tenant, owner).await?),
            max_exec_timeout: duration::format(self.max_exec_timeout_for(tenant, owner).await?),
            quota_configured: configured,
        })
    }
}
