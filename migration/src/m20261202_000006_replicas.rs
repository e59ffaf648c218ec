//! Several control-plane replicas on one database: who they are, which one
//! runs the background work, the secrets they share, which replica drives
//! each sandbox step and runs each command, and what each worker said in
//! its last heartbeat (any replica may have heard it).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Replicas {
    Table,
    Id,
    Endpoint,
    Hostname,
    StartedAt,
    HeartbeatAt,
    StoppedAt,
}

#[derive(DeriveIden)]
enum Leadership {
    Table,
    Name,
    Holder,
    Term,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum ClusterSecrets {
    Table,
    Name,
    Value,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Sandboxes {
    Table,
    ReplicaId,
}

#[derive(DeriveIden)]
enum Executions {
    Table,
    ReplicaId,
}

#[derive(DeriveIden)]
enum Workers {
    Table,
    Snapshot,
    Instance,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Replicas::Table)
                .if_not_exists()
                .col(string(Replicas::Id).primary_key())
                .col(string(Replicas::Endpoint))
                .col(string(Replicas::Hostname))
                .col(timestamp_with_time_zone(Replicas::StartedAt))
                .col(timestamp_with_time_zone(Replicas::HeartbeatAt))
                .col(timestamp_with_time_zone_null(Replicas::StoppedAt))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(Leadership::Table)
                .if_not_exists()
                .col(string(Leadership::Name).primary_key())
                .col(string(Leadership::Holder))
                .col(big_integer(Leadership::Term))
                .col(timestamp_with_time_zone(Leadership::ExpiresAt))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(ClusterSecrets::Table)
                .if_not_exists()
                .col(string(ClusterSecrets::Name).primary_key())
                .col(string(ClusterSecrets::Value))
                .col(timestamp_with_time_zone(ClusterSecrets::CreatedAt))
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Sandboxes::Table)
                .add_column(string(Sandboxes::ReplicaId).default(""))
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Executions::Table)
                .add_column(string(Executions::ReplicaId).default(""))
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Workers::Table)
                .add_column(string(Workers::Snapshot).default(""))
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Workers::Table)
                .add_column(string(Workers::Instance).default(""))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for (table, column) in [
            (Workers::Table.into_iden(), Workers::Instance.into_iden()),
            (Workers::Table.into_iden(), Workers::Snapshot.into_iden()),
            (
                Executions::Table.into_iden(),
                Executions::ReplicaId.into_iden(),
            ),
            (
                Sandboxes::Table.into_iden(),
                Sandboxes::ReplicaId.into_iden(),
            ),
        ] {
            m.alter_table(Table::alter().table(table).drop_column(column).to_owned())
                .await?;
        }
        for table in [
            ClusterSecrets::Table.into_iden(),
            Leadership::Table.into_iden(),
            Replicas::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}
