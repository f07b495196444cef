//! `iobench`: `iobench.count` (default 100000) `out` instructions from ring 3 to port 0x80,
//! a port that does nothing on ftvm and QEMU: measures the cost of a port-I/O exit.

#![no_std]
#![no_main]

use ftvm_guest_kit::digest::Digest;
use ftvm_guest_kit::{cmdline, entry, port, println, time};

entry!(main);

/// The POST-code port: no device behind it, every write is a plain exit.
const PORT: u16 = 0x80;

fn main() {
    let count = cmdline::param_u64_or("iobench.count", 100_000);
    println!("iobench: {count} writes to port {PORT:#x}");
    // Start on a tick boundary so the tick count measures the loop alone.
    time::sleep_ticks(1);
    let start = time::ticks();
    for i in 0..count {
        port::outb(PORT, i as u8);
    }
    let ticks = time::ticks() - start;
    println!(
        "ticks: {ticks} ({} ms at {} Hz; about {} ns per out)",
        time::ticks_to_ms(ticks),
        time::TICK_HZ,
        (ticks * 1_000_000_000 / u64::from(time::TICK_HZ)).checked_div(count).unwrap_or(0)
    );
    let mut digest = Digest::new();
    digest.write(b"iobench");
    digest.write_u64(count);
    println!("digest: iobench count={count} {digest}");
}
