//! The data disk's format: a journal of file-system changes under the data directory,
//! written at `fsync`/`fdatasync` (the file's new bytes) and at each `rename`, `unlink`,
//! `mkdir` and `rmdir` there, and replayed into the RAM file system at boot; compacted
//! when it fills its half of the disk.
//!
//! Little-endian, 512-byte sectors. **Version 2** (`FTVMLXJ2`, every disk formatted now):
//! sectors 0 and 1 are two header slots, each: magic, sector size u32 = 512, disk id u64
//! (random per formatted disk), generation u64 (1, 2, ...), region u32 (0 or 1), check u32
//! over the bytes before it. The valid slot with the higher generation is the journal's;
//! generation g is written to slot g % 2, so a torn header write leaves the other one. The
//! rest of the disk is two regions of equal size, and a generation's journal fills its
//! region from the start. Compaction writes the data directory's whole state as the next
//! generation into the other region, flushes, then writes its header: until that one
//! sector is down, the old generation is the journal, untouched.
//!
//! A journal is batches, each starting on a sector boundary and zero-padded to one:
//! records, then a COMMIT record. A record: magic u32 `LXR1`, kind u32, seq u64 (1, 2, ...
//! over the generation, COMMITs included), len u32, check u32 (FNV-1a over the journal id,
//! the 20 header bytes before it and the payload, folded to 32 bits), payload. The journal
//! id is the generation's ([`generation_id`]), so an older generation's records left in a
//! region never check out. Replay applies a batch only when its COMMIT checks out; the
//! first bad record ends the journal (a torn last batch, never acknowledged, is dropped and
//! later batches overwrite it).
//!
//! **Version 1** (`FTVMLXJ1`, read for disks formatted before): one header in sector 0
//! (magic, sector size, id, check) and one journal from sector 1 to the end of the disk,
//! with the disk id as journal id; it is never compacted.

use alloc::string::String;
use alloc::vec::Vec;

pub const SECTOR: usize = 512;
const MAGIC: &[u8; 8] = b"FTVMLXJ1";
const MAGIC2: &[u8; 8] = b"FTVMLXJ2";
/// Sectors before the two regions of a version-2 disk (its header slots).
pub const HEADER_SECTORS: u64 = 2;
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

/// A version-1 header sector (disks formatted before compaction; kept for tests of the
/// reading path).
pub fn header(id: u64) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    s[..8].copy_from_slice(MAGIC);
    s[8..12].copy_from_slice(&(SECTOR as u32).to_le_bytes());
    s[12..20].copy_from_slice(&id.to_le_bytes());
    let check = fnv(&[&s[..20]]);
    s[20..24].copy_from_slice(&check.to_le_bytes());
    s
}

/// A version-2 header slot: generation `gen` of disk `id`, its journal in `region`.
pub fn header_v2(id: u64, gen: u64, region: u32) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    s[..8].copy_from_slice(MAGIC2);
    s[8..12].copy_from_slice(&(SECTOR as u32).to_le_bytes());
    s[12..20].copy_from_slice(&id.to_le_bytes());
    s[20..28].copy_from_slice(&gen.to_le_bytes());
    s[28..32].copy_from_slice(&region.to_le_bytes());
    let check = fnv(&[&s[..32]]);
    s[32..36].copy_from_slice(&check.to_le_bytes());
    s
}

/// The slot a generation's header goes to (0 or 1).
pub fn slot_of(gen: u64) -> u64 {
    gen % 2
}

/// The journal id of generation `gen` of disk `id`: records of another generation (or
/// another disk) never check out against it.
pub fn generation_id(id: u64, gen: u64) -> u64 {
    id ^ gen.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The sectors of region 0 or 1 of a version-2 disk of `capacity` sectors: [start, end).
pub fn region(capacity: u64, which: u32) -> (u64, u64) {
    let half = capacity.saturating_sub(HEADER_SECTORS) / 2;
    let start = HEADER_SECTORS + u64::from(which.min(1)) * half;
    (start, start + half)
}

/// What the header sectors hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Header {
    Blank,
    /// Version 1: the disk id; the journal runs from sector 1 to the end.
    Journal(u64),
    /// Version 2: the current generation.
    Generation {
        id: u64,
        gen: u64,
        region: u32,
    },
    Foreign,
}

fn read_v1(sector: &[u8]) -> Option<u64> {
    if sector.len() < 24 || &sector[..8] != MAGIC {
        return None;
    }
    let check = u32::from_le_bytes(sector[20..24].try_into().ok()?);
    let size = u32::from_le_bytes(sector[8..12].try_into().ok()?);
    (check == fnv(&[&sector[..20]]) && size == SECTOR as u32)
        .then(|| u64::from_le_bytes(sector[12..20].try_into().expect("8 bytes")))
}

fn read_v2(sector: &[u8]) -> Option<(u64, u64, u32)> {
    if sector.len() < 36 || &sector[..8] != MAGIC2 {
        return None;
    }
    let word = |at: usize| u32::from_le_bytes(sector[at..at + 4].try_into().expect("4 bytes"));
    let long = |at: usize| u64::from_le_bytes(sector[at..at + 8].try_into().expect("8 bytes"));
    let (size, region, check) = (word(8), word(28), word(32));
    (check == fnv(&[&sector[..32]]) && size == SECTOR as u32 && region <= 1 && long(20) > 0)
        .then(|| (long(12), long(20), region))
}

/// How much of the disk's start [`read_header`] looks at: a disk counts as blank only when
/// all of it is zeros (a file system whose first sectors are zeros, ext4's, has its
/// superblock at 1 KiB).
pub const PROBE: usize = 8 * SECTOR;

/// The journal named by the disk's first sectors (`first`: at least two sectors, [`PROBE`]
/// bytes to tell a blank disk). Sector 1 is ignored by a version-1 disk, whose journal
/// starts there.
pub fn read_header(first: &[u8]) -> Header {
    let (slot0, slot1) = (&first[..SECTOR.min(first.len())], first.get(SECTOR..2 * SECTOR).unwrap_or(&[]));
    if let Some(id) = read_v1(slot0) {
        return Header::Journal(id);
    }
    match [read_v2(slot0), read_v2(slot1)].iter().flatten().max_by_key(|(_, gen, _)| *gen) {
        Some(&(id, gen, region)) => Header::Generation { id, gen, region },
        None => {
            // Blank: zeros, or zeros and the torn header of a format that never finished
            // (generation 1 goes to slot 1).
            let torn_format = slot1.starts_with(MAGIC2);
            let zeros = |bytes: &[u8]| bytes.iter().all(|&b| b == 0);
            let rest = first.get(2 * SECTOR..).unwrap_or(&[]);
            if zeros(slot0) && (zeros(slot1) || torn_format) && zeros(rest) {
                Header::Blank
            } else {
                Header::Foreign
            }
        }
    }
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

    fn first(slot0: &[u8], slot1: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; PROBE];
        out[..slot0.len()].copy_from_slice(slot0);
        out[SECTOR..SECTOR + slot1.len()].copy_from_slice(slot1);
        out
    }

    #[test]
    fn header_round_trip_and_kinds() {
        let blank = [0u8; SECTOR];
        assert_eq!(read_header(&first(&header(42), &blank)), Header::Journal(42));
        assert_eq!(read_header(&first(&blank, &blank)), Header::Blank);
        let mut bad = header(42);
        bad[13] ^= 1;
        assert_eq!(read_header(&first(&bad, &blank)), Header::Foreign);
        assert_eq!(read_header(&first(b"\x7fELF and the rest of somebody's disk", &blank)), Header::Foreign);
        // A version-1 journal's first batch in sector 1 is not a header slot.
        assert_eq!(read_header(&first(&header(42), &header_v2(42, 9, 1))), Header::Journal(42));
        // Zeros where the header goes but a superblock at 1 KiB (ext4): not blank.
        let mut ext4 = first(&blank, &blank);
        ext4[1024 + 56] = 0x53;
        ext4[1024 + 57] = 0xef;
        assert_eq!(read_header(&ext4), Header::Foreign);
    }

    #[test]
    fn the_newer_valid_slot_is_the_journal_and_a_torn_one_leaves_the_other() {
        let blank = [0u8; SECTOR];
        let g1 = header_v2(5, 1, 0);
        assert_eq!(slot_of(1), 1);
        assert_eq!(read_header(&first(&blank, &g1)), Header::Generation { id: 5, gen: 1, region: 0 });
        let g2 = header_v2(5, 2, 1);
        assert_eq!(slot_of(2), 0);
        assert_eq!(read_header(&first(&g2, &g1)), Header::Generation { id: 5, gen: 2, region: 1 });
        // Generation 3 torn while being written over generation 1's slot.
        let mut torn = header_v2(5, 3, 0);
        torn[40..].fill(0xaa);
        torn[30] ^= 1;
        assert_eq!(read_header(&first(&g2, &torn)), Header::Generation { id: 5, gen: 2, region: 1 });
        // A format torn in slot 1 of a blank disk: still blank; any other bytes: foreign.
        assert_eq!(read_header(&first(&blank, &torn)), Header::Blank);
        let mut foreign = blank;
        foreign[0] = 1;
        assert_eq!(read_header(&first(&foreign, &blank)), Header::Foreign);
        let mut junk = blank;
        junk[7] = 9;
        assert_eq!(read_header(&first(&blank, &junk)), Header::Foreign);
    }

    #[test]
    fn regions_halve_the_disk_after_the_header_slots() {
        assert_eq!(region(1002, 0), (2, 502));
        assert_eq!(region(1002, 1), (502, 1002));
        assert_eq!(region(1003, 1), (502, 1002), "an odd sector is left over");
        assert_ne!(generation_id(5, 1), generation_id(5, 2));
        // Another generation's records do not check out.
        let mut seq = 1;
        let old = encode_batch(generation_id(5, 1), &mut seq, &[w("/data/a", 0, b"one")]);
        assert!(replay(generation_id(5, 3), &old).batches.is_empty());
        assert_eq!(replay(generation_id(5, 1), &old).batches.len(), 1);
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
