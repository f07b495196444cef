//! virtio-net driver: one receive and one transmit queue, no offloads.
//!
//! Every frame is preceded by the 12-byte `virtio_net_hdr_v1` (all zero on transmit: no
//! checksum or segmentation offload). Each descriptor owns one fixed 2 KiB buffer, so a
//! frame never spans descriptors and the descriptor index names the buffer.
//!
//! Exits are what cost here, so: transmitted frames are only queued by `transmit_frame`
//! and the device is notified once per batch by `flush`; receive buffers are given back in
//! batches (when half the ring is out) with one notification; transmit completions raise
//! no interrupt and are reclaimed lazily; the IRQ is acknowledged only when it fired.
//! With the `net` feature, `VirtioNet` is a smoltcp `phy::Device` (see `crate::net`).

use alloc::boxed::Box;

use super::queue::{Desc, Virtqueue, DESC_F_WRITE};
use super::{Error, Transport, F_RING_EVENT_IDX};

/// The device reports its MAC address in configuration space.
pub const F_MAC: u64 = 1 << 5;
/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const HEADER_LEN: usize = 12;
/// Largest Ethernet frame without FCS at MTU 1500.
pub const MAX_FRAME: usize = 1514;
/// MAC used when the device does not offer one (locally administered).
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x66, 0x74, 0x76, 0x6d, 0x01];
const BUF_SIZE: usize = 2048;
const QUEUE_SIZE: u16 = 256;

/// Driver counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames dropped because every transmit buffer was still with the device.
    pub tx_dropped: u64,
    pub rx_notifies: u64,
    pub tx_notifies: u64,
    pub irqs: u64,
}

pub(crate) struct RxRing {
    queue: Virtqueue,
    buffers: *mut u8,
}

pub(crate) struct TxRing {
    queue: Virtqueue,
    buffers: *mut u8,
    /// Where a frame goes when no transmit buffer is free: it is dropped (TCP resends).
    scratch: Box<[u8; BUF_SIZE]>,
}

/// A virtio-net device, driven.
pub struct VirtioNet {
    transport: Transport,
    mac: [u8; 6],
    pub(crate) rx: RxRing,
    pub(crate) tx: TxRing,
    pub(crate) stats: Stats,
}

// SAFETY: the buffer pointers refer to allocations owned by the rings for the guest's
// life; the guest has one CPU.
unsafe impl Send for VirtioNet {}

fn buffer(base: *mut u8, index: u16) -> *mut u8 {
    base.wrapping_add(usize::from(index) * BUF_SIZE)
}

impl VirtioNet {
    /// Negotiates features, sets up both queues, fills the receive ring and goes live.
    pub fn new(mut transport: Transport) -> Result<VirtioNet, Error> {
        let features = transport.negotiate(0, F_MAC | F_RING_EVENT_IDX)?;
        let event_idx = features & F_RING_EVENT_IDX != 0;
        let rx_queue = transport.setup_queue(0, QUEUE_SIZE, event_idx)?;
        let mut tx_queue = transport.setup_queue(1, QUEUE_SIZE, event_idx)?;
        let mac = if features & F_MAC != 0 { core::array::from_fn(|i| transport.config_u8(i)) } else { DEFAULT_MAC };
        // Transmit completions need no interrupt: buffers are reclaimed when needed.
        tx_queue.set_interrupts(false);
        let rx_buffers = crate::mem::alloc_zeroed(usize::from(rx_queue.size()) * BUF_SIZE, 4096).as_mut_ptr();
        let tx_buffers = crate::mem::alloc_zeroed(usize::from(tx_queue.size()) * BUF_SIZE, 4096).as_mut_ptr();
        let mut net = VirtioNet {
            transport,
            mac,
            rx: RxRing { queue: rx_queue, buffers: rx_buffers },
            tx: TxRing { queue: tx_queue, buffers: tx_buffers, scratch: Box::new([0; BUF_SIZE]) },
            stats: Stats::default(),
        };
        net.rx.refill(true);
        net.transport.driver_ok();
        crate::irq::set_wanted(net.transport.irq(), true);
        // Receive buffers posted before DRIVER_OK: tell the device about them now.
        net.rx.queue.kick_always();
        net.stats.rx_notifies += 1;
        crate::println!(
            "virtio: net at {:#x} {}, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, queues {}+{}{}",
            net.transport.base(),
            net.transport.irq_text(),
            mac[0],
            mac[1],
            mac[2],
            mac[3],
            mac[4],
            mac[5],
            net.rx.queue.size(),
            net.tx.queue.size(),
            if event_idx { ", event-idx" } else { "" }
        );
        Ok(net)
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The transport (IRQ, address).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Acknowledges the IRQ if it fired; call before looking for frames.
    pub fn service(&mut self) -> bool {
        let fired = self.transport.service();
        self.stats.irqs += u64::from(fired);
        fired
    }

    /// Whether a received frame is waiting (a memory read, no exit).
    pub fn rx_ready(&self) -> bool {
        self.rx.queue.has_used()
    }

    /// Calls `f` with the next received frame (without the virtio header); `None` if there
    /// is none.
    pub fn receive_frame<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let (head, len) = self.rx.pop()?;
        self.stats.rx_frames += 1;
        Some(self.rx.consume(head, len, f))
    }

    /// Queues one frame of `len` bytes (at most `MAX_FRAME`) that `f` writes; the device
    /// hears of it at the next `flush`. Returns `f`'s result; the frame is dropped (and
    /// counted) if every buffer is still with the device.
    pub fn transmit_frame<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        self.tx.send(len, &mut self.stats, f)
    }

    /// Whether a transmit buffer is free (reclaiming finished ones, and pushing the queued
    /// frames out first if the ring is full).
    pub fn tx_ready(&mut self) -> bool {
        self.tx.ready(&mut self.stats)
    }

    /// Notifies the device of queued frames and returns receive buffers to it: call after
    /// each round of processing (at most two exits, usually one or none).
    pub fn flush(&mut self) {
        self.stats.tx_notifies += u64::from(self.tx.queue.kick());
        self.stats.rx_notifies += u64::from(self.rx.refill(false));
    }
}

impl RxRing {
    /// Gives every free buffer back to the device once half the ring is out (or `always`),
    /// with one notification if the device wants it. Returns whether it notified.
    fn refill(&mut self, always: bool) -> bool {
        if !always && self.queue.in_flight() > self.queue.size() / 2 {
            return false;
        }
        while let Some(index) = self.queue.alloc_desc() {
            let addr = buffer(self.buffers, index) as u64;
            self.queue.set_desc(index, Desc { addr, len: BUF_SIZE as u32, flags: DESC_F_WRITE, next: 0 });
            self.queue.push_avail(index);
        }
        self.queue.kick()
    }

    pub(crate) fn pop(&mut self) -> Option<(u16, usize)> {
        let (head, len) = self.queue.pop_used()?;
        Some((head, (len as usize).clamp(HEADER_LEN, BUF_SIZE)))
    }

    /// Hands the frame in buffer `head` to `f`, then frees the buffer.
    pub(crate) fn consume<R>(&mut self, head: u16, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        // SAFETY: the device returned buffer `head` (a BUF_SIZE allocation owned by this
        // ring) with `len` <= BUF_SIZE bytes written; nothing else touches it until freed.
        let frame =
            unsafe { core::slice::from_raw_parts(buffer(self.buffers, head).add(HEADER_LEN), len - HEADER_LEN) };
        let result = f(frame);
        self.queue.free_chain(head);
        result
    }
}

impl TxRing {
    fn reclaim(&mut self) {
        while let Some((head, _)) = self.queue.pop_used() {
            self.queue.free_chain(head);
        }
    }

    pub(crate) fn ready(&mut self, stats: &mut Stats) -> bool {
        if self.queue.num_free() > 0 {
            return true;
        }
        self.reclaim();
        if self.queue.num_free() == 0 {
            // Full ring: push the queued frames out (ftvm completes them at this exit).
            stats.tx_notifies += u64::from(self.queue.kick());
            self.reclaim();
        }
        self.queue.num_free() > 0
    }

    pub(crate) fn send<R>(&mut self, len: usize, stats: &mut Stats, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let len = len.min(MAX_FRAME);
        if !self.ready(stats) {
            stats.tx_dropped += 1;
            return f(&mut self.scratch[..len]);
        }
        let index = self.queue.alloc_desc().expect("ready() found a free descriptor");
        let base = buffer(self.buffers, index);
        // SAFETY: buffer `index` (BUF_SIZE bytes owned by this ring) is free: its
        // descriptor came off the free list. Its header bytes stay zero (never written).
        let frame = unsafe { core::slice::from_raw_parts_mut(base.add(HEADER_LEN), len) };
        let result = f(frame);
        let desc = Desc { addr: base as u64, len: (HEADER_LEN + len) as u32, flags: 0, next: 0 };
        self.queue.set_desc(index, desc);
        self.queue.push_avail(index);
        stats.tx_frames += 1;
        result
    }
}
