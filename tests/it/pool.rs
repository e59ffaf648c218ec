//! Warm pools on a real Docker daemon: sandboxes spawned ahead, handed out
//! on spawn as if fresh, counted against nobody until claimed, refilled,
//! drained when their template changes and when the server stops.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use stacyvm::auth::Role;
use stacyvm::events::Event;
use stacyvm::lifecycle::SandboxState;
use stacyvm::store::SandboxFilter;

use crate::auth::{call, gql};
use crate::support::{TestServer, docker_containers_for, docker_enabled, docker_image, key};

fn h(key: &str) -> [(&'static str, &str); 1] {
    [("x-api-key", key)]
}

async fn pool_server(size: u32, max_warm: u32) -> TestServer {
    TestServer::start(|c| {
        c.providers.default = "docker".into();
        c.defaults.image = docker_image();
        c.defaults.memory_mb = 64;
        c.defaults.max_sandboxes_per_owner = 1;
        c.pool.size = size;
        c.pool.max_warm = max_warm;
        c.pool.refill_interval = stacyvm::duration::GoDuration(Duration::from_millis(200));
    })
    .await
}

/// The pool status a key sees.
async fn status(server: &TestServer, key: &str) -> Value {
    let (s, body, _) = call(server, Method::GET, "/pool/status", &h(key), None).await;
    assert_eq!(s, 200, "{body}");
    body
}

/// Waits until the pools the key sees hold `warm` running sandboxes and
/// none being made.
async fn wait_warm(server: &TestServer, key: &str, warm: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let body = status(server, key).await;
        if body["warm"] == json!(warm) && body["creating"] == json!(0) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool never reached {warm} warm: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every warm sandbox record, in any state but destroyed.
async fn pooled(server: &TestServer) -> Vec<entity::sandbox::Model> {
    server
        .app_service
        .store()
        .pooled_sandboxes()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn running_pooled_ids(server: &TestServer) -> Vec<String> {
    pooled(server)
        .await
        .into_iter()
        .filter(|r| r.state == SandboxState::Running.as_str())
        .map(|r| r.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_sandbox_is_handed_out_as_a_fresh_one_and_the_pool_refills() {
    if !docker_enabled() {
        return;
    }
    let server = pool_server(2, 4).await;
    let admin = key(&server, "root", Role::Admin).await;
    let alice = key(&server, "alice", Role::Owner).await;
    let bob = key(&server, "bob", Role::Owner).await;
    let before = wait_warm(&server, &alice, 2).await;
    assert_eq!(before["enabled"], json!(true), "{before}");
    assert_eq!(
        (before["vms"].clone(), before["max_vms"].clone()),
        (json!(2), json!(4))
    );
    let warm = running_pooled_ids(&server).await;
    assert_eq!(warm.len(), 2);
    for id in &warm {
        assert_eq!(
            docker_containers_for(id).len(),
            1,
            "warm {id} has a container"
        );
    }
    // Warm sandboxes are nobody's: not listed, not readable, not counted.
    for k in [&admin, &alice] {
        let (s, list, _) = call(&server, Method::GET, "/sandboxes", &h(k), None).await;
        assert_eq!((s, list.clone()), (200, json!([])), "{list}");
        let page = gql(
            &server,
            k,
            "{ sandboxes(first: 50) { edges { node { id } } } }",
            json!({}),
        )
        .await;
        assert_eq!(page["data"]["sandboxes"]["edges"], json!([]), "{page}");
        let (s, body, _) = call(
            &server,
            Method::GET,
            &format!("/sandboxes/{}", warm[0]),
            &h(k),
            None,
        )
        .await;
        assert_eq!(s, 404, "a warm sandbox is not reachable by id: {body}");
    }

    // A claim: the caller's own sandbox, its TTL from now, its metadata,
    // and the events and audit of a fresh spawn.
    let mut events = server.app_service.events().subscribe();
    let asked_at = chrono::Utc::now();
    let (s, sb, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &h(&alice),
        Some(json!({"ttl": "7m", "metadata": {"team": "blue"}})),
    )
    .await;
    assert_eq!(s, 201, "{sb}");
    let id = sb["id"].as_str().unwrap_or_default().to_string();
    assert!(warm.contains(&id), "{id} came from the pool {warm:?}");
    assert_eq!(sb["owner_id"], json!("alice"));
    assert_eq!(sb["state"], json!("running"));
    assert_eq!(sb["metadata"], json!({"team": "blue"}));
    let created: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(sb["created_at"].clone()).unwrap_or_else(|e| panic!("{e}"));
    let expires: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(sb["expires_at"].clone()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        created >= asked_at - chrono::Duration::seconds(1),
        "{created} {asked_at}"
    );
    let ttl = (expires - created).num_seconds();
    assert!((419..=421).contains(&ttl), "ttl {ttl}s");
    let mut seen = Vec::new();
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(300), events.recv())
        .await
        .map(|r| r.map(|j| j.event))
    {
        if let Event::SandboxState {
            sandbox_id,
            owner_id,
            state,
            ..
        } = event
        {
            seen.push((sandbox_id, owner_id, state));
        }
    }
    assert!(
        seen.starts_with(&[
            (id.clone(), "alice".into(), SandboxState::Creating),
            (id.clone(), "alice".into(), SandboxState::Running),
        ]),
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|(_, owner, _)| owner == "alice"),
        "warm sandboxes publish nothing: {seen:?}"
    );
    let (s, audit, _) = call(
        &server,
        Method::GET,
        &format!("/admin/audit?target={id}"),
        &h(&admin),
        None,
    )
    .await;
    assert_eq!(s, 200, "{audit}");
    let trail: Vec<(Value, Value)> = audit
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| (e["actor"].clone(), e["action"].clone()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        trail,
        vec![(json!("alice"), json!("sandbox.spawn"))],
        "one spawn, by alice, as for a fresh sandbox: {audit}"
    );
    // It runs commands like any sandbox, and is listed to its owner only.
    let (s, out, _) = call(
        &server,
        Method::POST,
        &format!("/sandboxes/{id}/exec"),
        &h(&alice),
        Some(json!({"command": "echo hi; id -u", "mode": "shell"})),
    )
    .await;
    assert_eq!((s, out["stdout"].clone()), (200, json!("hi\n0\n")), "{out}");
    let (_, list, _) = call(&server, Method::GET, "/sandboxes", &h(&alice), None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let (_, list, _) = call(&server, Method::GET, "/sandboxes", &h(&bob), None).await;
    assert_eq!(list, json!([]));

    // Quotas hold for claims as for fresh spawns: alice may have one.
    let (s, body, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &h(&alice),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 429, "{body}");
    // Warm sandboxes never counted against bob, who still gets one.
    let (s, sb2, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &h(&bob),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 201, "{sb2}");
    // A different recipe is a miss, served fresh.
    let (s, sb3, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &h(&admin),
        Some(json!({"memory_mb": 96})),
    )
    .await;
    assert_eq!(s, 201, "{sb3}");
    assert!(!warm.contains(&sb3["id"].as_str().unwrap_or_default().to_string()));

    // Refilled to its size with new sandboxes; hits counted.
    let after = wait_warm(&server, &alice, 2).await;
    assert_eq!(after["hits"], json!(2), "{after}");
    let now_warm = running_pooled_ids(&server).await;
    assert!(
        now_warm.iter().all(|w| !warm.contains(w)),
        "{now_warm:?} {warm:?}"
    );
    let data = gql(
        &server,
        &alice,
        "{ pool { enabled maxWarm warm hits pools { template image target warm hits } } }",
        json!({}),
    )
    .await;
    assert_eq!(data["data"]["pool"]["warm"], json!(2), "{data}");
    assert_eq!(
        data["data"]["pool"]["pools"][0]["target"],
        json!(2),
        "{data}"
    );
    assert_eq!(
        data["data"]["pool"]["pools"][0]["template"],
        Value::Null,
        "{data}"
    );

    // Claimed sandboxes are their owners' to destroy.
    for (k, sb) in [(&alice, &sb), (&bob, &sb2), (&admin, &sb3)] {
        let sid = sb["id"].as_str().unwrap_or_default();
        let (s, body, _) = call(
            &server,
            Method::DELETE,
            &format!("/sandboxes/{sid}"),
            &h(k),
            None,
        )
        .await;
        assert_eq!(s, 200, "{body}");
        assert!(docker_containers_for(sid).is_empty());
    }
    // Stopping drains the pool: no warm container outlives the server.
    let records = server.app_service.store().clone();
    let _dir = server.stop().await;
    for w in &now_warm {
        assert!(
            docker_containers_for(w).is_empty(),
            "warm {w} left a container"
        );
    }
    let left = records
        .list_sandboxes(&SandboxFilter {
            with_pooled: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        left.iter().all(|r| r.pool_key.is_none()),
        "warm records left: {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_pool_follows_its_template() {
    if !docker_enabled() {
        return;
    }
    let server = pool_server(0, 2).await;
    let ops = key(&server, "ops", Role::Operator).await;
    let alice = key(&server, "alice", Role::Owner).await;
    let template = |pool_size: u32, memory_mb: u32| json!({"name": "py", "image": docker_image(), "memory_mb": memory_mb, "pool_size": pool_size});
    // Anonymous callers see nothing of the pools; malformed sizes are 400s.
    let (s, body, _) = call(&server, Method::GET, "/pool/status", &[], None).await;
    assert_eq!(s, 401, "{body}");
    for bad in [json!(-1), json!("three"), json!(1.5), json!(u64::MAX)] {
        let (s, body, _) = call(
            &server,
            Method::POST,
            "/templates",
            &h(&ops),
            Some(json!({"name": "bad", "image": docker_image(), "pool_size": bad})),
        )
        .await;
        assert_eq!(
            (s, body["code"].clone()),
            (400, json!("BAD_REQUEST")),
            "{bad}: {body}"
        );
    }
    let gql_anon = call(
        &server,
        Method::POST,
        "/graphql",
        &[],
        Some(json!({"query": "{ pool { warm } }"})),
    )
    .await;
    assert!(
        gql_anon.0 == 401 || gql_anon.1["errors"].is_array(),
        "{:?}",
        gql_anon.1
    );
    // Keeping capacity warm is an operator's decision, within the cap.
    let (s, body, _) = call(
        &server,
        Method::POST,
        "/templates",
        &h(&alice),
        Some(template(1, 64)),
    )
    .await;
    assert_eq!(
        (s, body["code"].clone()),
        (403, json!("FORBIDDEN")),
        "{body}"
    );
    let (s, body, _) = call(
        &server,
        Method::POST,
        "/templates",
        &h(&ops),
        Some(template(3, 64)),
    )
    .await;
    assert_eq!(
        (s, body["code"].clone()),
        (400, json!("BAD_REQUEST")),
        "{body}"
    );
    let (s, body, _) = call(
        &server,
        Method::POST,
        "/templates",
        &h(&ops),
        Some(template(1, 64)),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(body["pool_size"], json!(1));
    let seen = wait_warm(&server, &ops, 1).await;
    assert_eq!(seen["pools"][0]["template"], json!("py"), "{seen}");
    // Another owner does not see ops' template pool.
    let theirs = status(&server, &alice).await;
    assert_eq!(
        theirs,
        json!({"enabled": false}),
        "the original's answer without a pool"
    );

    // Replacing the template without naming pool_size (as the SDK's
    // clients do) keeps its pool and its warm sandbox.
    let first = running_pooled_ids(&server).await;
    let (s, body, _) = call(
        &server,
        Method::PUT,
        "/templates/py",
        &h(&ops),
        Some(json!({"name": "py", "image": docker_image(), "memory_mb": 64})),
    )
    .await;
    assert_eq!((s, body["pool_size"].clone()), (200, json!(1)), "{body}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(running_pooled_ids(&server).await, first);

    // A changed recipe drains the old sandbox and warms a new one.
    let (s, body, _) = call(
        &server,
        Method::PUT,
        "/templates/py",
        &h(&ops),
        Some(template(1, 80)),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    wait_warm(&server, &ops, 1).await;
    let second = running_pooled_ids(&server).await;
    assert_eq!(second.len(), 1);
    assert_ne!(second, first);
    assert!(
        docker_containers_for(&first[0]).is_empty(),
        "the old warm sandbox is gone"
    );
    let warm_record = &pooled(&server).await[0];
    assert_eq!(warm_record.memory_mb, 80);

    // Spawning from the template claims it.
    let (s, sb, _) = call(
        &server,
        Method::POST,
        "/templates/py/spawn",
        &h(&ops),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 201, "{sb}");
    assert_eq!(sb["id"], json!(second[0]));
    assert_eq!(sb["template"], json!("py"));
    assert_eq!(sb["metadata"]["template"], json!("py"));
    wait_warm(&server, &ops, 1).await;

    // Deleting the template lets its pool go.
    let third = running_pooled_ids(&server).await;
    let (s, _, _) = call(&server, Method::DELETE, "/templates/py", &h(&ops), None).await;
    assert_eq!(s, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !pooled(&server).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool of a deleted template kept"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(docker_containers_for(&third[0]).is_empty());
    let (s, _, _) = call(
        &server,
        Method::DELETE,
        &format!("/sandboxes/{}", second[0]),
        &h(&ops),
        None,
    )
    .await;
    assert_eq!(s, 200);
    server.stop().await;
}
