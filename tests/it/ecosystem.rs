//! The tools users already have: server-sent events (`/api/v1/events`),
//! read by a real HTTP client as a browser's `EventSource` reads them.

use std::time::Duration;

use serde_json::{Value, json};
use stacyvm::auth::Role;

use crate::support::{TestServer, key};

/// One server-sent event as a client parses it.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    id: Option<String>,
    data: Value,
}

/// An open `/api/v1/events` stream, parsed line by line (the event-stream
/// format: `field: value` lines, a blank line ends an event, `:` lines are
/// comments).
struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn open(server: &TestServer, key: &str, last_event_id: Option<&str>) -> EventStream {
        let mut req = server
            .http
            .get(server.url("/events"))
            .header("x-api-key", key)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let response = req.send().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"]
                .to_str()
                .unwrap_or_default(),
            "text/event-stream"
        );
        EventStream {
            response,
            buffer: String::new(),
        }
    }

    /// The next event, or `None` when none comes within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = ("message".to_string(), None, String::new());
                for line in block.lines() {
                    match line.split_once(':') {
                        Some(("", _)) => {}
                        Some(("event", v)) => event = v.trim_start().to_string(),
                        Some(("id", v)) => id = Some(v.trim_start().to_string()),
                        Some(("data", v)) => data.push_str(v.trim_start()),
                        _ => {}
                    }
                }
                if data.is_empty() && id.is_none() {
                    continue; // a keep-alive comment
                }
                let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{data}: {e}"));
                return Some(Sse { event, id, data });
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk()).await;
            match chunk {
                Ok(Ok(Some(bytes))) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// Events until one named `name` about `sandbox`, that one included.
    async fn until(&mut self, name: &str, sandbox: &str) -> Vec<Sse> {
        let mut seen = Vec::new();
        while let Some(e) = self.next(Duration::from_secs(10)).await {
            let done = e.event == name && e.data["sandbox_id"] == sandbox;
            seen.push(e);
            if done {
                return seen;
            }
        }
        panic!("no {name} for {sandbox}; saw {seen:?}");
    }
}

async fn spawn(server: &TestServer, key: &str) -> String {
    let resp = server
        .http
        .post(server.url("/sandboxes"))
        .header("x-api-key", key)
        .json(&json!({"provider": "memory", "image": "x"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap_or_default();
    body["id"].as_str().unwrap_or_default().to_string()
}

async fn destroy(server: &TestServer, key: &str, id: &str) {
    let resp = server
        .http
        .delete(server.url(&format!("/sandboxes/{id}")))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
}

fn sandbox_events(events: &[Sse]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e.event.starts_with("sandbox."))
        .map(|e| {
            (
                e.event.clone(),
                e.data["sandbox_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_resume_after_the_last_event_id_and_show_only_the_callers_own() {
    let server = TestServer::start(|c| c.providers.memory.enabled = true).await;
    let alice = key(&server, "alice", Role::Owner).await;
    let bob = key(&server, "bob", Role::Owner).await;

    let mut stream = EventStream::open(&server, &alice, None).await;
    let mut bobs = EventStream::open(&server, &bob, None).await;
    let first = spawn(&server, &alice).await;
    let seen = stream.until("sandbox.running", &first).await;
    assert_eq!(
        sandbox_events(&seen),
        [
            ("sandbox.created".to_string(), first.clone()),
            ("sandbox.running".to_string(), first.clone())
        ]
    );
    let last_id = seen.last().and_then(|e| e.id.clone()).unwrap_or_default();
    assert!(
        seen.iter().all(|e| e.id.is_some()),
        "every event has an id: {seen:?}"
    );
    drop(stream);

    // While alice is away: her second sandbox and the end of the first.
    let second = spawn(&server, &alice).await;
    destroy(&server, &alice, &first).await;

    let mut resumed = EventStream::open(&server, &alice, Some(&last_id)).await;
    let missed = resumed.until("sandbox.destroyed", &first).await;
    let missed_sandboxes = sandbox_events(&missed);
    assert_eq!(
        missed_sandboxes.first(),
        Some(&("sandbox.created".to_string(), second.clone())),
        "the first event after the id comes first: {missed:?}"
    );
    assert!(missed_sandboxes.contains(&("sandbox.running".to_string(), second.clone())));
    assert!(
        !missed
            .iter()
            .any(|e| e.id.as_deref() == Some(last_id.as_str())),
        "the last event seen is not repeated"
    );
    assert!(missed.iter().all(|e| e.event != "gap"), "{missed:?}");
    // Then it is live: a new event arrives on the resumed stream.
    let third = spawn(&server, &alice).await;
    resumed.until("sandbox.running", &third).await;

    // Bob saw none of it, but does see his own.
    let his = spawn(&server, &bob).await;
    let bob_saw = bobs.until("sandbox.running", &his).await;
    assert!(
        bob_saw
            .iter()
            .all(|e| e.data["owner_id"] == "bob" || e.event == "audit"),
        "{bob_saw:?}"
    );
    assert!(
        !bob_saw.iter().any(|e| [&first, &second, &third]
            .iter()
            .any(|id| e.data["sandbox_id"] == id.as_str())),
        "{bob_saw:?}"
    );

    // An id from another run of the server: a gap, then what is there.
    let mut foreign = EventStream::open(&server, &alice, Some("0000deadbeef-3")).await;
    let gap = foreign.next(Duration::from_secs(5)).await;
    assert_eq!(gap.as_ref().map(|e| e.event.as_str()), Some("gap"));
    // Without a count: it would be of every tenant's events.
    let data = gap.map(|e| e.data).unwrap_or_default();
    assert!(
        data.get("missed").is_none() && data["message"].is_string(),
        "{data}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_refuses_strangers_and_malformed_ids() {
    let server = TestServer::start(|c| {
        c.providers.memory.enabled = true;
        c.server.max_websockets_per_credential = 2;
    })
    .await;
    let alice = key(&server, "alice", Role::Owner).await;
    let get = |headers: Vec<(&'static str, String)>| {
        let mut req = server.http.get(server.url("/events"));
        for (k, v) in headers {
            req = req.header(k, v);
        }
        async move {
            let resp = req.send().await.unwrap_or_else(|e| panic!("{e}"));
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or_default();
            (status, body)
        }
    };
    let (s, b) = get(vec![]).await;
    assert_eq!((s, b["code"].as_str()), (401, Some("UNAUTHORIZED")), "{b}");
    let (s, b) = get(vec![("x-api-key", "sk-not-a-key".into())]).await;
    assert_eq!(s, 401, "{b}");
    for bad in ["12", "abc-", "a/b-3", &format!("{}-1", "x".repeat(100))] {
        let (s, b) = get(vec![
            ("x-api-key", alice.clone()),
            ("last-event-id", bad.into()),
        ])
        .await;
        assert_eq!(
            (s, b["code"].as_str()),
            (400, Some("BAD_REQUEST")),
            "{bad}: {b}"
        );
    }
    // Each credential holds a bounded number of streams.
    let one = EventStream::open(&server, &alice, None).await;
    let two = EventStream::open(&server, &alice, None).await;
    let (s, b) = get(vec![("x-api-key", alice.clone())]).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (429, Some("RESOURCE_LIMIT")),
        "{b}"
    );
    drop((one, two));
    // Given back when the clients go: the next one is served.
    let mut served = false;
    for _ in 0..50 {
        let resp = server
            .http
            .get(server.url("/events"))
            .header("x-api-key", &alice)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if resp.status() == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "the slots of closed streams are given back");
    server.stop().await;
}

/// The value of the sample `name{labels}` in Prometheus text, where every
/// label given matches.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let all = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse().ok()).flatten()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics_count_what_happened_for_operators_only() {
    let server = TestServer::start(|c| {
        c.providers.memory.enabled = true;
        c.defaults.max_sandboxes_per_owner = 1;
    })
    .await;
    let alice = key(&server, "alice", Role::Owner).await;
    let admin = key(&server, "root", Role::Admin).await;
    let scrape = |key: Option<String>, path: &'static str| {
        let mut req = server.http.get(server.base.replace("/api/v1", path));
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        async move {
            let resp = req.send().await.unwrap_or_else(|e| panic!("{e}"));
            let status = resp.status().as_u16();
            let content_type = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            (status, content_type, resp.text().await.unwrap_or_default())
        }
    };
    assert_eq!(scrape(None, "/metrics/prometheus").await.0, 401);
    let (s, _, body) = scrape(Some(alice.clone()), "/metrics/prometheus").await;
    assert_eq!(
        s, 403,
        "an owner does not see every tenant's figures: {body}"
    );

    let id = spawn(&server, &alice).await;
    // Over alice's cap: refused by admission.
    let refused = server
        .http
        .post(server.url("/sandboxes"))
        .header("x-api-key", &alice)
        .json(&json!({"provider": "memory", "image": "x"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(refused.status(), 429);
    let got = server
        .http
        .get(server.url(&format!("/sandboxes/{id}")))
        .header("x-api-key", &alice)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.status(), 200);
    // Methods are a fixed set of labels too.
    for n in 0..3 {
        let method =
            reqwest::Method::from_bytes(format!("PROBE{n}").as_bytes()).unwrap_or_default();
        let probe = server.http.request(method, server.url("/sandboxes"));
        probe.send().await.unwrap_or_else(|e| panic!("{e}"));
    }
    for n in 0..3 {
        let probe = server.http.get(server.url(&format!("/no/such/path/{n}")));
        let status = probe.send().await.map(|r| r.status().as_u16()).unwrap_or(0);
        assert_eq!(status, 401);
    }

    let (s, content_type, text) = scrape(Some(admin.clone()), "/metrics/prometheus").await;
    assert_eq!(s, 200, "{text}");
    assert!(
        content_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{content_type}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    let running = [("state", "running"), ("provider", "memory")];
    assert_eq!(
        sample(&text, "stacyvm_sandboxes", &running),
        Some(1.0),
        "{text}"
    );
    let spawned = [("provider", "memory"), ("outcome", "ok")];
    assert_eq!(
        sample(&text, "stacyvm_spawn_duration_seconds_count", &spawned),
        Some(1.0)
    );
    let refusals = [("reason", "max_sandboxes_per_owner")];
    assert_eq!(
        sample(&text, "stacyvm_admission_refusals_total", &refusals),
        Some(1.0)
    );
    let by_route = [
        ("route", "/api/v1/sandboxes/{id}"),
        ("status", "200"),
        ("method", "GET"),
    ];
    assert_eq!(
        sample(&text, "stacyvm_http_requests_total", &by_route),
        Some(1.0),
        "{text}"
    );
    // Paths no route takes share one label: scanners cannot grow the set.
    let unmatched = [("route", "unmatched"), ("status", "401")];
    assert!(
        sample(&text, "stacyvm_http_requests_total", &unmatched) >= Some(3.0),
        "{text}"
    );
    assert!(!text.contains("/no/such/path"), "{text}");
    assert!(!text.contains("PROBE"), "{text}");
    assert!(
        sample(&text, "stacyvm_http_requests_total", &[("method", "other")]) >= Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "stacyvm_workers", &[("status", "online")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "stacyvm_provider_healthy", &[("provider", "memory")]),
        Some(1.0)
    );

    // Destroyed: counted and timed, no longer a live sandbox.
    destroy(&server, &alice, &id).await;
    let _events = EventStream::open(&server, &alice, None).await;
    let (_, _, text) = scrape(Some(admin), "/metrics").await;
    assert_eq!(sample(&text, "stacyvm_sandboxes", &running), None, "{text}");
    assert_eq!(
        sample(&text, "stacyvm_destroy_duration_seconds_count", &spawned),
        Some(1.0)
    );
    assert!(
        sample(&text, "stacyvm_streams_open", &[]) >= Some(1.0),
        "{text}"
    );
    server.stop().await;
}

/// Runs `stacyvm ARGS` as a user would (a real process, the server's URL
/// and key in the environment, `stdin` fed): (exit code, stdout, stderr).
async fn cli(
    server: &TestServer,
    key: &str,
    args: &[&str],
    stdin: &[u8],
) -> (i32, Vec<u8>, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .args(args)
        .env("STACYVM_SERVER", server.base.replace("/api/v1", ""))
        .env("STACYVM_API_KEY", key)
        .env_remove("RUST_LOG")
        .current_dir(server.data_dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("stacyvm {args:?} hung"))
        .unwrap_or_else(|e| panic!("{e}"));
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_sandboxes_and_files_and_exits_as_the_command_did() {
    let server = crate::support::native_server(|_| {}).await;
    let alice = key(&server, "alice", Role::Owner).await;
    let image = crate::support::docker_image();
    let (code, out, err) = cli(
        &server,
        &alice,
        &["sandbox", "create", "--image", &image, "--meta", "team=cli"],
        b"",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let id = String::from_utf8_lossy(&out).trim().to_string();
    assert!(
        id.starts_with("sb-") && !id.contains('\n'),
        "only the id is printed: {id:?}"
    );

    let (code, out, _) = cli(&server, &alice, &["sandbox", "ls", "--json"], b"").await;
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_slice(&out).unwrap_or_default();
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    assert_eq!(listed[0]["metadata"]["team"], "cli");
    let (_, out, _) = cli(&server, &alice, &["sandbox", "ls"], b"").await;
    let table = String::from_utf8_lossy(&out).into_owned();
    assert!(
        table.starts_with("ID\tSTATE") && table.contains(&format!("{id}\trunning")),
        "{table}"
    );

    // The command's streams stay apart and its exit code is the CLI's.
    let (code, out, err) = cli(
        &server,
        &alice,
        &[
            "sandbox",
            "exec",
            &id,
            "--env",
            "WHO=cli",
            "--",
            "sh",
            "-c",
            "echo out $WHO; echo err >&2; exit 3",
        ],
        b"",
    )
    .await;
    assert_eq!(
        (code, String::from_utf8_lossy(&out).as_ref(), err.as_str()),
        (3, "out cli\n", "err\n")
    );
    let (code, out, _) = cli(
        &server,
        &alice,
        &[
            "sandbox", "exec", &id, "--shell", "--", "echo", "$((6*7))", "|", "cat",
        ],
        b"",
    )
    .await;
    assert_eq!((code, String::from_utf8_lossy(&out).as_ref()), (0, "42\n"));
    let (code, _, err) = cli(
        &server,
        &alice,
        &[
            "sandbox",
            "exec",
            &id,
            "--timeout",
            "1s",
            "--",
            "sleep",
            "30",
        ],
        b"",
    )
    .await;
    assert_eq!(code, 124, "{err}");
    assert_eq!(err.matches("timed out").count(), 1, "said once: {err}");
    let (code, out, _) = cli(
        &server,
        &alice,
        &["sandbox", "exec", &id, "--json", "--", "echo", "hi"],
        b"",
    )
    .await;
    let answer: Value = serde_json::from_slice(&out).unwrap_or_default();
    assert_eq!(
        (
            code,
            answer["stdout"].as_str(),
            answer["exit_code"].as_i64()
        ),
        (0, Some("hi\n"), Some(0))
    );

    // Files: binary-safe both ways, from stdin and to stdout.
    let blob: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let local = server.data_dir.path().join("blob.bin");
    std::fs::write(&local, &blob).unwrap_or_else(|e| panic!("{e}"));
    let local_str = local.to_string_lossy().into_owned();
    let remote = format!("{id}:/tmp/blob.bin");
    let (code, _, err) = cli(&server, &alice, &["files", "cp", &local_str, &remote], b"").await;
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = cli(&server, &alice, &["files", "cat", &remote], b"").await;
    assert_eq!((code, out.len()), (0, blob.len()));
    assert!(out == blob, "the bytes came back as they went");
    let piped = format!("{id}:/tmp/piped");
    let (code, _, _) = cli(
        &server,
        &alice,
        &["files", "cp", "-", &piped],
        b"from stdin\x00\xff",
    )
    .await;
    assert_eq!(code, 0);
    let (_, out, _) = cli(&server, &alice, &["files", "cp", &piped, "-"], b"").await;
    assert_eq!(out, b"from stdin\x00\xff");
    let (code, out, _) = cli(
        &server,
        &alice,
        &["files", "ls", &format!("{id}:/tmp")],
        b"",
    )
    .await;
    let listing = String::from_utf8_lossy(&out).into_owned();
    assert!(
        code == 0 && listing.contains("70000") && listing.contains("blob.bin"),
        "{listing}"
    );

    // Errors: said once, on stderr, without log lines; a non-zero exit.
    let (code, out, err) = cli(&server, &alice, &["sandbox", "get", "sb-00000000"], b"").await;
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("stacyvm: 404: "), "{err}");
    // StacyVM's own failure in an exec is 125, apart from the command's.
    let (code, _, err) = cli(
        &server,
        &alice,
        &["sandbox", "exec", "sb-00000000", "--", "true"],
        b"",
    )
    .await;
    assert_eq!(code, 125, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, err) = cli(&server, "", &["sandbox", "ls"], b"").await;
    assert_eq!(code, 1);
    assert!(err.starts_with("stacyvm: 401: "), "{err}");
    let (code, _, err) = cli(&server, &alice, &["files", "cat", "no-colon"], b"").await;
    assert!(code != 0 && err.contains("SANDBOX_ID:/path"), "{err}");

    let (code, out, _) = cli(&server, &alice, &["sandbox", "rm", &id], b"").await;
    assert_eq!(
        (code, String::from_utf8_lossy(&out).trim()),
        (0, id.as_str())
    );
    let (code, _, err) = cli(&server, &alice, &["sandbox", "get", &id], b"").await;
    assert!(code == 1 && err.contains("404"), "{err}");
    server.stop().await;
}

/// One JSON-RPC call to `/mcp` (stateless: no session needed), as any
/// HTTP client can send it: (status, body).
async fn mcp_call(
    server: &TestServer,
    key: Option<&str>,
    host: Option<&str>,
    body: String,
) -> (u16, Value) {
    let mut req = server
        .http
        .post(server.base.replace("/api/v1", "/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body);
    if let Some(key) = key {
        req = req.header("x-api-key", key);
    }
    if let Some(host) = host {
        req = req.header("host", host);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{e}"));
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

fn tool(name: &str, arguments: Value) -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
           "params": {"name": name, "arguments": arguments}})
    .to_string()
}

/// The MCP tools attacked: as another tenant's key, anonymously, with a
/// rebinding Host, malformed and oversized input. Nothing of alice's is
/// seen or touched, and every refusal is a 4xx or a tool error, never a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_tools_show_and_touch_only_the_callers_own() {
    let server = TestServer::start(|c| {
        c.providers.memory.enabled = true;
        c.server.max_body_bytes = 64 * 1024;
    })
    .await;
    let alice = key(&server, "alice", Role::Owner).await;
    let bob = key(&server, "bob", Role::Owner).await;
    let hers = spawn(&server, &alice).await;

    let (s, listed) = mcp_call(&server, Some(&bob), None, tool("list_sandboxes", json!({}))).await;
    assert_eq!(s, 200, "{listed}");
    let text = listed["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!text.contains(&hers), "bob lists none of alice's: {text}");
    for (name, args) in [
        (
            "run_command",
            json!({"sandbox_id": hers, "command": "true"}),
        ),
        (
            "read_file",
            json!({"sandbox_id": hers, "path": "/etc/passwd"}),
        ),
        (
            "write_file",
            json!({"sandbox_id": hers, "path": "/tmp/x", "content": "x"}),
        ),
        ("list_files", json!({"sandbox_id": hers, "path": "/"})),
        ("destroy_sandbox", json!({"sandbox_id": hers})),
    ] {
        let (s, v) = mcp_call(&server, Some(&bob), None, tool(name, args)).await;
        assert_eq!(
            (s, v["result"]["isError"].as_bool()),
            (200, Some(true)),
            "{name}: {v}"
        );
        let text = v["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default();
        assert!(text.starts_with("NOT_FOUND"), "{name}: {text}");
    }
    // Hers, as she left it.
    let (s, mine) = mcp_call(
        &server,
        Some(&alice),
        None,
        tool("list_sandboxes", json!({})),
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        mine["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains(&hers)
    );

    // No key, a wrong key: refused before any tool runs.
    let (s, v) = mcp_call(&server, None, None, tool("list_sandboxes", json!({}))).await;
    assert_eq!((s, v["code"].as_str()), (401, Some("UNAUTHORIZED")), "{v}");
    let (s, _) = mcp_call(
        &server,
        Some("svm_wrong"),
        None,
        tool("list_sandboxes", json!({})),
    )
    .await;
    assert_eq!(s, 401);
    // A rebinding name, even with a key.
    let (s, _) = mcp_call(
        &server,
        Some(&alice),
        Some("attacker.example"),
        tool("list_sandboxes", json!({})),
    )
    .await;
    assert_eq!(s, 403);
    // Malformed and oversized input.
    let (s, _) = mcp_call(&server, Some(&alice), None, "{not json".into()).await;
    assert!((400..500).contains(&s), "{s}");
    let (s, v) = mcp_call(
        &server,
        Some(&alice),
        None,
        tool("run_command", json!({"sandbox_id": 5})),
    )
    .await;
    assert_eq!(
        (s, v["result"]["isError"].as_bool()),
        (200, Some(true)),
        "{v}"
    );
    let big = "x".repeat(128 * 1024);
    let (s, _) = mcp_call(
        &server,
        Some(&alice),
        None,
        tool(
            "write_file",
            json!({"sandbox_id": hers, "path": "/tmp/big", "content": big}),
        ),
    )
    .await;
    assert_eq!(s, 413, "a body over server.max_body_bytes");
    let (s, v) = mcp_call(&server, Some(&alice), None, tool("no_such_tool", json!({}))).await;
    assert!(s < 500, "{s} {v}");
    server.stop().await;
}

#[test]
fn openapi_json_is_in_sync() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"))
        .unwrap_or_else(|e| panic!("read openapi.json: {e}"));
    let current = stacyvm::api::rest::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        committed.trim_end() == current,
        "openapi.json is out of date: run `cargo run -- openapi > openapi.json`"
    );
}

/// The OpenAPI document and its reference page are public (they are the
/// API's shape), and every operation the document names is one the server
/// routes: none answers the fallback's "no such route" or 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_public_and_every_operation_in_it_is_routed() {
    let server = TestServer::start(|c| c.providers.memory.enabled = true).await;
    let admin = key(&server, "root", Role::Admin).await;
    let origin = server.base.trim_end_matches("/api/v1").to_string();

    let resp = server
        .http
        .get(format!("{origin}/api/v1/openapi.json"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200, "anonymous callers read the document");
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap_or_default(),
        "application/json"
    );
    let served: Value = resp.json().await.unwrap_or_default();
    let built = serde_json::to_value(stacyvm::api::rest::openapi()).unwrap_or_default();
    assert_eq!(served, built);
    assert_eq!(served["openapi"], "3.1.0");

    let paths = served["paths"].as_object().cloned().unwrap_or_default();
    let mut checked = 0;
    for (path, item) in &paths {
        let url = format!(
            "{origin}{}",
            path.replace("{id}", "sb-nothing")
                .replace("{name}", "nothing")
                .replace("{owner}", "nobody")
                .replace("{action}", "cordon")
        );
        for method in ["get", "post", "put", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
            let resp = server
                .http
                .request(method.clone(), &url)
                .header("x-admin-api-key", &admin)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
            let status = resp.status().as_u16();
            assert_ne!(status, 405, "{method} {path} is documented but not routed");
            if path == "/api/v1/events" {
                // An endless stream: its head is enough.
                assert_eq!(status, 200);
                checked += 1;
                continue;
            }
            let body: Value = resp.json().await.unwrap_or_default();
            assert!(
                !(status == 404 && body["message"] == "no such route"),
                "{method} {path} is documented but not routed"
            );
            assert!(status < 500, "{method} {path}: {status} {body}");
            checked += 1;
        }
    }
    assert!(checked >= 45, "{checked} operations");

    // The reference page: the binary's own assets, and nothing else.
    let resp = server
        .http
        .get(format!("{origin}/api/v1/docs"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap_or_default()
        .to_string();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let page = resp.text().await.unwrap_or_default();
    let assets: Vec<&str> = page
        .split(['"', '\''])
        .filter(|s| s.starts_with('/') && s.contains("/assets/"))
        .collect();
    assert_eq!(assets.len(), 3, "{page}");
    assert!(
        !page.contains("http:") && !page.contains("https:"),
        "{page}"
    );
    for asset in assets {
        let resp = server
            .http
            .get(format!("{origin}{asset}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status(), 200, "{asset}");
    }
    server.stop().await;
}
