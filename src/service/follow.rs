//! Following things as they happen: an execution's output and the event
//! bus, filtered to what the caller may see.

use std::sync::Arc;

use futures::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::output::{OutputEnd, OutputFollower, OutputLog};
use super::{Error, ExecRequest, Result, Service};
use crate::auth::Caller;
use crate::events::{Event, EventId, Journaled};
use crate::lifecycle::ExecStatus;

/// Whether `caller` may see `event`: audit events by the one audit read
/// rule, the others when the caller may access their owner's resources.
fn sees_event(caller: &Caller, event: &Event) -> bool {
    match event {
        Event::Audit(record) => {
            super::audit::sees_audit_event(caller, &record.tenant_id, &record.actor)
        }
        event => {
            let (tenant, owner) = event.owner();
            caller.can_access(tenant, owner)
        }
    }
}

/// What a reader of events with ids receives.
// Items are passed along one at a time, never stored: boxing the common
// variant would only add an allocation per event and reader.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Streamed {
    Event {
        id: EventId,
        event: Event,
    },
    /// Events are missing here: this reader fell behind, or it resumed from
    /// an id whose events are gone. How many is not said: the count would
    /// be of every tenant's events, which is not the caller's to know.
    Gap,
}

/// What an event subscriber receives.
#[derive(Debug, Clone)]
pub enum Followed {
    Event(Event),
    /// The subscriber fell behind and `n` events were dropped for it.
    Lagged(u64),
}

impl Service {
    /// Follows an execution's output from `from_seq`. Works while it runs
    /// and for a while after; an older execution replays its stored tails.
    pub async fn follow_execution(
        &self,
        caller: &Caller,
        execution_id: &str,
        from_seq: u64,
    ) -> Result<OutputFollower> {
        if let Some(log) = self.inner.outputs.get(execution_id) {
            if !caller.can_access(&log.tenant_id, &log.owner_id) {
                return Err(Error::NotFound(format!(
                    "execution {execution_id} not found"
                )));
            }
            return Ok(log.follow(from_seq));
        }
        let record = match self.store().get_execution(execution_id).await? {
            Some(m) if caller.can_access(&m.tenant_id, &m.owner_id) => m,
            _ => {
                return Err(Error::NotFound(format!(
                    "execution {execution_id} not found"
                )));
            }
        };
        if ExecStatus::from_stored(&record.status) == ExecStatus::Running {
            if record.replica_id != self.replica_id() {
                // Running on another replica: follow it there.
                return self.follow_on_replica(&record, from_seq).await;
            }
            // Ours, yet not in the hub: it was interrupted.
            return Err(Error::Conflict(format!(
                "execution {execution_id} is not running on this server"
            )));
        }
        Ok(self.replay(record, from_seq))
    }

    /// A finished execution's output, replayed from its stored tails.
    pub(super) fn replay(&self, record: entity::execution::Model, from_seq: u64) -> OutputFollower {
        let execution = super::Execution::from(record);
        let log = Arc::new(OutputLog::detached(
            &execution.sandbox_id,
            &execution.tenant_id,
            &execution.owner_id,
        ));
        for (stream, tail) in [
            (crate::provider::StreamKind::Stdout, &execution.stdout_tail),
            (crate::provider::StreamKind::Stderr, &execution.stderr_tail),
        ] {
            if !tail.is_empty() {
                log.append(
                    stream,
                    tail.clone(),
                    bytes::Bytes::from(tail.clone().into_bytes()),
                );
            }
        }
        log.finish(OutputEnd {
            exit_code: execution.exit_code,
            duration: execution.duration.unwrap_or_default(),
            timed_out: execution.status == ExecStatus::Timeout,
            error: execution.error.clone(),
        });
        log.follow(from_seq)
    }

    /// Starts a command and follows its output from the first chunk.
    pub async fn start_and_follow(
        &self,
        caller: &Caller,
        sandbox_id: &str,
        req: ExecRequest,
    ) -> Result<(String, OutputFollower)> {
        let running = self.start_exec(caller, sandbox_id, req).await?;
        let follower = self
            .follow_execution(caller, &running.execution_id, 0)
            .await?;
        // Nobody reads the direct channel; dropping it never blocks the command.
        drop(running.output);
        Ok((running.execution_id, follower))
    }

    /// Every event the caller may see, as it is published. The stream ends
    /// when the server shuts down.
    pub fn follow_events(&self, caller: &Caller) -> impl Stream<Item = Followed> + Send + use<> {
        let caller = caller.clone();
        let events = BroadcastStream::new(self.events().subscribe());
        let events = futures::StreamExt::take_until(events, self.streams_closed());
        events.filter_map(move |item| match item {
            Ok(j) if sees_event(&caller, &j.event) => Some(Followed::Event(j.event)),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(n)) => Some(Followed::Lagged(n)),
        })
    }

    /// [`Service::follow_events`] with the id of each event, resuming after
    /// `after` (a client's `Last-Event-ID`) from the bus's journal: what
    /// the caller missed while away comes first, then what follows, with
    /// nothing lost or repeated in between; where events are gone (the id
    /// is older than the journal, or from another server run or replica),
    /// a [`Streamed::Gap`] says so. Also a gap: events this reader fell
    /// behind on. A malformed id is a BAD_REQUEST.
    pub fn follow_events_from(
        &self,
        caller: &Caller,
        after: Option<&str>,
    ) -> Result<impl Stream<Item = Streamed> + Send + use<>> {
        // Long-lived, like a WebSocket: each credential holds at most
        // `server.max_websockets_per_credential` of them at once.
        let key = caller
            .credential
            .clone()
            .unwrap_or_else(|| format!("open:{}", caller.owner_id));
        let slot = self
            .inner
            .event_streams
            .try_hold(&key)
            .ok_or_else(|| Error::ResourceLimit {
                message: "this credential holds as many open event streams as it may \
                          (server.max_websockets_per_credential)"
                    .into(),
                retry_after_secs: 1,
            })?;
        let open = self.stream_guard();
        let bus = self.events().clone();
        let (replay, live, gap) = match after.filter(|a| !a.is_empty()) {
            Some(text) => {
                let id = EventId::parse(text).ok_or_else(|| {
                    Error::BadRequest(format!(
                        "Last-Event-ID {:?} is not an id this server gave",
                        text.chars().take(64).collect::<String>()
                    ))
                })?;
                let resumed = bus.resume(&id);
                (resumed.replay, resumed.live, resumed.gap)
            }
            None => (Vec::new(), bus.subscribe(), false),
        };
        let caller = caller.clone();
        // Live events the replay already held are skipped.
        let mut last = replay.last().map(|j| j.seq).unwrap_or(0);
        let head = gap.then_some(Streamed::Gap);
        let visible = {
            let caller = caller.clone();
            move |j: Journaled| {
                sees_event(&caller, &j.event).then(|| Streamed::Event {
                    id: bus.id_of(j.seq),
                    event: j.event,
                })
            }
        };
        let visible_live = visible.clone();
        let replayed = replay.into_iter().filter_map(visible);
        let live = BroadcastStream::new(live).filter_map(move |item| match item {
            Ok(j) if j.seq <= last => None,
            Ok(j) => {
                last = j.seq;
                visible_live(j)
            }
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                tracing::debug!(missed = n, "an event stream fell behind");
                Some(Streamed::Gap)
            }
        });
        let all = tokio_stream::iter(head.into_iter().chain(replayed))
            .chain(live)
            .map(move |item| {
                // The slot is given back when the stream ends, and the
                // stream counts as open (metrics, shutdown) until then.
                let _held = (&slot, &open);
                item
            });
        Ok(futures::StreamExt::take_until(all, self.streams_closed()))
    }

    /// State changes of one sandbox (which must be visible to the caller:
    /// an unknown or foreign id is NOT_FOUND, not a silent stream) or of
    /// every sandbox the caller may see.
    pub async fn follow_sandbox_states(
        &self,
        caller: &Caller,
        sandbox_id: Option<&str>,
    ) -> Result<impl Stream<Item = Event> + Send + use<>> {
        if let Some(id) = sandbox_id {
            self.visible_sandbox(caller, id).await?;
        }
        let want = sandbox_id.map(str::to_string);
        Ok(self
            .follow_events(caller)
            .filter_map(move |item| match item {
                Followed::Event(event @ Event::SandboxState { .. }) => {
                    let Event::SandboxState { sandbox_id, .. } = &event else {
                        return None;
                    };
                    want.as_ref()
                        .is_none_or(|w| w == sandbox_id)
                        .then_some(event)
                }
                Followed::Lagged(n) => {
                    tracing::warn!(missed = n, "sandbox state subscriber lagged");
                    None
                }
                Followed::Event(_) => None,
            }))
    }
}
