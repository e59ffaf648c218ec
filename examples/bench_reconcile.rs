//! Benchmark: what the reconciler costs and how fast it notices.
//!
//! 1. With N docker sandboxes live, times one reconcile pass (store read +
//!    inventory + per-sandbox verdicts) against the raw runtime call it is
//!    built on (one labelled `list_containers` through bollard), side by
//!    side, and prints medians and the ratio.
//! 2. Kills K sandboxes with `docker kill` (through bollard) and measures
//!    the time until the record says `error`, with the reconcile interval
//!    given (default: the shipped 2 s).
//!
//! ```sh
//! cargo run --release --example bench_reconcile -- --image stacyvm-test:busybox
//! ```

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{KillContainerOptionsBuilder, ListContainersOptionsBuilder};
use clap::Parser;
use serde_json::{Value, json};

use common::{BenchServer, BoxError};

/// Reconcile pass cost and detection latency.
#[derive(Parser)]
struct Args {
    /// A local image with /bin/sh.
    #[arg(long, default_value = "stacyvm-test:busybox")]
    image: String,
    /// Live sandboxes during the timed passes.
    #[arg(long, default_value_t = 50)]
    sandboxes: usize,
    /// Timed passes.
    #[arg(long, default_value_t = 20)]
    passes: usize,
    /// Sandboxes killed to measure detection latency.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// The reconcile interval for the detection phase (Go duration).
    #[arg(long, default_value = "2s")]
    interval: String,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn p90(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(((v.len().max(1) - 1) as f64 * 0.9).round() as usize)
        .copied()
        .unwrap_or_default()
}

async fn spawn(http: &reqwest::Client, base: &str, image: &str) -> Result<String, BoxError> {
    let sandbox: Value = http
        .post(format!("{base}/api/v1/sandboxes"))
        .json(&json!({"image": image, "provider": "docker", "memory_mb": 64}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(sandbox["id"].as_str().ok_or("no id")?.to_string())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let interval = stacyvm::duration::parse(&args.interval)?;
    let server = BenchServer::start(|c| {
        c.lifecycle.reconcile_interval = stacyvm::duration::GoDuration(interval);
    })
    .await?;
    let http = reqwest::Client::new();
    let docker = Docker::connect_with_local_defaults()?;

    let mut ids = Vec::new();
    for _ in 0..args.sandboxes {
        ids.push(spawn(&http, &server.base, &args.image).await?);
    }

    // Phase 1: one pass vs the raw inventory call, interleaved.
    let filters = HashMap::from([("label", vec!["io.stacyvm.sandbox"])]);
    let (mut pass, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..args.passes {
        let t = Instant::now();
        let report = server.service.reconcile(false).await?;
        pass.push(t.elapsed());
        if report.running < args.sandboxes {
            return Err(format!("pass saw {} running sandboxes", report.running).into());
        }
        let t = Instant::now();
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        docker.list_containers(Some(options)).await?;
        raw.push(t.elapsed());
    }
    let (pass_median, raw_median) = (median(pass.clone()), median(raw.clone()));
    println!(
        "reconcile pass, {} live docker sandboxes, {} passes: median {:.1} ms (p90 {:.1}) vs raw list_containers {:.1} ms (p90 {:.1}): {:.2}x",
        args.sandboxes,
        args.passes,
        pass_median.as_secs_f64() * 1e3,
        p90(pass).as_secs_f64() * 1e3,
        raw_median.as_secs_f64() * 1e3,
        p90(raw).as_secs_f64() * 1e3,
        pass_median.as_secs_f64() / raw_median.as_secs_f64().max(1e-9),
    );

    // Phase 2: docker kill -> record `error`.
    let mut latencies = Vec::new();
    for id in ids.iter().take(args.kills) {
        // Kill at a random point of the reconcile cycle, not right after
        // the pass that noticed the previous kill. (Microseconds: the
        // clock's nanoseconds may be coarse.)
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_micros())
            .unwrap_or_default();
        tokio::time::sleep(interval.mul_f64(f64::from(micros % 1000) / 1000.0)).await;
        let kill = KillContainerOptionsBuilder::default()
            .signal("KILL")
            .build();
        let t = Instant::now();
        docker
            .kill_container(&format!("stacyvm-{id}"), Some(kill))
            .await?;
        loop {
            let record = server
                .service
                .store()
                .get_sandbox(id)
                .await?
                .ok_or("record vanished")?;
            if matches!(record.state.as_str(), "error" | "destroying" | "destroyed") {
                latencies.push(t.elapsed());
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!("{id} still {} after 60 s", record.state).into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    println!(
        "docker kill -> record error, {} kills, reconcile every {}: median {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        latencies.len(),
        args.interval,
        median(latencies.clone()).as_secs_f64() * 1e3,
        p90(latencies.clone()).as_secs_f64() * 1e3,
        latencies
            .iter()
            .max()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3,
    );

    for id in &ids {
        // Killed ones are being destroyed by the reconciler already.
        let _already_destroyed = http
            .delete(format!("{}/api/v1/sandboxes/{id}", server.base))
            .send()
            .await;
    }
    server.stop().await?;
    Ok(())
}
