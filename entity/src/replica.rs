//! A control-plane replica (`stacyvm serve`) sharing the database.
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "replicas")]
pub struct Model {
    /// `rp-<instance id>`: stable across restarts of one installation.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// Where other replicas reach it (`cluster.advertise_url`), or empty.
    pub endpoint: String,
    pub hostname: String,
    pub started_at: DateTimeUtc,
    /// Written every heartbeat interval while it runs.
    pub heartbeat_at: DateTimeUtc,
    /// Set by a clean shutdown.
    pub stopped_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
