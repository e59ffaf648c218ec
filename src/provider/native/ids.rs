//! Host uid/gid ranges for native sandboxes' user namespaces.
//!
//! Each sandbox gets its own range of `size` host ids (a slot of the
//! configured `providers.native.ids`, an `/etc/subuid`-style block
//! `start .. start + size * count`): its root is host uid `base`, its uid
//! 1000 is `base + 1000`, and nothing in it is ever host uid 0. One range
//! per sandbox rather than one shared range, so that a process or a file
//! that escapes one sandbox (through a shared mount, a leaked descriptor)
//! owns nothing of another sandbox, and per-user kernel accounting
//! (RLIMIT_NPROC, inotify, user-namespace counts) is per sandbox.
//!
//! The range is recorded in the sandbox's `sandbox.json`, so it survives a
//! restart; a slot is free again once the sandbox's directory is gone.
//!
//! hakoniwa writes a multi-line id map through the `newuidmap` and
//! `newgidmap` programs (from shadow's uidmap). The keeper points `PATH` at
//! `<data>/sandboxes/.native-bin`, where both names link to the `stacyvm` binary, whose
//! [`newidmap_main`] writes the map directly: the keeper is root, so it
//! needs no `/etc/subuid` entry, and the host needs no uidmap package.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The host ids of one sandbox: container id `n` is host id `base + n`
/// for `n < size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IdRange {
    pub base: u32,
    pub size: u32,
}

impl IdRange {
    /// The host id of container id `id`. Ids beyond the range (which an
    /// image should not have) become the range's last id, an unprivileged
    /// one inside: never the sandbox's root, so a setuid file of such an
    /// owner grants nothing.
    pub(crate) fn host(&self, id: u32) -> u32 {
        if id < self.size {
            self.base + id
        } else {
            self.base + self.size - 1
        }
    }

    /// The map hakoniwa is given: two lines, so that it goes through
    /// `newuidmap` (a single line is written by the child itself, which
    /// may only map its own id).
    pub(crate) fn map_lines(&self) -> [(u32, u32, u32); 2] {
        [(0, self.base, 1), (1, self.base + 1, self.size - 1)]
    }
}

/// The configured block and which of its slots are taken.
#[derive(Debug)]
pub(crate) struct IdAllocator {
    start: u32,
    size: u32,
    count: u32,
    /// `None` until the first spawn reads the existing sandboxes.
    used: std::sync::Mutex<Option<BTreeSet<u32>>>,
}

impl IdAllocator {
    pub(crate) fn new(config: &crate::config::NativeIdsConfig) -> Self {
        Self {
            start: config.start,
            size: config.size,
            count: config.count,
            used: std::sync::Mutex::new(None),
        }
    }

    fn slot_of(&self, range: IdRange) -> Option<u32> {
        let offset = range.base.checked_sub(self.start)?;
        (offset % self.size == 0 && offset / self.size < self.count).then_some(offset / self.size)
    }

    /// A free range. `existing` lists the ranges of the sandboxes on disk;
    /// it is read once, on the first call.
    pub(crate) fn allocate(
        &self,
        existing: impl FnOnce() -> Vec<IdRange>,
    ) -> Result<IdRange, String> {
        let mut used = super::lock(&self.used);
        let used = used.get_or_insert_with(|| {
            existing()
                .into_iter()
                .filter_map(|r| self.slot_of(r))
                .collect()
        });
        let slot = (0..self.count).find(|s| !used.contains(s)).ok_or_else(|| {
            format!(
                "all {} user-id ranges of providers.native.ids are in use",
                self.count
            )
        })?;
        used.insert(slot);
        Ok(IdRange {
            base: self.start + slot * self.size,
            size: self.size,
        })
    }

    /// Gives a range back (its sandbox is gone).
    pub(crate) fn release(&self, range: IdRange) {
        if let (Some(used), Some(slot)) = (super::lock(&self.used).as_mut(), self.slot_of(range)) {
            used.remove(&slot);
        }
    }
}

/// The directory the keeper puts first on `PATH`: `newuidmap` and
/// `newgidmap` there are the `stacyvm` binary.
/// `<data>/sandboxes/.native-bin`: next to the sandboxes directory, not in
/// it, which holds sandboxes only.
pub(crate) const SHIM_DIR: &str = ".native-bin";

/// Makes `<sandboxes>/../.native-bin/{newuidmap,newgidmap}` link to
/// `helper` (atomically: concurrent keepers may do this at once).
pub(crate) fn install_shims(sandboxes: &Path, helper: &Path) -> io::Result<std::path::PathBuf> {
    let dir = sandboxes.parent().unwrap_or(sandboxes).join(SHIM_DIR);
    std::fs::create_dir_all(&dir)?;
    for name in ["newuidmap", "newgidmap"] {
        let link = dir.join(name);
        if std::fs::read_link(&link).is_ok_and(|target| target == helper) {
            continue;
        }
        let tmp = dir.join(format!(".{name}-{}", uuid::Uuid::new_v4().as_simple()));
        std::os::unix::fs::symlink(helper, &tmp)?;
        std::fs::rename(&tmp, &link)?;
    }
    Ok(dir)
}

/// `newuidmap <pid> <inner> <outer> <count> ...` (and `newgidmap`): write
/// the map into `/proc/<pid>/{uid,gid}_map` in one write, as the kernel
/// requires. Only a process privileged over the target's parent namespace
/// (the keeper, as root) succeeds.
pub fn newidmap_main(program: &str, args: &[OsString]) -> i32 {
    let file = if program == "newgidmap" {
        "gid_map"
    } else {
        "uid_map"
    };
    let numbers: Option<Vec<u32>> = args
        .iter()
        .map(|a| a.to_str().and_then(|s| s.parse().ok()))
        .collect();
    let Some(numbers) = numbers.filter(|n| n.len() >= 4 && (n.len() - 1) % 3 == 0) else {
        eprintln!("usage: {program} <pid> <inner> <outer> <count> [...]");
        return 2;
    };
    let mut map = String::new();
    for line in numbers[1..].chunks(3) {
        map.push_str(&format!("{} {} {}\n", line[0], line[1], line[2]));
    }
    let path = format!("/proc/{}/{file}", numbers[0]);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(map.as_bytes()));
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{program}: writing {path}: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NativeIdsConfig;

    fn allocator(count: u32) -> IdAllocator {
        IdAllocator::new(&NativeIdsConfig {
            start: 100_000,
            size: 1000,
            count,
        })
    }

    #[test]
    fn ranges_are_distinct_and_reused_after_release() {
        let ids = allocator(3);
        let taken = IdRange {
            base: 101_000,
            size: 1000,
        };
        let a = ids.allocate(|| vec![taken]).expect("a");
        let b = ids.allocate(Vec::new).expect("b");
        assert_eq!((a.base, b.base), (100_000, 102_000));
        assert!(ids.allocate(Vec::new).is_err(), "all three in use");
        ids.release(a);
        assert_eq!(ids.allocate(Vec::new).expect("again").base, 100_000);
    }

    #[test]
    fn container_ids_map_into_the_range_only() {
        let r = IdRange {
            base: 100_000,
            size: 65536,
        };
        assert_eq!(r.host(0), 100_000);
        assert_eq!(r.host(1000), 101_000);
        assert_eq!(
            r.host(70_000),
            165_535,
            "out of range: the last id, not root"
        );
        assert_eq!(r.map_lines(), [(0, 100_000, 1), (1, 100_001, 65535)]);
    }
}
