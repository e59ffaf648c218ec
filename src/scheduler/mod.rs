//! The scheduler: the registry of workers, and placement of new sandboxes.
//!
//! Every operation on an existing sandbox goes to the worker recorded on
//! it ([`Scheduler::worker_for`]). A new sandbox goes to a worker that has
//! the provider, healthy (or not checked yet), with enough CPUs. The
//! scheduler refuses placements that cannot run, so no record is created
//! for a spawn that would fail on its way in.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::worker::{AdminState, ProviderInfo, RemoteWorker, Worker, WorkerSnapshot};

/// Where a sandbox will run. A placement from [`Scheduler::place`]
/// holds its slot on the worker until it is dropped (by then the record
/// exists and the reconciler counts it).
#[derive(Clone)]
pub struct Placement {
    pub worker: Arc<dyn Worker>,
    pub provider: String,
    _reserved: Option<Arc<Reserved>>,
}

/// A slot taken on a worker by a spawn in flight. When the spawn is done
/// the slot joins the worker's counted load until the next reconcile pass
/// counts the records again (a failed spawn is over-counted until then).
struct Reserved {
    reserved: Arc<Mutex<BTreeMap<String, usize>>>,
    load: Arc<RwLock<BTreeMap<String, usize>>>,
    worker_id: String,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut reserved = match self.reserved.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(n) = reserved.get_mut(&self.worker_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                reserved.remove(&self.worker_id);
            }
        }
        // Under the same lock, so `load_of` never sees the slot twice or
        // not at all.
        if let Ok(mut load) = self.load.write() {
            *load.entry(self.worker_id.clone()).or_insert(0) += 1;
        }
    }
}

/// Why no placement was found, or a sandbox's worker cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("unknown provider {requested:?}: available providers are {available}")]
    UnknownProvider {
        requested: String,
        available: String,
    },
    #[error("provider {provider} is unavailable: {reason}")]
    ProviderUnavailable { provider: String, reason: String },
    #[error("{requested} vcpus requested but no worker has more than {available}")]
    TooManyVcpus { requested: u32, available: u32 },
    #[error("{requested} MiB of memory requested but no worker has more than {available} MiB")]
    TooMuchMemory { requested: u32, available: u64 },
    #[error("worker {0} is not known to this control plane")]
    UnknownWorker(String),
    #[error("no worker can take a sandbox: {0}")]
    NoWorker(String),
}

/// The workers and the default provider.
#[derive(Clone)]
pub struct Scheduler {
    workers: Arc<RwLock<BTreeMap<String, Arc<dyn Worker>>>>,
    /// The remote ones among `workers`, for their heartbeats.
    remotes: Arc<RwLock<BTreeMap<String, Arc<RemoteWorker>>>>,
    /// Live sandboxes per worker: counted by each reconcile pass, plus
    /// the placements made since.
    load: Arc<RwLock<BTreeMap<String, usize>>>,
    /// Workers admins cordoned or are draining (absent: active). Set by
    /// the service when an admin acts, refreshed from the store by each
    /// reconcile pass.
    admin: Arc<RwLock<BTreeMap<String, AdminState>>>,
    /// Slots taken by spawns whose records may not exist yet, per worker;
    /// also the lock that makes choosing and taking a slot one step.
    reserved: Arc<Mutex<BTreeMap<String, usize>>>,
    /// Makes choosing and reserving one step.
    placing: Arc<Mutex<()>>,
    default_provider: String,
    /// A remote worker silent this long is out of reach
    /// (`lifecycle.worker_stale_after`): nothing new goes to it.
    stale_after: Duration,
}

impl Scheduler {
    pub fn new(default_provider: String, stale_after: Duration) -> Scheduler {
        Scheduler {
            workers: Arc::new(RwLock::new(BTreeMap::new())),
            remotes: Arc::new(RwLock::new(BTreeMap::new())),
            load: Arc::new(RwLock::new(BTreeMap::new())),
            admin: Arc::new(RwLock::new(BTreeMap::new())),
            reserved: Arc::new(Mutex::new(BTreeMap::new())),
            placing: Arc::new(Mutex::new(())),
            default_provider,
            stale_after,
        }
    }

    /// Whether a worker is in reach: in process, or heard from within
    /// `stale_after`. The one freshness rule placement, readiness, the
    /// provider list and the reconciler share.
    pub fn is_fresh(&self, worker: &dyn Worker) -> bool {
        crate::worker::is_fresh(worker.heard_from(), self.stale_after)
    }

    /// The workers in reach now.
    pub fn live_workers(&self) -> Vec<Arc<dyn Worker>> {
        self.workers()
            .into_iter()
            .filter(|w| self.is_fresh(w.as_ref()))
            .collect()
    }

    /// How long silence makes a remote worker out of reach.
    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }

    /// Adds (or replaces) a worker.
    pub fn add_worker(&self, worker: Arc<dyn Worker>) {
        if let Ok(mut workers) = self.workers.write() {
            workers.insert(worker.id().to_string(), worker);
        }
    }

    /// Adds (or replaces) a remote worker.
    pub fn add_remote(&self, worker: Arc<RemoteWorker>) {
        if let Ok(mut remotes) = self.remotes.write() {
            remotes.insert(worker.id().to_string(), worker.clone());
        }
        self.add_worker(worker);
    }

    /// The remote worker registered under `id`.
    pub fn remote(&self, id: &str) -> Option<Arc<RemoteWorker>> {
        self.remotes.read().ok()?.get(id).cloned()
    }

    /// Sets a worker's count of live sandboxes (from its records).
    pub fn set_load(&self, worker_id: &str, live: usize) {
        if let Ok(mut load) = self.load.write() {
            load.insert(worker_id.to_string(), live);
        }
    }

    /// Records what admins allow on a worker.
    pub fn set_admin_state(&self, worker_id: &str, state: AdminState) {
        if let Ok(mut admin) = self.admin.write() {
            match state {
                AdminState::Active => admin.remove(worker_id),
                other => admin.insert(worker_id.to_string(), other),
            };
        }
    }

    /// What admins allow on a worker.
    pub fn admin_state(&self, worker_id: &str) -> AdminState {
        self.admin
            .read()
            .ok()
            .and_then(|a| a.get(worker_id).copied())
            .unwrap_or_default()
    }

    /// Live sandboxes counted on a worker plus the slots spawns in
    /// flight hold there.
    fn load_of(&self, worker_id: &str) -> usize {
        let counted = self
            .load
            .read()
            .ok()
            .and_then(|l| l.get(worker_id).copied())
            .unwrap_or(0);
        counted + self.reserved_on(worker_id)
    }

    fn reserved_on(&self, worker_id: &str) -> usize {
        self.reserved_map().get(worker_id).copied().unwrap_or(0)
    }

    fn reserved_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        match self.reserved.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The provider used when a request names none.
    pub fn default_provider(&self) -> &str {
        &self.default_provider
    }

    /// Every worker, by id.
    pub fn workers(&self) -> Vec<Arc<dyn Worker>> {
        self.workers
            .read()
            .map(|w| w.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The workers that live in this process.
    pub fn in_process_workers(&self) -> Vec<Arc<dyn Worker>> {
        self.workers()
            .into_iter()
            .filter(|w| w.in_process())
            .collect()
    }

    /// The worker holding a placed sandbox, by its recorded `worker_id`.
    pub fn worker_for(&self, worker_id: &str) -> Result<Arc<dyn Worker>, ScheduleError> {
        self.workers
            .read()
            .ok()
            .and_then(|w| w.get(worker_id).cloned())
            .ok_or_else(|| ScheduleError::UnknownWorker(worker_id.to_string()))
    }

    /// Whether any worker offers `provider`.
    pub fn knows_provider(&self, provider: &str) -> bool {
        self.workers()
            .iter()
            .any(|w| w.snapshot().provider(provider).is_some())
    }

    /// Every provider name any worker offers, sorted.
    fn provider_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .workers()
            .iter()
            .flat_map(|w| w.snapshot().providers.into_iter().map(|p| p.name))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Picks a worker and provider for a new sandbox and counts it on
    /// that worker's load (see [`Scheduler::choose`]).
    pub fn place(&self, ask: &Ask<'_>) -> Result<Placement, ScheduleError> {
        // One at a time, so two spawns cannot both take a worker's last
        // slot. `choose` reads the reservations itself, so the map's lock
        // is only taken around it, never across it.
        let _one_at_a_time = match self.placing.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut placement = self.choose(ask)?;
        let id = placement.worker.id().to_string();
        *self.reserved_map().entry(id.clone()).or_insert(0) += 1;
        placement._reserved = Some(Arc::new(Reserved {
            reserved: self.reserved.clone(),
            load: self.load.clone(),
            worker_id: id,
        }));
        Ok(placement)
    }

    /// Where a new sandbox would go, without reserving anything (an
    /// admission check asks this). Filters, in order, each refusal saying
    /// why: fresh workers offering the provider; active (not cordoned or
    /// draining); carrying every label asked for; below their
    /// `max_sandboxes`; the provider healthy (or not checked yet); enough
    /// CPUs. Of what is left, the least loaded (ties: the first by id).
    /// With a handful of workers every candidate is scored; a best-of-K
    /// sample is for when there are many.
    pub fn choose(&self, ask: &Ask<'_>) -> Result<Placement, ScheduleError> {
        let name = match ask.provider {
            Some(p) if !p.is_empty() => p,
            _ => self.default_provider.as_str(),
        };
        let offering: Vec<_> = self
            .live_workers()
            .into_iter()
            .filter_map(|w| {
                let snapshot = w.snapshot();
                let info = snapshot.provider(name)?.clone();
                Some((w, snapshot, info))
            })
            .collect();
        if offering.is_empty() {
            let all = self.workers();
            if all.is_empty() {
                return Err(ScheduleError::NoWorker(
                    "none has registered (start `stacyvm worker`, or `serve` without --no-local-worker)"
                        .into(),
                ));
            }
            if all.iter().any(|w| w.snapshot().provider(name).is_some()) {
                return Err(ScheduleError::ProviderUnavailable {
                    provider: name.to_string(),
                    reason: format!(
                        "every worker offering it has been silent for {} s or more",
                        self.stale_after.as_secs()
                    ),
                });
            }
            return Err(ScheduleError::UnknownProvider {
                requested: name.to_string(),
                available: self.provider_names().join(", "),
            });
        }
        let ids = |left: &[(Arc<dyn Worker>, WorkerSnapshot, ProviderInfo)]| {
            left.iter()
                .map(|(w, _, _)| w.id())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (offering, fenced): (Vec<_>, Vec<_>) = offering
            .into_iter()
            .partition(|(w, _, _)| self.admin_state(w.id()).schedulable());
        if offering.is_empty() {
            return Err(ScheduleError::NoWorker(format!(
                "every worker offering provider {name} is cordoned or draining ({})",
                ids(&fenced)
            )));
        }
        let (offering, unlabelled): (Vec<_>, Vec<_>) =
            offering.into_iter().partition(|(_, snapshot, _)| {
                ask.labels
                    .iter()
                    .all(|(k, v)| snapshot.labels.get(k) == Some(v))
            });
        if offering.is_empty() {
            let wanted: Vec<String> = ask.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            return Err(ScheduleError::NoWorker(format!(
                "no worker offering provider {name} has the labels {} ({} lack them)",
                wanted.join(","),
                ids(&unlabelled)
            )));
        }
        let (offering, full): (Vec<_>, Vec<_>) =
            offering.into_iter().partition(|(w, snapshot, _)| {
                snapshot.max_sandboxes == 0
                    || self.load_of(w.id()) < snapshot.max_sandboxes as usize
            });
        if offering.is_empty() {
            return Err(ScheduleError::NoWorker(format!(
                "every worker offering provider {name} holds its max_sandboxes ({})",
                ids(&full)
            )));
        }
        let mut unhealthy = None;
        let mut most_vcpus = 0;
        let mut most_memory = 0;
        let mut best: Option<(usize, Arc<dyn Worker>)> = None;
        for (worker, snapshot, info) in offering {
            if let Some(health) = &info.health
                && !health.healthy
            {
                unhealthy.get_or_insert_with(|| health.error.clone().unwrap_or_default());
                continue;
            }
            most_vcpus = most_vcpus.max(snapshot.max_vcpus);
            if ask.vcpus > snapshot.max_vcpus {
                continue;
            }
            // 0: the worker did not say (an older version).
            let memory = if snapshot.memory_mb == 0 {
                u64::MAX
            } else {
                snapshot.memory_mb
            };
            most_memory = most_memory.max(memory);
            if u64::from(ask.memory_mb) > memory {
                continue;
            }
            let load = self.load_of(worker.id());
            if best.as_ref().is_none_or(|(least, _)| load < *least) {
                best = Some((load, worker));
            }
        }
        if let Some((_, worker)) = best {
            return Ok(Placement {
                worker,
                provider: name.to_string(),
                _reserved: None,
            });
        }
        match unhealthy {
            Some(reason) if most_vcpus == 0 => Err(ScheduleError::ProviderUnavailable {
                provider: name.to_string(),
                reason,
            }),
            _ if ask.vcpus > most_vcpus => Err(ScheduleError::TooManyVcpus {
                requested: ask.vcpus,
                available: most_vcpus,
            }),
            _ => Err(ScheduleError::TooMuchMemory {
                requested: ask.memory_mb,
                available: most_memory,
            }),
        }
    }
}

/// What a new sandbox needs from its worker.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// `None` or empty: the default provider.
    pub provider: Option<&'a str>,
    pub vcpus: u32,
    pub memory_mb: u32,
    /// Labels the worker must carry (from the spawn and its template).
    pub labels: &'a BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    //! Placement rules over workers that only describe themselves: the
    //! runtime calls are never made here (they answer `Unsupported`).
    use std::collections::BTreeMap;
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::provider::{
        ExecExit, ExecSpec, InventoryItem, OutputSink, ProviderError, RuntimeHandle, SpawnSpec,
    };
    use crate::worker::{
        ProviderHealth, ProviderInfo, RuntimeCall, RuntimeRef, RuntimeReply, WorkerResult,
        WorkerSnapshot,
    };

    struct Described {
        id: String,
        snapshot: WorkerSnapshot,
    }

    fn worker(id: &str, max_vcpus: u32, providers: &[(&str, Option<bool>)]) -> Arc<dyn Worker> {
        let providers = providers
            .iter()
            .map(|(name, healthy)| ProviderInfo {
                name: name.to_string(),
                capabilities: Vec::new(),
                isolation: String::new(),
                health: healthy.map(|healthy| ProviderHealth {
                    healthy,
                    error: (!healthy).then(|| format!("{name} is down on {id}")),
                    latency: Duration::ZERO,
                    checked_at: chrono::Utc::now(),
                }),
                certification: None,
            })
            .collect();
        Arc::new(Described {
            id: id.to_string(),
            snapshot: WorkerSnapshot {
                providers,
                max_vcpus,
                ..Default::default()
            },
        })
    }

    fn never() -> ProviderError {
        ProviderError::Unsupported {
            provider: "described",
            operation: "runtime calls",
        }
    }

    #[async_trait]
    impl Worker for Described {
        fn id(&self) -> &str {
            &self.id
        }
        fn hostname(&self) -> &str {
            "test"
        }
        fn in_process(&self) -> bool {
            false
        }
        fn snapshot(&self) -> WorkerSnapshot {
            self.snapshot.clone()
        }
        async fn check_health(&self) -> BTreeMap<String, ProviderHealth> {
            BTreeMap::new()
        }
        async fn recover_at_startup(&self) -> WorkerResult<usize> {
            Ok(0)
        }
        async fn image_available(&self, _: &str, _: &str) -> WorkerResult<bool> {
            Err(never())
        }
        async fn spawn(&self, _: &str, _: &SpawnSpec, _: u64) -> WorkerResult<RuntimeHandle> {
            Err(never())
        }
        async fn inventory(&self, _: &str) -> WorkerResult<Vec<InventoryItem>> {
            Err(never())
        }
        async fn exec(
            &self,
            _: &RuntimeRef,
            _: &ExecSpec,
            _: OutputSink,
        ) -> WorkerResult<ExecExit> {
            Err(never())
        }
        async fn exec_terminal(
            &self,
            _: &RuntimeRef,
            _: &ExecSpec,
            _: crate::provider::Terminal,
            _: OutputSink,
        ) -> WorkerResult<ExecExit> {
            Err(never())
        }
        async fn call(&self, _: &RuntimeRef, _: RuntimeCall) -> WorkerResult<RuntimeReply> {
            Err(never())
        }
    }

    fn ask(provider: Option<&str>, vcpus: u32) -> Ask<'_> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        Ask {
            provider,
            vcpus,
            memory_mb: 64,
            labels: &NONE,
        }
    }

    fn scheduler(workers: Vec<Arc<dyn Worker>>) -> Scheduler {
        let scheduler = Scheduler::new("native".into(), Duration::from_secs(30));
        for w in workers {
            scheduler.add_worker(w);
        }
        scheduler
    }

    #[test]
    fn places_on_a_worker_with_the_provider_healthy_and_enough_cpus() {
        let s = scheduler(vec![
            worker("a", 2, &[("native", Some(false)), ("docker", Some(true))]),
            worker("b", 2, &[("native", Some(true))]),
            worker("c", 16, &[("native", None)]),
        ]);
        // The default provider: a is unhealthy for it, b has it.
        let p = s.place(&ask(None, 1)).expect("placed");
        assert_eq!((p.worker.id(), p.provider.as_str()), ("b", "native"));
        // Only c has 8 CPUs (not checked yet counts as usable).
        assert_eq!(
            s.place(&ask(Some("native"), 8))
                .expect("placed")
                .worker
                .id(),
            "c"
        );
        assert_eq!(
            s.place(&ask(Some("docker"), 1))
                .expect("placed")
                .worker
                .id(),
            "a"
        );
    }

    #[test]
    fn spreads_over_the_least_loaded_workers() {
        let s = scheduler(vec![
            worker("a", 2, &[("native", Some(true))]),
            worker("b", 2, &[("native", Some(true))]),
        ]);
        s.set_load("a", 3);
        // Spawns in flight hold their placements.
        let held: Vec<Placement> = (0..4)
            .map(|_| s.place(&ask(None, 1)).expect("placed"))
            .collect();
        let picks: Vec<&str> = held.iter().map(|p| p.worker.id()).collect();
        assert_eq!(picks, ["b", "b", "b", "a"]);
        // Done: counted until the reconciler counts records (a: 4, b: 3).
        drop(held);
        assert_eq!(s.place(&ask(None, 1)).expect("placed").worker.id(), "b");
        assert_eq!(s.place(&ask(None, 1)).expect("placed").worker.id(), "a");
    }

    #[test]
    fn cordoned_and_draining_workers_take_nothing_new() {
        let s = scheduler(vec![
            worker("a", 2, &[("native", Some(true))]),
            worker("b", 2, &[("native", Some(true))]),
        ]);
        s.set_admin_state("a", AdminState::Cordoned);
        for _ in 0..3 {
            assert_eq!(s.place(&ask(None, 1)).expect("placed").worker.id(), "b");
        }
        s.set_admin_state("b", AdminState::Draining);
        let err = s
            .place(&ask(None, 1))
            .err()
            .expect("nothing is schedulable");
        assert!(matches!(err, ScheduleError::NoWorker(_)), "{err:?}");
        assert!(
            err.to_string().contains("cordoned or draining (a, b)"),
            "{err}"
        );
        s.set_admin_state("a", AdminState::Active);
        assert_eq!(s.place(&ask(None, 1)).expect("placed").worker.id(), "a");
    }

    /// A worker with labels and a sandbox limit.
    fn described(id: &str, labels: &[(&str, &str)], max_sandboxes: u32) -> Arc<dyn Worker> {
        let base = worker(id, 2, &[("native", Some(true))]);
        let mut snapshot = base.snapshot();
        snapshot.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        snapshot.max_sandboxes = max_sandboxes;
        Arc::new(Described {
            id: id.to_string(),
            snapshot,
        })
    }

    #[test]
    fn labels_asked_for_pick_the_workers_that_carry_them() {
        let s = scheduler(vec![
            described("a", &[("zone", "eu")], 0),
            described("b", &[("zone", "us"), ("gpu", "yes")], 0),
        ]);
        let want = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let us = want(&[("zone", "us")]);
        for _ in 0..3 {
            let ask = Ask {
                provider: None,
                vcpus: 1,
                memory_mb: 64,
                labels: &us,
            };
            assert_eq!(s.place(&ask).expect("placed").worker.id(), "b");
        }
        let none = want(&[("zone", "eu"), ("gpu", "yes")]);
        let ask = Ask {
            provider: None,
            vcpus: 1,
            memory_mb: 64,
            labels: &none,
        };
        let err = s.place(&ask).err().expect("no worker has both");
        assert!(matches!(err, ScheduleError::NoWorker(_)), "{err:?}");
        assert!(err.to_string().contains("gpu=yes,zone=eu"), "{err}");
    }

    #[test]
    fn a_full_worker_takes_nothing_until_its_load_drops() {
        let s = scheduler(vec![described("a", &[], 2), described("b", &[], 1)]);
        let held: Vec<Placement> = (0..3)
            .map(|_| s.place(&ask(None, 1)).expect("placed"))
            .collect();
        let picks: Vec<&str> = held.iter().map(|p| p.worker.id()).collect();
        assert_eq!(picks, ["a", "b", "a"]);
        let err = s.place(&ask(None, 1)).err().expect("full");
        assert!(err.to_string().contains("max_sandboxes (a, b)"), "{err}");
        // The spawns finished: still full, counted now.
        drop(held);
        assert!(s.place(&ask(None, 1)).is_err(), "still full");
        // One sandbox of a is gone.
        s.set_load("a", 1);
        assert_eq!(s.place(&ask(None, 1)).expect("placed").worker.id(), "a");
    }

    #[test]
    fn concurrent_placements_never_overfill_a_worker() {
        let s = scheduler(vec![described("a", &[], 3)]);
        let placed = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    if let Ok(p) = s.place(&ask(None, 1)) {
                        placed.lock().expect("lock").push(p);
                    }
                });
            }
        });
        assert_eq!(placed.lock().expect("lock").len(), 3);
    }

    #[test]
    fn a_sandbox_larger_than_any_workers_memory_is_refused() {
        let small = {
            let base = described("small", &[], 0);
            let mut snapshot = base.snapshot();
            snapshot.memory_mb = 512;
            Arc::new(Described {
                id: "small".into(),
                snapshot,
            }) as Arc<dyn Worker>
        };
        let s = scheduler(vec![small]);
        let fits = Ask {
            memory_mb: 512,
            ..ask(None, 1)
        };
        assert_eq!(s.choose(&fits).expect("fits").worker.id(), "small");
        let big = Ask {
            memory_mb: 513,
            ..ask(None, 1)
        };
        let err = s.choose(&big).err().expect("too big");
        assert!(
            matches!(err, ScheduleError::TooMuchMemory { available: 512, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn choosing_reserves_nothing() {
        let s = scheduler(vec![described("a", &[], 1)]);
        for _ in 0..5 {
            assert_eq!(s.choose(&ask(None, 1)).expect("chosen").worker.id(), "a");
        }
        let held = s.place(&ask(None, 1)).expect("placed");
        assert_eq!(held.worker.id(), "a");
        assert!(s.choose(&ask(None, 1)).is_err(), "the one slot is taken");
        drop(held);
        assert!(s.choose(&ask(None, 1)).is_err(), "its sandbox holds it");
        s.set_load("a", 0);
        assert!(s.choose(&ask(None, 1)).is_ok(), "the sandbox is gone");
    }

    #[test]
    fn without_workers_placement_is_unavailable_not_a_bad_request() {
        let s = scheduler(Vec::new());
        assert!(matches!(
            s.place(&ask(None, 1)),
            Err(ScheduleError::NoWorker(_))
        ));
    }

    #[test]
    fn says_why_nothing_fits() {
        let s = scheduler(vec![
            worker("a", 2, &[("native", Some(false))]),
            worker("b", 4, &[("docker", Some(true))]),
        ]);
        let err = s.place(&ask(Some("proot"), 1)).err().expect("refused");
        assert!(
            matches!(&err, ScheduleError::UnknownProvider { available, .. } if available == "docker, native"),
            "{err}"
        );
        let err = s.place(&ask(Some("native"), 1)).err().expect("refused");
        assert!(
            matches!(&err, ScheduleError::ProviderUnavailable { reason, .. } if reason.contains("down on a")),
            "{err}"
        );
        let err = s.place(&ask(Some("docker"), 5)).err().expect("refused");
        assert!(
            matches!(
                err,
                ScheduleError::TooManyVcpus {
                    requested: 5,
                    available: 4
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn routes_by_worker_id_and_knows_every_workers_providers() {
        let s = scheduler(vec![
            worker("a", 2, &[("native", Some(true))]),
            worker("b", 2, &[("docker", Some(true))]),
        ]);
        assert_eq!(s.worker_for("b").expect("known").id(), "b");
        assert!(matches!(
            s.worker_for("gone").err(),
            Some(ScheduleError::UnknownWorker(id)) if id == "gone"
        ));
        assert!(s.knows_provider("docker") && s.knows_provider("native"));
        assert!(!s.knows_provider("proot"));
        assert!(s.in_process_workers().is_empty());
    }
}
