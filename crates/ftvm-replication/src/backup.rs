//! The backup's side of the pair: accept the primary, check its header, receive and
//! acknowledge the log, feed it to the replay, watch the primary's heartbeats, and on its
//! death win the arbiter and let the replay turn live.

use std::collections::VecDeque;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_events::{OutputTicket, RecordSource};
use ftvm_log::{LogError, LogHeader, LogReader, Record};

use crate::primary::{OutputGate, OutputTarget};
use crate::protocol::{Heartbeat, Role, HANDSHAKE_OK, HANDSHAKE_REFUSED};
use crate::{io, Error, FileArbiter, Result, HEARTBEAT_INTERVAL, HEARTBEAT_POLL};

#[derive(Debug, Clone)]
pub struct BackupConfig {
    pub listen: SocketAddr,
    pub arbiter: PathBuf,
    pub timeout: Duration,
}

/// What the backup knows, shared between its threads and whoever reports status.
#[derive(Debug, Default)]
pub struct BackupState {
    pub received_lsn: AtomicU64,
    pub received_bytes: AtomicU64,
    pub outputs_done: AtomicU64,
    pub primary_ended: AtomicBool,
    pub won_arbiter: AtomicBool,
    pub halted: AtomicBool,
    /// Milliseconds since the primary's last heartbeat, when the failover was decided.
    pub silence_ms: AtomicU64,
    /// When the failover was decided (the primary's silence passed the timeout).
    pub decided_at: std::sync::OnceLock<Instant>,
    stop: AtomicBool,
}

/// A running backup link. Holds the arbiter once won (until the process ends).
pub struct Backup {
    pub state: Arc<BackupState>,
    pub arbiter: Arc<Mutex<Option<FileArbiter>>>,
}

/// The replay's record source: records as the receiver verified them.
struct ChannelSource {
    rx: Receiver<Record>,
    state: Arc<BackupState>,
}

impl RecordSource for ChannelSource {
    fn next_record(&mut self) -> std::result::Result<Option<Record>, LogError> {
        match self.rx.recv() {
            Ok(r) => Ok(Some(r)),
            Err(_) if self.state.halted.load(Ordering::SeqCst) => Err(LogError::ReaderFailed),
            Err(_) => Ok(None),
        }
    }

    fn end_detail(&self) -> String {
        if self.state.halted.load(Ordering::SeqCst) {
            "the primary is unreachable and this backup could not win the arbiter: halted (no second live copy)".into()
        } else {
            "the primary's log stream ended".into()
        }
    }
}

impl Backup {
    /// Listens, accepts the primary, and checks its header against `ours` (what this side
    /// built). Returns the link, the primary's header and the replay's record source.
    pub fn listen(cfg: &BackupConfig, ours: &LogHeader) -> Result<(Backup, LogHeader, Box<dyn RecordSource>)> {
        let listener = TcpListener::bind(cfg.listen).map_err(io(format!("cannot listen on {}", cfg.listen)))?;
        let udp = UdpSocket::bind(cfg.listen).map_err(io(format!("cannot bind UDP {}", cfg.listen)))?;
        eprintln!("ftvm: backup listening on {}", cfg.listen);
        let (stream, peer) = listener.accept().map_err(io("accept"))?;
        let _ = stream.set_nodelay(true);
        // Buffered: the reader takes a frame in several small reads; a read returns whatever
        // has arrived, so buffering adds no latency.
        let reader_stream = std::io::BufReader::with_capacity(1 << 16, stream.try_clone().map_err(io("socket"))?);
        let (mut reader, theirs) =
            LogReader::open(reader_stream).map_err(|e| Error::Handshake(format!("bad log stream from {peer}: {e}")))?;
        let mut w = stream.try_clone().map_err(io("socket"))?;
        let differences: Vec<String> = theirs
            .compare(ours)
            .into_iter()
            .filter(|m| {
                m.significant
                    && !m.field.starts_with("console")
                    && !m.field.starts_with("net")
                    && m.field != "rtc_base_unix"
            })
            .map(|m| m.to_string())
            .collect();
        let mac_diff =
            theirs.net.len() != ours.net.len() || theirs.net.iter().zip(&ours.net).any(|(a, b)| a.mac != b.mac);
        let mut differences = differences;
        if mac_diff {
            differences.push("network devices (count or MAC addresses) differ".into());
        }
        if !differences.is_empty() {
            let msg = differences.join("\n");
            let mut reply = vec![HANDSHAKE_REFUSED];
            reply.extend_from_slice(&(msg.len() as u32).to_le_bytes());
            reply.extend_from_slice(msg.as_bytes());
            let _ = w.write_all(&reply);
            return Err(Error::Handshake(format!(
                "the primary's VM differs from this one:\n  {}",
                differences.join("\n  ")
            )));
        }
        w.write_all(&[HANDSHAKE_OK]).map_err(io("handshake"))?;
        eprintln!("ftvm: paired with primary {peer}; replaying its log");

        let state = Arc::new(BackupState::default());
        let arbiter = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::sync_channel::<Record>(1 << 16);
        // Receiver: verify (the reader checks every frame), acknowledge, hand to the replay.
        {
            let s = state.clone();
            std::thread::Builder::new()
                .name("ftvm-log-recv".into())
                .spawn(move || {
                    let mut since_ack = 0u32;
                    while let Ok(Some((lsn, rec))) = reader.next() {
                        let urgent = matches!(rec, Record::Output { .. } | Record::End { .. });
                        let end = matches!(rec, Record::End { .. });
                        s.received_lsn.store(lsn, Ordering::SeqCst);
                        s.received_bytes.store(reader.valid_len(), Ordering::Relaxed);
                        if tx.send(rec).is_err() {
                            return;
                        }
                        since_ack += 1;
                        // An ack means "received and verified"; a backup deciding to go live
                        // stops acking.
                        if (urgent || since_ack >= 64) && !s.won_arbiter.load(Ordering::SeqCst) {
                            since_ack = 0;
                            if w.write_all(&lsn.to_le_bytes()).is_err() {
                                break;
                            }
                        }
                        if end {
                            s.primary_ended.store(true, Ordering::SeqCst);
                            return;
                        }
                    }
                    // The stream broke. Keep the channel open until the failover is decided, so
                    // the replay waits rather than going live without the arbiter.
                    while !s.won_arbiter.load(Ordering::SeqCst)
                        && !s.halted.load(Ordering::SeqCst)
                        && !s.stop.load(Ordering::SeqCst)
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    drop(tx);
                })
                .map_err(io("thread"))?;
        }
        // Heartbeats and failure detection.
        {
            let s = state.clone();
            let arb = arbiter.clone();
            let cfg = cfg.clone();
            udp.set_read_timeout(Some(HEARTBEAT_POLL)).map_err(io("udp"))?;
            std::thread::Builder::new()
                .name("ftvm-heartbeat".into())
                .spawn(move || monitor(s, arb, cfg, udp, stream))
                .map_err(io("thread"))?;
        }
        let source = Box::new(ChannelSource { rx, state: state.clone() });
        Ok((Backup { state, arbiter }, theirs, source))
    }

    /// The gate for the replay's outputs: held until OUTPUT_DONE covers them or the backup
    /// goes live.
    pub fn gate(&self) -> Box<dyn OutputGate> {
        Box::new(BackupGate { pending: VecDeque::new(), state: self.state.clone(), live: false })
    }
}

fn monitor(
    s: Arc<BackupState>,
    arb: Arc<Mutex<Option<FileArbiter>>>,
    cfg: BackupConfig,
    udp: UdpSocket,
    stream: TcpStream,
) {
    let mut last_seen = Instant::now();
    let mut primary: Option<SocketAddr> = None;
    let mut next_send = Instant::now();
    let mut seq = 0u64;
    let mut buf = [0u8; 64];
    let mut handover = false;
    loop {
        if s.primary_ended.load(Ordering::SeqCst) || s.stop.load(Ordering::SeqCst) {
            return;
        }
        if let Ok((n, from)) = udp.recv_from(&mut buf) {
            if let Some(h) = Heartbeat::decode(&buf[..n]).filter(|h| h.role == Role::Primary) {
                last_seen = Instant::now();
                primary = Some(from);
                s.outputs_done.fetch_max(h.outputs_done, Ordering::SeqCst);
                if h.seq == u64::MAX {
                    handover = true;
                }
            }
        }
        if let (Some(p), true) = (primary, Instant::now() >= next_send) {
            seq += 1;
            let hb =
                Heartbeat { role: Role::Backup, seq, outputs_done: 0, lsn: s.received_lsn.load(Ordering::Relaxed) };
            let _ = udp.send_to(&hb.encode(), p);
            next_send = Instant::now() + HEARTBEAT_INTERVAL;
        }
        if handover || last_seen.elapsed() > cfg.timeout {
            let silence = last_seen.elapsed();
            s.silence_ms.store(silence.as_millis() as u64, Ordering::SeqCst);
            let _ = s.decided_at.set(Instant::now());
            if handover {
                eprintln!("ftvm: the primary hands over (switchover); taking the arbiter");
            } else {
                eprintln!("ftvm: no heartbeat from the primary for {} ms; taking the arbiter", silence.as_millis());
            }
            // Stop receiving (and acking) before trying to go live.
            let _ = stream.shutdown(Shutdown::Both);
            // On a switchover the primary releases the arbiter as it exits, just after.
            let wait = if handover { cfg.timeout.max(Duration::from_secs(5)) } else { cfg.timeout };
            match FileArbiter::acquire(&cfg.arbiter, wait) {
                Ok(Some(lock)) => {
                    *arb.lock().unwrap_or_else(|e| e.into_inner()) = Some(lock);
                    s.won_arbiter.store(true, Ordering::SeqCst);
                }
                Ok(None) => {
                    eprintln!("ftvm: the arbiter is held (the primary still lives): halting this backup");
                    s.halted.store(true, Ordering::SeqCst);
                }
                Err(e) => {
                    eprintln!("ftvm: {e}: halting this backup");
                    s.halted.store(true, Ordering::SeqCst);
                }
            }
            return;
        }
    }
}

struct BackupGate {
    pending: VecDeque<(u64, OutputTarget, Vec<u8>)>,
    state: Arc<BackupState>,
    live: bool,
}

impl BackupGate {
    fn drop_covered(&mut self) {
        let done = self.state.outputs_done.load(Ordering::SeqCst);
        while self.pending.front().is_some_and(|(ordinal, _, _)| *ordinal < done) {
            self.pending.pop_front();
        }
    }
}

impl OutputGate for BackupGate {
    fn submit(&mut self, ticket: OutputTicket, target: OutputTarget, bytes: Vec<u8>) -> Option<Vec<u8>> {
        if self.live {
            return Some(bytes);
        }
        self.pending.push_back((ticket.ordinal, target, bytes));
        self.drop_covered();
        None
    }

    fn held(&self) -> usize {
        self.pending.len()
    }

    fn go_live(&mut self) -> Vec<(OutputTarget, Vec<u8>)> {
        self.drop_covered();
        self.live = true;
        self.pending.drain(..).map(|(_, t, b)| (t, b)).collect()
    }
}

impl Drop for Backup {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
    }
}
