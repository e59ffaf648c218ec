//! Benchmark: spawn and exec throughput through one control-plane replica
//! and through two (on one PostgreSQL, clients alternating), side by side
//! in one run, with the same two `stacyvm worker` processes (native
//! provider) behind both. Prints figures and the ratio of two replicas to
//! one.
//!
//! ```sh
//! cargo build --release && cargo run --release --example bench_replicas -- \
//!     --rootfs target/test-env/busybox-rootfs.tar --database-url "$STACYVM_TEST_POSTGRES_URL"
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};

mod common;

use common::{BoxError, Process, quantile, start_worker};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "stacyvm-test:busybox")]
    image: String,
    #[arg(long, env = "STACYVM_TEST_ROOTFS")]
    rootfs: PathBuf,
    /// A PostgreSQL URL whose user may create databases; a fresh one is made.
    #[arg(long, env = "STACYVM_TEST_POSTGRES_URL")]
    database_url: String,
    /// Spawns made at once per setup.
    #[arg(long, default_value_t = 12)]
    spawns: usize,
    /// Execs per setup, spread over `clients` concurrent clients.
    #[arg(long, default_value_t = 400)]
    execs: usize,
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// The `stacyvm` binary (default: next to this example's directory).
    #[arg(long)]
    binary: Option<PathBuf>,
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

const CONFIG: &str = "worker:\n  local: false\nproviders:\n  default: native\n\
auth:\n  worker_tokens: {w1: token-1, w2: token-2}\n\
lifecycle:\n  heartbeat_interval: 200ms\n\
defaults:\n  max_sandboxes: 0\n  max_sandboxes_per_owner: 0\n";

fn start_replica(bin: &Path, db: &str, port: u16) -> Result<Process, BoxError> {
    let data = tempfile::tempdir()?;
    let config = data.path().join("stacyvm.yaml");
    std::fs::write(&config, CONFIG)?;
    let child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(data.path())
        .args(["--database-url", db, "serve", "--port", &port.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?;
    Ok(Process { child, data })
}

async fn fresh_database(admin: &str) -> Result<String, BoxError> {
    use sea_orm::{ConnectionTrait, Database};
    let name = format!("bench_replicas_{}", std::process::id());
    let conn = Database::connect(admin).await?;
    conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await?;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
    Ok(format!("{base}/{name}"))
}

async fn wait_for(http: &reqwest::Client, base: &str, workers: usize) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(resp) = http.get(format!("{base}/api/v1/workers")).send().await
            && let Ok(listed) = resp.json::<Value>().await
            && listed
                .as_array()
                .is_some_and(|w| w.iter().filter(|w| w["stale"] == false).count() >= workers)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{base}: workers did not show up").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Figures {
    spawns_per_s: f64,
    execs_per_s: f64,
    exec_p50: Duration,
    exec_p99: Duration,
}

/// Spawns, execs and destroys through `bases`, request i to `bases[i % n]`.
async fn measure(
    http: &reqwest::Client,
    bases: &[String],
    args: &Args,
) -> Result<Figures, BoxError> {
    let at = |i: usize| format!("{}/api/v1", bases[i % bases.len()]);
    let started = Instant::now();
    let spawns = (0..args.spawns).map(|i| {
        let (http, url, image) = (
            http.clone(),
            format!("{}/sandboxes", at(i)),
            args.image.clone(),
        );
        async move {
            let body: Value = http
                .post(url)
                .json(&json!({"image": image, "memory_mb": 128}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            Ok::<_, BoxError>(body["id"].as_str().ok_or("no id")?.to_string())
        }
    });
    let ids: Vec<String> = futures::future::try_join_all(spawns).await?;
    let spawns_per_s = ids.len() as f64 / started.elapsed().as_secs_f64();

    let per_client = args.execs / args.clients;
    let started = Instant::now();
    let clients = (0..args.clients).map(|c| {
        let http = http.clone();
        let ids = ids.clone();
        let bases: Vec<String> = (0..per_client).map(|i| at(c + i)).collect();
        async move {
            let mut samples = Vec::with_capacity(per_client);
            for (i, api) in bases.iter().enumerate() {
                let id = &ids[(c + i) % ids.len()];
                let t = Instant::now();
                let out: Value = http
                    .post(format!("{api}/sandboxes/{id}/exec"))
                    .json(&json!({"command": "true", "mode": "argv"}))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                samples.push(t.elapsed());
                if out["exit_code"] != 0 {
                    return Err::<Vec<Duration>, BoxError>(format!("exec failed: {out}").into());
                }
            }
            Ok(samples)
        }
    });
    let mut samples: Vec<Duration> = futures::future::try_join_all(clients)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let execs_per_s = samples.len() as f64 / started.elapsed().as_secs_f64();
    for (i, id) in ids.iter().enumerate() {
        http.delete(format!("{}/sandboxes/{id}", at(i)))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(Figures {
        spawns_per_s,
        execs_per_s,
        exec_p50: quantile(&mut samples, 0.5),
        exec_p99: quantile(&mut samples, 0.99),
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let bin = match &args.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(|p| p.parent())
            .ok_or("no binary dir")?
            .join("stacyvm"),
    };
    let db = fresh_database(&args.database_url).await?;
    let (port_a, port_b) = (free_port()?, free_port()?);
    let a = format!("http://127.0.0.1:{port_a}");
    let b = format!("http://127.0.0.1:{port_b}");
    let _replica_a = start_replica(&bin, &db, port_a)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _replica_b = start_replica(&bin, &db, port_b)?;
    let _w1 = start_worker(&bin, &args.image, &args.rootfs, &a, 1)?;
    let _w2 = start_worker(&bin, &args.image, &args.rootfs, &b, 2)?;
    let http = reqwest::Client::new();
    wait_for(&http, &a, 2).await?;
    wait_for(&http, &b, 2).await?;

    // Warm-up, then one replica and two, alternating which goes first.
    measure(&http, std::slice::from_ref(&a), &args).await?;
    let one = measure(&http, std::slice::from_ref(&a), &args).await?;
    let two = measure(&http, &[a.clone(), b.clone()], &args).await?;

    println!(
        "native provider, 2 workers, {} parallel spawns and {} execs (`true`, argv) from {} clients per setup",
        args.spawns, args.execs, args.clients
    );
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10}",
        "setup", "spawns/s", "execs/s", "exec p50", "exec p99"
    );
    for (name, f) in [("1 replica", &one), ("2 replicas", &two)] {
        println!(
            "{:<24} {:>10.1} {:>10.1} {:>8.2}ms {:>8.2}ms",
            name,
            f.spawns_per_s,
            f.execs_per_s,
            f.exec_p50.as_secs_f64() * 1e3,
            f.exec_p99.as_secs_f64() * 1e3
        );
    }
    println!(
        "ratio 2/1 replicas: spawns {:.2}x, execs {:.2}x, exec p50 {:.2}x",
        two.spawns_per_s / one.spawns_per_s,
        two.execs_per_s / one.execs_per_s,
        two.exec_p50.as_secs_f64() / one.exec_p50.as_secs_f64()
    );
    Ok(())
}
