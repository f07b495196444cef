//! The 8259A pair: remapped to vectors 0x20 (master) and 0x28 (slave), only IRQ0 (the PIT)
//! unmasked. Programmed once in ring 0 by `kit_ring0_init`.

use crate::port::outb;

/// Master PIC command/data ports.
pub const MASTER_CMD: u16 = 0x20;
/// Master PIC data port (interrupt mask).
pub const MASTER_DATA: u16 = 0x21;
/// Slave PIC command port.
pub const SLAVE_CMD: u16 = 0xa0;
/// Slave PIC data port (interrupt mask).
pub const SLAVE_DATA: u16 = 0xa1;
/// Vector of master IRQ0.
pub const MASTER_VECTOR: u8 = 0x20;
/// Vector of slave IRQ8.
pub const SLAVE_VECTOR: u8 = 0x28;

#[inline(always)]
pub(crate) fn init() {
    outb(MASTER_CMD, 0x11); // ICW1: edge, cascade, ICW4 follows
    outb(SLAVE_CMD, 0x11);
    outb(MASTER_DATA, MASTER_VECTOR); // ICW2: vector base
    outb(SLAVE_DATA, SLAVE_VECTOR);
    outb(MASTER_DATA, 0x04); // ICW3: slave on IRQ2
    outb(SLAVE_DATA, 0x02); // ICW3: cascade identity
    outb(MASTER_DATA, 0x01); // ICW4: 8086 mode, normal EOI
    outb(SLAVE_DATA, 0x01);
    outb(MASTER_DATA, 0xfe); // masks: only IRQ0
    outb(SLAVE_DATA, 0xff);
}
