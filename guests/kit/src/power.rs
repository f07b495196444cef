//! Powering off, from any ring.
//!
//! Ring 0 (`kit_power_off_ring0`) tries, in order: ftvm's power port (16-bit write of
//! 0x2000 to port 0x604; QEMU microvm ignores it), the i8042 reset (0xfe to port 0x64;
//! absent on microvm), and a triple fault (a zero-limit IDT, then an exception: QEMU exits
//! with `-no-reboot`, KVM reports SHUTDOWN). Not `int3` nor `rdtscp`: in ring 0 both end
//! the VM with an internal error on our KVM.

use core::arch::asm;

/// ftvm's power-off port.
pub const POWER_PORT: u16 = 0x604;
/// Value written to [`POWER_PORT`] (ACPI-style SLP_EN).
pub const POWER_OFF_VALUE: u16 = 0x2000;

core::arch::global_asm!(
    r#"
    .section .text.ring0, "ax", @progbits
    .globl kit_power_off_ring0
kit_power_off_ring0:
    cli
    mov $0x604, %edx
    mov $0x2000, %eax
    out %ax, %dx
    mov $0xfe, %al
    out %al, $0x64
    lidt kit_null_idtr(%rip)
    ud2                             # #UD -> #GP -> #DF -> triple fault
1:  hlt
    jmp 1b

    .section .rodata.kit_null_idtr, "a", @progbits
    .balign 16
kit_null_idtr:
    .word 0
    .quad 0
    "#,
    options(att_syntax)
);

/// The privilege level the caller runs at (0 or 3).
#[inline]
pub fn current_ring() -> u16 {
    let cs: u16;
    // SAFETY: reading CS is allowed at any privilege level and has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3
}

/// Powers the machine off. Never returns.
pub fn power_off() -> ! {
    if current_ring() == 0 {
        // SAFETY: in ring 0 the power-off routine may be entered directly; it never returns.
        unsafe { asm!("jmp kit_power_off_ring0", options(noreturn)) }
    }
    crate::syscall::power_off_from_ring3()
}
