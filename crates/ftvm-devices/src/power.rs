//! The power port: how a guest asks ftvm to power off.
//!
//! A 16-bit write of 0x2000 (SLP_EN with sleep type 0, the value QEMU's ACPI PM control
//! register takes for S5) to port 0x604 powers the VM off. Machines without this device (QEMU
//! microvm) ignore the write, so the guest kit falls back to an i8042 reset and a triple fault.
//!
//! Both ports here are stateless (every access is answered from the access alone), so they have
//! no saved state and do not implement [`crate::Stateful`]: a snapshot needs nothing of them.

use crate::bus::{DeviceContext, PioDevice};
use crate::VmRequest;

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
}
