//! Batch loaders: a page of sandboxes resolves its workers, templates,
//! executions and audit events with one query per kind, not one per row.
//! They only read children of objects the caller was already allowed to see.

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::dataloader::Loader;

use crate::service::Service;

/// Loads from the store for one request (and its caller: what the
/// service's read rules hide from it stays hidden here too).
pub struct StoreLoader {
    service: Service,
    caller: crate::auth::Caller,
}

impl StoreLoader {
    pub fn new(service: Service, caller: crate::auth::Caller) -> StoreLoader {
        StoreLoader { service, caller }
    }
}

/// Key: the executions of a sandbox.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ExecutionsOf(pub String);
/// Key: a worker by id.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct WorkerId(pub String);
/// Key: a template by (tenant, owner, name).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TemplateNamed(pub String, pub String, pub String);
/// Key: the audit events about a target.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct AuditOf(pub String);

/// Loader errors are store errors; logged, and shown as internal errors.
type LoadError = Arc<crate::service::Error>;

fn fail(e: impl Into<crate::service::Error>) -> LoadError {
    let e = e.into();
    tracing::error!(error = %e, "batch load failed");
    Arc::new(e)
}

/// Most audit events loaded per sandbox in one batch.
const AUDIT_PER_TARGET: u64 = 100;

impl Loader<ExecutionsOf> for StoreLoader {
    type Value = Vec<entity::execution::Model>;
    type Error = LoadError;

    async fn load(
        &self,
        keys: &[ExecutionsOf],
    ) -> Result<HashMap<ExecutionsOf, Self::Value>, Self::Error> {
        let ids: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
        let rows = self
            .service
            .store()
            .executions_of(&ids)
            .await
            .map_err(fail)?;
        let mut out: HashMap<ExecutionsOf, Self::Value> = HashMap::new();
        for row in rows {
            out.entry(ExecutionsOf(row.sandbox_id.clone()))
                .or_default()
                .push(row);
        }
        Ok(out)
    }
}

impl Loader<WorkerId> for StoreLoader {
    type Value = entity::worker::Model;
    type Error = LoadError;

    async fn load(&self, keys: &[WorkerId]) -> Result<HashMap<WorkerId, Self::Value>, Self::Error> {
        let ids: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
        let rows = self
            .service
            .store()
            .workers_by_ids(&ids)
            .await
            .map_err(fail)?;
        Ok(rows
            .into_iter()
            .map(|w| (WorkerId(w.id.clone()), w))
            .collect())
    }
}

impl Loader<TemplateNamed> for StoreLoader {
    type Value = entity::template::Model;
    type Error = LoadError;

    async fn load(
        &self,
        keys: &[TemplateNamed],
    ) -> Result<HashMap<TemplateNamed, Self::Value>, Self::Error> {
        let wanted: std::collections::HashSet<&TemplateNamed> = keys.iter().collect();
        let wanted_keys: Vec<(String, String, String)> = keys
            .iter()
            .map(|k| (k.0.clone(), k.1.clone(), k.2.clone()))
            .collect();
        let rows = self
            .service
            .store()
            .templates_by_keys(&wanted_keys)
            .await
            .map_err(fail)?;
        Ok(rows
            .into_iter()
            .map(|t| {
                let key = TemplateNamed(t.tenant_id.clone(), t.owner_id.clone(), t.name.clone());
                (key, t)
            })
            .filter(|(key, _)| wanted.contains(key))
            .collect())
    }
}

impl Loader<AuditOf> for StoreLoader {
    type Value = Vec<crate::events::AuditRecord>;
    type Error = LoadError;

    async fn load(&self, keys: &[AuditOf]) -> Result<HashMap<AuditOf, Self::Value>, Self::Error> {
        let targets = keys.iter().map(|k| k.0.clone()).collect();
        let rows = self
            .service
            .audit_of_targets(&self.caller, targets, AUDIT_PER_TARGET)
            .await
            .map_err(fail)?;
        let mut out: HashMap<AuditOf, Self::Value> = HashMap::new();
        for row in rows {
            out.entry(AuditOf(row.target.clone()))
                .or_default()
                .push(row.into());
        }
        Ok(out)
    }
}
