//! virtio-rng driver: the guest's only entropy (the guest contract forbids RDRAND/RDSEED;
//! ftvm logs the bytes the device hands over, so a replay sees the same ones).

use super::queue::{Buf, Virtqueue};
use super::{wait_used, Error, Transport, F_RING_EVENT_IDX};

/// Largest request handed to the device at once.
const CHUNK: usize = 4096;

/// A virtio-rng device, driven.
pub struct VirtioRng {
    transport: Transport,
    queue: Virtqueue,
}

impl VirtioRng {
    /// Negotiates features, sets up the request queue and goes live.
    pub fn new(mut transport: Transport) -> Result<VirtioRng, Error> {
        let features = transport.negotiate(0, F_RING_EVENT_IDX)?;
        let mut queue = transport.setup_queue(0, 8, features & F_RING_EVENT_IDX != 0)?;
        queue.set_interrupts(false);
        transport.driver_ok();
        crate::println!("virtio: rng at {:#x} {}", transport.base(), transport.irq_text());
        Ok(VirtioRng { transport, queue })
    }

    /// Fills `buf` with bytes from the device (waiting for them as needed).
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let end = buf.len().min(done + CHUNK);
            let chunk = &mut buf[done..end];
            self.queue.add(&[Buf::write(chunk)]).expect("the queue is idle between calls");
            self.queue.kick();
            let written = loop {
                wait_used(&self.transport, &mut self.queue);
                if let Some((head, len)) = self.queue.pop_used() {
                    self.queue.free_chain(head);
                    break len as usize;
                }
            };
            // The device may hand over fewer bytes than asked: ask again for the rest.
            done += written.min(end - done);
        }
    }

    /// A random u64 from the device.
    pub fn u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        self.fill(&mut bytes);
        u64::from_le_bytes(bytes)
    }
}
