//! Record and replay behind the event source: the recorder writes every host input, exit
//! signature, checkpoint and output to the log; the replayer takes inputs from the log and
//! checks everything else against it, stopping at the first disagreement with a report.
//!
//! Positions: every record carries the exit index at which it was produced. Within one exit,
//! records appear in the order the vCPU loop asks for them (time-dependent reads during the
//! access, then the deadline admission, console input, received frames, outputs), and replay
//! asks in the same order, so a record is consumed by the same call that produced it.

use std::fmt;
use std::io::{Read, Write};

use ftvm_log::{EndReason, Hasher64, LogError, LogReader, LogWriter, Lsn, Record};

/// Where a replay takes its records from: a log file, or a backup's stream from its primary.
pub trait RecordSource: Send {
    /// The next record; `Ok(None)` when the stream has ended. May block for more.
    fn next_record(&mut self) -> Result<Option<Record>, LogError>;
    /// Why the stream ended, for reports (a torn tail, a primary that went away, ...).
    fn end_detail(&self) -> String;
    /// Whether the end of the stream (or damage in it) is final: nothing more will ever come,
    /// so the replay stops at once, where it stands, rather than running a guest on that can
    /// only wait for what the log no longer holds (a guest spinning in ring 3 until a sync
    /// point that is not there would run at 100% CPU for ever). A log file: `true`. `false`
    /// (the default) leaves the end to the replay's owner (a backup goes live).
    fn end_is_final(&self) -> bool {
        false
    }
    /// What the replay reports when `next_record` failed with `error`: for a log, the damage
    /// it found. A source that fails on purpose (a backup that halted) says why instead.
    fn failure_detail(&self, error: &LogError) -> String {
        format!("the log is damaged: {error}")
    }
}

impl<R: Read + Send> RecordSource for LogReader<R> {
    fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        Ok(self.next()?.map(|(_, r)| r))
    }

    fn end_detail(&self) -> String {
        let at = self.valid_len();
        if self.truncated() {
            format!("the log is cut inside a frame after byte {at} (torn tail)")
        } else {
            format!("the log ends after byte {at} without an END record")
        }
    }

    fn end_is_final(&self) -> bool {
        true
    }
}

/// How often (in counted exits) a checkpoint with a register digest is logged.
pub const CHECKPOINT_INTERVAL: u64 = 4096;

/// The signature of one counted exit (docs/record-replay.md: kind, address, size, written data, RIP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitSignature {
    pub kind: u8,
    pub addr: u64,
    pub size: u8,
    pub data: u64,
    pub rip: u64,
}

/// Exit kinds as they appear in signatures.
pub mod exit_kind {
    pub const IO_IN: u8 = 1;
    pub const IO_OUT: u8 = 2;
    pub const MMIO_READ: u8 = 3;
    pub const MMIO_WRITE: u8 = 4;
    pub const HLT: u8 = 5;
    pub const RDMSR: u8 = 6;
    pub const WRMSR: u8 = 7;
    pub const SHUTDOWN: u8 = 8;
}

impl fmt::Display for ExitSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            exit_kind::IO_IN => "port read",
            exit_kind::IO_OUT => "port write",
            exit_kind::MMIO_READ => "MMIO read",
            exit_kind::MMIO_WRITE => "MMIO write",
            exit_kind::HLT => "HLT",
            exit_kind::RDMSR => "RDMSR",
            exit_kind::WRMSR => "WRMSR",
            exit_kind::SHUTDOWN => "shutdown",
            _ => "exit",
        };
        write!(f, "{kind} addr={:#x} size={} data={:#x} rip={:#x}", self.addr, self.size, self.data, self.rip)
    }
}

/// Where and how a replay left the recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// The exit index at which the disagreement was found.
    pub exit: u64,
    /// What the log says.
    pub expected: String,
    /// What the replay did.
    pub actual: String,
    /// The last exit at which a signature, checkpoint or output was verified equal (`None`:
    /// the very first check disagreed).
    pub last_agreement: Option<u64>,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "replay diverged at exit {}\n  expected (log): {}\n  actual (replay): {}",
            self.exit, self.expected, self.actual
        )?;
        match self.last_agreement {
            Some(exit) => write!(f, "\n  last point of agreement: exit {exit}"),
            None => write!(f, "\n  last point of agreement: none (the first check already disagreed)"),
        }
    }
}

pub(crate) struct Recorder {
    writer: LogWriter<Box<dyn Write + Send>>,
    /// Between a counted exit and its signature (the access is being handled), records wait
    /// here so that the signature can be logged before them.
    dispatching: Option<u64>,
    buffer: Vec<Record>,
    /// The current exit's signature, logged before the first record positioned at it.
    pending_sig: Option<(u64, ExitSignature)>,
    hasher: Hasher64,
    output_ordinal: u64,
    /// The first write error; recording stops being faithful after it, so the VM stops.
    pub(crate) failed: Option<LogError>,
    pub(crate) size_limit_hit: bool,
}

impl Recorder {
    pub(crate) fn new(writer: LogWriter<Box<dyn Write + Send>>) -> Self {
        Recorder {
            writer,
            dispatching: None,
            buffer: Vec::new(),
            pending_sig: None,
            hasher: Hasher64::new(),
            output_ordinal: 0,
            failed: None,
            size_limit_hit: false,
        }
    }

    pub(crate) fn begin_exit(&mut self, index: u64) {
        self.flush_buffer();
        self.pending_sig = None;
        self.dispatching = Some(index);
    }

    pub(crate) fn signature(&mut self, index: u64, sig: ExitSignature) {
        self.hasher.write_exit_sig(sig.kind, sig.addr, sig.size, sig.data, sig.rip);
        self.pending_sig = Some((index, sig));
        self.dispatching = None;
        self.flush_buffer();
    }

    fn flush_buffer(&mut self) {
        self.dispatching = None;
        for r in std::mem::take(&mut self.buffer) {
            self.append(r);
        }
    }

    pub(crate) fn append(&mut self, record: Record) {
        if self.failed.is_some() || self.size_limit_hit {
            return;
        }
        if self.dispatching.is_some() {
            self.buffer.push(record);
            return;
        }
        if let Some((exit, s)) = self.pending_sig.take() {
            if exit == record.exit() {
                let sig = Record::ExitSig { exit, kind: s.kind, addr: s.addr, size: s.size, data: s.data, rip: s.rip };
                if !self.write(sig) {
                    return;
                }
            }
        }
        self.write(record);
    }

    fn write(&mut self, record: Record) -> bool {
        match self.writer.append(&record) {
            Ok(_) => true,
            Err(LogError::SizeLimit { .. }) => {
                self.size_limit_hit = true;
                false
            }
            Err(e) => {
                self.failed = Some(e);
                false
            }
        }
    }

    pub(crate) fn checkpoint(&mut self, exit: u64, regs_hash: u64) {
        let exits_hash = self.hasher.finish();
        self.hasher.reset();
        self.append(Record::Checkpoint { exit, exits_hash, regs_hash });
    }

    /// Logs an output; returns its ordinal and the LSN of its record (`None` if the log
    /// could not take it).
    pub(crate) fn output(&mut self, exit: u64, kind: u8, bytes: &[u8]) -> (u64, Option<Lsn>) {
        let ordinal = self.output_ordinal;
        self.output_ordinal += 1;
        let digest = ftvm_log::hash64(bytes);
        self.append(Record::Output { exit, ordinal, kind, len: bytes.len() as u32, digest, data: None });
        let lsn = (self.failed.is_none() && !self.size_limit_hit).then(|| self.writer.next_lsn() - 1);
        // An output is where a backup must be up to date: the vCPU loop pushes the log out
        // once the exit's outputs are all logged (one frame for all of them).
        (ordinal, lsn)
    }

    /// Flushes buffered log bytes (a backup waits for them to leave exit N behind).
    pub(crate) fn flush(&mut self) {
        if let Err(e) = self.writer.flush() {
            self.failed.get_or_insert(e);
        }
    }

    pub(crate) fn end(&mut self, exit: u64, reason: EndReason) -> Result<(), LogError> {
        self.flush_buffer();
        self.pending_sig = None;
        let reason = if self.size_limit_hit { EndReason::SizeLimit } else { reason };
        self.size_limit_hit = false; // the writer keeps room for END
        self.write(Record::End { exit, reason });
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        self.writer.flush()
    }

    pub(crate) fn bytes_written(&self) -> u64 {
        self.writer.bytes_written()
    }

    pub(crate) fn next_lsn(&self) -> u64 {
        self.writer.next_lsn()
    }
}

/// Why a replay stopped short of the end of the log's run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayStop {
    /// The log ends (torn tail or cut short) before the recording's END.
    LogEndsEarly { exit: u64, detail: String },
    /// The log is damaged (a bad checksum, length or record); the replay was exact up to it.
    LogCorrupt { exit: u64, detail: String },
    /// Replay and recording disagree.
    Diverged(Divergence),
}

pub(crate) struct Replayer {
    reader: Box<dyn RecordSource>,
    peeked: Option<Record>,
    /// Set when the reader has nothing more (end, torn tail or an error), with whether it
    /// was damage.
    exhausted: Option<(String, bool)>,
    hasher: Hasher64,
    output_ordinal: u64,
    last_agreement: Option<u64>,
    /// The signature the log holds for the current exit, checked once the access is handled.
    expected_sig: Option<(u64, ExitSignature)>,
    pub(crate) stop: Option<ReplayStop>,
    pub(crate) end: Option<EndReason>,
    /// The exit the replay is at (the latest `begin_exit`), where a final end of the stream
    /// stops it.
    position: u64,
    /// Whether the END record was taken (the stream may end after it).
    took_end: bool,
}

impl Replayer {
    pub(crate) fn new(reader: Box<dyn RecordSource>) -> Self {
        Replayer {
            reader,
            peeked: None,
            exhausted: None,
            hasher: Hasher64::new(),
            output_ordinal: 0,
            last_agreement: None,
            expected_sig: None,
            stop: None,
            end: None,
            position: 0,
            took_end: false,
        }
    }

    /// The next record without taking it.
    pub(crate) fn peek(&mut self) -> Option<&Record> {
        if self.peeked.is_none() && self.exhausted.is_none() {
            match self.reader.next_record() {
                Ok(Some(r)) => self.peeked = Some(r),
                Ok(None) => self.exhausted = Some((self.reader.end_detail(), false)),
                Err(e) => self.exhausted = Some((self.reader.failure_detail(&e), true)),
            }
            if self.peeked.is_none() {
                self.ended_for_good();
            }
        }
        self.peeked.as_ref()
    }

    /// The stream has nothing more. If that is final (a log file) and the recording's END
    /// was not reached, the replay stops here: everything the log held was taken and
    /// checked, and running on could only wait for records that will never come. Damage is
    /// reported as damage even where a check would disagree later for want of a record.
    fn ended_for_good(&mut self) {
        if self.stop.is_some() || self.took_end || !self.reader.end_is_final() {
            return;
        }
        let exit = self.position;
        self.stop = match self.exhausted.clone() {
            Some((detail, false)) => Some(ReplayStop::LogEndsEarly { exit, detail }),
            Some((detail, true)) => Some(ReplayStop::LogCorrupt { exit, detail }),
            None => None,
        };
    }

    fn take(&mut self) -> Option<Record> {
        self.peek();
        let r = self.peeked.take();
        self.took_end |= matches!(r, Some(Record::End { .. }));
        r
    }

    /// Whether the stream has ended cleanly (not damaged) and every record was taken.
    pub(crate) fn exhausted(&mut self) -> bool {
        self.peek().is_none() && matches!(self.exhausted, Some((_, false)))
    }

    /// The ordinal the next output will have.
    pub(crate) fn next_output_ordinal(&self) -> u64 {
        self.output_ordinal
    }

    /// Whether the next record is a checkpoint at `exit` (the recording took one here).
    pub(crate) fn checkpoint_at(&mut self, exit: u64) -> bool {
        matches!(self.peek(), Some(Record::Checkpoint { exit: e, .. }) if *e == exit)
    }

    /// Whether the next record is positioned at `exit`.
    pub(crate) fn has_records_at(&mut self, exit: u64) -> bool {
        self.peek().is_some_and(|r| r.exit() == exit)
    }

    /// The END record at `exit`, if that is what comes next.
    pub(crate) fn end_at(&mut self, exit: u64) -> Option<EndReason> {
        match self.peek() {
            Some(Record::End { exit: e, reason }) if *e == exit => Some(reason.clone()),
            _ => None,
        }
    }

    fn diverge(&mut self, exit: u64, expected: String, actual: String) {
        if self.stop.is_none() {
            self.stop =
                Some(ReplayStop::Diverged(Divergence { exit, expected, actual, last_agreement: self.last_agreement }));
        }
    }

    /// Called when the replay needs a record at `exit` and there is none: either the log
    /// has ended early or the replay went somewhere the recording did not.
    fn missing(&mut self, exit: u64, wanted: &str) {
        if self.stop.is_some() {
            return;
        }
        // The recording was stopped from outside during this exit (operator stop, size limit):
        // it logged nothing more here; the replay ends after this exit too.
        if let Some(Record::End { exit: e, reason }) = self.peek() {
            if *e == exit
                && !matches!(reason, EndReason::GuestPowerOff | EndReason::GuestReset | EndReason::TripleFault)
            {
                return;
            }
        }
        match (self.peek().cloned(), self.exhausted.clone()) {
            (None, Some((detail, false))) => self.stop = Some(ReplayStop::LogEndsEarly { exit, detail }),
            (None, Some((detail, true))) => self.stop = Some(ReplayStop::LogCorrupt { exit, detail }),
            (Some(next), _) => {
                self.diverge(exit, format!("next record: {next}"), format!("needed {wanted} at exit {exit}"))
            }
            (None, None) => {}
        }
    }

    pub(crate) fn begin_exit(&mut self, index: u64) {
        self.expected_sig = None;
        self.position = index;
        // A record left at an earlier exit is an input the replay failed to take. (Looked at
        // in place: a clone of the next record at every exit copied its frame or bytes.)
        if let Some(left) = self.peek().filter(|r| r.exit() < index).map(|r| (r.exit(), r.to_string())) {
            self.diverge(left.0, left.1, "the replay moved past this exit without taking it".into());
            return;
        }
        if let Some(&Record::ExitSig { exit, kind, addr, size, data, rip }) = self.peek() {
            if exit == index {
                self.take();
                self.expected_sig = Some((index, ExitSignature { kind, addr, size, data, rip }));
            }
        }
    }

    pub(crate) fn signature(&mut self, index: u64, sig: ExitSignature) {
        self.hasher.write_exit_sig(sig.kind, sig.addr, sig.size, sig.data, sig.rip);
        if let Some((exit, logged)) = self.expected_sig.take() {
            if exit != index {
                return;
            }
            if logged == sig {
                self.last_agreement = Some(index);
            } else {
                self.diverge(index, format!("exit signature {logged}"), format!("exit signature {sig}"));
            }
        }
    }

    /// A disagreement found outside this module (e.g. a clock admission before its deadline).
    pub(crate) fn mismatch(&mut self, exit: u64, expected: String, actual: String) {
        self.diverge(exit, expected, actual);
    }

    pub(crate) fn checkpoint(&mut self, exit: u64, regs_hash: u64) {
        let exits_hash = self.hasher.finish();
        self.hasher.reset();
        match self.take_at(exit, |r| matches!(r, Record::Checkpoint { .. })) {
            Some(Record::Checkpoint { exits_hash: e, regs_hash: g, .. }) => {
                if (e, g) == (exits_hash, regs_hash) {
                    self.last_agreement = Some(exit);
                } else {
                    self.diverge(
                        exit,
                        format!("checkpoint exits_hash={e:#018x} regs_hash={g:#018x}"),
                        format!("checkpoint exits_hash={exits_hash:#018x} regs_hash={regs_hash:#018x}"),
                    );
                }
            }
            _ => self.missing(exit, "a checkpoint"),
        }
    }

    pub(crate) fn page_hashes(&mut self, exit: u64, pages: Vec<(u64, u64)>) {
        match self.take_at(exit, |r| matches!(r, Record::PageHashes { .. })) {
            Some(Record::PageHashes { pages: logged, .. }) => {
                if logged == pages {
                    self.last_agreement = Some(exit);
                    return;
                }
                let ours: std::collections::BTreeMap<u64, u64> = pages.iter().copied().collect();
                let theirs: std::collections::BTreeMap<u64, u64> = logged.iter().copied().collect();
                let first = theirs
                    .iter()
                    .find(|(gfn, h)| ours.get(gfn) != Some(h))
                    .map(|(gfn, h)| {
                        (
                            format!("page {:#x} hash {h:#018x}", gfn * 4096),
                            match ours.get(gfn) {
                                Some(o) => format!("page {:#x} hash {o:#018x}", gfn * 4096),
                                None => format!("page {:#x} not written", gfn * 4096),
                            },
                        )
                    })
                    .or_else(|| {
                        ours.keys().find(|g| !theirs.contains_key(g)).map(|g| {
                            (format!("page {:#x} not written", g * 4096), format!("page {:#x} written", g * 4096))
                        })
                    });
                if let Some((expected, actual)) = first {
                    self.diverge(exit, expected, actual);
                }
            }
            _ => self.missing(exit, "page hashes"),
        }
    }

    /// Takes the next record if it is at `exit` and matches `want`.
    /// The frames of the pages whose hashes the log has next at `exit`, if it has them.
    pub(crate) fn logged_pages(&mut self, exit: u64) -> Option<Vec<u64>> {
        match self.peek() {
            Some(Record::PageHashes { exit: e, pages }) if *e == exit => Some(pages.iter().map(|p| p.0).collect()),
            _ => None,
        }
    }

    pub(crate) fn take_at(&mut self, exit: u64, want: impl Fn(&Record) -> bool) -> Option<Record> {
        match self.peek() {
            Some(r) if r.exit() == exit && want(r) => self.take(),
            _ => None,
        }
    }

    /// A time-dependent read during an access: the log must have a CLOCK here.
    pub(crate) fn clock_read(&mut self, exit: u64) -> Option<u64> {
        match self.take_at(exit, |r| matches!(r, Record::Clock { .. })) {
            Some(Record::Clock { t, .. }) => Some(t),
            _ => {
                self.missing(exit, "a clock reading");
                None
            }
        }
    }

    /// A deadline admission: a CLOCK here if the recording admitted one, else nothing.
    pub(crate) fn clock_admission(&mut self, exit: u64) -> Option<u64> {
        match self.take_at(exit, |r| matches!(r, Record::Clock { .. })) {
            Some(Record::Clock { t, .. }) => Some(t),
            _ => None,
        }
    }

    pub(crate) fn console_input(&mut self, exit: u64, room: usize) -> Vec<u8> {
        match self.take_at(exit, |r| matches!(r, Record::ConsoleInput { .. })) {
            Some(Record::ConsoleInput { bytes, .. }) if bytes.len() <= room => bytes,
            Some(Record::ConsoleInput { bytes, .. }) => {
                self.diverge(exit, format!("{} console bytes", bytes.len()), format!("room for {room}"));
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Whether the recording delivered an operator's shutdown request at `exit`.
    pub(crate) fn shutdown_request(&mut self, exit: u64) -> bool {
        self.take_at(exit, |r| matches!(r, Record::ShutdownRequest { .. })).is_some()
    }

    pub(crate) fn frame(&mut self, exit: u64, dev: u8) -> Option<Vec<u8>> {
        match self.take_at(exit, |r| matches!(r, Record::NetRx { dev: d, .. } if *d == dev)) {
            Some(Record::NetRx { frame, .. }) => Some(frame),
            _ => None,
        }
    }

    pub(crate) fn frame_waiting(&mut self, exit: u64, dev: u8) -> bool {
        matches!(self.peek(), Some(Record::NetRx { exit: e, dev: d, .. }) if *e == exit && *d == dev)
    }

    pub(crate) fn entropy(&mut self, exit: u64, buf: &mut [u8]) -> bool {
        match self.take_at(exit, |r| matches!(r, Record::Entropy { .. })) {
            Some(Record::Entropy { bytes, .. }) if bytes.len() == buf.len() => {
                buf.copy_from_slice(&bytes);
                true
            }
            Some(Record::Entropy { bytes, .. }) => {
                self.diverge(exit, format!("{} entropy bytes", bytes.len()), format!("{} requested", buf.len()));
                false
            }
            _ => {
                self.missing(exit, "entropy bytes");
                false
            }
        }
    }

    pub(crate) fn output(&mut self, exit: u64, kind: u8, bytes: &[u8]) {
        let ordinal = self.output_ordinal;
        self.output_ordinal += 1;
        let digest = ftvm_log::hash64(bytes);
        match self.take_at(exit, |r| matches!(r, Record::Output { .. })) {
            Some(Record::Output { ordinal: o, kind: k, len, digest: d, .. }) => {
                if (o, k, len as usize, d) == (ordinal, kind, bytes.len(), digest) {
                    self.last_agreement = Some(exit);
                } else {
                    self.diverge(
                        exit,
                        format!("output #{o} kind {k} of {len} bytes, digest {d:#018x}"),
                        format!("output #{ordinal} kind {kind} of {} bytes, digest {digest:#018x}", bytes.len()),
                    );
                }
            }
            _ => self.missing(exit, &format!("output #{ordinal} ({} bytes)", bytes.len())),
        }
    }

    pub(crate) fn end(&mut self, exit: u64, reason: EndReason) {
        match self.take_at(exit, |r| matches!(r, Record::End { .. })) {
            Some(Record::End { reason: logged, .. }) if logged == reason => {
                self.last_agreement = Some(exit);
                self.end = Some(reason);
            }
            Some(Record::End { reason: logged, .. }) => {
                self.diverge(exit, format!("end: {logged}"), format!("end: {reason}"))
            }
            _ => self.missing(exit, &format!("the end of the run ({reason})")),
        }
    }

    /// Called when the guest is halted at `exit` and nothing can wake it from the log.
    pub(crate) fn halted_without_input(&mut self, exit: u64) {
        self.missing(exit, "an input to wake the halted guest");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that fails at once, on purpose (as a halted backup's does).
    struct Halted;

    impl RecordSource for Halted {
        fn next_record(&mut self) -> Result<Option<Record>, LogError> {
            Err(LogError::ReaderFailed)
        }
        fn end_detail(&self) -> String {
            "the stream ended".into()
        }
        fn failure_detail(&self, _: &LogError) -> String {
            "the link to the primary was cut and the arbiter is held: halted".into()
        }
    }

    #[test]
    fn a_source_that_fails_on_purpose_says_why_not_that_the_log_is_damaged() {
        let mut r = Replayer::new(Box::new(Halted));
        r.begin_exit(0);
        r.output(0, 1, b"x");
        match &r.stop {
            Some(ReplayStop::LogCorrupt { detail, .. }) => {
                assert!(detail.contains("halted") && !detail.contains("damaged"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }
}
