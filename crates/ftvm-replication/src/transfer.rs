//! Shipping a staged snapshot directory over a replication connection (a live state
//! transfer): the primary took the snapshot live into a local directory; the files go to
//! the backup's directory, sparse (the sender reads only their non-zero blocks: see
//! `ftvm_vmm::snapshot::ship`), the manifest last, so that the backup's copy is complete
//! exactly when its manifest exists. The backup then restores it with the snapshot code's checks (checksums,
//! versions, machine identity).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::link::{read_blob, write_blob};
use crate::protocol::{XFER_CHUNK, XFER_DATA, XFER_FILE, XFER_MANIFEST};
use crate::{Error, Result};

/// The manifest, sent last.
pub const MANIFEST: &str = "snapshot.json";

fn err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Io(format!("{what}: {e}"))
}

fn net(e: std::io::Error) -> Error {
    Error::Io(format!("sending the state to the backup: {e}"))
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

/// Receives a directory sent by [`send_dir`] into `dir` (new or empty). `received` counts
/// the data bytes.
pub fn receive_dir(r: &mut dyn Read, dir: &Path, received: &AtomicU64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(err(format!("cannot create {}", dir.display())))?;
    let bad = |what: String| Error::Io(format!("the state transfer is malformed: {what}"));
    let net = |e: std::io::Error| Error::Io(format!("receiving the state: {e}"));
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
                std::fs::write(&path, manifest).map_err(err(format!("cannot write {}", path.display())))?;
                return Ok(());
            }
            other => return Err(bad(format!("record type {other:#x}"))),
        }
    }
}
