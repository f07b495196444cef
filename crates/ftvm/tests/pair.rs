//! The fault-tolerant pair on one machine (loopback): a normal end, a failover after SIGKILL
//! of the primary with no lost and no duplicated console output, a lost backup, and a pair
//! that refuses to form.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn port(offset: u16) -> u16 {
    20000 + (std::process::id() % 20000) as u16 + offset
}

/// One side's command on loopback: the hello guest, its console to a file; callers add
/// options before spawning it.
fn side_cmd(
    role: &str,
    addr: &str,
    arbiter: impl AsRef<std::ffi::OsStr>,
    console: &Path,
    cmdline: &str,
    timeout_ms: u32,
) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ftvm"));
    c.arg(role);
    c.args(if role == "backup" { ["--listen", addr] } else { ["--backup", addr] });
    c.args(["--timeout", &timeout_ms.to_string()]).arg("--arbiter").arg(arbiter);
    c.arg("--kernel").arg(guest("hello")).args(["--cmdline", cmdline]);
    c.arg("--console").arg(format!("file:{}", console.display()));
    c.stderr(Stdio::piped());
    c
}

/// A side without a key (`--insecure`): most tests here are not about the key.
fn side(role: &str, addr: &str, arbiter: &Path, console: &Path, cmdline: &str) -> Child {
    side_cmd(role, addr, arbiter, console, cmdline, 1200).arg("--insecure").spawn().unwrap()
}

fn wait(child: &mut Child, limit: Duration) -> (Option<i32>, String) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output_ref()
}

trait WaitRef {
    fn wait_with_output_ref(&mut self) -> (Option<i32>, String);
}

impl WaitRef for Child {
    fn wait_with_output_ref(&mut self) -> (Option<i32>, String) {
        use std::io::Read;
        let status = self.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status.code(), err)
    }
}

/// What hello prints apart from what differs from run to run: the wall-clock lines, and how
/// long a spin took: the number of turns (host speed) and of ticks, which can end one past
/// the target when two timer interrupts land in one turn of the spin (a late timer catching
/// up on a loaded host). The digest after it covers what the guest computed.
fn stable(console: &str) -> Vec<String> {
    console
        .lines()
        .filter(|l| !l.starts_with("rtc:"))
        .map(|l| match l.strip_prefix("spin:") {
            Some(_) => "spin: (ticks and turns vary)".to_string(),
            None => l.to_string(),
        })
        .collect()
}

#[test]
fn a_pair_that_ends_normally_ends_both_sides() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("pair-end");
    let addr = format!("127.0.0.1:{}", port(0));
    let arbiter = dir.join("arbiter.lock");
    let mut b = side("backup", &addr, &arbiter, &dir.join("b.txt"), "hello.wait_ms=300");
    std::thread::sleep(Duration::from_millis(300));
    let mut p = side("primary", &addr, &arbiter, &dir.join("p.txt"), "hello.wait_ms=300");
    let (pc, perr) = wait(&mut p, Duration::from_secs(30));
    let (bc, berr) = wait(&mut b, Duration::from_secs(10));
    assert_eq!(pc, Some(0), "primary: {perr}");
    assert_eq!(bc, Some(0), "backup: {berr}");
    let p_out = std::fs::read_to_string(dir.join("p.txt")).unwrap();
    assert!(p_out.contains("digest: "), "{p_out}");
    // The backup performed nothing: every output was the primary's to perform.
    assert_eq!(std::fs::read_to_string(dir.join("b.txt")).unwrap_or_default(), "");
}

/// A pair of `hello` with `cmdline`; SIGKILL of the primary `kill_after` in. The backup
/// must take over and finish, and the primary's console followed by the backup's must be what
/// one uninterrupted run prints. Returns the backup's console.
fn fail_over_and_compare(name: &str, port_offset: u16, cmdline: &str, kill_after: Duration) -> String {
    let dir = scratch(name);
    let addr = format!("127.0.0.1:{}", port(port_offset));
    let arbiter = dir.join("arbiter.lock");
    let mut b = side("backup", &addr, &arbiter, &dir.join("b.txt"), cmdline);
    std::thread::sleep(Duration::from_millis(300));
    let mut p = side("primary", &addr, &arbiter, &dir.join("p.txt"), cmdline);
    std::thread::sleep(kill_after);
    p.kill().unwrap(); // SIGKILL
    let _ = p.wait();
    let (bc, berr) = wait(&mut b, Duration::from_secs(20));
    assert_eq!(bc, Some(0), "the backup must take over and finish: {berr}");
    assert!(berr.contains("TAKEOVER"), "{berr}");
    let p_out = std::fs::read_to_string(dir.join("p.txt")).unwrap();
    let b_out = std::fs::read_to_string(dir.join("b.txt")).unwrap();
    assert!(!b_out.is_empty(), "the backup went live and printed the rest");
    // Together they printed exactly what one uninterrupted run prints.
    let (out, alone) = run_guest(&guest("hello"), &["--cmdline", cmdline], &dir);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stable(&format!("{p_out}{b_out}")), stable(&alone), "primary:\n{p_out}\nbackup:\n{b_out}");
    b_out
}

#[test]
fn sigkill_of_the_primary_fails_over_with_no_lost_or_repeated_output() {
    if !kvm_available() {
        return;
    }
    fail_over_and_compare("pair-failover", 1, "hello.wait_ms=3000", Duration::from_millis(1200));
}

#[test]
fn sigkill_of_the_primary_in_an_exit_free_stretch_fails_over_through_its_sync_points() {
    if !kvm_available() {
        return;
    }
    // The guest spins in ring 3 for 3 s: its ticks reach both sides only through sync points.
    let cmdline = "hello.wait_ms=100 hello.spin_ms=3000";
    let b_out = fail_over_and_compare("pair-sync", 30, cmdline, Duration::from_millis(1500));
    assert!(b_out.contains("spin: 300 ticks"), "the backup finished the spin: {b_out}");
}

#[test]
fn a_lost_backup_leaves_the_primary_running_unprotected() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("pair-lost-backup");
    let addr = format!("127.0.0.1:{}", port(2));
    let arbiter = dir.join("arbiter.lock");
    let cmdline = "hello.wait_ms=2000";
    let mut b = side("backup", &addr, &arbiter, &dir.join("b.txt"), cmdline);
    std::thread::sleep(Duration::from_millis(300));
    let mut p = side("primary", &addr, &arbiter, &dir.join("p.txt"), cmdline);
    std::thread::sleep(Duration::from_millis(800));
    b.kill().unwrap();
    let _ = b.wait();
    let (pc, perr) = wait(&mut p, Duration::from_secs(20));
    assert_eq!(pc, Some(0), "{perr}");
    assert!(perr.contains("UNPROTECTED"), "{perr}");
    let p_out = std::fs::read_to_string(dir.join("p.txt")).unwrap();
    assert!(p_out.contains("digest: "), "{p_out}");
}

#[test]
fn a_pair_of_different_vms_does_not_form_and_the_backup_waits_for_the_right_primary() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("pair-mismatch");
    let addr = format!("127.0.0.1:{}", port(3));
    let arbiter = dir.join("arbiter.lock");
    let mut b = side("backup", &addr, &arbiter, &dir.join("b.txt"), "hello.wait_ms=100");
    std::thread::sleep(Duration::from_millis(300));
    let mut p = side("primary", &addr, &arbiter, &dir.join("p.txt"), "hello.wait_ms=999");
    let (pc, perr) = wait(&mut p, Duration::from_secs(20));
    assert_eq!(pc, Some(1), "{perr}");
    assert!(perr.contains("refused"), "{perr}");
    assert!(b.try_wait().unwrap().is_none(), "a primary of another VM ended the backup");
    // The right primary pairs with the backup that waited on.
    let mut p = side("primary", &addr, &arbiter, &dir.join("p2.txt"), "hello.wait_ms=100");
    let (pc, perr) = wait(&mut p, Duration::from_secs(30));
    let (bc, berr) = wait(&mut b, Duration::from_secs(10));
    assert_eq!(pc, Some(0), "{perr}");
    assert_eq!(bc, Some(0), "{berr}");
    assert!(berr.contains("cmdline") && berr.contains("waiting on"), "the backup said what differed: {berr}");
}

/// Forces the primary to abort in crash window `window` (docs/replication.md) at its 100th output,
/// then checks what the two consoles together show against an uninterrupted run.
fn crash_window(window: u8) {
    if !kvm_available() {
        return;
    }
    let dir = scratch(&format!("pair-window{window}"));
    let addr = format!("127.0.0.1:{}", port(10 + u16::from(window)));
    let arbiter = dir.join("arbiter.lock");
    let cmdline = "hello.wait_ms=1000";
    let mut b = side("backup", &addr, &arbiter, &dir.join("b.txt"), cmdline);
    std::thread::sleep(Duration::from_millis(300));
    let mut p = Command::new(env!("CARGO_BIN_EXE_ftvm"));
    p.env("FTVM_TEST_CRASH", format!("{window}:100"));
    p.args(["primary", "--backup", &addr, "--insecure"]).args(["--timeout", "1200"]).arg("--arbiter").arg(&arbiter);
    p.arg("--kernel").arg(guest("hello")).args(["--cmdline", cmdline]);
    p.arg("--console").arg(format!("file:{}", dir.join("p.txt").display()));
    let mut p = p.stderr(Stdio::piped()).spawn().unwrap();
    let (pc, perr) = wait(&mut p, Duration::from_secs(30));
    assert_ne!(pc, Some(0), "the primary must have crashed: {perr}");
    assert!(perr.contains(&format!("crash window {window}")), "{perr}");
    let (bc, berr) = wait(&mut b, Duration::from_secs(30));
    assert_eq!(bc, Some(0), "{berr}");
    assert!(berr.contains("TAKEOVER"), "{berr}");
    let p_out = std::fs::read(dir.join("p.txt")).unwrap();
    let b_out = std::fs::read(dir.join("b.txt")).unwrap();
    let (out, alone) = run_guest(&guest("hello"), &["--cmdline", cmdline], &dir);
    assert_eq!(out.status.code(), Some(0));
    let mut expected = alone.clone().into_bytes();
    if window == 3 {
        // Performed, then the primary died before OUTPUT_DONE: the backup performs it again.
        expected.insert(100, expected[100]);
    }
    let together = String::from_utf8_lossy(&[p_out.clone(), b_out.clone()].concat()).into_owned();
    let expected = String::from_utf8_lossy(&expected).into_owned();
    assert_eq!(
        stable(&together),
        stable(&expected),
        "window {window}\nprimary:\n{}\nbackup:\n{}",
        String::from_utf8_lossy(&p_out),
        String::from_utf8_lossy(&b_out)
    );
}

#[test]
fn crash_window_1_before_the_log_reached_the_backup_loses_nothing() {
    crash_window(1);
}

#[test]
fn crash_window_2_after_the_ack_before_the_output_the_backup_performs_it_once() {
    crash_window(2);
}

#[test]
fn crash_window_3_after_the_output_before_output_done_duplicates_it() {
    crash_window(3);
}

#[test]
fn crash_window_4_after_output_done_the_backup_skips_it() {
    crash_window(4);
}

#[test]
fn a_peer_speaking_another_protocol_is_refused_and_the_backup_waits_on() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("pair-garbage");
    let addr = format!("127.0.0.1:{}", port(20));
    let arbiter = dir.join("arbiter.lock");
    let mut b = side("backup", &addr, &arbiter, &dir.join("b.txt"), "hello.wait_ms=100");
    std::thread::sleep(Duration::from_millis(300));
    {
        use std::io::{Read, Write};
        // The backup may not listen yet (a debug build starting beside this file's other
        // tests on 2 cores): try for a while, as a primary does.
        let start = Instant::now();
        let mut s = loop {
            match std::net::TcpStream::connect(&addr) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("the backup does not listen on {addr}: {e}"),
            }
        };
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read(&mut [0u8; 64]);
    }
    // The backup refused it and still waits: a real primary pairs with it afterwards.
    let mut p = side("primary", &addr, &arbiter, &dir.join("p.txt"), "hello.wait_ms=100");
    let (pc, perr) = wait(&mut p, Duration::from_secs(30));
    let (bc, berr) = wait(&mut b, Duration::from_secs(10));
    assert_eq!((pc, bc), (Some(0), Some(0)), "primary:\n{perr}\nbackup:\n{berr}");
    assert!(berr.contains("not an ftvm replication peer"), "{berr}");
}

#[test]
fn a_peer_with_the_wrong_key_is_rejected() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("pair-wrong-key");
    let addr = format!("127.0.0.1:{}", port(22));
    let (ka, kb) = (dir.join("a.key"), dir.join("b.key"));
    std::fs::write(&ka, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").unwrap();
    std::fs::write(&kb, "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n").unwrap();
    let arbiter = dir.join("arbiter.lock");
    let kbs = kb.display().to_string();
    let mut b = side_keyed("backup", &addr, &arbiter, &dir.join("b.txt"), &kbs);
    std::thread::sleep(Duration::from_millis(300));
    let mut p = side_keyed("primary", &addr, &arbiter, &dir.join("p.txt"), &ka.display().to_string());
    let (pc, perr) = wait(&mut p, Duration::from_secs(20));
    assert_eq!(pc, Some(1), "{perr}");
    assert!(perr.contains("key"), "the primary says why: {perr}");
    // The backup reported the rejected peer and waits on; the right key pairs.
    let mut p = side_keyed("primary", &addr, &arbiter, &dir.join("p.txt"), &kbs);
    let (pc, perr) = wait(&mut p, Duration::from_secs(30));
    let (bc, berr) = wait(&mut b, Duration::from_secs(10));
    assert_eq!((pc, bc), (Some(0), Some(0)), "primary:\n{perr}\nbackup:\n{berr}");
    assert!(berr.contains("refused a connection") && berr.contains("key"), "{berr}");
    assert!(!perr.contains("not authenticated"), "{perr}");
}

fn side_keyed(role: &str, addr: &str, arbiter: &Path, console: &Path, key: &str) -> Child {
    side_cmd(role, addr, arbiter, console, "hello.wait_ms=100", 1200).args(["--key-file", key]).spawn().unwrap()
}

#[test]
fn ctl_switchover_hands_over_with_no_lost_or_repeated_output() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("pair-switchover");
    let addr = format!("127.0.0.1:{}", port(21));
    let arbiter = dir.join("arbiter.lock");
    let sock = dir.join("primary.sock");
    let cmdline = "hello.wait_ms=2000";
    let mut b = side("backup", &addr, &arbiter, &dir.join("b.txt"), cmdline);
    std::thread::sleep(Duration::from_millis(300));
    let mut p = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(["primary", "--backup", &addr, "--insecure"])
        .arg("--api-socket")
        .arg(&sock)
        .args(["--timeout", "1200"])
        .arg("--arbiter")
        .arg(&arbiter)
        .arg("--kernel")
        .arg(guest("hello"))
        .args(["--cmdline", cmdline])
        .arg("--console")
        .arg(format!("file:{}", dir.join("p.txt").display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let out = Command::new(env!("CARGO_BIN_EXE_ftvm")).arg("ctl").arg(&sock).arg("switchover").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (pc, perr) = wait(&mut p, Duration::from_secs(20));
    // Its own status (not a power-off's 0): a supervisor must not restart it as a primary.
    assert_eq!(pc, Some(ftvm_exit::ExitStatus::Switchover.code().into()), "{perr}");
    let (bc, berr) = wait(&mut b, Duration::from_secs(20));
    assert_eq!(bc, Some(0), "{berr}");
    assert!(berr.contains("hands over") && berr.contains("TAKEOVER"), "{berr}");
    let together =
        std::fs::read_to_string(dir.join("p.txt")).unwrap() + &std::fs::read_to_string(dir.join("b.txt")).unwrap();
    let (_, alone) = run_guest(&guest("hello"), &["--cmdline", cmdline], &dir);
    assert_eq!(stable(&together), stable(&alone));
}

#[test]
fn an_unreachable_arbiter_is_a_clear_error() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("pair-arbiter");
    let lock = dir.join("no-such-dir").join("arbiter.lock");
    let mut p = side("primary", &format!("127.0.0.1:{}", port(22)), &lock, &dir.join("p.txt"), "hello.wait_ms=0");
    let (code, err) = wait(&mut p, Duration::from_secs(10));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("arbiter") && err.contains("no-such-dir"), "{err}");
    // An etcd that does not answer, and a malformed etcd URL.
    let mut p = side(
        "primary",
        &format!("127.0.0.1:{}", port(22)),
        Path::new("etcd://127.0.0.1:1/ftvm/x"),
        &dir.join("p.txt"),
        "hello.wait_ms=0",
    );
    let (code, err) = wait(&mut p, Duration::from_secs(10));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("etcd") && err.contains("unreachable"), "{err}");
    let mut p = side(
        "primary",
        &format!("127.0.0.1:{}", port(22)),
        Path::new("etcd://127.0.0.1/ftvm/x"),
        &dir.join("p.txt"),
        "hello.wait_ms=0",
    );
    let (code, err) = wait(&mut p, Duration::from_secs(10));
    assert_eq!(code, Some(2), "a usage error: {err}");
    assert!(err.contains("port"), "{err}");
}

#[test]
fn with_the_etcd_arbiter_a_primary_stopped_past_its_lease_emits_nothing_after_the_backup_went_live_and_halts() {
    if !kvm_available() {
        return;
    }
    let Some(etcd) = ftvm_replication::test_etcd::test_etcd_or_skip() else { return };
    let dir = scratch("pair-etcd");
    let addr = format!("127.0.0.1:{}", port(24));
    let url = etcd.url("ftvm/sigstop");
    let spawn = |role: &str| {
        let console = dir.join(format!("{role}.txt"));
        side_cmd(role, &addr, &url, &console, "hello.wait_ms=3000", 300).arg("--insecure").spawn().unwrap()
    };
    let mut b = spawn("backup");
    std::thread::sleep(Duration::from_millis(300));
    let mut p = spawn("primary");
    std::thread::sleep(Duration::from_millis(1000));
    let pid = p.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    // The backup waits for the stopped primary's lease to expire, goes live and finishes.
    let (bcode, berr) = wait(&mut b, Duration::from_secs(20));
    assert_eq!(bcode, Some(0), "{berr}");
    assert!(berr.contains("TAKEOVER"), "{berr}");
    let live = std::fs::read_to_string(dir.join("backup.txt")).unwrap();
    assert!(live.contains("digest:"), "the backup finished the guest: {live}");
    let before = std::fs::read(dir.join("primary.txt")).unwrap();
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let (pcode, perr) = wait(&mut p, Duration::from_secs(10));
    assert_eq!(pcode, Some(ftvm_replication::HALT_EXIT_CODE), "{perr}");
    assert!(perr.contains("HALT") && perr.contains("arbiter"), "{perr}");
    let after = std::fs::read(dir.join("primary.txt")).unwrap();
    assert_eq!(before, after, "the old primary emitted nothing after it was resumed");
}

#[test]
fn protect_refuses_what_it_cannot_do_and_says_why() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("pair-protect-errors");
    let arbiter = dir.join("arbiter.lock");
    let addr = |i: u16| format!("127.0.0.1:{}", port(30 + i));
    let disk = |name: &str, size: u64| {
        let path = dir.join(name);
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        path
    };
    let spawn = |role: &str, peer: &str, name: &str, disk: &Path| {
        let console = dir.join(format!("{name}.txt"));
        let mut c = side_cmd(role, peer, &arbiter, &console, "hello.wait_ms=8000", 1200);
        c.arg("--insecure").arg("--api-socket").arg(dir.join(format!("{name}.sock"))).arg("--disk").arg(disk);
        c.spawn().unwrap()
    };
    let ctl = |name: &str, args: &[&str]| {
        let out = ftvm().arg("ctl").arg(dir.join(format!("{name}.sock"))).args(args).output().unwrap();
        (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let mut b1 = spawn("backup", &addr(1), "b1", &disk("b1.img", 1 << 20));
    std::thread::sleep(Duration::from_millis(300));
    let mut p = spawn("primary", &addr(1), "p", &disk("p.img", 1 << 20));
    std::thread::sleep(Duration::from_millis(800));
    // A backup that has not gone live takes no backup; a protected primary no second one.
    let (code, out) = ctl("b1", &["protect", &addr(2)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("has not gone live"), "{out}");
    let (code, out) = ctl("p", &["protect", &addr(2)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("has a backup already"), "{out}");
    let _ = b1.kill();
    let _ = b1.wait();
    std::thread::sleep(Duration::from_millis(300));
    // A new backup whose disk has another size is refused, both sides say why, and the backup
    // waits on for a primary whose VM fits.
    let mut b2 = spawn("backup", &addr(2), "b2", &disk("b2.img", 2 << 20));
    std::thread::sleep(Duration::from_millis(300));
    let (code, out) = ctl("p", &["protect", &addr(2)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("disk 0") && out.contains("refused"), "{out}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(b2.try_wait().unwrap().is_none(), "the refused transfer ended the backup");
    let (_, b2err) = wait(&mut b2, Duration::ZERO);
    assert!(b2err.contains("disk 0") && b2err.contains("waiting on"), "{b2err}");
    // Two requests at once: the second is refused while the first runs; the first protects.
    let mut b3 = spawn("backup", &addr(3), "b3", &disk("b3.img", 1 << 20));
    std::thread::sleep(Duration::from_millis(300));
    let sock = dir.join("p.sock");
    let target: std::net::SocketAddr = addr(3).parse().unwrap();
    ftvm_api::client::start_protect(&sock, target).unwrap();
    let second = ftvm_api::client::start_protect(&sock, target).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(second.contains("under way"), "{second}");
    let start = Instant::now();
    loop {
        let progress = ftvm_api::client::protect_progress(&sock).unwrap();
        if progress.phase == ftvm_api::ProtectPhase::Protected {
            break;
        }
        assert!(progress.phase != ftvm_api::ProtectPhase::Failed, "{progress}");
        assert!(start.elapsed() < Duration::from_secs(20), "{progress}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = p.kill();
    let (_, perr) = wait(&mut p, Duration::from_secs(1));
    let (_, b3err) = wait(&mut b3, Duration::from_secs(5));
    assert!(perr.contains("PROTECTED by"), "{perr}");
    assert!(b3err.contains("TAKEOVER"), "{b3err}");
}

/// A man in the middle on `front` for the backup at `back`: relays TCP (each connection) and
/// UDP both ways, and flips one byte of the first connection's primary-to-backup stream
/// once `alter_after` bytes have passed.
fn tampering_relay(front: &str, back: &str, alter_after: usize) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(front).unwrap();
    let back_addr: std::net::SocketAddr = back.parse().unwrap();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut from_primary) = conn else { return };
            let Ok(mut to_backup) = std::net::TcpStream::connect(back_addr) else { return };
            let (mut a, mut b) = (from_primary.try_clone().unwrap(), to_backup.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut b, &mut a);
            });
            std::thread::spawn(move || {
                let mut passed = 0usize;
                let mut buf = [0u8; 8192];
                while let Ok(k) = from_primary.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    if n == 0 && passed < alter_after && passed + k >= alter_after {
                        buf[alter_after - passed - 1] ^= 0x40;
                    }
                    passed += k;
                    if to_backup.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let udp = std::net::UdpSocket::bind(front).unwrap();
    let to_back = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    to_back.connect(back_addr).unwrap();
    let primary_at = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (u1, t1, p1) = (udp.try_clone().unwrap(), to_back.try_clone().unwrap(), primary_at.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((k, from)) = u1.recv_from(&mut buf) {
            *p1.lock().unwrap() = Some(from);
            let _ = t1.send(&buf[..k]);
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok(k) = to_back.recv(&mut buf) {
            if let Some(p) = *primary_at.lock().unwrap() {
                let _ = udp.send_to(&buf[..k], p);
            }
        }
    });
}

#[test]
fn an_altered_frame_is_rejected_reported_and_the_backup_resynced() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("pair-mitm");
    let key = dir.join("pair.key");
    std::fs::write(&key, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").unwrap();
    let (front, back) = (format!("127.0.0.1:{}", port(40)), format!("127.0.0.1:{}", port(41)));
    tampering_relay(&front, &back, 40_000);
    let arbiter = dir.join("arbiter.lock");
    let spawn = |role: &str, addr: &str| {
        let console = dir.join(format!("{role}.txt"));
        // 6 s: the resync comes once the relay has passed 40,000 bytes, and with all of this
        // file's tests at once on 2 cores a 3 s guest sometimes ended just after it, before
        // the new backup had caught up (2 runs in 4 failed so; none of 4 with 6 s).
        side_cmd(role, addr, &arbiter, &console, "hello.wait_ms=6000", 1200)
            .arg("--key-file")
            .arg(&key)
            .spawn()
            .unwrap()
    };
    let mut b = spawn("backup", &back);
    std::thread::sleep(Duration::from_millis(300));
    let mut p = spawn("primary", &front);
    let (pcode, perr) = wait(&mut p, Duration::from_secs(30));
    let (bcode, berr) = wait(&mut b, Duration::from_secs(10));
    let both = format!("primary:\n{perr}\nbackup:\n{berr}");
    assert!(berr.contains("REJECTED a replication frame"), "{both}");
    assert!(perr.contains("asks for a resync") && perr.contains("PROTECTED by"), "{both}");
    // The resynced pair ends as one: the guest's whole output, once, on the primary.
    assert_eq!((pcode, bcode), (Some(0), Some(0)), "primary:\n{perr}\nbackup:\n{berr}");
    let console = std::fs::read_to_string(dir.join("primary.txt")).unwrap();
    assert!(console.contains("digest:"), "{console}");
}
