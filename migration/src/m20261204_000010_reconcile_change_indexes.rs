//! What changed on a worker since a moment: its records by `updated_at`
//! and its leases by `acquired_at` (`released_at` is already indexed by
//! `idx_leases_worker_expires`), so an incremental reconcile pass reads the
//! few that changed instead of walking all of them.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Sandboxes {
    Table,
    WorkerId,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Leases {
    Table,
    WorkerId,
    AcquiredAt,
}

const SANDBOXES: &str = "idx_sandboxes_worker_updated";
const LEASES: &str = "idx_leases_worker_acquired";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .name(SANDBOXES)
                .table(Sandboxes::Table)
                .col(Sandboxes::WorkerId)
                .col(Sandboxes::UpdatedAt)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name(LEASES)
                .table(Leases::Table)
                .col(Leases::WorkerId)
                .col(Leases::AcquiredAt)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(Index::drop().name(LEASES).table(Leases::Table).to_owned())
            .await?;
        m.drop_index(
            Index::drop()
                .name(SANDBOXES)
                .table(Sandboxes::Table)
                .to_owned(),
        )
        .await
    }
}
