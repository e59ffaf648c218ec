//! Execution records: one per command run.

use chrono::Utc;
use entity::execution::{self, Column, Entity};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder,
};

use super::{Store, StoreResult};

/// How an execution ended, written once when it does.
#[derive(Debug, Clone)]
pub struct ExecutionFinish {
    /// How it ended (never `running`).
    pub status: crate::lifecycle::ExecStatus,
    pub exit_code: Option<i32>,
    pub duration_ms: i64,
    pub stdout_tail: String,
    pub stderr_tail: String,
    pub error: Option<String>,
}

impl Store {
    /// Records a command that is about to run.
    pub async fn insert_execution(&self, model: execution::Model) -> StoreResult<()> {
        model.into_active_model().insert(self.conn()).await?;
        Ok(())
    }

    /// Records how a command ended.
    pub async fn finish_execution(&self, id: &str, finish: ExecutionFinish) -> StoreResult<()> {
        // One statement: the exec path's last store call before the answer.
        use sea_orm::sea_query::Expr;
        Entity::update_many()
            .col_expr(Column::Status, Expr::value(finish.status.to_string()))
            .col_expr(Column::ExitCode, Expr::value(finish.exit_code))
            .col_expr(Column::DurationMs, Expr::value(Some(finish.duration_ms)))
            .col_expr(Column::StdoutTail, Expr::value(finish.stdout_tail))
            .col_expr(Column::StderrTail, Expr::value(finish.stderr_tail))
            .col_expr(Column::Error, Expr::value(finish.error))
            .col_expr(Column::FinishedAt, Expr::value(Some(Utc::now())))
            .filter(Column::Id.eq(id))
            .exec(self.conn())
            .await?;
        Ok(())
    }

    /// Marks every execution replica `replica_id` was running as
    /// `interrupted` with `reason` (it is gone, and the command's stream
    /// with it). Returns how many.
    pub async fn interrupt_executions_of_replica(
        &self,
        replica_id: &str,
        reason: &str,
    ) -> StoreResult<u64> {
        use sea_orm::sea_query::Expr;
        let result = Entity::update_many()
            .col_expr(
                Column::Status,
                Expr::value(crate::lifecycle::ExecStatus::Interrupted.as_str()),
            )
            .col_expr(Column::Error, Expr::value(Some(reason.to_string())))
            .col_expr(Column::FinishedAt, Expr::value(Some(Utc::now())))
            .filter(Column::Status.eq(crate::lifecycle::ExecStatus::Running.as_str()))
            .filter(Column::ReplicaId.eq(replica_id))
            .exec(self.conn())
            .await?;
        Ok(result.rows_affected)
    }

    /// An execution by id.
    pub async fn get_execution(&self, id: &str) -> StoreResult<Option<execution::Model>> {
        Ok(Entity::find_by_id(id.to_string()).one(self.conn()).await?)
    }

    /// Executions of several sandboxes in one query, oldest first.
    pub async fn executions_of(
        &self,
        sandbox_ids: &[String],
    ) -> StoreResult<Vec<execution::Model>> {
        Ok(Entity::find()
            .filter(Column::SandboxId.is_in(sandbox_ids.iter().map(String::as_str)))
            .order_by_asc(Column::CreatedAt)
            .order_by_asc(Column::Id)
            .all(self.conn())
            .await?)
    }

    /// One page of a sandbox's executions, oldest first, after `after`.
    pub async fn page_executions(
        &self,
        sandbox_id: &str,
        after: Option<&super::PageCursor>,
        limit: u64,
    ) -> StoreResult<Vec<execution::Model>> {
        use sea_orm::QuerySelect;
        let mut query = Entity::find().filter(Column::SandboxId.eq(sandbox_id));
        if let Some(after) = after {
            query = query.filter(super::after_cursor(Column::CreatedAt, Column::Id, after));
        }
        Ok(query
            .order_by_asc(Column::CreatedAt)
            .order_by_asc(Column::Id)
            .limit(limit)
            .all(self.conn())
            .await?)
    }
}
