//! Sync points: interrupts for a guest that computes in ring 3 without exiting (docs/record-replay.md).
//!
//! While recording, interrupts and received frames are delivered at counted exits only: the
//! moment of a kick is host-timed, and nothing marks that instant in the guest's instruction
//! stream on our KVM (no instruction counter, no ring-3 single-step). A guest that does not
//! exit would wait for ever. So when an event has waited longer than a bound (default
//! 10 ms), the recorder kicks the vCPU and takes a **sync point** there: the pages dirtied
//! since the last counted exit or sync point (a superset: what the dirty log had not handed
//! out yet when that exit came), the full vCPU and device state and the guest clock, logged
//! as `SYNC_POINT` at (exit N, k-th sync point after N). Then it delivers the event as at an
//! exit. The replayer, arriving at exit N, applies the sync point instead of re-executing the
//! stretch, and delivers the same events from the log.
//!
//! **Cost.** Reading the dirty log write-protects every page it reports again, and the
//! guest's next write to each of them faults into KVM: on PVM's shadow paging that costs
//! about 20 µs a page, so a guest that rewrites 8 MiB between sync points loses some 40 ms
//! to each one, more than the bound itself (a guest recorded with a sync point every 10 ms
//! barely ran: the regression of issue 13). So sync points are spaced by a **budget**: after
//! one that cost X (its own time plus the estimated faults), the next waits at least
//! X (1 - b) / b, so that they take at most the share b (default 5%) of the guest's time.
//! Interrupts arrive later instead of the guest stalling. The trim at counted exits forgets
//! the recorder's pages without reading the dirty log, so it costs no faults.
//!
//! Verification: at the sync point the replay's device state and guest clock must equal the
//! recording's (they only change at exits, so a difference means the replay diverged before);
//! afterwards both sides count the sync point's pages as written, so the page hashes of later
//! checkpoints cover the same pages and keep checking memory.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::dirty::{Consumer, DirtyTracker};
use crate::error::{Error, Result};
use crate::kick::{DeadlineTimer, Kicker};
use crate::memory::PAGE_SIZE;
use crate::state::VmState;
use crate::vcpu::VcpuLoop;

/// How long an interrupt or frame may wait for an exit before the recorder takes a sync point.
pub const DEFAULT_SYNC_BOUND: Duration = Duration::from_millis(10);

/// The share of the guest's time sync points may take. 5%, not 10%: the refault estimate
/// misses some of the cost (measured with 10%: compute recorded at 1.13x its run here, the
/// goal being 1.10).
pub const DEFAULT_SYNC_BUDGET: f64 = 0.05;

/// How the recorder places its sync points.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncPolicy {
    /// How long an event waits at least before a sync point delivers it.
    bound: Duration,
    /// The share of the guest's time sync points may take, in (0, 1].
    budget: f64,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        SyncPolicy { bound: DEFAULT_SYNC_BOUND, budget: DEFAULT_SYNC_BUDGET }
    }
}

impl SyncPolicy {
    /// A policy; `budget` is a share of the guest's time in (0, 1].
    pub fn new(bound: Duration, budget: f64) -> std::result::Result<Self, String> {
        if bound.is_zero() {
            return Err("the sync-point bound must be more than 0 (no sync points: leave them off)".into());
        }
        if !(budget > 0.0 && budget <= 1.0) {
            return Err(format!("the sync-point budget must be a share in (0, 1], not {budget}"));
        }
        Ok(SyncPolicy { bound, budget })
    }

    pub fn bound(&self) -> Duration {
        self.bound
    }

    pub fn budget(&self) -> f64 {
        self.budget
    }

    /// How long the guest runs after a sync point that cost it `cost` before the next may be
    /// taken: sync points then take at most `budget` of its time.
    fn spacing(&self, cost: Duration) -> Duration {
        cost.mul_f64((1.0 - self.budget) / self.budget)
    }
}

/// The kick goes out this much before the bound (at most half of it): waking the timer
/// thread and signalling the vCPU take a few hundred microseconds here, so delivery lands within the
/// bound on an unloaded host.
const KICK_LEAD: Duration = Duration::from_micros(300);

/// What a `SYNC_POINT` record holds: the VM state (postcard) and the pages. Encoded by hand
/// so that page contents are copied as they are (serde would walk them byte by byte):
/// `u32 state length, state, u32 page count n, n x u64 address, n x 4096 bytes, u32 count m,
/// m x u64 address` (the last list: pages written again with the bytes the previous sync
/// point logged, which both sides count as written without sending them).
struct SyncState {
    state: VmState,
    /// Guest physical addresses of the pages, in order, and their contents one after another.
    addresses: Vec<u64>,
    contents: Vec<u8>,
    unchanged: Vec<u64>,
}

fn put_addresses(out: &mut Vec<u8>, list: &[u64]) {
    out.extend_from_slice(&(list.len() as u32).to_le_bytes());
    for a in list {
        out.extend_from_slice(&a.to_le_bytes());
    }
}

impl SyncState {
    fn encode(&self) -> Result<Vec<u8>> {
        let state =
            postcard::to_stdvec(&self.state).map_err(|e| Error::Capture(format!("sync point: cannot encode: {e}")))?;
        let table = (self.addresses.len() + self.unchanged.len()) * 8;
        let mut out = Vec::with_capacity(12 + state.len() + table + self.contents.len());
        out.extend_from_slice(&(state.len() as u32).to_le_bytes());
        out.extend_from_slice(&state);
        put_addresses(&mut out, &self.addresses);
        out.extend_from_slice(&self.contents);
        put_addresses(&mut out, &self.unchanged);
        Ok(out)
    }

    /// Decodes a record's payload (from a log: untrusted, every length checked).
    fn decode(bytes: &[u8]) -> std::result::Result<Self, String> {
        let take = |at: usize, n: usize| {
            at.checked_add(n).and_then(|end| bytes.get(at..end)).ok_or_else(|| "cut short".to_string())
        };
        let word = |at: usize| take(at, 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
        let addresses_at = |at: usize| -> std::result::Result<(Vec<u64>, usize), String> {
            let count = word(at)?;
            let table = take(at + 4, count.checked_mul(8).ok_or("page count overflows")?)?;
            let list = table.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
            Ok((list, at + 4 + table.len()))
        };
        let state_len = word(0)?;
        let state = postcard::from_bytes(take(4, state_len)?).map_err(|e| format!("VM state: {e}"))?;
        let (addresses, at) = addresses_at(4 + state_len)?;
        let contents = take(at, addresses.len() * PAGE_SIZE as usize)?.to_vec();
        let (unchanged, end) = addresses_at(at + contents.len())?;
        if end != bytes.len() {
            return Err("trailing bytes".into());
        }
        Ok(SyncState { state, addresses, contents, unchanged })
    }
}

/// Figures of a recording's sync points.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SyncStats {
    pub count: u64,
    pub pages: u64,
    /// Encoded bytes (before the log's compression).
    pub bytes: u64,
    /// The longest an event waited before its sync point delivered it, in microseconds.
    pub max_wait_us: u64,
    /// The waits added up (the mean is this over `count`).
    pub total_wait_us: u64,
    /// The recorder's own time in sync points (state, dirty log, pages, the log record): the
    /// vCPU thread's CPU time in them, µs.
    pub work_us: u64,
    /// What they cost the guest in all: `work_us` plus the estimated write faults on the
    /// pages they write-protected again (see `dirty::refault_cost`), µs.
    pub cost_us: u64,
}

impl SyncStats {
    /// The mean wait of an event for its sync point, in microseconds.
    pub fn mean_wait_us(&self) -> u64 {
        self.total_wait_us.checked_div(self.count).unwrap_or(0)
    }
}

/// The recorder's side.
pub(crate) struct SyncRecorder {
    policy: SyncPolicy,
    refault: Duration,
    timer: DeadlineTimer,
    tracker: DirtyTracker,
    consumer: Consumer,
    /// Since when the oldest deliverable event has waited (host time), if one waits.
    waiting_since: Option<Instant>,
    /// The budget's earliest moment for the next sync point.
    not_before: Instant,
    /// Sync points taken since the last counted exit.
    since_exit: u32,
    /// Within one exit-free stretch: the hash of each page as the last sync point logged it.
    /// The replay has exactly those contents (it runs nothing between sync points after the
    /// same exit), so a page the guest rewrote with the same bytes need not be sent again.
    /// Forgotten at every counted exit, where the replay executes again.
    logged: std::collections::HashMap<u64, u64>,
    pub(crate) stats: SyncStats,
}

impl SyncRecorder {
    pub(crate) fn start(policy: SyncPolicy, kicker: std::sync::Arc<Kicker>, tracker: DirtyTracker) -> Result<Self> {
        let consumer = tracker.subscribe()?;
        Ok(SyncRecorder {
            policy,
            refault: crate::dirty::refault_cost(crate::kvm::detect_backend()),
            timer: DeadlineTimer::start(kicker)?,
            tracker,
            consumer,
            waiting_since: None,
            not_before: Instant::now(),
            since_exit: 0,
            logged: std::collections::HashMap::new(),
            stats: SyncStats::default(),
        })
    }

    /// A new log starts here (a state transfer's cut): nothing logged before counts.
    pub(crate) fn restart(&mut self) {
        self.since_exit = 0;
        self.logged.clear();
        self.waiting_since = None;
    }

    /// When the oldest waiting event's sync point is due: after the bound, and not before
    /// the budget allows.
    fn due_at(&self) -> Option<Instant> {
        let bound = self.policy.bound;
        let lead = KICK_LEAD.min(bound / 2);
        self.waiting_since.map(|t| (t + bound - lead).max(self.not_before))
    }

    /// Accounts a sync point that took `work` (CPU time) and handed `pages` pages of the dirty log out
    /// (each to be write-protected again), and spaces the next one by the budget.
    fn account(&mut self, work: Duration, pages: u64, waited: Duration, end: Instant) {
        let cost = work + self.refault * u32::try_from(pages).unwrap_or(u32::MAX);
        self.not_before = end + self.policy.spacing(cost);
        let s = &mut self.stats;
        s.count += 1;
        s.max_wait_us = s.max_wait_us.max(waited.as_micros() as u64);
        s.total_wait_us += waited.as_micros() as u64;
        s.work_us += work.as_micros() as u64;
        s.cost_us += cost.as_micros() as u64;
    }

    fn due(&self, now: Instant) -> bool {
        self.due_at().is_some_and(|t| now >= t)
    }
}

impl Drop for SyncRecorder {
    fn drop(&mut self) {
        self.tracker.unsubscribe(self.consumer);
    }
}

/// The CPU time of the calling thread. A sync point's work is measured in it, not in wall
/// time: on a busy host the vCPU thread may be preempted in the middle of one, and that is
/// no cost of the sync point's to make the guest pay for with a longer spacing.
pub(crate) fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The replayer's side: sync points applied since the last counted exit.
#[derive(Default)]
pub(crate) struct SyncReplayer {
    since_exit: u32,
}

impl VcpuLoop {
    /// Record: after the work of a counted exit (or a sync point), what waits for delivery,
    /// and the timer that kicks the vCPU once it has waited for the bound. `counted`: a new
    /// exit (the count of sync points after it restarts, pages before it may be forgotten).
    pub(crate) fn arm_sync(&mut self, counted: bool) -> Result<()> {
        let Some(sync) = &mut self.sync else { return Ok(()) };
        let now = Instant::now();
        if counted {
            sync.since_exit = 0;
            sync.logged.clear();
            // The replay re-executes up to here: what the recorder has collected so far is
            // not news. Pages still in KVM's dirty log stay there (a superset, harmless);
            // reading the log here would write-protect them and cost the guest faults.
            sync.tracker.forget(sync.consumer);
        }
        // An interrupt the guest could not take here, a frame or console input it could: all
        // deliverable from now on. A timer: from its deadline.
        let pending_now = self.devices.pic.borrow().has_pending_interrupt()
            || self
                .nets
                .iter()
                .zip(&self.devices.virtio.nets)
                .any(|(port, dev)| dev.borrow().rx_ready() && self.events.frame_waiting(port.stream))
            || (self.events.console_input_waiting() && self.devices.uart.borrow().receive_capacity() > 0);
        let deadline = self.devices.next_deadline().map(|d| self.events.host_instant_of(d));
        sync.waiting_since = match (pending_now, deadline) {
            (true, _) => Some(now),
            (false, d) => d,
        };
        sync.timer.arm(sync.due_at());
        Ok(())
    }

    /// Record: after a kick (no counted exit), whether a sync point is due now.
    pub(crate) fn sync_due(&self) -> bool {
        self.sync.as_ref().is_some_and(|s| s.due(Instant::now()))
    }

    /// Record: takes a sync point here, between two exits.
    pub(crate) fn take_sync_point(&mut self) -> Result<()> {
        let started = thread_cpu_time();
        // The kick's KVM_RUN left nothing pending; this refreshes kvm_run's view of whether
        // the guest can take an interrupt exactly as the replay will after applying the state.
        self.complete_pending_io()?;
        let state = self.save_state()?;
        let Some(sync) = &mut self.sync else { return Ok(()) };
        let waited = sync.waiting_since.map_or(Duration::ZERO, |t| t.elapsed());
        let dirty = sync.tracker.take(sync.consumer)?;
        let mem = sync.tracker.memory();
        let (mut addresses, mut contents, mut unchanged) = (Vec::new(), Vec::new(), Vec::new());
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for gpa in dirty.addresses() {
            mem.read_slice(&mut page, GuestAddress(gpa))
                .map_err(|e| Error::Capture(format!("sync point: reading guest page {gpa:#x}: {e}")))?;
            let hash = ftvm_log::hash64(&page);
            if sync.logged.insert(gpa, hash) == Some(hash) {
                unchanged.push(gpa); // the replay has these bytes from the previous sync point
                continue;
            }
            addresses.push(gpa);
            contents.extend_from_slice(&page);
        }
        // The replay writes (or counts as written) these pages: so does every other consumer
        // here, and the next checkpoint hashes the same pages on both sides.
        sync.tracker.mark(&dirty, Some(sync.consumer));
        sync.stats.pages += addresses.len() as u64;
        let bytes = SyncState { state, addresses, contents, unchanged }.encode()?;
        sync.since_exit += 1;
        sync.stats.bytes += bytes.len() as u64;
        let kick = sync.since_exit;
        let wait_us = waited.as_micros() as u64;
        self.events.sync_point(kick, wait_us, bytes);
        if let Some(sync) = &mut self.sync {
            sync.account(thread_cpu_time().saturating_sub(started), dirty.len(), waited, Instant::now());
        }
        Ok(())
    }

    /// Replay: applies the sync point the log has next at this exit, if any. Returns whether
    /// one was applied (the caller then delivers events as after an exit). A sync point that
    /// does not fit is a divergence, reported through the event source.
    pub(crate) fn apply_sync_point(&mut self) -> Result<bool> {
        let Some((kick, bytes)) = self.events.replay_sync_point() else { return Ok(false) };
        // The replay still owes KVM the completion of exit N's access (an IN's data, an MMIO
        // read's, written into the vCPU on the next KVM_RUN): complete it now, on the state it
        // belongs to, before that state is replaced; done afterwards it would write the old
        // access's result (and, for an emulated access, its RIP) into the restored registers.
        self.complete_pending_io()?;
        let expected_kick = self.sync_replay.since_exit + 1;
        let synced = match SyncState::decode(&bytes) {
            Ok(s) => s,
            Err(e) => {
                self.events.replay_mismatch("a sync point".into(), format!("a sync point that does not decode: {e}"));
                return Ok(false);
            }
        };
        if kick != expected_kick {
            self.events
                .replay_mismatch(format!("sync point #{kick} after this exit"), format!("sync point #{expected_kick}"));
            return Ok(false);
        }
        // Devices and the clock change only at exits: here they must be as recorded.
        let ours = self.devices.save_state();
        if let Some(device) = crate::legacy::first_difference(&synced.state.devices, &ours) {
            self.events.replay_mismatch(
                format!("at sync point #{kick}: the recorded state of {device}"),
                format!("the replay's {device} differs"),
            );
            return Ok(false);
        }
        if synced.state.clock != self.events.clock_state() {
            self.events.replay_mismatch(
                format!("at sync point #{kick}: guest time {} ns", synced.state.clock.guest_now),
                format!("guest time {} ns", self.events.clock_state().guest_now),
            );
            return Ok(false);
        }
        let mem = self.tracker.as_ref().map(|t| t.memory()).ok_or(Error::NoDirtyTracker)?;
        for (gpa, page) in synced.addresses.iter().zip(synced.contents.chunks_exact(PAGE_SIZE as usize)) {
            if mem.write_slice(page, GuestAddress(*gpa)).is_err() {
                self.events.replay_mismatch(
                    format!("at sync point #{kick}: pages of guest RAM"),
                    format!("a page at {gpa:#x}, outside RAM"),
                );
                return Ok(false);
            }
        }
        if let Some(tracker) = &self.tracker {
            // Rewritten by the guest with the same bytes: written, as the recorder counts them.
            let mut same = crate::dirty::PageSet::none(&mem);
            synced.unchanged.iter().for_each(|&gpa| same.insert(gpa));
            tracker.mark(&same, None);
        }
        synced.state.vcpu.restore(&self.vcpu)?;
        // kvm_run's interrupt-window view of the restored vCPU, as the recorder had it.
        self.complete_pending_io()?;
        self.sync_replay.since_exit = kick;
        Ok(true)
    }

    /// Replay: a counted exit restarts the count of sync points after it.
    pub(crate) fn sync_replay_exit(&mut self) {
        self.sync_replay.since_exit = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu_state::VcpuState;

    fn state() -> VmState {
        VmState {
            vcpu: VcpuState {
                regs: Default::default(),
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                events: Default::default(),
                debugregs: Default::default(),
                mp_state: Default::default(),
                msrs: vec![(0x174, 8)],
            },
            devices: crate::legacy::Devices::new(7).unwrap().save_state(),
            clock: ftvm_events::ClockState { guest_now: 42 },
        }
    }

    #[test]
    fn the_budget_spaces_sync_points_by_their_cost() {
        let p = SyncPolicy::default();
        assert_eq!((p.bound(), p.budget()), (DEFAULT_SYNC_BOUND, DEFAULT_SYNC_BUDGET));
        // 5%: a sync point that cost 10 ms is followed by 190 ms of the guest's own time.
        assert_eq!(p.spacing(Duration::from_millis(10)), Duration::from_millis(190));
        let half = SyncPolicy::new(Duration::from_millis(1), 0.5).unwrap();
        assert_eq!(half.spacing(Duration::from_millis(3)), Duration::from_millis(3));
        assert_eq!(
            SyncPolicy::new(Duration::from_millis(1), 1.0).unwrap().spacing(Duration::from_secs(1)),
            Duration::ZERO
        );
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(SyncPolicy::new(Duration::from_millis(10), bad).is_err(), "{bad}");
        }
        assert!(SyncPolicy::new(Duration::ZERO, 0.1).is_err());
        let s = SyncStats { count: 4, total_wait_us: 1000, ..Default::default() };
        assert_eq!((s.mean_wait_us(), SyncStats::default().mean_wait_us()), (250, 0));
    }

    #[test]
    fn sync_states_round_trip_and_damage_is_an_error() {
        let mut contents = vec![1u8; PAGE_SIZE as usize];
        contents.extend(vec![2u8; PAGE_SIZE as usize]);
        let s = SyncState { state: state(), addresses: vec![0x1000, 0x5000], contents, unchanged: vec![0x9000] };
        let bytes = s.encode().unwrap();
        let back = SyncState::decode(&bytes).unwrap();
        assert_eq!((back.addresses, back.unchanged), (vec![0x1000, 0x5000], vec![0x9000]));
        assert_eq!(back.contents, s.contents);
        assert_eq!(back.state.clock.guest_now, 42);
        assert_eq!(back.state.devices, s.state.devices);
        // Every cut and a trailing byte are refused, never a panic.
        for len in [0, 3, 4, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(SyncState::decode(&bytes[..len]).is_err(), "cut at {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(SyncState::decode(&longer).is_err());
        // A page count that would overflow.
        let mut huge = bytes.clone();
        let state_len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        huge[4 + state_len..8 + state_len].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(SyncState::decode(&huge).is_err());
    }
}
