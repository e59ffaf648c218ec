//! Terminals (`GET /api/v1/sandboxes/{id}/pty`) with a real WebSocket
//! client and a terminal emulator (`vt100`) reading the screen as a user
//! would see it: a full-screen program (`vi`), a resize that the program
//! sees, a client that leaves and comes back to its scrollback, another
//! owner and an anonymous caller turned away, malformed messages answered.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use stacyvm::auth::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{TestServer, docker_image, key, native_server};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A terminal client: its socket and the screen it draws.
struct Term {
    socket: Socket,
    screen: vt100::Parser,
    last: Vec<Value>,
}

async fn connect(server: &TestServer, key: Option<&str>, query: &str) -> Result<Socket, u16> {
    let url = format!("{}{query}", server.base.replace("http://", "ws://"));
    let mut request = url.into_client_request().expect("request");
    if let Some(key) = key {
        request
            .headers_mut()
            .insert("x-api-key", key.parse().expect("header"));
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connect: {e}"),
    }
}

impl Term {
    async fn open(
        server: &TestServer,
        key: Option<&str>,
        query: &str,
        rows: u16,
        cols: u16,
    ) -> (Term, String) {
        let socket = connect(server, key, query).await.expect("upgraded");
        let mut term = Term {
            socket,
            screen: vt100::Parser::new(rows, cols, 0),
            last: Vec::new(),
        };
        let hello = term.message().await.expect("hello");
        assert_eq!(hello["type"], "session", "{hello}");
        let id = hello["id"].as_str().expect("id").to_string();
        (term, id)
    }

    /// The next text message, drawing binary ones on the screen meanwhile.
    async fn message(&mut self) -> Option<Value> {
        loop {
            match self.socket.next().await? {
                Ok(Message::Binary(data)) => self.screen.process(&data),
                Ok(Message::Text(text)) => {
                    let v: Value = serde_json::from_str(&text).expect("json");
                    self.last.push(v.clone());
                    return Some(v);
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    async fn type_keys(&mut self, keys: &str) {
        self.socket
            .send(Message::Binary(keys.as_bytes().to_vec().into()))
            .await
            .expect("send");
    }

    /// Draws output until the screen shows `want` (within 20 s).
    async fn until_screen(&mut self, want: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let contents = self.screen.screen().contents();
            if contents.contains(want) {
                return contents;
            }
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("the screen never showed {want:?}:\n{contents}"));
            match next {
                Some(Ok(Message::Binary(data))) => self.screen.process(&data),
                Some(Ok(Message::Text(text))) => {
                    self.last.push(serde_json::from_str(&text).expect("json"))
                }
                Some(Ok(_)) => {}
                other => {
                    panic!("the terminal ended ({other:?}) before showing {want:?}:\n{contents}")
                }
            }
        }
    }
}

async fn spawn(server: &TestServer, key: &str) -> String {
    let resp = server
        .http
        .post(server.url("/sandboxes"))
        .header("x-api-key", key)
        .json(&json!({"image": docker_image()}))
        .send()
        .await
        .expect("spawn");
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.expect("json");
    body["id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_runs_vi_resizes_and_survives_a_reconnect() {
    let server = native_server(|_| {}).await;
    let alice = key(&server, "alice", Role::Owner).await;
    let bob = key(&server, "bob", Role::Owner).await;
    let id = spawn(&server, &alice).await;
    let path = format!("/sandboxes/{id}/pty");

    let (mut term, session) = Term::open(
        &server,
        Some(&alice),
        &format!("{path}?cols=80&rows=24"),
        24,
        80,
    )
    .await;
    // The shell sees the size it was opened with.
    term.type_keys("stty size\r").await;
    term.until_screen("24 80").await;

    // A resize reaches the program (SIGWINCH, then the new size).
    term.socket
        .send(Message::Text(
            json!({"type": "resize", "cols": 100, "rows": 30})
                .to_string()
                .into(),
        ))
        .await
        .expect("resize");
    term.screen.set_size(30, 100);
    term.type_keys("clear; stty size\r").await;
    term.until_screen("30 100").await;

    // A full-screen program: vi draws its empty lines, takes the keys,
    // writes the file.
    term.type_keys("clear; vi /tmp/note.txt\r").await;
    let screen = term.until_screen("~").await;
    assert!(
        screen.lines().filter(|l| l.starts_with('~')).count() > 10,
        "{screen}"
    );
    term.type_keys("ihello from a terminal\x1b").await;
    term.until_screen("hello from a terminal").await;
    term.type_keys(":wq\r").await;
    term.type_keys("clear; cat /tmp/note.txt; echo DONE-$((6*7))\r")
        .await;
    term.until_screen("DONE-42").await;
    // What the terminal wrote is the sandbox's file.
    let file = server
        .http
        .get(server.url(&format!("/sandboxes/{id}/files?path=/tmp/note.txt")))
        .header("x-api-key", &alice)
        .send()
        .await
        .expect("read");
    assert_eq!(file.status(), 200);
    let text = file.text().await.expect("body");
    assert!(text.contains("hello from a terminal"), "{text}");

    // The client leaves; the shell runs on. Something happens meanwhile.
    term.type_keys("sleep 1; echo WHILE-$((2+2))\r").await;
    drop(term);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Another owner, and an anonymous caller, cannot come back to it.
    let stranger = connect(&server, Some(&bob), &format!("{path}?session={session}")).await;
    assert_eq!(stranger.err(), Some(404));
    let anonymous = connect(&server, None, &format!("{path}?session={session}")).await;
    assert_eq!(anonymous.err(), Some(401));
    let bogus = connect(&server, Some(&alice), &format!("{path}?session=term_nope")).await;
    assert_eq!(bogus.err(), Some(404));
    let huge = connect(&server, Some(&alice), &format!("{path}?cols=5000&rows=10")).await;
    assert_eq!(huge.err(), Some(400));

    // Its owner comes back: the scrollback replays, what happened while
    // away included, and the same shell takes more.
    let (mut back, again) = Term::open(
        &server,
        Some(&alice),
        &format!("{path}?session={session}"),
        30,
        100,
    )
    .await;
    assert_eq!(again, session);
    // Computed by the shell while nobody watched: not the typed line.
    back.until_screen("WHILE-4").await;
    back.type_keys("echo BACK-$((1+1))\r").await;
    back.until_screen("BACK-2").await;

    // A message that is not one is answered, not fatal.
    back.socket
        .send(Message::Text("{\"type\":\"launch\"}".into()))
        .await
        .expect("send");
    let answer = back.message().await.expect("answer");
    assert_eq!(answer["code"], "BAD_REQUEST", "{answer}");

    // A second client takes the session over; the first is told.
    let (mut second, _) = Term::open(
        &server,
        Some(&alice),
        &format!("{path}?session={session}"),
        30,
        100,
    )
    .await;
    let told = back.message().await.expect("told");
    assert_eq!(told["type"], "taken_over", "{told}");

    // The shell's end is the session's.
    second.type_keys("exit 3\r").await;
    let end = loop {
        let m = second.message().await.expect("the end");
        if m["type"] == "exit" {
            break m;
        }
    };
    assert_eq!(end["exit_code"], 3, "{end}");
    drop(second);
    // An ended session is gone (its removal follows the end it sent).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match connect(&server, Some(&alice), &format!("{path}?session={session}")).await {
            Err(404) => break,
            other => {
                assert!(tokio::time::Instant::now() < deadline, "{:?}", other.err());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Another owner cannot open one in Alice's sandbox either.
    assert_eq!(
        connect(&server, Some(&bob), &format!("{path}?cols=80&rows=24"))
            .await
            .err(),
        Some(404)
    );
    server.stop().await;
}

/// A terminal's round trip, for any server and sandbox: the size, typed
/// input, a resize and the exit (`key`: none in the open mode).
pub(crate) async fn terminal_round_trip(server: &TestServer, key: Option<&str>, id: &str) {
    let path = format!("/sandboxes/{id}/pty?cols=80&rows=24");
    let (mut term, _) = Term::open(server, key, &path, 24, 80).await;
    term.type_keys("stty size; echo R-$((5*5))\r").await;
    term.until_screen("R-25").await;
    assert!(term.screen.screen().contents().contains("24 80"));
    term.socket
        .send(Message::Text(
            json!({"type": "resize", "cols": 90, "rows": 20})
                .to_string()
                .into(),
        ))
        .await
        .expect("resize");
    term.screen.set_size(20, 90);
    term.type_keys("clear; stty size; exit 2\r").await;
    let end = loop {
        let m = term.message().await.expect("the end");
        if m["type"] == "exit" {
            break m;
        }
    };
    assert_eq!(end["exit_code"], 2, "{end}");
    assert!(
        term.screen.screen().contents().contains("20 90"),
        "{}",
        term.screen.screen().contents()
    );
}

/// `stacyvm shell` as a user runs it, in a real terminal (tmux): the
/// window's size and its resize, a full-screen editor, Ctrl-C reaching
/// the sandbox's command (not the local client), and the shell's exit
/// status as the CLI's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stacyvm_shell_in_a_real_terminal() {
    if std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("STACYVM_TEST_STRICT").as_deref() != Ok("1"),
            "tmux must be installed (STACYVM_TEST_STRICT=1)"
        );
        eprintln!("SKIPPED: no tmux");
        return;
    }
    let server = native_server(|_| {}).await;
    let alice = key(&server, "alice", Role::Owner).await;
    let id = spawn(&server, &alice).await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let status = scratch.path().join("status");
    let name = format!("svm{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let tmux = |args: &[&str]| {
        let out = std::process::Command::new("tmux")
            .arg("-L")
            .arg(&name)
            .args(args)
            .output()
            .expect("tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let line = format!(
        "{} shell {id}; echo $? > {}",
        env!("CARGO_BIN_EXE_stacyvm"),
        status.display()
    );
    // A tmux server of its own, with this environment.
    let started = std::process::Command::new("tmux")
        .args([
            "-L",
            &name,
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            &name,
        ])
        .args(["-x", "100", "-y", "30", &line])
        .env("STACYVM_SERVER", server.base.trim_end_matches("/api/v1"))
        .env("STACYVM_API_KEY", &alice)
        .env_remove("TMUX")
        .status()
        .expect("tmux");
    assert!(started.success());
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _gone = std::process::Command::new("tmux")
                .args(["-L", &self.0, "kill-server"])
                .status();
        }
    }
    let _kill = Kill(name.clone());
    let until = async |want: &str| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let screen = tmux(&["capture-pane", "-p", "-t", &name]);
            if screen.contains(want) {
                return screen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the terminal never showed {want:?}:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let keys = |k: &[&str]| {
        let mut args = vec!["send-keys", "-t", name.as_str()];
        args.extend_from_slice(k);
        tmux(&args);
    };
    keys(&["stty size", "Enter"]);
    until("30 100").await;
    tmux(&["resize-window", "-t", &name, "-x", "120", "-y", "40"]);
    keys(&["clear; stty size", "Enter"]);
    until("40 120").await;

    keys(&["vi /tmp/from-tmux.txt", "Enter"]);
    until("~").await;
    keys(&["i", "typed in a real terminal", "Escape"]);
    // Apart from the Escape: an editor reads ESC and a key at once as one
    // escape sequence, as it would from a person typing that fast.
    tokio::time::sleep(Duration::from_millis(500)).await;
    keys(&[":wq", "Enter"]);
    // Computed by the shell: the editor would show the words, not 42.
    keys(&["clear; cat /tmp/from-tmux.txt; echo CAT-$((40+2))", "Enter"]);
    let screen = until("CAT-42").await;
    assert!(screen.contains("typed in a real terminal"), "{screen}");

    // Ctrl-C interrupts the sandbox's command; the client stays.
    keys(&["sleep 600", "Enter"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    keys(&["C-c"]);
    keys(&["echo after-$((3*3))", "Enter"]);
    until("after-9").await;

    keys(&["exit 4", "Enter"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Ok(text) = std::fs::read_to_string(&status)
            && !text.trim().is_empty()
        {
            break text.trim().to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CLI did not end"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, "4");
    server.stop().await;
}
