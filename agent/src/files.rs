//! The file API of a microVM, answered by its agent on the VM's own
//! filesystem. The VM is the boundary: paths resolve as the sandbox's
//! root sees them, symlinks included, and nothing outside the VM exists
//! here to be reached.

use std::fs;
use std::io::{self, Read, Write as _};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use stacyvm_agent::{Entry, Failure, FileOp, Frame};

/// Content of one `Data` frame of a read.
const READ_CHUNK: usize = 256 << 10;

/// The largest file a read sends (what the host takes at most).
const MAX_READ: u64 = 256 << 20;

/// The longest path an answer carries (the host's limit for a `Path`
/// frame); longer ones are left out.
const MAX_ANSWER_PATH: usize = 2 * stacyvm_agent::MAX_PATH;

/// A refusal: what the host maps to not found, invalid request or a
/// runtime error.
pub struct Refusal(pub Failure, pub String);

type Answer = Result<(), Refusal>;

fn refuse(e: io::Error, shown: &Path) -> Refusal {
    let shown = shown.display();
    let invalid = |why: &str| Refusal(Failure::Invalid, format!("{shown}: {why}"));
    match e.raw_os_error() {
        _ if e.kind() == io::ErrorKind::NotFound => Refusal(Failure::NoSuchFile, shown.to_string()),
        Some(libc::ENOTDIR) => invalid("a path component is not a directory"),
        Some(libc::EISDIR) => invalid("is a directory"),
        Some(libc::ENOTEMPTY) => invalid("directory not empty"),
        Some(libc::EEXIST) => invalid("already exists"),
        Some(libc::ELOOP) => invalid("too many levels of symbolic links"),
        Some(libc::EXDEV) => invalid("crosses a filesystem boundary"),
        Some(libc::EACCES | libc::EPERM) => invalid("permission denied"),
        Some(libc::ENAMETOOLONG) => invalid("name too long"),
        Some(libc::EINVAL) => invalid("invalid argument"),
        Some(libc::EROFS) => invalid("read-only file system"),
        Some(libc::ENOSPC | libc::EDQUOT) => invalid("no space left on the sandbox's disk"),
        Some(libc::ETXTBSY) => invalid("not a writable regular file"),
        _ => Refusal(Failure::Other, format!("{shown}: {e}")),
    }
}

fn path_of(bytes: &[u8]) -> Result<PathBuf, Refusal> {
    if bytes.first() != Some(&b'/') || bytes.contains(&0) {
        return Err(Refusal(
            Failure::Invalid,
            format!(
                "{:?} is not an absolute path",
                String::from_utf8_lossy(bytes)
            ),
        ));
    }
    Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes.to_vec())))
}

fn check_mode(mode: u32) -> Answer {
    if mode > 0o7777 {
        return Err(Refusal(
            Failure::Invalid,
            format!("mode {mode:o} is not a permission mode"),
        ));
    }
    Ok(())
}

fn entry(path: &Path, meta: &fs::Metadata) -> Entry {
    Entry {
        path: path.as_os_str().as_bytes().to_vec(),
        name: path
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_else(|| b"/".to_vec()),
        size: meta.len(),
        mode: meta.mode(),
        is_dir: meta.is_dir(),
        mtime: meta.mtime(),
    }
}

/// Answers every operation but a write, sending what it finds through
/// `send` (the caller adds `Done` or `Failed`). `stop` turns true when the
/// host cancelled the request or left: long answers end early then.
pub fn answer(
    op: FileOp,
    send: &mut dyn FnMut(Frame) -> io::Result<()>,
    stop: &dyn Fn() -> bool,
) -> Answer {
    let gone = |_| Refusal(Failure::Other, "the host went away".into());
    let cancelled = || Refusal(Failure::Other, "cancelled".into());
    match op {
        FileOp::Read { path } => {
            let path = path_of(&path)?;
            // Non-blocking: opening a FIFO must not wait for a writer.
            let mut file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .map_err(|e| refuse(e, &path))?;
            let meta = file.metadata().map_err(|e| refuse(e, &path))?;
            if meta.is_dir() {
                return Err(refuse(io::Error::from_raw_os_error(libc::EISDIR), &path));
            }
            if !meta.is_file() {
                return Err(Refusal(
                    Failure::Invalid,
                    format!("{}: not a regular file", path.display()),
                ));
            }
            if meta.len() > MAX_READ {
                return Err(Refusal(
                    Failure::Invalid,
                    format!(
                        "{}: larger than {} MiB, the most one read returns",
                        path.display(),
                        MAX_READ >> 20
                    ),
                ));
            }
            let mut buf = vec![0u8; READ_CHUNK];
            let mut sent = 0u64;
            loop {
                if stop() {
                    return Err(cancelled());
                }
                let n = file.read(&mut buf).map_err(|e| refuse(e, &path))?;
                if n == 0 {
                    return Ok(());
                }
                sent += n as u64;
                if sent > MAX_READ {
                    return Err(Refusal(
                        Failure::Invalid,
                        format!(
                            "{}: grew past {} MiB while read",
                            path.display(),
                            MAX_READ >> 20
                        ),
                    ));
                }
                send(Frame::Data(buf[..n].to_vec())).map_err(gone)?;
            }
        }
        FileOp::Stat { path } => {
            let path = path_of(&path)?;
            let meta = fs::symlink_metadata(&path).map_err(|e| refuse(e, &path))?;
            send(Frame::Entry(entry(&path, &meta))).map_err(gone)
        }
        FileOp::List { path } => {
            let path = path_of(&path)?;
            let mut names: Vec<_> = fs::read_dir(&path)
                .map_err(|e| refuse(e, &path))?
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect();
            names.sort();
            for name in names {
                if stop() {
                    return Err(cancelled());
                }
                let child = path.join(&name);
                if child.as_os_str().len() > MAX_ANSWER_PATH {
                    continue;
                }
                // Gone since the listing: not part of the answer.
                if let Ok(meta) = fs::symlink_metadata(&child) {
                    send(Frame::Entry(entry(&child, &meta))).map_err(gone)?;
                }
            }
            Ok(())
        }
        FileOp::Move { from, to } => {
            let (from, to) = (path_of(&from)?, path_of(&to)?);
            fs::symlink_metadata(&from).map_err(|e| refuse(e, &from))?;
            fs::rename(&from, &to).map_err(|e| refuse(e, &to))
        }
        FileOp::Chmod { path, mode } => {
            let path = path_of(&path)?;
            check_mode(mode)?;
            // As elsewhere: a link's target is not changed through it.
            if fs::symlink_metadata(&path)
                .map_err(|e| refuse(e, &path))?
                .is_symlink()
            {
                return Err(Refusal(
                    Failure::Invalid,
                    format!("{}: is a symbolic link", path.display()),
                ));
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(|e| refuse(e, &path))
        }
        FileOp::Delete { path, recursive } => {
            let path = path_of(&path)?;
            if path == Path::new("/") {
                return Err(Refusal(Failure::Invalid, "/ cannot be deleted".into()));
            }
            let meta = fs::symlink_metadata(&path).map_err(|e| refuse(e, &path))?;
            if !meta.is_dir() {
                return fs::remove_file(&path).map_err(|e| refuse(e, &path));
            }
            if recursive {
                return fs::remove_dir_all(&path).map_err(|e| refuse(e, &path));
            }
            fs::remove_dir(&path).map_err(|e| match e.raw_os_error() {
                Some(libc::ENOTEMPTY | libc::EEXIST) => Refusal(
                    Failure::Invalid,
                    format!(
                        "{} is a non-empty directory; delete it recursively",
                        path.display()
                    ),
                ),
                _ => refuse(e, &path),
            })
        }
        FileOp::Glob { pattern } => {
            let pattern = String::from_utf8(pattern)
                .map_err(|_| Refusal(Failure::Invalid, "a glob pattern must be UTF-8".into()))?;
            let found = stacyvm_agent::glob::glob(&mut Tree(stop), &pattern)
                .map_err(|e| Refusal(Failure::Invalid, e.to_string()))?;
            if stop() {
                return Err(cancelled());
            }
            for path in found.into_iter().filter(|p| p.len() <= MAX_ANSWER_PATH) {
                send(Frame::Path(path.into_bytes())).map_err(gone)?;
            }
            Ok(())
        }
        FileOp::Write { .. } => Err(Refusal(
            Failure::Other,
            "a write carries its content".into(),
        )),
    }
}

/// The VM's own tree, as the shared glob walks it; empty once the request
/// is cancelled, which ends the walk.
struct Tree<'a>(&'a dyn Fn() -> bool);

fn joined(parts: &[String]) -> PathBuf {
    PathBuf::from(format!("/{}", parts.join("/")))
}

impl stacyvm_agent::glob::Tree for Tree<'_> {
    fn children(&mut self, dir: &[String]) -> Vec<(String, bool)> {
        if (self.0)() {
            return Vec::new();
        }
        let Ok(entries) = fs::read_dir(joined(dir)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                Some((name, is_dir))
            })
            .collect()
    }

    fn exists(&mut self, path: &[String]) -> bool {
        fs::symlink_metadata(joined(path)).is_ok()
    }
}

/// A write in progress: its content goes to a hidden file beside the
/// target, renamed over it at the end, so a reader never sees half of it.
pub struct Upload {
    target: PathBuf,
    temp: PathBuf,
    file: fs::File,
    mode: u32,
    /// The first failure, reported at the end (the host sends on).
    failed: Option<Refusal>,
}

impl Upload {
    pub fn open(path: &[u8], mode: u32, tag: u64) -> Result<Upload, Refusal> {
        let target = path_of(path)?;
        check_mode(mode)?;
        let parent = target
            .parent()
            .ok_or_else(|| Refusal(Failure::Invalid, "/ is a directory".into()))?;
        fs::create_dir_all(parent).map_err(|e| refuse(e, parent))?;
        if fs::metadata(&target).is_ok_and(|m| m.is_dir()) {
            return Err(refuse(io::Error::from_raw_os_error(libc::EISDIR), &target));
        }
        // Short, whatever the target's name: any legal name can be written.
        let temp = parent.join(format!(".stacyvm-w-{tag:x}-{}", std::process::id()));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| refuse(e, &target))?;
        Ok(Upload {
            target,
            temp,
            file,
            mode,
            failed: None,
        })
    }

    pub fn data(&mut self, data: &[u8]) {
        if self.failed.is_none()
            && let Err(e) = self.file.write_all(data)
        {
            self.failed = Some(refuse(e, &self.target));
        }
    }

    pub fn finish(self) -> Answer {
        let result = match &self.failed {
            Some(Refusal(why, message)) => Err(Refusal(*why, message.clone())),
            None => self
                .file
                .set_permissions(fs::Permissions::from_mode(self.mode))
                .and_then(|()| fs::rename(&self.temp, &self.target))
                .map_err(|e| refuse(e, &self.target)),
        };
        if result.is_err() {
            self.abandon_temp();
        }
        result
    }

    /// The write will not finish (its session ended, it failed).
    pub fn abandon(self) {
        self.abandon_temp();
    }

    fn abandon_temp(&self) {
        if let Err(e) = fs::remove_file(&self.temp)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("stacyvm-agent: cannot remove {}: {e}", self.temp.display());
        }
    }
}
