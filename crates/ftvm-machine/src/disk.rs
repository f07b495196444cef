//! Disk images with a dirty-block map: which blocks the guest wrote, for every consumer that
//! copies a disk while the guest keeps writing it (a live snapshot now, re-protecting a
//! backup later). The same pattern as guest memory (`dirty.rs`), one level down.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use ftvm_virtio::block::{BlockBackend, RawFile};
use vm_memory::bitmap::AtomicBitmap;

/// The granularity of the dirty-block map.
pub const DISK_BLOCK: u64 = 64 * 1024;

/// A consumer of a disk's dirty-block map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskConsumer(usize);

struct Consumers {
    sets: Vec<Option<Vec<u64>>>,
}

/// The dirty-block map of one disk: marked by the device's writes (vCPU thread), read by
/// consumers on other threads. Cheap to clone (shared).
#[derive(Clone)]
pub struct DiskTracker {
    /// One bit per block, set after each completed write.
    written: Arc<AtomicBitmap>,
    consumers: Arc<Mutex<Consumers>>,
    size: u64,
}

impl DiskTracker {
    fn new(size: u64) -> Self {
        let block = NonZeroUsize::new(DISK_BLOCK as usize).expect("non-zero");
        DiskTracker {
            written: Arc::new(AtomicBitmap::new(size.max(1) as usize, block)),
            consumers: Arc::new(Mutex::new(Consumers { sets: Vec::new() })),
            size,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Consumers> {
        ftvm_sync::lock(&self.consumers)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn words(&self) -> usize {
        self.size.div_ceil(DISK_BLOCK).div_ceil(64) as usize
    }

    /// Adds the blocks written since the last collection to every consumer.
    fn collect(&self, c: &mut Consumers) {
        let news = self.written.get_and_reset();
        for set in c.sets.iter_mut().flatten() {
            for (a, b) in set.iter_mut().zip(&news) {
                *a |= b;
            }
        }
    }

    /// A new consumer: its first `take` returns the blocks written from now on.
    pub fn subscribe(&self) -> DiskConsumer {
        let mut c = self.lock();
        self.collect(&mut c);
        let set = vec![0; self.words()];
        match c.sets.iter().position(Option::is_none) {
            Some(free) => {
                c.sets[free] = Some(set);
                DiskConsumer(free)
            }
            None => {
                c.sets.push(Some(set));
                DiskConsumer(c.sets.len() - 1)
            }
        }
    }

    pub fn unsubscribe(&self, consumer: DiskConsumer) {
        if let Some(set) = self.lock().sets.get_mut(consumer.0) {
            *set = None;
        }
    }

    /// (offset, length) of each block written since this consumer's previous take, in
    /// order; the last block is cut at the end of the disk.
    pub fn take(&self, consumer: DiskConsumer) -> Vec<(u64, u64)> {
        let mut c = self.lock();
        self.collect(&mut c);
        let fresh = vec![0; self.words()];
        let Some(Some(set)) = c.sets.get_mut(consumer.0) else { return Vec::new() };
        let set = std::mem::replace(set, fresh);
        let mut blocks = Vec::new();
        for (w, &word) in set.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let block = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let offset = block * DISK_BLOCK;
                if offset < self.size {
                    blocks.push((offset, DISK_BLOCK.min(self.size - offset)));
                }
            }
        }
        blocks
    }

    fn mark(&self, offset: u64, len: usize) {
        self.written.set_addr_range(offset as usize, len);
    }
}

/// A raw disk image whose writes are tracked.
pub struct TrackedDisk {
    file: RawFile,
    tracker: DiskTracker,
    /// A backup's replay: the guest's flushes are owed, not done (see [`TrackedDisk::defer_flushes`]).
    defer_flushes: bool,
    /// A flush was deferred since the last one done.
    flush_owed: bool,
}

impl TrackedDisk {
    pub fn new(file: RawFile) -> Self {
        let tracker = DiskTracker::new(file.size());
        TrackedDisk { file, tracker, defer_flushes: false, flush_owed: false }
    }

    /// A backup's replay: the guest's flushes complete without an `fdatasync` and are owed
    /// until [`TrackedDisk::settle_flushes`]. Until a backup goes live nobody relies on its
    /// disk being durable: its host failing loses the backup whatever its disk holds (a new
    /// backup is made by a state transfer that overwrites the disk), and its process failing
    /// leaves the page cache intact. What the guest was told is durable must be so on this
    /// host from the moment it is the live side: `settle_flushes` at going live, before the
    /// guest runs live or an output is performed.
    pub fn defer_flushes(&mut self) {
        self.defer_flushes = true;
    }

    /// Ends the deferral: one `fdatasync` if a flush was deferred; from here the guest's
    /// flushes are done as they come.
    pub fn settle_flushes(&mut self) -> std::io::Result<()> {
        self.defer_flushes = false;
        if std::mem::take(&mut self.flush_owed) {
            if let Err(e) = self.file.flush() {
                self.flush_owed = true;
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn tracker(&self) -> DiskTracker {
        self.tracker.clone()
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

impl BlockBackend for TrackedDisk {
    fn size(&self) -> u64 {
        self.file.size()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_at(buf, offset)?;
        // Marked after the data is in the file: a consumer that takes the mark and then
        // reads the block sees this write (or the next mark makes it read again).
        self.tracker.mark(offset, buf.len());
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.defer_flushes {
            self.flush_owed = true;
            return Ok(());
        }
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_seen_by_every_consumer_once() {
        let dir = std::env::temp_dir().join(format!("ftvm-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        std::fs::write(&path, vec![0u8; (3 * DISK_BLOCK + 512) as usize]).unwrap();
        let mut disk = TrackedDisk::new(RawFile::open(&path, false).unwrap());
        let t = disk.tracker();
        disk.write_at(&[1; 512], 0).unwrap();
        let a = t.subscribe();
        assert!(t.take(a).is_empty(), "writes before the subscription are not news");
        // A write across a block boundary marks both blocks; the last block is short.
        disk.write_at(&[2; 1024], DISK_BLOCK - 512).unwrap();
        let b = t.subscribe();
        disk.write_at(&[3; 512], 3 * DISK_BLOCK).unwrap();
        assert_eq!(t.take(a), vec![(0, DISK_BLOCK), (DISK_BLOCK, DISK_BLOCK), (3 * DISK_BLOCK, 512)]);
        assert_eq!(t.take(b), vec![(3 * DISK_BLOCK, 512)]);
        assert!(t.take(a).is_empty());
        t.unsubscribe(a);
        assert!(t.take(a).is_empty());
        let mut back = [0u8; 4];
        disk.read_at(&mut back, 3 * DISK_BLOCK).unwrap();
        assert_eq!(back, [3; 4]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn deferred_flushes_are_owed_until_settled_then_done_as_they_come() {
        let dir = std::env::temp_dir().join(format!("ftvm-disk-defer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        std::fs::write(&path, vec![0u8; DISK_BLOCK as usize]).unwrap();
        let mut disk = TrackedDisk::new(RawFile::open(&path, false).unwrap());
        assert!(!disk.flush_owed);
        disk.defer_flushes();
        disk.write_at(&[7; 512], 0).unwrap();
        disk.flush().unwrap();
        assert!(disk.flush_owed, "a deferred flush is owed");
        disk.settle_flushes().unwrap();
        assert!(!disk.flush_owed && !disk.defer_flushes, "settled: paid, and no more deferral");
        disk.flush().unwrap();
        assert!(!disk.flush_owed, "after settling, flushes are done as they come");
        let mut back = [0u8; 2];
        disk.read_at(&mut back, 0).unwrap();
        assert_eq!(back, [7; 2]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
