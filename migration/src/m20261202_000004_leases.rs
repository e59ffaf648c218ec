//! Multi-worker mode: leases get a generation (the fencing token) and a
//! release time, every live sandbox gets its lease, workers get an
//! administrative state (cordoned, draining) and labels, and a spawn may
//! carry an idempotency key, unique per owner.
//!
//! SQLite adds one column per statement, so each is its own `ALTER`.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Leases {
    Table,
    Generation,
    ReleasedAt,
}

#[derive(DeriveIden)]
enum Workers {
    Table,
    AdminState,
    Labels,
}

#[derive(DeriveIden)]
enum Sandboxes {
    Table,
    TenantId,
    OwnerId,
    IdempotencyKey,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();
        for column in [
            big_integer(Leases::Generation).default(1).to_owned(),
            timestamp_with_time_zone_null(Leases::ReleasedAt),
        ] {
            m.alter_table(
                Table::alter()
                    .table(Leases::Table)
                    .add_column(column)
                    .to_owned(),
            )
            .await?;
        }
        // Every sandbox that may still have a runtime holds a lease on
        // its worker; the control plane extends every lease when it
        // starts, so the expiry written here is only a placeholder.
        db.execute_unprepared(
            "INSERT INTO leases (sandbox_id, worker_id, generation, acquired_at, expires_at) \
             SELECT id, worker_id, 1, created_at, updated_at FROM sandboxes \
             WHERE state <> 'destroyed' AND id NOT IN (SELECT sandbox_id FROM leases)",
        )
        .await?;
        for column in [
            string(Workers::AdminState).default("active").to_owned(),
            string(Workers::Labels).default("{}").to_owned(),
        ] {
            m.alter_table(
                Table::alter()
                    .table(Workers::Table)
                    .add_column(column)
                    .to_owned(),
            )
            .await?;
        }
        m.alter_table(
            Table::alter()
                .table(Sandboxes::Table)
                .add_column(string_null(Sandboxes::IdempotencyKey))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_sandboxes_idempotency")
                .table(Sandboxes::Table)
                .col(Sandboxes::TenantId)
                .col(Sandboxes::OwnerId)
                .col(Sandboxes::IdempotencyKey)
                .unique()
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name("idx_sandboxes_idempotency")
                .table(Sandboxes::Table)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Sandboxes::Table)
                .drop_column(Sandboxes::IdempotencyKey)
                .to_owned(),
        )
        .await?;
        for column in [Workers::AdminState, Workers::Labels] {
            m.alter_table(
                Table::alter()
                    .table(Workers::Table)
                    .drop_column(column)
                    .to_owned(),
            )
            .await?;
        }
        for column in [Leases::Generation, Leases::ReleasedAt] {
            m.alter_table(
                Table::alter()
                    .table(Leases::Table)
                    .drop_column(column)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}
