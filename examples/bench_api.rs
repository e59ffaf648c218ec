//! Benchmark: spawn, exec round trip and destroy through the StacyVM REST
//! API against the same operations made directly with bollard, side by side
//! in one run. Prints medians (and p90) over N runs and the API/direct ratio.
//!
//! ```sh
//! cargo run --release --example bench_api -- --image stacyvm-test:busybox --runs 20
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};

/// Spawn, exec and destroy through the API and directly, side by side.
#[derive(Parser)]
struct Args {
    /// A local image with /bin/sh.
    #[arg(long, default_value = "stacyvm-test:busybox")]
    image: String,
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

#[derive(Default)]
struct Samples(HashMap<&'static str, Vec<Duration>>);

impl Samples {
    fn add(&mut self, name: &'static str, d: Duration) {
        self.0.entry(name).or_default().push(d);
    }
    fn quantile(&self, name: &str, q: f64) -> Duration {
        let mut v = self.0.get(name).cloned().unwrap_or_default();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v.sort();
        v[((v.len() - 1) as f64 * q).round() as usize]
    }
}

async fn api_round(
    http: &reqwest::Client,
    base: &str,
    image: &str,
    s: &mut Samples,
) -> Result<(), BoxError> {
    let t = Instant::now();
    let sandbox: Value = http
        .post(format!("{base}/sandboxes"))
        .json(&json!({"image": image, "provider": "docker", "memory_mb": 256}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    s.add("spawn", t.elapsed());
    let id = sandbox["id"].as_str().ok_or("no id")?.to_string();

    let t = Instant::now();
    let out: Value = http
        .post(format!("{base}/sandboxes/{id}/exec"))
        .json(&json!({"command": "true", "mode": "argv"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    s.add("exec", t.elapsed());
    if out["exit_code"] != 0 {
        return Err(format!("exec failed: {out}").into());
    }

    let t = Instant::now();
    http.delete(format!("{base}/sandboxes/{id}"))
        .send()
        .await?
        .error_for_status()?;
    s.add("destroy", t.elapsed());
    Ok(())
}

async fn direct_round(
    docker: &Docker,
    image: &str,
    n: usize,
    s: &mut Samples,
) -> Result<(), BoxError> {
    let name = format!("bench-direct-{}-{n}", std::process::id());
    let t = Instant::now();
    let memory = 256 * 1024 * 1024;
    let body = ContainerCreateBody {
        image: Some(image.to_string()),
        entrypoint: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "while :; do sleep 3600; done".into(),
        ]),
        cmd: Some(vec![]),
        host_config: Some(HostConfig {
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: Some(1_000_000_000),
            pids_limit: Some(512),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            network_mode: Some("none".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = docker
        .create_container(
            Some(CreateContainerOptionsBuilder::default().name(&name).build()),
            body,
        )
        .await?;
    docker.start_container(&created.id, None).await?;
    s.add("spawn", t.elapsed());

    let t = Instant::now();
    let exec = docker
        .create_exec(
            &created.id,
            CreateExecOptions {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(vec!["true".to_string()]),
                ..Default::default()
            },
        )
        .await?;
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while output.next().await.is_some() {}
    }
    let info = docker.inspect_exec(&exec.id).await?;
    s.add("exec", t.elapsed());
    if info.exit_code != Some(0) {
        return Err("direct exec failed".into());
    }

    let t = Instant::now();
    docker
        .remove_container(
            &created.id,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await?;
    s.add("destroy", t.elapsed());
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

mod common;

use common::{BenchServer, BoxError};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let server = BenchServer::start(|_| {}).await?;
    let base = format!("{}/api/v1", server.base);

    let http = reqwest::Client::new();
    let docker = Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await?;

    // Warm up both paths once (image cache, connection pools).
    let mut warmup = Samples::default();
    api_round(&http, &base, &args.image, &mut warmup).await?;
    direct_round(&docker, &args.image, usize::MAX, &mut warmup).await?;

    let (mut api, mut direct) = (Samples::default(), Samples::default());
    for n in 0..args.runs {
        // Interleave so drift on the machine affects both sides alike.
        api_round(&http, &base, &args.image, &mut api).await?;
        direct_round(&docker, &args.image, n, &mut direct).await?;
    }

    println!(
        "StacyVM REST API vs direct bollard, docker provider, image {}, {} runs (median / p90, ms)",
        args.image, args.runs
    );
    println!(
        "{:<10} {:>16} {:>16} {:>10}",
        "operation", "API", "direct", "ratio"
    );
    for op in ["spawn", "exec", "destroy"] {
        let (a50, a90) = (api.quantile(op, 0.5), api.quantile(op, 0.9));
        let (d50, d90) = (direct.quantile(op, 0.5), direct.quantile(op, 0.9));
        println!(
            "{:<10} {:>7.1} / {:>6.1} {:>7.1} / {:>6.1} {:>9.2}x",
            op,
            ms(a50),
            ms(a90),
            ms(d50),
            ms(d90),
            a50.as_secs_f64() / d50.as_secs_f64().max(1e-9)
        );
    }
    server.stop().await?;
    Ok(())
}
