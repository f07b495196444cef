//! Time from the 100 Hz PIT: tick counting, idling and sleeping.

pub use crate::interrupts::ticks;
pub use crate::pit::TICK_HZ;
pub use crate::syscall::idle;

/// Converts milliseconds to timer ticks, rounding up.
pub const fn ms_to_ticks(ms: u64) -> u64 {
    (ms * TICK_HZ as u64).div_ceil(1000)
}

/// Converts timer ticks to milliseconds.
pub const fn ticks_to_ms(ticks: u64) -> u64 {
    ticks * 1000 / TICK_HZ as u64
}

/// Idles until `n` more timer interrupts have arrived.
pub fn sleep_ticks(n: u64) {
    let target = ticks() + n;
    while ticks() < target {
        idle();
    }
}

/// Idles for at least `ms` milliseconds (to the next tick).
pub fn sleep_ms(ms: u64) {
    sleep_ticks(ms_to_ticks(ms));
}
