//! The ACPI power-management timer at port 0x608 (ftvm's machine: a free-running 32-bit
//! counter at 3.579545 MHz of guest time, from guest time 0), read from ring 3: a clock that
//! does not depend on timer interrupts arriving on time. Machines without one (QEMU
//! microvm) float the port at all ones.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::port::inl;

const PORT: u16 = 0x608;
const HZ: u64 = 3_579_545;

/// The count so far, extended past 32 bits: the last raw reading in the low half and the
/// wraps seen in the high half.
static COUNT: AtomicU64 = AtomicU64::new(0);

/// Whether the timer is there and counting: two reads a few port accesses apart (at least
/// a microsecond here, several counts) differ and are not all ones.
pub fn present() -> bool {
    let a = inl(PORT);
    let mut b = a;
    for _ in 0..4 {
        b = inl(PORT);
    }
    a != u32::MAX && b != u32::MAX && a != b
}

/// Guest nanoseconds since guest time 0 (rounded down to a count, 279 ns). Must be called
/// at least once every 20 minutes (the counter wraps), and only where [`present`] said so.
pub fn guest_ns() -> u64 {
    let raw = u64::from(inl(PORT));
    let last = COUNT.load(Ordering::Relaxed);
    let mut count = (last & !0xffff_ffff) | raw;
    if count < last {
        count += 1 << 32;
    }
    COUNT.store(count, Ordering::Relaxed);
    (u128::from(count) * 1_000_000_000 / u128::from(HZ)) as u64
}
