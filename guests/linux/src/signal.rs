//! Signal delivery (docs/linux-personality.md, "Signals").
//!
//! Signals come from four places: the operator's shutdown request (ftvm's SIGTERM or `ftvm
//! ctl shutdown`, Ctrl+Alt+Del on the keyboard, [`ftvm_guest_kit::shutdown`]), which becomes one
//! SIGTERM for the program; `kill`/`tkill`/`tgkill` of the program itself; its timers
//! (`setitimer`, `alarm`: SIGALRM, SIGVTALRM, SIGPROF; `timer_create`), which count guest time;
//! and a forked child's end (SIGCHLD). All are looked at only at guest-visible points (a
//! system-call return, a scheduler pass), so where a signal lands depends only on the guest's
//! logged inputs.
//!
//! As on Linux, a process-directed signal (kill, the timers, the operator's) is pending for the
//! process and goes to the main thread unless it blocks it, else to the first thread by tid
//! that does not; a thread-directed one (tkill, tgkill) is pending for that thread. Masks are
//! per thread (`rt_sigprocmask`). A signal whose action is to ignore it (SIG_IGN, or SIG_DFL of
//! SIGCHLD, SIGCONT, SIGURG, SIGWINCH) is dropped when sent unless its target blocks it, and
//! never interrupts anything; any other one, when its target thread waits in a system call,
//! ends the wait: the call returns one of Linux's internal restart codes
//! (`linux_abi::signal::ERESTARTSYS` ...), and on the way out the first pending signal the
//! thread's mask lets through (its own first, then the process's, lowest number first) is
//! taken, at every system-call return:
//!
//! - a handler (`rt_sigaction`, with or without SA_SIGINFO): the interrupted call returns EINTR,
//!   or restarts (`linux_abi::signal::after_handler`: with SA_RESTART for read, write, accept,
//!   futex waits; never for nanosleep, epoll_wait, poll, pause, sigsuspend); a signal frame is
//!   built below the red zone of the program's stack, or at the top of the thread's alternate
//!   stack for an SA_ONSTACK action, laid out as Linux's (`linux_abi::signal`: `rt_sigframe` with
//!   `ucontext`, `siginfo` and the x87/SSE state), the mask becomes the handler's (sa_mask, the
//!   signal unless SA_NODEFER; SA_RESETHAND resets the action), and the thread returns into the
//!   handler with RDI, RSI, RDX as Linux sets them and the `sa_restorer` (musl's `__restore_rt`)
//!   as its return address; `rt_sigreturn` puts back every register, the x87/SSE state and the
//!   mask, and runs a call to restart again from its saved arguments. A handler without
//!   SA_RESTORER cannot return (Linux kills such a program with SIGSEGV): so does this one.
//! - SIG_DFL of a signal not ignored: the program ends as Linux's "killed by signal N": the
//!   console says so and the exit status is 128 + N (143 for SIGTERM), what a shell reports.
//!
//! `siginfo` says who sent the signal (SI_USER, SI_TKILL, SI_KERNEL for an interval timer,
//! SI_TIMER for a POSIX timer, SIGCHLD's CLD_*); `rt_sigtimedwait` takes a signal of its set.
//!
//! A standard signal is pending once, a realtime one queued (`linux_abi::signal::Pending`);
//! `rt_sigqueueinfo` (sigqueue) sends one with the caller's `siginfo`.
//!
//! Not done: a program computing without system calls takes its signals at its next system
//! call (nothing preempts it); no signalfd; hardware exceptions do not become signals.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use alloc::vec::Vec;
use ftvm_guest_kit::println;
use linux_abi::signal::{self as abi, Action, ITimer, Info, Pending, Regs, Resume};

use crate::entry::Frame;

/// The process's signal state: what fork sets aside for its child.
pub struct Process {
    /// Signals sent to the process and not taken yet.
    pub pending: Pending,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF (all three count guest time).
    pub timers: [ITimer; 3],
    /// POSIX timers (`timer_create`), by id.
    pub posix: Vec<Option<PosixTimer>>,
}

impl Process {
    const fn new() -> Process {
        const DISARMED: ITimer = ITimer { next: None, interval: 0 };
        Process { pending: Pending::new(), timers: [DISARMED; 3], posix: Vec::new() }
    }
}

impl Default for Process {
    fn default() -> Process {
        Process::new()
    }
}

/// A POSIX timer: an interval timer (in CLOCK_MONOTONIC ns; every clock counts guest time)
/// and what its expiry does.
#[derive(Clone, Copy)]
pub struct PosixTimer {
    pub timer: ITimer,
    /// The clock it was created on (TIMER_ABSTIME values are on it).
    pub clock: u64,
    /// What an expiry does.
    pub notify: Notify,
    pub sig: u64,
    /// The `sigval` its signal carries.
    pub value: u64,
    /// The expiries its last signal stood for, less one (`timer_getoverrun`).
    pub overrun: u64,
}

/// SIGEV_SIGNAL: the signal to the process; SIGEV_THREAD_ID: to that thread; SIGEV_NONE: none.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    None,
    Process,
    Thread(u32),
}

struct Global(UnsafeCell<Process>);
// SAFETY: one CPU; only system calls and the scheduler (never interrupt handlers) touch it.
unsafe impl Sync for Global {}

static PROCESS: Global = Global(UnsafeCell::new(Process::new()));
/// The operator's request was turned into SIGTERM (once).
static RAISED: AtomicBool = AtomicBool::new(false);

fn process() -> &'static mut Process {
    // SAFETY: see `Global`; callers do not keep the reference across a thread switch.
    unsafe { &mut *PROCESS.0.get() }
}

/// Listens for the operator's shutdown request (the keyboard's IRQ 1).
pub fn init() {
    ftvm_guest_kit::shutdown::enable();
}

/// The action installed for `sig`: [handler, flags, restorer, mask].
fn sigaction(sig: u64) -> [u64; 4] {
    crate::kernel().sigactions.get(&sig).copied().unwrap_or([abi::SIG_DFL, 0, 0, 0])
}

fn ignored(sig: u64) -> bool {
    abi::action(sig, sigaction(sig)[0]) == Action::Ignore
}

/// Sends `sig` to the process (kill of itself, a timer, the operator, sigqueue), saying `info`:
/// pending for the process; the thread it goes to is woken if it waits. False: a realtime
/// signal the queue had no room for (sigqueue's EAGAIN).
pub fn raise(sig: u64, info: Info) -> bool {
    let s = crate::sched();
    let targets = s.signal_targets(crate::fork::pid());
    // Dropped at once if ignored, unless the main thread blocks it (Linux's `sig_ignored`).
    let main_blocks = targets.first().is_some_and(|&(_, m)| m & abi::bit(sig) != 0);
    if ignored(sig) && !main_blocks {
        return true;
    }
    if !process().pending.add(sig, info) {
        return false;
    }
    let masks: alloc::vec::Vec<u64> = targets.iter().map(|&(_, m)| m).collect();
    if let Some(i) = abi::pick_thread(&masks, sig) {
        s.interrupt(targets[i].0);
    }
    true
}

/// Sends `sig` to the thread in slot `slot` (tkill, tgkill, a POSIX timer's SIGEV_THREAD_ID),
/// saying `info`. False as for [`raise`].
pub fn raise_thread(slot: usize, sig: u64, info: Info) -> bool {
    let s = crate::sched();
    let t = &mut s.threads[slot];
    let blocked = t.sigmask & !abi::UNBLOCKABLE & abi::bit(sig) != 0;
    if ignored(sig) && !blocked {
        return true;
    }
    if !t.pending.add(sig, info) {
        return false;
    }
    if !blocked {
        s.interrupt(slot);
    }
    true
}

/// `rt_sigaction` set `sig` to be ignored: its pending instances go (POSIX, Linux).
pub fn discard(sig: u64) {
    if ignored(sig) {
        process().pending.discard(sig);
        for t in &mut crate::sched().threads {
            t.pending.discard(sig);
        }
    }
}

/// The pending signals blocked by the current thread (`rt_sigpending`).
pub fn pending_blocked() -> u64 {
    let t = crate::sched().current();
    (t.pending.bits() | process().pending.bits()) & t.sigmask
}

/// The process's signal state, taken (a fork: the child starts with nothing pending and no
/// timers, as on Linux).
pub fn take_process() -> Process {
    core::mem::take(process())
}

/// The process's signal state after a forked child ended: the parent's again.
pub fn set_process(p: Process) {
    *process() = p;
}

/// `setitimer`/`alarm`: timer `which` (0 REAL, 1 VIRTUAL, 2 PROF) set to expire `value` ns from
/// now (0: disarmed), then every `interval`. Returns the old (remaining, interval).
pub fn set_timer(which: usize, value: u64, interval: u64) -> (u64, u64) {
    process().timers[which].set(now(), value, interval)
}

/// `getitimer`: timer `which`'s (remaining, interval).
pub fn timer(which: usize) -> (u64, u64) {
    let t = &process().timers[which];
    (t.remaining(now()), t.interval)
}

/// The most POSIX timers a process has at once.
const MAX_TIMERS: usize = 1024;

/// `timer_create`: a disarmed timer on `clock` whose signal carries `value` (None: its id, as
/// Linux's default); its id (None: too many).
pub fn timer_create(clock: u64, notify: Notify, sig: u64, value: Option<u64>) -> Option<usize> {
    let timers = &mut process().posix;
    let id = match timers.iter().position(Option::is_none) {
        Some(id) => id,
        None if timers.len() < MAX_TIMERS => {
            timers.push(None);
            timers.len() - 1
        }
        None => return None,
    };
    let value = value.unwrap_or(id as u64);
    timers[id] = Some(PosixTimer { timer: ITimer::default(), clock, notify, sig, value, overrun: 0 });
    Some(id)
}

fn posix_timer(id: u64) -> Option<&'static mut PosixTimer> {
    process().posix.get_mut(usize::try_from(id).ok()?)?.as_mut()
}

/// `timer_settime`: timer `id` to expire `value` ns from now (or at `value` on its clock when
/// `absolute`; 0 disarms), then every `interval`. The old (remaining, interval).
pub fn timer_settime(id: u64, absolute: bool, value: u64, interval: u64) -> Option<(u64, u64)> {
    let t = posix_timer(id)?;
    let value = if absolute && value > 0 { value.saturating_sub(crate::vdso::now_ns(t.clock)).max(1) } else { value };
    Some(t.timer.set(now(), value, interval))
}

/// `timer_gettime`: timer `id`'s (remaining, interval).
pub fn timer_gettime(id: u64) -> Option<(u64, u64)> {
    posix_timer(id).map(|t| (t.timer.remaining(now()), t.timer.interval))
}

/// `timer_getoverrun`: the expiries timer `id`'s last signal stood for, less one.
pub fn timer_getoverrun(id: u64) -> Option<u64> {
    posix_timer(id).map(|t| t.overrun.min(i32::MAX as u64))
}

/// `timer_delete`; false if there is no such timer.
pub fn timer_delete(id: usize) -> bool {
    match process().posix.get_mut(id) {
        Some(slot @ Some(_)) => {
            *slot = None;
            true
        }
        _ => false,
    }
}

fn now() -> u64 {
    crate::vdso::now_ns(1)
}

/// Looks at the keyboard (takes its IRQ): the operator's request becomes a pending SIGTERM;
/// and at the timers: an expired one sends its signal. While a forked child runs the request
/// waits (it stays latched): it is for the program, the parent, not for its child.
/// Called at every system-call return and by the scheduler at every pass.
pub fn poll() {
    if !crate::fork::in_child() && !RAISED.load(Ordering::Relaxed) && ftvm_guest_kit::shutdown::requested() {
        RAISED.store(true, Ordering::Relaxed);
        println!("linux: shutdown requested by the operator: SIGTERM to the program");
        raise(abi::SIGTERM, Info::user(crate::PID));
    }
    let p = process();
    if p.timers.iter().all(|t| t.next.is_none()) && p.posix.iter().flatten().all(|t| t.timer.next.is_none()) {
        return;
    }
    let now = now();
    for (which, sig) in [abi::SIGALRM, abi::SIGVTALRM, abi::SIGPROF].into_iter().enumerate() {
        if process().timers[which].expire(now) > 0 {
            raise(sig, Info::kernel());
        }
    }
    for id in 0..process().posix.len() {
        let Some(t) = process().posix[id].as_mut() else { continue };
        let n = t.timer.expire(now);
        if n == 0 {
            continue;
        }
        t.overrun = n - 1;
        let (notify, sig) = (t.notify, t.sig);
        let info = Info::timer(id as u32, (n - 1).min(i32::MAX as u64) as u32, t.value);
        match notify {
            Notify::None => {}
            // A full queue loses the expiry (Linux keeps one slot per timer and counts it as
            // an overrun).
            Notify::Process => {
                raise(sig, info);
            }
            Notify::Thread(tid) => {
                if let Some(slot) = crate::sched().slot_of(tid) {
                    raise_thread(slot, sig, info);
                }
            }
        }
    }
}

/// `rt_sigtimedwait(set, info, timeout)`: takes a pending signal of `set` (the thread's own
/// first, lowest number first), waiting for one until `timeout` ns (None: for ever; 0: only
/// looks) with them unblocked meanwhile, so that they come to this thread (Linux's
/// `real_blocked`). Returns its number and writes its `siginfo` to `info_ptr` (if not 0);
/// EAGAIN when the time is up; EINTR when another signal's handler runs first.
pub fn sigtimedwait(set: u64, info_ptr: u64, timeout: Option<u64>) -> Result<i64, i64> {
    const EAGAIN: i64 = 11;
    let set = set & !abi::UNBLOCKABLE;
    let deadline = timeout.map(|ns| if ns == 0 { 0 } else { crate::sched::deadline_ns(ns) });
    let old = crate::sched().current().sigmask;
    loop {
        let t = crate::sched().current();
        if let Some((sig, own)) = abi::next_signal(t.pending.bits() & set, process().pending.bits() & set, 0) {
            t.sigmask = old;
            let info = take(sig, own);
            if info_ptr != 0 {
                crate::sys::user(info_ptr, abi::SIGINFO_SIZE)?.copy_from_slice(&abi::siginfo(sig, &info));
            }
            return Ok(sig as i64);
        }
        if deadline.is_some_and(|d| ftvm_guest_kit::time::ticks() >= d) {
            t.sigmask = old;
            return Err(EAGAIN);
        }
        t.sigmask = old & !set;
        if interrupted() {
            // The handler's frame saves (and its return restores) the mask of before the call.
            let t = crate::sched().current();
            t.saved_mask = Some(old);
            return Err(abi::EINTR);
        }
        crate::sched::block(crate::sched::Wait::Sleep, deadline);
    }
}

/// Takes one instance of `sig` from the current thread's pending set (`own`) or the process's.
fn take(sig: u64, own: bool) -> Info {
    let set = if own { &mut crate::sched().current().pending } else { &mut process().pending };
    set.take(sig).unwrap_or_default()
}

/// Whether a signal ends the current thread's wait: one pending for it or the process that its
/// mask lets through and whose action is not to ignore it.
pub fn interrupted() -> bool {
    let t = crate::sched().current();
    let mut ready = (t.pending.bits() | process().pending.bits()) & !(t.sigmask & !abi::UNBLOCKABLE);
    while ready != 0 {
        let sig = u64::from(ready.trailing_zeros()) + 1;
        ready &= !abi::bit(sig);
        if !ignored(sig) {
            return true;
        }
    }
    false
}

/// The count of `crate::entry::TRAPPED` the last system call saw.
static TRAPPED_SEEN: AtomicU64 = AtomicU64::new(0);

/// Whether the system call being entered came through a real `syscall` instruction (not a
/// rewritten site's trampoline): the entry counted it just before. Called once per entry.
pub fn entered_by_syscall() -> bool {
    let now = crate::entry::TRAPPED.load(Ordering::Relaxed);
    TRAPPED_SEEN.swap(now, Ordering::Relaxed) != now
}

/// At the return of system call `nr` of `frame` (its result in RAX): takes the pending signals
/// the mask lets through until one runs a handler (or ends the program), and turns an internal
/// restart code into EINTR or a restart. Returns true when the call must run again now (no
/// handler ran); RAX is then `nr` again. `nr` u64::MAX: not a call's result (`rt_sigreturn`
/// put back the interrupted RAX), left alone. `trapped`: the call came through a real
/// `syscall` (at RIP - 2), which a restart after a handler re-executes, as Linux rewinds it;
/// a rewritten site's call restarts at `rt_sigreturn` instead (the frame's restart mark).
pub fn on_return(frame: &mut Frame, nr: u64, trapped: bool) -> bool {
    poll();
    let rax = if nr == u64::MAX { 0 } else { frame.rax as i64 };
    if !abi::interrupted_result(rax) {
        let t = crate::sched().current();
        if let Some(mask) = t.saved_mask.take() {
            t.sigmask = mask;
        }
    }
    loop {
        let t = crate::sched().current();
        let Some((sig, own)) = abi::next_signal(t.pending.bits(), process().pending.bits(), t.sigmask) else {
            break;
        };
        let info = take(sig, own);
        let [handler, flags, restorer, sa_mask] = sigaction(sig);
        match abi::action(sig, handler) {
            Action::Ignore => continue,
            Action::Kill => killed(sig),
            Action::Handler => {}
        }
        if flags & abi::SA_RESTORER == 0 || restorer == 0 {
            println!("linux: signal {sig}: the handler has no SA_RESTORER, it could not return");
            killed(11);
        }
        if flags & abi::SA_RESETHAND != 0 {
            crate::kernel().sigactions.insert(sig, [abi::SIG_DFL, flags, restorer, sa_mask]);
        }
        let restart = match abi::after_handler(rax, flags) {
            Resume::Return(_) if nr == u64::MAX => false,
            Resume::Return(value) => {
                frame.rax = value as u64;
                false
            }
            Resume::Restart if trapped => {
                frame.rax = nr;
                frame.rip -= 2;
                false
            }
            Resume::Restart => {
                frame.rax = nr;
                true
            }
        };
        let t = crate::sched().current();
        let old_mask = t.saved_mask.take().unwrap_or(t.sigmask);
        let (altstack, rsp) = (t.altstack, frame.rsp);
        let d = abi::Delivery { sig, info, old_mask, handler, restorer, stack: altstack.reported(rsp), restart };
        if deliver(frame, &altstack.frame_layout(rsp, flags), &d).is_err() {
            println!("linux: signal {sig}: no room for the signal frame below rsp {rsp:#x}");
            killed(11);
        }
        crate::sched().current().sigmask = abi::handler_mask(old_mask, sa_mask, flags, sig);
        return false;
    }
    let t = crate::sched().current();
    if let Some(mask) = t.saved_mask.take() {
        t.sigmask = mask;
    }
    match abi::without_handler(rax) {
        Resume::Restart => {
            frame.rax = nr;
            true
        }
        Resume::Return(_) => false,
    }
}

/// The system call a `rt_sigreturn` just asked to restart (taken).
pub fn take_restart() -> Option<u64> {
    crate::sched().current().restart.take()
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

/// Builds the signal frame of `d` at `l` and points `frame` at the handler.
fn deliver(frame: &mut Frame, l: &abi::Layout, d: &abi::Delivery) -> Result<(), i64> {
    let mem = crate::sys::user(l.frame, l.top - l.frame)?;
    let e = abi::build(l, mem, &regs_of(frame), &frame.fx, d);
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
/// Restores every register, the x87/SSE state and the mask; returns the interrupted RAX (a
/// system call to restart: its number, and [`take_restart`] says so).
pub fn sigreturn(frame: &mut Frame) -> Result<i64, i64> {
    let sigreturn_rsp = frame.rsp;
    let uc = crate::sys::user(frame.rsp, abi::UCONTEXT_SIZE)?;
    let back = abi::restore(uc);
    let r = back.regs;
    if back.fpstate != 0 {
        let fx = crate::sys::user(back.fpstate, abi::FPSTATE_SIZE)?;
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
    let t = crate::sched().current();
    t.sigmask = back.mask & !abi::UNBLOCKABLE;
    t.restart = back.restart.then_some(r.rax);
    // `uc_stack` becomes the alternate stack again, unless the thread is on the current one (at
    // the RSP of the call): Linux's `restore_altstack`, which squashes the errors too.
    if let Ok(stack) = abi::set_altstack(&t.altstack, sigreturn_rsp, back.stack) {
        t.altstack = stack;
    }
    Ok(r.rax as i64)
}
