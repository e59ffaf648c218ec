//! A sandbox record. Kept after destruction (state `destroyed`) for audit.
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "sandboxes")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub owner_id: String,
    pub tenant_id: String,
    pub worker_id: String,
    pub provider: String,
    /// The provider's handle; `None` until the spawn succeeded.
    pub runtime_id: Option<String>,
    pub image: String,
    pub template: Option<String>,
    pub memory_mb: i32,
    pub vcpus: i32,
    /// creating, running, unhealthy, expired, destroying, destroyed, error.
    pub state: String,
    /// Why the sandbox is in its state, when that is not obvious (errors).
    pub state_reason: Option<String>,
    /// JSON object of string to string.
    pub metadata: Json,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub expires_at: DateTimeUtc,
    pub destroyed_at: Option<DateTimeUtc>,
    /// The client's idempotency key, unique per owner: a retried spawn
    /// with the same key answers this sandbox instead of making another.
    pub idempotency_key: Option<String>,
    /// The control-plane replica driving its current step (creating,
    /// destroying); another replica finishes what a dead one left.
    pub replica_id: String,
    /// Set while the sandbox waits in a warm pool (owned by `system`,
    /// counted against nobody, listed to nobody); cleared by the spawn
    /// that claims it.
    pub pool_key: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
