//! Descriptor tables: the TSS (ring-0 stack and I/O permission bitmap) and the IDT.
//! The GDT itself is static data in `boot`. Everything here runs once, in ring 0, with
//! interrupts off; the functions are inlined into `kit_ring0_init` (section `.text.ring0`).

use core::arch::asm;
use core::ptr::{addr_of, addr_of_mut, write_volatile};

use crate::boot::selectors;

/// Number of IDT entries: exceptions 0-31 and the remapped 8259 vectors 0x20-0x2f.
pub const IDT_ENTRIES: usize = 48;
/// Distance between the interrupt stubs of `interrupts` (each is padded to this size).
pub const STUB_STRIDE: u64 = 16;

/// The 64-bit task state segment (Intel SDM vol. 3, 8.7).
#[repr(C, packed(4))]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

/// TSS followed by an I/O bitmap of zeros (ring 3 may use every port) and the 0xff byte
/// the CPU requires after the bitmap.
#[repr(C, align(16))]
struct TssWithIoBitmap {
    tss: Tss,
    io_bitmap: [u8; 8192],
    terminator: u8,
}

const TSS_SIZE: usize = core::mem::size_of::<Tss>();
const _: () = assert!(TSS_SIZE == 104);

static mut TSS: TssWithIoBitmap = TssWithIoBitmap {
    tss: Tss {
        _reserved0: 0,
        rsp: [0; 3],
        _reserved1: 0,
        ist: [0; 7],
        _reserved2: 0,
        _reserved3: 0,
        iomap_base: TSS_SIZE as u16,
    },
    io_bitmap: [0; 8192],
    terminator: 0xff,
};

/// The IDT: two quadwords per gate. Zeroed by the loader, filled by `load_idt`.
#[repr(C, align(16))]
struct Idt([u64; 2 * IDT_ENTRIES]);
static mut IDT: Idt = Idt([0; 2 * IDT_ENTRIES]);

#[repr(C, packed)]
struct DescriptorTablePointer {
    limit: u16,
    base: u64,
}

extern "C" {
    static mut kit_gdt: [u64; 7];
    static kit_kstack_top: u8;
    static kit_isr_stubs: u8;
}

/// Sets TSS.RSP0 (the stack interrupts from ring 3 switch to), writes the TSS descriptor
/// into the GDT and loads the task register.
#[inline(always)]
pub(crate) fn load_tss() {
    // SAFETY: ring-0 boot, single CPU, interrupts off: nothing else touches the TSS or the
    // GDT; the descriptor describes the live static `TSS`.
    unsafe {
        let tss = addr_of_mut!(TSS);
        // RSP0 is only 4-byte aligned in the packed TSS: store it as two halves.
        let rsp0 = addr_of_mut!((*tss).tss.rsp[0]) as *mut u32;
        let stack = addr_of!(kit_kstack_top) as u64;
        write_volatile(rsp0, stack as u32);
        write_volatile(rsp0.add(1), (stack >> 32) as u32);
        let base = tss as u64;
        let limit = (core::mem::size_of::<TssWithIoBitmap>() - 1) as u64;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40) // present, DPL 0, 64-bit available TSS
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let gdt = addr_of_mut!(kit_gdt) as *mut u64;
        let index = usize::from(selectors::TSS / 8);
        write_volatile(gdt.add(index), low);
        write_volatile(gdt.add(index + 1), base >> 32);
        asm!("ltr {0:x}", in(reg) selectors::TSS, options(nostack, preserves_flags));
    }
}

/// Points every IDT gate at its stub (interrupt gates, DPL 0) and loads the IDT.
#[inline(always)]
pub(crate) fn load_idt() {
    // SAFETY: as for `load_tss`; the stubs exist for every vector below IDT_ENTRIES.
    unsafe {
        let idt = addr_of_mut!(IDT) as *mut u64;
        let stubs = addr_of!(kit_isr_stubs) as u64;
        let mut vector = 0;
        // Volatile stores keep this a plain scalar loop: the emulator runs ring-0 code, and
        // there is no point in vectorizing 48 iterations.
        while vector < IDT_ENTRIES {
            let handler = stubs + vector as u64 * STUB_STRIDE;
            let low = (handler & 0xffff)
                | (u64::from(selectors::KERNEL_CODE) << 16)
                | (0x8e << 40) // present, DPL 0, interrupt gate (IF cleared on entry)
                | (((handler >> 16) & 0xffff) << 48);
            write_volatile(idt.add(2 * vector), low);
            write_volatile(idt.add(2 * vector + 1), handler >> 32);
            vector += 1;
        }
        let pointer = DescriptorTablePointer { limit: (IDT_ENTRIES * 16 - 1) as u16, base: idt as u64 };
        asm!("lidt [{0}]", in(reg) &pointer, options(readonly, nostack, preserves_flags));
    }
}
