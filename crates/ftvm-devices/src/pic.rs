//! The 8259A interrupt controller pair of the PC: master at 0x20-0x21, slave at 0xa0-0xa1
//! cascaded on master IR2, and the chipset's ELCR at 0x4d0-0x4d1 that makes single inputs
//! level-triggered.
//!
//! Devices never call the PIC: they record line changes in [`crate::IrqLines`] and the VMM applies
//! them with [`Pic::set_irq`] between exits, then asks [`Pic::has_pending_interrupt`] and runs the
//! INTA cycle with [`Pic::acknowledge`] when the vCPU can take an interrupt. The PIC itself has no
//! notion of time, so its arbitration is a pure function of the accesses and line changes.
//!
//! Implemented: ICW1-ICW4 (single/cascade, ICW4, vector base, auto-EOI, special fully nested),
//! OCW1, every OCW2 command (EOI, specific EOI, the rotations, set priority), OCW3 (IRR/ISR
//! select, poll, special mask mode), edge inputs with level inputs selected in the ELCR.
//! Not implemented: the MCS-80 mode and buffered mode of ICW4 (x86 guests never use them) and
//! ICW1's LTIM bit (the PIIX-style chipset ignores it and uses the ELCR instead).

use serde::{Deserialize, Serialize};

use crate::bus::{DeviceContext, PioDevice};
use crate::state::whole_device_state;
use crate::{ensure_state, irq, ports, IrqChange, StateError};

/// The master input the slave's INT output drives.
const CASCADE_BIT: u8 = 1 << irq::CASCADE;

/// ELCR bits a guest may set. As on the PIIX, IRQ0, IRQ1, IRQ2 (master) and IRQ8, IRQ13 (slave)
/// stay edge-triggered: their sources are wired that way on the board.
const ELCR_MASK: [u8; 2] = [0xf8, 0xde];

/// Where one chip is in its initialization sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum InitState {
    /// Initialized: writes to the odd port are OCW1 (the IMR).
    Ready,
    /// ICW1 seen; the odd port takes ICW2 next.
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Chip {
    /// Input levels as last driven: edge detection compares against them.
    lines: u8,
    irr: u8,
    isr: u8,
    imr: u8,
    /// Level-triggered inputs (ELCR).
    elcr: u8,
    vector_base: u8,
    /// The input with the highest priority: 0 unless a rotation moved it.
    highest: u8,
    init: InitState,
    icw4_needed: bool,
    single: bool,
    icw3: u8,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    special_mask: bool,
    /// OCW3 RR/RIS: reads of the even port return the ISR instead of the IRR.
    read_isr: bool,
    /// OCW3 poll: the next read returns the poll byte.
    poll: bool,
    is_master: bool,
}

impl Chip {
    fn new(is_master: bool) -> Self {
        Chip {
            lines: 0,
            irr: 0,
            isr: 0,
            // No BIOS runs before the guest, so nothing is unmasked until the guest says so.
            imr: 0xff,
            elcr: 0,
            vector_base: if is_master { 0x08 } else { 0x70 },
            highest: 0,
            init: InitState::Ready,
            icw4_needed: false,
            single: false,
            icw3: if is_master { CASCADE_BIT } else { irq::CASCADE },
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_fully_nested: false,
            special_mask: false,
            read_isr: false,
            poll: false,
            is_master,
        }
    }

    /// Drives input `pin` to `high`. Edge inputs latch a request on a rising edge; level inputs
    /// request exactly while high.
    fn set_line(&mut self, pin: u8, high: bool) {
        let bit = 1u8 << (pin & 7);
        if self.elcr & bit != 0 {
            if high {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if high && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if high {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// Rank (0 = highest) of the highest-priority bit in `mask`, or 8 when it is empty.
    fn priority(&self, mask: u8) -> u8 {
        (0..8).find(|p| mask & (1 << ((p + self.highest) & 7)) != 0).unwrap_or(8)
    }

    /// The input this chip would signal now: the highest-priority unmasked request that beats
    /// everything in service.
    fn pending(&self) -> Option<u8> {
        let requested = self.priority(self.irr & !self.imr);
        if requested == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            // Special mask mode: masked in-service levels do not block lower priorities.
            in_service &= !self.imr;
        }
        if self.special_fully_nested && self.is_master {
            // The slave may interrupt its own in-service request through IR2.
            in_service &= !CASCADE_BIT;
        }
        (requested < self.priority(in_service)).then_some((requested + self.highest) & 7)
    }

    /// The chip's side of an INTA cycle (or a poll) for input `pin`.
    fn intack(&mut self, pin: u8) {
        let bit = 1u8 << pin;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.highest = (pin + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        // A level request stays in the IRR while the line is high.
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
    }

    fn write_even(&mut self, value: u8) {
        if value & 0x10 != 0 {
            self.icw1(value);
        } else if value & 0x08 != 0 {
            // OCW3.
            if value & 0x04 != 0 {
                self.poll = true;
            }
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        } else {
            self.ocw2(value);
        }
    }

    fn icw1(&mut self, value: u8) {
        // ICW1 resets the edge sense circuit (edge inputs need a fresh rising edge), clears the
        // IMR and ISR, restores fixed priority and zeroes everything ICW4 controls.
        self.irr = self.lines & self.elcr;
        self.isr = 0;
        self.imr = 0;
        self.highest = 0;
        self.read_isr = false;
        self.poll = false;
        self.special_mask = false;
        self.auto_eoi = false;
        self.rotate_on_auto_eoi = false;
        self.special_fully_nested = false;
        self.icw4_needed = value & 0x01 != 0;
        self.single = value & 0x02 != 0;
        if value & 0x08 != 0 {
            tracing::debug!("pic: ICW1 LTIM ignored, the ELCR selects level inputs");
        }
        self.init = InitState::Icw2;
    }

    fn ocw2(&mut self, value: u8) {
        let level = value & 7;
        match value >> 5 {
            // Clear / set rotate in auto-EOI mode.
            0b000 => self.rotate_on_auto_eoi = false,
            0b100 => self.rotate_on_auto_eoi = true,
            // Non-specific EOI, optionally rotating the served level to lowest priority.
            cmd @ (0b001 | 0b101) => {
                let p = self.priority(self.isr);
                if p < 8 {
                    let pin = (p + self.highest) & 7;
                    self.isr &= !(1 << pin);
                    if cmd == 0b101 {
                        self.highest = (pin + 1) & 7;
                    }
                }
            }
            0b011 => self.isr &= !(1 << level),
            0b111 => {
                self.isr &= !(1 << level);
                self.highest = (level + 1) & 7;
            }
            // Set priority: `level` becomes the lowest.
            0b110 => self.highest = (level + 1) & 7,
            _ => {}
        }
    }

    fn write_odd(&mut self, value: u8) {
        match self.init {
            InitState::Ready => self.imr = value,
            InitState::Icw2 => {
                self.vector_base = value & 0xf8;
                self.init = match (self.single, self.icw4_needed) {
                    (false, _) => InitState::Icw3,
                    (true, true) => InitState::Icw4,
                    (true, false) => InitState::Ready,
                };
            }
            InitState::Icw3 => {
                self.icw3 = value;
                self.init = if self.icw4_needed { InitState::Icw4 } else { InitState::Ready };
            }
            InitState::Icw4 => {
                if value & 0x01 == 0 {
                    tracing::debug!("pic: ICW4 MCS-80 mode not supported, using 8086 mode");
                }
                self.auto_eoi = value & 0x02 != 0;
                self.special_fully_nested = value & 0x10 != 0;
                self.init = InitState::Ready;
            }
        }
    }

    /// The poll byte: 0x80 | input, acknowledging it as an INTA would, or 0 when none.
    fn poll_read(&mut self) -> u8 {
        self.poll = false;
        match self.pending() {
            Some(pin) => {
                self.intack(pin);
                0x80 | pin
            }
            None => 0,
        }
    }

    fn read(&mut self, odd: bool) -> u8 {
        if self.poll {
            self.poll_read()
        } else if odd {
            self.imr
        } else if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }

    fn write_elcr(&mut self, value: u8, mask: u8) {
        self.elcr = value & mask;
        // Level inputs request while high; edge inputs keep what they latched.
        self.irr = (self.irr & !self.elcr) | (self.lines & self.elcr);
    }
}

/// The master/slave 8259A pair with its ELCR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pic {
    master: Chip,
    slave: Chip,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// The state a PC BIOS would leave (vectors 0x08 and 0x70, cascade on IR2) but with every
    /// input masked: no BIOS handlers exist, so the guest must unmask what it programs.
    pub fn new() -> Self {
        Pic { master: Chip::new(true), slave: Chip::new(false) }
    }

    /// Applies a change on ISA line `irq` (0-15). A pulse is one rising edge for an edge input;
    /// on a level input it raises and drops the request, so level sources must hold the line.
    /// IRQ2 is the cascade, driven by the slave only: changes to it are ignored.
    pub fn set_irq(&mut self, irq: u8, change: IrqChange) {
        let chip = match irq {
            0..=7 if irq == irq::CASCADE => {
                tracing::debug!("pic: IRQ2 is the cascade input, change ignored");
                return;
            }
            0..=7 => &mut self.master,
            8..=15 => &mut self.slave,
            _ => {
                tracing::debug!(irq, "pic: no such IRQ line");
                return;
            }
        };
        match change {
            IrqChange::Pulse => {
                chip.set_line(irq & 7, true);
                chip.set_line(irq & 7, false);
            }
            IrqChange::Level(high) => chip.set_line(irq & 7, high),
        }
        self.update_cascade();
    }

    /// Whether the master asserts INT: an unmasked request beats everything in service (a slave
    /// request counts through IR2).
    pub fn has_pending_interrupt(&self) -> bool {
        self.master.pending().is_some()
    }

    /// The INTA cycle: the vector to inject, or `None` when INT is not asserted (inject nothing).
    /// A request through IR2 that the slave no longer has gives the slave's spurious IR7 vector
    /// (IRQ15) with the master's IR2 in service, as on the real pair, so the guest's EOI to the
    /// master balances it. (The master's own spurious IR7 needs INT and INTA to be apart in time;
    /// here the VMM acknowledges right after asking, so it cannot arise.)
    pub fn acknowledge(&mut self) -> Option<u8> {
        let pin = self.master.pending()?;
        self.master.intack(pin);
        if pin != irq::CASCADE {
            return Some(self.master.vector_base | pin);
        }
        let vector = match self.slave.pending() {
            Some(spin) => {
                self.slave.intack(spin);
                self.slave.vector_base | spin
            }
            None => self.slave.vector_base | 7,
        };
        // The slave's INT drops during INTA, so a request it still has after this one reaches
        // the master as a fresh edge on IR2 rather than being lost.
        self.master.set_line(irq::CASCADE, false);
        self.update_cascade();
        Some(vector)
    }

    /// Drives master IR2 from the slave's INT output.
    fn update_cascade(&mut self) {
        let slave_int = self.slave.pending().is_some();
        self.master.set_line(irq::CASCADE, slave_int);
    }

    fn read_port(&mut self, port: u16) -> u8 {
        let value = match port {
            0x20 | 0x21 => self.master.read(port & 1 != 0),
            0xa0 | 0xa1 => self.slave.read(port & 1 != 0),
            0x4d0 => self.master.elcr,
            0x4d1 => self.slave.elcr,
            _ => {
                tracing::debug!(port, "pic: read of unknown port");
                return 0xff;
            }
        };
        // A poll of the slave may have acknowledged its request.
        self.update_cascade();
        value
    }

    fn write_port(&mut self, port: u16, value: u8) {
        match port {
            0x20 => self.master.write_even(value),
            0x21 => self.master.write_odd(value),
            0xa0 => self.slave.write_even(value),
            0xa1 => self.slave.write_odd(value),
            0x4d0 => self.master.write_elcr(value, ELCR_MASK[0]),
            0x4d1 => self.slave.write_elcr(value, ELCR_MASK[1]),
            _ => tracing::debug!(port, value, "pic: write to unknown port ignored"),
        }
        self.update_cascade();
    }
}

/// True for the ports this device answers: a wide access may run past its range.
fn is_pic_port(port: u16) -> bool {
    matches!(port, 0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1)
}

impl PioDevice for Pic {
    /// Byte `i` of a wide access goes to port `base + offset + i`, as an ISA bus splits it.
    fn pio_read(&mut self, _ctx: &mut DeviceContext<'_>, base: u16, offset: u16, data: &mut [u8]) {
        let first = base.wrapping_add(offset);
        for (i, byte) in data.iter_mut().enumerate() {
            let port = first.wrapping_add(i as u16);
            *byte = if is_pic_port(port) { self.read_port(port) } else { 0xff };
        }
    }

    fn pio_write(&mut self, _ctx: &mut DeviceContext<'_>, base: u16, offset: u16, data: &[u8]) {
        let first = base.wrapping_add(offset);
        for (i, &byte) in data.iter().enumerate() {
            let port = first.wrapping_add(i as u16);
            if is_pic_port(port) {
                self.write_port(port, byte);
            } else {
                tracing::debug!(port, "pic: write past the PIC's ports ignored");
            }
        }
    }
}

whole_device_state! {
    /// The complete state of the 8259 pair with its ELCR: for each chip the input levels (for
    /// edge detection), IRR, ISR, IMR, ELCR, vector base, the rotated priority, the step of the
    /// initialization sequence with what ICW1 asked for (ICW3, ICW4), the ICW4 modes (auto-EOI,
    /// special fully nested) and rotate-on-auto-EOI, and OCW3's selections (IRR/ISR read, a
    /// pending poll, special mask mode). The PIC has no notion of time.
    PicState for Pic
}

impl Chip {
    fn check_state(&self, which: &str, is_master: bool, elcr_mask: u8) -> Result<(), StateError> {
        ensure_state!(self.is_master == is_master, "pic", "the {which} chip is marked is_master = {}", self.is_master);
        ensure_state!(self.highest < 8, "pic", "{which}: highest-priority input {} is not 0-7", self.highest);
        ensure_state!(
            self.vector_base & 7 == 0,
            "pic",
            "{which}: vector base {:#x} is not a multiple of 8",
            self.vector_base
        );
        ensure_state!(
            self.elcr & !elcr_mask == 0,
            "pic",
            "{which}: ELCR {:#04x} makes inputs level-triggered that are wired edge ({:#04x} settable)",
            self.elcr,
            elcr_mask
        );
        ensure_state!(
            self.irr & self.elcr == self.lines & self.elcr,
            "pic",
            "{which}: level inputs request exactly while high, but IRR {:#04x} and lines {:#04x} differ (ELCR {:#04x})",
            self.irr,
            self.lines,
            self.elcr
        );
        let step_possible = match self.init {
            InitState::Icw3 => !self.single,
            InitState::Icw4 => self.icw4_needed,
            InitState::Ready | InitState::Icw2 => true,
        };
        ensure_state!(
            step_possible,
            "pic",
            "{which}: waits for {:?} although ICW1 asked for single = {}, ICW4 = {}",
            self.init,
            self.single,
            self.icw4_needed
        );
        Ok(())
    }
}

impl Pic {
    fn check_state(&self) -> Result<(), StateError> {
        self.master.check_state("master", true, ELCR_MASK[0])?;
        self.slave.check_state("slave", false, ELCR_MASK[1])?;
        let (ir2, slave_int) = (self.master.lines & CASCADE_BIT != 0, self.slave.pending().is_some());
        ensure_state!(ir2 == slave_int, "pic", "master IR2 is {ir2} but the slave's INT output is {slave_int}");
        Ok(())
    }
}

// The port constants the bus registers this device at; checked here so a change there is seen.
const _: () = assert!(ports::PIC_MASTER == 0x20 && ports::PIC_SLAVE == 0xa0 && ports::PIC_ELCR == 0x4d0);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::{lockstep, refused, restored};
    use crate::{IrqLines, ManualClock, Stateful, VmRequest};

    fn access<R>(f: impl FnOnce(&mut DeviceContext<'_>) -> R) -> R {
        let (mut clock, mut irqs, mut requests) = (ManualClock(0), IrqLines::default(), Vec::<VmRequest>::new());
        let mut ctx = DeviceContext { inputs: &mut clock, irqs: &mut irqs, requests: &mut requests };
        f(&mut ctx)
    }

    fn base_of(port: u16) -> u16 {
        port & !1
    }

    fn outb(pic: &mut Pic, port: u16, value: u8) {
        access(|ctx| pic.pio_write(ctx, base_of(port), port & 1, &[value]));
    }

    fn inb(pic: &mut Pic, port: u16) -> u8 {
        let mut b = [0u8];
        access(|ctx| pic.pio_read(ctx, base_of(port), port & 1, &mut b));
        b[0]
    }

    /// The sequence Linux and most kernels use: cascade, ICW4, vectors 0x20/0x28.
    fn initialized() -> Pic {
        let mut pic = Pic::new();
        for (port, vbase, icw3) in [(0x20, 0x20, 0x04), (0xa0, 0x28, 0x02)] {
            outb(&mut pic, port, 0x11);
            outb(&mut pic, port + 1, vbase);
            outb(&mut pic, port + 1, icw3);
            outb(&mut pic, port + 1, 0x01);
        }
        pic
    }

    fn eoi(pic: &mut Pic, port: u16) {
        outb(pic, port, 0x20);
    }

    #[test]
    fn new_masks_everything() {
        let mut pic = Pic::new();
        pic.set_irq(0, IrqChange::Pulse);
        assert!(!pic.has_pending_interrupt());
        assert_eq!(pic.acknowledge(), None);
        assert_eq!(inb(&mut pic, 0x21), 0xff);
        assert_eq!(inb(&mut pic, 0x20), 0x01, "the request is latched in the IRR");
    }

    #[test]
    fn init_sequence_sets_vector_base_and_clears_mask() {
        let mut pic = initialized();
        assert_eq!(inb(&mut pic, 0x21), 0, "ICW1 clears the IMR");
        assert_eq!(inb(&mut pic, 0xa1), 0);
        assert_eq!(pic.master.init, InitState::Ready);
        assert_eq!(pic.slave.icw3, 0x02);
        pic.set_irq(0, IrqChange::Pulse);
        assert!(pic.has_pending_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x20));
        assert!(!pic.has_pending_interrupt());
        // ICW2's low three bits are ignored.
        outb(&mut pic, 0x20, 0x11);
        outb(&mut pic, 0x21, 0x47);
        outb(&mut pic, 0x21, 0x04);
        outb(&mut pic, 0x21, 0x01);
        pic.set_irq(3, IrqChange::Pulse);
        assert_eq!(pic.acknowledge(), Some(0x43));
    }

    #[test]
    fn init_without_icw4_and_single_mode() {
        let mut pic = Pic::new();
        // Single, no ICW4: ICW2 completes the sequence, the next odd write is the IMR.
        outb(&mut pic, 0x20, 0x12);
        outb(&mut pic, 0x21, 0x30);
        assert_eq!(pic.master.init, InitState::Ready);
        outb(&mut pic, 0x21, 0xfe);
        assert_eq!(inb(&mut pic, 0x21), 0xfe);
        // Single with ICW4: no ICW3.
        outb(&mut pic, 0x20, 0x13);
        outb(&mut pic, 0x21, 0x30);
        assert_eq!(pic.master.init, InitState::Icw4);
        outb(&mut pic, 0x21, 0x03);
        assert!(pic.master.auto_eoi);
        assert_eq!(pic.master.init, InitState::Ready);
    }

    #[test]
    fn masking_holds_edge_requests() {
        let mut pic = initialized();
        outb(&mut pic, 0x21, 0x01);
        pic.set_irq(0, IrqChange::Pulse);
        assert!(!pic.has_pending_interrupt());
        assert_eq!(pic.acknowledge(), None);
        outb(&mut pic, 0x21, 0x00);
        assert!(pic.has_pending_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x20));
    }

    #[test]
    fn fixed_priority_lowest_number_first() {
        let mut pic = initialized();
        for irq in [7, 5, 3, 4] {
            pic.set_irq(irq, IrqChange::Pulse);
        }
        let mut order = vec![];
        while let Some(v) = pic.acknowledge() {
            order.push(v);
            eoi(&mut pic, 0x20);
        }
        assert_eq!(order, vec![0x23, 0x24, 0x25, 0x27]);
    }

    #[test]
    fn in_service_blocks_lower_and_equal_priorities() {
        let mut pic = initialized();
        pic.set_irq(3, IrqChange::Pulse);
        assert_eq!(pic.acknowledge(), Some(0x23));
        pic.set_irq(5, IrqChange::Pulse);
        pic.set_irq(3, IrqChange::Pulse);
        assert!(!pic.has_pending_interrupt(), "IR3 in service blocks IR3 and IR5");
        pic.set_irq(1, IrqChange::Pulse);
        assert_eq!(pic.acknowledge(), Some(0x21), "a higher priority nests");
        outb(&mut pic, 0x20, 0x0b);
        assert_eq!(inb(&mut pic, 0x20), 0b1010, "ISR holds IR1 and IR3");
        eoi(&mut pic, 0x20); // clears IR1, the highest in service
        assert_eq!(inb(&mut pic, 0x20), 0b1000);
        assert!(!pic.has_pending_interrupt());
        eoi(&mut pic, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x23));
        eoi(&mut pic, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x25));
    }

    #[test]
    fn specific_eoi_clears_only_that_level() {
        let mut pic = initialized();
        pic.set_irq(4, IrqChange::Pulse);
        pic.acknowledge();
        pic.set_irq(1, IrqChange::Pulse);
        pic.acknowledge();
        outb(&mut pic, 0x20, 0x0b);
        assert_eq!(inb(&mut pic, 0x20), 0b1_0010);
        outb(&mut pic, 0x20, 0x64); // specific EOI for IR4
        assert_eq!(inb(&mut pic, 0x20), 0b0_0010);
        outb(&mut pic, 0x20, 0x63); // specific EOI for IR3: not in service, nothing happens
        assert_eq!(inb(&mut pic, 0x20), 0b0_0010);
    }

    #[test]
    fn cascade_through_slave() {
        let mut pic = initialized();
        pic.set_irq(10, IrqChange::Pulse);
        assert!(pic.has_pending_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x2a));
        outb(&mut pic, 0x20, 0x0b);
        outb(&mut pic, 0xa0, 0x0b);
        assert_eq!(inb(&mut pic, 0x20), 0x04, "master IR2 in service");
        assert_eq!(inb(&mut pic, 0xa0), 0x04, "slave IR2 (IRQ10) in service");
        // While IR2 is in service on the master, slave requests and master IR3+ wait.
        pic.set_irq(8, IrqChange::Pulse);
        pic.set_irq(4, IrqChange::Pulse);
        assert!(!pic.has_pending_interrupt());
        // IRQ0 and IRQ1 still nest.
        pic.set_irq(1, IrqChange::Pulse);
        assert_eq!(pic.acknowledge(), Some(0x21));
        eoi(&mut pic, 0x20);
        assert!(!pic.has_pending_interrupt());
        // EOI to the slave and the master: IRQ8 (through IR2) goes before IRQ4.
        eoi(&mut pic, 0xa0);
        eoi(&mut pic, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x28));
        eoi(&mut pic, 0xa0);
        eoi(&mut pic, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x24));
        eoi(&mut pic, 0x20);
        assert_eq!(pic.acknowledge(), None);
    }

    #[test]
    fn all_slave_lines_map_to_slave_vectors() {
        let mut pic = initialized();
        for irq in 8..16u8 {
            pic.set_irq(irq, IrqChange::Pulse);
            assert_eq!(pic.acknowledge(), Some(0x28 + irq - 8), "irq {irq}");
            eoi(&mut pic, 0xa0);
            eoi(&mut pic, 0x20);
        }
        assert!(!pic.has_pending_interrupt());
    }

    #[test]
    fn slave_mask_and_master_ir2_mask() {
        let mut pic = initialized();
        outb(&mut pic, 0xa1, 0x10); // mask IRQ12
        pic.set_irq(12, IrqChange::Pulse);
        assert!(!pic.has_pending_interrupt());
        outb(&mut pic, 0x21, 0x04); // mask the cascade
        outb(&mut pic, 0xa1, 0x00);
        assert!(!pic.has_pending_interrupt());
        outb(&mut pic, 0x21, 0x00);
        assert_eq!(pic.acknowledge(), Some(0x2c));
    }

    #[test]
    fn second_slave_request_survives_auto_eoi() {
        let mut pic = initialized();
        outb(&mut pic, 0xa0, 0x11);
        outb(&mut pic, 0xa1, 0x28);
        outb(&mut pic, 0xa1, 0x02);
        outb(&mut pic, 0xa1, 0x03); // auto-EOI on the slave
        outb(&mut pic, 0x20, 0x11);
        outb(&mut pic, 0x21, 0x20);
        outb(&mut pic, 0x21, 0x04);
        outb(&mut pic, 0x21, 0x03); // and on the master
        pic.set_irq(9, IrqChange::Pulse);
        pic.set_irq(11, IrqChange::Pulse);
        assert_eq!(pic.acknowledge(), Some(0x29));
        assert_eq!(pic.acknowledge(), Some(0x2b));
        assert_eq!(pic.acknowledge(), None);
        outb(&mut pic, 0xa0, 0x0b);
        assert_eq!(inb(&mut pic, 0xa0), 0, "auto-EOI leaves nothing in service");
    }

    #[test]
    fn spurious_irq15_when_slave_request_vanished() {
        let mut pic = initialized();
        pic.set_irq(9, IrqChange::Pulse);
        // The master latched the edge on IR2; now the slave's request is masked away.
        outb(&mut pic, 0x21, 0x04);
        outb(&mut pic, 0xa1, 0x02);
        outb(&mut pic, 0x21, 0x00);
        assert!(pic.has_pending_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x2f), "spurious IRQ15");
        outb(&mut pic, 0xa0, 0x0b);
        assert_eq!(inb(&mut pic, 0xa0), 0, "slave ISR untouched");
        outb(&mut pic, 0x20, 0x0b);
        assert_eq!(inb(&mut pic, 0x20), 0x04, "master IR2 in service: the guest EOIs the master");
    }

    #[test]
    fn level_inputs_follow_the_line_edge_inputs_latch() {
        let mut pic = initialized();
        access(|ctx| pic.pio_write(ctx, 0x4d0, 1, &[0xff]));
        assert_eq!(pic.slave.elcr, 0xde, "IRQ8 and IRQ13 stay edge");
        access(|ctx| pic.pio_write(ctx, 0x4d0, 0, &[0xff]));
        assert_eq!(pic.master.elcr, 0xf8, "IRQ0-2 stay edge");
        let mut b = [0u8; 2];
        access(|ctx| pic.pio_read(ctx, 0x4d0, 0, &mut b));
        assert_eq!(b, [0xf8, 0xde]);

        // Level IRQ5 (ELCR) held high: it comes back after EOI until the line drops.
        pic.set_irq(5, IrqChange::Level(true));
        assert_eq!(pic.acknowledge(), Some(0x25));
        assert!(!pic.has_pending_interrupt());
        eoi(&mut pic, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x25), "still high: requests again");
        pic.set_irq(5, IrqChange::Level(false));
        eoi(&mut pic, 0x20);
        assert!(!pic.has_pending_interrupt());
        // A level input that drops before the INTA loses its request.
        pic.set_irq(6, IrqChange::Level(true));
        pic.set_irq(6, IrqChange::Level(false));
        assert!(!pic.has_pending_interrupt());
        pic.set_irq(6, IrqChange::Pulse);
        assert!(!pic.has_pending_interrupt(), "a pulse on a level input is lost");

        // Edge IRQ1 held high: one interrupt only, and it stays latched after the line drops.
        pic.set_irq(1, IrqChange::Level(true));
        assert_eq!(pic.acknowledge(), Some(0x21));
        eoi(&mut pic, 0x20);
        assert!(!pic.has_pending_interrupt());
        pic.set_irq(1, IrqChange::Level(false));
        pic.set_irq(1, IrqChange::Level(true));
        pic.set_irq(1, IrqChange::Level(false));
        assert_eq!(pic.acknowledge(), Some(0x21));
    }

    #[test]
    fn ocw3_selects_irr_or_isr() {
        let mut pic = initialized();
        pic.set_irq(4, IrqChange::Pulse);
        pic.set_irq(6, IrqChange::Pulse);
        assert_eq!(inb(&mut pic, 0x20), 0x50, "IRR by default");
        pic.acknowledge();
        outb(&mut pic, 0x20, 0x0b);
        assert_eq!(inb(&mut pic, 0x20), 0x10, "ISR");
        assert_eq!(inb(&mut pic, 0x20), 0x10, "the selection sticks");
        assert_eq!(inb(&mut pic, 0x21), 0x00, "the odd port still reads the IMR");
        outb(&mut pic, 0x20, 0x0a);
        assert_eq!(inb(&mut pic, 0x20), 0x40, "IRR");
        outb(&mut pic, 0x20, 0x08); // RR=0: no change of selection
        assert_eq!(inb(&mut pic, 0x20), 0x40);
    }

    #[test]
    fn poll_command_acknowledges() {
        let mut pic = initialized();
        outb(&mut pic, 0x20, 0x0c);
        assert_eq!(inb(&mut pic, 0x20), 0x00, "nothing pending");
        pic.set_irq(3, IrqChange::Pulse);
        outb(&mut pic, 0x20, 0x0c);
        assert_eq!(inb(&mut pic, 0x21), 0x83, "poll works on either port");
        assert!(!pic.has_pending_interrupt());
        outb(&mut pic, 0x20, 0x0b);
        assert_eq!(inb(&mut pic, 0x20), 0x08, "polled level is in service");
        // Polling the slave drops its INT on the master's IR2.
        eoi(&mut pic, 0x20);
        pic.set_irq(13, IrqChange::Pulse);
        assert!(pic.has_pending_interrupt());
        outb(&mut pic, 0xa0, 0x0c);
        assert_eq!(inb(&mut pic, 0xa0), 0x85);
        assert!(pic.master.irr & CASCADE_BIT != 0, "the master latched the edge already");
    }

    #[test]
    fn auto_eoi_and_rotation() {
        let mut pic = initialized();
        outb(&mut pic, 0x20, 0x11);
        outb(&mut pic, 0x21, 0x20);
        outb(&mut pic, 0x21, 0x04);
        outb(&mut pic, 0x21, 0x03);
        outb(&mut pic, 0x20, 0x80); // rotate in auto-EOI mode
        for irq in [1, 4] {
            pic.set_irq(irq, IrqChange::Pulse);
        }
        assert_eq!(pic.acknowledge(), Some(0x21));
        // IR1 is now the lowest priority: IR4 first, then IR1 again.
        pic.set_irq(1, IrqChange::Pulse);
        assert_eq!(pic.acknowledge(), Some(0x24));
        assert_eq!(pic.acknowledge(), Some(0x21));
        outb(&mut pic, 0x20, 0x0b);
        assert_eq!(inb(&mut pic, 0x20), 0);
    }

    #[test]
    fn rotate_on_non_specific_eoi() {
        let mut pic = initialized();
        pic.set_irq(0, IrqChange::Pulse);
        assert_eq!(pic.acknowledge(), Some(0x20));
        outb(&mut pic, 0x20, 0xa0); // rotate on non-specific EOI: IR0 becomes lowest
        assert_eq!(pic.master.highest, 1);
        pic.set_irq(0, IrqChange::Pulse);
        pic.set_irq(7, IrqChange::Pulse);
        assert_eq!(pic.acknowledge(), Some(0x27));
        // Nested under IR7 (now priority 6 of 0-7), IR0 (priority 7) waits.
        assert!(!pic.has_pending_interrupt());
        outb(&mut pic, 0x20, 0xe7); // rotate on specific EOI for IR7
        assert_eq!(pic.master.highest, 0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        outb(&mut pic, 0x20, 0xc4); // set priority: IR4 lowest, IR5 highest
        eoi(&mut pic, 0x20);
        pic.set_irq(4, IrqChange::Pulse);
        pic.set_irq(6, IrqChange::Pulse);
        assert_eq!(pic.acknowledge(), Some(0x26));
    }

    #[test]
    fn special_mask_mode_lets_lower_priorities_in() {
        let mut pic = initialized();
        pic.set_irq(3, IrqChange::Pulse);
        assert_eq!(pic.acknowledge(), Some(0x23));
        outb(&mut pic, 0x20, 0x68); // set special mask mode
        outb(&mut pic, 0x21, 0x08); // mask the in-service IR3
        pic.set_irq(5, IrqChange::Pulse);
        assert_eq!(pic.acknowledge(), Some(0x25));
        outb(&mut pic, 0x20, 0x48); // reset special mask mode
        eoi(&mut pic, 0x20); // clears IR3 (highest in service)
        outb(&mut pic, 0x20, 0x0b);
        assert_eq!(inb(&mut pic, 0x20), 0x20);
    }

    #[test]
    fn icw1_resets_edge_sense_but_keeps_levels() {
        let mut pic = initialized();
        access(|ctx| pic.pio_write(ctx, 0x4d0, 0, &[0x20]));
        pic.set_irq(5, IrqChange::Level(true));
        pic.set_irq(3, IrqChange::Level(true));
        for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01)] {
            outb(&mut pic, port, v);
        }
        assert_eq!(inb(&mut pic, 0x20), 0x20, "edge IR3 cleared, level IR5 kept");
        pic.set_irq(3, IrqChange::Level(true));
        assert_eq!(inb(&mut pic, 0x20), 0x20, "IR3 still high: no new edge");
    }

    #[test]
    fn wide_accesses_split_into_bytes() {
        let mut pic = initialized();
        access(|ctx| pic.pio_write(ctx, 0x20, 0, &[0x0b, 0xf0]));
        assert_eq!(inb(&mut pic, 0x21), 0xf0);
        let mut b = [0u8; 4];
        access(|ctx| pic.pio_read(ctx, 0x20, 0, &mut b));
        assert_eq!(b, [0x00, 0xf0, 0xff, 0xff]);
    }

    #[test]
    fn bad_irq_numbers_are_ignored() {
        let mut pic = initialized();
        let before = pic.clone();
        pic.set_irq(2, IrqChange::Pulse);
        pic.set_irq(16, IrqChange::Pulse);
        pic.set_irq(255, IrqChange::Level(true));
        assert_eq!(pic, before);
    }

    /// One random guest access or line change, chosen by `r`; returns the bytes read and the
    /// vectors acknowledged.
    fn random_step(pic: &mut Pic, r: u32) -> Vec<u8> {
        let mut out = vec![];
        let bases = [0x20u16, 0xa0, 0x4d0];
        let base = bases[(r % 3) as usize];
        let offset = ((r >> 2) % 3) as u16;
        let len = [1usize, 2, 4][((r >> 4) % 3) as usize];
        let value = (r >> 8) as u8;
        match (r >> 16) % 4 {
            0 => access(|ctx| pic.pio_write(ctx, base, offset, &vec![value; len])),
            1 => {
                let mut b = vec![0u8; len];
                access(|ctx| pic.pio_read(ctx, base, offset, &mut b));
                out.extend(b);
            }
            2 => pic.set_irq((r >> 20) as u8 % 17, IrqChange::Pulse),
            _ => {
                pic.set_irq((r >> 20) as u8 % 17, IrqChange::Level(r & 1 != 0));
                if pic.has_pending_interrupt() {
                    out.push(pic.acknowledge().expect("pending means a vector"));
                }
            }
        }
        out
    }

    /// Arbitrary guest accesses never panic and the outcome is a pure function of the inputs.
    #[test]
    fn random_accesses_are_deterministic_and_panic_free() {
        let run = || {
            let mut pic = Pic::new();
            let mut seed = 0x1234_5678_9abc_def0u64;
            let mut vectors = vec![];
            for _ in 0..20_000 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                vectors.extend(random_step(&mut pic, (seed >> 33) as u32));
            }
            (pic, vectors)
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn state_restored_mid_run_continues_identically() {
        for seed in 0..40u64 {
            let split = (seed as usize * 97) % 3000;
            let (a, b) = lockstep(
                seed,
                split,
                3000,
                Pic::new(),
                |p| restored(p, Pic::new()),
                |pic, r| {
                    let out = random_step(pic, r);
                    (out, pic.has_pending_interrupt())
                },
            );
            assert_eq!(a.save_state(), b.save_state());
        }
    }

    #[test]
    fn state_saved_mid_initialization_finishes_the_sequence() {
        // ICW1 and ICW2 written; ICW3 and ICW4 still to come. A request is latched, one level is in
        // service on the slave, and a poll is pending on the master.
        let mut pic = initialized();
        pic.set_irq(12, IrqChange::Pulse);
        assert_eq!(pic.acknowledge(), Some(0x2c));
        pic.set_irq(3, IrqChange::Pulse);
        outb(&mut pic, 0x20, 0x0c);
        outb(&mut pic, 0xa0, 0x11);
        outb(&mut pic, 0xa1, 0x30);
        let mut twin = restored(&pic, Pic::new());
        for p in [&mut pic, &mut twin] {
            outb(p, 0xa1, 0x02);
            outb(p, 0xa1, 0x01);
            p.set_irq(9, IrqChange::Pulse);
        }
        assert_eq!((twin.slave.init, twin.slave.vector_base), (InitState::Ready, 0x30));
        let mut seen = vec![];
        for _ in 0..3 {
            let polled = inb(&mut pic, 0x20);
            assert_eq!(polled, inb(&mut twin, 0x20), "the pending poll");
            let vector = pic.acknowledge();
            assert_eq!(vector, twin.acknowledge());
            seen.push((polled, vector));
            eoi(&mut pic, 0x20);
            eoi(&mut twin, 0x20);
        }
        // Master IR2 in service blocks everything at first (the poll finds nothing); after the
        // EOI, IRQ9 comes through the slave's new vector base, then IRQ3.
        assert_eq!(seen, vec![(0x00, None), (0x0c, Some(0x31)), (0x08, Some(0x23))]);
        assert_eq!(pic, twin);
    }

    #[test]
    fn impossible_states_are_refused() {
        let pic = initialized();
        let mut fresh = Pic::new();
        let bad = |f: fn(&mut Pic)| {
            let mut s = pic.save_state();
            f(&mut s.0);
            s
        };
        refused(&mut fresh, &bad(|p| p.master.highest = 8), "highest-priority input 8");
        refused(&mut fresh, &bad(|p| p.slave.vector_base = 0x2b), "vector base 0x2b");
        refused(&mut fresh, &bad(|p| p.master.elcr = 0x01), "ELCR 0x01");
        refused(&mut fresh, &bad(|p| p.slave.is_master = true), "slave chip is marked");
        refused(&mut fresh, &bad(|p| (p.master.elcr, p.master.lines) = (0x20, 0x20)), "level inputs");
        refused(&mut fresh, &bad(|p| (p.master.init, p.master.single) = (InitState::Icw3, true)), "Icw3");
        refused(&mut fresh, &bad(|p| p.slave.irr = 0x01), "IR2 is false but the slave's INT output is true");
        // A malformed document is refused by the parser.
        let json = serde_json::to_string(&pic.save_state()).unwrap().replace("\"Ready\"", "\"Icw9\"");
        assert!(serde_json::from_str::<PicState>(&json).is_err());
    }
}
