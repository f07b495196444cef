//! The system calls: `linux_syscall` (called by the entry with the saved registers) and
//! the file-descriptor table, pipes and epoll. Numbers and structures are x86-64 Linux's.
//! An unknown call returns -ENOSYS and prints one line naming it (once per number).

use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::sync::atomic::{AtomicU64, Ordering};

use ftvm_guest_kit::{println, serial, time};
use smoltcp::iface::SocketHandle;
use smoltcp::wire::IpAddress;

use crate::entry::Frame;
use crate::fs::{self, Data, Dev, Node};
use crate::sched::{self, Wait};
use crate::{kernel, sched as threads, Kernel};
use linux_abi::epoll::{Activity, CtlError, Probe, ReadyList, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP};
use linux_abi::journal::Record;
use linux_abi::signal::{self as sigabi, ERESTARTNOHAND, ERESTARTSYS, ERESTART_RESTARTBLOCK};

// errno values.
const EPERM: i64 = 1;
const ENOENT: i64 = 2;
const ESRCH: i64 = 3;
const EINTR: i64 = 4;
const EBADF: i64 = 9;
const EAGAIN: i64 = 11;
const ENOMEM: i64 = 12;
const EFAULT: i64 = 14;
const EEXIST: i64 = 17;
const ENOTDIR: i64 = 20;
const EISDIR: i64 = 21;
const EINVAL: i64 = 22;
const EMFILE: i64 = 24;
const ENOTTY: i64 = 25;
const ESPIPE: i64 = 29;
const EPIPE: i64 = 32;
const ERANGE: i64 = 34;
const ENOSYS: i64 = 38;
const ENOTSOCK: i64 = 88;
const EPROTONOSUPPORT: i64 = 93;
const EOPNOTSUPP: i64 = 95;
const EAFNOSUPPORT: i64 = 97;
const EADDRINUSE: i64 = 98;
const EADDRNOTAVAIL: i64 = 99;
const ENETDOWN: i64 = 100;
const ENETUNREACH: i64 = 101;
const ENOTCONN: i64 = 107;
const ETIMEDOUT: i64 = 110;

const O_ACCMODE: u64 = 3;
const O_WRONLY: u64 = 1;
const O_CREAT: u64 = 0o100;
const O_EXCL: u64 = 0o200;
const O_TRUNC: u64 = 0o1000;
const O_APPEND: u64 = 0o2000;
const O_NONBLOCK: u64 = 0o4000;
const O_DIRECTORY: u64 = 0o200000;
const O_CLOEXEC: u64 = 0o2000000;
const AT_FDCWD: i64 = -100;

const PIPE_CAPACITY: usize = 64 << 10;
const MAX_FDS: usize = 65536;

pub struct Pipe {
    buf: alloc::collections::VecDeque<u8>,
    readers: u32,
    writers: u32,
    /// Writes, reads that made room, and closes of either end, for epoll's order.
    activity: Activity,
}

impl Pipe {
    fn new() -> Rc<RefCell<Pipe>> {
        Rc::new(RefCell::new(Pipe { buf: Default::default(), readers: 1, writers: 1, activity: Activity::default() }))
    }

    fn changed(&mut self) {
        changed(&mut self.activity);
    }

    /// Whether a write end is open.
    pub fn has_writers(&self) -> bool {
        self.writers > 0
    }

    /// A read: Some(n) (0 at the end: no writers left), None when it would block.
    fn read_into(&mut self, buf: &mut [u8]) -> Option<usize> {
        if self.buf.is_empty() {
            // A forked child: its parent's write ends cannot write (fork).
            return (self.writers == 0 || crate::fork::in_child()).then_some(0);
        }
        let len = buf.len().min(self.buf.len());
        for (i, b) in self.buf.drain(..len).enumerate() {
            buf[i] = b;
        }
        self.changed();
        Some(len)
    }

    /// A write: Ok(Some(n)), Ok(None) when full, EPIPE with no readers left.
    fn write_from(&mut self, data: &[u8]) -> Result<Option<usize>, i64> {
        if self.readers == 0 {
            return Err(EPIPE);
        }
        // A forked child's pipes grow: the parent that would drain them is frozen (fork).
        let room = if crate::fork::in_child() { data.len() } else { PIPE_CAPACITY.saturating_sub(self.buf.len()) };
        if room == 0 {
            return Ok(None);
        }
        let len = room.min(data.len());
        self.buf.extend(&data[..len]);
        self.changed();
        Ok(Some(len))
    }

    fn read_readiness(&self) -> u32 {
        if !self.buf.is_empty() {
            EPOLLIN
        } else if self.writers == 0 || crate::fork::in_child() {
            EPOLLIN | EPOLLHUP
        } else {
            0
        }
    }

    fn write_readiness(&self) -> u32 {
        if self.readers == 0 {
            EPOLLOUT | EPOLLERR
        } else if self.buf.len() < PIPE_CAPACITY || crate::fork::in_child() {
            EPOLLOUT
        } else {
            0
        }
    }
}

/// One end of a `socketpair` (AF_UNIX, SOCK_STREAM): two pipes, one each way, and what
/// `shutdown` closed of this end.
pub struct PairEnd {
    rx: Rc<RefCell<Pipe>>,
    tx: Rc<RefCell<Pipe>>,
    read_shut: bool,
    write_shut: bool,
}

impl PairEnd {
    /// `shutdown(how)`: the peer sees the end of what it reads, or EPIPE.
    fn shut(&mut self, read: bool, write: bool) {
        let (read, write) = (read && !self.read_shut, write && !self.write_shut);
        self.read_shut |= read;
        self.write_shut |= write;
        self.let_go(read, write);
    }

    /// Stops reading and/or writing: this end no longer counts as the pipes' reader/writer.
    fn let_go(&self, read: bool, write: bool) {
        if read {
            let mut rx = self.rx.borrow_mut();
            rx.readers -= 1;
            rx.changed();
        }
        if write {
            let mut tx = self.tx.borrow_mut();
            tx.writers -= 1;
            tx.changed();
        }
    }

    /// As Linux's unix_poll: readable with data or once the peer stopped writing (with
    /// RDHUP), HUP when both ways are shut, writable (a write to a closed peer fails with
    /// EPIPE), ERR when the peer closed with data of ours unread.
    fn readiness(&self) -> u32 {
        let rx = self.rx.borrow();
        let tx = self.tx.borrow();
        let mut ev = 0;
        let peer_done = rx.writers == 0;
        if !rx.buf.is_empty() || peer_done || self.read_shut {
            ev |= EPOLLIN;
        }
        if peer_done || self.read_shut {
            ev |= EPOLLRDHUP;
        }
        if (peer_done || self.read_shut) && (self.write_shut || tx.readers == 0) {
            ev |= EPOLLHUP;
        }
        if tx.buf.len() < PIPE_CAPACITY || tx.readers == 0 {
            ev |= EPOLLOUT;
        }
        if tx.readers == 0 && !tx.buf.is_empty() {
            // The peer closed with what we sent unread: Linux sets ECONNRESET on us.
            ev |= EPOLLERR;
        }
        ev
    }
}

/// An eventfd's counter (eventfd(2)): a write adds, a read takes it all (or one, with
/// EFD_SEMAPHORE) and blocks while it is 0; a write that would pass `EVENTFD_MAX` blocks.
pub struct EventFd {
    count: u64,
    semaphore: bool,
    activity: Activity,
}

const EVENTFD_MAX: u64 = u64::MAX - 1;
const EFD_SEMAPHORE: u64 = 1;

/// One epoll instance (its interest list and ready list, `linux_abi::epoll`).
pub type Epoll = ReadyList;

/// The stamps that order events across files for epoll (`linux_abi::epoll`): one counter
/// for every file, and the stamp of the latest scan. The personality's kernel runs on one
/// vCPU and never preempts itself, so plain cells would do; atomics keep it `Sync`.
static STAMP: AtomicU64 = AtomicU64::new(0);
static SCANNED: AtomicU64 = AtomicU64::new(0);

fn stamp() -> u64 {
    STAMP.fetch_add(1, Ordering::Relaxed) + 1
}

/// An event on a file (data arrived, room freed, a peer closed) at the next stamp.
pub(crate) fn note(activity: &mut Activity) {
    activity.note(stamp(), SCANNED.load(Ordering::Relaxed));
}

/// An event, and the threads waiting for I/O look again.
fn changed(activity: &mut Activity) {
    note(activity);
    threads().io_changed();
}

pub enum Kind {
    Console,
    File {
        node: Node,
    },
    Dir {
        path: String,
        listed: usize,
    },
    Pipe {
        pipe: Rc<RefCell<Pipe>>,
        write: bool,
    },
    Socket {
        port: u16,
    },
    /// Its pool of listening sockets is the network's (`Net::listen`).
    Listener {
        port: u16,
    },
    Stream(SocketHandle),
    Epoll(Rc<RefCell<Epoll>>),
    EventFd(Rc<RefCell<EventFd>>),
    Pair(PairEnd),
}

pub struct File {
    kind: Kind,
    flags: u64,
    pos: u64,
}

#[derive(Clone)]
struct Fd {
    file: Rc<RefCell<File>>,
    cloexec: bool,
}

pub struct FdTable {
    fds: Vec<Option<Fd>>,
    epolls: Vec<Rc<RefCell<Epoll>>>,
}

impl FdTable {
    pub fn new() -> FdTable {
        let console = Rc::new(RefCell::new(File { kind: Kind::Console, flags: 2, pos: 0 }));
        let fd = Fd { file: console, cloexec: false };
        FdTable { fds: vec![Some(fd.clone()), Some(fd.clone()), Some(fd)], epolls: Vec::new() }
    }

    fn get(&self, fd: u64) -> Result<Rc<RefCell<File>>, i64> {
        self.fds.get(fd as usize).and_then(|f| f.as_ref()).map(|f| f.file.clone()).ok_or(EBADF)
    }

    fn insert_at(&mut self, min: usize, file: Rc<RefCell<File>>, cloexec: bool) -> Result<i64, i64> {
        let slot = (min..MAX_FDS).find(|&i| self.fds.get(i).is_none_or(|f| f.is_none())).ok_or(EMFILE)?;
        if slot >= self.fds.len() {
            self.fds.resize(slot + 1, None);
        }
        self.fds[slot] = Some(Fd { file, cloexec });
        Ok(slot as i64)
    }

    fn insert(&mut self, kind: Kind, flags: u64) -> Result<i64, i64> {
        let file = Rc::new(RefCell::new(File { kind, flags: flags & !O_CLOEXEC, pos: 0 }));
        self.insert_at(0, file, flags & O_CLOEXEC != 0)
    }

    /// `fork`: the child's table, the same open files (a close in the child leaves the
    /// parent's open: the parent's table, set aside, still holds them). Closing an fd in
    /// the child leaves the parent's epoll interest lists alone.
    pub fn fork_copy(&self) -> FdTable {
        FdTable { fds: self.fds.clone(), epolls: Vec::new() }
    }
}

/// The end of a forked child: its descriptors close; what only it held is released.
pub fn close_all(k: &mut Kernel, table: FdTable) {
    for fd in table.fds.into_iter().flatten() {
        if Rc::strong_count(&fd.file) == 1 {
            release(k, &fd.file.borrow());
        }
    }
    threads().io_changed();
}

fn release(k: &mut Kernel, file: &File) {
    match &file.kind {
        Kind::Pipe { pipe, write } => {
            let mut p = pipe.borrow_mut();
            if *write {
                p.writers -= 1;
            } else {
                p.readers -= 1;
            }
            note(&mut p.activity);
            let last_writer = *write && p.writers == 0;
            drop(p);
            if last_writer {
                crate::fork::pipe_closed();
            }
        }
        // A close lets go of what `shutdown` left open (the file goes away: no flags to keep).
        Kind::Pair(end) => end.let_go(!end.read_shut, !end.write_shut),
        Kind::Listener { port } => {
            if let Some(net) = k.net.as_mut() {
                net.close_listener(*port);
            }
        }
        Kind::Stream(h) => {
            if let Some(net) = k.net.as_mut() {
                net.close(*h);
            }
        }
        _ => {}
    }
}

fn close_fd(k: &mut Kernel, fd: u64) -> Result<i64, i64> {
    let slot = k.fds.fds.get_mut(fd as usize).ok_or(EBADF)?;
    let entry = slot.take().ok_or(EBADF)?;
    for ep in &k.fds.epolls {
        let _ = ep.borrow_mut().remove(fd as i32);
    }
    if Rc::strong_count(&entry.file) == 1 {
        let file = entry.file.borrow();
        release(k, &file);
    }
    threads().io_changed();
    Ok(0)
}

// ---- user memory ----

fn check(ptr: u64, len: u64) -> Result<(), i64> {
    if ptr == 0 || ptr.checked_add(len).is_none_or(|e| e > ftvm_guest_kit::mem::MAPPED_LIMIT) {
        return Err(EFAULT);
    }
    Ok(())
}

pub(crate) fn user<'a>(ptr: u64, len: u64) -> Result<&'a mut [u8], i64> {
    if len == 0 {
        return Ok(&mut []);
    }
    check(ptr, len)?;
    // SAFETY: identity-mapped RAM below 3 GiB (checked); the program owns what it passes.
    Ok(unsafe { core::slice::from_raw_parts_mut(ptr as *mut u8, len as usize) })
}

fn get<T: Copy>(ptr: u64) -> Result<T, i64> {
    check(ptr, core::mem::size_of::<T>() as u64)?;
    // SAFETY: as for `user`.
    Ok(unsafe { core::ptr::read_unaligned(ptr as *const T) })
}

fn put<T: Copy>(ptr: u64, value: T) -> Result<(), i64> {
    check(ptr, core::mem::size_of::<T>() as u64)?;
    // SAFETY: as for `user`.
    unsafe { core::ptr::write_unaligned(ptr as *mut T, value) };
    Ok(())
}

fn cstr(ptr: u64) -> Result<String, i64> {
    check(ptr, 1)?;
    let mut out = Vec::new();
    for i in 0..4096 {
        let b: u8 = get(ptr + i)?;
        if b == 0 {
            return Ok(String::from_utf8_lossy(&out).to_string());
        }
        out.push(b);
    }
    Err(ERANGE)
}

fn path_at(k: &Kernel, dirfd: i64, ptr: u64) -> Result<String, i64> {
    // An int: glibc passes AT_FDCWD in EDI, the upper half zero (musl sign-extends it).
    let dirfd = i64::from(dirfd as i32);
    let name = cstr(ptr)?;
    if name.starts_with('/') || dirfd == AT_FDCWD {
        return Ok(linux_abi::path::resolve(&k.cwd, &name));
    }
    let file = k.fds.get(dirfd as u64)?;
    let file = file.borrow();
    match &file.kind {
        Kind::Dir { path, .. } => Ok(linux_abi::path::resolve(path, &name)),
        _ => Err(ENOTDIR),
    }
}

fn now_ns(_k: &Kernel, realtime: bool) -> u64 {
    crate::vdso::now_ns(if realtime { 0 } else { 1 })
}

fn random_fill(k: &mut Kernel, buf: &mut [u8]) {
    match k.rng.as_mut() {
        Some(rng) => rng.fill(buf),
        None => {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ time::ticks();
            for b in buf {
                x = ftvm_guest_kit::digest::mix64(x);
                *b = x as u8;
            }
        }
    }
}

/// Random words for the RDRAND and RDSEED emulations (`entry.rs`): from the same source as
/// getrandom (virtio-rng, whose bytes a recording logs), 32 words per device request, since
/// a program may take them one at a time (OpenSSL's seeding does).
pub struct RandomWords {
    words: [u64; 32],
    next: usize,
}

impl RandomWords {
    pub fn new() -> RandomWords {
        RandomWords { words: [0; 32], next: 32 }
    }
}

/// The next random word (the emulated RDRAND's and RDSEED's value).
pub fn random_word(k: &mut Kernel) -> u64 {
    if k.random_words.next == k.random_words.words.len() {
        let mut bytes = [0u8; 256];
        random_fill(k, &mut bytes);
        for (word, chunk) in k.random_words.words.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        k.random_words.next = 0;
    }
    let word = k.random_words.words[k.random_words.next];
    k.random_words.next += 1;
    word
}

// ---- readiness ----

fn readiness(k: &mut Kernel, file: &File) -> u32 {
    match &file.kind {
        Kind::Console => EPOLLOUT,
        Kind::File { .. } | Kind::Dir { .. } => EPOLLIN | EPOLLOUT,
        Kind::Pipe { pipe, write: true } => pipe.borrow().write_readiness(),
        Kind::Pipe { pipe, write: false } => pipe.borrow().read_readiness(),
        Kind::Pair(end) => end.readiness(),
        Kind::Socket { .. } => EPOLLOUT | EPOLLHUP,
        Kind::Listener { port } => match k.net.as_ref() {
            Some(net) if net.acceptable(*port) => EPOLLIN,
            _ => 0,
        },
        Kind::Stream(h) => {
            let Some(net) = k.net.as_mut() else { return EPOLLHUP };
            let s = net.tcp(*h);
            let mut ev = 0;
            if s.can_recv() || !s.may_recv() {
                ev |= EPOLLIN;
            }
            if !s.may_recv() {
                ev |= EPOLLRDHUP;
            }
            if s.can_send() {
                ev |= EPOLLOUT;
            }
            if !s.is_open() {
                ev |= EPOLLHUP;
            }
            ev
        }
        Kind::Epoll(_) => 0,
        Kind::EventFd(ev) => {
            let ev = ev.borrow();
            let readable = if ev.count > 0 { EPOLLIN } else { 0 };
            readable | if ev.count < EVENTFD_MAX { EPOLLOUT } else { 0 }
        }
    }
}

/// When the file's events happened, for epoll's order; files that are always ready have
/// none (they queue when a scan first finds them ready).
fn activity(k: &Kernel, file: &File) -> Activity {
    match (&file.kind, k.net.as_ref()) {
        (Kind::Pipe { pipe, .. }, _) => pipe.borrow().activity,
        (Kind::Pair(end), _) => end.rx.borrow().activity.latest(end.tx.borrow().activity),
        (Kind::EventFd(ev), _) => ev.borrow().activity,
        (Kind::Listener { port }, Some(net)) => net.listener_activity(*port),
        (Kind::Stream(h), Some(net)) => net.activity(*h),
        _ => Activity::default(),
    }
}

// ---- reading and writing ----

fn nonblocking(file: &File) -> bool {
    file.flags & O_NONBLOCK != 0
}

/// One read attempt: Ok(Some(n)), or Ok(None) when it would block.
fn try_read(k: &mut Kernel, file: &mut File, buf: &mut [u8]) -> Result<Option<usize>, i64> {
    match &mut file.kind {
        Kind::Console => Ok(Some(0)),
        Kind::File { node } => {
            let node = node.clone();
            let n = node.borrow();
            match &n.data {
                Data::Dev(Dev::Null) => Ok(Some(0)),
                Data::Dev(Dev::Zero) => {
                    buf.fill(0);
                    Ok(Some(buf.len()))
                }
                Data::Dev(Dev::Random) => {
                    drop(n);
                    random_fill(k, buf);
                    Ok(Some(buf.len()))
                }
                _ => {
                    let bytes = n.bytes();
                    let pos = (file.pos as usize).min(bytes.len());
                    let len = buf.len().min(bytes.len() - pos);
                    buf[..len].copy_from_slice(&bytes[pos..pos + len]);
                    file.pos += len as u64;
                    Ok(Some(len))
                }
            }
        }
        Kind::Dir { .. } => Err(EISDIR),
        Kind::Pipe { write: true, .. } => Err(EBADF),
        Kind::Pipe { pipe, write: false } => {
            let n = pipe.borrow_mut().read_into(buf);
            if n == Some(0) && !buf.is_empty() && pipe.borrow().has_writers() {
                crate::fork::child_read_eof(pipe);
            }
            Ok(n)
        }
        Kind::Pair(end) if end.read_shut => Ok(Some(0)),
        Kind::Pair(end) => Ok(end.rx.borrow_mut().read_into(buf)),
        Kind::Stream(h) => {
            let net = k.net.as_mut().ok_or(ENOTCONN)?;
            let s = net.tcp(*h);
            if s.can_recv() {
                let n = s.recv_slice(buf).unwrap_or(0);
                return Ok(Some(n));
            }
            if !s.may_recv() {
                return Ok(Some(0));
            }
            Ok(None)
        }
        Kind::Socket { .. } | Kind::Listener { .. } => Err(ENOTCONN),
        Kind::Epoll(_) => Err(EINVAL),
        Kind::EventFd(ev) => {
            let mut ev = ev.borrow_mut();
            if buf.len() < 8 {
                return Err(EINVAL);
            }
            if ev.count == 0 {
                return Ok(None);
            }
            let value = if ev.semaphore { 1 } else { ev.count };
            ev.count -= value;
            buf[..8].copy_from_slice(&value.to_le_bytes());
            changed(&mut ev.activity);
            Ok(Some(8))
        }
    }
}

fn try_write(k: &mut Kernel, file: &mut File, data: &[u8]) -> Result<Option<usize>, i64> {
    match &mut file.kind {
        Kind::Console => {
            serial::write_bytes(data);
            Ok(Some(data.len()))
        }
        Kind::File { node } => {
            let mut n = node.borrow_mut();
            if let Data::Dev(_) = n.data {
                return Ok(Some(data.len()));
            }
            if file.flags & O_ACCMODE == 0 {
                return Err(EBADF);
            }
            let pos = if file.flags & O_APPEND != 0 { n.size() as usize } else { file.pos as usize };
            if (pos as u64) < n.synced {
                n.dirty_below = true;
            }
            let bytes = n.ram();
            if bytes.len() < pos + data.len() {
                bytes.resize(pos + data.len(), 0);
            }
            bytes[pos..pos + data.len()].copy_from_slice(data);
            file.pos = (pos + data.len()) as u64;
            Ok(Some(data.len()))
        }
        Kind::Dir { .. } => Err(EISDIR),
        Kind::Pipe { write: false, .. } => Err(EBADF),
        Kind::Pipe { pipe, write: true } => pipe.borrow_mut().write_from(data),
        Kind::Pair(end) if end.write_shut => Err(EPIPE),
        Kind::Pair(end) => end.tx.borrow_mut().write_from(data),
        Kind::Stream(h) => {
            let net = k.net.as_mut().ok_or(ENOTCONN)?;
            let s = net.tcp(*h);
            if !s.may_send() {
                return Err(EPIPE);
            }
            if s.can_send() {
                return Ok(Some(s.send_slice(data).unwrap_or(0)));
            }
            Ok(None)
        }
        Kind::Socket { .. } | Kind::Listener { .. } => Err(ENOTCONN),
        Kind::Epoll(_) => Err(EINVAL),
        Kind::EventFd(ev) => {
            let mut ev = ev.borrow_mut();
            let Some(bytes) = data.get(..8) else { return Err(EINVAL) };
            let value = u64::from_le_bytes(bytes.try_into().expect("eight bytes"));
            if value == u64::MAX {
                return Err(EINVAL);
            }
            if value > EVENTFD_MAX - ev.count {
                return Ok(None);
            }
            ev.count += value;
            changed(&mut ev.activity);
            Ok(Some(8))
        }
    }
}

fn do_read(fd: u64, buf: &mut [u8]) -> Result<i64, i64> {
    loop {
        let k = kernel();
        let file = k.fds.get(fd)?;
        let mut f = file.borrow_mut();
        if let Some(n) = try_read(k, &mut f, buf)? {
            return Ok(n as i64);
        }
        if nonblocking(&f) {
            return Err(EAGAIN);
        }
        drop(f);
        if crate::signal::interrupted() {
            return Err(ERESTARTSYS);
        }
        crate::poll_io();
        let gen = threads().io_gen();
        sched::block(Wait::Io(gen), None);
    }
}

fn do_write(fd: u64, data: &[u8]) -> Result<i64, i64> {
    let mut done = 0;
    loop {
        let k = kernel();
        let file = k.fds.get(fd)?;
        let mut f = file.borrow_mut();
        match try_write(k, &mut f, &data[done..]) {
            Ok(Some(n)) => {
                done += n;
                if done == data.len() || nonblocking(&f) || n == 0 {
                    return Ok(done as i64);
                }
            }
            Ok(None) if nonblocking(&f) => return if done > 0 { Ok(done as i64) } else { Err(EAGAIN) },
            Ok(None) => {}
            Err(e) => return if done > 0 { Ok(done as i64) } else { Err(e) },
        }
        drop(f);
        if crate::signal::interrupted() {
            return if done > 0 { Ok(done as i64) } else { Err(ERESTARTSYS) };
        }
        crate::poll_io();
        let gen = threads().io_gen();
        sched::block(Wait::Io(gen), None);
    }
}

/// The most one `sendfile` copies: a write to a socket takes at most its send buffer
/// (64 KiB) anyway, and the program calls again for the rest, as it must on Linux.
const SENDFILE_CHUNK: usize = 256 << 10;

/// sendfile(out_fd, in_fd, offset, count): from a file to any descriptor (nginx's static
/// files to a socket), through a copy; from `*offset` (updated) or the file's position.
fn sendfile(out_fd: u64, in_fd: u64, offset: u64, count: u64) -> Result<i64, i64> {
    let k = kernel();
    let file = k.fds.get(in_fd)?;
    let (node, pos) = {
        let f = file.borrow();
        if f.flags & O_ACCMODE == O_WRONLY {
            return Err(EBADF);
        }
        match &f.kind {
            Kind::File { node } => (node.clone(), f.pos),
            _ => return Err(EINVAL),
        }
    };
    let start = if offset != 0 { u64::try_from(get::<i64>(offset)?).map_err(|_| EINVAL)? } else { pos };
    let chunk: Vec<u8> = {
        let n = node.borrow();
        let bytes = n.bytes();
        let from = (start as usize).min(bytes.len());
        let to = from + (count as usize).min(SENDFILE_CHUNK).min(bytes.len() - from);
        bytes[from..to].to_vec()
    };
    if chunk.is_empty() {
        return Ok(0);
    }
    let sent = do_write(out_fd, &chunk)?;
    let end = start + sent as u64;
    if offset != 0 {
        put(offset, end)?;
    } else {
        file.borrow_mut().pos = end;
    }
    Ok(sent)
}

fn iovecs(ptr: u64, count: u64) -> Result<Vec<(u64, u64)>, i64> {
    if count > 1024 {
        return Err(EINVAL);
    }
    (0..count).map(|i| Ok((get::<u64>(ptr + 16 * i)?, get::<u64>(ptr + 16 * i + 8)?))).collect()
}

fn readv(fd: u64, iov: u64, count: u64) -> Result<i64, i64> {
    let mut total = 0;
    for (base, len) in iovecs(iov, count)? {
        if len == 0 {
            continue;
        }
        let buf = user(base, len)?;
        // Only the first segment may block.
        let n = if total == 0 {
            do_read(fd, buf)?
        } else {
            let k = kernel();
            let file = k.fds.get(fd)?;
            let mut f = file.borrow_mut();
            match try_read(k, &mut f, buf) {
                Ok(Some(n)) => n as i64,
                _ => break,
            }
        };
        total += n;
        if (n as u64) < len {
            break;
        }
    }
    Ok(total)
}

fn writev(fd: u64, iov: u64, count: u64) -> Result<i64, i64> {
    let mut total = 0;
    for (base, len) in iovecs(iov, count)? {
        if len == 0 {
            continue;
        }
        let n = match do_write(fd, user(base, len)?) {
            Ok(n) => n,
            Err(e) if total == 0 => return Err(e),
            Err(_) => break,
        };
        total += n;
        if (n as u64) < len {
            break;
        }
    }
    Ok(total)
}

// ---- files ----

fn stat_of(node: &fs::Inode, out: u64) -> Result<i64, i64> {
    let mut st = [0u64; 18];
    st[0] = 1; // st_dev
    st[1] = node.ino;
    st[2] = 1; // st_nlink
    st[3] = u64::from(node.mode) | u64::from(node.uid) << 32; // st_mode (u32) | st_uid (u32)
    st[4] = u64::from(node.gid); // st_gid, pad
    st[5] = 0; // st_rdev
    st[6] = node.size();
    st[7] = 4096; // st_blksize
    st[8] = node.size().div_ceil(512);
    for i in [9, 11, 13] {
        st[i] = node.mtime;
    }
    put(out, st)?;
    Ok(0)
}

fn console_stat(out: u64) -> Result<i64, i64> {
    let node = fs::Inode::new(0, fs::S_IFCHR | 0o620, 0, Data::Dev(Dev::Null));
    stat_of(&node, out)
}

fn open(k: &mut Kernel, path: String, flags: u64, mode: u64) -> Result<i64, i64> {
    let now = k.boot_epoch + time::ticks_to_ms(time::ticks()) / 1000;
    let node = match k.fs.get(&path) {
        Some(node) => {
            if flags & O_CREAT != 0 && flags & O_EXCL != 0 {
                return Err(EEXIST);
            }
            node
        }
        None if flags & O_CREAT != 0 => k.fs.create(&path, (mode as u32) & !k.umask, now)?,
        None => return Err(ENOENT),
    };
    let is_dir = node.borrow().is_dir();
    if is_dir {
        if flags & O_ACCMODE != 0 {
            return Err(EISDIR);
        }
        return k.fds.insert(Kind::Dir { path, listed: 0 }, flags);
    }
    if flags & O_DIRECTORY != 0 {
        return Err(ENOTDIR);
    }
    if flags & O_TRUNC != 0 && flags & O_ACCMODE != 0 {
        let mut n = node.borrow_mut();
        if matches!(n.data, Data::Rom(_) | Data::Ram(_)) {
            n.data = Data::Ram(Vec::new());
            n.dirty_below |= n.synced > 0;
        }
    }
    k.fds.insert(Kind::File { node }, flags)
}

fn getdents64(k: &mut Kernel, fd: u64, buf: u64, len: u64) -> Result<i64, i64> {
    let file = k.fds.get(fd)?;
    let mut f = file.borrow_mut();
    let Kind::Dir { path, listed } = &mut f.kind else { return Err(ENOTDIR) };
    let mut names: Vec<(String, u64, u8)> = vec![(".".into(), 1, 4), ("..".into(), 1, 4)];
    for (name, node) in k.fs.list(path) {
        let n = node.borrow();
        let kind = match n.data {
            Data::Dir => 4,
            Data::Symlink(_) => 10,
            Data::Dev(_) => 2,
            _ => 8,
        };
        names.push((name, n.ino, kind));
    }
    let out = user(buf, len)?;
    let mut at = 0;
    while *listed < names.len() {
        let (name, ino, kind) = &names[*listed];
        let reclen = (19 + name.len() + 1).div_ceil(8) * 8;
        if at + reclen > out.len() {
            break;
        }
        out[at..at + 8].copy_from_slice(&ino.to_le_bytes());
        out[at + 8..at + 16].copy_from_slice(&((*listed + 1) as u64).to_le_bytes());
        out[at + 16..at + 18].copy_from_slice(&(reclen as u16).to_le_bytes());
        out[at + 18] = *kind;
        out[at + 19..at + 19 + name.len()].copy_from_slice(name.as_bytes());
        out[at + 19 + name.len()..at + reclen].fill(0);
        at += reclen;
        *listed += 1;
    }
    if at == 0 && *listed < names.len() {
        return Err(EINVAL);
    }
    Ok(at as i64)
}

// ---- sockets ----

fn sockaddr_in(ptr: u64, len_ptr: u64, addr: Option<(IpAddress, u16)>) -> Result<(), i64> {
    if ptr == 0 {
        return Ok(());
    }
    let (ip, port) = match addr {
        Some((IpAddress::Ipv4(ip), port)) => (ip.octets(), port),
        _ => ([0; 4], 0),
    };
    let mut raw = [0u8; 16];
    raw[0..2].copy_from_slice(&2u16.to_le_bytes());
    raw[2..4].copy_from_slice(&port.to_be_bytes());
    raw[4..8].copy_from_slice(&ip);
    let room: u32 = get(len_ptr)?;
    let n = (room as usize).min(16);
    user(ptr, n as u64)?.copy_from_slice(&raw[..n]);
    put(len_ptr, 16u32)?;
    Ok(())
}

fn socket_kind_port(file: &File) -> Result<u16, i64> {
    match file.kind {
        Kind::Socket { port } | Kind::Listener { port, .. } => Ok(port),
        Kind::Stream(_) => Err(EINVAL),
        _ => Err(ENOTSOCK),
    }
}

fn accept(fd: u64, addr: u64, addr_len: u64, flags: u64) -> Result<i64, i64> {
    loop {
        let k = kernel();
        let file = k.fds.get(fd)?;
        let f = file.borrow_mut();
        let nonblock = nonblocking(&f);
        let Kind::Listener { port } = f.kind else { return Err(EINVAL) };
        let net = k.net.as_mut().ok_or(ENETDOWN)?;
        if let Some(h) = net.accept(port) {
            let remote = net.tcp(h).remote_endpoint().map(|e| (e.addr, e.port));
            drop(f);
            sockaddr_in(addr, addr_len, remote)?;
            let newfd = k.fds.insert(Kind::Stream(h), flags & (O_NONBLOCK | O_CLOEXEC))?;
            return Ok(newfd);
        }
        if nonblock {
            return Err(EAGAIN);
        }
        drop(f);
        if crate::signal::interrupted() {
            return Err(ERESTARTSYS);
        }
        crate::poll_io();
        let gen = threads().io_gen();
        sched::block(Wait::Io(gen), None);
    }
}

// ---- waiting for readiness ----

fn epoll_wait(epfd: u64, events: u64, max: u64, timeout: i64) -> Result<i64, i64> {
    if max == 0 || max > 65536 {
        return Err(EINVAL);
    }
    let ep = match &kernel().fds.get(epfd)?.borrow().kind {
        Kind::Epoll(ep) => ep.clone(),
        _ => return Err(EINVAL),
    };
    let deadline = (timeout > 0).then(|| sched::deadline_ms(timeout as u64));
    loop {
        crate::poll_io();
        let k = kernel();
        let watched = ep.borrow().watched();
        let mut probes = Vec::with_capacity(watched.len());
        for fd in watched {
            let Ok(file) = k.fds.get(fd as u64) else { continue };
            let file = file.borrow();
            probes.push(Probe { fd, ready: readiness(k, &file), activity: activity(k, &file) });
        }
        let now = stamp();
        SCANNED.store(now, Ordering::Relaxed);
        let ready = ep.borrow_mut().scan(now, &probes, max as usize, stamp);
        for (i, &(ready, data)) in ready.iter().enumerate() {
            let at = events + 12 * i as u64;
            put(at, ready)?;
            put(at + 4, data)?;
        }
        if !ready.is_empty() || timeout == 0 || deadline.is_some_and(|d| time::ticks() >= d) {
            return Ok(ready.len() as i64);
        }
        // Never restarted, as on Linux.
        if crate::signal::interrupted() {
            return Err(EINTR);
        }
        let gen = threads().io_gen();
        sched::block(Wait::Io(gen), deadline);
    }
}

/// `epoll_ctl(epfd, op, fd, event)`.
fn epoll_ctl(k: &mut Kernel, epfd: u64, op: u64, fd: u64, event: u64) -> Result<i64, i64> {
    let file = k.fds.get(epfd)?;
    let f = file.borrow();
    let Kind::Epoll(ep) = &f.kind else { return Err(EINVAL) };
    let target = k.fds.get(fd)?;
    if Rc::ptr_eq(&target, &file) {
        return Err(EINVAL);
    }
    if let Kind::File { .. } | Kind::Dir { .. } = target.borrow().kind {
        // Linux: regular files and directories are always ready and cannot be polled.
        return Err(EPERM);
    }
    let mut ep = ep.borrow_mut();
    let fd = fd as i32;
    let done = match op {
        1 | 3 => {
            let events: u32 = get(event)?;
            let data: u64 = get(event + 4)?;
            if op == 1 {
                ep.add(fd, events, data, stamp())
            } else {
                ep.modify(fd, events, data, stamp())
            }
        }
        2 => ep.remove(fd),
        _ => return Err(EINVAL),
    };
    done.map(|()| 0).map_err(|e| match e {
        CtlError::Exists => EEXIST,
        CtlError::Missing => ENOENT,
    })
}

fn poll(fds: u64, count: u64, timeout: i64) -> Result<i64, i64> {
    let deadline = (timeout > 0).then(|| sched::deadline_ms(timeout as u64));
    loop {
        crate::poll_io();
        let k = kernel();
        let mut n = 0;
        for i in 0..count {
            let at = fds + 8 * i;
            let fd: i32 = get(at)?;
            let want: i16 = get(at + 4)?;
            let revents = if fd < 0 {
                0
            } else {
                match k.fds.get(fd as u64) {
                    Ok(file) => (readiness(k, &file.borrow()) & (want as u16 as u32 | EPOLLERR | EPOLLHUP)) as i16,
                    Err(_) => 0x20, // POLLNVAL
                }
            };
            put(at + 6, revents)?;
            if revents != 0 {
                n += 1;
            }
        }
        if n > 0 || timeout == 0 || deadline.is_some_and(|d| time::ticks() >= d) {
            return Ok(n);
        }
        // EINTR after a handler, whatever SA_RESTART says (Linux's ERESTARTNOHAND).
        if crate::signal::interrupted() {
            return Err(ERESTARTNOHAND);
        }
        let gen = threads().io_gen();
        sched::block(Wait::Io(gen), deadline);
    }
}

fn timespec_ns(ptr: u64) -> Result<u64, i64> {
    let sec: i64 = get(ptr)?;
    let nsec: i64 = get(ptr + 8)?;
    if sec < 0 || !(0..1_000_000_000).contains(&nsec) {
        return Err(EINVAL);
    }
    Ok(sec as u64 * 1_000_000_000 + nsec as u64)
}

/// Sleeps `ns` (nanosleep, clock_nanosleep); a signal ends the sleep early with the time left
/// written to `rem` (if not 0), and EINTR after its handler (ERESTART_RESTARTBLOCK).
fn sleep(ns: u64, rem: u64) -> Result<i64, i64> {
    let until = now_ns(kernel(), false).saturating_add(ns);
    let deadline = sched::deadline_ns(ns);
    while time::ticks() < deadline {
        if crate::signal::interrupted() {
            if rem != 0 {
                let left = until.saturating_sub(now_ns(kernel(), false));
                put(rem, [left / 1_000_000_000, left % 1_000_000_000])?;
            }
            return Err(ERESTART_RESTARTBLOCK);
        }
        sched::block(Wait::Sleep, Some(deadline));
    }
    Ok(0)
}

/// Waits for a signal (pause, rt_sigsuspend): EINTR after its handler.
fn wait_for_signal() -> Result<i64, i64> {
    loop {
        if crate::signal::interrupted() {
            return Err(ERESTARTNOHAND);
        }
        sched::block(Wait::Sleep, None);
    }
}

/// Replaces the current thread's mask for the call in progress with the one at `ptr` (if not
/// 0): rt_sigsuspend, epoll_pwait, ppoll. The old one comes back when the call ends, or when
/// the handler that ended it returns (`crate::signal::on_return`).
fn temporary_mask(ptr: u64) -> Result<(), i64> {
    if ptr != 0 {
        let set: u64 = get(ptr)?;
        let t = threads().current();
        t.saved_mask = Some(t.sigmask);
        t.sigmask = set & !sigabi::UNBLOCKABLE;
    }
    Ok(())
}

fn timespec_parts(sec: i64, nsec: i64) -> Result<u64, i64> {
    if sec < 0 || !(0..1_000_000_000).contains(&nsec) {
        return Err(EINVAL);
    }
    (sec as u64).checked_mul(1_000_000_000).and_then(|ns| ns.checked_add(nsec as u64)).ok_or(EINVAL)
}

/// `struct itimerspec` (interval, value) from (remaining, interval) in ns.
fn put_itimerspec(ptr: u64, (remaining, interval): (u64, u64)) -> Result<(), i64> {
    let ts = |ns: u64| [ns / 1_000_000_000, ns % 1_000_000_000];
    let ([a, b], [c, d]) = (ts(interval), ts(remaining));
    put(ptr, [a, b, c, d])
}

/// `setitimer`/`getitimer`'s `struct itimerval` at `ptr`: (interval, value) in ns.
fn itimerval(ptr: u64) -> Result<(u64, u64), i64> {
    let v: [i64; 4] = get(ptr)?;
    let interval = sigabi::timeval_ns(v[0], v[1]).ok_or(EINVAL)?;
    let value = sigabi::timeval_ns(v[2], v[3]).ok_or(EINVAL)?;
    Ok((interval, value))
}

fn put_itimerval(ptr: u64, (remaining, interval): (u64, u64)) -> Result<(), i64> {
    let [isec, iusec] = sigabi::ns_timeval(interval);
    let [vsec, vusec] = sigabi::ns_timeval(remaining);
    put(ptr, [isec, iusec, vsec, vusec])
}

/// kill, tkill, tgkill (`nr` 62, 200, 234).
fn kill(nr: u64, a0: u64, a1: u64, a2: u64) -> Result<i64, i64> {
    let (target, sig) = match nr {
        234 => (a1, a2),
        _ => (a0, a1),
    };
    if sig > 64 {
        return Err(EINVAL);
    }
    if nr == 62 {
        if let Some(done) = crate::fork::kill(target, sig) {
            return done;
        }
        // The process: by pid, by any thread's tid (Linux signals the thread group), 0 (its
        // group), -1 (every process it may signal) or -pid.
        let pid = u64::from(crate::fork::pid());
        let us = target == pid
            || target as i32 == 0
            || target as i32 == -1
            || (target as i32) < 0 && u64::from((target as i32).unsigned_abs()) == pid
            || u32::try_from(target).ok().and_then(|t| threads().slot_of(t)).is_some();
        if !us {
            return Err(ESRCH);
        }
        if sig != 0 {
            crate::signal::raise(sig, sigabi::Info::user(crate::fork::pid()));
        }
        return Ok(0);
    }
    if (target as i32) <= 0 || (nr == 234 && (a0 as i32) <= 0) {
        return Err(EINVAL);
    }
    if nr == 234 && a0 != u64::from(crate::fork::pid()) {
        return Err(ESRCH);
    }
    let slot = u32::try_from(target).ok().and_then(|t| threads().slot_of(t)).ok_or(ESRCH)?;
    if sig != 0 {
        crate::signal::raise_thread(slot, sig, sigabi::Info::tkill(crate::fork::pid()));
    }
    Ok(0)
}

fn futex(uaddr: u64, op: u64, val: u64, timeout: u64, uaddr2: u64, val3: u64) -> Result<i64, i64> {
    let cmd = op & 0x7f;
    match cmd {
        // FUTEX_WAIT, FUTEX_WAIT_BITSET
        0 | 9 => {
            let current: u32 = get(uaddr)?;
            if current != val as u32 {
                return Err(EAGAIN);
            }
            let deadline = if timeout == 0 {
                None
            } else if cmd == 9 {
                // Absolute, CLOCK_MONOTONIC (or CLOCK_REALTIME with FUTEX_CLOCK_REALTIME).
                let k = kernel();
                let at = timespec_ns(timeout)?;
                let now = now_ns(k, op & 256 != 0);
                Some(sched::deadline_ns(at.saturating_sub(now)))
            } else {
                Some(sched::deadline_ns(timespec_ns(timeout)?))
            };
            loop {
                // A signal: restarted with SA_RESTART unless a timeout was given (Linux).
                if crate::signal::interrupted() {
                    return Err(if deadline.is_some() { ERESTART_RESTARTBLOCK } else { ERESTARTSYS });
                }
                sched::block(Wait::Futex(uaddr), deadline);
                if threads().current().woken {
                    return Ok(0);
                }
                if deadline.is_some_and(|d| time::ticks() >= d) {
                    return Err(ETIMEDOUT);
                }
                // Woken for a signal it did not take (ignored, or taken by another thread):
                // Linux restarts the call, which reads the word again (it may have changed,
                // or this waiter have been requeued meanwhile).
                if get::<u32>(uaddr)? != val as u32 {
                    return Err(EAGAIN);
                }
            }
        }
        // FUTEX_WAKE, FUTEX_WAKE_BITSET
        1 | 10 => Ok(threads().futex_wake(uaddr, val) as i64),
        // FUTEX_REQUEUE, FUTEX_CMP_REQUEUE
        3 | 4 => {
            if cmd == 4 && get::<u32>(uaddr)? != val3 as u32 {
                return Err(EAGAIN);
            }
            let woken = threads().futex_wake(uaddr, val);
            let moved = threads().futex_requeue(uaddr, uaddr2, timeout);
            Ok((woken + moved) as i64)
        }
        _ => Err(ENOSYS),
    }
}

const CLONE_VM: u64 = 0x100;
const CLONE_VFORK: u64 = 0x4000;
const CLONE_SETTLS: u64 = 0x80000;
const CLONE_PARENT_SETTID: u64 = 0x100000;
const CLONE_CHILD_CLEARTID: u64 = 0x200000;
const CLONE_CHILD_SETTID: u64 = 0x0100_0000;

fn clone(frame: &mut Frame) -> Result<i64, i64> {
    let (flags, stack, ptid, ctid, tls) = (frame.rdi, frame.rsi, frame.rdx, frame.r10, frame.r8);
    if flags & CLONE_VM == 0 || flags & CLONE_VFORK != 0 {
        // A new process: fork, on `stack` if given (musl's posix_spawn: CLONE_VM|CLONE_VFORK,
        // whose child runs first and alone anyway). The exit signal and tid flags are not looked at.
        return crate::fork::fork(frame, stack);
    }
    let mut child = frame.clone();
    child.rax = 0;
    if stack != 0 {
        child.rsp = stack;
    }
    let s = threads();
    let fs_base = if flags & CLONE_SETTLS != 0 { tls } else { s.current().fs_base };
    let clear = if flags & CLONE_CHILD_CLEARTID != 0 { ctid } else { 0 };
    let sigmask = s.current().sigmask;
    let tid = s.spawn(&child, fs_base, clear, sigmask);
    if flags & CLONE_PARENT_SETTID != 0 {
        put(ptid, tid)?;
    }
    if flags & CLONE_CHILD_SETTID != 0 {
        put(ctid, tid)?;
    }
    Ok(i64::from(tid))
}

fn exit_thread() -> ! {
    let s = threads();
    let clear = s.current().clear_child_tid;
    if clear != 0 && put(clear, 0u32).is_ok() {
        s.futex_wake(clear, 1);
    }
    if s.live() == 1 {
        crate::exit_all(0);
    }
    sched::exit_thread()
}

fn name(nr: u64) -> &'static str {
    match nr {
        7 => "poll",
        23 => "select",
        26 => "msync",
        27 => "mincore",
        42 => "connect",
        57 => "fork",
        58 => "vfork",
        59 => "execve",
        61 => "wait4",
        73 => "flock",
        76 => "truncate",
        86 => "link",
        88 => "symlink",
        98 => "getrusage",
        100 => "times",
        213 => "epoll_create",
        332 => "statx",
        334 => "rseq",
        435 => "clone3",
        _ => "?",
    }
}

fn unsupported(k: &mut Kernel, nr: u64) -> Result<i64, i64> {
    if k.warned.insert(nr) {
        println!("linux: unsupported system call {nr} ({}): -ENOSYS", name(nr));
    }
    Err(ENOSYS)
}

fn rlimit(resource: u64) -> (u64, u64) {
    match resource {
        3 => (crate::mem::STACK_SIZE, crate::mem::STACK_SIZE), // RLIMIT_STACK
        7 => (10240, 10240),                                   // RLIMIT_NOFILE
        _ => (u64::MAX, u64::MAX),
    }
}

/// Entered from `linux_syscall_ring3` with the thread's saved registers.
/// On the way back to the program a pending signal may run its handler (crate::signal); a
/// call a signal interrupted may run again (no handler ran, or `rt_sigreturn` of an
/// SA_RESTART handler's frame).
#[no_mangle]
extern "C" fn linux_syscall(frame: &mut Frame) {
    let mut trapped = crate::signal::entered_by_syscall();
    loop {
        let mut nr = frame.rax;
        count(nr);
        let result = dispatch(frame);
        frame.rax = match result {
            Ok(value) => value as u64,
            Err(errno) => (-errno) as u64,
        };
        if let Some(restart) = crate::signal::take_restart() {
            // A restart mark: the call was a rewritten site's (a real `syscall` is rewound).
            nr = restart;
            trapped = false;
            frame.rax = (-sigabi::ERESTARTNOINTR) as u64;
        } else if nr == 15 {
            // rt_sigreturn: RAX is the interrupted context's, not a result to look at.
            nr = u64::MAX;
        }
        if !crate::signal::on_return(frame, nr, trapped) {
            return;
        }
    }
}

/// `linux.counts=N` on the command line: every N system calls, one console line with the
/// ten most frequent numbers since the last (a profiling aid; off by default).
fn count(nr: u64) {
    static EVERY: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(u64::MAX);
    static mut COUNTS: [u64; 512] = [0; 512];
    static mut TOTAL: u64 = 0;
    let mut every = EVERY.load(core::sync::atomic::Ordering::Relaxed);
    if every == u64::MAX {
        every = ftvm_guest_kit::cmdline::param_u64_or("linux.counts", 0);
        EVERY.store(every, core::sync::atomic::Ordering::Relaxed);
    }
    if every == 0 {
        return;
    }
    // SAFETY: one CPU, only system-call entry touches these.
    unsafe {
        let counts = &mut *core::ptr::addr_of_mut!(COUNTS);
        counts[(nr as usize).min(511)] += 1;
        TOTAL += 1;
        if TOTAL.is_multiple_of(every) {
            let mut top: Vec<(u64, usize)> =
                counts.iter().enumerate().filter(|(_, &c)| c > 0).map(|(n, &c)| (c, n)).collect();
            top.sort_unstable_by(|a, b| b.cmp(a));
            let list: Vec<String> = top.iter().take(10).map(|(c, n)| alloc::format!("{n}:{c}")).collect();
            static mut TRAPPED_BEFORE: u64 = 0;
            let trapped = crate::entry::TRAPPED.load(core::sync::atomic::Ordering::Relaxed);
            println!(
                "linux: {every} system calls at tick {} ({} through a real syscall): {}",
                time::ticks(),
                trapped - TRAPPED_BEFORE,
                list.join(" ")
            );
            TRAPPED_BEFORE = trapped;
            counts.fill(0);
        }
    }
}

fn dispatch(frame: &mut Frame) -> Result<i64, i64> {
    crate::vdso::tick_hook();
    let (nr, a0, a1, a2, a3, a4, a5) = (frame.rax, frame.rdi, frame.rsi, frame.rdx, frame.r10, frame.r8, frame.r9);
    let k = kernel();
    match nr {
        0 => do_read(a0, user(a1, a2)?),
        1 => do_write(a0, user(a1, a2)?),
        2 => {
            let path = path_at(k, AT_FDCWD, a0)?;
            open(k, path, a1, a2)
        }
        257 => {
            let path = path_at(k, a0 as i64, a1)?;
            open(k, path, a2, a3)
        }
        85 => {
            let path = path_at(k, AT_FDCWD, a0)?;
            open(k, path, O_CREAT | O_WRONLY | O_TRUNC, a1)
        }
        3 => close_fd(k, a0),
        4 | 6 => {
            let path = path_at(k, AT_FDCWD, a0)?;
            let node = k.fs.get(&path).ok_or(ENOENT)?;
            let n = node.borrow();
            stat_of(&n, a1)
        }
        5 => fstat(k, a0, a1),
        90 => chmod(&path_node(k, AT_FDCWD, a0)?, a1),
        91 => chmod(&fd_node(k, a0)?, a1),
        268 => chmod(&path_node(k, a0 as i64, a1)?, a2),
        92 | 94 => chown(&path_node(k, AT_FDCWD, a0)?, a1, a2),
        93 => chown(&fd_node(k, a0)?, a1, a2),
        260 => {
            // fchownat(dirfd, path, owner, group, flags): AT_EMPTY_PATH (0x1000) means the fd.
            let node = if a4 & 0x1000 != 0 && get::<u8>(a1).unwrap_or(0) == 0 {
                fd_node(k, a0)?
            } else {
                path_node(k, a0 as i64, a1)?
            };
            chown(&node, a2, a3)
        }
        262 => {
            // newfstatat(dirfd, path, buf, flags): AT_EMPTY_PATH (0x1000) means the fd.
            if a3 & 0x1000 != 0 && get::<u8>(a1).unwrap_or(0) == 0 {
                return fstat(k, a0, a2);
            }
            let path = path_at(k, a0 as i64, a1)?;
            let node = k.fs.get(&path).ok_or(ENOENT)?;
            let n = node.borrow();
            stat_of(&n, a2)
        }
        8 => {
            let file = k.fds.get(a0)?;
            let mut f = file.borrow_mut();
            let size = match &f.kind {
                Kind::File { node } => node.borrow().size(),
                Kind::Dir { .. } => 0,
                _ => return Err(ESPIPE),
            };
            let base = match a2 {
                0 => 0,
                1 => f.pos as i64,
                2 => size as i64,
                _ => return Err(EINVAL),
            };
            let pos = base.checked_add(a1 as i64).filter(|p| *p >= 0).ok_or(EINVAL)?;
            f.pos = pos as u64;
            Ok(pos)
        }
        17 | 18 => {
            let file = k.fds.get(a0)?;
            let mut f = file.borrow_mut();
            if !matches!(f.kind, Kind::File { .. }) {
                return Err(ESPIPE);
            }
            let saved = (f.pos, f.flags);
            f.pos = a3;
            f.flags &= !O_APPEND;
            let buf = user(a1, a2)?;
            let r = if nr == 17 { try_read(k, &mut f, buf) } else { try_write(k, &mut f, buf) };
            (f.pos, f.flags) = saved;
            r.map(|n| n.unwrap_or(0) as i64)
        }
        40 => sendfile(a0, a1, a2, a3),
        19 => readv(a0, a1, a2),
        20 => writev(a0, a1, a2),
        9 => {
            // mmap(addr, len, prot, flags, fd, offset)
            const MAP_FIXED: u64 = 0x10;
            const MAP_ANONYMOUS: u64 = 0x20;
            const MAP_FIXED_NOREPLACE: u64 = 0x100000;
            if a1 == 0 {
                return Err(EINVAL);
            }
            const PROT_NONE: u64 = 0;
            const EEXIST: i64 = 17;
            let place = if a3 & MAP_FIXED_NOREPLACE != 0 {
                // Only where nothing is mapped; elsewhere as MAP_FIXED (ENOMEM outside the areas).
                if a0 % crate::mem::PAGE == 0 && k.mem.is_taken(a0, crate::mem::page_up(a1)) {
                    return Err(EEXIST);
                }
                crate::mem::Place::Fixed(a0)
            } else if a3 & MAP_FIXED != 0 {
                crate::mem::Place::Fixed(a0)
            } else if a0 != 0 {
                crate::mem::Place::Near(a0)
            } else {
                crate::mem::Place::Anywhere
            };
            let accessible = a2 != PROT_NONE || a3 & MAP_ANONYMOUS == 0;
            let addr = k.mem.map(place, a1, accessible).ok_or_else(|| out_of_memory(k, a1))?;
            if a3 & MAP_ANONYMOUS == 0 {
                let file = k.fds.get(a4)?;
                let f = file.borrow();
                let Kind::File { node } = &f.kind else { return Err(EINVAL) };
                let n = node.borrow();
                let bytes = n.bytes();
                let from = (a5 as usize).min(bytes.len());
                let len = (a1 as usize).min(bytes.len() - from);
                user(addr, len as u64)?.copy_from_slice(&bytes[from..from + len]);
                // Code (a shared library the interpreter maps): rewritten before it runs, as
                // the program was at load time, and held to the guest contract.
                const PROT_EXEC: u64 = 4;
                if a2 & PROT_EXEC != 0 {
                    let name = k.fs.path_of(node).unwrap_or_else(|| alloc::format!("inode {}", n.ino));
                    if let Err(e) =
                        crate::rewrite::exec_mapping(&mut k.mem, bytes, addr, len as u64, from as u64, &name)
                    {
                        crate::fatal(&alloc::format!("{name} (mapped executable at {addr:#x}): {e}"));
                    }
                }
            }
            Ok(addr as i64)
        }
        10 => {
            // mprotect(addr, len, prot): enforced by nothing (no paging of our own), but a
            // reservation made accessible must read as zero (mem.rs).
            if a0 % crate::mem::PAGE != 0 {
                return Err(EINVAL);
            }
            let end = a0.checked_add(crate::mem::page_up(a1)).ok_or(ENOMEM)?;
            const PROT_NONE: u64 = 0;
            if a2 != PROT_NONE {
                k.mem.make_accessible(a0, end);
            }
            Ok(0)
        }
        11 => {
            if a0 % crate::mem::PAGE != 0 {
                return Err(EINVAL);
            }
            k.mem.unmap(a0, a0 + crate::mem::page_up(a1));
            Ok(0)
        }
        12 => Ok(k.mem.brk(a0) as i64),
        25 => {
            // mremap(old, old_len, new_len, flags): MREMAP_MAYMOVE = 1.
            k.mem.remap(a0, a1, a2, a3 & 1 != 0).map(|a| a as i64).ok_or_else(|| out_of_memory(k, a2))
        }
        26 => Ok(0),
        28 => {
            // madvise: MADV_DONTNEED (4) reads back zeros; the rest are hints.
            if a2 == 4 {
                k.mem.discard(a0, a0 + crate::mem::page_up(a1));
            }
            Ok(0)
        }
        13 => {
            // rt_sigaction(sig, act, oldact, size): [handler, flags, restorer, mask], run by
            // crate::signal.
            if a0 == 0 || a0 > 64 || a3 != 8 {
                return Err(EINVAL);
            }
            if a1 != 0 && (a0 == 9 || a0 == 19) {
                return Err(EINVAL);
            }
            let old = k.sigactions.get(&a0).copied().unwrap_or([0; 4]);
            let new: Option<[u64; 4]> = if a1 != 0 { Some(get(a1)?) } else { None };
            if a2 != 0 {
                put(a2, old)?;
            }
            if let Some(mut new) = new {
                new[3] &= !sigabi::UNBLOCKABLE;
                k.sigactions.insert(a0, new);
                crate::signal::discard(a0);
            }
            Ok(0)
        }
        14 => {
            // rt_sigprocmask(how, set, oldset, size): the current thread's mask.
            if a3 != 8 {
                return Err(EINVAL);
            }
            let old = threads().current().sigmask;
            let new = if a1 != 0 { Some(sigabi::sigprocmask(a0, old, get(a1)?).ok_or(EINVAL)?) } else { None };
            if a2 != 0 {
                put(a2, old)?;
            }
            if let Some(new) = new {
                threads().current().sigmask = new;
            }
            Ok(0)
        }
        127 => {
            // rt_sigpending(set, size)
            if a1 != 8 {
                return Err(EINVAL);
            }
            put(a0, crate::signal::pending_blocked())?;
            Ok(0)
        }
        130 => {
            // rt_sigsuspend(mask, size)
            if a1 != 8 {
                return Err(EINVAL);
            }
            temporary_mask(a0)?;
            wait_for_signal()
        }
        34 => wait_for_signal(),
        128 => {
            // rt_sigtimedwait(set, info, timeout, size)
            if a3 != 8 {
                return Err(EINVAL);
            }
            let set: u64 = get(a0)?;
            let timeout = if a2 != 0 { Some(timespec_ns(a2)?) } else { None };
            crate::signal::sigtimedwait(set, a1, timeout)
        }
        129 | 297 => {
            // rt_sigqueueinfo(tgid, sig, info) / rt_tgsigqueueinfo(tgid, tid, sig, info): a
            // siginfo of the caller's making (sigqueue: SI_QUEUE and a sigval), to itself.
            let (sig, ptr) = if nr == 129 { (a1, a2) } else { (a2, a3) };
            if sig > 64 {
                return Err(EINVAL);
            }
            if a0 != u64::from(crate::fork::pid()) {
                return Err(ESRCH);
            }
            let slot = if nr == 297 {
                Some(u32::try_from(a1).ok().and_then(|t| threads().slot_of(t)).ok_or(ESRCH)?)
            } else {
                None
            };
            let raw: [u8; 32] = get(ptr)?;
            let word = |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
            let info = sigabi::Info {
                code: word(8) as i32,
                a: word(16),
                b: word(20),
                c: u64::from(word(24)) | u64::from(word(28)) << 32,
            };
            let queued = match (sig, slot) {
                (0, _) => true,
                (_, Some(slot)) => crate::signal::raise_thread(slot, sig, info),
                (_, None) => crate::signal::raise(sig, info),
            };
            if queued {
                Ok(0)
            } else {
                Err(EAGAIN)
            }
        }
        222 => {
            // timer_create(clock, sigevent, id): every clock counts guest time.
            if !matches!(a0, 0..=7 | 9 | 11) {
                return Err(EINVAL);
            }
            // No sigevent: SIGALRM to the process, the sigval the timer's id (below).
            let (value, sig, notify) = if a1 == 0 {
                (None, sigabi::SIGALRM, crate::signal::Notify::Process)
            } else {
                let (value, sig, how, tid): (u64, i32, i32, i32) =
                    (get(a1)?, get(a1 + 8)?, get(a1 + 12)?, get(a1 + 16)?);
                let notify = match how {
                    0 => crate::signal::Notify::Process,
                    1 => crate::signal::Notify::None,
                    // SIGEV_THREAD_ID (musl's SIGEV_THREAD runs on it).
                    4 if u32::try_from(tid).ok().and_then(|t| threads().slot_of(t)).is_some() => {
                        crate::signal::Notify::Thread(tid as u32)
                    }
                    _ => return Err(EINVAL),
                };
                if notify != crate::signal::Notify::None && !(1..=64).contains(&sig) {
                    return Err(EINVAL);
                }
                (Some(value), sig as u64, notify)
            };
            let id = crate::signal::timer_create(a0, notify, sig, value).ok_or(EAGAIN)?;
            if let Err(e) = put(a2, id as i32) {
                crate::signal::timer_delete(id);
                return Err(e);
            }
            Ok(0)
        }
        223 => {
            // timer_settime(id, flags, new, old): TIMER_ABSTIME = 1.
            let [isec, insec, vsec, vnsec]: [i64; 4] = get(a2)?;
            let interval = timespec_parts(isec, insec)?;
            let value = timespec_parts(vsec, vnsec)?;
            let old = crate::signal::timer_settime(a0, a1 & 1 != 0, value, interval).ok_or(EINVAL)?;
            if a3 != 0 {
                put_itimerspec(a3, old)?;
            }
            Ok(0)
        }
        224 => {
            let now = crate::signal::timer_gettime(a0).ok_or(EINVAL)?;
            put_itimerspec(a1, now)?;
            Ok(0)
        }
        225 => crate::signal::timer_getoverrun(a0).map(|n| n as i64).ok_or(EINVAL),
        226 => crate::signal::timer_delete(a0 as usize).then_some(0).ok_or(EINVAL),
        131 => {
            // sigaltstack(ss, old_ss): the current thread's, at the program's RSP.
            let (current, rsp) = (threads().current().altstack, frame.rsp);
            let new = if a0 != 0 {
                let [sp, flags, size]: [u64; 3] = get(a0)?;
                Some(sigabi::set_altstack(&current, rsp, sigabi::AltStack { sp, flags: flags & 0xffff_ffff, size })?)
            } else {
                None
            };
            if a1 != 0 {
                let old = current.reported(rsp);
                put(a1, [old.sp, old.flags, old.size])?;
            }
            if let Some(new) = new {
                threads().current().altstack = new;
            }
            Ok(0)
        }
        16 => {
            // ioctl
            let file = k.fds.get(a0)?;
            let mut f = file.borrow_mut();
            match a1 {
                0x5421 => {
                    // FIONBIO
                    if get::<i32>(a2)? != 0 {
                        f.flags |= O_NONBLOCK;
                    } else {
                        f.flags &= !O_NONBLOCK;
                    }
                    Ok(0)
                }
                0x541b => {
                    // FIONREAD
                    let n = match &f.kind {
                        Kind::Stream(h) => k.net.as_mut().map_or(0, |net| net.tcp(*h).recv_queue()),
                        Kind::Pipe { pipe, .. } => pipe.borrow().buf.len(),
                        Kind::Pair(end) => end.rx.borrow().buf.len(),
                        _ => 0,
                    };
                    put(a2, n as i32)?;
                    Ok(0)
                }
                _ => Err(ENOTTY),
            }
        }
        21 | 269 | 439 => {
            let path = if nr == 21 { path_at(k, AT_FDCWD, a0)? } else { path_at(k, a0 as i64, a1)? };
            k.fs.get(&path).map(|_| 0).ok_or(ENOENT)
        }
        53 => {
            // socketpair(domain, type, protocol, sv): AF_UNIX stream sockets only.
            const SOCK_STREAM: u64 = 1;
            match a0 {
                1 => {}
                2 => return Err(EOPNOTSUPP), // AF_INET: Linux's sock_no_socketpair
                _ => return Err(EAFNOSUPPORT),
            }
            if a1 & 0xf != SOCK_STREAM {
                return Err(EPROTONOSUPPORT);
            }
            let flags = a1 & (O_NONBLOCK | O_CLOEXEC);
            let (one, two) = (Pipe::new(), Pipe::new());
            let end = |rx: &Rc<RefCell<Pipe>>, tx: &Rc<RefCell<Pipe>>| {
                Kind::Pair(PairEnd { rx: rx.clone(), tx: tx.clone(), read_shut: false, write_shut: false })
            };
            let a = k.fds.insert(end(&one, &two), flags | 2)?;
            let b = match k.fds.insert(end(&two, &one), flags | 2) {
                Ok(b) => b,
                Err(e) => {
                    close_fd(k, a as u64)?;
                    return Err(e);
                }
            };
            put(a3, [a as i32, b as i32])?;
            Ok(0)
        }
        22 | 293 => {
            let flags = if nr == 293 { a1 } else { 0 };
            let pipe = Pipe::new();
            let r = k.fds.insert(Kind::Pipe { pipe: pipe.clone(), write: false }, flags)?;
            let w = match k.fds.insert(Kind::Pipe { pipe, write: true }, flags | 1) {
                Ok(w) => w,
                Err(e) => {
                    close_fd(k, r as u64)?;
                    return Err(e);
                }
            };
            put(a0, [r as i32, w as i32])?;
            Ok(0)
        }
        7 => poll(a0, a1, a2 as i32 as i64),
        271 => {
            // ppoll(fds, n, timeout, sigmask, size)
            let timeout = if a2 == 0 { -1 } else { (timespec_ns(a2)? / 1_000_000) as i64 };
            temporary_mask(a3)?;
            poll(a0, a1, timeout)
        }
        24 => {
            sched::yield_now();
            Ok(0)
        }
        32 => {
            let file = k.fds.get(a0)?;
            k.fds.insert_at(0, file, false)
        }
        33 | 292 => {
            let file = k.fds.get(a0)?;
            if a0 == a1 {
                return if nr == 292 { Err(EINVAL) } else { Ok(a1 as i64) };
            }
            if (a1 as usize) >= MAX_FDS {
                return Err(EBADF);
            }
            let _ = close_fd(k, a1);
            if a1 as usize >= k.fds.fds.len() {
                k.fds.fds.resize(a1 as usize + 1, None);
            }
            k.fds.fds[a1 as usize] = Some(Fd { file, cloexec: nr == 292 && a2 & O_CLOEXEC != 0 });
            Ok(a1 as i64)
        }
        35 => sleep(timespec_ns(a0)?, a1),
        230 => {
            // clock_nanosleep(clock, flags, req, rem): TIMER_ABSTIME = 1 (no `rem` then).
            let ns = timespec_ns(a2)?;
            if a1 & 1 != 0 {
                sleep(ns.saturating_sub(now_ns(k, a0 == 0)), 0)
            } else {
                sleep(ns, a3)
            }
        }
        38 => {
            // setitimer(which, new, old): REAL, VIRTUAL, PROF, all counting guest time. A
            // null `new` disarms (Linux's old misfeature).
            if a0 > 2 {
                return Err(EINVAL);
            }
            let (interval, value) = if a1 != 0 { itimerval(a1)? } else { (0, 0) };
            let old = crate::signal::set_timer(a0 as usize, value, interval);
            if a2 != 0 {
                put_itimerval(a2, old)?;
            }
            Ok(0)
        }
        36 => {
            // getitimer(which, value)
            if a0 > 2 {
                return Err(EINVAL);
            }
            put_itimerval(a1, crate::signal::timer(a0 as usize))?;
            Ok(0)
        }
        37 => {
            // alarm(seconds): ITIMER_REAL, one-shot; the old one's seconds left, rounded.
            let (left, _) = crate::signal::set_timer(0, (a0 & 0xffff_ffff) * 1_000_000_000, 0);
            Ok(sigabi::alarm_seconds(left) as i64)
        }
        39 => Ok(i64::from(crate::fork::pid())),
        110 => Ok(i64::from(crate::fork::ppid())),
        186 => Ok(i64::from(threads().tid())),
        102 | 104 | 107 | 108 => Ok(0),
        105 | 106 | 109 | 112 | 111 => Ok(0),
        41 => {
            // socket(domain, type, protocol)
            let (domain, ty) = (a0, a1 & 0xf);
            if domain != 2 {
                return Err(EAFNOSUPPORT);
            }
            if ty != 1 {
                return Err(EPROTONOSUPPORT);
            }
            k.fds.insert(Kind::Socket { port: 0 }, a1 & (O_NONBLOCK | O_CLOEXEC) | 2)
        }
        49 => {
            // bind(fd, addr, len)
            let file = k.fds.get(a0)?;
            let mut f = file.borrow_mut();
            socket_kind_port(&f)?;
            let family: u16 = get(a1)?;
            if family != 2 {
                return Err(EAFNOSUPPORT);
            }
            let port = u16::from_be(get(a1 + 2)?);
            let ip: [u8; 4] = get(a1 + 4)?;
            let net = k.net.as_ref().ok_or(EADDRNOTAVAIL)?;
            if ip != [0; 4] && ip != net.config.address.address().octets() && ip != [127, 0, 0, 1] {
                return Err(EADDRNOTAVAIL);
            }
            let in_use = k.fds.fds.iter().flatten().any(|fd| {
                !Rc::ptr_eq(&fd.file, &file)
                    && matches!(fd.file.try_borrow().map(|f| socket_kind_port(&f)), Ok(Ok(p)) if p == port && port != 0)
            });
            if in_use {
                return Err(EADDRINUSE);
            }
            f.kind = Kind::Socket { port };
            Ok(0)
        }
        50 => {
            let file = k.fds.get(a0)?;
            let mut f = file.borrow_mut();
            let port = socket_kind_port(&f)?;
            if let Kind::Listener { .. } = f.kind {
                return Ok(0);
            }
            if port == 0 {
                return Err(EINVAL);
            }
            let net = k.net.as_mut().ok_or(ENETDOWN)?;
            net.listen(port, a1 as usize);
            f.kind = Kind::Listener { port };
            Ok(0)
        }
        43 => accept(a0, a1, a2, 0),
        288 => accept(a0, a1, a2, a3),
        42 => Err(ENETUNREACH),
        51 | 52 => {
            let file = k.fds.get(a0)?;
            let f = file.borrow();
            let endpoint = match &f.kind {
                Kind::Stream(h) => {
                    let s = k.net.as_mut().ok_or(ENOTCONN)?.tcp(*h);
                    let e = if nr == 51 { s.local_endpoint() } else { s.remote_endpoint() };
                    e.map(|e| (e.addr, e.port))
                }
                Kind::Socket { port } | Kind::Listener { port, .. } if nr == 51 => {
                    Some((IpAddress::Ipv4(smoltcp::wire::Ipv4Address::UNSPECIFIED), *port))
                }
                Kind::Socket { .. } | Kind::Listener { .. } => return Err(ENOTCONN),
                _ => return Err(ENOTSOCK),
            };
            sockaddr_in(a1, a2, endpoint)?;
            Ok(0)
        }
        54 => {
            k.fds.get(a0)?;
            Ok(0)
        }
        55 => {
            // getsockopt(fd, level, name, value, len): SO_ERROR and the rest read as 0,
            // SO_TYPE as SOCK_STREAM.
            k.fds.get(a0)?;
            let value: i32 = if a1 == 1 && a2 == 3 { 1 } else { 0 };
            if a3 != 0 {
                put(a3, value)?;
                put(a4, 4u32)?;
            }
            Ok(0)
        }
        48 => {
            let file = k.fds.get(a0)?;
            let f = file.borrow();
            match &f.kind {
                Kind::Stream(h) => {
                    if a1 != 0 {
                        if let Some(net) = k.net.as_mut() {
                            net.tcp(*h).close();
                        }
                    }
                    threads().io_changed();
                    Ok(0)
                }
                Kind::Pair(_) if a1 > 2 => Err(EINVAL),
                Kind::Pair(_) => {
                    drop(f);
                    let Kind::Pair(end) = &mut file.borrow_mut().kind else { unreachable!("matched above") };
                    end.shut(a1 != 1, a1 != 0);
                    Ok(0)
                }
                _ => Err(ENOTCONN),
            }
        }
        44 => do_write(a0, user(a1, a2)?),
        45 => {
            let n = do_read(a0, user(a1, a2)?)?;
            if a4 != 0 {
                sockaddr_in(a4, a5, None)?;
            }
            Ok(n)
        }
        46 | 47 => {
            // sendmsg/recvmsg(fd, msghdr, flags): the iovecs only.
            let iov: u64 = get(a1 + 16)?;
            let count: u64 = get(a1 + 24)?;
            if nr == 46 {
                writev(a0, iov, count)
            } else {
                put(a1 + 40, 0u64)?; // msg_controllen
                put(a1 + 48, 0i32)?; // msg_flags
                readv(a0, iov, count)
            }
        }
        202 => futex(a0, a1, a2, a3, a4, a5),
        56 => clone(frame),
        60 => exit_thread(),
        231 => crate::exit_all(a0 & 0xff),
        57 | 58 => crate::fork::fork(frame, 0),
        61 => {
            // wait4(pid, wstatus, options, rusage): the children have ended (fork).
            // pid_t, an int (glibc leaves the upper half of -1 zero).
            let (pid, status) = crate::fork::wait(i64::from(a0 as i32), a2)?;
            // WNOHANG with no child ended (pid 0): Linux writes neither.
            if a1 != 0 && pid != 0 {
                put(a1, status)?;
            }
            if a3 != 0 && pid != 0 {
                put(a3, [0u64; 18])?;
            }
            Ok(i64::from(pid))
        }
        62 | 200 | 234 => kill(nr, a0, a1, a2),
        63 => {
            let mut uts = [0u8; 390];
            for (i, field) in
                ["Linux", "ftvm", "6.1.0-ftvm", "#1 ftvm Linux personality", "x86_64", "(none)"].iter().enumerate()
            {
                uts[i * 65..i * 65 + field.len()].copy_from_slice(field.as_bytes());
            }
            user(a0, 390)?.copy_from_slice(&uts);
            Ok(0)
        }
        72 => {
            // fcntl(fd, cmd, arg)
            let file = k.fds.get(a0)?;
            match a1 {
                0 | 1030 => k.fds.insert_at(a2 as usize, file, a1 == 1030),
                1 => Ok(i64::from(k.fds.fds[a0 as usize].as_ref().is_some_and(|f| f.cloexec))),
                2 => {
                    if let Some(fd) = k.fds.fds[a0 as usize].as_mut() {
                        fd.cloexec = a2 & 1 != 0;
                    }
                    Ok(0)
                }
                3 => Ok(file.borrow().flags as i64),
                4 => {
                    let mut f = file.borrow_mut();
                    f.flags = (f.flags & !(O_NONBLOCK | O_APPEND)) | (a2 & (O_NONBLOCK | O_APPEND));
                    Ok(0)
                }
                5..=7 | 36..=38 => Ok(0), // locks: one process
                _ => Err(EINVAL),
            }
        }
        74 | 75 | 277 => {
            // fsync/fdatasync: a file in the data directory goes to the disk (persist);
            // sync_file_range(fd, off, len, flags) too when it waits (WAIT_AFTER, 4).
            let file = k.fds.get(a0)?;
            if nr == 277 && a3 & 4 == 0 {
                return Ok(0);
            }
            let f = file.borrow();
            if let (Kind::File { node }, Some(disk)) = (&f.kind, k.disk.as_mut()) {
                if let Some(path) = k.fs.path_of(node) {
                    if disk.covers(&path) {
                        disk.sync_file(&k.fs, &path, node)?;
                    }
                }
            }
            Ok(0)
        }
        77 => {
            let file = k.fds.get(a0)?;
            let f = file.borrow();
            let Kind::File { node } = &f.kind else { return Err(EINVAL) };
            let mut n = node.borrow_mut();
            n.dirty_below |= a1 < n.synced;
            n.ram().resize(a1 as usize, 0);
            Ok(0)
        }
        78 | 217 => getdents64(k, a0, a1, a2),
        79 => {
            let need = k.cwd.len() as u64 + 1;
            if a1 < need {
                return Err(ERANGE);
            }
            let buf = user(a0, need)?;
            buf[..k.cwd.len()].copy_from_slice(k.cwd.as_bytes());
            buf[k.cwd.len()] = 0;
            Ok(need as i64)
        }
        80 => {
            let path = path_at(k, AT_FDCWD, a0)?;
            let node = k.fs.get(&path).ok_or(ENOENT)?;
            if !node.borrow().is_dir() {
                return Err(ENOTDIR);
            }
            k.cwd = path;
            Ok(0)
        }
        81 => {
            let file = k.fds.get(a0)?;
            let f = file.borrow();
            let Kind::Dir { path, .. } = &f.kind else { return Err(ENOTDIR) };
            k.cwd = path.clone();
            Ok(0)
        }
        82 | 264 | 316 => {
            let (from, to) = if nr == 82 {
                (path_at(k, AT_FDCWD, a0)?, path_at(k, AT_FDCWD, a1)?)
            } else {
                (path_at(k, a0 as i64, a1)?, path_at(k, a2 as i64, a3)?)
            };
            k.fs.rename(&from, &to)?;
            journal_rename(k, &from, &to)
        }
        83 | 258 => {
            let (path, mode) =
                if nr == 83 { (path_at(k, AT_FDCWD, a0)?, a1) } else { (path_at(k, a0 as i64, a1)?, a2) };
            let now = k.boot_epoch;
            let mode = (mode as u32) & !k.umask;
            k.fs.mkdir(&path, mode, now)?;
            journal(k, &path, Record::Mkdir { path: path.clone(), mode })
        }
        84 | 87 | 263 => {
            let (path, dir) = match nr {
                84 => (path_at(k, AT_FDCWD, a0)?, true),
                87 => (path_at(k, AT_FDCWD, a0)?, false),
                _ => (path_at(k, a0 as i64, a1)?, a2 & 0x200 != 0),
            };
            k.fs.unlink(&path, dir)?;
            let record = if dir { Record::Rmdir { path: path.clone() } } else { Record::Unlink { path: path.clone() } };
            journal(k, &path, record)
        }
        89 | 267 => {
            let (path, buf, len) =
                if nr == 89 { (path_at(k, AT_FDCWD, a0)?, a1, a2) } else { (path_at(k, a0 as i64, a1)?, a2, a3) };
            let target = if path == "/proc/self/exe" {
                k.exe.clone()
            } else {
                let node = k.fs.get(&path).ok_or(ENOENT)?;
                let n = node.borrow();
                match &n.data {
                    Data::Symlink(t) => t.clone(),
                    _ => return Err(EINVAL),
                }
            };
            let n = target.len().min(len as usize);
            user(buf, n as u64)?.copy_from_slice(&target.as_bytes()[..n]);
            Ok(n as i64)
        }
        95 => {
            let old = k.umask;
            k.umask = (a0 as u32) & 0o777;
            Ok(i64::from(old))
        }
        96 => {
            let ns = now_ns(k, true);
            if a0 != 0 {
                put(a0, [ns / 1_000_000_000, (ns % 1_000_000_000) / 1000])?;
            }
            if a1 != 0 {
                put(a1, [0u32, 0])?;
            }
            Ok(0)
        }
        201 => {
            let secs = now_ns(k, true) / 1_000_000_000;
            if a0 != 0 {
                put(a0, secs)?;
            }
            Ok(secs as i64)
        }
        228 => {
            // clock_gettime: REALTIME (0, 5 coarse, 8 alarm, 11 TAI) from the RTC at boot
            // plus ticks; every other clock counts ticks since boot.
            let ns = crate::vdso::now_ns(a0);
            put(a1, [ns / 1_000_000_000, ns % 1_000_000_000])?;
            Ok(0)
        }
        229 => {
            if a1 != 0 {
                put(a1, [0u64, 1_000_000_000 / u64::from(time::TICK_HZ)])?;
            }
            Ok(0)
        }
        97 => {
            let (cur, max) = rlimit(a0);
            put(a1, [cur, max])?;
            Ok(0)
        }
        160 => Ok(0),
        302 => {
            if a3 != 0 {
                let (cur, max) = rlimit(a1);
                put(a3, [cur, max])?;
            }
            Ok(0)
        }
        98 => {
            // getrusage: user time = time since boot, the rest zero.
            let us = time::ticks_to_ms(time::ticks()) * 1000;
            let mut ru = [0u64; 18];
            ru[0] = us / 1_000_000;
            ru[1] = us % 1_000_000;
            put(a1, ru)?;
            Ok(0)
        }
        99 => {
            let mut info = [0u64; 14];
            info[0] = time::ticks() / u64::from(time::TICK_HZ);
            let total = k.mem.total();
            info[4] = total;
            info[5] = total.saturating_sub(k.mem.mapped());
            info[10] = 1; // procs (u16) in the low bits
            info[13] = 1; // mem_unit (u32)
            put(a0, info)?;
            Ok(0)
        }
        157 => Ok(0),
        158 => match a0 {
            0x1002 => {
                threads().current().fs_base = a1;
                ftvm_guest_kit::syscall::set_fs_base(a1);
                Ok(0)
            }
            0x1003 => {
                put(a1, threads().current().fs_base)?;
                Ok(0)
            }
            _ => Err(EINVAL),
        },
        218 => {
            threads().current().clear_child_tid = a0;
            Ok(i64::from(threads().tid()))
        }
        273 => Ok(0),
        203 => Ok(0),
        204 => {
            // sched_getaffinity: one CPU.
            if a1 < 8 {
                return Err(EINVAL);
            }
            put(a2, 1u64)?;
            Ok(8)
        }
        318 => {
            let buf = user(a0, a1)?;
            random_fill(k, buf);
            Ok(a1 as i64)
        }
        213 | 291 => {
            let ep = Rc::new(RefCell::new(Epoll::default()));
            k.fds.epolls.push(ep.clone());
            let flags = if nr == 291 { a0 & O_CLOEXEC } else { 0 };
            k.fds.insert(Kind::Epoll(ep), flags)
        }
        284 | 290 => {
            // eventfd(initval), eventfd2(initval, flags)
            let flags = if nr == 290 { a1 } else { 0 };
            if flags & !(EFD_SEMAPHORE | O_NONBLOCK | O_CLOEXEC) != 0 {
                return Err(EINVAL);
            }
            let ev = EventFd {
                count: a0 as u32 as u64,
                semaphore: flags & EFD_SEMAPHORE != 0,
                activity: Activity::default(),
            };
            k.fds.insert(Kind::EventFd(Rc::new(RefCell::new(ev))), flags & (O_NONBLOCK | O_CLOEXEC))
        }
        233 => epoll_ctl(k, a0, a1, a2, a3),
        232 => epoll_wait(a0, a1, a2, a3 as i32 as i64),
        281 => {
            // epoll_pwait(epfd, events, max, timeout, sigmask, size)
            temporary_mask(a4)?;
            epoll_wait(a0, a1, a2, a3 as i32 as i64)
        }
        15 => crate::signal::sigreturn(frame),
        334 => Err(ENOSYS),
        59 => Err(EPERM),
        _ => {
            let _ = EOPNOTSUPP;
            unsupported(k, nr)
        }
    }
}

/// ENOMEM from mmap or mremap, said once on the console: a program that runs out of memory
/// may only abort (Redis recurses in its crash report until its stack runs into its heap:
/// there is no guard page without paging), so the line says why and what to give.
fn out_of_memory(k: &Kernel, len: u64) -> i64 {
    static SAID: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, core::sync::atomic::Ordering::Relaxed) {
        println!(
            "linux: the program's memory is full: {} MiB mapped of {} MiB, a map of {} KiB fails with ENOMEM (more: a bigger --mem, linux.program_share, or the program's own limit such as Redis's maxmemory)",
            k.mem.mapped() >> 20,
            k.mem.total() >> 20,
            len >> 10
        );
    }
    ENOMEM
}

/// Journals a change to `path` when it is in the persisted data directory.
fn journal(k: &mut Kernel, path: &str, record: Record) -> Result<i64, i64> {
    match k.disk.as_mut() {
        Some(disk) if disk.covers(path) => disk.commit(&k.fs, &[record]).map(|_| 0),
        _ => Ok(0),
    }
}

/// A rename that involves the data directory: inside it, journaled as a rename; into it, the
/// file's whole content is written at its new path (the journal never knew the old one).
fn journal_rename(k: &mut Kernel, from: &str, to: &str) -> Result<i64, i64> {
    let Some(disk) = k.disk.as_mut() else { return Ok(0) };
    match (disk.covers(from), disk.covers(to)) {
        (true, _) => disk.commit(&k.fs, &[Record::Rename { from: from.into(), to: to.into() }]).map(|_| 0),
        (false, true) => {
            let Some(node) = k.fs.get(to) else { return Ok(0) };
            if node.borrow().is_dir() {
                return Ok(0);
            }
            {
                let mut n = node.borrow_mut();
                n.on_disk = false;
                n.dirty_below = true;
            }
            disk.sync_file(&k.fs, to, &node).map(|_| 0)
        }
        (false, false) => Ok(0),
    }
}

fn path_node(k: &Kernel, dirfd: i64, path: u64) -> Result<Node, i64> {
    let path = path_at(k, dirfd, path)?;
    k.fs.get(&path).ok_or(ENOENT)
}

/// The file or directory an fd names (not pipes or sockets, whose owner is fixed here).
fn fd_node(k: &Kernel, fd: u64) -> Result<Node, i64> {
    let file = k.fds.get(fd)?;
    let f = file.borrow();
    match &f.kind {
        Kind::File { node } => Ok(node.clone()),
        Kind::Dir { path, .. } => k.fs.get(path).ok_or(ENOENT),
        _ => Err(EPERM),
    }
}

/// chmod, fchmod, fchmodat: the permission bits (the program runs as root).
fn chmod(node: &Node, mode: u64) -> Result<i64, i64> {
    let mut n = node.borrow_mut();
    n.mode = (n.mode & !0o7777) | (mode as u32 & 0o7777);
    Ok(0)
}

/// chown, fchown, lchown, fchownat; -1 leaves an id as it is (the program runs as root).
fn chown(node: &Node, uid: u64, gid: u64) -> Result<i64, i64> {
    let mut n = node.borrow_mut();
    if uid as u32 != u32::MAX {
        n.uid = uid as u32;
    }
    if gid as u32 != u32::MAX {
        n.gid = gid as u32;
    }
    Ok(0)
}

fn fstat(k: &mut Kernel, fd: u64, out: u64) -> Result<i64, i64> {
    let file = k.fds.get(fd)?;
    let f = file.borrow();
    match &f.kind {
        Kind::File { node } => stat_of(&node.borrow(), out),
        Kind::Dir { path, .. } => {
            let node = k.fs.get(path).ok_or(ENOENT)?;
            let n = node.borrow();
            stat_of(&n, out)
        }
        Kind::Console => console_stat(out),
        _ => {
            let mode = match f.kind {
                Kind::Pipe { .. } => 0o010600,
                Kind::EventFd(_) => 0o600,
                _ => 0o140777,
            };
            let node = fs::Inode::new(0, mode, 0, Data::Dev(Dev::Null));
            stat_of(&node, out)
        }
    }
}
