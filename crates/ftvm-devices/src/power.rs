//! The power port: how a guest asks ftvm to power off; and the ACPI power-management timer
//! beside it, a clock a guest can read without counting interrupts.
//!
//! A 16-bit write of 0x2000 (SLP_EN with sleep type 0, the value QEMU's ACPI PM control
//! register takes for S5) to port 0x604 powers the VM off. Machines without this device (QEMU
//! microvm) ignore the write, so the guest kit falls back to an i8042 reset and a triple fault.
//!
//! The PM timer at 0x608 (PM_TMR in QEMU's q35 layout, next to its PM1a control register at
//! 0x604) is ACPI's free-running 32-bit counter at 3.579545 MHz of guest time, counting from
//! guest time 0: a 4-byte read gives `floor(now * 3579545 / 10^9) mod 2^32`, wrapping every
//! 20 minutes. A guest that counts timer interrupts for its clock loses time when they come
//! late (the host busy); one that reads this now and then does not. Each read is a
//! time-dependent read, logged like the PIT's counts.
//!
//! The ports here are stateless (every access is answered from the access alone), so they have
//! no saved state and do not implement [`crate::Stateful`]: a snapshot needs nothing of them.

use crate::bus::{DeviceContext, PioDevice};
use crate::{GuestNanos, VmRequest};

/// The value that requests power-off.
pub const POWER_OFF_VALUE: u16 = 0x2000;

#[derive(Debug, Default, Clone)]
pub struct PowerPort;

impl PioDevice for PowerPort {
    fn pio_read(&mut self, _: &mut DeviceContext<'_>, _: u16, _: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, ctx: &mut DeviceContext<'_>, _: u16, offset: u16, data: &[u8]) {
        let value = match data {
            [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
            [lo] => u16::from(*lo),
            [] => 0,
        };
        if offset == 0 && value & POWER_OFF_VALUE != 0 {
            ctx.requests.push(VmRequest::PowerOff);
        }
    }
}

/// The PM timer's rate, Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;

/// The PM timer's count at guest time `ns` (all 64 bits; the port gives the low 32).
pub fn pm_timer_count(ns: GuestNanos) -> u64 {
    // u64::MAX * PM_TIMER_HZ / 10^9 < u64::MAX, so the cast is exact.
    (u128::from(ns) * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u64
}

/// The ACPI PM timer (read-only; writes are ignored).
#[derive(Debug, Default, Clone)]
pub struct PmTimer;

impl PioDevice for PmTimer {
    fn pio_read(&mut self, ctx: &mut DeviceContext<'_>, _: u16, offset: u16, data: &mut [u8]) {
        let count = (pm_timer_count(ctx.inputs.now()) as u32).to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = count.get(usize::from(offset) + i).copied().unwrap_or(0);
        }
    }

    fn pio_write(&mut self, _: &mut DeviceContext<'_>, _: u16, _: u16, _: &[u8]) {}
}

/// A port range that accepts anything and reads as zero (the POST diagnostic port 0x80, which
/// guests use as an I/O delay, and which benchmarks use as a no-op exit).
#[derive(Debug, Default, Clone)]
pub struct NullPort;

impl PioDevice for NullPort {
    fn pio_read(&mut self, _: &mut DeviceContext<'_>, _: u16, _: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn pio_write(&mut self, _: &mut DeviceContext<'_>, _: u16, _: u16, _: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IrqLines, ManualClock};

    #[test]
    fn only_the_power_off_value_requests_power_off() {
        let (mut c, mut i, mut r) = (ManualClock(0), IrqLines::default(), vec![]);
        let mut ctx = DeviceContext { inputs: &mut c, irqs: &mut i, requests: &mut r };
        PowerPort.pio_write(&mut ctx, 0x604, 0, &[0x00, 0x10]);
        PowerPort.pio_write(&mut ctx, 0x604, 0, &[]);
        assert!(ctx.requests.is_empty());
        PowerPort.pio_write(&mut ctx, 0x604, 0, &0x2000u16.to_le_bytes());
        assert_eq!(ctx.requests, &vec![VmRequest::PowerOff]);
    }

    fn pm_read(at: GuestNanos, offset: u16, len: usize) -> Vec<u8> {
        let (mut c, mut i, mut r) = (ManualClock(at), IrqLines::default(), vec![]);
        let mut ctx = DeviceContext { inputs: &mut c, irqs: &mut i, requests: &mut r };
        let mut data = vec![0xee; len];
        PmTimer.pio_read(&mut ctx, 0x608, offset, &mut data);
        data
    }

    #[test]
    fn the_pm_timer_counts_guest_time_at_its_rate_and_wraps_at_32_bits() {
        assert_eq!(pm_read(0, 0, 4), [0, 0, 0, 0]);
        // One second of guest time is 3,579,545 counts (0x369e99).
        assert_eq!(pm_read(1_000_000_000, 0, 4), 3_579_545u32.to_le_bytes());
        // A byte or a word reads its part of the count.
        assert_eq!(pm_read(1_000_000_000, 1, 1), [0x9e]);
        assert_eq!(pm_read(1_000_000_000, 2, 2), [0x36, 0]);
        // 2^32 counts (about 1199.86 s) later it reads the same again.
        let wrap = (1u128 << 32) * 1_000_000_000 / u128::from(PM_TIMER_HZ);
        let later = pm_timer_count(1_000_000_000 + wrap as u64 + 1) as u32;
        assert!(later.wrapping_sub(3_579_545) <= 1, "{later}");
        assert_eq!(pm_timer_count(u64::MAX), (u128::from(u64::MAX) * 3_579_545 / 1_000_000_000) as u64);
    }
}
