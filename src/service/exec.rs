//! Running commands: shell and argv modes, timeouts, streaming output, and
//! the execution record each command leaves.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};

use super::{Error, Result, Service};
use crate::auth::Caller;
use crate::duration;
use crate::events::Event;
use crate::lifecycle::ExecStatus;
use crate::provider::{ExecExit, ExecSpec, OutputChunk, StreamKind};
use crate::store::ExecutionFinish;

use super::output::OutputEnd;
use bytes::Bytes;

/// Bytes of each stream kept on the execution record.
const TAIL_BYTES: usize = 16 * 1024;

/// A command to run, as clients send it.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub command: String,
    pub args: Vec<String>,
    /// "" or "shell": `sh -c` with the args shell-quoted; "argv": no shell.
    pub mode: Option<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    /// A Go duration string; defaults to `defaults.exec_timeout`.
    pub timeout: Option<String>,
}

/// A piece of output: text that never splits a UTF-8 character.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub stream: StreamKind,
    pub data: String,
}

/// How a command ended.
#[derive(Debug, Clone)]
pub struct ExecResult {
    pub execution_id: String,
    pub exit_code: i32,
    pub duration: Duration,
    pub timed_out: bool,
    pub timeout: Duration,
}

/// A command that has started: its output as it arrives, then its result.
pub struct RunningExec {
    pub execution_id: String,
    pub output: mpsc::Receiver<ExecOutput>,
    pub result: oneshot::Receiver<Result<ExecResult>>,
}

/// The collected answer of a non-streaming exec.
#[derive(Debug, Clone)]
pub struct CollectedExec {
    pub result: ExecResult,
    pub stdout: String,
    pub stderr: String,
    /// Output past `defaults.max_exec_output_bytes` (per stream) was cut.
    pub truncated: bool,
}

/// Splits a byte stream into text at character boundaries: a character cut
/// in two by the runtime is held back until its remaining bytes arrive.
#[derive(Default)]
struct Utf8Splitter {
    pending: Vec<u8>,
}

impl Utf8Splitter {
    /// Text for every complete character so far, and the bytes it came from.
    fn push(&mut self, bytes: &[u8]) -> (String, Bytes) {
        self.pending.extend_from_slice(bytes);
        let keep = incomplete_suffix_len(&self.pending);
        let rest = self.pending.split_off(self.pending.len() - keep);
        let complete = std::mem::replace(&mut self.pending, rest);
        (
            String::from_utf8_lossy(&complete).into_owned(),
            Bytes::from(complete),
        )
    }

    /// Whatever is left at the end, even an incomplete character.
    fn finish(&mut self) -> (String, Bytes) {
        let rest = std::mem::take(&mut self.pending);
        (
            String::from_utf8_lossy(&rest).into_owned(),
            Bytes::from(rest),
        )
    }
}

/// Length of a trailing, incomplete (but so far valid) UTF-8 sequence.
fn incomplete_suffix_len(bytes: &[u8]) -> usize {
    for back in 1..=3.min(bytes.len()) {
        let b = bytes[bytes.len() - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // a continuation byte: keep looking for the lead byte
        }
        let needed = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// Keeps the last `TAIL_BYTES` of a stream, at a character boundary.
fn push_tail(tail: &mut String, text: &str) {
    tail.push_str(text);
    if tail.len() > TAIL_BYTES {
        let mut cut = tail.len() - TAIL_BYTES;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail.drain(..cut);
    }
}

/// Turns a request into the argv a provider runs.
fn build_argv(req: &ExecRequest) -> Result<Vec<String>> {
    if req.command.is_empty() {
        return Err(Error::BadRequest("command is required".into()));
    }
    let argv = match req.mode.as_deref().unwrap_or("") {
        "" | "shell" => {
            let mut script = req.command.clone();
            if !req.args.is_empty() {
                script.push(' ');
                script.push_str(&shell_words::join(&req.args));
            }
            Ok(vec!["/bin/sh".into(), "-c".into(), script])
        }
        "argv" => {
            let mut argv = vec![req.command.clone()];
            argv.extend(req.args.iter().cloned());
            Ok(argv)
        }
        other => Err(Error::BadRequest(format!(
            "invalid exec mode {other:?}: use \"shell\" or \"argv\""
        ))),
    }?;
    crate::provider::check_command(&argv, &req.env).map_err(Error::BadRequest)?;
    Ok(argv)
}

impl Service {
    /// The longest timeout `owner` may ask for.
    pub(super) async fn max_exec_timeout_for(&self, tenant: &str, owner: &str) -> Result<Duration> {
        let owner_max = self
            .store()
            .get_owner(tenant, owner)
            .await?
            .and_then(|o| o.max_exec_timeout_ms)
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis);
        Ok(owner_max.unwrap_or(self.config().defaults.max_exec_timeout.0))
    }

    /// Starts a command in a running sandbox and returns at once. The
    /// command runs to completion (and is recorded) even if the caller
    /// stops reading.
    pub async fn start_exec(
        &self,
        caller: &Caller,
        id: &str,
        req: ExecRequest,
    ) -> Result<RunningExec> {
        let outcome = self.start_exec_inner(caller, id, req).await;
        self.audit(
            caller,
            super::AuditAction::SandboxExec,
            id,
            outcome.as_ref().map(drop),
        )
        .await;
        outcome
    }

    async fn start_exec_inner(
        &self,
        caller: &Caller,
        id: &str,
        req: ExecRequest,
    ) -> Result<RunningExec> {
        self.require_write(caller)?;
        // Counted by the drain from here on, so that a command admitted
        // just before a shutdown began is waited for like any other.
        let in_flight = self.inner.shutdown.execs.token();
        self.refuse_if_draining()?;
        let argv = build_argv(&req)?;
        if let Some(dir) = &req.workdir
            && !dir.is_empty()
            && !dir.starts_with('/')
        {
            return Err(Error::BadRequest(format!(
                "workdir must be an absolute path, got {dir:?}"
            )));
        }
        let model = self.usable_sandbox(caller, id).await?;
        // Two independent reads at once: on the path of every command.
        let ((worker, runtime), max) = tokio::try_join!(
            self.runtime_of(&model),
            self.max_exec_timeout_for(&model.tenant_id, &model.owner_id)
        )?;
        let timeout = match req.timeout.as_deref() {
            None | Some("") => self.config().defaults.exec_timeout.0.min(max),
            Some(text) => {
                duration::parse(text).map_err(|e| Error::BadRequest(format!("timeout: {e}")))?
            }
        };
        if timeout.is_zero() || timeout > max {
            return Err(Error::BadRequest(format!(
                "timeout must be positive and at most {}",
                duration::format(max)
            )));
        }

        let execution_id = crate::ids::execution();
        self.store()
            .insert_execution(entity::execution::Model {
                id: execution_id.clone(),
                sandbox_id: model.id.clone(),
                owner_id: model.owner_id.clone(),
                tenant_id: model.tenant_id.clone(),
                argv: serde_json::json!(argv),
                status: ExecStatus::Running.as_str().into(),
                exit_code: None,
                duration_ms: None,
                stdout_tail: String::new(),
                stderr_tail: String::new(),
                error: None,
                created_at: Utc::now(),
                finished_at: None,
                replica_id: self.store().replica().to_string(),
            })
            .await?;
        self.events().publish(Event::Exec {
            execution_id: execution_id.clone(),
            sandbox_id: model.id.clone(),
            owner_id: model.owner_id.clone(),
            tenant_id: model.tenant_id.clone(),
            status: "started".into(),
            exit_code: None,
            at: Utc::now(),
        });

        let spec = ExecSpec {
            argv,
            env: req.env,
            workdir: req.workdir.filter(|w| !w.is_empty()),
            timeout,
        };
        let log =
            self.inner
                .outputs
                .open(&execution_id, &model.id, &model.tenant_id, &model.owner_id);
        let (out_tx, out_rx) = mpsc::channel(64);
        let (result_tx, result_rx) = oneshot::channel();
        let service = self.clone();
        let exec_id = execution_id.clone();
        let cutoff = self.exec_cutoff();
        // The token moves into the task: a graceful shutdown waits for it.
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let started = Instant::now();
            let (sink, mut chunks) = mpsc::channel::<OutputChunk>(64);
            let run = tokio::spawn(async move { worker.exec(&runtime, &spec, sink).await });
            tokio::pin!(cutoff);
            let mut splitters = [Utf8Splitter::default(), Utf8Splitter::default()];
            let mut tails = [String::new(), String::new()];
            let mut listening = true;
            // Every chunk goes to the shared log (never waits) and to the
            // caller that started the command (waits: backpressure).
            let forward =
                |stream: StreamKind, (text, bytes): (String, Bytes), tails: &mut [String; 2]| {
                    if bytes.is_empty() {
                        return None;
                    }
                    push_tail(&mut tails[stream as usize], &text);
                    service.metrics().output(stream, bytes.len());
                    log.append(stream, text.clone(), bytes);
                    Some(ExecOutput { stream, data: text })
                };
            let mut interrupted = false;
            loop {
                let chunk = tokio::select! {
                    chunk = chunks.recv() => chunk,
                    () = &mut cutoff => {
                        interrupted = true;
                        None
                    }
                };
                let Some(chunk) = chunk else { break };
                crate::failpoint::hit("exec.output_flowing");
                let piece = splitters[chunk.stream as usize].push(&chunk.data);
                if let Some(out) = forward(chunk.stream, piece, &mut tails)
                    && listening
                    && out_tx.send(out).await.is_err()
                {
                    listening = false;
                }
            }
            for stream in [StreamKind::Stdout, StreamKind::Stderr] {
                let piece = splitters[stream as usize].finish();
                if let Some(out) = forward(stream, piece, &mut tails)
                    && listening
                {
                    // A departed listener is fine: the record is still written.
                    let _departed = out_tx.send(out).await;
                }
            }
            // Reported to the millisecond everywhere (REST, GraphQL, records).
            let duration = Duration::from_millis(started.elapsed().as_millis() as u64);
            let exit = if interrupted {
                // The server is going away: dropping the provider's exec
                // kills the command (docker kills its process tree; native
                // and proot helpers die with the server).
                run.abort();
                let _cancelled = run.await;
                Err(Error::Unavailable(
                    "interrupted: the server shut down before the command finished".into(),
                ))
            } else {
                match run.await {
                    Ok(result) => result.map_err(Error::from),
                    Err(join) => Err(Error::internal(format!("exec task failed: {join}"))),
                }
            };
            let [stdout_tail, stderr_tail] = tails;
            let (status, exit_code, error) = match &exit {
                Ok(ExecExit::Exited(code)) => (ExecStatus::Completed, Some(*code), None),
                Ok(ExecExit::TimedOut) => (
                    ExecStatus::Timeout,
                    None,
                    Some(format!("timed out after {}", duration::format(timeout))),
                ),
                // A worker lost mid-command (or its daemon gone) interrupts it.
                Err(e) if interrupted || matches!(e, Error::Unavailable(_)) => {
                    (ExecStatus::Interrupted, None, Some(e.to_string()))
                }
                Err(e) => (ExecStatus::Failed, None, Some(e.to_string())),
            };
            let finish = ExecutionFinish {
                status,
                exit_code,
                duration_ms: duration.as_millis() as i64,
                stdout_tail,
                stderr_tail,
                error,
            };
            service
                .metrics()
                .executed(&model.provider, status, duration);
            if let Err(e) = service.store().finish_execution(&exec_id, finish).await {
                tracing::error!(execution = %exec_id, error = %e, "cannot record execution result");
            }
            service.events().publish(Event::Exec {
                execution_id: exec_id.clone(),
                sandbox_id: model.id.clone(),
                owner_id: model.owner_id.clone(),
                tenant_id: model.tenant_id.clone(),
                status: status.as_str().into(),
                exit_code,
                at: Utc::now(),
            });
            log.finish(OutputEnd {
                exit_code,
                duration,
                timed_out: status == ExecStatus::Timeout,
                error: match &exit {
                    Err(e) => Some(e.to_string()),
                    Ok(_) => None,
                },
            });
            service.inner.outputs.retire(exec_id.clone());
            let result = exit.map(|exit| ExecResult {
                execution_id: exec_id,
                exit_code: match exit {
                    ExecExit::Exited(code) => code,
                    ExecExit::TimedOut => -1,
                },
                duration,
                timed_out: exit == ExecExit::TimedOut,
                timeout,
            });
            // The caller may have gone away; the record is written either way.
            let _departed = result_tx.send(result);
        });
        Ok(RunningExec {
            execution_id,
            output: out_rx,
            result: result_rx,
        })
    }

    /// Runs a command and waits for it. Each stream is capped at
    /// `defaults.max_exec_output_bytes`; a timeout is an error.
    pub async fn exec(&self, caller: &Caller, id: &str, req: ExecRequest) -> Result<CollectedExec> {
        let mut running = self.start_exec(caller, id, req).await?;
        let cap = self.config().defaults.max_exec_output_bytes;
        let mut streams = [String::new(), String::new()];
        let mut truncated = false;
        while let Some(out) = running.output.recv().await {
            let buf = &mut streams[out.stream as usize];
            let room = cap.saturating_sub(buf.len());
            let mut take = out.data.len().min(room);
            while !out.data.is_char_boundary(take) {
                take -= 1;
            }
            buf.push_str(&out.data[..take]);
            truncated |= take < out.data.len();
        }
        let result = running
            .result
            .await
            .map_err(|_| Error::internal("exec task ended without a result"))??;
        if result.timed_out {
            return Err(Error::Timeout(format!(
                "command timed out after {}",
                duration::format(result.timeout)
            )));
        }
        let [stdout, stderr] = streams;
        Ok(CollectedExec {
            result,
            stdout,
            stderr,
            truncated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_never_cuts_a_character() {
        let text = "héllo €uro 🎉";
        let bytes = text.as_bytes();
        for cut in 0..bytes.len() {
            let mut s = Utf8Splitter::default();
            let mut out = s.push(&bytes[..cut]).0;
            out.push_str(&s.push(&bytes[cut..]).0);
            out.push_str(&s.finish().0);
            assert_eq!(out, text, "cut at {cut}");
        }
    }

    #[test]
    fn shell_mode_quotes_args() {
        let req = ExecRequest {
            command: "echo".into(),
            args: vec!["a b".into(), "$HOME".into(), "it's".into()],
            ..Default::default()
        };
        let argv = build_argv(&req).unwrap_or_default();
        assert_eq!(argv[..2], ["/bin/sh".to_string(), "-c".to_string()]);
        assert_eq!(argv[2], r#"echo 'a b' '$HOME' 'it'\''s'"#);
    }

    #[test]
    fn unknown_mode_is_bad_request() {
        let req = ExecRequest {
            command: "ls".into(),
            mode: Some("bogus".into()),
            ..Default::default()
        };
        assert!(matches!(build_argv(&req), Err(Error::BadRequest(_))));
    }

    #[test]
    fn tail_is_bounded_at_a_boundary() {
        let mut tail = String::new();
        for _ in 0..10_000 {
            push_tail(&mut tail, "€");
        }
        assert!(tail.len() <= TAIL_BYTES);
        assert!(tail.chars().all(|c| c == '€'));
    }
}
