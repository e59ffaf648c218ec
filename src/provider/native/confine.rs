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
//!    `CAP_SYS_ADMIN`: an allowlist (see [`seccomp_programs`]). With neither
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

/// `CLONE_NEW*` flags (and `CLONE_NEWTIME`'s neighbour bits Docker's
/// mask covers): `clone` with any of them is refused, as Docker's profile
/// refuses it to a container without `CAP_SYS_ADMIN`.
const CLONE_NAMESPACE_MASK: u64 = 0x7E02_0000;

/// `socket(2)` families refused: `AF_VSOCK`, as in Docker's profile.
const AF_VSOCK: u64 = 40;

/// The `personality(2)` values allowed, Docker's list: `PER_LINUX`,
/// `UNAME26`, `PER_LINUX32`, `PER_LINUX32|UNAME26` and the query
/// `0xffffffff`. Others (`ADDR_NO_RANDOMIZE`, `READ_IMPLIES_EXEC`) are
/// refused.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

macro_rules! allow {
    ($($name:ident),* $(,)?) => { &[$((stringify!($name), libc::$name)),*] };
}

/// The system calls a sandbox may make unconditionally: Docker's default
/// profile (moby `profiles/seccomp/default.json`) for a container without
/// `CAP_SYS_ADMIN`, on the generic (all architectures) table, less three
/// that StacyVM refuses although Docker allows them: the `io_uring` calls
/// (a large kernel attack surface, off in Docker 25 and later too),
/// `name_to_handle_at` and `process_vm_readv`/`writev` (cross-process
/// memory access; Docker allows them only from kernel 4.8 with ptrace).
const ALLOWED: &[(&str, i64)] = allow![
    SYS_accept,
    SYS_accept4,
    SYS_adjtimex,
    SYS_bind,
    SYS_brk,
    SYS_capget,
    SYS_capset,
    SYS_chdir,
    SYS_clock_adjtime,
    SYS_clock_getres,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_close,
    SYS_close_range,
    SYS_connect,
    SYS_copy_file_range,
    SYS_dup,
    SYS_dup3,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_eventfd2,
    SYS_execve,
    SYS_execveat,
    SYS_exit,
    SYS_exit_group,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_fadvise64,
    SYS_fallocate,
    SYS_fanotify_mark,
    SYS_fchdir,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchown,
    SYS_fchownat,
    SYS_fcntl,
    SYS_fdatasync,
    SYS_fgetxattr,
    SYS_flistxattr,
    SYS_flock,
    SYS_fremovexattr,
    SYS_fsetxattr,
    SYS_fstat,
    SYS_fstatfs,
    SYS_fsync,
    SYS_ftruncate,
    SYS_futex,
    SYS_futex_waitv,
    SYS_getcpu,
    SYS_getcwd,
    SYS_getdents64,
    SYS_getegid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getgroups,
    SYS_getitimer,
    SYS_getpeername,
    SYS_getpgid,
    SYS_getpid,
    SYS_getppid,
    SYS_getpriority,
    SYS_getrandom,
    SYS_getresgid,
    SYS_getresuid,
    SYS_get_robust_list,
    SYS_getrusage,
    SYS_getsid,
    SYS_getsockname,
    SYS_getsockopt,
    SYS_gettid,
    SYS_gettimeofday,
    SYS_getuid,
    SYS_getxattr,
    SYS_inotify_add_watch,
    SYS_inotify_init1,
    SYS_inotify_rm_watch,
    SYS_io_cancel,
    SYS_ioctl,
    SYS_io_destroy,
    SYS_io_getevents,
    SYS_ioprio_get,
    SYS_ioprio_set,
    SYS_io_setup,
    SYS_io_submit,
    SYS_kill,
    SYS_landlock_add_rule,
    SYS_landlock_create_ruleset,
    SYS_landlock_restrict_self,
    SYS_lgetxattr,
    SYS_linkat,
    SYS_listen,
    SYS_listxattr,
    SYS_llistxattr,
    SYS_lremovexattr,
    SYS_lseek,
    SYS_lsetxattr,
    SYS_madvise,
    SYS_membarrier,
    SYS_memfd_create,
    SYS_memfd_secret,
    SYS_mincore,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_mlock,
    SYS_mlock2,
    SYS_mlockall,
    SYS_mmap,
    SYS_mprotect,
    SYS_mq_getsetattr,
    SYS_mq_notify,
    SYS_mq_open,
    SYS_mq_timedreceive,
    SYS_mq_timedsend,
    SYS_mq_unlink,
    SYS_mremap,
    SYS_msgctl,
    SYS_msgget,
    SYS_msgrcv,
    SYS_msgsnd,
    SYS_msync,
    SYS_munlock,
    SYS_munlockall,
    SYS_munmap,
    SYS_nanosleep,
    SYS_newfstatat,
    SYS_openat,
    SYS_openat2,
    SYS_pidfd_open,
    SYS_pidfd_send_signal,
    SYS_pipe2,
    SYS_pkey_alloc,
    SYS_pkey_free,
    SYS_pkey_mprotect,
    SYS_ppoll,
    SYS_prctl,
    SYS_pread64,
    SYS_preadv,
    SYS_preadv2,
    SYS_prlimit64,
    SYS_process_mrelease,
    SYS_pselect6,
    SYS_ptrace,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_pwritev2,
    SYS_read,
    SYS_readahead,
    SYS_readlinkat,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmmsg,
    SYS_recvmsg,
    SYS_remap_file_pages,
    SYS_removexattr,
    SYS_renameat2,
    SYS_restart_syscall,
    SYS_rseq,
    SYS_rt_sigaction,
    SYS_rt_sigpending,
    SYS_rt_sigprocmask,
    SYS_rt_sigqueueinfo,
    SYS_rt_sigreturn,
    SYS_rt_sigsuspend,
    SYS_rt_sigtimedwait,
    SYS_rt_tgsigqueueinfo,
    SYS_sched_getaffinity,
    SYS_sched_getattr,
    SYS_sched_getparam,
    SYS_sched_get_priority_max,
    SYS_sched_get_priority_min,
    SYS_sched_getscheduler,
    SYS_sched_rr_get_interval,
    SYS_sched_setaffinity,
    SYS_sched_setattr,
    SYS_sched_setparam,
    SYS_sched_setscheduler,
    SYS_sched_yield,
    SYS_seccomp,
    SYS_semctl,
    SYS_semget,
    SYS_semop,
    SYS_semtimedop,
    SYS_sendfile,
    SYS_sendmmsg,
    SYS_sendmsg,
    SYS_sendto,
    SYS_setfsgid,
    SYS_setfsuid,
    SYS_setgid,
    SYS_setgroups,
    SYS_setitimer,
    SYS_setpgid,
    SYS_setpriority,
    SYS_setregid,
    SYS_setresgid,
    SYS_setresuid,
    SYS_setreuid,
    SYS_set_robust_list,
    SYS_setsid,
    SYS_setsockopt,
    SYS_set_tid_address,
    SYS_setuid,
    SYS_setxattr,
    SYS_shmat,
    SYS_shmctl,
    SYS_shmdt,
    SYS_shmget,
    SYS_shutdown,
    SYS_sigaltstack,
    SYS_signalfd4,
    SYS_socketpair,
    SYS_splice,
    SYS_statfs,
    SYS_statx,
    SYS_symlinkat,
    SYS_sync,
    SYS_syncfs,
    SYS_sysinfo,
    SYS_tee,
    SYS_tgkill,
    SYS_timer_create,
    SYS_timer_delete,
    SYS_timer_getoverrun,
    SYS_timer_gettime,
    SYS_timer_settime,
    SYS_timerfd_create,
    SYS_timerfd_gettime,
    SYS_timerfd_settime,
    SYS_times,
    SYS_tkill,
    SYS_truncate,
    SYS_umask,
    SYS_uname,
    SYS_unlinkat,
    SYS_utimensat,
    SYS_vmsplice,
    SYS_wait4,
    SYS_waitid,
    SYS_write,
    SYS_writev,
];

/// The x86_64 calls of the same profile that the generic table lacks
/// (legacy forms such as `open` and `stat`, `arch_prctl`, `modify_ldt`),
/// and `fchmodat2`, which glibc 2.39 uses and Docker allows since 25.
#[cfg(target_arch = "x86_64")]
const ALLOWED_ARCH: &[(&str, i64)] = allow![
    SYS_access,
    SYS_alarm,
    SYS_chmod,
    SYS_chown,
    SYS_creat,
    SYS_dup2,
    SYS_epoll_create,
    SYS_epoll_ctl_old,
    SYS_epoll_wait,
    SYS_epoll_wait_old,
    SYS_eventfd,
    SYS_fchmodat2,
    SYS_fork,
    SYS_futimesat,
    SYS_getdents,
    SYS_getpgrp,
    SYS_getrlimit,
    SYS_get_thread_area,
    SYS_inotify_init,
    SYS_lchown,
    SYS_link,
    SYS_lstat,
    SYS_mkdir,
    SYS_mknod,
    SYS_open,
    SYS_pause,
    SYS_pipe,
    SYS_poll,
    SYS_readlink,
    SYS_rename,
    SYS_renameat,
    SYS_rmdir,
    SYS_select,
    SYS_setrlimit,
    SYS_set_thread_area,
    SYS_signalfd,
    SYS_stat,
    SYS_symlink,
    SYS_sync_file_range,
    SYS_time,
    SYS_unlink,
    SYS_utime,
    SYS_utimes,
    SYS_vfork,
    SYS_arch_prctl,
    SYS_modify_ldt,
];

/// Every system call the filter lets through unconditionally.
pub(crate) fn seccomp_allowed() -> Vec<(&'static str, i64)> {
    let mut all = ALLOWED.to_vec();
    #[cfg(target_arch = "x86_64")]
    all.extend_from_slice(ALLOWED_ARCH);
    all
}

fn target_arch() -> io::Result<seccompiler::TargetArch> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| io::Error::other(format!("seccomp: unsupported architecture: {e:?}")))
}

/// The compiled filters, an allowlist in the manner of Docker's default
/// profile: the calls of [`seccomp_allowed`], `clone` without namespace
/// flags, `socket` except `AF_VSOCK` and the `personality` values of
/// [`PERSONALITIES`] run; every other call (an unknown or newer one, an
/// x32 number) fails with EPERM. A call through another architecture's
/// entry (i386 `int 0x80` on x86_64) kills the process (seccompiler's
/// architecture check), so 32-bit programs do not run.
/// A second filter answers `clone3` with ENOSYS, so that libc falls back
/// to `clone`, whose flags can be checked (the kernel returns the errno of
/// the filter installed last among equal actions).
fn seccomp_programs() -> io::Result<Vec<seccompiler::BpfProgram>> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    let err = |e: seccompiler::BackendError| io::Error::other(format!("seccomp: {e}"));
    let rule = |arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(arg, len, op, value).and_then(|c| SeccompRule::new(vec![c]))
    };
    let arch = target_arch()?;
    let mut allowed: BTreeMap<i64, Vec<SeccompRule>> = seccomp_allowed()
        .into_iter()
        .map(|(_, nr)| (nr, Vec::new()))
        .collect();
    allowed.insert(
        libc::SYS_clone,
        vec![
            rule(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_MASK),
                0,
            )
            .map_err(err)?,
        ],
    );
    allowed.insert(
        libc::SYS_socket,
        vec![rule(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, AF_VSOCK).map_err(err)?],
    );
    allowed.insert(
        libc::SYS_personality,
        PERSONALITIES
            .iter()
            .map(|&p| rule(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?,
    );
    let allowlist = SeccompFilter::new(
        allowed,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
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
    [allowlist, enosys]
        .into_iter()
        .map(|filter| seccompiler::BpfProgram::try_from(filter).map_err(err))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_this_machine() {
        let programs = seccomp_programs().expect("compile");
        assert_eq!(programs.len(), 2);
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
        let allowed = seccomp_allowed();
        let unique: std::collections::BTreeSet<_> = allowed.iter().map(|(_, nr)| nr).collect();
        assert_eq!(unique.len(), allowed.len());
    }

    /// What a sandbox must never be able to call, whatever the list
    /// becomes: mounting, namespaces, modules, keyrings, BPF, perf, clocks,
    /// reboot, swap, io_uring and cross-process memory access.
    #[test]
    fn dangerous_calls_are_not_allowed() {
        let allowed: std::collections::BTreeSet<i64> =
            seccomp_allowed().into_iter().map(|(_, nr)| nr).collect();
        for nr in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_clone3,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_clock_settime,
            libc::SYS_settimeofday,
            libc::SYS_reboot,
            libc::SYS_kexec_load,
            libc::SYS_swapon,
            libc::SYS_io_uring_setup,
            libc::SYS_process_vm_writev,
            libc::SYS_open_by_handle_at,
            libc::SYS_name_to_handle_at,
            libc::SYS_userfaultfd,
            libc::SYS_quotactl,
            libc::SYS_chroot,
            libc::SYS_sethostname,
            libc::SYS_personality,
            libc::SYS_socket,
            libc::SYS_clone,
        ] {
            assert!(
                !allowed.contains(&nr),
                "system call {nr} is allowed unconditionally"
            );
        }
    }
}
