//! The snapshot format: a VM's whole state in a directory (one state model for snapshots,
//! sync points and state transfer: docs/snapshots.md), its checks, and restoring it.
//!
//! A snapshot directory holds
//! - `snapshot.json`, the manifest: format and version, the VM as a log header pins it
//!   (images with digests, memory layout, CPUID, devices, MACs, command line), checksums and
//!   sizes of the other files, and how the snapshot was taken (rounds, pause);
//! - `state.bin`: the vCPU, every device and the guest clock ([`VmState`], postcard);
//! - `memory.bin`: guest RAM, the regions one after the other, zero pages left as holes;
//! - `disk<i>.img`: a copy of each writable disk, taken at the same instant as the memory;
//! - `snapshot.hmac`: the manifest's seal under this user's snapshot key.
//!
//! Taking one live (a pre-copy while the guest runs, then a paused round on the vCPU thread)
//! is a session's work: `ftvm_vmm::snapshot`. The manifest is written last, so a directory
//! without one is not a snapshot.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ftvm_log::{Hasher64, LogHeader};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use ftvm_virtio::net::MacAddr;

use crate::boot::BootSpec;
use crate::dirty::PageSet;
use crate::error::{Error, Result};
use crate::identity::{check_image, header_for, NamedBy};
use crate::memory::{GuestMemoryMmap, PAGE_SIZE};
use crate::state::VmState;
use crate::vm::{ConsoleConfig, DiskConfig, NetConfig, Vm, VmConfig};

/// One pre-copy round: what it wrote and how long it took (the manifest's `rounds`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CopyRound {
    /// Guest pages written to the snapshot in this round.
    pub pages: u64,
    /// Disk bytes written to the snapshot in this round.
    pub disk_bytes: u64,
    pub ms: f64,
}

/// The manifest's `format`.
pub const FORMAT: &str = "ftvm-snapshot";
/// The snapshot format version: bump when the files or the manifest change shape.
pub const VERSION: u32 = 1;

pub const MANIFEST: &str = "snapshot.json";
pub const STATE: &str = "state.bin";
pub const MEMORY: &str = "memory.bin";
/// The manifest's seal: HMAC-SHA256 of its bytes under this user's snapshot key, hex.
pub const SEAL: &str = "snapshot.hmac";
/// This user's snapshot key, in [`key_dir`].
const SNAPSHOT_KEY: &str = "snapshot.key";

/// Modes of what a snapshot (or a state transfer's staging) creates: guest memory and disks
/// are the guest's secrets, readable by ftvm's user alone. Set at creation, never widened
/// by a chmod later (no instant at which another user could open them).
pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

/// A new file of a snapshot, mode [`FILE_MODE`]; it must not exist yet.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).create_new(true).mode(FILE_MODE).open(path)
}

/// A file of the snapshot with its size and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub file: String,
    pub size: u64,
    /// xxh3-64, hex: of the bytes for `state.bin`; for memory and disk images, of (offset,
    /// bytes) of every 4 KiB block that is not all zeros, in order (holes and stored zeros
    /// alike are skipped).
    pub xxh3: String,
}

/// A disk of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    /// The image the VM ran on (where a restore puts the copy back unless told otherwise).
    pub source: String,
    pub readonly: bool,
    /// The copy in the snapshot (none for a read-only disk: it cannot have changed).
    pub copy: Option<FileEntry>,
}

/// `snapshot.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub ftvm_version: String,
    /// The device state format ([`ftvm_devices::DEVICE_STATE_VERSION`]).
    pub device_state_version: u32,
    /// The VM, as a log header pins it (its `disks` name the images the VM ran on).
    pub vm: LogHeader,
    pub created_unix: u64,
    /// The guest clock when the snapshot was taken.
    pub guest_time_ns: u64,
    pub state: FileEntry,
    pub memory: FileEntry,
    pub disks: Vec<DiskEntry>,
    /// How it was taken.
    pub rounds: Vec<CopyRound>,
    pub pause_ms: f64,
}

pub fn hex(v: u64) -> String {
    format!("{v:016x}")
}

/// A snapshot file's I/O error, with what was being done.
pub fn snap_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::SnapshotIo { what, source }
}

fn restore_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::RestoreIo { what, source }
}

// ---- Sparse files: holes read as zeros, and are skipped where the data is zero ----

/// The data extents of a file (SEEK_DATA/SEEK_HOLE), so that reading a mostly empty memory
/// image or disk touches only what is in it. A filesystem without the calls reports the whole
/// file as data.
pub fn data_extents(file: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole up to the end
            }
            return vec![(0, size)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (start, end) = (data as u64, if hole < 0 { size } else { (hole as u64).min(size) });
        if end <= start {
            break;
        }
        // Whole 4 KiB blocks, so that the checksum's blocks are the same on any filesystem.
        let (start, end) = (start & !(PAGE_SIZE - 1), end.next_multiple_of(PAGE_SIZE).min(size));
        match extents.last_mut() {
            Some((s, l)) if *s + *l >= start => *l = end.max(*s + *l) - *s,
            _ => extents.push((start, end - start)),
        }
        pos = end;
    }
    extents
}

/// Reads `file` in order and calls `each(offset, bytes)` for each 4 KiB block that is not all
/// zeros; returns the content's checksum: xxh3 over (offset, bytes) of those blocks. Zero
/// blocks count the same whether the file stores them as data or as holes, so the checksum
/// is the content's, whatever the filesystem did with it, and holes cost nothing to check.
pub fn read_sparse<E: From<Error>>(
    file: &File,
    size: u64,
    mut each: impl FnMut(u64, &[u8]) -> std::result::Result<(), E>,
) -> std::result::Result<u64, E> {
    const BLOCK: usize = PAGE_SIZE as usize;
    let mut hasher = Hasher64::new();
    let mut buf = vec![0u8; 1 << 20];
    for (start, len) in data_extents(file, size) {
        let mut off = start;
        while off < start + len {
            let k = (start + len - off).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..k], off).map_err(restore_err(format!("reading at offset {off}")))?;
            for (i, block) in buf[..k].chunks(BLOCK).enumerate() {
                if !is_zero(block) {
                    let at = off + (i * BLOCK) as u64;
                    hasher.write_u64(at);
                    hasher.write(block);
                    each(at, block)?;
                }
            }
            off += k as u64;
        }
    }
    Ok(hasher.finish())
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks_exact(8).all(|c| c == [0; 8]) && bytes.chunks_exact(8).remainder().iter().all(|&b| b == 0)
}

/// Copies `len` bytes at `offset` from `src` to `dst`, skipping all-zero chunks if `sparse`
/// (the destination then keeps its holes there). Returns the bytes written.
pub fn copy_range(src: &File, dst: &File, offset: u64, len: u64, sparse: bool, buf: &mut [u8]) -> std::io::Result<u64> {
    let mut written = 0;
    let mut off = offset;
    while off < offset + len {
        let k = (offset + len - off).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..k], off)?;
        if !(sparse && is_zero(&buf[..k])) {
            dst.write_all_at(&buf[..k], off)?;
            written += k as u64;
        }
        off += k as u64;
    }
    Ok(written)
}

// ---- The memory image ----

/// Where each RAM region lies in `memory.bin`: (first guest address, length, file offset).
fn ram_layout(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u64)> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let entry = (r.start_addr().raw_value(), r.len(), offset);
            offset += r.len();
            entry
        })
        .collect()
}

/// `memory.bin` being written.
pub struct MemoryImage {
    file: File,
    layout: Vec<(u64, u64, u64)>,
    size: u64,
}

impl MemoryImage {
    /// The image's size: all of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Makes what was written durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }

    pub fn create(path: &Path, mem: &GuestMemoryMmap) -> Result<Self> {
        let file = create_private(path).map_err(snap_err(format!("cannot create {}", path.display())))?;
        let layout = ram_layout(mem);
        let size = layout.iter().map(|r| r.1).sum();
        file.set_len(size).map_err(snap_err(format!("cannot size {}", path.display())))?;
        Ok(MemoryImage { file, layout, size })
    }

    fn offset_of(&self, gpa: u64) -> Option<u64> {
        self.layout
            .iter()
            .find(|(base, len, _)| gpa >= *base && gpa < base + len)
            .map(|(base, _, off)| off + gpa - base)
    }

    /// Writes the pages of `pages` (all-zero ones skipped if `skip_zero`: the first round
    /// writes into a fresh file, whose holes already read as zeros). Contiguous pages are
    /// written in runs. Returns the pages written.
    pub fn write_pages(&self, mem: &GuestMemoryMmap, pages: &PageSet, skip_zero: bool) -> Result<u64> {
        const RUN: usize = 256;
        let mut buf = vec![0u8; RUN * PAGE_SIZE as usize];
        let mut written = 0u64;
        let mut run: Option<(u64, usize)> = None; // (first gpa, pages)
        let mut flush = |run: (u64, usize), buf: &mut [u8]| -> Result<()> {
            let (gpa, n) = run;
            let bytes = &mut buf[..n * PAGE_SIZE as usize];
            mem.read_slice(bytes, GuestAddress(gpa)).map_err(|source| Error::GuestMemoryAccess {
                what: format!("snapshot: reading guest memory at {gpa:#x}"),
                source,
            })?;
            for (i, page) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
                if skip_zero && is_zero(page) {
                    continue;
                }
                let at = gpa + i as u64 * PAGE_SIZE;
                let off = self.offset_of(at).ok_or_else(|| Error::Capture(format!("page {at:#x} is not RAM")))?;
                self.file.write_all_at(page, off).map_err(snap_err("writing memory.bin".into()))?;
                written += 1;
            }
            Ok(())
        };
        for gpa in pages.addresses() {
            run = match run {
                Some((first, n)) if gpa == first + n as u64 * PAGE_SIZE && n < RUN => Some((first, n + 1)),
                Some(r) => {
                    flush(r, &mut buf)?;
                    Some((gpa, 1))
                }
                None => Some((gpa, 1)),
            };
        }
        if let Some(r) = run {
            flush(r, &mut buf)?;
        }
        Ok(written)
    }
}

/// Loads `memory.bin` into guest memory, checking its size and checksum.
/// Checks `memory.bin` against its size and checksum without loading it.
fn check_memory_image(path: &Path, entry: &FileEntry) -> Result<()> {
    let file = File::open(path).map_err(restore_err(format!("cannot open {}", path.display())))?;
    let size = file.metadata().map_err(restore_err(format!("cannot read {}", path.display())))?.len();
    if size != entry.size {
        return Err(Error::Restore(format!(
            "{} is {size} bytes; the manifest says {} (a truncated or foreign snapshot)",
            path.display(),
            entry.size
        )));
    }
    let hash = read_sparse::<Error>(&file, size, |_, _| Ok(()))?;
    if hex(hash) != entry.xxh3 {
        return Err(Error::Restore(format!(
            "{} is corrupt: its checksum is {}, the manifest says {}",
            path.display(),
            hex(hash),
            entry.xxh3
        )));
    }
    Ok(())
}

fn load_memory(path: &Path, entry: &FileEntry, mem: &GuestMemoryMmap) -> Result<()> {
    let file = File::open(path).map_err(restore_err(format!("cannot open {}", path.display())))?;
    let size = file.metadata().map_err(restore_err(format!("cannot read {}", path.display())))?.len();
    let layout = ram_layout(mem);
    let ram: u64 = layout.iter().map(|r| r.1).sum();
    if size != entry.size || size != ram {
        return Err(Error::Restore(format!(
            "{} is {size} bytes; the manifest says {}, and the VM has {ram} bytes of RAM (a truncated or foreign snapshot)",
            path.display(),
            entry.size
        )));
    }
    let hash = read_sparse::<Error>(&file, size, |offset, bytes| {
        // A chunk may straddle two regions: split it.
        let mut done = 0usize;
        while done < bytes.len() {
            let at = offset + done as u64;
            let (base, len, off) = layout
                .iter()
                .find(|(_, len, off)| at >= *off && at < off + len)
                .copied()
                .ok_or_else(|| Error::Restore(format!("memory.bin offset {at} is past the RAM")))?;
            let n = ((off + len - at) as usize).min(bytes.len() - done);
            mem.write_slice(&bytes[done..done + n], GuestAddress(base + at - off))
                .map_err(|source| Error::GuestMemoryAccess { what: "restore: writing guest memory".into(), source })?;
            done += n;
            let _ = len;
        }
        Ok(())
    })?;
    if hex(hash) != entry.xxh3 {
        return Err(Error::Restore(format!(
            "{} is corrupt: its checksum is {}, the manifest says {}",
            path.display(),
            hex(hash),
            entry.xxh3
        )));
    }
    Ok(())
}

/// The xxh3 of a file's content (holes as zeros) and its size.
pub fn checksum(path: &Path) -> Result<(u64, u64)> {
    let file = File::open(path).map_err(snap_err(format!("cannot read {}", path.display())))?;
    let size = file.metadata().map_err(snap_err(format!("cannot read {}", path.display())))?.len();
    let hash = read_sparse::<Error>(&file, size, |_, _| Ok(()))?;
    Ok((hash, size))
}

/// `state.bin` is small and read whole: its checksum is the plain xxh3 of its bytes.
pub fn state_entry(path: &Path) -> Result<FileEntry> {
    let bytes = std::fs::read(path).map_err(snap_err(format!("cannot read {}", path.display())))?;
    Ok(FileEntry { file: STATE.into(), size: bytes.len() as u64, xxh3: hex(ftvm_log::hash64(&bytes)) })
}

pub fn entry_for(dir: &Path, name: &str) -> Result<FileEntry> {
    let (hash, size) = checksum(&dir.join(name))?;
    Ok(FileEntry { file: name.into(), size, xxh3: hex(hash) })
}

// ---- Taking a snapshot ----

pub fn disk_file(index: usize) -> String {
    format!("disk{index}.img")
}

/// A snapshot read back and checked (everything but the memory, which is loaded into the VM).
pub struct Snapshot {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub state: VmState,
    /// Whether the manifest carries a valid seal of this user's snapshot key: written by
    /// this user's ftvm and not edited since. Only then are the paths it names trusted as
    /// the places to write disks back to.
    sealed: bool,
}

impl Snapshot {
    /// Reads and checks the manifest and the state file.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        if !dir.is_dir() {
            return Err(Error::Restore(format!("{} is not a directory", dir.display())));
        }
        let mut text = String::new();
        File::open(&path)
            .and_then(|f| f.take(MAX_MANIFEST_BYTES + 1).read_to_string(&mut text))
            .map_err(restore_err(format!("{} is not a snapshot: cannot read {}", dir.display(), path.display())))?;
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::Restore(format!(
                "{} is refused: it is larger than {MAX_MANIFEST_BYTES} bytes, which no manifest is (an edited or \
                 damaged manifest)",
                path.display()
            )));
        }
        let probe: serde_json::Value = serde_json::from_str(&text)
            .map_err(|source| Error::ManifestInvalid { path: path.to_path_buf(), source })?;
        if probe.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(Error::Restore(format!("{} is not an ftvm snapshot manifest", path.display())));
        }
        let version = probe.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version != u64::from(VERSION) {
            return Err(Error::Restore(format!(
                "the snapshot has format version {version}; this ftvm reads version {VERSION}"
            )));
        }
        let manifest: Manifest = serde_json::from_value(probe)
            .map_err(|source| Error::ManifestInvalid { path: path.to_path_buf(), source })?;
        if manifest.device_state_version != ftvm_devices::DEVICE_STATE_VERSION {
            return Err(Error::Restore(format!(
                "the snapshot holds device state version {}; this ftvm has device state version {} (taken by ftvm {})",
                manifest.device_state_version,
                ftvm_devices::DEVICE_STATE_VERSION,
                manifest.ftvm_version
            )));
        }
        check_manifest(dir, &path, &manifest)?;
        // The VM's memory is described three times: they must agree (an edited manifest
        // would otherwise build a VM of another size and fail later, less clearly).
        let layout = manifest.vm.memory_layout.iter().try_fold(0u64, |sum, r| sum.checked_add(r.size));
        let layout = layout.ok_or_else(|| {
            Error::Restore(format!("{} is refused: its memory layout adds up to more than 2^64 bytes", path.display()))
        })?;
        if manifest.vm.memory_size != layout || manifest.vm.memory_size != manifest.memory.size {
            return Err(Error::Restore(format!(
                "{} is inconsistent: vm.memory_size is {} bytes, but its memory layout holds {layout} bytes and \
                 memory.size is {} bytes (an edited or damaged manifest)",
                path.display(),
                manifest.vm.memory_size,
                manifest.memory.size
            )));
        }
        let state_path = dir.join(&manifest.state.file);
        let mut bytes = Vec::new();
        File::open(&state_path)
            .and_then(|f| f.take(MAX_STATE_BYTES + 1).read_to_end(&mut bytes))
            .map_err(restore_err(format!("cannot read {}", state_path.display())))?;
        let hash = ftvm_log::hash64(&bytes);
        if bytes.len() as u64 != manifest.state.size || hex(hash) != manifest.state.xxh3 {
            return Err(Error::Restore(format!(
                "{} is damaged ({} bytes, checksum {}; the manifest says {} bytes, checksum {})",
                state_path.display(),
                bytes.len(),
                hex(hash),
                manifest.state.size,
                manifest.state.xxh3
            )));
        }
        let state = VmState::decode(&bytes)?;
        if state.clock.guest_now != manifest.guest_time_ns {
            return Err(Error::Restore(format!(
                "{} is refused: its guest_time_ns is {}, but the guest time in {} is {} (an edited manifest)",
                path.display(),
                manifest.guest_time_ns,
                state_path.display(),
                state.clock.guest_now
            )));
        }
        let sealed = seal_verifies(dir, text.as_bytes());
        Ok(Snapshot { dir: dir.to_path_buf(), manifest, state, sealed })
    }

    /// Puts the snapshot's copy of disk `index` at `target` (checking it on the way), so
    /// that the restored VM finds its disk as it was. A read-only disk is left where it is.
    pub fn restore_disk(&self, index: usize, target: &Path) -> Result<()> {
        let Some(tmp) = self.stage_disk(index, target)? else { return Ok(()) };
        std::fs::rename(&tmp, target).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::RestoreIo { what: format!("cannot move {} to {}", tmp.display(), target.display()), source: e }
        })
    }

    /// The copy of disk `index`, verified, in a new file beside `target` (returned; `None`
    /// for a read-only disk): what [`Snapshot::restore_disk`] renames over the target. On an
    /// error nothing is left behind.
    fn stage_disk(&self, index: usize, target: &Path) -> Result<Option<PathBuf>> {
        let Some(entry) = self.manifest.disks.get(index) else {
            return Err(Error::Restore(format!("the snapshot has no disk {index}")));
        };
        let Some(copy) = &entry.copy else { return Ok(None) };
        let from = self.dir.join(&copy.file);
        let src = File::open(&from).map_err(restore_err(format!("cannot read {}", from.display())))?;
        let size = src.metadata().map_err(restore_err(format!("cannot read {}", from.display())))?.len();
        if size != copy.size {
            return Err(Error::Restore(format!(
                "{} is {size} bytes; the manifest says {} (truncated?)",
                from.display(),
                copy.size
            )));
        }
        // A new file beside the target, renamed over it once complete: a name no other file
        // has (nothing is truncated on the way), private until it replaces the target, whose
        // permissions it then keeps.
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = target.with_file_name(format!(".{name}.ftvm-restoring-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let dst = create_private(&tmp).map_err(restore_err(format!("cannot create {}", tmp.display())))?;
        let written = (|| -> Result<()> {
            if let Ok(meta) = std::fs::metadata(target) {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o777;
                let _ = dst.set_permissions(std::fs::Permissions::from_mode(mode));
            }
            dst.set_len(size).map_err(restore_err(format!("cannot size {}", tmp.display())))?;
            let hash = read_sparse::<Error>(&src, size, |offset, bytes| {
                if !is_zero(bytes) {
                    dst.write_all_at(bytes, offset).map_err(restore_err(format!("writing {}", tmp.display())))?;
                }
                Ok(())
            })?;
            if hex(hash) != copy.xxh3 {
                return Err(Error::Restore(format!(
                    "{} is corrupt: checksum {}, the manifest says {}",
                    from.display(),
                    hex(hash),
                    copy.xxh3
                )));
            }
            dst.sync_all().map_err(restore_err(format!("syncing {}", tmp.display())))
        })();
        match written {
            Ok(()) => Ok(Some(tmp)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Where disk `index`'s copy goes when the operator did not say (no `--disk`): back to
    /// the image the VM ran on, as the manifest names it. A manifest can be edited, so only
    /// a path that can be that image is taken: absolute, without `.` or `..`, through no
    /// symbolic link, an existing regular file (a restore rolls an image back, it creates
    /// none) of the copy's size, and not inside the snapshot. Anything else is refused,
    /// with the way out: `--disk PATH`.
    fn default_disk_target(&self, index: usize, d: &DiskEntry) -> Result<PathBuf> {
        let refuse = |why: String| {
            Error::Restore(format!(
                "disk {index}'s image {:?} named in the snapshot's manifest {why}; say where its copy goes with --disk PATH",
                d.source
            ))
        };
        let path = PathBuf::from(&d.source);
        if !path.is_absolute() {
            return Err(refuse("is not an absolute path".into()));
        }
        if path.components().any(|c| !matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_))) {
            return Err(refuse("has `.` or `..` in it".into()));
        }
        let meta = std::fs::symlink_metadata(&path).map_err(|e| refuse(format!("cannot be used ({e})")))?;
        if meta.file_type().is_symlink() {
            return Err(refuse("is a symbolic link".into()));
        }
        let real = std::fs::canonicalize(&path).map_err(|e| refuse(format!("cannot be used ({e})")))?;
        if real != path {
            return Err(refuse(format!("goes through a symbolic link (its real path is {})", real.display())));
        }
        if let Ok(snap) = std::fs::canonicalize(&self.dir) {
            if real.starts_with(&snap) {
                return Err(refuse("is inside the snapshot".into()));
            }
        }
        if !meta.is_file() {
            return Err(refuse("is not a regular file".into()));
        }
        if let Some(copy) = &d.copy {
            if meta.len() != copy.size {
                return Err(refuse(format!(
                    "is {} bytes; the disk the snapshot holds is {} bytes",
                    meta.len(),
                    copy.size
                )));
            }
        }
        if !self.sealed {
            return Err(refuse(format!(
                "is not trusted: the manifest has no valid seal ({SEAL}) of this user's snapshot key (it was \
                 edited, or taken by another user or on another host)"
            )));
        }
        Ok(path)
    }

    /// Loads the memory image into a VM built from this snapshot's configuration.
    pub fn load_memory(&self, mem: &GuestMemoryMmap) -> Result<()> {
        load_memory(&self.dir.join(&self.manifest.memory.file), &self.manifest.memory, mem)
    }

    /// The configuration of the VM the snapshot was taken of, with the host-side choices of
    /// this restore (console, TAPs, where the disks go). Checks the kernel and initrd are the
    /// images the snapshot names.
    pub fn vm_config(&self, host: &RestoreHost) -> Result<VmConfig> {
        let h = &self.manifest.vm;
        let kernel = check_image("kernel", &h.kernel, NamedBy::Snapshot)?;
        let initrd = h.initrd.as_ref().map(|i| check_image("initrd", i, NamedBy::Snapshot)).transpose()?;
        let nets = if host.nets.is_empty() {
            h.net.iter().map(|n| NetConfig { tap: n.tap.clone(), mac: Some(MacAddr(n.mac.0)) }).collect()
        } else if host.nets.len() != h.net.len() {
            return Err(Error::Restore(format!(
                "the snapshot's VM has {} network device(s); {} --net given",
                h.net.len(),
                host.nets.len()
            )));
        } else {
            // The guest knows its MAC: keep the snapshot's unless one is given (then it must match).
            host.nets
                .iter()
                .zip(&h.net)
                .map(|(n, saved)| NetConfig { tap: n.tap.clone(), mac: Some(n.mac.unwrap_or(MacAddr(saved.mac.0))) })
                .collect()
        };
        if !host.disks.is_empty() && host.disks.len() != self.manifest.disks.len() {
            return Err(Error::Restore(format!(
                "the snapshot's VM has {} disk(s); {} --disk given",
                self.manifest.disks.len(),
                host.disks.len()
            )));
        }
        let mut disks = Vec::new();
        for (i, d) in self.manifest.disks.iter().enumerate() {
            let path = match host.disks.get(i) {
                // Where the operator said.
                Some(given) => given.path.clone(),
                // Where the manifest says: only the image a VM can have run on.
                None => self.default_disk_target(i, d)?,
            };
            disks.push(DiskConfig { path, readonly: d.readonly });
        }
        Ok(VmConfig {
            boot: BootSpec { kernel, initrd, cmdline: h.cmdline.clone() },
            mem_size: h.memory_size,
            console: host.console.clone(),
            rtc_base_unix: Some(h.rtc_base_unix),
            nets,
            disks,
            rng: h.rng,
        })
    }
}

/// The kernel or initrd named in the manifest, checked to be the image the snapshot was
/// taken with (the guest's memory holds what was loaded from it).
pub fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where this user's snapshot key lives: `$FTVM_STATE_DIR`, else `$XDG_STATE_HOME/ftvm`,
/// else `~/.local/state/ftvm`, else a directory of this user's in the temporary directory.
fn key_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("FTVM_STATE_DIR") {
        return d;
    }
    if let Some(d) = var("XDG_STATE_HOME") {
        return d.join("ftvm");
    }
    if let Some(h) = var("HOME") {
        return h.join(".local").join("state").join("ftvm");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    std::env::temp_dir().join(format!("ftvm-state-{me}"))
}

/// This user's snapshot key (32 random bytes, made 0600 in a 0700 directory the first time
/// if `create`). A key file that another user could read or replace is not used.
pub fn snapshot_key(create: bool) -> std::result::Result<[u8; 32], String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = key_dir();
    let path = dir.join(SNAPSHOT_KEY);
    if create && std::fs::symlink_metadata(&path).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| format!("the host's random source failed: {e}"))?;
        match create_private(&path).and_then(|mut f| f.write_all(&key).and_then(|()| f.sync_all())) {
            Ok(()) => return Ok(key),
            // Another ftvm made it meanwhile: read theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
        }
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let meta = std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() || meta.uid() != me || meta.permissions().mode() & 0o077 != 0 || meta.len() != 32 {
        return Err(format!(
            "{} is not a key file of this user's (a regular 32-byte file, mode 0600, owned by uid {me})",
            path.display()
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    bytes.try_into().map_err(|_| format!("{} changed while it was read", path.display()))
}

/// Whether `manifest` (the bytes of `dir`'s manifest) carries a valid seal of this user's key.
fn seal_verifies(dir: &Path, manifest: &[u8]) -> bool {
    let mut text = Vec::new();
    let read = File::open(dir.join(SEAL)).and_then(|f| f.take(256).read_to_end(&mut text));
    let Ok(tag) = read.map(|_| text.trim_ascii().to_vec()) else { return false };
    let Some(tag) = (tag.len() == 64)
        .then(|| tag.chunks(2).map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok()).collect())
        .flatten()
    else {
        return false;
    };
    let tag: Vec<u8> = tag;
    snapshot_key(false).is_ok_and(|key| seal_matches(&key, manifest, &tag))
}

/// The manifest's seal: HMAC-SHA256 of its bytes under the snapshot key.
pub fn seal_tag(key: &[u8; 32], manifest: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    // A 32-byte key always fits HMAC-SHA256 (any length does).
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(manifest);
    mac.finalize().into_bytes().into()
}

/// Whether `tag` is `manifest`'s seal under `key`, compared in constant time.
fn seal_matches(key: &[u8; 32], manifest: &[u8], tag: &[u8]) -> bool {
    use hmac::Mac;
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(key) else { return false };
    mac.update(manifest);
    mac.verify_slice(tag).is_ok()
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Bounds of what a real snapshot holds: a manifest beyond them is refused before anything
/// is read on its word. The VM state (`state.bin`) is read whole, so it has a size bound.
const MAX_STATE_BYTES: u64 = 64 << 20;
/// `snapshot.json` is read whole too (a real one is a few KiB: the log header's CPUID and
/// devices, the disks, the rounds).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// A snapshot writes `disk0.img` to `disk15.img` at most.
const MAX_DISKS: usize = 16;
/// A disk copy: 64 TiB.
const MAX_DISK_BYTES: u64 = 1 << 46;
/// The guest clock: about 146 years of guest time.
pub const MAX_GUEST_TIME_NS: u64 = 1 << 62;
/// Memory regions of a VM's layout, and pre-copy rounds listed.
const MAX_REGIONS: usize = 8;
const MAX_ROUNDS_LISTED: usize = 64;

/// The manifest's values within the bounds of a real snapshot, and its files the snapshot's
/// own: the names a snapshot writes, regular files in `dir` (no symbolic link out of it).
/// Checked before anything is read or written on the manifest's word.
fn check_manifest(dir: &Path, path: &Path, m: &Manifest) -> Result<()> {
    let refuse =
        |why: String| Error::Restore(format!("{} is refused: {why} (an edited or damaged manifest)", path.display()));
    if m.guest_time_ns > MAX_GUEST_TIME_NS {
        return Err(refuse(format!(
            "guest_time_ns is {}, beyond any guest's clock (at most {MAX_GUEST_TIME_NS}, about 146 years)",
            m.guest_time_ns
        )));
    }
    if !(m.pause_ms.is_finite() && m.pause_ms >= 0.0) {
        return Err(refuse(format!("pause_ms is {}", m.pause_ms)));
    }
    if m.rounds.len() > MAX_ROUNDS_LISTED {
        return Err(refuse(format!("it lists {} pre-copy rounds", m.rounds.len())));
    }
    let (min, max) = (crate::memory::MIN_MEM, crate::memory::MAX_MEM);
    if m.vm.memory_layout.len() > MAX_REGIONS {
        return Err(refuse(format!("its memory layout has {} regions", m.vm.memory_layout.len())));
    }
    for (what, size) in [("memory.size", m.memory.size), ("vm.memory_size", m.vm.memory_size)] {
        if !(min..=max).contains(&size) || size % PAGE_SIZE != 0 {
            return Err(refuse(format!(
                "{what} is {size} bytes; guest memory is {min} to {max} bytes, in 4 KiB pages"
            )));
        }
    }
    if m.state.file != STATE || m.memory.file != MEMORY {
        return Err(refuse(format!(
            "its files are {:?} and {:?}; a snapshot's are {STATE} and {MEMORY}, in its directory",
            m.state.file, m.memory.file
        )));
    }
    if m.state.size > MAX_STATE_BYTES {
        return Err(refuse(format!("{STATE} is {} bytes; a VM state is at most {MAX_STATE_BYTES}", m.state.size)));
    }
    if m.disks.len() > MAX_DISKS {
        return Err(refuse(format!("it lists {} disks; a snapshot holds at most {MAX_DISKS}", m.disks.len())));
    }
    let mut own = vec![STATE.to_string(), MEMORY.to_string()];
    for (i, d) in m.disks.iter().enumerate() {
        match (&d.copy, d.readonly) {
            (None, true) => {}
            (Some(copy), false) => {
                if copy.file != disk_file(i) {
                    return Err(refuse(format!(
                        "disk {i}'s copy is {:?}; a snapshot names it {}",
                        copy.file,
                        disk_file(i)
                    )));
                }
                if copy.size > MAX_DISK_BYTES || copy.size % 512 != 0 {
                    return Err(refuse(format!("{} is {} bytes", copy.file, copy.size)));
                }
                own.push(copy.file.clone());
            }
            (None, false) => return Err(refuse(format!("writable disk {i} has no copy"))),
            (Some(_), true) => return Err(refuse(format!("read-only disk {i} has a copy"))),
        }
    }
    for name in own {
        let file = dir.join(&name);
        match std::fs::symlink_metadata(&file) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(Error::Restore(format!(
                    "{} is a symbolic link: a snapshot's files are its own, in its directory",
                    file.display()
                )))
            }
            Ok(meta) if !meta.is_file() => {
                return Err(Error::Restore(format!("{} is not a regular file", file.display())))
            }
            Ok(_) => {}
            Err(source) => return Err(Error::RestoreIo { what: format!("cannot read {}", file.display()), source }),
        }
    }
    Ok(())
}

/// Whether `vm` is the machine the snapshot was taken of (CPUID, XSAVE, memory layout,
/// command line, devices, MACs): what differs is reported.
fn same_machine(vm: &Vm, snap: &Snapshot) -> Result<()> {
    let saved = &snap.manifest.vm;
    let ours = header_for(vm, saved.kernel.clone(), saved.initrd.clone(), saved.disks.clone(), saved.rtc_base_unix);
    // `compare` reports its receiver as "ours": this VM, against the snapshot's ("theirs").
    let differences: Vec<String> = ours
        .compare(saved)
        .into_iter()
        .filter(|m| m.significant && !m.field.starts_with("console") && !m.field.starts_with("disks"))
        .map(|m| m.to_string())
        .collect();
    if !differences.is_empty() {
        return Err(Error::Restore(format!(
            "this VM cannot continue the snapshot exactly; it differs in:\n  {}",
            differences.join("\n  ")
        )));
    }
    Ok(())
}

/// The host-side choices of a restore.
#[derive(Debug, Clone)]
pub struct RestoreHost {
    pub console: ConsoleConfig,
    /// TAPs (and optionally MACs, which must then be the snapshot's); none: the snapshot's.
    pub nets: Vec<NetConfig>,
    /// Where each disk's copy goes; none: back to the images the VM ran on.
    pub disks: Vec<DiskConfig>,
}

/// Builds the VM a snapshot was taken of, ready to continue where it was: the disks put back
/// from the snapshot's copies, the memory loaded, the vCPU and device state to be applied
/// when it runs. The machine must be the same (CPUID, XSAVE, memory layout, devices, MACs):
/// what differs is reported.
pub fn restore(dir: &Path, host: &RestoreHost) -> Result<Vm> {
    restore_snapshot(Snapshot::open(dir)?, host, true)
}

/// [`restore`] of a snapshot already opened; `open_taps` false for a replay (no network).
pub fn restore_snapshot(snap: Snapshot, host: &RestoreHost, open_taps: bool) -> Result<Vm> {
    let started = Instant::now();
    let dir = snap.dir.clone();
    let config = snap.vm_config(host)?;
    // Everything is checked before anything changes: a disk is rolled back only once the
    // machine is known to be the snapshot's (a VM built to compare, then dropped: the real
    // one must open the disks after they were put back) and every disk copy is verified.
    let restoring: Vec<usize> = (0..config.disks.len()).filter(|&i| snap.manifest.disks[i].copy.is_some()).collect();
    if !restoring.is_empty() {
        // The probe runs on the snapshot's own copies, read-only (a target may not exist
        // yet), with no console and no TAP: the machine is all it is built for.
        let mut probe = config.clone();
        probe.console = ConsoleConfig::Discard;
        for &i in &restoring {
            if let Some(copy) = &snap.manifest.disks[i].copy {
                probe.disks[i] = DiskConfig { path: snap.dir.join(&copy.file), readonly: true };
            }
        }
        same_machine(&Vm::build_with(probe, false)?, &snap)?;
        // The memory image too (read again when it is loaded: from the page cache).
        check_memory_image(&snap.dir.join(&snap.manifest.memory.file), &snap.manifest.memory)?;
        let mut staged: Vec<(PathBuf, &Path)> = Vec::new();
        for &i in &restoring {
            let target = &config.disks[i].path;
            match snap.stage_disk(i, target) {
                Ok(Some(tmp)) => staged.push((tmp, target)),
                Ok(None) => {}
                Err(e) => {
                    for (tmp, _) in &staged {
                        let _ = std::fs::remove_file(tmp);
                    }
                    return Err(e);
                }
            }
        }
        for (n, (i, (tmp, target))) in restoring.iter().zip(&staged).enumerate() {
            tracing::info!(
                target: "ftvm::event",
                event = "restoring_disk",
                disk = i,
                path = %target.display(),
                "restoring disk {i} from the snapshot into {}",
                target.display()
            );
            if let Err(e) = std::fs::rename(tmp, target) {
                for (tmp, _) in &staged[n..] {
                    let _ = std::fs::remove_file(tmp);
                }
                let what = format!("cannot move {} to {}", tmp.display(), target.display());
                return Err(Error::RestoreIo { what, source: e });
            }
        }
    }
    let mut vm = Vm::build_with(config, open_taps)?;
    same_machine(&vm, &snap)?;
    crate::vcpu_state::check_xsave_size(vm.identity().xsave_size)?;
    discard_ram(vm.memory())?;
    snap.load_memory(vm.memory())?;
    tracing::info!(
        "restored {} (guest time {:.3} s) in {:.0} ms",
        dir.display(),
        snap.manifest.guest_time_ns as f64 / 1e9,
        ms(started.elapsed())
    );
    vm.continue_from(snap.state);
    Ok(vm)
}

/// Makes all of guest RAM read as zeros again without touching it (what the boot loader
/// wrote goes; pages become demand-zero): a snapshot's memory image leaves its zero pages out.
fn discard_ram(mem: &GuestMemoryMmap) -> Result<()> {
    for region in mem.iter() {
        // SAFETY: the range is exactly the region's anonymous private mapping, which lives as
        // long as `mem`; MADV_DONTNEED on it only drops page contents (they read as zeros).
        let ret = unsafe {
            libc::madvise(region.as_ptr().cast::<libc::c_void>(), region.len() as usize, libc::MADV_DONTNEED)
        };
        if ret != 0 {
            return Err(Error::Restore(format!(
                "cannot clear guest memory (madvise): {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvm-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Found writing the snapshot_manifest fuzz target (fuzz/), by reading the code: the
    /// manifest was read whole, however large, before anything was checked, so a
    /// `snapshot.json` that is a link to /dev/zero was read until memory ran out.
    #[test]
    fn a_manifest_too_large_is_refused_before_it_is_read_whole() {
        let dir = scratch("huge-manifest");
        let mut text = b"{\"format\": \"ftvm-snapshot\"}".to_vec();
        text.resize(MAX_MANIFEST_BYTES as usize + 1, b' ');
        std::fs::write(dir.join(MANIFEST), &text).unwrap();
        let err = Snapshot::open(&dir).err().expect("refused").to_string();
        assert!(err.contains("is refused") && err.contains("larger than"), "{err}");
        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join(MANIFEST)).unwrap();
        let err = Snapshot::open(&dir).err().expect("refused").to_string();
        assert!(err.contains("larger than"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn memory_images_round_trip_sparse_and_checked() {
        let dir = scratch("mem");
        let mem = crate::memory::allocate(4 * crate::memory::MIB).unwrap();
        mem.write_slice(&[7; 100], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[9; 4096], GuestAddress(0x3f_f000)).unwrap();
        let path = dir.join(MEMORY);
        let image = MemoryImage::create(&path, &mem).unwrap();
        assert_eq!(image.write_pages(&mem, &PageSet::all(&mem), true).unwrap(), 2, "zero pages are skipped");
        // A page that later turns to zeros is written as zeros in a later round.
        mem.write_slice(&[0; 100], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[5; 8], GuestAddress(0x2000)).unwrap();
        let mut dirty = PageSet::none(&mem);
        dirty.insert(0x1000);
        dirty.insert(0x2000);
        assert_eq!(image.write_pages(&mem, &dirty, false).unwrap(), 2);
        let entry = FileEntry { file: MEMORY.into(), size: image.size, xxh3: String::new() };
        let (hash, size) = checksum(&path).unwrap();
        assert_eq!(size, 4 * crate::memory::MIB);
        let entry = FileEntry { xxh3: hex(hash), ..entry };
        let fresh = crate::memory::allocate(4 * crate::memory::MIB).unwrap();
        load_memory(&path, &entry, &fresh).unwrap();
        let mut b = [0u8; 4];
        fresh.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, [0; 4]);
        fresh.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!(b, [5; 4]);
        fresh.read_slice(&mut b, GuestAddress(0x3f_fffc)).unwrap();
        assert_eq!(b, [9; 4]);
        // A damaged image is refused with its checksum.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[1], 0x20_0000).unwrap();
        let err = load_memory(&path, &entry, &fresh).unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
        // A truncated one by its size.
        f.set_len(4096).unwrap();
        let err = load_memory(&path, &entry, &fresh).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
