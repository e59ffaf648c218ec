//! The long-lived side of a native sandbox: its keeper and its init.
//!
//! `stacyvm __native-init <sandbox-dir>` (see [`keeper_main`]) detaches
//! from the server (own session, double fork), builds the sandbox's
//! namespaces with hakoniwa and waits on them. The container's PID 1 runs
//! [`init_loop`]: it reaps every process of the sandbox and ends on
//! SIGTERM/SIGINT. The keeper records the host pid of PID 1 in `init.pid`,
//! and how it ended in `init.exit`; it kills the container if the sandbox
//! directory disappears, so no process outlives its sandbox. PID 1 is in
//! the sandbox's cgroup ([`super::cgroup`]) before it is reported ready;
//! when it dies of SIGKILL while the cgroup's OOM kill count rose, its end
//! is recorded as an OOM kill.
//!
//! The keeper is a separate process, not a thread or a direct hakoniwa
//! child of the server, because hakoniwa ties its supervisor to the thread
//! that forked it (parent-death signal): the sandbox must survive a
//! restart of the server.
//!
//! The provider side of the protocol ([`launch`], [`status`], [`stop`])
//! lives here too, so that both ends agree on the files.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{HOST_IMAGE, META_FILE, NPROC_LIMIT, SandboxMeta};
use crate::provider::RuntimeStatus;

/// The host pid of the sandbox's PID 1 and of its keeper.
pub(crate) const PID_FILE: &str = "init.pid";
/// How PID 1 ended, written by the keeper.
pub(crate) const EXIT_FILE: &str = "init.exit";
/// The keeper's (and hakoniwa's) diagnostics.
pub(crate) const LOG_FILE: &str = "init.log";

/// How often the keeper checks that its sandbox directory still exists.
const DIR_POLL: Duration = Duration::from_secs(2);
/// How long the keeper waits for PID 1 to be up (handlers installed).
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the provider waits for the keeper to report.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(15);
/// How long destroy waits for PID 1 and the keeper to be gone.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What `init.pid` holds. Start times (clock ticks since boot, from
/// `/proc/<pid>/stat`) make a recycled pid detectable.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct InitRecord {
    pub pid: i32,
    pub start: u64,
    pub keeper_pid: i32,
    pub keeper_start: u64,
}

impl InitRecord {
    /// Whether the recorded PID 1 is still this sandbox's live init.
    pub(crate) fn init_alive(&self) -> bool {
        is_same_process(self.pid, self.start)
    }

    fn keeper_alive(&self) -> bool {
        is_same_process(self.keeper_pid, self.keeper_start)
    }
}

/// What `init.exit` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InitExit {
    /// Exit code, when PID 1 exited on its own.
    pub code: Option<i32>,
    /// The signal that ended it (a handled SIGTERM/SIGINT, or a kill).
    pub signal: Option<i32>,
    /// Killed by the OOM killer of the sandbox's cgroup.
    #[serde(default)]
    pub oom_killed: bool,
    /// The sandbox's memory limit, for the words of an OOM kill.
    #[serde(default)]
    pub memory_mb: Option<u32>,
}

impl InitExit {
    /// The cause in a user's words.
    pub(crate) fn describe(&self) -> String {
        match (self.signal, self.code) {
            (Some(sig), _) if sig == libc::SIGKILL && self.oom_killed => match self.memory_mb {
                Some(mb) if mb > 0 => format!(
                    "its init was killed by the kernel OOM killer (the memory limit of {mb} MiB was reached)"
                ),
                _ => "its init was killed by the kernel OOM killer (the memory limit was reached)"
                    .to_string(),
            },
            (Some(sig), _) if sig == libc::SIGTERM => {
                "its init was terminated (SIGTERM)".to_string()
            }
            (Some(sig), _) if sig == libc::SIGINT => {
                "its init was interrupted (SIGINT)".to_string()
            }
            (Some(sig), _) if sig == libc::SIGKILL => "its init was killed (SIGKILL)".to_string(),
            (Some(sig), _) => format!("its init was killed by signal {sig}"),
            (None, Some(code)) => format!("its init exited with code {code}"),
            (None, None) => "its init ended for an unknown reason".to_string(),
        }
    }
}

/// Reads `init.pid`, if there is a readable one.
pub(crate) fn read_record(dir: &Path) -> Option<InitRecord> {
    let bytes = fs::read(dir.join(PID_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether the sandbox in `dir` (which exists) can run commands, and if
/// not, why. `Err` means "cannot tell right now" (an I/O error, too many
/// open files): the reconciler counts that as a failed observation, never
/// as a verdict, so a transient error cannot get a sandbox destroyed.
pub(crate) fn status(dir: &Path) -> io::Result<RuntimeStatus> {
    let record = match fs::read(dir.join(PID_FILE)) {
        Ok(bytes) => serde_json::from_slice::<InitRecord>(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{PID_FILE}: {e}")))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(RuntimeStatus::Stopped {
                cause: match fs::metadata(dir.join(EXIT_FILE)) {
                    Ok(_) => exit_cause(dir),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        "its init never started".to_string()
                    }
                    Err(e) => return Err(e),
                },
            });
        }
        Err(e) => return Err(e),
    };
    if process_alive(record.pid, record.start)? {
        Ok(RuntimeStatus::Running)
    } else if !dir.join(EXIT_FILE).exists() && record.keeper_alive() {
        // Between PID 1's end and the keeper's record of it (it may look
        // for an OOM kill count first): no verdict yet, or the cause would
        // be lost as "no end was recorded".
        Err(io::Error::other(
            "its init ended and its keeper is still recording how",
        ))
    } else {
        Ok(RuntimeStatus::Stopped {
            cause: exit_cause(dir),
        })
    }
}

/// Like [`is_same_process`], but an unreadable `/proc` entry for any
/// reason other than the process being gone is an error, not "dead".
fn process_alive(pid: i32, start: u64) -> io::Result<bool> {
    if pid <= 0 {
        return Ok(false);
    }
    let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        // ESRCH shows up when the process exits while being read.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    let Some(close) = stat.rfind(')') else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unreadable /proc stat",
        ));
    };
    let mut fields = stat[close + 1..].split_whitespace();
    if matches!(fields.next(), Some("Z" | "X")) {
        return Ok(false);
    }
    Ok(fields.nth(18).and_then(|s| s.parse::<u64>().ok()) == Some(start))
}

/// True when the sandbox in `dir` has neither a running nor an ended init
/// on record: it was made by a version without inits (or its spawn was cut
/// short, in which case its record is being cleaned up anyway).
pub(crate) fn never_had_init(dir: &Path) -> bool {
    missing(dir, PID_FILE) && missing(dir, EXIT_FILE)
}

/// True when the sandbox needs a new init at start-up: it never had one,
/// or its init is gone without a recorded end, which only happens when its
/// keeper was killed with it or the host restarted (an init that ended by
/// itself, e.g. `kill 1` from inside, has its end recorded and stays
/// stopped). Any doubt (an I/O error) answers false.
pub(crate) fn needs_new_init(dir: &Path) -> bool {
    if never_had_init(dir) {
        return true;
    }
    let Ok(bytes) = fs::read(dir.join(PID_FILE)) else {
        return false;
    };
    let Ok(record) = serde_json::from_slice::<InitRecord>(&bytes) else {
        return false;
    };
    matches!(process_alive(record.pid, record.start), Ok(false)) && missing(dir, EXIT_FILE)
}

fn missing(dir: &Path, file: &str) -> bool {
    matches!(fs::metadata(dir.join(file)), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

/// The recorded end of PID 1, in words.
pub(crate) fn exit_cause(dir: &Path) -> String {
    fs::read(dir.join(EXIT_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<InitExit>(&b).ok())
        .map(|e| e.describe())
        .unwrap_or_else(|| {
            // The keeper records every end it sees: it was killed along
            // with its init, or the host restarted.
            "its init is no longer running (no end was recorded: its keeper was killed or the host restarted)".to_string()
        })
}

/// Start time of a live process, from `/proc/<pid>/stat` (field 22).
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; the
    // fields after the last ')' are plain numbers.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A live process (not a zombie) with this pid and start time.
pub(crate) fn is_same_process(pid: i32, start: u64) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let mut fields = stat[close + 1..].split_whitespace();
    let state = fields.next();
    if matches!(state, Some("Z" | "X")) {
        return false;
    }
    fields.nth(18).and_then(|s| s.parse::<u64>().ok()) == Some(start)
}

/// Writes a file atomically (temp file + rename), so readers never see a
/// half-written record.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

// ---------------------------------------------------------------------------
// Provider side

/// Starts the keeper of the sandbox in `dir` and waits until its init is
/// up. On error nothing keeps running (the caller deletes the tree).
pub(crate) async fn launch(helper: &Path, dir: &Path) -> Result<InitRecord, String> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG_FILE))
        .map_err(|e| format!("opening {LOG_FILE}: {e}"))?;
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(format!("invalid sandbox directory {}", dir.display()));
    };
    // The keeper gets the sandbox's name relative to its working directory:
    // its command line, inherited by PID 1, is visible inside the sandbox,
    // and the host's data directory is none of the sandbox's business.
    let mut child = tokio::process::Command::new(helper)
        .arg("__native-init")
        .arg(name)
        // PID 1 is a fork of the keeper: whatever environment the keeper
        // starts with stays readable in /proc/1/environ inside the sandbox.
        // The server's environment (keys, database URLs) must not be there.
        .env_clear()
        .current_dir(parent)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", helper.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| "the init helper has no output pipe".to_string())?;
    // The direct child only detaches the keeper and exits at once.
    let _ = child.wait().await;
    let mut lines = tokio::io::BufReader::new(stdout);
    let mut keeper: Option<(i32, u64)> = None;
    let outcome = tokio::time::timeout(LAUNCH_TIMEOUT, async {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        loop {
            line.clear();
            match lines.read_line(&mut line).await {
                Ok(0) => {
                    return Err(format!(
                        "the sandbox's init helper ended during start-up (see {})",
                        dir.join(LOG_FILE).display()
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(format!("reading from the init helper: {e}")),
            }
            let mut words = line.split_whitespace();
            match words.next() {
                Some("keeper") => {
                    let pid = words.next().and_then(|w| w.parse().ok());
                    let start = words.next().and_then(|w| w.parse().ok());
                    if let (Some(pid), Some(start)) = (pid, start) {
                        keeper = Some((pid, start));
                    }
                }
                Some("ready") => {
                    return read_record(dir)
                        .ok_or_else(|| format!("the init helper wrote no readable {PID_FILE}"));
                }
                Some("error") => {
                    let why = line.trim_end()["error".len()..].trim().to_string();
                    return Err(format!("starting the sandbox's init: {why}"));
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("the sandbox's init did not start in time".to_string()));
    if outcome.is_err()
        && let Some((pid, start)) = keeper
    {
        // Its supervisor, and with it PID 1, dies with it (parent-death
        // signal), so killing the keeper leaves nothing behind.
        kill_verified(pid, start);
    }
    outcome
}

/// SIGKILLs a process if it is still the one recorded, through a pidfd so
/// that a recycled pid is never hit between the check and the kill.
fn kill_verified(pid: i32, start: u64) -> Option<OwnedFd> {
    let raw = rustix::process::Pid::from_raw(pid)?;
    let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).ok()?;
    if !is_same_process(pid, start) {
        return None;
    }
    let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
    Some(pidfd)
}

/// Waits until the process behind `pidfd` has exited.
fn wait_pidfd(pidfd: &OwnedFd, timeout: Duration) -> bool {
    use rustix::event::{PollFd, PollFlags, poll};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let ts = rustix::event::Timespec {
            tv_sec: left.as_secs() as _,
            tv_nsec: left.subsec_nanos() as _,
        };
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(n) if n > 0 => return true,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
}

/// Kills the sandbox's init (which takes its whole PID namespace along)
/// and waits for it and its keeper to be gone. Blocking.
pub(crate) fn stop(dir: &Path) {
    let Some(record) = read_record(dir) else {
        return;
    };
    if let Some(pidfd) = kill_verified(record.pid, record.start) {
        wait_pidfd(&pidfd, STOP_TIMEOUT);
    }
    // The keeper notices its PID 1 ended and exits by itself; give it a
    // moment, then make sure.
    let Some(keeper) = rustix::process::Pid::from_raw(record.keeper_pid) else {
        return;
    };
    let Ok(pidfd) = rustix::process::pidfd_open(keeper, rustix::process::PidfdFlags::empty())
    else {
        return;
    };
    if !record.keeper_alive() {
        return;
    }
    if !wait_pidfd(&pidfd, STOP_TIMEOUT) && record.keeper_alive() {
        let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
        wait_pidfd(&pidfd, STOP_TIMEOUT);
    }
}

// ---------------------------------------------------------------------------
// Keeper side (`stacyvm __native-init <sandbox-dir>`)

/// Entry point of `stacyvm __native-init <sandbox-dir>`. Must run before
/// any thread exists. Reports on stdout: `keeper <pid> <start>`, then
/// `ready` or `error <why>`.
pub fn keeper_main(args: &[OsString]) -> i32 {
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: stacyvm __native-init <sandbox-dir>");
        return 2;
    };
    // Relative to the working directory the provider gave us; absolute
    // from here on, as the keeper moves to `/`.
    let dir = match std::path::absolute(&dir) {
        Ok(dir) => dir,
        Err(e) => {
            println!("error {}: {e}", dir.display());
            return 1;
        }
    };
    // Descriptors the server inherited from whoever started it (a
    // supervisor's pipes, a jobserver) must not be held open by a process
    // that outlives the server.
    close_inherited_fds(false);
    // Own session: the keeper must not receive the terminal's or the
    // server's process-group signals.
    let _ = rustix::process::setsid();
    // SAFETY: this process is single-threaded (dispatched from main before
    // any runtime or thread exists), so the child may keep using the
    // allocator and std; the parent only exits.
    let forked = unsafe { libc::fork() };
    match forked {
        -1 => {
            println!("error fork: {}", io::Error::last_os_error());
            return 1;
        }
        0 => {}
        // The parent returns at once: the keeper is re-parented to the
        // system's init (or a subreaper), never the server's child.
        _ => return 0,
    }
    let code = match keep(&dir) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stacyvm __native-init {}: {e}", dir.display());
            1
        }
    };
    // Exit without running the parent's atexit machinery twice.
    std::process::exit(code)
}

/// The keeper's body: returns its exit code.
fn keep(dir: &Path) -> Result<i32, String> {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let my_start = start_time(me).unwrap_or(0);
    // The report channel is the inherited stdout; fd 1 itself goes to
    // /dev/null so that nothing forked later holds the provider's pipe.
    let report_fd = rustix::io::fcntl_dupfd_cloexec(rustix::stdio::stdout(), 3)
        .map_err(|e| format!("dup stdout: {e}"))?;
    let devnull = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("opening /dev/null: {e}"))?;
    rustix::stdio::dup2_stdout(&devnull).map_err(|e| format!("dup2: {e}"))?;
    rustix::stdio::dup2_stdin(&devnull).map_err(|e| format!("dup2: {e}"))?;
    let _ = std::env::set_current_dir("/");
    let mut report = fs::File::from(report_fd);
    let _ = writeln!(report, "keeper {me} {my_start}");

    match start_container(dir, me, my_start) {
        Ok((mut child, record, limits)) => {
            let _ = writeln!(report, "ready");
            drop(report);
            Ok(watch(dir, &mut child, &record, &limits))
        }
        Err(e) => {
            let _ = writeln!(report, "error {e}");
            Err(e)
        }
    }
}

/// Builds and starts the container, waits until PID 1 is ready and
/// records it in `init.pid`.
fn start_container(
    dir: &Path,
    keeper_pid: i32,
    keeper_start: u64,
) -> Result<(hakoniwa::Child, InitRecord, SandboxLimits), String> {
    let meta: SandboxMeta = fs::read(dir.join(META_FILE))
        .map_err(|e| format!("reading {META_FILE}: {e}"))
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{META_FILE}: {e}")))?;
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| "the sandbox directory has no name".to_string())?;
    if meta.ids.is_none() && rustix::process::geteuid().is_root() {
        // Made before sandboxes had their own host ids: its root would be
        // host root.
        return Err(
            "this sandbox predates per-sandbox user ids: its root would be host root; destroy it"
                .to_string(),
        );
    }
    let (container, agent) = container(dir, &id, &meta)?;
    // The cgroup is made while the keeper is still host root: a cgroup's
    // directory and limit files belong to their creator's fsuid, and the
    // sandbox's own host id must not own its limits.
    let cgroup = prepare_cgroup(&id, &meta)?;
    // hakoniwa writes a multi-line id map with `newuidmap`/`newgidmap`,
    // found on PATH: ours write it directly (see `ids`).
    if meta.ids.is_some() {
        let parent = dir
            .parent()
            .ok_or_else(|| "the sandbox directory has no parent".to_string())?;
        let exe = std::env::current_exe().map_err(|e| format!("locating stacyvm: {e}"))?;
        let shims =
            super::ids::install_shims(parent, &exe).map_err(|e| format!("id map helpers: {e}"))?;
        // SAFETY: the keeper is single threaded (dispatched from main
        // before any thread exists); nothing reads the environment
        // concurrently.
        unsafe { std::env::set_var("PATH", shims) };
    }
    if let Some(ids) = meta.ids {
        super::confine::become_range_owner(ids.host(0))
            .map_err(|e| format!("taking the sandbox's host ids: {e}"))?;
    }
    let host_image = meta.image == HOST_IMAGE;
    // SAFETY: the closure runs in hakoniwa's forked child (PID 1 of the
    // sandbox), forked from this single-threaded keeper: it may allocate.
    // It confines itself, then installs signal handlers and reaps
    // children (or becomes the agent, which does).
    let mut cmd = unsafe { container.command_from_closure(move || init_main(host_image, agent)) };
    // The keeper's stdin and stdout are /dev/null by now; stderr is the log.
    cmd.stdin(hakoniwa::Stdio::inherit())
        .stdout(hakoniwa::Stdio::inherit())
        .stderr(hakoniwa::Stdio::inherit());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            remove_cgroup(&cgroup);
            return Err(format!("starting the container: {e}"));
        }
    };
    // PID 1 is forked: what the keeper creates from now on (init.pid,
    // init.exit) belongs to host root again, not to the sandbox's ids.
    // SAFETY: plain system calls; the keeper has CAP_SETUID/CAP_SETGID.
    unsafe {
        libc::setfsuid(0);
        libc::setfsgid(0);
    }
    let supervisor = child.id() as i32;
    let deadline = Instant::now() + READY_TIMEOUT;
    let pid1 = loop {
        if let Some(pid) = find_ready_init(supervisor) {
            break pid;
        }
        if let Ok(Some(status)) = child.try_wait() {
            remove_cgroup(&cgroup);
            return Err(format!(
                "the container ended at start-up: {}",
                status.reason
            ));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            remove_cgroup(&cgroup);
            return Err("the sandbox's PID 1 did not come up in time".to_string());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let limits = match place_in_cgroup(cgroup, &meta, pid1) {
        Ok(limits) => limits,
        Err((cgroup, e)) => {
            let _ = child.kill();
            let _ = child.wait();
            remove_cgroup(&cgroup);
            return Err(e);
        }
    };
    let record = InitRecord {
        pid: pid1,
        start: start_time(pid1).unwrap_or(0),
        keeper_pid,
        keeper_start,
    };
    let written = serde_json::to_vec(&record)
        .map_err(|e| e.to_string())
        .and_then(|b| write_atomic(&dir.join(PID_FILE), &b).map_err(|e| e.to_string()));
    if let Err(e) = written {
        let _ = child.kill();
        let _ = child.wait();
        let _ = limits.cgroup.remove();
        return Err(format!("writing {PID_FILE}: {e}"));
    }
    Ok((child, record, limits))
}

/// The sandbox's cgroup as the keeper holds it: its OOM kill count when
/// PID 1 joined, and the memory limit for the words of an OOM kill.
struct SandboxLimits {
    cgroup: super::cgroup::SandboxCgroup,
    oom_kills_at_start: u64,
    limit_hits_at_start: u64,
    memory_mb: u32,
}

fn cgroup_failure(e: String) -> String {
    format!("cannot limit the sandbox through cgroups: {e}")
}

/// Creates the sandbox's cgroup (or reuses the one of an earlier init)
/// with its limits.
fn prepare_cgroup(id: &str, meta: &SandboxMeta) -> Result<super::cgroup::SandboxCgroup, String> {
    let layout = super::cgroup::Layout::detect().map_err(cgroup_failure)?;
    let cgroup = layout.sandbox(id);
    if let Err(e) = cgroup.create(&meta.limits()) {
        remove_cgroup(&cgroup);
        return Err(cgroup_failure(e));
    }
    Ok(cgroup)
}

/// Best effort: a cgroup left behind is swept at the next start.
fn remove_cgroup(cgroup: &super::cgroup::SandboxCgroup) {
    if let Err(e) = cgroup.remove() {
        eprintln!("removing the sandbox's cgroup: {e}");
    }
}

/// Moves PID 1 into the sandbox's cgroup. PID 1 has no children yet:
/// every later process of the sandbox starts inside.
fn place_in_cgroup(
    cgroup: super::cgroup::SandboxCgroup,
    meta: &SandboxMeta,
    pid1: i32,
) -> Result<SandboxLimits, (super::cgroup::SandboxCgroup, String)> {
    if let Err(e) = cgroup.add_process(pid1) {
        return Err((cgroup, cgroup_failure(e)));
    }
    Ok(SandboxLimits {
        oom_kills_at_start: cgroup.oom_kills().unwrap_or(0),
        limit_hits_at_start: cgroup.limit_hits().unwrap_or(0),
        cgroup,
        memory_mb: meta.memory_mb,
    })
}

/// Whether a SIGKILL of PID 1 was the OOM killer's: the cgroup's count
/// rose. The count is bumped right after the signal is sent, and on a busy
/// host the keeper can wake before that: where the sandbox's memory did hit
/// its limit, it looks again for up to a second before calling it a plain
/// SIGKILL. A sandbox that never hit its limit (a destroy, `kill -9`) is
/// not waited for.
fn killed_by_oom(limits: &SandboxLimits) -> bool {
    let risen = || {
        limits
            .cgroup
            .oom_kills()
            .is_some_and(|n| n > limits.oom_kills_at_start)
    };
    if risen() {
        return true;
    }
    let hit_limit = limits
        .cgroup
        .limit_hits()
        .is_some_and(|n| n > limits.limit_hits_at_start);
    if !hit_limit {
        return false;
    }
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        if risen() {
            return true;
        }
    }
    false
}

/// The host pid of the supervisor's child once it is PID 1 of its own
/// namespace and has its SIGTERM handler installed (so that `kill 1` from
/// inside works from the first exec on).
fn find_ready_init(supervisor: i32) -> Option<i32> {
    // /proc/<pid>/task/<tid>/children is not available on every kernel
    // (CONFIG_PROC_CHILDREN); scanning parents always is.
    let pid = fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|&pid| parent_of(pid) == Some(supervisor))?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let innermost = field("NSpid:")?.split_whitespace().last()?;
    let caught = u64::from_str_radix(field("SigCgt:")?, 16).ok()?;
    let term_bit = 1u64 << (libc::SIGTERM - 1);
    (innermost == "1" && caught & term_bit != 0).then_some(pid)
}

/// Waits for PID 1 to end (recording how) or for the sandbox directory to
/// disappear (then kills the container). Returns the keeper's exit code.
fn watch(
    dir: &Path,
    child: &mut hakoniwa::Child,
    record: &InitRecord,
    limits: &SandboxLimits,
) -> i32 {
    let supervisor = rustix::process::Pid::from_raw(child.id() as i32);
    let pidfd = supervisor.and_then(|pid| {
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
    });
    loop {
        let ended = match &pidfd {
            Some(fd) => wait_pidfd(fd, DIR_POLL),
            None => {
                std::thread::sleep(DIR_POLL);
                matches!(child.try_wait(), Ok(Some(_)))
            }
        };
        if ended {
            break;
        }
        if !dir.join(META_FILE).exists() {
            // The sandbox was deleted without a destroy: take its
            // processes down with it.
            kill_verified(record.pid, record.start);
            let _ = child.kill();
            let _ = child.wait();
            let _ = limits.cgroup.remove();
            return 0;
        }
    }
    let mut exit = match child.wait() {
        Ok(status) => classify(&status),
        Err(e) => {
            eprintln!("waiting for the container: {e}");
            InitExit {
                code: None,
                signal: None,
                oom_killed: false,
                memory_mb: None,
            }
        }
    };
    if exit.signal == Some(libc::SIGKILL) && killed_by_oom(limits) {
        exit.oom_killed = true;
        exit.memory_mb = Some(limits.memory_mb);
    }
    if dir.join(META_FILE).exists()
        && let Ok(bytes) = serde_json::to_vec(&exit)
        && let Err(e) = write_atomic(&dir.join(EXIT_FILE), &bytes)
    {
        eprintln!("writing {EXIT_FILE}: {e}");
    }
    0
}

/// How PID 1 ended, from hakoniwa's report. [`init_loop`] exits with
/// 128 + the signal it handled.
fn classify(status: &hakoniwa::ExitStatus) -> InitExit {
    match status.exit_code {
        Some(code) if code == 128 + libc::SIGTERM || code == 128 + libc::SIGINT => InitExit {
            code: None,
            signal: Some(code - 128),
            oom_killed: false,
            memory_mb: None,
        },
        Some(code) => InitExit {
            code: Some(code),
            signal: None,
            oom_killed: false,
            memory_mb: None,
        },
        // No exit code: a signal death (128 + n), or hakoniwa's own
        // failure (125).
        None if status.code > 128 => InitExit {
            code: None,
            signal: Some(status.code - 128),
            oom_killed: false,
            memory_mb: None,
        },
        None => InitExit {
            code: Some(status.code),
            signal: None,
            oom_killed: false,
            memory_mb: None,
        },
    }
}

/// The sandbox's namespaces over its tree: user (container root is the
/// uid running StacyVM), mount (the rootfs, or the host image layout),
/// fresh /proc and /dev, pid, net (no network), ipc, uts.
/// The sandbox's container, and whether the agent is mounted in it.
fn container(
    dir: &Path,
    id: &str,
    meta: &SandboxMeta,
) -> Result<(hakoniwa::Container, bool), String> {
    use hakoniwa::{Container, Namespace, Rlimit, Runctl};
    let mut c = Container::empty();
    let mut mounted_agent = false;
    // A user namespace even when StacyVM runs as root: root inside is
    // then root only over the sandbox's own namespaces, so it cannot
    // load modules, mknod host devices or touch host networking.
    // Container root maps to the uid running StacyVM, which owns the tree.
    for ns in [
        Namespace::User,
        Namespace::Mount,
        Namespace::Pid,
        Namespace::Network,
        Namespace::Ipc,
        Namespace::Uts,
    ] {
        c.unshare(ns);
    }
    match meta.ids {
        // Root inside is the first id of the sandbox's own host range.
        Some(ids) => {
            c.uidmaps(&ids.map_lines());
            c.gidmaps(&ids.map_lines());
        }
        // An unprivileged server can only map its own uid.
        None => {
            c.uidmap(0).gidmap(0);
        }
    }
    if meta.image == HOST_IMAGE {
        c.rootfs("/")
            .map_err(|e| format!("preparing host rootfs: {e}"))?;
        for sub in ["workspace", "tmp"] {
            let host = dir.join("hostfs").join(sub);
            c.bindmount_rw(&host.to_string_lossy(), &format!("/{sub}"));
        }
    } else {
        c.rootdir(dir.join("rootfs")).runctl(Runctl::RootdirRW);
        let agent = meta.agent.as_ref().filter(|_| {
            agent_mountpoints(&dir.join("rootfs"))
                .inspect_err(|why| {
                    eprintln!(
                        "keeper: no agent in this sandbox ({why}); commands take the exec helper"
                    )
                })
                .is_ok()
        });
        mounted_agent = agent.is_some();
        if let Some(agent) = agent {
            use crate::provider::agent::{AGENT_PATH, RUN_DIR};
            use hakoniwa::MountOptions;
            c.bindmount_ro(&agent.to_string_lossy(), AGENT_PATH);
            // The agent's socket: a few KiB of tmpfs, so this mount is no
            // way around the sandbox's disk cap.
            c.mount(
                "tmpfs",
                RUN_DIR,
                "tmpfs",
                MountOptions::NOSUID | MountOptions::NODEV | MountOptions::NOEXEC,
                Some("size=64k,mode=1777".to_string()),
            );
        }
    }
    c.procfsmount("/proc").devfsmount("/dev").hostname(id);
    // No /sys at all: stricter than Docker's read-only sysfs, and
    // nothing in a sandbox needs the host's devices.
    // Memory, process and CPU limits are the sandbox cgroup's
    // (`place_in_cgroup`); RLIMIT_NPROC only matters unprivileged.
    c.setrlimit(Rlimit::Nproc, NPROC_LIMIT, NPROC_LIMIT);
    Ok((c, mounted_agent))
}

/// Checks the agent's mount points in the sandbox's tree before hakoniwa
/// makes them by path, following links, before the pivot: `/.stacyvm` and
/// `/.stacyvm/run` must be missing or plain directories, `/.stacyvm/agent`
/// missing or a regular file. The tree is the sandbox's (an image, or what
/// its processes left before a restart; none of them runs now): a link
/// there would have the keeper create files outside it, a FIFO planted as
/// `agent` would block it.
fn agent_mountpoints(rootfs: &Path) -> Result<(), String> {
    use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
    let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let root = rustix::fs::open(
        rootfs,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("{}: {e}", rootfs.display()))?;
    for (path, kind) in [
        (".stacyvm", FileType::Directory),
        (".stacyvm/run", FileType::Directory),
        (".stacyvm/agent", FileType::RegularFile),
    ] {
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat2(&root, path, flags, Mode::empty(), how) {
            Ok(fd) => {
                let stat = rustix::fs::fstat(&fd).map_err(|e| format!("{path}: {e}"))?;
                if FileType::from_raw_mode(stat.st_mode) != kind {
                    return Err(format!("/{path} is not a plain {kind:?}"));
                }
            }
            // Missing: hakoniwa makes it inside the tree. A missing
            // `/.stacyvm` has no children to check.
            Err(rustix::io::Errno::NOENT) if path == ".stacyvm" => break,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(format!("/{path}: {e}")),
        }
    }
    Ok(())
}

/// Closes (or, with `on_exec`, marks close-on-exec) every descriptor
/// above stderr.
pub(crate) fn close_inherited_fds(on_exec: bool) {
    let flags = if on_exec {
        libc::CLOSE_RANGE_CLOEXEC
    } else {
        0
    };
    // SAFETY: close_range only affects this process's descriptor table; it
    // runs first thing in a single-threaded helper, before any descriptor
    // that Rust code owns has been opened.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, flags);
    }
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// PID 1 of a sandbox: become the sandbox's root, harden the mounts every
/// command shares, give up privileges for good (see `confine`), then
/// become the in-sandbox agent (with `agent`) or run [`init_loop`]. A
/// failure ends PID 1 before it is ready, which fails the spawn; the
/// reason goes to the keeper's log.
///
/// The agent inherits all of it: commands it forks are as confined as
/// those the exec helper starts (same namespaces, cgroup, id, limits,
/// capabilities, no-new-privileges, seccomp filter).
fn init_main(host_image: bool, agent: bool) -> i32 {
    let confined = super::confine::become_sandbox_root()
        .and_then(|()| super::confine::harden_mounts(host_image))
        .and_then(|()| super::confine::restrict());
    if let Err(e) = confined {
        eprintln!("sandbox init: {e}");
        return 125;
    }
    if agent {
        exec_agent();
        // Still here: the agent could not start (its mount is missing).
        // The init loop keeps the sandbox; commands take the exec helper.
    }
    init_loop()
}

/// Replaces PID 1 with the agent, with an empty environment (every
/// command gets its own) and stderr on /dev/null. Returns only if the
/// exec failed.
fn exec_agent() {
    use crate::provider::agent::AGENT_PATH;
    let Ok(path) = std::ffi::CString::new(AGENT_PATH) else {
        return;
    };
    // SAFETY: plain libc calls on NUL-terminated strings and
    // NULL-terminated arrays that outlive them.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        let saved = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
        if null >= 0 {
            libc::dup2(null, 2);
            libc::close(null);
        }
        let argv = [path.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null::<libc::c_char>()];
        libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        let errno = *libc::__errno_location();
        if saved >= 0 {
            libc::dup2(saved, 2);
            libc::close(saved);
        }
        eprintln!(
            "sandbox init: cannot start the agent: {}",
            std::io::Error::from_raw_os_error(errno)
        );
    }
}

/// PID 1 of a sandbox: reap every child (orphans are re-parented here)
/// until SIGTERM or SIGINT, then exit with 128 + that signal. Ending PID 1
/// makes the kernel kill everything else in the namespace.
fn init_loop() -> i32 {
    // SAFETY: plain libc calls on locally owned, initialised structures
    // and a NUL-terminated literal; this process is single threaded. The
    // handler does nothing (it never even runs: the signals are blocked and
    // collected with sigtimedwait), but the kernel only delivers signals
    // sent from inside the namespace to its init when a handler is
    // installed.
    unsafe {
        // Stderr is the keeper's log on the host; its path is none of the
        // sandbox's business (`ls -l /proc/1/fd` inside would show it).
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 2);
            libc::close(null);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return 1;
        }
        for sig in [libc::SIGTERM, libc::SIGINT] {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                return 1;
            }
        }
        let timeout = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        loop {
            let sig = libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout);
            // Reap whatever ended, whichever signal woke us (a periodic
            // sweep too, in case a SIGCHLD was coalesced).
            loop {
                let pid = libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG);
                if pid <= 0 {
                    break;
                }
            }
            if sig == libc::SIGTERM || sig == libc::SIGINT {
                return 128 + sig;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: i32, exit_code: Option<i32>) -> hakoniwa::ExitStatus {
        hakoniwa::ExitStatus {
            code,
            reason: String::new(),
            exit_code,
            rusage: None,
            proc_pid_smaps_rollup: None,
            proc_pid_status: None,
        }
    }

    #[test]
    fn init_ends_are_told_in_words() {
        // The init loop's own exit on a handled SIGTERM / SIGINT.
        let term = classify(&status(143, Some(143)));
        assert_eq!(term.describe(), "its init was terminated (SIGTERM)");
        let int = classify(&status(130, Some(130)));
        assert_eq!(int.describe(), "its init was interrupted (SIGINT)");
        // Killed from outside (destroy, the OOM killer).
        let kill = classify(&status(137, None));
        assert_eq!(kill.describe(), "its init was killed (SIGKILL)");
        let code = classify(&status(3, Some(3)));
        assert_eq!(code.describe(), "its init exited with code 3");
        // The OOM killer, as the keeper records it (docker's words).
        let mut oom = classify(&status(137, None));
        oom.oom_killed = true;
        oom.memory_mb = Some(64);
        assert_eq!(
            oom.describe(),
            "its init was killed by the kernel OOM killer (the memory limit of 64 MiB was reached)"
        );
        // An init.exit from before OOM reporting still reads.
        let old: InitExit = serde_json::from_str(r#"{"code":null,"signal":9}"#).expect("decode");
        assert_eq!(old.describe(), "its init was killed (SIGKILL)");
    }

    #[test]
    fn start_time_reads_this_process() {
        let me = std::process::id() as i32;
        let start = start_time(me).expect("own start time");
        assert!(is_same_process(me, start));
        assert!(!is_same_process(me, start + 1));
        assert!(!is_same_process(0, start));
        assert_eq!(
            parent_of(me),
            Some(std::os::unix::process::parent_id() as i32)
        );
    }

    #[test]
    fn a_missing_record_reads_as_never_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            super::status(dir.path()).expect("status"),
            RuntimeStatus::Stopped {
                cause: "its init never started".into()
            }
        );
        assert!(super::never_had_init(dir.path()));
        let dead = InitRecord {
            pid: i32::MAX,
            start: 1,
            keeper_pid: i32::MAX,
            keeper_start: 1,
        };
        let bytes = serde_json::to_vec(&dead).expect("encode");
        write_atomic(&dir.path().join(PID_FILE), &bytes).expect("write");
        let exit = serde_json::to_vec(&InitExit {
            code: None,
            signal: Some(libc::SIGTERM),
            oom_killed: false,
            memory_mb: None,
        })
        .expect("encode");
        write_atomic(&dir.path().join(EXIT_FILE), &exit).expect("write");
        assert_eq!(
            super::status(dir.path()).expect("status"),
            RuntimeStatus::Stopped {
                cause: "its init was terminated (SIGTERM)".into()
            }
        );
        assert!(!super::never_had_init(dir.path()));
        // An unreadable record is "cannot tell", never a verdict.
        std::fs::write(dir.path().join(PID_FILE), b"{not json").expect("write");
        assert!(super::status(dir.path()).is_err());
    }
}
