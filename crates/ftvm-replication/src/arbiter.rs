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
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::etcd::{EtcdLease, EtcdSpec};
use crate::{Error, Result};

/// Where the arbiter is: a lock-file path, or an etcd key (`etcd://HOST:PORT/KEY[?ttl=SECONDS]`,
/// `etcds://` with TLS; see [`EtcdSpec`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArbiterSpec {
    /// A lock file seen by this host only (as far as ftvm knows).
    File(PathBuf),
    /// A lock file the operator said is on storage both hosts share (`--shared-lock`).
    SharedFile(PathBuf),
    Etcd(EtcdSpec),
}

impl ArbiterSpec {
    /// Whether only this host sees it (a lock file not said to be shared): it cannot keep a
    /// peer on another host from going live.
    pub fn this_host_only(&self) -> bool {
        matches!(self, ArbiterSpec::File(_))
    }
}

impl FromStr for ArbiterSpec {
    type Err = Error;

    /// `etcd:...` and `etcds:...` must be well-formed etcd URLs; anything else is a lock-file path.
    fn from_str(s: &str) -> Result<ArbiterSpec> {
        if s.starts_with("etcd:") || s.starts_with("etcds:") {
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
            ArbiterSpec::File(path) | ArbiterSpec::SharedFile(path) => write!(f, "{}", path.display()),
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
            ArbiterSpec::File(path) | ArbiterSpec::SharedFile(path) => {
                FileArbiter::acquire(path, wait)?.map(Held::File)
            }
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
    ///
    /// The file is created readable and writable by ftvm's user alone; one that another user
    /// owns or can open, or in a directory others may write without the sticky bit, is
    /// refused: `flock` works through a read-only descriptor, so whoever can open the file
    /// can hold the lock, and stop a failover or keep a primary from starting.
    pub fn acquire(path: &Path, wait: Duration) -> Result<Option<FileArbiter>> {
        let err = |why: String| Error::Arbiter { path: path.display().to_string(), why };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| err(format!("cannot open: {e}")))?;
        check_private(path, &file).map_err(err)?;
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

/// Why a lock file is not one only ftvm's user can open, if it is not.
fn check_private(path: &Path, file: &File) -> std::result::Result<(), String> {
    let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    let me = euid();
    if meta.uid() != me {
        return Err(format!(
            "owned by user {}, not by ftvm's user ({me}): that user can hold the lock; remove it or give another path",
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "mode {:o}: other users can open it, and holding it through a read-only descriptor would stop a \
             failover; chmod 600 {}",
            meta.mode() & 0o777,
            path.display()
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::metadata(parent).map_err(|e| format!("cannot stat its directory: {e}"))?;
    if dir.mode() & 0o022 != 0 && dir.mode() & 0o1000 == 0 {
        return Err(format!(
            "its directory {} (mode {:o}) lets other users replace it: use a directory only ftvm's user writes",
            parent.display(),
            dir.mode() & 0o7777
        ));
    }
    Ok(())
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The directory of ftvm's default lock files (and of the API sockets `--id` derives):
/// `/run/ftvm` for root, `$XDG_RUNTIME_DIR/ftvm` for another user (`/tmp/ftvm-UID` without
/// one). Created mode 0700; an existing one must be a directory (not a link) of ftvm's user
/// that no other user can enter.
pub fn runtime_dir() -> Result<PathBuf> {
    let me = euid();
    let dir = if me == 0 {
        PathBuf::from("/run/ftvm")
    } else {
        match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
            Some(d) if d.is_absolute() => d.join("ftvm"),
            _ => std::env::temp_dir().join(format!("ftvm-{me}")),
        }
    };
    let err = |why: String| Error::Arbiter { path: dir.display().to_string(), why };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(format!("cannot create ftvm's runtime directory: {e}"))),
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| err(format!("cannot stat: {e}")))?;
    if !meta.is_dir() {
        return Err(err("ftvm's runtime directory is not a directory (a link?): remove it".into()));
    }
    if meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(err(format!(
            "ftvm's runtime directory must belong to user {me} with mode 700 (it is user {}, mode {:o}): \
             other users could hold its locks; remove it or chmod 700 it",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(dir)
}

/// A VM identity (`--id`): 1-64 letters, digits, `.`, `_` or `-`, not starting with `.`
/// (it names files in [`runtime_dir`]).
pub fn check_id(id: &str) -> std::result::Result<(), String> {
    let plain = id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if id.is_empty() || id.len() > 64 || !plain || id.starts_with('.') {
        return Err(format!(
            "{id:?} is not a VM identity: 1-64 letters, digits, '.', '_' or '-', not starting with '.'"
        ));
    }
    Ok(())
}

/// The default lock file of the VM `id` (`default` without one): `RUNTIME_DIR/ID.lock`.
pub fn default_lock(id: Option<&str>) -> Result<PathBuf> {
    Ok(runtime_dir()?.join(format!("{}.lock", id.unwrap_or("default"))))
}

/// Where a side's peer is, as far as the arbiter is concerned.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    /// A primary connects to its backup at this address.
    Backup(SocketAddr),
    /// A backup listens on this address for its primary.
    Listen(SocketAddr),
}

impl Peer {
    /// Whether the peer is certainly on this host: a backup at a loopback address or one of
    /// this host's (its network namespace's) addresses; a backup listening on a loopback
    /// address only (a wildcard or another address may take a primary from anywhere).
    pub fn on_this_host(&self) -> bool {
        match *self {
            Peer::Backup(a) => a.ip().is_loopback() || a.ip().is_unspecified() || is_local_ip(a.ip()),
            Peer::Listen(a) => a.ip().is_loopback(),
        }
    }
}

/// Whether `ip` is an address of an interface of this network namespace.
pub fn is_local_ip(ip: IpAddr) -> bool {
    local_ips().is_ok_and(|ips| ips.contains(&ip))
}

/// The addresses of this network namespace's interfaces.
fn local_ips() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list it allocated into `head`; freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its real type and size.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: an AF_INET address is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 address is a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once; nothing above outlives it.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The arbiter a side uses: the one given, or the default lock file of the VM `id`. A peer
/// that may be on another host needs one both hosts see: an etcd lease, or a lock file the
/// operator says is on shared storage (`shared_lock`); else, after a cut of the link, each
/// side would win a lock of its own and both would go live.
pub fn choose(
    given: Option<&ArbiterSpec>,
    shared_lock: bool,
    id: Option<&str>,
    peer: Peer,
) -> std::result::Result<ArbiterSpec, ChooseError> {
    let local = peer.on_this_host();
    match given {
        Some(ArbiterSpec::Etcd(_)) if shared_lock => Err(ChooseError::SharedLockWithEtcd),
        // Without a key, the VM's identity names it: two pairs on one etcd never share one.
        Some(ArbiterSpec::Etcd(etcd)) if etcd.key.is_empty() => {
            let mut etcd = etcd.clone();
            etcd.key = format!("ftvm/{}", id.unwrap_or("default"));
            Ok(ArbiterSpec::Etcd(etcd))
        }
        Some(spec @ (ArbiterSpec::Etcd(_) | ArbiterSpec::SharedFile(_))) => Ok(spec.clone()),
        Some(ArbiterSpec::File(path)) if shared_lock => Ok(ArbiterSpec::SharedFile(path.clone())),
        Some(spec @ ArbiterSpec::File(_)) if local => Ok(spec.clone()),
        Some(ArbiterSpec::File(path)) => Err(ChooseError::NotShared { peer, lock: Some(path.clone()) }),
        None if shared_lock => Err(ChooseError::SharedLockWithoutPath),
        None if !local => Err(ChooseError::NotShared { peer, lock: None }),
        None => Ok(ArbiterSpec::File(default_lock(id).map_err(ChooseError::Runtime)?)),
    }
}

/// Why [`choose`] found no safe arbiter: a usage error, said with what to give.
#[derive(Debug, thiserror::Error)]
pub enum ChooseError {
    #[error(
        "{}, and {} can be seen by one host only: after a cut of the replication link both sides would \
         win it and go live (split brain). Give both sides the same --arbiter etcd://HOST:PORT/KEY (an etcd \
         both hosts reach), or --arbiter PATH --shared-lock for a lock file on storage both hosts share \
         (NFS, a cluster filesystem)",
        peer_place(peer),
        lock.as_ref().map_or("the default arbiter, a lock file,".to_string(), |p| format!("the lock file {}", p.display()))
    )]
    NotShared { peer: Peer, lock: Option<PathBuf> },
    #[error("--shared-lock says a lock file is on shared storage: give its path with --arbiter PATH")]
    SharedLockWithoutPath,
    #[error("--shared-lock is for a lock file; an etcd arbiter is seen by both hosts already")]
    SharedLockWithEtcd,
    #[error(transparent)]
    Runtime(Error),
}

fn peer_place(peer: &Peer) -> String {
    match peer {
        Peer::Backup(a) => {
            format!("the backup at {a} is not on this host (neither a loopback address nor one of this host's)")
        }
        Peer::Listen(a) => {
            format!("this backup listens on {a}, not a loopback address: its primary may be a peer not on this host")
        }
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
    fn a_lock_file_others_can_open_or_another_user_owns_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("ftvm-arbiter-open-{}", std::process::id()));
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = FileArbiter::acquire(&path, Duration::ZERO).unwrap_err().to_string();
        assert!(e.contains("other users can open it") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(FileArbiter::acquire(&path, Duration::ZERO).unwrap().is_some(), "0600 is fine");
        let _ = std::fs::remove_file(&path);
        // A new one is created 0600.
        let a = FileArbiter::acquire(&path, Duration::ZERO).unwrap().unwrap();
        assert_eq!(std::fs::metadata(a.path()).unwrap().permissions().mode() & 0o777, 0o600);
        drop(a);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_peer_on_another_host_needs_a_shared_arbiter() {
        let remote = Peer::Backup("192.0.2.1:7000".parse().unwrap());
        let lock = ArbiterSpec::File("/shared/ftvm.lock".into());
        let etcd: ArbiterSpec = "etcd://10.0.0.1:2379/k".parse().unwrap();
        let e = choose(None, false, None, remote).unwrap_err().to_string();
        assert!(e.contains("not on this host") && e.contains("--shared-lock") && e.contains("etcd://"), "{e}");
        assert!(choose(Some(&lock), false, None, remote).is_err());
        assert_eq!(
            choose(Some(&lock), true, None, remote).unwrap(),
            ArbiterSpec::SharedFile("/shared/ftvm.lock".into())
        );
        assert!(lock.this_host_only() && !choose(Some(&lock), true, None, remote).unwrap().this_host_only());
        assert_eq!(choose(Some(&etcd), false, None, remote).unwrap(), etcd);
        assert!(choose(Some(&etcd), true, None, remote).is_err(), "--shared-lock with etcd is a contradiction");
        assert!(choose(None, true, None, remote).is_err(), "--shared-lock needs a path");
        for listen in ["0.0.0.0:7000", "10.99.0.2:7000"] {
            assert!(choose(None, false, None, Peer::Listen(listen.parse().unwrap())).is_err(), "{listen}");
        }
        assert!(Peer::Listen("127.0.0.1:7000".parse().unwrap()).on_this_host());
        assert!(Peer::Backup("127.0.0.1:7000".parse().unwrap()).on_this_host());
        assert!(Peer::Backup("[::1]:7000".parse().unwrap()).on_this_host());
        assert!(is_local_ip("127.0.0.1".parse().unwrap()), "getifaddrs lists lo");
        assert!(!is_local_ip("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn ids_are_plain_names() {
        for good in ["vm1", "a.b-c_d", "X"] {
            assert!(check_id(good).is_ok(), "{good}");
        }
        for bad in ["", ".x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
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
        let etcd = EtcdSpec { ttl_secs: 3, ..EtcdSpec::plain("127.0.0.1", 2379, "ftvm/vm1") };
        assert_eq!(spec, ArbiterSpec::Etcd(etcd.clone()));
        assert_eq!(spec.to_string(), "etcd://127.0.0.1:2379/ftvm/vm1?ttl=3");
        assert_eq!(spec.to_string().parse::<ArbiterSpec>().unwrap(), spec, "Display round-trips");
        let ArbiterSpec::Etcd(short) = "etcd://etcd.example:2379/k".parse().unwrap() else { panic!("not etcd") };
        assert_eq!((short.endpoints[0].host.as_str(), short.key.as_str(), short.ttl_secs), ("etcd.example", "k", 2));
        let ArbiterSpec::Etcd(v6) = "etcd://[::1]:2379/k?ttl=10".parse().unwrap() else { panic!("not etcd") };
        assert_eq!((v6.endpoints[0].host.as_str(), v6.endpoints[0].port, v6.ttl_secs), ("::1", 2379, 10));
        assert_eq!(v6.to_string(), "etcd://[::1]:2379/k?ttl=10");
        assert_eq!("/run/ftvm.lock".parse::<ArbiterSpec>().unwrap(), ArbiterSpec::File("/run/ftvm.lock".into()));
    }

    #[test]
    fn an_etcd_url_without_a_key_takes_the_vm_identity_as_its_key() {
        let given: ArbiterSpec = "etcd://127.0.0.1:2379?ttl=3".parse().unwrap();
        let peer = Peer::Backup("10.1.2.3:7000".parse().unwrap());
        let key = |id| match choose(Some(&given), false, id, peer).unwrap() {
            ArbiterSpec::Etcd(e) => (e.key, e.ttl_secs),
            other => panic!("{other:?}"),
        };
        assert_eq!(key(Some("web1")), ("ftvm/web1".to_string(), 3));
        assert_eq!(key(None), ("ftvm/default".to_string(), 3));
        let named: ArbiterSpec = "etcd://127.0.0.1:2379/mine".parse().unwrap();
        let ArbiterSpec::Etcd(e) = choose(Some(&named), false, Some("web1"), peer).unwrap() else { panic!() };
        assert_eq!(e.key, "mine", "a key given is kept");
    }

    #[test]
    fn malformed_etcd_urls_say_what_is_wrong() {
        for (url, why) in [
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
