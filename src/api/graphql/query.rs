//! Query: reads over sandboxes, executions, workers, providers, templates,
//! audit events and health.

use std::collections::BTreeMap;

use async_graphql::connection::{Connection, Edge};
use async_graphql::{Context, ID, InputObject, Json, Object};

use super::ctx;
use super::errors::GqlResult;
use super::types::{
    AuditEvent, Execution, Health, Provider, Sandbox, SandboxState, Template, Worker,
};
use super::types::{QuotaPolicy, QuotaUsage, Replica};
use crate::service::{ContentEncoding, Page, SandboxListing};

/// How `readFile` returns content.
#[derive(async_graphql::Enum, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileEncoding {
    /// UTF-8 text; a binary file is refused (BAD_REQUEST).
    #[default]
    Text,
    /// Base64 of the exact bytes.
    #[graphql(name = "BASE64")]
    Base64,
}

impl FileEncoding {
    fn service(self) -> ContentEncoding {
        match self {
            FileEncoding::Text => ContentEncoding::Text,
            FileEncoding::Base64 => ContentEncoding::Base64,
        }
    }
}
use crate::store::AuditFilter;

/// Which sandboxes to list.
#[derive(InputObject, Default)]
pub struct SandboxFilterInput {
    /// Only these states (default: every state but DESTROYED).
    pub states: Option<Vec<SandboxState>>,
    pub provider: Option<String>,
    pub image: Option<String>,
    pub owner_id: Option<String>,
    /// Metadata labels that must all match, e.g. `{"team": "ml"}`.
    pub labels: Option<Json<BTreeMap<String, String>>>,
}

/// Which audit events to list.
#[derive(InputObject, Default)]
pub struct AuditFilterInput {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub target: Option<String>,
}

fn connection<T, G>(
    page: Page<T>,
    wrap: impl Fn(T) -> G,
    has_previous: bool,
) -> Connection<String, G>
where
    G: async_graphql::OutputType,
{
    let mut conn = Connection::new(has_previous, page.has_next_page);
    conn.edges.extend(
        page.items
            .into_iter()
            .map(|(cursor, item)| Edge::new(cursor, wrap(item))),
    );
    conn
}

/// The root of all reads.
pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// A sandbox by id (NOT_FOUND for unknown, destroyed or foreign ids).
    async fn sandbox(&self, cx: &Context<'_>, id: ID) -> async_graphql::Result<Sandbox> {
        let (service, caller) = ctx(cx)?;
        Ok(Sandbox(service.get_sandbox(caller, &id).await.gql()?))
    }

    /// Sandboxes, oldest first, `first` at most 100 per page.
    async fn sandboxes(
        &self,
        cx: &Context<'_>,
        first: Option<u64>,
        after: Option<String>,
        filter: Option<SandboxFilterInput>,
    ) -> async_graphql::Result<Connection<String, Sandbox>> {
        let (service, caller) = ctx(cx)?;
        let filter = filter.unwrap_or_default();
        let has_previous = after.is_some();
        let listing = SandboxListing {
            states: filter
                .states
                .map(|s| s.into_iter().map(Into::into).collect()),
            provider: filter.provider,
            image: filter.image,
            owner_id: filter.owner_id,
            labels: filter.labels.map(|l| l.0).unwrap_or_default(),
            first,
            after,
        };
        let page = service.sandbox_page(caller, listing).await.gql()?;
        Ok(connection(page, Sandbox, has_previous))
    }

    /// An execution by id.
    async fn execution(&self, cx: &Context<'_>, id: ID) -> async_graphql::Result<Execution> {
        let (service, caller) = ctx(cx)?;
        Ok(Execution(service.get_execution(caller, &id).await.gql()?))
    }

    /// A sandbox's executions, oldest first.
    async fn executions(
        &self,
        cx: &Context<'_>,
        sandbox_id: ID,
        first: Option<u64>,
        after: Option<String>,
    ) -> async_graphql::Result<Connection<String, Execution>> {
        let (service, caller) = ctx(cx)?;
        let has_previous = after.is_some();
        let page = service
            .execution_page(caller, &sandbox_id, first, after)
            .await
            .gql()?;
        Ok(connection(page, Execution, has_previous))
    }

    async fn workers(&self, cx: &Context<'_>) -> async_graphql::Result<Vec<Worker>> {
        let (service, caller) = ctx(cx)?;
        Ok(service
            .workers(caller)
            .await
            .gql()?
            .into_iter()
            .map(Worker::from)
            .collect())
    }

    /// The control-plane replicas on this database (admins only).
    async fn replicas(&self, cx: &Context<'_>) -> async_graphql::Result<Vec<Replica>> {
        let (service, caller) = ctx(cx)?;
        Ok(service
            .admin_replicas(caller)
            .await
            .gql()?
            .into_iter()
            .map(Replica::from)
            .collect())
    }

    /// Providers with their last health check.
    async fn providers(&self, cx: &Context<'_>) -> async_graphql::Result<Vec<Provider>> {
        let (service, _) = ctx(cx)?;
        Ok(service
            .providers()
            .into_iter()
            .map(Provider::from)
            .collect())
    }

    async fn templates(&self, cx: &Context<'_>) -> async_graphql::Result<Vec<Template>> {
        let (service, caller) = ctx(cx)?;
        Ok(service
            .list_templates(caller)
            .await
            .gql()?
            .into_iter()
            .map(Template)
            .collect())
    }

    /// A file's content: `TEXT` (it must be UTF-8) or `BASE64` (any bytes).
    async fn read_file(
        &self,
        cx: &Context<'_>,
        sandbox_id: ID,
        path: String,
        #[graphql(default)] encoding: FileEncoding,
    ) -> async_graphql::Result<String> {
        let (service, caller) = ctx(cx)?;
        let bytes = service.read_file(caller, &sandbox_id, &path).await.gql()?;
        encoding.service().encode(&bytes).gql()
    }

    /// Warm pools: their targets, what is warm now, hits and misses.
    async fn pool(&self, cx: &Context<'_>) -> async_graphql::Result<super::types::PoolStatus> {
        let (service, caller) = ctx(cx)?;
        Ok(service.pool_status(caller).await.gql()?.into())
    }

    async fn template(&self, cx: &Context<'_>, name: String) -> async_graphql::Result<Template> {
        let (service, caller) = ctx(cx)?;
        Ok(Template(service.get_template(caller, &name).await.gql()?))
    }

    /// Audit events, newest first.
    async fn audit_events(
        &self,
        cx: &Context<'_>,
        first: Option<u64>,
        after: Option<String>,
        filter: Option<AuditFilterInput>,
    ) -> async_graphql::Result<Connection<String, AuditEvent>> {
        let (service, caller) = ctx(cx)?;
        let filter = filter.unwrap_or_default();
        let has_previous = after.is_some();
        let store_filter = AuditFilter {
            actor: filter.actor,
            action: filter.action,
            target: filter.target,
            ..Default::default()
        };
        let page = service
            .audit_page(caller, store_filter, first, after)
            .await
            .gql()?;
        Ok(connection(page, |m| AuditEvent(m.into()), has_previous))
    }

    /// Every owner's quota overrides (admins).
    async fn quotas(&self, cx: &Context<'_>) -> async_graphql::Result<Vec<QuotaPolicy>> {
        let (service, caller) = ctx(cx)?;
        Ok(service
            .list_quotas(caller)
            .await
            .gql()?
            .into_iter()
            .map(QuotaPolicy::from)
            .collect())
    }

    /// An owner's usage against its limits (admins, or the owner itself).
    async fn quota_usage(
        &self,
        cx: &Context<'_>,
        owner_id: String,
    ) -> async_graphql::Result<QuotaUsage> {
        let (service, caller) = ctx(cx)?;
        Ok(service.quota_usage(caller, &owner_id).await.gql()?.into())
    }

    async fn health(&self, cx: &Context<'_>) -> async_graphql::Result<Health> {
        let (service, _) = ctx(cx)?;
        let h = service.health();
        Ok(Health {
            status: h.status.to_string(),
            version: h.version.to_string(),
            uptime: h.uptime,
            replica_id: h.replica_id,
            leader: h.leader,
        })
    }
}
