//! Multi-worker mode with real processes: a control plane without a local
//! worker (in this test process) and `stacyvm worker` processes on
//! loopback ports with their own data dirs and the native provider.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use stacyvm::worker::token::{Audience, WorkerAuth, WorkerCredentials};

use crate::support::{TestServer, docker_image, rootfs_tarball};

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");

/// How a worker process is started.
#[derive(Clone)]
struct WorkerOptions {
    /// `--listen`.
    listen: String,
    /// `--provider`, comma-separated.
    providers: String,
    /// Runs inside this network namespace (`ip netns add` name).
    netns: Option<String>,
    /// More flags (`--label`, `--max-sandboxes`).
    extra: Vec<String>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            listen: "127.0.0.1:0".into(),
            providers: "native".into(),
            netns: None,
            extra: Vec::new(),
        }
    }
}

/// A `stacyvm worker` process; SIGKILLed when dropped.
pub(crate) struct WorkerProcess {
    id: String,
    child: Child,
    data_dir: tempfile::TempDir,
    options: WorkerOptions,
}

impl WorkerProcess {
    pub(crate) fn start(control_plane: &str, id: &str, token: &str) -> WorkerProcess {
        Self::start_with(control_plane, id, token, WorkerOptions::default())
    }

    fn start_with(
        control_plane: &str,
        id: &str,
        token: &str,
        options: WorkerOptions,
    ) -> WorkerProcess {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let imported = Command::new(BIN)
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["image", "import", &docker_image()])
            .arg(rootfs_tarball())
            .output()
            .expect("stacyvm image import");
        assert!(imported.status.success(), "{imported:?}");
        Self::start_in(data_dir, control_plane, id, token, options)
    }

    /// SIGKILLs the process and starts it again on the same data dir.
    fn restart(mut self, control_plane: &str, token: &str) -> WorkerProcess {
        self.kill();
        let data_dir = std::mem::replace(&mut self.data_dir, tempfile::tempdir().expect("tempdir"));
        Self::start_in(
            data_dir,
            control_plane,
            &self.id,
            token,
            self.options.clone(),
        )
    }

    fn kill(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("worker {}: kill: {e}", self.id);
        }
        if let Err(e) = self.child.wait() {
            eprintln!("worker {}: wait: {e}", self.id);
        }
    }

    fn start_in(
        data_dir: tempfile::TempDir,
        control_plane: &str,
        id: &str,
        token: &str,
        options: WorkerOptions,
    ) -> WorkerProcess {
        let mut command = match &options.netns {
            // Only the network namespace: `ip netns exec` would also
            // remount /sys, hiding the cgroup mounts. nsenter execs the
            // program, so the child is the worker.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = command
            .arg("--data-dir")
            .arg(data_dir.path())
            .args([
                "worker",
                "--control-plane",
                control_plane,
                "--listen",
                &options.listen,
                "--id",
                id,
                "--token",
                token,
                "--provider",
                &options.providers,
            ])
            .args(&options.extra)
            .env("STACYVM_LIFECYCLE_HEARTBEAT_INTERVAL", "200ms")
            .env("STACYVM_LIFECYCLE_HEALTH_INTERVAL", "1s")
            .env("STACYVM_PROVIDERS_NATIVE_HELPER_BINARY", BIN)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(data_dir.path().join("worker.log"))
                    .expect("worker log"),
            )
            .spawn()
            .expect("spawn stacyvm worker");
        WorkerProcess {
            id: id.to_string(),
            child,
            data_dir,
            options,
        }
    }

    /// The end of the worker's log, for failure messages.
    fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.data_dir.path().join("worker.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits (bounded) until at least `count` native sandbox directories
    /// exist.
    pub(crate) async fn wait_for_sandbox_dirs_at_least(&self, count: usize) {
        let started = Instant::now();
        while self.sandbox_dirs().len() < count {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "wanted {count}: {:?}",
                self.sandbox_dirs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (bounded) until `count` native sandbox directories are left.
    pub(crate) async fn wait_for_sandbox_dirs(&self, count: usize) {
        let started = Instant::now();
        while self.sandbox_dirs().len() != count {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "wanted {count}: {:?}",
                self.sandbox_dirs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Native sandbox directories left on this worker.
    fn sandbox_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.data_dir.path().join("sandboxes/native"))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| name.starts_with("sb-"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) async fn control_plane() -> TestServer {
    TestServer::start(|c| {
        c.worker.local = false;
        c.providers.default = "native".into();
        c.auth.worker_tokens.insert("w1".into(), "token-one".into());
        c.auth.worker_tokens.insert("w2".into(), "token-two".into());
        c.lifecycle.heartbeat_interval = stacyvm::duration::GoDuration(Duration::from_millis(200));
        c.lifecycle.worker_stale_after = stacyvm::duration::GoDuration(Duration::from_secs(1));
    })
    .await
}

/// Heartbeats and reconcile passes every 200 ms, a worker stale after 1 s
/// and lost after `lost_ms`: worker loss in seconds, for tests.
fn quick_loss(c: &mut stacyvm::config::Config, lost_ms: u64) {
    let ms = |n| stacyvm::duration::GoDuration(Duration::from_millis(n));
    c.lifecycle.heartbeat_interval = ms(200);
    c.lifecycle.reconcile_interval = ms(200);
    c.lifecycle.worker_stale_after = ms(1000);
    c.lifecycle.worker_lost_after = ms(lost_ms);
}

pub(crate) fn base(server: &TestServer) -> String {
    server.url("").trim_end_matches("/api/v1").to_string()
}

/// Waits until the control plane lists `ids` as online workers.
pub(crate) async fn wait_for_workers(server: &TestServer, ids: &[&str]) {
    let started = Instant::now();
    loop {
        let (_, body) = server.get("/workers").await;
        let listed: Vec<Value> = body.as_array().cloned().unwrap_or_default();
        if ids.iter().all(|id| listed.iter().any(|w| w["id"] == *id)) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "workers {ids:?} did not register: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Spawns a sandbox and starts a background process in it (its pid in
/// `/tmp/pid`), for tests that check it survives.
async fn sandbox_with_a_background_process(server: &TestServer) -> String {
    let (status, body) = server
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    let (_, body) = server
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "sleep 1000 >/dev/null 2>&1 & echo $! > /tmp/pid", "mode": "shell"}),
        )
        .await;
    assert_eq!(body["exit_code"], 0, "{body}");
    id
}

/// Asks whether that process still runs: stdout `alive` when it does.
async fn background_process_check(server: &TestServer, id: &str) -> (u16, Value) {
    server
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "kill -0 $(cat /tmp/pid) && echo alive", "mode": "shell"}),
        )
        .await
}

/// The RPC addresses the control plane recorded, by worker id.
async fn endpoints(server: &TestServer) -> Vec<String> {
    server
        .app_service
        .store()
        .list_workers()
        .await
        .expect("workers")
        .into_iter()
        .map(|w| w.endpoint)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_spread_over_remote_workers_and_work_the_same() {
    let server = control_plane().await;
    let cp = base(&server);
    let w1 = WorkerProcess::start(&cp, "w1", "token-one");
    let w2 = WorkerProcess::start(&cp, "w2", "token-two");
    wait_for_workers(&server, &["w1", "w2"]).await;
    let endpoints = endpoints(&server).await;
    assert!(
        endpoints.iter().all(|e| e.starts_with("http://127.0.0.1:")),
        "{endpoints:?}"
    );
    let (_, providers) = server.get("/providers").await;
    assert!(
        providers.as_array().is_some_and(|p| p
            .iter()
            .any(|p| p["name"] == "native" && p["healthy"] == true)),
        "{providers}"
    );

    let mut ids = Vec::new();
    for _ in 0..4 {
        let (status, body) = server
            .post("/sandboxes", json!({"image": docker_image()}))
            .await;
        assert_eq!(status, 201, "{body}");
        ids.push((
            body["id"].as_str().expect("id").to_string(),
            body["worker_id"].as_str().expect("worker").to_string(),
        ));
    }
    let on = |w: &str| ids.iter().filter(|(_, worker)| worker == w).count();
    assert_eq!((on("w1"), on("w2")), (2, 2), "{ids:?}");
    assert_eq!(w1.sandbox_dirs().len(), 2);
    assert_eq!(w2.sandbox_dirs().len(), 2);

    for (id, worker) in &ids {
        // Exec, argv intact, exit code, stderr.
        let (status, body) = server
            .post(
                &format!("/sandboxes/{id}/exec"),
                json!({"command": "sh", "args": ["-c", "echo \"$1\"; echo err >&2; exit 3", "sh", "a  b"]}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (&body["stdout"], &body["stderr"], &body["exit_code"]),
            (&json!("a  b\n"), &json!("err\n"), &json!(3)),
            "{worker}: {body}"
        );
        // Files: write, read back, list.
        let files = format!("/sandboxes/{id}/files");
        write_and_read_back(
            &server,
            id,
            "/workspace/hello.txt",
            "from the control plane\n",
        )
        .await;
        let (status, _) = server
            .get(&format!("{files}?path=/workspace/missing"))
            .await;
        assert_eq!(status, 404);
        let (status, body) = server
            .get(&format!("/sandboxes/{id}/files/list?path=/workspace"))
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(body.to_string().contains("hello.txt"), "{body}");
    }

    // Streaming: NDJSON lines arrive from the remote worker in order.
    let (id, _) = &ids[0];
    let resp = server
        .http
        .post(server.url(&format!("/sandboxes/{id}/exec")))
        .json(&json!({"command": "for i in 1 2 3; do echo line$i; done", "mode": "shell", "stream": true}))
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.expect("body");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("ndjson"))
        .collect();
    let stdout: String = lines
        .iter()
        .filter(|l| l["stream"] == "stdout")
        .filter_map(|l| l["data"].as_str())
        .collect();
    assert_eq!(stdout, "line1\nline2\nline3\n", "{text}");

    // A command's timeout is enforced on the worker.
    let started = Instant::now();
    let (status, body) = server
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "sleep 30", "mode": "shell", "timeout": "1s"}),
        )
        .await;
    assert!(started.elapsed() < Duration::from_secs(10), "{body}");
    assert!(status == 200 || status == 408, "{status} {body}");

    for (id, _) in &ids {
        let (status, body) = server.delete(&format!("/sandboxes/{id}")).await;
        assert!(status < 300, "{body}");
    }
    assert!(w1.sandbox_dirs().is_empty(), "{:?}", w1.sandbox_dirs());
    assert!(w2.sandbox_dirs().is_empty(), "{:?}", w2.sandbox_dirs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_credentials_are_checked_both_ways() {
    let server = control_plane().await;
    let cp = base(&server);
    let beat = |id: &str, endpoint: &str| {
        json!({
            "id": id, "endpoint": endpoint, "hostname": "h", "version": "0",
            "snapshot": {"providers": [], "max_vcpus": 1}
        })
    };
    let heartbeat = |token: Option<String>, body: Value| {
        let mut req = server
            .http
            .post(format!("{cp}/api/v1/workers/heartbeat"))
            .json(&body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send()
    };
    let now = jsonwebtoken::get_current_timestamp();
    let to_cp = Audience::ControlPlane;
    // Forged (wrong secret, another worker's secret), for another worker,
    // expired, for the other direction, the raw secret, none: 401 alike.
    for (token, id, case) in [
        (Some(signed("w1", "wrong", to_cp)), "w1", "wrong secret"),
        (Some(signed("w1", "token-two", to_cp)), "w1", "w2's secret"),
        (None, "w1", "no token"),
        (
            Some(signed("w9", "token-one", to_cp)),
            "w9",
            "unknown worker",
        ),
        (Some(signed("w2", "token-one", to_cp)), "w1", "w2's token"),
        (
            Some(expired("w1", "token-one", to_cp, now)),
            "w1",
            "expired",
        ),
        (
            Some(signed("w1", "token-one", Audience::Worker)),
            "w1",
            "audience",
        ),
        (Some("token-one".to_string()), "w1", "raw secret"),
    ] {
        let resp = heartbeat(token, beat(id, "http://127.0.0.1:1"))
            .await
            .expect("send");
        assert_eq!(resp.status().as_u16(), 401, "{case}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["code"], "UNAUTHORIZED", "{body}");
    }
    let (_, workers) = server.get("/workers").await;
    assert_eq!(workers, json!([]), "a refused worker was registered");
    let good = || Some(signed("w1", "token-one", to_cp));
    // Malformed JSON is a clear 400, not a 500.
    let resp = server
        .http
        .post(format!("{cp}/api/v1/workers/heartbeat"))
        .bearer_auth(signed("w1", "token-one", to_cp))
        .header("content-type", "application/json")
        .body("{\"id\": \"w1\", \"snapshot\": [")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["code"], "BAD_REQUEST", "{body}");
    // An oversized heartbeat is refused before it is parsed.
    let mut big = beat("w1", "http://127.0.0.1:1");
    big["hostname"] = json!("x".repeat(100 * 1024));
    let resp = heartbeat(None, big).await.expect("send");
    assert!(resp.status().is_client_error(), "{}", resp.status());
    // Labels a worker claims are checked like any client input.
    let mut labelled = beat("w1", "http://127.0.0.1:1");
    labelled["snapshot"]["labels"] = json!({"bad key\n": "x"});
    let resp = heartbeat(good(), labelled).await.expect("send");
    assert_eq!(resp.status().as_u16(), 400);
    let mut many = beat("w1", "http://127.0.0.1:1");
    many["snapshot"]["labels"] = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let resp = heartbeat(good(), many).await.expect("send");
    assert_eq!(resp.status().as_u16(), 400);
    let (_, workers) = server.get("/workers").await;
    assert_eq!(
        workers,
        json!([]),
        "a worker with bad labels was registered"
    );
    // A bad endpoint is a clear 400.
    for endpoint in [
        "http://127.0.0.1:1/steer?x=",
        "http://0.0.0.0:1",
        "file:///etc",
    ] {
        let resp = heartbeat(good(), beat("w1", endpoint)).await.expect("send");
        assert_eq!(resp.status().as_u16(), 400, "{endpoint}");
    }

    // A real worker registers; another process claiming its id from
    // another address is refused while the first is alive.
    let w1 = WorkerProcess::start(&cp, "w1", "token-one");
    wait_for_workers(&server, &["w1"]).await;
    let endpoint = endpoints(&server).await.remove(0);
    let resp = heartbeat(good(), beat("w1", "http://127.0.0.1:2"))
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 409);

    // The worker's RPC refuses the same kinds of bad credentials.
    let to_worker = Audience::Worker;
    let rpc_with = |token: Option<String>| {
        let mut req = reqwest::Client::new()
            .post(format!("{endpoint}/rpc/v1/snapshot"))
            .json(&json!(null));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send()
    };
    for (token, case) in [
        (None, "no token"),
        (Some(signed("w1", "token-two", to_worker)), "w2's secret"),
        (Some(signed("w2", "token-one", to_worker)), "another worker"),
        (Some(expired("w1", "token-one", to_worker, now)), "expired"),
        (Some(signed("w1", "token-one", to_cp)), "audience"),
        (Some("token-one".to_string()), "raw secret"),
    ] {
        let resp = rpc_with(token).await.expect("rpc");
        assert_eq!(resp.status().as_u16(), 401, "{case}");
    }
    let resp = rpc_with(Some(signed("w1", "token-one", to_worker)))
        .await
        .expect("rpc");
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["ok"]["providers"][0]["name"], "native", "{body}");
    drop(w1);
}

/// A spawn when no worker can take it says why; a call on a worker that
/// was killed with -9 answers that the worker is unreachable; restarted, the
/// worker adopts its sandbox and the control plane reaches it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_reachable_worker_calls_say_so() {
    let server = control_plane().await;
    let (status, body) = server
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "UNAVAILABLE", "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("no worker") && m.contains("stacyvm worker")),
        "{body}"
    );

    let cp = base(&server);
    let w1 = WorkerProcess::start(&cp, "w1", "token-one");
    wait_for_workers(&server, &["w1"]).await;
    let id = sandbox_with_a_background_process(&server).await;
    let mut w1 = w1;
    w1.kill();
    let (status, body) = server
        .post(&format!("/sandboxes/{id}/exec"), json!({"command": "true"}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("w1") && m.contains("unreachable")),
        "{body}"
    );
    // Back on another port: it adopts the sandbox, whose background
    // process still runs, and the control plane follows the new address.
    let w1 = w1.restart(&cp, "token-one");
    let started = Instant::now();
    let out = loop {
        let (status, body) = background_process_check(&server, &id).await;
        if status == 200 {
            break body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(out["stdout"], "alive\n", "{out}");
    assert_eq!(w1.sandbox_dirs().len(), 1);
    let (status, body) = server.delete(&format!("/sandboxes/{id}")).await;
    assert!(status < 300, "{body}");
    assert!(w1.sandbox_dirs().is_empty());
}

/// A control-plane restart does not disturb a worker: its sandbox keeps
/// running (a background process in it survives), and the restarted
/// control plane reaches it at once from what its store knew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restart_leaves_remote_sandboxes_running() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let tweak = move |c: &mut stacyvm::config::Config| {
        c.server.port = port;
        c.worker.local = false;
        c.providers.default = "native".into();
        c.auth.worker_tokens.insert("w1".into(), "token-one".into());
    };
    let server = TestServer::start(tweak).await;
    let cp = base(&server);
    let w1 = WorkerProcess::start(&cp, "w1", "token-one");
    wait_for_workers(&server, &["w1"]).await;
    let id = sandbox_with_a_background_process(&server).await;
    // A spawn the control plane was driving when it stopped: its record
    // is `creating`, and the worker made the runtime after all.
    let cut = "sb-0c0ffee0";
    crate::support::insert_record(&server, cut, "w1", "native", "creating", None).await;
    let endpoint = endpoints(&server).await.remove(0);
    let spawned = rpc(
        &endpoint,
        "token-one",
        "spawn",
        json!({
            "provider": "native",
            "spec": {"sandbox_id": cut, "image": docker_image(), "memory_mb": 64, "vcpus": 1, "disk_mb": 64},
            "lease": 1,
        }),
    )
    .await;
    assert!(spawned.get("ok").is_some(), "{spawned}");

    let data_dir = server.stop().await;
    let server = TestServer::start_in(data_dir, tweak).await;
    // The interrupted spawn is not left lying `creating`: it fails with
    // the reason, and its runtime is removed from the worker.
    let record = server
        .wait_for_state(cut, "destroyed", Duration::from_secs(20))
        .await;
    let reason = record.state_reason.unwrap_or_default();
    assert!(
        reason.contains("server restarted while the sandbox was creating"),
        "{reason}"
    );
    w1.wait_for_sandbox_dirs(1).await;
    let (status, body) = background_process_check(&server, &id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stdout"], "alive\n", "{body}");
    let (_, body) = server.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(body["state"], "running", "{body}");
    assert_eq!(w1.sandbox_dirs().len(), 1);
    let (status, body) = server.delete(&format!("/sandboxes/{id}")).await;
    assert!(status < 300, "{body}");
    assert!(w1.sandbox_dirs().is_empty());
}

/// Worker loss, told truthfully: a worker killed with -9 mid-command ends
/// the command `interrupted`; its sandbox turns `unhealthy` ("worker w1
/// unreachable since ...") once the worker is stale, then `error` ("lost:
/// ...") once it is lost. When the worker comes back, the lost sandbox's
/// runtime is destroyed on it: nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_is_reported_then_cleaned_up_when_it_returns() {
    let server = TestServer::start(|c| {
        c.worker.local = false;
        c.providers.default = "native".into();
        c.auth.worker_tokens.insert("w1".into(), "token-one".into());
        quick_loss(c, 3000);
    })
    .await;
    let cp = base(&server);
    let mut w1 = WorkerProcess::start(&cp, "w1", "token-one");
    wait_for_workers(&server, &["w1"]).await;
    let (status, body) = server
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_string();

    // A command in flight when the worker dies.
    let exec = {
        let http = server.http.clone();
        let url = server.url(&format!("/sandboxes/{id}/exec"));
        tokio::spawn(async move {
            http.post(url)
                .json(&json!({"command": "sleep 60", "mode": "shell"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    w1.kill();
    let status = exec.await.expect("join").expect("answer");
    assert!(status >= 500, "exec answered {status}");
    let executions = server
        .app_service
        .store()
        .executions_of(std::slice::from_ref(&id))
        .await
        .expect("executions");
    assert_eq!(executions.len(), 1);
    assert_eq!(executions[0].status, "interrupted", "{:?}", executions[0]);

    let record = server
        .wait_for_state(&id, "unhealthy", Duration::from_secs(10))
        .await;
    let reason = record.state_reason.unwrap_or_default();
    assert!(
        reason.starts_with("worker w1 unreachable since "),
        "{reason}"
    );
    let record = server
        .wait_for_state(&id, "error", Duration::from_secs(10))
        .await;
    let reason = record.state_reason.unwrap_or_default();
    assert!(
        reason.starts_with("lost: worker w1 unreachable since "),
        "{reason}"
    );
    let (_, workers) = server.get("/workers").await;
    assert_eq!(workers[0]["status"], "offline", "{workers}");
    assert_eq!(workers[0]["stale"], true, "{workers}");
    assert_eq!(
        w1.sandbox_dirs().len(),
        1,
        "the runtime is still on the dead worker"
    );

    // Back: the lost sandbox is destroyed on it.
    let w1 = w1.restart(&cp, "token-one");
    server
        .wait_for_state(&id, "destroyed", Duration::from_secs(20))
        .await;
    let (_, workers) = server.get("/workers").await;
    assert_eq!(workers[0]["status"], "online", "{workers}");
    w1.wait_for_sandbox_dirs(0).await;
    // It was destroyed under a reclaimed lease: whatever still carries
    // the generation from before the loss is refused by the worker.
    let store = server.app_service.store();
    let lease = store.lease(&id).await.expect("lease").expect("kept");
    assert_eq!(lease.generation, 2, "{lease:?}");
    assert!(lease.released_at.is_some(), "{lease:?}");
    let handle = store
        .get_sandbox(&id)
        .await
        .expect("record")
        .and_then(|r| r.runtime_id)
        .expect("handle");
    let endpoint = endpoints(&server).await.remove(0);
    let stale = rpc(
        &endpoint,
        "token-one",
        "call",
        json!({"runtime": runtime(&id, &handle, 1), "call": "inspect"}),
    )
    .await;
    assert_eq!(stale["err"]["kind"], "fenced", "{stale}");
}

/// Writes a file into a sandbox over REST and reads it back unchanged.
async fn write_and_read_back(server: &TestServer, id: &str, path: &str, content: &str) {
    let files = format!("/sandboxes/{id}/files");
    let (status, body) = server
        .post(&files, json!({"path": path, "content": content}))
        .await;
    assert_eq!(status, 200, "{body}");
    let resp = server
        .http
        .get(server.url(&format!("{files}?path={path}")))
        .send()
        .await
        .expect("read");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.text().await.expect("text"), content);
}

/// The worker's RPC address once it registered anew after a restart.
async fn endpoint_after_restart(server: &TestServer, before: &str) -> String {
    let started = Instant::now();
    loop {
        let now = endpoints(server).await.remove(0);
        if now != before {
            return now;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "not back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A signed token for worker `id` with `secret`, as the other end makes it.
fn signed(id: &str, secret: &str, audience: Audience) -> String {
    WorkerCredentials::new(id, secret, WorkerAuth::Signed).bearer(audience)
}

/// The same, but issued five minutes before `now` (long expired).
fn expired(id: &str, secret: &str, audience: Audience, now: u64) -> String {
    WorkerCredentials::new(id, secret, WorkerAuth::Signed).bearer_issued_at(audience, now - 300)
}

/// One RPC to a worker, as the control plane sends it: the JSON answer.
async fn rpc(endpoint: &str, secret: &str, operation: &str, body: Value) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("{endpoint}/rpc/v1/{operation}"))
        .bearer_auth(signed("w1", secret, Audience::Worker))
        .json(&body)
        .send()
        .await
        .expect("rpc");
    assert_eq!(resp.status().as_u16(), 200, "{operation}");
    resp.json().await.expect("json")
}

fn runtime(sandbox_id: &str, runtime_id: &str, lease: u64) -> Value {
    json!({
        "sandbox_id": sandbox_id,
        "provider": "native",
        "runtime_id": runtime_id,
        "lease": lease,
    })
}

/// Retried spawns make one runtime: at the worker (the same spawn RPC
/// twice at once, and again later) and at the API (the same
/// `Idempotency-Key`, over REST and GraphQL). A worker refuses operations
/// carrying a lease generation older than the newest it has seen, and a
/// late spawn of a sandbox it destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_spawns_make_one_runtime_and_stale_leases_are_fenced_off() {
    let server = control_plane().await;
    let cp = base(&server);
    let w1 = WorkerProcess::start(&cp, "w1", "token-one");
    wait_for_workers(&server, &["w1"]).await;
    let endpoint = endpoints(&server).await.remove(0);

    // The worker: one spawn sent twice at once, and once more after.
    let id = "sb-0fe11ce0";
    let spawn = json!({
        "provider": "native",
        "spec": {"sandbox_id": id, "image": docker_image(), "memory_mb": 64, "vcpus": 1, "disk_mb": 64},
        "lease": 1,
    });
    let (a, b) = tokio::join!(
        rpc(&endpoint, "token-one", "spawn", spawn.clone()),
        rpc(&endpoint, "token-one", "spawn", spawn.clone())
    );
    let handle = a["ok"]["runtime_id"].as_str().expect("spawned").to_string();
    assert_eq!(b["ok"]["runtime_id"], handle, "{a} {b}");
    let c = rpc(&endpoint, "token-one", "spawn", spawn.clone()).await;
    assert_eq!(c["ok"]["runtime_id"], handle, "{c}");
    assert_eq!(w1.sandbox_dirs(), [id], "one runtime");

    // Generation 3 moves the fence: 2 is refused, 3 passes.
    let inspect = |lease: u64| json!({"runtime": runtime(id, &handle, lease), "call": "inspect"});
    let ok = rpc(&endpoint, "token-one", "call", inspect(3)).await;
    assert!(ok.get("ok").is_some(), "{ok}");
    let stale = rpc(&endpoint, "token-one", "call", inspect(2)).await;
    assert_eq!(stale["err"]["kind"], "fenced", "{stale}");
    let message = stale["err"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("seen generation 3"), "{message}");
    let exec = reqwest::Client::new()
        .post(format!("{endpoint}/rpc/v1/exec"))
        .bearer_auth(signed("w1", "token-one", Audience::Worker))
        .json(&json!({
            "runtime": runtime(id, &handle, 1),
            "spec": {"argv": ["touch", "/tmp/stale"], "env": {}, "workdir": null, "timeout": {"secs": 10, "nanos": 0}},
        }))
        .send()
        .await
        .expect("exec")
        .text()
        .await
        .expect("frames");
    assert!(exec.contains("\"fenced\""), "{exec}");

    // Destroyed at 3: a spawn delayed from before cannot bring it back.
    let destroyed = rpc(
        &endpoint,
        "token-one",
        "call",
        json!({"runtime": runtime(id, &handle, 3), "call": "destroy"}),
    )
    .await;
    assert!(destroyed.get("ok").is_some(), "{destroyed}");
    let late = rpc(&endpoint, "token-one", "spawn", spawn.clone()).await;
    assert_eq!(late["err"]["kind"], "fenced", "{late}");
    assert!(w1.sandbox_dirs().is_empty(), "{:?}", w1.sandbox_dirs());
    // ... and the worker remembers across kill -9.
    let w1 = w1.restart(&cp, "token-one");
    let endpoint = endpoint_after_restart(&server, &endpoint).await;
    let late = rpc(&endpoint, "token-one", "spawn", spawn).await;
    assert_eq!(late["err"]["kind"], "fenced", "{late}");
    // A spawn retried across a kill -9 of the worker finds the runtime
    // the first attempt made.
    let kept = "sb-0fe11ce1";
    let spawn = json!({
        "provider": "native",
        "spec": {"sandbox_id": kept, "image": docker_image(), "memory_mb": 64, "vcpus": 1, "disk_mb": 64},
        "lease": 1,
    });
    let first = rpc(&endpoint, "token-one", "spawn", spawn.clone()).await;
    let first = first["ok"]["runtime_id"]
        .as_str()
        .expect("spawned")
        .to_string();
    let w1 = w1.restart(&cp, "token-one");
    let endpoint = endpoint_after_restart(&server, &endpoint).await;
    let retried = rpc(&endpoint, "token-one", "spawn", spawn).await;
    assert_eq!(retried["ok"]["runtime_id"], first.as_str(), "{retried}");
    assert_eq!(w1.sandbox_dirs(), [kept], "one runtime");
    let destroyed = rpc(
        &endpoint,
        "token-one",
        "call",
        json!({"runtime": runtime(kept, &first, 1), "call": "destroy"}),
    )
    .await;
    assert!(destroyed.get("ok").is_some(), "{destroyed}");

    // The API: one key, one sandbox, however often and however sent.
    let body = json!({"image": docker_image()});
    let send = |key: &str, body: &Value| {
        server
            .http
            .post(server.url("/sandboxes"))
            .header("Idempotency-Key", key)
            .json(body)
            .send()
    };
    let (x, y) = tokio::join!(send("job-17", &body), send("job-17", &body));
    let (x, y) = (x.expect("send"), y.expect("send"));
    assert_eq!((x.status().as_u16(), y.status().as_u16()), (201, 201));
    let (x, y): (Value, Value) = (x.json().await.expect("json"), y.json().await.expect("json"));
    assert_eq!(x["id"], y["id"], "{x} {y}");
    assert_eq!(x["state"], "running", "{x}");
    let sandbox = x["id"].as_str().expect("id").to_string();
    let later: Value = send("job-17", &body)
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(later["id"], sandbox.as_str());
    let (_, gql) = server
        .post_graphql(
            "mutation($k: String) { spawnSandbox(input: {image: \"%IMAGE%\", idempotencyKey: $k}) { id } }"
                .replace("%IMAGE%", &docker_image())
                .as_str(),
            json!({"k": "job-17"}),
        )
        .await;
    assert_eq!(gql["data"]["spawnSandbox"]["id"], sandbox.as_str(), "{gql}");
    let (_, list) = server.get("/sandboxes").await;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(w1.sandbox_dirs(), [sandbox.as_str()]);
    let lease = server
        .app_service
        .store()
        .lease(&sandbox)
        .await
        .expect("lease")
        .expect("held");
    assert_eq!((lease.generation, lease.worker_id.as_str()), (1, "w1"));

    // The same key for another spawn, and malformed keys: clear refusals.
    let other = send(
        "job-17",
        &json!({"image": docker_image(), "memory_mb": 128}),
    )
    .await
    .expect("send");
    assert_eq!(other.status().as_u16(), 409);
    let other: Value = other.json().await.expect("json");
    assert_eq!(other["code"], "CONFLICT", "{other}");
    for key in ["x".repeat(256), "has space".to_string(), String::new()] {
        let resp = send(&key, &body).await.expect("send");
        assert_eq!(resp.status().as_u16(), 400, "{key:?}");
    }
    let (_, list) = server.get("/sandboxes").await;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    // Destroyed, the key is spent: a retry says so instead of a new sandbox.
    let (status, _) = server.delete(&format!("/sandboxes/{sandbox}")).await;
    assert_eq!(status, 200);
    let spent = send("job-17", &body).await.expect("send");
    assert_eq!(spent.status().as_u16(), 409);
    let lease = server
        .app_service
        .store()
        .lease(&sandbox)
        .await
        .expect("lease")
        .expect("kept");
    assert!(lease.released_at.is_some(), "{lease:?}");
}

/// Cordon, drain and uncordon over REST, GraphQL and the CLI: a cordoned
/// or draining worker takes nothing new, a spawn nothing can take says
/// why, and `stacyvm workers drain --wait` returns once the worker's
/// sandboxes are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordoned_and_draining_workers_take_no_new_sandboxes() {
    let server = control_plane().await;
    let cp = base(&server);
    let w1 = WorkerProcess::start(&cp, "w1", "token-one");
    let w2 = WorkerProcess::start(&cp, "w2", "token-two");
    wait_for_workers(&server, &["w1", "w2"]).await;

    let (status, worker) = server.post("/admin/workers/w1/cordon", json!(null)).await;
    assert_eq!(status, 200, "{worker}");
    assert_eq!(worker["admin_state"], "cordoned", "{worker}");
    let mut placed = Vec::new();
    for _ in 0..3 {
        let (status, body) = server
            .post("/sandboxes", json!({"image": docker_image()}))
            .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["worker_id"], "w2", "placed on a cordoned worker");
        placed.push(body["id"].as_str().expect("id").to_string());
    }

    // Drain w2 from the CLI and wait; nothing can take a sandbox now.
    let mut drain = Command::new(BIN)
        .args([
            "workers",
            "--server",
            &cp,
            "drain",
            "w2",
            "--wait",
            "--timeout",
            "60s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stacyvm workers drain");
    let started = Instant::now();
    loop {
        let (_, w) = server.get("/admin/workers/w2").await;
        if w["admin_state"] == "draining" {
            assert_eq!(w["sandboxes"], 3, "{w}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{w}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = server
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "UNAVAILABLE");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("cordoned or draining (w1, w2)"),
        "{message}"
    );
    assert!(
        drain.try_wait().expect("poll").is_none(),
        "drain returned early"
    );
    for id in &placed {
        let (status, _) = server.delete(&format!("/sandboxes/{id}")).await;
        assert_eq!(status, 200);
    }
    let out = tokio::task::spawn_blocking(move || drain.wait_with_output())
        .await
        .expect("join")
        .expect("drain output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("worker w2 is drained"), "{stdout}");

    // GraphQL: uncordon w1, and new sandboxes go there again.
    let (_, gql) = server
        .post_graphql(
            "mutation { uncordonWorker(id: \"w1\") { id adminState sandboxes } }",
            json!({}),
        )
        .await;
    assert_eq!(
        gql["data"]["uncordonWorker"]["adminState"], "active",
        "{gql}"
    );
    let (status, body) = server
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["worker_id"], "w1");

    // Unknown workers: 404 over REST, an extension code over GraphQL,
    // an error exit from the CLI.
    let (status, body) = server.post("/admin/workers/w9/drain", json!(null)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("NOT_FOUND")),
        "{body}"
    );
    let (_, gql) = server
        .post_graphql("mutation { cordonWorker(id: \"w9\") { id } }", json!({}))
        .await;
    assert_eq!(gql["errors"][0]["extensions"]["code"], "NOT_FOUND", "{gql}");
    let out = Command::new(BIN)
        .args(["workers", "--server", &cp, "cordon", "w9"])
        .output()
        .expect("stacyvm workers cordon");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("worker w9 not found"),
        "{out:?}"
    );
    // The audit trail names each action.
    let (_, audit) = server.get("/admin/audit?target=w1").await;
    let actions: Vec<&str> = audit
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"worker.cordon"), "{audit}");
    assert!(actions.contains(&"worker.uncordon"), "{audit}");
    drop((w1, w2));
}

/// A network namespace joined to this one by a veth pair, removed when
/// dropped: a worker inside it can be cut off from the control plane and
/// reconnected, a real network partition on one host.
struct Netns {
    name: String,
    inner_link: String,
    /// The host side's address (the control plane binds it).
    host_ip: String,
    /// The namespace side's address (the worker listens on it).
    ns_ip: String,
}

impl Netns {
    fn create() -> Netns {
        let tag = std::process::id() % 100_000;
        let subnet = 20 + tag % 200;
        let ns = Netns {
            name: format!("svm-part-{tag}"),
            inner_link: format!("svn{tag}"),
            host_ip: format!("10.231.{subnet}.1"),
            ns_ip: format!("10.231.{subnet}.2"),
        };
        let outer = format!("svh{tag}");
        // Left over by a run that was killed.
        let _cleanup = Command::new("ip").args(["netns", "del", &ns.name]).output();
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &outer,
            "type",
            "veth",
            "peer",
            "name",
            &ns.inner_link,
        ]);
        ip(&["link", "set", &ns.inner_link, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{}/30", ns.host_ip), "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        ns.exec_ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.ns_ip),
            "dev",
            &ns.inner_link,
        ]);
        ns.exec_ip(&["link", "set", &ns.inner_link, "up"]);
        ns.exec_ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn exec_ip(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Cuts the namespace off (`false`) or reconnects it (`true`).
    fn connect(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        self.exec_ip(&["link", "set", &self.inner_link, state]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes both ends of the veth pair.
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            other => eprintln!("ip netns del {}: {other:?}", self.name),
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// A worker in its own network namespace is partitioned from the control
/// plane: a short partition makes its sandbox `unhealthy` and, healed,
/// `running` again with its processes intact (the lease was still held);
/// a partition past `worker_lost_after` loses the sandbox, and when the
/// network heals its runtime is destroyed under a reclaimed lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_worker_is_unhealthy_then_heals_or_is_lost() {
    let net = Netns::create();
    let admin = "partition-test-admin-key";
    let mut server = TestServer::start(|c| {
        // Reachable from the namespace; beyond loopback, so keys are on.
        c.server.host = net.host_ip.clone();
        c.auth.admin_api_key = admin.into();
        c.worker.local = false;
        c.providers.default = "native".into();
        c.auth.worker_tokens.insert("w1".into(), "token-one".into());
        quick_loss(c, 6000);
    })
    .await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-admin-api-key", admin.parse().expect("header"));
    server.http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client");
    let cp = base(&server);
    assert!(cp.contains(&net.host_ip), "{cp}");
    let options = WorkerOptions {
        listen: format!("{}:0", net.ns_ip),
        netns: Some(net.name.clone()),
        ..WorkerOptions::default()
    };
    let w1 = WorkerProcess::start_with(&cp, "w1", "token-one", options);
    let started = Instant::now();
    loop {
        let (_, body) = server.get("/workers").await;
        if body.as_array().is_some_and(|w| !w.is_empty()) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "w1 did not register from its namespace: {body}\n{}",
            w1.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = sandbox_with_a_background_process(&server).await;

    // A short partition: unhealthy, then healed.
    net.connect(false);
    let cut = Instant::now();
    let record = server
        .wait_for_state(&id, "unhealthy", Duration::from_secs(30))
        .await;
    eprintln!("unhealthy {:?} after the cut", cut.elapsed());
    assert!(
        cut.elapsed() < Duration::from_secs(10),
        "{:?}",
        cut.elapsed()
    );
    let reason = record.state_reason.unwrap_or_default();
    assert!(
        reason.starts_with("worker w1 unreachable since "),
        "{reason}"
    );
    let started = Instant::now();
    let (status, body) = background_process_check(&server, &id).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("UNAVAILABLE")),
        "{body}"
    );
    // The worker is out of reach: the call gives up at once, not after
    // its timeout on a connection that will never answer.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    net.connect(true);
    server
        .wait_for_state(&id, "running", Duration::from_secs(15))
        .await;
    let (status, body) = background_process_check(&server, &id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stdout"], "alive\n", "the sandbox did not survive");
    let store = server.app_service.store();
    let lease = store.lease(&id).await.expect("lease").expect("held");
    assert_eq!(lease.generation, 1, "{lease:?}");
    assert!(lease.released_at.is_none(), "{lease:?}");

    // A long one: lost, and cleaned up when the network heals.
    net.connect(false);
    let record = server
        .wait_for_state(&id, "error", Duration::from_secs(20))
        .await;
    let reason = record.state_reason.unwrap_or_default();
    assert!(
        reason.starts_with("lost: worker w1 unreachable since "),
        "{reason}"
    );
    assert_eq!(w1.sandbox_dirs().len(), 1, "destroyed while unreachable");
    net.connect(true);
    server
        .wait_for_state(&id, "destroyed", Duration::from_secs(20))
        .await;
    w1.wait_for_sandbox_dirs(0).await;
    let lease = store.lease(&id).await.expect("lease").expect("kept");
    assert_eq!(
        lease.generation, 2,
        "destroyed under a reclaimed lease: {lease:?}"
    );
    let (_, workers) = server.get("/workers").await;
    assert_eq!(workers[0]["status"], "online", "{workers}");
    drop(w1);
    drop(net);
}

/// Docker sandboxes on a remote worker: placed there, exec and files
/// through the worker's RPC, removed with the sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_sandboxes_run_on_a_remote_worker() {
    if std::env::var_os("STACYVM_TEST_DOCKER").is_none() {
        eprintln!("skipped: STACYVM_TEST_DOCKER is not set");
        return;
    }
    let server = TestServer::start(|c| {
        c.worker.local = false;
        c.providers.default = "docker".into();
        c.auth.worker_tokens.insert("w1".into(), "token-one".into());
        c.lifecycle.heartbeat_interval = stacyvm::duration::GoDuration(Duration::from_millis(200));
    })
    .await;
    let cp = base(&server);
    let options = WorkerOptions {
        providers: "docker".into(),
        ..WorkerOptions::default()
    };
    let w1 = WorkerProcess::start_with(&cp, "w1", "token-one", options);
    wait_for_workers(&server, &["w1"]).await;
    let (status, body) = server
        .post(
            "/sandboxes",
            json!({"image": docker_image(), "provider": "docker"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (body["worker_id"].as_str(), body["provider"].as_str()),
        (Some("w1"), Some("docker"))
    );
    let id = body["id"].as_str().expect("id").to_string();
    let container = format!("stacyvm-{id}");
    let inspect = |name: &str| {
        Command::new("docker")
            .args(["inspect", "-f", "{{.State.Running}}", name])
            .output()
            .expect("docker inspect")
    };
    let out = inspect(&container);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "true",
        "{out:?}"
    );
    assert_eq!(server.shell(&id, "echo hi; id -u").await, "hi\n0\n");
    write_and_read_back(&server, &id, "/root/note", "through a remote worker\n").await;
    assert_eq!(
        server.shell(&id, "cat /root/note").await,
        "through a remote worker\n"
    );
    let (status, _) = server.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(status, 200);
    let out = inspect(&container);
    assert!(
        !out.status.success(),
        "the container outlived its sandbox: {out:?}"
    );
    drop(w1);
}

/// Placement honours what workers say they are and can take: a spawn or
/// template asking for labels lands on a worker carrying them, a worker
/// at its `--max-sandboxes` takes nothing more, and when nothing fits the
/// answer says why, over REST and GraphQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_follows_worker_labels_and_limits() {
    let server = control_plane().await;
    let cp = base(&server);
    let with = |flags: &[&str]| WorkerOptions {
        extra: flags.iter().map(|f| f.to_string()).collect(),
        ..WorkerOptions::default()
    };
    let w1 = WorkerProcess::start_with(
        &cp,
        "w1",
        "token-one",
        with(&["--label", "zone=eu", "--max-sandboxes", "1"]),
    );
    let w2 = WorkerProcess::start_with(&cp, "w2", "token-two", with(&["--label", "zone=us"]));
    wait_for_workers(&server, &["w1", "w2"]).await;
    let (_, workers) = server.get("/admin/workers").await;
    assert_eq!(workers[0]["labels"], json!({"zone": "eu"}), "{workers}");

    // Admission checks reserve nothing: many of them leave w1's one slot.
    for _ in 0..5 {
        let (status, body) = server
            .post(
                "/sandboxes/admission",
                json!({"image": docker_image(), "worker_labels": {"zone": "eu"}}),
            )
            .await;
        assert_eq!(
            (status, body["allowed"].as_bool()),
            (200, Some(true)),
            "{body}"
        );
    }
    let eu = json!({"image": docker_image(), "worker_labels": {"zone": "eu"}});
    let (status, body) = server.post("/sandboxes", eu.clone()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["worker_id"], "w1");
    let (status, body) = server.post("/sandboxes", eu).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("UNAVAILABLE")),
        "{body}"
    );
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("max_sandboxes (w1)"), "{message}");

    // A template's labels.
    let (status, body) = server
        .post(
            "/templates",
            json!({"name": "us-only", "image": docker_image(), "worker_labels": {"zone": "us"}}),
        )
        .await;
    assert!((200..300).contains(&status), "{status} {body}");
    let (_, template) = server.get("/templates/us-only").await;
    assert_eq!(
        template["worker_labels"],
        json!({"zone": "us"}),
        "{template}"
    );
    for _ in 0..2 {
        let (status, body) = server.post("/templates/us-only/spawn", json!({})).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["worker_id"], "w2", "{body}");
    }

    // Nothing carries the label; a malformed one is the client's mistake.
    let (_, gql) = server
        .post_graphql(
            "mutation($l: JSON) { spawnSandbox(input: {workerLabels: $l}) { id } }",
            json!({"l": {"zone": "mars"}}),
        )
        .await;
    assert_eq!(
        gql["errors"][0]["extensions"]["code"], "UNAVAILABLE",
        "{gql}"
    );
    let msg = gql["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("labels zone=mars"), "{msg}");
    let (status, body) = server
        .post("/sandboxes", json!({"worker_labels": {"bad key": "x"}}))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("BAD_REQUEST")),
        "{body}"
    );
    let (_, list) = server.get("/sandboxes").await;
    assert_eq!(list.as_array().map(Vec::len), Some(3), "{list}");
    drop((w1, w2));
}

/// A client that hangs up on a streamed command: the command runs to its
/// end and its record says how it ended, whether the sandbox is on the
/// in-process worker or on a remote one (the same body runs both ways).
async fn a_client_that_hangs_up_leaves_its_command_running(server: &TestServer, id: &str) {
    let mut resp = server
        .http
        .post(server.url(&format!("/sandboxes/{id}/exec")))
        .json(&json!({
            "command": "echo first; sleep 1; echo second > /tmp/after; echo done",
            "mode": "shell",
            "stream": true,
        }))
        .send()
        .await
        .expect("exec");
    assert_eq!(resp.status().as_u16(), 200);
    let first = resp.chunk().await.expect("chunk").expect("a first line");
    assert!(
        String::from_utf8_lossy(&first).contains("first"),
        "{first:?}"
    );
    drop(resp);
    let store = server.app_service.store();
    let started = Instant::now();
    let record = loop {
        let records = store
            .executions_of(&[id.to_string()])
            .await
            .expect("executions");
        if let Some(done) = records.into_iter().find(|r| r.status != "running") {
            break done;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (record.status.as_str(), record.exit_code),
        ("completed", Some(0)),
        "{record:?}"
    );
    assert!(record.stdout_tail.ends_with("done\n"), "{record:?}");
    assert_eq!(server.shell(id, "cat /tmp/after").await, "second\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_affects_local_and_remote_commands_alike() {
    // In process.
    let local = crate::support::native_server(|_| {}).await;
    let (status, body) = local
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    a_client_that_hangs_up_leaves_its_command_running(&local, &id).await;
    // On a remote worker.
    let server = control_plane().await;
    let w1 = WorkerProcess::start(&base(&server), "w1", "token-one");
    wait_for_workers(&server, &["w1"]).await;
    let (status, body) = server
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert_eq!(
        (status, body["worker_id"].as_str()),
        (201, Some("w1")),
        "{body}"
    );
    let id = body["id"].as_str().expect("id").to_string();
    a_client_that_hangs_up_leaves_its_command_running(&server, &id).await;
    drop(w1);
}

/// Terminals of sandboxes on a remote worker: the same round trip as in
/// process, through the worker's terminal WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_work_in_process_and_through_a_remote_worker() {
    let local = crate::support::native_server(|_| {}).await;
    let (status, body) = local
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    crate::terminals::terminal_round_trip(&local, None, &id).await;

    let server = control_plane().await;
    let w1 = WorkerProcess::start(&base(&server), "w1", "token-one");
    wait_for_workers(&server, &["w1"]).await;
    let (status, body) = server
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert_eq!(
        (status, body["worker_id"].as_str()),
        (201, Some("w1")),
        "{body}"
    );
    let id = body["id"].as_str().expect("id").to_string();
    crate::terminals::terminal_round_trip(&server, None, &id).await;
    drop(w1);
}
