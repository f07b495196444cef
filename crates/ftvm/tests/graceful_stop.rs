//! A graceful stop (docs/operations.md#stopping): SIGTERM asks the guest to shut down
//! (Ctrl+Alt+Del on its i8042, logged), a guest that handles it powers off (status 0), one that
//! does not is stopped at --stop-timeout (143), a second SIGTERM stops at once, and a recording
//! replays the request at the same exit.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill").args([sig, &child.id().to_string()]).status();
}

fn wait_for(console: &Path, text: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if std::fs::read_to_string(console).unwrap_or_default().contains(text) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{text:?} never appeared on the console: {}", std::fs::read_to_string(console).unwrap_or_default());
}

/// hello idling for a minute: it never looks at the keyboard.
fn idle_hello(dir: &Path, extra: &[&str]) -> (Child, std::path::PathBuf) {
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let console = dir.join(format!("hello-{n}.txt"));
    let child = ftvm()
        .arg("run")
        .arg("--kernel")
        .arg(guest("hello"))
        .args(["--cmdline", "hello.wait_ms=60000", "--console"])
        .arg(format!("file:{}", console.display()))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&console, "kit: ring 3 up");
    (child, console)
}

#[test]
fn a_guest_that_ignores_the_request_is_stopped_at_the_timeout_and_a_second_sigterm_stops_at_once() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("graceful-ignored");
    // The grace period runs out: the old status, 143.
    let (vm, _) = idle_hello(&dir, &["--stop-timeout", "1"]);
    let start = Instant::now();
    signal(&vm, "-TERM");
    let (out, in_time) = finish_within(vm, Duration::from_secs(15));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(in_time, "{err}");
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(start.elapsed() >= Duration::from_millis(900), "stopped before the grace period: {err}");
    assert!(err.contains("asked the guest to shut down"), "{err}");
    assert!(err.contains("did not power off within 1 s"), "{err}");
    // A second SIGTERM, well inside the default 30 s: at once.
    let (vm, _) = idle_hello(&dir, &[]);
    signal(&vm, "-TERM");
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    signal(&vm, "-TERM");
    let (out, in_time) = finish_within(vm, Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(in_time && start.elapsed() < Duration::from_secs(5), "{err}");
    assert_eq!(out.status.code(), Some(143), "{err}");
    // --stop-timeout 0: today's stop at once. SIGINT: at once too (130).
    for (extra, sig, code) in [(&["--stop-timeout", "0"][..], "-TERM", 143), (&[][..], "-INT", 130)] {
        let (vm, _) = idle_hello(&dir, extra);
        let start = Instant::now();
        signal(&vm, sig);
        let (out, in_time) = finish_within(vm, Duration::from_secs(10));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(in_time && start.elapsed() < Duration::from_secs(5), "{err}");
        assert_eq!(out.status.code(), Some(code), "{err}");
        assert!(!err.contains("asked the guest to shut down"), "{err}");
    }
}

/// kvstore on host 1 of `net`, its stderr piped.
fn kvstore(net: &Topology, sub: &[&str], disk: &Path, console: &Path) -> Child {
    net.kvstore_vm(sub, disk, console).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

#[test]
fn kvstore_powers_off_on_sigterm_keeps_its_writes_and_the_recording_replays_the_request() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("graceful-kvstore");
    let net = Topology::up("gs", 1);
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();

    // ftvm run: SIGTERM, kvstore commits and powers off: status 0, well inside the grace period.
    let console = dir.join("run.txt");
    let vm = kvstore(&net, &["run"], &disk, &console);
    wait_for(&console, "kvstore: listening");
    net.wait_ping("kvstore");
    for i in 0..20 {
        assert_eq!(net.cli(&["SET", &format!("k{i}"), &format!("v{i}")]), "OK");
    }
    let start = Instant::now();
    signal(&vm, "-TERM");
    let (out, in_time) = finish_within(vm, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        in_time && start.elapsed() < Duration::from_secs(10),
        "{:?} after {:?}: {err}",
        out.status,
        start.elapsed()
    );
    assert_eq!(out.status.code(), Some(0), "a guest power-off: {err}");
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("kvstore: shutdown requested"), "{text}");

    // ftvm record: the same, and the replay delivers the request at the same exit.
    let console = dir.join("record.txt");
    let log = dir.join("kv.log");
    let vm = kvstore(&net, &["record", "--log", &log.display().to_string()], &disk, &console);
    wait_for(&console, "kvstore: listening");
    net.wait_ping("kvstore");
    for i in 0..20 {
        assert_eq!(net.cli(&["GET", &format!("k{i}")]), format!("v{i}"), "the writes before the stop are kept");
    }
    assert_eq!(net.cli(&["SET", "after", "1"]), "OK");
    signal(&vm, "-TERM");
    let (out, in_time) = finish_within(vm, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(in_time, "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
    drop(net);
    let out = ftvm().args(["log", "inspect", "--events"]).arg(&log).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SHUTDOWN_REQ"), "{text}");
    assert!(text.contains("guest power-off"), "{text}");
    let out_dir = dir.join("replay");
    let out = ftvm().arg("replay").arg(&log).arg("--output-dir").arg(&out_dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("replayed exactly"), "{err}");
    let recorded = std::fs::read_to_string(&console).unwrap();
    let replayed = std::fs::read_to_string(out_dir.join("console.txt")).unwrap();
    assert_eq!(replayed, recorded);
    assert!(replayed.contains("kvstore: shutdown requested"), "{replayed}");
}

#[test]
fn ftvm_ctl_shutdown_is_sigterm_s_request_and_the_second_stops_at_once() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("graceful-ctl");
    let sock = dir.join("vm.sock");
    let (vm, _) = idle_hello(&dir, &["--api-socket", &sock.display().to_string()]);
    let ctl = || {
        let out = ftvm().arg("ctl").arg(&sock).arg("shutdown").output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(ctl(), "shutting down");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ctl(), "stopping");
    let (out, in_time) = finish_within(vm, Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(in_time, "{err}");
    assert_eq!(out.status.code(), Some(143), "a stop after a shutdown request is SIGTERM's: {err}");
}

#[test]
fn sigterm_to_a_protected_primary_is_logged_and_its_backup_sees_the_guest_power_off() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("graceful-pair");
    let addr = format!("127.0.0.1:{}", 21000 + (std::process::id() % 20000) as u16);
    let side = |role: &str, console: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ftvm"));
        c.arg(role);
        c.args(if role == "backup" { ["--listen", &addr] } else { ["--backup", &addr] });
        c.args(["--timeout", "1200", "--insecure", "--arbiter"]).arg(dir.join("arbiter.lock"));
        c.arg("--kernel").arg(guest("hello")).args(["--cmdline", "hello.wait_ms=60000 hello.shutdown=1"]);
        c.arg("--console").arg(format!("file:{}", dir.join(console).display()));
        c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let backup = side("backup", "b.txt");
    std::thread::sleep(Duration::from_millis(300));
    let primary = side("primary", "p.txt");
    wait_for(&dir.join("p.txt"), "kit: ring 3 up");
    std::thread::sleep(Duration::from_millis(500));
    signal(&primary, "-TERM");
    let (p, p_in_time) = finish_within(primary, Duration::from_secs(20));
    let (b, b_in_time) = finish_within(backup, Duration::from_secs(20));
    let (perr, berr) = (String::from_utf8_lossy(&p.stderr), String::from_utf8_lossy(&b.stderr));
    assert!(p_in_time && b_in_time, "primary: {perr}\nbackup: {berr}");
    assert_eq!(p.status.code(), Some(0), "the primary's guest powered off: {perr}");
    assert_eq!(b.status.code(), Some(0), "the backup ends with it, cleanly: {berr}");
    assert!(!berr.to_lowercase().contains("takeover"), "not a failover: {berr}");
    let console = std::fs::read_to_string(dir.join("p.txt")).unwrap();
    assert!(console.contains("hello: shutdown requested; powering off"), "{console}");
    // The backup replayed the guest to its power-off and performed nothing itself.
    assert_eq!(std::fs::read_to_string(dir.join("b.txt")).unwrap_or_default(), "");
}
