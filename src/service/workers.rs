//! Remote workers joining the control plane: a heartbeat registers a
//! worker (the first time) and refreshes what it offers.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::{Error, Result, Service};
use crate::worker::RemoteWorker;
use crate::worker::rpc::{self, Heartbeat};

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
        let token = self.config().auth.worker_tokens.get(id);
        if !well_formed || !token.is_some_and(|t| rpc::bearer_matches(authorization, t)) {
            return Err(Error::Unauthorized(
                "unknown worker or wrong worker token".into(),
            ));
        }
        let token = token.cloned().unwrap_or_default();
        let endpoint = rpc::checked_endpoint(&beat.endpoint).map_err(Error::BadRequest)?;
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
            _ => {
                tracing::info!(worker = %id, %endpoint, "worker registered");
                let hostname: String = beat.hostname.chars().take(255).collect();
                let worker = Arc::new(RemoteWorker::new(
                    id,
                    &hostname,
                    &endpoint,
                    &token,
                    Utc::now(),
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
            })
            .await?;
        worker.update_snapshot(beat.snapshot);
        Ok(())
    }
}
