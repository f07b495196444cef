//! The replication link over real sockets, through a relay in the middle that records every
//! byte and datagram (as a capture of the link would) and can alter, replay, drop or reorder
//! heartbeats: nothing sent crosses in the clear, tampering is refused, a wrong key is
//! refused, large frames come back whole.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ftvm_replication::link::{Connection, Listener, Mode};
use ftvm_replication::protocol::{Heartbeat, Role};
use ftvm_replication::secure::{Key, SecureError};

const MARKER: &[u8] = b"ftvm-secret-marker-4c7e1d";
/// A marker that fits a heartbeat's u64 fields.
const HB_MARKER: [u8; 8] = *b"HBsecret";

fn key(b: u8) -> Key {
    Key::from_bytes(&[b; 32]).unwrap()
}

fn free_addr() -> SocketAddr {
    // A port free for TCP and UDP alike (the link uses both on one address).
    loop {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = t.local_addr().unwrap();
        if UdpSocket::bind(a).is_ok() {
            return a;
        }
    }
}

/// What a heartbeat relay does with the primary's n-th datagram (from 0).
type Tamper = Box<dyn FnMut(usize, Vec<u8>) -> Vec<Vec<u8>> + Send>;

/// Everything that crossed the relay, in both directions.
#[derive(Default)]
struct Capture {
    tcp: Vec<u8>,
    udp: Vec<Vec<u8>>,
}

/// A relay on a fresh address in front of the backup at `back`: TCP both ways, UDP both ways
/// (the primary's datagrams through `tamper`), every byte recorded.
fn relay(back: SocketAddr, mut tamper: Tamper) -> (SocketAddr, Arc<Mutex<Capture>>) {
    let front = free_addr();
    let capture = Arc::new(Mutex::new(Capture::default()));
    let listener = TcpListener::bind(front).unwrap();
    let cap = capture.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(from_primary) = conn else { return };
            let Ok(to_backup) = TcpStream::connect(back) else { return };
            for (mut from, mut to) in
                [(from_primary.try_clone().unwrap(), to_backup.try_clone().unwrap()), (to_backup, from_primary)]
            {
                let cap = cap.clone();
                thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        cap.lock().unwrap().tcp.extend_from_slice(&buf[..n]);
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
    to_back.connect(back).unwrap();
    let primary_at = Arc::new(Mutex::new(None));
    let (u1, t1, p1, cap) =
        (udp.try_clone().unwrap(), to_back.try_clone().unwrap(), primary_at.clone(), capture.clone());
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut index = 0;
        while let Ok((n, from)) = u1.recv_from(&mut buf) {
            *p1.lock().unwrap() = Some(from);
            cap.lock().unwrap().udp.push(buf[..n].to_vec());
            for d in tamper(index, buf[..n].to_vec()) {
                let _ = t1.send(&d);
            }
            index += 1;
        }
    });
    let cap = capture.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok(n) = to_back.recv(&mut buf) {
            cap.lock().unwrap().udp.push(buf[..n].to_vec());
            if let Some(p) = *primary_at.lock().unwrap() {
                let _ = udp.send_to(&buf[..n], p);
            }
        }
    });
    (front, capture)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A backup listening on a fresh address with `key`, accepting one connection.
fn backup(key: &Key) -> (SocketAddr, thread::JoinHandle<Connection>) {
    let back = free_addr();
    let listener = Listener::bind(back, key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    (back, thread::spawn(move || listener.accept(&mut || Instant::now() > deadline).unwrap().expect("a primary")))
}

fn heartbeat(role: Role, seq: u64) -> Heartbeat {
    let m = u64::from_le_bytes(HB_MARKER);
    Heartbeat { role, flags: 0, seq, outputs_done: m, lsn: m, replayed: m }
}

/// Waits for the next heartbeat that passes authentication.
fn next_heartbeat(c: &Connection) -> Heartbeat {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(hb) = c.heartbeats.recv() {
            return hb;
        }
        assert!(Instant::now() < deadline, "no heartbeat came");
    }
}

#[test]
fn nothing_crosses_the_link_in_the_clear() {
    let k = key(7);
    let (back, accepted) = backup(&k);
    let (front, capture) = relay(back, Box::new(|_, d| vec![d]));
    let mut p = Connection::connect(front, &k, Duration::from_secs(10), Mode::Boot).unwrap();
    let mut b = accepted.join().unwrap();
    assert_eq!(b.mode, Mode::Boot);

    // The log's way: one flush, and one sealed frame as the primary's vCPU sends it; then a
    // frame of 5 MiB (a sync point, a state transfer's data), the marker all through it.
    let small = MARKER.repeat(100);
    p.writer.write_all(&small).unwrap();
    p.writer.flush().unwrap();
    let sealed = p.writer.seal(&small).unwrap();
    p.writer.stream().write_all(&sealed).unwrap();
    let big: Vec<u8> = MARKER.iter().copied().cycle().take(5 << 20).collect();
    p.writer.write_all(&big).unwrap();
    p.writer.flush().unwrap();
    let mut got = vec![0u8; small.len()];
    for _ in 0..2 {
        b.reader.read_exact(&mut got).unwrap();
        assert!(got == small);
    }
    let mut got = vec![0u8; big.len()];
    b.reader.read_exact(&mut got).unwrap();
    assert!(got == big, "the 5 MiB frame came back altered");
    // The other way (acknowledgements, refusals).
    b.writer.write_all(MARKER).unwrap();
    b.writer.flush().unwrap();
    let mut got = vec![0u8; MARKER.len()];
    p.reader.read_exact(&mut got).unwrap();
    assert_eq!(got, MARKER);

    // Heartbeats both ways (the backup answers once it has heard the primary).
    p.heartbeats.send(&heartbeat(Role::Primary, 1));
    assert_eq!(next_heartbeat(&b).outputs_done, u64::from_le_bytes(HB_MARKER));
    b.heartbeats.send(&heartbeat(Role::Backup, 1));
    assert_eq!(next_heartbeat(&p).lsn, u64::from_le_bytes(HB_MARKER));

    p.shutdown();
    thread::sleep(Duration::from_millis(100));
    let cap = capture.lock().unwrap();
    assert!(cap.tcp.len() > big.len(), "the capture holds the traffic ({} bytes)", cap.tcp.len());
    assert!(contains(&cap.tcp, b"FTVMAUTH"), "the handshake's magic is in the clear");
    assert!(!contains(&cap.tcp, MARKER), "the marker crossed the stream in the clear");
    // Nor any 8 bytes of it.
    assert!(!contains(&cap.tcp, &MARKER[..8]));
    assert!(cap.udp.len() >= 2, "{} datagrams", cap.udp.len());
    for d in &cap.udp {
        assert!(!contains(d, &HB_MARKER), "a heartbeat crossed in the clear");
        assert!(!contains(d, &0x4654_4842u32.to_le_bytes()), "a heartbeat's magic crossed in the clear");
    }
}

#[test]
fn altered_replayed_dropped_and_reordered_heartbeats_are_refused() {
    let k = key(8);
    let (back, accepted) = backup(&k);
    let held = Arc::new(Mutex::new(None));
    // The primary's datagrams: 0 passes, 1 altered, 2 twice, 3 dropped, 4 held back and sent
    // after 5, 6 passes.
    let tamper: Tamper = Box::new(move |i, mut d| match i {
        1 => {
            let last = d.len() - 1;
            d[last] ^= 1;
            vec![d]
        }
        2 => vec![d.clone(), d],
        3 => vec![],
        4 => {
            *held.lock().unwrap() = Some(d);
            vec![]
        }
        5 => vec![d, held.lock().unwrap().take().unwrap()],
        _ => vec![d],
    });
    let (front, _capture) = relay(back, tamper);
    let p = Connection::connect(front, &k, Duration::from_secs(10), Mode::Boot).unwrap();
    let b = accepted.join().unwrap();
    for seq in 0..7 {
        p.heartbeats.send(&heartbeat(Role::Primary, seq));
        // One at a time, so that the relay sees them in order.
        thread::sleep(Duration::from_millis(20));
    }
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while seen.len() < 4 && Instant::now() < deadline {
        if let Some(hb) = b.heartbeats.recv() {
            seen.push(hb.seq);
        }
    }
    // Give the refused ones time to be counted.
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        assert!(b.heartbeats.recv().is_none(), "a datagram too many passed");
    }
    assert_eq!(seen, [0, 2, 5, 6], "accepted heartbeats");
    // The altered one, the replayed copy and the late one (4, after 5).
    assert_eq!(b.heartbeats.rejected.load(std::sync::atomic::Ordering::Relaxed), 3);
}

#[test]
fn an_altered_stream_byte_is_refused_with_the_reason() {
    let k = key(9);
    let back = free_addr();
    let listener = Listener::bind(back, &k).unwrap();
    // A relay that flips one byte of the primary's stream after the handshake (and mode).
    let front = free_addr();
    let l = TcpListener::bind(front).unwrap();
    thread::spawn(move || {
        let (mut from_p, _) = l.accept().unwrap();
        let mut to_b = TcpStream::connect(back).unwrap();
        let (mut b2, mut p2) = (to_b.try_clone().unwrap(), from_p.try_clone().unwrap());
        thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut p2);
        });
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_p.read(&mut buf) {
            if n == 0 {
                break;
            }
            let before = all.len();
            all.extend_from_slice(&buf[..n]);
            let mut out = buf[..n].to_vec();
            const AT: usize = 2000;
            if before <= AT && AT < all.len() {
                out[AT - before] ^= 0x08;
            }
            if to_b.write_all(&out).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let accepted = thread::spawn(move || listener.accept(&mut || Instant::now() > deadline).unwrap().unwrap());
    let mut p = Connection::connect(front, &k, Duration::from_secs(10), Mode::Boot).unwrap();
    let mut b = accepted.join().unwrap();
    p.writer.write_all(&MARKER.repeat(400)).unwrap();
    p.writer.flush().unwrap();
    let mut got = vec![0u8; MARKER.len() * 400];
    let e = b.reader.read_exact(&mut got).unwrap_err();
    let why = SecureError::in_io_error(&e).expect("a channel error").to_string();
    assert!(why.starts_with("message 1 failed its integrity check"), "{why}");
}

#[test]
fn a_wrong_key_is_refused_and_the_backup_waits_for_the_right_one() {
    let (back, accepted) = backup(&key(1));
    let e = match Connection::connect(back, &key(2), Duration::from_secs(10), Mode::Boot) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a primary with another key paired"),
    };
    assert!(e.contains("the peer's key differs from ours (--key-file)"), "{e}");
    let e = match Connection::connect(back, &Key::unauthenticated(), Duration::from_secs(10), Mode::Boot) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a primary without a key paired"),
    };
    assert!(e.contains("the peer uses a key (--key-file) and we have none"), "{e}");
    let mut p = Connection::connect(back, &key(1), Duration::from_secs(10), Mode::Transfer).unwrap();
    let mut b = accepted.join().unwrap();
    assert_eq!(b.mode, Mode::Transfer);
    p.writer.write_all(b"paired").unwrap();
    p.writer.flush().unwrap();
    let mut got = [0u8; 6];
    b.reader.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"paired");
}
