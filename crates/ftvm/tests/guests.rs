//! The reference guests boot on /dev/kvm under ftvm and print exactly the results they print
//! under QEMU microvm. Needs `cargo xtask guests` (scripts/test.sh runs it).

mod common;

use std::process::Command;
use std::time::Instant;

use common::*;

/// The `digest:` lines the guests print for their default work. They are the same under
/// ftvm and QEMU microvm (checked below against a live QEMU run); a change here means the
/// guest's computation changed.
const HELLO_DIGEST: &str = "digest: 5bb77e819d94f1ba";
const COMPUTE_DIGEST: &str = "digest: compute rounds=200 7d9516365bf165e2";

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn hello_prints_reads_the_rtc_counts_ticks_and_powers_off() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("hello");
    // 2025-12-31 23:59:59 UTC: the RTC must show this base plus guest time.
    let (out, console) =
        run_guest(&guest("hello"), &["--cmdline", "hello.wait_ms=2000", "--rtc-base", "1767225599"], &dir);
    assert_eq!(out.status.code(), Some(0), "{}\n{console}", stderr(&out));
    assert_eq!(digest_lines(&console), vec![HELLO_DIGEST.to_string()], "{console}");
    assert!(console.contains("hello from an ftvm guest-kit guest in ring 3"), "{console}");
    assert!(console.contains("cmdline: hello.wait_ms=2000"), "{console}");
    let ticks = number_after(&console, "ticks:").expect("ticks line");
    assert!((180..=230).contains(&ticks), "waited 2 s at 100 Hz but saw {ticks} ticks\n{console}");
    let first_rtc = console.lines().find(|l| l.starts_with("rtc:")).unwrap();
    assert!(
        first_rtc == "rtc: 2025-12-31 23:59:59" || first_rtc == "rtc: 2026-01-01 00:00:00",
        "RTC does not follow --rtc-base: {first_rtc}"
    );
    let elapsed = console.lines().filter(|l| l.starts_with("rtc:")).nth(1).unwrap();
    assert!(elapsed.contains("(2 s elapsed)") || elapsed.contains("(3 s elapsed)"), "{elapsed}");
    assert!(console.contains("memory: 261"), "256 MiB guest: {console}");
}

#[test]
fn hello_sees_the_memory_it_is_given() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("hello-mem");
    let (out, console) = run_guest(&guest("hello"), &["--mem", "64M", "--cmdline", "hello.wait_ms=0"], &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // 64 MiB less the legacy hole (640 KiB..1 MiB) = 65152 KiB.
    assert!(console.contains("memory: 65152 KiB"), "{console}");
    assert_eq!(digest_lines(&console), vec![HELLO_DIGEST.to_string()]);
}

#[test]
fn compute_runs_ring3_work_to_the_exact_digest() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("compute");
    let start = Instant::now();
    let (out, console) = run_guest(&guest("compute"), &[], &dir);
    let wall_ms = start.elapsed().as_millis() as u64;
    assert_eq!(out.status.code(), Some(0), "{}\n{console}", stderr(&out));
    assert_eq!(digest_lines(&console), vec![COMPUTE_DIGEST.to_string()], "{console}");
    // Timer interrupts reach a guest computing in ring 3 (the kick path): its tick count
    // matches the wall time within reason.
    let ticks = number_after(&console, "ticks:").expect("ticks line");
    let tick_ms = ticks * 10;
    assert!(tick_ms > wall_ms / 2 && tick_ms <= wall_ms + 50, "{ticks} ticks in {wall_ms} ms\n{console}");
}

#[test]
fn compute_digest_depends_on_its_input() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("compute-small");
    let (out, console) = run_guest(&guest("compute"), &["--cmdline", "compute.rounds=3"], &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let d = digest_lines(&console);
    assert_eq!(d.len(), 1);
    assert!(d[0].starts_with("digest: compute rounds=3 ") && d[0] != COMPUTE_DIGEST, "{d:?}");
    // Deterministic: the same input gives the same digest.
    let (_, again) = run_guest(&guest("compute"), &["--cmdline", "compute.rounds=3"], &dir);
    assert_eq!(digest_lines(&again), d);
}

#[test]
fn iobench_exits_through_the_port_bus() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("iobench");
    let (out, console) = run_guest(&guest("iobench"), &["--cmdline", "iobench.count=2000"], &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(digest_lines(&console).len(), 1, "{console}");
    assert!(console.contains("iobench: 2000 writes to port 0x80"), "{console}");
}

/// Runs a guest under QEMU microvm with KVM and returns its console.
fn qemu(kernel: &std::path::Path, append: &str) -> String {
    let out = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,rtc=on", "-enable-kvm", "-m", "256", "-display", "none", "-serial", "stdio"])
        .args(["-monitor", "none", "-no-reboot", "-kernel"])
        .arg(kernel)
        .args(["-append", append])
        .output()
        .expect("qemu-system-x86_64 is missing: install Debian's qemu-system-x86 (scripts/deps.sh does)");
    assert!(out.status.success(), "QEMU failed: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn guests_print_the_same_digests_under_qemu_microvm() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("vs-qemu");
    for (name, append) in
        [("hello", "hello.wait_ms=300"), ("compute", "compute.rounds=20"), ("iobench", "iobench.count=500")]
    {
        let (out, ours) = run_guest(&guest(name), &["--cmdline", append], &dir);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
        let theirs = qemu(&guest(name), append);
        let d = digest_lines(&ours);
        assert!(!d.is_empty(), "{name}: no digest under ftvm:\n{ours}");
        assert_eq!(d, digest_lines(&theirs), "{name}: ftvm and QEMU disagree\nftvm:\n{ours}\nqemu:\n{theirs}");
        if name == "hello" {
            let t = number_after(&theirs, "ticks:").unwrap();
            assert!((25..=40).contains(&t), "QEMU ticks {t}");
        }
    }
}
