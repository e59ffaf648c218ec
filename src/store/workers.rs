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
        use sea_orm::{ColumnTrait, QueryFilter};
        let moved = entity::sandbox::Entity::update_many()
            .col_expr(entity::sandbox::Column::WorkerId, Expr::value(to))
            .filter(entity::sandbox::Column::WorkerId.eq(from))
            .exec(self.conn())
            .await?;
        Ok(moved.rows_affected)
    }
}
