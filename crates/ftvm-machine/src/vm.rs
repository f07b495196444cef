//! Building a VM from its configuration and running it to the end.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ftvm_virtio::block::RawFile;
use ftvm_virtio::net::MacAddr;
use ftvm_virtio::tap::Tap;

use crate::boot::{self, BootSpec, Loaded};
use crate::error::{Error, Result};
use crate::legacy::{self, VirtioBackends, VirtioSlot};
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
    disks: Vec<DiskHandle>,
    /// The state to continue from, for a VM restored from a snapshot (applied on the vCPU
    /// thread before the guest runs).
    restore: Option<Box<crate::state::VmState>>,
    /// Recording: how sync points deliver events to a guest that does not exit (`None`:
    /// never; events wait for the next exit).
    sync_policy: Option<crate::vcpu::syncpoint::SyncPolicy>,
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
            .map(|(c, (d, _))| DiskHandle { path: c.path.clone(), readonly: c.readonly, tracker: d.tracker() })
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
            sync_policy: Some(crate::vcpu::syncpoint::SyncPolicy::default()),
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
    pub fn continue_from(&mut self, state: crate::state::VmState) {
        self.restore = Some(Box::new(state));
    }

    /// Recording: the sync-point policy (`None` turns sync points off).
    pub fn set_sync_policy(&mut self, policy: Option<crate::vcpu::syncpoint::SyncPolicy>) {
        self.sync_policy = policy;
    }

    /// The disks with their dirty-block maps.
    pub fn disk_handles(&self) -> &[DiskHandle] {
        &self.disks
    }

    /// The dirty-page tracker over this VM's memory (one per run: every consumer subscribes).
    pub fn dirty_tracker(&self) -> crate::dirty::DirtyTracker {
        crate::dirty::DirtyTracker::new(self.vm_fd.clone(), self.mem.clone())
    }

    /// The TAPs of the network devices, in device order (none for a replay).
    pub fn taps(&self) -> &[Tap] {
        &self.taps
    }

    /// The MSRs a saved vCPU state holds on this host.
    pub fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    /// Recording: the sync-point policy.
    pub fn sync_policy(&self) -> Option<crate::vcpu::syncpoint::SyncPolicy> {
        self.sync_policy
    }

    /// What the vCPU thread takes to run the VM once: the vCPU, the virtio backends and the
    /// state to continue from. A VM runs once ([`Error::AlreadyRan`] after).
    pub fn take_run_parts(&mut self) -> Result<RunParts> {
        let vcpu = self.vcpu.take().ok_or(Error::AlreadyRan)?;
        let virtio = self.virtio.take().ok_or(Error::AlreadyRan)?;
        Ok(RunParts { vcpu, virtio, restore: self.restore.take() })
    }

    /// The vCPU back after a run (its state can still be read).
    pub fn return_vcpu(&mut self, vcpu: kvm_ioctls::VcpuFd) {
        self.vcpu = Some(vcpu);
    }
}

/// What a run takes from a built VM ([`Vm::take_run_parts`]).
pub struct RunParts {
    pub vcpu: kvm_ioctls::VcpuFd,
    pub virtio: VirtioBackends,
    pub restore: Option<Box<crate::state::VmState>>,
}

/// A disk with its dirty-block map (snapshots copy what changed).
#[derive(Clone)]
pub struct DiskHandle {
    pub path: PathBuf,
    pub readonly: bool,
    pub tracker: crate::disk::DiskTracker,
}

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

/// Wall-clock seconds since 1970: the RTC base when none is given.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Where a fresh live VM's guest clock starts so that the RTC, which shows
/// `rtc_base_unix` at guest time 0 and counts whole seconds of guest time, turns its
/// seconds with the host's: the host's wall time now, less the base. A base that is not
/// the host's recent past (`--rtc-base` some other date) starts the clock at 0, on the
/// given second exactly. A recording logs every clock read, so its replay needs nothing
/// of this.
pub fn guest_clock_start(rtc_base_unix: u64) -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    clock_start_at(now, rtc_base_unix)
}

fn clock_start_at(now_unix_ns: u128, rtc_base_unix: u64) -> u64 {
    const AT_MOST: u128 = 60 * 1_000_000_000;
    match now_unix_ns.checked_sub(u128::from(rtc_base_unix) * 1_000_000_000) {
        Some(into) if into < AT_MOST => into as u64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_clock_starts_where_the_rtc_second_turns_with_the_host() {
        // 0.25 s into the base second: the RTC turns at guest time 0.75 s, as the host does.
        assert_eq!(clock_start_at(1_700_000_000_250_000_000, 1_700_000_000), 250_000_000);
        // A base sampled a little earlier (the recording's header written first).
        assert_eq!(clock_start_at(1_700_000_003_500_000_000, 1_700_000_000), 3_500_000_000);
        // Some other date (--rtc-base): exactly that second at guest time 0.
        assert_eq!(clock_start_at(1_700_000_000_250_000_000, 1_600_000_000), 0);
        assert_eq!(clock_start_at(1_700_000_000_250_000_000, 1_800_000_000), 0);
    }

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
        assert!(matches!(err, Error::TooManyDevices { count: 7, .. }), "{err}");
    }
}
