//! Templates: named sandbox recipes.

use entity::template::{self, Column, Entity};
use sea_orm::{ActiveModelTrait, EntityTrait, IntoActiveModel, QueryOrder, SqlErr};

use super::{Store, StoreError, StoreResult};

impl Store {
    /// Inserts a template; a taken name is [`StoreError::AlreadyExists`].
    pub async fn insert_template(&self, model: template::Model) -> StoreResult<template::Model> {
        let name = model.name.clone();
        match model.into_active_model().insert(self.conn()).await {
            Ok(m) => Ok(m),
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                Err(StoreError::AlreadyExists(format!("template {name:?}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces every field of an existing template.
    pub async fn update_template(&self, model: template::Model) -> StoreResult<template::Model> {
        Ok(model
            .into_active_model()
            .reset_all()
            .update(self.conn())
            .await?)
    }

    /// A template by (tenant, owner, name).
    pub async fn get_template(
        &self,
        (tenant_id, owner_id): (&str, &str),
        name: &str,
    ) -> StoreResult<Option<template::Model>> {
        Ok(Entity::find_by_id((
            tenant_id.to_string(),
            owner_id.to_string(),
            name.to_string(),
        ))
        .one(self.conn())
        .await?)
    }

    /// Templates by (tenant, owner, name) keys, in one query; it may also
    /// return other combinations of those tenants, owners and names, which
    /// the caller drops.
    pub async fn templates_by_keys(
        &self,
        keys: &[(String, String, String)],
    ) -> StoreResult<Vec<template::Model>> {
        use sea_orm::{ColumnTrait, QueryFilter};
        let set = |pick: fn(&(String, String, String)) -> &str| {
            let mut v: Vec<&str> = keys.iter().map(pick).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        Ok(Entity::find()
            .filter(Column::TenantId.is_in(set(|k| &k.0)))
            .filter(Column::OwnerId.is_in(set(|k| &k.1)))
            .filter(Column::Name.is_in(set(|k| &k.2)))
            .all(self.conn())
            .await?)
    }

    /// Templates that keep a warm pool (of every tenant), oldest first.
    pub async fn pooled_templates(&self) -> StoreResult<Vec<template::Model>> {
        use sea_orm::{ColumnTrait, QueryFilter};
        Ok(Entity::find()
            .filter(Column::PoolSize.gt(0))
            .order_by_asc(Column::CreatedAt)
            .order_by_asc(Column::Name)
            .all(self.conn())
            .await?)
    }

    /// One tenant's templates, by name.
    pub async fn list_templates(&self, tenant_id: &str) -> StoreResult<Vec<template::Model>> {
        use sea_orm::{ColumnTrait, QueryFilter};
        Ok(Entity::find()
            .filter(Column::TenantId.eq(tenant_id))
            .order_by_asc(Column::Name)
            .order_by_asc(Column::OwnerId)
            .all(self.conn())
            .await?)
    }

    /// Deletes a template; returns whether it existed.
    pub async fn delete_template(
        &self,
        (tenant_id, owner_id): (&str, &str),
        name: &str,
    ) -> StoreResult<bool> {
        let result = Entity::delete_by_id((
            tenant_id.to_string(),
            owner_id.to_string(),
            name.to_string(),
        ))
        .exec(self.conn())
        .await?;
        Ok(result.rows_affected > 0)
    }
}
