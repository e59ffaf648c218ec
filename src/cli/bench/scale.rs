//! `stacyvm bench --scale N`: the control plane alone, at N live records.
//!
//! One `stacyvm serve` with the `memory` provider (records whose runtime is
//! an entry in a map: nothing runs, so what is measured is the API, the
//! store, the reconciler and the event bus). It spawns N sandboxes through
//! REST, then measures at N records: the server's memory per record, a
//! reconcile pass (the server logs each pass's time), `GET
//! /sandboxes/{id}` beside `GET /health` under `wrk`, listing pages through
//! GraphQL, and M idle GraphQL subscriptions held at once (their memory,
//! and that each still delivers an event). The server is killed at the end
//! (its records are in a throw-away directory; nothing ran).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{CliError, Latency, Report, Server, get_vs_health, ms};

/// Spawns in flight at once while filling the store.
const FILL_PARALLEL: usize = 16;

pub(super) async fn scale_part(
    report: &mut Report,
    records: usize,
    subscriptions: usize,
    load_time: Duration,
) -> Result<(), CliError> {
    let sockets = subscriptions + 64;
    let config = format!(
        "providers:\n  memory:\n    enabled: true\n    max_sandboxes: {}\n\
         server:\n  max_websockets: {sockets}\n  max_websockets_per_credential: {sockets}\n\
         rate_limit:\n  enabled: false\n\
         defaults:\n  ttl: 12h\n  memory_mb: 16\n\
         lifecycle:\n  reconcile_interval: 1s\n  reconcile_full_interval: 2s\n",
        records + 16
    );
    let server =
        Server::start_logging("scale", &config, "warn,stacyvm::service::reconcile=debug").await?;
    let outcome = measure(report, &server, records, subscriptions, load_time).await;
    // Nothing ran: the records go with the directory.
    server.kill().await;
    outcome
}

async fn measure(
    report: &mut Report,
    server: &Server,
    records: usize,
    subscriptions: usize,
    load_time: Duration,
) -> Result<(), CliError> {
    let body = json!({"provider": "memory"});
    // Connections, caches and the first allocations are paid once, before
    // the memory per record is counted from here.
    let warm_up = 100.min(records);
    for _ in 0..warm_up {
        server.spawn(&body).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_empty = server.rss_kib();
    let filled = records - warm_up;
    let started = Instant::now();
    let ids: Vec<Result<String, CliError>> = futures::stream::iter(0..filled)
        .map(|_| server.spawn(&body))
        .buffer_unordered(FILL_PARALLEL)
        .collect()
        .await;
    let fill = started.elapsed();
    let ids: Vec<String> = ids.into_iter().collect::<Result<_, _>>()?;
    let rate = filled as f64 / fill.as_secs_f64();
    report.row(
        &format!("{filled} spawns through REST, {FILL_PARALLEL} at once (memory provider)"),
        format!("{rate:.0}/s ({:.1} s)", fill.as_secs_f64()),
        String::new(),
        None,
        "",
        None,
    );
    report.figures.insert("scale_spawn_rps".into(), json!(rate));

    // Memory per record, once the allocator settled.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let (Some(before), Some(after)) = (rss_empty, server.rss_kib()) {
        let per = after.saturating_sub(before) as f64 * 1024.0 / filled.max(1) as f64;
        report.row(
            &format!("server memory per live record ({filled} more, {records} in all)"),
            format!("{:.1} KB", per / 1000.0),
            String::new(),
            None,
            "",
            None,
        );
        report
            .figures
            .insert("scale_bytes_per_record".into(), json!(per));
    }

    // Reconcile passes at `records` records, logged after the fill (one a
    // second, every second or third reading every record): the incremental ones,
    // which the target is about, and the full reads beside them.
    tokio::time::sleep(Duration::from_secs(7)).await;
    for (full, name, target) in [
        (
            false,
            "reconcile pass at {records} records (incremental)",
            "<= 50 ms",
        ),
        (true, "reconcile pass reading all {records} records", ""),
    ] {
        let title = name.replace("{records}", &records.to_string());
        match Latency::of_ms(server.reconcile_passes(records, full)) {
            Some(pass) => {
                report.row(
                    &title,
                    ms(&pass),
                    String::new(),
                    None,
                    target,
                    (!full).then_some(pass.p99_ms <= 50.0),
                );
                let key = if full {
                    "scale_reconcile_full_pass"
                } else {
                    "scale_reconcile_pass"
                };
                report.figures.insert(key.into(), json!(pass));
            }
            None => report.skipped.push(format!("scale: no {title} was logged")),
        }
    }

    // One record among many, against the cheapest route, same run.
    let one = ids.get(ids.len() / 2).cloned().unwrap_or_default();
    let (get_rate, health_rate) = get_vs_health(
        report,
        server,
        &one,
        &format!(" at {records} records"),
        load_time,
    )
    .await?;
    report
        .figures
        .insert("scale_get_vs_health".into(), json!(get_rate / health_rate));

    // Listing pages: walk the whole listing 50 at a time, again and again.
    let page = "query($after: String) { sandboxes(first: 50, after: $after) { \
                edges { node { id state } } pageInfo { hasNextPage endCursor } } }";
    let mut samples = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..200 {
        let t = Instant::now();
        let answer = server.post_graphql(page, json!({ "after": after })).await?;
        samples.push(t.elapsed());
        let info = &answer["data"]["sandboxes"]["pageInfo"];
        if answer["data"]["sandboxes"]["edges"]
            .as_array()
            .is_none_or(Vec::is_empty)
            && info["hasNextPage"] != json!(false)
        {
            return Err(CliError::Other(format!("a listing page answered {answer}")));
        }
        after = if info["hasNextPage"] == json!(true) {
            info["endCursor"].as_str().map(str::to_string)
        } else {
            None
        };
    }
    let pages = Latency::of(samples);
    report.row(
        &format!("listing page of 50 (GraphQL) at {records} records"),
        ms(&pages),
        String::new(),
        None,
        "p99 < 10 ms",
        Some(pages.p99_ms < 10.0),
    );
    report
        .figures
        .insert("scale_list_page".into(), json!(pages));

    subscriptions_part(report, server, subscriptions).await
}

/// Holds `n` idle `sandboxEvents` subscriptions (one WebSocket each), and
/// counts what they cost and whether each still hears an event.
async fn subscriptions_part(
    report: &mut Report,
    server: &Server,
    n: usize,
) -> Result<(), CliError> {
    let before = server.rss_kib();
    let heard = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let url = server.url.replace("http://", "ws://") + "/graphql/ws";
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (url, key) = (url.clone(), server.key.clone());
        let (heard, ready, stop) = (heard.clone(), ready.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let socket = subscribe(&url, &key).await;
            let Ok(mut socket) = socket else {
                return socket.map(drop);
            };
            ready.fetch_add(1, Ordering::SeqCst);
            let mut counted = false;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    message = socket.next() => match message {
                        Some(Ok(Message::Text(t))) => {
                            let v: Value = serde_json::from_str(&t).unwrap_or_default();
                            if v["type"] == "next" && !counted {
                                counted = true;
                                heard.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Some(Ok(Message::Ping(p))) => {
                            if let Err(e) = socket.send(Message::Pong(p)).await {
                                return Err(CliError::Other(format!("pong: {e}")));
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(CliError::Other(format!("subscription: {e}"))),
                        None => return Err(CliError::Other("a subscription was closed".into())),
                    },
                }
            }
            Ok(())
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.load(Ordering::SeqCst) < n && Instant::now() < deadline {
        if tasks.iter().any(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let opened = ready.load(Ordering::SeqCst);
    // Idle, settled.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = server.rss_kib();
    // An event every subscription should hear.
    let probe = server.spawn(&json!({"provider": "memory"})).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while heard.load(Ordering::SeqCst) < opened && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered = heard.load(Ordering::SeqCst);
    stop.cancel();
    let mut failures = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(e) => failures.push(e.to_string()),
        }
    }
    server.destroy(&probe).await;
    if let Some(first) = failures.first() {
        report.skipped.push(format!(
            "scale: {} of {n} subscriptions failed (first: {first})",
            failures.len()
        ));
    }
    if let (Some(before), Some(after)) = (before, after) {
        let per = after.saturating_sub(before) as f64 * 1024.0 / opened.max(1) as f64;
        report.row(
            &format!(
                "memory per idle GraphQL subscription ({opened} held at once, {delivered} heard the next event)"
            ),
            format!("{:.1} KB", per / 1000.0),
            String::new(),
            None,
            "<= 32 KB",
            Some(per <= 32_000.0 && opened == n && delivered == n),
        );
        report
            .figures
            .insert("scale_bytes_per_subscription".into(), json!(per));
    }
    Ok(())
}

/// A graphql-transport-ws connection with one `sandboxEvents` subscription.
async fn subscribe(
    url: &str,
    key: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    CliError,
> {
    let fail = |e: &dyn std::fmt::Display| CliError::Other(format!("subscription: {e}"));
    let mut request = url.into_client_request().map_err(|e| fail(&e))?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().map_err(|e| fail(&e))?,
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| fail(&e))?;
    let send = |v: Value| Message::Text(v.to_string().into());
    socket
        .send(send(
            json!({"type": "connection_init", "payload": {"X-API-Key": key}}),
        ))
        .await
        .map_err(|e| fail(&e))?;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).unwrap_or_default();
                if v["type"] == "connection_ack" {
                    break;
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(fail(&e)),
            Ok(None) => return Err(fail(&"closed before its ack")),
            Err(_) => return Err(fail(&"no connection_ack in 30 s")),
        }
    }
    socket
        .send(send(json!({
            "id": "1",
            "type": "subscribe",
            "payload": {"query": "subscription { sandboxEvents { sandboxId state } }"}
        })))
        .await
        .map_err(|e| fail(&e))?;
    Ok(socket)
}
