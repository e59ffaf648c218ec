//! A native sandbox's writable disk, capped: its tree lives on an ext4
//! filesystem in a sparse image file (`<sandbox>/disk.img`, `disk_mb`
//! MiB), loop-mounted at the tree (`rootfs/`, or `hostfs/` for the `host`
//! image). A full disk is ENOSPC inside the sandbox and nothing else: the
//! host's filesystem and the server are untouched. The image only takes
//! the host space actually written (plus ext4's metadata, about 3%).
//!
//! Made with `mkfs.ext4` (e2fsprogs; `root_owner` makes its root the
//! sandbox's root, no reserved blocks) and mounted with `mount -o loop`
//! (util-linux; the loop device is released when it is unmounted). No
//! `nodev`: hakoniwa's bind mounts of the `host` image's directories could
//! not be remounted from inside the user namespace with it locked, and
//! nothing can put a device node there (the copy skips them, the sandbox
//! has no `CAP_MKNOD`, and a user namespace cannot make real ones). The
//! mount lives in the host's mount namespace, so the files API
//! reaches the tree as before; the sandbox's namespace gets a copy of it.
//! After a host restart the mount is gone and the image is mounted again
//! before the sandbox gets a new init.

use std::io;
use std::path::Path;
use std::process::Command;

/// The image file, next to `sandbox.json`.
pub(crate) const IMAGE_FILE: &str = "disk.img";

/// Whether disks can be capped here, and if not why: loop mounts need
/// root, and `mkfs.ext4` must be installed.
pub(crate) fn available() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("capping native sandboxes' disks needs StacyVM to run as root".into());
    }
    which("mkfs.ext4")
        .map(|_| ())
        .ok_or_else(|| "mkfs.ext4 is not installed (Debian: e2fsprogs)".to_string())
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn run(program: &str, args: &[&std::ffi::OsStr]) -> io::Result<()> {
    let binary = which(program)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{program} not found")))?;
    let out = Command::new(binary)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Makes `<dir>/disk.img` of `size_mb` MiB owned (its root directory) by
/// `owner`, and mounts it at `at` (created if missing). On error nothing
/// stays mounted; the caller removes `dir`.
pub(crate) fn create(dir: &Path, at: &Path, size_mb: u32, owner: (u32, u32)) -> io::Result<()> {
    let image = dir.join(IMAGE_FILE);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&image)?;
    file.set_len(u64::from(size_mb) * 1024 * 1024)?;
    drop(file);
    let root_owner = format!("root_owner={}:{}", owner.0, owner.1);
    run(
        "mkfs.ext4",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-m".as_ref(),
            "0".as_ref(),
            "-E".as_ref(),
            root_owner.as_ref(),
            image.as_os_str(),
        ],
    )?;
    mount(dir, at)?;
    // An empty tree: the sandbox sees its own filesystem, not ext4's.
    if let Err(e) = std::fs::remove_dir(at.join("lost+found"))
        && e.kind() != io::ErrorKind::NotFound
    {
        unmount(at);
        return Err(e);
    }
    Ok(())
}

/// Mounts `<dir>/disk.img` at `at`.
pub(crate) fn mount(dir: &Path, at: &Path) -> io::Result<()> {
    std::fs::create_dir_all(at)?;
    run(
        "mount",
        &[
            "-o".as_ref(),
            "loop".as_ref(),
            dir.join(IMAGE_FILE).as_os_str(),
            at.as_os_str(),
        ],
    )
}

/// Whether something is mounted at `at` (another device than its parent).
pub(crate) fn is_mounted(at: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(here), Some(Ok(parent))) = (std::fs::metadata(at), at.parent().map(std::fs::metadata))
    else {
        return false;
    };
    here.dev() != parent.dev()
}

/// Detaches whatever is mounted at `at` (lazily: a process still using it
/// keeps it until it lets go, then the loop device is released). Nothing
/// mounted is fine. Best effort: a failure is logged, and the directory
/// removal that follows reports it.
pub(crate) fn unmount(at: &Path) {
    if !is_mounted(at) {
        return;
    }
    if let Err(e) = rustix::mount::unmount(at, rustix::mount::UnmountFlags::DETACH) {
        tracing::warn!(path = %at.display(), error = %e, "cannot unmount a sandbox disk");
    }
}

/// Where the disk of the sandbox in `dir` is mounted: `hostfs` for the
/// `host` image, `rootfs` otherwise.
pub(crate) fn mount_point(dir: &Path, host_image: bool) -> std::path::PathBuf {
    dir.join(if host_image { "hostfs" } else { "rootfs" })
}

/// Unmounts the disk of a sandbox directory (or of a half-built or
/// half-deleted one), whichever tree it has.
pub(crate) fn unmount_all(dir: &Path) {
    for host_image in [false, true] {
        unmount(&mount_point(dir, host_image));
    }
}
