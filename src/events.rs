//! The event bus: every state change is published here after it is
//! persisted. REST's `/events`, GraphQL subscriptions and tests all read the
//! same stream.

use chrono::{DateTime, Utc};
use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{broadcast, mpsc};

use crate::lifecycle::SandboxState;

/// Something that happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Event {
    /// A sandbox entered a new state.
    #[serde(rename = "sandbox.state")]
    SandboxState {
        sandbox_id: String,
        owner_id: String,
        tenant_id: String,
        state: SandboxState,
        reason: Option<String>,
        at: DateTime<Utc>,
    },
    /// A command started or ended.
    #[serde(rename = "exec")]
    Exec {
        execution_id: String,
        sandbox_id: String,
        owner_id: String,
        tenant_id: String,
        /// started, completed, timeout or failed.
        status: Cow<'static, str>,
        exit_code: Option<i32>,
        at: DateTime<Utc>,
    },
    /// An audit event was written.
    #[serde(rename = "audit")]
    Audit(AuditRecord),
}

/// An audit event as published on the bus.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    pub id: String,
    pub actor: String,
    pub tenant_id: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub request_id: String,
    pub detail: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl From<entity::audit_event::Model> for AuditRecord {
    fn from(m: entity::audit_event::Model) -> Self {
        AuditRecord {
            id: m.id,
            actor: m.actor,
            tenant_id: m.tenant_id,
            action: m.action,
            target: m.target,
            outcome: m.outcome,
            request_id: m.request_id,
            detail: m.detail,
            created_at: m.created_at,
        }
    }
}

impl Event {
    /// The owner whose resources the event concerns: (tenant, owner id).
    pub fn owner(&self) -> (&str, &str) {
        match self {
            Event::SandboxState {
                tenant_id,
                owner_id,
                ..
            }
            | Event::Exec {
                tenant_id,
                owner_id,
                ..
            } => (tenant_id, owner_id),
            Event::Audit(event) => (&event.tenant_id, &event.actor),
        }
    }
}

/// A broadcast channel of [`Event`]s. Slow readers lose old events (and are
/// told so by `RecvError::Lagged`) rather than slowing publishers. On a
/// database several replicas share, what is published here also goes to
/// an outbox the cluster relays to the other replicas, whose events come
/// back through [`EventBus::deliver`].
#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<Event>,
    outbox: Option<mpsc::Sender<Event>>,
    dropped: Arc<AtomicU64>,
}

impl EventBus {
    pub fn new(capacity: usize) -> EventBus {
        let (sender, _) = broadcast::channel(capacity);
        EventBus {
            sender,
            outbox: None,
            dropped: Arc::default(),
        }
    }

    /// A bus whose events also go to other replicas: the receiver is the
    /// outbox, holding at most `outbox` events.
    pub fn clustered(capacity: usize, outbox: usize) -> (EventBus, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(outbox);
        let mut bus = EventBus::new(capacity);
        bus.outbox = Some(tx);
        (bus, rx)
    }

    /// Publishes an event; having no subscribers is fine.
    pub fn publish(&self, event: Event) {
        if let Some(outbox) = &self.outbox
            && outbox.try_send(event.clone()).is_err()
        {
            // Never block a publisher on the database: count and move on.
            let n = self.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(100) {
                tracing::warn!(
                    dropped = n + 1,
                    "event outbox to other replicas is full; events dropped"
                );
            }
        }
        self.deliver(event);
    }

    /// Hands an event from another replica to this replica's subscribers.
    pub fn deliver(&self, event: Event) {
        // An error only means nobody is subscribed right now.
        let _ignored_no_subscribers = self.sender.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }
}
