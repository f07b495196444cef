//! virtio-blk driver: synchronous reads, writes and flushes of 512-byte sectors.
//!
//! A call submits its requests (a large transfer is split into requests of at most
//! `MAX_REQUEST` bytes, several in flight at once), notifies the device once and waits for
//! all of them (`virtio::wait_used`). ftvm executes them at the notify exit, so the used
//! ring is complete when the notify returns and no interrupt is needed; QEMU completes
//! them on its own threads and the driver waits (spin, then interrupt or timer tick).
//! Caller buffers are used in place: all RAM is identity-mapped, so a pointer is a
//! guest-physical address.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use super::queue::{Buf, Virtqueue};
use super::{wait_used, Error, Transport, F_RING_EVENT_IDX};

/// Maximum size of one data segment is in `size_max`.
pub const F_SIZE_MAX: u64 = 1 << 1;
/// Maximum number of data segments per request is in `seg_max`.
pub const F_SEG_MAX: u64 = 1 << 2;
/// The device is read-only.
pub const F_RO: u64 = 1 << 5;
/// The device has a write cache that FLUSH empties.
pub const F_FLUSH: u64 = 1 << 9;
/// Sector size of the virtio-blk protocol (whatever the device's block size).
pub const SECTOR_SIZE: usize = 512;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const S_OK: u8 = 0;
/// Largest transfer put in one request.
const MAX_REQUEST: usize = 1 << 20;
/// Requests in flight at once.
const SLOTS: usize = 8;
const QUEUE_SIZE: u16 = 128;

/// A failed block operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// A write to a read-only device.
    ReadOnly,
    /// Past the end of the device.
    OutOfRange,
    /// A length that is not a whole number of sectors.
    Unaligned,
    /// The device answered with this status (1: I/O error, 2: unsupported).
    Status(u8),
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::ReadOnly => write!(f, "device is read-only"),
            BlkError::OutOfRange => write!(f, "past the end of the device"),
            BlkError::Unaligned => write!(f, "length is not a multiple of {SECTOR_SIZE}"),
            BlkError::Status(1) => write!(f, "I/O error"),
            BlkError::Status(2) => write!(f, "unsupported request"),
            BlkError::Status(status) => write!(f, "device status {status}"),
        }
    }
}

/// `virtio_blk_req` header.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ReqHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// Header and status byte of one in-flight request (at a stable heap address).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Slot {
    header: ReqHeader,
    status: u8,
}

/// Driver counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub requests: u64,
    pub notifies: u64,
}

/// A virtio-blk device, driven.
pub struct VirtioBlk {
    transport: Transport,
    queue: Virtqueue,
    capacity: u64,
    read_only: bool,
    has_flush: bool,
    /// Largest data segment, and data segments per request.
    size_max: usize,
    seg_max: usize,
    slots: Box<[Slot; SLOTS]>,
    chain: Vec<Buf>,
    stats: Stats,
}

impl VirtioBlk {
    /// Negotiates features (FLUSH, RO, segment limits where offered), sets up the queue
    /// and goes live.
    pub fn new(mut transport: Transport) -> Result<VirtioBlk, Error> {
        let features = transport.negotiate(0, F_SIZE_MAX | F_SEG_MAX | F_RO | F_FLUSH | F_RING_EVENT_IDX)?;
        let mut queue = transport.setup_queue(0, QUEUE_SIZE, features & F_RING_EVENT_IDX != 0)?;
        queue.set_interrupts(false);
        let capacity = transport.config_u64(0);
        let size_max = match transport.config_u32(8) {
            max if features & F_SIZE_MAX != 0 && max >= SECTOR_SIZE as u32 => max as usize & !(SECTOR_SIZE - 1),
            _ => MAX_REQUEST,
        };
        let seg_max = match transport.config_u32(12) {
            max if features & F_SEG_MAX != 0 && max > 0 => max as usize,
            _ => usize::from(queue.size()) - 2,
        };
        transport.driver_ok();
        let blk = VirtioBlk {
            transport,
            queue,
            capacity,
            read_only: features & F_RO != 0,
            has_flush: features & F_FLUSH != 0,
            size_max: size_max.clamp(SECTOR_SIZE, MAX_REQUEST),
            seg_max: seg_max.min(usize::from(QUEUE_SIZE) - 2),
            slots: Box::new([Slot::default(); SLOTS]),
            chain: Vec::new(),
            stats: Stats::default(),
        };
        crate::println!(
            "virtio: blk at {:#x} {}, {} sectors ({} MiB){}{}",
            blk.transport.base(),
            blk.transport.irq_text(),
            blk.capacity,
            blk.capacity >> 11,
            if blk.read_only { ", read-only" } else { "" },
            if blk.has_flush { ", flush" } else { "" }
        );
        Ok(blk)
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the device has a write cache (FLUSH negotiated).
    pub fn has_flush(&self) -> bool {
        self.has_flush
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Reads `buf.len()` bytes (a multiple of 512) from `sector` on.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.stats.reads += 1;
        self.transfer(T_IN, sector, buf.as_mut_ptr() as u64, buf.len())
    }

    /// Writes `data` (a multiple of 512 bytes) from `sector` on; durable only after `flush`
    /// when the device has a write cache.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), BlkError> {
        if self.read_only {
            return Err(BlkError::ReadOnly);
        }
        self.stats.writes += 1;
        self.transfer(T_OUT, sector, data.as_ptr() as u64, data.len())
    }

    /// Empties the device's write cache (nothing to do without FLUSH).
    pub fn flush(&mut self) -> Result<(), BlkError> {
        if !self.has_flush {
            return Ok(());
        }
        self.stats.flushes += 1;
        self.slots[0] = Slot { header: ReqHeader { kind: T_FLUSH, reserved: 0, sector: 0 }, status: 0xff };
        self.chain.clear();
        self.chain.push(Buf { addr: &self.slots[0].header as *const _ as u64, len: 16, write: false });
        self.chain.push(Buf { addr: &self.slots[0].status as *const u8 as u64, len: 1, write: true });
        self.queue.add(&self.chain).expect("the queue is idle between calls");
        self.complete(1)
    }

    /// Writes then flushes: the data is durable when this returns Ok.
    pub fn write_durable(&mut self, sector: u64, data: &[u8]) -> Result<(), BlkError> {
        self.write(sector, data)?;
        self.flush()
    }

    /// Runs one read or write of `len` bytes at `addr` as requests of at most MAX_REQUEST
    /// bytes, up to SLOTS at a time.
    fn transfer(&mut self, kind: u32, sector: u64, addr: u64, len: usize) -> Result<(), BlkError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlkError::Unaligned);
        }
        let sectors = (len / SECTOR_SIZE) as u64;
        if sector.checked_add(sectors).is_none_or(|end| end > self.capacity) {
            return Err(BlkError::OutOfRange);
        }
        let mut done = 0;
        while done < len {
            let mut batch = 0;
            while batch < SLOTS && done < len {
                let piece = (len - done).min(MAX_REQUEST).min(self.size_max * self.seg_max);
                let segments = piece.div_ceil(self.size_max);
                if usize::from(self.queue.num_free()) < segments + 2 {
                    break;
                }
                let slot = &mut self.slots[batch];
                *slot = Slot {
                    header: ReqHeader { kind, reserved: 0, sector: sector + (done / SECTOR_SIZE) as u64 },
                    status: 0xff,
                };
                self.chain.clear();
                self.chain.push(Buf { addr: &slot.header as *const _ as u64, len: 16, write: false });
                let mut offset = 0;
                while offset < piece {
                    let seg = (piece - offset).min(self.size_max);
                    let seg_addr = addr + (done + offset) as u64;
                    self.chain.push(Buf { addr: seg_addr, len: seg as u32, write: kind == T_IN });
                    offset += seg;
                }
                self.chain.push(Buf { addr: &slot.status as *const u8 as u64, len: 1, write: true });
                self.queue.add(&self.chain).expect("checked free descriptors");
                batch += 1;
                done += piece;
            }
            self.complete(batch)?;
        }
        Ok(())
    }

    /// Notifies the device of `count` queued requests (slots 0..count), waits for all of
    /// them and checks their status.
    fn complete(&mut self, count: usize) -> Result<(), BlkError> {
        self.stats.requests += count as u64;
        self.stats.notifies += u64::from(self.queue.kick());
        let mut finished = 0;
        while finished < count {
            wait_used(&self.transport, &mut self.queue);
            while let Some((head, _)) = self.queue.pop_used() {
                self.queue.free_chain(head);
                finished += 1;
            }
        }
        // The device wrote the status bytes before publishing the used entries; read them
        // volatile, as memory the compiler did not see change.
        // SAFETY: a valid, aligned u8 inside `slots`.
        let status = |slot: &Slot| unsafe { core::ptr::read_volatile(&slot.status) };
        match self.slots[..count].iter().map(status).find(|&status| status != S_OK) {
            Some(status) => Err(BlkError::Status(status)),
            None => Ok(()),
        }
    }
}
