//! Bad input: torn tails, flipped bits, LSN gaps, foreign files, random bytes.

mod common;

use std::cell::RefCell;
use std::io::{self, Read};
use std::rc::Rc;

use common::*;
use ftvm_log::*;

fn small_log() -> Vec<u8> {
    // Small (the flip test reads it once per bit) but with compressed frames.
    let mut recs: Vec<Record> =
        every_kind().into_iter().filter(|r| !matches!(r, Record::SyncPoint { .. } | Record::End { .. })).collect();
    recs.push(Record::SyncPoint { exit: 700, kick: 1, wait_us: 0, state: vec![9; 300] });
    recs.push(Record::End { exit: 700, reason: EndReason::GuestPowerOff });
    write_log(&recs, Some(DEFAULT_COMPRESS_MIN))
}

#[test]
fn torn_tail_at_every_cut_point() {
    let log = small_log();
    let full = read_all(&log).unwrap();
    let bounds = boundaries(&log);
    let header_end = bounds[0] as usize;
    for cut in 0..log.len() {
        let r = read_all(&log[..cut]);
        if cut == 0 {
            assert!(matches!(r, Err((LogError::Empty, _))), "cut {cut}: {r:?}");
            continue;
        }
        if cut < header_end {
            match r {
                Err((LogError::TruncatedHeader { offset }, _)) => assert_eq!(offset, cut as u64),
                other => panic!("cut {cut}: {other:?}"),
            }
            continue;
        }
        let out = r.unwrap_or_else(|e| panic!("cut {cut}: {e:?}"));
        // Exactly the frames wholly before the cut, and the torn flag iff the cut is mid-frame.
        let whole = bounds.iter().filter(|&&b| b <= cut as u64).count() - 1;
        assert_eq!(out.records, full.records[..whole], "cut {cut}");
        assert_eq!(out.valid_len, bounds[whole], "cut {cut}");
        assert_eq!(out.truncated, !bounds.contains(&(cut as u64)), "cut {cut}");
    }
}

#[test]
fn flipped_bit_anywhere_is_detected() {
    let log = small_log();
    let full = read_all(&log).unwrap();
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for byte in 0..log.len() {
        for bit in 0..8 {
            let mut bad = log.clone();
            bad[byte] ^= 1 << bit;
            match read_all(&bad) {
                Ok(out) => panic!("flip at byte {byte} bit {bit} read successfully: {out:?}"),
                Err((e, before)) => {
                    // Whatever was returned before the error is exactly what was written.
                    assert_eq!(before, full.records[..before.len()], "byte {byte} bit {bit}");
                    if let Some(off) = e.offset() {
                        assert!(off <= byte as u64, "byte {byte}: error names later offset {off}: {e}");
                    }
                    let name = format!("{e:?}");
                    *kinds.entry(name.split([' ', '{', '(']).next().unwrap().to_string()).or_default() += 1;
                }
            }
        }
    }
    println!("{} flips of a {}-byte log, errors: {kinds:?}", log.len() * 8, log.len());
}

#[test]
fn corruption_error_names_offset_frame_and_cause() {
    let log = small_log();
    let bounds = boundaries(&log);
    // Damage a byte in the body of the third record frame (LSN 3).
    let at = bounds[2] as usize + 9;
    let mut bad = log.clone();
    bad[at] ^= 0x40;
    let (e, before) = read_all(&bad).unwrap_err();
    assert_eq!(before.len(), 2);
    let LogError::Corrupt { offset, frame, what: Corruption::BadCrc { .. } } = &e else { panic!("{e:?}") };
    assert_eq!((*offset, *frame), (bounds[2], 3));
    let msg = e.to_string();
    assert!(msg.contains(&format!("byte offset {}", bounds[2])) && msg.contains("frame 3"), "{msg}");
    assert!(msg.contains("CRC mismatch"), "{msg}");

    // The reader does not go past corruption.
    let (mut r, _) = LogReader::open(&bad[..]).unwrap();
    r.next().unwrap();
    r.next().unwrap();
    assert!(matches!(r.next(), Err(LogError::Corrupt { .. })));
    assert!(matches!(r.next(), Err(LogError::ReaderFailed)));
}

#[test]
fn lsn_gap_and_replayed_frame_are_detected() {
    let log = small_log();
    let b = boundaries(&log).into_iter().map(|x| x as usize).collect::<Vec<_>>();
    // Frame 2 missing.
    let gap = [&log[..b[1]], &log[b[2]..]].concat();
    let (e, before) = read_all(&gap).unwrap_err();
    assert_eq!(before.len(), 1);
    match e {
        LogError::Corrupt { offset, frame: 2, what: Corruption::LsnGap { found: 3 } } => {
            assert_eq!(offset, b[1] as u64)
        }
        e => panic!("{e:?}"),
    }
    // Frame 2 twice.
    let dup = [&log[..b[2]], &log[b[1]..]].concat();
    let (e, _) = read_all(&dup).unwrap_err();
    assert!(matches!(e, LogError::Corrupt { frame: 3, what: Corruption::LsnGap { found: 2 }, .. }), "{e:?}");
    assert!(e.to_string().contains("LSN gap"), "{e}");
}

#[test]
fn record_after_end_is_corruption() {
    let a = write_log(&[Record::End { exit: 1, reason: EndReason::GuestPowerOff }], None);
    // Append a well-formed frame with LSN 2 taken from another log.
    let other = write_log(&[Record::Clock { exit: 0, t: 0 }, Record::Clock { exit: 2, t: 5 }], None);
    let ob = boundaries(&other);
    let spliced = [&a[..], &other[ob[1] as usize..]].concat();
    let (e, before) = read_all(&spliced).unwrap_err();
    assert_eq!(before.len(), 1);
    assert!(matches!(e, LogError::Corrupt { frame: 2, what: Corruption::AfterEnd, .. }), "{e:?}");
}

#[test]
fn foreign_empty_and_future_files_get_clear_errors() {
    assert!(matches!(LogReader::open(&b""[..]), Err(LogError::Empty)));
    let e = LogReader::open(&b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"[..]).err().unwrap();
    assert!(matches!(e, LogError::NotALog));
    assert_eq!(e.to_string(), "not an ftvm log (it does not start with \"FTVMLOG\\0\")");
    assert!(matches!(LogReader::open(&b"hello"[..]), Err(LogError::NotALog)));
    assert!(matches!(LogReader::open(&b"FTVM"[..]), Err(LogError::TruncatedHeader { offset: 4 })));

    let mut future = small_log();
    future[8..12].copy_from_slice(&7u32.to_le_bytes());
    let e = LogReader::open(&future[..]).err().unwrap();
    assert!(matches!(e, LogError::UnsupportedVersion { found: 7, supported: FORMAT_VERSION }));
    assert_eq!(e.to_string(), format!("log format version 7, this ftvm reads {FORMAT_VERSION}"));
    assert_eq!(LogError::Empty.to_string(), "empty file: not an ftvm log");
    // A log of the previous version (before SHUTDOWN_REQUEST) is refused by name, not misread.
    let mut old = small_log();
    old[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = LogReader::open(&old[..]).err().unwrap();
    assert_eq!(e.to_string(), "log format version 2, this ftvm reads 3");
}

#[test]
fn header_frame_must_hold_a_header() {
    // A valid frame 0 whose JSON is not a LogHeader.
    let json = br#"{"format_version":1}"#;
    let mut body = vec![0u8, 0x00];
    body.extend_from_slice(json);
    let mut log = MAGIC.to_vec();
    log.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    log.extend_from_slice(&frame_prefix(&body));
    log.extend_from_slice(&body);
    let e = LogReader::open(&log[..]).err().unwrap();
    assert!(matches!(e, LogError::Corrupt { frame: 0, what: Corruption::BadHeader(_), .. }), "{e:?}");
}

/// The 8-byte prefix for a body, as docs/log-format.md defines it (an independent re-implementation
/// of the length word, so the test checks the documented format, not the code against itself).
fn frame_prefix(body: &[u8]) -> [u8; 8] {
    let len = body.len() as u32;
    let mut r = len << 6;
    for bit in (6..32).rev() {
        if r & (1 << bit) != 0 {
            r ^= 0b100_0011 << (bit - 6);
        }
    }
    let word = len | (r & 0x3f) << 26;
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(&word.to_le_bytes());
    p[4..].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
    p
}

#[test]
fn documented_frame_layout_matches_the_writer() {
    let log = write_log(&[Record::Clock { exit: 3, t: 1000 }], None);
    let b = boundaries(&log);
    let frame = &log[b[0] as usize..];
    // body = LSN 1, kind CLOCK, exit delta 3, zigzag(1000) = 2000 = 0xd0 0x0f.
    let body = [0x01, 0x01, 0x03, 0xd0, 0x0f];
    assert_eq!(&frame[8..], &body);
    assert_eq!(frame[..8], frame_prefix(&body));
    assert_eq!(frame[..4], [0x05, 0x00, 0x00, 0x3c]); // the example in docs/log-format.md
    assert_eq!(&log[..12], b"FTVMLOG\0\x03\0\0\0");
}

/// A reader over a buffer that another party keeps appending to (a log being written).
struct Growing(Rc<RefCell<Vec<u8>>>, usize);

impl Read for Growing {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let src = self.0.borrow();
        let n = out.len().min(src.len() - self.1);
        out[..n].copy_from_slice(&src[self.1..self.1 + n]);
        self.1 += n;
        Ok(n)
    }
}

#[test]
fn reader_resumes_after_a_torn_tail_when_more_bytes_arrive() {
    let log = small_log();
    let bounds = boundaries(&log);
    let full = read_all(&log).unwrap().records;
    let cut = bounds[3] as usize + 5;
    let buf = Rc::new(RefCell::new(log[..cut].to_vec()));
    let (mut r, _) = LogReader::open(Growing(buf.clone(), 0)).unwrap();
    let mut got = Vec::new();
    while let Some(x) = r.next().unwrap() {
        got.push(x);
    }
    assert!(r.truncated());
    assert_eq!(r.truncated_at(), Some(bounds[3]));
    buf.borrow_mut().extend_from_slice(&log[cut..]);
    while let Some(x) = r.next().unwrap() {
        got.push(x);
    }
    assert!(!r.truncated() && r.ended());
    assert_eq!(got, full);
}

/// Reads a stream to its end, bounded, as replay would; panics are the failure.
fn drain(bytes: &[u8]) {
    if let Ok((mut r, _)) = LogReader::open(bytes) {
        for _ in 0..100_000 {
            match r.next() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
}

#[test]
fn random_bytes_never_panic_the_reader() {
    let mut rng = Rng(0x5eed);
    let log = small_log();
    let preamble = &log[..PREAMBLE_LEN as usize];
    let header_end = boundaries(&log)[0] as usize;
    for i in 0..40_000 {
        let n = rng.below(400) as usize;
        let input = match i % 5 {
            // Pure noise.
            0 => rng.bytes(n),
            // Noise after a valid preamble.
            1 => [preamble, &rng.bytes(n)].concat(),
            // Noise after a valid header: exercises the frame parser.
            2 => [&log[..header_end], &rng.bytes(n)].concat(),
            // A valid log with a few random byte changes.
            3 => {
                let mut b = log.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(b.len() as u64) as usize;
                    b[at] = rng.next() as u8;
                }
                b
            }
            // A valid log with a random slice replaced by noise (lengths, varints, LZ4 blocks).
            _ => {
                let at = header_end + rng.below((log.len() - header_end) as u64) as usize;
                let end = (at + n).min(log.len());
                [&log[..at], &rng.bytes(end - at), &log[end..]].concat()
            }
        };
        drain(&input);
    }
}

#[test]
fn forged_frames_with_valid_crcs_never_panic() {
    // Noise that passes the length check and the CRC reaches the record decoders and LZ4.
    let mut rng = Rng(99);
    let log = small_log();
    let header_end = boundaries(&log)[0] as usize;
    for _ in 0..40_000 {
        let mut body = vec![1u8]; // LSN 1
        let kind = match rng.below(3) {
            0 => rng.next() as u8,
            1 => 1 + rng.below(11) as u8,
            _ => 0x81 + rng.below(11) as u8,
        };
        body.push(kind);
        let n = rng.below(64) as usize;
        if kind & 0x80 != 0 && rng.below(2) == 0 {
            // A plausible compressed payload: a small raw size, then noise as the LZ4 block.
            body.push(rng.below(128) as u8);
        }
        body.extend(rng.bytes(n));
        let input = [&log[..header_end], &frame_prefix(&body), &body].concat();
        drain(&input);
    }
}
