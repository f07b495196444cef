//! A register file at the local APIC's address, with no interrupt delivery.
//!
//! ftvm delivers interrupts through the 8259 PIC only and its CPUID table hides the local
//! APIC, but on PVM ring-0 CPUID forces the APIC bit on, so guests written for QEMU microvm
//! (whose APIC must be put in virtual-wire mode) still program it. This device lets them:
//! registers keep what is written and read it back; nothing is delivered through it.

use crate::bus::{DeviceContext, MmioDevice};

/// The local APIC's default physical base.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
pub const LAPIC_SIZE: u64 = 0x1000;

const REG_ID: usize = 0x20 / 16;
const REG_VERSION: usize = 0x30 / 16;
/// Version 0x14 with 6 LVT entries (what an integrated APIC reports).
const VERSION: u32 = 0x0005_0014;

/// 256 registers of 16 bytes each; the low 4 bytes of each hold the value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalApicRegisters {
    regs: Vec<u32>,
}

impl Default for LocalApicRegisters {
    fn default() -> Self {
        let mut regs = vec![0u32; 256];
        regs[REG_VERSION] = VERSION;
        regs[0xf0 / 16] = 0xff; // spurious vector register: APIC software-disabled
        for lvt in [0x320, 0x330, 0x340, 0x350, 0x360, 0x370] {
            regs[lvt / 16] = 1 << 16; // masked
        }
        LocalApicRegisters { regs }
    }
}

impl MmioDevice for LocalApicRegisters {
    fn mmio_read(&mut self, _: &mut DeviceContext<'_>, _: u64, offset: u64, data: &mut [u8]) {
        let reg = (offset as usize / 16) % 256;
        let value = if offset % 16 == 0 { self.regs[reg] } else { 0 };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn mmio_write(&mut self, _: &mut DeviceContext<'_>, _: u64, offset: u64, data: &[u8]) {
        let reg = (offset as usize / 16) % 256;
        if offset % 16 != 0 || reg == REG_ID || reg == REG_VERSION {
            return;
        }
        let mut bytes = [0u8; 4];
        for (d, s) in bytes.iter_mut().zip(data) {
            *d = *s;
        }
        self.regs[reg] = u32::from_le_bytes(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IrqLines, ManualClock};

    #[test]
    fn registers_read_back_and_version_is_fixed() {
        let mut apic = LocalApicRegisters::default();
        let (mut c, mut i, mut r) = (ManualClock(0), IrqLines::default(), vec![]);
        let mut ctx = DeviceContext { inputs: &mut c, irqs: &mut i, requests: &mut r };
        apic.mmio_write(&mut ctx, LAPIC_BASE, 0xf0, &0x1ffu32.to_le_bytes());
        apic.mmio_write(&mut ctx, LAPIC_BASE, 0x30, &0u32.to_le_bytes());
        let mut b = [0u8; 4];
        apic.mmio_read(&mut ctx, LAPIC_BASE, 0xf0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1ff);
        apic.mmio_read(&mut ctx, LAPIC_BASE, 0x30, &mut b);
        assert_eq!(u32::from_le_bytes(b), VERSION);
        apic.mmio_read(&mut ctx, LAPIC_BASE, 0xffc, &mut [0u8; 8]);
        apic.mmio_write(&mut ctx, LAPIC_BASE, 0xfff, &[1]);
    }
}
