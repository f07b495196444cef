//! Threads on the one vCPU: a deterministic cooperative scheduler. A thread runs until it
//! blocks in a system call (futex wait, epoll wait, sleep, a blocking read or accept) or
//! exits; then the next runnable thread in tid order after it runs. When none is runnable
//! the network is polled and the vCPU idles until the next interrupt (the 100 Hz timer at
//! the latest). No time slicing: which thread runs depends only on the system calls made
//! and the guest's inputs, never on host timing.

use alloc::vec;
use alloc::vec::Vec;

use ftvm_guest_kit::time;
use linux_abi::signal::{AltStack, Pending};

use crate::entry::{self, Frame};

const KSTACK: usize = 128 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Woken by FUTEX_WAKE on this address.
    Futex(u64),
    /// Re-checks its condition when I/O state changed (`io_changed`) or its deadline passed.
    Io(u64),
    /// Only its deadline.
    Sleep,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Runnable,
    Blocked(Wait),
    Dead,
}

pub struct Thread {
    pub tid: u32,
    /// The kernel stack (kept alive here; the thread's context lives on it).
    _kstack: Vec<u128>,
    kstack_top: u64,
    saved_sp: u64,
    pub fs_base: u64,
    pub clear_child_tid: u64,
    state: State,
    /// Tick at which a blocked thread wakes anyway.
    deadline: Option<u64>,
    /// Set when woken by a futex wake (not by the deadline).
    pub woken: bool,
    /// A thread of a parent whose forked child runs now (`fork`): never picked, woken or
    /// counted until the child ends.
    pub frozen: bool,
    /// Its blocked signals (`rt_sigprocmask`: per thread, as on Linux).
    pub sigmask: u64,
    /// The mask to put back when the system call in progress ends (`rt_sigsuspend`,
    /// `epoll_pwait`, `ppoll` wait under a mask of their own), or that a handler's frame saves.
    pub saved_mask: Option<u64>,
    /// Signals sent to this thread (`tkill`, `tgkill`) and not taken yet.
    pub pending: Pending,
    /// Its alternate signal stack (`sigaltstack`).
    pub altstack: AltStack,
    /// The system call `rt_sigreturn` restarts (its frame said so: SA_RESTART).
    pub restart: Option<u64>,
}

pub struct Sched {
    pub threads: Vec<Thread>,
    pub current: usize,
    next_tid: u32,
    /// Bumped whenever a socket, pipe or other I/O object may have changed state.
    io_gen: u64,
    /// Threads whose stacks can be freed (dead, and not the one running).
    pub reaped: u64,
}

fn new_kstack() -> (Vec<u128>, u64) {
    let stack = vec![0u128; KSTACK / 16];
    let top = stack.as_ptr() as u64 + KSTACK as u64;
    (stack, top)
}

impl Sched {
    pub fn new(tid: u32) -> Sched {
        let (kstack, kstack_top) = new_kstack();
        Sched {
            threads: vec![Thread {
                tid,
                _kstack: kstack,
                kstack_top,
                saved_sp: 0,
                fs_base: 0,
                clear_child_tid: 0,
                state: State::Runnable,
                deadline: None,
                woken: false,
                frozen: false,
                sigmask: 0,
                saved_mask: None,
                pending: Pending::new(),
                altstack: AltStack::DISABLED,
                restart: None,
            }],
            current: 0,
            next_tid: tid + 1,
            io_gen: 0,
            reaped: 0,
        }
    }

    pub fn main_kstack_top(&self) -> u64 {
        self.threads[0].kstack_top
    }

    pub fn current(&mut self) -> &mut Thread {
        &mut self.threads[self.current]
    }

    pub fn tid(&self) -> u32 {
        self.threads[self.current].tid
    }

    /// Threads of the running process that have not exited (a forked child's only, while one runs).
    pub fn live(&self) -> usize {
        self.threads.iter().filter(|t| t.state != State::Dead && !t.frozen).count()
    }

    /// A new thread or process id (they share one space, as on Linux).
    pub fn alloc_tid(&mut self) -> u32 {
        let tid = self.next_tid;
        self.next_tid += 1;
        tid
    }

    /// The registers of thread `i` as its last system call entry saved them (at the top of
    /// its kernel stack; a thread not yet run: the ones `spawn` prepared there).
    pub fn frame_of(&self, i: usize) -> &Frame {
        let at = self.threads[i].kstack_top - entry::FRAME_SIZE as u64;
        // SAFETY: every thread's kernel stack holds its Frame at the top while it is in a
        // system call or not yet started (entry, `prepare`); the stack lives as long as the slot.
        unsafe { &*(at as *const Frame) }
    }

    pub fn kstack_top(&self, i: usize) -> u64 {
        self.threads[i].kstack_top
    }

    pub fn is_dead(&self, i: usize) -> bool {
        self.threads[i].state == State::Dead
    }

    /// `fork`: every thread but the current one is frozen while the child runs.
    pub fn freeze_others(&mut self) {
        let current = self.current;
        for (i, t) in self.threads.iter_mut().enumerate() {
            t.frozen = i != current && t.state != State::Dead;
        }
    }

    /// The child has ended: its threads (all unfrozen ones but `keep`) are gone, the
    /// parent's run again, and `keep` (the thread that forked) is current.
    pub fn thaw(&mut self, keep: usize) {
        for (i, t) in self.threads.iter_mut().enumerate() {
            if t.frozen {
                t.frozen = false;
            } else if i != keep {
                t.state = State::Dead;
                t.deadline = None;
            }
        }
        self.threads[keep].state = State::Runnable;
        self.threads[keep].deadline = None;
        self.current = keep;
    }

    /// Whether every live thread of the running process waits on a futex with no deadline:
    /// nothing it does can wake it (a forked child whose parent is frozen: `fork::stuck`).
    pub fn all_stuck_on_futexes(&self) -> bool {
        self.threads
            .iter()
            .filter(|t| t.state != State::Dead && !t.frozen)
            .all(|t| matches!(t.state, State::Blocked(Wait::Futex(_))) && t.deadline.is_none())
    }

    /// A new thread that resumes `frame` when it first runs, with the blocked mask `sigmask`
    /// (its creator's, as on Linux; no alternate stack, nothing pending). Returns its tid.
    pub fn spawn(&mut self, frame: &Frame, fs_base: u64, clear_child_tid: u64, sigmask: u64) -> u32 {
        let (kstack, kstack_top) = new_kstack();
        let saved_sp = entry::prepare(kstack_top, frame);
        let tid = self.alloc_tid();
        // Reuse a dead thread's slot (never the running one's: its stack is in use).
        let thread = Thread {
            tid,
            _kstack: kstack,
            kstack_top,
            saved_sp,
            fs_base,
            clear_child_tid,
            state: State::Runnable,
            deadline: None,
            woken: false,
            frozen: false,
            sigmask,
            saved_mask: None,
            pending: Pending::new(),
            altstack: AltStack::DISABLED,
            restart: None,
        };
        let current = self.current;
        match self.threads.iter().enumerate().position(|(i, t)| i != current && t.state == State::Dead) {
            Some(i) => self.threads[i] = thread,
            None => self.threads.push(thread),
        }
        tid
    }

    /// The live threads of the running process that a signal may go to, in Linux's order of
    /// preference: the main thread (tid `main`) first, then by tid. (slot, blocked mask).
    pub fn signal_targets(&self, main: u32) -> Vec<(usize, u64)> {
        let mut live: Vec<(usize, u64)> = (0..self.threads.len())
            .filter(|&i| self.threads[i].state != State::Dead && !self.threads[i].frozen)
            .map(|i| (i, self.threads[i].sigmask))
            .collect();
        live.sort_by_key(|&(i, _)| (self.threads[i].tid != main, self.threads[i].tid));
        live
    }

    /// The slot of the live thread `tid` of the running process.
    pub fn slot_of(&self, tid: u32) -> Option<usize> {
        self.threads.iter().position(|t| t.tid == tid && t.state != State::Dead && !t.frozen)
    }

    /// A signal for thread `i` that it does not block: if it waits, it runs again to see it
    /// (its wait ends with EINTR, or restarts: `crate::signal`).
    pub fn interrupt(&mut self, i: usize) {
        let t = &mut self.threads[i];
        if matches!(t.state, State::Blocked(_)) && !t.frozen {
            t.state = State::Runnable;
        }
    }

    pub fn io_changed(&mut self) {
        self.io_gen += 1;
    }

    pub fn io_gen(&self) -> u64 {
        self.io_gen
    }

    /// Wakes up to `n` threads waiting on `addr`; returns how many.
    pub fn futex_wake(&mut self, addr: u64, n: u64) -> u64 {
        let mut woken = 0;
        for t in &mut self.threads {
            if woken >= n {
                break;
            }
            if t.state == State::Blocked(Wait::Futex(addr)) && !t.frozen {
                t.state = State::Runnable;
                t.woken = true;
                woken += 1;
            }
        }
        woken
    }

    /// Moves up to `n` waiters of `from` to wait on `to` instead.
    pub fn futex_requeue(&mut self, from: u64, to: u64, n: u64) -> u64 {
        let mut moved = 0;
        for t in &mut self.threads {
            if moved >= n {
                break;
            }
            if t.state == State::Blocked(Wait::Futex(from)) && !t.frozen {
                t.state = State::Blocked(Wait::Futex(to));
                moved += 1;
            }
        }
        moved
    }

    fn wake_due(&mut self, now: u64) {
        let io_gen = self.io_gen;
        for t in self.threads.iter_mut().filter(|t| !t.frozen) {
            if let State::Blocked(wait) = t.state {
                let due = t.deadline.is_some_and(|d| now >= d);
                let io = matches!(wait, Wait::Io(g) if g != io_gen);
                if due || io {
                    t.state = State::Runnable;
                }
            }
        }
    }

    /// The next runnable thread after the current one, in slot order (the current last).
    fn pick(&self) -> Option<usize> {
        let n = self.threads.len();
        (1..=n)
            .map(|i| (self.current + i) % n)
            .find(|&i| self.threads[i].state == State::Runnable && !self.threads[i].frozen)
    }

    /// Marks the current thread dead (after `exit`).
    pub fn exit_current(&mut self) {
        let t = &mut self.threads[self.current];
        t.state = State::Dead;
        t.deadline = None;
    }
}

/// Blocks the current thread on `wait` until it is woken, its deadline (a tick count)
/// passes, or, for `Wait::Io`, I/O state changes. Runs other threads meanwhile; polls the
/// network and idles when none can run. Returns after the current thread is runnable again.
pub fn block(wait: Wait, deadline: Option<u64>) {
    {
        let s = crate::sched();
        let t = s.current();
        t.state = State::Blocked(wait);
        t.deadline = deadline;
        t.woken = false;
    }
    run_others();
}

/// Lets every other runnable thread run once (sched_yield), the current one staying runnable.
pub fn yield_now() {
    run_others();
}

fn run_others() {
    loop {
        crate::poll_io();
        // The operator's request and expired timers: their signals wake the thread they go to.
        crate::signal::poll();
        let s = crate::sched();
        s.wake_due(time::ticks());
        match s.pick() {
            Some(next) if next == s.current => {
                s.threads[next].deadline = None;
                return;
            }
            Some(next) => {
                let from = s.current;
                s.current = next;
                s.threads[next].deadline = None;
                let fs = s.threads[next].fs_base;
                ftvm_guest_kit::syscall::set_fs_base(fs);
                let resume = s.threads[next].saved_sp;
                let top = s.threads[next].kstack_top;
                let save: *mut u64 = &mut s.threads[from].saved_sp;
                // SAFETY: `save` points into the thread table, which `spawn` may grow while
                // another thread runs; so the slot is re-read below... the Vec may move, so
                // write the saved SP through a pointer only while nothing else runs (true:
                // `linux_switch` stores it before resuming the other thread).
                entry::switch(unsafe { &mut *save }, resume, top);
                // Back on this thread: the scheduler chose it again.
                return;
            }
            None => {
                if crate::sched().live() == 0 {
                    crate::exit_all(0);
                }
                crate::fork::stuck();
                crate::vdso::tick_hook();
                time::idle();
                // Woken (a frame, a tick): the clock is read afresh, so a program that
                // slept or waited for a request sees the time that passed to within the
                // PM timer's count, not the tick's. One port read, paid only when the
                // vCPU had nothing to do.
                crate::vdso::resample();
            }
        }
    }
}

/// Ends the current thread for good: runs the others and never returns.
pub fn exit_thread() -> ! {
    crate::sched().exit_current();
    loop {
        run_others();
        // Only reached if this dead thread was picked, which `pick` never does.
    }
}

/// Converts a timeout in milliseconds to a deadline tick (rounded up; at least one tick).
pub fn deadline_ms(ms: u64) -> u64 {
    time::ticks() + time::ms_to_ticks(ms).max(1)
}

/// Converts a timeout in nanoseconds to a deadline tick.
pub fn deadline_ns(ns: u64) -> u64 {
    deadline_ms(ns.div_ceil(1_000_000))
}
