//! Audit events: append-only.

use chrono::Utc;
use entity::audit_event::{self, Column, Entity};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder,
    QuerySelect,
};

use super::{Store, StoreResult};

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewAuditEvent {
    pub actor: String,
    pub tenant_id: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub request_id: String,
    pub detail: Option<String>,
}

/// Which events a query returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only events of callers of this tenant.
    pub tenant_id: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub target: Option<String>,
    /// Only events of these targets (batch loading for many sandboxes).
    pub targets: Option<Vec<String>>,
    /// Events older than this one (newest-first pagination).
    pub before: Option<super::PageCursor>,
    pub limit: u64,
}

impl Store {
    /// One audit event by id.
    pub async fn audit_event(&self, id: &str) -> StoreResult<Option<audit_event::Model>> {
        Ok(Entity::find_by_id(id.to_string()).one(self.conn()).await?)
    }

    /// Appends an audit event.
    pub async fn append_audit(&self, event: NewAuditEvent) -> StoreResult<audit_event::Model> {
        let model = audit_event::Model {
            id: crate::ids::audit_event(),
            actor: event.actor,
            tenant_id: event.tenant_id,
            action: event.action,
            target: event.target,
            outcome: event.outcome,
            request_id: event.request_id,
            detail: event.detail,
            created_at: Utc::now(),
        };
        Ok(model.into_active_model().insert(self.conn()).await?)
    }

    /// Deletes events created before `older_than` (when given) and all but
    /// the `keep` newest (when given); answers how many went.
    pub async fn prune_audit(
        &self,
        older_than: Option<chrono::DateTime<Utc>>,
        keep: Option<u64>,
    ) -> StoreResult<u64> {
        let mut deleted = 0;
        if let Some(cutoff) = older_than {
            deleted += Entity::delete_many()
                .filter(Column::CreatedAt.lt(cutoff))
                .exec(self.conn())
                .await?
                .rows_affected;
        }
        if let Some(keep) = keep.filter(|k| *k > 0) {
            let oldest_kept = Entity::find()
                .order_by_desc(Column::CreatedAt)
                .order_by_desc(Column::Id)
                .offset(keep - 1)
                .limit(1)
                .one(self.conn())
                .await?;
            if let Some(kept) = oldest_kept {
                deleted += Entity::delete_many()
                    .filter(
                        sea_orm::Condition::any()
                            .add(Column::CreatedAt.lt(kept.created_at))
                            .add(
                                sea_orm::Condition::all()
                                    .add(Column::CreatedAt.eq(kept.created_at))
                                    .add(Column::Id.lt(kept.id.as_str())),
                            ),
                    )
                    .exec(self.conn())
                    .await?
                    .rows_affected;
            }
        }
        Ok(deleted)
    }

    /// Audit events matching `filter`, newest first.
    pub async fn list_audit(&self, filter: &AuditFilter) -> StoreResult<Vec<audit_event::Model>> {
        let mut query = Entity::find();
        if let Some(tenant) = &filter.tenant_id {
            query = query.filter(Column::TenantId.eq(tenant.as_str()));
        }
        if let Some(actor) = &filter.actor {
            query = query.filter(Column::Actor.eq(actor.as_str()));
        }
        if let Some(target) = &filter.target {
            query = query.filter(Column::Target.eq(target.as_str()));
        }
        if let Some(action) = &filter.action {
            query = query.filter(Column::Action.eq(action.as_str()));
        }
        if let Some(targets) = &filter.targets {
            query = query.filter(Column::Target.is_in(targets.iter().map(String::as_str)));
        }
        if let Some(before) = &filter.before {
            query = query.filter(
                sea_orm::Condition::any()
                    .add(Column::CreatedAt.lt(before.created_at))
                    .add(
                        sea_orm::Condition::all()
                            .add(Column::CreatedAt.eq(before.created_at))
                            .add(Column::Id.lt(before.id.as_str())),
                    ),
            );
        }
        Ok(query
            .order_by_desc(Column::CreatedAt)
            .order_by_desc(Column::Id)
            .limit(filter.limit.max(1))
            .all(self.conn())
            .await?)
    }
}
