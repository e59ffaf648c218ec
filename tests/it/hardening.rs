//! Attacks on the control plane itself: what a client (often an
//! unauthenticated one) can make the server spend, and whether the server
//! stays healthy and its data unchanged afterwards.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::TestServer;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn graphql_url(server: &TestServer) -> String {
    server.base.replace("/api/v1", "/graphql")
}

fn host(server: &TestServer) -> String {
    server
        .base
        .trim_start_matches("http://")
        .trim_end_matches("/api/v1")
        .to_string()
}

async fn post_query(server: &TestServer, query: &str) -> Value {
    server
        .http
        .post(graphql_url(server))
        .json(&json!({ "query": query }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn code(response: &Value) -> &str {
    response["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or_default()
}

/// `n` fragments, each spreading the next one twice.
fn fan_out(n: usize) -> String {
    let mut q = String::from("query { sandboxes { edges { node { ...S0 } } } }\n");
    for i in 0..n {
        q.push_str(&format!(
            "fragment S{i} on Sandbox {{ a:id ...S{} b:id ...S{} }}\n",
            i + 1,
            i + 1
        ));
    }
    q.push_str(&format!("fragment S{n} on Sandbox {{ id }}\n"));
    q
}

/// graphql-js 16's `getIntrospectionQuery({ descriptions: true })`, which
/// GraphiQL and most GraphQL tools send.
const INTROSPECTION: &str = r#"
    query IntrospectionQuery {
      __schema {
        queryType { name }
        mutationType { name }
        subscriptionType { name }
        types { ...FullType }
        directives { name description locations args { ...InputValue } }
      }
    }
    fragment FullType on __Type {
      kind name description
      fields(includeDeprecated: true) {
        name description args { ...InputValue } type { ...TypeRef }
        isDeprecated deprecationReason
      }
      inputFields { ...InputValue }
      interfaces { ...TypeRef }
      enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason }
      possibleTypes { ...TypeRef }
    }
    fragment InputValue on __InputValue {
      name description type { ...TypeRef } defaultValue
    }
    fragment TypeRef on __Type {
      kind name
      ofType { kind name ofType { kind name ofType { kind name ofType { kind name
        ofType { kind name ofType { kind name ofType { kind name ofType { kind name
          ofType { kind name } } } } } } } } }
    }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_fragment_fan_out_is_refused_and_introspection_works() {
    let server = TestServer::start(|_| {}).await;
    // Two abusive queries at once (2^30 fields each once expanded) while
    // health is asked: the queries are refused and health answers.
    let abusive = fan_out(30);
    let (a, b, health) = tokio::join!(
        post_query(&server, &abusive),
        post_query(&server, &abusive),
        tokio::time::timeout(Duration::from_secs(5), server.get("/health")),
    );
    for response in [&a, &b] {
        assert_eq!(code(response), "BAD_REQUEST", "{response}");
        assert!(
            response["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("fragments are expanded")),
            "{response}"
        );
    }
    assert_eq!(health.map(|(s, _)| s).ok(), Some(200));
    // Arguments cost too (validation compares them pairwise), and a body
    // past 256 KiB is refused before it is parsed.
    let args = "x: 1 ".repeat(1500);
    let pairwise = post_query(
        &server,
        &format!("{{ a: __typename({args}) a: __typename({args}) }}"),
    )
    .await;
    assert_eq!(code(&pairwise), "BAD_REQUEST", "{pairwise}");
    let big = server
        .http
        .post(graphql_url(&server))
        .json(&json!({ "query": format!("{{ __typename }} #{}", "x".repeat(300 * 1024)) }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(big.status().as_u16(), 413);
    let body: Value = big.json().await.unwrap_or_default();
    assert_eq!(code(&body), "BAD_REQUEST", "{body}");
    // The standard introspection query loads the whole schema.
    let schema = post_query(&server, INTROSPECTION).await;
    assert!(schema.get("errors").is_none(), "{schema}");
    let types: Vec<&str> = schema["data"]["__schema"]["types"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default();
    for name in [
        "Sandbox",
        "Execution",
        "QueryRoot",
        "MutationRoot",
        "SubscriptionRoot",
    ] {
        assert!(types.contains(&name), "{name} missing from {types:?}");
    }
    // Deeper introspection than any tool sends is still refused.
    let mut deep = String::from("kind");
    for _ in 0..30 {
        deep = format!("kind ofType {{ {deep} }}");
    }
    let refused = post_query(
        &server,
        &format!("{{ __type(name: \"Sandbox\") {{ {deep} }} }}"),
    )
    .await;
    assert_eq!(code(&refused), "BAD_REQUEST", "{refused}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_cannot_fill_the_audit_table() {
    let server = TestServer::start(|c| {
        c.auth.api_key = "hardening-static-key".into();
        c.auth.admin_api_key = "hardening-admin-key".into();
        c.server.refused_rate_limit.burst = 5;
        c.server.refused_rate_limit.requests_per_minute = 1;
    })
    .await;
    // A request id a spreadsheet would run is kept (it is plain) but
    // exported inert.
    let first = server
        .http
        .get(server.url("/sandboxes"))
        .header("x-api-key", "a-wrong-key")
        .header("x-request-id", "-cmd-1")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.status().as_u16(), 401);
    assert_eq!(
        first
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("-cmd-1")
    );
    let huge = "r".repeat(100_000);
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let resp = server
            .http
            .get(server.url("/sandboxes"))
            .header("x-api-key", "a-wrong-key")
            .header("x-request-id", &huge)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let echoed = resp
            .headers()
            .get("x-request-id")
            .map(|v| v.len())
            .unwrap_or_default();
        assert!(
            (1..=128).contains(&echoed),
            "request id echoed with {echoed} bytes"
        );
        statuses.push(resp.status().as_u16());
    }
    // Five refusals in the bucket, the first request took one.
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        16,
        "{statuses:?}"
    );
    let denied = server
        .app_service
        .store()
        .list_audit(&stacyvm::store::AuditFilter {
            action: Some("auth.denied".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    assert_eq!(denied.len(), 5, "{denied:?}");
    assert!(denied.iter().all(|e| e.request_id.len() <= 128));
    // A key holder on the same address is not limited by the refusals.
    let (status, _) = {
        let resp = server
            .http
            .get(server.url("/sandboxes"))
            .header("x-api-key", "hardening-static-key")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (resp.status().as_u16(), ())
    };
    assert_eq!(status, 200);
    // The CSV export neutralises the formula-looking request id.
    let csv = server
        .http
        .get(server.url("/admin/audit?action=auth.denied&format=csv"))
        .header("x-admin-api-key", "hardening-admin-key")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    assert!(csv.contains(",'-cmd-1,"), "{csv}");
    assert!(!csv.contains(",-cmd-1,"), "{csv}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_are_pruned_by_count_and_age() {
    let server = TestServer::start(|c| {
        c.auth.api_key = "retention-key".into();
        c.audit.max_events = 3;
        c.audit.prune_interval = stacyvm::duration::GoDuration(Duration::from_millis(200));
    })
    .await;
    let store = server.app_service.store().clone();
    // Requests that present nothing are refused without a record ...
    for _ in 0..5 {
        server.get("/sandboxes").await;
    }
    let none = store
        .list_audit(&stacyvm::store::AuditFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    assert!(none.is_empty(), "{none:?}");
    // ... wrong keys are recorded, and pruned to the newest three.
    for _ in 0..10 {
        server
            .http
            .get(server.url("/sandboxes"))
            .header("x-api-key", "not-the-key")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let all = |store: stacyvm::store::Store| async move {
        store
            .list_audit(&stacyvm::store::AuditFilter {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap_or_default()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = all(store.clone()).await.len();
        if n <= 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} audit events left past audit.max_events"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept = all(store.clone()).await;
    assert_eq!(kept.len(), 3, "the newest events stay");
    // By age: everything older than a moment from now goes.
    let gone = store
        .prune_audit(
            Some(chrono::Utc::now() + chrono::Duration::seconds(1)),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(gone, 3);
    server.stop().await;
}

async fn ws_connect(server: &TestServer) -> Result<Ws, u16> {
    let url = graphql_url(server).replace("http://", "ws://") + "/ws";
    let mut request = url.into_client_request().unwrap_or_else(|e| panic!("{e}"));
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws"
            .parse()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("connect: {e}"),
    }
}

/// The close frame the server ends `ws` with (pings skipped).
async fn close_of(ws: &mut Ws) -> (CloseCode, String) {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .unwrap_or_else(|_| panic!("the server kept the socket open"));
        match next {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (frame.code, frame.reason.to_string());
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

async fn init(ws: &mut Ws) {
    let message = json!({"type": "connection_init", "payload": {}}).to_string();
    ws.send(Message::Text(message.into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn acked(ws: &mut Ws) -> bool {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).unwrap_or_default();
                return v["type"] == "connection_ack";
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            _ => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_are_bounded_in_time_number_and_size() {
    let server = TestServer::start(|c| {
        c.server.websocket_init_timeout = stacyvm::duration::GoDuration(Duration::from_secs(1));
        c.server.max_websockets_per_credential = 2;
        c.server.max_websockets = 3;
    })
    .await;
    // Two sockets of one credential are accepted, a third is refused at
    // its init.
    let mut a = ws_connect(&server).await.unwrap_or_else(|s| panic!("{s}"));
    init(&mut a).await;
    assert!(acked(&mut a).await);
    let mut b = ws_connect(&server).await.unwrap_or_else(|s| panic!("{s}"));
    init(&mut b).await;
    assert!(acked(&mut b).await);
    let mut c = ws_connect(&server).await.unwrap_or_else(|s| panic!("{s}"));
    init(&mut c).await;
    let (_, reason) = close_of(&mut c).await;
    assert!(reason.contains("WebSockets"), "{reason}");
    drop(c);
    // A socket that never initialises is closed with 4408; while it is
    // open the server is at its total, and one more upgrade is refused.
    let mut idle = loop {
        match ws_connect(&server).await {
            Ok(ws) => break ws,
            // The refused socket's place is given back once it is closed.
            Err(503) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(s) => panic!("{s}"),
        }
    };
    assert_eq!(ws_connect(&server).await.err(), Some(503));
    assert_eq!(
        close_of(&mut idle).await,
        (
            CloseCode::from(4408),
            "Connection initialisation timeout".into()
        )
    );
    // An oversized message closes with 1009.
    let big = "x".repeat(stacyvm::api::graphql::MAX_WS_MESSAGE_BYTES + 1);
    a.send(Message::Text(big.into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(close_of(&mut a).await.0, CloseCode::Size);
    // The accepted socket still works.
    let ping = json!({"id": "1", "type": "subscribe", "payload": {"query": "{ __typename }"}});
    b.send(Message::Text(ping.to_string().into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let answer = loop {
        match tokio::time::timeout(Duration::from_secs(15), b.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                break serde_json::from_str::<Value>(&t).unwrap_or_default();
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        answer["payload"]["data"]["__typename"], "QueryRoot",
        "{answer}"
    );
    server.stop().await;
}

/// Reads until the server closes the connection; panics if it does not
/// within 15 s.
async fn closed_by_server(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return seen,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the server kept the connection open ({} bytes read)",
                seen.len()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_http_connections_are_closed() {
    let server = TestServer::start(|c| {
        c.server.header_read_timeout = stacyvm::duration::GoDuration(Duration::from_secs(1));
    })
    .await;
    let addr = host(&server);
    // Half a request.
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    slow.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let answer = closed_by_server(&mut slow).await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // A whole request answered, then an idle keep-alive connection.
    let mut idle = tokio::net::TcpStream::connect(&addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    idle.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let answer = closed_by_server(&mut idle).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_in_total() {
    let server = TestServer::start(|c| {
        c.server.max_connections = 3;
    })
    .await;
    let addr = host(&server);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    // Accepted by the kernel, then closed by the server at once.
    let mut over = tokio::net::TcpStream::connect(&addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ignored = over
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert!(closed_by_server(&mut over).await.is_empty());
    // One connection given back makes room again.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let client = reqwest::Client::new();
        if let Ok(resp) = client.get(server.url("/health")).send().await
            && resp.status().is_success()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room after a connection closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_names_docker_refuses_are_client_errors_everywhere() {
    let server = default_provider_server().await;
    for (image, why) in [
        ("UPPER:latest", "lowercase"),
        (":", "missing"),
        ("caf\u{e9}", "ASCII"),
        ("alpine:.bad", "tag"),
    ] {
        let (status, body) = server.post("/sandboxes", json!({ "image": image })).await;
        assert_eq!(status, 400, "{image}: {body}");
        assert_eq!(body["code"], "BAD_REQUEST", "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains(why)),
            "{image}: {body}"
        );
        let (status, body) = server
            .post("/templates", json!({ "name": "bad-image", "image": image }))
            .await;
        assert_eq!(status, 400, "template with {image}: {body}");
        let response = post_query(
            &server,
            &format!("mutation {{ spawnSandbox(input: {{image: {image:?}}}) {{ id }} }}"),
        )
        .await;
        assert_eq!(code(&response), "BAD_REQUEST", "{response}");
    }
    // Nothing was created by the refusals.
    let (_, listed) = server.get("/sandboxes").await;
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_the_runtime_cannot_run_now_is_a_conflict_not_a_500() {
    if !crate::support::docker_enabled() {
        return;
    }
    let server = TestServer::start(|c| c.providers.default = "docker".into()).await;
    let id = spawn(&server).await;
    let docker = |args: &[&str]| {
        let out = std::process::Command::new("docker")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("docker: {e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A paused container: the daemon refuses the exec with 409.
    docker(&["pause", &format!("stacyvm-{id}")]);
    let (status, body) = server
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({ "command": "echo hi", "mode": "shell" }),
        )
        .await;
    docker(&["unpause", &format!("stacyvm-{id}")]);
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "CONFLICT", "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("paused")),
        "{body}"
    );
    // Unpaused, the sandbox works again.
    assert_eq!(server.shell(&id, "echo back").await.trim(), "back");
    server.delete(&format!("/sandboxes/{id}")).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_whose_destroy_fails_is_audited_as_a_failure() {
    let server = TestServer::start(|_| {}).await;
    // A sandbox on a worker nobody can reach: its destroy cannot succeed.
    let id = "sb-0000e4f1";
    crate::support::insert_record(
        &server,
        id,
        "wk-gone",
        "docker",
        "running",
        Some("c1".into()),
    )
    .await;
    server
        .app_service
        .store()
        .set_sandbox_expiry(id, chrono::Utc::now() - chrono::Duration::seconds(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let expiries = || async {
        server
            .app_service
            .store()
            .list_audit(&stacyvm::store::AuditFilter {
                action: Some(stacyvm::service::AuditAction::SandboxExpire.as_str().into()),
                target: Some(id.into()),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap_or_default()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let events = loop {
        let events = expiries().await;
        if !events.is_empty() {
            break events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expiry was never audited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(events.iter().all(|e| e.outcome == "failure"), "{events:?}");
    assert!(
        events[0].detail.as_deref().is_some_and(|d| !d.is_empty()),
        "{events:?}"
    );
    let record = server
        .app_service
        .store()
        .get_sandbox(id)
        .await
        .ok()
        .flatten();
    assert_eq!(record.map(|r| r.state), Some("error".into()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_binary_safe_over_rest_and_graphql() {
    use base64::Engine;
    let server = crate::support::native_server(|_| {}).await;
    let id = spawn(&server).await;
    // Every byte value, and invalid UTF-8 sequences among them.
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i % 256) as u8).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let (status, body) = server
        .post(
            &format!("/sandboxes/{id}/files"),
            json!({"path": "/tmp/blob.bin", "content": b64, "encoding": "base64"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let raw = server
        .http
        .get(server.url(&format!("/sandboxes/{id}/files?path=/tmp/blob.bin")))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        raw.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/octet-stream")
    );
    assert_eq!(
        raw.bytes().await.unwrap_or_default().as_ref(),
        bytes.as_slice()
    );
    let q = "query($id: ID!, $e: FileEncoding!) { readFile(sandboxId: $id, path: \"/tmp/blob.bin\", encoding: $e) }";
    let read = post_query_vars(&server, q, json!({"id": id, "e": "BASE64"})).await;
    assert_eq!(read["data"]["readFile"], b64, "{read}");
    let text = post_query_vars(&server, q, json!({"id": id, "e": "TEXT"})).await;
    assert_eq!(code(&text), "BAD_REQUEST", "{text}");
    // Bad base64 is the client's mistake, and the file is unchanged.
    let (status, body) = server
        .post(
            &format!("/sandboxes/{id}/files"),
            json!({"path": "/tmp/blob.bin", "content": "@@not base64@@", "encoding": "base64"}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("BAD_REQUEST")),
        "{body}"
    );
    let (status, body) = server
        .post(
            &format!("/sandboxes/{id}/files"),
            json!({"path": "/tmp/x", "content": "x", "encoding": "rot13"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let read = post_query_vars(&server, q, json!({"id": id, "e": "BASE64"})).await;
    assert_eq!(read["data"]["readFile"], b64, "{read}");
    server.delete(&format!("/sandboxes/{id}")).await;
    server.stop().await;
}

async fn post_query_vars(server: &TestServer, query: &str, variables: Value) -> Value {
    server
        .http
        .post(graphql_url(server))
        .json(&json!({ "query": query, "variables": variables }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_graphql_runs_a_query_and_serves_the_page_otherwise() {
    let server = TestServer::start(|_| {}).await;
    let url = graphql_url(&server);
    let answer = server
        .http
        .get(format!("{url}?query={}", encode("{ health { status } }")))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answer.status().as_u16(), 200);
    let body: Value = answer.json().await.unwrap_or_default();
    assert_eq!(body["data"]["health"]["status"], "ok", "{body}");
    let answer = server
        .http
        .get(format!(
            "{url}?query={}",
            encode("mutation { spawnSandbox(input: {image: \"x\"}) { id } }")
        ))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answer.status().as_u16(), 405);
    let page = server
        .http
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        page.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/html"))
    );
    // Nothing was spawned by the refused GET.
    let (_, listed) = server.get("/sandboxes").await;
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    server.stop().await;
}

/// Percent-encodes everything but letters and digits.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_says_how_it_ended_and_whether_output_was_cut() {
    let server = crate::support::native_server(|c| c.defaults.max_exec_output_bytes = 1000).await;
    let id = spawn(&server).await;
    let exec = format!("/sandboxes/{id}/exec");
    // Cut output says so, on REST and GraphQL.
    let (status, body) = server
        .post(
            &exec,
            json!({"command": "head -c 5000 /dev/zero | tr '\\0' x", "mode": "shell"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stdout"].as_str().map(str::len), Some(1000));
    assert_eq!(body["truncated"], true, "{body}");
    let (_, body) = server
        .post(&exec, json!({"command": "echo short", "mode": "shell"}))
        .await;
    assert_eq!(body["truncated"], false, "{body}");
    let q = "mutation($id: ID!) { exec(sandboxId: $id, input: {command: \"head -c 5000 /dev/zero\", mode: SHELL}) { truncated } }";
    let answer = post_query_vars(&server, q, json!({"id": id})).await;
    assert_eq!(answer["data"]["exec"]["truncated"], true, "{answer}");
    // A streamed exec ends with a trailer only when asked for.
    let stream = |trailer: bool| {
        let url = server.url(&format!(
            "{exec}{}",
            if trailer { "?trailer=true" } else { "" }
        ));
        let http = server.http.clone();
        async move {
            http.post(url)
                .json(&json!({"command": "echo out; exit 3", "mode": "shell", "stream": true}))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .text()
                .await
                .unwrap_or_default()
        }
    };
    let plain = stream(false).await;
    let lines: Vec<Value> = plain
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(lines.iter().all(|l| l.get("type").is_none()), "{plain}");
    let with = stream(true).await;
    let last: Value = with
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    assert_eq!(last["type"], "end", "{with}");
    assert_eq!(last["exit_code"], 3, "{with}");
    assert!(
        last["execution_id"]
            .as_str()
            .is_some_and(|e| e.starts_with("ex-")),
        "{with}"
    );
    assert!(with.contains("\"data\":\"out\\n\""), "{with}");
    server.delete(&format!("/sandboxes/{id}")).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_paths_are_absolute_and_kernel_file_systems_are_not_written() {
    let server = default_provider_server().await;
    let id = spawn(&server).await;
    let files = format!("/sandboxes/{id}/files");
    for (path, why) in [
        ("a.txt", "absolute"),
        ("tmp/a.txt", "absolute"),
        ("/proc/x", "kernel"),
        ("/sys/x", "kernel"),
        ("/tmp/../dev/x", "kernel"),
    ] {
        let (status, body) = server
            .post(&files, json!({"path": path, "content": "x"}))
            .await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains(why)),
            "{path}: {body}"
        );
    }
    let (status, body) = server.get(&format!("{files}?path=etc/passwd")).await;
    assert_eq!(status, 400, "{body}");
    // Nothing landed at / either.
    assert!(!server.shell(&id, "ls /").await.contains("a.txt"));
    server.delete(&format!("/sandboxes/{id}")).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_may_hold_only_so_many_requests_in_flight() {
    let server = crate::support::native_server(|c| {
        c.auth.api_key = "in-flight-key".into();
        c.server.max_requests_per_credential = 2;
    })
    .await;
    let with_key = |rb: reqwest::RequestBuilder| rb.header("x-api-key", "in-flight-key");
    let resp = with_key(server.http.post(server.url("/sandboxes")))
        .json(&json!({ "image": crate::support::docker_image() }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let body: Value = resp.json().await.unwrap_or_default();
    let id = body["id"].as_str().unwrap_or_default().to_string();
    assert!(!id.is_empty(), "{body}");
    let exec = server.url(&format!("/sandboxes/{id}/exec"));
    // Two streams in flight: their bodies are open until the commands end.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let resp = with_key(server.http.post(&exec))
            .json(&json!({"command": "echo started; sleep 3", "mode": "shell", "stream": true}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status().as_u16(), 200);
        streams.push(resp);
    }
    let third = with_key(server.http.get(server.url("/sandboxes")))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(third.status().as_u16(), 429);
    let body: Value = third.json().await.unwrap_or_default();
    assert_eq!(body["code"], "RESOURCE_LIMIT", "{body}");
    // Another caller is not limited by this credential's requests.
    let (status, _) = server.get("/health").await;
    assert_eq!(status, 200);
    // Once the streams end, their places are back.
    for stream in streams {
        let text = stream.text().await.unwrap_or_default();
        assert!(text.contains("started"), "{text}");
    }
    let again = with_key(server.http.get(server.url("/sandboxes")))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.status().as_u16(), 200);
    with_key(server.http.delete(server.url(&format!("/sandboxes/{id}"))))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    server.stop().await;
}

/// Spawns a sandbox of the test image on the server's default provider.
async fn spawn(server: &TestServer) -> String {
    let (status, body) = server
        .post(
            "/sandboxes",
            json!({ "image": crate::support::docker_image() }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap_or_default().to_string()
}

/// A server on docker when the docker tests run, else on native.
async fn default_provider_server() -> TestServer {
    if crate::support::docker_enabled() {
        TestServer::start(|c| c.providers.default = "docker".into()).await
    } else {
        crate::support::native_server(|_| {}).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_read_surfaces_refuse_strangers() {
    let server = crate::support::native_server(|_| {}).await;
    let alice = crate::support::key(&server, "alice", stacyvm::auth::Role::Owner).await;
    let bob = crate::support::key(&server, "bob", stacyvm::auth::Role::Owner).await;
    let resp = server
        .http
        .post(server.url("/sandboxes"))
        .header("x-api-key", &alice)
        .json(&json!({ "image": crate::support::docker_image() }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let body: Value = resp.json().await.unwrap_or_default();
    let id = body["id"].as_str().unwrap_or_default().to_string();
    let write = server
        .http
        .post(server.url(&format!("/sandboxes/{id}/files")))
        .header("x-api-key", &alice)
        .json(&json!({"path": "/tmp/secret", "content": "alice's"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(write.status().as_u16(), 200);
    let read =
        format!("{{ readFile(sandboxId: \"{id}\", path: \"/tmp/secret\", encoding: BASE64) }}");
    let url = format!("{}?query={}", graphql_url(&server), encode(&read));
    // Anonymous GET /graphql with a query is refused, not run.
    let anonymous = server
        .http
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(anonymous.status().as_u16(), 401);
    // Another owner's readFile is NOT_FOUND over GET and POST alike.
    let as_bob: Value = server
        .http
        .get(&url)
        .header("x-api-key", &bob)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(code(&as_bob), "NOT_FOUND", "{as_bob}");
    assert!(!as_bob.to_string().contains("YWxpY2Un"), "{as_bob}");
    let as_bob: Value = server
        .http
        .post(graphql_url(&server))
        .header("x-api-key", &bob)
        .json(&json!({ "query": read }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(code(&as_bob), "NOT_FOUND", "{as_bob}");
    // The owner reads it.
    let as_alice: Value = server
        .http
        .get(&url)
        .header("x-api-key", &alice)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(as_alice["data"]["readFile"], "YWxpY2Uncw==", "{as_alice}");
    // A trailer asked for by another owner streams nothing of alice's.
    let stream = server
        .http
        .post(server.url(&format!("/sandboxes/{id}/exec?trailer=true")))
        .header("x-api-key", &bob)
        .json(&json!({"command": "cat /tmp/secret", "mode": "shell", "stream": true}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stream.status().as_u16(), 404);
    server
        .http
        .delete(server.url(&format!("/sandboxes/{id}")))
        .header("x-api-key", &alice)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    server.stop().await;
}

/// DNS rebinding: a web page whose name resolves to 127.0.0.1 would reach
/// an open server (no credentials) as same-origin. The open mode answers
/// only requests for localhost, an IP address or a listed name; a server
/// with credentials answers any name (the key is what counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_server_refuses_a_rebound_host_name() {
    let server = TestServer::start(|c| {
        c.providers.memory.enabled = true;
        c.server.allowed_hosts = vec!["sandboxes.internal".into()];
    })
    .await;
    let port = server
        .base
        .split(':')
        .nth(2)
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let get = |host: String| {
        let req = server
            .http
            .get(server.url("/sandboxes"))
            .header("host", host);
        async move {
            let resp = req.send().await.unwrap_or_else(|e| panic!("{e}"));
            let status = resp.status().as_u16();
            (
                status,
                resp.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    for evil in [
        "attacker.example",
        "attacker.example:80",
        &format!("rebind.attacker.example:{port}"),
    ] {
        let (status, body) = get(evil.to_string()).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("FORBIDDEN")),
            "{evil}: {body}"
        );
    }
    // Nothing was done for them: a spawn with a rebound name is refused too.
    let spawn = server
        .http
        .post(server.url("/sandboxes"))
        .header("host", "attacker.example")
        .json(&serde_json::json!({"provider": "memory", "image": "x"}))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    assert_eq!(spawn, 403);
    for fine in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "[::1]:7423".to_string(),
        "app.localhost".to_string(),
        format!("sandboxes.internal:{port}"),
    ] {
        let (status, body) = get(fine.clone()).await;
        assert_eq!(status, 200, "{fine}: {body}");
        assert_eq!(body, serde_json::json!([]), "nothing was spawned: {body}");
    }
    // With credentials, the key decides, not the name.
    let key = crate::support::key(&server, "alice", stacyvm::auth::Role::Owner).await;
    let with_key = server
        .http
        .get(server.url("/sandboxes"))
        .header("host", "api.example.com")
        .header("x-api-key", &key)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    assert_eq!(with_key, 200);
    server.stop().await;
}
