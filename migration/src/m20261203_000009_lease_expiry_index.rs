//! Leases by holder, release and expiry: renewing (and expiring) a
//! worker's unreleased leases touches only those near their end, without
//! reading all of them or the released ones of its history.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Leases {
    Table,
    WorkerId,
    ReleasedAt,
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
                .col(Leases::ReleasedAt)
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
