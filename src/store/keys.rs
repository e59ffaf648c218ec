//! API keys (hashes only) and owners' quota listings.

use chrono::{DateTime, Utc};
use entity::api_key::{self, Column, Entity};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, EntityTrait, IntoActiveModel, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect,
};

use super::{Store, StoreResult};

impl Store {
    pub async fn insert_api_key(&self, model: api_key::Model) -> StoreResult<()> {
        model.into_active_model().insert(self.conn()).await?;
        Ok(())
    }

    /// The key with this hash, if it exists (revoked or not).
    pub async fn api_key_by_hash(&self, hash: &str) -> StoreResult<Option<api_key::Model>> {
        Ok(Entity::find()
            .filter(Column::Hash.eq(hash))
            .one(self.conn())
            .await?)
    }

    /// Replaces a key's hash (rotation of the pepper).
    pub async fn set_api_key_hash(&self, id: &str, hash: &str) -> StoreResult<()> {
        Entity::update_many()
            .col_expr(Column::Hash, Expr::value(hash))
            .filter(Column::Id.eq(id))
            .exec(self.conn())
            .await?;
        Ok(())
    }

    /// All keys, newest first.
    pub async fn list_api_keys(&self) -> StoreResult<Vec<api_key::Model>> {
        Ok(Entity::find()
            .order_by_desc(Column::CreatedAt)
            .all(self.conn())
            .await?)
    }

    /// Whether any key was ever stored (revoked and expired ones count).
    pub async fn any_api_key_ever(&self) -> StoreResult<bool> {
        Ok(Entity::find()
            .select_only()
            .column(Column::Id)
            .limit(1)
            .into_tuple::<String>()
            .one(self.conn())
            .await?
            .is_some())
    }

    /// Keys that can still be used at `now`.
    pub async fn count_usable_api_keys(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        Ok(Entity::find()
            .filter(Column::RevokedAt.is_null())
            .filter(
                Condition::any()
                    .add(Column::ExpiresAt.is_null())
                    .add(Column::ExpiresAt.gt(now)),
            )
            .count(self.conn())
            .await?)
    }

    /// Revokes every unrevoked key whose id or prefix is `id_or_prefix`;
    /// returns how many.
    pub async fn revoke_api_keys(&self, id_or_prefix: &str) -> StoreResult<u64> {
        let result = Entity::update_many()
            .col_expr(Column::RevokedAt, Expr::value(Some(Utc::now())))
            .filter(Column::RevokedAt.is_null())
            .filter(
                Condition::any()
                    .add(Column::Id.eq(id_or_prefix))
                    .add(Column::Prefix.eq(id_or_prefix)),
            )
            .exec(self.conn())
            .await?;
        Ok(result.rows_affected)
    }
}
