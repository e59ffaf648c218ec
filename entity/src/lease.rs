//! A worker's lease on a sandbox: the one worker allowed to manage its runtime.
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "leases")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub sandbox_id: String,
    /// The holder: the worker that manages the runtime.
    pub worker_id: String,
    /// The fencing token: bumped whenever the lease is taken again, and
    /// carried by every runtime operation.
    pub generation: i64,
    pub acquired_at: DateTimeUtc,
    /// Renewed with each heartbeat of the holder; past it, the sandbox is
    /// lost.
    pub expires_at: DateTimeUtc,
    /// Set when the lease was let go (the sandbox was lost or destroyed).
    pub released_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
