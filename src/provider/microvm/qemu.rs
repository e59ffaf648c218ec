//! The `qemu` provider: each sandbox is a QEMU `microvm` guest with its
//! own kernel, booted from the initramfs and root disk of [`super::assets`],
//! its agent reached over a virtio serial port.
//!
//! A sandbox is a directory `<data>/sandboxes/qemu/<id>/` holding
//! `sandbox.json`, its disk (`disk.ext4`), the sockets QEMU listens on
//! (`agent.sock` for the agent's port, `qmp.sock` for QEMU's monitor) and
//! `qemu.pid`. QEMU runs daemonized: a VM outlives the server, and a
//! restarted server reaches it again through its socket (a new session).
//! The VM has no network device; its console goes to a 64 KiB ring in
//! QEMU, read through the monitor when a boot fails (a guest cannot fill
//! the host's disk through it).
//!
//! CPU: KVM or TCG (`providers.qemu.accel`). Memory and vCPUs are the
//! VM's; the disk is the sandbox's own ext4 image of `disk_mb`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::assets::{self, Kernel};
use super::link::AgentLink;
use crate::config::{Accel, QemuConfig};
use crate::provider::certify::{Check, CheckKind};
use crate::provider::image_store::ImageStore;
use crate::provider::{
    Capability, ExecExit, ExecSpec, FileEntry, InventoryItem, OutputSink, Provider, ProviderError,
    ProviderResult, RuntimeHandle, RuntimeLogs, RuntimeStats, RuntimeStatus, SpawnSpec,
};

const META_FILE: &str = "sandbox.json";
const DISK_FILE: &str = "disk.ext4";
const AGENT_SOCKET: &str = "agent.sock";
const QMP_SOCKET: &str = "qmp.sock";
const PID_FILE: &str = "qemu.pid";

/// The longest Unix socket path the kernel takes.
const MAX_SOCKET_PATH: usize = 107;

/// How long a running VM's agent has to answer a new session (after a
/// server restart, or when its link broke).
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a health verdict is reused.
const HEALTH_TTL: Duration = Duration::from_secs(30);

/// Console lines a failed boot reports.
const CONSOLE_LINES: usize = 15;

/// What a sandbox was created with, and its QEMU (pid and start time:
/// a recycled pid is not the VM).
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

/// Kills the QEMU of a directory whose metadata was never written (a
/// spawn interrupted before): the process its pid file names, if its
/// command line holds this directory's socket path.
async fn kill_by_pid_file(dir: &Path) {
    let Some(pid) = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return;
    };
    let socket = format!("path={},", dir.join(AGENT_SOCKET).display());
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .any(|arg| String::from_utf8_lossy(arg).contains(&socket))
        })
        .unwrap_or(false);
    let Some(start) = crate::provider::native::init::start_time(pid).filter(|_| ours) else {
        return;
    };
    QemuProvider::kill_vm(pid, start).await;
}

/// What booting needs, found once.
struct Boot {
    kernel: Kernel,
    initramfs: PathBuf,
    accel: Accel,
    /// The host's TSC rate, which a TCG guest's TSC runs at: given to the
    /// guest kernel (`tsc_early_khz`), whose own calibration against the
    /// emulated PIT fails on a busy host and then hangs the boot.
    tsc_khz: Option<u64>,
}

/// The host's TSC rate in kHz, measured against the monotonic clock.
fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions on x86-64.
        let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
        let (t0, c0) = (Instant::now(), tsc());
        std::thread::sleep(Duration::from_millis(50));
        let (c1, elapsed) = (tsc(), t0.elapsed());
        let khz = u128::from(c1.checked_sub(c0)?) * 1_000_000 / elapsed.as_micros().max(1) / 1000;
        // To the MHz: the guest needs no more.
        let khz = u64::try_from(khz).ok()?.div_ceil(1000) * 1000;
        (khz > 0).then_some(khz)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

pub struct QemuProvider {
    images: ImageStore,
    dir: PathBuf,
    cache: PathBuf,
    config: QemuConfig,
    /// Found on first use; a failure is not kept (installing the kernel
    /// needs no restart).
    boot: tokio::sync::Mutex<Option<Arc<Boot>>>,
    links: Mutex<std::collections::HashMap<String, Arc<AgentLink>>>,
    /// Serialises opening a VM's link (its port takes one host at a
    /// time), per sandbox.
    connecting: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    logs: RuntimeLogs,
    health: Mutex<Option<(Instant, Result<(), String>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether this host runs guests under KVM well: `/dev/kvm` opens and the
/// host is not itself a virtual machine.
fn kvm_usable() -> bool {
    let opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    opens && !host_is_a_vm()
}

/// Whether the CPU says a hypervisor runs this host.
fn host_is_a_vm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"))
}

impl QemuProvider {
    /// `dir` holds the sandboxes, `cache` the built boot assets and disks.
    pub fn new(images: ImageStore, dir: PathBuf, cache: PathBuf, config: QemuConfig) -> Self {
        QemuProvider {
            images,
            dir,
            cache,
            config,
            boot: tokio::sync::Mutex::new(None),
            links: Mutex::default(),
            connecting: Mutex::default(),
            logs: RuntimeLogs::default(),
            health: Mutex::new(None),
        }
    }

    async fn boot(&self) -> ProviderResult<Arc<Boot>> {
        let mut found = self.boot.lock().await;
        if let Some(boot) = found.as_ref() {
            return Ok(boot.clone());
        }
        let kernel = assets::find_kernel(&self.config.kernel, &self.config.modules_dir)
            .map_err(ProviderError::Unavailable)?;
        let agent = crate::provider::agent::find_binary(&self.config.agent_binary)
            .map_err(ProviderError::Unavailable)?;
        let (kernel2, cache) = (kernel.clone(), self.cache.clone());
        let initramfs = tokio::task::spawn_blocking(move || {
            assets::initramfs(&kernel2, &agent, &assets::SERIAL_MODULES, &cache)
        })
        .await
        .map_err(|e| ProviderError::Runtime(format!("building the initramfs: {e}")))?
        .map_err(ProviderError::Unavailable)?;
        let accel = match self.config.accel {
            Accel::Auto if kvm_usable() => Accel::Kvm,
            Accel::Auto => Accel::Tcg,
            other => other,
        };
        let tsc_khz = match accel {
            Accel::Kvm => None,
            _ => tokio::task::spawn_blocking(host_tsc_khz)
                .await
                .map_err(|e| ProviderError::Runtime(format!("measuring the TSC: {e}")))?,
        };
        let boot = Arc::new(Boot {
            kernel,
            initramfs,
            accel,
            tsc_khz,
        });
        *found = Some(boot.clone());
        Ok(boot)
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

    /// Kills a VM and waits (up to 5 s) for it to be gone; `false` if it
    /// is still there.
    async fn kill_vm(pid: i32, start: u64) -> bool {
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

    /// The console's last lines, read from QEMU's ring through its monitor.
    async fn console_tail(dir: &Path) -> String {
        let read = async {
            let stream = tokio::net::UnixStream::connect(dir.join(QMP_SOCKET)).await?;
            let (reader, mut writer) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(reader).lines();
            lines.next_line().await?; // the greeting
            writer
                .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"ringbuf-read\",\"arguments\":{\"device\":\"console\",\"size\":65536,\"format\":\"utf8\"}}\n")
                .await?;
            let mut answers = 0;
            while let Some(line) = lines.next_line().await? {
                let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if value.get("return").is_some() || value.get("error").is_some() {
                    answers += 1;
                    if answers == 2 {
                        return Ok::<_, std::io::Error>(
                            value["return"].as_str().unwrap_or_default().to_string(),
                        );
                    }
                }
            }
            Ok(String::new())
        };
        let text = tokio::time::timeout(Duration::from_secs(3), read)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(CONSOLE_LINES)..].join("\n")
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
        let link = AgentLink::open(&dir.join(AGENT_SOCKET), RECONNECT_TIMEOUT, || meta.alive())
            .await
            .map_err(|e| ProviderError::Unavailable(format!("sandbox {id}: {e}")))?;
        let link = Arc::new(link);
        lock(&self.links).insert(id.to_string(), link.clone());
        Ok(link)
    }

    fn qemu_args(&self, boot: &Boot, dir: &Path, spec: &SpawnSpec) -> Vec<std::ffi::OsString> {
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let (accel, cpu) = match boot.accel {
            Accel::Kvm => ("kvm", "host"),
            _ => ("tcg,tb-size=64", "max"),
        };
        let hostname: String = spec.sandbox_id.chars().take(63).collect();
        let mut cmdline = format!("console=ttyS0 quiet panic=-1 stacyvm.hostname={hostname}");
        if let Some(khz) = boot.tsc_khz {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
        [
            "-name".to_string(),
            format!("stacyvm-{}", spec.sandbox_id),
            "-machine".into(),
            "microvm".into(),
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            cpu.into(),
            "-m".into(),
            spec.memory_mb.to_string(),
            "-smp".into(),
            spec.vcpus.max(1).to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            // QEMU's own seccomp filter: a guest that breaks into QEMU
            // still cannot use obsolete system calls or change the
            // host's scheduling and limits. (`spawn` and
            // `elevateprivileges` stay allowed: `-daemonize` needs them.)
            "-sandbox".into(),
            "on,obsolete=deny,resourcecontrol=deny".into(),
            "-kernel".into(),
            boot.kernel.image.to_string_lossy().into_owned(),
            "-initrd".into(),
            boot.initramfs.to_string_lossy().into_owned(),
            "-append".into(),
            cmdline,
            "-chardev".into(),
            "ringbuf,id=console,size=65536".into(),
            "-serial".into(),
            "chardev:console".into(),
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                path(AGENT_SOCKET)
            ),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={}", "stacyvm.agent"),
            "-drive".into(),
            format!("id=root,file={},format=raw,if=none", path(DISK_FILE)),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path(QMP_SOCKET)),
            "-daemonize".into(),
            "-pidfile".into(),
            path(PID_FILE),
        ]
        .into_iter()
        .map(Into::into)
        .collect()
    }

    /// Builds the sandbox in a hidden directory `tmp` and boots its VM to
    /// its agent; the caller renames it into place.
    async fn start(
        &self,
        spec: &SpawnSpec,
        tmp: &Path,
    ) -> ProviderResult<(Arc<AgentLink>, Accel, Meta)> {
        let boot = self.boot().await?;
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
        std::fs::create_dir(tmp)
            .map_err(|e| ProviderError::Runtime(format!("{}: {e}", tmp.display())))?;
        assets::sandbox_disk(&base, &tmp.join(DISK_FILE), spec.disk_mb)
            .await
            .map_err(|e| ProviderError::Runtime(format!("the sandbox's disk: {e}")))?;
        let mut cmd = tokio::process::Command::new(&self.config.binary);
        cmd.args(self.qemu_args(&boot, tmp, spec))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        // The parent returns once the VM is set up; the VM runs on, detached.
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .map_err(|_| ProviderError::Runtime("QEMU did not start within 60s".into()))?
            .map_err(|e| {
                ProviderError::Unavailable(format!(
                    "cannot run {} (Debian: apt-get install qemu-system-x86): {e}",
                    self.config.binary.display()
                ))
            })?;
        if !out.status.success() {
            return Err(ProviderError::Runtime(format!(
                "QEMU refused to start the VM: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let pid: i32 = std::fs::read_to_string(tmp.join(PID_FILE))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| ProviderError::Runtime("QEMU wrote no pid file".into()))?;
        let pid_start = crate::provider::native::init::start_time(pid)
            .ok_or_else(|| ProviderError::Runtime("the VM's QEMU ended at once".into()))?;
        let meta = Meta {
            sandbox_id: spec.sandbox_id.clone(),
            image: spec.image.clone(),
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
            disk_mb: spec.disk_mb,
            accel: boot.accel,
            created_at: chrono::Utc::now(),
            pid,
            pid_start,
        };
        let bytes = serde_json::to_vec(&meta).expect("metadata serialises");
        std::fs::write(tmp.join(META_FILE), bytes)
            .map_err(|e| ProviderError::Runtime(format!("{}: {e}", tmp.display())))?;
        let timeout = self.config.boot_timeout.0;
        match AgentLink::open(&tmp.join(AGENT_SOCKET), timeout, || meta.alive()).await {
            Ok(link) => Ok((Arc::new(link), boot.accel, meta)),
            Err(e) => {
                let console = Self::console_tail(tmp).await;
                Err(ProviderError::Runtime(format!(
                    "the VM did not boot to its agent ({e}); its console's last lines:\n{console}"
                )))
            }
        }
    }

    /// Kills a sandbox directory's VM and removes the directory (renamed
    /// away first, so it is gone from the inventory at once). A VM that
    /// will not die keeps its directory: nothing is lost track of.
    async fn remove_dir(&self, dir: &Path) -> ProviderResult<()> {
        match read_meta(dir) {
            Ok(meta) => {
                if !Self::kill_vm(meta.pid, meta.pid_start).await {
                    return Err(ProviderError::Runtime(format!(
                        "the VM of {} (pid {}) does not end",
                        dir.display(),
                        meta.pid
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Never booted far enough to record its QEMU: one may
                // still run from this directory.
                kill_by_pid_file(dir).await;
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
                cause: "its VM is no longer running (powered off, or its QEMU was killed)".into(),
            }),
            Err(ProviderError::RuntimeNotFound(_)) => Ok(RuntimeStatus::Missing),
            Err(e) => Err(e),
        }
    }

    async fn check_health(&self) -> Result<(), String> {
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new(&self.config.binary)
                .arg("--version")
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| "QEMU did not answer --version within 10s".to_string())?
        .map_err(|e| {
            format!(
                "cannot run {} (Debian: apt-get install qemu-system-x86): {e}",
                self.config.binary.display()
            )
        })?;
        if !out.status.success() {
            return Err(format!("{} --version failed", self.config.binary.display()));
        }
        self.boot().await.map(drop).map_err(|e| e.to_string())
    }

    fn resolve(path: &str) -> String {
        crate::provider::resolve_lexically(path)
    }
}

#[async_trait]
impl Provider for QemuProvider {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn capabilities(&self) -> Vec<Capability> {
        vec![
            Capability::Exec,
            Capability::ExecStream,
            Capability::Files,
            Capability::Logs,
            Capability::Stats,
            Capability::MemoryLimit,
            Capability::CpuLimit,
            Capability::NetworkIsolation,
        ]
    }

    fn isolation(&self) -> &'static str {
        "a virtual machine (QEMU microvm) with its own kernel, memory and disk, and no network device"
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
        if dir.join(AGENT_SOCKET).as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ProviderError::Unavailable(format!(
                "{} is too long for a socket path: choose a shorter data_dir",
                dir.join(AGENT_SOCKET).display()
            )));
        }
        // QEMU's option syntax: a comma in a path would start another option.
        if dir.to_string_lossy().contains(',') {
            return Err(ProviderError::Unavailable(format!(
                "{} holds a comma, which QEMU's options cannot carry: choose another data_dir",
                self.dir.display()
            )));
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
        // bounded), then renamed into place: a half-made sandbox is never
        // in the inventory.
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
            Ok((link, accel, _meta)) => {
                lock(&self.links).insert(spec.sandbox_id.clone(), link);
                self.logs.log(
                    &spec.sandbox_id,
                    format!(
                        "spawned from image {} ({accel:?}, booted in {} ms)",
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
                    Self::kill_vm(meta.pid, meta.pid_start).await;
                }
                Err(_) => kill_by_pid_file(&entry.path()).await,
            }
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => fixed += 1,
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a leftover VM directory")
                }
            }
        }
        fixed += assets::sweep_cache(&self.cache.join("disks"));
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
        // The VM as the host pays for it: its QEMU's resident memory and
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
        let kvm = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Err(e) => Err(format!("/dev/kvm does not open ({e}): guests run under TCG, emulated and slow")),
            Ok(_) if host_is_a_vm() => Err(
                "/dev/kvm opens, but this host is itself a virtual machine (nested guests are unreliable): `accel: auto` uses TCG".to_string(),
            ),
            Ok(_) if self.config.accel == Accel::Tcg => Ok(
                "/dev/kvm opens on a host that is not itself a VM, but accel: tcg is configured".to_string(),
            ),
            Ok(_) => Ok("/dev/kvm opens on a host that is not itself a VM: guests run under KVM".to_string()),
        };
        // Not required: TCG runs guests anywhere, only slower.
        let mut checks = vec![Check::new(CheckKind::Kvm, false, started.elapsed(), kvm)];
        let started = Instant::now();
        let boot = self.boot().await.map(|b| {
            format!(
                "kernel {}, modules {}, accel {:?}{}",
                b.kernel.image.display(),
                b.kernel.modules.display(),
                b.accel,
                b.tsc_khz
                    .map(|k| format!(", guest TSC {k} kHz"))
                    .unwrap_or_default()
            )
        });
        checks.push(Check::new(
            CheckKind::Kernel,
            true,
            started.elapsed(),
            boot.map_err(|e| e.to_string()),
        ));
        checks
    }
}
