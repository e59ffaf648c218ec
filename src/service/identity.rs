//! Identity: turning credentials into a [`Caller`], and managing API keys.
//!
//! Credentials, in the order they are tried: `X-Admin-API-Key` (the static
//! admin key or an admin-role key), `X-API-Key` (the static key or a stored
//! key), `Authorization: Bearer <jwt>`. With none configured anywhere the
//! server is open (loopback only, enforced at start-up); otherwise a request
//! without credentials is 401.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Error, Result};
use crate::auth::jwt::JwtVerifier;
use crate::auth::keys::{self, KeyHasher};
use crate::auth::{Caller, DEFAULT_TENANT, Role};
use crate::config::AuthConfig;
use crate::store::Store;

/// What a request presented.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub api_key: Option<String>,
    pub admin_api_key: Option<String>,
    pub bearer: Option<String>,
    /// `X-User-ID`: the SDK's pool-mode user.
    pub user_id: Option<String>,
    pub request_id: String,
    /// The address the request came from, when the transport knows it:
    /// refused requests are rate limited per address.
    pub peer: Option<std::net::IpAddr>,
    /// The request's `Host` header: the open mode answers only names that
    /// cannot be a DNS-rebinding attacker's (see [`trusted_host`]).
    pub host: Option<String>,
}

/// Whether a request naming `host` may be served without credentials:
/// no `Host` at all (not a browser), an IP address, `localhost` (and
/// `*.localhost`), or a name the operator lists in `server.allowed_hosts`.
/// A web page that rebinds its own name to 127.0.0.1 sends its own name,
/// and is refused.
pub fn trusted_host(host: Option<&str>, allowed: &[String]) -> bool {
    let Some(host) = host else {
        return true;
    };
    let host = host.trim().to_ascii_lowercase();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or_default()
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host.as_str(),
        }
    };
    name.parse::<std::net::IpAddr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(name) || a.eq_ignore_ascii_case(&host))
}

/// A stored key as listed (never the key itself).
#[derive(Debug, Clone, Serialize)]
pub struct ApiKeyInfo {
    pub id: String,
    pub prefix: String,
    pub owner_id: String,
    pub tenant_id: String,
    pub role: String,
    pub allow_user_header: bool,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<entity::api_key::Model> for ApiKeyInfo {
    fn from(m: entity::api_key::Model) -> Self {
        ApiKeyInfo {
            id: m.id,
            prefix: m.prefix,
            owner_id: m.owner_id,
            tenant_id: m.tenant_id,
            role: m.role,
            allow_user_header: m.allow_user_header,
            created_at: m.created_at,
            expires_at: m.expires_at,
            revoked_at: m.revoked_at,
        }
    }
}

/// A key to create.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub owner_id: String,
    pub tenant_id: Option<String>,
    pub role: Role,
    pub expires_in: Option<Duration>,
    pub allow_user_header: bool,
}

/// Authenticates requests and manages keys.
pub struct Identity {
    store: Store,
    hasher: KeyHasher,
    /// Hashers of `auth.previous_key_peppers`, tried after `hasher`.
    previous: Vec<KeyHasher>,
    config: AuthConfig,
    jwt: Option<JwtVerifier>,
    /// Set once credentials are known to exist: the server then stays
    /// closed for the rest of the process. While it is unset, every
    /// unauthenticated request asks the store, so a key made anywhere (the
    /// CLI, another replica) is enforced at once.
    closed: std::sync::atomic::AtomicBool,
    /// `server.allowed_hosts`: names the open mode answers besides
    /// localhost and IP addresses.
    allowed_hosts: Vec<String>,
}

/// Why the identity component could not start.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or create the key pepper {path}: {source}")]
    Pepper {
        path: String,
        source: std::io::Error,
    },
    #[error("jwt: {0}")]
    Jwt(#[from] crate::auth::jwt::JwtError),
    #[error("cannot read or store the shared key pepper: {0}")]
    SharedPepper(crate::store::StoreError),
    #[error(
        "this database holds API keys but no shared key pepper, and this data dir has none: \
         set auth.key_pepper (or run first where <data_dir>/key_pepper is) so the keys stay valid"
    )]
    PepperUnknown,
}

/// The pepper: from the configuration; else, on a database replicas
/// share (PostgreSQL), the one kept in it (the first replica stores its
/// own, seeded from an older `<data_dir>/key_pepper` so existing keys stay
/// valid); else from (a new) `<data_dir>/key_pepper`. Never one replica's
/// own file where several replicas verify the same keys.
pub async fn load_pepper(
    config: &AuthConfig,
    data_dir: &Path,
    store: &Store,
) -> std::result::Result<String, IdentityError> {
    if !config.key_pepper.is_empty() {
        return Ok(config.key_pepper.clone());
    }
    if store.is_shared() {
        let seed = match std::fs::read_to_string(data_dir.join("key_pepper")) {
            Ok(p) if !p.trim().is_empty() => p.trim().to_string(),
            _ => {
                // Keys hashed under a pepper this process does not have
                // (another host's data dir) must not be orphaned by a new one.
                let stored = store
                    .stored_cluster_secret("key_pepper")
                    .await
                    .map_err(IdentityError::SharedPepper)?;
                let keys = store
                    .list_api_keys()
                    .await
                    .map_err(IdentityError::SharedPepper)?;
                if stored.is_none() && !keys.is_empty() {
                    return Err(IdentityError::PepperUnknown);
                }
                keys::generate_pepper()
            }
        };
        let pepper = store
            .cluster_secret("key_pepper", &seed)
            .await
            .map_err(IdentityError::SharedPepper)?;
        tracing::info!(
            "key pepper kept in the database and shared by every replica; set auth.key_pepper to keep it apart from the key hashes"
        );
        return Ok(pepper);
    }
    let path = data_dir.join("key_pepper");
    let fail = |source| IdentityError::Pepper {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(p) if !p.trim().is_empty() => Ok(p.trim().to_string()),
        _ => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::create_dir_all(data_dir).map_err(fail)?;
            let pepper = keys::generate_pepper();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(fail)?;
            file.write_all(pepper.as_bytes()).map_err(fail)?;
            Ok(pepper)
        }
    }
}

fn valid_user_id(user: &str) -> Result<()> {
    if !valid_name(user) {
        return Err(Error::BadRequest("invalid X-User-ID".into()));
    }
    Ok(())
}

/// The one rule for owner and tenant names, wherever they come from (a
/// stored key, `X-User-ID`, a JWT's `sub` and `tenant`): 1 to 128
/// characters, none of them a control character, and not a name the
/// server's own audit events use (`system`, `unauthenticated:...`): an
/// owner of that name would read them.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.chars().any(char::is_control)
        && name != "system"
        && !name.starts_with("unauthenticated:")
}

impl Identity {
    pub fn new(
        store: Store,
        config: AuthConfig,
        pepper: String,
    ) -> std::result::Result<Identity, IdentityError> {
        let jwt = JwtVerifier::from_config(&config.jwt)?;
        Ok(Identity {
            store,
            hasher: KeyHasher::new(pepper),
            previous: config
                .previous_key_peppers
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| KeyHasher::new(p.as_str()))
                .collect(),
            config,
            jwt,
            closed: std::sync::atomic::AtomicBool::new(false),
            allowed_hosts: Vec::new(),
        })
    }

    /// The `Host` names (besides localhost and IP addresses) the open mode
    /// answers (`server.allowed_hosts`).
    pub fn with_allowed_hosts(mut self, hosts: Vec<String>) -> Identity {
        self.allowed_hosts = hosts;
        self
    }

    /// A secret derived from the pepper for `label` (HMAC): replicas that
    /// share the pepper share it, and it reveals nothing of the pepper.
    pub fn derived_secret(&self, label: &str) -> String {
        self.hasher.hash(label)
    }

    /// Whether requests without credentials are refused: when a static key
    /// or JWT is configured, or a key was ever stored (with
    /// `auth.allow_open`: a usable one exists).
    pub async fn auth_required(&self) -> Result<bool> {
        use std::sync::atomic::Ordering;
        if !self.config.api_key.is_empty()
            || !self.config.admin_api_key.is_empty()
            || self.jwt.is_some()
            || self.closed.load(Ordering::Relaxed)
        {
            return Ok(true);
        }
        let closed = if self.config.allow_open {
            self.store.count_usable_api_keys(Utc::now()).await? > 0
        } else {
            self.store.any_api_key_ever().await?
        };
        if closed {
            self.closed.store(true, Ordering::Relaxed);
        }
        Ok(closed)
    }

    /// Whether keys were stored but none can be used now (every one is
    /// revoked or expired).
    pub async fn keys_all_unusable(&self) -> Result<bool> {
        Ok(self.store.any_api_key_ever().await?
            && self.store.count_usable_api_keys(Utc::now()).await? == 0)
    }

    /// The caller behind `creds`.
    pub async fn authenticate(&self, creds: Credentials) -> Result<Caller> {
        let mut caller = if let Some(key) = &creds.admin_api_key {
            let caller = self.caller_for_key(key, &creds.request_id, true).await?;
            if !caller.is_admin() {
                return Err(Error::Unauthorized(
                    "X-Admin-API-Key is not an admin key".into(),
                ));
            }
            caller
        } else if let Some(key) = &creds.api_key {
            self.caller_for_key(key, &creds.request_id, false).await?
        } else if let Some(token) = &creds.bearer {
            let verifier = self.jwt.as_ref().ok_or_else(|| {
                Error::Unauthorized("bearer tokens are not configured on this server".into())
            })?;
            let token = verifier
                .verify(token)
                .map_err(|e| Error::Unauthorized(format!("invalid bearer token: {e}")))?;
            let role = match token.role.as_deref() {
                None | Some("") => Role::Owner,
                Some(r) => r
                    .parse()
                    .map_err(|e: crate::auth::UnknownRole| Error::Unauthorized(e.to_string()))?,
            };
            if !valid_name(&token.subject) {
                return Err(Error::Unauthorized(
                    "invalid bearer token: sub must be 1 to 128 characters, no control characters"
                        .into(),
                ));
            }
            if token.tenant.as_deref().is_some_and(|t| !valid_name(t)) {
                return Err(Error::Unauthorized(
                    "invalid bearer token: tenant must be 1 to 128 characters, no control characters"
                        .into(),
                ));
            }
            Caller {
                // The tenant is part of who it is: two tenants' `alice`
                // have their own budgets (rate, in-flight, WebSockets).
                credential: Some(format!(
                    "jwt:{}:{}",
                    token.tenant.as_deref().unwrap_or(DEFAULT_TENANT),
                    token.subject
                )),
                owner_id: token.subject,
                tenant_id: token.tenant.unwrap_or_else(|| DEFAULT_TENANT.into()),
                role,
                open: false,
                request_id: creds.request_id.clone(),
                delegated_by: None,
            }
        } else if self.auth_required().await? {
            return Err(Error::Unauthorized(
                "authentication required: send X-API-Key, X-Admin-API-Key or Authorization: Bearer"
                    .into(),
            ));
        } else if !trusted_host(creds.host.as_deref(), &self.allowed_hosts) {
            return Err(Error::Forbidden(
                "this server runs without credentials and answers only requests for localhost or \
                 an IP address (or a name in server.allowed_hosts): a guard against DNS rebinding"
                    .into(),
            ));
        } else {
            Caller::anonymous(creds.request_id.clone())
        };
        if let Some(user) = creds.user_id {
            valid_user_id(&user)?;
            let allowed =
                caller.open || caller.may_act_for_others() || self.user_header_allowed(&caller);
            if !allowed {
                return Err(Error::Forbidden(
                    "this key may not act for another user (X-User-ID)".into(),
                ));
            }
            if user != caller.owner_id {
                caller.delegated_by = Some(std::mem::replace(&mut caller.owner_id, user));
            }
        }
        Ok(caller)
    }

    fn user_header_allowed(&self, caller: &Caller) -> bool {
        caller
            .credential
            .as_deref()
            .is_some_and(|c| c == "static" || c.ends_with("+user"))
    }

    async fn caller_for_key(
        &self,
        key: &str,
        request_id: &str,
        admin_header: bool,
    ) -> Result<Caller> {
        let static_match = |expected: &str| !expected.is_empty() && self.hasher.same(key, expected);
        if admin_header && static_match(&self.config.admin_api_key) {
            return Ok(Caller {
                owner_id: "admin".into(),
                tenant_id: DEFAULT_TENANT.into(),
                role: Role::Admin,
                open: false,
                credential: Some("static-admin".into()),
                request_id: request_id.to_string(),
                delegated_by: None,
            });
        }
        if !admin_header && static_match(&self.config.api_key) {
            return Ok(Caller {
                owner_id: "default".into(),
                tenant_id: DEFAULT_TENANT.into(),
                role: Role::Owner,
                open: false,
                credential: Some("static".into()),
                request_id: request_id.to_string(),
                delegated_by: None,
            });
        }
        let invalid = || Error::Unauthorized("invalid API key".into());
        let stored = self.stored_key(key).await?.ok_or_else(invalid)?;
        if stored.revoked_at.is_some() {
            return Err(Error::Unauthorized("API key revoked".into()));
        }
        if stored.expires_at.is_some_and(|at| at <= Utc::now()) {
            return Err(Error::Unauthorized("API key expired".into()));
        }
        let role: Role = stored.role.parse().map_err(|_| invalid())?;
        let mut credential = stored.id.clone();
        if stored.allow_user_header {
            credential.push_str("+user");
        }
        Ok(Caller {
            owner_id: stored.owner_id,
            tenant_id: stored.tenant_id,
            role,
            open: false,
            credential: Some(credential),
            request_id: request_id.to_string(),
            delegated_by: None,
        })
    }

    /// The stored key `key` hashes to, under the pepper or a previous one
    /// (then it is rehashed under the pepper, so rotation completes as keys
    /// are used).
    async fn stored_key(&self, key: &str) -> Result<Option<entity::api_key::Model>> {
        let current = self.hasher.hash(key);
        if let Some(stored) = self.store.api_key_by_hash(&current).await? {
            return Ok(Some(stored));
        }
        for previous in &self.previous {
            if let Some(stored) = self.store.api_key_by_hash(&previous.hash(key)).await? {
                match self.store.set_api_key_hash(&stored.id, &current).await {
                    Ok(()) => {
                        tracing::info!(key = %stored.prefix, "API key rehashed under the current pepper")
                    }
                    // Best effort: the previous pepper still verifies it.
                    Err(e) => {
                        tracing::warn!(key = %stored.prefix, error = %e, "cannot rehash an API key")
                    }
                }
                return Ok(Some(stored));
            }
        }
        Ok(None)
    }

    /// Creates a key and returns it (shown once) with its listing.
    pub async fn create_key(&self, new: NewApiKey) -> Result<(String, ApiKeyInfo)> {
        valid_user_id(&new.owner_id).map_err(|_| Error::BadRequest("invalid owner name".into()))?;
        let (key, prefix) = keys::generate();
        let now = Utc::now();
        let expires_at = new
            .expires_in
            .map(|d| chrono::Duration::from_std(d).map(|d| now + d))
            .transpose()
            .map_err(|_| Error::BadRequest("expiry too far away".into()))?;
        let model = entity::api_key::Model {
            id: format!("key_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            prefix,
            hash: self.hasher.hash(&key),
            owner_id: new.owner_id,
            tenant_id: new.tenant_id.unwrap_or_else(|| DEFAULT_TENANT.into()),
            role: new.role.as_str().into(),
            allow_user_header: new.allow_user_header,
            created_at: now,
            expires_at,
            revoked_at: None,
        };
        self.store.insert_api_key(model.clone()).await?;
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok((key, model.into()))
    }

    pub async fn list_keys(&self) -> Result<Vec<ApiKeyInfo>> {
        Ok(self
            .store
            .list_api_keys()
            .await?
            .into_iter()
            .map(ApiKeyInfo::from)
            .collect())
    }

    /// Revokes keys by id or listing prefix; 404 when none matched.
    pub async fn revoke_key(&self, id_or_prefix: &str) -> Result<u64> {
        if id_or_prefix.len() < 6 {
            return Err(Error::BadRequest(
                "give a key id or a prefix of at least 6 characters".into(),
            ));
        }
        match self.store.revoke_api_keys(id_or_prefix).await? {
            0 => Err(Error::NotFound(format!("no active key {id_or_prefix}"))),
            n => Ok(n),
        }
    }
}

#[cfg(test)]
mod host_tests {
    use super::trusted_host;

    #[test]
    fn trusted_hosts_are_ips_localhost_and_listed_names() {
        let listed = vec!["box.internal".to_string()];
        for ok in [
            None,
            Some("127.0.0.1:7423"),
            Some("10.1.2.3"),
            Some("[::1]:80"),
            Some("LOCALHOST:1"),
            Some("a.localhost"),
            Some("box.internal:9"),
        ] {
            assert!(trusted_host(ok, &listed), "{ok:?}");
        }
        for bad in [
            Some("evil.example"),
            Some("localhost.evil.example"),
            Some("box.internal.evil"),
            Some("127.0.0.1.nip.io"),
            Some(""),
        ] {
            assert!(!trusted_host(bad, &listed), "{bad:?}");
        }
    }
}
