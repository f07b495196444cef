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
    let mut rtc_base = vm.config().rtc_base_unix.unwrap_or_else(unix_now);
    let tracker = vm.dirty_tracker();
    // A recording (and a primary) hashes the pages it dirtied at each checkpoint; a
    // replay hashes the pages the log names.
    let records = matches!(journaling, Journaling::Record(_) | Journaling::Primary { .. });
    let hash_consumer = if records { Some(tracker.subscribe()?) } else { None };
    let msr_indices = vm.msr_indices().to_vec();
    let sync_policy = vm.sync_policy();
    let control = crate::control::take_control();
    if let Some(c) = &control {
        c.set_role(journaling.role());
    }
    let pair_settings = match &journaling {
        Journaling::Primary { settings, .. } | Journaling::Backup { settings, .. } => Some(settings.clone()),
        _ => None,
    };
    // The VM as a snapshot pins it (it hashes the kernel: once, for both uses below).
    let vm_header = (control.is_some() || pair_settings.is_some())
        .then(|| crate::identity::snapshot_header(&vm, rtc_base))
        .transpose()?;
    // Snapshots are taken through the control API.
    let tasks = crate::vcpu::VcpuTasks::default();
    if let (Some(c), Some(header)) = (&control, &vm_header) {
        let source = Arc::new(crate::snapshot::SnapshotSource {
            tracker: tracker.clone(),
            disks: vm.disk_handles().to_vec(),
            header: header.clone(),
            tasks: tasks.clone(),
            control: c.clone(),
        });
        c.set_snapshot_starter(Some(source.starter()));
    }
    // The pair: the primary's link (with its held outputs), or the backup's; either may
    // later take a new backup (re-protection, resync) through its protection.
    let mut gate = None;
    let mut takeover = None;
    let mut protection = None;
    let mut pair_backup = None;
    let mut backup_source = None;
    if let (Some(settings), Some(header)) = (pair_settings, vm_header) {
        let source = crate::snapshot::SnapshotSource {
            tracker: tracker.clone(),
            disks: vm.disk_handles().to_vec(),
            header,
            tasks: tasks.clone(),
            // Its own progress reports (re-protection reports its own).
            control: ftvm_api::VmControl::new(),
        };
        let p = crate::protect::Protection::new(settings, sync_policy, source, control.clone());
        if let Some(c) = &control {
            let p = p.clone();
            c.set_protect_starter(Some(Box::new(move |addr| p.start(addr, crate::protect::Reason::Protect))));
        }
        protection = Some(p);
    }
    let journaling = match journaling {
        Journaling::Primary { link, header, .. } => {
            let mut header = *header;
            header.rtc_base_unix = rtc_base;
            let console = console_sink(&vm.config().console)?;
            let sinks: ftvm_replication::primary::SharedSinks =
                Arc::new(std::sync::Mutex::new(Box::new(crate::pair::HostSinks { console, taps: vm.taps().to_vec() })));
            let (primary, writer, _stats) = ftvm_replication::primary::Primary::boot(&link, &header, sinks)?;
            gate = Some(primary.gate());
            if let Some(p) = &protection {
                p.set_boot_link(primary, link.backup);
            }
            Journaling::Record(writer)
        }
        Journaling::Backup { backup, theirs, source, .. } => {
            rtc_base = theirs.rtc_base_unix;
            gate = Some(backup.gate());
            if let Some(c) = &control {
                c.set_pair_source(Some(crate::control::backup_figures(backup.state.clone())));
            }
            takeover = Some(Box::new(crate::pair::Takeover {
                taps: vm.config().nets.iter().map(|n| n.tap.clone()).collect(),
                macs: theirs.net.iter().map(|n| n.mac.0).collect(),
                guest_ip: crate::pair::guest_ip(&theirs.cmdline),
                state: backup.state.clone(),
            }) as Box<dyn ftvm_machine::vcpu::GoLive>);
            if let Some(p) = &protection {
                p.set_backup_arbiter(backup.arbiter.clone());
            }
            pair_backup = Some(backup);
            backup_source = Some(source);
            Journaling::Live
        }
        other => other,
    };
    let kicker = Kicker::new()?;
    let doorbell = Arc::new(Doorbell::default());
    let (console, input) = open_console(&vm.config().console, &kicker, &doorbell)?;
    let crate::vm::RunParts { vcpu, virtio, restore } = vm.take_run_parts()?;
    // One reader thread per TAP; received frames wait in a bounded channel until the vCPU
    // loop admits them. The reader wakes a halted loop and kicks a running vCPU.
    let mut readers: Vec<TapReader> = Vec::new();
    let mut nets: Vec<(NetSink, mpsc::Receiver<Vec<u8>>)> = Vec::new();
    let (events_log, net_sinks) = match journaling {
        Journaling::Live => (None, Vec::new()),
        Journaling::Record(w) => (Some(Ok(w)), Vec::new()),
        Journaling::Replay { log, net_sinks } => (Some(Err(log)), net_sinks),
        Journaling::Primary { .. } | Journaling::Backup { .. } => unreachable!("resolved above"),
    };
    if backup_source.is_some() {
        // The backup's TAPs are opened only when it goes live; until then its network
        // devices send nowhere and receive from the log.
        for _ in &vm.config().nets {
            let (_tx, rx) = mpsc::sync_channel(1);
            nets.push((Box::new(NullSink), rx));
        }
    }
    for sink in net_sinks {
        // Replay: received frames come from the log; this channel never carries any.
        let (_tx, rx) = mpsc::sync_channel(1);
        nets.push((sink, rx));
    }
    // A primary's loop keeps its TAPs for receiving; what it transmits goes through the
    // output gate, and it is sent once acknowledged.
    for tap in vm.taps() {
        let (tx, rx) = mpsc::sync_channel(FRAME_BACKLOG);
        let (k, d) = (kicker.clone(), doorbell.clone());
        readers.push(tap.spawn_reader(
            tx,
            Box::new(move || {
                d.ring();
                k.kick();
            }),
        )?);
        nets.push((Box::new(tap.clone()), rx));
    }
    let stop_watch = StopWatcher::start(kicker.clone(), doorbell.clone());
    if let Some(c) = &control {
        // A pause request kicks the vCPU out of KVM_RUN and wakes a halted loop.
        let (k, d) = (kicker.clone(), doorbell.clone());
        c.set_waker(Some(Box::new(move || {
            d.ring();
            k.kick();
        })));
    }
    let vcpu_control = control.clone();
    let mem = vm.memory().clone();
    let started = Instant::now();
    let thread = std::thread::Builder::new()
        .name("ftvm-vcpu0".into())
        .spawn(move || -> Result<(VmOutcome, ExitStats, u64, kvm_ioctls::VcpuFd)> {
            ftvm_seccomp::enter(ftvm_seccomp::Thread::Vcpu);
            // Devices live on this thread only (they are touched between exits).
            let mut devices = Devices::new(rtc_base)?;
            devices.add_virtio(virtio, &mem)?;
            let mut events = match (events_log, backup_source) {
                (_, Some(source)) => EventSource::replay_from(rtc_base, source, true),
                (None, None) => EventSource::live(rtc_base),
                (Some(Ok(writer)), None) => EventSource::record(rtc_base, writer),
                (Some(Err(reader)), None) => EventSource::replay(rtc_base, reader),
            };
            if let Some(rx) = input {
                events.attach_console_input(rx);
            }
            let streams: Vec<_> = nets.into_iter().map(|(sink, rx)| (sink, events.attach_frames(rx))).collect();
            let session = crate::vcpu::SessionParts {
                gate,
                takeover,
                tracker: Some(tracker),
                hash_consumer,
                control: vcpu_control.clone().map(crate::control::supervisor),
                tasks,
                sync: sync_policy,
            };
            let mut vloop = VcpuLoop::new(vcpu, devices, events, console, kicker, doorbell, msr_indices, session)?;
            for (sink, stream) in streams {
                vloop.attach_net(sink, stream);
            }
            if let Some(state) = restore {
                vloop.restore_state(&state)?;
            }
            if let Some(c) = &vcpu_control {
                c.mark_running();
            }
            let outcome = vloop.run()?;
            let (stats, exits, vcpu) = vloop.finish();
            Ok((outcome, stats, exits, vcpu))
        })
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
    drop(protection.as_ref().and_then(|p| p.finish()));
    drop(protection);
    drop(pair_backup);
    for (tap, reader) in vm.taps().iter().zip(&readers) {
        if reader.dropped() > 0 {
            tracing::info!(
                "TAP {}: {} received frames dropped (the guest did not take them in time)",
                tap.name(),
                reader.dropped()
            );
        }
    }
    drop(readers);
    let (outcome, stats, exits, vcpu) = joined.map_err(|_| Error::VcpuPanicked)??;
    vm.return_vcpu(vcpu);
    Ok(RunReport { outcome, stats, exits, elapsed: started.elapsed(), format: vm.loaded().format })
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
            let (kicker, doorbell) = (kicker.clone(), doorbell.clone());
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
                                doorbell.ring();
                                kicker.kick();
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
                while !d.load(std::sync::atomic::Ordering::Relaxed) {
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
