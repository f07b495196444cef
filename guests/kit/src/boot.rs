//! The PVH boot path: 32-bit entry, static page tables, GDT, long mode, ring-0 init, ring 3.
//!
//! Ring-0 code runs in KVM's instruction emulator on our machines (~1.6 M instructions/s),
//! so this path does as little as it can: page tables and the GDT are static data (no fill
//! loops), BSS is not zeroed (loaders give zeroed memory), nothing is printed in ring 0.
//!
//! Memory map (identity-mapped, physical = virtual):
//! - 0 - 3 GiB: 2 MiB pages, user-accessible, write-back: all the RAM below the 32-bit
//!   MMIO hole (ftvm puts RAM past 3 GiB above 4 GiB). The image is at 1 MiB
//!   (`kit/link.ld`); the heap (`mem`) follows it up to the end of its RAM region. Mapped
//!   whole, RAM or not: nothing touches an address past the memory map's RAM.
//! - 3 - 4 GiB: 2 MiB pages, uncached, supervisor-only until ring 3 asks for one with
//!   `syscall::map_mmio` (virtio-mmio windows); never the local APIC page (0xfee00000).

use core::sync::atomic::{AtomicU64, Ordering};

/// Physical address of the `hvm_start_info` the loader passed in EBX (stored by the entry).
#[export_name = "kit_start_info_paddr"]
static START_INFO_PADDR: AtomicU64 = AtomicU64::new(0);

/// Physical address of the PVH `hvm_start_info` structure (0 if none was passed).
pub fn start_info_paddr() -> u64 {
    START_INFO_PADDR.load(Ordering::Relaxed)
}

/// A boot module the loader passed (`hvm_modlist_entry`): the initrd (`--initrd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module {
    /// Physical (= virtual, identity-mapped) address.
    pub paddr: u64,
    pub size: u64,
}

impl Module {
    /// The module's bytes. They stay valid for the guest's life: the heap never covers them.
    pub fn bytes(&self) -> &'static [u8] {
        // SAFETY: `capture_modules` kept only modules inside the identity-mapped 3 GiB, and
        // `mem::init` keeps the heap off them; nothing else writes them.
        unsafe { core::slice::from_raw_parts(self.paddr as *const u8, self.size as usize) }
    }
}

const MAX_MODULES: usize = 4;

struct Modules(core::cell::UnsafeCell<([Module; MAX_MODULES], usize)>);
// SAFETY: written once by `capture_modules` before the application starts, read-only after;
// one CPU, and interrupt handlers never touch it.
unsafe impl Sync for Modules {}

static MODULES: Modules = Modules(core::cell::UnsafeCell::new(([Module { paddr: 0, size: 0 }; MAX_MODULES], 0)));

/// Reads the loader's module list (`hvm_start_info.modlist_paddr`), keeping up to four
/// modules that lie below the identity-mapped 3 GiB. Runs once, in ring 3, before `mem::init`.
pub(crate) fn capture_modules(count: u32, modlist_paddr: u64) -> &'static [Module] {
    // hvm_modlist_entry: paddr u64, size u64, cmdline_paddr u64, reserved u64.
    const ENTRY: u64 = 32;
    let limit = crate::mem::MAPPED_LIMIT;
    // SAFETY: runs once before anything reads MODULES.
    let (slots, len) = unsafe { &mut *MODULES.0.get() };
    if modlist_paddr == 0 || modlist_paddr >= limit - ENTRY * MAX_MODULES as u64 {
        return &[];
    }
    for i in 0..(count as usize).min(MAX_MODULES) {
        let entry = modlist_paddr + i as u64 * ENTRY;
        // SAFETY: identity-mapped RAM below 3 GiB (checked above), written by the loader.
        let (paddr, size) = unsafe {
            (core::ptr::read_unaligned(entry as *const u64), core::ptr::read_unaligned((entry + 8) as *const u64))
        };
        if size > 0 && paddr.checked_add(size).is_some_and(|end| end <= limit) {
            slots[*len] = Module { paddr, size };
            *len += 1;
        }
    }
    &slots[..*len]
}

/// The boot modules (the initrd first), as the loader passed them; empty without any.
pub fn modules() -> &'static [Module] {
    // SAFETY: read-only after `capture_modules`.
    let (slots, len) = unsafe { &*MODULES.0.get() };
    &slots[..*len]
}

/// GDT selectors (see `kit_gdt` below).
pub mod selectors {
    /// Ring-0 64-bit code.
    pub const KERNEL_CODE: u16 = 0x08;
    /// Ring-0 data.
    pub const KERNEL_DATA: u16 = 0x10;
    /// Ring-3 data (RPL 3).
    pub const USER_DATA: u16 = 0x18 | 3;
    /// Ring-3 64-bit code (RPL 3).
    pub const USER_CODE: u16 = 0x20 | 3;
    /// The TSS (a 16-byte system descriptor).
    pub const TSS: u16 = 0x28;
}

core::arch::global_asm!(
    // XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit physical entry point, as QEMU, Firecracker and
    // ftvm (linux-loader) look for it.
    r#"
    .section .note.pvh, "a", @note
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .long pvh_start
    "#,
    // 32-bit protected mode, flat segments, paging off, EBX = &hvm_start_info.
    r#"
    .section .text.boot32, "ax", @progbits
    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    mov %ebx, kit_start_info_paddr
    mov $kit_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x620, %eax                 # PAE | OSFXSR | OSXMMEXCPT: ring 3 uses SSE
    mov %eax, %cr4
    mov $0xC0000080, %ecx           # EFER.LME
    rdmsr
    or $0x100, %eax
    wrmsr
    lgdt kit_gdtr
    mov %cr0, %eax
    and $~0x4, %eax                 # EM off: FPU/SSE present
    or $0x80000023, %eax            # PG | NE | MP | PE
    mov %eax, %cr0
    ljmp $0x08, $kit_long_mode
    .code64
    "#,
    // Long mode, ring 0: segments, stack, Rust init (arch/pic/pit/apic), then ring 3.
    r#"
    .section .text.ring0, "ax", @progbits
kit_long_mode:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    lea kit_kstack_top(%rip), %rsp
    call kit_ring0_init
    pushq $0x1b                     # SS: user data
    lea kit_ustack_top(%rip), %rax
    sub $8, %rax                    # as if called: RSP+8 16-byte aligned at entry
    push %rax
    pushq $0x202                    # RFLAGS: IF
    pushq $0x23                     # CS: user code
    lea kit_ring3_start(%rip), %rax
    push %rax
    iretq
    "#,
    // Static page tables: no fill loops in emulated ring 0.
    r#"
    .section .data.kit_paging, "aw", @progbits
    .balign 4096
    .globl kit_pml4
kit_pml4:
    .quad kit_pdpt + 0x7            # present, writable, user
    .fill 511, 8, 0
kit_pdpt:
    .quad kit_pd_low + 0x7
    .quad kit_pd_1g + 0x7
    .quad kit_pd_2g + 0x7
    .quad kit_pd_high + 0x7         # 3-4 GiB: each 2 MiB page decides (user only where mapped)
    .fill 508, 8, 0
kit_pd_low:                         # 0-1 GiB: 2 MiB pages, present, writable, user
    .set kit_page, 0
    .rept 512
    .quad kit_page + 0x87
    .set kit_page, kit_page + 0x200000
    .endr
kit_pd_1g:                          # 1-2 GiB: as 0-1 GiB
    .set kit_page, 0x40000000
    .rept 512
    .quad kit_page + 0x87
    .set kit_page, kit_page + 0x200000
    .endr
kit_pd_2g:                          # 2-3 GiB: as 0-1 GiB
    .set kit_page, 0x80000000
    .rept 512
    .quad kit_page + 0x87
    .set kit_page, kit_page + 0x200000
    .endr
    .globl kit_pd_high              # syscall.rs: SYS_MAP_MMIO sets U/S on one entry
kit_pd_high:                        # 3-4 GiB: 2 MiB pages, supervisor, PWT|PCD (APIC, virtio MMIO)
    .set kit_page, 0xC0000000
    .rept 512
    .quad kit_page + 0x9b
    .set kit_page, kit_page + 0x200000
    .endr
    "#,
    // GDT: null, ring-0 code/data, ring-3 data/code, TSS (base patched by arch::load_tss).
    r#"
    .section .data.kit_gdt, "aw", @progbits
    .balign 16
    .globl kit_gdt
kit_gdt:
    .quad 0
    .quad 0x00af9a000000ffff        # 0x08 ring-0 code64
    .quad 0x00cf92000000ffff        # 0x10 ring-0 data
    .quad 0x00cff2000000ffff        # 0x18 ring-3 data
    .quad 0x00affa000000ffff        # 0x20 ring-3 code64
    .quad 0, 0                      # 0x28 TSS
kit_gdt_end:
    .balign 8
kit_gdtr:
    .word kit_gdt_end - kit_gdt - 1
    .quad kit_gdt
    "#,
    // Stacks. The ring-0 stack (TSS.RSP0) also serves the boot path.
    r#"
    .section .bss.kit_stacks, "aw", @nobits
    .balign 4096
    .space 262144
    .globl kit_ustack_top
kit_ustack_top:
    .space 16384
    .globl kit_kstack_top
kit_kstack_top:
    "#,
    options(att_syntax)
);

/// Ring-0 initialization, called once by the boot path with interrupts off.
#[no_mangle]
#[link_section = ".text.ring0"]
extern "C" fn kit_ring0_init() {
    crate::arch::load_tss();
    crate::arch::load_idt();
    crate::pic::init();
    crate::pit::init();
    crate::apic::init();
}
