//! Split virtqueues (virtio 1.x, 2.7), driver side.
//!
//! The rings live in identity-mapped RAM, so a buffer's guest-physical address is its
//! pointer. The device may run concurrently (QEMU's I/O threads) or only at our exits
//! (ftvm), so every shared field is accessed volatile with the barriers the spec asks for.
//! Notifications and interrupts cost exits, so the queue tracks what the device asked for:
//! `VIRTIO_F_EVENT_IDX` when negotiated, else the NO_NOTIFY / NO_INTERRUPT flags.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

/// The descriptor continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// The device writes the buffer (else it reads it).
pub const DESC_F_WRITE: u16 = 2;
/// Avail flags: the driver needs no interrupt (used without EVENT_IDX).
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used flags: the device needs no notification (used without EVENT_IDX).
const USED_F_NO_NOTIFY: u16 = 1;

/// One descriptor of the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One buffer of a chain: address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Buf {
    /// A buffer the device reads.
    pub fn read(data: &[u8]) -> Buf {
        Buf { addr: data.as_ptr() as u64, len: data.len() as u32, write: false }
    }

    /// A buffer the device writes.
    pub fn write(data: &mut [u8]) -> Buf {
        Buf { addr: data.as_mut_ptr() as u64, len: data.len() as u32, write: true }
    }
}

/// A split virtqueue: descriptor table, available ring, used ring.
pub struct Virtqueue {
    /// The transport's QueueNotify register.
    notify: *mut u32,
    index: u16,
    size: u16,
    desc: *mut Desc,
    /// flags, idx, ring[size], used_event
    avail: *mut u16,
    /// flags, idx, then ring[size] of (id: u32, len: u32), then avail_event
    used: *mut u16,
    event_idx: bool,
    /// Head of the free descriptor list (linked through `next`).
    free_head: u16,
    num_free: u16,
    /// The driver's copy of avail.idx.
    avail_idx: u16,
    /// avail.idx when the device was last notified (or found not to need it).
    kicked_idx: u16,
    /// Used entries consumed so far.
    last_used: u16,
    /// Whether the driver currently wants used-buffer interrupts.
    interrupts: bool,
}

// SAFETY: the raw pointers refer to memory owned by this queue for the guest's life (and
// to the device's MMIO window); the guest has one CPU and the queue is used by one owner.
unsafe impl Send for Virtqueue {}

impl Virtqueue {
    /// Bytes and alignment of the three parts for `size` entries (spec 2.7).
    pub fn layout(size: u16) -> [(usize, usize); 3] {
        let n = usize::from(size);
        [(16 * n, 16), (6 + 2 * n, 2), (6 + 8 * n, 4)]
    }

    /// Builds the driver side over zeroed ring memory the caller gave the device.
    ///
    /// # Safety
    /// `desc`, `avail` and `used` must point to zeroed memory of the sizes `layout(size)`
    /// gives, live for the guest's life and used by nothing else; `notify` must be the
    /// transport's QueueNotify register, mapped.
    pub(crate) unsafe fn new(
        notify: *mut u32,
        index: u16,
        size: u16,
        desc: *mut Desc,
        avail: *mut u16,
        used: *mut u16,
        event_idx: bool,
    ) -> Virtqueue {
        for i in 0..size {
            // SAFETY: i < size entries of the table (the caller's contract).
            unsafe { (*desc.add(usize::from(i))).next = i.wrapping_add(1) };
        }
        let mut queue = Virtqueue {
            notify,
            index,
            size,
            desc,
            avail,
            used,
            event_idx,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            interrupts: true,
        };
        queue.set_interrupts(true);
        queue
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Takes one free descriptor (for drivers that tie buffers to descriptor indices).
    pub fn alloc_desc(&mut self) -> Option<u16> {
        if self.num_free == 0 {
            return None;
        }
        let head = self.free_head;
        // SAFETY: head < size: free-list links are always valid indices.
        self.free_head = unsafe { (*self.desc.add(usize::from(head))).next };
        self.num_free -= 1;
        Some(head)
    }

    /// Writes descriptor `index`.
    pub fn set_desc(&mut self, index: u16, desc: Desc) {
        assert!(index < self.size);
        // SAFETY: index < size; the device does not own descriptors that are not in the
        // available ring.
        unsafe { write_volatile(self.desc.add(usize::from(index)), desc) };
    }

    /// Makes the chain starting at `head` available to the device (it sees it at once;
    /// the notification waits for `kick`).
    pub fn push_avail(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: slot < size; ring entries start at the third u16.
        unsafe { write_volatile(self.avail.add(2 + slot), head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The ring entry (and the descriptors before it) must be visible before the index.
        fence(Ordering::Release);
        // SAFETY: avail.idx is the second u16.
        unsafe { write_volatile(self.avail.add(1), self.avail_idx) };
    }

    /// Chains `bufs` through free descriptors and makes the chain available. `None` (and
    /// nothing changed) if there are not enough free descriptors.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > usize::from(self.num_free) {
            return None;
        }
        let head = self.free_head;
        let mut index = head;
        for (i, buf) in bufs.iter().enumerate() {
            // SAFETY: index comes from the free list (valid); descriptors are ours.
            let next = unsafe { (*self.desc.add(usize::from(index))).next };
            let last = i + 1 == bufs.len();
            let flags = if buf.write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            self.set_desc(index, Desc { addr: buf.addr, len: buf.len, flags, next: if last { 0 } else { next } });
            if last {
                self.free_head = next;
            }
            index = next;
        }
        self.num_free -= bufs.len() as u16;
        self.push_avail(head);
        Some(head)
    }

    /// Returns the chain starting at `head` to the free list.
    pub fn free_chain(&mut self, head: u16) {
        let mut index = head;
        loop {
            assert!(index < self.size, "virtqueue {}: bad descriptor {index}", self.index);
            // SAFETY: index < size (checked); the device gave the chain back.
            let desc = unsafe { read_volatile(self.desc.add(usize::from(index))) };
            self.num_free += 1;
            if desc.flags & DESC_F_NEXT == 0 {
                // SAFETY: as above.
                unsafe { (*self.desc.add(usize::from(index))).next = self.free_head };
                break;
            }
            index = desc.next;
        }
        self.free_head = head;
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: used.idx is the second u16 of the used ring.
        unsafe { read_volatile(self.used.add(1)) }
    }

    /// Whether the device has returned buffers not yet popped (a memory read, no exit).
    #[inline]
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Buffers made available and not yet returned by the device (or popped).
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// Pops the next used element: (head of the chain, bytes the device wrote). The chain
    /// stays allocated: give it back with `free_chain` once its buffers are done with.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        // Read the element only after seeing the index that publishes it.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: slot < size; elements start 4 bytes into the used ring (2 u16), 8 bytes each.
        let (id, len) = unsafe {
            let elem = (self.used.add(2) as *const u32).add(2 * slot);
            (read_volatile(elem), read_volatile(elem.add(1)))
        };
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx && self.interrupts {
            self.write_used_event(self.last_used);
        }
        assert!(id < u32::from(self.size), "virtqueue {}: device returned bad id {id}", self.index);
        Some((id as u16, len))
    }

    fn write_used_event(&mut self, value: u16) {
        // SAFETY: used_event follows the avail ring's `size` entries.
        unsafe { write_volatile(self.avail.add(2 + usize::from(self.size)), value) };
    }

    /// Asks for (or declines) used-buffer interrupts. A hint the device may ignore; after
    /// turning them on, look at the ring again (`has_used`) before waiting for one.
    pub fn set_interrupts(&mut self, on: bool) {
        self.interrupts = on;
        if self.event_idx {
            // With EVENT_IDX the device interrupts when used.idx passes used_event; one
            // behind the current position means "not for another 65535 buffers".
            let event = if on { self.last_used } else { self.last_used.wrapping_sub(1) };
            self.write_used_event(event);
        } else {
            // SAFETY: avail.flags is the first u16.
            unsafe { write_volatile(self.avail, if on { 0 } else { AVAIL_F_NO_INTERRUPT }) };
        }
        // The device must see the new setting before we read the used ring again.
        fence(Ordering::SeqCst);
    }

    /// Notifies the device of buffers made available since the last kick, if it asked to
    /// be (one MMIO write, an exit). Returns whether it wrote the notify register.
    pub fn kick(&mut self) -> bool {
        let old = self.kicked_idx;
        let new = self.avail_idx;
        if old == new {
            return false;
        }
        self.kicked_idx = new;
        // avail.idx must be visible before we read what the device asked for (store-load).
        fence(Ordering::SeqCst);
        let needed = if self.event_idx {
            // SAFETY: avail_event follows the used ring's `size` elements.
            let event = unsafe {
                read_volatile((self.used.add(2) as *const u32).add(2 * usize::from(self.size)) as *const u16)
            };
            // vring_need_event: the device asked to hear when avail.idx passes `event`.
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: used.flags is the first u16 of the used ring.
            let flags = unsafe { read_volatile(self.used) };
            flags & USED_F_NO_NOTIFY == 0
        };
        if needed {
            // SAFETY: `notify` is the mapped QueueNotify register (the constructor's contract).
            unsafe { write_volatile(self.notify, u32::from(self.index)) };
        }
        needed
    }

    /// Notifies the device unconditionally (for a device that may have given up waiting).
    pub fn kick_always(&mut self) {
        self.kicked_idx = self.avail_idx;
        fence(Ordering::SeqCst);
        // SAFETY: as in `kick`.
        unsafe { write_volatile(self.notify, u32::from(self.index)) };
    }
}
