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
        key: &str,
        query: &str,
        rows: u16,
        cols: u16,
    ) -> (Term, String) {
        let socket = connect(server, Some(key), query).await.expect("upgraded");
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

    let (mut term, session) =
        Term::open(&server, &alice, &format!("{path}?cols=80&rows=24"), 24, 80).await;
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
    term.type_keys("sleep 1; echo WHILE-AWAY\r").await;
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
        &alice,
        &format!("{path}?session={session}"),
        30,
        100,
    )
    .await;
    assert_eq!(again, session);
    back.until_screen("WHILE-AWAY").await;
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
        &alice,
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
    let gone = connect(&server, Some(&alice), &format!("{path}?session={session}")).await;
    assert_eq!(gone.err(), Some(404));
    server.stop().await;
}
