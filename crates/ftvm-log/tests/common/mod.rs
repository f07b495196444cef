//! Shared helpers for the ftvm-log integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use ftvm_log::*;

/// A deterministic PRNG (splitmix64), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

pub fn header() -> LogHeader {
    LogHeader {
        device_model_version: 3,
        kernel: ImageInfo { path: "/img/hello.elf".into(), sha256: "ab".repeat(32), size: 123_456 },
        initrd: None,
        disks: vec![ImageInfo { path: "/img/disk.raw".into(), sha256: "cd".repeat(32), size: 1 << 20 }],
        memory_size: 256 << 20,
        memory_layout: vec![MemRegion { start: 0, size: 0xc000_0000 }, MemRegion { start: 1 << 32, size: 1 << 28 }],
        cmdline: "console=ttyS0".into(),
        effective_cmdline: "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5".into(),
        cpuid: vec![
            CpuidEntry {
                function: 0,
                index: 0,
                flags: 0,
                eax: 0xd,
                ebx: 0x756e_6547,
                ecx: 0x6c65_746e,
                edx: 0x4965_6e69,
            },
            CpuidEntry { function: 7, index: 0, flags: 1, eax: 0, ebx: 0x29c_67af, ecx: 0, edx: 0 },
        ],
        xcr0: 0x7,
        xsave_size: 832,
        rtc_base_unix: 1_700_000_000,
        console: "stdio".into(),
        net: vec![NetDevice { mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]), tap: "tap0".into() }],
        rng: true,
        exit_delivery: "next-exit".into(),
        record_start_unix_ns: 1_700_000_000_123_456_789,
        extra: BTreeMap::from([("guest".to_string(), "hello".to_string())]),
        ..LogHeader::default()
    }
}

/// One record of every kind (both Output forms), with compressible bulk data, ending with END.
pub fn every_kind() -> Vec<Record> {
    let text = b"The quick brown fox jumps over the lazy dog. ".repeat(8);
    vec![
        Record::Clock { exit: 0, t: 1_000_000 },
        Record::ConsoleInput { exit: 3, bytes: b"ls -l\n".to_vec() },
        Record::ConsoleInput { exit: 3, bytes: text.clone() },
        Record::NetRx { exit: 10, dev: 1, frame: text.repeat(3) },
        Record::Entropy { exit: 10, bytes: (0..32u8).map(|i| i.wrapping_mul(97)).collect() },
        Record::ExitSig { exit: 11, kind: 1, addr: 0x3f8, size: 1, data: 0x41, rip: 0xffff_ffff_8100_1234 },
        Record::ExitSig { exit: 12, kind: 2, addr: 0xd000_0050, size: 4, data: 0, rip: 0xffff_ffff_8100_1200 },
        Record::Clock { exit: 12, t: 999_000 },
        Record::Checkpoint { exit: 100, exits_hash: 0x0123_4567_89ab_cdef, regs_hash: u64::MAX },
        Record::PageHashes { exit: 100, pages: vec![(0x100, 1), (0x101, 2), (0x80, 3), (0xfffff, u64::MAX)] },
        Record::PageHashes { exit: 100, pages: vec![] },
        Record::Output { exit: 101, ordinal: 0, kind: OUTPUT_CONSOLE, len: 6, digest: hash64(b"hello\n"), data: None },
        Record::Output {
            exit: 102,
            ordinal: 1,
            kind: OUTPUT_NET,
            len: text.len() as u32,
            digest: hash64(&text),
            data: Some(text.clone()),
        },
        Record::SyncPoint { exit: 500, kick: 2, wait_us: 0, state: vec![0u8; 4096] },
        Record::SyncPoint { exit: 500, kick: 3, wait_us: 0, state: vec![] },
        Record::ShutdownRequest { exit: 600 },
        Record::End { exit: 777, reason: EndReason::Error("vCPU failed: EFAULT".into()) },
    ]
}

pub fn write_log(records: &[Record], compression: Option<usize>) -> Vec<u8> {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap().with_compression(compression);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(w.append(r).unwrap(), i as u64 + 1);
    }
    w.into_inner().unwrap()
}

/// What reading a whole log gave.
#[derive(Debug)]
pub struct ReadOut {
    pub header: LogHeader,
    pub records: Vec<(Lsn, Record)>,
    pub truncated: bool,
    pub valid_len: u64,
}

/// Reads everything; on error also returns the records read before it.
pub fn read_all(bytes: &[u8]) -> Result<ReadOut, (LogError, Vec<(Lsn, Record)>)> {
    let (mut r, header) = LogReader::open(bytes).map_err(|e| (e, vec![]))?;
    let mut records = Vec::new();
    loop {
        match r.next() {
            Ok(Some(x)) => records.push(x),
            Ok(None) => break,
            Err(e) => return Err((e, records)),
        }
    }
    Ok(ReadOut { header, records, truncated: r.truncated(), valid_len: r.valid_len() })
}

/// Frame boundaries of a log: the offset after the header frame, then after each record frame.
pub fn boundaries(bytes: &[u8]) -> Vec<u64> {
    let (mut r, _) = LogReader::open(bytes).unwrap();
    let mut b = vec![r.valid_len()];
    while r.next().unwrap().is_some() {
        b.push(r.valid_len());
    }
    b
}
