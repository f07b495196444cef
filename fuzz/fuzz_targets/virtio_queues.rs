//! The virtio devices must never panic, nor let a guest make them take unbounded host memory,
//! whatever the guest puts in its queues and registers (crates/ftvm-virtio: the MMIO transport,
//! queue.rs's chains, and the block, rng and net devices' request parsing). The fuzz input is
//! the guest: its memory, its queue layout and its register traffic.
//!
//! Input (little-endian):
//! ```text
//! [device u8: 0 block, 1 read-only block, 2 rng, 3 net]
//! [features u64: ANDed with what the device offers, unless its top bit is set (then as is)]
//! per queue (1, or 2 for net): [size u16][desc u32][avail u32][used u32]
//! [n u8] then n operations [op u8][arg u16]:
//!     0 notify queue arg; 1 a received frame of arg bytes (net);
//!     2 write (arg >> 8) to register (arg & 0xff) * 4; 3 bring the device up again
//! [the rest: guest memory from address 0; the rest of its 1 MiB is zero]
//! ```
//! Ring addresses are taken modulo 1 MiB + 4 KiB, so most lie in memory and some just past it.
//!
//! Properties: no panic (the device answers bad chains with an error status, drops them, or
//! sets DEVICE_NEEDS_RESET); the block backend is only asked for bytes within the disk (it
//! panics otherwise); the net device hands the host only frames of 14 to 65,535 bytes; each
//! notify returns no more chains than were published; used ids are within the queue.
#![no_main]

use ftvm_devices::{DeviceContext, IrqLines, ManualClock, MmioDevice};
use ftvm_virtio::block::{Block, BlockBackend};
use ftvm_virtio::mmio::regs;
use ftvm_virtio::net::{MacAddr, Net};
use ftvm_virtio::rng::Rng;
use ftvm_virtio::{MmioTransport, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress};

type Mem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

const MEM_SIZE: u64 = 1 << 20;
const DISK_SECTORS: usize = 64;

/// A disk in memory that panics on any access outside it: the device must bound requests.
struct MemDisk(Vec<u8>);

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let o = usize::try_from(offset).expect("an offset within the disk");
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let o = usize::try_from(offset).expect("an offset within the disk");
        self.0[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = self.0.len().min(N);
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

#[derive(Clone, Copy)]
struct Layout {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

struct Guest<D> {
    dev: MmioTransport<D, Mem>,
    inputs: ManualClock,
    irqs: IrqLines,
    features: u64,
    layouts: Vec<Layout>,
}

impl<D: VirtioDevice> Guest<D> {
    fn write(&mut self, offset: u64, value: u32) {
        let mut requests = Vec::new();
        let mut ctx = DeviceContext { inputs: &mut self.inputs, irqs: &mut self.irqs, requests: &mut requests };
        self.dev.mmio_write(&mut ctx, 0, offset, &value.to_le_bytes());
    }
    fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        let mut requests = Vec::new();
        let mut ctx = DeviceContext { inputs: &mut self.inputs, irqs: &mut self.irqs, requests: &mut requests };
        self.dev.mmio_read(&mut ctx, 0, offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// The driver's initialization (virtio spec §3.1.1), with the input's features and rings.
    fn bring_up(&mut self) {
        use virtio_status::*;
        self.write(regs::STATUS, 0);
        self.write(regs::STATUS, ACKNOWLEDGE);
        self.write(regs::STATUS, ACKNOWLEDGE | DRIVER);
        self.write(regs::DEVICE_FEATURES_SEL, 0);
        let low = self.read(regs::DEVICE_FEATURES);
        self.write(regs::DEVICE_FEATURES_SEL, 1);
        let offered = u64::from(low) | u64::from(self.read(regs::DEVICE_FEATURES)) << 32;
        let features = if self.features >> 63 != 0 { self.features } else { self.features & offered };
        for (sel, half) in [(0, features as u32), (1, (features >> 32) as u32)] {
            self.write(regs::DRIVER_FEATURES_SEL, sel);
            self.write(regs::DRIVER_FEATURES, half);
        }
        self.write(regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        for (q, l) in self.layouts.clone().into_iter().enumerate() {
            self.write(regs::QUEUE_SEL, q as u32);
            self.write(regs::QUEUE_NUM, u32::from(l.size));
            for (lo, addr) in
                [(regs::QUEUE_DESC_LOW, l.desc), (regs::QUEUE_DRIVER_LOW, l.avail), (regs::QUEUE_DEVICE_LOW, l.used)]
            {
                self.write(lo, addr as u32);
                self.write(lo + 4, (addr >> 32) as u32);
            }
            self.write(regs::QUEUE_READY, 1);
        }
        let status = self.read(regs::STATUS);
        self.write(regs::STATUS, status | DRIVER_OK);
    }
}

mod virtio_status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 64;
}

fn read_u16(mem: &Mem, addr: u64) -> u16 {
    mem.read_obj::<u16>(GuestAddress(addr)).map(u16::from_le).unwrap_or(0)
}

/// Whether `l`'s used ring overlaps its other rings (then the device's writes change what it
/// reads, and only "no panic" holds).
fn overlapping(l: Layout) -> bool {
    let n = u64::from(l.size);
    let r = [(l.desc, 16 * n), (l.avail, 6 + 2 * n), (l.used, 6 + 8 * n)];
    let over = |a: (u64, u64), b: (u64, u64)| a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1);
    over(r[0], r[2]) || over(r[1], r[2]) || over(r[0], r[1])
}

fn run<D: VirtioDevice>(device: D, input: &mut Input<'_>, queues: usize, mut after: impl FnMut(&mut Guest<D>, u16)) {
    let features = input.u64();
    let layouts: Vec<Layout> = (0..queues)
        .map(|_| {
            let size = input.u16();
            let mut a = || u64::from(input.u32()) % (MEM_SIZE + 0x1000);
            Layout { size, desc: a(), avail: a(), used: a() }
        })
        .collect();
    let ops: Vec<(u8, u16)> = (0..input.u8()).map(|_| (input.u8(), input.u16())).collect();
    let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory");
    let image = &input.0[..input.0.len().min(MEM_SIZE as usize)];
    mem.write_slice(image, GuestAddress(0)).expect("the image fits");
    let mut g = Guest {
        dev: MmioTransport::new(device, mem.clone(), 5),
        inputs: ManualClock(0),
        irqs: IrqLines::default(),
        features,
        layouts,
    };
    g.bring_up();
    for (op, arg) in ops {
        match op % 4 {
            0 => {
                let q = usize::from(arg) % queues;
                let l = g.layouts[q];
                // The device's own count of used entries (the guest may scribble on the ring's).
                let next_used = |g: &Guest<D>| g.dev.queue(q).map_or(0, |q| q.next_used());
                let (used_before, avail_before) = (next_used(&g), read_u16(&mem, l.avail + 2));
                g.write(regs::QUEUE_NOTIFY, q as u32);
                let healthy = g.dev.status() & virtio_status::NEEDS_RESET == 0 && g.dev.driver_ok();
                if healthy
                    && !overlapping(l)
                    && l.size.is_power_of_two()
                    && l.size <= 256
                    && avail_before == read_u16(&mem, l.avail + 2)
                {
                    let used_after = next_used(&g);
                    let added = used_after.wrapping_sub(used_before);
                    assert!(added <= l.size, "{added} chains used on a queue of {}", l.size);
                    for i in 0..added {
                        let at = l.used + 4 + u64::from(used_before.wrapping_add(i) % l.size) * 8;
                        if let Ok(id) = mem.read_obj::<u32>(GuestAddress(at)) {
                            assert!(u32::from_le(id) < u32::from(l.size), "used id {id} of a queue of {}", l.size);
                        }
                    }
                }
            }
            1 => after(&mut g, arg),
            2 => g.write(u64::from(arg & 0xff) * 4, u32::from(arg >> 8)),
            _ => g.bring_up(),
        }
        g.irqs.drain().for_each(drop);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    match input.u8() % 4 {
        kind @ (0 | 1) => {
            let disk: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| i as u8).collect();
            run(Block::new(MemDisk(disk), kind == 1, 0), &mut input, 1, |_, _| {});
        }
        2 => run(Rng::new(0), &mut input, 1, |_, _| {}),
        _ => run(Net::new(MacAddr::default_for(0), 0), &mut input, 2, |g, len| {
            let frames = g.dev.device_mut().take_tx_frames();
            assert!(frames.iter().all(|f| (14..=65535).contains(&f.len())), "a frame out of bounds");
            if g.dev.rx_ready() {
                let mut irqs = IrqLines::default();
                let _ = g.dev.deliver_frame(&vec![0xab; usize::from(len)], &mut irqs);
            }
        }),
    }
});
