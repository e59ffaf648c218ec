//! The event bus: every state change is published here after it is
//! persisted. REST's `/events`, GraphQL subscriptions and tests all read the
//! same stream.

use chrono::{DateTime, Utc};
use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub id: String,
    pub actor: String,
    pub tenant_id: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub request_id: String,
    #[schema(required = true)]
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
    /// The event's name on the wire (server-sent events), the original's:
    /// `sandbox.created`, `sandbox.running`, `sandbox.destroyed`,
    /// `sandbox.error` (and `sandbox.<state>` for the other states),
    /// `exec.started`, `exec.completed`, `exec.failed`, `exec.timeout`,
    /// `audit`.
    pub fn name(&self) -> Cow<'static, str> {
        match self {
            Event::SandboxState { state, .. } => match state {
                SandboxState::Creating => Cow::Borrowed("sandbox.created"),
                other => Cow::Owned(format!("sandbox.{}", other.as_str())),
            },
            Event::Exec { status, .. } => Cow::Owned(format!("exec.{status}")),
            Event::Audit(_) => Cow::Borrowed("audit"),
        }
    }

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

/// An event with its number in this bus's journal: consecutive, from 1,
/// in the order subscribers receive them.
#[derive(Debug, Clone)]
pub struct Journaled {
    pub seq: u64,
    pub event: Event,
}

/// Where a reader of the journal resumes: after event `seq` of the bus
/// whose epoch is `epoch` (the id given to each server-sent event,
/// `<epoch>-<seq>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventId {
    pub epoch: String,
    pub seq: u64,
}

impl EventId {
    /// Parses `<epoch>-<seq>`; `None` for anything else.
    pub fn parse(text: &str) -> Option<EventId> {
        let (epoch, seq) = text.rsplit_once('-')?;
        let well_formed = !epoch.is_empty()
            && epoch.len() <= 32
            && epoch.bytes().all(|b| b.is_ascii_alphanumeric());
        let seq = seq.parse().ok()?;
        well_formed.then(|| EventId {
            epoch: epoch.to_string(),
            seq,
        })
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.epoch, self.seq)
    }
}

/// What a reader resuming from an [`EventId`] gets.
#[derive(Debug)]
pub struct Resumed {
    /// The journal's events after the id, oldest first.
    pub replay: Vec<Journaled>,
    /// Events that follow the replay.
    pub live: broadcast::Receiver<Journaled>,
    /// Whether events between the id and the replay are gone: the id is
    /// older than the journal holds, or from another epoch (an earlier run
    /// of the server, another replica).
    pub gap: bool,
}

/// The last events delivered, for readers that resume.
struct Journal {
    events: VecDeque<Journaled>,
    capacity: usize,
    next_seq: u64,
}

/// A broadcast channel of [`Event`]s. Slow readers lose old events (and are
/// told so by `RecvError::Lagged`) rather than slowing publishers. The last
/// `capacity` events stay in a journal, numbered, so that a reader that
/// went away resumes without a gap ([`EventBus::resume`]). On a
/// database several replicas share, what is published here also goes to
/// an outbox the cluster relays to the other replicas, whose events come
/// back through [`EventBus::deliver`].
#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<Journaled>,
    journal: Arc<Mutex<Journal>>,
    /// Names this bus's numbering: ids from another run or replica are
    /// recognised as such.
    epoch: Arc<str>,
    outbox: Option<mpsc::Sender<Event>>,
    dropped: Arc<AtomicU64>,
}

impl EventBus {
    pub fn new(capacity: usize) -> EventBus {
        let capacity = capacity.max(1);
        let (sender, _) = broadcast::channel(capacity);
        let epoch = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        EventBus {
            sender,
            journal: Arc::new(Mutex::new(Journal {
                events: VecDeque::with_capacity(capacity),
                capacity,
                next_seq: 1,
            })),
            epoch: Arc::from(epoch),
            outbox: None,
            dropped: Arc::default(),
        }
    }

    /// The id of event `seq` of this bus.
    pub fn id_of(&self, seq: u64) -> EventId {
        EventId {
            epoch: self.epoch.to_string(),
            seq,
        }
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
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
        // Numbered, journaled and sent under one lock: the journal's order
        // is the order every subscriber receives.
        let mut journal = self.journal();
        let entry = Journaled {
            seq: journal.next_seq,
            event,
        };
        journal.next_seq += 1;
        if journal.events.len() == journal.capacity {
            journal.events.pop_front();
        }
        journal.events.push_back(entry.clone());
        // An error only means nobody is subscribed right now.
        let _ignored_no_subscribers = self.sender.send(entry);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Journaled> {
        self.sender.subscribe()
    }

    /// Events after `after` (from the journal) and those that follow
    /// (live), with no event missed or repeated in between.
    pub fn resume(&self, after: &EventId) -> Resumed {
        let journal = self.journal();
        let live = self.sender.subscribe();
        if after.epoch != *self.epoch || after.seq >= journal.next_seq {
            return Resumed {
                replay: journal.events.iter().cloned().collect(),
                live,
                gap: true,
            };
        }
        let oldest = journal.events.front().map_or(journal.next_seq, |e| e.seq);
        Resumed {
            replay: journal
                .events
                .iter()
                .filter(|e| e.seq > after.seq)
                .cloned()
                .collect(),
            live,
            gap: oldest > after.seq + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(n: i32) -> Event {
        Event::Exec {
            execution_id: format!("ex-{n}"),
            sandbox_id: "sb-1".into(),
            owner_id: "o".into(),
            tenant_id: "t".into(),
            status: "completed".into(),
            exit_code: Some(n),
            at: Utc::now(),
        }
    }

    fn codes(events: &[Journaled]) -> Vec<Option<i32>> {
        events
            .iter()
            .map(|j| match &j.event {
                Event::Exec { exit_code, .. } => *exit_code,
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_reader_resumes_after_its_last_event_without_a_gap() {
        let bus = EventBus::new(4);
        for n in 1..=3 {
            bus.publish(exec(n));
        }
        let mut resumed = bus.resume(&bus.id_of(1));
        assert!(!resumed.gap);
        assert_eq!(codes(&resumed.replay), [Some(2), Some(3)]);
        bus.publish(exec(4));
        let next = resumed.live.try_recv().unwrap();
        assert_eq!((next.seq, codes(&[next])), (4, vec![Some(4)]));
        // Up to date: nothing to replay, nothing missed.
        let resumed = bus.resume(&bus.id_of(4));
        assert!(!resumed.gap && resumed.replay.is_empty());
    }

    #[test]
    fn ids_older_than_the_journal_or_from_elsewhere_are_gaps() {
        let bus = EventBus::new(2);
        for n in 1..=5 {
            bus.publish(exec(n));
        }
        let old = bus.resume(&bus.id_of(1));
        assert!(old.gap, "events 2 and 3 are gone");
        assert_eq!(codes(&old.replay), [Some(4), Some(5)]);
        let just_kept = bus.resume(&bus.id_of(3));
        assert!(!just_kept.gap);
        let other = EventBus::new(2);
        let foreign = bus.resume(&other.id_of(4));
        assert!(foreign.gap, "another bus's numbering means nothing here");
        let future = bus.resume(&bus.id_of(99));
        assert!(future.gap);
    }

    #[test]
    fn event_ids_parse_only_in_their_own_form() {
        let id = EventId::parse("a1b2c3-42").unwrap();
        assert_eq!((id.epoch.as_str(), id.seq), ("a1b2c3", 42));
        assert_eq!(id.to_string(), "a1b2c3-42");
        for bad in [
            "",
            "42",
            "-1",
            "a1-",
            "a1--1",
            "a/b-1",
            "a1-1x",
            &"a".repeat(40),
        ] {
            assert!(EventId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn names_are_the_originals() {
        let state = |state| Event::SandboxState {
            sandbox_id: "sb".into(),
            owner_id: "o".into(),
            tenant_id: "t".into(),
            state,
            reason: None,
            at: Utc::now(),
        };
        assert_eq!(state(SandboxState::Creating).name(), "sandbox.created");
        assert_eq!(state(SandboxState::Running).name(), "sandbox.running");
        assert_eq!(state(SandboxState::Destroyed).name(), "sandbox.destroyed");
        assert_eq!(state(SandboxState::Error).name(), "sandbox.error");
        assert_eq!(exec(0).name(), "exec.completed");
    }
}
