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

use std::io::{self, Read, Write};

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
}

impl Failure {
    fn code(self) -> u8 {
        match self {
            Failure::Workdir => 1,
            Failure::NotFound => 2,
            Failure::NotExecutable => 3,
            Failure::Other => 4,
        }
    }

    fn from_code(code: u8) -> Failure {
        match code {
            1 => Failure::Workdir,
            2 => Failure::NotFound,
            3 => Failure::NotExecutable,
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
}

const HELLO: u8 = 0;
const EXEC: u8 = 1;
const KILL: u8 = 2;
const STDOUT: u8 = 11;
const STDERR: u8 = 12;
const EXIT: u8 = 13;
const FAILED: u8 = 14;

const ARG: u8 = b'a';
const ENV: u8 = b'e';
const WORKDIR: u8 = b'w';

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
                (EXEC, p)
            }
            Frame::Kill => (KILL, Vec::new()),
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
            EXEC => MAX_FRAME,
            KILL => 0,
            HELLO | EXIT => 4,
            STDOUT | STDERR => CHUNK,
            FAILED => 1 + MAX_MESSAGE,
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
            Frame::Stdout(_) => "stdout",
            Frame::Stderr(_) => "stderr",
            Frame::Exit(_) => "exit",
            Frame::Failed { .. } => "failed",
        }
    }

    /// Builds a frame from its kind and payload.
    pub fn decode(kind: u8, payload: Vec<u8>) -> io::Result<Frame> {
        let int = |p: &[u8]| -> io::Result<[u8; 4]> {
            p.try_into().map_err(|_| bad("bad integer field"))
        };
        Ok(match kind {
            HELLO => Frame::Hello {
                version: u32::from_be_bytes(int(&payload)?),
            },
            EXEC => {
                let mut exec = Exec::default();
                let mut rest = payload.as_slice();
                while !rest.is_empty() {
                    if rest.len() < 5 {
                        return Err(bad("truncated field"));
                    }
                    let tag = rest[0];
                    let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                    let value = rest
                        .get(5..5 + len)
                        .ok_or_else(|| bad("truncated field"))?
                        .to_vec();
                    rest = &rest[5 + len..];
                    match tag {
                        ARG => exec.argv.push(value),
                        ENV => exec.env.push(value),
                        WORKDIR => exec.workdir = Some(value),
                        _ => return Err(bad("unknown field")),
                    }
                }
                Frame::Exec(exec)
            }
            KILL => Frame::Kill,
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
        ];
        for frame in frames {
            let bytes = frame.encode();
            let back = Frame::read_from(&mut bytes.as_slice()).unwrap().unwrap();
            assert_eq!(back, frame);
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
