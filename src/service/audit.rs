//! The audit trail: what is recorded (every [`AuditAction`], typed), the
//! one writer, and the one rule for who may read which events.
//!
//! The store keeps actions and outcomes as text (`sandbox.spawn`,
//! `success`); here they are enums, so a misspelt action cannot be
//! written.

use super::Service;
use crate::auth::Caller;
use crate::store::{AuditFilter, NewAuditEvent};

/// What an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditAction {
    AuthDenied,
    SandboxSpawn,
    SandboxExec,
    SandboxTerminal,
    SandboxExtend,
    SandboxDestroy,
    SandboxExpire,
    SandboxAdopt,
    SandboxFail,
    SandboxUnhealthy,
    SandboxRecover,
    SandboxOrphanDestroy,
    FileWrite,
    FileMove,
    FileChmod,
    FileDelete,
    TemplateCreate,
    TemplateUpdate,
    TemplateDelete,
    QuotaSet,
    QuotaDelete,
    WorkerCordon,
    WorkerUncordon,
    WorkerDrain,
}

impl AuditAction {
    /// Every action, for documentation and tests.
    pub const ALL: [AuditAction; 24] = [
        AuditAction::AuthDenied,
        AuditAction::SandboxSpawn,
        AuditAction::SandboxExec,
        AuditAction::SandboxTerminal,
        AuditAction::SandboxExtend,
        AuditAction::SandboxDestroy,
        AuditAction::SandboxExpire,
        AuditAction::SandboxAdopt,
        AuditAction::SandboxFail,
        AuditAction::SandboxUnhealthy,
        AuditAction::SandboxRecover,
        AuditAction::SandboxOrphanDestroy,
        AuditAction::FileWrite,
        AuditAction::FileMove,
        AuditAction::FileChmod,
        AuditAction::FileDelete,
        AuditAction::TemplateCreate,
        AuditAction::TemplateUpdate,
        AuditAction::TemplateDelete,
        AuditAction::QuotaSet,
        AuditAction::QuotaDelete,
        AuditAction::WorkerCordon,
        AuditAction::WorkerUncordon,
        AuditAction::WorkerDrain,
    ];

    /// The name stored and shown (`sandbox.spawn`).
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::AuthDenied => "auth.denied",
            AuditAction::SandboxSpawn => "sandbox.spawn",
            AuditAction::SandboxExec => "sandbox.exec",
            AuditAction::SandboxTerminal => "sandbox.terminal",
            AuditAction::SandboxExtend => "sandbox.extend",
            AuditAction::SandboxDestroy => "sandbox.destroy",
            AuditAction::SandboxExpire => "sandbox.expire",
            AuditAction::SandboxAdopt => "sandbox.adopt",
            AuditAction::SandboxFail => "sandbox.fail",
            AuditAction::SandboxUnhealthy => "sandbox.unhealthy",
            AuditAction::SandboxRecover => "sandbox.recover",
            AuditAction::SandboxOrphanDestroy => "sandbox.orphan.destroy",
            AuditAction::FileWrite => "file.write",
            AuditAction::FileMove => "file.move",
            AuditAction::FileChmod => "file.chmod",
            AuditAction::FileDelete => "file.delete",
            AuditAction::TemplateCreate => "template.create",
            AuditAction::TemplateUpdate => "template.update",
            AuditAction::TemplateDelete => "template.delete",
            AuditAction::QuotaSet => "quota.set",
            AuditAction::QuotaDelete => "quota.delete",
            AuditAction::WorkerCordon => "worker.cordon",
            AuditAction::WorkerUncordon => "worker.uncordon",
            AuditAction::WorkerDrain => "worker.drain",
        }
    }
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the recorded action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    Success,
    Failure,
}

impl AuditOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Success => "success",
            AuditOutcome::Failure => "failure",
        }
    }
}

/// The read rule: admins see every event; anyone else the events of their
/// own actions (same tenant, same owner).
pub fn sees_audit_event(caller: &Caller, tenant_id: &str, actor: &str) -> bool {
    caller.is_admin() || caller.is_owner(tenant_id, actor)
}

/// `filter` narrowed to what `caller` may read ([`sees_audit_event`] as a
/// query), or `None` when it asks for events the caller may not read.
pub fn scoped_audit_filter(caller: &Caller, mut filter: AuditFilter) -> Option<AuditFilter> {
    if caller.is_admin() {
        return Some(filter);
    }
    if filter
        .actor
        .as_deref()
        .is_some_and(|a| a != caller.owner_id)
        || filter
            .tenant_id
            .as_deref()
            .is_some_and(|t| t != caller.tenant_id)
    {
        return None;
    }
    filter.tenant_id = Some(caller.tenant_id.clone());
    filter.actor = Some(caller.owner_id.clone());
    Some(filter)
}

impl Service {
    /// Appends an audit event. Best effort: a failed audit write is logged
    /// and never fails the action it describes.
    pub(super) async fn audit(
        &self,
        caller: &Caller,
        action: AuditAction,
        target: &str,
        outcome: std::result::Result<(), &super::Error>,
    ) {
        let (verdict, detail) = match outcome {
            Ok(()) => (AuditOutcome::Success, None),
            Err(e) => (AuditOutcome::Failure, Some(e.to_string())),
        };
        self.audit_with_detail(caller, action, target, verdict, detail)
            .await;
    }

    /// Appends an audit event with an explicit outcome and detail.
    pub(super) async fn audit_with_detail(
        &self,
        caller: &Caller,
        action: AuditAction,
        target: &str,
        outcome: AuditOutcome,
        detail: Option<String>,
    ) {
        let event = NewAuditEvent {
            actor: caller.owner_id.clone(),
            tenant_id: caller.tenant_id.clone(),
            action: action.as_str().to_string(),
            target: target.to_string(),
            outcome: outcome.as_str().to_string(),
            request_id: caller.request_id.clone(),
            detail,
        };
        match self.inner.store.append_audit(event).await {
            Ok(written) => self
                .inner
                .events
                .publish(crate::events::Event::Audit(written.into())),
            Err(e) => {
                tracing::warn!(error = %e, %action, target, "cannot write audit event (best effort)")
            }
        }
    }

    /// The newest audit events about each of `targets` (at most
    /// `per_target` on average), as `caller` may read them.
    pub async fn audit_of_targets(
        &self,
        caller: &Caller,
        targets: Vec<String>,
        per_target: u64,
    ) -> super::Result<Vec<entity::audit_event::Model>> {
        let limit = per_target * targets.len() as u64;
        let filter = AuditFilter {
            targets: Some(targets),
            limit,
            ..Default::default()
        };
        match scoped_audit_filter(caller, filter) {
            Some(filter) => Ok(self.store().list_audit(&filter).await?),
            None => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_names_are_distinct_and_dotted() {
        let names: std::collections::HashSet<&str> =
            AuditAction::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(names.len(), AuditAction::ALL.len());
        assert!(names.iter().all(|n| n.contains('.')));
    }
}
