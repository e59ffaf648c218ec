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
