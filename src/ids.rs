//! Typed, prefixed identifiers: `sb-` sandboxes (8 hex digits, as StacyVM
//! clients expect), `ex-` executions, `wk-` workers, `ev-` audit events.

use uuid::Uuid;

fn hex(len: usize) -> String {
    let mut s = Uuid::new_v4().simple().to_string();
    s.truncate(len);
    s
}

/// A new sandbox id: "sb-" and 8 lowercase hex digits.
pub fn sandbox() -> String {
    format!("sb-{}", hex(8))
}

/// A new execution id.
pub fn execution() -> String {
    format!("ex-{}", hex(16))
}

/// A new audit event id.
pub fn audit_event() -> String {
    format!("ev-{}", hex(16))
}

/// A request id for requests that arrive without `X-Request-ID`.
pub fn request() -> String {
    hex(16)
}

/// True when `id` has the shape of a sandbox id. Lets the API answer 404
/// for garbage without a store round trip.
pub fn is_sandbox_id(id: &str) -> bool {
    id.strip_prefix("sb-")
        .is_some_and(|h| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}
