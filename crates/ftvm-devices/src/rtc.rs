//! The MC146818 real-time clock and CMOS RAM at 0x70 (index) and 0x71 (data).
//!
//! The clock is not stepped: the wall time is `epoch_wall` seconds at guest time `epoch_guest`
//! (a second boundary of the update cycle) plus the whole seconds of guest time since. At VM
//! start that is the base wall time the VMM chose (pinned in the log header for replay), so the
//! guest's calendar is a pure function of the guest clock. The clock is read only when the
//! guest reads a time register or register A (UIP), or writes something that restarts counting.
//!
//! Implemented: the time and calendar registers in BCD or binary and 12- or 24-hour format
//! (honoured on read and on write), the century byte at 0x32, the alarm registers, register A's
//! UIP bit (the last 244 us of each second) and rate bits, register B's SET (freezes the time
//! registers; what the guest writes meanwhile is where the clock resumes when SET clears),
//! register C (flags, clear on read), register D (valid RAM), the periodic, alarm and
//! update-ended interrupts on IRQ8 through [`Timed`], and the rest of the 128 bytes as NVRAM.
//! Not implemented: the divider-control bits of register A (stored; the clock always runs),
//! daylight saving (DSE stored, ignored), the square-wave output. The flags in register C are
//! only tracked while their interrupt is enabled (a guest polling UF with UIE clear never sees
//! it). The day of week follows from the date: a written value shows only while SET is held.
//! The calendar is Gregorian (proleptic) and is computed here in integer arithmetic.

use serde::{Deserialize, Serialize};

use crate::bus::{DeviceContext, PioDevice};
use crate::state::whole_device_state;
use crate::{ensure_state, irq, ports, GuestClock, GuestNanos, IrqLines, StateError, Timed};

const NANOS_PER_SEC: u64 = 1_000_000_000;
/// UIP is set this long before each update.
const UIP_NANOS: u64 = 244_000;
/// The time base of the divider chain, Hz: periodic rates are divisions of it.
const TIME_BASE_HZ: u128 = 32_768;
/// The latest base time accepted (9999-12-31 23:59:59), so calendar arithmetic cannot overflow.
const MAX_BASE_SECONDS: u64 = 253_402_300_799;

const REG_SECONDS: u8 = 0x00;
const REG_ALARM_SECONDS: u8 = 0x01;
const REG_MINUTES: u8 = 0x02;
const REG_ALARM_MINUTES: u8 = 0x03;
const REG_HOURS: u8 = 0x04;
const REG_ALARM_HOURS: u8 = 0x05;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
/// Data mode: binary instead of BCD.
const B_DM: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;

fn is_time_register(index: u8) -> bool {
    matches!(index, REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH | REG_YEAR | REG_CENTURY)
}

/// Days since 1970-01-01 of the Gregorian date `y`-`m`-`d` (`m` in 1..=12; `d` may run past the
/// month, it just counts on). H. Hinnant's `days_from_civil`.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The Gregorian date (year, month 1..=12, day 1..=31) of day `z` since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A broken-down time, as the time registers hold it (binary, 24-hour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday.
    weekday: u8,
}

impl DateTime {
    fn from_unix(seconds: i64) -> Self {
        let days = seconds.div_euclid(86_400);
        let rem = seconds.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }

    /// Unix seconds; out-of-range fields (a guest may write any byte) carry over like a date
    /// library's normalization instead of failing.
    fn to_unix(self) -> i64 {
        let m0 = i64::from(self.month) - 1;
        let days = days_from_civil(self.year + m0.div_euclid(12), m0.rem_euclid(12) + 1, 1) + i64::from(self.day) - 1;
        days * 86_400 + i64::from(self.hour) * 3600 + i64::from(self.minute) * 60 + i64::from(self.second)
    }
}

/// The MC146818 RTC with its 128 bytes of CMOS RAM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rtc {
    /// The register selected through port 0x70.
    index: u8,
    /// The 128 bytes; the time registers and C/D are computed, not read from here.
    cmos: Vec<u8>,
    /// Wall time (unix seconds) at guest time `epoch_guest`.
    epoch_wall: i64,
    /// A second boundary of the update cycle, in guest time.
    epoch_guest: GuestNanos,
    /// While SET is held: the time registers, frozen and written by the guest.
    frozen: Option<DateTime>,
    reg_c: u8,
    next_periodic: Option<GuestNanos>,
    next_update: Option<GuestNanos>,
}

/// The clock, read at most once per access and only if needed.
struct LazyNow<'a> {
    clock: &'a mut dyn GuestClock,
    now: Option<GuestNanos>,
}

impl LazyNow<'_> {
    fn get(&mut self) -> GuestNanos {
        *self.now.get_or_insert_with(|| self.clock.now())
    }
}

impl Rtc {
    /// An RTC showing `base_unix_seconds` (UTC) at guest time 0, in 24-hour BCD mode with the
    /// standard 32.768 kHz divider and 1024 Hz periodic rate programmed (register A = 0x26),
    /// interrupts off. Times past 9999-12-31 are clamped to it.
    pub fn new(base_unix_seconds: u64) -> Self {
        let mut cmos = vec![0u8; 128];
        cmos[usize::from(REG_A)] = 0x26;
        cmos[usize::from(REG_B)] = B_24H;
        Rtc {
            index: 0,
            cmos,
            epoch_wall: base_unix_seconds.min(MAX_BASE_SECONDS) as i64,
            epoch_guest: 0,
            frozen: None,
            reg_c: 0,
            next_periodic: None,
            next_update: None,
        }
    }

    /// Presets an NVRAM byte (the VMM's firmware role: memory sizes and the like). The clock and
    /// control registers are not NVRAM and are left alone.
    pub fn set_nvram(&mut self, index: u8, value: u8) {
        let index = index & 0x7f;
        if index <= REG_D || index == REG_CENTURY {
            tracing::debug!(index, "rtc: not an NVRAM byte");
            return;
        }
        self.cmos_set(index, value);
    }

    fn cmos_get(&self, index: u8) -> u8 {
        self.cmos.get(usize::from(index)).copied().unwrap_or(0)
    }

    fn cmos_set(&mut self, index: u8, value: u8) {
        // The vector may come from a snapshot: keep it 128 bytes long.
        self.cmos.resize(128, 0);
        self.cmos[usize::from(index & 0x7f)] = value;
    }

    fn reg_b(&self) -> u8 {
        self.cmos_get(REG_B)
    }

    fn wall_at(&self, now: GuestNanos) -> i64 {
        self.epoch_wall.saturating_add((now.saturating_sub(self.epoch_guest) / NANOS_PER_SEC) as i64)
    }

    /// The start of the update-cycle second holding `now`.
    fn second_start(&self, now: GuestNanos) -> GuestNanos {
        now - now.saturating_sub(self.epoch_guest) % NANOS_PER_SEC
    }

    /// The time registers now (frozen ones need no clock).
    fn current(&self, now: &mut LazyNow<'_>) -> DateTime {
        match self.frozen {
            Some(dt) => dt,
            None => DateTime::from_unix(self.wall_at(now.get())),
        }
    }

    fn encode(&self, v: u8) -> u8 {
        if self.reg_b() & B_DM != 0 {
            v
        } else {
            ((v / 10 % 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.reg_b() & B_DM != 0 {
            v
        } else {
            (v >> 4) * 10 + (v & 0x0f)
        }
    }

    fn encode_hour(&self, h: u8) -> u8 {
        if self.reg_b() & B_24H != 0 {
            self.encode(h)
        } else {
            let h12 = if h % 12 == 0 { 12 } else { h % 12 };
            self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
        }
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.reg_b() & B_24H != 0 {
            self.decode(v)
        } else {
            self.decode(v & 0x7f) % 12 + if v & 0x80 != 0 { 12 } else { 0 }
        }
    }

    fn read_time_register(&self, index: u8, dt: &DateTime) -> u8 {
        match index {
            REG_SECONDS => self.encode(dt.second),
            REG_MINUTES => self.encode(dt.minute),
            REG_HOURS => self.encode_hour(dt.hour),
            REG_WEEKDAY => self.encode(dt.weekday),
            REG_DAY => self.encode(dt.day),
            REG_MONTH => self.encode(dt.month),
            REG_YEAR => self.encode(dt.year.rem_euclid(100) as u8),
            _ => self.encode(dt.year.div_euclid(100).rem_euclid(100) as u8),
        }
    }

    fn write_time_register(&mut self, index: u8, value: u8, now: &mut LazyNow<'_>) {
        let mut dt = self.current(now);
        let v = self.decode(value);
        match index {
            REG_SECONDS => dt.second = v,
            REG_MINUTES => dt.minute = v,
            REG_HOURS => dt.hour = self.decode_hour(value),
            REG_WEEKDAY => dt.weekday = v,
            REG_DAY => dt.day = v,
            REG_MONTH => dt.month = v,
            REG_YEAR => dt.year = dt.year.div_euclid(100) * 100 + i64::from(v),
            _ => dt.year = i64::from(v) * 100 + dt.year.rem_euclid(100),
        }
        if self.frozen.is_some() {
            // Kept field by field: a date valid only once all fields are written (day 31 before
            // the month) must not be normalized halfway.
            self.frozen = Some(dt);
        } else if index == REG_WEEKDAY {
            tracing::debug!("rtc: weekday follows the date while the clock runs, write ignored");
        } else {
            // The clock continues from the written time, keeping the update-cycle phase.
            let t = now.get();
            self.epoch_guest = self.second_start(t);
            self.epoch_wall = dt.to_unix();
        }
    }

    fn write_b(&mut self, value: u8, now: &mut LazyNow<'_>) {
        let old = self.reg_b();
        // Setting SET also clears UIE.
        let new = if value & B_SET != 0 { value & !B_UIE } else { value };
        if (old ^ new) & B_SET != 0 {
            let t = now.get();
            if new & B_SET != 0 {
                self.frozen = Some(DateTime::from_unix(self.wall_at(t)));
            } else if let Some(dt) = self.frozen.take() {
                // The divider kept running: resume at the same phase of the second.
                self.epoch_guest = self.second_start(t);
                self.epoch_wall = dt.to_unix();
            }
        }
        self.cmos_set(REG_B, new);
        if (old ^ new) & (B_SET | B_PIE | B_AIE | B_UIE) != 0 {
            self.reschedule(now);
        }
    }

    /// Periodic interval in 32.768 kHz ticks, or `None` when the rate is 0 (off).
    fn periodic_ticks(&self) -> Option<u64> {
        match self.cmos_get(REG_A) & 0x0f {
            0 => None,
            // Rates 1 and 2 repeat 8 and 9 with a 32.768 kHz time base.
            r @ (1 | 2) => Some(1 << (r + 6)),
            r => Some(1 << (r - 1)),
        }
    }

    /// The first periodic edge after `now`, on a grid anchored at guest time 0.
    fn next_periodic_after(now: GuestNanos, ticks: u64) -> GuestNanos {
        let period = u128::from(ticks) * u128::from(NANOS_PER_SEC);
        let k = u128::from(now) * TIME_BASE_HZ / period + 1;
        u64::try_from((k * period).div_ceil(TIME_BASE_HZ)).unwrap_or(u64::MAX)
    }

    /// The first update-cycle second boundary after `now`.
    fn next_update_after(&self, now: GuestNanos) -> GuestNanos {
        self.second_start(now).saturating_add(NANOS_PER_SEC)
    }

    /// Recomputes the interrupt deadlines after a change to the enables, SET or the rate.
    fn reschedule(&mut self, now: &mut LazyNow<'_>) {
        let b = self.reg_b();
        self.next_periodic = match self.periodic_ticks() {
            Some(ticks) if b & B_PIE != 0 => Some(Self::next_periodic_after(now.get(), ticks)),
            _ => None,
        };
        self.next_update =
            if b & (B_UIE | B_AIE) != 0 && b & B_SET == 0 { Some(self.next_update_after(now.get())) } else { None };
    }

    fn alarm_matches(&self, dt: &DateTime) -> bool {
        [
            (REG_ALARM_SECONDS, self.encode(dt.second)),
            (REG_ALARM_MINUTES, self.encode(dt.minute)),
            (REG_ALARM_HOURS, self.encode_hour(dt.hour)),
        ]
        .into_iter()
        .all(|(reg, current)| {
            let alarm = self.cmos_get(reg);
            // 0xc0-0xff is "don't care".
            alarm & 0xc0 == 0xc0 || alarm == current
        })
    }

    fn read_register(&mut self, index: u8, now: &mut LazyNow<'_>) -> u8 {
        match index {
            _ if is_time_register(index) => {
                let dt = self.current(now);
                self.read_time_register(index, &dt)
            }
            REG_A => {
                let uip = self.frozen.is_none()
                    && now.get().saturating_sub(self.epoch_guest) % NANOS_PER_SEC >= NANOS_PER_SEC - UIP_NANOS;
                (self.cmos_get(REG_A) & !A_UIP) | if uip { A_UIP } else { 0 }
            }
            REG_C => std::mem::take(&mut self.reg_c),
            REG_D => D_VRT,
            _ => self.cmos_get(index),
        }
    }

    fn write_register(&mut self, index: u8, value: u8, now: &mut LazyNow<'_>) {
        match index {
            _ if is_time_register(index) => self.write_time_register(index, value, now),
            REG_A => {
                let old = self.cmos_get(REG_A);
                self.cmos_set(REG_A, value & !A_UIP);
                if (old ^ value) & 0x0f != 0 && self.reg_b() & B_PIE != 0 {
                    self.reschedule(now);
                }
            }
            REG_B => self.write_b(value, now),
            REG_C | REG_D => tracing::debug!(index, value, "rtc: write to read-only register ignored"),
            _ => self.cmos_set(index, value),
        }
    }
}

impl PioDevice for Rtc {
    /// Byte `i` of a wide access goes to port `base + offset + i`, as an ISA bus splits it.
    fn pio_read(&mut self, ctx: &mut DeviceContext<'_>, base: u16, offset: u16, data: &mut [u8]) {
        let mut now = LazyNow { clock: ctx.inputs, now: None };
        let first = base.wrapping_add(offset);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match first.wrapping_add(i as u16) {
                0x71 => self.read_register(self.index, &mut now),
                // The index port is write-only.
                port => {
                    tracing::debug!(port, "rtc: read of write-only or unknown port");
                    0xff
                }
            };
        }
    }

    fn pio_write(&mut self, ctx: &mut DeviceContext<'_>, base: u16, offset: u16, data: &[u8]) {
        let mut now = LazyNow { clock: ctx.inputs, now: None };
        let first = base.wrapping_add(offset);
        for (i, &byte) in data.iter().enumerate() {
            match first.wrapping_add(i as u16) {
                // Bit 7 is the NMI mask: NMIs are not modelled.
                0x70 => self.index = byte & 0x7f,
                0x71 => self.write_register(self.index, byte, &mut now),
                port => tracing::debug!(port, "rtc: write to unknown port ignored"),
            }
        }
    }
}

impl Timed for Rtc {
    fn next_deadline(&self) -> Option<GuestNanos> {
        match (self.next_periodic, self.next_update) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sets the flags of the events due by `now` and pulses IRQ8 when IRQF becomes set. Events
    /// missed while behind collapse into one (register C cannot count them either); the next
    /// deadline is the first one after `now`.
    fn on_time(&mut self, now: GuestNanos, irqs: &mut IrqLines) {
        let irqf_before = self.reg_c & C_IRQF != 0;
        if let (Some(t), Some(ticks)) = (self.next_periodic, self.periodic_ticks()) {
            if t <= now {
                self.reg_c |= C_PF;
                self.next_periodic = Some(Self::next_periodic_after(now, ticks));
            }
        }
        if let Some(t) = self.next_update {
            if t <= now {
                self.reg_c |= C_UF;
                // The alarm compares against the time just set by that update.
                if self.alarm_matches(&DateTime::from_unix(self.wall_at(t))) {
                    self.reg_c |= C_AF;
                }
                self.next_update = Some(self.next_update_after(now));
            }
        }
        // Flag bits line up with their enables in register B.
        if self.reg_c & self.reg_b() & (C_PF | C_AF | C_UF) != 0 {
            self.reg_c |= C_IRQF;
        }
        if !irqf_before && self.reg_c & C_IRQF != 0 {
            irqs.pulse(irq::RTC);
        }
    }
}

whole_device_state! {
    /// The complete state of the RTC: the index selected through port 0x70; the 128 CMOS bytes
    /// (registers A and B, the alarm, the NVRAM); the clock's base, wall time `epoch_wall` at
    /// guest time `epoch_guest` (at VM start the VMM's `--rtc-base` at guest time 0, moved by
    /// every guest write to the time), so a restored RTC shows the saved calendar whatever base
    /// it was built with; the time registers frozen while SET is held; register C's flags; and
    /// the guest times of the next periodic interrupt and of the next update cycle.
    RtcState for Rtc
}

/// Far beyond any date a guest can set, and below where the calendar arithmetic overflows.
const MAX_STATE_WALL: u64 = 3_000_000_000_000_000_000;
const MAX_STATE_YEAR: u64 = 100_000_000_000;

impl Rtc {
    fn check_state(&self) -> Result<(), StateError> {
        ensure_state!(self.index <= 0x7f, "rtc", "index {:#x} beyond the 128 CMOS bytes", self.index);
        ensure_state!(self.cmos.len() == 128, "rtc", "{} CMOS bytes instead of 128", self.cmos.len());
        let computed = (0..128u8).filter(|&i| is_time_register(i) || i == REG_C || i == REG_D);
        for i in computed {
            ensure_state!(self.cmos_get(i) == 0, "rtc", "CMOS byte {i:#04x} is computed, but holds a stored value");
        }
        ensure_state!(
            self.epoch_wall.unsigned_abs() <= MAX_STATE_WALL,
            "rtc",
            "wall time {} s is beyond any date a guest can set",
            self.epoch_wall
        );
        if let Some(dt) = self.frozen {
            ensure_state!(
                dt.year.unsigned_abs() <= MAX_STATE_YEAR,
                "rtc",
                "frozen year {} is beyond any date",
                dt.year
            );
        }
        let b = self.reg_b();
        ensure_state!(self.cmos_get(REG_A) & A_UIP == 0, "rtc", "register A stores UIP, which is computed on read");
        ensure_state!(
            b & (B_SET | B_UIE) != B_SET | B_UIE,
            "rtc",
            "register B {b:#04x} has SET and UIE, but SET clears UIE"
        );
        ensure_state!(
            self.frozen.is_some() == (b & B_SET != 0),
            "rtc",
            "frozen time registers ({}) without SET in register B {b:#04x}, or the reverse",
            self.frozen.is_some()
        );
        let c = self.reg_c;
        ensure_state!(
            c & 0x0f == 0 && (c & C_IRQF == 0 || c & (C_PF | C_AF | C_UF) != 0),
            "rtc",
            "register C {c:#04x}: only PF, AF, UF and IRQF (with one of them) can be set"
        );
        let periodic = b & B_PIE != 0 && self.periodic_ticks().is_some();
        ensure_state!(
            self.next_periodic.is_some() == periodic,
            "rtc",
            "periodic interrupt at {:?} with register A {:#04x} and B {b:#04x}",
            self.next_periodic,
            self.cmos_get(REG_A)
        );
        let update = b & (B_UIE | B_AIE) != 0 && b & B_SET == 0;
        ensure_state!(
            self.next_update.is_some() == update,
            "rtc",
            "update-cycle interrupt at {:?} with register B {b:#04x}",
            self.next_update
        );
        Ok(())
    }
}

const _: () = assert!(ports::CMOS == 0x70);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::{lockstep, refused, restored};
    use crate::{IrqChange, Stateful, VmRequest};

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

    struct Harness {
        rtc: Rtc,
        clock: Clock,
        irqs: IrqLines,
    }

    const S: u64 = NANOS_PER_SEC;

    impl Harness {
        fn new(base: u64) -> Self {
            Harness { rtc: Rtc::new(base), clock: Clock::default(), irqs: IrqLines::default() }
        }
        fn at(&mut self, now: u64) -> &mut Self {
            self.clock.now = now;
            self
        }
        fn write(&mut self, reg: u8, value: u8) -> &mut Self {
            let mut requests = Vec::<VmRequest>::new();
            let mut ctx = DeviceContext { inputs: &mut self.clock, irqs: &mut self.irqs, requests: &mut requests };
            self.rtc.pio_write(&mut ctx, 0x70, 0, &[reg]);
            self.rtc.pio_write(&mut ctx, 0x70, 1, &[value]);
            self
        }
        fn read(&mut self, reg: u8) -> u8 {
            let mut requests = Vec::<VmRequest>::new();
            let mut ctx = DeviceContext { inputs: &mut self.clock, irqs: &mut self.irqs, requests: &mut requests };
            self.rtc.pio_write(&mut ctx, 0x70, 0, &[reg]);
            let mut b = [0u8];
            self.rtc.pio_read(&mut ctx, 0x70, 1, &mut b);
            b[0]
        }
        /// (century, year, month, day, weekday, hour, minute, second) as the registers show them.
        fn regs(&mut self) -> [u8; 8] {
            [0x32, 0x09, 0x08, 0x07, 0x06, 0x04, 0x02, 0x00].map(|r| self.read(r))
        }
        fn pulses(&mut self, now: u64) -> usize {
            self.rtc.on_time(now, &mut self.irqs);
            let changes: Vec<_> = self.irqs.drain().collect();
            assert!(changes.iter().all(|&c| c == (8, IrqChange::Pulse)));
            changes.len()
        }
    }

    #[test]
    fn known_timestamps_in_bcd() {
        let mut h = Harness::new(0);
        assert_eq!(h.regs(), [0x19, 0x70, 0x01, 0x01, 0x05, 0x00, 0x00, 0x00], "1970-01-01 Thu");
        let mut h = Harness::new(951_782_400);
        assert_eq!(h.regs(), [0x20, 0x00, 0x02, 0x29, 0x03, 0x00, 0x00, 0x00], "2000-02-29 Tue");
        let mut h = Harness::new(1_767_225_599);
        assert_eq!(h.regs(), [0x20, 0x25, 0x12, 0x31, 0x04, 0x23, 0x59, 0x59], "2025-12-31 Wed");
        h.at(S);
        assert_eq!(h.regs(), [0x20, 0x26, 0x01, 0x01, 0x05, 0x00, 0x00, 0x00], "2026-01-01 Thu");
    }

    #[test]
    fn known_timestamps_in_binary() {
        let mut h = Harness::new(1_767_225_599);
        h.write(REG_B, B_24H | B_DM);
        assert_eq!(h.regs(), [20, 25, 12, 31, 4, 23, 59, 59]);
        let mut h = Harness::new(951_782_400 + 13 * 3600 + 7 * 60 + 9);
        h.write(REG_B, B_24H | B_DM);
        assert_eq!(h.regs(), [20, 0, 2, 29, 3, 13, 7, 9]);
    }

    #[test]
    fn time_advances_with_the_guest_clock() {
        let mut h = Harness::new(1_767_225_500);
        assert_eq!(h.read(REG_SECONDS), 0x20);
        h.at(S - 1);
        assert_eq!(h.read(REG_SECONDS), 0x20, "whole seconds only");
        h.at(S);
        assert_eq!(h.read(REG_SECONDS), 0x21);
        h.at(40 * S + S / 2);
        assert_eq!([h.read(REG_HOURS), h.read(REG_MINUTES), h.read(REG_SECONDS)], [0x23, 0x59, 0x00]);
        h.at(100 * S);
        assert_eq!([h.read(REG_HOURS), h.read(REG_MINUTES), h.read(REG_SECONDS)], [0x00, 0x00, 0x00]);
        // A day later.
        h.at(86_400 * S);
        assert_eq!([h.read(REG_YEAR), h.read(REG_MONTH), h.read(REG_DAY)], [0x26, 0x01, 0x01]);
    }

    #[test]
    fn twelve_hour_mode() {
        let mut h = Harness::new(1_767_225_599);
        h.write(REG_B, 0); // BCD, 12-hour
        assert_eq!(h.read(REG_HOURS), 0x91, "11 PM");
        h.at(S);
        assert_eq!(h.read(REG_HOURS), 0x12, "12 AM");
        h.at(S + 12 * 3600 * S);
        assert_eq!(h.read(REG_HOURS), 0x92, "12 PM");
        h.at(S + 9 * 3600 * S);
        assert_eq!(h.read(REG_HOURS), 0x09, "9 AM");
        h.write(REG_B, B_DM);
        assert_eq!(h.read(REG_HOURS), 0x09);
        h.at(S + 21 * 3600 * S);
        assert_eq!(h.read(REG_HOURS), 0x89, "9 PM binary");
        // Writing in 12-hour mode: 12 AM is hour 0.
        h.write(REG_HOURS, 12);
        h.write(REG_B, B_24H | B_DM);
        assert_eq!(h.read(REG_HOURS), 0);
        h.write(REG_B, 0);
        h.write(REG_HOURS, 0x87); // 7 PM in BCD
        h.write(REG_B, B_24H);
        assert_eq!(h.read(REG_HOURS), 0x19);
    }

    #[test]
    fn set_freezes_and_writes_move_the_clock() {
        let mut h = Harness::new(1_767_225_599);
        h.at(S / 4);
        h.write(REG_B, B_SET | B_24H);
        h.at(10 * S);
        assert_eq!(h.read(REG_SECONDS), 0x59, "frozen while SET");
        assert_eq!(h.read(REG_A) & A_UIP, 0, "no update in progress while SET");
        // 2024-03-31 12:34:56, written with a day that Feb (the old month) does not have.
        for (reg, v) in [(REG_DAY, 0x31), (REG_MONTH, 0x03), (REG_YEAR, 0x24), (REG_CENTURY, 0x20)] {
            h.write(reg, v);
        }
        for (reg, v) in [(REG_HOURS, 0x12), (REG_MINUTES, 0x34), (REG_SECONDS, 0x56)] {
            h.write(reg, v);
        }
        h.write(REG_WEEKDAY, 0x07);
        assert_eq!(h.regs(), [0x20, 0x24, 0x03, 0x31, 0x07, 0x12, 0x34, 0x56]);
        h.at(10 * S + S / 2);
        h.write(REG_B, B_24H);
        assert_eq!(h.regs(), [0x20, 0x24, 0x03, 0x31, 0x01, 0x12, 0x34, 0x56], "resumes; weekday derived");
        // The update-cycle phase was kept: the next second starts at 11 s guest time.
        h.at(11 * S - 1);
        assert_eq!(h.read(REG_SECONDS), 0x56);
        h.at(11 * S);
        assert_eq!(h.read(REG_SECONDS), 0x57);
        h.at(15 * S);
        assert_eq!(h.read(REG_MINUTES), 0x35);
        assert_eq!(h.read(REG_SECONDS), 0x01);
    }

    #[test]
    fn write_without_set_moves_the_clock_too() {
        let mut h = Harness::new(0);
        h.write(REG_B, B_24H | B_DM);
        h.at(5 * S + 7);
        h.write(REG_YEAR, 99);
        assert_eq!(h.read(REG_YEAR), 99);
        assert_eq!(h.read(REG_SECONDS), 5);
        h.at(6 * S);
        assert_eq!(h.read(REG_SECONDS), 6);
        assert_eq!(h.read(REG_CENTURY), 19);
    }

    #[test]
    fn register_c_clears_on_read_and_d_is_valid() {
        let mut h = Harness::new(0);
        h.write(REG_B, B_24H | B_UIE);
        assert_eq!(h.rtc.next_deadline(), Some(S));
        assert_eq!(h.pulses(S), 1);
        assert_eq!(h.read(REG_C), C_IRQF | C_UF);
        assert_eq!(h.read(REG_C), 0);
        assert_eq!(h.read(REG_D), 0x80);
        h.write(REG_D, 0);
        h.write(REG_C, 0xff);
        assert_eq!(h.read(REG_D), 0x80);
        assert_eq!(h.read(REG_C), 0);
    }

    #[test]
    fn periodic_interrupt_at_1024hz() {
        let mut h = Harness::new(0);
        h.at(0).write(REG_A, 0x26);
        assert_eq!(h.rtc.next_deadline(), None);
        h.write(REG_B, B_24H | B_PIE);
        assert_eq!(h.rtc.next_deadline(), Some(976_563), "1/1024 s rounded up");
        assert_eq!(h.pulses(976_562), 0);
        assert_eq!(h.pulses(976_563), 1);
        assert_eq!(h.rtc.next_deadline(), Some(1_953_125));
        // IRQF still set: no new edge until register C is read.
        assert_eq!(h.pulses(1_953_125), 0);
        assert_eq!(h.read(REG_C), C_IRQF | C_PF);
        assert_eq!(h.pulses(2_929_688), 1);
        // Late: one interrupt, and the next deadline is after `now`.
        h.read(REG_C);
        assert_eq!(h.pulses(10 * 976_563), 1);
        assert_eq!(h.rtc.next_deadline(), Some(10_742_188));
        // 2 Hz.
        h.at(S + 1).write(REG_A, 0x2f);
        assert_eq!(h.rtc.next_deadline(), Some(3 * S / 2));
        h.write(REG_B, B_24H);
        assert_eq!(h.rtc.next_deadline(), None);
    }

    #[test]
    fn alarm_interrupt() {
        let mut h = Harness::new(1_767_225_590); // 23:59:50
        h.write(REG_ALARM_HOURS, 0x23).write(REG_ALARM_MINUTES, 0x59).write(REG_ALARM_SECONDS, 0x55);
        h.write(REG_B, B_24H | B_AIE);
        let mut fired = vec![];
        for s in 1..=9u64 {
            if h.pulses(s * S) > 0 {
                fired.push(s);
                assert_eq!(h.read(REG_C), C_IRQF | C_AF | C_UF);
            }
        }
        assert_eq!(fired, vec![5]);
        // Don't-care hours and minutes: every minute at :00.
        h.write(REG_ALARM_HOURS, 0xc0).write(REG_ALARM_MINUTES, 0xff).write(REG_ALARM_SECONDS, 0x00);
        let fired: Vec<u64> = (10..=130u64)
            .filter(|&s| {
                let p = h.pulses(s * S);
                h.read(REG_C);
                p > 0
            })
            .collect();
        assert_eq!(fired, vec![10, 70, 130]);
    }

    #[test]
    fn uip_in_the_last_244us_of_each_second() {
        let mut h = Harness::new(0);
        h.at(S - UIP_NANOS - 1);
        assert_eq!(h.read(REG_A), 0x26);
        h.at(S - UIP_NANOS);
        assert_eq!(h.read(REG_A), 0xa6);
        h.at(S);
        assert_eq!(h.read(REG_A), 0x26);
        h.write(REG_A, 0xaa);
        assert_eq!(h.read(REG_A), 0x2a, "UIP is read-only");
    }

    #[test]
    fn clock_is_read_only_when_time_matters() {
        let mut h = Harness::new(0);
        h.write(0x40, 1);
        h.read(0x40);
        h.read(REG_B);
        h.read(REG_C);
        h.read(REG_D);
        h.read(REG_ALARM_HOURS);
        h.write(REG_B, B_24H | B_DM);
        h.write(REG_A, 0x25);
        assert_eq!(h.clock.reads, 0);
        h.read(REG_SECONDS);
        assert_eq!(h.clock.reads, 1);
        h.write(REG_B, B_24H | B_SET);
        assert_eq!(h.clock.reads, 2);
        h.regs();
        h.read(REG_A);
        h.write(REG_MINUTES, 3);
        assert_eq!(h.clock.reads, 2, "frozen registers need no clock");
        // Index write and data read in one 2-byte access read the clock once.
        let mut requests = Vec::<VmRequest>::new();
        let mut ctx = DeviceContext { inputs: &mut h.clock, irqs: &mut h.irqs, requests: &mut requests };
        h.rtc.pio_write(&mut ctx, 0x70, 0, &[REG_B, B_24H | B_PIE | B_UIE]);
        assert_eq!(h.clock.reads, 3);
    }

    #[test]
    fn nvram_and_index_port() {
        let mut h = Harness::new(0);
        h.write(0x80 | 0x40, 0x5a); // NMI-disable bit set on the index
        assert_eq!(h.read(0x40), 0x5a);
        for i in 0x0e..0x80u8 {
            if i != REG_CENTURY {
                h.write(i, i ^ 0xa5);
            }
        }
        for i in 0x0e..0x80u8 {
            if i != REG_CENTURY {
                assert_eq!(h.read(i), i ^ 0xa5);
            }
        }
        h.write(REG_ALARM_MINUTES, 0x42);
        assert_eq!(h.read(REG_ALARM_MINUTES), 0x42);
        h.rtc.set_nvram(0x34, 0x12);
        h.rtc.set_nvram(REG_B, 0xff);
        assert_eq!(h.read(0x34), 0x12);
        assert_eq!(h.read(REG_B), B_24H);
        let mut b = [0u8; 2];
        let mut requests = Vec::<VmRequest>::new();
        let mut ctx = DeviceContext { inputs: &mut h.clock, irqs: &mut h.irqs, requests: &mut requests };
        h.rtc.pio_read(&mut ctx, 0x70, 0, &mut b);
        assert_eq!(b, [0xff, B_24H], "0x70 is write-only; 0x71 reads the selected register");
    }

    #[test]
    fn leap_years_and_calendar_round_trip() {
        // Naive calendar walk from 1600 to 2400 against the closed-form conversion.
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_len = |y: i64, m: u8| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let mut days = days_from_civil(1600, 1, 1);
        let mut weekday = DateTime::from_unix(days * 86_400).weekday;
        for y in 1600..2400 {
            for m in 1..=12u8 {
                for d in 1..=month_len(y, m) {
                    let dt = DateTime::from_unix(days * 86_400 + 3661);
                    assert_eq!((dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second), (y, m, d, 1, 1, 1));
                    assert_eq!(dt.weekday, weekday);
                    assert_eq!(dt.to_unix(), days * 86_400 + 3661);
                    days += 1;
                    weekday = weekday % 7 + 1;
                }
            }
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28), 2, "2000 is leap");
        assert_eq!(days_from_civil(1900, 3, 1) - days_from_civil(1900, 2, 28), 1, "1900 is not");
        assert_eq!(days_from_civil(2100, 3, 1) - days_from_civil(2100, 2, 28), 1, "2100 is not");
        // 2024-02-28 23:59:59 + 1 s through the device.
        let mut h = Harness::new(1_709_164_799);
        h.at(S);
        assert_eq!([h.read(REG_MONTH), h.read(REG_DAY)], [0x02, 0x29]);
        h.at(S + 86_400 * S);
        assert_eq!([h.read(REG_MONTH), h.read(REG_DAY)], [0x03, 0x01]);
        // Out-of-range fields normalize instead of failing.
        let dt = DateTime { year: 2023, month: 14, day: 0, hour: 25, minute: 0, second: 0, weekday: 1 };
        assert_eq!(DateTime::from_unix(dt.to_unix()).month, 2);
        assert_eq!(Rtc::new(u64::MAX).epoch_wall, MAX_BASE_SECONDS as i64);
    }

    /// One random step chosen by `r`: time passes, then a guest access or an `on_time` turn.
    /// Returns what was read and how many IRQ8 pulses came.
    fn random_step(h: &mut Harness, r: u32) -> Vec<u8> {
        let mut out = vec![];
        h.clock.now += u64::from(r % 3_000_000);
        let offset = (r % 3) as u16;
        let len = [1usize, 2, 4][((r >> 4) % 3) as usize];
        let value = (r >> 8) as u8;
        let mut requests = Vec::<VmRequest>::new();
        let mut ctx = DeviceContext { inputs: &mut h.clock, irqs: &mut h.irqs, requests: &mut requests };
        match (r >> 16) % 4 {
            0 => h.rtc.pio_write(&mut ctx, 0x70, offset, &vec![value; len]),
            1 => h.rtc.pio_write(&mut ctx, 0x70, 0, &[value, (r >> 20) as u8]),
            2 => {
                let mut b = vec![0u8; len];
                h.rtc.pio_read(&mut ctx, 0x70, offset, &mut b);
                out.extend(b);
            }
            _ => {
                let now = h.clock.now;
                if let Some(d) = h.rtc.next_deadline() {
                    out.push(u8::from(d <= now));
                }
                h.rtc.on_time(now, &mut h.irqs);
                out.push(h.irqs.drain().count() as u8);
            }
        }
        out
    }

    #[test]
    fn random_accesses_are_deterministic_and_panic_free() {
        let run = || {
            let mut h = Harness::new(1_700_000_000);
            let mut seed = 0x0123_4567_89ab_cdefu64;
            let mut out = vec![];
            for _ in 0..20_000 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                out.extend(random_step(&mut h, (seed >> 32) as u32));
            }
            (h.rtc, out, h.clock.reads)
        };
        assert_eq!(run(), run());
    }

    /// A harness at the same guest time whose RTC, built with another base time, is restored
    /// from `h`'s: the calendar must come from the state.
    fn fork(h: &Harness) -> Harness {
        let rtc = restored(&h.rtc, Rtc::new(0));
        Harness { rtc, clock: Clock { now: h.clock.now, reads: h.clock.reads }, irqs: IrqLines::default() }
    }

    #[test]
    fn state_restored_mid_run_continues_identically() {
        for seed in 0..40u64 {
            let split = (seed as usize * 97) % 3000;
            let (a, b) = lockstep(seed, split, 3000, Harness::new(1_700_000_000 + seed), fork, |h, r| {
                let out = random_step(h, r);
                (out, h.rtc.next_deadline(), h.clock.reads)
            });
            assert_eq!(a.rtc, b.rtc);
        }
    }

    #[test]
    fn state_keeps_the_calendar_the_interrupts_and_a_frozen_time() {
        let mut h = Harness::new(1_767_225_590); // 2025-12-31 23:59:50
        h.write(REG_ALARM_HOURS, 0xc0).write(REG_ALARM_MINUTES, 0xc0).write(REG_ALARM_SECONDS, 0x55);
        h.at(S / 3).write(REG_A, 0x2c); // 16 Hz
        h.write(REG_B, B_24H | B_PIE | B_AIE);
        h.write(0x40, 0x99);
        assert_eq!(h.pulses(S / 2), 1);
        let mut twin = fork(&h);
        let mut seen = vec![];
        for g in [&mut h, &mut twin] {
            let mut run = vec![];
            for t in (1..40u64).map(|k| S / 2 + k * S / 4) {
                run.push((g.pulses(t) as u8, g.at(t).read(REG_C), g.rtc.next_deadline()));
            }
            let regs = g.regs();
            // SET mid-way: half a new date written, then the state is saved again.
            g.write(REG_B, B_24H | B_SET | B_PIE);
            g.write(REG_DAY, 0x31).write(REG_MONTH, 0x03);
            seen.push((run, regs, g.read(0x40), g.clock.reads));
        }
        assert_eq!(seen[0], seen[1]);
        let flags: Vec<u8> = seen[0].0.iter().map(|&(_, c, _)| c).collect();
        assert!(flags.contains(&(C_IRQF | C_PF)) && flags.iter().any(|&c| c & C_AF != 0), "{flags:x?}");
        assert_eq!(
            seen[0].1,
            [0x20, 0x26, 0x01, 0x01, 0x05, 0x00, 0x00, 0x00],
            "2026-01-01, after the base's new year"
        );
        let mut twin = fork(&h);
        for g in [&mut h, &mut twin] {
            g.write(REG_YEAR, 0x24).at(20 * S + 7).write(REG_B, B_24H);
        }
        assert_eq!(h.regs(), twin.regs());
        assert_eq!(twin.regs()[1..4], [0x24, 0x03, 0x31]);
        assert_eq!(h.rtc, twin.rtc);
    }

    #[test]
    fn impossible_states_are_refused() {
        let mut h = Harness::new(1_767_225_590);
        h.write(REG_B, B_24H | B_PIE);
        let mut fresh = Rtc::new(0);
        let bad = |f: fn(&mut Rtc)| {
            let mut s = h.rtc.save_state();
            f(&mut s.0);
            s
        };
        refused(&mut fresh, &bad(|r| r.index = 0x80), "index 0x80");
        refused(&mut fresh, &bad(|r| r.cmos.truncate(64)), "64 CMOS bytes");
        refused(&mut fresh, &bad(|r| r.cmos[usize::from(REG_SECONDS)] = 5), "byte 0x00 is computed");
        refused(&mut fresh, &bad(|r| r.cmos[usize::from(REG_A)] |= A_UIP), "UIP");
        refused(&mut fresh, &bad(|r| r.frozen = Some(DateTime::from_unix(0))), "frozen time registers");
        refused(&mut fresh, &bad(|r| r.reg_c = C_IRQF), "register C 0x80");
        refused(&mut fresh, &bad(|r| r.next_periodic = None), "periodic interrupt at None");
        refused(&mut fresh, &bad(|r| r.next_update = Some(S)), "update-cycle interrupt");
        refused(&mut fresh, &bad(|r| r.epoch_wall = i64::MIN), "beyond any date");
        refused(
            &mut fresh,
            &bad(|r| {
                r.cmos[usize::from(REG_B)] = B_SET | B_24H;
                r.next_periodic = None;
                r.frozen = Some(DateTime { year: i64::MAX, ..DateTime::from_unix(0) });
            }),
            "frozen year",
        );
        let mut h = Harness::new(0);
        h.write(REG_B, B_24H | B_SET);
        let mut s = h.rtc.save_state();
        s.0.cmos[usize::from(REG_B)] |= B_UIE;
        refused(&mut fresh, &s, "SET clears UIE");
    }
}
