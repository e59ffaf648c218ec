//! The client side of the in-sandbox agent (`agent/`, the `stacyvm-agent`
//! binary): the direct exec path of the docker provider.
//!
//! A docker sandbox spawned with the agent runs it as PID 1, with the
//! binary bind-mounted read-only at [`AGENT_PATH`] and its socket on a
//! small tmpfs at [`RUN_DIR`]. The server reaches the socket through the
//! container's root, `/proc/<pid>/root`, opened with `openat2` so that no
//! symlink the sandbox plants there is followed (a link to the host's
//! Docker socket would otherwise be connected to), and connects through
//! the opened handle (`/proc/self/fd/N`).
//!
//! An exec is one connection: one `Exec` frame out, output frames back,
//! one `Exit` or `Failed` at the end. Dropping the future closes the
//! connection, and the agent kills the command's process tree: that is
//! cancellation. The timeout sends `Kill` and waits for the exit.
//!
//! What the sandbox's processes can do here is what they could do anyway:
//! its root may connect to the socket (it runs its commands as that root),
//! or replace it with a listener of its own that answers later execs with
//! made-up output, which fools nobody but the sandbox's owner about the
//! sandbox's own commands. Every frame from the agent is bounded
//! ([`MAX_FRAME`]) and parsed as untrusted input.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use stacyvm_agent::{AGENT_PATH, RUN_DIR, SOCKET_NAME};
use stacyvm_agent::{Exec, Failure, Frame, MAX_FRAME, VERSION};

use super::{
    ExecExit, ExecSpec, OutputChunk, OutputSink, ProviderError, ProviderResult, StreamKind,
};

/// How long a killed command has to report its exit before the exec ends
/// without it.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// The binary's name, looked up beside the `stacyvm` executable.
pub const BINARY_NAME: &str = "stacyvm-agent";

/// Why the direct path could not be taken for one exec; the caller falls
/// back to the Engine API. Nothing was sent to the sandbox yet.
#[derive(Debug, thiserror::Error)]
#[error("the sandbox's agent is unreachable: {0}")]
pub struct Unreachable(String);

/// Finds the agent binary: `configured` if set, else `stacyvm-agent`
/// beside the running executable (or one directory up, for test binaries
/// under `target/*/deps`). It must be a static ELF executable: images
/// need carry no libc for it.
pub fn find_binary(configured: &Path) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = if !configured.as_os_str().is_empty() {
        vec![configured.to_path_buf()]
    } else {
        let exe = std::env::current_exe().map_err(|e| format!("the running executable: {e}"))?;
        exe.ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join(BINARY_NAME))
            .collect()
    };
    let Some(found) = candidates.iter().find(|p| p.is_file()) else {
        return Err(format!(
            "no agent binary at {} (build it with scripts/build-agent.sh, or set \
             providers.docker.agent_binary)",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    };
    let bytes = std::fs::read(found).map_err(|e| format!("{}: {e}", found.display()))?;
    match elf_kind(&bytes) {
        // Absolute and without links: it is a mount source in another
        // process's view (the daemon's, the sandbox keeper's).
        Some(ElfKind::Static) => {
            std::fs::canonicalize(found).map_err(|e| format!("{}: {e}", found.display()))
        }
        Some(ElfKind::Dynamic) => Err(format!(
            "{} is dynamically linked: sandboxes without a libc could not run it \
             (build it with -C target-feature=+crt-static)",
            found.display()
        )),
        None => Err(format!(
            "{} is not an x86-64 ELF executable",
            found.display()
        )),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum ElfKind {
    Static,
    Dynamic,
}

/// Whether `bytes` is a 64-bit little-endian ELF executable, and whether
/// it asks for a dynamic loader (a `PT_INTERP` program header).
fn elf_kind(bytes: &[u8]) -> Option<ElfKind> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
    // Magic, 64-bit class, little endian, x86-64.
    if bytes.get(..6)? != b"\x7fELF\x02\x01" || u16_at(18)? != 62 {
        return None;
    }
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        if u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP {
            return Some(ElfKind::Dynamic);
        }
    }
    Some(ElfKind::Static)
}

/// How long a connected agent has to say hello before the other path is
/// taken (nothing was sent yet).
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects to the agent of the sandbox whose PID 1 is `pid` (started at
/// `start`, in clock ticks since boot, so a recycled pid is refused) and
/// reads its hello: an agent that is busy (it refuses past its command
/// bound), speaks another version or does not answer is unreachable,
/// before anything was sent.
async fn connect(pid: i32, start: u64) -> Result<tokio::net::UnixStream, Unreachable> {
    let socket = open_socket(pid, start).map_err(Unreachable)?;
    // The opened handle names the socket; connecting through it resolves
    // nothing the sandbox controls.
    let path = format!("/proc/self/fd/{}", socket.as_raw_fd());
    let mut stream = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|e| Unreachable(e.to_string()))?;
    drop(socket);
    hello(&mut stream).await?;
    Ok(stream)
}

/// Reads the agent's hello.
async fn hello(stream: &mut tokio::net::UnixStream) -> Result<(), Unreachable> {
    match tokio::time::timeout(HELLO_TIMEOUT, read_frame(stream)).await {
        Ok(Ok(Some(Frame::Hello { version: VERSION }))) => Ok(()),
        Ok(Ok(Some(Frame::Hello { version }))) => Err(Unreachable(format!(
            "it speaks protocol {version}, this server {VERSION}"
        ))),
        Ok(Ok(Some(Frame::Failed { message, .. }))) => Err(Unreachable(message)),
        Ok(Ok(Some(other))) => Err(Unreachable(format!(
            "it sent {} instead of a hello",
            other.kind_name()
        ))),
        Ok(Ok(None)) => Err(Unreachable("it hung up".into())),
        Ok(Err(e)) => Err(Unreachable(e.to_string())),
        Err(_) => Err(Unreachable("it did not say hello in time".into())),
    }
}

/// Waits (up to half a second) until the agent of a just-started
/// container listens, so that the first exec takes the direct path. An
/// agent that never does leaves exec to the Engine API.
pub async fn wait_listening(pid: i32, start: u64) {
    for _ in 0..250 {
        if open_socket(pid, start).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tracing::warn!(
        pid,
        "the sandbox's agent did not come up: its commands go through the Engine API"
    );
}

fn open_socket(pid: i32, start: u64) -> Result<OwnedFd, String> {
    if !super::native::init::is_same_process(pid, start) {
        return Err(format!("process {pid} is not the sandbox's PID 1"));
    }
    // A frozen agent (`docker pause`) would accept the connection and
    // answer after the thaw, or never: the other path says what the
    // runtime thinks of a paused sandbox.
    if frozen(pid) {
        return Err("the sandbox is frozen".into());
    }
    let root = rustix::fs::open(
        format!("/proc/{pid}/root"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("the sandbox's root: {e}"))?;
    let relative = format!("{}/{SOCKET_NAME}", RUN_DIR.trim_start_matches('/'));
    let socket = rustix::fs::openat2(
        &root,
        relative.as_str(),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| format!("{RUN_DIR}/{SOCKET_NAME}: {e}"))?;
    let stat = rustix::fs::fstat(&socket).map_err(|e| format!("{SOCKET_NAME}: {e}"))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::Socket {
        return Err(format!("{RUN_DIR}/{SOCKET_NAME} is not a socket"));
    }
    // The handles were opened after the first check: check again that
    // they belong to the sandbox, not to a process that took its pid.
    if !super::native::init::is_same_process(pid, start) {
        return Err(format!("process {pid} is not the sandbox's PID 1"));
    }
    Ok(socket)
}

/// Whether `pid`'s cgroup is frozen (the cgroup v1 freezer's
/// `freezer.state`, or cgroup v2's `frozen` event), as `docker pause`
/// leaves a container.
fn frozen(pid: i32) -> bool {
    let Ok(cgroups) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if controllers.split(',').any(|c| c == "freezer") {
            let state =
                std::fs::read_to_string(format!("/sys/fs/cgroup/freezer{path}/freezer.state"))
                    .unwrap_or_default();
            if state.starts_with("FROZEN") || state.starts_with("FREEZING") {
                return true;
            }
        } else if controllers.is_empty() {
            for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                let events = std::fs::read_to_string(format!("{root}{path}/cgroup.events"))
                    .unwrap_or_default();
                if events.lines().any(|l| l.trim() == "frozen 1") {
                    return true;
                }
            }
        }
    }
    false
}

pub(crate) async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Option<Frame>> {
    let mut header = [0u8; 5];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    // Bounded per kind (an output frame at most CHUNK) before allocating.
    let (kind, len) = Frame::header(header)?;
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    Frame::decode(kind, payload).map(Some)
}

/// Runs `spec` in the sandbox whose PID 1 (the agent) is `pid`, streaming
/// into `sink`. `Err` means nothing was sent (no agent to reach, or a
/// command too large for it): the caller takes its other path.
pub async fn exec(
    pid: i32,
    start: u64,
    spec: &ExecSpec,
    terminal: Option<crate::provider::Terminal>,
    sink: OutputSink,
) -> Result<ProviderResult<ExecExit>, Unreachable> {
    let (size, input) = match terminal {
        Some(t) => (Some(t.size), Some(t.input)),
        None => (None, None),
    };
    let request = Frame::Exec(request(spec, size)).encode();
    if request.len() > 5 + MAX_FRAME {
        return Err(Unreachable(format!(
            "the command is larger than the agent takes ({} MiB)",
            MAX_FRAME >> 20
        )));
    }
    let stream = connect(pid, start).await?;
    Ok(run(stream, &request, spec, input, sink).await)
}

/// The agent's form of a command (on a terminal of `size`, if one).
pub(crate) fn request(spec: &ExecSpec, size: Option<crate::provider::TerminalSize>) -> Exec {
    Exec {
        argv: spec.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: spec
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}").into_bytes())
            .collect(),
        workdir: spec.workdir.as_ref().map(|w| w.as_bytes().to_vec()),
        pty: size.map(|s| stacyvm_agent::WindowSize {
            cols: s.cols,
            rows: s.rows,
        }),
    }
}

/// Sends `request` on a connection past its hello and follows the command
/// to its end. The timeout covers everything: writing the request, a
/// caller that reads the output slowly, the agent's answers.
async fn run(
    stream: tokio::net::UnixStream,
    request: &[u8],
    spec: &ExecSpec,
    input: Option<tokio::sync::mpsc::Receiver<crate::provider::TerminalInput>>,
    sink: OutputSink,
) -> ProviderResult<ExecExit> {
    let (reader, mut writer) = stream.into_split();
    match tokio::time::timeout(spec.timeout, writer.write_all(request)).await {
        Ok(written) => written.map_err(lost)?,
        Err(_) => return Ok(ExecExit::TimedOut),
    }
    // The frame stream keeps a partly read frame across select! rounds.
    let frames = futures::stream::unfold(reader, |mut reader| async move {
        match read_frame(&mut reader).await {
            Ok(Some(frame)) => Some((Ok(frame), reader)),
            Ok(None) => None,
            Err(e) => Some((Err(e), reader)),
        }
    });
    // One writer, which writes whole frames only (one cut off would put
    // the agent out of step). Nothing waits on it: typed input it cannot
    // take is dropped, a kill waits at most KILL_GRACE to be queued. It
    // ends with this function.
    let (to_agent, mut queued) = tokio::sync::mpsc::channel::<Frame>(WRITE_QUEUE);
    let _writing = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(frame) = queued.recv().await {
            if let Err(e) = writer.write_all(&frame.encode()).await {
                tracing::debug!(error = %e, "the sandbox's agent takes nothing more about a command");
                return;
            }
        }
    }));
    let send = |frame: Frame| {
        let to_agent = to_agent.clone();
        async move {
            let kind = frame.kind_name();
            let queued = match frame {
                Frame::Kill => tokio::time::timeout(KILL_GRACE, to_agent.send(frame))
                    .await
                    .map_err(|_| "its queue is full")
                    .and_then(|sent| sent.map_err(|_| "it is gone")),
                frame => to_agent.try_send(frame).map_err(|_| "it does not keep up"),
            };
            if let Err(why) = queued {
                tracing::debug!(frame = kind, why, "not sent to the sandbox's agent");
            }
        }
    };
    follow(frames, send, spec, input, sink).await
}

/// Frames waiting for the agent (a kill, typed input, resizes).
const WRITE_QUEUE: usize = 64;

fn lost(e: std::io::Error) -> ProviderError {
    ProviderError::Runtime(format!("the sandbox's agent: {e}"))
}

/// Follows a command's frames to its end: output into `sink`, the exit,
/// or a failure to start; a terminal's `input` goes to the agent as it
/// comes. At the timeout the agent is asked (`send`) to kill the command,
/// which gets [`KILL_GRACE`] to report its end. The same for a
/// connection of its own (docker) and a request of a microVM's
/// multiplexed stream.
pub(crate) async fn follow<F, S, Fut>(
    frames: F,
    send: S,
    spec: &ExecSpec,
    mut input: Option<tokio::sync::mpsc::Receiver<crate::provider::TerminalInput>>,
    sink: OutputSink,
) -> ProviderResult<ExecExit>
where
    F: futures::Stream<Item = std::io::Result<Frame>>,
    S: Fn(Frame) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let kill = || send(Frame::Kill);
    let deadline = tokio::time::sleep(spec.timeout);
    tokio::pin!(deadline);
    tokio::pin!(frames);
    let mut timed_out = false;
    let mut listening = true;
    loop {
        let typed = async {
            match input.as_mut() {
                Some(input) => input.recv().await,
                None => std::future::pending().await,
            }
        };
        let frame = tokio::select! {
            typed = typed => {
                match typed {
                    Some(crate::provider::TerminalInput::Data(data)) => {
                        for chunk in data.chunks(stacyvm_agent::CHUNK) {
                            send(Frame::Input(chunk.to_vec())).await;
                        }
                    }
                    Some(crate::provider::TerminalInput::Resize(size)) => {
                        send(Frame::Resize(stacyvm_agent::WindowSize {
                            cols: size.cols,
                            rows: size.rows,
                        }))
                        .await;
                    }
                    // The user has gone; the caller ends the command.
                    None => input = None,
                }
                continue;
            }
            frame = frames.next() => frame,
            () = &mut deadline => {
                if deadline_passed(&mut timed_out, &kill, deadline.as_mut()).await {
                    return Ok(ExecExit::TimedOut);
                }
                continue;
            }
        };
        let (stream, data) = match frame {
            Some(Ok(Frame::Stdout(data))) => (StreamKind::Stdout, data),
            Some(Ok(Frame::Stderr(data))) => (StreamKind::Stderr, data),
            Some(Ok(Frame::Exit(_))) if timed_out => return Ok(ExecExit::TimedOut),
            Some(Ok(Frame::Exit(code))) => return Ok(ExecExit::Exited(code)),
            Some(Ok(Frame::Failed { why, message })) => {
                return failed(why, message, &spec.argv, &sink, listening).await;
            }
            Some(Ok(other)) => {
                return Err(ProviderError::Runtime(format!(
                    "the sandbox's agent sent {} during a command",
                    other.kind_name()
                )));
            }
            Some(Err(e)) => return Err(lost(e)),
            None if timed_out => return Ok(ExecExit::TimedOut),
            None => {
                return Err(ProviderError::Runtime(
                    "the sandbox's agent went away before the command ended (the sandbox \
                     stopped?)"
                        .into(),
                ));
            }
        };
        if listening && !data.is_empty() {
            let chunk = OutputChunk {
                stream,
                data: Bytes::from(data),
            };
            // A caller reading slowly holds this send, never the timeout.
            tokio::select! {
                // Nobody listens any more: keep draining so the command
                // is not blocked.
                sent = sink.send(chunk) => listening = sent.is_ok(),
                () = &mut deadline => {
                    if deadline_passed(&mut timed_out, &kill, deadline.as_mut()).await {
                        return Ok(ExecExit::TimedOut);
                    }
                    // The caller is too slow to take more: what is left is
                    // drained, not delivered.
                    listening = false;
                }
            }
        }
    }
}

/// The deadline passed. The first time, the agent is asked to kill the
/// command, which gets [`KILL_GRACE`] to report its end; the second time
/// the exec is over (`true`).
async fn deadline_passed<K, Fut>(
    timed_out: &mut bool,
    kill: &K,
    deadline: std::pin::Pin<&mut tokio::time::Sleep>,
) -> bool
where
    K: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if *timed_out {
        return true;
    }
    *timed_out = true;
    kill().await;
    deadline.reset(tokio::time::Instant::now() + KILL_GRACE);
    false
}

/// A command that could not start, reported as the Engine API path
/// reports it: a missing program is exit 127 with the shell's words on
/// stderr, one that cannot run is 126, a missing workdir a client error.
async fn failed(
    why: Failure,
    message: String,
    argv: &[String],
    sink: &OutputSink,
    listening: bool,
) -> Result<ExecExit, ProviderError> {
    let (text, code) = match why {
        Failure::Workdir => return Err(ProviderError::InvalidRequest(message)),
        // File refusals never answer a command.
        Failure::Other | Failure::NoSuchFile | Failure::Invalid => {
            return Err(ProviderError::Runtime(format!(
                "the sandbox's agent: {message}"
            )));
        }
        Failure::NotFound => (
            format!(
                "{}: command not found\n",
                argv.first().map(String::as_str).unwrap_or_default()
            ),
            127,
        ),
        Failure::NotExecutable => (format!("{message}\n"), 126),
    };
    if listening {
        // A departed listener is fine here.
        let _departed = sink
            .send(OutputChunk {
                stream: StreamKind::Stderr,
                data: Bytes::from(text),
            })
            .await;
    }
    Ok(ExecExit::Exited(code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn spec(timeout: Duration) -> ExecSpec {
        ExecSpec {
            argv: vec!["true".into()],
            env: Default::default(),
            workdir: None,
            timeout,
        }
    }

    async fn pair_after_hello() -> (tokio::net::UnixStream, tokio::net::UnixStream) {
        let (mut ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        theirs
            .write_all(&Frame::Hello { version: VERSION }.encode())
            .await
            .unwrap();
        hello(&mut ours).await.expect("hello");
        (ours, theirs)
    }

    fn request() -> Vec<u8> {
        Frame::Exec(Exec::default()).encode()
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_says_no_hello_is_unreachable() {
        // Connected, but silent (frozen, wedged), another version, busy,
        // or gone: all before anything was sent, so the caller may fall
        // back.
        let (mut ours, _theirs) = tokio::net::UnixStream::pair().unwrap();
        assert!(hello(&mut ours).await.is_err());
        for first in [
            Frame::Hello {
                version: VERSION + 1,
            },
            Frame::Stdout(b"x".to_vec()),
            Frame::Failed {
                why: Failure::Other,
                message: "busy".into(),
            },
        ] {
            let (mut ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
            theirs.write_all(&first.encode()).await.unwrap();
            assert!(hello(&mut ours).await.is_err(), "{first:?}");
        }
        let (mut ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        drop(theirs);
        assert!(hello(&mut ours).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_ignores_kill_is_left_after_the_grace() {
        let (ours, mut theirs) = pair_after_hello().await;
        let (tx, _rx) = mpsc::channel(4);
        let started = tokio::time::Instant::now();
        let result = run(ours, &request(), &spec(Duration::from_secs(3)), None, tx).await;
        assert!(matches!(result, Ok(ExecExit::TimedOut)), "{result:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(3) + KILL_GRACE);
        // It was asked to kill, after the command.
        let mut sent = Vec::new();
        theirs.read_to_end(&mut sent).await.unwrap();
        assert_eq!(sent, [request(), Frame::Kill.encode()].concat());
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_stops_reading_does_not_stop_the_timeout() {
        let (ours, mut theirs) = pair_after_hello().await;
        // A channel of one that nobody reads: the second chunk waits.
        let (tx, _rx) = mpsc::channel(1);
        let feed = tokio::spawn(async move {
            for _ in 0..3 {
                theirs
                    .write_all(&Frame::Stdout(b"x".to_vec()).encode())
                    .await
                    .unwrap();
            }
            // Answers the kill with an exit, as the agent does.
            let mut buf = vec![0u8; request().len() + 5];
            theirs.read_exact(&mut buf).await.unwrap();
            theirs.write_all(&Frame::Exit(137).encode()).await.unwrap();
            theirs
        });
        let started = tokio::time::Instant::now();
        let result = run(ours, &request(), &spec(Duration::from_secs(3)), None, tx).await;
        assert!(matches!(result, Ok(ExecExit::TimedOut)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(3) + KILL_GRACE);
        drop(feed.await.unwrap());
    }

    #[tokio::test]
    async fn a_hostile_agent_is_refused_not_obeyed() {
        // An output frame larger than CHUNK: refused before allocating.
        let (ours, mut theirs) = pair_after_hello().await;
        let mut bytes = vec![11];
        bytes.extend_from_slice(&(stacyvm_agent::CHUNK as u32 + 1).to_be_bytes());
        theirs.write_all(&bytes).await.unwrap();
        let (tx, _rx) = mpsc::channel(4);
        let result = run(ours, &request(), &spec(Duration::from_secs(30)), None, tx).await;
        assert!(
            matches!(result, Err(ProviderError::Runtime(_))),
            "{result:?}"
        );
        // A hello in the middle of a command is refused, and named by
        // its kind only.
        let (ours, mut theirs) = pair_after_hello().await;
        theirs
            .write_all(&Frame::Hello { version: VERSION }.encode())
            .await
            .unwrap();
        let (tx, _rx) = mpsc::channel(4);
        match run(ours, &request(), &spec(Duration::from_secs(30)), None, tx).await {
            Err(ProviderError::Runtime(m)) => assert!(m.contains("sent hello"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A stream that ends without an exit is an error, not exit 0.
        let (ours, theirs) = pair_after_hello().await;
        drop(theirs);
        let (tx, _rx) = mpsc::channel(4);
        let result = run(ours, &request(), &spec(Duration::from_secs(30)), None, tx).await;
        assert!(
            matches!(result, Err(ProviderError::Runtime(_))),
            "{result:?}"
        );
    }

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        // The running test binary is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_kind(&me), Some(ElfKind::Dynamic));
        // A minimal ELF header with no program headers asks for no loader.
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        header[18] = 62;
        assert_eq!(elf_kind(&header), Some(ElfKind::Static));
        // Program headers claimed beyond the file are refused, not read.
        header[56] = 5;
        header[32] = 200;
        assert_eq!(elf_kind(&header), None);
        assert_eq!(elf_kind(b"#!/bin/sh\n"), None);
    }
}
