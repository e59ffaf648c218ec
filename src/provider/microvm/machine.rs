//! What every microVM provider shares, over the [`Vmm`] that runs its
//! guests (QEMU, Firecracker).
//!
//! A sandbox is a directory `<data>/sandboxes/<provider>/<id>/` holding
//! `sandbox.json` (what it was made with, and its VMM's pid and start
//! time: a recycled pid is not the VM), its disk (`disk.ext4`) and what
//! the VMM keeps there (sockets, a pid file). The VMM runs detached: a VM
//! outlives the server, and a restarted server reaches its agent again
//! through its socket (a new session).
//!
//! A spawn builds and boots the sandbox under a hidden name and renames it
//! into place once its agent answered: a half-made sandbox is never in
//! the inventory, and one that did not boot leaves nothing (its VMM is
//! killed, the directory removed). A destroy renames the directory away
//! first, then kills the VMM and removes it; the server's start sweeps
//! what such steps left when it died half-way.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::assets::{self, Kernel};
use super::link::{AgentLink, AgentSocket};
use crate::config::Accel;
use crate::duration::GoDuration;
use crate::provider::certify::{Check, CheckKind};
use crate::provider::image_store::ImageStore;
use crate::provider::{
    Capability, ExecExit, ExecSpec, FileEntry, InventoryItem, OutputSink, Provider, ProviderError,
    ProviderResult, RuntimeHandle, RuntimeLogs, RuntimeStats, RuntimeStatus, SpawnSpec,
};

pub const META_FILE: &str = "sandbox.json";
pub const DISK_FILE: &str = "disk.ext4";

/// The longest Unix socket path the kernel takes.
const MAX_SOCKET_PATH: usize = 107;

/// How long a running VM's agent has to answer a new session (after a
/// server restart, or when its link broke).
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a health verdict is reused.
const HEALTH_TTL: Duration = Duration::from_secs(30);

/// Console lines a failed boot reports.
pub const CONSOLE_LINES: usize = 15;

/// The settings every microVM provider has.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// The guest kernel; empty: the newest `/boot/vmlinuz-*`.
    pub kernel: PathBuf,
    /// Its modules; empty: beside the kernel, else `/lib/modules/<release>`.
    pub modules_dir: PathBuf,
    pub boot_timeout: GoDuration,
    /// The static `stacyvm-agent`; empty: beside the running executable.
    pub agent_binary: PathBuf,
}

/// What booting needs that every VMM shares, found once.
pub struct Assets {
    pub kernel: Kernel,
    pub initramfs: PathBuf,
}

/// A VM being made: its hidden directory and what it is made with.
pub struct Launch<'a> {
    pub dir: &'a Path,
    pub spec: &'a SpawnSpec,
    pub assets: &'a Assets,
}

/// A virtual machine monitor: how one runs a guest.
#[async_trait]
pub trait Vmm: Send + Sync + 'static {
    /// What booting needs beyond the kernel and initramfs (an accelerator,
    /// an uncompressed kernel), found once.
    type Boot: Send + Sync + 'static;

    /// The provider's name, which sandboxes are spawned on.
    const NAME: &'static str;
    const ISOLATION: &'static str;
    /// The kernel modules its guests need (their dependencies are found).
    const MODULES: &'static [&'static str];
    /// The file in a sandbox's directory that holds its VMM's pid from
    /// the moment it runs (before `sandbox.json` names it).
    const PID_FILE: &'static str;

    fn guest(&self) -> &GuestConfig;

    /// Finds what [`Vmm::Boot`] holds.
    async fn prepare(&self, assets: &Assets, cache: &Path) -> ProviderResult<Self::Boot>;

    /// The accelerator guests run under.
    fn accel(&self, boot: &Self::Boot) -> Accel;

    /// Starts the VM of `launch` (its guest boots on): its VMM's pid.
    async fn start(&self, boot: &Self::Boot, launch: Launch<'_>) -> ProviderResult<i32>;

    /// Where the agent of the VM whose directory is `dir` answers.
    fn agent_socket(&self, dir: &Path) -> AgentSocket;

    /// The console's last lines of the VM of `dir` (VMM `pid`), for a
    /// boot that failed.
    async fn console_tail(&self, dir: &Path, pid: i32) -> String;

    /// The VMM `pid` of `dir` has ended or been killed: what the host kept
    /// for it may go.
    fn forget(&self, _pid: i32) {}

    /// Whether process `pid` (from `dir`'s pid file) is that directory's
    /// VMM, for a spawn cut short before `sandbox.json` named it.
    fn owns(&self, dir: &Path, pid: i32) -> bool;

    /// Whether the VMM's binary runs: its version, or why not.
    async fn version(&self) -> Result<String, String>;

    /// Why the VMM cannot run a sandbox in `dir`, if it cannot.
    fn refuse_dir(&self, _dir: &Path) -> Option<String> {
        None
    }

    /// Whether a booted VM's snapshot is kept for later spawns of the same
    /// image and shape to restore from ([`Vmm::snapshot`], [`Vmm::restore`]).
    const SNAPSHOTS: bool = false;

    /// What tells the VMM's builds apart: a snapshot is restored only by
    /// the build that made it.
    fn build(&self, _boot: &Self::Boot) -> String {
        String::new()
    }

    /// How many snapshots are kept (the least recently used go first).
    fn max_snapshots(&self) -> usize {
        0
    }

    /// Pauses the VM of `dir`, writes its snapshot into `into` with a copy
    /// of its disk ([`DISK_FILE`]) taken while it is paused, and resumes it.
    async fn snapshot(&self, _dir: &Path, _into: &Path) -> Result<(), String> {
        Err(format!("{} takes no snapshots", Self::NAME))
    }

    /// Starts the VM of `launch` from the snapshot in `from` (its disk is
    /// in `launch.dir` already): its VMM's pid.
    async fn restore(&self, _launch: Launch<'_>, _from: &Path) -> ProviderResult<i32> {
        Err(ProviderError::Unavailable(format!(
            "{} restores no snapshots",
            Self::NAME
        )))
    }

    /// The checks of the host `stacyvm certify` makes before a spawn (KVM,
    /// the kernel), from what [`Vmm::prepare`] found.
    async fn host_checks(&self, boot: Result<(&Assets, &Self::Boot), String>) -> Vec<Check>;
}

/// What a sandbox was created with, and its VMM (pid and start time).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    sandbox_id: String,
    image: String,
    memory_mb: u32,
    vcpus: u32,
    disk_mb: u32,
    accel: Accel,
    created_at: chrono::DateTime<chrono::Utc>,
    pid: i32,
    pid_start: u64,
}

impl Meta {
    fn alive(&self) -> bool {
        crate::provider::native::init::is_same_process(self.pid, self.pid_start)
    }
}

fn read_meta(dir: &Path) -> std::io::Result<Meta> {
    let bytes = std::fs::read(dir.join(META_FILE))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("its metadata is corrupt: {e}"),
        )
    })
}

/// Kills a VMM and waits (up to 5 s) for it to be gone; `false` if it is
/// still there.
pub async fn kill_vm(pid: i32, start: u64) -> bool {
    let alive = || crate::provider::native::init::is_same_process(pid, start);
    if !alive() {
        return true;
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    for _ in 0..250 {
        if !alive() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!(pid, "a killed VM process is still there");
    false
}

/// Whether this host runs guests under KVM well: `/dev/kvm` opens and the
/// host is not itself a virtual machine.
pub fn kvm_usable() -> bool {
    kvm_opens().is_ok() && !host_is_a_vm()
}

pub fn kvm_opens() -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
}

/// Whether the CPU says a hypervisor runs this host.
pub fn host_is_a_vm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"))
}

/// The first line `binary --version` prints (within 10 s): a VMM's
/// version. `name` and `hint` (how to get the binary) are for the error.
pub async fn binary_version(binary: &Path, name: &str, hint: &str) -> Result<String, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(binary)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("{name} did not answer --version within 10s"))?
    .map_err(|e| format!("cannot run {} ({hint}): {e}", binary.display()))?;
    if !out.status.success() {
        return Err(format!("{} --version failed", binary.display()));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// The last [`CONSOLE_LINES`] non-empty lines of `text`.
pub fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(CONSOLE_LINES)..].join("\n")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type Prepared<B> = Arc<(Assets, B)>;

/// Why a VM did not restore from its snapshot.
enum Restore {
    /// The snapshot itself was refused: it is dropped.
    Refused(String),
    /// Something else failed (the snapshot may be fine).
    Failed(ProviderError),
}

impl std::fmt::Display for Restore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Restore::Refused(why) => write!(f, "{why}"),
            Restore::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Marks a snapshot as just used (eviction takes the least recently used).
fn touch(path: &Path) {
    let now = std::time::SystemTime::now();
    crate::provider::best_effort(
        "marking a VM snapshot as used",
        std::fs::File::open(path).and_then(|f| f.set_modified(now)),
    );
}

/// How a sandbox's VM was made.
#[derive(Debug, Clone, Copy)]
enum Made {
    Booted(Accel),
    Restored(Accel),
}

/// A microVM provider: sandboxes as VMs that `V` runs.
pub struct MicroVm<V: Vmm> {
    vmm: V,
    images: ImageStore,
    dir: PathBuf,
    cache: PathBuf,
    /// Found on first use; a failure is not kept (installing the kernel
    /// needs no restart).
    boot: tokio::sync::Mutex<Option<Prepared<V::Boot>>>,
    links: Mutex<std::collections::HashMap<String, Arc<AgentLink>>>,
    /// Serialises opening a VM's link, per sandbox.
    connecting: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    logs: RuntimeLogs,
    health: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl<V: Vmm> MicroVm<V> {
    /// `dir` holds the sandboxes, `cache` the built boot assets and disks.
    pub fn with_vmm(vmm: V, images: ImageStore, dir: PathBuf, cache: PathBuf) -> Self {
        // Absolute: a VMM runs with another working directory (Firecracker
        // in its sandbox's), and its process is matched by its paths.
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        MicroVm {
            vmm,
            images,
            dir: absolute(dir),
            cache: absolute(cache),
            boot: tokio::sync::Mutex::new(None),
            links: Mutex::default(),
            connecting: Mutex::default(),
            logs: RuntimeLogs::default(),
            health: Mutex::new(None),
        }
    }

    pub fn vmm(&self) -> &V {
        &self.vmm
    }

    async fn boot(&self) -> ProviderResult<Prepared<V::Boot>> {
        let mut found = self.boot.lock().await;
        if let Some(boot) = found.as_ref() {
            return Ok(boot.clone());
        }
        let guest = self.vmm.guest();
        let kernel = assets::find_kernel(&guest.kernel, &guest.modules_dir)
            .map_err(ProviderError::Unavailable)?;
        let agent = crate::provider::agent::find_binary(&guest.agent_binary)
            .map_err(ProviderError::Unavailable)?;
        let (kernel2, cache) = (kernel.clone(), self.cache.clone());
        let initramfs = tokio::task::spawn_blocking(move || {
            assets::initramfs(&kernel2, &agent, V::MODULES, &cache)
        })
        .await
        .map_err(|e| ProviderError::Runtime(format!("building the initramfs: {e}")))?
        .map_err(ProviderError::Unavailable)?;
        let assets = Assets { kernel, initramfs };
        let boot = self.vmm.prepare(&assets, &self.cache).await?;
        let prepared = Arc::new((assets, boot));
        *found = Some(prepared.clone());
        Ok(prepared)
    }

    fn sandbox_dir(&self, id: &str) -> ProviderResult<PathBuf> {
        crate::provider::check_runtime_id(id)?;
        Ok(self.dir.join(id))
    }

    fn meta(&self, id: &str) -> ProviderResult<Meta> {
        read_meta(&self.sandbox_dir(id)?).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ProviderError::RuntimeNotFound(id.to_string()),
            _ => ProviderError::Runtime(format!("reading sandbox {id}: {e}")),
        })
    }

    /// Kills the VMM of a directory whose metadata was never written (a
    /// spawn interrupted before): the process its pid file names, if it
    /// is that directory's.
    async fn kill_by_pid_file(&self, dir: &Path) {
        let Some(pid) = std::fs::read_to_string(dir.join(V::PID_FILE))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        else {
            return;
        };
        if !self.vmm.owns(dir, pid) {
            return;
        }
        if let Some(start) = crate::provider::native::init::start_time(pid) {
            kill_vm(pid, start).await;
        }
        self.vmm.forget(pid);
    }

    /// The link to a running sandbox's agent, opened if needed.
    async fn link(&self, id: &str) -> ProviderResult<Arc<AgentLink>> {
        if let Some(link) = lock(&self.links).get(id).filter(|l| !l.is_closed()) {
            return Ok(link.clone());
        }
        let dir = self.sandbox_dir(id)?;
        let meta = self.meta(id)?;
        let one = lock(&self.connecting)
            .entry(id.to_string())
            .or_default()
            .clone();
        let _one = one.lock().await;
        if let Some(link) = lock(&self.links).get(id).filter(|l| !l.is_closed()) {
            return Ok(link.clone());
        }
        if !meta.alive() {
            return Err(ProviderError::Conflict(format!(
                "sandbox {id}'s VM is not running"
            )));
        }
        let socket = self.vmm.agent_socket(&dir);
        let link = AgentLink::open(&socket, RECONNECT_TIMEOUT, || meta.alive())
            .await
            .map_err(|e| ProviderError::Unavailable(format!("sandbox {id}: {e}")))?;
        let link = Arc::new(link);
        lock(&self.links).insert(id.to_string(), link.clone());
        Ok(link)
    }

    /// Builds the sandbox in a hidden directory `tmp` and boots its VM to
    /// its agent (restored from a snapshot where one was kept); the caller
    /// renames it into place.
    async fn start(&self, spec: &SpawnSpec, tmp: &Path) -> ProviderResult<(Arc<AgentLink>, Made)> {
        let prepared = self.boot().await?;
        let (assets, boot) = (&prepared.0, &prepared.1);
        let missing = || crate::provider::native::image_not_found(&spec.image);
        let info = self.images.info(&spec.image).ok_or_else(missing)?;
        let rootfs = self.images.rootfs(&spec.image).ok_or_else(missing)?;
        let base = assets::image_disk(
            &spec.image,
            &rootfs,
            info.imported_at,
            info.size_bytes,
            &self.cache.join("disks"),
        )
        .await
        .map_err(|e| ProviderError::Runtime(format!("building the VM's disk: {e}")))?;
        let accel = self.vmm.accel(boot);
        let snapshot = V::SNAPSHOTS.then(|| self.snapshot_dir(&base, assets, boot, spec));
        if let Some(snapshot) = snapshot.as_deref().filter(|s| s.is_dir()) {
            match self.restore(spec, tmp, assets, accel, snapshot).await {
                Ok(link) => {
                    link.setup(&spec.sandbox_id).await?;
                    touch(snapshot);
                    return Ok((link, Made::Restored(accel)));
                }
                Err(Restore::Refused(e)) => {
                    // The VMM refuses it (another build, a damaged file):
                    // it is not tried again.
                    tracing::warn!(snapshot = %snapshot.display(), error = %e, "the VMM refused a VM snapshot: it is dropped, and the VM boots afresh");
                    self.drop_snapshot(snapshot).await;
                }
                Err(Restore::Failed(e)) => {
                    tracing::warn!(snapshot = %snapshot.display(), error = %e, "a VM restored from its snapshot did not reach its agent: it boots afresh");
                }
            }
            if let Err(e) = self.remove_dir(tmp).await {
                tracing::warn!(error = %e, "cannot remove a VM that did not restore");
                return Err(e);
            }
        }
        std::fs::create_dir(tmp)
            .map_err(|e| ProviderError::Runtime(format!("{}: {e}", tmp.display())))?;
        assets::sandbox_disk(&base, &tmp.join(DISK_FILE), spec.disk_mb)
            .await
            .map_err(|e| ProviderError::Runtime(format!("the sandbox's disk: {e}")))?;
        let launch = Launch {
            dir: tmp,
            spec,
            assets,
        };
        let pid = self.vmm.start(boot, launch).await?;
        let (mut link, meta) = self.reach_agent(spec, tmp, accel, pid).await?;
        // Taken before the VM is given its identity: the snapshot holds
        // nothing of this sandbox's.
        if let Some(snapshot) = snapshot.as_deref().filter(|s| !s.is_dir()) {
            self.take_snapshot(tmp, snapshot).await;
            // A snapshot resets the VM's vsock connections: a new session.
            drop(link);
            let socket = self.vmm.agent_socket(tmp);
            link = Arc::new(
                AgentLink::open(&socket, RECONNECT_TIMEOUT, || meta.alive())
                    .await
                    .map_err(|e| {
                        ProviderError::Runtime(format!(
                            "the VM's agent did not answer again after its snapshot: {e}"
                        ))
                    })?,
            );
        }
        link.setup(&spec.sandbox_id).await?;
        Ok((link, Made::Booted(accel)))
    }

    /// Records VM `pid` of `tmp` and waits for its agent.
    async fn reach_agent(
        &self,
        spec: &SpawnSpec,
        tmp: &Path,
        accel: Accel,
        pid: i32,
    ) -> ProviderResult<(Arc<AgentLink>, Meta)> {
        let pid_start = crate::provider::native::init::start_time(pid)
            .ok_or_else(|| ProviderError::Runtime(format!("the VM's {} ended at once", V::NAME)))?;
        let meta = Meta {
            sandbox_id: spec.sandbox_id.clone(),
            image: spec.image.clone(),
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
            disk_mb: spec.disk_mb,
            accel,
            created_at: chrono::Utc::now(),
            pid,
            pid_start,
        };
        let bytes = serde_json::to_vec(&meta).expect("metadata serialises");
        std::fs::write(tmp.join(META_FILE), bytes)
            .map_err(|e| ProviderError::Runtime(format!("{}: {e}", tmp.display())))?;
        let timeout = self.vmm.guest().boot_timeout.0;
        let socket = self.vmm.agent_socket(tmp);
        match AgentLink::open(&socket, timeout, || meta.alive()).await {
            Ok(link) => Ok((Arc::new(link), meta)),
            Err(e) => {
                let console = self.vmm.console_tail(tmp, pid).await;
                let console = if console.is_empty() {
                    "its console printed nothing".to_string()
                } else {
                    format!("its console's last lines:\n{console}")
                };
                Err(ProviderError::Runtime(format!(
                    "the VM did not boot to its agent ({e}); {console}"
                )))
            }
        }
    }

    /// Where the snapshot of a VM of `base` (an image's disk) with
    /// `spec`'s shape is kept: one per image, kernel, initramfs, VMM build,
    /// memory, vCPUs and disk size.
    fn snapshot_dir(
        &self,
        base: &Path,
        assets: &Assets,
        boot: &V::Boot,
        spec: &SpawnSpec,
    ) -> PathBuf {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        for part in [
            base.to_string_lossy().as_bytes(),
            assets.kernel.image.to_string_lossy().as_bytes(),
            assets.initramfs.to_string_lossy().as_bytes(),
            self.vmm.build(boot).as_bytes(),
            format!("{}/{}/{}", spec.memory_mb, spec.vcpus, spec.disk_mb).as_bytes(),
        ] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        let key: String = hash.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.cache.join("snapshots").join(key)
    }

    /// Builds `tmp` from `snapshot` (its disk copied) and resumes the VM
    /// there to its agent.
    async fn restore(
        &self,
        spec: &SpawnSpec,
        tmp: &Path,
        assets: &Assets,
        accel: Accel,
        snapshot: &Path,
    ) -> Result<Arc<AgentLink>, Restore> {
        std::fs::create_dir(tmp).map_err(|e| {
            Restore::Failed(ProviderError::Runtime(format!("{}: {e}", tmp.display())))
        })?;
        assets::copy_disk(&snapshot.join(DISK_FILE), &tmp.join(DISK_FILE))
            .await
            .map_err(|e| Restore::Refused(format!("its disk: {e}")))?;
        let launch = Launch {
            dir: tmp,
            spec,
            assets,
        };
        let pid = self
            .vmm
            .restore(launch, snapshot)
            .await
            .map_err(|e| match e {
                ProviderError::InvalidRequest(why) => Restore::Refused(why),
                e => Restore::Failed(e),
            })?;
        let (link, _meta) = self
            .reach_agent(spec, tmp, accel, pid)
            .await
            .map_err(Restore::Failed)?;
        Ok(link)
    }

    /// Keeps a snapshot of the VM of `dir` as `snapshot` (best effort: the
    /// next spawn of its kind boots afresh and tries again).
    async fn take_snapshot(&self, dir: &Path, snapshot: &Path) {
        let Some(parent) = snapshot.parent() else {
            return;
        };
        let part = parent.join(format!(".tmp-{}", uuid::Uuid::new_v4().as_simple()));
        let started = Instant::now();
        let made = match std::fs::create_dir_all(&part) {
            Ok(()) => self.vmm.snapshot(dir, &part).await,
            Err(e) => Err(format!("{}: {e}", part.display())),
        };
        let kept = made.and_then(|()| {
            std::fs::rename(&part, snapshot).map_err(|e| format!("{}: {e}", snapshot.display()))
        });
        match kept {
            Ok(()) => {
                tracing::info!(snapshot = %snapshot.display(), millis = started.elapsed().as_millis() as u64, "a booted VM's snapshot was kept for the next spawns of its kind");
                self.evict_snapshots(parent).await;
            }
            Err(e) => {
                // Another spawn of the same kind may have kept one first.
                if !snapshot.is_dir() {
                    tracing::warn!(error = %e, "cannot keep a booted VM's snapshot (best effort: the next spawn boots afresh)");
                }
                self.drop_snapshot(&part).await;
            }
        }
    }

    /// Drops the least recently used snapshots beyond
    /// [`Vmm::max_snapshots`] (each holds a VM's memory and disk).
    async fn evict_snapshots(&self, dir: &Path) {
        let mut kept: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| {
                let used = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (used, e.path())
            })
            .collect();
        kept.sort();
        let over = kept.len().saturating_sub(self.vmm.max_snapshots());
        for (_, path) in kept.into_iter().take(over) {
            tracing::info!(snapshot = %path.display(), "dropping the least recently used VM snapshot");
            self.drop_snapshot(&path).await;
        }
    }

    /// Removes a snapshot (renamed away first: no spawn takes it meanwhile).
    async fn drop_snapshot(&self, snapshot: &Path) {
        let Some(parent) = snapshot.parent() else {
            return;
        };
        let trash = parent.join(format!(".trash-{}", uuid::Uuid::new_v4().as_simple()));
        if std::fs::rename(snapshot, &trash).is_err() {
            return;
        }
        crate::provider::best_effort(
            "removing a dropped VM snapshot",
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&trash))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r),
        );
    }

    /// Kills a sandbox directory's VM and removes the directory (renamed
    /// away first, so it is gone from the inventory at once). A VM that
    /// will not die keeps its directory: nothing is lost track of.
    async fn remove_dir(&self, dir: &Path) -> ProviderResult<()> {
        match read_meta(dir) {
            Ok(meta) => {
                if !kill_vm(meta.pid, meta.pid_start).await {
                    return Err(ProviderError::Runtime(format!(
                        "the VM of {} (pid {}) does not end",
                        dir.display(),
                        meta.pid
                    )));
                }
                self.vmm.forget(meta.pid);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Never booted far enough to record its VMM: one may
                // still run from this directory.
                self.kill_by_pid_file(dir).await;
            }
            Err(e) => return Err(ProviderError::Runtime(format!("{}: {e}", dir.display()))),
        }
        let trash = self
            .dir
            .join(format!(".trash-{}", uuid::Uuid::new_v4().as_simple()));
        match std::fs::rename(dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ProviderError::Runtime(format!("{}: {e}", dir.display()))),
        }
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&trash))
            .await
            .map_err(|e| ProviderError::Runtime(format!("removing a sandbox: {e}")))?
            .map_err(|e| ProviderError::Runtime(format!("removing a sandbox: {e}")))
    }

    fn status(&self, id: &str) -> ProviderResult<RuntimeStatus> {
        match self.meta(id) {
            Ok(meta) if meta.alive() => Ok(RuntimeStatus::Running),
            Ok(_) => Ok(RuntimeStatus::Stopped {
                cause: format!(
                    "its VM is no longer running (powered off, or its {} was killed)",
                    V::NAME
                ),
            }),
            Err(ProviderError::RuntimeNotFound(_)) => Ok(RuntimeStatus::Missing),
            Err(e) => Err(e),
        }
    }

    async fn check_health(&self) -> Result<(), String> {
        self.vmm.version().await?;
        self.boot().await.map(drop).map_err(|e| e.to_string())
    }

    fn resolve(path: &str) -> String {
        crate::provider::resolve_lexically(path)
    }
}

#[async_trait]
impl<V: Vmm> Provider for MicroVm<V> {
    fn name(&self) -> &'static str {
        V::NAME
    }

    fn capabilities(&self) -> Vec<Capability> {
        let mut all = vec![
            Capability::Exec,
            Capability::ExecStream,
            Capability::Files,
            Capability::Logs,
            Capability::Stats,
            Capability::MemoryLimit,
            Capability::CpuLimit,
            Capability::NetworkIsolation,
        ];
        if V::SNAPSHOTS {
            all.push(Capability::SnapshotRestore);
        }
        all
    }

    fn isolation(&self) -> &'static str {
        V::ISOLATION
    }

    async fn health(&self) -> ProviderResult<()> {
        if let Some((at, verdict)) = lock(&self.health).as_ref()
            && at.elapsed() < HEALTH_TTL
        {
            return verdict.clone().map_err(ProviderError::Unavailable);
        }
        let verdict = self.check_health().await;
        *lock(&self.health) = Some((Instant::now(), verdict.clone()));
        verdict.map_err(ProviderError::Unavailable)
    }

    async fn image_available(&self, image: &str) -> ProviderResult<bool> {
        Ok(self.images.rootfs(image).is_some())
    }

    async fn spawn(&self, spec: &SpawnSpec) -> ProviderResult<RuntimeHandle> {
        let dir = self.sandbox_dir(&spec.sandbox_id)?;
        if self.images.rootfs(&spec.image).is_none() {
            return Err(crate::provider::native::image_not_found(&spec.image));
        }
        let longest = dir.join("agent.sock");
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ProviderError::Unavailable(format!(
                "{} is too long for a socket path: choose a shorter data_dir",
                longest.display()
            )));
        }
        if let Some(why) = self.vmm.refuse_dir(&dir) {
            return Err(ProviderError::Unavailable(why));
        }
        if dir.exists() {
            return Err(ProviderError::InvalidRequest(format!(
                "sandbox {} already exists",
                spec.sandbox_id
            )));
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| ProviderError::Runtime(format!("{}: {e}", self.dir.display())))?;
        // Built and booted under a hidden name (short: socket paths are
        // bounded), then renamed into place.
        let tmp = self.dir.join(format!(
            ".tmp-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        let started = Instant::now();
        let booted = match self.start(spec, &tmp).await {
            Ok(booted) => rustix::fs::renameat_with(
                rustix::fs::CWD,
                &tmp,
                rustix::fs::CWD,
                &dir,
                rustix::fs::RenameFlags::NOREPLACE,
            )
            .map(|()| booted)
            .map_err(|e| match e {
                rustix::io::Errno::EXIST => ProviderError::InvalidRequest(format!(
                    "sandbox {} already exists",
                    spec.sandbox_id
                )),
                e => ProviderError::Runtime(format!("{}: {e}", dir.display())),
            }),
            Err(e) => Err(e),
        };
        match booted {
            Ok((link, made)) => {
                lock(&self.links).insert(spec.sandbox_id.clone(), link);
                let how = match made {
                    Made::Booted(accel) => format!("{accel:?}, booted"),
                    Made::Restored(accel) => format!("{accel:?}, restored from a snapshot"),
                };
                self.logs.log(
                    &spec.sandbox_id,
                    format!(
                        "spawned from image {} ({how} in {} ms)",
                        spec.image,
                        started.elapsed().as_millis()
                    ),
                );
                Ok(RuntimeHandle {
                    runtime_id: spec.sandbox_id.clone(),
                })
            }
            Err(e) => {
                // Nothing stays behind: the VM, its sockets, its disk.
                crate::provider::best_effort(
                    "removing a VM that did not boot",
                    self.remove_dir(&tmp).await,
                );
                Err(e)
            }
        }
    }

    async fn destroy(&self, runtime_id: &str) -> ProviderResult<()> {
        let dir = self.sandbox_dir(runtime_id)?;
        lock(&self.links).remove(runtime_id);
        self.remove_dir(&dir).await?;
        lock(&self.connecting).remove(runtime_id);
        self.logs.forget(runtime_id);
        Ok(())
    }

    async fn inspect(&self, runtime_id: &str) -> ProviderResult<RuntimeStatus> {
        self.status(runtime_id)
    }

    async fn inventory(&self) -> ProviderResult<Vec<InventoryItem>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ProviderError::Runtime(format!("listing VMs: {e}"))),
        };
        let mut items = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let created_at = self.meta(&name).ok().map(|m| m.created_at);
            let status = self
                .status(&name)
                .unwrap_or_else(|e| RuntimeStatus::Stopped {
                    cause: e.to_string(),
                });
            if status == RuntimeStatus::Missing {
                continue;
            }
            items.push(InventoryItem {
                sandbox_id: name.clone(),
                runtime_id: name,
                created_at,
                status,
            });
        }
        Ok(items)
    }

    async fn recover_at_startup(&self) -> ProviderResult<usize> {
        // Spawns and destroys that never finished: their VMs and
        // directories go (no spawn runs yet).
        let mut fixed = 0;
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.starts_with(".trash-") || name.starts_with(".tmp-")) {
                continue;
            }
            match read_meta(&entry.path()) {
                Ok(meta) => {
                    kill_vm(meta.pid, meta.pid_start).await;
                }
                Err(_) => self.kill_by_pid_file(&entry.path()).await,
            }
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => fixed += 1,
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a leftover VM directory")
                }
            }
        }
        fixed += assets::sweep_cache(&self.cache.join("disks"));
        // Snapshots half-written or half-removed.
        let snapshots = self.cache.join("snapshots");
        for entry in std::fs::read_dir(&snapshots)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") || name.starts_with(".trash-") {
                match std::fs::remove_dir_all(entry.path()) {
                    Ok(()) => fixed += 1,
                    Err(e) => {
                        tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a leftover VM snapshot")
                    }
                }
            }
        }
        Ok(fixed)
    }

    async fn exec(
        &self,
        runtime_id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        let link = self.link(runtime_id).await?;
        let result = link.exec(spec, sink).await;
        self.logs.log(
            runtime_id,
            format!(
                "exec {:?}: {}",
                spec.argv,
                crate::provider::describe_exit(&result)
            ),
        );
        result
    }

    async fn exec_terminal(
        &self,
        runtime_id: &str,
        spec: &ExecSpec,
        terminal: crate::provider::Terminal,
        sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        let link = self.link(runtime_id).await?;
        link.exec_terminal(spec, terminal, sink).await
    }

    async fn write_file(
        &self,
        runtime_id: &str,
        path: &str,
        content: Bytes,
        mode: u32,
    ) -> ProviderResult<()> {
        let link = self.link(runtime_id).await?;
        link.write_file(&Self::resolve(path), content, mode).await
    }

    async fn read_file(&self, runtime_id: &str, path: &str) -> ProviderResult<Bytes> {
        let link = self.link(runtime_id).await?;
        link.read_file(&Self::resolve(path)).await
    }

    async fn list_files(&self, runtime_id: &str, path: &str) -> ProviderResult<Vec<FileEntry>> {
        let link = self.link(runtime_id).await?;
        link.list(&Self::resolve(path)).await
    }

    async fn stat_file(&self, runtime_id: &str, path: &str) -> ProviderResult<FileEntry> {
        let link = self.link(runtime_id).await?;
        link.stat(&Self::resolve(path)).await
    }

    async fn move_file(&self, runtime_id: &str, from: &str, to: &str) -> ProviderResult<()> {
        let link = self.link(runtime_id).await?;
        link.rename(&Self::resolve(from), &Self::resolve(to)).await
    }

    async fn chmod_file(&self, runtime_id: &str, path: &str, mode: u32) -> ProviderResult<()> {
        let link = self.link(runtime_id).await?;
        link.chmod(&Self::resolve(path), mode).await
    }

    async fn delete_file(
        &self,
        runtime_id: &str,
        path: &str,
        recursive: bool,
    ) -> ProviderResult<()> {
        let link = self.link(runtime_id).await?;
        link.delete(&Self::resolve(path), recursive).await
    }

    async fn glob_files(&self, runtime_id: &str, pattern: &str) -> ProviderResult<Vec<String>> {
        let link = self.link(runtime_id).await?;
        link.glob(pattern).await
    }

    async fn logs(&self, runtime_id: &str, lines: usize) -> ProviderResult<Vec<String>> {
        self.meta(runtime_id)?;
        Ok(self.logs.tail(runtime_id, lines))
    }

    async fn stats(&self, runtime_id: &str) -> ProviderResult<RuntimeStats> {
        let meta = self.meta(runtime_id)?;
        if !meta.alive() {
            return Err(ProviderError::Conflict(format!(
                "sandbox {runtime_id}'s VM is not running"
            )));
        }
        // The VM as the host pays for it: its VMM's resident memory and
        // CPU time over a short sample.
        let cpu_ticks = || {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", meta.pid)).ok()?;
            let rest = &stat[stat.rfind(')')? + 1..];
            let mut fields = rest.split_whitespace().skip(11);
            let utime: u64 = fields.next()?.parse().ok()?;
            let stime: u64 = fields.next()?.parse().ok()?;
            Some(utime + stime)
        };
        let before = (Instant::now(), cpu_ticks());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = (Instant::now(), cpu_ticks());
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu_pct = match (before.1, after.1) {
            (Some(b), Some(a)) => {
                let wall = after.0.duration_since(before.0).as_secs_f64().max(1e-3);
                a.saturating_sub(b) as f64 / hz / wall * 100.0
            }
            _ => 0.0,
        };
        let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", meta.pid))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0);
        Ok(RuntimeStats {
            supported: true,
            cpu_pct,
            mem_bytes: rss_kb * 1024,
            mem_limit_bytes: u64::from(meta.memory_mb) << 20,
            pids: None,
        })
    }

    async fn host_checks(&self) -> Vec<Check> {
        let started = Instant::now();
        let version = self.vmm.version().await;
        let mut checks = vec![Check::new(
            CheckKind::Binary,
            true,
            started.elapsed(),
            version,
        )];
        let prepared = self.boot().await;
        let found = match &prepared {
            Ok(p) => Ok((&p.0, &p.1)),
            Err(e) => Err(e.to_string()),
        };
        checks.extend(self.vmm.host_checks(found).await);
        checks
    }
}
