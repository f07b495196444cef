//! virtio-net (device ID 1): queue 0 receives, queue 1 transmits. No offloads: the guest sees
//! plain Ethernet frames behind the 12-byte `virtio_net_hdr_v1` on both queues, and the MAC
//! address in the configuration space (VIRTIO_NET_F_MAC).
//!
//! **Transmit** (docs/architecture.md, "virtio"): at the QueueNotify exit the device copies each frame out
//! of guest memory and returns the descriptor at once, so completion never depends on the
//! host; the frame joins an output queue that the VMM drains after the exit (to the TAP now,
//! to the output-commit machinery later).
//!
//! **Receive**: frames are host inputs. The VMM admits one through the event source at a
//! counted exit, only when the device has a receive buffer, and hands it to
//! [`MmioTransport::deliver_frame`], which writes it into guest memory, returns the buffer and
//! pulses the interrupt line.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

use ftvm_devices::{ensure_same, ensure_state, HostInputs, IrqLines, StateError, Stateful};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_S_LINK_UP};
use vm_memory::GuestMemory;

use crate::queue::Queues;
use crate::{read_config_bytes, BadChain, Error, MmioTransport, VirtioDevice, VIRTIO_F_VERSION_1};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
/// sizeof(struct virtio_net_hdr_v1): the header in front of every frame on both queues.
pub const HEADER_LEN: usize = 12;
/// The smallest frame accepted for transmission: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// The largest frame either way (no GSO is offered; this allows jumbo MTUs up to 64 KiB).
pub const MAX_FRAME: usize = 65535;
/// Frames waiting for the VMM to take them; more are dropped (counted). The VMM drains the
/// queue after every exit, so only one notify's worth (a full ring) can pile up.
pub const MAX_TX_PENDING: usize = 2 * QUEUE_SIZE as usize;

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The default address of net device `index`: 52:54:00:12:34:56, 52:54:00:12:34:57, ...
    /// (locally administered, unicast).
    pub fn default_for(index: usize) -> Self {
        MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(index as u8)])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl FromStr for MacAddr {
    type Err = Error;

    /// Six two-digit hex bytes separated by `:` (or `-`); a multicast address is refused.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why| Error::Mac { text: s.into(), why };
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad("expected six bytes like 52:54:00:12:34:56"));
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(&parts) {
            if p.len() != 2 || !p.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad("each byte is two hex digits, e.g. 52:54:00:12:34:56"));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad("not hex"))?;
        }
        if mac[0] & 1 != 0 {
            return Err(bad("a multicast address (lowest bit of the first byte set) cannot name a NIC"));
        }
        if mac == [0; 6] {
            return Err(bad("the all-zero address cannot name a NIC"));
        }
        Ok(MacAddr(mac))
    }
}

/// Where transmitted frames go on the host (a TAP; a held-output queue in record mode).
pub trait FrameSink {
    /// Sends one frame without blocking; an error means the frame was not sent.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;

    /// Sends frames in order, as the guest sent them in one go (a sink may join them);
    /// how many were not sent, and the first error.
    fn send_all(&mut self, frames: &[Vec<u8>]) -> (u64, Option<std::io::Error>) {
        let mut failed = 0;
        let mut first = None;
        for frame in frames {
            if let Err(e) = self.send(frame) {
                failed += 1;
                first.get_or_insert(e);
            }
        }
        (failed, first)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Transmitted frames dropped: malformed chains, bad sizes, output queue full.
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Admitted frames that could not be delivered (receive buffer too small, none usable).
    pub rx_dropped: u64,
}

/// What became of a received frame handed to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    Delivered,
    /// Dropped: the reason, for logs.
    Dropped(&'static str),
}

/// A virtio-net device.
#[derive(Debug)]
pub struct Net {
    name: String,
    mac: MacAddr,
    tx_out: VecDeque<Vec<u8>>,
    stats: NetStats,
}

impl Net {
    pub fn new(mac: MacAddr, index: usize) -> Self {
        Net { name: format!("virtio-net{index}"), mac, tx_out: VecDeque::new(), stats: NetStats::default() }
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Takes the frames the guest transmitted since the last call, oldest first.
    pub fn take_tx_frames(&mut self) -> VecDeque<Vec<u8>> {
        std::mem::take(&mut self.tx_out)
    }

    pub fn has_tx_frames(&self) -> bool {
        !self.tx_out.is_empty()
    }

    fn transmit<M: GuestMemory>(&mut self, queues: &mut Queues<'_, M>) {
        let mem = queues.memory();
        while let Some(popped) = queues.pop(TX_QUEUE) {
            let chain = match popped {
                Ok(chain) if chain.writable.is_empty() => chain,
                Ok(chain) => {
                    self.stats.tx_dropped += 1;
                    let bad = BadChain { head: chain.head, reason: "device-writable buffer in a transmit request" };
                    queues.drop_chain(TX_QUEUE, bad, &self.name);
                    continue;
                }
                Err(bad) => {
                    self.stats.tx_dropped += 1;
                    queues.drop_chain(TX_QUEUE, bad, &self.name);
                    continue;
                }
            };
            // The descriptor is complete as soon as the frame is copied (length 0: the device
            // writes nothing into a transmit buffer).
            let len = chain.readable_len();
            let frame_len = (len as usize).saturating_sub(HEADER_LEN);
            let frame = if !(MIN_FRAME..=MAX_FRAME).contains(&frame_len) {
                tracing::debug!("{}: transmit of {len} bytes (header included) dropped", self.name);
                None
            } else {
                let mut frame = vec![0u8; frame_len];
                chain.read_at(mem, HEADER_LEN as u64, &mut frame).ok().map(|()| frame)
            };
            queues.add_used(TX_QUEUE, chain.head, 0);
            match frame {
                Some(frame) if self.tx_out.len() < MAX_TX_PENDING => {
                    tracing::trace!("{}: transmit of {} bytes", self.name, frame.len());
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += frame.len() as u64;
                    self.tx_out.push_back(frame);
                }
                _ => self.stats.tx_dropped += 1,
            }
        }
    }

    /// Writes a received frame into the next receive buffer. A buffer too small for the frame
    /// is left in the ring for a smaller frame and the frame is dropped; unusable chains are
    /// returned empty and the next one is tried.
    pub fn receive<M: GuestMemory>(&mut self, queues: &mut Queues<'_, M>, frame: &[u8]) -> RxOutcome {
        let outcome = self.try_receive(queues, frame);
        match outcome {
            RxOutcome::Delivered => {
                tracing::trace!("{}: received {} bytes", self.name, frame.len());
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += frame.len() as u64;
            }
            RxOutcome::Dropped(why) => {
                self.stats.rx_dropped += 1;
                tracing::debug!("{}: received frame of {} bytes dropped: {why}", self.name, frame.len());
            }
        }
        outcome
    }

    fn try_receive<M: GuestMemory>(&mut self, queues: &mut Queues<'_, M>, frame: &[u8]) -> RxOutcome {
        if frame.len() > MAX_FRAME {
            return RxOutcome::Dropped("frame larger than 64 KiB");
        }
        let mem = queues.memory();
        let needed = (HEADER_LEN + frame.len()) as u64;
        while let Some(popped) = queues.pop(RX_QUEUE) {
            let chain = match popped {
                Ok(chain) if chain.readable.is_empty() => chain,
                Ok(chain) => {
                    let bad = BadChain { head: chain.head, reason: "device-readable buffer in the receive queue" };
                    queues.drop_chain(RX_QUEUE, bad, &self.name);
                    continue;
                }
                Err(bad) => {
                    queues.drop_chain(RX_QUEUE, bad, &self.name);
                    continue;
                }
            };
            if chain.writable_len() < needed {
                queues.undo_pop(RX_QUEUE);
                return RxOutcome::Dropped("receive buffer too small");
            }
            // virtio_net_hdr_v1: no checksum or GSO work to describe; num_buffers = 1.
            let mut header = [0u8; HEADER_LEN];
            header[10..12].copy_from_slice(&1u16.to_le_bytes());
            let ok = chain.write_at(mem, 0, &header).is_ok() && chain.write_at(mem, HEADER_LEN as u64, frame).is_ok();
            if !ok {
                queues.add_used(RX_QUEUE, chain.head, 0);
                return RxOutcome::Dropped("receive buffer not writable");
            }
            queues.add_used(RX_QUEUE, chain.head, needed as u32);
            return RxOutcome::Delivered;
        }
        RxOutcome::Dropped("no receive buffer")
    }
}

/// The complete state of virtio-net: the MAC (checked, not restored: it is configuration),
/// transmitted frames the VMM has not taken yet (completed to the guest, so they must still
/// go out), and the counters. Receiving keeps nothing between frames: a frame is admitted by
/// the event source and written into a buffer within one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    mac: MacAddr,
    tx_pending: VecDeque<Vec<u8>>,
    stats: NetStats,
}

impl Stateful for Net {
    type State = NetState;

    fn save_state(&self) -> NetState {
        NetState { mac: self.mac, tx_pending: self.tx_out.clone(), stats: self.stats }
    }

    fn restore_state(&mut self, state: &NetState) -> Result<(), StateError> {
        ensure_same(&self.name, "MAC address", state.mac, self.mac)?;
        let pending = state.tx_pending.len();
        ensure_state!(
            pending <= MAX_TX_PENDING,
            &self.name,
            "{pending} transmitted frames pending, at most {MAX_TX_PENDING}"
        );
        for frame in &state.tx_pending {
            let len = frame.len();
            ensure_state!((MIN_FRAME..=MAX_FRAME).contains(&len), &self.name, "a pending frame of {len} bytes");
        }
        self.tx_out = state.tx_pending.clone();
        self.stats = state.stats;
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (1 << VIRTIO_NET_F_MAC)
    }

    /// struct virtio_net_config: mac[6], then status (u16, link up; only meaningful with
    /// VIRTIO_NET_F_STATUS, which is not offered).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac.0);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn reset(&mut self) {
        // Frames already copied out were completed to the guest: they still go out.
    }

    fn notify<M: GuestMemory>(&mut self, queue: u16, queues: &mut Queues<'_, M>, _inputs: &mut dyn HostInputs) {
        if usize::from(queue) == TX_QUEUE {
            self.transmit(queues);
        }
        // A notify on the receive queue only says buffers were added: the VMM looks for them
        // when it admits the next frame.
    }
}

impl<M: GuestMemory> MmioTransport<Net, M> {
    /// Whether a received frame could be delivered now (the device is live and the driver has
    /// given it a receive buffer). The VMM asks this before admitting a frame.
    pub fn rx_ready(&self) -> bool {
        self.queue_has_available(RX_QUEUE)
    }

    /// Delivers an admitted frame: into guest memory, onto the used ring, interrupt pulsed.
    pub fn deliver_frame(&mut self, frame: &[u8], irqs: &mut IrqLines) -> RxOutcome {
        self.with_queues(irqs, |net, queues| net.receive(queues, frame))
            .unwrap_or(RxOutcome::Dropped("device not live"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmio::regs;
    use crate::testing::*;

    const RX_RING: u64 = 0x10000;
    const TX_RING: u64 = 0x20000;
    const DATA: u64 = 0x100000;

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(3).wrapping_add(seed)).collect()
    }

    #[test]
    fn mac_addresses_parse_and_print() {
        let mac: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0, 0xab, 0xcd, 1]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:01");
        assert_eq!("02-00-00-00-00-09".parse::<MacAddr>().unwrap().0[5], 9);
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5g",
            "525:4:00:12:34:56",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert!(matches!(bad.parse::<MacAddr>(), Err(Error::Mac { .. })), "{bad:?}");
        }
        assert_eq!(MacAddr::default_for(0).to_string(), "52:54:00:12:34:56");
        assert_eq!(MacAddr::default_for(2).to_string(), "52:54:00:12:34:58");
    }

    #[test]
    fn config_space_holds_the_mac_and_only_mac_is_offered() {
        let mut h = Harness::new(Net::new(MacAddr::default_for(1), 1));
        let mut mac = [0u8; 6];
        h.read_bytes(crate::mmio::regs::CONFIG, &mut mac);
        assert_eq!(mac, MacAddr::default_for(1).0);
        assert_eq!(h.device_features(), VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC);
    }

    #[test]
    fn transmit_completes_at_once_and_yields_the_frame() {
        let mem = memory();
        let mut h = Harness::with_mem(Net::new(MacAddr::default_for(0), 0), &mem);
        let rx = Ring::new(&mem, RX_RING, 16);
        let mut tx = Ring::new(&mem, TX_RING, 16);
        h.activate(&[&rx, &tx]);
        let f1 = frame(60, 1);
        let f2 = frame(1514, 2);
        write_mem(&mem, DATA, &[0xee; HEADER_LEN]);
        write_mem(&mem, DATA + 0x100, &f1);
        write_mem(&mem, DATA + 0x1000, &[0xee; HEADER_LEN]);
        write_mem(&mem, DATA + 0x1000 + HEADER_LEN as u64, &f2);
        // Header and frame in separate buffers, then together in one.
        tx.add(&[r(DATA, HEADER_LEN as u32), r(DATA + 0x100, 60)]);
        tx.add(&[r(DATA + 0x1000, (HEADER_LEN + 1514) as u32)]);
        h.notify(TX_QUEUE as u32);
        assert_eq!(tx.take_used(), vec![(0, 0), (2, 0)], "both returned at the notify, length 0");
        assert_eq!(h.pulses(), 1);
        assert!(h.dev.device().has_tx_frames());
        let out: Vec<Vec<u8>> = h.dev.device_mut().take_tx_frames().into();
        assert_eq!(out, vec![f1, f2]);
        assert!(!h.dev.device().has_tx_frames());
        let s = h.dev.device().stats();
        assert_eq!((s.tx_frames, s.tx_bytes, s.tx_dropped), (2, 1574, 0));
        // Too short to be a frame, and a writable buffer on the transmit queue: dropped, but
        // still returned to the guest.
        tx.add(&[r(DATA, 20)]);
        tx.add(&[r(DATA, 12), w(DATA + 0x100, 60)]);
        h.notify(TX_QUEUE as u32);
        assert_eq!(tx.take_used().len(), 2);
        assert!(h.dev.device_mut().take_tx_frames().is_empty());
        assert_eq!(h.dev.device().stats().tx_dropped, 2);
        // A notify on the receive queue does not consume receive buffers.
        h.notify(RX_QUEUE as u32);
        assert_eq!(rx.used_idx(), 0);
    }

    #[test]
    fn receive_fills_a_buffer_and_pulses_the_irq() {
        let mem = memory();
        let mut h = Harness::with_mem(Net::new(MacAddr::default_for(0), 0), &mem);
        let mut rx = Ring::new(&mem, RX_RING, 16);
        let tx = Ring::new(&mem, TX_RING, 16);
        assert!(!h.dev.rx_ready(), "not live yet");
        h.activate(&[&rx, &tx]);
        assert!(!h.dev.rx_ready(), "no buffer yet");
        let mut irqs = IrqLines::default();
        assert_eq!(h.dev.deliver_frame(&frame(60, 0), &mut irqs), RxOutcome::Dropped("no receive buffer"));
        // Two buffers: one split in two, one of 2 KiB.
        let head = rx.add(&[w(DATA, 8), w(DATA + 0x100, 1518)]);
        rx.add(&[w(DATA + 0x1000, 2048)]);
        assert!(h.dev.rx_ready());
        let f = frame(1000, 9);
        assert_eq!(h.dev.deliver_frame(&f, &mut irqs), RxOutcome::Delivered);
        assert_eq!(irqs.drain().collect::<Vec<_>>(), vec![(IRQ, ftvm_devices::IrqChange::Pulse)]);
        assert_eq!(h.read(crate::mmio::regs::INTERRUPT_STATUS), 1);
        assert_eq!(rx.take_used(), vec![(u32::from(head), 1012)]);
        let mut hdr = read_mem(&mem, DATA, 8);
        hdr.extend(read_mem(&mem, DATA + 0x100, 4));
        assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "virtio_net_hdr_v1, num_buffers = 1");
        assert_eq!(read_mem(&mem, DATA + 0x104, 1000), f);
        // A frame too big for the next buffer is dropped; the buffer stays for the next one.
        assert_eq!(h.dev.deliver_frame(&frame(4000, 1), &mut irqs), RxOutcome::Dropped("receive buffer too small"));
        assert!(irqs.is_empty());
        assert!(h.dev.rx_ready());
        assert_eq!(h.dev.deliver_frame(&frame(64, 1), &mut irqs), RxOutcome::Delivered);
        assert_eq!(rx.take_used(), vec![(2, 76)]);
        assert!(!h.dev.rx_ready());
        let s = h.dev.device().stats();
        assert_eq!((s.rx_frames, s.rx_bytes, s.rx_dropped), (2, 1064, 2));
    }

    #[test]
    fn unusable_receive_buffers_are_returned_and_the_next_one_is_used() {
        let mem = memory();
        let mut h = Harness::with_mem(Net::new(MacAddr::default_for(0), 0), &mem);
        let mut rx = Ring::new(&mem, RX_RING, 16);
        let tx = Ring::new(&mem, TX_RING, 16);
        h.activate(&[&rx, &tx]);
        rx.add(&[r(DATA, 2048)]);
        rx.add(&[w(MEM_SIZE - 16, 2048)]);
        rx.add(&[w(DATA, 2048)]);
        let mut irqs = IrqLines::default();
        assert_eq!(h.dev.deliver_frame(&frame(100, 0), &mut irqs), RxOutcome::Delivered);
        assert_eq!(rx.take_used(), vec![(0, 0), (1, 0), (2, 112)]);
    }

    /// Sends frames of `lens` bytes through `tx` and delivers received ones of `rx_lens`;
    /// returns everything the guest and the VMM see of it.
    fn traffic(
        h: &mut Harness<Net>,
        mem: &Mem,
        rx: &mut Ring<'_>,
        tx: &mut Ring<'_>,
        lens: &[u32],
        rx_lens: &[usize],
    ) -> impl PartialEq + std::fmt::Debug {
        write_mem(mem, DATA, &[0; HEADER_LEN]);
        write_mem(mem, DATA + HEADER_LEN as u64, &frame(1500, 7));
        for &len in lens {
            tx.add(&[r(DATA, HEADER_LEN as u32 + len)]);
        }
        h.notify(TX_QUEUE as u32);
        let mut irqs = IrqLines::default();
        let outcomes: Vec<RxOutcome> =
            rx_lens.iter().map(|&len| h.dev.deliver_frame(&frame(len, len as u8), &mut irqs)).collect();
        let frames: Vec<Vec<u8>> = h.dev.device_mut().take_tx_frames().into();
        (
            outcomes,
            irqs,
            frames,
            rx.take_used(),
            tx.take_used(),
            mem_digest(mem, 0, MEM_SIZE as usize),
            h.pulses(),
            h.dev.device().stats(),
        )
    }

    #[test]
    fn state_keeps_untaken_frames_and_receive_buffers() {
        let mem = memory();
        let mut h = Harness::with_mem(Net::new(MacAddr::default_for(0), 0), &mem);
        let mut rx = Ring::new(&mem, RX_RING, 16);
        let mut tx = Ring::new(&mem, TX_RING, 16);
        h.activate(&[&rx, &tx]);
        // Saved with two frames sent but not taken by the VMM, two receive buffers available.
        traffic(&mut h, &mem, &mut rx, &mut tx, &[60, 40], &[]);
        tx.add(&[r(DATA, HEADER_LEN as u32 + 100)]);
        tx.add(&[r(DATA, HEADER_LEN as u32 + 200)]);
        h.notify(TX_QUEUE as u32);
        rx.add(&[w(DATA + 0x1000, 2048)]);
        rx.add(&[w(DATA + 0x2000, 2048)]);
        assert!(h.dev.device().has_tx_frames());
        assert_eq!(h.pulses(), 1);
        let twin_mem = fork_memory(&mem);
        let mut twin = h.fork(Net::new(MacAddr::default_for(0), 0), &twin_mem);
        let (mut twin_rx, mut twin_tx) = (rx.twin(&twin_mem), tx.twin(&twin_mem));
        assert_eq!(
            traffic(&mut h, &mem, &mut rx, &mut tx, &[14], &[100, 3000, 64, 64]),
            traffic(&mut twin, &twin_mem, &mut twin_rx, &mut twin_tx, &[14], &[100, 3000, 64, 64])
        );
        assert_eq!(h.dev.device().stats().tx_frames, 5);
        assert_eq!(h.dev.save_state(), twin.dev.save_state());
        assert_eq!(twin.dev.device().stats().rx_frames, 2, "both buffers used, the big frame and the last one dropped");
    }

    #[test]
    fn state_keeps_half_programmed_queue_registers() {
        let mem = memory();
        let mut h = Harness::with_mem(Net::new(MacAddr::default_for(0), 0), &mem);
        let mut rx = Ring::new(&mem, RX_RING, 16);
        let mut tx = Ring::new(&mem, TX_RING, 16);
        let features = h.device_features();
        assert!(h.negotiate(features));
        h.setup_queue(RX_QUEUE as u32, 16, rx.desc_addr(), rx.avail_addr(), rx.used_addr());
        // The transmit queue half programmed: size and descriptor table only.
        h.write(regs::QUEUE_SEL, TX_QUEUE as u32);
        h.write(regs::QUEUE_NUM, 16);
        h.write(regs::QUEUE_DESC_LOW, tx.desc_addr() as u32);
        let twin_mem = fork_memory(&mem);
        let mut twin = h.fork(Net::new(MacAddr::default_for(0), 0), &twin_mem);
        let (mut twin_rx, mut twin_tx) = (rx.twin(&twin_mem), tx.twin(&twin_mem));
        for g in [&mut h, &mut twin] {
            for (lo, addr) in [(regs::QUEUE_DRIVER_LOW, tx.avail_addr()), (regs::QUEUE_DEVICE_LOW, tx.used_addr())] {
                g.write(lo, addr as u32);
            }
            g.write(regs::QUEUE_READY, 1);
            g.driver_ok();
            assert!(g.dev.driver_ok());
        }
        rx.add(&[w(DATA + 0x1000, 2048)]);
        twin_rx.add(&[w(DATA + 0x1000, 2048)]);
        assert_eq!(
            traffic(&mut h, &mem, &mut rx, &mut tx, &[60, 70], &[80]),
            traffic(&mut twin, &twin_mem, &mut twin_rx, &mut twin_tx, &[60, 70], &[80])
        );
        assert_eq!(h.dev.device().stats().tx_frames, 2);
    }

    #[test]
    fn bad_net_states_are_refused() {
        let mem = memory();
        let mut h = Harness::with_mem(Net::new(MacAddr::default_for(0), 0), &mem);
        let state = h.dev.save_state();
        let mut other = Harness::with_mem(Net::new(MacAddr::default_for(1), 1), &mem);
        other.refused(&state, "MAC address: saved 52:54:00:12:34:56, this device 52:54:00:12:34:57");
        let mut s = state.clone();
        s.device_mut().tx_pending.push_back(vec![0; 10]);
        h.refused(&s, "a pending frame of 10 bytes");
        let mut s = state.clone();
        s.device_mut().tx_pending = std::iter::repeat_n(vec![0; 60], MAX_TX_PENDING + 1).collect();
        h.refused(&s, "513 transmitted frames pending, at most 512");
    }
}
