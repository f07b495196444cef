//! Errors of the VMM (boot and sessions; the machine layer has its own, `ftvm_machine::Error`).
//! Each says what went wrong and, where the user can act, what to do.

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM call {call} failed: {source}")]
    Kvm { call: &'static str, source: kvm_ioctls::Error },
    #[error(transparent)]
    Virtio(#[from] ftvm_virtio::Error),
    #[error(transparent)]
    Machine(#[from] ftvm_machine::Error),
    #[error("invalid --{option} {text:?}: {why}")]
    DeviceOption { option: &'static str, text: String, why: String },
    #[error("{0}")]
    Pair(String),
    /// The pair's link or arbiter, with its cause.
    #[error(transparent)]
    Replication(#[from] ftvm_replication::Error),
    /// A side of the pair fenced itself off (another copy may be live): exit status
    /// [`ftvm_exit::ExitStatus::Fenced`].
    #[error("{0}")]
    Fenced(String),
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
    /// A file of a recording (the log, a disk copy) could not be made or written.
    #[error("record: {what}: {source}")]
    RecordIo {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The log could not be started or read.
    #[error("record: cannot write the log: {0}")]
    RecordLog(#[source] ftvm_log::LogError),
    #[error("replay: {}: {source}", path.display())]
    ReplayLog {
        path: std::path::PathBuf,
        #[source]
        source: ftvm_log::LogError,
    },
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
    GuestMemory {
        what: String,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The console's file could not be opened.
    #[error("console: cannot open {}: {source}", path.display())]
    ConsoleFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The pair's state transfer could not reach the backup.
    #[error("{what}: {source}")]
    PairIo {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("record: {0}")]
    Record(String),
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("restore: {0}")]
    Restore(String),
    #[error("replay: {0}")]
    Replay(String),
    /// A thread of the VM could not be started.
    #[error("cannot start the {thread} thread: {source}")]
    Spawn {
        thread: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The vCPU thread panicked (a bug; its message went to standard error).
    #[error("the vCPU thread panicked")]
    VcpuPanicked,
    /// A VM runs once: it was asked to run again.
    #[error("the VM already ran")]
    AlreadyRan,
    /// A session that needs the dirty tracker (sync points, snapshots) was built without one:
    /// a bug in how the session was put together.
    #[error("no dirty tracker in this session (a sync point or snapshot needs one)")]
    NoDirtyTracker,
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
