//! Test-only crash switches: `FTVM_TEST_CRASH=WINDOW:N` makes a primary abort at exactly one
//! of the four crash windows of docs/replication.md for its N-th output (counted from 0):
//!
//! 1. before the output's log entry is written (it never reaches the backup);
//! 2. after the backup acknowledged it, before it is performed;
//! 3. after it is performed, before OUTPUT_DONE covers it;
//! 4. after a heartbeat carrying OUTPUT_DONE for it has gone out.
//!
//! The process aborts (like a crash: no cleanup, the kernel releases the arbiter's lock).

use std::sync::OnceLock;

fn switch() -> Option<(u8, u64)> {
    static SWITCH: OnceLock<Option<(u8, u64)>> = OnceLock::new();
    *SWITCH.get_or_init(|| {
        let v = std::env::var("FTVM_TEST_CRASH").ok()?;
        let (w, n) = v.split_once(':')?;
        let w: u8 = w.parse().ok().filter(|w| (1..=4).contains(w))?;
        Some((w, n.parse().ok()?))
    })
}

/// Aborts the process if the switch names this window and output.
pub fn crash_point(window: u8, ordinal: u64) {
    if switch() == Some((window, ordinal)) {
        tracing::error!(
            target: "ftvm::event",
            event = "test_crash",
            window,
            ordinal,
            "FTVM_TEST_CRASH: aborting in crash window {window} at output #{ordinal}"
        );
        std::process::abort();
    }
}

/// Whether a window-4 crash is armed for this output (the performing thread then waits for a
/// heartbeat to carry OUTPUT_DONE before aborting).
pub fn armed(window: u8, ordinal: u64) -> bool {
    switch() == Some((window, ordinal))
}
