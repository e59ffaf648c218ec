//! The whole persistence model of the architecture reference: owners,
//! workers, providers, templates, sandboxes, executions, audit events, leases.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Owners {
    Table,
    Id,
    ApiKeyHash,
    MaxSandboxes,
    MaxTtlMs,
    MaxExecTimeoutMs,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Workers {
    Table,
    Id,
    Hostname,
    Endpoint,
    Status,
    Providers,
    Capacity,
    LastHeartbeat,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Providers {
    Table,
    Name,
    Healthy,
    LatencyMs,
    Error,
    LastChecked,
}

#[derive(DeriveIden)]
enum Templates {
    Table,
    Name,
    OwnerId,
    Image,
    Provider,
    MemoryMb,
    Vcpus,
    TtlMs,
    Metadata,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Sandboxes {
    Table,
    Id,
    OwnerId,
    TenantId,
    WorkerId,
    Provider,
    RuntimeId,
    Image,
    Template,
    MemoryMb,
    Vcpus,
    State,
    StateReason,
    Metadata,
    CreatedAt,
    UpdatedAt,
    ExpiresAt,
    DestroyedAt,
}

#[derive(DeriveIden)]
enum Executions {
    Table,
    Id,
    SandboxId,
    OwnerId,
    Argv,
    Status,
    ExitCode,
    DurationMs,
    StdoutTail,
    StderrTail,
    Error,
    CreatedAt,
    FinishedAt,
}

#[derive(DeriveIden)]
enum AuditEvents {
    Table,
    Id,
    Actor,
    TenantId,
    Action,
    Target,
    Outcome,
    RequestId,
    Detail,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Leases {
    Table,
    SandboxId,
    WorkerId,
    AcquiredAt,
    ExpiresAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Owners::Table)
                .col(string(Owners::Id).primary_key())
                .col(string_null(Owners::ApiKeyHash))
                .col(integer_null(Owners::MaxSandboxes))
                .col(big_integer_null(Owners::MaxTtlMs))
                .col(big_integer_null(Owners::MaxExecTimeoutMs))
                .col(timestamp_with_time_zone(Owners::CreatedAt))
                .col(timestamp_with_time_zone(Owners::UpdatedAt))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Workers::Table)
                .col(string(Workers::Id).primary_key())
                .col(string(Workers::Hostname))
                .col(string(Workers::Endpoint))
                .col(string(Workers::Status))
                .col(json_binary(Workers::Providers))
                .col(integer(Workers::Capacity))
                .col(timestamp_with_time_zone(Workers::LastHeartbeat))
                .col(timestamp_with_time_zone(Workers::CreatedAt))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Providers::Table)
                .col(string(Providers::Name).primary_key())
                .col(boolean(Providers::Healthy))
                .col(big_integer(Providers::LatencyMs))
                .col(text_null(Providers::Error))
                .col(timestamp_with_time_zone(Providers::LastChecked))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Templates::Table)
                .col(string(Templates::Name).primary_key())
                .col(string(Templates::OwnerId))
                .col(string(Templates::Image))
                .col(string(Templates::Provider))
                .col(integer(Templates::MemoryMb))
                .col(integer(Templates::Vcpus))
                .col(big_integer(Templates::TtlMs))
                .col(json_binary(Templates::Metadata))
                .col(timestamp_with_time_zone(Templates::CreatedAt))
                .col(timestamp_with_time_zone(Templates::UpdatedAt))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Sandboxes::Table)
                .col(string(Sandboxes::Id).primary_key())
                .col(string(Sandboxes::OwnerId))
                .col(string(Sandboxes::TenantId))
                .col(string(Sandboxes::WorkerId))
                .col(string(Sandboxes::Provider))
                .col(string_null(Sandboxes::RuntimeId))
                .col(string(Sandboxes::Image))
                .col(string_null(Sandboxes::Template))
                .col(integer(Sandboxes::MemoryMb))
                .col(integer(Sandboxes::Vcpus))
                .col(string(Sandboxes::State))
                .col(text_null(Sandboxes::StateReason))
                .col(json_binary(Sandboxes::Metadata))
                .col(timestamp_with_time_zone(Sandboxes::CreatedAt))
                .col(timestamp_with_time_zone(Sandboxes::UpdatedAt))
                .col(timestamp_with_time_zone(Sandboxes::ExpiresAt))
                .col(timestamp_with_time_zone_null(Sandboxes::DestroyedAt))
                .to_owned(),
        )
        .await?;
        // Listing live sandboxes, counting an owner's sandboxes for quotas,
        // and the reaper's "expired and not yet destroyed" scan.
        for (name, cols) in [
            ("idx_sandboxes_state", vec![Sandboxes::State]),
            (
                "idx_sandboxes_owner_state",
                vec![Sandboxes::OwnerId, Sandboxes::State],
            ),
            (
                "idx_sandboxes_state_expires",
                vec![Sandboxes::State, Sandboxes::ExpiresAt],
            ),
            ("idx_sandboxes_worker", vec![Sandboxes::WorkerId]),
        ] {
            let mut index = Index::create();
            index.name(name).table(Sandboxes::Table);
            for col in cols {
                index.col(col);
            }
            m.create_index(index.to_owned()).await?;
        }

        m.create_table(
            Table::create()
                .table(Executions::Table)
                .col(string(Executions::Id).primary_key())
                .col(string(Executions::SandboxId))
                .col(string(Executions::OwnerId))
                .col(json_binary(Executions::Argv))
                .col(string(Executions::Status))
                .col(integer_null(Executions::ExitCode))
                .col(big_integer_null(Executions::DurationMs))
                .col(text(Executions::StdoutTail))
                .col(text(Executions::StderrTail))
                .col(text_null(Executions::Error))
                .col(timestamp_with_time_zone(Executions::CreatedAt))
                .col(timestamp_with_time_zone_null(Executions::FinishedAt))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_executions_sandbox_created")
                .table(Executions::Table)
                .col(Executions::SandboxId)
                .col(Executions::CreatedAt)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_executions_status")
                .table(Executions::Table)
                .col(Executions::Status)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(AuditEvents::Table)
                .col(string(AuditEvents::Id).primary_key())
                .col(string(AuditEvents::Actor))
                .col(string(AuditEvents::TenantId))
                .col(string(AuditEvents::Action))
                .col(string(AuditEvents::Target))
                .col(string(AuditEvents::Outcome))
                .col(string(AuditEvents::RequestId))
                .col(text_null(AuditEvents::Detail))
                .col(timestamp_with_time_zone(AuditEvents::CreatedAt))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_audit_created")
                .table(AuditEvents::Table)
                .col(AuditEvents::CreatedAt)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_audit_actor_created")
                .table(AuditEvents::Table)
                .col(AuditEvents::Actor)
                .col(AuditEvents::CreatedAt)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Leases::Table)
                .col(string(Leases::SandboxId).primary_key())
                .col(string(Leases::WorkerId))
                .col(timestamp_with_time_zone(Leases::AcquiredAt))
                .col(timestamp_with_time_zone(Leases::ExpiresAt))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_leases_worker")
                .table(Leases::Table)
                .col(Leases::WorkerId)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Leases::Table.into_iden(),
            AuditEvents::Table.into_iden(),
            Executions::Table.into_iden(),
            Sandboxes::Table.into_iden(),
            Templates::Table.into_iden(),
            Providers::Table.into_iden(),
            Workers::Table.into_iden(),
            Owners::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}
