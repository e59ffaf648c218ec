//! A highly available control plane with real processes: a private
//! PostgreSQL (Debian's packages, restartable by this test), two `stacyvm
//! serve` replicas and two `stacyvm worker` processes on loopback.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{Value, json};

use crate::graphql::Ws;
use crate::support::require_env;
use crate::workers::WorkerProcess;

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");
const ADMIN: &str = "ha-admin-secret";

/// A PostgreSQL server of its own, so the test may restart it.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    bindir: String,
    port: u16,
}

impl PrivatePostgres {
    fn start() -> PrivatePostgres {
        let bindir = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL from Debian's packages")
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("initdb")
            .display()
            .to_string();
        let parent = std::env::var("STACYVM_TEST_TMPDIR").unwrap_or_else(|_| "/tmp".into());
        let dir = tempfile::tempdir_in(parent).expect("tempdir");
        let status = Command::new("chown")
            .args(["postgres:", &dir.path().display().to_string()])
            .status()
            .expect("chown");
        assert!(status.success());
        let out = as_postgres(&format!("{bindir}/initdb"))
            .args([
                "-D",
                &data(&dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ])
            .output()
            .expect("initdb");
        assert!(out.status.success(), "initdb: {out:?}");
        let pg = PrivatePostgres {
            port: free_port(),
            dir,
            bindir,
        };
        pg.pg_ctl("start");
        pg
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, action: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let log = format!("{}/postgres.log", self.dir.path().display());
        let out = as_postgres(&format!("{}/pg_ctl", self.bindir))
            .args([
                "-D",
                &data(&self.dir),
                "-l",
                &log,
                "-w",
                "-t",
                "30",
                "-m",
                "fast",
                "-o",
                &options,
                action,
            ])
            .output()
            .expect("pg_ctl");
        assert!(out.status.success(), "pg_ctl {action}: {out:?}");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let out = as_postgres(&format!("{}/pg_ctl", self.bindir))
            .args(["-D", &data(&self.dir), "-m", "immediate", "-w", "stop"])
            .output();
        if let Err(e) = out {
            eprintln!("stopping the private PostgreSQL: {e}");
        }
    }
}

fn data(dir: &tempfile::TempDir) -> String {
    format!("{}/data", dir.path().display())
}

fn as_postgres(program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", program]);
    c.stdin(Stdio::null());
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A `stacyvm serve` process; SIGKILLed when dropped.
struct Replica {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    http: reqwest::Client,
}

const CONFIG: &str = r#"
server:
  host: 127.0.0.1
providers:
  default: native
worker:
  local: false
defaults:
  max_sandboxes_per_owner: 10
auth:
  admin_api_key: ha-admin-secret
  worker_tokens:
    w1: token-one
    w2: token-two
lifecycle:
  heartbeat_interval: 200ms
  reconcile_interval: 300ms
  reaper_interval: 200ms
  worker_stale_after: 3s
cluster:
  replica_stale_after: 2s
"#;

impl Replica {
    fn start(db: &str) -> Replica {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("stacyvm.yaml"), CONFIG).expect("config");
        Self::start_in(dir, db, free_port())
    }

    fn start_in(dir: tempfile::TempDir, db: &str, port: u16) -> Replica {
        let child = Command::new(BIN)
            .arg("--config")
            .arg(dir.path().join("stacyvm.yaml"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--database-url", db, "serve", "--port", &port.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.path().join("serve.log"))
                    .expect("log"),
            )
            .spawn()
            .expect("spawn stacyvm serve");
        Replica {
            child,
            dir,
            port,
            http: reqwest::Client::new(),
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn kill(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("kill replica: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("wait replica: {e}");
        }
    }

    /// SIGKILL, then a new process on the same data dir (same replica id)
    /// and port (where its workers heartbeat).
    fn restart(mut self, db: &str) -> Replica {
        self.kill();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        Replica::start_in(dir, db, self.port)
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base()))
            .timeout(Duration::from_secs(60));
        req = if key == ADMIN {
            req.header("X-Admin-API-Key", key)
        } else {
            req.header("X-API-Key", key)
        };
        if let Some(body) = body {
            req = req.json(&body);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    async fn get(&self, path: &str, key: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, key, None).await
    }

    async fn post(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, key, Some(body))
            .await
    }

    async fn delete(&self, path: &str, key: &str) -> (u16, Value) {
        self.request(reqwest::Method::DELETE, path, key, None).await
    }

    async fn graphql(&self, key: &str, query: &str, variables: Value) -> Value {
        let resp = self
            .http
            .post(format!("{}/graphql", self.base()))
            .header("X-API-Key", key)
            .json(&json!({"query": query, "variables": variables}))
            .send()
            .await
            .expect("graphql");
        resp.json().await.expect("graphql json")
    }

    async fn health(&self) -> Value {
        self.get("/health", ADMIN).await.1
    }

    async fn wait_healthy(&self) {
        let started = Instant::now();
        loop {
            if let (200, _) = self.get("/health", ADMIN).await {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "replica did not start:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ws(&self, key: &str) -> Ws {
        let url = format!("ws://127.0.0.1:{}/graphql/ws", self.port);
        Ws::connect_url_with(&url, json!({"X-API-Key": key})).await
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 100 ms until it holds, for at most `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn create_key(replica: &Replica, db: &str, owner: &str) -> String {
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(replica.dir.path())
        .args(["--database-url", db, "keys", "create", "--owner", owner])
        .output()
        .expect("stacyvm keys create");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn leaders(replicas: &[&Replica]) -> Vec<String> {
    let mut out = Vec::new();
    for r in replicas {
        let h = r.health().await;
        if h["leader"] == true {
            out.push(h["replica_id"].as_str().unwrap_or_default().to_string());
        }
    }
    out
}

async fn workers_seen(replica: &Replica, key: &str) -> usize {
    let (_, body) = replica.get("/workers", key).await;
    body.as_array()
        .map(|ws| {
            ws.iter()
                .filter(|w| (w["id"] == "w1" || w["id"] == "w2") && w["stale"] == false)
                .count()
        })
        .unwrap_or(0)
}

async fn spawn(replica: &Replica, key: &str, ttl: &str) -> String {
    let (status, body) = replica
        .post(
            "/sandboxes",
            key,
            json!({"image": crate::support::docker_image(), "ttl": ttl}),
        )
        .await;
    assert_eq!(status, 201, "{body}\n{}", replica.log_tail());
    body["id"].as_str().expect("id").to_string()
}

const LINES: &str = "for i in 1 2 3 4 5; do echo line$i; sleep 0.3; done";

/// Output lines and the exit code an `execOutput` subscription received.
async fn followed(ws: &mut Ws, id: &str, execution: &str) -> (String, Option<i64>) {
    ws.subscribe(
        id,
        "subscription($e: ID!) { execOutput(executionId: $e) { __typename ... on OutputChunk { data } ... on ExecExit { exitCode } } }",
        json!({"e": execution}),
    )
    .await;
    let mut text = String::new();
    let mut exit = None;
    for payload in ws.collect(id).await {
        let event = &payload["execOutput"];
        match event["__typename"].as_str() {
            Some("OutputChunk") => text.push_str(event["data"].as_str().unwrap_or_default()),
            Some("ExecExit") => exit = event["exitCode"].as_i64(),
            _ => panic!("unexpected {payload}"),
        }
    }
    (text, exit)
}

async fn start_exec(replica: &Replica, key: &str, sandbox: &str) -> String {
    let data = replica
        .graphql(
            key,
            "mutation($s: ID!, $c: String!) { startExec(sandboxId: $s, input: {command: $c}) { id } }",
            json!({"s": sandbox, "c": LINES}),
        )
        .await;
    data["data"]["startExec"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("startExec: {data}"))
        .to_string()
}

/// Waits for a `sandboxEvents` message saying `sandbox` reached `state`.
async fn saw_state(ws: &mut Ws, sub: &str, sandbox: &str, state: &str) {
    loop {
        let message = ws.recv().await;
        assert_ne!(message["type"], "error", "{message}");
        if message["id"] != sub {
            continue;
        }
        let event = &message["payload"]["data"]["sandboxEvents"];
        if event["sandboxId"] == sandbox && event["state"] == state {
            return;
        }
    }
}

const EVENTS: &str = "subscription { sandboxEvents { sandboxId state } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_postgres_act_as_one_control_plane() {
    if require_env("STACYVM_TEST_ROOTFS").is_none() {
        return;
    }
    let pg = PrivatePostgres::start();
    let db = pg.url();
    let a = Replica::start(&db);
    let b = Replica::start(&db);
    a.wait_healthy().await;
    b.wait_healthy().await;

    // Identity: every replica has its own id, exactly one leads.
    let (ha, hb) = (a.health().await, b.health().await);
    assert_ne!(ha["replica_id"], hb["replica_id"], "{ha} {hb}");
    assert!(
        ha["replica_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("rp-"))
    );
    eventually("exactly one leader", Duration::from_secs(10), || async {
        leaders(&[&a, &b]).await.len() == 1
    })
    .await;
    let (_, listed) = a.get("/admin/replicas", ADMIN).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");

    // Shared secrets: a key made with the CLI (through neither replica)
    // works on both, and at once.
    let alice = create_key(&a, &db, "alice");
    let bob = create_key(&b, &db, "bob");
    for r in [&a, &b] {
        assert_eq!(r.get("/sandboxes", &alice).await.0, 200);
        assert_eq!(r.get("/sandboxes", &bob).await.0, 200);
        assert_eq!(r.get("/sandboxes", "sk-wrong").await.0, 401);
        // Replica listings are for admins, on both surfaces.
        assert_eq!(r.get("/admin/replicas", &alice).await.0, 403);
        let gql = r
            .graphql(&alice, "{ replicas { id endpoint } }", json!({}))
            .await;
        assert_eq!(gql["errors"][0]["extensions"]["code"], "FORBIDDEN", "{gql}");
        assert!(
            gql["data"].is_null() || gql["data"]["replicas"].is_null(),
            "{gql}"
        );
    }

    // The route between replicas takes only the cluster's token: no API
    // key, worker token or forged one opens it.
    let internal = format!("{}/internal/v1/executions/ex-1/output", a.base());
    for auth in [
        None,
        Some(ADMIN),
        Some("Bearer token-one"),
        Some("Bearer x.y.z"),
    ] {
        let mut req = a.http.get(&internal);
        if let Some(value) = auth {
            req = req
                .header("Authorization", value)
                .header("X-Admin-API-Key", value);
        }
        let status = req.send().await.map(|r| r.status().as_u16()).unwrap_or(0);
        assert_eq!(status, 401, "{auth:?}");
    }

    // Workers heartbeat to one replica each; both replicas know both.
    let w1 = WorkerProcess::start(&a.base(), "w1", "token-one");
    let w2 = WorkerProcess::start(&b.base(), "w2", "token-two");
    for r in [&a, &b] {
        eventually(
            "both workers online on both replicas",
            Duration::from_secs(20),
            || async { workers_seen(r, &alice).await == 2 },
        )
        .await;
    }

    // Exact admission: 50 spawns at once, split over the replicas, against
    // a cap of 10 per owner.
    let attempts = (0..50).map(|i| {
        let r = if i % 2 == 0 { &a } else { &b };
        let key = alice.clone();
        async move {
            r.post(
                "/sandboxes",
                &key,
                json!({"image": crate::support::docker_image()}),
            )
            .await
        }
    });
    let results = join_all(attempts).await;
    let admitted: Vec<String> = results
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, b)| b["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let refused = results.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!(admitted.len(), 10, "{results:?}");
    assert_eq!(refused, 40, "{results:?}");
    let (_, mine) = b.get("/sandboxes", &alice).await;
    assert_eq!(mine.as_array().map(Vec::len), Some(10), "{mine}");
    for (i, id) in admitted.iter().enumerate() {
        let r = if i % 2 == 0 { &b } else { &a };
        assert_eq!(r.delete(&format!("/sandboxes/{id}"), &alice).await.0, 200);
    }

    // Placement through A uses w2 too, which only B hears from (once
    // every replica counted the destroys above).
    w1.wait_for_sandbox_dirs(0).await;
    w2.wait_for_sandbox_dirs(0).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let sandbox = spawn(&a, &bob, "10m").await;
    let second = spawn(&a, &bob, "10m").await;
    w1.wait_for_sandbox_dirs_at_least(1).await;
    w2.wait_for_sandbox_dirs_at_least(1).await;
    assert_eq!(a.delete(&format!("/sandboxes/{second}"), &bob).await.0, 200);

    // Live output across replicas: a command started through B, followed
    // from the start through A.
    let execution = start_exec(&b, &bob, &sandbox).await;
    let mut ws_a = a.ws(&bob).await;
    let (text, exit) = followed(&mut ws_a, "out", &execution).await;
    assert_eq!(text, "line1\nline2\nline3\nline4\nline5\n");
    assert_eq!(exit, Some(0));
    // Another owner cannot follow it, on either replica.
    let mut ws_alice = a.ws(&alice).await;
    ws_alice
        .subscribe(
            "x",
            "subscription($e: ID!) { execOutput(executionId: $e) { __typename } }",
            json!({"e": execution}),
        )
        .await;
    let refused = ws_alice.recv().await;
    assert_eq!(
        refused["payload"]["errors"][0]["extensions"]["code"], "NOT_FOUND",
        "{refused}"
    );

    // State events cross replicas: watched on A, destroyed through B.
    let other = spawn(&b, &bob, "10m").await;
    ws_a.subscribe("ev", EVENTS, json!({})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.delete(&format!("/sandboxes/{other}"), &bob).await.0, 200);
    saw_state(&mut ws_a, "ev", &other, "DESTROYED").await;

    // Losing a replica loses nothing: B's subscription goes on, B takes the
    // background work over, and sandboxes made through A still answer.
    let mut ws_b = b.ws(&bob).await;
    ws_b.subscribe("ev", EVENTS, json!({})).await;
    let running = spawn(&a, &bob, "10m").await;
    let mut a = a;
    a.kill();
    let b_id = hb["replica_id"].as_str().unwrap_or_default().to_string();
    eventually("B leads after A died", Duration::from_secs(15), || async {
        leaders(&[&b]).await == [b_id.clone()]
    })
    .await;
    let (status, out) = b
        .post(
            &format!("/sandboxes/{running}/exec"),
            &bob,
            json!({"command": "echo still here"}),
        )
        .await;
    assert_eq!(
        (status, out["stdout"].as_str()),
        (200, Some("still here\n")),
        "{out}"
    );
    assert_eq!(
        b.delete(&format!("/sandboxes/{running}"), &bob).await.0,
        200
    );
    saw_state(&mut ws_b, "ev", &running, "DESTROYED").await;

    // A comes back under the same id and follows, B keeps leading.
    let a = a.restart(&db);
    a.wait_healthy().await;
    let again = a.health().await;
    assert_eq!(again["replica_id"], ha["replica_id"]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(leaders(&[&a, &b]).await, [b_id]);

    // Expiry with both replicas running: each sandbox destroyed once, with
    // one expiry in the audit trail.
    let mut expiring = Vec::new();
    for i in 0..4 {
        let r = if i % 2 == 0 { &a } else { &b };
        expiring.push(spawn(r, &alice, "2s").await);
    }
    for id in &expiring {
        let started = Instant::now();
        loop {
            let (status, body) = a.get(&format!("/sandboxes/{id}"), &alice).await;
            if status == 404 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{id} not destroyed: {body}\nA:\n{}\nB:\n{}",
                a.log_tail(),
                b.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for id in &expiring {
        let (_, audit) = a
            .get(
                &format!("/admin/audit?action=sandbox.expire&target={id}"),
                ADMIN,
            )
            .await;
        assert_eq!(audit.as_array().map(Vec::len), Some(1), "{id}: {audit}");
    }

    // PostgreSQL restarted under the running replicas: /ready says so while
    // it is down, and both recover without a restart.
    pg.pg_ctl("stop");
    for r in [&a, &b] {
        let (status, _) = r.get("/ready", ADMIN).await;
        assert_eq!(status, 503);
    }
    pg.pg_ctl("start");
    for r in [&a, &b] {
        eventually(
            "ready again after PostgreSQL restarted",
            Duration::from_secs(30),
            || async { r.get("/ready", ADMIN).await.0 == 200 },
        )
        .await;
    }
    let mut ws_a = a.ws(&bob).await;
    ws_a.subscribe("ev", EVENTS, json!({})).await;
    // The event channel reconnects in its own time: poll with fresh
    // sandboxes until one destroyed through B is seen on A.
    let after = spawn(&b, &bob, "10m").await;
    eventually(
        "a spawn through A works after the restart",
        Duration::from_secs(20),
        || async {
            a.post(
                &format!("/sandboxes/{after}/exec"),
                &bob,
                json!({"command": "true"}),
            )
            .await
            .0 == 200
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(b.delete(&format!("/sandboxes/{after}"), &bob).await.0, 200);
    saw_state(&mut ws_a, "ev", &after, "DESTROYED").await;
    let (status, body) = a.delete(&format!("/sandboxes/{sandbox}"), &bob).await;
    assert_eq!(
        status,
        200,
        "{body}\nA:\n{}\nB:\n{}",
        a.log_tail(),
        b.log_tail()
    );

    // Nothing left on the workers.
    w1.wait_for_sandbox_dirs(0).await;
    w2.wait_for_sandbox_dirs(0).await;
    drop(b);
    drop(a);
}

#[tokio::test]
async fn a_second_serve_on_one_sqlite_database_refuses_to_start() {
    let first = crate::support::TestServer::start(|_| {}).await;
    let serve = |data_dir: &std::path::Path, db: Option<String>| {
        let mut c = Command::new(BIN);
        c.arg("--data-dir").arg(data_dir);
        if let Some(db) = db {
            c.args(["--database-url", &db]);
        }
        c.args(["serve", "--port", "0"])
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .output()
            .expect("stacyvm serve")
    };
    // Its own data dir, the first one's SQLite database.
    let other = tempfile::tempdir().expect("tempdir");
    let db = format!(
        "sqlite://{}?mode=rwc",
        first.data_dir.path().join("stacyvm.db").display()
    );
    let out = serve(other.path(), Some(db));
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SQLite serves one replica"), "{stderr}");
    assert!(stderr.contains("PostgreSQL"), "{stderr}");
    // The same data dir (whatever the database): one replica id twice.
    let out = serve(first.data_dir.path(), None);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs its own --data-dir"), "{stderr}");
    // Tools that are not servers still work beside it.
    let keys = Command::new(BIN)
        .arg("--data-dir")
        .arg(first.data_dir.path())
        .args(["keys", "list"])
        .output()
        .expect("stacyvm keys list");
    assert!(keys.status.success(), "{keys:?}");
    // The first one is untouched; after it stops, a new one starts.
    assert_eq!(first.get("/health").await.0, 200);
    let dir = first.stop().await;
    let second = crate::support::TestServer::start_in(dir, |_| {}).await;
    assert_eq!(second.get("/health").await.0, 200);
}

#[tokio::test]
async fn the_key_pepper_rotates_without_downtime() {
    let server =
        crate::support::TestServer::start(|c| c.auth.key_pepper = "pepper-one".into()).await;
    let key = crate::support::key(&server, "carol", stacyvm::auth::Role::Owner).await;
    let dir = server.stop().await;
    // The new pepper alone: the old key is unknown.
    let server =
        crate::support::TestServer::start_in(dir, |c| c.auth.key_pepper = "pepper-two".into())
            .await;
    let status = |server: &crate::support::TestServer, key: String| {
        let req = server
            .http
            .get(server.url("/sandboxes"))
            .header("X-API-Key", key);
        async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
    };
    assert_eq!(status(&server, key.clone()).await, 401);
    let dir = server.stop().await;
    // New first, old still accepted: the key works and is rehashed...
    let server = crate::support::TestServer::start_in(dir, |c| {
        c.auth.key_pepper = "pepper-two".into();
        c.auth.previous_key_peppers = vec!["pepper-one".into()];
    })
    .await;
    assert_eq!(status(&server, key.clone()).await, 200);
    let dir = server.stop().await;
    // ...so once the old pepper is dropped, it still works.
    let server =
        crate::support::TestServer::start_in(dir, |c| c.auth.key_pepper = "pepper-two".into())
            .await;
    assert_eq!(status(&server, key).await, 200);
}
