//! `hello`: the smallest useful guest. Prints a greeting, the command line, the memory
//! size and the RTC time, idles `hello.wait_ms` milliseconds (default 100) on the 100 Hz
//! timer, and prints a digest that must be identical on every run and every hypervisor.
//!
//! `hello.spin_ms=N` then spins in ring 3, exit-free, until N ms of timer ticks have come.
//!
//! `hello.shutdown=1` listens for the operator's shutdown request while it idles (SIGTERM to
//! ftvm: Ctrl+Alt+Del on the keyboard) and powers off on it; without it hello ignores the
//! request, as a guest without a driver would.
//!
//! `hello.crash=panic|ud2|pagefault` ends it early on purpose, to exercise the kit's panic
//! handler and its exception reporting (both print and power off).

#![no_std]
#![no_main]

use ftvm_guest_kit::digest::Digest;
use ftvm_guest_kit::{cmdline, entry, mem, port, println, rtc, time};

entry!(main);

const GREETING: &str = "hello from an ftvm guest-kit guest in ring 3";

fn main() {
    println!("{GREETING}");
    println!("cmdline: {}", cmdline::cmdline());
    match mem::ram_bytes() {
        Some(bytes) => println!("memory: {} KiB usable in {} region(s)", bytes >> 10, mem::ram_regions()),
        None => println!("memory: unknown (no memory map from the loader)"),
    }
    let before = rtc::read();
    match before {
        Some(now) => println!("rtc: {now}"),
        None => println!("rtc: none"),
    }

    match cmdline::param("hello.crash") {
        None => {}
        Some("panic") => panic!("hello.crash=panic"),
        // SAFETY: deliberately faults; the kit reports the exception and powers off.
        Some("ud2") => unsafe { core::arch::asm!("ud2") },
        Some("pagefault") => {
            // The local APIC page is mapped supervisor-only: a ring-3 read faults.
            // SAFETY: deliberately faults, as above.
            unsafe { core::ptr::read_volatile(0xfee0_0030 as *const u32) };
        }
        Some(other) => println!("hello.crash={other}: unknown, ignored"),
    }

    let wait_ms = cmdline::param_u64_or("hello.wait_ms", 100);
    let start = time::ticks();
    if cmdline::flag("hello.shutdown") {
        ftvm_guest_kit::shutdown::enable();
        let target = start + time::ms_to_ticks(wait_ms);
        while time::ticks() < target {
            if ftvm_guest_kit::shutdown::requested() {
                println!("hello: shutdown requested; powering off");
                return;
            }
            time::idle();
        }
    } else {
        time::sleep_ms(wait_ms);
    }
    let ticks = time::ticks() - start;
    println!("ticks: {ticks} (waited {wait_ms} ms at {} Hz)", time::TICK_HZ);
    match (before, rtc::read()) {
        (Some(a), Some(b)) => {
            let elapsed = (b.seconds_of_day() + 86_400 - a.seconds_of_day()) % 86_400;
            println!("rtc: {b} ({elapsed} s elapsed)");
        }
        _ => println!("rtc: none"),
    }

    // `hello.spin_ms=N`: compute in ring 3 without a single exit until N ms of timer ticks
    // have arrived. A recorder that delivers interrupts only at exits never ends this; one
    // with sync points delivers each tick within its bound.
    let spin_ms = cmdline::param_u64_or("hello.spin_ms", 0);
    if spin_ms > 0 {
        let start = time::ticks();
        let target = start + time::ms_to_ticks(spin_ms);
        // The spin starts right after a port read (CMOS register 0) and counts its turns in
        // RAX, the register that read wrote: a replay that applies a sync point must not let
        // the read's completion clobber the registers it restores (the count would differ).
        port::outb(0x70, 0);
        let _ = port::inb(0x71);
        let ticks = ftvm_guest_kit::interrupts::ticks_counter().as_ptr();
        let mut spins: u64 = 0;
        // SAFETY: reads the tick counter (a valid, aligned u64 the timer handler increments)
        // and counts in registers; no other memory is touched.
        unsafe {
            core::arch::asm!(
                "2:",
                "inc rax",
                "pause",
                "cmp [{ticks}], {target}",
                "jb 2b",
                ticks = in(reg) ticks,
                target = in(reg) target,
                inout("rax") spins,
                options(nostack, readonly),
            );
        }
        println!("spin: {} ticks in ring 3 without an exit ({spins} turns)", time::ticks() - start);
    }

    let mut digest = Digest::new();
    digest.write(GREETING.as_bytes());
    digest.write_u64(prime_sum(core::hint::black_box(10_000)));
    println!("digest: {digest}");
}

/// Sum of the primes below `limit` (trial division: small, fixed work).
fn prime_sum(limit: u64) -> u64 {
    (2..limit).filter(|&n| (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)).sum()
}
