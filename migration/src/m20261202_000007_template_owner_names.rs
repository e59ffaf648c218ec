//! Template names are per owner: the key becomes (tenant, owner, name), so
//! one owner's names neither collide with nor reveal another's.
//!
//! SQLite cannot change a primary key in place, so `templates` is rebuilt
//! (new table, copy, drop, rename) the same way on both backends, in one
//! transaction. Existing rows keep their owner, so nothing changes for
//! them.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Templates {
    Table,
}

#[derive(DeriveIden)]
enum TemplatesNew {
    Table,
    TenantId,
    OwnerId,
    Name,
    Image,
    Provider,
    MemoryMb,
    Vcpus,
    DiskMb,
    TtlMs,
    Metadata,
    WorkerLabels,
    CreatedAt,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(TemplatesNew::Table)
                .col(string(TemplatesNew::TenantId))
                .col(string(TemplatesNew::OwnerId))
                .col(string(TemplatesNew::Name))
                .col(string(TemplatesNew::Image))
                .col(string(TemplatesNew::Provider))
                .col(integer(TemplatesNew::MemoryMb))
                .col(integer(TemplatesNew::Vcpus))
                .col(integer_null(TemplatesNew::DiskMb))
                .col(big_integer(TemplatesNew::TtlMs))
                .col(json_binary(TemplatesNew::Metadata))
                .col(string(TemplatesNew::WorkerLabels).default("{}"))
                .col(timestamp_with_time_zone(TemplatesNew::CreatedAt))
                .col(timestamp_with_time_zone(TemplatesNew::UpdatedAt))
                .primary_key(
                    Index::create()
                        .col(TemplatesNew::TenantId)
                        .col(TemplatesNew::OwnerId)
                        .col(TemplatesNew::Name),
                )
                .to_owned(),
        )
        .await?;
        m.get_connection()
            .execute_unprepared(
                "INSERT INTO templates_new (tenant_id, owner_id, name, image, provider, \
                 memory_mb, vcpus, disk_mb, ttl_ms, metadata, worker_labels, created_at, \
                 updated_at) SELECT tenant_id, owner_id, name, image, provider, memory_mb, vcpus, \
                 disk_mb, ttl_ms, metadata, worker_labels, created_at, updated_at FROM templates",
            )
            .await?;
        m.drop_table(Table::drop().table(Templates::Table).to_owned())
            .await?;
        m.rename_table(
            Table::rename()
                .table(TemplatesNew::Table, Templates::Table)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, _m: &SchemaManager) -> Result<(), DbErr> {
        // Going back could merge two owners' templates of one name; refuse.
        Err(DbErr::Migration(
            "the per-owner template names migration cannot be reverted".into(),
        ))
    }
}
