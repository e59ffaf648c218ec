//! The sandbox state machine of the architecture reference:
//!
//! ```text
//! creating -> running | error
//! running  -> unhealthy | expired | destroying | error
//! unhealthy -> running | expired | destroying | error
//! expired  -> destroying
//! destroying -> destroyed | error
//! error    -> destroying
//! ```
//!
//! Every transition is persisted (a conditional UPDATE on the current state)
//! before it is reported, so two actors racing on one sandbox cannot both win.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Running,
    Unhealthy,
    Expired,
    Destroying,
    Destroyed,
    Error,
}

impl SandboxState {
    pub const ALL: [SandboxState; 7] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Unhealthy,
        SandboxState::Expired,
        SandboxState::Destroying,
        SandboxState::Destroyed,
        SandboxState::Error,
    ];

    /// States in which a sandbox holds (or may hold) a runtime and counts
    /// against quotas.
    pub const LIVE: [SandboxState; 6] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Unhealthy,
        SandboxState::Expired,
        SandboxState::Destroying,
        SandboxState::Error,
    ];

    /// States in which commands and file calls are accepted.
    pub const USABLE: [SandboxState; 2] = [SandboxState::Running, SandboxState::Unhealthy];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Unhealthy => "unhealthy",
            SandboxState::Expired => "expired",
            SandboxState::Destroying => "destroying",
            SandboxState::Destroyed => "destroyed",
            SandboxState::Error => "error",
        }
    }

    /// The states a sandbox may move to from `self`.
    pub fn next_states(self) -> &'static [SandboxState] {
        use SandboxState::*;
        match self {
            Creating => &[Running, Error],
            // -> Error: the runtime died or vanished behind our back.
            Running => &[Unhealthy, Expired, Destroying, Error],
            Unhealthy => &[Running, Expired, Destroying, Error],
            Expired => &[Destroying],
            Destroying => &[Destroyed, Error],
            Destroyed => &[],
            Error => &[Destroying],
        }
    }

    /// The states from which `to` may be entered.
    pub fn predecessors(to: SandboxState) -> Vec<SandboxState> {
        SandboxState::ALL
            .into_iter()
            .filter(|from| from.next_states().contains(&to))
            .collect()
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is not one of [`SandboxState`].
#[derive(Debug, thiserror::Error)]
#[error("unknown sandbox state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for SandboxState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destroyed_is_terminal_and_reachable_only_through_destroying() {
        assert!(SandboxState::Destroyed.next_states().is_empty());
        assert_eq!(
            SandboxState::predecessors(SandboxState::Destroyed),
            vec![SandboxState::Destroying]
        );
    }

    #[test]
    fn names_round_trip() {
        for s in SandboxState::ALL {
            assert_eq!(s.as_str().parse::<SandboxState>().ok(), Some(s));
        }
    }
}

/// How a command run stands: `running` until it ends, then how it ended.
/// The store keeps the text ([`ExecStatus::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecStatus {
    Running,
    /// It exited (any exit code).
    Completed,
    /// It ran past its timeout and was killed.
    Timeout,
    /// It could not run (the runtime refused it).
    Failed,
    /// Its worker, replica or runtime went away while it ran.
    Interrupted,
}

impl ExecStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecStatus::Running => "running",
            ExecStatus::Completed => "completed",
            ExecStatus::Timeout => "timeout",
            ExecStatus::Failed => "failed",
            ExecStatus::Interrupted => "interrupted",
        }
    }

    /// The status a stored text names; an unknown one (written by a newer
    /// version) reads as `failed`, never as still running.
    pub fn from_stored(text: &str) -> ExecStatus {
        match text {
            "running" => ExecStatus::Running,
            "completed" => ExecStatus::Completed,
            "timeout" => ExecStatus::Timeout,
            "interrupted" => ExecStatus::Interrupted,
            _ => ExecStatus::Failed,
        }
    }
}

impl std::fmt::Display for ExecStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod exec_status_tests {
    use super::ExecStatus;

    #[test]
    fn stored_names_round_trip() {
        for s in [
            ExecStatus::Running,
            ExecStatus::Completed,
            ExecStatus::Timeout,
            ExecStatus::Failed,
            ExecStatus::Interrupted,
        ] {
            assert_eq!(ExecStatus::from_stored(s.as_str()), s);
            assert_eq!(
                serde_json::to_value(s).ok(),
                Some(serde_json::json!(s.as_str()))
            );
        }
        assert_eq!(ExecStatus::from_stored("???"), ExecStatus::Failed);
    }
}
