//! The scheduler: picks the worker and provider for each new sandbox.
//!
//! With one local worker the choice is about providers: the requested one,
//! or the configured default. The scheduler refuses placements on providers
//! that do not exist or are unhealthy, so no record is created for a spawn
//! that cannot run.

use std::sync::Arc;

use crate::provider::Provider;
use crate::worker::LocalWorker;

/// Where a sandbox will run.
#[derive(Clone)]
pub struct Placement {
    pub worker: Arc<LocalWorker>,
    pub provider: Arc<dyn Provider>,
}

/// Why no placement was found.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("unknown provider {requested:?}: available providers are {available}")]
    UnknownProvider {
        requested: String,
        available: String,
    },
    #[error("provider {provider} is unavailable: {reason}")]
    ProviderUnavailable { provider: String, reason: String },
    #[error("{requested} vcpus requested but this worker has {available}")]
    TooManyVcpus { requested: u32, available: u32 },
}

/// Chooses placements for spawns.
#[derive(Clone)]
pub struct Scheduler {
    worker: Arc<LocalWorker>,
    default_provider: String,
}

impl Scheduler {
    pub fn new(worker: Arc<LocalWorker>, default_provider: String) -> Scheduler {
        Scheduler {
            worker,
            default_provider,
        }
    }

    /// The provider used when a request names none.
    pub fn default_provider(&self) -> &str {
        &self.default_provider
    }

    /// The local worker (the only one for now).
    pub fn local_worker(&self) -> &Arc<LocalWorker> {
        &self.worker
    }

    /// The provider a sandbox already placed on `provider` runs on.
    pub fn provider_for(&self, provider: &str) -> Option<Arc<dyn Provider>> {
        self.worker.provider(provider)
    }

    /// Picks a worker and provider for a new sandbox.
    pub fn place(&self, provider: Option<&str>, vcpus: u32) -> Result<Placement, ScheduleError> {
        let name = match provider {
            Some(p) if !p.is_empty() => p,
            _ => self.default_provider.as_str(),
        };
        let Some(chosen) = self.worker.provider(name) else {
            let available: Vec<_> = self.worker.providers().map(|p| p.name()).collect();
            return Err(ScheduleError::UnknownProvider {
                requested: name.to_string(),
                available: available.join(", "),
            });
        };
        if let Some(health) = self.worker.health_of(name)
            && !health.healthy
        {
            return Err(ScheduleError::ProviderUnavailable {
                provider: name.to_string(),
                reason: health.error.unwrap_or_default(),
            });
        }
        if vcpus > self.worker.max_vcpus {
            return Err(ScheduleError::TooManyVcpus {
                requested: vcpus,
                available: self.worker.max_vcpus,
            });
        }
        Ok(Placement {
            worker: self.worker.clone(),
            provider: chosen,
        })
    }
}
