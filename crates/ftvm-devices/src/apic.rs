//! A register file at the local APIC's address, with no interrupt delivery.
//!
//! ftvm delivers interrupts through the 8259 PIC only and its CPUID table hides the local
//! APIC, but on PVM ring-0 CPUID forces the APIC bit on, so guests written for QEMU microvm
//! (whose APIC must be put in virtual-wire mode) still program it. This device lets them:
//! registers keep what is written and read it back; nothing is delivered through it.

use crate::bus::{DeviceContext, MmioDevice};
use crate::state::whole_device_state;
use crate::{ensure_state, StateError};

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

whole_device_state! {
    /// The complete state of the register stub: every register as last written.
    LocalApicState for LocalApicRegisters
}

impl LocalApicRegisters {
    fn check_state(&self) -> Result<(), StateError> {
        ensure_state!(self.regs.len() == 256, "local APIC", "{} registers instead of 256", self.regs.len());
        let (id, version) = (self.regs[REG_ID], self.regs[REG_VERSION]);
        ensure_state!(
            id == 0 && version == VERSION,
            "local APIC",
            "read-only ID {id:#x} / version {version:#x} changed"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::{lockstep, refused, restored};
    use crate::{IrqLines, ManualClock, Stateful};

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

    /// A random 1-8 byte read or write anywhere in the window; returns what was read.
    fn random_step(apic: &mut LocalApicRegisters, r: u32) -> Vec<u8> {
        let (mut c, mut i, mut q) = (ManualClock(0), IrqLines::default(), vec![]);
        let mut ctx = DeviceContext { inputs: &mut c, irqs: &mut i, requests: &mut q };
        let offset = u64::from(r % 0x1000) & if r & 0x1000 != 0 { !0xf } else { !0 };
        let mut data = vec![(r >> 24) as u8; 1 + (r >> 13) as usize % 8];
        if r & 0x10_0000 != 0 {
            apic.mmio_write(&mut ctx, LAPIC_BASE, offset, &data);
        } else {
            apic.mmio_read(&mut ctx, LAPIC_BASE, offset, &mut data);
        }
        data
    }

    #[test]
    fn state_restored_mid_run_continues_identically() {
        for seed in 0..10u64 {
            let fresh = || LocalApicRegisters::default();
            let (a, b) = lockstep(seed, 2000, 2000, fresh(), |d| restored(d, fresh()), random_step);
            assert_eq!(a, b);
            assert_ne!(a, fresh(), "the run changed registers");
        }
    }

    #[test]
    fn impossible_states_are_refused() {
        let mut fresh = LocalApicRegisters::default();
        let mut s = fresh.save_state();
        s.0.regs.pop();
        refused(&mut fresh, &s, "255 registers");
        let mut s = fresh.save_state();
        s.0.regs[REG_VERSION] = 0x10;
        refused(&mut fresh, &s, "version 0x10");
    }
}
