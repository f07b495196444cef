//! Per-thread seccomp filters: each of ftvm's threads is allowed only the system calls it
//! makes, as Firecracker and Cloud Hypervisor do it, with the rust-vmm `seccompiler` crate.
//!
//! The command line calls [`init`] once, before it starts any thread (`--seccomp=off` turns
//! the filters off for debugging); each thread then calls [`enter`] with its kind as the
//! first thing it does. A filter, once installed, holds for the thread and for every thread
//! it starts (Linux stacks the filters: a child is allowed only what its parent's filter and
//! its own both allow). Hence the threads that start others (the API thread starts its
//! connection threads, which start a snapshot or a protection, which starts the replication
//! threads) have the union of what their children need, and the children that only inherit
//! do not install one of their own.
//!
//! A forbidden system call does not return: the kernel raises SIGSYS (SECCOMP_RET_TRAP), and
//! the handler installed by [`init`] writes one line to standard error naming the thread and
//! the system call's number, then the process dies of SIGSYS (status 159 in a shell, "killed
//! by signal 31" to a supervisor). The handler uses write(2), gettid(2), getpid(2) and
//! tgkill(2) only, which every filter allows.
//!
//! Without [`init`] (a library's tests, ftvm-bench in-process), [`enter`] does nothing.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// The threads that install a filter of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Thread {
    /// `ftvm-vcpu0`: KVM_RUN and the vCPU's state ioctls, the devices' host effects (TAP
    /// writes, disk reads and writes), the deadline timer it starts.
    Vcpu,
    /// `ftvm-timer`: sleeps and kicks the vCPU.
    Timer,
    /// `ftvm-tap-*`: reads received frames from a TAP.
    TapReader,
    /// `ftvm-stdin`: reads the console's standard input.
    Stdin,
    /// `ftvm-stop`: wakes the vCPU when the operator asks to stop.
    Stop,
    /// `ftvm-log-write`: writes a recording's log.
    LogWrite,
    /// `ftvm-log-send`, `ftvm-log-recv`: the log stream and its acknowledgements.
    Stream,
    /// `ftvm-heartbeat`, `ftvm-accept` (and the handshakes it starts), `etcd-keepalive`,
    /// `ftvm-announce`: connections, heartbeats, the arbiter.
    Link,
    /// `ftvm-api`, `ftvm-metrics` (and what their connections start: snapshots,
    /// protections), `ftvm-acks` (a backup's resync request starts a state transfer there).
    Api,
    /// `ftvm-notify`: systemd's notification socket.
    Notify,
    /// The main thread once the VM runs (it waits for the vCPU, then takes the VM down).
    Main,
}

impl Thread {
    /// Every kind, for [`init`].
    pub const ALL: [Thread; 11] = [
        Thread::Vcpu,
        Thread::Timer,
        Thread::TapReader,
        Thread::Stdin,
        Thread::Stop,
        Thread::LogWrite,
        Thread::Stream,
        Thread::Link,
        Thread::Api,
        Thread::Notify,
        Thread::Main,
    ];

    /// The name the violation line and `FTVM_TEST_FORBIDDEN_SYSCALL` use.
    pub fn name(self) -> &'static str {
        match self {
            Thread::Vcpu => "vcpu",
            Thread::Timer => "timer",
            Thread::TapReader => "tap",
            Thread::Stdin => "stdin",
            Thread::Stop => "stop",
            Thread::LogWrite => "log-write",
            Thread::Stream => "stream",
            Thread::Link => "link",
            Thread::Api => "api",
            Thread::Notify => "notify",
            Thread::Main => "main",
        }
    }
}

/// Why the filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter of the {thread} thread: {source}")]
    Build { thread: &'static str, source: seccompiler::BackendError },
    #[error("cannot compile the seccomp filter of the {thread} thread: {source}")]
    Compile { thread: &'static str, source: seccompiler::BackendError },
    #[error("cannot install the seccomp filter of the {thread} thread: {source}")]
    Install { thread: &'static str, source: seccompiler::Error },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROGRAMS: OnceLock<BTreeMap<Thread, BpfProgram>> = OnceLock::new();
/// Debug builds only (the tests): the kind of thread that makes a forbidden call on purpose.
static FORBIDDEN_IN: OnceLock<Option<String>> = OnceLock::new();

thread_local! {
    /// The filter this thread runs under, for the violation line (const-initialised, no
    /// destructor: reading it in the signal handler makes no system call).
    static CURRENT: Cell<&'static str> = const { Cell::new("(inherited filter)") };
}

/// Builds every filter and installs the SIGSYS handler; with `enabled` false (`--seccomp=off`)
/// [`enter`] does nothing. Call it once, from the main thread, before any other thread starts.
pub fn init(enabled: bool) -> Result<(), Error> {
    if !enabled {
        ENABLED.store(false, Ordering::SeqCst);
        return Ok(());
    }
    let mut programs = BTreeMap::new();
    for kind in Thread::ALL {
        programs.insert(kind, compile(kind)?);
    }
    let _ = PROGRAMS.set(programs);
    if cfg!(debug_assertions) {
        let _ = FORBIDDEN_IN.set(std::env::var("FTVM_TEST_FORBIDDEN_SYSCALL").ok());
    }
    install_handler()?;
    ENABLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Whether the filters are on (after [`init`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Installs the filter of `kind` on the calling thread (and so on every thread it starts
/// from now on). A failure is logged; the thread runs on unfiltered.
pub fn enter(kind: Thread) {
    if let Err(e) = try_enter(kind) {
        tracing::error!("{e}; the thread runs without it");
    }
}

/// [`enter`], returning the failure.
pub fn try_enter(kind: Thread) -> Result<(), Error> {
    if !enabled() {
        return Ok(());
    }
    let Some(program) = PROGRAMS.get().and_then(|p| p.get(&kind)) else {
        return Ok(());
    };
    seccompiler::apply_filter(program).map_err(|source| Error::Install { thread: kind.name(), source })?;
    CURRENT.with(|c| c.set(kind.name()));
    if cfg!(debug_assertions) && FORBIDDEN_IN.get().and_then(|f| f.as_deref()) == Some(kind.name()) {
        tracing::warn!("FTVM_TEST_FORBIDDEN_SYSCALL={}: making a forbidden system call (getppid)", kind.name());
        // SAFETY: getppid takes no arguments and touches no memory; the filter traps it.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    Ok(())
}

/// The number of system calls the filter of `kind` allows (for the documentation and tests).
pub fn allowed_count(kind: Thread) -> usize {
    rules(kind).len()
}

/// Whether the filter of `kind` allows the system call `nr` (with some arguments).
pub fn allows(kind: Thread, nr: i64) -> bool {
    rules(kind).contains_key(&nr)
}

fn compile(kind: Thread) -> Result<BpfProgram, Error> {
    let mut map = BTreeMap::new();
    for (nr, filter) in rules(kind) {
        let rules = match filter {
            Args::Any => Vec::new(),
            Args::Ioctl(requests) => requests
                .iter()
                .map(|&r| {
                    SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, r)
                        .and_then(|c| SeccompRule::new(vec![c]))
                        .map_err(|source| Error::Build { thread: kind.name(), source })
                })
                .collect::<Result<Vec<_>, _>>()?,
            Args::Probe => vec![SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, 0)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(|source| Error::Build { thread: kind.name(), source })?],
            Args::OwnNice => vec![[0, 1]
                .into_iter()
                .map(|arg| SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, 0))
                .collect::<Result<Vec<_>, _>>()
                .and_then(SeccompRule::new)
                .map_err(|source| Error::Build { thread: kind.name(), source })?],
        };
        map.insert(nr, rules);
    }
    let filter = SeccompFilter::new(map, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|source| Error::Build { thread: kind.name(), source })?;
    BpfProgram::try_from(filter).map_err(|source| Error::Compile { thread: kind.name(), source })
}

/// What a filter allows of one system call.
#[derive(Clone, Copy)]
enum Args {
    /// Any arguments.
    Any,
    /// `ioctl` with one of these requests.
    Ioctl(&'static [u64]),
    /// `kill` with signal 0 only: whether a process exists (a staged state transfer's owner).
    Probe,
    /// `setpriority(PRIO_PROCESS, 0, _)` only: the calling thread's own nice value (a link
    /// thread sets its own as it starts, under the filter it inherited from its starter).
    OwnNice,
}

/// Every thread: memory, locks, time and sleep, signal returns (the kick, the SIGSYS handler),
/// logging to standard error, thread exit.
const BASE: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_getrandom,
];

/// A thread that starts others (the child runs its first steps under the parent's filter).
/// (`seccomp`: the child installs its own filter on top of this one.)
const SPAWN: &[i64] =
    &[libc::SYS_clone, libc::SYS_clone3, libc::SYS_set_robust_list, libc::SYS_rseq, libc::SYS_prctl, libc::SYS_seccomp];

/// Files: disks, logs, snapshots, lock files.
const FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_flock,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// Directories: snapshots and state transfers staged on disk, sockets and lock files.
const DIRS: &[i64] = &[
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_geteuid,
    libc::SYS_getuid,
    libc::SYS_getcwd,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
];

/// Who we are: the arbiter refuses a lock file that another user owns.
const IDS: &[i64] = &[libc::SYS_geteuid, libc::SYS_getuid];

/// A connected socket's traffic.
const STREAM: &[i64] = &[
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
];

/// Making connections and listening.
const SOCKETS: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_ioctl,
];

/// What the main thread does beyond the API threads' calls while it takes a VM down (or
/// builds the next one: a backup's fresh VM after a resync).
const MAIN: &[i64] = &[
    libc::SYS_rt_sigaction,
    libc::SYS_arch_prctl,
    libc::SYS_prlimit64,
    libc::SYS_set_tid_address,
    libc::SYS_wait4,
    libc::SYS_eventfd2,
    libc::SYS_uname,
];

/// The ioctls of the vCPU thread: its vCPU's (KVM_RUN and the state it saves and restores),
/// the VM's dirty log, the TAP it opens when a backup goes live, non-blocking sockets.
fn vcpu_ioctls() -> &'static [u64] {
    static LIST: OnceLock<Vec<u64>> = OnceLock::new();
    LIST.get_or_init(|| {
        use kvm_bindings::*;
        use std::mem::size_of;
        let mut v = vec![
            io(0x80), // KVM_RUN
            ior(0x81, size_of::<kvm_regs>()),
            iow(0x82, size_of::<kvm_regs>()),
            ior(0x83, size_of::<kvm_sregs>()),
            iow(0x84, size_of::<kvm_sregs>()),
            iow(0x86, size_of::<kvm_interrupt>()),
            iowr(0x88, size_of::<kvm_msrs>()),
            iow(0x89, size_of::<kvm_msrs>()),
            ior(0x8c, size_of::<kvm_fpu>()),
            iow(0x8d, size_of::<kvm_fpu>()),
            ior(0x8e, size_of::<kvm_lapic_state>()),
            iow(0x8f, size_of::<kvm_lapic_state>()),
            iow(0x90, size_of::<kvm_cpuid2>()),
            iowr(0x91, size_of::<kvm_cpuid2>()),
            ior(0x98, size_of::<kvm_mp_state>()),
            iow(0x99, size_of::<kvm_mp_state>()),
            ior(0x9f, size_of::<kvm_vcpu_events>()),
            iow(0xa0, size_of::<kvm_vcpu_events>()),
            ior(0xa1, size_of::<kvm_debugregs>()),
            iow(0xa2, size_of::<kvm_debugregs>()),
            ior(0xa4, size_of::<kvm_xsave>()),
            iow(0xa5, size_of::<kvm_xsave>()),
            ior(0xa6, size_of::<kvm_xcrs>()),
            iow(0xa7, size_of::<kvm_xcrs>()),
            ior(0xcf, size_of::<kvm_xsave>()), // KVM_GET_XSAVE2
            io(0xad),                          // KVM_KVMCLOCK_CTRL
            iow(0x42, size_of::<kvm_dirty_log>()),
            iowr(0xc0, size_of::<kvm_clear_dirty_log>()),
            iow(0x46, size_of::<kvm_userspace_memory_region>()),
        ];
        // if_nametoindex(3) asks a socket for the TAP's index (SIOCGIFINDEX).
        v.extend([libc::SIOCGIFINDEX, libc::SIOCGIFFLAGS]);
        v.extend([libc::TUNSETIFF, libc::FIONBIO, libc::FIOCLEX, libc::TCGETS, libc::TIOCGWINSZ]);
        v
    })
}

const KVMIO: u64 = 0xae;

fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

fn io(nr: u64) -> u64 {
    ioc(0, nr, 0)
}

fn iow(nr: u64, size: usize) -> u64 {
    ioc(1, nr, size)
}

fn ior(nr: u64, size: usize) -> u64 {
    ioc(2, nr, size)
}

fn iowr(nr: u64, size: usize) -> u64 {
    ioc(3, nr, size)
}

/// The system calls the filter of `kind` allows.
fn rules(kind: Thread) -> BTreeMap<i64, Args> {
    let sets: &[&[i64]] = match kind {
        // `socket`: when a backup goes live it opens its TAP, and if_nametoindex(3) asks a socket.
        // `eventfd2`: the stop signal of the TAP reader it starts then.
        Thread::Vcpu => &[BASE, SPAWN, FILES, STREAM, &[libc::SYS_socket, libc::SYS_eventfd2]],
        Thread::Timer | Thread::Stop => &[BASE],
        Thread::TapReader | Thread::Stdin => {
            &[BASE, &[libc::SYS_read, libc::SYS_readv, libc::SYS_poll, libc::SYS_ppoll]]
        }
        Thread::LogWrite => &[BASE, FILES],
        Thread::Stream => &[BASE, STREAM],
        Thread::Link => &[BASE, SPAWN, STREAM, SOCKETS, FILES, IDS],
        Thread::Notify => &[BASE, STREAM, SOCKETS],
        Thread::Api => &[BASE, SPAWN, STREAM, SOCKETS, FILES, DIRS],
        Thread::Main => &[BASE, SPAWN, STREAM, SOCKETS, FILES, DIRS, MAIN],
    };
    let mut map: BTreeMap<i64, Args> = sets.iter().flat_map(|s| s.iter()).map(|&nr| (nr, Args::Any)).collect();
    if matches!(kind, Thread::Api | Thread::Link | Thread::Main) {
        map.insert(libc::SYS_kill, Args::Probe);
    }
    if kind == Thread::Vcpu {
        map.insert(libc::SYS_ioctl, Args::Ioctl(vcpu_ioctls()));
    }
    if matches!(kind, Thread::Vcpu | Thread::Api | Thread::Link | Thread::Main) {
        // The threads that start others: a link thread's first step (ftvm-replication's
        // `link_nice`) runs under its starter's filter.
        map.insert(libc::SYS_setpriority, Args::OwnNice);
    }
    map
}

fn install_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is a valid value to fill in; the handler is an
    // `extern "C" fn(c_int, *mut siginfo_t, *mut c_void)`, as SA_SIGINFO requires, and only
    // makes async-signal-safe system calls.
    let ret = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
        // SA_RESETHAND|SA_NODEFER: the handler's own tgkill(SIGSYS) then takes the default
        // action at once, and the process dies of SIGSYS.
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if ret != 0 {
        return Err(Error::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A small buffer the handler formats its line into (no allocation in a signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, n: i64) {
        let mut digits = [0u8; 20];
        let (mut n, mut i) = (n.unsigned_abs(), digits.len());
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; for a seccomp trap its `_sigsys` member
    // holds `_call_addr` (8 bytes) then `_syscall` (an int) after the 16-byte header.
    let nr = if info.is_null() { -1 } else { unsafe { *(info as *const u8).add(24).cast::<i32>() } };
    let thread = CURRENT.with(|c| c.get());
    let mut line = Line { buf: [0; 256], len: 0 };
    line.push(b"ftvm: seccomp: the ");
    line.push(thread.as_bytes());
    line.push(b" thread made system call ");
    line.push_number(i64::from(nr));
    line.push(b", which its filter forbids; stopping (SIGSYS). `ausyscall ");
    line.push_number(i64::from(nr));
    line.push(b"` names it; --seccomp=off runs without the filters\n");
    // SAFETY: write, getpid, gettid and tgkill are async-signal-safe and every filter allows
    // them; the buffer outlives the call.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::syscall(libc::SYS_gettid), libc::SIGSYS);
        libc::_exit(128 + libc::SIGSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for kind in Thread::ALL {
            compile(kind).unwrap();
        }
    }

    #[test]
    fn the_test_call_is_forbidden_everywhere_and_the_handler_calls_allowed() {
        for kind in Thread::ALL {
            assert!(!allows(kind, libc::SYS_getppid), "{kind:?}");
            assert!(!allows(kind, libc::SYS_execve), "{kind:?}");
            for nr in [libc::SYS_write, libc::SYS_getpid, libc::SYS_gettid, libc::SYS_tgkill, libc::SYS_exit_group] {
                assert!(allows(kind, nr), "{kind:?} {nr}");
            }
        }
    }

    /// A thread that starts others lets them set their own nice value (a link thread's
    /// first step), and only their own.
    #[test]
    fn starters_allow_a_thread_its_own_nice_value_only() {
        for kind in Thread::ALL {
            let starts = rules(kind).contains_key(&libc::SYS_clone);
            assert_eq!(allows(kind, libc::SYS_setpriority), starts, "{kind:?}");
            if starts {
                assert!(matches!(rules(kind)[&libc::SYS_setpriority], Args::OwnNice), "{kind:?}");
            }
        }
    }

    #[test]
    fn kvm_run_is_the_number_the_kernel_uses() {
        assert_eq!(io(0x80), 0xae80);
        assert_eq!(ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>()), 0x8090ae81);
    }
}
