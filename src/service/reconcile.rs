//! The reconciler: makes the store tell the truth about the runtimes.
//!
//! Each sandbox has a desired state (its record) and an observed state (what
//! its worker's inventory says). One pass compares the two for every
//! provider of every worker and acts:
//!
//! - a record whose runtime runs is kept (at start-up: adopted);
//! - a runtime that stopped (killed, OOM, its init exited) or vanished
//!   moves its record to `error` with the cause;
//! - a sandbox that cannot be observed (the provider is down) turns
//!   `unhealthy`, and `running` again once it answers; both need a few
//!   consecutive observations, so one slow probe does not flap;
//! - `error` sandboxes are destroyed, retried with exponential backoff;
//! - a runtime with no live record is destroyed (after a grace period,
//!   except at start-up when no spawn can be in flight).
//!
//! Every action is a persisted transition (hence a state event with the
//! reason) and an audit event by `system`.
//!
//! A pass is incremental: it keeps each worker's live records from the
//! last pass and reads only those that changed since (their `updated_at`,
//! or their lease taken or let go), then compares them all with the
//! inventories. Every `lifecycle.reconcile_full_interval` (and at start-up, after leases
//! expired, while a worker is silent) it reads them all again. What it acts
//! on it reads afresh first: a copy that is out of date delays a verdict by
//! one pass, never makes a wrong one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::sandboxes::{FINAL_GENERATION, lease_generation};
use super::{Result, Service};
use crate::auth::Caller;
use crate::lifecycle::SandboxState;
use crate::provider::{InventoryItem, RuntimeStatus};
use crate::store::ReconcileRow;
use crate::worker::{RuntimeRef, Worker};

/// First wait before retrying a failed destroy; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How long a record may sit in `expired` (set just before its destroy)
/// before the reconciler takes over the destroy.
const EXPIRED_STUCK_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

/// The most expired leases one pass releases per worker (the next pass
/// takes the rest), so a pass stays bounded.
const MAX_RELEASES_PER_PASS: u64 = 1000;

/// The most records whose lease alone changed that an incremental pass
/// reads one by one; past it, the pass reads every record.
const MAX_LEASE_ONLY_CHANGES: usize = 256;

/// How far before the previous read an incremental read looks: covers
/// other replicas' clocks and writes committed after they took their
/// timestamp (a transition takes it before its connection; a pool claim
/// may wait up to 15 s for PostgreSQL's admission lock). A change older
/// than this when committed waits for the next full read.
const CHANGE_SKEW: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

/// Where a pass's records came from: a full read just now (`fresh`), or
/// the copy kept between passes, which is read again before acting on.
#[derive(Clone, Copy)]
struct Reading<'a> {
    worker: &'a str,
    fresh: bool,
}

/// What one provider's pass works with.
#[derive(Clone, Copy)]
struct ProviderPass<'a> {
    worker: &'a dyn Worker,
    provider: &'a str,
    startup: bool,
    reading: Reading<'a>,
}

/// What one pass did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Records whose runtime was found running (start-up: adopted).
    pub running: usize,
    /// Records moved to `error` because their runtime stopped or vanished.
    pub failed: usize,
    /// Records moved between `running` and `unhealthy`.
    pub health_changes: usize,
    /// Sandboxes destroyed from `error` or `expired`.
    pub destroyed: usize,
    /// Runtimes without a live record that were destroyed.
    pub orphans_destroyed: usize,
    /// Workers whose live records this pass read whole (the others' were
    /// brought up to date with what changed).
    pub full_reads: usize,
    /// Live records compared with the inventories.
    pub records: usize,
}

impl ReconcileReport {
    fn add(&mut self, other: &ReconcileReport) {
        self.running += other.running;
        self.failed += other.failed;
        self.health_changes += other.health_changes;
        self.destroyed += other.destroyed;
        self.orphans_destroyed += other.orphans_destroyed;
        self.full_reads += other.full_reads;
        self.records += other.records;
    }
}

/// What the reconciler remembers between passes (in memory: a restart
/// starts counting afresh, which only delays a verdict by one pass).
#[derive(Debug, Default)]
pub(super) struct ReconcileMemory {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    /// Observations of live sandboxes, forgotten when a sandbox leaves
    /// its worker's copy of the live records.
    sandboxes: HashMap<String, Observation>,
    /// (provider, runtime id) -> when it was first seen without a live
    /// record.
    orphans: HashMap<(String, String), Instant>,
    /// Each worker's live records as the passes read them.
    rows: HashMap<String, WorkerRows>,
}

/// One worker's live records, kept between passes.
#[derive(Debug, Default)]
struct WorkerRows {
    rows: HashMap<String, Arc<ReconcileRow>>,
    /// When the last read (full or incremental) began.
    read_at: Option<DateTime<Utc>>,
    /// When the last full read was made.
    full_at: Option<Instant>,
}

impl MemoryInner {
    /// Takes a record as read now into its worker's copy: kept while live,
    /// dropped (and its observations forgotten) otherwise.
    fn take_row(&mut self, worker: &str, row: ReconcileRow) {
        if is_live_state(&row.state) {
            let kept = self.rows.entry(worker.to_string()).or_default();
            kept.rows.insert(row.id.clone(), Arc::new(row));
        } else {
            self.drop_row(worker, &row.id);
        }
    }

    /// Drops a record from its worker's copy: no longer live there.
    fn drop_row(&mut self, worker: &str, id: &str) {
        if let Some(kept) = self.rows.get_mut(worker) {
            kept.rows.remove(id);
        }
        self.sandboxes.remove(id);
    }

    /// Everything kept of a worker this replica no longer reconciles.
    fn forget_worker(&mut self, worker: &str) {
        if let Some(kept) = self.rows.remove(worker) {
            for id in kept.rows.keys() {
                self.sandboxes.remove(id);
            }
        }
    }

    /// A worker's copy replaced by a full read; what left it is forgotten.
    fn replace_rows(&mut self, worker: &str, rows: &[Arc<ReconcileRow>], began: DateTime<Utc>) {
        let kept = self.rows.entry(worker.to_string()).or_default();
        let before = std::mem::replace(
            &mut kept.rows,
            rows.iter().map(|r| (r.id.clone(), Arc::clone(r))).collect(),
        );
        kept.read_at = Some(began);
        kept.full_at = Some(Instant::now());
        for id in before.keys() {
            if !kept.rows.contains_key(id) {
                self.sandboxes.remove(id);
            }
        }
    }
}

/// Consecutive observations of one sandbox.
#[derive(Debug, Default, Clone)]
struct Observation {
    /// The runtime could not be observed (provider down, probe failed).
    failures: u32,
    /// The runtime was seen running.
    successes: u32,
    /// When the next destroy of an `error` sandbox may be tried, and the
    /// wait after that one.
    retry_at: Option<(Instant, Duration)>,
}

/// The verdict on one usable sandbox after an observation.
enum Verdict {
    Nothing,
    Unhealthy(String),
    Recovered,
    Failed(String),
}

impl ReconcileMemory {
    fn with<T>(&self, f: impl FnOnce(&mut MemoryInner) -> T) -> T {
        let mut guard = match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    fn observe(&self, id: &str, update: impl FnOnce(&mut Observation)) -> Observation {
        self.with(|m| {
            // A key is allocated once per sandbox, not once per pass.
            if !m.sandboxes.contains_key(id) {
                m.sandboxes.insert(id.to_string(), Observation::default());
            }
            match m.sandboxes.get_mut(id) {
                Some(obs) => {
                    update(obs);
                    obs.clone()
                }
                None => Observation::default(),
            }
        })
    }

    fn forget(&self, id: &str) {
        self.with(|m| m.sandboxes.remove(id));
    }
}

impl Service {
    /// Runs the reconciler every `every` until `shutdown` fires: each
    /// worker's pass is its own task, and a worker whose previous pass is
    /// still running (its RPCs hang) is skipped this tick, so it delays
    /// nobody else's.
    pub async fn run_reconciler(self, every: Duration, shutdown: CancellationToken) {
        let mut tick = crate::ticker::every(every);
        let mut passes: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = self.refresh_admin_states().await {
                        tracing::warn!(error = %e, "cannot read worker admin states");
                    }
                    passes.retain(|_, pass| !pass.is_finished());
                    for worker in self.scheduler().workers() {
                        // Remote workers are reconciled by the leader; a
                        // worker in this process only from here.
                        if !worker.in_process() && !self.is_leader() {
                            // Another replica reconciles it now: what this
                            // one kept of it goes.
                            self.inner.reconcile.with(|m| m.forget_worker(worker.id()));
                            continue;
                        }
                        if passes.contains_key(worker.id()) {
                            tracing::debug!(worker = worker.id(), "previous reconcile pass still running");
                            continue;
                        }
                        let service = self.clone();
                        let id = worker.id().to_string();
                        passes.insert(id, tokio::spawn(async move {
                            if let Err(e) = service.reconcile_one(worker.as_ref(), false).await {
                                tracing::warn!(worker = worker.id(), error = %e, "reconcile pass failed");
                            }
                        }));
                    }
                }
            }
        }
        // A pass in flight finishes (a destroy cut off half-way would be
        // left `destroying`), bounded.
        for (worker, pass) in passes {
            if tokio::time::timeout(Duration::from_secs(10), pass)
                .await
                .is_err()
            {
                tracing::warn!(%worker, "reconcile pass still running at shutdown; left to the runtime");
            }
        }
    }

    /// One worker's pass, with its report logged and what the reconciler
    /// remembers of that worker's sandboxes brought up to date.
    async fn reconcile_one(&self, worker: &dyn Worker, startup: bool) -> Result<ReconcileReport> {
        let started = std::time::Instant::now();
        let mut report = ReconcileReport::default();
        self.reconcile_worker(worker, startup, &mut report).await?;
        // `stacyvm bench --scale` reads this line.
        tracing::debug!(
            worker = worker.id(),
            records = report.records,
            full = report.full_reads > 0,
            took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "reconcile pass"
        );
        if !startup
            && report.failed + report.health_changes + report.destroyed + report.orphans_destroyed
                > 0
        {
            tracing::info!(worker = worker.id(), ?report, "reconcile pass acted");
        }
        Ok(report)
    }

    /// One reconcile pass over every provider of every worker. With
    /// `startup`, runtimes without a record are destroyed at once (no spawn
    /// can be in flight yet) and surviving sandboxes are reported adopted.
    pub async fn reconcile(&self, startup: bool) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        self.refresh_admin_states().await?;
        // Every worker at once: those in this process, and remote ones
        // when this replica leads.
        let leads = self.is_leader();
        let workers: Vec<_> = self
            .scheduler()
            .workers()
            .into_iter()
            .filter(|w| w.in_process() || leads)
            .collect();
        let passes = workers
            .iter()
            .map(|worker| self.reconcile_one(worker.as_ref(), startup));
        for pass in futures::future::join_all(passes).await {
            report.add(&pass?);
        }
        if startup {
            tracing::info!(?report, "start-up reconcile");
        }
        Ok(report)
    }

    /// The records of one worker against its providers' inventories.
    async fn reconcile_worker(
        &self,
        worker: &dyn Worker,
        startup: bool,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        let started = Instant::now();
        // A worker in this process is alive while this runs.
        if worker.in_process() {
            self.renew_leases_in_process(worker.id()).await?;
        }
        let expired = self
            .store()
            .release_expired_leases(worker.id(), Utc::now(), MAX_RELEASES_PER_PASS)
            .await?;
        if !expired.is_empty() {
            tracing::warn!(
                worker = worker.id(),
                count = expired.len(),
                "leases expired and released"
            );
        }
        // Every live record with its lease (warm sandboxes are runtimes
        // like any other), after the releases above: read whole when
        // anything is in doubt, else what changed since the last pass.
        let leases_done = started.elapsed();
        let silent_since = self.silent_since(worker);
        let full = startup || !expired.is_empty() || silent_since.is_some();
        let (records, fresh) = self.worker_rows(worker.id(), full).await?;
        let reading = Reading {
            worker: worker.id(),
            fresh,
        };
        report.full_reads += usize::from(fresh);
        let rows_done = started.elapsed();
        report.records += records.len();
        self.scheduler().set_load(worker.id(), records.len());
        // A lease that was let go (expired while the worker was silent)
        // means the sandbox is lost, even if its worker answers again.
        let lost: std::collections::HashSet<String> = records
            .iter()
            .filter(|r| {
                r.lease_generation.is_some()
                    && (r.lease_released_at.is_some()
                        || r.lease_worker_id.as_deref() != Some(worker.id()))
            })
            .map(|r| r.id.clone())
            .collect();
        let state = self.worker_state(worker);
        if self
            .store()
            .set_worker_status(worker.id(), state.as_str())
            .await?
        {
            tracing::warn!(
                worker = worker.id(),
                state = state.as_str(),
                "worker state changed"
            );
        }
        if let Some(since) = silent_since {
            // Nothing on it can be observed or destroyed: say so, and once
            // its leases expired, that its sandboxes are lost.
            let why = format!(
                "worker {} unreachable since {}",
                worker.id(),
                since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            for record in records.iter().filter(|r| is_usable(r)) {
                let verdict = if lost.contains(record.id.as_str()) {
                    Verdict::Failed(format!("lost: {why}"))
                } else if record.state == SandboxState::Unhealthy.as_str() {
                    continue;
                } else {
                    Verdict::Unhealthy(why.clone())
                };
                let failed = matches!(verdict, Verdict::Failed(_));
                if self.apply(reading, record, verdict).await? {
                    if failed {
                        report.failed += 1;
                    } else {
                        report.health_changes += 1;
                    }
                }
            }
            return Ok(());
        }
        // Back, but too late: its sandboxes were lost when their leases
        // expired; they are destroyed under a reclaimed lease.
        for record in records
            .iter()
            .filter(|r| is_usable(r) && lost.contains(r.id.as_str()))
        {
            let why = format!(
                "lost: the lease of worker {} expired while it was unreachable",
                worker.id()
            );
            if self.apply(reading, record, Verdict::Failed(why)).await? {
                report.failed += 1;
            }
        }
        // Each record goes to its provider's pass.
        let mut by_provider: HashMap<String, Vec<Arc<ReconcileRow>>> = HashMap::new();
        for record in records {
            if is_usable(&record) && lost.contains(record.id.as_str()) {
                continue;
            }
            // The provider's name is copied once per provider, not per record.
            match by_provider.get_mut(&record.provider) {
                Some(mine) => mine.push(record),
                None => {
                    by_provider.insert(record.provider.clone(), vec![record]);
                }
            }
        }
        let mut inventory_took = Duration::ZERO;
        for provider in worker.snapshot().providers {
            let mine = by_provider.remove(&provider.name).unwrap_or_default();
            // Records are read before the inventory: a runtime created after
            // the inventory was taken belongs to a record we did not read.
            let unhealthy = provider
                .health
                .filter(|h| !h.healthy)
                .map(|h| h.error.unwrap_or_else(|| "provider unhealthy".into()));
            let asked = Instant::now();
            let inventory = match unhealthy {
                Some(why) => Err(why),
                None => worker
                    .inventory(&provider.name)
                    .await
                    .map_err(|e| e.to_string()),
            };
            inventory_took += asked.elapsed();
            match inventory {
                Ok(items) => {
                    let pass = ProviderPass {
                        worker,
                        provider: &provider.name,
                        startup,
                        reading,
                    };
                    self.reconcile_provider(&pass, mine, items, report).await?;
                }
                Err(why) => {
                    // Nothing can be observed: usable sandboxes count a
                    // failed probe; destroys wait for the provider.
                    let why = match worker.heard_from() {
                        Some(since) => format!(
                            "worker {} unreachable since {}: {why}",
                            worker.id(),
                            since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ),
                        None => format!("cannot observe the sandbox: {why}"),
                    };
                    for record in mine.iter().filter(|r| is_usable(r)) {
                        let verdict = self.failed_observation(record, why.clone());
                        if self.apply(reading, record, verdict).await? {
                            report.health_changes += 1;
                        }
                    }
                }
            }
        }
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        tracing::debug!(
            worker = worker.id(),
            leases_us = us(leases_done),
            rows_us = us(rows_done - leases_done),
            inventory_us = us(inventory_took),
            total_us = us(started.elapsed()),
            "reconcile phases"
        );
        Ok(())
    }

    /// Online, stale or offline: the one place the thresholds meet.
    fn worker_state(&self, worker: &dyn Worker) -> crate::worker::WorkerState {
        use crate::worker::WorkerState;
        let Some(since) = self.silent_since(worker) else {
            return WorkerState::Online;
        };
        let silent = (Utc::now() - since).to_std().unwrap_or_default();
        if silent >= self.config().lifecycle.worker_lost_after.0 {
            WorkerState::Offline
        } else {
            WorkerState::Stale
        }
    }

    /// When a worker out of reach was last heard from, if it has been
    /// silent past `lifecycle.worker_stale_after`.
    fn silent_since(&self, worker: &dyn Worker) -> Option<chrono::DateTime<Utc>> {
        let since = worker.heard_from()?;
        (!self.scheduler().is_fresh(worker)).then_some(since)
    }

    async fn reconcile_provider(
        &self,
        pass: &ProviderPass<'_>,
        records: Vec<Arc<ReconcileRow>>,
        inventory: Vec<InventoryItem>,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        let ProviderPass {
            worker,
            provider,
            startup,
            reading,
        } = *pass;
        let mut by_sandbox: HashMap<String, InventoryItem> = inventory
            .into_iter()
            .map(|item| (item.sandbox_id.clone(), item))
            .collect();
        let now = Utc::now();
        for record in records {
            let item = by_sandbox.remove(&record.id);
            let state = record.state.parse::<SandboxState>().ok();
            match state {
                Some(SandboxState::Running | SandboxState::Unhealthy) => {
                    let lease = record
                        .lease_generation
                        .and_then(|g| u64::try_from(g).ok())
                        .unwrap_or(0);
                    let verdict = self.observe(worker, provider, &record, item, lease).await;
                    match verdict {
                        Verdict::Nothing => {}
                        Verdict::Failed(_) => {
                            if self.apply(reading, &record, verdict).await? {
                                report.failed += 1;
                            }
                            continue;
                        }
                        Verdict::Unhealthy(_) | Verdict::Recovered => {
                            if self.apply(reading, &record, verdict).await? {
                                report.health_changes += 1;
                            }
                        }
                    }
                    report.running += 1;
                    // A warm sandbox's trail starts with its claim.
                    if startup && record.pool_key.is_none() {
                        self.audit_system(super::AuditAction::SandboxAdopt, &record.id, None)
                            .await;
                    }
                }
                Some(SandboxState::Error) => {
                    let destroyed = self.retry_destroy(reading, &record).await?;
                    report.destroyed += usize::from(destroyed);
                }
                Some(SandboxState::Expired)
                    if startup || now - record.updated_at > EXPIRED_STUCK_AFTER =>
                {
                    if !self.still_as_read(reading, &record).await? {
                        continue;
                    }
                    // Acting: the whole record, as it is now.
                    let Some(full) = self.store().get_sandbox(&record.id).await? else {
                        continue;
                    };
                    let reason = full.state_reason.clone();
                    let id = full.id.clone();
                    let audit = super::lifecycle::DestroyAudit {
                        caller: &Caller::system(),
                        action: super::AuditAction::SandboxExpire,
                    };
                    match self.destroy_record(full, reason, audit).await {
                        Ok(()) => report.destroyed += 1,
                        Err(e) => {
                            tracing::warn!(sandbox = %id, error = %e, "destroy of an expired sandbox failed")
                        }
                    }
                }
                // creating, destroying: an operation is in flight (start-up
                // recovery has already moved those a crash interrupted).
                _ => {}
            }
        }
        // What is left in the inventory has no live record of this provider.
        let grace = self.config().lifecycle.orphan_grace.0;
        // Orphans are remembered per worker and provider.
        let name = format!("{}/{provider}", worker.id());
        // Forget runtimes of this provider that are no longer left over.
        let leftover: std::collections::HashSet<String> =
            by_sandbox.values().map(|i| i.runtime_id.clone()).collect();
        self.inner.reconcile.with(|m| {
            m.orphans
                .retain(|(p, runtime), _| *p != name || leftover.contains(runtime))
        });
        for item in by_sandbox.into_values() {
            let record = self.store().get_sandbox(&item.sandbox_id).await?;
            if record.as_ref().is_some_and(is_live) {
                // Live under another provider or worker: not ours to judge.
                continue;
            }
            let first_seen = self.inner.reconcile.with(|m| {
                *m.orphans
                    .entry((name.clone(), item.runtime_id.clone()))
                    .or_insert_with(Instant::now)
            });
            let old_enough = item
                .created_at
                .is_some_and(|t| (now - t).to_std().is_ok_and(|age| age >= grace));
            if !(startup || old_enough || first_seen.elapsed() >= grace) {
                continue;
            }
            let why = match &record {
                Some(r) => format!("runtime outlived its sandbox record (state {})", r.state),
                None => "runtime has no sandbox record".to_string(),
            };
            tracing::warn!(sandbox = %item.sandbox_id, runtime = %item.runtime_id, %why, "destroying orphaned runtime");
            // The record's lease is reclaimed first (its holder may have
            // been someone else); a runtime no record owns gets the last
            // generation.
            let lease = match &record {
                Some(r) => {
                    let lease = self
                        .store()
                        .reclaim_lease(&r.id, worker.id(), self.lease_until())
                        .await?;
                    lease_generation(Some(&lease))
                }
                None => FINAL_GENERATION,
            };
            let runtime = RuntimeRef {
                sandbox_id: item.sandbox_id.clone(),
                provider: provider.to_string(),
                runtime_id: Some(item.runtime_id.clone()),
                lease,
            };
            match worker.destroy(&runtime).await {
                Ok(()) => {
                    // The reclaim was only to destroy it: let go again, so
                    // heartbeats do not renew a dead sandbox's lease.
                    if record.is_some() {
                        self.store()
                            .release_lease(&item.sandbox_id, Utc::now())
                            .await?;
                    }
                    self.inner
                        .reconcile
                        .with(|m| m.orphans.remove(&(name.clone(), item.runtime_id.clone())));
                    report.orphans_destroyed += 1;
                    self.audit_system(
                        super::AuditAction::SandboxOrphanDestroy,
                        &item.sandbox_id,
                        Some(why),
                    )
                    .await;
                }
                Err(e) => {
                    tracing::warn!(runtime = %item.runtime_id, error = %e, "cannot destroy orphaned runtime; will retry");
                }
            }
        }
        Ok(())
    }

    /// Observes one usable sandbox and decides, with hysteresis, whether
    /// its state must change.
    async fn observe(
        &self,
        worker: &dyn Worker,
        provider: &str,
        record: &ReconcileRow,
        item: Option<InventoryItem>,
        lease: u64,
    ) -> Verdict {
        let lifecycle = &self.config().lifecycle;
        let memory = &self.inner.reconcile;
        // Not listed: ask by handle before believing it is gone (a runtime
        // made before the inventory's labels existed is still found).
        let status = match item {
            Some(item) if item.status == RuntimeStatus::Running => RuntimeStatus::Running,
            // Listed as stopped: ask for the detailed cause (it may also
            // have come back since the listing). Not listed: ask by handle
            // before believing it is gone (a runtime made before the
            // inventory's labels existed is still found).
            listed => match listed
                .map(|i| i.runtime_id)
                .or_else(|| record.runtime_id.clone())
            {
                None => RuntimeStatus::Missing,
                Some(handle) => match worker
                    .inspect(&RuntimeRef {
                        sandbox_id: record.id.clone(),
                        provider: provider.to_string(),
                        runtime_id: Some(handle),
                        lease,
                    })
                    .await
                {
                    Ok(status) => status,
                    Err(e) => {
                        return self.failed_observation(
                            record,
                            format!("cannot inspect the sandbox: {e}"),
                        );
                    }
                },
            },
        };
        match status {
            // Running and seen running, the common case: only a count of
            // failed probes to clear (no entry is made for it).
            RuntimeStatus::Running if record.state == SandboxState::Running.as_str() => {
                memory.with(|m| {
                    if let Some(o) = m.sandboxes.get_mut(&record.id) {
                        o.failures = 0;
                    }
                });
                Verdict::Nothing
            }
            RuntimeStatus::Running => {
                let obs = memory.observe(&record.id, |o| {
                    o.successes += 1;
                    o.failures = 0;
                });
                if record.state == SandboxState::Unhealthy.as_str()
                    && obs.successes >= lifecycle.healthy_after
                {
                    Verdict::Recovered
                } else {
                    Verdict::Nothing
                }
            }
            // Gone is gone: one observation is enough (records are read
            // before the inventory, so a spawn in flight cannot look gone).
            RuntimeStatus::Missing => {
                Verdict::Failed("the runtime was removed outside StacyVM".to_string())
            }
            // The inventory said stopped and `inspect` confirmed it just now.
            // Nothing restarts sandboxes behind our back (no restart policy;
            // after a daemon outage the provider restarts them before it
            // reports healthy), so one confirmed look is a verdict.
            RuntimeStatus::Stopped { cause } => {
                Verdict::Failed(format!("the sandbox stopped: {cause}"))
            }
        }
    }

    /// Counts an observation that could not be made; after
    /// `unhealthy_after` in a row the verdict is `unhealthy` with `why`.
    fn failed_observation(&self, record: &ReconcileRow, why: String) -> Verdict {
        let obs = self.inner.reconcile.observe(&record.id, |o| {
            o.failures += 1;
            o.successes = 0;
        });
        if obs.failures >= self.config().lifecycle.unhealthy_after {
            Verdict::Unhealthy(why)
        } else {
            Verdict::Nothing
        }
    }

    /// Applies a verdict with a conditional transition from the states it
    /// was made in. Returns whether the record changed.
    async fn apply(
        &self,
        reading: Reading<'_>,
        record: &ReconcileRow,
        verdict: Verdict,
    ) -> Result<bool> {
        use SandboxState::{Error, Running, Unhealthy};
        let (from, to, reason, action): (&[SandboxState], _, _, _) = match verdict {
            Verdict::Nothing => return Ok(false),
            Verdict::Unhealthy(why) => (
                &[Running],
                Unhealthy,
                why,
                super::AuditAction::SandboxUnhealthy,
            ),
            Verdict::Recovered => (
                &[Unhealthy],
                Running,
                "the runtime answers again".to_string(),
                super::AuditAction::SandboxRecover,
            ),
            Verdict::Failed(why) => (
                &[Running, Unhealthy],
                Error,
                why,
                super::AuditAction::SandboxFail,
            ),
        };
        // Already past it as far as we saw (e.g. unhealthy and still
        // unobservable): no write needed; the store re-checks anyway.
        if !from.iter().any(|s| s.as_str() == record.state) {
            return Ok(false);
        }
        if !self.still_as_read(reading, record).await? {
            return Ok(false);
        }
        let moved = self
            .transition_from(&record.id, from, to, Some(reason.clone()))
            .await?;
        let changed = moved.is_some();
        if let Some(moved) = moved {
            tracing::warn!(sandbox = %record.id, state = %to, %reason, "sandbox state observed");
            if to != Running {
                // A new condition starts its own count.
                self.inner
                    .reconcile
                    .observe(&record.id, |o| o.successes = 0);
            }
            if to == Error {
                self.inner
                    .reconcile
                    .observe(&record.id, |o| o.retry_at = None);
            }
            // As the record is now: a claim may have made it a caller's
            // since the pass read it.
            if moved.pool_key.is_none() {
                self.audit_system(action, &record.id, Some(reason)).await;
            }
        }
        Ok(changed)
    }

    /// Destroys a sandbox in `error` when its backoff allows. Returns
    /// whether it is now destroyed.
    async fn retry_destroy(&self, reading: Reading<'_>, record: &ReconcileRow) -> Result<bool> {
        let memory = &self.inner.reconcile;
        let now = Instant::now();
        let due = memory.with(|m| {
            m.sandboxes
                .get(&record.id)
                .and_then(|o| o.retry_at)
                .is_none_or(|(at, _)| now >= at)
        });
        if !due || !self.still_as_read(reading, record).await? {
            return Ok(false);
        }
        let id = record.id.clone();
        // Acting: the whole record, as it is now.
        let Some(full) = self.store().get_sandbox(&id).await? else {
            return Ok(false);
        };
        let reason = full.state_reason.clone();
        let audit = super::lifecycle::DestroyAudit {
            caller: &Caller::system(),
            action: super::AuditAction::SandboxDestroy,
        };
        match self.destroy_record(full, reason, audit).await {
            Ok(()) => {
                memory.forget(&id);
                Ok(true)
            }
            Err(e) => {
                let obs = memory.observe(&id, |o| {
                    let wait = o
                        .retry_at
                        .map_or(FIRST_BACKOFF, |(_, wait)| (wait * 2).min(MAX_BACKOFF));
                    o.retry_at = Some((now + wait, wait));
                });
                let wait = obs.retry_at.map(|(_, w)| w).unwrap_or(FIRST_BACKOFF);
                tracing::warn!(sandbox = %id, error = %e, retry_in = ?wait, "destroy failed; will retry");
                Ok(false)
            }
        }
    }

    /// A worker's live records: all of them read now when `full` (or the
    /// last full read is `lifecycle.reconcile_full_interval` old, or there
    /// is none), else
    /// the copy kept from the last pass brought up to date with what
    /// changed since. Returns them and whether they were all read now.
    async fn worker_rows(
        &self,
        worker: &str,
        full: bool,
    ) -> Result<(Vec<Arc<ReconcileRow>>, bool)> {
        let memory = &self.inner.reconcile;
        let every = self.config().lifecycle.reconcile_full_interval.0;
        let since = memory.with(|m| {
            let kept = m.rows.get(worker)?;
            let recent = kept.full_at.is_some_and(|at| at.elapsed() < every);
            kept.read_at.filter(|_| recent && !full)
        });
        let began = Utc::now();
        if let Some(since) = since {
            let since = since - CHANGE_SKEW;
            let changed = self.store().reconcile_rows_changed(worker, since).await?;
            // Leases taken or let go without a change of their record (most
            // lease changes come with one): read one by one, while few.
            let mut lease_only = self.store().leases_changed(worker, since).await?;
            let seen: std::collections::HashSet<&str> =
                changed.iter().map(|r| r.id.as_str()).collect();
            lease_only.retain(|id| !seen.contains(id.as_str()));
            drop(seen);
            if lease_only.len() <= MAX_LEASE_ONLY_CHANGES {
                let mut reread = Vec::with_capacity(lease_only.len());
                for id in lease_only {
                    reread.push((self.store().reconcile_row(worker, &id).await?, id));
                }
                let rows = memory.with(|m| {
                    for row in changed {
                        m.take_row(worker, row);
                    }
                    for (row, id) in reread {
                        match row {
                            Some(row) => m.take_row(worker, row),
                            // On another worker now.
                            None => m.drop_row(worker, &id),
                        }
                    }
                    let kept = m.rows.entry(worker.to_string()).or_default();
                    kept.read_at = Some(began);
                    kept.rows.values().cloned().collect()
                });
                return Ok((rows, false));
            }
        }
        let rows: Vec<Arc<ReconcileRow>> = self
            .store()
            .reconcile_rows(worker)
            .await?
            .into_iter()
            .map(Arc::new)
            .collect();
        memory.with(|m| m.replace_rows(worker, &rows, began));
        Ok((rows, true))
    }

    /// Whether `record`, from the copy kept between passes, is still as the
    /// store has it in everything a verdict rests on (always, for a full
    /// read made this pass). If not, the copy takes the record as it is
    /// and the next pass judges it.
    async fn still_as_read(&self, reading: Reading<'_>, record: &ReconcileRow) -> Result<bool> {
        if reading.fresh {
            return Ok(true);
        }
        let now = self
            .store()
            .reconcile_row(reading.worker, &record.id)
            .await?;
        let same = now.as_ref().is_some_and(|n| {
            n.state == record.state
                && n.provider == record.provider
                && n.runtime_id == record.runtime_id
                && n.pool_key == record.pool_key
                && n.lease_generation == record.lease_generation
                && n.lease_worker_id == record.lease_worker_id
                && n.lease_released_at.is_some() == record.lease_released_at.is_some()
        });
        if !same {
            tracing::debug!(sandbox = %record.id, "changed since the pass read it; judged next pass");
            self.inner.reconcile.with(|m| match now {
                Some(row) => m.take_row(reading.worker, row),
                // Gone from this worker.
                None => m.drop_row(reading.worker, &record.id),
            });
        }
        Ok(same)
    }

    /// An audit event by the server itself.
    async fn audit_system(&self, action: super::AuditAction, target: &str, detail: Option<String>) {
        self.audit_with_detail(
            &Caller::system(),
            action,
            target,
            super::AuditOutcome::Success,
            detail,
        )
        .await;
    }
}

fn is_usable(record: &ReconcileRow) -> bool {
    SandboxState::USABLE
        .iter()
        .any(|s| s.as_str() == record.state)
}

/// Whether a state (as stored) is one a live record is in.
fn is_live_state(state: &str) -> bool {
    SandboxState::LIVE.iter().any(|s| s.as_str() == state)
}

fn is_live(record: &entity::sandbox::Model) -> bool {
    is_live_state(&record.state)
}
