//! The 8254 programmable interval timer at 0x40-0x43, and system control port B at 0x61 (channel
//! 2's gate and output, the speaker enable, the refresh toggle).
//!
//! The counters are not stepped: each channel remembers the PIT tick at which it started counting
//! and derives its count and OUT level from the guest clock when the guest looks. Ticks are
//! `floor(ns * 1_193_182 / 10^9)` in u128 integer arithmetic, so the same clock values give the
//! same counts on every host. The clock is read only when the guest reads something that depends
//! on time (a count, a status byte, port 0x61) or (re)starts a counter, because each read is a
//! logged event in record mode.
//!
//! Channel 0's OUT drives IRQ0 through [`Timed`]: `next_deadline` is the guest time of its next
//! rising edge, and `on_time` delivers at most one edge per call, so a periodic timer that fell
//! behind catches up one interrupt per call (the design's rule).
//!
//! Implemented: modes 0-5 (6 and 7 alias 2 and 3), the four access modes with their flip-flops,
//! the counter latch and read-back commands, the gate of channel 2 (channels 0 and 1 have theirs
//! tied high), a count written in mode 2 or 3 taking effect at the end of the current period.
//! Not implemented: BCD counting (the BCD bit is stored and reported in the status byte, but the
//! counters count in binary; no PC guest uses BCD), the speaker's sound, the one-tick load delay
//! after a count is written.

use serde::{Deserialize, Serialize};

use crate::bus::{DeviceContext, PioDevice};
use crate::state::whole_device_state;
use crate::{ensure_state, irq, ports, GuestClock, GuestNanos, IrqLines, StateError, Timed};

/// The PIT's input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Interval at which the DRAM refresh toggle (port 0x61 bit 4) flips, in nanoseconds.
const REFRESH_TOGGLE_NS: u64 = 15_085;

/// PIT ticks elapsed at guest time `ns` (rounded down).
fn ns_to_ticks(ns: GuestNanos) -> u64 {
    // u64::MAX * PIT_HZ / 10^9 < u64::MAX, so the cast is exact.
    (ns as u128 * PIT_HZ as u128 / NANOS_PER_SEC) as u64
}

/// The first guest time at which `ticks` PIT ticks have elapsed: the inverse of [`ns_to_ticks`].
fn ticks_to_ns(ticks: u64) -> GuestNanos {
    u64::try_from((ticks as u128 * NANOS_PER_SEC).div_ceil(PIT_HZ as u128)).unwrap_or(u64::MAX)
}

fn now_ticks(clock: &mut dyn GuestClock) -> u64 {
    ns_to_ticks(clock.now())
}

/// How the data port reads and writes a counter (control word bits 5-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Access {
    Lsb,
    Msb,
    /// Least significant byte then most significant, with a flip-flop.
    Word,
}

impl Access {
    fn bits(self) -> u8 {
        match self {
            Access::Lsb => 1,
            Access::Msb => 2,
            Access::Word => 3,
        }
    }
}

/// The counting element of one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Run {
    /// Not counting: no count yet, the gate is low, or a mode 1/5 trigger is awaited.
    Stopped { value: u16, out: bool },
    /// Counting since absolute PIT tick `origin`, where the counter held `start` (1..=65536).
    /// In modes 2 and 3 it reloads `count` every `count` ticks; `origin` may lie in the future
    /// when a count was written mid-period: until then the previous period (`prev_count`) ends.
    Running { origin: u64, start: u32 },
}

/// One 8254 channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Channel {
    /// Mode bits as written (0-7; 6 and 7 behave as 2 and 3).
    mode_bits: u8,
    access: Access,
    bcd: bool,
    /// The reload value, 1..=65536 (a written 0 means 65536).
    count: u32,
    /// The count of the period still running when a mode 2/3 count was written mid-period.
    prev_count: u32,
    /// A count was written since the last control word.
    has_count: bool,
    write_msb_next: bool,
    write_lsb: u8,
    read_msb_next: bool,
    latched: Option<u16>,
    latch_msb_next: bool,
    status_latched: Option<u8>,
    /// Status bit 6: a count was written but is not yet in the counting element.
    null_count: bool,
    gate: bool,
    run: Run,
    /// One-shot modes: terminal count was reached before the current `origin` (gate pauses).
    tc_passed: bool,
    /// Absolute tick of the next rising edge of OUT still to deliver as an interrupt.
    next_edge: Option<u64>,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            mode_bits: 0,
            access: Access::Word,
            bcd: false,
            count: 0x10000,
            prev_count: 0x10000,
            has_count: false,
            write_msb_next: false,
            write_lsb: 0,
            read_msb_next: false,
            latched: None,
            latch_msb_next: false,
            status_latched: None,
            null_count: false,
            gate,
            run: Run::Stopped { value: 0, out: false },
            tc_passed: false,
            next_edge: None,
        }
    }

    /// The operating mode, with the aliases folded.
    fn mode(&self) -> u8 {
        match self.mode_bits {
            6 => 2,
            7 => 3,
            m => m,
        }
    }

    /// OUT level while the counter is stopped or before its count: low only in mode 0.
    fn idle_out(&self) -> bool {
        self.mode() != 0
    }

    fn is_running(&self) -> bool {
        matches!(self.run, Run::Running { .. })
    }

    /// The counter value at absolute tick `t`.
    fn value_at(&self, t: u64) -> u16 {
        let (origin, start) = match self.run {
            Run::Stopped { value, .. } => return value,
            Run::Running { origin, start } => (origin, start),
        };
        let count = (self.count as u64).max(1); // never 0, even from a hand-made snapshot
        let v = match self.mode() {
            2 if t < origin => origin - t,
            3 if t < origin => {
                let prev = (self.prev_count as u64).max(1);
                let d = prev.saturating_sub(origin - t);
                prev - (2 * d) % prev
            }
            2 => count - (t - origin) % count,
            3 => count - (2 * ((t - origin) % count)) % count,
            // One-shot modes count down through zero and wrap.
            _ => (start as u64).wrapping_sub(t.saturating_sub(origin)),
        };
        v as u16
    }

    /// The OUT level at absolute tick `t`.
    fn out_at(&self, t: u64) -> bool {
        let (origin, start) = match self.run {
            Run::Stopped { out, .. } => return out,
            Run::Running { origin, start } => (origin, start as u64),
        };
        let count = (self.count as u64).max(1);
        match self.mode() {
            // Low from the count until terminal count.
            0 | 1 => self.tc_passed || t.saturating_sub(origin) >= start,
            // High except for one tick at terminal count.
            4 | 5 => self.tc_passed || t.saturating_sub(origin) != start,
            // High except for the tick in which the counter holds 1.
            2 if t < origin => origin - t != 1,
            2 => count < 2 || (t - origin) % count != count - 1,
            // Square wave: high for the first half (rounded up) of each period.
            3 if t < origin => {
                let prev = (self.prev_count as u64).max(1);
                let d = prev.saturating_sub(origin - t);
                d < prev.div_ceil(2)
            }
            _ => (t - origin) % count < count.div_ceil(2),
        }
    }

    fn status_at(&self, t: u64) -> u8 {
        (u8::from(self.out_at(t)) << 7)
            | (u8::from(self.null_count) << 6)
            | (self.access.bits() << 4)
            | (self.mode_bits << 1)
            | u8::from(self.bcd)
    }

    /// Starts counting `start` at tick `t`, scheduling the interrupt edge the mode produces.
    fn start(&mut self, t: u64, start: u32) {
        self.run = Run::Running { origin: t, start };
        self.null_count = false;
        let s = start as u64;
        self.next_edge = match self.mode() {
            _ if self.tc_passed => None,
            // OUT rises at terminal count.
            0 | 1 => Some(t + s),
            // OUT rises after its one-tick low pulse.
            4 | 5 => Some(t + s + 1),
            // Periodic: the first edge ends the first period.
            _ => Some(t + self.count as u64),
        };
    }

    /// Freezes the counter at tick `t` (gate low, or the first byte of a mode 0 count).
    fn stop(&mut self, t: u64, out: bool) {
        let value = self.value_at(t);
        if let Run::Running { origin, start } = self.run {
            self.tc_passed |= matches!(self.mode(), 0 | 1 | 4 | 5) && t.saturating_sub(origin) >= start as u64;
        }
        self.run = Run::Stopped { value, out };
        self.next_edge = None;
    }

    fn write_control(&mut self, value: u8) {
        self.mode_bits = (value >> 1) & 7;
        self.bcd = value & 1 != 0;
        self.access = match (value >> 4) & 3 {
            1 => Access::Lsb,
            2 => Access::Msb,
            _ => Access::Word,
        };
        self.write_msb_next = false;
        self.read_msb_next = false;
        self.latched = None;
        self.latch_msb_next = false;
        self.status_latched = None;
        self.null_count = true;
        self.has_count = false;
        self.tc_passed = false;
        self.run = Run::Stopped { value: 0, out: self.idle_out() };
        self.next_edge = None;
        if self.bcd {
            tracing::debug!("pit: BCD counting requested, counting in binary");
        }
    }

    fn write_data(&mut self, value: u8, clock: &mut dyn GuestClock) {
        match self.access {
            Access::Lsb => self.load(u16::from(value), clock),
            Access::Msb => self.load(u16::from(value) << 8, clock),
            Access::Word if !self.write_msb_next => {
                self.write_lsb = value;
                self.write_msb_next = true;
                // Mode 0: the first byte stops the count and drops OUT.
                if self.mode() == 0 && self.is_running() {
                    self.stop(now_ticks(clock), false);
                }
            }
            Access::Word => {
                self.write_msb_next = false;
                self.load(u16::from_le_bytes([self.write_lsb, value]), clock);
            }
        }
    }

    /// A complete count was written.
    fn load(&mut self, raw: u16, clock: &mut dyn GuestClock) {
        let new = if raw == 0 { 0x10000 } else { u32::from(raw) };
        let old = self.count;
        self.count = new;
        self.has_count = true;
        self.null_count = true;
        match self.mode() {
            0 | 4 => {
                self.tc_passed = false;
                if self.gate {
                    self.start(now_ticks(clock), new);
                } else {
                    // Loaded, but the low gate holds it.
                    self.run = Run::Stopped { value: raw, out: self.idle_out() };
                    self.null_count = false;
                    self.next_edge = None;
                }
            }
            // Loaded at the next gate trigger; a running count is not disturbed.
            1 | 5 => {}
            _ => match self.run {
                // Mid-count: the new count takes over when the current period ends.
                Run::Running { origin, .. } => {
                    let t = now_ticks(clock);
                    let end = if t < origin {
                        origin
                    } else {
                        self.prev_count = old;
                        let old = (old as u64).max(1);
                        origin + ((t - origin) / old + 1) * old
                    };
                    self.run = Run::Running { origin: end, start: new };
                    self.null_count = false;
                    self.next_edge = Some(end);
                }
                Run::Stopped { .. } if self.gate => self.start(now_ticks(clock), new),
                Run::Stopped { .. } => {
                    self.run = Run::Stopped { value: raw, out: true };
                    self.null_count = false;
                }
            },
        }
    }

    fn set_gate(&mut self, gate: bool, clock: &mut dyn GuestClock) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        match (self.mode(), gate) {
            // Gate low suspends counting; high resumes from the held value.
            (0 | 4, false) => {
                if self.is_running() {
                    let t = now_ticks(clock);
                    let out = self.out_at(t);
                    self.stop(t, out);
                }
            }
            (0 | 4, true) => {
                if let (true, Run::Stopped { value, .. }) = (self.has_count, self.run) {
                    let start = if value == 0 { 0x10000 } else { u32::from(value) };
                    self.start(now_ticks(clock), start);
                }
            }
            // A rising gate (re)triggers the one-shot with the reload value.
            (1 | 5, true) => {
                if self.has_count {
                    self.tc_passed = false;
                    let count = self.count;
                    self.start(now_ticks(clock), count);
                }
            }
            (1 | 5, false) => {}
            // Modes 2 and 3: gate low stops counting with OUT high, high restarts the period.
            (_, false) => {
                if self.is_running() {
                    let t = now_ticks(clock);
                    self.stop(t, true);
                }
            }
            (_, true) => {
                if self.has_count {
                    let count = self.count;
                    self.start(now_ticks(clock), count);
                }
            }
        }
    }

    fn latch_count(&mut self, t: u64) {
        // A second latch before the first is read is ignored.
        if self.latched.is_none() {
            self.latched = Some(self.value_at(t));
            self.latch_msb_next = false;
        }
    }

    fn read_data(&mut self, clock: &mut dyn GuestClock) -> u8 {
        if let Some(status) = self.status_latched.take() {
            return status;
        }
        if let Some(v) = self.latched {
            let [lo, hi] = v.to_le_bytes();
            return match self.access {
                Access::Lsb => {
                    self.latched = None;
                    lo
                }
                Access::Msb => {
                    self.latched = None;
                    hi
                }
                Access::Word if !self.latch_msb_next => {
                    self.latch_msb_next = true;
                    lo
                }
                Access::Word => {
                    self.latched = None;
                    self.latch_msb_next = false;
                    hi
                }
            };
        }
        // A stopped counter does not depend on time: no clock read.
        let v = if self.is_running() { self.value_at(now_ticks(clock)) } else { self.value_at(0) };
        let [lo, hi] = v.to_le_bytes();
        match self.access {
            Access::Lsb => lo,
            Access::Msb => hi,
            Access::Word => {
                self.read_msb_next = !self.read_msb_next;
                if self.read_msb_next {
                    lo
                } else {
                    hi
                }
            }
        }
    }
}

/// The 8254 PIT with port 0x61.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bits 0-3 as written: ch2 gate, speaker data enable, parity and I/O check
    /// enables (the last two have no source of errors here).
    port61: u8,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// All channels unprogrammed: nothing counts and no IRQ0 comes until the guest writes a
    /// count (no BIOS programs channel 0 first). Channel 2's gate starts low, as port 0x61 is 0.
    pub fn new() -> Self {
        Pit { channels: [Channel::new(true), Channel::new(true), Channel::new(false)], port61: 0 }
    }

    fn write_command(&mut self, value: u8, clock: &mut dyn GuestClock) {
        let select = value >> 6;
        if select == 3 {
            self.read_back(value, clock);
            return;
        }
        let ch = &mut self.channels[select as usize];
        if value & 0x30 == 0 {
            // Counter latch: the value is frozen now. A stopped counter needs no clock.
            let t = if ch.is_running() && ch.latched.is_none() { now_ticks(clock) } else { 0 };
            ch.latch_count(t);
        } else {
            ch.write_control(value);
        }
    }

    /// Read-back: bit 5 clear latches the counts, bit 4 clear the status bytes, of the channels
    /// selected by bits 1-3.
    fn read_back(&mut self, value: u8, clock: &mut dyn GuestClock) {
        let latch_count = value & 0x20 == 0;
        let latch_status = value & 0x10 == 0;
        let mut t = None;
        for (i, ch) in self.channels.iter_mut().enumerate() {
            if value & (2 << i) == 0 {
                continue;
            }
            let needs_time = ch.is_running()
                && ((latch_count && ch.latched.is_none()) || (latch_status && ch.status_latched.is_none()));
            let now = if needs_time { *t.get_or_insert_with(|| now_ticks(clock)) } else { 0 };
            if latch_status && ch.status_latched.is_none() {
                ch.status_latched = Some(ch.status_at(now));
            }
            if latch_count {
                ch.latch_count(now);
            }
        }
    }

    fn read_port61(&mut self, clock: &mut dyn GuestClock) -> u8 {
        let now = clock.now();
        let ch2 = &self.channels[2];
        let out = if ch2.is_running() { ch2.out_at(ns_to_ticks(now)) } else { ch2.out_at(0) };
        let refresh = (now / REFRESH_TOGGLE_NS) & 1 == 1;
        (self.port61 & 0x0f) | (u8::from(out) << 5) | (u8::from(refresh) << 4)
    }

    fn read_port(&mut self, port: u16, clock: &mut dyn GuestClock) -> u8 {
        match port {
            0x40..=0x42 => self.channels[usize::from(port - 0x40)].read_data(clock),
            ports::SYSTEM_CONTROL_B => self.read_port61(clock),
            _ => {
                // 0x43 is write-only.
                tracing::debug!(port, "pit: read of write-only or unknown port");
                0xff
            }
        }
    }

    fn write_port(&mut self, port: u16, value: u8, clock: &mut dyn GuestClock) {
        match port {
            0x40..=0x42 => self.channels[usize::from(port - 0x40)].write_data(value, clock),
            0x43 => self.write_command(value, clock),
            ports::SYSTEM_CONTROL_B => {
                self.port61 = value & 0x0f;
                self.channels[2].set_gate(value & 1 != 0, clock);
            }
            _ => tracing::debug!(port, value, "pit: write to unknown port ignored"),
        }
    }
}

fn is_pit_port(port: u16) -> bool {
    matches!(port, 0x40..=0x43 | ports::SYSTEM_CONTROL_B)
}

impl PioDevice for Pit {
    /// Byte `i` of a wide access goes to port `base + offset + i`, as an ISA bus splits it.
    fn pio_read(&mut self, ctx: &mut DeviceContext<'_>, base: u16, offset: u16, data: &mut [u8]) {
        let first = base.wrapping_add(offset);
        for (i, byte) in data.iter_mut().enumerate() {
            let port = first.wrapping_add(i as u16);
            *byte = if is_pit_port(port) { self.read_port(port, ctx.inputs) } else { 0xff };
        }
    }

    fn pio_write(&mut self, ctx: &mut DeviceContext<'_>, base: u16, offset: u16, data: &[u8]) {
        let first = base.wrapping_add(offset);
        for (i, &byte) in data.iter().enumerate() {
            let port = first.wrapping_add(i as u16);
            if is_pit_port(port) {
                self.write_port(port, byte, ctx.inputs);
            } else {
                tracing::debug!(port, "pit: write past the PIT's ports ignored");
            }
        }
    }
}

impl Timed for Pit {
    /// The guest time of channel 0's next OUT rising edge (possibly in the past when behind).
    fn next_deadline(&self) -> Option<GuestNanos> {
        self.channels[0].next_edge.map(ticks_to_ns)
    }

    /// Delivers at most one IRQ0 edge: a timer that fell several periods behind stays due and
    /// catches up one interrupt per call.
    fn on_time(&mut self, now: GuestNanos, irqs: &mut IrqLines) {
        let ch = &mut self.channels[0];
        let Some(edge) = ch.next_edge else { return };
        if ticks_to_ns(edge) > now {
            return;
        }
        irqs.pulse(irq::PIT);
        ch.next_edge = match ch.mode() {
            2 | 3 => Some(edge.saturating_add(ch.count as u64)),
            _ => None,
        };
    }
}

whole_device_state! {
    /// The complete state of the 8254 and port 0x61. Per channel: the mode, access mode and BCD
    /// bit as written; the reload count and the count of the period still running when a new
    /// one was written mid-period; the write flip-flop with a half-written count; the read
    /// flip-flop; the latched count with its own flip-flop and the latched status; null count;
    /// the gate; the counting element, stopped (its value and OUT) or counting since an absolute
    /// PIT tick (the guest-time base of the count); whether terminal count has passed; and the
    /// next OUT edge still to deliver (channel 0's IRQ0 deadline). Port 0x61: the stored bits.
    PitState for Pit
}

/// The last tick a guest clock can reach, plus two maximal periods: no origin or edge of a real
/// counter lies beyond it, and below it the counter arithmetic cannot overflow.
fn max_state_tick() -> u64 {
    ns_to_ticks(u64::MAX) + 2 * 0x10000
}

impl Channel {
    fn check_state(&self, i: usize) -> Result<(), StateError> {
        let counts = 1..=0x10000u32;
        ensure_state!(self.mode_bits <= 7, "pit", "channel {i}: mode {} is not 0-7", self.mode_bits);
        for (what, count) in [("count", self.count), ("previous count", self.prev_count)] {
            ensure_state!(counts.contains(&count), "pit", "channel {i}: {what} {count} is not 1-65536");
        }
        ensure_state!(
            self.access == Access::Word || !(self.write_msb_next || self.read_msb_next || self.latch_msb_next),
            "pit",
            "channel {i}: a low/high byte flip-flop is set in {:?}-only access",
            self.access
        );
        ensure_state!(
            !self.latch_msb_next || self.latched.is_some(),
            "pit",
            "channel {i}: the high byte of a latch is due but nothing is latched"
        );
        match self.run {
            Run::Running { origin, start } => {
                ensure_state!(self.has_count, "pit", "channel {i} counts but no count was written");
                ensure_state!(counts.contains(&start), "pit", "channel {i}: counting from {start}, not 1-65536");
                ensure_state!(
                    origin <= max_state_tick(),
                    "pit",
                    "channel {i}: counting since tick {origin}, past any guest time"
                );
            }
            Run::Stopped { .. } => ensure_state!(
                self.next_edge.is_none(),
                "pit",
                "channel {i}: an interrupt edge is due but the counter is stopped"
            ),
        }
        ensure_state!(
            self.next_edge.is_none_or(|edge| edge <= max_state_tick()),
            "pit",
            "channel {i}: next edge at tick {:?}, past any guest time",
            self.next_edge
        );
        Ok(())
    }
}

impl Pit {
    fn check_state(&self) -> Result<(), StateError> {
        for (i, ch) in self.channels.iter().enumerate() {
            ch.check_state(i)?;
        }
        ensure_state!(
            self.channels[0].gate && self.channels[1].gate,
            "pit",
            "the gates of channels 0 and 1 are tied high"
        );
        ensure_state!(
            self.port61 & !0x0f == 0,
            "pit",
            "port 0x61 holds {:#04x}; only bits 0-3 are stored",
            self.port61
        );
        ensure_state!(
            self.channels[2].gate == (self.port61 & 1 != 0),
            "pit",
            "channel 2's gate ({}) is not port 0x61 bit 0 ({:#04x})",
            self.channels[2].gate,
            self.port61
        );
        Ok(())
    }
}

const _: () = assert!(ports::PIT == 0x40 && ports::SYSTEM_CONTROL_B == 0x61);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::{lockstep, refused, restored};
    use crate::{IrqChange, Stateful, VmRequest};

    /// A clock that counts how often it is read (each read is a logged event in record mode).
    #[derive(Default)]
    struct Clock {
        now: u64,
        reads: u32,
    }

    impl GuestClock for Clock {
        fn now(&mut self) -> GuestNanos {
            self.reads += 1;
            self.now
        }
    }

    impl crate::HostInputs for Clock {
        fn entropy(&mut self, _: &mut [u8]) -> bool {
            false
        }
    }

    #[derive(Default)]
    struct Harness {
        pit: Pit,
        clock: Clock,
        irqs: IrqLines,
    }

    impl Harness {
        fn at(&mut self, now: u64) -> &mut Self {
            self.clock.now = now;
            self
        }
        fn outb(&mut self, port: u16, value: u8) -> &mut Self {
            let mut requests = Vec::<VmRequest>::new();
            let mut ctx = DeviceContext { inputs: &mut self.clock, irqs: &mut self.irqs, requests: &mut requests };
            let base = if port == 0x61 { 0x61 } else { 0x40 };
            self.pit.pio_write(&mut ctx, base, port - base, &[value]);
            self
        }
        fn inb(&mut self, port: u16) -> u8 {
            let mut requests = Vec::<VmRequest>::new();
            let mut ctx = DeviceContext { inputs: &mut self.clock, irqs: &mut self.irqs, requests: &mut requests };
            let base = if port == 0x61 { 0x61 } else { 0x40 };
            let mut b = [0u8];
            self.pit.pio_read(&mut ctx, base, port - base, &mut b);
            b[0]
        }
        /// Control word then a lobyte/hibyte count.
        fn program(&mut self, channel: u8, mode: u8, count: u16) -> &mut Self {
            let [lo, hi] = count.to_le_bytes();
            self.outb(0x43, (channel << 6) | 0x30 | (mode << 1));
            self.outb(0x40 + u16::from(channel), lo);
            self.outb(0x40 + u16::from(channel), hi)
        }
        fn read_word(&mut self, channel: u8) -> u16 {
            let lo = self.inb(0x40 + u16::from(channel));
            let hi = self.inb(0x40 + u16::from(channel));
            u16::from_le_bytes([lo, hi])
        }
        fn latched_read(&mut self, channel: u8) -> u16 {
            self.outb(0x43, channel << 6);
            self.read_word(channel)
        }
        /// Runs on_time the way the VMM does and returns the number of IRQ0 pulses.
        fn tick(&mut self, now: u64) -> usize {
            self.pit.on_time(now, &mut self.irqs);
            let pulses: Vec<_> = self.irqs.drain().collect();
            assert!(pulses.iter().all(|&c| c == (0, IrqChange::Pulse)));
            pulses.len()
        }
    }

    /// Guest ns for a PIT tick count.
    fn ns(ticks: u64) -> u64 {
        ticks_to_ns(ticks)
    }

    #[test]
    fn tick_conversion_is_exact_and_inverse() {
        assert_eq!(ns_to_ticks(1_000_000_000), PIT_HZ);
        assert_eq!(ns_to_ticks(838), 0);
        assert_eq!(ns_to_ticks(839), 1);
        for t in [0u64, 1, 2, 11932, 65536, 1 << 40] {
            let n = ticks_to_ns(t);
            assert_eq!(ns_to_ticks(n), t);
            if n > 0 {
                assert_eq!(ns_to_ticks(n - 1), t - 1);
            }
        }
        assert_eq!(ticks_to_ns(u64::MAX), u64::MAX);
        let _ = ns_to_ticks(u64::MAX);
    }

    #[test]
    fn periodic_100hz_deadlines_every_10ms() {
        let mut h = Harness::default();
        assert_eq!(h.pit.next_deadline(), None);
        h.at(5_000_000).program(0, 2, 11932);
        let start = ns_to_ticks(5_000_000);
        let mut last = 5_000_000;
        for k in 1..=100u64 {
            let d = h.pit.next_deadline().unwrap();
            assert_eq!(d, ns(start + k * 11932));
            let period = d - last;
            assert!((9_999_000..=10_001_000).contains(&period), "period {period}");
            assert_eq!(h.tick(d - 1), 0, "not yet due");
            assert_eq!(h.tick(d), 1);
            last = d;
        }
        // 100 periods of 11932 ticks (the usual rounding of 1193182 / 100): 1.000015 s.
        assert!((1_000_015_000..1_000_016_000).contains(&(last - ns(start))));
    }

    #[test]
    fn mode3_square_wave_also_interrupts_once_per_period() {
        let mut h = Harness::default();
        h.at(0).program(0, 3, 1000);
        assert_eq!(h.pit.next_deadline(), Some(ns(1000)));
        assert_eq!(h.tick(ns(1000)), 1);
        assert_eq!(h.pit.next_deadline(), Some(ns(2000)));
        // The count runs down by two twice per period; OUT is high for the first half.
        h.at(ns(2000) + 1); // tick 2000
        assert_eq!(h.read_word(0), 1000);
        h.at(ns(2100));
        assert_eq!(h.read_word(0), 800);
        h.outb(0x43, 0xe2); // read back status of channel 0
        assert_eq!(h.inb(0x40) & 0x80, 0x80);
        h.at(ns(2600));
        h.outb(0x43, 0xe2);
        assert_eq!(h.inb(0x40), 0x36, "OUT low in the second half, lohi, mode 3");
    }

    #[test]
    fn counter_reads_decrease_with_time_and_wrap() {
        let mut h = Harness::default();
        h.at(0).program(0, 2, 1000);
        h.at(ns(1));
        assert_eq!(h.read_word(0), 999);
        h.at(ns(500));
        assert_eq!(h.read_word(0), 500);
        h.at(ns(999));
        assert_eq!(h.read_word(0), 1);
        h.at(ns(1000));
        assert_eq!(h.read_word(0), 1000, "reloads at the end of the period");
        h.at(ns(1001));
        assert_eq!(h.read_word(0), 999);
        // A count of 0 is 65536 and reads as 0 right after the reload.
        h.at(ns(5000)).program(1, 2, 0);
        assert_eq!(h.read_word(1), 0);
        h.at(ns(5001));
        assert_eq!(h.read_word(1), 0xffff);
        // Mode 0 wraps past terminal count.
        h.at(ns(10_000)).program(2, 0, 5);
        h.outb(0x61, 1);
        h.at(ns(10_007));
        assert_eq!(h.read_word(2), 0xfffe);
    }

    #[test]
    fn latch_freezes_the_value() {
        let mut h = Harness::default();
        h.at(0).program(0, 2, 50_000);
        h.at(ns(1000));
        h.outb(0x43, 0x00);
        h.outb(0x43, 0x00); // a second latch before reading is ignored
        h.at(ns(20_000));
        assert_eq!(h.read_word(0), 49_000);
        assert_eq!(h.read_word(0), 30_000, "latch released after both bytes");
        assert_eq!(h.latched_read(0), 30_000);
    }

    #[test]
    fn clock_is_read_only_when_time_matters() {
        let mut h = Harness::default();
        h.outb(0x43, 0x34);
        assert_eq!(h.clock.reads, 0, "a control word starts nothing");
        h.outb(0x40, 0x9c);
        assert_eq!(h.clock.reads, 0, "half a count starts nothing");
        h.outb(0x40, 0x2e);
        assert_eq!(h.clock.reads, 1, "the count starts counting now");
        h.inb(0x43);
        h.inb(0x41); // channel 1 is not counting
        h.outb(0x43, 0x40); // latch channel 1
        h.outb(0x61, 0x02); // speaker bit only, gate unchanged
        assert_eq!(h.clock.reads, 1);
        h.inb(0x40);
        assert_eq!(h.clock.reads, 2);
        h.inb(0x61);
        assert_eq!(h.clock.reads, 3);
        let _ = h.pit.next_deadline();
        h.tick(0);
        assert_eq!(h.clock.reads, 3, "Timed never reads the clock");
    }

    #[test]
    fn lobyte_hibyte_flip_flops() {
        let mut h = Harness::default();
        // lsb-only access: one write is the whole count, reads give the low byte.
        h.at(0);
        h.outb(0x43, 0x14); // channel 0, lsb, mode 2
        h.outb(0x40, 100);
        h.at(ns(30));
        assert_eq!(h.inb(0x40), 70);
        assert_eq!(h.inb(0x40), 70);
        // msb-only access: count 0x0200.
        h.outb(0x43, 0x24);
        h.outb(0x40, 0x02);
        h.at(ns(30 + 0x100));
        assert_eq!(h.inb(0x40), 0x01);
        // Word access: writes go lo, hi, lo, hi; reads likewise.
        h.at(ns(100_000)).program(0, 2, 0x1234);
        assert_eq!(h.pit.channels[0].count, 0x1234);
        h.at(ns(100_000 + 0x34));
        assert_eq!(h.inb(0x40), 0x00);
        assert_eq!(h.inb(0x40), 0x12);
        assert_eq!(h.inb(0x40), 0x00, "flip-flop back to the low byte");
        h.inb(0x40);
        // A control word resets the read flip-flop.
        h.inb(0x40);
        h.outb(0x43, 0x34);
        assert!(!h.pit.channels[0].read_msb_next);
        assert!(!h.pit.channels[0].write_msb_next);
    }

    #[test]
    fn read_back_status_and_count() {
        let mut h = Harness::default();
        h.outb(0x43, 0xb0); // channel 2, word, mode 0
        h.outb(0x43, 0xe8); // read back status of channel 2
        assert_eq!(h.inb(0x42), 0x70, "OUT low, null count, word, mode 0");
        h.at(0).program(2, 0, 1000);
        h.outb(0x61, 0x01); // gate high: counting starts now
        h.at(ns(400));
        h.outb(0x43, 0xc8); // status and count of channel 2
        h.at(ns(700));
        assert_eq!(h.inb(0x42), 0x30, "OUT low, count loaded");
        assert_eq!(h.read_word(2), 600);
        h.at(ns(1000));
        h.outb(0x43, 0xe8);
        assert_eq!(h.inb(0x42), 0xb0, "OUT high at terminal count");
        // Read back of several channels at once reads the clock once.
        h.program(0, 2, 500).program(1, 3, 800);
        let reads = h.clock.reads;
        h.outb(0x43, 0xce); // count + status of all three
        assert_eq!(h.clock.reads, reads + 1);
        assert_eq!(h.inb(0x40), 0xb4);
        assert_eq!(h.read_word(0), 500);
        assert_eq!(h.inb(0x41), 0xb6);
        assert_eq!(h.read_word(1), 800);
        // Status latch of a BCD channel reports the bit.
        h.outb(0x43, 0x31);
        h.outb(0x43, 0xe2);
        assert_eq!(h.inb(0x40), 0x71);
    }

    #[test]
    fn mode0_one_shot_interrupts_once() {
        let mut h = Harness::default();
        h.at(1_000_000).program(0, 0, 2000);
        let start = ns_to_ticks(1_000_000);
        let d = h.pit.next_deadline().unwrap();
        assert_eq!(d, ns(start + 2000));
        assert_eq!(h.tick(d - 1), 0);
        assert_eq!(h.tick(d), 1);
        assert_eq!(h.pit.next_deadline(), None);
        assert_eq!(h.tick(d + 1_000_000_000), 0);
        // Reprogramming arms it again.
        h.at(d + 5).program(0, 0, 10);
        assert!(h.pit.next_deadline().is_some());
    }

    #[test]
    fn mode0_first_byte_stops_counting() {
        let mut h = Harness::default();
        h.at(0).program(0, 0, 1000);
        h.at(ns(100));
        h.outb(0x40, 0x10);
        assert_eq!(h.pit.next_deadline(), None);
        h.at(ns(300));
        assert_eq!(h.read_word(0), 900, "held");
        h.outb(0x40, 0x00);
        assert_eq!(h.pit.next_deadline(), Some(ns(300 + 0x10)));
    }

    #[test]
    fn mode4_strobe_and_mode1_needs_a_gate() {
        let mut h = Harness::default();
        h.at(0).program(0, 4, 100);
        assert_eq!(h.pit.next_deadline(), Some(ns(101)));
        assert_eq!(h.tick(ns(101)), 1);
        assert_eq!(h.pit.next_deadline(), None);
        // Channel 0's gate is tied high: a mode 1 count never triggers.
        h.program(0, 1, 100);
        assert_eq!(h.pit.next_deadline(), None);
        // Channel 2 mode 1: OUT low from the gate's rising edge until terminal count.
        h.at(ns(1000)).program(2, 1, 50);
        assert_eq!(h.inb(0x61) & 0x20, 0x20);
        h.outb(0x61, 0x01);
        h.at(ns(1010));
        assert_eq!(h.inb(0x61) & 0x20, 0);
        assert_eq!(h.read_word(2), 40);
        h.at(ns(1050));
        assert_eq!(h.inb(0x61) & 0x20, 0x20);
        // Retrigger.
        h.outb(0x61, 0x00).outb(0x61, 0x01);
        assert_eq!(h.inb(0x61) & 0x20, 0);
        // Mode 5: OUT high, one tick low at terminal count.
        h.outb(0x61, 0x00);
        h.at(ns(2000)).program(2, 5, 20);
        h.outb(0x61, 0x01);
        h.at(ns(2019));
        assert_eq!(h.inb(0x61) & 0x20, 0x20);
        h.at(ns(2020));
        assert_eq!(h.inb(0x61) & 0x20, 0);
        h.at(ns(2021));
        assert_eq!(h.inb(0x61) & 0x20, 0x20);
    }

    #[test]
    fn periodic_timer_behind_catches_up_one_per_call() {
        let mut h = Harness::default();
        h.at(0).program(0, 2, 11932);
        let late = ns(5 * 11932 + 100);
        for k in 1..=5u64 {
            assert_eq!(h.pit.next_deadline(), Some(ns(k * 11932)));
            assert_eq!(h.tick(late), 1, "one pulse per call");
        }
        assert_eq!(h.pit.next_deadline(), Some(ns(6 * 11932)));
        assert_eq!(h.tick(late), 0, "caught up");
    }

    #[test]
    fn new_count_in_mode2_takes_effect_after_the_period() {
        let mut h = Harness::default();
        h.at(0).program(0, 2, 1000);
        h.at(ns(2300));
        h.outb(0x40, 0xf4).outb(0x40, 0x01); // 500, without a control word
        assert_eq!(h.pit.next_deadline(), Some(ns(3000)), "the current period ends first");
        h.at(ns(2400));
        assert_eq!(h.read_word(0), 600, "still counting the old period");
        h.at(ns(3100));
        assert_eq!(h.read_word(0), 400);
        assert_eq!(h.tick(ns(3000)), 1);
        assert_eq!(h.pit.next_deadline(), Some(ns(3500)));
        // With a control word the new count starts at once.
        h.at(ns(3200)).program(0, 2, 100);
        assert_eq!(h.pit.next_deadline(), Some(ns(3300)));
    }

    #[test]
    fn port61_gate_and_channel2_output() {
        let mut h = Harness::default();
        assert_eq!(h.at(0).inb(0x61) & 0x2f, 0x00);
        // The TSC calibration pattern: gate low, mode 0 on channel 2, gate high, poll bit 5.
        h.outb(0x61, 0x00);
        h.program(2, 0, 0xffff);
        h.at(ns(500));
        assert_eq!(h.read_word(2), 0xffff, "gate low: not counting");
        h.outb(0x61, 0x01);
        assert_eq!(h.inb(0x61) & 0x21, 0x01, "counting, OUT low");
        h.at(ns(500 + 0xfffe));
        assert_eq!(h.inb(0x61) & 0x20, 0);
        h.at(ns(500 + 0xffff));
        assert_eq!(h.inb(0x61) & 0x20, 0x20, "terminal count");
        // Gate low pauses mode 0, gate high resumes.
        h.at(ns(100_000)).program(2, 0, 1000);
        h.at(ns(100_400));
        h.outb(0x61, 0x00);
        h.at(ns(200_000));
        assert_eq!(h.read_word(2), 600);
        h.outb(0x61, 0x03);
        h.at(ns(200_000 + 599));
        assert_eq!(h.inb(0x61) & 0x23, 0x03);
        h.at(ns(200_000 + 600));
        assert_eq!(h.inb(0x61) & 0x23, 0x23);
        // Mode 3 on channel 2 (speaker tone): gate low holds OUT high.
        h.outb(0x61, 0x00);
        h.program(2, 3, 100);
        assert_eq!(h.inb(0x61) & 0x20, 0x20);
        h.outb(0x61, 0x03);
        h.at(ns(200_660));
        assert_eq!(h.inb(0x61) & 0x20, 0, "second half of the square wave");
        // Bits 2-3 are stored, 6-7 read as 0.
        h.outb(0x61, 0xfc);
        assert_eq!(h.inb(0x61) & 0xcf, 0x0c);
    }

    #[test]
    fn refresh_bit_toggles_with_the_clock() {
        let mut h = Harness::default();
        let a = h.at(0).inb(0x61) & 0x10;
        let b = h.at(REFRESH_TOGGLE_NS).inb(0x61) & 0x10;
        let c = h.at(2 * REFRESH_TOGGLE_NS).inb(0x61) & 0x10;
        assert_ne!(a, b);
        assert_eq!(a, c);
    }

    /// One random step chosen by `r`: time passes, then a guest access or an `on_time` turn.
    /// Returns what was read and how many IRQ0 pulses came.
    fn random_step(h: &mut Harness, r: u32) -> Vec<u8> {
        let mut out = vec![];
        h.clock.now += u64::from(r % 50_000);
        let base = if r & 1 == 0 { 0x40 } else { 0x61 };
        let offset = ((r >> 1) % 5) as u16;
        let len = [1usize, 2, 4][((r >> 4) % 3) as usize];
        let value = (r >> 8) as u8;
        let mut requests = Vec::<VmRequest>::new();
        let mut ctx = DeviceContext { inputs: &mut h.clock, irqs: &mut h.irqs, requests: &mut requests };
        match (r >> 16) % 3 {
            0 => h.pit.pio_write(&mut ctx, base, offset, &vec![value; len]),
            1 => {
                let mut b = vec![0u8; len];
                h.pit.pio_read(&mut ctx, base, offset, &mut b);
                out.extend(b);
            }
            _ => {
                if let Some(d) = h.pit.next_deadline() {
                    out.push(u8::from(d <= h.clock.now));
                }
                let now = h.clock.now;
                h.pit.on_time(now, &mut h.irqs);
                out.push(h.irqs.drain().count() as u8);
            }
        }
        out
    }

    #[test]
    fn random_accesses_are_deterministic_and_panic_free() {
        let run = || {
            let mut h = Harness::default();
            let mut seed = 0xdead_beef_cafe_f00du64;
            let mut out = vec![];
            for _ in 0..20_000 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                out.extend(random_step(&mut h, (seed >> 32) as u32));
            }
            (h.pit, out, h.clock.reads)
        };
        assert_eq!(run(), run());
    }

    /// A fresh harness at the same guest time whose PIT is restored from `h`'s.
    fn fork(h: &Harness) -> Harness {
        let pit = restored(&h.pit, Pit::new());
        Harness { pit, clock: Clock { now: h.clock.now, reads: h.clock.reads }, irqs: IrqLines::default() }
    }

    #[test]
    fn state_restored_mid_run_continues_identically() {
        for seed in 0..40u64 {
            let split = (seed as usize * 97) % 3000;
            let (a, b) = lockstep(seed, split, 3000, Harness::default(), fork, |h, r| {
                let out = random_step(h, r);
                (out, h.pit.next_deadline(), h.clock.reads)
            });
            assert_eq!(a.pit, b.pit);
        }
    }

    #[test]
    fn state_keeps_half_done_accesses_and_pending_periods() {
        let mut h = Harness::default();
        // Channel 0 periodic; a new count written mid-period waits for the period's end.
        h.at(1_000).program(0, 2, 1000);
        h.at(ns(2300));
        h.outb(0x40, 0xf4).outb(0x40, 0x01);
        // Channel 1: count latched and its low byte read; channel 2: half a count written.
        h.program(1, 3, 5000);
        h.at(ns(2500)).outb(0x43, 0x40);
        let low = h.inb(0x41);
        h.outb(0x43, 0xb0).outb(0x42, 0x34);
        h.outb(0x61, 0x03);
        let mut twin = fork(&h);
        assert_eq!(twin.pit.next_deadline(), Some(ns(ns_to_ticks(1_000) + 3000)));
        let mut seen = vec![];
        for g in [&mut h, &mut twin] {
            // The latch's high byte, the count's high byte.
            g.at(ns(2700));
            let mut run = vec![u16::from_le_bytes([low, g.inb(0x41)])];
            g.outb(0x42, 0x12);
            for t in [3100u64, 3600, 4200, 9000] {
                let pulses = g.tick(ns(t)) as u16;
                g.at(ns(t));
                run.extend([pulses, g.latched_read(0), g.latched_read(1), g.latched_read(2), u16::from(g.inb(0x61))]);
            }
            run.push(g.clock.reads as u16);
            seen.push((run, g.pit.next_deadline()));
        }
        assert_eq!(seen[0], seen[1]);
        assert_eq!(h.pit, twin.pit);
    }

    #[test]
    fn impossible_states_are_refused() {
        let mut h = Harness::default();
        h.at(0).program(0, 2, 1000).program(2, 0, 100);
        let mut fresh = Pit::new();
        let bad = |f: fn(&mut Pit)| {
            let mut s = h.pit.save_state();
            f(&mut s.0);
            s
        };
        refused(&mut fresh, &bad(|p| p.channels[1].mode_bits = 9), "channel 1: mode 9");
        refused(&mut fresh, &bad(|p| p.channels[0].count = 0), "channel 0: count 0");
        refused(&mut fresh, &bad(|p| p.channels[2].prev_count = 0x10001), "previous count 65537");
        refused(&mut fresh, &bad(|p| p.channels[0].gate = false), "tied high");
        refused(&mut fresh, &bad(|p| p.port61 = 0x11), "only bits 0-3");
        refused(&mut fresh, &bad(|p| p.port61 = 0x01), "channel 2's gate (false)");
        refused(&mut fresh, &bad(|p| p.channels[2].next_edge = Some(5)), "the counter is stopped");
        refused(&mut fresh, &bad(|p| p.channels[0].next_edge = Some(u64::MAX)), "past any guest time");
        refused(&mut fresh, &bad(|p| p.channels[0].run = Run::Running { origin: u64::MAX, start: 5 }), "since tick");
        refused(&mut fresh, &bad(|p| p.channels[0].run = Run::Running { origin: 0, start: 0 }), "counting from 0");
        refused(&mut fresh, &bad(|p| (p.channels[1].access, p.channels[1].read_msb_next) = (Access::Lsb, true)), "Lsb");
        refused(&mut fresh, &bad(|p| p.channels[1].latch_msb_next = true), "nothing is latched");
        refused(&mut fresh, &bad(|p| p.channels[1].run = Run::Running { origin: 0, start: 1 }), "no count was written");
    }
}
