//! Worker registrations and heartbeats.

use chrono::{DateTime, Utc};
use entity::worker::{self, Column, Entity};
use sea_orm::sea_query::OnConflict;
use sea_orm::{EntityTrait, IntoActiveModel, QueryOrder};

use super::{Store, StoreResult};

impl Store {
    /// Registers a worker, or refreshes its registration.
    pub async fn upsert_worker(&self, model: worker::Model) -> StoreResult<()> {
        Entity::insert(model.into_active_model())
            .on_conflict(
                OnConflict::column(Column::Id)
                    .update_columns([
                        Column::Hostname,
                        Column::Endpoint,
                        Column::Status,
                        Column::Providers,
                        Column::Capacity,
                        Column::LastHeartbeat,
                        Column::Labels,
                        Column::Snapshot,
                        Column::Instance,
                    ])
                    .to_owned(),
            )
            .exec(self.conn())
            .await?;
        Ok(())
    }

    /// Records that a worker is alive at `now`.
    pub async fn worker_heartbeat(&self, id: &str, now: DateTime<Utc>) -> StoreResult<()> {
        use sea_orm::sea_query::Expr;
        use sea_orm::{ColumnTrait, QueryFilter};
        Entity::update_many()
            .col_expr(Column::LastHeartbeat, Expr::value(now))
            .filter(Column::Id.eq(id))
            .exec(self.conn())
            .await?;
        Ok(())
    }

    /// Workers by id, in one query.
    pub async fn workers_by_ids(&self, ids: &[String]) -> StoreResult<Vec<worker::Model>> {
        use sea_orm::{ColumnTrait, QueryFilter};
        Ok(Entity::find()
            .filter(Column::Id.is_in(ids.iter().map(String::as_str)))
            .all(self.conn())
            .await?)
    }

    pub async fn list_workers(&self) -> StoreResult<Vec<worker::Model>> {
        Ok(Entity::find()
            .order_by_asc(Column::Id)
            .all(self.conn())
            .await?)
    }

    /// Sets a worker's status text; true when it changed.
    pub async fn set_worker_status(&self, id: &str, status: &str) -> StoreResult<bool> {
        use sea_orm::sea_query::Expr;
        use sea_orm::{ColumnTrait, QueryFilter};
        let changed = Entity::update_many()
            .col_expr(Column::Status, Expr::value(status))
            .filter(Column::Id.eq(id))
            .filter(Column::Status.ne(status))
            .exec(self.conn())
            .await?;
        Ok(changed.rows_affected > 0)
    }

    /// Moves every sandbox record of worker `from` to worker `to` (a
    /// worker whose id changed); returns how many moved.
    pub async fn reassign_worker(&self, from: &str, to: &str) -> StoreResult<u64> {
        use sea_orm::sea_query::Expr;
        use sea_orm::{ColumnTrait, QueryFilter, TransactionTrait};
        // The records and the leases their worker holds move together: a
        // lease left under the old id would make every sandbox look lost.
        let txn = self.conn().begin().await?;
        let moved = entity::sandbox::Entity::update_many()
            .col_expr(entity::sandbox::Column::WorkerId, Expr::value(to))
            // A change like any other: the new worker's incremental
            // reconcile passes see the records arrive (the old worker's
            // copy lets them go at its next full read or when it acts).
            .col_expr(
                entity::sandbox::Column::UpdatedAt,
                Expr::value(chrono::Utc::now()),
            )
            .filter(entity::sandbox::Column::WorkerId.eq(from))
            .exec(&txn)
            .await?;
        entity::lease::Entity::update_many()
            .col_expr(entity::lease::Column::WorkerId, Expr::value(to))
            .filter(entity::lease::Column::WorkerId.eq(from))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(moved.rows_affected)
    }
}

impl Store {
    /// Sets what admins allow on a worker; false when no such worker.
    pub async fn set_worker_admin_state(&self, id: &str, state: &str) -> StoreResult<bool> {
        use sea_orm::sea_query::Expr;
        use sea_orm::{ColumnTrait, QueryFilter};
        let updated = Entity::update_many()
            .col_expr(Column::AdminState, Expr::value(state))
            .filter(Column::Id.eq(id))
            .exec(self.conn())
            .await?;
        Ok(updated.rows_affected > 0)
    }

    /// A worker by id.
    pub async fn get_worker(&self, id: &str) -> StoreResult<Option<worker::Model>> {
        Ok(Entity::find_by_id(id.to_string()).one(self.conn()).await?)
    }

    /// The number of live sandboxes on each worker that has any.
    pub async fn live_sandboxes_per_worker(
        &self,
    ) -> StoreResult<std::collections::BTreeMap<String, u64>> {
        use entity::sandbox::Column as S;
        use sea_orm::{ColumnTrait, QueryFilter, QuerySelect};
        let live: Vec<&str> = crate::lifecycle::SandboxState::LIVE
            .iter()
            .map(|s| s.as_str())
            .collect();
        let rows: Vec<(String, i64)> = entity::sandbox::Entity::find()
            .select_only()
            .column(S::WorkerId)
            .column_as(S::Id.count(), "count")
            .filter(S::State.is_in(live))
            .group_by(S::WorkerId)
            .into_tuple()
            .all(self.conn())
            .await?;
        Ok(rows
            .into_iter()
            .map(|(w, n)| (w, u64::try_from(n).unwrap_or(0)))
            .collect())
    }
}
