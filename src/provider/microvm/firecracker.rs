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

/// How long writing or loading a snapshot may take (its memory file is
/// the VM's memory).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// A snapshot's files in its directory: the VM's state and its memory.
const SNAPSHOT_STATE: &str = "vm.snap";
const SNAPSHOT_MEMORY: &str = "mem";

/// The most of an API answer that is read.
const MAX_API_ANSWER: usize = 64 << 10;

/// The modules a Firecracker guest needs: the virtio MMIO transport, block
/// devices and vsock over virtio.
const MODULES: [&str; 3] = ["virtio_mmio", "virtio_blk", "vmw_vsock_virtio_transport"];

/// What booting needs beyond the kernel and initramfs.
pub struct Boot {
    /// The uncompressed kernel.
    vmlinux: PathBuf,
    /// Firecracker's version and its binary's size and time: snapshots
    /// are restored only by the build that made them.
    build: String,
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
        if !config.seccomp {
            tracing::warn!(
                "providers.firecracker.seccomp is off: Firecracker runs without its seccomp filters"
            );
        }
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
    #[error("Firecracker's API did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Firecracker refused {request}: {fault}")]
    Refused { request: String, fault: String },
}

/// One request to the API socket `socket`: `method path` with a JSON
/// body (none for `null`), answered within [`API_TIMEOUT`]; Firecracker's `fault_message`
/// when it refuses.
pub async fn api(
    socket: &Path,
    method: hyper::Method,
    path: &str,
    body: &serde_json::Value,
) -> Result<Bytes, ApiError> {
    api_within(API_TIMEOUT, socket, method, path, body).await
}

/// [`api`] answered within `timeout`.
pub async fn api_within(
    timeout: Duration,
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
        // Aborted with this future, when it times out too.
        let connection = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(connection));
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        // Null: no body (Firecracker refuses one on a GET).
        let content = if body.is_null() {
            Bytes::new()
        } else {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(body.to_string())
        };
        let req = req
            .body(http_body_util::Full::new(content))
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
        drop(connection);
        answer
    };
    let (status, body) = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| ApiError::Timeout(timeout))??;
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
        tokio::spawn(async move {
            // Reaps it, whoever ends it.
            crate::provider::best_effort_quiet("waiting for a Firecracker VM", child.wait().await);
        });
        let ring = Arc::new(Mutex::new(Ring::default()));
        lock(&self.consoles).insert(pid, ring.clone());
        match self.serve_api(dir, pid, start, reader, ring).await {
            Ok(()) => Ok(pid),
            Err(e) => {
                // Nothing runs on that nobody knows of.
                machine::kill_vm(pid, start).await;
                self.forget(pid);
                Err(e)
            }
        }
    }

    /// Drains Firecracker `pid`'s output, records its pid and waits for its
    /// API socket.
    async fn serve_api(
        &self,
        dir: &Path,
        pid: i32,
        start: u64,
        reader: std::io::PipeReader,
        ring: Arc<Mutex<Ring>>,
    ) -> ProviderResult<()> {
        // Unread, its output would fill the pipe and stop the guest.
        std::thread::Builder::new()
            .name(format!("fc-console-{pid}"))
            .spawn(move || Self::drain(reader, ring))
            .map_err(|e| {
                ProviderError::Runtime(format!("no thread to read the VM's output: {e}"))
            })?;
        std::fs::write(dir.join(PID_FILE), pid.to_string())
            .map_err(|e| ProviderError::Runtime(format!("{}: {e}", dir.display())))?;
        let socket = dir.join(API_SOCKET);
        let deadline = Instant::now() + API_START_TIMEOUT;
        loop {
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                return Ok(());
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
        // Nothing of the sandbox's own: its snapshot may start others (its
        // hostname comes with the agent's `Setup`).
        let boot_args = format!(
            "console=ttyS0 8250.nr_uarts=1 reboot=k panic=-1 pci=off quiet {}",
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
        let version = self.version().await.map_err(ProviderError::Unavailable)?;
        let binary = std::fs::metadata(&self.config.binary)
            .map(|m| format!("{} bytes, modified {:?}", m.len(), m.modified().ok()))
            .unwrap_or_default();
        Ok(Boot {
            vmlinux,
            build: format!("{version}; {binary}"),
        })
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

    const SNAPSHOTS: bool = true;

    fn max_snapshots(&self) -> usize {
        self.config.max_snapshots
    }

    fn build(&self, boot: &Boot) -> String {
        boot.build.clone()
    }

    async fn snapshot(&self, dir: &Path, into: &Path) -> Result<(), String> {
        let socket = dir.join(API_SOCKET);
        let patch = hyper::Method::PATCH;
        api(
            &socket,
            patch.clone(),
            "/vm",
            &serde_json::json!({"state": "Paused"}),
        )
        .await
        .map_err(|e| e.to_string())?;
        let made = async {
            api_within(
                SNAPSHOT_TIMEOUT,
                &socket,
                hyper::Method::PUT,
                "/snapshot/create",
                &serde_json::json!({
                    "snapshot_type": "Full",
                    "snapshot_path": into.join(SNAPSHOT_STATE),
                    "mem_file_path": into.join(SNAPSHOT_MEMORY),
                }),
            )
            .await
            .map_err(|e| e.to_string())?;
            // The disk as the paused guest left it: what its memory says
            // the disk holds.
            assets::copy_disk(&dir.join(DISK_FILE), &into.join(DISK_FILE)).await
        }
        .await;
        // Resumed whatever happened: the sandbox is someone's.
        let resumed = api(
            &socket,
            patch,
            "/vm",
            &serde_json::json!({"state": "Resumed"}),
        )
        .await
        .map_err(|e| format!("resuming the VM after its snapshot: {e}"));
        made.and(resumed.map(drop))
    }

    async fn restore(&self, launch: Launch<'_>, from: &Path) -> ProviderResult<i32> {
        let pid = self.run(launch.dir).await?;
        // Its drive (`disk.ext4`) and vsock socket (`v.sock`) were given as
        // relative paths: they are this sandbox's directory's.
        let loaded = api_within(
            SNAPSHOT_TIMEOUT,
            &launch.dir.join(API_SOCKET),
            hyper::Method::PUT,
            "/snapshot/load",
            &serde_json::json!({
                "snapshot_path": from.join(SNAPSHOT_STATE),
                "mem_backend": {
                    "backend_type": "File",
                    "backend_path": from.join(SNAPSHOT_MEMORY),
                },
                "resume_vm": true,
            }),
        )
        .await;
        match loaded {
            Ok(_) => Ok(pid),
            // The snapshot itself is refused: the caller drops it.
            Err(e @ ApiError::Refused { .. }) => Err(ProviderError::InvalidRequest(format!(
                "the VM does not restore from its snapshot: {e}"
            ))),
            Err(e) => Err(ProviderError::Runtime(format!(
                "the VM does not restore from its snapshot: {e}; its output:\n{}",
                last_lines(&self.output(pid))
            ))),
        }
    }

    fn forget(&self, pid: i32) {
        lock(&self.consoles).remove(&pid);
    }

    /// Firecracker `pid` is `dir`'s if it runs there (its working
    /// directory).
    fn owns(&self, dir: &Path, pid: i32) -> bool {
        let (Ok(cwd), Ok(dir)) = (
            std::fs::read_link(format!("/proc/{pid}/cwd")),
            std::fs::canonicalize(dir),
        ) else {
            return false;
        };
        cwd == dir
    }

    async fn version(&self) -> Result<String, String> {
        let binary = &self.config.binary;
        let first = machine::binary_version(
            binary,
            "Firecracker",
            "set providers.firecracker.binary to a Firecracker release or build",
        )
        .await?;
        if !first.starts_with("Firecracker") {
            return Err(format!(
                "{} --version does not say it is Firecracker",
                binary.display()
            ));
        }
        Ok(format!("{}: {first}", binary.display()))
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

#[cfg(test)]
mod tests {
    //! The snapshot conversation with the real Firecracker
    //! (`STACYVM_TEST_FIRECRACKER`, with the test kernel): a VM that has
    //! started (its guest need not have booted: on a host that is itself a
    //! VM it never does) is paused, snapshotted and resumed, and another
    //! Firecracker in another directory resumes from that snapshot, its
    //! drive and vsock socket its own directory's.
    use super::*;
    use crate::provider::SpawnSpec;
    use crate::provider::microvm::assets::Kernel;

    fn state(body: &Bytes) -> String {
        serde_json::from_slice::<serde_json::Value>(body).expect("json")["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_started_vm_is_snapshotted_and_another_resumes_from_it() {
        let (Some(binary), Some(kernel)) = (
            std::env::var_os("STACYVM_TEST_FIRECRACKER").filter(|v| !v.is_empty()),
            std::env::var_os("STACYVM_TEST_KERNEL").filter(|v| !v.is_empty()),
        ) else {
            eprintln!("SKIPPED: set STACYVM_TEST_FIRECRACKER and STACYVM_TEST_KERNEL");
            return;
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        let vmlinux = assets::vmlinux(Path::new(&kernel), tmp.path()).expect("vmlinux");
        let initramfs = tmp.path().join("initramfs");
        std::fs::write(&initramfs, [0u8; 4096]).expect("initramfs");
        let assets = Assets {
            kernel: Kernel {
                image: PathBuf::from(&kernel),
                modules: tmp.path().to_path_buf(),
            },
            initramfs,
        };
        let vmm = Firecracker {
            config: FirecrackerConfig {
                binary: binary.into(),
                seccomp: false,
                ..Default::default()
            },
            guest: GuestConfig {
                kernel: PathBuf::new(),
                modules_dir: PathBuf::new(),
                boot_timeout: crate::duration::GoDuration(Duration::from_secs(1)),
                agent_binary: PathBuf::new(),
            },
            consoles: Mutex::default(),
        };
        let boot = Boot {
            vmlinux,
            build: String::new(),
        };
        let spec = SpawnSpec {
            sandbox_id: "snap-a".into(),
            image: "none".into(),
            memory_mb: 128,
            vcpus: 1,
            disk_mb: 16,
        };
        let (a, b, snap) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("snap"),
        );
        for dir in [&a, &b, &snap] {
            std::fs::create_dir(dir).expect("mkdir");
        }
        std::fs::write(a.join(DISK_FILE), vec![0x5au8; 1 << 20]).expect("disk");
        let launch = Launch {
            dir: &a,
            spec: &spec,
            assets: &assets,
        };
        let first = vmm.start(&boot, launch).await.expect("started");
        let get = |dir: &Path| {
            let socket = dir.join(API_SOCKET);
            async move {
                api(&socket, hyper::Method::GET, "/", &serde_json::Value::Null)
                    .await
                    .expect("GET /")
            }
        };
        assert_eq!(state(&get(&a).await), "Running");

        vmm.snapshot(&a, &snap).await.expect("snapshot");
        assert_eq!(
            state(&get(&a).await),
            "Running",
            "resumed after its snapshot"
        );
        let memory = std::fs::metadata(snap.join(SNAPSHOT_MEMORY)).expect("memory file");
        assert_eq!(memory.len(), 128 << 20);
        assert!(snap.join(SNAPSHOT_STATE).is_file());
        assert_eq!(
            std::fs::read(snap.join(DISK_FILE)).expect("disk copy"),
            vec![0x5au8; 1 << 20]
        );

        assets::copy_disk(&snap.join(DISK_FILE), &b.join(DISK_FILE))
            .await
            .expect("copy");
        let launch = Launch {
            dir: &b,
            spec: &spec,
            assets: &assets,
        };
        let second = vmm.restore(launch, &snap).await.expect("restored");
        assert_eq!(state(&get(&b).await), "Running");
        assert!(b.join(VSOCK_SOCKET).exists(), "its vsock socket is its own");
        assert_ne!(first, second);
        // Its drive is its own directory's disk, not the snapshot's.
        let open: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{second}/fd"))
            .expect("fds")
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .collect();
        assert!(open.contains(&b.join(DISK_FILE)), "{open:?}");
        assert!(!open.contains(&snap.join(DISK_FILE)), "{open:?}");

        // A snapshot that is not one is refused in Firecracker's words.
        let c = tmp.path().join("c");
        std::fs::create_dir(&c).expect("mkdir");
        let bogus = tmp.path().join("bogus");
        std::fs::create_dir(&bogus).expect("mkdir");
        std::fs::write(bogus.join(SNAPSHOT_STATE), "not a snapshot").expect("write");
        std::fs::write(bogus.join(SNAPSHOT_MEMORY), "").expect("write");
        let launch = Launch {
            dir: &c,
            spec: &spec,
            assets: &assets,
        };
        let err = vmm.restore(launch, &bogus).await.expect_err("bogus");
        assert!(
            err.to_string()
                .contains("does not restore from its snapshot"),
            "{err}"
        );

        for dir in [&a, &b, &c] {
            let pid: i32 = std::fs::read_to_string(dir.join(PID_FILE))
                .expect("pid file")
                .parse()
                .expect("pid");
            if dir != &c {
                assert!(vmm.owns(dir, pid));
            }
            if let Some(start) = crate::provider::native::init::start_time(pid) {
                assert!(machine::kill_vm(pid, start).await);
            }
        }
    }
}
