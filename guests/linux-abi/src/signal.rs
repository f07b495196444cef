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
pub const SIGTERM: u64 = 15;
pub const SIGSTOP: u64 = 19;

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
/// `si_code` of a signal sent by a process (kill).
pub const SI_USER: i32 = 0;
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

/// The layout of a frame for an interrupted RSP of `rsp` (Linux's `get_sigframe`).
pub fn layout(rsp: u64) -> Layout {
    let top = rsp.wrapping_sub(RED_ZONE);
    let fpstate = top.wrapping_sub(FPSTATE_SIZE) & !63;
    let frame = ((fpstate.wrapping_sub(FRAME_SIZE)) & !15).wrapping_sub(8);
    Layout { frame, ucontext: frame + 8, siginfo: frame + 8 + UCONTEXT_SIZE, fpstate, top }
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

/// The bytes of the frame for signal `sig` sent by process `pid` (uid 0), from `l.frame` up to
/// `l.top` (`buf` must be that long: `l.top - l.frame`), and the handler's entry registers.
/// `regs` is the interrupted context, `fx` its x87/SSE state, `old_mask` the blocked mask to
/// restore, `restorer` the `sa_restorer`.
#[allow(clippy::too_many_arguments)] // the pieces of a frame, each its own field
pub fn build(
    l: &Layout,
    buf: &mut [u8],
    regs: &Regs,
    fx: &[u8; 512],
    sig: u64,
    pid: u32,
    old_mask: u64,
    handler: u64,
    restorer: u64,
) -> Entry {
    buf.fill(0);
    let at = |addr: u64| addr - l.frame;
    put(buf, 0, restorer);
    put(buf, at(l.ucontext), UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS);
    // uc_link 0; uc_stack: no alternate stack (ss_flags SS_DISABLE = 2).
    put(buf, at(l.ucontext) + 16 + 8, 2);
    let mc = at(l.ucontext) + UC_MCONTEXT;
    for (i, w) in regs.words().iter().enumerate() {
        put(buf, mc + i as u64 * 8, *w);
    }
    // cs 0x23 (user code), gs 0, fs 0, ss 0x1b (user data).
    put(buf, mc + SC_CSGSFS, 0x23 | 0x1b << 48);
    put(buf, mc + SC_OLDMASK, old_mask);
    put(buf, mc + SC_FPSTATE, l.fpstate);
    put(buf, at(l.ucontext) + UC_SIGMASK, old_mask);
    let si = at(l.siginfo) as usize;
    buf[si..si + 4].copy_from_slice(&(sig as i32).to_le_bytes());
    buf[si + 8..si + 12].copy_from_slice(&SI_USER.to_le_bytes());
    buf[si + 16..si + 20].copy_from_slice(&pid.to_le_bytes());
    let fp = at(l.fpstate) as usize;
    buf[fp..fp + 512].copy_from_slice(fx);
    // Bytes 464..512 are software-reserved: zero says "plain fxsave, no xstate" to readers.
    buf[fp + 464..fp + 512].fill(0);
    Entry { rip: handler, rsp: l.frame, rdi: sig, rsi: l.siginfo, rdx: l.ucontext }
}

/// What `rt_sigreturn` restores, read from the `ucontext` at `uc` (`buf` holds the bytes from
/// `uc` on, at least [`UCONTEXT_SIZE`]): the registers, the address of the x87/SSE state
/// (0: none) and the blocked mask.
pub fn restore(buf: &[u8]) -> (Regs, u64, u64) {
    let mut w = [0u64; 18];
    for (i, v) in w.iter_mut().enumerate() {
        *v = word(buf, UC_MCONTEXT + i as u64 * 8);
    }
    (Regs::from_words(w), word(buf, UC_MCONTEXT + SC_FPSTATE), word(buf, UC_SIGMASK))
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
        let e = build(&l, &mut buf, &regs(), &fx, SIGTERM, 1, 0x4000, 0x401000, 0x402000);
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
        let (back, fpstate, mask) = restore(uc);
        assert_eq!((back, fpstate, mask), (regs(), l.fpstate, 0x4000));
    }

    #[test]
    fn the_handler_s_mask_adds_the_signal_unless_nodefer() {
        assert_eq!(handler_mask(0, 0, 0, SIGTERM), 1 << 14);
        assert_eq!(handler_mask(1, 1 << 1, SA_NODEFER, SIGTERM), 0b11);
        assert_eq!(handler_mask(0, u64::MAX, 0, SIGTERM) & bit(SIGKILL), 0);
    }
}
