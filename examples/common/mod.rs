//! What the benchmarks share: a StacyVM server in the benchmark's own
//! process, on a free loopback port, with a throwaway data directory.

use stacyvm::config::Config;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A running server; `stop` shuts it down and waits for it.
#[allow(dead_code)]
pub struct BenchServer {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// The server's service, for benchmarks that time internal passes.
    #[allow(dead_code)]
    pub service: stacyvm::service::Service,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), stacyvm::app::StartError>>,
    _data: tempfile::TempDir,
}

#[allow(dead_code)]
impl BenchServer {
    /// Starts a docker-default server; `tweak` adjusts the configuration.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Result<BenchServer, BoxError> {
        let data = tempfile::tempdir()?;
        let mut config = Config {
            data_dir: data.path().to_path_buf(),
            ..Default::default()
        };
        config.server.port = 0;
        config.providers.default = "docker".into();
        tweak(&mut config);
        let listener = stacyvm::app::bind(&config).await?;
        let base = format!("http://{}", listener.local_addr()?);
        let app = stacyvm::app::App::start(config).await?;
        let service = app.service.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(listener, async move {
            let _stop_or_dropped = stopped.await;
        }));
        Ok(BenchServer {
            base,
            service,
            stop,
            task,
            _data: data,
        })
    }

    pub async fn stop(self) -> Result<(), BoxError> {
        // The server may have stopped on its own; its result says why.
        let _already_stopped = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

/// The `q` quantile of `v` (sorted in place); zero when empty.
#[allow(dead_code)]
pub fn quantile(v: &mut [std::time::Duration], q: f64) -> std::time::Duration {
    v.sort();
    v.get(((v.len().max(1) - 1) as f64 * q).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// A child process (a `stacyvm worker` or `serve`) with its data dir,
/// killed when dropped.
#[allow(dead_code)]
pub struct Process {
    pub child: std::process::Child,
    pub data: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("kill: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("wait: {e}");
        }
    }
}

/// Starts `stacyvm worker` `w<n>` (token `token-<n>`, native provider)
/// heartbeating to `control_plane`, with `rootfs` imported as `image`.
#[allow(dead_code)]
pub fn start_worker(
    bin: &std::path::Path,
    image: &str,
    rootfs: &std::path::Path,
    control_plane: &str,
    n: usize,
) -> Result<Process, BoxError> {
    use std::process::{Command, Stdio};
    let data = tempfile::tempdir()?;
    let imported = Command::new(bin)
        .arg("--data-dir")
        .arg(data.path())
        .args(["image", "import", image])
        .arg(rootfs)
        .output()?;
    if !imported.status.success() {
        return Err(format!("image import: {imported:?}").into());
    }
    let child = Command::new(bin)
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "worker",
            "--control-plane",
            control_plane,
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--id", &format!("w{n}"), "--token", &format!("token-{n}")])
        .args(["--provider", "native"])
        .env("STACYVM_LIFECYCLE_HEARTBEAT_INTERVAL", "200ms")
        .env("STACYVM_PROVIDERS_NATIVE_HELPER_BINARY", bin)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?;
    Ok(Process { child, data })
}
