//! Who is calling, and what they may do.
//!
//! Every service call takes a [`Caller`]. It is built once per request from
//! the credentials (an API key, an admin key, or a JWT bearer token; see
//! `service::identity`) and then decides, in the service, which owners'
//! resources the call may see and whether it may change anything.

pub mod jwt;
pub mod keys;

use std::fmt;
use std::str::FromStr;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything, for every owner: keys, quotas, the whole audit trail.
    Admin,
    /// Operates every owner's sandboxes; cannot manage keys or quotas.
    Operator,
    /// Reads its own owner's resources; changes nothing.
    Viewer,
    /// Creates and manages its own sandboxes and templates.
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Owner => "owner",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of [`Role`].
#[derive(Debug, thiserror::Error)]
#[error("unknown role {0:?}: use admin, operator, viewer or owner")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "viewer" => Ok(Role::Viewer),
            "owner" => Ok(Role::Owner),
            other => Err(UnknownRole(other.to_string())),
        }
    }
}

/// The identity a request acts as.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The owner this caller acts for by default.
    pub owner_id: String,
    pub tenant_id: String,
    pub role: Role,
    /// True for the open mode of a loopback server without credentials.
    pub open: bool,
    /// The credential used (API key id, "jwt:<sub>", "static"), for rate
    /// limits and audit; `None` when open.
    pub credential: Option<String>,
    /// Correlates audit events and logs with the HTTP request.
    pub request_id: String,
    /// When `owner_id` was named by `X-User-ID` (pool mode): the owner of
    /// the key that named it.
    pub delegated_by: Option<String>,
}

/// The owner recorded when an anonymous caller names none.
pub const ANONYMOUS_OWNER: &str = "anonymous";
/// The tenant of callers that name none.
pub const DEFAULT_TENANT: &str = "default";

impl Caller {
    /// An unauthenticated caller on a server that runs open (loopback only).
    pub fn anonymous(request_id: impl Into<String>) -> Caller {
        Caller {
            owner_id: ANONYMOUS_OWNER.into(),
            tenant_id: DEFAULT_TENANT.into(),
            role: Role::Admin,
            open: true,
            credential: None,
            request_id: request_id.into(),
            delegated_by: None,
        }
    }

    /// The server itself (reaper, start-up), for audit events.
    pub fn system() -> Caller {
        Caller {
            owner_id: "system".into(),
            tenant_id: DEFAULT_TENANT.into(),
            role: Role::Admin,
            open: false,
            credential: Some("system".into()),
            request_id: String::new(),
            delegated_by: None,
        }
    }

    /// May this caller see and act on other owners' resources (of its
    /// own tenant; admins also of every other tenant)?
    pub fn may_act_for_others(&self) -> bool {
        matches!(self.role, Role::Admin | Role::Operator)
    }

    /// May this caller see other tenants' resources? Only admins.
    pub fn sees_all_tenants(&self) -> bool {
        self.role == Role::Admin
    }

    /// The tenant a listing is limited to; `None` for admins (all tenants).
    pub fn tenant_scope(&self) -> Option<String> {
        (!self.sees_all_tenants()).then(|| self.tenant_id.clone())
    }

    /// May this caller change anything?
    pub fn can_write(&self) -> bool {
        self.role != Role::Viewer
    }

    /// May this caller manage keys, quotas and read every owner's audit trail?
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// The owner a new resource belongs to: the requested one when the
    /// caller may act for others, otherwise the caller itself.
    pub fn effective_owner(&self, requested: Option<&str>) -> String {
        match requested {
            Some(owner) if self.may_act_for_others() && !owner.is_empty() => owner.to_string(),
            _ => self.owner_id.clone(),
        }
    }

    /// May this caller see and touch a resource of owner `owner_id` in
    /// tenant `tenant_id`? An owner is identified by both: `alice` of one
    /// tenant is a stranger to `alice` of another. Admins reach every
    /// tenant, operators every owner of their own tenant, everyone else
    /// only itself.
    pub fn can_access(&self, tenant_id: &str, owner_id: &str) -> bool {
        match self.role {
            Role::Admin => true,
            Role::Operator => self.tenant_id == tenant_id,
            Role::Viewer | Role::Owner => self.tenant_id == tenant_id && self.owner_id == owner_id,
        }
    }

    /// Is this caller the owner (tenant and id) itself?
    pub fn is_owner(&self, tenant_id: &str, owner_id: &str) -> bool {
        self.tenant_id == tenant_id && self.owner_id == owner_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(owner: &str, tenant: &str, role: Role) -> Caller {
        Caller {
            owner_id: owner.into(),
            tenant_id: tenant.into(),
            role,
            open: false,
            credential: None,
            request_id: String::new(),
            delegated_by: None,
        }
    }

    #[test]
    fn identity_is_tenant_and_owner() {
        let alice = caller("alice", "acme", Role::Owner);
        assert!(alice.can_access("acme", "alice"));
        assert!(!alice.can_access(DEFAULT_TENANT, "alice"));
        assert!(!alice.can_access("acme", "bob"));
        let viewer = caller("alice", "acme", Role::Viewer);
        assert!(!viewer.can_access(DEFAULT_TENANT, "alice"));
        let operator = caller("ops", "acme", Role::Operator);
        assert!(operator.can_access("acme", "bob"));
        assert!(!operator.can_access(DEFAULT_TENANT, "bob"));
        assert_eq!(operator.tenant_scope().as_deref(), Some("acme"));
        let admin = caller("root", "acme", Role::Admin);
        assert!(admin.can_access(DEFAULT_TENANT, "bob"));
        assert_eq!(admin.tenant_scope(), None);
    }
}
