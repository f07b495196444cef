//! Deterministic randomized tests of everything a guest controls: descriptor tables, available
//! rings, queue registers and the register block itself. Each device's notify path (and the
//! net device's receive path) runs thousands of times on garbage; nothing may panic, and what
//! the device puts on the used ring must stay sane.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::block::{Block, BlockBackend};
use crate::mmio::regs;
use crate::net::{MacAddr, Net, RX_QUEUE, TX_QUEUE};
use crate::rng::{Rng, MAX_REQUEST};
use crate::testing::*;
use crate::VirtioDevice;
use ftvm_devices::Stateful;

/// splitmix64: small, fast, and the same sequence on every run.
#[derive(Clone)]
struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `percent` %.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const RINGS: u64 = 0x10000;
const DATA: u64 = 0x100000;
const HEADERS: u64 = 0x380000;

struct MemDisk(Vec<u8>);

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let o = offset as usize;
        self.0[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A queue as the fuzzing driver set it up.
#[derive(Debug, Clone, Copy)]
struct Layout {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

fn random_layout(rng: &mut Prng, q: usize) -> Layout {
    let size = 1u16 << rng.below(9);
    let base = RINGS + q as u64 * 0x10000;
    let mut l = Layout { size, desc: base, avail: base + 0x1000 * 2, used: base + 0x1000 * 3 };
    // Now and then a layout the device must refuse (or survive): odd sizes, misalignment,
    // rings outside memory or overlapping each other.
    if rng.chance(5) {
        match rng.below(5) {
            0 => l.size = rng.below(600) as u16,
            1 => l.desc += 1 + rng.below(15),
            2 => l.used = MEM_SIZE - rng.below(64),
            3 => l.avail = rng.next(),
            _ => l.used = l.desc,
        }
    }
    l
}

/// The driver's side of a fuzzing episode on one queue.
#[derive(Clone)]
struct Fuzzed {
    layout: Layout,
    avail_idx: u16,
}

fn read_u16(mem: &Mem, addr: u64) -> u16 {
    mem.read_obj::<u16>(GuestAddress(addr)).map(u16::from_le).unwrap_or(0)
}

/// Fills the descriptor table with random descriptors and publishes random heads. Returns
/// whether every descriptor points into the data area (then the device cannot have changed
/// the table while it worked, and used lengths can be checked against it).
fn scribble(rng: &mut Prng, mem: &Mem, f: &mut Fuzzed) -> (bool, u16) {
    let l = f.layout;
    // Rings that overlap let the device's used-ring writes change descriptors under it.
    let n = u64::from(l.size);
    let ranges = [(l.desc, 16 * n), (l.avail, 6 + 2 * n), (l.used, 6 + 8 * n)];
    let overlap = |a: (u64, u64), b: (u64, u64)| a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1);
    let mut clean = !overlap(ranges[0], ranges[1]) && !overlap(ranges[0], ranges[2]) && !overlap(ranges[1], ranges[2]);
    for i in 0..l.size {
        let addr = if rng.chance(40) {
            HEADERS + rng.below(16) * 16
        } else if rng.chance(94) {
            DATA + rng.below(0x200000)
        } else {
            clean = false;
            match rng.below(4) {
                0 => rng.next(),
                1 => MEM_SIZE - rng.below(0x100),
                2 => l.desc + rng.below(0x100),
                _ => 0,
            }
        };
        let len = match rng.below(100) {
            0..=1 => rng.next() as u32,
            2..=4 => 0,
            5..=20 => 1 + rng.below(16) as u32,
            21..=30 => 512 * (1 + rng.below(4) as u32),
            _ => rng.below(4096) as u32,
        };
        if addr < DATA || u64::from(len) + addr > HEADERS + 0x1000 {
            clean = false;
        }
        let mut flags = 0u16;
        if rng.chance(50) {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        if rng.chance(50) {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if rng.chance(2) {
            flags |= VRING_DESC_F_INDIRECT as u16;
        }
        let next = if rng.chance(95) { (i + 1 + rng.below(3) as u16) % l.size.max(1) } else { rng.next() as u16 };
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&raw, GuestAddress(l.desc + u64::from(i) * 16));
    }
    // Plausible block request headers for chains that start there.
    for slot in 0..16u64 {
        let kind = [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, rng.next() as u32]
            [rng.below(5) as usize];
        let sector = if rng.chance(90) { rng.below(80) } else { rng.next() };
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        let _ = mem.write_slice(&h, GuestAddress(HEADERS + slot * 16));
    }
    let count = if rng.chance(3) { rng.next() as u16 } else { rng.below(u64::from(l.size) + 1) as u16 };
    let size = l.size.max(1);
    for _ in 0..count.min(size) {
        let head = if rng.chance(97) { rng.below(u64::from(size)) as u16 } else { rng.next() as u16 };
        let at = l.avail + 4 + u64::from(f.avail_idx % size) * 2;
        let _ = mem.write_obj(u16::to_le(head), GuestAddress(at));
        f.avail_idx = f.avail_idx.wrapping_add(1);
    }
    if count > size {
        // Claim more than was written (and more than fits).
        f.avail_idx = f.avail_idx.wrapping_add(count - size);
    }
    let _ = mem.write_obj(u16::to_le(f.avail_idx), GuestAddress(l.avail + 2));
    let _ = mem.write_obj(u16::to_le(if rng.chance(10) { 1 } else { 0 }), GuestAddress(l.avail));
    (clean && count <= size, count)
}

/// The total device-writable length of the chain at `head`, walked the way the spec says.
fn writable_total(mem: &Mem, l: Layout, head: u16) -> u64 {
    let (mut idx, mut ttl, mut total) = (head, l.size, 0u64);
    while idx < l.size && ttl > 0 {
        let at = GuestAddress(l.desc + u64::from(idx) * 16);
        let len = mem.read_obj::<u32>(GuestAddress(at.0 + 8)).map(u32::from_le).unwrap_or(0);
        let flags = read_u16(mem, at.0 + 12);
        if flags & VRING_DESC_F_WRITE as u16 != 0 {
            total += u64::from(len);
        }
        if flags & VRING_DESC_F_NEXT as u16 == 0 {
            break;
        }
        idx = read_u16(mem, at.0 + 14);
        ttl -= 1;
    }
    total
}

/// Sets the device up with random layouts; returns the per-queue driver state.
fn bring_up<D: VirtioDevice>(rng: &mut Prng, h: &mut Harness<D>, queues: usize) -> Vec<Fuzzed> {
    h.write(regs::STATUS, 0);
    let features = h.device_features();
    let features = if rng.chance(3) { rng.next() } else { features };
    h.negotiate(features);
    let mut out = Vec::new();
    for q in 0..queues {
        let layout = random_layout(rng, q);
        // Zero the rings the driver is about to use, as a driver would.
        let _ = h.dev.memory().write_slice(&[0u8; 0x4000], GuestAddress(RINGS + q as u64 * 0x10000));
        h.setup_queue(q as u32, layout.size, layout.desc, layout.avail, layout.used);
        out.push(Fuzzed { layout, avail_idx: 0 });
    }
    h.driver_ok();
    out
}

fn needs_reset<D: VirtioDevice>(h: &mut Harness<D>) -> bool {
    h.read(regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET != 0
}

/// Random register traffic, including sizes and offsets the transport must ignore.
fn poke_registers<D: VirtioDevice>(rng: &mut Prng, h: &mut Harness<D>) {
    for _ in 0..rng.below(4) {
        let offset = if rng.chance(80) { rng.below(0x40) * 4 } else { rng.below(0x1000) };
        let len = [1usize, 2, 4, 8][rng.below(4) as usize];
        if rng.chance(50) {
            let mut data = vec![0u8; len];
            h.read_bytes(offset, &mut data);
        } else {
            // Skip status writes that would merely reset (they are exercised elsewhere).
            let value = rng.next().to_le_bytes();
            h.write_bytes(offset, &value[..len]);
        }
    }
}

/// The first half of a random round: the device brought up again now and then (always when it
/// needs a reset), then random descriptors and available entries for a random queue. Returns
/// the queue, what [`scribble`] returned, and whether the device was brought up again.
fn start_round<D: VirtioDevice>(
    rng: &mut Prng,
    h: &mut Harness<D>,
    queues: &mut Vec<Fuzzed>,
) -> (usize, bool, u16, bool) {
    let nq = h.dev.device().queue_max_sizes().len();
    let reset = needs_reset(h) || rng.chance(2);
    if reset {
        *queues = bring_up(rng, h, nq);
    }
    let q = rng.below(nq as u64) as usize;
    let (clean, published) = scribble(rng, h.dev.memory(), &mut queues[q]);
    (q, clean, published, reset)
}

/// The second half: random register traffic now and then, then the notify. Returns whether
/// registers were poked.
fn finish_round<D: VirtioDevice>(rng: &mut Prng, h: &mut Harness<D>, q: usize) -> bool {
    let poked = rng.chance(5);
    if poked {
        poke_registers(rng, h);
    }
    h.notify(q as u32);
    poked
}

/// Runs one device through `episodes` random set-ups of `rounds` notifies each, checking the
/// used ring after each notify of a queue in `strict` (queues whose notify consumes every
/// available chain). `check_len(queue, len, writable)` judges each used length.
fn fuzz_device<D: VirtioDevice>(
    seed: u64,
    episodes: usize,
    rounds: usize,
    strict: &[usize],
    make: impl Fn() -> D,
    check_len: impl Fn(usize, u32, u64) -> bool,
    mut after_notify: impl FnMut(&mut Prng, &mut Harness<D>),
) -> (u64, u64) {
    let mut rng = Prng(seed);
    let mem = memory();
    let (mut used_total, mut resets) = (0u64, 0u64);
    for _ in 0..episodes {
        let mut h = Harness::with_mem(make(), &mem);
        let nq = h.dev.device().queue_max_sizes().len();
        let mut queues = bring_up(&mut rng, &mut h, nq);
        for _ in 0..rounds {
            let (q, clean, published, reset) = start_round(&mut rng, &mut h, &mut queues);
            resets += u64::from(reset);
            let used_before = h.dev.queue(q).map_or(0, |q| q.next_used());
            let live = h.dev.driver_ok();
            // Writable totals as the table stands before the device runs.
            let l = queues[q].layout;
            let totals: Vec<u64> = (0..l.size).map(|head| writable_total(&mem, l, head)).collect();
            // Random register traffic (QueueReady toggles, resets) voids the expectations.
            let poked = finish_round(&mut rng, &mut h, q);
            after_notify(&mut rng, &mut h);
            let _ = h.pulses();
            let ready = h.dev.queue(q).is_some_and(|q| q.ready());
            if poked || !live || needs_reset(&mut h) || !ready || !strict.contains(&q) {
                continue;
            }
            // The device's count of used entries (memory may be scribbled over when rings overlap).
            let used_after = h.dev.queue(q).unwrap().next_used();
            let added = used_after.wrapping_sub(used_before);
            assert!(published <= l.size, "an avail index that ran ahead was accepted");
            assert_eq!(added, published, "every published chain is returned, once");
            used_total += u64::from(added);
            if !clean {
                continue;
            }
            assert_eq!(h.dev.queue(q).unwrap().used_idx(&mem, Ordering::Relaxed).unwrap().0, used_after);
            for i in 0..added {
                let at = l.used + 4 + u64::from(used_before.wrapping_add(i) % l.size) * 8;
                let id = mem.read_obj::<u32>(GuestAddress(at)).map(u32::from_le).unwrap();
                let len = mem.read_obj::<u32>(GuestAddress(at + 4)).map(u32::from_le).unwrap();
                assert!(id < u32::from(l.size), "used id {id} of a queue of {}", l.size);
                let total = totals[id as usize];
                assert!(u64::from(len) <= total, "used len {len} > writable {total}");
                assert!(check_len(q, len, total), "queue {q}: used len {len}, writable {total}");
            }
        }
    }
    (used_total, resets)
}

#[test]
fn fuzz_block_requests() {
    let disk: Vec<u8> = (0..64 * 512).map(|i| i as u8).collect();
    let (used, resets) = fuzz_device(
        1,
        150,
        30,
        &[0],
        || Block::new(MemDisk(disk.clone()), false, 0),
        |_, len, _| len >= 1 || len == 0,
        |_, _| {},
    );
    assert!(used > 10_000, "the fuzzer reached the devices: {used} completions");
    assert!(resets > 10);
}

#[test]
fn fuzz_readonly_block_requests() {
    let disk: Vec<u8> = vec![0x5a; 16 * 512];
    let (used, _) =
        fuzz_device(2, 60, 30, &[0], || Block::new(MemDisk(disk.clone()), true, 0), |_, _, _| true, |_, _| {});
    assert!(used > 3_000);
}

#[test]
fn fuzz_rng_requests() {
    let (used, _) = fuzz_device(
        3,
        150,
        30,
        &[0],
        || Rng::new(0),
        |_, len, total| len as usize <= MAX_REQUEST && u64::from(len) <= total,
        |_, _| {},
    );
    assert!(used > 10_000);
}

#[test]
fn fuzz_net_transmit_and_receive() {
    let mut frames = 0u64;
    let (used, _) = fuzz_device(
        4,
        150,
        30,
        &[TX_QUEUE],
        || Net::new(MacAddr::default_for(0), 0),
        // Transmit buffers are returned with length 0; receive buffers hold header + frame.
        |q, len, total| if q == TX_QUEUE { len == 0 } else { u64::from(len) <= total },
        |rng, h| {
            let sent = h.dev.device_mut().take_tx_frames();
            assert!(sent.iter().all(|f| (14..=65535).contains(&f.len())));
            frames += sent.len() as u64;
            // Deliver a few received frames whenever the device would take them.
            for _ in 0..rng.below(4) {
                if !h.dev.rx_ready() {
                    break;
                }
                let len = [0usize, 14, 60, 1514, 9000, 70000][rng.below(6) as usize];
                let mut irqs = ftvm_devices::IrqLines::default();
                let _ = h.dev.deliver_frame(&vec![0xab; len], &mut irqs);
            }
            let _ = h.dev.queue(RX_QUEUE);
        },
    );
    assert!(used > 3_000, "{used}");
    assert!(frames > 100, "some well-formed frames got through: {frames}");
}

/// Save and restore in the middle of random traffic. Each episode runs random rounds on one
/// transport, forks it at a random round (the state through JSON into a transport around
/// `twin_of(device)` over a copy of guest memory) and runs the same random rounds on both:
/// after each round the line changes, the transports' states and what `observe` sees must be
/// equal, and at the end all of guest memory (used rings, buffers) must be.
fn fuzz_fork<D: VirtioDevice>(
    seed: u64,
    episodes: usize,
    make: impl Fn() -> D,
    twin_of: impl Fn(&D) -> D,
    mut observe: impl FnMut(&mut Prng, &mut Harness<D>) -> Vec<Vec<u8>>,
) {
    let mut round = |rng: &mut Prng, h: &mut Harness<D>, queues: &mut Vec<Fuzzed>| {
        let (q, ..) = start_round(rng, h, queues);
        finish_round(rng, h, q);
        let seen = observe(rng, h);
        // Every register and the configuration space, as the driver would read them.
        let regs: Vec<u32> = (0..regs::CONFIG / 4).map(|i| h.read(i * 4)).collect();
        let mut config = [0u8; 16];
        h.read_bytes(regs::CONFIG, &mut config);
        (seen, regs, config, h.irqs.drain().collect::<Vec<_>>(), h.dev.save_state())
    };
    let mut rng = Prng(seed);
    let mut live_at_fork = 0;
    for _ in 0..episodes {
        let mem = memory();
        let mut h = Harness::with_mem(make(), &mem);
        let nq = h.dev.device().queue_max_sizes().len();
        let mut queues = bring_up(&mut rng, &mut h, nq);
        for _ in 0..rng.below(20) {
            round(&mut rng, &mut h, &mut queues);
        }
        live_at_fork += usize::from(h.dev.driver_ok());
        let twin_mem = fork_memory(&mem);
        let mut twin = h.fork(twin_of(h.dev.device()), &twin_mem);
        let (mut twin_rng, mut twin_queues) = (rng.clone(), queues.clone());
        for i in 0..20 {
            let a = round(&mut rng, &mut h, &mut queues);
            let b = round(&mut twin_rng, &mut twin, &mut twin_queues);
            assert_eq!(a, b, "round {i} after the restore");
        }
        assert!(
            mem_digest(&mem, 0, MEM_SIZE as usize) == mem_digest(&twin_mem, 0, MEM_SIZE as usize),
            "guest memory differs"
        );
    }
    assert!(live_at_fork > episodes / 2, "most forks happen on a live device: {live_at_fork} of {episodes}");
}

#[test]
fn fuzz_save_and_restore_block_mid_traffic() {
    let disk: Vec<u8> = (0..64 * 512).map(|i| i as u8).collect();
    fuzz_fork(
        11,
        40,
        || Block::new(MemDisk(disk.clone()), false, 0),
        |b| Block::new(MemDisk(b.backend().0.clone()), b.readonly(), 0),
        |_, h| vec![h.dev.device().backend().0.clone()],
    );
}

#[test]
fn fuzz_save_and_restore_rng_mid_traffic() {
    fuzz_fork(12, 40, || Rng::new(0), |_| Rng::new(0), |_, _| vec![]);
}

#[test]
fn fuzz_save_and_restore_net_mid_traffic() {
    let net = || Net::new(MacAddr::default_for(0), 0);
    fuzz_fork(
        13,
        40,
        net,
        |_| net(),
        |rng, h| {
            let mut seen: Vec<Vec<u8>> = h.dev.device_mut().take_tx_frames().into();
            for _ in 0..rng.below(4) {
                if !h.dev.rx_ready() {
                    break;
                }
                let len = [0usize, 14, 60, 1514, 9000][rng.below(5) as usize];
                let mut irqs = ftvm_devices::IrqLines::default();
                let outcome = h.dev.deliver_frame(&vec![0xab; len], &mut irqs);
                seen.push(format!("{outcome:?}, {} pulses", irqs.drain().count()).into_bytes());
            }
            seen
        },
    );
}
