//! Interrupt and exception entry points (ring 0).
//!
//! `kit_isr_stubs` holds one 16-byte stub per vector 0-47 (the IDT points at them):
//! - the timer (vector 0x20, PIT on IRQ0) increments `kit_ticks` and acknowledges the PIC:
//!   five instructions, because ring-0 code is emulated;
//! - the other PIC vectors (0x21-0x2f) set bit `irq` in `kit_irq_pending` and acknowledge
//!   the PIC; that is all ring 0 does for a device, the driver does the rest in ring 3
//!   (see `irq`). Masked lines only show up as spurious IRQ 7/15 (0x2f is also the local
//!   APIC's spurious vector), which no driver asks for;
//! - #UD (6) is the system-call gate (`syscall`), else a fault;
//! - every other exception prints the vector, error code and RIP and powers off.

use core::sync::atomic::{AtomicU64, Ordering};

/// PIT interrupts since boot, incremented by the ring-0 timer handler.
#[export_name = "kit_ticks"]
static TICKS: AtomicU64 = AtomicU64::new(0);

/// Number of timer interrupts taken since boot (readable from ring 3).
#[inline]
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// The tick counter itself, for code that reads it in assembly.
pub fn ticks_counter() -> &'static AtomicU64 {
    &TICKS
}

core::arch::global_asm!(
    r#"
    .section .text.ring0, "ax", @progbits
    .balign 16
    .globl kit_isr_stubs
kit_isr_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
    .balign 16
    .if \n == 6
    jmp kit_ud_entry
    .elseif \n == 32
    jmp kit_timer_entry
    .elseif \n >= 40
    push %rax
    mov $(1 << (\n - 32)), %eax     # the IRQ's bit in kit_irq_pending
    jmp kit_pic_slave_entry
    .elseif \n >= 33
    push %rax
    mov $(1 << (\n - 32)), %eax
    jmp kit_pic_master_entry
    .else
    .if \n != 8 && \n != 10 && \n != 11 && \n != 12 && \n != 13 && \n != 14 && \n != 17 && \n != 21 && \n != 29 && \n != 30
    pushq $0                        # no error code: push a dummy one for a uniform frame
    .endif
    pushq $\n
    jmp kit_exception_entry
    .endif
    .endr

kit_timer_entry:
    push %rax
    incq kit_ticks(%rip)
    mov $0x20, %al                  # non-specific EOI to the master PIC
    out %al, $0x20
    pop %rax
    iretq

    # EAX = the IRQ's bit, the caller's RAX pushed. One CPU and IF=0: a plain OR is atomic
    # for ring 3, which takes bits with locked instructions.
kit_pic_slave_entry:
    or %eax, kit_irq_pending(%rip)
    mov $0x20, %al
    out %al, $0xa0
    out %al, $0x20
    pop %rax
    iretq

kit_pic_master_entry:
    or %eax, kit_irq_pending(%rip)
    mov $0x20, %al
    out %al, $0x20
    pop %rax
    iretq

    # Frame: vector, error, RIP, CS, RFLAGS, RSP, SS.
    .globl kit_exception_entry      # also the #UD handler's fault path (syscall.rs)
kit_exception_entry:
    mov %rsp, %rdi
    and $-16, %rsp
    call kit_exception
1:  hlt
    jmp 1b
    "#,
    options(att_syntax)
);

/// What the exception stubs push, with the CPU's frame above it.
#[repr(C)]
pub struct ExceptionFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#MF(9)", "#TS", "#NP", "#SS", "#GP", "#PF",
    "reserved", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "reserved", "reserved", "reserved", "reserved", "reserved",
    "reserved", "#HV", "#VC", "#SX", "reserved",
];

/// Unexpected exception (ring 0, interrupts off): report it and power off.
#[no_mangle]
#[link_section = ".text.ring0"]
extern "C" fn kit_exception(frame: &ExceptionFrame) -> ! {
    let name = EXCEPTION_NAMES.get(frame.vector as usize).copied().unwrap_or("?");
    crate::println!(
        "kit: exception {} {} error {:#x} at rip {:#x} (ring {}) rsp {:#x} rflags {:#x}",
        frame.vector,
        name,
        frame.error,
        frame.rip,
        frame.cs & 3,
        frame.rsp,
        frame.rflags
    );
    if frame.vector == 14 {
        let cr2: u64;
        // SAFETY: reading CR2 in ring 0 has no side effects.
        unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
        crate::println!("kit: page fault address {cr2:#x}");
    }
    crate::power::power_off()
}
