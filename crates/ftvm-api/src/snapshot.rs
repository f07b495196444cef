//! A snapshot's progress as `GET /snapshot` answers it and `ftvm ctl snapshot` shows it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a snapshot stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotPhase {
    /// Pre-copy: memory and disks are copied while the guest runs.
    Copying,
    /// The guest is paused for the last dirty pages and the vCPU and device state.
    Pausing,
    /// The guest runs again; the files are being checksummed and the manifest written.
    Finishing,
    Done,
    Failed,
}

impl SnapshotPhase {
    pub fn is_over(self) -> bool {
        matches!(self, SnapshotPhase::Done | SnapshotPhase::Failed)
    }
}

/// One pre-copy round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CopyRound {
    /// Guest pages written to the snapshot in this round.
    pub pages: u64,
    /// Disk bytes written to the snapshot in this round.
    pub disk_bytes: u64,
    pub ms: f64,
}

/// The progress and, at the end, the outcome of the latest snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotProgress {
    pub dir: String,
    pub phase: SnapshotPhase,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Disk bytes in all (the writable disks the snapshot copies).
    pub disk_bytes: u64,
    /// The rounds so far: round 0 copies everything (zero pages skipped), later rounds copy
    /// what the guest dirtied during the previous one; the last is the paused round.
    pub rounds: Vec<CopyRound>,
    /// How long the guest was paused (the last round and the vCPU and device state).
    pub pause_ms: Option<f64>,
    pub elapsed_ms: f64,
    pub error: Option<String>,
}

impl SnapshotProgress {
    pub fn new(dir: String, memory_bytes: u64, disk_bytes: u64) -> Self {
        SnapshotProgress {
            dir,
            phase: SnapshotPhase::Copying,
            memory_bytes,
            disk_bytes,
            rounds: Vec::new(),
            pause_ms: None,
            elapsed_ms: 0.0,
            error: None,
        }
    }
}

/// One line for people: what the latest round did, or the outcome.
impl fmt::Display for SnapshotProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pages: u64 = self.rounds.iter().map(|r| r.pages).sum();
        match self.phase {
            SnapshotPhase::Done => write!(
                f,
                "snapshot written to {}: {} of memory and {} of disk in {} rounds ({} copied), guest paused {:.1} ms, {:.0} ms in all",
                self.dir,
                crate::format_bytes(self.memory_bytes),
                crate::format_bytes(self.disk_bytes),
                self.rounds.len(),
                crate::format_bytes(pages * 4096 + self.rounds.iter().map(|r| r.disk_bytes).sum::<u64>()),
                self.pause_ms.unwrap_or(0.0),
                self.elapsed_ms
            ),
            SnapshotPhase::Failed => {
                write!(f, "snapshot to {} failed: {}", self.dir, self.error.as_deref().unwrap_or("unknown error"))
            }
            phase => {
                let what = match phase {
                    SnapshotPhase::Pausing => "pausing for the last pages and the device state",
                    SnapshotPhase::Finishing => "guest running again; checksumming",
                    _ => "copying while the guest runs",
                };
                write!(f, "{what}: ")?;
                match self.rounds.last() {
                    Some(r) => write!(
                        f,
                        "round {} copied {} pages ({}) and {} of disk in {:.0} ms",
                        self.rounds.len() - 1,
                        r.pages,
                        crate::format_bytes(r.pages * 4096),
                        crate::format_bytes(r.disk_bytes),
                        r.ms
                    ),
                    None => write!(f, "round 0 of {} memory", crate::format_bytes(self.memory_bytes)),
                }
            }
        }
    }
}
