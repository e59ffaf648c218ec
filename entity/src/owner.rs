//! An owner: the identity sandboxes belong to, with its quota overrides.
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "owners")]
pub struct Model {
    /// An owner is identified by its tenant and its id together.
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// Hash of the owner's API key; never the key itself.
    pub api_key_hash: Option<String>,
    /// Per-owner override of the global limit; `None` means "use the default".
    pub max_sandboxes: Option<i32>,
    pub max_ttl_ms: Option<i64>,
    pub max_exec_timeout_ms: Option<i64>,
    /// Overrides of the size bounds (`defaults.max_memory_mb` etc.); still
    /// capped by the host.
    pub max_memory_mb: Option<i32>,
    pub max_vcpus: Option<i32>,
    pub max_disk_mb: Option<i32>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
