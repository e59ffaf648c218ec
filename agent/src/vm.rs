//! `stacyvm-agent` as the init of a microVM: the kernel runs it as
//! `/init` of the initramfs StacyVM builds (`provider/microvm`).
//!
//! Boot: mount `/dev`, `/proc`, `/sys`; load the kernel modules the
//! initramfs carries (`/stacyvm/modules`, in the order its `order` file
//! lists: a distribution kernel has its virtio drivers as modules); mount
//! the sandbox's disk (`/dev/vda`, ext4) and make it the root; bring up
//! loopback; find the virtio serial port named [`PORT_NAME`]. Then it
//! serves the multiplexed protocol (see the crate's docs) on that port
//! and does PID 1's work: reaping orphans, ending the VM on SIGTERM,
//! SIGINT or SIGHUP (`kill 1` inside stops the sandbox, as elsewhere).
//!
//! A failed boot step is printed on the console and ends the agent: the
//! kernel panics, the VM powers off, and the host reports the console's
//! last lines.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stacyvm_agent::{Failure, FileOp, Frame, VERSION};

use crate::files;

/// The name of the serial port the host listens on.
pub const PORT_NAME: &str = "stacyvm.agent";

/// How long the boot waits for a device (the disk, the port) to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(20);

/// Requests (commands, file operations) of one session at once.
const MAX_REQUESTS: usize = 512;

/// Writes in flight at once (each holds an open file).
const MAX_WRITES: usize = 64;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn main() -> ! {
    let signals = crate::block_signals();
    if let Err(e) = boot() {
        eprintln!("stacyvm-agent: boot failed: {e}");
        std::process::exit(1);
    }
    let port = match find_port() {
        Ok(port) => port,
        Err(e) => {
            eprintln!("stacyvm-agent: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("stacyvm-agent: ready on {}", port.display());
    let port = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("stacyvm-agent: {}: {e}", port.display());
            std::process::exit(1);
        }
    };
    serve(port, signals)
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in a constant path")
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (source, target, fstype, data) = (cstr(source), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                fstype.as_ptr()
            },
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                data.as_ptr().cast()
            },
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("mount {target:?}: {e}")));
    }
    Ok(())
}

fn boot() -> io::Result<()> {
    for dir in ["/dev", "/proc", "/sys", "/newroot"] {
        std::fs::create_dir_all(dir)?;
    }
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    mount(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    mount(
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    load_modules(Path::new("/stacyvm/modules"))?;
    let disk = Path::new("/dev/vda");
    wait_for(|| disk.exists(), "the sandbox's disk /dev/vda")?;
    mount("/dev/vda", "/newroot", "ext4", libc::MS_NOATIME, "")?;
    for dir in ["dev", "proc", "sys"] {
        let target = format!("/newroot/{dir}");
        std::fs::create_dir_all(&target)?;
        mount(&format!("/{dir}"), &target, "", libc::MS_MOVE, "")?;
    }
    std::env::set_current_dir("/newroot")?;
    mount(".", "/", "", libc::MS_MOVE, "")?;
    // SAFETY: chroot with a valid path.
    if unsafe { libc::chroot(c".".as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")?;
    for (dir, mode) in [
        ("/dev/pts", 0o755),
        ("/dev/shm", 0o1777),
        ("/tmp", 0o1777),
        ("/workspace", 0o755),
        ("/root", 0o700),
    ] {
        if !Path::new(dir).exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        }
    }
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=620",
    )?;
    mount(
        "shm",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(name) = cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("stacyvm.hostname="))
    {
        // SAFETY: a valid buffer of that length.
        unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    }
    loopback_up();
    // The commands' environment: the kernel's leftovers (its unknown
    // parameters, TERM=linux) are not the sandbox's.
    for (key, _) in std::env::vars_os() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::remove_var(key) };
    }
    // SAFETY: as above.
    unsafe {
        std::env::set_var("PATH", DEFAULT_PATH);
        std::env::set_var("HOME", "/root");
    }
    Ok(())
}

/// Loads `<dir>/<name>.ko` for each name of `<dir>/order`, in that order
/// (the dependencies first); one the kernel has already is fine.
fn load_modules(dir: &Path) -> io::Result<()> {
    let order = match std::fs::read_to_string(dir.join("order")) {
        Ok(order) => order,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join(format!("{name}.ko"));
        let file = File::open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        // SAFETY: finit_module with an open descriptor and empty params.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io::Error::new(
                    e.kind(),
                    format!("loading module {name}: {e}"),
                ));
            }
        }
    }
    Ok(())
}

fn wait_for(mut ready: impl FnMut() -> bool, what: &str) -> io::Result<()> {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > DEVICE_WAIT {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} did not appear within {}s", DEVICE_WAIT.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Sets `lo` up (best effort: a sandbox without loopback still runs).
fn loopback_up() {
    // SAFETY: an ioctl on a socket this function owns, with a zeroed
    // ifreq naming `lo`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) != 0 {
                eprintln!(
                    "stacyvm-agent: cannot set lo up: {}",
                    io::Error::last_os_error()
                );
            }
        }
        libc::close(fd);
    }
}

/// The device of the serial port named [`PORT_NAME`].
fn find_port() -> io::Result<PathBuf> {
    let mut found = None;
    wait_for(
        || {
            let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") else {
                return false;
            };
            for entry in entries.flatten() {
                let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                let dev = Path::new("/dev").join(entry.file_name());
                if name.trim() == PORT_NAME && dev.exists() {
                    found = Some(dev);
                    return true;
                }
            }
            false
        },
        &format!("the virtio serial port {PORT_NAME}"),
    )?;
    Ok(found.expect("set when ready"))
}

/// The port's writing side, shared by every request. Frames of a session
/// that has ended are dropped, so a new session never reads an old
/// request's frames under a reused id.
struct Out {
    port: Mutex<File>,
    session: AtomicU64,
}

impl Out {
    fn send(&self, session: u64, id: u32, frame: &Frame) -> io::Result<()> {
        let mut port = self.port.lock().unwrap_or_else(|e| e.into_inner());
        if self.session.load(Ordering::Acquire) != session {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the session ended",
            ));
        }
        stacyvm_agent::write_tagged(&mut *port, id, frame)?;
        port.flush()
    }
}

/// One request's side of the multiplexed stream, for [`crate::run_command`].
struct Request {
    out: Arc<Out>,
    session: u64,
    id: u32,
    /// Readable when the host asks for a kill (a byte `1`) or the session
    /// ended (`2`, or the write side closed).
    control: OwnedFd,
}

impl crate::Channel for Request {
    fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.out.send(self.session, self.id, frame)
    }

    fn control_fd(&self) -> RawFd {
        self.control.as_raw_fd()
    }

    fn on_control(&mut self) -> bool {
        let mut byte = [0u8; 1];
        // SAFETY: reading one byte into a local buffer.
        let n = unsafe { libc::read(self.control.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        n == 1 && byte[0] == 1
    }
}

/// What the main loop keeps per running request.
#[derive(Default)]
struct Running {
    /// The write ends of the running commands' control pipes.
    execs: Mutex<HashMap<(u64, u32), OwnedFd>>,
}

impl Running {
    fn signal(&self, key: (u64, u32), byte: u8) {
        let execs = self.execs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = execs.get(&key) {
            // SAFETY: writing one byte from a local buffer.
            unsafe { libc::write(fd.as_raw_fd(), [byte].as_ptr().cast(), 1) };
        }
    }

    /// Ends every command of `session`: their caller is gone.
    fn end_session(&self, session: u64) {
        let mut execs = self.execs.lock().unwrap_or_else(|e| e.into_inner());
        // Closing the write ends reads as "gone" on the other side.
        execs.retain(|(s, _), _| *s != session);
    }

    fn count(&self) -> usize {
        self.execs.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

fn serve(port: File, signals: libc::sigset_t) -> ! {
    let children = Arc::new(crate::Children::default());
    // SAFETY: signalfd with a valid, initialised set.
    let sigfd = unsafe { libc::signalfd(-1, &signals, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if sigfd < 0 {
        eprintln!("stacyvm-agent: signalfd: {}", io::Error::last_os_error());
        std::process::exit(1);
    }
    // SAFETY: a new descriptor owned by nobody else.
    let sigfd = unsafe { OwnedFd::from_raw_fd(sigfd) };
    crate::install_stop_handlers();
    let out = Arc::new(Out {
        port: Mutex::new(port.try_clone().unwrap_or_else(|e| {
            eprintln!("stacyvm-agent: {e}");
            std::process::exit(1)
        })),
        session: AtomicU64::new(0),
    });
    let running = Arc::new(Running::default());
    let mut reader = port;
    let mut session: u64 = 0;
    let mut writes: HashMap<u32, files::Upload> = HashMap::new();
    let mut connected = false;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sigfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: reader.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // While the host is away the port reports a hang-up at once:
        // look again at a slow pace.
        let watched = if connected { 2 } else { 1 };
        let timeout = if connected { -1 } else { 20 };
        // SAFETY: a valid array of pollfd for its length.
        if unsafe { libc::poll(fds.as_mut_ptr(), watched, timeout) } < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            crate::handle_signals(&sigfd, &children);
        }
        if !connected {
            let mut probe = [libc::pollfd {
                fd: reader.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: as above.
            unsafe { libc::poll(probe.as_mut_ptr(), 1, 0) };
            if probe[0].revents & libc::POLLHUP != 0 || probe[0].revents & libc::POLLIN == 0 {
                continue;
            }
            connected = true;
        } else if fds[1].revents & libc::POLLHUP != 0 {
            // The host went away: what it started must not run on unseen.
            connected = false;
            end(&out, &running, &mut writes, session);
            continue;
        } else if fds[1].revents == 0 {
            continue;
        }
        let (id, frame) = match stacyvm_agent::read_tagged(&mut reader) {
            Ok(Some(tagged)) => tagged,
            Ok(None) => {
                connected = false;
                end(&out, &running, &mut writes, session);
                continue;
            }
            Err(e) => {
                // A stream out of step cannot be resynchronised: wait for
                // the host to open a new session.
                eprintln!("stacyvm-agent: unreadable frame from the host: {e}");
                end(&out, &running, &mut writes, session);
                connected = false;
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match (id, frame) {
            (0, Frame::Session(next)) => {
                end(&out, &running, &mut writes, session);
                session = next;
                out.session.store(next, Ordering::Release);
                let welcome = Frame::Welcome {
                    version: VERSION,
                    session,
                };
                if let Err(e) = out.send(session, 0, &welcome) {
                    eprintln!("stacyvm-agent: cannot answer the host: {e}");
                }
            }
            // Nothing before a session.
            _ if session == 0 => {}
            (0, _) => {}
            (id, Frame::Exec(exec)) => {
                if running.count() >= MAX_REQUESTS {
                    let refusal = Frame::Failed {
                        why: Failure::Other,
                        message: format!("the sandbox runs {MAX_REQUESTS} commands already"),
                    };
                    let _ = out.send(session, id, &refusal);
                    continue;
                }
                let Ok((control_r, control_w)) = crate::pipe() else {
                    let refusal = Frame::Failed {
                        why: Failure::Other,
                        message: "no pipes".into(),
                    };
                    let _ = out.send(session, id, &refusal);
                    continue;
                };
                running
                    .execs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((session, id), control_w);
                let (children, done, out) = (children.clone(), running.clone(), out.clone());
                let started = crate::spawn_thread(move || {
                    let mut request = Request {
                        out,
                        session,
                        id,
                        control: control_r,
                    };
                    crate::run_command(exec, &children, &mut request);
                    done.execs
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&(session, id));
                });
                if !started {
                    running
                        .execs
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&(session, id));
                }
            }
            (id, Frame::Kill) => {
                running.signal((session, id), 1);
                // A write whose caller left.
                if let Some(write) = writes.remove(&id) {
                    write.abandon();
                }
            }
            (id, Frame::File(FileOp::Write { path, mode })) => {
                if writes.len() >= MAX_WRITES {
                    let refusal = Frame::Failed {
                        why: Failure::Other,
                        message: format!("{MAX_WRITES} writes are in flight already"),
                    };
                    let _ = out.send(session, id, &refusal);
                    continue;
                }
                match files::Upload::open(&path, mode, session ^ u64::from(id)) {
                    Ok(write) => {
                        if let Some(old) = writes.insert(id, write) {
                            old.abandon();
                        }
                    }
                    Err(files::Refusal(why, message)) => {
                        let _ = out.send(session, id, &Frame::Failed { why, message });
                    }
                }
            }
            (id, Frame::Data(data)) => {
                if let Some(write) = writes.get_mut(&id) {
                    write.data(&data);
                }
            }
            (id, Frame::Done) => {
                if let Some(write) = writes.remove(&id) {
                    let answer = match write.finish() {
                        Ok(()) => Frame::Done,
                        Err(files::Refusal(why, message)) => Frame::Failed { why, message },
                    };
                    let _ = out.send(session, id, &answer);
                }
            }
            (id, Frame::File(op)) => {
                let answering = out.clone();
                let started = crate::spawn_thread(move || {
                    let mut send = |frame: Frame| answering.send(session, id, &frame);
                    let end = match files::answer(op, &mut send) {
                        Ok(()) => Frame::Done,
                        Err(files::Refusal(why, message)) => Frame::Failed { why, message },
                    };
                    let _ = send(end);
                });
                if !started {
                    let refusal = Frame::Failed {
                        why: Failure::Other,
                        message: "no threads".into(),
                    };
                    let _ = out.send(session, id, &refusal);
                }
            }
            // Anything else from the host is ignored.
            _ => {}
        }
    }
}

/// Ends a session: its commands are killed, its writes dropped.
fn end(out: &Out, running: &Running, writes: &mut HashMap<u32, files::Upload>, session: u64) {
    {
        // Nothing of the old session goes out once it ended.
        let _port = out.port.lock().unwrap_or_else(|e| e.into_inner());
        out.session.store(0, Ordering::Release);
    }
    running.end_session(session);
    for (_, write) in writes.drain() {
        write.abandon();
    }
}
