//! Remote workers joining the control plane: a heartbeat registers a
//! worker (the first time) and refreshes what it offers.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::{Error, Result, Service, WorkerStatus};
use crate::auth::Caller;
use crate::worker::rpc::{self, Heartbeat};
use crate::worker::token::{Audience, WorkerCredentials};
use crate::worker::{AdminState, RemoteWorker};

/// Longest worker id accepted.
const MAX_WORKER_ID: usize = 64;

impl Service {
    /// Takes a worker's heartbeat. `authorization` is the request's
    /// `Authorization` header: `Bearer <token>` with the token configured
    /// for this worker id in `auth.worker_tokens`. A worker id that is
    /// unknown and a wrong token are refused alike (401). An id already
    /// heard from at another endpoint within three heartbeat intervals is
    /// refused (409): two processes must not claim one worker.
    pub async fn worker_heartbeat(
        &self,
        authorization: Option<&str>,
        beat: Heartbeat,
    ) -> Result<()> {
        let id = beat.id.as_str();
        let well_formed = !id.is_empty()
            && id.len() <= MAX_WORKER_ID
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        let credentials = self
            .config()
            .auth
            .worker_tokens
            .get(id)
            .map(|secret| WorkerCredentials::new(id, secret, self.config().auth.worker_auth));
        let Some(credentials) =
            credentials.filter(|c| well_formed && c.verify(authorization, Audience::ControlPlane))
        else {
            return Err(Error::Unauthorized(
                "unknown worker or wrong worker token".into(),
            ));
        };
        let endpoint = rpc::checked_endpoint(&beat.endpoint).map_err(Error::BadRequest)?;
        crate::worker::labels::check_all(&beat.snapshot.labels)
            .map_err(|e| Error::BadRequest(format!("labels: {e}")))?;
        let scheduler = self.scheduler();
        if scheduler.in_process_workers().iter().any(|w| w.id() == id) {
            return Err(Error::Conflict(format!(
                "worker id {id} is this server's own local worker"
            )));
        }
        let fresh_for: Duration = scheduler.stale_after();
        let worker = match scheduler.remote(id) {
            Some(known) if known.endpoint() == endpoint => known,
            // Heard from by this process, recently: a live claim.
            Some(known)
                if known
                    .last_seen()
                    .is_some_and(|seen| seen.elapsed() < fresh_for) =>
            {
                return Err(Error::Conflict(format!(
                    "worker {id} is registered from {} and was heard from within {} s; \
                     another process cannot take its id",
                    known.endpoint(),
                    fresh_for.as_secs().max(1)
                )));
            }
            other => {
                if let Some(previous) = other.filter(|p| {
                    let known = p.instance();
                    !known.is_empty() && known != beat.instance
                }) {
                    // Another installation took the id from another
                    // address (the same one restarted on a new port keeps
                    // its instance and its sandboxes): what ran at the old
                    // one is out of reach, and its leases must not be
                    // renewed by the newcomer.
                    let released = self.store().release_leases_of(id, Utc::now()).await?;
                    tracing::warn!(worker = %id, old = previous.endpoint(), new = %endpoint, leases = released, "worker id moved to another address; its leases were released");
                }
                tracing::info!(worker = %id, %endpoint, "worker registered");
                let hostname: String = beat.hostname.chars().take(255).collect();
                let worker = Arc::new(RemoteWorker::new(
                    id,
                    &hostname,
                    &endpoint,
                    credentials,
                    Utc::now(),
                    fresh_for,
                ));
                scheduler.add_remote(worker.clone());
                worker
            }
        };
        let providers: Vec<&str> = beat
            .snapshot
            .providers
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        let now = Utc::now();
        self.store()
            .upsert_worker(entity::worker::Model {
                id: id.to_string(),
                hostname: beat.hostname.chars().take(255).collect(),
                endpoint: endpoint.clone(),
                status: "online".into(),
                providers: serde_json::json!(providers),
                capacity: i32::try_from(beat.snapshot.max_vcpus).unwrap_or(i32::MAX),
                last_heartbeat: now,
                created_at: now,
                admin_state: crate::worker::AdminState::Active.as_str().into(),
                labels: serde_json::to_string(&beat.snapshot.labels).unwrap_or_default(),
                snapshot: serde_json::to_string(&beat.snapshot).unwrap_or_default(),
                instance: beat.instance.chars().take(64).collect(),
            })
            .await?;
        self.renew_leases(id).await?;
        worker.set_instance(&beat.instance);
        worker.update_snapshot(beat.snapshot);
        Ok(())
    }
}

impl Service {
    /// Cordons, uncordons or drains a worker (admins only): a cordoned or
    /// draining worker gets no new sandboxes; its sandboxes run on. Takes
    /// effect on the next placement of every control plane (this one at
    /// once, others at their next reconcile pass).
    pub async fn set_worker_admin_state(
        &self,
        caller: &Caller,
        id: &str,
        state: AdminState,
    ) -> Result<WorkerStatus> {
        let action = match state {
            AdminState::Active => super::AuditAction::WorkerUncordon,
            AdminState::Cordoned => super::AuditAction::WorkerCordon,
            AdminState::Draining => super::AuditAction::WorkerDrain,
        };
        let outcome = async {
            self.require_admin(caller)?;
            if !self
                .store()
                .set_worker_admin_state(id, state.as_str())
                .await?
            {
                return Err(Error::NotFound(format!("worker {id} not found")));
            }
            self.scheduler().set_admin_state(id, state);
            tracing::info!(worker = %id, state = state.as_str(), "worker admin state set");
            self.worker_status(id).await
        }
        .await;
        self.audit(caller, action, id, outcome.as_ref().map(drop))
            .await;
        outcome
    }

    /// One worker as `/admin/workers` shows it (admins only).
    pub async fn admin_worker(&self, caller: &Caller, id: &str) -> Result<WorkerStatus> {
        self.require_admin(caller)?;
        self.worker_status(id).await
    }

    async fn worker_status(&self, id: &str) -> Result<WorkerStatus> {
        self.all_workers()
            .await?
            .into_iter()
            .find(|w| w.id == id)
            .ok_or_else(|| Error::NotFound(format!("worker {id} not found")))
    }

    /// Takes what admins set on every worker from the store (another
    /// control plane may have set it).
    pub(super) async fn refresh_admin_states(&self) -> Result<()> {
        for w in self.store().list_workers().await? {
            match w.admin_state.parse::<AdminState>() {
                Ok(state) => self.scheduler().set_admin_state(&w.id, state),
                Err(e) => {
                    tracing::warn!(worker = %w.id, error = %e, "ignoring a corrupt admin state")
                }
            }
        }
        Ok(())
    }
}
