//! Shipping a staged snapshot directory over a replication connection (a live state
//! transfer): the primary took the snapshot live into a local directory; the files go to
//! the backup's directory, sparse (only data extents, and of those only non-zero blocks),
//! the manifest last, so that the backup's copy is complete exactly when its manifest
//! exists. The backup then restores it with the snapshot code's checks (checksums,
//! versions, machine identity).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::link::{read_blob, write_blob};
use crate::protocol::{XFER_CHUNK, XFER_DATA, XFER_FILE, XFER_MANIFEST};
use crate::{Error, Result};

/// The manifest, sent last.
pub const MANIFEST: &str = "snapshot.json";
/// Block granularity of the zero test.
const BLOCK: usize = 4096;

fn err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Io(format!("{what}: {e}"))
}

/// The extents of `file` that hold data (SEEK_DATA/SEEK_HOLE; all of it where unsupported).
fn data_extents(file: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on a file descriptor we own; no memory is involved.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            if out.is_empty() && pos == 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ENXIO) {
                    return vec![(0, size)];
                }
            }
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size as i64 } else { hole.min(size as i64) };
        if end > data {
            out.push((data as u64, (end - data) as u64));
        }
        pos = end;
    }
    out
}

/// Sends every file of `dir` (the manifest last). `sent` counts the bytes sent.
pub fn send_dir(w: &mut dyn Write, dir: &Path, sent: &AtomicU64) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(err(format!("cannot read {}", dir.display())))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != MANIFEST)
        .collect();
    names.sort();
    let mut buf = vec![0u8; XFER_CHUNK];
    let net = |e: std::io::Error| Error::Io(format!("sending the state to the backup: {e}"));
    for name in &names {
        let path = dir.join(name);
        let file = File::open(&path).map_err(err(format!("cannot read {}", path.display())))?;
        let size = file.metadata().map_err(err(format!("cannot read {}", path.display())))?.len();
        w.write_all(&[XFER_FILE]).map_err(net)?;
        w.write_all(&(name.len() as u16).to_le_bytes()).map_err(net)?;
        w.write_all(name.as_bytes()).map_err(net)?;
        w.write_all(&size.to_le_bytes()).map_err(net)?;
        for (start, len) in data_extents(&file, size) {
            let mut off = start;
            while off < start + len {
                let n = ((start + len - off) as usize).min(XFER_CHUNK);
                file.read_exact_at(&mut buf[..n], off).map_err(err(format!("reading {}", path.display())))?;
                // Runs of non-zero blocks go out; zero blocks are holes on the other side too.
                let mut i = 0;
                while i < n {
                    let run_start = i;
                    while i < n && !is_zero(&buf[i..(i + BLOCK).min(n)]) {
                        i += BLOCK;
                    }
                    let run_end = i.min(n);
                    if run_end > run_start {
                        w.write_all(&[XFER_DATA]).map_err(net)?;
                        w.write_all(&(off + run_start as u64).to_le_bytes()).map_err(net)?;
                        write_blob(w, &buf[run_start..run_end]).map_err(net)?;
                        sent.fetch_add((run_end - run_start) as u64, Ordering::Relaxed);
                    }
                    while i < n && is_zero(&buf[i..(i + BLOCK).min(n)]) {
                        i += BLOCK;
                    }
                }
                off += n as u64;
            }
        }
    }
    let manifest =
        std::fs::read(dir.join(MANIFEST)).map_err(err(format!("cannot read the manifest in {}", dir.display())))?;
    w.write_all(&[XFER_MANIFEST]).map_err(net)?;
    write_blob(w, &manifest).map_err(net)?;
    w.flush().map_err(net)?;
    Ok(())
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_directory_arrives_whole() {
        let base = std::env::temp_dir().join(format!("ftvm-xfer-{}", std::process::id()));
        let (src, dst) = (base.join("src"), base.join("dst"));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&src).unwrap();
        let f = File::create(src.join("memory.bin")).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7; 5000], 3 << 20).unwrap();
        f.write_all_at(&[9; 10], (64 << 20) - 10).unwrap();
        std::fs::write(src.join("state.bin"), b"state").unwrap();
        std::fs::write(src.join(MANIFEST), b"{}").unwrap();
        let mut wire = Vec::new();
        let sent = AtomicU64::new(0);
        send_dir(&mut wire, &src, &sent).unwrap();
        assert!(wire.len() < 64 << 10, "holes and zero blocks are not sent ({} bytes)", wire.len());
        let got = AtomicU64::new(0);
        receive_dir(&mut wire.as_slice(), &dst, &got).unwrap();
        assert_eq!(sent.load(Ordering::Relaxed), got.load(Ordering::Relaxed));
        for name in ["memory.bin", "state.bin", MANIFEST] {
            assert_eq!(std::fs::read(src.join(name)).unwrap(), std::fs::read(dst.join(name)).unwrap(), "{name}");
        }
        // A truncated stream or a hostile name is an error, not a panic.
        assert!(receive_dir(&mut &wire[..wire.len() / 2], &base.join("cut"), &got).is_err());
        let mut evil = vec![XFER_FILE];
        evil.extend_from_slice(&5u16.to_le_bytes());
        evil.extend_from_slice(b"../x1");
        evil.extend_from_slice(&0u64.to_le_bytes());
        assert!(receive_dir(&mut evil.as_slice(), &base.join("evil"), &got).is_err());
        let _ = std::fs::remove_dir_all(&base);
    }
}
