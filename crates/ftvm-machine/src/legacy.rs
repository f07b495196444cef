//! The VM's device set: the legacy PC devices and their port map, and the virtio-mmio
//! devices with their MMIO windows and interrupt lines.

use std::cell::RefCell;
use std::rc::Rc;

use ftvm_devices::apic::{LocalApicRegisters, LAPIC_BASE, LAPIC_SIZE};
use ftvm_devices::i8042::I8042;
use ftvm_devices::pic::Pic;
use ftvm_devices::pit::Pit;
use ftvm_devices::power::{NullPort, PmTimer, PowerPort};
use ftvm_devices::rtc::Rtc;
use ftvm_devices::uart::Uart;
use ftvm_devices::{ports, Bus, GuestNanos, IrqLines, MmioDevice, PioDevice, Stateful, Timed};
use ftvm_virtio::block::Block;
use ftvm_virtio::net::{MacAddr, Net};
use ftvm_virtio::rng::Rng;
use ftvm_virtio::{MmioTransport, MMIO_WINDOW};

use crate::disk::TrackedDisk;
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;

/// A port range and the device behind it: (base, length, device).
type PortRange = (u16, u16, Rc<RefCell<dyn PioDevice>>);

/// The first virtio-mmio window; each device gets the next [`MMIO_WINDOW`] bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// ISA interrupt lines free for virtio devices on a PC (the rest belong to the legacy
/// devices, the cascade, or the conventional ATA/FPU/mouse lines), in the order handed out.
pub const VIRTIO_IRQS: [u8; 6] = [5, 6, 7, 9, 10, 11];

pub type NetDevice = MmioTransport<Net, GuestMemoryMmap>;
pub type BlockDevice = MmioTransport<Block<TrackedDisk>, GuestMemoryMmap>;
pub type RngDevice = MmioTransport<Rng, GuestMemoryMmap>;

/// Where one virtio device sits: its MMIO window and its ISA interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    pub addr: u64,
    pub irq: u8,
}

/// The slots of `count` virtio devices, in device order (nets, then disks, then rng).
pub fn virtio_layout(count: usize) -> Result<Vec<VirtioSlot>> {
    if count > VIRTIO_IRQS.len() {
        return Err(Error::TooManyDevices { count, max: VIRTIO_IRQS.len() });
    }
    Ok(VIRTIO_IRQS[..count]
        .iter()
        .enumerate()
        .map(|(i, &irq)| VirtioSlot { addr: VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW, irq })
        .collect())
}

/// The kernel command line with `virtio_mmio.device=4K@<addr>:<irq>` for each slot (the
/// convention of Linux, QEMU microvm and Firecracker). They go before a `--`, whose
/// followers are the init's arguments, not the kernel's.
pub fn virtio_cmdline(cmdline: &str, slots: &[VirtioSlot]) -> String {
    if slots.is_empty() {
        return cmdline.to_string();
    }
    let devices: Vec<String> =
        slots.iter().map(|s| format!("virtio_mmio.device={}K@{:#x}:{}", MMIO_WINDOW / 1024, s.addr, s.irq)).collect();
    let devices = devices.join(" ");
    let padded = format!(" {} ", cmdline.trim());
    match padded.find(" -- ") {
        Some(i) => format!("{} {devices} {}", padded[..i].trim(), padded[i..].trim()).trim().to_string(),
        None => format!("{} {devices}", cmdline.trim()).trim().to_string(),
    }
}

/// The virtio devices of a VM, by kind, in device order.
#[derive(Default)]
pub struct VirtioDevices {
    pub nets: Vec<Rc<RefCell<NetDevice>>>,
    pub disks: Vec<Rc<RefCell<BlockDevice>>>,
    pub rng: Option<Rc<RefCell<RngDevice>>>,
}

/// The host resources behind the virtio devices, opened at start-up (so a missing disk or
/// TAP is an error before the guest runs) and handed to the vCPU thread.
pub struct VirtioBackends {
    /// Per network device: its MAC address (the TAP is the vCPU loop's frame sink).
    pub nets: Vec<MacAddr>,
    /// Per disk: the image (its writes tracked) and whether it is read-only.
    pub disks: Vec<(TrackedDisk, bool)>,
    pub rng: bool,
}

impl VirtioBackends {
    pub fn count(&self) -> usize {
        self.nets.len() + self.disks.len() + usize::from(self.rng)
    }
}

/// Every device's saved state, in device order (snapshots, sync points, state transfer).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    /// [`ftvm_devices::DEVICE_STATE_VERSION`] of the device model that saved it.
    pub version: u32,
    pub pic: <Pic as Stateful>::State,
    pub pit: <Pit as Stateful>::State,
    pub rtc: <Rtc as Stateful>::State,
    pub uart: <Uart as Stateful>::State,
    pub i8042: <I8042 as Stateful>::State,
    pub lapic: <LocalApicRegisters as Stateful>::State,
    pub nets: Vec<<NetDevice as Stateful>::State>,
    pub disks: Vec<<BlockDevice as Stateful>::State>,
    pub rng: Option<<RngDevice as Stateful>::State>,
}

/// The first device whose state differs between `a` and `b`, by name (for reports).
pub fn first_difference(a: &DevicesState, b: &DevicesState) -> Option<String> {
    let fixed = [
        ("the device state version", a.version == b.version),
        ("the PIC", a.pic == b.pic),
        ("the PIT", a.pit == b.pit),
        ("the RTC", a.rtc == b.rtc),
        ("the UART", a.uart == b.uart),
        ("the i8042", a.i8042 == b.i8042),
        ("the local APIC registers", a.lapic == b.lapic),
        ("the virtio-rng device", a.rng == b.rng),
    ];
    if let Some((name, _)) = fixed.iter().find(|(_, same)| !same) {
        return Some(name.to_string());
    }
    let list = |what: &str, same: Vec<bool>, la: usize, lb: usize| {
        if la != lb {
            return Some(format!("the number of {what}s"));
        }
        same.iter().position(|s| !s).map(|i| format!("{what}{i}"))
    };
    list("virtio-net", a.nets.iter().zip(&b.nets).map(|(x, y)| x == y).collect(), a.nets.len(), b.nets.len()).or_else(
        || {
            list(
                "virtio-blk",
                a.disks.iter().zip(&b.disks).map(|(x, y)| x == y).collect(),
                a.disks.len(),
                b.disks.len(),
            )
        },
    )
}

/// The devices of a VM and the buses that reach them.
pub struct Devices {
    pub pic: Rc<RefCell<Pic>>,
    pub lapic: Rc<RefCell<LocalApicRegisters>>,
    pub pit: Rc<RefCell<Pit>>,
    pub rtc: Rc<RefCell<Rtc>>,
    pub uart: Rc<RefCell<Uart>>,
    pub i8042: Rc<RefCell<I8042>>,
    pub pio: Bus<dyn PioDevice>,
    pub mmio: Bus<dyn MmioDevice>,
    pub virtio: VirtioDevices,
}

impl Devices {
    /// The standard set: PIC pair, PIT, CMOS RTC, COM1, i8042, the power port and the POST
    /// port. `rtc_base_unix` is the wall-clock time the RTC shows at guest time 0.
    pub fn new(rtc_base_unix: u64) -> Result<Self> {
        let pic = Rc::new(RefCell::new(Pic::new()));
        let pit = Rc::new(RefCell::new(Pit::new()));
        let rtc = Rc::new(RefCell::new(Rtc::new(rtc_base_unix)));
        let uart = Rc::new(RefCell::new(Uart::new()));
        let i8042 = Rc::new(RefCell::new(I8042::new()));
        let mut pio: Bus<dyn PioDevice> = Bus::new();
        let map: [PortRange; 12] = [
            (ports::PIC_MASTER, 2, pic.clone()),
            (ports::PIC_SLAVE, 2, pic.clone()),
            (ports::PIC_ELCR, 2, pic.clone()),
            (ports::PIT, 4, pit.clone()),
            (ports::SYSTEM_CONTROL_B, 1, pit.clone()),
            (ports::I8042_DATA, 1, i8042.clone()),
            (ports::I8042_COMMAND, 1, i8042.clone()),
            (ports::CMOS, 2, rtc.clone()),
            (ports::COM1, 8, uart.clone()),
            (ports::POWER, 2, Rc::new(RefCell::new(PowerPort))),
            (ports::PM_TIMER, 4, Rc::new(RefCell::new(PmTimer))),
            (ports::POST, 1, Rc::new(RefCell::new(NullPort))),
        ];
        for (base, len, dev) in map {
            pio.insert(base.into(), len.into(), dev).map_err(|e| Error::Devices(format!("port {base:#x}: {e}")))?;
        }
        let mut mmio: Bus<dyn MmioDevice> = Bus::new();
        let lapic = Rc::new(RefCell::new(LocalApicRegisters::default()));
        mmio.insert(LAPIC_BASE, LAPIC_SIZE, lapic.clone())
            .map_err(|e| Error::Devices(format!("local APIC registers: {e}")))?;
        Ok(Devices { pic, lapic, pit, rtc, uart, i8042, pio, mmio, virtio: VirtioDevices::default() })
    }

    /// Puts the virtio devices on the MMIO bus, in device order (nets, disks, rng), at the
    /// slots of [`virtio_layout`]. Their interrupt lines are edge-triggered PIC inputs.
    pub fn add_virtio(&mut self, backends: VirtioBackends, mem: &GuestMemoryMmap) -> Result<Vec<VirtioSlot>> {
        let slots = virtio_layout(backends.count())?;
        let mut free = slots.iter().copied();
        let mut take = || free.next().ok_or_else(|| Error::Devices("virtio slots miscounted".into()));
        let mut virtio = VirtioDevices::default();
        for (i, mac) in backends.nets.into_iter().enumerate() {
            let s = take()?;
            let dev = Rc::new(RefCell::new(MmioTransport::new(Net::new(mac, i), mem.clone(), s.irq)));
            self.insert_virtio(s, dev.clone(), format!("virtio-net{i} (MAC {mac})"))?;
            virtio.nets.push(dev);
        }
        for (i, (file, readonly)) in backends.disks.into_iter().enumerate() {
            let s = take()?;
            let what =
                format!("virtio-blk{i} ({}{})", file.path().display(), if readonly { ", read-only" } else { "" });
            let dev = Rc::new(RefCell::new(MmioTransport::new(Block::new(file, readonly, i), mem.clone(), s.irq)));
            self.insert_virtio(s, dev.clone(), what)?;
            virtio.disks.push(dev);
        }
        if backends.rng {
            let s = take()?;
            let dev = Rc::new(RefCell::new(MmioTransport::new(Rng::new(0), mem.clone(), s.irq)));
            self.insert_virtio(s, dev.clone(), "virtio-rng0".into())?;
            virtio.rng = Some(dev);
        }
        self.virtio = virtio;
        Ok(slots)
    }

    fn insert_virtio(&mut self, slot: VirtioSlot, dev: Rc<RefCell<dyn MmioDevice>>, what: String) -> Result<()> {
        self.mmio.insert(slot.addr, MMIO_WINDOW, dev).map_err(|e| Error::Devices(format!("{what}: {e}")))?;
        tracing::info!("{what} at {:#x}, IRQ {}", slot.addr, slot.irq);
        Ok(())
    }

    /// Every device's state now.
    pub fn save_state(&self) -> DevicesState {
        DevicesState {
            version: ftvm_devices::DEVICE_STATE_VERSION,
            pic: self.pic.borrow().save_state(),
            pit: self.pit.borrow().save_state(),
            rtc: self.rtc.borrow().save_state(),
            uart: self.uart.borrow().save_state(),
            i8042: self.i8042.borrow().save_state(),
            lapic: self.lapic.borrow().save_state(),
            nets: self.virtio.nets.iter().map(|d| d.borrow().save_state()).collect(),
            disks: self.virtio.disks.iter().map(|d| d.borrow().save_state()).collect(),
            rng: self.virtio.rng.as_ref().map(|d| d.borrow().save_state()),
        }
    }

    /// Makes every device continue from a saved state. The VM must have the same devices
    /// (the snapshot's configuration); a state that does not fit is refused with the device
    /// named. Checked in full before anything changes, so a refused state changes nothing.
    pub fn restore_state(&self, state: &DevicesState) -> Result<()> {
        ftvm_devices::check_version(state.version).map_err(|e| Error::Restore(e.to_string()))?;
        let count = |what: &str, saved: usize, here: usize| {
            if saved == here {
                Ok(())
            } else {
                Err(Error::Restore(format!("the saved state has {saved} {what}; this VM has {here}")))
            }
        };
        count("network devices", state.nets.len(), self.virtio.nets.len())?;
        count("disks", state.disks.len(), self.virtio.disks.len())?;
        count("rng devices", usize::from(state.rng.is_some()), usize::from(self.virtio.rng.is_some()))?;
        // Restore into copies first: all or nothing.
        let before = self.save_state();
        let result = self.restore_each(state);
        if result.is_err() {
            let _ = self.restore_each(&before);
        }
        result
    }

    fn restore_each(&self, s: &DevicesState) -> Result<()> {
        fn one<D: Stateful>(dev: &RefCell<D>, state: &D::State) -> Result<()> {
            dev.borrow_mut().restore_state(state).map_err(|e| Error::Restore(e.to_string()))
        }
        one(&self.pic, &s.pic)?;
        one(&self.pit, &s.pit)?;
        one(&self.rtc, &s.rtc)?;
        one(&self.uart, &s.uart)?;
        one(&self.i8042, &s.i8042)?;
        one(&self.lapic, &s.lapic)?;
        for (dev, st) in self.virtio.nets.iter().zip(&s.nets) {
            one(dev, st)?;
        }
        for (dev, st) in self.virtio.disks.iter().zip(&s.disks) {
            one(dev, st)?;
        }
        if let (Some(dev), Some(st)) = (&self.virtio.rng, &s.rng) {
            one(dev, st)?;
        }
        Ok(())
    }

    /// Applies interrupt line changes to the PIC, in order.
    pub fn apply_irqs(&self, irqs: &mut IrqLines) {
        if irqs.is_empty() {
            return;
        }
        let mut pic = self.pic.borrow_mut();
        for (line, change) in irqs.drain() {
            pic.set_irq(line, change);
        }
    }

    /// The earliest guest time at which a timer device needs attention.
    pub fn next_deadline(&self) -> Option<GuestNanos> {
        [self.pit.borrow().next_deadline(), self.rtc.borrow().next_deadline()].into_iter().flatten().min()
    }

    /// Brings the timer devices up to guest time `now` (each raises at most one interrupt).
    /// An edge while IRQ0 is still requested merges with it, as on a real PIC, so a guest
    /// that counts ticks for its clock loses them when it takes interrupts late; the PM
    /// timer (0x608) is the clock that does not (the Linux personality reads it). Holding
    /// the edge back instead would stop the deadline timer that kicks an exit-free guest
    /// out to take the interrupt already pending (the deterministic modes inject at exits
    /// only): tried, and a pair's failover through an exit-free stretch never finished.
    pub fn on_time(&self, now: GuestNanos, irqs: &mut IrqLines) {
        fn poll<T: Timed>(dev: &RefCell<T>, now: GuestNanos, irqs: &mut IrqLines) {
            let due = dev.borrow().next_deadline().is_some_and(|d| d <= now);
            if due {
                dev.borrow_mut().on_time(now, irqs);
            }
        }
        poll(&self.pit, now, irqs);
        poll(&self.rtc, now, irqs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_virtio::block::RawFile;

    #[test]
    fn virtio_slots_follow_the_documented_layout() {
        let slots = virtio_layout(6).unwrap();
        assert_eq!(slots[0], VirtioSlot { addr: 0xd000_0000, irq: 5 });
        assert_eq!(slots[1], VirtioSlot { addr: 0xd000_1000, irq: 6 });
        assert_eq!(slots[5], VirtioSlot { addr: 0xd000_5000, irq: 11 });
        assert!(virtio_layout(0).unwrap().is_empty());
        let err = virtio_layout(7).unwrap_err();
        assert!(matches!(err, Error::TooManyDevices { count: 7, max: 6 }), "{err}");
    }

    #[test]
    fn virtio_devices_are_announced_on_the_command_line() {
        let slots = virtio_layout(2).unwrap();
        assert_eq!(
            virtio_cmdline("console=ttyS0", &slots),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(virtio_cmdline("", &slots[..1]), "virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(virtio_cmdline(" a b ", &[]), " a b ");
        // Arguments after `--` belong to init: the devices go before them.
        assert_eq!(
            virtio_cmdline("quiet -- init-arg", &slots[..1]),
            "quiet virtio_mmio.device=4K@0xd0000000:5 -- init-arg"
        );
        assert_eq!(virtio_cmdline("-- x", &slots[..1]), "virtio_mmio.device=4K@0xd0000000:5 -- x");
    }

    #[test]
    fn virtio_devices_sit_on_the_mmio_bus_in_device_order() {
        use ftvm_devices::{DeviceContext, ManualClock};
        let dir = std::env::temp_dir().join(format!("ftvm-vmm-legacy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let mem = crate::memory::allocate(16 * crate::memory::MIB).unwrap();
        let mut devices = Devices::new(0).unwrap();
        let backends = VirtioBackends {
            nets: vec![MacAddr::default_for(0)],
            disks: vec![(TrackedDisk::new(RawFile::open(&img, true).unwrap()), true)],
            rng: true,
        };
        let slots = devices.add_virtio(backends, &mem).unwrap();
        assert_eq!(slots.len(), 3);
        let (mut clock, mut irqs, mut req) = (ManualClock(0), IrqLines::default(), vec![]);
        let mut ctx = DeviceContext { inputs: &mut clock, irqs: &mut irqs, requests: &mut req };
        let mut read = |addr: u64| {
            let mut b = [0u8; 4];
            devices.mmio.read(&mut ctx, addr, &mut b).unwrap();
            u32::from_le_bytes(b)
        };
        assert_eq!(read(0xd000_0000), 0x7472_6976);
        assert_eq!(read(0xd000_0008), 1, "net first");
        assert_eq!(read(0xd000_1008), 2, "then the disk");
        assert_eq!(read(0xd000_2008), 4, "then rng");
        assert_eq!(devices.virtio.nets[0].borrow().irq(), 5);
        assert_eq!(devices.virtio.disks[0].borrow().irq(), 6);
        assert_eq!(devices.virtio.rng.as_ref().unwrap().borrow().irq(), 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
