//! One command run in a sandbox, with a bounded tail of its output.
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "executions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub sandbox_id: String,
    pub owner_id: String,
    /// The tenant of the sandbox it ran in.
    pub tenant_id: String,
    /// The argv that ran, as a JSON array.
    pub argv: Json,
    /// running, completed, timeout, failed, interrupted.
    pub status: String,
    pub exit_code: Option<i32>,
    pub duration_ms: Option<i64>,
    /// The last bytes of each stream (bounded; see service::exec).
    pub stdout_tail: String,
    pub stderr_tail: String,
    pub error: Option<String>,
    pub created_at: DateTimeUtc,
    pub finished_at: Option<DateTimeUtc>,
    /// The control-plane replica that runs it and holds its live output.
    pub replica_id: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
