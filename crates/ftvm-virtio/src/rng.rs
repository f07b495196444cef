//! virtio-rng (device ID 4): entropy for the guest.
//!
//! The bytes are host inputs: they come from [`HostInputs::entropy`] (the event source, which
//! logs them in record mode and replays them in replay mode), never from the host's random
//! device directly. Requests are served at the QueueNotify exit.

use ftvm_devices::{HostInputs, StateError, Stateful};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use vm_memory::GuestMemory;

use crate::queue::Queues;
use crate::{BadChain, VirtioDevice, VIRTIO_F_VERSION_1};

pub const QUEUE_SIZE: u16 = 256;
/// At most this many bytes per request: keeps each logged entropy event small.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngStats {
    pub requests: u64,
    pub bytes: u64,
    /// Requests answered empty because the host had no entropy to give.
    pub starved: u64,
    pub dropped: u64,
}

/// A virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    name: String,
    stats: RngStats,
}

impl Rng {
    pub fn new(index: usize) -> Self {
        Rng { name: format!("virtio-rng{index}"), stats: RngStats::default() }
    }

    pub fn stats(&self) -> RngStats {
        self.stats
    }
}

/// The complete state of virtio-rng: its counters. Requests are served within the notify, so
/// nothing is in flight between exits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    stats: RngStats,
}

impl Stateful for Rng {
    type State = RngState;

    fn save_state(&self) -> RngState {
        RngState { stats: self.stats }
    }

    fn restore_state(&mut self, state: &RngState) -> Result<(), StateError> {
        self.stats = state.stats;
        Ok(())
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn reset(&mut self) {}

    fn notify<M: GuestMemory>(&mut self, queue: u16, queues: &mut Queues<'_, M>, inputs: &mut dyn HostInputs) {
        let q = usize::from(queue);
        let mem = queues.memory();
        while let Some(popped) = queues.pop(q) {
            let chain = match popped {
                Ok(chain) if chain.readable.is_empty() => chain,
                Ok(chain) => {
                    self.stats.dropped += 1;
                    let bad = BadChain { head: chain.head, reason: "device-readable buffer in an entropy request" };
                    queues.drop_chain(q, bad, &self.name);
                    continue;
                }
                Err(bad) => {
                    self.stats.dropped += 1;
                    queues.drop_chain(q, bad, &self.name);
                    continue;
                }
            };
            let n = chain.writable_len().min(MAX_REQUEST as u64) as usize;
            let mut bytes = vec![0u8; n];
            self.stats.requests += 1;
            // One entropy input per request, so record mode logs one event for it.
            let len = if !inputs.entropy(&mut bytes) {
                self.stats.starved += 1;
                0
            } else if chain.write_at(mem, 0, &bytes).is_ok() {
                self.stats.bytes += n as u64;
                n as u32
            } else {
                0
            };
            queues.add_used(q, chain.head, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    const RING: u64 = 0x10000;
    const DATA: u64 = 0x100000;

    #[test]
    fn fills_buffers_with_entropy_from_the_host_inputs() {
        let mem = memory();
        let mut h = Harness::with_mem(Rng::new(0), &mem);
        assert_eq!(h.read(crate::mmio::regs::DEVICE_ID), 4);
        let mut ring = Ring::new(&mem, RING, 8);
        h.activate(&[&ring]);
        let head = ring.add(&[w(DATA, 10), w(DATA + 0x1000, 6)]);
        h.notify(0);
        assert_eq!(ring.take_used(), vec![(u32::from(head), 16)]);
        assert_eq!(h.pulses(), 1);
        // The bytes are exactly what the inputs (the event source) gave, in one call.
        let mut expected = TestInputs::default();
        let mut want = [0u8; 16];
        assert!(expected.entropy(&mut want));
        assert_eq!(h.inputs.entropy_calls, 1);
        assert_eq!(h.inputs.entropy_bytes, 16);
        assert_eq!(read_mem(&mem, DATA, 10), want[..10]);
        assert_eq!(read_mem(&mem, DATA + 0x1000, 6), want[10..]);
        assert_eq!(h.dev.device().stats().bytes, 16);
    }

    #[test]
    fn large_requests_are_capped_and_starvation_returns_nothing() {
        let mem = memory();
        let mut h = Harness::with_mem(Rng::new(0), &mem);
        let mut ring = Ring::new(&mem, RING, 8);
        h.activate(&[&ring]);
        ring.add(&[w(DATA, 1 << 20)]);
        h.notify(0);
        assert_eq!(ring.take_used(), vec![(0, MAX_REQUEST as u32)]);
        h.inputs.starve = true;
        ring.add(&[w(DATA, 64)]);
        h.notify(0);
        assert_eq!(ring.take_used(), vec![(1, 0)]);
        assert_eq!(h.dev.device().stats().starved, 1);
        // A device-readable buffer has no business in an entropy request.
        h.inputs.starve = false;
        let calls = h.inputs.entropy_calls;
        ring.add(&[r(DATA, 8), w(DATA + 8, 8)]);
        h.notify(0);
        assert_eq!(ring.take_used(), vec![(2, 0)]);
        assert_eq!(h.inputs.entropy_calls, calls, "no entropy consumed for a bad request");
    }
}
