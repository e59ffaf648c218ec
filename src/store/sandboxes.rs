//! Sandbox records.

use chrono::{DateTime, Utc};
use entity::sandbox::{self, Column, Entity};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, PaginatorTrait, QueryFilter,
    QueryOrder, Set,
};

use super::{Store, StoreResult};
use crate::lifecycle::SandboxState;

/// Which sandboxes a listing returns.
#[derive(Debug, Clone, Default)]
pub struct SandboxFilter {
    /// Only this tenant's sandboxes.
    pub tenant_id: Option<String>,
    /// Only this owner's sandboxes (of the tenant, when one is set).
    pub owner_id: Option<String>,
    /// Only these states; `None` means every state but `destroyed`.
    pub states: Option<Vec<SandboxState>>,
    /// Only sandboxes placed on this worker.
    pub worker_id: Option<String>,
    /// Also sandboxes waiting in a warm pool (internal sweeps only: no
    /// caller ever lists them).
    pub with_pooled: bool,
}

/// A position in a listing ordered by (created_at, id): the last row seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub created_at: DateTime<Utc>,
    pub id: String,
}

/// A filtered, paginated listing of sandboxes, oldest first.
#[derive(Debug, Clone, Default)]
pub struct SandboxQuery {
    pub tenant_id: Option<String>,
    pub owner_id: Option<String>,
    /// Only these states; `None` means every state but `destroyed`.
    pub states: Option<Vec<SandboxState>>,
    pub provider: Option<String>,
    pub image: Option<String>,
    /// Rows after this one.
    pub after: Option<PageCursor>,
    pub limit: u64,
}

fn names(states: &[SandboxState]) -> Vec<&'static str> {
    states.iter().map(|s| s.as_str()).collect()
}

/// The columns `Entity::find()` selects, in its order (`Column::iter()`):
/// what [`decode_sandbox`] reads by position. The direct reader checks a
/// statement returns exactly these before decoding any row.
const SANDBOX_COLUMNS: &[&str] = &[
    "id",
    "owner_id",
    "tenant_id",
    "worker_id",
    "provider",
    "runtime_id",
    "image",
    "template",
    "memory_mb",
    "vcpus",
    "state",
    "state_reason",
    "metadata",
    "created_at",
    "updated_at",
    "expires_at",
    "destroyed_at",
    "idempotency_key",
    "replica_id",
    "pool_key",
];

/// A record read by the direct reader, by position in [`SANDBOX_COLUMNS`].
fn decode_sandbox(row: &rusqlite::Row<'_>) -> rusqlite::Result<sandbox::Model> {
    Ok(sandbox::Model {
        id: row.get(0)?,
        owner_id: row.get(1)?,
        tenant_id: row.get(2)?,
        worker_id: row.get(3)?,
        provider: row.get(4)?,
        runtime_id: row.get(5)?,
        image: row.get(6)?,
        template: row.get(7)?,
        memory_mb: row.get(8)?,
        vcpus: row.get(9)?,
        state: row.get(10)?,
        state_reason: row.get(11)?,
        metadata: row.get(12)?,
        created_at: timestamp(row, 13)?,
        updated_at: timestamp(row, 14)?,
        expires_at: timestamp(row, 15)?,
        destroyed_at: optional_timestamp(row, 16)?,
        idempotency_key: row.get(17)?,
        replica_id: row.get(18)?,
        pool_key: row.get(19)?,
    })
}

/// A timestamp column as sqlx stores it (RFC 3339 text), parsed by chrono's
/// RFC 3339 parser: rusqlite's general one, which also takes other forms
/// and is the fallback, cost a third of decoding a record.
fn timestamp(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<DateTime<Utc>> {
    if let rusqlite::types::ValueRef::Text(text) = row.get_ref(idx)?
        && let Ok(text) = std::str::from_utf8(text)
        && let Ok(at) = DateTime::parse_from_rfc3339(text)
    {
        return Ok(at.with_timezone(&Utc));
    }
    row.get(idx)
}

fn optional_timestamp(
    row: &rusqlite::Row<'_>,
    idx: usize,
) -> rusqlite::Result<Option<DateTime<Utc>>> {
    match row.get_ref(idx)? {
        rusqlite::types::ValueRef::Null => Ok(None),
        _ => timestamp(row, idx).map(Some),
    }
}

/// Reads of more rows than this go to a blocking thread.
const INLINE_ROWS: u64 = 256;

/// What the reconciler reads of one live record (and its lease), without
/// the columns it never looks at: a pass reads every live record of a
/// worker, so each column decoded costs as many times.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconcileRow {
    pub id: String,
    pub state: String,
    pub state_reason: Option<String>,
    pub provider: String,
    pub runtime_id: Option<String>,
    pub updated_at: DateTime<Utc>,
    pub pool_key: Option<String>,
    /// The lease's generation; `None` without a lease (a record from
    /// before leases).
    pub lease_generation: Option<i64>,
    pub lease_worker_id: Option<String>,
    pub lease_released_at: Option<DateTime<Utc>>,
}

/// The columns [`Store::reconcile_rows`] selects, in order.
const RECONCILE_COLUMNS: &[&str] = &[
    "id",
    "state",
    "state_reason",
    "provider",
    "runtime_id",
    "updated_at",
    "pool_key",
    "lease_generation",
    "lease_worker_id",
    "lease_released_at",
];

fn decode_reconcile_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ReconcileRow> {
    Ok(ReconcileRow {
        id: row.get(0)?,
        state: row.get(1)?,
        state_reason: row.get(2)?,
        provider: row.get(3)?,
        runtime_id: row.get(4)?,
        updated_at: timestamp(row, 5)?,
        pool_key: row.get(6)?,
        lease_generation: row.get(7)?,
        lease_worker_id: row.get(8)?,
        lease_released_at: optional_timestamp(row, 9)?,
    })
}

/// What a spawn that claims a warm sandbox writes on it.
#[derive(Debug, Clone)]
pub struct PoolClaim {
    pub tenant_id: String,
    pub owner_id: String,
    pub template: Option<String>,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub idempotency_key: Option<String>,
}

/// Sandboxes holding capacity, counted inside an admission.
#[derive(Debug, Clone, Copy)]
pub struct LiveCounts {
    /// On the whole installation.
    pub all: u64,
    /// Of the spawning owner.
    pub owner: u64,
}

/// A PostgreSQL advisory lock key (`pg_advisory_xact_lock`) taken by
/// every admission, on every replica: counting and inserting are one
/// critical section across the installation.
const ADMISSION_LOCK: i64 = 0x5374_6163_7941_646d; // "StacyAdm"

async fn count_live_on<C: sea_orm::ConnectionTrait>(
    conn: &C,
    owner: Option<(&str, &str)>,
) -> StoreResult<u64> {
    // A warm sandbox counts against nobody until a spawn claims it.
    let mut query = Entity::find()
        .filter(Column::State.is_in(names(&SandboxState::LIVE)))
        .filter(Column::PoolKey.is_null());
    if let Some((tenant, owner)) = owner {
        query = query
            .filter(Column::TenantId.eq(tenant))
            .filter(Column::OwnerId.eq(owner));
    }
    Ok(query.count(conn).await?)
}

impl Store {
    /// Admits and inserts a sandbox as one step: counts the live
    /// sandboxes (all, and the record's owner's), asks `decide`, and
    /// inserts the record with its lease only if it agrees. On PostgreSQL
    /// this runs in one transaction under an advisory lock, so replicas
    /// admitting at once never both take the last slot; SQLite has a
    /// single replica (and a single writer), where the caller's lock is
    /// enough. `decide`'s refusal is handed back untouched.
    pub async fn admit_sandbox<E>(
        &self,
        model: sandbox::Model,
        lease_until: DateTime<Utc>,
        decide: impl FnOnce(LiveCounts) -> Result<(), E>,
    ) -> StoreResult<Result<sandbox::Model, E>> {
        let owner = (model.tenant_id.clone(), model.owner_id.clone());
        let (txn, counts) = self.begin_admission((&owner.0, &owner.1)).await?;
        if let Err(refused) = decide(counts) {
            txn.rollback().await?;
            return Ok(Err(refused));
        }
        let inserted = insert_with_lease(&txn, model, lease_until).await?;
        txn.commit().await?;
        Ok(Ok(inserted))
    }

    /// Up to four sandboxes of pool `pool_key` a claim may take now:
    /// running, not past their age, on one of `workers`, oldest first. A
    /// plain read, before any admission (an empty pool costs nothing
    /// more); the claim's UPDATE re-checks each.
    pub async fn pool_candidates(
        &self,
        pool_key: &str,
        workers: &[String],
    ) -> StoreResult<Vec<String>> {
        use sea_orm::QuerySelect;
        Ok(Entity::find()
            .select_only()
            .column(Column::Id)
            .filter(Column::PoolKey.eq(pool_key))
            .filter(Column::State.eq(SandboxState::Running.as_str()))
            .filter(Column::ExpiresAt.gt(Utc::now()))
            .filter(Column::WorkerId.is_in(workers.iter().map(String::as_str)))
            .order_by_asc(Column::CreatedAt)
            .limit(4)
            .into_tuple()
            .all(self.conn())
            .await?)
    }

    /// Admits a spawn as [`Store::admit_sandbox`] does, but hands it one of
    /// `candidates` (from [`Store::pool_candidates`]) instead of inserting
    /// a record: the first still `running`, in pool `pool_key` and within
    /// its age is given the claim's owner, TTL, metadata and key in one
    /// conditional UPDATE. `Ok(None)`: each was taken or moved meanwhile.
    pub async fn claim_pooled<E>(
        &self,
        pool_key: &str,
        candidates: Vec<String>,
        claim: &PoolClaim,
        decide: impl FnOnce(LiveCounts) -> Result<(), E>,
    ) -> StoreResult<Result<Option<sandbox::Model>, E>> {
        if candidates.is_empty() {
            return Ok(Ok(None));
        }
        let (txn, counts) = self
            .begin_admission((&claim.tenant_id, &claim.owner_id))
            .await?;
        if let Err(refused) = decide(counts) {
            txn.rollback().await?;
            return Ok(Err(refused));
        }
        for id in candidates {
            let claimed = Entity::update_many()
                .col_expr(Column::TenantId, Expr::value(claim.tenant_id.as_str()))
                .col_expr(Column::OwnerId, Expr::value(claim.owner_id.as_str()))
                .col_expr(Column::Template, Expr::value(claim.template.clone()))
                .col_expr(Column::Metadata, Expr::value(claim.metadata.clone()))
                .col_expr(Column::CreatedAt, Expr::value(claim.created_at))
                // Now, not when the claim began: incremental reconcile
                // passes read changes by this, and the claim may have waited
                // for the admission lock.
                .col_expr(Column::UpdatedAt, Expr::value(Utc::now()))
                .col_expr(Column::ExpiresAt, Expr::value(claim.expires_at))
                .col_expr(
                    Column::IdempotencyKey,
                    Expr::value(claim.idempotency_key.clone()),
                )
                .col_expr(Column::ReplicaId, Expr::value(self.replica()))
                .col_expr(Column::PoolKey, Expr::value(Option::<String>::None))
                // What the pool's life left (a recovered health check).
                .col_expr(Column::StateReason, Expr::value(Option::<String>::None))
                .filter(Column::Id.eq(id.as_str()))
                .filter(Column::PoolKey.eq(pool_key))
                .filter(Column::State.eq(SandboxState::Running.as_str()))
                .filter(Column::ExpiresAt.gt(Utc::now()))
                .exec(&txn)
                .await;
            match claimed {
                Ok(done) if done.rows_affected == 1 => {
                    let model = Entity::find_by_id(id).one(&txn).await?;
                    txn.commit().await?;
                    return Ok(Ok(model));
                }
                Ok(_) => continue,
                Err(e) if is_unique_violation(&e) => {
                    txn.rollback().await?;
                    return Err(already_used_key());
                }
                Err(e) => return Err(e.into()),
            }
        }
        txn.rollback().await?;
        Ok(Ok(None))
    }

    /// Every live record on `worker_id` with its lease, in one query, in
    /// no particular order (sorting 10,000 rows took half the read): what a
    /// full reconcile pass compares with the inventories.
    pub async fn reconcile_rows(&self, worker_id: &str) -> StoreResult<Vec<ReconcileRow>> {
        use sea_orm::sea_query::ExprTrait;
        let live = Expr::col((Entity, Column::State)).is_in(names(&SandboxState::LIVE));
        self.read_reconcile_rows(worker_id, live, true).await
    }

    /// The records on `worker_id`, in any state, whose `updated_at` (set by
    /// every change of a record) is at or after `since`: what an
    /// incremental reconcile pass reads to bring its copy of the live
    /// records up to date (by `idx_sandboxes_worker_updated`).
    pub async fn reconcile_rows_changed(
        &self,
        worker_id: &str,
        since: DateTime<Utc>,
    ) -> StoreResult<Vec<ReconcileRow>> {
        use sea_orm::sea_query::ExprTrait;
        let changed = Expr::col((Entity, Column::UpdatedAt)).gte(since);
        self.read_reconcile_rows(worker_id, changed, true).await
    }

    /// One record as [`Store::reconcile_rows`] reads it, in any state, if
    /// it is still on `worker_id`: what the reconciler acts on.
    pub async fn reconcile_row(
        &self,
        worker_id: &str,
        id: &str,
    ) -> StoreResult<Option<ReconcileRow>> {
        use sea_orm::sea_query::ExprTrait;
        let one = Expr::col((Entity, Column::Id)).eq(id);
        Ok(self
            .read_reconcile_rows(worker_id, one, false)
            .await?
            .into_iter()
            .next())
    }

    /// The reconciler's columns of the records on `worker_id` that match
    /// `condition`, with their leases.
    async fn read_reconcile_rows(
        &self,
        worker_id: &str,
        condition: impl sea_orm::sea_query::IntoCondition,
        many: bool,
    ) -> StoreResult<Vec<ReconcileRow>> {
        use entity::lease;
        use sea_orm::ConnectionTrait;
        use sea_orm::sea_query::{Alias, ExprTrait, Query};
        let s = |c: Column| (Entity, c);
        let l = |c: lease::Column| (lease::Entity, c);
        let query = Query::select()
            .columns([
                s(Column::Id),
                s(Column::State),
                s(Column::StateReason),
                s(Column::Provider),
                s(Column::RuntimeId),
                s(Column::UpdatedAt),
                s(Column::PoolKey),
            ])
            .expr_as(
                Expr::col(l(lease::Column::Generation)),
                Alias::new("lease_generation"),
            )
            .expr_as(
                Expr::col(l(lease::Column::WorkerId)),
                Alias::new("lease_worker_id"),
            )
            .expr_as(
                Expr::col(l(lease::Column::ReleasedAt)),
                Alias::new("lease_released_at"),
            )
            .from(Entity)
            .left_join(
                lease::Entity,
                Expr::col(l(lease::Column::SandboxId)).equals(s(Column::Id)),
            )
            .and_where(Expr::col(s(Column::WorkerId)).eq(worker_id))
            .cond_where(condition)
            .to_owned();
        // Decoded by position, in the order selected above: by name, each
        // column of each row would be looked up.
        if self.direct.is_some() {
            let stmt = sea_orm::DbBackend::Sqlite.build(&query);
            if let Some(rows) = self
                .read_direct(stmt, RECONCILE_COLUMNS, many, decode_reconcile_row)
                .await
            {
                return Ok(rows);
            }
        }
        self.conn()
            .query_all(&query)
            .await?
            .iter()
            .map(|row| {
                Ok(ReconcileRow {
                    id: row.try_get_by_index(0)?,
                    state: row.try_get_by_index(1)?,
                    state_reason: row.try_get_by_index(2)?,
                    provider: row.try_get_by_index(3)?,
                    runtime_id: row.try_get_by_index(4)?,
                    updated_at: row.try_get_by_index(5)?,
                    pool_key: row.try_get_by_index(6)?,
                    lease_generation: row.try_get_by_index(7)?,
                    lease_worker_id: row.try_get_by_index(8)?,
                    lease_released_at: row.try_get_by_index(9)?,
                })
            })
            .collect::<Result<_, sea_orm::DbErr>>()
            .map_err(Into::into)
    }

    /// Moves a warm sandbox of pool `pool_key` to `destroying`, unless a
    /// claim took it first (then `None`): the pool never destroys what
    /// became a caller's.
    pub async fn retire_pooled(
        &self,
        id: &str,
        pool_key: &str,
    ) -> StoreResult<Option<sandbox::Model>> {
        let from: Vec<&str> = SandboxState::predecessors(SandboxState::Destroying)
            .iter()
            .map(|s| s.as_str())
            .collect();
        let done = Entity::update_many()
            .col_expr(
                Column::State,
                Expr::value(SandboxState::Destroying.as_str()),
            )
            .col_expr(Column::UpdatedAt, Expr::value(Utc::now()))
            .col_expr(Column::ReplicaId, Expr::value(self.replica()))
            .filter(Column::Id.eq(id))
            .filter(Column::PoolKey.eq(pool_key))
            .filter(Column::State.is_in(from))
            .exec(self.conn())
            .await?;
        if done.rows_affected == 0 {
            return Ok(None);
        }
        self.get_sandbox(id).await
    }

    /// Sandboxes waiting in warm pools (any state but destroyed), oldest first.
    pub async fn pooled_sandboxes(&self) -> StoreResult<Vec<sandbox::Model>> {
        // Sorted here: an ORDER BY could make SQLite walk the creation
        // index over every record instead of the pool index over a few.
        let mut pooled = Entity::find()
            .filter(Column::PoolKey.is_not_null())
            .filter(Column::State.ne(SandboxState::Destroyed.as_str()))
            .all(self.conn())
            .await?;
        pooled.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(pooled)
    }

    /// Opens an admission: a transaction (under the installation-wide
    /// advisory lock on PostgreSQL) and the live counts, all and `owner`'s.
    async fn begin_admission(
        &self,
        owner: (&str, &str),
    ) -> StoreResult<(sea_orm::DatabaseTransaction, LiveCounts)> {
        use sea_orm::{ConnectionTrait, Statement, TransactionTrait};
        let owner = Some(owner);
        let txn = self.conn().begin().await?;
        let counts = if self.is_shared() {
            // Never wait forever on a holder that went silent mid-admission.
            txn.execute_unprepared("SET LOCAL lock_timeout = '15s'")
                .await?;
            txn.execute_raw(Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT pg_advisory_xact_lock($1)",
                [ADMISSION_LOCK.into()],
            ))
            .await?;
            LiveCounts {
                all: count_live_on(&txn, None).await?,
                owner: count_live_on(&txn, owner).await?,
            }
        } else {
            LiveCounts {
                all: count_live_on(self.conn(), None).await?,
                owner: count_live_on(self.conn(), owner).await?,
            }
        };
        Ok((txn, counts))
    }

    /// Inserts a new sandbox record with its lease (generation 1, held by
    /// the sandbox's worker until `lease_until`), in one transaction. An
    /// idempotency key the owner already used is
    /// [`super::StoreError::AlreadyExists`].
    pub async fn insert_sandbox(
        &self,
        model: sandbox::Model,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<sandbox::Model> {
        use sea_orm::TransactionTrait;
        let txn = self.conn().begin().await?;
        let inserted = insert_with_lease(&txn, model, lease_until).await?;
        txn.commit().await?;
        Ok(inserted)
    }

    /// The owner's sandbox spawned with idempotency key `key`, in any state.
    pub async fn sandbox_by_idempotency_key(
        &self,
        tenant_id: &str,
        owner_id: &str,
        key: &str,
    ) -> StoreResult<Option<sandbox::Model>> {
        Ok(Entity::find()
            .filter(Column::TenantId.eq(tenant_id))
            .filter(Column::OwnerId.eq(owner_id))
            .filter(Column::IdempotencyKey.eq(key))
            .one(self.conn())
            .await?)
    }

    /// A sandbox by id, in any state.
    pub async fn get_sandbox(&self, id: &str) -> StoreResult<Option<sandbox::Model>> {
        use sea_orm::{DbBackend, QueryTrait, Statement};
        if self.direct.is_some() {
            // The read on every request for a sandbox: its SQL is built by
            // sea-orm once (building it cost as much as running it), and
            // without a LIMIT (the id is the key): a bound LIMIT makes
            // SQLite, built with STAT4, prepare the statement on every run.
            static BY_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            let sql = BY_ID.get_or_init(|| {
                Entity::find_by_id(String::new())
                    .build(DbBackend::Sqlite)
                    .sql
            });
            let stmt = Statement::from_sql_and_values(DbBackend::Sqlite, sql.as_str(), [id.into()]);
            if let Some(rows) = self
                .read_direct(stmt, SANDBOX_COLUMNS, false, decode_sandbox)
                .await
            {
                return Ok(rows.into_iter().next());
            }
        }
        Ok(Entity::find_by_id(id.to_string()).one(self.conn()).await?)
    }

    /// The records `select` finds: read directly from a SQLite file where
    /// there is a direct reader (on this thread when at most
    /// [`INLINE_ROWS`] can come back, else on a blocking one), otherwise
    /// (or when that read fails) through sea-orm.
    async fn find_sandboxes(
        &self,
        select: sea_orm::Select<Entity>,
        max_rows: u64,
    ) -> StoreResult<Vec<sandbox::Model>> {
        use sea_orm::{DbBackend, QueryTrait};
        if self.direct.is_some() {
            let stmt = select.build(DbBackend::Sqlite);
            let blocking = max_rows > INLINE_ROWS;
            if let Some(rows) = self
                .read_direct(stmt, SANDBOX_COLUMNS, blocking, decode_sandbox)
                .await
            {
                return Ok(rows);
            }
        }
        Ok(select.all(self.conn()).await?)
    }

    /// How many sandboxes are in each (state, provider), destroyed ones
    /// aside; warm-pool sandboxes included (they hold runtimes).
    pub async fn sandbox_counts(&self) -> StoreResult<Vec<(String, String, u64)>> {
        use sea_orm::QuerySelect;
        let rows: Vec<(String, String, i64)> = Entity::find()
            .select_only()
            .column(Column::State)
            .column(Column::Provider)
            .column_as(Column::Id.count(), "count")
            .filter(Column::State.is_in(names(&SandboxState::LIVE)))
            .group_by(Column::State)
            .group_by(Column::Provider)
            .into_tuple()
            .all(self.conn())
            .await?;
        Ok(rows
            .into_iter()
            .map(|(state, provider, n)| (state, provider, u64::try_from(n).unwrap_or(0)))
            .collect())
    }

    /// Sandboxes matching `filter`, oldest first.
    pub async fn list_sandboxes(&self, filter: &SandboxFilter) -> StoreResult<Vec<sandbox::Model>> {
        let mut query = Entity::find();
        if !filter.with_pooled {
            query = query.filter(Column::PoolKey.is_null());
        }
        query = match &filter.states {
            Some(states) => query.filter(Column::State.is_in(names(states))),
            None => query.filter(Column::State.ne(SandboxState::Destroyed.as_str())),
        };
        if let Some(tenant) = &filter.tenant_id {
            query = query.filter(Column::TenantId.eq(tenant.as_str()));
        }
        if let Some(owner) = &filter.owner_id {
            query = query.filter(Column::OwnerId.eq(owner.as_str()));
        }
        if let Some(worker) = &filter.worker_id {
            query = query.filter(Column::WorkerId.eq(worker.as_str()));
        }
        let query = query
            .order_by_asc(Column::CreatedAt)
            .order_by_asc(Column::Id);
        self.find_sandboxes(query, u64::MAX).await
    }

    /// One page of sandboxes matching `q`, ordered by (created_at, id).
    pub async fn page_sandboxes(&self, q: &SandboxQuery) -> StoreResult<Vec<sandbox::Model>> {
        use sea_orm::QuerySelect;
        let mut query = Entity::find().filter(Column::PoolKey.is_null());
        query = match &q.states {
            Some(states) => query.filter(Column::State.is_in(names(states))),
            None => query.filter(Column::State.ne(SandboxState::Destroyed.as_str())),
        };
        if let Some(tenant) = &q.tenant_id {
            query = query.filter(Column::TenantId.eq(tenant.as_str()));
        }
        if let Some(owner) = &q.owner_id {
            query = query.filter(Column::OwnerId.eq(owner.as_str()));
        }
        if let Some(provider) = &q.provider {
            query = query.filter(Column::Provider.eq(provider.as_str()));
        }
        if let Some(image) = &q.image {
            query = query.filter(Column::Image.eq(image.as_str()));
        }
        if let Some(after) = &q.after {
            query = query.filter(super::after_cursor(Column::CreatedAt, Column::Id, after));
        }
        let query = query
            .order_by_asc(Column::CreatedAt)
            .order_by_asc(Column::Id)
            .limit(q.limit);
        self.find_sandboxes(query, q.limit).await
    }

    /// Sandboxes by id, in one query.
    pub async fn sandboxes_by_ids(&self, ids: &[String]) -> StoreResult<Vec<sandbox::Model>> {
        let query = Entity::find().filter(Column::Id.is_in(ids.iter().map(String::as_str)));
        self.find_sandboxes(query, ids.len() as u64).await
    }

    /// Number of sandboxes that hold capacity, for one owner (tenant, owner
    /// id) or for all.
    pub async fn count_live_sandboxes(&self, owner: Option<(&str, &str)>) -> StoreResult<u64> {
        count_live_on(self.conn(), owner).await
    }

    /// Moves a sandbox to `to` if, and only if, its current state allows it.
    /// The check and the write are one conditional UPDATE, so concurrent
    /// actors cannot both perform the same transition. Returns the updated
    /// record, or `None` when the transition did not apply.
    pub async fn transition_sandbox(
        &self,
        id: &str,
        to: SandboxState,
        reason: Option<String>,
    ) -> StoreResult<Option<sandbox::Model>> {
        self.transition_sandbox_with(id, to, reason, None).await
    }

    /// [`Store::transition_sandbox`] that also records the runtime handle
    /// (used for creating -> running).
    pub async fn transition_sandbox_with(
        &self,
        id: &str,
        to: SandboxState,
        reason: Option<String>,
        runtime_id: Option<String>,
    ) -> StoreResult<Option<sandbox::Model>> {
        self.transition_sandbox_from(id, &SandboxState::predecessors(to), to, reason, runtime_id)
            .await
    }

    /// Like [`Store::transition_sandbox_with`], but only from the states in
    /// `from` (each must be a legal predecessor of `to`): an observer that
    /// saw the sandbox `running` must not overwrite a `destroying` someone
    /// else wrote in between.
    pub async fn transition_sandbox_from(
        &self,
        id: &str,
        from: &[SandboxState],
        to: SandboxState,
        reason: Option<String>,
        runtime_id: Option<String>,
    ) -> StoreResult<Option<sandbox::Model>> {
        let legal: Vec<SandboxState> = from
            .iter()
            .copied()
            .filter(|s| s.next_states().contains(&to))
            .collect();
        if legal.is_empty() {
            return Ok(None);
        }
        let now = Utc::now();
        let mut update = Entity::update_many()
            .col_expr(Column::State, Expr::value(to.as_str()))
            .col_expr(Column::StateReason, Expr::value(reason))
            .col_expr(Column::UpdatedAt, Expr::value(now))
            .col_expr(Column::ReplicaId, Expr::value(self.replica()))
            .filter(Column::Id.eq(id))
            .filter(Column::State.is_in(names(&legal)));
        if let Some(runtime_id) = runtime_id {
            update = update.col_expr(Column::RuntimeId, Expr::value(runtime_id));
        }
        if to != SandboxState::Destroyed {
            let result = update.exec(self.conn()).await?;
            if result.rows_affected == 0 {
                return Ok(None);
            }
            return self.get_sandbox(id).await;
        }
        // Destroyed: the record and its lease let go together.
        use sea_orm::TransactionTrait;
        update = update.col_expr(Column::DestroyedAt, Expr::value(Some(now)));
        let txn = self.conn().begin().await?;
        if update.exec(&txn).await?.rows_affected == 0 {
            return Ok(None);
        }
        entity::lease::Entity::update_many()
            .col_expr(entity::lease::Column::ReleasedAt, Expr::value(Some(now)))
            .filter(entity::lease::Column::SandboxId.eq(id))
            .filter(entity::lease::Column::ReleasedAt.is_null())
            .exec(&txn)
            .await?;
        let model = Entity::find_by_id(id.to_string()).one(&txn).await?;
        txn.commit().await?;
        Ok(model)
    }

    /// Sets a new expiry for a sandbox that is still usable.
    pub async fn set_sandbox_expiry(
        &self,
        id: &str,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<Option<sandbox::Model>> {
        let Some(model) = self.get_sandbox(id).await? else {
            return Ok(None);
        };
        let mut active = model.into_active_model();
        active.expires_at = Set(expires_at);
        active.updated_at = Set(Utc::now());
        Ok(Some(active.update(self.conn()).await?))
    }

    /// Usable sandboxes whose TTL has passed at `now` (warm ones age out
    /// of their pool instead).
    pub async fn expired_sandboxes(&self, now: DateTime<Utc>) -> StoreResult<Vec<sandbox::Model>> {
        Ok(Entity::find()
            .filter(Column::PoolKey.is_null())
            .filter(Column::State.is_in(names(&SandboxState::USABLE)))
            .filter(Column::ExpiresAt.lte(now))
            .order_by_asc(Column::ExpiresAt)
            .all(self.conn())
            .await?)
    }
}

/// The record and its lease (generation 1), inside `txn`.
async fn insert_with_lease(
    txn: &sea_orm::DatabaseTransaction,
    model: sandbox::Model,
    lease_until: DateTime<Utc>,
) -> StoreResult<sandbox::Model> {
    let lease = entity::lease::Model {
        sandbox_id: model.id.clone(),
        worker_id: model.worker_id.clone(),
        generation: 1,
        acquired_at: model.created_at,
        expires_at: lease_until,
        released_at: None,
    };
    let inserted = match model.into_active_model().insert(txn).await {
        Ok(inserted) => inserted,
        Err(e) if is_unique_violation(&e) => return Err(already_used_key()),
        Err(e) => return Err(e.into()),
    };
    lease.into_active_model().insert(txn).await?;
    Ok(inserted)
}

fn is_unique_violation(e: &sea_orm::DbErr) -> bool {
    use sea_orm::SqlErr;
    matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// The one unique index on sandboxes besides the id: an owner's
/// idempotency key.
fn already_used_key() -> super::StoreError {
    super::StoreError::AlreadyExists("a sandbox with this idempotency key".into())
}

#[cfg(test)]
mod tests {
    use sea_orm::{IdenStatic, Iterable, QueryTrait};

    use super::*;

    /// The direct reader decodes by position: the list it checks against
    /// must be what sea-orm selects for the entity.
    #[test]
    fn sandbox_columns_are_the_entitys_in_order() {
        let columns: Vec<&str> = Column::iter().map(|c| c.as_str()).collect();
        assert_eq!(columns, SANDBOX_COLUMNS);
        let sql = Entity::find().build(sea_orm::DbBackend::Sqlite).sql;
        let listed: Vec<String> = SANDBOX_COLUMNS
            .iter()
            .map(|c| format!("\"sandboxes\".\"{c}\""))
            .collect();
        assert!(sql.contains(&listed.join(", ")), "{sql}");
    }
}
