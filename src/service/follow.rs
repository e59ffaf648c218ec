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
use crate::events::Event;
use crate::lifecycle::ExecStatus;

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
            // Audit events follow the one audit read rule.
            Ok(Event::Audit(record))
                if super::audit::sees_audit_event(&caller, &record.tenant_id, &record.actor) =>
            {
                Some(Followed::Event(Event::Audit(record)))
            }
            Ok(Event::Audit(_)) => None,
            Ok(event) if caller.can_access(event.owner().0, event.owner().1) => {
                Some(Followed::Event(event))
            }
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(n)) => Some(Followed::Lagged(n)),
        })
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
