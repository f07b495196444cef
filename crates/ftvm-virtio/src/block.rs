//! virtio-blk (device ID 2): a raw disk image behind a [`BlockBackend`].
//!
//! Requests execute synchronously at the QueueNotify exit (docs/architecture.md, "virtio"): the guest's
//! next instruction sees them complete, so the order of disk effects follows the guest alone,
//! and record/replay need not log them (each side works on an identical copy of the disk).
//! A request that breaks the rules (sectors past the end, short buffers, data in the wrong
//! direction) completes with VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP; one without a place
//! for the status byte is dropped (returned with length 0).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ftvm_devices::{ensure_same, HostInputs, StateError, Stateful};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vm_memory::GuestMemory;

use crate::queue::{Chain, Queues};
use crate::{read_config_bytes, Error, VirtioDevice, VIRTIO_F_VERSION_1};

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// The request header: type (u32), reserved (u32), sector (u64).
const HEADER_LEN: u64 = 16;
/// Data moves through a bounce buffer of this size (bounded host memory per request).
const CHUNK: usize = 128 * 1024;

/// Where a virtio-blk device keeps its data.
pub trait BlockBackend {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&mut self) -> std::io::Result<()>;
}

/// A raw disk image file.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    size: u64,
}

/// Locks an image for as long as `file` stays open, as QEMU does: a writer alone, or any
/// number of readers. Two VMs writing one image (or one VM given it twice) would corrupt it
/// without a word. The lock is `flock`, held by the open file description, so it also
/// conflicts within one process.
fn lock(file: &File, path: &Path, readonly: bool) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let how = if readonly { libc::LOCK_SH } else { libc::LOCK_EX };
    // SAFETY: flock on a descriptor this function's caller owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let source = std::io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        let held = if readonly { "for writing" } else { "for reading or writing" };
        return Err(Error::DiskLocked { path: path.into(), held });
    }
    Err(Error::DiskOpen { path: path.into(), source })
}

impl RawFile {
    /// Opens `path` read-write, or read-only if `readonly`, and locks it (a writer alone, or
    /// readers together).
    pub fn open(path: &Path, readonly: bool) -> Result<Self, Error> {
        let file = OpenOptions::new().read(true).write(!readonly).open(path).map_err(|source| {
            let denied =
                matches!(source.raw_os_error(), Some(libc::EACCES | libc::EROFS | libc::EPERM | libc::ETXTBSY));
            if !readonly && denied && path.exists() {
                Error::DiskNotWritable { path: path.into(), source }
            } else {
                Error::DiskOpen { path: path.into(), source }
            }
        })?;
        let meta = file.metadata().map_err(|source| Error::DiskOpen { path: path.into(), source })?;
        let size = if meta.is_file() {
            meta.len()
        } else {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_block_device() {
                return Err(Error::DiskNotAFile { path: path.into() });
            }
            // A block device reports its size by seeking to its end.
            use std::io::Seek;
            (&file).seek(std::io::SeekFrom::End(0)).map_err(|source| Error::DiskOpen { path: path.into(), source })?
        };
        lock(&file, path, readonly)?;
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                "disk image {} is {size} bytes, not a multiple of {SECTOR_SIZE}; the last partial sector is not visible",
                path.display()
            );
        }
        Ok(RawFile { file, path: path.into(), size })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// Counts of what the device did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests completed with IOERR or UNSUPP.
    pub errors: u64,
    /// Chains dropped without a status (malformed).
    pub dropped: u64,
}

/// A virtio-blk device.
pub struct Block<B> {
    backend: B,
    readonly: bool,
    name: String,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    stats: BlockStats,
    bounce: Vec<u8>,
}

/// How a request ended, before the status byte is written.
struct Done {
    status: u32,
    /// Bytes written into the chain's writable part, the status byte excluded.
    written: u32,
}

impl<B: BlockBackend> Block<B> {
    /// `index` numbers the disks of a VM (names and the GET_ID serial).
    pub fn new(backend: B, readonly: bool, index: usize) -> Self {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let serial = format!("ftvm-disk{index}");
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Block {
            backend,
            readonly,
            name: format!("virtio-blk{index}"),
            id,
            stats: BlockStats::default(),
            bounce: Vec::new(),
        }
    }

    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.backend.size() / SECTOR_SIZE
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Executes one request; the status byte is the last byte of the last writable descriptor.
    fn execute<M: GuestMemory>(&mut self, mem: &M, chain: &Chain) -> Done {
        let ioerr = Done { status: VIRTIO_BLK_S_IOERR, written: 0 };
        let mut header = [0u8; HEADER_LEN as usize];
        if chain.read_at(mem, 0, &mut header).is_err() {
            return ioerr;
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(s);
        // Data bytes on either side, the header and the status byte excluded.
        let data_in = chain.writable_len() - 1;
        let data_out = chain.readable_len() - HEADER_LEN;
        match kind {
            VIRTIO_BLK_T_IN => {
                if data_out != 0 {
                    return ioerr; // data buffers must be device-writable for a read
                }
                let Some(offset) = self.check_range(sector, data_in) else { return ioerr };
                self.stats.reads += 1;
                match self.read_into(mem, chain, offset, data_in) {
                    Ok(()) => {
                        self.stats.bytes_read += data_in;
                        Done { status: VIRTIO_BLK_S_OK, written: data_in as u32 }
                    }
                    Err(()) => ioerr,
                }
            }
            VIRTIO_BLK_T_OUT => {
                if data_in != 0 || self.readonly {
                    return ioerr; // data must be device-readable; a read-only disk takes no writes
                }
                let Some(offset) = self.check_range(sector, data_out) else { return ioerr };
                self.stats.writes += 1;
                match self.write_from(mem, chain, offset, data_out) {
                    Ok(()) => {
                        self.stats.bytes_written += data_out;
                        Done { status: VIRTIO_BLK_S_OK, written: 0 }
                    }
                    Err(()) => ioerr,
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                self.stats.flushes += 1;
                match self.backend.flush() {
                    Ok(()) => Done { status: VIRTIO_BLK_S_OK, written: 0 },
                    Err(e) => {
                        tracing::error!("{}: flush failed: {e}", self.name);
                        ioerr
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = self.id.len() as u64;
                if data_in < n || data_out != 0 {
                    return ioerr;
                }
                match chain.write_at(mem, 0, &self.id) {
                    Ok(()) => Done { status: VIRTIO_BLK_S_OK, written: n as u32 },
                    Err(_) => ioerr,
                }
            }
            _ => Done { status: VIRTIO_BLK_S_UNSUPP, written: 0 },
        }
    }

    /// The byte offset of `sector` if `len` bytes from there are inside the disk and `len` is
    /// a whole number of sectors.
    fn check_range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (len % SECTOR_SIZE == 0 && end <= self.capacity() * SECTOR_SIZE).then_some(offset)
    }

    fn read_into<M: GuestMemory>(&mut self, mem: &M, chain: &Chain, offset: u64, len: u64) -> Result<(), ()> {
        let mut done = 0;
        self.bounce.resize(CHUNK, 0);
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let buf = &mut self.bounce[..n];
            if let Err(e) = self.backend.read_at(buf, offset + done) {
                tracing::error!("{}: read of {n} bytes at {} failed: {e}", self.name, offset + done);
                return Err(());
            }
            chain.write_at(mem, done, buf).map_err(|_| ())?;
            done += n as u64;
        }
        Ok(())
    }

    fn write_from<M: GuestMemory>(&mut self, mem: &M, chain: &Chain, offset: u64, len: u64) -> Result<(), ()> {
        let mut done = 0;
        self.bounce.resize(CHUNK, 0);
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let buf = &mut self.bounce[..n];
            chain.read_at(mem, HEADER_LEN + done, buf).map_err(|_| ())?;
            if let Err(e) = self.backend.write_at(buf, offset + done) {
                tracing::error!("{}: write of {n} bytes at {} failed: {e}", self.name, offset + done);
                return Err(());
            }
            done += n as u64;
        }
        Ok(())
    }
}

/// The complete state of virtio-blk: its counters, and its configuration as the guest saw it
/// (capacity, read-only, the GET_ID serial) to check that the state goes back to the same
/// disk. Requests complete within the notify, so nothing is in flight between exits. The disk's
/// contents are not device state: they are carried with the disk image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    capacity: u64,
    readonly: bool,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    stats: BlockStats,
}

impl<B: BlockBackend> Stateful for Block<B> {
    type State = BlockState;

    fn save_state(&self) -> BlockState {
        BlockState { capacity: self.capacity(), readonly: self.readonly, serial: self.id, stats: self.stats }
    }

    fn restore_state(&mut self, state: &BlockState) -> Result<(), StateError> {
        ensure_same(&self.name, "capacity (sectors)", state.capacity, self.capacity())?;
        ensure_same(&self.name, "read-only", state.readonly, self.readonly)?;
        let serial = |id: &[u8]| String::from_utf8_lossy(id).trim_end_matches('\0').to_string();
        ensure_same(&self.name, "serial", serial(&state.serial), serial(&self.id))?;
        self.stats = state.stats;
        Ok(())
    }
}

impl<B: BlockBackend> VirtioDevice for Block<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.readonly { 1 << VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH) | ro
    }

    /// struct virtio_blk_config: only `capacity` (u64, offset 0) is offered.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.capacity().to_le_bytes(), offset, data);
    }

    fn reset(&mut self) {}

    fn notify<M: GuestMemory>(&mut self, queue: u16, queues: &mut Queues<'_, M>, _inputs: &mut dyn HostInputs) {
        let q = usize::from(queue);
        let mem = queues.memory();
        while let Some(popped) = queues.pop(q) {
            let chain = match popped {
                Ok(chain) if chain.readable_len() >= HEADER_LEN && chain.writable_len() >= 1 => chain,
                Ok(chain) => {
                    // No header or no status byte: nothing sensible can be answered.
                    self.stats.dropped += 1;
                    let reason = "request without a 16-byte header or a status byte";
                    queues.drop_chain(q, crate::BadChain { head: chain.head, reason }, &self.name);
                    continue;
                }
                Err(bad) => {
                    self.stats.dropped += 1;
                    queues.drop_chain(q, bad, &self.name);
                    continue;
                }
            };
            let done = self.execute(mem, &chain);
            if done.status != VIRTIO_BLK_S_OK {
                self.stats.errors += 1;
            }
            let status_at = chain.writable_len() - 1;
            if chain.write_at(mem, status_at, &[done.status as u8]).is_err() {
                self.stats.dropped += 1;
                queues.add_used(q, chain.head, 0);
                continue;
            }
            queues.add_used(q, chain.head, done.written + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmio::regs;
    use crate::testing::*;
    use ftvm_devices::Stateful;
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;

    /// An in-memory disk that records flushes.
    #[derive(Debug, Default)]
    struct MemDisk {
        data: Vec<u8>,
        flushes: u64,
        fail: bool,
    }

    impl BlockBackend for MemDisk {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            if self.fail {
                return Err(std::io::Error::other("injected"));
            }
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            let o = offset as usize;
            self.data[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.flushes += 1;
            Ok(())
        }
    }

    const RING: u64 = 0x10000;
    const HDR: u64 = 0x20000;
    const DATA: u64 = 0x100000;
    const STATUS: u64 = 0x30000;
    const SECTORS: u64 = 64;

    fn disk() -> MemDisk {
        MemDisk { data: (0..SECTORS * 512).map(|i| (i % 251) as u8).collect(), ..Default::default() }
    }

    fn header(mem: &Mem, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        write_mem(mem, HDR, &h);
        write_mem(mem, STATUS, &[0xff]);
    }

    fn status(mem: &Mem) -> u32 {
        u32::from(read_mem(mem, STATUS, 1)[0])
    }

    fn setup(mem: &Mem, readonly: bool) -> (Harness<Block<MemDisk>>, Ring<'_>) {
        let mut h = Harness::with_mem(Block::new(disk(), readonly, 0), mem);
        let ring = Ring::new(mem, RING, 16);
        h.activate(&[&ring]);
        (h, ring)
    }

    #[test]
    fn capacity_and_features() {
        let mut h = Harness::new(Block::new(disk(), false, 0));
        let mut cap = [0u8; 8];
        h.read_bytes(regs::CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), SECTORS);
        assert_eq!(h.read(regs::DEVICE_ID), 2);
        let f = h.device_features();
        assert_ne!(f & 1 << VIRTIO_BLK_F_FLUSH, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
        let mut h = Harness::new(Block::new(disk(), true, 0));
        assert_ne!(h.device_features() & 1 << VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn read_fills_the_buffers_and_marks_the_pages_dirty() {
        let mem = memory();
        let (mut h, mut ring) = setup(&mem, false);
        header(&mem, VIRTIO_BLK_T_IN, 3);
        clear_dirty(&mem);
        // 1024 bytes split over two buffers, the second one two pages further on.
        let head = ring.add(&[r(HDR, 16), w(DATA, 512), w(DATA + 0x2000, 512), w(STATUS, 1)]);
        h.notify(0);
        assert_eq!(ring.take_used(), vec![(u32::from(head), 1025)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        let want = &disk().data[3 * 512..5 * 512];
        assert_eq!(read_mem(&mem, DATA, 512), want[..512]);
        assert_eq!(read_mem(&mem, DATA + 0x2000, 512), want[512..]);
        assert_eq!(h.pulses(), 1);
        // The VMM's writes are in the dirty bitmap (snapshots and state transfer need them):
        // both data pages, the status byte and the used ring, and nothing else.
        assert!(dirty(&mem, DATA));
        assert!(dirty(&mem, DATA + 0x2000));
        assert!(!dirty(&mem, DATA + 0x1000), "untouched page");
        assert!(dirty(&mem, STATUS));
        assert!(dirty(&mem, ring.used_addr()));
        assert!(!dirty(&mem, HDR), "only read");
        assert_eq!(h.dev.device().stats().bytes_read, 1024);
    }

    #[test]
    fn write_then_read_back_and_flush() {
        let mem = memory();
        let (mut h, mut ring) = setup(&mem, false);
        let payload: Vec<u8> = (0..1536u32).map(|i| (i * 7) as u8).collect();
        write_mem(&mem, DATA, &payload);
        header(&mem, VIRTIO_BLK_T_OUT, 10);
        ring.add(&[r(HDR, 16), r(DATA, 1000), r(DATA + 1000, 536), w(STATUS, 1)]);
        h.notify(0);
        assert_eq!(ring.take_used(), vec![(0, 1)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(&h.dev.device().backend().data[10 * 512..13 * 512], &payload[..]);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        ring.add(&[r(HDR, 16), w(STATUS, 1)]);
        h.notify(0);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(h.dev.device().backend().flushes, 1);
        let s = h.dev.device().stats();
        assert_eq!((s.writes, s.bytes_written, s.flushes, s.errors), (1, 1536, 1, 0));
    }

    #[test]
    fn get_id_and_unsupported_requests() {
        let mem = memory();
        let (mut h, mut ring) = setup(&mem, false);
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        ring.add(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]);
        h.notify(0);
        assert_eq!(ring.take_used(), vec![(0, 21)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(&read_mem(&mem, DATA, 20)[..10], b"ftvm-disk0");
        // A buffer shorter than the 20-byte ID.
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        ring.add(&[r(HDR, 16), w(DATA, 8), w(STATUS, 1)]);
        h.notify(0);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        // DISCARD (not offered) and a nonsense type.
        for kind in [11, 0x7777] {
            header(&mem, kind, 0);
            ring.add(&[r(HDR, 16), w(STATUS, 1)]);
            h.notify(0);
            assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP);
        }
        assert_eq!(h.dev.device().stats().errors, 3);
    }

    #[test]
    fn bad_requests_complete_with_an_error_and_leave_the_disk_alone() {
        let mem = memory();
        let (mut h, mut ring) = setup(&mem, false);
        let cases: Vec<(&str, u32, u64, Vec<Buf>)> = vec![
            ("read past the end", VIRTIO_BLK_T_IN, SECTORS - 1, vec![r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]),
            ("read at a huge sector", VIRTIO_BLK_T_IN, u64::MAX / 256, vec![r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
            ("write past the end", VIRTIO_BLK_T_OUT, SECTORS, vec![r(HDR, 16), r(DATA, 512), w(STATUS, 1)]),
            ("read of a partial sector", VIRTIO_BLK_T_IN, 0, vec![r(HDR, 16), w(DATA, 100), w(STATUS, 1)]),
            ("write of a partial sector", VIRTIO_BLK_T_OUT, 0, vec![r(HDR, 16), r(DATA, 513), w(STATUS, 1)]),
            ("read into a device-readable buffer", VIRTIO_BLK_T_IN, 0, vec![r(HDR, 16), r(DATA, 512), w(STATUS, 1)]),
            ("write from a device-writable buffer", VIRTIO_BLK_T_OUT, 0, vec![r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        ];
        let before = h.dev.device().backend().data.clone();
        for (what, kind, sector, bufs) in cases {
            header(&mem, kind, sector);
            ring.add(&bufs);
            h.notify(0);
            let used = ring.take_used();
            assert_eq!(used.len(), 1, "{what}");
            assert_eq!(used[0].1, 1, "{what}: only the status byte is written");
            assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR, "{what}");
        }
        assert_eq!(h.dev.device().backend().data, before);
        assert_eq!(h.read(regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "the device keeps working");
        // Host I/O errors are reported, not fatal.
        h.dev.device_mut().backend.fail = true;
        header(&mem, VIRTIO_BLK_T_IN, 0);
        ring.add(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
        h.notify(0);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn malformed_chains_are_dropped_without_a_status() {
        let mem = memory();
        let (mut h, mut ring) = setup(&mem, false);
        let cases: Vec<(&str, Vec<Buf>)> = vec![
            ("no status byte", vec![r(HDR, 16), r(DATA, 512)]),
            ("short header", vec![r(HDR, 8), w(STATUS, 1)]),
            ("zero-length descriptor", vec![r(HDR, 16), w(DATA, 0), w(STATUS, 1)]),
            ("buffer outside memory", vec![r(HDR, 16), w(MEM_SIZE - 100, 512), w(STATUS, 1)]),
            ("readable after writable", vec![r(HDR, 16), w(DATA, 512), r(DATA + 512, 16), w(STATUS, 1)]),
        ];
        for (what, bufs) in cases {
            header(&mem, VIRTIO_BLK_T_IN, 0);
            let head = ring.add(&bufs);
            h.notify(0);
            assert_eq!(ring.take_used(), vec![(u32::from(head), 0)], "{what}");
            assert_eq!(status(&mem), 0xff, "{what}: no status written");
        }
        // A chain that loops back on itself.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        ring.set_desc(14, HDR, 16, 1, 15);
        ring.set_desc(15, DATA, 512, 1 | 2, 14);
        ring.push_avail(14);
        ring.publish();
        h.notify(0);
        assert_eq!(ring.take_used(), vec![(14, 0)]);
        // A chain whose next index is beyond the table.
        ring.set_desc(3, HDR, 16, 1, 99);
        ring.push_avail(3);
        ring.publish();
        h.notify(0);
        assert_eq!(ring.take_used(), vec![(3, 0)]);
        // An indirect descriptor (not offered).
        ring.set_desc(4, DATA, 32, 4, 0);
        ring.push_avail(4);
        ring.publish();
        h.notify(0);
        assert_eq!(ring.take_used(), vec![(4, 0)]);
        assert_eq!(h.dev.device().stats().dropped, 8);
        assert_eq!(h.read(regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        // And a good request still works afterwards.
        header(&mem, VIRTIO_BLK_T_IN, 1);
        ring.add(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
        h.notify(0);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn a_readonly_disk_refuses_writes() {
        let mem = memory();
        let (mut h, mut ring) = setup(&mem, true);
        write_mem(&mem, DATA, &[0x42; 512]);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        ring.add(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
        h.notify(0);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        assert_eq!(h.dev.device().backend().data[..512], disk().data[..512]);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        ring.add(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
        h.notify(0);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    }

    /// A write, a read back of it and a flush on `h`; returns everything the guest and the
    /// VMM see of them.
    fn requests(h: &mut Harness<Block<MemDisk>>, mem: &Mem, ring: &mut Ring<'_>) -> impl PartialEq + std::fmt::Debug {
        let mut seen = vec![];
        write_mem(mem, DATA, &[0x5a; 1024]);
        for (kind, sector, bufs) in [
            (VIRTIO_BLK_T_OUT, 7, vec![r(HDR, 16), r(DATA, 1024), w(STATUS, 1)]),
            (VIRTIO_BLK_T_IN, 6, vec![r(HDR, 16), w(DATA + 0x1000, 2048), w(STATUS, 1)]),
            (VIRTIO_BLK_T_FLUSH, 0, vec![r(HDR, 16), w(STATUS, 1)]),
        ] {
            header(mem, kind, sector);
            ring.add(&bufs);
            h.notify(0);
            seen.push((status(mem), ring.take_used(), h.pulses()));
        }
        let disk = &h.dev.device().backend().data;
        (seen, mem_digest(mem, 0, MEM_SIZE as usize), disk.clone(), h.dev.device().stats())
    }

    #[test]
    fn state_saved_between_requests_continues_identically() {
        let mem = memory();
        let (mut h, mut ring) = setup(&mem, false);
        requests(&mut h, &mem, &mut ring);
        // A request available but not yet notified when the state is saved.
        header(&mem, VIRTIO_BLK_T_IN, 1);
        ring.add(&[r(HDR, 16), w(DATA + 0x3000, 512), w(STATUS, 1)]);
        let twin_mem = fork_memory(&mem);
        let disk = MemDisk { data: h.dev.device().backend().data.clone(), ..Default::default() };
        let mut twin = h.fork(Block::new(disk, false, 0), &twin_mem);
        let mut twin_ring = ring.twin(&twin_mem);
        h.notify(0);
        twin.notify(0);
        assert_eq!(ring.take_used(), twin_ring.take_used());
        assert_eq!(requests(&mut h, &mem, &mut ring), requests(&mut twin, &twin_mem, &mut twin_ring));
        assert_eq!(twin.dev.device().stats().writes, 2);
        assert_eq!(h.dev.save_state(), twin.dev.save_state());
    }

    #[test]
    fn a_state_goes_back_only_to_the_same_disk() {
        let mem = memory();
        let (h, _ring) = setup(&mem, false);
        let state = h.dev.save_state();
        let small = MemDisk { data: vec![0; 8 * 512], ..Default::default() };
        Harness::with_mem(Block::new(small, false, 0), &mem)
            .refused(&state, "capacity (sectors): saved 64, this device 8");
        Harness::with_mem(Block::new(disk(), true, 0), &mem)
            .refused(&state, "read-only: saved false, this device true");
        Harness::with_mem(Block::new(disk(), false, 1), &mem)
            .refused(&state, "serial: saved ftvm-disk0, this device ftvm-disk1");
        let mut same = Harness::with_mem(Block::new(disk(), false, 0), &mem);
        same.dev.restore_state(&state).unwrap();
        assert!(same.dev.driver_ok());
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvm-virtio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn raw_file_backend_reads_writes_and_flushes() {
        let dir = scratch("rawfile");
        let path = dir.join("disk.img");
        std::fs::write(&path, vec![7u8; 4096 + 100]).unwrap();
        // A read-only device first (the image is locked: a writer alone, or readers).
        let b = Block::new(RawFile::open(&path, true).unwrap(), true, 0);
        assert_eq!(b.capacity(), 8, "the partial sector is not visible");
        drop(b);
        let mut f = RawFile::open(&path, false).unwrap();
        assert_eq!(f.size(), 4196);
        f.write_at(&[1, 2, 3], 512).unwrap();
        f.flush().unwrap();
        let mut buf = [0u8; 4];
        f.read_at(&mut buf, 511).unwrap();
        assert_eq!(buf, [7, 1, 2, 3]);
        assert!(f.read_at(&mut buf, 4195).is_err(), "past the end");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn raw_file_open_errors_are_clear() {
        let dir = scratch("rawfile-errors");
        let err = RawFile::open(&dir.join("missing.img"), false).unwrap_err();
        assert!(matches!(err, Error::DiskOpen { .. }), "{err}");
        assert!(err.to_string().contains("missing.img") && err.to_string().contains("No such file"), "{err}");
        let err = RawFile::open(&dir, true).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        // A file that cannot be opened for writing. Root may write any regular file, but not
        // a sysfs attribute that has no store method.
        let ro = dir.join("ro.img");
        std::fs::write(&ro, [0u8; 512]).unwrap();
        std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
        // SAFETY: geteuid has no preconditions.
        let ro = if unsafe { libc::geteuid() } == 0 { PathBuf::from("/sys/devices/system/cpu/online") } else { ro };
        let err = RawFile::open(&ro, false).unwrap_err();
        assert!(matches!(err, Error::DiskNotWritable { .. }), "{err}");
        assert!(err.to_string().contains(",readonly"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_image_has_one_writer_or_many_readers() {
        let dir = scratch("rawfile-lock");
        let img = dir.join("a.img");
        std::fs::write(&img, [0u8; 4096]).unwrap();
        let writer = RawFile::open(&img, false).unwrap();
        for readonly in [false, true] {
            let err = RawFile::open(&img, readonly).unwrap_err();
            assert!(matches!(err, Error::DiskLocked { .. }), "{err}");
            assert!(err.to_string().contains("in use by another VM") && err.to_string().contains("a.img"), "{err}");
        }
        drop(writer);
        let (r1, r2) = (RawFile::open(&img, true).unwrap(), RawFile::open(&img, true).unwrap());
        assert!(matches!(RawFile::open(&img, false), Err(Error::DiskLocked { .. })), "readers keep a writer out");
        drop((r1, r2));
        assert!(RawFile::open(&img, false).is_ok(), "the lock goes with the last reader");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
