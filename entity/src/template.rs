//! A named sandbox recipe: image, limits, TTL and metadata.
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "templates")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub owner_id: String,
    /// Unique per owner (of a tenant).
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    pub image: String,
    /// Empty means "the default provider".
    pub provider: String,
    pub memory_mb: i32,
    pub vcpus: i32,
    /// `None` means "the server's `defaults.disk_mb`".
    pub disk_mb: Option<i32>,
    pub ttl_ms: i64,
    /// JSON object of string to string.
    pub metadata: Json,
    /// JSON object of string to string: labels a worker must carry to get
    /// this template's sandboxes.
    pub worker_labels: String,
    /// How many sandboxes of this template to keep warm (0: none).
    pub pool_size: i32,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
