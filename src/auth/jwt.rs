//! JWT bearer-token verification.
//!
//! Deployments that already run an identity provider hand their users signed
//! JSON Web Tokens; this module lets StacyVM accept those tokens instead of
//! (or beside) its own API keys. It only answers "is this token genuine, still
//! valid and meant for us, and who does it name?": turning the answer into a
//! [`Caller`](super::Caller) belongs to the service layer.
//!
//! Security rules, all enforced here:
//! - The algorithm comes from the configured key, never from the token:
//!   HS256 for the shared secret, RS256 for an RSA key, ES256 for an EC P-256
//!   key. A token whose header names any other algorithm is refused, which
//!   blocks the classic "HS256 signed with the public key" confusion attack.
//! - `alg: none` is always refused.
//! - `sub` (non-empty) and `exp` are required; `nbf` is checked when present;
//!   `iss` and `aud` are required and checked when configured.
//! - Every key is loaded and checked at start-up: a bad key file stops the
//!   server instead of failing every request later.
//! - Error messages say what is wrong with a token and never echo it.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// The largest token accepted, in bytes. Real tokens are a few hundred bytes
/// to a few KiB; anything bigger is refused before any decoding work.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The largest accepted clock leeway (one hour). Larger values would make
/// expiry meaningless.
pub const MAX_LEEWAY_SECS: u64 = 3600;

/// The shortest accepted HS256 secret, in bytes (RFC 7518 §3.2: a key at
/// least as long as the hash output).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// The smallest accepted RSA modulus, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// How JWT bearer tokens are verified. JWT is off unless one key source
/// (`hs256_secret`, `public_key_file` or `jwks_file`) is configured; exactly
/// one may be.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Shared secret for HS256 tokens (at least 32 bytes). Empty = unused.
    /// Never printed by `Debug`.
    pub hs256_secret: String,
    /// PEM file holding one public key: RSA of at least 2048 bits (tokens
    /// must be RS256) or EC P-256 (tokens must be ES256), as a `PUBLIC KEY`
    /// (SPKI) or `RSA PUBLIC KEY` (PKCS#1) block. Private keys and
    /// certificates are refused.
    pub public_key_file: Option<PathBuf>,
    /// JSON Web Key Set file (`{"keys": [...]}`). Each key allows only the
    /// algorithm its type implies (RSA → RS256, EC P-256 → ES256,
    /// oct → HS256); tokens pick a key by `kid`, which is required when the
    /// set holds more than one usable key. Encryption keys and keys of other
    /// types or algorithms are skipped with a warning.
    pub jwks_file: Option<PathBuf>,
    /// Expected `iss` claim. Empty = not checked; otherwise tokens must carry
    /// exactly this issuer.
    pub issuer: String,
    /// Expected `aud` claim (one of the token's audiences). Empty = not
    /// checked, and tokens that carry an audience are accepted.
    pub audience: String,
    /// Claim that names the caller's tenant. Default `tenant`.
    pub tenant_claim: String,
    /// Claim that names the caller's role. Default `role`.
    pub role_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds (at most 3600).
    /// Default 30.
    pub leeway_secs: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            hs256_secret: String::new(),
            public_key_file: None,
            jwks_file: None,
            issuer: String::new(),
            audience: String::new(),
            tenant_claim: "tenant".into(),
            role_claim: "role".into(),
            leeway_secs: 30,
        }
    }
}

impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = if self.hs256_secret.is_empty() {
            ""
        } else {
            "[redacted]"
        };
        f.debug_struct("JwtConfig")
            .field("hs256_secret", &secret)
            .field("public_key_file", &self.public_key_file)
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("tenant_claim", &self.tenant_claim)
            .field("role_claim", &self.role_claim)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl JwtConfig {
    /// True when any key source is configured, i.e. JWT bearer tokens are
    /// accepted.
    pub fn enabled(&self) -> bool {
        !self.hs256_secret.is_empty() || self.public_key_file.is_some() || self.jwks_file.is_some()
    }
}

/// Why a token (or, at start-up, the JWT configuration) was refused.
///
/// Token errors are safe to put in a 401 body: they say what is wrong and
/// never include the token or its claims' values.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// Not a well-formed JWS compact token (three base64url parts, JSON
    /// header and claims, a string `alg`).
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header names `none` or an algorithm this server never accepts.
    #[error("unsupported token algorithm: only HS256, RS256 and ES256 are accepted, never none")]
    UnsupportedAlgorithm,
    /// The header's algorithm is not the one the selected key implies.
    #[error("token algorithm {token} does not match the server key, which requires {expected}")]
    AlgorithmMismatch {
        /// The algorithm the token's header names.
        token: &'static str,
        /// The algorithm the key allows.
        expected: &'static str,
    },
    /// The key set holds several keys and the token names none of them.
    #[error("token has no kid header and the key set holds more than one key")]
    MissingKid,
    /// The token's `kid` names no key in the key set.
    #[error("token kid does not match any known key")]
    UnknownKid,
    /// The signature does not verify with the key.
    #[error("token signature is invalid")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iss` is missing or not the configured issuer.
    #[error("token issuer is missing or not accepted")]
    WrongIssuer,
    /// `aud` is missing or does not include the configured audience.
    #[error("token audience is missing or not accepted")]
    WrongAudience,
    /// `sub` is missing, not a string, or empty.
    #[error("token has no subject (sub claim)")]
    MissingSubject,
    /// `exp` is missing or not a number.
    #[error("token has no valid expiry (exp claim)")]
    MissingExpiry,
    /// A claim is present but has the wrong type (e.g. a string `exp`, or a
    /// tenant claim that is not a non-empty string).
    #[error("token claim {0:?} has an invalid value")]
    InvalidClaim(String),
    /// A key file or key set could not be read or holds no usable key
    /// (start-up only).
    #[error("JWT key {path}: {reason}")]
    KeyFile {
        /// The configured file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The JWT configuration is inconsistent (start-up only).
    #[error("invalid JWT configuration: {0}")]
    Config(String),
}

/// What a verified token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The `sub` claim: who the token names (never empty).
    pub subject: String,
    /// The configured tenant claim, when present.
    pub tenant: Option<String>,
    /// The configured role claim, when present.
    pub role: Option<String>,
    /// The `exp` claim, seconds since the Unix epoch.
    pub expires_at: Option<i64>,
}

/// One verification key and the only algorithm it allows.
struct VerifyingKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Where keys come from; decides how a token's key is picked.
enum KeySource {
    /// A single key (secret or PEM file): the token's `kid` is ignored.
    Single(VerifyingKey),
    /// A key set: picked by `kid`, required when there is more than one key.
    Set(Vec<VerifyingKey>),
}

/// Verifies JWT bearer tokens against the configured key(s). Built once at
/// start-up; cheap to share behind an `Arc`.
pub struct JwtVerifier {
    keys: KeySource,
    issuer: Option<String>,
    audience: Option<String>,
    tenant_claim: String,
    role_claim: String,
    leeway_secs: u64,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<(Option<&str>, Algorithm)> = match &self.keys {
            KeySource::Single(k) => vec![(k.kid.as_deref(), k.algorithm)],
            KeySource::Set(ks) => ks.iter().map(|k| (k.kid.as_deref(), k.algorithm)).collect(),
        };
        f.debug_struct("JwtVerifier")
            .field("keys", &keys)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("tenant_claim", &self.tenant_claim)
            .field("role_claim", &self.role_claim)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl JwtVerifier {
    /// Builds the verifier from the configuration: `Ok(None)` when JWT is not
    /// enabled; an error when the configuration is inconsistent or a key file
    /// cannot be read or holds no usable key.
    pub fn from_config(config: &JwtConfig) -> Result<Option<JwtVerifier>, JwtError> {
        if !config.enabled() {
            return Ok(None);
        }
        let sources = usize::from(!config.hs256_secret.is_empty())
            + usize::from(config.public_key_file.is_some())
            + usize::from(config.jwks_file.is_some());
        if sources != 1 {
            return Err(JwtError::Config(
                "configure exactly one of hs256_secret, public_key_file and jwks_file".into(),
            ));
        }
        if config.leeway_secs > MAX_LEEWAY_SECS {
            return Err(JwtError::Config(format!(
                "leeway_secs must be at most {MAX_LEEWAY_SECS}"
            )));
        }
        if config.tenant_claim.is_empty() || config.role_claim.is_empty() {
            return Err(JwtError::Config(
                "tenant_claim and role_claim must not be empty".into(),
            ));
        }
        if CryptoProvider::try_get_default().is_none() {
            return Err(JwtError::Config(
                "no JWT crypto provider is available in this build".into(),
            ));
        }

        let keys = if !config.hs256_secret.is_empty() {
            KeySource::Single(hs256_key(config.hs256_secret.as_bytes()).map_err(JwtError::Config)?)
        } else if let Some(path) = &config.public_key_file {
            KeySource::Single(load_pem_file(path)?)
        } else if let Some(path) = &config.jwks_file {
            KeySource::Set(load_jwks_file(path)?)
        } else {
            // `enabled()` guarantees one of the three.
            return Ok(None);
        };

        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Ok(Some(JwtVerifier {
            keys,
            issuer: non_empty(&config.issuer),
            audience: non_empty(&config.audience),
            tenant_claim: config.tenant_claim.clone(),
            role_claim: config.role_claim.clone(),
            leeway_secs: config.leeway_secs,
        }))
    }

    /// Verifies a token (the part after `Bearer `) and returns what it says
    /// about its bearer, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<VerifiedToken, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::Malformed("token is too long"));
        }
        let header = parse_header(token)?;
        let token_alg = match header.alg.as_str() {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            // `none` (in any case) and every other algorithm.
            _ => return Err(JwtError::UnsupportedAlgorithm),
        };
        let key = self.select_key(header.kid.as_deref())?;
        if token_alg != key.algorithm {
            return Err(JwtError::AlgorithmMismatch {
                token: alg_name(token_alg),
                expected: alg_name(key.algorithm),
            });
        }

        let validation = self.validation(key.algorithm);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|e| map_decode_error(e.kind()))?;
        self.claims_to_token(&data.claims)
    }

    /// The key a token with this `kid` must verify against.
    fn select_key(&self, kid: Option<&str>) -> Result<&VerifyingKey, JwtError> {
        match &self.keys {
            KeySource::Single(key) => Ok(key),
            KeySource::Set(keys) => match kid {
                Some(kid) => keys
                    .iter()
                    .find(|k| k.kid.as_deref() == Some(kid))
                    .ok_or(JwtError::UnknownKid),
                None => match keys.as_slice() {
                    [only] => Ok(only),
                    _ => Err(JwtError::MissingKid),
                },
            },
        }
    }

    /// The jsonwebtoken validation rules for a key of `algorithm`.
    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Not configured: an `aud` in the token is not ours to judge.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    /// Extracts the bearer's identity from verified claims.
    fn claims_to_token(&self, claims: &Map<String, Value>) -> Result<VerifiedToken, JwtError> {
        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            _ => return Err(JwtError::MissingSubject),
        };
        let expires_at = claims.get("exp").and_then(|exp| {
            exp.as_i64()
                // A fractional NumericDate; `as` saturates, it cannot panic.
                .or_else(|| exp.as_f64().map(|f| f.round() as i64))
        });
        Ok(VerifiedToken {
            subject,
            tenant: optional_string_claim(claims, &self.tenant_claim)?,
            role: optional_string_claim(claims, &self.role_claim)?,
            expires_at,
        })
    }
}

/// A claim that may be absent (or null) but, when present, must be a
/// non-empty string.
fn optional_string_claim(
    claims: &Map<String, Value>,
    name: &str,
) -> Result<Option<String>, JwtError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(JwtError::InvalidClaim(name.to_string())),
    }
}

/// The header fields verification needs.
struct TokenHeader {
    alg: String,
    kid: Option<String>,
}

/// Reads the header ourselves (before jsonwebtoken does) so that `none` and
/// unknown algorithms get their own error instead of a parse failure.
fn parse_header(token: &str) -> Result<TokenHeader, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("expected three dot-separated parts"));
    };
    if header.is_empty() || payload.is_empty() {
        return Err(JwtError::Malformed("empty header or claims"));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwtError::Malformed("header is not base64url"))?;
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&bytes) else {
        return Err(JwtError::Malformed("header is not a JSON object"));
    };
    let alg = match fields.get("alg") {
        Some(Value::String(alg)) => alg.clone(),
        _ => return Err(JwtError::Malformed("header has no alg")),
    };
    let kid = match fields.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(JwtError::Malformed("header kid is not a string")),
    };
    Ok(TokenHeader { alg, kid })
}

/// Translates jsonwebtoken's error into ours. Only reached after the
/// algorithm and key were checked, so algorithm errors are mismatches.
fn map_decode_error(kind: &ErrorKind) -> JwtError {
    match kind {
        ErrorKind::InvalidSignature => JwtError::BadSignature,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
        ErrorKind::InvalidAudience => JwtError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "sub" => JwtError::MissingSubject,
            "exp" => JwtError::MissingExpiry,
            "iss" => JwtError::WrongIssuer,
            "aud" => JwtError::WrongAudience,
            _ => JwtError::Malformed("a required claim is missing"),
        },
        ErrorKind::InvalidClaimFormat(claim) => JwtError::InvalidClaim(claim.clone()),
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
            JwtError::UnsupportedAlgorithm
        }
        ErrorKind::Base64(_) => JwtError::Malformed("a part is not base64url"),
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            JwtError::Malformed("header or claims are not a JSON object")
        }
        // A key that passed the start-up checks cannot fail here; if it
        // does, the token cannot be verified, which for the caller is a bad
        // signature. The details go to the log, not the 401 body.
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Provider(_) => {
            tracing::error!(error = ?kind, "JWT verification key failed at verify time");
            JwtError::BadSignature
        }
        _ => JwtError::Malformed("token could not be decoded"),
    }
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        // Only the three above are ever constructed here.
        _ => "another algorithm",
    }
}

/// An HS256 key from secret bytes, refusing short secrets.
fn hs256_key(secret: &[u8]) -> Result<VerifyingKey, String> {
    if secret.len() < MIN_HS256_SECRET_BYTES {
        return Err(format!(
            "the HS256 secret must be at least {MIN_HS256_SECRET_BYTES} bytes"
        ));
    }
    let key = DecodingKey::from_secret(secret).map_err(|e| e.to_string())?;
    Ok(VerifyingKey {
        kid: None,
        algorithm: Algorithm::HS256,
        key,
    })
}

/// Loads one RSA or EC P-256 public key from a PEM file.
fn load_pem_file(path: &Path) -> Result<VerifyingKey, JwtError> {
    let key_file = |reason: String| JwtError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| key_file(format!("cannot read: {e}")))?;
    let contains = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    if contains(b"PRIVATE KEY") {
        return Err(key_file(
            "holds a private key; configure the public key only".into(),
        ));
    }
    if contains(b"CERTIFICATE") {
        return Err(key_file(
            "holds a certificate; configure its public key instead".into(),
        ));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        check_rsa_der(&key).map_err(key_file)?;
        return Ok(VerifyingKey {
            kid: None,
            algorithm: Algorithm::RS256,
            key,
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        check_ec_p256(&key).map_err(key_file)?;
        return Ok(VerifyingKey {
            kid: None,
            algorithm: Algorithm::ES256,
            key,
        });
    }
    Err(key_file("not a PEM RSA or EC P-256 public key".into()))
}

/// Checks a PKCS#1 DER RSA public key parses and is large enough.
fn check_rsa_der(key: &DecodingKey) -> Result<(), String> {
    let provider = CryptoProvider::try_get_default()
        .ok_or_else(|| "no JWT crypto provider is available".to_string())?;
    let der = key.try_get_as_bytes().map_err(|e| e.to_string())?;
    let (n, _e) = (provider.key_utils.rsa_pub_components_from_public_key)(der)
        .map_err(|e| format!("invalid RSA public key: {e}"))?;
    check_rsa_modulus(&n)
}

/// Refuses RSA moduli below [`MIN_RSA_BITS`].
fn check_rsa_modulus(n: &[u8]) -> Result<(), String> {
    let significant = n.iter().skip_while(|b| **b == 0).count();
    if significant * 8 < MIN_RSA_BITS {
        return Err(format!("RSA keys must be at least {MIN_RSA_BITS} bits"));
    }
    Ok(())
}

/// Checks an EC key is a valid P-256 point by building an ES256 verifier
/// from it (a verifier for an invalid point cannot be built; a wrong
/// signature only fails verification).
fn check_ec_p256(key: &DecodingKey) -> Result<(), String> {
    jsonwebtoken::crypto::verify("AA", b"probe", key, Algorithm::ES256)
        .map(|_| ())
        .map_err(|_| "not a valid EC P-256 public key".to_string())
}

/// Loads a JWKS file: every usable signing key, with distinct `kid`s.
fn load_jwks_file(path: &Path) -> Result<Vec<VerifyingKey>, JwtError> {
    let key_file = |reason: String| JwtError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read(path).map_err(|e| key_file(format!("cannot read: {e}")))?;
    let set: JwkSet =
        serde_json::from_slice(&text).map_err(|e| key_file(format!("not a JWK set: {e}")))?;

    let mut keys = Vec::with_capacity(set.keys.len());
    let mut kids = HashSet::new();
    for (index, jwk) in set.keys.iter().enumerate() {
        let label = jwk
            .common
            .key_id
            .clone()
            .unwrap_or_else(|| format!("#{index}"));
        match jwk_to_key(jwk) {
            Ok(Some(key)) => {
                if let Some(kid) = &key.kid
                    && !kids.insert(kid.clone())
                {
                    return Err(key_file(format!("duplicate kid {kid:?}")));
                }
                keys.push(key);
            }
            Ok(None) => {
                tracing::warn!(path = %path.display(), key = %label, "JWKS key skipped: not an RS256, ES256 (P-256) or HS256 signing key");
            }
            Err(reason) => return Err(key_file(format!("key {label}: {reason}"))),
        }
    }
    if keys.is_empty() {
        return Err(key_file("holds no usable signing key".into()));
    }
    if keys.len() > 1 && keys.iter().any(|k| k.kid.is_none()) {
        return Err(key_file(
            "every key needs a kid when the set holds more than one".into(),
        ));
    }
    Ok(keys)
}

/// One JWK as a verifying key: `Ok(None)` for keys this server does not use
/// (encryption keys, other types, curves or algorithms), an error for a
/// usable key whose material is invalid.
fn jwk_to_key(jwk: &Jwk) -> Result<Option<VerifyingKey>, String> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Ok(None);
    }
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(params) if params.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
        _ => return Ok(None),
    };
    if let Some(declared) = jwk.common.key_algorithm {
        // The key's own `alg` must agree with the one its type implies.
        let declared = Algorithm::from_str(&declared.to_string()).ok();
        if declared != Some(algorithm) {
            return Ok(None);
        }
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("invalid key material: {e}"))?;
    match (&jwk.algorithm, algorithm) {
        (AlgorithmParameters::RSA(params), _) => {
            let n = URL_SAFE_NO_PAD
                .decode(&params.n)
                .map_err(|_| "RSA modulus is not base64url".to_string())?;
            check_rsa_modulus(&n)?;
        }
        (_, Algorithm::ES256) => check_ec_p256(&key)?,
        (_, Algorithm::HS256) => {
            let bytes = key.try_get_as_bytes().map_err(|e| e.to_string())?;
            if bytes.len() < MIN_HS256_SECRET_BYTES {
                return Err(format!(
                    "oct keys must be at least {MIN_HS256_SECRET_BYTES} bytes"
                ));
            }
        }
        _ => {}
    }
    Ok(Some(VerifyingKey {
        kid: jwk.common.key_id.clone(),
        algorithm,
        key,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
    use serde_json::json;

    const SECRET: &str = "an-hs256-test-secret-of-more-than-32-bytes";
    const ISSUER: &str = "https://issuer.test";
    const AUDIENCE: &str = "stacyvm";

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name)
    }

    fn read_fixture(name: &str) -> Vec<u8> {
        std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("read fixture {name}: {e}"))
    }

    fn rsa_signing_key() -> EncodingKey {
        EncodingKey::from_rsa_pem(&read_fixture("rsa_private.pem")).expect("rsa private key")
    }

    fn ec_signing_key() -> EncodingKey {
        EncodingKey::from_ec_pem(&read_fixture("ec_private.pem")).expect("ec private key")
    }

    fn now() -> i64 {
        i64::try_from(get_current_timestamp()).expect("timestamp fits i64")
    }

    /// Valid claims for the test issuer and audience.
    fn claims() -> Value {
        json!({
            "sub": "alice",
            "tenant": "acme",
            "role": "operator",
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now(),
            "exp": now() + 600,
        })
    }

    fn config() -> JwtConfig {
        JwtConfig {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            ..JwtConfig::default()
        }
    }

    fn hs256_verifier() -> JwtVerifier {
        JwtVerifier::from_config(&JwtConfig {
            hs256_secret: SECRET.into(),
            ..config()
        })
        .expect("hs256 config")
        .expect("enabled")
    }

    fn pem_verifier(file: &str) -> JwtVerifier {
        JwtVerifier::from_config(&JwtConfig {
            public_key_file: Some(fixture(file)),
            ..config()
        })
        .expect("pem config")
        .expect("enabled")
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        encode(&header, claims, key).expect("encode token")
    }

    fn hs256(claims: &Value) -> String {
        sign(
            Algorithm::HS256,
            None,
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()).expect("secret"),
        )
    }

    fn with(mut claims: Value, key: &str, value: Value) -> Value {
        claims[key] = value;
        claims
    }

    fn without(mut claims: Value, key: &str) -> Value {
        if let Some(map) = claims.as_object_mut() {
            map.remove(key);
        }
        claims
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A JWKS file holding the RSA key as `rsa-1` and the EC key as `ec-1`.
    fn jwks_file(dir: &tempfile::TempDir) -> PathBuf {
        let mut rsa =
            Jwk::from_encoding_key(&rsa_signing_key(), Algorithm::RS256).expect("rsa jwk");
        rsa.common.key_id = Some("rsa-1".into());
        let mut ec = Jwk::from_encoding_key(&ec_signing_key(), Algorithm::ES256).expect("ec jwk");
        ec.common.key_id = Some("ec-1".into());
        let set = JwkSet {
            keys: vec![rsa, ec],
        };
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, serde_json::to_vec(&set).expect("jwks json")).expect("write jwks");
        path
    }

    fn jwks_verifier(dir: &tempfile::TempDir) -> JwtVerifier {
        JwtVerifier::from_config(&JwtConfig {
            jwks_file: Some(jwks_file(dir)),
            ..config()
        })
        .expect("jwks config")
        .expect("enabled")
    }

    fn assert_identity(token: VerifiedToken) {
        assert_eq!(token.subject, "alice");
        assert_eq!(token.tenant.as_deref(), Some("acme"));
        assert_eq!(token.role.as_deref(), Some("operator"));
        assert!(token.expires_at.is_some_and(|exp| exp > now()));
    }

    #[test]
    fn verifier_can_be_shared_across_tasks() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<JwtVerifier>();
    }

    #[test]
    fn disabled_config_builds_no_verifier() {
        let verifier = JwtVerifier::from_config(&JwtConfig::default()).expect("config");
        assert!(verifier.is_none());
        assert!(!JwtConfig::default().enabled());
    }

    #[test]
    fn defaults_and_debug_hide_the_secret() {
        let config: JwtConfig =
            serde_json::from_value(json!({ "hs256_secret": SECRET })).expect("deserialize");
        assert_eq!(config.tenant_claim, "tenant");
        assert_eq!(config.role_claim, "role");
        assert_eq!(config.leeway_secs, 30);
        assert!(config.enabled());
        let debug = format!("{config:?}");
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(debug.contains("[redacted]"), "{debug}");
        assert!(!format!("{:?}", hs256_verifier()).contains(SECRET));
        assert!(serde_json::from_value::<JwtConfig>(json!({ "secret": "x" })).is_err());
    }

    #[test]
    fn valid_hs256_token_passes() {
        assert_identity(hs256_verifier().verify(&hs256(&claims())).expect("valid"));
    }

    #[test]
    fn valid_rs256_token_passes() {
        let token = sign(Algorithm::RS256, None, &claims(), &rsa_signing_key());
        assert_identity(
            pem_verifier("rsa_public.pem")
                .verify(&token)
                .expect("valid"),
        );
    }

    #[test]
    fn valid_es256_token_passes() {
        let token = sign(Algorithm::ES256, None, &claims(), &ec_signing_key());
        assert_identity(pem_verifier("ec_public.pem").verify(&token).expect("valid"));
    }

    #[test]
    fn valid_jwks_tokens_pass_by_kid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let verifier = jwks_verifier(&dir);
        let rsa = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(),
            &rsa_signing_key(),
        );
        assert_identity(verifier.verify(&rsa).expect("rsa valid"));
        let ec = sign(Algorithm::ES256, Some("ec-1"), &claims(), &ec_signing_key());
        assert_identity(verifier.verify(&ec).expect("ec valid"));
    }

    #[test]
    fn tenant_and_role_claim_names_are_configurable() {
        let verifier = JwtVerifier::from_config(&JwtConfig {
            hs256_secret: SECRET.into(),
            tenant_claim: "org".into(),
            role_claim: "https://stacyvm/role".into(),
            ..config()
        })
        .expect("config")
        .expect("enabled");
        let claims = with(
            with(
                without(without(claims(), "tenant"), "role"),
                "org",
                json!("o1"),
            ),
            "https://stacyvm/role",
            json!("viewer"),
        );
        let token = verifier.verify(&hs256(&claims)).expect("valid");
        assert_eq!(token.tenant.as_deref(), Some("o1"));
        assert_eq!(token.role.as_deref(), Some("viewer"));
        let bare = hs256(&without(without(self::claims(), "tenant"), "role"));
        let token = hs256_verifier().verify(&bare).expect("valid");
        assert_eq!((token.tenant, token.role), (None, None));
    }

    #[test]
    fn alg_none_is_refused() {
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = b64(claims().to_string().as_bytes());
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}"),
        ] {
            let err = hs256_verifier().verify(&token).expect_err("none refused");
            assert!(
                matches!(err, JwtError::UnsupportedAlgorithm | JwtError::Malformed(_)),
                "{err:?}"
            );
        }
        let token = format!("{header}.{payload}.");
        assert!(matches!(
            hs256_verifier().verify(&token),
            Err(JwtError::UnsupportedAlgorithm)
        ));
        let upper = format!("{}.{payload}.", b64(br#"{"alg":"NONE"}"#));
        assert!(matches!(
            pem_verifier("rsa_public.pem").verify(&upper),
            Err(JwtError::UnsupportedAlgorithm)
        ));
    }

    #[test]
    fn other_algorithms_are_refused() {
        let token = sign(
            Algorithm::HS512,
            None,
            &claims(),
            &EncodingKey::from_secret(SECRET.as_bytes()).expect("secret"),
        );
        assert!(matches!(
            hs256_verifier().verify(&token),
            Err(JwtError::UnsupportedAlgorithm)
        ));
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_refused() {
        let public_pem = read_fixture("rsa_public.pem");
        let forged = sign(
            Algorithm::HS256,
            None,
            &claims(),
            &EncodingKey::from_secret(&public_pem).expect("secret"),
        );
        let err = pem_verifier("rsa_public.pem")
            .verify(&forged)
            .expect_err("confusion refused");
        assert!(
            matches!(
                err,
                JwtError::AlgorithmMismatch {
                    token: "HS256",
                    expected: "RS256"
                }
            ),
            "{err:?}"
        );
        // And the other way round: an RS256 token for an HS256 server.
        let rs = sign(Algorithm::RS256, None, &claims(), &rsa_signing_key());
        assert!(matches!(
            hs256_verifier().verify(&rs),
            Err(JwtError::AlgorithmMismatch { .. })
        ));
        // An ES256 key never accepts RS256.
        assert!(matches!(
            pem_verifier("ec_public.pem").verify(&rs),
            Err(JwtError::AlgorithmMismatch { .. })
        ));
    }

    #[test]
    fn wrong_signature_is_refused() {
        let other = sign(
            Algorithm::HS256,
            None,
            &claims(),
            &EncodingKey::from_secret(b"another-secret-that-is-long-enough-too").expect("secret"),
        );
        assert!(matches!(
            hs256_verifier().verify(&other),
            Err(JwtError::BadSignature)
        ));

        // A valid RS256 token whose claims were altered after signing.
        let token = sign(Algorithm::RS256, None, &claims(), &rsa_signing_key());
        let mut parts: Vec<&str> = token.split('.').collect();
        let altered = b64(with(claims(), "sub", json!("mallory"))
            .to_string()
            .as_bytes());
        parts[1] = &altered;
        assert!(matches!(
            pem_verifier("rsa_public.pem").verify(&parts.join(".")),
            Err(JwtError::BadSignature)
        ));

        // An ES256 token carrying the signature of another token.
        let token = sign(Algorithm::ES256, None, &claims(), &ec_signing_key());
        let other = sign(
            Algorithm::ES256,
            None,
            &with(claims(), "role", json!("admin")),
            &ec_signing_key(),
        );
        let (message, _) = token.rsplit_once('.').expect("three parts");
        let (_, other_signature) = other.rsplit_once('.').expect("three parts");
        assert!(matches!(
            pem_verifier("ec_public.pem").verify(&format!("{message}.{other_signature}")),
            Err(JwtError::BadSignature)
        ));
    }

    #[test]
    fn expired_token_is_refused() {
        let token = hs256(&with(claims(), "exp", json!(now() - 3600)));
        assert!(matches!(
            hs256_verifier().verify(&token),
            Err(JwtError::Expired)
        ));
        // Within the 30 s default leeway: accepted.
        let token = hs256(&with(claims(), "exp", json!(now() - 5)));
        assert!(hs256_verifier().verify(&token).is_ok());
    }

    #[test]
    fn future_nbf_is_refused() {
        let token = hs256(&with(claims(), "nbf", json!(now() + 3600)));
        assert!(matches!(
            hs256_verifier().verify(&token),
            Err(JwtError::NotYetValid)
        ));
        let token = hs256(&with(claims(), "nbf", json!(now() - 10)));
        assert!(hs256_verifier().verify(&token).is_ok());
    }

    #[test]
    fn wrong_or_missing_audience_is_refused() {
        for claims in [
            with(claims(), "aud", json!("someone-else")),
            with(claims(), "aud", json!(["a", "b"])),
            without(claims(), "aud"),
        ] {
            assert!(matches!(
                hs256_verifier().verify(&hs256(&claims)),
                Err(JwtError::WrongAudience)
            ));
        }
        let listed = with(claims(), "aud", json!(["other", AUDIENCE]));
        assert!(hs256_verifier().verify(&hs256(&listed)).is_ok());
    }

    #[test]
    fn wrong_or_missing_issuer_is_refused() {
        for claims in [
            with(claims(), "iss", json!("https://evil.test")),
            without(claims(), "iss"),
        ] {
            assert!(matches!(
                hs256_verifier().verify(&hs256(&claims)),
                Err(JwtError::WrongIssuer)
            ));
        }
    }

    #[test]
    fn missing_or_empty_subject_is_refused() {
        for claims in [
            without(claims(), "sub"),
            with(claims(), "sub", json!("")),
            with(claims(), "sub", json!(42)),
        ] {
            let err = hs256_verifier()
                .verify(&hs256(&claims))
                .expect_err("no subject");
            assert!(matches!(err, JwtError::MissingSubject), "{err:?}");
        }
    }

    #[test]
    fn missing_expiry_is_refused() {
        let token = hs256(&without(claims(), "exp"));
        assert!(matches!(
            hs256_verifier().verify(&token),
            Err(JwtError::MissingExpiry)
        ));
        let token = hs256(&with(claims(), "exp", json!("tomorrow")));
        assert!(matches!(
            hs256_verifier().verify(&token),
            Err(JwtError::MissingExpiry)
        ));
    }

    #[test]
    fn non_string_tenant_is_refused() {
        let token = hs256(&with(claims(), "tenant", json!(["a", "b"])));
        let err = hs256_verifier().verify(&token).expect_err("refused");
        assert!(
            matches!(&err, JwtError::InvalidClaim(c) if c == "tenant"),
            "{err:?}"
        );
    }

    #[test]
    fn unknown_or_missing_kid_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let verifier = jwks_verifier(&dir);
        let unknown = sign(
            Algorithm::RS256,
            Some("rsa-9"),
            &claims(),
            &rsa_signing_key(),
        );
        assert!(matches!(
            verifier.verify(&unknown),
            Err(JwtError::UnknownKid)
        ));
        let no_kid = sign(Algorithm::RS256, None, &claims(), &rsa_signing_key());
        assert!(matches!(
            verifier.verify(&no_kid),
            Err(JwtError::MissingKid)
        ));
        // The kid picks the EC key, whose only algorithm is ES256.
        let crossed = sign(
            Algorithm::RS256,
            Some("ec-1"),
            &claims(),
            &rsa_signing_key(),
        );
        assert!(matches!(
            verifier.verify(&crossed),
            Err(JwtError::AlgorithmMismatch { .. })
        ));
    }

    #[test]
    fn single_key_jwks_needs_no_kid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let jwk = Jwk::from_encoding_key(&ec_signing_key(), Algorithm::ES256).expect("jwk");
        let path = dir.path().join("one.json");
        let set =
            json!({ "keys": [jwk, { "kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB" }] });
        std::fs::write(&path, set.to_string()).expect("write");
        let verifier = JwtVerifier::from_config(&JwtConfig {
            jwks_file: Some(path),
            ..config()
        })
        .expect("config")
        .expect("enabled");
        let token = sign(Algorithm::ES256, None, &claims(), &ec_signing_key());
        assert_identity(verifier.verify(&token).expect("valid"));
    }

    #[test]
    fn malformed_tokens_are_refused_without_echo() {
        let verifier = hs256_verifier();
        for token in [
            "", "abc", "a.b", "a.b.c.d", "!!!.e30.", "e30.e30.", ".e30.x",
        ] {
            let err = verifier.verify(token).expect_err("malformed");
            assert!(matches!(err, JwtError::Malformed(_)), "{token}: {err:?}");
        }
        // The signature is checked before the claims are read, and no
        // message ever repeats the token.
        let odd = format!("{}.not-base64!.sig", b64(br#"{"alg":"HS256"}"#));
        let err = verifier.verify(&odd).expect_err("refused");
        assert!(matches!(err, JwtError::BadSignature), "{err:?}");
        assert!(!err.to_string().contains("not-base64!"));
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(
            verifier.verify(&huge),
            Err(JwtError::Malformed(_))
        ));
    }

    #[test]
    fn bad_key_files_fail_at_start_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = JwtConfig {
            public_key_file: Some(dir.path().join("missing.pem")),
            ..config()
        };
        assert!(matches!(
            JwtVerifier::from_config(&missing),
            Err(JwtError::KeyFile { .. })
        ));

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        )
        .expect("write");
        let config_garbage = JwtConfig {
            public_key_file: Some(garbage.clone()),
            ..config()
        };
        assert!(matches!(
            JwtVerifier::from_config(&config_garbage),
            Err(JwtError::KeyFile { .. })
        ));

        let private = JwtConfig {
            public_key_file: Some(fixture("rsa_private.pem")),
            ..config()
        };
        assert!(matches!(
            JwtVerifier::from_config(&private),
            Err(JwtError::KeyFile { .. })
        ));

        let jwks_garbage = JwtConfig {
            jwks_file: Some(garbage),
            ..config()
        };
        assert!(matches!(
            JwtVerifier::from_config(&jwks_garbage),
            Err(JwtError::KeyFile { .. })
        ));

        let empty_set = dir.path().join("empty.json");
        std::fs::write(&empty_set, r#"{"keys":[]}"#).expect("write");
        let config_empty = JwtConfig {
            jwks_file: Some(empty_set),
            ..config()
        };
        assert!(matches!(
            JwtVerifier::from_config(&config_empty),
            Err(JwtError::KeyFile { .. })
        ));

        let bad_point = dir.path().join("bad-ec.json");
        let x = b64(&[1u8; 32]);
        std::fs::write(
            &bad_point,
            json!({ "keys": [{ "kty": "EC", "crv": "P-256", "x": x, "y": x }] }).to_string(),
        )
        .expect("write");
        let config_bad_point = JwtConfig {
            jwks_file: Some(bad_point),
            ..config()
        };
        assert!(matches!(
            JwtVerifier::from_config(&config_bad_point),
            Err(JwtError::KeyFile { .. })
        ));
    }

    #[test]
    fn inconsistent_config_is_refused() {
        let two_sources = JwtConfig {
            hs256_secret: SECRET.into(),
            public_key_file: Some(fixture("rsa_public.pem")),
            ..config()
        };
        assert!(matches!(
            JwtVerifier::from_config(&two_sources),
            Err(JwtError::Config(_))
        ));
        let short_secret = JwtConfig {
            hs256_secret: "short".into(),
            ..config()
        };
        let err = JwtVerifier::from_config(&short_secret).expect_err("short secret");
        assert!(matches!(err, JwtError::Config(_)));
        assert!(!err.to_string().contains("short"));
        let huge_leeway = JwtConfig {
            hs256_secret: SECRET.into(),
            leeway_secs: u64::MAX,
            ..config()
        };
        assert!(matches!(
            JwtVerifier::from_config(&huge_leeway),
            Err(JwtError::Config(_))
        ));
    }
}
