//! Several `serve` replicas on one database.
//!
//! Each replica registers itself (`replicas`, heartbeat every
//! `lifecycle.heartbeat_interval`) and competes for one leadership lease
//! (`leadership`, [`BACKGROUND`]): the leader runs the background work that
//! must happen once (the reaper, the reconciler of remote workers, lease
//! expiry, finishing what dead replicas left). Every replica, leader or
//! not, learns the workers other replicas heard from the store, relays its
//! events to the others (PostgreSQL `NOTIFY`), and serves the live output
//! of the commands it runs to followers on other replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::output::{OutputEnd, OutputFollower, OutputLog, WireOutput};
use super::{Error, Result, Service};
use crate::events::{AuditRecord, Event};
use crate::lifecycle::SandboxState;
use crate::worker::RemoteWorker;
use crate::worker::token::{Audience, WorkerAuth, WorkerCredentials};

/// The leadership lease of the background work.
pub const BACKGROUND: &str = "background";
/// The PostgreSQL channel events travel on between replicas.
pub const EVENTS_CHANNEL: &str = "stacyvm_events";
/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7900;
/// Events waiting to be relayed to other replicas; beyond it they are
/// dropped (and counted), never blocking the publisher.
pub const OUTBOX: usize = 4096;
/// Connecting to another replica to follow output.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest output line accepted from another replica.
const MAX_RELAY_LINE: usize = 8 << 20;
/// A replica relaying output sends a keep-alive line this often while the
/// command is quiet...
pub const RELAY_KEEPALIVE: Duration = Duration::from_secs(10);
/// ...and a follower gives up on a replica silent this long.
const RELAY_SILENCE: Duration = Duration::from_secs(35);

/// This replica: its id, where others reach it, whether it leads.
pub struct Replica {
    pub id: String,
    /// `cluster.advertise_url`, or empty when others cannot reach it.
    pub endpoint: String,
    leader: AtomicBool,
    /// Until when this process may act as leader without renewing: a
    /// little short of the lease it last renewed, by this process's own
    /// clock, so a replica whose renewals fail stops before another may
    /// take over.
    leader_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// Signs and verifies calls between replicas.
    credentials: WorkerCredentials,
    client: reqwest::Client,
}

impl Replica {
    /// `secret` is `cluster.secret` (or one derived from the pepper).
    pub fn new(id: &str, endpoint: &str, secret: &str) -> Replica {
        Replica {
            id: id.to_string(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            leader: AtomicBool::new(false),
            leader_until: std::sync::Mutex::new(None),
            credentials: WorkerCredentials::new("cluster", secret, WorkerAuth::Signed),
            client: reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                // Below the server's idle keep-alive close (server.header_read_timeout):
                // a pooled connection is never reused just as the peer closes it.
                .pool_idle_timeout(crate::api::server::CLIENT_IDLE_TIMEOUT)
                .build()
                .unwrap_or_default(),
        }
    }

    /// The replica id of an installation.
    pub fn id_for(instance: &str) -> String {
        format!("rp-{}", instance.trim_start_matches("in-"))
    }
}

/// A replica as health answers and GraphQL list it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReplicaStatus {
    pub id: String,
    pub endpoint: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub alive: bool,
    pub leader: bool,
}

/// An event on the wire between replicas.
#[derive(Debug, Serialize, Deserialize)]
struct WireEvent {
    origin: String,
    #[serde(flatten)]
    body: WireBody,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireBody {
    Event(Event),
    /// An audit event too large for a payload: receivers read it.
    AuditRef(String),
}

impl Service {
    /// This replica's id.
    pub fn replica_id(&self) -> &str {
        &self.inner.replica.id
    }

    /// Whether this replica runs the background work now.
    pub fn is_leader(&self) -> bool {
        let until = self
            .inner
            .replica
            .leader_until
            .lock()
            .map(|u| *u)
            .unwrap_or(None);
        self.inner.replica.leader.load(Ordering::Relaxed)
            && until.is_some_and(|u| std::time::Instant::now() < u)
    }

    /// Stops acting as leader at once (shutdown).
    pub fn step_down(&self) {
        self.inner.replica.leader.store(false, Ordering::Relaxed);
    }

    fn replica_stale_after(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.config().cluster.replica_stale_after.0)
            .unwrap_or(chrono::TimeDelta::MAX)
    }

    /// Registers this replica (at start-up, and again if its row is gone).
    pub async fn register_replica(&self) -> Result<()> {
        let now = Utc::now();
        self.store()
            .register_replica(entity::replica::Model {
                id: self.replica_id().to_string(),
                endpoint: self.inner.replica.endpoint.clone(),
                hostname: crate::worker::hostname(),
                started_at: now,
                heartbeat_at: now,
                stopped_at: None,
            })
            .await?;
        Ok(())
    }

    /// Whether another replica has been heard from recently.
    pub async fn other_replicas_alive(&self) -> Result<bool> {
        let stale = self.replica_stale_after();
        let now = Utc::now();
        Ok(self.store().list_replicas().await?.iter().any(|r| {
            r.id != self.replica_id() && r.stopped_at.is_none() && now - r.heartbeat_at < stale
        }))
    }

    /// Every replica on this database (admins only).
    pub async fn admin_replicas(&self, caller: &crate::auth::Caller) -> Result<Vec<ReplicaStatus>> {
        self.require_admin(caller)?;
        self.replicas().await
    }

    /// Every replica on this database.
    async fn replicas(&self) -> Result<Vec<ReplicaStatus>> {
        let stale = self.replica_stale_after();
        let now = Utc::now();
        let leader = self.store().leader(BACKGROUND).await?;
        Ok(self
            .store()
            .list_replicas()
            .await?
            .into_iter()
            .map(|r| ReplicaStatus {
                alive: r.stopped_at.is_none() && now - r.heartbeat_at < stale,
                leader: leader
                    .as_ref()
                    .is_some_and(|l| l.holder == r.id && l.expires_at > now),
                id: r.id,
                endpoint: r.endpoint,
                started_at: r.started_at,
                heartbeat_at: r.heartbeat_at,
            })
            .collect())
    }

    /// One round of cluster upkeep: heartbeat, leadership, workers heard
    /// by other replicas, and (as leader) what dead replicas left.
    pub async fn cluster_tick(&self) -> Result<()> {
        let started = std::time::Instant::now();
        let now = Utc::now();
        if !self
            .store()
            .replica_heartbeat(self.replica_id(), now)
            .await?
        {
            self.register_replica().await?;
        }
        let until = now + self.replica_stale_after();
        let term = self
            .store()
            .try_lead(BACKGROUND, self.replica_id(), now, until)
            .await;
        let leads = matches!(term, Ok(Some(_)));
        if leads && let Ok(mut until) = self.inner.replica.leader_until.lock() {
            // Three quarters of the lease, counted from before the renewal.
            *until = Some(started + self.config().cluster.replica_stale_after.0 * 3 / 4);
        }
        let was = self.inner.replica.leader.swap(leads, Ordering::Relaxed);
        match (&term, was) {
            (Ok(Some(term)), false) => {
                tracing::info!(
                    replica = self.replica_id(),
                    term,
                    "this replica leads the background work"
                );
            }
            (Ok(None), true) => {
                tracing::warn!(
                    replica = self.replica_id(),
                    "another replica took over the background work"
                );
            }
            (Err(e), true) => {
                tracing::warn!(replica = self.replica_id(), error = %e, "cannot renew leadership: background work paused");
            }
            _ => {}
        }
        term?;
        self.sync_workers().await?;
        if leads {
            self.finish_for_dead_replicas().await?;
        }
        Ok(())
    }

    /// Cluster upkeep every `every` until `shutdown`; then hands over
    /// leadership at once and records the clean stop.
    pub async fn run_cluster(self, every: Duration, shutdown: CancellationToken) {
        let mut tick = crate::ticker::every(every);
        let mut failures = 0u64;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => match self.cluster_tick().await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        if failures.is_multiple_of(50) {
                            tracing::warn!(error = %e, failures = failures + 1, "cluster upkeep failed");
                        }
                        failures += 1;
                    }
                },
            }
        }
        if let Err(e) = self.store().resign(BACKGROUND, self.replica_id()).await {
            tracing::warn!(error = %e, "cannot hand over leadership at shutdown");
        }
        if let Err(e) = self
            .store()
            .replica_stopped(self.replica_id(), Utc::now())
            .await
        {
            tracing::warn!(error = %e, "cannot record this replica's stop");
        }
    }

    /// The worker a record names. One that registered through another
    /// replica since this one last looked is read from the store first.
    pub(super) async fn worker_of(
        &self,
        worker_id: &str,
    ) -> Result<Arc<dyn crate::worker::Worker>> {
        match self.scheduler().worker_for(worker_id) {
            Ok(worker) => Ok(worker),
            Err(unknown) => {
                if self.store().get_worker(worker_id).await?.is_none() {
                    return Err(unknown.into());
                }
                self.sync_workers().await?;
                Ok(self.scheduler().worker_for(worker_id)?)
            }
        }
    }

    /// Makes every remote worker in the store known here with what its
    /// last heartbeat said, whichever replica heard it.
    pub(super) async fn sync_workers(&self) -> Result<()> {
        let scheduler = self.scheduler();
        let in_process: Vec<String> = scheduler
            .in_process_workers()
            .iter()
            .map(|w| w.id().to_string())
            .collect();
        let load = self.store().live_sandboxes_per_worker().await?;
        for row in self.store().list_workers().await? {
            if row.endpoint == "local" || in_process.contains(&row.id) {
                continue;
            }
            if !self.is_leader() {
                // The leader's reconciler counts its own; followers count
                // the records.
                let live = load.get(&row.id).copied().unwrap_or(0);
                scheduler.set_load(&row.id, usize::try_from(live).unwrap_or(usize::MAX));
            }
            let Some(secret) = self.config().auth.worker_tokens.get(&row.id) else {
                continue;
            };
            let Ok(endpoint) = crate::worker::rpc::checked_endpoint(&row.endpoint) else {
                continue;
            };
            let worker = match scheduler.remote(&row.id) {
                Some(known) if known.endpoint() == endpoint => known,
                _ => {
                    // Silence counts only from when this process could
                    // hear: a control plane that was down does not make its
                    // workers lost. Until a newer heartbeat, the snapshot
                    // is empty (placement and the reconciler wait for it).
                    let started = Utc::now()
                        - chrono::Duration::from_std(self.inner.started_at.elapsed())
                            .unwrap_or_default();
                    let worker = Arc::new(RemoteWorker::new(
                        &row.id,
                        &row.hostname,
                        &endpoint,
                        WorkerCredentials::new(&row.id, secret, self.config().auth.worker_auth),
                        row.last_heartbeat.max(started),
                        scheduler.stale_after(),
                    ));
                    scheduler.add_remote(worker.clone());
                    worker
                }
            };
            if worker
                .heard_from_at()
                .is_none_or(|t| row.last_heartbeat > t)
            {
                match serde_json::from_str(&row.snapshot) {
                    Ok(snapshot) => {
                        worker.observe(snapshot, row.last_heartbeat);
                        worker.set_instance(&row.instance);
                    }
                    // Written by a version without snapshots: wait for a
                    // heartbeat here.
                    Err(_) if row.snapshot.is_empty() => {}
                    Err(e) => {
                        tracing::warn!(worker = %row.id, error = %e, "unreadable worker snapshot in the store");
                    }
                }
            }
        }
        Ok(())
    }

    /// As leader: a replica silent past `cluster.replica_stale_after` (or
    /// stopped) can never finish the spawns and destroys it was driving nor
    /// report the commands it ran. Those records move to `error` (the
    /// reconciler then removes their runtimes) and those commands to
    /// `interrupted`, each a conditional write.
    async fn finish_for_dead_replicas(&self) -> Result<()> {
        let stale = self.replica_stale_after();
        let now = Utc::now();
        for replica in self.store().list_replicas().await? {
            let dead = replica.stopped_at.is_some() || now - replica.heartbeat_at >= stale;
            if replica.id == self.replica_id() || !dead {
                continue;
            }
            self.fail_steps_of(&replica.id, "stopped").await?;
        }
        Ok(())
    }

    /// Fails what replica `id` was driving: `creating` and `destroying`
    /// records, and running commands. `how` says what happened to it.
    pub(super) async fn fail_steps_of(&self, id: &str, how: &str) -> Result<()> {
        let steps = [SandboxState::Creating, SandboxState::Destroying];
        for model in self.store().sandboxes_driven_by(id, &steps).await? {
            let reason = format!("server {how} while the sandbox was {}", model.state);
            tracing::warn!(sandbox = %model.id, replica = %id, %reason, "recovering sandbox");
            self.transition_from(&model.id, &steps, SandboxState::Error, Some(reason))
                .await?;
        }
        let interrupted = self
            .store()
            .interrupt_executions_of_replica(
                id,
                &format!("interrupted: the server {how} while the command ran"),
            )
            .await?;
        if interrupted > 0 {
            tracing::warn!(replica = %id, count = interrupted, "executions interrupted");
        }
        Ok(())
    }

    /// Sends this replica's events to the others until `shutdown`.
    pub async fn run_event_outbox(
        self,
        mut outbox: tokio::sync::mpsc::Receiver<Event>,
        shutdown: CancellationToken,
    ) {
        let mut failures = 0u64;
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => break,
                event = outbox.recv() => match event {
                    Some(event) => event,
                    None => break,
                },
            };
            let payload = wire_payload(self.replica_id(), event);
            if let Err(e) = self.store().notify(EVENTS_CHANNEL, &payload).await {
                if failures.is_multiple_of(50) {
                    tracing::warn!(error = %e, failures = failures + 1, "cannot relay an event to other replicas");
                }
                failures += 1;
            }
        }
    }

    /// Delivers other replicas' events to this replica's subscribers until
    /// `shutdown`, reconnecting after a database outage (events sent while
    /// disconnected are lost; state is always in the store).
    pub async fn run_event_inbox(self, shutdown: CancellationToken) {
        loop {
            let mut listener = tokio::select! {
                () = shutdown.cancelled() => return,
                listener = self.store().listen(EVENTS_CHANNEL) => match listener {
                    Ok(listener) => listener,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for other replicas' events; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                },
            };
            loop {
                let received = tokio::select! {
                    () = shutdown.cancelled() => return,
                    received = listener.recv() => received,
                };
                match received {
                    Ok(notification) => self.deliver_wire(notification.payload()).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the event channel of other replicas; reconnecting");
                        break;
                    }
                }
            }
        }
    }

    async fn deliver_wire(&self, payload: &str) {
        let wire: WireEvent = match serde_json::from_str(payload) {
            Ok(wire) => wire,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable event from another replica");
                return;
            }
        };
        if wire.origin == self.replica_id() {
            return;
        }
        let event = match wire.body {
            WireBody::Event(event) => event,
            WireBody::AuditRef(id) => match self.store().audit_event(&id).await {
                Ok(Some(model)) => Event::Audit(AuditRecord::from(model)),
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(audit = %id, error = %e, "cannot read another replica's audit event");
                    return;
                }
            },
        };
        if let Event::SandboxState { state, .. } = &event
            && matches!(state, SandboxState::Destroyed | SandboxState::Error)
        {
            // A slot freed on another replica: queued spawns here retry.
            self.inner.spawn_queue.notify_capacity_freed();
        }
        self.events().deliver(event);
    }

    /// Serves the live output of an execution this replica runs to another
    /// replica (`authorization` carries the cluster's signed token).
    pub fn relay_output(
        &self,
        authorization: Option<&str>,
        execution_id: &str,
        from_seq: u64,
    ) -> Result<OutputFollower> {
        if !self
            .inner
            .replica
            .credentials
            .verify(authorization, Audience::Replica)
        {
            return Err(Error::Unauthorized("wrong replica token".into()));
        }
        let log = self.inner.outputs.get(execution_id).ok_or_else(|| {
            Error::NotFound(format!("execution {execution_id} is not running here"))
        })?;
        Ok(log.follow(from_seq))
    }

    /// Follows a command running on replica `replica_id` through it. The
    /// caller's access was checked on the execution record.
    pub(super) async fn follow_on_replica(
        &self,
        execution: &entity::execution::Model,
        from_seq: u64,
    ) -> Result<OutputFollower> {
        let not_here = || {
            Error::Unavailable(format!(
                "execution {} runs on replica {} which cannot be reached",
                execution.id, execution.replica_id
            ))
        };
        let replica = self
            .store()
            .list_replicas()
            .await?
            .into_iter()
            .find(|r| r.id == execution.replica_id)
            .ok_or_else(not_here)?;
        let alive = replica.stopped_at.is_none()
            && Utc::now() - replica.heartbeat_at < self.replica_stale_after();
        if !alive || replica.endpoint.is_empty() {
            return Err(not_here());
        }
        let url = format!(
            "{}/internal/v1/executions/{}/output?from_seq={from_seq}",
            replica.endpoint, execution.id
        );
        let request = self
            .inner
            .replica
            .client
            .get(url)
            .bearer_auth(self.inner.replica.credentials.bearer(Audience::Replica))
            .send();
        let resp = match tokio::time::timeout(CONNECT_TIMEOUT * 2, request).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                tracing::warn!(replica = %replica.id, error = %e, "cannot reach replica");
                return Err(not_here());
            }
            Err(_) => {
                tracing::warn!(replica = %replica.id, "replica did not answer in time");
                return Err(not_here());
            }
        };
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            // It just ended there: the record has the result now.
            return match self.store().get_execution(&execution.id).await? {
                Some(record)
                    if crate::lifecycle::ExecStatus::from_stored(&record.status)
                        != crate::lifecycle::ExecStatus::Running =>
                {
                    Ok(self.replay(record, from_seq))
                }
                _ => Err(not_here()),
            };
        }
        if !resp.status().is_success() {
            tracing::warn!(replica = %replica.id, status = %resp.status(), "replica refused to relay output");
            return Err(not_here());
        }
        let log = Arc::new(OutputLog::relay(
            &execution.sandbox_id,
            &execution.tenant_id,
            &execution.owner_id,
            from_seq,
        ));
        let pump = {
            let log = log.clone();
            let origin = replica.id.clone();
            tokio::spawn(async move {
                let end = pump_relay(resp, &log).await;
                if let Err(why) = end {
                    log.finish(OutputEnd {
                        exit_code: None,
                        duration: Duration::ZERO,
                        timed_out: false,
                        error: Some(format!("lost replica {origin} while following: {why}")),
                    });
                }
            })
        };
        Ok(log.follow_with(from_seq, tokio_util::task::AbortOnDropHandle::new(pump)))
    }
}

/// Copies another replica's output stream into `log` until its end.
async fn pump_relay(resp: reqwest::Response, log: &OutputLog) -> std::result::Result<(), String> {
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let wire: WireOutput =
                serde_json::from_slice(&line[..pos]).map_err(|e| e.to_string())?;
            match wire {
                WireOutput::Chunk {
                    seq,
                    stream,
                    text,
                    bytes,
                } => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(bytes)
                        .map_err(|e| e.to_string())?;
                    log.append_at(seq, stream, text, bytes.into());
                }
                WireOutput::Truncated { to_seq, .. } => log.skip_to(to_seq),
                WireOutput::KeepAlive => {}
                WireOutput::End {
                    exit_code,
                    duration_ms,
                    timed_out,
                    error,
                } => {
                    log.finish(OutputEnd {
                        exit_code,
                        duration: Duration::from_millis(duration_ms),
                        timed_out,
                        error,
                    });
                    return Ok(());
                }
            }
        }
        if buf.len() > MAX_RELAY_LINE {
            return Err("output line too long".into());
        }
        match tokio::time::timeout(RELAY_SILENCE, stream.next()).await {
            Ok(Some(Ok(bytes))) => buf.extend_from_slice(&bytes),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("the stream ended without the command's end".into()),
            Err(_) => return Err(format!("silent for {} s", RELAY_SILENCE.as_secs())),
        }
    }
}

/// The NOTIFY payload for an event, always under PostgreSQL's limit: an
/// audit event too large travels as its id, any other has its reason cut.
fn wire_payload(origin: &str, event: Event) -> String {
    let audit_id = match &event {
        Event::Audit(record) => Some(record.id.clone()),
        _ => None,
    };
    let encode = |body| {
        serde_json::to_string(&WireEvent {
            origin: origin.to_string(),
            body,
        })
        .unwrap_or_default()
    };
    let mut event = event;
    let payload = encode(WireBody::Event(event.clone()));
    if payload.len() < MAX_PAYLOAD {
        return payload;
    }
    if let Some(id) = audit_id {
        return encode(WireBody::AuditRef(id));
    }
    if let Event::SandboxState { reason, .. } = &mut event
        && let Some(text) = reason
    {
        *text = text.chars().take(1000).collect();
    }
    encode(WireBody::Event(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit(detail: &str) -> Event {
        Event::Audit(AuditRecord {
            id: "au-1".into(),
            actor: "alice".into(),
            tenant_id: "default".into(),
            action: "sandbox.spawn".into(),
            target: "sb-1".into(),
            outcome: "success".into(),
            request_id: "r".into(),
            detail: Some(detail.into()),
            created_at: Utc::now(),
        })
    }

    #[test]
    fn payloads_stay_under_the_notify_limit_and_round_trip() {
        let small = wire_payload("rp-a", audit("short"));
        let back: WireEvent = serde_json::from_str(&small).expect("decodes");
        assert_eq!(back.origin, "rp-a");
        assert!(
            matches!(back.body, WireBody::Event(Event::Audit(ref r)) if r.detail.as_deref() == Some("short"))
        );

        let big = wire_payload("rp-a", audit(&"x".repeat(20_000)));
        assert!(big.len() < MAX_PAYLOAD, "{}", big.len());
        let back: WireEvent = serde_json::from_str(&big).expect("decodes");
        assert!(matches!(back.body, WireBody::AuditRef(ref id) if id == "au-1"));

        let state = Event::SandboxState {
            sandbox_id: "sb-1".into(),
            owner_id: "o".into(),
            tenant_id: "t".into(),
            state: SandboxState::Error,
            reason: Some("y".repeat(20_000)),
            at: Utc::now(),
        };
        let cut = wire_payload("rp-a", state);
        assert!(cut.len() < MAX_PAYLOAD, "{}", cut.len());
        let back: WireEvent = serde_json::from_str(&cut).expect("decodes");
        assert!(matches!(
            back.body,
            WireBody::Event(Event::SandboxState { reason: Some(ref r), state: SandboxState::Error, .. }) if r.len() == 1000
        ));
    }
}
