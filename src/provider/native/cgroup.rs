//! Per-sandbox resource limits through cgroups: one cgroup
//! `stacyvm/<sandbox-id>` per sandbox, holding its PID 1 and (joined by
//! each exec helper) every command it runs.
//!
//! - cgroup v2 is used when a `cgroup2` mount offers the `memory`, `pids`
//!   and `cpu` controllers (`cgroup.controllers`); the sandbox gets one
//!   directory there, the controllers are enabled in the parents'
//!   `cgroup.subtree_control`.
//! - Otherwise the v1 per-controller hierarchies are used (`memory`,
//!   `pids`, `cpu`, `cpuacct`, each with its own mount point, or
//!   co-mounted as `cpu,cpuacct`): the sandbox gets one directory in each.
//!   A hybrid host (v1 controllers plus an empty v2 at
//!   `/sys/fs/cgroup/unified`) is a v1 host for this purpose.
//!
//! Limits: memory (`memory.max` / `memory.limit_in_bytes`) = the sandbox's
//! memory, no swap beyond it (`memory.swap.max = 0` / `memory.memsw.
//! limit_in_bytes` = the same value where swap accounting exists), the OOM
//! killer enabled; `pids.max` = `providers.native.pids_limit`; CPU as a CFS
//! quota of `vcpus` × 100 ms per 100 ms period.
//!
//! Hand-written rather than a crate: what is needed is a handful of file
//! writes, and the crates that cover v1 and v2 (`cgroups-rs`, `libcgroups`
//! from youki) pull in their own `nix` version (and, for libcgroups,
//! systemd D-Bus support) for what is here a few hundred lines of file reads and writes.
//!
//! Paths from `/proc/<pid>/cgroup` are taken relative to each hierarchy's
//! mount point, which holds when StacyVM runs in the host's cgroup
//! namespace (or its mounts show that namespace's root), the usual case.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The directory under each hierarchy's root that holds sandbox cgroups.
pub(crate) const PARENT: &str = "stacyvm";

/// The v1 controllers a sandbox cgroup lives in.
const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "cpuacct"];

/// The v2 controllers a sandbox cgroup needs.
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// CFS period: a quota of `vcpus` periods per period is `vcpus` CPUs.
const CPU_PERIOD_US: u64 = 100_000;

/// How old an unknown sandbox cgroup must be before start-up removes it.
const SWEEP_MIN_AGE: Duration = Duration::from_secs(60);

/// How long removal waits for the tasks of a cgroup to be gone.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the host's cgroups are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Layout {
    /// A unified hierarchy mounted here, with the controllers we need.
    V2 { root: PathBuf },
    /// v1 hierarchies: controller name → mount point.
    V1 { mounts: BTreeMap<String, PathBuf> },
}

/// What a sandbox cgroup is limited to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// 0: no memory limit.
    pub memory_bytes: u64,
    /// 0: no process limit.
    pub pids: u64,
    /// 0: no CPU quota.
    pub vcpus: u32,
}

impl Layout {
    /// The layout of this host, from `/proc/self/mountinfo`.
    pub(crate) fn detect() -> Result<Layout, String> {
        let text = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        Self::from_mountinfo(&text, |mount| {
            fs::read_to_string(mount.join("cgroup.controllers")).ok()
        })
    }

    /// The layout described by a mountinfo text; `controllers` reads the
    /// `cgroup.controllers` of a cgroup2 mount point.
    pub(crate) fn from_mountinfo(
        text: &str,
        controllers: impl Fn(&Path) -> Option<String>,
    ) -> Result<Layout, String> {
        let mounts: Vec<(String, PathBuf, String)> = text.lines().filter_map(parse_line).collect();
        for (fstype, point, _) in &mounts {
            if fstype != "cgroup2" {
                continue;
            }
            let Some(available) = controllers(point) else {
                continue;
            };
            let available: Vec<&str> = available.split_whitespace().collect();
            if V2_CONTROLLERS.iter().all(|c| available.contains(c)) {
                return Ok(Layout::V2 {
                    root: point.clone(),
                });
            }
        }
        let mut found = BTreeMap::new();
        for (fstype, point, options) in &mounts {
            if fstype != "cgroup" {
                continue;
            }
            for option in options.split(',') {
                if V1_CONTROLLERS.contains(&option) {
                    found
                        .entry(option.to_string())
                        .or_insert_with(|| point.clone());
                }
            }
        }
        let missing: Vec<&str> = V1_CONTROLLERS
            .iter()
            .copied()
            .filter(|c| !found.contains_key(*c))
            .collect();
        if missing.is_empty() {
            Ok(Layout::V1 { mounts: found })
        } else {
            Err(format!(
                "no usable cgroups: no cgroup2 mount offers memory, pids and cpu, and no cgroup v1 hierarchy is mounted for {}",
                missing.join(", ")
            ))
        }
    }

    /// The directories holding sandbox cgroups (one per hierarchy).
    fn parents(&self) -> Vec<PathBuf> {
        match self {
            Layout::V2 { root } => vec![root.join(PARENT)],
            Layout::V1 { mounts } => {
                let mut dirs: Vec<PathBuf> = mounts.values().map(|m| m.join(PARENT)).collect();
                dirs.sort();
                dirs.dedup();
                dirs
            }
        }
    }

    /// The cgroup of one sandbox.
    pub(crate) fn sandbox(&self, id: &str) -> SandboxCgroup {
        SandboxCgroup {
            layout: self.clone(),
            id: id.to_string(),
        }
    }

    /// Opens, for writing, the `cgroup.procs` of each sandbox cgroup
    /// (under `stacyvm/`) that `pid` is in, like `nsenter` opens the
    /// namespaces of a process: read `/proc/<pid>/cgroup` and map each
    /// hierarchy to its mount point. Writing `0` to a handle (see
    /// [`join`]) moves the writer into that cgroup, and works after a
    /// chroot into the sandbox, where the host's cgroupfs is out of sight.
    pub(crate) fn open_cgroups_of(&self, pid: i32) -> Result<Vec<OwnedFd>, String> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(|e| format!("reading the cgroups of the sandbox's init: {e}"))?;
        let mut handles = Vec::new();
        for procs in self.sandbox_procs_files(&text) {
            let handle = fs::OpenOptions::new()
                .write(true)
                .open(&procs)
                .map_err(|e| format!("opening the sandbox's cgroup {}: {e}", procs.display()))?;
            handles.push(OwnedFd::from(handle));
        }
        Ok(handles)
    }

    /// The `cgroup.procs` files of the sandbox cgroups named in a
    /// `/proc/<pid>/cgroup` text (one per hierarchy this layout uses).
    fn sandbox_procs_files(&self, proc_cgroup: &str) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for line in proc_cgroup.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if !path.starts_with(&format!("/{PARENT}/")) {
                continue;
            }
            let mount = match self {
                Layout::V2 { root } if controllers.is_empty() => root,
                Layout::V1 { mounts } if !controllers.is_empty() => {
                    match controllers.split(',').find_map(|c| mounts.get(c)) {
                        Some(mount) => mount,
                        None => continue,
                    }
                }
                _ => continue,
            };
            files.push(
                mount
                    .join(path.trim_start_matches('/'))
                    .join("cgroup.procs"),
            );
        }
        files
    }

    /// Removes the sandbox cgroups whose sandbox `keep` does not know and
    /// that are empty and older than [`SWEEP_MIN_AGE`]. The `stacyvm/`
    /// parent is shared by every StacyVM on the host, so a cgroup with
    /// processes (another installation's live sandbox) is never touched,
    /// and a fresh one may be a keeper's about to receive its PID 1.
    /// Returns the ids removed and the failures.
    pub(crate) fn sweep(&self, keep: impl Fn(&str) -> bool) -> (Vec<String>, Vec<String>) {
        let mut ids = Vec::new();
        for parent in self.parents() {
            let Ok(entries) = fs::read_dir(&parent) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let old_enough = entry
                    .metadata()
                    .ok()
                    .filter(|m| m.is_dir())
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= SWEEP_MIN_AGE);
                if old_enough && !keep(&name) && !ids.contains(&name) {
                    ids.push(name);
                }
            }
        }
        let mut failed = Vec::new();
        let mut removed = Vec::new();
        for id in ids {
            let cgroup = self.sandbox(&id);
            let mut gone = true;
            for dir in cgroup.dirs() {
                match fs::remove_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    // Still has processes: not an orphan.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => gone = false,
                    Err(e) => {
                        gone = false;
                        failed.push(format!("removing cgroup {}: {e}", dir.display()));
                    }
                }
            }
            if gone {
                removed.push(id);
            }
        }
        (removed, failed)
    }
}

/// One entry of mountinfo: (filesystem type, mount point, super options).
fn parse_line(line: &str) -> Option<(String, PathBuf, String)> {
    // `id parent major:minor root mountpoint options [optional...] - fstype source superoptions`
    let (before, after) = line.split_once(" - ")?;
    let point = before.split(' ').nth(4)?;
    let mut after = after.split(' ');
    let fstype = after.next()?;
    let _source = after.next()?;
    let options = after.next().unwrap_or("");
    Some((
        fstype.to_string(),
        PathBuf::from(unescape(point)),
        options.to_string(),
    ))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = field
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup of one sandbox (which may or may not exist yet).
#[derive(Debug, Clone)]
pub(crate) struct SandboxCgroup {
    layout: Layout,
    id: String,
}

impl SandboxCgroup {
    /// The sandbox's directory in the hierarchy of `controller` (v2: the
    /// one directory).
    fn dir(&self, controller: &str) -> Option<PathBuf> {
        let base = match &self.layout {
            Layout::V2 { root } => root,
            Layout::V1 { mounts } => mounts.get(controller)?,
        };
        Some(base.join(PARENT).join(&self.id))
    }

    /// Every directory of the sandbox's cgroup (one per hierarchy).
    fn dirs(&self) -> Vec<PathBuf> {
        self.layout
            .parents()
            .into_iter()
            .map(|p| p.join(&self.id))
            .collect()
    }

    fn file(&self, controller: &str, name: &str) -> Option<PathBuf> {
        self.dir(controller).map(|d| d.join(name))
    }

    /// Creates the cgroup (or reuses the one left by an earlier init) and
    /// sets its limits. On error nothing of it is left.
    pub(crate) fn create(&self, limits: &Limits) -> Result<(), String> {
        let made = self.try_create(limits);
        if made.is_err() {
            crate::provider::best_effort("removing a half-made cgroup", self.remove());
        }
        made
    }

    fn try_create(&self, limits: &Limits) -> Result<(), String> {
        let write = |path: PathBuf, value: &str| -> Result<(), String> {
            fs::write(&path, value)
                .map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
        };
        let mkdir = |path: &Path| -> Result<(), String> {
            fs::create_dir_all(path).map_err(|e| format!("creating cgroup {}: {e}", path.display()))
        };
        let memory = if limits.memory_bytes > 0 {
            limits.memory_bytes.to_string()
        } else {
            "max".to_string()
        };
        match &self.layout {
            Layout::V2 { root } => {
                let parent = root.join(PARENT);
                mkdir(&parent)?;
                let enable = V2_CONTROLLERS
                    .iter()
                    .map(|c| format!("+{c}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                for dir in [root.as_path(), parent.as_path()] {
                    let path = dir.join("cgroup.subtree_control");
                    let enabled = fs::read_to_string(&path).unwrap_or_default();
                    let enabled: Vec<&str> = enabled.split_whitespace().collect();
                    if !V2_CONTROLLERS.iter().all(|c| enabled.contains(c)) {
                        fs::write(&path, &enable).map_err(|e| {
                            let hint = if e.raw_os_error() == Some(libc::EBUSY) {
                                // cgroup v2's "no internal processes" rule.
                                " (that cgroup holds processes itself, e.g. StacyVM in a container's cgroup namespace: move them to a child cgroup first)"
                            } else {
                                ""
                            };
                            format!("enabling {enable:?} in {}: {e}{hint}", path.display())
                        })?;
                    }
                }
                let dir = parent.join(&self.id);
                mkdir(&dir)?;
                write(dir.join("memory.max"), &memory)?;
                // Absent when the kernel has no swap support at all.
                if dir.join("memory.swap.max").exists() {
                    write(dir.join("memory.swap.max"), "0")?;
                }
                let pids = match limits.pids {
                    0 => "max".to_string(),
                    n => n.to_string(),
                };
                write(dir.join("pids.max"), &pids)?;
                let quota = match limits.vcpus {
                    0 => "max".to_string(),
                    n => (u64::from(n) * CPU_PERIOD_US).to_string(),
                };
                write(dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
            Layout::V1 { .. } => {
                for dir in self.dirs() {
                    mkdir(&dir)?;
                }
                let memory = if limits.memory_bytes > 0 {
                    memory
                } else {
                    "-1".to_string()
                };
                let file = |c: &str, name: &str| {
                    self.file(c, name)
                        .ok_or_else(|| format!("no cgroup v1 {c} hierarchy"))
                };
                let limit = file("memory", "memory.limit_in_bytes")?;
                let memsw = file("memory", "memory.memsw.limit_in_bytes")?;
                // memsw must stay >= the limit: an existing cgroup with a
                // smaller memsw needs memsw raised first.
                if memsw.exists() {
                    if write(limit.clone(), &memory).is_err() {
                        write(memsw.clone(), &memory)?;
                        write(limit, &memory)?;
                    } else {
                        write(memsw, &memory)?;
                    }
                } else {
                    write(limit, &memory)?;
                }
                write(file("memory", "memory.oom_control")?, "0")?;
                let pids = match limits.pids {
                    0 => "max".to_string(),
                    n => n.to_string(),
                };
                write(file("pids", "pids.max")?, &pids)?;
                write(
                    file("cpu", "cpu.cfs_period_us")?,
                    &CPU_PERIOD_US.to_string(),
                )?;
                let quota = match limits.vcpus {
                    0 => "-1".to_string(),
                    n => (u64::from(n) * CPU_PERIOD_US).to_string(),
                };
                write(file("cpu", "cpu.cfs_quota_us")?, &quota)?;
            }
        }
        Ok(())
    }

    /// Moves a process (all its threads) into the cgroup.
    pub(crate) fn add_process(&self, pid: i32) -> Result<(), String> {
        for dir in self.dirs() {
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, pid.to_string())
                .map_err(|e| format!("moving pid {pid} into {}: {e}", procs.display()))?;
        }
        Ok(())
    }

    /// Removes the cgroup (every hierarchy), waiting briefly for its tasks
    /// to drain and SIGKILLing stragglers after a second. Idempotent.
    pub(crate) fn remove(&self) -> Result<(), String> {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        let kill_after = Instant::now() + Duration::from_secs(1);
        for dir in self.dirs() {
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        if Instant::now() >= deadline {
                            return Err(format!("removing cgroup {}: {e}", dir.display()));
                        }
                        if Instant::now() >= kill_after {
                            kill_tasks(&dir);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(format!("removing cgroup {}: {e}", dir.display())),
                }
            }
        }
        Ok(())
    }

    /// How many times the OOM killer struck in the cgroup (`None`: no
    /// such counter readable).
    pub(crate) fn oom_kills(&self) -> Option<u64> {
        let name = match self.layout {
            Layout::V2 { .. } => "memory.events",
            Layout::V1 { .. } => "memory.oom_control",
        };
        read_key(&self.file("memory", name)?, "oom_kill")
    }

    /// How often memory use hit the limit (v2 `memory.events` `max`, v1
    /// `memory.failcnt`): no OOM kill happens without it rising.
    pub(crate) fn limit_hits(&self) -> Option<u64> {
        match self.layout {
            Layout::V2 { .. } => read_key(&self.file("memory", "memory.events")?, "max"),
            Layout::V1 { .. } => read_number(&self.file("memory", "memory.failcnt")?),
        }
    }

    /// Current memory use, in bytes.
    pub(crate) fn memory_bytes(&self) -> Option<u64> {
        let name = match self.layout {
            Layout::V2 { .. } => "memory.current",
            Layout::V1 { .. } => "memory.usage_in_bytes",
        };
        read_number(&self.file("memory", name)?)
    }

    /// Processes (v1: tasks) in the cgroup now.
    pub(crate) fn pids(&self) -> Option<u64> {
        read_number(&self.file("pids", "pids.current")?)
    }

    /// CPU time used so far, in nanoseconds.
    pub(crate) fn cpu_usage_ns(&self) -> Option<u64> {
        match self.layout {
            Layout::V2 { .. } => {
                read_key(&self.file("cpu", "cpu.stat")?, "usage_usec").map(|us| us * 1000)
            }
            Layout::V1 { .. } => read_number(&self.file("cpuacct", "cpuacct.usage")?),
        }
    }
}

/// Moves the calling process into the cgroups behind `handles` (from
/// [`Layout::open_cgroups_of`]). Only a `write` per handle: safe between
/// fork and exec.
pub(crate) fn join(handles: &[std::os::fd::RawFd]) -> io::Result<()> {
    for &fd in handles {
        // SAFETY: `fd` is an open descriptor owned by the parent for as
        // long as the child runs this; the buffer is a static literal.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn read_number(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`key value` lines).
fn read_key(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// SIGKILLs what is left in a cgroup that is being removed: by then its
/// sandbox is gone, so whatever remains is one of its processes.
fn kill_tasks(dir: &Path) {
    let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            crate::provider::best_effort_quiet(
                "killing a process of a cgroup",
                rustix::process::kill_process(pid, rustix::process::Signal::KILL),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This development machine: v1 controllers, an empty v2 at
    /// /sys/fs/cgroup/unified.
    const HYBRID: &str = "\
22 1 0:21 / / rw,relatime - overlay overlay rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// A systemd host on the unified hierarchy only.
    const V2_ONLY: &str = "\
21 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
25 21 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:3 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn a_hybrid_host_uses_its_v1_controllers() {
        let layout = Layout::from_mountinfo(HYBRID, |p| {
            assert_eq!(p, Path::new("/sys/fs/cgroup/unified"));
            Some("\n".to_string())
        })
        .expect("layout");
        let Layout::V1 { mounts } = &layout else {
            panic!("{layout:?}");
        };
        assert_eq!(mounts["memory"], Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(mounts["pids"], Path::new("/sys/fs/cgroup/pids"));
        assert_eq!(mounts["cpu"], Path::new("/sys/fs/cgroup/cpu"));
        assert_eq!(mounts["cpuacct"], Path::new("/sys/fs/cgroup/cpuacct"));
        assert_eq!(mounts.len(), 4);
        let cg = layout.sandbox("sb-1");
        assert_eq!(
            cg.dirs(),
            [
                "/sys/fs/cgroup/cpu/stacyvm/sb-1",
                "/sys/fs/cgroup/cpuacct/stacyvm/sb-1",
                "/sys/fs/cgroup/memory/stacyvm/sb-1",
                "/sys/fs/cgroup/pids/stacyvm/sb-1",
            ]
            .map(PathBuf::from)
        );
        // Co-mounted cpu,cpuacct is one hierarchy, one directory.
        let comounted = HYBRID.replace("rw,cpu\n", "rw,cpu,cpuacct\n").replace(
            "33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n",
            "",
        );
        let layout = Layout::from_mountinfo(&comounted, |_| None).expect("layout");
        assert_eq!(layout.sandbox("x").dirs().len(), 3);
    }

    #[test]
    fn a_v2_host_with_the_controllers_uses_v2() {
        let layout = Layout::from_mountinfo(V2_ONLY, |p| {
            assert_eq!(p, Path::new("/sys/fs/cgroup"));
            Some("cpuset cpu io memory hugetlb pids rdma misc\n".to_string())
        })
        .expect("layout");
        assert_eq!(
            layout,
            Layout::V2 {
                root: PathBuf::from("/sys/fs/cgroup")
            }
        );
        assert_eq!(
            layout.sandbox("sb-1").dirs(),
            [PathBuf::from("/sys/fs/cgroup/stacyvm/sb-1")]
        );
        // Without the pids controller (and no v1), there is nothing to use.
        let err = Layout::from_mountinfo(V2_ONLY, |_| Some("cpu memory".into()))
            .expect_err("no pids controller anywhere");
        assert!(err.contains("memory, pids, cpu, cpuacct"), "{err}");
    }

    /// The files a sandbox cgroup is given, on a plain directory standing
    /// in for each layout's cgroupfs.
    #[test]
    fn limits_are_written_in_each_layouts_terms() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let read = |p: PathBuf| fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        let limits = Limits {
            memory_bytes: 64 << 20,
            pids: 512,
            vcpus: 2,
        };

        let root = tmp.path().join("v2");
        let dir = root.join(PARENT).join("sb");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("memory.swap.max"), "max").expect("swap file");
        let v2 = Layout::V2 { root: root.clone() };
        v2.sandbox("sb").create(&limits).expect("v2 create");
        assert_eq!(read(dir.join("memory.max")), "67108864");
        assert_eq!(read(dir.join("memory.swap.max")), "0");
        assert_eq!(read(dir.join("pids.max")), "512");
        assert_eq!(read(dir.join("cpu.max")), "200000 100000");
        for parent in [root.clone(), root.join(PARENT)] {
            assert_eq!(
                read(parent.join("cgroup.subtree_control")),
                "+memory +pids +cpu"
            );
        }

        let mounts: BTreeMap<String, PathBuf> = V1_CONTROLLERS
            .iter()
            .map(|c| (c.to_string(), tmp.path().join("v1").join(c)))
            .collect();
        let memsw = mounts["memory"].join(PARENT).join("sb");
        fs::create_dir_all(&memsw).expect("mkdir");
        fs::write(memsw.join("memory.memsw.limit_in_bytes"), "-1").expect("memsw file");
        let v1 = Layout::V1 { mounts };
        let cg = v1.sandbox("sb");
        cg.create(&Limits { vcpus: 1, ..limits })
            .expect("v1 create");
        let file = |c: &str, n: &str| cg.file(c, n).expect("file");
        assert_eq!(read(file("memory", "memory.limit_in_bytes")), "67108864");
        assert_eq!(
            read(file("memory", "memory.memsw.limit_in_bytes")),
            "67108864"
        );
        assert_eq!(read(file("memory", "memory.oom_control")), "0");
        assert_eq!(read(file("pids", "pids.max")), "512");
        assert_eq!(read(file("cpu", "cpu.cfs_period_us")), "100000");
        assert_eq!(read(file("cpu", "cpu.cfs_quota_us")), "100000");
        assert!(cg.dir("cpuacct").expect("dir").is_dir());
        // No limits at all.
        let none = Limits {
            memory_bytes: 0,
            pids: 0,
            vcpus: 0,
        };
        cg.create(&none).expect("v1 unlimited");
        assert_eq!(read(file("memory", "memory.limit_in_bytes")), "-1");
        assert_eq!(read(file("pids", "pids.max")), "max");
        assert_eq!(read(file("cpu", "cpu.cfs_quota_us")), "-1");
    }

    #[test]
    fn commands_join_the_inits_sandbox_cgroups_only() {
        let hybrid = Layout::from_mountinfo(HYBRID, |_| Some(String::new())).expect("layout");
        let init = "9:name=systemd:/\n8:pids:/stacyvm/sb\n4:memory:/stacyvm/sb\n\
                    3:cpuset:/\n2:cpuacct:/stacyvm/sb\n1:cpu:/stacyvm/sb\n0::/user.slice\n";
        assert_eq!(
            hybrid.sandbox_procs_files(init),
            [
                "/sys/fs/cgroup/pids/stacyvm/sb/cgroup.procs",
                "/sys/fs/cgroup/memory/stacyvm/sb/cgroup.procs",
                "/sys/fs/cgroup/cpuacct/stacyvm/sb/cgroup.procs",
                "/sys/fs/cgroup/cpu/stacyvm/sb/cgroup.procs",
            ]
            .map(PathBuf::from)
        );
        let v2 = Layout::from_mountinfo(V2_ONLY, |_| Some("memory pids cpu".into())).expect("v2");
        assert_eq!(
            v2.sandbox_procs_files("0::/stacyvm/sb\n"),
            [PathBuf::from("/sys/fs/cgroup/stacyvm/sb/cgroup.procs")]
        );
        // An init from before cgroups: nothing to join.
        assert!(
            v2.sandbox_procs_files("0::/system.slice/stacyvm.service\n")
                .is_empty()
        );
    }

    #[test]
    fn mount_points_are_unescaped() {
        let line = "40 31 0:37 / /mnt/my\\040cgroups rw - cgroup cgroup rw,memory";
        let (fstype, point, options) = parse_line(line).expect("parsed");
        assert_eq!(fstype, "cgroup");
        assert_eq!(point, Path::new("/mnt/my cgroups"));
        assert_eq!(options, "rw,memory");
    }
}
