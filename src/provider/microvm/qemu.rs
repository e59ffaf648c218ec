//! The `qemu` provider: each sandbox is a QEMU `microvm` guest with its
//! own kernel, booted from the initramfs and root disk of [`super::assets`],
//! its agent reached over a virtio serial port.
//!
//! Its directory (see [`super::machine`]) holds the sockets QEMU listens
//! on (`agent.sock` for the agent's port, `qmp.sock` for QEMU's monitor)
//! and `qemu.pid`. QEMU runs daemonized. The VM has no network device;
//! its console goes to a 64 KiB ring in QEMU, read through the monitor
//! when a boot fails (a guest cannot fill the host's disk through it).
//!
//! CPU: KVM or TCG (`providers.qemu.accel`). Memory and vCPUs are the
//! VM's; the disk is the sandbox's own ext4 image of `disk_mb`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::assets;
use super::link::AgentSocket;
use super::machine::{
    self, Assets, DISK_FILE, GuestConfig, Launch, MicroVm, Vmm, host_is_a_vm, kvm_usable,
    last_lines,
};
use crate::config::{Accel, QemuConfig};
use crate::provider::certify::{Check, CheckKind};
use crate::provider::image_store::ImageStore;
use crate::provider::{ProviderError, ProviderResult, SpawnSpec};

const AGENT_SOCKET: &str = "agent.sock";
const QMP_SOCKET: &str = "qmp.sock";
const PID_FILE: &str = "qemu.pid";

/// What booting needs beyond the kernel and initramfs.
pub struct Boot {
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

/// QEMU as a [`Vmm`].
pub struct Qemu {
    config: QemuConfig,
    guest: GuestConfig,
}

/// The `qemu` provider.
pub type QemuProvider = MicroVm<Qemu>;

impl MicroVm<Qemu> {
    /// `dir` holds the sandboxes, `cache` the built boot assets and disks.
    pub fn new(images: ImageStore, dir: PathBuf, cache: PathBuf, config: QemuConfig) -> Self {
        let guest = GuestConfig {
            kernel: config.kernel.clone(),
            modules_dir: config.modules_dir.clone(),
            boot_timeout: config.boot_timeout,
            agent_binary: config.agent_binary.clone(),
        };
        MicroVm::with_vmm(Qemu { config, guest }, images, dir, cache)
    }
}

impl Qemu {
    fn args(boot: &Boot, assets: &Assets, dir: &Path, spec: &SpawnSpec) -> Vec<std::ffi::OsString> {
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let (accel, cpu) = match boot.accel {
            Accel::Kvm => ("kvm", "host"),
            _ => ("tcg,tb-size=64", "max"),
        };
        // Its hostname comes with the agent's `Setup`, as for every microVM.
        let mut cmdline = "console=ttyS0 quiet panic=-1".to_string();
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
            assets.kernel.image.to_string_lossy().into_owned(),
            "-initrd".into(),
            assets.initramfs.to_string_lossy().into_owned(),
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

    /// The console's last lines, read from QEMU's ring through its monitor.
    async fn read_console(dir: &Path) -> String {
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
        last_lines(&text)
    }
}

#[async_trait]
impl Vmm for Qemu {
    type Boot = Boot;
    const NAME: &'static str = "qemu";
    const ISOLATION: &'static str = "a virtual machine (QEMU microvm) with its own kernel, memory and disk, and no network device";
    const MODULES: &'static [&'static str] = &assets::SERIAL_MODULES;
    const PID_FILE: &'static str = PID_FILE;

    fn guest(&self) -> &GuestConfig {
        &self.guest
    }

    async fn prepare(&self, _assets: &Assets, _cache: &Path) -> ProviderResult<Boot> {
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
        Ok(Boot { accel, tsc_khz })
    }

    fn accel(&self, boot: &Boot) -> Accel {
        boot.accel
    }

    async fn start(&self, boot: &Boot, launch: Launch<'_>) -> ProviderResult<i32> {
        let mut cmd = tokio::process::Command::new(&self.config.binary);
        cmd.args(Self::args(boot, launch.assets, launch.dir, launch.spec))
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
        std::fs::read_to_string(launch.dir.join(PID_FILE))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| ProviderError::Runtime("QEMU wrote no pid file".into()))
    }

    fn agent_socket(&self, dir: &Path) -> AgentSocket {
        AgentSocket::Serial(dir.join(AGENT_SOCKET))
    }

    /// QEMU's option syntax: a comma in a path would start another option.
    fn refuse_dir(&self, dir: &Path) -> Option<String> {
        dir.to_string_lossy().contains(',').then(|| {
            format!(
                "{} holds a comma, which QEMU's options cannot carry: choose another data_dir",
                dir.display()
            )
        })
    }

    async fn console_tail(&self, dir: &Path, _pid: i32) -> String {
        Self::read_console(dir).await
    }

    /// QEMU `pid` is `dir`'s if its command line holds the directory's
    /// agent socket.
    fn owns(&self, dir: &Path, pid: i32) -> bool {
        let socket = format!("path={},", dir.join(AGENT_SOCKET).display());
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                c.split(|b| *b == 0)
                    .any(|arg| String::from_utf8_lossy(arg).contains(&socket))
            })
            .unwrap_or(false)
    }

    async fn version(&self) -> Result<String, String> {
        let binary = &self.config.binary;
        let first =
            machine::binary_version(binary, "QEMU", "Debian: apt-get install qemu-system-x86")
                .await?;
        Ok(format!("{}: {first}", binary.display()))
    }

    async fn host_checks(&self, boot: Result<(&Assets, &Boot), String>) -> Vec<Check> {
        let started = Instant::now();
        let kvm = match machine::kvm_opens() {
            Err(e) => Err(format!("/dev/kvm does not open ({e}): guests run under TCG, emulated and slow")),
            Ok(()) if host_is_a_vm() => Err(
                "/dev/kvm opens, but this host is itself a virtual machine (nested guests are unreliable): `accel: auto` uses TCG".to_string(),
            ),
            Ok(()) if self.config.accel == Accel::Tcg => Ok(
                "/dev/kvm opens on a host that is not itself a VM, but accel: tcg is configured".to_string(),
            ),
            Ok(()) => Ok("/dev/kvm opens on a host that is not itself a VM: guests run under KVM".to_string()),
        };
        // Not required: TCG runs guests anywhere, only slower.
        let mut checks = vec![Check::new(CheckKind::Kvm, false, started.elapsed(), kvm)];
        let started = Instant::now();
        let boot = boot.map(|(assets, b)| {
            format!(
                "kernel {}, modules {}, accel {:?}{}",
                assets.kernel.image.display(),
                assets.kernel.modules.display(),
                b.accel,
                b.tsc_khz
                    .map(|k| format!(", guest TSC {k} kHz"))
                    .unwrap_or_default()
            )
        });
        checks.push(Check::new(CheckKind::Kernel, true, started.elapsed(), boot));
        checks
    }
}
