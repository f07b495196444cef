//! systemd's notification protocol (sd_notify(3)) for `Type=notify` units (contrib/systemd):
//!
//! - `READY=1` once the VM runs (run, record, primary: the guest started, which for a
//!   primary means its backup is paired) or, for a backup, once it is paired and replaying;
//! - `STATUS=role, protection, replay lag`, sent when it changes (the lag at most once a
//!   second);
//! - `WATCHDOG=1` every half of `WATCHDOG_USEC`, only while the vCPU and the replication
//!   make progress: the vCPU's exits must advance while the guest runs, and a protected pair's
//!   log positions (acknowledged on a primary, received on a backup) must advance. A stalled
//!   vCPU or replication thread stops the pings, and systemd's watchdog kills and (per the
//!   unit) restarts the side;
//! - `STOPPING=1` when ftvm exits.
//!
//! The notifier is a thread that reads the VM's figures (the control API's [`VmControl`])
//! every 100 ms; without `NOTIFY_SOCKET` it does not start.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the Unix socket `NOTIFY_SOCKET`
//! names (a path, or `@name` in the abstract namespace). It is written here, not with the
//! `sd-notify` crate: that crate's send blocks when the manager's queue is full (a Unix
//! datagram socket's queue holds a few messages), which would hang the notifier and ftvm's
//! exit behind it; here a message that finds the queue full is dropped.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftvm_api::{Role, Status, VmControl, VmState};

/// How often the notifier looks at the figures.
const POLL: Duration = Duration::from_millis(100);
/// The STATUS line changes with the lag all the time: at most this often for that.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Whether a service manager listens (`NOTIFY_SOCKET` is set).
pub fn wanted() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|v| !v.is_empty())
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`, for this process if
/// `WATCHDOG_PID` names one), as sd_watchdog_enabled(3) reads it.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The service manager's notification socket.
struct Manager {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Manager {
    /// The socket `NOTIFY_SOCKET` names, and one of ours to send from (non-blocking).
    fn open() -> std::io::Result<Manager> {
        use std::os::unix::ffi::OsStrExt;
        let target = std::env::var_os("NOTIFY_SOCKET").unwrap_or_default();
        let addr = match target.as_bytes().strip_prefix(b"@") {
            Some(name) => <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(std::path::Path::new(&target))?,
        };
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        Ok(Manager { sock, addr })
    }

    /// Sends `KEY=VALUE` lines as one datagram; a full queue drops it (said at debug level).
    fn send(&self, lines: &[&str]) {
        let message: String = lines.iter().map(|l| format!("{l}\n")).collect();
        if let Err(e) = self.sock.send_to_addr(message.as_bytes(), &self.addr) {
            tracing::debug!("sd_notify {message:?}: {e}");
        }
    }
}

/// The running notifier; dropping it sends STOPPING=1 and ends the thread.
pub struct Notifier {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    manager: Option<Arc<Manager>>,
}

impl Notifier {
    pub fn start(control: Arc<VmControl>) -> Notifier {
        let stop = Arc::new(AtomicBool::new(false));
        let manager = match Manager::open() {
            Ok(m) => Arc::new(m),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET: {e}; systemd gets no READY");
                return Notifier { stop, thread: None, manager: None };
            }
        };
        let (s, m) = (stop.clone(), manager.clone());
        let thread = std::thread::Builder::new().name("ftvm-notify".into()).spawn(move || {
            ftvm_seccomp::enter(ftvm_seccomp::Thread::Notify);
            run(&control, &m, &s)
        });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("cannot start the systemd notifier thread: {e}; systemd gets no READY");
                None
            }
        };
        Notifier { stop, thread, manager: Some(manager) }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(m) = &self.manager {
            m.send(&["STOPPING=1"]);
        }
    }
}

/// READY: the guest runs; for a backup, paired (it has a pair) and replaying.
pub(crate) fn is_ready(s: &Status) -> bool {
    s.state == VmState::Running && (s.role != Role::Backup || s.pair.is_some())
}

/// The STATUS line, e.g. `primary, protected, replay lag 3 ms`.
pub(crate) fn status_line(s: &Status) -> String {
    let mut line = s.role.as_str().to_string();
    if s.state != VmState::Running {
        line.push_str(&format!(", {}", s.state.as_str()));
    }
    if let Some(p) = &s.pair {
        line.push_str(if p.protected { ", protected" } else { ", UNPROTECTED" });
        if p.halted {
            line.push_str(", halted");
        }
        if let Some(lag) = p.replay_lag_ms.filter(|_| p.protected) {
            line.push_str(&format!(", replay lag {lag} ms"));
        }
    }
    line
}

/// What the watchdog compares from one look to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Progress {
    /// The vCPU should be making exits (the guest runs).
    pub vcpu_expected: bool,
    pub exits: u64,
    /// The replication should be moving (a protected pair).
    pub replication_expected: bool,
    pub log_position: (u64, u64, u64),
}

impl Progress {
    pub(crate) fn of(s: &Status) -> Progress {
        let pair = s.pair.as_ref().filter(|p| p.protected && matches!(s.role, Role::Primary | Role::Backup));
        Progress {
            vcpu_expected: s.state == VmState::Running,
            exits: s.exits.total,
            replication_expected: pair.is_some(),
            log_position: pair
                .map_or((0, 0, 0), |p| (p.acked_lsn.unwrap_or(0), p.received_lsn.unwrap_or(0), p.outputs_done)),
        }
    }
}

/// Whether the VM made progress between two looks (what is not expected to move counts as
/// moving: a paused guest, an unprotected primary).
pub(crate) fn progressed(before: &Progress, now: &Progress) -> bool {
    let vcpu = !now.vcpu_expected || !before.vcpu_expected || now.exits != before.exits;
    let replication =
        !now.replication_expected || !before.replication_expected || now.log_position != before.log_position;
    vcpu && replication
}

fn run(control: &VmControl, manager: &Manager, stop: &AtomicBool) {
    let watchdog = watchdog_interval().map(|w| w / 2);
    let mut ready = false;
    let mut shown = String::new();
    let mut shown_at = Instant::now();
    let mut shown_key = (Role::Standalone, false);
    let mut last = Progress::of(&control.status());
    let mut next_ping = Instant::now();
    let mut stalled = false;
    while !stop.load(Ordering::SeqCst) {
        let status = control.status();
        let line = status_line(&status);
        let key = (status.role, status.pair.as_ref().is_some_and(|p| p.protected));
        if !ready && is_ready(&status) {
            ready = true;
            manager.send(&["READY=1", &format!("STATUS={line}")]);
            (shown, shown_at, shown_key) = (line, Instant::now(), key);
        } else if line != shown && (key != shown_key || shown_at.elapsed() >= STATUS_EVERY) {
            manager.send(&[&format!("STATUS={line}")]);
            (shown, shown_at, shown_key) = (line, Instant::now(), key);
        }
        if let Some(every) = watchdog {
            if Instant::now() >= next_ping {
                let now = Progress::of(&status);
                if progressed(&last, &now) {
                    manager.send(&["WATCHDOG=1"]);
                    if stalled {
                        tracing::warn!("the VM makes progress again: pinging the systemd watchdog again");
                        stalled = false;
                    }
                } else if !stalled {
                    // Said once a stall; systemd kills this side if it lasts.
                    stalled = true;
                    tracing::warn!(
                        "no progress for {} ms ({}): not pinging the systemd watchdog",
                        every.as_millis(),
                        if now.vcpu_expected && now.exits == last.exits {
                            "the vCPU made no exit"
                        } else {
                            "the replication did not move"
                        }
                    );
                }
                last = now;
                next_ping = Instant::now() + every;
            }
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_wants_exits_from_a_running_guest_and_movement_from_a_protected_pair() {
        let running = Progress { vcpu_expected: true, exits: 10, ..Default::default() };
        assert!(progressed(&running, &Progress { exits: 11, ..running }));
        assert!(!progressed(&running, &running), "a running guest without exits is a stalled vCPU");
        let paused = Progress { vcpu_expected: false, ..running };
        assert!(progressed(&paused, &paused), "a paused guest is not a stall");
        let pair = Progress { replication_expected: true, log_position: (5, 0, 1), ..running };
        assert!(!progressed(&pair, &Progress { exits: 11, ..pair }), "the log did not move");
        assert!(progressed(&pair, &Progress { exits: 11, log_position: (6, 0, 1), ..pair }));
        let unprotected = Progress { replication_expected: false, ..pair };
        assert!(progressed(&pair, &Progress { exits: 12, ..unprotected }));
    }
}
