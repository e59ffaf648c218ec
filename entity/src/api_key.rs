//! An API key: only its keyed hash is stored; the key itself is shown once.
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The first characters of the key, for listing and revoking by prefix.
    pub prefix: String,
    /// HMAC-SHA-256 of the key under the server's key pepper, hex.
    pub hash: String,
    pub owner_id: String,
    pub tenant_id: String,
    /// admin, operator, viewer or owner.
    pub role: String,
    /// Whether `X-User-ID` may select the owner (the SDK's pool-mode user).
    pub allow_user_header: bool,
    pub created_at: DateTimeUtc,
    pub expires_at: Option<DateTimeUtc>,
    pub revoked_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
