//! The store suite: the same cases against SQLite and a real PostgreSQL.

use std::collections::BTreeMap;

use chrono::{Duration, Utc};
use stacyvm::lifecycle::SandboxState;
use stacyvm::store::{
    AuditFilter, ExecutionFinish, NewAuditEvent, OwnerQuota, OwnerScope, SandboxFilter, Store,
    StoreError,
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
        idempotency_key: None,
        replica_id: String::new(),
        pool_key: None,
    }
}

fn template(name: &str) -> entity::template::Model {
    let now = Utc::now();
    entity::template::Model {
        tenant_id: "default".into(),
        name: name.into(),
        owner_id: "alice".into(),
        image: "img".into(),
        provider: String::new(),
        memory_mb: 512,
        vcpus: 1,
        disk_mb: None,
        ttl_ms: 60_000,
        metadata: serde_json::json!({}),
        worker_labels: "{}".into(),
        pool_size: 0,
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
        .insert_sandbox(
            sandbox("sb-00000001", "alice", SandboxState::Running),
            Utc::now() + Duration::minutes(5),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .insert_sandbox(
            sandbox("sb-00000002", "bob", SandboxState::Running),
            Utc::now() + Duration::minutes(5),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .insert_sandbox(
            sandbox("sb-00000003", "alice", SandboxState::Destroyed),
            Utc::now() + Duration::minutes(5),
        )
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
        store
            .count_live_sandboxes(Some(("default", "alice")))
            .await
            .ok(),
        Some(1)
    );
    // Another tenant's alice is someone else: her sandbox is not counted
    // or listed as the default tenant's alice's.
    let mut other = sandbox("sb-000000a1", "alice", SandboxState::Running);
    other.tenant_id = "acme".into();
    store
        .insert_sandbox(other, Utc::now() + Duration::minutes(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        store
            .count_live_sandboxes(Some(("default", "alice")))
            .await
            .ok(),
        Some(1)
    );
    assert_eq!(
        store
            .count_live_sandboxes(Some(("acme", "alice")))
            .await
            .ok(),
        Some(1)
    );
    let acme = store
        .list_sandboxes(&SandboxFilter {
            tenant_id: Some("acme".into()),
            owner_id: Some("alice".into()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        acme.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["sb-000000a1"]
    );
    store
        .transition_sandbox("sb-000000a1", SandboxState::Destroying, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .transition_sandbox("sb-000000a1", SandboxState::Destroyed, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
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
        .insert_sandbox(
            sandbox("sb-0000000a", "alice", SandboxState::Creating),
            Utc::now() + Duration::minutes(5),
        )
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
        .insert_sandbox(old, Utc::now() + Duration::minutes(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .insert_sandbox(
            sandbox("sb-0000000c", "alice", SandboxState::Running),
            Utc::now() + Duration::minutes(5),
        )
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
            .get_template(("default", "alice"), "py")
            .await
            .ok()
            .flatten()
            .map(|t| t.image),
        Some("other".into())
    );
    // Names are unique per tenant: acme may have its own "py".
    let mut acme = template("py");
    acme.tenant_id = "acme".into();
    acme.image = "acme-img".into();
    store
        .insert_template(acme)
        .await
        .unwrap_or_else(|e| panic!("acme's py: {e}"));
    assert_eq!(
        store
            .get_template(("acme", "alice"), "py")
            .await
            .ok()
            .flatten()
            .map(|t| t.image),
        Some("acme-img".into())
    );
    // And per owner: bob's "py" is his own, beside alice's.
    let mut bobs = template("py");
    bobs.owner_id = "bob".into();
    bobs.image = "bob-img".into();
    store
        .insert_template(bobs)
        .await
        .unwrap_or_else(|e| panic!("bob's py: {e}"));
    assert_eq!(
        store
            .get_template(("default", "alice"), "py")
            .await
            .ok()
            .flatten()
            .map(|t| t.image),
        Some("other".into())
    );
    assert_eq!(
        store
            .list_templates("default")
            .await
            .unwrap_or_default()
            .len(),
        2
    );
    assert!(
        store
            .delete_template(("default", "bob"), "py")
            .await
            .unwrap_or(false)
    );
    assert!(
        store
            .delete_template(("default", "alice"), "py")
            .await
            .unwrap_or(false)
    );
    assert!(
        !store
            .delete_template(("default", "alice"), "py")
            .await
            .unwrap_or(true)
    );
    assert!(
        store
            .get_template(("acme", "alice"), "py")
            .await
            .ok()
            .flatten()
            .is_some()
    );
    assert!(
        store
            .delete_template(("acme", "alice"), "py")
            .await
            .unwrap_or(false)
    );
}

async fn executions_record(store: &Store) {
    let now = Utc::now();
    let model = entity::execution::Model {
        id: "ex-1".into(),
        sandbox_id: "sb-00000001".into(),
        owner_id: "alice".into(),
        tenant_id: "default".into(),
        argv: serde_json::json!(["echo", "hi"]),
        status: "running".into(),
        exit_code: None,
        duration_ms: None,
        stdout_tail: String::new(),
        stderr_tail: String::new(),
        error: None,
        created_at: now,
        finished_at: None,
        replica_id: String::new(),
    };
    store
        .insert_execution(model)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .finish_execution(
            "ex-1",
            ExecutionFinish {
                status: stacyvm::lifecycle::ExecStatus::Completed,
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
        admin_state: "active".into(),
        labels: "{}".into(),
        snapshot: String::new(),
        instance: String::new(),
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

    assert_eq!(
        store
            .quota_summary(OwnerScope::All)
            .await
            .ok()
            .map(|s| s.total),
        Some(0)
    );
    store
        .set_owner_quota(
            "default",
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
            "default",
            "bob",
            OwnerQuota {
                max_ttl_ms: Some(1000),
                max_exec_timeout_ms: Some(5),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let summary = store
        .quota_summary(OwnerScope::All)
        .await
        .unwrap_or_default();
    assert_eq!(
        (
            summary.total,
            summary.with_max_sandboxes,
            summary.with_max_ttl,
            summary.with_max_exec_timeout
        ),
        (2, 1, 1, 1)
    );
    // Scoped to one owner or one tenant.
    let bobs = store
        .quota_summary(OwnerScope::Owner("default", "bob"))
        .await
        .unwrap_or_default();
    assert_eq!(
        (bobs.total, bobs.with_max_sandboxes, bobs.with_max_ttl),
        (1, 0, 1)
    );
    let acme = store
        .quota_summary(OwnerScope::Tenant("acme"))
        .await
        .unwrap_or_default();
    assert_eq!(acme.total, 0);
    // acme's alice has no quota of her own until one is set for her.
    assert!(
        store
            .get_owner("acme", "alice")
            .await
            .ok()
            .flatten()
            .is_none()
    );
    store
        .set_owner_quota(
            "acme",
            "alice",
            OwnerQuota {
                max_sandboxes: Some(7),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let max = |tenant: &'static str| async move {
        store
            .get_owner(tenant, "alice")
            .await
            .ok()
            .flatten()
            .and_then(|o| o.max_sandboxes)
    };
    assert_eq!(
        (max("default").await, max("acme").await),
        (Some(2), Some(7))
    );
    assert_eq!(
        store
            .list_owner_quotas(Some("acme"))
            .await
            .unwrap_or_default()
            .len(),
        1
    );
}

/// Leases: taken with the record, renewed and released per worker,
/// reclaimed with the next generation (concurrent reclaims never share
/// one), let go when the sandbox is destroyed; idempotency keys are
/// unique per owner.
async fn leases_fence_and_idempotency_keys(store: &Store) {
    let soon = Utc::now() + Duration::minutes(5);
    let mut a = sandbox("sb-0000a001", "alice", SandboxState::Running);
    a.worker_id = "wk-lease-1".into();
    let mut b = sandbox("sb-0000a002", "alice", SandboxState::Running);
    b.worker_id = "wk-lease-2".into();
    for s in [&a, &b] {
        store
            .insert_sandbox(s.clone(), soon)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let lease = store.lease(&a.id).await.ok().flatten().expect("a lease");
    assert_eq!(
        (lease.generation, lease.worker_id.as_str()),
        (1, "wk-lease-1")
    );
    assert!(lease.released_at.is_none());

    // Renewal reaches only the holder's leases.
    let later = soon + Duration::minutes(5);
    assert_eq!(store.renew_leases("wk-lease-1", later).await.ok(), Some(1));
    let b_lease = store.lease(&b.id).await.ok().flatten().expect("b lease");
    assert_eq!(b_lease.expires_at.timestamp(), soon.timestamp());

    // Expiry releases what expired, once, for that worker only.
    let past_b = soon + Duration::minutes(1);
    let released = store
        .release_expired_leases("wk-lease-2", past_b, 100)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].sandbox_id, b.id);
    let again = store
        .release_expired_leases("wk-lease-2", past_b, 100)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(again.is_empty(), "released twice: {again:?}");
    let none = store
        .release_expired_leases("wk-lease-1", past_b, 100)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(none.is_empty(), "a renewed lease expired: {none:?}");
    // A released lease is not renewed by a late heartbeat.
    assert_eq!(store.renew_leases("wk-lease-2", later).await.ok(), Some(0));

    // Reclaims bump the generation; concurrent ones each get their own.
    let reclaimed = store
        .reclaim_lease(&b.id, "wk-lease-2", later)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reclaimed.generation, 2);
    assert!(reclaimed.released_at.is_none());
    let (x, y) = tokio::join!(
        store.reclaim_lease(&b.id, "wk-lease-2", later),
        store.reclaim_lease(&b.id, "wk-lease-2", later)
    );
    let mut generations = vec![
        x.unwrap_or_else(|e| panic!("{e}")).generation,
        y.unwrap_or_else(|e| panic!("{e}")).generation,
    ];
    generations.sort_unstable();
    assert_eq!(generations, [3, 4]);

    // What an incremental reconcile pass reads: nothing when nothing
    // changed; a lease taken again, its record untouched, is a lease change.
    let mark = Utc::now();
    let rows = |since| store.reconcile_rows_changed("wk-lease-2", since);
    let leases = |since| store.leases_changed("wk-lease-2", since);
    assert!(
        rows(mark)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty()
    );
    assert!(
        leases(mark)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty()
    );
    store
        .reclaim_lease(&b.id, "wk-lease-2", later)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        rows(mark)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty()
    );
    assert_eq!(
        leases(mark).await.unwrap_or_else(|e| panic!("{e}")),
        [b.id.clone()]
    );
    let row = store
        .reconcile_row("wk-lease-2", &b.id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(row.and_then(|r| r.lease_generation), Some(5));
    assert!(
        store
            .reconcile_row("wk-lease-1", &b.id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none(),
        "b is not on wk-lease-1"
    );

    // Destroyed: the lease is let go with the record.
    store
        .transition_sandbox(&a.id, SandboxState::Destroying, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .transition_sandbox(&a.id, SandboxState::Destroyed, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let gone = store.lease(&a.id).await.ok().flatten().expect("kept");
    assert!(gone.released_at.is_some(), "{gone:?}");
    assert_eq!(gone.generation, 1);

    // Idempotency keys: unique per owner, free for another owner.
    let mut first = sandbox("sb-0000a003", "alice", SandboxState::Running);
    first.idempotency_key = Some("retry-1".into());
    store
        .insert_sandbox(first.clone(), soon)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut dup = sandbox("sb-0000a004", "alice", SandboxState::Running);
    dup.idempotency_key = Some("retry-1".into());
    assert!(matches!(
        store.insert_sandbox(dup, soon).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(
        store.lease("sb-0000a004").await.ok().flatten().is_none(),
        "a refused insert left its lease"
    );
    let mut other = sandbox("sb-0000a005", "bob", SandboxState::Running);
    other.idempotency_key = Some("retry-1".into());
    store
        .insert_sandbox(other, soon)
        .await
        .unwrap_or_else(|e| panic!("another owner's key: {e}"));
    let found = store
        .sandbox_by_idempotency_key("default", "alice", "retry-1")
        .await
        .ok()
        .flatten()
        .expect("found by key");
    assert_eq!(found.id, first.id);
}

/// A claim as the service makes it: the candidates, then the admission.
async fn claim_from_pool<E>(
    store: &Store,
    key: &str,
    claim: &stacyvm::store::PoolClaim,
    workers: &[String],
    decide: impl FnOnce(stacyvm::store::LiveCounts) -> Result<(), E>,
) -> Result<Result<Option<entity::sandbox::Model>, E>, StoreError> {
    let candidates = store.pool_candidates(key, workers).await?;
    store.claim_pooled(key, candidates, claim, decide).await
}

/// Warm sandboxes: counted against nobody, listed to nobody, and each
/// claimed once, under the admission's decision.
async fn warm_pools_claim_each_sandbox_once(store: &Store) {
    let tag = crate::support::uuid_hex();
    let key = format!("pk-{tag}");
    let lease_until = Utc::now() + Duration::minutes(5);
    let live_before = store.count_live_sandboxes(None).await.expect("count");
    let mut warm = Vec::new();
    for (i, (state, pool)) in [
        (SandboxState::Running, key.clone()),
        (SandboxState::Running, key.clone()),
        (SandboxState::Running, key.clone()),
        (SandboxState::Creating, key.clone()),
        (SandboxState::Running, format!("other-{tag}")),
    ]
    .into_iter()
    .enumerate()
    {
        let mut m = sandbox(&format!("sb-w{i}{}", &tag[..6]), "system", state);
        m.tenant_id = "system".into();
        m.pool_key = Some(pool);
        m.created_at += Duration::milliseconds(i as i64);
        warm.push(
            store
                .insert_sandbox(m, lease_until)
                .await
                .expect("insert")
                .id,
        );
    }
    assert_eq!(
        store.count_live_sandboxes(None).await.expect("count"),
        live_before,
        "warm sandboxes count against nobody"
    );
    let listed = store
        .list_sandboxes(&SandboxFilter::default())
        .await
        .expect("list");
    assert!(listed.iter().all(|m| m.pool_key.is_none()));
    let claim = |owner: &str, idem: Option<&str>| stacyvm::store::PoolClaim {
        tenant_id: "default".into(),
        owner_id: owner.into(),
        template: Some("py".into()),
        metadata: serde_json::json!({"team": "blue"}),
        created_at: Utc::now(),
        expires_at: Utc::now() + Duration::minutes(7),
        idempotency_key: idem.map(str::to_string),
    };
    let workers = vec!["wk-test".to_string()];
    // Only where a fresh spawn could go: none on another worker.
    let elsewhere = claim_from_pool(
        store,
        &key,
        &claim("carol", None),
        &["wk-other".to_string()],
        |_| Ok::<(), ()>(()),
    )
    .await
    .expect("claim");
    assert_eq!(elsewhere.map(|m| m.map(|m| m.id)), Ok(None));
    // A refusal leaves the pool untouched.
    let refused = claim_from_pool(store, &key, &claim("carol", None), &workers, |_| {
        Err("over quota")
    })
    .await
    .expect("claim");
    assert_eq!(refused.map(|m| m.map(|m| m.id)), Err("over quota"));
    // Four claims for three running ones: each gets its own, one gets none
    // (at once where the store takes concurrent writers).
    let c = claim("carol", None);
    let one = || claim_from_pool(store, &key, &c, &workers, |_| Ok::<(), ()>(()));
    let outcomes = if store.is_shared() {
        let (a, b, c2, d) = tokio::join!(one(), one(), one(), one());
        vec![a, b, c2, d]
    } else {
        vec![one().await, one().await, one().await, one().await]
    };
    let mut got: Vec<String> = Vec::new();
    let mut empty = 0;
    for outcome in outcomes {
        match outcome.expect("claim").expect("admitted") {
            Some(m) => {
                assert_eq!(
                    (m.owner_id.as_str(), m.tenant_id.as_str()),
                    ("carol", "default")
                );
                assert_eq!(m.pool_key, None);
                assert_eq!(m.template.as_deref(), Some("py"));
                assert_eq!(m.metadata, serde_json::json!({"team": "blue"}));
                assert_eq!(m.state, "running");
                got.push(m.id);
            }
            None => empty += 1,
        }
    }
    got.sort();
    let mut running = warm[..3].to_vec();
    running.sort();
    assert_eq!((got, empty), (running, 1), "each running one claimed once");
    assert_eq!(
        store
            .count_live_sandboxes(Some(("default", "carol")))
            .await
            .expect("count"),
        3,
        "claimed ones count against their owner"
    );
    // The creating one and the other pool's are left.
    let left: Vec<String> = store
        .pooled_sandboxes()
        .await
        .expect("pooled")
        .into_iter()
        .filter(|m| warm.contains(&m.id))
        .map(|m| m.id)
        .collect();
    assert_eq!(left, warm[3..].to_vec());
    // An owner's idempotency key stays unique through a claim.
    let other = format!("other-{tag}");
    let mut keyed = sandbox(&format!("sb-k{}", &tag[..7]), "dave", SandboxState::Running);
    keyed.idempotency_key = Some(format!("retry-{tag}"));
    store
        .insert_sandbox(keyed, lease_until)
        .await
        .expect("insert");
    let dup = claim_from_pool(
        store,
        &other,
        &claim("dave", Some(&format!("retry-{tag}"))),
        &workers,
        |_| Ok::<(), ()>(()),
    )
    .await;
    assert!(matches!(dup, Err(StoreError::AlreadyExists(_))), "{dup:?}");
    let still: Vec<String> = store
        .pooled_sandboxes()
        .await
        .expect("pooled")
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert!(
        still.contains(&warm[4]),
        "a failed claim keeps the sandbox warm"
    );
    // The pool retires only what is still its own: a claimed one is not.
    assert!(
        store
            .retire_pooled(&warm[0], &key)
            .await
            .expect("retire")
            .is_none()
    );
    let retired = store
        .retire_pooled(&warm[4], &other)
        .await
        .expect("retire")
        .expect("still warm");
    assert_eq!(retired.state, "destroying");
    // Past its age, a warm sandbox is never handed out.
    let mut aged = sandbox(
        &format!("sb-a{}", &tag[..7]),
        "system",
        SandboxState::Running,
    );
    aged.tenant_id = "system".into();
    aged.pool_key = Some(other.clone());
    aged.expires_at = Utc::now() - Duration::seconds(1);
    store
        .insert_sandbox(aged, lease_until)
        .await
        .expect("insert");
    let none = claim_from_pool(store, &other, &claim("erin", None), &workers, |_| {
        Ok::<(), ()>(())
    })
    .await
    .expect("claim");
    assert_eq!(none.map(|m| m.map(|m| m.id)), Ok(None));
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
    leases_fence_and_idempotency_keys(&store).await;
    warm_pools_claim_each_sandbox_once(&store).await;
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

/// Reads of a SQLite file that skip sqlx (the direct reader) return what
/// sqlx returns, column for column, for every read that takes that path:
/// a record with every column set to a value of its own, one with the
/// optional ones empty, a destroyed one, a page after a cursor (which binds
/// a timestamp), and the reconciler's rows joined with their leases.
#[tokio::test]
async fn direct_sqlite_reads_equal_reads_through_sqlx() {
    use chrono::TimeZone;
    use stacyvm::store::{PageCursor, SandboxQuery};
    let (_dir, direct) = sqlite_store().await;
    let sqlx = direct.clone().without_direct_reads();
    let whole_second = Utc.with_ymd_and_hms(2026, 12, 3, 10, 0, 0).unwrap();
    let full = entity::sandbox::Model {
        runtime_id: Some("ctr-\u{e9}\"'; --".into()),
        template: Some("py".into()),
        state_reason: Some("pool".into()),
        metadata: serde_json::json!({"nested": {"list": [1, 2.5, null, true]}, "\u{1f600}": "x"}),
        created_at: whole_second,
        updated_at: Utc::now(),
        expires_at: Utc.timestamp_nanos(1_800_000_000_123_456_789),
        idempotency_key: Some("key-1".into()),
        replica_id: "replica-a".into(),
        pool_key: Some("default/py".into()),
        memory_mb: 4096,
        vcpus: 3,
        ..sandbox("sb-0000d001", "dora", SandboxState::Running)
    };
    let mut bare = sandbox("sb-0000d002", "dora", SandboxState::Creating);
    bare.metadata = serde_json::json!({});
    let mut gone = sandbox("sb-0000d003", "dora", SandboxState::Destroyed);
    gone.destroyed_at = Some(Utc::now());
    gone.state_reason = Some("ttl".into());
    for model in [full, bare, gone] {
        direct
            .insert_sandbox(model, Utc::now() + Duration::minutes(5))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let before = direct.direct_read_count();
    for id in ["sb-0000d001", "sb-0000d002", "sb-0000d003", "sb-missing"] {
        let a = direct
            .get_sandbox(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let b = sqlx.get_sandbox(id).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, b, "{id}");
        assert_eq!(a.is_some(), id != "sb-missing");
    }
    let filter = SandboxFilter {
        owner_id: Some("dora".into()),
        states: Some(SandboxState::ALL.to_vec()),
        with_pooled: true,
        ..Default::default()
    };
    let a = direct
        .list_sandboxes(&filter)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.len(), 3);
    assert_eq!(
        a,
        sqlx.list_sandboxes(&filter)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    let ids = vec!["sb-0000d001".to_string(), "sb-0000d003".to_string()];
    let a = direct
        .sandboxes_by_ids(&ids)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.len(), 2);
    assert_eq!(
        a,
        sqlx.sandboxes_by_ids(&ids)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    let page = SandboxQuery {
        owner_id: Some("dora".into()),
        states: Some(SandboxState::ALL.to_vec()),
        after: Some(PageCursor {
            created_at: whole_second,
            id: "sb-0000d001".into(),
        }),
        limit: 10,
        ..Default::default()
    };
    let a = direct
        .page_sandboxes(&page)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        a.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["sb-0000d002", "sb-0000d003"],
        "the cursor's timestamp compares as the stored text does"
    );
    assert_eq!(
        a,
        sqlx.page_sandboxes(&page)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    let a = direct
        .reconcile_rows("wk-test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        a.iter()
            .any(|r| r.id == "sb-0000d001" && r.lease_generation.is_some())
    );
    assert_eq!(
        a,
        sqlx.reconcile_rows("wk-test")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    // What changed since a moment, in any state (a destroyed record too:
    // an incremental pass drops it), and nothing since a moment to come.
    for (since, want) in [
        (
            whole_second,
            vec!["sb-0000d001", "sb-0000d002", "sb-0000d003"],
        ),
        (Utc::now() + Duration::minutes(1), vec![]),
    ] {
        let a = direct
            .reconcile_rows_changed("wk-test", since)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut ids: Vec<&str> = a.iter().map(|r| r.id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, want, "changed since {since}");
        assert_eq!(
            a,
            sqlx.reconcile_rows_changed("wk-test", since)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        );
    }
    // One record as the reconciler reads it before acting: only while it
    // is on that worker.
    for (worker, id, found) in [
        ("wk-test", "sb-0000d003", true),
        ("wk-other", "sb-0000d001", false),
    ] {
        let a = direct
            .reconcile_row(worker, id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.is_some(), found, "{worker} {id}");
        assert_eq!(
            a,
            sqlx.reconcile_row(worker, id)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        );
    }
    // The two handles share the counter: twelve reads each, and only the
    // direct handle's took the direct path.
    assert_eq!(
        direct.direct_read_count() - before,
        12,
        "every read of the direct handle took the direct path, none of the other's"
    );
}

/// A database made before tenants were part of an owner's identity keeps
/// its data: owners, templates and executions land in the tenants they
/// belong to.
#[tokio::test]
async fn the_tenants_migration_keeps_existing_rows() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    tenants_migration_keeps_rows(&url).await;
    if let Some(url) = crate::support::postgres_url().await {
        tenants_migration_keeps_rows(&url).await;
    }
}

async fn tenants_migration_keeps_rows(url: &str) {
    use migration::MigratorTrait;
    use sea_orm::{ConnectionTrait, Database};
    let db = Database::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    migration::Migrator::up(&db, Some(2))
        .await
        .unwrap_or_else(|e| panic!("old migrations: {e}"));
    let now = "2026-11-30T10:00:00+00:00";
    for sql in [
        format!(
            "INSERT INTO sandboxes (id, owner_id, tenant_id, worker_id, provider, image, memory_mb, \
             vcpus, state, metadata, created_at, updated_at, expires_at) VALUES ('sb-000000f1', \
             'alice', 'acme', 'wk', 'native', 'img', 64, 1, 'running', '{{}}', '{now}', '{now}', '{now}')"
        ),
        format!(
            "INSERT INTO executions (id, sandbox_id, owner_id, argv, status, stdout_tail, \
             stderr_tail, created_at) VALUES ('ex-old', 'sb-000000f1', 'alice', '[]', 'completed', \
             '', '', '{now}')"
        ),
        format!(
            "INSERT INTO owners (id, max_sandboxes, created_at, updated_at) VALUES ('alice', 3, \
             '{now}', '{now}')"
        ),
        format!(
            "INSERT INTO templates (name, owner_id, image, provider, memory_mb, vcpus, ttl_ms, \
             metadata, created_at, updated_at) VALUES ('py', 'alice', 'img', '', 64, 1, 60000, \
             '{{}}', '{now}', '{now}')"
        ),
    ] {
        db.execute_unprepared(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    drop(db);
    let store = Store::connect(url).await.unwrap_or_else(|e| panic!("{e}"));
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("tenants migration: {e}"));
    let execution = store
        .get_execution("ex-old")
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("execution lost"));
    assert_eq!(
        execution.tenant_id, "acme",
        "executions take their sandbox's tenant"
    );
    let owner = store.get_owner("default", "alice").await.ok().flatten();
    assert_eq!(owner.and_then(|o| o.max_sandboxes), Some(3));
    let template = store
        .get_template(("default", "alice"), "py")
        .await
        .ok()
        .flatten();
    assert_eq!(
        template.map(|t| (t.image, t.disk_mb)),
        Some(("img".into(), None))
    );
}
