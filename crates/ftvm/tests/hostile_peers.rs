//! Hostile peers of a backup (issue 18, item 7): connections that stall in the handshake,
//! peers that complete it (no key: anyone can) and then close, stall, or send a bad
//! transfer header, a bad log header or a huge frame length. A backup refuses each, says so,
//! and pairs with the real primary afterwards; it never exits because of them.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ftvm_replication::protocol::{MODE_BOOT, MODE_TRANSFER};
use ftvm_replication::secure::{handshake, Key};

fn port(offset: u16) -> u16 {
    27000 + (std::process::id() % 3000) as u16 * 8 + offset
}

fn side(role: &str, addr: &str, dir: &Path) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ftvm"));
    c.arg(role);
    c.args(if role == "backup" { ["--listen", addr] } else { ["--backup", addr] });
    c.args(["--timeout", "1200", "--insecure"]).arg("--arbiter").arg(dir.join("arbiter.lock"));
    c.arg("--kernel").arg(guest("hello")).args(["--cmdline", "hello.wait_ms=200"]);
    c.arg("--console").arg(format!("file:{}", dir.join(format!("{role}.txt")).display()));
    c.stderr(Stdio::piped()).stdout(Stdio::null());
    c.spawn().unwrap()
}

/// Waits until something listens on `addr` (the backup is up).
fn wait_listening(addr: SocketAddr, backup: &mut Child) {
    let start = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(backup.try_wait().unwrap().is_none(), "the backup ended before it listened");
        assert!(start.elapsed() < Duration::from_secs(20), "the backup does not listen on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // That probe was a hostile peer too (it closed before the handshake).
}

/// Completes the handshake as a primary would (without a key anyone can), then sends `mode`
/// and `bytes` on the encrypted stream; returns the connection (to keep it open or drop it).
fn authenticated_peer(addr: SocketAddr, mode: u8, bytes: &[u8]) -> (TcpStream, ftvm_replication::secure::SecureWriter) {
    let stream = TcpStream::connect(addr).expect("the backup no longer listens (it exited?)");
    let (mut w, _r, _keys) =
        handshake(stream.try_clone().unwrap(), &Key::unauthenticated(), true, Duration::from_secs(5))
            .expect("the backup does not complete a handshake (it exited?)");
    w.write_all(&[mode]).unwrap();
    w.write_all(bytes).unwrap();
    w.flush().unwrap();
    (stream, w)
}

/// A backup, `hostile` done to it, then the real primary: the pair must form and end
/// normally (both sides 0) within a bound, and the backup must have said it refused
/// `refused` peers.
fn backup_survives(name: &str, offset: u16, hostile: impl FnOnce(SocketAddr) -> Vec<Box<dyn std::any::Any>>) {
    if !kvm_available() {
        return;
    }
    let dir = scratch(name);
    let addr: SocketAddr = format!("127.0.0.1:{}", port(offset)).parse().unwrap();
    let mut b = side("backup", &addr.to_string(), &dir);
    wait_listening(addr, &mut b);
    let held = hostile(addr);
    std::thread::sleep(Duration::from_millis(300));
    assert!(b.try_wait().unwrap().is_none(), "the backup exited because of a hostile peer: {}", stderr_of(b));
    let started = Instant::now();
    let p = side("primary", &addr.to_string(), &dir);
    let (p_out, p_in_time) = finish_within(p, Duration::from_secs(40));
    let (b_out, b_in_time) = finish_within(b, Duration::from_secs(20));
    drop(held);
    let (perr, berr) = (String::from_utf8_lossy(&p_out.stderr), String::from_utf8_lossy(&b_out.stderr));
    assert!(p_in_time && b_in_time, "a side hung:\nprimary: {perr}\nbackup: {berr}");
    assert_eq!(p_out.status.code(), Some(0), "the primary must pair and end normally: {perr}\nbackup: {berr}");
    assert_eq!(b_out.status.code(), Some(0), "backup: {berr}");
    assert!(berr.contains("paired with primary"), "{berr}");
    assert!(berr.contains("refused"), "the backup says it refused the bad peer: {berr}");
    eprintln!("{name}: the real primary paired and ended after {:?}\n{berr}", started.elapsed());
}

fn stderr_of(mut c: Child) -> String {
    use std::io::Read;
    let _ = c.kill();
    let _ = c.wait();
    let mut s = String::new();
    if let Some(mut e) = c.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

#[test]
fn three_connections_stalled_in_the_handshake_do_not_keep_the_primary_from_pairing() {
    backup_survives("hostile-stalled-handshakes", 0, |addr| {
        (0..3).map(|_| Box::new(TcpStream::connect(addr).unwrap()) as Box<dyn std::any::Any>).collect()
    });
}

#[test]
fn a_peer_that_authenticates_and_stalls_does_not_block_pairing() {
    backup_survives("hostile-stall-after-handshake", 1, |addr| {
        let (s, w) = authenticated_peer(addr, MODE_BOOT, &[]);
        vec![Box::new(s), Box::new(w)]
    });
}

#[test]
fn a_peer_that_authenticates_and_closes_is_refused_and_the_backup_waits_on() {
    backup_survives("hostile-close-after-handshake", 2, |addr| {
        drop(authenticated_peer(addr, MODE_BOOT, &[]));
        vec![]
    });
}

#[test]
fn a_bad_transfer_header_is_refused_and_the_backup_waits_on() {
    backup_survives("hostile-bad-transfer-header", 3, |addr| {
        // A length-prefixed "header" that is not JSON, then a close.
        let mut bytes = 9u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"not json!");
        drop(authenticated_peer(addr, MODE_TRANSFER, &bytes));
        // And one that announces 4 GiB.
        drop(authenticated_peer(addr, MODE_TRANSFER, &u32::MAX.to_le_bytes()));
        vec![]
    });
}

#[test]
fn a_bad_log_header_is_refused_and_the_backup_waits_on() {
    backup_survives("hostile-bad-log-header", 4, |addr| {
        drop(authenticated_peer(addr, MODE_BOOT, b"GET / HTTP/1.1\r\n\r\n"));
        // The right preamble, then a header frame whose length word is garbage.
        let mut bytes = ftvm_log::MAGIC.to_vec();
        bytes.extend_from_slice(&ftvm_log::FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&[0xff; 16]);
        drop(authenticated_peer(addr, MODE_BOOT, &bytes));
        vec![]
    });
}

#[test]
fn a_huge_frame_length_is_refused_and_the_backup_waits_on() {
    backup_survives("hostile-huge-frame", 5, |addr| {
        // The preamble, then a header frame that says it is very long and never comes.
        let mut bytes = ftvm_log::MAGIC.to_vec();
        bytes.extend_from_slice(&ftvm_log::FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&length_word(ftvm_log::MAX_BODY).to_le_bytes());
        bytes.extend_from_slice(&[0u8; 4]);
        drop(authenticated_peer(addr, MODE_BOOT, &bytes));
        let (s, w) = authenticated_peer(addr, MODE_BOOT, &bytes);
        vec![Box::new(s), Box::new(w)]
    });
}

/// A log frame's length word (ftvm-log's codec): the body length and its CRC-6.
fn length_word(len: u32) -> u32 {
    let mut r = len << 6;
    for bit in (6..32).rev() {
        if r & (1 << bit) != 0 {
            r ^= 0x43 << (bit - 6);
        }
    }
    len | (r & 0x3f) << 26
}
