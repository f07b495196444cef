//! The data directory (`/data`, or `linux.data=PATH`) persisted on the virtio disk: a
//! journal of its changes (`linux_abi::journal`) replayed into the RAM file system at boot.
//! A file's new bytes go to the disk at `fsync`/`fdatasync` (one batch, one write and a
//! FLUSH: durable when the call returns); `rename`, `unlink`, `mkdir` and `rmdir` in the
//! directory are journaled at once the same way. Bytes never fsynced are lost at power-off,
//! as with a page cache. No compaction yet: a full disk stops the guest (`fatal`: one line,
//! ftvm exit status 3) before the change that does not fit is acknowledged.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use ftvm_guest_kit::println;
use ftvm_guest_kit::virtio::blk::VirtioBlk;
use linux_abi::journal::{self, Header, Record, SECTOR};

use crate::fs::{Fs, Node};

pub struct Disk {
    blk: VirtioBlk,
    id: u64,
    seq: u64,
    /// Sector where the next batch goes.
    next: u64,
    capacity: u64,
    pub dir: String,
}

const CHUNK: usize = 4 << 20;

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

impl Disk {
    /// Opens (or formats a blank) data disk and replays it into `fs`. A disk that holds
    /// something else is refused (never overwritten).
    pub fn open(mut blk: VirtioBlk, new_id: u64, fs: &mut Fs, dir: &str, now: u64) -> Result<Disk, String> {
        let capacity = blk.capacity();
        if capacity < 16 {
            return Err(alloc::format!("the data disk has {capacity} sectors: too small"));
        }
        let mut sector0 = vec![0u8; SECTOR];
        blk.read(0, &mut sector0).map_err(|e| alloc::format!("reading the data disk: {e}"))?;
        let (id, replay) = match journal::read_header(&sector0) {
            Header::Foreign => {
                return Err("the data disk holds something else (no FTVMLXJ1 header): refusing to overwrite it".into())
            }
            Header::Blank => {
                if blk.read_only() {
                    return Err("the data disk is blank and read-only".into());
                }
                blk.write_durable(0, &journal::header(new_id))
                    .map_err(|e| alloc::format!("formatting the data disk: {e}"))?;
                println!("linux: formatted a blank data disk ({} MiB) for {dir}", (capacity * SECTOR as u64) >> 20);
                (new_id, journal::Replay { batches: Vec::new(), end: 0, seq: 1, truncated: false })
            }
            Header::Journal(id) => {
                let mut log: Vec<u8> = Vec::new();
                let max = ((capacity - 1) as usize) * SECTOR;
                let replay = loop {
                    let start = log.len();
                    let len = CHUNK.min(max - start);
                    log.resize(start + len, 0);
                    blk.read(1 + (start / SECTOR) as u64, &mut log[start..])
                        .map_err(|e| alloc::format!("reading the data disk: {e}"))?;
                    let replay = journal::replay(id, &log);
                    // Stop at the journal's end (not merely the end of what was read).
                    if !replay.truncated || log.len() >= max {
                        break replay;
                    }
                };
                (id, replay)
            }
        };
        let records: usize = replay.batches.iter().map(Vec::len).sum();
        for batch in &replay.batches {
            for record in batch {
                apply(fs, record, now);
            }
        }
        // What the journal holds is synced.
        let prefix = alloc::format!("{dir}/");
        let mut files = 0;
        for (path, node) in fs.nodes.iter() {
            if path.starts_with(&prefix) {
                let mut n = node.borrow_mut();
                n.synced = n.size();
                n.on_disk = true;
                files += 1;
            }
        }
        println!(
            "linux: {dir} on the virtio disk: {files} entries from {} batches ({records} records, {} KiB of journal)",
            replay.batches.len(),
            replay.end >> 10
        );
        Ok(Disk { blk, id, seq: replay.seq, next: 1 + (replay.end / SECTOR) as u64, capacity, dir: String::from(dir) })
    }

    pub fn covers(&self, path: &str) -> bool {
        path.len() > self.dir.len() && path.starts_with(self.dir.as_str()) && path.as_bytes()[self.dir.len()] == b'/'
    }

    /// Writes one batch durably. Err(EIO) when the disk fails; a batch that does not fit
    /// stops the guest.
    pub fn commit(&mut self, records: &[Record]) -> Result<(), i64> {
        let mut seq = self.seq;
        let batch = journal::encode_batch(self.id, &mut seq, records);
        let sectors = (batch.len() / SECTOR) as u64;
        if self.next + sectors > self.capacity {
            // Nothing of this batch was acknowledged (the call has not returned), and every
            // batch before it is on the disk: stop here rather than serve what cannot last.
            crate::fatal(&alloc::format!(
                "the data disk is full ({} KiB journaled, this change needs {} KiB more): stopping; {} is intact up to the last fsync",
                (self.next * SECTOR as u64) >> 10,
                (sectors * SECTOR as u64) >> 10,
                self.dir
            ));
        }
        if let Err(error) = self.blk.write_durable(self.next, &batch) {
            println!("linux: data disk write failed: {error}");
            return Err(5); // EIO
        }
        self.next += sectors;
        self.seq = seq;
        Ok(())
    }

    /// `fsync` of `node` (at `path`): its new bytes since the last one.
    pub fn sync_file(&mut self, path: &str, node: &Node) -> Result<(), i64> {
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
        self.commit(&records)?;
        let mut n = node.borrow_mut();
        n.synced = n.size();
        n.dirty_below = false;
        n.on_disk = true;
        Ok(())
    }
}
