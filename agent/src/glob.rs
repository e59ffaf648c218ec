//! Shell-style globbing, one implementation for every file view: the
//! host-side trees (`hostfs`), the docker provider's listed candidates and
//! the microVM agent's own filesystem.
//!
//! Patterns are absolute paths matched component by component: `*`, `?`,
//! `[abc]`, `[a-z]`, `[!x]`/`[^x]`, `\` to escape, and `**` for any number
//! of directories. As in the shell, wildcards do not match a leading dot.

/// The most paths one glob may return; a bigger answer is refused rather
/// than silently truncated.
pub const MAX_RESULTS: usize = 10_000;

/// Whether a pattern component holds a wildcard.
pub fn has_meta(part: &str) -> bool {
    part.contains(['*', '?', '['])
}

/// The tree a glob walks: children of a directory (with whether each is a
/// real directory: a symlink to one is not, so wildcards never loop) and
/// whether a path exists (without following a final symlink). An
/// unreadable or vanished directory just has no children.
pub trait Tree {
    fn children(&mut self, dir: &[String]) -> Vec<(String, bool)>;
    fn exists(&mut self, path: &[String]) -> bool;
}

/// Why a glob gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobError {
    /// A `..` component: patterns stay where they are rooted.
    DotDot,
    /// More than [`MAX_RESULTS`] matches.
    TooMany,
}

impl std::fmt::Display for GlobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GlobError::DotDot => f.write_str("glob patterns may not contain .."),
            GlobError::TooMany => write!(
                f,
                "glob matches more than {MAX_RESULTS} paths; narrow the pattern"
            ),
        }
    }
}

/// Every absolute path of `tree` matching `pattern`, sorted, without
/// duplicates.
pub fn glob(tree: &mut impl Tree, pattern: &str) -> Result<Vec<String>, GlobError> {
    if pattern.split('/').any(|part| part == "..") {
        return Err(GlobError::DotDot);
    }
    let parts: Vec<String> = pattern
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .map(str::to_string)
        .collect();
    let mut out = Vec::new();
    walk(tree, &mut Vec::new(), &parts, &mut out)?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// Walk the tree matching one pattern component per directory level.
/// `dir` is the directory reached so far.
fn walk(
    tree: &mut impl Tree,
    dir: &mut Vec<String>,
    pattern: &[String],
    out: &mut Vec<String>,
) -> Result<(), GlobError> {
    let Some((first, rest)) = pattern.split_first() else {
        if out.len() >= MAX_RESULTS {
            return Err(GlobError::TooMany);
        }
        out.push(format!("/{}", dir.join("/")));
        return Ok(());
    };
    if first == "**" {
        // Zero directories...
        walk(tree, dir, rest, out)?;
        // ...or one more real (non-symlink) directory, keeping the `**`;
        // a trailing `**` also takes the files it passes.
        for (name, is_dir) in tree.children(dir) {
            if name.starts_with('.') || !(is_dir || rest.is_empty()) {
                continue;
            }
            dir.push(name);
            if is_dir {
                walk(tree, dir, pattern, out)?;
            } else {
                walk(tree, dir, rest, out)?;
            }
            dir.pop();
        }
        return Ok(());
    }
    if !has_meta(first) {
        // A literal component: no listing needed; it only has to exist.
        dir.push(first.clone());
        if tree.exists(dir) {
            walk(tree, dir, rest, out)?;
        }
        dir.pop();
        return Ok(());
    }
    for (name, is_dir) in tree.children(dir) {
        if name.starts_with('.') && !first.starts_with('.') {
            continue;
        }
        if !matches(first.as_bytes(), name.as_bytes()) {
            continue;
        }
        if rest.is_empty() || is_dir {
            dir.push(name);
            walk(tree, dir, rest, out)?;
            dir.pop();
        }
    }
    Ok(())
}

/// Whether an absolute `path` matches an absolute glob `pattern`, with
/// the same rules as [`glob`]: for views that list candidates themselves
/// (docker) and match here.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    fn parts(s: &str) -> Vec<&str> {
        s.split('/').filter(|p| !p.is_empty()).collect()
    }
    fn go(pattern: &[&str], path: &[&str]) -> bool {
        match pattern.split_first() {
            None => path.is_empty(),
            Some((&"**", rest)) => {
                go(rest, path)
                    || path
                        .split_first()
                        .is_some_and(|(first, tail)| !first.starts_with('.') && go(pattern, tail))
            }
            Some((first, rest)) => path.split_first().is_some_and(|(name, tail)| {
                let dot_ok = !name.starts_with('.') || first.starts_with('.');
                dot_ok && matches(first.as_bytes(), name.as_bytes()) && go(rest, tail)
            }),
        }
    }
    go(&parts(pattern), &parts(path))
}

/// Shell-style match of one path component.
pub fn matches(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Where to resume after the last `*`: (pattern index, name index).
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p + 1, n));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => match match_class(&pattern[p..], name[n]) {
                Some((true, len)) => Some(p + len),
                Some((false, _)) => None,
                // An unterminated `[` is a literal.
                None => (name[n] == b'[').then_some(p + 1),
            },
            Some(b'\\') if p + 1 < pattern.len() => (pattern[p + 1] == name[n]).then_some(p + 2),
            Some(&c) => (c == name[n]).then_some(p + 1),
            None => None,
        };
        match step {
            Some(next) => {
                p = next;
                n += 1;
            }
            None => match star {
                // Let the last `*` swallow one more byte and retry.
                Some((sp, sn)) => {
                    star = Some((sp, sn + 1));
                    p = sp;
                    n = sn + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Match `c` against the class at the start of `pattern` (which begins with
/// `[`). Returns whether it matched and the class length, or `None` if the
/// class is not terminated.
fn match_class(pattern: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(pattern.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let &lo = pattern.get(i)?;
        if lo == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|&h| h != b']') {
            let hi = pattern[i + 2];
            matched |= lo <= c && c <= hi;
            i += 3;
        } else {
            matched |= lo == c;
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn path_matching_follows_the_shell() {
        assert!(path_matches("/workspace/**/*.txt", "/workspace/c.txt"));
        assert!(path_matches("/workspace/**/*.txt", "/workspace/dir/b.txt"));
        assert!(!path_matches(
            "/workspace/**/*.txt",
            "/workspace/.hidden/b.txt"
        ));
        assert!(path_matches("/workspace/*/b.*", "/workspace/dir/b.txt"));
        assert!(!path_matches("/workspace/*/b.*", "/workspace/b.txt"));
        assert!(path_matches("/tmp/[a-c]?", "/tmp/b1"));
        assert!(!path_matches("/tmp/[!a-c]?", "/tmp/b1"));
        assert!(!path_matches("/tmp/*", "/tmp/.x"));
        assert!(path_matches("/tmp/\\*", "/tmp/*"));
        assert!(!path_matches("/tmp/\\*", "/tmp/a"));
    }

    /// A tree in memory: path -> is_dir.
    struct Map(BTreeMap<String, bool>);

    impl Tree for Map {
        fn children(&mut self, dir: &[String]) -> Vec<(String, bool)> {
            let prefix = format!("/{}", dir.join("/"));
            let prefix = if prefix == "/" { prefix } else { prefix + "/" };
            self.0
                .iter()
                .filter_map(|(p, d)| {
                    let rest = p.strip_prefix(&prefix)?;
                    (!rest.is_empty() && !rest.contains('/')).then(|| (rest.to_string(), *d))
                })
                .collect()
        }
        fn exists(&mut self, path: &[String]) -> bool {
            self.0.contains_key(&format!("/{}", path.join("/")))
        }
    }

    #[test]
    fn the_walk_agrees_with_path_matching() {
        let paths = [
            ("/w", true),
            ("/w/c.txt", false),
            ("/w/dir", true),
            ("/w/dir/b.txt", false),
            ("/w/.h", true),
            ("/w/.h/x.txt", false),
        ];
        let mut tree = Map(paths.iter().map(|(p, d)| (p.to_string(), *d)).collect());
        for pattern in ["/w/**/*.txt", "/w/*/b.*", "/w/*", "/w/.h/*", "/**"] {
            let walked = glob(&mut tree, pattern).unwrap();
            let mut listed: Vec<String> = paths
                .iter()
                .map(|(p, _)| p.to_string())
                .filter(|p| path_matches(pattern, p))
                .collect();
            if path_matches(pattern, "/") {
                listed.insert(0, "/".into());
            }
            assert_eq!(walked, listed, "{pattern}");
        }
        assert_eq!(glob(&mut tree, "/w/../x"), Err(GlobError::DotDot));
    }

    #[test]
    fn component_matcher() {
        assert!(matches(b"*", b"anything"));
        assert!(matches(b"a*b*c", b"aXXbYYc"));
        assert!(!matches(b"a*b*c", b"aXXbYY"));
        assert!(matches(b"[a-c]x", b"bx"));
        assert!(!matches(b"[^a-c]x", b"bx"));
        assert!(matches(b"\\*", b"*"));
        assert!(!matches(b"\\*", b"a"));
        assert!(matches(b"[", b"["));
        assert!(matches(b"[]]", b"]"));
    }
}
