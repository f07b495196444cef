//! The data disk's format: a journal of file-system changes under the data directory,
//! written at `fsync`/`fdatasync` (the file's new bytes) and at each `rename`, `unlink`,
//! `mkdir` and `rmdir` there, and replayed into the RAM file system at boot.
//!
//! Little-endian, 512-byte sectors. Sector 0: the header (magic `FTVMLXJ1`, sector size
//! u32 = 512, journal id u64 (random per formatted disk), check u32 over the bytes before
//! it). From sector 1: batches, each starting on a sector boundary and zero-padded to one:
//! records, then a COMMIT record. A record: magic u32 `LXR1`, kind u32, seq u64 (1, 2, ...
//! over the whole journal, COMMITs included), len u32, check u32 (FNV-1a over the journal id,
//! the 20 header bytes before it and the payload, folded to 32 bits), payload. Replay applies
//! a batch only when its COMMIT checks out; the first bad record ends the journal (a torn
//! last batch, never acknowledged, is dropped and later batches overwrite it).

use alloc::string::String;
use alloc::vec::Vec;

pub const SECTOR: usize = 512;
const MAGIC: &[u8; 8] = b"FTVMLXJ1";
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"LXR1");
const RECORD_HEADER: usize = 24;

/// One change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Bytes at an offset of a file (created if missing, extended if shorter).
    Write {
        path: String,
        offset: u64,
        data: Vec<u8>,
    },
    /// The file's length (created if missing).
    SetLen {
        path: String,
        len: u64,
    },
    Rename {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Rmdir {
        path: String,
    },
}

const K_WRITE: u32 = 1;
const K_SETLEN: u32 = 2;
const K_RENAME: u32 = 3;
const K_UNLINK: u32 = 4;
const K_MKDIR: u32 = 5;
const K_RMDIR: u32 = 6;
const K_COMMIT: u32 = 7;

fn fnv(parts: &[&[u8]]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    (h ^ (h >> 32)) as u32
}

/// The header sector of a fresh journal.
pub fn header(id: u64) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    s[..8].copy_from_slice(MAGIC);
    s[8..12].copy_from_slice(&(SECTOR as u32).to_le_bytes());
    s[12..20].copy_from_slice(&id.to_le_bytes());
    let check = fnv(&[&s[..20]]);
    s[20..24].copy_from_slice(&check.to_le_bytes());
    s
}

/// What sector 0 holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Header {
    Blank,
    Journal(u64),
    Foreign,
}

pub fn read_header(sector: &[u8]) -> Header {
    if sector.iter().all(|&b| b == 0) {
        return Header::Blank;
    }
    if sector.len() < 24 || &sector[..8] != MAGIC {
        return Header::Foreign;
    }
    let check = u32::from_le_bytes(sector[20..24].try_into().expect("4 bytes"));
    if check != fnv(&[&sector[..20]]) || u32::from_le_bytes(sector[8..12].try_into().expect("4")) != SECTOR as u32 {
        return Header::Foreign;
    }
    Header::Journal(u64::from_le_bytes(sector[12..20].try_into().expect("8 bytes")))
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn payload(record: &Record) -> (u32, Vec<u8>) {
    let mut p = Vec::new();
    let kind = match record {
        Record::Write { path, offset, data } => {
            put_str(&mut p, path);
            p.extend_from_slice(&offset.to_le_bytes());
            p.extend_from_slice(data);
            K_WRITE
        }
        Record::SetLen { path, len } => {
            put_str(&mut p, path);
            p.extend_from_slice(&len.to_le_bytes());
            K_SETLEN
        }
        Record::Rename { from, to } => {
            put_str(&mut p, from);
            put_str(&mut p, to);
            K_RENAME
        }
        Record::Unlink { path } => {
            put_str(&mut p, path);
            K_UNLINK
        }
        Record::Mkdir { path, mode } => {
            put_str(&mut p, path);
            p.extend_from_slice(&mode.to_le_bytes());
            K_MKDIR
        }
        Record::Rmdir { path } => {
            put_str(&mut p, path);
            K_RMDIR
        }
    };
    (kind, p)
}

fn push_record(out: &mut Vec<u8>, id: u64, kind: u32, seq: u64, payload: &[u8]) {
    let mut h = [0u8; 20];
    h[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let check = fnv(&[&id.to_le_bytes(), &h, payload]);
    out.extend_from_slice(&h);
    out.extend_from_slice(&check.to_le_bytes());
    out.extend_from_slice(payload);
}

/// One batch (the records and a COMMIT), padded to whole sectors; `seq` is the next
/// sequence number and comes back advanced.
pub fn encode_batch(id: u64, seq: &mut u64, records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        let (kind, p) = payload(record);
        push_record(&mut out, id, kind, *seq, &p);
        *seq += 1;
    }
    push_record(&mut out, id, K_COMMIT, *seq, &[]);
    *seq += 1;
    out.resize(out.len().div_ceil(SECTOR) * SECTOR, 0);
    out
}

fn get_str(p: &[u8], at: &mut usize) -> Option<String> {
    let len = u32::from_le_bytes(p.get(*at..*at + 4)?.try_into().ok()?) as usize;
    let s = p.get(*at + 4..*at + 4 + len)?;
    *at += 4 + len;
    String::from_utf8(s.to_vec()).ok()
}

fn get_u64(p: &[u8], at: &mut usize) -> Option<u64> {
    let v = u64::from_le_bytes(p.get(*at..*at + 8)?.try_into().ok()?);
    *at += 8;
    Some(v)
}

fn decode_payload(kind: u32, p: &[u8]) -> Option<Record> {
    let mut at = 0;
    Some(match kind {
        K_WRITE => {
            let path = get_str(p, &mut at)?;
            let offset = get_u64(p, &mut at)?;
            Record::Write { path, offset, data: p[at..].to_vec() }
        }
        K_SETLEN => {
            let path = get_str(p, &mut at)?;
            Record::SetLen { path, len: get_u64(p, &mut at)? }
        }
        K_RENAME => Record::Rename { from: get_str(p, &mut at)?, to: get_str(p, &mut at)? },
        K_UNLINK => Record::Unlink { path: get_str(p, &mut at)? },
        K_MKDIR => {
            let path = get_str(p, &mut at)?;
            let mode = u32::from_le_bytes(p.get(at..at + 4)?.try_into().ok()?);
            Record::Mkdir { path, mode }
        }
        K_RMDIR => Record::Rmdir { path: get_str(p, &mut at)? },
        _ => return None,
    })
}

/// The journal read back: committed batches in order, where the next batch goes (bytes
/// from the start of `log`, which begins at sector 1), and the next sequence number.
#[derive(Debug, Default)]
pub struct Replay {
    pub batches: Vec<Vec<Record>>,
    pub end: usize,
    pub seq: u64,
    /// The bytes ran out inside a record (read more of the disk and replay again), rather
    /// than a record failing its checks (the journal's true end).
    pub truncated: bool,
}

/// Reads batches from `log` (the disk from sector 1 on) while they check out.
pub fn replay(id: u64, log: &[u8]) -> Replay {
    let mut r = Replay { batches: Vec::new(), end: 0, seq: 1, truncated: true };
    let mut at = 0;
    let mut batch = Vec::new();
    let mut seq = 1u64;
    while let Some(h) = log.get(at..at + RECORD_HEADER) {
        r.truncated = false;
        let magic = u32::from_le_bytes(h[..4].try_into().expect("4"));
        let kind = u32::from_le_bytes(h[4..8].try_into().expect("4"));
        let rseq = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        let len = u32::from_le_bytes(h[16..20].try_into().expect("4")) as usize;
        let check = u32::from_le_bytes(h[20..24].try_into().expect("4"));
        if magic != RECORD_MAGIC || rseq != seq {
            break;
        }
        let Some(p) = log.get(at + RECORD_HEADER..at + RECORD_HEADER + len) else {
            r.truncated = true;
            break;
        };
        if check != fnv(&[&id.to_le_bytes(), &h[..20], p]) {
            break;
        }
        at += RECORD_HEADER + len;
        seq += 1;
        r.truncated = true;
        if kind == K_COMMIT {
            r.batches.push(core::mem::take(&mut batch));
            at = at.div_ceil(SECTOR) * SECTOR;
            r.end = at;
            r.seq = seq;
            continue;
        }
        match decode_payload(kind, p) {
            Some(record) => batch.push(record),
            None => {
                r.truncated = false;
                break;
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn w(path: &str, offset: u64, data: &[u8]) -> Record {
        Record::Write { path: path.to_string(), offset, data: data.to_vec() }
    }

    #[test]
    fn header_round_trip_and_kinds() {
        assert_eq!(read_header(&header(42)), Header::Journal(42));
        assert_eq!(read_header(&[0; SECTOR]), Header::Blank);
        let mut bad = header(42);
        bad[13] ^= 1;
        assert_eq!(read_header(&bad), Header::Foreign);
        assert_eq!(read_header(b"\x7fELF and the rest of somebody's disk"), Header::Foreign);
    }

    #[test]
    fn batches_replay_in_order() {
        let id = 7;
        let mut seq = 1;
        let b1 = vec![Record::Mkdir { path: "/data/d".into(), mode: 0o755 }, w("/data/a", 0, b"hello")];
        let b2 = vec![
            w("/data/a", 5, b" world"),
            Record::Rename { from: "/data/a".into(), to: "/data/b".into() },
            Record::SetLen { path: "/data/b".into(), len: 3 },
            Record::Unlink { path: "/data/x".into() },
            Record::Rmdir { path: "/data/d".into() },
        ];
        let mut log = encode_batch(id, &mut seq, &b1);
        assert_eq!(log.len() % SECTOR, 0);
        let first_len = log.len();
        log.extend(encode_batch(id, &mut seq, &b2));
        let r = replay(id, &log);
        assert_eq!(r.batches, vec![b1, b2]);
        assert_eq!(r.end, log.len());
        assert_eq!(r.seq, seq);
        assert!(r.truncated, "the bytes ended exactly at a batch's end: more may follow");
        // Cut inside the second batch: truncated (read more), and only the first batch.
        let cut = replay(id, &log[..first_len + 40]);
        assert_eq!(cut.batches.len(), 1);
        assert!(cut.truncated);
        // Zeros after the end are the end.
        let mut padded = log.clone();
        padded.extend_from_slice(&[0; 4096]);
        let r = replay(id, &padded);
        assert_eq!(r.batches.len(), 2);
        assert!(!r.truncated, "zeros end the journal");
    }

    #[test]
    fn a_torn_or_foreign_batch_ends_the_journal() {
        let id = 9;
        let mut seq = 1;
        let mut log = encode_batch(id, &mut seq, &[w("/data/a", 0, b"one")]);
        let first_end = log.len();
        let second = encode_batch(id, &mut seq, &[w("/data/a", 3, &[5; 2000])]);
        // Torn: the second batch's last sector is missing.
        log.extend_from_slice(&second[..second.len() - SECTOR]);
        let r = replay(id, &log);
        assert_eq!(r.batches.len(), 1);
        assert_eq!(r.end, first_end);
        assert_eq!(r.seq, 3);
        // A flipped byte in the payload.
        let mut flipped = encode_batch(id, &mut 1, &[w("/data/a", 0, b"one")]);
        flipped[30] ^= 0x40;
        assert!(replay(id, &flipped).batches.is_empty());
        // Another journal's records (another id) do not check out.
        let other = encode_batch(id + 1, &mut 1, &[w("/data/a", 0, b"one")]);
        assert!(replay(id, &other).batches.is_empty());
    }
}
