//! The service layer: every product rule lives here, exactly once.
//!
//! REST handlers, GraphQL resolvers and the CLI only translate their input
//! into these calls and the answers back. Each call takes the [`Caller`],
//! checks its preconditions (stated on the method), persists state changes
//! before reporting them, and publishes events.

mod admission;
mod audit;
pub mod cluster;
mod error;
mod exec;
mod files;
mod follow;
mod identity;
mod leases;
mod lifecycle;
mod listing;
mod metrics;
pub mod output;
mod policy;
mod pool;
mod quotas;
mod rate_limit;
mod reconcile;
mod sandboxes;
mod shutdown;
mod spawn_queue;
mod system;
mod templates;
pub mod terminals;
mod workers;

pub use admission::{AdmissionDecision, AdmissionReason};
pub use audit::{AuditAction, AuditOutcome};
pub use error::{Error, ErrorCode, Result};
pub use exec::{CollectedExec, ExecOutput, ExecRequest, ExecResult, RunningExec};
pub use files::{ContentEncoding, FileWrite};
pub use follow::{Followed, Streamed};
pub use identity::{ApiKeyInfo, Credentials, Identity, IdentityError, NewApiKey, load_pepper};
pub use listing::{Execution, MAX_PAGE_SIZE, Page, SandboxListing, encode_cursor};
pub use metrics::Metrics;
pub use output::{OutputChunk, OutputEnd, OutputEvent, OutputFollower, OutputHub};
pub use policy::{
    ALLOW_HOST_IMAGE_KEY, Bound, BoundSource, HostCapacity, Openings, PolicyRefusal, SandboxAsk,
    Scope, SpawnBounds, Subject, check_policy,
};
pub use pool::{PoolReport, PoolStatus, PoolView};
pub use quotas::{QuotaInput, QuotaPolicy, QuotaUsage};
pub use rate_limit::{InFlightGuard, InFlightLimiter, RateDecision, RateLimitConfig, RateLimiter};
pub use reconcile::ReconcileReport;
pub use sandboxes::{Sandbox, SpawnRequest};
pub use shutdown::DrainReport;
pub use spawn_queue::{Admission, QueueError, SpawnQueue};
pub use system::{HealthReport, ProviderStatus, WorkerStatus};
pub use templates::{Template, TemplateInput};

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Mutex;

use crate::auth::Caller;
use crate::config::Config;
use crate::events::EventBus;
use crate::scheduler::Scheduler;
use crate::store::Store;

/// The StacyVM service; cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    scheduler: Scheduler,
    config: Config,
    events: EventBus,
    /// Live output of running and recently finished executions.
    outputs: OutputHub,
    identity: Identity,
    /// What the host has; no size bound goes beyond it.
    host: HostCapacity,
    rate_limiter: RateLimiter,
    /// Refused requests per source address.
    refused_limiter: RateLimiter,
    /// Requests in flight per credential.
    in_flight: InFlightLimiter,
    /// Open event streams (`/api/v1/events`) per credential.
    event_streams: InFlightLimiter,
    metrics: metrics::Metrics,
    /// Spawns waiting for capacity under `spawn_overflow: queue`.
    spawn_queue: spawn_queue::SpawnQueue,
    /// Serialises "count live sandboxes, then insert one" so that concurrent
    /// spawns cannot overshoot a quota. Held only around those two store
    /// calls, never around provider work.
    admission: Mutex<()>,
    /// This replica among those sharing the database.
    replica: cluster::Replica,
    /// What the reconciler remembers between passes.
    reconcile: reconcile::ReconcileMemory,
    /// Warm pools' counters and backoff.
    pool: pool::PoolState,
    /// Shutdown phases and the running commands they wait for.
    shutdown: shutdown::ShutdownState,
    /// Terminal sessions, with their scrollback.
    terminals: terminals::Terminals,
    started_at: Instant,
}

/// The key refused requests are counted under: the IPv4 address, or the
/// /64 network of an IPv6 one (one host commonly holds a whole /64).
fn refusal_key(peer: std::net::IpAddr) -> String {
    match peer {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

impl Service {
    pub fn new(
        store: Store,
        scheduler: Scheduler,
        config: Config,
        events: EventBus,
        identity: Identity,
        replica: cluster::Replica,
    ) -> Service {
        Service {
            inner: Arc::new(Inner {
                rate_limiter: RateLimiter::new(config.rate_limit.clone()),
                refused_limiter: RateLimiter::new(config.server.refused_rate_limit.clone()),
                in_flight: InFlightLimiter::new(config.server.max_requests_per_credential),
                event_streams: InFlightLimiter::new(config.server.max_websockets_per_credential),
                metrics: metrics::Metrics::new(),
                spawn_queue: spawn_queue::SpawnQueue::new(
                    config.defaults.spawn_queue_size,
                    config.defaults.spawn_queue_timeout.0,
                ),
                identity,
                host: HostCapacity::probe(),
                store,
                scheduler,
                config,
                events,
                outputs: OutputHub::default(),
                admission: Mutex::new(()),
                pool: pool::PoolState::default(),
                replica,
                reconcile: Default::default(),
                shutdown: Default::default(),
                terminals: Default::default(),
                started_at: Instant::now(),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn events(&self) -> &EventBus {
        &self.inner.events
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.inner.scheduler
    }

    /// The identity component (keys, credentials).
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// Turns credentials into a caller. A refusal is audited.
    pub async fn authenticate(&self, creds: Credentials) -> Result<Caller> {
        let presented = if creds.admin_api_key.is_some() {
            "admin-key"
        } else if creds.api_key.is_some() {
            "api-key"
        } else if creds.bearer.is_some() {
            "bearer"
        } else {
            "none"
        };
        let request_id = creds.request_id.clone();
        let peer = creds.peer;
        let result = self.inner.identity.authenticate(creds).await;
        if let Err(e) = &result {
            // Refusals cost an audit row each: past the per-address rate
            // they are answered 429 and not recorded, so that an
            // anonymous client cannot fill the disk.
            if let Some(peer) = peer {
                let decision = self.inner.refused_limiter.check(&refusal_key(peer));
                if !decision.allowed {
                    return Err(Error::ResourceLimit {
                        message: "too many refused requests from this address; slow down".into(),
                        retry_after_secs: decision
                            .retry_after
                            .map_or(1, |d| d.as_secs_f64().ceil() as u64),
                    });
                }
            }
            let unknown = Caller {
                owner_id: format!("unauthenticated:{presented}"),
                request_id,
                ..Caller::system()
            };
            // A request that presented nothing (a browser on a public page,
            // a probe) is refused, not audited: only presented credentials
            // are worth a record, and an anonymous flood cannot fill the
            // trail.
            if presented != "none" {
                self.audit(&unknown, AuditAction::AuthDenied, "", Err(e))
                    .await;
            }
        }
        result
    }

    /// A place for one more request in flight of this caller's credential
    /// (`server.max_requests_per_credential`; a stream holds it until it
    /// ends), or 429.
    pub fn hold_request(&self, caller: &Caller) -> Result<InFlightGuard> {
        let key = caller.credential.as_deref().unwrap_or("open");
        self.inner.in_flight.try_hold(key).ok_or_else(|| Error::ResourceLimit {
            message: format!(
                "this credential has {} requests in flight (server.max_requests_per_credential); \
                 wait for some to finish",
                self.config().server.max_requests_per_credential
            ),
            retry_after_secs: 1,
        })
    }

    /// The rate-limit decision for this caller's credential, when limits
    /// are on.
    pub fn check_rate(&self, caller: &Caller) -> Option<RateDecision> {
        if !self.inner.rate_limiter.enabled() {
            return None;
        }
        let key = caller.credential.as_deref().unwrap_or("open");
        Some(self.inner.rate_limiter.check(key))
    }

    /// Refuses callers that may only read.
    fn require_write(&self, caller: &Caller) -> Result<()> {
        if caller.can_write() {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "role {} is read-only",
                caller.role
            )))
        }
    }

    /// Refuses callers that are not administrators.
    fn require_admin(&self, caller: &Caller) -> Result<()> {
        if caller.is_admin() {
            Ok(())
        } else {
            Err(Error::Forbidden("this needs an admin key".into()))
        }
    }
}
