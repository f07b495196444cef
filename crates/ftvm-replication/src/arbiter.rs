//! The arbiter: whoever holds it may be the live copy of the VM.
//!
//! Two kinds, named by an [`ArbiterSpec`]:
//!
//! - A lock file ([`FileArbiter`]): `flock` on a path both sides reach (one host or a shared
//!   filesystem). The kernel releases the lock when its holder dies, so it detects process
//!   death, but not a hung or paused host: that one keeps the lock.
//! - An etcd key under a lease ([`crate::etcd`]): the holder must renew the lease, so a paused
//!   or cut-off primary loses it after its TTL, and stops being live (its [`Arbiter::valid`]
//!   turns false) before the backup can win it.
//!
//! The primary takes the arbiter when it starts and holds it while it is live. A backup must
//! win it before going live: it can only when the primary is gone (or, for etcd, stopped
//! renewing), so there is never a second live copy. A backup that cannot win halts.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::etcd::{EtcdLease, EtcdSpec};
use crate::{Error, Result};

/// Where the arbiter is: a lock-file path, or an etcd key (`etcd://HOST:PORT/KEY[?ttl=SECONDS]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArbiterSpec {
    File(PathBuf),
    Etcd(EtcdSpec),
}

impl FromStr for ArbiterSpec {
    type Err = Error;

    /// `etcd:...` must be a well-formed etcd URL; anything else is a lock-file path.
    fn from_str(s: &str) -> Result<ArbiterSpec> {
        if s.starts_with("etcd:") {
            return s.parse().map(ArbiterSpec::Etcd);
        }
        if s.is_empty() {
            return Err(Error::Arbiter {
                path: s.into(),
                why: "empty (a lock-file path or etcd://HOST:PORT/KEY)".into(),
            });
        }
        Ok(ArbiterSpec::File(PathBuf::from(s)))
    }
}

impl fmt::Display for ArbiterSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArbiterSpec::File(path) => write!(f, "{}", path.display()),
            ArbiterSpec::Etcd(spec) => write!(f, "{spec}"),
        }
    }
}

/// A held arbiter. Dropping it releases it (file: unlock; etcd: revoke the lease, best
/// effort, with a short timeout).
pub struct Arbiter {
    spec: ArbiterSpec,
    held: Held,
}

enum Held {
    File(FileArbiter),
    Etcd(EtcdLease),
}

impl fmt::Debug for Arbiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arbiter").field("spec", &self.spec).field("valid", &self.valid()).finish()
    }
}

impl Arbiter {
    /// Tries to win the arbiter until `wait` has passed (at least one try). `Ok(None)`:
    /// someone else holds it (etcd: the key exists under another lease). `Err`: the arbiter
    /// cannot be used (a file that cannot be opened; etcd unreachable or refusing, the error
    /// names the endpoint).
    pub fn acquire(spec: &ArbiterSpec, wait: Duration) -> Result<Option<Arbiter>> {
        let held = match spec {
            ArbiterSpec::File(path) => FileArbiter::acquire(path, wait)?.map(Held::File),
            ArbiterSpec::Etcd(etcd) => EtcdLease::acquire(etcd, wait)?.map(Held::Etcd),
        };
        Ok(held.map(|held| Arbiter { spec: spec.clone(), held }))
    }

    /// Whether this side may act as the live copy right now: call it right before every
    /// output. File: always true. Etcd: true only while the lease is certainly valid by the
    /// local monotonic clock (see [`crate::etcd`]); false forever once lost. Cheap.
    pub fn valid(&self) -> bool {
        match &self.held {
            Held::File(_) => true,
            Held::Etcd(lease) => lease.valid(),
        }
    }

    /// Once lost, why (lease expired or revoked, key taken, etcd unreachable past the
    /// deadline). `None` while held; always `None` for a file.
    pub fn lost(&self) -> Option<String> {
        match &self.held {
            Held::File(_) => None,
            Held::Etcd(lease) => lease.lost(),
        }
    }

    pub fn spec(&self) -> &ArbiterSpec {
        &self.spec
    }

    /// Registers `f`, run once from the keepalive thread when the arbiter is found lost (at
    /// once, in this thread, if it is already lost). File arbiters never call it.
    pub fn on_lost(&self, f: Box<dyn FnOnce(String) + Send>) {
        match &self.held {
            Held::File(_) => drop(f),
            Held::Etcd(lease) => lease.on_lost(f),
        }
    }

    /// The lock, for a file arbiter.
    pub fn file(&self) -> Option<&FileArbiter> {
        match &self.held {
            Held::File(lock) => Some(lock),
            Held::Etcd(_) => None,
        }
    }

    /// The etcd lease, for an etcd arbiter.
    pub fn etcd(&self) -> Option<&EtcdLease> {
        match &self.held {
            Held::File(_) => None,
            Held::Etcd(lease) => Some(lease),
        }
    }

    /// Test switch: an etcd arbiter's keepalive thread freezes (as if the process were
    /// stopped). No effect on a file arbiter.
    #[doc(hidden)]
    pub fn pause_keepalive_for_test(&self) {
        if let Held::Etcd(lease) = &self.held {
            lease.pause_keepalive_for_test();
        }
    }

    /// Test switch: the keepalive thread resumes, as after a SIGCONT.
    #[doc(hidden)]
    pub fn resume_keepalive_for_test(&self) {
        if let Held::Etcd(lease) = &self.held {
            lease.resume_keepalive_for_test();
        }
    }
}

/// A held lock file; dropping it releases it.
#[derive(Debug)]
pub struct FileArbiter {
    _file: File,
    path: PathBuf,
}

impl FileArbiter {
    /// Tries to take the lock until `wait` has passed. `Ok(None)`: someone else holds it.
    pub fn acquire(path: &Path, wait: Duration) -> Result<Option<FileArbiter>> {
        let err = |why: String| Error::Arbiter { path: path.display().to_string(), why };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| err(format!("cannot open: {e}")))?;
        let start = Instant::now();
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                return Ok(Some(FileArbiter { _file: file, path: path.to_path_buf() }));
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err(format!("flock failed: {e}")));
            }
            if start.elapsed() >= wait {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_holder_and_release_on_drop() {
        let path = std::env::temp_dir().join(format!("ftvm-arbiter-test-{}", std::process::id()));
        let a = FileArbiter::acquire(&path, Duration::ZERO).unwrap().expect("first wins");
        assert!(FileArbiter::acquire(&path, Duration::from_millis(30)).unwrap().is_none(), "second loses");
        drop(a);
        assert!(FileArbiter::acquire(&path, Duration::ZERO).unwrap().is_some(), "free again");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn file_arbiter_through_the_spec() {
        let path = std::env::temp_dir().join(format!("ftvm-arbiter-spec-test-{}", std::process::id()));
        let spec: ArbiterSpec = path.display().to_string().parse().unwrap();
        assert_eq!(spec, ArbiterSpec::File(path.clone()));
        assert_eq!(spec.to_string(), path.display().to_string());
        let a = Arbiter::acquire(&spec, Duration::ZERO).unwrap().expect("first wins");
        assert!(a.valid());
        assert_eq!(a.lost(), None);
        assert_eq!(a.spec(), &spec);
        a.on_lost(Box::new(|_| panic!("a file arbiter never calls on_lost")));
        assert!(Arbiter::acquire(&spec, Duration::from_millis(30)).unwrap().is_none(), "second loses");
        drop(a);
        assert!(Arbiter::acquire(&spec, Duration::ZERO).unwrap().is_some(), "free again");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn arbiters_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Arbiter>();
        send_sync::<ArbiterSpec>();
    }

    #[test]
    fn parse_etcd_urls() {
        let spec: ArbiterSpec = "etcd://127.0.0.1:2379/ftvm/vm1?ttl=3".parse().unwrap();
        let etcd = EtcdSpec { host: "127.0.0.1".into(), port: 2379, key: "ftvm/vm1".into(), ttl_secs: 3 };
        assert_eq!(spec, ArbiterSpec::Etcd(etcd.clone()));
        assert_eq!(spec.to_string(), "etcd://127.0.0.1:2379/ftvm/vm1?ttl=3");
        assert_eq!(spec.to_string().parse::<ArbiterSpec>().unwrap(), spec, "Display round-trips");
        let ArbiterSpec::Etcd(short) = "etcd://etcd.example:2379/k".parse().unwrap() else { panic!("not etcd") };
        assert_eq!((short.host.as_str(), short.key.as_str(), short.ttl_secs), ("etcd.example", "k", 2));
        let ArbiterSpec::Etcd(v6) = "etcd://[::1]:2379/k?ttl=10".parse().unwrap() else { panic!("not etcd") };
        assert_eq!((v6.host.as_str(), v6.port, v6.ttl_secs), ("::1", 2379, 10));
        assert_eq!(v6.to_string(), "etcd://[::1]:2379/k?ttl=10");
        assert_eq!("/run/ftvm.lock".parse::<ArbiterSpec>().unwrap(), ArbiterSpec::File("/run/ftvm.lock".into()));
    }

    #[test]
    fn malformed_etcd_urls_say_what_is_wrong() {
        for (url, why) in [
            ("etcd://127.0.0.1:2379", "missing key"),
            ("etcd://127.0.0.1:2379/", "missing key"),
            ("etcd://127.0.0.1/k", "missing port"),
            ("etcd://:2379/k", "missing host"),
            ("etcd://h:http/k", "bad port \"http\""),
            ("etcd://h:0/k", "bad port"),
            ("etcd://h:70000/k", "bad port"),
            ("etcd://::1:2379/k", "brackets"),
            ("etcd://[::1/k", "unclosed"),
            ("etcd://h:2379/k?ttl=1", "ttl must be an integer number of seconds >= 2"),
            ("etcd://h:2379/k?ttl=2.5", "ttl must be"),
            ("etcd://h:2379/k?ttl=", "ttl must be"),
            ("etcd://h:2379/k?lease=3", "unknown parameter"),
            ("etcd:h:2379/k", "not an etcd URL"),
            ("", "empty"),
        ] {
            let e = url.parse::<ArbiterSpec>().expect_err(url).to_string();
            assert!(e.contains(why), "{url}: {e:?} does not say {why:?}");
            if !url.is_empty() {
                assert!(e.contains(url) && e.contains("etcd://HOST:PORT/KEY"), "{url}: {e:?}");
            }
        }
    }
}
