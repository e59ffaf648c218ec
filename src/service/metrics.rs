//! Prometheus metrics (`/metrics/prometheus`, `/metrics`), names
//! `stacyvm_*`. Events are counted where they happen (spawn, exec,
//! destroy, admission, HTTP); states (sandboxes by state, workers,
//! provider health, queue depth, open streams) are read at scrape time
//! from the same sources the API answers from, so they cannot drift.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::{Result, Service};
use crate::auth::Caller;
use crate::provider::StreamKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    provider: String,
    /// `ok`, or the error code (`RESOURCE_LIMIT`, ...).
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExecLabels {
    provider: String,
    /// completed, timeout, failed, interrupted.
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    /// GET, POST, ... or `other`.
    method: &'static str,
    /// The route's template (`/api/v1/sandboxes/{id}`), never the path
    /// itself: the label set stays as small as the API.
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabels {
    state: String,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    /// online or stale.
    status: String,
    /// active, cordoned or draining.
    admin_state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

fn latency() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Every metric this server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    spawn_seconds: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    destroy_seconds: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    exec_seconds: Family<ExecLabels, Histogram, fn() -> Histogram>,
    exec_output_bytes: Family<StreamLabels, Counter>,
    /// The family's two counters, taken once: output is counted per chunk
    /// on the exec path, without a lookup in the family each time.
    stdout_bytes: Counter,
    stderr_bytes: Counter,
    admission_refusals: Family<ReasonLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    http_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
    sandboxes: Family<SandboxLabels, Gauge>,
    workers: Family<WorkerLabels, Gauge>,
    provider_healthy: Family<ProviderLabels, Gauge>,
    spawn_queue_depth: Gauge,
    streams_open: Gauge,
    /// One scrape at a time refreshes the gauges and encodes.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("stacyvm");
        let m = Metrics {
            spawn_seconds: Family::new_with_constructor(latency),
            destroy_seconds: Family::new_with_constructor(latency),
            exec_seconds: Family::new_with_constructor(latency),
            exec_output_bytes: Family::default(),
            stdout_bytes: Counter::default(),
            stderr_bytes: Counter::default(),
            admission_refusals: Family::default(),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(latency),
            sandboxes: Family::default(),
            workers: Family::default(),
            provider_healthy: Family::default(),
            spawn_queue_depth: Gauge::default(),
            streams_open: Gauge::default(),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register_with_unit(
            "spawn_duration",
            "Spawns through the API, from the request to a running sandbox (or the refusal)",
            Unit::Seconds,
            m.spawn_seconds.clone(),
        );
        registry.register_with_unit(
            "destroy_duration",
            "Destroys through the API",
            Unit::Seconds,
            m.destroy_seconds.clone(),
        );
        registry.register_with_unit(
            "exec_duration",
            "Commands, from start to exit, by how they ended",
            Unit::Seconds,
            m.exec_seconds.clone(),
        );
        registry.register_with_unit(
            "exec_output",
            "Output commands wrote, by stream",
            Unit::Bytes,
            m.exec_output_bytes.clone(),
        );
        registry.register(
            "admission_refusals",
            "Spawns refused by admission, by reason",
            m.admission_refusals.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route and status",
            m.http_requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "HTTP requests, until the answer's head (a stream's body may last longer)",
            Unit::Seconds,
            m.http_seconds.clone(),
        );
        registry.register(
            "sandboxes",
            "Sandboxes that are not destroyed, by state and provider",
            m.sandboxes.clone(),
        );
        registry.register(
            "workers",
            "Registered workers, by status and admin state",
            m.workers.clone(),
        );
        registry.register(
            "provider_healthy",
            "1 when a live worker reports the provider healthy",
            m.provider_healthy.clone(),
        );
        registry.register(
            "spawn_queue_depth",
            "Spawns waiting for capacity (spawn_overflow: queue)",
            m.spawn_queue_depth.clone(),
        );
        registry.register(
            "streams_open",
            "Open long-lived streams: GraphQL WebSockets and event streams",
            m.streams_open.clone(),
        );
        let stdout_bytes = m
            .exec_output_bytes
            .get_or_create(&StreamLabels { stream: "stdout" })
            .clone();
        let stderr_bytes = m
            .exec_output_bytes
            .get_or_create(&StreamLabels { stream: "stderr" })
            .clone();
        Metrics {
            registry,
            stdout_bytes,
            stderr_bytes,
            ..m
        }
    }

    pub(super) fn spawned<T>(&self, provider: &str, outcome: &Result<T>, took: Duration) {
        self.spawn_seconds
            .get_or_create(&OutcomeLabels {
                provider: provider.to_string(),
                outcome: outcome_of(outcome),
            })
            .observe(took.as_secs_f64());
    }

    pub(super) fn destroyed<T>(&self, provider: &str, outcome: &Result<T>, took: Duration) {
        self.destroy_seconds
            .get_or_create(&OutcomeLabels {
                provider: provider.to_string(),
                outcome: outcome_of(outcome),
            })
            .observe(took.as_secs_f64());
    }

    pub(super) fn executed(
        &self,
        provider: &str,
        status: crate::lifecycle::ExecStatus,
        took: Duration,
    ) {
        self.exec_seconds
            .get_or_create(&ExecLabels {
                provider: provider.to_string(),
                status: status.as_str(),
            })
            .observe(took.as_secs_f64());
    }

    pub(super) fn output(&self, stream: StreamKind, bytes: usize) {
        let counter = match stream {
            StreamKind::Stdout => &self.stdout_bytes,
            StreamKind::Stderr => &self.stderr_bytes,
        };
        counter.inc_by(bytes as u64);
    }

    pub(super) fn refused(&self, reason: super::AdmissionReason) {
        let reason = match reason {
            super::AdmissionReason::Allowed => return,
            super::AdmissionReason::MaxTtl => "max_ttl",
            super::AdmissionReason::WorkerUnavailable => "worker_unavailable",
            super::AdmissionReason::MaxSandboxes => "max_sandboxes",
            super::AdmissionReason::MaxSandboxesPerOwner => "max_sandboxes_per_owner",
        };
        self.admission_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// One HTTP answer: `route` is the matched route's template.
    pub fn http(&self, method: &'static str, route: &str, status: u16, took: Duration) {
        self.http_requests
            .get_or_create(&HttpLabels {
                method,
                route: route.to_string(),
                status,
            })
            .inc();
        self.http_seconds
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }
}

fn outcome_of<T>(outcome: &Result<T>) -> &'static str {
    match outcome {
        Ok(_) => "ok",
        Err(e) => e.code().as_str(),
    }
}

impl Service {
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The metrics in Prometheus' text format. For admins and operators
    /// (they count every tenant's sandboxes), and for the open mode.
    pub async fn prometheus_text(&self, caller: &Caller) -> Result<String> {
        if !(caller.is_admin() || caller.role == crate::auth::Role::Operator) {
            return Err(super::Error::Forbidden(
                "metrics are for admin and operator keys".into(),
            ));
        }
        let counts = self.store().sandbox_counts().await?;
        let workers = self.all_workers().await?;
        let providers = self.providers();
        let m = self.metrics();
        let _one_scrape = m.scrape.lock().unwrap_or_else(|e| e.into_inner());
        m.sandboxes.clear();
        for (state, provider, n) in counts {
            m.sandboxes
                .get_or_create(&SandboxLabels { state, provider })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        m.workers.clear();
        for w in workers {
            m.workers
                .get_or_create(&WorkerLabels {
                    status: w.status,
                    admin_state: w.admin_state,
                })
                .inc();
        }
        m.provider_healthy.clear();
        for p in providers {
            m.provider_healthy
                .get_or_create(&ProviderLabels { provider: p.name })
                .set(i64::from(p.healthy));
        }
        m.spawn_queue_depth
            .set(i64::try_from(self.inner.spawn_queue.waiting()).unwrap_or(i64::MAX));
        m.streams_open
            .set(i64::try_from(self.open_streams()).unwrap_or(i64::MAX));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry)
            .map_err(|e| super::Error::internal(format!("encoding metrics: {e}")))?;
        Ok(text)
    }
}
