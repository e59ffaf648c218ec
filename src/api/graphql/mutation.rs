//! Mutation: every change, as input objects.

use std::collections::BTreeMap;

use async_graphql::{Context, ID, InputObject, Json, Object};

use super::ctx;
use super::errors::GqlResult;
use super::types::{
    ExecMode, ExecResult, Execution, GoDuration, QuotaPolicy, Sandbox, Template, Worker,
};
use crate::duration;
use crate::service::QuotaInput;
use crate::service::{
    ContentEncoding, Error, ExecRequest, FileWrite, SpawnRequest,
    TemplateInput as ServiceTemplateInput,
};
use crate::worker::AdminState;

#[derive(InputObject, Default)]
pub struct SpawnSandboxInput {
    pub image: Option<String>,
    pub provider: Option<String>,
    pub memory_mb: Option<u32>,
    pub vcpus: Option<u32>,
    /// Writable disk in MiB (at most `defaults.max_disk_mb`).
    pub disk_mb: Option<u32>,
    pub ttl: Option<GoDuration>,
    pub template: Option<String>,
    pub owner_id: Option<String>,
    pub metadata: Option<Json<BTreeMap<String, String>>>,
    /// A key for this spawn, unique per owner: a retry with the same key
    /// answers the sandbox the first spawn made instead of making another.
    pub idempotency_key: Option<String>,
    /// Labels the worker must carry (added to the template's).
    pub worker_labels: Option<Json<BTreeMap<String, String>>>,
}

#[derive(InputObject)]
pub struct ExtendSandboxInput {
    pub id: ID,
    pub ttl: GoDuration,
}

/// A command to run.
#[derive(InputObject)]
pub struct ExecCommandInput {
    pub command: String,
    #[graphql(default)]
    pub args: Vec<String>,
    #[graphql(default)]
    pub mode: ExecMode,
    pub env: Option<Json<BTreeMap<String, String>>>,
    pub workdir: Option<String>,
    pub timeout: Option<GoDuration>,
}

impl From<ExecCommandInput> for ExecRequest {
    fn from(i: ExecCommandInput) -> Self {
        ExecRequest {
            command: i.command,
            args: i.args,
            mode: Some(match i.mode {
                ExecMode::Shell => "shell".into(),
                ExecMode::Argv => "argv".into(),
            }),
            env: i.env.map(|e| e.0).unwrap_or_default(),
            workdir: i.workdir,
            timeout: i.timeout.map(|t| duration::format(t.0)),
        }
    }
}

#[derive(InputObject)]
pub struct WriteFileInput {
    pub sandbox_id: ID,
    pub path: String,
    /// Text content; or give `contentBase64` for binary files.
    pub content: Option<String>,
    pub content_base64: Option<String>,
    /// Octal permission bits, default "0644".
    pub mode: Option<String>,
}

#[derive(InputObject)]
pub struct DeleteFileInput {
    pub sandbox_id: ID,
    pub path: String,
    #[graphql(default)]
    pub recursive: bool,
}

#[derive(InputObject)]
pub struct MoveFileInput {
    pub sandbox_id: ID,
    pub from: String,
    pub to: String,
}

#[derive(InputObject)]
pub struct ChmodFileInput {
    pub sandbox_id: ID,
    pub path: String,
    pub mode: String,
}

/// A template to create or replace.
#[derive(InputObject)]
pub struct TemplateInput {
    pub name: String,
    pub image: String,
    pub memory_mb: Option<u32>,
    pub vcpus: Option<u32>,
    /// Writable disk in MiB (at most `defaults.max_disk_mb`).
    pub disk_mb: Option<u32>,
    pub ttl: Option<GoDuration>,
    pub provider: Option<String>,
    pub metadata: Option<Json<BTreeMap<String, String>>>,
    /// Labels a worker must carry to get this template's sandboxes.
    pub worker_labels: Option<Json<BTreeMap<String, String>>>,
    /// Sandboxes to keep warm (operators and admins; at most the server's
    /// `pool.max_warm`). Omitted: a replaced template keeps its own.
    pub pool_size: Option<u32>,
}

/// Quota overrides for one owner; a missing field clears that override.
#[derive(InputObject)]
pub struct SetQuotaInput {
    pub owner_id: String,
    pub max_sandboxes: Option<u64>,
    pub max_ttl: Option<GoDuration>,
    pub max_exec_timeout: Option<GoDuration>,
    /// Overrides of the size bounds for this owner (the host still caps them).
    pub max_memory_mb: Option<u32>,
    pub max_vcpus: Option<u32>,
    pub max_disk_mb: Option<u32>,
}

/// The root of all changes.
pub struct MutationRoot;

#[Object]
impl MutationRoot {
    /// Creates a sandbox; answers once it is running.
    async fn spawn_sandbox(
        &self,
        cx: &Context<'_>,
        input: SpawnSandboxInput,
    ) -> async_graphql::Result<Sandbox> {
        let (service, caller) = ctx(cx)?;
        let req = SpawnRequest {
            image: input.image,
            provider: input.provider,
            memory_mb: input.memory_mb,
            vcpus: input.vcpus,
            disk_mb: input.disk_mb,
            ttl: input.ttl.map(|t| duration::format(t.0)),
            template: input.template,
            owner_id: input.owner_id,
            metadata: input.metadata.map(|m| m.0).unwrap_or_default(),
            idempotency_key: input.idempotency_key,
            worker_labels: input.worker_labels.map(|m| m.0).unwrap_or_default(),
        };
        Ok(Sandbox(service.spawn(caller, req).await.gql()?))
    }

    /// Destroys a sandbox.
    async fn destroy_sandbox(&self, cx: &Context<'_>, id: ID) -> async_graphql::Result<bool> {
        let (service, caller) = ctx(cx)?;
        service.destroy_sandbox(caller, &id).await.gql()?;
        Ok(true)
    }

    /// Takes no new sandboxes on a worker (admins only); its sandboxes run on.
    async fn cordon_worker(&self, cx: &Context<'_>, id: ID) -> async_graphql::Result<Worker> {
        set_admin_state(cx, &id, AdminState::Cordoned).await
    }

    /// Lets a cordoned or draining worker take new sandboxes again.
    async fn uncordon_worker(&self, cx: &Context<'_>, id: ID) -> async_graphql::Result<Worker> {
        set_admin_state(cx, &id, AdminState::Active).await
    }

    /// Cordons a worker until its sandboxes are gone: done when the
    /// worker's `sandboxes` is 0.
    async fn drain_worker(&self, cx: &Context<'_>, id: ID) -> async_graphql::Result<Worker> {
        set_admin_state(cx, &id, AdminState::Draining).await
    }

    /// Sets a sandbox's expiry to now + ttl.
    async fn extend_sandbox(
        &self,
        cx: &Context<'_>,
        input: ExtendSandboxInput,
    ) -> async_graphql::Result<Sandbox> {
        let (service, caller) = ctx(cx)?;
        let ttl = duration::format(input.ttl.0);
        Ok(Sandbox(
            service
                .extend_sandbox(caller, &input.id, &ttl)
                .await
                .gql()?,
        ))
    }

    /// Runs a command and waits for its result.
    async fn exec(
        &self,
        cx: &Context<'_>,
        sandbox_id: ID,
        input: ExecCommandInput,
    ) -> async_graphql::Result<ExecResult> {
        let (service, caller) = ctx(cx)?;
        let done = service
            .exec(caller, &sandbox_id, input.into())
            .await
            .gql()?;
        Ok(ExecResult {
            execution_id: ID(done.result.execution_id),
            exit_code: done.result.exit_code,
            stdout: done.stdout,
            stderr: done.stderr,
            duration: GoDuration(done.result.duration),
            truncated: done.truncated,
        })
    }

    /// Opens a terminal (a PTY) in a sandbox; attach with the `terminal`
    /// subscription within 5 minutes, type with `terminalInput`.
    async fn open_terminal(
        &self,
        cx: &Context<'_>,
        sandbox_id: ID,
        #[graphql(default)] input: super::terminal::OpenTerminalInput,
    ) -> async_graphql::Result<super::terminal::TerminalSession> {
        let (service, caller) = ctx(cx)?;
        let id = service
            .start_terminal(caller, &sandbox_id, input.into())
            .await
            .gql()?;
        Ok(super::terminal::TerminalSession {
            id: ID(id),
            sandbox_id,
        })
    }

    /// Types into a terminal (UTF-8 text; control keys as their
    /// characters, e.g. "\r" for Enter).
    async fn terminal_input(
        &self,
        cx: &Context<'_>,
        sandbox_id: ID,
        session_id: ID,
        data: String,
    ) -> async_graphql::Result<bool> {
        let (service, caller) = ctx(cx)?;
        let input = crate::provider::TerminalInput::Data(data.into_bytes().into());
        service
            .terminal_input(caller, &sandbox_id, &session_id, input)
            .await
            .gql()?;
        Ok(true)
    }

    /// Resizes a terminal.
    async fn resize_terminal(
        &self,
        cx: &Context<'_>,
        sandbox_id: ID,
        session_id: ID,
        cols: u16,
        rows: u16,
    ) -> async_graphql::Result<bool> {
        let (service, caller) = ctx(cx)?;
        let input =
            crate::provider::TerminalInput::Resize(crate::provider::TerminalSize { cols, rows });
        service
            .terminal_input(caller, &sandbox_id, &session_id, input)
            .await
            .gql()?;
        Ok(true)
    }

    /// Starts a command and returns its execution at once; follow its
    /// output with the `execOutput` subscription.
    async fn start_exec(
        &self,
        cx: &Context<'_>,
        sandbox_id: ID,
        input: ExecCommandInput,
    ) -> async_graphql::Result<Execution> {
        let (service, caller) = ctx(cx)?;
        let running = service
            .start_exec(caller, &sandbox_id, input.into())
            .await
            .gql()?;
        drop(running.output);
        Ok(Execution(
            service
                .get_execution(caller, &running.execution_id)
                .await
                .gql()?,
        ))
    }

    async fn write_file(
        &self,
        cx: &Context<'_>,
        input: WriteFileInput,
    ) -> async_graphql::Result<bool> {
        let (service, caller) = ctx(cx)?;
        let content = match (input.content, input.content_base64) {
            (Some(text), None) => ContentEncoding::Text.decode(text).gql()?,
            (None, Some(b64)) => ContentEncoding::Base64.decode(b64).gql()?,
            (None, None) => bytes::Bytes::new(),
            (Some(_), Some(_)) => {
                return Err(Error::BadRequest(
                    "give content or contentBase64, not both".into(),
                ))
                .gql();
            }
        };
        let write = FileWrite {
            path: input.path,
            content,
            mode: input.mode,
        };
        service
            .write_file(caller, &input.sandbox_id, write)
            .await
            .gql()?;
        Ok(true)
    }

    async fn delete_file(
        &self,
        cx: &Context<'_>,
        input: DeleteFileInput,
    ) -> async_graphql::Result<bool> {
        let (service, caller) = ctx(cx)?;
        service
            .delete_file(caller, &input.sandbox_id, &input.path, input.recursive)
            .await
            .gql()?;
        Ok(true)
    }

    async fn move_file(
        &self,
        cx: &Context<'_>,
        input: MoveFileInput,
    ) -> async_graphql::Result<bool> {
        let (service, caller) = ctx(cx)?;
        service
            .move_file(caller, &input.sandbox_id, &input.from, &input.to)
            .await
            .gql()?;
        Ok(true)
    }

    async fn chmod_file(
        &self,
        cx: &Context<'_>,
        input: ChmodFileInput,
    ) -> async_graphql::Result<bool> {
        let (service, caller) = ctx(cx)?;
        service
            .chmod_file(caller, &input.sandbox_id, &input.path, &input.mode)
            .await
            .gql()?;
        Ok(true)
    }

    /// Creates a template, or replaces the one with that name.
    async fn save_template(
        &self,
        cx: &Context<'_>,
        input: TemplateInput,
    ) -> async_graphql::Result<Template> {
        let (service, caller) = ctx(cx)?;
        let input = ServiceTemplateInput {
            name: input.name,
            image: input.image,
            memory_mb: input.memory_mb,
            vcpus: input.vcpus,
            disk_mb: input.disk_mb,
            ttl: input.ttl.map(|t| duration::format(t.0)),
            provider: input.provider,
            metadata: input.metadata.map(|m| m.0).unwrap_or_default(),
            worker_labels: input.worker_labels.map(|m| m.0).unwrap_or_default(),
            pool_size: input.pool_size,
        };
        Ok(Template(service.save_template(caller, input).await.gql()?))
    }

    async fn delete_template(&self, cx: &Context<'_>, name: String) -> async_graphql::Result<bool> {
        let (service, caller) = ctx(cx)?;
        service.delete_template(caller, &name).await.gql()?;
        Ok(true)
    }

    /// Sets an owner's quota overrides (admins).
    async fn set_quota(
        &self,
        cx: &Context<'_>,
        input: SetQuotaInput,
    ) -> async_graphql::Result<QuotaPolicy> {
        let (service, caller) = ctx(cx)?;
        let quota = QuotaInput {
            max_sandboxes: input.max_sandboxes,
            max_ttl: input.max_ttl.map(|d| duration::format(d.0)),
            max_exec_timeout: input.max_exec_timeout.map(|d| duration::format(d.0)),
            max_memory_mb: input.max_memory_mb,
            max_vcpus: input.max_vcpus,
            max_disk_mb: input.max_disk_mb,
        };
        Ok(service
            .set_quota(caller, &input.owner_id, quota)
            .await
            .gql()?
            .into())
    }

    /// Clears an owner's quota overrides (admins).
    async fn delete_quota(
        &self,
        cx: &Context<'_>,
        owner_id: String,
    ) -> async_graphql::Result<bool> {
        let (service, caller) = ctx(cx)?;
        service.delete_quota(caller, &owner_id).await.gql()?;
        Ok(true)
    }

    /// Destroys every expired sandbox now; returns how many.
    async fn prune_expired(&self, cx: &Context<'_>) -> async_graphql::Result<u64> {
        let (service, caller) = ctx(cx)?;
        service.prune_expired(caller).await.gql()
    }
}

async fn set_admin_state(
    cx: &Context<'_>,
    id: &ID,
    state: AdminState,
) -> async_graphql::Result<Worker> {
    let (service, caller) = ctx(cx)?;
    Ok(Worker::from(
        service
            .set_worker_admin_state(caller, id, state)
            .await
            .gql()?,
    ))
}
