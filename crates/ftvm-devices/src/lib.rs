//! ftvm's deterministic device model.
//!
//! Every device is a state machine behind the [`bus::PioDevice`] / [`bus::MmioDevice`] traits.
//! Devices never touch the host: they read time only through [`GuestClock`] (which the VMM
//! backs with the event source, the single choke point for host inputs), raise interrupts by
//! recording line changes in [`IrqLines`], and hand their outputs (console bytes) to the VMM
//! through buffers the VMM drains. The same device code therefore runs unchanged in live,
//! record and replay mode. Every device's state can be saved and restored exactly
//! ([`state`]).

pub mod apic;
pub mod bus;
pub mod i8042;
pub mod pic;
pub mod pit;
pub mod power;
pub mod rtc;
pub mod state;
pub mod uart;

pub use bus::{Bus, BusError, DeviceContext, MmioDevice, PioDevice};
pub use state::{check_version, ensure_same, StateError, Stateful, DEVICE_STATE_VERSION};

/// Guest time in nanoseconds since the VM started.
pub type GuestNanos = u64;

/// The guest clock as devices see it.
///
/// `now()` is a *time-dependent read*: in record mode the event source logs the value it
/// returns (CLOCK event), in replay mode it returns the logged value. Devices call it only
/// when the guest reads a time-dependent register, never speculatively, so that the number
/// of clock events stays small and identical between record and replay.
pub trait GuestClock {
    fn now(&mut self) -> GuestNanos;
}

/// Every host input a device may ask for while it handles an access: the guest clock and
/// entropy (virtio-rng). The event source implements it; in record mode each call is logged,
/// in replay mode answered from the log.
pub trait HostInputs: GuestClock {
    /// Fills `buf` with entropy from the host. Returns false if the host has none to give
    /// (the device then reports an error to the guest rather than hand it predictable bytes).
    fn entropy(&mut self, buf: &mut [u8]) -> bool;
}

/// A clock that only moves when told to, with a fixed entropy pattern; for tests.
#[derive(Debug, Default, Clone)]
pub struct ManualClock(pub GuestNanos);

impl GuestClock for ManualClock {
    fn now(&mut self) -> GuestNanos {
        self.0
    }
}

impl HostInputs for ManualClock {
    fn entropy(&mut self, buf: &mut [u8]) -> bool {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(7);
        }
        true
    }
}

/// Something a device asks of the whole VM (not of one device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmRequest {
    /// The guest asked for a system reset (i8042 pulse on the reset line).
    Reset,
    /// The guest asked to power off (ftvm power port).
    PowerOff,
}

/// A device whose state changes with the passage of guest time (timer interrupts).
pub trait Timed {
    /// The guest time at which this device next needs [`Timed::on_time`], if any.
    fn next_deadline(&self) -> Option<GuestNanos>;
    /// Brings the device up to guest time `now`, raising the interrupts that became due.
    fn on_time(&mut self, now: GuestNanos, irqs: &mut IrqLines);
}

/// Interrupt line changes requested by devices during one exit, applied to the PIC by the VMM
/// afterwards (a device must not borrow the PIC while the PIC itself may be on the bus).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IrqLines {
    changes: Vec<(u8, IrqChange)>,
}

/// One change on an ISA interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqChange {
    /// Raise then lower the line: one edge for an edge-triggered input.
    Pulse,
    /// Hold the line at this level.
    Level(bool),
}

impl IrqLines {
    pub fn pulse(&mut self, irq: u8) {
        self.changes.push((irq, IrqChange::Pulse));
    }
    pub fn set_level(&mut self, irq: u8, high: bool) {
        self.changes.push((irq, IrqChange::Level(high)));
    }
    /// Takes the changes in the order they were made.
    pub fn drain(&mut self) -> std::vec::Drain<'_, (u8, IrqChange)> {
        self.changes.drain(..)
    }
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// ISA interrupt numbers of the legacy devices (the PC convention).
pub mod irq {
    pub const PIT: u8 = 0;
    pub const KEYBOARD: u8 = 1;
    pub const CASCADE: u8 = 2;
    pub const COM1: u8 = 4;
    pub const RTC: u8 = 8;
}

/// Guest-visible port numbers of the legacy devices.
pub mod ports {
    pub const PIC_MASTER: u16 = 0x20;
    pub const PIC_SLAVE: u16 = 0xa0;
    pub const PIC_ELCR: u16 = 0x4d0;
    pub const PIT: u16 = 0x40;
    pub const SYSTEM_CONTROL_B: u16 = 0x61;
    pub const I8042_DATA: u16 = 0x60;
    pub const I8042_COMMAND: u16 = 0x64;
    pub const CMOS: u16 = 0x70;
    pub const POST: u16 = 0x80;
    pub const COM1: u16 = 0x3f8;
    pub const POWER: u16 = 0x604;
    pub const PM_TIMER: u16 = 0x608;
}
