//! What differs by session reaches the vCPU loop through these narrow interfaces, besides the
//! output gate ([`ftvm_events::OutputGate`]): the control plane it reports to and parks for
//! ([`Supervisor`]), and a backup's way of going live ([`GoLive`]). The sessions crate
//! implements them (the control API, the pair); the loop never learns what is behind them.

use super::{ExitStats, VcpuLoop};
use crate::error::Result;
use crate::vcpu::syncpoint::SyncStats;

/// The loop's figures, published between exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopFigures {
    /// Counted exits of the whole run (across new recordings).
    pub exits: u64,
    /// What the loop did so far (its kicks included).
    pub stats: ExitStats,
    /// The guest clock's current value (not a new sample: reading it logs nothing).
    pub guest_time_ns: u64,
    /// Log bytes written (recording, primary).
    pub log_bytes: u64,
    /// Outputs produced so far: the last ordinal + 1.
    pub outputs: u64,
    /// The LSN of the most recent OUTPUT record (primary).
    pub last_output_lsn: Option<u64>,
    /// A backup's replay turned live.
    pub went_live: bool,
    /// The recorder's sync points so far.
    pub sync: SyncStats,
}

/// The control plane above the loop (the control API, `--api-socket`): it receives the
/// loop's figures between exits and asks it to pause or to hand over. The loop never waits
/// on it except while a pause it asked for lasts.
pub trait Supervisor: Send + Sync {
    /// Between exits: the figures so far (cheap: relaxed stores).
    fn publish(&self, figures: &LoopFigures);
    /// The operator asked a primary to hand the VM over to its backup.
    fn switchover_requested(&self) -> bool;
    /// The operator asked the VM to pause.
    fn pause_requested(&self) -> bool;
    /// Parks while paused, until the pause ends or `interrupted` says to look up (a stop, a
    /// task for the vCPU thread). Returns false at once when no pause is requested.
    fn park_if_paused(&self, interrupted: &dyn Fn() -> bool) -> bool;
}

/// A backup's preparations for going live: called once, on the vCPU thread, when its
/// replay has turned live (its primary is gone and it won the arbiter). It connects the
/// network devices to the host ([`VcpuLoop::attach_live_net`]) and reports.
pub trait GoLive: Send {
    fn activate(self: Box<Self>, vloop: &mut VcpuLoop) -> Result<TakeoverReport>;
}

/// What going live reports (the `takeover` event).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TakeoverReport {
    /// Where in the log the backup went live, for people.
    pub position: String,
    /// Outputs OUTPUT_DONE covered (skipped: the primary performed them).
    pub outputs_done: u64,
    /// How long the primary was silent before the failover.
    pub silence_ms: u64,
    /// From the failover decision to going live: the arbiter, then replaying the backlog.
    pub catch_up_ms: u64,
}
