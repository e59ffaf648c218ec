//! What makes a native sandbox a security boundary, applied the same way
//! to its PID 1 (in [`super::init`]) and to every command (in
//! [`super::exec`]):
//!
//! 1. [`become_sandbox_root`]: the process takes uid/gid 0 *of the
//!    sandbox's user namespace*, which is an unprivileged host id from the
//!    sandbox's own range ([`super::ids`]), never host uid 0.
//! 2. [`harden_mounts`] (PID 1 only, once per sandbox: the mount namespace
//!    is shared by every command): the procfs and sysfs masking runc
//!    applies: `/proc/sys`, `/proc/sysrq-trigger`, `/proc/irq`,
//!    `/proc/bus`, `/proc/fs` read-only; `/proc/kcore`, `/proc/keys`,
//!    `/proc/timer_list` and the like masked (`/sys` is not mounted); for the
//!    `host` image, the host's secrets (`/etc/shadow`, SSH host keys, the
//!    StacyVM configuration) masked.
//! 3. [`restrict`]: the capability set reduced to the one the docker
//!    provider keeps ([`crate::provider::SANDBOX_CAPABILITIES`]), bounding
//!    set included, `no_new_privs`, and a seccomp filter that refuses what
//!    Docker's default profile refuses to a container without
//!    `CAP_SYS_ADMIN` (see [`seccomp_denials`]). With neither
//!    `CAP_SYS_ADMIN` nor `mount(2)`, nothing inside can remount a
//!    read-only mount writable or unmask a masked path.

use std::collections::BTreeMap;
use std::io;
use std::str::FromStr;

use rustix::mount::{MountFlags, MountPropagationFlags};

/// `/proc` entries made read-only, as runc does.
const PROC_READ_ONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Entries hidden behind an empty read-only tmpfs (directories) or
/// `/dev/null` (files), as runc does.
const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
];

/// Host files the `host` image must never show, readable or not.
const HOST_SECRETS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/ssl/private",
    "/etc/stacyvm",
    "/root",
];

/// Takes uid and gid 0 of the current user namespace and no supplementary
/// groups. Run after entering the sandbox's user namespace: before, the
/// process is host root, which the sandbox's namespace does not map.
pub(crate) fn become_sandbox_root() -> io::Result<()> {
    // SAFETY: plain system calls with constant arguments.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(0, 0, 0) != 0
            || libc::setresuid(0, 0, 0) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes the keeper (host root) the owner of the sandbox's id range while
/// keeping its capabilities: host uid and gid `base`, every capability
/// still effective, and `CAP_SETUID`, `CAP_SETGID`, `CAP_SETFCAP`,
/// `CAP_DAC_OVERRIDE` ambient
/// (so that the `newuidmap` it runs may write the sandbox's id map).
///
/// hakoniwa's child (the future PID 1) is a fork of the keeper: it must
/// not be host uid 0, which the sandbox's namespace does not map (creating
/// its `/dev` would fail with EOVERFLOW) and must never map. Forked as
/// `base`, it is the sandbox's root from its first instruction on. The
/// keeper stays invisible to the sandbox (another PID namespace), and its
/// capabilities are not a ptrace target for processes that lack them.
pub(crate) fn become_range_owner(base: u32) -> io::Result<()> {
    let caps_err = |e: caps::errors::CapsError| io::Error::other(format!("capabilities: {e}"));
    rustix::thread::set_keep_capabilities(true)?;
    // SAFETY: plain system calls with constant arguments; the keeper is
    // single threaded.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(base, base, base) != 0
            || libc::setresuid(base, base, base) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    rustix::thread::set_keep_capabilities(false)?;
    let permitted = caps::read(None, caps::CapSet::Permitted).map_err(caps_err)?;
    caps::set(None, caps::CapSet::Effective, &permitted).map_err(caps_err)?;
    let mapping: caps::CapsHashSet = [
        caps::Capability::CAP_SETUID,
        caps::Capability::CAP_SETGID,
        caps::Capability::CAP_SETFCAP,
        // The child is not dumpable after the credential change, so its
        // /proc files belong to host root.
        caps::Capability::CAP_DAC_OVERRIDE,
    ]
    .into_iter()
    .collect();
    caps::set(None, caps::CapSet::Inheritable, &mapping).map_err(caps_err)?;
    for cap in mapping {
        caps::raise(None, caps::CapSet::Ambient, cap).map_err(caps_err)?;
    }
    Ok(())
}

/// Masks and read-only mounts over `/proc` (and `/sys`, should a
/// rootfs bring one), and the host's secrets for the `host` image. Run by
/// PID 1 inside its namespaces, before [`restrict`].
pub(crate) fn harden_mounts(host_image: bool) -> io::Result<()> {
    let std_path = |p: &str| std::path::Path::new(p).exists();
    for path in PROC_READ_ONLY {
        if std_path(path) {
            read_only(path)?;
        }
    }
    let secrets: &[&str] = if host_image { HOST_SECRETS } else { &[] };
    for path in MASKED.iter().chain(secrets) {
        mask(path)?;
    }
    Ok(())
}

/// Bind `path` over itself and make that read-only.
fn read_only(path: &str) -> io::Result<()> {
    let fail = |e: rustix::io::Errno| io::Error::other(format!("making {path} read-only: {e}"));
    rustix::mount::mount_bind(path, path).map_err(fail)?;
    rustix::mount::mount_remount(
        path,
        MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        "",
    )
    .map_err(fail)?;
    // Nothing mounted under it later may propagate anywhere.
    rustix::mount::mount_change(path, MountPropagationFlags::PRIVATE).map_err(fail)
}

/// Hide `path` (absent: nothing to do) behind `/dev/null` or an empty
/// read-only tmpfs.
fn mask(path: &str) -> io::Result<()> {
    let fail = |e: rustix::io::Errno| io::Error::other(format!("masking {path}: {e}"));
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if meta.is_dir() {
        rustix::mount::mount(
            "tmpfs",
            path,
            "tmpfs",
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            Some(c"size=0,mode=000"),
        )
        .map_err(fail)
    } else if meta.file_type().is_symlink() {
        // A symlink cannot be a mount point; what it names is either
        // masked itself or outside the tree.
        Ok(())
    } else {
        rustix::mount::mount_bind("/dev/null", path).map_err(fail)
    }
}

/// The capabilities a sandbox keeps, as `caps` values.
fn kept_capabilities() -> io::Result<caps::CapsHashSet> {
    crate::provider::SANDBOX_CAPABILITIES
        .iter()
        .map(|name| {
            caps::Capability::from_str(&format!("CAP_{name}"))
                .map_err(|e| io::Error::other(format!("capability {name}: {e}")))
        })
        .collect()
}

/// Reduces capabilities (bounding, permitted, effective, inheritable and
/// ambient sets) to the kept set, sets `no_new_privs` and loads the seccomp
/// filter. Irreversible; the last step before the sandbox's code runs.
pub(crate) fn restrict() -> io::Result<()> {
    let kept = kept_capabilities()?;
    let caps_err = |e: caps::errors::CapsError| io::Error::other(format!("capabilities: {e}"));
    for cap in caps::all() {
        if !kept.contains(&cap) {
            caps::drop(None, caps::CapSet::Bounding, cap).map_err(caps_err)?;
        }
    }
    caps::clear(None, caps::CapSet::Ambient).map_err(caps_err)?;
    caps::set(None, caps::CapSet::Inheritable, &caps::CapsHashSet::new()).map_err(caps_err)?;
    caps::set(None, caps::CapSet::Effective, &kept).map_err(caps_err)?;
    caps::set(None, caps::CapSet::Permitted, &kept).map_err(caps_err)?;
    rustix::thread::set_no_new_privs(true)?;
    for program in seccomp_programs()? {
        seccompiler::apply_filter(&program)
            .map_err(|e| io::Error::other(format!("seccomp: {e}")))?;
    }
    Ok(())
}

/// `CLONE_NEW*` flags: creating namespaces needs `CAP_SYS_ADMIN` under
/// Docker's profile, which a sandbox does not have.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// The system calls refused with EPERM: what Docker's default seccomp
/// profile does not allow a container without `CAP_SYS_ADMIN`,
/// `CAP_SYS_MODULE`, `CAP_SYS_TIME`, `CAP_SYS_BOOT`, `CAP_SYS_RAWIO`,
/// `CAP_SYS_PTRACE`-free ptrace aside (allowed, as in Docker on kernels
/// from 4.8): mounting and namespaces, kernel modules and keyrings, BPF
/// and perf, clocks, reboot and kexec, swap, quotas, raw I/O ports, NUMA
/// policy, handle-based opens, cross-process memory access, userfaultfd and
/// io_uring. `clone` is refused only with a namespace flag; `clone3` gets
/// ENOSYS so that libc falls back to `clone`, whose flags can be checked.
pub(crate) fn seccomp_denials() -> Vec<(&'static str, i64)> {
    vec![
        ("acct", libc::SYS_acct),
        ("add_key", libc::SYS_add_key),
        ("bpf", libc::SYS_bpf),
        ("clock_adjtime", libc::SYS_clock_adjtime),
        ("clock_settime", libc::SYS_clock_settime),
        ("delete_module", libc::SYS_delete_module),
        ("finit_module", libc::SYS_finit_module),
        ("fsconfig", libc::SYS_fsconfig),
        ("fsmount", libc::SYS_fsmount),
        ("fsopen", libc::SYS_fsopen),
        ("fspick", libc::SYS_fspick),
        ("get_mempolicy", libc::SYS_get_mempolicy),
        ("init_module", libc::SYS_init_module),
        ("io_uring_enter", libc::SYS_io_uring_enter),
        ("io_uring_register", libc::SYS_io_uring_register),
        ("io_uring_setup", libc::SYS_io_uring_setup),
        ("ioperm", libc::SYS_ioperm),
        ("iopl", libc::SYS_iopl),
        ("kcmp", libc::SYS_kcmp),
        ("kexec_file_load", libc::SYS_kexec_file_load),
        ("kexec_load", libc::SYS_kexec_load),
        ("keyctl", libc::SYS_keyctl),
        ("lookup_dcookie", libc::SYS_lookup_dcookie),
        ("mbind", libc::SYS_mbind),
        ("mount", libc::SYS_mount),
        ("mount_setattr", libc::SYS_mount_setattr),
        ("move_mount", libc::SYS_move_mount),
        ("move_pages", libc::SYS_move_pages),
        ("name_to_handle_at", libc::SYS_name_to_handle_at),
        ("nfsservctl", libc::SYS_nfsservctl),
        ("open_by_handle_at", libc::SYS_open_by_handle_at),
        ("open_tree", libc::SYS_open_tree),
        ("perf_event_open", libc::SYS_perf_event_open),
        ("pivot_root", libc::SYS_pivot_root),
        ("process_vm_readv", libc::SYS_process_vm_readv),
        ("process_vm_writev", libc::SYS_process_vm_writev),
        ("quotactl", libc::SYS_quotactl),
        ("reboot", libc::SYS_reboot),
        ("request_key", libc::SYS_request_key),
        ("set_mempolicy", libc::SYS_set_mempolicy),
        ("setns", libc::SYS_setns),
        ("settimeofday", libc::SYS_settimeofday),
        ("swapoff", libc::SYS_swapoff),
        ("swapon", libc::SYS_swapon),
        ("_sysctl", libc::SYS__sysctl),
        ("sysfs", libc::SYS_sysfs),
        ("syslog", libc::SYS_syslog),
        ("umount2", libc::SYS_umount2),
        ("unshare", libc::SYS_unshare),
        ("uselib", libc::SYS_uselib),
        ("userfaultfd", libc::SYS_userfaultfd),
        ("ustat", libc::SYS_ustat),
        ("vhangup", libc::SYS_vhangup),
    ]
}

fn target_arch() -> io::Result<seccompiler::TargetArch> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| io::Error::other(format!("seccomp: unsupported architecture: {e:?}")))
}

/// The compiled filters: EPERM for [`seccomp_denials`] and namespace
/// flags on `clone`, ENOSYS for `clone3`.
fn seccomp_programs() -> io::Result<Vec<seccompiler::BpfProgram>> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    let err = |e: seccompiler::BackendError| io::Error::other(format!("seccomp: {e}"));
    let arch = target_arch()?;
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = seccomp_denials()
        .into_iter()
        .map(|(_, nr)| (nr, Vec::new()))
        .collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    denied.insert(libc::SYS_clone, clone_rules);
    let eperm = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(err)?;
    let enosys = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(err)?;
    let mut programs = vec![no_x32()];
    for filter in [eperm, enosys] {
        programs.push(seccompiler::BpfProgram::try_from(filter).map_err(err)?);
    }
    Ok(programs)
}

/// x32 system calls report the x86_64 architecture with bit 30 set on
/// their number, so they match none of the numbers above and would pass a
/// filter that allows by default: refuse them all (nothing a sandbox runs
/// is built for x32). On other architectures the program allows all.
fn no_x32() -> seccompiler::BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20;
    const JGE_K: u16 = 0x05 | 0x30;
    const RET_K: u16 = 0x06;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let stmt = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let deny = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    if cfg!(target_arch = "x86_64") {
        vec![
            // seccomp_data.nr is at offset 0.
            stmt(LD_W_ABS, 0),
            sock_filter {
                code: JGE_K,
                jt: 0,
                jf: 1,
                k: X32_SYSCALL_BIT,
            },
            stmt(RET_K, deny),
            stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        ]
    } else {
        vec![stmt(RET_K, libc::SECCOMP_RET_ALLOW)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_this_machine() {
        let programs = seccomp_programs().expect("compile");
        assert_eq!(programs.len(), 3);
        assert!(programs.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn kept_capabilities_are_the_docker_providers() {
        let kept = kept_capabilities().expect("known names");
        assert_eq!(kept.len(), crate::provider::SANDBOX_CAPABILITIES.len());
        assert!(kept.contains(&caps::Capability::CAP_KILL));
        assert!(!kept.contains(&caps::Capability::CAP_SYS_ADMIN));
    }

    #[test]
    fn no_system_call_is_listed_twice() {
        let denials = seccomp_denials();
        let unique: std::collections::BTreeSet<_> = denials.iter().map(|(_, nr)| nr).collect();
        assert_eq!(unique.len(), denials.len());
    }
}
