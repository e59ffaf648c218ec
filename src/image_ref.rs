//! Image references: one grammar for every provider, Docker's
//! (`distribution/reference`), so that a name Docker would refuse is the
//! client's mistake answered with 400 and a reason, never a daemon error
//! passed on as 500, and a name works the same on docker, native and proot.
//!
//! ```text
//! reference  := name [ ":" tag ] [ "@" digest ]
//! name       := [ domain "/" ] path ( "/" path )*
//! domain     := host [ ":" port ]      (first part with ".", ":" or "localhost")
//! path       := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
//! tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
//! digest     := algorithm ":" hex{32,}
//! ```

/// Longest name (without tag and digest) Docker accepts.
const MAX_NAME_LEN: usize = 255;

/// Why a reference is not valid, in a user's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image name {image:?}: {why}")]
pub struct InvalidImage {
    pub image: String,
    pub why: &'static str,
}

/// Checks `image` against the grammar above.
pub fn check(image: &str) -> Result<(), InvalidImage> {
    let fail = |why| {
        Err(InvalidImage {
            image: image.to_string(),
            why,
        })
    };
    if image.is_empty() {
        return fail("it is empty");
    }
    if !image.is_ascii() {
        return fail("image names are ASCII");
    }
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest
        && !valid_digest(digest)
    {
        return fail("a digest is ALGORITHM:HEX, e.g. sha256: and 64 hex digits");
    }
    // A tag follows the last ':' after the last '/' (a ':' before it is a
    // registry's port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if name.is_empty() {
        return fail("the repository name is missing");
    }
    if let Some(tag) = tag
        && !valid_tag(tag)
    {
        return fail(
            "a tag is up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'",
        );
    }
    if name.len() > MAX_NAME_LEN {
        return fail("the repository name is longer than 255 characters");
    }
    let mut parts = name.split('/').peekable();
    let first = parts.next().unwrap_or_default();
    let has_domain = parts.peek().is_some()
        && (first.contains(['.', ':'])
            || first == "localhost"
            || first.chars().any(|c| c.is_ascii_uppercase()));
    if has_domain {
        if !valid_domain(first) {
            return fail("the registry host is not a valid host[:port]");
        }
    } else if !valid_path(first) {
        return fail(path_reason(first));
    }
    for part in parts {
        if !valid_path(part) {
            return fail(path_reason(part));
        }
    }
    Ok(())
}

fn path_reason(part: &str) -> &'static str {
    if part.chars().any(|c| c.is_ascii_uppercase()) {
        "repository names must be lowercase"
    } else if part.is_empty() {
        "a repository name has an empty part"
    } else {
        "repository names are lowercase letters and digits separated by '.', '_', '__' or '-'"
    }
}

fn alnum_lower(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// `[a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*`
fn valid_path(part: &str) -> bool {
    let b = part.as_bytes();
    let (Some(first), Some(last)) = (b.first(), b.last()) else {
        return false;
    };
    if !alnum_lower(*first) || !alnum_lower(*last) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum_lower(b[i]) {
            i += 1;
            continue;
        }
        // A separator run, then an alphanumeric (the last byte is one).
        let start = i;
        while i < b.len() && !alnum_lower(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|c| *c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `host[:port]`, host being dot-separated labels of letters, digits and
/// inner '-' (IPv6 literals are not accepted here).
fn valid_domain(domain: &str) -> bool {
    let (host, port) = match domain.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain, None),
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|c| c.is_ascii_digit()))
    {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_digest(digest: &str) -> bool {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return false;
    };
    let a = algorithm.as_bytes();
    !a.is_empty()
        && a[0].is_ascii_alphabetic()
        && a.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'+' | b'.'))
        && hex.len() >= 32
        && hex.bytes().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn docker_references_are_accepted() {
        for ok in [
            "alpine",
            "alpine:latest",
            "alpine:3.19",
            "library/alpine",
            "docker.io/library/alpine:3.19",
            "localhost:5000/team/app:v1.2-rc_3",
            "localhost/app",
            "registry.example.com/a/b/c",
            "stacyvm-test:busybox",
            "my_app",
            "my__app",
            "my--app",
            "a.b",
            "alpine@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "alpine:3@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "Example.COM/app",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn what_docker_refuses_is_refused_with_a_reason() {
        for (bad, why) in [
            ("UPPER:latest", "lowercase"),
            (":", "missing"),
            (":latest", "missing"),
            ("caf\u{e9}", "ASCII"),
            ("alpine:", "tag"),
            ("alpine:.x", "tag"),
            ("-alpine", "lowercase letters"),
            ("alpine-", "lowercase letters"),
            ("a...b", "lowercase letters"),
            ("a___b", "lowercase letters"),
            ("a//b", "empty part"),
            ("/alpine", "empty part"),
            ("alpine@sha256:xyz", "digest"),
            ("exa_mple.com:80x/app", "registry"),
            ("", "empty"),
        ] {
            let e = check(bad).expect_err(bad);
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        let long = "a".repeat(256);
        assert!(check(&long).is_err());
        let long_tag = format!("alpine:{}", "t".repeat(129));
        assert!(check(&long_tag).is_err());
    }
}
