//! Benchmark: spawn throughput and exec round trip on the native provider
//! with the in-process worker and with 1, 2 and 3 `stacyvm worker`
//! processes behind a control plane started without a local worker, side
//! by side in one run. Prints medians, p99 and the ratio to the local
//! worker.
//!
//! ```sh
//! cargo build --release && cargo run --release --example bench_workers -- \
//!     --image stacyvm-test:busybox --rootfs target/test-env/busybox-rootfs.tar
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};

mod common;

use common::{BenchServer, BoxError, Process, quantile, start_worker};

#[derive(Parser)]
struct Args {
    /// The image name to import the rootfs as.
    #[arg(long, default_value = "stacyvm-test:busybox")]
    image: String,
    /// A rootfs tarball (`docker export` style).
    #[arg(long, env = "STACYVM_TEST_ROOTFS")]
    rootfs: PathBuf,
    /// Exec round trips per setup.
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Spawns made at once per setup.
    #[arg(long, default_value_t = 12)]
    spawns: usize,
    /// The `stacyvm` binary (default: next to this example's directory).
    #[arg(long)]
    binary: Option<PathBuf>,
}

struct Figures {
    spawns_per_s: f64,
    exec_p50: Duration,
    exec_p99: Duration,
}

async fn measure(http: &reqwest::Client, api: &str, args: &Args) -> Result<Figures, BoxError> {
    let started = Instant::now();
    let spawns = (0..args.spawns).map(|_| {
        let http = http.clone();
        let url = format!("{api}/sandboxes");
        let image = args.image.clone();
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

    let mut samples = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let t = Instant::now();
        let out: Value = http
            .post(format!("{api}/sandboxes/{}/exec", ids[0]))
            .json(&json!({"command": "true", "mode": "argv"}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        samples.push(t.elapsed());
        if out["exit_code"] != 0 {
            return Err(format!("exec failed: {out}").into());
        }
    }
    for id in &ids {
        http.delete(format!("{api}/sandboxes/{id}"))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(Figures {
        spawns_per_s,
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
    let http = reqwest::Client::new();
    let mut rows: Vec<(String, Figures)> = Vec::new();

    let image = args.image.clone();
    let rootfs = args.rootfs.clone();
    let helper = bin.clone();
    let local = BenchServer::start(move |c| {
        c.providers.default = "native".into();
        c.providers.native.helper_binary = helper;
        if let Err(e) = stacyvm::app::image_store(c).import(&image, &rootfs) {
            eprintln!("import: {e}");
        }
    })
    .await?;
    rows.push((
        "local worker (in process)".into(),
        measure(&http, &format!("{}/api/v1", local.base), &args).await?,
    ));
    local.stop().await?;

    for count in 1..=3 {
        let server = BenchServer::start(move |c| {
            c.worker.local = false;
            c.providers.default = "native".into();
            for n in 1..=count {
                c.auth
                    .worker_tokens
                    .insert(format!("w{n}"), format!("token-{n}"));
            }
        })
        .await?;
        let workers: Vec<Process> = (1..=count)
            .map(|n| start_worker(&bin, &args.image, &args.rootfs, &server.base, n))
            .collect::<Result<_, _>>()?;
        let api = format!("{}/api/v1", server.base);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let listed: Value = http
                .get(format!("{api}/workers"))
                .send()
                .await?
                .json()
                .await?;
            if listed.as_array().is_some_and(|w| w.len() == count) {
                break;
            }
            if Instant::now() > deadline {
                return Err("workers did not register".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        rows.push((
            format!("{count} remote worker(s)"),
            measure(&http, &api, &args).await?,
        ));
        drop(workers);
        server.stop().await?;
    }

    let base = &rows[0].1;
    println!(
        "native provider, {} parallel spawns, {} exec round trips (`true`, argv) per setup",
        args.spawns, args.runs
    );
    println!(
        "{:<28} {:>10} {:>8} {:>10} {:>10} {:>8}",
        "setup", "spawns/s", "ratio", "exec p50", "exec p99", "ratio"
    );
    for (name, f) in &rows {
        println!(
            "{:<28} {:>10.1} {:>7.2}x {:>8.2}ms {:>8.2}ms {:>7.2}x",
            name,
            f.spawns_per_s,
            f.spawns_per_s / base.spawns_per_s,
            f.exec_p50.as_secs_f64() * 1e3,
            f.exec_p99.as_secs_f64() * 1e3,
            f.exec_p50.as_secs_f64() / base.exec_p50.as_secs_f64()
        );
    }
    Ok(())
}
