//! `kvstore`: a Redis-protocol (RESP2) key-value server on TCP port 6379, persisting every
//! write to an append-only log on its virtio disk before acknowledging it.
//!
//! Devices come from the command line (`virtio_mmio.device=`): virtio-net is required,
//! virtio-blk makes the store durable (without it, data lives in memory only), virtio-rng
//! seeds smoltcp and the log id. The address is `ip=A.B.C.D/N` (and optional `gw=`).
//! Options: `kvstore.sockbuf=KiB` per-socket TCP receive and send buffers (default 64),
//! `kvstore.clients=N` connections at once (default: what a quarter of the heap holds, at
//! most 256), `kvstore.backlog=N` sockets kept listening (default: all of them). smoltcp has
//! no accept queue: a burst of connection attempts gets one listening socket each, and
//! attempts beyond the listening sockets of that round are refused with a RST.
//!
//! The server is one loop: poll smoltcp, read every socket, run every complete command
//! (writes update memory and join the log's open batch), commit the batch in one disk
//! write (group commit), then send the replies, flush the NIC's queues, and idle only when
//! nothing happened. See `log` for the disk format and `store` for the commands.
//!
//! An operator's shutdown request (SIGTERM to ftvm, `ftvm ctl PATH shutdown`: Ctrl+Alt+Del on
//! the keyboard, [`ftvm_guest_kit::shutdown`]) is seen at the top of the loop: every
//! acknowledged write is on the disk already (each batch is committed before its replies go
//! out), so kvstore commits what is open, says so and powers off.

#![no_std]
#![no_main]

extern crate alloc;

mod log;
mod resp;
mod store;

use alloc::vec;
use alloc::vec::Vec;

use ftvm_guest_kit::net::{self as knet, IpConfig};
use ftvm_guest_kit::virtio::net::VirtioNet;
use ftvm_guest_kit::virtio::{self, blk::VirtioBlk, rng::VirtioRng};
use ftvm_guest_kit::{cmdline, entry, mem, println, rtc, time};
use smoltcp::iface::{Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;

use crate::log::Log;
use crate::resp::Parsed;
use crate::store::{Flow, Journal, Store};

entry!(main);

const PORT: u16 = 6379;
/// Seed for smoltcp without a virtio-rng device: fixed, so TCP initial sequence numbers
/// are predictable then (the guest contract leaves no other entropy source).
const FIXED_SEED: u64 = 0x6b76_7374_6f72_6521;
/// Stop reading a connection's requests while this much reply is unsent (flow control,
/// like Redis's client output buffer).
const OUTPUT_HIGH_WATER: usize = 1 << 20;
/// A connection whose unparsed input grows past this is dropped.
const MAX_INPUT: usize = resp::MAX_BULK + (1 << 20);

fn main() {
    let devices = virtio::init_devices();
    let Some(mut net) = devices.net else {
        println!("kvstore: no virtio-net device on the command line (virtio_mmio.device=...); nothing to serve");
        return;
    };
    let ip = match IpConfig::from_cmdline() {
        Ok(ip) => ip,
        Err(error) => {
            println!("kvstore: {error}");
            return;
        }
    };
    let mut rng = devices.rng;
    let seed = match rng.as_mut() {
        Some(rng) => rng.u64(),
        None => {
            println!("kvstore: no virtio-rng device: fixed smoltcp seed (predictable TCP sequence numbers)");
            FIXED_SEED
        }
    };
    let mut store = Store::default();
    store.rdtsc = cmdline::param_u64_or("kvstore.rdtsc", 0) != 0;
    if store.rdtsc && cfg!(feature = "rdtsc") {
        println!("kvstore: kvstore.rdtsc=1: PING reads the TSC in ring 3 (breaks the determinism contract)");
    } else if store.rdtsc {
        println!("kvstore: kvstore.rdtsc=1 needs the rdtsc build (kvstore-rdtsc.elf); ignored");
    }
    let mut journal = open_journal(devices.blk, rng.as_mut(), &mut store);
    ftvm_guest_kit::shutdown::enable();

    let sockbuf = (cmdline::param_u64_or("kvstore.sockbuf", 64).clamp(4, 4096) as usize) << 10;
    // By default, connections may take a quarter of the heap in socket buffers.
    let fit = (mem::heap_bytes() as usize / 4 / (2 * sockbuf)).clamp(4, 256);
    let clients = cmdline::param_u64_or("kvstore.clients", fit as u64).clamp(1, 4096) as usize;
    let backlog = cmdline::param_u64_or("kvstore.backlog", clients as u64).clamp(1, clients as u64) as usize;
    let mut iface = knet::interface(&mut net, ip, seed);
    let mut server = Server::new(clients, backlog, sockbuf);
    println!(
        "kvstore: listening on {}:{PORT} (up to {clients} connections, {backlog} listening, {} KiB socket buffers)",
        ip.address.address(),
        sockbuf >> 10
    );
    server.run(&mut iface, &mut net, &mut store, &mut journal);
}

/// Opens (or formats) the log and replays it into `store`; memory-only without a disk.
fn open_journal(blk: Option<VirtioBlk>, rng: Option<&mut VirtioRng>, store: &mut Store) -> Journal {
    let Some(blk) = blk else {
        println!("kvstore: no virtio-blk device: data is kept in memory only (not durable)");
        return Journal::Memory;
    };
    // A fresh log's id: random where possible; else the RTC time and tick count.
    let new_id = match rng {
        Some(rng) => rng.u64(),
        None => {
            let now = rtc::read().map_or(0, |t| u64::from(t.seconds_of_day()) << 32 | u64::from(t.year) << 16);
            ftvm_guest_kit::digest::mix64(now ^ time::ticks())
        }
    };
    let start = time::ticks();
    match Log::open(blk, new_id, |change| store.apply(change)) {
        Ok((log, recovery)) => {
            if recovery.formatted {
                println!("kvstore: formatted a blank disk as a new log");
            }
            println!(
                "kvstore: recovered {} keys from {} log records ({} batches, {} KiB of log, {} ms)",
                store.len(),
                recovery.records,
                recovery.batches,
                recovery.end >> 10,
                time::ticks_to_ms(time::ticks() - start)
            );
            if log.read_only() {
                println!("kvstore: the disk is read-only: writes will be refused");
            }
            Journal::Disk(alloc::boxed::Box::new(log))
        }
        Err(error) => {
            println!("kvstore: disk: {error}");
            println!("kvstore: stopping rather than serve without the data on the disk");
            ftvm_guest_kit::power::power_off();
        }
    }
}

/// The operator asked to shut down: commit what is open and power off.
fn shut_down(journal: &mut Journal) -> ! {
    if let Journal::Disk(log) = journal {
        if let Err(error) = log.commit() {
            println!("kvstore: shutdown: the last log write failed ({error})");
        }
    }
    println!("kvstore: shutdown requested; every acknowledged write is on the disk; powering off");
    ftvm_guest_kit::power::power_off()
}

/// One client connection's buffers (tied to one smoltcp socket).
#[derive(Default)]
struct Conn {
    /// Received bytes not yet parsed into commands.
    input: Vec<u8>,
    /// Replies, `sent` bytes of which smoltcp has taken.
    output: Vec<u8>,
    sent: usize,
    /// The socket carries a connection we have seen.
    open: bool,
    /// Close once the replies are out (QUIT, protocol error).
    closing: bool,
}

impl Conn {
    fn reset(&mut self) {
        self.input = Vec::new();
        self.output = Vec::new();
        self.sent = 0;
        self.open = false;
        self.closing = false;
    }

    fn unsent(&self) -> usize {
        self.output.len() - self.sent
    }
}

struct Server {
    sockets: SocketSet<'static>,
    conns: Vec<(SocketHandle, Conn)>,
    /// Most sockets at once, sockets kept listening, and each one's buffer size.
    max_sockets: usize,
    backlog: usize,
    sockbuf: usize,
    /// Argument ranges of the command being run (reused).
    args: Vec<(usize, usize)>,
}

impl Server {
    fn new(max_sockets: usize, backlog: usize, sockbuf: usize) -> Server {
        let mut server = Server {
            sockets: SocketSet::new(Vec::new()),
            conns: Vec::new(),
            max_sockets,
            backlog,
            sockbuf,
            args: Vec::new(),
        };
        server.rearm();
        server
    }

    /// Keeps `backlog` sockets listening, as sockets (each with its buffers) can be had:
    /// smoltcp has no accept queue, so every connection attempt in a burst needs a
    /// listening socket of its own, and a closed one comes back only a round later.
    /// Sockets beyond the backlog are freed when their connection ends.
    fn rearm(&mut self) {
        let mut listening = 0;
        let sockets = &mut self.sockets;
        self.conns.retain_mut(|(handle, conn)| {
            let socket = sockets.get_mut::<tcp::Socket>(*handle);
            match socket.state() {
                tcp::State::Listen => {
                    if conn.open {
                        // A half-open connection was reset back to listening.
                        conn.reset();
                    }
                    listening += 1;
                    true
                }
                tcp::State::Closed | tcp::State::TimeWait => {
                    conn.reset();
                    if listening < self.backlog {
                        // Cannot fail: the socket is closed.
                        let _ = socket.listen(PORT);
                        listening += 1;
                        true
                    } else {
                        sockets.remove(*handle);
                        false
                    }
                }
                _ => true,
            }
        });
        while listening < self.backlog && self.conns.len() < self.max_sockets {
            let rx = tcp::SocketBuffer::new(vec![0; self.sockbuf]);
            let tx = tcp::SocketBuffer::new(vec![0; self.sockbuf]);
            let mut socket = tcp::Socket::new(rx, tx);
            // Replies go out as soon as they are ready, like Redis's TCP_NODELAY.
            socket.set_nagle_enabled(false);
            let _ = socket.listen(PORT);
            self.conns.push((self.sockets.add(socket), Conn::default()));
            listening += 1;
        }
    }

    fn run(&mut self, iface: &mut Interface, net: &mut VirtioNet, store: &mut Store, journal: &mut Journal) -> ! {
        loop {
            if ftvm_guest_kit::shutdown::requested() {
                shut_down(journal);
            }
            net.service();
            let frames = net.stats().rx_frames;
            let changed = iface.poll(knet::now(), net, &mut self.sockets) == PollResult::SocketStateChanged;
            let mut busy = changed || net.stats().rx_frames != frames;
            busy |= self.read_and_execute(store, journal);
            if let Journal::Disk(log) = journal {
                if log.dirty() {
                    if let Err(error) = log.commit() {
                        // Memory already holds the batch, the disk may not: acknowledging
                        // nothing more is the only honest way out.
                        println!("kvstore: log write failed ({error}); stopping");
                        ftvm_guest_kit::power::power_off();
                    }
                }
            }
            busy |= self.send();
            iface.poll(knet::now(), net, &mut self.sockets);
            net.flush();
            store.net = net.stats();
            if !busy && !net.rx_ready() {
                time::idle();
            }
        }
    }

    /// Reads every connection and runs its complete commands. Returns whether anything
    /// was read or run.
    fn read_and_execute(&mut self, store: &mut Store, journal: &mut Journal) -> bool {
        self.rearm();
        let mut busy = false;
        for (handle, conn) in &mut self.conns {
            let socket = self.sockets.get_mut::<tcp::Socket>(*handle);
            if !socket.is_active() {
                continue;
            }
            conn.open = true;
            while conn.unsent() < OUTPUT_HIGH_WATER && !conn.closing && socket.can_recv() {
                let input = &mut conn.input;
                let got = socket.recv(|bytes| {
                    input.extend_from_slice(bytes);
                    (bytes.len(), bytes.len())
                });
                if !matches!(got, Ok(n) if n > 0) {
                    break;
                }
                busy = true;
                if conn.input.len() > MAX_INPUT {
                    resp::error(&mut conn.output, "ERR Protocol error: request too large");
                    conn.closing = true;
                }
            }
            busy |= execute_commands(conn, &mut self.args, store, journal);
        }
        busy
    }

    /// Hands replies to smoltcp and closes connections that are done. Returns whether any
    /// bytes moved.
    fn send(&mut self) -> bool {
        let mut busy = false;
        for (handle, conn) in &mut self.conns {
            if !conn.open {
                continue;
            }
            let socket = self.sockets.get_mut::<tcp::Socket>(*handle);
            if conn.unsent() > 0 && socket.can_send() {
                if let Ok(n) = socket.send_slice(&conn.output[conn.sent..]) {
                    conn.sent += n;
                    busy |= n > 0;
                }
                if conn.unsent() == 0 {
                    conn.output.clear();
                    conn.sent = 0;
                    // Keep a modest buffer, not the largest reply ever sent.
                    if conn.output.capacity() > OUTPUT_HIGH_WATER {
                        conn.output = Vec::new();
                    }
                }
            }
            // Close once the replies are out: after QUIT or an error, or when the client
            // has finished sending (half-close) and nothing is left to answer.
            let peer_done = socket.state() == tcp::State::CloseWait && !socket.can_recv();
            if conn.unsent() == 0 && (conn.closing || peer_done) && socket.is_active() {
                socket.close();
            }
        }
        busy
    }
}

/// Runs the complete commands at the front of `conn.input`; stops early while too much
/// reply is unsent. Returns whether it ran anything.
fn execute_commands(conn: &mut Conn, args: &mut Vec<(usize, usize)>, store: &mut Store, journal: &mut Journal) -> bool {
    let mut pos = 0;
    let mut ran = false;
    let mut argv: Vec<&[u8]> = Vec::new();
    while !conn.closing && conn.unsent() < OUTPUT_HIGH_WATER {
        match resp::parse(&conn.input[pos..], args) {
            Parsed::Incomplete => break,
            Parsed::Empty(used) => pos += used,
            Parsed::Error(message) => {
                resp::error(&mut conn.output, &alloc::format!("ERR {message}"));
                conn.closing = true;
            }
            Parsed::Command(used) => {
                argv.clear();
                argv.extend(args.iter().map(|&(start, end)| &conn.input[pos + start..pos + end]));
                if store.execute(&argv, journal, &mut conn.output) == Flow::Close {
                    conn.closing = true;
                }
                pos += used;
                ran = true;
            }
        }
    }
    if pos > 0 {
        conn.input.drain(..pos);
    }
    ran
}
