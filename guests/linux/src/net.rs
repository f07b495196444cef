//! TCP sockets over the kit's smoltcp (IPv4 only). smoltcp has no accept queue, so a
//! listening socket is a pool of smoltcp sockets listening on its port (the `listen`
//! backlog, at most `MAX_BACKLOG`): `accept` hands out one that got a connection and puts a
//! fresh listening one in its place. Closed sockets are removed from the set once smoltcp
//! is done with them.
//!
//! A connection attempt (a SYN) that finds every socket of its port's pool taken is
//! dropped before smoltcp sees it, as Linux drops one that finds the accept queue full:
//! the client sends it again a second later. smoltcp itself would answer it with a reset,
//! and the client's `connect` would fail ("connection refused") although the server
//! listens (a storm of 1,000 redis-benchmark clients hung on the ones refused).
//!
//! Each arriving TCP segment is noted, by its connection's addresses, at the stamp epoll
//! orders events by (`linux_abi::epoll`), so that epoll can list the connections in the
//! order their data arrived, as Linux does, not in descriptor order.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use ftvm_guest_kit::net::{self as knet, IpConfig};
use ftvm_guest_kit::println;
use ftvm_guest_kit::virtio::net::VirtioNet;
use linux_abi::epoll::Activity;
use smoltcp::iface::{Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities};
use smoltcp::socket::tcp;
use smoltcp::socket::AnySocket;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Address, Ipv4Packet, TcpPacket};

pub const MAX_BACKLOG: usize = 128;
const SOCKBUF: usize = 64 << 10;

pub struct Net {
    pub iface: Interface,
    pub dev: VirtioNet,
    pub sockets: SocketSet<'static>,
    pub config: IpConfig,
    /// Sockets closed by the program, removed when smoltcp is done with them.
    closing: Vec<Closing>,
    arrivals: Arrivals,
    /// The listening ports' pools.
    pools: BTreeMap<u16, Pool>,
    /// Connection attempts dropped for want of a listening socket (once on the console).
    syns_dropped: u64,
}

/// The smoltcp sockets listening on one port, for connections not yet accepted.
struct Pool {
    sockets: Vec<SocketHandle>,
    /// How many the program asked for (`listen`'s backlog, clamped): the pool is filled up
    /// to it again as memory allows.
    backlog: usize,
}

/// A connection as its segments name it: the peer's address and port, and ours.
type Connection = (Ipv4Address, u16, u16);

/// When segments arrived, per connection (the peer's, or a listening port's new ones).
#[derive(Default)]
struct Arrivals {
    by_connection: BTreeMap<Connection, Activity>,
}

/// More connections noted than this, and those without a socket are forgotten.
const ARRIVALS_KEPT: usize = 4096;

impl Arrivals {
    fn note(&mut self, frame: &[u8]) {
        let Ok(eth) = EthernetFrame::new_checked(frame) else { return };
        if eth.ethertype() != EthernetProtocol::Ipv4 {
            return;
        }
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else { return };
        if ip.next_header() != IpProtocol::Tcp {
            return;
        }
        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else { return };
        let connection = (ip.src_addr(), tcp.src_port(), tcp.dst_port());
        crate::sys::note(self.by_connection.entry(connection).or_default());
    }

    fn of(&self, connection: Option<Connection>) -> Activity {
        connection.and_then(|c| self.by_connection.get(&c).copied()).unwrap_or_default()
    }
}

/// A socket's connection, once it has a peer.
fn connection(s: &tcp::Socket<'static>) -> Option<Connection> {
    let remote = s.remote_endpoint()?;
    let local = s.local_endpoint()?;
    match remote.addr {
        IpAddress::Ipv4(addr) => Some((addr, remote.port, local.port)),
    }
}

/// The virtio device as smoltcp sees it, noting each frame it receives.
struct Noting<'a> {
    dev: &'a mut VirtioNet,
    arrivals: &'a mut Arrivals,
    /// Listening sockets still free per listening port, taken by the SYNs of this poll.
    syn_room: &'a mut BTreeMap<u16, usize>,
    syns_dropped: &'a mut u64,
}

struct NotingRx<'a> {
    rx: <VirtioNet as phy::Device>::RxToken<'a>,
    arrivals: &'a mut Arrivals,
    syn_room: &'a mut BTreeMap<u16, usize>,
    syns_dropped: &'a mut u64,
}

impl phy::RxToken for NotingRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let (arrivals, syn_room, syns_dropped) = (self.arrivals, self.syn_room, self.syns_dropped);
        self.rx.consume(|frame| {
            if let Some(room) = new_connection_port(frame).and_then(|port| syn_room.get_mut(&port)) {
                if *room == 0 {
                    *syns_dropped += 1;
                    // smoltcp counts an empty frame as processed and does nothing with it.
                    return f(&[]);
                }
                *room -= 1;
            }
            arrivals.note(frame);
            f(frame)
        })
    }
}

/// The destination port of a TCP segment that opens a connection (SYN without ACK).
fn new_connection_port(frame: &[u8]) -> Option<u16> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    (tcp.syn() && !tcp.ack()).then(|| tcp.dst_port())
}

impl phy::Device for Noting<'_> {
    type RxToken<'b>
        = NotingRx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = <VirtioNet as phy::Device>::TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let (rx, tx) = self.dev.receive(timestamp)?;
        let rx = NotingRx { rx, arrivals: self.arrivals, syn_room: self.syn_room, syns_dropped: self.syns_dropped };
        Some((rx, tx))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.dev.transmit(timestamp)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.dev.capabilities()
    }
}

/// A socket the program closed. Linux resets a closed connection that had unread data or
/// receives more (RFC 1122 4.2.2.13): a peer that keeps sending to a server that gave up
/// on it (Redis after a protocol error) gets an error instead of a window that never
/// opens again. Here the reset waits until what the program wrote before closing is
/// acknowledged, so its last reply still arrives, as it does from Linux, which has
/// usually sent it by then.
struct Closing {
    handle: SocketHandle,
    reset: bool,
}

/// How long a closed connection may wait for its peer (Linux's `tcp_fin_timeout`).
const ORPHAN_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(60);

/// Discards what arrived on a closed socket; true if there was anything.
fn discard_unread(s: &mut tcp::Socket<'static>) -> bool {
    let mut any = false;
    while let Ok(n) = s.recv(|buf| (buf.len(), buf.len())) {
        if n == 0 {
            break;
        }
        any = true;
    }
    any
}

/// Heap a new socket leaves free for everything else (the socket set, epoll, the files):
/// sockets are what a storm of connections would exhaust it with.
const HEAP_HEADROOM: usize = 4 << 20;

/// A socket with its buffers, or none when the heap cannot hold them and keep
/// [`HEAP_HEADROOM`] (then a pool stays short, and connection attempts wait, rather than
/// the personality stopping for want of memory).
fn new_socket() -> Option<tcp::Socket<'static>> {
    let mut probe: Vec<u8> = Vec::new();
    probe.try_reserve_exact(HEAP_HEADROOM + 2 * SOCKBUF).ok()?;
    drop(probe);
    let buffer = || {
        let mut v = Vec::new();
        v.try_reserve_exact(SOCKBUF).ok()?;
        v.resize(SOCKBUF, 0);
        Some(tcp::SocketBuffer::new(v))
    };
    let mut socket = tcp::Socket::new(buffer()?, buffer()?);
    socket.set_nagle_enabled(false);
    Some(socket)
}

impl Net {
    pub fn new(mut dev: VirtioNet, config: IpConfig, seed: u64) -> Net {
        let iface = knet::interface(&mut dev, config, seed);
        Net {
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            config,
            closing: Vec::new(),
            arrivals: Arrivals::default(),
            pools: BTreeMap::new(),
            syns_dropped: 0,
        }
    }

    /// One round: receive, run TCP, transmit. True if anything happened.
    pub fn poll(&mut self) -> bool {
        self.dev.service();
        let frames = self.dev.stats().rx_frames;
        let mut syn_room: BTreeMap<u16, usize> = self
            .pools
            .iter()
            .map(|(&port, pool)| {
                let listening = pool
                    .sockets
                    .iter()
                    .filter(|&&h| self.sockets.get::<tcp::Socket>(h).state() == tcp::State::Listen)
                    .count();
                (port, listening)
            })
            .collect();
        let dropped_before = self.syns_dropped;
        let mut noting = Noting {
            dev: &mut self.dev,
            arrivals: &mut self.arrivals,
            syn_room: &mut syn_room,
            syns_dropped: &mut self.syns_dropped,
        };
        let changed = self.iface.poll(knet::now(), &mut noting, &mut self.sockets) == PollResult::SocketStateChanged;
        if dropped_before == 0 && self.syns_dropped > 0 {
            println!(
                "linux: a listen backlog is full: connection attempts wait until the program accepts (dropped; the client sends them again; shown once)"
            );
        }
        if self.arrivals.by_connection.len() > ARRIVALS_KEPT {
            self.forget_arrivals();
        }
        self.dev.flush();
        let sockets = &mut self.sockets;
        let mut reset_now = false;
        self.closing.retain_mut(|closing| {
            let s = sockets.get_mut::<tcp::Socket>(closing.handle);
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                // An abort's reset went out in the poll above.
                sockets.remove(closing.handle);
                return false;
            }
            closing.reset |= discard_unread(s);
            if closing.reset && s.send_queue() == 0 {
                s.abort();
                reset_now = true;
            }
            true
        });
        if reset_now {
            // Send the resets now rather than at the next event.
            self.iface.poll(knet::now(), &mut self.dev, &mut self.sockets);
            self.dev.flush();
        }
        let received = self.dev.stats().rx_frames != frames;
        if received {
            crate::vdso::input_arrived();
        }
        changed || received
    }

    /// Starts listening on `port` with a pool of `backlog` sockets (clamped).
    pub fn listen(&mut self, port: u16, backlog: usize) {
        let mut pool = Pool { sockets: Vec::new(), backlog: backlog.clamp(1, MAX_BACKLOG) };
        self.refill(port, &mut pool);
        self.pools.insert(port, pool);
    }

    /// Fills `pool` up to its backlog again, as far as memory allows.
    fn refill(&mut self, port: u16, pool: &mut Pool) {
        while pool.sockets.len() < pool.backlog {
            let Some(mut s) = new_socket() else { break };
            let _ = s.listen(port);
            pool.sockets.push(self.sockets.add(s));
        }
    }

    /// A connection from `port`'s pool, replaced by a fresh listening socket.
    pub fn accept(&mut self, port: u16) -> Option<SocketHandle> {
        let mut pool = self.pools.remove(&port)?;
        let mut got = None;
        for (i, &h) in pool.sockets.iter().enumerate() {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            match s.state() {
                tcp::State::Listen | tcp::State::SynReceived => continue,
                tcp::State::Closed | tcp::State::TimeWait => {
                    // A connection attempt that died before accept: listen again.
                    let _ = s.listen(port);
                    continue;
                }
                _ => {}
            }
            got = Some(pool.sockets.remove(i));
            break;
        }
        self.refill(port, &mut pool);
        self.pools.insert(port, pool);
        got
    }

    pub fn acceptable(&self, port: u16) -> bool {
        self.pools.get(&port).is_some_and(|pool| {
            pool.sockets.iter().any(|&h| {
                !matches!(
                    self.sockets.get::<tcp::Socket>(h).state(),
                    tcp::State::Listen | tcp::State::SynReceived | tcp::State::Closed | tcp::State::TimeWait
                )
            })
        })
    }

    /// A listening port's: that of its latest connection waiting for `accept`.
    pub fn listener_activity(&self, port: u16) -> Activity {
        let Some(pool) = self.pools.get(&port) else { return Activity::default() };
        pool.sockets
            .iter()
            .map(|&h| self.sockets.get::<tcp::Socket>(h))
            .filter(|s| !matches!(s.state(), tcp::State::Listen | tcp::State::Closed | tcp::State::TimeWait))
            .map(|s| self.arrivals.of(connection(s)))
            .fold(Activity::default(), Activity::latest)
    }

    /// Stops listening on `port`: its pool's sockets close, connections not yet accepted
    /// among them.
    pub fn close_listener(&mut self, port: u16) {
        if let Some(pool) = self.pools.remove(&port) {
            for h in pool.sockets {
                self.close(h);
            }
        }
    }

    /// When the connection's segments arrived, for epoll's order.
    pub fn activity(&self, h: SocketHandle) -> Activity {
        self.arrivals.of(connection(self.sockets.get::<tcp::Socket>(h)))
    }

    /// Keeps only the arrivals of connections that still have a socket.
    fn forget_arrivals(&mut self) {
        let live: BTreeSet<Connection> =
            self.sockets.iter().filter_map(|(_, s)| tcp::Socket::downcast(s).and_then(connection)).collect();
        self.arrivals.by_connection.retain(|c, _| live.contains(c));
    }

    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    pub fn close(&mut self, h: SocketHandle) {
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        let mut reset = false;
        if s.state() == tcp::State::Listen {
            s.abort();
        } else {
            reset = discard_unread(s);
            s.close();
            s.set_timeout(Some(ORPHAN_TIMEOUT));
        }
        self.closing.push(Closing { handle: h, reset });
    }
}
