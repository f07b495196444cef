//! The etcd arbiter: a key held under a lease on an etcd cluster both sides reach.
//!
//! The lock-file arbiter detects the death of a process, not a hung or partitioned host: a
//! primary that is paused (SIGSTOP, a stalled VM, a long GC-like pause of the host) keeps its
//! lock and, once resumed, would perform outputs next to a backup that went live meanwhile.
//! A lease bounds that: the holder must renew it every few hundred milliseconds, and etcd
//! deletes the key when it is not renewed for its TTL, letting the other side win.
//!
//! Winning: grant a lease, then one transaction "if the key was never created (create
//! revision 0), put it with our lease". If the key exists, another holder has it.
//!
//! Holding: a keepalive thread renews the lease every TTL/4 (at least every 500 ms) and
//! checks that the key is still ours. The holder acts as the live copy only while
//! [`EtcdLease::valid`] says so, and that is decided by the local monotonic clock alone, with
//! no round trip: the *validity deadline* is
//!
//! ```text
//! (instant the last successful keepalive or grant request was SENT) + TTL * 0.9 - 100 ms
//! ```
//!
//! etcd starts the TTL when it *receives* the request, which is after we sent it, so counting
//! from the send time never overestimates the lease; the 10 % and 100 ms margins cover clock
//! rate differences between the hosts and the time between a check and the output it allows.
//! A side whose deadline passed stops performing outputs before etcd can give the key to
//! anyone else, even if its keepalive thread never ran (a stopped process: `Instant` is
//! CLOCK_MONOTONIC, which keeps counting while the process is stopped). After a resume the
//! keepalive thread's first request finds the lease expired, and the arbiter is lost for good.
//!
//! What remains is the window between a `valid()` check and the output it allows: a pause
//! that lands exactly there delays that one output past the check. Check right before
//! performing the output, so that this window is as short as the code path.
//!
//! The client speaks etcd's v3 JSON gateway (POST /v3/...) through ureq, a blocking HTTP/1.1
//! client, with rustls for `etcds://` (a CA, a client certificate for `--client-cert-auth`):
//! no gRPC, no protoc, no async runtime. Keys and values are base64 in the JSON, and 64-bit
//! integers are strings. With a user, the token of `/v3/auth/authenticate` goes in the
//! `Authorization` header, and a new one is asked for when etcd says it is no longer good.
//! With several members, a request that cannot reach one (or whose TLS handshake fails) goes
//! to the next: the lease is the cluster's, so it is kept through any member.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};

use crate::{Error, Result};

/// The default lease TTL: etcd 3.4's minimum with its default election timeout (1 s) is
/// 1.5 s, rounded up to 2 s; etcd raises shorter TTLs to it.
pub const DEFAULT_TTL_SECS: i64 = 2;
/// The safety margin taken off the lease's validity, besides the 10 % (see the module docs).
pub const VALIDITY_MARGIN: Duration = Duration::from_millis(100);
/// Connect, write and read timeout of one request (the whole request must fit in it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Timeout of the best-effort revoke when an arbiter is dropped or lost.
const REVOKE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often `acquire` retries while the key is held.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// The longest interval between keepalives.
const MAX_KEEPALIVE_INTERVAL: Duration = Duration::from_millis(500);
/// After a failed keepalive, how soon the next try goes out.
const FAILED_KEEPALIVE_RETRY: Duration = Duration::from_millis(100);

/// One etcd member's client address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEndpoint {
    pub host: String,
    pub port: u16,
}

impl EtcdEndpoint {
    /// `HOST:PORT`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// TLS to etcd (`etcds://`): the CA that signed the members' certificates (none: the Mozilla
/// roots that ureq bundles), and a client certificate and key for etcd's `--client-cert-auth`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: Option<PathBuf>,
    /// The client certificate (PEM, the chain) and its key (PEM): both or neither.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// etcd's authentication: a user and the file holding its password (never the password
/// itself, which would show on the command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdAuth {
    pub user: String,
    pub password_file: PathBuf,
}

/// What is wrong with an etcd arbiter's URL or the files it names.
#[derive(Debug, thiserror::Error)]
pub enum EtcdConfigError {
    #[error(
        "{0} (expected etcd://HOST:PORT/KEY[?ttl=SECONDS], etcds:// for TLS, HOST:PORT,HOST:PORT for several members)"
    )]
    Syntax(String),
    #[error("unknown parameter {0:?} (expected etcd://HOST:PORT/KEY[?ttl=SECONDS] with ttl, ca, cert, key, user, password-file)")]
    UnknownParameter(String),
    #[error("cannot read the {what} {}: {source}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {} is not usable: {why}", path.display())]
    BadPem { what: &'static str, path: PathBuf, why: String },
    #[error("the client certificate {} and key {} do not go together: {source}", cert.display(), key.display())]
    BadClientCert {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// An etcd arbiter: `etcd[s]://HOST:PORT[,HOST:PORT...]/KEY[?PARAMETERS]` (see
/// docs/operations.md). Parsing it also reads the files it names and checks that they parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSpec {
    /// The members to try, in order: a request that cannot reach one goes to the next.
    pub endpoints: Vec<EtcdEndpoint>,
    /// The key, as written after the authority (so `etcd://h:2379/ftvm/vm1` is `ftvm/vm1`);
    /// empty when the URL names none, and the pair derives it from `--id` (`ftvm/ID`).
    pub key: String,
    /// The TTL asked for; etcd may raise it (the TTL it returns is the one used).
    pub ttl_secs: i64,
    /// `Some` for `etcds://`.
    pub tls: Option<EtcdTls>,
    pub auth: Option<EtcdAuth>,
}

impl EtcdSpec {
    /// A plain `etcd://HOST:PORT/KEY` with the default TTL.
    pub fn plain(host: &str, port: u16, key: &str) -> EtcdSpec {
        EtcdSpec {
            endpoints: vec![EtcdEndpoint { host: host.into(), port }],
            key: key.into(),
            ttl_secs: DEFAULT_TTL_SECS,
            tls: None,
            auth: None,
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The client URL of one member, `http[s]://HOST:PORT`.
    pub fn url_of(&self, endpoint: &EtcdEndpoint) -> String {
        format!("{}://{}", self.scheme(), endpoint.authority())
    }

    /// The client URLs, comma-separated (for messages).
    pub fn endpoint(&self) -> String {
        self.endpoints.iter().map(|e| self.url_of(e)).collect::<Vec<_>>().join(",")
    }

    /// Reads and checks the files the spec names (what parsing does).
    pub fn check_files(&self) -> std::result::Result<(), EtcdConfigError> {
        if let Some(tls) = &self.tls {
            load_tls(tls)?;
        }
        if let Some(auth) = &self.auth {
            read_password(&auth.password_file)?;
        }
        Ok(())
    }
}

/// One request to etcd as the arbiter would make it (TLS, authentication, failover): reads
/// the key. `Ok`: who holds it, if anyone. For `ftvm doctor`.
pub fn probe(spec: &EtcdSpec) -> Result<Option<String>> {
    let client = Client::new(spec, REQUEST_TIMEOUT)
        .map_err(|source| Error::EtcdConfig { url: spec.to_string(), source: Box::new(source) })?;
    let holder = client
        .range(spec.key.as_bytes())
        .map_err(|e| Error::Arbiter { path: spec.to_string(), why: format!("etcd at {}: {e}", spec.endpoint()) })?;
    Ok(holder.map(|(_, value)| String::from_utf8_lossy(&value).into_owned()))
}

impl fmt::Display for EtcdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        let hosts: Vec<String> = self.endpoints.iter().map(EtcdEndpoint::authority).collect();
        write!(f, "{scheme}://{}/{}?ttl={}", hosts.join(","), self.key, self.ttl_secs)?;
        if let Some(tls) = &self.tls {
            for (name, path) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
                if let Some(path) = path {
                    write!(f, "&{name}={}", path.display())?;
                }
            }
        }
        if let Some(auth) = &self.auth {
            write!(f, "&user={}&password-file={}", auth.user, auth.password_file.display())?;
        }
        Ok(())
    }
}

fn parse_endpoint(authority: &str) -> std::result::Result<EtcdEndpoint, EtcdConfigError> {
    let err = |why: String| EtcdConfigError::Syntax(why);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| err("unclosed '[' in the host".into()))?;
        let port = after.strip_prefix(':').ok_or_else(|| err("missing port".into()))?;
        (host, port)
    } else {
        let (host, port) = authority.rsplit_once(':').ok_or_else(|| err("missing port".into()))?;
        if host.contains(':') {
            return Err(err("an IPv6 host must be in brackets".into()));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(err("missing host".into()));
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => return Err(err(format!("bad port {port:?}: expected 1-65535"))),
    };
    Ok(EtcdEndpoint { host: host.to_string(), port })
}

fn parse_spec(s: &str) -> std::result::Result<EtcdSpec, EtcdConfigError> {
    let err = |why: String| EtcdConfigError::Syntax(why);
    let (tls, rest) = match (s.strip_prefix("etcds://"), s.strip_prefix("etcd://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        _ => return Err(err("not an etcd URL".into())),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    // No key: the side derives it from the VM's identity (`ftvm/ID`, see arbiter::choose).
    let (authorities, key) = rest.split_once('/').unwrap_or((rest, ""));
    let endpoints = authorities.split(',').map(parse_endpoint).collect::<std::result::Result<Vec<_>, _>>()?;
    let mut ttl_secs = DEFAULT_TTL_SECS;
    let mut files = EtcdTls::default();
    let (mut user, mut password_file) = (None, None);
    for param in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let Some((name, value)) = param.split_once('=') else {
            return Err(EtcdConfigError::UnknownParameter(param.into()));
        };
        let path = || {
            if value.is_empty() {
                Err(err(format!("{name}= needs a path")))
            } else {
                Ok(Some(PathBuf::from(value)))
            }
        };
        match name {
            "ttl" => match value.parse::<i64>() {
                Ok(t) if t >= 2 => ttl_secs = t,
                _ => {
                    return Err(err(format!(
                        "ttl must be an integer number of seconds >= 2 (etcd's minimum lease), not {value:?}"
                    )))
                }
            },
            "ca" => files.ca = path()?,
            "cert" => files.cert = path()?,
            "key" => files.key = path()?,
            "user" if value.is_empty() => return Err(err("user= needs a name".into())),
            "user" => user = Some(value.to_string()),
            "password-file" => password_file = path()?,
            "password" => {
                return Err(err(
                    "no password in the URL (it would show on the command line): give password-file=PATH".into()
                ))
            }
            _ => return Err(EtcdConfigError::UnknownParameter(param.into())),
        }
    }
    if files.cert.is_some() != files.key.is_some() {
        return Err(err("cert= and key= go together (a client certificate and its private key)".into()));
    }
    let has_files = files != EtcdTls::default();
    if has_files && !tls {
        return Err(err("ca=, cert= and key= are TLS parameters: use etcds://".into()));
    }
    let auth = match (user, password_file) {
        (Some(user), Some(password_file)) => Some(EtcdAuth { user, password_file }),
        (None, None) => None,
        (Some(_), None) => return Err(err("user= needs password-file=PATH".into())),
        (None, Some(_)) => return Err(err("password-file= needs user=NAME".into())),
    };
    let spec = EtcdSpec { endpoints, key: key.to_string(), ttl_secs, tls: tls.then_some(files), auth };
    spec.check_files()?;
    Ok(spec)
}

impl FromStr for EtcdSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<EtcdSpec> {
        parse_spec(s).map_err(|source| Error::EtcdConfig { url: s.to_string(), source: Box::new(source) })
    }
}

/// The TLS material of a spec, read and checked.
struct TlsMaterial {
    ca: Option<Vec<Certificate<'static>>>,
    client: Option<(Vec<Certificate<'static>>, PrivateKey<'static>)>,
}

fn read_file(what: &'static str, path: &Path) -> std::result::Result<Vec<u8>, EtcdConfigError> {
    std::fs::read(path).map_err(|source| EtcdConfigError::Unreadable { what, path: path.into(), source })
}

/// The certificates of a PEM file (at least one), each checked to be X.509 that webpki takes.
fn read_certs(what: &'static str, path: &Path) -> std::result::Result<Vec<Certificate<'static>>, EtcdConfigError> {
    let pem = read_file(what, path)?;
    let bad = |why: String| EtcdConfigError::BadPem { what, path: path.into(), why };
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(c) = item.map_err(|e| bad(format!("bad PEM: {e}")))? {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE in it".into()));
    }
    for (n, cert) in certs.iter().enumerate() {
        // Taking it as a trust anchor parses its X.509 structure.
        let der = rustls::pki_types::CertificateDer::from(cert.der().to_vec());
        rustls::RootCertStore::empty()
            .add(der)
            .map_err(|e| bad(format!("certificate {} does not parse: {e}", n + 1)))?;
    }
    Ok(certs)
}

fn load_tls(tls: &EtcdTls) -> std::result::Result<TlsMaterial, EtcdConfigError> {
    let ca = match &tls.ca {
        Some(path) => Some(read_certs("CA certificate", path)?),
        None => None,
    };
    let client = match (&tls.cert, &tls.key) {
        (Some(cert_path), Some(key_path)) => {
            let certs = read_certs("client certificate", cert_path)?;
            let pem = read_file("client key", key_path)?;
            let key = PrivateKey::from_pem(&pem).map_err(|e| EtcdConfigError::BadPem {
                what: "client key",
                path: key_path.clone(),
                why: format!("no private key in it ({e})"),
            })?;
            // What rustls will do with them at the first connection: the key must load and
            // match the certificate.
            let chain: Vec<_> =
                certs.iter().map(|c| rustls::pki_types::CertificateDer::from(c.der().to_vec())).collect();
            let der = rustls::pki_types::PrivateKeyDer::try_from(key.der().to_vec()).map_err(|e| {
                EtcdConfigError::BadPem { what: "client key", path: key_path.clone(), why: e.to_string() }
            })?;
            // ring's provider, as ureq builds it (deprecated for its lack of post-quantum key
            // exchange; the check here only loads the key).
            #[allow(deprecated)]
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .and_then(|b| {
                    b.with_root_certificates(rustls::RootCertStore::empty()).with_client_auth_cert(chain, der)
                })
                .map_err(|source| EtcdConfigError::BadClientCert {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                    source,
                })?;
            Some((certs, key))
        }
        _ => None,
    };
    Ok(TlsMaterial { ca, client })
}

/// The password: the file's first line (a trailing newline is not part of it).
fn read_password(path: &Path) -> std::result::Result<String, EtcdConfigError> {
    let bytes = read_file("password file", path)?;
    let text = String::from_utf8(bytes).map_err(|_| EtcdConfigError::BadPem {
        what: "password file",
        path: path.into(),
        why: "not UTF-8".into(),
    })?;
    let password = text.lines().next().unwrap_or("").to_string();
    if password.is_empty() {
        return Err(EtcdConfigError::BadPem { what: "password file", path: path.into(), why: "empty".into() });
    }
    Ok(password)
}

// ---------------------------------------------------------------------------------------------
// The lease.

type LostCallback = Box<dyn FnOnce(String) + Send>;

/// What the keepalive thread and the holder share.
struct Shared {
    /// The origin of `deadline_ns`.
    base: Instant,
    /// The validity deadline, in nanoseconds after `base`.
    deadline_ns: AtomicU64,
    /// Set (forever) once the arbiter is lost.
    lost: AtomicBool,
    control: Mutex<Control>,
    wake: Condvar,
}

#[derive(Default)]
struct Control {
    /// The holder was dropped: the thread exits and never reports a loss.
    stop: bool,
    /// Test switch: the thread does nothing (as if the process were stopped).
    paused: bool,
    reason: Option<String>,
    callbacks: Vec<LostCallback>,
}

impl Shared {
    fn control(&self) -> MutexGuard<'_, Control> {
        // A callback that panicked cannot leave `Control` inconsistent: take the data anyway.
        ftvm_sync::lock(&self.control)
    }

    fn since_base(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// A keepalive (or the grant) sent at `sent` was answered with `ttl_secs`.
    fn renewed(&self, sent: Instant, ttl_secs: i64) {
        let ttl_ms = u64::try_from(ttl_secs).unwrap_or(0);
        let valid_for = Duration::from_millis(ttl_ms.saturating_mul(900)).saturating_sub(VALIDITY_MARGIN);
        let deadline = self.since_base(sent).saturating_add(u64::try_from(valid_for.as_nanos()).unwrap_or(u64::MAX));
        self.deadline_ns.store(deadline, Ordering::SeqCst);
    }

    fn valid(&self) -> bool {
        !self.lost.load(Ordering::SeqCst) && self.since_base(Instant::now()) < self.deadline_ns.load(Ordering::SeqCst)
    }

    fn deadline_passed(&self) -> bool {
        self.since_base(Instant::now()) >= self.deadline_ns.load(Ordering::SeqCst)
    }

    /// Records the loss and runs the callbacks, unless the holder was dropped.
    fn declare_lost(&self, why: String) {
        let callbacks = {
            let mut c = self.control();
            if c.stop || c.reason.is_some() {
                return;
            }
            self.lost.store(true, Ordering::SeqCst);
            c.reason = Some(why.clone());
            std::mem::take(&mut c.callbacks)
        };
        for f in callbacks {
            f(why.clone());
        }
    }
}

/// A held etcd arbiter (see the module docs). Dropping it stops the keepalive thread and
/// revokes the lease (best effort), which frees the key at once.
pub struct EtcdLease {
    spec: EtcdSpec,
    /// For the revoke on drop (it shares the keepalive thread's connections and token).
    client: Client,
    lease_id: i64,
    shared: Arc<Shared>,
}

impl fmt::Debug for EtcdLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdLease")
            .field("spec", &self.spec)
            .field("lease_id", &format_args!("{:x}", self.lease_id))
            .field("valid", &self.valid())
            .finish()
    }
}

impl EtcdLease {
    /// Tries to win the key until `wait` has passed (at least one try). `Ok(None)`: the key
    /// is held under another lease. `Err`: etcd cannot be reached or refused a request.
    pub fn acquire(spec: &EtcdSpec, wait: Duration) -> Result<Option<EtcdLease>> {
        let err =
            |e: CallError| Error::Arbiter { path: spec.to_string(), why: format!("etcd at {}: {e}", spec.endpoint()) };
        let client = Client::new(spec, REQUEST_TIMEOUT)
            .map_err(|source| Error::EtcdConfig { url: spec.to_string(), source: Box::new(source) })?;
        let key = spec.key.as_bytes();
        let holder = holder_name();
        let start = Instant::now();
        loop {
            let sent = Instant::now();
            let (lease_id, ttl) = client.grant(spec.ttl_secs).map_err(err)?;
            match client.put_if_absent(key, holder.as_bytes(), lease_id) {
                Ok(None) => {
                    let revoker = client.with_timeout(REVOKE_TIMEOUT);
                    let lease = EtcdLease::start(spec.clone(), client, lease_id, ttl, sent).inspect_err(|_| {
                        let _ = revoker.revoke(lease_id);
                    })?;
                    tracing::info!("won the etcd arbiter {spec} (lease {lease_id:x}, TTL {ttl} s, holder {holder})");
                    return Ok(Some(lease));
                }
                Ok(Some(other)) => {
                    let _ = client.revoke(lease_id);
                    if start.elapsed() >= wait {
                        tracing::debug!("the etcd arbiter {spec} is held by {other}");
                        return Ok(None);
                    }
                    std::thread::sleep(RETRY_INTERVAL.min(wait.saturating_sub(start.elapsed())));
                }
                Err(e) => {
                    let _ = client.revoke(lease_id);
                    return Err(err(e));
                }
            }
        }
    }

    fn start(spec: EtcdSpec, client: Client, lease_id: i64, ttl: i64, sent: Instant) -> Result<EtcdLease> {
        let shared = Arc::new(Shared {
            base: sent,
            deadline_ns: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            control: Mutex::new(Control::default()),
            wake: Condvar::new(),
        });
        shared.renewed(sent, ttl);
        let revoker = client.with_timeout(REVOKE_TIMEOUT);
        let thread = Keepalive { shared: shared.clone(), client, spec: spec.clone(), lease_id, ttl };
        std::thread::Builder::new()
            .name("etcd-keepalive".into())
            .spawn(move || {
                ftvm_seccomp::enter(ftvm_seccomp::Thread::Link);
                thread.run()
            })
            .map_err(|e| Error::Arbiter {
                path: spec.to_string(),
                why: format!("cannot start the keepalive thread: {e}"),
            })?;
        Ok(EtcdLease { spec, client: revoker, lease_id, shared })
    }

    /// Whether the lease is certainly still valid now (by the local monotonic clock; see the
    /// module docs). False forever once lost. Cheap: a clock read and two atomic loads.
    pub fn valid(&self) -> bool {
        self.shared.valid()
    }

    /// Why the arbiter was lost; `None` while it is held.
    pub fn lost(&self) -> Option<String> {
        self.shared.control().reason.clone()
    }

    /// Runs `f` once, from the keepalive thread, when the arbiter is found lost. If it is
    /// already lost, `f` runs now, in the caller's thread. Never runs after the drop.
    pub fn on_lost(&self, f: Box<dyn FnOnce(String) + Send>) {
        let mut c = self.shared.control();
        match c.reason.clone() {
            Some(why) => {
                drop(c);
                f(why);
            }
            None => c.callbacks.push(f),
        }
    }

    pub fn spec(&self) -> &EtcdSpec {
        &self.spec
    }

    /// The lease's ID (usable as a fencing token by a destination that checks one).
    pub fn lease_id(&self) -> i64 {
        self.lease_id
    }

    /// Test switch: the keepalive thread stops doing anything, as if the process were stopped.
    #[doc(hidden)]
    pub fn pause_keepalive_for_test(&self) {
        self.shared.control().paused = true;
    }

    /// Test switch: the keepalive thread resumes, as after a SIGCONT: a keepalive goes out at once.
    #[doc(hidden)]
    pub fn resume_keepalive_for_test(&self) {
        self.shared.control().paused = false;
        self.shared.wake.notify_all();
    }
}

impl Drop for EtcdLease {
    fn drop(&mut self) {
        // The thread exits at its next wake-up (or when its request in flight ends) without
        // reporting anything; it is not joined, so a hanging etcd cannot hold up the drop.
        self.shared.control().stop = true;
        self.shared.wake.notify_all();
        if let Err(e) = self.client.revoke(self.lease_id) {
            tracing::debug!("etcd arbiter {}: revoking lease {:x} on release: {e}", self.spec, self.lease_id);
        }
    }
}

/// The keepalive thread.
struct Keepalive {
    shared: Arc<Shared>,
    client: Client,
    spec: EtcdSpec,
    lease_id: i64,
    /// The TTL etcd last returned.
    ttl: i64,
}

enum Round {
    Renewed,
    Failed(String),
    Lost(String),
}

impl Keepalive {
    fn interval(&self) -> Duration {
        let ttl = Duration::from_secs(u64::try_from(self.ttl).unwrap_or(0));
        (ttl / 4).clamp(Duration::from_millis(10), MAX_KEEPALIVE_INTERVAL)
    }

    fn run(mut self) {
        let mut next = Instant::now() + self.interval();
        loop {
            if !self.sleep_until(next) {
                return;
            }
            let sent = Instant::now();
            match self.round() {
                Round::Renewed => {
                    self.shared.renewed(sent, self.ttl);
                    next = sent + self.interval();
                }
                Round::Failed(why) => {
                    if self.shared.deadline_passed() {
                        self.lose(format!(
                            "no keepalive succeeded before the lease's validity deadline; etcd at {}: {why}",
                            self.spec.endpoint()
                        ));
                        return;
                    }
                    tracing::warn!("etcd arbiter {}: keepalive failed (retrying): {why}", self.spec);
                    next = Instant::now() + FAILED_KEEPALIVE_RETRY.min(self.interval());
                }
                Round::Lost(why) => {
                    self.lose(why);
                    return;
                }
            }
        }
    }

    /// Waits until `next` (and while paused); false when the holder was dropped.
    fn sleep_until(&self, next: Instant) -> bool {
        let mut c = self.shared.control();
        loop {
            if c.stop {
                return false;
            }
            let now = Instant::now();
            if c.paused {
                c = ftvm_sync::unpoisoned(self.shared.wake.wait(c));
            } else if now < next {
                c = ftvm_sync::unpoisoned(self.shared.wake.wait_timeout(c, next - now)).0;
            } else {
                return true;
            }
        }
    }

    /// One keepalive, then a look at the key.
    fn round(&mut self) -> Round {
        let ttl = match self.client.keepalive(self.lease_id) {
            Ok(ttl) => ttl,
            Err(CallError::Rejected(m)) if m.contains("lease not found") => {
                return Round::Lost(self.expired(&format!("etcd says: {m}")))
            }
            Err(e) => return Round::Failed(e.to_string()),
        };
        if ttl <= 0 {
            return Round::Lost(self.expired(&format!("the keepalive reply has TTL {ttl}")));
        }
        match self.client.range(self.spec.key.as_bytes()) {
            Ok(Some((lease, _))) if lease == self.lease_id => {
                self.ttl = ttl;
                Round::Renewed
            }
            Ok(Some((_, value))) => Round::Lost(format!(
                "the key {:?} is held by someone else: {}",
                self.spec.key,
                String::from_utf8_lossy(&value)
            )),
            Ok(None) => Round::Lost(format!("the key {:?} was deleted", self.spec.key)),
            Err(e) => Round::Failed(e.to_string()),
        }
    }

    fn expired(&self, detail: &str) -> String {
        format!("the lease {:x} expired or was revoked ({detail})", self.lease_id)
    }

    fn lose(&self, why: String) {
        if self.shared.control().stop {
            return;
        }
        tracing::error!("etcd arbiter {} lost: {why}", self.spec);
        self.shared.declare_lost(why);
        // The key may still carry our lease (e.g. it was found held by another after a
        // delete and re-create, our lease alive): free what we still have.
        let _ = self.client.with_timeout(REVOKE_TIMEOUT).revoke(self.lease_id);
    }
}

/// The holder's name, stored as the key's value: `HOSTNAME/PID`.
fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{}/{}", if host.is_empty() { "unknown-host" } else { host }, std::process::id())
}

// ---------------------------------------------------------------------------------------------
// etcd's v3 JSON gateway.

/// A failed etcd call.
#[derive(Debug)]
pub(crate) enum CallError {
    /// No answer: connect, write or read failed or timed out.
    Unreachable(String),
    /// The TLS handshake failed (a certificate refused, by either side).
    Tls(String),
    /// etcd answered with an error.
    Rejected(String),
    /// The answer is not what etcd sends (bad HTTP, bad JSON, fields missing).
    BadReply(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Unreachable(m) => write!(f, "unreachable: {m}"),
            CallError::Tls(m) => write!(f, "TLS failed: {m}"),
            CallError::Rejected(m) => write!(f, "request refused: {m}"),
            CallError::BadReply(m) => write!(f, "malformed reply: {m}"),
        }
    }
}

/// The most a reply may hold; etcd's replies here are a few hundred bytes.
const MAX_BODY: u64 = 4 << 20;

/// What the clients of one arbiter share: one ureq agent (its connections are kept alive
/// between keepalives), the member in use, and the auth token.
struct Transport {
    spec: EtcdSpec,
    agent: ureq::Agent,
    /// The index in `spec.endpoints` of the member that answered last.
    current: AtomicUsize,
    /// (user, password), for `spec.auth`.
    credentials: Option<(String, String)>,
    /// The token of the last `/v3/auth/authenticate` (a simple token is good on the member
    /// that gave it only: a failover re-authenticates).
    token: Mutex<Option<String>>,
}

#[derive(Clone)]
pub(crate) struct Client {
    transport: Arc<Transport>,
    timeout: Duration,
}

/// Whether an I/O error carries a rustls error (a handshake refused), and which.
fn tls_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                    return Some(r.to_string());
                }
            }
        }
        cur = err.source();
    }
    None
}

impl Client {
    /// A client for `spec`, reading its TLS files and password file.
    pub(crate) fn new(spec: &EtcdSpec, timeout: Duration) -> std::result::Result<Client, EtcdConfigError> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .max_idle_connections_per_host(2)
            .user_agent(concat!("ftvm/", env!("CARGO_PKG_VERSION")));
        if let Some(tls) = &spec.tls {
            let material = load_tls(tls)?;
            let mut builder = TlsConfig::builder().provider(ureq::tls::TlsProvider::Rustls);
            if let Some(ca) = material.ca {
                builder = builder.root_certs(RootCerts::new_with_certs(&ca));
            }
            if let Some((chain, key)) = material.client {
                builder = builder.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
            }
            config = config.tls_config(builder.build());
        }
        let credentials = match &spec.auth {
            Some(auth) => Some((auth.user.clone(), read_password(&auth.password_file)?)),
            None => None,
        };
        let transport = Transport {
            spec: spec.clone(),
            agent: config.build().into(),
            current: AtomicUsize::new(0),
            credentials,
            token: Mutex::new(None),
        };
        Ok(Client { transport: Arc::new(transport), timeout })
    }

    /// The same connections and token, with another timeout per request.
    pub(crate) fn with_timeout(&self, timeout: Duration) -> Client {
        Client { transport: self.transport.clone(), timeout }
    }

    fn token(&self) -> MutexGuard<'_, Option<String>> {
        ftvm_sync::lock(&self.transport.token)
    }

    /// POSTs `body` to `path`, on the member in use, then on the next ones while a member
    /// cannot be reached; returns the first JSON value of a 200 reply (a streaming reply,
    /// like keepalive's, carries one message per request message).
    pub(crate) fn call(&self, path: &str, body: &Value) -> std::result::Result<Value, CallError> {
        let endpoints = &self.transport.spec.endpoints;
        let first = self.transport.current.load(Ordering::SeqCst) % endpoints.len().max(1);
        let mut failures = Vec::new();
        for i in 0..endpoints.len() {
            let n = (first + i) % endpoints.len();
            match self.call_member(n, path, body) {
                Err(e @ (CallError::Unreachable(_) | CallError::Tls(_))) => {
                    if endpoints.len() > 1 {
                        tracing::warn!("etcd arbiter {}: {e}; trying the next member", self.transport.spec);
                    }
                    failures.push(e);
                }
                other => {
                    if n != first {
                        self.transport.current.store(n, Ordering::SeqCst);
                        tracing::warn!(
                            target: "ftvm::event",
                            event = "etcd_failover",
                            endpoint = %self.transport.spec.url_of(&endpoints[n]),
                            "etcd arbiter {}: now using {}",
                            self.transport.spec,
                            self.transport.spec.url_of(&endpoints[n])
                        );
                    }
                    return other;
                }
            }
        }
        // Every member failed: a TLS failure says more than a timeout.
        let tls = failures.iter().position(|e| matches!(e, CallError::Tls(_)));
        let last = failures.len().saturating_sub(1);
        Err(failures.swap_remove(tls.unwrap_or(last)))
    }

    /// One call on member `n`, with a token when the spec has a user (authenticating first,
    /// and once more when etcd says the token is no longer good).
    fn call_member(&self, n: usize, path: &str, body: &Value) -> std::result::Result<Value, CallError> {
        let Some((user, password)) = &self.transport.credentials else {
            return self.post(n, path, body, None);
        };
        let mut retried = false;
        loop {
            let token = self.token().clone();
            let token = match token {
                Some(t) => t,
                None => {
                    let v =
                        self.post(n, "/v3/auth/authenticate", &json!({ "name": user, "password": password }), None)?;
                    let t = v.get("token").and_then(Value::as_str).unwrap_or("").to_string();
                    if t.is_empty() {
                        return Err(CallError::BadReply("/v3/auth/authenticate: no token in the reply".into()));
                    }
                    *self.token() = Some(t.clone());
                    t
                }
            };
            match self.post(n, path, body, Some(&token)) {
                Err(CallError::Rejected(m)) if !retried && m.contains("invalid auth token") => {
                    tracing::debug!("etcd arbiter {}: {m}; authenticating again", self.transport.spec);
                    *self.token() = None;
                    retried = true;
                }
                other => return other,
            }
        }
    }

    fn post(&self, n: usize, path: &str, body: &Value, token: Option<&str>) -> std::result::Result<Value, CallError> {
        let spec = &self.transport.spec;
        let base = spec.url_of(&spec.endpoints[n]);
        let url = format!("{base}{path}");
        let mut request = self
            .transport
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .config()
            .timeout_global(Some(self.timeout))
            .build();
        if let Some(token) = token {
            request = request.header("Authorization", token);
        }
        let failed = |what: &str, e: ureq::Error| match e {
            ureq::Error::Rustls(r) => CallError::Tls(format!("{base}: {r}")),
            ureq::Error::Tls(m) => CallError::Tls(format!("{base}: {m}")),
            ureq::Error::Timeout(_) => {
                CallError::Unreachable(format!("{what} {base}: timed out after {} ms", self.timeout.as_millis()))
            }
            ureq::Error::Io(io) => match tls_cause(&io) {
                // A certificate refused by us (the server's) or by etcd (ours, an alert).
                Some(r) => CallError::Tls(format!("{base}: {r}")),
                None => {
                    // etcd with --client-cert-auth closes on a client certificate it refuses
                    // (or none), often before its alert can be read (TLS 1.3 ends the
                    // client's handshake first).
                    let closed = matches!(
                        io.kind(),
                        std::io::ErrorKind::BrokenPipe
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::UnexpectedEof
                    );
                    let hint = match spec.tls.as_ref().map(|t| t.cert.is_some()) {
                        Some(false) if closed => {
                            " (closed during TLS: does etcd want a client certificate? give cert= and key=)"
                        }
                        Some(true) if closed => " (closed during TLS: does etcd trust our client certificate?)",
                        _ => "",
                    };
                    CallError::Unreachable(format!("{what} {base}: {io}{hint}"))
                }
            },
            e @ (ureq::Error::HostNotFound | ureq::Error::ConnectionFailed) => {
                CallError::Unreachable(format!("{what} {base}: {e}"))
            }
            e => match tls_cause(&e) {
                Some(r) => CallError::Tls(format!("{base}: {r}")),
                None => CallError::BadReply(format!("{path}: {e}")),
            },
        };
        let mut response = request.send(body.to_string()).map_err(|e| failed("post to", e))?;
        let status = response.status().as_u16();
        let reply =
            response.body_mut().with_config().limit(MAX_BODY).read_to_vec().map_err(|e| failed("read from", e))?;
        let value: Option<Value> =
            serde_json::Deserializer::from_slice(&reply).into_iter::<Value>().next().transpose().map_err(|e| {
                CallError::BadReply(format!("{path}: HTTP {status}: bad JSON ({e}): {}", snippet(&reply)))
            })?;
        let message = value.as_ref().and_then(error_message);
        if status != 200 {
            let what = message.unwrap_or_else(|| snippet(&reply));
            return Err(CallError::Rejected(format!("{path}: HTTP {status}: {what}")));
        }
        if let Some(m) = message {
            return Err(CallError::Rejected(format!("{path}: {m}")));
        }
        match value {
            Some(v @ Value::Object(_)) => Ok(v),
            _ => Err(CallError::BadReply(format!("{path}: not a JSON object: {}", snippet(&reply)))),
        }
    }

    /// Grants a lease: (ID, TTL etcd gave).
    fn grant(&self, ttl: i64) -> std::result::Result<(i64, i64), CallError> {
        let v = self.call("/v3/lease/grant", &json!({ "TTL": ttl, "ID": 0 }))?;
        let bad = |m: String| CallError::BadReply(format!("/v3/lease/grant: {m}"));
        header(&v).map_err(bad)?;
        let id = int(&v, "ID").map_err(bad)?;
        let ttl = int(&v, "TTL").map_err(bad)?;
        if id == 0 || ttl <= 0 {
            return Err(bad(format!("no lease in the reply (ID {id}, TTL {ttl})")));
        }
        Ok((id, ttl))
    }

    /// Creates `key` = `value` with `lease` unless the key exists. `Ok(None)`: created;
    /// `Ok(Some(holder))`: it exists (holder: its value).
    fn put_if_absent(&self, key: &[u8], value: &[u8], lease: i64) -> std::result::Result<Option<String>, CallError> {
        let key = b64(key);
        let body = json!({
            "compare": [{ "key": key, "target": "CREATE", "create_revision": "0", "result": "EQUAL" }],
            "success": [{ "request_put": { "key": key, "value": b64(value), "lease": lease.to_string() } }],
            "failure": [{ "request_range": { "key": key } }],
        });
        let v = self.call("/v3/kv/txn", &body)?;
        let bad = |m: String| CallError::BadReply(format!("/v3/kv/txn: {m}"));
        header(&v).map_err(bad)?;
        let succeeded = match v.get("succeeded") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(bad(format!("\"succeeded\" is not a boolean: {other}"))),
        };
        if succeeded {
            return Ok(None);
        }
        let range = v.pointer("/responses/0/response_range").unwrap_or(&Value::Null);
        let holder = first_kv(range).map_err(bad)?.map(|(_, value)| String::from_utf8_lossy(&value).into_owned());
        Ok(Some(holder.unwrap_or_else(|| "(a holder that just left)".into())))
    }

    /// Renews a lease: the TTL left (0: the lease does not exist any more).
    fn keepalive(&self, lease: i64) -> std::result::Result<i64, CallError> {
        let v = self.call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))?;
        let bad = |m: String| CallError::BadReply(format!("/v3/lease/keepalive: {m}"));
        let result = v.get("result").ok_or_else(|| bad("no \"result\"".into()))?;
        header(result).map_err(bad)?;
        let id = int(result, "ID").map_err(bad)?;
        if id != lease {
            return Err(bad(format!("reply for lease {id:x}, not {lease:x}")));
        }
        int(result, "TTL").map_err(bad)
    }

    /// The key's lease and value, if it exists.
    pub(crate) fn range(&self, key: &[u8]) -> std::result::Result<Option<(i64, Vec<u8>)>, CallError> {
        let v = self.call("/v3/kv/range", &json!({ "key": b64(key) }))?;
        let bad = |m: String| CallError::BadReply(format!("/v3/kv/range: {m}"));
        header(&v).map_err(bad)?;
        first_kv(&v).map_err(bad)
    }

    /// Revokes a lease (deleting its keys). A lease already gone is not an error.
    fn revoke(&self, lease: i64) -> std::result::Result<(), CallError> {
        match self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() })) {
            Ok(_) => Ok(()),
            Err(CallError::Rejected(m)) if m.contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn delete(&self, key: &[u8]) -> std::result::Result<(), CallError> {
        self.call("/v3/kv/deleterange", &json!({ "key": b64(key) })).map(|_| ())
    }
}

fn b64(data: &[u8]) -> String {
    B64.encode(data)
}

/// The error message of an error reply: `{"error": "...", "message": "...", "code": N}`, or
/// `{"error": {...}}` in a stream.
fn error_message(v: &Value) -> Option<String> {
    match v.get("error")? {
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => Some(
            o.get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| Value::Object(o.clone()).to_string()),
        ),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn header(v: &Value) -> std::result::Result<(), String> {
    match v.get("header") {
        Some(Value::Object(_)) => Ok(()),
        _ => Err("no response header".into()),
    }
}

/// A 64-bit integer field: etcd writes them as strings and leaves out zeros.
fn int(v: &Value, field: &str) -> std::result::Result<i64, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => s.parse().map_err(|_| format!("{field:?} is not an integer: {s:?}")),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| format!("{field:?} is not a 64-bit integer: {n}")),
        Some(other) => Err(format!("{field:?} is not an integer: {other}")),
    }
}

/// The first key-value of a range response: (lease, value).
fn first_kv(range: &Value) -> std::result::Result<Option<(i64, Vec<u8>)>, String> {
    let kv = match range.get("kvs") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(kvs)) => match kvs.first() {
            None => return Ok(None),
            Some(kv) => kv,
        },
        Some(other) => return Err(format!("\"kvs\" is not an array: {other}")),
    };
    let value = match kv.get("value") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => B64.decode(s).map_err(|e| format!("value: {e}"))?,
        Some(other) => return Err(format!("value is not a string: {other}")),
    };
    Ok(Some((int(kv, "lease")?, value)))
}

/// The start of a reply, for error messages.
fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None if text.is_empty() => "(empty body)".into(),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_of_keys_and_values() {
        assert_eq!(b64(b"ftvm/vm1"), "ZnR2bS92bTE=");
        assert_eq!(b64(b""), "");
    }

    #[test]
    fn json_fields() {
        let v = json!({ "ID": "4111120376016781062", "TTL": 5, "bad": "x", "obj": {} });
        assert_eq!(int(&v, "ID").unwrap(), 4111120376016781062);
        assert_eq!(int(&v, "TTL").unwrap(), 5);
        assert_eq!(int(&v, "missing").unwrap(), 0);
        assert!(int(&v, "bad").is_err());
        assert!(int(&v, "obj").is_err());
        let range = json!({ "kvs": [{ "key": "Zm9v", "value": "YmFy", "lease": "12" }] });
        assert_eq!(first_kv(&range).unwrap(), Some((12, b"bar".to_vec())));
        assert_eq!(first_kv(&json!({})).unwrap(), None);
        assert!(first_kv(&json!({ "kvs": "no" })).is_err());
        assert!(first_kv(&json!({ "kvs": [{ "value": "!!" }] })).is_err());
        assert_eq!(
            error_message(&json!({ "error": "etcdserver: requested lease not found", "code": 5 })).as_deref(),
            Some("etcdserver: requested lease not found")
        );
        assert_eq!(error_message(&json!({ "error": { "message": "boom" } })).as_deref(), Some("boom"));
        assert_eq!(error_message(&json!({ "error": "" })), None);
    }

    #[test]
    fn validity_deadline_counts_from_the_send_time() {
        let base = Instant::now();
        let shared = Shared {
            base,
            deadline_ns: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            control: Mutex::new(Control::default()),
            wake: Condvar::new(),
        };
        assert!(!shared.valid());
        shared.renewed(base, 2);
        assert_eq!(shared.deadline_ns.load(Ordering::SeqCst), Duration::from_millis(1700).as_nanos() as u64);
        assert!(shared.valid());
        shared.renewed(base, 0);
        assert!(!shared.valid(), "TTL 0 leaves no validity");
        shared.renewed(base, i64::MAX);
        assert!(shared.valid(), "a huge TTL saturates");
        shared.declare_lost("test".into());
        assert!(!shared.valid(), "lost is forever");
    }
}
