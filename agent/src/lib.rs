//! The wire protocol between StacyVM and its in-sandbox agent.
//!
//! One connection carries one command. Every message is a frame:
//!
//! ```text
//! u8 kind | u32 big-endian payload length | payload
//! ```
//!
//! The agent speaks first with [`Frame::Hello`] (its protocol version). The
//! client sends one [`Frame::Exec`], then at most [`Frame::Kill`]; closing
//! its side kills the command too (the client went away). The agent
//! answers with output frames in the order the command wrote them and ends
//! with exactly one [`Frame::Exit`] or [`Frame::Failed`].
//!
//! Both sides treat the other's bytes as untrusted: a payload longer than
//! [`MAX_FRAME`] or a field that does not parse ends the connection.
//!
//! # The multiplexed form (microVMs)
//!
//! A microVM's agent has one byte stream to its host (a virtio serial
//! port, or one vsock connection), so every frame there is preceded by a
//! request id (`u32` big-endian, [`write_tagged`], [`read_tagged`]) and
//! several requests run at once. Id 0 is the session: the host opens it
//! with [`Frame::Session`] (a fresh random number) and the agent answers
//! [`Frame::Welcome`] with that number, after killing whatever the
//! previous session left running (its caller is gone). Frames of an older
//! session that were still in flight are told apart by that number, not
//! by their ids. Requests use ids from 1:
//!
//! - [`Frame::Exec`] as above, then at most [`Frame::Kill`].
//! - [`Frame::File`] with a [`FileOp`]: reads answer [`Frame::Data`]
//!   chunks, listings [`Frame::Entry`] frames, globs [`Frame::Path`]
//!   frames, and each ends with [`Frame::Done`] or [`Frame::Failed`]. A
//!   write is followed by the content in `Data` frames and a `Done` from
//!   the host; the agent answers `Done` or `Failed`.

use std::io::{self, Read, Write};

pub mod glob;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// The largest payload either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

/// The largest output chunk the agent sends in one frame.
pub const CHUNK: usize = 64 << 10;

/// The longest failure message either side accepts.
pub const MAX_MESSAGE: usize = 4096;

/// Where the sandbox's agent binary is mounted, read-only.
pub const AGENT_PATH: &str = "/.stacyvm/agent";

/// The sandbox directory holding the agent's socket (a small tmpfs).
pub const RUN_DIR: &str = "/.stacyvm/run";

/// The agent's socket, inside [`RUN_DIR`].
pub const SOCKET_NAME: &str = "agent.sock";

/// The vsock port a microVM's agent listens on where the VMM offers vsock
/// (Firecracker: the host writes `CONNECT 1024` on the VM's Unix socket).
pub const VSOCK_PORT: u32 = 1024;

/// The kernel parameter that tells the agent to serve on vsock rather than
/// on a virtio serial port.
pub const VSOCK_PARAM: &str = "stacyvm.transport=vsock";

/// Why the agent could not start a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The working directory does not exist (or is not a directory).
    Workdir,
    /// No such program, on the path or at the given path.
    NotFound,
    /// The program exists but cannot be executed.
    NotExecutable,
    /// Anything else (no pipes, no fork, a malformed request).
    Other,
    /// A file operation's path does not exist.
    NoSuchFile,
    /// A file operation the filesystem refuses (a directory where a file
    /// is wanted, a non-empty directory, a bad mode).
    Invalid,
}

impl Failure {
    fn code(self) -> u8 {
        match self {
            Failure::Workdir => 1,
            Failure::NotFound => 2,
            Failure::NotExecutable => 3,
            Failure::Other => 4,
            Failure::NoSuchFile => 5,
            Failure::Invalid => 6,
        }
    }

    fn from_code(code: u8) -> Failure {
        match code {
            1 => Failure::Workdir,
            2 => Failure::NotFound,
            3 => Failure::NotExecutable,
            5 => Failure::NoSuchFile,
            6 => Failure::Invalid,
            _ => Failure::Other,
        }
    }
}

/// One command to run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exec {
    pub argv: Vec<Vec<u8>>,
    /// `KEY=VALUE` entries laid over the agent's own environment (the
    /// sandbox's).
    pub env: Vec<Vec<u8>>,
    /// `None` is the sandbox's default (`/`).
    pub workdir: Option<Vec<u8>>,
    /// A terminal of this size: the command's stdin, stdout and stderr
    /// are a PTY's (its output comes as `Stdout`), it leads a session of
    /// its own with the terminal as its controlling one, and the host may
    /// send [`Frame::Input`] and [`Frame::Resize`] while it runs.
    pub pty: Option<WindowSize>,
}

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowSize {
    pub cols: u16,
    pub rows: u16,
}

impl WindowSize {
    fn encode(self) -> [u8; 4] {
        let mut b = [0u8; 4];
        b[..2].copy_from_slice(&self.cols.to_be_bytes());
        b[2..].copy_from_slice(&self.rows.to_be_bytes());
        b
    }

    fn decode(value: &[u8]) -> io::Result<WindowSize> {
        let b: [u8; 4] = int(value)?;
        Ok(WindowSize {
            cols: u16::from_be_bytes([b[0], b[1]]),
            rows: u16::from_be_bytes([b[2], b[3]]),
        })
    }
}

/// A file operation on the agent's own filesystem (a microVM's). Paths
/// are absolute and already normalised by the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOp {
    Read {
        path: Vec<u8>,
    },
    /// The content follows in `Data` frames, ended by `Done`.
    Write {
        path: Vec<u8>,
        mode: u32,
    },
    List {
        path: Vec<u8>,
    },
    Stat {
        path: Vec<u8>,
    },
    Move {
        from: Vec<u8>,
        to: Vec<u8>,
    },
    Chmod {
        path: Vec<u8>,
        mode: u32,
    },
    Delete {
        path: Vec<u8>,
        recursive: bool,
    },
    Glob {
        pattern: Vec<u8>,
    },
}

/// One directory entry or stat answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    pub path: Vec<u8>,
    pub name: Vec<u8>,
    pub size: u64,
    /// The whole `st_mode` (type and permission bits).
    pub mode: u32,
    pub is_dir: bool,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u32,
    },
    Exec(Exec),
    Kill,
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command ended: its exit code, 128 + signal for a signal death.
    Exit(i32),
    Failed {
        why: Failure,
        message: String,
    },
    /// Host to agent, id 0: a new session begins.
    Session(u64),
    /// A file operation.
    File(FileOp),
    /// File content, either way.
    Data(Vec<u8>),
    /// The end of a write's content (host), or a file operation's success
    /// (agent).
    Done,
    /// Agent to host, id 0: the answer to `Session`.
    Welcome {
        version: u32,
        session: u64,
    },
    Entry(Entry),
    /// One glob match.
    Path(Vec<u8>),
    /// Host to agent, during a command with a terminal: bytes typed into it.
    Input(Vec<u8>),
    /// Host to agent, during a command with a terminal: its new size.
    Resize(WindowSize),
    /// Host to a microVM's agent: the settings of a VM that has just been
    /// made, booted or restored from a snapshot of another VM. Answered
    /// `Done` or `Failed`.
    Setup(Setup),
}

/// What a VM takes from its host when it is made: a VM restored from a
/// snapshot has the hostname, clock and random state of the VM the
/// snapshot was taken of, and must not keep them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Setup {
    pub hostname: Vec<u8>,
    /// The host's time, in nanoseconds since the Unix epoch.
    pub unix_nanos: u64,
    /// Fresh random bytes, credited to the guest's pool before its random
    /// generator is reseeded.
    pub entropy: Vec<u8>,
}

/// The longest hostname a [`Setup`] carries (the kernel's limit).
pub const MAX_HOSTNAME: usize = 64;

/// The most entropy a [`Setup`] carries.
pub const MAX_ENTROPY: usize = 64;

const HELLO: u8 = 0;
const EXEC: u8 = 1;
const KILL: u8 = 2;
const SESSION: u8 = 3;
const FILE: u8 = 4;
const DATA: u8 = 5;
const DONE: u8 = 6;
const INPUT: u8 = 7;
const RESIZE: u8 = 8;
const STDOUT: u8 = 11;
const STDERR: u8 = 12;
const EXIT: u8 = 13;
const FAILED: u8 = 14;
const WELCOME: u8 = 15;
const ENTRY: u8 = 16;
const PATH: u8 = 17;
const SETUP: u8 = 18;

/// The longest path either side accepts in a file frame.
pub const MAX_PATH: usize = 4096;

const ARG: u8 = b'a';
const ENV: u8 = b'e';
const WORKDIR: u8 = b'w';
const PTY: u8 = b'y';
const OP: u8 = b'o';
const P1: u8 = b'p';
const P2: u8 = b'q';
const MODE: u8 = b'm';
const FLAG: u8 = b'r';
const NAME: u8 = b'n';
const HOSTNAME: u8 = b'h';
const CLOCK: u8 = b'c';
const ENTROPY: u8 = b'x';
const SIZE: u8 = b's';
const MTIME: u8 = b't';

/// Splits a payload of `tag | u32 length | value` fields.
fn fields(payload: &[u8]) -> io::Result<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        if rest.len() < 5 {
            return Err(bad("truncated field"));
        }
        let tag = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let value = rest.get(5..5 + len).ok_or_else(|| bad("truncated field"))?;
        rest = &rest[5 + len..];
        out.push((tag, value));
    }
    Ok(out)
}

fn int<const N: usize>(value: &[u8]) -> io::Result<[u8; N]> {
    value.try_into().map_err(|_| bad("bad integer field"))
}

impl FileOp {
    fn code(&self) -> u8 {
        match self {
            FileOp::Read { .. } => 1,
            FileOp::Write { .. } => 2,
            FileOp::List { .. } => 3,
            FileOp::Stat { .. } => 4,
            FileOp::Move { .. } => 5,
            FileOp::Chmod { .. } => 6,
            FileOp::Delete { .. } => 7,
            FileOp::Glob { .. } => 8,
        }
    }

    fn encode(&self, p: &mut Vec<u8>) {
        field(p, OP, &[self.code()]);
        match self {
            FileOp::Read { path }
            | FileOp::List { path }
            | FileOp::Stat { path }
            | FileOp::Glob { pattern: path } => field(p, P1, path),
            FileOp::Write { path, mode } | FileOp::Chmod { path, mode } => {
                field(p, P1, path);
                field(p, MODE, &mode.to_be_bytes());
            }
            FileOp::Move { from, to } => {
                field(p, P1, from);
                field(p, P2, to);
            }
            FileOp::Delete { path, recursive } => {
                field(p, P1, path);
                field(p, FLAG, &[u8::from(*recursive)]);
            }
        }
    }

    fn decode(payload: &[u8]) -> io::Result<FileOp> {
        let (mut op, mut p1, mut p2, mut mode, mut flag) = (None, None, None, None, false);
        for (tag, value) in fields(payload)? {
            match tag {
                OP => op = Some(int::<1>(value)?[0]),
                P1 => p1 = Some(value.to_vec()),
                P2 => p2 = Some(value.to_vec()),
                MODE => mode = Some(u32::from_be_bytes(int(value)?)),
                FLAG => flag = int::<1>(value)?[0] != 0,
                _ => return Err(bad("unknown field")),
            }
        }
        let path = p1.ok_or_else(|| bad("a file operation without a path"))?;
        let mode = || mode.ok_or_else(|| bad("a file operation without a mode"));
        Ok(match op {
            Some(1) => FileOp::Read { path },
            Some(2) => FileOp::Write {
                path,
                mode: mode()?,
            },
            Some(3) => FileOp::List { path },
            Some(4) => FileOp::Stat { path },
            Some(5) => FileOp::Move {
                from: path,
                to: p2.ok_or_else(|| bad("a move without a target"))?,
            },
            Some(6) => FileOp::Chmod {
                path,
                mode: mode()?,
            },
            Some(7) => FileOp::Delete {
                path,
                recursive: flag,
            },
            Some(8) => FileOp::Glob { pattern: path },
            _ => return Err(bad("unknown file operation")),
        })
    }

    /// The operation's name in words (for messages).
    pub fn name(&self) -> &'static str {
        match self {
            FileOp::Read { .. } => "read",
            FileOp::Write { .. } => "write",
            FileOp::List { .. } => "list",
            FileOp::Stat { .. } => "stat",
            FileOp::Move { .. } => "move",
            FileOp::Chmod { .. } => "chmod",
            FileOp::Delete { .. } => "delete",
            FileOp::Glob { .. } => "glob",
        }
    }
}

impl Entry {
    fn encode(&self, p: &mut Vec<u8>) {
        field(p, P1, &self.path);
        field(p, NAME, &self.name);
        field(p, SIZE, &self.size.to_be_bytes());
        field(p, MODE, &self.mode.to_be_bytes());
        field(p, FLAG, &[u8::from(self.is_dir)]);
        field(p, MTIME, &self.mtime.to_be_bytes());
    }

    fn decode(payload: &[u8]) -> io::Result<Entry> {
        let mut entry = Entry::default();
        for (tag, value) in fields(payload)? {
            match tag {
                P1 => entry.path = value.to_vec(),
                NAME => entry.name = value.to_vec(),
                SIZE => entry.size = u64::from_be_bytes(int(value)?),
                MODE => entry.mode = u32::from_be_bytes(int(value)?),
                FLAG => entry.is_dir = int::<1>(value)?[0] != 0,
                MTIME => entry.mtime = i64::from_be_bytes(int(value)?),
                _ => return Err(bad("unknown field")),
            }
        }
        Ok(entry)
    }
}

fn field(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl Frame {
    /// The frame's bytes, header included.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload) = match self {
            Frame::Hello { version } => (HELLO, version.to_be_bytes().to_vec()),
            Frame::Exec(exec) => {
                let mut p = Vec::new();
                for arg in &exec.argv {
                    field(&mut p, ARG, arg);
                }
                for entry in &exec.env {
                    field(&mut p, ENV, entry);
                }
                if let Some(dir) = &exec.workdir {
                    field(&mut p, WORKDIR, dir);
                }
                if let Some(size) = exec.pty {
                    field(&mut p, PTY, &size.encode());
                }
                (EXEC, p)
            }
            Frame::Kill => (KILL, Vec::new()),
            Frame::Input(data) => (INPUT, data.clone()),
            Frame::Resize(size) => (RESIZE, size.encode().to_vec()),
            Frame::Stdout(data) => (STDOUT, data.clone()),
            Frame::Stderr(data) => (STDERR, data.clone()),
            Frame::Exit(code) => (EXIT, code.to_be_bytes().to_vec()),
            Frame::Failed { why, message } => {
                let mut cut = message.len().min(MAX_MESSAGE);
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                let mut p = vec![why.code()];
                p.extend_from_slice(&message.as_bytes()[..cut]);
                (FAILED, p)
            }
            Frame::Session(n) => (SESSION, n.to_be_bytes().to_vec()),
            Frame::File(op) => {
                let mut p = Vec::new();
                op.encode(&mut p);
                (FILE, p)
            }
            Frame::Data(data) => (DATA, data.clone()),
            Frame::Done => (DONE, Vec::new()),
            Frame::Welcome { version, session } => {
                let mut p = version.to_be_bytes().to_vec();
                p.extend_from_slice(&session.to_be_bytes());
                (WELCOME, p)
            }
            Frame::Entry(entry) => {
                let mut p = Vec::new();
                entry.encode(&mut p);
                (ENTRY, p)
            }
            Frame::Path(path) => (PATH, path.clone()),
            Frame::Setup(setup) => {
                let mut p = Vec::new();
                field(&mut p, HOSTNAME, &setup.hostname);
                field(&mut p, CLOCK, &setup.unix_nanos.to_be_bytes());
                field(&mut p, ENTROPY, &setup.entropy);
                (SETUP, p)
            }
        };
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Parses a header: the kind and the payload length, refused past
    /// what that kind may carry (before anything is allocated for it).
    pub fn header(bytes: [u8; 5]) -> io::Result<(u8, usize)> {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        let limit = match bytes[0] {
            EXEC | DATA => MAX_FRAME,
            KILL | DONE => 0,
            HELLO | EXIT | RESIZE => 4,
            INPUT => CHUNK,
            SESSION => 8,
            WELCOME => 12,
            STDOUT | STDERR => CHUNK,
            FAILED => 1 + MAX_MESSAGE,
            FILE => 3 * MAX_PATH,
            ENTRY => 4 * MAX_PATH,
            PATH => 2 * MAX_PATH,
            SETUP => 3 * 5 + MAX_HOSTNAME + 8 + MAX_ENTROPY,
            _ => return Err(bad("unknown frame kind")),
        };
        if len > limit {
            return Err(bad("frame too large for its kind"));
        }
        Ok((bytes[0], len))
    }

    /// The frame's kind in words (for messages: never its payload).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Exec(_) => "exec",
            Frame::Kill => "kill",
            Frame::Input(_) => "input",
            Frame::Resize(_) => "resize",
            Frame::Stdout(_) => "stdout",
            Frame::Stderr(_) => "stderr",
            Frame::Exit(_) => "exit",
            Frame::Failed { .. } => "failed",
            Frame::Session(_) => "session",
            Frame::File(_) => "file",
            Frame::Data(_) => "data",
            Frame::Done => "done",
            Frame::Welcome { .. } => "welcome",
            Frame::Entry(_) => "entry",
            Frame::Path(_) => "path",
            Frame::Setup(_) => "setup",
        }
    }

    /// Builds a frame from its kind and payload.
    pub fn decode(kind: u8, payload: Vec<u8>) -> io::Result<Frame> {
        Ok(match kind {
            HELLO => Frame::Hello {
                version: u32::from_be_bytes(int(&payload)?),
            },
            EXEC => {
                let mut exec = Exec::default();
                for (tag, value) in fields(&payload)? {
                    let value = value.to_vec();
                    match tag {
                        ARG => exec.argv.push(value),
                        ENV => exec.env.push(value),
                        WORKDIR => exec.workdir = Some(value),
                        PTY => exec.pty = Some(WindowSize::decode(&value)?),
                        _ => return Err(bad("unknown field")),
                    }
                }
                Frame::Exec(exec)
            }
            KILL => Frame::Kill,
            INPUT => Frame::Input(payload),
            RESIZE => Frame::Resize(WindowSize::decode(&payload)?),
            STDOUT => Frame::Stdout(payload),
            STDERR => Frame::Stderr(payload),
            EXIT => Frame::Exit(i32::from_be_bytes(int(&payload)?)),
            FAILED => {
                let (&code, text) = payload.split_first().ok_or_else(|| bad("empty failure"))?;
                Frame::Failed {
                    why: Failure::from_code(code),
                    message: String::from_utf8_lossy(text).into_owned(),
                }
            }
            SESSION => Frame::Session(u64::from_be_bytes(int(&payload)?)),
            FILE => Frame::File(FileOp::decode(&payload)?),
            DATA => Frame::Data(payload),
            DONE => Frame::Done,
            WELCOME => Frame::Welcome {
                version: u32::from_be_bytes(int(&payload[..4.min(payload.len())])?),
                session: u64::from_be_bytes(int(payload.get(4..).unwrap_or_default())?),
            },
            ENTRY => Frame::Entry(Entry::decode(&payload)?),
            PATH => Frame::Path(payload),
            SETUP => {
                let mut setup = Setup::default();
                for (tag, value) in fields(&payload)? {
                    match tag {
                        HOSTNAME if value.len() <= MAX_HOSTNAME => setup.hostname = value.to_vec(),
                        CLOCK => setup.unix_nanos = u64::from_be_bytes(int(value)?),
                        ENTROPY if value.len() <= MAX_ENTROPY => setup.entropy = value.to_vec(),
                        _ => return Err(bad("unknown or oversized field")),
                    }
                }
                Frame::Setup(setup)
            }
            _ => return Err(bad("unknown frame kind")),
        })
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream.
    pub fn read_from(reader: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut header = [0u8; 5];
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let (kind, len) = Frame::header(header)?;
        let mut payload = vec![0u8; len];
        reader.read_exact(&mut payload)?;
        Frame::decode(kind, payload).map(Some)
    }

    /// Writes one frame.
    pub fn write_to(&self, writer: &mut impl Write) -> io::Result<()> {
        writer.write_all(&self.encode())
    }

    /// The frame's bytes in the multiplexed form: its request id first.
    pub fn encode_tagged(&self, id: u32) -> Vec<u8> {
        let mut out = id.to_be_bytes().to_vec();
        out.extend_from_slice(&self.encode());
        out
    }
}

/// Writes one frame of the multiplexed form (one `write_all`: callers
/// sharing a stream hold its lock around it).
pub fn write_tagged(writer: &mut impl Write, id: u32, frame: &Frame) -> io::Result<()> {
    writer.write_all(&frame.encode_tagged(id))
}

/// Reads one frame of the multiplexed form; `Ok(None)` at a clean end of
/// stream.
pub fn read_tagged(reader: &mut impl Read) -> io::Result<Option<(u32, Frame)>> {
    let mut id = [0u8; 4];
    match reader.read_exact(&mut id) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    match Frame::read_from(reader)? {
        Some(frame) => Ok(Some((u32::from_be_bytes(id), frame))),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "a request id without its frame",
        )),
    }
}

/// Gives the calling process default signal dispositions and an empty
/// signal mask, as a command expects to start: an ignored signal stays
/// ignored across exec (Rust's runtime ignores SIGPIPE; a shell's
/// background job ignores SIGINT and SIGQUIT).
///
/// # Safety
/// Meant for a forked child before exec: it only makes async-signal-safe
/// calls, but it changes the whole process's signal handling.
pub unsafe fn reset_signals() {
    // SAFETY: signal and sigprocmask on a locally initialised set are
    // async-signal-safe and take valid arguments.
    unsafe {
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

/// `root` and every process below it, found through `/proc` (the parent
/// of each process is in its `stat`). Read all at once before anything is
/// killed: a killed parent's children are handed to PID 1 and would no
/// longer look like descendants.
pub fn process_tree(root: i32) -> Vec<i32> {
    let mut children: std::collections::HashMap<i32, Vec<i32>> = Default::default();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The command name is in parentheses and may hold spaces.
            let Some((_, after)) = stat.rsplit_once(')') else {
                continue;
            };
            if let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut stack = vec![root];
    let mut all = Vec::new();
    while let Some(pid) = stack.pop() {
        if all.contains(&pid) {
            continue;
        }
        all.push(pid);
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids);
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Hello { version: VERSION },
            Frame::Exec(Exec {
                argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo \xff".to_vec()],
                env: vec![b"A=1".to_vec(), b"EMPTY=".to_vec()],
                workdir: Some(b"/tmp".to_vec()),
                pty: None,
            }),
            Frame::Exec(Exec {
                argv: vec![b"sh".to_vec()],
                pty: Some(WindowSize {
                    cols: 132,
                    rows: 43,
                }),
                ..Exec::default()
            }),
            Frame::Input(b"ls\r\x1b[A".to_vec()),
            Frame::Resize(WindowSize {
                cols: u16::MAX,
                rows: 1,
            }),
            Frame::Exec(Exec::default()),
            Frame::Kill,
            Frame::Stdout(vec![0, 1, 2]),
            Frame::Stderr(Vec::new()),
            Frame::Exit(-1),
            Frame::Failed {
                why: Failure::Workdir,
                message: "no /nope".into(),
            },
            Frame::Failed {
                why: Failure::NoSuchFile,
                message: "/x".into(),
            },
            Frame::Session(u64::MAX - 1),
            Frame::Welcome {
                version: VERSION,
                session: 7,
            },
            Frame::Data(vec![0, 255, 10]),
            Frame::Done,
            Frame::Path(b"/a/\xff".to_vec()),
            Frame::Entry(Entry {
                path: b"/w/a".to_vec(),
                name: b"a".to_vec(),
                size: 1 << 40,
                mode: 0o100640,
                is_dir: false,
                mtime: -5,
            }),
            Frame::Setup(Setup {
                hostname: b"sb-1".to_vec(),
                unix_nanos: 1_800_000_000_123_456_789,
                entropy: vec![7; MAX_ENTROPY],
            }),
        ];
        let ops = [
            FileOp::Read {
                path: b"/r".to_vec(),
            },
            FileOp::Write {
                path: b"/w".to_vec(),
                mode: 0o600,
            },
            FileOp::List {
                path: b"/".to_vec(),
            },
            FileOp::Stat {
                path: b"/s".to_vec(),
            },
            FileOp::Move {
                from: b"/a".to_vec(),
                to: b"/b".to_vec(),
            },
            FileOp::Chmod {
                path: b"/c".to_vec(),
                mode: 0o7777,
            },
            FileOp::Delete {
                path: b"/d".to_vec(),
                recursive: true,
            },
            FileOp::Glob {
                pattern: b"/**/*".to_vec(),
            },
        ];
        let all = frames.into_iter().chain(ops.into_iter().map(Frame::File));
        for (id, frame) in all.enumerate() {
            let bytes = frame.encode();
            let back = Frame::read_from(&mut bytes.as_slice()).unwrap().unwrap();
            assert_eq!(back, frame);
            let tagged = frame.encode_tagged(id as u32);
            let (back_id, back) = read_tagged(&mut tagged.as_slice()).unwrap().unwrap();
            assert_eq!((back_id, back), (id as u32, frame));
        }
        // An id without its frame is a cut-off stream, not a clean end.
        assert!(read_tagged(&mut [0u8, 0, 0, 1].as_slice()).is_err());
        assert!(read_tagged(&mut [].as_slice()).unwrap().is_none());
        // A file operation missing what it needs.
        let mut p = Vec::new();
        field(&mut p, OP, &[2]);
        field(&mut p, P1, b"/x");
        assert!(Frame::decode(FILE, p).is_err(), "a write without a mode");
        assert!(Frame::decode(FILE, Vec::new()).is_err());
        // A setup with a hostname or entropy past the bounds, or a clock
        // that is not 8 bytes.
        for (tag, len) in [
            (HOSTNAME, MAX_HOSTNAME + 1),
            (ENTROPY, MAX_ENTROPY + 1),
            (CLOCK, 4),
        ] {
            let mut p = Vec::new();
            field(&mut p, tag, &vec![b'a'; len]);
            assert!(Frame::decode(SETUP, p).is_err(), "tag {tag} of {len} bytes");
        }
    }

    #[test]
    fn malformed_frames_are_refused() {
        // Too large for the kind: refused from the header alone.
        for (kind, limit) in [
            (EXEC, MAX_FRAME),
            (STDOUT, CHUNK),
            (STDERR, CHUNK),
            (HELLO, 4),
            (EXIT, 4),
            (KILL, 0),
            (FAILED, 1 + MAX_MESSAGE),
        ] {
            let mut header = [kind, 0, 0, 0, 0];
            header[1..].copy_from_slice(&(limit as u32).to_be_bytes());
            assert!(Frame::header(header).is_ok());
            header[1..].copy_from_slice(&(limit as u32 + 1).to_be_bytes());
            assert!(Frame::header(header).is_err());
        }
        // A long failure message is cut to what the other side takes.
        let long = Frame::Failed {
            why: Failure::Other,
            message: "é".repeat(MAX_MESSAGE),
        };
        assert!(Frame::read_from(&mut long.encode().as_slice()).is_ok());
        // A field claiming more bytes than the payload holds.
        let mut p = vec![ARG];
        p.extend_from_slice(&100u32.to_be_bytes());
        p.push(b'x');
        assert!(Frame::decode(EXEC, p).is_err());
        // Unknown kinds and tags, short integers.
        assert!(Frame::decode(99, Vec::new()).is_err());
        assert!(Frame::decode(EXEC, vec![b'z', 0, 0, 0, 0]).is_err());
        assert!(Frame::decode(EXIT, vec![1, 2]).is_err());
        // A clean end of stream is not an error; a cut-off frame is.
        assert!(Frame::read_from(&mut [].as_slice()).unwrap().is_none());
        assert!(Frame::read_from(&mut [STDOUT, 0, 0, 0, 9, 1].as_slice()).is_err());
    }
}
