//! One replication connection between a primary and a backup: the encrypted, authenticated
//! TCP stream (log and state one way, acknowledgements the other) and the heartbeat socket,
//! whose datagrams are sealed (encrypted) with the same session's keys (`secure.rs`).
//!
//! The primary connects; the backup listens. A backup keeps its listener for its whole life:
//! after a divergence it waits there for the primary's resync, a new connection.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_sync::{lock, unpoisoned};

use crate::protocol::{Heartbeat, MODE_BOOT, MODE_PROBE, MODE_TRANSFER};
use crate::secure::{self, DatagramOpener, DatagramSealer, Key, SecureWriter};
use crate::{io, Error, Result, HEARTBEAT_POLL};

/// How long the authentication handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a new connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The log from the VM's boot (both sides booted the same images).
    Boot,
    /// A live state transfer, then the log from where the state was taken.
    Transfer,
    /// A preflight: a log header to compare, nothing after it.
    Probe,
}

/// The heartbeat socket of one session: datagrams sealed and checked with its keys.
pub struct Heartbeats {
    udp: UdpSocket,
    /// Where heartbeats go (the backup learns it from the first one accepted).
    peer: Mutex<Option<SocketAddr>>,
    sealer: Mutex<DatagramSealer>,
    opener: Mutex<DatagramOpener>,
    /// Datagrams that failed authentication (altered, replayed, another session's).
    pub rejected: AtomicU64,
    last_report: Mutex<Option<Instant>>,
    /// When the session began: datagrams of the session before (a link just replaced) may
    /// still arrive for a moment; rejected then, they are not reported.
    began: Instant,
}

impl Heartbeats {
    pub fn send(&self, hb: &Heartbeat) {
        let sealed = lock(&self.sealer).seal(&hb.encode());
        if let Some(peer) = *lock(&self.peer) {
            let _ = self.udp.send_to(&sealed, peer);
        }
    }

    /// Waits up to [`HEARTBEAT_POLL`] for a heartbeat that passes authentication.
    pub fn recv(&self) -> Option<Heartbeat> {
        let mut buf = [0u8; 256];
        let (n, from) = self.udp.recv_from(&mut buf).ok()?;
        match lock(&self.opener).open(&buf[..n]) {
            Ok(payload) => {
                let hb = Heartbeat::decode(&payload)?;
                lock(&self.peer).get_or_insert(from);
                Some(hb)
            }
            Err(e) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                let mut last = lock(&self.last_report);
                let settled = self.began.elapsed() > Duration::from_secs(1);
                if settled && last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    *last = Some(Instant::now());
                    tracing::warn!(
                        target: "ftvm::event",
                        event = "rejected_heartbeat",
                        from = %from,
                        error = %e,
                        "rejected a heartbeat datagram from {from}: {e}"
                    );
                }
                None
            }
        }
    }
}

/// An established, authenticated connection.
pub struct Connection {
    pub peer: SocketAddr,
    pub mode: Mode,
    pub reader: Box<dyn Read + Send>,
    /// Bytes of the current frame the reader has not handed out yet (0: at a frame's end).
    pub buffered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// When the current frame's bytes were read from the socket ([`crate::stages::now_ns`]).
    pub received_at: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The reader's switch to reads that do not wait (see `SecureReader::nonblocking_switch`).
    pub nonblocking: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub writer: SecureWriter,
    pub heartbeats: std::sync::Arc<Heartbeats>,
    stream: TcpStream,
}

impl Connection {
    /// Primary: connects to the backup at `addr` (waiting up to `wait` for it to listen),
    /// authenticates and announces what follows.
    pub fn connect(addr: SocketAddr, key: &Key, wait: Duration, mode: Mode) -> Result<Connection> {
        let start = Instant::now();
        let mut announced = false;
        let stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < wait => {
                    if !announced {
                        tracing::info!(
                            target: "ftvm::event",
                            event = "waiting_for_backup",
                            addr = %addr,
                            error = %e,
                            "waiting for the backup at {addr} ({e})"
                        );
                        announced = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(source) => return Err(Error::Io { what: format!("cannot reach the backup at {addr}"), source }),
            }
        };
        let _ = stream.set_nodelay(true);
        let clone = stream.try_clone().map_err(io("socket"))?;
        let (mut writer, reader, keys) = secure::handshake(clone, key, true, HANDSHAKE_TIMEOUT)
            .map_err(|e| Error::Handshake(format!("with the backup at {addr}: {e}")))?;
        writer
            .write_all(&[match mode {
                Mode::Boot => MODE_BOOT,
                Mode::Transfer => MODE_TRANSFER,
                Mode::Probe => MODE_PROBE,
            }])
            .and_then(|_| writer.flush())
            .map_err(io("sending to the backup"))?;
        let udp = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).map_err(io("udp"))?;
        udp.set_read_timeout(Some(HEARTBEAT_POLL)).map_err(io("udp"))?;
        let heartbeats = heartbeats(udp, Some(addr), keys.sealer(), keys.opener());
        let buffered = reader.buffered_gauge();
        let received_at = reader.received_gauge();
        let nonblocking = reader.nonblocking_switch();
        Ok(Connection {
            peer: addr,
            mode,
            reader: Box::new(reader),
            buffered,
            received_at,
            nonblocking,
            writer,
            heartbeats,
            stream,
        })
    }

    /// Shuts the TCP connection down both ways (the peer sees it closed at once).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// The read timeout of the stream's socket: a backup reads what comes before the pair is
    /// formed under a deadline ([`PAIRING_STALL`]; a state transfer's data under a longer
    /// one), and without one once it is formed (the heartbeats tell a dead primary then).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.stream.set_read_timeout(timeout).map_err(io("socket"))
    }

    /// A handle that can shut the connection down later, from another thread.
    pub fn shutdown_handle(&self) -> Result<TcpStream> {
        self.stream.try_clone().map_err(io("socket"))
    }
}

fn heartbeats(
    udp: UdpSocket,
    peer: Option<SocketAddr>,
    sealer: DatagramSealer,
    opener: DatagramOpener,
) -> std::sync::Arc<Heartbeats> {
    std::sync::Arc::new(Heartbeats {
        udp,
        peer: Mutex::new(peer),
        sealer: Mutex::new(sealer),
        opener: Mutex::new(opener),
        rejected: AtomicU64::new(0),
        last_report: Mutex::new(None),
        began: Instant::now(),
    })
}

/// A backup's listening sockets (TCP for the stream, UDP for heartbeats, on one address).
///
/// Connections are accepted and authenticated in the background, each handshake on a thread
/// of its own with its deadline ([`HANDSHAKE_TIMEOUT`]), at most [`MAX_HANDSHAKES`] at once:
/// peers that stall in the handshake, however many, do not keep the real primary waiting.
/// [`Listener::accept`] hands out the authenticated connections in the order they completed.
pub struct Listener {
    waiting: Arc<Waiting>,
    closed: Arc<AtomicBool>,
    pub addr: SocketAddr,
}

/// Handshakes a backup runs at once; a connection beyond them is closed at once (and said).
pub const MAX_HANDSHAKES: usize = 16;
/// Authenticated connections waiting for the backup to take them; past this the oldest is
/// closed (a peer that stalls waits longest, and the real primary comes fresh).
const MAX_WAITING: usize = 4;

/// The authenticated connections not taken yet, oldest first.
#[derive(Default)]
struct Waiting {
    queue: Mutex<std::collections::VecDeque<Connection>>,
    arrived: std::sync::Condvar,
}

impl Waiting {
    fn push(&self, c: Connection) {
        let mut q = lock(&self.queue);
        q.push_back(c);
        if q.len() > MAX_WAITING {
            if let Some(old) = q.pop_front() {
                tracing::warn!(
                    target: "ftvm::event",
                    event = "refused_connection",
                    peer = %old.peer,
                    "refused the connection from {}: {MAX_WAITING} newer authenticated connections wait",
                    old.peer
                );
            }
        }
        self.arrived.notify_all();
    }

    /// The oldest connection waiting, or `None` after `timeout`.
    fn pop(&self, timeout: Duration) -> Option<Connection> {
        let q = lock(&self.queue);
        let (mut q, _) = unpoisoned(self.arrived.wait_timeout_while(q, timeout, |q| q.is_empty()));
        q.pop_front()
    }
}

/// Waits up to `wait` for `fd` to have something to read (`poll(2)`); the read that follows
/// tells what there is.
fn wait_readable(fd: &impl std::os::fd::AsRawFd, wait: Duration) {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = wait.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd for the call's duration; the fd is owned by the caller's socket.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

/// How long the listener's thread waits for a connection before it looks whether the
/// listener was dropped (it was a 5 ms sleep between non-blocking accepts: 200 wake-ups a
/// second for a backup's whole life).
const ACCEPT_WAIT: Duration = Duration::from_millis(50);

/// How long an authenticated peer may stay silent before the pair is formed (the log's
/// header, a transfer's header) before it is refused: a peer that stalls there does not keep
/// the backup from the real primary for longer.
pub const PAIRING_STALL: Duration = Duration::from_secs(10);

impl Listener {
    /// Listens on `addr` (TCP for the stream, UDP for heartbeats, on the same port). Port 0
    /// picks a free port, the same for both; [`Listener::addr`] is the address bound.
    pub fn bind(addr: SocketAddr, key: &Key) -> Result<Listener> {
        // With port 0 the UDP port the TCP one got may be taken: a few tries.
        let mut tries_left = if addr.port() == 0 { 8 } else { 1 };
        let (tcp, udp, bound) = loop {
            let tcp = TcpListener::bind(addr).map_err(io(format!("cannot listen on {addr}")))?;
            let bound = tcp.local_addr().map_err(io(format!("cannot listen on {addr}")))?;
            tries_left -= 1;
            match UdpSocket::bind(bound) {
                Ok(udp) => {
                    udp.set_read_timeout(Some(HEARTBEAT_POLL)).map_err(io("udp"))?;
                    break (tcp, udp, bound);
                }
                Err(_) if tries_left > 0 => {}
                Err(e) => return Err(io(format!("cannot bind UDP {bound}"))(e)),
            }
        };
        tcp.set_nonblocking(true).map_err(io("listen"))?;
        let waiting = Arc::new(Waiting::default());
        let closed = Arc::new(AtomicBool::new(false));
        let acceptor = Acceptor {
            tcp,
            udp: udp.try_clone().map_err(io("udp"))?,
            key: key.clone(),
            waiting: waiting.clone(),
            closed: closed.clone(),
            running: Arc::new(AtomicUsize::new(0)),
        };
        std::thread::Builder::new()
            .name("ftvm-accept".into())
            .spawn(move || {
                ftvm_seccomp::enter(ftvm_seccomp::Thread::Link);
                acceptor.run()
            })
            .map_err(io("thread"))?;
        Ok(Listener { waiting, closed, addr: bound })
    }

    /// Waits for an authenticated primary until `give_up` says to stop (checked every few
    /// milliseconds). A peer that fails authentication is reported and refused; the wait
    /// goes on.
    pub fn accept(&self, give_up: &mut dyn FnMut() -> bool) -> Result<Option<Connection>> {
        loop {
            if let Some(c) = self.waiting.pop(Duration::from_millis(5)) {
                return Ok(Some(c));
            }
            if give_up() {
                return Ok(None);
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

/// The listener's background half: accepts, and authenticates each connection on a thread.
struct Acceptor {
    tcp: TcpListener,
    udp: UdpSocket,
    key: Key,
    waiting: Arc<Waiting>,
    closed: Arc<AtomicBool>,
    /// Handshakes under way.
    running: Arc<AtomicUsize>,
}

impl Acceptor {
    fn run(self) {
        while !self.closed.load(Ordering::SeqCst) {
            let (stream, peer) = match self.tcp.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    wait_readable(&self.tcp, ACCEPT_WAIT);
                    continue;
                }
                Err(e) => {
                    // Out of descriptors, say: this connection is lost, the listener is not.
                    tracing::warn!(
                        "accept on {}: {e}",
                        self.udp.local_addr().map(|a| a.to_string()).unwrap_or_default()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if self.running.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
                refused(peer, format_args!("{MAX_HANDSHAKES} handshakes are under way already"));
                continue;
            }
            let (udp, key, waiting, running) = match self.udp.try_clone() {
                Ok(udp) => (udp, self.key.clone(), self.waiting.clone(), self.running.clone()),
                Err(e) => {
                    refused(peer, format_args!("udp: {e}"));
                    continue;
                }
            };
            running.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new().name("ftvm-handshake".into()).spawn(move || {
                let result = authenticate(stream, peer, &key, udp);
                running.fetch_sub(1, Ordering::SeqCst);
                match result {
                    Ok(c) => waiting.push(c),
                    Err(e) => refused(peer, format_args!("{e}")),
                }
            });
            if let Err(e) = spawned {
                self.running.fetch_sub(1, Ordering::SeqCst);
                refused(peer, format_args!("thread: {e}"));
            }
        }
    }
}

/// The backup's side of a new connection: the handshake, then the connection's mode, each
/// within its deadline. The connection keeps a read timeout of [`PAIRING_STALL`] until the
/// pair is formed ([`Connection::paired`]).
fn authenticate(stream: TcpStream, peer: SocketAddr, key: &Key, udp: UdpSocket) -> Result<Connection> {
    stream.set_nonblocking(false).map_err(io("socket"))?;
    let _ = stream.set_nodelay(true);
    let clone = stream.try_clone().map_err(io("socket"))?;
    let (writer, mut reader, keys) =
        secure::handshake(clone, key, false, HANDSHAKE_TIMEOUT).map_err(|e| Error::Handshake(e.to_string()))?;
    reader.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io("socket"))?;
    let mut mode = [0u8; 1];
    reader.read_exact(&mut mode).map_err(io("reading the connection's mode"))?;
    reader.set_read_timeout(Some(PAIRING_STALL)).map_err(io("socket"))?;
    let mode = match mode[0] {
        MODE_BOOT => Mode::Boot,
        MODE_TRANSFER => Mode::Transfer,
        MODE_PROBE => Mode::Probe,
        other => return Err(Error::Handshake(format!("unknown connection mode {other:#x}"))),
    };
    let heartbeats = heartbeats(udp, None, keys.sealer(), keys.opener());
    let buffered = reader.buffered_gauge();
    let received_at = reader.received_gauge();
    let nonblocking = reader.nonblocking_switch();
    Ok(Connection {
        peer,
        mode,
        reader: Box::new(reader),
        buffered,
        received_at,
        nonblocking,
        writer,
        heartbeats,
        stream,
    })
}

/// Says that a connection from `peer` was refused, and why (a tracing event).
fn refused(peer: SocketAddr, why: std::fmt::Arguments<'_>) {
    tracing::warn!(target: "ftvm::event", event = "refused_connection", peer = %peer, error = %why, "refused a connection from {peer}: {why}");
}

/// Writes a length-prefixed (u32) byte string.
pub fn write_blob(w: &mut dyn Write, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(bytes)
}

/// Reads a length-prefixed byte string of at most `max` bytes.
pub fn read_blob(r: &mut dyn Read, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message of {len} bytes (at most {max} expected)"),
        ));
    }
    // Grown as the bytes arrive: a claimed length costs no memory by itself.
    let mut b = Vec::with_capacity(len.min(64 << 10));
    let got = r.take(len as u64).read_to_end(&mut b)?;
    if got < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the message ended after {got} of its {len} bytes"),
        ));
    }
    Ok(b)
}

/// Sends a handshake answer: accepted, or refused with the reason.
pub fn answer(w: &mut dyn Write, refusal: Option<&str>) -> std::io::Result<()> {
    match refusal {
        None => w.write_all(&[crate::protocol::HANDSHAKE_OK])?,
        Some(why) => {
            w.write_all(&[crate::protocol::HANDSHAKE_REFUSED])?;
            write_blob(w, why.as_bytes())?;
        }
    }
    w.flush()
}

/// Reads a handshake answer: `Ok(())` accepted, `Err(reason)` refused.
pub fn read_answer(r: &mut dyn Read) -> Result<std::result::Result<(), String>> {
    let mut reply = [0u8; 1];
    r.read_exact(&mut reply).map_err(io("waiting for the backup's answer"))?;
    match reply[0] {
        crate::protocol::HANDSHAKE_OK => Ok(Ok(())),
        crate::protocol::HANDSHAKE_REFUSED => {
            let why = read_blob(r, 1 << 16).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            Ok(Err(why))
        }
        other => Err(Error::Handshake(format!("unexpected answer byte {other:#x}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_0_listens_on_one_real_port_for_stream_and_heartbeats() {
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &Key::unauthenticated()).unwrap();
        assert_ne!(l.addr.port(), 0, "the address bound, not the one asked for");
        assert!(UdpSocket::bind(l.addr).is_err(), "heartbeats go to the stream's port: it is taken");
    }

    #[test]
    fn stalled_handshakes_do_not_delay_a_real_one_and_the_oldest_waiting_connection_goes_first() {
        let key = Key::unauthenticated();
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &key).unwrap();
        let stalled: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(l.addr).unwrap()).collect();
        let peer = |n: usize| {
            let s = TcpStream::connect(l.addr).unwrap();
            let me = s.local_addr().unwrap();
            let (mut w, _r, _k) = secure::handshake(s.try_clone().unwrap(), &key, true, HANDSHAKE_TIMEOUT).unwrap();
            w.write_all(&[MODE_BOOT]).and_then(|_| w.flush()).unwrap();
            std::thread::sleep(Duration::from_millis(50 + n as u64));
            (me, s, w)
        };
        let start = Instant::now();
        let peers: Vec<_> = (0..MAX_WAITING + 1).map(peer).collect();
        assert!(start.elapsed() < HANDSHAKE_TIMEOUT, "handshakes waited for the stalled ones");
        // The first one was closed to make room; the second is the oldest waiting.
        let c = l.accept(&mut || true).unwrap().expect("a connection waits");
        assert_eq!(c.peer, peers[1].0);
        assert_eq!(c.mode, Mode::Boot);
        drop(stalled);
    }

    #[test]
    fn a_blob_is_read_whole_or_refused_and_a_claimed_length_is_not_allocated_up_front() {
        let mut ok = 5u32.to_le_bytes().to_vec();
        ok.extend_from_slice(b"hello");
        assert_eq!(read_blob(&mut &ok[..], 16).unwrap(), b"hello");
        let too_long = 17u32.to_le_bytes();
        assert_eq!(read_blob(&mut &too_long[..], 16).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
        // 16 MiB claimed, 3 bytes sent: an unexpected end, after reading what came.
        let mut short = (16u32 << 20).to_le_bytes().to_vec();
        short.extend_from_slice(b"abc");
        let e = read_blob(&mut &short[..], 16 << 20).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("after 3 of its 16777216 bytes"), "{e}");
    }
}
