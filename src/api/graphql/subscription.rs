//! Subscription: live output and events over WebSockets.

use async_graphql::{Context, ID, Subscription};
use futures::{Stream, StreamExt};

use super::ctx;
use super::errors::GqlResult;
use super::mutation::ExecCommandInput;
use super::types::{AuditEvent, ExecEvent, SandboxEvent};
use crate::events::Event;
use crate::service::{Followed, OutputFollower};

fn output_stream(follower: OutputFollower) -> impl Stream<Item = ExecEvent> {
    futures::stream::unfold(follower, |mut f| async move {
        f.next().await.map(|event| (ExecEvent::from(event), f))
    })
}

/// The root of all subscriptions.
pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// An execution's output from `fromSeq`: ordered chunks, then one
    /// ExecExit. Late joiners and reconnects replay what they missed.
    async fn exec_output(
        &self,
        cx: &Context<'_>,
        execution_id: ID,
        #[graphql(default = 0)] from_seq: u64,
    ) -> async_graphql::Result<impl Stream<Item = ExecEvent>> {
        let (service, caller) = ctx(cx)?;
        let follower = service
            .follow_execution(caller, &execution_id, from_seq)
            .await
            .gql()?;
        Ok(output_stream(follower))
    }

    /// A terminal session's output (its scrollback first), then its end.
    /// Attaching takes the session over from any other client.
    async fn terminal(
        &self,
        cx: &Context<'_>,
        sandbox_id: ID,
        session_id: ID,
    ) -> async_graphql::Result<impl Stream<Item = super::terminal::TerminalEvent>> {
        let (service, caller) = ctx(cx)?;
        let attachment = service
            .attach_terminal(caller, &sandbox_id, &session_id)
            .await
            .gql()?;
        Ok(futures::stream::unfold(attachment, |mut a| async move {
            let taken_over = a.taken_over.clone();
            tokio::select! {
                next = a.next() => next.map(|o| (super::terminal::TerminalEvent::from(o), a)),
                // Another client took the session over: this one ends.
                () = taken_over.cancelled() => None,
            }
        }))
    }

    /// Starts a command and follows its output in one operation.
    async fn exec_stream(
        &self,
        cx: &Context<'_>,
        sandbox_id: ID,
        input: ExecCommandInput,
    ) -> async_graphql::Result<impl Stream<Item = ExecEvent>> {
        let (service, caller) = ctx(cx)?;
        let (_, follower) = service
            .start_and_follow(caller, &sandbox_id, input.into())
            .await
            .gql()?;
        Ok(output_stream(follower))
    }

    /// Sandbox state changes (of one sandbox, or all the caller may see),
    /// each pushed as soon as it is persisted.
    async fn sandbox_events(
        &self,
        cx: &Context<'_>,
        sandbox_id: Option<ID>,
    ) -> async_graphql::Result<impl Stream<Item = SandboxEvent>> {
        let (service, caller) = ctx(cx)?;
        let events = service
            .follow_sandbox_states(caller, sandbox_id.as_ref().map(|id| id.as_str()))
            .await
            .gql()?;
        Ok(events.filter_map(|event| {
            std::future::ready(match event {
                Event::SandboxState {
                    sandbox_id,
                    owner_id,
                    state,
                    reason,
                    at,
                    ..
                } => Some(SandboxEvent {
                    sandbox_id: ID(sandbox_id),
                    owner_id,
                    state: state.into(),
                    reason,
                    at,
                }),
                _ => None,
            })
        }))
    }

    /// Audit events as they are written.
    async fn audit_events(
        &self,
        cx: &Context<'_>,
    ) -> async_graphql::Result<impl Stream<Item = AuditEvent>> {
        let (service, caller) = ctx(cx)?;
        Ok(service.follow_events(caller).filter_map(|item| {
            std::future::ready(match item {
                Followed::Event(Event::Audit(record)) => Some(AuditEvent(record)),
                _ => None,
            })
        }))
    }
}
