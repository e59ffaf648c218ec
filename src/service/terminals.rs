//! Terminal sessions: a command on a PTY in a sandbox (its shell by
//! default), which a client attaches to, types into and resizes, and which
//! outlives the client's connection for [`GRACE`]: a client that comes
//! back (with the session's id) gets the scrollback and follows on.
//!
//! A session belongs to its sandbox and is seen by whoever may see the
//! sandbox; it ends when its command does, when the sandbox is no longer
//! usable, when nobody attached for [`GRACE`], or after the sandbox's
//! longest life (`defaults.max_ttl`). Sessions are bounded per sandbox
//! ([`MAX_PER_SANDBOX`]) and in all ([`MAX_SESSIONS`]); what a session
//! keeps is its last [`SCROLLBACK`] bytes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{AuditAction, Error, Result, Service};
use crate::auth::Caller;
use crate::provider::{ExecExit, ExecSpec, OutputChunk, Terminal, TerminalInput, TerminalSize};

/// How long a session waits for its client to come back.
pub const GRACE: Duration = Duration::from_secs(300);

/// Sessions of one sandbox at once.
pub const MAX_PER_SANDBOX: usize = 8;

/// Sessions of the server at once.
pub const MAX_SESSIONS: usize = 1024;

/// What a session keeps of its output for a client that comes back.
pub const SCROLLBACK: usize = 256 << 10;

/// Typed input waiting for the runtime, in messages (each at most 64 KiB:
/// the WebSocket's bound).
const INPUT_QUEUE: usize = 32;

/// The largest terminal a client may ask for.
const MAX_SIZE: u16 = 1000;

/// What a client asks for when it opens a session.
#[derive(Debug, Clone, Default)]
pub struct TerminalRequest {
    /// A shell command line; `None`: the sandbox's shell (`sh`).
    pub command: Option<String>,
    pub cols: Option<u16>,
    pub rows: Option<u16>,
}

/// A session's output so far: its last bytes, how many there were in all,
/// and its end.
#[derive(Default)]
struct Scrollback {
    bytes: VecDeque<u8>,
    total: u64,
    exit: Option<ExecExit>,
    /// Why it ended without an exit of its command.
    error: Option<String>,
}

/// One terminal session.
pub struct Session {
    pub id: String,
    pub sandbox_id: String,
    input: mpsc::Sender<TerminalInput>,
    scrollback: Mutex<Scrollback>,
    /// Bumped at each change of the scrollback (new output, the end).
    changed: watch::Sender<u64>,
    /// Ends the session (its command is killed).
    cancel: CancellationToken,
    /// The client attached now (its number, and the token that tells it
    /// another took over), if any.
    attached: Mutex<Option<(u64, CancellationToken)>>,
    /// Counts detaches: a grace timer ends the session only if no client
    /// came and went since it began.
    detaches: std::sync::atomic::AtomicU64,
}

impl Session {
    /// Appends output to the scrollback, keeping its last [`SCROLLBACK`]
    /// bytes.
    fn append(&self, data: &[u8]) {
        let mut back = lock(&self.scrollback);
        back.bytes.extend(data.iter());
        back.total += data.len() as u64;
        let over = back.bytes.len().saturating_sub(SCROLLBACK);
        back.bytes.drain(..over);
    }
}

/// Numbers the attachments (to tell whose a slot is).
static ATTACHMENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a client reads from a session, from where it last was.
pub enum Output {
    /// Output bytes; `skipped` were lost to the scrollback's bound.
    Data { data: Bytes, skipped: u64 },
    /// The session ended: its command's exit, or why it ended otherwise.
    End(std::result::Result<ExecExit, String>),
}

/// A client's hold on a session, from [`Service::open_terminal`] or
/// [`Service::attach_terminal`]. Dropping it detaches: the session waits
/// [`GRACE`] for a client to come back.
pub struct Attachment {
    pub session: Arc<Session>,
    /// Cancelled when another client takes the session over.
    pub taken_over: CancellationToken,
    number: u64,
    offset: u64,
    changes: watch::Receiver<u64>,
    service: Service,
}

impl Attachment {
    /// What the client has not seen yet (the scrollback first), waiting
    /// for more; `None` once the end was read.
    pub async fn next(&mut self) -> Option<Output> {
        loop {
            {
                let back = lock(&self.session.scrollback);
                let first = back.total - back.bytes.len() as u64;
                if self.offset < back.total {
                    let skipped = first.saturating_sub(self.offset);
                    let from = (self.offset.max(first) - first) as usize;
                    let data: Vec<u8> = back.bytes.range(from..).copied().collect();
                    self.offset = back.total;
                    return Some(Output::Data {
                        data: Bytes::from(data),
                        skipped,
                    });
                }
                if self.offset == u64::MAX {
                    return None;
                }
                if let Some(exit) = back.exit {
                    self.offset = u64::MAX;
                    return Some(Output::End(Ok(exit)));
                }
                if let Some(why) = &back.error {
                    self.offset = u64::MAX;
                    return Some(Output::End(Err(why.clone())));
                }
            }
            if self.changes.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Typed input for the command; refused once the session ended, and
    /// dropped (not waited for) when the runtime does not keep up.
    pub fn send(&self, input: TerminalInput) -> Result<()> {
        self.session.send(input)
    }
}

impl Session {
    /// Typed input or a resize for the command (the one rule for every
    /// surface): a size within bounds; refused once the session ended;
    /// dropped, not waited for, when the runtime does not keep up.
    fn send(&self, input: TerminalInput) -> Result<()> {
        let input = match input {
            TerminalInput::Resize(size) => TerminalInput::Resize(clamp(size)?),
            other => other,
        };
        match self.input.try_send(input) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(Error::ResourceLimit {
                message: "the terminal takes input more slowly than it is sent".into(),
                retry_after_secs: 1,
            }),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(Error::Conflict("the terminal session has ended".into()))
            }
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let ours = {
            let mut attached = lock(&self.session.attached);
            let ours = attached.as_ref().is_some_and(|(n, _)| *n == self.number);
            if ours {
                *attached = None;
            }
            ours
        };
        // Taken over: the session has its client.
        if ours {
            self.service.inner.terminals.detached(&self.session);
        }
    }
}

fn clamp(size: TerminalSize) -> Result<TerminalSize> {
    if size.cols == 0 || size.rows == 0 || size.cols > MAX_SIZE || size.rows > MAX_SIZE {
        return Err(Error::BadRequest(format!(
            "a terminal is 1 to {MAX_SIZE} columns and rows, not {}x{}",
            size.cols, size.rows
        )));
    }
    Ok(size)
}

/// Every open session, by id.
#[derive(Default)]
pub struct Terminals {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

impl Terminals {
    fn get(&self, id: &str) -> Option<Arc<Session>> {
        lock(&self.sessions).get(id).cloned()
    }

    /// A client left: the session ends unless one attaches within [`GRACE`]
    /// (or at once if its command has ended).
    fn detached(&self, session: &Arc<Session>) {
        let ended = {
            let back = lock(&session.scrollback);
            back.exit.is_some() || back.error.is_some()
        };
        if ended {
            session.cancel.cancel();
            return;
        }
        let session = session.clone();
        let detach = session
            .detaches
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(GRACE) => {}
                () = session.cancel.cancelled() => return,
            }
            let latest = session.detaches.load(std::sync::atomic::Ordering::Acquire) == detach;
            if latest && lock(&session.attached).is_none() {
                tracing::info!(session = %session.id, sandbox = %session.sandbox_id, "a terminal session nobody came back to ends");
                session.cancel.cancel();
            }
        });
    }

    /// The sessions of `sandbox_id`.
    pub fn of_sandbox(&self, sandbox_id: &str) -> Vec<String> {
        lock(&self.sessions)
            .values()
            .filter(|s| s.sandbox_id == sandbox_id)
            .map(|s| s.id.clone())
            .collect()
    }
}

impl Service {
    /// Opens a terminal session in a running sandbox and attaches the
    /// caller to it.
    pub async fn open_terminal(
        &self,
        caller: &Caller,
        id: &str,
        req: TerminalRequest,
    ) -> Result<Attachment> {
        let outcome = self.open_terminal_inner(caller, id, req).await;
        self.audit(
            caller,
            AuditAction::SandboxTerminal,
            id,
            outcome.as_ref().map(drop),
        )
        .await;
        outcome
    }

    async fn open_terminal_inner(
        &self,
        caller: &Caller,
        id: &str,
        req: TerminalRequest,
    ) -> Result<Attachment> {
        self.require_write(caller)?;
        self.refuse_if_draining()?;
        let size = clamp(TerminalSize {
            cols: req.cols.unwrap_or(80),
            rows: req.rows.unwrap_or(24),
        })?;
        let argv = match req.command.as_deref() {
            None | Some("") => vec!["sh".to_string()],
            Some(line) => vec!["sh".into(), "-c".into(), line.to_string()],
        };
        let env = [("TERM".to_string(), "xterm-256color".to_string())].into();
        crate::provider::check_command(&argv, &env).map_err(Error::BadRequest)?;
        let (model, worker, runtime) = self.sandbox_runtime(caller, id).await?;
        let terminals = &self.inner.terminals;
        let session = {
            let mut sessions = lock(&terminals.sessions);
            if sessions.len() >= MAX_SESSIONS {
                return Err(Error::ResourceLimit {
                    message: format!("the server has {MAX_SESSIONS} terminal sessions open"),
                    retry_after_secs: 10,
                });
            }
            if sessions
                .values()
                .filter(|s| s.sandbox_id == model.id)
                .count()
                >= MAX_PER_SANDBOX
            {
                return Err(Error::ResourceLimit {
                    message: format!("sandbox {id} has {MAX_PER_SANDBOX} terminal sessions open"),
                    retry_after_secs: 10,
                });
            }
            let (input, input_rx) = mpsc::channel(INPUT_QUEUE);
            let session = Arc::new(Session {
                id: format!("term_{}", uuid::Uuid::new_v4().simple()),
                sandbox_id: model.id.clone(),
                input,
                scrollback: Mutex::default(),
                changed: watch::channel(0).0,
                cancel: CancellationToken::new(),
                attached: Mutex::default(),
                detaches: Default::default(),
            });
            sessions.insert(session.id.clone(), session.clone());
            (session, input_rx)
        };
        let (session, input_rx) = session;
        let spec = ExecSpec {
            argv,
            env,
            workdir: None,
            timeout: self.config().defaults.max_ttl.0,
        };
        let (sink, mut chunks) = mpsc::channel::<OutputChunk>(64);
        let running = session.clone();
        let service = self.clone();
        tokio::spawn(async move {
            let terminal = Terminal {
                size,
                input: input_rx,
            };
            let run = worker.exec_terminal(&runtime, &spec, terminal, sink);
            tokio::pin!(run);
            let mut output_open = true;
            let end = loop {
                tokio::select! {
                    chunk = chunks.recv(), if output_open => match chunk {
                        Some(chunk) => {
                            running.append(&chunk.data);
                            running.changed.send_modify(|n| *n += 1);
                        }
                        None => output_open = false,
                    },
                    result = &mut run => break result.map_err(|e| e.to_string()),
                    () = running.cancel.cancelled() => break Err("the session was closed".to_string()),
                }
            };
            // What the command printed before its end comes first.
            while let Ok(chunk) = chunks.try_recv() {
                running.append(&chunk.data);
            }
            {
                let mut back = lock(&running.scrollback);
                match end {
                    Ok(exit) => back.exit = Some(exit),
                    Err(why) => back.error = Some(why),
                }
            }
            running.changed.send_modify(|n| *n += 1);
            // The attached client (it holds the session) reads the end; no
            // other comes to an ended session.
            lock(&service.inner.terminals.sessions).remove(&running.id);
            // Its grace timers end with it.
            running.cancel.cancel();
        });
        Ok(self.attach(session))
    }

    /// Attaches the caller to session `session_id` of sandbox `id`; a
    /// client attached before is detached (it hears `taken_over`).
    pub async fn attach_terminal(
        &self,
        caller: &Caller,
        id: &str,
        session_id: &str,
    ) -> Result<Attachment> {
        self.require_write(caller)?;
        let model = self.visible_sandbox(caller, id).await?;
        let session = self
            .inner
            .terminals
            .get(session_id)
            .filter(|s| s.sandbox_id == model.id && !s.cancel.is_cancelled())
            .ok_or_else(|| {
                Error::NotFound(format!("no terminal session {session_id} in sandbox {id}"))
            })?;
        Ok(self.attach(session))
    }

    fn attach(&self, session: Arc<Session>) -> Attachment {
        let taken_over = CancellationToken::new();
        let number = ATTACHMENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((_, before)) = lock(&session.attached).replace((number, taken_over.clone())) {
            before.cancel();
        }
        Attachment {
            changes: session.changed.subscribe(),
            session,
            taken_over,
            number,
            offset: 0,
            service: self.clone(),
        }
    }

    /// Opens a terminal session and leaves it waiting for a client (for
    /// GraphQL: the `terminal` subscription attaches); its id.
    pub async fn start_terminal(
        &self,
        caller: &Caller,
        id: &str,
        req: TerminalRequest,
    ) -> Result<String> {
        let attachment = self.open_terminal(caller, id, req).await?;
        Ok(attachment.session.id.clone())
    }

    /// Input or a resize for session `session_id` of sandbox `id`, from
    /// whatever client (GraphQL mutations).
    pub async fn terminal_input(
        &self,
        caller: &Caller,
        id: &str,
        session_id: &str,
        input: TerminalInput,
    ) -> Result<()> {
        self.require_write(caller)?;
        let model = self.visible_sandbox(caller, id).await?;
        self.inner
            .terminals
            .get(session_id)
            .filter(|s| s.sandbox_id == model.id && !s.cancel.is_cancelled())
            .ok_or_else(|| {
                Error::NotFound(format!("no terminal session {session_id} in sandbox {id}"))
            })?
            .send(input)
    }

    /// Ends every terminal session of `sandbox_id` (it is being destroyed).
    pub(super) fn close_terminals(&self, sandbox_id: &str) {
        for session in lock(&self.inner.terminals.sessions).values() {
            if session.sandbox_id == sandbox_id {
                session.cancel.cancel();
            }
        }
    }
}
