//! Isolation that holds: tenants are part of an owner's identity, requests
//! are bounded (memory, vCPUs, disk), and a policy decides who may use
//! which providers and images (the host image above all).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use stacyvm::auth::Role;
use stacyvm::config::{AllowDeny, Config, PolicyRules};
use stacyvm::lifecycle::SandboxState;
use stacyvm::service::NewApiKey;
use stacyvm::store::SandboxFilter;
use tokio_tungstenite::tungstenite::Message;

use crate::auth::{call, code, gql, next_json, ws};
use crate::support::{TestServer, docker_enabled, docker_image, native_server};

async fn key_in(server: &TestServer, owner: &str, tenant: Option<&str>, role: Role) -> String {
    let (key, _) = server
        .app_service
        .identity()
        .create_key(NewApiKey {
            owner_id: owner.into(),
            tenant_id: tenant.map(str::to_string),
            role,
            expires_in: None,
            allow_user_header: false,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    key
}

/// Every sandbox record in the store, whatever its state.
async fn all_records(server: &TestServer) -> Vec<entity::sandbox::Model> {
    server
        .app_service
        .store()
        .list_sandboxes(&SandboxFilter {
            states: Some(SandboxState::ALL.to_vec()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn h(key: &str) -> [(&'static str, &str); 1] {
    [("x-api-key", key)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_alices_in_two_tenants_are_strangers_on_every_surface() {
    let server = native_server(|c| c.defaults.max_sandboxes_per_owner = 1).await;
    let acme = key_in(&server, "alice", Some("acme"), Role::Owner).await;
    let home = key_in(&server, "alice", None, Role::Owner).await;
    let home_ops = key_in(&server, "ops", None, Role::Operator).await;
    let acme_admin = key_in(&server, "root", Some("acme"), Role::Admin).await;
    let (ha, hh) = (h(&acme), h(&home));

    // acme's alice: a sandbox, an execution, a file and a template.
    let (s, sb, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &ha,
        Some(json!({"image": docker_image()})),
    )
    .await;
    assert_eq!(s, 201, "{sb}");
    assert_eq!(
        (sb["owner_id"].as_str(), sb["tenant_id"].as_str()),
        (Some("alice"), Some("acme"))
    );
    let id = sb["id"].as_str().unwrap_or_default().to_string();
    let (s, out, _) = call(
        &server,
        Method::POST,
        &format!("/sandboxes/{id}/exec"),
        &ha,
        Some(json!({"command": "echo acme-secret"})),
    )
    .await;
    assert_eq!(s, 200, "{out}");
    let execution = out["execution_id"].as_str().unwrap_or_default().to_string();
    let (s, _, _) = call(
        &server,
        Method::POST,
        &format!("/sandboxes/{id}/files"),
        &ha,
        Some(json!({"path": "/tmp/s", "content": "acme"})),
    )
    .await;
    assert_eq!(s, 200);
    let (s, t, _) = call(
        &server,
        Method::POST,
        "/templates",
        &ha,
        Some(json!({"name": "shared-name", "image": docker_image(), "metadata": {"who": "acme"}})),
    )
    .await;
    assert_eq!(s, 201, "{t}");

    // The default tenant's alice: every REST route on that sandbox answers
    // exactly like a missing sandbox.
    let mut routes = crate::support::sandbox_routes(&id);
    routes.extend([
        (Method::GET, "/templates/shared-name".into(), None),
        (Method::DELETE, "/templates/shared-name".into(), None),
        (Method::POST, "/templates/shared-name/spawn".into(), None),
    ]);
    for (method, path, body) in routes {
        let (s, answer, _) = call(&server, method.clone(), &path, &hh, body.clone()).await;
        assert_eq!(
            (s, answer["code"].as_str()),
            (404, Some("NOT_FOUND")),
            "default alice {method} {path}: {answer}"
        );
        // Exactly what the same call on a sandbox (or template) that does
        // not exist answers.
        let absent = path
            .replace(&id, "sb-00000000")
            .replace("shared-name", "no-such-name");
        let (s_absent, answer_absent, _) = call(&server, method.clone(), &absent, &hh, body).await;
        let normalise = |v: &Value| {
            v["message"]
                .as_str()
                .unwrap_or_default()
                .replace(&id, "sb-00000000")
                .replace("shared-name", "no-such-name")
        };
        assert_eq!(
            (s, answer["code"].clone(), normalise(&answer)),
            (
                s_absent,
                answer_absent["code"].clone(),
                normalise(&answer_absent)
            ),
            "{method} {path} differs from a missing resource"
        );
    }
    // The file is untouched and the sandbox still runs for its owner.
    let (s, content, _) = call(
        &server,
        Method::GET,
        &format!("/sandboxes/{id}/files?path=/tmp/s"),
        &ha,
        None,
    )
    .await;
    assert_eq!((s, content), (200, Value::String("acme".into())));

    // Lists and admission counts show none of acme's.
    let (_, list, _) = call(&server, Method::GET, "/sandboxes", &hh, None).await;
    assert_eq!(list, json!([]));
    let (_, templates, _) = call(&server, Method::GET, "/templates", &hh, None).await;
    assert_eq!(templates, json!([]));
    let (_, admission, _) = call(
        &server,
        Method::POST,
        "/sandboxes/admission",
        &hh,
        Some(json!({})),
    )
    .await;
    assert_eq!(admission["active_owner_sandboxes"], 0, "{admission}");
    assert_eq!(admission["allowed"], true, "{admission}");

    // Quotas count separately: acme's alice is at her cap of 1, the default
    // tenant's alice still gets her own sandbox.
    let (s, over, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &ha,
        Some(json!({"image": docker_image()})),
    )
    .await;
    assert_eq!(
        (s, over["code"].as_str()),
        (429, Some("RESOURCE_LIMIT")),
        "{over}"
    );
    let (s, mine, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &hh,
        Some(json!({"image": docker_image()})),
    )
    .await;
    assert_eq!(
        s, 201,
        "the other tenant's alice does not use this alice's quota: {mine}"
    );
    let my_id = mine["id"].as_str().unwrap_or_default().to_string();
    let (_, usage, _) = call(&server, Method::GET, "/quotas/alice/usage", &hh, None).await;
    assert_eq!(usage["active_sandboxes"], 1, "{usage}");
    // A quota set for acme's alice by acme's admin is not the other alice's.
    let (s, q, _) = call(
        &server,
        Method::PUT,
        "/quotas/alice",
        &[("x-admin-api-key", acme_admin.as_str())],
        Some(json!({"max_sandboxes": 5})),
    )
    .await;
    assert_eq!(s, 200, "{q}");
    let (_, usage, _) = call(&server, Method::GET, "/quotas/alice/usage", &ha, None).await;
    assert_eq!(
        (
            usage["max_sandboxes"].as_u64(),
            usage["quota_configured"].as_bool()
        ),
        (Some(5), Some(true)),
        "{usage}"
    );
    let (_, usage, _) = call(&server, Method::GET, "/quotas/alice/usage", &hh, None).await;
    assert_eq!(
        (
            usage["max_sandboxes"].as_u64(),
            usage["quota_configured"].as_bool()
        ),
        (Some(1), Some(false)),
        "{usage}"
    );
    let (s, _, _) = call(&server, Method::GET, "/quotas/alice", &hh, None).await;
    assert_eq!(s, 404, "acme's quota for alice is not the default alice's");

    // Templates are separate: the same name is free in the other tenant,
    // and each alice gets her own.
    let (s, t, _) = call(
        &server,
        Method::POST,
        "/templates",
        &hh,
        Some(json!({"name": "shared-name", "image": docker_image(), "metadata": {"who": "home"}})),
    )
    .await;
    assert_eq!(s, 201, "{t}");
    for (key, who) in [(&acme, "acme"), (&home, "home")] {
        let (_, t, _) = call(
            &server,
            Method::GET,
            "/templates/shared-name",
            &h(key),
            None,
        )
        .await;
        assert_eq!(t["metadata"]["who"], who, "{t}");
        let (_, list, _) = call(&server, Method::GET, "/templates", &h(key), None).await;
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    }

    // Audit: the default alice sees only her own tenant's trail.
    let (_, audit, _) = call(&server, Method::GET, "/admin/audit", &hh, None).await;
    let events = audit.as_array().cloned().unwrap_or_default();
    assert!(!events.is_empty());
    assert!(
        events
            .iter()
            .all(|e| e["tenant_id"] == "default" && e["actor"] == "alice"),
        "{audit}"
    );
    assert!(!audit.to_string().contains("acme-secret"));

    // GraphQL queries and mutations.
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
    ] {
        let answer = gql(&server, &home, &query, json!({})).await;
        assert_eq!(code(&answer), "NOT_FOUND", "{query}: {answer}");
    }
    let lists = gql(
        &server,
        &home,
        "{ sandboxes { nodes { id } } templates { name metadata } auditEvents { nodes { actor tenantId } } }",
        json!({}),
    )
    .await;
    assert_eq!(
        lists["data"]["sandboxes"]["nodes"],
        json!([{"id": my_id}]),
        "{lists}"
    );
    assert_eq!(
        lists["data"]["templates"][0]["metadata"]["who"], "home",
        "{lists}"
    );

    // An operator of the default tenant does not reach into acme; acme's
    // admin does (admins see every tenant).
    let (s, _, _) = call(
        &server,
        Method::GET,
        &format!("/sandboxes/{id}"),
        &h(&home_ops),
        None,
    )
    .await;
    assert_eq!(s, 404, "operators stay in their tenant");
    let (_, ops_list, _) = call(&server, Method::GET, "/sandboxes", &h(&home_ops), None).await;
    assert_eq!(ops_list.as_array().map(Vec::len), Some(1), "{ops_list}");
    let (s, _, _) = call(
        &server,
        Method::GET,
        &format!("/sandboxes/{my_id}"),
        &[("x-admin-api-key", acme_admin.as_str())],
        None,
    )
    .await;
    assert_eq!(s, 200, "admins see every tenant");

    // Subscriptions: no following acme's output or events.
    let mut home_ws = ws(&server, &home).await;
    for (n, query) in [
        format!("subscription {{ execOutput(executionId: \"{execution}\") {{ __typename }} }}"),
        format!("subscription {{ sandboxEvents(sandboxId: \"{id}\") {{ state }} }}"),
        format!("subscription {{ execStream(sandboxId: \"{id}\", input: {{command: \"id\"}}) {{ __typename }} }}"),
    ]
    .into_iter()
    .enumerate()
    {
        let sub = json!({"id": format!("x{n}"), "type": "subscribe", "payload": {"query": query}});
        home_ws.send(Message::Text(sub.to_string().into())).await.unwrap_or_else(|e| panic!("{e}"));
        let answer = next_json(&mut home_ws).await;
        let c = answer["payload"][0]["extensions"]["code"]
            .as_str()
            .or(answer["payload"]["errors"][0]["extensions"]["code"].as_str());
        assert_eq!(c, Some("NOT_FOUND"), "{query}: {answer}");
        if answer["type"] == "next" {
            next_json(&mut home_ws).await; // complete
        }
    }
    // The global event streams: the default alice hears nothing of acme's
    // alice destroying her sandbox; acme's alice does.
    let all = json!({"id": "all", "type": "subscribe", "payload": {"query": "subscription { sandboxEvents { sandboxId } }"}});
    home_ws
        .send(Message::Text(all.to_string().into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let audit_sub = json!({"id": "audit", "type": "subscribe", "payload": {"query": "subscription { auditEvents { actor target } }"}});
    home_ws
        .send(Message::Text(audit_sub.to_string().into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut acme_ws = ws(&server, &acme).await;
    acme_ws
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
    let seen = next_json(&mut acme_ws).await;
    assert_eq!(
        seen["payload"]["data"]["sandboxEvents"]["sandboxId"],
        id.as_str(),
        "{seen}"
    );
    let heard = tokio::time::timeout(Duration::from_millis(800), home_ws.next()).await;
    assert!(heard.is_err(), "the default alice heard {heard:?}");
    server.stop().await;
}

fn bounded(c: &mut Config) {
    c.defaults.max_memory_mb = 2048;
    c.defaults.max_vcpus = 1;
    c.defaults.max_disk_mb = 4096;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawns_and_templates_beyond_the_bounds_are_refused_naming_the_bound() {
    let server = native_server(bounded).await;
    let alice = key_in(&server, "alice", None, Role::Owner).await;
    let ha = h(&alice);
    let image = docker_image();

    for (body, message) in [
        (
            json!({"image": image, "memory_mb": 1_048_576}),
            "memory_mb 1048576 exceeds the limit of 2048 (defaults.max_memory_mb)",
        ),
        (
            json!({"image": image, "vcpus": 2}),
            "vcpus 2 exceeds the limit of 1 (defaults.max_vcpus)",
        ),
        (
            json!({"image": image, "disk_mb": 5000}),
            "disk_mb 5000 exceeds the limit of 4096 (defaults.max_disk_mb)",
        ),
    ] {
        let (s, answer, _) =
            call(&server, Method::POST, "/sandboxes", &ha, Some(body.clone())).await;
        assert_eq!(
            (s, answer["code"].as_str(), answer["message"].as_str()),
            (400, Some("BAD_REQUEST"), Some(message)),
            "{body}"
        );
        // The preflight says the same.
        let (s, _, _) = call(
            &server,
            Method::POST,
            "/sandboxes/admission",
            &ha,
            Some(body),
        )
        .await;
        assert_eq!(s, 400);
    }
    let answer = gql(
        &server,
        &alice,
        "mutation($image: String!) { spawnSandbox(input: {image: $image, memoryMb: 1048576}) { id } }",
        json!({"image": image}),
    )
    .await;
    assert_eq!(code(&answer), "BAD_REQUEST", "{answer}");
    assert!(
        answer["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("defaults.max_memory_mb")),
        "{answer}"
    );
    let answer = gql(
        &server,
        &alice,
        "mutation($image: String!) { spawnSandbox(input: {image: $image, diskMb: 5000}) { id } }",
        json!({"image": image}),
    )
    .await;
    assert_eq!(code(&answer), "BAD_REQUEST", "{answer}");
    assert!(
        all_records(&server).await.is_empty(),
        "a refused spawn leaves no record"
    );

    // Templates: refused on create and on update, over REST and GraphQL.
    let (s, answer, _) = call(
        &server,
        Method::POST,
        "/templates",
        &ha,
        Some(json!({"name": "big", "image": image, "memory_mb": 4096})),
    )
    .await;
    assert_eq!(
        (s, answer["code"].as_str()),
        (400, Some("BAD_REQUEST")),
        "{answer}"
    );
    assert_eq!(
        answer["message"],
        "memory_mb 4096 exceeds the limit of 2048 (defaults.max_memory_mb)"
    );
    let (s, _, _) = call(&server, Method::GET, "/templates/big", &ha, None).await;
    assert_eq!(s, 404, "a refused template is not saved");
    let (s, t, _) = call(
        &server,
        Method::POST,
        "/templates",
        &ha,
        Some(json!({"name": "ok", "image": image, "memory_mb": 256, "disk_mb": 2048})),
    )
    .await;
    assert_eq!((s, t["disk_mb"].as_u64()), (201, Some(2048)), "{t}");
    let (s, answer, _) = call(
        &server,
        Method::PUT,
        "/templates/ok",
        &ha,
        Some(json!({"image": image, "vcpus": 3})),
    )
    .await;
    assert_eq!(
        (s, answer["message"].as_str()),
        (
            400,
            Some("vcpus 3 exceeds the limit of 1 (defaults.max_vcpus)")
        )
    );
    let answer = gql(
        &server,
        &alice,
        "mutation($image: String!) { saveTemplate(input: {name: \"ok\", image: $image, diskMb: 99999}) { name } }",
        json!({"image": image}),
    )
    .await;
    assert_eq!(code(&answer), "BAD_REQUEST", "{answer}");
    let (_, t, _) = call(&server, Method::GET, "/templates/ok", &ha, None).await;
    assert_eq!(
        (t["vcpus"].as_u64(), t["disk_mb"].as_u64()),
        (Some(1), Some(2048)),
        "unchanged: {t}"
    );

    // A template stored before the bounds were lowered is checked again
    // when it is spawned.
    let mut old = server
        .app_service
        .store()
        .get_template(("default", "alice"), "ok")
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("template ok"));
    old.name = "old-big".into();
    old.memory_mb = 65_536;
    server
        .app_service
        .store()
        .insert_template(old)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (s, answer, _) = call(&server, Method::POST, "/templates/old-big/spawn", &ha, None).await;
    assert_eq!(
        (s, answer["message"].as_str()),
        (
            400,
            Some("memory_mb 65536 exceeds the limit of 2048 (defaults.max_memory_mb)")
        )
    );
    assert!(all_records(&server).await.is_empty());

    // Within the bounds a spawn (with its disk size from the template) works.
    let (s, sb, _) = call(&server, Method::POST, "/templates/ok/spawn", &ha, None).await;
    assert_eq!(s, 201, "{sb}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admins_quota_override_moves_one_owners_bounds_but_never_past_the_host() {
    let server = native_server(bounded).await;
    let alice = key_in(&server, "alice", None, Role::Owner).await;
    let bob = key_in(&server, "bob", None, Role::Owner).await;
    let acme_alice = key_in(&server, "alice", Some("acme"), Role::Owner).await;
    let admin = key_in(&server, "root", None, Role::Admin).await;
    let image = docker_image();
    let (s, q, _) = call(
        &server,
        Method::PUT,
        "/quotas/alice",
        &[("x-admin-api-key", admin.as_str())],
        Some(json!({"max_memory_mb": 4096, "max_disk_mb": 1024})),
    )
    .await;
    assert_eq!(s, 200, "{q}");
    assert_eq!(
        (
            q["max_memory_mb"].as_u64(),
            q["max_vcpus"].as_u64(),
            q["max_disk_mb"].as_u64()
        ),
        (Some(4096), Some(0), Some(1024)),
        "{q}"
    );
    let preflight = |key: String, body: Value| {
        let server = &server;
        async move {
            let (s, answer, _) = call(
                server,
                Method::POST,
                "/sandboxes/admission",
                &h(&key),
                Some(body),
            )
            .await;
            (
                s,
                answer["message"].as_str().map(str::to_string),
                answer["allowed"].as_bool(),
            )
        }
    };
    // Raised for alice, not for bob, not for acme's alice.
    assert_eq!(
        preflight(alice.clone(), json!({"image": image, "memory_mb": 3000})).await,
        (200, None, Some(true))
    );
    let refused = |limit: &str| Some(limit.to_string());
    assert_eq!(
        preflight(bob.clone(), json!({"image": image, "memory_mb": 3000}))
            .await
            .1,
        refused("memory_mb 3000 exceeds the limit of 2048 (defaults.max_memory_mb)")
    );
    assert_eq!(
        preflight(
            acme_alice.clone(),
            json!({"image": image, "memory_mb": 3000})
        )
        .await
        .1,
        refused("memory_mb 3000 exceeds the limit of 2048 (defaults.max_memory_mb)")
    );
    assert_eq!(
        preflight(alice.clone(), json!({"image": image, "memory_mb": 5000}))
            .await
            .1,
        refused("memory_mb 5000 exceeds the limit of 4096 (the owner's quota max_memory_mb)")
    );
    // An override may also lower a bound.
    assert_eq!(
        preflight(alice.clone(), json!({"image": image, "disk_mb": 2000}))
            .await
            .1,
        refused("disk_mb 2000 exceeds the limit of 1024 (the owner's quota max_disk_mb)")
    );
    // Template saves use the same bounds.
    let (s, t, _) = call(
        &server,
        Method::POST,
        "/templates",
        &h(&alice),
        Some(json!({"name": "roomy", "image": image, "memory_mb": 3000})),
    )
    .await;
    assert_eq!(s, 201, "{t}");
    // The host still caps an override (GraphQL setQuota).
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let answer = gql(
        &server,
        &admin,
        "mutation { setQuota(input: {ownerId: \"alice\", maxMemoryMb: 4096, maxVcpus: 100000}) { maxVcpus } }",
        json!({}),
    )
    .await;
    assert_eq!(answer["data"]["setQuota"]["maxVcpus"], 100000, "{answer}");
    assert_eq!(
        preflight(alice.clone(), json!({"image": image, "vcpus": cpus + 1}))
            .await
            .1,
        Some(format!(
            "vcpus {} exceeds the limit of {cpus} (the host's CPUs)",
            cpus + 1
        ))
    );
    // Cleared, alice is back to the configured bounds.
    let (s, _, _) = call(
        &server,
        Method::DELETE,
        "/quotas/alice",
        &[("x-admin-api-key", admin.as_str())],
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        preflight(alice.clone(), json!({"image": image, "memory_mb": 3000}))
            .await
            .1,
        refused("memory_mb 3000 exceeds the limit of 2048 (defaults.max_memory_mb)")
    );
    assert!(all_records(&server).await.is_empty());
    server.stop().await;
}

#[test]
fn bounds_never_exceed_the_host() {
    let mut config = Config::default();
    config.defaults.max_memory_mb = u32::MAX;
    config.defaults.max_vcpus = u32::MAX;
    let bounds = stacyvm::service::SpawnBounds::for_host(&config);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    assert_eq!(bounds.vcpus.max, cpus);
    assert_eq!(bounds.vcpus.source, stacyvm::service::BoundSource::Host);
    assert!(bounds.memory_mb.max < u32::MAX);
    assert_eq!(bounds.memory_mb.source, stacyvm::service::BoundSource::Host);
    // The data dir's free space is not a bound.
    assert_eq!(bounds.disk_mb.max, config.defaults.max_disk_mb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_image_is_for_admins_unless_the_key_allows_it() {
    let server = native_server(|_| {}).await;
    let alice = key_in(&server, "alice", None, Role::Owner).await;
    let admin = key_in(&server, "root", None, Role::Admin).await;
    let (s, answer, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &h(&alice),
        Some(json!({"image": "host"})),
    )
    .await;
    assert_eq!(
        (s, answer["code"].as_str()),
        (403, Some("FORBIDDEN")),
        "{answer}"
    );
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("providers.native.allow_host_image")),
        "{answer}"
    );
    let answer = gql(
        &server,
        &alice,
        "mutation { spawnSandbox(input: {image: \"host\"}) { id } }",
        json!({}),
    )
    .await;
    assert_eq!(code(&answer), "FORBIDDEN", "{answer}");
    let (s, answer, _) = call(
        &server,
        Method::POST,
        "/templates",
        &h(&alice),
        Some(json!({"name": "h", "image": "host"})),
    )
    .await;
    assert_eq!(s, 403, "{answer}");
    assert!(all_records(&server).await.is_empty());
    // The refusal is audited like any refused spawn.
    let (_, audit, _) = call(
        &server,
        Method::GET,
        "/admin/audit?action=sandbox.spawn",
        &h(&alice),
        None,
    )
    .await;
    assert!(
        audit
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["outcome"] == "failure"
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("allow_host_image")))),
        "{audit}"
    );

    let (s, sb, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &[("x-admin-api-key", admin.as_str())],
        Some(json!({"image": "host"})),
    )
    .await;
    assert_eq!(s, 201, "admins may: {sb}");
    server.stop().await;

    let server = native_server(|c| c.providers.native.allow_host_image = true).await;
    let alice = key_in(&server, "alice", None, Role::Owner).await;
    let (s, sb, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &h(&alice),
        Some(json!({"image": "host"})),
    )
    .await;
    assert_eq!(s, 201, "allowed by providers.native.allow_host_image: {sb}");
    server.stop().await;
}

fn rules(providers: AllowDeny, images: AllowDeny) -> PolicyRules {
    PolicyRules { providers, images }
}

fn list(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_and_tenant_policies_refuse_providers_and_images() {
    let server = native_server(|c| {
        c.policy.roles.insert(
            "owner".into(),
            rules(
                AllowDeny {
                    allow: vec![],
                    deny: list(&["native"]),
                },
                AllowDeny::default(),
            ),
        );
        c.policy.tenants.insert(
            "acme".into(),
            rules(
                AllowDeny::default(),
                AllowDeny {
                    allow: list(&["stacyvm-test:*"]),
                    deny: vec![],
                },
            ),
        );
    })
    .await;
    let alice = key_in(&server, "alice", None, Role::Owner).await;
    let admin = key_in(&server, "root", None, Role::Admin).await;
    let acme_ops = key_in(&server, "ops", Some("acme"), Role::Operator).await;
    let image = docker_image();

    // An explicit `provider: native` from an owner, and the native default
    // alike, are refused; the admin's role has no such rule.
    for body in [
        json!({"image": image, "provider": "native"}),
        json!({"image": image}),
    ] {
        let (s, answer, _) = call(
            &server,
            Method::POST,
            "/sandboxes",
            &h(&alice),
            Some(body.clone()),
        )
        .await;
        assert_eq!(
            (s, answer["code"].as_str(), answer["message"].as_str()),
            (
                403,
                Some("FORBIDDEN"),
                Some("provider \"native\" is denied by policy.roles.owner.providers.deny")
            ),
            "{body}"
        );
    }
    let answer = gql(
        &server,
        &alice,
        "mutation($image: String!) { spawnSandbox(input: {image: $image, provider: \"native\"}) { id } }",
        json!({"image": image}),
    )
    .await;
    assert_eq!(code(&answer), "FORBIDDEN", "{answer}");
    let (s, _, _) = call(
        &server,
        Method::POST,
        "/templates",
        &h(&alice),
        Some(json!({"name": "n", "image": image, "provider": "native"})),
    )
    .await;
    assert_eq!(s, 403, "template saves follow the same policy");
    assert!(all_records(&server).await.is_empty());
    let (s, sb, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &[("x-admin-api-key", admin.as_str())],
        Some(json!({"image": image, "provider": "native"})),
    )
    .await;
    assert_eq!(s, 201, "{sb}");
    // Docker stays allowed to owners.
    if docker_enabled() {
        let (s, sb, _) = call(
            &server,
            Method::POST,
            "/sandboxes",
            &h(&alice),
            Some(json!({"image": image, "provider": "docker"})),
        )
        .await;
        assert_eq!(s, 201, "{sb}");
        let id = sb["id"].as_str().unwrap_or_default();
        assert_eq!(
            call(
                &server,
                Method::DELETE,
                &format!("/sandboxes/{id}"),
                &h(&alice),
                None
            )
            .await
            .0,
            200
        );
    } else {
        assert!(
            stacyvm::service::check_policy(
                &server.app_service.config().policy,
                stacyvm::service::Openings::default(),
                Role::Owner,
                "default",
                "docker",
                &image
            )
            .is_ok()
        );
    }

    // acme may use only stacyvm-test:* images (operators are not owners,
    // so the role rule does not apply to them).
    let (s, answer, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &h(&acme_ops),
        Some(json!({"image": "alpine:latest"})),
    )
    .await;
    assert_eq!(
        (s, answer["message"].as_str()),
        (
            403,
            Some("image \"alpine:latest\" is not in policy.tenants.acme.images.allow")
        ),
        "{answer}"
    );
    let (s, sb, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &h(&acme_ops),
        Some(json!({"image": image})),
    )
    .await;
    assert_eq!(s, 201, "{sb}");
    // The default tenant has no image list: the same image is merely unknown.
    let (s, answer, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &[("x-admin-api-key", admin.as_str())],
        Some(json!({"image": "alpine:latest"})),
    )
    .await;
    assert_eq!(
        (s, answer["code"].as_str()),
        (400, Some("BAD_REQUEST")),
        "{answer}"
    );
    let live = all_records(&server)
        .await
        .into_iter()
        .filter(|r| r.state != "destroyed")
        .count();
    assert_eq!(live, 2, "only the two admitted spawns left records");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_names_are_per_owner_on_both_surfaces() {
    let server = native_server(|_| {}).await;
    let image = docker_image();
    let alice = key_in(&server, "alice", None, Role::Owner).await;
    let bob = key_in(&server, "bob", None, Role::Owner).await;
    let (ha, hb) = (h(&alice), h(&bob));
    let (s, body, _) = call(
        &server,
        Method::POST,
        "/templates",
        &ha,
        Some(json!({"name": "py", "image": image, "memory_mb": 128})),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    // Bob's "py" is his own: no 409 revealing alice's, over REST ...
    let (s, body, _) = call(
        &server,
        Method::POST,
        "/templates",
        &hb,
        Some(json!({"name": "py", "image": image, "memory_mb": 256})),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    // ... and GraphQL saves his, not a 404 for alice's.
    let saved = gql(
        &server,
        &bob,
        "mutation($image: String!) { saveTemplate(input: {name: \"py\", image: $image, memoryMb: 384}) { name memoryMb ownerId } }",
        json!({"image": image}),
    )
    .await;
    assert_eq!(saved["data"]["saveTemplate"]["memoryMb"], 384, "{saved}");
    assert_eq!(saved["data"]["saveTemplate"]["ownerId"], "bob", "{saved}");
    let fresh = gql(
        &server,
        &bob,
        "mutation($image: String!) { saveTemplate(input: {name: \"only-bob\", image: $image}) { name } }",
        json!({"image": image}),
    )
    .await;
    assert!(fresh.get("errors").is_none(), "{fresh}");
    // Each sees and spawns from their own.
    let (_, mine, _) = call(&server, Method::GET, "/templates/py", &ha, None).await;
    assert_eq!(mine["memory_mb"], 128, "alice's is unchanged: {mine}");
    let (_, his, _) = call(&server, Method::GET, "/templates/py", &hb, None).await;
    assert_eq!(his["memory_mb"], 384, "{his}");
    let (_, listed, _) = call(&server, Method::GET, "/templates", &ha, None).await;
    let names: Vec<&str> = listed
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["py"], "{listed}");
    let (s, _, _) = call(&server, Method::GET, "/templates/only-bob", &ha, None).await;
    assert_eq!(s, 404);
    let missing = gql(
        &server,
        &alice,
        "{ template(name: \"only-bob\") { name } }",
        json!({}),
    )
    .await;
    assert_eq!(code(&missing), "NOT_FOUND", "{missing}");
    let (s, sandbox, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &hb,
        Some(json!({"template": "py"})),
    )
    .await;
    assert_eq!(
        (s, sandbox["memory_mb"].as_u64()),
        (201, Some(384)),
        "{sandbox}"
    );
    let id = sandbox["id"].as_str().unwrap_or_default().to_string();
    let shown = gql(
        &server,
        &bob,
        "query($id: ID!) { sandbox(id: $id) { template { name memoryMb } } }",
        json!({"id": id}),
    )
    .await;
    assert_eq!(
        shown["data"]["sandbox"]["template"]["memoryMb"], 384,
        "{shown}"
    );
    // A pool's key naming its user (X-User-ID) spawns from the pool's
    // templates when the user has none of that name.
    let (pool, _) = server
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
        .unwrap_or_else(|e| panic!("{e}"));
    let (s, body, _) = call(
        &server,
        Method::POST,
        "/templates",
        &h(&pool),
        Some(json!({"name": "pooled", "image": image, "memory_mb": 192})),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let (s, pooled, _) = call(
        &server,
        Method::POST,
        "/sandboxes",
        &[("x-api-key", pool.as_str()), ("x-user-id", "end-user-1")],
        Some(json!({"template": "pooled"})),
    )
    .await;
    assert_eq!(
        (s, pooled["owner_id"].as_str(), pooled["memory_mb"].as_u64()),
        (201, Some("end-user-1"), Some(192)),
        "{pooled}"
    );
    let pooled_id = pooled["id"].as_str().unwrap_or_default().to_string();
    call(
        &server,
        Method::DELETE,
        &format!("/sandboxes/{pooled_id}"),
        &[("x-api-key", pool.as_str()), ("x-user-id", "end-user-1")],
        None,
    )
    .await;
    // Deleting is per owner too.
    let (s, _, _) = call(&server, Method::DELETE, "/templates/py", &hb, None).await;
    assert_eq!(s, 200);
    let (s, _, _) = call(&server, Method::GET, "/templates/py", &hb, None).await;
    assert_eq!(s, 404, "bob's is gone");
    let (s, _, _) = call(&server, Method::GET, "/templates/py", &ha, None).await;
    assert_eq!(s, 200, "alice's survives bob's delete");
    call(
        &server,
        Method::DELETE,
        &format!("/sandboxes/{id}"),
        &hb,
        None,
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_each_role_sees_of_the_server() {
    let server = native_server(|_| {}).await;
    let image = docker_image();
    let admin = key_in(&server, "root", None, Role::Admin).await;
    let alice = key_in(&server, "alice", None, Role::Owner).await;
    let bob = key_in(&server, "bob", None, Role::Owner).await;
    // Bob runs two sandboxes, alice none; bob has a quota override.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (s, sb, _) = call(
            &server,
            Method::POST,
            "/sandboxes",
            &h(&bob),
            Some(json!({"image": image})),
        )
        .await;
        assert_eq!(s, 201, "{sb}");
        ids.push(sb["id"].as_str().unwrap_or_default().to_string());
    }
    let (s, _, _) = call(
        &server,
        Method::PUT,
        "/quotas/bob",
        &h(&admin),
        Some(json!({"max_sandboxes": 5})),
    )
    .await;
    assert_eq!(s, 200);
    // Admission: alice sees her own figures, the admin the server's.
    let ask = json!({"image": image});
    let (_, mine, _) = call(
        &server,
        Method::POST,
        "/sandboxes/admission",
        &h(&alice),
        Some(ask.clone()),
    )
    .await;
    assert_eq!(
        (
            mine["active_sandboxes"].as_u64(),
            mine["active_owner_sandboxes"].as_u64()
        ),
        (Some(0), Some(0)),
        "{mine}"
    );
    assert_eq!(mine["max_sandboxes"], mine["max_owner_sandboxes"], "{mine}");
    let (_, all, _) = call(
        &server,
        Method::POST,
        "/sandboxes/admission",
        &h(&admin),
        Some(ask),
    )
    .await;
    assert_eq!(all["active_sandboxes"].as_u64(), Some(2), "{all}");
    // Quota summary: alice counts only her own record, the admin every one.
    let (_, summary, _) = call(&server, Method::GET, "/quotas/summary", &h(&alice), None).await;
    assert_eq!(summary["total"], 0, "{summary}");
    let (_, summary, _) = call(&server, Method::GET, "/quotas/summary", &h(&bob), None).await;
    assert_eq!(summary["total"], 1, "{summary}");
    let (_, summary, _) = call(&server, Method::GET, "/quotas/summary", &h(&admin), None).await;
    assert_eq!(summary["total"], 1, "{summary}");
    // Workers: hostnames are for admins, on REST and both GraphQL paths.
    let hostnames = |workers: &Value| -> Vec<String> {
        workers
            .as_array()
            .map(|w| {
                w.iter()
                    .map(|w| w["hostname"].as_str().unwrap_or("?").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (_, workers, _) = call(&server, Method::GET, "/workers", &h(&alice), None).await;
    assert!(!hostnames(&workers).is_empty(), "{workers}");
    assert!(
        hostnames(&workers).iter().all(String::is_empty),
        "{workers}"
    );
    let (_, workers, _) = call(&server, Method::GET, "/workers", &h(&admin), None).await;
    assert!(
        hostnames(&workers).iter().all(|h| !h.is_empty()),
        "{workers}"
    );
    let q = "query($id: ID!) { workers { hostname } sandbox(id: $id) { worker { hostname } } }";
    let seen = gql(&server, &bob, q, json!({"id": ids[0]})).await;
    assert_eq!(
        hostnames(&seen["data"]["workers"]),
        vec![String::new()],
        "{seen}"
    );
    assert_eq!(seen["data"]["sandbox"]["worker"]["hostname"], "", "{seen}");
    let seen = gql(&server, &admin, q, json!({"id": ids[0]})).await;
    assert_ne!(seen["data"]["sandbox"]["worker"]["hostname"], "", "{seen}");
    // Audit events: an operator sees bob's sandbox but not bob's actions,
    // through the sandbox as through the audit query; bob sees his own.
    let ops = key_in(&server, "ops", None, Role::Operator).await;
    let q = "query($id: ID!) { sandbox(id: $id) { auditEvents { action actor } } auditEvents(first: 50) { edges { node { actor } } } }";
    let seen = gql(&server, &ops, q, json!({"id": ids[0]})).await;
    assert_eq!(seen["data"]["sandbox"]["auditEvents"], json!([]), "{seen}");
    let actors: Vec<&str> = seen["data"]["auditEvents"]["edges"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|e| e["node"]["actor"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert!(actors.iter().all(|a| *a == "ops"), "{seen}");
    let seen = gql(&server, &bob, q, json!({"id": ids[0]})).await;
    assert_eq!(
        seen["data"]["sandbox"]["auditEvents"][0]["actor"], "bob",
        "{seen}"
    );
    for id in ids {
        call(
            &server,
            Method::DELETE,
            &format!("/sandboxes/{id}"),
            &h(&bob),
            None,
        )
        .await;
    }
    server.stop().await;
}
