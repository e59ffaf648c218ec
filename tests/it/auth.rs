//! Identity and isolation: keys, roles, JWT, the owner matrix over every
//! surface, quotas under concurrency, queued admission, rate limits and
//! the audit trail.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use stacyvm::auth::Role;
use stacyvm::service::NewApiKey;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{TestServer, docker_image, key};

async fn server(tweak: impl FnOnce(&mut stacyvm::config::Config)) -> TestServer {
    crate::support::native_server(tweak).await
}

/// One request with credentials; returns status, body and headers.
pub(crate) async fn call(
    server: &TestServer,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let url = if path.starts_with("/graphql") {
        server.base.replace("/api/v1", "") + path
    } else {
        server.url(path)
    };
    let mut req = server.http.request(method, url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        headers,
    )
}

pub(crate) async fn gql(server: &TestServer, key: &str, query: &str, variables: Value) -> Value {
    call(
        server,
        Method::POST,
        "/graphql",
        &[("x-api-key", key)],
        Some(json!({"query": query, "variables": variables})),
    )
    .await
    .1
}

pub(crate) fn code(v: &Value) -> &str {
    v["errors"][0]["extensions"]["code"].as_str().unwrap_or("")
}

/// Opens a graphql-transport-ws connection authenticated in the init payload.
pub(crate) async fn ws(
    server: &TestServer,
    key: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = server
        .base
        .replace("http://", "ws://")
        .replace("/api/v1", "/graphql/ws");
    let mut request = url.into_client_request().unwrap_or_else(|e| panic!("{e}"));
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws"
            .parse()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let init = json!({"type": "connection_init", "payload": {"X-API-Key": key}});
    socket
        .send(Message::Text(init.to_string().into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ack = next_json(&mut socket).await;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    socket
}

pub(crate) async fn next_json(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), socket.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).unwrap_or_default();
                if v["type"] != "ping" {
                    return v;
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("websocket ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_cannot_see_or_touch_each_other_on_any_surface() {
    let server = server(|_| {}).await;
    let a = key(&server, "alice", Role::Owner).await;
    let b = key(&server, "bob", Role::Owner).await;
    let admin = key(&server, "root", Role::Admin).await;
    let (ha, hb) = ([("x-api-key", a.as_str())], [("x-api-key", b.as_str())]);

    // Without credentials nothing but health answers.
    let (s, body, _) = call(&server, Method::GET, "/sandboxes", &[], None).await;
    assert_eq!((s, body["code"].as_str()), (401, Some("UNAUTHORIZED")));
    assert_eq!(
        call(&server, Method::GET, "/health", &[], None).await.0,
        200
    );

    // Alice's resources: a sandbox (owner_id in the body is ignored for her),
    // an execution, a file, a template.
    let (s, sb, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &ha,
        Some(json!({"image": docker_image(), "owner_id": "bob"})),
    )
    .await;
    assert_eq!(s, 201, "{sb}");
    assert_eq!(
        sb["owner_id"], "alice",
        "an owner cannot create sandboxes for others"
    );
    let id = sb["id"].as_str().unwrap_or_default().to_string();
    let (s, out, _) = call(
        &server,
        Method::POST,
        &format!("/sandboxes/{id}/exec"),
        &ha,
        Some(json!({"command": "echo secret-output"})),
    )
    .await;
    assert_eq!(s, 200);
    let execution = out["execution_id"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        call(
            &server,
            Method::POST,
            &format!("/sandboxes/{id}/files"),
            &ha,
            Some(json!({"path": "/tmp/s", "content": "alice"}))
        )
        .await
        .0,
        200
    );
    assert_eq!(
        call(
            &server,
            Method::POST,
            "/templates",
            &ha,
            Some(json!({"name": "alice-t", "image": docker_image()}))
        )
        .await
        .0,
        201
    );

    // Bob: every REST route on Alice's sandbox answers as if it did not exist.
    let mut routes = crate::support::sandbox_routes(&id);
    routes.extend([
        (Method::GET, "/templates/alice-t".into(), None),
        (
            Method::PUT,
            "/templates/alice-t".into(),
            Some(json!({"image": docker_image()})),
        ),
        (Method::DELETE, "/templates/alice-t".into(), None),
        (Method::POST, "/templates/alice-t/spawn".into(), None),
        (Method::GET, "/quotas/alice".into(), None),
        (Method::GET, "/quotas/alice/usage".into(), None),
    ]);
    for (method, path, body) in routes {
        let (s, answer, _) = call(&server, method.clone(), &path, &hb, body).await;
        assert_eq!(
            (s, answer["code"].as_str()),
            (404, Some("NOT_FOUND")),
            "bob {method} {path}: {answer}"
        );
    }
    // Admin-only routes are forbidden to owners.
    let local = server.app_service.scheduler().in_process_workers()[0]
        .id()
        .to_string();
    let mut admin_only: Vec<(Method, String)> = ["/quotas", "/admin/quotas", "/admin/workers"]
        .into_iter()
        .map(|p| (Method::GET, p.to_string()))
        .collect();
    admin_only.push((Method::GET, format!("/admin/workers/{local}")));
    for verb in ["cordon", "uncordon", "drain"] {
        admin_only.push((Method::POST, format!("/admin/workers/{local}/{verb}")));
    }
    for (method, path) in admin_only {
        let (s, answer, _) = call(&server, method, &path, &hb, None).await;
        assert_eq!(
            (s, answer["code"].as_str()),
            (403, Some("FORBIDDEN")),
            "{path}"
        );
    }
    assert_eq!(
        server.app_service.scheduler().admin_state(&local),
        stacyvm::worker::AdminState::Active,
        "an owner's refused cordon changed the worker"
    );
    let (s, _, _) = call(
        &server,
        Method::PUT,
        "/quotas/bob",
        &hb,
        Some(json!({"max_sandboxes": 100})),
    )
    .await;
    assert_eq!(s, 403, "an owner cannot raise its own quota");

    // Lists, templates, counts and admission answers never show Alice's data.
    let (_, list, _) = call(&server, Method::GET, "/sandboxes", &hb, None).await;
    assert_eq!(list, json!([]));
    let (_, templates, _) = call(&server, Method::GET, "/templates", &hb, None).await;
    assert_eq!(templates, json!([]));
    let (_, admission, _) = call(
        &server,
        Method::POST,
        "/sandboxes/admission",
        &hb,
        Some(json!({})),
    )
    .await;
    assert_eq!(admission["active_owner_sandboxes"], 0);
    let (_, audit, _) = call(&server, Method::GET, "/admin/audit", &hb, None).await;
    assert!(
        audit
            .as_array()
            .is_some_and(|events| events.iter().all(|e| e["actor"] == "bob")),
        "{audit}"
    );
    // Bob's own attempts on that id are in his trail, all failed: the id is
    // one he sent, and nothing of Alice's (her actions, her output) shows.
    let about_id: Vec<_> = audit
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["target"] == id.as_str())
        .collect();
    assert!(
        about_id.iter().all(|e| e["outcome"] == "failure"),
        "{about_id:?}"
    );
    assert!(!audit.to_string().contains("secret-output"));

    // GraphQL: fields, lists, executions and mutations.
    for query in [
        format!("{{ sandbox(id: \"{id}\") {{ id }} }}"),
        format!("{{ execution(id: \"{execution}\") {{ stdoutTail }} }}"),
        format!("{{ executions(sandboxId: \"{id}\") {{ nodes {{ id }} }} }}"),
        format!("mutation {{ destroySandbox(id: \"{id}\") }}"),
        format!(
            "mutation {{ exec(sandboxId: \"{id}\", input: {{command: \"id\"}}) {{ stdout }} }}"
        ),
        format!(
            "mutation {{ writeFile(input: {{sandboxId: \"{id}\", path: \"/tmp/x\", content: \"b\"}}) }}"
        ),
        "{ template(name: \"alice-t\") { name } }".to_string(),
        "mutation { deleteTemplate(name: \"alice-t\") }".to_string(),
    ] {
        let answer = gql(&server, &b, &query, json!({})).await;
        assert_eq!(code(&answer), "NOT_FOUND", "{query}: {answer}");
    }
    for query in [
        "{ quotas { ownerId } }",
        "mutation { setQuota(input: {ownerId: \"bob\", maxSandboxes: 9}) { ownerId } }",
    ] {
        assert_eq!(
            code(&gql(&server, &b, query, json!({})).await),
            "FORBIDDEN",
            "{query}"
        );
    }
    let lists = gql(
        &server,
        &b,
        "{ sandboxes { nodes { id } } templates { name } auditEvents { nodes { actor target } } }",
        json!({}),
    )
    .await;
    assert_eq!(lists["data"]["sandboxes"]["nodes"], json!([]));
    assert_eq!(lists["data"]["templates"], json!([]));
    let audit_nodes = lists["data"]["auditEvents"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(audit_nodes.iter().all(|e| e["actor"] == "bob"), "{lists}");

    // Subscriptions: Bob cannot follow Alice's output or events.
    let mut bob_ws = ws(&server, &b).await;
    for (n, query) in [
        format!("subscription {{ execOutput(executionId: \"{execution}\") {{ __typename }} }}"),
        format!("subscription {{ sandboxEvents(sandboxId: \"{id}\") {{ state }} }}"),
        format!("subscription {{ execStream(sandboxId: \"{id}\", input: {{command: \"id\"}}) {{ __typename }} }}"),
    ]
    .into_iter()
    .enumerate()
    {
        let sub = json!({"id": format!("x{n}"), "type": "subscribe", "payload": {"query": query}});
        bob_ws.send(Message::Text(sub.to_string().into())).await.unwrap_or_else(|e| panic!("{e}"));
        let answer = next_json(&mut bob_ws).await;
        let c = answer["payload"][0]["extensions"]["code"].as_str().or(answer["payload"]["errors"][0]["extensions"]["code"].as_str());
        assert_eq!(c, Some("NOT_FOUND"), "{query}: {answer}");
        if answer["type"] == "next" {
            next_json(&mut bob_ws).await; // complete
        }
    }
    // Bob's global event stream stays silent while Alice works; Alice's does not.
    let all = json!({"id": "all", "type": "subscribe", "payload": {"query": "subscription { sandboxEvents { sandboxId ownerId } }"}});
    bob_ws
        .send(Message::Text(all.to_string().into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut alice_ws = ws(&server, &a).await;
    alice_ws
        .send(Message::Text(all.to_string().into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, _, _) = call(
        &server,
        Method::DELETE,
        &format!("/sandboxes/{id}"),
        &ha,
        None,
    )
    .await;
    assert_eq!(s, 200);
    let seen = next_json(&mut alice_ws).await;
    assert_eq!(
        seen["payload"]["data"]["sandboxEvents"]["sandboxId"],
        id.as_str()
    );
    let bob_saw = tokio::time::timeout(Duration::from_millis(800), bob_ws.next()).await;
    assert!(bob_saw.is_err(), "bob received {bob_saw:?}");

    // The admin sees everyone's.
    let (_, audit, _) = call(
        &server,
        Method::GET,
        "/admin/audit?actor=alice",
        &[("x-admin-api-key", admin.as_str())],
        None,
    )
    .await;
    assert!(audit.as_array().is_some_and(|e| !e.is_empty()), "{audit}");

    // An idempotency key is the caller's own: Bob replaying the key Alice
    // used gets a sandbox of his, never hers; without credentials, 401.
    let key = "nightly-build-7";
    let body = json!({"image": docker_image()});
    let with_key = |creds: &[(&str, &str)]| {
        let mut h: Vec<(String, String)> = creds
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        h.push(("idempotency-key".into(), key.into()));
        h
    };
    let mut answers = Vec::new();
    for creds in [with_key(&ha), with_key(&hb), with_key(&ha)] {
        let pairs: Vec<(&str, &str)> = creds
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (s, sb, _) = call(
            &server,
            Method::POST,
            "/sandboxes",
            &pairs,
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, 201, "{sb}");
        answers.push((
            sb["id"].as_str().unwrap_or_default().to_string(),
            sb["owner_id"].clone(),
        ));
    }
    assert_eq!(answers[0], answers[2], "alice's retry answers her sandbox");
    assert_ne!(answers[0].0, answers[1].0, "bob got alice's sandbox");
    assert_eq!(answers[1].1, "bob");
    let (s, _, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &[("idempotency-key", key)],
        Some(body),
    )
    .await;
    assert_eq!(s, 401, "an anonymous replay of the key");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_the_user_header() {
    let server = server(|_| {}).await;
    let viewer = key(&server, "carol", Role::Viewer).await;
    let operator = key(&server, "ops", Role::Operator).await;
    let owner = key(&server, "carol", Role::Owner).await;
    let (_, pooled) = server
        .app_service
        .identity()
        .create_key(NewApiKey {
            owner_id: "pool".into(),
            tenant_id: None,
            role: Role::Owner,
            expires_in: None,
            allow_user_header: true,
        })
        .await
        .map(|(k, i)| (i, k))
        .unwrap_or_else(|e| panic!("{e}"));

    let (s, sb, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &[("x-api-key", &owner)],
        Some(json!({"image": docker_image()})),
    )
    .await;
    assert_eq!(s, 201);
    let id = sb["id"].as_str().unwrap_or_default().to_string();
    // A viewer reads its owner's sandboxes but changes nothing.
    let (s, list, _) = call(
        &server,
        Method::GET,
        "/sandboxes",
        &[("x-api-key", &viewer)],
        None,
    )
    .await;
    assert_eq!((s, list[0]["id"].as_str()), (200, Some(id.as_str())));
    for (method, path, body) in [
        (
            Method::POST,
            "/sandboxes".to_string(),
            Some(json!({"image": docker_image()})),
        ),
        (
            Method::POST,
            format!("/sandboxes/{id}/exec"),
            Some(json!({"command": "id"})),
        ),
        (Method::DELETE, format!("/sandboxes/{id}"), None),
    ] {
        let (s, answer, _) = call(&server, method, &path, &[("x-api-key", &viewer)], body).await;
        assert_eq!(
            (s, answer["code"].as_str()),
            (403, Some("FORBIDDEN")),
            "{path}"
        );
    }
    // An operator acts on everyone's sandboxes but manages no quotas.
    let (s, _, _) = call(
        &server,
        Method::POST,
        &format!("/sandboxes/{id}/exec"),
        &[("x-api-key", &operator)],
        Some(json!({"command": "true"})),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, _) = call(
        &server,
        Method::PUT,
        "/quotas/carol",
        &[("x-api-key", &operator)],
        Some(json!({"max_sandboxes": 1})),
    )
    .await;
    assert_eq!(s, 403);
    // X-User-ID only where the key allows it.
    let (s, _, _) = call(
        &server,
        Method::GET,
        "/sandboxes",
        &[("x-api-key", &owner), ("x-user-id", "mallory")],
        None,
    )
    .await;
    assert_eq!(s, 403);
    let (s, sb, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &[("x-api-key", &pooled), ("x-user-id", "pool-user-7")],
        Some(json!({"image": docker_image()})),
    )
    .await;
    assert_eq!((s, sb["owner_id"].as_str()), (201, Some("pool-user-7")));
    // Revoked and unknown keys are refused.
    let prefix = &owner[..12];
    server
        .app_service
        .identity()
        .revoke_key(prefix)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (s, answer, _) = call(
        &server,
        Method::GET,
        "/sandboxes",
        &[("x-api-key", &owner)],
        None,
    )
    .await;
    assert_eq!(
        (s, answer["message"].as_str()),
        (401, Some("API key revoked"))
    );
    // The refusals are in the audit trail.
    let denied = server
        .app_service
        .store()
        .list_audit(&stacyvm::store::AuditFilter {
            action: Some("auth.denied".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    assert!(
        denied
            .iter()
            .any(|e| e.detail.as_deref() == Some("API key revoked")),
        "{denied:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bearer_tokens_are_verified() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let secret = "0123456789abcdef0123456789abcdef-test-secret";
    let server = server(|c| {
        c.auth.jwt.hs256_secret = secret.into();
        c.auth.jwt.issuer = "https://idp.test".into();
        c.auth.jwt.audience = "stacyvm".into();
    })
    .await;
    let now = chrono::Utc::now().timestamp();
    let token = |claims: Value, key: &[u8]| {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(key).unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let good = json!({"sub": "dave", "tenant": "t1", "iss": "https://idp.test", "aud": "stacyvm", "exp": now + 600});
    let bearer = |t: &str| format!("Bearer {t}");

    let ok = token(good.clone(), secret.as_bytes());
    let (s, sb, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &[("authorization", &bearer(&ok))],
        Some(json!({"image": docker_image()})),
    )
    .await;
    assert_eq!(
        (s, sb["owner_id"].as_str(), sb["tenant_id"].as_str()),
        (201, Some("dave"), Some("t1")),
        "{sb}"
    );

    let mut expired = good.clone();
    expired["exp"] = json!(now - 3600);
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("someone-else");
    let mut future = good.clone();
    future["nbf"] = json!(now + 3600);
    let none_token = {
        use base64::Engine;
        let e = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.", e(&json!({"alg": "none", "typ": "JWT"})), e(&good))
    };
    let mut long_sub = good.clone();
    long_sub["sub"] = json!("d".repeat(129));
    let mut control_sub = good.clone();
    control_sub["sub"] = json!("dave\u{0}root");
    let mut bad_tenant = good.clone();
    bad_tenant["tenant"] = json!("t\n1");
    let cases = [
        ("sub too long", token(long_sub, secret.as_bytes())),
        (
            "sub with a control character",
            token(control_sub, secret.as_bytes()),
        ),
        (
            "tenant with a control character",
            token(bad_tenant, secret.as_bytes()),
        ),
        ("alg none", none_token),
        (
            "bad signature",
            token(good.clone(), b"another-secret-another-secret-xx"),
        ),
        ("expired", token(expired, secret.as_bytes())),
        ("wrong audience", token(wrong_aud, secret.as_bytes())),
        ("not yet valid", token(future, secret.as_bytes())),
        ("garbage", "abc.def".to_string()),
        ("wrong algorithm", {
            let header = Header::new(jsonwebtoken::Algorithm::HS384);
            encode(
                &header,
                &good,
                &EncodingKey::from_secret(secret.as_bytes()).unwrap_or_else(|e| panic!("{e}")),
            )
            .unwrap_or_else(|e| panic!("{e}"))
        }),
    ];
    for (what, t) in cases {
        let (s, answer, _) = call(
            &server,
            Method::GET,
            "/sandboxes",
            &[("authorization", &bearer(&t))],
            None,
        )
        .await;
        assert_eq!(
            (s, answer["code"].as_str()),
            (401, Some("UNAUTHORIZED")),
            "{what}: {answer}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_server_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut config = stacyvm::config::Config {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    config.server.host = "0.0.0.0".into();
    config.providers.default = "native".into();
    let result = stacyvm::app::App::start(config.clone()).await;
    assert!(matches!(
        result,
        Err(stacyvm::app::StartError::OpenBeyondLoopback(_))
    ));
    config.auth.api_key = "a-static-key-for-this-test".into();
    if let Err(e) = stacyvm::app::App::start(config).await {
        panic!("with auth it starts: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_spawns_against_a_limit_of_ten_admit_exactly_ten() {
    let server = server(|c| c.defaults.max_sandboxes_per_owner = 10).await;
    let k = key(&server, "erin", Role::Owner).await;
    let headers = [("x-api-key", k.as_str())];
    let spawns = (0..50).map(|_| {
        call(
            &server,
            Method::POST,
            "/sandboxes",
            &headers,
            Some(json!({"image": docker_image()})),
        )
    });
    let results = futures::future::join_all(spawns).await;
    let admitted = results.iter().filter(|(s, _, _)| *s == 201).count();
    assert_eq!(admitted, 10);
    for (s, body, headers) in results.iter().filter(|(s, _, _)| *s != 201) {
        assert_eq!((*s, body["code"].as_str()), (429, Some("RESOURCE_LIMIT")));
        assert!(headers.contains_key("retry-after"));
    }
    let (_, usage, _) = call(
        &server,
        Method::GET,
        "/quotas/erin/usage",
        &[("x-api-key", &k)],
        None,
    )
    .await;
    assert_eq!(
        (
            usage["active_sandboxes"].as_u64(),
            usage["max_sandboxes"].as_u64()
        ),
        (Some(10), Some(10))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_spawns_wait_for_capacity() {
    let server = server(|c| {
        c.defaults.spawn_overflow = "queue".into();
        c.defaults.spawn_queue_timeout = stacyvm::duration::GoDuration(Duration::from_secs(20));
    })
    .await;
    let admin = key(&server, "root", Role::Admin).await;
    let k = key(&server, "frank", Role::Owner).await;
    let (s, _, _) = call(
        &server,
        Method::PUT,
        "/quotas/frank",
        &[("x-admin-api-key", &admin)],
        Some(json!({"max_sandboxes": 1, "max_ttl": "2h"})),
    )
    .await;
    assert_eq!(s, 200);
    let (s, first, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &[("x-api-key", &k)],
        Some(json!({"image": docker_image()})),
    )
    .await;
    assert_eq!(s, 201);
    let first = first["id"].as_str().unwrap_or_default().to_string();
    // The second waits in the queue instead of getting 429 ...
    let waiting = {
        let req = server
            .http
            .post(server.url("/sandboxes"))
            .header("x-api-key", &k)
            .json(&json!({"image": docker_image()}));
        tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!waiting.is_finished(), "the second spawn should be waiting");
    // ... and is admitted once the first is destroyed.
    let (s, _, _) = call(
        &server,
        Method::DELETE,
        &format!("/sandboxes/{first}"),
        &[("x-api-key", &k)],
        None,
    )
    .await;
    assert_eq!(s, 200);
    let status = tokio::time::timeout(Duration::from_secs(10), waiting).await;
    assert!(matches!(status, Ok(Ok(Ok(201)))), "{status:?}");
    // Over max_ttl is never queued.
    let (s, _, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &[("x-api-key", &k)],
        Some(json!({"image": docker_image(), "ttl": "3h"})),
    )
    .await;
    assert_eq!(s, 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_headers() {
    let server = server(|c| {
        c.rate_limit.enabled = true;
        c.rate_limit.requests_per_minute = 60;
        c.rate_limit.burst = 3;
    })
    .await;
    let k = key(&server, "gina", Role::Owner).await;
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..4 {
        let (s, _, headers) = call(
            &server,
            Method::GET,
            "/sandboxes",
            &[("x-api-key", &k)],
            None,
        )
        .await;
        statuses.push(s);
        last = Some(headers);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    let headers = last.unwrap_or_default();
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert_eq!(
        headers
            .get("x-ratelimit-limit")
            .and_then(|v| v.to_str().ok()),
        Some("3")
    );
    // Another key has its own budget.
    let other = key(&server, "hank", Role::Owner).await;
    assert_eq!(
        call(
            &server,
            Method::GET,
            "/sandboxes",
            &[("x-api-key", &other)],
            None
        )
        .await
        .0,
        200
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_of_a_session_is_complete_and_in_order() {
    let server = server(|_| {}).await;
    let k = key(&server, "ivy", Role::Owner).await;
    let h = [("x-api-key", k.as_str()), ("x-request-id", "req-ivy-1")];
    let (_, sb, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &h,
        Some(json!({"image": docker_image()})),
    )
    .await;
    let id = sb["id"].as_str().unwrap_or_default().to_string();
    call(
        &server,
        Method::POST,
        &format!("/sandboxes/{id}/exec"),
        &h,
        Some(json!({"command": "true"})),
    )
    .await;
    call(
        &server,
        Method::POST,
        &format!("/sandboxes/{id}/files"),
        &h,
        Some(json!({"path": "/tmp/a", "content": "x"})),
    )
    .await;
    call(
        &server,
        Method::POST,
        &format!("/sandboxes/{id}/files/move"),
        &h,
        Some(json!({"old_path": "/tmp/a", "new_path": "/tmp/b"})),
    )
    .await;
    call(
        &server,
        Method::POST,
        &format!("/sandboxes/{id}/extend"),
        &h,
        Some(json!({"ttl": "1h"})),
    )
    .await;
    let (s, _, _) = call(
        &server,
        Method::POST,
        &format!("/sandboxes/{id}/exec"),
        &h,
        Some(json!({"command": "true", "mode": "bogus"})),
    )
    .await;
    assert_eq!(s, 400);
    call(
        &server,
        Method::DELETE,
        &format!("/sandboxes/{id}"),
        &h,
        None,
    )
    .await;

    let (_, events, _) = call(
        &server,
        Method::GET,
        &format!("/admin/audit?target={id}&limit=50"),
        &h,
        None,
    )
    .await;
    let trail: Vec<(String, String)> = events
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .rev()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default().to_string(),
                e["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("sandbox.spawn", "success"),
        ("sandbox.exec", "success"),
        ("file.write", "success"),
        ("file.move", "success"),
        ("sandbox.extend", "success"),
        ("sandbox.exec", "failure"),
        ("sandbox.destroy", "success"),
    ]
    .iter()
    .map(|(a, o)| (a.to_string(), o.to_string()))
    .collect();
    assert_eq!(trail, want);
    assert!(events.as_array().is_some_and(|e| {
        e.iter()
            .all(|e| e["actor"] == "ivy" && e["request_id"] == "req-ivy-1")
    }));
    let (s, csv, headers) = call(
        &server,
        Method::GET,
        &format!("/admin/audit?target={id}&format=csv"),
        &h,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/csv"))
    );
    let csv = csv.as_str().unwrap_or_default().to_string();
    assert!(csv.starts_with("id,created_at,actor"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + want.len());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_key_exists_the_server_never_runs_open_again_by_itself() {
    let server = TestServer::start(|c| c.providers.default = "native".into()).await;
    let anonymous = |server: &TestServer| {
        let url = server.url("/sandboxes");
        let http = server.http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or_default()
        }
    };
    assert_eq!(anonymous(&server).await, 200, "open before any key");
    // A key made by another process (the CLI, on the same database) is
    // enforced on the very next request.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .args(["keys", "create", "--admin", "--owner", "root"])
        .arg("--data-dir")
        .arg(server.data_dir.path())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(anonymous(&server).await, 401, "closed at once");
    // Every key revoked: still closed, now and after a restart.
    let revoked = server
        .app_service
        .identity()
        .list_keys()
        .await
        .unwrap_or_default();
    for k in &revoked {
        server
            .app_service
            .identity()
            .revoke_key(&k.id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(anonymous(&server).await, 401);
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |c| c.providers.default = "native".into()).await;
    assert_eq!(anonymous(&server).await, 401, "closed after a restart");
    // Only the explicit flag opens it again.
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |c| {
        c.providers.default = "native".into();
        c.auth.allow_open = true;
    })
    .await;
    assert_eq!(anonymous(&server).await, 200, "auth.allow_open");
    server.stop().await;
}
