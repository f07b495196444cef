//! The ring-3 -> ring-0 system call.
//!
//! On our KVM, CPL3 `int n` raises #UD and `syscall` stays in ring 3, so the kit enters
//! ring 0 through an exception on purpose. A system call is the 9-byte sequence
//!
//! ```text
//!     ud2                          0f 0b
//!     nop dword ptr [rax+0x54494b] 0f 1f 80 4b 49 54 00   ("KIT": the tag)
//! ```
//!
//! with the call number in RAX; the result comes back in RAX. The #UD handler accepts it
//! only from ring 3 and only with the tag, so a stray `ud2` (an abort, a trap for
//! unreachable code) is still reported as a fault. It resumes after the tag.

use core::arch::asm;

/// `idle`: `sti; hlt` in ring 0, returns after the next interrupt has been handled, or at
/// once if a wanted device IRQ is pending (`irq`).
pub const SYS_IDLE: u64 = 0;
/// `power_off`: never returns (see `power`).
pub const SYS_POWER_OFF: u64 = 1;
/// `map_mmio`: makes the 2 MiB page holding the address in RDI (3-4 GiB, not the local
/// APIC's) accessible to ring 3; RAX = 0 on success, -1 if refused.
pub const SYS_MAP_MMIO: u64 = 2;
/// `set_fs_base`: writes RDI to IA32_FS_BASE (the FS segment base ring 3 uses for thread-local
/// storage, as Linux's `arch_prctl(ARCH_SET_FS)`); RAX = 0.
pub const SYS_SET_FS_BASE: u64 = 3;
/// `set_syscall_entry`: makes the `syscall` instruction usable: EFER.SCE, LSTAR = RDI,
/// STAR with the kit's selectors (ring-0 CS 0x08, ring-3 base 0x10), SFMASK = RSI (the
/// RFLAGS bits `syscall` clears: with IF among them, a `syscall` that enters ring 0, as on
/// hardware KVM, runs with interrupts off until the handler leaves ring 0). RAX = 0. On our
/// KVM a ring-3 `syscall` stays in ring 3.
pub const SYS_SET_SYSCALL_ENTRY: u64 = 4;
/// `cpuid`: CPUID leaf EDI, subleaf ESI, executed in ring 0, where our KVM traps it and
/// answers from the VMM's table (KVM_SET_CPUID2: fixed by ftvm's configuration, part of a
/// recording's header and of what a pair compares), as QEMU and hardware KVM do in every
/// ring; in ring 3 our KVM runs it natively and gives the host's values (platform.md).
/// Returns EAX, EBX, ECX, EDX as CPUID sets them; every other register is preserved.
pub const SYS_CPUID: u64 = 5;

core::arch::global_asm!(
    r#"
    .section .text.ring0, "ax", @progbits
    # Frame: RIP, CS, RFLAGS, RSP, SS (no error code for #UD).
    .globl kit_ud_entry
kit_ud_entry:
    testb $3, 8(%rsp)               # from ring 3?
    jz 2f
    push %rcx
    push %rdx
    mov 16(%rsp), %rcx              # faulting RIP
    movabs $0x54494b801f0f0b0f, %rdx  # ud2; nopl 0x54494b(%rax) (first 8 bytes)
    cmp %rdx, (%rcx)
    pop %rdx
    pop %rcx
    jne 2f
    addq $9, (%rsp)                 # resume after ud2 and the tag
    cmp $0, %rax                    # SYS_IDLE
    je 3f
    cmp $1, %rax                    # SYS_POWER_OFF
    je kit_power_off_ring0
    cmp $2, %rax                    # SYS_MAP_MMIO
    je 5f
    cmp $3, %rax                    # SYS_SET_FS_BASE
    je 7f
    cmp $4, %rax                    # SYS_SET_SYSCALL_ENTRY
    je 8f
    cmp $5, %rax                    # SYS_CPUID
    je 9f
    mov $-1, %rax                   # unknown call
    iretq
3:  mov kit_irq_pending(%rip), %eax # a wanted IRQ already fired: do not sleep (irq.rs)
    test kit_irq_wanted(%rip), %eax
    jnz 4f
    sti                             # the interrupt shadow of sti keeps sti;hlt atomic
    hlt
    cli
4:  xor %eax, %eax
    iretq
5:  push %rdi
    shr $21, %rdi                   # 2 MiB page number
    sub $0x600, %rdi                # index into kit_pd_high (3 GiB = page 0x600)
    cmp $512, %rdi
    jae 6f                          # outside 3-4 GiB
    cmp $0x1f7, %rdi                # 0xfee00000: the local APIC stays supervisor-only
    je 6f
    lea kit_pd_high(%rip), %rax
    orq $4, (%rax,%rdi,8)           # U/S
    pop %rdi
    invlpg (%rdi)
    xor %eax, %eax
    iretq
6:  pop %rdi
    mov $-1, %rax
    iretq
7:  push %rcx
    push %rdx
    mov $0xC0000100, %ecx           # IA32_FS_BASE
    mov %rdi, %rax
    mov %rdi, %rdx
    shr $32, %rdx
    wrmsr
    pop %rdx
    pop %rcx
    xor %eax, %eax
    iretq
8:  push %rcx
    push %rdx
    mov $0xC0000080, %ecx           # EFER.SCE
    rdmsr
    or $1, %eax
    wrmsr
    mov $0xC0000081, %ecx           # STAR: [47:32] ring-0 CS, [63:48] sysret base
    xor %eax, %eax
    mov $0x00100008, %edx
    wrmsr
    mov $0xC0000082, %ecx           # LSTAR
    mov %rdi, %rax
    mov %rdi, %rdx
    shr $32, %rdx
    wrmsr
    mov $0xC0000084, %ecx           # SFMASK = RSI
    mov %esi, %eax
    xor %edx, %edx
    wrmsr
    pop %rdx
    pop %rcx
    xor %eax, %eax
    iretq
9:  mov %edi, %eax
    mov %esi, %ecx
    cpuid
    iretq
2:  pushq $0
    pushq $6
    jmp kit_exception_entry
    "#,
    options(att_syntax)
);

/// Halts until the next interrupt (the 100 Hz timer at the latest) has been handled;
/// returns at once while a wanted device IRQ is pending (see `irq`).
#[inline]
pub fn idle() {
    // SAFETY: the tagged ud2 is handled by `kit_ud_entry`, which returns right after the
    // tag with RAX = 0; it runs on the ring-0 stack, so the ring-3 stack is untouched.
    unsafe {
        asm!(
            "ud2",
            "nop dword ptr [rax + 0x54494b]",
            inlateout("rax") SYS_IDLE => _,
            options(nostack)
        )
    }
}

/// Makes the 2 MiB page holding physical address `paddr` (in 3-4 GiB, uncached, identity
/// mapped) accessible to ring 3, for device MMIO windows. Refused (false) outside 3-4 GiB
/// and for the local APIC's page.
pub fn map_mmio(paddr: u64) -> bool {
    let result: u64;
    // SAFETY: as for `idle`; ring 0 only changes the U/S bit of one 3-4 GiB page-directory
    // entry, which holds no RAM the program could own.
    unsafe {
        asm!(
            "ud2",
            "nop dword ptr [rax + 0x54494b]",
            inlateout("rax") SYS_MAP_MMIO => result,
            in("rdi") paddr,
            options(nostack)
        )
    };
    result == 0
}

/// Sets the FS segment base (IA32_FS_BASE) for ring 3: thread-local storage.
pub fn set_fs_base(base: u64) {
    // SAFETY: as for `idle`; ring 0 writes one MSR that only changes FS-relative addressing.
    unsafe {
        asm!(
            "ud2",
            "nop dword ptr [rax + 0x54494b]",
            inlateout("rax") SYS_SET_FS_BASE => _,
            in("rdi") base,
            options(nostack)
        )
    }
}

/// RFLAGS bits for [`set_syscall_entry`]'s `sfmask`: TF, IF, DF, AC.
pub const SFMASK_TF: u64 = 1 << 8;
pub const SFMASK_IF: u64 = 1 << 9;
pub const SFMASK_DF: u64 = 1 << 10;
pub const SFMASK_AC: u64 = 1 << 18;

/// Makes `syscall` jump to `entry` (LSTAR), with EFER.SCE, STAR and SFMASK = `sfmask` (see
/// [`SYS_SET_SYSCALL_ENTRY`]).
///
/// # Safety
/// `entry` must be code that handles a `syscall` from ring 3 both when it arrives in ring 3
/// (our KVM) and in ring 0 with the caller's stack (hardware KVM, QEMU TCG).
pub unsafe fn set_syscall_entry(entry: u64, sfmask: u64) {
    // SAFETY: as for `idle`; the caller vouches for `entry`.
    unsafe {
        asm!(
            "ud2",
            "nop dword ptr [rax + 0x54494b]",
            inlateout("rax") SYS_SET_SYSCALL_ENTRY => _,
            in("rdi") entry,
            in("rsi") sfmask,
            options(nostack)
        )
    }
}

/// CPUID `leaf`/`subleaf` as the VMM's table answers it (see [`SYS_CPUID`]): EAX, EBX,
/// ECX, EDX.
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let (a, b, c, d): (u64, u64, u64, u64);
    // SAFETY: as for `idle`; ring 0 executes CPUID, which has no side effects. RBX is
    // reserved by LLVM, so it is saved around the call by hand.
    unsafe {
        asm!(
            "mov {saved}, rbx",
            "ud2",
            "nop dword ptr [rax + 0x54494b]",
            "xchg {saved}, rbx",
            saved = out(reg) b,
            inlateout("rax") SYS_CPUID => a,
            in("rdi") u64::from(leaf),
            in("rsi") u64::from(subleaf),
            lateout("rcx") c,
            lateout("rdx") d,
            options(nostack)
        )
    }
    [a as u32, b as u32, c as u32, d as u32]
}

/// Asks ring 0 to power the machine off.
pub(crate) fn power_off_from_ring3() -> ! {
    // SAFETY: as for `idle`; this call does not return.
    unsafe {
        asm!(
            "ud2",
            "nop dword ptr [rax + 0x54494b]",
            in("rax") SYS_POWER_OFF,
            options(noreturn, nostack)
        )
    }
}
