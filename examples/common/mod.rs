//! What the benchmarks share: a StacyVM server in the benchmark's own
//! process, on a free loopback port, with a throwaway data directory.

use stacyvm::config::Config;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A running server; `stop` shuts it down and waits for it.
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
