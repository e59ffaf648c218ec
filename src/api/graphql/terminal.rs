//! Terminals over GraphQL: `openTerminal` opens a session, the `terminal`
//! subscription attaches to it (its scrollback first), `terminalInput` and
//! `resizeTerminal` type into it and resize it. The same sessions as the
//! REST WebSocket (`service::terminals`).

use async_graphql::{ID, InputObject, SimpleObject, Union};
use base64::Engine;

use crate::provider::ExecExit;
use crate::service::terminals::{Output, TerminalRequest};

/// A terminal session in a sandbox.
#[derive(SimpleObject)]
pub struct TerminalSession {
    pub id: ID,
    pub sandbox_id: ID,
}

/// What a new terminal runs, and its size.
#[derive(InputObject, Default)]
pub struct OpenTerminalInput {
    /// A shell command line; the sandbox's shell when absent.
    pub command: Option<String>,
    pub cols: Option<u16>,
    pub rows: Option<u16>,
}

impl From<OpenTerminalInput> for TerminalRequest {
    fn from(i: OpenTerminalInput) -> Self {
        TerminalRequest {
            command: i.command,
            cols: i.cols,
            rows: i.rows,
        }
    }
}

/// Output of the terminal: its bytes (base64: a terminal's output is not
/// always whole UTF-8 characters), and how many bytes before it were lost
/// to the scrollback's bound.
#[derive(SimpleObject)]
pub struct TerminalOutput {
    pub data_base64: String,
    pub skipped: u64,
}

/// The end of a terminal session.
#[derive(SimpleObject)]
pub struct TerminalEnd {
    /// The command's exit code, when it exited.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// Why the session ended otherwise.
    pub error: Option<String>,
}

#[derive(Union)]
pub enum TerminalEvent {
    TerminalOutput(TerminalOutput),
    TerminalEnd(TerminalEnd),
}

impl From<Output> for TerminalEvent {
    fn from(o: Output) -> Self {
        match o {
            Output::Data { data, skipped } => TerminalEvent::TerminalOutput(TerminalOutput {
                data_base64: base64::engine::general_purpose::STANDARD.encode(&data),
                skipped,
            }),
            Output::End(end) => TerminalEvent::TerminalEnd(match end {
                Ok(ExecExit::Exited(code)) => TerminalEnd {
                    exit_code: Some(code),
                    timed_out: false,
                    error: None,
                },
                Ok(ExecExit::TimedOut) => TerminalEnd {
                    exit_code: None,
                    timed_out: true,
                    error: None,
                },
                Err(why) => TerminalEnd {
                    exit_code: None,
                    timed_out: false,
                    error: Some(why),
                },
            }),
        }
    }
}
