//! API key material: generation and keyed hashing. Only the hash is ever
//! stored; the key is shown once, when it is created.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Every StacyVM key starts with this, so leaked keys are recognisable.
pub const KEY_PREFIX: &str = "svm_";
/// Characters of a key kept in clear as its listing prefix.
pub const LISTED_PREFIX_LEN: usize = 12;

/// Hashes keys with HMAC-SHA-256 under a server-side pepper, so a copy of
/// the database alone cannot be used to check guessed keys.
#[derive(Clone)]
pub struct KeyHasher {
    pepper: Vec<u8>,
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHasher { pepper: *** }")
    }
}

impl KeyHasher {
    pub fn new(pepper: impl Into<Vec<u8>>) -> KeyHasher {
        KeyHasher {
            pepper: pepper.into(),
        }
    }

    /// The stored form of `key`, hex.
    pub fn hash(&self, key: &str) -> String {
        // HMAC accepts keys of any length; this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.pepper)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(key.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Compares a presented secret with an expected one in constant time
    /// (for the static keys from the configuration).
    pub fn same(&self, presented: &str, expected: &str) -> bool {
        let (a, b) = (self.hash(presented), self.hash(expected));
        a.as_bytes().ct_eq(b.as_bytes()).into()
    }
}

/// A new random key (244 bits from the OS generator) and its listing prefix.
pub fn generate() -> (String, String) {
    let key = format!(
        "{KEY_PREFIX}{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let prefix = key[..LISTED_PREFIX_LEN].to_string();
    (key, prefix)
}

/// A new random pepper.
pub fn generate_pepper() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_depend_on_the_pepper_and_keys_are_unique() {
        let (key, prefix) = generate();
        assert!(key.starts_with(KEY_PREFIX) && key.starts_with(&prefix));
        assert_eq!(key.len(), KEY_PREFIX.len() + 64);
        assert_ne!(generate().0, key);
        let a = KeyHasher::new("pepper-a");
        assert_eq!(a.hash(&key), a.hash(&key));
        assert_ne!(a.hash(&key), KeyHasher::new("pepper-b").hash(&key));
        assert!(!a.hash(&key).contains(&key[4..]));
        assert!(a.same("x", "x") && !a.same("x", "y"));
    }
}
