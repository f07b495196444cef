//! The event source: the one choke point through which every guest-visible non-deterministic
//! value enters the VM (docs/record-replay.md).
//!
//! Host inputs are of three kinds: the guest clock, data the outside world sends (console
//! input, received network frames, rng bytes), and the moment at which asynchronous host
//! activity is admitted. Devices never read a host clock: they read [`EventSource`]
//! through the [`GuestClock`] trait, and the vCPU loop admits host data only through it, at
//! counted exits.
//!
//! Three modes behind the same calls ([`Mode`]): **live** (`ftvm run`: the guest clock follows
//! the host's monotonic clock, sampled only where a device needs time), **record** (the same,
//! and every input, every reading of time and every exit's signature goes to the log:
//! `ftvm record`, a primary) and **replay** (everything comes from the log and is checked
//! against what the VM does: `ftvm replay`, a backup, which can switch to live when it takes
//! over). The journal ([`journal`]) holds the recorder's and the replayer's halves.

pub mod journal;
pub mod output;

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use ftvm_devices::{GuestClock, GuestNanos, HostInputs};
use ftvm_log::{EndReason, LogReader, LogWriter};

pub use journal::{exit_kind, Divergence, ExitSignature, RecordSource, ReplayStop, CHECKPOINT_INTERVAL};
use journal::{Recorder, Replayer};
pub use output::{OutputGate, OutputSinks, OutputTarget, OutputTicket};

/// The position of a counted exit (docs/record-replay.md: IO, MMIO, HLT, MSR and SHUTDOWN exits).
pub type ExitIndex = u64;

/// How the event source obtains host inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Inputs come straight from the host; nothing is logged (`ftvm run`).
    Live,
    /// Inputs come from the host and are written to the log with the exits' signatures,
    /// checkpoints and outputs (`ftvm record`).
    Record,
    /// Inputs come from the log; everything else is recomputed and checked against it
    /// (`ftvm replay`).
    Replay,
}

/// The log behind the event source, by mode.
enum Journal {
    None,
    Record(Box<Recorder>),
    Replay(Box<Replayer>),
}

/// Counts of what passed through the choke point, for status and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventCounts {
    /// Counted exits seen.
    pub exits: u64,
    /// Time-dependent reads of the guest clock and deadline admissions.
    pub clock_samples: u64,
    /// Console input bytes admitted.
    pub console_bytes: u64,
    /// Entropy bytes handed to devices.
    pub entropy_bytes: u64,
    /// Received network frames admitted (all streams).
    pub frames: u64,
    /// Bytes of those frames.
    pub frame_bytes: u64,
}

/// One stream of received network frames (one per virtio-net device), in attach order.
pub type FrameStream = usize;

/// Frames that arrived from a host thread and wait to be admitted.
struct FrameInput {
    rx: Receiver<Vec<u8>>,
    /// The next frame, taken off the channel to look at it. At most one: frames the guest
    /// does not take stay in the (bounded) channel, so the host thread drops the excess.
    next: Option<Vec<u8>>,
    closed: bool,
}

impl FrameInput {
    /// Takes the next frame off the channel if none is held yet.
    fn poll(&mut self) {
        if self.next.is_none() && !self.closed {
            match self.rx.try_recv() {
                Ok(frame) => self.next = Some(frame),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => self.closed = true,
            }
        }
    }
}

/// The single source of host inputs for one VM.
pub struct EventSource {
    mode: Mode,
    /// Host time at guest time 0.
    epoch: Instant,
    /// Guest time at `epoch` (0 at boot; the saved clock of a restored VM or a backup that
    /// went live). Kept apart so that no `Instant` before the host's boot is ever needed.
    epoch_guest: GuestNanos,
    /// The guest clock: the last value handed out. Never goes backwards.
    guest_now: GuestNanos,
    /// Wall-clock seconds at guest time 0 (the RTC's base).
    rtc_base_unix: u64,
    console_rx: Option<Receiver<Vec<u8>>>,
    console_pending: VecDeque<u8>,
    console_closed: bool,
    frames: Vec<FrameInput>,
    counts: EventCounts,
    journal: Journal,
    /// Backup of a fault-tolerant pair: when the primary's stream ends (failover), the
    /// replay turns live at that very point instead of stopping.
    live_on_end: bool,
    went_live_at: Option<ExitIndex>,
    /// Outputs counted in live mode (after a backup went live, numbering continues).
    live_outputs: u64,
    /// Record: when the last checkpoint was taken (host time; it only decides where
    /// checkpoints go in the log, which the replay follows).
    last_checkpoint: Instant,
    /// Record: how long after it the next one comes ([`CHECKPOINT_MAX_AGE`], or longer when
    /// the last one's page hashes cost the guest more than their budget).
    checkpoint_gap: Duration,
    last_checkpoint_exit: Option<ExitIndex>,
}

/// A recording takes a checkpoint at least this often (at the next counted exit), unless
/// the last one cost more than its budget ([`EventSource::space_checkpoints`]).
pub const CHECKPOINT_MAX_AGE: Duration = Duration::from_millis(100);

/// The event source's part of a VM's saved state: the guest clock. (Host inputs that have
/// arrived but were not admitted are not guest state: like frames in flight, they are lost.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ClockState {
    /// The guest clock's value when the state was saved.
    pub guest_now: GuestNanos,
}

impl EventSource {
    /// A live event source whose guest clock starts now, with the RTC reading `rtc_base_unix`
    /// (seconds since 1970) at guest time 0.
    pub fn live(rtc_base_unix: u64) -> Self {
        EventSource {
            mode: Mode::Live,
            epoch: Instant::now(),
            epoch_guest: 0,
            guest_now: 0,
            rtc_base_unix,
            console_rx: None,
            console_pending: VecDeque::new(),
            console_closed: false,
            frames: Vec::new(),
            counts: EventCounts::default(),
            journal: Journal::None,
            live_on_end: false,
            went_live_at: None,
            live_outputs: 0,
            last_checkpoint: Instant::now(),
            checkpoint_gap: CHECKPOINT_MAX_AGE,
            last_checkpoint_exit: None,
        }
    }

    /// A recording event source: live inputs, each also written to `log`.
    pub fn record(rtc_base_unix: u64, log: LogWriter<Box<dyn std::io::Write + Send>>) -> Self {
        let mut src = Self::live(rtc_base_unix);
        src.mode = Mode::Record;
        src.journal = Journal::Record(Box::new(Recorder::new(log)));
        src
    }

    /// A replaying event source: every input comes from `log` (whose header was read).
    pub fn replay(rtc_base_unix: u64, log: LogReader<Box<dyn std::io::Read + Send>>) -> Self {
        Self::replay_from(rtc_base_unix, Box::new(log), false)
    }

    /// A replaying event source over any record stream. With `live_on_end` (a backup), the
    /// end of the stream turns the source live where it stands: the guest clock continues
    /// from the last logged value and inputs come from the host from then on.
    pub fn replay_from(rtc_base_unix: u64, source: Box<dyn RecordSource>, live_on_end: bool) -> Self {
        let mut src = Self::live(rtc_base_unix);
        src.mode = Mode::Replay;
        src.journal = Journal::Replay(Box::new(Replayer::new(source)));
        src.live_on_end = live_on_end;
        src
    }

    /// Starts a new recording here, between two exits (the cut of a live state transfer):
    /// from now on inputs are also written to `log`, numbered as in a recording that starts
    /// from a snapshot (exits and outputs from 0), which is what the backup that restores
    /// the state taken here replays. A live source (a backup that went live) becomes a
    /// recording; a recording (a primary that lost its backup) drops its old log.
    pub fn start_recording(&mut self, log: LogWriter<Box<dyn std::io::Write + Send>>) {
        self.mode = Mode::Record;
        self.journal = Journal::Record(Box::new(Recorder::new(log)));
        self.counts = EventCounts::default();
        self.last_checkpoint_exit = None;
        self.live_on_end = false;
        self.live_outputs = 0;
    }

    /// Record only: the LSN the next log record will get.
    pub fn log_next_lsn(&self) -> Option<u64> {
        match &self.journal {
            Journal::Record(r) => Some(r.next_lsn()),
            _ => None,
        }
    }

    /// The guest clock, for a saved state.
    pub fn clock_state(&self) -> ClockState {
        ClockState { guest_now: self.guest_now }
    }

    /// Continues the guest clock from a saved state (a restored VM, a sync point): the guest
    /// sees time go on from where it was saved, with no jump for the time the VM was away.
    pub fn resume_clock(&mut self, state: &ClockState) {
        self.guest_now = state.guest_now;
        self.restart_epoch();
    }

    /// The exit at which a backup's replay turned live, if it did.
    pub fn went_live_at(&self) -> Option<ExitIndex> {
        self.went_live_at
    }

    /// Replay only: the ordinal the next output will have.
    pub fn next_output_ordinal(&self) -> Option<u64> {
        match &self.journal {
            Journal::Replay(r) => Some(r.next_output_ordinal()),
            _ => None,
        }
    }

    /// Turns a backup's replay live if its stream has ended. Returns whether it is live now.
    fn check_live_switch(&mut self) -> bool {
        if !self.live_on_end {
            return self.mode == Mode::Live;
        }
        if let Journal::Replay(r) = &mut self.journal {
            if r.stop.is_none() && r.exhausted() {
                // The guest clock goes on from where the log left it.
                self.restart_epoch();
                self.journal = Journal::None;
                self.mode = Mode::Live;
                self.went_live_at = Some(self.position());
            }
        }
        self.mode == Mode::Live
    }

    /// Record mode: pushes buffered log bytes out (the backup cannot leave an exit until it
    /// knows that exit has no more events).
    pub fn flush_log(&mut self) {
        if let Journal::Record(r) = &mut self.journal {
            r.flush();
        }
    }

    /// The exit at which events are positioned now: the most recent counted exit.
    fn position(&self) -> ExitIndex {
        self.counts.exits.saturating_sub(1)
    }

    /// Whether the vCPU loop should compute exit signatures and checkpoints (not in live
    /// mode, where nothing would check them).
    pub fn wants_signatures(&self) -> bool {
        self.mode != Mode::Live
    }

    /// The signature of the current counted exit, known once its access was handled.
    pub fn exit_signature(&mut self, sig: ExitSignature) {
        let index = self.position();
        match &mut self.journal {
            Journal::None => {}
            Journal::Record(r) => r.signature(index, sig),
            Journal::Replay(r) => r.signature(index, sig),
        }
    }

    /// Whether a checkpoint (register digest, page hashes) is due at the current exit: every
    /// [`CHECKPOINT_INTERVAL`] exits, and in a recording also once [`CHECKPOINT_MAX_AGE`] has
    /// passed since the last one (a backup then finds a divergence within a fraction of a
    /// second even in a guest that exits rarely), or the longer gap the last one's cost asked
    /// for. A replay takes one wherever the log has one.
    pub fn checkpoint_due(&mut self) -> bool {
        if self.mode == Mode::Live || self.counts.exits == 0 {
            return false;
        }
        let position = self.position();
        if position % CHECKPOINT_INTERVAL == 0 {
            return true;
        }
        match &mut self.journal {
            Journal::Record(_) => self.last_checkpoint.elapsed() >= self.checkpoint_gap,
            Journal::Replay(r) => r.checkpoint_at(position),
            Journal::None => false,
        }
    }

    /// Whether a checkpoint was taken at the current exit already (the final one of a run is
    /// then not taken again: a replay, which takes checkpoints where the log has them, could
    /// not tell the two apart).
    pub fn checkpoint_taken_here(&self) -> bool {
        self.counts.exits > 0 && self.last_checkpoint_exit == Some(self.position())
    }

    /// Record: the next timed checkpoint comes `gap` after the last one, or after
    /// [`CHECKPOINT_MAX_AGE`] if that is longer (the checkpoints every
    /// [`CHECKPOINT_INTERVAL`] exits come regardless).
    pub fn space_checkpoints(&mut self, gap: Duration) {
        self.checkpoint_gap = gap.max(CHECKPOINT_MAX_AGE);
    }

    /// Logs (record) or checks (replay) a checkpoint with the vCPU's register digest.
    pub fn checkpoint(&mut self, regs_hash: u64) {
        self.last_checkpoint = Instant::now();
        let index = self.position();
        self.last_checkpoint_exit = Some(index);
        match &mut self.journal {
            Journal::None => {}
            Journal::Record(r) => r.checkpoint(index, regs_hash),
            Journal::Replay(r) => r.checkpoint(index, regs_hash),
        }
    }

    /// Replay only: the frames of the pages whose hashes the log has at this checkpoint (the
    /// pages the recording's guest and VMM wrote). The replay hashes exactly those pages of
    /// its own memory: equal contents are what must hold. (Its own dirty set is not compared:
    /// on PVM, KVM can mark a page dirty that the guest did not write, e.g. code pages after
    /// a sync point is applied to a restored VM, so the sets may differ where the contents
    /// agree.) `None` if the log has no page hashes here, which `page_hashes` then reports.
    pub fn replay_page_list(&mut self) -> Option<Vec<u64>> {
        let index = self.position();
        match &mut self.journal {
            Journal::Replay(r) => r.logged_pages(index),
            _ => None,
        }
    }

    /// Hashes of the pages dirtied since the previous checkpoint: logged (record) or
    /// compared (replay).
    pub fn page_hashes(&mut self, pages: Vec<(u64, u64)>) {
        let index = self.position();
        match &mut self.journal {
            Journal::None => {}
            Journal::Record(r) => r.append(ftvm_log::Record::PageHashes { exit: index, pages }),
            Journal::Replay(r) => r.page_hashes(index, pages),
        }
    }

    /// Record only: a sync point, the `kick`-th after the current exit (docs/record-replay.md): the
    /// state the replay applies instead of re-executing the exit-free stretch before it.
    /// Events admitted after it are positioned at the same exit and follow it in the log.
    /// `wait_us`: how long the oldest event it delivers waited for it.
    pub fn sync_point(&mut self, kick: u32, wait_us: u64, state: Vec<u8>) {
        let exit = self.position();
        if let Journal::Record(r) = &mut self.journal {
            r.append(ftvm_log::Record::SyncPoint { exit, kick, wait_us, state });
        }
    }

    /// Replay only: the sync point that comes next at the current exit, if one does (the
    /// recording took one here: the replay applies it before running the guest again).
    pub fn replay_sync_point(&mut self) -> Option<(u32, Vec<u8>)> {
        let index = self.position();
        if self.check_live_switch() {
            return None;
        }
        let Journal::Replay(r) = &mut self.journal else { return None };
        match r.take_at(index, |r| matches!(r, ftvm_log::Record::SyncPoint { .. })) {
            Some(ftvm_log::Record::SyncPoint { kick, state, .. }) => Some((kick, state)),
            _ => None,
        }
    }

    /// Replay only: the replay disagrees with the log at the current exit (something the
    /// VMM checked itself, such as a sync point's device state).
    pub fn replay_mismatch(&mut self, expected: String, actual: String) {
        let index = self.position();
        if let Journal::Replay(r) = &mut self.journal {
            r.mismatch(index, expected, actual);
        }
    }

    /// An output the guest produced (console bytes, a transmitted frame): logged with its
    /// ordinal and digest in record mode, checked in replay mode.
    pub fn output(&mut self, kind: u8, bytes: &[u8]) -> OutputTicket {
        let index = self.position();
        self.check_live_switch();
        match &mut self.journal {
            Journal::None => {
                let ordinal = self.live_outputs;
                self.live_outputs += 1;
                OutputTicket { ordinal, lsn: None }
            }
            Journal::Record(r) => {
                let (ordinal, lsn) = r.output(index, kind, bytes);
                OutputTicket { ordinal, lsn }
            }
            Journal::Replay(r) => {
                let ordinal = r.next_output_ordinal();
                r.output(index, kind, bytes);
                self.live_outputs = ordinal + 1;
                OutputTicket { ordinal, lsn: None }
            }
        }
    }

    /// The end of the run: the END record (record) or its check (replay). Returns an error
    /// only if the log could not be completed.
    pub fn end(&mut self, reason: EndReason) -> Result<(), ftvm_log::LogError> {
        let index = self.position();
        match &mut self.journal {
            Journal::None => Ok(()),
            Journal::Record(r) => r.end(index, reason),
            // Stopped here by its own operator: nothing in the log to check against.
            Journal::Replay(_) if reason == EndReason::OperatorStop => Ok(()),
            Journal::Replay(r) => {
                r.end(index, reason);
                Ok(())
            }
        }
    }

    /// Replay only: why the replay must stop now (divergence, or the log ended early).
    pub fn replay_stop(&self) -> Option<&ReplayStop> {
        match &self.journal {
            Journal::Replay(r) => r.stop.as_ref(),
            _ => None,
        }
    }

    /// Replay only: whether the log holds more records at the current exit (a halted guest
    /// is woken by them; without them it would never have woken in the recording).
    pub fn replay_has_records_here(&mut self) -> bool {
        let index = self.position();
        self.check_live_switch();
        match &mut self.journal {
            Journal::Replay(r) => r.has_records_at(index),
            _ => false,
        }
    }

    /// Replay only: the END record positioned at the current exit, if it comes next (the
    /// recording stopped here).
    pub fn replay_end_here(&mut self) -> Option<EndReason> {
        let index = self.position();
        match &mut self.journal {
            Journal::Replay(r) => r.end_at(index),
            _ => None,
        }
    }

    /// Replay only: the guest is halted and the log has nothing more for this exit.
    pub fn replay_halted_without_input(&mut self) {
        let index = self.position();
        if self.check_live_switch() {
            return;
        }
        if let Journal::Replay(r) = &mut self.journal {
            r.halted_without_input(index);
        }
    }

    /// Record only: the first error writing the log, or the size limit being reached; the
    /// recording must stop there.
    pub fn record_problem(&self) -> Option<String> {
        match &self.journal {
            Journal::Record(r) if r.size_limit_hit => Some("the log reached its size limit".into()),
            Journal::Record(r) => r.failed.as_ref().map(|e| format!("writing the log failed: {e}")),
            _ => None,
        }
    }

    /// Record only: log bytes written so far.
    pub fn log_bytes(&self) -> u64 {
        match &self.journal {
            Journal::Record(r) => r.bytes_written(),
            _ => 0,
        }
    }

    /// Connects console input: chunks of bytes sent on this channel are admitted at exits.
    pub fn attach_console_input(&mut self, rx: Receiver<Vec<u8>>) {
        self.console_rx = Some(rx);
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn rtc_base_unix(&self) -> u64 {
        self.rtc_base_unix
    }

    /// The index the next counted exit will get; equals the number of counted exits so far.
    pub fn exit_index(&self) -> ExitIndex {
        self.counts.exits
    }

    pub fn counts(&self) -> EventCounts {
        self.counts
    }

    /// Records that a counted exit happened. Events admitted until the next call are
    /// positioned at this exit.
    pub fn counted_exit(&mut self) -> ExitIndex {
        let index = self.counts.exits;
        self.counts.exits += 1;
        match &mut self.journal {
            Journal::None => {}
            Journal::Record(r) => r.begin_exit(index),
            Journal::Replay(r) => r.begin_exit(index),
        }
        index
    }

    /// The guest clock's current value without sampling the host (no event).
    pub fn current(&self) -> GuestNanos {
        self.guest_now
    }

    /// Admits the passing of guest time up to `deadline` if the host clock has reached it.
    /// Returns the new guest time when it moved. Called at counted exits (and at kicks in a
    /// plain run) with the earliest device deadline.
    pub fn admit_deadline(&mut self, deadline: Option<GuestNanos>) -> Option<GuestNanos> {
        let deadline = deadline?;
        if deadline <= self.guest_now {
            // Already due in guest time (a timer catching up): no new input needed.
            return Some(self.guest_now);
        }
        let index = self.position();
        self.check_live_switch();
        if let Journal::Replay(r) = &mut self.journal {
            let t = r.clock_admission(index)?;
            if t < deadline {
                r.mismatch(index, format!("clock admission t={t} before the deadline"), format!("deadline {deadline}"));
            }
            return Some(self.advance_to(t));
        }
        let host = self.host_elapsed();
        if host < deadline {
            return None;
        }
        let t = self.advance_to(host);
        if let Journal::Record(r) = &mut self.journal {
            r.append(ftvm_log::Record::Clock { exit: index, t });
        }
        Some(t)
    }

    /// How long, in host time, until guest time `deadline` is due (zero if it already is).
    pub fn host_wait_until(&self, deadline: GuestNanos) -> Duration {
        Duration::from_nanos(deadline.saturating_sub(self.host_elapsed()))
    }

    /// The host instant at which guest time `deadline` will be due.
    pub fn host_instant_of(&self, deadline: GuestNanos) -> Instant {
        self.epoch + Duration::from_nanos(deadline.saturating_sub(self.epoch_guest))
    }

    /// Admits up to `max` bytes of console input that have arrived from the host.
    pub fn admit_console_input(&mut self, max: usize) -> Vec<u8> {
        let index = self.position();
        self.check_live_switch();
        if let Journal::Replay(r) = &mut self.journal {
            let bytes = r.console_input(index, max);
            self.counts.console_bytes += bytes.len() as u64;
            return bytes;
        }
        if let Some(rx) = &self.console_rx {
            while !self.console_closed {
                match rx.try_recv() {
                    Ok(chunk) => self.console_pending.extend(chunk),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => self.console_closed = true,
                }
            }
        }
        let n = max.min(self.console_pending.len());
        self.counts.console_bytes += n as u64;
        let bytes: Vec<u8> = self.console_pending.drain(..n).collect();
        if let (Journal::Record(r), false) = (&mut self.journal, bytes.is_empty()) {
            r.append(ftvm_log::Record::ConsoleInput { exit: index, bytes: bytes.clone() });
        }
        bytes
    }

    /// Admits an operator's shutdown request at the current exit: live and record take it when
    /// `pending` (the host has one that was not delivered yet; a recording logs it as
    /// SHUTDOWN_REQUEST here), replay when the log has one here, whatever the host says.
    /// Returns whether the request is delivered to the guest at this exit.
    pub fn admit_shutdown_request(&mut self, pending: bool) -> bool {
        let index = self.position();
        self.check_live_switch();
        if let Journal::Replay(r) = &mut self.journal {
            return r.shutdown_request(index);
        }
        if let (Journal::Record(r), true) = (&mut self.journal, pending) {
            r.append(ftvm_log::Record::ShutdownRequest { exit: index });
        }
        pending
    }

    /// Whether more console input may still arrive.
    pub fn console_input_open(&self) -> bool {
        self.console_rx.is_some() && !self.console_closed || !self.console_pending.is_empty()
    }

    /// Whether console input is waiting to be admitted.
    pub fn console_input_waiting(&self) -> bool {
        !self.console_pending.is_empty()
    }

    /// Connects a stream of received network frames (a TAP reader thread sends on it).
    /// Streams are numbered in attach order, one per network device.
    pub fn attach_frames(&mut self, rx: Receiver<Vec<u8>>) -> FrameStream {
        self.frames.push(FrameInput { rx, next: None, closed: false });
        self.frames.len() - 1
    }

    /// Whether a frame of `stream` has arrived and waits to be admitted. Asking admits
    /// nothing: the caller checks that the device can take a frame, then calls
    /// [`EventSource::admit_frame`].
    pub fn frame_waiting(&mut self, stream: FrameStream) -> bool {
        let index = self.position();
        self.check_live_switch();
        if let Journal::Replay(r) = &mut self.journal {
            return r.frame_waiting(index, stream as u8);
        }
        self.frames.get_mut(stream).is_some_and(|f| {
            f.poll();
            f.next.is_some()
        })
    }

    /// Admits the next received frame of `stream`, if one has arrived: from now on it is
    /// guest-visible input, positioned at the current exit (record mode logs it here).
    pub fn admit_frame(&mut self, stream: FrameStream) -> Option<Vec<u8>> {
        let index = self.position();
        self.check_live_switch();
        let frame = if let Journal::Replay(r) = &mut self.journal {
            r.frame(index, stream as u8)?
        } else {
            let input = self.frames.get_mut(stream)?;
            input.poll();
            input.next.take()?
        };
        self.counts.frames += 1;
        self.counts.frame_bytes += frame.len() as u64;
        if let Journal::Record(r) = &mut self.journal {
            r.append(ftvm_log::Record::NetRx { exit: index, dev: stream as u8, frame: frame.clone() });
        }
        Some(frame)
    }

    /// Replaces the host side of a frame stream (a backup opening its TAP when it goes live).
    pub fn replace_frames(&mut self, stream: FrameStream, rx: Receiver<Vec<u8>>) {
        if let Some(f) = self.frames.get_mut(stream) {
            *f = FrameInput { rx, next: None, closed: false };
        }
    }

    /// Whether more frames may still arrive on any stream.
    pub fn frames_open(&self) -> bool {
        self.frames.iter().any(|f| !f.closed || f.next.is_some())
    }

    fn host_elapsed(&self) -> GuestNanos {
        let elapsed = self.epoch.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.epoch_guest.saturating_add(elapsed)
    }

    /// The guest clock follows the host's from now on, starting at its current value.
    fn restart_epoch(&mut self) {
        self.epoch = Instant::now();
        self.epoch_guest = self.guest_now;
    }

    fn advance_to(&mut self, t: GuestNanos) -> GuestNanos {
        self.counts.clock_samples += 1;
        self.guest_now = self.guest_now.max(t);
        self.guest_now
    }
}

impl GuestClock for EventSource {
    /// A time-dependent read: samples the host clock (live mode).
    fn now(&mut self) -> GuestNanos {
        let index = self.position();
        self.check_live_switch();
        match &mut self.journal {
            Journal::Replay(r) => match r.clock_read(index) {
                Some(t) => self.advance_to(t),
                None => self.guest_now,
            },
            _ => {
                let host = self.host_elapsed();
                let t = self.advance_to(host);
                if let Journal::Record(r) = &mut self.journal {
                    r.append(ftvm_log::Record::Clock { exit: index, t });
                }
                t
            }
        }
    }
}

impl HostInputs for EventSource {
    /// Entropy from the host's random source (live mode).
    fn entropy(&mut self, buf: &mut [u8]) -> bool {
        let index = self.position();
        self.check_live_switch();
        if let Journal::Replay(r) = &mut self.journal {
            let ok = r.entropy(index, buf);
            if ok {
                self.counts.entropy_bytes += buf.len() as u64;
            }
            return ok;
        }
        match getrandom::fill(buf) {
            Ok(()) => {
                self.counts.entropy_bytes += buf.len() as u64;
                if let Journal::Record(r) = &mut self.journal {
                    r.append(ftvm_log::Record::Entropy { exit: index, bytes: buf.to_vec() });
                }
                true
            }
            Err(e) => {
                tracing::error!("the host's random source failed: {e}");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_clock_is_monotonic_and_counts_samples() {
        let mut src = EventSource::live(0);
        let a = src.now();
        std::thread::sleep(Duration::from_millis(2));
        let b = src.now();
        assert!(b >= a + 1_000_000);
        assert_eq!(src.counts().clock_samples, 2);
        assert_eq!(src.current(), b);
    }

    #[test]
    fn a_resumed_clock_goes_on_from_its_saved_value() {
        let mut src = EventSource::live(0);
        // Days of guest time: more than this host may have been up (no Instant before boot).
        let saved = ClockState { guest_now: 5 * 86_400 * 1_000_000_000 };
        src.resume_clock(&saved);
        assert_eq!(src.clock_state(), saved);
        std::thread::sleep(Duration::from_millis(2));
        let t = src.now();
        assert!(t >= saved.guest_now + 2_000_000 && t < saved.guest_now + 2_000_000_000, "{t}");
        assert!(src.host_wait_until(saved.guest_now) == Duration::ZERO);
        assert!(src.host_wait_until(t + 1_000_000_000) > Duration::from_millis(900));
    }

    #[test]
    fn deadlines_are_admitted_only_once_due() {
        let mut src = EventSource::live(0);
        assert_eq!(src.admit_deadline(None), None);
        assert_eq!(src.admit_deadline(Some(u64::MAX)), None);
        std::thread::sleep(Duration::from_millis(1));
        let t = src.admit_deadline(Some(500_000)).expect("due");
        assert!(t >= 500_000);
        // Already in the past in guest time: due without sampling again.
        let samples = src.counts().clock_samples;
        assert_eq!(src.admit_deadline(Some(1)), Some(t));
        assert_eq!(src.counts().clock_samples, samples);
    }

    #[test]
    fn console_input_is_admitted_in_order_and_bounded() {
        let mut src = EventSource::live(0);
        let (tx, rx) = std::sync::mpsc::channel();
        src.attach_console_input(rx);
        tx.send(b"hel".to_vec()).unwrap();
        tx.send(b"lo".to_vec()).unwrap();
        drop(tx);
        assert_eq!(src.admit_console_input(4), b"hell");
        assert!(src.console_input_waiting());
        assert_eq!(src.admit_console_input(4), b"o");
        assert_eq!(src.admit_console_input(4), b"");
        assert_eq!(src.counts().console_bytes, 5);
        assert_eq!(src.counted_exit(), 0);
        assert_eq!(src.exit_index(), 1);
    }

    #[test]
    fn frames_are_admitted_per_stream_in_order_and_counted() {
        let mut src = EventSource::live(0);
        assert!(!src.frames_open());
        let (tx0, rx0) = std::sync::mpsc::sync_channel(4);
        let (tx1, rx1) = std::sync::mpsc::channel();
        assert_eq!(src.attach_frames(rx0), 0);
        assert_eq!(src.attach_frames(rx1), 1);
        assert!(src.frames_open());
        assert!(!src.frame_waiting(0));
        assert_eq!(src.admit_frame(0), None);
        tx0.send(vec![1; 60]).unwrap();
        tx0.send(vec![2; 70]).unwrap();
        tx1.send(vec![3; 80]).unwrap();
        assert!(src.frame_waiting(0));
        // Looking does not admit.
        assert_eq!(src.counts().frames, 0);
        assert_eq!(src.admit_frame(1), Some(vec![3; 80]));
        assert_eq!(src.admit_frame(0), Some(vec![1; 60]));
        assert_eq!(src.admit_frame(0), Some(vec![2; 70]));
        assert_eq!(src.admit_frame(0), None);
        assert_eq!(src.admit_frame(7), None);
        assert!(!src.frame_waiting(7));
        assert_eq!(src.counts().frames, 3);
        assert_eq!(src.counts().frame_bytes, 210);
        drop(tx0);
        drop(tx1);
        assert!(!src.frame_waiting(0));
        assert!(!src.frame_waiting(1));
        assert!(!src.frames_open());
    }
}

#[cfg(test)]
mod journal_tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use ftvm_devices::{GuestClock, HostInputs};
    use ftvm_log::{EndReason, LogHeader, LogReader, LogWriter};

    use super::*;

    /// A log in memory: the writer appends to a shared buffer the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn sig(kind: u8, addr: u64, rip: u64) -> ExitSignature {
        ExitSignature { kind, addr, size: 1, data: 0, rip }
    }

    /// One scripted run: exits with signatures, a clock read, entropy, an output, END.
    fn script(src: &mut EventSource, rip_at_2: u64) -> (u64, Vec<u8>) {
        src.counted_exit();
        src.exit_signature(sig(exit_kind::IO_OUT, 0x3f8, 0x1000));
        src.output(ftvm_log::OUTPUT_CONSOLE, b"h");
        src.counted_exit();
        let t = src.now();
        src.exit_signature(sig(exit_kind::IO_IN, 0x40, 0x1010));
        src.counted_exit();
        let mut e = [0u8; 8];
        assert!(src.entropy(&mut e));
        src.exit_signature(sig(exit_kind::MMIO_WRITE, 0xd000_0050, rip_at_2));
        src.output(ftvm_log::OUTPUT_CONSOLE, b"i");
        (t, e.to_vec())
    }

    fn recorded() -> Vec<u8> {
        let buf = Shared::default();
        let writer = LogWriter::new(Box::new(buf.clone()) as Box<dyn Write + Send>, &LogHeader::default()).unwrap();
        let mut src = EventSource::record(0, writer);
        std::thread::sleep(std::time::Duration::from_millis(1));
        script(&mut src, 0x2000);
        src.end(EndReason::GuestPowerOff).unwrap();
        let bytes = buf.0.lock().unwrap().clone();
        bytes
    }

    fn replayer(bytes: Vec<u8>) -> EventSource {
        let (reader, _) =
            LogReader::open(Box::new(std::io::Cursor::new(bytes)) as Box<dyn std::io::Read + Send>).unwrap();
        EventSource::replay(0, reader)
    }

    #[test]
    fn timed_checkpoints_keep_the_gap_they_are_given_but_never_come_sooner_than_the_age() {
        let writer =
            LogWriter::new(Box::new(Shared::default()) as Box<dyn Write + Send>, &LogHeader::default()).unwrap();
        let mut src = EventSource::record(0, writer);
        let past_the_age = || std::thread::sleep(CHECKPOINT_MAX_AGE + Duration::from_millis(20));
        src.counted_exit();
        src.counted_exit();
        src.checkpoint(0);
        assert!(!src.checkpoint_due(), "one was just taken");
        // A cheap checkpoint: the next one after the age all the same.
        src.space_checkpoints(Duration::ZERO);
        past_the_age();
        src.counted_exit();
        assert!(src.checkpoint_due());
        src.checkpoint(0);
        // A costly one: the next timed one waits for the gap...
        src.space_checkpoints(Duration::from_secs(3600));
        past_the_age();
        src.counted_exit();
        assert!(!src.checkpoint_due());
        // ...but the one every CHECKPOINT_INTERVAL exits comes regardless.
        while src.exit_index() % CHECKPOINT_INTERVAL != 0 {
            src.counted_exit();
        }
        src.counted_exit();
        assert!(src.checkpoint_due());
    }

    #[test]
    fn a_replay_gets_the_recorded_inputs_and_agrees() {
        let mut src = replayer(recorded());
        let (t, entropy) = script(&mut src, 0x2000);
        assert!(t > 0, "the clock reading comes from the log");
        assert_eq!(entropy.len(), 8);
        src.end(EndReason::GuestPowerOff).unwrap();
        assert_eq!(src.replay_stop(), None);
    }

    #[test]
    fn a_different_exit_is_a_divergence_with_its_position() {
        let mut src = replayer(recorded());
        script(&mut src, 0x2222); // a different RIP at exit 2
        match src.replay_stop() {
            Some(ReplayStop::Diverged(d)) => {
                assert_eq!(d.exit, 2);
                assert!(d.expected.contains("rip=0x2000") && d.actual.contains("rip=0x2222"), "{d}");
                assert_eq!(d.last_agreement, Some(1));
            }
            other => panic!("expected a divergence, got {other:?}"),
        }
    }

    /// Three exits; the host's shutdown request is pending at exit `at` (`None`: never).
    fn shutdown_script(src: &mut EventSource, at: Option<u64>) -> Vec<bool> {
        (0..3u64)
            .map(|i| {
                src.counted_exit();
                src.exit_signature(sig(exit_kind::IO_OUT, 0x80, 0x1000 + i));
                src.admit_shutdown_request(at == Some(i))
            })
            .collect()
    }

    #[test]
    fn a_shutdown_request_is_logged_and_replayed_at_its_exit() {
        let buf = Shared::default();
        let writer = LogWriter::new(Box::new(buf.clone()) as Box<dyn Write + Send>, &LogHeader::default()).unwrap();
        let mut src = EventSource::record(0, writer);
        assert_eq!(shutdown_script(&mut src, Some(1)), [false, true, false]);
        src.end(EndReason::GuestPowerOff).unwrap();
        let bytes = buf.0.lock().unwrap().clone();
        let (mut reader, _) =
            LogReader::open(Box::new(std::io::Cursor::new(bytes.clone())) as Box<dyn std::io::Read + Send>).unwrap();
        let mut logged = vec![];
        while let Some((_, r)) = reader.next().unwrap() {
            logged.push(r);
        }
        assert!(logged.contains(&ftvm_log::Record::ShutdownRequest { exit: 1 }), "{logged:?}");
        // The replay delivers it where the log says, whatever its own host has pending.
        let mut src = replayer(bytes.clone());
        assert_eq!(shutdown_script(&mut src, Some(2)), [false, true, false]);
        src.end(EndReason::GuestPowerOff).unwrap();
        assert_eq!(src.replay_stop(), None);
        let mut src = replayer(bytes);
        assert_eq!(shutdown_script(&mut src, None), [false, true, false]);
        // Live: delivered when pending.
        let mut src = EventSource::live(0);
        assert_eq!(shutdown_script(&mut src, Some(0)), [true, false, false]);
    }

    #[test]
    fn a_cut_log_says_it_ends_early() {
        let bytes = recorded();
        let mut src = replayer(bytes[..bytes.len() - 30].to_vec());
        script(&mut src, 0x2000);
        src.end(EndReason::GuestPowerOff).unwrap();
        assert!(matches!(src.replay_stop(), Some(ReplayStop::LogEndsEarly { .. })), "{:?}", src.replay_stop());
    }
}
