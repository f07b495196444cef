//! The local APIC, only where CPUID reports one: QEMU microvm has one that starts
//! software-disabled with LINT0 masked, so 8259 interrupts would never arrive; virtual-wire
//! mode (LINT0 = ExtINT) lets them through. ftvm reports no local APIC and needs nothing.

use core::arch::asm;
use core::ptr::write_volatile;
use core::sync::atomic::{AtomicBool, Ordering};

/// Default local APIC MMIO base (mapped supervisor-only, uncached, by `boot`).
pub const APIC_BASE: u64 = 0xfee0_0000;
const SVR: u64 = 0xf0;
const LVT0: u64 = 0x350;

static VIRTUAL_WIRE: AtomicBool = AtomicBool::new(false);

/// Whether the kit found a local APIC and put it in virtual-wire mode.
pub fn virtual_wire() -> bool {
    VIRTUAL_WIRE.load(Ordering::Relaxed)
}

/// CPUID leaf 1, EDX. Ring 0 only: the guest contract forbids CPUID in ring 3 (it would
/// return host values there), and this code lives in `.text.ring0` via `kit_ring0_init`.
#[inline(always)]
fn cpuid_1_edx() -> u32 {
    let edx: u32;
    // SAFETY: CPUID has no side effects; RBX (reserved by LLVM) is saved around it.
    unsafe {
        asm!(
            "mov {saved:r}, rbx",
            "cpuid",
            "mov rbx, {saved:r}",
            saved = out(reg) _,
            inout("eax") 1u32 => _,
            inout("ecx") 0u32 => _,
            out("edx") edx,
            options(nomem, nostack, preserves_flags)
        )
    };
    edx
}

#[inline(always)]
pub(crate) fn init() {
    if cpuid_1_edx() & (1 << 9) == 0 {
        return;
    }
    // SAFETY: CPUID reported a local APIC at its default base, identity-mapped by `boot`;
    // ring 0, interrupts off.
    unsafe {
        // Software-enable, spurious vector 0x2f (inside the IDT; low nibble must be 0xf).
        write_volatile((APIC_BASE + SVR) as *mut u32, 0x12f);
        // LINT0: ExtINT, unmasked, edge: the 8259's INTR passes through.
        write_volatile((APIC_BASE + LVT0) as *mut u32, 0x700);
    }
    VIRTUAL_WIRE.store(true, Ordering::Relaxed);
}
