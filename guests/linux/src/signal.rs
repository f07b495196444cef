//! Signal delivery (docs/linux-personality.md, "Signals").
//!
//! Signals come from two places: the operator's shutdown request (ftvm's SIGTERM or `ftvm ctl
//! shutdown`, Ctrl+Alt+Del on the keyboard, [`ftvm_guest_kit::shutdown`]), which becomes one
//! SIGTERM for the program, and `kill`/`tkill`/`tgkill` of the program itself. A pending signal
//! that the (process-wide) blocked mask lets through is delivered at the next return from a
//! system call, as Linux does on its way back to user space:
//!
//! - a handler (`rt_sigaction`, with or without SA_SIGINFO): a signal frame is built on the
//!   program's stack below its red zone, laid out as Linux's (`linux_abi::signal`: `rt_sigframe`
//!   with `ucontext`, `siginfo` and the x87/SSE state), the mask becomes the handler's
//!   (sa_mask, the signal unless SA_NODEFER; SA_RESETHAND resets the action), and the thread
//!   returns into the handler with RDI, RSI, RDX as Linux sets them and the `sa_restorer`
//!   (musl's `__restore_rt`) as its return address; `rt_sigreturn` puts back every register,
//!   the x87/SSE state and the mask. A handler without SA_RESTORER cannot return (Linux kills
//!   such a program with SIGSEGV): so does this one.
//! - SIG_IGN: dropped. SIG_DFL: ignored for SIGCHLD, SIGCONT, SIGURG and SIGWINCH; any other
//!   signal ends the program as Linux's "killed by signal N": the console says so and the exit
//!   status is 128 + N (143 for SIGTERM), what a shell reports for it.
//!
//! Not yet: interrupting a wait with EINTR (a thread blocked in a system call runs its handler
//! when that call returns: its timeout, I/O, a wake-up; a default action that ends the
//! program does so while every thread waits), alternate signal stacks, per-thread
//! masks and thread-directed signals (every thread shares the mask; the first thread to return
//! from a system call takes the signal).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ftvm_guest_kit::println;
use linux_abi::signal::{self as abi, Regs};

use crate::entry::Frame;

/// Signals sent to the program and not delivered yet (bit `sig - 1`).
static PENDING: AtomicU64 = AtomicU64::new(0);
/// The operator's request was turned into SIGTERM (once).
static RAISED: AtomicBool = AtomicBool::new(false);

/// Listens for the operator's shutdown request (the keyboard's IRQ 1).
pub fn init() {
    ftvm_guest_kit::shutdown::enable();
}

/// Sends `sig` to the program (kill of itself); delivered at the next system-call return.
pub fn raise(sig: u64) {
    PENDING.fetch_or(abi::bit(sig), Ordering::Relaxed);
}

/// The pending signals, taken (a fork: the child starts with none).
pub fn take_pending() -> u64 {
    PENDING.swap(0, Ordering::Relaxed)
}

/// The pending signals after a forked child ended: the parent's again.
pub fn set_pending(bits: u64) {
    PENDING.store(bits, Ordering::Relaxed);
}

/// Looks at the keyboard (takes its IRQ): the operator's request becomes a pending SIGTERM.
/// While a forked child runs the request waits (it stays latched): it is for the program,
/// the parent, not for its child.
/// Called at every system-call return and when every thread waits (then a signal whose
/// default action ends the program ends it at once, as Linux does wherever the program is;
/// a handler waits for the next system-call return).
pub fn poll() {
    if crate::fork::in_child() {
        return;
    }
    if !RAISED.load(Ordering::Relaxed) && ftvm_guest_kit::shutdown::requested() {
        RAISED.store(true, Ordering::Relaxed);
        println!("linux: shutdown requested by the operator: SIGTERM to the program");
        raise(abi::SIGTERM);
    }
}

/// When every thread waits: ends the program for a pending signal whose action is to end it.
pub fn poll_waiting() {
    poll();
    let k = crate::kernel();
    let mut ready = PENDING.load(Ordering::Relaxed) & !k.sigmask;
    while ready != 0 {
        let sig = u64::from(ready.trailing_zeros()) + 1;
        ready &= !abi::bit(sig);
        let handler = k.sigactions.get(&sig).map_or(abi::SIG_DFL, |a| a[0]);
        if handler == abi::SIG_DFL && !matches!(sig, 17 | 18 | 23 | 28) {
            killed(sig);
        }
    }
}

/// At the return of system call `frame` (its result in RAX): delivers one pending signal the
/// mask lets through.
pub fn on_return(frame: &mut Frame) {
    poll();
    let k = crate::kernel();
    let ready = PENDING.load(Ordering::Relaxed) & !(k.sigmask & !(abi::bit(abi::SIGKILL) | abi::bit(abi::SIGSTOP)));
    if ready == 0 {
        return;
    }
    let sig = u64::from(ready.trailing_zeros()) + 1;
    PENDING.fetch_and(!abi::bit(sig), Ordering::Relaxed);
    let [handler, flags, restorer, sa_mask] = k.sigactions.get(&sig).copied().unwrap_or([abi::SIG_DFL, 0, 0, 0]);
    match handler {
        abi::SIG_IGN if sig != abi::SIGKILL => {}
        abi::SIG_DFL | abi::SIG_IGN => match sig {
            17 | 18 | 23 | 28 => {}
            _ => killed(sig),
        },
        _ => {
            if flags & abi::SA_RESTORER == 0 || restorer == 0 {
                println!("linux: signal {sig}: the handler has no SA_RESTORER, it could not return");
                killed(11);
            }
            if flags & abi::SA_RESETHAND != 0 {
                k.sigactions.insert(sig, [abi::SIG_DFL, flags, restorer, sa_mask]);
            }
            let old_mask = k.sigmask;
            if deliver(frame, sig, handler, restorer, old_mask).is_err() {
                println!("linux: signal {sig}: no room for the signal frame below rsp {:#x}", frame.rsp);
                killed(11);
            }
            k.sigmask = abi::handler_mask(old_mask, sa_mask, flags, sig);
        }
    }
}

/// The default action of a fatal signal: the program ends as killed by `sig`.
fn killed(sig: u64) -> ! {
    let name = match sig {
        2 => " (SIGINT)",
        6 => " (SIGABRT)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        15 => " (SIGTERM)",
        _ => "",
    };
    println!("linux: the program was killed by signal {sig}{name}, exit status {} (128 + {sig})", 128 + sig);
    crate::exit_all(128 + sig)
}

/// The interrupted context as a `sigcontext` holds it. At a system-call return RCX and R11
/// are the syscall's own (RIP and RFLAGS), as on Linux.
fn regs_of(f: &Frame) -> Regs {
    Regs {
        r8: f.r8,
        r9: f.r9,
        r10: f.r10,
        r11: f.rflags,
        r12: f.r12,
        r13: f.r13,
        r14: f.r14,
        r15: f.r15,
        rdi: f.rdi,
        rsi: f.rsi,
        rbp: f.rbp,
        rbx: f.rbx,
        rdx: f.rdx,
        rax: f.rax,
        rcx: f.rip,
        rsp: f.rsp,
        rip: f.rip,
        eflags: f.rflags,
    }
}

/// Builds the signal frame on the program's stack and points `frame` at the handler.
fn deliver(frame: &mut Frame, sig: u64, handler: u64, restorer: u64, old_mask: u64) -> Result<(), i64> {
    let l = abi::layout(frame.rsp);
    let mem = crate::sys::user(l.frame, l.top - l.frame)?;
    let e = abi::build(&l, mem, &regs_of(frame), &frame.fx, sig, crate::PID, old_mask, handler, restorer);
    frame.rip = e.rip;
    frame.rsp = e.rsp;
    frame.rdi = e.rdi;
    frame.rsi = e.rsi;
    frame.rdx = e.rdx;
    frame.rax = 0;
    // DF and TF clear in the handler, as Linux leaves them.
    frame.rflags &= !(0x400 | 0x100);
    Ok(())
}

/// `rt_sigreturn`: the handler's restorer called it with RSP at the frame's `ucontext`.
/// Restores every register, the x87/SSE state and the mask; returns the interrupted RAX.
pub fn sigreturn(frame: &mut Frame) -> Result<i64, i64> {
    let uc = crate::sys::user(frame.rsp, abi::UCONTEXT_SIZE)?;
    let (r, fpstate, mask) = abi::restore(uc);
    if fpstate != 0 {
        let fx = crate::sys::user(fpstate, abi::FPSTATE_SIZE)?;
        frame.fx.copy_from_slice(fx);
        // MXCSR's reserved bits would make fxrstor fault: keep the defined ones.
        let mxcsr = u32::from_le_bytes([frame.fx[24], frame.fx[25], frame.fx[26], frame.fx[27]]) & 0xffff;
        frame.fx[24..28].copy_from_slice(&mxcsr.to_le_bytes());
    }
    frame.r8 = r.r8;
    frame.r9 = r.r9;
    frame.r10 = r.r10;
    frame.r12 = r.r12;
    frame.r13 = r.r13;
    frame.r14 = r.r14;
    frame.r15 = r.r15;
    frame.rdi = r.rdi;
    frame.rsi = r.rsi;
    frame.rbp = r.rbp;
    frame.rbx = r.rbx;
    frame.rdx = r.rdx;
    frame.rsp = r.rsp;
    frame.rip = r.rip;
    frame.rflags = (frame.rflags & !abi::USER_EFLAGS) | (r.eflags & abi::USER_EFLAGS);
    crate::kernel().sigmask = mask & !(abi::bit(abi::SIGKILL) | abi::bit(abi::SIGSTOP));
    Ok(r.rax as i64)
}
