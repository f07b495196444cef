//! System-call entry and return, and the switch between threads' kernel stacks.
//!
//! `syscall` jumps to LSTAR = `linux_syscall_entry`. On our KVM (PVM) it arrives there still
//! in ring 3; under QEMU (TCG) and on hardware KVM it arrives in ring 0 with interrupts off
//! (SFMASK) and the program's stack: the few ring-0 instructions only `iretq` to the same
//! ring-3 code. Either way the handler then runs in ring 3 on the current thread's kernel
//! stack (`linux_kstack_top`), so the program's stack, red zone included, is never touched.
//!
//! On that stack the entry saves every register ([`Frame`]: the general registers, RIP from
//! RCX, RFLAGS from R11, the program's RSP, and the x87/SSE state with `fxsave64`, since the
//! personality's own code uses SSE), calls `linux_syscall(&mut Frame)`, and returns by
//! restoring all of it, RFLAGS with `popfq` (ring 3 cannot change IF or IOPL that way, which
//! is right), and `jmp *%rcx`. As on Linux, RCX and R11 come back as RIP and RFLAGS.
//!
//! Rewritten `syscall` sites (`crate::rewrite`) never trap: their trampolines do what the
//! entry's first two instructions do, set R11 and RCX as `syscall` would, and jump straight
//! to `linux_syscall_ring3` (see [`trampoline_entry`]); the rest is the same.
//!
//! Threads: each has its own kernel stack; `linux_switch` saves the callee-saved registers
//! and the stack pointer of one and resumes another. A new thread's stack is prepared so
//! that its first switch "returns" into `linux_syscall_return` with its own Frame.

use core::sync::atomic::{AtomicU64, Ordering};

/// The registers of a thread stopped in a system call, as the entry saved them.
#[repr(C)]
#[derive(Clone)]
pub struct Frame {
    pub fx: [u8; 512],
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub rflags: u64,
    pub rip: u64,
    pub rsp: u64,
}

pub const FRAME_SIZE: usize = core::mem::size_of::<Frame>();
const _: () = assert!(FRAME_SIZE == 640);

/// Top of the current thread's kernel stack (the entry's stack), set by the scheduler.
#[export_name = "linux_kstack_top"]
pub static KSTACK_TOP: AtomicU64 = AtomicU64::new(0);
/// The program's RSP at entry (one CPU, no preemption of the entry: one slot suffices).
#[export_name = "linux_user_rsp"]
static USER_RSP: AtomicU64 = AtomicU64::new(0);
/// System calls that came through a real `syscall` (not a rewritten site's trampoline).
#[export_name = "linux_trapped_syscalls"]
pub static TRAPPED: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    .section .text.ring0, "ax", @progbits
    .globl linux_syscall_entry
linux_syscall_entry:
    mov %rsp, linux_user_rsp(%rip)
    mov linux_kstack_top(%rip), %rsp
    incq linux_trapped_syscalls(%rip)   # the flags are in R11 already
    push %rax
    mov %cs, %eax
    test $3, %al
    pop %rax
    jnz linux_syscall_ring3
    # Ring 0 (hardware KVM, QEMU TCG), interrupts off: continue in ring 3 on the kernel
    # stack, with the program's RFLAGS (R11), RCX and RAX untouched.
    movb $1, linux_entered_ring0(%rip)
    pushq $0x1b                     # SS: user data
    pushq linux_kstack_top(%rip)    # RSP
    push %r11                       # RFLAGS
    pushq $0x23                     # CS: user code
    pushq $linux_syscall_ring3      # RIP
    iretq

    .text
    .globl linux_syscall_ring3
linux_syscall_ring3:
    pushq linux_user_rsp(%rip)
    push %rcx
    push %r11
    push %rax
    push %rbx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r12
    push %r13
    push %r14
    push %r15
    sub $512, %rsp
    fxsave64 (%rsp)
    cld
    mov %rsp, %rdi
    call linux_syscall
    .globl linux_syscall_return
linux_syscall_return:
    fxrstor64 (%rsp)
    add $512, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rbx
    pop %rax
    mov (%rsp), %r11
    popfq
    pop %rcx
    pop %rsp
    jmp *%rcx

    # linux_switch(save: *mut u64 [rdi], resume: u64 [rsi])
    .globl linux_switch
linux_switch:
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, (%rdi)
    mov %rsi, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
    ret

    # linux_enter(frame [rdi]): starts the program (or a thread) from a prepared Frame.
    .globl linux_enter
linux_enter:
    mov %rdi, %rsp
    jmp linux_syscall_return

    # linux_fxsave(area [rdi]): the current x87/SSE state, for a fresh Frame.
    .globl linux_fxsave
linux_fxsave:
    fxsave64 (%rdi)
    ret
    "#,
    options(att_syntax)
);

// The emulations that rewritten CPUID, RDTSC and RDTSCP sites call (`crate::rewrite`), on
// the kernel stack (16-byte aligned at its top, so RSP = 8 mod 16 at entry). Each preserves
// every register it does not set, and RFLAGS: `lea` adjusts the stack, `pushfq`/`popfq`
// bracket whatever changes flags.
//
// CPUID: the kit's ring-0 CPUID (SYS_CPUID), which our KVM answers from the VMM's table: what
// ftvm configured, recorded in the log's header and compared by a pair, so a recording and
// its replay see the same values. In ring 3 our KVM would give the host's values, untrapped.
//
// RDTSC: `linux_tsc` (below), from the guest clock. RDTSCP: the same, ECX = 0 (TSC_AUX).
//
// RDRAND and RDSEED: `linux_random_word` (below) in RAX, and RFLAGS as a successful RDRAND
// leaves it (CF = 1; OF, SF, ZF, AF, PF = 0; the rest as they were). The trampoline saves
// RAX beside it and moves the value into the instruction's register (`crate::rewrite`).
core::arch::global_asm!(
    r#"
    .text
    # What the emulations below save around a call into Rust: RFLAGS and the caller-saved
    # registers they do not set (RAX is the result; RDX, which RDTSC sets, apart).
    .macro save_scratch
    pushfq
    push %rcx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    .endm
    .macro restore_scratch          # RFLAGS stays on the stack, for `popfq`
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rcx
    .endm
    # Calls `target` with the x87/SSE state saved beside it; `pad` makes RSP 16-byte aligned.
    .macro call_rust target, pad
    lea -\pad(%rsp), %rsp
    fxsave64 (%rsp)
    cld
    call \target
    fxrstor64 (%rsp)
    lea \pad(%rsp), %rsp
    .endm

    .globl linux_emulate_random
linux_emulate_random:
    save_scratch
    push %rdx
    call_rust linux_random_word, 512
    pop %rdx
    restore_scratch
    andq $~0x8d5, (%rsp)            # OF SF ZF AF PF CF of the saved RFLAGS
    orq $1, (%rsp)                  # CF: a value was returned
    popfq
    ret

    .globl linux_emulate_cpuid
linux_emulate_cpuid:                # EAX leaf, ECX subleaf
    push %rdi
    push %rsi
    mov %eax, %edi
    mov %ecx, %esi
    mov $5, %eax                    # SYS_CPUID (its iretq restores RFLAGS)
    ud2
    nopl 0x54494b(%rax)
    pop %rsi
    pop %rdi
    ret

    .globl linux_emulate_rdtscp
linux_emulate_rdtscp:
    lea -8(%rsp), %rsp              # RDTSC's alignment
    call linux_emulate_rdtsc
    lea 8(%rsp), %rsp
    mov $0, %ecx                    # TSC_AUX
    ret

    .globl linux_emulate_rdtsc
linux_emulate_rdtsc:
    save_scratch
    call_rust linux_tsc, 520
    mov %rax, %rdx
    shr $32, %rdx
    mov %eax, %eax
    restore_scratch
    popfq
    ret
    "#,
    options(att_syntax)
);

/// The emulated TSC: the guest's monotonic clock in nanoseconds (a fixed 1 GHz), from the
/// PIT ticks and PM timer samples that record/replay logs, so a replay reads the same
/// values; never the host's TSC. Each read is at least one more than the last, so the
/// counter strictly increases even within one tick of the clock's resolution.
#[no_mangle]
extern "C" fn linux_tsc() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let tsc = crate::vdso::now_ns(1).max(LAST.load(Ordering::Relaxed) + 1);
    LAST.store(tsc, Ordering::Relaxed);
    tsc
}

/// The emulated RDRAND's and RDSEED's value: a random word from virtio-rng (as getrandom's
/// bytes, logged by a recording), so a replay reads the same; never the host's generator.
#[no_mangle]
extern "C" fn linux_random_word() -> u64 {
    crate::sys::random_word(crate::kernel())
}

extern "C" {
    fn linux_emulate_random();
    fn linux_emulate_cpuid();
    fn linux_emulate_rdtsc();
    fn linux_emulate_rdtscp();
    fn linux_syscall_entry();
    fn linux_syscall_ring3();
    fn linux_syscall_return();
    fn linux_switch(save: *mut u64, resume: u64);
    fn linux_enter(frame: *const Frame) -> !;
    fn linux_fxsave(area: *mut u8);
}

/// Set by the ring-0 path of the entry (a `syscall` that entered ring 0).
#[export_name = "linux_entered_ring0"]
static ENTERED_RING0: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);

/// Points LSTAR at the entry, and finds out in which ring a `syscall` arrives: first with
/// SFMASK clearing IF (required where it enters ring 0: the first instructions run on the
/// program's stack, where an interrupt would clobber its red zone), then one `getpid`. If it
/// stayed in ring 3 (our KVM), IF is left alone, so that interrupts keep coming (the timer,
/// device IRQs) while the program computes: on our KVM a ring-3 RFLAGS.IF cleared by
/// `syscall` could not be set again by `popfq`, and time would stand still under load.
/// Returns whether `syscall` enters ring 0.
pub fn install() -> bool {
    use ftvm_guest_kit::syscall::{set_syscall_entry, SFMASK_AC, SFMASK_DF, SFMASK_IF, SFMASK_TF};
    let entry = linux_syscall_entry as *const () as u64;
    // SAFETY: `linux_syscall_entry` handles a `syscall` from ring 3 in both rings (above).
    unsafe { set_syscall_entry(entry, SFMASK_TF | SFMASK_IF | SFMASK_DF | SFMASK_AC) };
    // SAFETY: a plain getpid through the entry just installed (the kernel state is set up).
    unsafe { core::arch::asm!("syscall", inlateout("rax") 39u64 => _, out("rcx") _, out("r11") _) };
    let ring0 = ENTERED_RING0.load(Ordering::Relaxed) != 0;
    if !ring0 {
        // SAFETY: as above; only IF is no longer cleared.
        unsafe { set_syscall_entry(entry, SFMASK_TF | SFMASK_DF | SFMASK_AC) };
        // One more getpid, through the new SFMASK: on our KVM the IF that the first one
        // cleared stays clear until a `syscall` that leaves it alone (seen: a program whose
        // sites were all rewritten into jumps, so that it never executed `syscall`, then
        // computed with no timer interrupt at all: KVM reported IF=0 at every kick).
        // SAFETY: as above.
        unsafe { core::arch::asm!("syscall", inlateout("rax") 39u64 => _, out("rcx") _, out("r11") _) };
    }
    ring0
}

/// Where the trampolines of rewritten `syscall` sites enter (see `crate::rewrite`): they do
/// what the first two instructions of `linux_syscall_entry` do, set RCX and R11 as
/// `syscall` would, and jump to its ring-3 part, in ring 3 in every environment.
pub fn trampoline_entry() -> linux_abi::rewrite::Entry {
    linux_abi::rewrite::Entry {
        user_rsp: USER_RSP.as_ptr() as u64,
        kstack_top: KSTACK_TOP.as_ptr() as u64,
        handler: linux_syscall_ring3 as *const () as u64,
        cpuid: linux_emulate_cpuid as *const () as u64,
        rdtsc: linux_emulate_rdtsc as *const () as u64,
        rdtscp: linux_emulate_rdtscp as *const () as u64,
        random: linux_emulate_random as *const () as u64,
    }
}

/// A Frame with every register zero except those given, and the current FPU/SSE state.
pub fn fresh_frame(rip: u64, rsp: u64) -> Frame {
    let mut frame = Frame {
        fx: [0; 512],
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rbp: 0,
        rdi: 0,
        rsi: 0,
        rdx: 0,
        rbx: 0,
        rax: 0,
        rflags: 0x202,
        rip,
        rsp,
    };
    #[repr(align(16))]
    struct Area([u8; 512]);
    let mut area = Area([0; 512]);
    // SAFETY: a 16-byte aligned 512-byte buffer, as fxsave64 needs.
    unsafe { linux_fxsave(area.0.as_mut_ptr()) };
    frame.fx = area.0;
    frame
}

/// Copies `frame` to the top of the kernel stack whose top is `kstack_top` and enters it.
pub fn enter(kstack_top: u64, frame: &Frame) -> ! {
    let at = kstack_top - FRAME_SIZE as u64;
    KSTACK_TOP.store(kstack_top, Ordering::Relaxed);
    // SAFETY: the caller gives the top of a kernel stack nothing else uses now; the Frame
    // slot is 16-byte aligned (the top is).
    unsafe {
        core::ptr::write(at as *mut Frame, frame.clone());
        linux_enter(at as *const Frame)
    }
}

/// Prepares a new thread's kernel stack so that switching to it resumes `frame` in ring 3;
/// returns the stack pointer to give `switch`.
pub fn prepare(kstack_top: u64, frame: &Frame) -> u64 {
    let at = kstack_top - FRAME_SIZE as u64;
    let sp = at - 8 - 6 * 8;
    // SAFETY: the new, unused kernel stack of the thread.
    unsafe {
        core::ptr::write(at as *mut Frame, frame.clone());
        core::ptr::write((at - 8) as *mut u64, linux_syscall_return as *const () as u64);
        for i in 0..6 {
            core::ptr::write((sp + i * 8) as *mut u64, 0);
        }
    }
    sp
}

/// Saves the current kernel context to `save` and resumes the one at `resume`, whose kernel
/// stack top is `resume_top`.
pub fn switch(save: &mut u64, resume: u64, resume_top: u64) {
    KSTACK_TOP.store(resume_top, Ordering::Relaxed);
    // SAFETY: `resume` is a stack pointer saved by `switch` or made by `prepare`.
    unsafe { linux_switch(save as *mut u64, resume) }
}

core::arch::global_asm!(
    r#"
    .text
    .globl linux_probe_jmp
linux_probe_jmp:
    jmp *%rcx
    .globl linux_probe_spin
linux_probe_spin:                   # rdi = count
1:  dec %rdi
    jnz 1b
    ret
    .globl linux_probe_loop
linux_probe_loop:                   # rdi = count
1:  syscall
    dec %rdi
    jnz 1b
    ret
    "#,
    options(att_syntax)
);

extern "C" {
    fn linux_probe_jmp();
    fn linux_probe_loop(count: u64);
    fn linux_probe_spin(count: u64);
}

fn spin_ticks(n: u64) -> u64 {
    let t0 = ftvm_guest_kit::time::ticks();
    // SAFETY: a register-only loop.
    unsafe { linux_probe_spin(n) };
    ftvm_guest_kit::time::ticks() - t0
}

/// `linux.syscall_probe`: times `syscall` + `jmp *%rcx` from the personality itself.
pub fn probe() {
    // SFMASK leaves IF alone: on our KVM a cleared IF would stay cleared in ring 3 and stop
    // the PIT ticks this probe counts. SAFETY: the probe entry returns at once with `jmp *%rcx`.
    unsafe { ftvm_guest_kit::syscall::set_syscall_entry(linux_probe_jmp as *const () as u64, 0x40500) };
    ftvm_guest_kit::println!("linux: probe: 300M-iteration spin before any syscall: {} ticks", spin_ticks(300_000_000));
    // SAFETY: see above.
    unsafe { linux_probe_loop(1) };
    ftvm_guest_kit::println!("linux: probe: the same spin after one syscall: {} ticks", spin_ticks(300_000_000));
    ftvm_guest_kit::syscall::idle();
    ftvm_guest_kit::println!("linux: probe: the same spin after a kit idle (iretq): {} ticks", spin_ticks(300_000_000));
    for n in [1000u64, 100_000] {
        let t0 = ftvm_guest_kit::time::ticks();
        // SAFETY: see above.
        unsafe { linux_probe_loop(n) };
        let t1 = ftvm_guest_kit::time::ticks();
        ftvm_guest_kit::println!(
            "linux: probe: {n} x syscall+jmp *%rcx in {} ticks ({} us each)",
            t1 - t0,
            (t1 - t0) * 10_000 / n
        );
    }
}
