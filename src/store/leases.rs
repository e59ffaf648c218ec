//! Leases: one per sandbox, naming the worker allowed to manage its
//! runtime (the holder), a generation that fences off anyone who held it
//! before, and an expiry the holder's heartbeats push forward.
//!
//! A lease is taken with the sandbox record (one transaction), renewed by
//! every heartbeat of its holder, released when the sandbox is lost or
//! destroyed, and reclaimed (generation + 1) when the control plane must
//! act on a runtime whose lease was released: after that, the worker
//! refuses whatever still carries the old generation. Every change is one
//! conditional `UPDATE`, a row lock on PostgreSQL; the sweep for expired
//! leases locks what it takes with `FOR UPDATE SKIP LOCKED`, so control
//! planes sweeping at once never take the same lease twice.

use chrono::{DateTime, Utc};
use entity::lease::{self, Column, Entity};
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType};
use sea_orm::{
    ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait, TransactionTrait,
};

use super::{Store, StoreResult};

impl Store {
    /// The lease of a sandbox.
    pub async fn lease(&self, sandbox_id: &str) -> StoreResult<Option<lease::Model>> {
        Ok(Entity::find_by_id(sandbox_id.to_string())
            .one(self.conn())
            .await?)
    }

    /// Pushes the expiry of every lease `worker_id` holds to `until`;
    /// how many were renewed. Released leases stay released.
    pub async fn renew_leases(&self, worker_id: &str, until: DateTime<Utc>) -> StoreResult<u64> {
        let renewed = Entity::update_many()
            .col_expr(Column::ExpiresAt, Expr::value(until))
            .filter(Column::WorkerId.eq(worker_id))
            .filter(Column::ReleasedAt.is_null())
            .filter(Column::ExpiresAt.lt(until))
            .exec(self.conn())
            .await?;
        Ok(renewed.rows_affected)
    }

    /// Pushes `worker_id`'s unreleased leases that expire before
    /// `stale_before` to `until` (those renewed lately stay as they are).
    pub async fn renew_leases_before(
        &self,
        worker_id: &str,
        until: DateTime<Utc>,
        stale_before: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let renewed = Entity::update_many()
            .col_expr(Column::ExpiresAt, Expr::value(until))
            .filter(Column::WorkerId.eq(worker_id))
            .filter(Column::ReleasedAt.is_null())
            .filter(Column::ExpiresAt.lt(stale_before))
            .exec(self.conn())
            .await?;
        Ok(renewed.rows_affected)
    }

    /// Pushes every unreleased lease to at least `until`: a control plane
    /// that was down heard no heartbeats, which says nothing about the
    /// workers, so each gets a full period to be heard from again.
    pub async fn extend_all_leases(&self, until: DateTime<Utc>) -> StoreResult<u64> {
        let extended = Entity::update_many()
            .col_expr(Column::ExpiresAt, Expr::value(until))
            .filter(Column::ReleasedAt.is_null())
            .filter(Column::ExpiresAt.lt(until))
            .exec(self.conn())
            .await?;
        Ok(extended.rows_affected)
    }

    /// The sandboxes whose lease held by `worker_id` was taken or let go at
    /// or after `since` (by the indexes on holder and acquisition, holder
    /// and release): the lease changes an incremental reconcile pass reads
    /// beside the records that changed.
    pub async fn leases_changed(
        &self,
        worker_id: &str,
        since: DateTime<Utc>,
    ) -> StoreResult<Vec<String>> {
        use sea_orm::sea_query::Condition;
        Ok(Entity::find()
            .select_only()
            .column(Column::SandboxId)
            .filter(Column::WorkerId.eq(worker_id))
            .filter(
                Condition::any()
                    .add(Column::AcquiredAt.gte(since))
                    .add(Column::ReleasedAt.gte(since)),
            )
            .into_tuple()
            .all(self.conn())
            .await?)
    }

    /// Releases the leases of `worker_id` that expired before `now` and
    /// returns them (at most `limit`, oldest expiry first). One statement,
    /// `UPDATE ... WHERE sandbox_id IN (SELECT ... FOR UPDATE SKIP LOCKED)
    /// RETURNING`: on PostgreSQL rows another sweep holds are skipped, not
    /// waited for; SQLite (one writer, no row locks) runs it as one write,
    /// so no read-then-write transaction can fail on a stale snapshot.
    pub async fn release_expired_leases(
        &self,
        worker_id: &str,
        now: DateTime<Utc>,
        limit: u64,
    ) -> StoreResult<Vec<lease::Model>> {
        let expired = Entity::find()
            .select_only()
            .column(Column::SandboxId)
            .filter(Column::WorkerId.eq(worker_id))
            .filter(Column::ReleasedAt.is_null())
            .filter(Column::ExpiresAt.lt(now))
            .order_by_asc(Column::ExpiresAt)
            .limit(limit)
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
            .into_query();
        Ok(Entity::update_many()
            .col_expr(Column::ReleasedAt, Expr::value(now))
            .filter(Column::SandboxId.in_subquery(expired))
            .filter(Column::ReleasedAt.is_null())
            .exec_with_returning(self.conn())
            .await?)
    }

    /// Releases every lease `worker_id` holds (another process took its id
    /// from another address: whatever ran on the old one is out of reach).
    pub async fn release_leases_of(&self, worker_id: &str, now: DateTime<Utc>) -> StoreResult<u64> {
        let released = Entity::update_many()
            .col_expr(Column::ReleasedAt, Expr::value(now))
            .filter(Column::WorkerId.eq(worker_id))
            .filter(Column::ReleasedAt.is_null())
            .exec(self.conn())
            .await?;
        Ok(released.rows_affected)
    }

    /// Releases a sandbox's lease (its sandbox is gone). True when it was
    /// held.
    pub async fn release_lease(&self, sandbox_id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let released = Entity::update_many()
            .col_expr(Column::ReleasedAt, Expr::value(now))
            .filter(Column::SandboxId.eq(sandbox_id))
            .filter(Column::ReleasedAt.is_null())
            .exec(self.conn())
            .await?;
        Ok(released.rows_affected > 0)
    }

    /// Takes the lease of a sandbox again for `worker_id` with the next
    /// generation (held until `until`), whatever its state; returns the
    /// lease as it is now. The increment is one `UPDATE`, so concurrent
    /// reclaims each get their own generation.
    pub async fn reclaim_lease(
        &self,
        sandbox_id: &str,
        worker_id: &str,
        until: DateTime<Utc>,
    ) -> StoreResult<lease::Model> {
        let now = Utc::now();
        let txn = self.conn().begin().await?;
        let updated = Entity::update_many()
            .col_expr(Column::Generation, Expr::col(Column::Generation).add(1))
            .col_expr(Column::WorkerId, Expr::value(worker_id))
            .col_expr(Column::AcquiredAt, Expr::value(now))
            .col_expr(Column::ExpiresAt, Expr::value(until))
            .col_expr(
                Column::ReleasedAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .filter(Column::SandboxId.eq(sandbox_id))
            .exec(&txn)
            .await?;
        if updated.rows_affected == 0 {
            // A sandbox from before leases existed: its first lease.
            use sea_orm::{ActiveModelTrait, IntoActiveModel};
            lease::Model {
                sandbox_id: sandbox_id.to_string(),
                worker_id: worker_id.to_string(),
                generation: 1,
                acquired_at: now,
                expires_at: until,
                released_at: None,
            }
            .into_active_model()
            .insert(&txn)
            .await?;
        }
        let lease = Entity::find_by_id(sandbox_id.to_string())
            .one(&txn)
            .await?
            .ok_or_else(|| super::StoreError::Corrupt(format!("lease of {sandbox_id} vanished")))?;
        txn.commit().await?;
        Ok(lease)
    }
}
