//! The log reader must never panic, whatever the bytes (issue 4).
//!
//! The first input byte picks what the rest is, so that the fuzzer reaches every layer without
//! having to discover a header's JSON or forge CRCs by itself:
//! - 0: the whole stream (magic, version, header, frames);
//! - 1: frames after a valid magic, version and header;
//! - 2: frame bodies after a valid header, each given a correct length word and CRC (so the
//!   record decoders and LZ4 see arbitrary payloads): `[n][n bytes of body]...`.
#![no_main]

use std::sync::OnceLock;

use ftvm_log::{LogHeader, LogReader, LogWriter};
use libfuzzer_sys::fuzz_target;

fn header_bytes() -> &'static [u8] {
    static H: OnceLock<Vec<u8>> = OnceLock::new();
    H.get_or_init(|| LogWriter::new(Vec::new(), &LogHeader::default()).unwrap().into_inner().unwrap())
}

/// The frame prefix of docs/log-format.md: length word (length | CRC-6 << 26) and CRC32.
fn frame(body: &[u8], out: &mut Vec<u8>) {
    let len = body.len() as u32;
    let mut r = len << 6;
    for bit in (6..32).rev() {
        if r & (1 << bit) != 0 {
            r ^= 0x43 << (bit - 6);
        }
    }
    out.extend_from_slice(&(len | (r & 0x3f) << 26).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let input = match mode % 3 {
        0 => rest.to_vec(),
        1 => [header_bytes(), rest].concat(),
        _ => {
            let mut out = header_bytes().to_vec();
            let mut rest = rest;
            while let Some((&n, tail)) = rest.split_first() {
                let n = (n as usize).min(tail.len());
                frame(&tail[..n], &mut out);
                rest = &tail[n..];
            }
            out
        }
    };
    if let Ok((mut r, _)) = LogReader::open(&input[..]) {
        while let Ok(Some(_)) = r.next() {}
        let _ = (r.truncated(), r.valid_len());
    }
    let _ = ftvm_log::inspect_reader(&input[..], true).map(|i| (i.to_string(), i.to_json()));
});
