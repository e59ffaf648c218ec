//! Tenants are part of an owner's identity: quota records and templates are
//! keyed by (tenant, owner) and (tenant, name), executions carry their
//! sandbox's tenant, templates may store a disk size, and an owner's quota
//! may override the size bounds (memory, vCPUs, disk).
//!
//! SQLite cannot change a primary key in place, so `owners` and `templates`
//! are rebuilt (new table, copy, drop, rename) the same way on both
//! backends. Existing rows belong to the default tenant, which is where
//! every caller without a tenant already was.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Owners {
    Table,
}

#[derive(DeriveIden)]
enum OwnersNew {
    Table,
    TenantId,
    Id,
    ApiKeyHash,
    MaxSandboxes,
    MaxTtlMs,
    MaxExecTimeoutMs,
    MaxMemoryMb,
    MaxVcpus,
    MaxDiskMb,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Templates {
    Table,
}

#[derive(DeriveIden)]
enum TemplatesNew {
    Table,
    TenantId,
    Name,
    OwnerId,
    Image,
    Provider,
    MemoryMb,
    Vcpus,
    DiskMb,
    TtlMs,
    Metadata,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Executions {
    Table,
    TenantId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// One transaction on every backend: on SQLite it also keeps every
    /// statement on one connection (a pooled connection with a stale
    /// schema refuses the rename), and a failure leaves the old tables.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();

        m.alter_table(
            Table::alter()
                .table(Executions::Table)
                .add_column(string(Executions::TenantId).default("default"))
                .to_owned(),
        )
        .await?;
        db.execute_unprepared(
            "UPDATE executions SET tenant_id = COALESCE((SELECT s.tenant_id FROM sandboxes s \
             WHERE s.id = executions.sandbox_id), 'default')",
        )
        .await?;

        m.create_table(
            Table::create()
                .table(OwnersNew::Table)
                .col(string(OwnersNew::TenantId))
                .col(string(OwnersNew::Id))
                .col(string_null(OwnersNew::ApiKeyHash))
                .col(integer_null(OwnersNew::MaxSandboxes))
                .col(big_integer_null(OwnersNew::MaxTtlMs))
                .col(big_integer_null(OwnersNew::MaxExecTimeoutMs))
                .col(integer_null(OwnersNew::MaxMemoryMb))
                .col(integer_null(OwnersNew::MaxVcpus))
                .col(integer_null(OwnersNew::MaxDiskMb))
                .col(timestamp_with_time_zone(OwnersNew::CreatedAt))
                .col(timestamp_with_time_zone(OwnersNew::UpdatedAt))
                .primary_key(Index::create().col(OwnersNew::TenantId).col(OwnersNew::Id))
                .to_owned(),
        )
        .await?;
        db.execute_unprepared(
            "INSERT INTO owners_new (tenant_id, id, api_key_hash, max_sandboxes, max_ttl_ms, \
             max_exec_timeout_ms, created_at, updated_at) SELECT 'default', id, api_key_hash, \
             max_sandboxes, max_ttl_ms, max_exec_timeout_ms, created_at, updated_at FROM owners",
        )
        .await?;
        m.drop_table(Table::drop().table(Owners::Table).to_owned())
            .await?;
        m.rename_table(
            Table::rename()
                .table(OwnersNew::Table, Owners::Table)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(TemplatesNew::Table)
                .col(string(TemplatesNew::TenantId))
                .col(string(TemplatesNew::Name))
                .col(string(TemplatesNew::OwnerId))
                .col(string(TemplatesNew::Image))
                .col(string(TemplatesNew::Provider))
                .col(integer(TemplatesNew::MemoryMb))
                .col(integer(TemplatesNew::Vcpus))
                .col(integer_null(TemplatesNew::DiskMb))
                .col(big_integer(TemplatesNew::TtlMs))
                .col(json_binary(TemplatesNew::Metadata))
                .col(timestamp_with_time_zone(TemplatesNew::CreatedAt))
                .col(timestamp_with_time_zone(TemplatesNew::UpdatedAt))
                .primary_key(
                    Index::create()
                        .col(TemplatesNew::TenantId)
                        .col(TemplatesNew::Name),
                )
                .to_owned(),
        )
        .await?;
        db.execute_unprepared(
            "INSERT INTO templates_new (tenant_id, name, owner_id, image, provider, memory_mb, \
             vcpus, disk_mb, ttl_ms, metadata, created_at, updated_at) SELECT 'default', name, \
             owner_id, image, provider, memory_mb, vcpus, NULL, ttl_ms, metadata, created_at, \
             updated_at FROM templates",
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
        // Going back would merge tenants' owners and templates; refuse.
        Err(DbErr::Migration(
            "the tenants migration cannot be reverted".into(),
        ))
    }
}
