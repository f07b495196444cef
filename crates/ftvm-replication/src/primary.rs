//! The primary's side of the pair: stream the log, collect acknowledgements, hold each output
//! until the backup has the log up to it, perform it, report OUTPUT_DONE; notice a lost backup.
//!
//! A link is made in two steps so that a live state transfer can use it: [`Primary::new`]
//! gives the gate the vCPU hands outputs to (at the transfer's cut), [`Primary::start`]
//! starts streaming once the state has been sent. Until the backup has caught up, the link
//! is *catching up*: outputs are performed at once (the VM is not protected yet) and the
//! backup may not go live. Its first acknowledgement turns holding on; once it has
//! acknowledged the log past every output performed without holding, the link is protected
//! and its heartbeats say so.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_events::{OutputGate, OutputSinks, OutputTarget, OutputTicket};
use ftvm_log::{LogHeader, LogWriter};
use ftvm_sync::lock;

use crate::arbiter::{Arbiter, ArbiterSpec};
use crate::link::{self, Connection, Heartbeats, Mode};
use crate::protocol::{Ack, Heartbeat, Role, ACK_RESYNC, FLAG_HANDOVER, FLAG_PROTECTED};
use crate::secure::{Key, SecureWriter};
use crate::stages::{self, StageBook};
use crate::{io, Error, Result, HEARTBEAT_INTERVAL};

/// The log writer a primary's recorder streams into.
pub type StreamWriter = LogWriter<Box<dyn Write + Send>>;

/// The output sinks of a VM, shared by its successive links (a re-protection makes a new one).
pub type SharedSinks = Arc<Mutex<Box<dyn OutputSinks>>>;

#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub backup: SocketAddr,
    pub arbiter: ArbiterSpec,
    pub timeout: Duration,
    /// How long to wait for the backup to be listening.
    pub connect_wait: Duration,
    pub key: Key,
    /// Slow the vCPU down when the backup's replay lags by more than this (`None`: never).
    pub max_lag: Option<Duration>,
}

/// How a link behaves (from [`PrimaryConfig`]).
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub timeout: Duration,
    pub max_lag: Option<Duration>,
    /// A pair formed at boot is protected from the first output; a state transfer's link
    /// catches up first.
    pub protected_from_start: bool,
}

/// The upper bounds of the output hold-time histogram, in µs (50 µs to 1 s).
pub const HOLD_BUCKETS_US: [u64; 15] =
    [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000];

/// Figures about the pair, shared with whoever reports status.
#[derive(Debug, Default)]
pub struct PairStats {
    pub acked_lsn: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub outputs_done: AtomicU64,
    /// Outputs submitted so far (held = this minus `outputs_done`).
    pub held: AtomicU64,
    /// The VM is ending (END logged): the backup leaving is expected, not a loss.
    pub ending: AtomicBool,
    /// Switchover: heartbeats now say "take over".
    pub handing_over: AtomicBool,
    pub backup_lost: AtomicBool,
    /// Outputs wait for acknowledgements (false while a new backup catches up).
    pub holding: AtomicBool,
    /// The backup may go live if this primary dies.
    pub protected: AtomicBool,
    /// The backup's heartbeats say it knows it is protected (it would go live now).
    pub confirmed: AtomicBool,
    /// The backup's replay position (from its heartbeats) and the lag it means.
    pub replayed_lsn: AtomicU64,
    pub lag_ms: AtomicU64,
    /// Time the vCPU was held back for the lag bound, in microseconds.
    pub throttled_us: AtomicU64,
    /// Outputs performed after being held for an acknowledgement, and their total time held
    /// (from submission to performance), in microseconds: the latency the pair adds.
    pub held_outputs: AtomicU64,
    pub hold_us: AtomicU64,
    /// The same outputs by time held: `hold_buckets[i]` counts those held at most
    /// `HOLD_BUCKETS_US[i]` (and more than the bound before); the last, those held longer.
    pub hold_buckets: [AtomicU64; HOLD_BUCKETS_US.len() + 1],
    /// The backup asked for a resync (it diverged).
    pub resync_requested: AtomicBool,
    pub resync_reason: Mutex<Option<String>>,
    /// Where the hold goes: the held outputs' stages (see [`crate::stages`]).
    pub stages: Mutex<StageBook>,
}

/// Called (from a link thread) when the backup asks for a resync, with its reason.
pub type ResyncHandler = Box<dyn Fn(String) + Send + Sync>;

struct Shared {
    stats: Arc<PairStats>,
    opts: LinkOptions,
    stop: AtomicBool,
    /// Outputs held until the backup has the log up to them, in log order, and the LSN of
    /// the last output performed while not holding.
    held: Mutex<Queue>,
    /// Whoever holds this performs released outputs. Taken with `try_lock`: a thread that
    /// finds it taken leaves the work to the holder, which looks again before it lets go.
    performer: Mutex<()>,
    sinks: SharedSinks,
    heartbeats: Arc<Heartbeats>,
    arbiter: Arc<Arbiter>,
    on_resync: Mutex<Option<ResyncHandler>>,
    /// The acknowledgements' reader (non-blocking), once the link has started: read by the
    /// acknowledgement thread when the socket has something, and by the vCPU between exits
    /// while outputs wait, whichever comes first (the vCPU is running; the thread must be
    /// woken and scheduled first).
    acks: Mutex<Option<AckReader>>,
}

struct AckReader {
    reader: Box<dyn Read + Send>,
    /// The vCPU read a resync request's marker: the acknowledgement thread reads the rest
    /// and acts on it (the handler must not run on the vCPU).
    resync_seen: bool,
}

/// What reading the acknowledgements that are there found.
enum AckPoll {
    /// All taken; the socket has no more for now.
    Drained,
    /// The backup asks for a resync.
    Resync,
    /// The connection ended or failed.
    Closed,
}

/// Takes every acknowledgement the socket has now, without waiting.
fn take_acks(s: &Shared, a: &mut AckReader) -> AckPoll {
    if a.resync_seen {
        return AckPoll::Resync;
    }
    let mut b = [0u8; 8];
    loop {
        match a.reader.read_exact(&mut b) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {
                return AckPoll::Drained
            }
            Err(_) => return AckPoll::Closed,
        }
        let at = if stages::enabled() { stages::now_ns() } else { 0 };
        let lsn = u64::from_le_bytes(b);
        if lsn == ACK_RESYNC {
            a.resync_seen = true;
            return AckPoll::Resync;
        }
        // The rest of an acknowledgement is in the frame just opened: no waiting.
        let mut rest = [0u8; 8];
        if a.reader.read_exact(&mut rest).is_err() {
            return AckPoll::Closed;
        }
        let ack = Ack::decode(lsn, &rest);
        if at > 0 {
            lock(&s.stats.stages).acknowledged(lsn, at, ack.verify_ns, ack.ack_ns);
        }
        s.stats.acked_lsn.fetch_max(lsn, Ordering::SeqCst);
        acknowledged(s);
    }
}

/// Waits (up to `timeout`) until `fd` has something to read or is closed.
fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: `p` is one valid pollfd for the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
}

#[derive(Default)]
struct Queue {
    outputs: VecDeque<Held>,
    unheld_lsn: u64,
}

/// A primary link. Dropping it stops its threads.
pub struct Primary {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct Held {
    since: Instant,
    /// For the stages: `since` in [`stages::now_ns`], and the flush that sends it.
    since_ns: u64,
    flush: u64,
    lsn: Option<u64>,
    ordinal: u64,
    target: OutputTarget,
    bytes: Vec<u8>,
}

/// The log's way out to the backup. Each flush of the log writer (the vCPU's, once per exit
/// that produced outputs) is sealed and sent by the flushing thread itself when the socket
/// takes it at once: the outputs it holds then wait for the round trip to the backup only,
/// not for a sender thread to be scheduled first. What the socket cannot take without
/// waiting (a slow backup, a full send buffer), and whatever is flushed before the link
/// starts or while such a backlog lasts, goes in order to the sender thread, which may block.
/// The vCPU never waits for the backup.
struct Outbox {
    inner: Mutex<OutboxInner>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct OutboxInner {
    /// The channel's sending half and the link's figures (sent bytes; a lost backup is sent
    /// nothing more), once the link has started.
    link: Option<(SecureWriter, Arc<PairStats>)>,
    /// In order: log bytes not sealed yet, and sealed bytes not sent yet.
    backlog: VecDeque<Chunk>,
    /// The sender thread is writing a chunk it took off the backlog (the next bytes must
    /// wait for it).
    sending: bool,
    /// The direct send failed: the sender thread reports the lost link.
    failed: bool,
    /// The log writer is gone: the sender thread ends once the backlog is out.
    closed: bool,
}

/// Each with its flush's number and, sealed, when it was sealed (for the stages).
enum Chunk {
    Log(Vec<u8>, Option<u64>),
    Wire(Vec<u8>, Option<(u64, u64)>),
}

impl Outbox {
    fn push(&self, bytes: Vec<u8>) {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let mut seq = None;
        if let Some((link, stats)) = inner.link.as_mut() {
            if stats.backup_lost.load(Ordering::Relaxed) {
                return;
            }
            if stages::enabled() {
                seq = Some(lock(&stats.stages).begin_flush());
            }
            if inner.backlog.is_empty() && !inner.sending && !inner.failed {
                let sealed = link.seal(&bytes);
                let sealed_at = seq.map(|s| (s, stages::now_ns()));
                match sealed.and_then(|wire| send_now(link.stream(), &wire).map(|n| (wire, n))) {
                    Ok((wire, n)) => {
                        stats.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        if n == wire.len() {
                            if let Some((seq, at)) = sealed_at {
                                lock(&stats.stages).flushed(seq, at, stages::now_ns());
                            }
                            return;
                        }
                        inner.backlog.push_back(Chunk::Wire(wire[n..].to_vec(), sealed_at));
                    }
                    Err(_) => inner.failed = true,
                }
                self.wake.notify_one();
                return;
            }
        }
        inner.backlog.push_back(Chunk::Log(bytes, seq));
        self.wake.notify_one();
    }

    /// Log bytes queued before the link started (the boot handshake sends the header).
    fn take_queued(&self) -> Vec<u8> {
        let mut inner = lock(&self.inner);
        let mut out = Vec::new();
        while let Some(Chunk::Log(b, _)) = inner.backlog.front() {
            out.extend_from_slice(b);
            inner.backlog.pop_front();
        }
        out
    }

    fn close(&self) {
        lock(&self.inner).closed = true;
        self.wake.notify_one();
    }
}

/// `send(2)` without waiting: the bytes the socket took (0 if its buffer is full).
fn send_now(stream: &std::net::TcpStream, bytes: &[u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `bytes` is valid for `bytes.len()` bytes for the call; the fd belongs to
    // `stream`, which outlives it.
    let n = unsafe {
        libc::send(stream.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if n >= 0 {
        return Ok(n as usize);
    }
    match std::io::Error::last_os_error() {
        e if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => Ok(0),
        e => Err(e),
    }
}

/// Log bytes queued for a link that has not started yet (see [`log_channel`]).
pub struct LogQueue(Arc<Outbox>);

/// The log writer's end of the outbox: never blocks and never fails (a lost backup just
/// stops receiving).
struct OutboxWriter {
    buf: Vec<u8>,
    outbox: Arc<Outbox>,
}

impl Write for OutboxWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.outbox.push(std::mem::take(&mut self.buf));
        }
        Ok(())
    }
}

impl Drop for OutboxWriter {
    fn drop(&mut self) {
        let _ = self.flush();
        self.outbox.close();
    }
}

/// A log writer whose bytes queue for a link that starts later ([`Primary::start`]).
/// How long a preflight waits for the backup's answer (a paired backup gives none).
const PROBE_ANSWER_WAIT: Duration = Duration::from_secs(10);

pub fn log_channel(header: &LogHeader) -> Result<(StreamWriter, LogQueue)> {
    let outbox = Arc::new(Outbox { inner: Mutex::new(OutboxInner::default()), wake: std::sync::Condvar::new() });
    let writer: Box<dyn Write + Send> = Box::new(OutboxWriter { buf: Vec::new(), outbox: outbox.clone() });
    let mut log = LogWriter::new(writer, header).map_err(|source| Error::Log { what: "log", source })?;
    log.flush().map_err(|source| Error::Log { what: "log", source })?;
    Ok((log, LogQueue(outbox)))
}

/// The sender thread: writes what the outbox could not send directly, in order, until the
/// log writer is gone (`Ok`), the link stops, or a send fails (`Err`: the link is lost).
fn sender_loop(
    outbox: &Outbox,
    mut stream: std::net::TcpStream,
    stats: &PairStats,
    stop: &AtomicBool,
) -> std::result::Result<(), ()> {
    loop {
        let wire = {
            let mut inner = lock(&outbox.inner);
            let chunk = loop {
                if inner.failed {
                    return Err(());
                }
                if let Some(chunk) = inner.backlog.pop_front() {
                    break chunk;
                }
                if inner.closed || stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                inner = outbox
                    .wake
                    .wait_timeout(inner, HEARTBEAT_INTERVAL)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            };
            // Taken off the backlog and marked in one step: the next bytes wait for these.
            inner.sending = true;
            match chunk {
                Chunk::Wire(w, sealed) => (Ok(w), sealed),
                Chunk::Log(b, seq) => {
                    let wire = inner.link.as_mut().expect("started").0.seal(&b);
                    (wire, seq.map(|s| (s, stages::now_ns())))
                }
            }
        };
        let (wire, sealed) = wire;
        let lost = stats.backup_lost.load(Ordering::Relaxed);
        let sent = wire.and_then(|w| if lost { Ok(0) } else { stream.write_all(&w).map(|_| w.len()) });
        if let (Ok(_), Some((seq, at))) = (&sent, sealed) {
            lock(&stats.stages).flushed(seq, at, stages::now_ns());
        }
        let mut inner = lock(&outbox.inner);
        inner.sending = false;
        match sent {
            Ok(n) => {
                stats.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => inner.failed = true,
        }
    }
}

impl Primary {
    /// `ftvm primary`: takes the arbiter, connects to the backup, sends the log header and
    /// waits for the backup to accept it. Returns the started link and the log writer the
    /// recorder streams into.
    pub fn boot(
        cfg: &PrimaryConfig,
        header: &LogHeader,
        sinks: SharedSinks,
    ) -> Result<(Primary, StreamWriter, Arc<PairStats>)> {
        let arbiter = Arbiter::acquire(&cfg.arbiter, Duration::ZERO)?.ok_or_else(|| Error::Arbiter {
            path: cfg.arbiter.to_string(),
            why: "held by someone else: another live copy of this VM runs".into(),
        })?;
        // A lease lost later halts this side at once: the backup may be live by then.
        arbiter.on_lost(Box::new(|why| crate::halt(&format!("the arbiter was lost ({why})"))));
        let arbiter = Arc::new(arbiter);
        let mut conn = Connection::connect(cfg.backup, &cfg.key, cfg.connect_wait, Mode::Boot)?;
        let (log, queue) = log_channel(header)?;
        // The header goes out before the handshake reply can come back.
        let first = queue.0.take_queued();
        conn.writer.write_all(&first).and_then(|_| conn.writer.flush()).map_err(io("sending the log header"))?;
        if let Err(why) = link::read_answer(&mut *conn.reader)? {
            return Err(Error::Handshake(format!("the backup refused the pair:\n{why}")));
        }
        let opts = LinkOptions { timeout: cfg.timeout, max_lag: cfg.max_lag, protected_from_start: true };
        let mut primary = Primary::new(conn.heartbeats.clone(), sinks, arbiter, opts);
        let stats = primary.stats();
        stats.sent_bytes.fetch_add(first.len() as u64, Ordering::Relaxed);
        primary.start(conn, queue)?;
        Ok((primary, log, stats))
    }

    /// How long a preflight waits for the backup's answer.
    pub const PROBE_WAIT: Duration = PROBE_ANSWER_WAIT;

    /// A preflight against the backup at `cfg.backup`: authenticates with the key, sends
    /// `header` and returns how the backup's VM differs from it (empty: they agree), without
    /// taking the arbiter or pairing; the backup goes on waiting for its primary.
    pub fn probe(cfg: &PrimaryConfig, header: &LogHeader) -> Result<Vec<String>> {
        let mut conn = Connection::connect(cfg.backup, &cfg.key, cfg.connect_wait, Mode::Probe)?;
        // A backup that is paired already answers no preflight.
        conn.shutdown_handle()?.set_read_timeout(Some(PROBE_ANSWER_WAIT)).map_err(io("socket"))?;
        let (_log, queue) = log_channel(header)?;
        let first = queue.0.take_queued();
        conn.writer.write_all(&first).and_then(|_| conn.writer.flush()).map_err(io("sending the log header"))?;
        let answer = link::read_answer(&mut *conn.reader)?;
        conn.shutdown();
        Ok(match answer {
            Ok(()) => Vec::new(),
            Err(why) => why.lines().map(str::to_string).collect(),
        })
    }

    /// A link whose gate takes outputs from now on; nothing is sent until [`Self::start`].
    pub fn new(heartbeats: Arc<Heartbeats>, sinks: SharedSinks, arbiter: Arc<Arbiter>, opts: LinkOptions) -> Primary {
        let stats = Arc::new(PairStats::default());
        stats.holding.store(opts.protected_from_start, Ordering::SeqCst);
        stats.protected.store(opts.protected_from_start, Ordering::SeqCst);
        stats.confirmed.store(opts.protected_from_start, Ordering::SeqCst);
        let shared = Arc::new(Shared {
            stats,
            opts,
            stop: AtomicBool::new(false),
            held: Mutex::new(Queue::default()),
            performer: Mutex::new(()),
            sinks,
            heartbeats,
            arbiter,
            on_resync: Mutex::new(None),
            acks: Mutex::new(None),
        });
        Primary { shared, threads: Vec::new() }
    }

    pub fn stats(&self) -> Arc<PairStats> {
        self.shared.stats.clone()
    }

    pub fn arbiter(&self) -> Arc<Arbiter> {
        self.shared.arbiter.clone()
    }

    pub fn sinks(&self) -> SharedSinks {
        self.shared.sinks.clone()
    }

    /// What to do when the backup asks for a resync.
    pub fn on_resync(&self, handler: ResyncHandler) {
        *lock(&self.shared.on_resync) = Some(handler);
    }

    /// Streams the log from `log` (whatever was queued since [`log_channel`] first) and
    /// starts the acknowledgement and heartbeat threads.
    pub fn start(&mut self, conn: Connection, log: LogQueue) -> Result<()> {
        let shutdown = conn.shutdown_handle()?;
        let stream = conn.shutdown_handle()?;
        let protected = self.shared.opts.protected_from_start;
        tracing::info!(
            target: "ftvm::event",
            event = "paired",
            peer = %conn.peer,
            protected,
            "paired with backup {}; streaming the log{}",
            conn.peer,
            if protected { " (protected from the start)" } else { " (it catches up before it protects)" }
        );
        let Connection { mut reader, writer, heartbeats, nonblocking, .. } = conn;
        // Sender: the log bytes the vCPU could not send itself.
        {
            let outbox = log.0;
            lock(&outbox.inner).link = Some((writer, self.shared.stats.clone()));
            let s = self.shared.clone();
            self.threads.push(spawn("ftvm-log-send", move || {
                ftvm_seccomp::enter(ftvm_seccomp::Thread::Stream);
                if sender_loop(&outbox, stream, &s.stats, &s.stop).is_err() {
                    lose(&s, "the log connection failed");
                }
            })?);
        }
        // Acknowledgements: cumulative LSNs (or a resync request).
        {
            let s = self.shared.clone();
            self.threads.push(spawn("ftvm-acks", move || {
                crate::link_nice();
                // The API's filter: a resync request starts the state transfer from here.
                ftvm_seccomp::enter(ftvm_seccomp::Thread::Api);
                // After a state transfer, the backup answers the log's header first (at boot
                // that answer came before the link started).
                if !s.opts.protected_from_start {
                    match link::read_answer(&mut *reader) {
                        Ok(Ok(())) => {}
                        Ok(Err(why)) => return lose(&s, &format!("the backup refused the log: {why}")),
                        Err(e) => return lose(&s, &e.to_string()),
                    }
                }
                use std::os::fd::AsRawFd;
                let fd = shutdown.as_raw_fd();
                nonblocking.store(true, Ordering::SeqCst);
                *lock(&s.acks) = Some(AckReader { reader, resync_seen: false });
                while !s.stop.load(Ordering::Relaxed) {
                    wait_readable(fd, Duration::from_millis(20));
                    let polled = match lock(&s.acks).as_mut() {
                        Some(a) => take_acks(&s, a),
                        None => AckPoll::Closed,
                    };
                    match polled {
                        AckPoll::Drained => {}
                        AckPoll::Resync => {
                            let taken = lock(&s.acks).take();
                            let why = taken
                                .and_then(|mut a| {
                                    nonblocking.store(false, Ordering::SeqCst);
                                    link::read_blob(&mut *a.reader, 1 << 16).ok()
                                })
                                .map(|b| String::from_utf8_lossy(&b).into_owned())
                                .unwrap_or_else(|| "no reason given".into());
                            resync_requested(&s, why);
                            let _ = shutdown.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        AckPoll::Closed => break,
                    }
                    // The outputs these acknowledgements cover go out from here at once.
                    release(&s, By::Thread);
                }
                lock(&s.acks).take();
                if !s.stop.load(Ordering::Relaxed) {
                    lose(&s, "the backup closed the log connection");
                }
            })?);
        }
        // Heartbeats, both ways, on their own UDP socket.
        {
            let s = self.shared.clone();
            self.threads.push(spawn("ftvm-heartbeat", move || {
                ftvm_seccomp::enter(ftvm_seccomp::Thread::Link);
                heartbeat_loop(&s, &heartbeats)
            })?);
        }
        Ok(())
    }

    /// The gate the vCPU loop hands outputs to.
    pub fn gate(&self) -> Box<dyn OutputGate> {
        Box::new(PrimaryGate { shared: self.shared.clone(), submitted: 0, samples: VecDeque::new() })
    }
}

fn heartbeat_loop(s: &Shared, heartbeats: &Heartbeats) {
    let mut last_seen = Instant::now();
    let mut next_send = Instant::now();
    let mut seq = 0;
    while !s.stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_send {
            seq += 1;
            let handing_over = s.stats.handing_over.load(Ordering::SeqCst);
            let mut flags = 0;
            if s.stats.protected.load(Ordering::SeqCst) {
                flags |= FLAG_PROTECTED;
            }
            if handing_over {
                flags |= FLAG_HANDOVER;
            }
            heartbeats.send(&Heartbeat {
                role: Role::Primary,
                flags,
                seq,
                outputs_done: s.stats.outputs_done.load(Ordering::Relaxed),
                lsn: 0,
                replayed: 0,
            });
            next_send = Instant::now() + if handing_over { HEARTBEAT_INTERVAL / 5 } else { HEARTBEAT_INTERVAL };
        }
        if let Some(h) = heartbeats.recv().filter(|h| h.role == Role::Backup) {
            last_seen = Instant::now();
            s.stats.replayed_lsn.fetch_max(h.replayed, Ordering::SeqCst);
            if h.flags & FLAG_PROTECTED != 0 {
                s.stats.confirmed.store(true, Ordering::SeqCst);
            }
        }
        if last_seen.elapsed() > s.opts.timeout {
            lose(s, &format!("no heartbeat from the backup for {} ms", s.opts.timeout.as_millis()));
        }
        // A safety net: outputs whose acknowledgement came before they were handed over (a
        // fast backup) go out at the latest here.
        release(s, By::Thread);
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.stats.backup_lost.store(true, Ordering::SeqCst);
        // What is still held goes out (the guest's last words after its END, say).
        release(&self.shared, By::Thread);
        // The sender and ack threads end with their channel and socket; don't wait for them.
        self.threads.clear();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(f).map_err(io(format!("cannot start thread {name}")))
}

fn lose(s: &Shared, why: &str) {
    if s.stats.ending.load(Ordering::SeqCst) || s.stop.load(Ordering::SeqCst) {
        // The run ended with END (the backup stops too), or this link was replaced.
        s.stats.backup_lost.store(true, Ordering::SeqCst);
    } else if !s.stats.backup_lost.swap(true, Ordering::SeqCst) {
        s.stats.protected.store(false, Ordering::SeqCst);
        if !s.stats.resync_requested.load(Ordering::SeqCst) {
            tracing::warn!(
                target: "ftvm::event",
                event = "backup_lost",
                why,
                arbiter = %s.arbiter.spec(),
                "backup lost ({why}); continuing UNPROTECTED (this primary holds the arbiter {})",
                s.arbiter.spec()
            );
        }
    }
    // Unprotected (or ending): every held output goes out now.
    release(s, By::Thread);
}

fn resync_requested(s: &Shared, why: String) {
    s.stats.resync_requested.store(true, Ordering::SeqCst);
    *lock(&s.stats.resync_reason) = Some(why.clone());
    tracing::warn!(
        target: "ftvm::event",
        event = "resync_requested",
        why = %why,
        "the backup diverged and asks for a resync ({why}); unprotected until it is resynced"
    );
    lose(s, "resync");
    if let Some(handler) = lock(&s.on_resync).as_ref() {
        handler(why);
    }
}

/// An acknowledgement arrived: a catching-up link starts holding outputs at the first one,
/// and is protected once the backup has the log past every output performed unheld.
fn acknowledged(s: &Shared) {
    if s.stats.protected.load(Ordering::Relaxed) {
        return;
    }
    let q = lock(&s.held);
    s.stats.holding.store(true, Ordering::SeqCst);
    let caught_up = s.stats.acked_lsn.load(Ordering::SeqCst) >= q.unheld_lsn;
    let lag_ok = s.opts.max_lag.is_none_or(|max| s.stats.lag_ms.load(Ordering::Relaxed) <= max.as_millis() as u64);
    if caught_up && lag_ok && !s.stats.backup_lost.load(Ordering::SeqCst) {
        s.stats.protected.store(true, Ordering::SeqCst);
        drop(q);
        // Tell the backup now, not at the next heartbeat: until it knows, it would halt
        // rather than go live.
        send_output_done(s);
        tracing::info!(target: "ftvm::event", event = "protected", "the backup has caught up: PROTECTED");
    }
}

/// Whether the oldest held output may go out: the backup has acknowledged the log up to it,
/// the link is not holding yet (catching up), or there is no backup any more.
fn releasable(s: &Shared, h: &Held) -> bool {
    s.stats.backup_lost.load(Ordering::SeqCst)
        || !s.stats.holding.load(Ordering::SeqCst)
        || h.lsn.is_none_or(|lsn| s.stats.acked_lsn.load(Ordering::SeqCst) >= lsn)
}

/// Performs the held outputs that may go out, in order, then sends OUTPUT_DONE (the count
/// performed) on the heartbeat channel. Called where an acknowledgement arrives
/// (no hand-off to another thread), where the backup is lost, when an output is handed over
/// and, as a safety net, from the heartbeat loop. One thread performs at a time; another
/// that finds the performer busy leaves its work to it. Nothing is performed without the
/// arbiter: a primary that lost it halts (another copy may be live).
fn release(s: &Shared, by: By) {
    let mut performed_any = false;
    loop {
        let Ok(performer) = s.performer.try_lock() else { return };
        loop {
            let h = {
                let mut q = lock(&s.held);
                match q.outputs.front() {
                    Some(front) if releasable(s, front) => {
                        let h = q.outputs.pop_front().expect("front exists");
                        if !s.stats.holding.load(Ordering::SeqCst) {
                            q.unheld_lsn = q.unheld_lsn.max(h.lsn.unwrap_or(0));
                        } else if !s.stats.backup_lost.load(Ordering::Relaxed) {
                            let held_us = h.since.elapsed().as_micros() as u64;
                            s.stats.held_outputs.fetch_add(1, Ordering::Relaxed);
                            s.stats.hold_us.fetch_add(held_us, Ordering::Relaxed);
                            let bucket = HOLD_BUCKETS_US.partition_point(|&bound| bound < held_us);
                            s.stats.hold_buckets[bucket].fetch_add(1, Ordering::Relaxed);
                        }
                        h
                    }
                    _ => break,
                }
            };
            if !s.arbiter.valid() {
                crate::halt(&format!(
                    "the arbiter {} is lost ({}): not performing output #{}",
                    s.arbiter.spec(),
                    s.arbiter.lost().unwrap_or_else(|| "lease expired".into()),
                    h.ordinal
                ));
            }
            if performed_any && (crate::testing::armed(2, h.ordinal) || crate::testing::armed(3, h.ordinal)) {
                // The outputs this batch performed before the armed one are reported first, so
                // that the test's window is that output's alone (unreported, they would be in
                // window 3 themselves and be performed again).
                send_output_done(s);
                std::thread::sleep(crate::HEARTBEAT_INTERVAL * 4);
            }
            crate::testing::crash_point(2, h.ordinal);
            let timed = h.flush != u64::MAX;
            let write_start = if timed { stages::now_ns() } else { 0 };
            lock(&s.sinks).perform(h.target, &h.bytes);
            crate::testing::crash_point(3, h.ordinal);
            if timed && s.stats.holding.load(Ordering::Relaxed) && !s.stats.backup_lost.load(Ordering::Relaxed) {
                if let Some(lsn) = h.lsn {
                    let at = stages::now_ns();
                    let how = stages::Performed { at, write_ns: at - write_start, on_vcpu: by == By::Vcpu };
                    lock(&s.stats.stages).performed(h.since_ns, h.flush, lsn, how);
                }
            }
            s.stats.outputs_done.store(h.ordinal + 1, Ordering::SeqCst);
            performed_any = true;
            if crate::testing::armed(4, h.ordinal) {
                send_output_done(s);
                // Let heartbeats carry OUTPUT_DONE to the backup first.
                std::thread::sleep(crate::HEARTBEAT_INTERVAL * 4);
                crate::testing::crash_point(4, h.ordinal);
            }
        }
        // OUTPUT_DONE once for all the outputs performed here (it is cumulative).
        if std::mem::take(&mut performed_any) {
            send_output_done(s);
        }
        drop(performer);
        // Something may have become releasable after the last look and before the performer
        // was free again, by a thread that then left it to us: look once more.
        if !lock(&s.held).outputs.front().is_some_and(|h| releasable(s, h)) {
            return;
        }
    }
}

/// Which thread calls [`release`] (for the stage figures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum By {
    /// The vCPU thread, between exits (or handing an output over).
    Vcpu,
    /// A link thread: acknowledgements, heartbeats, a lost backup.
    Thread,
}

/// Sends OUTPUT_DONE now (a heartbeat carrying the count of outputs performed), rather than
/// waiting for the next periodic heartbeat.
fn send_output_done(s: &Shared) {
    if s.stats.backup_lost.load(Ordering::Relaxed) {
        return;
    }
    let flags = if s.stats.protected.load(Ordering::SeqCst) { FLAG_PROTECTED } else { 0 };
    s.heartbeats.send(&Heartbeat {
        role: Role::Primary,
        flags,
        seq: 0,
        outputs_done: s.stats.outputs_done.load(Ordering::SeqCst),
        lsn: 0,
        replayed: 0,
    });
}

/// How often the lag is sampled (the log's position against the time).
const LAG_SAMPLE: Duration = Duration::from_millis(1);
/// How long the vCPU is held back at a time while the backup lags too far.
const THROTTLE_STEP: Duration = Duration::from_millis(1);

struct PrimaryGate {
    shared: Arc<Shared>,
    submitted: u64,
    /// (the log's next LSN, when): the record at an LSN was written before the first sample
    /// above it.
    samples: VecDeque<(u64, Instant)>,
}

impl PrimaryGate {
    /// How far the backup's replay is behind: the age of the oldest record it has not
    /// replayed yet.
    fn lag(&mut self, now: Instant) -> Duration {
        let replayed = self.shared.stats.replayed_lsn.load(Ordering::Relaxed);
        while self.samples.front().is_some_and(|(lsn, _)| *lsn <= replayed + 1) {
            self.samples.pop_front();
        }
        self.samples.front().map_or(Duration::ZERO, |(_, t)| now.saturating_duration_since(*t))
    }
}

impl OutputGate for PrimaryGate {
    fn before_output(&mut self) {
        if crate::testing::armed(1, self.submitted) {
            // Window 1 alone: let every earlier output be performed and reported first.
            let start = std::time::Instant::now();
            while self.shared.stats.outputs_done.load(Ordering::SeqCst) < self.submitted
                && start.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(crate::HEARTBEAT_INTERVAL * 2);
        }
        crate::testing::crash_point(1, self.submitted);
    }

    fn submit(&mut self, ticket: OutputTicket, target: OutputTarget, bytes: Vec<u8>) -> Option<Vec<u8>> {
        self.submitted = ticket.ordinal + 1;
        self.shared.stats.held.store(self.submitted, Ordering::Relaxed);
        // u64::MAX: not timed by stage.
        let (since_ns, flush) = if stages::enabled() {
            (stages::now_ns(), lock(&self.shared.stats.stages).next_flush())
        } else {
            (0, u64::MAX)
        };
        lock(&self.shared.held).outputs.push_back(Held {
            since: Instant::now(),
            since_ns,
            flush,
            lsn: ticket.lsn,
            ordinal: ticket.ordinal,
            target,
            bytes,
        });
        // Usually not yet acknowledged: then this only looks at the front and returns.
        release(&self.shared, By::Vcpu);
        None
    }

    fn held(&self) -> usize {
        self.submitted.saturating_sub(self.shared.stats.outputs_done.load(Ordering::Relaxed)) as usize
    }

    fn finish(&mut self) {
        self.shared.stats.ending.store(true, Ordering::SeqCst);
    }

    fn handover(&mut self) {
        let start = std::time::Instant::now();
        while self.shared.stats.outputs_done.load(Ordering::SeqCst) < self.submitted
            && !self.shared.stats.backup_lost.load(Ordering::SeqCst)
            && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.shared.stats.ending.store(true, Ordering::SeqCst);
        self.shared.stats.handing_over.store(true, Ordering::SeqCst);
        // Let the heartbeat thread send the hand-over beats.
        std::thread::sleep(crate::HEARTBEAT_INTERVAL * 3);
    }

    fn pace(&mut self, next_lsn: Option<u64>) {
        let Some(lsn) = next_lsn else { return };
        let now = Instant::now();
        if self.samples.back().is_none_or(|(l, t)| *l < lsn && now.duration_since(*t) >= LAG_SAMPLE) {
            if self.samples.len() >= 1 << 16 {
                self.samples.pop_front();
            }
            self.samples.push_back((lsn, now));
        }
        if self.shared.stats.backup_lost.load(Ordering::Relaxed) {
            self.samples.clear();
            self.shared.stats.lag_ms.store(0, Ordering::Relaxed);
            return;
        }
        // Outputs wait: take the acknowledgements that are there, here, rather than wait for
        // the acknowledgement thread to be woken and scheduled (it takes them when this
        // thread is elsewhere: in the guest, halted).
        if self.held() > 0 {
            let polled =
                self.shared.acks.try_lock().ok().and_then(|mut a| a.as_mut().map(|a| take_acks(&self.shared, a)));
            if matches!(polled, Some(AckPoll::Drained)) {
                release(&self.shared, By::Vcpu);
            }
        }
        let lag = self.lag(now);
        let stats = &self.shared.stats;
        stats.lag_ms.store(lag.as_millis() as u64, Ordering::Relaxed);
        // Only a protected link is paced: a backup still catching up after a state transfer
        // cannot take over anyway, and is not protected until it is within the bound.
        let Some(max) = self.shared.opts.max_lag else { return };
        if lag > max && stats.protected.load(Ordering::Relaxed) {
            // Short steps: longer ones (a quarter of the excess, up to 10 ms) were tried and
            // let the worst lag grow (bursts of input after each step).
            std::thread::sleep(THROTTLE_STEP);
            stats.throttled_us.fetch_add(now.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
    }

    fn drain(&mut self) {
        let start = Instant::now();
        while self.held() > 0 && start.elapsed() < Duration::from_secs(2) {
            release(&self.shared, By::Vcpu);
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secure;
    use std::net::{TcpListener, TcpStream};

    /// A started outbox on a real authenticated connection whose send buffer is small, and
    /// the receiving end.
    fn connected() -> (Arc<Outbox>, TcpStream, Arc<PairStats>, secure::SecureReader) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let key = Key::from_bytes(&[3; 32]).unwrap();
        let k = key.clone();
        let responder =
            std::thread::spawn(move || secure::handshake(l.accept().unwrap().0, &k, false, Duration::from_secs(10)));
        let stream = TcpStream::connect(addr).unwrap();
        let small: libc::c_int = 4096;
        // SAFETY: setsockopt reads `small` (an int, as SO_SNDBUF takes) for the call only.
        let rc = unsafe {
            use std::os::fd::AsRawFd;
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let (writer, _, _) =
            secure::handshake(stream.try_clone().unwrap(), &key, true, Duration::from_secs(10)).unwrap();
        let (_, reader, _) = responder.join().unwrap().unwrap();
        let outbox = Arc::new(Outbox { inner: Mutex::new(OutboxInner::default()), wake: std::sync::Condvar::new() });
        let stats = Arc::new(PairStats::default());
        lock(&outbox.inner).link = Some((writer, stats.clone()));
        (outbox, stream, stats, reader)
    }

    /// Bytes pushed before and while the socket is full, partly sent by the pushing thread
    /// and partly by the sender thread, arrive whole and in order.
    #[test]
    fn the_outbox_keeps_the_order_across_direct_sends_and_the_backlog() {
        let (outbox, stream, stats, mut reader) = connected();
        let mut expected = Vec::new();
        // The receiver does not read yet: the socket fills and the backlog has to take over.
        for i in 0u32..3000 {
            let chunk: Vec<u8> = (0..(i % 97 + 1)).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect();
            expected.extend_from_slice(&chunk);
            outbox.push(chunk);
        }
        {
            let inner = lock(&outbox.inner);
            assert!(!inner.backlog.is_empty(), "the socket took everything: the backlog was not exercised");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let (outbox, stats, stop) = (outbox.clone(), stats.clone(), stop.clone());
            std::thread::spawn(move || sender_loop(&outbox, stream, &stats, &stop))
        };
        // More pushes while the sender drains: they queue behind the backlog, then go direct.
        for i in 3000u32..6000 {
            let chunk: Vec<u8> = (0..(i % 89 + 1)).map(|j| (i.wrapping_mul(17) ^ j) as u8).collect();
            expected.extend_from_slice(&chunk);
            outbox.push(chunk);
            if i % 500 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let mut got = vec![0u8; expected.len()];
        reader.read_exact(&mut got).unwrap();
        assert!(got == expected, "the bytes arrived altered or out of order");
        outbox.close();
        assert_eq!(sender.join().unwrap(), Ok(()));
        assert!(stats.sent_bytes.load(Ordering::Relaxed) > expected.len() as u64, "sealed frames are longer");
    }

    /// A log writer's bytes before the link starts wait in the outbox, for the boot
    /// handshake (the header) or the sender thread.
    #[test]
    fn bytes_before_the_start_are_queued() {
        let header = LogHeader::default();
        let (mut log, queue) = log_channel(&header).unwrap();
        let first = queue.0.take_queued();
        assert!(!first.is_empty(), "the log header is queued");
        log.flush().unwrap();
        assert!(queue.0.take_queued().is_empty());
    }
}
