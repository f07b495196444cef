//! The machine's identity: what a log header or a snapshot's manifest pins about a VM (its
//! images by SHA-256, memory, CPUID, XSAVE, devices), built once here for record, replay,
//! snapshots and the pair, and the one check of a named image used by replay, restore and
//! the pair.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ftvm_log::{CpuidEntry, ImageInfo, LogHeader, MacAddr as LogMac, MemRegion, NetDevice};
use ftvm_virtio::net::MacAddr;
use sha2::{Digest, Sha256};

pub use crate::error::NamedBy;
use crate::error::{Error, ImageProblem, Result};
use crate::vm::{ConsoleConfig, Vm};

/// The device model's version: any change to what a device does for the same inputs bumps
/// it, so that a log is never replayed on a device model that would behave differently.
/// 2: the ACPI PM timer at 0x608.
pub const DEVICE_MODEL_VERSION: u32 = 2;

/// Opens an image to hash: a regular file or a block device (a disk), never something that
/// reads for ever or blocks (`/dev/zero`, a FIFO: a crafted log header can name them).
fn open_hashable(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let t = file.metadata()?.file_type();
    if t.is_file() || t.is_block_device() {
        Ok(file)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {}; only a regular file or a block device is accepted", crate::boot::file_kind(&t)),
        ))
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let f = open_hashable(path).map_err(|source| Error::ReadFile { path: path.to_path_buf(), source })?;
    sha256_of(f, path)
}

/// SHA-256 of what `f` (opened from `path`) holds, hex.
fn sha256_of(mut f: File, path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|source| Error::ReadFile { path: path.to_path_buf(), source })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

pub fn image_info(path: &Path) -> Result<ImageInfo> {
    let size = std::fs::metadata(path).map_err(|source| Error::ReadFile { path: path.to_path_buf(), source })?.len();
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(ImageInfo { path: abs.display().to_string(), sha256: sha256_file(path)?, size })
}

/// The log header that pins `vm` as built, with its images and the RTC at boot.
pub fn header_for(vm: &Vm, kernel: ImageInfo, initrd: Option<ImageInfo>, disks: Vec<ImageInfo>, rtc: u64) -> LogHeader {
    let c = vm.config();
    let id = vm.identity();
    LogHeader {
        device_model_version: DEVICE_MODEL_VERSION,
        kernel,
        initrd,
        disks,
        memory_size: c.mem_size,
        memory_layout: id.memory_layout.iter().map(|&(start, size)| MemRegion { start, size }).collect(),
        cmdline: c.boot.cmdline.clone(),
        effective_cmdline: id.effective_cmdline.clone(),
        cpuid: id
            .cpuid
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect(),
        xcr0: id.xcr0,
        xsave_size: id.xsave_size,
        rtc_base_unix: rtc,
        console: match &c.console {
            ConsoleConfig::Stdio => "stdio".into(),
            ConsoleConfig::File(p) => format!("file:{}", p.display()),
            ConsoleConfig::Discard => "none".into(),
        },
        net: c
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| NetDevice {
                mac: LogMac(n.mac.unwrap_or_else(|| MacAddr::default_for(i)).0),
                tap: n.tap.clone(),
            })
            .collect(),
        rng: c.rng,
        exit_delivery: "at-exits".into(),
        record_start_unix_ns: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0),
        ..LogHeader::default()
    }
}

/// The VM as a snapshot's manifest pins it: like a log header, with the disks named by path
/// and size only (the snapshot checks its own copies of them).
pub fn snapshot_header(vm: &Vm, rtc: u64) -> Result<LogHeader> {
    let c = vm.config();
    let kernel = image_info(&c.boot.kernel)?;
    let initrd = c.boot.initrd.as_deref().map(image_info).transpose()?;
    let disks = vm
        .disk_handles()
        .iter()
        .map(|d| ImageInfo { path: d.path.display().to_string(), sha256: String::new(), size: d.tracker.size() })
        .collect();
    Ok(header_for(vm, kernel, initrd, disks, rtc))
}

/// The image `info` names (the `what`: "kernel", "initrd", "disk 0 base image"), checked:
/// there, a regular file or block device, with the recorded SHA-256. The error says which
/// image, who named it and what is wrong.
pub fn check_image(what: &str, info: &ImageInfo, by: NamedBy) -> Result<PathBuf> {
    let err = |problem| Error::Image { what: what.to_string(), path: info.path.clone(), by, problem };
    let path = Path::new(&info.path);
    if std::fs::symlink_metadata(path).is_err() {
        return Err(err(ImageProblem::Missing));
    }
    // Only a regular file or a block device is hashed (a header naming /dev/zero or a FIFO
    // would make the hash read for ever, or block).
    let file = open_hashable(path).map_err(|e| err(ImageProblem::Unusable(e)))?;
    let digest = sha256_of(file, path)?;
    if digest != info.sha256 {
        return Err(err(ImageProblem::Changed { digest, expected: info.sha256.clone() }));
    }
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvm-identity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn images_are_hashed_with_sha256() {
        let dir = scratch("hash");
        let path = dir.join("abc");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(sha256_file(&path).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let info = image_info(&path).unwrap();
        assert_eq!((info.size, info.path), (3, std::fs::canonicalize(&path).unwrap().display().to_string()));
        assert!(matches!(sha256_file(&dir.join("missing")), Err(Error::ReadFile { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_image_check_names_the_image_who_named_it_and_what_is_wrong() {
        let dir = scratch("check");
        let path = dir.join("kernel.elf");
        std::fs::write(&path, b"abc").unwrap();
        let good = image_info(&path).unwrap();
        assert_eq!(check_image("kernel", &good, NamedBy::Log).unwrap(), PathBuf::from(&good.path));

        let changed = ImageInfo { sha256: "00".repeat(32), ..good.clone() };
        let e = check_image("kernel", &changed, NamedBy::Log).unwrap_err().to_string();
        assert!(e.starts_with("replay: the kernel ") && e.contains("is not the one recorded: sha256 ba78"), "{e}");
        let e = check_image("kernel", &changed, NamedBy::Snapshot).unwrap_err().to_string();
        assert!(e.starts_with("restore: the kernel ") && e.contains("changed since the snapshot was taken"), "{e}");

        let gone = ImageInfo { path: dir.join("gone").display().to_string(), ..good.clone() };
        let e = check_image("initrd", &gone, NamedBy::Log).unwrap_err().to_string();
        assert!(e.ends_with("gone named in the log is missing"), "{e}");
        let e = check_image("initrd", &gone, NamedBy::Snapshot).unwrap_err().to_string();
        assert!(e.ends_with("gone the snapshot was taken with is missing"), "{e}");

        // A header may name something that reads for ever or blocks: refused before hashing.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path it is given.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (info, by) in [(fifo.as_path(), NamedBy::Log), (Path::new("/dev/zero"), NamedBy::Snapshot)] {
            let info = ImageInfo { path: info.display().to_string(), ..good.clone() };
            let e = check_image("disk 0 base image", &info, by).unwrap_err();
            assert!(matches!(&e, Error::Image { problem: ImageProblem::Unusable(_), .. }), "{e}");
            assert!(e.to_string().contains("cannot be used"), "{e}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
