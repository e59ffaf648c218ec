//! The GraphQL API on a real server with the native provider, driven by a
//! real WebSocket client (tokio-tungstenite) speaking graphql-transport-ws
//! and the legacy graphql-ws protocol.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{TestServer, docker_image};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn server() -> TestServer {
    server_with(|_| {}).await
}

async fn server_with(tweak: impl FnOnce(&mut stacyvm::config::Config)) -> TestServer {
    crate::support::native_server(tweak).await
}

fn graphql_url(server: &TestServer) -> String {
    server.base.replace("/api/v1", "/graphql")
}

/// Runs a query or mutation over HTTP and returns the whole response.
async fn gql(server: &TestServer, query: &str, variables: Value) -> Value {
    server.post_graphql(query, variables).await.1
}

/// Like [`gql`] but fails on errors and returns `data`.
async fn gql_ok(server: &TestServer, query: &str, variables: Value) -> Value {
    let response = gql(server, query, variables).await;
    assert!(response.get("errors").is_none(), "{response}");
    response["data"].clone()
}

fn error_code(response: &Value) -> String {
    response["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn spawn(server: &TestServer) -> String {
    let data = gql_ok(
        server,
        "mutation($image: String) { spawnSandbox(input: {image: $image, ttl: \"10m\", metadata: {team: \"ml\"}}) { id state } }",
        json!({"image": docker_image()}),
    )
    .await;
    assert_eq!(data["spawnSandbox"]["state"], "RUNNING");
    data["spawnSandbox"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A graphql-transport-ws (or legacy graphql-ws) client.
/// A GraphQL WebSocket client (shared with the chaos suite).
pub(crate) struct Ws {
    socket: Socket,
    legacy: bool,
}

impl Ws {
    async fn connect(server: &TestServer, legacy: bool) -> Ws {
        let url = graphql_url(server).replace("http://", "ws://") + "/ws";
        Ws::connect_url(&url, legacy).await
    }

    /// Connects to a `ws://.../graphql/ws` URL and completes the handshake.
    pub(crate) async fn connect_url(url: &str, legacy: bool) -> Ws {
        Ws::connect_url_init(url, legacy, json!({})).await
    }

    /// Connects with `payload` (credentials) in `connection_init`.
    pub(crate) async fn connect_url_with(url: &str, payload: Value) -> Ws {
        Ws::connect_url_init(url, false, payload).await
    }

    async fn connect_url_init(url: &str, legacy: bool, payload: Value) -> Ws {
        let mut request = url.into_client_request().unwrap_or_else(|e| panic!("{e}"));
        let protocol = if legacy {
            "graphql-ws"
        } else {
            "graphql-transport-ws"
        };
        request.headers_mut().insert(
            "sec-websocket-protocol",
            protocol.parse().unwrap_or_else(|e| panic!("{e}")),
        );
        let (socket, response) = tokio_tungstenite::connect_async(request)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok()),
            Some(protocol)
        );
        let mut ws = Ws { socket, legacy };
        ws.send(json!({"type": "connection_init", "payload": payload}))
            .await;
        let ack = ws.recv().await;
        assert_eq!(ack["type"], "connection_ack", "{ack}");
        ws
    }

    pub(crate) async fn send(&mut self, message: Value) {
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
    }

    /// The next protocol message, answering pings and skipping keep-alives.
    pub(crate) async fn recv(&mut self) -> Value {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(20), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no message within 20s"));
            let message = match next {
                Some(Ok(m)) => m,
                other => panic!("socket ended: {other:?}"),
            };
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            match value["type"].as_str() {
                Some("ping") => self.send(json!({"type": "pong"})).await,
                Some("ka") => {}
                _ => return value,
            }
        }
    }

    /// Every protocol message until the server closes the socket, and the
    /// close code it sent (None when the socket just ended).
    pub(crate) async fn until_closed(&mut self, limit: Duration) -> (Vec<Value>, Option<u16>) {
        let mut messages = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("socket still open after {limit:?}: {messages:?}"));
            match next {
                Some(Ok(Message::Text(text))) => {
                    let value: Value =
                        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
                    messages.push(value);
                }
                Some(Ok(Message::Close(frame))) => {
                    return (messages, frame.map(|f| u16::from(f.code)));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return (messages, None),
            }
        }
    }

    pub(crate) async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        let kind = if self.legacy { "start" } else { "subscribe" };
        self.send(
            json!({"id": id, "type": kind, "payload": {"query": query, "variables": variables}}),
        )
        .await;
    }

    /// Payloads of `next`/`data` messages for `id` until `complete`.
    pub(crate) async fn collect(&mut self, id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let message = self.recv().await;
            if message["id"] != id {
                continue;
            }
            match message["type"].as_str() {
                Some("next" | "data") => {
                    assert!(message["payload"].get("errors").is_none(), "{message}");
                    out.push(message["payload"]["data"].clone());
                }
                Some("complete") => return out,
                _ => panic!("unexpected message {message}"),
            }
        }
    }
}

const EXEC_EVENT: &str = "__typename ... on OutputChunk { seq stream data dataBase64 } ... on OutputTruncated { fromSeq toSeq } ... on ExecExit { exitCode duration timedOut }";

fn events_of(payloads: &[Value], field: &str) -> Vec<Value> {
    payloads.iter().map(|p| p[field].clone()).collect()
}

/// Joins the text of one stream and checks seqs ascend with no duplicate.
fn stream_text(events: &[Value], stream: &str) -> String {
    let mut last = -1i64;
    let mut text = String::new();
    for e in events {
        if e["__typename"] == "OutputChunk" {
            let seq = e["seq"].as_i64().unwrap_or(-1);
            assert!(seq > last, "seq {seq} after {last}");
            last = seq;
            if e["stream"] == stream {
                text.push_str(e["data"].as_str().unwrap_or_default());
            }
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_events_and_exec_output_over_graphql_transport_ws() {
    let server = server().await;
    let mut events = Ws::connect(&server, false).await;
    events
        .subscribe(
            "ev",
            "subscription { sandboxEvents { sandboxId state reason } }",
            json!({}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A REST spawn publishes to the same bus that GraphQL subscribers read.
    let (status, body) = server
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap_or_default().to_string();
    let mut states = Vec::new();
    while states.len() < 2 {
        let message = events.recv().await;
        let event = &message["payload"]["data"]["sandboxEvents"];
        if event["sandboxId"] == id.as_str() {
            states.push(event["state"].as_str().unwrap_or_default().to_string());
        }
    }
    assert_eq!(states, ["CREATING", "RUNNING"]);

    let data = gql_ok(
        &server,
        "mutation($id: ID!) { startExec(sandboxId: $id, input: {command: \"echo out1; echo err1 >&2; sleep 0.3; echo out2; exit 3\"}) { id status } }",
        json!({"id": id}),
    )
    .await;
    let execution = data["startExec"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut ws = Ws::connect(&server, false).await;
    ws.subscribe(
        "out",
        &format!("subscription($e: ID!) {{ execOutput(executionId: $e) {{ {EXEC_EVENT} }} }}"),
        json!({"e": execution}),
    )
    .await;
    let out = events_of(&ws.collect("out").await, "execOutput");
    assert_eq!(stream_text(&out, "STDOUT"), "out1\nout2\n");
    assert_eq!(stream_text(&out, "STDERR"), "err1\n");
    let last = out.last().cloned().unwrap_or_default();
    assert_eq!(
        (last["__typename"].as_str(), last["exitCode"].as_i64()),
        (Some("ExecExit"), Some(3)),
        "{out:?}"
    );
    assert_eq!(
        out.iter().filter(|e| e["__typename"] == "ExecExit").count(),
        1
    );

    // The execution record matches.
    let data = gql_ok(
        &server,
        "query($e: ID!) { execution(id: $e) { status exitCode stdoutTail } }",
        json!({"e": execution}),
    )
    .await;
    assert_eq!(
        data["execution"],
        json!({"status": "completed", "exitCode": 3, "stdoutTail": "out1\nout2\n"})
    );

    // Destroy through GraphQL; the subscriber sees it.
    let data = gql_ok(
        &server,
        "mutation($id: ID!) { destroySandbox(id: $id) }",
        json!({"id": id}),
    )
    .await;
    assert_eq!(data["destroySandbox"], true);
    let mut states = Vec::new();
    while states.len() < 2 {
        let message = events.recv().await;
        let event = &message["payload"]["data"]["sandboxEvents"];
        if event["sandboxId"] == id.as_str() {
            states.push(event["state"].as_str().unwrap_or_default().to_string());
        }
    }
    assert_eq!(states, ["DESTROYING", "DESTROYED"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiners_resume_from_seq_and_many_follow_one_execution() {
    let server = server().await;
    late_joiners_resume_from_seq(&server).await;
    server.stop().await;
}

/// The same, through a control plane whose sandboxes all live on a
/// `stacyvm worker` process: output crosses the worker RPC first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiners_resume_from_seq_through_a_remote_worker() {
    let server = crate::workers::control_plane().await;
    let cp = crate::workers::base(&server);
    let w1 = crate::workers::WorkerProcess::start(&cp, "w1", "token-one");
    crate::workers::wait_for_workers(&server, &["w1"]).await;
    late_joiners_resume_from_seq(&server).await;
    let (_, sandboxes) = server.get("/sandboxes").await;
    assert_eq!(sandboxes[0]["worker_id"], "w1", "{sandboxes}");
    drop(w1);
}

/// Two subscribers follow one command's output from seq 0, one joining
/// late; a third reconnects from seq 2 and gets exactly what follows.
async fn late_joiners_resume_from_seq(server: &TestServer) {
    let id = spawn(server).await;
    let data = gql_ok(
        server,
        "mutation($id: ID!) { startExec(sandboxId: $id, input: {command: \"for i in 1 2 3 4 5 6; do echo line$i; sleep 0.2; done\"}) { id } }",
        json!({"id": id}),
    )
    .await;
    let execution = data["startExec"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let query = format!(
        "subscription($e: ID!, $from: Int) {{ execOutput(executionId: $e, fromSeq: $from) {{ {EXEC_EVENT} }} }}"
    );

    // Two subscribers join while it runs, one a little later.
    let mut a = Ws::connect(server, false).await;
    a.subscribe("a", &query, json!({"e": execution, "from": 0}))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut b = Ws::connect(server, false).await;
    b.subscribe("b", &query, json!({"e": execution, "from": 0}))
        .await;
    let (a_out, b_out) = tokio::join!(a.collect("a"), b.collect("b"));
    let (a_out, b_out) = (
        events_of(&a_out, "execOutput"),
        events_of(&b_out, "execOutput"),
    );
    let expected: String = (1..=6).map(|i| format!("line{i}\n")).collect();
    assert_eq!(stream_text(&a_out, "STDOUT"), expected);
    assert_eq!(a_out, b_out, "both subscribers see the same events");

    // A reconnect from seq 2 gets exactly what follows, no duplicate.
    let mut c = Ws::connect(server, false).await;
    c.subscribe("c", &query, json!({"e": execution, "from": 2}))
        .await;
    let c_out = events_of(&c.collect("c").await, "execOutput");
    let seqs: Vec<i64> = c_out.iter().filter_map(|e| e["seq"].as_i64()).collect();
    let all: Vec<i64> = a_out
        .iter()
        .filter_map(|e| e["seq"].as_i64())
        .filter(|s| *s >= 2)
        .collect();
    assert_eq!(seqs, all);
    assert_eq!(
        c_out.last().map(|e| e["__typename"].clone()),
        Some(json!("ExecExit"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_gets_a_truncation_event_and_never_blocks_the_command() {
    let server = server().await;
    let id = spawn(&server).await;
    // Subscribe with execStream (start and follow in one operation), then
    // do not read while the command writes far more than the buffer.
    let mut slow = Ws::connect(&server, false).await;
    slow.subscribe(
        "s",
        &format!("subscription($id: ID!) {{ execStream(sandboxId: $id, input: {{command: \"head -c 40000000 /dev/zero | tr '\\\\0' x; echo; echo done\"}}) {{ {EXEC_EVENT} }} }}"),
        json!({"id": id}),
    )
    .await;
    // The command finishes although nobody reads its output.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let data = gql_ok(
            &server,
            "query($id: ID!) { executions(sandboxId: $id) { nodes { status } } }",
            json!({"id": id}),
        )
        .await;
        if data["executions"]["nodes"][0]["status"] == "completed" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the command was blocked by a slow subscriber"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = events_of(&slow.collect("s").await, "execStream");
    assert!(
        out.iter().any(|e| e["__typename"] == "OutputTruncated"),
        "no truncation event"
    );
    assert!(stream_text(&out, "STDOUT").ends_with("done\n"));
    assert_eq!(out.last().map(|e| e["exitCode"].clone()), Some(json!(0)));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_graphql_ws_protocol_streams_output() {
    let server = server().await;
    let id = spawn(&server).await;
    let mut ws = Ws::connect(&server, true).await;
    ws.subscribe(
        "1",
        &format!("subscription($id: ID!) {{ execStream(sandboxId: $id, input: {{command: \"printf '\\\\377\\\\376'; echo hi >&2\"}}) {{ {EXEC_EVENT} }} }}"),
        json!({"id": id}),
    )
    .await;
    let out = events_of(&ws.collect("1").await, "execStream");
    assert_eq!(stream_text(&out, "STDERR"), "hi\n");
    // Binary output keeps its exact bytes in dataBase64.
    let binary: Vec<_> = out.iter().filter(|e| e["stream"] == "STDOUT").collect();
    assert_eq!(binary[0]["dataBase64"], "//4=");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_operations_get_coded_errors_and_leave_the_connection_usable() {
    let server = server().await;
    let id = spawn(&server).await;
    let mut ws = Ws::connect(&server, false).await;
    // Two operations and no operation name: ambiguous.
    let ambiguous = "subscription { sandboxEvents { sandboxId } } query { health { status } }";
    for (n, (query, want)) in [
        ("subscription { sandboxEvents { ", "BAD_REQUEST"),
        ("subscription { sandboxEvents { nope } }", "BAD_REQUEST"),
        (
            "subscription { execOutput(executionId: \"ex-missing\") { __typename } }",
            "NOT_FOUND",
        ),
        (
            "subscription { sandboxEvents(sandboxId: \"sb-00000000\") { state } }",
            "NOT_FOUND",
        ),
        (ambiguous, "BAD_REQUEST"),
    ]
    .into_iter()
    .enumerate()
    {
        let sub_id = format!("bad{n}");
        ws.subscribe(&sub_id, query, json!({})).await;
        let message = ws.recv().await;
        assert_eq!(message["id"], sub_id.as_str(), "{message}");
        let code = match message["type"].as_str() {
            Some("error") => message["payload"][0]["extensions"]["code"].clone(),
            Some("next") => message["payload"]["errors"][0]["extensions"]["code"].clone(),
            _ => panic!("unexpected {message}"),
        };
        assert_eq!(code, want, "{query}: {message}");
        if message["type"] == "next" {
            // An error answered as a result is followed by complete.
            assert_eq!(ws.recv().await["type"], "complete");
        }
    }
    // Same connection, a good operation still works.
    ws.subscribe("good", &format!("subscription($id: ID!) {{ execStream(sandboxId: $id, input: {{command: \"echo fine\"}}) {{ {EXEC_EVENT} }} }}"), json!({"id": id})).await;
    let out = events_of(&ws.collect("good").await, "execStream");
    assert_eq!(stream_text(&out, "STDOUT"), "fine\n");

    // HTTP errors carry codes too.
    assert_eq!(
        error_code(
            &gql(
                &server,
                "{ sandbox(id: \"sb-00000000\") { id } }",
                json!({})
            )
            .await
        ),
        "NOT_FOUND"
    );
    assert_eq!(
        error_code(
            &gql(
                &server,
                "{ sandboxes(first: 1000) { edges { cursor } } }",
                json!({})
            )
            .await
        ),
        "BAD_REQUEST"
    );
    assert_eq!(
        error_code(
            &gql(
                &server,
                "mutation { spawnSandbox(input: {ttl: \"banana\"}) { id } }",
                json!({})
            )
            .await
        ),
        "BAD_REQUEST"
    );
    assert_eq!(
        error_code(
            &gql(
                &server,
                "mutation { spawnSandbox(input: {ttl: \"100h\"}) { id } }",
                json!({})
            )
            .await
        ),
        "BAD_REQUEST"
    );
    assert_eq!(
        error_code(&gql(&server, "{ execution(id: \"ex-nope\") { id } }", json!({})).await),
        "NOT_FOUND"
    );
    let nested = "{ a: sandboxes { edges { node { worker { id } executions { id } } } } b: sandboxes { edges { node { id } } } }";
    assert!(
        gql(&server, nested, json!({}))
            .await
            .get("errors")
            .is_none()
    );
    let resp = server
        .http
        .post(graphql_url(&server))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap_or_default();
    assert_eq!(error_code(&body), "BAD_REQUEST");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_limit_is_enforced() {
    let server = server().await;
    // Deeper than MAX_DEPTH through the connection wrappers.
    let mut query = String::from("id");
    for _ in 0..6 {
        query = format!("sandboxes {{ edges {{ node {{ {query} }} }} }}");
    }
    let response = gql(&server, &format!("{{ {query} }}"), json!({})).await;
    assert_eq!(error_code(&response), "BAD_REQUEST", "{response}");
    assert!(
        response["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("nested"),
        "{response}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_sandboxes_costs_a_bounded_number_of_queries() {
    // No background loop may touch the store while statements are counted.
    let server = server_with(|c| {
        let hour = stacyvm::duration::GoDuration(Duration::from_secs(3600));
        c.lifecycle.reaper_interval = hour;
        c.lifecycle.health_interval = hour;
        c.lifecycle.heartbeat_interval = hour;
    })
    .await;
    let query = "{ sandboxes(first: 100, filter: {labels: {team: \"ml\"}}) { edges { node { id worker { id } template { name } executions { id } auditEvents { id } } } pageInfo { hasNextPage } } }";
    let mut costs = Vec::new();
    for target in [3usize, 30] {
        loop {
            let data = gql_ok(
                &server,
                "{ sandboxes(first: 100) { edges { cursor } } }",
                json!({}),
            )
            .await;
            if data["sandboxes"]["edges"].as_array().map_or(0, Vec::len) >= target {
                break;
            }
            let id = spawn(&server).await;
            gql_ok(&server, "mutation($id: ID!) { exec(sandboxId: $id, input: {command: \"true\"}) { exitCode } }", json!({"id": id})).await;
        }
        // The open-mode credential check refreshes at most every 2 s and may
        // land inside one measurement; the least of three is the page's cost.
        let mut cost = u64::MAX;
        let mut data = Value::Null;
        for _ in 0..3 {
            let before = server.app_service.store().query_count();
            data = gql_ok(&server, query, json!({})).await;
            cost = cost.min(server.app_service.store().query_count() - before);
        }
        let edges = data["sandboxes"]["edges"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(edges.len(), target);
        assert!(edges.iter().all(|e| {
            e["node"]["executions"]
                .as_array()
                .is_some_and(|x| x.len() == 1)
        }));
        assert!(edges.iter().all(|e| e["node"]["worker"]["id"].is_string()));
        costs.push(cost);
    }
    // A page costs a handful of statements whatever its size: one per
    // kind of related object (a batch may split in two when the machine is
    // busy and a resolver pass outlasts the loader's delay), never one per row.
    assert!(costs.iter().all(|c| *c <= 10), "query counts {costs:?}");
    assert!(
        costs[1] <= costs[0] + 4,
        "cost grows with the page: {costs:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_and_filters() {
    let server = server().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(spawn(&server).await);
    }
    let (status, _) = server
        .post(
            "/sandboxes",
            json!({"image": docker_image(), "metadata": {"team": "web"}}),
        )
        .await;
    assert_eq!(status, 201);
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let data = gql_ok(
            &server,
            "query($after: String) { sandboxes(first: 2, after: $after, filter: {labels: {team: \"ml\"}, states: [RUNNING]}) { edges { cursor node { id metadata } } pageInfo { hasNextPage } } }",
            json!({"after": after}),
        )
        .await;
        let page = &data["sandboxes"];
        for edge in page["edges"].as_array().cloned().unwrap_or_default() {
            assert_eq!(edge["node"]["metadata"]["team"], "ml");
            seen.push(edge["node"]["id"].as_str().unwrap_or_default().to_string());
            after = edge["cursor"].as_str().map(str::to_string);
        }
        if page["pageInfo"]["hasNextPage"] != true {
            break;
        }
    }
    assert_eq!(seen, ids, "every ml sandbox once, in creation order");
    let response = gql(
        &server,
        "{ sandboxes(after: \"garbage\") { edges { cursor } } }",
        json!({}),
    )
    .await;
    assert_eq!(error_code(&response), "BAD_REQUEST");
    server.stop().await;
}

#[test]
fn schema_graphql_is_in_sync() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql"))
        .unwrap_or_else(|e| panic!("read schema.graphql: {e}"));
    let current = stacyvm::api::graphql::sdl();
    assert!(
        committed == current,
        "schema.graphql is out of date: run `cargo run -- schema > schema.graphql`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_websocket_messages_close_the_connection() {
    let server = server().await;
    let mut ws = Ws::connect(&server, false).await;
    let huge = "x".repeat(stacyvm::api::graphql::MAX_WS_MESSAGE_BYTES + 1024);
    ws.send(json!({"id": "big", "type": "subscribe", "payload": {"query": huge}}))
        .await;
    // The server closes with 1009 (message too big) rather than buffering it.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await;
    assert!(matches!(closed, Ok(Some(1009)) | Ok(None)), "{closed:?}");
    // Other connections are unaffected.
    let data = gql_ok(&server, "{ health { status } }", json!({})).await;
    assert_eq!(data["health"]["status"], "ok");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_can_be_turned_off() {
    let open = server().await;
    let query = "{ __schema { queryType { name } } }";
    assert_eq!(
        gql_ok(&open, query, json!({})).await["__schema"]["queryType"]["name"],
        "QueryRoot"
    );
    open.stop().await;
    let closed = server_with(|c| c.server.graphql_introspection = false).await;
    // Disabled introspection answers no schema (async-graphql returns null).
    let response = gql(&closed, query, json!({})).await;
    assert!(response["data"]["__schema"].is_null(), "{response}");
    closed.stop().await;
}

/// Terminals over GraphQL: `openTerminal`, the `terminal` subscription
/// (over the same WebSocket as every subscription), `terminalInput` and
/// `resizeTerminal`; another owner is turned away with NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_over_graphql() {
    use base64::Engine;
    let server = crate::support::native_server(|_| {}).await;
    let alice = crate::support::key(&server, "alice", stacyvm::auth::Role::Owner).await;
    let bob = crate::support::key(&server, "bob", stacyvm::auth::Role::Owner).await;
    let gql = |key: String, query: &'static str, variables: Value| {
        let server = &server;
        async move {
            let resp = server
                .http
                .post(graphql_url(server))
                .header("x-api-key", key)
                .json(&json!({"query": query, "variables": variables}))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            resp.json::<Value>().await.unwrap_or_else(|e| panic!("{e}"))
        }
    };
    let spawned = gql(
        alice.clone(),
        "mutation($i: String) { spawnSandbox(input: {image: $i}) { id } }",
        json!({"i": crate::support::docker_image()}),
    )
    .await;
    let id = spawned["data"]["spawnSandbox"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{spawned}"))
        .to_string();
    let opened = gql(
        alice.clone(),
        "mutation($s: ID!) { openTerminal(sandboxId: $s, input: {cols: 80, rows: 24}) { id sandboxId } }",
        json!({"s": id}),
    )
    .await;
    let session = opened["data"]["openTerminal"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{opened}"))
        .to_string();

    let url = graphql_url(&server).replace("http://", "ws://") + "/ws";
    let mut ws = Ws::connect_url_with(&url, json!({"X-API-Key": alice})).await;
    ws.subscribe(
        "t",
        "subscription($s: ID!, $t: ID!) { terminal(sandboxId: $s, sessionId: $t) { __typename ... on TerminalOutput { dataBase64 } ... on TerminalEnd { exitCode error } } }",
        json!({"s": id, "t": session}),
    )
    .await;
    let input = "mutation($s: ID!, $t: ID!, $d: String!) { terminalInput(sandboxId: $s, sessionId: $t, data: $d) }";
    let typed = gql(
        alice.clone(),
        input,
        json!({"s": id, "t": session, "d": "stty size; echo G-$((2*4))\r"}),
    )
    .await;
    assert_eq!(typed["data"]["terminalInput"], true, "{typed}");
    let resize = "mutation($s: ID!, $t: ID!) { resizeTerminal(sandboxId: $s, sessionId: $t, cols: 91, rows: 17) }";
    let mut screen = String::new();
    let mut resized = false;
    let end = loop {
        let message = ws.recv().await;
        assert_eq!(message["type"], "next", "{message}");
        let event = &message["payload"]["data"]["terminal"];
        match event["__typename"].as_str() {
            Some("TerminalOutput") => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(event["dataBase64"].as_str().unwrap_or_default())
                    .unwrap_or_else(|e| panic!("{e}"));
                screen.push_str(&String::from_utf8_lossy(&bytes));
                if screen.contains("G-8") && !resized {
                    assert!(screen.contains("24 80"), "{screen}");
                    resized = true;
                    let r = gql(alice.clone(), resize, json!({"s": id, "t": session})).await;
                    assert_eq!(r["data"]["resizeTerminal"], true, "{r}");
                    gql(
                        alice.clone(),
                        input,
                        json!({"s": id, "t": session, "d": "stty size; exit 6\r"}),
                    )
                    .await;
                }
            }
            Some("TerminalEnd") => break event.clone(),
            other => panic!("{other:?}: {message}"),
        }
    };
    assert!(screen.contains("17 91"), "{screen}");
    assert_eq!(end["exitCode"], 6, "{end}");

    // Another owner: neither opens nor types in Alice's sandbox.
    let theirs = gql(bob.clone(), input, json!({"s": id, "t": session, "d": "x"})).await;
    assert_eq!(
        theirs["errors"][0]["extensions"]["code"], "NOT_FOUND",
        "{theirs}"
    );
    let open = gql(
        bob,
        "mutation($s: ID!) { openTerminal(sandboxId: $s) { id } }",
        json!({"s": id}),
    )
    .await;
    assert_eq!(
        open["errors"][0]["extensions"]["code"], "NOT_FOUND",
        "{open}"
    );
    // Bad sizes are the caller's mistake.
    let bad = gql(
        alice,
        "mutation($s: ID!) { openTerminal(sandboxId: $s, input: {cols: 0}) { id } }",
        json!({"s": id}),
    )
    .await;
    assert_eq!(
        bad["errors"][0]["extensions"]["code"], "BAD_REQUEST",
        "{bad}"
    );
    server.stop().await;
}
