//! The files half of the provider contract for sandboxes whose root
//! filesystem is a plain directory on the host (`native`, `proot`).
//!
//! Every path comes from a client and the tree is writable by code running
//! in the sandbox, so the tree may contain any symlink at any moment. The
//! one rule this module exists to keep: nothing a client names ever resolves
//! outside the sandbox root. It does so without string checks on resolved
//! paths (those are racy) by letting the kernel do the resolution:
//!
//! * a client path is first normalised lexically (`..` clamps at `/`, as in
//!   a chroot), so the last component is always a plain name;
//! * directories are opened with `openat2(RESOLVE_IN_ROOT |
//!   RESOLVE_NO_MAGICLINKS)` from a descriptor of the root, so `..` and
//!   absolute or relative symlinks inside the tree resolve as if the root
//!   were `/`, even when the tree changes during the call;
//! * the last component is then handled with `*at` calls relative to that
//!   directory descriptor with `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW`, so
//!   mutations act on the link itself and never through it. Reads and
//!   directory listings follow in-root symlinks (the kernel still contains
//!   them), because that is what `cat` inside the sandbox would see.

use std::ffi::CStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rustix::fs::{
    AtFlags, CWD, Dir, FileType, Mode, OFlags, ResolveFlags, Stat, fstat, linkat, mkdirat, openat,
    openat2, renameat, statat, unlinkat,
};
use rustix::io::Errno;

use super::{FileEntry, ProviderError, ProviderResult};

/// How often a resolution interrupted by a concurrent rename is retried
/// before giving up (the kernel reports EAGAIN in that case).
const RESOLVE_RETRIES: usize = 16;

/// Prefix of the hidden name a write gives its new content just before
/// renaming it over the target.
const WRITE_TEMP_PREFIX: &str = ".stacyvm-write-";

/// How many random temporary names a write tries before giving up (a
/// clash means something else created that very name first).
const TEMP_NAME_ATTEMPTS: usize = 8;

/// The crash point a chaos test arms to kill the server after a write's
/// content is durable but before it has any name.
const WRITE_FAILPOINT: &str = "files.write.before_commit";

/// Sandbox files rooted at a host directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HostFs {
    root: PathBuf,
    /// When set, only paths under these top-level directories may be
    /// touched (the `host` image exposes just `/workspace` and `/tmp`).
    only_under: Option<Vec<String>>,
    /// Host uid and gid given to what writes create (the sandbox root's
    /// ids when the sandbox has a user-id range); `None`: the server's.
    owner: Option<(u32, u32)>,
}

impl HostFs {
    /// Files of the tree at `root`, which plays the part of `/`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            only_under: None,
            owner: None,
        }
    }

    /// Like [`HostFs::new`], but refuse (InvalidRequest) any path that is
    /// not inside one of the top-level directories `tops` (e.g.
    /// `["workspace", "tmp"]`).
    pub fn restricted(root: impl Into<PathBuf>, tops: &[&str]) -> Self {
        Self {
            root: root.into(),
            only_under: Some(tops.iter().map(|t| t.to_string()).collect()),
            owner: None,
        }
    }

    /// Files and directories that writes create belong to host `uid` and
    /// `gid` (what the sandbox's root maps to).
    pub fn with_owner(mut self, uid: u32, gid: u32) -> Self {
        self.owner = Some((uid, gid));
        self
    }

    /// The host directory that plays `/`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Write a whole file with exactly `mode`, creating missing parent
    /// directories (0755). A symlink or non-file at the path is refused.
    ///
    /// The write is atomic, also across a crash of the server: the content
    /// goes into a new, unnamed file, is synced, and is then renamed over
    /// the path, so the path always holds either the old or the new
    /// content in full. The price is that an existing file is replaced by
    /// a new inode rather than rewritten: hard links to the old file keep
    /// the old content, and the new file is owned by the sandbox's root
    /// (see [`HostFs::with_owner`]; else the server's uid) and has no
    /// extended attributes of the old one.
    pub async fn write(&self, path: &str, content: Bytes, mode: u32) -> ProviderResult<()> {
        let path = path.to_string();
        self.blocking(move |fs| fs.write_sync(&path, &content, mode))
            .await
    }

    /// Read a whole regular file.
    pub async fn read(&self, path: &str) -> ProviderResult<Bytes> {
        let path = path.to_string();
        self.blocking(move |fs| fs.read_sync(&path)).await
    }

    /// List a directory, sorted by name.
    pub async fn list(&self, path: &str) -> ProviderResult<Vec<FileEntry>> {
        let path = path.to_string();
        self.blocking(move |fs| fs.list_sync(&path)).await
    }

    /// Describe one path (a symlink is described, not followed).
    pub async fn stat(&self, path: &str) -> ProviderResult<FileEntry> {
        let path = path.to_string();
        self.blocking(move |fs| fs.stat_sync(&path)).await
    }

    /// Rename `from` to `to` (both inside the sandbox).
    pub async fn rename(&self, from: &str, to: &str) -> ProviderResult<()> {
        let (from, to) = (from.to_string(), to.to_string());
        self.blocking(move |fs| fs.rename_sync(&from, &to)).await
    }

    /// Set permission bits (at most 0o7777); symlinks are refused.
    pub async fn chmod(&self, path: &str, mode: u32) -> ProviderResult<()> {
        let path = path.to_string();
        self.blocking(move |fs| fs.chmod_sync(&path, mode)).await
    }

    /// Delete a file or symlink, or a directory (non-empty only with
    /// `recursive`). Deleting `/` is refused.
    pub async fn delete(&self, path: &str, recursive: bool) -> ProviderResult<()> {
        let path = path.to_string();
        self.blocking(move |fs| fs.delete_sync(&path, recursive))
            .await
    }

    /// Absolute sandbox paths matching a shell glob (`*`, `?`, `[...]`, and
    /// `**` for any number of directories), sorted. Wildcards never descend
    /// into symlinked directories.
    pub async fn glob(&self, pattern: &str) -> ProviderResult<Vec<String>> {
        let pattern = pattern.to_string();
        self.blocking(move |fs| fs.glob_sync(&pattern)).await
    }

    /// Find `program` the way `execvp` inside the sandbox would: a name
    /// with a `/` is returned unchanged; otherwise the first executable
    /// regular file named `program` in the `:`-separated `path_var`.
    pub fn find_executable(&self, program: &str, path_var: &str) -> Option<String> {
        if program.contains('/') {
            return Some(program.to_string());
        }
        if program.is_empty() || program == "." || program == ".." {
            return None;
        }
        let root = self.open_root().ok()?;
        for dir in path_var.split(':').filter(|d| d.starts_with('/')) {
            let candidate = format!("{}/{program}", dir.trim_end_matches('/'));
            let Ok(fd) = resolve(&root, candidate.trim_start_matches('/'), OFlags::PATH) else {
                continue;
            };
            let Ok(st) = fstat(&fd) else { continue };
            if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                && st.st_mode & 0o111 != 0
            {
                return Some(candidate);
            }
        }
        None
    }

    async fn blocking<T, F>(&self, f: F) -> ProviderResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&HostFs) -> ProviderResult<T> + Send + 'static,
    {
        let fs = self.clone();
        tokio::task::spawn_blocking(move || f(&fs))
            .await
            .map_err(|e| ProviderError::Runtime(format!("file operation failed: {e}")))?
    }

    fn open_root(&self) -> ProviderResult<OwnedFd> {
        rustix::fs::open(
            &self.root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ProviderError::Runtime(format!("sandbox filesystem unavailable: {e}")))
    }

    /// Normalise a client path and apply the top-level restriction.
    fn parse(&self, path: &str) -> ProviderResult<SandboxPath> {
        let parsed = SandboxPath::parse(path)?;
        if let Some(tops) = &self.only_under
            && !parsed
                .parts
                .first()
                .is_some_and(|first| tops.iter().any(|t| t == first))
        {
            return Err(ProviderError::InvalidRequest(format!(
                "{}: only {} can be accessed in this sandbox",
                parsed.display(),
                tops.iter()
                    .map(|t| format!("/{t}"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            )));
        }
        Ok(parsed)
    }

    fn write_sync(&self, path: &str, content: &[u8], mode: u32) -> ProviderResult<()> {
        check_mode(mode)?;
        let p = self.parse(path)?;
        let shown = p.display();
        let (parent_parts, name) = p.split_last()?;
        let root = self.open_root()?;
        // Create the parents one level at a time, each resolved from the
        // root, so that a symlink met on the way is contained like any other.
        for depth in 0..parent_parts.len() {
            let dir =
                resolve_dir(&root, &parent_parts[..depth]).map_err(|e| map_errno(e, &shown))?;
            match mkdirat(
                &dir,
                parent_parts[depth].as_str(),
                Mode::from_raw_mode(0o755),
            ) {
                Ok(()) => {
                    if let Some(owner) = self.owner {
                        chown_at(&dir, parent_parts[depth].as_str(), owner)
                            .map_err(|e| map_errno(e, &shown))?;
                    }
                }
                Err(Errno::EXIST) => {}
                Err(e) => return Err(map_errno(e, &shown)),
            }
        }
        let parent = resolve_dir(&root, parent_parts).map_err(|e| map_errno(e, &shown))?;
        // An existing entry must be a regular file. Look at it without
        // opening it for real (opening a FIFO or device has side effects).
        match openat(
            &parent,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(probe) => require_regular(&probe, &shown)?,
            Err(Errno::NOENT) => {}
            Err(e) => return Err(map_errno(e, &shown)),
        }
        let mode = Mode::from_raw_mode(mode);
        match openat(
            &parent,
            ".",
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            mode,
        ) {
            Ok(fd) => write_unnamed(&parent, name, fd, content, (mode, self.owner), &shown),
            // The filesystem cannot make unnamed files (old kernels report
            // EISDIR, some filesystems EINVAL).
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
                write_named(&parent, name, content, (mode, self.owner), &shown)
            }
            Err(e) => Err(map_errno(e, &shown)),
        }
    }

    fn read_sync(&self, path: &str) -> ProviderResult<Bytes> {
        let p = self.parse(path)?;
        let shown = p.display();
        let root = self.open_root()?;
        let probe =
            resolve(&root, &p.relative(), OFlags::PATH).map_err(|e| map_errno(e, &shown))?;
        require_regular(&probe, &shown)?;
        let fd = reopen(&probe, OFlags::RDONLY).map_err(|e| map_errno(e, &shown))?;
        let mut buf = Vec::new();
        std::fs::File::from(fd)
            .read_to_end(&mut buf)
            .map_err(|e| ProviderError::Runtime(format!("{shown}: {e}")))?;
        Ok(Bytes::from(buf))
    }

    fn list_sync(&self, path: &str) -> ProviderResult<Vec<FileEntry>> {
        let p = self.parse(path)?;
        let shown = p.display();
        let root = self.open_root()?;
        let dir = resolve(&root, &p.relative(), OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(|e| map_errno(e, &shown))?;
        let mut entries = Vec::new();
        for name in read_names(&dir).map_err(|e| map_errno(e, &shown))? {
            // An entry removed between readdir and stat is simply skipped.
            let Ok(st) = statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            entries.push(entry_from_stat(&p.child(&name).display(), name, &st));
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    fn stat_sync(&self, path: &str) -> ProviderResult<FileEntry> {
        let p = self.parse(path)?;
        let shown = p.display();
        let root = self.open_root()?;
        let Some((name, parent_parts)) = p.parts.split_last() else {
            let st = fstat(&root).map_err(|e| map_errno(e, &shown))?;
            return Ok(entry_from_stat("/", "/".into(), &st));
        };
        let parent = resolve_dir(&root, parent_parts).map_err(|e| map_errno(e, &shown))?;
        let st = statat(&parent, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| map_errno(e, &shown))?;
        Ok(entry_from_stat(&shown, name.clone(), &st))
    }

    fn rename_sync(&self, from: &str, to: &str) -> ProviderResult<()> {
        let (src, dst) = (self.parse(from)?, self.parse(to)?);
        let (src_parent, src_name) = src.split_last()?;
        let (dst_parent, dst_name) = dst.split_last()?;
        let root = self.open_root()?;
        let src_dir = resolve_dir(&root, src_parent).map_err(|e| map_errno(e, &src.display()))?;
        let dst_dir = resolve_dir(&root, dst_parent).map_err(|e| map_errno(e, &dst.display()))?;
        // renameat never follows a symlink in either last component.
        renameat(&src_dir, src_name, &dst_dir, dst_name).map_err(|e| match e {
            Errno::NOENT => ProviderError::FileNotFound(src.display()),
            e => map_errno(e, &format!("{} -> {}", src.display(), dst.display())),
        })
    }

    fn chmod_sync(&self, path: &str, mode: u32) -> ProviderResult<()> {
        check_mode(mode)?;
        let p = self.parse(path)?;
        let shown = p.display();
        let (parent_parts, name) = p.split_last()?;
        let root = self.open_root()?;
        let parent = resolve_dir(&root, parent_parts).map_err(|e| map_errno(e, &shown))?;
        let fd = openat(
            &parent,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| map_errno(e, &shown))?;
        let st = fstat(&fd).map_err(|e| map_errno(e, &shown))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            return Err(ProviderError::InvalidRequest(format!(
                "{shown} is a symbolic link"
            )));
        }
        // fchmod does not accept O_PATH descriptors; chmod through our own
        // /proc/self/fd entry reaches exactly the inode we hold.
        rustix::fs::chmod(proc_fd_path(&fd), Mode::from_raw_mode(mode))
            .map_err(|e| map_errno(e, &shown))
    }

    fn delete_sync(&self, path: &str, recursive: bool) -> ProviderResult<()> {
        let p = self.parse(path)?;
        let shown = p.display();
        let (parent_parts, name) = p.split_last()?;
        let root = self.open_root()?;
        let parent = resolve_dir(&root, parent_parts).map_err(|e| map_errno(e, &shown))?;
        let st =
            statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| map_errno(e, &shown))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return unlinkat(&parent, name, AtFlags::empty()).map_err(|e| map_errno(e, &shown));
        }
        if recursive {
            remove_tree(&parent, name).map_err(|e| map_errno(e, &shown))
        } else {
            unlinkat(&parent, name, AtFlags::REMOVEDIR).map_err(|e| match e {
                Errno::NOTEMPTY | Errno::EXIST => ProviderError::InvalidRequest(format!(
                    "{shown} is a non-empty directory; delete it recursively"
                )),
                e => map_errno(e, &shown),
            })
        }
    }

    fn glob_sync(&self, pattern: &str) -> ProviderResult<Vec<String>> {
        if pattern.split('/').any(|part| part == "..") {
            return Err(ProviderError::InvalidRequest(
                "glob patterns may not contain ..".into(),
            ));
        }
        let p = SandboxPath::parse(pattern)?;
        if let Some(tops) = &self.only_under
            && !p.parts.first().is_some_and(|first| tops.contains(first))
        {
            // Check with the same message as every other call.
            self.parse(pattern)?;
        }
        let root = self.open_root()?;
        stacyvm_agent::glob::glob(&mut FdTree(&root), &format!("/{}", p.parts.join("/")))
            .map_err(|e| ProviderError::InvalidRequest(e.to_string()))
    }
}

/// A lexically normalised path inside the sandbox: plain names only.
#[derive(Debug, Clone)]
struct SandboxPath {
    parts: Vec<String>,
}

impl SandboxPath {
    /// Relative paths are taken relative to `/`; `..` stops at `/`.
    fn parse(path: &str) -> ProviderResult<Self> {
        if path.is_empty() {
            return Err(ProviderError::InvalidRequest("empty path".into()));
        }
        if path.contains('\0') {
            return Err(ProviderError::InvalidRequest(
                "path contains a NUL byte".into(),
            ));
        }
        let mut parts: Vec<String> = Vec::new();
        for part in path.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                name => parts.push(name.to_string()),
            }
        }
        Ok(Self { parts })
    }

    fn display(&self) -> String {
        format!("/{}", self.parts.join("/"))
    }

    /// The form openat2 wants relative to the root descriptor.
    fn relative(&self) -> String {
        if self.parts.is_empty() {
            ".".into()
        } else {
            self.parts.join("/")
        }
    }

    fn child(&self, name: &str) -> Self {
        let mut parts = self.parts.clone();
        parts.push(name.to_string());
        Self { parts }
    }

    /// Parent parts and last name; `/` itself has no name to act on.
    fn split_last(&self) -> ProviderResult<(&[String], &str)> {
        match self.parts.split_last() {
            Some((name, parent)) => Ok((parent, name.as_str())),
            None => Err(ProviderError::InvalidRequest(
                "this operation is not allowed on /".into(),
            )),
        }
    }
}

/// Open `relative` (relative to the root descriptor) with every step of
/// the resolution held inside the root by the kernel.
fn resolve(root: &OwnedFd, relative: &str, flags: OFlags) -> Result<OwnedFd, Errno> {
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let mut attempt = 0;
    loop {
        match openat2(root, relative, flags | OFlags::CLOEXEC, Mode::empty(), how) {
            // EAGAIN: a rename raced with the lookup; the kernel refused to
            // guess, so try again.
            Err(Errno::AGAIN) if attempt < RESOLVE_RETRIES => attempt += 1,
            other => return other,
        }
    }
}

fn resolve_dir(root: &OwnedFd, parts: &[String]) -> Result<OwnedFd, Errno> {
    let relative = if parts.is_empty() {
        ".".to_string()
    } else {
        parts.join("/")
    };
    resolve(root, &relative, OFlags::PATH | OFlags::DIRECTORY)
}

fn proc_fd_path(fd: impl AsFd) -> String {
    format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd())
}

/// A fresh hidden name for a write's content before it is committed.
fn temp_name() -> String {
    format!("{WRITE_TEMP_PREFIX}{}", uuid::Uuid::new_v4().as_simple())
}

/// Give `fd` exactly `mode` (the create mode was filtered by the umask),
/// write `content` into it, and make the data durable.
fn fill(fd: OwnedFd, content: &[u8], perms: Perms, shown: &str) -> ProviderResult<std::fs::File> {
    let (mode, owner) = perms;
    // Owner first: chown clears set-id bits, the mode then sets them.
    if let Some((uid, gid)) = owner {
        rustix::fs::fchown(
            &fd,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .map_err(|e| map_errno(e, shown))?;
    }
    rustix::fs::fchmod(&fd, mode).map_err(|e| map_errno(e, shown))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(content)
        .and_then(|()| file.sync_all())
        .map_err(|e| ProviderError::Runtime(format!("{shown}: {e}")))?;
    Ok(file)
}

/// The mode a written file gets, and its owner when not the server.
type Perms = (Mode, Option<(u32, u32)>);

/// Give the entry `name` of `dir` (not following a symlink) this owner.
fn chown_at(dir: &OwnedFd, name: &str, (uid, gid): (u32, u32)) -> Result<(), Errno> {
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
}

/// Commit a write through an `O_TMPFILE` descriptor `fd` of `parent`: the
/// content has no name until it is complete and durable, so a crash at any
/// earlier point leaves nothing behind.
fn write_unnamed(
    parent: &OwnedFd,
    name: &str,
    fd: OwnedFd,
    content: &[u8],
    perms: Perms,
    shown: &str,
) -> ProviderResult<()> {
    let file = fill(fd, content, perms, shown)?;
    crate::failpoint::hit(WRITE_FAILPOINT);
    let temp = link_unnamed(&file, parent).map_err(|e| map_errno(e, shown))?;
    drop(file);
    replace(parent, &temp, name, shown)
}

/// Commit a write through a hidden named file, for filesystems without
/// `O_TMPFILE`. The name is removed on every error; only a crash between
/// its creation and the rename can leave it behind.
fn write_named(
    parent: &OwnedFd,
    name: &str,
    content: &[u8],
    perms: Perms,
    shown: &str,
) -> ProviderResult<()> {
    let (temp, fd) = create_temp(parent, perms.0).map_err(|e| map_errno(e, shown))?;
    match fill(fd, content, perms, shown) {
        Ok(file) => drop(file),
        Err(e) => {
            super::best_effort(
                "removing the temporary file of a failed write",
                unlinkat(parent, temp.as_str(), AtFlags::empty()),
            );
            return Err(e);
        }
    }
    crate::failpoint::hit(WRITE_FAILPOINT);
    replace(parent, &temp, name, shown)
}

/// Create a new regular file under a fresh hidden name in `parent`.
fn create_temp(parent: &OwnedFd, mode: Mode) -> Result<(String, OwnedFd), Errno> {
    let mut last = Errno::EXIST;
    for _ in 0..TEMP_NAME_ATTEMPTS {
        let temp = temp_name();
        match openat(
            parent,
            temp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            mode,
        ) {
            Ok(fd) => return Ok((temp, fd)),
            Err(e @ Errno::EXIST) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Link the unnamed file `file` into `parent` under a fresh hidden name.
///
/// Linking through our own `/proc/self/fd` entry needs no privilege;
/// `AT_EMPTY_PATH` (which needs CAP_DAC_READ_SEARCH on most kernels) is
/// the fallback when that fails for another reason than a name clash.
fn link_unnamed(file: &impl AsFd, parent: &OwnedFd) -> Result<String, Errno> {
    let mut last = Errno::EXIST;
    for _ in 0..TEMP_NAME_ATTEMPTS {
        let temp = temp_name();
        let linked = match linkat(
            CWD,
            proc_fd_path(file),
            parent,
            temp.as_str(),
            AtFlags::SYMLINK_FOLLOW,
        ) {
            Err(e) if e != Errno::EXIST => {
                match linkat(file, "", parent, temp.as_str(), AtFlags::EMPTY_PATH) {
                    Ok(()) => Ok(()),
                    Err(Errno::EXIST) => Err(Errno::EXIST),
                    // Report why the unprivileged way failed.
                    Err(_) => Err(e),
                }
            }
            other => other,
        };
        match linked {
            Ok(()) => return Ok(temp),
            Err(e @ Errno::EXIST) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Atomically rename `temp` over `name` in `parent`; on failure the
/// temporary name is removed.
fn replace(parent: &OwnedFd, temp: &str, name: &str, shown: &str) -> ProviderResult<()> {
    // renameat never follows a symlink at either name, and replaces the
    // target in one step: readers see the old file or the new one.
    renameat(parent, temp, parent, name).map_err(|e| {
        super::best_effort(
            "removing the temporary file of a failed rename",
            unlinkat(parent, temp, AtFlags::empty()),
        );
        map_errno(e, shown)
    })
}

/// Open the inode behind an O_PATH descriptor with real access flags.
fn reopen(fd: &OwnedFd, flags: OFlags) -> Result<OwnedFd, Errno> {
    rustix::fs::open(proc_fd_path(fd), flags | OFlags::CLOEXEC, Mode::empty())
}

fn require_regular(fd: &OwnedFd, shown: &str) -> ProviderResult<()> {
    let st = fstat(fd).map_err(|e| map_errno(e, shown))?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => Ok(()),
        FileType::Directory => Err(ProviderError::InvalidRequest(format!(
            "{shown} is a directory"
        ))),
        FileType::Symlink => Err(ProviderError::InvalidRequest(format!(
            "{shown} is a symbolic link"
        ))),
        _ => Err(ProviderError::InvalidRequest(format!(
            "{shown} is not a regular file"
        ))),
    }
}

fn check_mode(mode: u32) -> ProviderResult<()> {
    if mode > 0o7777 {
        return Err(ProviderError::InvalidRequest(format!(
            "invalid mode {mode:o}: permission bits only (at most 7777)"
        )));
    }
    Ok(())
}

/// Names in a directory, without `.` and `..`.
fn read_names(dir: &impl AsFd) -> Result<Vec<String>, Errno> {
    let mut names = Vec::new();
    let mut reader = Dir::read_from(dir)?;
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        // The wire format is UTF-8 text; non-UTF-8 names are shown lossily
        // (and then cannot be addressed, which is the safe failure).
        names.push(String::from_utf8_lossy(bytes).into_owned());
    }
    Ok(names)
}

/// Remove `name` (a directory) under `parent` and everything below it,
/// never following symlinks: each level is opened with O_NOFOLLOW relative
/// to the level above.
fn remove_tree(parent: &impl AsFd, name: &str) -> Result<(), Errno> {
    let dir = openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for child in read_names(&dir)? {
        let st = match statat(&dir, child.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e),
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            remove_tree(&dir, &child)?;
        } else {
            match unlinkat(&dir, child.as_str(), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    unlinkat(parent, name, AtFlags::REMOVEDIR)
}

// Field types of `Stat` differ between architectures; the casts are
// no-ops on some of them.
#[allow(clippy::unnecessary_cast)]
fn entry_from_stat(path: &str, name: String, st: &Stat) -> FileEntry {
    let mod_time = chrono::DateTime::from_timestamp(st.st_mtime as i64, st.st_mtime_nsec as u32)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    FileEntry {
        path: path.to_string(),
        name,
        size: st.st_size as u64,
        mode: format!("{:o}", st.st_mode as u32 & 0o7777),
        is_dir: FileType::from_raw_mode(st.st_mode as _) == FileType::Directory,
        mod_time,
    }
}

/// Translate an errno into the contract's terms, naming the client's path.
fn map_errno(e: Errno, shown: &str) -> ProviderError {
    let invalid = |why: &str| ProviderError::InvalidRequest(format!("{shown}: {why}"));
    match e {
        Errno::NOENT => ProviderError::FileNotFound(shown.to_string()),
        Errno::NOTDIR => invalid("a path component is not a directory"),
        Errno::ISDIR => invalid("is a directory"),
        Errno::NOTEMPTY => invalid("directory not empty"),
        Errno::EXIST => invalid("already exists"),
        Errno::LOOP => invalid("is a symbolic link, or too many levels of symbolic links"),
        Errno::XDEV => invalid("crosses a filesystem boundary"),
        Errno::ACCESS | Errno::PERM => invalid("permission denied"),
        Errno::NAMETOOLONG => invalid("name too long"),
        Errno::INVAL => invalid("invalid argument"),
        Errno::ROFS => invalid("read-only file system"),
        Errno::NXIO | Errno::TXTBSY => invalid("not a writable regular file"),
        e => ProviderError::Runtime(format!("{shown}: {e}")),
    }
}

/// A sandbox tree as the shared glob walks it, through the opened root
/// (nothing resolves outside it).
struct FdTree<'a>(&'a OwnedFd);

impl stacyvm_agent::glob::Tree for FdTree<'_> {
    fn children(&mut self, dir: &[String]) -> Vec<(String, bool)> {
        let relative = if dir.is_empty() {
            ".".to_string()
        } else {
            dir.join("/")
        };
        let Ok(fd) = resolve(self.0, &relative, OFlags::RDONLY | OFlags::DIRECTORY) else {
            return Vec::new();
        };
        let Ok(names) = read_names(&fd) else {
            return Vec::new();
        };
        names
            .into_iter()
            .map(|name| {
                let is_dir = statat(&fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
                (name, is_dir)
            })
            .collect()
    }

    fn exists(&mut self, path: &[String]) -> bool {
        let Some((name, parent)) = path.split_last() else {
            return true;
        };
        resolve_dir(self.0, parent)
            .and_then(|p| statat(&p, name.as_str(), AtFlags::SYMLINK_NOFOLLOW))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::renameat_with;
    use std::os::unix::fs::symlink;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A sandbox root and a sibling "host" directory holding a secret that
    /// must never be reachable.
    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        fs: HostFs,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("secret"), "host secret").expect("write");
        std::fs::write(root.join("etc/passwd"), "sandbox passwd").expect("write");
        let fs = HostFs::new(&root);
        Fixture {
            _tmp: tmp,
            root,
            outside,
            fs,
        }
    }

    #[tokio::test]
    async fn dotdot_is_clamped_at_the_root() {
        let f = fixture();
        let data = f.fs.read("../../etc/passwd").await.expect("read");
        assert_eq!(&data[..], b"sandbox passwd");
        let data = f.fs.read("/etc/../../../etc/passwd").await.expect("read");
        assert_eq!(&data[..], b"sandbox passwd");
        f.fs.write("../../../../escaped", Bytes::from_static(b"x"), 0o644)
            .await
            .expect("write");
        assert!(f.root.join("escaped").exists());
        assert!(!f.outside.join("escaped").exists());
        assert!(!f.root.parent().expect("parent").join("escaped").exists());
    }

    #[tokio::test]
    async fn absolute_symlink_resolves_inside_the_root() {
        let f = fixture();
        let host_secret = f.outside.join("secret");
        symlink(&host_secret, f.root.join("abs")).expect("symlink");
        symlink("/etc/shadow", f.root.join("shadow")).expect("symlink");
        // Reading follows the link, but inside the root, where it dangles.
        assert!(matches!(
            f.fs.read("/abs").await,
            Err(ProviderError::FileNotFound(_))
        ));
        assert!(matches!(
            f.fs.read("/shadow").await,
            Err(ProviderError::FileNotFound(_))
        ));
        // Writing through the link is refused; the host file is untouched.
        assert!(
            f.fs.write("/abs", Bytes::from_static(b"pwned"), 0o644)
                .await
                .is_err()
        );
        assert_eq!(
            std::fs::read_to_string(&host_secret).expect("read"),
            "host secret"
        );
        // An absolute link to an in-root file behaves as in a chroot.
        symlink("/etc/passwd", f.root.join("pw")).expect("symlink");
        assert_eq!(
            &f.fs.read("/pw").await.expect("read")[..],
            b"sandbox passwd"
        );
    }

    #[tokio::test]
    async fn relative_symlink_pointing_out_is_contained() {
        let f = fixture();
        symlink("../outside/secret", f.root.join("rel")).expect("symlink");
        symlink("../../../../../../", f.root.join("up")).expect("symlink");
        assert!(f.fs.read("/rel").await.is_err());
        // `up` resolves to the sandbox root itself.
        let listing = f.fs.list("/up").await.expect("list");
        let names: Vec<_> = listing.iter().map(|e| e.name.as_str()).collect();
        assert!(
            names.contains(&"etc") && names.contains(&"rel"),
            "{names:?}"
        );
        assert!(f.fs.read("/up/outside/secret").await.is_err());
        assert!(f.fs.chmod("/rel", 0o777).await.is_err());
        f.fs.delete("/rel", false).await.expect("delete link");
        assert!(f.outside.join("secret").exists());
    }

    #[tokio::test]
    async fn symlinked_parent_directory_is_contained() {
        let f = fixture();
        symlink(&f.outside, f.root.join("absdir")).expect("symlink");
        symlink("../outside", f.root.join("reldir")).expect("symlink");
        for dir in ["/absdir", "/reldir"] {
            assert!(f.fs.read(&format!("{dir}/secret")).await.is_err());
            if let Ok(listing) = f.fs.list(dir).await {
                assert!(listing.iter().all(|e| e.name != "secret"), "{listing:?}");
            }
            // Writing under it creates directories inside the root, or fails.
            let _ =
                f.fs.write(&format!("{dir}/new"), Bytes::from_static(b"x"), 0o644)
                    .await;
            let _ = f.fs.delete(&format!("{dir}/secret"), true).await;
            let _ = f.fs.rename(&format!("{dir}/secret"), "/stolen").await;
            let _ = f.fs.chmod(&format!("{dir}/secret"), 0o777).await;
        }
        assert!(!f.outside.join("new").exists());
        assert!(f.outside.join("secret").exists());
        assert!(!f.root.join("stolen").exists());
        let mode = std::fs::metadata(f.outside.join("secret"))
            .expect("meta")
            .permissions();
        assert_ne!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o777
        );
        // Glob through the links finds nothing outside.
        assert!(f.fs.glob("/absdir/*").await.expect("glob").is_empty());
        assert!(
            !f.fs
                .glob("/**/secret")
                .await
                .expect("glob")
                .iter()
                .any(|p| p.contains("secret"))
        );
    }

    #[test]
    fn race_swapping_a_directory_for_a_symlink_never_escapes() {
        let f = fixture();
        let dir = f.root.join("d");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("f"), "inside").expect("write");
        std::fs::write(f.outside.join("f"), "host secret").expect("write");
        // `d` keeps flipping, atomically, between the real directory and a
        // symlink out of the root (absolute, then relative).
        let abs = f.root.join("d.abs");
        let rel = f.root.join("d.rel");
        symlink(&f.outside, &abs).expect("symlink");
        symlink("../outside", &rel).expect("symlink");
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (dir, abs, rel, stop) = (dir.clone(), abs.clone(), rel.clone(), stop.clone());
            std::thread::spawn(move || {
                let cwd = rustix::fs::CWD;
                let exchange = rustix::fs::RenameFlags::EXCHANGE;
                while !stop.load(Ordering::Relaxed) {
                    for link in [&abs, &rel] {
                        for _ in 0..2 {
                            renameat_with(cwd, &dir, cwd, link, exchange).expect("exchange");
                        }
                    }
                }
            })
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut reads_inside = 0;
        for i in 0..3000 {
            let name = format!("/d/w{i}");
            let _ = rt.block_on(f.fs.write(&name, Bytes::from_static(b"x"), 0o644));
            if let Ok(data) = rt.block_on(f.fs.read("/d/f")) {
                assert_eq!(&data[..], b"inside", "read a file outside the root");
                reads_inside += 1;
            }
            let _ = rt.block_on(f.fs.chmod("/d/f", 0o600));
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().expect("swapper");
        let outside_entries: Vec<_> = std::fs::read_dir(&f.outside)
            .expect("read_dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            outside_entries.len(),
            2,
            "created outside: {outside_entries:?}"
        );
        let mode = std::fs::metadata(f.outside.join("f"))
            .expect("meta")
            .permissions();
        assert_ne!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_to_string(f.outside.join("f")).expect("read"),
            "host secret"
        );
        // The race test is only meaningful if both outcomes happened.
        assert!(reads_inside > 0, "the directory was never visible");
    }

    #[tokio::test]
    async fn file_operations() {
        let f = fixture();
        f.fs.write("/a/b/c.txt", Bytes::from_static(b"hello"), 0o640)
            .await
            .expect("write");
        let st = f.fs.stat("/a/b/c.txt").await.expect("stat");
        assert_eq!((st.size, st.mode.as_str(), st.is_dir), (5, "640", false));
        assert_eq!(st.path, "/a/b/c.txt");
        assert!(st.mod_time.ends_with('Z'), "{}", st.mod_time);

        f.fs.rename("/a/b/c.txt", "/a/d.txt").await.expect("rename");
        f.fs.chmod("/a/d.txt", 0o755).await.expect("chmod");
        let names: Vec<_> =
            f.fs.list("/a")
                .await
                .expect("list")
                .into_iter()
                .map(|e| (e.name, e.mode))
                .collect();
        assert_eq!(
            names,
            vec![("b".into(), "755".into()), ("d.txt".into(), "755".into())]
        );

        assert!(matches!(
            f.fs.delete("/a", false).await,
            Err(ProviderError::InvalidRequest(_))
        ));
        f.fs.delete("/a", true).await.expect("delete");
        assert!(!f.root.join("a").exists());
        assert!(matches!(
            f.fs.read("/a/d.txt").await,
            Err(ProviderError::FileNotFound(_))
        ));
        assert!(matches!(
            f.fs.delete("/", true).await,
            Err(ProviderError::InvalidRequest(_))
        ));
        assert!(matches!(
            f.fs.read("/etc").await,
            Err(ProviderError::InvalidRequest(_))
        ));
        assert!(matches!(
            f.fs.chmod("/etc/passwd", 0o17777).await,
            Err(ProviderError::InvalidRequest(_))
        ));
    }

    #[tokio::test]
    async fn restricted_roots_refuse_other_paths() {
        let f = fixture();
        std::fs::create_dir(f.root.join("workspace")).expect("mkdir");
        let fs = HostFs::restricted(&f.root, &["workspace", "tmp"]);
        fs.write("/workspace/x", Bytes::from_static(b"x"), 0o644)
            .await
            .expect("write");
        assert!(matches!(
            fs.read("/etc/passwd").await,
            Err(ProviderError::InvalidRequest(_))
        ));
        assert!(matches!(
            fs.read("/workspace/../etc/passwd").await,
            Err(ProviderError::InvalidRequest(_))
        ));
        assert!(matches!(
            fs.rename("/workspace/x", "/etc/x").await,
            Err(ProviderError::InvalidRequest(_))
        ));
        assert!(matches!(
            fs.glob("/*").await,
            Err(ProviderError::InvalidRequest(_))
        ));
        assert_eq!(
            fs.glob("/workspace/*").await.expect("glob"),
            vec!["/workspace/x".to_string()]
        );
    }

    #[tokio::test]
    async fn glob_patterns() {
        let f = fixture();
        for p in [
            "/w/a.txt",
            "/w/b.txt",
            "/w/c.md",
            "/w/sub/d.txt",
            "/w/.hidden.txt",
        ] {
            f.fs.write(p, Bytes::from_static(b"x"), 0o644)
                .await
                .expect("write");
        }
        symlink("/w", f.root.join("w/sub/loop")).expect("symlink");
        assert_eq!(
            f.fs.glob("/w/*.txt").await.expect("glob"),
            vec!["/w/a.txt", "/w/b.txt"]
        );
        assert_eq!(
            f.fs.glob("/w/[ab].txt").await.expect("glob"),
            vec!["/w/a.txt", "/w/b.txt"]
        );
        assert_eq!(
            f.fs.glob("/w/[!a]?txt").await.expect("glob"),
            vec!["/w/b.txt"]
        );
        assert_eq!(
            f.fs.glob("/w/**/*.txt").await.expect("glob"),
            vec!["/w/a.txt", "/w/b.txt", "/w/sub/d.txt"]
        );
        assert_eq!(
            f.fs.glob("/w/sub/d.txt").await.expect("glob"),
            vec!["/w/sub/d.txt"]
        );
        assert!(f.fs.glob("/w/nope/*").await.expect("glob").is_empty());
        assert!(f.fs.glob("/w/../*").await.is_err());
    }

    fn mode_of(path: &Path) -> u32 {
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::symlink_metadata(path).expect("meta").permissions(),
        ) & 0o7777
    }

    /// Every hidden temporary name of a write anywhere under `dir`.
    fn leftover_temps(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(WRITE_TEMP_PREFIX)
            {
                found.push(path.clone());
            }
            if entry.file_type().expect("file type").is_dir() {
                found.extend(leftover_temps(&path));
            }
        }
        found
    }

    fn open_dir_path(dir: &Path) -> OwnedFd {
        rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open dir")
    }

    #[tokio::test]
    async fn overwrite_replaces_content_and_sets_exact_mode() {
        let f = fixture();
        let long = Bytes::from(vec![b'x'; 64 * 1024]);
        f.fs.write("/w/f", long, 0o600).await.expect("write");
        assert_eq!(mode_of(&f.root.join("w/f")), 0o600);
        // Shorter content, and a mode the umask would normally filter.
        f.fs.write("/w/f", Bytes::from_static(b"short"), 0o777)
            .await
            .expect("overwrite");
        assert_eq!(&f.fs.read("/w/f").await.expect("read")[..], b"short");
        assert_eq!(mode_of(&f.root.join("w/f")), 0o777);
        f.fs.write("/w/f", Bytes::new(), 0o640)
            .await
            .expect("overwrite empty");
        assert!(f.fs.read("/w/f").await.expect("read").is_empty());
        assert_eq!(mode_of(&f.root.join("w/f")), 0o640);
        // The parents are still created with 0755.
        assert_eq!(mode_of(&f.root.join("w")), 0o755);
    }

    #[tokio::test]
    async fn write_leaves_no_temporary_names() {
        let f = fixture();
        f.fs.write("/w/new", Bytes::from_static(b"1"), 0o644)
            .await
            .expect("create");
        f.fs.write("/w/new", Bytes::from_static(b"2"), 0o644)
            .await
            .expect("overwrite");
        f.fs.write("/etc/passwd", Bytes::from_static(b"3"), 0o644)
            .await
            .expect("overwrite");
        // Refused writes leave nothing behind either.
        assert!(
            f.fs.write("/etc", Bytes::from_static(b"4"), 0o644)
                .await
                .is_err()
        );
        assert!(
            f.fs.write("/etc/passwd/x", Bytes::from_static(b"5"), 0o644)
                .await
                .is_err()
        );
        assert_eq!(leftover_temps(&f.root), Vec::<PathBuf>::new());
        let mut names: Vec<_> = std::fs::read_dir(f.root.join("w"))
            .expect("read_dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        assert_eq!(names, vec!["new"]);
    }

    #[tokio::test]
    async fn write_refuses_directories_symlinks_and_special_files() {
        let f = fixture();
        assert!(matches!(
            f.fs.write("/etc", Bytes::from_static(b"x"), 0o644).await,
            Err(ProviderError::InvalidRequest(m)) if m.contains("is a directory")
        ));
        // A symlink to an in-root file is refused, not replaced or followed.
        symlink("/etc/passwd", f.root.join("pw")).expect("symlink");
        assert!(matches!(
            f.fs.write("/pw", Bytes::from_static(b"x"), 0o644).await,
            Err(ProviderError::InvalidRequest(m)) if m.contains("symbolic link")
        ));
        assert!(
            std::fs::symlink_metadata(f.root.join("pw"))
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read_to_string(f.root.join("etc/passwd")).expect("read"),
            "sandbox passwd"
        );
        // A dangling one too.
        symlink("/nowhere", f.root.join("dangling")).expect("symlink");
        assert!(matches!(
            f.fs.write("/dangling", Bytes::from_static(b"x"), 0o644).await,
            Err(ProviderError::InvalidRequest(m)) if m.contains("symbolic link")
        ));
        assert!(!f.root.join("nowhere").exists());
        // A FIFO is refused without being opened (which would block).
        rustix::fs::mknodat(
            CWD,
            f.root.join("fifo").as_path(),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .expect("mkfifo");
        assert!(matches!(
            f.fs.write("/fifo", Bytes::from_static(b"x"), 0o644).await,
            Err(ProviderError::InvalidRequest(m)) if m.contains("not a regular file")
        ));
        assert_eq!(leftover_temps(&f.root), Vec::<PathBuf>::new());
    }

    #[tokio::test]
    async fn write_replaces_the_inode() {
        let f = fixture();
        std::fs::hard_link(f.root.join("etc/passwd"), f.root.join("etc/passwd.link"))
            .expect("link");
        f.fs.write("/etc/passwd", Bytes::from_static(b"new"), 0o644)
            .await
            .expect("write");
        assert_eq!(&f.fs.read("/etc/passwd").await.expect("read")[..], b"new");
        // The documented price of atomicity: other links keep the old file.
        assert_eq!(
            &f.fs.read("/etc/passwd.link").await.expect("read")[..],
            b"sandbox passwd"
        );
    }

    #[tokio::test]
    async fn write_under_an_escaping_parent_stays_inside() {
        let f = fixture();
        symlink("../outside", f.root.join("reldir")).expect("symlink");
        symlink(&f.outside, f.root.join("absdir")).expect("symlink");
        // `../outside` resolves to `/outside` inside the root.
        std::fs::create_dir(f.root.join("outside")).expect("mkdir");
        f.fs.write("/reldir/new", Bytes::from_static(b"x"), 0o644)
            .await
            .expect("write");
        assert_eq!(
            std::fs::read_to_string(f.root.join("outside/new")).expect("read"),
            "x"
        );
        let _ =
            f.fs.write("/absdir/secret", Bytes::from_static(b"pwned"), 0o644)
                .await;
        let outside: Vec<_> = std::fs::read_dir(&f.outside)
            .expect("read_dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(outside, vec!["secret"]);
        assert_eq!(
            std::fs::read_to_string(f.outside.join("secret")).expect("read"),
            "host secret"
        );
        assert_eq!(leftover_temps(&f.root), Vec::<PathBuf>::new());
    }

    #[test]
    fn both_commit_paths_write_and_clean_up() {
        let f = fixture();
        let parent = open_dir_path(&f.root);
        let mode = Mode::from_raw_mode(0o640);
        // Without O_TMPFILE: a hidden named file renamed into place.
        write_named(&parent, "named", b"by name", (mode, None), "/named").expect("write_named");
        assert_eq!(
            std::fs::read_to_string(f.root.join("named")).expect("read"),
            "by name"
        );
        assert_eq!(mode_of(&f.root.join("named")), 0o640);
        // With O_TMPFILE (this test's filesystem must support it).
        let tmpfile = || {
            openat(
                &parent,
                ".",
                OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
                mode,
            )
            .unwrap_or_else(|e| panic!("O_TMPFILE unsupported here: {e}"))
        };
        write_unnamed(
            &parent,
            "named",
            tmpfile(),
            b"unnamed",
            (mode, None),
            "/named",
        )
        .expect("write_unnamed");
        assert_eq!(
            std::fs::read_to_string(f.root.join("named")).expect("read"),
            "unnamed"
        );
        // A rename that fails (the target became a non-empty directory
        // after the probe) removes the temporary name again.
        assert!(matches!(
            write_named(&parent, "etc", b"x", (mode, None), "/etc"),
            Err(ProviderError::InvalidRequest(_))
        ));
        assert!(matches!(
            write_unnamed(&parent, "etc", tmpfile(), b"x", (mode, None), "/etc"),
            Err(ProviderError::InvalidRequest(_))
        ));
        assert!(f.root.join("etc/passwd").exists());
        assert_eq!(leftover_temps(&f.root), Vec::<PathBuf>::new());
    }

    #[test]
    fn readers_never_see_a_partial_write() {
        let f = fixture();
        let big = Bytes::from(vec![b'a'; 512 * 1024]);
        let small = Bytes::from(vec![b'b'; 100 * 1024]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(f.fs.write("/f", big.clone(), 0o644))
            .expect("write");
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (path, stop) = (f.root.join("f"), stop.clone());
            let (big, small) = (big.clone(), small.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) {
                    let data = std::fs::read(&path).expect("the file is always there");
                    assert!(
                        data[..] == big[..] || data[..] == small[..],
                        "read a partial file of {} bytes",
                        data.len()
                    );
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..40 {
            let content = if i % 2 == 0 { &small } else { &big };
            rt.block_on(f.fs.write("/f", content.clone(), 0o644))
                .expect("write");
        }
        stop.store(true, Ordering::Relaxed);
        let reads = reader.join().expect("reader");
        assert!(reads > 0);
        assert_eq!(leftover_temps(&f.root), Vec::<PathBuf>::new());
    }
}
