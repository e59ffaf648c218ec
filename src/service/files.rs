//! Files inside a sandbox. Paths are normalised here (lexically, clamped at
//! the sandbox root); the providers then keep every access inside the
//! sandbox even through symlinks.

use bytes::Bytes;

use super::{Error, Result, Service};
use crate::auth::Caller;
use crate::provider::FileEntry;

/// A file to write.
#[derive(Debug, Clone)]
pub struct FileWrite {
    pub path: String,
    pub content: Bytes,
    /// Octal text such as "0644"; defaults to 0644.
    pub mode: Option<String>,
}

const MAX_PATH_BYTES: usize = 4096;

/// How file content travels in a JSON or GraphQL text field: as text
/// (UTF-8, what the SDKs send) or base64 (any bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentEncoding {
    #[default]
    Text,
    Base64,
}

impl ContentEncoding {
    /// `utf-8` (or `text`) and `base64`, as REST's `encoding` field takes them.
    pub fn parse(name: &str) -> Result<ContentEncoding> {
        match name.to_ascii_lowercase().as_str() {
            "" | "utf-8" | "utf8" | "text" => Ok(ContentEncoding::Text),
            "base64" => Ok(ContentEncoding::Base64),
            other => Err(Error::BadRequest(format!(
                "encoding must be utf-8 or base64, not {other:?}"
            ))),
        }
    }

    /// The bytes a text field carries.
    pub fn decode(self, content: String) -> Result<Bytes> {
        use base64::Engine;
        match self {
            ContentEncoding::Text => Ok(Bytes::from(content)),
            ContentEncoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(content.trim())
                .map(Bytes::from)
                .map_err(|e| Error::BadRequest(format!("content is not valid base64: {e}"))),
        }
    }

    /// `bytes` as a text field; text must be UTF-8 (binary asks for base64).
    pub fn encode(self, bytes: &[u8]) -> Result<String> {
        use base64::Engine;
        match self {
            ContentEncoding::Text => String::from_utf8(bytes.to_vec()).map_err(|_| {
                Error::BadRequest(
                    "the file is not UTF-8 text; read it as base64 (or as raw bytes over REST)"
                        .into(),
                )
            }),
            ContentEncoding::Base64 => Ok(base64::engine::general_purpose::STANDARD.encode(bytes)),
        }
    }
}

/// Resolves `.` and `..` in an absolute path lexically, never above `/`.
/// A relative path is refused: the providers have no common working
/// directory to resolve it against, and guessing `/` wrote files where
/// nobody looked.
pub(crate) fn normalize_path(path: &str) -> Result<String> {
    if path.is_empty() {
        return Err(Error::BadRequest("path is required".into()));
    }
    if path.len() > MAX_PATH_BYTES || path.contains('\0') {
        return Err(Error::BadRequest("invalid path".into()));
    }
    if !path.starts_with('/') {
        return Err(Error::BadRequest(format!(
            "path must be absolute (start with /), got {path:?}"
        )));
    }
    Ok(crate::provider::resolve_lexically(path))
}

/// Kernel file systems in a sandbox: readable, but nothing written there is
/// a file (docker's archive API even answered success for `/proc/x` and
/// kept nothing).
const KERNEL_DIRS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// [`normalize_path`] for a change: never `/` itself, never in a kernel
/// file system.
pub(crate) fn writable_path(path: &str, what: &str) -> Result<String> {
    let path = normalize_path(path)?;
    if path == "/" {
        return Err(Error::BadRequest(format!("cannot {what} /")));
    }
    if let Some(dir) = KERNEL_DIRS
        .iter()
        .find(|d| path == **d || path.starts_with(&format!("{d}/")))
    {
        return Err(Error::BadRequest(format!(
            "cannot {what} {path}: {dir} is the kernel's, not a file system of the sandbox"
        )));
    }
    Ok(path)
}

/// Parses permission bits written in octal ("644", "0755", "0o600").
pub(crate) fn parse_mode(mode: &str) -> Result<u32> {
    let digits = mode.strip_prefix("0o").unwrap_or(mode);
    let bits = u32::from_str_radix(digits, 8)
        .ok()
        .filter(|bits| !digits.is_empty() && *bits <= 0o7777)
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "invalid mode {mode:?}: expected octal permission bits such as \"0644\""
            ))
        })?;
    Ok(bits)
}

impl Service {
    async fn file_target(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(
        std::sync::Arc<dyn crate::worker::Worker>,
        crate::worker::RuntimeRef,
    )> {
        let (_, worker, runtime) = self.sandbox_runtime(caller, id).await?;
        Ok((worker, runtime))
    }

    /// Writes a file, creating parent directories.
    pub async fn write_file(&self, caller: &Caller, id: &str, write: FileWrite) -> Result<()> {
        let outcome = async {
            self.require_write(caller)?;
            let path = writable_path(&write.path, "write")?;
            let mode = match write.mode.as_deref() {
                None | Some("") => 0o644,
                Some(m) => parse_mode(m)?,
            };
            let (worker, runtime) = self.file_target(caller, id).await?;
            Ok(worker
                .write_file(&runtime, &path, write.content, mode)
                .await?)
        }
        .await;
        self.audit(
            caller,
            super::AuditAction::FileWrite,
            id,
            outcome.as_ref().map(drop),
        )
        .await;
        outcome
    }

    /// Reads a whole file.
    pub async fn read_file(&self, caller: &Caller, id: &str, path: &str) -> Result<Bytes> {
        let path = normalize_path(path)?;
        let (worker, runtime) = self.file_target(caller, id).await?;
        Ok(worker.read_file(&runtime, &path).await?)
    }

    /// Lists a directory.
    pub async fn list_files(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
    ) -> Result<Vec<FileEntry>> {
        let path = normalize_path(if path.is_empty() { "/" } else { path })?;
        let (worker, runtime) = self.file_target(caller, id).await?;
        Ok(worker.list_files(&runtime, &path).await?)
    }

    /// Describes one file.
    pub async fn stat_file(&self, caller: &Caller, id: &str, path: &str) -> Result<FileEntry> {
        let path = normalize_path(path)?;
        let (worker, runtime) = self.file_target(caller, id).await?;
        Ok(worker.stat_file(&runtime, &path).await?)
    }

    /// Renames a file or directory.
    pub async fn move_file(&self, caller: &Caller, id: &str, from: &str, to: &str) -> Result<()> {
        let outcome = async {
            self.require_write(caller)?;
            let from = writable_path(from, "move")?;
            let to = writable_path(to, "move to")?;
            let (worker, runtime) = self.file_target(caller, id).await?;
            Ok(worker.move_file(&runtime, &from, &to).await?)
        }
        .await;
        self.audit(
            caller,
            super::AuditAction::FileMove,
            id,
            outcome.as_ref().map(drop),
        )
        .await;
        outcome
    }

    /// Changes permission bits.
    pub async fn chmod_file(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
        mode: &str,
    ) -> Result<()> {
        let outcome = async {
            self.require_write(caller)?;
            let path = writable_path(path, "chmod")?;
            let mode = parse_mode(mode)?;
            let (worker, runtime) = self.file_target(caller, id).await?;
            Ok(worker.chmod_file(&runtime, &path, mode).await?)
        }
        .await;
        self.audit(
            caller,
            super::AuditAction::FileChmod,
            id,
            outcome.as_ref().map(drop),
        )
        .await;
        outcome
    }

    /// Deletes a file, or a directory (non-empty ones only with `recursive`).
    pub async fn delete_file(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
        recursive: bool,
    ) -> Result<()> {
        let outcome = async {
            self.require_write(caller)?;
            let path = writable_path(path, "delete")?;
            let (worker, runtime) = self.file_target(caller, id).await?;
            Ok(worker.delete_file(&runtime, &path, recursive).await?)
        }
        .await;
        self.audit(
            caller,
            super::AuditAction::FileDelete,
            id,
            outcome.as_ref().map(drop),
        )
        .await;
        outcome
    }

    /// Paths matching a glob pattern.
    pub async fn glob_files(
        &self,
        caller: &Caller,
        id: &str,
        pattern: &str,
    ) -> Result<Vec<String>> {
        if pattern.is_empty() || pattern.contains('\0') || pattern.len() > MAX_PATH_BYTES {
            return Err(Error::BadRequest("pattern is required".into()));
        }
        let pattern = if pattern.starts_with('/') {
            pattern.to_string()
        } else {
            format!("/{pattern}")
        };
        let (worker, runtime) = self.file_target(caller, id).await?;
        Ok(worker.glob_files(&runtime, &pattern).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_never_climb_above_root() {
        let n = |p: &str| normalize_path(p).unwrap_or_default();
        assert_eq!(n("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(n("/tmp/../../x"), "/x");
        assert_eq!(n("/a/./b//c/"), "/a/b/c");
        assert_eq!(n("/.."), "/");
        assert!(normalize_path("").is_err());
        assert!(normalize_path("/a\0b").is_err());
        for relative in ["a.txt", "./a", "../etc/passwd", "tmp/x"] {
            let e = normalize_path(relative).expect_err(relative);
            assert!(e.to_string().contains("absolute"), "{e}");
        }
    }

    #[test]
    fn changes_stay_out_of_root_and_kernel_file_systems() {
        for bad in [
            "/",
            "/proc/x",
            "/proc",
            "/sys/kernel/x",
            "/dev/null",
            "/tmp/../proc/1",
        ] {
            assert!(writable_path(bad, "write").is_err(), "{bad}");
        }
        for ok in ["/tmp/x", "/procfile", "/devices/x", "/workspace/sys"] {
            assert_eq!(writable_path(ok, "write").ok().as_deref(), Some(ok));
        }
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("0644").ok(), Some(0o644));
        assert_eq!(parse_mode("755").ok(), Some(0o755));
        assert_eq!(parse_mode("0o600").ok(), Some(0o600));
        for bad in ["", "rwx", "999", "77777", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }
}
