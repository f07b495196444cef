//! Test support: a guest memory, a driver that programs a transport through its registers,
//! and virtqueues laid out with virtio-queue's `MockSplitQueue`.

use ftvm_devices::{DeviceContext, GuestClock, GuestNanos, HostInputs, IrqChange, IrqLines, MmioDevice, Stateful};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::mmio::regs;
use crate::{MmioTransport, VirtioDevice};

/// Guest memory like the VMM's: with a dirty bitmap.
pub type Mem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

pub const MEM_SIZE: u64 = 4 << 20;

pub fn memory() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Whether the VMM's bitmap marks the page holding `addr` dirty.
pub fn dirty(mem: &Mem, addr: u64) -> bool {
    let region = mem.find_region(GuestAddress(addr)).unwrap();
    (**region).bitmap().is_addr_set(addr as usize)
}

/// A second guest memory with the same contents, as a snapshot or a state transfer rebuilds it.
pub fn fork_memory(mem: &Mem) -> Mem {
    let copy = memory();
    write_mem(&copy, 0, &read_mem(mem, 0, MEM_SIZE as usize));
    copy
}

/// The state through JSON and back, as a snapshot file or a transfer carries it.
pub fn through_json<S: serde::Serialize + serde::de::DeserializeOwned>(state: &S) -> S {
    serde_json::from_str(&serde_json::to_string(state).expect("serialize")).expect("deserialize")
}

pub fn clear_dirty(mem: &Mem) {
    for region in mem.iter() {
        (**region).bitmap().reset();
    }
}

/// Host inputs for tests: a fixed clock and a counting, patterned entropy source.
#[derive(Debug, Default, Clone)]
pub struct TestInputs {
    pub entropy_calls: u64,
    pub entropy_bytes: u64,
    pub starve: bool,
}

impl GuestClock for TestInputs {
    fn now(&mut self) -> GuestNanos {
        0
    }
}

impl HostInputs for TestInputs {
    fn entropy(&mut self, buf: &mut [u8]) -> bool {
        if self.starve {
            return false;
        }
        self.entropy_calls += 1;
        for b in buf.iter_mut() {
            *b = (self.entropy_bytes as u8).wrapping_mul(13).wrapping_add(0xa5);
            self.entropy_bytes += 1;
        }
        true
    }
}

/// A transport with the context a vCPU loop would give it.
pub struct Harness<D> {
    pub dev: MmioTransport<D, Mem>,
    pub inputs: TestInputs,
    pub irqs: IrqLines,
}

pub const IRQ: u8 = 5;

impl<D: VirtioDevice> Harness<D> {
    pub fn new(device: D) -> Self {
        Self::with_mem(device, &memory())
    }

    /// A harness over (a handle to) `mem`, which the test keeps for its rings.
    pub fn with_mem(device: D, mem: &Mem) -> Self {
        Harness {
            dev: MmioTransport::new(device, mem.clone(), IRQ),
            inputs: TestInputs::default(),
            irqs: IrqLines::default(),
        }
    }

    /// A harness over `mem` (a copy of this one's memory) whose transport, built around
    /// `device`, is restored from this one's saved state, with the same host inputs: it must go
    /// on exactly as this one does.
    pub fn fork(&self, device: D, mem: &Mem) -> Self {
        let mut twin = Self::with_mem(device, mem);
        twin.inputs = self.inputs.clone();
        let state = through_json(&self.dev.save_state());
        assert_eq!(state, self.dev.save_state(), "JSON keeps the state exactly");
        twin.dev.restore_state(&state).expect("a saved state restores");
        assert_eq!(twin.dev.save_state(), state);
        twin
    }

    /// Restoring `state` fails with a message containing `needle` and changes nothing.
    pub fn refused(&mut self, state: &<MmioTransport<D, Mem> as Stateful>::State, needle: &str) {
        let before = self.dev.save_state();
        let err = self.dev.restore_state(state).expect_err(needle).to_string();
        assert!(err.contains(needle), "error {err:?} does not mention {needle:?}");
        assert_eq!(self.dev.save_state(), before, "a refused state changes nothing");
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        let mut requests = Vec::new();
        let mut ctx = DeviceContext { inputs: &mut self.inputs, irqs: &mut self.irqs, requests: &mut requests };
        self.dev.mmio_read(&mut ctx, 0, offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn read_bytes(&mut self, offset: u64, data: &mut [u8]) {
        let mut requests = Vec::new();
        let mut ctx = DeviceContext { inputs: &mut self.inputs, irqs: &mut self.irqs, requests: &mut requests };
        self.dev.mmio_read(&mut ctx, 0, offset, data);
    }

    pub fn write_bytes(&mut self, offset: u64, data: &[u8]) {
        let mut requests = Vec::new();
        let mut ctx = DeviceContext { inputs: &mut self.inputs, irqs: &mut self.irqs, requests: &mut requests };
        self.dev.mmio_write(&mut ctx, 0, offset, data);
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        self.write_bytes(offset, &value.to_le_bytes());
    }

    pub fn device_features(&mut self) -> u64 {
        self.write(regs::DEVICE_FEATURES_SEL, 0);
        let low = self.read(regs::DEVICE_FEATURES);
        self.write(regs::DEVICE_FEATURES_SEL, 1);
        u64::from(low) | u64::from(self.read(regs::DEVICE_FEATURES)) << 32
    }

    /// Status ACKNOWLEDGE | DRIVER, the given driver features, FEATURES_OK. Returns whether
    /// the device kept FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.write(regs::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write(regs::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        self.write(regs::DRIVER_FEATURES_SEL, 0);
        self.write(regs::DRIVER_FEATURES, features as u32);
        self.write(regs::DRIVER_FEATURES_SEL, 1);
        self.write(regs::DRIVER_FEATURES, (features >> 32) as u32);
        self.write(regs::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK);
        self.read(regs::STATUS) & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    /// Programs queue `q` with its size and ring addresses and sets QueueReady.
    pub fn setup_queue(&mut self, q: u32, size: u16, desc: u64, avail: u64, used: u64) {
        self.write(regs::QUEUE_SEL, q);
        self.write(regs::QUEUE_NUM, u32::from(size));
        for (lo, addr) in
            [(regs::QUEUE_DESC_LOW, desc), (regs::QUEUE_DRIVER_LOW, avail), (regs::QUEUE_DEVICE_LOW, used)]
        {
            self.write(lo, addr as u32);
            self.write(lo + 4, (addr >> 32) as u32);
        }
        self.write(regs::QUEUE_READY, 1);
    }

    pub fn driver_ok(&mut self) {
        let status = self.read(regs::STATUS);
        self.write(regs::STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    /// Negotiates every offered feature, sets up one ring per queue (from `rings`), DRIVER_OK.
    pub fn activate(&mut self, rings: &[&Ring<'_>]) {
        let features = self.device_features();
        assert!(self.negotiate(features));
        for (q, ring) in rings.iter().enumerate() {
            self.setup_queue(q as u32, ring.size, ring.desc_addr(), ring.avail_addr(), ring.used_addr());
        }
        self.driver_ok();
        assert!(self.dev.driver_ok());
    }

    pub fn notify(&mut self, q: u32) {
        self.write(regs::QUEUE_NOTIFY, q);
    }

    /// The number of pulses on the device's line since the last call.
    pub fn pulses(&mut self) -> usize {
        self.irqs
            .drain()
            .map(|(line, change)| {
                assert_eq!((line, change), (IRQ, IrqChange::Pulse));
            })
            .count()
    }
}

/// One buffer of a chain a test driver builds.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

pub fn r(addr: u64, len: u32) -> Buf {
    Buf { addr, len, writable: false }
}

pub fn w(addr: u64, len: u32) -> Buf {
    Buf { addr, len, writable: true }
}

/// A split virtqueue from the driver's side, laid out by `MockSplitQueue`.
pub struct Ring<'a> {
    pub mq: MockSplitQueue<'a, Mem>,
    pub mem: &'a Mem,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl<'a> Ring<'a> {
    pub fn new(mem: &'a Mem, at: u64, size: u16) -> Self {
        Ring {
            mq: MockSplitQueue::create(mem, GuestAddress(at), size),
            mem,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn desc_addr(&self) -> u64 {
        self.mq.desc_table_addr().0
    }
    pub fn avail_addr(&self) -> u64 {
        self.mq.avail_addr().0
    }
    pub fn used_addr(&self) -> u64 {
        self.mq.used_addr().0
    }

    /// Writes a raw descriptor.
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.mq.desc_table().store(index, RawDescriptor::from(Descriptor::new(addr, len, flags, next))).unwrap();
    }

    /// Puts `head` in the available ring without publishing it.
    pub fn push_avail(&mut self, head: u16) {
        self.mq.avail().ring().ref_at(usize::from(self.avail_idx % self.size)).unwrap().store(u16::to_le(head));
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes everything pushed so far (avail idx).
    pub fn publish(&self) {
        self.mq.avail().idx().store(u16::to_le(self.avail_idx));
    }

    /// Sets the avail idx to any value (for malformed-queue tests).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.publish();
    }

    /// Sets the avail ring's flags (VRING_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags(&self, flags: u16) {
        self.mem.write_obj(u16::to_le(flags), GuestAddress(self.avail_addr())).unwrap();
    }

    /// Builds a chain from `bufs` in fresh descriptors and makes it available. Returns its head.
    pub fn add(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if b.writable { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.set_desc(index, b.addr, b.len, flags, (index + 1) % self.size);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        self.push_avail(head);
        self.publish();
        head
    }

    /// The same ring, driver's bookkeeping included, in `mem`, a copy of this ring's memory.
    pub fn twin<'b>(&self, mem: &'b Mem) -> Ring<'b> {
        let start = self.desc_addr();
        // Laying the ring out zeroes it: copy it back from the original.
        let mq = MockSplitQueue::create(mem, GuestAddress(start), self.size);
        let len = (self.mq.end().0 - start) as usize;
        write_mem(mem, start, &read_mem(self.mem, start, len));
        let (size, next_desc, avail_idx, used_seen) = (self.size, self.next_desc, self.avail_idx, self.used_seen);
        Ring { mq, mem, size, next_desc, avail_idx, used_seen }
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mq.used().idx().load())
    }

    /// The used elements (id, len) added since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let idx = self.used_idx();
        while self.used_seen != idx {
            let e: VirtqUsedElem =
                self.mq.used().ring().ref_at(usize::from(self.used_seen % self.size)).unwrap().load();
            out.push((e.id(), e.len()));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

pub fn read_mem(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// A digest of guest memory, to compare memories without printing them.
pub fn mem_digest(mem: &Mem, addr: u64, len: usize) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    read_mem(mem, addr, len).hash(&mut h);
    h.finish()
}

pub fn write_mem(mem: &Mem, addr: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(addr)).unwrap();
}
