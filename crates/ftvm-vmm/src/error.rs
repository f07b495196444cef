//! Errors of the VMM (boot and sessions; the machine layer has its own, `ftvm_machine::Error`).
//! Each says what went wrong and, where the user can act, what to do.

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Virtio(#[from] ftvm_virtio::Error),
    #[error(transparent)]
    Machine(#[from] ftvm_machine::Error),
    #[error("{0}")]
    Pair(String),
    /// The pair's link or arbiter, with its cause.
    #[error(transparent)]
    Replication(#[from] ftvm_replication::Error),
    /// A side of the pair fenced itself off (another copy may be live): exit status
    /// [`ftvm_exit::ExitStatus::Fenced`].
    #[error("{0}")]
    Fenced(String),
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
}
