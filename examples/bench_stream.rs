//! Benchmark: stream 100 MB of stdout through the GraphQL subscription,
//! through REST NDJSON, and through a direct bollard exec, side by side in
//! one run, in the same container. Prints MB/s and the ratios to direct.
//!
//! ```sh
//! cargo run --release --example bench_stream -- --image stacyvm-test:busybox --mb 100 --runs 3
//! ```

use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Stream stdout through GraphQL, REST NDJSON and bollard, side by side.
#[derive(Parser)]
struct Args {
    /// A local image with /bin/sh, head and tr.
    #[arg(long, default_value = "stacyvm-test:busybox")]
    image: String,
    /// Megabytes of stdout per run.
    #[arg(long, default_value_t = 100)]
    mb: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// What one run delivered.
struct Run {
    bytes: u64,
    elapsed: Duration,
    /// Chunks the subscriber lost to the bounded buffer (GraphQL only).
    truncated_chunks: u64,
}

fn command(mb: u64) -> String {
    format!("head -c {} /dev/zero | tr '\\0' x", mb * 1024 * 1024)
}

async fn rest(http: &reqwest::Client, base: &str, id: &str, mb: u64) -> Result<Run, BoxError> {
    let t = Instant::now();
    let resp = http
        .post(format!("{base}/api/v1/sandboxes/{id}/exec"))
        .json(&json!({"command": command(mb), "stream": true, "timeout": "5m"}))
        .send()
        .await?
        .error_for_status()?;
    let mut body = resp.bytes_stream();
    let mut pending = Vec::new();
    let mut bytes = 0u64;
    while let Some(part) = body.next().await {
        pending.extend_from_slice(&part?);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let value: Value = serde_json::from_slice(&line)?;
            if value["stream"] == "stdout" {
                bytes += value["data"].as_str().map_or(0, |d| d.len() as u64);
            }
        }
    }
    Ok(Run {
        bytes,
        elapsed: t.elapsed(),
        truncated_chunks: 0,
    })
}

async fn graphql(base: &str, id: &str, mb: u64) -> Result<Run, BoxError> {
    let mut request =
        format!("{}/graphql/ws", base.replace("http://", "ws://")).into_client_request()?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "graphql-transport-ws".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
    ws.send(Message::Text(
        json!({"type": "connection_init"}).to_string().into(),
    ))
    .await?;
    let t = Instant::now();
    let query = "subscription($id: ID!, $cmd: String!) { execStream(sandboxId: $id, input: {command: $cmd, timeout: \"5m\"}) { __typename ... on OutputChunk { stream data } ... on OutputTruncated { fromSeq toSeq } } }";
    let mut started = false;
    let (mut bytes, mut truncated_chunks) = (0u64, 0u64);
    while let Some(message) = ws.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        let value: Value = serde_json::from_str(&text)?;
        match value["type"].as_str() {
            Some("connection_ack") if !started => {
                started = true;
                ws.send(Message::Text(json!({"id": "1", "type": "subscribe", "payload": {"query": query, "variables": {"id": id, "cmd": command(mb)}}}).to_string().into())).await?;
            }
            Some("next") => {
                let event = &value["payload"]["data"]["execStream"];
                match event["__typename"].as_str() {
                    Some("OutputChunk") if event["stream"] == "STDOUT" => {
                        bytes += event["data"].as_str().map_or(0, |d| d.len() as u64);
                    }
                    Some("OutputTruncated") => {
                        truncated_chunks += event["toSeq"].as_u64().unwrap_or(0)
                            - event["fromSeq"].as_u64().unwrap_or(0);
                    }
                    _ => {}
                }
                if value["payload"].get("errors").is_some() {
                    return Err(format!("subscription error: {value}").into());
                }
            }
            Some("complete") => break,
            Some("error") => return Err(format!("subscription error: {value}").into()),
            _ => {}
        }
    }
    Ok(Run {
        bytes,
        elapsed: t.elapsed(),
        truncated_chunks,
    })
}

async fn direct(docker: &Docker, container: &str, mb: u64) -> Result<Run, BoxError> {
    let t = Instant::now();
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(vec!["/bin/sh".to_string(), "-c".into(), command(mb)]),
                ..Default::default()
            },
        )
        .await?;
    let mut bytes = 0u64;
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while let Some(item) = output.next().await {
            if let LogOutput::StdOut { message } = item? {
                bytes += message.len() as u64;
            }
        }
    }
    Ok(Run {
        bytes,
        elapsed: t.elapsed(),
        truncated_chunks: 0,
    })
}

fn mbps(run: &Run) -> f64 {
    run.bytes as f64 / (1024.0 * 1024.0) / run.elapsed.as_secs_f64().max(1e-9)
}

fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| mbps(a).total_cmp(&mbps(b)));
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

mod common;

use common::{BenchServer, BoxError};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let server =
        BenchServer::start(|c| c.defaults.max_exec_output_bytes = 512 * 1024 * 1024).await?;
    let base = server.base.clone();

    let http = reqwest::Client::new();
    let sandbox: Value = http
        .post(format!("{base}/api/v1/sandboxes"))
        .json(&json!({"image": args.image, "provider": "docker"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = sandbox["id"].as_str().ok_or("no id")?.to_string();
    let container = format!("stacyvm-{id}");
    let docker = Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await?;

    let (mut g, mut r, mut d) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs {
        d.push(direct(&docker, &container, args.mb).await?);
        r.push(rest(&http, &base, &id, args.mb).await?);
        g.push(graphql(&base, &id, args.mb).await?);
    }
    let (g, r, d) = (median(g), median(r), median(d));
    println!(
        "Streaming {} MB of stdout, docker provider, median of {} runs",
        args.mb, args.runs
    );
    println!(
        "{:<26} {:>10} {:>12} {:>9} {:>16}",
        "path", "MB/s", "delivered MB", "vs direct", "chunks truncated"
    );
    for (name, run) in [
        ("direct bollard exec", &d),
        ("REST NDJSON", &r),
        ("GraphQL subscription", &g),
    ] {
        println!(
            "{:<26} {:>10.1} {:>12.1} {:>8.2}x {:>16}",
            name,
            mbps(run),
            run.bytes as f64 / (1024.0 * 1024.0),
            mbps(run) / mbps(&d).max(1e-9),
            run.truncated_chunks
        );
    }
    http.delete(format!("{base}/api/v1/sandboxes/{id}"))
        .send()
        .await?;
    server.stop().await?;
    Ok(())
}
