//! Shared test helpers: environment gates, databases, and an in-process
//! server on a free port.

use std::path::PathBuf;
use std::time::Duration;

use stacyvm::app::App;
use stacyvm::config::Config;
use stacyvm::store::Store;

/// Reads a test setting. When it is missing the test is skipped with a
/// message, unless `STACYVM_TEST_STRICT=1` (CI sets it), where a missing
/// setting fails the test: CI never silently skips.
pub fn require_env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("STACYVM_TEST_STRICT").as_deref() == Ok("1") {
                panic!("{name} must be set (STACYVM_TEST_STRICT=1)");
            }
            eprintln!("SKIPPED: set {name} to run this test (scripts/test.sh does)");
            None
        }
    }
}

/// The image the docker tests spawn (built locally by scripts/test-env.sh).
pub fn docker_image() -> String {
    std::env::var("STACYVM_TEST_IMAGE").unwrap_or_else(|_| "stacyvm-test:busybox".into())
}

/// True when docker tests should run.
pub fn docker_enabled() -> bool {
    require_env("STACYVM_TEST_DOCKER").is_some()
}

/// The rootfs tarball native tests import.
pub fn rootfs_tarball() -> PathBuf {
    PathBuf::from(std::env::var("STACYVM_TEST_ROOTFS").unwrap_or_else(|_| "/tmp/rootfs.tar".into()))
}

/// A fresh SQLite store in a temp dir.
pub async fn sqlite_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    let store = Store::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    (dir, store)
}

/// A fresh PostgreSQL database (created for this test) and its URL.
pub async fn postgres_url() -> Option<String> {
    use sea_orm::{ConnectionTrait, Database};
    let admin = require_env("STACYVM_TEST_POSTGRES_URL")?;
    let name = format!("t_{}", uuid_hex());
    let conn = Database::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("connect {admin}: {e}"));
    conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("create database: {e}"));
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    Some(format!("{base}/{name}"))
}

/// A fresh PostgreSQL store.
pub async fn postgres_store() -> Option<Store> {
    let url = postgres_url().await?;
    let store = Store::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    Some(store)
}

pub fn uuid_hex() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}{:x}", nanos, std::process::id())
}

/// A StacyVM server running in this process on a free loopback port.
pub struct TestServer {
    pub base: String,
    pub http: reqwest::Client,
    pub app_service: stacyvm::service::Service,
    pub data_dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server; `tweak` adjusts the config (data dir and port are set).
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let data_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        Self::start_in(data_dir, tweak).await
    }

    /// Starts a server on an existing data dir (to test restarts).
    pub async fn start_in(
        data_dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
    ) -> TestServer {
        let mut config = Config {
            data_dir: data_dir.path().to_path_buf(),
            ..Default::default()
        };
        config.server.port = 0;
        // The test binary is not `stacyvm`: native sandboxes need the real
        // binary for their init and exec helpers.
        config.providers.native.helper_binary = PathBuf::from(env!("CARGO_BIN_EXE_stacyvm"));
        config.lifecycle.reaper_interval =
            stacyvm::duration::GoDuration(Duration::from_millis(500));
        tweak(&mut config);
        let listener = stacyvm::app::bind(&config)
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let app = App::start(config)
            .await
            .unwrap_or_else(|e| panic!("start: {e}"));
        let app_service = app.service.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let signal = async move {
                let _stop_or_dropped = stopped.await;
            };
            if let Err(e) = app.serve(listener, signal).await {
                eprintln!("server ended with {e}");
            }
        });
        TestServer {
            base: format!("http://{addr}/api/v1"),
            http: reqwest::Client::new(),
            app_service,
            data_dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the server and returns its data dir for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _already_stopped = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::mem::replace(&mut self.data_dir, dir)
    }

    /// POSTs JSON and returns status and parsed body.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let resp = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        decode(resp).await
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = self
            .http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        decode(resp).await
    }

    /// Runs a GraphQL query or mutation over HTTP: status and the whole
    /// response.
    pub async fn post_graphql(
        &self,
        query: &str,
        variables: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let resp = self
            .http
            .post(self.base.replace("/api/v1", "/graphql"))
            .json(&serde_json::json!({"query": query, "variables": variables}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /graphql: {e}"));
        decode(resp).await
    }

    pub async fn delete(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = self
            .http
            .delete(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("DELETE {path}: {e}"));
        decode(resp).await
    }

    /// Runs `command` through `sh -c` in sandbox `id`; it must succeed
    /// over HTTP. Returns its stdout.
    pub async fn shell(&self, id: &str, command: &str) -> String {
        let (status, body) = self
            .post(
                &format!("/sandboxes/{id}/exec"),
                serde_json::json!({"command": command, "mode": "shell"}),
            )
            .await;
        assert_eq!(status, 200, "{command}: {body}");
        body["stdout"].as_str().unwrap_or_default().to_string()
    }

    /// Polls a sandbox until `pred` holds on its record (any state,
    /// including destroyed), or panics after `limit`.
    pub async fn wait_for_state(
        &self,
        id: &str,
        want: &str,
        limit: Duration,
    ) -> entity::sandbox::Model {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let record = self
                .app_service
                .store()
                .get_sandbox(id)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("no record for {id}"));
            if record.state == want {
                return record;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{id} stayed {} (wanted {want})", record.state);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn decode(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, value)
}

/// A server whose default provider is native, with the test image imported.
pub async fn native_server(tweak: impl FnOnce(&mut Config)) -> TestServer {
    let server = TestServer::start(|c| {
        c.providers.default = "native".into();
        tweak(c);
    })
    .await;
    stacyvm::app::image_store(server.app_service.config())
        .import(&docker_image(), &rootfs_tarball())
        .unwrap_or_else(|e| panic!("import: {e}"));
    server
}

/// Names of containers labelled with a sandbox id, via the docker CLI
/// (independent of the provider under test).
pub fn docker_containers_for(sandbox_id: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=io.stacyvm.sandbox={sandbox_id}"),
            "--format",
            "{{.Names}}",
        ])
        .output()
        .unwrap_or_else(|e| panic!("docker ps: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Starts a container the way a sandbox container looks to StacyVM
/// (`stacyvm-<id>`, labelled with the sandbox id and, when given, an
/// installation), but made behind StacyVM's back. Returns its id.
pub fn run_labelled_container(sandbox_id: &str, instance: Option<&str>) -> String {
    let mut args = vec![
        "run".to_string(),
        "-d".into(),
        "--network".into(),
        "none".into(),
        "--name".into(),
        format!("stacyvm-{sandbox_id}"),
        "--label".into(),
        format!("io.stacyvm.sandbox={sandbox_id}"),
    ];
    if let Some(instance) = instance {
        args.extend(["--label".into(), format!("io.stacyvm.instance={instance}")]);
    }
    args.extend([
        docker_image(),
        "sh".into(),
        "-c".into(),
        "while :; do sleep 3600; done".into(),
    ]);
    let out = std::process::Command::new("docker")
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("docker run: {e}"));
    assert!(out.status.success(), "docker run failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Inserts a docker sandbox record of this server's local worker, as if
/// StacyVM had made it: in `state`, with `runtime_id` when it has one.
pub async fn insert_docker_record(
    server: &TestServer,
    id: &str,
    state: &str,
    runtime_id: Option<String>,
) {
    let worker = server.app_service.scheduler().in_process_workers()[0]
        .id()
        .to_string();
    insert_record(server, id, &worker, "docker", state, runtime_id).await;
}

/// Inserts a sandbox record (and its lease) on `worker` and `provider`, as
/// the control plane writes one before and after a spawn.
pub async fn insert_record(
    server: &TestServer,
    id: &str,
    worker: &str,
    provider: &str,
    state: &str,
    runtime_id: Option<String>,
) {
    let now = chrono::Utc::now();
    server
        .app_service
        .store()
        .insert_sandbox(
            entity::sandbox::Model {
                id: id.to_string(),
                owner_id: "anonymous".into(),
                tenant_id: "default".into(),
                worker_id: worker.to_string(),
                provider: provider.into(),
                runtime_id,
                image: docker_image(),
                template: None,
                memory_mb: 64,
                vcpus: 1,
                state: state.into(),
                state_reason: None,
                metadata: serde_json::json!({}),
                created_at: now,
                updated_at: now,
                expires_at: now + chrono::Duration::minutes(30),
                destroyed_at: None,
                idempotency_key: None,
                replica_id: String::new(),
                pool_key: None,
            },
            now + chrono::Duration::minutes(5),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Every REST route on one sandbox, with a body where it needs one: what
/// the isolation matrices (other owner, other tenant) call on a sandbox
/// that is not the caller's.
pub fn sandbox_routes(id: &str) -> Vec<(reqwest::Method, String, Option<serde_json::Value>)> {
    use reqwest::Method;
    use serde_json::json;
    vec![
        (Method::GET, format!("/sandboxes/{id}"), None),
        (Method::DELETE, format!("/sandboxes/{id}"), None),
        (
            Method::POST,
            format!("/sandboxes/{id}/extend"),
            Some(json!({"ttl": "1h"})),
        ),
        (
            Method::POST,
            format!("/sandboxes/{id}/exec"),
            Some(json!({"command": "id"})),
        ),
        (
            Method::POST,
            format!("/sandboxes/{id}/exec"),
            Some(json!({"command": "id", "stream": true})),
        ),
        (Method::GET, format!("/sandboxes/{id}/logs"), None),
        (Method::GET, format!("/sandboxes/{id}/stats"), None),
        (
            Method::POST,
            format!("/sandboxes/{id}/files"),
            Some(json!({"path": "/tmp/x", "content": "b"})),
        ),
        (
            Method::GET,
            format!("/sandboxes/{id}/files?path=/tmp/s"),
            None,
        ),
        (
            Method::DELETE,
            format!("/sandboxes/{id}/files?path=/tmp/s"),
            None,
        ),
        (
            Method::GET,
            format!("/sandboxes/{id}/files/list?path=/tmp"),
            None,
        ),
        (
            Method::GET,
            format!("/sandboxes/{id}/files/stat?path=/tmp/s"),
            None,
        ),
        (
            Method::GET,
            format!("/sandboxes/{id}/files/glob?pattern=/tmp/*"),
            None,
        ),
        (
            Method::POST,
            format!("/sandboxes/{id}/files/move"),
            Some(json!({"old_path": "/tmp/s", "new_path": "/tmp/t"})),
        ),
        (
            Method::POST,
            format!("/sandboxes/{id}/files/chmod"),
            Some(json!({"path": "/tmp/s", "mode": "0600"})),
        ),
    ]
}

/// A new API key of the default tenant for `owner` with `role`.
pub async fn key(server: &TestServer, owner: &str, role: stacyvm::auth::Role) -> String {
    let (key, _) = server
        .app_service
        .identity()
        .create_key(stacyvm::service::NewApiKey {
            owner_id: owner.into(),
            tenant_id: None,
            role,
            expires_in: None,
            allow_user_header: false,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    key
}
