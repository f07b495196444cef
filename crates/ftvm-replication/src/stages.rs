//! Where an output's hold goes: the time from the moment the vCPU hands an output to the
//! gate to the moment it is performed, split into stages along its path.
//!
//! Primary-side points are read on the primary's clock; the backup measures its own part as
//! durations on its clock and sends them back with the acknowledgement, so no stage compares
//! the two hosts' clocks:
//!
//! | stage | from | to |
//! |---|---|---|
//! | `seal` | held (submitted to the gate) | its log frame sealed (the exit's other outputs, the flush, the encryption) |
//! | `send` | sealed | sent (the `send(2)`, or the wait behind a backlog in the sender thread) |
//! | `wire` | sent | acknowledgement received, less the backup's own time: both hops and the wake-ups at either end |
//! | `backup_verify` | the frame's bytes read by the backup | its records opened and checksum-verified (the backup's clock) |
//! | `backup_ack` | verified | the acknowledgement written (the backup's clock) |
//! | `release` | acknowledgement received | output performed (the performer, the TAP or console write) |
//!
//! The six add up to the hold exactly ([`Stamps::stages`]).

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::Instant;

/// The stages' names, in path order.
pub const STAGES: [&str; 6] = ["seal", "send", "wire", "backup_verify", "backup_ack", "release"];

/// Whether stage timing is on (it is, unless `FTVM_STAGE_TIMES=0`: for measuring its cost).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FTVM_STAGE_TIMES").map_or(true, |v| v != "0"))
}

/// Nanoseconds on this process's monotonic clock (from its first call; never 0, which
/// stands for "not measured").
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// The points of one output's path, in ns on the primary's clock, and the backup's two
/// durations (ns on its own clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamps {
    pub held: u64,
    pub sealed: u64,
    pub sent: u64,
    pub ack_received: u64,
    pub performed: u64,
    pub backup_verify: u64,
    pub backup_ack: u64,
}

impl Stamps {
    /// The six stages in ns, adding up to `performed - held`. Points out of order (a frame
    /// flushed before its output was handed over, say) are clamped to the one before; the
    /// backup's durations to the time between sent and acknowledged.
    pub fn stages(&self) -> [u64; 6] {
        let held = self.held;
        let sealed = self.sealed.max(held);
        let sent = self.sent.max(sealed);
        let acked = self.ack_received.max(sent);
        let performed = self.performed.max(acked);
        let round = acked - sent;
        let backup = (self.backup_verify.saturating_add(self.backup_ack)).min(round);
        let verify = self.backup_verify.min(backup);
        [sealed - held, sent - sealed, round - backup, verify, backup - verify, performed - acked]
    }
}

/// Buckets of a histogram in ns: exact below 32, then 16 per power of two (within 1/16).
const BUCKETS: usize = 32 + 16 * 59;

fn bucket(v: u64) -> usize {
    if v < 32 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros() as usize; // >= 5
    32 + (e - 5) * 16 + ((v >> (e - 4)) & 15) as usize
}

/// The largest value in a bucket.
pub fn bucket_upper(i: usize) -> u64 {
    if i < 32 {
        return i as u64;
    }
    let e = (i - 32) / 16 + 5;
    let sub = ((i - 32) % 16) as u64;
    ((16 + sub + 1) << (e - 4)) - 1
}

/// A histogram of durations in ns, with their sum.
#[derive(Debug, Clone)]
pub struct Histogram {
    pub count: u64,
    pub sum_ns: u64,
    counts: Box<[u64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { count: 0, sum_ns: 0, counts: vec![0; BUCKETS].into_boxed_slice() }
    }
}

impl Histogram {
    pub fn record(&mut self, ns: u64) {
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.counts[bucket(ns).min(BUCKETS - 1)] += 1;
    }

    /// The non-empty buckets: (the bucket's largest value in ns, count), ascending.
    pub fn buckets(&self) -> Vec<(u64, u64)> {
        self.counts.iter().enumerate().filter(|(_, &c)| c > 0).map(|(i, &c)| (bucket_upper(i), c)).collect()
    }
}

/// The names of [`StageFigures::parts`]: the `release` stage looked at more closely.
pub const PARTS: [&str; 3] = ["release_write", "release_vcpu", "release_thread"];

/// The stage figures of the outputs performed so far: one histogram per stage and one of
/// the whole hold, and the `release` stage in [`PARTS`]: the output's own write (the
/// `perform` call; the rest of `release` is the wait for the writes before it and for the
/// performer), and `release` of the outputs the vCPU thread performed and of those another
/// thread did (their counts: who performs how many).
#[derive(Debug, Clone, Default)]
pub struct StageFigures {
    pub stages: [Histogram; 6],
    pub hold: Histogram,
    pub parts: [Histogram; 3],
}

/// How one output was performed: how long its own write took, and on which thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Performed {
    /// When the write ended (the output's `performed` point).
    pub at: u64,
    /// The write's duration.
    pub write_ns: u64,
    /// The vCPU thread performed it (between exits), not the acknowledgement thread.
    pub on_vcpu: bool,
}

/// A flush of the log on its way out: when it was sealed and sent.
#[derive(Debug, Clone, Copy)]
struct Flush {
    seq: u64,
    sealed: u64,
    sent: u64,
}

/// An acknowledgement as it arrived: the LSN, when, and the backup's two durations.
#[derive(Debug, Clone, Copy)]
struct Ack {
    lsn: u64,
    at: u64,
    verify: u64,
    ack: u64,
}

/// Recent flushes and acknowledgements, matched to outputs as they are performed (outputs,
/// flushes and acknowledgements all go in log order), and the figures so far.
#[derive(Debug, Default)]
pub struct StageBook {
    /// Flushes begun (the next one's number).
    flushes: u64,
    recent_flushes: VecDeque<Flush>,
    recent_acks: VecDeque<Ack>,
    pub figures: StageFigures,
}

/// How many recent flushes and acknowledgements are kept for outputs still held.
const KEEP: usize = 4096;

impl StageBook {
    /// The number the next flush will have (an output handed over now goes out in it).
    pub fn next_flush(&self) -> u64 {
        self.flushes
    }

    /// A flush begins: its number.
    pub fn begin_flush(&mut self) -> u64 {
        self.flushes += 1;
        self.flushes - 1
    }

    /// Flush `seq` was sealed at `sealed` and its last byte handed to the socket at `sent`.
    pub fn flushed(&mut self, seq: u64, sealed: u64, sent: u64) {
        if self.recent_flushes.len() >= KEEP {
            self.recent_flushes.pop_front();
        }
        self.recent_flushes.push_back(Flush { seq, sealed, sent });
    }

    pub fn acknowledged(&mut self, lsn: u64, at: u64, verify: u64, ack: u64) {
        if self.recent_acks.len() >= KEEP {
            self.recent_acks.pop_front();
        }
        self.recent_acks.push_back(Ack { lsn, at, verify, ack });
    }

    /// An output held since `held` (at log position `lsn`, sent in flush `flush`) was
    /// performed (`how`): its stages go into the figures. Returns its stamps, or `None` when
    /// its flush or acknowledgement is not known (not counted).
    pub fn performed(&mut self, held: u64, flush: u64, lsn: u64, how: Performed) -> Option<Stamps> {
        let performed = how.at;
        while self.recent_flushes.front().is_some_and(|f| f.seq < flush) {
            self.recent_flushes.pop_front();
        }
        while self.recent_acks.front().is_some_and(|a| a.lsn < lsn) {
            self.recent_acks.pop_front();
        }
        let f = self.recent_flushes.iter().find(|f| f.seq == flush).copied()?;
        let a = self.recent_acks.front().copied()?;
        let stamps = Stamps {
            held,
            sealed: f.sealed,
            sent: f.sent,
            ack_received: a.at,
            performed,
            backup_verify: a.verify,
            backup_ack: a.ack,
        };
        let stages = stamps.stages();
        for (h, v) in self.figures.stages.iter_mut().zip(stages) {
            h.record(v);
        }
        self.figures.hold.record(performed.saturating_sub(held));
        let release = stages[5];
        self.figures.parts[0].record(how.write_ns.min(release));
        self.figures.parts[if how.on_vcpu { 1 } else { 2 }].record(release);
        Some(stamps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stages_add_up_to_the_hold() {
        let s = Stamps {
            held: 1_000,
            sealed: 4_000,
            sent: 9_000,
            ack_received: 60_000,
            performed: 70_000,
            backup_verify: 6_000,
            backup_ack: 2_000,
        };
        assert_eq!(s.stages(), [3_000, 5_000, 43_000, 6_000, 2_000, 10_000]);
        assert_eq!(s.stages().iter().sum::<u64>(), s.performed - s.held);
        // Out of order (the frame went out before the output was handed over; a backup
        // whose durations exceed the round trip): clamped, and still the hold.
        let odd = Stamps { held: 5_000, sealed: 2_000, sent: 3_000, backup_verify: 90_000, ..s };
        let st = odd.stages();
        assert_eq!(st.iter().sum::<u64>(), odd.performed - odd.held);
        assert_eq!(st[..3], [0, 0, 0]);
        assert_eq!(st[3] + st[4], 60_000 - 5_000);
    }

    #[test]
    fn the_book_matches_outputs_to_their_flush_and_acknowledgement() {
        let mut b = StageBook::default();
        // Output 1 (LSN 10) goes out in flush 0, output 2 (LSN 20) in flush 1; one ack
        // (LSN 25) covers both; an earlier ack (LSN 5) covers neither.
        let f1 = b.next_flush();
        let seq = b.begin_flush();
        assert_eq!(seq, f1);
        b.flushed(seq, 110, 120);
        let f2 = b.next_flush();
        let seq = b.begin_flush();
        b.flushed(seq, 210, 230);
        b.acknowledged(5, 150, 1, 1);
        b.acknowledged(25, 400, 30, 10);
        let on = |at, write_ns, on_vcpu| Performed { at, write_ns, on_vcpu };
        let s1 = b.performed(100, f1, 10, on(450, 20, true)).unwrap();
        assert_eq!(s1.stages(), [10, 10, 240, 30, 10, 50]);
        let s2 = b.performed(200, f2, 20, on(460, 90, false)).unwrap();
        assert_eq!(s2.stages(), [10, 20, 130, 30, 10, 60]);
        assert_eq!(b.figures.hold.count, 2);
        assert_eq!(b.figures.hold.sum_ns, 350 + 260);
        let sums: u64 = b.figures.stages.iter().map(|h| h.sum_ns).sum();
        assert_eq!(sums, b.figures.hold.sum_ns, "the stage totals add up to the hold's");
        // The write is part of `release` (clamped to it); `release` by performer.
        let [write, vcpu, thread] = &b.figures.parts;
        assert_eq!((write.count, write.sum_ns), (2, 20 + 60));
        assert_eq!((vcpu.count, vcpu.sum_ns, thread.count, thread.sum_ns), (1, 50, 1, 60));
        // An output whose acknowledgement is unknown is not counted.
        assert!(b.performed(300, f2, 30, on(500, 1, true)).is_none());
    }

    #[test]
    fn buckets_hold_their_values() {
        for v in [0u64, 1, 31, 32, 33, 47, 48, 1000, 47_000, 1 << 40, u64::MAX >> 2] {
            let i = bucket(v);
            assert!(v <= bucket_upper(i), "{v} in bucket {i} (upper {})", bucket_upper(i));
            assert!(i == 0 || v > bucket_upper(i - 1), "{v} belongs in a lower bucket than {i}");
        }
    }
}
