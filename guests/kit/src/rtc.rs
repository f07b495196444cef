//! The CMOS real-time clock (ports 0x70/0x71), read from ring 3.

use core::fmt;

use crate::port::{inb, outb};

const INDEX: u16 = 0x70;
const DATA: u16 = 0x71;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const STATUS_A_UIP: u8 = 0x80;
const STATUS_B_24H: u8 = 0x02;
const STATUS_B_BINARY: u8 = 0x04;
/// Polls of the update-in-progress bit before giving up (it lasts under 2 ms).
const UIP_POLLS: u32 = 10_000;

/// A wall-clock date and time as the RTC keeps it (no time zone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

impl DateTime {
    /// Seconds since midnight.
    pub fn seconds_of_day(&self) -> u32 {
        u32::from(self.hour) * 3600 + u32::from(self.minute) * 60 + u32::from(self.second)
    }
}

impl fmt::Display for DateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

fn cmos(reg: u8) -> u8 {
    outb(INDEX, reg);
    inb(DATA)
}

/// Waits out an update in progress; false if the bit never clears.
fn wait_update_done() -> bool {
    (0..UIP_POLLS).any(|_| cmos(REG_STATUS_A) & STATUS_A_UIP == 0)
}

fn raw() -> [u8; 6] {
    [
        cmos(0x00), // seconds
        cmos(0x02), // minutes
        cmos(0x04), // hours
        cmos(0x07), // day of month
        cmos(0x08), // month
        cmos(0x09), // year (two digits)
    ]
}

fn from_bcd(value: u8) -> u8 {
    (value >> 4) * 10 + (value & 0x0f)
}

/// Reads the RTC. `None` if there is none (the ports float at 0xff) or it never settles.
pub fn read() -> Option<DateTime> {
    if cmos(REG_STATUS_A) == 0xff && cmos(REG_STATUS_B) == 0xff {
        return None;
    }
    // Read until two reads outside an update agree, so no field is torn by an update.
    let mut previous = None;
    for _ in 0..8 {
        if !wait_update_done() {
            return None;
        }
        let now = raw();
        if previous == Some(now) {
            return Some(decode(now, cmos(REG_STATUS_B)));
        }
        previous = Some(now);
    }
    None
}

/// The RTC's seconds (0-59) alone: four port accesses instead of a whole date's, for a
/// guest that watches for the second to change. `None` without an RTC or mid-update.
pub fn second() -> Option<u8> {
    let status_b = cmos(REG_STATUS_B);
    if status_b == 0xff || cmos(REG_STATUS_A) & STATUS_A_UIP != 0 {
        return None;
    }
    let raw = cmos(0x00);
    Some(if status_b & STATUS_B_BINARY == 0 { from_bcd(raw) } else { raw })
}

fn decode(raw: [u8; 6], status_b: u8) -> DateTime {
    let [mut second, mut minute, hour_raw, mut day, mut month, mut year] = raw;
    let pm = hour_raw & 0x80 != 0;
    let mut hour = hour_raw & 0x7f;
    if status_b & STATUS_B_BINARY == 0 {
        second = from_bcd(second);
        minute = from_bcd(minute);
        hour = from_bcd(hour);
        day = from_bcd(day);
        month = from_bcd(month);
        year = from_bcd(year);
    }
    if status_b & STATUS_B_24H == 0 {
        // 12-hour mode: 12 AM is 0 h, 12 PM is 12 h.
        hour %= 12;
        if pm {
            hour += 12;
        }
    }
    DateTime { year: 2000 + u16::from(year), month, day, hour, minute, second }
}
