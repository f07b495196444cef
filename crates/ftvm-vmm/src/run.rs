//! Running a built VM to the end, in one of the session modes ([`Journaling`]): the vCPU
//! thread, the host's sides of the devices (console, TAP readers), the control API's hooks,
//! and the pair's gate and takeover.

use std::fs::File;
use std::io::Read;
#[cfg(test)]
use std::io::Write;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_events::EventSource;
use ftvm_virtio::tap::TapReader;

use crate::boot::KernelFormat;
use crate::error::{Error, Result};
use crate::identity;
use crate::kick::{Doorbell, Kicker};
use crate::legacy::Devices;
use crate::vcpu::{ConsoleSink, ExitStats, VcpuLoop};
use crate::vm::{unix_now, ConsoleConfig, Vm, VmConfig, VmOutcome};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: VmOutcome,
    pub stats: ExitStats,
    pub exits: u64,
    pub elapsed: Duration,
    pub format: KernelFormat,
}

/// Where a network device's transmitted frames go (a TAP, or a replay's pcap file).
pub type NetSink = Box<dyn ftvm_virtio::net::FrameSink + Send>;

/// How a VM's host inputs are journaled.
pub enum Journaling {
    /// `ftvm run`: live inputs, nothing logged, prompt interrupt delivery.
    Live,
    /// `ftvm record`: live inputs written to the log; interrupts only at counted exits.
    Record(ftvm_log::LogWriter<Box<dyn std::io::Write + Send>>),
    /// `ftvm replay`: inputs from the log; transmitted frames go to `net_sinks` (one per
    /// network device) instead of a TAP.
    Replay { log: ftvm_log::LogReader<Box<dyn Read + Send>>, net_sinks: Vec<NetSink> },
    /// `ftvm primary`: record into a stream to the backup, outputs held until acknowledged.
    Primary {
        link: ftvm_replication::primary::PrimaryConfig,
        header: Box<ftvm_log::LogHeader>,
        settings: crate::protect::PairSettings,
    },
    /// `ftvm backup`: replay the primary's stream (its link already started, its header
    /// checked); go live when it dies.
    Backup {
        backup: Arc<ftvm_replication::backup::Backup>,
        theirs: Box<ftvm_log::LogHeader>,
        source: Box<dyn ftvm_events::RecordSource>,
        settings: crate::protect::PairSettings,
    },
}

impl Journaling {
    /// The role the control API shows for this mode.
    pub fn role(&self) -> ftvm_api::Role {
        match self {
            Journaling::Live => ftvm_api::Role::Standalone,
            Journaling::Record(_) => ftvm_api::Role::Recording,
            Journaling::Replay { .. } => ftvm_api::Role::Replaying,
            Journaling::Primary { .. } => ftvm_api::Role::Primary,
            Journaling::Backup { .. } => ftvm_api::Role::Backup,
        }
    }
}

/// Runs the guest with the given journaling until it stops.
pub fn run_with(mut vm: Vm, journaling: Journaling) -> Result<RunReport> {
    let rtc_base = vm.config().rtc_base_unix.unwrap_or_else(unix_now);
    let tracker = vm.dirty_tracker();
    // A recording (and a primary) hashes the pages it dirtied at each checkpoint; a
    // replay hashes the pages the log names.
    let records = matches!(journaling, Journaling::Record(_) | Journaling::Primary { .. });
    let hash_consumer = if records { Some(tracker.subscribe()?) } else { None };
    let control = crate::control::take_control();
    if let Some(c) = &control {
        c.set_role(journaling.role());
    }
    let tasks = crate::vcpu::VcpuTasks::default();
    let pair = PairSide::new(&vm, journaling, rtc_base, &tracker, &tasks, control.as_ref())?;
    let kicker = Kicker::new()?;
    let doorbell = Arc::new(Doorbell::default());
    let (console, input) = open_console(&vm.config().console, &kicker, &doorbell)?;
    let crate::vm::RunParts { vcpu, virtio, restore } = vm.take_run_parts()?;
    let HostNets { nets, readers } =
        HostNets::open(&vm, pair.backup_source.is_some(), pair.net_sinks, &kicker, &doorbell)?;
    let stop_watch = StopWatcher::start(kicker.clone(), doorbell.clone());
    if let Some(c) = &control {
        // A pause request kicks the vCPU out of KVM_RUN and wakes a halted loop.
        c.set_waker(Some(crate::kick::waker(&kicker, &doorbell)));
    }
    let thread = VcpuThread {
        rtc_base: pair.rtc_base,
        virtio,
        mem: vm.memory().clone(),
        events_log: pair.events_log,
        backup_source: pair.backup_source,
        input,
        nets,
        session: crate::vcpu::SessionParts {
            gate: pair.gate,
            takeover: pair.takeover,
            tracker: Some(tracker),
            hash_consumer,
            control: control.clone().map(crate::control::supervisor),
            tasks,
            sync: vm.sync_policy(),
        },
        vcpu,
        console,
        kicker,
        doorbell,
        msr_indices: vm.msr_indices().to_vec(),
        restore,
        control: control.clone(),
    };
    let started = Instant::now();
    let thread = std::thread::Builder::new()
        .name("ftvm-vcpu0".into())
        .spawn(move || thread.run())
        .map_err(|source| Error::Spawn { thread: "vCPU", source })?;
    ftvm_seccomp::enter(ftvm_seccomp::Thread::Main);
    let joined = thread.join();
    if let Some(c) = &control {
        c.mark_stopped();
        c.set_waker(None);
        c.set_snapshot_starter(None);
        c.set_protect_starter(None);
    }
    drop(stop_watch);
    // The pair's link goes with the VM (what it still holds goes out first).
    drop(pair.protection.as_ref().and_then(|p| p.finish()));
    drop(pair.protection);
    drop(pair.backup);
    report_dropped_frames(&vm, readers);
    let (outcome, stats, exits, vcpu) = joined.map_err(|_| Error::VcpuPanicked)??;
    vm.return_vcpu(vcpu);
    Ok(RunReport { outcome, stats, exits, elapsed: started.elapsed(), format: vm.loaded().format })
}

/// The log the event source records into (`Ok`) or replays from (`Err`); none when live.
type EventsLog = Option<std::result::Result<StreamWriter, LogReaderBox>>;
type StreamWriter = ftvm_log::LogWriter<Box<dyn std::io::Write + Send>>;
type LogReaderBox = ftvm_log::LogReader<Box<dyn Read + Send>>;

/// What a session mode adds to a run: snapshots through the control API, and for the pair
/// the output gate, a backup's takeover and the protection that takes new backups.
struct PairSide {
    /// The guest clock's RTC base (a backup takes its primary's).
    rtc_base: u64,
    events_log: EventsLog,
    net_sinks: Vec<NetSink>,
    gate: Option<Box<dyn ftvm_events::OutputGate>>,
    takeover: Option<Box<dyn ftvm_machine::vcpu::GoLive>>,
    protection: Option<Arc<crate::protect::Protection>>,
    backup: Option<Arc<ftvm_replication::backup::Backup>>,
    backup_source: Option<Box<dyn ftvm_events::RecordSource>>,
}

impl PairSide {
    fn new(
        vm: &Vm,
        journaling: Journaling,
        rtc_base: u64,
        tracker: &crate::dirty::DirtyTracker,
        tasks: &crate::vcpu::VcpuTasks,
        control: Option<&Arc<ftvm_api::VmControl>>,
    ) -> Result<Self> {
        let pair_settings = match &journaling {
            Journaling::Primary { settings, .. } | Journaling::Backup { settings, .. } => Some(settings.clone()),
            _ => None,
        };
        // The VM as a snapshot pins it (it hashes the kernel: once, for both uses below).
        let vm_header = (control.is_some() || pair_settings.is_some())
            .then(|| identity::snapshot_header(vm, rtc_base))
            .transpose()?;
        let source = |header: ftvm_log::LogHeader, control: Arc<ftvm_api::VmControl>| crate::snapshot::SnapshotSource {
            tracker: tracker.clone(),
            disks: vm.disk_handles().to_vec(),
            header,
            tasks: tasks.clone(),
            control,
        };
        // Snapshots are taken through the control API.
        if let (Some(c), Some(header)) = (control, &vm_header) {
            c.set_snapshot_starter(Some(Arc::new(source(header.clone(), c.clone())).starter()));
        }
        // The pair: the primary's link (with its held outputs), or the backup's; either may
        // later take a new backup (re-protection, resync) through its protection.
        let mut side = PairSide {
            rtc_base,
            events_log: None,
            net_sinks: Vec::new(),
            gate: None,
            takeover: None,
            protection: None,
            backup: None,
            backup_source: None,
        };
        if let (Some(settings), Some(header)) = (pair_settings, vm_header) {
            // The protection's snapshots report their own progress (a re-protection's).
            let snapshots = source(header, ftvm_api::VmControl::new());
            let p = crate::protect::Protection::new(settings, vm.sync_policy(), snapshots, control.cloned());
            if let Some(c) = control {
                let p = p.clone();
                c.set_protect_starter(Some(Box::new(move |addr| p.start(addr, crate::protect::Reason::Protect))));
            }
            side.protection = Some(p);
        }
        match journaling {
            Journaling::Live => {}
            Journaling::Record(w) => side.events_log = Some(Ok(w)),
            Journaling::Replay { log, net_sinks } => {
                side.events_log = Some(Err(log));
                side.net_sinks = net_sinks;
            }
            Journaling::Primary { link, header, .. } => {
                let mut header = *header;
                header.rtc_base_unix = rtc_base;
                let console = console_sink(&vm.config().console)?;
                let sinks: ftvm_replication::primary::SharedSinks =
                    Arc::new(std::sync::Mutex::new(Box::new(crate::pair::HostSinks {
                        console,
                        taps: vm.taps().to_vec(),
                    })));
                let (primary, writer, _stats) = ftvm_replication::primary::Primary::boot(&link, &header, sinks)?;
                side.gate = Some(primary.gate());
                if let Some(p) = &side.protection {
                    p.set_boot_link(primary, link.backup);
                }
                side.events_log = Some(Ok(writer));
            }
            Journaling::Backup { backup, theirs, source, .. } => {
                side.rtc_base = theirs.rtc_base_unix;
                side.gate = Some(backup.gate());
                if let Some(c) = control {
                    c.set_pair_source(Some(crate::control::backup_figures(backup.state.clone())));
                }
                side.takeover = Some(Box::new(crate::pair::Takeover {
                    taps: vm.config().nets.iter().map(|n| n.tap.clone()).collect(),
                    macs: theirs.net.iter().map(|n| n.mac.0).collect(),
                    guest_ip: crate::pair::guest_ip(&theirs.cmdline),
                    state: backup.state.clone(),
                }));
                if let Some(p) = &side.protection {
                    p.set_backup_arbiter(backup.arbiter.clone());
                }
                side.backup = Some(backup);
                side.backup_source = Some(source);
            }
        }
        Ok(side)
    }
}

/// The host sides of the network devices, in device order: where each one's transmitted
/// frames go and the channel its received frames arrive on, with the TAP reader threads.
struct HostNets {
    nets: Vec<(NetSink, mpsc::Receiver<Vec<u8>>)>,
    readers: Vec<TapReader>,
}

impl HostNets {
    fn open(
        vm: &Vm,
        backup: bool,
        replay_sinks: Vec<NetSink>,
        kicker: &Arc<Kicker>,
        doorbell: &Arc<Doorbell>,
    ) -> Result<Self> {
        let mut nets: Vec<(NetSink, mpsc::Receiver<Vec<u8>>)> = Vec::new();
        if backup {
            // The backup's TAPs are opened only when it goes live; until then its network
            // devices send nowhere and receive from the log.
            for _ in &vm.config().nets {
                let (_tx, rx) = mpsc::sync_channel(1);
                nets.push((Box::new(NullSink), rx));
            }
        }
        for sink in replay_sinks {
            // Replay: received frames come from the log; this channel never carries any.
            let (_tx, rx) = mpsc::sync_channel(1);
            nets.push((sink, rx));
        }
        // One reader thread per TAP; received frames wait in a bounded channel until the
        // vCPU loop admits them. The reader wakes a halted loop and, in a live run, kicks a
        // running vCPU (recording, a kick would admit nothing). A
        // primary's loop keeps its TAPs for receiving; what it transmits goes through the
        // output gate, and it is sent once acknowledged.
        let mut readers = Vec::new();
        for tap in vm.taps() {
            let (tx, rx) = mpsc::sync_channel(FRAME_BACKLOG);
            readers.push(tap.spawn_reader(tx, crate::kick::frame_waker(kicker, doorbell))?);
            nets.push((Box::new(tap.clone()), rx));
        }
        Ok(HostNets { nets, readers })
    }
}

fn report_dropped_frames(vm: &Vm, readers: Vec<TapReader>) {
    for (tap, reader) in vm.taps().iter().zip(&readers) {
        if reader.dropped() > 0 {
            tracing::info!(
                "TAP {}: {} received frames dropped (the guest did not take them in time)",
                tap.name(),
                reader.dropped()
            );
        }
    }
}

/// Everything the vCPU thread takes: devices and the event source are made on it (they live
/// on that thread only: they are touched between exits).
struct VcpuThread {
    rtc_base: u64,
    virtio: crate::legacy::VirtioBackends,
    mem: crate::memory::GuestMemoryMmap,
    events_log: EventsLog,
    backup_source: Option<Box<dyn ftvm_events::RecordSource>>,
    input: Option<mpsc::Receiver<Vec<u8>>>,
    nets: Vec<(NetSink, mpsc::Receiver<Vec<u8>>)>,
    session: crate::vcpu::SessionParts,
    vcpu: kvm_ioctls::VcpuFd,
    console: ConsoleSink,
    kicker: Arc<Kicker>,
    doorbell: Arc<Doorbell>,
    msr_indices: Vec<u32>,
    restore: Option<Box<crate::state::VmState>>,
    control: Option<Arc<ftvm_api::VmControl>>,
}

impl VcpuThread {
    fn run(self) -> Result<(VmOutcome, ExitStats, u64, kvm_ioctls::VcpuFd)> {
        ftvm_seccomp::enter(ftvm_seccomp::Thread::Vcpu);
        let rtc = self.rtc_base;
        let mut devices = Devices::new(rtc)?;
        devices.add_virtio(self.virtio, &self.mem)?;
        let (mut events, live) = match (self.events_log, self.backup_source) {
            (_, Some(source)) => (EventSource::replay_from(rtc, source, true), false),
            (None, None) => (EventSource::live(rtc), true),
            (Some(Ok(writer)), None) => (EventSource::record(rtc, writer), true),
            (Some(Err(reader)), None) => (EventSource::replay(rtc, reader), false),
        };
        if live && self.restore.is_none() {
            // A fresh boot: the RTC's seconds turn with the host's (a restored state brings
            // its own clock; a replay reads every clock value from its log).
            events.resume_clock(&ftvm_events::ClockState { guest_now: crate::vm::guest_clock_start(rtc) });
        }
        if let Some(rx) = self.input {
            events.attach_console_input(rx);
        }
        let streams: Vec<_> = self.nets.into_iter().map(|(sink, rx)| (sink, events.attach_frames(rx))).collect();
        let (kicker, doorbell) = (self.kicker, self.doorbell);
        let mut vloop =
            VcpuLoop::new(self.vcpu, devices, events, self.console, kicker, doorbell, self.msr_indices, self.session)?;
        for (sink, stream) in streams {
            vloop.attach_net(sink, stream);
        }
        if let Some(state) = self.restore {
            vloop.restore_state(&state)?;
        }
        if let Some(c) = &self.control {
            c.mark_running();
        }
        let outcome = vloop.run()?;
        let (stats, exits, vcpu) = vloop.finish();
        Ok((outcome, stats, exits, vcpu))
    }
}

/// Received frames that may wait for the vCPU loop per network device; more are dropped.
const FRAME_BACKLOG: usize = 1024;

/// Opens the console: the output sink and, for stdio, a thread that forwards standard input
/// to the event source (waking a halted vCPU and kicking a running one).
fn open_console(
    config: &ConsoleConfig,
    kicker: &Arc<Kicker>,
    doorbell: &Arc<Doorbell>,
) -> Result<(ConsoleSink, Option<mpsc::Receiver<Vec<u8>>>)> {
    match config {
        ConsoleConfig::Discard => Ok((Box::new(std::io::sink()), None)),
        ConsoleConfig::File(path) => {
            let file = File::create(path).map_err(|source| Error::ConsoleFile { path: path.clone(), source })?;
            Ok((Box::new(file), None))
        }
        ConsoleConfig::Stdio => {
            let (tx, rx) = mpsc::channel();
            let wake = crate::kick::input_waker(kicker, doorbell);
            let doorbell = doorbell.clone();
            std::thread::Builder::new()
                .name("ftvm-stdin".into())
                .spawn(move || {
                    ftvm_seccomp::enter(ftvm_seccomp::Thread::Stdin);
                    let mut stdin = std::io::stdin();
                    let mut buf = [0u8; 256];
                    loop {
                        match stdin.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if tx.send(buf[..n].to_vec()).is_err() {
                                    break;
                                }
                                wake();
                            }
                        }
                    }
                    drop(tx);
                    doorbell.ring();
                })
                .map_err(|source| Error::Spawn { thread: "console input", source })?;
            Ok((Box::new(std::io::stdout()), Some(rx)))
        }
    }
}

/// A console output sink alone (no input thread): where a primary's released console output
/// goes.
fn console_sink(config: &ConsoleConfig) -> Result<ConsoleSink> {
    Ok(match config {
        ConsoleConfig::Stdio => Box::new(std::io::stdout()),
        ConsoleConfig::Discard => Box::new(std::io::sink()),
        ConsoleConfig::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::ConsoleFile { path: path.clone(), source })?,
        ),
    })
}

/// Sends nowhere: a backup's network devices until it goes live, a replay's without an
/// output directory.
pub(crate) struct NullSink;

impl ftvm_virtio::net::FrameSink for NullSink {
    fn send(&mut self, _: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

/// Kicks the vCPU and wakes a halted loop once the operator asks to stop, so that a guest
/// computing in ring 3 (no exits, no kicks in record mode) still stops promptly.
struct StopWatcher {
    done: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StopWatcher {
    fn start(kicker: Arc<Kicker>, doorbell: Arc<Doorbell>) -> Self {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        let thread = std::thread::Builder::new()
            .name("ftvm-stop".into())
            .spawn(move || {
                ftvm_seccomp::enter(ftvm_seccomp::Thread::Stop);
                // When the shutdown request was first seen, and whether it was woken for.
                let mut shutdown_since: Option<std::time::Instant> = None;
                while !d.load(std::sync::atomic::Ordering::Relaxed) {
                    if crate::kick::shutdown_requested() && !crate::kick::stop_requested() {
                        let grace = crate::kick::stop_timeout().unwrap_or_default();
                        let since = *shutdown_since.get_or_insert_with(|| {
                            tracing::warn!(
                                "asked the guest to shut down; it has {} s to power off (--stop-timeout), \
                                 a second SIGTERM or SIGINT stops it now",
                                grace.as_secs_f64()
                            );
                            // Wake a halted guest for the request.
                            doorbell.ring();
                            kicker.kick();
                            std::time::Instant::now()
                        });
                        if since.elapsed() >= grace {
                            tracing::warn!(
                                "the guest did not power off within {} s of the shutdown request; stopping it",
                                grace.as_secs_f64()
                            );
                            crate::kick::request_stop();
                        }
                    }
                    if crate::kick::stop_requested() {
                        doorbell.ring();
                        kicker.kick();
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .ok();
        StopWatcher { done, thread }
    }
}

impl Drop for StopWatcher {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Builds and runs a VM: the whole of `ftvm run`.
pub fn run(config: VmConfig) -> Result<RunReport> {
    run_with(Vm::build(config)?, Journaling::Live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_files_are_created_and_a_bad_path_is_a_typed_error() {
        let dir = std::env::temp_dir().join(format!("ftvm-run-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.txt");
        let mut sink = console_sink(&ConsoleConfig::File(path.clone())).unwrap();
        sink.write_all(b"one\n").unwrap();
        drop(sink);
        // A primary's released output appends to what the console file holds.
        let mut sink = console_sink(&ConsoleConfig::File(path.clone())).unwrap();
        sink.write_all(b"two\n").unwrap();
        drop(sink);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
        let missing = dir.join("no/such/dir/console.txt");
        match console_sink(&ConsoleConfig::File(missing.clone())) {
            Err(e @ Error::ConsoleFile { .. }) => {
                assert!(e.to_string().contains(&missing.display().to_string()), "{e}");
                assert!(std::error::Error::source(&e).is_some(), "the io error is kept");
            }
            other => panic!("expected ConsoleFile, got {:?}", other.err()),
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_null_sink_takes_everything() {
        use ftvm_virtio::net::FrameSink;
        assert!(NullSink.send(&[0; 1514]).is_ok());
    }

    #[test]
    fn a_plain_run_shows_as_standalone() {
        assert_eq!(Journaling::Live.role(), ftvm_api::Role::Standalone);
    }
}
