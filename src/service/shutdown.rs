//! Graceful shutdown: stop taking work, let running commands finish up to a
//! deadline, end every stream with a final event, and leave sandboxes for
//! the next start to adopt (or destroy them when configured to).

use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use super::{Error, Result, Service};
use crate::auth::Caller;
use crate::lifecycle::SandboxState;
use crate::store::SandboxFilter;

/// The shutdown phases, each a one-way switch.
#[derive(Debug, Default)]
pub(super) struct ShutdownState {
    /// Set first: new spawns and commands are refused, `/ready` says 503.
    draining: CancellationToken,
    /// Set at the deadline: commands still running are cut off and
    /// recorded as `interrupted`.
    cutoff: CancellationToken,
    /// Set last: event streams end and WebSockets close.
    streams_closed: CancellationToken,
    /// One token per running command (taken before it is admitted,
    /// dropped when its task ends).
    pub(super) execs: TaskTracker,
    /// Every open long-lived stream (WebSocket sessions), so that shutdown
    /// can wait for their goodbyes.
    streams: TaskTracker,
}

/// What a drain found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Commands that finished within the deadline.
    pub finished: usize,
    /// Commands cut off at the deadline.
    pub interrupted: usize,
}

impl Service {
    /// Starts shutting down: from now on spawns and commands are refused
    /// with UNAVAILABLE and readiness fails. Idempotent.
    pub fn begin_shutdown(&self) {
        self.inner.shutdown.draining.cancel();
    }

    /// Whether [`Service::begin_shutdown`] was called.
    pub fn is_draining(&self) -> bool {
        self.inner.shutdown.draining.is_cancelled()
    }

    /// Resolves when shutdown begins.
    pub fn draining(&self) -> WaitForCancellationFutureOwned {
        self.inner.shutdown.draining.clone().cancelled_owned()
    }

    /// Resolves when streams must end (the last phase of a shutdown).
    pub fn streams_closed(&self) -> WaitForCancellationFutureOwned {
        self.inner.shutdown.streams_closed.clone().cancelled_owned()
    }

    /// Long-lived streams open now (each holds a [`Service::stream_guard`]).
    pub(super) fn open_streams(&self) -> usize {
        self.inner.shutdown.streams.len()
    }

    /// Marks a long-lived stream as open until the guard is dropped; a
    /// shutdown waits (briefly) for every guard after ending the streams.
    pub fn stream_guard(&self) -> tokio_util::task::task_tracker::TaskTrackerToken {
        self.inner.shutdown.streams.token()
    }

    /// Resolves when running commands must be cut off.
    pub(super) fn exec_cutoff(&self) -> WaitForCancellationFutureOwned {
        self.inner.shutdown.cutoff.clone().cancelled_owned()
    }

    /// Refuses new work once shutdown has begun.
    pub(super) fn refuse_if_draining(&self) -> Result<()> {
        if self.is_draining() {
            Err(Error::Unavailable(
                "the server is shutting down; retry against another instance or after it restarts"
                    .into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Waits up to `deadline` for running commands, cuts off the rest
    /// (each ends `interrupted`, with a final event to its followers), then
    /// ends every event stream.
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        self.begin_shutdown();
        let tracker = &self.inner.shutdown.execs;
        tracker.close();
        let running = tracker.len();
        let mut report = DrainReport {
            finished: running,
            interrupted: 0,
        };
        if running > 0 {
            tracing::info!(running, deadline = ?deadline, "waiting for running commands");
        }
        if tokio::time::timeout(deadline, tracker.wait())
            .await
            .is_err()
        {
            report.interrupted = tracker.len();
            report.finished = running.saturating_sub(report.interrupted);
            tracing::warn!(
                count = report.interrupted,
                "shutdown deadline reached: interrupting commands"
            );
            self.inner.shutdown.cutoff.cancel();
            // Recording an interruption is a store write per command.
            if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
                .await
                .is_err()
            {
                tracing::error!("commands did not record their interruption in time");
            }
        }
        self.inner.shutdown.streams_closed.cancel();
        let streams = &self.inner.shutdown.streams;
        streams.close();
        if tokio::time::timeout(Duration::from_secs(3), streams.wait())
            .await
            .is_err()
        {
            tracing::warn!(open = streams.len(), "streams did not close in time");
        }
        report
    }

    /// Destroys every live sandbox of the workers in this process (for
    /// `lifecycle.destroy_on_shutdown`; remote workers' sandboxes outlive
    /// the control plane). Returns how many were destroyed.
    pub async fn destroy_all_for_shutdown(&self) -> Result<usize> {
        let mut records = Vec::new();
        for worker in self.scheduler().in_process_workers() {
            records.extend(
                self.store()
                    .list_sandboxes(&SandboxFilter {
                        tenant_id: None,
                        owner_id: None,
                        states: Some(vec![
                            SandboxState::Running,
                            SandboxState::Unhealthy,
                            SandboxState::Expired,
                            SandboxState::Error,
                        ]),
                        worker_id: Some(worker.id().to_string()),
                        // Warm ones go with their pools (`drain_pools`).
                        with_pooled: false,
                    })
                    .await?,
            );
        }
        let mut destroyed = 0;
        for record in records {
            let id = record.id.clone();
            let reason = Some("destroyed at server shutdown".to_string());
            let audit = super::lifecycle::DestroyAudit {
                caller: &Caller::system(),
                action: super::AuditAction::SandboxDestroy,
            };
            match self.destroy_record(record, reason, audit).await {
                Ok(()) => destroyed += 1,
                Err(e) => tracing::warn!(sandbox = %id, error = %e, "destroy at shutdown failed"),
            }
        }
        Ok(destroyed)
    }
}
