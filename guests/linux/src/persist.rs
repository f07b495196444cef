//! The data directory (`/data`, or `linux.data=PATH`) persisted on the virtio disk: a
//! journal of its changes (`linux_abi::journal`) replayed into the RAM file system at boot.
//! A file's new bytes go to the disk at `fsync`/`fdatasync` (one batch, one write and a
//! FLUSH: durable when the call returns); `rename`, `unlink`, `mkdir` and `rmdir` in the
//! directory are journaled at once the same way. Bytes never fsynced are lost at power-off,
//! as with a page cache. When a change does not fit in the journal's half of the disk, the
//! directory's whole state (which already holds the change) is written as the next
//! generation into the other half and becomes the journal when its header sector is down
//! (`linux_abi::journal`); a state that does not fit in half the disk stops the guest
//! (`fatal`: one line, ftvm exit status 3) before the change is acknowledged. A disk
//! formatted before compaction (version 1) is read and written as it was, and never
//! compacted.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use ftvm_guest_kit::println;
use ftvm_guest_kit::virtio::blk::VirtioBlk;
use linux_abi::journal::{self, Header, Record, SECTOR};

use crate::fs::{Fs, Node};

pub struct Disk {
    blk: VirtioBlk,
    /// The disk's id.
    id: u64,
    /// The journal's generation; 0 for a version-1 disk (never compacted).
    gen: u64,
    region: u32,
    /// The id its records check out against.
    journal_id: u64,
    /// The journal's sectors: [start, end).
    start: u64,
    end: u64,
    seq: u64,
    /// Sector where the next batch goes.
    next: u64,
    capacity: u64,
    pub dir: String,
}

/// A compacted file goes to the disk in batches of at most this many bytes.
const COMPACT_CHUNK: usize = 1 << 20;

const CHUNK: usize = 4 << 20;
const EIO: i64 = 5;

fn apply(fs: &mut Fs, record: &Record, now: u64) {
    let file = |fs: &mut Fs, path: &str| -> Node {
        match fs.get(path) {
            Some(node) => node,
            None => {
                fs.make_parents(path, now);
                fs.add(path, crate::fs::S_IFREG | 0o644, crate::fs::Data::Ram(Vec::new()), now)
            }
        }
    };
    match record {
        Record::Write { path, offset, data } => {
            let node = file(fs, path);
            let mut n = node.borrow_mut();
            let bytes = n.ram();
            let end = *offset as usize + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[*offset as usize..end].copy_from_slice(data);
        }
        Record::SetLen { path, len } => {
            let node = file(fs, path);
            node.borrow_mut().ram().resize(*len as usize, 0);
        }
        Record::Rename { from, to } => {
            let _ = fs.rename(from, to);
        }
        Record::Unlink { path } => {
            let _ = fs.unlink(path, false);
        }
        Record::Rmdir { path } => {
            let _ = fs.unlink(path, true);
        }
        Record::Mkdir { path, mode } => {
            fs.make_parents(path, now);
            let _ = fs.mkdir(path, *mode, now);
        }
    }
}

/// The entries below `prefix` (a directory's path and `/`), in path order: parents first.
fn under<'a>(fs: &'a Fs, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a Node)> {
    let from = (core::ops::Bound::Included(prefix), core::ops::Bound::Unbounded);
    fs.nodes.range::<str, _>(from).take_while(move |(path, _)| path.starts_with(prefix))
}

impl Disk {
    /// Opens (or formats a blank) data disk and replays it into `fs`. A disk that holds
    /// something else is refused (never overwritten).
    pub fn open(mut blk: VirtioBlk, new_id: u64, fs: &mut Fs, dir: &str, now: u64) -> Result<Disk, String> {
        let capacity = blk.capacity();
        if capacity < 16 {
            return Err(alloc::format!("the data disk has {capacity} sectors: too small"));
        }
        let mut first = vec![0u8; journal::PROBE];
        blk.read(0, &mut first).map_err(|e| alloc::format!("reading the data disk: {e}"))?;
        // (disk id, generation, region, journal sectors, journal id)
        let (id, gen, region, (start, end), journal_id) = match journal::read_header(&first) {
            Header::Foreign => {
                return Err("the data disk holds something else (no FTVMLXJ header): refusing to overwrite it".into())
            }
            Header::Blank => {
                if blk.read_only() {
                    return Err("the data disk is blank and read-only".into());
                }
                blk.write_durable(journal::slot_of(1), &journal::header_v2(new_id, 1, 0))
                    .map_err(|e| alloc::format!("formatting the data disk: {e}"))?;
                println!("linux: formatted a blank data disk ({} MiB) for {dir}", (capacity * SECTOR as u64) >> 20);
                (new_id, 1, 0, journal::region(capacity, 0), journal::generation_id(new_id, 1))
            }
            Header::Journal(id) => (id, 0, 0, (1, capacity), id),
            Header::Generation { id, gen, region } => {
                (id, gen, region, journal::region(capacity, region), journal::generation_id(id, gen))
            }
        };
        let mut log: Vec<u8> = Vec::new();
        let max = ((end - start) as usize) * SECTOR;
        let replay = loop {
            let at = log.len();
            let len = CHUNK.min(max - at);
            if len == 0 {
                break journal::replay(journal_id, &log);
            }
            log.resize(at + len, 0);
            blk.read(start + (at / SECTOR) as u64, &mut log[at..])
                .map_err(|e| alloc::format!("reading the data disk: {e}"))?;
            let replay = journal::replay(journal_id, &log);
            // Stop at the journal's end (not merely the end of what was read).
            if !replay.truncated || log.len() >= max {
                break replay;
            }
        };
        drop(log);
        let records: usize = replay.batches.iter().map(Vec::len).sum();
        for batch in &replay.batches {
            for record in batch {
                apply(fs, record, now);
            }
        }
        // What the journal holds is synced.
        let prefix = alloc::format!("{dir}/");
        let mut files = 0;
        for (_, node) in under(fs, &prefix) {
            node.borrow_mut().mark_on_disk();
            files += 1;
        }
        println!(
            "linux: {dir} on the virtio disk: {files} entries from {} batches ({records} records, {} KiB of journal)",
            replay.batches.len(),
            replay.end >> 10
        );
        Ok(Disk {
            blk,
            id,
            gen,
            region,
            journal_id,
            start,
            end,
            seq: replay.seq,
            next: start + (replay.end / SECTOR) as u64,
            capacity,
            dir: String::from(dir),
        })
    }

    pub fn covers(&self, path: &str) -> bool {
        path.len() > self.dir.len() && path.starts_with(self.dir.as_str()) && path.as_bytes()[self.dir.len()] == b'/'
    }

    /// Writes one batch durably, after a change to `fs` (which already holds it). Err(EIO)
    /// when the disk fails; a batch that does not fit is compacted away, or stops the guest.
    pub fn commit(&mut self, fs: &Fs, records: &[Record]) -> Result<(), i64> {
        let mut seq = self.seq;
        let batch = journal::encode_batch(self.journal_id, &mut seq, records);
        let sectors = (batch.len() / SECTOR) as u64;
        if self.next + sectors > self.end {
            if self.gen > 0 {
                return self.compact(fs);
            }
            self.full(sectors * SECTOR as u64);
        }
        if let Err(error) = self.blk.write_durable(self.next, &batch) {
            println!("linux: data disk write failed: {error}");
            return Err(EIO);
        }
        self.next += sectors;
        self.seq = seq;
        Ok(())
    }

    /// Nothing of the change was acknowledged (the call has not returned), and everything
    /// before it is on the disk: stop here rather than serve what cannot last.
    fn full(&self, needs: u64) -> ! {
        crate::fatal(&alloc::format!(
            "the data disk is full ({} KiB journaled, this change needs {} KiB more): stopping; {} is intact up to the last fsync",
            ((self.next - self.start) * SECTOR as u64) >> 10,
            needs >> 10,
            self.dir
        ));
    }

    /// Writes the data directory's state as the next generation into the other region and
    /// switches to it with one header sector; until then the current one stays the journal.
    fn compact(&mut self, fs: &Fs) -> Result<(), i64> {
        let gen = self.gen + 1;
        let region = self.region ^ 1;
        let (start, end) = journal::region(self.capacity, region);
        let journal_id = journal::generation_id(self.id, gen);
        let (mut seq, mut next) = (1, start);
        let prefix = alloc::format!("{}/", self.dir);
        for (path, node) in under(fs, &prefix) {
            let n = node.borrow();
            let mut batches: Vec<Vec<Record>> = Vec::new();
            if n.is_dir() {
                batches.push(vec![Record::Mkdir { path: path.clone(), mode: n.mode & 0o7777 }]);
            } else if n.mode & crate::fs::S_IFMT == crate::fs::S_IFREG {
                let bytes = n.bytes();
                batches.push(vec![Record::SetLen { path: path.clone(), len: 0 }]);
                for (i, chunk) in bytes.chunks(COMPACT_CHUNK).enumerate() {
                    let offset = (i * COMPACT_CHUNK) as u64;
                    batches.push(vec![Record::Write { path: path.clone(), offset, data: chunk.to_vec() }]);
                }
            }
            for records in &batches {
                let batch = journal::encode_batch(journal_id, &mut seq, records);
                let sectors = (batch.len() / SECTOR) as u64;
                if next + sectors > end {
                    crate::fatal(&alloc::format!(
                        "the data disk is full: {} needs more than half of it ({} KiB) to compact into; stopping; it is intact up to the last fsync",
                        self.dir,
                        ((end - start) * SECTOR as u64) >> 10
                    ));
                }
                self.blk.write(next, &batch).map_err(|error| {
                    println!("linux: data disk write failed while compacting: {error}");
                    EIO
                })?;
                next += sectors;
            }
        }
        let header = journal::header_v2(self.id, gen, region);
        let done = self.blk.flush().and_then(|()| self.blk.write_durable(journal::slot_of(gen), &header));
        if let Err(error) = done {
            println!("linux: data disk write failed while compacting: {error}");
            return Err(EIO);
        }
        println!(
            "linux: compacted the journal of {}: {} KiB into {} KiB (generation {gen})",
            self.dir,
            ((self.next - self.start) * SECTOR as u64) >> 10,
            ((next - start) * SECTOR as u64) >> 10
        );
        (self.gen, self.region, self.journal_id, self.start, self.end) = (gen, region, journal_id, start, end);
        (self.seq, self.next) = (seq, next);
        // Everything in the directory is on the disk now.
        for (_, node) in under(fs, &prefix) {
            node.borrow_mut().mark_on_disk();
        }
        Ok(())
    }

    /// `fsync` of `node` (at `path`): its new bytes since the last one.
    pub fn sync_file(&mut self, fs: &Fs, path: &str, node: &Node) -> Result<(), i64> {
        let records = {
            let n = node.borrow();
            let bytes = n.bytes();
            let len = bytes.len() as u64;
            if n.dirty_below || len < n.synced {
                vec![
                    Record::SetLen { path: path.into(), len: 0 },
                    Record::Write { path: path.into(), offset: 0, data: bytes.to_vec() },
                ]
            } else if len > n.synced {
                vec![Record::Write { path: path.into(), offset: n.synced, data: bytes[n.synced as usize..].to_vec() }]
            } else if !n.on_disk {
                vec![Record::SetLen { path: path.into(), len }]
            } else {
                return Ok(());
            }
        };
        self.commit(fs, &records)?;
        node.borrow_mut().mark_on_disk();
        Ok(())
    }
}
