//! A worker: a process that runs providers (the local one, or remote ones).
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "workers")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub hostname: String,
    /// `local` for the in-process worker, otherwise the worker's RPC address.
    pub endpoint: String,
    pub status: String,
    /// JSON array of provider names this worker can run.
    pub providers: Json,
    /// Maximum number of sandboxes; 0 means unlimited.
    pub capacity: i32,
    pub last_heartbeat: DateTimeUtc,
    pub created_at: DateTimeUtc,
    /// active, cordoned (no new sandboxes) or draining (cordoned until its
    /// sandboxes are gone); set by admins, kept across heartbeats.
    pub admin_state: String,
    /// JSON object of string to string: what the worker says it is
    /// (`--label`), matched by spawns that ask for labels.
    pub labels: String,
    /// JSON of the last heartbeat's snapshot (providers, health, CPUs,
    /// memory, labels, limits), so every replica knows what it offers.
    pub snapshot: String,
    /// The installation it last said it runs from.
    pub instance: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
