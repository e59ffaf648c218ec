//! The `memory` provider: sandbox records without a runtime, for measuring
//! the control plane alone (`stacyvm bench --scale`).
//!
//! A spawn adds an entry to a map and a destroy removes it; `inspect` and
//! `inventory` answer from the map, so the reconciler, the reaper and the
//! API treat these sandboxes like any other. Nothing runs: exec and every
//! file operation answer `Unsupported` rather than pretend. It is off
//! unless `providers.memory.enabled` is set, and never the default.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    Capability, ExecExit, ExecSpec, FileEntry, InventoryItem, OutputSink, Provider, ProviderError,
    ProviderResult, RuntimeHandle, RuntimeStatus, SpawnSpec,
};

const NAME: &str = "memory";

/// Runtimes that are entries in a map.
pub struct MemoryProvider {
    /// runtime id -> (sandbox id, created at).
    runtimes: Mutex<HashMap<String, (String, chrono::DateTime<chrono::Utc>)>>,
    /// The most entries at once.
    max: usize,
}

impl MemoryProvider {
    pub fn new(max: usize) -> Self {
        MemoryProvider {
            runtimes: Mutex::new(HashMap::new()),
            max,
        }
    }

    fn runtimes(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (String, chrono::DateTime<chrono::Utc>)>> {
        self.runtimes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unsupported<T>(operation: &'static str) -> ProviderResult<T> {
        Err(ProviderError::Unsupported {
            provider: NAME,
            operation,
        })
    }
}

/// A runtime id of this provider: the sandbox id with a prefix.
fn runtime_id(sandbox_id: &str) -> String {
    format!("mem-{sandbox_id}")
}

#[async_trait]
impl Provider for MemoryProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Vec<Capability> {
        Vec::new()
    }

    fn isolation(&self) -> &'static str {
        "none: runs nothing (records only, for benchmarks)"
    }

    async fn health(&self) -> ProviderResult<()> {
        Ok(())
    }

    async fn image_available(&self, _image: &str) -> ProviderResult<bool> {
        Ok(true)
    }

    async fn spawn(&self, spec: &SpawnSpec) -> ProviderResult<RuntimeHandle> {
        let id = runtime_id(&spec.sandbox_id);
        let mut runtimes = self.runtimes();
        if !runtimes.contains_key(&id) && runtimes.len() >= self.max {
            return Err(ProviderError::Unavailable(format!(
                "the memory provider holds at most {} sandboxes",
                self.max
            )));
        }
        runtimes
            .entry(id.clone())
            .or_insert_with(|| (spec.sandbox_id.clone(), chrono::Utc::now()));
        Ok(RuntimeHandle { runtime_id: id })
    }

    async fn destroy(&self, runtime_id: &str) -> ProviderResult<()> {
        self.runtimes().remove(runtime_id);
        Ok(())
    }

    async fn destroy_by_sandbox_id(&self, sandbox_id: &str) -> ProviderResult<()> {
        self.runtimes().remove(&runtime_id(sandbox_id));
        Ok(())
    }

    async fn inspect(&self, runtime_id: &str) -> ProviderResult<RuntimeStatus> {
        Ok(if self.runtimes().contains_key(runtime_id) {
            RuntimeStatus::Running
        } else {
            RuntimeStatus::Missing
        })
    }

    async fn inventory(&self) -> ProviderResult<Vec<InventoryItem>> {
        Ok(self
            .runtimes()
            .iter()
            .map(|(runtime_id, (sandbox_id, created_at))| InventoryItem {
                sandbox_id: sandbox_id.clone(),
                runtime_id: runtime_id.clone(),
                created_at: Some(*created_at),
                status: RuntimeStatus::Running,
            })
            .collect())
    }

    async fn exec(
        &self,
        _runtime_id: &str,
        _spec: &ExecSpec,
        _sink: OutputSink,
    ) -> ProviderResult<ExecExit> {
        Self::unsupported("exec")
    }

    async fn write_file(
        &self,
        _runtime_id: &str,
        _path: &str,
        _content: Bytes,
        _mode: u32,
    ) -> ProviderResult<()> {
        Self::unsupported("files")
    }

    async fn read_file(&self, _runtime_id: &str, _path: &str) -> ProviderResult<Bytes> {
        Self::unsupported("files")
    }

    async fn list_files(&self, _runtime_id: &str, _path: &str) -> ProviderResult<Vec<FileEntry>> {
        Self::unsupported("files")
    }

    async fn stat_file(&self, _runtime_id: &str, _path: &str) -> ProviderResult<FileEntry> {
        Self::unsupported("files")
    }

    async fn move_file(&self, _runtime_id: &str, _from: &str, _to: &str) -> ProviderResult<()> {
        Self::unsupported("files")
    }

    async fn chmod_file(&self, _runtime_id: &str, _path: &str, _mode: u32) -> ProviderResult<()> {
        Self::unsupported("files")
    }

    async fn delete_file(
        &self,
        _runtime_id: &str,
        _path: &str,
        _recursive: bool,
    ) -> ProviderResult<()> {
        Self::unsupported("files")
    }

    async fn glob_files(&self, _runtime_id: &str, _pattern: &str) -> ProviderResult<Vec<String>> {
        Self::unsupported("files")
    }

    async fn logs(&self, _runtime_id: &str, _lines: usize) -> ProviderResult<Vec<String>> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> SpawnSpec {
        SpawnSpec {
            sandbox_id: id.into(),
            image: "any".into(),
            memory_mb: 16,
            vcpus: 1,
            disk_mb: 16,
        }
    }

    #[tokio::test]
    async fn records_come_and_go_within_the_bound() {
        let p = MemoryProvider::new(2);
        let a = p.spawn(&spec("sb-a")).await.expect("spawn");
        // A repeated spawn of one sandbox is the same runtime.
        assert_eq!(
            p.spawn(&spec("sb-a")).await.expect("again").runtime_id,
            a.runtime_id
        );
        p.spawn(&spec("sb-b")).await.expect("spawn");
        assert!(matches!(
            p.spawn(&spec("sb-c")).await,
            Err(ProviderError::Unavailable(_))
        ));
        assert_eq!(p.inventory().await.expect("inventory").len(), 2);
        assert!(matches!(
            p.inspect(&a.runtime_id).await,
            Ok(RuntimeStatus::Running)
        ));
        p.destroy(&a.runtime_id).await.expect("destroy");
        assert!(matches!(
            p.inspect(&a.runtime_id).await,
            Ok(RuntimeStatus::Missing)
        ));
        let (sink, _output) = tokio::sync::mpsc::channel(1);
        let command = ExecSpec {
            argv: vec!["true".into()],
            env: Default::default(),
            workdir: None,
            timeout: std::time::Duration::from_secs(1),
        };
        assert!(matches!(
            p.exec(&a.runtime_id, &command, sink).await,
            Err(ProviderError::Unsupported { .. })
        ));
    }
}
