//! How the control plane and a worker prove who they are to each other.
//!
//! Both ends know the worker's secret (`auth.worker_tokens[id]` on the
//! control plane, `--token` on the worker). With `auth.worker_auth:
//! signed` (the default) the secret never crosses the wire: every request
//! carries a JWT (HS256) that lives [`TOKEN_LIFETIME`], names the worker
//! (`sub`) and the direction (`aud`: [`Audience::Worker`] for calls to the
//! worker, [`Audience::ControlPlane`] for heartbeats), so a token captured
//! in one direction or for one worker is refused in the other or for
//! another, and any token is worthless a minute later. The HMAC key is
//! derived from the secret (SHA-256 with a label), so any secret length
//! works and the secret itself is never the key.
//!
//! Rotation without downtime: a secret may list several values separated
//! by commas. The first signs; every one verifies. Add the new value
//! second on both ends, then move it first on both, then drop the old.
//!
//! With `auth.worker_auth: static` the first secret is sent as is and
//! compared in constant time, for setups that cannot keep clocks in step.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How long a signed token is good for.
pub const TOKEN_LIFETIME_SECS: u64 = 60;
/// Clock difference tolerated between the two ends.
pub const LEEWAY_SECS: u64 = 10;
/// The issuer every signed worker token names.
const ISSUER: &str = "stacyvm";
/// Tokens longer than this are refused before any decoding.
const MAX_TOKEN_BYTES: usize = 4096;

/// How worker credentials travel (`auth.worker_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerAuth {
    /// Short-lived JWTs signed with a key derived from the secret.
    #[default]
    Signed,
    /// The secret itself, as a bearer token.
    Static,
}

/// Which way a request goes: the audience its token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// The control plane calling a worker's RPC.
    Worker,
    /// A worker heartbeating to the control plane.
    ControlPlane,
    /// One control-plane replica calling another.
    Replica,
}

impl Audience {
    fn as_str(self) -> &'static str {
        match self {
            Audience::Worker => "stacyvm-worker-rpc",
            Audience::ControlPlane => "stacyvm-control-plane",
            Audience::Replica => "stacyvm-replica",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    iat: u64,
    exp: u64,
}

/// One worker's credentials, as both ends hold them.
#[derive(Clone)]
pub struct WorkerCredentials {
    worker_id: String,
    mode: WorkerAuth,
    /// The secrets, the signing one first.
    secrets: Vec<String>,
}

impl std::fmt::Debug for WorkerCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerCredentials")
            .field("worker_id", &self.worker_id)
            .field("mode", &self.mode)
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl WorkerCredentials {
    /// The credentials of `worker_id` from its configured secret (one
    /// value, or several separated by commas).
    pub fn new(worker_id: &str, secret: &str, mode: WorkerAuth) -> WorkerCredentials {
        WorkerCredentials {
            worker_id: worker_id.to_string(),
            mode,
            secrets: secret
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        }
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    fn key(secret: &str) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(b"stacyvm worker token key v1\0");
        hash.update(secret.as_bytes());
        hash.finalize().into()
    }

    /// The bearer token for one request in direction `audience`.
    pub fn bearer(&self, audience: Audience) -> String {
        self.bearer_issued_at(audience, jsonwebtoken::get_current_timestamp())
    }

    /// The bearer token as it would be signed at `now` (Unix seconds):
    /// lets tests present tokens that expired.
    pub fn bearer_issued_at(&self, audience: Audience, now: u64) -> String {
        let Some(secret) = self.secrets.first() else {
            return String::new();
        };
        match self.mode {
            WorkerAuth::Static => secret.clone(),
            WorkerAuth::Signed => {
                let claims = Claims {
                    iss: ISSUER.into(),
                    sub: self.worker_id.clone(),
                    aud: audience.as_str().into(),
                    iat: now,
                    exp: now + TOKEN_LIFETIME_SECS,
                };
                EncodingKey::from_secret(&Self::key(secret))
                    .and_then(|key| {
                        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
                    })
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "cannot sign a worker token");
                        String::new()
                    })
            }
        }
    }

    /// Whether `authorization` (an `Authorization` header value) carries
    /// a valid credential of this worker for `audience`.
    pub fn verify(&self, authorization: Option<&str>, audience: Audience) -> bool {
        let Some(token) = authorization.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        if token.len() > MAX_TOKEN_BYTES {
            return false;
        }
        match self.mode {
            WorkerAuth::Static => self
                .secrets
                .iter()
                .any(|s| super::rpc::bearer_matches(authorization, s)),
            WorkerAuth::Signed => {
                let mut validation = Validation::new(Algorithm::HS256);
                validation.set_audience(&[audience.as_str()]);
                validation.set_issuer(&[ISSUER]);
                validation.sub = Some(self.worker_id.clone());
                validation.leeway = LEEWAY_SECS;
                validation.set_required_spec_claims(&["exp", "iat", "sub", "aud", "iss"]);
                self.secrets.iter().any(|secret| {
                    let claims = DecodingKey::from_secret(&Self::key(secret))
                        .and_then(|key| jsonwebtoken::decode::<Claims>(token, &key, &validation));
                    // A token must not live longer than any we sign, nor
                    // come from the future: a peer whose clock runs ahead
                    // would otherwise mint tokens replayable for as long.
                    let now = jsonwebtoken::get_current_timestamp();
                    claims.is_ok_and(|c| {
                        c.claims.iat <= now + LEEWAY_SECS
                            && c.claims.exp <= now + TOKEN_LIFETIME_SECS + LEEWAY_SECS
                    })
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    #[test]
    fn a_signed_token_is_good_for_its_worker_and_direction_only() {
        let w1 = WorkerCredentials::new("w1", "secret-one", WorkerAuth::Signed);
        let token = w1.bearer(Audience::Worker);
        assert!(!token.contains("secret-one"));
        assert!(w1.verify(Some(&bearer(&token)), Audience::Worker));
        // The other direction, another worker with the same secret, another secret.
        assert!(!w1.verify(Some(&bearer(&token)), Audience::ControlPlane));
        let w2 = WorkerCredentials::new("w2", "secret-one", WorkerAuth::Signed);
        assert!(!w2.verify(Some(&bearer(&token)), Audience::Worker));
        let other = WorkerCredentials::new("w1", "secret-two", WorkerAuth::Signed);
        assert!(!other.verify(Some(&bearer(&token)), Audience::Worker));
        // The raw secret is not a credential in signed mode.
        assert!(!w1.verify(Some(&bearer("secret-one")), Audience::Worker));
        assert!(!w1.verify(None, Audience::Worker));
        assert!(
            !w1.verify(Some(&token), Audience::Worker),
            "no Bearer prefix"
        );
    }

    fn forge(secret: &str, claims: serde_json::Value, alg: Algorithm) -> String {
        let key = EncodingKey::from_secret(&WorkerCredentials::key(secret)).expect("key");
        jsonwebtoken::encode(&Header::new(alg), &claims, &key).expect("sign")
    }

    #[test]
    fn expired_long_lived_and_tampered_tokens_are_refused() {
        let w1 = WorkerCredentials::new("w1", "secret-one", WorkerAuth::Signed);
        let now = jsonwebtoken::get_current_timestamp();
        let claims = |iat: u64, exp: u64| serde_json::json!({"iss": "stacyvm", "sub": "w1", "aud": "stacyvm-worker-rpc", "iat": iat, "exp": exp});
        let good = forge("secret-one", claims(now, now + 60), Algorithm::HS256);
        assert!(w1.verify(Some(&bearer(&good)), Audience::Worker));
        let expired = forge("secret-one", claims(now - 300, now - 240), Algorithm::HS256);
        assert!(!w1.verify(Some(&bearer(&expired)), Audience::Worker));
        let forever = forge("secret-one", claims(now, now + 86_400), Algorithm::HS256);
        assert!(!w1.verify(Some(&bearer(&forever)), Audience::Worker));
        // Signed by a clock a day ahead: short-lived, but from the future.
        let ahead = forge(
            "secret-one",
            claims(now + 86_400, now + 86_460),
            Algorithm::HS256,
        );
        assert!(!w1.verify(Some(&bearer(&ahead)), Audience::Worker));
        // A few seconds of skew is tolerated.
        let skewed = forge("secret-one", claims(now + 5, now + 65), Algorithm::HS256);
        assert!(w1.verify(Some(&bearer(&skewed)), Audience::Worker));
        let other_alg = forge("secret-one", claims(now, now + 60), Algorithm::HS512);
        assert!(!w1.verify(Some(&bearer(&other_alg)), Audience::Worker));
        // A flipped signature byte.
        let mut tampered = good.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).expect("ascii");
        assert!(!w1.verify(Some(&bearer(&tampered)), Audience::Worker));
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(!w1.verify(Some(&bearer(&huge)), Audience::Worker));
    }

    #[test]
    fn rotation_signs_with_the_first_secret_and_accepts_every_one() {
        let old = WorkerCredentials::new("w1", "old", WorkerAuth::Signed);
        let both = WorkerCredentials::new("w1", "new, old", WorkerAuth::Signed);
        let new = WorkerCredentials::new("w1", "new", WorkerAuth::Signed);
        let from_old = old.bearer(Audience::ControlPlane);
        let from_both = both.bearer(Audience::ControlPlane);
        assert!(both.verify(Some(&bearer(&from_old)), Audience::ControlPlane));
        assert!(new.verify(Some(&bearer(&from_both)), Audience::ControlPlane));
        assert!(!old.verify(Some(&bearer(&from_both)), Audience::ControlPlane));
    }

    #[test]
    fn static_mode_sends_the_secret_and_compares_it() {
        let w1 = WorkerCredentials::new("w1", "new,old", WorkerAuth::Static);
        assert_eq!(w1.bearer(Audience::Worker), "new");
        assert!(w1.verify(Some("Bearer old"), Audience::Worker));
        assert!(!w1.verify(Some("Bearer ol"), Audience::Worker));
        let empty = WorkerCredentials::new("w1", "", WorkerAuth::Static);
        assert!(!empty.verify(Some("Bearer "), Audience::Worker));
    }
}
