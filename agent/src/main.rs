//! `stacyvm-agent`: PID 1 of a docker sandbox.
//!
//! It listens on a Unix socket in the sandbox (`/.stacyvm/run/agent.sock`,
//! mode 0600) and runs each command sent there as a child of its own, so a
//! command has exactly the sandbox's namespaces, cgroup, capabilities,
//! seccomp filter and no-new-privileges flag: the agent gives nothing the
//! sandbox's root does not already have. The server reaches the socket
//! through the container's root (`/proc/<pid>/root`), with symlinks
//! refused.
//!
//! As PID 1 it reaps every orphan, and SIGTERM, SIGINT or SIGHUP end the
//! sandbox (exit 128 + signal), as the shell loop it replaces did.
//!
//! A command runs in its own process group with stdin from `/dev/null`,
//! stdout and stderr on pipes the agent forwards as frames. Killing a
//! command (the client's `Kill`, or the client going away before the end)
//! SIGKILLs its process group and every descendant. After a normal exit
//! nothing is killed: background processes live on, and output they write
//! to the inherited pipes is forwarded for [`DRAIN_GRACE`] more.
//!
//! A command with a terminal (`Exec::pty`) gets a PTY instead: it leads a
//! session of its own with the PTY as its controlling terminal and its
//! stdin, stdout and stderr; what it prints comes as `Stdout`, and the
//! client's `Input` and `Resize` go to the PTY while it runs.
//!
//! The agent is built static (`-C target-feature=+crt-static`): images
//! need no libc of their own.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use stacyvm_agent::{CHUNK, Exec, Failure, Frame, RUN_DIR, SOCKET_NAME, VERSION};

/// How long output may keep flowing after the command ended (a background
/// process holding the pipe) before the agent stops reading.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How long a client has to send its command after connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Commands running at once; one more connection is refused.
const MAX_COMMANDS: usize = 512;

/// The OOM badness bias of commands: above PID 1's 0, so that the
/// sandbox's OOM killer picks a command before the agent.
const COMMAND_OOM_SCORE_ADJ: &[u8] = b"500";

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Exit statuses of this agent's commands, filled in by the reaper.
#[derive(Default)]
struct Children {
    /// A registered child: `None` while it runs, its code once reaped.
    status: Mutex<HashMap<i32, Option<i32>>>,
    changed: Condvar,
}

impl Children {
    fn wait(&self, pid: i32) -> i32 {
        let mut table = self.status.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(Some(code)) = table.get(&pid) {
                let code = *code;
                table.remove(&pid);
                return code;
            }
            table = self.changed.wait(table).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn exited(&self, pid: i32) -> bool {
        let table = self.status.lock().unwrap_or_else(|e| e.into_inner());
        matches!(table.get(&pid), Some(Some(_)))
    }
}

mod files;
mod vm;

fn main() {
    // The init of a microVM: the kernel runs the initramfs's `/init`.
    if std::env::args_os().next().is_some_and(|a| a == "/init") {
        vm::main();
    }
    // Whatever PID 1 inherited beyond stdio (a supervisor's descriptors)
    // must not reach the commands.
    // SAFETY: close_range only marks this process's descriptors.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    let socket = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(RUN_DIR).join(SOCKET_NAME));
    // Every thread inherits this mask: the main loop collects them all
    // from a signalfd, none is lost to a thread that happens to run.
    let signals = block_signals();
    let children = Arc::new(Children::default());
    // Signals arrive on a descriptor the main loop polls beside the
    // socket: an idle agent is one task (it counts against `pids.max`).
    // SAFETY: signalfd with a valid, initialised set.
    let sigfd = unsafe { libc::signalfd(-1, &signals, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if sigfd < 0 {
        eprintln!("stacyvm-agent: signalfd: {}", io::Error::last_os_error());
        std::process::exit(1);
    }
    // SAFETY: a new descriptor owned by nobody else.
    let sigfd = unsafe { OwnedFd::from_raw_fd(sigfd) };
    if let Some(dir) = socket.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(&socket);
    // Only the sandbox's root (and the host) may connect.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(&socket);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    // Without a socket the agent still does PID 1's work (reaping,
    // ending on SIGTERM) and commands take the other path; it says why
    // where `docker logs` shows it.
    let listener = listener
        .inspect_err(|e| eprintln!("stacyvm-agent: cannot listen on {}: {e}", socket.display()))
        .ok();
    // Installed once the socket listens, so a caught SIGTERM also tells a
    // supervisor that the agent is ready.
    install_stop_handlers();
    let running = Arc::new(AtomicUsize::new(0));
    if let Some(Err(e)) = listener.as_ref().map(|l| l.set_nonblocking(true)) {
        eprintln!("stacyvm-agent: {e}");
    }
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sigfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.as_ref().map_or(-1, |l| l.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: a valid array of two pollfd (a negative fd is ignored).
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            handle_signals(&sigfd, &children);
        }
        let Some(listener) = listener.as_ref().filter(|_| fds[1].revents != 0) else {
            continue;
        };
        let mut conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => {
                // Out of descriptors or memory: back off rather than spin
                // on a listener that stays readable.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        // The connection blocks; the listener does not.
        if conn.set_nonblocking(false).is_err() {
            continue;
        }
        if running.fetch_add(1, Ordering::AcqRel) >= MAX_COMMANDS {
            running.fetch_sub(1, Ordering::AcqRel);
            let _ = Frame::Failed {
                why: Failure::Other,
                message: format!("the sandbox runs {MAX_COMMANDS} commands already"),
            }
            .write_to(&mut conn);
            continue;
        }
        let children = children.clone();
        let slot = running.clone();
        let started = spawn_thread(move || {
            serve(conn, &children);
            slot.fetch_sub(1, Ordering::AcqRel);
        });
        if !started {
            running.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

extern "C" fn ignore(_: libc::c_int) {}

/// Handlers (that never run: the signals stay blocked and go to the
/// signalfd) so that the kernel delivers signals sent from inside the
/// sandbox to its PID 1.
fn install_stop_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a valid, zeroed sigaction with a handler that does
        // nothing.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

fn spawn_thread(f: impl FnOnce() + Send + 'static) -> bool {
    std::thread::Builder::new()
        .stack_size(128 << 10)
        .spawn(f)
        .is_ok()
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a locally owned, initialised set, before
    // any other thread exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Drains the signal descriptor: reaps every child (the agent's commands
/// and the orphans the kernel hands PID 1) and ends the sandbox on
/// SIGTERM, SIGINT or SIGHUP.
fn handle_signals(sigfd: &OwnedFd, children: &Children) {
    loop {
        // SAFETY: an all-zero signalfd_siginfo is valid.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading into a buffer of exactly that size.
        let n = unsafe { libc::read(sigfd.as_raw_fd(), (&raw mut info).cast(), size) };
        if n != size as isize {
            break;
        }
        let sig = info.ssi_signo as i32;
        if sig != libc::SIGCHLD {
            std::process::exit(128 + sig);
        }
    }
    // SIGCHLDs coalesce: reap whatever ended. Under the table's lock, which
    // a fork and its pidfd_open also hold: a child is never reaped before
    // its pidfd names it.
    let mut table = children.status.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else if libc::WIFSIGNALED(status) {
            128 + libc::WTERMSIG(status)
        } else {
            continue;
        };
        if let Some(slot) = table.get_mut(&pid) {
            *slot = Some(code);
            children.changed.notify_all();
        }
    }
}

/// Everything the child needs, prepared before the fork (only
/// async-signal-safe calls happen between fork and exec).
struct Prepared {
    /// Candidate paths of the program, in `PATH` order.
    programs: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    workdir: CString,
    pty: Option<stacyvm_agent::WindowSize>,
}

/// The most typed input that waits for a terminal's program to read it;
/// beyond it input is dropped (the program does not read).
const MAX_PENDING_INPUT: usize = 256 << 10;

/// A new PTY of `size`: its master (non-blocking) and its slave's path.
fn open_pty(size: stacyvm_agent::WindowSize) -> io::Result<(OwnedFd, CString)> {
    // SAFETY: posix_openpt returns a new descriptor or -1.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut name = [0 as libc::c_char; 128];
    let ws = libc::winsize {
        ws_row: size.rows.max(1),
        ws_col: size.cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: calls on the master this function owns, with a name buffer
    // of the length given and a valid winsize.
    unsafe {
        if libc::grantpt(fd) != 0
            || libc::unlockpt(fd) != 0
            || libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) != 0
            || libc::ioctl(fd, libc::TIOCSWINSZ, &ws) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    // SAFETY: ptsname_r wrote a NUL-terminated name into `name`.
    let slave = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_owned();
    Ok((master, slave))
}

/// Sets a terminal's size; its foreground process group hears SIGWINCH.
fn resize(master: RawFd, size: stacyvm_agent::WindowSize) {
    let ws = libc::winsize {
        ws_row: size.rows.max(1),
        ws_col: size.cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: an ioctl with a valid winsize.
    unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) };
}

fn prepare(exec: Exec) -> Result<Prepared, String> {
    let cstr =
        |bytes: Vec<u8>| CString::new(bytes).map_err(|_| "a NUL byte in the command".to_string());
    let program = exec
        .argv
        .first()
        .cloned()
        .filter(|p| !p.is_empty())
        .ok_or("no command")?;
    // The sandbox's environment with the request's entries laid over it.
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = std::env::vars_os()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    for entry in exec.env {
        let at = entry
            .iter()
            .position(|b| *b == b'=')
            .ok_or("an environment entry without =")?;
        let (key, value) = (entry[..at].to_vec(), entry[at + 1..].to_vec());
        match env.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => env.push((key, value)),
        }
    }
    let path = env
        .iter()
        .find(|(k, _)| k == b"PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| DEFAULT_PATH.as_bytes().to_vec());
    let programs = if program.contains(&b'/') {
        vec![cstr(program)?]
    } else {
        path.split(|b| *b == b':')
            .map(|dir| {
                let dir = if dir.is_empty() { b".".as_slice() } else { dir };
                let mut full = dir.to_vec();
                full.push(b'/');
                full.extend_from_slice(&program);
                cstr(full)
            })
            .collect::<Result<_, _>>()?
    };
    Ok(Prepared {
        programs,
        argv: exec.argv.into_iter().map(cstr).collect::<Result<_, _>>()?,
        envp: env
            .into_iter()
            .map(|(mut k, v)| {
                k.push(b'=');
                k.extend_from_slice(&v);
                cstr(k)
            })
            .collect::<Result<_, _>>()?,
        workdir: cstr(exec.workdir.unwrap_or_else(|| b"/".to_vec()))?,
        pty: exec.pty,
    })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 with a valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Null-terminated pointer arrays into `strings` (which must outlive them).
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Runs in the forked child: only async-signal-safe calls. A failure is
/// reported as `[stage, errno (4 bytes)]` on `report`, which is
/// close-on-exec: a successful exec closes it empty.
///
/// # Safety
/// Must be called in a freshly forked child, with `argv` and `envp`
/// pointing into `p`.
unsafe fn child(
    p: &Prepared,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    out: RawFd,
    err: RawFd,
    report: RawFd,
    slave: Option<&std::ffi::CStr>,
) -> ! {
    // SAFETY: each call is async-signal-safe and gets valid pointers.
    unsafe {
        let fail = |stage: u8, errno: i32| -> ! {
            let mut msg = [stage, 0, 0, 0, 0];
            msg[1..].copy_from_slice(&errno.to_be_bytes());
            libc::write(report, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        };
        let errno = || *libc::__errno_location();
        stacyvm_agent::reset_signals();
        if let Some(slave) = slave {
            // A session of its own (its process group too: a kill reaches
            // it and what it started), the terminal its controlling one.
            libc::setsid();
            let tty = libc::open(slave.as_ptr(), libc::O_RDWR);
            if tty < 0 || libc::ioctl(tty, libc::TIOCSCTTY, 0) != 0 {
                fail(b'p', errno());
            }
            if libc::dup2(tty, 0) < 0 || libc::dup2(tty, 1) < 0 || libc::dup2(tty, 2) < 0 {
                fail(b'p', errno());
            }
            if tty > 2 {
                libc::close(tty);
            }
        } else {
            // Own process group: a kill reaches the command and what it
            // started, and nothing else in the sandbox.
            libc::setpgid(0, 0);
            // Close-on-exec: only its copy on 0 reaches the command.
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if null >= 0 {
                libc::dup2(null, 0);
            } else {
                libc::close(0);
            }
            if libc::dup2(out, 1) < 0 || libc::dup2(err, 2) < 0 {
                fail(b'p', errno());
            }
        }
        let oom = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if oom >= 0 {
            libc::write(
                oom,
                COMMAND_OOM_SCORE_ADJ.as_ptr().cast(),
                COMMAND_OOM_SCORE_ADJ.len(),
            );
            libc::close(oom);
        }
        if libc::chdir(p.workdir.as_ptr()) != 0 {
            fail(b'w', errno());
        }
        // execvp's rule: try each candidate, remember a permission error,
        // stop at any error other than "not here".
        let mut denied = false;
        for program in &p.programs {
            libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            match errno() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => denied = true,
                other => fail(b'e', other),
            }
        }
        fail(b'e', if denied { libc::EACCES } else { libc::ENOENT })
    }
}

/// Where a command's frames go and where its caller's wishes come from:
/// a connection of its own (docker), or one request of a microVM's
/// multiplexed stream.
trait Channel {
    fn send(&mut self, frame: &Frame) -> io::Result<()>;
    /// A descriptor that turns readable when the caller wants something
    /// (the command killed, input typed, a terminal resized) or has gone
    /// away.
    fn control_fd(&self) -> RawFd;
    /// Reads what made [`Channel::control_fd`] readable.
    fn on_control(&mut self) -> Control;
}

/// What a command's caller wants.
enum Control {
    Kill,
    /// The caller is gone: the command must not run on unseen.
    Gone,
    Input(Vec<u8>),
    Resize(stacyvm_agent::WindowSize),
    /// Several of the above, in order.
    Batch(Vec<Control>),
}

/// One connection, one command.
struct Connection(UnixStream);

impl Channel for Connection {
    fn send(&mut self, frame: &Frame) -> io::Result<()> {
        frame.write_to(&mut self.0)
    }

    fn control_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn on_control(&mut self) -> Control {
        // Anything else, or the client leaving: the command must not run
        // on unseen.
        match Frame::read_from(&mut self.0) {
            Ok(Some(Frame::Kill)) => Control::Kill,
            Ok(Some(Frame::Input(data))) => Control::Input(data),
            Ok(Some(Frame::Resize(size))) => Control::Resize(size),
            _ => Control::Gone,
        }
    }
}

/// Serves one connection: one command.
fn serve(mut conn: UnixStream, children: &Children) {
    if (Frame::Hello { version: VERSION })
        .write_to(&mut conn)
        .is_err()
    {
        return;
    }
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let exec = match Frame::read_from(&mut conn) {
        Ok(Some(Frame::Exec(exec))) => exec,
        // A client that leaves or sends nonsense gets nothing.
        _ => return,
    };
    let _ = conn.set_read_timeout(None);
    run_command(exec, children, &mut Connection(conn));
}

/// Runs one command to its end, reporting on `chan`.
fn run_command(exec: Exec, children: &Children, chan: &mut dyn Channel) {
    let failed = |chan: &mut dyn Channel, why: Failure, message: String| {
        let _ = chan.send(&Frame::Failed { why, message });
    };
    let prepared = match prepare(exec) {
        Ok(p) => p,
        Err(message) => return failed(chan, Failure::Other, message),
    };
    let argv = pointers(&prepared.argv);
    let envp = pointers(&prepared.envp);
    let terminal = match prepared.pty.map(open_pty).transpose() {
        Ok(t) => t,
        Err(e) => return failed(chan, Failure::Other, format!("a terminal: {e}")),
    };
    let pipes = (|| Ok::<_, io::Error>((pipe()?, pipe()?, pipe()?)))();
    let ((out_r, out_w), (err_r, err_w), (rep_r, rep_w)) = match pipes {
        Ok(p) => p,
        Err(e) => return failed(chan, Failure::Other, format!("pipes: {e}")),
    };
    let (pid, pidfd) = {
        // Registered under the lock the reaper takes to record a status:
        // an instant exit is never missed.
        let mut table = children.status.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the child only makes async-signal-safe calls (see
        // `child`) on data prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: this is the freshly forked child.
            unsafe {
                child(
                    &prepared,
                    &argv,
                    &envp,
                    out_w.as_raw_fd(),
                    err_w.as_raw_fd(),
                    rep_w.as_raw_fd(),
                    terminal.as_ref().map(|(_, slave)| slave.as_c_str()),
                )
            }
        }
        let mut pidfd = None;
        if pid > 0 {
            table.insert(pid, None);
            // The reaper holds this lock while it reaps: the child cannot
            // be reaped (and its pid reused) before its pidfd is open.
            pidfd = pidfd_open(pid);
        }
        (pid, pidfd)
    };
    drop((out_w, err_w, rep_w));
    if pid < 0 {
        let e = io::Error::last_os_error();
        return failed(chan, Failure::Other, format!("fork: {e}"));
    }
    let mut report = Vec::new();
    let _ = std::fs::File::from(rep_r).read_to_end(&mut report);
    if report.len() == 5 {
        let code = children.wait(pid);
        let errno = i32::from_be_bytes([report[1], report[2], report[3], report[4]]);
        let error = io::Error::from_raw_os_error(errno);
        let program = String::from_utf8_lossy(prepared.argv[0].as_bytes()).into_owned();
        let (why, message) = match (report[0], errno) {
            (b'w', _) => (
                Failure::Workdir,
                format!(
                    "working directory {:?} does not exist in the sandbox",
                    String::from_utf8_lossy(prepared.workdir.as_bytes())
                ),
            ),
            (b'e', libc::ENOENT | libc::ENOTDIR) => (Failure::NotFound, program),
            (b'e', libc::EACCES | libc::ENOEXEC | libc::EISDIR) => {
                (Failure::NotExecutable, format!("{program}: {error}"))
            }
            _ => (
                Failure::Other,
                format!("cannot start {program}: {error} (exit {code})"),
            ),
        };
        return failed(chan, why, message);
    }
    let gone = match terminal {
        // The terminal is both its output and its input; the pipes carry
        // nothing.
        Some((master, _)) => {
            drop((out_r, err_r));
            forward(chan, pid, pidfd, Output::Terminal(master), children)
        }
        None => forward(chan, pid, pidfd, Output::Pipes(out_r, err_r), children),
    };
    let code = children.wait(pid);
    if !gone {
        let _ = chan.send(&Frame::Exit(code));
    }
}

/// Forwards the command's output until both pipes ended and the command
/// exited (or [`DRAIN_GRACE`] after the exit, when a background process
/// holds a pipe); handles `Kill` and the client going away. Returns
/// whether the client is gone.
/// Where a command's output comes from.
enum Output {
    /// Its stdout and stderr.
    Pipes(OwnedFd, OwnedFd),
    /// A terminal's master (non-blocking), which typed input goes to.
    Terminal(OwnedFd),
}

fn forward(
    conn: &mut dyn Channel,
    pid: i32,
    pidfd: Option<OwnedFd>,
    output: Output,
    children: &Children,
) -> bool {
    let (mut files, terminal) = match output {
        Output::Pipes(out, err) => (
            [
                Some(std::fs::File::from(out)),
                Some(std::fs::File::from(err)),
            ],
            None,
        ),
        Output::Terminal(master) => {
            let writer = master.try_clone().ok().map(std::fs::File::from);
            ([Some(std::fs::File::from(master)), None], writer)
        }
    };
    let mut terminal = terminal;
    // Typed input the program has not taken yet.
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    // Without a pidfd the exit is only learnt from the reaper's table.
    let mut pidfd = pidfd;
    let mut exited_at: Option<Instant> = None;
    let mut client_open = true;
    let mut killed = false;
    loop {
        if exited_at.is_none() && (pidfd.is_none() && children.exited(pid)) {
            exited_at = Some(Instant::now());
        }
        let wait_ms = match exited_at {
            Some(_) if files.iter().all(Option::is_none) => return !client_open,
            Some(at) => {
                let left = DRAIN_GRACE.saturating_sub(at.elapsed());
                if left.is_zero() {
                    return !client_open;
                }
                left.as_millis().clamp(1, 100) as i32
            }
            None if pidfd.is_some() => -1,
            None => 10,
        };
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(4);
        let watch = |fds: &mut Vec<libc::pollfd>, fd: RawFd| {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
        };
        for f in files.iter().flatten() {
            watch(&mut fds, f.as_raw_fd());
        }
        if let Some(t) = terminal.as_ref().filter(|_| !pending.is_empty()) {
            fds.push(libc::pollfd {
                fd: t.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            });
        }
        if client_open {
            watch(&mut fds, conn.control_fd());
        }
        if let Some(fd) = &pidfd {
            watch(&mut fds, fd.as_raw_fd());
        }
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            continue;
        }
        let ready = |fd: RawFd| fds.iter().any(|p| p.fd == fd && p.revents != 0);
        if pidfd.as_ref().is_some_and(|fd| ready(fd.as_raw_fd())) {
            pidfd = None;
            exited_at = Some(Instant::now());
        }
        if client_open && ready(conn.control_fd()) {
            let mut end = false;
            let mut wants = vec![conn.on_control()];
            while let Some(want) = wants.pop() {
                match want {
                    Control::Input(data) => {
                        if pending.len() + data.len() <= MAX_PENDING_INPUT {
                            pending.extend_from_slice(&data);
                        }
                    }
                    Control::Resize(size) => {
                        if let Some(t) = &terminal {
                            resize(t.as_raw_fd(), size);
                        }
                    }
                    Control::Batch(list) => wants.extend(list.into_iter().rev()),
                    Control::Kill => end = true,
                    Control::Gone => {
                        client_open = false;
                        end = true;
                    }
                }
            }
            // After a normal exit nothing is killed: background processes
            // stay.
            if end && !killed && exited_at.is_none() {
                kill_tree(pid);
                killed = true;
            }
        }
        if let Some(t) = terminal.as_mut().filter(|_| !pending.is_empty()) {
            use std::io::Write as _;
            match t.write(&pending) {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    // The terminal is gone (the program ended).
                    pending.clear();
                    terminal = None;
                }
            }
        }
        for (slot, stdout) in files.iter_mut().zip([true, false]) {
            let Some(file) = slot else { continue };
            if !ready(file.as_raw_fd()) {
                continue;
            }
            match file.read(&mut buf) {
                // A terminal's master is non-blocking.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(0) | Err(_) => *slot = None,
                Ok(n) if client_open => {
                    let data = buf[..n].to_vec();
                    let frame = if stdout {
                        Frame::Stdout(data)
                    } else {
                        Frame::Stderr(data)
                    };
                    if conn.send(&frame).is_err() {
                        client_open = false;
                        if !killed && exited_at.is_none() {
                            kill_tree(pid);
                            killed = true;
                        }
                    }
                }
                // Nobody listens: keep reading so the command never blocks.
                Ok(_) => {}
            }
        }
    }
}

/// A pidfd for `pid`, `None` where the kernel has none or the child is
/// already reaped.
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative result is a new fd owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// SIGKILLs the command's process group and every descendant of it that
/// left the group (`setsid`, its own `setpgid`). The tree is read before
/// anything is killed: a killed parent's children are handed to PID 1 at
/// once and would no longer look like descendants.
fn kill_tree(pid: i32) {
    let doomed = stacyvm_agent::process_tree(pid);
    // SAFETY: kill with a negative pid signals that process group.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    for victim in doomed {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(victim, libc::SIGKILL) };
    }
}
