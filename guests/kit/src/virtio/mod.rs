//! virtio 1.x over the MMIO transport (version 2), driver side, in ring 3.
//!
//! Devices are announced on the command line the Linux way, one
//! `virtio_mmio.device=<size>@<addr>:<irq>` per device (ftvm and QEMU microvm both do).
//! Each window is made ring-3 accessible (`syscall::map_mmio`), probed, and handed to the
//! matching driver: [`net`], [`blk`] or [`rng`]. Every register access is an exit
//! (~25 us from ring 3 here), so drivers touch registers only to set up, to notify, and to
//! acknowledge an interrupt that actually fired; everything else goes through the rings
//! in RAM. Only modern devices are driven: VIRTIO_F_VERSION_1 must be offered.
//!
//! Interrupts: the device's IRQ is unmasked on the 8259 when it is an ISA line (see
//! `irq`); `Transport::service` acknowledges it in ring 3. Drivers look at their used
//! rings whatever the IRQ state, so they also work by polling (each timer tick).

pub mod blk;
pub mod net;
pub mod queue;
pub mod rng;

use alloc::vec::Vec;
use core::fmt;
use core::ptr::{read_volatile, write_volatile};

pub use queue::{Buf, Virtqueue};

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;

// MMIO register offsets (virtio 1.x, 4.2.2).
const REG_MAGIC: usize = 0x000;
const REG_VERSION: usize = 0x004;
const REG_DEVICE_ID: usize = 0x008;
const REG_DEVICE_FEATURES: usize = 0x010;
const REG_DEVICE_FEATURES_SEL: usize = 0x014;
const REG_DRIVER_FEATURES: usize = 0x020;
const REG_DRIVER_FEATURES_SEL: usize = 0x024;
const REG_QUEUE_SEL: usize = 0x030;
const REG_QUEUE_NUM_MAX: usize = 0x034;
const REG_QUEUE_NUM: usize = 0x038;
const REG_QUEUE_READY: usize = 0x044;
const REG_QUEUE_NOTIFY: usize = 0x050;
const REG_INTERRUPT_STATUS: usize = 0x060;
const REG_INTERRUPT_ACK: usize = 0x064;
const REG_STATUS: usize = 0x070;
const REG_QUEUE_DESC_LOW: usize = 0x080;
const REG_QUEUE_DESC_HIGH: usize = 0x084;
const REG_QUEUE_DRIVER_LOW: usize = 0x090;
const REG_QUEUE_DRIVER_HIGH: usize = 0x094;
const REG_QUEUE_DEVICE_LOW: usize = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: usize = 0x0a4;
const REG_CONFIG_GENERATION: usize = 0x0fc;
const REG_CONFIG: usize = 0x100;

// Device status bits.
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

/// Feature bits common to all devices.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// Device types (virtio 1.x, 5).
pub const DEVICE_NET: u32 = 1;
pub const DEVICE_BLOCK: u32 = 2;
pub const DEVICE_RNG: u32 = 4;

/// One `virtio_mmio.device=` entry of the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// Why a device could not be driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The window is outside 3-4 GiB or is the local APIC's page.
    Unmappable(u64),
    /// No virtio magic at the window.
    BadMagic(u32),
    /// A legacy (version 1) or unknown transport.
    Version(u32),
    /// The device does not offer a feature the driver needs.
    MissingFeatures(u64),
    /// The device refused the negotiated features.
    FeaturesRefused,
    /// A queue the driver needs is missing or already in use.
    NoQueue(u16),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unmappable(base) => write!(f, "window {base:#x} is not in 3-4 GiB (or is the local APIC)"),
            Error::BadMagic(magic) => write!(f, "no virtio magic ({magic:#x})"),
            Error::Version(1) => {
                write!(f, "legacy virtio-mmio transport (version 1); QEMU: -global virtio-mmio.force-legacy=false")
            }
            Error::Version(version) => write!(f, "unsupported virtio-mmio version {version}"),
            Error::MissingFeatures(bits) => write!(f, "device lacks required features {bits:#x}"),
            Error::FeaturesRefused => write!(f, "device refused the features"),
            Error::NoQueue(index) => write!(f, "queue {index} unavailable"),
        }
    }
}

/// Parses Linux's `memparse` sizes: a number with an optional K, M or G suffix.
fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    crate::cmdline::parse_u64(digits)?.checked_mul(1 << shift)
}

/// Parses `<size>@<addr>:<irq>[:<id>]`.
pub fn parse_device(text: &str) -> Option<MmioDevice> {
    let (size, rest) = text.split_once('@')?;
    let mut parts = rest.split(':');
    let base = crate::cmdline::parse_u64(parts.next()?)?;
    let irq = crate::cmdline::parse_u64(parts.next()?)?;
    Some(MmioDevice { base, size: parse_size(size)?, irq: u32::try_from(irq).ok()? })
}

/// The devices the command line announces, in order (malformed entries are reported and
/// skipped).
pub fn cmdline_devices() -> Vec<MmioDevice> {
    let mut devices = Vec::new();
    for (key, value) in crate::cmdline::params() {
        if key != "virtio_mmio.device" {
            continue;
        }
        match value.and_then(parse_device) {
            Some(device) => devices.push(device),
            None => crate::println!("virtio: ignoring malformed virtio_mmio.device={}", value.unwrap_or("")),
        }
    }
    devices
}

/// A probed virtio-mmio device, before or after a driver took it.
pub struct Transport {
    base: usize,
    irq: u32,
    device_id: u32,
    /// Whether the IRQ reaches us (an ISA line, unmasked on the 8259).
    irq_routed: bool,
}

impl Transport {
    /// Maps the window for ring 3 and reads its identity. `Ok(None)` for an empty slot
    /// (device ID 0, as QEMU microvm leaves unused transports).
    pub fn probe(device: &MmioDevice) -> Result<Option<Transport>, Error> {
        let last = device.base.saturating_add(device.size.max(0x100) - 1);
        // A window may straddle two 2 MiB pages.
        if !crate::syscall::map_mmio(device.base) || !crate::syscall::map_mmio(last) {
            return Err(Error::Unmappable(device.base));
        }
        let transport = Transport { base: device.base as usize, irq: device.irq, device_id: 0, irq_routed: false };
        let magic = transport.read(REG_MAGIC);
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let device_id = transport.read(REG_DEVICE_ID);
        if device_id == 0 {
            return Ok(None);
        }
        let version = transport.read(REG_VERSION);
        if version != 2 {
            return Err(Error::Version(version));
        }
        Ok(Some(Transport { device_id, ..transport }))
    }

    /// The virtio device type (`DEVICE_NET`, ...).
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// The MMIO window's address.
    pub fn base(&self) -> u64 {
        self.base as u64
    }

    /// The IRQ the command line gave.
    pub fn irq(&self) -> u32 {
        self.irq
    }

    /// "irq N", noting when the driver can only poll.
    pub fn irq_text(&self) -> alloc::string::String {
        match (self.irq, self.irq_routed) {
            (u32::MAX, _) => alloc::string::String::from("no irq (polled)"),
            (irq, true) => alloc::format!("irq {irq}"),
            (irq, false) => alloc::format!("irq {irq} (not on the 8259: polled)"),
        }
    }

    /// Whether the IRQ is delivered (else the driver only polls).
    pub fn irq_routed(&self) -> bool {
        self.irq_routed
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `probe` mapped the window for ring 3; registers are aligned u32s.
        unsafe { read_volatile((self.base + offset) as *const u32) }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as for `read`.
        unsafe { write_volatile((self.base + offset) as *mut u32, value) }
    }

    /// Resets the device and negotiates features: `required` must all be offered (else
    /// the device is marked FAILED), `wanted` are taken where offered. VERSION_1 is always
    /// required. Returns the negotiated set.
    pub fn negotiate(&mut self, required: u64, wanted: u64) -> Result<u64, Error> {
        self.write(REG_STATUS, 0);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut offered = 0u64;
        for word in 0..2 {
            self.write(REG_DEVICE_FEATURES_SEL, word);
            offered |= u64::from(self.read(REG_DEVICE_FEATURES)) << (32 * word);
        }
        let required = required | F_VERSION_1;
        if offered & required != required {
            self.write(REG_STATUS, STATUS_FAILED);
            return Err(Error::MissingFeatures(required & !offered));
        }
        let features = offered & (required | wanted);
        for word in 0..2 {
            self.write(REG_DRIVER_FEATURES_SEL, word);
            self.write(REG_DRIVER_FEATURES, (features >> (32 * word)) as u32);
        }
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.read(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            self.write(REG_STATUS, STATUS_FAILED);
            return Err(Error::FeaturesRefused);
        }
        Ok(features)
    }

    /// Sets up queue `index` with at most `max_size` entries (rounded down to a power of
    /// two) in fresh zeroed memory.
    pub fn setup_queue(&mut self, index: u16, max_size: u16, event_idx: bool) -> Result<Virtqueue, Error> {
        self.write(REG_QUEUE_SEL, u32::from(index));
        if self.read(REG_QUEUE_READY) != 0 {
            return Err(Error::NoQueue(index));
        }
        let device_max = self.read(REG_QUEUE_NUM_MAX).min(u32::from(u16::MAX));
        let limit = device_max.min(u32::from(max_size));
        if limit == 0 {
            return Err(Error::NoQueue(index));
        }
        // Split virtqueue sizes are powers of two.
        let size = 1u16 << (31 - limit.leading_zeros());
        let [desc, avail, used] = Virtqueue::layout(size);
        // Page-aligned parts: simple, and well above the spec's minimum alignments.
        let desc = crate::mem::alloc_zeroed(desc.0, 4096.max(desc.1)).as_mut_ptr();
        let avail = crate::mem::alloc_zeroed(avail.0, 4096.max(avail.1)).as_mut_ptr();
        let used = crate::mem::alloc_zeroed(used.0, 4096.max(used.1)).as_mut_ptr();
        self.write(REG_QUEUE_NUM, u32::from(size));
        for (low, address) in [(REG_QUEUE_DESC_LOW, desc), (REG_QUEUE_DRIVER_LOW, avail), (REG_QUEUE_DEVICE_LOW, used)]
        {
            let address = address as u64;
            self.write(low, address as u32);
            // The HIGH register follows its LOW one.
            self.write(low + 4, (address >> 32) as u32);
        }
        debug_assert_eq!(REG_QUEUE_DESC_HIGH, REG_QUEUE_DESC_LOW + 4);
        debug_assert_eq!(REG_QUEUE_DRIVER_HIGH, REG_QUEUE_DRIVER_LOW + 4);
        debug_assert_eq!(REG_QUEUE_DEVICE_HIGH, REG_QUEUE_DEVICE_LOW + 4);
        self.write(REG_QUEUE_READY, 1);
        let notify = (self.base + REG_QUEUE_NOTIFY) as *mut u32;
        // SAFETY: the three parts are fresh zeroed allocations of the layout's sizes, never
        // freed, and owned by the queue; `notify` is this mapped window's register.
        Ok(unsafe { Virtqueue::new(notify, index, size, desc.cast(), avail.cast(), used.cast(), event_idx) })
    }

    /// Sets DRIVER_OK (the device is live) and unmasks its IRQ where it can be delivered.
    pub fn driver_ok(&mut self) {
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        self.irq_routed = crate::irq::enable(self.irq);
    }

    /// Reads a device-specific configuration byte.
    pub fn config_u8(&self, offset: usize) -> u8 {
        // SAFETY: inside the mapped window; 8-bit access to configuration space is allowed.
        unsafe { read_volatile((self.base + REG_CONFIG + offset) as *const u8) }
    }

    /// Reads an aligned 32-bit configuration field.
    pub fn config_u32(&self, offset: usize) -> u32 {
        self.read(REG_CONFIG + offset)
    }

    /// Reads an aligned 64-bit configuration field as two halves, retrying if the device
    /// changed its configuration in between.
    pub fn config_u64(&self, offset: usize) -> u64 {
        loop {
            let generation = self.read(REG_CONFIG_GENERATION);
            let low = u64::from(self.config_u32(offset));
            let high = u64::from(self.config_u32(offset + 4));
            if self.read(REG_CONFIG_GENERATION) == generation {
                return low | high << 32;
            }
        }
    }

    /// If our IRQ fired since the last call, reads InterruptStatus and acknowledges it
    /// (two exits); true if it had fired. Call before draining the used rings, so that a
    /// buffer completed after the acknowledgement raises a fresh interrupt.
    pub fn service(&self) -> bool {
        if !crate::irq::take(self.irq) {
            return false;
        }
        let status = self.read(REG_INTERRUPT_STATUS);
        if status != 0 {
            self.write(REG_INTERRUPT_ACK, status);
        }
        true
    }
}

/// QEMU microvm's virtio-mmio transports: 512-byte windows from 0xfeb00000 (8 of them,
/// or 24 with its second I/O APIC). QEMU announces them on the command line only without
/// ACPI (`-M microvm,acpi=off`); with ACPI it describes them in tables this kit does not
/// read, so when the command line names no device the kit looks there itself.
const MICROVM_MMIO_BASE: u64 = 0xfeb0_0000;
const MICROVM_MMIO_SLOTS: u64 = 24;
const MICROVM_MMIO_SIZE: u64 = 0x200;

fn microvm_devices() -> Vec<MmioDevice> {
    // The IRQ is unknown (GSI 16 and up on the second I/O APIC, which the 8259 never
    // sees): these devices are polled.
    (0..MICROVM_MMIO_SLOTS)
        .map(|slot| MmioDevice {
            base: MICROVM_MMIO_BASE + slot * MICROVM_MMIO_SIZE,
            size: MICROVM_MMIO_SIZE,
            irq: u32::MAX,
        })
        .collect()
}

/// The first net, block and rng devices the command line announces, each driven.
#[derive(Default)]
pub struct Devices {
    pub net: Option<net::VirtioNet>,
    pub blk: Option<blk::VirtioBlk>,
    pub rng: Option<rng::VirtioRng>,
}

/// Finds, probes and initializes the devices of the command line, printing one line per
/// device (`virtio: net at 0xd0000000 irq 5 ...`) and per problem. Without any
/// `virtio_mmio.device=` it probes QEMU microvm's fixed windows instead.
pub fn init_devices() -> Devices {
    let mut devices = Devices::default();
    let mut announced = cmdline_devices();
    let probing = announced.is_empty();
    if probing {
        crate::println!("virtio: none on the command line; probing QEMU microvm's windows (polled, no IRQ)");
        announced = microvm_devices();
    }
    for device in announced {
        let transport = match Transport::probe(&device) {
            Ok(Some(transport)) => transport,
            Ok(None) => continue,
            // Probing where nothing was announced: an empty window is no news.
            Err(Error::BadMagic(_)) if probing => continue,
            Err(error) => {
                crate::println!("virtio: {:#x}: {error}", device.base);
                continue;
            }
        };
        let (kind, result) = match transport.device_id() {
            DEVICE_NET if devices.net.is_none() => {
                ("net", net::VirtioNet::new(transport).map(|net| devices.net = Some(net)))
            }
            DEVICE_BLOCK if devices.blk.is_none() => {
                ("blk", blk::VirtioBlk::new(transport).map(|blk| devices.blk = Some(blk)))
            }
            DEVICE_RNG if devices.rng.is_none() => {
                ("rng", rng::VirtioRng::new(transport).map(|rng| devices.rng = Some(rng)))
            }
            other => {
                crate::println!("virtio: {:#x}: device type {other} not driven", device.base);
                continue;
            }
        };
        if let Err(error) = result {
            crate::println!("virtio: {kind} at {:#x}: {error}", device.base);
        }
    }
    devices
}

/// How a driver waits for its one outstanding request: look at the used ring, spin a
/// little in ring 3 (a device on another host thread finishes within microseconds), then
/// sleep until an interrupt (its own, or the next timer tick when its IRQ does not come).
/// Interrupts are asked for only while waiting, so a device that completes at the notify
/// exit (ftvm) never raises one.
pub(crate) fn wait_used(transport: &Transport, queue: &mut Virtqueue) {
    const SPINS: u32 = 20_000;
    // Acknowledge an interrupt left over from the last wait: a level-triggered line (QEMU)
    // stays raised until then, and the 8259 (edge mode) would miss the next one.
    transport.service();
    if queue.has_used() {
        return;
    }
    queue.set_interrupts(true);
    crate::irq::set_wanted(transport.irq, true);
    while !queue.has_used() {
        let mut spins = 0;
        while spins < SPINS && !queue.has_used() {
            core::hint::spin_loop();
            spins += 1;
        }
        if !queue.has_used() {
            crate::time::idle();
        }
        transport.service();
    }
    crate::irq::set_wanted(transport.irq, false);
    queue.set_interrupts(false);
}
