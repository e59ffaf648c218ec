//! Live output of executions, for any number of followers.
//!
//! Each running (or recently finished) execution has an [`OutputLog`]: an
//! ordered, bounded buffer of chunks numbered from 0. The command writes
//! into it and never waits for readers. A follower keeps its own cursor
//! (a sequence number): it first replays what the buffer still holds from
//! its cursor, then waits for more. So a late joiner or a reconnect with
//! `from_seq` gets exactly the chunks it missed, with no gap and no
//! duplicate, and a follower that falls behind past the buffer is told
//! how many chunks it lost ([`OutputEvent::Truncated`]) instead of silence.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::provider::StreamKind;

/// Bytes of output kept per execution for followers that join late or lag.
pub const BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// How long a finished execution's output stays available to followers.
const KEEP_FINISHED: Duration = Duration::from_secs(300);

/// One chunk, as text that never splits a character, with the raw bytes
/// it came from (binary output is not valid UTF-8; clients may want base64).
#[derive(Debug, Clone)]
pub struct OutputChunk {
    pub seq: u64,
    pub stream: StreamKind,
    pub text: String,
    pub bytes: Bytes,
}

/// How an execution ended, as followers see it.
#[derive(Debug, Clone)]
pub struct OutputEnd {
    pub exit_code: Option<i32>,
    pub duration: Duration,
    pub timed_out: bool,
    /// Set when the command could not run to an exit code.
    pub error: Option<String>,
}

/// What a follower receives, in order.
#[derive(Debug, Clone)]
pub enum OutputEvent {
    Chunk(OutputChunk),
    /// Chunks `from_seq..to_seq` were dropped from the buffer before this
    /// follower read them.
    Truncated {
        from_seq: u64,
        to_seq: u64,
    },
    /// The last event of every stream.
    End(OutputEnd),
}

#[derive(Default)]
struct LogState {
    chunks: VecDeque<OutputChunk>,
    /// Sequence number the next chunk gets.
    next_seq: u64,
    bytes: usize,
    end: Option<OutputEnd>,
}

/// The output of one execution.
pub struct OutputLog {
    state: Mutex<LogState>,
    /// Bumped on every append and at the end; followers wait on it.
    changed: watch::Sender<u64>,
    pub sandbox_id: String,
    /// The sandbox owner's tenant; with `owner_id`, who may follow.
    pub tenant_id: String,
    pub owner_id: String,
}

impl OutputLog {
    /// A log that is not registered in any hub (replays of old executions).
    pub fn detached(sandbox_id: &str, tenant_id: &str, owner_id: &str) -> OutputLog {
        OutputLog::new(sandbox_id, tenant_id, owner_id)
    }

    fn new(sandbox_id: &str, tenant_id: &str, owner_id: &str) -> OutputLog {
        OutputLog {
            state: Mutex::new(LogState::default()),
            changed: watch::channel(0).0,
            sandbox_id: sandbox_id.to_string(),
            tenant_id: tenant_id.to_string(),
            owner_id: owner_id.to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        // A panic while holding this lock cannot leave the buffer
        // inconsistent (every update is a single push/pop), so recover.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a chunk; drops the oldest chunks beyond the byte budget.
    pub fn append(&self, stream: StreamKind, text: String, bytes: Bytes) -> u64 {
        let seq = {
            let mut st = self.lock();
            let seq = st.next_seq;
            st.next_seq += 1;
            st.bytes += bytes.len().max(text.len());
            st.chunks.push_back(OutputChunk {
                seq,
                stream,
                text,
                bytes,
            });
            while st.bytes > BUFFER_BYTES && st.chunks.len() > 1 {
                if let Some(old) = st.chunks.pop_front() {
                    st.bytes -= old.bytes.len().max(old.text.len());
                }
            }
            seq
        };
        self.changed.send_replace(seq + 1);
        seq
    }

    /// A log mirroring another replica's, whose followers start at
    /// `start_seq` (chunks before it are not wanted, not lost).
    pub fn relay(sandbox_id: &str, tenant_id: &str, owner_id: &str, start_seq: u64) -> OutputLog {
        let log = OutputLog::new(sandbox_id, tenant_id, owner_id);
        log.lock().next_seq = start_seq;
        log
    }

    /// Appends a chunk numbered by its source (a relayed log).
    pub fn append_at(&self, seq: u64, stream: StreamKind, text: String, bytes: Bytes) {
        {
            let mut st = self.lock();
            if seq < st.next_seq {
                return;
            }
            st.next_seq = seq;
        }
        self.append(stream, text, bytes);
    }

    /// Records that the source dropped chunks before `seq` (a relayed log):
    /// followers are told they lost them.
    pub fn skip_to(&self, seq: u64) {
        let next = {
            let mut st = self.lock();
            if seq <= st.next_seq {
                return;
            }
            st.next_seq = seq;
            st.chunks.clear();
            st.bytes = 0;
            seq
        };
        self.changed.send_replace(next);
    }

    /// Records the end; followers receive it after the last chunk.
    pub fn finish(&self, end: OutputEnd) {
        let next = {
            let mut st = self.lock();
            st.end = Some(end);
            st.next_seq
        };
        self.changed.send_replace(next + 1);
    }

    /// A follower starting at `from_seq` (0 = from the beginning).
    pub fn follow(self: &Arc<Self>, from_seq: u64) -> OutputFollower {
        OutputFollower {
            log: self.clone(),
            cursor: from_seq,
            pending: VecDeque::new(),
            done: false,
            changed: self.changed.subscribe(),
            _feed: None,
        }
    }

    /// A follower that owns the task feeding this log (a relay from
    /// another replica): dropping the follower stops it.
    pub fn follow_with(
        self: &Arc<Self>,
        from_seq: u64,
        feed: tokio_util::task::AbortOnDropHandle<()>,
    ) -> OutputFollower {
        let mut follower = self.follow(from_seq);
        follower._feed = Some(feed);
        follower
    }
}

/// An output event on the wire between replicas.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireOutput {
    Chunk {
        seq: u64,
        stream: StreamKind,
        text: String,
        /// The raw bytes, base64.
        bytes: String,
    },
    Truncated {
        from_seq: u64,
        to_seq: u64,
    },
    End {
        exit_code: Option<i32>,
        duration_ms: u64,
        timed_out: bool,
        error: Option<String>,
    },
    /// Nothing to say yet: sent while the command is quiet, so the
    /// follower can tell a quiet command from a replica gone silent.
    KeepAlive,
}

impl From<OutputEvent> for WireOutput {
    fn from(event: OutputEvent) -> Self {
        use base64::Engine;
        match event {
            OutputEvent::Chunk(c) => WireOutput::Chunk {
                seq: c.seq,
                stream: c.stream,
                text: c.text,
                bytes: base64::engine::general_purpose::STANDARD.encode(&c.bytes),
            },
            OutputEvent::Truncated { from_seq, to_seq } => {
                WireOutput::Truncated { from_seq, to_seq }
            }
            OutputEvent::End(end) => WireOutput::End {
                exit_code: end.exit_code,
                duration_ms: u64::try_from(end.duration.as_millis()).unwrap_or(u64::MAX),
                timed_out: end.timed_out,
                error: end.error,
            },
        }
    }
}

/// Reads one execution's output from a cursor.
pub struct OutputFollower {
    log: Arc<OutputLog>,
    cursor: u64,
    pending: VecDeque<OutputEvent>,
    done: bool,
    changed: watch::Receiver<u64>,
    /// The task feeding a relayed log; aborted with the follower.
    _feed: Option<tokio_util::task::AbortOnDropHandle<()>>,
}

impl OutputFollower {
    /// Moves everything readable now into `pending`. Returns whether
    /// anything was found.
    fn collect(&mut self) -> bool {
        let st = self.log.lock();
        let first = st.chunks.front().map_or(st.next_seq, |c| c.seq);
        if self.cursor < first {
            self.pending.push_back(OutputEvent::Truncated {
                from_seq: self.cursor,
                to_seq: first,
            });
            self.cursor = first;
        }
        let skip = usize::try_from(self.cursor - first).unwrap_or(usize::MAX);
        for chunk in st.chunks.iter().skip(skip) {
            self.pending.push_back(OutputEvent::Chunk(chunk.clone()));
            self.cursor = chunk.seq + 1;
        }
        if self.cursor >= st.next_seq
            && let Some(end) = &st.end
        {
            self.pending.push_back(OutputEvent::End(end.clone()));
            self.done = true;
        }
        !self.pending.is_empty()
    }

    /// The next event, waiting for the command if needed; `None` after the
    /// end event.
    pub async fn next(&mut self) -> Option<OutputEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            self.changed.mark_unchanged();
            if self.collect() {
                continue;
            }
            if self.changed.changed().await.is_err() {
                // The log was dropped without an end (cannot happen while
                // we hold an Arc to it, but never hang on it).
                return None;
            }
        }
    }
}

/// Every live execution's output, by execution id.
#[derive(Clone, Default)]
pub struct OutputHub {
    logs: Arc<Mutex<HashMap<String, Arc<OutputLog>>>>,
}

impl OutputHub {
    /// Registers a new execution's output.
    pub fn open(
        &self,
        execution_id: &str,
        sandbox_id: &str,
        tenant_id: &str,
        owner_id: &str,
    ) -> Arc<OutputLog> {
        let log = Arc::new(OutputLog::new(sandbox_id, tenant_id, owner_id));
        if let Ok(mut logs) = self.logs.lock() {
            logs.insert(execution_id.to_string(), log.clone());
        }
        log
    }

    /// The output of a running or recently finished execution.
    pub fn get(&self, execution_id: &str) -> Option<Arc<OutputLog>> {
        self.logs.lock().ok()?.get(execution_id).cloned()
    }

    /// Forgets a finished execution after a grace period for late followers.
    pub fn retire(&self, execution_id: String) {
        let logs = self.logs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(KEEP_FINISHED).await;
            if let Ok(mut logs) = logs.lock() {
                logs.remove(&execution_id);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(e: &OutputEvent) -> String {
        match e {
            OutputEvent::Chunk(c) => format!("{}:{}", c.seq, c.text),
            OutputEvent::Truncated { from_seq, to_seq } => {
                format!("truncated {from_seq}..{to_seq}")
            }
            OutputEvent::End(end) => format!("end {:?}", end.exit_code),
        }
    }

    fn end() -> OutputEnd {
        OutputEnd {
            exit_code: Some(0),
            duration: Duration::ZERO,
            timed_out: false,
            error: None,
        }
    }

    #[tokio::test]
    async fn late_joiner_and_resume_have_no_gap_and_no_duplicate() {
        let hub = OutputHub::default();
        let log = hub.open("ex-1", "sb-1", "t", "o");
        log.append(StreamKind::Stdout, "a".into(), Bytes::from("a"));
        log.append(StreamKind::Stderr, "b".into(), Bytes::from("b"));
        let mut late = log.follow(0);
        let mut resumed = log.follow(1);
        log.append(StreamKind::Stdout, "c".into(), Bytes::from("c"));
        log.finish(end());
        let mut seen = Vec::new();
        while let Some(e) = late.next().await {
            seen.push(text(&e));
        }
        assert_eq!(seen, ["0:a", "1:b", "2:c", "end Some(0)"]);
        let mut seen = Vec::new();
        while let Some(e) = resumed.next().await {
            seen.push(text(&e));
        }
        assert_eq!(seen, ["1:b", "2:c", "end Some(0)"]);
    }

    #[tokio::test]
    async fn a_follower_behind_the_buffer_is_told_what_it_lost() {
        let hub = OutputHub::default();
        let log = hub.open("ex-2", "sb-1", "t", "o");
        let mut slow = log.follow(0);
        let big = "x".repeat(BUFFER_BYTES / 2 + 1);
        for _ in 0..4 {
            log.append(StreamKind::Stdout, big.clone(), Bytes::new());
        }
        log.finish(end());
        let first = slow.next().await.map(|e| text(&e));
        assert_eq!(first.as_deref(), Some("truncated 0..3"));
        assert!(matches!(slow.next().await, Some(OutputEvent::Chunk(c)) if c.seq == 3));
        assert!(matches!(slow.next().await, Some(OutputEvent::End(_))));
        assert!(slow.next().await.is_none());
    }

    #[tokio::test]
    async fn followers_wake_for_live_output() {
        let hub = OutputHub::default();
        let log = hub.open("ex-3", "sb-1", "t", "o");
        let mut a = log.follow(0);
        let mut b = log.follow(0);
        let writer = {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    log.append(StreamKind::Stdout, i.to_string(), Bytes::new());
                    tokio::task::yield_now().await;
                }
                log.finish(end());
            })
        };
        let (mut na, mut nb) = (0, 0);
        while let Some(e) = a.next().await {
            if let OutputEvent::Chunk(c) = e {
                assert_eq!(c.seq, na);
                na += 1;
            }
        }
        while let Some(e) = b.next().await {
            if let OutputEvent::Chunk(c) = e {
                assert_eq!(c.seq, nb);
                nb += 1;
            }
        }
        assert_eq!((na, nb), (50, 50));
        assert!(writer.await.is_ok());
    }
}
