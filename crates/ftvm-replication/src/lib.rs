//! The fault-tolerant pair (docs/replication.md): the primary streams its event log to the backup,
//! holds every output until the backup has acknowledged the log up to it, performs it, and
//! tells the backup (OUTPUT_DONE). The backup replays the stream a few milliseconds behind;
//! when the primary dies it wins the arbiter, drains what it received and goes live, performing
//! exactly the outputs OUTPUT_DONE did not cover.
//!
//! Channels:
//! - TCP, primary to backup: the log (magic, header, frames), nothing else; backup to primary
//!   on the same connection: cumulative acknowledgements (the LSN of the last frame received
//!   and checksum-verified), 8 bytes each.
//! - UDP, both ways, every [`HEARTBEAT_INTERVAL`]: heartbeats that bulk log traffic cannot
//!   delay; the primary's carry OUTPUT_DONE (the cumulative count of outputs performed).

pub mod arbiter;
pub mod backup;
pub mod etcd;
pub mod link;
pub mod primary;
pub mod protocol;
pub mod secure;
pub mod stages;
#[doc(hidden)]
pub mod test_etcd;
pub mod testing;
pub mod transfer;

use std::time::Duration;

pub use arbiter::FileArbiter;

/// How often each side sends a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(50);

/// How often each side looks at the clock for a silent peer (the heartbeat socket's receive
/// timeout): the failure is detected within this of the timeout, not within a heartbeat.
pub const HEARTBEAT_POLL: Duration = Duration::from_millis(10);
/// Default time without a heartbeat after which the peer is taken for dead.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket or file operation failed: what was being done, and the cause.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The log stream could not be written.
    #[error("{what}: {source}")]
    Log {
        what: &'static str,
        #[source]
        source: ftvm_log::LogError,
    },
    /// What the peer sent, or what was found on disk, is not what it must be.
    #[error("{0}")]
    Refused(String),
    #[error("the pair cannot form: {0}")]
    Handshake(String),
    /// A connection failed before the pair formed, by its peer's doing (it closed, stalled,
    /// or sent what is not a log or a state transfer): that peer is refused, and the backup
    /// waits on for the right one.
    #[error("refused the peer {peer}: {why}")]
    BadPeer { peer: std::net::SocketAddr, why: String },
    #[error("arbiter {path}: {why}")]
    Arbiter { path: String, why: String },
    /// An etcd arbiter's URL, or a file it names, is not usable.
    #[error("arbiter {url}: {source}")]
    EtcdConfig {
        url: String,
        #[source]
        source: Box<crate::etcd::EtcdConfigError>,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The exit status of a side that halted because it may not be the live copy (it lost the
/// arbiter, or it could not win it): [`ftvm_exit::ExitStatus::Fenced`].
pub const HALT_EXIT_CODE: i32 = ftvm_exit::ExitStatus::Fenced.code() as i32;

/// Halts this process at once: another copy of the VM may be live, so this one must not
/// emit anything more. No cleanup runs (it could perform outputs).
// The one exit outside the CLI (the workspace denies clippy::exit): this is the split-brain
// fence, and returning an error instead would unwind through code that can still perform
// outputs.
#[allow(clippy::exit)]
pub fn halt(why: &str) -> ! {
    tracing::error!(
        target: "ftvm::event",
        event = "halt",
        why,
        status = HALT_EXIT_CODE,
        "HALT: {why}; halting this side (there is never a second live copy)"
    );
    std::process::exit(HALT_EXIT_CODE)
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The nice value of the two threads on an output's path across the link: the primary's
/// acknowledgement thread (it performs most released outputs) and the backup's receiver (it
/// verifies and acknowledges). Each is woken once per acknowledged frame and does little
/// work then; on a busy host its wake-up waits for a CPU, and the outputs with it
/// (docs/benchmarks.md, "The `release` stage"). `FTVM_LINK_NICE=N` sets another value, 0
/// leaves them as they are.
const LINK_NICE: i32 = -10;

/// Gives the calling thread the link's nice value ([`LINK_NICE`]), before it enters its
/// filter. Without the privilege to raise a priority (CAP_SYS_NICE) it stays as it is.
pub(crate) fn link_nice() {
    let nice = match std::env::var("FTVM_LINK_NICE") {
        Ok(v) => match v.trim().parse::<i32>() {
            Ok(n) => n.clamp(-20, 19),
            Err(_) => {
                tracing::warn!("FTVM_LINK_NICE={v:?} is not a nice value (-20 to 19); using {LINK_NICE}");
                LINK_NICE
            }
        },
        Err(_) => LINK_NICE,
    };
    if nice == 0 {
        return;
    }
    // SAFETY: setpriority takes no pointers; PRIO_PROCESS with `who` 0 sets the calling
    // thread's nice value only (the one form the seccomp filters allow).
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        tracing::debug!("link thread at nice {nice}: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod link_nice_tests {
    /// The link threads get the link's nice value where the process may raise priorities
    /// (root), and stay as they are where it may not.
    #[test]
    fn a_link_thread_gets_the_link_nice_value() {
        if std::env::var_os("FTVM_LINK_NICE").is_some() {
            return;
        }
        let nice = std::thread::spawn(|| {
            super::link_nice();
            // SAFETY: gettid and getpriority take no pointers.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
        })
        .join()
        .unwrap();
        // SAFETY: geteuid takes no arguments.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(nice, super::LINK_NICE);
        } else {
            assert!(nice == super::LINK_NICE || nice == 0, "nice {nice}");
        }
    }
}
