//! Lifecycle mechanics shared by every operation: persisted transitions,
//! state events, destruction, the reaper that expires sandboxes, and
//! start-up recovery. Failed destroys are retried by the reconciler
//! (`reconcile.rs`).

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::{Error, Result, Service};
use crate::auth::Caller;
use crate::events::Event;
use crate::lifecycle::SandboxState;
use crate::store::SandboxFilter;

impl Service {
    /// Persists a transition, then publishes it. Returns `None` when the
    /// sandbox's current state does not allow the transition (someone else
    /// moved it first).
    pub(super) async fn transition(
        &self,
        id: &str,
        to: SandboxState,
        reason: Option<String>,
        runtime_id: Option<String>,
    ) -> Result<Option<entity::sandbox::Model>> {
        self.transition_full(id, &SandboxState::predecessors(to), to, reason, runtime_id)
            .await
    }

    /// Like [`Service::transition`], but only from the states in `from`:
    /// for observers (the reconciler) whose verdict holds only for the
    /// state they saw.
    pub(super) async fn transition_from(
        &self,
        id: &str,
        from: &[SandboxState],
        to: SandboxState,
        reason: Option<String>,
    ) -> Result<Option<entity::sandbox::Model>> {
        self.transition_full(id, from, to, reason, None).await
    }

    async fn transition_full(
        &self,
        id: &str,
        from: &[SandboxState],
        to: SandboxState,
        reason: Option<String>,
        runtime_id: Option<String>,
    ) -> Result<Option<entity::sandbox::Model>> {
        let updated = self
            .store()
            .transition_sandbox_from(id, from, to, reason.clone(), runtime_id)
            .await?;
        if let Some(model) = &updated {
            self.publish_state(model, to, reason);
            if to == SandboxState::Destroyed {
                self.inner.spawn_queue.notify_capacity_freed();
            }
        }
        Ok(updated)
    }

    pub(super) fn publish_state(
        &self,
        sandbox: &entity::sandbox::Model,
        state: SandboxState,
        reason: Option<String>,
    ) {
        // A warm sandbox is nobody's until claimed: its first events are
        // the claim's, as for a fresh spawn.
        if sandbox.pool_key.is_some() {
            return;
        }
        self.events().publish(Event::SandboxState {
            sandbox_id: sandbox.id.clone(),
            owner_id: sandbox.owner_id.clone(),
            tenant_id: sandbox.tenant_id.clone(),
            state,
            reason,
            at: Utc::now(),
        });
    }

    /// Moves a sandbox through destroying to destroyed. When the provider
    /// fails, the sandbox ends in `error` with the reason and the reaper
    /// retries later. The outcome is audited here, for every path that
    /// destroys (a request, an expiry, the reconciler, shutdown), as
    /// `audit.action` by `audit.caller`.
    pub(super) async fn destroy_record(
        &self,
        model: entity::sandbox::Model,
        reason: Option<String>,
        audit: DestroyAudit<'_>,
    ) -> Result<()> {
        // A warm sandbox was nobody's: nothing of it enters the trail.
        if model.pool_key.is_some() {
            return self.destroy_record_unaudited(model, reason).await;
        }
        let id = model.id.clone();
        let outcome = self.destroy_record_unaudited(model, reason.clone()).await;
        let (verdict, detail) = match &outcome {
            Ok(()) => (super::AuditOutcome::Success, reason),
            Err(e) => (super::AuditOutcome::Failure, Some(e.to_string())),
        };
        self.audit_with_detail(audit.caller, audit.action, &id, verdict, detail)
            .await;
        outcome
    }

    /// [`Service::destroy_record`] without the audit event: for sandboxes
    /// no caller ever had (warm ones the pool lets go).
    pub(super) async fn destroy_record_unaudited(
        &self,
        model: entity::sandbox::Model,
        reason: Option<String>,
    ) -> Result<()> {
        let id = model.id.clone();
        if self
            .transition(&id, SandboxState::Destroying, reason.clone(), None)
            .await?
            .is_none()
        {
            return Err(Error::Conflict(format!(
                "sandbox {id} cannot be destroyed from state {}",
                model.state
            )));
        }
        self.remove_runtime(model, reason).await
    }

    /// The rest of a destroy once the record is `destroying`: the runtime
    /// goes, then the record is `destroyed` (or `error` with the reason,
    /// for the reconciler to retry).
    pub(super) async fn remove_runtime(
        &self,
        model: entity::sandbox::Model,
        reason: Option<String>,
    ) -> Result<()> {
        let id = model.id.clone();
        self.close_terminals(&id);
        // Without a recorded handle the worker removes whatever exists
        // under the sandbox id (the spawn failed, or the server died
        // mid-spawn).
        let result = match self.worker_of(&model.worker_id).await {
            Ok(worker) => match self.runtime_for_destroy(&model).await {
                Ok(runtime) => worker.destroy(&runtime).await,
                Err(e) => Err(crate::provider::ProviderError::Unavailable(format!(
                    "cannot take the sandbox's lease: {e}"
                ))),
            },
            Err(e) => Err(crate::provider::ProviderError::Unavailable(e.to_string())),
        };
        match result {
            Ok(()) => {
                crate::failpoint::hit("destroy.runtime_removed");
                self.transition(&id, SandboxState::Destroyed, reason, None)
                    .await?;
                Ok(())
            }
            Err(e) => {
                // A sandbox that was already in `error` keeps the reason it
                // failed for (OOM, removed, ...); the destroy error is logged.
                let why = match (&model.state_reason, model.state.as_str()) {
                    (Some(first), "error") => first.clone(),
                    _ => format!("destroy failed: {e}"),
                };
                tracing::warn!(sandbox = %id, error = %e, "destroy failed; will retry");
                self.transition(&id, SandboxState::Error, Some(why), None)
                    .await?;
                Err(e.into())
            }
        }
    }

    /// Expires and destroys every usable sandbox whose TTL has passed.
    /// Returns how many were destroyed.
    pub async fn prune_expired(&self, caller: &Caller) -> Result<u64> {
        self.require_write(caller)?;
        let mut pruned = 0;
        for model in self.store().expired_sandboxes(Utc::now()).await? {
            if !caller.can_access(&model.tenant_id, &model.owner_id) {
                continue;
            }
            let id = model.id.clone();
            let Some(expired) = self
                .transition(&id, SandboxState::Expired, Some("ttl reached".into()), None)
                .await?
            else {
                continue;
            };
            crate::failpoint::hit("expire.marked");
            let audit = DestroyAudit {
                caller,
                action: super::AuditAction::SandboxExpire,
            };
            match self
                .destroy_record(expired, Some("ttl reached".into()), audit)
                .await
            {
                Ok(()) => pruned += 1,
                Err(e) => tracing::warn!(sandbox = %id, error = %e, "expiry destroy failed"),
            }
        }
        self.await_expiries_in_flight(caller).await?;
        Ok(pruned)
    }

    /// Waits (bounded) for expired sandboxes that another actor (the
    /// reaper) is already destroying, so that after a prune no expired
    /// sandbox is still listed.
    async fn await_expiries_in_flight(&self, caller: &Caller) -> Result<()> {
        const LIMIT: std::time::Duration = std::time::Duration::from_secs(15);
        let deadline = tokio::time::Instant::now() + LIMIT;
        let filter = SandboxFilter {
            tenant_id: caller.tenant_scope(),
            owner_id: super::listing::owner_filter(caller, None).flatten(),
            states: Some(vec![SandboxState::Expired, SandboxState::Destroying]),
            ..Default::default()
        };
        loop {
            let now = Utc::now();
            let pending = self
                .store()
                .list_sandboxes(&filter)
                .await?
                .into_iter()
                .any(|m| m.expires_at <= now);
            if !pending || tokio::time::Instant::now() >= deadline {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Runs the reaper until `shutdown` fires.
    pub async fn run_reaper(self, every: Duration, shutdown: CancellationToken) {
        let mut tick = crate::ticker::every(every);
        let mut audit_tick = crate::ticker::every(self.config().audit.prune_interval.0);
        let system = Caller::system();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = audit_tick.tick() => {
                    if !self.is_leader() {
                        continue;
                    }
                    match self.prune_audit().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(deleted = n, "audit events past their retention pruned"),
                        Err(e) => tracing::warn!(error = %e, "audit pruning failed"),
                    }
                }
                // One replica reaps; each expiry is a conditional
                // transition anyway, so a handover never destroys twice.
                _ = tick.tick() => {
                    if !self.is_leader() {
                        continue;
                    }
                    if let Err(e) = self.prune_expired(&system).await {
                        tracing::warn!(error = %e, "reaper pass failed");
                    }
                }
            }
        }
    }
}

/// Who a destroy is audited for, and as what.
#[derive(Clone, Copy)]
pub(super) struct DestroyAudit<'a> {
    pub caller: &'a Caller,
    pub action: super::AuditAction,
}

impl Service {
    /// Deletes audit events past `audit.max_age` or beyond the newest
    /// `audit.max_events`; answers how many went.
    pub async fn prune_audit(&self) -> Result<u64> {
        let retention = &self.config().audit;
        let older_than = (!retention.max_age.0.is_zero())
            .then(|| chrono::Duration::from_std(retention.max_age.0).ok())
            .flatten()
            .map(|age| Utc::now() - age);
        let keep = (retention.max_events > 0).then_some(retention.max_events);
        Ok(self.store().prune_audit(older_than, keep).await?)
    }

    /// Runs once at start-up, before the start-up reconcile pass: a sandbox
    /// left `creating` or `destroying` by a previous process can never
    /// finish that step, so it moves to `error` with the reason (the
    /// reconciler then destroys whatever runtime remains); executions it
    /// was running are `interrupted`; half-done provider work is swept.
    pub async fn recover_after_restart(&self) -> Result<()> {
        // Alone on the database, no heartbeat could arrive while this
        // process was not running: every worker gets a full lease period
        // to be heard from again. With other replicas up, they kept
        // hearing the workers and renewing their leases.
        if !self.other_replicas_alive().await? {
            let extended = self.store().extend_all_leases(self.lease_until()).await?;
            if extended > 0 {
                tracing::info!(count = extended, "leases extended at start-up");
            }
        }
        for worker in self.scheduler().in_process_workers() {
            if let Err(e) = worker.recover_at_startup().await {
                tracing::warn!(worker = worker.id(), error = %e, "worker start-up recovery failed");
            }
        }
        // What this replica's previous process was driving, on any worker,
        // can never report back: its commands' streams ended with it (a
        // remote worker kills a command whose stream drops), and its spawns
        // and destroys move to `error`. On a remote worker such a step may
        // still finish: the destroy that follows `error` then leaves a
        // tombstone, and a runtime the spawn made after it is an orphan the
        // reconciler removes. Other replicas' steps are theirs (the leader
        // fails those of a replica that died). Records from before replicas
        // were recorded have no replica.
        for replica in [self.replica_id().to_string(), String::new()] {
            self.fail_steps_of(&replica, "restarted").await?;
        }
        Ok(())
    }
}
