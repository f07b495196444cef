//! `fork` (and `vfork`, and `clone` without CLONE_VM or with CLONE_VFORK) in one
//! identity-mapped address space:
//! **the child runs to completion at once**, in the parent's memory, while the parent waits.
//!
//! On fork, what the program uses of the process window (its segments and brk, every mmap
//! region, the main thread's stack from below the lowest saved stack pointer on it, red zone
//! included; `ProcMem::used`) is copied aside into the personality's heap, with the
//! parent's registers, fd table, memory map, working directory, umask and signal
//! dispositions. The child gets a new pid (from the thread-id counter: one id space), a copy
//! of the fd table (the same open files, pipes and sockets, as on Linux: a descriptor the
//! child closes stays open in the parent) and only the forking thread; every other thread
//! is frozen (never picked, woken or counted) until the child ends. `fork` returns 0 to it.
//!
//! When the child ends (`exit_group`, its last thread's `exit`, a fatal signal to itself;
//! all through `exit_all`), its descriptors close, the copy is written back, the parent's
//! state is put back, the child becomes a zombie with its status, the parent gets SIGCHLD,
//! and the forking thread resumes in ring 3 from the parent's saved registers with the
//! child's pid in RAX (on a reset kernel stack: the child's pending system call is
//! abandoned). `wait4` reaps it. The child starts with the forking thread's mask and
//! alternate stack, nothing pending and no timers; the parent's come back when it ends.
//!
//! While a child runs nothing of its parent can run, so nothing may wait for it: a pipe
//! never fills (it grows), and an empty pipe reads as end of file (as if every write end
//! were closed: the writers that could fill it, the parent's, are frozen); a child whose
//! threads all wait on futexes with no deadline (only the parent could wake them) is ended
//! as if killed by SIGKILL. Sleeping, or waiting for the network, works as usual.
//!
//! A child that read such an end of file was waiting for its parent to close that pipe (a
//! handshake: Redis's diskless replication child writes its RDB into one pipe, then reads
//! another until the parent, having relayed the RDB, closes it, and only then exits). On
//! Linux the parent cannot see that child end before it closes its end, so here neither:
//! the child's end is **held** (no zombie for `wait4`, no SIGCHLD; `wait4` with WNOHANG
//! says 0, children running) until the last write end of that pipe closes. A `wait4` that
//! would block releases it at once (the parent could not close the pipe while waiting).
//!
//! Everything here is synchronous and depends only on guest state, so record/replay stays
//! exact. Cost: the copy, twice (aside and back), and the parent stands still meanwhile;
//! the heap must hold the copy and as much again (at least 16 MiB) for what the child
//! allocates there (the files it writes live in RAM), else ENOMEM. A child cannot fork
//! (EAGAIN).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::rc::{Rc, Weak};
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{RefCell, UnsafeCell};

use ftvm_guest_kit::{println, time};
use linux_abi::proc::{self, Children, Exit};

use crate::entry::{self, Frame};
use crate::{kernel, mem, sched, sys};

const EAGAIN: i64 = 11;
const ECHILD: i64 = 10;
const ENOMEM: i64 = 12;
const SIGKILL: u64 = 9;
const RED_ZONE: u64 = 128;
/// The least room a fork leaves in the heap for the child, besides the copy.
const CHILD_ROOM: u64 = 16 << 20;

/// The parent, set aside while its child runs.
struct Parent {
    /// Its registers at the fork, RAX = the child's pid.
    frame: Frame,
    /// The forking thread's slot and its own fields (the child's thread uses the slot).
    slot: usize,
    tid: u32,
    fs_base: u64,
    clear_child_tid: u64,
    fds: sys::FdTable,
    mem: mem::ProcMem,
    cwd: String,
    umask: u32,
    sigactions: BTreeMap<u64, [u64; 4]>,
    /// The forking thread's blocked mask and pending signals (the child's thread, in the same
    /// slot, keeps the mask and starts with none pending).
    sigmask: u64,
    thread_pending: linux_abi::signal::Pending,
    altstack: linux_abi::signal::AltStack,
    /// The parent's process-wide signal state: pending signals, interval timers.
    signals: crate::signal::Process,
    /// The process window's used ranges and their bytes, in order.
    plan: Vec<(u64, u64)>,
    copy: Vec<u8>,
    child: u32,
    /// Ticks at the fork, and when the copy aside was done.
    forked: u64,
    started: u64,
}

struct Procs {
    children: Children,
    parent: Option<Box<Parent>>,
    /// The pipe the running child last read as end of file while its parent held a write
    /// end of it (see the module's comment).
    waited_on: Option<Weak<RefCell<sys::Pipe>>>,
    /// Children that ended waiting on a pipe the parent still holds: seen when it closes.
    held: Vec<Held>,
}

/// A child whose end the parent does not see yet.
struct Held {
    pid: u32,
    how: Exit,
    pipe: Weak<RefCell<sys::Pipe>>,
}

struct Global(UnsafeCell<Procs>);
// SAFETY: one CPU; only system calls (never interrupt handlers) touch it.
unsafe impl Sync for Global {}

static PROCS: Global =
    Global(UnsafeCell::new(Procs { children: Children::new(), parent: None, waited_on: None, held: Vec::new() }));

fn procs() -> &'static mut Procs {
    // SAFETY: see `Global`; callers do not keep the reference across a thread switch.
    unsafe { &mut *PROCS.0.get() }
}

/// Whether a forked child is running (its parent frozen).
pub fn in_child() -> bool {
    procs().parent.is_some()
}

/// getpid: the child's pid while it runs.
pub fn pid() -> u32 {
    procs().parent.as_ref().map_or(crate::PID, |p| p.child)
}

/// getppid: the first process has none (0, like init's); a child's is it.
pub fn ppid() -> u32 {
    if in_child() {
        crate::PID
    } else {
        0
    }
}

/// kill(target, sig) where fork knows the answer: a zombie child takes any signal and
/// ignores it (as on Linux); a child signalling its frozen parent: accepted and dropped (the
/// parent cannot run a handler while frozen). `None`: not a process of ours (the caller goes on).
pub fn kill(target: u64, _sig: u64) -> Option<Result<i64, i64>> {
    let p = procs();
    if p.parent.is_some() {
        return (target == u64::from(crate::PID)).then_some(Ok(0));
    }
    let zombie =
        u32::try_from(target).is_ok_and(|pid| p.children.is_zombie(pid) || p.held.iter().any(|h| h.pid == pid));
    zombie.then_some(Ok(0))
}

/// A read by the running child found `pipe` empty with write ends left (its frozen
/// parent's): its end is held until they close (see the module's comment).
pub fn child_read_eof(pipe: &Rc<RefCell<sys::Pipe>>) {
    if in_child() {
        procs().waited_on = Some(Rc::downgrade(pipe));
    }
}

/// A pipe's last write end closed: the children held on it (or on a pipe gone) end now.
pub fn pipe_closed() {
    release(|h| h.pipe.upgrade().is_none_or(|pipe| !pipe.borrow().has_writers()));
}

/// The held children `which` picks end now, for their parent to see.
fn release(which: impl Fn(&Held) -> bool) {
    let p = procs();
    if p.held.is_empty() {
        return;
    }
    let (done, held): (Vec<Held>, Vec<Held>) = core::mem::take(&mut p.held).into_iter().partition(which);
    p.held = held;
    for h in done {
        announce(h.pid, h.how);
    }
}

/// The parent sees its child's end: a zombie for `wait4`, and SIGCHLD as Linux sends it
/// (dropped unless a handler is installed).
fn announce(child: u32, how: Exit) {
    procs().children.exited(child, how);
    let info = match how {
        Exit::Code(code) => linux_abi::signal::Info::child(child, linux_abi::signal::CLD_EXITED, code as u32),
        Exit::Signal(sig) => linux_abi::signal::Info::child(child, linux_abi::signal::CLD_KILLED, sig as u32),
    };
    crate::signal::raise(linux_abi::signal::SIGCHLD, info);
}

/// wait4(pid, .., options): (pid, status word) of a reaped zombie; a running child has no
/// children of its own.
pub fn wait(pid: i64, options: u64) -> Result<(u32, u32), i64> {
    if in_child() {
        return Err(ECHILD);
    }
    let p = procs();
    match p.children.wait(pid, options) {
        Err(ECHILD) => {
            let matching = |h: &Held| pid <= 0 || i64::from(h.pid) == pid;
            if !p.held.iter().any(matching) {
                return Err(ECHILD);
            }
            if options & proc::WNOHANG != 0 {
                return Ok((0, 0));
            }
            release(matching);
            procs().children.wait(pid, options)
        }
        r => r,
    }
}

/// The process window's ranges a fork copies aside (see the module's comment).
fn plan(frame: &Frame) -> Vec<(u64, u64)> {
    let k = kernel();
    let s = sched();
    let mut ranges = k.mem.used();
    let stack = mem::STACK_TOP - mem::STACK_SIZE..mem::STACK_TOP;
    let lowest = (0..s.threads.len())
        .filter(|&i| !s.is_dead(i))
        .map(|i| if i == s.current { frame.rsp } else { s.frame_of(i).rsp })
        .filter(|rsp| stack.contains(rsp))
        .min();
    // No thread on the main stack (its thread exited): all of it (argv, envp live there).
    let low = lowest.map_or(stack.start, |rsp| rsp.saturating_sub(RED_ZONE).max(stack.start));
    ranges.push((low, stack.end));
    proc::plan(&ranges)
}

/// fork: see the module's comment. Returns 0 (to the child, on `stack` if not 0: a clone
/// with CLONE_VFORK); the parent gets the child's pid when the child has ended (`finish`).
pub fn fork(frame: &mut Frame, stack: u64) -> Result<i64, i64> {
    if in_child() {
        return Err(EAGAIN);
    }
    let plan = plan(frame);
    let total = proc::bytes(&plan);
    let room = total.max(CHILD_ROOM);
    let mut spare: Vec<u8> = Vec::new();
    let mut copy: Vec<u8> = Vec::new();
    if spare.try_reserve_exact(room as usize).is_err() || copy.try_reserve_exact(total as usize).is_err() {
        println!(
            "linux: fork: the heap cannot hold the {} KiB copy of the process and {} KiB for the child: ENOMEM",
            total >> 10,
            room >> 10
        );
        return Err(ENOMEM);
    }
    drop(spare);
    let forked = time::ticks();
    for &(start, end) in &plan {
        // SAFETY: ranges inside the process window (identity-mapped RAM the program owns).
        copy.extend_from_slice(unsafe { core::slice::from_raw_parts(start as *const u8, (end - start) as usize) });
    }
    let k = kernel();
    let s = sched();
    let child = s.alloc_tid();
    let mut parent_frame = frame.clone();
    parent_frame.rax = u64::from(child);
    let slot = s.current;
    let child_fds = k.fds.fork_copy();
    let t = s.current();
    let parent = Parent {
        frame: parent_frame,
        slot,
        tid: t.tid,
        fs_base: t.fs_base,
        clear_child_tid: t.clear_child_tid,
        fds: core::mem::replace(&mut k.fds, child_fds),
        mem: k.mem.clone(),
        cwd: k.cwd.clone(),
        umask: k.umask,
        sigactions: k.sigactions.clone(),
        sigmask: t.sigmask,
        // The child starts with no signal pending and no timers (as on Linux); the parent's
        // wait for it.
        thread_pending: core::mem::take(&mut t.pending),
        altstack: t.altstack,
        signals: crate::signal::take_process(),
        plan,
        copy,
        child,
        forked,
        started: time::ticks(),
    };
    t.tid = child;
    t.clear_child_tid = 0;
    s.freeze_others();
    if stack != 0 {
        frame.rsp = stack;
    }
    procs().parent = Some(Box::new(parent));
    Ok(0)
}

/// From `exit_all`: if a child is running, it ends with `status` and its parent resumes
/// (never returns then); otherwise returns at once.
pub fn exited(status: u64) {
    if let Some(parent) = procs().parent.take() {
        finish(parent, Exit::Code(status & 0xff));
    }
}

/// From the scheduler when no thread can run: a child whose threads all wait on futexes
/// with no deadline can never go on (its parent is frozen): it ends as if killed.
pub fn stuck() {
    if in_child() && sched().all_stuck_on_futexes() {
        let parent = procs().parent.take().expect("a child runs");
        println!(
            "linux: fork: child {} waits on a futex that only its frozen parent could wake: ended as if by SIGKILL",
            parent.child
        );
        finish(parent, Exit::Signal(SIGKILL));
    }
}

fn finish(parent: Box<Parent>, how: Exit) -> ! {
    let (frame, top) = {
        let Parent {
            frame,
            slot,
            tid,
            fs_base,
            clear_child_tid,
            fds,
            mem,
            cwd,
            umask,
            sigactions,
            sigmask,
            thread_pending,
            altstack,
            signals,
            plan,
            copy,
            child,
            forked,
            started,
        } = *parent;
        let ended_at = time::ticks();
        let k = kernel();
        let child_fds = core::mem::replace(&mut k.fds, fds);
        sys::close_all(k, child_fds);
        let mut at = 0;
        for &(start, end) in &plan {
            let len = (end - start) as usize;
            // SAFETY: the ranges `fork` copied, inside the process window.
            unsafe { core::ptr::copy_nonoverlapping(copy[at..].as_ptr(), start as *mut u8, len) };
            at += len;
        }
        k.mem = mem;
        k.cwd = cwd;
        k.umask = umask;
        k.sigactions = sigactions;
        // What the child left pending goes with it; the parent's come back.
        crate::signal::set_process(signals);
        let s = sched();
        s.thaw(slot);
        let t = &mut s.threads[slot];
        t.sigmask = sigmask;
        t.pending = thread_pending;
        t.altstack = altstack;
        t.saved_mask = None;
        t.restart = None;
        t.tid = tid;
        t.fs_base = fs_base;
        t.clear_child_tid = clear_child_tid;
        ftvm_guest_kit::syscall::set_fs_base(fs_base);
        s.io_changed();
        // Waiting for the parent to close a pipe it still holds: the parent sees the end then.
        let waited_on =
            procs().waited_on.take().filter(|w| w.upgrade().is_some_and(|pipe| pipe.borrow().has_writers()));
        let held = waited_on.is_some();
        match waited_on {
            Some(pipe) => procs().held.push(Held { pid: child, how, pipe }),
            None => announce(child, how),
        }
        let mut ended = match how {
            Exit::Code(code) => alloc::format!("exited with status {code}"),
            Exit::Signal(sig) => alloc::format!("killed by signal {sig}"),
        };
        if held {
            ended.push_str(" (seen by the parent when it closes the pipe the child waited on)");
        }
        println!(
            "linux: fork: child {child} {ended} after {} ms; {} KiB copied aside in {} ms and back in {} ms",
            time::ticks_to_ms(ended_at - started),
            copy.len() >> 10,
            time::ticks_to_ms(started - forked),
            time::ticks_to_ms(time::ticks() - ended_at)
        );
        (frame, s.kstack_top(slot))
    };
    entry::enter(top, &frame)
}
