//! The Docker provider: one container per sandbox, through bollard.
//!
//! Containers are named `stacyvm-<sandbox id>` and labelled with the sandbox
//! id, so an inventory of the daemon always maps back to records. File reads
//! and writes use the archive API; listing, stat, move, chmod, delete and
//! glob run small POSIX commands inside the container, which keeps every path
//! inside the container's own root by construction.
//!
//! A sandbox's `disk_mb` is the storage driver's `size` option where the
//! daemon supports it (overlay2 on XFS with `pquota`); elsewhere it is the
//! size of a tmpfs at `/tmp` (see [`crate::config::DockerDiskLimit`]). The
//! archive API does not see into a container's tmpfs mounts, so files under
//! a tmpfs `/tmp` are read and written by commands inside the container.
//!
//! Commands take the direct path where it can work: the container's PID 1
//! is the in-sandbox agent ([`super::agent`]), and an exec is one
//! connection to its socket instead of the Engine API's create, start and
//! inspect calls. Containers made without it (the option off, a remote
//! daemon, a server that is not root, a container from before) run
//! commands through the Engine API, as does any exec whose agent cannot be
//! reached before the command was sent.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, DownloadFromContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StatsOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{
    Capability, ExecExit, ExecSpec, FileEntry, InventoryItem, OutputChunk, OutputSink, Provider,
    ProviderError, ProviderResult, RuntimeHandle, RuntimeStats, RuntimeStatus, SpawnSpec,
    StreamKind,
};
use crate::config::{DockerConfig, DockerDiskLimit};

/// Label that marks a container as a StacyVM sandbox; its value is the sandbox id.
pub const SANDBOX_LABEL: &str = "io.stacyvm.sandbox";

/// Label naming the StacyVM installation (its data directory) that owns a
/// container, so that servers sharing one daemon only reconcile their own.
pub const INSTANCE_LABEL: &str = "io.stacyvm.instance";

/// Label recording how a container's disk is capped: `size` (the storage
/// driver's quota on the writable layer) or `tmpfs` (a tmpfs at `/tmp`).
pub const DISK_LABEL: &str = "io.stacyvm.disk";

/// Label set on containers whose PID 1 is the in-sandbox agent.
pub const AGENT_LABEL: &str = "io.stacyvm.agent";

/// Where the tmpfs goes when the storage driver cannot cap the writable layer.
const TMPFS_DIR: &str = "/tmp";

/// How one container's disk is capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskCap {
    Size,
    Tmpfs,
}

impl DiskCap {
    fn label(self) -> &'static str {
        match self {
            DiskCap::Size => "size",
            DiskCap::Tmpfs => "tmpfs",
        }
    }
}

/// API version used when the daemon cannot be asked (it is down at start-up).
/// 1.41 is Docker 20.10, the oldest daemon we support.
const FALLBACK_API: bollard::ClientVersion = bollard::ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// Timeout for the helper commands behind the files API.
const FILE_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// The Docker provider.
pub struct DockerProvider {
    /// `None` until the daemon's socket exists.
    client: RwLock<Option<Docker>>,
    /// Whether `client` speaks a version the daemon agreed to.
    negotiated: RwLock<bool>,
    config: DockerConfig,
    /// The value of [`INSTANCE_LABEL`] on this server's containers.
    instance: String,
    /// Recent lifecycle lines per container (spawn, each exec and its exit),
    /// served by `logs` together with the container's own output. In memory:
    /// lost on restart.
    events: Mutex<HashMap<String, VecDeque<String>>>,
    /// When the daemon last answered a health check, and whether a check
    /// has failed since: after an outage, sandboxes the daemon stopped on
    /// its way down are started again.
    availability: Mutex<Availability>,
    /// Set once the daemon refused the `size` storage option: with
    /// `disk_limit: auto`, later spawns go straight to a tmpfs `/tmp`.
    size_refused: AtomicBool,
    /// The agent binary new containers run as PID 1, or why commands go
    /// through the Engine API.
    agent: Result<PathBuf, String>,
    /// Set once the daemon refused to mount the agent (it sees another
    /// filesystem than this server): later spawns go without it.
    agent_refused: AtomicBool,
    /// PID 1 of each container seen by exec: `Some` for agent containers,
    /// `None` for those that take the Engine API. Entries leave on destroy
    /// and when the agent cannot be reached.
    endpoints: Mutex<HashMap<String, Option<Endpoint>>>,
}

/// Where a container's agent runs: its PID 1 on this host, with the
/// process's start time so that a recycled pid is never taken for it.
#[derive(Debug, Clone, Copy)]
struct Endpoint {
    pid: i32,
    start: u64,
}

impl DockerProvider {
    /// Whether containers run on a kernel of their own (gVisor): their
    /// processes are not the host's.
    fn own_kernel(&self) -> bool {
        !self.config.runtime.is_empty() && self.config.runtime != "runc"
    }
}

/// Whether exec can take the direct path with this configuration, and the
/// agent binary it would use.
fn direct_exec_plan(config: &DockerConfig) -> Result<PathBuf, String> {
    if !config.direct_exec {
        return Err("providers.docker.direct_exec is off".into());
    }
    // The agent's socket is reached through the container's root as the
    // host sees it (`/proc/<pid>/root`): a runtime with its own kernel
    // (gVisor) keeps the container's processes and files out of that view.
    if !config.runtime.is_empty() && config.runtime != "runc" {
        return Err(format!(
            "runtime {} keeps the container's processes out of the host's view",
            config.runtime
        ));
    }
    let host = if config.host.is_empty() {
        std::env::var("DOCKER_HOST").unwrap_or_default()
    } else {
        config.host.clone()
    };
    if !host.is_empty() && !host.starts_with("unix://") {
        return Err(format!("the daemon is not local ({host})"));
    }
    if !rustix::process::geteuid().is_root() {
        return Err("the server does not run as root, so it cannot reach into containers".into());
    }
    super::agent::find_binary(&config.agent_binary)
}

#[derive(Debug, Default)]
struct Availability {
    last_ok: Option<chrono::DateTime<chrono::Utc>>,
    down_since_ok: bool,
}

/// Lifecycle lines kept per container.
const EVENT_LINES: usize = 1000;

impl DockerProvider {
    /// Connects to the configured daemon. A daemon that is down is not an
    /// error here: the provider reports itself unhealthy until it answers.
    /// `instance` identifies this installation; containers are labelled with
    /// it and the inventory only lists those.
    pub async fn connect(config: &DockerConfig, instance: &str) -> ProviderResult<DockerProvider> {
        let client = match Self::open(config) {
            Ok(client) => Some(client),
            Err(e) => {
                // No socket yet (dockerd not installed or not started):
                // unhealthy until it appears.
                tracing::warn!(error = %e, "docker daemon not reachable");
                None
            }
        };
        let provider = DockerProvider {
            client: RwLock::new(client),
            negotiated: RwLock::new(false),
            config: config.clone(),
            instance: instance.to_string(),
            events: Mutex::new(HashMap::new()),
            availability: Mutex::new(Availability::default()),
            size_refused: AtomicBool::new(false),
            agent: direct_exec_plan(config),
            agent_refused: AtomicBool::new(false),
            endpoints: Mutex::new(HashMap::new()),
        };
        match &provider.agent {
            Ok(binary) => tracing::info!(
                agent = %binary.display(),
                "docker exec path: direct, through the in-sandbox agent"
            ),
            Err(why) => tracing::info!("docker exec path: the Engine API ({why})"),
        }
        provider.negotiate().await;
        Ok(provider)
    }

    /// The agent binary new sandboxes run for the direct exec path, or why
    /// their commands go through the Engine API.
    pub fn exec_path(&self) -> Result<&Path, &str> {
        if self.agent_refused.load(Ordering::Relaxed) {
            return Err("the daemon cannot mount the agent binary");
        }
        self.agent.as_deref().map_err(String::as_str)
    }

    fn open(config: &DockerConfig) -> Result<Docker, DockerError> {
        if config.host.is_empty() {
            Docker::connect_with_local_defaults()
        } else if let Some(path) = config.host.strip_prefix("unix://") {
            Docker::connect_with_unix(path, 120, &FALLBACK_API)
        } else {
            Docker::connect_with_http(&config.host, 120, &FALLBACK_API)
        }
    }

    /// Connects if needed and agrees on an API version with the daemon,
    /// once it answers.
    async fn negotiate(&self) {
        if self.negotiated.read().map(|n| *n).unwrap_or(false) {
            return;
        }
        let client = match self.client() {
            Ok(client) => client,
            Err(_) => match Self::open(&self.config) {
                Ok(client) => client,
                Err(e) => {
                    tracing::debug!(error = %e, "docker daemon still not reachable");
                    return;
                }
            },
        };
        match client.clone().negotiate_version().await {
            Ok(negotiated) => {
                if let Ok(mut c) = self.client.write() {
                    *c = Some(negotiated);
                }
                if let Ok(mut n) = self.negotiated.write() {
                    *n = true;
                }
            }
            Err(e) => tracing::debug!(error = %e, "docker version negotiation failed"),
        }
    }

    fn client(&self) -> ProviderResult<Docker> {
        let client = match self.client.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        client.ok_or_else(|| {
            ProviderError::Unavailable("the Docker daemon is unreachable (no socket)".into())
        })
    }

    /// Appends a lifecycle line to a container's log.
    fn log(&self, container: &str, line: String) {
        if let Ok(mut events) = self.events.lock() {
            let lines = events.entry(container.to_string()).or_default();
            if lines.len() == EVENT_LINES {
                lines.pop_front();
            }
            lines.push_back(format!("{} {line}", chrono::Utc::now().to_rfc3339()));
        }
    }

    fn container_name(sandbox_id: &str) -> String {
        format!("stacyvm-{sandbox_id}")
    }

    /// Pulls `image` if the daemon does not have it.
    async fn ensure_image(&self, image: &str) -> ProviderResult<()> {
        let docker = self.client()?;
        match docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(daemon_error(e)),
        }
        let options = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let mut pull = docker.create_image(Some(options), None, None);
        while let Some(progress) = pull.next().await {
            if let Err(e) = progress {
                return Err(ProviderError::ImageNotFound {
                    image: image.to_string(),
                    reason: format!("not present locally and the pull failed: {}", short(&e)),
                });
            }
        }
        Ok(())
    }

    /// Runs a helper command to completion and captures its output.
    async fn run_capture(
        &self,
        container: &str,
        argv: Vec<String>,
    ) -> ProviderResult<(i32, String, String)> {
        let (tx, mut rx) = mpsc::channel(64);
        let spec = ExecSpec {
            argv,
            env: Default::default(),
            workdir: None,
            timeout: FILE_OP_TIMEOUT,
        };
        let collect = async move {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            while let Some(chunk) = rx.recv().await {
                let chunk: OutputChunk = chunk;
                match chunk.stream {
                    StreamKind::Stdout => out.extend_from_slice(&chunk.data),
                    StreamKind::Stderr => err.extend_from_slice(&chunk.data),
                }
            }
            (out, err)
        };
        let (exit, (out, err)) = tokio::join!(self.run_exec(container, &spec, tx), collect);
        let code = match exit? {
            ExecExit::Exited(code) => code,
            ExecExit::TimedOut => {
                return Err(ProviderError::Runtime("file operation timed out".into()));
            }
        };
        Ok((
            code,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        ))
    }

    /// Runs a `sh -c` helper script with `args` as `$1...`, mapping the
    /// conventional exit codes 2 (not found) and 3 (wrong kind) to errors.
    async fn run_script(
        &self,
        container: &str,
        script: &str,
        args: &[&str],
    ) -> ProviderResult<String> {
        let (code, out, err) = self
            .run_capture(container, helper_script(script, args))
            .await?;
        match code {
            0 => Ok(out),
            2 => Err(ProviderError::FileNotFound(
                args.first().copied().unwrap_or_default().to_string(),
            )),
            _ => Err(ProviderError::InvalidRequest(
                err.trim()
                    .lines()
                    .last()
                    .unwrap_or("file operation failed")
                    .to_string(),
            )),
        }
    }

    /// Runs one exec (the trait's `exec` without the lifecycle log, which
    /// the files API also uses for its helper commands).
    async fn run_exec(
        &self,
        runtime_id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        if let Some(endpoint) = self.endpoint(runtime_id).await {
            match super::agent::exec(endpoint.pid, endpoint.start, spec, None, sink.clone()).await {
                Ok(result) => return result,
                Err(why) => {
                    // Nothing was sent: the Engine API runs it instead, and
                    // the next exec looks the container up again (a
                    // daemon restart gives it a new PID 1).
                    tracing::debug!(container = %runtime_id, %why, "direct exec unavailable");
                    self.forget_endpoint(runtime_id);
                }
            }
        }
        self.run_engine_exec(runtime_id, spec, sink).await
    }

    /// The agent endpoint of a container, looked up once (one inspect)
    /// and remembered; `None` for a container without the agent.
    async fn endpoint(&self, runtime_id: &str) -> Option<Endpoint> {
        if let Some(known) = self.endpoints.lock().ok()?.get(runtime_id) {
            return *known;
        }
        self.agent.as_ref().ok()?;
        let info = self
            .client()
            .ok()?
            .inspect_container(runtime_id, None)
            .await
            .ok()?;
        let has_agent = info
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .is_some_and(|labels| labels.contains_key(AGENT_LABEL));
        let state = info.state.as_ref()?;
        if state.running != Some(true) {
            // Not cached: the Engine API says what is wrong, and a
            // restarted container is looked up afresh.
            return None;
        }
        let endpoint = if has_agent {
            endpoint_of(info.id.as_deref().unwrap_or_default(), state)
        } else {
            None
        };
        if let Ok(mut endpoints) = self.endpoints.lock() {
            endpoints.insert(runtime_id.to_string(), endpoint);
        }
        endpoint
    }

    fn forget_endpoint(&self, runtime_id: &str) {
        if let Ok(mut endpoints) = self.endpoints.lock() {
            endpoints.remove(runtime_id);
        }
    }

    /// Runs one exec through the Engine API: create, start (attached),
    /// inspect for the exit code.
    async fn run_engine_exec(
        &self,
        runtime_id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        let docker = self.client()?;
        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // Under a runtime with its own kernel the exec's processes are not
        // the host's: the command reports its pid inside first, so that a
        // timeout can kill its tree from inside.
        let own_kernel = self.own_kernel();
        let cmd = if own_kernel {
            let mut wrapped: Vec<String> = ["/bin/sh", "-c", PID_WRAPPER, "sh"]
                .map(str::to_string)
                .to_vec();
            wrapped.extend(spec.argv.iter().cloned());
            wrapped
        } else {
            spec.argv.clone()
        };
        let options = CreateExecOptions {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(cmd),
            env: (!env.is_empty()).then_some(env),
            working_dir: spec.workdir.clone(),
            ..Default::default()
        };
        let created = docker
            .create_exec(runtime_id, options)
            .await
            .map_err(|e| runtime_error(runtime_id, e))?;
        let started = docker
            .start_exec(&created.id, None)
            .await
            .map_err(|e| runtime_error(runtime_id, e))?;
        let StartExecResults::Attached { mut output, .. } = started else {
            return Err(ProviderError::Runtime("exec did not attach".into()));
        };
        // If this future is dropped before the command ended (a shutdown
        // cutting commands off), the command must not live on unseen.
        let mut guard = KillExecOnDrop {
            docker: Some(docker.clone()),
            exec_id: created.id.clone(),
            inside: None,
        };
        // The pid line not yet read (own kernel), and what came before its end.
        let mut pid_line: Option<Vec<u8>> = own_kernel.then(Vec::new);
        let deadline = tokio::time::sleep(spec.timeout);
        tokio::pin!(deadline);
        let mut listening = true;
        let mut first = true;
        // The runtime's own complaint when the process cannot start at all
        // (missing command or workdir); held back and translated below.
        let mut start_failure: Option<Bytes> = None;
        loop {
            tokio::select! {
                item = output.next() => {
                    let Some(item) = item else { break };
                    let chunk = match item {
                        Ok(LogOutput::StdOut { message }) => OutputChunk { stream: StreamKind::Stdout, data: message },
                        Ok(LogOutput::StdErr { message }) => OutputChunk { stream: StreamKind::Stderr, data: message },
                        Ok(LogOutput::StdIn { .. } | LogOutput::Console { .. }) => continue,
                        Err(e) => return Err(daemon_error(e)),
                    };
                    if std::mem::take(&mut first) && chunk.data.starts_with(OCI_EXEC_FAILED) {
                        start_failure = Some(chunk.data);
                        continue;
                    }
                    let mut chunk = chunk;
                    if chunk.stream == StreamKind::Stderr && let Some(line) = pid_line.as_mut() {
                        line.extend_from_slice(&chunk.data);
                        let Some(end) = line.iter().position(|b| *b == b'\n') else {
                            continue;
                        };
                        let rest = line.split_off(end + 1);
                        let pid = std::str::from_utf8(line)
                            .ok()
                            .and_then(|l| l.trim().strip_prefix(PID_MARKER))
                            .and_then(|p| p.parse::<u32>().ok());
                        match pid {
                            Some(pid) => {
                                guard.inside = Some((runtime_id.to_string(), pid));
                                if rest.is_empty() {
                                    pid_line = None;
                                    continue;
                                }
                                chunk.data = Bytes::from(rest);
                            }
                            // Not the wrapper's line (a shell that printed
                            // first): the command's own output, delivered.
                            None => {
                                tracing::warn!(runtime_id, "a command did not report its pid inside the sandbox: its timeout cannot kill its tree");
                                let mut all = std::mem::take(line);
                                all.extend_from_slice(&rest);
                                chunk.data = Bytes::from(all);
                            }
                        }
                        pid_line = None;
                    }
                    if listening && sink.send(chunk).await.is_err() {
                        // Nobody listens any more; keep draining so the command is not blocked.
                        listening = false;
                    }
                }
                () = &mut deadline => {
                    let inside = guard.inside.take();
                    guard.disarm();
                    kill_exec(&docker, &created.id, inside).await;
                    return Ok(ExecExit::TimedOut);
                }
            }
        }
        guard.disarm();
        let info = docker
            .inspect_exec(&created.id)
            .await
            .map_err(|e| runtime_error(runtime_id, e))?;
        let code = i32::try_from(info.exit_code.unwrap_or(-1)).unwrap_or(-1);
        let Some(failure) = start_failure else {
            return Ok(ExecExit::Exited(code));
        };
        let text = String::from_utf8_lossy(&failure);
        // runc's words, and gVisor's.
        if text.contains("chdir to cwd")
            || text.contains("failed to find initial working directory")
        {
            return Err(ProviderError::InvalidRequest(format!(
                "working directory {:?} does not exist in the sandbox",
                spec.workdir.as_deref().unwrap_or("/")
            )));
        }
        // Report a missing command as a shell would: exit 127 on stderr.
        let (message, code) = if text.contains("executable file not found")
            || text.contains("no such file or directory")
        {
            let program = spec.argv.first().map(String::as_str).unwrap_or_default();
            (format!("{program}: command not found\n"), 127)
        } else {
            (text.into_owned(), code)
        };
        if listening {
            let chunk = OutputChunk {
                stream: StreamKind::Stderr,
                data: Bytes::from(message),
            };
            // A departed listener is fine here.
            let _departed = sink.send(chunk).await;
        }
        Ok(ExecExit::Exited(code))
    }

    /// The container for a sandbox, its disk capped as `disk` says.
    fn container_body(
        &self,
        spec: &SpawnSpec,
        disk: DiskCap,
        agent: Option<&Path>,
    ) -> ContainerCreateBody {
        let memory = i64::from(spec.memory_mb) * 1024 * 1024;
        let (storage_opt, mut tmpfs) = match disk {
            DiskCap::Size => (
                Some(HashMap::from([(
                    "size".to_string(),
                    format!("{}M", spec.disk_mb),
                )])),
                None,
            ),
            DiskCap::Tmpfs => (
                None,
                Some(HashMap::from([(
                    TMPFS_DIR.to_string(),
                    format!("rw,exec,nosuid,nodev,mode=1777,size={}m", spec.disk_mb),
                )])),
            ),
        };
        let mut labels = HashMap::from([
            (SANDBOX_LABEL.to_string(), spec.sandbox_id.clone()),
            (INSTANCE_LABEL.to_string(), self.instance.clone()),
            (DISK_LABEL.to_string(), disk.label().to_string()),
            ("io.stacyvm.managed".to_string(), "true".to_string()),
        ]);
        // Keep the container alive regardless of the image's own command;
        // work happens through exec. SIGTERM ends the sandbox at once (a
        // daemon shutdown or `docker stop` does not wait 10 s), as `kill 1`
        // from inside does, like any init with a handler: the agent does
        // so, and so does the shell loop where there is no agent.
        let mut entrypoint: Vec<String> = vec![
            "/bin/sh".into(),
            "-c".into(),
            "trap 'exit 143' TERM INT; while :; do sleep 3600 & wait $!; done".into(),
        ];
        let mut mounts = None;
        if let Some(binary) = agent {
            entrypoint = vec![super::agent::AGENT_PATH.into()];
            mounts = Some(vec![Mount {
                target: Some(super::agent::AGENT_PATH.into()),
                source: Some(binary.display().to_string()),
                typ: Some(MountType::BIND),
                read_only: Some(true),
                ..Default::default()
            }]);
            // The agent's socket: a few KiB of tmpfs, so this mount is no
            // way around the sandbox's disk cap.
            tmpfs.get_or_insert_with(HashMap::new).insert(
                super::agent::RUN_DIR.to_string(),
                "rw,nosuid,nodev,noexec,mode=1777,size=64k".to_string(),
            );
            labels.insert(AGENT_LABEL.to_string(), "1".to_string());
        }
        let host_config = HostConfig {
            mounts,
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: Some(i64::from(spec.vcpus) * 1_000_000_000),
            pids_limit: Some(self.config.pids_limit),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(
                super::SANDBOX_CAPABILITIES
                    .iter()
                    .map(|c| c.to_string())
                    .collect(),
            ),
            security_opt: Some(vec!["no-new-privileges".into()]),
            network_mode: Some(self.config.network.clone()),
            storage_opt,
            tmpfs,
            runtime: (!self.config.runtime.is_empty()).then(|| self.config.runtime.clone()),
            // No docker-init: PID 1 (the agent, or /bin/sh, whose absence
            // then fails the start itself instead of leaving a container
            // that dies a moment later) reaps orphaned exec children.
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: Some(entrypoint),
            cmd: Some(vec![]),
            working_dir: Some("/".into()),
            hostname: Some(spec.sandbox_id.clone()),
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// Whether `path` lies on the container's tmpfs `/tmp`, which the
    /// archive API cannot see (the container's `DISK_LABEL` says).
    /// `path` is resolved lexically first (`..` stops at `/`), as the
    /// container resolves it; a symlink elsewhere that points into `/tmp`
    /// is not followed, so a file reached that way lands in the layer.
    async fn on_tmpfs(&self, container: &str, path: &str) -> ProviderResult<bool> {
        let path = super::resolve_lexically(path);
        let under = path == TMPFS_DIR
            || path
                .strip_prefix(TMPFS_DIR)
                .is_some_and(|rest| rest.starts_with('/'));
        if !under {
            return Ok(false);
        }
        let info = self
            .client()?
            .inspect_container(container, None)
            .await
            .map_err(|e| runtime_error(container, e))?;
        Ok(info
            .config
            .and_then(|c| c.labels)
            .and_then(|labels| labels.get(DISK_LABEL).cloned())
            .is_some_and(|v| v == DiskCap::Tmpfs.label()))
    }

    /// Runs `argv` with `input` on its stdin; returns the exit code, stdout
    /// (at most `limit` bytes: more is an error) and the last stderr line.
    async fn run_piped(
        &self,
        container: &str,
        argv: Vec<String>,
        input: Bytes,
        limit: usize,
    ) -> ProviderResult<(i64, Vec<u8>, String)> {
        use tokio::io::AsyncWriteExt;
        let docker = self.client()?;
        let options = CreateExecOptions {
            attach_stdin: Some(!input.is_empty()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(argv),
            ..Default::default()
        };
        let work = async {
            let created = docker
                .create_exec(container, options)
                .await
                .map_err(|e| runtime_error(container, e))?;
            let started = docker
                .start_exec(&created.id, None)
                .await
                .map_err(|e| runtime_error(container, e))?;
            let StartExecResults::Attached {
                mut output,
                input: mut stdin,
            } = started
            else {
                return Err(ProviderError::Runtime("exec did not attach".into()));
            };
            let mut guard = KillExecOnDrop {
                docker: Some(docker.clone()),
                exec_id: created.id.clone(),
                inside: None,
            };
            let feed = async {
                if !input.is_empty() {
                    stdin.write_all(&input).await?;
                }
                stdin.shutdown().await
            };
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let drain = async {
                while let Some(item) = output.next().await {
                    match item.map_err(daemon_error)? {
                        LogOutput::StdOut { message } => {
                            if out.len() + message.len() > limit {
                                return Err(ProviderError::InvalidRequest(format!(
                                    "the file is larger than {} MiB, the most the API reads at once",
                                    limit >> 20
                                )));
                            }
                            out.extend_from_slice(&message);
                        }
                        LogOutput::StdErr { message } => {
                            if err.len() < 4096 {
                                err.extend_from_slice(&message);
                            }
                        }
                        LogOutput::StdIn { .. } | LogOutput::Console { .. } => {}
                    }
                }
                Ok(())
            };
            let (fed, drained) = tokio::join!(feed, drain);
            drained?;
            fed.map_err(|e| ProviderError::Runtime(format!("writing to the sandbox: {e}")))?;
            guard.disarm();
            let info = docker
                .inspect_exec(&created.id)
                .await
                .map_err(|e| runtime_error(container, e))?;
            let last = String::from_utf8_lossy(&err)
                .trim()
                .lines()
                .last()
                .unwrap_or("file operation failed")
                .to_string();
            Ok((info.exit_code.unwrap_or(-1), out, last))
        };
        tokio::time::timeout(FILE_OP_TIMEOUT, work)
            .await
            .map_err(|_| ProviderError::Runtime("file operation timed out".into()))?
    }

    /// `write_file` for a path on a tmpfs `/tmp`: `cat` inside the container.
    async fn write_by_exec(
        &self,
        container: &str,
        path: &str,
        content: Bytes,
        mode: u32,
    ) -> ProviderResult<()> {
        let script = "mkdir -p -- \"$(dirname -- \"$1\")\" || exit 3; \
                      [ -d \"$1\" ] && { echo \"$1 is a directory\" >&2; exit 3; }; \
                      cat > \"$1\" && chmod \"$2\" \"$1\" || exit 3";
        let argv = helper_script(script, &[path, &format!("{mode:o}")]);
        // With nothing to write stdin is not attached: `cat` reads /dev/null.
        match self.run_piped(container, argv, content, 0).await? {
            (0, _, _) => Ok(()),
            (_, _, err) => Err(ProviderError::InvalidRequest(err)),
        }
    }

    /// `read_file` for a path on a tmpfs `/tmp`: `cat` inside the container.
    async fn read_by_exec(&self, container: &str, path: &str) -> ProviderResult<Bytes> {
        let script = "[ -e \"$1\" ] || exit 2; \
                      [ -d \"$1\" ] && { echo \"$1 is a directory\" >&2; exit 3; }; \
                      exec cat -- \"$1\"";
        let argv = helper_script(script, &[path]);
        match self
            .run_piped(container, argv, Bytes::new(), super::MAX_READ_BYTES)
            .await?
        {
            (0, out, _) => Ok(Bytes::from(out)),
            (2, _, _) => Err(ProviderError::FileNotFound(path.to_string())),
            (_, _, err) => Err(ProviderError::InvalidRequest(err)),
        }
    }

    /// This installation's sandbox containers, in any state.
    async fn list_sandbox_containers(&self) -> ProviderResult<Vec<InventoryItem>> {
        let mine = format!("{INSTANCE_LABEL}={}", self.instance);
        let filters = HashMap::from([("label", vec![SANDBOX_LABEL.to_string(), mine])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .client()?
            .list_containers(Some(options))
            .await
            .map_err(daemon_error)?;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let sandbox_id = c.labels.as_ref()?.get(SANDBOX_LABEL)?.clone();
                use bollard::models::ContainerSummaryStateEnum as State;
                if c.state == Some(State::REMOVING) {
                    // Being removed (`docker rm -f`): as good as gone.
                    return None;
                }
                let running = c.state == Some(State::RUNNING);
                Some(InventoryItem {
                    sandbox_id,
                    runtime_id: c.id?,
                    created_at: c
                        .created
                        .and_then(|t| chrono::DateTime::from_timestamp(t, 0)),
                    status: if running {
                        RuntimeStatus::Running
                    } else {
                        RuntimeStatus::Stopped {
                            cause: c.status.unwrap_or_else(|| "not running".into()),
                        }
                    },
                })
            })
            .collect())
    }

    /// Records whether the daemon answered a call. On the first answer after
    /// an outage (or the first answer this process gets), starts again the
    /// sandboxes the daemon stopped meanwhile, before anyone can judge them
    /// stopped. Returns whether it restarted anything.
    async fn note_daemon(&self, answered: bool) -> bool {
        // Some(window start): restart what stopped since then; Some(None):
        // nobody watched, restart what a daemon shutdown stopped.
        let window = {
            let Ok(mut availability) = self.availability.lock() else {
                return false;
            };
            if !answered {
                availability.down_since_ok = true;
                return false;
            }
            if availability.down_since_ok || availability.last_ok.is_none() {
                Some(if availability.down_since_ok {
                    availability.last_ok
                } else {
                    None
                })
            } else {
                availability.last_ok = Some(chrono::Utc::now());
                None
            }
        };
        let Some(since) = window else {
            return false;
        };
        let restarted = self.restart_stopped_during_outage(since).await;
        // Only now: if this call is cut short (the worker's health timeout),
        // the next one restarts the rest.
        if let Ok(mut availability) = self.availability.lock() {
            availability.down_since_ok = false;
            availability.last_ok = Some(chrono::Utc::now());
        }
        restarted > 0
    }

    /// Starts again the sandboxes that stopped while the daemon was away
    /// (a daemon shutdown stops every container). Their files survive;
    /// processes that ran at the time do not. With `since`, what stopped
    /// after it; without (nobody watched: StacyVM was down too, or the host
    /// rebooted), what ended by SIGTERM (exit 143), which is how a daemon
    /// shutdown ends our init. Returns how many were started.
    async fn restart_stopped_during_outage(
        &self,
        since: Option<chrono::DateTime<chrono::Utc>>,
    ) -> usize {
        let Ok(inventory) = self.list_sandbox_containers().await else {
            return 0;
        };
        let mut restarted = 0;
        let Ok(docker) = self.client() else {
            return 0;
        };
        for item in inventory {
            if item.status == RuntimeStatus::Running {
                continue;
            }
            let Ok(container) = docker.inspect_container(&item.runtime_id, None).await else {
                continue;
            };
            let state = container.state.unwrap_or_default();
            let finished = state
                .finished_at
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc));
            // Only what stopped during the outage: a sandbox killed before
            // it (docker kill, OOM) stays stopped and is reported as such.
            let stopped_by_outage = match since {
                Some(since) => finished.is_some_and(|f| f >= since),
                None => state.exit_code == Some(143),
            };
            if !stopped_by_outage {
                continue;
            }
            match docker.start_container(&item.runtime_id, None).await {
                Ok(()) => {
                    restarted += 1;
                    tracing::warn!(sandbox = %item.sandbox_id, "restarted a sandbox the Docker daemon stopped while it was away");
                    self.log(
                        &item.runtime_id,
                        "restarted after the Docker daemon came back; processes running before were lost".into(),
                    );
                }
                Err(e) => {
                    tracing::warn!(sandbox = %item.sandbox_id, error = %short(&e), "cannot restart sandbox after the daemon came back");
                }
            }
        }
        restarted
    }

    async fn upload(&self, container: &str, dir: &str, tar: Vec<u8>) -> Result<(), DockerError> {
        let options = UploadToContainerOptionsBuilder::default().path(dir).build();
        let Ok(client) = self.client() else {
            return Err(DockerError::SocketNotFoundError(
                "the Docker daemon is unreachable".into(),
            ));
        };
        client
            .upload_to_container(
                container,
                Some(options),
                bollard::body_full(Bytes::from(tar)),
            )
            .await
    }
}

/// `sh -c script sh args...`: a helper script with its arguments as `$1...`.
fn helper_script(script: &str, args: &[&str]) -> Vec<String> {
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        script.into(),
        "sh".into(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    argv
}

/// The daemon's refusal of the `size` storage option (overlay2 not on XFS
/// with `pquota`, or a driver without quotas).
/// Whether the daemon refused a bind mount's source (it runs in another
/// mount namespace than this server, or on another host).
fn is_mount_refusal(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { message, .. }
        if message.contains("bind source path") || message.contains("invalid mount config"))
}

/// The agent endpoint of a running container's state: its PID 1 as this
/// host sees it, checked to be in the container's cgroup (the pid may have
/// ended and been reused since the daemon answered).
fn endpoint_of(container: &str, state: &bollard::models::ContainerState) -> Option<Endpoint> {
    let pid = state
        .pid
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| *p > 0)?;
    let start = super::native::init::start_time(pid)?;
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let ours = !container.is_empty() && cgroups.contains(container);
    (ours && super::native::init::is_same_process(pid, start)).then_some(Endpoint { pid, start })
}

fn is_size_refusal(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { message, .. }
        if message.contains("storage-opt") || message.contains("storage opt"))
}

/// The shell line an exec runs under a runtime with its own kernel: its
/// pid inside, on stderr, then the command itself.
const PID_WRAPPER: &str = "echo stacyvm-exec-pid:$$ >&2; exec \"$@\"";
const PID_MARKER: &str = "stacyvm-exec-pid:";

/// Kills the process `$1` and every descendant, found through `/proc`
/// inside the sandbox (the tree is read before anything is killed).
const KILL_TREE: &str = "all=$1; todo=$1; \
    while [ -n \"$todo\" ]; do next=''; \
      for s in /proc/[0-9]*/stat; do \
        l=$(cat \"$s\" 2>/dev/null) || continue; set -- ${l##*\") \"}; \
        d=${s#/proc/}; for p in $todo; do [ \"$2\" = \"$p\" ] && next=\"$next ${d%/stat}\"; done; \
      done; all=\"$all $next\"; todo=$next; \
    done; kill -9 $all 2>/dev/null; true";

/// Kills an exec's process tree (Docker has no API for it): its host pid
/// from `inspect_exec`, then the tree through `/proc`; under a runtime
/// with its own kernel (`inside`: the container and the command's pid
/// there), the tree is killed from inside by another exec.
async fn kill_exec(docker: &Docker, exec_id: &str, inside: Option<(String, u32)>) {
    if let Some((container, pid)) = inside {
        let options = CreateExecOptions {
            cmd: Some(
                ["/bin/sh", "-c", KILL_TREE, "sh", &pid.to_string()]
                    .map(str::to_string)
                    .to_vec(),
            ),
            // Attached: the daemon ends the attached stream only when the
            // process ends, so the wait below is for the kill itself.
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        // Attached and waited for: the exec is over only once its tree is.
        let killed = async {
            let created = docker.create_exec(&container, options).await?;
            if let StartExecResults::Attached { mut output, .. } =
                docker.start_exec(&created.id, None).await?
            {
                while output.next().await.is_some() {}
            }
            Ok::<(), bollard::errors::Error>(())
        };
        let killed = tokio::time::timeout(Duration::from_secs(10), killed)
            .await
            .unwrap_or_else(|_| {
                Err(bollard::errors::Error::IOError {
                    err: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the kill did not finish within 10s",
                    ),
                })
            });
        crate::provider::best_effort("killing a command's processes inside its sandbox", killed);
        return;
    }
    match docker.inspect_exec(exec_id).await {
        Ok(info) if info.running == Some(true) => {
            if let Some(pid) = info
                .pid
                .and_then(|p| i32::try_from(p).ok())
                .filter(|p| *p > 0)
            {
                let _joined = tokio::task::spawn_blocking(move || kill_process_tree(pid)).await;
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot inspect an exec to kill it"),
    }
}

/// Kills the exec when dropped while armed: an exec future dropped before
/// its command ended leaves no command running unseen.
struct KillExecOnDrop {
    docker: Option<Docker>,
    exec_id: String,
    /// The container and the command's pid inside it, under a runtime with
    /// its own kernel.
    inside: Option<(String, u32)>,
}

impl KillExecOnDrop {
    fn disarm(&mut self) {
        self.docker = None;
    }
}

impl Drop for KillExecOnDrop {
    fn drop(&mut self) {
        let Some(docker) = self.docker.take() else {
            return;
        };
        let exec_id = std::mem::take(&mut self.exec_id);
        let inside = self.inside.take();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { kill_exec(&docker, &exec_id, inside).await });
        }
    }
}

/// Why a container's init is no longer running, in a user's words.
fn stop_cause(state: &bollard::models::ContainerState) -> String {
    let code = state.exit_code.unwrap_or(-1);
    // Docker's OOMKilled means "the OOM killer struck in this container at
    // some point", which is the cause when the init died of SIGKILL.
    let oom = state.oom_killed == Some(true);
    let mut cause = match code {
        137 if oom => "its init was killed by the kernel OOM killer (the memory limit was reached)"
            .to_string(),
        137 => "its init was killed (SIGKILL, exit code 137)".to_string(),
        143 => "its init was terminated (SIGTERM, exit code 143)".to_string(),
        c if c > 128 && c < 160 => format!("its init died of signal {} (exit code {c})", c - 128),
        -1 => "its init is not running".to_string(),
        c => format!("its init exited with code {c}"),
    };
    if oom && code != 137 {
        cause.push_str(" after the kernel OOM killer struck (the memory limit was reached)");
    }
    if let Some(error) = state.error.as_deref().filter(|e| !e.is_empty()) {
        cause.push_str(&format!(": {error}"));
    }
    cause
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The daemon's message without bollard's wrapping.
fn short(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Maps a daemon error: a 400 is the request's fault (an image name or a
/// setting the daemon refuses), a 409 a state the operation cannot act on
/// (the container stopped, e.g. killed by the OOM killer, or is being
/// removed), connection failures mean the daemon is unreachable. The match
/// is exhaustive so that a variant a new bollard adds is sorted here, not
/// answered as 500 by default.
fn daemon_error(e: DockerError) -> ProviderError {
    match &e {
        DockerError::DockerResponseServerError {
            status_code: 400, ..
        } => ProviderError::InvalidRequest(format!("the Docker daemon refused: {}", short(&e))),
        DockerError::DockerResponseServerError {
            status_code: 409, ..
        } => ProviderError::Conflict(short(&e)),
        DockerError::DockerResponseServerError { .. } => ProviderError::Runtime(short(&e)),
        DockerError::IOError { .. }
        | DockerError::HyperResponseError { .. }
        | DockerError::HyperLegacyError { .. }
        | DockerError::HttpClientError { .. }
        | DockerError::RequestTimeoutError
        | DockerError::SocketNotFoundError(_)
        | DockerError::UnsupportedURISchemeError { .. }
        | DockerError::InvalidURIError { .. }
        | DockerError::InvalidURIPartsError { .. }
        | DockerError::URLParseError { .. } => {
            ProviderError::Unavailable(format!("the Docker daemon is unreachable: {e}"))
        }
        DockerError::JsonDataError { .. }
        | DockerError::APIVersionParseError {}
        | DockerError::DockerStreamError { .. }
        | DockerError::DockerContainerWaitError { .. }
        | DockerError::MissingSessionBuildkitError {}
        | DockerError::MissingVersionBuildkitError {}
        | DockerError::JsonSerdeError { .. }
        | DockerError::StrParseError { .. }
        | DockerError::StrFmtError { .. }
        | DockerError::URLEncodedError { .. }
        | DockerError::HttpHeaderNotFoundError(_)
        | DockerError::HttpHeaderToStrError { .. }
        | DockerError::Base64DecodeError { .. } => ProviderError::Runtime(e.to_string()),
    }
}

/// A 404 from the daemon that is about the container, not a path in it.
fn is_missing_container(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { message, .. } if message.contains("No such container"))
}

/// Maps a 404 from the archive API: a missing container or a missing path.
fn archive_not_found(e: DockerError, container: &str, path: &str) -> ProviderError {
    if is_missing_container(&e) {
        ProviderError::RuntimeNotFound(container.to_string())
    } else {
        ProviderError::FileNotFound(path.to_string())
    }
}

fn runtime_error(container: &str, e: DockerError) -> ProviderError {
    if is_not_found(&e) {
        ProviderError::RuntimeNotFound(container.to_string())
    } else {
        daemon_error(e)
    }
}

/// The parent directory and file name of an absolute sandbox path.
fn split_path(path: &str) -> ProviderResult<(String, String)> {
    let trimmed = path.trim_end_matches('/');
    let (dir, name) = trimmed
        .rsplit_once('/')
        .ok_or_else(|| ProviderError::InvalidRequest(format!("invalid path {path:?}")))?;
    if name.is_empty() || name == "." || name == ".." {
        return Err(ProviderError::InvalidRequest(format!(
            "path {path:?} does not name a file"
        )));
    }
    let dir = if dir.is_empty() { "/" } else { dir };
    Ok((dir.to_string(), name.to_string()))
}

/// Parses one `stat -c '%s|%a|%F|%Y|%n'` line into an entry under `dir`.
fn parse_stat_line(line: &str, dir: Option<&str>) -> Option<FileEntry> {
    let mut parts = line.splitn(5, '|');
    let size = parts.next()?.parse().ok()?;
    let mode = parts.next()?.to_string();
    let kind = parts.next()?;
    let mtime: i64 = parts.next()?.parse().ok()?;
    let name_or_path = parts.next()?;
    let path = match dir {
        Some(d) if d.ends_with('/') => format!("{d}{name_or_path}"),
        Some(d) => format!("{d}/{name_or_path}"),
        None => name_or_path.to_string(),
    };
    let name = path.rsplit('/').next().unwrap_or_default().to_string();
    let mod_time = chrono::DateTime::from_timestamp(mtime, 0)
        .unwrap_or_default()
        .to_rfc3339();
    Some(FileEntry {
        name: if name.is_empty() { "/".into() } else { name },
        path,
        size,
        mode,
        is_dir: kind == "directory",
        mod_time,
    })
}

/// How runc begins its message when an exec cannot start.
const OCI_EXEC_FAILED: &[u8] = b"OCI runtime exec failed";

const STAT_FORMAT: &str = "%s|%a|%F|%Y|%n";

/// SIGKILLs a process and all its descendants, found through /proc. Used
/// on exec timeout: Docker has no API to kill an exec, and killing only the
/// top process would leave children holding the output pipes open.
fn kill_process_tree(root: i32) {
    let all = stacyvm_agent::process_tree(root);
    for pid in all {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            // Best effort: the process may already have exited.
            if let Err(e) = rustix::process::kill_process(pid, rustix::process::Signal::KILL) {
                tracing::debug!(pid = pid.as_raw_nonzero().get(), error = %e, "kill failed");
            }
        }
    }
}

#[async_trait]
impl Provider for DockerProvider {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn isolation(&self) -> &'static str {
        if self.config.runtime == "runsc" {
            return "a container under gVisor (runsc): the sandbox's system calls are served by a kernel in user space, not the host's; capabilities reduced, no-new-privileges, no network by default; memory, CPU and pids limits";
        }
        "a container (Docker's namespaces, default seccomp profile and masked paths), capabilities reduced, no-new-privileges, no network by default; memory, CPU and pids limits; disk capped by the storage driver's size option where it has quotas, else only /tmp (a tmpfs)"
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
        self.negotiate().await;
        let ping = tokio::time::timeout(Duration::from_secs(3), self.client()?.ping()).await;
        let result = match ping {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(ProviderError::Unavailable(format!(
                "the Docker daemon is unreachable: {e}"
            ))),
            Err(_) => Err(ProviderError::Unavailable(
                "the Docker daemon is unreachable: it did not answer within 3s".into(),
            )),
        };
        self.note_daemon(result.is_ok()).await;
        result
    }

    async fn inspect(&self, runtime_id: &str) -> ProviderResult<RuntimeStatus> {
        let container = match self.client()?.inspect_container(runtime_id, None).await {
            Ok(container) => container,
            Err(e) if is_not_found(&e) => return Ok(RuntimeStatus::Missing),
            Err(e) => return Err(daemon_error(e)),
        };
        let state = container.state.unwrap_or_default();
        // `docker rm -f` marks the container as being removed before it
        // kills it: report the removal, not the kill it implies.
        if state.status == Some(bollard::models::ContainerStateStatusEnum::REMOVING) {
            return Ok(RuntimeStatus::Missing);
        }
        if state.running == Some(true) {
            return Ok(RuntimeStatus::Running);
        }
        Ok(RuntimeStatus::Stopped {
            cause: stop_cause(&state),
        })
    }

    async fn inventory(&self) -> ProviderResult<Vec<InventoryItem>> {
        let listed = self.list_sandbox_containers().await;
        let answered = !matches!(listed, Err(ProviderError::Unavailable(_)));
        if self.note_daemon(answered).await {
            // Containers were started again: list what is true now.
            return self.list_sandbox_containers().await;
        }
        listed
    }

    async fn image_available(&self, image: &str) -> ProviderResult<bool> {
        match self.ensure_image(image).await {
            Ok(()) => Ok(true),
            Err(ProviderError::ImageNotFound { reason, .. }) => {
                tracing::info!(%image, %reason, "image not available");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn spawn(&self, spec: &SpawnSpec) -> ProviderResult<RuntimeHandle> {
        // The service asked `image_available` just before: the image is
        // looked up (and pulled) again only if the create says it is gone.
        let mut pulled = false;
        let docker = self.client()?;
        let name = Self::container_name(&spec.sandbox_id);
        let mut disk = match self.config.disk_limit {
            DockerDiskLimit::Tmpfs => DiskCap::Tmpfs,
            DockerDiskLimit::Auto if self.size_refused.load(Ordering::Relaxed) => DiskCap::Tmpfs,
            DockerDiskLimit::Auto | DockerDiskLimit::Size => DiskCap::Size,
        };
        let mut agent = match &self.agent {
            Ok(binary) if !self.agent_refused.load(Ordering::Relaxed) => Some(binary.as_path()),
            _ => None,
        };
        let created = loop {
            let options = CreateContainerOptionsBuilder::default().name(&name).build();
            match docker
                .create_container(Some(options), self.container_body(spec, disk, agent))
                .await
            {
                Ok(created) => break created,
                Err(e) if !pulled && is_not_found(&e) => {
                    self.ensure_image(&spec.image).await?;
                    pulled = true;
                }
                Err(e) if agent.is_some() && is_mount_refusal(&e) => {
                    self.agent_refused.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        daemon = %short(&e),
                        "the Docker daemon cannot mount the agent binary (it sees another \
                         filesystem than this server): docker exec goes through the Engine API"
                    );
                    agent = None;
                }
                Err(e)
                    if disk == DiskCap::Size
                        && self.config.disk_limit == DockerDiskLimit::Auto
                        && is_size_refusal(&e) =>
                {
                    self.size_refused.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        daemon = %short(&e),
                        "the Docker storage driver cannot cap a container's size (overlay2 needs \
                         XFS mounted with pquota): docker sandboxes get a tmpfs {TMPFS_DIR} of \
                         disk_mb instead, and the rest of their writable layer is not capped"
                    );
                    disk = DiskCap::Tmpfs;
                }
                Err(e) if is_size_refusal(&e) => {
                    return Err(ProviderError::Unavailable(format!(
                        "providers.docker.disk_limit is `size`, but the daemon cannot cap a \
                         container's size: {}",
                        short(&e)
                    )));
                }
                Err(
                    e @ DockerError::DockerResponseServerError {
                        status_code: 400, ..
                    },
                ) => {
                    return Err(ProviderError::InvalidRequest(short(&e)));
                }
                Err(e) => return Err(daemon_error(e)),
            }
        };
        if let Err(e) = docker.start_container(&created.id, None).await {
            // Leave nothing behind: a created-but-unstarted container is an orphan.
            if let Err(cleanup) = self.destroy(&created.id).await {
                tracing::warn!(container = %created.id, error = %cleanup, "cleanup after failed start failed");
            }
            // Almost always the image's fault (no /bin/sh, wrong platform).
            return Err(ProviderError::InvalidRequest(format!(
                "the sandbox container failed to start{}: {}",
                if agent.is_some() {
                    ""
                } else {
                    " (StacyVM needs /bin/sh in the image)"
                },
                short(&e)
            )));
        }
        // "Started" is not "running": make sure PID 1 is alive before we
        // report the sandbox as running.
        let state = docker
            .inspect_container(&created.id, None)
            .await
            .ok()
            .and_then(|c| c.state);
        let running = state.as_ref().and_then(|s| s.running).unwrap_or(false);
        if running {
            let endpoint = agent
                .and(state.as_ref())
                .and_then(|s| endpoint_of(&created.id, s));
            if let Some(endpoint) = endpoint {
                super::agent::wait_listening(endpoint.pid, endpoint.start).await;
            }
            if let Ok(mut endpoints) = self.endpoints.lock() {
                endpoints.insert(created.id.clone(), endpoint);
            }
        }
        if !running {
            if let Err(cleanup) = self.destroy(&created.id).await {
                tracing::warn!(container = %created.id, error = %cleanup, "cleanup of a dead container failed");
            }
            return Err(ProviderError::InvalidRequest(
                "the sandbox container exited right after it started (StacyVM needs /bin/sh in the image)".into(),
            ));
        }
        self.log(&created.id, format!("spawned from image {}", spec.image));
        Ok(RuntimeHandle {
            runtime_id: created.id,
        })
    }

    async fn destroy(&self, runtime_id: &str) -> ProviderResult<()> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        if let Ok(mut events) = self.events.lock() {
            events.remove(runtime_id);
        }
        self.forget_endpoint(runtime_id);
        match self
            .client()?
            .remove_container(runtime_id, Some(options))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // "removal already in progress" means someone else is destroying it.
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(daemon_error(e)),
        }
    }

    async fn destroy_by_sandbox_id(&self, sandbox_id: &str) -> ProviderResult<()> {
        self.destroy(&Self::container_name(sandbox_id)).await
    }

    async fn exec(
        &self,
        runtime_id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        let result = self.run_exec(runtime_id, spec, sink).await;
        let outcome = super::describe_exit(&result);
        self.log(runtime_id, format!("exec {:?} -> {outcome}", spec.argv));
        result
    }

    async fn exec_terminal(
        &self,
        runtime_id: &str,
        spec: &ExecSpec,
        terminal: crate::provider::Terminal,
        sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        let Some(endpoint) = self.endpoint(runtime_id).await else {
            return Err(ProviderError::Unavailable(
                "terminals need the in-sandbox agent as the container's PID 1 (docker sandboxes under gVisor have none)".into(),
            ));
        };
        let result = match super::agent::exec(
            endpoint.pid,
            endpoint.start,
            spec,
            Some(terminal),
            sink,
        )
        .await
        {
            Ok(result) => result,
            Err(why) => {
                self.forget_endpoint(runtime_id);
                Err(ProviderError::Unavailable(why.to_string()))
            }
        };
        let outcome = super::describe_exit(&result);
        self.log(runtime_id, format!("terminal {:?} -> {outcome}", spec.argv));
        result
    }

    async fn write_file(
        &self,
        runtime_id: &str,
        path: &str,
        content: Bytes,
        mode: u32,
    ) -> ProviderResult<()> {
        if self.on_tmpfs(runtime_id, path).await? {
            return self.write_by_exec(runtime_id, path, content, mode).await;
        }
        let (dir, name) = split_path(path)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(mode);
        header.set_mtime(chrono::Utc::now().timestamp().max(0) as u64);
        header.set_entry_type(tar::EntryType::Regular);
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_data(&mut header, &name, content.as_ref())
            .map_err(|e| ProviderError::InvalidRequest(format!("invalid file name: {e}")))?;
        let archive = builder
            .into_inner()
            .map_err(|e| ProviderError::Runtime(e.to_string()))?;
        match self.upload(runtime_id, &dir, archive.clone()).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) && is_missing_container(&e) => {
                Err(ProviderError::RuntimeNotFound(runtime_id.to_string()))
            }
            Err(e) if is_not_found(&e) => {
                // The parent directory is missing: create it and try once more.
                self.run_script(runtime_id, "mkdir -p -- \"$1\" || exit 3", &[&dir])
                    .await?;
                self.upload(runtime_id, &dir, archive)
                    .await
                    .map_err(|e| runtime_error(runtime_id, e))
            }
            Err(DockerError::DockerResponseServerError { message, .. }) => {
                Err(ProviderError::InvalidRequest(message))
            }
            Err(e) => Err(daemon_error(e)),
        }
    }

    async fn read_file(&self, runtime_id: &str, path: &str) -> ProviderResult<Bytes> {
        if self.on_tmpfs(runtime_id, path).await? {
            return self.read_by_exec(runtime_id, path).await;
        }
        let mut current = path.to_string();
        // Follow symlinks a few hops; the archive API returns a link as a link.
        for _ in 0..8 {
            let options = DownloadFromContainerOptionsBuilder::default()
                .path(&current)
                .build();
            let mut stream = self
                .client()?
                .download_from_container(runtime_id, Some(options));
            let mut archive = Vec::new();
            while let Some(part) = stream.next().await {
                match part {
                    Ok(bytes) => archive.extend_from_slice(&bytes),
                    Err(e) if is_not_found(&e) => {
                        return Err(archive_not_found(e, runtime_id, path));
                    }
                    Err(e) => return Err(daemon_error(e)),
                }
            }
            let mut reader = tar::Archive::new(archive.as_slice());
            let mut entries = reader
                .entries()
                .map_err(|e| ProviderError::Runtime(e.to_string()))?;
            let Some(entry) = entries.next() else {
                return Err(ProviderError::FileNotFound(path.to_string()));
            };
            let mut entry = entry.map_err(|e| ProviderError::Runtime(e.to_string()))?;
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut data = Vec::new();
                    std::io::Read::read_to_end(&mut entry, &mut data)
                        .map_err(|e| ProviderError::Runtime(e.to_string()))?;
                    return Ok(Bytes::from(data));
                }
                tar::EntryType::Directory => {
                    return Err(ProviderError::InvalidRequest(format!(
                        "{path} is a directory"
                    )));
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .ok()
                        .flatten()
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    current = if target.starts_with('/') {
                        target
                    } else {
                        let (dir, _) = split_path(&current)?;
                        format!("{}/{target}", dir.trim_end_matches('/'))
                    };
                }
                _ => {
                    return Err(ProviderError::InvalidRequest(format!(
                        "{path} is not a regular file"
                    )));
                }
            }
        }
        Err(ProviderError::InvalidRequest(format!(
            "{path}: too many levels of symbolic links"
        )))
    }

    async fn list_files(&self, runtime_id: &str, path: &str) -> ProviderResult<Vec<FileEntry>> {
        let script = format!(
            "[ -e \"$1\" ] || exit 2; [ -d \"$1\" ] || {{ echo \"$1 is not a directory\" >&2; exit 3; }}; \
             cd -- \"$1\" || exit 3; stat -c '{STAT_FORMAT}' -- * .[!.]* ..?* 2>/dev/null; exit 0"
        );
        let out = self.run_script(runtime_id, &script, &[path]).await?;
        let mut entries: Vec<FileEntry> = out
            .lines()
            .filter_map(|line| parse_stat_line(line, Some(path)))
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    async fn stat_file(&self, runtime_id: &str, path: &str) -> ProviderResult<FileEntry> {
        let script =
            format!("[ -e \"$1\" ] || [ -L \"$1\" ] || exit 2; stat -c '{STAT_FORMAT}' -- \"$1\"");
        let out = self.run_script(runtime_id, &script, &[path]).await?;
        out.lines()
            .next()
            .and_then(|line| parse_stat_line(line, None))
            .map(|mut entry| {
                entry.path = path.to_string();
                entry
            })
            .ok_or_else(|| ProviderError::Runtime(format!("cannot parse stat output {out:?}")))
    }

    async fn move_file(&self, runtime_id: &str, from: &str, to: &str) -> ProviderResult<()> {
        self.run_script(
            runtime_id,
            "[ -e \"$1\" ] || [ -L \"$1\" ] || exit 2; mkdir -p -- \"$(dirname -- \"$2\")\" && mv -- \"$1\" \"$2\"",
            &[from, to],
        )
        .await
        .map(drop)
    }

    async fn chmod_file(&self, runtime_id: &str, path: &str, mode: u32) -> ProviderResult<()> {
        let mode = format!("{mode:o}");
        self.run_script(
            runtime_id,
            "[ -e \"$2\" ] || exit 2; chmod \"$1\" \"$2\"",
            &[&mode, path],
        )
        .await
        .map_err(|e| match e {
            // run_script reports $1 as the missing file; here that is the mode.
            ProviderError::FileNotFound(_) => ProviderError::FileNotFound(path.to_string()),
            other => other,
        })
        .map(drop)
    }

    async fn delete_file(
        &self,
        runtime_id: &str,
        path: &str,
        recursive: bool,
    ) -> ProviderResult<()> {
        let script = if recursive {
            "[ -e \"$1\" ] || [ -L \"$1\" ] || exit 2; rm -rf -- \"$1\""
        } else {
            "[ -e \"$1\" ] || [ -L \"$1\" ] || exit 2; \
             if [ -d \"$1\" ] && [ ! -L \"$1\" ]; then rmdir -- \"$1\" 2>/dev/null || { echo \"directory $1 is not empty: delete it with recursive=true\" >&2; exit 3; }; \
             else rm -f -- \"$1\"; fi"
        };
        self.run_script(runtime_id, script, &[path]).await.map(drop)
    }

    async fn glob_files(&self, runtime_id: &str, pattern: &str) -> ProviderResult<Vec<String>> {
        // List candidates under the pattern's literal prefix with `find`,
        // then match in Rust with the same matcher as the host-directory
        // providers, so `**` and dot rules agree everywhere.
        let parts: Vec<&str> = pattern.split('/').filter(|p| !p.is_empty()).collect();
        let literal = parts
            .iter()
            .take_while(|p| !p.contains(['*', '?', '[']))
            .count();
        let base = format!("/{}", parts[..literal].join("/"));
        let remaining = parts.len() - literal;
        if remaining == 0 {
            return match self.stat_file(runtime_id, &base).await {
                Ok(_) => Ok(vec![base]),
                Err(ProviderError::FileNotFound(_)) => Ok(Vec::new()),
                Err(e) => Err(e),
            };
        }
        let depth = if parts[literal..].contains(&"**") {
            String::new()
        } else {
            format!("-maxdepth {remaining}")
        };
        let script = format!(
            "[ -d \"$1\" ] || exit 0; find \"$1\" -mindepth 1 {depth} 2>/dev/null | head -n {}",
            stacyvm_agent::glob::MAX_RESULTS * 10
        );
        let out = self.run_script(runtime_id, &script, &[&base]).await?;
        let mut paths: Vec<String> = out
            .lines()
            .filter(|p| stacyvm_agent::glob::path_matches(pattern, p))
            .map(str::to_string)
            .collect();
        if paths.len() > stacyvm_agent::glob::MAX_RESULTS {
            return Err(ProviderError::InvalidRequest(format!(
                "glob matches more than {} paths; narrow the pattern",
                stacyvm_agent::glob::MAX_RESULTS
            )));
        }
        paths.sort();
        paths.dedup();
        Ok(paths)
    }

    async fn logs(&self, runtime_id: &str, lines: usize) -> ProviderResult<Vec<String>> {
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .timestamps(true)
            .tail(&lines.to_string())
            .build();
        let mut stream = self.client()?.logs(runtime_id, Some(options));
        let mut out: Vec<String> = self
            .events
            .lock()
            .map(|events| {
                events
                    .get(runtime_id)
                    .map(|l| l.iter().cloned().collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        while let Some(item) = stream.next().await {
            let item = item.map_err(|e| runtime_error(runtime_id, e))?;
            out.extend(
                String::from_utf8_lossy(&item.into_bytes())
                    .lines()
                    .map(str::to_string),
            );
        }
        let skip = out.len().saturating_sub(lines);
        Ok(out.split_off(skip))
    }

    async fn stats(&self, runtime_id: &str) -> ProviderResult<RuntimeStats> {
        let options = StatsOptionsBuilder::default().stream(false).build();
        let mut stream = self.client()?.stats(runtime_id, Some(options));
        let Some(stats) = stream.next().await else {
            return Ok(RuntimeStats::default());
        };
        let stats = stats.map_err(|e| runtime_error(runtime_id, e))?;
        let memory = stats.memory_stats.unwrap_or_default();
        let cpu = stats.cpu_stats.unwrap_or_default();
        let pre = stats.precpu_stats.unwrap_or_default();
        let total = |c: &bollard::models::ContainerCpuStats| {
            c.cpu_usage
                .as_ref()
                .and_then(|u| u.total_usage)
                .unwrap_or(0)
        };
        let cpu_delta = total(&cpu).saturating_sub(total(&pre)) as f64;
        let system_delta = cpu
            .system_cpu_usage
            .unwrap_or(0)
            .saturating_sub(pre.system_cpu_usage.unwrap_or(0)) as f64;
        let cpus = f64::from(cpu.online_cpus.unwrap_or(1).max(1));
        let cpu_pct = if system_delta > 0.0 {
            cpu_delta / system_delta * cpus * 100.0
        } else {
            0.0
        };
        Ok(RuntimeStats {
            supported: true,
            cpu_pct,
            mem_bytes: memory.usage.unwrap_or(0),
            mem_limit_bytes: memory.limit.unwrap_or(0),
            pids: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_lines() {
        let e = parse_stat_line("12|644|regular file|1700000000|a|b.txt", Some("/tmp"))
            .unwrap_or_else(|| panic!("stat line should parse"));
        assert_eq!(e.path, "/tmp/a|b.txt");
        assert_eq!(e.name, "a|b.txt");
        assert_eq!(e.size, 12);
        assert_eq!(e.mode, "644");
        assert!(!e.is_dir);
        assert!(parse_stat_line("garbage", None).is_none());
    }

    #[test]
    fn stop_causes_name_oom_signals_and_exit_codes() {
        use bollard::models::ContainerState;
        let state = |code: i64, oom: bool| ContainerState {
            exit_code: Some(code),
            oom_killed: Some(oom),
            ..Default::default()
        };
        assert!(stop_cause(&state(137, true)).contains("OOM killer"));
        assert!(stop_cause(&state(137, false)).contains("SIGKILL"));
        assert!(!stop_cause(&state(137, false)).contains("OOM"));
        assert!(stop_cause(&state(143, false)).contains("SIGTERM"));
        assert!(stop_cause(&state(130, false)).contains("signal 2"));
        assert_eq!(stop_cause(&state(3, false)), "its init exited with code 3");
        assert!(stop_cause(&state(1, true)).contains("after the kernel OOM killer struck"));
    }

    #[test]
    fn resolves_paths_lexically() {
        use crate::provider::resolve_lexically;
        assert_eq!(resolve_lexically("/../../..//tmp/./x"), "/tmp/x");
        assert_eq!(resolve_lexically("/tmp/../etc/x"), "/etc/x");
        assert_eq!(resolve_lexically("/tmp"), "/tmp");
        assert_eq!(resolve_lexically("/tmpx/y"), "/tmpx/y");
        assert_eq!(resolve_lexically("/"), "/");
    }

    #[test]
    fn splits_paths() {
        assert_eq!(
            split_path("/a/b.txt").ok(),
            Some(("/a".to_string(), "b.txt".to_string()))
        );
        assert_eq!(
            split_path("/b.txt").ok(),
            Some(("/".to_string(), "b.txt".to_string()))
        );
        assert!(split_path("/").is_err());
        assert!(split_path("/a/..").is_err());
    }
}
