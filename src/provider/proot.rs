//! The `proot` provider: the same host-tree sandboxes as `native`, but each
//! exec runs under `proot` (ptrace-based chroot emulation) instead of
//! namespaces. It needs no privileges and no kernel features, which makes
//! it the fallback where namespaces are unavailable; in exchange it
//! isolates only the filesystem view (no PID, network or resource
//! isolation), so it is for trusted-enough code.
//!
//! The command runs in its own process group; a timeout, or the command's
//! end, kills the whole group.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::image_store::ImageStore;
use super::native::{HOST_IMAGE, SandboxDirs, drive, image_not_found};
use super::{
    Capability, ExecExit, ExecSpec, FileEntry, InventoryItem, OutputSink, Provider, ProviderError,
    ProviderResult, RuntimeHandle, RuntimeStatus, SpawnSpec,
};

/// How long `proot --version` may take before proot is declared unusable.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

/// Sandboxes run under proot.
pub struct ProotProvider {
    dirs: SandboxDirs,
    proot_bin: PathBuf,
}

impl ProotProvider {
    /// `sandboxes_dir` is `<data-dir>/sandboxes/proot`; `proot_bin` is the
    /// proot executable (a bare name is looked up in PATH).
    pub fn new(images: ImageStore, sandboxes_dir: PathBuf, proot_bin: PathBuf) -> Self {
        Self {
            dirs: SandboxDirs::new(images, sandboxes_dir),
            proot_bin,
        }
    }
}

#[async_trait]
impl Provider for ProotProvider {
    fn name(&self) -> &'static str {
        "proot"
    }

    fn isolation(&self) -> &'static str {
        "filesystem view only: PRoot runs commands as the server's user with the host's kernel interfaces, processes, network and limits; not a security boundary"
    }

    fn capabilities(&self) -> Vec<Capability> {
        vec![
            Capability::Exec,
            Capability::ExecStream,
            Capability::Files,
            Capability::Logs,
        ]
    }

    async fn health(&self) -> ProviderResult<()> {
        let run = tokio::process::Command::new(&self.proot_bin)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status();
        match tokio::time::timeout(HEALTH_TIMEOUT, run).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(ProviderError::Unavailable(format!(
                "{} --version failed: {status}",
                self.proot_bin.display()
            ))),
            Ok(Err(e)) => Err(ProviderError::Unavailable(format!(
                "cannot run {}: {e}",
                self.proot_bin.display()
            ))),
            Err(_) => Err(ProviderError::Unavailable(format!(
                "{} --version did not answer",
                self.proot_bin.display()
            ))),
        }
    }

    async fn image_available(&self, image: &str) -> ProviderResult<bool> {
        Ok(self.dirs.image_available(image, false))
    }

    async fn spawn(&self, spec: &SpawnSpec) -> ProviderResult<RuntimeHandle> {
        // The host image needs read-only bind mounts, which proot cannot
        // enforce; it is a native-only image.
        if spec.image == HOST_IMAGE {
            return Err(image_not_found(HOST_IMAGE));
        }
        self.dirs.create(spec, false, None, false, None).await?;
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

    async fn recover_at_startup(&self) -> ProviderResult<usize> {
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
        let rootfs = self.dirs.rootfs(runtime_id)?;
        let mut cmd = tokio::process::Command::new(&self.proot_bin);
        cmd.arg("-r")
            .arg(&rootfs)
            .arg("-w")
            .arg(spec.workdir.as_deref().unwrap_or("/"))
            .args(["-b", "/proc", "-b", "/dev"])
            // proot has no `--`; keep a program name from reading as an option.
            .arg(if program.starts_with('-') {
                format!("./{program}")
            } else {
                program.clone()
            })
            .args(spec.argv.iter().skip(1))
            // proot hands its own environment to the guest: give it exactly
            // the sandbox's.
            .env_clear()
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group, so a kill reaches every descendant.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            ProviderError::Unavailable(format!("cannot run {}: {e}", self.proot_bin.display()))
        })?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(ProviderError::Runtime("proot has no output pipes".into()));
        };
        let pgid = child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32));
        let kill = move || {
            // The group outlives its leader while members remain, and a pgid
            // is not recycled while the group exists, so this cannot hit an
            // unrelated process group.
            if let Some(pgid) = pgid {
                super::best_effort_quiet(
                    "killing a command's process group",
                    rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL),
                );
            }
        };
        let wait = async move {
            let status = child
                .wait()
                .await
                .map_err(|e| ProviderError::Runtime(format!("waiting for proot: {e}")))?;
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(code), _) => Ok(code),
                (None, Some(signal)) => Ok(128 + signal),
                (None, None) => Err(ProviderError::Runtime(format!(
                    "proot ended oddly: {status}"
                ))),
            }
        };
        let cancel = self.dirs.cancel_token(runtime_id);
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
