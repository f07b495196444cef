//! Building a VM from its configuration and running it to the end.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ftvm_events::EventSource;

use crate::boot::{self, BootSpec, KernelFormat, Loaded};
use crate::error::{Error, Result};
use crate::kick::{Doorbell, Kicker};
use crate::legacy::Devices;
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
    _vm: kvm_ioctls::VmFd,
    mem: memory::GuestMemoryMmap,
    loaded: Loaded,
    config: VmConfig,
}

impl Vm {
    /// Creates the VM: memory, CPUID and MSR policy, the kernel loaded, the vCPU at entry.
    pub fn build(config: VmConfig) -> Result<Self> {
        let kvm = kvm::open()?;
        let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        vm.set_tss_address(KVM_TSS_ADDR).map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        let mem = memory::allocate(config.mem_size)?;
        memory::register(&vm, &mem, false)?;
        msr::install_filter(&vm)?;
        let loaded = boot::load(&mem, &config.boot)?;
        let vcpu = vm.create_vcpu(0).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&cpuid::guest_cpuid(&kvm)?).map_err(Error::kvm("KVM_SET_CPUID2"))?;
        boot::setup_vcpu(&vcpu, &mem, loaded.entry)?;
        Ok(Vm { vcpu: Some(vcpu), _vm: vm, mem, loaded, config })
    }

    pub fn memory(&self) -> &memory::GuestMemoryMmap {
        &self.mem
    }

    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    /// Runs the guest on its vCPU thread until it stops.
    pub fn run(mut self) -> Result<RunReport> {
        let rtc_base = self
            .config
            .rtc_base_unix
            .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
        let kicker = Kicker::new()?;
        let doorbell = Arc::new(Doorbell::default());
        let (console, input) = open_console(&self.config.console, &kicker, &doorbell)?;
        let vcpu = self.vcpu.take().ok_or_else(|| Error::Thread("the VM already ran".into()))?;
        let started = Instant::now();
        let thread = std::thread::Builder::new()
            .name("ftvm-vcpu0".into())
            .spawn(move || -> Result<(VmOutcome, ExitStats, u64, kvm_ioctls::VcpuFd)> {
                // Devices live on this thread only (they are touched between exits).
                let devices = Devices::new(rtc_base)?;
                let mut events = EventSource::live(rtc_base);
                if let Some(rx) = input {
                    events.attach_console_input(rx);
                }
                let mut vloop = VcpuLoop::new(vcpu, devices, events, console, kicker, doorbell, Delivery::Prompt);
                let outcome = vloop.run()?;
                let exits = vloop.events.exit_index();
                Ok((outcome, vloop.stats, exits, vloop.vcpu))
            })
            .map_err(|e| Error::Thread(format!("cannot start the vCPU thread: {e}")))?;
        let (outcome, stats, exits, vcpu) =
            thread.join().map_err(|_| Error::Thread("the vCPU thread panicked".into()))??;
        self.vcpu = Some(vcpu);
        Ok(RunReport { outcome, stats, exits, elapsed: started.elapsed(), format: self.loaded.format })
    }
}

/// Opens the console: the output sink and, for stdio, a thread that forwards standard input
/// to the event source (waking a halted vCPU and kicking a running one).
fn open_console(
    config: &ConsoleConfig,
    kicker: &Arc<Kicker>,
    doorbell: &Arc<Doorbell>,
) -> Result<(ConsoleSink, Option<mpsc::Receiver<Vec<u8>>>)> {
    match config {
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
                .map_err(|e| Error::Thread(format!("cannot start the console input thread: {e}")))?;
            Ok((Box::new(std::io::stdout()), Some(rx)))
        }
    }
}

/// Builds and runs a VM: the whole of `ftvm run`.
pub fn run(config: VmConfig) -> Result<RunReport> {
    Vm::build(config)?.run()
}
