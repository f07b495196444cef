//! A capture of the replication link of a real pair (issue 16 item 1): a marker in the guest's
//! command line (so in the log's header and in guest memory) and on its disk crosses the link
//! while the log flows and during a re-protection (a state transfer of memory and disks), and
//! appears nowhere in what a relay in the middle recorded. The same marker is in the clear in
//! a plain recording's log, so the capture would show it if the channel did not encrypt.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const MARKER: &str = "ftvm.capture.marker.5e0c3a91";
const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";

fn port(offset: u16) -> u16 {
    23000 + (std::process::id() % 20000) as u16 + offset
}

/// A relay on `front` for the backup at `back`: TCP (each connection) and UDP both ways,
/// every byte recorded.
fn recording_relay(front: &str, back: &str) -> Arc<Mutex<Vec<u8>>> {
    let capture = Arc::new(Mutex::new(Vec::new()));
    let listener = TcpListener::bind(front).unwrap();
    let back_addr: SocketAddr = back.parse().unwrap();
    let cap = capture.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(from_primary) = conn else { return };
            let Ok(to_backup) = TcpStream::connect(back_addr) else { return };
            let halves =
                [(from_primary.try_clone().unwrap(), to_backup.try_clone().unwrap()), (to_backup, from_primary)];
            for (mut from, mut to) in halves {
                let cap = cap.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        cap.lock().unwrap().extend_from_slice(&buf[..n]);
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    let udp = UdpSocket::bind(front).unwrap();
    let to_back = UdpSocket::bind("127.0.0.1:0").unwrap();
    to_back.connect(back_addr).unwrap();
    let primary_at = Arc::new(Mutex::new(None));
    let (u1, t1, p1, c1) =
        (udp.try_clone().unwrap(), to_back.try_clone().unwrap(), primary_at.clone(), capture.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = u1.recv_from(&mut buf) {
            *p1.lock().unwrap() = Some(from);
            c1.lock().unwrap().extend_from_slice(&buf[..n]);
            let _ = t1.send(&buf[..n]);
        }
    });
    let c2 = capture.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok(n) = to_back.recv(&mut buf) {
            c2.lock().unwrap().extend_from_slice(&buf[..n]);
            if let Some(p) = *primary_at.lock().unwrap() {
                let _ = udp.send_to(&buf[..n], p);
            }
        }
    });
    capture
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A 1 MiB disk image with the marker in several of its blocks.
fn marked_disk(path: &Path) {
    let mut image = vec![0u8; 1 << 20];
    for at in [0usize, 4096 * 3 + 100, 700_000] {
        image[at..at + MARKER.len()].copy_from_slice(MARKER.as_bytes());
    }
    std::fs::write(path, image).unwrap();
}

fn finish(child: &mut Child, limit: Duration) -> String {
    let start = Instant::now();
    while start.elapsed() < limit && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err
}

#[test]
fn a_capture_of_the_link_holds_no_guest_data_while_the_log_flows_and_during_a_re_protection() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("pair-capture");
    let key = dir.join("pair.key");
    std::fs::write(&key, KEY).unwrap();
    let cmdline = format!("hello.wait_ms=6000 {MARKER}");
    let arbiter = dir.join("arbiter.lock");
    let addr = |i: u16| format!("127.0.0.1:{}", port(i));
    let spawn = |role: &str, peer: &str, name: &str| {
        let disk = dir.join(format!("{name}.img"));
        marked_disk(&disk);
        let mut c = Command::new(env!("CARGO_BIN_EXE_ftvm"));
        c.arg(role);
        c.args(if role == "backup" { ["--listen", peer] } else { ["--backup", peer] });
        c.args(["--timeout", "1200"]).arg("--arbiter").arg(&arbiter).arg("--key-file").arg(&key);
        c.arg("--kernel").arg(guest("hello")).args(["--cmdline", &cmdline]);
        c.arg("--console").arg(format!("file:{}", dir.join(format!("{name}.txt")).display()));
        c.arg("--api-socket").arg(dir.join(format!("{name}.sock"))).arg("--disk").arg(&disk);
        c.stderr(Stdio::piped());
        c.spawn().unwrap()
    };

    // The control: a plain recording of this VM holds the marker in the clear.
    let control = dir.join("control.log");
    let control_disk = dir.join("control.img");
    marked_disk(&control_disk);
    let out = ftvm()
        .args(["record", "--log"])
        .arg(&control)
        .arg("--kernel")
        .arg(guest("hello"))
        .args(["--cmdline", &format!("hello.wait_ms=10 {MARKER}")])
        .arg("--console")
        .arg(format!("file:{}", dir.join("control.txt").display()))
        .arg("--disk")
        .arg(&control_disk)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(contains(&std::fs::read(&control).unwrap(), MARKER.as_bytes()), "the control log lacks the marker");

    // A pair through relay 1: the boot log (its header carries the command line) and the
    // log as it flows, acknowledgements and heartbeats.
    let first = recording_relay(&addr(1), &addr(2));
    let mut b1 = spawn("backup", &addr(2), "b1");
    std::thread::sleep(Duration::from_millis(300));
    let mut p = spawn("primary", &addr(1), "p");
    std::thread::sleep(Duration::from_millis(1500));
    let _ = b1.kill();
    let b1err = finish(&mut b1, Duration::from_secs(1));
    assert!(b1err.contains("paired with primary"), "{b1err}");
    std::thread::sleep(Duration::from_millis(300));

    // A re-protection through relay 2: memory (the command line is in it) and the disk.
    let second = recording_relay(&addr(3), &addr(4));
    let mut b2 = spawn("backup", &addr(4), "b2");
    std::thread::sleep(Duration::from_millis(300));
    let sock = dir.join("p.sock");
    ftvm_api::client::start_protect(&sock, addr(3).parse().unwrap()).unwrap();
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
    std::thread::sleep(Duration::from_millis(300));
    let perr = finish(&mut p, Duration::ZERO);
    let b2err = finish(&mut b2, Duration::from_secs(10));
    assert!(perr.contains("PROTECTED by"), "{perr}");
    assert!(!perr.contains("not authenticated"), "{perr}");
    assert!(b2err.contains("TAKEOVER"), "{b2err}");

    for (what, capture, at_least) in [("the boot link", &first, 1000), ("the re-protection", &second, 100_000)] {
        let bytes = capture.lock().unwrap();
        eprintln!("{what}: {} bytes captured", bytes.len());
        assert!(bytes.len() >= at_least, "{what}: only {} bytes captured", bytes.len());
        assert!(contains(&bytes, b"FTVMAUTH"), "{what}: the capture holds the handshake");
        assert!(!contains(&bytes, MARKER.as_bytes()), "{what}: the marker crossed in the clear");
        assert!(!contains(&bytes, b"hello.wait_ms"), "{what}: the command line crossed in the clear");
    }
}
