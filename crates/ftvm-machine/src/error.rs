//! Errors of the machine layer. Each says what went wrong and, where the user can act, what
//! to do; causes are kept as sources.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A snapshot's file could not be made, written or read.
    #[error("snapshot: {what}: {source}")]
    SnapshotIo {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A snapshot could not be read back into a VM.
    #[error("restore: {what}: {source}")]
    RestoreIo {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A snapshot's manifest does not parse.
    #[error("restore: {} is not a valid manifest: {source}", path.display())]
    ManifestInvalid {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Guest memory could not be read or written (a snapshot, a restore).
    #[error("{what}: {source}")]
    GuestMemoryAccess {
        what: String,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("invalid --{option} {text:?}: {why}")]
    DeviceOption { option: &'static str, text: String, why: String },
    /// A file ftvm must read (an image to hash) cannot be read.
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An image a log header or a snapshot names by its digest cannot be used.
    #[error("{}", image_message(what, path, *by, problem))]
    Image { what: String, path: String, by: NamedBy, problem: ImageProblem },
    /// A VM runs once: it was asked to run again.
    #[error("the VM already ran")]
    AlreadyRan,
    #[error("cannot read kernel image {path}: {source}")]
    KernelRead { path: PathBuf, source: std::io::Error },
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead { path: PathBuf, source: std::io::Error },
    #[error("{path} is neither an ELF kernel nor a Linux bzImage (first bytes: {magic})")]
    UnknownKernelFormat { path: PathBuf, magic: String },
    #[error("{path} is an ELF file without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); ftvm boots PVH ELF kernels and Linux bzImages")]
    NoPvhEntry { path: PathBuf },
    #[error("cannot load kernel {path}: {detail}")]
    KernelLoad { path: PathBuf, detail: String },
    #[error("guest memory of {mem_mib} MiB is too small: {what} needs {need_mib} MiB")]
    MemoryTooSmall { mem_mib: u64, what: String, need_mib: u64 },
    #[error("guest memory access at {addr:#x} failed: {detail}")]
    GuestMemory { addr: u64, detail: String },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("{path}: {source}. ftvm needs KVM: load the kvm module (hardware: kvm_intel or kvm_amd; this platform: kvm_pvm) and run as a user who can open /dev/kvm (root or the kvm group)")]
    KvmOpen { path: PathBuf, source: std::io::Error },
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    #[error("KVM lacks a capability ftvm needs: {0}")]
    KvmCapability(&'static str),
    #[error("KVM call {call} failed: {source}")]
    Kvm { call: &'static str, source: kvm_ioctls::Error },
    #[error("guest memory size {0} is not supported: {1}")]
    MemorySize(u64, &'static str),
    #[error("cannot allocate guest memory: {0}")]
    MemoryAlloc(String),
    #[error("device setup: {0}")]
    Devices(String),
    #[error(transparent)]
    Virtio(#[from] ftvm_virtio::Error),
    #[error("{count} virtio devices requested, but at most {max} fit: each needs its own ISA interrupt line (5, 6, 7, 9, 10, 11)")]
    TooManyDevices { count: usize, max: usize },
    #[error("cannot start the {what} thread: {source}")]
    Thread { what: &'static str, source: std::io::Error },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickSignal(#[source] vmm_sys_util::errno::Error),
    #[error("a dirty-page consumer was used after it ended")]
    ConsumerEnded,
    /// Saving the vCPU's state failed (a snapshot, a sync point, a state transfer).
    #[error("snapshot: {0}")]
    Capture(String),
    #[error("this host's XSAVE state is {size} bytes; saving more than {max} is not supported yet")]
    XsaveTooLarge { size: u32, max: usize },
    /// A session that needs the dirty tracker (sync points, snapshots) was built without one:
    /// a bug in how the session was put together.
    #[error("no dirty tracker in this session (a sync point or snapshot needs one)")]
    NoDirtyTracker,
    /// A saved state does not fit this VM.
    #[error("restore: {0}")]
    Restore(String),
    /// A backup going live could not make the flushes its replay deferred durable.
    #[error("going live: cannot make disk {path} durable (the flushes the replay deferred): {source}")]
    DiskSettle { path: PathBuf, source: std::io::Error },
}

/// Who names an image with its digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedBy {
    /// A log header (replay, a backup's check of its primary).
    Log,
    /// A snapshot's manifest (restore).
    Snapshot,
}

/// What is wrong with an image named by its digest.
#[derive(Debug)]
pub enum ImageProblem {
    Missing,
    /// Its SHA-256 now, and the one recorded.
    Changed {
        digest: String,
        expected: String,
    },
    /// Not a regular file or block device, or it cannot be opened.
    Unusable(std::io::Error),
}

fn image_message(what: &str, path: &str, by: NamedBy, problem: &ImageProblem) -> String {
    use NamedBy::{Log, Snapshot};
    let side = match by {
        Log => "replay",
        Snapshot => "restore",
    };
    let detail = match (by, problem) {
        (Log, ImageProblem::Missing) => "named in the log is missing".to_string(),
        (Snapshot, ImageProblem::Missing) => "the snapshot was taken with is missing".to_string(),
        (Log, ImageProblem::Changed { digest, expected }) => {
            format!("is not the one recorded: sha256 {digest}, the log says {expected}")
        }
        (Snapshot, ImageProblem::Changed { digest, expected }) => {
            format!("changed since the snapshot was taken: sha256 {digest}, the snapshot says {expected}")
        }
        (Log, ImageProblem::Unusable(e)) => format!("the log names cannot be used: {e}"),
        (Snapshot, ImageProblem::Unusable(e)) => format!("the snapshot names cannot be used: {e}"),
    };
    format!("{side}: the {what} {path} {detail}")
}

impl Error {
    pub(crate) fn kvm(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { call, source }
    }
}
