//! A re-protection's progress as `GET /protect` answers it and `ftvm ctl protect` shows it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::snapshot::SnapshotProgress;

/// Where a re-protection (or a resync) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProtectPhase {
    /// Connecting to the new backup and checking that it can take this VM.
    Connecting,
    /// The state is copied live (pre-copy rounds, then a short pause at the cut).
    Copying,
    /// The state taken at the cut goes to the backup; the log since the cut waits.
    Shipping,
    /// The backup restored the state and replays the log since the cut; outputs are not
    /// held yet (the VM is not protected until the backup has caught up).
    CatchingUp,
    /// The backup has caught up: the VM is protected.
    Protected,
    Failed,
}

impl ProtectPhase {
    pub fn is_over(self) -> bool {
        matches!(self, ProtectPhase::Protected | ProtectPhase::Failed)
    }
}

/// The progress and, at the end, the outcome of the latest re-protection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProtectProgress {
    pub backup: String,
    /// Why: "protect" (asked for) or "resync" (the backup diverged).
    pub reason: String,
    pub phase: ProtectPhase,
    /// The live copy of the state (its rounds and the guest's pause at the cut).
    pub snapshot: Option<SnapshotProgress>,
    /// State bytes sent to the backup so far.
    pub shipped_bytes: u64,
    pub elapsed_ms: f64,
    /// From the request to the backup having caught up.
    pub protected_after_ms: Option<f64>,
    pub error: Option<String>,
}

impl ProtectProgress {
    pub fn new(backup: String, reason: &str) -> Self {
        ProtectProgress {
            backup,
            reason: reason.into(),
            phase: ProtectPhase::Connecting,
            snapshot: None,
            shipped_bytes: 0,
            elapsed_ms: 0.0,
            protected_after_ms: None,
            error: None,
        }
    }

    /// How long the guest was paused at the cut.
    pub fn pause_ms(&self) -> Option<f64> {
        self.snapshot.as_ref().and_then(|s| s.pause_ms)
    }
}

/// One line for people.
impl fmt::Display for ProtectProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pause = self.pause_ms().map_or(String::new(), |p| format!(", guest paused {p:.1} ms"));
        match self.phase {
            ProtectPhase::Connecting => write!(f, "connecting to the backup at {}", self.backup),
            ProtectPhase::Copying => match &self.snapshot {
                Some(s) => write!(f, "copying the state live: {s}"),
                None => write!(f, "copying the state live"),
            },
            ProtectPhase::Shipping => write!(
                f,
                "sending the state to {}: {} sent{pause}",
                self.backup,
                crate::format_bytes(self.shipped_bytes)
            ),
            ProtectPhase::CatchingUp => {
                write!(f, "the backup at {} replays the log since the cut (not protected yet){pause}", self.backup)
            }
            ProtectPhase::Protected => write!(
                f,
                "PROTECTED by {} ({}) after {:.0} ms: {} of state sent{pause}",
                self.backup,
                self.reason,
                self.protected_after_ms.unwrap_or(self.elapsed_ms),
                crate::format_bytes(self.shipped_bytes)
            ),
            ProtectPhase::Failed => write!(
                f,
                "re-protection by {} failed after {:.0} ms: {}",
                self.backup,
                self.elapsed_ms,
                self.error.as_deref().unwrap_or("unknown error")
            ),
        }
    }
}
