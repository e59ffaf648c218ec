//! Admission: may this spawn go ahead? The same answer feeds the preflight
//! endpoint and the spawn itself, in StacyVM's fixed order: TTL limit, an
//! eligible worker, the global cap, the per-owner cap.

use std::time::Duration;

use serde::Serialize;

use super::sandboxes::SpawnPlan;
use super::{Error, Result, Service, SpawnRequest};
use crate::auth::Caller;
use crate::duration;
use crate::store::LiveCounts;

/// Why a spawn is refused (`""` when it is not), in the words StacyVM's
/// SDKs know.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub enum AdmissionReason {
    #[serde(rename = "")]
    Allowed,
    #[serde(rename = "max_ttl")]
    MaxTtl,
    #[serde(rename = "worker_unavailable")]
    WorkerUnavailable,
    #[serde(rename = "max_sandboxes")]
    MaxSandboxes,
    #[serde(rename = "max_sandboxes_per_owner")]
    MaxSandboxesPerOwner,
}

impl AdmissionReason {
    pub const ALL: [AdmissionReason; 5] = [
        AdmissionReason::Allowed,
        AdmissionReason::MaxTtl,
        AdmissionReason::WorkerUnavailable,
        AdmissionReason::MaxSandboxes,
        AdmissionReason::MaxSandboxesPerOwner,
    ];
}

/// By hand: the derive drops the empty name `""` of `Allowed`; this lists
/// every name exactly as serde writes it.
impl utoipa::PartialSchema for AdmissionReason {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let names = AdmissionReason::ALL.map(|r| serde_json::to_value(r).unwrap_or_default());
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .enum_values(Some(names))
            .description(Some("Why a spawn is refused; `\"\"` when it is not."))
            .into()
    }
}

impl utoipa::ToSchema for AdmissionReason {}

/// The admission answer; field names are the ones StacyVM SDKs read, and
/// nothing else is serialized (SDK 0.1.1 refuses unknown keys).
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct AdmissionDecision {
    pub allowed: bool,
    pub queueable: bool,
    pub reason: AdmissionReason,
    pub active_sandboxes: u64,
    pub max_sandboxes: u64,
    pub active_owner_sandboxes: u64,
    pub max_owner_sandboxes: u64,
    pub max_ttl: String,
}

impl AdmissionDecision {
    /// What `caller` may see of the decision: the server-wide count and cap
    /// are for admins; anyone else gets their owner's figures in those
    /// fields too (the SDK needs every field present).
    pub fn seen_by(mut self, caller: &Caller) -> AdmissionDecision {
        if !caller.is_admin() {
            self.active_sandboxes = self.active_owner_sandboxes;
            self.max_sandboxes = self.max_owner_sandboxes;
        }
        self
    }

    /// The error a refused spawn answers with.
    pub fn refusal(self) -> Error {
        match self.into_result() {
            Err(e) => e,
            Ok(()) => Error::internal("admission refused without a reason"),
        }
    }

    /// `Ok` when allowed, otherwise the error a spawn answers with.
    pub fn into_result(self) -> Result<()> {
        if self.allowed {
            return Ok(());
        }
        match self.reason {
            AdmissionReason::MaxTtl => Err(Error::BadRequest(format!(
                "ttl exceeds the maximum of {}",
                self.max_ttl
            ))),
            AdmissionReason::WorkerUnavailable => Err(Error::Unavailable(
                "no worker can run this sandbox right now".into(),
            )),
            AdmissionReason::MaxSandboxes => Err(Error::ResourceLimit {
                message: "the server runs its maximum number of sandboxes; try again later".into(),
                retry_after_secs: 5,
            }),
            AdmissionReason::MaxSandboxesPerOwner | AdmissionReason::Allowed => {
                Err(Error::ResourceLimit {
                    message: format!(
                        "owner has reached its maximum of {} sandboxes",
                        self.max_owner_sandboxes
                    ),
                    retry_after_secs: 5,
                })
            }
        }
    }
}

/// Whether the spawn being admitted already holds its placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placed {
    No,
    Yes,
}

impl Service {
    /// The largest TTL `owner` may ask for.
    pub(super) async fn max_ttl_for(&self, tenant: &str, owner: &str) -> Result<Duration> {
        let record = self.store().get_owner(tenant, owner).await?;
        Ok(self.max_ttl_of(record.as_ref()))
    }

    /// The TTL cap given an owner's record (overrides win over the default).
    fn max_ttl_of(&self, owner: Option<&entity::owner::Model>) -> Duration {
        owner
            .and_then(|o| o.max_ttl_ms)
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis)
            .unwrap_or(self.config().defaults.max_ttl.0)
    }

    /// Preflight: would this spawn be admitted? Creates nothing.
    pub async fn admission(&self, caller: &Caller, req: SpawnRequest) -> Result<AdmissionDecision> {
        let plan = self.plan_spawn(caller, req).await?;
        Ok(self
            .admission_for_plan(&plan, Placed::No)
            .await?
            .seen_by(caller))
    }

    /// The admission decision for a plan, from the store's counts now.
    pub(super) async fn admission_for_plan(
        &self,
        plan: &SpawnPlan,
        placed: Placed,
    ) -> Result<AdmissionDecision> {
        let limits = self.limits_for(plan).await?;
        let counts = LiveCounts {
            all: self.store().count_live_sandboxes(None).await?,
            owner: self
                .store()
                .count_live_sandboxes(Some((&plan.tenant_id, &plan.owner_id)))
                .await?,
        };
        Ok(self.decide(plan, placed, &limits, counts))
    }

    /// The caps that apply to a plan's owner (overrides win over defaults).
    pub(super) async fn limits_for(&self, plan: &SpawnPlan) -> Result<Limits> {
        let defaults = &self.config().defaults;
        // One read of the owner's record serves every limit.
        let owner = self
            .store()
            .get_owner(&plan.tenant_id, &plan.owner_id)
            .await?;
        Ok(Limits {
            max_ttl: self.max_ttl_of(owner.as_ref()),
            max_sandboxes: u64::from(defaults.max_sandboxes),
            max_owner_sandboxes: owner
                .and_then(|o| o.max_sandboxes)
                .and_then(|m| u64::try_from(m).ok())
                .unwrap_or(u64::from(defaults.max_sandboxes_per_owner)),
        })
    }

    /// The admission decision given the caps and the live counts.
    /// `Placed::Yes` once the spawn holds its placement (the re-check as it
    /// is inserted): its own reservation must not make the worker look
    /// full.
    pub(super) fn decide(
        &self,
        plan: &SpawnPlan,
        placed: Placed,
        limits: &Limits,
        counts: LiveCounts,
    ) -> AdmissionDecision {
        let mut decision = AdmissionDecision {
            allowed: true,
            queueable: false,
            reason: AdmissionReason::Allowed,
            active_sandboxes: counts.all,
            max_sandboxes: limits.max_sandboxes,
            active_owner_sandboxes: counts.owner,
            max_owner_sandboxes: limits.max_owner_sandboxes,
            max_ttl: duration::format(limits.max_ttl),
        };
        let refuse = |d: &mut AdmissionDecision, reason: AdmissionReason, queueable: bool| {
            d.allowed = false;
            d.queueable = queueable;
            d.reason = reason;
        };
        if plan.ttl > limits.max_ttl {
            refuse(&mut decision, AdmissionReason::MaxTtl, false);
        } else if placed == Placed::No && self.scheduler().choose(&plan.ask()).is_err() {
            refuse(&mut decision, AdmissionReason::WorkerUnavailable, false);
        } else if limits.max_sandboxes > 0 && counts.all >= limits.max_sandboxes {
            refuse(&mut decision, AdmissionReason::MaxSandboxes, true);
        } else if limits.max_owner_sandboxes > 0 && counts.owner >= limits.max_owner_sandboxes {
            refuse(&mut decision, AdmissionReason::MaxSandboxesPerOwner, true);
        }
        decision
    }
}

/// The caps of one spawn's owner.
pub(super) struct Limits {
    max_ttl: Duration,
    max_sandboxes: u64,
    max_owner_sandboxes: u64,
}

impl Limits {
    /// Whether a cap counts every owner's sandboxes (then any spawn takes
    /// a slot that a queued spawn of anyone may be waiting for).
    pub(super) fn shared_cap(&self) -> bool {
        self.max_sandboxes > 0
    }
}
