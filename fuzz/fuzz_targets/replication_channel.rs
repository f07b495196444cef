//! The replication channel's reader must never panic and never allocate on a peer's word,
//! whatever arrives after a completed handshake (crates/ftvm-replication/src/secure.rs
//! `SecureReader` and its chunk framing; link.rs `read_blob` and `read_answer` above it).
//!
//! Each input runs a real handshake on loopback TCP under a fixed key (the realistic attacker
//! is a peer that holds the key, or bytes injected into an authenticated connection), then the
//! sending side writes what the input says and closes. The input after its first byte is a
//! list of operations `[op][len u16 LE][len bytes]`:
//! - op 0: the bytes sealed as one frame (`SecureWriter::seal`, several chunks if long);
//! - op 1: the bytes written raw onto the stream (garbage, a forged header);
//! - op 2: the bytes sealed as one frame with one byte of it flipped (the first two bytes of
//!   the operand pick the position and the mask);
//! - op 3: the bytes written and flushed through `SecureWriter`'s `Write` (one frame per op).
//!
//! The first byte picks the receiving side's reader, by its value modulo 5: 0 read everything
//! (in reads of `1 + (byte >> 2)` bytes), 1 `read_answer`, 2 `read_blob` with a 64 KiB bound,
//! 3 `read_blob`s until the stream ends; 4 skips the channel: the rest of the input is a state
//! transfer for `transfer::receive_dir` (the records a backup reads during a re-protection),
//! received into a fresh directory, which no file may leave.
//!
//! The same operations then go through the heartbeats' `DatagramOpener`, as datagrams (op 0
//! and 3 sealed, op 1 raw, op 2 sealed and altered), and what opens through `Heartbeat::decode`.
//!
//! Properties: a stream of only well-formed frames reads back exactly, then ends cleanly; any
//! other ends in a typed error (an `InvalidData` carrying a `SecureError`, or an unexpected end)
//! and, once the reader has failed on a bad chunk, every later read fails the same way;
//! `read_blob` never returns more than its bound; a datagram opens only if it was sealed, and
//! only once.
#![no_main]

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use ftvm_replication::link::{read_answer, read_blob};
use ftvm_replication::secure::{handshake, Key, SecureError};
use ftvm_replication::transfer::receive_dir;
use libfuzzer_sys::fuzz_target;

fn listener() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("a loopback port"))
}

fn key() -> &'static Key {
    static K: OnceLock<Key> = OnceLock::new();
    K.get_or_init(|| Key::from_bytes(&[0x5a; 32]).expect("a key"))
}

#[derive(Debug)]
enum Op {
    Seal(Vec<u8>),
    Raw(Vec<u8>),
    Flip(Vec<u8>),
    Write(Vec<u8>),
}

fn parse_ops(mut rest: &[u8]) -> Vec<Op> {
    let mut ops = Vec::new();
    while let [op, a, b, tail @ ..] = rest {
        let n = usize::from(u16::from_le_bytes([*a, *b])).min(tail.len());
        let bytes = tail[..n].to_vec();
        rest = &tail[n..];
        ops.push(match op % 4 {
            0 => Op::Seal(bytes),
            1 => Op::Raw(bytes),
            2 => Op::Flip(bytes),
            _ => Op::Write(bytes),
        });
    }
    ops
}

/// A datagram the sending side made of an operation: sealed (`Some(payload)`: it must open,
/// once, to that payload) or raw or altered (`None`: it must not open).
type Datagram = (Vec<u8>, Option<Vec<u8>>);

/// The sending side: what `ops` say, then a close. Returns the operations as heartbeat
/// datagrams, for the receiving side's `DatagramOpener`.
fn send(stream: TcpStream, ops: Vec<Op>) -> Vec<Datagram> {
    let Ok((mut w, _r, keys)) = handshake(stream, key(), true, Duration::from_secs(5)) else { return Vec::new() };
    let mut sealer = keys.sealer();
    let datagrams = ops
        .iter()
        .map(|op| match op {
            Op::Seal(p) | Op::Write(p) => (sealer.seal(p), Some(p.clone())),
            Op::Raw(p) => (p.clone(), None),
            Op::Flip(p) => {
                let mut d = sealer.seal(p);
                let i = usize::from(p.first().copied().unwrap_or(0)) % d.len();
                d[i] ^= p.get(2).copied().unwrap_or(1).max(1);
                (d, None)
            }
        })
        .collect();
    for op in ops {
        // The receiver may stop reading at any point: a failed send ends the sending.
        let sent = match op {
            Op::Seal(p) => w.seal(&p).and_then(|wire| w.stream().write_all(&wire)),
            Op::Raw(p) => w.stream().write_all(&p),
            Op::Flip(p) => w.seal(&p).and_then(|mut wire| {
                let at =
                    usize::from(u16::from_le_bytes([p.first().copied().unwrap_or(0), p.get(1).copied().unwrap_or(0)]));
                // (An empty frame seals to nothing: nothing to flip.)
                let i = at % wire.len().max(1);
                if let Some(b) = wire.get_mut(i) {
                    *b ^= p.get(2).copied().unwrap_or(1).max(1);
                }
                w.stream().write_all(&wire)
            }),
            Op::Write(p) => w.write_all(&p).and_then(|()| w.flush()),
        };
        if sent.is_err() {
            break;
        }
    }
    w.shutdown();
    datagrams
}

/// The error is one the channel documents: a bad chunk (`InvalidData` around a `SecureError`),
/// or the stream cut in the middle of a frame.
fn typed(e: &io::Error) {
    match e.kind() {
        io::ErrorKind::InvalidData => {
            // read_blob's own refusal of a length over its bound is InvalidData too, without one.
            let text = e.to_string();
            assert!(SecureError::in_io_error(e).is_some() || text.contains("at most"), "{e:?}");
        }
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {}
        _ => panic!("an untyped error from the channel: {e:?}"),
    }
}

/// Mode 4: the bytes as a state transfer (`transfer::receive_dir`, what a backup reads from
/// the channel during a re-protection or a resync), into a fresh directory: whatever the
/// records say, files are made only inside it.
fn receive_state(bytes: &[u8]) {
    static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
    let scratch = SCRATCH.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let d = base.join(format!("ftvm-fuzz-transfer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("a scratch directory");
        d
    });
    let dir = scratch.join("state");
    let _ = std::fs::remove_dir_all(&dir);
    let received = AtomicU64::new(0);
    if let Err(e) = receive_dir(&mut &bytes[..], &dir, &received) {
        assert!(!e.to_string().is_empty());
    }
    assert!(received.load(Ordering::Relaxed) <= bytes.len() as u64);
    let beside: Vec<_> =
        std::fs::read_dir(scratch).expect("the scratch directory").flatten().map(|e| e.file_name()).collect();
    assert_eq!(beside, ["state"], "a file made outside the transfer's directory");
    for e in std::fs::read_dir(&dir).expect("the transfer's directory").flatten() {
        let meta = std::fs::symlink_metadata(e.path()).expect("a file's metadata");
        assert!(meta.is_file(), "{:?} is not a plain file", e.file_name());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&how, rest)) = data.split_first() else { return };
    if how % 5 == 4 {
        return receive_state(rest);
    }
    let ops = parse_ops(rest);
    let clean = ops.iter().all(|op| matches!(op, Op::Seal(_) | Op::Write(_)));
    let expected: Vec<u8> = ops
        .iter()
        .flat_map(|op| match op {
            Op::Seal(p) | Op::Write(p) => p.clone(),
            _ => Vec::new(),
        })
        .collect();
    let l = listener();
    let addr = l.local_addr().expect("its address");
    let sender = std::thread::spawn(move || TcpStream::connect(addr).map(|s| send(s, ops)).unwrap_or_default());
    let (stream, _) = l.accept().expect("the sender's connection");
    let (w, mut r, keys) = handshake(stream, key(), false, Duration::from_secs(5)).expect("the handshake");
    r.set_read_timeout(Some(Duration::from_secs(10))).expect("a timeout");
    match how % 5 {
        0 => {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 1 + usize::from(how >> 2)];
            let end = loop {
                match r.read(&mut buf) {
                    Ok(0) => break None,
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        assert!(got.len() <= data.len(), "more payload than was sent");
                    }
                    Err(e) => break Some(e),
                }
            };
            match end {
                None if clean => assert_eq!(got, expected, "the frames read back exactly"),
                None => {}
                Some(e) => {
                    assert!(!clean, "well-formed frames failed: {e:?}");
                    typed(&e);
                    if SecureError::in_io_error(&e).is_some() {
                        let again = r.read(&mut buf).expect_err("a failed channel stays failed");
                        assert_eq!(again.kind(), e.kind());
                        assert!(r.failure().is_some());
                    }
                }
            }
        }
        1 => match read_answer(&mut r) {
            Ok(_) => {}
            Err(e) => assert!(!e.to_string().is_empty()),
        },
        2 => match read_blob(&mut r, 1 << 16) {
            Ok(b) => assert!(b.len() <= 1 << 16),
            Err(e) => typed(&e),
        },
        _ => loop {
            match read_blob(&mut r, 1 << 12) {
                Ok(b) => assert!(b.len() <= 1 << 12),
                Err(e) => {
                    if e.kind() != io::ErrorKind::UnexpectedEof {
                        typed(&e);
                    }
                    break;
                }
            }
        },
    }
    drop((w, r));
    let datagrams = sender.join().expect("the sender");
    // The same operations as heartbeats: only what was sealed opens, once, in order.
    let mut opener = keys.opener();
    for (d, sealed) in &datagrams {
        match (opener.open(d), sealed) {
            (Ok(p), Some(expected)) => {
                assert_eq!(&p, expected);
                let _ = ftvm_replication::protocol::Heartbeat::decode(&p);
            }
            (Ok(p), None) => panic!("an altered or forged datagram opened: {p:?}"),
            (Err(e), Some(_)) => panic!("a sealed datagram did not open: {e}"),
            (Err(e), None) => assert!(!e.to_string().is_empty()),
        }
        assert!(opener.open(d).is_err(), "a datagram opened twice");
        let _ = ftvm_replication::protocol::Heartbeat::decode(d);
    }
});
