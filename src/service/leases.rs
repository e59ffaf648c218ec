//! The rules of leases on the control plane side (the store keeps them,
//! workers fence on their generation; see `store::leases` and
//! `worker::fence`):
//!
//! - a sandbox's lease is taken with its record, held by its worker until
//!   `now + lifecycle.worker_lost_after`;
//! - each heartbeat of the holder renews its leases (the reconciler renews
//!   those of the in-process worker), and a control plane that starts
//!   extends every lease by a full period, since its own absence says
//!   nothing about the workers;
//! - a lease that expires is released and its sandbox is lost;
//! - acting on a runtime whose lease was released (destroying what a lost
//!   worker left) reclaims the lease first, with the next generation.

use chrono::{DateTime, Utc};

use super::sandboxes::{lease_generation, runtime_ref};
use super::{Result, Service};
use crate::worker::RuntimeRef;

impl Service {
    /// Until when a lease taken or renewed now is held.
    pub(super) fn lease_until(&self) -> DateTime<Utc> {
        let period = self.config().lifecycle.worker_lost_after.0;
        Utc::now() + chrono::Duration::from_std(period).unwrap_or(chrono::TimeDelta::MAX)
    }

    /// Renews every lease `worker_id` holds (a heartbeat arrived).
    pub(super) async fn renew_leases(&self, worker_id: &str) -> Result<()> {
        self.store()
            .renew_leases(worker_id, self.lease_until())
            .await?;
        Ok(())
    }

    /// Renews the leases of a worker in this process (alive while this
    /// runs): only those with less than half their period left, so that a
    /// reconcile pass rewrites them once per half period, not each pass.
    pub(super) async fn renew_leases_in_process(&self, worker_id: &str) -> Result<()> {
        let half = self.config().lifecycle.worker_lost_after.0 / 2;
        let until = self.lease_until();
        let stale_before =
            until - chrono::Duration::from_std(half).unwrap_or(chrono::TimeDelta::zero());
        self.store()
            .renew_leases_before(worker_id, until, stale_before)
            .await?;
        Ok(())
    }

    /// The runtime of a sandbox for destroying it: at its lease's
    /// generation while its worker holds it, else at the generation of a
    /// lease reclaimed just now, which fences off whoever held it before.
    pub(super) async fn runtime_for_destroy(
        &self,
        model: &entity::sandbox::Model,
    ) -> Result<RuntimeRef> {
        let lease = self.store().lease(&model.id).await?;
        let held = lease
            .as_ref()
            .is_some_and(|l| l.released_at.is_none() && l.worker_id == model.worker_id);
        if held {
            return Ok(runtime_ref(model, lease_generation(lease.as_ref())));
        }
        let lease = self
            .store()
            .reclaim_lease(&model.id, &model.worker_id, self.lease_until())
            .await?;
        tracing::info!(sandbox = %model.id, worker = %model.worker_id, generation = lease.generation, "lease reclaimed to clean up");
        Ok(runtime_ref(model, lease_generation(Some(&lease))))
    }
}
