//! Wiring: builds the store, providers, worker, scheduler and service from
//! a [`Config`], runs the background loops, and serves HTTP until shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::EventBus;
use crate::provider::Provider;
use crate::provider::docker::DockerProvider;
use crate::provider::image_store::ImageStore;
use crate::provider::native::NativeProvider;
use crate::provider::proot::ProotProvider;
use crate::scheduler::Scheduler;
use crate::service::{Identity, Service, load_pepper};
use crate::store::Store;
use crate::worker::{LocalWorker, Worker};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Provider(String),
    #[error("server error: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Identity(#[from] crate::service::IdentityError),
    #[error(
        "refusing to listen on {0} without authentication: configure auth.api_key, \
         auth.admin_api_key, auth.jwt or create a key with `stacyvm keys create`, \
         or bind to 127.0.0.1"
    )]
    OpenBeyondLoopback(String),
    #[error("start-up recovery failed: {0}")]
    Recovery(#[from] crate::service::Error),
    #[error(
        "another `stacyvm serve` ({holder}) is using the SQLite database {path}: SQLite serves \
         one replica. Run several replicas on PostgreSQL (database.url: postgres://...), or \
         give this server its own --data-dir"
    )]
    SqliteInUse { path: String, holder: String },
    #[error(
        "another `stacyvm serve` ({holder}) is using the data directory {path}: each replica \
         needs its own --data-dir"
    )]
    DataDirInUse { path: String, holder: String },
    #[error(
        "a server or another certification ({holder}) is using the data directory {path}: \
         certify with the server stopped (its sandboxes and certify's would share id ranges \
         and its reconciler would remove certify's sandbox), or with a --data-dir of its own"
    )]
    CertifyInUse { path: String, holder: String },
    #[error("cluster.advertise_url: {0}")]
    Advertise(String),
}

/// Holds a `serve` lock on a SQLite database file (`<db>.serve.lock`,
/// `flock`, released by the kernel when the process dies), so a second
/// `serve` on the same database refuses to start. Other commands (`keys`,
/// `migrate`) do not take it. `None` for other databases.
fn lock_sqlite(url: &str) -> Result<Option<std::fs::File>, StartError> {
    let Some(path) = crate::store::sqlite_file(url) else {
        return Ok(None);
    };
    lock_file(&format!("{path}.serve.lock"))
        .map_err(|holder| StartError::SqliteInUse {
            path: path.to_string(),
            holder,
        })
        .map(Some)
}

/// Holds `data_dir/serve.lock`: two `serve` processes on one data dir would
/// be one replica id twice (both leading, each failing the other's work).
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    let path = data_dir.join("serve.lock");
    lock_file(&path.display().to_string()).map_err(|holder| StartError::DataDirInUse {
        path: data_dir.display().to_string(),
        holder,
    })
}

/// An exclusive `flock` on `lock_path`, with this pid written in it; the
/// holder's description when another process has it.
fn lock_file(lock_path: &str) -> Result<std::fs::File, String> {
    use std::io::{Read, Seek, Write};
    let fail = |e: std::io::Error| format!("unknown (cannot use {lock_path}: {e})");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock_path)
        .map_err(fail)?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut holder = String::new();
        if let Err(e) = file.read_to_string(&mut holder) {
            tracing::debug!(error = %e, "cannot read the SQLite lock holder");
        }
        return Err(match holder.trim() {
            "" => "another process".to_string(),
            pid => format!("pid {pid}"),
        });
    }
    file.set_len(0).map_err(fail)?;
    file.rewind().map_err(fail)?;
    write!(file, "{}", std::process::id()).map_err(fail)?;
    Ok(file)
}

/// The image store under the data directory.
pub fn image_store(config: &Config) -> ImageStore {
    ImageStore::new(config.data_dir.join("images"))
}

/// Connects to the store and applies migrations.
pub async fn open_store(config: &Config) -> Result<Store, StartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = Store::connect(&config.database_url()).await?;
    store.migrate().await?;
    Ok(store)
}

/// The identity component: stored keys, static keys and JWT settings.
pub async fn identity(config: &Config, store: &Store) -> Result<Identity, StartError> {
    let pepper = load_pepper(&config.auth, &config.data_dir, store).await?;
    Ok(Identity::new(store.clone(), config.auth.clone(), pepper)?
        .with_allowed_hosts(config.server.allowed_hosts.clone()))
}

/// Whether `host` only accepts connections from this machine.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// This installation's identity, created on first start and kept in
/// `data_dir/instance_id`: runtimes are labelled with it so that servers
/// sharing a Docker daemon only ever reconcile their own.
pub fn instance_id(data_dir: &std::path::Path) -> Result<String, StartError> {
    let path = data_dir.join("instance_id");
    let fail = |source| StartError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        // A new id would orphan every container of the old one: only a
        // missing (or empty) file gets one, any other error stops start-up.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(fail(e)),
        _ => {
            std::fs::create_dir_all(data_dir).map_err(fail)?;
            let id = format!("in-{}", uuid::Uuid::new_v4().as_simple());
            // Write then rename, so a crash never leaves an empty id behind.
            let tmp = data_dir.join(format!(".instance_id-{}", std::process::id()));
            std::fs::write(&tmp, &id).map_err(fail)?;
            std::fs::rename(&tmp, &path).map_err(fail)?;
            Ok(id)
        }
    }
}

/// `stacyvm certify`: this host's providers (or `only`), each taken
/// through a sandbox's life (`provider::certify`); the results are kept in
/// the data dir, where the workers of this data dir report them.
pub async fn certify(
    config: &Config,
    only: Option<&str>,
    image: Option<&str>,
) -> Result<Vec<crate::provider::certify::Certification>, StartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    // Held while certifying: no server starts on this data dir meanwhile,
    // and two certifications never race on its file.
    let _lock =
        lock_file(&config.data_dir.join("serve.lock").display().to_string()).map_err(|holder| {
            StartError::CertifyInUse {
                path: config.data_dir.display().to_string(),
                holder,
            }
        })?;
    if only == Some("memory") {
        return Err(StartError::Provider(
            "the memory provider runs nothing: there is nothing to certify".into(),
        ));
    }
    let instance = instance_id(&config.data_dir)?;
    let only: Vec<String> = only.into_iter().map(str::to_string).collect();
    let providers = build_providers(config, &instance, &only).await?;
    let images: Vec<String> = match image {
        Some(image) => vec![image.to_string()],
        None => std::iter::once(config.defaults.image.clone())
            .chain(
                image_store(config)
                    .list()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|i| i.name),
            )
            .collect(),
    };
    let mut results = Vec::new();
    // `memory` runs nothing: there is nothing to certify.
    for provider in providers.iter().filter(|p| p.name() != "memory") {
        results.push(crate::provider::certify::certify(provider, &images).await);
    }
    crate::provider::certify::store(&config.data_dir, &results).map_err(|source| {
        StartError::DataDir {
            path: config.data_dir.join(crate::provider::certify::FILE),
            source,
        }
    })?;
    Ok(results)
}

/// Every provider this host can offer, or those named in `only`.
async fn build_providers(
    config: &Config,
    instance: &str,
    only: &[String],
) -> Result<Vec<Arc<dyn Provider>>, StartError> {
    let images = image_store(config);
    let sandboxes = config.data_dir.join("sandboxes");
    let docker = DockerProvider::connect(&config.providers.docker, instance)
        .await
        .map_err(|e| StartError::Provider(e.to_string()))?;
    let mut native = NativeProvider::new(images.clone(), sandboxes.join("native"))
        .with_ids(&config.providers.native.ids)
        .with_pids_limit(config.providers.native.pids_limit)
        .with_agent(
            config.providers.native.direct_exec,
            &config.providers.native.agent_binary,
        );
    if !config.providers.native.helper_binary.as_os_str().is_empty() {
        native = native.with_helper_binary(config.providers.native.helper_binary.clone());
    }
    let mut all: Vec<Arc<dyn Provider>> = vec![
        Arc::new(docker),
        Arc::new(native),
        Arc::new(ProotProvider::new(
            images.clone(),
            sandboxes.join("proot"),
            config.providers.proot.binary.clone(),
        )),
        Arc::new(crate::provider::microvm::qemu::QemuProvider::new(
            images.clone(),
            sandboxes.join("qemu"),
            config.data_dir.join("vm"),
            config.providers.qemu.clone(),
        )),
        Arc::new(
            crate::provider::microvm::firecracker::FirecrackerProvider::new(
                images,
                sandboxes.join("firecracker"),
                config.data_dir.join("vm"),
                config.providers.firecracker.clone(),
            ),
        ),
    ];
    if config.providers.memory.enabled {
        all.push(Arc::new(crate::provider::memory::MemoryProvider::new(
            config.providers.memory.max_sandboxes,
        )));
    }
    for (name, custom) in &config.providers.custom {
        let provider =
            crate::provider::custom::CustomProvider::new(name, &custom.url, &custom.api_key)
                .map_err(|e| StartError::Provider(format!("providers.custom.{name}: {e}")))?;
        all.push(Arc::new(provider));
    }
    if let Some(unknown) = only
        .iter()
        .find(|name| !all.iter().any(|p| p.name() == name.as_str()))
    {
        return Err(StartError::Provider(format!(
            "unknown provider {unknown:?}: this build has docker, native, proot and qemu, and the custom providers configured"
        )));
    }
    Ok(all
        .into_iter()
        .filter(|p| only.is_empty() || only.iter().any(|n| n == p.name()))
        .collect())
}

fn log_health(health: &std::collections::BTreeMap<String, crate::worker::ProviderHealth>) {
    for (name, h) in health {
        match &h.error {
            None => tracing::info!(provider = %name, "provider available"),
            Some(e) => tracing::warn!(provider = %name, error = %e, "provider not available"),
        }
    }
}

/// The lease fence of this installation's worker, in `data_dir/leases`.
fn open_fence(config: &Config) -> Result<crate::worker::fence::Fence, StartError> {
    let dir = config.data_dir.join("leases");
    crate::worker::fence::Fence::open(dir.clone())
        .map_err(|source| StartError::DataDir { path: dir, source })
}

/// `stacyvm custom-provider`: one of this host's providers behind the
/// custom provider contract on `listen` (the reference implementation of
/// the contract; see `provider::custom`), until `signal`.
pub async fn serve_custom_provider(
    config: Config,
    listen: &str,
    provider: &str,
    api_key: &str,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let host = listen
        .rsplit_once(':')
        .map_or(listen, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    if api_key.is_empty() && !is_loopback(host) {
        return Err(StartError::Provider(format!(
            "refusing to serve commands on {listen} without --api-key: anyone who reaches it could run them"
        )));
    }
    // This data dir's installation, as a worker's: a restart keeps it, so
    // the provider finds the runtimes it made before (docker's labels).
    let instance = instance_id(&config.data_dir)?;
    let provider = build_providers(&config, &instance, &[provider.to_string()])
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| StartError::Provider("no such provider".into()))?;
    // What the previous process left (after a host reboot: native sandboxes
    // to bring back) is fixed before anything is served.
    match provider.recover_at_startup().await {
        Ok(0) => {}
        Ok(fixed) => tracing::info!(
            fixed,
            "recovered provider state left by the previous process"
        ),
        Err(e) => tracing::warn!(error = %e, "provider start-up recovery failed"),
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| StartError::Provider(format!("listen on {listen}: {e}")))?;
    tracing::info!(provider = provider.name(), %listen, "serving the custom provider contract");
    axum::serve(
        listener,
        crate::provider::custom::server::router(provider, api_key),
    )
    .with_graceful_shutdown(signal)
    .await
    .map_err(|e| StartError::Provider(e.to_string()))
}

/// `stacyvm worker`: this host's providers behind the worker RPC on
/// `worker.listen`, heartbeating to `worker.control_plane`, until `signal`.
/// Sandboxes stay when it stops; the next start adopts them.
pub async fn run_worker(
    config: Config,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let w = &config.worker;
    if w.id.is_empty() || w.token.is_empty() {
        return Err(StartError::Provider(
            "a worker needs --id and --token (worker.id, worker.token)".into(),
        ));
    }
    if !w.control_plane.starts_with("http://") {
        return Err(StartError::Provider(format!(
            "--control-plane {:?} must be an http:// URL (TLS between workers and the control plane is not supported yet)",
            w.control_plane
        )));
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let instance = instance_id(&config.data_dir)?;
    let providers = build_providers(&config, &instance, &w.providers).await?;
    let worker = Arc::new(
        LocalWorker::new(&instance, providers)
            .with_certifications(&config.data_dir)
            .with_id(&w.id)
            .with_labels(w.labels.clone())
            .with_max_sandboxes(w.max_sandboxes)
            .with_fence(open_fence(&config)?),
    );
    if let Err(e) = worker.recover_at_startup().await {
        tracing::warn!(error = %e, "worker start-up recovery failed");
    }
    log_health(&worker.check_health().await);
    let listener = TcpListener::bind(&w.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: w.listen.clone(),
            source,
        })?;
    let local = listener.local_addr().map_err(StartError::Serve)?;
    let endpoint = if w.advertise.is_empty() {
        format!("http://{local}")
    } else {
        w.advertise.clone()
    };
    // A worker listening on every address must say where it is reached.
    let endpoint = crate::worker::rpc::checked_endpoint(&endpoint)
        .map_err(|why| StartError::Provider(format!("{why}: give --advertise http://HOST:PORT")))?;
    tracing::info!(worker = %w.id, rpc = %local, %endpoint, control_plane = %w.control_plane, "StacyVM worker listening");
    let credentials =
        crate::worker::token::WorkerCredentials::new(&w.id, &w.token, config.auth.worker_auth);
    let shutdown = CancellationToken::new();
    let beats = tokio::spawn(crate::worker::agent::heartbeat_loop(
        worker.clone(),
        crate::worker::agent::HeartbeatTarget {
            control_plane: w.control_plane.clone(),
            credentials: credentials.clone(),
            endpoint,
        },
        config.lifecycle.heartbeat_interval.0,
        config.lifecycle.health_interval.0,
        shutdown.child_token(),
    ));
    let router = crate::worker::agent::router(worker, credentials, config.server.max_body_bytes);
    let limits = crate::api::server::ServerLimits::from_config(&config.server);
    let served = crate::api::server::serve(listener, router, limits, signal)
        .await
        .map_err(StartError::Serve);
    shutdown.cancel();
    if let Err(e) = beats.await {
        tracing::warn!(error = %e, "heartbeat task failed");
    }
    served
}

/// A running StacyVM: the service plus the handles of its background loops.
pub struct App {
    pub service: Service,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Background loops that must outlive the others (replica upkeep hands
    /// over leadership as it stops).
    last_tasks: Vec<tokio::task::JoinHandle<()>>,
    last_shutdown: CancellationToken,
    /// The SQLite and data-dir `serve` locks, held while the app lives.
    _sqlite_lock: Option<std::fs::File>,
    _data_dir_lock: std::fs::File,
}

impl App {
    /// Builds everything and starts the background loops.
    pub async fn start(config: Config) -> Result<App, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let data_dir_lock = lock_data_dir(&config.data_dir)?;
        let sqlite_lock = lock_sqlite(&config.database_url())?;
        let instance = instance_id(&config.data_dir)?;
        let replica_id = crate::service::cluster::Replica::id_for(&instance);
        let store = open_store(&config).await?.with_replica(&replica_id);
        tracing::info!(store = store.backend_name(), url = %redact(&config.database_url()), replica = %replica_id, "store ready");

        let identity = identity(&config, &store).await?;
        if identity
            .auth_required()
            .await
            .map_err(StartError::Recovery)?
        {
            tracing::info!("authentication required");
            if identity
                .keys_all_unusable()
                .await
                .map_err(StartError::Recovery)?
                && config.auth.api_key.is_empty()
                && config.auth.admin_api_key.is_empty()
            {
                tracing::warn!(
                    "every API key is revoked or expired: nobody can call this server until a key                      is made (`stacyvm keys create --admin --owner NAME`)"
                );
            }
        } else if config.auth.allow_open
            && identity
                .keys_all_unusable()
                .await
                .map_err(StartError::Recovery)?
        {
            if !is_loopback(&config.server.host) {
                return Err(StartError::OpenBeyondLoopback(config.server.host.clone()));
            }
            tracing::warn!(
                "auth.allow_open: every API key is revoked or expired, so this server runs OPEN                  on loopback: anonymous callers are admins"
            );
        } else if is_loopback(&config.server.host) {
            tracing::warn!(
                "no credentials configured: running open on loopback (anyone on this machine can use it)"
            );
        } else {
            return Err(StartError::OpenBeyondLoopback(config.server.host.clone()));
        }

        let default_setting = config.providers.default.clone();
        let stale_after = config.lifecycle.worker_stale_after.0;
        if config.worker.local && store.is_shared() {
            tracing::warn!(
                "this server keeps a worker in its own process: with several replicas on this \
                 database its sandboxes are reachable only through this replica (run replicas \
                 with --no-local-worker and `stacyvm worker` processes)"
            );
        }
        let (scheduler, local, default) = if config.worker.local {
            let providers = build_providers(&config, &instance, &[]).await?;
            let worker = Arc::new(
                LocalWorker::new(&instance, providers)
                    .with_certifications(&config.data_dir)
                    .with_fence(open_fence(&config)?),
            );
            let health = worker.check_health().await;
            crate::worker::record_health(&store, &health).await;
            log_health(&health);
            worker.register(&store).await?;
            // Versions before 0.2 named the local worker after the host name.
            let moved = store
                .reassign_worker(&LocalWorker::legacy_id(), worker.id())
                .await?;
            if moved > 0 {
                tracing::info!(
                    sandboxes = moved,
                    worker = worker.id(),
                    "sandbox records moved from the host-named local worker id"
                );
            }
            let default = match default_setting.as_str() {
                "auto" if health.get("docker").is_some_and(|h| h.healthy) => "docker".to_string(),
                "auto" => "native".to_string(),
                other => other.to_string(),
            };
            let scheduler = Scheduler::new(default.clone(), stale_after);
            scheduler.add_worker(worker.clone());
            (scheduler, Some(worker), default)
        } else {
            // Only remote workers: `auto` cannot ask a daemon here.
            let default = match default_setting.as_str() {
                "auto" => "native".to_string(),
                other => other.to_string(),
            };
            tracing::info!(
                workers = config.auth.worker_tokens.len(),
                "no local worker: sandboxes run on `stacyvm worker` processes"
            );
            (Scheduler::new(default.clone(), stale_after), None, default)
        };
        tracing::info!(provider = %default, "default provider");
        let advertise = if config.cluster.advertise_url.is_empty() {
            String::new()
        } else {
            crate::worker::rpc::checked_endpoint(&config.cluster.advertise_url)
                .map_err(StartError::Advertise)?
        };
        let secret = if config.cluster.secret.is_empty() {
            identity.derived_secret("stacyvm replica rpc")
        } else {
            config.cluster.secret.clone()
        };
        let replica = crate::service::cluster::Replica::new(&replica_id, &advertise, &secret);
        let (events, outbox) = if store.is_shared() {
            let (bus, outbox) = EventBus::clustered(1024, crate::service::cluster::OUTBOX);
            (bus, Some(outbox))
        } else {
            (EventBus::new(1024), None)
        };
        let service = Service::new(
            store.clone(),
            scheduler,
            config.clone(),
            events,
            identity,
            replica,
        );
        service.register_replica().await?;
        // Leadership, and the remote workers in the store (known from before
        // a restart, or heard by other replicas), before anything acts on
        // them.
        service.cluster_tick().await?;
        service.recover_after_restart().await?;
        // Before serving: adopt what survived, destroy what has no record,
        // finish what the previous process left half-done.
        service.reconcile(true).await?;

        let shutdown = CancellationToken::new();
        let mut tasks = vec![
            tokio::spawn(
                service
                    .clone()
                    .run_reaper(config.lifecycle.reaper_interval.0, shutdown.child_token()),
            ),
            tokio::spawn(service.clone().run_reconciler(
                config.lifecycle.reconcile_interval.0,
                shutdown.child_token(),
            )),
            tokio::spawn(service.clone().run_pools(shutdown.child_token())),
        ];
        let last_shutdown = CancellationToken::new();
        // Often enough that workers heard by other replicas look fresh here
        // and a dead leader is replaced well within its lease.
        let cluster_every = config
            .lifecycle
            .heartbeat_interval
            .0
            .min(std::time::Duration::from_secs(2));
        let mut last_tasks = vec![tokio::spawn(
            service
                .clone()
                .run_cluster(cluster_every, last_shutdown.child_token()),
        )];
        if let Some(outbox) = outbox {
            last_tasks.push(tokio::spawn(
                service
                    .clone()
                    .run_event_outbox(outbox, last_shutdown.child_token()),
            ));
            last_tasks.push(tokio::spawn(
                service.clone().run_event_inbox(last_shutdown.child_token()),
            ));
        }
        if let Some(worker) = local {
            tasks.push(tokio::spawn(worker.run(
                store,
                config.lifecycle.heartbeat_interval.0,
                config.lifecycle.health_interval.0,
                shutdown.child_token(),
            )));
        }
        Ok(App {
            service,
            shutdown,
            tasks,
            last_tasks,
            last_shutdown,
            _sqlite_lock: sqlite_lock,
            _data_dir_lock: data_dir_lock,
        })
    }

    /// Serves HTTP on `listener` until `signal` completes, then shuts down
    /// gracefully: new work is refused, running commands get
    /// `lifecycle.shutdown_timeout` to finish (the rest are interrupted),
    /// streams end with a final event, the background loops stop, and
    /// sandboxes stay for the next start to adopt unless
    /// `lifecycle.destroy_on_shutdown` is set.
    pub async fn serve(
        self,
        listener: TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let router = crate::api::router(self.service.clone());
        let service = self.service.clone();
        let lifecycle = service.config().lifecycle.clone();
        // The listener closes as soon as the signal comes; connections in
        // flight (streams of running commands) are served until they end.
        let stop_accepting = {
            let service = service.clone();
            async move {
                signal.await;
                tracing::info!("shutting down: refusing new work");
                service.begin_shutdown();
            }
        };
        let limits = crate::api::server::ServerLimits::from_config(&service.config().server);
        let server = tokio::spawn(crate::api::server::serve(
            listener,
            router,
            limits,
            stop_accepting,
        ));
        tokio::pin!(server);
        let finished = tokio::select! {
            joined = &mut server => Some(joined),
            () = service.draining() => None,
        };
        let result = if !service.is_draining() {
            // The server failed before any signal.
            match finished {
                Some(joined) => flatten(joined),
                None => Ok(()),
            }
        } else {
            // Upgraded connections (WebSockets) are not HTTP connections to
            // axum: it may be done at once, yet streams still need their
            // final events. Drain either way.
            let report = service.drain(lifecycle.shutdown_timeout.0).await;
            tracing::info!(
                finished = report.finished,
                interrupted = report.interrupted,
                "running commands drained"
            );
            match finished {
                Some(joined) => flatten(joined),
                // Connections that still linger (a client that never
                // reads) do not hold the process hostage.
                None => match tokio::time::timeout(std::time::Duration::from_secs(5), &mut server)
                    .await
                {
                    Ok(joined) => flatten(joined),
                    Err(_) => {
                        tracing::warn!("closing lingering connections");
                        server.abort();
                        Ok(())
                    }
                },
            }
        };
        self.shutdown.cancel();
        // The last replica standing drains every pool (nobody would claim
        // or refill them); otherwise the next leader keeps them.
        let last = service.is_leader()
            && !service.other_replicas_alive().await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot tell whether other replicas are alive");
                false
            });
        // Background work stopped here: hand leadership over at once.
        service.step_down();
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "background task ended abnormally");
            }
        }
        match service.drain_pools(last).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(destroyed = n, "warm pools drained"),
            Err(e) => tracing::warn!(error = %e, "draining the warm pools failed"),
        }
        self.last_shutdown.cancel();
        for task in self.last_tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "cluster task ended abnormally");
            }
        }
        if lifecycle.destroy_on_shutdown {
            match service.destroy_all_for_shutdown().await {
                Ok(n) => tracing::info!(destroyed = n, "sandboxes destroyed at shutdown"),
                Err(e) => tracing::warn!(error = %e, "destroying sandboxes at shutdown failed"),
            }
        } else {
            tracing::info!("sandboxes left running for the next start to adopt");
        }
        result
    }
}

fn flatten(joined: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<(), StartError> {
    match joined {
        Ok(result) => result.map_err(StartError::Serve),
        Err(e) => Err(StartError::Serve(std::io::Error::other(e))),
    }
}

/// Hides the password in a database URL for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Binds the configured address.
pub async fn bind(config: &Config) -> Result<TcpListener, StartError> {
    let addr = format!("{}:{}", config.server.host, config.server.port);
    TcpListener::bind(&addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(super::redact("sqlite://x.db"), "sqlite://x.db");
    }
}
