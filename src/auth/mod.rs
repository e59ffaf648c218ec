//! Who is calling. Every service call takes a [`Caller`]; today every caller
//! is anonymous (keys, JWT and roles arrive with the identity work), but the
//! service already decides ownership from it so that adding real identities
//! changes this module, not the rules.

/// The identity a request acts as.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The owner this caller acts for by default.
    pub owner_id: String,
    pub tenant_id: String,
    /// True when the caller may act for any owner (admins, and the open
    /// loopback mode that runs without keys).
    pub may_act_for_others: bool,
    /// Correlates audit events and logs with the HTTP request.
    pub request_id: String,
}

/// The owner recorded when an anonymous caller names none.
pub const ANONYMOUS_OWNER: &str = "anonymous";
/// The tenant of anonymous callers.
pub const DEFAULT_TENANT: &str = "default";

impl Caller {
    /// An unauthenticated caller on a server that runs open (loopback only).
    pub fn anonymous(request_id: impl Into<String>) -> Caller {
        Caller {
            owner_id: ANONYMOUS_OWNER.into(),
            tenant_id: DEFAULT_TENANT.into(),
            may_act_for_others: true,
            request_id: request_id.into(),
        }
    }

    /// The server itself (reaper, start-up), for audit events.
    pub fn system() -> Caller {
        Caller {
            owner_id: "system".into(),
            tenant_id: DEFAULT_TENANT.into(),
            may_act_for_others: true,
            request_id: String::new(),
        }
    }

    /// The owner a new resource belongs to: the requested one when the
    /// caller may act for others, otherwise the caller itself.
    pub fn effective_owner(&self, requested: Option<&str>) -> String {
        match requested {
            Some(owner) if self.may_act_for_others && !owner.is_empty() => owner.to_string(),
            _ => self.owner_id.clone(),
        }
    }

    /// May this caller see and touch a resource of `owner_id`?
    pub fn can_access(&self, owner_id: &str) -> bool {
        self.may_act_for_others || self.owner_id == owner_id
    }
}
