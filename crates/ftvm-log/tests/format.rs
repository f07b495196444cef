//! Round trips, compactness and the writer's rules.

mod common;

use std::io::{self, Write};

use common::*;
use ftvm_log::*;

fn round_trip(records: &[Record], compression: Option<usize>) -> Vec<u8> {
    let bytes = write_log(records, compression);
    let out = read_all(&bytes).unwrap();
    assert_eq!(out.header, header());
    let got: Vec<Record> = out.records.iter().map(|(_, r)| r.clone()).collect();
    assert_eq!(got, records);
    for (i, (lsn, _)) in out.records.iter().enumerate() {
        assert_eq!(*lsn, i as u64 + 1);
    }
    assert!(!out.truncated);
    assert_eq!(out.valid_len, bytes.len() as u64);
    bytes
}

#[test]
fn every_kind_round_trips_uncompressed_and_compressed() {
    let plain = round_trip(&every_kind(), None);
    let packed = round_trip(&every_kind(), Some(DEFAULT_COMPRESS_MIN));
    assert!(packed.len() + 4000 < plain.len(), "compression must pay: {} vs {}", packed.len(), plain.len());
    // Compressing everything, even tiny payloads, still round-trips (only smaller forms are kept).
    round_trip(&every_kind(), Some(0));
}

#[test]
fn every_end_reason_round_trips() {
    for reason in [
        EndReason::GuestPowerOff,
        EndReason::GuestReset,
        EndReason::TripleFault,
        EndReason::OperatorStop,
        EndReason::SizeLimit,
        EndReason::Error(String::new()),
        EndReason::Error("ünïcode".into()),
    ] {
        round_trip(&[Record::End { exit: 5, reason }], None);
    }
}

#[test]
fn a_shutdown_request_is_its_kind_and_the_exit_delta_alone() {
    // Body: LSN 1, kind 0x0c, exit delta 9: nothing else.
    let bytes = write_log(&[Record::ShutdownRequest { exit: 9 }], None);
    assert_eq!(&bytes[bytes.len() - 3..], &[0x01, 0x0c, 0x09]);
    round_trip(&[Record::Clock { exit: 4, t: 5 }, Record::ShutdownRequest { exit: 9 }], None);
    assert_eq!(Record::ShutdownRequest { exit: 9 }.to_string(), "SHUTDOWN_REQ exit=9");
}

#[test]
fn extreme_values_round_trip() {
    let recs = vec![
        Record::Clock { exit: 0, t: u64::MAX },
        Record::Clock { exit: 0, t: 0 },
        Record::ExitSig { exit: 0, kind: 255, addr: u64::MAX, size: 255, data: u64::MAX, rip: 0 },
        Record::ExitSig { exit: 1, kind: 0, addr: 0, size: 0, data: 0, rip: u64::MAX },
        Record::Output { exit: 1, ordinal: u64::MAX, kind: 255, len: u32::MAX, digest: 0, data: None },
        Record::Output { exit: 1, ordinal: 0, kind: 0, len: 0, digest: 0, data: Some(vec![]) },
        Record::PageHashes { exit: 2, pages: vec![(u64::MAX, 0), (0, u64::MAX), (u64::MAX, 1)] },
        Record::SyncPoint { exit: u64::MAX - 1, kick: u32::MAX, wait_us: u64::MAX, state: vec![7] },
        Record::NetRx { exit: u64::MAX, dev: 255, frame: vec![] },
        Record::ShutdownRequest { exit: u64::MAX },
        Record::End { exit: u64::MAX, reason: EndReason::OperatorStop },
    ];
    round_trip(&recs, None);
    round_trip(&recs, Some(0));
}

#[test]
fn random_records_round_trip() {
    let mut rng = Rng(7);
    let mut exit = 0u64;
    let mut recs = Vec::new();
    for _ in 0..3000 {
        exit += rng.below(4) * rng.below(1000);
        let n = rng.below(300) as usize;
        let r = match rng.below(10) {
            0 => Record::Clock { exit, t: rng.next() >> rng.below(64) },
            1 => Record::ConsoleInput { exit, bytes: rng.bytes(n) },
            2 => Record::NetRx { exit, dev: rng.next() as u8, frame: vec![rng.next() as u8; n] },
            3 => Record::Entropy { exit, bytes: rng.bytes(n) },
            4 => Record::ExitSig {
                exit,
                kind: rng.next() as u8,
                addr: rng.next() >> rng.below(64),
                size: rng.next() as u8,
                data: rng.next() >> rng.below(64),
                rip: rng.next(),
            },
            5 => Record::Checkpoint { exit, exits_hash: rng.next(), regs_hash: rng.next() },
            6 => Record::PageHashes { exit, pages: (0..n / 10).map(|_| (rng.next() >> 30, rng.next())).collect() },
            7 => {
                let data = (rng.below(2) == 0).then(|| rng.bytes(n));
                Record::Output { exit, ordinal: rng.next(), kind: 1, len: n as u32, digest: rng.next(), data }
            }
            8 => Record::SyncPoint { exit, kick: rng.next() as u32, wait_us: 0, state: vec![rng.next() as u8; n * 10] },
            _ => Record::ShutdownRequest { exit },
        };
        recs.push(r);
    }
    round_trip(&recs, None);
    round_trip(&recs, Some(DEFAULT_COMPRESS_MIN));
}

/// Bytes per record of a stream of `make(i)` records.
fn bytes_per_record(n: u64, make: impl Fn(u64) -> Record) -> f64 {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let start = w.bytes_written();
    for i in 0..n {
        w.append(&make(i)).unwrap();
    }
    (w.bytes_written() - start) as f64 / n as f64
}

#[test]
fn delta_coding_keeps_frequent_records_small() {
    // A CLOCK at every exit, ~1.2 us apart: prefix 8 + LSN 2 + kind 1 + exit 1 + t 2.
    let clock = bytes_per_record(10_000, |i| Record::Clock { exit: i, t: 5_000_000_000 + i * 1_234 });
    assert!(clock <= 14.0, "CLOCK costs {clock} bytes");
    // The same port and a nearby RIP at every exit (a polling loop).
    let sig = bytes_per_record(10_000, |i| Record::ExitSig {
        exit: i,
        kind: 1,
        addr: 0x3fd,
        size: 1,
        data: 0x60,
        rip: 0xffff_ffff_8100_0000 + (i % 4) * 3,
    });
    assert!(sig <= 17.0, "EXIT_SIG costs {sig} bytes");
    // Far-apart exits still cost only their varint.
    let sparse = bytes_per_record(1000, |i| Record::Clock { exit: i * 1_000_000, t: i * 10_000_000 });
    assert!(sparse <= 19.0, "sparse CLOCK costs {sparse} bytes");
    let out = bytes_per_record(1000, |i| Record::Output {
        exit: i * 50,
        ordinal: i,
        kind: OUTPUT_NET,
        len: 1514,
        digest: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        data: None,
    });
    assert!(out <= 24.0, "OUTPUT costs {out} bytes");
    println!("bytes/record: CLOCK every exit {clock:.2}, EXIT_SIG {sig:.2}, sparse CLOCK {sparse:.2}, OUTPUT {out:.2}");
}

/// Measured figures quoted in docs/log-format.md (`cargo test -p ftvm-log -- --nocapture size_figures`).
#[test]
fn size_figures() {
    let mut rng = Rng(1);
    // A 1500-byte frame with a realistic mix: headers, then ASCII payload (an HTTP/RESP reply).
    let mut frame = rng.bytes(54);
    frame.extend(b"+OK\r\n$5\r\nvalue\r\n".iter().cycle().take(1446));
    let random = rng.bytes(1500);
    let per = |rec: &dyn Fn(u64) -> Record| bytes_per_record(200, rec);
    let text = per(&|i| Record::NetRx { exit: i * 100, dev: 0, frame: frame.clone() });
    let rand = per(&|i| Record::NetRx { exit: i * 100, dev: 0, frame: random.clone() });
    let entropy = per(&|i| Record::Entropy { exit: i * 100, bytes: random[..32].to_vec() });
    let pages: Vec<(u64, u64)> = (0..64).map(|g| (0x1000 + g * 3, rng.next())).collect();
    let page_hashes = per(&|i| Record::PageHashes { exit: i, pages: pages.clone() });
    let ckpt = per(&|i| Record::Checkpoint { exit: i * 10_000, exits_hash: i, regs_hash: !i });
    let zeros = per(&|i| Record::SyncPoint { exit: i, kick: 1, wait_us: 0, state: vec![0; 64 << 10] });
    assert!(text < 200.0, "compressible 1500-byte frame costs {text}");
    assert!(rand <= 1516.0, "random 1500-byte frame costs {rand}");
    println!(
        "bytes/record: NET_RX 1500 B text-like {text:.1}, random {rand:.1}; ENTROPY 32 B {entropy:.1}; \
         PAGE_HASHES 64 pages {page_hashes:.1}; CHECKPOINT {ckpt:.1}; SYNC_POINT 64 KiB zeros {zeros:.1}"
    );
    let h = LogWriter::new(Vec::new(), &header()).unwrap().bytes_written();
    println!("header (2 CPUID entries): {h} bytes");
}

#[test]
fn size_limit_refuses_appends_but_keeps_room_for_end() {
    let limit = 2_000;
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap().with_max_size(limit);
    let mut appended = 0u64;
    let err = loop {
        match w.append(&Record::ConsoleInput { exit: appended, bytes: vec![b'x'; 40] }) {
            Ok(_) => appended += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, LogError::SizeLimit { limit: 2000, .. }), "{err}");
    assert!(w.bytes_written() + END_RESERVE <= limit);
    // The refusal changed nothing: the next LSN is still free and END fits.
    assert_eq!(w.next_lsn(), appended + 1);
    w.append(&Record::End { exit: appended, reason: EndReason::SizeLimit }).unwrap();
    assert!(w.bytes_written() <= limit);
    assert!(matches!(w.append(&Record::Clock { exit: appended, t: 0 }), Err(LogError::AfterEnd)));
    let bytes = w.into_inner().unwrap();
    let out = read_all(&bytes).unwrap();
    assert_eq!(out.records.len() as u64, appended + 1);
    assert_eq!(out.records.last().unwrap().1, Record::End { exit: appended, reason: EndReason::SizeLimit });
}

#[test]
fn writer_rejects_bad_records_without_damage() {
    // Compression off, so that a huge block of zeros stays huge.
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap().with_compression(None);
    w.append(&Record::Clock { exit: 10, t: 1 }).unwrap();
    let e = w.append(&Record::Clock { exit: 9, t: 2 }).unwrap_err();
    assert!(matches!(e, LogError::ExitOrder { prev: 10, exit: 9 }), "{e}");
    let bad = Record::Output { exit: 10, ordinal: 0, kind: 0, len: 3, digest: 0, data: Some(vec![1, 2]) };
    assert!(matches!(w.append(&bad), Err(LogError::InvalidRecord(_))));
    let huge = Record::SyncPoint { exit: 10, kick: 0, wait_us: 0, state: vec![0; MAX_BODY as usize] };
    assert!(matches!(w.append(&huge), Err(LogError::FrameTooLarge { .. })));
    assert_eq!(w.append(&Record::Clock { exit: 11, t: 3 }).unwrap(), 2);
    let out = read_all(&w.into_inner().unwrap()).unwrap();
    assert_eq!(out.records.len(), 2);
    assert_eq!(out.records[1].1, Record::Clock { exit: 11, t: 3 });
}

/// A sync point larger than a frame holds, of pages the guest zeroed (a storm of 1,000
/// connections' socket buffers), is compressed into one frame; the reader takes it back.
/// It once refused anything that unpacked past a frame's size, and the recording could not
/// be replayed ("implausible uncompressed size 103254493 for 1237274 compressed bytes").
#[test]
fn a_sync_point_larger_than_a_frame_that_compresses_into_one_round_trips() {
    let mut state = vec![0u8; MAX_BODY as usize + (40 << 20)];
    for (i, b) in state.iter_mut().enumerate().step_by(4096) {
        *b = (i / 4096) as u8;
    }
    let records = vec![Record::SyncPoint { exit: 1, kick: 0, wait_us: 5, state }, Record::Clock { exit: 2, t: 9 }];
    let bytes = round_trip(&records, Some(DEFAULT_COMPRESS_MIN));
    assert!(bytes.len() < MAX_BODY as usize / 4, "{} bytes", bytes.len());
}

#[test]
fn header_with_another_format_version_is_refused_by_the_writer() {
    let h = LogHeader { format_version: FORMAT_VERSION + 1, ..header() };
    assert!(matches!(LogWriter::new(Vec::new(), &h), Err(LogError::InvalidRecord(_))));
}

/// A sink that fails after `left` bytes, like a socket whose peer went away.
struct Failing {
    left: usize,
}

impl Write for Failing {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer gone"));
        }
        let n = b.len().min(self.left);
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn writer_stops_after_an_io_error() {
    let hdr_len = LogWriter::new(Vec::new(), &header()).unwrap().bytes_written() as usize;
    let mut w = LogWriter::new(Failing { left: hdr_len + 5 }, &header()).unwrap();
    assert!(matches!(w.append(&Record::Clock { exit: 1, t: 1 }), Err(LogError::Io(_))));
    assert!(matches!(w.append(&Record::Clock { exit: 2, t: 1 }), Err(LogError::WriterFailed)));
    assert!(matches!(w.flush(), Err(LogError::WriterFailed)));
}

#[test]
fn streams_over_a_socket() {
    use std::os::unix::net::UnixStream;
    let (tx, rx) = UnixStream::pair().unwrap();
    let recs = every_kind();
    let sent = recs.clone();
    let writer = std::thread::spawn(move || {
        let mut w = LogWriter::new(io::BufWriter::new(tx), &header()).unwrap();
        for r in &sent {
            w.append(r).unwrap();
            w.flush().unwrap();
        }
    });
    let (mut r, h) = LogReader::open(io::BufReader::new(rx)).unwrap();
    assert_eq!(h, header());
    let mut got = Vec::new();
    while let Some((_, rec)) = r.next().unwrap() {
        got.push(rec);
    }
    writer.join().unwrap();
    assert_eq!(got, recs);
    assert!(r.ended() && !r.truncated());
}

#[test]
fn header_json_round_trips_and_compare_names_each_difference() {
    let a = header();
    let json = serde_json::to_string(&a).unwrap();
    assert!(json.contains("\"52:54:00:12:34:56\""), "{json}");
    assert_eq!(serde_json::from_str::<LogHeader>(&json).unwrap(), a);
    assert!(a.compare(&a.clone()).is_empty());

    let mut b = a.clone();
    b.kernel.sha256 = "00".repeat(32);
    b.kernel.path = "/elsewhere/hello.elf".into();
    b.cpuid[1].ebx ^= 1 << 5;
    b.cpuid.push(CpuidEntry { function: 0x8000_0001, ..Default::default() });
    b.memory_layout.pop();
    b.net[0].tap = "tap7".into();
    b.net[0].mac.0[5] = 0x57;
    b.xcr0 = 0xe7;
    b.extra.insert("k".into(), "v".into());
    b.record_start_unix_ns += 1;
    let m = a.compare(&b);
    let fields: Vec<&str> = m.iter().map(|m| m.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "kernel.path",
            "kernel.sha256",
            "memory_layout[1]",
            "cpuid.len",
            "cpuid[0x7/0]",
            "cpuid[0x80000001/0]",
            "xcr0",
            "net[0].mac",
            "net[0].tap",
            "record_start_unix_ns",
            "extra.k"
        ]
    );
    let xcr0 = m.iter().find(|m| m.field == "xcr0").unwrap();
    assert_eq!((xcr0.ours.as_str(), xcr0.theirs.as_str()), ("0x7", "0xe7"));
    assert_eq!(xcr0.to_string(), "xcr0: ours 0x7, theirs 0xe7");
    let insignificant: Vec<&str> = m.iter().filter(|m| !m.significant).map(|m| m.field.as_str()).collect();
    assert_eq!(insignificant, ["kernel.path", "net[0].tap", "record_start_unix_ns"]);
    let cpuid = m.iter().find(|m| m.field == "cpuid[0x80000001/0]").unwrap();
    assert_eq!(cpuid.ours, "(absent)");

    let mut c = a.clone();
    c.initrd = Some(ImageInfo { path: "i".into(), sha256: "ee".into(), size: 1 });
    c.disks.clear();
    c.device_model_version = 4;
    let fields: Vec<String> = a.compare(&c).into_iter().map(|m| m.field).collect();
    assert_eq!(fields, ["device_model_version", "initrd", "disks[0]"]);
}

#[test]
fn header_with_unknown_fields_is_rejected() {
    let mut v = serde_json::to_value(header()).unwrap();
    v["surprise"] = 1.into();
    assert!(serde_json::from_value::<LogHeader>(v).is_err());
}
