//! Local root filesystems for the providers that have no registry of their
//! own (`native`, `proot`).
//!
//! An image is just a directory tree unpacked from a tarball such as
//! `docker export` writes. Each image lives in `<dir>/<encoded name>/` with
//! the tree in `rootfs/` and its description in `image.json`. Imports unpack
//! into a hidden temporary directory inside the store and are renamed into
//! place only when complete, so a crash or a bad tarball never leaves a
//! half-imported image that a sandbox could be spawned from.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Prefix of the store's scratch directories; never a valid encoded name
/// because encoded names cannot start with a dot.
const TMP_PREFIX: &str = ".tmp-";
const INFO_FILE: &str = "image.json";
const ROOTFS_DIR: &str = "rootfs";

/// Longest image name accepted; keeps the encoded directory name well under
/// the 255-byte file name limit.
const MAX_NAME_LEN: usize = 128;

/// Description of one imported image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    /// The name the image was imported under, e.g. `alpine:latest`.
    pub name: String,
    /// Sum of the sizes of the regular files in the root filesystem.
    pub size_bytes: u64,
    pub imported_at: DateTime<Utc>,
}

/// Why an image store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    /// The name is empty, too long, or could escape the store.
    #[error("invalid image name {0:?}: use letters, digits and . _ - : / (no empty or .. parts)")]
    InvalidName(String),
    /// The name breaks the image reference grammar (`image_ref`).
    #[error("{0}")]
    InvalidReference(String),
    /// The name is reserved for a built-in image (`host`).
    #[error("image name {0:?} is reserved")]
    Reserved(String),
    /// No image with that name has been imported.
    #[error("image {0:?} is not imported")]
    NotFound(String),
    /// The tarball contains an entry that would land outside the root.
    #[error("unsafe entry in tarball: {0}")]
    UnsafeEntry(String),
    /// The file is not a tar archive (plain or gzip-compressed).
    #[error("{0} is not a tar archive (.tar or .tar.gz)")]
    NotAnArchive(String),
    /// Reading the tarball or writing the store failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImageStoreError {
    let context = context.into();
    move |source| ImageStoreError::Io { context, source }
}

/// A directory of imported root filesystems.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// A store rooted at `dir`; the directory is created on first import.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unpack `tarball` as image `name`, replacing any image of that name.
    ///
    /// Entries with `..` components, and entries that would be written
    /// through a symlink to outside the root, fail the whole import; on any
    /// failure nothing is left in the store.
    pub fn import(&self, name: &str, tarball: &Path) -> Result<ImageInfo, ImageStoreError> {
        // Names follow the grammar every provider's spawn checks.
        crate::image_ref::check(name)
            .map_err(|e| ImageStoreError::InvalidReference(e.to_string()))?;
        let encoded = encode_name(name)?;
        // `host` means the host's own root to the native provider; an
        // imported image of that name could never be used.
        if name == "host" {
            return Err(ImageStoreError::Reserved(name.to_string()));
        }
        fs::create_dir_all(&self.dir)
            .map_err(io_err(format!("creating {}", self.dir.display())))?;
        // Images keep their setuid bits; only the owner may reach them, or
        // any local user could run an image's setuid binary on the host.
        fs::set_permissions(
            &self.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(io_err(format!("securing {}", self.dir.display())))?;
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{}", uuid::Uuid::new_v4().as_simple()));
        fs::create_dir(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        let result = self.import_into(name, tarball, &tmp, &encoded);
        if result.is_err() {
            // Best effort: the error we return matters more than this one.
            super::best_effort("removing a half-imported image", fs::remove_dir_all(&tmp));
        }
        result
    }

    fn import_into(
        &self,
        name: &str,
        tarball: &Path,
        tmp: &Path,
        encoded: &str,
    ) -> Result<ImageInfo, ImageStoreError> {
        let rootfs = tmp.join(ROOTFS_DIR);
        fs::create_dir(&rootfs).map_err(io_err(format!("creating {}", rootfs.display())))?;
        unpack(tarball, &rootfs)?;

        let info = ImageInfo {
            name: name.to_string(),
            size_bytes: tree_size(&rootfs),
            imported_at: Utc::now(),
        };
        let json = serde_json::to_vec_pretty(&info).map_err(|e| ImageStoreError::Io {
            context: "encoding image.json".into(),
            source: io::Error::other(e),
        })?;
        fs::write(tmp.join(INFO_FILE), json).map_err(io_err("writing image.json"))?;

        let dest = self.dir.join(encoded);
        if dest.exists() {
            // Move the old image aside first so that the new one appears in
            // a single rename; the old tree is deleted afterwards.
            let trash = self
                .dir
                .join(format!("{TMP_PREFIX}{}", uuid::Uuid::new_v4().as_simple()));
            fs::rename(&dest, &trash).map_err(io_err(format!("replacing {name}")))?;
            fs::rename(tmp, &dest).map_err(io_err(format!("installing {name}")))?;
            super::best_effort("removing a replaced image", fs::remove_dir_all(&trash));
        } else {
            fs::rename(tmp, &dest).map_err(io_err(format!("installing {name}")))?;
        }
        Ok(info)
    }

    /// All imported images, sorted by name.
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageStoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("reading {}", self.dir.display()))(e)),
        };
        let mut images = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(format!("reading {}", self.dir.display())))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if file_name.starts_with('.') {
                continue;
            }
            // A directory without a readable image.json is not an image
            // (e.g. someone else's file); skip it rather than fail the list.
            if let Some(info) = read_info(&entry.path()) {
                images.push(info);
            }
        }
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    /// Delete an image. Sandboxes already spawned from it keep their copy.
    pub fn remove(&self, name: &str) -> Result<(), ImageStoreError> {
        let dest = self.dir.join(encode_name(name)?);
        if !dest.join(INFO_FILE).is_file() {
            return Err(ImageStoreError::NotFound(name.to_string()));
        }
        // Rename first so a concurrent spawn sees either the whole image or
        // nothing, never a half-deleted tree.
        let trash = self
            .dir
            .join(format!("{TMP_PREFIX}{}", uuid::Uuid::new_v4().as_simple()));
        fs::rename(&dest, &trash).map_err(io_err(format!("removing {name}")))?;
        fs::remove_dir_all(&trash).map_err(io_err(format!("removing {name}")))
    }

    /// The root filesystem directory of `name`, if that image is imported.
    pub fn rootfs(&self, name: &str) -> Option<PathBuf> {
        let dest = self.dir.join(encode_name(name).ok()?);
        if !dest.join(INFO_FILE).is_file() {
            return None;
        }
        let rootfs = dest.join(ROOTFS_DIR);
        rootfs.is_dir().then_some(rootfs)
    }

    /// The description of `name`, if that image is imported.
    pub fn info(&self, name: &str) -> Option<ImageInfo> {
        read_info(&self.dir.join(encode_name(name).ok()?))
    }
}

fn read_info(image_dir: &Path) -> Option<ImageInfo> {
    let bytes = fs::read(image_dir.join(INFO_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Map an image name to a directory name, refusing anything that could
/// name a path outside the store.
///
/// The encoding is injective (`/` → `%2F`, `:` → `%3A`, and `%` itself is
/// not allowed in names), so two names never share a directory.
fn encode_name(name: &str) -> Result<String, ImageStoreError> {
    let invalid = || ImageStoreError::InvalidName(name.to_string());
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(invalid());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/'))
    {
        return Err(invalid());
    }
    // Every `/`-separated part must be a real name: this rules out leading
    // or trailing slashes, `//`, `.` and `..`, and hidden-looking parts.
    if name
        .split('/')
        .any(|part| part.is_empty() || part.starts_with('.'))
    {
        return Err(invalid());
    }
    Ok(name.replace('/', "%2F").replace(':', "%3A"))
}

/// Unpack a tarball entry by entry so that an entry the tar crate would
/// silently skip (a `..` path) fails the import instead.
fn unpack(tarball: &Path, rootfs: &Path) -> Result<(), ImageStoreError> {
    let file = fs::File::open(tarball).map_err(io_err(format!("opening {}", tarball.display())))?;
    let mut reader = io::BufReader::new(file);
    // A gzip-compressed tarball (`.tar.gz`, Alpine's own rootfs format)
    // is read through a decoder.
    let gzipped = io::BufRead::fill_buf(&mut reader)
        .map_err(io_err(format!("reading {}", tarball.display())))?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn io::Read> = if gzipped {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    // Ownership can only be restored by root; an unprivileged import keeps
    // the importer as owner, which is what its sandboxes will run as anyway.
    archive.set_preserve_ownerships(rustix::process::geteuid().is_root());
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let entries = archive
        .entries()
        .map_err(io_err(format!("reading {}", tarball.display())))?;
    for entry in entries {
        // tar's own message quotes the bytes it could not parse.
        let mut entry =
            entry.map_err(|_| ImageStoreError::NotAnArchive(tarball.display().to_string()))?;
        let path = entry
            .path()
            .map_err(io_err("reading entry path"))?
            .into_owned();
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(ImageStoreError::UnsafeEntry(path.display().to_string()));
        }
        if entry.header().entry_type().is_hard_link()
            && let Ok(Some(link)) = entry.link_name()
            && link.components().any(|c| c == Component::ParentDir)
        {
            return Err(ImageStoreError::UnsafeEntry(format!(
                "{} links to {}",
                path.display(),
                link.display()
            )));
        }
        // unpack_in refuses (Err) to write through a symlink that leaves
        // the root and reports Ok(false) for anything it skipped.
        match entry.unpack_in(rootfs) {
            Ok(true) => {}
            Ok(false) => return Err(ImageStoreError::UnsafeEntry(path.display().to_string())),
            Err(e) => {
                let why = error_chain(&e);
                // The tar crate reports escapes as a plain I/O error; tell
                // them apart so the caller sees which kind of failure it was.
                if why.contains("outside of destination") {
                    return Err(ImageStoreError::UnsafeEntry(format!(
                        "{}: {why}",
                        path.display()
                    )));
                }
                return Err(ImageStoreError::Io {
                    context: format!("unpacking {}: {why}", path.display()),
                    source: e,
                });
            }
        }
    }
    Ok(())
}

/// An error and all its sources as one line (tar wraps the useful part).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Total size of the regular files under `dir`, without following symlinks.
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tarball with one file, `bin/hello`, built with the tar crate.
    fn simple_tar(dir: &Path) -> PathBuf {
        let path = dir.join("simple.tar");
        let file = fs::File::create(&path).expect("create tar");
        let mut builder = tar::Builder::new(file);
        let mut header = tar::Header::new_gnu();
        header.set_size(5);
        header.set_mode(0o755);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, "bin/hello", &b"hello"[..])
            .expect("append");
        builder.finish().expect("finish");
        path
    }

    /// A tarball whose single entry has the raw name `name`, bypassing the
    /// builder's own path checks so that hostile archives can be made.
    fn raw_tar(dir: &Path, name: &[u8], kind: tar::EntryType, link: Option<&[u8]>) -> PathBuf {
        let path = dir.join("raw.tar");
        let file = fs::File::create(&path).expect("create tar");
        let mut builder = tar::Builder::new(file);
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        if let Some(link) = link {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        }
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(if kind == tar::EntryType::Regular {
            3
        } else {
            0
        });
        header.set_cksum();
        builder.append(&header, &b"bad"[..]).expect("append");
        builder.finish().expect("finish");
        path
    }

    #[test]
    fn import_list_rootfs_remove() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::new(tmp.path().join("images"));
        let tar = simple_tar(tmp.path());

        let info = store.import("stacyvm-test:busybox", &tar).expect("import");
        assert_eq!(info.name, "stacyvm-test:busybox");
        assert_eq!(info.size_bytes, 5);

        let rootfs = store.rootfs("stacyvm-test:busybox").expect("rootfs");
        assert_eq!(fs::read(rootfs.join("bin/hello")).expect("read"), b"hello");
        let names: Vec<_> = store
            .list()
            .expect("list")
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, vec!["stacyvm-test:busybox".to_string()]);

        // Re-import replaces in place.
        store
            .import("stacyvm-test:busybox", &tar)
            .expect("reimport");
        assert_eq!(store.list().expect("list").len(), 1);

        store.remove("stacyvm-test:busybox").expect("remove");
        assert!(store.rootfs("stacyvm-test:busybox").is_none());
        assert!(matches!(
            store.remove("stacyvm-test:busybox"),
            Err(ImageStoreError::NotFound(_))
        ));
        // Nothing but the (empty) store directory is left.
        assert_eq!(fs::read_dir(store.dir()).expect("dir").count(), 0);
    }

    #[test]
    fn gzipped_tarballs_import_and_other_files_are_named_as_such() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::new(tmp.path().join("images"));
        let tar = simple_tar(tmp.path());
        let gz = tmp.path().join("rootfs.tar.gz");
        let mut encoder = flate2::write::GzEncoder::new(
            fs::File::create(&gz).expect("create"),
            flate2::Compression::fast(),
        );
        io::copy(&mut fs::File::open(&tar).expect("open"), &mut encoder).expect("compress");
        encoder.finish().expect("finish");
        store.import("alpine:gz", &gz).expect("import .tar.gz");
        let rootfs = store.rootfs("alpine:gz").expect("rootfs");
        assert_eq!(fs::read(rootfs.join("bin/hello")).expect("read"), b"hello");
        let junk = tmp.path().join("junk.bin");
        fs::write(&junk, [0xffu8, 0x00, 0x13, 0x37].repeat(300)).expect("write");
        let e = store.import("junk", &junk).expect_err("not an archive");
        assert!(matches!(e, ImageStoreError::NotAnArchive(_)), "{e}");
        assert!(
            e.to_string()
                .ends_with("is not a tar archive (.tar or .tar.gz)"),
            "{e}"
        );
        assert!(store.rootfs("junk").is_none());
        // An upper-case name is refused with Docker's reason.
        let e = store.import("Alpine", &tar).expect_err("upper case");
        assert!(e.to_string().contains("lowercase"), "{e}");
    }

    #[test]
    fn names_are_validated_and_do_not_collide() {
        for bad in [
            "", "..", "../x", "a/../b", "/abs", "a//b", "a/", ".hidden", "a b", "a%2Fb",
        ] {
            assert!(
                matches!(encode_name(bad), Err(ImageStoreError::InvalidName(_))),
                "{bad:?} accepted"
            );
        }
        let a = encode_name("library/alpine:latest").expect("valid");
        assert!(!a.contains('/'));
        assert_ne!(encode_name("a:b").ok(), encode_name("a_b").ok());
        assert_ne!(encode_name("a/b").ok(), encode_name("a:b").ok());
    }

    #[test]
    fn hostile_tarballs_fail_and_leave_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::new(tmp.path().join("images"));
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");

        let dotdot = raw_tar(tmp.path(), b"../escape", tar::EntryType::Regular, None);
        assert!(matches!(
            store.import("bad", &dotdot),
            Err(ImageStoreError::UnsafeEntry(_))
        ));
        assert!(!tmp.path().join("images/escape").exists());

        let hardlink = raw_tar(
            tmp.path(),
            b"passwd",
            tar::EntryType::Link,
            Some(b"../../../etc/passwd"),
        );
        assert!(store.import("bad", &hardlink).is_err());

        // A symlink to a host directory followed by a file "through" it.
        let path = tmp.path().join("symlink.tar");
        let mut builder = tar::Builder::new(fs::File::create(&path).expect("create"));
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_uid(0);
        header.set_gid(0);
        builder
            .append_link(&mut header, "link", &outside)
            .expect("link");
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        builder
            .append_data(&mut header, "link/pwned", &b"bad"[..])
            .expect("file");
        builder.finish().expect("finish");
        assert!(store.import("bad", &path).is_err());
        assert!(!outside.join("pwned").exists());

        assert!(store.rootfs("bad").is_none());
        assert_eq!(fs::read_dir(store.dir()).expect("dir").count(), 0);
    }
}
