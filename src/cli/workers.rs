//! `stacyvm workers list|cordon|uncordon|drain [--wait]`.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use super::{CliError, Target};

/// How often `drain --wait` looks again.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Prints every worker, one per line.
pub async fn list(target: &Target) -> Result<(), CliError> {
    let workers = target.send(Method::GET, "/admin/workers").await?;
    println!("ID\tSTATUS\tADMIN\tSANDBOXES\tPROVIDERS\tLAST HEARTBEAT");
    for w in workers.as_array().into_iter().flatten() {
        println!("{}", line(w));
    }
    Ok(())
}

fn line(w: &Value) -> String {
    let text = |k: &str| w.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    let providers: Vec<&str> = w
        .get("providers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}",
        text("id"),
        text("status"),
        text("admin_state"),
        w.get("sandboxes").and_then(Value::as_u64).unwrap_or(0),
        providers.join(","),
        text("last_heartbeat"),
    )
}

/// Cordons (`cordon`), uncordons (`uncordon`) or drains (`drain`) a
/// worker and prints it. With `wait` (drain only), returns once the
/// worker has no sandbox left, or fails after `timeout`.
pub async fn set_state(
    target: &Target,
    id: &str,
    verb: &str,
    wait: Option<Duration>,
) -> Result<(), CliError> {
    if id.is_empty() || id.contains(['/', '?', '#']) {
        return Err(CliError::Other(format!("not a worker id: {id:?}")));
    }
    let worker = target
        .send(Method::POST, &format!("/admin/workers/{id}/{verb}"))
        .await?;
    println!("{}", line(&worker));
    let Some(timeout) = wait else {
        return Ok(());
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = u64::MAX;
    loop {
        let worker = target
            .send(Method::GET, &format!("/admin/workers/{id}"))
            .await?;
        let left = worker.get("sandboxes").and_then(Value::as_u64).unwrap_or(0);
        if left == 0 {
            println!("worker {id} is drained");
            return Ok(());
        }
        if left != last {
            eprintln!("worker {id}: {left} sandbox(es) left");
            last = left;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::Other(format!(
                "worker {id} still has {left} sandbox(es) after {} s",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
