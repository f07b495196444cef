//! ftvm's virtio devices: virtio 1.x (modern only) over the MMIO transport.
//!
//! - [`mmio::MmioTransport`]: the virtio-mmio register block (virtio spec §4.2.2), generic
//!   over the device behind it and the guest memory type; it implements
//!   [`ftvm_devices::MmioDevice`] so it sits on the VMM's MMIO bus like any other device.
//! - [`block::Block`] (virtio-blk), [`rng::Rng`] (virtio-rng), [`net::Net`] (virtio-net):
//!   state machines that run on the vCPU thread between exits (docs/architecture.md, "virtio").
//! - [`tap::Tap`]: the host side of virtio-net (a TAP interface); its reader thread hands
//!   received frames to the event source, never to the device directly; what the guest
//!   sends in one go is written with its TCP segments joined ([`coalesce`]).
//!
//! Every device's state, and the transport's with it, can be saved and restored exactly
//! ([`ftvm_devices::Stateful`], [`mmio::MmioTransportState`]).
//!
//! Devices touch guest memory only through vm-memory (so the VMM's dirty bitmap sees every
//! write), take host inputs only through [`ftvm_devices::HostInputs`] (the event source), and
//! never panic on guest input: bad requests get an error status or are dropped, and a queue
//! that cannot be trusted any more puts the device in DEVICE_NEEDS_RESET.

pub mod block;
pub mod coalesce;
mod error;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
pub mod tap;

pub use error::Error;
pub use mmio::MmioTransport;
pub use queue::{BadChain, Chain, Desc, Queues};

use ftvm_devices::{HostInputs, Stateful};
use vm_memory::GuestMemory;

/// VendorID register value: "FTVM" read as a little-endian u32.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"FTVM");

/// Size of each device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;

/// Feature bit: the device conforms to virtio 1.x (the only mode offered).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// A virtio device behind the MMIO transport.
///
/// Its [`Stateful::State`] is the device's own part of the transport's saved state
/// ([`mmio::MmioTransportState`]): whatever the device keeps between notifies (frames not yet
/// taken, counters). Configuration (a MAC, a disk's size) is checked on restore, not restored.
pub trait VirtioDevice: Stateful {
    /// Device ID (virtio spec §5: 1 net, 2 block, 4 rng).
    fn device_type(&self) -> u32;
    /// A short name for logs ("virtio-blk0").
    fn name(&self) -> &str;
    /// The maximum size of each queue (powers of two).
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits offered, VIRTIO_F_VERSION_1 included.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space at `offset` (bytes past its end read 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with these features accepted.
    fn activate(&mut self, _features: u64) {}
    /// The driver reset the device (status 0): forget everything in flight.
    fn reset(&mut self);
    /// The driver notified queue `queue` (a QueueNotify write, after DRIVER_OK). Runs at the
    /// exit itself, synchronously.
    fn notify<M: GuestMemory>(&mut self, queue: u16, queues: &mut Queues<'_, M>, inputs: &mut dyn HostInputs);
}

/// Copies bytes of a configuration structure for a config space read at `offset`.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod testing;
