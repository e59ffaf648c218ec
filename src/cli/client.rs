//! `stacyvm sandbox ...`, `stacyvm files ...`: a client of the REST API,
//! as a user runs it. What it prints for people is a table or the output
//! itself; `--json` prints the API's answer for scripts. A failure prints
//! once (`stacyvm: <status>: <message>`); `sandbox exec` exits with the
//! command's own exit code.

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use super::{CliError, Target, files_path, sandbox_path};

/// What `stacyvm sandbox create` asks for.
#[derive(Debug, Default)]
pub struct CreateArgs {
    pub image: Option<String>,
    pub provider: Option<String>,
    pub template: Option<String>,
    pub ttl: Option<String>,
    pub memory_mb: Option<u32>,
    pub vcpus: Option<u32>,
    /// `key=value` pairs.
    pub metadata: Vec<String>,
}

/// What `stacyvm sandbox exec` runs.
#[derive(Debug, Default)]
pub struct ExecArgs {
    pub argv: Vec<String>,
    /// `sh -c` with the words joined, instead of argv as given.
    pub shell: bool,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub timeout: Option<String>,
}

/// Exit status of an exec whose command timed out (as coreutils' timeout).
pub const TIMED_OUT: u8 = 124;

/// Exit status of an exec that failed on StacyVM's side, not the
/// command's (as `docker run` answers 125): a refused call, a lost stream.
pub const CLIENT_FAILED: u8 = 125;

fn pairs(items: &[String], what: &str) -> Result<serde_json::Map<String, Value>, CliError> {
    items
        .iter()
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), Value::String(v.to_string()))),
            _ => Err(CliError::Other(format!(
                "{what} must be KEY=VALUE, got {item:?}"
            ))),
        })
        .collect()
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

const TABLE_HEAD: &str = "ID\tSTATE\tPROVIDER\tIMAGE\tOWNER\tEXPIRES";

fn table_line(s: &Value) -> String {
    let text = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}",
        text("id"),
        text("state"),
        text("provider"),
        text("image"),
        text("owner_id"),
        text("expires_at")
    )
}

pub async fn create(target: &Target, args: CreateArgs, json_out: bool) -> Result<(), CliError> {
    let metadata = pairs(&args.metadata, "--meta")?
        .into_iter()
        .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
        .collect();
    let body = super::SpawnBody {
        image: args.image,
        template: args.template,
        provider: args.provider,
        ttl: args.ttl,
        memory_mb: args.memory_mb,
        vcpus: args.vcpus,
        metadata,
    };
    // Spawning may wait: an image pull, a queued spawn. Say so on a
    // terminal while it does.
    let progress = spinner("creating sandbox");
    let answer = target
        .send_json(
            Method::POST,
            "/sandboxes",
            Some(body.to_json()),
            Duration::from_secs(600),
        )
        .await;
    progress.abort();
    clear_spinner();
    let sandbox = answer?;
    if json_out {
        print_json(&sandbox);
    } else {
        println!(
            "{}",
            sandbox
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
        );
    }
    Ok(())
}

pub async fn list(target: &Target, json_out: bool) -> Result<(), CliError> {
    let all = target.send(Method::GET, "/sandboxes").await?;
    if json_out {
        print_json(&all);
        return Ok(());
    }
    println!("{TABLE_HEAD}");
    for s in all.as_array().into_iter().flatten() {
        println!("{}", table_line(s));
    }
    Ok(())
}

pub async fn get(target: &Target, id: &str, json_out: bool) -> Result<(), CliError> {
    let s = target.send(Method::GET, &sandbox_path(id)?).await?;
    if json_out {
        print_json(&s);
    } else {
        println!("{TABLE_HEAD}\n{}", table_line(&s));
    }
    Ok(())
}

pub async fn remove(target: &Target, ids: &[String]) -> Result<(), CliError> {
    for id in ids {
        target.send(Method::DELETE, &sandbox_path(id)?).await?;
        println!("{id}");
    }
    Ok(())
}

pub async fn extend(target: &Target, id: &str, ttl: &str, json_out: bool) -> Result<(), CliError> {
    let path = format!("{}/extend", sandbox_path(id)?);
    let s = target
        .send_json(
            Method::POST,
            &path,
            Some(json!({ "ttl": ttl })),
            Duration::from_secs(30),
        )
        .await?;
    if json_out {
        print_json(&s);
    } else {
        println!(
            "{}\texpires {}",
            id,
            s.get("expires_at").and_then(Value::as_str).unwrap_or("-")
        );
    }
    Ok(())
}

pub async fn logs(target: &Target, id: &str, lines: u32) -> Result<(), CliError> {
    let path = format!("{}/logs?lines={lines}", sandbox_path(id)?);
    let all = target.send(Method::GET, &path).await?;
    for line in all.as_array().into_iter().flatten() {
        println!("{}", line.as_str().unwrap_or_default());
    }
    Ok(())
}

/// Runs a command and streams its output as it comes; returns the
/// command's exit code (or [`TIMED_OUT`]). With `json_out`, prints the
/// collected answer instead.
pub async fn exec(
    target: &Target,
    id: &str,
    args: ExecArgs,
    json_out: bool,
) -> Result<u8, CliError> {
    let Some((first, rest)) = args.argv.split_first() else {
        return Err(CliError::Other(
            "nothing to run: give a command after --".into(),
        ));
    };
    let (command, rest, mode) = if args.shell {
        (args.argv.join(" "), Vec::new(), "shell")
    } else {
        (first.clone(), rest.to_vec(), "argv")
    };
    let mut body = json!({
        "command": command,
        "args": rest,
        "mode": mode,
        "stream": !json_out,
    });
    if !args.env.is_empty() {
        body["env"] = Value::Object(pairs(&args.env, "--env")?);
    }
    if let Some(dir) = args.workdir {
        body["workdir"] = Value::String(dir);
    }
    if let Some(t) = args.timeout {
        body["timeout"] = Value::String(t);
    }
    let path = format!("{}/exec", sandbox_path(id)?);
    // The command's own timeout bounds it on the server; the client waits
    // for as long as it runs.
    let wait = Duration::from_secs(24 * 3600);
    if json_out {
        let answer = target
            .send_json(Method::POST, &path, Some(body), wait)
            .await?;
        print_json(&answer);
        if answer.get("timed_out").and_then(Value::as_bool) == Some(true) {
            return Ok(TIMED_OUT);
        }
        let code = answer.get("exit_code").and_then(Value::as_i64).unwrap_or(1);
        return Ok(exit_byte(code));
    }
    let resp = target
        .request(Method::POST, &format!("{path}?trailer=true"), wait)
        .json(&body)
        .send()
        .await
        .map_err(|e| target.unreachable(e))?;
    let resp = Target::check(resp).await?;
    let mut lines = resp.bytes_stream();
    let mut pending = Vec::new();
    let mut end: Option<Value> = None;
    while let Some(chunk) = lines.next().await {
        let chunk = chunk.map_err(|e| CliError::Other(format!("the output stream broke: {e}")))?;
        pending.extend_from_slice(&chunk);
        while let Some(at) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=at).collect();
            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if v.get("type").and_then(Value::as_str) == Some("end") {
                end = Some(v);
                continue;
            }
            let data = v.get("data").and_then(Value::as_str).unwrap_or_default();
            let written = if v.get("stream").and_then(Value::as_str) == Some("stderr") {
                let mut err = std::io::stderr().lock();
                err.write_all(data.as_bytes()).and_then(|()| err.flush())
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(data.as_bytes()).and_then(|()| out.flush())
            };
            if written.is_err() {
                // The reader went away (`| head`): stop like other tools.
                return Ok(141);
            }
        }
    }
    let Some(end) = end else {
        return Err(CliError::Other(
            "the output stream ended without an exit status".into(),
        ));
    };
    if end.get("timed_out").and_then(Value::as_bool) == Some(true) {
        return Ok(TIMED_OUT);
    }
    if end.get("error").and_then(Value::as_str).is_some() {
        // The server said why as the stream's last stderr line, printed
        // above: not again.
        return Ok(CLIENT_FAILED);
    }
    Ok(exit_byte(
        end.get("exit_code").and_then(Value::as_i64).unwrap_or(1),
    ))
}

/// An exit code as a process exit status (0..=255, as a shell sees it).
fn exit_byte(code: i64) -> u8 {
    u8::try_from(code.rem_euclid(256)).unwrap_or(1)
}

/// `ID:PATH` → (id, path).
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    let id_ok = id.starts_with("sb-") && sandbox_path(id).is_ok();
    (id_ok && path.starts_with('/')).then_some((id, path))
}

pub async fn cat(target: &Target, spec: &str) -> Result<(), CliError> {
    let (id, path) = remote(spec)
        .ok_or_else(|| CliError::Other(format!("expected SANDBOX_ID:/path, got {spec:?}")))?;
    let bytes = target.read_file(id, path).await?;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)
        .and_then(|()| out.flush())
        .map_err(|e| CliError::Other(format!("writing to stdout: {e}")))
}

pub async fn ls(target: &Target, spec: &str, json_out: bool) -> Result<(), CliError> {
    let (id, path) = remote(spec)
        .ok_or_else(|| CliError::Other(format!("expected SANDBOX_ID:/path, got {spec:?}")))?;
    let query = files_path(id, "/list", path)?;
    let entries = target.send(Method::GET, &query).await?;
    if json_out {
        print_json(&entries);
        return Ok(());
    }
    for e in entries.as_array().into_iter().flatten() {
        let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        let dir = e.get("is_dir").and_then(Value::as_bool) == Some(true);
        println!(
            "{}{}\t{}\t{}\t{}",
            if dir { "d" } else { "-" },
            text("mode"),
            e.get("size").and_then(Value::as_u64).unwrap_or(0),
            text("mod_time"),
            text("name") + if dir { "/" } else { "" },
        );
    }
    Ok(())
}

/// Copies a file into a sandbox (`LOCAL ID:/path`), out of one
/// (`ID:/path LOCAL`), `-` meaning stdin or stdout. Binary-safe.
pub async fn cp(target: &Target, from: &str, to: &str) -> Result<(), CliError> {
    match (remote(from), remote(to)) {
        (None, Some((id, path))) => {
            let content = if from == "-" {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                    .map_err(|e| CliError::Other(format!("reading stdin: {e}")))?;
                buf
            } else {
                std::fs::read(from).map_err(|e| CliError::Other(format!("{from}: {e}")))?
            };
            let body = json!({
                "path": path,
                "content": base64::engine::general_purpose::STANDARD.encode(&content),
                "encoding": "base64",
            });
            let files = format!("{}/files", sandbox_path(id)?);
            target
                .send_json(Method::POST, &files, Some(body), Duration::from_secs(300))
                .await?;
            Ok(())
        }
        (Some((id, path)), None) => {
            let bytes = target.read_file(id, path).await?;
            let written = if to == "-" {
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes).and_then(|()| out.flush())
            } else {
                std::fs::write(to, &bytes)
            };
            written.map_err(|e| CliError::Other(format!("{to}: {e}")))
        }
        _ => Err(CliError::Other(
            "one side must be SANDBOX_ID:/path and the other a local file (or -)".into(),
        )),
    }
}

/// A line on stderr while something slow happens, when stderr is a
/// terminal (never in scripts' output).
fn spinner(what: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return;
        }
        let started = tokio::time::Instant::now();
        // Quick answers print nothing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        loop {
            eprint!("\r{what}... {} s", started.elapsed().as_secs());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

fn clear_spinner() {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprint!("\r\x1b[2K");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_what_a_shell_sees() {
        assert_eq!(exit_byte(0), 0);
        assert_eq!(exit_byte(3), 3);
        assert_eq!(exit_byte(256 + 7), 7);
        assert_eq!(exit_byte(-1), 255);
    }

    #[test]
    fn remote_paths_are_id_colon_absolute_path() {
        assert_eq!(
            remote("sb-1a2b3c4d:/tmp/x"),
            Some(("sb-1a2b3c4d", "/tmp/x"))
        );
        assert_eq!(remote("./local:file"), None);
        assert_eq!(remote("sb-1:relative"), None);
        assert_eq!(remote("-"), None);
        assert_eq!(
            files_path("sb-1", "/list", "/a b/ü?&x=1").unwrap(),
            "/sandboxes/sb-1/files/list?path=%2Fa%20b%2F%C3%BC%3F%26x%3D1"
        );
        assert!(files_path("../admin", "", "/").is_err());
    }

    #[test]
    fn pairs_need_a_key() {
        assert!(pairs(&["a=1".into(), "b==2".into()], "--env").is_ok());
        assert!(pairs(&["=1".into()], "--env").is_err());
        assert!(pairs(&["novalue".into()], "--env").is_err());
    }
}
