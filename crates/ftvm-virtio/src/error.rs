//! Errors of device setup (host side). Errors caused by the guest never surface here: the
//! devices answer them with a status byte, a dropped request or DEVICE_NEEDS_RESET.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("disk image {path}: {source}")]
    DiskOpen { path: PathBuf, source: std::io::Error },
    #[error("disk image {path} is not writable ({source}); add ,readonly to attach it read-only")]
    DiskNotWritable { path: PathBuf, source: std::io::Error },
    #[error("disk image {path} is not a regular file or block device")]
    DiskNotAFile { path: PathBuf },
    #[error(
        "disk image {path} is in use by another VM (or given twice): it is locked {held}; give each VM its own \
         image, or attach it with ,readonly everywhere"
    )]
    DiskLocked { path: PathBuf, held: &'static str },
    #[error("invalid TAP name {name:?}: {why}")]
    TapName { name: String, why: &'static str },
    #[error("TAP device {name} does not exist; create it first (ip tuntap add dev {name} mode tap)")]
    TapAbsent { name: String },
    #[error("TAP device {name} is in use by another process")]
    TapBusy { name: String },
    #[error("no permission to attach TAP device {name} ({source}); ftvm needs CAP_NET_ADMIN or to be the TAP's owner")]
    TapPermission { name: String, source: std::io::Error },
    #[error("{name} is not a TAP device (a TUN device or another kind of interface has that name)")]
    NotATap { name: String },
    #[error("TAP device {name}: {what}: {source}")]
    Tap { name: String, what: &'static str, source: std::io::Error },
    #[error("invalid MAC address {text:?}: {why}")]
    Mac { text: String, why: &'static str },
    #[error("cannot start the {what} thread: {source}")]
    Thread { what: &'static str, source: std::io::Error },
}
