//! The vCPU loop: run the guest, dispatch each exit to the device buses, admit host inputs
//! through the event source, inject interrupts, repeat until the guest stops.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::sync::Arc;

use ftvm_devices::{DeviceContext, IrqLines, VmRequest};
use ftvm_events::{exit_kind, EventSource, ExitSignature, FrameStream, Mode, ReplayStop};
use ftvm_events::{OutputGate, OutputTarget};
use ftvm_log::EndReason;
use ftvm_virtio::net::FrameSink;
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use vmm_sys_util::errno;

pub mod hooks;
pub mod syncpoint;

pub use hooks::{GoLive, LoopFigures, Supervisor, TakeoverReport};

use crate::error::{Error, Result};
use crate::kick::{DeadlineTimer, Doorbell, Kicker};
use crate::legacy::Devices;
use crate::msr;

vmm_sys_util::ioctl_iow_nr!(KVM_INTERRUPT, kvm_bindings::KVMIO, 0x86, kvm_bindings::kvm_interrupt);

/// The longest buffered log bytes wait before they are pushed out (record mode).
const LOG_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2);

/// Why the VM stopped.
#[derive(Debug, Clone)]
pub enum VmOutcome {
    /// The guest powered off (power port).
    PowerOff,
    /// The guest asked for a reset (i8042); ftvm stops rather than reboots.
    Reset,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault(Box<RegisterDump>),
    /// The guest halted with interrupts disabled, or with nothing left that could wake it.
    HaltedForever(Box<RegisterDump>),
    /// KVM could not run the guest (emulation failure, entry failure).
    KvmFailure { what: String, dump: Box<RegisterDump> },
    /// The operator stopped the VM (SIGINT or SIGTERM).
    OperatorStop,
    /// A primary handed the VM over to its backup (`ftvm ctl switchover`).
    Switchover,
    /// Recording stopped: the log reached its size limit or could not be written.
    RecordingStopped(String),
    /// Replay reached the point where the recording was stopped from outside (operator stop,
    /// size limit), with everything up to there replayed exactly.
    ReplayReachedEnd(EndReason),
    /// Replay stopped short: a divergence, or the log ends early.
    ReplayStopped(ReplayStop),
}

impl VmOutcome {
    /// The process exit status for this outcome ([`ftvm_exit::ExitStatus`], documented in
    /// docs/operations.md). An operator's stop is SIGINT's here; the CLI, which knows the
    /// signal, uses [`ftvm_exit::ExitStatus::for_signal`].
    pub fn exit_status(&self) -> ftvm_exit::ExitStatus {
        use ftvm_exit::ExitStatus as S;
        match self {
            VmOutcome::PowerOff => S::Success,
            VmOutcome::Reset => S::GuestReset,
            VmOutcome::TripleFault(_) => S::TripleFault,
            VmOutcome::HaltedForever(_) => S::HaltedForever,
            VmOutcome::KvmFailure { .. } => S::KvmFailure,
            VmOutcome::RecordingStopped(_) => S::RecordingStopped,
            VmOutcome::ReplayStopped(ReplayStop::Diverged(_)) => S::Diverged,
            VmOutcome::ReplayStopped(ReplayStop::LogEndsEarly { .. }) => S::LogEndsEarly,
            VmOutcome::ReplayStopped(ReplayStop::LogCorrupt { .. }) => S::LogDamaged,
            VmOutcome::ReplayReachedEnd(_) => S::Success,
            VmOutcome::OperatorStop => S::Interrupted,
            VmOutcome::Switchover => S::Switchover,
        }
    }

    /// [`VmOutcome::exit_status`]'s code.
    pub fn exit_code(&self) -> i32 {
        i32::from(self.exit_status().code())
    }

    /// What the END record says about this outcome.
    pub fn end_reason(&self) -> EndReason {
        match self {
            VmOutcome::PowerOff => EndReason::GuestPowerOff,
            VmOutcome::Reset => EndReason::GuestReset,
            VmOutcome::TripleFault(_) => EndReason::TripleFault,
            VmOutcome::OperatorStop | VmOutcome::Switchover => EndReason::OperatorStop,
            VmOutcome::RecordingStopped(_) => EndReason::SizeLimit,
            VmOutcome::ReplayReachedEnd(r) => r.clone(),
            VmOutcome::HaltedForever(_) => EndReason::Error("guest halted for good".into()),
            VmOutcome::KvmFailure { what, .. } => EndReason::Error(what.clone()),
            VmOutcome::ReplayStopped(_) => EndReason::Error("replay stopped".into()),
        }
    }
}

impl fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmOutcome::PowerOff => write!(f, "guest powered off"),
            VmOutcome::Reset => write!(f, "guest requested a reset (i8042); the VM was stopped"),
            VmOutcome::TripleFault(d) => write!(f, "guest triple fault (CPU shutdown)\n{d}"),
            VmOutcome::HaltedForever(d) => write!(
                f,
                "guest halted with nothing that could wake it (interrupts disabled or no timer and no input)\n{d}"
            ),
            VmOutcome::KvmFailure { what, dump } => write!(f, "KVM could not run the guest: {what}\n{dump}"),
            VmOutcome::OperatorStop => write!(f, "stopped by the operator"),
            VmOutcome::Switchover => write!(f, "handed over to the backup"),
            VmOutcome::RecordingStopped(why) => write!(f, "the recording stopped: {why}"),
            VmOutcome::ReplayReachedEnd(r) => write!(f, "replay reached the end of the recording ({r})"),
            VmOutcome::ReplayStopped(ReplayStop::Diverged(d)) => write!(f, "{d}"),
            VmOutcome::ReplayStopped(ReplayStop::LogEndsEarly { exit, detail }) => {
                write!(f, "the log ends early: {detail}; replayed exactly up to exit {exit}")
            }
            VmOutcome::ReplayStopped(ReplayStop::LogCorrupt { exit, detail }) => {
                write!(f, "{detail}; replayed exactly up to exit {exit}")
            }
        }
    }
}

/// The vCPU's registers at the moment something went wrong.
#[derive(Debug, Clone, Default)]
pub struct RegisterDump {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

impl RegisterDump {
    fn capture(vcpu: &VcpuFd) -> Box<Self> {
        Box::new(RegisterDump {
            regs: vcpu.get_regs().unwrap_or_default(),
            sregs: vcpu.get_sregs().unwrap_or_default(),
        })
    }
}

impl fmt::Display for RegisterDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.regs;
        let s = &self.sregs;
        writeln!(f, "  rip={:#018x} rsp={:#018x} rflags={:#010x} cpl={}", r.rip, r.rsp, r.rflags, s.cs.selector & 3)?;
        writeln!(f, "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}", r.rax, r.rbx, r.rcx, r.rdx)?;
        writeln!(f, "  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}", r.rsi, r.rdi, r.rbp, r.r8)?;
        writeln!(
            f,
            "  cr0={:#018x} cr2={:#018x} cr3={:#018x} cr4={:#018x} efer={:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        )?;
        write!(
            f,
            "  cs={:#06x} ss={:#06x} gdt={:#x}/{:#x} idt={:#x}/{:#x}",
            s.cs.selector, s.ss.selector, s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit
        )
    }
}

/// Counts of what the loop did, for status and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ExitStats {
    pub io: u64,
    pub mmio: u64,
    pub hlt: u64,
    pub msr: u64,
    pub interrupts: u64,
    pub kicks: u64,
    pub window_exits: u64,
    /// Recording: the sync points taken (replay: applied).
    pub sync: crate::vcpu::syncpoint::SyncStats,
}

/// What ends up on the console: the bytes the guest's UART transmitted.
pub type ConsoleSink = Box<dyn Write + Send>;

/// The share of the guest's time a recording's timed checkpoints may cost it. Their page
/// hashes read the dirty log, and each page it hands out faults into KVM at the guest's next
/// write: measured here on PVM, the real Redis under redis-benchmark (50 clients) dirtied
/// ~685 pages between checkpoints 100 ms apart, and its p99 latency under record was twice
/// what it was with checkpoints 1 s apart. A guest that dirties little keeps a checkpoint
/// every 100 ms (a backup finds a divergence that soon); one that dirties much gets them
/// further apart, and those every `CHECKPOINT_INTERVAL` exits come regardless.
const CHECKPOINT_BUDGET: f64 = 0.02;

/// At most this many received frames are admitted per network device after one exit, so a
/// flood of frames the guest cannot take (all too big for its buffers) cannot hold the vCPU.
const MAX_FRAMES_PER_EXIT: usize = 64;

/// The host side of one network device as the vCPU loop sees it: where its transmitted
/// frames go, and the event-source stream its received frames arrive on.
pub struct NetPort {
    pub sink: Box<dyn FrameSink>,
    pub stream: FrameStream,
    /// Transmitted frames the sink refused (TAP full or down).
    pub sink_drops: u64,
    warned: bool,
}

/// Work for the vCPU thread, done between two exits (a snapshot's paused round, ...).
pub type VcpuTask = Box<dyn FnOnce(&mut VcpuLoop) + Send>;

/// Tasks waiting for the vCPU thread; submitting wakes it (kick and doorbell). Once the loop
/// has ended, tasks are dropped unrun, so a submitter waiting on one learns it at once.
#[derive(Clone, Default)]
pub struct VcpuTasks {
    inner: Arc<TasksInner>,
}

#[derive(Default)]
struct TasksInner {
    queue: std::sync::Mutex<Option<Vec<VcpuTask>>>,
    pending: std::sync::atomic::AtomicBool,
    waker: std::sync::Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

impl VcpuTasks {
    fn queue(&self) -> std::sync::MutexGuard<'_, Option<Vec<VcpuTask>>> {
        ftvm_sync::lock(&self.inner.queue)
    }

    /// Queues `task` for the vCPU thread and wakes it.
    pub fn submit(&self, task: VcpuTask) {
        {
            let mut q = self.queue();
            let Some(q) = q.as_mut() else { return }; // the loop has ended: dropped
            q.push(task);
            self.inner.pending.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if let Some(wake) = ftvm_sync::lock(&self.inner.waker).as_ref() {
            wake();
        }
    }

    /// Whether a task waits (one relaxed load: tested between exits).
    fn pending(&self) -> bool {
        self.inner.pending.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The loop starts taking tasks; `waker` gets it out of KVM_RUN or a halt.
    fn open(&self, waker: Box<dyn Fn() + Send + Sync>) {
        *self.queue() = Some(Vec::new());
        *ftvm_sync::lock(&self.inner.waker) = Some(waker);
    }

    /// The loop has ended: waiting tasks and later ones are dropped.
    fn close(&self) {
        *self.queue() = None;
        self.inner.pending.store(false, std::sync::atomic::Ordering::SeqCst);
        *ftvm_sync::lock(&self.inner.waker) = None;
    }

    fn take(&self) -> Vec<VcpuTask> {
        let mut q = self.queue();
        self.inner.pending.store(false, std::sync::atomic::Ordering::SeqCst);
        q.as_mut().map(std::mem::take).unwrap_or_default()
    }
}

/// Everything the vCPU thread owns while the guest runs.
pub struct VcpuLoop {
    vcpu: VcpuFd,
    devices: Devices,
    events: EventSource,
    console: ConsoleSink,
    kicker: Arc<Kicker>,
    doorbell: Arc<Doorbell>,
    stats: ExitStats,
    /// Network devices' host sides, in the order of `devices.virtio.nets`.
    nets: Vec<NetPort>,
    /// The fault-tolerant pair's output rule (primary: hold until acknowledged; backup:
    /// hold for a failover); `None` performs outputs at once.
    gate: Option<Box<dyn OutputGate>>,
    /// A backup's preparations for going live.
    takeover: Option<Box<dyn GoLive>>,
    tap_readers: Vec<ftvm_virtio::tap::TapReader>,
    /// The one reader of dirtied pages (page hashes, sync points, snapshots).
    tracker: Option<crate::dirty::DirtyTracker>,
    /// Record: the tracker's consumer for page hashes at checkpoints.
    hash_consumer: Option<crate::dirty::Consumer>,
    /// What a page the dirty log hands out costs the guest in write faults afterwards.
    refault: std::time::Duration,
    timer: Option<DeadlineTimer>,
    /// When buffered log bytes were last pushed out (record mode).
    last_log_flush: std::time::Instant,
    /// The control API (`--api-socket`): figures published between exits, pause requests.
    control: Option<Arc<dyn Supervisor>>,
    /// The most recent output (for the control API: outputs held, replication lag).
    last_output: Option<ftvm_events::OutputTicket>,
    /// Work other threads hand to the vCPU thread.
    tasks: VcpuTasks,
    /// Record: sync points for exit-free stretches (`None`: off, or not recording).
    sync: Option<crate::vcpu::syncpoint::SyncRecorder>,
    /// Replay: the sync points applied since the last counted exit.
    sync_replay: crate::vcpu::syncpoint::SyncReplayer,
    /// The MSRs a saved vCPU state holds.
    msr_indices: Vec<u32>,
    /// A backup that went live: its TAPs (a re-protection performs outputs through them).
    live_taps: Vec<ftvm_virtio::tap::Tap>,
    /// A new recording started at this control point (a state transfer's cut): a halted
    /// guest resumes as the restored backup's does, without waiting for a wake-up.
    recording_restarted: bool,
    /// Counted exits before the last new recording (the events count from 0 after it).
    exits_before: u64,
    /// Outputs were logged and the log not pushed out since.
    outputs_unflushed: bool,
    irqs: IrqLines,
    requests: Vec<VmRequest>,
    warned_ports: BTreeSet<u64>,
}

enum Step {
    Continue,
    Halted,
    Stop(VmOutcome),
}

/// What a session hands the loop besides the machine: the parts that differ between run,
/// record, replay, primary and backup. The loop owns them from then on; sessions change
/// them only through the loop's methods (a new gate, a live net, ...).
#[derive(Default)]
pub struct SessionParts {
    /// The fault-tolerant pair's output rule; `None` performs outputs at once.
    pub gate: Option<Box<dyn OutputGate>>,
    /// A backup's preparations for going live.
    pub takeover: Option<Box<dyn GoLive>>,
    /// The one reader of dirtied pages (page hashes, sync points, snapshots).
    pub tracker: Option<crate::dirty::DirtyTracker>,
    /// Record: the tracker's consumer for page hashes at checkpoints.
    pub hash_consumer: Option<crate::dirty::Consumer>,
    /// The control API: figures published between exits, pause requests.
    pub control: Option<Arc<dyn Supervisor>>,
    /// Work other threads hand to the vCPU thread.
    pub tasks: VcpuTasks,
    /// Record: how sync points deliver events in exit-free stretches (`None`: never).
    pub sync: Option<syncpoint::SyncPolicy>,
}

impl VcpuLoop {
    /// The loop over a vCPU, its devices and event source; `msr_indices` are the MSRs a
    /// saved vCPU state holds.
    #[allow(clippy::too_many_arguments)] // the machine's parts, each owned by the loop
    pub fn new(
        vcpu: VcpuFd,
        devices: Devices,
        events: EventSource,
        console: ConsoleSink,
        kicker: Arc<Kicker>,
        doorbell: Arc<Doorbell>,
        msr_indices: Vec<u32>,
        session: SessionParts,
    ) -> Result<Self> {
        let SessionParts { gate, takeover, tracker, hash_consumer, control, tasks, sync } = session;
        if takeover.is_some() {
            // A backup: its disks need be durable only once it is live (`go_live` settles them).
            for dev in &devices.virtio.disks {
                dev.borrow_mut().device_mut().backend_mut().defer_flushes();
            }
        }
        let sync = match (events.mode(), sync, &tracker) {
            (Mode::Record, Some(policy), Some(tracker)) => {
                Some(syncpoint::SyncRecorder::start(policy, kicker.clone(), tracker.clone())?)
            }
            _ => None,
        };
        Ok(VcpuLoop {
            vcpu,
            devices,
            events,
            console,
            kicker,
            doorbell,
            stats: ExitStats::default(),
            nets: Vec::new(),
            gate,
            takeover,
            tap_readers: Vec::new(),
            tracker,
            hash_consumer,
            refault: crate::dirty::refault_cost(crate::kvm::detect_backend()),
            timer: None,
            last_log_flush: std::time::Instant::now(),
            control,
            last_output: None,
            tasks,
            sync,
            sync_replay: Default::default(),
            msr_indices,
            live_taps: Vec::new(),
            recording_restarted: false,
            exits_before: 0,
            outputs_unflushed: false,
            irqs: IrqLines::default(),
            requests: Vec::new(),
            warned_ports: BTreeSet::new(),
        })
    }

    /// What the loop leaves when the guest stopped: its figures, the counted exits of the
    /// whole run (across new recordings), and the vCPU.
    pub fn finish(self) -> (ExitStats, u64, VcpuFd) {
        let exits = self.exits_before + self.events.exit_index();
        (self.stats, exits, self.vcpu)
    }

    /// Whether interrupts are delivered promptly (a live VM: the deadline timer kicks the
    /// vCPU, interrupt windows are asked for) rather than only at counted exits (the
    /// deterministic delivery of record and replay). The timer runs exactly while it is so.
    fn prompt_delivery(&self) -> bool {
        self.timer.is_some()
    }

    /// Prompt delivery on (a deadline timer) or off; host input kicks the vCPU only while on.
    fn set_timer(&mut self, timer: Option<DeadlineTimer>) {
        self.kicker.set_input_kicks(timer.is_some());
        self.timer = timer;
    }

    /// Kicks the vCPU out of KVM_RUN (a spurious kick is harmless).
    pub fn kick(&self) {
        self.kicker.kick();
    }

    /// A backup going live: the `i`-th network device's frames now come from its TAP's
    /// reader (`frames`) and go to `tap`.
    pub fn attach_live_net(
        &mut self,
        i: usize,
        tap: ftvm_virtio::tap::Tap,
        reader: ftvm_virtio::tap::TapReader,
        frames: std::sync::mpsc::Receiver<Vec<u8>>,
    ) {
        self.tap_readers.push(reader);
        self.live_taps.push(tap.clone());
        if let Some(port) = self.nets.get_mut(i) {
            self.events.replace_frames(port.stream, frames);
            port.sink = Box::new(tap);
        }
    }

    /// What wakes the loop from another thread: rings its doorbell and kicks the vCPU.
    pub fn waker(&self) -> Box<dyn Fn() + Send + Sync> {
        crate::kick::waker(&self.kicker, &self.doorbell)
    }

    /// What a TAP's reader wakes the loop with: see [`crate::kick::FrameWake`].
    pub fn frame_waker(&self) -> Box<dyn ftvm_virtio::tap::FrameWaker> {
        crate::kick::frame_waker(&self.kicker, &self.doorbell)
    }

    /// Performs what the current output gate still holds (it is about to be replaced).
    pub fn drain_gate(&mut self) {
        if let Some(g) = self.gate.as_mut() {
            g.drain();
        }
    }

    /// A new output rule from here on (a state transfer's cut).
    pub fn set_gate(&mut self, gate: Box<dyn OutputGate>) {
        self.gate = Some(gate);
    }

    /// Hands the console and the TAPs of a backup that went live to whoever performs the
    /// outputs from now on (a re-protection's link); the loop's console writes nowhere.
    pub fn take_output_sinks(&mut self) -> (ConsoleSink, Vec<ftvm_virtio::tap::Tap>) {
        let console = std::mem::replace(&mut self.console, Box::new(std::io::sink()));
        (console, self.live_taps.clone())
    }

    /// Connects the host side of the next network device (in device order): transmitted
    /// frames go to `sink`, received frames are admitted from `stream`.
    pub fn attach_net(&mut self, sink: Box<dyn FrameSink>, stream: FrameStream) {
        self.nets.push(NetPort { sink, stream, sink_drops: 0, warned: false });
    }

    /// Runs the guest until it stops. Must be called on the thread that will own the vCPU.
    pub fn run(&mut self) -> Result<VmOutcome> {
        let immediate_exit: *mut u8 = &mut self.vcpu.get_kvm_run().immediate_exit;
        self.kicker.attach(immediate_exit);
        self.tasks.open(self.waker());
        // How interrupts reach a guest that runs without exiting follows the event source's
        // mode: live, the deadline timer kicks the vCPU and interrupt windows are asked for
        // (prompt delivery); recording and replaying, only at counted exits.
        let timer = match self.events.mode() {
            Mode::Live => Some(DeadlineTimer::start(self.kicker.clone())?),
            Mode::Record | Mode::Replay => None,
        };
        self.set_timer(timer);
        if self.events.wants_signatures() {
            // Exit signatures need RIP at every counted exit: take it from kvm_run rather
            // than with a KVM_GET_REGS per exit.
            self.vcpu.set_sync_valid_reg(SyncReg::Register);
        }
        let mut outcome = self.run_loop();
        if let Ok(VmOutcome::Switchover) = &outcome {
            // No END: the backup carries on from the last exit logged here.
            self.flush_console();
            self.events.flush_log();
            if let Some(g) = &mut self.gate {
                g.handover();
            }
        } else if let Ok(o) = &outcome {
            self.flush_console();
            if let Some(g) = &mut self.gate {
                g.finish();
            }
            // The guest ended the run itself (the same exit in record and replay): a last
            // checkpoint of registers and dirtied pages, so even a short run checks its memory.
            if matches!(o, VmOutcome::PowerOff | VmOutcome::Reset | VmOutcome::TripleFault(_))
                && self.events.wants_signatures()
                && self.events.mode() != Mode::Live
                && !self.events.checkpoint_taken_here()
            {
                let regs = self.vcpu.sync_regs().regs;
                self.events.checkpoint(regs_digest(&regs));
                match self.take_page_hashes() {
                    Ok(Some(pages)) => self.events.page_hashes(pages),
                    Ok(None) => {}
                    Err(e) => tracing::error!("final page hashes: {e}"),
                }
            }
            if let Err(e) = self.events.end(o.end_reason()) {
                tracing::error!("cannot complete the log: {e}");
            }
            // Replay: the END check itself may find a disagreement.
            if let (Some(stop), false) = (self.events.replay_stop(), matches!(o, VmOutcome::ReplayStopped(_))) {
                outcome = Ok(VmOutcome::ReplayStopped(stop.clone()));
            }
        }
        self.tasks.close();
        if let Some(sync) = self.sync.take() {
            self.stats.sync = sync.stats;
        }
        self.kicker.detach();
        self.stats.kicks = self.kicker.kicks();
        let _ = self.console.flush();
        self.log_device_stats();
        outcome
    }

    fn log_device_stats(&self) {
        for (dev, port) in self.devices.virtio.nets.iter().zip(&self.nets) {
            let dev = dev.borrow();
            let s = dev.device().stats();
            tracing::info!(
                "{}: tx {} frames {} bytes ({} dropped, {} refused by the TAP), rx {} frames {} bytes ({} dropped)",
                ftvm_virtio::VirtioDevice::name(dev.device()),
                s.tx_frames,
                s.tx_bytes,
                s.tx_dropped,
                port.sink_drops,
                s.rx_frames,
                s.rx_bytes,
                s.rx_dropped
            );
        }
        for dev in &self.devices.virtio.disks {
            let dev = dev.borrow();
            let s = dev.device().stats();
            tracing::info!(
                "{}: {} reads ({} bytes), {} writes ({} bytes), {} flushes, {} errors, {} dropped",
                ftvm_virtio::VirtioDevice::name(dev.device()),
                s.reads,
                s.bytes_read,
                s.writes,
                s.bytes_written,
                s.flushes,
                s.errors,
                s.dropped
            );
        }
    }

    fn run_loop(&mut self) -> Result<VmOutcome> {
        // Timers are armed after every exit; a restored guest may be computing in ring 3 and
        // not exit for a long time, so arm them before the first entry too.
        self.arm_timer();
        self.arm_sync(false)?;
        loop {
            if let Some(outcome) = self.control_point() {
                return Ok(outcome);
            }
            // Not halted: the guest runs on from here anyway.
            self.recording_restarted = false;
            // Replay: where the recording took a sync point, its state replaces the stretch.
            if self.events.mode() == Mode::Replay {
                let applied = self.apply_sync_point()?;
                if let Some(outcome) = self.journal_stop() {
                    return Ok(outcome);
                }
                if applied {
                    if let Some(outcome) = self.deliver_between_exits()? {
                        return Ok(outcome);
                    }
                    continue;
                }
            }
            if self.live_now() {
                // A backup's stream ended here, between two exits (after a sync point): live
                // before the guest runs on, so that its timer kicks a guest that would not
                // exit (a ring-3 spin) and its interrupts come.
                self.go_live()?;
                self.arm_timer();
                self.inject_or_request_window();
            }
            let index = self.events.exit_index();
            let step = self.run_once()?;
            let counted = self.events.exit_index() != index;
            if !counted && !self.prompt_delivery() {
                // A kick (EINTR) in the deterministic mode: its position in the guest is
                // host-timed, so nothing may be admitted or injected here, unless an event
                // has waited past the bound: then a sync point marks this place in the log.
                // A stop request is honoured (at the last counted exit).
                if crate::kick::stop_requested() {
                    return Ok(VmOutcome::OperatorStop);
                }
                if self.sync_due() {
                    self.take_sync_point()?;
                    if let Some(outcome) = self.deliver_between_exits()? {
                        return Ok(outcome);
                    }
                }
                continue;
            }
            // Asynchronous inputs are admitted at counted exits; a plain run also takes them
            // at kicks (that is what the kick was for).
            self.after_exit(counted || self.prompt_delivery());
            if let Some(outcome) = self.take_request() {
                return Ok(outcome);
            }
            if let Some(outcome) = self.journal_stop() {
                return Ok(outcome);
            }
            match step {
                Step::Stop(outcome) => return Ok(outcome),
                Step::Continue => {
                    self.inject_or_request_window();
                }
                Step::Halted => {
                    if let Some(outcome) = self.wait_while_halted()? {
                        return Ok(outcome);
                    }
                }
            }
            // A backup cannot leave exit N until it knows N has no more events: push the log
            // out at least every few milliseconds, not only at outputs.
            if self.events.mode() == Mode::Record && self.last_log_flush.elapsed() >= LOG_FLUSH_INTERVAL {
                self.events.flush_log();
                self.last_log_flush = std::time::Instant::now();
            }
            if self.live_now() {
                self.go_live()?;
            }
            self.arm_timer();
            if counted {
                self.sync_replay_exit();
                self.arm_sync(true)?;
            }
        }
    }

    /// Prompt delivery: the deadline timer kicks the vCPU when the next device deadline passes.
    fn arm_timer(&self) {
        if let Some(timer) = &self.timer {
            timer.arm(self.devices.next_deadline().map(|d| self.events.host_instant_of(d)));
        }
    }

    /// At a sync point (taken or applied): the work of an exit, positioned at the last
    /// counted exit after the sync point: timers, input, injection.
    fn deliver_between_exits(&mut self) -> Result<Option<VmOutcome>> {
        self.after_exit(true);
        if let Some(outcome) = self.take_request() {
            return Ok(Some(outcome));
        }
        if let Some(outcome) = self.journal_stop() {
            return Ok(Some(outcome));
        }
        self.inject_or_request_window();
        self.arm_sync(false)?;
        Ok(None)
    }

    /// One KVM_RUN and the dispatch of its exit.
    fn run_once(&mut self) -> Result<Step> {
        // A device context over the loop's fields; the exit data borrows the vCPU alongside.
        macro_rules! ctx {
            () => {
                DeviceContext { inputs: &mut self.events, irqs: &mut self.irqs, requests: &mut self.requests }
            };
        }
        // The signature of a counted exit (kind, address, size, data); RIP is added after.
        let mut sig: Option<ExitSignature> = None;
        let step = match self.vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.events.counted_exit();
                self.stats.io += 1;
                sig = Some(partial_sig(exit_kind::IO_OUT, port.into(), data));
                if self.devices.pio.write(&mut ctx!(), port, data).is_err() {
                    warn_once(&mut self.warned_ports, port.into(), "write to unmapped port", data.len());
                }
                Step::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.events.counted_exit();
                self.stats.io += 1;
                if self.devices.pio.read(&mut ctx!(), port, data).is_err() {
                    data.fill(0xff);
                    warn_once(&mut self.warned_ports, port.into(), "read from unmapped port", data.len());
                }
                sig = Some(partial_sig(exit_kind::IO_IN, port.into(), data));
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.events.counted_exit();
                self.stats.mmio += 1;
                sig = Some(partial_sig(exit_kind::MMIO_WRITE, addr, data));
                if self.devices.mmio.write(&mut ctx!(), addr, data).is_err() {
                    warn_once(&mut self.warned_ports, addr, "write to unmapped MMIO address", data.len());
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.events.counted_exit();
                self.stats.mmio += 1;
                if self.devices.mmio.read(&mut ctx!(), addr, data).is_err() {
                    data.fill(0xff);
                    warn_once(&mut self.warned_ports, addr, "read from unmapped MMIO address", data.len());
                }
                sig = Some(partial_sig(exit_kind::MMIO_READ, addr, data));
                Step::Continue
            }
            Ok(VcpuExit::X86Rdmsr(exit)) => {
                self.events.counted_exit();
                self.stats.msr += 1;
                let clock = &mut self.events;
                match msr::read(exit.index, || ftvm_devices::GuestClock::now(clock)) {
                    Ok(value) => *exit.data = value,
                    Err(msr::Refused) => *exit.error = 1,
                }
                let data = if *exit.error == 0 { *exit.data } else { u64::MAX };
                sig = Some(ExitSignature { kind: exit_kind::RDMSR, addr: exit.index.into(), size: 8, data, rip: 0 });
                Step::Continue
            }
            Ok(VcpuExit::X86Wrmsr(exit)) => {
                self.events.counted_exit();
                self.stats.msr += 1;
                if msr::write(exit.index, exit.data).is_err() {
                    tracing::debug!("guest write to refused MSR {:#x}: #GP", exit.index);
                    *exit.error = 1;
                }
                sig = Some(ExitSignature {
                    kind: exit_kind::WRMSR,
                    addr: exit.index.into(),
                    size: 8,
                    data: exit.data,
                    rip: 0,
                });
                Step::Continue
            }
            Ok(VcpuExit::Hlt) => {
                self.events.counted_exit();
                self.stats.hlt += 1;
                sig = Some(ExitSignature { kind: exit_kind::HLT, ..Default::default() });
                Step::Halted
            }
            Ok(VcpuExit::Shutdown) => {
                self.events.counted_exit();
                sig = Some(ExitSignature { kind: exit_kind::SHUTDOWN, ..Default::default() });
                Step::Stop(VmOutcome::TripleFault(RegisterDump::capture(&self.vcpu)))
            }
            Ok(VcpuExit::IrqWindowOpen) => {
                self.stats.window_exits += 1;
                Step::Continue
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: for KVM_EXIT_INTERNAL_ERROR the `internal` member of the union is the
                // one KVM filled in.
                let internal = unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                let what = format!(
                    "KVM_EXIT_INTERNAL_ERROR suberror {} (1 = emulation failure) data {:x?}",
                    internal.suberror,
                    &internal.data[..n]
                );
                Step::Stop(VmOutcome::KvmFailure { what, dump: RegisterDump::capture(&self.vcpu) })
            }
            Ok(VcpuExit::FailEntry(reason, _cpu)) => {
                let what = format!("KVM_EXIT_FAIL_ENTRY, hardware entry failure reason {reason:#x}");
                Step::Stop(VmOutcome::KvmFailure { what, dump: RegisterDump::capture(&self.vcpu) })
            }
            Ok(other) => {
                let what = format!("unexpected exit {other:?}");
                Step::Stop(VmOutcome::KvmFailure { what, dump: RegisterDump::capture(&self.vcpu) })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: not a counted exit, carries no events.
                self.vcpu.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => return Err(Error::Kvm { call: "KVM_RUN", source: e }),
        };
        if let (Some(mut sig), true) = (sig, self.events.wants_signatures()) {
            let regs = self.vcpu.sync_regs().regs;
            sig.rip = regs.rip;
            self.events.exit_signature(sig);
            if self.events.checkpoint_due() {
                // Only a recording spaces its checkpoints by their cost (a replay takes them
                // where the log has them), so only it reads the clock.
                let recording = self.events.mode() == Mode::Record;
                let started = recording.then(syncpoint::thread_cpu_time);
                self.events.checkpoint(regs_digest(&regs));
                if let Some(pages) = self.take_page_hashes()? {
                    let count = u32::try_from(pages.len()).unwrap_or(u32::MAX);
                    self.events.page_hashes(pages);
                    if let Some(started) = started {
                        // The hashes' cost to the guest: this work, and a write fault on each
                        // page the dirty log handed out (write-protected again).
                        let cost = syncpoint::thread_cpu_time().saturating_sub(started) + self.refault * count;
                        self.events.space_checkpoints(cost.mul_f64((1.0 - CHECKPOINT_BUDGET) / CHECKPOINT_BUDGET));
                    }
                }
            }
        }
        Ok(step)
    }

    /// (frame, hash) of the pages dirtied since the previous checkpoint (record and replay).
    /// Record: the pages the tracker saw written. Replay: the pages the log names, hashed
    /// from this VM's memory (their contents must agree).
    fn take_page_hashes(&mut self) -> Result<Option<Vec<(u64, u64)>>> {
        let Some(tracker) = &self.tracker else { return Ok(None) };
        let mem = tracker.memory();
        let pages = match (self.events.mode(), self.hash_consumer) {
            (Mode::Replay, _) => {
                let mut set = crate::dirty::PageSet::none(&mem);
                for gfn in self.events.replay_page_list().unwrap_or_default() {
                    set.insert(gfn * crate::memory::PAGE_SIZE);
                }
                set
            }
            (_, Some(consumer)) => tracker.take(consumer)?,
            (_, None) => return Ok(None),
        };
        Ok(Some(crate::dirty::page_hashes(&mem, &pages)))
    }

    /// Replay and recording stop conditions, checked after every exit.
    fn journal_stop(&mut self) -> Option<VmOutcome> {
        if crate::kick::stop_requested() {
            return Some(VmOutcome::OperatorStop);
        }
        match self.events.mode() {
            Mode::Live => None,
            Mode::Record => self.events.record_problem().map(VmOutcome::RecordingStopped),
            Mode::Replay => {
                if let Some(stop) = self.events.replay_stop() {
                    return Some(VmOutcome::ReplayStopped(stop.clone()));
                }
                // The recording was stopped from outside at this exit: so does the replay.
                match self.events.replay_end_here() {
                    Some(reason @ (EndReason::OperatorStop | EndReason::SizeLimit | EndReason::Error(_))) => {
                        Some(VmOutcome::ReplayReachedEnd(reason))
                    }
                    _ => None,
                }
            }
        }
    }

    /// Work done after every return from KVM_RUN: interrupts from the access, console and
    /// network output, timers that came due and, if `admit_async`, host input (console bytes,
    /// received frames), all admitted through the event source.
    fn after_exit(&mut self, admit_async: bool) {
        self.devices.apply_irqs(&mut self.irqs);
        self.flush_console();
        self.flush_net_tx();
        if std::mem::take(&mut self.outputs_unflushed) {
            // The backup must have the log up to the outputs before it can acknowledge them:
            // push it out now, once for all the outputs of this exit.
            self.events.flush_log();
            self.last_log_flush = std::time::Instant::now();
        }
        if let Some(now) = self.events.admit_deadline(self.devices.next_deadline()) {
            self.devices.on_time(now, &mut self.irqs);
        }
        if admit_async {
            // Before looking: what arrives after this is noticed and waits again.
            self.kicker.input_taken();
            let room = self.devices.uart.borrow().receive_capacity();
            if room > 0 {
                let input = self.events.admit_console_input(room);
                if !input.is_empty() {
                    self.devices.uart.borrow_mut().receive(&input, &mut self.irqs);
                }
            }
            self.admit_frames();
            // An operator's shutdown request (docs/operations.md#stopping): the keyboard types
            // Ctrl+Alt+Del, at this exit in the log.
            if self.events.admit_shutdown_request(crate::kick::shutdown_pending()) {
                crate::kick::shutdown_delivered();
                self.devices.i8042.borrow_mut().press_ctrl_alt_del(&mut self.irqs);
                tracing::info!("the shutdown request reached the guest (Ctrl+Alt+Del on its i8042)");
            }
        }
        self.devices.apply_irqs(&mut self.irqs);
    }

    /// Sends the frames the guest transmitted during the exit. The guest already has its
    /// descriptors back; a sink that cannot take a frame (TAP full or down) drops it.
    fn flush_net_tx(&mut self) {
        for (index, (dev, port)) in self.devices.virtio.nets.iter().zip(&mut self.nets).enumerate() {
            if !dev.borrow().device().has_tx_frames() {
                continue;
            }
            let frames = dev.borrow_mut().device_mut().take_tx_frames();
            let mut now = Vec::with_capacity(frames.len());
            for frame in frames {
                if let Some(g) = &mut self.gate {
                    g.before_output();
                }
                let ticket = self.events.output(ftvm_log::OUTPUT_NET, &frame);
                self.outputs_unflushed = true;
                self.last_output = Some(ticket);
                match &mut self.gate {
                    Some(g) => now.extend(g.submit(ticket, OutputTarget::Net(index), frame)),
                    None => now.push(frame),
                }
            }
            // What may go out now goes in one go: the sink may join a run of TCP segments.
            let (failed, error) = port.sink.send_all(&now);
            port.sink_drops += failed;
            if let Some(e) = error {
                if !std::mem::replace(&mut port.warned, true) {
                    tracing::warn!("network output failed: {e}; frames are dropped while it lasts");
                }
            }
        }
    }

    /// Admits received frames, each only when its device has a receive buffer for it, and
    /// delivers them (guest memory, used ring, interrupt).
    fn admit_frames(&mut self) {
        for (dev, port) in self.devices.virtio.nets.iter().zip(&self.nets) {
            for _ in 0..MAX_FRAMES_PER_EXIT {
                if !self.events.frame_waiting(port.stream) || !dev.borrow().rx_ready() {
                    break;
                }
                let Some(frame) = self.events.admit_frame(port.stream) else { break };
                dev.borrow_mut().deliver_frame(&frame, &mut self.irqs);
            }
        }
    }

    fn flush_console(&mut self) {
        let out = self.devices.uart.borrow_mut().take_output();
        if out.is_empty() {
            return;
        }
        if let Some(g) = &mut self.gate {
            g.before_output();
        }
        let ticket = self.events.output(ftvm_log::OUTPUT_CONSOLE, &out);
        self.outputs_unflushed = true;
        self.last_output = Some(ticket);
        let out = match &mut self.gate {
            Some(g) => match g.submit(ticket, OutputTarget::Console, out) {
                Some(o) => o,
                None => return,
            },
            None => out,
        };
        {
            // The guest never waits on the console: a failing sink loses output, not progress.
            if let Err(e) = self.console.write_all(&out).and_then(|_| self.console.flush()) {
                if self.warned_ports.insert(u64::MAX) {
                    tracing::warn!("console output failed: {e}; further output may be lost");
                }
            }
        }
    }

    fn take_request(&mut self) -> Option<VmOutcome> {
        let request = self.requests.drain(..).next()?;
        self.requests.clear();
        Some(match request {
            VmRequest::PowerOff => VmOutcome::PowerOff,
            VmRequest::Reset => VmOutcome::Reset,
        })
    }

    /// Injects the PIC's pending interrupt if the guest can take it now (IF set and KVM
    /// ready); otherwise, in prompt delivery, asks KVM for an interrupt-window exit.
    /// Returns whether an interrupt was injected.
    fn inject_or_request_window(&mut self) -> bool {
        let pending = self.devices.pic.borrow().has_pending_interrupt();
        let prompt = self.prompt_delivery();
        let run = self.vcpu.get_kvm_run();
        if !pending {
            run.request_interrupt_window = 0;
            return false;
        }
        if run.if_flag == 0 || run.ready_for_interrupt_injection == 0 {
            run.request_interrupt_window = u8::from(prompt);
            return false;
        }
        run.request_interrupt_window = 0;
        let Some(vector) = self.devices.pic.borrow_mut().acknowledge() else {
            return false;
        };
        let irq = kvm_bindings::kvm_interrupt { irq: u32::from(vector) };
        // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the pointer we pass, which lives
        // across the call; the fd is a vCPU fd.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.vcpu, KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            tracing::error!("KVM_INTERRUPT(vector {vector:#x}) failed: {}", errno::Error::last());
            return false;
        }
        self.stats.interrupts += 1;
        true
    }

    /// The guest executed HLT: wait until an interrupt can wake it, admitting timers and
    /// input as they come. Returns an outcome if the VM must stop instead.
    fn wait_while_halted(&mut self) -> Result<Option<VmOutcome>> {
        if self.events.mode() == Mode::Replay {
            return Ok(self.replay_while_halted());
        }
        loop {
            if self.inject_or_request_window() {
                return Ok(None);
            }
            let if_flag = self.vcpu.get_kvm_run().if_flag;
            let deadline = self.devices.next_deadline();
            let input_possible =
                self.events.console_input_open() || self.events.frames_open() || crate::kick::shutdown_pending();
            if if_flag == 0 || (deadline.is_none() && !input_possible) {
                return Ok(Some(VmOutcome::HaltedForever(RegisterDump::capture(&self.vcpu))));
            }
            if let Some(outcome) = self.control_point() {
                return Ok(Some(outcome));
            }
            if std::mem::take(&mut self.recording_restarted) {
                // The backup restores this state and runs the guest on after its HLT at once
                // (a restored VM is not halted): so does this side, for the same exits.
                return Ok(None);
            }
            // Nothing happens until the wake-up: let the backup have everything so far.
            self.events.flush_log();
            self.last_log_flush = std::time::Instant::now();
            self.doorbell.wait_until(deadline.map(|d| self.events.host_instant_of(d)));
            // Still positioned at the HLT exit, a counted one.
            self.after_exit(true);
            if let Some(outcome) = self.take_request() {
                return Ok(Some(outcome));
            }
        }
    }
}

/// The VM's state, saved and restored between two exits.
impl VcpuLoop {
    /// Completes the access of the last exit inside KVM (an IN's data reaches RAX only on the
    /// next KVM_RUN) without running a guest instruction: a KVM_RUN with `immediate_exit`.
    /// Needed before the vCPU's state is read.
    pub fn complete_pending_io(&mut self) -> Result<()> {
        self.vcpu.set_kvm_immediate_exit(1);
        let result = match self.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(Error::Kvm { call: "KVM_RUN (immediate exit)", source: e }),
            Ok(exit) => Err(Error::Capture(format!("KVM_RUN with immediate_exit ran the guest: {exit:?}"))),
        };
        self.vcpu.set_kvm_immediate_exit(0);
        result
    }

    /// The vCPU, every device and the guest clock (after [`Self::complete_pending_io`]).
    pub fn save_state(&self) -> Result<crate::state::VmState> {
        Ok(crate::state::VmState {
            vcpu: crate::vcpu_state::VcpuState::capture(&self.vcpu, &self.msr_indices)?,
            devices: self.devices.save_state(),
            clock: self.events.clock_state(),
        })
    }

    /// Makes the VM continue from a saved state (a restore, a sync point).
    pub fn restore_state(&mut self, state: &crate::state::VmState) -> Result<()> {
        self.devices.restore_state(&state.devices)?;
        state.vcpu.restore(&self.vcpu)?;
        self.events.resume_clock(&state.clock);
        Ok(())
    }
}

impl VcpuLoop {
    /// Starts a new recording into `log` here, between two exits (the cut of a live state
    /// transfer, right after the state was saved): deterministic delivery from now on, sync
    /// points with `sync_policy`, page hashes at checkpoints. Works for a primary that lost
    /// its backup (the old recording is dropped) and for a backup that went live.
    pub fn start_recording(
        &mut self,
        log: ftvm_log::LogWriter<Box<dyn std::io::Write + Send>>,
        sync_policy: Option<crate::vcpu::syncpoint::SyncPolicy>,
    ) -> Result<()> {
        self.exits_before += self.events.exit_index();
        self.events.start_recording(log);
        // The prompt deadline timer of a live VM: a kick from it is harmless (not counted),
        // but interrupts now go in at counted exits only.
        self.set_timer(None);
        self.vcpu.get_kvm_run().request_interrupt_window = 0;
        self.vcpu.set_sync_valid_reg(SyncReg::Register);
        let tracker = self.tracker.clone().ok_or(Error::NoDirtyTracker)?;
        // The first checkpoint's page hashes may name pages dirtied before the cut too: the
        // backup restored them as they were here, so their contents agree.
        if self.hash_consumer.is_none() {
            self.hash_consumer = Some(tracker.subscribe()?);
        }
        match (&mut self.sync, sync_policy) {
            // A primary's sync recorder carries on, forgetting what the old log held.
            (Some(sync), _) => sync.restart(),
            (None, Some(policy)) => {
                self.sync = Some(crate::vcpu::syncpoint::SyncRecorder::start(policy, self.kicker.clone(), tracker)?);
            }
            (None, None) => {}
        }
        self.sync_replay = Default::default();
        // Outputs are numbered from 0 in the new log.
        self.last_output = None;
        self.recording_restarted = true;
        Ok(())
    }

    /// Performs a sink write for an output released by the pair.
    pub fn perform(&mut self, target: OutputTarget, bytes: &[u8]) {
        match target {
            OutputTarget::Console => {
                let _ = self.console.write_all(bytes).and_then(|_| self.console.flush());
            }
            OutputTarget::Net(i) => {
                if let Some(port) = self.nets.get_mut(i) {
                    if port.sink.send(bytes).is_err() {
                        port.sink_drops += 1;
                    }
                }
            }
        }
    }

    /// A backup whose stream has ended (its events turned live) and that has not gone live yet.
    fn live_now(&self) -> bool {
        self.takeover.is_some() && self.events.went_live_at().is_some()
    }

    /// A backup's replay has turned live (its primary is gone and it won the arbiter): the
    /// failover rule for the replayed outputs, the TAPs opened, a gratuitous ARP, prompt
    /// interrupt delivery, and the takeover report.
    fn go_live(&mut self) -> Result<()> {
        let Some(takeover) = self.takeover.take() else { return Ok(()) };
        // What the guest was told is durable is made so on this host before it runs live or
        // anything it replayed is performed.
        for dev in &self.devices.virtio.disks {
            let mut dev = dev.borrow_mut();
            let disk = dev.device_mut().backend_mut();
            disk.settle_flushes().map_err(|source| Error::DiskSettle { path: disk.path().into(), source })?;
        }
        let uncovered = self.gate.as_mut().map(|g| g.go_live()).unwrap_or_default();
        let performed = uncovered.len();
        let report = takeover.activate(self)?;
        for (target, bytes) in uncovered {
            self.perform(target, &bytes);
        }
        self.set_timer(Some(DeadlineTimer::start(self.kicker.clone())?));
        let exit = self.events.went_live_at().unwrap_or(0);
        tracing::warn!(
            target: "ftvm::event",
            event = "takeover",
            exit,
            position = %report.position,
            performed,
            skipped = report.outputs_done,
            silence_ms = report.silence_ms,
            catch_up_ms = report.catch_up_ms,
            "TAKEOVER: live at exit {exit} ({}); {performed} replayed outputs performed (not covered by OUTPUT_DONE), \
             {} skipped; primary silent for {} ms before the failover, live {} ms after it (arbiter and backlog)",
            report.position,
            report.outputs_done,
            report.silence_ms,
            report.catch_up_ms,
        );
        Ok(())
    }

    /// Replay of a halt: the recording woke the guest with the inputs logged at this exit;
    /// apply them until an interrupt can be injected. No host time passes.
    fn replay_while_halted(&mut self) -> Option<VmOutcome> {
        loop {
            if let Some(outcome) = self.control_point() {
                return Some(outcome);
            }
            if self.inject_or_request_window() {
                return None;
            }
            if self.events.mode() == Mode::Live {
                // A backup turned live while the guest was halted: wait for the host.
                if let Err(e) = self.go_live() {
                    tracing::error!("going live failed: {e}");
                }
                return self.wait_while_halted().unwrap_or_else(|e| {
                    tracing::error!("{e}");
                    None
                });
            }
            if let Some(outcome) = self.journal_stop() {
                return Some(outcome);
            }
            if !self.events.replay_has_records_here() {
                self.events.replay_halted_without_input();
                return self
                    .journal_stop()
                    .or_else(|| Some(VmOutcome::HaltedForever(RegisterDump::capture(&self.vcpu))));
            }
            self.after_exit(true);
            if let Some(outcome) = self.take_request() {
                return Some(outcome);
            }
        }
    }
}

/// The control API (`ftvm-api`): what the loop publishes and where it parks. Kept apart from
/// the loop itself; the loop never waits on an API client, only on a pause it was asked for.
impl VcpuLoop {
    /// Between exits: publishes the loop's figures (relaxed atomic stores) and, while a pause
    /// is requested, parks here. Returns an outcome if the operator stopped the VM while it
    /// was paused.
    fn control_point(&mut self) -> Option<VmOutcome> {
        self.run_tasks();
        if let Some(g) = &mut self.gate {
            g.pace(self.events.log_next_lsn());
        }
        let control = self.control.clone()?;
        control.publish(&self.status_figures());
        if control.switchover_requested() && self.gate.is_some() {
            return Some(VmOutcome::Switchover);
        }
        // A paused vCPU still does the work it is handed (a snapshot of a paused VM).
        let tasks = self.tasks.clone();
        let interrupted = || crate::kick::stop_requested() || tasks.pending();
        while control.pause_requested() && control.park_if_paused(&interrupted) {
            if crate::kick::stop_requested() {
                return Some(VmOutcome::OperatorStop);
            }
            self.run_tasks();
        }
        None
    }

    fn run_tasks(&mut self) {
        if self.tasks.pending() {
            for task in self.tasks.take() {
                task(self);
            }
        }
    }

    fn status_figures(&self) -> LoopFigures {
        LoopFigures {
            exits: self.exits_before + self.events.exit_index(),
            stats: ExitStats { kicks: self.kicker.kicks(), ..self.stats },
            guest_time_ns: self.events.current(),
            log_bytes: self.events.log_bytes(),
            outputs: self.last_output.map_or(0, |t| t.ordinal + 1),
            last_output_lsn: self.last_output.and_then(|t| t.lsn),
            went_live: self.events.went_live_at().is_some(),
            sync: self.sync.as_ref().map(|s| s.stats).unwrap_or_default(),
        }
    }
}

/// An exit signature without RIP; `data` holds up to 8 bytes of the access, little-endian.
fn partial_sig(kind: u8, addr: u64, data: &[u8]) -> ExitSignature {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    ExitSignature { kind, addr, size: data.len() as u8, data: u64::from_le_bytes(bytes), rip: 0 }
}

/// A digest of the general-purpose registers, RIP and RFLAGS (checkpoints).
fn regs_digest(r: &kvm_regs) -> u64 {
    let mut h = ftvm_log::Hasher64::new();
    for v in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
        r.rip, r.rflags,
    ] {
        h.write_u64(v);
    }
    h.finish()
}

fn warn_once(warned: &mut BTreeSet<u64>, addr: u64, what: &str, len: usize) {
    if warned.insert(addr) {
        tracing::warn!("guest {what} {addr:#x} ({len} bytes); ignored (reported once per address)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_its_documented_exit_status_and_end_reason() {
        let dump = || Box::new(RegisterDump::default());
        let stop = |s| VmOutcome::ReplayStopped(s);
        let cases: Vec<(VmOutcome, i32, EndReason)> = vec![
            (VmOutcome::PowerOff, 0, EndReason::GuestPowerOff),
            (VmOutcome::Reset, 3, EndReason::GuestReset),
            (VmOutcome::TripleFault(dump()), 4, EndReason::TripleFault),
            (VmOutcome::HaltedForever(dump()), 5, EndReason::Error("guest halted for good".into())),
            (VmOutcome::KvmFailure { what: "x".into(), dump: dump() }, 6, EndReason::Error("x".into())),
            (VmOutcome::RecordingStopped("full".into()), 7, EndReason::SizeLimit),
            (
                stop(ReplayStop::LogEndsEarly { exit: 1, detail: "d".into() }),
                9,
                EndReason::Error("replay stopped".into()),
            ),
            (
                stop(ReplayStop::LogCorrupt { exit: 1, detail: "d".into() }),
                10,
                EndReason::Error("replay stopped".into()),
            ),
            (VmOutcome::ReplayReachedEnd(EndReason::OperatorStop), 0, EndReason::OperatorStop),
            (VmOutcome::OperatorStop, 130, EndReason::OperatorStop),
            (VmOutcome::Switchover, 11, EndReason::OperatorStop),
        ];
        for (outcome, code, reason) in cases {
            assert_eq!(outcome.exit_code(), code, "{outcome}");
            assert_eq!(outcome.end_reason(), reason, "{outcome}");
            assert!(!outcome.to_string().is_empty());
        }
        let stopped = VmOutcome::RecordingStopped("the log reached its size limit".into()).to_string();
        assert_eq!(stopped, "the recording stopped: the log reached its size limit");
    }

    #[test]
    fn tasks_wait_for_an_open_loop_wake_it_and_are_dropped_once_it_closed() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let tasks = VcpuTasks::default();
        // Before the loop opens, a submitted task is dropped (nobody would run it).
        tasks.submit(Box::new(|_| {}));
        assert!(!tasks.pending() && tasks.take().is_empty());
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        tasks.open(Box::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        }));
        tasks.submit(Box::new(|_| {}));
        tasks.submit(Box::new(|_| {}));
        assert!(tasks.pending());
        assert_eq!(woken.load(Ordering::SeqCst), 2, "each submit wakes the loop");
        assert_eq!(tasks.take().len(), 2);
        assert!(!tasks.pending());
        tasks.submit(Box::new(|_| {}));
        tasks.close();
        assert!(!tasks.pending() && tasks.take().is_empty(), "closing drops what waits");
        tasks.submit(Box::new(|_| {}));
        assert_eq!(woken.load(Ordering::SeqCst), 3, "no waker after closing");
    }

    #[test]
    fn a_partial_signature_keeps_up_to_eight_bytes_little_endian() {
        let s = partial_sig(exit_kind::IO_OUT, 0x3f8, &[0x41]);
        assert_eq!((s.addr, s.size, s.data, s.rip), (0x3f8, 1, 0x41, 0));
        let s = partial_sig(exit_kind::IO_OUT, 0x604, &[1, 2, 3, 4]);
        assert_eq!((s.size, s.data), (4, 0x0403_0201));
        // Longer accesses (MMIO of 16 bytes): the size says so, the data keeps the first 8.
        let s = partial_sig(exit_kind::IO_OUT, 0, &[0xff; 16]);
        assert_eq!((s.size, s.data), (16, u64::MAX));
    }

    #[test]
    fn the_register_digest_changes_with_every_register_it_covers() {
        let base = kvm_regs::default();
        let d0 = regs_digest(&base);
        assert_eq!(d0, regs_digest(&kvm_regs::default()), "deterministic");
        let edits: [fn(&mut kvm_regs); 6] =
            [|r| r.rax = 1, |r| r.r15 = 1, |r| r.rsp = 8, |r| r.rip = 0x1000, |r| r.rflags = 0x202, |r| r.rbp = 1];
        for edit in edits {
            let mut r = base;
            edit(&mut r);
            assert_ne!(regs_digest(&r), d0);
        }
    }
}
