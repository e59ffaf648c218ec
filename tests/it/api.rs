//! End-to-end tests of the REST API on a real server with real providers:
//! lifecycle, failures that must leave nothing behind, bad input, quotas,
//! concurrency and restart recovery.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{TestServer, docker_containers_for, docker_enabled, docker_image};

fn id_of(body: &Value) -> String {
    body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {body}"))
        .to_string()
}

async fn spawn_ok(server: &TestServer, body: Value) -> String {
    let (status, sandbox) = server.post("/sandboxes", body).await;
    assert_eq!(status, 201, "{sandbox}");
    assert_eq!(sandbox["state"], "running");
    id_of(&sandbox)
}

/// A server whose native provider has the test image imported.
async fn native_server(tweak: impl FnOnce(&mut stacyvm::config::Config)) -> TestServer {
    crate::support::native_server(tweak).await
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["code"], want_code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_lifecycle_keeps_records_and_removes_containers() {
    if !docker_enabled() {
        return;
    }
    let server = TestServer::start(|c| c.providers.default = "docker".into()).await;
    let id = spawn_ok(
        &server,
        json!({"image": docker_image(), "memory_mb": 128, "metadata": {"team": "x"}}),
    )
    .await;
    assert!(stacyvm::ids::is_sandbox_id(&id));
    assert_eq!(docker_containers_for(&id).len(), 1);

    let (status, out) = server
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "echo", "args": ["a b", "$X"], "env": {"X": "y"}}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["stdout"], "a b $X\n");
    let (_, out) = server.post(&format!("/sandboxes/{id}/exec"), json!({"command": "/bin/sh", "args": ["-c", "echo $X"], "mode": "argv", "env": {"X": "y"}})).await;
    assert_eq!(out["stdout"], "y\n");

    // The execution is recorded with its exit code and output tail.
    let execution_id = out["execution_id"].as_str().unwrap_or_default().to_string();
    let record = server
        .app_service
        .store()
        .get_execution(&execution_id)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no execution row"));
    assert_eq!(
        (
            record.status.as_str(),
            record.exit_code,
            record.stdout_tail.as_str()
        ),
        ("completed", Some(0), "y\n")
    );

    // Limits reached the container.
    let inspect = std::process::Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{.HostConfig.Memory}} {{.HostConfig.SecurityOpt}} {{.HostConfig.CapDrop}}",
            &format!("stacyvm-{id}"),
        ])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let inspect = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.starts_with(&(128 * 1024 * 1024).to_string()),
        "{inspect}"
    );
    assert!(inspect.contains("no-new-privileges"), "{inspect}");

    let (status, _) = server.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(status, 200);
    assert!(
        docker_containers_for(&id).is_empty(),
        "container left behind"
    );
    let (status, body) = server.get(&format!("/sandboxes/{id}")).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let kept = server
        .app_service
        .store()
        .get_sandbox(&id)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("record must be kept"));
    assert_eq!(kept.state, "destroyed");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_image_is_a_clear_400_and_leaves_nothing() {
    if !docker_enabled() {
        return;
    }
    let server = TestServer::start(|c| c.providers.default = "docker".into()).await;
    let (status, body) = server
        .post("/sandboxes", json!({"image": "stacyvm-test:no-such-image"}))
        .await;
    assert_error(status, &body, 400, "BAD_REQUEST");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no-such-image"),
        "{body}"
    );
    let all = server
        .app_service
        .store()
        .list_sandboxes(&stacyvm::store::SandboxFilter {
            owner_id: None,
            states: Some(stacyvm::lifecycle::SandboxState::ALL.to_vec()),
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    assert!(all.is_empty(), "no record for a refused spawn: {all:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_that_fails_to_start_ends_in_error_then_is_cleaned_up() {
    if !docker_enabled() {
        return;
    }
    // An image with no /bin/sh: on the Engine API path (no agent as PID 1)
    // the container is created but cannot start.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("hello.txt"), "hi").unwrap_or_else(|e| panic!("{e}"));
    let tar = dir.path().join("empty.tar");
    let ok = std::process::Command::new("tar")
        .args([
            "-C",
            &dir.path().display().to_string(),
            "-cf",
            &tar.display().to_string(),
            "hello.txt",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "tar failed");
    let ok = std::process::Command::new("docker")
        .args([
            "import",
            &tar.display().to_string(),
            "stacyvm-test:no-shell",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "docker import failed");

    let server = TestServer::start(|c| {
        c.providers.default = "docker".into();
        c.providers.docker.direct_exec = false;
    })
    .await;
    let mut events = server.app_service.events().subscribe();
    let (status, body) = server
        .post("/sandboxes", json!({"image": "stacyvm-test:no-shell"}))
        .await;
    assert_error(status, &body, 400, "BAD_REQUEST");

    // The record went creating -> error (with the reason), and the reaper
    // then destroyed it; no container remains.
    let mut seen = Vec::new();
    let mut id = String::new();
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .map(|r| r.map(|j| j.event))
    {
        if let stacyvm::events::Event::SandboxState {
            sandbox_id,
            state,
            reason,
            ..
        } = event
        {
            id = sandbox_id;
            seen.push((state.as_str().to_string(), reason));
            if state == stacyvm::lifecycle::SandboxState::Destroyed {
                break;
            }
        }
    }
    let states: Vec<_> = seen.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        states,
        ["creating", "error", "destroying", "destroyed"],
        "{seen:?}"
    );
    assert!(
        seen[1]
            .1
            .as_deref()
            .unwrap_or_default()
            .contains("spawn failed"),
        "{seen:?}"
    );
    assert!(
        docker_containers_for(&id).is_empty(),
        "container left behind"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_destroys_and_extend_moves_expiry() {
    let server = native_server(|_| {}).await;
    let short = spawn_ok(&server, json!({"image": docker_image(), "ttl": "1s"})).await;
    let long = spawn_ok(&server, json!({"image": docker_image(), "ttl": "1s"})).await;
    let (status, body) = server
        .post(&format!("/sandboxes/{long}/extend"), json!({"ttl": "1h"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let expires =
        chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
    let from_now = expires.with_timezone(&chrono::Utc) - chrono::Utc::now();
    assert!(from_now > chrono::Duration::minutes(59), "{from_now}");

    let record = server
        .wait_for_state(&short, "destroyed", Duration::from_secs(10))
        .await;
    assert_eq!(record.state_reason.as_deref(), Some("ttl reached"));
    assert!(
        !server
            .data_dir
            .path()
            .join("sandboxes/native")
            .join(&short)
            .exists(),
        "sandbox dir left behind"
    );
    let (status, body) = server.get(&format!("/sandboxes/{long}")).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("running")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_4xx_errors() {
    let server = native_server(|c| c.server.max_body_bytes = 64 * 1024).await;
    let id = spawn_ok(&server, json!({"image": docker_image()})).await;
    let raw = |path: &str, body: &'static str| {
        let req = server
            .http
            .post(server.url(path))
            .header("content-type", "application/json")
            .body(body);
        async move {
            let resp = req.send().await.unwrap_or_else(|e| panic!("{e}"));
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, b) = raw("/sandboxes", "{not json").await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = raw("/sandboxes", r#"{"memory_mb": "lots"}"#).await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = server.post("/sandboxes", json!({"ttl": "banana"})).await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = server.post("/sandboxes", json!({"ttl": "100h"})).await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = server
        .post("/sandboxes", json!({"provider": "hyperv"}))
        .await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = server.post("/sandboxes", json!({"memory_mb": 1})).await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = server
        .post("/sandboxes", json!({"image": "not-imported:latest"}))
        .await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = server.post("/sandboxes", json!({"surprise": 1})).await;
    assert_error(s, &b, 400, "BAD_REQUEST");

    let exec = format!("/sandboxes/{id}/exec");
    let (s, b) = server
        .post(&exec, json!({"command": "ls", "mode": "bogus"}))
        .await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = server.post(&exec, json!({"command": ""})).await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = server
        .post(&exec, json!({"command": "ls", "timeout": "-1s"}))
        .await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = server
        .post(&exec, json!({"command": "ls", "timeout": "11m"}))
        .await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = server
        .post(&exec, json!({"command": "ls", "workdir": "relative"}))
        .await;
    assert_error(s, &b, 400, "BAD_REQUEST");

    for unknown in ["sb-00000000", "garbage", "sb-../../etc"] {
        let (s, b) = server
            .post(
                &format!("/sandboxes/{unknown}/exec"),
                json!({"command": "ls"}),
            )
            .await;
        assert_error(s, &b, 404, "NOT_FOUND");
    }
    let (s, b) = server
        .post(
            &format!("/sandboxes/{id}/files/chmod"),
            json!({"path": "/tmp", "mode": "rwx"}),
        )
        .await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = server
        .get(&format!("/sandboxes/{id}/files?path=/no/such/file"))
        .await;
    assert_error(s, &b, 404, "NOT_FOUND");
    let (s, b) = server.get(&format!("/sandboxes/{id}/logs?lines=abc")).await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = server
        .post(&format!("/sandboxes/{id}/extend"), json!({}))
        .await;
    assert_error(s, &b, 400, "BAD_REQUEST");
    let (s, b) = server.get("/no/such/route").await;
    assert_error(s, &b, 404, "NOT_FOUND");

    // A body over the limit is refused without reaching the sandbox.
    let big = "x".repeat(128 * 1024);
    let (s, b) = server
        .post(
            &format!("/sandboxes/{id}/files"),
            json!({"path": "/tmp/big", "content": big}),
        )
        .await;
    assert!((400..500).contains(&s), "{s} {b}");
    assert_eq!(b["code"], "BAD_REQUEST");

    // A path that climbs out stays inside the sandbox.
    let (s, _) = server
        .post(
            &format!("/sandboxes/{id}/files"),
            json!({"path": "/tmp/../../../stacyvm-escape-test", "content": "x"}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(
        !std::path::Path::new("/stacyvm-escape-test").exists(),
        "file escaped the sandbox"
    );
    let (s, b) = server
        .get(&format!("/sandboxes/{id}/files?path=/stacyvm-escape-test"))
        .await;
    assert_eq!((s, b), (200, Value::String("x".into())));

    // The sandbox still works after all that.
    let (s, b) = server.post(&exec, json!({"command": "echo ok"})).await;
    assert_eq!((s, b["stdout"].as_str()), (200, Some("ok\n")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_owner_quota_admits_exactly_the_limit_under_concurrency() {
    let server = native_server(|c| c.defaults.max_sandboxes_per_owner = 3).await;
    let spawns = (0..10).map(|_| {
        server.post(
            "/sandboxes",
            json!({"image": docker_image(), "owner_id": "team-a"}),
        )
    });
    let results = futures::future::join_all(spawns).await;
    let admitted = results.iter().filter(|(s, _)| *s == 201).count();
    let refused: Vec<_> = results.iter().filter(|(s, _)| *s != 201).collect();
    assert_eq!(admitted, 3, "{results:?}");
    assert!(
        refused
            .iter()
            .all(|(s, b)| *s == 429 && b["code"] == "RESOURCE_LIMIT"),
        "{refused:?}"
    );

    let (s, decision) = server
        .post("/sandboxes/admission", json!({"owner_id": "team-a"}))
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        decision,
        json!({
            "allowed": false, "queueable": true, "reason": "max_sandboxes_per_owner",
            "active_sandboxes": 3, "max_sandboxes": 0, "active_owner_sandboxes": 3,
            "max_owner_sandboxes": 3, "max_ttl": "24h0m0s"
        })
    );
    let (_, other) = server
        .post("/sandboxes/admission", json!({"owner_id": "team-b"}))
        .await;
    assert_eq!(other["allowed"], true);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_in_different_sandboxes_run_concurrently() {
    let server = native_server(|_| {}).await;
    let slow = spawn_ok(&server, json!({"image": docker_image()})).await;
    let fast = spawn_ok(&server, json!({"image": docker_image()})).await;
    // Start a command that blocks until a file appears, then prove another
    // sandbox's exec completes while it is still running.
    let slow_exec = {
        let req = server.http.post(server.url(&format!("/sandboxes/{slow}/exec"))).json(&json!({
            "command": "i=0; while [ ! -e /tmp/go ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; echo released"
        }));
        tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, b) = server
        .post(
            &format!("/sandboxes/{fast}/exec"),
            json!({"command": "echo fast"}),
        )
        .await;
    assert_eq!((s, b["stdout"].as_str()), (200, Some("fast\n")));
    assert!(
        !slow_exec.is_finished(),
        "the slow command should still be running"
    );
    let (s, _) = server
        .post(
            &format!("/sandboxes/{slow}/files"),
            json!({"path": "/tmp/go", "content": ""}),
        )
        .await;
    assert_eq!(s, 200, "file calls must not wait for the running command");
    let status = tokio::time::timeout(Duration::from_secs(20), slow_exec).await;
    assert!(matches!(status, Ok(Ok(Ok(200)))), "{status:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_sandboxes_left_mid_spawn() {
    if !docker_enabled() {
        return;
    }
    let server = TestServer::start(|c| c.providers.default = "docker".into()).await;
    // Simulate a crash between "record creating" and "record running": a
    // record in `creating` and a labelled container that it never learned of.
    let id = stacyvm::ids::sandbox();
    crate::support::insert_docker_record(&server, &id, "creating", None).await;
    crate::support::run_labelled_container(&id, None);
    let data_dir = server.stop().await;

    let server = TestServer::start_in(data_dir, |c| c.providers.default = "docker".into()).await;
    let record = server
        .wait_for_state(&id, "destroyed", Duration::from_secs(15))
        .await;
    assert!(
        record
            .state_reason
            .unwrap_or_default()
            .contains("server restarted")
    );
    assert!(
        docker_containers_for(&id).is_empty(),
        "orphan container survived the restart"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_runs_on_postgres() {
    let Some(url) = crate::support::postgres_url().await else {
        return;
    };
    let server = native_server(move |c| c.database.url = url).await;
    assert_eq!(server.app_service.store().backend_name(), "postgres");
    let id = spawn_ok(
        &server,
        json!({"image": docker_image(), "metadata": {"db": "pg"}}),
    )
    .await;
    let (s, b) = server
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "echo pg"}),
        )
        .await;
    assert_eq!((s, b["stdout"].as_str()), (200, Some("pg\n")));
    let (s, list) = server.get("/sandboxes").await;
    assert_eq!(s, 200);
    assert_eq!(list[0]["metadata"]["db"], "pg");
    let (s, _) = server.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(s, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_docker_daemon_the_server_runs_on_native() {
    // `auto` picks native when no daemon answers; docker stays listed, unhealthy.
    let server = crate::support::native_server(|c| {
        c.providers.default = "auto".into();
        c.providers.docker.host = "unix:///nonexistent/docker.sock".into();
    })
    .await;
    let (_, providers) = server.get("/providers").await;
    let docker = providers
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "docker").cloned())
        .unwrap_or_default();
    assert_eq!(docker["healthy"], false, "{providers}");
    let native = providers
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "native").cloned())
        .unwrap_or_default();
    assert_eq!(
        (native["healthy"].as_bool(), native["default"].as_bool()),
        (Some(true), Some(true))
    );
    let id = spawn_ok(&server, json!({"image": docker_image()})).await;
    let (s, b) = server
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "echo native"}),
        )
        .await;
    assert_eq!((s, b["stdout"].as_str()), (200, Some("native\n")));
    let (s, b) = server
        .post(
            "/sandboxes",
            json!({"image": docker_image(), "provider": "docker"}),
        )
        .await;
    assert_error(s, &b, 503, "UNAVAILABLE");
    server.stop().await;
}

/// Every operation on a sandbox goes to the worker recorded on it: with
/// the record pointing at a worker this control plane does not know, exec,
/// files, logs, stats and destroy answer 503 naming that worker (nothing
/// runs on the local provider instead), the reconciler leaves the record
/// alone, and pointed back at the local worker the same sandbox works.
#[tokio::test]
async fn operations_are_routed_by_the_sandboxs_worker() {
    let server = native_server(|_| {}).await;
    let id = spawn_ok(&server, json!({"image": docker_image()})).await;
    let store = server.app_service.store();
    let local = server.app_service.scheduler().in_process_workers()[0]
        .id()
        .to_string();
    assert!(local.starts_with("wk-local-"), "{local}");
    let (_, body) = server.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(body["worker_id"], local.as_str(), "{body}");

    store
        .reassign_worker(&local, "wk-elsewhere")
        .await
        .expect("reassign");
    // The lease moves with the record (a lease left under the old id
    // would make the sandbox look lost to its new worker's pass).
    let lease = store.lease(&id).await.expect("lease").expect("held");
    assert_eq!(lease.worker_id, "wk-elsewhere", "{lease:?}");
    let calls: Vec<(reqwest::Method, String, Option<Value>)> = vec![
        (
            reqwest::Method::POST,
            format!("/sandboxes/{id}/exec"),
            Some(json!({"command": "echo hi"})),
        ),
        (
            reqwest::Method::GET,
            format!("/sandboxes/{id}/files?path=/etc/passwd"),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("/sandboxes/{id}/files"),
            Some(json!({"path": "/tmp/x", "content": "x"})),
        ),
        (reqwest::Method::GET, format!("/sandboxes/{id}/logs"), None),
        (reqwest::Method::GET, format!("/sandboxes/{id}/stats"), None),
    ];
    for (method, path, body) in &calls {
        let mut req = server.http.request(method.clone(), server.url(path));
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.expect("json");
        assert_error(status, &body, 503, "UNAVAILABLE");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("wk-elsewhere")),
            "{method} {path}: {body}"
        );
    }
    // Not this control plane's worker: the reconciler does not judge it.
    server
        .app_service
        .reconcile(false)
        .await
        .expect("reconcile");
    let (_, body) = server.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(body["state"], "running", "{body}");

    store
        .reassign_worker("wk-elsewhere", &local)
        .await
        .expect("reassign back");
    server
        .app_service
        .reconcile(false)
        .await
        .expect("reconcile");
    let (_, body) = server.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(
        body["state"], "running",
        "moved back, it is not lost: {body}"
    );
    let out = server.shell(&id, "echo routed").await;
    assert_eq!(out, "routed\n");
    let (status, body) = server.delete(&format!("/sandboxes/{id}")).await;
    assert!(status < 300, "{body}");
}

/// Reconcile passes between full reads start from the records the last
/// pass kept and read only what changed: a sandbox spawned since is judged,
/// one destroyed since is dropped, and a lease let go behind the
/// reconciler's back (the record itself untouched) makes its sandbox lost
/// at the very next pass. None of these passes read every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_reconcile_passes_see_what_changed_since_the_last_read() {
    let server = TestServer::start(|c| {
        c.providers.memory.enabled = true;
        // Only the passes this test runs.
        c.lifecycle.reconcile_interval = stacyvm::duration::GoDuration(Duration::from_secs(3600));
    })
    .await;
    let service = &server.app_service;
    let pass = || async {
        service
            .reconcile(false)
            .await
            .unwrap_or_else(|e| panic!("reconcile: {e}"))
    };
    let memory = || json!({"provider": "memory"});
    let a = spawn_ok(&server, memory()).await;
    let b = spawn_ok(&server, memory()).await;
    let report = pass().await;
    assert_eq!((report.running, report.full_reads), (2, 0), "{report:?}");

    let c = spawn_ok(&server, memory()).await;
    let report = pass().await;
    assert_eq!((report.running, report.full_reads), (3, 0), "{report:?}");

    let (status, body) = server.delete(&format!("/sandboxes/{a}")).await;
    assert!(status < 300, "{body}");
    let report = pass().await;
    assert_eq!((report.running, report.full_reads), (2, 0), "{report:?}");

    // b's lease let go as an expiry would, without touching its record.
    service
        .store()
        .release_lease(&b, chrono::Utc::now())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let report = pass().await;
    assert_eq!((report.failed, report.full_reads), (1, 0), "{report:?}");
    let (_, body) = server.get(&format!("/sandboxes/{b}")).await;
    assert!(
        body["state_reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("lost")),
        "{body}"
    );
    let (_, body) = server.get(&format!("/sandboxes/{c}")).await;
    assert_eq!(body["state"], "running", "{body}");
    server.stop().await;
}

/// The safety net under incremental passes: a record changed behind the
/// reconciler's back in a way no incremental read sees (here: moved to
/// another worker by hand in the database, its timestamps older than the
/// reads look back) keeps its stale copy in the kept records; when that copy leads to a verdict (its runtime is gone from
/// this worker), the pass reads the record again before acting, finds it
/// is no longer this worker's, and leaves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_kept_record_is_read_again_before_any_verdict() {
    use sea_orm::ConnectionTrait;
    let server = TestServer::start(|c| {
        c.providers.memory.enabled = true;
        c.lifecycle.reconcile_interval = stacyvm::duration::GoDuration(Duration::from_secs(3600));
    })
    .await;
    let service = &server.app_service;
    let id = spawn_ok(&server, json!({"provider": "memory"})).await;
    let report = service
        .reconcile(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.running, report.full_reads), (1, 0), "{report:?}");

    // Behind the reconciler's back: the record now names another worker,
    // with timestamps from long ago, and the runtime is gone from this one.
    let db = sea_orm::Database::connect(service.config().database_url())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let old = "2020-01-01T00:00:00+00:00";
    for sql in [
        format!(
            "UPDATE sandboxes SET worker_id = 'wk-elsewhere', updated_at = '{old}' WHERE id = '{id}'"
        ),
        format!("UPDATE leases SET acquired_at = '{old}' WHERE sandbox_id = '{id}'"),
    ] {
        db.execute_unprepared(&sql)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let model = service
        .store()
        .get_sandbox(&id)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no record {id}"));
    let lease = service
        .store()
        .lease(&id)
        .await
        .ok()
        .flatten()
        .map_or(0, |l| l.generation);
    let worker = service.scheduler().in_process_workers()[0].clone();
    worker
        .destroy(&stacyvm::worker::RuntimeRef {
            sandbox_id: id.clone(),
            provider: "memory".into(),
            runtime_id: model.runtime_id.clone(),
            lease: u64::try_from(lease).unwrap_or(0),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // The kept copy says "running here, runtime missing": failed, were it
    // believed. Read again, the record is not this worker's.
    let report = service
        .reconcile(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.failed, report.full_reads), (0, 0), "{report:?}");
    let (_, body) = server.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(body["state"], "running", "{body}");
    // And the copy let it go: the next pass compares nothing.
    let report = service
        .reconcile(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.records, report.failed), (0, 0), "{report:?}");
    server.stop().await;
}
