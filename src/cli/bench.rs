//! `stacyvm bench`: StacyVM measured beside the raw runtime, in one run.
//!
//! The benchmark starts real `stacyvm serve` processes (this executable)
//! on loopback with throw-away data directories, talks to them over REST
//! as a user would, and runs the same work straight against the runtime
//! (the Docker Engine API through bollard, a plain fork+exec on the host)
//! side by side. It prints a Markdown table and, with `--json`, writes the
//! figures as JSON. Nothing is asserted: the table says which target each
//! figure is held against.
//!
//! Docker parts run when the daemon answers, native parts when a rootfs
//! tarball is given (`--rootfs`) and the host can run native sandboxes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use super::CliError;

mod scale;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Fewer iterations (CI): figures, not conclusions.
    pub quick: bool,
    /// The docker image sandboxes and raw containers use.
    pub image: String,
    /// A rootfs tarball for the native provider; `None` skips native.
    pub rootfs: Option<PathBuf>,
    /// Where to write the JSON figures.
    pub json: Option<PathBuf>,
    /// Live records for the control-plane scale part (0 skips it).
    pub scale: usize,
    /// Idle GraphQL subscriptions held at once in the scale part.
    pub subscriptions: usize,
}

/// Latency figures of one series, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    /// The exec targets: p50 at most `p50_ms`, p99 at most 3x p50.
    fn meets(&self, p50_ms: f64) -> bool {
        self.p50_ms <= p50_ms && self.p99_ms <= 3.0 * self.p50_ms
    }

    /// Figures of samples already in milliseconds; `None` without any.
    fn of_ms(samples: Vec<f64>) -> Option<Latency> {
        (!samples.is_empty()).then(|| {
            Latency::of(
                samples
                    .into_iter()
                    .map(|m| Duration::from_secs_f64(m.max(0.0) / 1000.0))
                    .collect(),
            )
        })
    }

    fn of(mut samples: Vec<Duration>) -> Latency {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let at = |q: f64| {
            let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples.get(i).copied().map(ms).unwrap_or(f64::NAN)
        };
        let mean = if samples.is_empty() {
            f64::NAN
        } else {
            samples.iter().copied().map(ms).sum::<f64>() / samples.len() as f64
        };
        Latency {
            n: samples.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            mean_ms: mean,
        }
    }
}

/// One line of the table: StacyVM's figure, the raw runtime's, the target.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub what: String,
    pub stacyvm: String,
    pub raw: String,
    pub ratio: Option<f64>,
    pub target: String,
    /// `None` where the row has no target to meet.
    pub met: Option<bool>,
}

/// Everything one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: String,
    pub rows: Vec<Row>,
    pub figures: BTreeMap<String, Value>,
    pub skipped: Vec<String>,
}

impl Report {
    fn row(
        &mut self,
        what: &str,
        stacyvm: String,
        raw: String,
        ratio: Option<f64>,
        target: &str,
        met: Option<bool>,
    ) {
        self.rows.push(Row {
            what: what.into(),
            stacyvm,
            raw,
            ratio,
            target: target.into(),
            met,
        });
    }

    /// The table, in Markdown.
    pub fn markdown(&self) -> String {
        let mut out = format!("Machine: {}\n\n", self.machine);
        out.push_str("| measure | StacyVM | raw runtime | ratio | target | met |\n");
        out.push_str("|---|---|---|---|---|---|\n");
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.what,
                r.stacyvm,
                r.raw,
                r.ratio.map(|x| format!("{x:.2}x")).unwrap_or_default(),
                r.target,
                match r.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "",
                }
            ));
        }
        for s in &self.skipped {
            out.push_str(&format!("\nskipped: {s}\n"));
        }
        out
    }
}

fn ms(latency: &Latency) -> String {
    format!("p50 {:.2} ms, p99 {:.2} ms", latency.p50_ms, latency.p99_ms)
}

/// A `stacyvm serve` child process on a free loopback port.
struct Server {
    child: tokio::process::Child,
    url: String,
    /// A private directory (mkdtemp, 0700), removed when dropped.
    dir: tempfile::TempDir,
    /// The server's API key (sent by every client of the run).
    key: String,
    http: reqwest::Client,
}

impl Server {
    async fn start(name: &str, config: &str, setup: &[Vec<String>]) -> Result<Server, CliError> {
        Self::start_with(name, config, setup, "warn").await
    }

    /// A server without setup steps, logging at `rust_log` into its
    /// `server.log`.
    async fn start_logging(name: &str, config: &str, rust_log: &str) -> Result<Server, CliError> {
        Self::start_with(name, config, &[], rust_log).await
    }

    async fn start_with(
        name: &str,
        config: &str,
        setup: &[Vec<String>],
        rust_log: &str,
    ) -> Result<Server, CliError> {
        let exe = std::env::current_exe().map_err(|e| CliError::Other(e.to_string()))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("stacyvm-bench-{name}-"))
            .tempdir()
            .map_err(|e| CliError::Other(format!("a temporary directory: {e}")))?;
        let dir = tmp.path().to_path_buf();
        let config_path = dir.join("config.yaml");
        // Never an open server, even on loopback for a minute; and the
        // sandboxes go with it.
        let key = uuid::Uuid::new_v4().simple().to_string();
        // One `lifecycle:` mapping: YAML keeps only the last of two.
        let at = if config.starts_with("lifecycle:\n") {
            Some(0)
        } else {
            config.find("\nlifecycle:\n").map(|i| i + 1)
        };
        let config = match at.map(|i| config.split_at(i + "lifecycle:\n".len())) {
            Some((before, after)) => {
                format!("{before}  destroy_on_shutdown: true\n{after}auth:\n  api_key: {key}\n")
            }
            None => format!(
                "{config}auth:\n  api_key: {key}\nlifecycle:\n  destroy_on_shutdown: true\n"
            ),
        };
        std::fs::write(&config_path, config).map_err(|e| CliError::Other(e.to_string()))?;
        for args in setup {
            let status = tokio::process::Command::new(&exe)
                .arg("--data-dir")
                .arg(&dir)
                .arg("--config")
                .arg(&config_path)
                .args(args)
                .stdout(Stdio::null())
                .status()
                .await
                .map_err(|e| CliError::Other(e.to_string()))?;
            if !status.success() {
                return Err(CliError::Other(format!(
                    "stacyvm {args:?} failed: {status}"
                )));
            }
        }
        let port = free_port()?;
        let child = tokio::process::Command::new(&exe)
            .arg("--data-dir")
            .arg(&dir)
            .arg("--config")
            .arg(&config_path)
            .arg("serve")
            .arg("--port")
            .arg(port.to_string())
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("server.log"))
                    .map_err(|e| CliError::Other(e.to_string()))?,
            )
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| CliError::Other(format!("starting stacyvm serve: {e}")))?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            "X-API-Key",
            key.parse()
                .map_err(|_| CliError::Other("the bench key".into()))?,
        );
        let server = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir: tmp,
            key: key.clone(),
            http: reqwest::Client::builder()
                .default_headers(headers)
                .pool_max_idle_per_host(64)
                .timeout(Duration::from_secs(120))
                .build()
                .map_err(|e| CliError::Other(e.to_string()))?,
        };
        for _ in 0..200 {
            if server
                .http
                .get(format!("{}/api/v1/health", server.url))
                .send()
                .await
                .is_ok()
            {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(CliError::Other(format!(
            "stacyvm serve did not come up; see {}",
            server.dir.path().join("server.log").display()
        )))
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        let resp = self
            .http
            .post(format!("{}/api/v1{path}", self.url))
            .json(body)
            .send()
            .await
            .map_err(|e| CliError::Other(format!("POST {path}: {e}")))?;
        answer(resp).await
    }

    async fn get(&self, path: &str) -> Result<Value, CliError> {
        let resp = self
            .http
            .get(format!("{}/api/v1{path}", self.url))
            .send()
            .await
            .map_err(|e| CliError::Other(format!("GET {path}: {e}")))?;
        answer(resp).await
    }

    /// Waits (up to a minute) until the server's pools hold `warm`.
    async fn wait_pool_full(&self, warm: u64) -> Result<(), CliError> {
        for _ in 0..1200 {
            if self.get("/pool/status").await?["warm"].as_u64() >= Some(warm) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(CliError::Other(format!(
            "the warm pool never held {warm} sandboxes"
        )))
    }

    async fn spawn(&self, body: &Value) -> Result<String, CliError> {
        let created = self.post("/sandboxes", body).await?;
        created["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| CliError::Other(format!("spawn answered {created}")))
    }

    async fn destroy(&self, id: &str) {
        if let Err(e) = self
            .http
            .delete(format!("{}/api/v1/sandboxes/{id}", self.url))
            .send()
            .await
        {
            tracing::warn!(%id, error = %e, "bench: destroying a sandbox failed");
        }
    }

    /// One exec of `true` (argv mode) through REST: its round trip.
    async fn exec_once(&self, id: &str) -> Result<Duration, CliError> {
        let body = json!({"command": "true", "mode": "argv"});
        let t = Instant::now();
        let answer = self.post(&format!("/sandboxes/{id}/exec"), &body).await?;
        let took = t.elapsed();
        if answer["exit_code"] != 0 {
            return Err(CliError::Other(format!("exec answered {answer}")));
        }
        Ok(took)
    }

    /// The server's peak resident set so far, in KiB.
    fn peak_rss_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM:")
    }

    /// The server's resident set now, in KiB.
    fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The times (ms) of the reconcile passes the server logged over at
    /// least `records` records (its log at debug for the reconciler),
    /// those that read every record (`full`) or the others.
    fn reconcile_passes(&self, records: usize, full: bool) -> Vec<f64> {
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let field = |line: &str, name: &str| -> Option<u64> {
            let rest = line.split(&format!("{name}=")).nth(1)?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        log.lines()
            .filter(|l| l.contains("reconcile pass"))
            .filter(|l| l.contains(&format!("full={full}")))
            .filter_map(|l| Some((field(l, "records")?, field(l, "took_us")?)))
            .filter(|(n, _)| *n as usize >= records)
            .map(|(_, us)| us as f64 / 1000.0)
            .collect()
    }

    /// A GraphQL query over HTTP; an answer with errors is an error.
    async fn post_graphql(&self, query: &str, variables: Value) -> Result<Value, CliError> {
        let resp = self
            .http
            .post(format!("{}/graphql", self.url))
            .json(&json!({"query": query, "variables": variables}))
            .send()
            .await
            .map_err(|e| CliError::Other(format!("POST /graphql: {e}")))?;
        let value = answer(resp).await?;
        if value.get("errors").is_some() {
            return Err(CliError::Other(format!("GraphQL answered {value}")));
        }
        Ok(value)
    }

    /// Kills the server at once (SIGKILL): for a run whose sandboxes hold
    /// nothing outside the data directory.
    async fn kill(mut self) {
        crate::provider::best_effort_quiet("killing the bench server", self.child.kill().await);
    }

    async fn stop(mut self) {
        if let Some(pid) = self.pid() {
            // SIGTERM: the server destroys its sandboxes on the way out.
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!("bench: the server did not stop in 30 s; killing it");
            crate::provider::best_effort_quiet("killing the bench server", self.child.kill().await);
        }
        // The data directory goes with `self.dir`.
    }
}

/// Lifts this process's open-file limit to its hard limit: the scale part
/// holds a WebSocket per subscription here and in the server (which
/// inherits the limit).
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "bench: cannot raise the open-file limit");
        }
    }
}

/// A response's JSON body; a non-2xx answer is an error carrying it.
async fn answer(resp: reqwest::Response) -> Result<Value, CliError> {
    let status = resp.status();
    let value: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(CliError::Refused {
            status: status.as_u16(),
            code: value["code"].as_str().unwrap_or_default().to_string(),
            message: value.to_string(),
        });
    }
    Ok(value)
}

fn free_port() -> Result<u16, CliError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| CliError::Other(e.to_string()))?;
    Ok(listener
        .local_addr()
        .map_err(|e| CliError::Other(e.to_string()))?
        .port())
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib as f64 / (1024.0 * 1024.0))
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let build = if cfg!(debug_assertions) {
        "debug build: figures are not representative"
    } else {
        "release build"
    };
    format!(
        "{cores} cores ({cpu}), {mem_gib:.0} GiB, Linux {}; stacyvm {} ({build})",
        kernel.trim(),
        env!("CARGO_PKG_VERSION")
    )
}

/// Raw Engine API work on the same daemon: the baseline.
struct RawDocker {
    docker: Docker,
    image: String,
}

impl RawDocker {
    async fn create_start(&self) -> Result<String, CliError> {
        let name = format!("stacyvm-bench-raw-{}", uuid::Uuid::new_v4().as_simple());
        let body = ContainerCreateBody {
            image: Some(self.image.clone()),
            entrypoint: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "trap 'exit 143' TERM; while :; do sleep 3600 & wait $!; done".into(),
            ]),
            labels: Some(std::collections::HashMap::from([(
                "io.stacyvm.bench".to_string(),
                "raw".to_string(),
            )])),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| CliError::Other(format!("raw create: {e}")))?;
        self.docker
            .start_container(&created.id, None)
            .await
            .map_err(|e| CliError::Other(format!("raw start: {e}")))?;
        Ok(created.id)
    }

    /// Removes every raw container a bench run made (this one's, and any
    /// an interrupted run left).
    async fn remove_all(&self) {
        let filters = std::collections::HashMap::from([(
            "label".to_string(),
            vec!["io.stacyvm.bench=raw".to_string()],
        )]);
        let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        match self.docker.list_containers(Some(options)).await {
            Ok(list) => {
                for id in list.into_iter().filter_map(|c| c.id) {
                    self.remove(&id).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "bench: listing raw containers failed"),
        }
    }

    async fn remove(&self, id: &str) {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        if let Err(e) = self.docker.remove_container(id, Some(options)).await {
            tracing::warn!(container = %id, error = %e, "bench: removing a raw container failed");
        }
    }

    async fn exec(&self, id: &str) -> Result<(), CliError> {
        let options = CreateExecOptions {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(vec!["true".to_string()]),
            ..Default::default()
        };
        let err = |e: bollard::errors::Error| CliError::Other(format!("raw exec: {e}"));
        let created = self.docker.create_exec(id, options).await.map_err(err)?;
        if let StartExecResults::Attached { mut output, .. } = self
            .docker
            .start_exec(&created.id, None)
            .await
            .map_err(err)?
        {
            while output.next().await.is_some() {}
        }
        self.docker.inspect_exec(&created.id).await.map_err(err)?;
        Ok(())
    }
}

/// Runs `f` `n` times at once; the wall time of the whole batch.
async fn parallel<F, Fut, T>(n: usize, f: F) -> (Duration, Vec<Result<T, CliError>>)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, CliError>>,
{
    let t = Instant::now();
    let results = futures::future::join_all((0..n).map(|_| f())).await;
    (t.elapsed(), results)
}

/// Requests per second of `GET url` and the p99 latency in ms, measured
/// by `wrk` (Debian's package) where it is installed: a load generator in
/// C on its own threads, not sharing this process's runtime. The figure
/// says which tool measured it.
async fn load(
    server: &Server,
    url: String,
    connections: usize,
    duration: Duration,
) -> Result<(f64, f64, &'static str), CliError> {
    let wrk = tokio::process::Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{}s", duration.as_secs().max(1)),
            "--latency",
            "-H",
            &format!("X-API-Key: {}", server.key),
            &url,
        ])
        .stderr(Stdio::null())
        .output()
        .await;
    if let Ok(out) = wrk
        && out.status.success()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        // A refused request (401, 429) is cheap: a rate of those is no
        // figure.
        if text.contains("Non-2xx or 3xx responses") {
            return Err(CliError::Other(format!(
                "wrk got answers other than 2xx from {url}:\n{text}"
            )));
        }
        if let Some(parsed) = parse_wrk(&text) {
            return Ok((parsed.0, parsed.1, "wrk"));
        }
        tracing::warn!("bench: cannot read wrk's output:\n{text}");
    }
    let (rate, latency) = throughput(&server.http, url, connections, duration).await?;
    Ok((rate, latency.p99_ms, "built-in client"))
}

/// Requests/s and the 99th percentile (ms) from `wrk --latency` output.
fn parse_wrk(text: &str) -> Option<(f64, f64)> {
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))?
        .trim();
    let ms = if let Some(v) = p99.strip_suffix("us") {
        v.parse::<f64>().ok()? / 1000.0
    } else if let Some(v) = p99.strip_suffix("ms") {
        v.parse().ok()?
    } else if let Some(v) = p99.strip_suffix('s') {
        v.parse::<f64>().ok()? * 1000.0
    } else {
        return None;
    };
    Some((rate, ms))
}

/// Requests per second of `GET path` from `connections` clients for
/// `duration`, with the latency of each request.
async fn throughput(
    http: &reqwest::Client,
    url: String,
    connections: usize,
    duration: Duration,
) -> Result<(f64, Latency), CliError> {
    let url = Arc::new(url);
    let end = Instant::now() + duration;
    let tasks = (0..connections).map(|_| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let (mut samples, mut failures) = (Vec::new(), 0usize);
            while Instant::now() < end {
                let t = Instant::now();
                let ok = match http.get(url.as_str()).send().await {
                    Ok(resp) => resp.status().is_success() && resp.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    samples.push(t.elapsed());
                } else {
                    failures += 1;
                }
            }
            (samples, failures)
        }
    });
    let t = Instant::now();
    let (mut samples, mut failures) = (Vec::new(), 0);
    for (s, f) in futures::future::join_all(tasks).await {
        samples.extend(s);
        failures += f;
    }
    if failures > 0 {
        return Err(CliError::Other(format!(
            "{failures} requests to {url} failed during the load"
        )));
    }
    let rate = samples.len() as f64 / t.elapsed().as_secs_f64();
    Ok((rate, Latency::of(samples)))
}

/// The raw floor of a command on this host: one fork+exec of `true`.
async fn fork_once() -> Result<Duration, CliError> {
    let t = Instant::now();
    tokio::process::Command::new("true")
        .status()
        .await
        .map_err(|e| CliError::Other(format!("true: {e}")))?;
    Ok(t.elapsed())
}

/// Runs the benchmark and prints the table.
pub async fn run(options: BenchOptions) -> Result<Report, CliError> {
    raise_open_files_limit();
    let mut report = Report {
        machine: machine(),
        ..Default::default()
    };
    let n_exec = if options.quick { 50 } else { 500 };
    let n_spawn = if options.quick { 5 } else { 20 };
    let n_parallel = 20;
    let load_time = Duration::from_secs(if options.quick { 2 } else { 5 });

    let docker = match Docker::connect_with_local_defaults() {
        Ok(d) => match d.ping().await {
            Ok(_) => Some(d),
            Err(e) => {
                report
                    .skipped
                    .push(format!("docker: the daemon does not answer ({e})"));
                None
            }
        },
        Err(e) => {
            report.skipped.push(format!("docker: {e}"));
            None
        }
    };

    if let Some(docker) = docker {
        docker_part(
            &mut report,
            docker,
            &options,
            n_exec,
            n_spawn,
            n_parallel,
            load_time,
        )
        .await?;
    }
    match &options.rootfs {
        Some(rootfs) => native_part(&mut report, rootfs, n_exec).await?,
        None => report.skipped.push("native: no --rootfs given".into()),
    }
    if options.scale > 0 {
        // Its figures stand apart: a failure there keeps the rest.
        if let Err(e) =
            scale::scale_part(&mut report, options.scale, options.subscriptions, load_time).await
        {
            report.skipped.push(format!("scale: {e}"));
        }
    }
    let markdown = report.markdown();
    println!("{markdown}");
    if let Some(path) = &options.json {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Other(e.to_string()))?;
        std::fs::write(path, text)
            .map_err(|e| CliError::Other(format!("{}: {e}", path.display())))?;
    }
    Ok(report)
}

async fn docker_part(
    report: &mut Report,
    docker: Docker,
    options: &BenchOptions,
    n_exec: usize,
    n_spawn: usize,
    n_parallel: usize,
    load_time: Duration,
) -> Result<(), CliError> {
    let raw = RawDocker {
        docker,
        image: options.image.clone(),
    };
    let spawn_body = json!({"image": options.image, "provider": "docker"});
    let direct = Server::start("docker", "providers:\n  default: docker\n", &[]).await?;
    let engine = match Server::start(
        "docker-engine",
        "providers:\n  default: docker\n  docker:\n    direct_exec: false\n",
        &[],
    )
    .await
    {
        Ok(engine) => engine,
        Err(e) => {
            direct.stop().await;
            return Err(e);
        }
    };
    // Whatever fails half-way, the servers stop (destroying their
    // sandboxes) and the raw containers go.
    let outcome = docker_measure(
        report,
        &raw,
        &direct,
        &engine,
        &spawn_body,
        (n_exec, n_spawn, n_parallel, load_time),
    )
    .await;
    direct.stop().await;
    engine.stop().await;
    raw.remove_all().await;
    outcome?;
    if let Err(e) = warm_pool_part(report, options, n_spawn).await {
        report.skipped.push(format!("warm pool: {e}"));
    }
    Ok(())
}

/// Spawns served by a warm pool, through REST, against the raw
/// create+start measured before: each sample waits for the pool to be
/// full again, so each is a claim (the row says when one was not).
async fn warm_pool_part(
    report: &mut Report,
    options: &BenchOptions,
    n_spawn: usize,
) -> Result<(), CliError> {
    let size = 2;
    let config = format!(
        "providers:\n  default: docker\ndefaults:\n  image: {}\npool:\n  size: {size}\n  \
         max_warm: {size}\n  refill_interval: 100ms\n",
        serde_json::to_string(&options.image).map_err(|e| CliError::Other(e.to_string()))?
    );
    let server = Server::start("docker-pool", &config, &[]).await?;
    let measured = async {
        let mut samples = Vec::new();
        for _ in 0..n_spawn {
            server.wait_pool_full(size).await?;
            let t = Instant::now();
            let id = server.spawn(&json!({})).await?;
            samples.push(t.elapsed());
            server.destroy(&id).await;
        }
        let status = server.get("/pool/status").await?;
        Ok::<_, CliError>((Latency::of(samples), status["hits"].as_u64().unwrap_or(0)))
    }
    .await;
    server.stop().await;
    let (latency, hits) = measured?;
    let raw = report
        .figures
        .get("spawn_docker_raw")
        .and_then(|v| v["p50_ms"].as_f64());
    let what = if hits == latency.n as u64 {
        "spawn from a warm pool (docker, REST)".to_string()
    } else {
        format!(
            "spawn from a warm pool (docker, REST; only {hits} of {} were served by the pool)",
            latency.n
        )
    };
    report.row(
        &what,
        ms(&latency),
        raw.map(|r| format!("{r:.2} ms p50 (create+start)"))
            .unwrap_or_default(),
        raw.map(|r| latency.p50_ms / r),
        "p50 <= 10 ms",
        Some(latency.p50_ms <= 10.0 && hits == latency.n as u64),
    );
    report
        .figures
        .insert("spawn_docker_warm_pool".into(), json!(latency));
    Ok(())
}

async fn docker_measure(
    report: &mut Report,
    raw: &RawDocker,
    direct: &Server,
    engine: &Server,
    spawn_body: &Value,
    (n_exec, n_spawn, n_parallel, load_time): (usize, usize, usize, Duration),
) -> Result<(), CliError> {
    let direct_row = match direct_exec_available() {
        Ok(()) => "exec round trip, docker (REST, direct path)".to_string(),
        Err(why) => format!("exec round trip, docker (REST; NOT the direct path: {why})"),
    };
    // Exec: the direct path, the Engine API path, the raw Engine API and
    // a host fork+exec, sample by sample in turn, so that a machine whose
    // speed drifts (a shared VM) slows every series alike.
    let sandbox = direct.spawn(spawn_body).await?;
    let engine_sandbox = engine.spawn(spawn_body).await?;
    let container = raw.create_start().await?;
    // Warm connections and sandboxes.
    direct.exec_once(&sandbox).await?;
    engine.exec_once(&engine_sandbox).await?;
    raw.exec(&container).await?;
    let (mut ours, mut fallback, mut theirs, mut forks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..n_exec {
        ours.push(direct.exec_once(&sandbox).await?);
        forks.push(fork_once().await?);
        // The slow paths, fewer times.
        if i < n_exec.min(100) {
            fallback.push(engine.exec_once(&engine_sandbox).await?);
            let t = Instant::now();
            raw.exec(&container).await?;
            theirs.push(t.elapsed());
        }
    }
    let via_direct = Latency::of(ours);
    let via_engine = Latency::of(fallback);
    let raw_exec = Latency::of(theirs);
    let floor = Latency::of(forks);
    report.row(
        &direct_row,
        ms(&via_direct),
        format!("{} (Engine API exec)", ms(&raw_exec)),
        Some(via_direct.p50_ms / raw_exec.p50_ms),
        "p50 <= 5 ms, p99 <= 3x p50",
        Some(via_direct.meets(5.0)),
    );
    report.row(
        "exec round trip, docker (REST, Engine API path)",
        ms(&via_engine),
        ms(&raw_exec),
        Some(via_engine.p50_ms / raw_exec.p50_ms),
        "fallback: about the raw cost",
        None,
    );
    report.row(
        "fork+exec of `true` on the host (the floor)",
        String::new(),
        ms(&floor),
        None,
        "",
        None,
    );
    report
        .figures
        .insert("exec_docker_direct".into(), json!(via_direct));
    report
        .figures
        .insert("exec_docker_engine".into(), json!(via_engine));
    report
        .figures
        .insert("exec_docker_raw".into(), json!(raw_exec));
    report.figures.insert("exec_host_fork".into(), json!(floor));

    parallel_execs(report, raw, direct, spawn_body, &via_direct).await?;

    let (get_rate, health_rate) = get_vs_health(report, direct, &sandbox, "", load_time).await?;
    report
        .figures
        .insert("get_sandbox_rps".into(), json!(get_rate));
    report
        .figures
        .insert("health_rps".into(), json!(health_rate));

    // Spawn: one at a time, then many at once.
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..n_spawn {
        let t = Instant::now();
        let id = direct.spawn(spawn_body).await?;
        ours.push(t.elapsed());
        direct.destroy(&id).await;
        let t = Instant::now();
        let id = raw.create_start().await?;
        theirs.push(t.elapsed());
        raw.remove(&id).await;
    }
    let (ours, theirs) = (Latency::of(ours), Latency::of(theirs));
    report.row(
        "spawn, one at a time (docker)",
        ms(&ours),
        format!("{} (create+start)", ms(&theirs)),
        Some(ours.p50_ms / theirs.p50_ms),
        "",
        None,
    );
    let (our_wall, spawned) = parallel(n_parallel, || direct.spawn(spawn_body)).await;
    let (raw_wall, created) = parallel(n_parallel, || raw.create_start()).await;
    let failures = spawned.iter().filter(|r| r.is_err()).count()
        + created.iter().filter(|r| r.is_err()).count();
    for id in spawned.into_iter().flatten() {
        direct.destroy(&id).await;
    }
    for id in created.into_iter().flatten() {
        raw.remove(&id).await;
    }
    let ratio = our_wall.as_secs_f64() / raw_wall.as_secs_f64();
    report.row(
        &format!("{n_parallel} spawns at once, wall time (docker)"),
        format!("{:.0} ms", our_wall.as_secs_f64() * 1000.0),
        format!("{:.0} ms", raw_wall.as_secs_f64() * 1000.0),
        Some(ratio),
        "<= 1.1x",
        Some(ratio <= 1.1 && failures == 0),
    );
    if failures > 0 {
        report
            .skipped
            .push(format!("{failures} of the parallel spawns failed"));
    }
    report.figures.insert("spawn_docker".into(), json!(ours));
    report
        .figures
        .insert("spawn_docker_raw".into(), json!(theirs));
    report
        .figures
        .insert("parallel_spawn_ratio".into(), json!(ratio));

    if let Some(kib) = direct.peak_rss_kib() {
        report.row(
            "server peak RSS (docker run)",
            format!("{:.1} MiB", kib as f64 / 1024.0),
            String::new(),
            None,
            "",
            None,
        );
        report
            .figures
            .insert("server_peak_rss_kib".into(), json!(kib));
    }
    direct.destroy(&sandbox).await;
    engine.destroy(&engine_sandbox).await;
    raw.remove(&container).await;
    Ok(())
}

/// Throughput of `GET /sandboxes/{id}` against `GET /health` under the
/// same load in the same run, as a row (`context` after the measure's
/// name). Returns both rates.
async fn get_vs_health(
    report: &mut Report,
    server: &Server,
    sandbox: &str,
    context: &str,
    load_time: Duration,
) -> Result<(f64, f64), CliError> {
    let connections = 16;
    let (health_rate, health_p99, tool) = load(
        server,
        format!("{}/api/v1/health", server.url),
        connections,
        load_time,
    )
    .await?;
    let (get_rate, get_p99, _) = load(
        server,
        format!("{}/api/v1/sandboxes/{sandbox}", server.url),
        connections,
        load_time,
    )
    .await?;
    report.row(
        &format!(
            "GET /sandboxes/{{id}} vs GET /health{context} ({tool}, {connections} connections)"
        ),
        format!("{get_rate:.0}/s, p99 {get_p99:.2} ms"),
        format!("{health_rate:.0}/s (health), p99 {health_p99:.2} ms"),
        Some(get_rate / health_rate),
        ">= 0.5x",
        Some(get_rate >= 0.5 * health_rate),
    );
    Ok((get_rate, health_rate))
}

/// Many execs in flight across many sandboxes: the throughput against one
/// at a time (`alone`, measured before), beside the same load on the raw
/// Engine API. With no lock on the path, it scales with the cores.
async fn parallel_execs(
    report: &mut Report,
    raw: &RawDocker,
    direct: &Server,
    spawn_body: &Value,
    alone: &Latency,
) -> Result<(), CliError> {
    const SANDBOXES: usize = 20;
    const IN_FLIGHT: usize = 100;
    let spawned = futures::future::join_all((0..SANDBOXES).map(|_| direct.spawn(spawn_body))).await;
    let created = futures::future::join_all((0..SANDBOXES).map(|_| raw.create_start())).await;
    let measured = async {
        let ids = |all: &[Result<String, CliError>]| {
            all.iter()
                .map(|r| {
                    r.as_ref()
                        .cloned()
                        .map_err(|e| CliError::Other(e.to_string()))
                })
                .collect::<Result<Vec<String>, CliError>>()
        };
        let (ours, theirs) = (ids(&spawned)?, ids(&created)?);
        // Warm each once.
        for id in &ours {
            direct.exec_once(id).await?;
        }
        let t = Instant::now();
        let results = futures::future::join_all(
            (0..IN_FLIGHT).map(|i| direct.exec_once(&ours[i % SANDBOXES])),
        )
        .await;
        let our_wall = t.elapsed();
        results.into_iter().collect::<Result<Vec<_>, _>>()?;
        let t = Instant::now();
        let results =
            futures::future::join_all((0..IN_FLIGHT).map(|i| raw.exec(&theirs[i % SANDBOXES])))
                .await;
        let raw_wall = t.elapsed();
        results.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok::<_, CliError>((our_wall, raw_wall))
    }
    .await;
    for id in spawned.into_iter().flatten() {
        direct.destroy(&id).await;
    }
    for id in created.into_iter().flatten() {
        raw.remove(&id).await;
    }
    let (our_wall, raw_wall) = measured?;
    let rate = IN_FLIGHT as f64 / our_wall.as_secs_f64();
    let one_at_a_time = 1000.0 / alone.mean_ms;
    let speedup = rate / one_at_a_time;
    report.row(
        &format!("{IN_FLIGHT} execs at once in {SANDBOXES} sandboxes (docker, direct path)"),
        format!(
            "{:.0} ms, {rate:.0}/s ({speedup:.2}x one at a time)",
            our_wall.as_secs_f64() * 1000.0
        ),
        format!(
            "{:.0} ms, {:.0}/s (Engine API exec)",
            raw_wall.as_secs_f64() * 1000.0,
            IN_FLIGHT as f64 / raw_wall.as_secs_f64()
        ),
        Some(our_wall.as_secs_f64() / raw_wall.as_secs_f64()),
        ">= 1.5x one at a time on 2 cores",
        Some(speedup >= 1.5),
    );
    report
        .figures
        .insert("parallel_exec_speedup".into(), json!(speedup));
    Ok(())
}

/// Whether servers started by this run take the direct exec path: root,
/// and the agent binary beside this executable.
fn direct_exec_available() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not root".into());
    }
    crate::provider::agent::find_binary(Path::new("")).map(drop)
}

/// Spawns `n` idle native sandboxes and counts what they hold on the host:
/// the server's resident growth, and the proportional set size of every
/// process kept for them (their `__native-init` keepers and what runs
/// inside). Returns (n, server bytes, process bytes, processes per sandbox).
async fn idle_native_memory(
    server: &Server,
    image: &str,
    n: usize,
) -> Result<(usize, f64, f64, usize), CliError> {
    let before = server.rss_kib().unwrap_or(0);
    let mut ids = Vec::new();
    let spawned = async {
        for _ in 0..n {
            ids.push(
                server
                    .spawn(&json!({"image": image, "provider": "native"}))
                    .await?,
            );
        }
        Ok::<_, CliError>(())
    }
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.rss_kib().unwrap_or(0);
    let mut pss_kib = 0;
    let mut processes = 0;
    for root in keeper_roots(&ids) {
        for pid in stacyvm_agent::process_tree(root) {
            processes += 1;
            pss_kib += std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("Pss:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
        }
    }
    for id in &ids {
        server.destroy(id).await;
    }
    spawned?;
    if processes == 0 {
        return Err(CliError::Other(
            "no process of the sandboxes was found".into(),
        ));
    }
    Ok((
        n,
        after.saturating_sub(before) as f64 * 1024.0,
        pss_kib as f64 * 1024.0,
        processes / n,
    ))
}

/// The outermost `__native-init` process of each sandbox in `ids`: the
/// one whose parent is not itself a keeper of the sandbox.
fn keeper_roots(ids: &[String]) -> Vec<i32> {
    let sandbox_of = |pid: i32| -> Option<String> {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let at = args.iter().position(|a| *a == b"__native-init")?;
        let id = String::from_utf8_lossy(args.get(at + 1)?).into_owned();
        ids.contains(&id).then_some(id)
    };
    let parent = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            sandbox_of(*pid).is_some() && parent(*pid).is_none_or(|p| sandbox_of(p).is_none())
        })
        .collect()
}

async fn native_part(report: &mut Report, rootfs: &Path, n_exec: usize) -> Result<(), CliError> {
    let image = "bench:rootfs";
    let server = Server::start(
        "native",
        "providers:\n  default: native\n",
        &[vec![
            "image".into(),
            "import".into(),
            image.into(),
            rootfs.display().to_string(),
        ]],
    )
    .await?;
    let sandbox = match server
        .spawn(&json!({"image": image, "provider": "native"}))
        .await
    {
        Ok(id) => id,
        Err(e) => {
            report.skipped.push(format!("native: cannot spawn ({e})"));
            server.stop().await;
            return Ok(());
        }
    };
    // Whatever fails half-way, the server stops (destroying its sandbox).
    let measured = async {
        server.exec_once(&sandbox).await?;
        let (mut ours, mut forks) = (Vec::new(), Vec::new());
        for _ in 0..n_exec {
            ours.push(server.exec_once(&sandbox).await?);
            forks.push(fork_once().await?);
        }
        Ok::<_, CliError>((Latency::of(ours), Latency::of(forks)))
    }
    .await;
    let idle = idle_native_memory(&server, image, if n_exec > 100 { 50 } else { 10 }).await;
    server.destroy(&sandbox).await;
    server.stop().await;
    let (latency, floor) = measured?;
    match idle {
        Ok((n, server_bytes, processes_bytes, processes)) => {
            let whole = (server_bytes + processes_bytes) / n as f64;
            report.row(
                &format!(
                    "host memory per idle native sandbox ({n} sandboxes: server share + PSS of its {processes} processes)"
                ),
                format!(
                    "{:.0} KB ({:.0} KB server, {:.0} KB processes)",
                    whole / 1000.0,
                    server_bytes / n as f64 / 1000.0,
                    processes_bytes / n as f64 / 1000.0
                ),
                String::new(),
                None,
                "<= 256 KB",
                Some(whole <= 256_000.0),
            );
            report
                .figures
                .insert("native_idle_bytes_per_sandbox".into(), json!(whole));
        }
        Err(e) => report.skipped.push(format!("native idle memory: {e}")),
    }
    let what = match direct_exec_available() {
        Ok(()) => "exec round trip, native (REST, through the agent)".to_string(),
        Err(why) => format!("exec round trip, native (REST; NOT the direct path: {why})"),
    };
    report.row(
        &what,
        ms(&latency),
        format!("{} (fork+exec on the host)", ms(&floor)),
        Some(latency.p50_ms / floor.p50_ms),
        "p50 <= 3 ms, p99 <= 3x p50",
        Some(latency.meets(3.0)),
    );
    report.figures.insert("exec_native".into(), json!(latency));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let text = "Running 2s test @ http://127.0.0.1:1/api/v1/health
  2 threads and 16 connections
  Latency Distribution
     50%  150.00us
     75%  200.00us
     90%  300.00us
     99%    1.50ms
  100000 requests in 2.00s, 10.00MB read
Requests/sec:  50000.00
Transfer/sec:      5.00MB
";
        assert_eq!(parse_wrk(text), Some((50000.0, 1.5)));
        let slow = text.replace("1.50ms", "2.10s");
        assert_eq!(parse_wrk(&slow), Some((50000.0, 2100.0)));
        assert_eq!(parse_wrk("garbage"), None);
    }

    #[test]
    fn percentiles_of_a_series() {
        let samples = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(samples);
        assert_eq!((l.n, l.p50_ms.round(), l.p99_ms.round()), (100, 51.0, 99.0));
        assert!(Latency::of(Vec::new()).p50_ms.is_nan());
    }
}
