//! Control-plane replicas: their registrations, the leadership lease that
//! picks the one running background work, and the secrets they share.

use chrono::{DateTime, Utc};
use entity::{cluster_secret, leadership, replica};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder};

use super::{Store, StoreResult};
use crate::lifecycle::SandboxState;

impl Store {
    /// Registers a replica at start-up (or again after a restart).
    pub async fn register_replica(&self, model: replica::Model) -> StoreResult<()> {
        replica::Entity::insert(model.into_active_model())
            .on_conflict(
                OnConflict::column(replica::Column::Id)
                    .update_columns([
                        replica::Column::Endpoint,
                        replica::Column::Hostname,
                        replica::Column::StartedAt,
                        replica::Column::HeartbeatAt,
                        replica::Column::StoppedAt,
                    ])
                    .to_owned(),
            )
            .exec(self.conn())
            .await?;
        Ok(())
    }

    /// Records that a replica is alive at `now`; false when it has no row.
    pub async fn replica_heartbeat(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let result = replica::Entity::update_many()
            .col_expr(replica::Column::HeartbeatAt, Expr::value(now))
            .col_expr(
                replica::Column::StoppedAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .filter(replica::Column::Id.eq(id))
            .exec(self.conn())
            .await?;
        Ok(result.rows_affected > 0)
    }

    /// Records a clean stop.
    pub async fn replica_stopped(&self, id: &str, now: DateTime<Utc>) -> StoreResult<()> {
        replica::Entity::update_many()
            .col_expr(replica::Column::StoppedAt, Expr::value(Some(now)))
            .filter(replica::Column::Id.eq(id))
            .exec(self.conn())
            .await?;
        Ok(())
    }

    /// Every replica ever registered, by id.
    pub async fn list_replicas(&self) -> StoreResult<Vec<replica::Model>> {
        Ok(replica::Entity::find()
            .order_by_asc(replica::Column::Id)
            .all(self.conn())
            .await?)
    }

    /// Takes or renews the leadership lease `name` for `holder` until
    /// `until`. The holder renews its own; anyone takes one that expired
    /// before `now` (bumping its term). Each is one conditional UPDATE, so
    /// two replicas never both hold it. Returns the term held, if any.
    pub async fn try_lead(
        &self,
        name: &str,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<Option<i64>> {
        leadership::Entity::insert(
            leadership::Model {
                name: name.to_string(),
                holder: holder.to_string(),
                term: 1,
                expires_at: until,
            }
            .into_active_model(),
        )
        .on_conflict_do_nothing_on([leadership::Column::Name])
        .exec(self.conn())
        .await?;
        let renewed = leadership::Entity::update_many()
            .col_expr(leadership::Column::ExpiresAt, Expr::value(until))
            .filter(leadership::Column::Name.eq(name))
            .filter(leadership::Column::Holder.eq(holder))
            .exec(self.conn())
            .await?;
        if renewed.rows_affected == 0 {
            let taken = leadership::Entity::update_many()
                .col_expr(leadership::Column::Holder, Expr::value(holder))
                .col_expr(
                    leadership::Column::Term,
                    Expr::col(leadership::Column::Term).add(1),
                )
                .col_expr(leadership::Column::ExpiresAt, Expr::value(until))
                .filter(leadership::Column::Name.eq(name))
                .filter(leadership::Column::ExpiresAt.lt(now))
                .exec(self.conn())
                .await?;
            if taken.rows_affected == 0 {
                return Ok(None);
            }
        }
        let row = leadership::Entity::find_by_id(name.to_string())
            .one(self.conn())
            .await?;
        Ok(row.filter(|r| r.holder == holder).map(|r| r.term))
    }

    /// The current holder of leadership lease `name`.
    pub async fn leader(&self, name: &str) -> StoreResult<Option<leadership::Model>> {
        Ok(leadership::Entity::find_by_id(name.to_string())
            .one(self.conn())
            .await?)
    }

    /// Lets go of `name` if `holder` has it (a clean shutdown hands over
    /// at once instead of after the lease runs out).
    pub async fn resign(&self, name: &str, holder: &str) -> StoreResult<()> {
        leadership::Entity::update_many()
            .col_expr(
                leadership::Column::ExpiresAt,
                Expr::value(DateTime::<Utc>::UNIX_EPOCH),
            )
            .filter(leadership::Column::Name.eq(name))
            .filter(leadership::Column::Holder.eq(holder))
            .exec(self.conn())
            .await?;
        Ok(())
    }

    /// The shared secret `name`, if one is stored.
    pub async fn stored_cluster_secret(&self, name: &str) -> StoreResult<Option<String>> {
        Ok(cluster_secret::Entity::find_by_id(name.to_string())
            .one(self.conn())
            .await?
            .map(|r| r.value))
    }

    /// The shared secret `name`: `candidate` if no replica stored one yet
    /// (the first writer wins), otherwise the stored one.
    pub async fn cluster_secret(&self, name: &str, candidate: &str) -> StoreResult<String> {
        cluster_secret::Entity::insert(
            cluster_secret::Model {
                name: name.to_string(),
                value: candidate.to_string(),
                created_at: Utc::now(),
            }
            .into_active_model(),
        )
        .on_conflict_do_nothing_on([cluster_secret::Column::Name])
        .exec(self.conn())
        .await?;
        let row = cluster_secret::Entity::find_by_id(name.to_string())
            .one(self.conn())
            .await?;
        row.map(|r| r.value)
            .ok_or_else(|| super::StoreError::Corrupt(format!("cluster secret {name} vanished")))
    }

    /// Sandboxes in `states` whose current step replica `replica_id` drives.
    pub async fn sandboxes_driven_by(
        &self,
        replica_id: &str,
        states: &[SandboxState],
    ) -> StoreResult<Vec<entity::sandbox::Model>> {
        use entity::sandbox::{Column, Entity};
        Ok(Entity::find()
            .filter(Column::ReplicaId.eq(replica_id))
            .filter(Column::State.is_in(states.iter().map(|s| s.as_str())))
            .all(self.conn())
            .await?)
    }
}
