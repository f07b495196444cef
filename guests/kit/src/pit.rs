//! The 8254 PIT: channel 0 as a 100 Hz rate generator on IRQ0, the kit's only time source
//! besides the RTC (the guest contract forbids the TSC).

use crate::port::outb;

/// The PIT's input clock.
pub const PIT_HZ: u32 = 1_193_182;
/// Timer interrupts per second.
pub const TICK_HZ: u32 = 100;
/// Channel-0 reload value: 1193182 / 11932 = 99.998 Hz.
pub const RELOAD: u16 = 11932;

#[inline(always)]
pub(crate) fn init() {
    outb(0x43, 0x34); // channel 0, lobyte/hibyte, mode 2 (rate generator), binary
    outb(0x40, (RELOAD & 0xff) as u8);
    outb(0x40, (RELOAD >> 8) as u8);
}
