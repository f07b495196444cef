//! The x86-64 signal frame as Linux lays it out (arch/x86/kernel/signal.c, `rt_sigframe`,
//! uapi `struct ucontext`, `struct sigcontext`, `siginfo_t`), and what `rt_sigreturn` reads
//! back from it.
//!
//! Below the interrupted RSP, past its 128-byte red zone: the x87/SSE state (`fxsave` format,
//! 512 bytes, 64-byte aligned), then the `rt_sigframe`: `pretcode` (the return address: the
//! handler's `sa_restorer`, which calls `rt_sigreturn`), `ucontext` (flags, link, the
//! alternate stack, `sigcontext`, the blocked mask to restore) and `siginfo`. The frame is
//! placed so that at the handler's entry RSP + 8 is 16-byte aligned, as after a `call`.
//! The handler gets RDI = signal number, RSI = &siginfo, RDX = &ucontext, RAX = 0.

use alloc::collections::VecDeque;

/// The registers of the interrupted context, in `struct sigcontext` order (r8 ... rip, eflags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Regs {
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rsp: u64,
    pub rip: u64,
    pub eflags: u64,
}

impl Regs {
    fn words(&self) -> [u64; 18] {
        [
            self.r8,
            self.r9,
            self.r10,
            self.r11,
            self.r12,
            self.r13,
            self.r14,
            self.r15,
            self.rdi,
            self.rsi,
            self.rbp,
            self.rbx,
            self.rdx,
            self.rax,
            self.rcx,
            self.rsp,
            self.rip,
            self.eflags,
        ]
    }

    fn from_words(w: [u64; 18]) -> Self {
        let [r8, r9, r10, r11, r12, r13, r14, r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip, eflags] = w;
        Regs { r8, r9, r10, r11, r12, r13, r14, r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip, eflags }
    }
}

pub const SIGINT: u64 = 2;
pub const SIGKILL: u64 = 9;
pub const SIGALRM: u64 = 14;
pub const SIGTERM: u64 = 15;
pub const SIGCHLD: u64 = 17;
pub const SIGCONT: u64 = 18;
pub const SIGSTOP: u64 = 19;
pub const SIGURG: u64 = 23;
pub const SIGVTALRM: u64 = 26;
pub const SIGPROF: u64 = 27;
pub const SIGWINCH: u64 = 28;

/// `sa_handler` values.
pub const SIG_DFL: u64 = 0;
pub const SIG_IGN: u64 = 1;
/// `sa_flags`.
pub const SA_SIGINFO: u64 = 0x4;
pub const SA_RESTORER: u64 = 0x0400_0000;
pub const SA_ONSTACK: u64 = 0x0800_0000;
pub const SA_RESTART: u64 = 0x1000_0000;
pub const SA_NODEFER: u64 = 0x4000_0000;
pub const SA_RESETHAND: u64 = 0x8000_0000;
/// `si_code`s: sent by a process (kill), by the kernel (an interval timer), a POSIX timer's,
/// a thread's (tkill, tgkill); SIGCHLD's for a child that exited or was killed.
pub const SI_USER: i32 = 0;
pub const SI_KERNEL: i32 = 0x80;
pub const SI_TIMER: i32 = -2;
pub const SI_TKILL: i32 = -6;
pub const CLD_EXITED: i32 = 1;
pub const CLD_KILLED: i32 = 2;

/// What `siginfo` says of one signal besides its number: `si_code` and the union's first
/// fields, at offsets 16, 20 and 24: kill and tkill: pid, uid; a POSIX timer: its id, the
/// overrun count, its `sigval`; SIGCHLD: the child's pid, uid, status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Info {
    pub code: i32,
    pub a: u32,
    pub b: u32,
    pub c: u64,
}

impl Info {
    /// Sent by process `pid` (uid 0) with kill.
    pub fn user(pid: u32) -> Info {
        Info { code: SI_USER, a: pid, ..Info::default() }
    }

    /// Sent by thread-group `pid` with tkill or tgkill.
    pub fn tkill(pid: u32) -> Info {
        Info { code: SI_TKILL, a: pid, ..Info::default() }
    }

    /// Sent by the kernel (an interval timer's SIGALRM, as Linux's `it_real_fn`).
    pub fn kernel() -> Info {
        Info { code: SI_KERNEL, ..Info::default() }
    }

    /// POSIX timer `id`'s expiry, `overrun` expiries missed, with its `sigval`.
    pub fn timer(id: u32, overrun: u32, value: u64) -> Info {
        Info { code: SI_TIMER, a: id, b: overrun, c: value }
    }

    /// SIGCHLD: child `pid` ended (`code` CLD_EXITED with its exit status, CLD_KILLED with
    /// the signal).
    pub fn child(pid: u32, code: i32, status: u32) -> Info {
        Info { code, a: pid, b: 0, c: u64::from(status) }
    }
}

/// The 128 bytes of `siginfo_t` for `sig` with `info`.
pub fn siginfo(sig: u64, info: &Info) -> [u8; SIGINFO_SIZE as usize] {
    let mut b = [0u8; SIGINFO_SIZE as usize];
    b[0..4].copy_from_slice(&(sig as i32).to_le_bytes());
    b[8..12].copy_from_slice(&info.code.to_le_bytes());
    b[16..20].copy_from_slice(&info.a.to_le_bytes());
    b[20..24].copy_from_slice(&info.b.to_le_bytes());
    b[24..32].copy_from_slice(&info.c.to_le_bytes());
    b
}
/// `uc_flags` Linux sets on x86-64: the saved SS is meaningful and restored strictly.
pub const UC_SIGCONTEXT_SS: u64 = 0x2;
pub const UC_STRICT_RESTORE_SS: u64 = 0x4;

/// The red zone the frame leaves alone below the interrupted RSP.
pub const RED_ZONE: u64 = 128;
/// The `fxsave` area.
pub const FPSTATE_SIZE: u64 = 512;
pub const SIGCONTEXT_SIZE: u64 = 256;
/// `struct ucontext`: uc_flags, uc_link, uc_stack (24 bytes), uc_mcontext, uc_sigmask.
pub const UCONTEXT_SIZE: u64 = 40 + SIGCONTEXT_SIZE + 8;
pub const SIGINFO_SIZE: u64 = 128;
/// `struct rt_sigframe`: pretcode, ucontext, siginfo.
pub const FRAME_SIZE: u64 = 8 + UCONTEXT_SIZE + SIGINFO_SIZE;

/// Offsets inside `ucontext`.
pub const UC_MCONTEXT: u64 = 40;
pub const UC_SIGMASK: u64 = UC_MCONTEXT + SIGCONTEXT_SIZE;
/// Offsets inside `sigcontext` after the 18 registers: cs/gs/fs/ss (u16 each), err, trapno,
/// oldmask, cr2, fpstate (a pointer), 8 reserved words.
pub const SC_CSGSFS: u64 = 18 * 8;
pub const SC_OLDMASK: u64 = SC_CSGSFS + 8 + 16;
pub const SC_FPSTATE: u64 = SC_OLDMASK + 16;

/// Where the pieces of one signal frame go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The `rt_sigframe` (the handler's RSP): `pretcode` here.
    pub frame: u64,
    pub ucontext: u64,
    pub siginfo: u64,
    pub fpstate: u64,
    /// The lowest address above everything the frame uses (the bottom of the red zone).
    pub top: u64,
}

/// The layout of a frame for an interrupted RSP of `rsp` (Linux's `get_sigframe`): below its
/// red zone.
pub fn layout(rsp: u64) -> Layout {
    layout_below(rsp.wrapping_sub(RED_ZONE))
}

/// The layout of a frame whose highest byte is below `top`: the red zone's bottom, or the top
/// of the alternate signal stack (where Linux leaves no red zone).
pub fn layout_below(top: u64) -> Layout {
    let fpstate = top.wrapping_sub(FPSTATE_SIZE) & !63;
    let frame = ((fpstate.wrapping_sub(FRAME_SIZE)) & !15).wrapping_sub(8);
    Layout { frame, ucontext: frame + 8, siginfo: frame + 8 + UCONTEXT_SIZE, fpstate, top }
}

/// `stack_t` (`sigaltstack`, `uc_stack`): base, flags, size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AltStack {
    pub sp: u64,
    pub flags: u64,
    pub size: u64,
}

/// `ss_flags`.
pub const SS_ONSTACK: u64 = 1;
pub const SS_DISABLE: u64 = 2;
/// The least `ss_size` Linux takes (MINSIGSTKSZ).
pub const MINSIGSTKSZ: u64 = 2048;

impl AltStack {
    pub const DISABLED: AltStack = AltStack { sp: 0, flags: SS_DISABLE, size: 0 };

    /// Whether `rsp` is on this stack (Linux's `on_sig_stack`: above the base, at most the top).
    pub fn contains(&self, rsp: u64) -> bool {
        self.flags & SS_DISABLE == 0 && rsp > self.sp && rsp - self.sp <= self.size
    }

    /// What `sigaltstack` and `uc_stack` report at `rsp`: SS_ONSTACK while on it.
    pub fn reported(&self, rsp: u64) -> AltStack {
        if self.flags & SS_DISABLE != 0 {
            AltStack::DISABLED
        } else {
            AltStack { flags: if self.contains(rsp) { SS_ONSTACK } else { 0 }, ..*self }
        }
    }

    /// Where the frame of a handler goes: the alternate stack's top when the action asks for
    /// it (SA_ONSTACK), the stack is enabled and the thread is not on it already; else below
    /// the red zone of `rsp`.
    pub fn frame_layout(&self, rsp: u64, sa_flags: u64) -> Layout {
        if sa_flags & SA_ONSTACK != 0 && self.flags & SS_DISABLE == 0 && !self.contains(rsp) {
            layout_below(self.sp + self.size)
        } else {
            layout(rsp)
        }
    }
}

/// `sigaltstack(ss, ..)` with the new stack `new` while at `rsp` on `current`: the stack now,
/// or the errno (EPERM while on it, EINVAL for unknown flags (SS_AUTODISARM included: not
/// supported), ENOMEM below MINSIGSTKSZ).
pub fn set_altstack(current: &AltStack, rsp: u64, new: AltStack) -> Result<AltStack, i64> {
    if current.contains(rsp) {
        return Err(1);
    }
    match new.flags {
        SS_DISABLE => Ok(AltStack::DISABLED),
        0 | SS_ONSTACK if new.size < MINSIGSTKSZ => Err(12),
        0 | SS_ONSTACK => Ok(AltStack { flags: 0, ..new }),
        _ => Err(22),
    }
}

/// What the handler runs with, besides the frame in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub rip: u64,
    pub rsp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
}

fn put(buf: &mut [u8], at: u64, v: u64) {
    buf[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

fn word(buf: &[u8], at: u64) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at as usize..at as usize + 8]);
    u64::from_le_bytes(b)
}

/// One delivery: what goes into the frame besides the registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub sig: u64,
    /// What `siginfo` says besides the number.
    pub info: Info,
    /// The blocked mask to restore.
    pub old_mask: u64,
    pub handler: u64,
    /// The `sa_restorer`: the handler's return address.
    pub restorer: u64,
    /// `uc_stack`: the alternate stack as `sigaltstack` would report it.
    pub stack: AltStack,
    /// The interrupted system call restarts at `rt_sigreturn` (SA_RESTART): the frame's RAX
    /// holds its number and [`RESTART_MARK`] sits in the first reserved word of `sigcontext`.
    pub restart: bool,
}

/// The bytes of the frame of delivery `d`, from `l.frame` up to `l.top` (`buf` must be that
/// long: `l.top - l.frame`), and the handler's entry registers. `regs` is the interrupted
/// context, `fx` its x87/SSE state.
pub fn build(l: &Layout, buf: &mut [u8], regs: &Regs, fx: &[u8; 512], d: &Delivery) -> Entry {
    buf.fill(0);
    let at = |addr: u64| addr - l.frame;
    put(buf, 0, d.restorer);
    put(buf, at(l.ucontext), UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS);
    // uc_link 0; uc_stack.
    put(buf, at(l.ucontext) + 16, d.stack.sp);
    put(buf, at(l.ucontext) + 16 + 8, d.stack.flags);
    put(buf, at(l.ucontext) + 16 + 16, d.stack.size);
    let mc = at(l.ucontext) + UC_MCONTEXT;
    for (i, w) in regs.words().iter().enumerate() {
        put(buf, mc + i as u64 * 8, *w);
    }
    // cs 0x23 (user code), gs 0, fs 0, ss 0x1b (user data).
    put(buf, mc + SC_CSGSFS, 0x23 | 0x1b << 48);
    put(buf, mc + SC_OLDMASK, d.old_mask);
    put(buf, mc + SC_FPSTATE, l.fpstate);
    if d.restart {
        put(buf, mc + SC_RESERVED, RESTART_MARK);
    }
    put(buf, at(l.ucontext) + UC_SIGMASK, d.old_mask);
    let si = at(l.siginfo) as usize;
    buf[si..si + SIGINFO_SIZE as usize].copy_from_slice(&siginfo(d.sig, &d.info));
    let fp = at(l.fpstate) as usize;
    buf[fp..fp + 512].copy_from_slice(fx);
    // Bytes 464..512 are software-reserved: zero says "plain fxsave, no xstate" to readers.
    buf[fp + 464..fp + 512].fill(0);
    Entry { rip: d.handler, rsp: l.frame, rdi: d.sig, rsi: l.siginfo, rdx: l.ucontext }
}

/// The first of `sigcontext`'s reserved words: [`RESTART_MARK`] there says "restart the
/// system call in RAX" to `rt_sigreturn` (Linux rewinds RIP onto the `syscall` instead,
/// which a rewritten site does not have).
pub const SC_RESERVED: u64 = SC_FPSTATE + 8;
pub const RESTART_MARK: u64 = u64::from_le_bytes(*b"ftvm rst");

/// What `rt_sigreturn` restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub regs: Regs,
    /// The address of the x87/SSE state (0: none).
    pub fpstate: u64,
    /// The blocked mask.
    pub mask: u64,
    /// The interrupted system call (the number in `regs.rax`) restarts.
    pub restart: bool,
    /// `uc_stack`: the alternate stack to put back (Linux's `restore_altstack`).
    pub stack: AltStack,
}

/// What `rt_sigreturn` restores, read from the `ucontext` at `uc` (`buf` holds the bytes from
/// `uc` on, at least [`UCONTEXT_SIZE`]).
pub fn restore(buf: &[u8]) -> Restored {
    let mut w = [0u64; 18];
    for (i, v) in w.iter_mut().enumerate() {
        *v = word(buf, UC_MCONTEXT + i as u64 * 8);
    }
    Restored {
        regs: Regs::from_words(w),
        fpstate: word(buf, UC_MCONTEXT + SC_FPSTATE),
        mask: word(buf, UC_SIGMASK),
        restart: word(buf, UC_MCONTEXT + SC_RESERVED) == RESTART_MARK,
        stack: AltStack { sp: word(buf, 16), flags: word(buf, 24) & 0xffff_ffff, size: word(buf, 32) },
    }
}

/// The mask while the handler runs: the old one, the action's, and the signal itself unless
/// SA_NODEFER; SIGKILL and SIGSTOP are never blocked.
pub fn handler_mask(old: u64, sa_mask: u64, sa_flags: u64, sig: u64) -> u64 {
    let mut m = old | sa_mask;
    if sa_flags & SA_NODEFER == 0 {
        m |= bit(sig);
    }
    m & !(bit(SIGKILL) | bit(SIGSTOP))
}

/// The mask bit of signal `sig` (1-64).
pub fn bit(sig: u64) -> u64 {
    1u64 << ((sig - 1) & 63)
}

/// The RFLAGS bits a sigreturn may change (Linux's FIX_EFLAGS: CF PF AF ZF SF TF DF OF, RF
/// AC ID and the rest of the arithmetic flags); IF and IOPL stay as they are.
pub const USER_EFLAGS: u64 = 0x0001 | 0x0004 | 0x0010 | 0x0040 | 0x0080 | 0x0100 | 0x0400 | 0x0800 | 0x40000 | 0x200000;

/// The first realtime signal (Linux's SIGRTMIN; musl keeps 32-34 for itself).
pub const SIGRTMIN: u64 = 32;
/// The most realtime signals one pending set queues (Linux's RLIMIT_SIGPENDING is per user and
/// larger; one process here).
pub const QUEUE_MAX: usize = 1024;

/// A pending set, a thread's or the process's: a standard signal is pending once, with its first
/// sender's `siginfo`; a realtime one is queued, each instance with its own, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    bits: u64,
    info: [Info; 31],
    queue: VecDeque<(u64, Info)>,
}

impl Default for Pending {
    fn default() -> Pending {
        Pending::new()
    }
}

impl Pending {
    pub const fn new() -> Pending {
        const NONE: Info = Info { code: 0, a: 0, b: 0, c: 0 };
        Pending { bits: 0, info: [NONE; 31], queue: VecDeque::new() }
    }

    /// The signals pending (bit `sig - 1`).
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// `sig` sent with `info`. A realtime signal beyond [`QUEUE_MAX`] is still pending, without
    /// its `siginfo`, when kill sent it (SI_USER), and refused otherwise (false: sigqueue's
    /// EAGAIN), as Linux's `__send_signal` does.
    pub fn add(&mut self, sig: u64, info: Info) -> bool {
        if sig < SIGRTMIN {
            if self.bits & bit(sig) == 0 {
                self.info[(sig - 1) as usize] = info;
            }
        } else if self.queue.len() < QUEUE_MAX {
            self.queue.push_back((sig, info));
        } else if info.code != SI_USER {
            return false;
        }
        self.bits |= bit(sig);
        true
    }

    /// Takes one instance of `sig` (None: not pending): its `siginfo`.
    pub fn take(&mut self, sig: u64) -> Option<Info> {
        if self.bits & bit(sig) == 0 {
            return None;
        }
        if sig < SIGRTMIN {
            self.bits &= !bit(sig);
            return Some(self.info[(sig - 1) as usize]);
        }
        let info = match self.queue.iter().position(|&(s, _)| s == sig) {
            Some(i) => self.queue.remove(i).map_or(Info::default(), |(_, info)| info),
            None => Info::default(),
        };
        if !self.queue.iter().any(|&(s, _)| s == sig) {
            self.bits &= !bit(sig);
        }
        Some(info)
    }

    /// Drops every instance of `sig` (it became ignored).
    pub fn discard(&mut self, sig: u64) {
        self.bits &= !bit(sig);
        self.queue.retain(|&(s, _)| s != sig);
    }
}

/// The signals no mask blocks.
pub const UNBLOCKABLE: u64 = (1 << (SIGKILL - 1)) | (1 << (SIGSTOP - 1));

/// `rt_sigprocmask(how, set)` applied to the mask `old`: SIG_BLOCK (0), SIG_UNBLOCK (1),
/// SIG_SETMASK (2); None for another `how` (EINVAL). SIGKILL and SIGSTOP stay unblocked.
pub fn sigprocmask(how: u64, old: u64, set: u64) -> Option<u64> {
    let mask = match how {
        0 => old | set,
        1 => old & !set,
        2 => set,
        _ => return None,
    };
    Some(mask & !UNBLOCKABLE)
}

/// What a signal does when it is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Dropped: SIG_IGN, or SIG_DFL of SIGCHLD, SIGCONT, SIGURG, SIGWINCH.
    Ignore,
    /// SIG_DFL of any other signal: the program ends, killed by it (the stop signals too:
    /// there is no one to continue it).
    Kill,
    /// A handler runs.
    Handler,
}

/// Whether SIG_DFL of `sig` is to ignore it.
pub fn default_ignored(sig: u64) -> bool {
    matches!(sig, SIGCHLD | SIGCONT | SIGURG | SIGWINCH)
}

/// The action of `sig` whose `sa_handler` is `handler` (SIGKILL: always Kill).
pub fn action(sig: u64, handler: u64) -> Action {
    match handler {
        _ if sig == SIGKILL || sig == SIGSTOP => Action::Kill,
        SIG_IGN => Action::Ignore,
        SIG_DFL if default_ignored(sig) => Action::Ignore,
        SIG_DFL => Action::Kill,
        _ => Action::Handler,
    }
}

/// The next signal a thread takes: from its own pending set (`private`, tkill/tgkill) first,
/// then the process's (`shared`), the lowest number first, leaving the blocked ones (`mask`).
/// Returns the signal and whether it came from `private`.
pub fn next_signal(private: u64, shared: u64, mask: u64) -> Option<(u64, bool)> {
    let blocked = mask & !UNBLOCKABLE;
    let lowest = |set: u64| (set != 0).then(|| u64::from(set.trailing_zeros()) + 1);
    lowest(private & !blocked).map(|s| (s, true)).or_else(|| lowest(shared & !blocked).map(|s| (s, false)))
}

/// The thread a process-directed `sig` goes to (Linux's `complete_signal`): the first of
/// `masks` (the live threads' blocked masks, the main thread first, then in tid order) that
/// does not block it; None when every thread blocks it (it stays pending for the process).
pub fn pick_thread(masks: &[u64], sig: u64) -> Option<usize> {
    masks.iter().position(|m| m & !UNBLOCKABLE & bit(sig) == 0)
}

/// Internal "restart me" results a blocking call returns when a signal interrupts it, as
/// Linux's (never seen by the program): restarted with SA_RESTART (ERESTARTSYS: read, write,
/// accept, futex wait without timeout, wait4), always restarted (ERESTARTNOINTR: the restart
/// `rt_sigreturn` asks for), EINTR after any handler (ERESTARTNOHAND: poll, pause,
/// sigsuspend; ERESTART_RESTARTBLOCK: nanosleep, a futex wait with a timeout).
pub const ERESTARTSYS: i64 = 512;
pub const ERESTARTNOINTR: i64 = 513;
pub const ERESTARTNOHAND: i64 = 514;
pub const ERESTART_RESTARTBLOCK: i64 = 516;
pub const EINTR: i64 = 4;

/// What becomes of a system call's result (`rax` as a signed value) on the way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The program gets this RAX.
    Return(i64),
    /// The call runs again from its arguments (at once, or at the handler's `rt_sigreturn`).
    Restart,
}

fn restartable(rax: i64) -> bool {
    matches!(-rax, ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK)
}

/// Whether `rax` says a signal interrupted the call (EINTR or a restart code). A call that ran
/// under a mask of its own (ppoll, epoll_pwait, sigsuspend, sigtimedwait) and was not
/// interrupted gets its old mask back before any signal is taken, as Linux's
/// `restore_saved_sigmask_unless` does: what the old mask blocks waits.
pub fn interrupted_result(rax: i64) -> bool {
    rax == -EINTR || restartable(rax)
}

/// Linux's `handle_signal` fix-up: the result `rax` of a call interrupted by a signal whose
/// handler (with `sa_flags`) runs now.
pub fn after_handler(rax: i64, sa_flags: u64) -> Resume {
    match -rax {
        ERESTARTNOINTR => Resume::Restart,
        ERESTARTSYS if sa_flags & SA_RESTART != 0 => Resume::Restart,
        ERESTARTSYS | ERESTARTNOHAND | ERESTART_RESTARTBLOCK => Resume::Return(-EINTR),
        _ => Resume::Return(rax),
    }
}

/// The same when no handler runs (the signal was ignored, or taken by another thread): every
/// restartable result restarts (ERESTART_RESTARTBLOCK too, from the call's arguments: a
/// relative timeout starts again, where Linux would go on to the first deadline).
pub fn without_handler(rax: i64) -> Resume {
    if restartable(rax) {
        Resume::Restart
    } else {
        Resume::Return(rax)
    }
}

/// An interval timer (`setitimer`, `alarm`), in nanoseconds of the guest's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ITimer {
    /// When it expires next (None: disarmed).
    pub next: Option<u64>,
    /// The period after an expiry (0: one-shot).
    pub interval: u64,
}

impl ITimer {
    /// The time to the next expiry at `now` (0: disarmed; an armed timer already due reports
    /// one microsecond, as Linux's `itimer_get_remtime` does).
    pub fn remaining(&self, now: u64) -> u64 {
        self.next.map_or(0, |n| n.saturating_sub(now).max(1000))
    }

    /// Arms it `value` from `now` (0: disarms), with period `interval`; returns the old
    /// (remaining, interval).
    pub fn set(&mut self, now: u64, value: u64, interval: u64) -> (u64, u64) {
        let old = (self.remaining(now), self.interval);
        *self = ITimer { next: (value > 0).then(|| now.saturating_add(value)), interval };
        old
    }

    /// How many times it expired by `now` (0: not yet; more than 1: period ends passed
    /// meanwhile, one signal for them all, the rest a POSIX timer's overrun); a periodic timer
    /// moves to its first period end after `now`, a one-shot one disarms.
    pub fn expire(&mut self, now: u64) -> u64 {
        match self.next {
            Some(next) if next <= now => match (now - next).checked_div(self.interval) {
                Some(late) => {
                    self.next = Some(next.saturating_add((late + 1).saturating_mul(self.interval)));
                    late + 1
                }
                None => {
                    self.next = None;
                    1
                }
            },
            _ => 0,
        }
    }
}

/// A `timeval` (seconds, microseconds) as nanoseconds; None if out of range (EINVAL).
pub fn timeval_ns(sec: i64, usec: i64) -> Option<u64> {
    if sec < 0 || !(0..1_000_000).contains(&usec) {
        return None;
    }
    (sec as u64).checked_mul(1_000_000_000)?.checked_add(usec as u64 * 1000)
}

/// Nanoseconds as a `timeval` (truncated to microseconds).
pub fn ns_timeval(ns: u64) -> [u64; 2] {
    [ns / 1_000_000_000, ns % 1_000_000_000 / 1000]
}

/// What `alarm` returns for a timer `remaining` ns from expiry: whole seconds, rounded to the
/// nearest, and at least 1 while armed (Linux's `alarm_setitimer`).
pub fn alarm_seconds(remaining: u64) -> u64 {
    let (secs, usec) = (remaining / 1_000_000_000, remaining % 1_000_000_000 / 1000);
    if (secs == 0 && usec > 0) || usec >= 500_000 {
        secs + 1
    } else {
        secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn regs() -> Regs {
        Regs::from_words(core::array::from_fn(|i| 0x1111_0000 + i as u64))
    }

    #[test]
    fn the_frame_sits_below_the_red_zone_aligned_as_linux_places_it() {
        for rsp in [0x7fff_f000u64, 0x7fff_eff8, 0x7fff_ef01, 0x0fff_fff0] {
            let l = layout(rsp);
            assert!(l.top == rsp - 128 && l.fpstate + FPSTATE_SIZE <= l.top);
            assert_eq!(l.fpstate % 64, 0, "fxrstor needs 16, Linux gives 64");
            assert!(l.siginfo + SIGINFO_SIZE <= l.fpstate);
            assert_eq!((l.frame + 8) % 16, 0, "at entry RSP+8 is 16-aligned, as after a call");
            assert_eq!(l.ucontext, l.frame + 8);
            assert_eq!(l.siginfo, l.frame + 312, "sizeof(struct ucontext) is 304");
        }
    }

    #[test]
    fn the_frame_holds_linux_s_offsets_and_restores_every_register() {
        let l = layout(0x7fff_f000);
        let mut buf = vec![0u8; (l.top - l.frame) as usize];
        let fx: [u8; 512] = core::array::from_fn(|i| i as u8);
        let d = Delivery {
            sig: SIGTERM,
            info: Info::user(1),
            old_mask: 0x4000,
            handler: 0x401000,
            restorer: 0x402000,
            stack: AltStack::DISABLED,
            restart: false,
        };
        let e = build(&l, &mut buf, &regs(), &fx, &d);
        assert_eq!(e, Entry { rip: 0x401000, rsp: l.frame, rdi: 15, rsi: l.siginfo, rdx: l.ucontext });
        assert_eq!(word(&buf, 0), 0x402000, "pretcode: the restorer");
        let uc = &buf[8..];
        // uc_mcontext.rip at 40 + 16 * 8, eflags after it, rsp before.
        assert_eq!(word(uc, 40 + 16 * 8), regs().rip);
        assert_eq!(word(uc, 40 + 15 * 8), regs().rsp);
        assert_eq!(word(uc, 40 + 17 * 8), regs().eflags);
        assert_eq!(word(uc, 296), 0x4000, "uc_sigmask");
        assert_eq!(word(uc, 40 + 184), l.fpstate, "sigcontext.fpstate");
        let si = (l.siginfo - l.frame) as usize;
        assert_eq!(&buf[si..si + 4], &15i32.to_le_bytes(), "si_signo");
        assert_eq!(&buf[si + 16..si + 20], &1u32.to_le_bytes(), "si_pid");
        let fp = (l.fpstate - l.frame) as usize;
        assert_eq!(&buf[fp..fp + 464], &fx[..464]);
        assert!(buf[fp + 464..fp + 512].iter().all(|&b| b == 0));
        assert_eq!(word(uc, 24), SS_DISABLE, "uc_stack.ss_flags: no alternate stack");
        let back = restore(uc);
        assert_eq!(
            back,
            Restored { regs: regs(), fpstate: l.fpstate, mask: 0x4000, restart: false, stack: AltStack::DISABLED }
        );
        let on = AltStack { sp: 0x10_0000, flags: SS_ONSTACK, size: 0x4000 };
        build(&l, &mut buf, &regs(), &fx, &Delivery { stack: on, ..d });
        assert_eq!(restore(&buf[8..]).stack, on, "uc_stack read back");
        // A restart: the mark in sigcontext's first reserved word, read back.
        build(&l, &mut buf, &regs(), &fx, &Delivery { restart: true, ..d });
        assert_eq!(word(&buf[8..], 40 + 192), RESTART_MARK);
        assert!(restore(&buf[8..]).restart);
    }

    #[test]
    fn the_handler_s_mask_adds_the_signal_unless_nodefer() {
        assert_eq!(handler_mask(0, 0, 0, SIGTERM), 1 << 14);
        assert_eq!(handler_mask(1, 1 << 1, SA_NODEFER, SIGTERM), 0b11);
        assert_eq!(handler_mask(0, u64::MAX, 0, SIGTERM) & bit(SIGKILL), 0);
    }

    #[test]
    fn restart_follows_sa_restart_and_linux_s_per_call_rules() {
        let r = |e: i64| -e;
        // read/accept/futex (ERESTARTSYS): restarted only with SA_RESTART.
        assert_eq!(after_handler(r(ERESTARTSYS), 0), Resume::Return(-EINTR));
        assert_eq!(after_handler(r(ERESTARTSYS), SA_RESTART), Resume::Restart);
        // nanosleep, poll, sigsuspend: EINTR after a handler whatever its flags.
        for e in [ERESTARTNOHAND, ERESTART_RESTARTBLOCK] {
            assert_eq!(after_handler(r(e), SA_RESTART), Resume::Return(-EINTR));
        }
        assert_eq!(after_handler(r(ERESTARTNOINTR), 0), Resume::Restart);
        // Anything else is the call's own result.
        assert_eq!(after_handler(5, SA_RESTART), Resume::Return(5));
        assert_eq!(after_handler(-11, SA_RESTART), Resume::Return(-11));
        // No handler ran: restart.
        for e in [ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK] {
            assert_eq!(without_handler(r(e)), Resume::Restart);
        }
        assert_eq!(without_handler(-4), Resume::Return(-4));
        assert!(interrupted_result(-EINTR) && interrupted_result(r(ERESTARTNOHAND)));
        assert!(!interrupted_result(0) && !interrupted_result(-11) && !interrupted_result(3));
    }

    #[test]
    fn masks_never_block_kill_or_stop() {
        assert_eq!(sigprocmask(0, 1, bit(SIGTERM) | bit(SIGKILL)), Some(1 | bit(SIGTERM)));
        assert_eq!(sigprocmask(1, 0b111, 0b010), Some(0b101));
        assert_eq!(sigprocmask(2, 0b111, u64::MAX), Some(!UNBLOCKABLE));
        assert_eq!(sigprocmask(3, 0, 0), None);
    }

    #[test]
    fn a_thread_takes_its_own_signals_first_then_the_process_s_lowest_first() {
        let (term, alrm, int) = (bit(SIGTERM), bit(SIGALRM), bit(SIGINT));
        assert_eq!(next_signal(term, int, 0), Some((SIGTERM, true)));
        assert_eq!(next_signal(term, int, term), Some((SIGINT, false)));
        assert_eq!(next_signal(0, term | alrm, 0), Some((SIGALRM, false)));
        assert_eq!(next_signal(0, term | alrm, alrm | term), None);
        assert_eq!(next_signal(0, bit(SIGKILL), u64::MAX), Some((SIGKILL, false)));
    }

    #[test]
    fn a_process_signal_goes_to_the_main_thread_unless_it_blocks_it() {
        let alrm = bit(SIGALRM);
        assert_eq!(pick_thread(&[0, 0], SIGALRM), Some(0));
        assert_eq!(pick_thread(&[alrm, alrm, 0, 0], SIGALRM), Some(2));
        assert_eq!(pick_thread(&[alrm, alrm], SIGALRM), None);
        assert_eq!(pick_thread(&[u64::MAX], SIGKILL), Some(0));
        assert_eq!(pick_thread(&[], SIGTERM), None);
    }

    #[test]
    fn default_actions() {
        for sig in [SIGCHLD, SIGCONT, SIGURG, SIGWINCH] {
            assert_eq!(action(sig, SIG_DFL), Action::Ignore);
        }
        assert_eq!(action(SIGALRM, SIG_DFL), Action::Kill);
        assert_eq!(action(SIGALRM, SIG_IGN), Action::Ignore);
        assert_eq!(action(SIGALRM, 0x401000), Action::Handler);
        assert_eq!(action(SIGKILL, SIG_IGN), Action::Kill);
    }

    #[test]
    fn interval_timers_fire_once_or_periodically_and_report_what_is_left() {
        let ms = 1_000_000;
        let mut t = ITimer::default();
        assert_eq!(t.set(0, 200 * ms, 0), (0, 0));
        assert_eq!(t.expire(199 * ms), 0);
        assert_eq!(t.remaining(150 * ms), 50 * ms);
        assert_eq!(t.expire(200 * ms), 1);
        assert_eq!(t.next, None);
        assert_eq!(t.expire(400 * ms), 0);
        // Periodic, 50 ms; an expiry seen late moves to the next period end after now.
        t.set(1000 * ms, 100 * ms, 50 * ms);
        assert_eq!(t.expire(1100 * ms), 1);
        assert_eq!(t.next, Some(1150 * ms));
        assert_eq!(t.expire(1290 * ms), 3, "1150, 1200, 1250: two overruns");
        assert_eq!(t.next, Some(1300 * ms));
        assert_eq!(t.set(1290 * ms, 0, 0), (10 * ms, 50 * ms));
        assert_eq!(t.next, None);
        // Armed but due: 1 us left, never 0 (which would read as disarmed).
        t.set(0, ms, 0);
        assert_eq!(t.remaining(5 * ms), 1000);
    }

    #[test]
    fn timevals_and_alarm_s_rounding() {
        assert_eq!(timeval_ns(1, 500), Some(1_000_500_000));
        assert_eq!(timeval_ns(-1, 0), None);
        assert_eq!(timeval_ns(0, 1_000_000), None);
        assert_eq!(ns_timeval(1_234_567_891), [1, 234_567]);
        assert_eq!(alarm_seconds(0), 0);
        assert_eq!(alarm_seconds(1000), 1);
        assert_eq!(alarm_seconds(2_400_000_000), 2);
        assert_eq!(alarm_seconds(2_500_000_000), 3);
    }

    #[test]
    fn the_alternate_stack_takes_handlers_that_ask_for_it() {
        let ss = AltStack { sp: 0x10_0000, flags: 0, size: 0x4000 };
        let l = ss.frame_layout(0x7fff_f000, SA_ONSTACK);
        assert_eq!(l.top, 0x10_4000, "no red zone on the alternate stack");
        assert!(l.frame > 0x10_0000);
        assert_eq!(ss.frame_layout(0x7fff_f000, 0), layout(0x7fff_f000));
        // Already on it (a nested signal): below the interrupted RSP there.
        assert_eq!(ss.frame_layout(0x10_2000, SA_ONSTACK), layout(0x10_2000));
        assert_eq!(ss.reported(0x10_2000).flags, SS_ONSTACK);
        assert_eq!(ss.reported(0x7fff_f000).flags, 0);
        assert_eq!(AltStack::DISABLED.frame_layout(0x7fff_f000, SA_ONSTACK), layout(0x7fff_f000));
        assert_eq!(set_altstack(&ss, 0x10_2000, AltStack::DISABLED), Err(1), "EPERM while on it");
        assert_eq!(set_altstack(&ss, 0x7fff_f000, AltStack { sp: 0, flags: 0, size: 100 }), Err(12));
        assert_eq!(set_altstack(&ss, 0x7fff_f000, AltStack { sp: 0, flags: 1 << 31, size: 8192 }), Err(22));
        assert_eq!(
            set_altstack(&ss, 0x7fff_f000, AltStack { sp: 0x1000, flags: 0, size: 8192 }),
            Ok(AltStack { sp: 0x1000, flags: 0, size: 8192 })
        );
        assert_eq!(
            set_altstack(&ss, 0x7fff_f000, AltStack { sp: 5, flags: SS_DISABLE, size: 0 }),
            Ok(AltStack::DISABLED)
        );
    }

    #[test]
    fn siginfo_says_who_sent_it_as_linux_lays_it_out() {
        let b = siginfo(SIGTERM, &Info::user(7));
        assert_eq!(&b[0..4], &15i32.to_le_bytes());
        assert_eq!(&b[8..12], &SI_USER.to_le_bytes());
        assert_eq!(&b[16..20], &7u32.to_le_bytes(), "si_pid");
        let b = siginfo(SIGALRM, &Info::timer(3, 2, 0xdead_beef_0000_0001));
        assert_eq!(&b[8..12], &SI_TIMER.to_le_bytes());
        assert_eq!(&b[16..20], &3u32.to_le_bytes(), "si_timerid");
        assert_eq!(&b[20..24], &2u32.to_le_bytes(), "si_overrun");
        assert_eq!(&b[24..32], &0xdead_beef_0000_0001u64.to_le_bytes(), "si_value");
        let b = siginfo(SIGCHLD, &Info::child(5, CLD_EXITED, 4));
        assert_eq!(&b[8..12], &1i32.to_le_bytes());
        assert_eq!(&b[24..28], &4i32.to_le_bytes(), "si_status");
        assert_eq!(siginfo(SIGALRM, &Info::kernel())[8..12], SI_KERNEL.to_le_bytes());
        assert_eq!(siginfo(SIGUSR1_FOR_TEST, &Info::tkill(1))[8..12], SI_TKILL.to_le_bytes());
    }
    const SIGUSR1_FOR_TEST: u64 = 10;

    #[test]
    fn standard_signals_are_pending_once_realtime_ones_queued() {
        let mut p = Pending::new();
        assert!(p.add(SIGTERM, Info::user(3)));
        assert!(p.add(SIGTERM, Info::user(4)));
        assert_eq!(p.bits(), bit(SIGTERM));
        assert_eq!(p.take(SIGTERM), Some(Info::user(3)), "the first sender's");
        assert_eq!(p.take(SIGTERM), None);
        let rt = SIGRTMIN + 3;
        for v in 0..3 {
            assert!(p.add(rt, Info { code: -1, a: 1, b: 0, c: v }));
        }
        assert_eq!(p.bits(), bit(rt));
        assert_eq!(p.take(rt).map(|i| i.c), Some(0));
        assert_eq!(p.take(rt).map(|i| i.c), Some(1));
        assert_eq!(p.bits(), bit(rt), "one left");
        assert_eq!(p.take(rt).map(|i| i.c), Some(2));
        assert_eq!(p.bits(), 0);
        // Beyond the limit: kill's instance still pending (no siginfo), sigqueue's refused.
        for _ in 0..QUEUE_MAX {
            assert!(p.add(rt, Info::user(1)));
        }
        assert!(!p.add(rt + 1, Info { code: -1, ..Info::default() }));
        assert!(p.add(rt + 1, Info::user(1)));
        assert_eq!(p.bits(), bit(rt) | bit(rt + 1));
        assert_eq!(p.take(rt + 1), Some(Info::default()));
        p.discard(rt);
        assert_eq!(p.bits(), 0);
    }
}
