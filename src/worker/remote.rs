//! A worker in another process (`stacyvm worker`), reached over the
//! protocol of [`super::rpc`]. Its snapshot is what its last heartbeat
//! said; every runtime call is an HTTP request with a timeout, so a slow
//! or lost worker never blocks requests for other workers.

use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::rpc::{self, Answer, ExecFrame};
use super::token::{Audience, WorkerCredentials};
use super::{
    ProviderHealth, RuntimeCall, RuntimeRef, RuntimeReply, Worker, WorkerResult, WorkerSnapshot,
};
use crate::provider::{
    ExecExit, ExecSpec, InventoryItem, OutputChunk, OutputSink, ProviderError, RuntimeHandle,
    SpawnSpec,
};

/// How long a terminal's connection may be silent (the worker pings it
/// every third of it).
pub(crate) const TERMINAL_LIVENESS: Duration = Duration::from_secs(90);

/// Connecting to a worker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A unary call (files, inspect, inventory, ...).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// An inventory (the reconciler waits for it on every pass).
const INVENTORY_TIMEOUT: Duration = Duration::from_secs(15);
/// A spawn may pull an image.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(600);
/// An exec may outlive its own timeout by this much (the worker kills it).
const EXEC_GRACE: Duration = Duration::from_secs(30);
/// The largest unary answer accepted from a worker: a file read at the
/// providers' cap, base64-encoded, and some room.
const MAX_ANSWER: usize = crate::provider::MAX_READ_BYTES / 3 * 4 + (1 << 20);
/// The longest NDJSON line accepted from a worker (a base64 chunk).
const MAX_FRAME: usize = 4 << 20;
/// Idempotent calls (spawn, destroy) are sent this many times at most.
const IDEMPOTENT_ATTEMPTS: u32 = 3;
/// The first wait before resending one; doubles each time.
const RETRY_BACKOFF: Duration = Duration::from_millis(250);
/// How often a call in flight checks whether the worker went silent.
const SILENCE_POLL: Duration = Duration::from_millis(100);

/// A worker reached over RPC.
pub struct RemoteWorker {
    id: String,
    hostname: String,
    endpoint: String,
    credentials: WorkerCredentials,
    client: reqwest::Client,
    snapshot: RwLock<WorkerSnapshot>,
    /// When its last heartbeat arrived.
    /// `None` before the first heartbeat (a worker known from the store
    /// after a restart of the control plane).
    last_seen: Mutex<Option<Instant>>,
    /// The wall-clock time of the last heartbeat (from the store for a
    /// worker known before a restart).
    heard_from: Mutex<DateTime<Utc>>,
    /// Silent this long, it is out of reach: calls in flight give up.
    stale_after: Duration,
    /// The installation it said it runs from (empty until it said).
    instance: RwLock<String>,
}

impl RemoteWorker {
    /// A worker last heard from at `heard_from`, out of reach once silent
    /// for `stale_after` (`lifecycle.worker_stale_after`).
    pub fn new(
        id: &str,
        hostname: &str,
        endpoint: &str,
        credentials: WorkerCredentials,
        heard_from: DateTime<Utc>,
        stale_after: Duration,
    ) -> RemoteWorker {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            // Below the server's idle keep-alive close (server.header_read_timeout):
            // a pooled connection is never reused just as the peer closes it.
            .pool_idle_timeout(crate::api::server::CLIENT_IDLE_TIMEOUT)
            .build()
            .unwrap_or_default();
        RemoteWorker {
            id: id.to_string(),
            hostname: hostname.to_string(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            credentials,
            client,
            snapshot: RwLock::new(WorkerSnapshot::default()),
            last_seen: Mutex::new(None),
            heard_from: Mutex::new(heard_from),
            stale_after,
            instance: RwLock::new(String::new()),
        }
    }

    /// The installation the worker last said it runs from.
    pub fn instance(&self) -> String {
        self.instance.read().map(|i| i.clone()).unwrap_or_default()
    }

    /// Records the installation a heartbeat names.
    pub fn set_instance(&self, instance: &str) {
        if let Ok(mut current) = self.instance.write() {
            instance.clone_into(&mut current);
        }
    }

    /// Resolves once the worker has been silent past `stale_after`, with
    /// when it was last heard from. A call raced against it fails as soon
    /// as the worker is out of reach (a partition) instead of after its
    /// whole timeout.
    async fn silent(&self) -> DateTime<Utc> {
        loop {
            let heard = self.heard_from();
            if !super::is_fresh(heard, self.stale_after) {
                return heard.unwrap_or_else(Utc::now);
            }
            tokio::time::sleep(SILENCE_POLL).await;
        }
    }

    /// `call`, unless the worker goes silent first.
    async fn while_in_reach<T>(
        &self,
        call: impl std::future::Future<Output = WorkerResult<T>>,
    ) -> WorkerResult<T> {
        tokio::select! {
            result = call => result,
            since = self.silent() => Err(ProviderError::Unavailable(format!(
                "worker {} unreachable since {}",
                self.id,
                since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ))),
        }
    }

    /// When its last heartbeat arrived, wherever it was heard.
    pub fn heard_from_at(&self) -> Option<DateTime<Utc>> {
        self.heard_from.lock().ok().map(|t| *t)
    }

    /// Takes a heartbeat another replica heard at `at` (from the store).
    pub fn observe(&self, snapshot: WorkerSnapshot, at: DateTime<Utc>) {
        if let Ok(mut current) = self.snapshot.write() {
            *current = snapshot;
        }
        let ago = (Utc::now() - at).to_std().unwrap_or_default();
        if let Ok(mut seen) = self.last_seen.lock() {
            *seen = Instant::now().checked_sub(ago).or(Some(Instant::now()));
        }
        if let Ok(mut heard) = self.heard_from.lock() {
            *heard = at;
        }
    }

    /// When the worker's last heartbeat arrived.
    pub fn last_seen(&self) -> Option<Instant> {
        self.last_seen.lock().ok().and_then(|t| *t)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Takes what a heartbeat says the worker offers.
    pub fn update_snapshot(&self, snapshot: WorkerSnapshot) {
        if let Ok(mut current) = self.snapshot.write() {
            *current = snapshot;
        }
        if let Ok(mut seen) = self.last_seen.lock() {
            *seen = Some(Instant::now());
        }
        if let Ok(mut heard) = self.heard_from.lock() {
            *heard = Utc::now();
        }
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> ProviderError {
        ProviderError::Unavailable(format!("worker {} is unreachable: {e}", self.id))
    }

    fn request(&self, operation: &str, timeout: Duration) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{}/{operation}", self.endpoint, rpc::PREFIX))
            .bearer_auth(self.credentials.bearer(Audience::Worker))
            .timeout(timeout)
    }

    async fn unary<B: Serialize, T: DeserializeOwned>(
        &self,
        operation: &str,
        body: &B,
        timeout: Duration,
    ) -> WorkerResult<T> {
        self.unary_retried(operation, body, timeout, 1).await
    }

    /// A unary call sent up to `attempts` times while the request itself
    /// fails before the worker answered (refused or reset connection):
    /// only for operations the worker makes idempotent (spawn, destroy).
    async fn unary_retried<B: Serialize, T: DeserializeOwned>(
        &self,
        operation: &str,
        body: &B,
        timeout: Duration,
        attempts: u32,
    ) -> WorkerResult<T> {
        self.while_in_reach(self.unary_once(operation, body, timeout, attempts))
            .await
    }

    async fn unary_once<B: Serialize, T: DeserializeOwned>(
        &self,
        operation: &str,
        body: &B,
        timeout: Duration,
        attempts: u32,
    ) -> WorkerResult<T> {
        let mut attempt = 1;
        let resp = loop {
            match self.request(operation, timeout).json(body).send().await {
                Ok(resp) => break resp,
                Err(e) if attempt < attempts && !e.is_timeout() => {
                    let wait = RETRY_BACKOFF * 2u32.pow(attempt - 1);
                    tracing::warn!(worker = %self.id, operation, error = %e, retry_in = ?wait, "worker call failed before an answer; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(self.unreachable(e)),
            }
        };
        let status = resp.status();
        if !status.is_success() {
            // The body is not echoed: the endpoint is not trusted to say
            // anything a caller should read.
            return Err(ProviderError::Unavailable(format!(
                "worker {} refused {operation}: HTTP {status}",
                self.id
            )));
        }
        let body = self.read_capped(resp, MAX_ANSWER).await?;
        let answer: Answer<T> = serde_json::from_slice(&body).map_err(|e| {
            ProviderError::Runtime(format!("worker {} sent a bad answer: {e}", self.id))
        })?;
        answer.into_result()
    }

    /// A response body of at most `limit` bytes.
    async fn read_capped(&self, resp: reqwest::Response, limit: usize) -> WorkerResult<Vec<u8>> {
        crate::provider::read_capped(resp, limit, &format!("worker {}", self.id)).await
    }

    /// Runs a command on the worker and streams its frames into `sink`.
    /// A terminal's command over the worker's terminal WebSocket.
    async fn terminal(
        &self,
        runtime: &RuntimeRef,
        spec: &ExecSpec,
        mut terminal: crate::provider::Terminal,
        sink: OutputSink,
    ) -> WorkerResult<ExecExit> {
        use futures::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("{}{}/terminal", self.endpoint, rpc::PREFIX)
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        let mut request = url
            .into_client_request()
            .map_err(|e| ProviderError::Runtime(format!("worker {}: {e}", self.id)))?;
        let bearer = format!("Bearer {}", self.credentials.bearer(Audience::Worker));
        request.headers_mut().insert(
            "authorization",
            bearer
                .parse()
                .map_err(|_| ProviderError::Runtime("a worker token that is no header".into()))?,
        );
        let (mut socket, _) =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request))
                .await
                .map_err(|_| {
                    ProviderError::Unavailable(format!("worker {} did not answer", self.id))
                })?
                .map_err(|e| ProviderError::Unavailable(format!("worker {}: {e}", self.id)))?;
        let open = rpc::TerminalOpen {
            runtime: runtime.clone(),
            spec: spec.clone(),
            size: terminal.size,
        };
        let open = serde_json::to_string(&open)
            .map_err(|e| ProviderError::Runtime(format!("a terminal request: {e}")))?;
        let lost = |e: tokio_tungstenite::tungstenite::Error| {
            ProviderError::Unavailable(format!(
                "worker {}: the terminal's connection: {e}",
                self.id
            ))
        };
        socket
            .send(Message::Text(open.into()))
            .await
            .map_err(lost)?;
        let (mut to_worker, mut socket) = socket.split();
        // One writer; typed input never waits on it (what it cannot take
        // is dropped), so the output below is always read.
        let (typed_tx, mut typed_rx) = tokio::sync::mpsc::channel::<Message>(64);
        let _writing = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            while let Some(message) = typed_rx.recv().await {
                if to_worker.send(message).await.is_err() {
                    return;
                }
            }
        }));
        let mut typing = true;
        let mut heard = tokio::time::Instant::now();
        let mut check = tokio::time::interval(TERMINAL_LIVENESS / 3);
        loop {
            tokio::select! {
                _ = check.tick() => {
                    // The worker pings: silence is a lost connection.
                    if heard.elapsed() > TERMINAL_LIVENESS {
                        return Err(ProviderError::Unavailable(format!(
                            "worker {}: the terminal's connection went silent",
                            self.id
                        )));
                    }
                }
                typed = terminal.input.recv(), if typing => {
                    let message = match typed {
                        Some(crate::provider::TerminalInput::Data(data)) => Message::Binary(data),
                        Some(crate::provider::TerminalInput::Resize(size)) => Message::Text(
                            serde_json::to_string(&rpc::TerminalControl::Resize(size))
                                .unwrap_or_default()
                                .into(),
                        ),
                        None => {
                            typing = false;
                            continue;
                        }
                    };
                    if typed_tx.try_send(message).is_err() {
                        tracing::debug!(worker = %self.id, "terminal input dropped: the worker does not keep up");
                    }
                }
                message = socket.next() => {
                    heard = tokio::time::Instant::now();
                    match message {
                        Some(Ok(Message::Binary(data))) => {
                            // Backpressure: a slow session holds the worker's output.
                            let chunk = OutputChunk { stream: crate::provider::StreamKind::Stdout, data };
                            if sink.send(chunk).await.is_err() {
                                return Err(ProviderError::Runtime("nobody reads the terminal".into()));
                            }
                        }
                        Some(Ok(Message::Text(text))) => {
                            return match serde_json::from_str::<rpc::TerminalEnd>(&text) {
                                Ok(rpc::TerminalEnd::Exit(exit)) => Ok(exit),
                                Ok(rpc::TerminalEnd::Error(e)) => Err(e.into()),
                                Err(e) => Err(ProviderError::Runtime(format!(
                                    "worker {} sent a bad terminal end: {e}",
                                    self.id
                                ))),
                            };
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(lost(e)),
                        None => {
                            return Err(ProviderError::Unavailable(format!(
                                "worker {} closed the terminal's connection",
                                self.id
                            )));
                        }
                    }
                }
            }
        }
    }

    async fn exec_stream(
        &self,
        runtime: &RuntimeRef,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> WorkerResult<ExecExit> {
        let body = rpc::Exec {
            runtime: runtime.clone(),
            spec: spec.clone(),
        };
        let resp = self
            .request("exec", spec.timeout + EXEC_GRACE)
            .json(&body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() {
            return Err(ProviderError::Unavailable(format!(
                "worker {} refused exec: {}",
                self.id,
                resp.status()
            )));
        }
        let mut stream = resp.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        let mut listening = true;
        loop {
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let frame: ExecFrame = serde_json::from_slice(&line).map_err(|e| {
                    ProviderError::Runtime(format!("worker {} sent a bad frame: {e}", self.id))
                })?;
                match frame {
                    ExecFrame::Output { stream, data } => {
                        // Backpressure: wait for the consumer. One that
                        // left stops listening; the command runs on.
                        if listening && sink.send(OutputChunk { stream, data }).await.is_err() {
                            listening = false;
                        }
                    }
                    ExecFrame::Exit(exit) => return Ok(exit),
                    ExecFrame::Error(e) => return Err(e.into()),
                }
            }
            if pending.len() > MAX_FRAME {
                return Err(ProviderError::Runtime(format!(
                    "worker {} sent a frame over {} MiB",
                    self.id,
                    MAX_FRAME >> 20
                )));
            }
            match stream.next().await {
                Some(Ok(bytes)) => pending.extend_from_slice(&bytes),
                Some(Err(e)) => return Err(self.unreachable(e)),
                None => {
                    return Err(ProviderError::Unavailable(format!(
                        "worker {} ended the command's stream without an exit status",
                        self.id
                    )));
                }
            }
        }
    }
}

#[async_trait]
impl Worker for RemoteWorker {
    fn id(&self) -> &str {
        &self.id
    }

    fn hostname(&self) -> &str {
        &self.hostname
    }

    fn in_process(&self) -> bool {
        false
    }

    fn heard_from(&self) -> Option<DateTime<Utc>> {
        self.heard_from.lock().ok().map(|t| *t)
    }

    fn snapshot(&self) -> WorkerSnapshot {
        self.snapshot.read().map(|s| s.clone()).unwrap_or_default()
    }

    async fn check_health(&self) -> BTreeMap<String, ProviderHealth> {
        match self
            .unary::<_, rpc::HealthResults>("check_health", &(), CALL_TIMEOUT)
            .await
        {
            Ok(results) => {
                if let Ok(mut snapshot) = self.snapshot.write() {
                    for p in &mut snapshot.providers {
                        if let Some(h) = results.get(&p.name) {
                            p.health = Some(h.clone());
                        }
                    }
                }
                results
            }
            Err(e) => {
                tracing::warn!(worker = %self.id, error = %e, "worker health check failed");
                BTreeMap::new()
            }
        }
    }

    async fn recover_at_startup(&self) -> WorkerResult<usize> {
        // A remote worker recovers its own providers when it starts.
        Ok(0)
    }

    async fn image_available(&self, provider: &str, image: &str) -> WorkerResult<bool> {
        let body = rpc::ImageAvailable {
            provider: provider.to_string(),
            image: image.to_string(),
        };
        self.unary("image_available", &body, SPAWN_TIMEOUT).await
    }

    async fn spawn(
        &self,
        provider: &str,
        spec: &SpawnSpec,
        lease: u64,
    ) -> WorkerResult<RuntimeHandle> {
        let body = rpc::Spawn {
            provider: provider.to_string(),
            spec: spec.clone(),
            lease,
        };
        self.unary_retried("spawn", &body, SPAWN_TIMEOUT, IDEMPOTENT_ATTEMPTS)
            .await
    }

    async fn inventory(&self, provider: &str) -> WorkerResult<Vec<InventoryItem>> {
        let body = rpc::Inventory {
            provider: provider.to_string(),
        };
        self.unary("inventory", &body, INVENTORY_TIMEOUT).await
    }

    async fn exec(
        &self,
        runtime: &RuntimeRef,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> WorkerResult<ExecExit> {
        // Dropping the stream (the worker went silent) cancels the command
        // there once the connection closes.
        self.while_in_reach(self.exec_stream(runtime, spec, sink))
            .await
    }

    async fn exec_terminal(
        &self,
        runtime: &RuntimeRef,
        spec: &ExecSpec,
        terminal: crate::provider::Terminal,
        sink: OutputSink,
    ) -> WorkerResult<ExecExit> {
        self.while_in_reach(self.terminal(runtime, spec, terminal, sink))
            .await
    }

    async fn call(&self, runtime: &RuntimeRef, call: RuntimeCall) -> WorkerResult<RuntimeReply> {
        let attempts = match call {
            RuntimeCall::Destroy => IDEMPOTENT_ATTEMPTS,
            _ => 1,
        };
        let body = rpc::Call {
            runtime: runtime.clone(),
            call,
        };
        self.unary_retried("call", &body, CALL_TIMEOUT, attempts)
            .await
    }
}
