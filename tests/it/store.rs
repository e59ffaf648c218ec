//! The store suite: the same cases against SQLite and a real PostgreSQL.

use std::collections::BTreeMap;

use chrono::{Duration, Utc};
use stacyvm::lifecycle::SandboxState;
use stacyvm::store::{
    AuditFilter, ExecutionFinish, NewAuditEvent, OwnerQuota, SandboxFilter, Store, StoreError,
};

use crate::support::{postgres_store, sqlite_store};

fn sandbox(id: &str, owner: &str, state: SandboxState) -> entity::sandbox::Model {
    let now = Utc::now();
    entity::sandbox::Model {
        id: id.to_string(),
        owner_id: owner.to_string(),
        tenant_id: "default".into(),
        worker_id: "wk-test".into(),
        provider: "docker".into(),
        runtime_id: None,
        image: "img".into(),
        template: None,
        memory_mb: 256,
        vcpus: 1,
        state: state.as_str().into(),
        state_reason: None,
        metadata: serde_json::json!({"k": "v"}),
        created_at: now,
        updated_at: now,
        expires_at: now + Duration::minutes(30),
        destroyed_at: None,
    }
}

fn template(name: &str) -> entity::template::Model {
    let now = Utc::now();
    entity::template::Model {
        name: name.into(),
        owner_id: "alice".into(),
        image: "img".into(),
        provider: String::new(),
        memory_mb: 512,
        vcpus: 1,
        ttl_ms: 60_000,
        metadata: serde_json::json!({}),
        created_at: now,
        updated_at: now,
    }
}

async fn migrations_are_idempotent(store: &Store) {
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("second migrate: {e}"));
}

async fn sandboxes_round_trip_and_filter(store: &Store) {
    store
        .insert_sandbox(sandbox("sb-00000001", "alice", SandboxState::Running))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .insert_sandbox(sandbox("sb-00000002", "bob", SandboxState::Running))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .insert_sandbox(sandbox("sb-00000003", "alice", SandboxState::Destroyed))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let got = store
        .get_sandbox("sb-00000001")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(got.owner_id, "alice");
    assert_eq!(
        stacyvm::store::json_to_map(&got.metadata).ok(),
        Some(BTreeMap::from([("k".to_string(), "v".to_string())]))
    );

    let live = store
        .list_sandboxes(&SandboxFilter::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<_> = live.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        ["sb-00000001", "sb-00000002"],
        "destroyed sandboxes are not listed"
    );

    let alice = store
        .list_sandboxes(&SandboxFilter {
            owner_id: Some("alice".into()),
            states: None,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(alice.len(), 1);
    for (worker, expected) in [("wk-test", 2), ("wk-elsewhere", 0)] {
        let on_worker = store
            .list_sandboxes(&SandboxFilter {
                worker_id: Some(worker.into()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(on_worker.len(), expected, "{worker}");
    }
    assert_eq!(store.count_live_sandboxes(None).await.ok(), Some(2));
    assert_eq!(
        store.count_live_sandboxes(Some("alice")).await.ok(),
        Some(1)
    );
    assert!(
        store
            .get_sandbox("sb-99999999")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none()
    );
}

async fn transitions_are_conditional(store: &Store) {
    store
        .insert_sandbox(sandbox("sb-0000000a", "alice", SandboxState::Creating))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // creating -> destroyed is not a transition.
    let skipped = store
        .transition_sandbox("sb-0000000a", SandboxState::Destroyed, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(skipped.is_none());
    let running = store
        .transition_sandbox_with(
            "sb-0000000a",
            SandboxState::Running,
            None,
            Some("rt-1".into()),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("creating -> running must apply"));
    assert_eq!(running.state, "running");
    assert_eq!(running.runtime_id.as_deref(), Some("rt-1"));

    // Two actors race to destroy: exactly one wins.
    let (a, b) = tokio::join!(
        store.transition_sandbox("sb-0000000a", SandboxState::Destroying, None),
        store.transition_sandbox("sb-0000000a", SandboxState::Destroying, None),
    );
    let winners = [a, b]
        .into_iter()
        .filter(|r| matches!(r, Ok(Some(_))))
        .count();
    assert_eq!(winners, 1);

    // An observer that saw it running must not turn the destroy into an
    // error, although destroying -> error is a legal transition.
    let observed = store
        .transition_sandbox_from(
            "sb-0000000a",
            &[SandboxState::Running, SandboxState::Unhealthy],
            SandboxState::Error,
            Some("runtime gone".into()),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(observed.is_none());

    let destroyed = store
        .transition_sandbox("sb-0000000a", SandboxState::Destroyed, Some("bye".into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("destroying -> destroyed must apply"));
    assert!(destroyed.destroyed_at.is_some());
    assert_eq!(destroyed.state_reason.as_deref(), Some("bye"));
}

async fn expiry_queries(store: &Store) {
    let mut old = sandbox("sb-0000000b", "alice", SandboxState::Running);
    old.expires_at = Utc::now() - Duration::seconds(5);
    store
        .insert_sandbox(old)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .insert_sandbox(sandbox("sb-0000000c", "alice", SandboxState::Running))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let expired = store
        .expired_sandboxes(Utc::now())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        expired.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["sb-0000000b"]
    );

    let later = Utc::now() + Duration::hours(2);
    let extended = store
        .set_sandbox_expiry("sb-0000000b", later)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(extended.expires_at.timestamp(), later.timestamp());
    assert!(
        store
            .expired_sandboxes(Utc::now())
            .await
            .unwrap_or_default()
            .is_empty()
    );
}

async fn templates_crud(store: &Store) {
    store
        .insert_template(template("py"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dup = store.insert_template(template("py")).await;
    assert!(matches!(dup, Err(StoreError::AlreadyExists(_))), "{dup:?}");
    let mut changed = template("py");
    changed.image = "other".into();
    store
        .update_template(changed)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        store
            .get_template("py")
            .await
            .ok()
            .flatten()
            .map(|t| t.image),
        Some("other".into())
    );
    assert_eq!(store.list_templates().await.unwrap_or_default().len(), 1);
    assert!(store.delete_template("py").await.unwrap_or(false));
    assert!(!store.delete_template("py").await.unwrap_or(true));
}

async fn executions_record(store: &Store) {
    let now = Utc::now();
    let model = entity::execution::Model {
        id: "ex-1".into(),
        sandbox_id: "sb-00000001".into(),
        owner_id: "alice".into(),
        argv: serde_json::json!(["echo", "hi"]),
        status: "running".into(),
        exit_code: None,
        duration_ms: None,
        stdout_tail: String::new(),
        stderr_tail: String::new(),
        error: None,
        created_at: now,
        finished_at: None,
    };
    store
        .insert_execution(model)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .finish_execution(
            "ex-1",
            ExecutionFinish {
                status: "completed",
                exit_code: Some(3),
                duration_ms: 12,
                stdout_tail: "hi\n".into(),
                stderr_tail: String::new(),
                error: None,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = store
        .get_execution("ex-1")
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(
        (got.status.as_str(), got.exit_code, got.stdout_tail.as_str()),
        ("completed", Some(3), "hi\n")
    );
    assert!(got.finished_at.is_some());
    assert_eq!(
        store
            .executions_of(&["sb-00000001".to_string()])
            .await
            .unwrap_or_default()
            .len(),
        1
    );
}

async fn audit_is_newest_first_and_filtered(store: &Store) {
    for (i, actor) in ["alice", "bob", "alice"].iter().enumerate() {
        store
            .append_audit(NewAuditEvent {
                actor: actor.to_string(),
                tenant_id: "default".into(),
                action: format!("action.{i}"),
                target: "sb-00000001".into(),
                outcome: "success".into(),
                request_id: format!("req-{i}"),
                detail: None,
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let alice = store
        .list_audit(&AuditFilter {
            actor: Some("alice".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        alice.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["action.2", "action.0"]
    );
    let one = store
        .list_audit(&AuditFilter {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    assert_eq!(one.len(), 1);
    // Newest-first pagination: the page after the newest event.
    let before = stacyvm::store::PageCursor {
        created_at: one[0].created_at,
        id: one[0].id.clone(),
    };
    let older = store
        .list_audit(&AuditFilter {
            before: Some(before),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    assert_eq!(
        older.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["action.1", "action.0"]
    );
}

async fn workers_and_quotas(store: &Store) {
    let now = Utc::now();
    let worker = entity::worker::Model {
        id: "wk-1".into(),
        hostname: "h".into(),
        endpoint: "local".into(),
        status: "online".into(),
        providers: serde_json::json!(["docker"]),
        capacity: 0,
        last_heartbeat: now - Duration::minutes(5),
        created_at: now,
    };
    store
        .upsert_worker(worker.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .upsert_worker(worker)
        .await
        .unwrap_or_else(|e| panic!("re-register: {e}"));
    store
        .worker_heartbeat("wk-1", now)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let workers = store.list_workers().await.unwrap_or_default();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].last_heartbeat.timestamp(), now.timestamp());

    assert_eq!(store.quota_summary().await.ok().map(|s| s.total), Some(0));
    store
        .set_owner_quota(
            "alice",
            OwnerQuota {
                max_sandboxes: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .set_owner_quota(
            "bob",
            OwnerQuota {
                max_ttl_ms: Some(1000),
                max_exec_timeout_ms: Some(5),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let summary = store.quota_summary().await.unwrap_or_default();
    assert_eq!(
        (
            summary.total,
            summary.with_max_sandboxes,
            summary.with_max_ttl,
            summary.with_max_exec_timeout
        ),
        (2, 1, 1, 1)
    );
}

/// Runs every case on one store, in order (they use distinct ids).
async fn suite(store: Store) {
    migrations_are_idempotent(&store).await;
    sandboxes_round_trip_and_filter(&store).await;
    transitions_are_conditional(&store).await;
    expiry_queries(&store).await;
    templates_crud(&store).await;
    executions_record(&store).await;
    audit_is_newest_first_and_filtered(&store).await;
    workers_and_quotas(&store).await;
}

#[tokio::test]
async fn store_suite_sqlite() {
    let (_dir, store) = sqlite_store().await;
    assert_eq!(store.backend_name(), "sqlite");
    suite(store).await;
}

#[tokio::test]
async fn store_suite_postgres() {
    let Some(store) = postgres_store().await else {
        return;
    };
    assert_eq!(store.backend_name(), "postgres");
    suite(store).await;
}
