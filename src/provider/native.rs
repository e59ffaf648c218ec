//! The `native` provider: each sandbox is a directory tree on the host, and
//! each exec is a fresh set of Linux namespaces (user, mount, pid, net, ipc,
//! uts) over that tree, built by hakoniwa.
//!
//! There is no long-lived process per sandbox: state is the tree itself, so
//! a sandbox survives a control-plane restart, and an exec costs one
//! container start (milliseconds). Killing the container's first process
//! tears down its PID namespace, which takes every child with it; that is
//! how timeouts kill whole process trees.
//!
//! The directory layout, logs, output pumping and timeout handling are
//! shared with `proot` through [`SandboxDirs`] and [`drive`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use super::hostfs::HostFs;
use super::image_store::ImageStore;
use super::{
    Capability, ExecExit, ExecSpec, FileEntry, InventoryItem, OutputChunk, OutputSink, Provider,
    ProviderError, ProviderResult, RuntimeHandle, RuntimeStatus, SpawnSpec, StreamKind,
};

/// The image name that means "the host's own root, read-only".
pub const HOST_IMAGE: &str = "host";

/// PATH given to every command unless its env sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Lifecycle lines kept per sandbox for `logs`.
const LOG_CAPACITY: usize = 200;

/// How long output may keep flowing after the command ended (a leftover
/// process holding the pipe) before the provider stops reading.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Process limit inside a native sandbox. The kernel does not enforce
/// RLIMIT_NPROC for host root, so this only bites when StacyVM runs
/// unprivileged.
const NPROC_LIMIT: u64 = 1024;

/// How long a health verdict is reused.
const HEALTH_TTL: Duration = Duration::from_secs(30);

const META_FILE: &str = "sandbox.json";

/// What a sandbox was created with, kept next to its tree so that exec
/// works after a control-plane restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SandboxMeta {
    pub image: String,
    pub memory_mb: u32,
    pub vcpus: u32,
}

/// Sandbox directories shared by the providers that run over a host tree:
/// `<dir>/<sandbox id>/` holds `sandbox.json` and either `rootfs/` (a copy
/// of an image) or, for the `host` image, `hostfs/{workspace,tmp}`.
#[derive(Debug)]
pub(crate) struct SandboxDirs {
    images: ImageStore,
    dir: PathBuf,
    logs: Mutex<HashMap<String, VecDeque<String>>>,
    /// Cancelled by destroy so that running execs are killed.
    live: Mutex<HashMap<String, CancellationToken>>,
}

impl SandboxDirs {
    pub(crate) fn new(images: ImageStore, dir: PathBuf) -> Self {
        Self {
            images,
            dir,
            logs: Mutex::default(),
            live: Mutex::default(),
        }
    }

    pub(crate) fn image_available(&self, image: &str, allow_host: bool) -> bool {
        (allow_host && image == HOST_IMAGE) || self.images.rootfs(image).is_some()
    }

    /// The sandbox's directory, refusing ids that are not plain names (a
    /// runtime id is used as a path component).
    fn sandbox_dir(&self, id: &str) -> ProviderResult<PathBuf> {
        let ok = !id.is_empty()
            && id.len() <= 128
            && !id.starts_with('.')
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(ProviderError::InvalidRequest(format!(
                "invalid sandbox id {id:?}"
            )));
        }
        Ok(self.dir.join(id))
    }

    /// Create the sandbox tree; on any error nothing is left behind.
    pub(crate) async fn create(
        &self,
        spec: &SpawnSpec,
        allow_host: bool,
    ) -> ProviderResult<SandboxMeta> {
        let dest = self.sandbox_dir(&spec.sandbox_id)?;
        let image_rootfs = if allow_host && spec.image == HOST_IMAGE {
            None
        } else {
            Some(
                self.images
                    .rootfs(&spec.image)
                    .ok_or_else(|| image_not_found(&spec.image))?,
            )
        };
        let meta = SandboxMeta {
            image: spec.image.clone(),
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
        };
        let parent = self.dir.clone();
        let meta_json = serde_json::to_vec(&meta)
            .map_err(|e| ProviderError::Runtime(format!("encoding sandbox metadata: {e}")))?;
        let id = spec.sandbox_id.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            fs::create_dir_all(&parent)?;
            // Sandbox trees hold setuid binaries from their images; keep
            // other local users out so they cannot run them on the host.
            fs::set_permissions(&parent, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
            if dest.exists() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("sandbox {id} already exists"),
                ));
            }
            // Build under a hidden name and rename, so a half-copied tree
            // is never mistaken for a sandbox.
            let tmp = parent.join(format!(".tmp-{id}-{}", uuid::Uuid::new_v4().as_simple()));
            let built = build_tree(&tmp, image_rootfs.as_deref(), &meta_json)
                .and_then(|()| fs::rename(&tmp, &dest));
            if built.is_err() {
                let _ = fs::remove_dir_all(&tmp);
            }
            built
        })
        .await
        .map_err(|e| ProviderError::Runtime(format!("creating sandbox: {e}")))?
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ProviderError::InvalidRequest(e.to_string()),
            _ => ProviderError::Runtime(format!("creating sandbox: {e}")),
        })?;
        self.log(
            &spec.sandbox_id,
            format!("spawned from image {}", spec.image),
        );
        Ok(meta)
    }

    /// The metadata of an existing sandbox, or RuntimeNotFound.
    pub(crate) fn meta(&self, id: &str) -> ProviderResult<SandboxMeta> {
        let path = self.sandbox_dir(id)?.join(META_FILE);
        let bytes = fs::read(path).map_err(|_| ProviderError::RuntimeNotFound(id.to_string()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ProviderError::Runtime(format!("sandbox {id} metadata is corrupt: {e}")))
    }

    /// The host directory that is `/` for an image sandbox.
    pub(crate) fn rootfs(&self, id: &str) -> ProviderResult<PathBuf> {
        Ok(self.sandbox_dir(id)?.join("rootfs"))
    }

    /// The host directory holding `workspace/` and `tmp/` of a `host` sandbox.
    pub(crate) fn host_dirs(&self, id: &str) -> ProviderResult<PathBuf> {
        Ok(self.sandbox_dir(id)?.join("hostfs"))
    }

    /// The files view of a sandbox.
    pub(crate) fn files(&self, id: &str) -> ProviderResult<HostFs> {
        let meta = self.meta(id)?;
        if meta.image == HOST_IMAGE {
            Ok(HostFs::restricted(
                self.host_dirs(id)?,
                &["workspace", "tmp"],
            ))
        } else {
            Ok(HostFs::new(self.rootfs(id)?))
        }
    }

    /// Kill running execs and delete the tree. Idempotent.
    pub(crate) async fn destroy(&self, id: &str) -> ProviderResult<()> {
        let dir = self.sandbox_dir(id)?;
        if let Some(token) = lock(&self.live).remove(id) {
            token.cancel();
        }
        let parent = self.dir.clone();
        let id_owned = id.to_string();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            // Rename first: the sandbox disappears atomically even if the
            // recursive delete below is slow or fails half-way.
            let trash = parent.join(format!(
                ".trash-{id_owned}-{}",
                uuid::Uuid::new_v4().as_simple()
            ));
            match fs::rename(&dir, &trash) {
                Ok(()) => fs::remove_dir_all(&trash),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(|e| ProviderError::Runtime(format!("destroying sandbox: {e}")))?
        .map_err(|e| ProviderError::Runtime(format!("destroying sandbox {id}: {e}")))?;
        lock(&self.logs).remove(id);
        Ok(())
    }

    /// A sandbox directory is its runtime: it runs while its metadata is
    /// readable, and is missing once the directory is gone.
    pub(crate) fn inspect(&self, id: &str) -> ProviderResult<RuntimeStatus> {
        match self.meta(id) {
            Ok(_) => Ok(RuntimeStatus::Running),
            Err(ProviderError::RuntimeNotFound(_)) => Ok(RuntimeStatus::Missing),
            Err(e) => Ok(RuntimeStatus::Stopped {
                cause: e.to_string(),
            }),
        }
    }

    /// Every sandbox directory (hidden `.tmp-*`/`.trash-*` work directories
    /// are not sandboxes).
    pub(crate) async fn inventory(&self) -> ProviderResult<Vec<InventoryItem>> {
        let dir = self.dir.clone();
        let names = tokio::task::spawn_blocking(
            move || -> io::Result<Vec<(String, Option<std::time::SystemTime>)>> {
                let entries = match fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(e),
                };
                let mut names = Vec::new();
                for entry in entries {
                    let entry = entry?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') || !entry.file_type()?.is_dir() {
                        continue;
                    }
                    let created = entry.metadata().ok().and_then(|m| m.modified().ok());
                    names.push((name, created));
                }
                Ok(names)
            },
        )
        .await
        .map_err(|e| ProviderError::Runtime(format!("listing sandboxes: {e}")))?
        .map_err(|e| ProviderError::Runtime(format!("listing sandboxes: {e}")))?;
        Ok(names
            .into_iter()
            .map(|(name, created)| InventoryItem {
                status: self.inspect(&name).unwrap_or(RuntimeStatus::Missing),
                created_at: created.map(chrono::DateTime::<chrono::Utc>::from),
                runtime_id: name.clone(),
                sandbox_id: name,
            })
            .collect())
    }

    /// Deletes `.tmp-*` (a spawn that never finished) and `.trash-*` (a
    /// destroy that never finished) directories. Only safe while no spawn
    /// or destroy runs, i.e. at start-up.
    pub(crate) async fn sweep_leftovers(&self) -> ProviderResult<usize> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> usize {
            let Ok(entries) = fs::read_dir(&dir) else {
                return 0;
            };
            let mut removed = 0;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !(name.starts_with(".tmp-") || name.starts_with(".trash-")) {
                    continue;
                }
                match fs::remove_dir_all(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove leftover"),
                }
            }
            removed
        })
        .await
        .map_err(|e| ProviderError::Runtime(format!("sweeping leftovers: {e}")))
    }

    /// A token cancelled when the sandbox is destroyed.
    pub(crate) fn cancel_token(&self, id: &str) -> CancellationToken {
        lock(&self.live).entry(id.to_string()).or_default().clone()
    }

    pub(crate) fn log(&self, id: &str, line: String) {
        let stamped = format!(
            "{} {line}",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        );
        let mut logs = lock(&self.logs);
        let log = logs.entry(id.to_string()).or_default();
        if log.len() == LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(stamped);
    }

    pub(crate) fn tail(&self, id: &str, lines: usize) -> ProviderResult<Vec<String>> {
        self.meta(id)?;
        let logs = lock(&self.logs);
        let Some(log) = logs.get(id) else {
            return Ok(Vec::new());
        };
        Ok(log
            .iter()
            .skip(log.len().saturating_sub(lines))
            .cloned()
            .collect())
    }

    /// Check argv, workdir and program before starting anything, so that
    /// the common mistakes get a clear answer instead of a runtime's
    /// internal error. Returns the program path to execute and the env, or
    /// `Err(exit)` when the command cannot run (127, message on stderr).
    pub(crate) async fn prepare(
        &self,
        id: &str,
        meta: &SandboxMeta,
        spec: &ExecSpec,
        sink: &OutputSink,
    ) -> ProviderResult<Result<(String, BTreeMap<String, String>), ExecExit>> {
        let Some(argv0) = spec.argv.first() else {
            return Err(ProviderError::InvalidRequest("empty argv".into()));
        };
        if spec.argv.iter().any(|a| a.contains('\0'))
            || spec
                .env
                .iter()
                .any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
        {
            return Err(ProviderError::InvalidRequest(
                "argv and env may not contain NUL bytes or empty / '=' names".into(),
            ));
        }
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
        env.extend(spec.env.clone());
        let path_var = env.get("PATH").cloned().unwrap_or_default();

        // The tree where programs and the workdir are looked up.
        let host = meta.image == HOST_IMAGE;
        let lookup = if host {
            HostFs::new("/")
        } else {
            HostFs::new(self.rootfs(id)?)
        };
        if let Some(workdir) = &spec.workdir {
            let files = if host {
                self.files(id)?
            } else {
                lookup.clone()
            };
            // For the host image only /workspace and /tmp can be checked;
            // elsewhere the runtime reports a bad directory itself.
            match files.stat(workdir).await {
                Ok(entry) if entry.is_dir => {}
                Ok(_) => {
                    return Err(ProviderError::InvalidRequest(format!(
                        "workdir {workdir} is not a directory"
                    )));
                }
                Err(ProviderError::InvalidRequest(_)) if host => {}
                Err(_) => {
                    return Err(ProviderError::InvalidRequest(format!(
                        "workdir {workdir} does not exist in the sandbox"
                    )));
                }
            }
        }
        let argv0_owned = argv0.clone();
        let found =
            tokio::task::spawn_blocking(move || lookup.find_executable(&argv0_owned, &path_var))
                .await
                .map_err(|e| ProviderError::Runtime(format!("looking up {argv0}: {e}")))?;
        match found {
            Some(program) => Ok(Ok((program, env))),
            None => {
                let message = format!("stacyvm: {argv0}: command not found\n");
                let _ = sink
                    .send(OutputChunk {
                        stream: StreamKind::Stderr,
                        data: Bytes::from(message),
                    })
                    .await;
                Ok(Err(ExecExit::Exited(127)))
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these maps leaves it consistent enough
    // (plain inserts and removes); keep serving rather than poison forever.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn image_not_found(image: &str) -> ProviderError {
    ProviderError::ImageNotFound {
        image: image.to_string(),
        reason: format!(
            "not imported; run `stacyvm image import {image} <rootfs.tar>` (e.g. from `docker export`)"
        ),
    }
}

fn build_tree(tmp: &Path, image_rootfs: Option<&Path>, meta_json: &[u8]) -> io::Result<()> {
    fs::create_dir(tmp)?;
    match image_rootfs {
        Some(src) => copy_tree(src, &tmp.join("rootfs"))?,
        None => {
            for sub in ["workspace", "tmp"] {
                let d = tmp.join("hostfs").join(sub);
                fs::create_dir_all(&d)?;
                let mode = if sub == "tmp" { 0o1777 } else { 0o755 };
                fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
            }
        }
    }
    fs::write(tmp.join(META_FILE), meta_json)
}

/// Copy an image tree: directories, regular files and symlinks with their
/// modes (and owners when running as root). Device nodes, FIFOs and sockets
/// are skipped: a sandbox gets its /dev from the runtime.
fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let is_root = rustix::process::geteuid().is_root();
    let meta = fs::symlink_metadata(src)?;
    fs::create_dir(dst)?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let m = fs::symlink_metadata(&from)?;
        let ft = m.file_type();
        if ft.is_dir() {
            copy_tree(&from, &to)?;
        } else if ft.is_file() {
            fs::copy(&from, &to)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
        } else {
            continue;
        }
        if is_root {
            std::os::unix::fs::lchown(&to, Some(m.uid()), Some(m.gid()))?;
        }
        if !ft.is_symlink() && !ft.is_dir() {
            fs::set_permissions(&to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        }
    }
    if is_root {
        std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
    }
    fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
}

/// Pump a command's output into `sink` while waiting for it, enforcing the
/// timeout and the sandbox's destruction.
///
/// `wait` resolves with the exit code once the command has ended; `kill`
/// must kill the command and everything it started (it is also called once
/// after a normal exit to reap leftovers, so it must tolerate that).
pub(crate) async fn drive<O, E, W, K>(
    stdout: O,
    stderr: E,
    sink: OutputSink,
    timeout: Duration,
    cancel: CancellationToken,
    wait: W,
    kill: K,
) -> ProviderResult<ExecExit>
where
    O: AsyncRead + Unpin + Send + 'static,
    E: AsyncRead + Unpin + Send + 'static,
    W: Future<Output = ProviderResult<i32>>,
    K: Fn(),
{
    let pumps = [
        tokio::spawn(pump(stdout, StreamKind::Stdout, sink.clone())),
        tokio::spawn(pump(stderr, StreamKind::Stderr, sink)),
    ];
    tokio::pin!(wait);
    let outcome = tokio::select! {
        code = &mut wait => code.map(ExecExit::Exited),
        () = tokio::time::sleep(timeout) => {
            kill();
            let _ = wait.await;
            Ok(ExecExit::TimedOut)
        }
        () = cancel.cancelled() => {
            kill();
            let _ = wait.await;
            Err(ProviderError::Runtime("the sandbox was destroyed while the command ran".into()))
        }
    };
    kill();
    // Deliver everything the command wrote before reporting its end.
    let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
    for pump in pumps {
        let abort = pump.abort_handle();
        if tokio::time::timeout_at(deadline, pump).await.is_err() {
            abort.abort();
        }
    }
    outcome
}

async fn pump<R: AsyncRead + Unpin>(mut reader: R, stream: StreamKind, sink: OutputSink) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut listening = true;
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                // Keep reading after the listener left, so the command never
                // blocks on a full pipe; the output is just dropped.
                if listening {
                    let chunk = OutputChunk {
                        stream,
                        data: Bytes::copy_from_slice(&buf[..n]),
                    };
                    listening = sink.send(chunk).await.is_ok();
                }
            }
        }
    }
}

/// Namespaces over a host tree, built by hakoniwa.
pub struct NativeProvider {
    dirs: SandboxDirs,
    health: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl NativeProvider {
    /// `sandboxes_dir` is `<data-dir>/sandboxes/native`; images come from
    /// `images` (plus the built-in `host` image).
    pub fn new(images: ImageStore, sandboxes_dir: PathBuf) -> Self {
        Self {
            dirs: SandboxDirs::new(images, sandboxes_dir),
            health: Mutex::new(None),
        }
    }

    fn container(&self, id: &str, meta: &SandboxMeta) -> ProviderResult<hakoniwa::Container> {
        use hakoniwa::{Container, Namespace, Rlimit, Runctl};
        let mut c = Container::empty();
        // A user namespace even when StacyVM runs as root: root inside is
        // then root only over the sandbox's own namespaces, so it cannot
        // load modules, mknod host devices or touch host networking.
        // Container root maps to the uid running StacyVM, which owns the tree.
        for ns in [
            Namespace::User,
            Namespace::Mount,
            Namespace::Pid,
            Namespace::Network,
            Namespace::Ipc,
            Namespace::Uts,
        ] {
            c.unshare(ns);
        }
        c.uidmap(0).gidmap(0);
        if meta.image == HOST_IMAGE {
            c.rootfs("/")
                .map_err(|e| ProviderError::Runtime(format!("preparing host rootfs: {e}")))?;
            let dirs = self.dirs.host_dirs(id)?;
            for sub in ["workspace", "tmp"] {
                let host = dirs.join(sub);
                c.bindmount_rw(&host.to_string_lossy(), &format!("/{sub}"));
            }
        } else {
            let rootfs = self.dirs.rootfs(id)?;
            c.rootdir(&rootfs).runctl(Runctl::RootdirRW);
        }
        c.procfsmount("/proc").devfsmount("/dev").hostname(id);
        // The memory limit is applied by `run_as_child` to the command only:
        // PID 1 is a fork of this (large, multi-threaded) server and would
        // already exceed it.
        c.setrlimit(Rlimit::Nproc, NPROC_LIMIT, NPROC_LIMIT);
        Ok(c)
    }

    fn check_namespaces() -> Result<(), String> {
        use hakoniwa::{Container, Namespace};
        let mut c = Container::empty();
        for ns in [
            Namespace::User,
            Namespace::Mount,
            Namespace::Pid,
            Namespace::Network,
        ] {
            c.unshare(ns);
        }
        c.uidmap(0).gidmap(0).procfsmount("/proc");
        // SAFETY: the closure runs in a forked child; it only returns a
        // constant, touching no locks, allocator or environment.
        let mut cmd = unsafe { c.command_from_closure(|| 0) };
        let status = cmd
            .stdin(hakoniwa::Stdio::inherit())
            .stdout(hakoniwa::Stdio::inherit())
            .stderr(hakoniwa::Stdio::inherit())
            .status()
            .map_err(|e| format!("cannot create namespaces: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("cannot create namespaces: {}", status.reason))
        }
    }
}

/// A started hakoniwa container: the handle to wait on, a pidfd to signal
/// it without pid-reuse races, and its output pipes.
struct Started {
    child: hakoniwa::Child,
    pidfd: Arc<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

fn start(
    container: hakoniwa::Container,
    program: String,
    spec: ExecSpec,
    env: BTreeMap<String, String>,
    memory_mb: u32,
) -> Result<Started, String> {
    let devnull = fs::File::open("/dev/null").map_err(|e| format!("opening /dev/null: {e}"))?;
    let args: Vec<String> = spec.argv.iter().skip(1).cloned().collect();
    // Address-space limit: the closest per-process memory cap that needs no
    // cgroup delegation.
    let memory_bytes = (memory_mb > 0).then(|| u64::from(memory_mb) * 1024 * 1024);
    let init = move || run_as_child(&program, &args, memory_bytes);
    // SAFETY: the closure runs in hakoniwa's forked child, which is single
    // threaded by then; it only spawns and waits for one process through
    // std, as hakoniwa's own child code (which allocates) already does.
    let mut cmd = unsafe { container.command_from_closure(init) };
    cmd.envs(env)
        .current_dir(spec.workdir.as_deref().unwrap_or("/"))
        .stdin(hakoniwa::Stdio::from(devnull))
        .stdout(hakoniwa::Stdio::piped())
        .stderr(hakoniwa::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting container: {e}"))?;
    let pid = rustix::process::Pid::from_raw(child.id() as i32);
    // The child is not reaped until we wait on it, so the pid still names it.
    let pidfd = pid
        .ok_or_else(|| "invalid child pid".to_string())
        .and_then(|pid| {
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                .map_err(|e| format!("pidfd_open: {e}"))
        });
    let pidfd = match pidfd {
        Ok(fd) => fd,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err("container has no output pipes".into());
    };
    Ok(Started {
        child,
        pidfd: Arc::new(pidfd),
        stdout: stdout.into(),
        stderr: stderr.into(),
    })
}

/// The sandbox's PID 1: run the command as its child and report how it
/// ended. The command must not be PID 1 itself, because the kernel shields
/// PID 1 from signals it has no handler for (`kill -9 $$` would be a no-op
/// and default SIGTERM handling would be lost), unlike in other runtimes.
/// Environment and working directory were already set up by hakoniwa.
fn run_as_child(program: &str, args: &[String], memory_bytes: Option<u64>) -> i32 {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    if let Some(bytes) = memory_bytes {
        let limit = rustix::process::Rlimit {
            current: Some(bytes),
            maximum: Some(bytes),
        };
        // SAFETY: setrlimit is async-signal-safe and touches no memory of
        // the parent; it runs between fork and exec as pre_exec requires.
        unsafe {
            cmd.pre_exec(move || {
                rustix::process::setrlimit(rustix::process::Resource::As, limit)
                    .map_err(io::Error::from)
            });
        }
    }
    match cmd.status() {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 128,
        },
        Err(e) => {
            eprintln!("stacyvm: {program}: {e}");
            if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            }
        }
    }
}

fn pipe_reader(fd: OwnedFd) -> ProviderResult<tokio::net::unix::pipe::Receiver> {
    tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
        .map_err(|e| ProviderError::Runtime(format!("output pipe: {e}")))
}

#[async_trait]
impl Provider for NativeProvider {
    fn name(&self) -> &'static str {
        "native"
    }

    fn capabilities(&self) -> Vec<Capability> {
        vec![
            Capability::Exec,
            Capability::ExecStream,
            Capability::Files,
            Capability::Logs,
            Capability::MemoryLimit,
            Capability::NetworkIsolation,
        ]
    }

    async fn health(&self) -> ProviderResult<()> {
        if let Some((at, verdict)) = lock(&self.health).as_ref()
            && at.elapsed() < HEALTH_TTL
        {
            return verdict.clone().map_err(ProviderError::Unavailable);
        }
        let verdict = tokio::task::spawn_blocking(Self::check_namespaces)
            .await
            .map_err(|e| ProviderError::Runtime(format!("health check: {e}")))?;
        *lock(&self.health) = Some((Instant::now(), verdict.clone()));
        verdict.map_err(ProviderError::Unavailable)
    }

    async fn image_available(&self, image: &str) -> ProviderResult<bool> {
        Ok(self.dirs.image_available(image, true))
    }

    async fn spawn(&self, spec: &SpawnSpec) -> ProviderResult<RuntimeHandle> {
        self.dirs.create(spec, true).await?;
        Ok(RuntimeHandle {
            runtime_id: spec.sandbox_id.clone(),
        })
    }

    async fn destroy(&self, runtime_id: &str) -> ProviderResult<()> {
        self.dirs.destroy(runtime_id).await
    }

    async fn inspect(&self, runtime_id: &str) -> ProviderResult<RuntimeStatus> {
        self.dirs.inspect(runtime_id)
    }

    async fn inventory(&self) -> ProviderResult<Vec<InventoryItem>> {
        self.dirs.inventory().await
    }

    async fn sweep_leftovers(&self) -> ProviderResult<usize> {
        self.dirs.sweep_leftovers().await
    }

    async fn exec(
        &self,
        runtime_id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        let meta = self.dirs.meta(runtime_id)?;
        let (program, env) = match self.dirs.prepare(runtime_id, &meta, spec, &sink).await? {
            Ok(ready) => ready,
            Err(exit) => {
                self.dirs.log(
                    runtime_id,
                    format!("exec {:?}: command not found", spec.argv),
                );
                return Ok(exit);
            }
        };
        let container = self.container(runtime_id, &meta)?;
        let cancel = self.dirs.cancel_token(runtime_id);
        let spec_owned = spec.clone();
        let memory_mb = meta.memory_mb;
        let started = tokio::task::spawn_blocking(move || {
            start(container, program, spec_owned, env, memory_mb)
        })
        .await
        .map_err(|e| ProviderError::Runtime(format!("starting container: {e}")))?
        .map_err(ProviderError::Runtime)?;
        let Started {
            mut child,
            pidfd,
            stdout,
            stderr,
        } = started;
        let (stdout, stderr) = (pipe_reader(stdout)?, pipe_reader(stderr)?);
        let wait = async move {
            // One blocking thread per running exec; the kill below does not
            // depend on it, so a timeout is enforced even while it waits.
            let status = tokio::task::spawn_blocking(move || child.wait())
                .await
                .map_err(|e| ProviderError::Runtime(format!("waiting for container: {e}")))?
                .map_err(|e| ProviderError::Runtime(format!("waiting for container: {e}")))?;
            // hakoniwa reports its own failures (and our SIGKILL) as 125
            // without an exit code; a signal death is 128+n and also has none.
            if status.exit_code.is_none() && status.code == 125 {
                return Err(ProviderError::Runtime(format!(
                    "container failed: {}",
                    status.reason
                )));
            }
            Ok(status.code)
        };
        let kill = move || {
            // The pidfd names our child even after it was reaped, so this can
            // never hit a recycled pid. Killing the container's supervisor
            // kills PID 1 of the sandbox (parent-death signal), and with it
            // the whole PID namespace.
            let _ = rustix::process::pidfd_send_signal(&*pidfd, rustix::process::Signal::KILL);
        };
        let result = drive(stdout, stderr, sink, spec.timeout, cancel, wait, kill).await;
        let outcome = super::describe_exit(&result);
        self.dirs
            .log(runtime_id, format!("exec {:?}: {outcome}", spec.argv));
        result
    }

    async fn write_file(
        &self,
        runtime_id: &str,
        path: &str,
        content: Bytes,
        mode: u32,
    ) -> ProviderResult<()> {
        self.dirs
            .files(runtime_id)?
            .write(path, content, mode)
            .await
    }

    async fn read_file(&self, runtime_id: &str, path: &str) -> ProviderResult<Bytes> {
        self.dirs.files(runtime_id)?.read(path).await
    }

    async fn list_files(&self, runtime_id: &str, path: &str) -> ProviderResult<Vec<FileEntry>> {
        self.dirs.files(runtime_id)?.list(path).await
    }

    async fn stat_file(&self, runtime_id: &str, path: &str) -> ProviderResult<FileEntry> {
        self.dirs.files(runtime_id)?.stat(path).await
    }

    async fn move_file(&self, runtime_id: &str, from: &str, to: &str) -> ProviderResult<()> {
        self.dirs.files(runtime_id)?.rename(from, to).await
    }

    async fn chmod_file(&self, runtime_id: &str, path: &str, mode: u32) -> ProviderResult<()> {
        self.dirs.files(runtime_id)?.chmod(path, mode).await
    }

    async fn delete_file(
        &self,
        runtime_id: &str,
        path: &str,
        recursive: bool,
    ) -> ProviderResult<()> {
        self.dirs.files(runtime_id)?.delete(path, recursive).await
    }

    async fn glob_files(&self, runtime_id: &str, pattern: &str) -> ProviderResult<Vec<String>> {
        self.dirs.files(runtime_id)?.glob(pattern).await
    }

    async fn logs(&self, runtime_id: &str, lines: usize) -> ProviderResult<Vec<String>> {
        self.dirs.tail(runtime_id, lines)
    }
}
