//! Byte-level encoding of frames and record payloads (docs/log-format.md is the reference).
//!
//! Everything here that reads bytes works on untrusted input: every length is checked against
//! the bytes actually present before anything is sliced or allocated.

use crate::record::{EndReason, Record};

/// Record kind codes (the low 7 bits of a body's kind byte).
pub(crate) mod kind {
    pub const HEADER: u8 = 0x00;
    pub const CLOCK: u8 = 0x01;
    pub const CONSOLE_INPUT: u8 = 0x02;
    pub const NET_RX: u8 = 0x03;
    pub const ENTROPY: u8 = 0x04;
    pub const EXIT_SIG: u8 = 0x05;
    pub const CHECKPOINT: u8 = 0x06;
    pub const PAGE_HASHES: u8 = 0x07;
    pub const OUTPUT: u8 = 0x08;
    pub const OUTPUT_DATA: u8 = 0x09;
    pub const SYNC_POINT: u8 = 0x0a;
    pub const END: u8 = 0x0b;
    pub const SHUTDOWN_REQUEST: u8 = 0x0c;
    /// Set in the kind byte when the payload is LZ4-compressed.
    pub const COMPRESSED: u8 = 0x80;

    pub fn name(k: u8) -> &'static str {
        match k & !COMPRESSED {
            HEADER => "HEADER",
            CLOCK => "CLOCK",
            CONSOLE_INPUT => "CONSOLE_IN",
            NET_RX => "NET_RX",
            ENTROPY => "ENTROPY",
            EXIT_SIG => "EXIT_SIG",
            CHECKPOINT => "CHECKPOINT",
            PAGE_HASHES => "PAGE_HASHES",
            OUTPUT | OUTPUT_DATA => "OUTPUT",
            SYNC_POINT => "SYNC_POINT",
            END => "END",
            SHUTDOWN_REQUEST => "SHUTDOWN_REQ",
            _ => "unknown",
        }
    }
}

/// Frame body lengths live in the low 26 bits of the length word.
pub const MAX_BODY: u32 = (1 << 26) - 1;
/// LZ4 cannot expand data by more than ~255:1; a claimed raw size beyond this is corrupt, and
/// the bound keeps a hostile size prefix from making the reader allocate much.
const LZ4_MAX_RATIO: u64 = 255;
const LZ4_SLACK: u64 = 64;
/// The largest payload a compressed frame may unpack to. More than a frame holds
/// ([`MAX_BODY`]): a sync point carries every page dirtied since the one before, and pages a
/// guest zeroed (1,000 sockets' buffers: ~100 MiB) shrink ~80:1, into a frame that the writer
/// wrote and the reader must take. The writer keeps to the same bound.
pub const MAX_RAW: u64 = 1 << 32;

/// CRC-6 (x^6 + x + 1, primitive) of a 26-bit length: any 1- or 2-bit error in the word, and any
/// burst up to 6 bits, is caught. It protects the length itself, because a length that grew by
/// corruption would otherwise make a damaged frame look like a torn tail.
pub fn length_check(len: u32) -> u32 {
    let mut r = (len & MAX_BODY) << 6;
    for bit in (6..32).rev() {
        if r & (1 << bit) != 0 {
            r ^= 0x43 << (bit - 6);
        }
    }
    r & 0x3f
}

/// The frame's length word: body length | CRC-6 << 26.
pub fn length_word(len: u32) -> u32 {
    debug_assert!(len <= MAX_BODY);
    len | length_check(len) << 26
}

/// The body length in a length word, if its check bits match.
pub fn parse_length_word(word: u32) -> Option<u32> {
    let len = word & MAX_BODY;
    (word >> 26 == length_check(len)).then_some(len)
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Signed deltas are zigzag-coded so small moves either way stay one byte.
fn zigzag(d: i64) -> u64 {
    ((d << 1) ^ (d >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

fn put_delta(out: &mut Vec<u8>, prev: u64, v: u64) {
    put_varint(out, zigzag(v.wrapping_sub(prev) as i64));
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A checked cursor over untrusted bytes.
pub struct Cur<'a> {
    b: &'a [u8],
}

pub type DecodeResult<T> = Result<T, String>;

impl<'a> Cur<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Cur { b }
    }

    pub fn rest(&self) -> &'a [u8] {
        self.b
    }

    pub fn u8(&mut self) -> DecodeResult<u8> {
        let (&v, rest) = self.b.split_first().ok_or("ends early")?;
        self.b = rest;
        Ok(v)
    }

    pub fn u64le(&mut self) -> DecodeResult<u64> {
        let raw = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(raw);
        Ok(u64::from_le_bytes(a))
    }

    pub fn varint(&mut self) -> DecodeResult<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let byte = self.u8()?;
            // The 10th byte may only hold the top bit of a u64.
            if i == 9 && byte > 1 {
                return Err("varint overflows 64 bits".into());
            }
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint overflows 64 bits".into())
    }

    fn delta(&mut self, prev: u64) -> DecodeResult<u64> {
        Ok(prev.wrapping_add(unzigzag(self.varint()?) as u64))
    }

    pub fn take(&mut self, n: u64) -> DecodeResult<&'a [u8]> {
        if n > self.b.len() as u64 {
            return Err(format!("length {n} exceeds the {} bytes left", self.b.len()));
        }
        let (head, rest) = self.b.split_at(n as usize);
        self.b = rest;
        Ok(head)
    }

    fn bytes(&mut self) -> DecodeResult<Vec<u8>> {
        let n = self.varint()?;
        Ok(self.take(n)?.to_vec())
    }

    fn finish(&self) -> DecodeResult<()> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.b.len()))
        }
    }
}

/// The coding context: the values that the next record's fields are delta-coded against. Writer
/// and reader evolve it identically, record by record, from all zeros after the header.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ctx {
    exit: u64,
    clock_t: u64,
    sig_addr: u64,
    sig_rip: u64,
    out_ordinal: u64,
}

impl Ctx {
    pub fn exit(&self) -> u64 {
        self.exit
    }
}

/// Encodes `rec`'s payload into `out` and returns its kind code; advances `ctx`. The caller has
/// checked that `rec.exit() >= ctx.exit`.
pub fn encode(rec: &Record, ctx: &mut Ctx, out: &mut Vec<u8>) -> u8 {
    let exit = rec.exit();
    put_varint(out, exit - ctx.exit);
    ctx.exit = exit;
    match rec {
        Record::Clock { t, .. } => {
            put_delta(out, ctx.clock_t, *t);
            ctx.clock_t = *t;
            kind::CLOCK
        }
        Record::ConsoleInput { bytes, .. } => {
            put_bytes(out, bytes);
            kind::CONSOLE_INPUT
        }
        Record::NetRx { dev, frame, .. } => {
            out.push(*dev);
            put_bytes(out, frame);
            kind::NET_RX
        }
        Record::Entropy { bytes, .. } => {
            put_bytes(out, bytes);
            kind::ENTROPY
        }
        Record::ExitSig { kind: k, addr, size, data, rip, .. } => {
            out.push(*k);
            put_delta(out, ctx.sig_addr, *addr);
            out.push(*size);
            put_varint(out, *data);
            put_delta(out, ctx.sig_rip, *rip);
            ctx.sig_addr = *addr;
            ctx.sig_rip = *rip;
            kind::EXIT_SIG
        }
        Record::Checkpoint { exits_hash, regs_hash, .. } => {
            out.extend_from_slice(&exits_hash.to_le_bytes());
            out.extend_from_slice(&regs_hash.to_le_bytes());
            kind::CHECKPOINT
        }
        Record::PageHashes { pages, .. } => {
            put_varint(out, pages.len() as u64);
            let mut prev = 0;
            for &(gfn, hash) in pages {
                put_delta(out, prev, gfn);
                out.extend_from_slice(&hash.to_le_bytes());
                prev = gfn;
            }
            kind::PAGE_HASHES
        }
        Record::Output { ordinal, kind: k, len, digest, data, .. } => {
            put_delta(out, ctx.out_ordinal, *ordinal);
            ctx.out_ordinal = *ordinal;
            out.push(*k);
            out.extend_from_slice(&digest.to_le_bytes());
            match data {
                // The length is implied by the data (the writer checked that they agree).
                Some(d) => {
                    put_bytes(out, d);
                    kind::OUTPUT_DATA
                }
                None => {
                    put_varint(out, u64::from(*len));
                    kind::OUTPUT
                }
            }
        }
        Record::SyncPoint { kick, wait_us, state, .. } => {
            put_varint(out, u64::from(*kick));
            put_varint(out, *wait_us);
            put_bytes(out, state);
            kind::SYNC_POINT
        }
        Record::End { reason, .. } => {
            match reason {
                EndReason::GuestPowerOff => out.push(0),
                EndReason::GuestReset => out.push(1),
                EndReason::TripleFault => out.push(2),
                EndReason::OperatorStop => out.push(3),
                EndReason::SizeLimit => out.push(4),
                EndReason::Error(e) => {
                    out.push(5);
                    put_bytes(out, e.as_bytes());
                }
            }
            kind::END
        }
        Record::ShutdownRequest { .. } => kind::SHUTDOWN_REQUEST,
    }
}

fn narrow<T: TryFrom<u64>>(v: u64, what: &str) -> DecodeResult<T> {
    T::try_from(v).map_err(|_| format!("{what} {v} out of range"))
}

/// Decodes a (decompressed) payload of kind `k`; advances `ctx` only on success.
pub fn decode(k: u8, payload: &[u8], ctx: &mut Ctx) -> DecodeResult<Record> {
    let mut c = Cur::new(payload);
    let mut n = *ctx;
    let exit = n.exit.checked_add(c.varint()?).ok_or("exit index overflows")?;
    n.exit = exit;
    let rec = match k {
        kind::CLOCK => {
            let t = c.delta(n.clock_t)?;
            n.clock_t = t;
            Record::Clock { exit, t }
        }
        kind::CONSOLE_INPUT => Record::ConsoleInput { exit, bytes: c.bytes()? },
        kind::NET_RX => Record::NetRx { exit, dev: c.u8()?, frame: c.bytes()? },
        kind::ENTROPY => Record::Entropy { exit, bytes: c.bytes()? },
        kind::EXIT_SIG => {
            let k = c.u8()?;
            let addr = c.delta(n.sig_addr)?;
            let size = c.u8()?;
            let data = c.varint()?;
            let rip = c.delta(n.sig_rip)?;
            n.sig_addr = addr;
            n.sig_rip = rip;
            Record::ExitSig { exit, kind: k, addr, size, data, rip }
        }
        kind::CHECKPOINT => Record::Checkpoint { exit, exits_hash: c.u64le()?, regs_hash: c.u64le()? },
        kind::PAGE_HASHES => {
            let count = c.varint()?;
            // Each entry takes at least 9 bytes: check before allocating.
            if count > c.rest().len() as u64 / 9 {
                return Err(format!("{count} page entries cannot fit in {} bytes", c.rest().len()));
            }
            let mut pages = Vec::with_capacity(count as usize);
            let mut prev = 0;
            for _ in 0..count {
                let gfn = c.delta(prev)?;
                pages.push((gfn, c.u64le()?));
                prev = gfn;
            }
            Record::PageHashes { exit, pages }
        }
        kind::OUTPUT | kind::OUTPUT_DATA => {
            let ordinal = c.delta(n.out_ordinal)?;
            n.out_ordinal = ordinal;
            let kind = c.u8()?;
            let digest = c.u64le()?;
            let (len, data) = if k == kind::OUTPUT_DATA {
                let d = c.bytes()?;
                (narrow(d.len() as u64, "output length")?, Some(d))
            } else {
                (narrow(c.varint()?, "output length")?, None)
            };
            Record::Output { exit, ordinal, kind, len, digest, data }
        }
        kind::SYNC_POINT => {
            let kick = narrow(c.varint()?, "kick")?;
            let wait_us = c.varint()?;
            Record::SyncPoint { exit, kick, wait_us, state: c.bytes()? }
        }
        kind::END => {
            let reason = match c.u8()? {
                0 => EndReason::GuestPowerOff,
                1 => EndReason::GuestReset,
                2 => EndReason::TripleFault,
                3 => EndReason::OperatorStop,
                4 => EndReason::SizeLimit,
                5 => EndReason::Error(String::from_utf8(c.bytes()?).map_err(|_| "END message is not UTF-8")?),
                r => return Err(format!("unknown END reason {r}")),
            };
            Record::End { exit, reason }
        }
        kind::SHUTDOWN_REQUEST => Record::ShutdownRequest { exit },
        _ => return Err("unknown kind".into()),
    };
    c.finish()?;
    *ctx = n;
    Ok(rec)
}

/// Whether a kind code (without the compression bit) is a record kind.
pub fn is_record_kind(k: u8) -> bool {
    (kind::CLOCK..=kind::SHUTDOWN_REQUEST).contains(&k)
}

/// The compressed form of `raw` (varint raw length + LZ4 block) if it is smaller.
pub fn compress(raw: &[u8]) -> Option<Vec<u8>> {
    let block = lz4_flex::block::compress(raw);
    let bound = (block.len() as u64).saturating_mul(LZ4_MAX_RATIO).saturating_add(LZ4_SLACK);
    // Keep writer output inside the reader's sanity bounds (the ratio is never hit by real
    // LZ4 output).
    if raw.len() as u64 > bound.min(MAX_RAW) {
        return None;
    }
    let mut out = Vec::with_capacity(block.len() + 5);
    put_varint(&mut out, raw.len() as u64);
    out.extend_from_slice(&block);
    (out.len() < raw.len()).then_some(out)
}

/// Inverse of [`compress`], on untrusted input.
pub fn decompress(payload: &[u8]) -> DecodeResult<Vec<u8>> {
    let mut c = Cur::new(payload);
    let raw_len = c.varint()?;
    let block = c.rest();
    let bound = (block.len() as u64).saturating_mul(LZ4_MAX_RATIO).saturating_add(LZ4_SLACK);
    if raw_len > MAX_RAW || raw_len > bound {
        return Err(format!("implausible uncompressed size {raw_len} for {} compressed bytes", block.len()));
    }
    let mut out = Vec::new();
    out.try_reserve_exact(raw_len as usize)
        .map_err(|_| format!("no memory for the {raw_len} bytes a compressed record unpacks to"))?;
    out.resize(raw_len as usize, 0);
    let n = lz4_flex::block::decompress_into(block, &mut out).map_err(|e| format!("LZ4: {e}"))?;
    if n != out.len() {
        return Err(format!("LZ4 block yields {n} bytes, {raw_len} announced"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip_and_overflow() {
        for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX - 1, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut c = Cur::new(&b);
            assert_eq!(c.varint().unwrap(), v);
            assert!(c.rest().is_empty());
        }
        assert!(Cur::new(&[0xff; 10]).varint().is_err());
        assert!(Cur::new(&[0xff; 11]).varint().is_err());
        assert!(Cur::new(&[0x80]).varint().is_err());
    }

    #[test]
    fn zigzag_round_trip() {
        for d in [0i64, 1, -1, 63, -64, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(d)), d);
        }
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
    }

    #[test]
    fn length_word_catches_every_one_and_two_bit_error() {
        for len in [0u32, 1, 2, 17, 1500, 65_536, MAX_BODY] {
            let w = length_word(len);
            assert_eq!(parse_length_word(w), Some(len));
            for i in 0..32 {
                assert_eq!(parse_length_word(w ^ 1 << i), None, "len {len} bit {i}");
                for j in 0..i {
                    assert_eq!(parse_length_word(w ^ 1 << i ^ 1 << j), None, "len {len} bits {i},{j}");
                }
            }
        }
    }

    #[test]
    fn decompress_rejects_absurd_sizes() {
        let mut b = Vec::new();
        put_varint(&mut b, 1 << 40);
        b.extend_from_slice(&[0; 4]);
        assert!(decompress(&b).is_err());
        assert!(decompress(&[]).is_err());
    }

    #[test]
    fn highly_compressible_data_stays_within_the_ratio_bound() {
        let zeros = vec![0u8; 4 << 20];
        let c = compress(&zeros).expect("zeros compress");
        assert_eq!(decompress(&c).unwrap(), zeros);
    }
}
