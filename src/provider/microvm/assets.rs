//! What a microVM boots: a kernel, an initramfs and a root disk.
//!
//! - The kernel is a distribution's (`/boot/vmlinuz-<release>`, Debian's
//!   `linux-image-cloud-amd64` for instance) with its modules under
//!   `/lib/modules/<release>`. Such kernels build their virtio drivers as
//!   modules, so the initramfs carries the ones the guest needs, with
//!   their dependencies first (read from each module's own `depends=`;
//!   the packages ship no `modules.dep`). Modules the kernel has built in
//!   (`modules.builtin`) are left out.
//! - The initramfs (newc cpio) holds the guest agent as `/init` and the
//!   modules under `/stacyvm/modules` with their load `order`. It is
//!   cached by the hash of what it holds.
//! - Firecracker boots an uncompressed ELF kernel: [`vmlinux`] takes the
//!   LZ4 payload out of a bzImage (Debian's kernels are compressed so),
//!   cached by the bzImage's hash.
//! - The root disk is an ext4 image of an image from the local image
//!   store (`mkfs.ext4 -d`), cached per image and import time; each
//!   sandbox gets a sparse copy grown to its `disk_mb`.

use std::collections::HashSet;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest;

/// The modules a guest with a serial-port agent needs: the virtio MMIO
/// transport (QEMU's and Firecracker's microVMs), the console (serial
/// ports) and block devices.
pub const SERIAL_MODULES: [&str; 3] = ["virtio_mmio", "virtio_console", "virtio_blk"];

/// How long a filesystem tool may run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

/// Free space an image's cached disk gets beyond its content, before a
/// sandbox's copy is grown to its `disk_mb`.
const DISK_SLACK_MB: u64 = 64;

/// A kernel and its modules.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    pub modules: PathBuf,
}

/// Finds the kernel: `image` if set, else the newest `/boot/vmlinuz-*`;
/// its modules in `modules` if set, else `/lib/modules/<release>`.
pub fn find_kernel(image: &Path, modules: &Path) -> Result<Kernel, String> {
    let image = if image.as_os_str().is_empty() {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .collect();
        found.sort();
        found.pop().ok_or(
            "no kernel in /boot: install one (Debian: apt-get install linux-image-cloud-amd64) \
             or set providers.qemu.kernel",
        )?
    } else {
        image.to_path_buf()
    };
    if !image.is_file() {
        return Err(format!("no kernel at {}", image.display()));
    }
    let modules = if modules.as_os_str().is_empty() {
        let release = image
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .ok_or_else(|| {
                format!(
                    "{} is not named vmlinuz-<release>: set providers.qemu.modules_dir",
                    image.display()
                )
            })?;
        // Beside a kernel unpacked elsewhere (`<root>/boot/vmlinuz-R`),
        // its `<root>/lib/modules/R`; else the system's.
        let beside = image
            .parent()
            .and_then(Path::parent)
            .map(|root| root.join("lib/modules").join(release));
        match beside {
            Some(dir) if dir.is_dir() => dir,
            _ => Path::new("/lib/modules").join(release),
        }
    } else {
        modules.to_path_buf()
    };
    if !modules.is_dir() {
        return Err(format!(
            "no kernel modules at {} (set providers.qemu.modules_dir)",
            modules.display()
        ));
    }
    Ok(Kernel { image, modules })
}

/// The module names of `dir` (a `/lib/modules/<release>`), with `-` read
/// as `_` as the kernel does, mapped to their files.
fn index_modules(dir: &Path) -> std::collections::HashMap<String, PathBuf> {
    let mut index = std::collections::HashMap::new();
    let mut stack = vec![dir.join("kernel")];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                index.insert(name.replace('-', "_"), path);
            }
        }
    }
    index
}

/// The `depends=` of a module file's `.modinfo`.
fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let Some(at) = ko
        .windows(key.len() + 1)
        .position(|w| w[0] == 0 && &w[1..] == key)
    else {
        return Vec::new();
    };
    let value = &ko[at + 1 + key.len()..];
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .map(|d| d.trim().replace('-', "_"))
        .filter(|d| !d.is_empty())
        .collect()
}

/// The modules to load for `wanted`, dependencies first, leaving out the
/// built-in ones.
pub fn module_order(dir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>, String> {
    let index = index_modules(dir);
    let builtin: HashSet<String> = std::fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            Path::new(l)
                .file_stem()?
                .to_str()
                .map(|n| n.replace('-', "_"))
        })
        .collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        name: &str,
        index: &std::collections::HashMap<String, PathBuf>,
        builtin: &HashSet<String>,
        seen: &mut HashSet<String>,
        order: &mut Vec<(String, PathBuf)>,
        dir: &Path,
    ) -> Result<(), String> {
        if !seen.insert(name.to_string()) || builtin.contains(name) {
            return Ok(());
        }
        let path = index.get(name).ok_or_else(|| {
            format!(
                "the kernel module {name} is neither in {} nor built in",
                dir.display()
            )
        })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for dep in depends(&bytes) {
            visit(&dep, index, builtin, seen, order, dir)?;
        }
        order.push((name.to_string(), path.clone()));
        Ok(())
    }
    for name in wanted {
        visit(name, &index, &builtin, &mut seen, &mut order, dir)?;
    }
    Ok(order)
}

/// A newc cpio archive being written.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// Builds (or finds cached in `cache`) the initramfs for `kernel` with
/// `agent` as `/init` and the `modules` it must load.
pub fn initramfs(
    kernel: &Kernel,
    agent: &Path,
    modules: &[&str],
    cache: &Path,
) -> Result<PathBuf, String> {
    let order = module_order(&kernel.modules, modules)?;
    let agent_bytes = std::fs::read(agent).map_err(|e| format!("{}: {e}", agent.display()))?;
    let mut files = Vec::new();
    let mut hash = sha2::Sha256::new();
    hash.update(&agent_bytes);
    for (name, path) in &order {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        hash.update(name.as_bytes());
        hash.update(&bytes);
        files.push((name.clone(), bytes));
    }
    let digest = hash.finalize();
    let key: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let path = cache.join(format!("initramfs-{key}.cpio"));
    if path.is_file() {
        return Ok(path);
    }
    let mut cpio = Cpio {
        out: Vec::new(),
        ino: 0,
    };
    cpio.entry("dev", 0o040755, (0, 0), &[]);
    cpio.entry("dev/console", 0o020600, (5, 1), &[]);
    cpio.entry("stacyvm", 0o040755, (0, 0), &[]);
    cpio.entry("stacyvm/modules", 0o040755, (0, 0), &[]);
    let mut list = String::new();
    for (name, bytes) in &files {
        cpio.entry(
            &format!("stacyvm/modules/{name}.ko"),
            0o100644,
            (0, 0),
            bytes,
        );
        list.push_str(name);
        list.push('\n');
    }
    cpio.entry("stacyvm/modules/order", 0o100644, (0, 0), list.as_bytes());
    cpio.entry("init", 0o100755, (0, 0), &agent_bytes);
    write_atomically(&path, &cpio.finish())?;
    Ok(path)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    tmp.write_all(bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

/// A filesystem tool by name, on `PATH` or in the sbin directories a
/// non-root `PATH` lacks.
fn tool(name: &str) -> PathBuf {
    for dir in std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
    {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    PathBuf::from(name)
}

async fn run_tool(name: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(tool(name));
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(TOOL_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("{name} did not finish within {TOOL_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot run {name} (Debian: apt-get install e2fsprogs): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The magic number of LZ4's legacy frame, the one the kernel's build
/// uses for an LZ4 payload.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];

/// What one block of a legacy frame decompresses to, at most.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// The most an uncompressed kernel may be (Debian's is about 55 MiB).
const MAX_VMLINUX: usize = 512 << 20;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];

/// An uncompressed ELF kernel for `kernel`: `kernel` itself when it is
/// one, else the LZ4 payload of the bzImage it is, decompressed into
/// `cache/kernels/` once per bzImage.
pub fn vmlinux(kernel: &Path, cache: &Path) -> Result<PathBuf, String> {
    let bytes = std::fs::read(kernel).map_err(|e| format!("{}: {e}", kernel.display()))?;
    if bytes.starts_with(&ELF_MAGIC) {
        return Ok(kernel.to_path_buf());
    }
    let digest = sha2::Sha256::digest(&bytes);
    let key: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let dir = cache.join("kernels");
    let path = dir.join(format!("vmlinux-{key}"));
    if path.is_file() {
        return Ok(path);
    }
    let elf = extract_lz4_kernel(&bytes).map_err(|why| {
        format!(
            "{}: {why}; give an uncompressed vmlinux instead (`extract-vmlinux` from the kernel's sources makes one)",
            kernel.display()
        )
    })?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4().as_simple()));
    let written = std::fs::write(&tmp, &elf)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("{}: {e}", path.display()));
    if written.is_err() {
        crate::provider::best_effort(
            "removing a half-written vmlinux",
            std::fs::remove_file(&tmp),
        );
    }
    written.map(|()| path)
}

/// The ELF kernel inside a bzImage with an LZ4 payload: the first legacy
/// LZ4 frame whose blocks decompress to an ELF file. The frame ends at
/// the first block that is short, or at what is not a block (the size
/// the build appends, the rest of the bzImage).
fn extract_lz4_kernel(image: &[u8]) -> Result<Vec<u8>, String> {
    let bound = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK / 255 + 16;
    let mut from = 0;
    while let Some(at) = image[from..]
        .windows(4)
        .position(|w| w == LZ4_LEGACY_MAGIC)
        .map(|p| p + from)
    {
        from = at + 4;
        let mut out = Vec::new();
        let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
        let mut pos = at + 4;
        while let Some(size) = image
            .get(pos..pos + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        {
            if size == u32::from_le_bytes(LZ4_LEGACY_MAGIC) as usize {
                pos += 4;
                continue;
            }
            let Some(input) = image
                .get(pos + 4..pos + 4 + size)
                .filter(|_| size > 0 && size <= bound)
            else {
                break;
            };
            let Ok(n) = lz4_flex::block::decompress_into(input, &mut block) else {
                if out.is_empty() {
                    break;
                }
                return Err("a block of its LZ4 payload is damaged".into());
            };
            if out.len() + n > MAX_VMLINUX {
                return Err(format!("its kernel is over {} MiB", MAX_VMLINUX >> 20));
            }
            out.extend_from_slice(&block[..n]);
            pos += 4 + size;
            if n < LZ4_LEGACY_BLOCK {
                break;
            }
        }
        if out.starts_with(&ELF_MAGIC) {
            // The build appends the payload's uncompressed size: a frame
            // cut short does not end with it.
            let size = image
                .get(pos..pos + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
            if size != Some(out.len()) {
                return Err(format!(
                    "its LZ4 payload ends after {} bytes without the size the kernel's build appends: the file is truncated or damaged",
                    out.len()
                ));
            }
            return Ok(out);
        }
    }
    Err("it is neither an ELF kernel nor a bzImage with an LZ4 payload".into())
}

/// The cached root disk of an image (`rootfs` imported at `imported_at`,
/// `content_bytes` large), built on first use.
pub async fn image_disk(
    name: &str,
    rootfs: &Path,
    imported_at: chrono::DateTime<chrono::Utc>,
    content_bytes: u64,
    cache: &Path,
) -> Result<PathBuf, String> {
    let digest = sha2::Sha256::digest(name.as_bytes());
    let key: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let path = cache.join(format!("{key}-{}.ext4", imported_at.timestamp_micros()));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    // Inodes and metadata take room beyond the files' bytes; an image of
    // many small files needs inodes more than bytes.
    let size_mb = (content_bytes + content_bytes / 4).div_ceil(1 << 20) + DISK_SLACK_MB;
    let tree = rootfs.to_path_buf();
    let entries = tokio::task::spawn_blocking(move || count_entries(&tree))
        .await
        .map_err(|e| format!("counting the image's files: {e}"))?;
    let inodes = entries * 2 + 16_384;
    let tmp = cache.join(format!(".tmp-{}.ext4", uuid::Uuid::new_v4().as_simple()));
    let built = run_tool(
        "mkfs.ext4",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-L".as_ref(),
            "stacyvm".as_ref(),
            "-m".as_ref(),
            "0".as_ref(),
            "-N".as_ref(),
            inodes.to_string().as_ref(),
            "-d".as_ref(),
            rootfs.as_os_str(),
            tmp.as_os_str(),
            format!("{size_mb}M").as_ref(),
        ],
    )
    .await
    .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display())));
    if built.is_err() {
        crate::provider::best_effort("removing a half-built VM disk", std::fs::remove_file(&tmp));
    }
    built.map(|()| path)
}

/// Files, directories and links under `dir`.
fn count_entries(dir: &Path) -> u64 {
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            count += 1;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    count
}

/// Removes half-built disks (`.tmp-*`) a crash left in `cache`; how many.
/// Only safe while nothing builds, i.e. at start-up.
pub fn sweep_cache(cache: &Path) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(cache).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a half-built VM disk")
                }
            }
        }
    }
    removed
}

/// A sandbox's own disk: a sparse copy of `base` grown to `disk_mb` (never
/// below what the image needs).
pub async fn sandbox_disk(base: &Path, dest: &Path, disk_mb: u32) -> Result<(), String> {
    let (from, to) = (base.to_path_buf(), dest.to_path_buf());
    let want = u64::from(disk_mb) << 20;
    let grown = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        sparse_copy(&from, &to)?;
        let file = std::fs::OpenOptions::new().write(true).open(&to)?;
        if want > file.metadata()?.len() {
            file.set_len(want)?;
            return Ok(true);
        }
        Ok(false)
    })
    .await
    .map_err(|e| format!("copying the image's disk: {e}"))?
    .map_err(|e| format!("copying the image's disk: {e}"))?;
    if grown {
        run_tool("resize2fs", &["-f".as_ref(), dest.as_os_str()]).await?;
    }
    Ok(())
}

/// A copy of the disk `from` at `to`, keeping its holes.
pub async fn copy_disk(from: &Path, to: &Path) -> Result<(), String> {
    let (from, to) = (from.to_path_buf(), to.to_path_buf());
    tokio::task::spawn_blocking(move || sparse_copy(&from, &to))
        .await
        .map_err(|e| format!("copying a disk: {e}"))?
        .map_err(|e| format!("copying a disk: {e}"))
}

/// Copies `from` to `to` keeping its holes (the data ranges only).
fn sparse_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    use rustix::fs::SeekFrom;
    let src = std::fs::File::open(from)?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    let len = src.metadata()?.size();
    dst.set_len(len)?;
    let mut at = 0u64;
    while at < len {
        let data = match rustix::fs::seek(&src, SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(&src, SeekFrom::Hole(data))?.min(len);
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            let left = (hole - off_in) as usize;
            let n = rustix::fs::copy_file_range(
                &src,
                Some(&mut off_in),
                &dst,
                Some(&mut off_out),
                left,
            )?;
            if n == 0 {
                break;
            }
        }
        at = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage stand-in: setup code, an LZ4 legacy frame of `payload`
    /// (blocks of 8 MiB), the size the kernel's build appends, and more.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0x90u8; 20_000];
        image.extend_from_slice(&LZ4_LEGACY_MAGIC);
        for block in payload.chunks(LZ4_LEGACY_BLOCK) {
            let compressed = lz4_flex::block::compress(block);
            image.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            image.extend_from_slice(&compressed);
        }
        image.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(&[0xffu8; 3000]);
        image
    }

    fn elf(len: usize) -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        bytes[..4].copy_from_slice(&ELF_MAGIC);
        bytes
    }

    #[test]
    fn the_kernel_comes_out_of_an_lz4_bzimage_whole() {
        // Over two blocks, the last one short; and exactly one block.
        for len in [LZ4_LEGACY_BLOCK * 2 + 12_345, LZ4_LEGACY_BLOCK] {
            let payload = elf(len);
            let out = extract_lz4_kernel(&bzimage(&payload)).expect("extracted");
            assert_eq!(out.len(), payload.len());
            assert!(out == payload);
        }
        // The magic number by chance before the real frame is skipped.
        let mut image = LZ4_LEGACY_MAGIC.to_vec();
        image.extend_from_slice(&[9, 0, 0, 0, 1, 2, 3]);
        let payload = elf(70_000);
        image.extend(bzimage(&payload));
        assert!(extract_lz4_kernel(&image).expect("extracted") == payload);
    }

    #[test]
    fn what_is_no_kernel_is_refused_and_an_elf_is_taken_as_it_is() {
        let not_elf = bzimage(&[0u8; 5000]);
        let err = extract_lz4_kernel(&not_elf).expect_err("no ELF inside");
        assert!(err.contains("neither"), "{err}");
        assert!(extract_lz4_kernel(b"plain text").is_err());
        let mut truncated = bzimage(&elf(100_000));
        truncated.truncate(20_100);
        assert!(extract_lz4_kernel(&truncated).is_err());
        // Cut in its second block: the first one alone is an ELF start,
        // but not the kernel.
        let whole = bzimage(&elf(LZ4_LEGACY_BLOCK + 500_000));
        let first = u32::from_le_bytes(whole[20_004..20_008].try_into().expect("4")) as usize;
        let cut = &whole[..20_008 + first + 4 + 1000];
        let err = extract_lz4_kernel(cut).expect_err("cut short");
        assert!(err.contains("truncated"), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, elf(1000)).expect("write");
        assert_eq!(vmlinux(&kernel, dir.path()).expect("taken"), kernel);
        let bz = dir.path().join("vmlinuz");
        std::fs::write(&bz, bzimage(&elf(50_000))).expect("write");
        let out = vmlinux(&bz, dir.path()).expect("extracted");
        assert!(out.starts_with(dir.path().join("kernels")));
        assert_eq!(std::fs::read(&out).expect("read"), elf(50_000));
        // Cached: the same path again.
        assert_eq!(vmlinux(&bz, dir.path()).expect("cached"), out);
        let bogus = dir.path().join("bogus");
        std::fs::write(&bogus, "not a kernel").expect("write");
        let err = vmlinux(&bogus, dir.path()).expect_err("refused");
        assert!(err.contains("uncompressed vmlinux"), "{err}");
    }
}
