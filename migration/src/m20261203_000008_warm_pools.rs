//! Warm pools: a sandbox spawned ahead for a pool carries the pool's key
//! until a spawn claims it; a template names how many to keep warm.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Sandboxes {
    Table,
    PoolKey,
    State,
}

#[derive(DeriveIden)]
enum Templates {
    Table,
    PoolSize,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Sandboxes::Table)
                .add_column(string_null(Sandboxes::PoolKey))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_sandboxes_pool_key_state")
                .table(Sandboxes::Table)
                .col(Sandboxes::PoolKey)
                .col(Sandboxes::State)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Templates::Table)
                .add_column(integer(Templates::PoolSize).default(0))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name("idx_sandboxes_pool_key_state")
                .table(Sandboxes::Table)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Sandboxes::Table)
                .drop_column(Sandboxes::PoolKey)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Templates::Table)
                .drop_column(Templates::PoolSize)
                .to_owned(),
        )
        .await
    }
}
