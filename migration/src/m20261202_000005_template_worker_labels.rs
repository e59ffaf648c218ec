//! Templates may ask for worker labels (placement only picks workers that
//! carry them), kept as a JSON object in text.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Templates {
    Table,
    WorkerLabels,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Templates::Table)
                .add_column(string(Templates::WorkerLabels).default("{}"))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Templates::Table)
                .drop_column(Templates::WorkerLabels)
                .to_owned(),
        )
        .await
    }
}
