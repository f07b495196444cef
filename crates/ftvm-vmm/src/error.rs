//! Errors of the VMM (boot and sessions; the machine layer has its own, `ftvm_machine::Error`).
//! Each says what went wrong and, where the user can act, what to do.

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM call {call} failed: {source}")]
    Kvm { call: &'static str, source: kvm_ioctls::Error },
    #[error("console: {0}")]
    Console(String),
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

impl Error {
    pub(crate) fn kvm(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { call, source }
    }
}
