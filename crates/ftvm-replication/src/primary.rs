//! The primary's side of the pair: stream the log, collect acknowledgements, hold each output
//! until the backup has the log up to it, perform it, report OUTPUT_DONE; notice a lost backup.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_events::OutputTicket;
use ftvm_log::{LogHeader, LogWriter};

use crate::protocol::{Heartbeat, Role, HANDSHAKE_OK, HANDSHAKE_REFUSED};
use crate::{io, Error, FileArbiter, Result, HEARTBEAT_INTERVAL, HEARTBEAT_POLL};

/// The log writer a primary's recorder streams into.
pub type StreamWriter = LogWriter<Box<dyn Write + Send>>;

/// Where an output goes when it is performed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputTarget {
    Console,
    Net(usize),
}

/// Performs outputs: the console and the network devices' TAPs.
pub trait OutputSinks: Send {
    fn perform(&mut self, target: OutputTarget, bytes: &[u8]);
}

/// Takes the outputs the guest produces. `submit` returns the bytes if the caller is to
/// perform them now (an unprotected VM), or keeps them (held until acknowledged, or held by
/// a backup for a failover).
pub trait OutputGate: Send {
    fn submit(&mut self, ticket: OutputTicket, target: OutputTarget, bytes: Vec<u8>) -> Option<Vec<u8>>;
    /// Outputs waiting (held by a primary, or replayed and not yet covered on a backup).
    fn held(&self) -> usize;
    /// A backup going live: the replayed outputs OUTPUT_DONE did not cover, in order, to be
    /// performed now (design brief §4, the failover rule); from now on `submit` returns every
    /// output for immediate performance.
    fn go_live(&mut self) -> Vec<(OutputTarget, Vec<u8>)> {
        Vec::new()
    }
    /// Called before an output is logged (crash window 1 of the test switches).
    fn before_output(&mut self) {}
    /// The VM is about to log its END: the peer leaving from now on is expected.
    fn finish(&mut self) {}
    /// Switchover: wait until every output was acknowledged and performed, then tell the
    /// backup to take over (the caller exits, releasing the arbiter).
    fn handover(&mut self) {}
}

#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub backup: SocketAddr,
    pub arbiter: PathBuf,
    pub timeout: Duration,
    /// How long to wait for the backup to be listening.
    pub connect_wait: Duration,
}

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
}

struct Shared {
    stats: Arc<PairStats>,
    stop: AtomicBool,
    /// Outputs held until the backup has the log up to them, in log order.
    held: Mutex<VecDeque<Held>>,
    /// Whoever holds this performs released outputs (the sinks and the OUTPUT_DONE socket
    /// live here). Taken with `try_lock`: a thread that finds it taken leaves the work to
    /// the holder, which looks again before it lets go.
    performer: Mutex<Performer>,
}

struct Performer {
    sinks: Box<dyn OutputSinks>,
    udp: UdpSocket,
}

/// A running primary link. Dropping it stops its threads.
pub struct Primary {
    shared: Arc<Shared>,
    _arbiter: FileArbiter,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct Held {
    lsn: Option<u64>,
    ordinal: u64,
    target: OutputTarget,
    bytes: Vec<u8>,
}

/// Writes log bytes to the sender thread; never blocks the vCPU and never fails (a lost
/// backup just stops receiving).
struct ChannelWriter {
    buf: Vec<u8>,
    tx: Sender<Vec<u8>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let _ = self.tx.send(std::mem::take(&mut self.buf));
        }
        Ok(())
    }
}

impl Primary {
    /// Takes the arbiter, connects to the backup, sends the log header and waits for the
    /// backup to accept it. Returns the link and the log writer the recorder streams into.
    pub fn start(
        cfg: &PrimaryConfig,
        header: &LogHeader,
        sinks: Box<dyn OutputSinks>,
    ) -> Result<(Primary, StreamWriter, Arc<PairStats>)> {
        let arbiter = FileArbiter::acquire(&cfg.arbiter, Duration::ZERO)?.ok_or_else(|| Error::Arbiter {
            path: cfg.arbiter.display().to_string(),
            why: "held by someone else: another live copy of this VM runs".into(),
        })?;
        let start = Instant::now();
        let mut announced = false;
        let stream = loop {
            match TcpStream::connect_timeout(&cfg.backup, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < cfg.connect_wait => {
                    if !announced {
                        eprintln!("ftvm: waiting for the backup at {} ({e})", cfg.backup);
                        announced = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(Error::Io(format!("cannot reach the backup at {}: {e}", cfg.backup))),
            }
        };
        let _ = stream.set_nodelay(true);
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let writer: Box<dyn Write + Send> = Box::new(ChannelWriter { buf: Vec::new(), tx });
        let mut log = LogWriter::new(writer, header).map_err(|e| Error::Io(format!("log: {e}")))?;
        log.flush().map_err(|e| Error::Io(format!("log: {e}")))?;
        // The header goes out before the handshake reply can come back.
        let mut w = stream.try_clone().map_err(io("socket"))?;
        let first = rx.recv().map_err(|_| Error::Io("log writer closed".into()))?;
        w.write_all(&first).map_err(io("sending the log header"))?;
        let mut r = stream.try_clone().map_err(io("socket"))?;
        r.set_read_timeout(Some(Duration::from_secs(30))).map_err(io("socket"))?;
        let mut reply = [0u8; 1];
        r.read_exact(&mut reply).map_err(io("waiting for the backup's answer"))?;
        if reply[0] != HANDSHAKE_OK {
            let mut why = String::new();
            if reply[0] == HANDSHAKE_REFUSED {
                let mut len = [0u8; 4];
                if r.read_exact(&mut len).is_ok() {
                    let mut msg = vec![0u8; (u32::from_le_bytes(len) as usize).min(1 << 16)];
                    if r.read_exact(&mut msg).is_ok() {
                        why = String::from_utf8_lossy(&msg).into_owned();
                    }
                }
            }
            return Err(Error::Handshake(format!("the backup refused the pair:\n{why}")));
        }
        r.set_read_timeout(None).map_err(io("socket"))?;

        let stats = Arc::new(PairStats::default());
        let udp = UdpSocket::bind(if cfg.backup.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).map_err(io("udp"))?;
        udp.connect(cfg.backup).map_err(io("udp"))?;
        udp.set_read_timeout(Some(HEARTBEAT_POLL)).map_err(io("udp"))?;
        let done_udp = udp.try_clone().map_err(io("udp"))?;
        let shared = Arc::new(Shared {
            stats: stats.clone(),
            stop: AtomicBool::new(false),
            held: Mutex::new(VecDeque::new()),
            performer: Mutex::new(Performer { sinks, udp: done_udp }),
        });
        let mut threads = Vec::new();
        // Sender: log bytes to the backup.
        {
            let s = shared.clone();
            threads.push(spawn("ftvm-log-send", move || {
                while let Ok(chunk) = rx.recv() {
                    if s.stats.backup_lost.load(Ordering::Relaxed) {
                        continue;
                    }
                    if w.write_all(&chunk).is_err() {
                        lose(&s, "the log connection failed");
                    } else {
                        s.stats.sent_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                }
            })?);
        }
        // Acknowledgements: cumulative LSNs.
        {
            let s = shared.clone();
            threads.push(spawn("ftvm-acks", move || {
                let mut b = [0u8; 8];
                while r.read_exact(&mut b).is_ok() {
                    s.stats.acked_lsn.fetch_max(u64::from_le_bytes(b), Ordering::SeqCst);
                    // The outputs this acknowledgement covers go out from here at once.
                    release(&s);
                }
                if !s.stop.load(Ordering::Relaxed) {
                    lose(&s, "the backup closed the log connection");
                }
            })?);
        }
        // Heartbeats, both ways, on their own UDP socket.
        {
            let s = shared.clone();
            let timeout = cfg.timeout;
            threads.push(spawn("ftvm-heartbeat", move || {
                let mut last_seen = Instant::now();
                let mut next_send = Instant::now();
                let mut seq = 0;
                let mut buf = [0u8; 64];
                while !s.stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next_send {
                        seq += 1;
                        // A hand-over beat carries the sequence number u64::MAX.
                        let handing_over = s.stats.handing_over.load(Ordering::SeqCst);
                        let hb = Heartbeat {
                            role: Role::Primary,
                            seq: if handing_over { u64::MAX } else { seq },
                            outputs_done: s.stats.outputs_done.load(Ordering::Relaxed),
                            lsn: 0,
                        };
                        let _ = udp.send(&hb.encode());
                        next_send =
                            Instant::now() + if handing_over { HEARTBEAT_INTERVAL / 5 } else { HEARTBEAT_INTERVAL };
                    }
                    if let Ok(n) = udp.recv(&mut buf) {
                        if Heartbeat::decode(&buf[..n]).is_some_and(|h| h.role == Role::Backup) {
                            last_seen = Instant::now();
                        }
                    }
                    if last_seen.elapsed() > timeout {
                        lose(&s, &format!("no heartbeat from the backup for {} ms", timeout.as_millis()));
                    }
                    // A safety net: outputs whose acknowledgement came before they were
                    // handed over (a fast backup) go out at the latest here.
                    release(&s);
                }
            })?);
        }
        Ok((Primary { shared, _arbiter: arbiter, threads }, log, stats))
    }

    /// The gate the vCPU loop hands outputs to.
    pub fn gate(&self) -> Box<dyn OutputGate> {
        Box::new(PrimaryGate { shared: self.shared.clone(), submitted: 0 })
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.stats.backup_lost.store(true, Ordering::SeqCst);
        // What is still held goes out (the guest's last words after its END, say).
        release(&self.shared);
        // The sender and ack threads end with their channel and socket; don't wait for them.
        self.threads.clear();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(f).map_err(io(format!("cannot start thread {name}")))
}

fn lose(s: &Shared, why: &str) {
    if s.stats.ending.load(Ordering::SeqCst) {
        // The run ended with END: the backup stops too; nothing is lost.
        s.stats.backup_lost.store(true, Ordering::SeqCst);
    } else if !s.stats.backup_lost.swap(true, Ordering::SeqCst) {
        eprintln!("ftvm: backup lost ({why}); continuing UNPROTECTED (this primary holds the arbiter)");
    }
    // Unprotected (or ending): every held output goes out now.
    release(s);
}

/// Sends OUTPUT_DONE now (a heartbeat-format datagram carrying the count of outputs
/// performed), rather than waiting for the next periodic heartbeat.
fn send_output_done(s: &Shared, udp: &UdpSocket) {
    let hb =
        Heartbeat { role: Role::Primary, seq: 0, outputs_done: s.stats.outputs_done.load(Ordering::SeqCst), lsn: 0 };
    let _ = udp.send(&hb.encode());
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the oldest held output may go out: the backup has acknowledged the log up to it,
/// or there is no backup any more.
fn releasable(s: &Shared, h: &Held) -> bool {
    s.stats.backup_lost.load(Ordering::SeqCst)
        || h.lsn.is_none_or(|lsn| s.stats.acked_lsn.load(Ordering::SeqCst) >= lsn)
}

/// Performs the held outputs that may go out, in order, each followed at once by OUTPUT_DONE
/// (the count performed) on the heartbeat channel. Called where an acknowledgement arrives
/// (no hand-off to another thread), where the backup is lost, when an output is handed over
/// and, as a safety net, from the heartbeat loop. One thread performs at a time; another
/// that finds the performer busy leaves its work to it.
fn release(s: &Shared) {
    loop {
        let Ok(mut performer) = s.performer.try_lock() else { return };
        loop {
            let h = {
                let mut held = lock(&s.held);
                match held.front() {
                    Some(front) if releasable(s, front) => held.pop_front().expect("front exists"),
                    _ => break,
                }
            };
            crate::testing::crash_point(2, h.ordinal);
            performer.sinks.perform(h.target, &h.bytes);
            crate::testing::crash_point(3, h.ordinal);
            s.stats.outputs_done.store(h.ordinal + 1, Ordering::SeqCst);
            send_output_done(s, &performer.udp);
            if crate::testing::armed(4, h.ordinal) {
                // Let heartbeats carry OUTPUT_DONE to the backup first.
                std::thread::sleep(crate::HEARTBEAT_INTERVAL * 4);
                crate::testing::crash_point(4, h.ordinal);
            }
        }
        drop(performer);
        // Something may have become releasable after the last look and before the performer
        // was free again, by a thread that then left it to us: look once more.
        if !lock(&s.held).front().is_some_and(|h| releasable(s, h)) {
            return;
        }
    }
}

struct PrimaryGate {
    shared: Arc<Shared>,
    submitted: u64,
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
        lock(&self.shared.held).push_back(Held { lsn: ticket.lsn, ordinal: ticket.ordinal, target, bytes });
        // Usually not yet acknowledged: then this only looks at the front and returns.
        release(&self.shared);
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
}
