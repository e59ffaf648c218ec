//! `stacyvm __native-exec`: run one command inside a native sandbox by
//! joining the namespaces of its init.
//!
//! ```text
//! stacyvm __native-exec <server-pid> <init-pid> <init-start> <workdir> -- <program> [args...]
//! ```
//!
//! Before joining the namespaces the helper opens the init's cgroups (see
//! [`open_cgroups`]); the command joins them between fork and exec, so it
//! and everything it starts count against the sandbox's memory, process
//! and CPU limits. The helper itself stays outside: the sandbox's OOM
//! killer must not pick it (it is the biggest process there, and the
//! command's result would be lost), nor should it take a slot of the
//! sandbox's `pids.max`.
//!
//! The provider starts the helper with an empty environment, the command's
//! stdout/stderr pipes, and as stdin one end of a *control socket*. The
//! provider writes the command's environment there (`KEY=VALUE` entries,
//! each ended by a NUL byte) and shuts its writing side. The environment
//! never is the helper's own: the helper starts on the host as the
//! server's user, where a request's `LD_PRELOAD` would be obeyed by the
//! dynamic loader. If the helper cannot enter the sandbox it writes why on
//! the socket and exits 125, so that a setup failure is never confused
//! with the command's own exit code or output. Otherwise it exits with the
//! command's status (128 + signal for a signal death).
//!
//! The command runs in its own process group. SIGTERM or SIGINT to the
//! helper (the provider's timeout, or the server dying: parent-death
//! signal) SIGKILLs that whole group. After a normal exit nothing is
//! killed: background processes live on under the sandbox's init.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::thread::LinkNameSpaceType;

use super::NPROC_LIMIT;
use super::init::is_same_process;

/// Exit code of the helper when it could not start the command (the reason
/// is on the status pipe).
pub(crate) const SETUP_FAILED: i32 = 125;

/// The OOM badness bias of commands: above PID 1's 0.
const COMMAND_OOM_SCORE_ADJ: &str = "500";

/// The words used when a sandbox's init is gone.
pub(crate) const INIT_NOT_RUNNING: &str = "the sandbox's init is not running";

struct Request {
    /// The process that started the helper: if the helper's parent is not
    /// (or no longer) this one, the server is gone.
    server: i32,
    pid: i32,
    start: u64,
    workdir: OsString,
    program: OsString,
    args: Vec<OsString>,
}

fn parse(args: &[OsString]) -> Option<Request> {
    let text = |i: usize| args.get(i).and_then(|a| a.to_str());
    if args.get(4).map(|a| a.as_os_str()) != Some("--".as_ref()) {
        return None;
    }
    Some(Request {
        server: text(0)?.parse().ok()?,
        pid: text(1)?.parse().ok()?,
        start: text(2)?.parse().ok()?,
        workdir: args.get(3)?.clone(),
        program: args.get(5)?.clone(),
        args: args.get(6..).map(<[OsString]>::to_vec).unwrap_or_default(),
    })
}

/// Entry point of `stacyvm __native-exec`. Must run before any thread
/// exists: joining a user namespace requires a single-threaded process.
pub fn exec_main(args: &[OsString]) -> i32 {
    // Whatever the server inherited (a supervisor's pipes, a jobserver)
    // must not reach the command.
    super::init::close_inherited_fds(true);
    // The control socket arrives as stdin; keep it on a close-on-exec fd
    // so the command never inherits it.
    let control = rustix::io::fcntl_dupfd_cloexec(rustix::stdio::stdin(), 3).ok();
    let mut control = control.map(std::os::unix::net::UnixStream::from);
    let mut env = Vec::new();
    let read = match control.as_mut() {
        Some(c) => c.read_to_end(&mut env).map(|_| ()),
        None => Err(io::Error::other("no control socket")),
    };
    let mut status = control;
    let mut fail = |why: String| -> i32 {
        match status.as_mut() {
            Some(s) => {
                let _ = s.write_all(why.as_bytes());
            }
            None => eprintln!("stacyvm: {why}"),
        }
        SETUP_FAILED
    };
    if let Err(e) = read {
        return fail(format!("reading the command's environment: {e}"));
    }
    let Some(request) = parse(args) else {
        return fail("usage: stacyvm __native-exec <server-pid> <init-pid> <init-start> <workdir> -- <program> [args...]".into());
    };
    // SIGTERM/SIGINT (the provider's kill, the parent-death signal) are
    // collected with sigtimedwait, never lost between here and the wait.
    let signals = match block_signals() {
        Ok(set) => set,
        Err(e) => return fail(format!("blocking signals: {e}")),
    };
    // Die (well: kill the command) with the server. The signal is tied
    // to the server thread that spawned us; the provider spawns from
    // long-lived runtime threads.
    if let Err(e) =
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
    {
        return fail(format!("prctl: {e}"));
    }
    // The server may have died before the signal was armed.
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(request.server) {
        return fail("the server went away".into());
    }
    let cgroups = match open_cgroups(&request) {
        Ok(handles) => handles,
        Err(why) => return fail(why),
    };
    // PID 1 is a fork of the keeper (a big binary): its resident size
    // rivals a command's, and the sandbox's OOM killer would pick it and
    // end the whole sandbox for one command's excess. Commands (and what
    // they start) are the first choice instead: set here, while the helper
    // is host root and owns its /proc entry, and inherited by the command.
    // Raising needs no privilege; lowering PID 1's would need
    // CAP_SYS_RESOURCE, which hosts do not always grant even to root.
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", COMMAND_OOM_SCORE_ADJ) {
        return fail(format!("setting the command's oom_score_adj: {e}"));
    }
    if let Err(why) = enter(&request) {
        return fail(why);
    }
    // From here on the helper is the sandbox's root (an unprivileged host
    // id), never host root inside the sandbox. The credential change
    // cleared the parent-death signal: arm it again, and check again that
    // the server is still there.
    if let Err(e) = super::confine::become_sandbox_root() {
        return fail(format!("becoming the sandbox's root: {e}"));
    }
    if let Err(e) =
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
    {
        return fail(format!("prctl: {e}"));
    }
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(request.server) {
        return fail("the server went away".into());
    }
    // The workdir is the sandbox's path, resolved as the sandbox's root
    // (its symlinks are the sandbox's to set).
    let workdir = Path::new(&request.workdir);
    if let Err(e) = std::env::set_current_dir(workdir) {
        return fail(format!("workdir {}: {e}", workdir.display()));
    }
    let mut cmd = std::process::Command::new(&request.program);
    cmd.args(&request.args)
        .env_clear()
        .envs(env.split(|b| *b == 0).filter_map(|entry| {
            let at = entry.iter().position(|b| *b == b'=')?;
            let (key, value) = (&entry[..at], &entry[at + 1..]);
            use std::os::unix::ffi::OsStrExt;
            Some((
                std::ffi::OsStr::from_bytes(key),
                std::ffi::OsStr::from_bytes(value),
            ))
        }))
        .stdin(std::process::Stdio::null())
        // Own process group: a timeout kills the command and everything it
        // started, and nothing else in the sandbox.
        .process_group(0);
    let cgroup_fds: Vec<std::os::fd::RawFd> = cgroups
        .iter()
        .map(std::os::fd::AsRawFd::as_raw_fd)
        .collect();
    // SAFETY: the closures run between fork and exec in the child of this
    // single-threaded helper, so they may allocate (the seccomp filter is
    // compiled there); they touch no lock another thread could hold. The
    // cgroup handles stay open in the helper.
    unsafe {
        cmd.pre_exec(move || super::cgroup::join(&cgroup_fds));
        cmd.pre_exec(child_setup);
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let program = request.program.to_string_lossy();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => {
                    eprintln!("stacyvm: {program}: {e}");
                    127
                }
                Some(libc::EACCES | libc::ENOEXEC | libc::EISDIR | libc::ENOTDIR) => {
                    eprintln!("stacyvm: {program}: {e}");
                    126
                }
                _ => fail(format!("cannot start {program}: {e}")),
            };
        }
    };
    drop(status);
    let group = rustix::process::Pid::from_raw(child.id() as i32);
    loop {
        if let Some(sig) = wait_signal(&signals)
            && (sig == libc::SIGTERM || sig == libc::SIGINT)
            && let Some(group) = group
        {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                return match (status.code(), status.signal()) {
                    (Some(code), _) => code,
                    (None, Some(sig)) => 128 + sig,
                    (None, None) => 128,
                };
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("stacyvm: waiting for the command: {e}");
                return 128;
            }
        }
    }
}

/// Opens the sandbox's cgroups (those of its init under `stacyvm/`) on the
/// host side, before any namespace is joined. An init without such a
/// cgroup (started by a version without cgroups) gives none.
fn open_cgroups(request: &Request) -> Result<Vec<OwnedFd>, String> {
    if !is_same_process(request.pid, request.start) {
        return Err(INIT_NOT_RUNNING.into());
    }
    let layout = super::cgroup::Layout::detect()?;
    let handles = layout.open_cgroups_of(request.pid)?;
    // The pid may have been recycled while its cgroups were read.
    if !is_same_process(request.pid, request.start) {
        return Err(INIT_NOT_RUNNING.into());
    }
    Ok(handles)
}

/// Joins the namespaces and root of the sandbox's init, then its workdir.
fn enter(request: &Request) -> Result<(), String> {
    let pid = request.pid;
    if !is_same_process(pid, request.start) {
        return Err(INIT_NOT_RUNNING.into());
    }
    let open = |path: String, flags: OFlags| -> Result<OwnedFd, String> {
        rustix::fs::open(&path, flags | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| format!("{INIT_NOT_RUNNING} ({path}: {e})"))
    };
    // Every handle is opened before joining anything: once in the mount
    // namespace, /proc is the sandbox's own.
    let kinds = [
        ("user", LinkNameSpaceType::User),
        ("mnt", LinkNameSpaceType::Mount),
        ("pid", LinkNameSpaceType::ProcessID),
        ("net", LinkNameSpaceType::Network),
        ("ipc", LinkNameSpaceType::InterProcessCommunication),
        ("uts", LinkNameSpaceType::HostNameAndNISDomainName),
    ];
    let mut namespaces = Vec::with_capacity(kinds.len());
    for (name, kind) in kinds {
        namespaces.push((
            open(format!("/proc/{pid}/ns/{name}"), OFlags::RDONLY)?,
            kind,
        ));
    }
    let root = open(
        format!("/proc/{pid}/root"),
        OFlags::PATH | OFlags::DIRECTORY,
    )?;
    // The pid may have been recycled between the check and the opens;
    // checking again proves the handles belong to the init.
    if !is_same_process(pid, request.start) {
        return Err(INIT_NOT_RUNNING.into());
    }
    // User namespace first: it grants the capabilities the other joins
    // need.
    for (fd, kind) in &namespaces {
        rustix::thread::move_into_link_name_space(fd.as_fd(), Some(*kind))
            .map_err(|e| format!("joining the sandbox's {kind:?} namespace: {e}"))?;
    }
    rustix::process::fchdir(&root).map_err(|e| format!("entering the sandbox root: {e}"))?;
    rustix::process::chroot(".").map_err(|e| format!("entering the sandbox root: {e}"))?;
    Ok(())
}

/// In the forked child, before exec: default signal mask, the sandbox's
/// limits, no privilege gain through setuid binaries (as hakoniwa does for
/// PID 1).
fn child_setup() -> io::Result<()> {
    // SAFETY: this is the forked child, before exec.
    unsafe { stacyvm_agent::reset_signals() };
    let limit = |n: u64| rustix::process::Rlimit {
        current: Some(n),
        maximum: Some(n),
    };
    rustix::process::setrlimit(rustix::process::Resource::Nproc, limit(NPROC_LIMIT))?;
    // Capabilities, no_new_privs and the seccomp filter, as for PID 1.
    super::confine::restrict()
}

fn block_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: plain libc calls on a locally owned, initialised set; the
    // process is single threaded.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(set)
    }
}

/// Waits up to a second for one of the blocked signals.
fn wait_signal(set: &libc::sigset_t) -> Option<i32> {
    let timeout = libc::timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    // SAFETY: `set` is an initialised signal set and `timeout` a valid
    // timespec; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
    (sig > 0).then_some(sig)
}
