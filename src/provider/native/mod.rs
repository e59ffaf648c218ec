//! The `native` provider: each sandbox is a directory tree on the host
//! plus a long-lived init, like a container.
//!
//! Spawn copies the image into `<data>/sandboxes/native/<id>/rootfs` (or
//! lays out `hostfs/` for the `host` image) and starts the sandbox's init
//! through the hidden `stacyvm __native-init` helper ([`init`]): a keeper
//! process, detached from the server, builds the Linux namespaces once
//! (user, mount, pid, net, ipc, uts) with hakoniwa and waits on PID 1,
//! which reaps orphans and ends on SIGTERM/SIGINT (`kill 1` inside the
//! sandbox stops it, as in Docker). The init outlives the server, so a
//! restarted server adopts running sandboxes with their background
//! processes.
//!
//! Each exec runs the hidden `stacyvm __native-exec` helper ([`exec`]),
//! which joins the init's namespaces and root and runs the command in its
//! own process group: a timeout kills that group; a normal exit kills
//! nothing, so `cmd &` keeps running until the sandbox is destroyed.
//! Destroy SIGKILLs PID 1, which takes the whole PID namespace with it,
//! then removes the sandbox's cgroup and deletes the tree.
//!
//! Limits are per sandbox, through cgroups ([`cgroup`]): the keeper puts
//! PID 1 into `stacyvm/<id>` (memory without swap, pids, CPU quota) before
//! reporting it ready; each exec helper opens the init's cgroups before
//! entering its namespaces and the command joins them before it execs, so
//! everything a sandbox runs is counted together. A command that ends with
//! SIGKILL while the cgroup's OOM kill count rose gets a line saying so
//! appended to its stderr.
//!
//! The directory layout, logs, output pumping and timeout handling are
//! shared with `proot` (which has no init) through [`SandboxDirs`] and
//! [`drive`].

mod cgroup;
mod confine;
mod disk;
mod exec;
mod ids;
pub(crate) mod init;

#[doc(hidden)]
pub use exec::exec_main;
#[doc(hidden)]
pub use ids::newidmap_main;
#[doc(hidden)]
pub use init::keeper_main;

use std::collections::{BTreeMap, HashMap};
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
    ProviderError, ProviderResult, RuntimeHandle, RuntimeStats, RuntimeStatus, SpawnSpec,
    StreamKind,
};

/// The image name that means "the host's own root, read-only".
pub const HOST_IMAGE: &str = "host";

/// PATH given to every command unless its env sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long output may keep flowing after the command ended (a leftover
/// process holding the pipe) before the provider stops reading.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Process limit inside a native sandbox. The kernel does not enforce
/// RLIMIT_NPROC for host root, so this only bites when StacyVM runs
/// unprivileged; the sandbox's `pids.max` is the real bound.
const NPROC_LIMIT: u64 = 1024;

/// `providers.native.pids_limit` unless configured: the most processes
/// (and threads) one sandbox may hold at once.
pub const DEFAULT_PIDS_LIMIT: u64 = 512;

fn default_pids_limit() -> u64 {
    DEFAULT_PIDS_LIMIT
}

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
    /// The host ids the sandbox's user namespace maps to; `None` for
    /// sandboxes of an unprivileged server (root inside is the server's
    /// uid) and of versions before user-id ranges.
    #[serde(default)]
    pub ids: Option<ids::IdRange>,
    /// The size of the sandbox's own filesystem (`disk.img`), in MiB;
    /// `None`: its tree is a plain host directory (no cap).
    #[serde(default)]
    pub disk_mb: Option<u32>,
    /// The sandbox's `pids.max` (native); files from before it existed
    /// get the default.
    #[serde(default = "default_pids_limit")]
    pub pids_limit: u64,
    /// The host path of the agent binary the sandbox's init runs as PID 1
    /// (mounted read-only at [`crate::provider::agent::AGENT_PATH`]);
    /// `None`: PID 1 is the init loop and commands go through the exec
    /// helper.
    #[serde(default)]
    pub agent: Option<PathBuf>,
}

impl SandboxMeta {
    /// What the sandbox's cgroup is limited to.
    pub(crate) fn limits(&self) -> cgroup::Limits {
        cgroup::Limits {
            memory_bytes: u64::from(self.memory_mb) * 1024 * 1024,
            pids: self.pids_limit,
            vcpus: self.vcpus,
        }
    }
}

/// Sandbox directories shared by the providers that run over a host tree:
/// `<dir>/<sandbox id>/` holds `sandbox.json` and either `rootfs/` (a copy
/// of an image) or, for the `host` image, `hostfs/{workspace,tmp}`.
#[derive(Debug)]
pub(crate) struct SandboxDirs {
    images: ImageStore,
    dir: PathBuf,
    logs: super::RuntimeLogs,
    /// Cancelled by destroy so that running execs are killed.
    live: Mutex<HashMap<String, CancellationToken>>,
    /// Whether each sandbox has a long-lived init (native) whose liveness
    /// is the sandbox's, or is just its tree (proot).
    has_init: bool,
    /// Recorded in each new sandbox's metadata.
    pids_limit: u64,
}

impl SandboxDirs {
    pub(crate) fn new(images: ImageStore, dir: PathBuf) -> Self {
        Self {
            images,
            dir,
            logs: super::RuntimeLogs::default(),
            live: Mutex::default(),
            has_init: false,
            pids_limit: DEFAULT_PIDS_LIMIT,
        }
    }

    /// Sandboxes run while their init runs (see [`init`]), not merely
    /// while their tree exists.
    pub(crate) fn with_init(mut self) -> Self {
        self.has_init = true;
        self
    }

    pub(crate) fn image_available(&self, image: &str, allow_host: bool) -> bool {
        (allow_host && image == HOST_IMAGE) || self.images.rootfs(image).is_some()
    }

    /// The sandbox's directory, refusing ids that are not plain names (a
    /// runtime id is used as a path component).
    fn sandbox_dir(&self, id: &str) -> ProviderResult<PathBuf> {
        super::check_runtime_id(id)?;
        Ok(self.dir.join(id))
    }

    /// Create the sandbox tree; on any error nothing is left behind.
    pub(crate) async fn create(
        &self,
        spec: &SpawnSpec,
        allow_host: bool,
        ids: Option<ids::IdRange>,
        cap_disk: bool,
        agent: Option<&Path>,
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
            ids,
            disk_mb: cap_disk.then_some(spec.disk_mb),
            pids_limit: self.pids_limit,
            // The host's own root has no room for the agent's mounts.
            agent: agent
                .filter(|_| image_rootfs.is_some())
                .map(Path::to_path_buf),
        };
        let parent = self.dir.clone();
        let meta_json = serde_json::to_vec(&meta)
            .map_err(|e| ProviderError::Runtime(format!("encoding sandbox metadata: {e}")))?;
        let id = spec.sandbox_id.clone();
        let disk_mb = meta.disk_mb;
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            fs::create_dir_all(&parent)?;
            // Traversable (the sandbox's own ids must reach its tree), not
            // listable; each sandbox directory keeps other users out.
            fs::set_permissions(&parent, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
            if dest.exists() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("sandbox {id} already exists"),
                ));
            }
            // Build under a hidden name and rename, so a half-copied tree
            // is never mistaken for a sandbox.
            let tmp = parent.join(format!(".tmp-{id}-{}", uuid::Uuid::new_v4().as_simple()));
            let built = build_tree(&tmp, image_rootfs.as_deref(), &meta_json, ids, disk_mb)
                .and_then(|()| fs::rename(&tmp, &dest));
            if built.is_err() {
                disk::unmount_all(&tmp);
                if let Err(e) = fs::remove_dir_all(&tmp) {
                    tracing::warn!(path = %tmp.display(), error = %e, "cannot remove a half-built sandbox (swept at the next start)");
                }
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
        let bytes = fs::read(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ProviderError::RuntimeNotFound(id.to_string()),
            // Anything else (EMFILE, EIO) says nothing about the sandbox.
            _ => ProviderError::Runtime(format!("reading sandbox {id}: {e}")),
        })?;
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
        let files = if meta.image == HOST_IMAGE {
            HostFs::restricted(self.host_dirs(id)?, &["workspace", "tmp"])
        } else {
            HostFs::new(self.rootfs(id)?)
        };
        Ok(match meta.ids {
            Some(ids) => files.with_owner(ids.host(0), ids.host(0)),
            None => files,
        })
    }

    /// Kill running execs (their drivers kill the commands).
    pub(crate) fn cancel_execs(&self, id: &str) {
        if let Some(token) = lock(&self.live).remove(id) {
            token.cancel();
        }
    }

    /// Kill running execs and delete the tree. Idempotent.
    pub(crate) async fn destroy(&self, id: &str) -> ProviderResult<()> {
        let dir = self.sandbox_dir(id)?;
        self.cancel_execs(id);
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
                Ok(()) => {
                    disk::unmount_all(&trash);
                    fs::remove_dir_all(&trash)
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(|e| ProviderError::Runtime(format!("destroying sandbox: {e}")))?
        .map_err(|e| ProviderError::Runtime(format!("destroying sandbox {id}: {e}")))?;
        self.logs.forget(id);
        Ok(())
    }

    /// Without an init, a sandbox directory is its runtime: it runs while
    /// its metadata is readable. With one, it runs while its init runs and
    /// is stopped (with the init's end as the cause) once that is gone.
    /// Either way it is missing once the directory is gone.
    pub(crate) fn inspect(&self, id: &str) -> ProviderResult<RuntimeStatus> {
        // Only a missing directory is a verdict; any other error is "cannot
        // tell now" and reaches the reconciler as an error.
        match self.meta(id) {
            Ok(_) if self.has_init => init::status(&self.sandbox_dir(id)?).map_err(|e| {
                ProviderError::Runtime(format!("cannot tell whether sandbox {id} runs: {e}"))
            }),
            Ok(_) => Ok(RuntimeStatus::Running),
            Err(ProviderError::RuntimeNotFound(_)) => Ok(RuntimeStatus::Missing),
            Err(e) => Err(e),
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
                // Listed, so it exists: an error here sends the reconciler
                // to `inspect`, which reports it as an error too (no verdict).
                status: self
                    .inspect(&name)
                    .unwrap_or_else(|e| RuntimeStatus::Stopped {
                        cause: e.to_string(),
                    }),
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
                disk::unmount_all(&entry.path());
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
        self.logs.log(id, line);
    }

    pub(crate) fn tail(&self, id: &str, lines: usize) -> ProviderResult<Vec<String>> {
        self.meta(id)?;
        Ok(self.logs.tail(id, lines))
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
        // The helper protocol separates strings with NUL bytes.
        crate::provider::check_command(&spec.argv, &spec.env)
            .map_err(ProviderError::InvalidRequest)?;
        let Some(argv0) = spec.argv.first() else {
            return Err(ProviderError::InvalidRequest("empty argv".into()));
        };
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

/// Makes the data directory's levels StacyVM owns (`<data>`,
/// `sandboxes`, `native`) traversable by other ids (`o+x`, not readable)
/// and checks that every directory above is: a sandbox's root is an
/// unprivileged host id, and its tree must be reachable by it (as with
/// Docker's user-namespace remapping).
fn reachable_by_others(sandboxes: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(sandboxes).map_err(|e| format!("creating {}: {e}", sandboxes.display()))?;
    let abs = fs::canonicalize(sandboxes)
        .map_err(|e| format!("resolving {}: {e}", sandboxes.display()))?;
    for (level, dir) in abs.ancestors().enumerate() {
        let meta = fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o001 != 0 {
            continue;
        }
        if level < 3 {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o001))
                .map_err(|e| format!("chmod o+x {}: {e}", dir.display()))?;
        } else {
            return Err(format!(
                "native sandboxes run as unprivileged host ids, which cannot reach {}: {} is not searchable by others (chmod o+x it, or choose another data directory)",
                abs.display(),
                dir.display()
            ));
        }
    }
    Ok(())
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

fn build_tree(
    tmp: &Path,
    image_rootfs: Option<&Path>,
    meta_json: &[u8],
    ids: Option<ids::IdRange>,
    disk_mb: Option<u32>,
) -> io::Result<()> {
    fs::create_dir(tmp)?;
    // Sandbox trees hold setuid binaries from their images: no other local
    // user may reach them. With an id range, the sandbox's own root (group
    // `base`) may traverse the directory to its tree, nothing more.
    match ids {
        Some(ids) => {
            std::os::unix::fs::chown(tmp, None, Some(ids.host(0)))?;
            fs::set_permissions(tmp, std::os::unix::fs::PermissionsExt::from_mode(0o710))?;
        }
        None => fs::set_permissions(tmp, std::os::unix::fs::PermissionsExt::from_mode(0o700))?,
    }
    if let Some(size_mb) = disk_mb {
        let owner = ids.map_or((0, 0), |ids| (ids.host(0), ids.host(0)));
        disk::create(
            tmp,
            &disk::mount_point(tmp, image_rootfs.is_none()),
            size_mb,
            owner,
        )?;
    }
    match image_rootfs {
        Some(src) => copy_tree(src, &tmp.join("rootfs"), ids)?,
        None => {
            for sub in ["workspace", "tmp"] {
                let d = tmp.join("hostfs").join(sub);
                fs::create_dir_all(&d)?;
                let mode = if sub == "tmp" { 0o1777 } else { 0o755 };
                fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
                if let Some(ids) = ids {
                    std::os::unix::fs::lchown(&d, Some(ids.host(0)), Some(ids.host(0)))?;
                }
            }
        }
    }
    fs::write(tmp.join(META_FILE), meta_json)
}

/// Copy an image tree: directories, regular files and symlinks with their
/// modes and owners (when running as root; shifted into the sandbox's id
/// range when it has one, so that the image's root is the sandbox's root,
/// not the host's). Device nodes, FIFOs and sockets are skipped: a sandbox
/// gets its /dev from the runtime.
fn copy_tree(src: &Path, dst: &Path, ids: Option<ids::IdRange>) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let is_root = rustix::process::geteuid().is_root();
    let owner = |m: &fs::Metadata| match ids {
        Some(ids) => (ids.host(m.uid()), ids.host(m.gid())),
        None => (m.uid(), m.gid()),
    };
    let meta = fs::symlink_metadata(src)?;
    // The top may already exist: the sandbox's own (empty) filesystem.
    match fs::create_dir(dst) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && disk::is_mounted(dst) => {}
        other => other?,
    }
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let m = fs::symlink_metadata(&from)?;
        let ft = m.file_type();
        if ft.is_dir() {
            copy_tree(&from, &to, ids)?;
        } else if ft.is_file() {
            fs::copy(&from, &to)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
        } else {
            continue;
        }
        if is_root {
            let (uid, gid) = owner(&m);
            std::os::unix::fs::lchown(&to, Some(uid), Some(gid))?;
        }
        if !ft.is_symlink() && !ft.is_dir() {
            fs::set_permissions(&to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        }
    }
    if is_root {
        let (uid, gid) = owner(&meta);
        std::os::unix::fs::lchown(dst, Some(uid), Some(gid))?;
    }
    fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
}

/// Pump a command's output into `sink` while waiting for it, enforcing the
/// timeout and the sandbox's destruction.
///
/// `wait` resolves with the exit code once the command has ended; `kill`
/// must kill the command and everything it started. It is also called once
/// after a normal exit, so it must tolerate that: proot uses it to reap
/// leftovers, native makes it a no-op then (background processes belong
/// to the sandbox's init).
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
            crate::provider::best_effort_quiet("reaping a timed-out command", wait.await);
            Ok(ExecExit::TimedOut)
        }
        () = cancel.cancelled() => {
            kill();
            crate::provider::best_effort_quiet("reaping a cancelled command", wait.await);
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

/// Namespaces over a host tree, built by hakoniwa, kept alive by a
/// per-sandbox init.
pub struct NativeProvider {
    dirs: SandboxDirs,
    /// The `stacyvm` binary that provides the hidden `__native-init` and
    /// `__native-exec` helpers, or why it is unknown.
    helper: Result<PathBuf, String>,
    /// Where this host's cgroups are, or why there are none to use.
    cgroups: Result<cgroup::Layout, String>,
    health: Mutex<Option<(Instant, Result<(), String>)>>,
    /// Host id ranges for sandboxes' user namespaces; `None` when the
    /// server is not root (root inside is then the server's own uid).
    ids: Option<ids::IdAllocator>,
    /// Whether sandboxes get their own capped filesystem, or why not.
    disk: Result<(), String>,
    /// The agent binary new sandboxes run as PID 1, or why commands go
    /// through the exec helper.
    agent: Result<PathBuf, String>,
}

impl NativeProvider {
    /// `sandboxes_dir` is `<data-dir>/sandboxes/native`; images come from
    /// `images` (plus the built-in `host` image). The helper binary is the
    /// running executable unless [`NativeProvider::with_helper_binary`]
    /// says otherwise.
    pub fn new(images: ImageStore, sandboxes_dir: PathBuf) -> Self {
        Self {
            dirs: SandboxDirs::new(images, sandboxes_dir).with_init(),
            helper: std::env::current_exe()
                .map_err(|e| format!("cannot locate the stacyvm binary: {e}")),
            cgroups: cgroup::Layout::detect(),
            health: Mutex::new(None),
            ids: Self::id_allocator(&crate::config::NativeIdsConfig::default()),
            disk: disk::available().inspect_err(|why| {
                tracing::warn!(%why, "native sandboxes' disks are not capped");
            }),
            agent: crate::provider::agent::find_binary(Path::new("")),
        }
    }

    /// Whether commands go through the in-sandbox agent
    /// (`providers.native.direct_exec`), and which binary
    /// (`providers.native.agent_binary`; empty: beside this executable).
    pub fn with_agent(mut self, direct: bool, binary: &Path) -> Self {
        self.agent = if direct {
            crate::provider::agent::find_binary(binary)
        } else {
            Err("providers.native.direct_exec is off".into())
        };
        match &self.agent {
            Ok(path) => tracing::info!(
                agent = %path.display(),
                "native exec path: direct, through the in-sandbox agent"
            ),
            Err(why) => tracing::info!("native exec path: the exec helper ({why})"),
        }
        self
    }

    /// The agent binary new sandboxes run, or why commands go through the
    /// exec helper.
    pub fn exec_path(&self) -> Result<&Path, &str> {
        self.agent.as_deref().map_err(String::as_str)
    }

    fn id_allocator(config: &crate::config::NativeIdsConfig) -> Option<ids::IdAllocator> {
        rustix::process::geteuid()
            .is_root()
            .then(|| ids::IdAllocator::new(config))
    }

    /// Uses the host id block `config` for sandboxes' user namespaces
    /// (`providers.native.ids`).
    pub fn with_ids(mut self, config: &crate::config::NativeIdsConfig) -> Self {
        self.ids = Self::id_allocator(config);
        self
    }

    /// The id ranges of the sandboxes on disk (read once, by the first
    /// spawn, to know which ranges are taken).
    fn ranges_in_use(&self) -> Vec<ids::IdRange> {
        let Ok(entries) = fs::read_dir(&self.dirs.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                self.dirs.meta(&name).ok()?.ids
            })
            .collect()
    }

    /// The `pids.max` of sandboxes spawned from now on (0: unlimited).
    pub fn with_pids_limit(mut self, limit: u64) -> Self {
        self.dirs.pids_limit = limit;
        self
    }

    /// The cgroup of a sandbox, when the host has usable cgroups.
    fn cgroup(&self, id: &str) -> Option<cgroup::SandboxCgroup> {
        self.cgroups.as_ref().ok().map(|layout| layout.sandbox(id))
    }

    /// Uses `path` (a `stacyvm` binary) for the sandbox init and exec
    /// helpers; needed where the running executable is not `stacyvm`
    /// (tests embedding a server).
    /// A relative path is taken from the current directory now: the
    /// helpers are started from other directories.
    pub fn with_helper_binary(mut self, path: PathBuf) -> Self {
        self.helper = Ok(absolute_path(path));
        self
    }

    fn helper(&self) -> ProviderResult<&Path> {
        self.helper
            .as_deref()
            .map_err(|e| ProviderError::Unavailable(e.clone()))
    }

    fn check_helper(&self) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.helper.as_deref().map_err(Clone::clone)?;
        match fs::metadata(path) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
            Ok(_) => Err(format!(
                "the native helper binary {} is not an executable file (providers.native.helper_binary)",
                path.display()
            )),
            Err(e) => Err(format!(
                "the native helper binary {} is missing: {e} (providers.native.helper_binary)",
                path.display()
            )),
        }
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

    /// The live init of a sandbox, or why commands cannot run in it.
    fn running_init(&self, id: &str) -> ProviderResult<init::InitRecord> {
        let dir = self.dirs.sandbox_dir(id)?;
        match init::read_record(&dir) {
            Some(record) if record.init_alive() => Ok(record),
            Some(_) => Err(ProviderError::Runtime(format!(
                "sandbox {id} cannot run commands: {} ({}); destroy it",
                exec::INIT_NOT_RUNNING,
                init::exit_cause(&dir)
            ))),
            None => Err(ProviderError::Runtime(format!(
                "sandbox {id} cannot run commands: {} (it never started); destroy it",
                exec::INIT_NOT_RUNNING
            ))),
        }
    }
}

/// Sends SIGTERM to the exec helper when the exec is abandoned (its future
/// dropped), so that the command does not run on unobserved.
struct TermOnDrop(Option<Arc<OwnedFd>>);

impl Drop for TermOnDrop {
    fn drop(&mut self) {
        if let Some(pidfd) = &self.0 {
            crate::provider::best_effort_quiet(
                "signalling a command",
                rustix::process::pidfd_send_signal(&**pidfd, rustix::process::Signal::TERM),
            );
        }
    }
}

impl NativeProvider {
    /// Runs a command through the exec helper (`stacyvm __native-exec`);
    /// `Ok(Err(exit))` when the program was not found (said on stderr).
    async fn exec_via_helper(
        &self,
        runtime_id: &str,
        meta: &SandboxMeta,
        record: &init::InitRecord,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> ProviderResult<Result<ExecExit, ExecExit>> {
        let helper = self.helper()?.to_path_buf();
        let (program, env) = match self.dirs.prepare(runtime_id, meta, spec, &sink).await? {
            Ok(ready) => ready,
            Err(exit) => {
                self.dirs.log(
                    runtime_id,
                    format!("exec {:?}: command not found", spec.argv),
                );
                return Ok(Err(exit));
            }
        };
        // The control socket, given to the helper as stdin: it carries the
        // command's environment in, and a failure to enter the sandbox out.
        // The environment must not be the helper's own: the helper starts
        // on the host as the server's user, where LD_PRELOAD and friends
        // from a request would be honoured by the dynamic loader.
        let (control, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| ProviderError::Runtime(format!("control socket: {e}")))?;
        let mut cmd = tokio::process::Command::new(&helper);
        cmd.arg("__native-exec")
            .arg(std::process::id().to_string())
            .arg(record.pid.to_string())
            .arg(record.start.to_string())
            .arg(spec.workdir.as_deref().unwrap_or("/"))
            .arg("--")
            .arg(&program)
            .args(spec.argv.iter().skip(1))
            .env_clear()
            .stdin(std::process::Stdio::from(OwnedFd::from(theirs)))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let spawned = cmd.spawn();
        // Our copy of the helper's end must go, or reading ours would never
        // see EOF.
        drop(cmd);
        let mut child = spawned.map_err(|e| {
            ProviderError::Unavailable(format!("cannot run {}: {e}", helper.display()))
        })?;
        let mut control = control
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(control))
            .map_err(|e| ProviderError::Runtime(format!("control socket: {e}")))?;
        let mut encoded = Vec::new();
        for (key, value) in &env {
            // prepare() refused NUL bytes in names and values.
            encoded.extend_from_slice(key.as_bytes());
            encoded.push(b'=');
            encoded.extend_from_slice(value.as_bytes());
            encoded.push(0);
        }
        {
            use tokio::io::AsyncWriteExt;
            // A helper that died early shows in its status below.
            crate::provider::best_effort_quiet(
                "sending the exec helper its command",
                control.write_all(&encoded).await,
            );
            crate::provider::best_effort_quiet(
                "closing the exec helper's control socket",
                control.shutdown().await,
            );
        }
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(ProviderError::Runtime(
                "the exec helper has no output pipes".into(),
            ));
        };
        // Not reaped until waited on below, so the pid still names it.
        let pidfd = child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32))
            .and_then(|pid| {
                rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
            })
            .map(Arc::new);
        let guard = TermOnDrop(pidfd.clone());
        let wait = async move {
            let status = child
                .wait()
                .await
                .map_err(|e| ProviderError::Runtime(format!("waiting for the exec helper: {e}")))?;
            let mut why = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(1), control.read_to_string(&mut why))
                .await;
            if !why.is_empty() {
                return Err(ProviderError::Runtime(why));
            }
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(code), _) => Ok(code),
                (None, Some(signal)) => Err(ProviderError::Runtime(format!(
                    "the exec helper was killed by signal {signal}"
                ))),
                (None, None) => Err(ProviderError::Runtime(format!(
                    "the exec helper ended oddly: {status}"
                ))),
            }
        };
        let kill = move || {
            // SIGTERM makes the helper SIGKILL the command's process group.
            // After a normal exit the helper is gone (reaped, and the pidfd
            // cannot name a recycled pid), so this is a no-op: background
            // processes stay, under the sandbox's init.
            if let Some(pidfd) = &pidfd {
                crate::provider::best_effort_quiet(
                    "signalling a command",
                    rustix::process::pidfd_send_signal(&**pidfd, rustix::process::Signal::TERM),
                );
            }
        };
        let cancel = self.dirs.cancel_token(runtime_id);
        let result = drive(stdout, stderr, sink, spec.timeout, cancel, wait, kill).await;
        drop(guard);
        result.map(Ok)
    }

    /// Runs a command through the sandbox's agent (PID 1); `Err` when it
    /// cannot be reached (nothing was sent). The command's environment is
    /// the exec helper's: the default `PATH` and the request's variables
    /// over nothing inherited.
    /// A sandbox made before per-sandbox user ids has host root as its
    /// root: it runs no commands.
    fn refuse_predating_ids(&self, runtime_id: &str, meta: &SandboxMeta) -> ProviderResult<()> {
        if meta.ids.is_none() && self.ids.is_some() {
            return Err(ProviderError::Runtime(format!(
                "sandbox {runtime_id} predates per-sandbox user ids: its root would be host root, so it runs no commands; destroy it"
            )));
        }
        Ok(())
    }

    async fn exec_via_agent(
        &self,
        runtime_id: &str,
        record: &init::InitRecord,
        spec: &ExecSpec,
        terminal: Option<crate::provider::Terminal>,
        sink: OutputSink,
    ) -> Result<ProviderResult<ExecExit>, crate::provider::agent::Unreachable> {
        if let Err(e) = crate::provider::check_command(&spec.argv, &spec.env) {
            return Ok(Err(ProviderError::InvalidRequest(e)));
        }
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
        env.extend(spec.env.clone());
        let spec = ExecSpec {
            env,
            ..spec.clone()
        };
        let cancel = self.dirs.cancel_token(runtime_id);
        tokio::select! {
            result = crate::provider::agent::exec(record.pid, record.start, &spec, terminal, sink) => result,
            () = cancel.cancelled() => Ok(Err(ProviderError::Runtime(
                "the sandbox was destroyed while the command ran".into(),
            ))),
        }
    }
}

#[async_trait]
impl Provider for NativeProvider {
    fn name(&self) -> &'static str {
        "native"
    }

    fn isolation(&self) -> &'static str {
        "Linux namespaces (user with a per-sandbox unprivileged id range, mount, pid, net, ipc, uts), capabilities reduced, no_new_privs, seccomp, procfs masked; limits per sandbox through cgroups"
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

    async fn health(&self) -> ProviderResult<()> {
        if let Some((at, verdict)) = lock(&self.health).as_ref()
            && at.elapsed() < HEALTH_TTL
        {
            return verdict.clone().map_err(ProviderError::Unavailable);
        }
        let verdict = match self.check_helper().and_then(|()| {
            self.cgroups
                .as_ref()
                .map(|_| ())
                .map_err(|e| format!("{e} (native sandboxes are limited through cgroups)"))
        }) {
            Ok(()) => tokio::task::spawn_blocking(Self::check_namespaces)
                .await
                .map_err(|e| ProviderError::Runtime(format!("health check: {e}")))?,
            Err(e) => Err(e),
        };
        *lock(&self.health) = Some((Instant::now(), verdict.clone()));
        verdict.map_err(ProviderError::Unavailable)
    }

    async fn image_available(&self, image: &str) -> ProviderResult<bool> {
        Ok(self.dirs.image_available(image, true))
    }

    async fn spawn(&self, spec: &SpawnSpec) -> ProviderResult<RuntimeHandle> {
        let helper = self.helper()?.to_path_buf();
        let ids = match &self.ids {
            Some(allocator) => Some(
                allocator
                    .allocate(|| self.ranges_in_use())
                    .map_err(ProviderError::Unavailable)?,
            ),
            None => None,
        };
        if ids.is_some()
            && let Err(why) = reachable_by_others(&self.dirs.dir)
        {
            if let (Some(allocator), Some(ids)) = (&self.ids, ids) {
                allocator.release(ids);
            }
            return Err(ProviderError::Unavailable(why));
        }
        let agent = self.agent.as_deref().ok();
        if let Err(e) = self
            .dirs
            .create(spec, true, ids, self.disk.is_ok(), agent)
            .await
        {
            if let (Some(allocator), Some(ids)) = (&self.ids, ids) {
                allocator.release(ids);
            }
            return Err(e);
        }
        let dir = self.dirs.sandbox_dir(&spec.sandbox_id)?;
        match init::launch(&helper, &dir).await {
            Ok(record) => {
                self.dirs.log(
                    &spec.sandbox_id,
                    format!("init started (host pid {})", record.pid),
                );
                Ok(RuntimeHandle {
                    runtime_id: spec.sandbox_id.clone(),
                })
            }
            Err(why) => {
                // Nothing may stay behind: stop whatever started, then
                // delete the tree.
                if let Err(e) = self.destroy(&spec.sandbox_id).await {
                    tracing::warn!(sandbox = %spec.sandbox_id, error = %e, "cleaning up a failed spawn");
                }
                Err(ProviderError::Runtime(why))
            }
        }
    }

    async fn destroy(&self, runtime_id: &str) -> ProviderResult<()> {
        let dir = self.dirs.sandbox_dir(runtime_id)?;
        let ids = self.dirs.meta(runtime_id).ok().and_then(|m| m.ids);
        self.dirs.cancel_execs(runtime_id);
        // Killing PID 1 takes the whole PID namespace with it; then the
        // tree can go.
        let cgroup = self.cgroup(runtime_id);
        let removed = tokio::task::spawn_blocking(move || {
            init::stop(&dir);
            cgroup.map_or(Ok(()), |c| c.remove())
        })
        .await
        .map_err(|e| ProviderError::Runtime(format!("stopping the sandbox's init: {e}")))?;
        self.dirs.destroy(runtime_id).await?;
        // A range goes back only once nothing of the sandbox can still run
        // under it (its cgroup is gone); otherwise it stays taken until the
        // next start re-reads the sandboxes on disk.
        if removed.is_ok()
            && let (Some(allocator), Some(ids)) = (&self.ids, ids)
        {
            allocator.release(ids);
        }
        // The tree is gone either way; a cgroup that would not go is
        // retried by the next destroy and swept at start-up.
        removed.map_err(|e| ProviderError::Runtime(format!("destroying sandbox {runtime_id}: {e}")))
    }

    async fn inspect(&self, runtime_id: &str) -> ProviderResult<RuntimeStatus> {
        self.dirs.inspect(runtime_id)
    }

    async fn inventory(&self) -> ProviderResult<Vec<InventoryItem>> {
        self.dirs.inventory().await
    }

    async fn recover_at_startup(&self) -> ProviderResult<usize> {
        let mut fixed = self.dirs.sweep_leftovers().await?;
        fixed += self.sweep_cgroups().await;
        // Sandboxes whose init is gone without a recorded end (the host
        // restarted, or the keeper was killed while StacyVM was down) and
        // sandboxes from before native sandboxes had an init: give them a
        // new init (their files are intact) instead of reporting them dead.
        let helper = self.helper()?.to_path_buf();
        for item in self.dirs.inventory().await? {
            let dir = self.dirs.sandbox_dir(&item.sandbox_id)?;
            // After a host restart a sandbox's own filesystem is no longer
            // mounted: mount it before anything reads or runs the tree.
            if let Ok(meta) = self.dirs.meta(&item.sandbox_id)
                && meta.disk_mb.is_some()
            {
                let at = disk::mount_point(&dir, meta.image == HOST_IMAGE);
                if !disk::is_mounted(&at) {
                    let (dir, at2) = (dir.clone(), at.clone());
                    match tokio::task::spawn_blocking(move || disk::mount(&dir, &at2)).await {
                        Ok(Ok(())) => {
                            fixed += 1;
                            tracing::info!(sandbox = %item.sandbox_id, "mounted the sandbox's disk again");
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(sandbox = %item.sandbox_id, error = %e, "cannot mount the sandbox's disk");
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(sandbox = %item.sandbox_id, error = %e, "cannot mount the sandbox's disk");
                            continue;
                        }
                    }
                }
            }
            if !init::needs_new_init(&dir) {
                continue;
            }
            match init::launch(&helper, &dir).await {
                Ok(record) => {
                    fixed += 1;
                    tracing::info!(sandbox = %item.sandbox_id, pid = record.pid, "started a new init for a sandbox whose init was gone");
                }
                Err(why) => {
                    tracing::warn!(sandbox = %item.sandbox_id, %why, "cannot start a new init for a sandbox")
                }
            }
        }
        Ok(fixed)
    }

    async fn exec_terminal(
        &self,
        runtime_id: &str,
        spec: &ExecSpec,
        terminal: crate::provider::Terminal,
        sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        let meta = self.dirs.meta(runtime_id)?;
        self.refuse_predating_ids(runtime_id, &meta)?;
        let record = self.running_init(runtime_id)?;
        if meta.agent.is_none() || self.agent.is_err() {
            return Err(ProviderError::Unavailable(
                "terminals need the in-sandbox agent (providers.native.direct_exec)".into(),
            ));
        }
        let result = match self
            .exec_via_agent(runtime_id, &record, spec, Some(terminal), sink)
            .await
        {
            Ok(result) => result,
            Err(why) => Err(ProviderError::Unavailable(why.to_string())),
        };
        let outcome = super::describe_exit(&result);
        self.dirs
            .log(runtime_id, format!("terminal {:?}: {outcome}", spec.argv));
        result
    }

    async fn exec(
        &self,
        runtime_id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        let meta = self.dirs.meta(runtime_id)?;
        self.refuse_predating_ids(runtime_id, &meta)?;
        let record = self.running_init(runtime_id)?;
        let cgroup = self.cgroup(runtime_id);
        let oom_before = cgroup.as_ref().and_then(|c| c.oom_kills());
        let marker_sink = sink.clone();
        let mut direct = None;
        if meta.agent.is_some() && self.agent.is_ok() {
            match self
                .exec_via_agent(runtime_id, &record, spec, None, sink.clone())
                .await
            {
                Ok(result) => direct = Some(result),
                // Nothing was sent: the exec helper runs it instead.
                Err(why) => tracing::debug!(sandbox = %runtime_id, %why, "direct exec unavailable"),
            }
        }
        let result = match direct {
            Some(result) => result,
            None => match self
                .exec_via_helper(runtime_id, &meta, &record, spec, sink)
                .await
            {
                Ok(Ok(exit)) => Ok(exit),
                // Not found before anything ran: already said on stderr.
                Ok(Err(exit)) => return Ok(exit),
                Err(e) => Err(e),
            },
        };
        let outcome = super::describe_exit(&result);
        self.dirs
            .log(runtime_id, format!("exec {:?}: {outcome}", spec.argv));
        if matches!(result, Ok(ExecExit::Exited(code)) if code == 128 + libc::SIGKILL)
            && let Some(cgroup) = &cgroup
            && oom_killed_since(cgroup, oom_before)
        {
            let marker = match meta.memory_mb {
                0 => "stacyvm: the command was killed by the OOM killer".to_string(),
                mb => format!(
                    "stacyvm: the command was killed by the OOM killer (sandbox memory limit {mb} MiB)"
                ),
            };
            self.dirs
                .log(runtime_id, format!("exec {:?}: {marker}", spec.argv));
            let _ = marker_sink
                .send(OutputChunk {
                    stream: StreamKind::Stderr,
                    data: Bytes::from(format!("{marker}\n")),
                })
                .await;
        }
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

    async fn stats(&self, runtime_id: &str) -> ProviderResult<RuntimeStats> {
        let meta = self.dirs.meta(runtime_id)?;
        let Some(cgroup) = self.cgroup(runtime_id) else {
            return Ok(RuntimeStats::default());
        };
        // CPU use over a short sample, in percent of one CPU (as docker's).
        let before = (Instant::now(), cgroup.cpu_usage_ns());
        tokio::time::sleep(STATS_SAMPLE).await;
        let after = (Instant::now(), cgroup.cpu_usage_ns());
        let cpu_pct = match (before.1, after.1) {
            (Some(b), Some(a)) => {
                let wall = after.0.duration_since(before.0).as_nanos() as f64;
                a.saturating_sub(b) as f64 / wall.max(1.0) * 100.0
            }
            _ => 0.0,
        };
        Ok(RuntimeStats {
            supported: true,
            cpu_pct,
            mem_bytes: cgroup.memory_bytes().unwrap_or(0),
            mem_limit_bytes: meta.limits().memory_bytes,
            pids: cgroup.pids(),
        })
    }
}

/// How long [`NativeProvider::stats`] samples CPU use.
const STATS_SAMPLE: Duration = Duration::from_millis(100);

/// Whether the OOM killer struck in the sandbox's cgroup since `before`
/// was read.
fn oom_killed_since(cgroup: &cgroup::SandboxCgroup, before: Option<u64>) -> bool {
    match (before, cgroup.oom_kills()) {
        (Some(before), Some(now)) => now > before,
        (None, Some(now)) => now > 0,
        _ => false,
    }
}

impl NativeProvider {
    /// Start-up: removes sandbox cgroups whose sandbox directory is gone
    /// (a destroy cut short). Returns how many went.
    async fn sweep_cgroups(&self) -> usize {
        let Ok(layout) = self.cgroups.clone() else {
            return 0;
        };
        let dir = self.dirs.dir.clone();
        let swept =
            tokio::task::spawn_blocking(move || layout.sweep(|id| dir.join(id).exists())).await;
        let Ok((removed, failed)) = swept else {
            return 0;
        };
        for id in &removed {
            tracing::info!(sandbox = %id, "removed the cgroup of a sandbox that no longer exists");
        }
        for why in failed {
            tracing::warn!(%why, "cannot remove a leftover sandbox cgroup");
        }
        removed.len()
    }
}

/// `path` made absolute against the current directory (unchanged when it
/// already is, or when the current directory cannot be read).
fn absolute_path(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

#[cfg(test)]
mod helper_path_tests {
    use super::*;

    #[test]
    fn a_relative_helper_binary_is_taken_from_the_current_directory() {
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(
            absolute_path(PathBuf::from("target/release/stacyvm")),
            cwd.join("target/release/stacyvm")
        );
        assert_eq!(
            absolute_path(PathBuf::from("/usr/bin/stacyvm")),
            PathBuf::from("/usr/bin/stacyvm")
        );
    }
}
