//! Crash points for the chaos tests.
//!
//! When the environment variable `STACYVM_FAILPOINT` names a step, the
//! process sends itself SIGKILL the first time it reaches that step: the
//! same death as `kill -9` from outside, at a moment a test can choose.
//! Unset (always, outside tests), [`hit`] costs one cached lookup.

use std::sync::OnceLock;

/// The environment variable that arms a crash point.
pub const ENV: &str = "STACYVM_FAILPOINT";

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(ENV).ok().filter(|s| !s.is_empty()))
        .as_deref()
}

/// Kills this process with SIGKILL when `step` is the armed crash point.
pub fn hit(step: &str) {
    if armed() == Some(step) {
        // Say where we died so a test can tell a planned crash from a bug.
        eprintln!("stacyvm: failpoint {step} reached: killing the process");
        if let Err(e) =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL)
        {
            eprintln!("stacyvm: failpoint {step}: kill failed ({e}); aborting");
        }
        std::process::abort();
    }
}
