//! Building a VM from its configuration and running it to the end.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ftvm_events::EventSource;
use ftvm_virtio::block::RawFile;
use ftvm_virtio::net::MacAddr;
use ftvm_virtio::tap::{Tap, TapReader};

use crate::boot::{self, BootSpec, KernelFormat, Loaded};
use crate::error::{Error, Result};
use crate::kick::{Doorbell, Kicker};
use crate::legacy::{self, Devices, VirtioBackends, VirtioSlot};
use crate::vcpu::{ConsoleSink, Delivery, ExitStats, VcpuLoop};
use crate::{cpuid, kvm, memory, msr};

pub use crate::vcpu::VmOutcome;

/// Where the guest's console (COM1) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// Output to standard output; standard input is the guest's console input.
    Stdio,
    /// Output to a file (created or truncated); no console input.
    File(PathBuf),
    /// Output discarded, no input (a replay without an output directory).
    Discard,
}

/// A virtio-blk device: `--disk PATH[,readonly]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
}

impl FromStr for DiskConfig {
    type Err = Error;

    /// `PATH[,readonly]` (a path containing a comma is not supported).
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| Error::DeviceOption { option: "disk", text: s.into(), why };
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad("needs a path, e.g. --disk disk.img or --disk disk.img,readonly".into()));
        }
        let mut readonly = false;
        for opt in parts {
            match opt {
                "readonly" | "ro" => readonly = true,
                other => return Err(bad(format!("unknown option {other:?}; the only option is readonly"))),
            }
        }
        Ok(DiskConfig { path: path.into(), readonly })
    }
}

/// A virtio-net device: `--net tap=NAME[,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The existing TAP interface to attach to.
    pub tap: String,
    /// The guest's MAC address; by default 52:54:00:12:34:56 plus the device's index.
    pub mac: Option<MacAddr>,
}

impl FromStr for NetConfig {
    type Err = Error;

    /// `tap=NAME[,mac=MAC]`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| Error::DeviceOption { option: "net", text: s.into(), why };
        let (mut tap, mut mac) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
                Some(("mac", text)) => mac = Some(text.parse::<MacAddr>().map_err(|e| bad(e.to_string()))?),
                _ => return Err(bad(format!("unexpected {part:?}; the syntax is tap=NAME[,mac=MAC]"))),
            }
        }
        let tap = tap.ok_or_else(|| bad("needs tap=NAME, e.g. --net tap=tap0".into()))?;
        Ok(NetConfig { tap, mac })
    }
}

/// Default guest memory: 256 MiB.
pub const DEFAULT_MEM: u64 = 256 * memory::MIB;

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub boot: BootSpec,
    pub mem_size: u64,
    pub console: ConsoleConfig,
    /// Wall-clock time (seconds since 1970) that the RTC shows at boot; now if `None`.
    pub rtc_base_unix: Option<u64>,
    /// virtio-net devices (first in device order).
    pub nets: Vec<NetConfig>,
    /// virtio-blk devices (after the nets).
    pub disks: Vec<DiskConfig>,
    /// A virtio-rng device (last).
    pub rng: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: VmOutcome,
    pub stats: ExitStats,
    pub exits: u64,
    pub elapsed: Duration,
    pub format: KernelFormat,
}

/// TSS for KVM's real-mode emulation on Intel hardware: 3 pages in the MMIO gap.
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// A VM, built and ready to run.
pub struct Vm {
    // Drop order: the vCPU (inside `vcpu`) before the VM fd and the memory it maps.
    vcpu: Option<kvm_ioctls::VcpuFd>,
    vm_fd: Arc<kvm_ioctls::VmFd>,
    mem: memory::GuestMemoryMmap,
    loaded: Loaded,
    config: VmConfig,
    virtio: Option<VirtioBackends>,
    taps: Vec<Tap>,
    slots: Vec<VirtioSlot>,
    identity: VmIdentity,
    /// The MSRs a saved vCPU state holds on this host.
    msr_indices: Vec<u32>,
    /// The disks with their dirty-block maps, in device order (for snapshots).
    disks: Vec<crate::snapshot::DiskHandle>,
    /// The state to continue from, for a VM restored from a snapshot (applied on the vCPU
    /// thread before the guest runs).
    restore: Option<Box<crate::snapshot::VmState>>,
    /// Recording: how sync points deliver events to a guest that does not exit (`None`:
    /// never; events wait for the next exit).
    sync_policy: Option<crate::syncpoint::SyncPolicy>,
}

/// What a recording's header pins about the VM as built (docs/log-format.md), so that a replay
/// or a backup can check it built the same machine.
#[derive(Debug, Clone, PartialEq)]
pub struct VmIdentity {
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub xcr0: u64,
    pub xsave_size: u32,
    /// The command line the guest sees (with the virtio_mmio.device= additions).
    pub effective_cmdline: String,
    pub memory_layout: Vec<(u64, u64)>,
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

impl Vm {
    /// Creates the VM: memory, CPUID and MSR policy, the kernel loaded, the vCPU at entry.
    pub fn build(config: VmConfig) -> Result<Self> {
        Self::build_with(config, true)
    }

    /// Like [`Vm::build`]; with `open_taps` false the network devices get no TAP (a replay
    /// takes received frames from the log and sends transmitted ones elsewhere).
    pub fn build_with(config: VmConfig, open_taps: bool) -> Result<Self> {
        // Host resources first: a missing disk or TAP is reported before anything else.
        let (virtio, taps) = open_virtio(&config, open_taps)?;
        let disks = config
            .disks
            .iter()
            .zip(&virtio.disks)
            .map(|(c, (d, _))| crate::snapshot::DiskHandle {
                path: c.path.clone(),
                readonly: c.readonly,
                tracker: d.tracker(),
            })
            .collect();
        let slots = legacy::virtio_layout(virtio.count())?;
        let mut boot_spec = config.boot.clone();
        boot_spec.cmdline = legacy::virtio_cmdline(&boot_spec.cmdline, &slots);
        let kvm = kvm::open()?;
        let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        vm.set_tss_address(KVM_TSS_ADDR).map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        let mem = memory::allocate(config.mem_size)?;
        memory::register(&vm, &mem, false)?;
        msr::install_filter(&vm)?;
        let loaded = boot::load(&mem, &boot_spec)?;
        let vcpu = vm.create_vcpu(0).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::guest_cpuid(&kvm)?;
        vcpu.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;
        boot::setup_vcpu(&vcpu, &mem, loaded.entry)?;
        let xcrs = vcpu.get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))?;
        let xcr0 = xcrs.xcrs.iter().take(xcrs.nr_xcrs as usize).find(|x| x.xcr == 0).map_or(0, |x| x.value);
        let identity = VmIdentity {
            cpuid: cpuid.as_slice().to_vec(),
            xcr0,
            xsave_size: kvm.check_extension_int(kvm_ioctls::Cap::Xsave2).max(0) as u32,
            effective_cmdline: boot_spec.cmdline.clone(),
            memory_layout: memory::ram_ranges(config.mem_size)?.iter().map(|(a, l)| (a.0, *l as u64)).collect(),
        };
        let msr_indices = crate::vcpu_state::msr_indices(&kvm)?;
        Ok(Vm {
            vcpu: Some(vcpu),
            vm_fd: Arc::new(vm),
            mem,
            loaded,
            config,
            virtio: Some(virtio),
            taps,
            slots,
            identity,
            msr_indices,
            disks,
            restore: None,
            sync_policy: Some(crate::syncpoint::SyncPolicy::default()),
        })
    }

    /// What the VM is, as a log header pins it.
    pub fn identity(&self) -> &VmIdentity {
        &self.identity
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The virtio devices' MMIO windows and interrupt lines, in device order.
    pub fn virtio_slots(&self) -> &[VirtioSlot] {
        &self.slots
    }

    pub fn memory(&self) -> &memory::GuestMemoryMmap {
        &self.mem
    }

    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    /// The VM will continue from `state` instead of booting (its memory is loaded already).
    pub(crate) fn continue_from(&mut self, state: crate::snapshot::VmState) {
        self.restore = Some(Box::new(state));
    }

    /// Recording: the sync-point policy (`None` turns sync points off).
    pub fn set_sync_policy(&mut self, policy: Option<crate::syncpoint::SyncPolicy>) {
        self.sync_policy = policy;
    }

    /// The disks with their dirty-block maps.
    pub(crate) fn disk_handles(&self) -> &[crate::snapshot::DiskHandle] {
        &self.disks
    }

    /// Runs the guest on its vCPU thread until it stops (`ftvm run`).
    pub fn run(self) -> Result<RunReport> {
        self.run_with(Journaling::Live)
    }

    /// Runs the guest with the given journaling until it stops.
    pub fn run_with(mut self, journaling: Journaling) -> Result<RunReport> {
        let mut rtc_base = self.config.rtc_base_unix.unwrap_or_else(unix_now);
        let delivery = match journaling {
            Journaling::Live => Delivery::Prompt,
            _ => Delivery::AtExits,
        };
        let tracker = crate::dirty::DirtyTracker::new(self.vm_fd.clone(), self.mem.clone());
        // A recording (and a primary) hashes the pages it dirtied at each checkpoint; a
        // replay hashes the pages the log names.
        let records = matches!(journaling, Journaling::Record(_) | Journaling::Primary { .. });
        let hash_consumer = if records { Some(tracker.subscribe()?) } else { None };
        let restore = self.restore.take();
        let msr_indices = self.msr_indices.clone();
        let sync_policy = self.sync_policy;
        let control = take_control();
        if let Some(c) = &control {
            c.set_role(api_role(&journaling));
        }
        let pair_settings = match &journaling {
            Journaling::Primary { settings, .. } | Journaling::Backup { settings, .. } => Some(settings.clone()),
            _ => None,
        };
        // The VM as a snapshot pins it (it hashes the kernel: once, for both uses below).
        let vm_header = (control.is_some() || pair_settings.is_some())
            .then(|| crate::recording::snapshot_header(&self, rtc_base))
            .transpose()?;
        // Snapshots are taken through the control API.
        let tasks = crate::vcpu::VcpuTasks::default();
        if let (Some(c), Some(header)) = (&control, &vm_header) {
            let source = Arc::new(crate::snapshot::SnapshotSource {
                tracker: tracker.clone(),
                disks: self.disks.clone(),
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
                disks: self.disks.clone(),
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
                let console = console_sink(&self.config.console)?;
                let sinks: ftvm_replication::primary::SharedSinks =
                    Arc::new(std::sync::Mutex::new(Box::new(crate::pair::HostSinks {
                        console,
                        taps: self.taps.clone(),
                    })));
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
                    c.set_pair_source(Some(backup_figures(backup.state.clone())));
                }
                takeover = Some(crate::pair::Takeover {
                    taps: self.config.nets.iter().map(|n| n.tap.clone()).collect(),
                    macs: theirs.net.iter().map(|n| n.mac.0).collect(),
                    guest_ip: crate::pair::guest_ip(&theirs.cmdline),
                    state: backup.state.clone(),
                });
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
        let (console, input) = open_console(&self.config.console, &kicker, &doorbell)?;
        let vcpu = self.vcpu.take().ok_or(Error::AlreadyRan)?;
        let virtio = self.virtio.take().ok_or(Error::AlreadyRan)?;
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
            for _ in &self.config.nets {
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
        for tap in &self.taps {
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
        let mem = self.mem.clone();
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
                    control: vcpu_control.clone(),
                    tasks,
                    sync: sync_policy,
                };
                let mut vloop =
                    VcpuLoop::new(vcpu, devices, events, console, kicker, doorbell, delivery, msr_indices, session)?;
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
        for (tap, reader) in self.taps.iter().zip(&readers) {
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
        self.vcpu = Some(vcpu);
        Ok(RunReport { outcome, stats, exits, elapsed: started.elapsed(), format: self.loaded.format })
    }
}

/// Received frames that may wait for the vCPU loop per network device; more are dropped.
const FRAME_BACKLOG: usize = 1024;

/// Opens the host side of the virtio devices: disk images and TAPs, in device order.
fn open_virtio(config: &VmConfig, open_taps: bool) -> Result<(VirtioBackends, Vec<Tap>)> {
    legacy::virtio_layout(config.nets.len() + config.disks.len() + usize::from(config.rng))?;
    let macs: Vec<MacAddr> =
        config.nets.iter().enumerate().map(|(i, n)| n.mac.unwrap_or_else(|| MacAddr::default_for(i))).collect();
    for (i, net) in config.nets.iter().enumerate() {
        let dup = |why: String| Error::DeviceOption { option: "net", text: format!("tap={}", net.tap), why };
        if config.nets[..i].iter().any(|n| n.tap == net.tap) {
            return Err(dup("the same TAP is named twice".into()));
        }
        if macs[..i].contains(&macs[i]) {
            return Err(dup(format!("MAC {} is already used by another network device", macs[i])));
        }
    }
    let taps = if open_taps {
        config.nets.iter().map(|net| Tap::open(&net.tap)).collect::<std::result::Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let mut disks = Vec::new();
    for disk in &config.disks {
        disks.push((crate::disk::TrackedDisk::new(RawFile::open(&disk.path, disk.readonly)?), disk.readonly));
    }
    Ok((VirtioBackends { nets: macs, disks, rng: config.rng }, taps))
}

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
            let file =
                File::create(path).map_err(|e| Error::Console(format!("cannot create {}: {e}", path.display())))?;
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

/// Wall-clock seconds since 1970: the RTC base when none is given.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
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
                .map_err(|e| Error::Console(format!("cannot open {}: {e}", path.display())))?,
        ),
    })
}

/// Sends nowhere: a backup's network devices until it goes live.
struct NullSink;

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

// ---- The control API (ftvm-api, `--api-socket`) ----

/// The control block of the VM this process runs next, if its API server is up.
static CONTROL: std::sync::Mutex<Option<Arc<ftvm_api::VmControl>>> = std::sync::Mutex::new(None);

/// Connects the control API to the next VM this process runs (one VM per process, as with
/// the stop request): its vCPU publishes its figures there and honours pause requests, and
/// the pair's figures are read from its replication link.
pub fn attach_control(control: Arc<ftvm_api::VmControl>) {
    *CONTROL.lock().unwrap_or_else(|e| e.into_inner()) = Some(control);
}

/// The control block the next VM will take, without taking it.
pub(crate) fn current_control() -> Option<Arc<ftvm_api::VmControl>> {
    CONTROL.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn take_control() -> Option<Arc<ftvm_api::VmControl>> {
    CONTROL.lock().unwrap_or_else(|e| e.into_inner()).take()
}

fn api_role(journaling: &Journaling) -> ftvm_api::Role {
    match journaling {
        Journaling::Live => ftvm_api::Role::Standalone,
        Journaling::Record(_) => ftvm_api::Role::Recording,
        Journaling::Replay { .. } => ftvm_api::Role::Replaying,
        Journaling::Primary { .. } => ftvm_api::Role::Primary,
        Journaling::Backup { .. } => ftvm_api::Role::Backup,
    }
}

type PairSource = Box<dyn Fn() -> ftvm_api::PairFigures + Send + Sync>;

/// A primary's figures, from its link's counters (and its protection's).
pub(crate) fn primary_figures(
    stats: Arc<ftvm_replication::primary::PairStats>,
    protection: std::sync::Weak<crate::protect::Protection>,
) -> PairSource {
    use std::sync::atomic::Ordering::Relaxed;
    Box::new(move || {
        let lost = stats.backup_lost.load(Relaxed);
        let p = protection.upgrade();
        ftvm_api::PairFigures {
            protected: !lost && stats.protected.load(Relaxed),
            acked_lsn: Some(stats.acked_lsn.load(Relaxed)),
            sent_bytes: Some(stats.sent_bytes.load(Relaxed)),
            outputs_done: stats.outputs_done.load(Relaxed),
            backup_lost: lost,
            resyncs: p.as_ref().map_or(0, |p| p.resyncs()),
            failovers: p.as_ref().map_or(0, |p| p.failovers()),
            replay_lag_ms: (!lost).then(|| stats.lag_ms.load(Relaxed)),
            throttled_ms: Some(stats.throttled_us.load(Relaxed) / 1000),
            output_hold_us: {
                let n = stats.held_outputs.load(Relaxed);
                (n > 0).then(|| stats.hold_us.load(Relaxed) / n)
            },
            catching_up: !lost && !stats.protected.load(Relaxed),
            output_hold: Some({
                use ftvm_replication::primary::HOLD_BUCKETS_US;
                let mut counts = [0; 16];
                for (count, bucket) in counts.iter_mut().zip(&stats.hold_buckets) {
                    *count = bucket.load(Relaxed);
                }
                ftvm_api::HoldHistogram {
                    bounds_us: &HOLD_BUCKETS_US,
                    counts,
                    sum_us: stats.hold_us.load(Relaxed),
                    count: stats.held_outputs.load(Relaxed),
                }
            }),
            output_stages: {
                let f = stats.stages.lock().unwrap_or_else(|e| e.into_inner()).figures.clone();
                let figure = |name: &str, h: &ftvm_replication::stages::Histogram| {
                    ftvm_api::StageFigure::new(name, h.sum_ns, h.buckets().into_iter().map(|(b, c)| [b, c]).collect())
                };
                Some(ftvm_api::OutputStages {
                    hold: figure("hold", &f.hold),
                    stages: ftvm_replication::stages::STAGES
                        .iter()
                        .zip(&f.stages)
                        .map(|(name, h)| figure(name, h))
                        .collect(),
                })
            },
            ..Default::default()
        }
    })
}

/// A backup's figures, from its link's state.
fn backup_figures(state: Arc<ftvm_replication::backup::BackupState>) -> PairSource {
    use std::sync::atomic::Ordering::Relaxed;
    Box::new(move || {
        let (won, halted) = (state.won_arbiter.load(Relaxed), state.halted.load(Relaxed));
        ftvm_api::PairFigures {
            protected: !(won || halted || state.primary_ended.load(Relaxed)),
            received_lsn: Some(state.received_lsn.load(Relaxed)),
            received_bytes: Some(state.received_bytes.load(Relaxed)),
            outputs_done: state.outputs_done.load(Relaxed),
            halted,
            primary_silence_ms: (won || halted).then(|| state.silence_ms.load(Relaxed)),
            resyncs: state.resyncs.load(Relaxed),
            ..Default::default()
        }
    })
}

/// Builds and runs a VM: the whole of `ftvm run`.
pub fn run(config: VmConfig) -> Result<RunReport> {
    Vm::build(config)?.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options_parse() {
        assert_eq!("a.img".parse::<DiskConfig>().unwrap(), DiskConfig { path: "a.img".into(), readonly: false });
        assert_eq!(
            "/x/a.img,readonly".parse::<DiskConfig>().unwrap(),
            DiskConfig { path: "/x/a.img".into(), readonly: true }
        );
        for bad in ["", ",readonly", "a.img,rw", "a.img,"] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn net_options_parse() {
        let n: NetConfig = "tap=tap0".parse().unwrap();
        assert_eq!(n, NetConfig { tap: "tap0".into(), mac: None });
        let n: NetConfig = "tap=vm1,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(n.mac.unwrap().to_string(), "02:00:00:00:00:01");
        let n: NetConfig = "mac=02:00:00:00:00:01,tap=vm1".parse().unwrap();
        assert_eq!(n.tap, "vm1");
        for bad in
            ["", "tap0", "tap=", "mac=02:00:00:00:00:01", "tap=a,mac=zz", "tap=a,mac=ff:ff:ff:ff:ff:ff", "tap=a,x=1"]
        {
            let err = bad.parse::<NetConfig>().unwrap_err();
            assert!(err.to_string().contains("--net"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn duplicate_taps_and_macs_are_refused_before_anything_is_opened() {
        let config = |nets: Vec<NetConfig>| VmConfig {
            boot: BootSpec { kernel: "none".into(), initrd: None, cmdline: String::new() },
            mem_size: DEFAULT_MEM,
            console: ConsoleConfig::File("/dev/null".into()),
            rtc_base_unix: None,
            nets,
            disks: vec![],
            rng: false,
        };
        let net = |tap: &str, mac: Option<&str>| NetConfig { tap: tap.into(), mac: mac.map(|m| m.parse().unwrap()) };
        let err = open_virtio(&config(vec![net("nosuch0", None), net("nosuch0", None)]), true).err().unwrap();
        assert!(err.to_string().contains("named twice"), "{err}");
        let m = Some("02:00:00:00:00:01");
        let err = open_virtio(&config(vec![net("nosuch0", m), net("nosuch1", m)]), true).err().unwrap();
        assert!(err.to_string().contains("already used"), "{err}");
        let err = open_virtio(&config(vec![net("nosuch0", None)]), true).err().unwrap();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let mut c = config(vec![]);
        c.disks = (0..7).map(|i| DiskConfig { path: format!("d{i}").into(), readonly: false }).collect();
        let err = open_virtio(&c, true).err().unwrap();
        assert!(matches!(err, Error::Machine(ftvm_machine::Error::TooManyDevices { count: 7, .. })), "{err}");
    }
}
