//! Shipping a staged snapshot directory over a replication connection (a live state
//! transfer): the primary took the snapshot live into a local directory; the files go to
//! the backup's directory, sparse (the sender reads only their non-zero blocks: see
//! `ftvm_vmm::snapshot::ship`), the manifest last, so that the backup's copy is complete
//! exactly when its manifest exists. The backup then restores it with the snapshot code's checks (checksums,
//! versions, machine identity).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::link::{read_blob, write_blob};
use crate::protocol::{XFER_CHUNK, XFER_DATA, XFER_FILE, XFER_MANIFEST};
use crate::{Error, Result};

/// The manifest, sent last.
pub const MANIFEST: &str = "snapshot.json";

/// Modes of the received state: guest memory and disks, readable by ftvm's user alone, from
/// the moment they exist.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

fn err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn net(source: std::io::Error) -> Error {
    Error::Io { what: "sending the state to the backup".into(), source }
}

/// Writes the records of a transfer: each file's name and size, its non-zero data (the
/// caller reads the file sparsely), the manifest last. `sent` counts the data bytes.
pub struct DirSender<'a> {
    w: &'a mut dyn Write,
    sent: &'a AtomicU64,
}

impl<'a> DirSender<'a> {
    pub fn new(w: &'a mut dyn Write, sent: &'a AtomicU64) -> Self {
        DirSender { w, sent }
    }

    /// A file begins (everything not sent of it reads as zeros on the other side).
    pub fn file(&mut self, name: &str, size: u64) -> Result<()> {
        self.w.write_all(&[XFER_FILE]).map_err(net)?;
        self.w.write_all(&(name.len() as u16).to_le_bytes()).map_err(net)?;
        self.w.write_all(name.as_bytes()).map_err(net)?;
        self.w.write_all(&size.to_le_bytes()).map_err(net)
    }

    /// Bytes of the current file at `offset`, in records of at most [`XFER_CHUNK`].
    pub fn data(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        for (i, chunk) in bytes.chunks(XFER_CHUNK).enumerate() {
            self.w.write_all(&[XFER_DATA]).map_err(net)?;
            self.w.write_all(&(offset + (i * XFER_CHUNK) as u64).to_le_bytes()).map_err(net)?;
            write_blob(self.w, chunk).map_err(net)?;
            self.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The manifest: the transfer is complete.
    pub fn manifest(self, manifest: &[u8]) -> Result<()> {
        self.w.write_all(&[XFER_MANIFEST]).map_err(net)?;
        write_blob(self.w, manifest).map_err(net)?;
        self.w.flush().map_err(net)
    }
}

/// The prefixes of the staging directories of a state transfer: `ftvm-transfer-PID-N` on
/// the sending side, `ftvm-incoming-PID-N` on the receiving one, PID the process that owns it.
pub const STAGING_PREFIXES: [&str; 2] = ["ftvm-transfer-", "ftvm-incoming-"];

/// The owner's PID, if `name` is the name of a staging directory.
pub fn staging_owner(name: &str) -> Option<u32> {
    let rest = STAGING_PREFIXES.iter().find_map(|p| name.strip_prefix(p))?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok().filter(|&p| p > 0)
}

/// Whether process `pid` exists (in this PID namespace).
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists and
    // may be signalled.
    let ret = unsafe { libc::kill(pid, 0) };
    ret == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes the staging directories in `parent` that a process left behind when it died
/// mid-transfer (killed, crashed): those named for a PID that no longer exists, owned by
/// this user. A transfer calls it before it stages, so that what a dead one left (up to the
/// guest's memory and disks, each time) does not pile up. Returns how many were removed.
///
/// A process of another PID namespace that shares this directory looks dead from here:
/// give each such host its own `TMPDIR` (as separate hosts have).
pub fn remove_stale_staging(parent: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else { return 0 };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(staging_owner) else { continue };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        // Not a symbolic link, and ours: nothing else is touched.
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else { continue };
        if !meta.is_dir() || std::os::unix::fs::MetadataExt::uid(&meta) != me {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => {
                tracing::info!("removed {}, left behind by process {pid}, which is gone", entry.path().display());
                removed += 1;
            }
            Err(e) => tracing::warn!("cannot remove the stale {}: {e}", entry.path().display()),
        }
    }
    removed
}

/// Makes `dir` for received state: new, or an empty directory that is this user's and
/// private (a directory someone else prepared at a predictable name is refused, not
/// written into).
fn make_private_dir(dir: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Its parent is missing: made private too.
            return std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(err(format!("cannot create {}", dir.display())));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(format!("cannot create {}", dir.display()))(e)),
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(dir).map_err(err(format!("cannot read {}", dir.display())))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let empty = std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(false);
    if !meta.is_dir() || meta.uid() != me || meta.permissions().mode() & 0o077 != 0 || !empty {
        return Err(Error::Refused(format!(
            "{} exists and is not an empty private directory of this user: the state is not received into it",
            dir.display()
        )));
    }
    Ok(())
}

/// Receives a directory sent by [`send_dir`] into `dir` (new, or empty and private; made
/// 0700, its files 0600). `received` counts the data bytes. Stale staging directories
/// beside `dir` are removed first ([`remove_stale_staging`]).
pub fn receive_dir(r: &mut dyn Read, dir: &Path, received: &AtomicU64) -> Result<()> {
    if let Some(parent) = dir.parent() {
        remove_stale_staging(parent);
    }
    make_private_dir(dir)?;
    let bad = |what: String| Error::Refused(format!("the state transfer is malformed: {what}"));
    let net = |source: std::io::Error| Error::Io { what: "receiving the state".into(), source };
    let mut current: Option<(File, u64)> = None;
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag).map_err(net)?;
        match tag[0] {
            XFER_FILE => {
                let mut len = [0u8; 2];
                r.read_exact(&mut len).map_err(net)?;
                let mut name = vec![0u8; u16::from_le_bytes(len) as usize];
                r.read_exact(&mut name).map_err(net)?;
                let name = String::from_utf8(name).map_err(|_| bad("a file name that is not UTF-8".into()))?;
                // Only plain names: nothing outside the directory.
                if name.is_empty() || name.contains('/') || name.starts_with('.') || name == MANIFEST {
                    return Err(bad(format!("file name {name:?}")));
                }
                let mut size = [0u8; 8];
                r.read_exact(&mut size).map_err(net)?;
                let size = u64::from_le_bytes(size);
                let path = dir.join(&name);
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(FILE_MODE)
                    .open(&path)
                    .map_err(err(format!("cannot create {}", path.display())))?;
                file.set_len(size).map_err(err(format!("cannot size {}", path.display())))?;
                current = Some((file, size));
            }
            XFER_DATA => {
                let Some((file, size)) = &current else { return Err(bad("data before any file".into())) };
                let mut off = [0u8; 8];
                r.read_exact(&mut off).map_err(net)?;
                let off = u64::from_le_bytes(off);
                let data = read_blob(r, XFER_CHUNK).map_err(net)?;
                if off.checked_add(data.len() as u64).is_none_or(|end| end > *size) {
                    return Err(bad(format!("data at {off:#x} beyond the file's {size} bytes")));
                }
                file.write_all_at(&data, off).map_err(err("writing the received state".into()))?;
                received.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            XFER_MANIFEST => {
                let manifest = read_blob(r, 1 << 24).map_err(net)?;
                if let Some((file, _)) = current.take() {
                    file.sync_all().map_err(err("syncing the received state".into()))?;
                }
                let path = dir.join(MANIFEST);
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(FILE_MODE)
                    .open(&path)
                    .and_then(|mut f| f.write_all(&manifest))
                    .map_err(err(format!("cannot write {}", path.display())))?;
                return Ok(());
            }
            other => return Err(bad(format!("record type {other:#x}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvm-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// A transfer of one file and the manifest.
    fn wire() -> Vec<u8> {
        let mut wire = Vec::new();
        let sent = AtomicU64::new(0);
        let mut s = DirSender::new(&mut wire, &sent);
        s.file("memory.bin", 8192).unwrap();
        s.data(4096, b"the guest's secret").unwrap();
        s.manifest(b"{}").unwrap();
        wire
    }

    /// A PID that no process has: a child that was waited for.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn received_state_is_private_from_creation() {
        let base = scratch("modes");
        // Even under the most permissive umask: the modes are given at creation.
        // SAFETY: umask has no preconditions; the old mask is put back below.
        let old = unsafe { libc::umask(0) };
        let dst = base.join("ftvm-incoming-1-0");
        let got = receive_dir(&mut wire().as_slice(), &dst, &AtomicU64::new(0));
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        got.unwrap();
        assert_eq!(mode(&dst), 0o700);
        assert_eq!(mode(&dst.join("memory.bin")), 0o600);
        assert_eq!(mode(&dst.join(MANIFEST)), 0o600);
        assert_eq!(std::fs::read(dst.join("memory.bin")).unwrap()[4096..4114], *b"the guest's secret");

        // A directory prepared by someone else at the name (readable by others, or not
        // empty) is refused, not written into.
        let open = base.join("ftvm-incoming-1-1");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = receive_dir(&mut wire().as_slice(), &open, &AtomicU64::new(0)).unwrap_err();
        assert!(e.to_string().contains("not an empty private directory"), "{e}");
        assert!(!open.join("memory.bin").exists());
        let full = base.join("ftvm-incoming-1-2");
        std::fs::create_dir(&full).unwrap();
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(full.join("x"), b"").unwrap();
        assert!(receive_dir(&mut wire().as_slice(), &full, &AtomicU64::new(0)).is_err());
        let victim = base.join("victim");
        std::fs::create_dir(&victim).unwrap();
        let link = base.join("ftvm-incoming-1-3");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(receive_dir(&mut wire().as_slice(), &link, &AtomicU64::new(0)).is_err());
        assert!(!victim.join("memory.bin").exists(), "nothing is written through a symbolic link");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn staging_left_by_a_dead_process_is_removed_when_a_transfer_starts() {
        let base = scratch("stale");
        let dead = dead_pid();
        let mut alive = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let stale = [base.join(format!("ftvm-transfer-{dead}-0")), base.join(format!("ftvm-incoming-{dead}-7"))];
        for d in &stale {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("memory.bin"), vec![1u8; 1 << 16]).unwrap();
        }
        let kept = [
            base.join(format!("ftvm-transfer-{}-0", std::process::id())),
            base.join(format!("ftvm-incoming-{}-1", alive.id())),
            base.join(format!("ftvm-other-{dead}-0")),
            base.join(format!("ftvm-transfer-x{dead}-0")),
        ];
        for d in &kept {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("memory.bin"), b"in use").unwrap();
        }
        // A link named like a dead process's staging: the link's target is not touched.
        let victim = base.join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("data"), b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, base.join(format!("ftvm-incoming-{dead}-9"))).unwrap();

        let dst = base.join(format!("ftvm-incoming-{}-5", std::process::id()));
        receive_dir(&mut wire().as_slice(), &dst, &AtomicU64::new(0)).unwrap();
        for d in &stale {
            assert!(!d.exists(), "{} was left by a process that is gone", d.display());
        }
        for d in &kept {
            assert!(d.join("memory.bin").exists(), "{} is not stale", d.display());
        }
        assert_eq!(std::fs::read(victim.join("data")).unwrap(), b"keep");
        assert!(dst.join(MANIFEST).exists());
        // Nothing stale left: nothing more is removed, until the live owner dies too.
        assert_eq!(remove_stale_staging(&base), 0);
        let _ = alive.kill();
        let _ = alive.wait();
        assert_eq!(remove_stale_staging(&base), 1);
        assert!(!kept[1].exists());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn staging_names_give_their_owner() {
        assert_eq!(staging_owner("ftvm-transfer-123-0"), Some(123));
        assert_eq!(staging_owner("ftvm-incoming-9-18446744073709551615"), Some(9));
        for name in ["ftvm-transfer-0-1", "ftvm-transfer-123", "ftvm-transfer--1", "ftvm-replay-5-1", "x", ""] {
            assert_eq!(staging_owner(name), None, "{name}");
        }
    }
}
