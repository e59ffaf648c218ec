//! The last known health of each provider.

use entity::provider::{self, Column, Entity};
use sea_orm::sea_query::OnConflict;
use sea_orm::{EntityTrait, IntoActiveModel, QueryOrder};

use super::{Store, StoreResult};

impl Store {
    /// Records a health check result.
    pub async fn record_provider_health(&self, model: provider::Model) -> StoreResult<()> {
        Entity::insert(model.into_active_model())
            .on_conflict(
                OnConflict::column(Column::Name)
                    .update_columns([
                        Column::Healthy,
                        Column::LatencyMs,
                        Column::Error,
                        Column::LastChecked,
                    ])
                    .to_owned(),
            )
            .exec(self.conn())
            .await?;
        Ok(())
    }

    pub async fn list_provider_health(&self) -> StoreResult<Vec<provider::Model>> {
        Ok(Entity::find()
            .order_by_asc(Column::Name)
            .all(self.conn())
            .await?)
    }
}
