//! What the VMM and the API server share: figures the vCPU thread publishes, the pause
//! request it honours between exits, and the pair's figures read on demand.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ftvm_sync::{lock, unpoisoned};

use crate::snapshot::SnapshotProgress;
use crate::status::{ExitCounts, LogStatus, PairStatus, Role, Status, SyncStatus, VmState};

/// The figures the vCPU thread publishes between exits (plain numbers, no locks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuFigures {
    pub exits: u64,
    pub io: u64,
    pub mmio: u64,
    pub hlt: u64,
    pub msr: u64,
    pub interrupts: u64,
    pub kicks: u64,
    pub window_exits: u64,
    /// The guest clock's current value (not a new sample: reading it logs nothing).
    pub guest_time_ns: u64,
    /// Log bytes written (recording, primary).
    pub log_bytes: u64,
    /// Outputs produced so far (logged, or replayed on a backup): the last ordinal + 1.
    pub outputs: u64,
    /// The LSN of the most recent OUTPUT record (primary).
    pub last_output_lsn: Option<u64>,
    /// A backup's replay turned live.
    pub went_live: bool,
    /// Sync points taken (recording, primary).
    pub sync: SyncFigures,
}

/// A recorder's sync points so far (all zero when it takes none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncFigures {
    pub count: u64,
    pub pages: u64,
    pub total_wait_us: u64,
    pub max_wait_us: u64,
    /// The recorder's own time in them.
    pub work_us: u64,
    /// What they cost the guest, with the estimated write faults after them.
    pub cost_us: u64,
}

/// The pair's figures, read from the replication link's shared counters when a status is
/// asked for. Fields that do not apply to this side are `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairFigures {
    pub protected: bool,
    /// Primary.
    pub acked_lsn: Option<u64>,
    /// Primary.
    pub sent_bytes: Option<u64>,
    /// Backup.
    pub received_lsn: Option<u64>,
    /// Backup.
    pub received_bytes: Option<u64>,
    pub outputs_done: u64,
    pub backup_lost: bool,
    pub halted: bool,
    /// Backup: the primary's silence when the failover was decided.
    pub primary_silence_ms: Option<u64>,
    /// Resyncs after a divergence (primary: resyncs it ran; backup: resyncs it received).
    pub resyncs: u64,
    /// Primary: how far the backup's replay is behind (the age of its oldest unreplayed record).
    pub replay_lag_ms: Option<u64>,
    /// Primary: time the vCPU was slowed down for the lag bound.
    pub throttled_ms: Option<u64>,
    /// Primary: the mean time an output was held for its acknowledgement, in µs.
    pub output_hold_us: Option<u64>,
    /// Primary: a new backup catches up after a state transfer (outputs not held yet).
    pub catching_up: bool,
    /// Takeovers this process made (a backup that went live, and later re-protected).
    pub failovers: u64,
    /// Primary: how long outputs were held for their acknowledgement, as a histogram.
    pub output_hold: Option<HoldHistogram>,
    /// Primary: the hold split by stage.
    pub output_stages: Option<crate::OutputStages>,
}

/// Output hold times: `counts[i]` outputs were held at most `bounds_us[i]` µs and more than
/// the bound before it (`counts[bounds_us.len()]`: longer than the last bound); `sum_us`
/// and `count` over all of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldHistogram {
    pub bounds_us: &'static [u64],
    pub counts: [u64; 16],
    pub sum_us: u64,
    pub count: u64,
}

type Waker = Box<dyn Fn() + Send + Sync>;
type PairSource = Box<dyn Fn() -> PairFigures + Send + Sync>;
/// Starts a snapshot into a directory (the VMM's side); an error says why it cannot start.
pub type SnapshotStarter = Box<dyn Fn(PathBuf) -> Result<(), String> + Send + Sync>;
/// Starts a re-protection by the backup at an address (the VMM's side).
pub type ProtectStarter = Box<dyn Fn(std::net::SocketAddr) -> Result<(), Refused> + Send + Sync>;

/// Atomics behind [`VcpuFigures`]; `u64::MAX` in `last_output_lsn` means none.
#[derive(Default)]
struct Published {
    exits: AtomicU64,
    io: AtomicU64,
    mmio: AtomicU64,
    hlt: AtomicU64,
    msr: AtomicU64,
    interrupts: AtomicU64,
    kicks: AtomicU64,
    window_exits: AtomicU64,
    guest_time_ns: AtomicU64,
    log_bytes: AtomicU64,
    outputs: AtomicU64,
    last_output_lsn: AtomicU64,
    went_live: AtomicBool,
    sync: [AtomicU64; 6],
}

/// One VM's control block: the vCPU thread publishes into it and parks on it; the API
/// server reads it and asks for pauses. One per process (one VM per ftvm process).
pub struct VmControl {
    state: AtomicU8,
    role: AtomicU8,
    started: OnceLock<Instant>,
    pause_requested: AtomicBool,
    switchover_requested: AtomicBool,
    park: Mutex<()>,
    park_cv: Condvar,
    figures: Published,
    /// Kicks the vCPU out of KVM_RUN and wakes a halted loop, so that it reaches a pause
    /// point promptly.
    waker: Mutex<Option<Waker>>,
    pair: Mutex<Option<PairSource>>,
    /// (when, log bytes) samples for the bandwidth over the last second.
    samples: Mutex<VecDeque<(Instant, u64)>>,
    snapshot_starter: Mutex<Option<SnapshotStarter>>,
    /// The latest snapshot's progress (`GET /snapshot`).
    snapshot: Mutex<Option<SnapshotProgress>>,
    protect_starter: Mutex<Option<ProtectStarter>>,
    /// The latest re-protection's progress (`GET /protect`).
    protect: Mutex<Option<crate::ProtectProgress>>,
    /// `PUT /shutdown`: the process's shutdown request (true: it went to the guest).
    shutdown_hook: Mutex<Option<Box<dyn Fn() -> bool + Send + Sync>>>,
    /// State transfers completed: sent (re-protections, resyncs) and received.
    transfers_sent: AtomicU64,
    transfers_received: AtomicU64,
}

/// How long `PUT /pause` waits for the vCPU to park before answering "pausing".
pub(crate) const PAUSE_ACK_WAIT: Duration = Duration::from_secs(1);
/// How long a parked vCPU sleeps before it looks at the stop request again.
const PARK_POLL: Duration = Duration::from_millis(50);
/// The window of the log bandwidth.
const BANDWIDTH_WINDOW: Duration = Duration::from_secs(1);

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// 400: the request makes no sense in this state.
    BadState(String),
    /// 409: the VM has stopped.
    Stopped,
    /// 409: something else is under way.
    Busy(String),
}

impl Refused {
    /// The HTTP status and message of the refusal.
    pub fn answer(self) -> (u16, String) {
        match self {
            Refused::BadState(m) => (400, m),
            Refused::Stopped => (409, "the VM has stopped".into()),
            Refused::Busy(m) => (409, m),
        }
    }
}

impl VmControl {
    pub fn new() -> Arc<Self> {
        let control = VmControl {
            state: AtomicU8::new(VmState::Starting.as_u8()),
            role: AtomicU8::new(Role::Standalone.as_u8()),
            started: OnceLock::new(),
            pause_requested: AtomicBool::new(false),
            switchover_requested: AtomicBool::new(false),
            shutdown_hook: Mutex::new(None),
            park: Mutex::new(()),
            park_cv: Condvar::new(),
            figures: Published::default(),
            waker: Mutex::new(None),
            pair: Mutex::new(None),
            samples: Mutex::new(VecDeque::new()),
            snapshot_starter: Mutex::new(None),
            snapshot: Mutex::new(None),
            protect_starter: Mutex::new(None),
            protect: Mutex::new(None),
            transfers_sent: AtomicU64::new(0),
            transfers_received: AtomicU64::new(0),
        };
        control.figures.last_output_lsn.store(u64::MAX, Ordering::Relaxed);
        Arc::new(control)
    }

    /// A state transfer (re-protection or resync) completed: this side sent it (`sent`) or
    /// received it.
    pub fn note_state_transfer(&self, sent: bool) {
        let counter = if sent { &self.transfers_sent } else { &self.transfers_received };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// State transfers completed: (sent, received).
    pub fn state_transfers(&self) -> (u64, u64) {
        (self.transfers_sent.load(Ordering::Relaxed), self.transfers_received.load(Ordering::Relaxed))
    }

    /// The pair's output hold-time histogram (a primary's), if there is one.
    pub fn output_hold(&self) -> Option<HoldHistogram> {
        self.pair_figures().and_then(|p| p.output_hold)
    }

    pub fn set_role(&self, role: Role) {
        self.role.store(role.as_u8(), Ordering::Relaxed);
    }

    pub fn role(&self) -> Role {
        let role = Role::from_u8(self.role.load(Ordering::Relaxed));
        if role == Role::Backup && self.figures.went_live.load(Ordering::Relaxed) {
            return Role::BackupLive;
        }
        role
    }

    pub fn state(&self) -> VmState {
        VmState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// The guest starts running (uptime counts from here).
    pub fn mark_running(&self) {
        let _ = self.started.set(Instant::now());
        let _g = lock(&self.park);
        if self.state() == VmState::Starting {
            self.state.store(VmState::Running.as_u8(), Ordering::Release);
        }
    }

    /// The guest has stopped: pauses are refused from now on.
    pub fn mark_stopped(&self) {
        let _g = lock(&self.park);
        self.state.store(VmState::Stopped.as_u8(), Ordering::Release);
        self.park_cv.notify_all();
    }

    /// How to kick the vCPU and wake a halted loop (`None` to forget it).
    pub fn set_waker(&self, waker: Option<Waker>) {
        *lock(&self.waker) = waker;
    }

    /// Where the pair's figures come from (`None` to forget it).
    pub fn set_pair_source(&self, source: Option<PairSource>) {
        *lock(&self.pair) = source;
    }

    /// How snapshots are taken (`None` to forget it: the VM stopped).
    pub fn set_snapshot_starter(&self, starter: Option<SnapshotStarter>) {
        *lock(&self.snapshot_starter) = starter;
    }

    /// The snapshot job reports its progress here.
    pub fn set_snapshot_progress(&self, progress: SnapshotProgress) {
        *lock(&self.snapshot) = Some(progress);
    }

    /// The latest snapshot's progress, if one was started.
    pub fn snapshot_progress(&self) -> Option<SnapshotProgress> {
        lock(&self.snapshot).clone()
    }

    /// How re-protections are started (`None`: this VM cannot take a backup now).
    pub fn set_protect_starter(&self, starter: Option<ProtectStarter>) {
        *lock(&self.protect_starter) = starter;
    }

    pub fn set_protect_progress(&self, progress: crate::ProtectProgress) {
        *lock(&self.protect) = Some(progress);
    }

    pub fn protect_progress(&self) -> Option<crate::ProtectProgress> {
        lock(&self.protect).clone()
    }

    /// `PUT /protect`: a live VM starts a state transfer to a new backup.
    pub(crate) fn request_protect(&self, backup: std::net::SocketAddr) -> Result<(), Refused> {
        match lock(&self.protect_starter).as_ref() {
            Some(start) => start(backup),
            None => Err(Refused::BadState(
                "this VM cannot take a backup: only a running primary, or a backup that went live, can".into(),
            )),
        }
    }

    /// `PUT /snapshot`: starts a snapshot into `dir` unless one is under way.
    pub(crate) fn request_snapshot(&self, dir: PathBuf) -> Result<(), Refused> {
        if self.state() == VmState::Stopped {
            return Err(Refused::Stopped);
        }
        if let Some(p) = lock(&self.snapshot).as_ref().filter(|p| !p.phase.is_over()) {
            return Err(Refused::Busy(format!("a snapshot to {} is under way; wait for it (GET /snapshot)", p.dir)));
        }
        match lock(&self.snapshot_starter).as_ref() {
            Some(start) => start(dir).map_err(Refused::BadState),
            None => Err(Refused::BadState("this VM cannot be snapshotted (it has not started yet)".into())),
        }
    }

    /// vCPU thread: publishes its figures (relaxed stores; cheap enough for every exit).
    pub fn publish(&self, f: &VcpuFigures) {
        let p = &self.figures;
        let r = Ordering::Relaxed;
        p.exits.store(f.exits, r);
        p.io.store(f.io, r);
        p.mmio.store(f.mmio, r);
        p.hlt.store(f.hlt, r);
        p.msr.store(f.msr, r);
        p.interrupts.store(f.interrupts, r);
        p.kicks.store(f.kicks, r);
        p.window_exits.store(f.window_exits, r);
        p.guest_time_ns.store(f.guest_time_ns, r);
        p.log_bytes.store(f.log_bytes, r);
        p.outputs.store(f.outputs, r);
        p.last_output_lsn.store(f.last_output_lsn.unwrap_or(u64::MAX), r);
        p.went_live.store(f.went_live, r);
        let y = &f.sync;
        for (slot, v) in p.sync.iter().zip([y.count, y.pages, y.total_wait_us, y.max_wait_us, y.work_us, y.cost_us]) {
            slot.store(v, r);
        }
    }

    /// The figures as last published.
    pub fn figures(&self) -> VcpuFigures {
        let p = &self.figures;
        let r = Ordering::Relaxed;
        let lsn = p.last_output_lsn.load(r);
        VcpuFigures {
            exits: p.exits.load(r),
            io: p.io.load(r),
            mmio: p.mmio.load(r),
            hlt: p.hlt.load(r),
            msr: p.msr.load(r),
            interrupts: p.interrupts.load(r),
            kicks: p.kicks.load(r),
            window_exits: p.window_exits.load(r),
            guest_time_ns: p.guest_time_ns.load(r),
            log_bytes: p.log_bytes.load(r),
            outputs: p.outputs.load(r),
            last_output_lsn: (lsn != u64::MAX).then_some(lsn),
            went_live: p.went_live.load(r),
            sync: {
                let [count, pages, total_wait_us, max_wait_us, work_us, cost_us] = p.sync.each_ref().map(|a| a.load(r));
                SyncFigures { count, pages, total_wait_us, max_wait_us, work_us, cost_us }
            },
        }
    }

    /// Whether a pause is requested (one relaxed load: the vCPU's test between exits).
    /// Asks a protected primary to hand over to its backup (`ftvm ctl switchover`).
    pub fn request_switchover(&self) -> Result<(), String> {
        if self.role() != Role::Primary {
            return Err(format!("only a primary can hand over; this VM is {:?}", self.role()));
        }
        self.switchover_requested.store(true, Ordering::SeqCst);
        if let Some(wake) = lock(&self.waker).as_ref() {
            wake();
        }
        Ok(())
    }

    /// What `PUT /shutdown` does: the process's shutdown request (SIGTERM's).
    pub fn set_shutdown_hook(&self, hook: Box<dyn Fn() -> bool + Send + Sync>) {
        *lock(&self.shutdown_hook) = Some(hook);
    }

    /// `PUT /shutdown` (`ftvm ctl shutdown`): as SIGTERM, asks the guest to shut down, or,
    /// the second time (or with `--stop-timeout 0`), stops the VM at once. Returns the state
    /// to report: "shutting down" or "stopping". A backup refuses: its guest is the primary's.
    pub fn request_shutdown(&self) -> Result<&'static str, Refused> {
        if self.role() == Role::Backup {
            return Err(Refused::BadState(
                "a backup replays its primary's guest: shut the primary down (SIGTERM stops a backup)".into(),
            ));
        }
        if self.state() == VmState::Stopped {
            return Err(Refused::Stopped);
        }
        let hook = lock(&self.shutdown_hook);
        let Some(hook) = hook.as_ref() else {
            return Err(Refused::BadState("this VM takes no shutdown request".into()));
        };
        let to_guest = hook();
        if let Some(wake) = lock(&self.waker).as_ref() {
            wake();
        }
        Ok(if to_guest { "shutting down" } else { "stopping" })
    }

    pub fn switchover_requested(&self) -> bool {
        self.switchover_requested.load(Ordering::Relaxed)
    }

    pub fn pause_requested(&self) -> bool {
        self.pause_requested.load(Ordering::Relaxed)
    }

    /// vCPU thread, between exits: if a pause is requested, parks until it is resumed or
    /// `stop()` says to stop (looked at every 50 ms). Returns whether it parked.
    pub fn park_if_paused(&self, stop: &dyn Fn() -> bool) -> bool {
        if !self.pause_requested.load(Ordering::Acquire) {
            return false;
        }
        let mut g = lock(&self.park);
        if self.state() == VmState::Stopped {
            return false;
        }
        while self.pause_requested.load(Ordering::Acquire) && !stop() {
            // (Again after a resume and a new pause that came before this thread woke.)
            if self.state() != VmState::Paused {
                self.state.store(VmState::Paused.as_u8(), Ordering::Release);
                self.park_cv.notify_all();
            }
            g = unpoisoned(self.park_cv.wait_timeout(g, PARK_POLL)).0;
        }
        self.state.store(VmState::Running.as_u8(), Ordering::Release);
        self.park_cv.notify_all();
        true
    }

    /// Asks the vCPU to park and waits up to `wait` until it has. Returns the state then
    /// (paused, or still running/starting if it has not reached a pause point yet).
    pub(crate) fn request_pause(&self, wait: Duration) -> Result<VmState, Refused> {
        {
            let _g = lock(&self.park);
            if self.state() == VmState::Stopped {
                return Err(Refused::Stopped);
            }
            self.pause_requested.store(true, Ordering::Release);
        }
        if let Some(wake) = lock(&self.waker).as_ref() {
            wake();
        }
        let deadline = Instant::now() + wait;
        let mut g = lock(&self.park);
        loop {
            let state = self.state();
            let now = Instant::now();
            if matches!(state, VmState::Paused | VmState::Stopped) || now >= deadline {
                return Ok(state);
            }
            g = unpoisoned(self.park_cv.wait_timeout(g, deadline - now)).0;
        }
    }

    /// Lets a paused (or pausing) vCPU go on.
    pub(crate) fn request_resume(&self) -> Result<VmState, Refused> {
        let _g = lock(&self.park);
        match self.state() {
            VmState::Stopped => Err(Refused::Stopped),
            state if state != VmState::Paused && !self.pause_requested.load(Ordering::Acquire) => {
                Err(Refused::BadState(format!("the VM is not paused (it is {})", state.as_str())))
            }
            _ => {
                self.pause_requested.store(false, Ordering::Release);
                // Running from now on: the parked vCPU leaves as soon as it wakes.
                if self.state() == VmState::Paused {
                    self.state.store(VmState::Running.as_u8(), Ordering::Release);
                }
                self.park_cv.notify_all();
                Ok(self.state())
            }
        }
    }

    fn pair_figures(&self) -> Option<PairFigures> {
        lock(&self.pair).as_ref().map(|f| f())
    }

    /// The byte counter the log bandwidth follows: bytes received on a backup, bytes
    /// written by a recording or a primary; `None` without a log.
    fn log_counter(&self, pair: Option<&PairFigures>) -> Option<u64> {
        match (self.role(), pair) {
            (Role::Backup | Role::BackupLive, Some(p)) => p.received_bytes,
            (Role::Recording | Role::Primary, _) => Some(self.figures.log_bytes.load(Ordering::Relaxed)),
            _ => None,
        }
    }

    /// Server thread, every ~100 ms: a sample for the log bandwidth.
    pub(crate) fn sample(&self) {
        let pair = self.pair_figures();
        let Some(bytes) = self.log_counter(pair.as_ref()) else { return };
        let now = Instant::now();
        let mut s = lock(&self.samples);
        s.push_back((now, bytes));
        // Keep one sample at least a window old, and nothing older than needed.
        while s.len() > 2 && s.get(1).is_some_and(|(t, _)| now.duration_since(*t) >= BANDWIDTH_WINDOW) {
            s.pop_front();
        }
    }

    /// Bytes per second over (about) the last second, given the counter's value now.
    fn bandwidth(&self, now: Instant, bytes: u64) -> Option<f64> {
        let s = lock(&self.samples);
        let (t0, b0) = s.iter().find(|(t, _)| now.duration_since(*t) <= BANDWIDTH_WINDOW + BANDWIDTH_WINDOW / 10)?;
        let dt = now.duration_since(*t0).as_secs_f64();
        (dt >= 0.05).then(|| bytes.saturating_sub(*b0) as f64 / dt)
    }

    /// The whole status, as `GET /status` answers it.
    pub fn status(&self) -> Status {
        let f = self.figures();
        let pair = self.pair_figures();
        let role = self.role();
        let now = Instant::now();
        let log = self
            .log_counter(pair.as_ref())
            .map(|bytes| LogStatus { bytes, bandwidth_bytes_per_s: self.bandwidth(now, bytes) });
        let pair = pair.map(|p| {
            let primary = role == Role::Primary;
            PairStatus {
                protected: p.protected && role != Role::BackupLive,
                acked_lsn: p.acked_lsn,
                last_output_lsn: f.last_output_lsn.filter(|_| primary),
                lag_records: p.acked_lsn.map(|a| f.last_output_lsn.map_or(0, |o| o.saturating_sub(a))),
                sent_bytes: p.sent_bytes,
                unsent_bytes: p.sent_bytes.filter(|_| primary).map(|s| f.log_bytes.saturating_sub(s)),
                received_lsn: p.received_lsn,
                // Outputs are numbered in log order and OUTPUT_DONE is cumulative.
                outputs_held: if role == Role::BackupLive { 0 } else { f.outputs.saturating_sub(p.outputs_done) },
                outputs_done: p.outputs_done,
                failovers: p.failovers.max(u64::from(role == Role::BackupLive)),
                primary_silence_ms: p.primary_silence_ms,
                backup_lost: p.backup_lost,
                halted: p.halted,
                resyncs: p.resyncs,
                replay_lag_ms: p.replay_lag_ms,
                throttled_ms: p.throttled_ms,
                output_hold_us: p.output_hold_us,
                catching_up: p.catching_up,
                output_stages: p.output_stages.clone(),
            }
        });
        Status {
            ftvm_version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            state: self.state(),
            pause_requested: self.pause_requested(),
            role,
            uptime_s: self.started.get().map_or(0.0, |t| t.elapsed().as_secs_f64()),
            guest_time_s: f.guest_time_ns as f64 / 1e9,
            exits: ExitCounts { total: f.exits, io: f.io, mmio: f.mmio, hlt: f.hlt, msr: f.msr },
            interrupts: f.interrupts,
            kicks: f.kicks,
            interrupt_window_exits: f.window_exits,
            log,
            pair,
            sync: (f.sync.count > 0).then(|| SyncStatus {
                count: f.sync.count,
                pages: f.sync.pages,
                mean_wait_us: f.sync.total_wait_us / f.sync.count,
                max_wait_us: f.sync.max_wait_us,
                work_ms: f.sync.work_us / 1000,
                cost_ms: f.sync.cost_us / 1000,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_parks_the_vcpu_until_resumed() {
        let c = VmControl::new();
        c.mark_running();
        let vcpu = {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut exits = 0u64;
                let mut parked = 0;
                while exits < 2000 {
                    exits += 1;
                    c.publish(&VcpuFigures { exits, ..Default::default() });
                    if c.park_if_paused(&|| false) {
                        parked += 1;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                parked
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(c.request_pause(PAUSE_ACK_WAIT), Ok(VmState::Paused));
        let before = c.figures().exits;
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(c.figures().exits, before, "exits advanced while paused");
        assert_eq!(c.status().state, VmState::Paused);
        // Pausing again is fine.
        assert_eq!(c.request_pause(PAUSE_ACK_WAIT), Ok(VmState::Paused));
        assert_eq!(c.request_resume(), Ok(VmState::Running));
        assert!(matches!(c.request_resume(), Err(Refused::BadState(m)) if m.contains("not paused")));
        assert_eq!(vcpu.join().unwrap(), 1);
        c.mark_stopped();
        assert_eq!(c.request_pause(PAUSE_ACK_WAIT), Err(Refused::Stopped));
    }

    #[test]
    fn a_pause_the_vcpu_does_not_reach_answers_pausing() {
        let c = VmControl::new();
        c.mark_running();
        assert_eq!(c.request_pause(Duration::from_millis(30)), Ok(VmState::Running));
        assert!(c.status().pause_requested);
        // Resuming a pause that never took effect cancels it.
        assert_eq!(c.request_resume(), Ok(VmState::Running));
        assert!(!c.pause_requested());
    }

    #[test]
    fn a_stop_request_unparks() {
        let c = VmControl::new();
        c.mark_running();
        c.pause_requested.store(true, Ordering::SeqCst);
        let start = Instant::now();
        assert!(c.park_if_paused(&|| start.elapsed() > Duration::from_millis(60)));
    }

    #[test]
    fn pair_figures_and_bandwidth() {
        let c = VmControl::new();
        c.set_role(Role::Primary);
        c.mark_running();
        c.publish(&VcpuFigures { log_bytes: 1000, last_output_lsn: Some(112), outputs: 20, ..Default::default() });
        c.set_pair_source(Some(Box::new(|| PairFigures {
            protected: true,
            acked_lsn: Some(100),
            sent_bytes: Some(900),
            outputs_done: 17,
            ..Default::default()
        })));
        c.sample();
        std::thread::sleep(Duration::from_millis(100));
        c.publish(&VcpuFigures { log_bytes: 2000, last_output_lsn: Some(112), outputs: 20, ..Default::default() });
        let s = c.status();
        let p = s.pair.unwrap();
        assert_eq!((p.lag_records, p.unsent_bytes, p.outputs_held, p.failovers), (Some(12), Some(1100), 3, 0));
        let bw = s.log.unwrap().bandwidth_bytes_per_s.unwrap();
        assert!(bw > 3000.0 && bw < 11000.0, "{bw}");
        // A backup that went live.
        let b = VmControl::new();
        b.set_role(Role::Backup);
        b.set_pair_source(Some(Box::new(|| PairFigures {
            protected: true,
            received_lsn: Some(50),
            received_bytes: Some(4096),
            primary_silence_ms: Some(420),
            ..Default::default()
        })));
        b.publish(&VcpuFigures { went_live: true, outputs: 2, ..Default::default() });
        let s = b.status();
        assert_eq!(s.role, Role::BackupLive);
        let p = s.pair.unwrap();
        assert_eq!((p.protected, p.failovers, p.outputs_held, p.lag_records), (false, 1, 0, None));
        assert_eq!(s.log.unwrap().bytes, 4096);
    }
}
