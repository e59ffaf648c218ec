//! `stacyvm-agent` as the init of a microVM: the kernel runs it as
//! `/init` of the initramfs StacyVM builds (`provider/microvm`).
//!
//! Boot: mount `/dev`, `/proc`, `/sys`; load the kernel modules the
//! initramfs carries (`/stacyvm/modules`, in the order its `order` file
//! lists: a distribution kernel has its virtio drivers as modules); mount
//! the sandbox's disk (`/dev/vda`, ext4) and make it the root; bring up
//! loopback; find the virtio serial port named [`PORT_NAME`], or with
//! `stacyvm.transport=vsock` on the kernel's command line (Firecracker)
//! listen on vsock port [`stacyvm_agent::VSOCK_PORT`]. Then it serves the
//! multiplexed protocol (see the crate's docs) to the host and does PID
//! 1's work: reaping orphans, ending the VM on SIGTERM,
//! SIGINT or SIGHUP (`kill 1` inside stops the sandbox, as elsewhere).
//!
//! A failed boot step is printed on the console and ends the agent: the
//! kernel panics, the VM powers off, and the host reports the console's
//! last lines.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Other file operations running at once (each on a thread).
const MAX_FILE_OPS: usize = 64;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn main() -> ! {
    let signals = crate::block_signals();
    if let Err(e) = boot() {
        eprintln!("stacyvm-agent: boot failed: {e}");
        std::process::exit(1);
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let vsock = cmdline
        .split_whitespace()
        .any(|arg| arg == stacyvm_agent::VSOCK_PARAM);
    let transport = if vsock {
        listen_vsock(stacyvm_agent::VSOCK_PORT).map(|listener| {
            eprintln!(
                "stacyvm-agent: ready on vsock port {}",
                stacyvm_agent::VSOCK_PORT
            );
            Transport::Vsock(listener)
        })
    } else {
        find_port().and_then(|port| {
            eprintln!("stacyvm-agent: ready on {}", port.display());
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&port)
                .map(|f| Transport::Port(OwnedFd::from(f)))
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", port.display())))
        })
    };
    match transport {
        Ok(transport) => serve(transport, signals),
        Err(e) => {
            eprintln!("stacyvm-agent: {e}");
            std::process::exit(1);
        }
    }
}

/// Where the host reaches the agent.
enum Transport {
    /// A virtio serial port: one stream for the VM's life, on which the
    /// host's leaving shows as a hang-up.
    Port(OwnedFd),
    /// A vsock listener: each host is a connection of its own, and a new
    /// one replaces the one before (its host has gone, or will).
    Vsock(OwnedFd),
}

/// Listens on vsock `port` (any CID), non-blocking; waits for the vsock
/// transport to be there (its modules were just loaded).
fn listen_vsock(port: u32) -> io::Result<OwnedFd> {
    let mut last = None;
    let mut listener = None;
    wait_for(
        || {
            // SAFETY: socket(2) with constant arguments.
            let fd = unsafe {
                libc::socket(
                    libc::AF_VSOCK,
                    libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    0,
                )
            };
            if fd < 0 {
                last = Some(io::Error::last_os_error());
                return false;
            }
            // SAFETY: a new descriptor owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: a zeroed sockaddr_vm is valid; its fields set below.
            let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
            addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
            addr.svm_cid = libc::VMADDR_CID_ANY;
            addr.svm_port = port;
            // SAFETY: bind and listen on an owned socket with an address of
            // the size given.
            let ok = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                ) == 0
                    && libc::listen(fd.as_raw_fd(), 4) == 0
            };
            if !ok {
                last = Some(io::Error::last_os_error());
                return false;
            }
            listener = Some(fd);
            true
        },
        "the vsock transport",
    )
    .map_err(|e| match last.take() {
        Some(why) => io::Error::new(e.kind(), format!("{e} (last error: {why})")),
        None => e,
    })?;
    Ok(listener.expect("set when ready"))
}

/// The host's connection from the vsock listener, if one waits. Only the
/// host (CID 2) is taken: a process in the guest that reaches the port
/// (over a loopback transport) is turned away.
fn accept(listener: &OwnedFd) -> Option<OwnedFd> {
    // SAFETY: a zeroed sockaddr_vm is valid; accept4 fills it.
    let mut peer: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: accept4 on a listening socket this process owns, with an
    // address buffer of the size given.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&raw mut peer).cast(),
            &mut len,
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new descriptor owned by nobody else.
    let conn = unsafe { OwnedFd::from_raw_fd(fd) };
    if peer.svm_cid != libc::VMADDR_CID_HOST {
        eprintln!(
            "stacyvm-agent: refused a vsock connection from CID {}",
            peer.svm_cid
        );
        return None;
    }
    Some(conn)
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
    // The hostname comes with the host's `Setup`: a VM restored from a
    // snapshot has its kernel command line from the VM it was taken of.
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

/// How long a blocked write or a partly read frame waits before looking
/// again whether its session still stands.
const IO_POLL_MS: i32 = 100;

/// How long the rest of a frame may take to arrive once it began.
const FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// The bytes a `Session` frame starts with (id 0, kind, 8-byte payload).
/// Out of step (after a hang-up or a frame that did not parse) the agent
/// reads nothing but these until the host opens a new session.
const SESSION_PREFIX: [u8; 9] = [0, 0, 0, 0, 3, 0, 0, 0, 8];

fn poll_one(fd: RawFd, events: libc::c_short, timeout_ms: i32) -> libc::c_short {
    let mut p = [libc::pollfd {
        fd,
        events,
        revents: 0,
    }];
    // SAFETY: a valid array of one pollfd.
    if unsafe { libc::poll(p.as_mut_ptr(), 1, timeout_ms) } <= 0 {
        return 0;
    }
    p[0].revents
}

/// The port's writing side, shared by every request. The port is
/// non-blocking: a write the host does not take (it went away) waits in
/// steps of [`IO_POLL_MS`] and gives up as soon as its session ended, so no
/// writer holds the lock for long and PID 1's loop never waits on an
/// absent host. Frames of a session that has ended are dropped; a frame
/// cut off that way is skipped by the host, which looks for its welcome
/// byte by byte.
///
/// It owns the stream under its lock: the stream a host reached the agent
/// by is replaced (vsock: a connection per host) only between writes.
struct Out {
    stream: Mutex<Option<OwnedFd>>,
    session: AtomicU64,
}

impl Out {
    /// Puts `stream` in place of the one before (closed here).
    fn replace(&self, stream: Option<OwnedFd>) {
        *locked(&self.stream) = stream;
    }

    fn send(&self, session: u64, id: u32, frame: &Frame) -> io::Result<()> {
        let stream = locked(&self.stream);
        let ended = || io::Error::new(io::ErrorKind::BrokenPipe, "the session ended");
        if self.session.load(Ordering::Acquire) != session {
            return Err(ended());
        }
        let Some(fd) = stream.as_ref().map(AsRawFd::as_raw_fd) else {
            return Err(ended());
        };
        let bytes = frame.encode_tagged(id);
        let mut at = 0;
        while at < bytes.len() {
            // SAFETY: writing from a live buffer of that length.
            let n = unsafe { libc::write(fd, bytes[at..].as_ptr().cast(), bytes.len() - at) };
            if n > 0 {
                at += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => {
                    poll_one(fd, libc::POLLOUT, IO_POLL_MS);
                    if self.session.load(Ordering::Acquire) != session {
                        return Err(ended());
                    }
                }
                Some(libc::EINTR) => {}
                _ => return Err(e),
            }
        }
        Ok(())
    }
}

/// The port's reading side: blocking reads over the non-blocking port,
/// bounded per frame by [`FRAME_DEADLINE`]; a hang-up is an error.
struct In {
    fd: RawFd,
    deadline: Option<Instant>,
}

impl io::Read for In {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: reading into a live buffer of that length.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the host hung up",
                ));
            }
            match e.raw_os_error() {
                Some(libc::EAGAIN) => {
                    let deadline = *self
                        .deadline
                        .get_or_insert_with(|| Instant::now() + FRAME_DEADLINE);
                    if Instant::now() > deadline {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "a frame stalled"));
                    }
                    if poll_one(self.fd, libc::POLLIN, IO_POLL_MS) & libc::POLLHUP != 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the host hung up",
                        ));
                    }
                }
                Some(libc::EINTR) => {}
                _ => return Err(e),
            }
        }
    }
}

impl In {
    /// Reads up to and including a `Session` frame; its number.
    fn find_session(&mut self) -> io::Result<u64> {
        let mut window = [0u8; 9];
        let mut byte = [0u8; 1];
        loop {
            io::Read::read_exact(self, &mut byte)?;
            window.rotate_left(1);
            window[8] = byte[0];
            if window == SESSION_PREFIX {
                let mut n = [0u8; 8];
                io::Read::read_exact(self, &mut n)?;
                let session = u64::from_be_bytes(n);
                if session != 0 {
                    return Ok(session);
                }
            }
        }
    }
}

/// One request's side of the multiplexed stream, for [`crate::run_command`].
struct Request {
    out: Arc<Out>,
    session: u64,
    id: u32,
    /// Readable when the host asks for a kill (a byte `1`), sent input or
    /// a resize (`3`: `queue` turned non-empty), or the session ended
    /// (`2`, or the write side closed).
    control: OwnedFd,
    queue: Arc<Mutex<Queued>>,
}

/// What the host sent a command with a terminal, not taken yet.
#[derive(Default)]
struct Queued {
    items: std::collections::VecDeque<crate::Control>,
    bytes: usize,
}

/// Input and resizes waiting for a command with a terminal, at most.
const MAX_QUEUED_INPUT: usize = 1 << 20;

/// A running command's side of the main loop: its control pipe's write
/// end (non-blocking: PID 1's loop never waits on it) and the queue of what
/// the host sent it.
struct ExecControl {
    pipe: OwnedFd,
    queue: Arc<Mutex<Queued>>,
}

impl crate::Channel for Request {
    fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.out.send(self.session, self.id, frame)
    }

    fn control_fd(&self) -> RawFd {
        self.control.as_raw_fd()
    }

    fn on_control(&mut self) -> crate::Control {
        let mut byte = [0u8; 1];
        // SAFETY: reading one byte into a local buffer.
        let n = unsafe { libc::read(self.control.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        match (n, byte[0]) {
            (1, 1) => crate::Control::Kill,
            (1, 3) => {
                // Everything queued: one wake-up per turn to non-empty.
                let mut queue = locked(&self.queue);
                queue.bytes = 0;
                crate::Control::Batch(queue.items.drain(..).collect())
            }
            _ => crate::Control::Gone,
        }
    }
}

/// What the main loop keeps per running request, by (session, id).
#[derive(Default)]
struct Running {
    /// The running commands' control pipes and queues.
    execs: Mutex<HashMap<(u64, u32), ExecControl>>,
    /// The cancel flags of the running file operations.
    files: Mutex<HashMap<(u64, u32), Arc<AtomicBool>>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Running {
    /// The host asks for request `key` to end.
    fn kill(&self, key: (u64, u32)) {
        if let Some(exec) = locked(&self.execs).get(&key) {
            // SAFETY: writing one byte from a local buffer.
            unsafe { libc::write(exec.pipe.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
        if let Some(flag) = locked(&self.files).get(&key) {
            flag.store(true, Ordering::Release);
        }
    }

    /// Input or a resize for command `key` (one with a terminal); dropped
    /// past [`MAX_QUEUED_INPUT`] (the command does not take it).
    fn control(&self, key: (u64, u32), control: crate::Control) {
        let execs = locked(&self.execs);
        let Some(exec) = execs.get(&key) else {
            return;
        };
        let mut queue = locked(&exec.queue);
        let size = match &control {
            crate::Control::Input(d) => d.len(),
            _ => 4,
        };
        if queue.bytes + size > MAX_QUEUED_INPUT {
            return;
        }
        let wake = queue.items.is_empty();
        queue.items.push_back(control);
        queue.bytes += size;
        drop(queue);
        if wake {
            // SAFETY: writing one byte from a local buffer to a
            // non-blocking pipe (a full pipe already wakes the reader).
            unsafe { libc::write(exec.pipe.as_raw_fd(), [3u8].as_ptr().cast(), 1) };
        }
    }

    /// Ends every request of `session`: their caller is gone.
    fn end_session(&self, session: u64) {
        // Closing the write ends reads as "gone" on the other side.
        locked(&self.execs).retain(|(s, _), _| *s != session);
        locked(&self.files).retain(|(s, _), flag| {
            if *s == session {
                flag.store(true, Ordering::Release);
            }
            *s != session
        });
    }
}

fn refuse(out: &Out, session: u64, id: u32, message: String) {
    let refusal = Frame::Failed {
        why: Failure::Other,
        message,
    };
    if let Err(e) = out.send(session, id, &refusal) {
        eprintln!("stacyvm-agent: cannot answer request {id}: {e}");
    }
}

fn serve(transport: Transport, signals: libc::sigset_t) -> ! {
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
    let (stream, listener) = match transport {
        Transport::Port(port) => {
            // SAFETY: fcntl on a descriptor `out` owns for the life of the
            // loop below, which never returns.
            unsafe {
                let flags = libc::fcntl(port.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(port.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
            (Some(port), None)
        }
        Transport::Vsock(listener) => (None, Some(listener)),
    };
    // The stream being served (-1: none); only this loop replaces it.
    let mut fd = stream.as_ref().map_or(-1, AsRawFd::as_raw_fd);
    let out = Arc::new(Out {
        stream: Mutex::new(stream),
        session: AtomicU64::new(0),
    });
    let running = Arc::new(Running::default());
    let mut reader = In { fd, deadline: None };
    // 0: out of step, waiting for a session.
    let mut session: u64 = 0;
    let mut writes: HashMap<u32, files::Upload> = HashMap::new();
    let mut connected = false;
    // The host is gone: a vsock connection closes (the next host makes
    // its own); a serial port stays for the next.
    let hang_up = |fd: &mut RawFd, connected: &mut bool| {
        *connected = false;
        if listener.is_some() {
            out.replace(None);
            *fd = -1;
        }
    };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sigfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                // poll(2) skips a negative descriptor.
                fd: if connected { fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.as_ref().map_or(-1, AsRawFd::as_raw_fd),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // While the host is away a serial port reports a hang-up at once:
        // look again at a slow pace.
        let timeout = if connected || listener.is_some() {
            -1
        } else {
            20
        };
        // SAFETY: a valid array of pollfd for its length.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) } < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            crate::handle_signals(&sigfd, &children);
        }
        if fds[2].revents & libc::POLLIN != 0
            && let Some(next) = listener.as_ref().and_then(accept)
        {
            // A new host: what the one before started ends with it.
            end(&out, &running, &mut writes, &mut session);
            fd = next.as_raw_fd();
            reader.fd = fd;
            out.replace(Some(next));
            connected = true;
            continue;
        }
        if !connected {
            if listener.is_some() {
                continue;
            }
            let revents = poll_one(fd, libc::POLLIN, 0);
            if revents & libc::POLLHUP != 0 || revents & libc::POLLIN == 0 {
                continue;
            }
            connected = true;
        } else if fds[1].revents & libc::POLLHUP != 0 {
            // The host went away: what it started must not run on unseen.
            end(&out, &running, &mut writes, &mut session);
            hang_up(&mut fd, &mut connected);
            continue;
        } else if fds[1].revents == 0 {
            continue;
        }
        reader.deadline = None;
        if session == 0 {
            match reader.find_session() {
                Ok(next) => open_session(&out, next, &mut session),
                Err(_) => hang_up(&mut fd, &mut connected),
            }
            continue;
        }
        let (id, frame) = match stacyvm_agent::read_tagged(&mut reader) {
            Ok(Some(tagged)) => tagged,
            Ok(None) => {
                end(&out, &running, &mut writes, &mut session);
                hang_up(&mut fd, &mut connected);
                continue;
            }
            Err(e) => {
                // Out of step: nothing counts until a new session.
                end(&out, &running, &mut writes, &mut session);
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    hang_up(&mut fd, &mut connected);
                } else {
                    eprintln!("stacyvm-agent: unreadable frame from the host: {e}");
                }
                continue;
            }
        };
        match (id, frame) {
            (0, Frame::Session(next)) if next != 0 => {
                end(&out, &running, &mut writes, &mut session);
                open_session(&out, next, &mut session);
            }
            (0, _) => {}
            (id, Frame::Exec(exec)) => {
                if locked(&running.execs).len() >= MAX_REQUESTS {
                    refuse(
                        &out,
                        session,
                        id,
                        format!("the sandbox runs {MAX_REQUESTS} commands already"),
                    );
                    continue;
                }
                let Ok((control_r, control_w)) = crate::pipe() else {
                    refuse(&out, session, id, "no pipes".into());
                    continue;
                };
                // SAFETY: fcntl on a descriptor just made.
                unsafe {
                    let fd = control_w.as_raw_fd();
                    libc::fcntl(
                        fd,
                        libc::F_SETFL,
                        libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
                    );
                }
                let queue = Arc::new(Mutex::new(Queued::default()));
                locked(&running.execs).insert(
                    (session, id),
                    ExecControl {
                        pipe: control_w,
                        queue: queue.clone(),
                    },
                );
                let (children, done, answering) = (children.clone(), running.clone(), out.clone());
                let started = crate::spawn_thread(move || {
                    let mut request = Request {
                        out: answering,
                        session,
                        id,
                        control: control_r,
                        queue,
                    };
                    crate::run_command(exec, &children, &mut request);
                    locked(&done.execs).remove(&(session, id));
                });
                if !started {
                    locked(&running.execs).remove(&(session, id));
                    refuse(&out, session, id, "no threads".into());
                }
            }
            (id, Frame::Input(data)) => running.control((session, id), crate::Control::Input(data)),
            (id, Frame::Resize(size)) => {
                running.control((session, id), crate::Control::Resize(size))
            }
            (id, Frame::Kill) => {
                running.kill((session, id));
                // A write whose caller left.
                if let Some(write) = writes.remove(&id) {
                    write.abandon();
                }
            }
            (id, Frame::File(FileOp::Write { path, mode })) => {
                if writes.len() >= MAX_WRITES {
                    refuse(
                        &out,
                        session,
                        id,
                        format!("{MAX_WRITES} writes are in flight already"),
                    );
                    continue;
                }
                match files::Upload::open(&path, mode, u64::from(id)) {
                    Ok(write) => {
                        if let Some(old) = writes.insert(id, write) {
                            old.abandon();
                        }
                    }
                    Err(files::Refusal(why, message)) => {
                        if let Err(e) = out.send(session, id, &Frame::Failed { why, message }) {
                            eprintln!("stacyvm-agent: cannot answer request {id}: {e}");
                        }
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
                    if let Err(e) = out.send(session, id, &answer) {
                        eprintln!("stacyvm-agent: cannot answer request {id}: {e}");
                    }
                }
            }
            (id, Frame::File(op)) => {
                if locked(&running.files).len() >= MAX_FILE_OPS {
                    refuse(
                        &out,
                        session,
                        id,
                        format!("{MAX_FILE_OPS} file operations run already"),
                    );
                    continue;
                }
                let cancelled = Arc::new(AtomicBool::new(false));
                locked(&running.files).insert((session, id), cancelled.clone());
                let (answering, done) = (out.clone(), running.clone());
                let started = crate::spawn_thread(move || {
                    let mut send = |frame: Frame| answering.send(session, id, &frame);
                    let stop = || cancelled.load(Ordering::Acquire);
                    let end = match files::answer(op, &mut send, &stop) {
                        Ok(()) => Frame::Done,
                        Err(files::Refusal(why, message)) => Frame::Failed { why, message },
                    };
                    // A cancelled request's caller has gone: nobody reads it.
                    if !stop() {
                        let _ = send(end);
                    }
                    locked(&done.files).remove(&(session, id));
                });
                if !started {
                    locked(&running.files).remove(&(session, id));
                    refuse(&out, session, id, "no threads".into());
                }
            }
            (id, Frame::Setup(setup)) => {
                let answer = match apply_setup(&setup) {
                    Ok(()) => Frame::Done,
                    Err(e) => Frame::Failed {
                        why: Failure::Other,
                        message: e.to_string(),
                    },
                };
                if let Err(e) = out.send(session, id, &answer) {
                    eprintln!("stacyvm-agent: cannot answer request {id}: {e}");
                }
            }
            // Anything else from the host is ignored.
            _ => {}
        }
    }
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

/// Takes the host's settings for this VM: its hostname, the time, and
/// fresh entropy credited to the pool, from which the kernel's random
/// generator is then reseeded (a VM restored from a snapshot would
/// otherwise produce the same random numbers as its siblings).
fn apply_setup(setup: &stacyvm_agent::Setup) -> io::Result<()> {
    let fail = |what: &str| {
        let e = io::Error::last_os_error();
        io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    if !setup.hostname.is_empty() {
        // SAFETY: a valid buffer of that length.
        if unsafe { libc::sethostname(setup.hostname.as_ptr().cast(), setup.hostname.len()) } != 0 {
            return Err(fail("sethostname"));
        }
    }
    if setup.unix_nanos > 0 {
        let now = libc::timespec {
            tv_sec: (setup.unix_nanos / 1_000_000_000) as libc::time_t,
            tv_nsec: (setup.unix_nanos % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: a valid timespec.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &now) } != 0 {
            return Err(fail("clock_settime"));
        }
    }
    if !setup.entropy.is_empty() {
        let random = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")?;
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        let mut info = Vec::with_capacity(8 + setup.entropy.len());
        info.extend_from_slice(&((setup.entropy.len() * 8) as i32).to_ne_bytes());
        info.extend_from_slice(&(setup.entropy.len() as i32).to_ne_bytes());
        info.extend_from_slice(&setup.entropy);
        // SAFETY: ioctls on an open descriptor; RNDADDENTROPY reads a
        // rand_pool_info whose buffer holds buf_size bytes.
        unsafe {
            if libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) != 0 {
                return Err(fail("RNDADDENTROPY"));
            }
            if libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) != 0 {
                return Err(fail("RNDRESEEDCRNG"));
            }
        }
    }
    Ok(())
}

/// Begins session `next`: the host hears a welcome carrying its number.
fn open_session(out: &Out, next: u64, session: &mut u64) {
    *session = next;
    out.session.store(next, Ordering::Release);
    let welcome = Frame::Welcome {
        version: VERSION,
        session: next,
    };
    if let Err(e) = out.send(next, 0, &welcome) {
        eprintln!("stacyvm-agent: cannot answer the host: {e}");
    }
}

/// Ends a session: its commands are killed, its file operations cancelled,
/// its writes dropped; the agent waits for a new one.
fn end(out: &Out, running: &Running, writes: &mut HashMap<u32, files::Upload>, session: &mut u64) {
    // Writers of the old session give up at their next step.
    out.session.store(0, Ordering::Release);
    running.end_session(*session);
    for (_, write) in writes.drain() {
        write.abandon();
    }
    *session = 0;
}
