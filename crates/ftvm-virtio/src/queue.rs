//! Virtqueue access for the devices: popping descriptor chains, validating them, copying data
//! in and out of them, and returning them on the used ring.
//!
//! Everything here is driven by guest-written memory, so nothing may panic: a chain that
//! breaks the rules comes back as a [`BadChain`] that the device completes with length 0
//! (the request is dropped), and a queue the device can no longer trust (avail index jumping
//! ahead by more than the queue size, a head index out of range, an unwritable used ring)
//! marks the device broken, which the transport turns into DEVICE_NEEDS_RESET.
//!
//! Every write into guest memory goes through vm-memory, so a bitmap-backed memory marks the
//! pages it touches dirty (docs/snapshots.md).

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// One validated descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A validated descriptor chain: device-readable descriptors first, then device-writable
/// ones, every descriptor non-empty and inside guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Desc>,
    pub writable: Vec<Desc>,
}

/// A chain the device refuses; it is returned to the guest unused (length 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChain {
    pub head: u16,
    pub reason: &'static str,
}

/// Copying into or out of a chain failed (guest memory changed under us or a length was wrong).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("descriptor chain too short or not accessible")]
pub struct ChainError;

fn total(descs: &[Desc]) -> u64 {
    descs.iter().map(|d| u64::from(d.len)).sum()
}

/// The pieces of `descs` that cover the byte range [offset, offset+len) of their
/// concatenation, or `None` if the descriptors are shorter than that.
fn pieces(descs: &[Desc], mut offset: u64, mut len: u64) -> Option<Vec<(GuestAddress, usize)>> {
    let mut out = Vec::new();
    for d in descs {
        if len == 0 {
            break;
        }
        let dlen = u64::from(d.len);
        if offset >= dlen {
            offset -= dlen;
            continue;
        }
        let n = (dlen - offset).min(len);
        out.push((d.addr.checked_add(offset)?, n as usize));
        offset = 0;
        len -= n;
    }
    (len == 0).then_some(out)
}

impl Chain {
    pub fn readable_len(&self) -> u64 {
        total(&self.readable)
    }

    pub fn writable_len(&self) -> u64 {
        total(&self.writable)
    }

    /// Copies `buf.len()` device-readable bytes starting at `offset` of the readable part.
    pub fn read_at<M: GuestMemory>(&self, mem: &M, offset: u64, buf: &mut [u8]) -> Result<(), ChainError> {
        let mut done = 0;
        for (addr, n) in pieces(&self.readable, offset, buf.len() as u64).ok_or(ChainError)? {
            mem.read_slice(&mut buf[done..done + n], addr).map_err(|_| ChainError)?;
            done += n;
        }
        Ok(())
    }

    /// Copies `data` into the device-writable part, starting at `offset` of it.
    pub fn write_at<M: GuestMemory>(&self, mem: &M, offset: u64, data: &[u8]) -> Result<(), ChainError> {
        let mut done = 0;
        for (addr, n) in pieces(&self.writable, offset, data.len() as u64).ok_or(ChainError)? {
            mem.write_slice(&data[done..done + n], addr).map_err(|_| ChainError)?;
            done += n;
        }
        Ok(())
    }
}

/// A device's queues and the guest memory they live in, for the duration of one operation
/// (a notify, or the delivery of a received frame).
pub struct Queues<'a, M> {
    mem: &'a M,
    queues: &'a mut [Queue],
    used: u32,
    broken: Option<String>,
}

impl<'a, M: GuestMemory> Queues<'a, M> {
    pub fn new(mem: &'a M, queues: &'a mut [Queue]) -> Self {
        Queues { mem, queues, used: 0, broken: None }
    }

    pub fn memory(&self) -> &'a M {
        self.mem
    }

    /// Whether queue `q` is ready and holds a chain the device has not taken yet.
    pub fn has_available(&self, q: usize) -> bool {
        queue_has_available(self.mem, self.queues.get(q))
    }

    /// Takes the next chain of queue `q`. `None` when the queue is empty, not ready, or broken
    /// (then [`Queues::broken`] says why).
    pub fn pop(&mut self, q: usize) -> Option<Result<Chain, BadChain>> {
        if self.broken.is_some() {
            return None;
        }
        let queue = self.queues.get_mut(q).filter(|queue| queue.ready())?;
        let size = queue.size();
        let desc_table = GuestAddress(queue.desc_table());
        let chain = match queue.iter(self.mem) {
            Ok(mut iter) => iter.next(),
            Err(e) => {
                self.fail(format!("queue {q}: {e}"));
                return None;
            }
        }?;
        let head = chain.head_index();
        if head >= size {
            // There is no way to return this head to the driver: the ring itself is corrupt.
            self.fail(format!("queue {q}: available ring names descriptor {head}, queue size {size}"));
            return None;
        }
        // Indirect tables are not offered (no VIRTIO_F_INDIRECT_DESC): refuse a head that uses
        // one rather than rely on the driver's good manners.
        let flags_addr = desc_table.checked_add(u64::from(head) * 16 + 12);
        let flags = flags_addr.and_then(|a| self.mem.read_obj::<u16>(a).ok()).map_or(0, u16::from_le);
        if flags & virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16 != 0 {
            return Some(Err(BadChain { head, reason: "indirect descriptor (VIRTIO_F_INDIRECT_DESC not offered)" }));
        }
        let mut out = Chain { head, readable: Vec::new(), writable: Vec::new() };
        let mut last_has_next = false;
        for desc in chain {
            last_has_next = desc.has_next();
            if desc.len() == 0 {
                return Some(Err(BadChain { head, reason: "zero-length descriptor" }));
            }
            if !self.mem.check_range(desc.addr(), desc.len() as usize, Permissions::Read) {
                return Some(Err(BadChain { head, reason: "buffer outside guest memory" }));
            }
            let d = Desc { addr: desc.addr(), len: desc.len() };
            if desc.is_write_only() {
                out.writable.push(d);
            } else if !out.writable.is_empty() {
                return Some(Err(BadChain { head, reason: "device-readable descriptor after a device-writable one" }));
            } else {
                out.readable.push(d);
            }
        }
        if out.readable.is_empty() && out.writable.is_empty() {
            return Some(Err(BadChain { head, reason: "empty chain" }));
        }
        if last_has_next {
            // virtio-queue stops a chain that loops (more links than the queue has entries),
            // names a next index beyond the table, or exceeds 4 GiB; the last descriptor it
            // gave still says NEXT.
            return Some(Err(BadChain { head, reason: "broken chain (loop, next index out of range, or over 4 GiB)" }));
        }
        Some(Ok(out))
    }

    /// Puts the last chain taken from queue `q` back (the device could not use it yet).
    pub fn undo_pop(&mut self, q: usize) {
        if let Some(queue) = self.queues.get_mut(q) {
            queue.go_to_previous_position();
        }
    }

    /// Returns a chain to the driver with `len` bytes written into it.
    pub fn add_used(&mut self, q: usize, head: u16, len: u32) {
        let Some(queue) = self.queues.get_mut(q) else { return };
        match queue.add_used(self.mem, head, len) {
            Ok(()) => self.used |= 1 << q,
            Err(e) => self.fail(format!("queue {q}: cannot add to the used ring: {e}")),
        }
    }

    /// Completes a refused chain: dropped, returned unused.
    pub fn drop_chain(&mut self, q: usize, bad: BadChain, device: &str) {
        tracing::debug!("{device}: queue {q}: dropping request at descriptor {}: {}", bad.head, bad.reason);
        self.add_used(q, bad.head, 0);
    }

    /// Marks the device broken: the transport sets DEVICE_NEEDS_RESET.
    pub fn fail(&mut self, why: String) {
        if self.broken.is_none() {
            self.broken = Some(why);
        }
    }

    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Whether used buffers were added to any queue the driver wants interrupts for.
    pub fn wants_interrupt(&self) -> bool {
        (0..self.queues.len()).any(|q| self.used & (1 << q) != 0 && !interrupts_suppressed(self.mem, &self.queues[q]))
    }

    /// Bit q set: chains were returned on queue q.
    pub fn used_mask(&self) -> u32 {
        self.used
    }
}

pub(crate) fn queue_has_available<M: GuestMemory>(mem: &M, queue: Option<&Queue>) -> bool {
    let Some(queue) = queue.filter(|q| q.ready()) else { return false };
    queue.avail_idx(mem, Ordering::Acquire).is_ok_and(|idx| idx.0 != queue.next_avail())
}

/// VRING_AVAIL_F_NO_INTERRUPT: without EVENT_IDX the driver may ask not to be interrupted
/// (the spec says the device SHOULD NOT then notify).
fn interrupts_suppressed<M: GuestMemory>(mem: &M, queue: &Queue) -> bool {
    mem.load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .is_ok_and(|flags| u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_ranges_across_descriptors() {
        let d = |a, l| Desc { addr: GuestAddress(a), len: l };
        let descs = [d(0x1000, 4), d(0x2000, 8), d(0x3000, 2)];
        assert_eq!(pieces(&descs, 2, 4).unwrap(), vec![(GuestAddress(0x1002), 2), (GuestAddress(0x2000), 2)]);
        assert_eq!(pieces(&descs, 12, 2).unwrap(), vec![(GuestAddress(0x3000), 2)]);
        assert_eq!(pieces(&descs, 0, 0).unwrap(), vec![]);
        assert!(pieces(&descs, 10, 5).is_none());
        assert!(pieces(&descs, 14, 1).is_none());
    }
}
