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
        Some(spec @ ArbiterSpec::Etcd(_)) => Ok(spec.clone()),
        Some(spec @ ArbiterSpec::File(_)) if local || shared_lock => Ok(spec.clone()),
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
