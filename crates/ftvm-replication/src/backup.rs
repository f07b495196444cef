//! The backup's side of the pair: accept the primary, check its header, receive and
//! acknowledge the log, feed it to the replay, watch the primary's heartbeats, and on its
//! death win the arbiter and let the replay turn live.
//!
//! A backup that received its state by a transfer (re-protection, resync) may go live only
//! once the primary's heartbeats say the link is protected: before that, outputs the primary
//! performed may be missing from its log, and it halts rather than go live without them.

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_events::{OutputTicket, RecordSource};
use ftvm_log::{LogError, LogHeader, LogReader, Record};
use ftvm_sync::lock;

use crate::arbiter::{Arbiter, ArbiterSpec};
use crate::link::{self, Connection, Heartbeats};
use crate::protocol::{Ack, Heartbeat, Role, ACK_RESYNC, FLAG_DIVERGED, FLAG_HANDOVER, FLAG_PROTECTED};
use crate::secure::{Key, SecureWriter};
use crate::{io, Error, Result, HEARTBEAT_INTERVAL};
use ftvm_events::{OutputGate, OutputTarget};

#[derive(Debug, Clone)]
pub struct BackupConfig {
    pub listen: SocketAddr,
    pub arbiter: ArbiterSpec,
    pub timeout: Duration,
    pub key: Key,
}

impl BackupConfig {
    /// How long to try for the arbiter once the primary is taken for dead: a lock is free at
    /// once when its holder died; a lease only when it expired.
    pub fn arbiter_wait(&self) -> Duration {
        match &self.arbiter {
            ArbiterSpec::File(_) | ArbiterSpec::SharedFile(_) => self.timeout,
            ArbiterSpec::Etcd(e) => Duration::from_secs(e.ttl_secs.max(1) as u64 + 2),
        }
    }
}

/// What the backup knows, shared between its threads and whoever reports status.
#[derive(Debug, Default)]
pub struct BackupState {
    pub received_lsn: AtomicU64,
    pub received_bytes: AtomicU64,
    /// The last LSN the replay consumed.
    pub replayed_lsn: AtomicU64,
    pub outputs_done: AtomicU64,
    pub primary_ended: AtomicBool,
    pub won_arbiter: AtomicBool,
    pub halted: AtomicBool,
    /// Why it halted.
    pub halt_reason: Mutex<Option<String>>,
    /// The primary says every output it performed was acknowledged first (may go live).
    pub protected: AtomicBool,
    /// Diverged: asked for a resync; never goes live in this state.
    pub diverged: AtomicBool,
    /// A stream frame failed authentication (altered, replayed, forged): the stream is
    /// unusable past it, and the backup asks for a resync.
    pub stream_rejected: Arc<Mutex<Option<String>>>,
    /// Milliseconds since the primary's last heartbeat, when the failover was decided.
    pub silence_ms: AtomicU64,
    /// When the failover was decided (the primary's silence passed the timeout).
    pub decided_at: std::sync::OnceLock<Instant>,
    /// Resyncs this backup process went through.
    pub resyncs: AtomicU64,
    stop: AtomicBool,
}

impl BackupState {
    fn halt(&self, why: String) {
        tracing::error!(
            target: "ftvm::event",
            event = "halt",
            side = "backup",
            why = %why,
            "{why}: halting this backup (no second live copy, and none in a wrong state)"
        );
        *lock(&self.halt_reason) = Some(why);
        self.halted.store(true, Ordering::SeqCst);
    }
}

/// Where a backup's arbiter appears once it wins it (at a failover).
pub type ArbiterSlot = Arc<Mutex<Option<Arc<Arbiter>>>>;

/// A running backup link. Holds the arbiter once won (until the process ends).
pub struct Backup {
    pub state: Arc<BackupState>,
    pub arbiter: ArbiterSlot,
    /// The acknowledgement direction (a resync request goes there too).
    acks: Arc<Mutex<SecureWriter>>,
    shutdown: std::net::TcpStream,
    pub heartbeats: Arc<Heartbeats>,
}

/// The replay's record source: records as the receiver verified them, a frame's (at most
/// [`HAND_OVER_BATCH`]) per message, so that the replay's thread is woken at most once per
/// frame and the channel is paid once per frame, not once per record.
struct ChannelSource {
    rx: Receiver<Vec<(u64, Record)>>,
    batch: std::vec::IntoIter<(u64, Record)>,
    state: Arc<BackupState>,
}

impl ChannelSource {
    fn new(rx: Receiver<Vec<(u64, Record)>>, state: Arc<BackupState>) -> Self {
        ChannelSource { rx, batch: Vec::new().into_iter(), state }
    }

    /// The next record verified: from the batch at hand, else the next batch (may wait).
    fn next_verified(&mut self) -> Option<(u64, Record)> {
        loop {
            if let Some(r) = self.batch.next() {
                return Some(r);
            }
            self.batch = self.rx.recv().ok()?.into_iter();
        }
    }
}

/// Test switch: `FTVM_TEST_REPLAY_DELAY_US=N` slows the backup's replay by N µs per record
/// (the lag-bound tests).
fn replay_delay() -> Option<Duration> {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("FTVM_TEST_REPLAY_DELAY_US").ok()?.parse().ok().filter(|&us| us > 0).map(Duration::from_micros)
    })
}

impl RecordSource for ChannelSource {
    fn next_record(&mut self) -> std::result::Result<Option<Record>, LogError> {
        match self.next_verified() {
            Some((lsn, r)) => {
                if let Some(d) = replay_delay() {
                    std::thread::sleep(d);
                }
                self.state.replayed_lsn.store(lsn, Ordering::Relaxed);
                Ok(Some(r))
            }
            None if self.state.halted.load(Ordering::SeqCst) || self.state.diverged.load(Ordering::SeqCst) => {
                Err(LogError::ReaderFailed)
            }
            None => Ok(None),
        }
    }

    /// The source fails on purpose once the backup halted or diverged (so that the replay
    /// stops rather than going live): the report says why, not that a log is damaged.
    fn failure_detail(&self, error: &LogError) -> String {
        if lock(&self.state.stream_rejected).is_some() || lock(&self.state.halt_reason).is_some() {
            return self.end_detail();
        }
        if self.state.diverged.load(Ordering::SeqCst) {
            return "the replay diverged from the primary; asking for a resync".into();
        }
        format!("the replication stream failed: {error}")
    }

    fn end_detail(&self) -> String {
        if let Some(why) = lock(&self.state.stream_rejected).as_ref() {
            return format!("the replication stream was rejected ({why}); asking for a resync");
        }
        match lock(&self.state.halt_reason).as_ref() {
            Some(why) => format!("{why}: halted (no second live copy)"),
            None => "the primary's log stream ended".into(),
        }
    }
}

/// What keeps the primary's VM (`theirs`) from running here as this backup built it
/// (`ours`): a significant header difference other than console, TAP names, the RTC base
/// (adopted) and header extras; other MACs; with `disks_by_content`, other disk images (at
/// boot both sides start from the same ones; a state transfer brings the disks with it).
pub fn vm_differences(theirs: &LogHeader, ours: &LogHeader, disks_by_content: bool) -> Vec<String> {
    let mut out: Vec<String> = theirs
        .compare(ours)
        .into_iter()
        .filter(|m| {
            m.significant
                && !m.field.starts_with("console")
                && !m.field.starts_with("net")
                && m.field != "rtc_base_unix"
                && (disks_by_content || !m.field.starts_with("disks"))
                && !m.field.starts_with("extra")
        })
        .map(|m| m.to_string())
        .collect();
    if theirs.net.len() != ours.net.len() || theirs.net.iter().zip(&ours.net).any(|(a, b)| a.mac != b.mac) {
        out.push("network devices (count or MAC addresses) differ".into());
    }
    out
}

/// The stream's reader, noting a frame that fails authentication (as opposed to a connection
/// that breaks, which is what a dead primary looks like).
struct Watched {
    inner: Box<dyn std::io::Read + Send>,
    rejected: Arc<Mutex<Option<String>>>,
}

impl std::io::Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let r = self.inner.read(buf);
        if let Err(e) = &r {
            if let Some(se) = crate::secure::SecureError::in_io_error(e) {
                lock(&self.rejected).get_or_insert_with(|| se.to_string());
            }
        }
        r
    }
}

/// A read that ran into the socket's timeout.
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

/// The most records handed to the replay in one message.
const HAND_OVER_BATCH: usize = 64;

/// Hands verified records to the replay, in order, as one message; false if the replay is gone.
fn hand_over(tx: &mpsc::SyncSender<Vec<(u64, Record)>>, batch: &mut Vec<(u64, Record)>) -> bool {
    if batch.is_empty() {
        return true;
    }
    let full = std::mem::replace(batch, Vec::with_capacity(HAND_OVER_BATCH));
    tx.send(full).is_ok()
}

/// Acknowledge at least this often while records arrive (a catching-up link starts holding
/// at the first acknowledgement, and is protected by them).
const ACK_EVERY: Duration = Duration::from_millis(5);

impl Backup {
    /// Reads the primary's log header from `conn`, checks it against `ours` (what this side
    /// built; after a state transfer, the VM restored from it) and starts receiving. Returns
    /// the link, the primary's header and the replay's record source.
    /// Answers a preflight (`Mode::Probe`): reads the peer's header, says whether this side's
    /// VM (`ours`) agrees, and ends the connection. Returns the differences it answered.
    pub fn answer_probe(conn: Connection, ours: &LogHeader) -> Result<Vec<String>> {
        let peer = conn.peer;
        let Connection { reader, mut writer, .. } = conn;
        let (_, theirs) = LogReader::open(reader)
            .map_err(|e| Error::BadPeer { peer, why: format!("a preflight without a log header: {e}") })?;
        let differences = vm_differences(&theirs, ours, true);
        let refusal = (!differences.is_empty()).then(|| differences.join("\n"));
        link::answer(&mut writer, refusal.as_deref())
            .map_err(|e| Error::BadPeer { peer, why: format!("answering its preflight: {e}") })?;
        tracing::info!(
            target: "ftvm::event",
            event = "preflight",
            peer = %peer,
            differences = differences.len(),
            "answered a preflight from {peer}: {}",
            if differences.is_empty() { "the VMs agree".to_string() } else { differences.join("; ") }
        );
        Ok(differences)
    }

    pub fn start(
        conn: Connection,
        ours: &LogHeader,
        cfg: &BackupConfig,
        resyncs: u64,
    ) -> Result<(Backup, LogHeader, Box<dyn RecordSource>)> {
        let transfer = conn.mode == link::Mode::Transfer;
        let peer = conn.peer;
        let shutdown = conn.shutdown_handle()?;
        let Connection { reader, mut writer, heartbeats, buffered, received_at, .. } = conn;
        let rejected = Arc::new(Mutex::new(None));
        let reader = Watched { inner: reader, rejected: rejected.clone() };
        // Unbuffered here: the channel's reader holds whole chunks already, and says whether
        // the current frame goes on (acknowledgements are sent at a frame's end).
        let (mut reader, theirs) = LogReader::open(reader).map_err(|e| Error::BadPeer {
            peer,
            why: match e {
                LogError::Io(ref io) if is_timeout(io) => {
                    format!("no log header within {} s", link::PAIRING_STALL.as_secs())
                }
                e => format!("not a log stream: {e}"),
            },
        })?;
        let differences = vm_differences(&theirs, ours, !transfer);
        if !differences.is_empty() {
            let _ = link::answer(&mut writer, Some(&differences.join("\n")));
            // A misconfigured primary (or anyone without a key) must not end the backup.
            return Err(Error::BadPeer {
                peer,
                why: format!("its VM differs from this one:\n  {}", differences.join("\n  ")),
            });
        }
        link::answer(&mut writer, None).map_err(|e| Error::BadPeer { peer, why: format!("answering it: {e}") })?;
        // Paired: from here a silent primary is told by its heartbeats.
        shutdown.set_read_timeout(None).map_err(io("socket"))?;
        tracing::info!(
            target: "ftvm::event",
            event = "paired",
            peer = %peer,
            transfer,
            "paired with primary {peer}; replaying its log"
        );
        let state = Arc::new(BackupState { stream_rejected: rejected, ..Default::default() });
        state.protected.store(!transfer, Ordering::SeqCst);
        state.resyncs.store(resyncs, Ordering::SeqCst);
        let acks = Arc::new(Mutex::new(writer));
        let arbiter = Arc::new(Mutex::new(None));
        // 2^13 batches waiting at most: at least as many records (a frame is often one or
        // two), at most 2^19. One by one, it was 2^16 records; a bound of 2^16 / 64 batches
        // could stop the receiver (and its acknowledgements) at ~1,000 records of small frames.
        let (tx, rx) = mpsc::sync_channel::<Vec<(u64, Record)>>(1 << 13);
        // Receiver: verify (the reader checks every frame), acknowledge, hand to the replay.
        {
            let s = state.clone();
            let w = acks.clone();
            std::thread::Builder::new()
                .name("ftvm-log-recv".into())
                .spawn(move || {
                    crate::link_nice();
                    ftvm_seccomp::enter(ftvm_seccomp::Thread::Stream);
                    let mut since_ack = u32::MAX;
                    let mut last_ack = Instant::now();
                    let mut owed = false;
                    let mut batch = Vec::with_capacity(HAND_OVER_BATCH);
                    loop {
                        let (lsn, rec) = match reader.next() {
                            Ok(Some(r)) => r,
                            Ok(None) => break,
                            Err(e) => {
                                if let Some(why) = lock(&s.stream_rejected).clone() {
                                    // Not a dead primary: a frame that failed authentication.
                                    // The replay stops at the last good record; the backup
                                    // asks for a resync.
                                    tracing::warn!(
                                        target: "ftvm::event",
                                        event = "rejected_frame",
                                        peer = %peer,
                                        why = %why,
                                        "REJECTED a replication frame from {peer}: {why}"
                                    );
                                    hand_over(&tx, &mut batch);
                                    s.diverged.store(true, Ordering::SeqCst);
                                    return;
                                }
                                if !s.stop.load(Ordering::SeqCst) && !s.diverged.load(Ordering::SeqCst) {
                                    tracing::warn!(
                                        target: "ftvm::event",
                                        event = "stream_broken",
                                        peer = %peer,
                                        error = %e,
                                        "the replication stream from {peer} broke: {e}"
                                    );
                                }
                                break;
                            }
                        };
                        let urgent = matches!(rec, Record::Output { .. } | Record::End { .. });
                        let end = matches!(rec, Record::End { .. });
                        s.received_lsn.store(lsn, Ordering::SeqCst);
                        s.received_bytes.store(reader.valid_len(), Ordering::Relaxed);
                        batch.push((lsn, rec));
                        since_ack = since_ack.saturating_add(1);
                        owed |= urgent;
                        // An ack means "received and verified"; a backup deciding to go live
                        // stops acking. An output is acknowledged at the end of its frame (one
                        // ack for the outputs of one exit, which the primary sends together).
                        let drained = buffered.load(Ordering::Relaxed) == 0;
                        if ((owed && drained) || since_ack >= 64 || last_ack.elapsed() >= ACK_EVERY)
                            && !s.won_arbiter.load(Ordering::SeqCst)
                        {
                            owed = false;
                            since_ack = 0;
                            last_ack = Instant::now();
                            // The backup's own part of the output's hold, as durations on
                            // this host's clock (the primary's clock is another).
                            let verified = if crate::stages::enabled() { crate::stages::now_ns() } else { 0 };
                            let mut w = lock(&w);
                            let ack = if verified > 0 {
                                let verify = verified.saturating_sub(received_at.load(Ordering::Relaxed));
                                Ack { lsn, verify_ns: verify, ack_ns: crate::stages::now_ns() - verified }
                            } else {
                                Ack { lsn, verify_ns: 0, ack_ns: 0 }
                            };
                            if w.write_all(&ack.encode()).and_then(|_| w.flush()).is_err() {
                                break;
                            }
                        }
                        // The replay gets a frame's records at its end, after the ack: waking
                        // the replay's thread first would delay the primary's outputs.
                        if (drained || end || batch.len() >= HAND_OVER_BATCH) && !hand_over(&tx, &mut batch) {
                            return;
                        }
                        if end {
                            s.primary_ended.store(true, Ordering::SeqCst);
                            return;
                        }
                    }
                    // The stream broke. What it verified goes to the replay; keep the channel
                    // open until the failover is decided, so the replay waits rather than going
                    // live without the arbiter.
                    if !hand_over(&tx, &mut batch) {
                        return;
                    }
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
            let hb = heartbeats.clone();
            let stream = shutdown.try_clone().map_err(io("socket"))?;
            std::thread::Builder::new()
                .name("ftvm-heartbeat".into())
                .spawn(move || {
                    ftvm_seccomp::enter(ftvm_seccomp::Thread::Link);
                    monitor(s, arb, cfg, hb, stream)
                })
                .map_err(io("thread"))?;
        }
        let source = Box::new(ChannelSource::new(rx, state.clone()));
        Ok((Backup { state, arbiter, acks, shutdown, heartbeats }, theirs, source))
    }

    /// The gate for the replay's outputs: held until OUTPUT_DONE covers them or the backup
    /// goes live.
    pub fn gate(&self) -> Box<dyn OutputGate> {
        Box::new(BackupGate { pending: VecDeque::new(), state: self.state.clone(), live: false })
    }

    /// The replay diverged: tell the primary (it resyncs this backup by a new state transfer)
    /// and end this connection. The backup never goes live from here. Keep the link until
    /// the resync's connection arrives.
    pub fn request_resync(&self, why: &str) {
        self.state.diverged.store(true, Ordering::SeqCst);
        self.state.protected.store(false, Ordering::SeqCst);
        let mut w = lock(&self.acks);
        let _ = w
            .write_all(&ACK_RESYNC.to_le_bytes())
            .and_then(|_| link::write_blob(&mut *w, why.as_bytes()))
            .and_then(|_| w.flush());
        drop(w);
        // Only our direction: the primary reads the request, then closes. Closing the socket
        // now, with log bytes unread, would send a reset that can overtake the request.
        let _ = self.shutdown.shutdown(std::net::Shutdown::Write);
    }
}

fn monitor(
    s: Arc<BackupState>,
    arb: ArbiterSlot,
    cfg: BackupConfig,
    heartbeats: Arc<Heartbeats>,
    stream: std::net::TcpStream,
) {
    let mut last_seen = Instant::now();
    let mut next_send = Instant::now();
    let mut seq = 0u64;
    let mut handover = false;
    loop {
        if s.primary_ended.load(Ordering::SeqCst) || s.stop.load(Ordering::SeqCst) {
            return;
        }
        if s.diverged.load(Ordering::SeqCst) {
            // The resync comes on a new connection, with a monitor of its own.
            return;
        }
        if let Some(h) = heartbeats.recv().filter(|h| h.role == Role::Primary) {
            last_seen = Instant::now();
            s.outputs_done.fetch_max(h.outputs_done, Ordering::SeqCst);
            // Once protected, a link stays so until it ends; the primary hears of it at once.
            if h.flags & FLAG_PROTECTED != 0 && !s.protected.swap(true, Ordering::SeqCst) {
                next_send = Instant::now();
            }
            if h.flags & FLAG_HANDOVER != 0 {
                handover = true;
            }
        }
        if Instant::now() >= next_send {
            seq += 1;
            heartbeats.send(&Heartbeat {
                role: Role::Backup,
                flags: if s.diverged.load(Ordering::SeqCst) {
                    FLAG_DIVERGED
                } else if s.protected.load(Ordering::SeqCst) {
                    FLAG_PROTECTED
                } else {
                    0
                },
                seq,
                outputs_done: 0,
                lsn: s.received_lsn.load(Ordering::Relaxed),
                replayed: s.replayed_lsn.load(Ordering::Relaxed),
            });
            next_send = Instant::now() + HEARTBEAT_INTERVAL;
        }
        if handover || last_seen.elapsed() > cfg.timeout {
            let silence = last_seen.elapsed();
            s.silence_ms.store(silence.as_millis() as u64, Ordering::SeqCst);
            let _ = s.decided_at.set(Instant::now());
            // Stop receiving (and acking) before trying to go live.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            if !s.protected.load(Ordering::SeqCst) {
                s.halt(format!(
                    "the primary went silent ({} ms) before this backup had caught up after its state transfer",
                    silence.as_millis()
                ));
                return;
            }
            if handover {
                tracing::info!(
                    target: "ftvm::event",
                    event = "handover",
                    "the primary hands over (switchover); taking the arbiter"
                );
            } else {
                tracing::warn!(
                    target: "ftvm::event",
                    event = "primary_silent",
                    silence_ms = silence.as_millis() as u64,
                    "no heartbeat from the primary for {} ms; taking the arbiter",
                    silence.as_millis()
                );
            }
            // On a switchover the primary releases the arbiter as it exits, just after.
            let wait = if handover { cfg.arbiter_wait().max(Duration::from_secs(5)) } else { cfg.arbiter_wait() };
            match Arbiter::acquire(&cfg.arbiter, wait) {
                Ok(Some(lock)) => {
                    let lock = Arc::new(lock);
                    // A lease lost later halts this side (now the live one) at once.
                    lock.on_lost(Box::new(|why| crate::halt(&format!("the arbiter was lost ({why})"))));
                    *ftvm_sync::lock(&arb) = Some(lock);
                    s.won_arbiter.store(true, Ordering::SeqCst);
                }
                Ok(None) => s.halt("the arbiter is held (the primary still lives)".into()),
                Err(e) => s.halt(e.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_takes_the_handed_over_batches_in_order_and_ends_with_the_channel() {
        let state = Arc::new(BackupState::default());
        let (tx, rx) = mpsc::sync_channel(4);
        let mut source = ChannelSource::new(rx, state.clone());
        let clock = |exit, t| Record::Clock { exit, t };
        let mut batch = vec![(1, clock(1, 10)), (2, clock(1, 11))];
        assert!(hand_over(&tx, &mut batch) && batch.is_empty());
        assert!(hand_over(&tx, &mut batch), "an empty batch is not sent");
        batch.push((3, clock(2, 12)));
        assert!(hand_over(&tx, &mut batch));
        drop(tx);
        for (lsn, t) in [(1, 10), (2, 11), (3, 12)] {
            assert!(matches!(source.next_record(), Ok(Some(Record::Clock { t: got, .. })) if got == t));
            assert_eq!(state.replayed_lsn.load(Ordering::Relaxed), lsn);
        }
        assert!(matches!(source.next_record(), Ok(None)));
    }

    #[test]
    fn a_halted_backup_says_why_its_replay_stopped_not_that_the_log_is_damaged() {
        let state = Arc::new(BackupState::default());
        let (tx, rx) = mpsc::channel();
        let mut source = ChannelSource::new(rx, state.clone());
        state.halt("no heartbeat from the primary for 300 ms, and the arbiter is held".into());
        drop(tx);
        let e = source.next_record().unwrap_err();
        let why = source.failure_detail(&e);
        assert!(why.contains("the arbiter is held") && why.contains("halted"), "{why}");
        assert!(!why.contains("damaged"), "{why}");

        let state = Arc::new(BackupState::default());
        let (tx, rx) = mpsc::channel();
        let mut source = ChannelSource::new(rx, state.clone());
        state.diverged.store(true, Ordering::SeqCst);
        drop(tx);
        let e = source.next_record().unwrap_err();
        let why = source.failure_detail(&e);
        assert!(why.contains("diverged") && !why.contains("damaged"), "{why}");
    }
}
