//! The chaos suite: the lifecycle never lies.
//!
//! Each case breaks something for real — `kill -9` of the server process
//! at a chosen step (armed with `STACYVM_FAILPOINT`; the server sends
//! itself SIGKILL there), `docker kill` / `docker rm -f` behind StacyVM's
//! back, an OOM kill of a sandbox's init, SIGTERM with commands running —
//! and then checks the store, the runtime inventory and the events.
//!
//! Server crashes need a separate process: [`ServerProcess`] runs the real
//! `stacyvm serve` binary on a data dir that outlives it.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use stacyvm::store::Store;

use crate::graphql::Ws;
use crate::support::{
    TestServer, docker_containers_for, docker_enabled, docker_image, insert_docker_record,
    rootfs_tarball, run_labelled_container,
};

/// `stacyvm serve` as a child process.
struct ServerProcess {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    http: reqwest::Client,
}

/// Settings every chaos server gets: fast loops so verdicts come quickly.
const FAST: &[(&str, &str)] = &[
    ("STACYVM_LIFECYCLE_RECONCILE_INTERVAL", "500ms"),
    ("STACYVM_LIFECYCLE_REAPER_INTERVAL", "500ms"),
    ("STACYVM_LIFECYCLE_HEALTH_INTERVAL", "1s"),
    ("STACYVM_LOGGING_LEVEL", "info"),
];

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("{e}"))
        .port()
}

impl ServerProcess {
    /// Starts `stacyvm serve` on `data_dir` with `env` (config as
    /// `STACYVM_*` variables) and, optionally, an armed failpoint; waits
    /// until it answers.
    async fn start(data_dir: &Path, env: &[(&str, &str)], failpoint: Option<&str>) -> Self {
        let port = free_port();
        let log = data_dir.join(format!("server-{port}.log"));
        let file = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let err = file.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stacyvm"));
        cmd.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .env("STACYVM_DATA_DIR", data_dir)
            .envs(FAST.iter().copied())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        match failpoint {
            Some(step) => cmd.env(stacyvm::failpoint::ENV, step),
            None => cmd.env_remove(stacyvm::failpoint::ENV),
        };
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn stacyvm: {e}"));
        let mut server = ServerProcess {
            child: Some(child),
            port,
            log,
            http: reqwest::Client::new(),
        };
        server.wait_ready().await;
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/api/v1{path}", self.port)
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/graphql/ws", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "server exited during start ({status}):\n{}",
                    self.log_text()
                );
            }
            if let Ok(resp) = self.http.get(self.url("/health")).send().await
                && resp.status().is_success()
            {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("server did not answer within 60s:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the process to end by itself (a failpoint fired).
    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        let child = self.child.as_mut().unwrap_or_else(|| panic!("not running"));
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("server still running after {limit:?}:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the failpoint `step` to kill the server, and checks that
    /// it died of SIGKILL there and nowhere else.
    async fn expect_killed_at(&mut self, step: &str) {
        let status = self.wait_exit(Duration::from_secs(60)).await;
        assert_eq!(status.signal(), Some(9), "{status}:\n{}", self.log_text());
        assert!(
            self.log_text()
                .contains(&format!("failpoint {step} reached")),
            "died elsewhere:\n{}",
            self.log_text()
        );
    }

    fn signal(&self, signal: rustix::process::Signal) {
        if let Some(child) = &self.child
            && let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32)
        {
            let _already_gone = rustix::process::kill_process(pid, signal);
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Result<(u16, Value)> {
        let mut req = self.http.request(method, self.url(path));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, Some(body))
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.log_text()))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, None)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log_text()))
    }

    /// Runs `command` through `sh -c` in sandbox `id`; it must succeed
    /// over HTTP. Returns its stdout.
    async fn shell(&self, id: &str, command: &str) -> String {
        let (status, body) = self
            .post(
                &format!("/sandboxes/{id}/exec"),
                json!({"command": command, "mode": "shell"}),
            )
            .await;
        assert_eq!(status, 200, "{command}: {body}");
        body["stdout"].as_str().unwrap_or_default().to_string()
    }

    /// Destroys sandbox `id`, which must succeed.
    async fn destroy(&self, id: &str) {
        let (status, body) = self
            .request(reqwest::Method::DELETE, &format!("/sandboxes/{id}"), None)
            .await
            .unwrap_or_else(|e| panic!("DELETE {id}: {e}"));
        assert_eq!(status, 200, "{body}");
    }

    async fn spawn(&self, body: Value) -> String {
        let (status, sandbox) = self.post("/sandboxes", body).await;
        assert_eq!(status, 201, "{sandbox}");
        sandbox["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{sandbox}"))
            .to_string()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _already_gone = child.kill();
            let _reaped = child.wait();
        }
    }
}

/// The store of a data dir, opened next to (or after) its server.
async fn store_of(data_dir: &Path) -> Store {
    let url = format!(
        "sqlite://{}?mode=rwc",
        data_dir.join("stacyvm.db").display()
    );
    Store::connect(&url).await.unwrap_or_else(|e| panic!("{e}"))
}

async fn record(store: &Store, id: &str) -> entity::sandbox::Model {
    store
        .get_sandbox(id)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no record for {id}"))
}

/// The one sandbox record in a fresh store (for crashes before the spawn
/// answered, when the client never learned the id).
async fn only_sandbox(store: &Store) -> entity::sandbox::Model {
    let all = store
        .list_sandboxes(&stacyvm::store::SandboxFilter {
            owner_id: None,
            states: Some(stacyvm::lifecycle::SandboxState::ALL.to_vec()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(all.len(), 1, "{all:?}");
    all.into_iter().next().unwrap_or_else(|| unreachable!())
}

/// No record is left in a transient state.
async fn assert_no_transient_records(store: &Store) {
    use stacyvm::lifecycle::SandboxState;
    let stuck = store
        .list_sandboxes(&stacyvm::store::SandboxFilter {
            owner_id: None,
            states: Some(vec![SandboxState::Creating, SandboxState::Destroying]),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        stuck.is_empty(),
        "records left in a transient state: {stuck:?}"
    );
}

/// Audit actions the server itself recorded on `target`.
async fn system_audit(store: &Store, target: &str) -> Vec<(String, Option<String>)> {
    let events = store
        .list_audit(&stacyvm::store::AuditFilter {
            actor: Some("system".into()),
            target: Some(target.into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    events.into_iter().map(|e| (e.action, e.detail)).collect()
}

fn native_dirs(data_dir: &Path) -> Vec<String> {
    match std::fs::read_dir(data_dir.join("sandboxes/native")) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn import_native_image(data_dir: &Path) {
    stacyvm::provider::image_store::ImageStore::new(data_dir.join("images"))
        .import(&docker_image(), &rootfs_tarball())
        .unwrap_or_else(|e| panic!("import: {e}"));
}

const DOCKER: &[(&str, &str)] = &[("STACYVM_PROVIDERS_DEFAULT", "docker")];
const NATIVE: &[(&str, &str)] = &[("STACYVM_PROVIDERS_DEFAULT", "native")];

// ---------------------------------------------------------------------------
// kill -9 of the server at each step, then a restart
// ---------------------------------------------------------------------------

/// Kills the server between "runtime started" and "record running", then
/// restarts it. `runtimes(id)` lists what the provider holds for the
/// sandbox: one runtime after the crash, none after the restart.
async fn kill_during_spawn(
    env: &[(&str, &str)],
    data_dir: &Path,
    runtimes: impl Fn(&str) -> usize,
) {
    let mut server = ServerProcess::start(data_dir, env, Some("spawn.runtime_started")).await;
    let answer = server
        .request(
            reqwest::Method::POST,
            "/sandboxes",
            Some(json!({"image": docker_image()})),
        )
        .await;
    assert!(answer.is_err(), "the spawn answered: {answer:?}");
    server.expect_killed_at("spawn.runtime_started").await;

    // The crash really was mid-spawn: a record in `creating` and a
    // runtime it never learned about.
    let store = store_of(data_dir).await;
    let stuck = only_sandbox(&store).await;
    assert_eq!(stuck.state, "creating");
    assert_eq!(runtimes(&stuck.id), 1);

    let _server = ServerProcess::start(data_dir, env, None).await;
    // The start-up pass runs before the server answers.
    let after = record(&store, &stuck.id).await;
    assert_eq!(after.state, "destroyed", "{after:?}");
    assert!(
        after
            .state_reason
            .as_deref()
            .unwrap_or_default()
            .contains("server restarted while the sandbox was creating"),
        "{after:?}"
    );
    assert_eq!(runtimes(&stuck.id), 0);
    assert_no_transient_records(&store).await;
    let audit = system_audit(&store, &stuck.id).await;
    assert!(
        audit.iter().any(|(action, _)| action == "sandbox.destroy"),
        "{audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_docker_spawn_leaves_no_container_and_no_transient_record() {
    if !docker_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    kill_during_spawn(DOCKER, dir.path(), |id| docker_containers_for(id).len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_native_spawn_leaves_no_directory_and_no_transient_record() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    import_native_image(dir.path());
    let data_dir = dir.path().to_path_buf();
    kill_during_spawn(NATIVE, dir.path(), move |id| {
        native_dirs(&data_dir).iter().filter(|d| *d == id).count()
    })
    .await;
}

/// Runs `command` in a sandbox until the server dies with its output
/// flowing; then a restart must mark the execution interrupted and keep
/// the sandbox usable.
async fn kill_during_exec(env: &[(&str, &str)], data_dir: &Path) {
    let mut server = ServerProcess::start(data_dir, env, Some("exec.output_flowing")).await;
    let id = server.spawn(json!({"image": docker_image()})).await;
    let answer = server
        .request(
            reqwest::Method::POST,
            &format!("/sandboxes/{id}/exec"),
            Some(json!({"command": "echo started; sleep 30", "mode": "shell"})),
        )
        .await;
    assert!(answer.is_err(), "the exec answered: {answer:?}");
    server.expect_killed_at("exec.output_flowing").await;
    let store = store_of(data_dir).await;
    let running = store
        .executions_of(std::slice::from_ref(&id))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].status, "running");

    let server = ServerProcess::start(data_dir, env, None).await;
    let execution = store
        .get_execution(&running[0].id)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("execution gone"));
    assert_eq!(execution.status, "interrupted", "{execution:?}");
    assert!(execution.finished_at.is_some());
    assert!(
        execution
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("interrupted"),
        "{execution:?}"
    );
    // The sandbox survived the crash and was adopted.
    assert_eq!(record(&store, &id).await.state, "running");
    assert_eq!(server.shell(&id, "echo still-here").await, "still-here\n");
    server.destroy(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_docker_exec_marks_it_interrupted() {
    if !docker_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    kill_during_exec(DOCKER, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_native_exec_marks_it_interrupted() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    import_native_image(dir.path());
    kill_during_exec(NATIVE, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_file_write_keeps_the_old_content() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    import_native_image(dir.path());
    let write = |id: &str, content: &str| {
        (
            format!("/sandboxes/{id}/files"),
            json!({"path": "/workspace/notes.txt", "content": content}),
        )
    };
    let id = {
        let server = ServerProcess::start(dir.path(), NATIVE, None).await;
        let id = server.spawn(json!({"image": docker_image()})).await;
        let (path, body) = write(&id, "version one\n");
        let (status, answer) = server.post(&path, body).await;
        assert!(status < 300, "{answer}");
        id
    };
    let mut server =
        ServerProcess::start(dir.path(), NATIVE, Some("files.write.before_commit")).await;
    let (path, body) = write(&id, &"version two\n".repeat(10_000));
    let answer = server
        .request(reqwest::Method::POST, &path, Some(body))
        .await;
    assert!(answer.is_err(), "the write answered: {answer:?}");
    server.expect_killed_at("files.write.before_commit").await;

    let server = ServerProcess::start(dir.path(), NATIVE, None).await;
    let (status, file) = server
        .get(&format!("/sandboxes/{id}/files?path=/workspace/notes.txt"))
        .await;
    assert_eq!(status, 200, "{file}");
    assert_eq!(file, Value::String("version one\n".into()));
    let (status, listing) = server
        .get(&format!("/sandboxes/{id}/files/list?path=/workspace"))
        .await;
    assert_eq!(status, 200, "{listing}");
    let names: Vec<&str> = listing
        .as_array()
        .unwrap_or_else(|| panic!("{listing}"))
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names, vec!["notes.txt"], "temporary files were left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_destroy_finishes_the_destroy_at_restart() {
    if !docker_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut server =
        ServerProcess::start(dir.path(), DOCKER, Some("destroy.runtime_removed")).await;
    let id = server.spawn(json!({"image": docker_image()})).await;
    let answer = server
        .request(reqwest::Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;
    assert!(answer.is_err(), "the destroy answered: {answer:?}");
    server.expect_killed_at("destroy.runtime_removed").await;
    let store = store_of(dir.path()).await;
    assert_eq!(record(&store, &id).await.state, "destroying");

    let _server = ServerProcess::start(dir.path(), DOCKER, None).await;
    let after = record(&store, &id).await;
    assert_eq!(after.state, "destroyed", "{after:?}");
    assert!(after.destroyed_at.is_some());
    assert!(docker_containers_for(&id).is_empty());
    assert_no_transient_records(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_ttl_expiry_destroys_at_restart() {
    if !docker_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut server = ServerProcess::start(dir.path(), DOCKER, Some("expire.marked")).await;
    let id = server
        .spawn(json!({"image": docker_image(), "ttl": "2s"}))
        .await;
    // Nobody calls the server: the reaper reaches the failpoint by itself.
    server.expect_killed_at("expire.marked").await;
    let store = store_of(dir.path()).await;
    assert_eq!(record(&store, &id).await.state, "expired");
    assert_eq!(docker_containers_for(&id).len(), 1);

    let _server = ServerProcess::start(dir.path(), DOCKER, None).await;
    let after = record(&store, &id).await;
    assert_eq!(after.state, "destroyed", "{after:?}");
    assert_eq!(after.state_reason.as_deref(), Some("ttl reached"));
    assert!(docker_containers_for(&id).is_empty());
    assert_no_transient_records(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtimes_without_a_record_are_destroyed_but_other_installations_are_left_alone() {
    if !docker_enabled() {
        return;
    }
    let server = TestServer::start(|c| {
        c.providers.default = "docker".into();
        c.lifecycle.reconcile_interval = stacyvm::duration::GoDuration(Duration::from_millis(300));
        c.lifecycle.orphan_grace = stacyvm::duration::GoDuration(Duration::from_secs(1));
    })
    .await;
    let instance = std::fs::read_to_string(server.data_dir.path().join("instance_id"))
        .unwrap_or_else(|e| panic!("{e}"));
    let orphan = stacyvm::ids::sandbox();
    let foreign = stacyvm::ids::sandbox();
    run_labelled_container(&orphan, Some(instance.trim()));
    run_labelled_container(&foreign, Some("in-someone-else"));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !docker_containers_for(&orphan).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "orphan survived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let audit = system_audit(server.app_service.store(), &orphan).await;
    assert!(
        audit
            .iter()
            .any(|(action, detail)| action == "sandbox.orphan.destroy"
                && detail
                    .as_deref()
                    .unwrap_or_default()
                    .contains("no sandbox record")),
        "{audit:?}"
    );
    // Another installation's container is not ours to judge.
    assert_eq!(docker_containers_for(&foreign).len(), 1);
    let _removed = Command::new("docker")
        .args(["rm", "-f"])
        .args(docker_containers_for(&foreign))
        .status();
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Runtimes killed behind StacyVM's back (server running)
// ---------------------------------------------------------------------------

const SANDBOX_EVENTS: &str =
    "subscription($id: ID) { sandboxEvents(sandboxId: $id) { sandboxId state reason } }";

/// Spawns on docker and subscribes to its state events.
async fn docker_sandbox_with_events(server: &TestServer, body: Value) -> (String, Ws) {
    let (status, sandbox) = server.post("/sandboxes", body).await;
    assert_eq!(status, 201, "{sandbox}");
    let id = sandbox["id"].as_str().unwrap_or_default().to_string();
    let url = server
        .base
        .replace("http://", "ws://")
        .replace("/api/v1", "/graphql/ws");
    let mut ws = Ws::connect_url(&url, false).await;
    ws.subscribe("s", SANDBOX_EVENTS, json!({"id": id})).await;
    (id, ws)
}

/// State events until `last` arrives: (state, reason) pairs.
async fn states_until(ws: &mut Ws, last: &str) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    loop {
        let message = ws.recv().await;
        let event = &message["payload"]["data"]["sandboxEvents"];
        let state = event["state"].as_str().unwrap_or_default().to_lowercase();
        let reason = event["reason"].as_str().unwrap_or_default().to_string();
        seen.push((state.clone(), reason));
        if state == last {
            return seen;
        }
    }
}

async fn fast_docker_server() -> TestServer {
    TestServer::start(|c| {
        c.providers.default = "docker".into();
        c.lifecycle.reconcile_interval = stacyvm::duration::GoDuration(Duration::from_millis(300));
    })
    .await
}

fn docker(args: &[&str]) {
    let ok = Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "docker {args:?} failed");
}

/// The failure reason reaches clients over REST (on the record while it is
/// `error`, in the 404 once destroyed) and GraphQL (`stateReason`).
async fn assert_reason_everywhere(server: &TestServer, id: &str, needle: &str) {
    let (status, sandbox) = server.get(&format!("/sandboxes/{id}")).await;
    let text = match status {
        200 => sandbox["state_reason"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        404 => sandbox["message"].as_str().unwrap_or_default().to_string(),
        other => panic!("{other}: {sandbox}"),
    };
    assert!(text.contains(needle), "REST: {sandbox}");
    let graphql = server.base.replace("/api/v1", "/graphql");
    let query = "query { sandboxes(first: 100, filter: {states: [ERROR, DESTROYED]}) { edges { node { id stateReason } } } }";
    let answer: Value = server
        .http
        .post(graphql)
        .json(&json!({ "query": query }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let reason = answer["data"]["sandboxes"]["edges"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .iter()
        .find(|e| e["node"]["id"] == id)
        .map(|e| {
            e["node"]["stateReason"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_else(|| panic!("{id} not listed: {answer}"));
    assert!(reason.contains(needle), "GraphQL: {answer}");
}

/// Follows the sandbox's events to `destroyed` and checks that it went
/// through `error` with a reason containing `needle`, and that the reason
/// reaches REST and GraphQL.
async fn assert_failed_with(server: &TestServer, ws: &mut Ws, id: &str, needle: &str) {
    let seen = states_until(ws, "destroyed").await;
    assert!(
        seen.iter()
            .any(|(state, reason)| state == "error" && reason.contains(needle)),
        "{seen:?}"
    );
    assert_reason_everywhere(server, id, needle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_kill_is_reported_with_its_cause_and_cleaned_up() {
    if !docker_enabled() {
        return;
    }
    let server = fast_docker_server().await;
    let (id, mut ws) = docker_sandbox_with_events(&server, json!({"image": docker_image()})).await;
    let started = std::time::Instant::now();
    docker(&["kill", &format!("stacyvm-{id}")]);
    assert_failed_with(&server, &mut ws, &id, "SIGKILL").await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(docker_containers_for(&id).is_empty());
    let audit = system_audit(server.app_service.store(), &id).await;
    assert!(audit.iter().any(|(a, _)| a == "sandbox.fail"), "{audit:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_rm_is_reported_as_removed() {
    if !docker_enabled() {
        return;
    }
    let server = fast_docker_server().await;
    let (id, mut ws) = docker_sandbox_with_events(&server, json!({"image": docker_image()})).await;
    docker(&["rm", "-f", &format!("stacyvm-{id}")]);
    assert_failed_with(&server, &mut ws, &id, "removed outside StacyVM").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_killed_init_is_reported_as_oom() {
    if !docker_enabled() {
        return;
    }
    let server = fast_docker_server().await;
    // 125 MiB is 32000 pages: the kernel's badness bonus for
    // oom_score_adj=1000 (adj * pages / 1000, integer division) then
    // outweighs any process in the sandbox, so the init is the victim.
    // The command first gives up the 500 the agent starts commands with
    // (back to 0 needs no privilege), or it would be the victim itself.
    let (id, mut ws) =
        docker_sandbox_with_events(&server, json!({"image": docker_image(), "memory_mb": 125}))
            .await;
    let (status, body) = server
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({
                "command": "echo 0 > /proc/self/oom_score_adj; echo 1000 > /proc/1/oom_score_adj; awk 'BEGIN{s=\"x\"; while(1) s=s s}'",
                "mode": "shell",
                "timeout": "60s"
            }),
        )
        .await;
    // The exec dies with its sandbox; how it is reported depends on timing.
    eprintln!("exec during OOM: {status} {body}");
    assert_failed_with(&server, &mut ws, &id, "OOM killer").await;
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_commands_finish_and_leaves_sandboxes_for_adoption() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    import_native_image(dir.path());
    let mut server = ServerProcess::start(dir.path(), NATIVE, None).await;
    let id = server.spawn(json!({"image": docker_image()})).await;

    // A subscriber to the sandbox's events sees its stream end at shutdown.
    let mut ws = Ws::connect_url(&server.ws_url(), false).await;
    ws.subscribe("s", SANDBOX_EVENTS, json!({"id": id})).await;

    let http = server.http.clone();
    let exec_url = server.url(&format!("/sandboxes/{id}/exec"));
    let exec = tokio::spawn(async move {
        http.post(exec_url)
            .json(&json!({"command": "sleep 2; echo finished", "mode": "shell"}))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.signal(rustix::process::Signal::TERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New work is refused while draining (or the listener is already gone).
    if let Ok((status, body)) = server
        .request(
            reqwest::Method::POST,
            "/sandboxes",
            Some(json!({"image": docker_image()})),
        )
        .await
    {
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["code"], "UNAVAILABLE", "{body}");
    }
    let status = exec
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("the running exec was cut off: {e}"));
    assert_eq!(status, 200);
    let (messages, close) = ws.until_closed(Duration::from_secs(20)).await;
    assert!(
        messages
            .iter()
            .any(|m| m["type"] == "complete" && m["id"] == "s"),
        "{messages:?}"
    );
    assert_eq!(close, Some(1001), "{messages:?}");
    let exit = server.wait_exit(Duration::from_secs(30)).await;
    assert!(exit.success(), "{exit}:\n{}", server.log_text());

    let store = store_of(dir.path()).await;
    let executions = store
        .executions_of(std::slice::from_ref(&id))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(executions[0].status, "completed", "{executions:?}");
    assert_eq!(record(&store, &id).await.state, "running");
    assert_eq!(native_dirs(dir.path()), vec![id.clone()]);

    // The next start adopts it.
    let server = ServerProcess::start(dir.path(), NATIVE, None).await;
    assert_eq!(server.shell(&id, "echo adopted").await, "adopted\n");
    let audit = system_audit(&store, &id).await;
    assert!(audit.iter().any(|(a, _)| a == "sandbox.adopt"), "{audit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_refuses_new_work_but_serves_reads() {
    // In process, so that the listener is still open while draining (a
    // signal closes it at once) and the refusal itself is observable.
    let server = crate::support::native_server(|_| {}).await;
    let (status, sandbox) = server
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert_eq!(status, 201, "{sandbox}");
    let id = sandbox["id"].as_str().unwrap_or_default().to_string();
    server.app_service.begin_shutdown();
    for (path, body) in [
        ("/sandboxes".to_string(), json!({"image": docker_image()})),
        (
            format!("/sandboxes/{id}/exec"),
            json!({"command": "true", "mode": "shell"}),
        ),
    ] {
        let (status, answer) = server.post(&path, body).await;
        assert_eq!(status, 503, "{path}: {answer}");
        assert_eq!(answer["code"], "UNAVAILABLE", "{answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap_or_default()
                .contains("shutting down"),
            "{answer}"
        );
    }
    let (status, ready) = server.get("/ready").await;
    assert_eq!(status, 503, "{ready}");
    let (status, listed) = server.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(status, 200, "{listed}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_interrupts_commands_past_the_deadline_with_a_final_event() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    import_native_image(dir.path());
    let env = [
        ("STACYVM_PROVIDERS_DEFAULT", "native"),
        ("STACYVM_LIFECYCLE_SHUTDOWN_TIMEOUT", "1s"),
    ];
    let mut server = ServerProcess::start(dir.path(), &env, None).await;
    let id = server.spawn(json!({"image": docker_image()})).await;
    let mut ws = Ws::connect_url(&server.ws_url(), false).await;
    ws.subscribe(
        "x",
        "subscription($id: ID!) { execStream(sandboxId: $id, input: {command: \"echo begun; sleep 60\", mode: SHELL}) { __typename ... on ExecExit { exitCode error } } }",
        json!({"id": id}),
    )
    .await;
    let first = ws.recv().await;
    assert_eq!(
        first["payload"]["data"]["execStream"]["__typename"], "OutputChunk",
        "{first}"
    );
    let begun = std::time::Instant::now();
    server.signal(rustix::process::Signal::TERM);
    let (messages, close) = ws.until_closed(Duration::from_secs(30)).await;
    let exit = messages
        .iter()
        .map(|m| &m["payload"]["data"]["execStream"])
        .find(|e| e["__typename"] == "ExecExit")
        .unwrap_or_else(|| panic!("no final event: {messages:?}"));
    assert!(
        exit["error"]
            .as_str()
            .unwrap_or_default()
            .contains("interrupted"),
        "{exit}"
    );
    assert_eq!(close, Some(1001));
    assert!(server.wait_exit(Duration::from_secs(30)).await.success());
    assert!(
        begun.elapsed() < Duration::from_secs(20),
        "{:?}",
        begun.elapsed()
    );
    let store = store_of(dir.path()).await;
    let executions = store
        .executions_of(std::slice::from_ref(&id))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(executions[0].status, "interrupted", "{executions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_on_shutdown_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    import_native_image(dir.path());
    let env = [
        ("STACYVM_PROVIDERS_DEFAULT", "native"),
        ("STACYVM_LIFECYCLE_DESTROY_ON_SHUTDOWN", "true"),
    ];
    let mut server = ServerProcess::start(dir.path(), &env, None).await;
    let a = server.spawn(json!({"image": docker_image()})).await;
    let b = server.spawn(json!({"image": docker_image()})).await;
    server.signal(rustix::process::Signal::INT);
    assert!(server.wait_exit(Duration::from_secs(30)).await.success());
    let store = store_of(dir.path()).await;
    for id in [&a, &b] {
        let r = record(&store, id).await;
        assert_eq!(r.state, "destroyed");
        assert_eq!(
            r.state_reason.as_deref(),
            Some("destroyed at server shutdown")
        );
    }
    assert_eq!(native_dirs(dir.path()), Vec::<String>::new());
}

// ---------------------------------------------------------------------------
// The Docker daemon going away and coming back
// ---------------------------------------------------------------------------

/// Polls `/ready` until it answers `want`.
async fn wait_ready_status(server: &TestServer, want: u16, limit: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (status, body) = server.get("/ready").await;
        if status == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready stayed {status} {body}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_stopping_and_returning_is_survived_without_a_restart() {
    use crate::private_dockerd::PrivateDockerd;
    let Some(daemon) = tokio::task::spawn_blocking(PrivateDockerd::start)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    else {
        return;
    };
    let host = daemon.host();
    let server = TestServer::start(move |c| {
        c.providers.default = "docker".into();
        c.providers.docker.host = host;
        c.lifecycle.health_interval = stacyvm::duration::GoDuration(Duration::from_millis(500));
        c.lifecycle.reconcile_interval = stacyvm::duration::GoDuration(Duration::from_millis(300));
    })
    .await;
    wait_ready_status(&server, 200, Duration::from_secs(10)).await;
    let (id, mut ws) = docker_sandbox_with_events(&server, json!({"image": docker_image()})).await;
    let (status, body) = server
        .post(
            &format!("/sandboxes/{id}/files"),
            json!({"path": "/workspace/kept.txt", "content": "kept\n"}),
        )
        .await;
    assert!(status < 300, "{body}");

    // The daemon goes away.
    let mut daemon = tokio::task::spawn_blocking(move || {
        let mut daemon = daemon;
        daemon.stop();
        daemon
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let body = wait_ready_status(&server, 503, Duration::from_secs(15)).await;
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Docker daemon is unreachable"),
        "{body}"
    );
    let (status, refused) = server
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["code"], "UNAVAILABLE");
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Docker daemon is unreachable"),
        "{refused}"
    );
    let seen = states_until(&mut ws, "unhealthy").await;
    let (_, reason) = seen.last().unwrap_or_else(|| unreachable!());
    assert!(reason.contains("Docker daemon is unreachable"), "{seen:?}");
    let (_, sandbox) = server.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(sandbox["state"], "unhealthy", "{sandbox}");

    // It comes back: everything recovers without restarting StacyVM.
    daemon = tokio::task::spawn_blocking(move || {
        daemon.restart();
        daemon
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    wait_ready_status(&server, 200, Duration::from_secs(20)).await;
    let seen = states_until(&mut ws, "running").await;
    assert!(!seen.iter().any(|(s, _)| s == "error"), "{seen:?}");
    assert_eq!(server.shell(&id, "cat /workspace/kept.txt").await, "kept\n");
    let (status, fresh) = server
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert_eq!(status, 201, "{fresh}");
    for sandbox in [id.as_str(), fresh["id"].as_str().unwrap_or_default()] {
        let (status, body) = server.delete(&format!("/sandboxes/{sandbox}")).await;
        assert_eq!(status, 200, "{body}");
    }
    server.stop().await;
    drop(tokio::task::spawn_blocking(move || drop(daemon)).await);
}

// ---------------------------------------------------------------------------
// Native sandboxes: a killed init, and a live init adopted after kill -9
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_sandbox_whose_init_is_killed_from_inside_is_reported_and_cleaned_up() {
    let server = crate::support::native_server(|c| {
        c.lifecycle.reconcile_interval = stacyvm::duration::GoDuration(Duration::from_millis(300));
    })
    .await;
    let (id, mut ws) = docker_sandbox_with_events(&server, json!({"image": docker_image()})).await;
    // A process inside the sandbox signals its init (PID 1 handles SIGTERM,
    // as a container's init does).
    let (status, body) = server
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "kill 1; sleep 5", "mode": "shell"}),
        )
        .await;
    eprintln!("exec that killed its init: {status} {body}");
    assert_failed_with(&server, &mut ws, &id, "SIGTERM").await;
    let dirs = native_dirs(server.data_dir.path());
    assert!(!dirs.contains(&id), "{dirs:?}");
    until_no_process_mentions(&id).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_sandbox_and_its_processes_survive_kill_9_of_the_server() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    import_native_image(dir.path());
    // A secret in the server's environment (an API key, a database URL)...
    let env = [
        ("STACYVM_PROVIDERS_DEFAULT", "native"),
        ("STACYVM_CHAOS_SECRET", "do-not-leak-7f3a"),
    ];
    let mut server = ServerProcess::start(dir.path(), &env, None).await;
    let id = server.spawn(json!({"image": docker_image()})).await;
    // ...is not readable from inside a sandbox, not even from its init.
    let (status, body) = server
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "cat /proc/1/environ /proc/self/environ; cat /proc/1/cmdline", "mode": "shell"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let seen = format!("{body}");
    assert!(!seen.contains("do-not-leak"), "{seen}");
    let (status, body) = server
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "sleep 300 >/dev/null 2>&1 & echo $! > /tmp/bg", "mode": "shell"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    server.signal(rustix::process::Signal::KILL);
    let exit = server.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(exit.signal(), Some(9));

    let server = ServerProcess::start(dir.path(), NATIVE, None).await;
    assert_eq!(
        server
            .shell(&id, "kill -0 $(cat /tmp/bg) && echo alive")
            .await,
        "alive\n"
    );
    let store = store_of(dir.path()).await;
    assert_eq!(record(&store, &id).await.state, "running");
    assert!(
        system_audit(&store, &id)
            .await
            .iter()
            .any(|(a, _)| a == "sandbox.adopt")
    );
    server.destroy(&id).await;
    assert!(crate::providers::host_processes_with(&id).is_empty());
}

// ---------------------------------------------------------------------------
// Restarts that must not cost users their sandboxes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_stopped_while_the_server_was_down_are_started_again() {
    if !docker_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut server = ServerProcess::start(dir.path(), DOCKER, None).await;
    let id = server.spawn(json!({"image": docker_image()})).await;
    let (status, body) = server
        .post(
            &format!("/sandboxes/{id}/files"),
            json!({"path": "/workspace/kept.txt", "content": "kept\n"}),
        )
        .await;
    assert!(status < 300, "{body}");
    server.signal(rustix::process::Signal::KILL);
    server.wait_exit(Duration::from_secs(10)).await;
    // What a daemon restart or a reboot does to it while nobody watches.
    docker(&["stop", &format!("stacyvm-{id}")]);

    let server = ServerProcess::start(dir.path(), DOCKER, None).await;
    let store = store_of(dir.path()).await;
    assert_eq!(record(&store, &id).await.state, "running");
    assert_eq!(server.shell(&id, "cat /workspace/kept.txt").await, "kept\n");
    server.destroy(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtimes_from_an_older_version_are_adopted_not_destroyed() {
    if !docker_enabled() {
        return;
    }
    // A docker sandbox made before containers carried the instance label.
    let server = fast_docker_server().await;
    let id = stacyvm::ids::sandbox();
    let container = run_labelled_container(&id, None);
    insert_docker_record(&server, &id, "running", Some(container)).await;
    // Several reconcile passes later it is still there and usable.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.shell(&id, "echo old").await, "old\n");
    assert_eq!(docker_containers_for(&id).len(), 1);
    let (status, _) = server.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(status, 200);
    assert!(docker_containers_for(&id).is_empty());
    server.stop().await;
}

/// Kills every host process of a native sandbox (keeper, init, children),
/// as a host reboot or an operator's `kill -9` would.
async fn kill_native_sandbox_processes(id: &str) {
    for line in crate::providers::host_processes_with(id) {
        if let Some(pid) = line
            .split(':')
            .next()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            let _gone = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !crate::providers::host_processes_with(id).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "processes survived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_sandboxes_whose_init_vanished_while_the_server_was_down_get_a_new_one() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    import_native_image(dir.path());
    let mut server = ServerProcess::start(dir.path(), NATIVE, None).await;
    let id = server.spawn(json!({"image": docker_image()})).await;
    let (status, body) = server
        .post(
            &format!("/sandboxes/{id}/files"),
            json!({"path": "/workspace/kept.txt", "content": "kept\n"}),
        )
        .await;
    assert!(status < 300, "{body}");
    let sandbox_dir = dir.path().join("sandboxes/native").join(&id);
    // First as after a reboot (init records left, processes gone), then as
    // a sandbox of the version before inits (no records either).
    for forget_records in [false, true] {
        server.signal(rustix::process::Signal::KILL);
        server.wait_exit(Duration::from_secs(10)).await;
        kill_native_sandbox_processes(&id).await;
        if forget_records {
            for file in ["init.pid", "init.exit"] {
                let _absent = std::fs::remove_file(sandbox_dir.join(file));
            }
        }
        server = ServerProcess::start(dir.path(), NATIVE, None).await;
        let (status, body) = server
            .post(
                &format!("/sandboxes/{id}/exec"),
                json!({"command": "cat /workspace/kept.txt", "mode": "shell"}),
            )
            .await;
        assert_eq!(status, 200, "forget_records={forget_records}: {body}");
        assert_eq!(body["stdout"], "kept\n", "{body}");
        // The new init got the sandbox's cgroup again, and so do commands.
        let (status, body) = server
            .post(
                &format!("/sandboxes/{id}/exec"),
                json!({"command": "cat /proc/1/cgroup /proc/self/cgroup", "mode": "shell"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let cgroups = body["stdout"].as_str().unwrap_or_default();
        let memory = format!(":memory:/stacyvm/{id}\n");
        let unified = format!("0::/stacyvm/{id}\n");
        assert_eq!(
            cgroups.matches(&memory).count() + cgroups.matches(&unified).count(),
            2,
            "{body}"
        );
    }
    let store = store_of(dir.path()).await;
    assert_eq!(record(&store, &id).await.state, "running");
    server.destroy(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_command_cut_off_at_shutdown_does_not_live_on() {
    if !docker_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let env = [
        ("STACYVM_PROVIDERS_DEFAULT", "docker"),
        ("STACYVM_LIFECYCLE_SHUTDOWN_TIMEOUT", "1s"),
    ];
    let mut server = ServerProcess::start(dir.path(), &env, None).await;
    let id = server.spawn(json!({"image": docker_image()})).await;
    let http = server.http.clone();
    let exec_url = server.url(&format!("/sandboxes/{id}/exec"));
    let exec = tokio::spawn(async move {
        http.post(exec_url)
            .json(&json!({"command": "sleep 77", "mode": "shell"}))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    let top = || {
        let out = Command::new("docker")
            .args(["top", &format!("stacyvm-{id}")])
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !top().contains("sleep 77") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the command never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.signal(rustix::process::Signal::TERM);
    assert!(server.wait_exit(Duration::from_secs(30)).await.success());
    let answered = exec.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!matches!(answered, Ok(200)), "{answered:?}");
    // The sandbox stays for adoption; the command does not.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while top().contains("sleep 77") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the command lives on:\n{}",
            top()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        top().contains(stacyvm::provider::agent::AGENT_PATH),
        "the sandbox itself must stay:\n{}",
        top()
    );
    let store = store_of(dir.path()).await;
    let executions = store
        .executions_of(std::slice::from_ref(&id))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(executions[0].status, "interrupted", "{executions:?}");
    docker(&["rm", "-f", &format!("stacyvm-{id}")]);
}

// ---------------------------------------------------------------------------
// MicroVMs (qemu): the cases that make sense for a VM
// ---------------------------------------------------------------------------

/// The settings of a server whose sandboxes are microVMs, or `None`
/// without a test kernel (skipped, unless strict).
fn qemu_env() -> Option<Vec<(&'static str, String)>> {
    let kernel = crate::support::require_env("STACYVM_TEST_KERNEL")?;
    Some(vec![
        ("STACYVM_PROVIDERS_DEFAULT", "qemu".to_string()),
        ("STACYVM_PROVIDERS_QEMU_KERNEL", kernel),
        // VMs boot under TCG here, beside the rest of the suite.
        ("STACYVM_PROVIDERS_QEMU_BOOT_TIMEOUT", "180s".to_string()),
    ])
}

/// An in-process server whose sandboxes are microVMs.
async fn qemu_server() -> Option<TestServer> {
    let kernel = crate::support::require_env("STACYVM_TEST_KERNEL")?;
    let server = TestServer::start(|c| {
        c.providers.default = "qemu".into();
        c.providers.qemu.kernel = kernel.into();
        c.providers.qemu.boot_timeout = stacyvm::duration::GoDuration(Duration::from_secs(180));
        c.lifecycle.reconcile_interval = stacyvm::duration::GoDuration(Duration::from_millis(300));
    })
    .await;
    stacyvm::app::image_store(server.app_service.config())
        .import(&docker_image(), &crate::support::rootfs_tarball())
        .unwrap_or_else(|e| panic!("import: {e}"));
    Some(server)
}

fn qemu_dir(data_dir: &Path, id: &str) -> std::path::PathBuf {
    data_dir.join("sandboxes/qemu").join(id)
}

/// Waits (up to 10 s) until no host process mentions `id` (a native
/// keeper, a VM's QEMU: both name their sandbox).
async fn until_no_process_mentions(id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !crate::providers::host_processes_with(id).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "processes left: {:?}",
            crate::providers::host_processes_with(id)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_sandbox_and_its_processes_survive_kill_9_of_the_server() {
    let Some(env) = qemu_env() else { return };
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    import_native_image(dir.path());
    let mut server = ServerProcess::start(dir.path(), &env, None).await;
    let id = server.spawn(json!({"image": docker_image()})).await;
    server
        .shell(
            &id,
            "sleep 300 >/dev/null 2>&1 & echo $! > /tmp/bg; echo kept > /workspace/f",
        )
        .await;
    server.signal(rustix::process::Signal::KILL);
    let exit = server.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(exit.signal(), Some(9));

    // The VM ran on without its server; the next one reaches it again.
    let server = ServerProcess::start(dir.path(), &env, None).await;
    assert_eq!(
        server
            .shell(&id, "kill -0 $(cat /tmp/bg) && cat /workspace/f")
            .await,
        "kept\n"
    );
    let store = store_of(dir.path()).await;
    assert_eq!(record(&store, &id).await.state, "running");
    server.destroy(&id).await;
    until_no_process_mentions(&id).await;
    assert!(!qemu_dir(dir.path(), &id).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_vm_killed_behind_its_back_is_reported_and_cleaned_up() {
    let Some(server) = qemu_server().await else {
        return;
    };
    let (id, mut ws) = docker_sandbox_with_events(&server, json!({"image": docker_image()})).await;
    let vm = qemu_dir(server.data_dir.path(), &id);
    let pid: i32 = std::fs::read_to_string(vm.join("qemu.pid"))
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let pid = rustix::process::Pid::from_raw(pid).unwrap_or_else(|| panic!("pid"));
    rustix::process::kill_process(pid, rustix::process::Signal::KILL)
        .unwrap_or_else(|e| panic!("kill: {e}"));
    assert_failed_with(&server, &mut ws, &id, "no longer running").await;
    until_no_process_mentions(&id).await;
    assert!(!vm.exists(), "its directory is left");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_vm_whose_agent_ends_is_reported_and_cleaned_up() {
    let Some(server) = qemu_server().await else {
        return;
    };
    let (id, mut ws) = docker_sandbox_with_events(&server, json!({"image": docker_image()})).await;
    // PID 1 of the VM is its agent: SIGTERM ends it, and with it the VM.
    let (status, body) = server
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "kill 1; sleep 5", "mode": "shell"}),
        )
        .await;
    eprintln!("exec that ended the agent: {status} {body}");
    assert_failed_with(&server, &mut ws, &id, "no longer running").await;
    until_no_process_mentions(&id).await;
    assert!(!qemu_dir(server.data_dir.path(), &id).exists());
    server.stop().await;
}
