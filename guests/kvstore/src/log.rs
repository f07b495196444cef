//! The append-only log on the virtio disk that makes kvstore durable.
//!
//! Layout (all integers little-endian, 512-byte sectors):
//!
//! ```text
//! sector 0: header   0 magic "FTVMKVLG" | 8 version u32 = 1 | 12 sector size u32 = 512
//!                    16 log id u64 | 24 crc32c u32 of bytes 0..24 | zero to the sector end
//! sector 1 on: batches, each starting on a sector boundary and padded with zeros to one:
//!   record           0 magic u32 "KVR1" | 4 kind u32 | 8 seq u64 | 16 len u32
//!                    20 crc32c u32 of (log id, bytes 0..20, payload) | 24 payload (len bytes)
//! ```
//!
//! Record kinds: 1 SET (payload: count u32, then count x (klen u32, key, vlen u32, value);
//! SET, MSET, and INCR as the value it produced), 2 DEL (count u32, count x (klen u32,
//! key): the keys that existed), 3 FLUSHALL (empty), and 4 COMMIT (empty), which ends every
//! batch. Sequence numbers run 1, 2, 3, ... across the whole log, COMMIT records included.
//!
//! One batch is one disk write (then a FLUSH when the device has a write cache), holding
//! the writes of every command processed in one server round (group commit); the replies
//! to those commands are sent only after it completed. Recovery reads batches from sector
//! 1 and applies a batch only once its COMMIT record checks out: the first bad magic, bad
//! checksum, unexpected sequence number or record running past the disk ends the log, and
//! the unfinished batch before it (a torn last write, never acknowledged) is dropped. The
//! log id, random per formatted disk, is in every record's checksum, so records left on
//! the disk by an earlier log never pass for this one's. There is no compaction: the log
//! grows until the disk is full, and writes then fail with an error reply.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use ftvm_guest_kit::virtio::blk::{BlkError, VirtioBlk, SECTOR_SIZE};

const MAGIC: &[u8; 8] = b"FTVMKVLG";
const VERSION: u32 = 1;
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"KVR1");
/// Size of a record header.
pub const RECORD_HEADER: usize = 24;
const SECTOR: u64 = SECTOR_SIZE as u64;
/// Disk bytes read per request during recovery.
const READ_CHUNK: usize = 256 << 10;

pub const KIND_SET: u32 = 1;
pub const KIND_DEL: u32 = 2;
pub const KIND_FLUSHALL: u32 = 3;
const KIND_COMMIT: u32 = 4;

/// CRC-32C (Castagnoli), reflected, table-driven (no SSE4.2 assumed).
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// Continues a CRC-32C over `data` (start with `!0`, finish with `!`).
fn crc_update(mut crc: u32, data: &[u8]) -> u32 {
    for &byte in data {
        crc = CRC_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

fn crc32c(data: &[u8]) -> u32 {
    !crc_update(!0, data)
}

fn record_crc(log_id: u64, header: &[u8], payload: &[u8]) -> u32 {
    let crc = crc_update(!0, &log_id.to_le_bytes());
    let crc = crc_update(crc, &header[..20]);
    !crc_update(crc, payload)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// A change recorded in the log, as recovery hands it back.
pub enum Change<'a> {
    Set(&'a [u8], &'a [u8]),
    Del(&'a [u8]),
    FlushAll,
}

/// What recovery found.
pub struct Recovery {
    /// Records applied (COMMIT records not counted).
    pub records: u64,
    /// Complete batches applied.
    pub batches: u64,
    /// Whether the disk was blank and has just been formatted.
    pub formatted: bool,
    /// Bytes of log in use (header included).
    pub end: u64,
}

/// Log counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub commits: u64,
    pub records: u64,
    pub bytes: u64,
}

/// The open log: where the next batch goes and the batch being built.
pub struct Log {
    blk: VirtioBlk,
    log_id: u64,
    next_seq: u64,
    /// Byte offset of the next batch (sector-aligned).
    end: u64,
    capacity: u64,
    batch: Vec<u8>,
    stats: Stats,
}

/// Recovery's view of the disk: a window of bytes read ahead in large requests.
struct Reader<'a> {
    blk: &'a mut VirtioBlk,
    buf: Vec<u8>,
    /// Disk offset of `buf[0]` (sector-aligned).
    start: u64,
    capacity: u64,
}

impl Reader<'_> {
    /// The bytes at [offset, offset + len), reading ahead as needed; `None` past the disk.
    fn get(&mut self, offset: u64, len: usize) -> Result<Option<&[u8]>, BlkError> {
        let end = offset.checked_add(len as u64).filter(|&end| end <= self.capacity);
        let Some(end) = end else { return Ok(None) };
        while self.start + (self.buf.len() as u64) < end {
            let have = self.start + self.buf.len() as u64;
            let want = (end - have).max(READ_CHUNK as u64).min(self.capacity - have);
            let want = want.div_ceil(SECTOR) * SECTOR;
            let old = self.buf.len();
            self.buf.resize(old + want as usize, 0);
            self.blk.read(have / SECTOR, &mut self.buf[old..])?;
        }
        let from = (offset - self.start) as usize;
        Ok(Some(&self.buf[from..from + len]))
    }

    /// Forgets the bytes before `offset` (a sector boundary).
    fn discard_before(&mut self, offset: u64) {
        let count = ((offset - self.start) as usize).min(self.buf.len());
        self.buf.drain(..count);
        self.start += count as u64;
    }
}

/// A cursor over a record's payload.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if len > self.bytes.len() {
            return None;
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A length-prefixed byte string.
    fn field(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

/// Decodes one record's payload into changes; `None` if it is malformed.
fn decode(kind: u32, payload: &[u8], apply: &mut impl FnMut(Change)) -> Option<()> {
    let mut cursor = Cursor { bytes: payload };
    match kind {
        KIND_FLUSHALL => apply(Change::FlushAll),
        KIND_SET | KIND_DEL => {
            for _ in 0..cursor.u32()? {
                let key = cursor.field()?;
                if kind == KIND_SET {
                    apply(Change::Set(key, cursor.field()?));
                } else {
                    apply(Change::Del(key));
                }
            }
        }
        _ => return None,
    }
    cursor.bytes.is_empty().then_some(())
}

impl Log {
    /// Opens the log on `blk`: formats a blank disk (first sector all zero) with `new_id`,
    /// or replays an existing log through `apply`. A disk holding anything else is
    /// refused rather than overwritten.
    pub fn open(mut blk: VirtioBlk, new_id: u64, mut apply: impl FnMut(Change)) -> Result<(Log, Recovery), String> {
        let capacity = blk.capacity() * SECTOR;
        if capacity < 2 * SECTOR {
            return Err(String::from("disk too small for a log"));
        }
        let mut header = alloc::vec![0u8; SECTOR_SIZE];
        blk.read(0, &mut header).map_err(|e| format_err("reading the log header", e))?;
        if header.iter().all(|&b| b == 0) {
            if blk.read_only() {
                return Err(String::from("blank read-only disk: nothing to recover, nowhere to log"));
            }
            header[..8].copy_from_slice(MAGIC);
            header[8..12].copy_from_slice(&VERSION.to_le_bytes());
            header[12..16].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
            header[16..24].copy_from_slice(&new_id.to_le_bytes());
            let crc = crc32c(&header[..24]);
            header[24..28].copy_from_slice(&crc.to_le_bytes());
            blk.write_durable(0, &header).map_err(|e| format_err("writing the log header", e))?;
            let log = Log::new(blk, new_id, 1, SECTOR, capacity);
            return Ok((log, Recovery { records: 0, batches: 0, formatted: true, end: SECTOR }));
        }
        if &header[..8] != MAGIC || crc32c(&header[..24]) != u32_at(&header, 24) {
            return Err(String::from("the disk holds something that is not a kvstore log; refusing to overwrite it"));
        }
        let version = u32_at(&header, 8);
        if version != VERSION || u32_at(&header, 12) != SECTOR_SIZE as u32 {
            return Err(alloc::format!("unsupported log version {version}"));
        }
        let log_id = u64_at(&header, 16);
        let (recovery, next_seq) = Self::replay(&mut blk, log_id, capacity, &mut apply)?;
        let log = Log::new(blk, log_id, next_seq, recovery.end, capacity);
        Ok((log, recovery))
    }

    fn new(blk: VirtioBlk, log_id: u64, next_seq: u64, end: u64, capacity: u64) -> Log {
        Log { blk, log_id, next_seq, end, capacity, batch: Vec::new(), stats: Stats::default() }
    }

    /// Reads batches from sector 1 until the log ends; returns what it applied and the
    /// next sequence number.
    fn replay(
        blk: &mut VirtioBlk,
        log_id: u64,
        capacity: u64,
        apply: &mut impl FnMut(Change),
    ) -> Result<(Recovery, u64), String> {
        let mut reader = Reader { blk, buf: Vec::new(), start: SECTOR, capacity };
        let mut recovery = Recovery { records: 0, batches: 0, formatted: false, end: SECTOR };
        let mut seq = 1;
        // Records of the batch being read: (kind, payload offset, payload length).
        let mut pending: Vec<(u32, u64, usize)> = Vec::new();
        let mut pos = SECTOR;
        loop {
            let read = |e| format_err("reading the log", e);
            let Some(header) = reader.get(pos, RECORD_HEADER).map_err(read)? else { break };
            let header: [u8; RECORD_HEADER] = header.try_into().unwrap();
            let len = u32_at(&header, 16) as usize;
            if u32_at(&header, 0) != RECORD_MAGIC || u64_at(&header, 8) != seq {
                break;
            }
            let Some(payload) = reader.get(pos + RECORD_HEADER as u64, len).map_err(read)? else { break };
            if record_crc(log_id, &header, payload) != u32_at(&header, 20) {
                break;
            }
            let kind = u32_at(&header, 4);
            seq += 1;
            pos += (RECORD_HEADER + len) as u64;
            if kind != KIND_COMMIT {
                pending.push((kind, pos - len as u64, len));
                continue;
            }
            // A complete batch: apply it, then go on at the next sector boundary.
            for &(kind, offset, len) in &pending {
                let payload = reader.get(offset, len).map_err(read)?.expect("read before");
                if decode(kind, payload, apply).is_none() {
                    return Err(alloc::format!("malformed record of kind {kind} at byte {offset} (checksum good)"));
                }
            }
            recovery.records += pending.len() as u64;
            recovery.batches += 1;
            pending.clear();
            pos = pos.div_ceil(SECTOR) * SECTOR;
            recovery.end = pos;
            reader.discard_before(pos);
        }
        // `seq` may have run past an unfinished batch: restart numbering after the last
        // complete one, whose COMMIT was number `seq - 1 - pending.len()`.
        Ok((recovery, seq - pending.len() as u64))
    }

    /// Whether a record with a `payload`-byte payload still fits on the disk (with the
    /// batch so far, its COMMIT record and padding).
    pub fn has_room(&self, payload: usize) -> bool {
        let need = self.batch.len() + 2 * RECORD_HEADER + payload + SECTOR_SIZE;
        self.end + need as u64 <= self.capacity
    }

    /// Whether the disk refuses writes.
    pub fn read_only(&self) -> bool {
        self.blk.read_only()
    }

    /// Starts a record of `kind`; fill its payload with `push_*`, then `end_record`.
    pub fn begin_record(&mut self, kind: u32) -> usize {
        let at = self.batch.len();
        self.batch.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        self.batch.extend_from_slice(&kind.to_le_bytes());
        self.batch.extend_from_slice(&self.next_seq.to_le_bytes());
        self.batch.extend_from_slice(&[0; 8]); // len and crc, set by end_record
        self.next_seq += 1;
        at
    }

    /// Appends a u32 to the record being built.
    pub fn push_u32(&mut self, value: u32) {
        self.batch.extend_from_slice(&value.to_le_bytes());
    }

    /// Appends a length-prefixed byte string to the record being built.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        self.push_u32(bytes.len() as u32);
        self.batch.extend_from_slice(bytes);
    }

    /// Finishes the record that `begin_record` returned `at` for.
    pub fn end_record(&mut self, at: usize) {
        let len = (self.batch.len() - at - RECORD_HEADER) as u32;
        self.batch[at + 16..at + 20].copy_from_slice(&len.to_le_bytes());
        let (head, payload) = self.batch[at..].split_at(RECORD_HEADER);
        let crc = record_crc(self.log_id, head, payload);
        self.batch[at + 20..at + 24].copy_from_slice(&crc.to_le_bytes());
        self.stats.records += 1;
    }

    /// Whether records wait to be committed.
    pub fn dirty(&self) -> bool {
        !self.batch.is_empty()
    }

    /// Writes the batch (with its COMMIT record, padded to a sector) in one disk write and
    /// flushes: when this returns Ok, every record in it is durable.
    pub fn commit(&mut self) -> Result<(), BlkError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let at = self.begin_record(KIND_COMMIT);
        self.end_record(at);
        self.stats.records -= 1;
        let padded = self.batch.len().div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        self.batch.resize(padded, 0);
        let result = self.blk.write_durable(self.end / SECTOR, &self.batch);
        self.stats.commits += 1;
        self.stats.bytes += padded as u64;
        self.end += padded as u64;
        self.batch.clear();
        result
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The disk driver's counters.
    pub fn blk_stats(&self) -> ftvm_guest_kit::virtio::blk::Stats {
        self.blk.stats()
    }

    /// Bytes of log in use and the disk's size.
    pub fn usage(&self) -> (u64, u64) {
        (self.end, self.capacity)
    }
}

fn format_err(what: &str, error: BlkError) -> String {
    let mut text = String::new();
    let _ = write!(text, "{what}: {error}");
    text
}
