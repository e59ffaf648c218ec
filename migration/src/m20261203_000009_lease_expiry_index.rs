//! Leases by holder and expiry: renewing (and expiring) a worker's leases
//! touches only those near their end, without reading all of them.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Leases {
    Table,
    WorkerId,
    ExpiresAt,
}

const NAME: &str = "idx_leases_worker_expires";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .name(NAME)
                .table(Leases::Table)
                .col(Leases::WorkerId)
                .col(Leases::ExpiresAt)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(Index::drop().name(NAME).table(Leases::Table).to_owned())
            .await
    }
}
