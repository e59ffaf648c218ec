//! `stacyvm shell ID`: an interactive terminal in a sandbox, over the
//! API's terminal WebSocket (`GET /api/v1/sandboxes/{id}/pty`).
//!
//! On a terminal the local one goes raw (keys, Ctrl-C included, reach
//! the sandbox) and is restored at the end, whatever happens; its size is
//! the session's, and a resize (SIGWINCH) is sent on. The exit status is
//! the remote command's. `--session` comes back to a session left open
//! (its scrollback is replayed); the id is printed on stderr when the
//! connection is lost.

use std::io::Write as _;
use std::os::fd::AsFd;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{CliError, Target, sandbox_path};

/// Exit status when the session ended without its command's exit (the
/// connection was lost, the session was taken over).
pub const LOST: u8 = 125;

/// Restores the local terminal's settings when dropped.
struct Raw(Option<rustix::termios::Termios>);

impl Raw {
    fn enter() -> Raw {
        let stdin = std::io::stdin();
        let Ok(before) = rustix::termios::tcgetattr(stdin.as_fd()) else {
            return Raw(None);
        };
        let mut raw = before.clone();
        raw.make_raw();
        match rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw)
        {
            Ok(()) => Raw(Some(before)),
            Err(e) => {
                tracing::debug!(error = %e, "the terminal stays cooked");
                Raw(None)
            }
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Some(before) = &self.0 {
            crate::provider::best_effort_quiet(
                "restoring the terminal",
                rustix::termios::tcsetattr(
                    std::io::stdin().as_fd(),
                    rustix::termios::OptionalActions::Now,
                    before,
                ),
            );
        }
    }
}

/// The local terminal's size, if stdout is one.
fn size() -> Option<(u16, u16)> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout().as_fd()).ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Runs the shell (or `command`) of sandbox `id` on this terminal; the
/// remote command's exit status.
pub async fn shell(
    target: &Target,
    id: &str,
    session: Option<&str>,
    command: Option<&str>,
) -> Result<u8, CliError> {
    let (cols, rows) = size().unwrap_or((80, 24));
    let mut query = match session {
        Some(s) => format!("session={}", encode(s)),
        None => format!("cols={cols}&rows={rows}"),
    };
    if let (None, Some(c)) = (session, command) {
        query.push_str(&format!("&command={}", encode(c)));
    }
    let base = target.server.trim_end_matches('/');
    let base = base
        .strip_prefix("https://")
        .map(|rest| format!("wss://{rest}"))
        .or_else(|| {
            base.strip_prefix("http://")
                .map(|rest| format!("ws://{rest}"))
        })
        .ok_or_else(|| CliError::Other(format!("not an http(s) URL: {base}")))?;
    let url = format!("{base}/api/v1{}/pty?{query}", sandbox_path(id)?);
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| CliError::Other(format!("{url}: {e}")))?;
    for (name, key) in [
        ("X-Admin-API-Key", &target.admin_key),
        ("X-API-Key", &target.api_key),
    ] {
        if let Some(key) = key {
            let value = key
                .parse()
                .map_err(|_| CliError::Other(format!("{name} is not a valid header value")))?;
            request.headers_mut().insert(name, value);
        }
    }
    let connect = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .map_err(|_| CliError::Other(format!("{} did not answer within 30s", target.server)))?;
    let mut socket = match connect {
        Ok((socket, _)) => socket,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_default();
            let field = |k: &str| {
                body.get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            };
            return Err(CliError::Refused {
                status,
                code: field("code"),
                message: field("message"),
            });
        }
        Err(e) => {
            return Err(CliError::Other(format!(
                "cannot reach {}: {e}",
                target.server
            )));
        }
    };
    let mut session_id = String::new();
    if let Some(Ok(Message::Text(hello))) = socket.next().await {
        let hello: serde_json::Value = serde_json::from_str(&hello).unwrap_or_default();
        session_id = hello["id"].as_str().unwrap_or_default().to_string();
    }
    // Back to a session: it takes this terminal's size at once.
    if session.is_some() {
        let resize = serde_json::json!({"type": "resize", "cols": cols, "rows": rows});
        crate::provider::best_effort_quiet(
            "sending the terminal's size",
            socket.send(Message::Text(resize.to_string().into())).await,
        );
    }
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let raw = Raw::enter();
    // Read on a thread of its own, not the runtime's blocking pool: a
    // read that never returns must not keep the process from ending.
    let (keys_tx, mut keys) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let reader = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            use std::io::Read as _;
            let mut buf = vec![0u8; 16 << 10];
            let mut stdin = std::io::stdin().lock();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || keys_tx.blocking_send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = reader {
        return Err(CliError::Other(format!(
            "a thread to read the keyboard: {e}"
        )));
    }
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (|| {
        Ok::<_, std::io::Error>((
            signal(SignalKind::window_change())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ))
    })();
    let (mut winch, mut term, mut hup) =
        signals.map_err(|e| CliError::Other(format!("signal handlers: {e}")))?;
    let mut stdin_open = true;
    let mut end: Result<u8, String> = Err("the connection was lost".into());
    loop {
        tokio::select! {
            _ = term.recv() => {
                end = Err("stopped by SIGTERM".into());
                break;
            }
            _ = hup.recv() => {
                end = Err("the terminal hung up".into());
                break;
            }
            typed = keys.recv(), if stdin_open => match typed {
                None => {
                    stdin_open = false;
                    // Piped input ended: the remote terminal hears its EOF.
                    if !interactive && socket.send(Message::Binary(vec![4u8].into())).await.is_err() {
                        break;
                    }
                }
                Some(bytes) => {
                    if socket.send(Message::Binary(bytes.into())).await.is_err() {
                        break;
                    }
                }
            },
            _ = winch.recv() => {
                if let Some((cols, rows)) = size() {
                    let resize = serde_json::json!({"type": "resize", "cols": cols, "rows": rows});
                    if socket.send(Message::Text(resize.to_string().into())).await.is_err() {
                        break;
                    }
                }
            }
            message = socket.next() => match message {
                Some(Ok(Message::Binary(data))) => {
                    let mut out = std::io::stdout().lock();
                    if out.write_all(&data).and_then(|()| out.flush()).is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                    match v["type"].as_str() {
                        Some("exit") => {
                            end = Ok(u8::try_from(v["exit_code"].as_i64().unwrap_or(255) & 0xff).unwrap_or(255));
                            break;
                        }
                        Some("error") if v.get("code").is_none() => {
                            end = Err(v["message"].as_str().unwrap_or("the session ended").to_string());
                            break;
                        }
                        Some("taken_over") => {
                            end = Err("another client took the session over".into());
                            break;
                        }
                        _ => {}
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    drop(raw);
    crate::provider::best_effort_quiet("closing the terminal's socket", socket.close(None).await);
    match end {
        Ok(code) => Ok(code),
        Err(why) => {
            eprintln!(
                "\r\nstacyvm: {why} (session {session_id}: `stacyvm shell {id} --session {session_id}` comes back to it)"
            );
            Ok(LOST)
        }
    }
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
