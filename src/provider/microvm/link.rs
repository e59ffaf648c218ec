//! The host's end of a microVM agent's multiplexed stream.
//!
//! One [`AgentLink`] per VM: a session opened with a fresh random number
//! (the agent kills what an earlier session left running), then requests
//! with ids from 1, never reused on the link. A reader task hands each
//! frame to the request it belongs to; frames of unknown ids (a request
//! whose caller left) are dropped. When the stream ends every pending
//! request ends with it, and the link is closed for good: the provider
//! opens a new one (a new session) on the next call.
//!
//! Everything from the guest is untrusted: frames are bounded by kind,
//! answers by size ([`MAX_ANSWER_BYTES`], [`MAX_ENTRIES`]), what waits for
//! a slow caller by [`MAX_QUEUED_BYTES`] per request, and every wait has a
//! timeout. The reader never waits for a caller: one slow consumer never
//! holds up the other requests of its VM.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

use stacyvm_agent::{Entry, Failure, FileOp, Frame, VERSION};

use crate::provider::{ExecExit, ExecSpec, FileEntry, OutputSink, ProviderError, ProviderResult};

/// What may wait for one request's caller; past it the request is killed
/// and ends with an error (its caller did not keep up).
pub const MAX_QUEUED_BYTES: usize = 16 << 20;

/// The most a file answer may hold (a read's content).
pub const MAX_ANSWER_BYTES: usize = crate::provider::MAX_READ_BYTES;

/// The most entries a listing may hold.
pub const MAX_ENTRIES: usize = 100_000;

/// How long a file operation may take, its content included.
const FILE_TIMEOUT: Duration = Duration::from_secs(120);

/// Content per `Data` frame of a write.
const WRITE_CHUNK: usize = 512 << 10;

/// A request's queue as the reader fills it.
struct Slot {
    tx: mpsc::UnboundedSender<Frame>,
    queued: Arc<AtomicUsize>,
}

type Pending = Mutex<HashMap<u32, Slot>>;

/// A request's queue as its caller empties it.
struct Inbox {
    rx: mpsc::UnboundedReceiver<Frame>,
    queued: Arc<AtomicUsize>,
}

impl Inbox {
    async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await?;
        self.queued.fetch_sub(frame_size(&frame), Ordering::AcqRel);
        Some(frame)
    }
}

/// The bytes a frame holds (its payload), for the queue bounds.
fn frame_size(frame: &Frame) -> usize {
    match frame {
        Frame::Stdout(d) | Frame::Stderr(d) | Frame::Data(d) | Frame::Path(d) => d.len(),
        Frame::Entry(e) => e.path.len() + e.name.len() + 32,
        Frame::Failed { message, .. } => message.len(),
        _ => 8,
    }
}

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to the VM's agent socket: {0}")]
    Connect(std::io::Error),
    #[error("the VM's agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the VM's agent {0}")]
    Protocol(String),
}

/// Where the host reaches a VM's agent.
#[derive(Debug, Clone)]
pub enum AgentSocket {
    /// A Unix socket the VMM joins to the agent's serial port (QEMU).
    Serial(PathBuf),
    /// Firecracker's vsock: a Unix socket on which the host asks for the
    /// guest's `port` with `CONNECT <port>` and hears `OK <n>`; the
    /// stream is the guest's from then on.
    Vsock { socket: PathBuf, port: u32 },
}

/// How long the VMM has to answer a `CONNECT`.
const CONNECT_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

impl AgentSocket {
    async fn connect(&self) -> std::io::Result<tokio::net::UnixStream> {
        let (socket, port) = match self {
            AgentSocket::Serial(path) => return tokio::net::UnixStream::connect(path).await,
            AgentSocket::Vsock { socket, port } => (socket, *port),
        };
        let mut stream = tokio::net::UnixStream::connect(socket).await?;
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await?;
        // The answer byte by byte: what follows it is the agent's. The VMM
        // hangs up while nothing in the guest listens on the port.
        let mut line = Vec::new();
        let answer = async {
            loop {
                let byte = stream.read_u8().await?;
                if byte == b'\n' {
                    return Ok(());
                }
                if line.len() >= 32 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the VMM's answer to CONNECT is too long",
                    ));
                }
                line.push(byte);
            }
        };
        tokio::time::timeout(CONNECT_ANSWER_TIMEOUT, answer)
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the VMM did not answer CONNECT",
                )
            })??;
        if !line.starts_with(b"OK ") {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!(
                    "the VMM refused vsock port {port}: {}",
                    String::from_utf8_lossy(&line)
                ),
            ));
        }
        Ok(stream)
    }
}

pub struct AgentLink {
    /// Encoded frames for the writer task (the one writer of the stream).
    writer: mpsc::Sender<Vec<u8>>,
    pending: Arc<Pending>,
    next: AtomicU32,
    closed: Arc<AtomicBool>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for AgentLink {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Frames queued for the writer task.
const WRITE_QUEUE: usize = 64;

async fn read_tagged<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Option<(u32, Frame)>> {
    let mut id = [0u8; 4];
    match reader.read_exact(&mut id).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    match crate::provider::agent::read_frame(reader).await? {
        Some(frame) => Ok(Some((u32::from_be_bytes(id), frame))),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "a request id without its frame",
        )),
    }
}

fn gone() -> ProviderError {
    ProviderError::Unavailable("the VM's agent went away (the VM stopped?)".into())
}

impl AgentLink {
    /// Connects to the agent's socket (the VMM's end of the serial port
    /// or of vsock) and opens a session, waiting up to `within` for the
    /// agent to answer (a VM that is still booting answers when its
    /// agent runs). `alive` is asked between attempts: a VM that died
    /// ends the wait at once.
    pub async fn open(
        socket: &AgentSocket,
        within: Duration,
        alive: impl Fn() -> bool,
    ) -> Result<AgentLink, LinkError> {
        let deadline = tokio::time::Instant::now() + within;
        let stream = loop {
            match socket.connect().await {
                Ok(stream) => break stream,
                Err(e) if tokio::time::Instant::now() >= deadline || !alive() => {
                    return Err(LinkError::Connect(e));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (reader, mut writer) = stream.into_split();
        let mut reader = tokio::io::BufReader::new(reader);
        let session = loop {
            let n = rand_u64();
            if n != 0 {
                break n;
            }
        };
        writer
            .write_all(&Frame::Session(session).encode_tagged(0))
            .await
            .map_err(LinkError::Connect)?;
        // Until the welcome: the agent may still boot, and what an older
        // session left in flight (even a frame cut off when its host left)
        // comes first. The welcome is found byte by byte: its bytes carry
        // this session's random number.
        let welcome = async {
            let mut window = [0u8; 21];
            let mut byte = [0u8; 1];
            loop {
                match reader.read_exact(&mut byte).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return Err(LinkError::Protocol("hung up".into()));
                    }
                    Err(e) => return Err(LinkError::Protocol(e.to_string())),
                }
                window.rotate_left(1);
                window[20] = byte[0];
                if window[..9] == [0, 0, 0, 0, 15, 0, 0, 0, 12]
                    && window[13..] == session.to_be_bytes()
                {
                    let version = u32::from_be_bytes(window[9..13].try_into().expect("4 bytes"));
                    return if version == VERSION {
                        Ok(())
                    } else {
                        Err(LinkError::Protocol(format!(
                            "speaks protocol {version}, this server {VERSION}"
                        )))
                    };
                }
            }
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::select! {
            result = tokio::time::timeout(left, welcome) => {
                result.map_err(|_| LinkError::Timeout(within))??;
            }
            () = async {
                while alive() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            } => return Err(LinkError::Protocol("is gone: the VM stopped".into())),
        }
        let pending: Arc<Pending> = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let ended = tokio_util::sync::CancellationToken::new();
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let reading = tokio::spawn(Self::dispatch(
            reader,
            pending.clone(),
            closed.clone(),
            ended.clone(),
            tx.clone(),
        ));
        let writing = tokio::spawn(Self::write(writer, rx, closed.clone(), ended));
        Ok(AgentLink {
            writer: tx,
            pending,
            next: AtomicU32::new(1),
            closed,
            tasks: [reading, writing],
        })
    }

    /// Writes the queued frames in order; a write that fails or stalls
    /// past [`FILE_TIMEOUT`] closes the link, and so does the reader's end.
    /// Either way the socket is shut: the VMM sees its host leave and
    /// takes the next one.
    async fn write(
        mut writer: OwnedWriteHalf,
        mut queue: mpsc::Receiver<Vec<u8>>,
        closed: Arc<AtomicBool>,
        ended: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let bytes = tokio::select! {
                bytes = queue.recv() => match bytes {
                    Some(bytes) => bytes,
                    None => break,
                },
                () = ended.cancelled() => break,
            };
            match tokio::time::timeout(FILE_TIMEOUT, writer.write_all(&bytes)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot write to the VM's agent; closing its link");
                    break;
                }
                Err(_) => {
                    tracing::warn!("the VM's agent takes no requests; closing its link");
                    break;
                }
            }
        }
        closed.store(true, Ordering::Release);
        ended.cancel();
        crate::provider::best_effort_quiet("closing a VM agent's link", writer.shutdown().await);
    }

    /// Hands every frame to its request until the stream ends. It never
    /// waits for a caller: a request whose caller lets more than
    /// [`MAX_QUEUED_BYTES`] wait is killed and ends with an error.
    async fn dispatch(
        mut reader: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
        pending: Arc<Pending>,
        closed: Arc<AtomicBool>,
        ended: tokio_util::sync::CancellationToken,
        writer: mpsc::Sender<Vec<u8>>,
    ) {
        loop {
            let next = tokio::select! {
                next = read_tagged(&mut reader) => next,
                () = ended.cancelled() => break,
            };
            let (id, frame) = match next {
                Ok(Some(tagged)) => tagged,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "the VM's agent sent an unreadable frame; closing its link");
                    break;
                }
            };
            let mut pending = lock(&pending);
            let Some(slot) = pending.get(&id) else {
                continue;
            };
            let size = frame_size(&frame);
            if slot.queued.fetch_add(size, Ordering::AcqRel) + size > MAX_QUEUED_BYTES {
                let slot = pending.remove(&id).expect("present");
                drop(pending);
                crate::provider::best_effort_quiet(
                    "telling a slow caller its request was dropped",
                    slot.tx.send(Frame::Failed {
                        why: Failure::Other,
                        message: format!(
                            "the caller did not keep up: over {} MiB of its answer waited",
                            MAX_QUEUED_BYTES >> 20
                        ),
                    }),
                );
                crate::provider::best_effort_quiet(
                    "killing a request whose caller did not keep up",
                    writer.try_send(Frame::Kill.encode_tagged(id)),
                );
                continue;
            }
            if slot.tx.send(frame).is_err() {
                pending.remove(&id);
            }
        }
        closed.store(true, Ordering::Release);
        ended.cancel();
        // Ends every pending request.
        lock(&pending).clear();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn register(&self) -> (u32, Inbox, Registration<'_>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        lock(&self.pending).insert(
            id,
            Slot {
                tx,
                queued: queued.clone(),
            },
        );
        (id, Inbox { rx, queued }, Registration { link: self, id })
    }

    async fn send(&self, id: u32, frame: &Frame) -> ProviderResult<()> {
        if self.is_closed() {
            return Err(gone());
        }
        match tokio::time::timeout(FILE_TIMEOUT, self.writer.send(frame.encode_tagged(id))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(ProviderError::Unavailable(
                "the VM's agent takes no requests".into(),
            )),
        }
    }

    /// Runs a command, streaming into `sink`. Dropping the future kills
    /// the command (its request is cancelled on the agent).
    pub async fn exec(&self, spec: &ExecSpec, sink: OutputSink) -> ProviderResult<ExecExit> {
        self.exec_on(spec, None, sink).await
    }

    /// Runs a command on a terminal (a PTY in the VM).
    pub async fn exec_terminal(
        &self,
        spec: &ExecSpec,
        terminal: crate::provider::Terminal,
        sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        self.exec_on(spec, Some(terminal), sink).await
    }

    async fn exec_on(
        &self,
        spec: &ExecSpec,
        terminal: Option<crate::provider::Terminal>,
        sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        let (size, input) = match terminal {
            Some(t) => (Some(t.size), Some(t.input)),
            None => (None, None),
        };
        let request = Frame::Exec(crate::provider::agent::request(spec, size));
        if request.encode().len() > 5 + stacyvm_agent::MAX_FRAME {
            return Err(ProviderError::InvalidRequest(format!(
                "the command is larger than the agent takes ({} MiB)",
                stacyvm_agent::MAX_FRAME >> 20
            )));
        }
        let (id, rx, mut registration) = self.register();
        self.send(id, &request).await?;
        let frames = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (Ok(frame), rx))
        });
        let send = |frame: Frame| async move {
            match frame {
                Frame::Kill => crate::provider::best_effort_quiet(
                    "asking the VM's agent to kill a command",
                    self.send(id, &frame).await,
                ),
                // Typed input never holds up the command's output: what
                // the link cannot queue now is dropped.
                frame => crate::provider::best_effort_quiet(
                    "typing into a VM's terminal",
                    self.writer.try_send(frame.encode_tagged(id)),
                ),
            }
        };
        let result = crate::provider::agent::follow(frames, send, spec, input, sink).await;
        registration.finished();
        match result {
            Err(ProviderError::Runtime(_)) if self.is_closed() => Err(gone()),
            other => other,
        }
    }

    /// One file operation: each answer frame up to `Done` goes to `take`.
    /// A request that ends otherwise (a timeout, a refused answer, its
    /// caller leaving) is cancelled on the agent.
    async fn file(
        &self,
        op: FileOp,
        content: Option<Bytes>,
        take: impl FnMut(Frame) -> ProviderResult<()>,
    ) -> ProviderResult<()> {
        let shown = op.name();
        self.request(Frame::File(op), shown, content, take).await
    }

    /// A request answered `Done` or `Failed` (with frames for `take`
    /// before), after `content` in `Data` frames and a `Done`.
    async fn request(
        &self,
        request: Frame,
        shown: &'static str,
        content: Option<Bytes>,
        mut take: impl FnMut(Frame) -> ProviderResult<()>,
    ) -> ProviderResult<()> {
        let (id, mut rx, mut registration) = self.register();
        // Err((whether the agent ended the request itself, why)).
        let work = async {
            let unanswered = |e| (false, e);
            self.send(id, &request).await.map_err(unanswered)?;
            if let Some(content) = content {
                for chunk in content.chunks(WRITE_CHUNK) {
                    self.send(id, &Frame::Data(chunk.to_vec()))
                        .await
                        .map_err(unanswered)?;
                }
                self.send(id, &Frame::Done).await.map_err(unanswered)?;
            }
            let (mut bytes, mut frames) = (0usize, 0usize);
            loop {
                match rx.recv().await.ok_or_else(|| (false, gone()))? {
                    Frame::Done => return Ok(()),
                    Frame::Failed { why, message } => {
                        let error = match why {
                            Failure::NoSuchFile => ProviderError::FileNotFound(message),
                            Failure::Invalid => ProviderError::InvalidRequest(message),
                            _ => ProviderError::Runtime(format!("the VM's agent: {message}")),
                        };
                        return Err((true, error));
                    }
                    frame => {
                        bytes += frame_size(&frame);
                        frames += 1;
                        if bytes > MAX_ANSWER_BYTES || frames > MAX_ENTRIES {
                            return Err(unanswered(ProviderError::Runtime(format!(
                                "the VM's answer to a {shown} is too large"
                            ))));
                        }
                        take(frame).map_err(unanswered)?;
                    }
                }
            }
        };
        match tokio::time::timeout(FILE_TIMEOUT, work).await {
            Ok(Ok(())) => {
                registration.finished();
                Ok(())
            }
            Ok(Err((answered, e))) => {
                if answered {
                    registration.finished();
                }
                Err(e)
            }
            Err(_) => Err(ProviderError::Unavailable(format!(
                "the VM's agent did not finish a {shown} within {FILE_TIMEOUT:?}"
            ))),
        }
    }

    async fn done(&self, op: FileOp) -> ProviderResult<()> {
        self.file(op, None, |frame| Err(unexpected(&frame))).await
    }

    pub async fn write_file(&self, path: &str, content: Bytes, mode: u32) -> ProviderResult<()> {
        let op = FileOp::Write {
            path: path.as_bytes().to_vec(),
            mode,
        };
        self.file(op, Some(content), |frame| Err(unexpected(&frame)))
            .await
    }

    pub async fn read_file(&self, path: &str) -> ProviderResult<Bytes> {
        let op = FileOp::Read {
            path: path.as_bytes().to_vec(),
        };
        let mut content = Vec::new();
        self.file(op, None, |frame| match frame {
            Frame::Data(d) => {
                content.extend_from_slice(&d);
                Ok(())
            }
            other => Err(unexpected(&other)),
        })
        .await?;
        Ok(Bytes::from(content))
    }

    pub async fn list(&self, path: &str) -> ProviderResult<Vec<FileEntry>> {
        let op = FileOp::List {
            path: path.as_bytes().to_vec(),
        };
        let mut entries = Vec::new();
        self.file(op, None, |frame| {
            entries.push(entry(&frame)?);
            Ok(())
        })
        .await?;
        Ok(entries)
    }

    pub async fn stat(&self, path: &str) -> ProviderResult<FileEntry> {
        let op = FileOp::Stat {
            path: path.as_bytes().to_vec(),
        };
        let mut found = None;
        self.file(op, None, |frame| match found {
            None => {
                found = Some(entry(&frame)?);
                Ok(())
            }
            Some(_) => Err(ProviderError::Runtime(
                "the VM's agent answered a stat with more than one entry".into(),
            )),
        })
        .await?;
        found.ok_or_else(|| {
            ProviderError::Runtime("the VM's agent answered a stat with no entry".into())
        })
    }

    pub async fn rename(&self, from: &str, to: &str) -> ProviderResult<()> {
        self.done(FileOp::Move {
            from: from.as_bytes().to_vec(),
            to: to.as_bytes().to_vec(),
        })
        .await
    }

    pub async fn chmod(&self, path: &str, mode: u32) -> ProviderResult<()> {
        self.done(FileOp::Chmod {
            path: path.as_bytes().to_vec(),
            mode,
        })
        .await
    }

    pub async fn delete(&self, path: &str, recursive: bool) -> ProviderResult<()> {
        self.done(FileOp::Delete {
            path: path.as_bytes().to_vec(),
            recursive,
        })
        .await
    }

    /// Gives a VM that has just been made its hostname, the host's time and
    /// fresh entropy (a VM restored from a snapshot has its sibling's).
    pub async fn setup(&self, hostname: &str) -> ProviderResult<()> {
        let hostname: Vec<u8> = hostname.bytes().take(stacyvm_agent::MAX_HOSTNAME).collect();
        let unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let mut entropy = vec![0u8; 32];
        let n = rustix::rand::getrandom(&mut entropy[..], rustix::rand::GetRandomFlags::empty())
            .map_err(|e| ProviderError::Runtime(format!("the host's random numbers: {e}")))?;
        entropy.truncate(n);
        let setup = stacyvm_agent::Setup {
            hostname,
            unix_nanos,
            entropy,
        };
        self.request(Frame::Setup(setup), "setup", None, |frame| {
            Err(unexpected(&frame))
        })
        .await
    }

    pub async fn glob(&self, pattern: &str) -> ProviderResult<Vec<String>> {
        let op = FileOp::Glob {
            pattern: pattern.as_bytes().to_vec(),
        };
        let mut found = Vec::new();
        self.file(op, None, |frame| match frame {
            Frame::Path(p) => {
                found.push(String::from_utf8_lossy(&p).into_owned());
                Ok(())
            }
            other => Err(unexpected(&other)),
        })
        .await?;
        Ok(found)
    }
}

/// Unregisters a request when its caller is done with it, or left: an
/// exec whose caller left before its end is killed on the agent.
struct Registration<'a> {
    link: &'a AgentLink,
    id: u32,
}

impl Registration<'_> {
    fn finished(&mut self) {
        lock(&self.link.pending).remove(&self.id);
        self.id = 0;
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if self.id == 0 {
            return;
        }
        lock(&self.link.pending).remove(&self.id);
        // The caller left mid-request: the agent must not run it on unseen.
        // A drop cannot wait: a full queue hands the kill to a task.
        let kill = Frame::Kill.encode_tagged(self.id);
        if let Err(mpsc::error::TrySendError::Full(kill)) = self.link.writer.try_send(kill)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let writer = self.link.writer.clone();
            runtime.spawn(async move {
                crate::provider::best_effort_quiet(
                    "asking the VM's agent to kill an abandoned command",
                    writer.send(kill).await,
                );
            });
        }
    }
}

fn unexpected(frame: &Frame) -> ProviderError {
    ProviderError::Runtime(format!(
        "the VM's agent sent {} in a file answer",
        frame.kind_name()
    ))
}

fn entry(frame: &Frame) -> ProviderResult<FileEntry> {
    let Frame::Entry(Entry {
        path,
        name,
        size,
        mode,
        is_dir,
        mtime,
    }) = frame
    else {
        return Err(unexpected(frame));
    };
    Ok(FileEntry {
        path: String::from_utf8_lossy(path).into_owned(),
        name: String::from_utf8_lossy(name).into_owned(),
        size: *size,
        mode: format!("{:o}", mode & 0o7777),
        is_dir: *is_dir,
        mod_time: chrono::DateTime::from_timestamp(*mtime, 0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn rand_u64() -> u64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    //! The host's end against a hostile guest: what a VM's root can make
    //! its agent's port send.
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    /// A listener standing in for the VMM's socket; `agent` plays the guest.
    async fn with_agent<F, Fut>(agent: F) -> (tempfile::TempDir, AgentSocket)
    where
        F: FnOnce(tokio::net::UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            if let Ok((stream, _)) = listener.accept().await {
                agent(stream).await;
            }
        });
        (dir, AgentSocket::Serial(path))
    }

    /// Reads the host's Session frame and answers with a welcome, after
    /// `before` (garbage, an old session's frames).
    async fn welcome(stream: &mut tokio::net::UnixStream, before: &[u8]) {
        let mut session = [0u8; 17];
        stream.read_exact(&mut session).await.expect("session");
        let n = u64::from_be_bytes(session[9..17].try_into().expect("8"));
        stream.write_all(before).await.expect("write");
        let welcome = Frame::Welcome {
            version: VERSION,
            session: n,
        };
        stream
            .write_all(&welcome.encode_tagged(0))
            .await
            .expect("write");
    }

    #[tokio::test]
    async fn garbage_before_the_welcome_is_skipped_and_a_silent_agent_times_out() {
        let (_dir, path) = with_agent(|mut s| async move {
            // A cut-off frame and noise, then the welcome.
            welcome(&mut s, &[0, 0, 0, 7, 11, 0, 0, 1, 0, 0xff, 0xfe]).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let link = AgentLink::open(&path, Duration::from_secs(5), || true).await;
        assert!(link.is_ok(), "{:?}", link.err());

        let (_dir, path) = with_agent(|s| async move {
            // Connected, reading nothing, saying nothing.
            let _held = s;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let silent = AgentLink::open(&path, Duration::from_millis(300), || true).await;
        assert!(
            matches!(silent, Err(LinkError::Timeout(_))),
            "{:?}",
            silent.err()
        );
    }

    #[tokio::test]
    async fn vsock_asks_for_the_agents_port_and_retries_while_nothing_listens() {
        // Firecracker's side: hang-ups while the guest does not listen yet,
        // then `OK` for the agent's port, then the agent's stream.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let asked = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = asked.clone();
        tokio::spawn(async move {
            for attempt in 0.. {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut line = Vec::new();
                loop {
                    let b = s.read_u8().await.expect("line");
                    if b == b'\n' {
                        break;
                    }
                    line.push(b);
                }
                lock(&seen).push(String::from_utf8(line).expect("utf-8"));
                if attempt < 2 {
                    continue; // hang up: nothing listens
                }
                s.write_all(b"OK 1073741824\n").await.expect("ok");
                welcome(&mut s, &[]).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
                return;
            }
        });
        let socket = AgentSocket::Vsock {
            socket: path.clone(),
            port: 1024,
        };
        let link = AgentLink::open(&socket, Duration::from_secs(5), || true).await;
        assert!(link.is_ok(), "{:?}", link.err());
        assert_eq!(*lock(&asked), vec!["CONNECT 1024"; 3]);

        // A VMM that answers something else is refused, not spoken to.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut line = [0u8; 13];
                if s.read_exact(&mut line).await.is_ok() {
                    s.write_all(b"NO\n").await.expect("answer");
                }
            }
        });
        let socket = AgentSocket::Vsock {
            socket: path,
            port: 1024,
        };
        match AgentLink::open(&socket, Duration::from_millis(300), || true).await {
            Err(LinkError::Connect(e)) => {
                assert!(e.to_string().contains("refused vsock port 1024"), "{e}")
            }
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
    }

    #[tokio::test]
    async fn an_oversized_frame_closes_the_link_and_ends_its_requests() {
        let (_dir, path) = with_agent(|mut s| async move {
            welcome(&mut s, &[]).await;
            // Request 1's answer claims 1 GiB of output.
            let mut frame = 1u32.to_be_bytes().to_vec();
            frame.push(11);
            frame.extend_from_slice(&(1u32 << 30).to_be_bytes());
            s.write_all(&frame).await.expect("write");
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let link = AgentLink::open(&path, Duration::from_secs(5), || true)
            .await
            .expect("open");
        let (tx, _rx) = mpsc::channel(4);
        let spec = ExecSpec {
            argv: vec!["true".into()],
            env: Default::default(),
            workdir: None,
            timeout: Duration::from_secs(5),
        };
        let ended = tokio::time::timeout(Duration::from_secs(3), link.exec(&spec, tx))
            .await
            .expect("the request ends with the link");
        assert!(ended.is_err(), "{ended:?}");
        assert!(link.is_closed());
    }

    #[tokio::test]
    async fn a_read_answer_past_its_bound_is_refused_not_buffered() {
        let (_dir, path) = with_agent(|mut s| async move {
            welcome(&mut s, &[]).await;
            // Frames for a request nobody made are dropped; then request
            // 1 (the read) gets far more than any file may hold.
            let stray = Frame::Stdout(vec![1; 16]).encode_tagged(99);
            s.write_all(&stray).await.expect("write");
            let chunk = Frame::Data(vec![7; stacyvm_agent::MAX_FRAME]).encode_tagged(1);
            for _ in 0..(MAX_ANSWER_BYTES / stacyvm_agent::MAX_FRAME + 2) {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let link = AgentLink::open(&path, Duration::from_secs(5), || true)
            .await
            .expect("open");
        let read = link.read_file("/big").await;
        match read {
            Err(ProviderError::Runtime(why)) => assert!(why.contains("too large"), "{why}"),
            other => panic!("expected a refusal, got {:?}", other.map(|b| b.len())),
        }
    }
}
