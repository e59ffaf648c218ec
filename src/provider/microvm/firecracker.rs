//! The `firecracker` provider: each sandbox is a Firecracker microVM with
//! its own kernel, booted from the initramfs and root disk of
//! [`super::assets`] (the kernel uncompressed: Firecracker boots an ELF
//! vmlinux), its agent reached over vsock.
//!
//! Firecracker runs with its working directory in the sandbox's directory
//! (see [`super::machine`]), where it keeps `api.sock` (its API) and
//! `v.sock` (the host's end of the guest's vsock), and reads `disk.ext4`:
//! every path it is given there is relative. StacyVM configures the VM
//! through the API (machine, boot source, drive, vsock), starts it, and
//! reaches the agent by writing `CONNECT 1024` on `v.sock`.
//!
//! Firecracker is a child of the server in a process group of its own; a
//! task reaps it, another drains its output (its log and the guest's
//! serial console) into a 64 KiB ring that a failed boot reports. A VM
//! outlives the server; a restarted server reaches its agent again
//! through `v.sock` (its console is then no longer read, and a write to
//! it fails harmlessly in Firecracker).
//!
//! The VM has no network device. Firecracker needs KVM: there is no
//! emulator to fall back to.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::BodyExt as _;

use super::assets;
use super::link::AgentSocket;
use super::machine::{
    self, Assets, DISK_FILE, GuestConfig, Launch, MicroVm, Vmm, host_is_a_vm, last_lines,
};
use crate::config::{Accel, FirecrackerConfig};
use crate::provider::certify::{Check, CheckKind};
use crate::provider::image_store::ImageStore;
use crate::provider::{ProviderError, ProviderResult};

const API_SOCKET: &str = "api.sock";
const VSOCK_SOCKET: &str = "v.sock";
const PID_FILE: &str = "firecracker.pid";

/// The guest's vsock context id (any above 2; each VM has its own
/// device, so every guest may have the same).
const GUEST_CID: u32 = 3;

/// What a VM's output ring keeps.
const CONSOLE_BYTES: usize = 64 << 10;

/// How long Firecracker has to open its API socket.
const API_START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one API request may take.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// The most of an API answer that is read.
const MAX_API_ANSWER: usize = 64 << 10;

/// The modules a Firecracker guest needs: the virtio MMIO transport, block
/// devices and vsock over virtio.
const MODULES: [&str; 3] = ["virtio_mmio", "virtio_blk", "vmw_vsock_virtio_transport"];

/// What booting needs beyond the kernel and initramfs.
pub struct Boot {
    /// The uncompressed kernel.
    vmlinux: PathBuf,
}

/// The last [`CONSOLE_BYTES`] a VM printed.
#[derive(Default)]
struct Ring(std::collections::VecDeque<u8>);

impl Ring {
    fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(CONSOLE_BYTES)..];
        let over = (self.0.len() + bytes.len()).saturating_sub(CONSOLE_BYTES);
        self.0.drain(..over);
        self.0.extend(bytes);
    }

    fn text(&self) -> String {
        let (a, b) = self.0.as_slices();
        String::from_utf8_lossy(&[a, b].concat()).into_owned()
    }
}

/// Firecracker as a [`Vmm`].
pub struct Firecracker {
    config: FirecrackerConfig,
    guest: GuestConfig,
    /// The output of the VMs this server started, by Firecracker's pid.
    consoles: Mutex<HashMap<i32, Arc<Mutex<Ring>>>>,
}

/// The `firecracker` provider.
pub type FirecrackerProvider = MicroVm<Firecracker>;

impl MicroVm<Firecracker> {
    /// `dir` holds the sandboxes, `cache` the built boot assets and disks.
    pub fn new(
        images: ImageStore,
        dir: PathBuf,
        cache: PathBuf,
        config: FirecrackerConfig,
    ) -> Self {
        let guest = GuestConfig {
            kernel: config.kernel.clone(),
            modules_dir: config.modules_dir.clone(),
            boot_timeout: config.boot_timeout,
            agent_binary: config.agent_binary.clone(),
        };
        let vmm = Firecracker {
            config,
            guest,
            consoles: Mutex::default(),
        };
        MicroVm::with_vmm(vmm, images, dir, cache)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a request to Firecracker's API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach Firecracker's API: {0}")]
    Connect(std::io::Error),
    #[error("Firecracker's API: {0}")]
    Http(#[from] hyper::Error),
    #[error("Firecracker's API did not answer within {API_TIMEOUT:?}")]
    Timeout,
    #[error("Firecracker refused {request}: {fault}")]
    Refused { request: String, fault: String },
}

/// One request to the API socket `socket`: `method path` with a JSON
/// body; Firecracker's `fault_message` when it refuses.
pub async fn api(
    socket: &Path,
    method: hyper::Method,
    path: &str,
    body: &serde_json::Value,
) -> Result<Bytes, ApiError> {
    let request = format!("{method} {path}");
    let call = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(ApiError::Connect)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let connection = tokio::spawn(connection);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json")
            .body(http_body_util::Full::new(Bytes::from(body.to_string())))
            .expect("a valid request");
        let answer = sender.send_request(req).await;
        let answer = match answer {
            Ok(answer) => {
                let status = answer.status();
                let body = http_body_util::Limited::new(answer.into_body(), MAX_API_ANSWER)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                Ok((status, body))
            }
            Err(e) => Err(ApiError::Http(e)),
        };
        connection.abort();
        answer
    };
    let (status, body) = tokio::time::timeout(API_TIMEOUT, call)
        .await
        .map_err(|_| ApiError::Timeout)??;
    if status.is_success() {
        return Ok(body);
    }
    let fault = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("fault_message")?.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{status}: {}", String::from_utf8_lossy(&body).trim()));
    Err(ApiError::Refused { request, fault })
}

impl Firecracker {
    /// Drains a VM's output into its ring until Firecracker closes it.
    fn drain(mut from: std::io::PipeReader, ring: Arc<Mutex<Ring>>) {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => lock(&ring).push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a Firecracker VM's output");
                    return;
                }
            }
        }
    }

    /// Runs Firecracker in `dir` (its working directory) and waits for its
    /// API socket: its pid.
    async fn run(&self, dir: &Path) -> ProviderResult<i32> {
        let (reader, writer) = std::io::pipe()
            .map_err(|e| ProviderError::Runtime(format!("a pipe for Firecracker: {e}")))?;
        let stderr = writer
            .try_clone()
            .map_err(|e| ProviderError::Runtime(format!("a pipe for Firecracker: {e}")))?;
        let mut cmd = tokio::process::Command::new(&self.config.binary);
        cmd.current_dir(dir)
            .arg("--api-sock")
            .arg(API_SOCKET)
            .stdin(std::process::Stdio::null())
            .stdout(writer)
            .stderr(stderr)
            // Not in the server's process group: a Ctrl-C to the server
            // leaves its VMs running, as a server restart does.
            .process_group(0)
            .kill_on_drop(false);
        if !self.config.seccomp {
            cmd.arg("--no-seccomp");
        }
        let mut child = cmd.spawn().map_err(|e| {
            ProviderError::Unavailable(format!(
                "cannot run {} (set providers.firecracker.binary): {e}",
                self.config.binary.display()
            ))
        })?;
        // The pipe's write ends are the child's alone now.
        drop(cmd);
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| ProviderError::Runtime("Firecracker ended at once".into()))?;
        let start = crate::provider::native::init::start_time(pid).unwrap_or_default();
        let ring = Arc::new(Mutex::new(Ring::default()));
        lock(&self.consoles).insert(pid, ring.clone());
        let drained = std::thread::Builder::new()
            .name(format!("fc-console-{pid}"))
            .spawn(move || Self::drain(reader, ring));
        if let Err(e) = drained {
            tracing::warn!(error = %e, "no thread to read a Firecracker VM's output");
        }
        tokio::spawn(async move {
            // Reaps it, whoever ends it.
            crate::provider::best_effort_quiet("waiting for a Firecracker VM", child.wait().await);
        });
        std::fs::write(dir.join(PID_FILE), pid.to_string())
            .map_err(|e| ProviderError::Runtime(format!("{}: {e}", dir.display())))?;
        let socket = dir.join(API_SOCKET);
        let deadline = Instant::now() + API_START_TIMEOUT;
        loop {
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                return Ok(pid);
            }
            let gone = !crate::provider::native::init::is_same_process(pid, start);
            if gone || Instant::now() > deadline {
                let output = last_lines(&self.output(pid));
                let why = if gone {
                    "Firecracker ended before it served its API"
                } else {
                    "Firecracker did not open its API socket in time"
                };
                return Err(ProviderError::Runtime(format!("{why}: {output}")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn output(&self, pid: i32) -> String {
        lock(&self.consoles)
            .get(&pid)
            .map(|ring| lock(ring).text())
            .unwrap_or_default()
    }

    /// Configures and starts the VM of `launch` through the API.
    async fn configure(&self, boot: &Boot, launch: &Launch<'_>) -> Result<(), ApiError> {
        let socket = launch.dir.join(API_SOCKET);
        let spec = launch.spec;
        let hostname: String = spec.sandbox_id.chars().take(63).collect();
        let boot_args = format!(
            "console=ttyS0 8250.nr_uarts=1 reboot=k panic=-1 pci=off quiet {} stacyvm.hostname={hostname}",
            stacyvm_agent::VSOCK_PARAM
        );
        let put = hyper::Method::PUT;
        api(
            &socket,
            put.clone(),
            "/machine-config",
            &serde_json::json!({
                "vcpu_count": spec.vcpus.clamp(1, 32),
                "mem_size_mib": spec.memory_mb,
            }),
        )
        .await?;
        api(
            &socket,
            put.clone(),
            "/boot-source",
            &serde_json::json!({
                "kernel_image_path": boot.vmlinux,
                "initrd_path": launch.assets.initramfs,
                "boot_args": boot_args,
            }),
        )
        .await?;
        // The agent mounts it as the root: not the kernel's root device.
        api(
            &socket,
            put.clone(),
            "/drives/disk",
            &serde_json::json!({
                "drive_id": "disk",
                "path_on_host": DISK_FILE,
                "is_root_device": false,
                "is_read_only": false,
            }),
        )
        .await?;
        api(
            &socket,
            put.clone(),
            "/vsock",
            &serde_json::json!({"guest_cid": GUEST_CID, "uds_path": VSOCK_SOCKET}),
        )
        .await?;
        api(
            &socket,
            put,
            "/actions",
            &serde_json::json!({"action_type": "InstanceStart"}),
        )
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Vmm for Firecracker {
    type Boot = Boot;
    const NAME: &'static str = "firecracker";
    const ISOLATION: &'static str = "a virtual machine (Firecracker, KVM) with its own kernel, memory and disk, reached over vsock, and no network device";
    const MODULES: &'static [&'static str] = &MODULES;
    const PID_FILE: &'static str = PID_FILE;

    fn guest(&self) -> &GuestConfig {
        &self.guest
    }

    async fn prepare(&self, assets: &Assets, cache: &Path) -> ProviderResult<Boot> {
        let (kernel, cache) = (assets.kernel.image.clone(), cache.to_path_buf());
        let vmlinux = tokio::task::spawn_blocking(move || assets::vmlinux(&kernel, &cache))
            .await
            .map_err(|e| ProviderError::Runtime(format!("extracting the kernel: {e}")))?
            .map_err(ProviderError::Unavailable)?;
        Ok(Boot { vmlinux })
    }

    fn accel(&self, _boot: &Boot) -> Accel {
        Accel::Kvm
    }

    async fn start(&self, boot: &Boot, launch: Launch<'_>) -> ProviderResult<i32> {
        let pid = self.run(launch.dir).await?;
        if let Err(e) = self.configure(boot, &launch).await {
            let output = last_lines(&self.output(pid));
            let output = if output.is_empty() {
                String::new()
            } else {
                format!("; its output:\n{output}")
            };
            return Err(match e {
                ApiError::Refused { .. } => {
                    ProviderError::Unavailable(format!("the VM cannot start: {e}{output}"))
                }
                e => ProviderError::Runtime(format!("the VM cannot start: {e}{output}")),
            });
        }
        Ok(pid)
    }

    fn agent_socket(&self, dir: &Path) -> AgentSocket {
        AgentSocket::Vsock {
            socket: dir.join(VSOCK_SOCKET),
            port: stacyvm_agent::VSOCK_PORT,
        }
    }

    async fn console_tail(&self, _dir: &Path, pid: i32) -> String {
        // What is left in the pipe arrives within moments of the end.
        tokio::time::sleep(Duration::from_millis(50)).await;
        last_lines(&self.output(pid))
    }

    fn forget(&self, pid: i32) {
        lock(&self.consoles).remove(&pid);
    }

    /// Firecracker `pid` is `dir`'s if it runs there (its working
    /// directory).
    fn owns(&self, dir: &Path, pid: i32) -> bool {
        std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir)
    }

    async fn version(&self) -> Result<String, String> {
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new(&self.config.binary)
                .arg("--version")
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| "Firecracker did not answer --version within 10s".to_string())?
        .map_err(|e| {
            format!(
                "cannot run {} (set providers.firecracker.binary to a Firecracker release or build): {e}",
                self.config.binary.display()
            )
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next().unwrap_or_default().trim();
        if !out.status.success() || !first.starts_with("Firecracker") {
            return Err(format!(
                "{} --version does not say it is Firecracker",
                self.config.binary.display()
            ));
        }
        Ok(format!("{}: {first}", self.config.binary.display()))
    }

    async fn host_checks(&self, boot: Result<(&Assets, &Boot), String>) -> Vec<Check> {
        let started = Instant::now();
        // Required: Firecracker has no emulator to fall back to. Whether
        // a guest boots on a host that is itself a VM is the spawn's to
        // tell.
        let kvm = match machine::kvm_opens() {
            Err(e) => Err(format!("/dev/kvm does not open ({e}): Firecracker needs KVM")),
            Ok(()) if host_is_a_vm() => Ok(
                "/dev/kvm opens, but this host is itself a virtual machine: nested guests may not boot (the spawn check tells)".to_string(),
            ),
            Ok(()) => Ok("/dev/kvm opens on a host that is not itself a VM".to_string()),
        };
        let mut checks = vec![Check::new(CheckKind::Kvm, true, started.elapsed(), kvm)];
        let started = Instant::now();
        let boot = boot.map(|(assets, b)| {
            format!(
                "kernel {} (booted as {}), modules {}",
                assets.kernel.image.display(),
                b.vmlinux.display(),
                assets.kernel.modules.display(),
            )
        });
        checks.push(Check::new(CheckKind::Kernel, true, started.elapsed(), boot));
        checks
    }
}
