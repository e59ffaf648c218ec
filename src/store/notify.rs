//! PostgreSQL notifications between replicas (`NOTIFY` / `LISTEN`).

use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{ConnectionTrait, DbBackend, Statement};

use super::{Store, StoreError, StoreResult};

impl Store {
    /// Sends `payload` to every replica listening on `channel`. A no-op on
    /// SQLite, which has a single replica.
    pub async fn notify(&self, channel: &str, payload: &str) -> StoreResult<()> {
        if !self.is_shared() {
            return Ok(());
        }
        self.conn()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_notify($1, $2)",
                [channel.into(), payload.into()],
            ))
            .await?;
        Ok(())
    }

    /// A listener on `channel`, on its own connection (PostgreSQL only).
    pub async fn listen(&self, channel: &str) -> StoreResult<PgListener> {
        if !self.is_shared() {
            return Err(StoreError::Connect("notifications need PostgreSQL".into()));
        }
        let pool = self.conn().get_postgres_connection_pool();
        let mut listener = PgListener::connect_with(pool)
            .await
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        listener
            .listen(channel)
            .await
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        Ok(listener)
    }
}
