//! Paginated, filtered reads for dashboards: sandboxes, executions and audit
//! events, with opaque cursors. Page sizes are capped here, once.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Error, Result, Sandbox, Service};
use crate::auth::Caller;
use crate::lifecycle::SandboxState;
use crate::store::{AuditFilter, PageCursor, SandboxQuery};

/// The largest page any listing returns.
pub const MAX_PAGE_SIZE: u64 = 100;
const DEFAULT_PAGE_SIZE: u64 = 20;

/// A page of results and where the next one starts.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<(String, T)>,
    pub has_next_page: bool,
}

/// Which sandboxes a dashboard wants.
#[derive(Debug, Clone, Default)]
pub struct SandboxListing {
    pub states: Option<Vec<SandboxState>>,
    pub provider: Option<String>,
    pub image: Option<String>,
    pub owner_id: Option<String>,
    /// Metadata entries that must all match.
    pub labels: BTreeMap<String, String>,
    pub first: Option<u64>,
    pub after: Option<String>,
}

/// One command run, as clients see it.
#[derive(Debug, Clone, Serialize)]
pub struct Execution {
    pub id: String,
    pub sandbox_id: String,
    pub owner_id: String,
    pub tenant_id: String,
    pub argv: Vec<String>,
    pub status: crate::lifecycle::ExecStatus,
    pub exit_code: Option<i32>,
    pub duration: Option<Duration>,
    pub stdout_tail: String,
    pub stderr_tail: String,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<entity::execution::Model> for Execution {
    fn from(m: entity::execution::Model) -> Self {
        Execution {
            argv: serde_json::from_value(m.argv).unwrap_or_default(),
            duration: m
                .duration_ms
                .and_then(|ms| u64::try_from(ms).ok())
                .map(Duration::from_millis),
            id: m.id,
            sandbox_id: m.sandbox_id,
            owner_id: m.owner_id,
            tenant_id: m.tenant_id,
            status: crate::lifecycle::ExecStatus::from_stored(&m.status),
            exit_code: m.exit_code,
            stdout_tail: m.stdout_tail,
            stderr_tail: m.stderr_tail,
            error: m.error,
            created_at: m.created_at,
            finished_at: m.finished_at,
        }
    }
}

/// Encodes a row position as an opaque cursor.
pub fn encode_cursor(created_at: DateTime<Utc>, id: &str) -> String {
    let nanos = created_at.timestamp_nanos_opt().unwrap_or_default();
    URL_SAFE_NO_PAD.encode(format!("{nanos}:{id}"))
}

fn decode_cursor(cursor: &str) -> Result<PageCursor> {
    let bad = || Error::BadRequest(format!("invalid cursor {cursor:?}"));
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (nanos, id) = text.split_once(':').ok_or_else(bad)?;
    let nanos: i64 = nanos.parse().map_err(|_| bad())?;
    Ok(PageCursor {
        created_at: DateTime::from_timestamp_nanos(nanos),
        id: id.to_string(),
    })
}

fn page_size(first: Option<u64>) -> Result<u64> {
    match first {
        None => Ok(DEFAULT_PAGE_SIZE),
        Some(0) => Err(Error::BadRequest("first must be at least 1".into())),
        Some(n) if n > MAX_PAGE_SIZE => Err(Error::BadRequest(format!(
            "first may be at most {MAX_PAGE_SIZE}, got {n}"
        ))),
        Some(n) => Ok(n),
    }
}

/// The one rule for whose sandboxes a caller lists: admins and operators
/// any owner's (the one `requested`, or all: `Some(None)`), anyone else
/// only their own; asking for someone else's finds nothing (`None`).
/// Tenants are scoped apart, by `Caller::tenant_scope`.
pub(super) fn owner_filter(caller: &Caller, requested: Option<&str>) -> Option<Option<String>> {
    if caller.may_act_for_others() {
        Some(requested.map(str::to_string))
    } else if requested.is_some_and(|o| o != caller.owner_id) {
        None
    } else {
        Some(Some(caller.owner_id.clone()))
    }
}

impl Service {
    /// A page of the sandboxes the caller may see, oldest first.
    pub async fn sandbox_page(
        &self,
        caller: &Caller,
        listing: SandboxListing,
    ) -> Result<Page<Sandbox>> {
        let size = page_size(listing.first)?;
        let Some(owner_id) = owner_filter(caller, listing.owner_id.as_deref()) else {
            return Ok(Page {
                items: Vec::new(),
                has_next_page: false,
            });
        };
        let mut query = SandboxQuery {
            tenant_id: caller.tenant_scope(),
            owner_id,
            states: listing.states.clone(),
            provider: listing.provider.clone(),
            image: listing.image.clone(),
            after: listing.after.as_deref().map(decode_cursor).transpose()?,
            limit: size + 1,
        };
        // Labels live in a JSON column that SQLite and PostgreSQL query
        // differently, so they are matched here, reading on until the page
        // is full.
        let mut items = Vec::new();
        let mut has_next_page = false;
        loop {
            let rows = self.store().page_sandboxes(&query).await?;
            let exhausted = (rows.len() as u64) < query.limit;
            for row in rows {
                query.after = Some(PageCursor {
                    created_at: row.created_at,
                    id: row.id.clone(),
                });
                let sandbox = self.to_sandbox(row)?;
                let labels_match = listing
                    .labels
                    .iter()
                    .all(|(k, v)| sandbox.metadata.get(k) == Some(v));
                if !labels_match {
                    continue;
                }
                if items.len() as u64 == size {
                    has_next_page = true;
                    break;
                }
                items.push((encode_cursor(sandbox.created_at, &sandbox.id), sandbox));
            }
            if has_next_page || exhausted {
                break;
            }
        }
        Ok(Page {
            items,
            has_next_page,
        })
    }

    /// An execution the caller may see.
    pub async fn get_execution(&self, caller: &Caller, id: &str) -> Result<Execution> {
        match self.store().get_execution(id).await? {
            Some(m) if caller.can_access(&m.tenant_id, &m.owner_id) => Ok(m.into()),
            _ => Err(Error::NotFound(format!("execution {id} not found"))),
        }
    }

    /// A page of a sandbox's executions, oldest first.
    pub async fn execution_page(
        &self,
        caller: &Caller,
        sandbox_id: &str,
        first: Option<u64>,
        after: Option<String>,
    ) -> Result<Page<Execution>> {
        let size = page_size(first)?;
        // Executions of destroyed sandboxes stay readable to their owner.
        match self.store().get_sandbox(sandbox_id).await? {
            Some(s) if caller.can_access(&s.tenant_id, &s.owner_id) => {}
            _ => return Err(Error::sandbox_not_found(sandbox_id)),
        }
        let after = after.as_deref().map(decode_cursor).transpose()?;
        let mut rows = self
            .store()
            .page_executions(sandbox_id, after.as_ref(), size + 1)
            .await?;
        let has_next_page = rows.len() as u64 > size;
        rows.truncate(size as usize);
        let items = rows
            .into_iter()
            .map(|m| (encode_cursor(m.created_at, &m.id), Execution::from(m)))
            .collect();
        Ok(Page {
            items,
            has_next_page,
        })
    }

    /// A page of audit events, newest first. Owners see their own actions.
    pub async fn audit_page(
        &self,
        caller: &Caller,
        filter: AuditFilter,
        first: Option<u64>,
        after: Option<String>,
    ) -> Result<Page<entity::audit_event::Model>> {
        let size = page_size(first)?;
        let Some(mut filter) = super::audit::scoped_audit_filter(caller, filter) else {
            return Ok(Page {
                items: Vec::new(),
                has_next_page: false,
            });
        };
        filter.before = after.as_deref().map(decode_cursor).transpose()?;
        filter.limit = size + 1;
        let mut rows = self.store().list_audit(&filter).await?;
        let has_next_page = rows.len() as u64 > size;
        rows.truncate(size as usize);
        let items = rows
            .into_iter()
            .map(|m| (encode_cursor(m.created_at, &m.id), m))
            .collect();
        Ok(Page {
            items,
            has_next_page,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(role: crate::auth::Role) -> Caller {
        Caller {
            owner_id: "alice".into(),
            role,
            ..Caller::system()
        }
    }

    #[test]
    fn whose_sandboxes_a_caller_lists() {
        use crate::auth::Role;
        for role in [Role::Admin, Role::Operator] {
            assert_eq!(owner_filter(&caller(role), None), Some(None));
            assert_eq!(
                owner_filter(&caller(role), Some("bob")),
                Some(Some("bob".into()))
            );
        }
        for role in [Role::Owner, Role::Viewer] {
            assert_eq!(
                owner_filter(&caller(role), None),
                Some(Some("alice".into()))
            );
            assert_eq!(
                owner_filter(&caller(role), Some("alice")),
                Some(Some("alice".into()))
            );
            assert_eq!(owner_filter(&caller(role), Some("bob")), None);
        }
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let at = DateTime::from_timestamp_nanos(1_700_000_000_123_456_789);
        let c = encode_cursor(at, "sb-12345678");
        assert_eq!(
            decode_cursor(&c).ok(),
            Some(PageCursor {
                created_at: at,
                id: "sb-12345678".into()
            })
        );
        assert!(decode_cursor("!!!").is_err());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode("x:y")).is_err());
    }

    #[test]
    fn page_sizes_are_bounded() {
        assert_eq!(page_size(None).ok(), Some(DEFAULT_PAGE_SIZE));
        assert!(page_size(Some(0)).is_err());
        assert!(page_size(Some(MAX_PAGE_SIZE + 1)).is_err());
    }
}
