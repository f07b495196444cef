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
//! The client speaks etcd's v3 JSON gateway (POST /v3/...) over a small blocking HTTP/1.1
//! client: no gRPC, no protoc, no async runtime. Keys and values are base64 in the JSON, and
//! 64-bit integers are strings.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

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

/// An etcd arbiter: `etcd://HOST:PORT/KEY[?ttl=SECONDS]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSpec {
    pub host: String,
    pub port: u16,
    /// The key, as written after `HOST:PORT/` (so `etcd://h:2379/ftvm/vm1` is `ftvm/vm1`).
    pub key: String,
    /// The TTL asked for; etcd may raise it (the TTL it returns is the one used).
    pub ttl_secs: i64,
}

impl EtcdSpec {
    /// `HOST:PORT`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The client URL, `http://HOST:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.authority())
    }
}

impl fmt::Display for EtcdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd://{}/{}?ttl={}", self.authority(), self.key, self.ttl_secs)
    }
}

impl FromStr for EtcdSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<EtcdSpec> {
        let err = |why: String| Error::Arbiter {
            path: s.to_string(),
            why: format!("{why} (expected etcd://HOST:PORT/KEY[?ttl=SECONDS])"),
        };
        let rest = s.strip_prefix("etcd://").ok_or_else(|| err("not an etcd URL".into()))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, key) = rest.split_once('/').ok_or_else(|| err("missing key".into()))?;
        if key.is_empty() {
            return Err(err("missing key".into()));
        }
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
        let mut ttl_secs = DEFAULT_TTL_SECS;
        for param in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
            match param.split_once('=') {
                Some(("ttl", v)) => match v.parse::<i64>() {
                    Ok(t) if t >= 2 => ttl_secs = t,
                    _ => {
                        return Err(err(format!(
                            "ttl must be an integer number of seconds >= 2 (etcd's minimum lease), not {v:?}"
                        )))
                    }
                },
                _ => return Err(err(format!("unknown parameter {param:?} (the only one is ttl=SECONDS)"))),
            }
        }
        Ok(EtcdSpec { host: host.to_string(), port, key: key.to_string(), ttl_secs })
    }
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
        self.control.lock().unwrap_or_else(|e| e.into_inner())
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
        let client = Client::new(spec, REQUEST_TIMEOUT);
        let key = spec.key.as_bytes();
        let holder = holder_name();
        let start = Instant::now();
        loop {
            let sent = Instant::now();
            let (lease_id, ttl) = client.grant(spec.ttl_secs).map_err(err)?;
            match client.put_if_absent(key, holder.as_bytes(), lease_id) {
                Ok(None) => {
                    let lease = EtcdLease::start(spec.clone(), client, lease_id, ttl, sent).inspect_err(|_| {
                        let _ = Client::new(spec, REVOKE_TIMEOUT).revoke(lease_id);
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
        Ok(EtcdLease { spec, lease_id, shared })
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
        if let Err(e) = Client::new(&self.spec, REVOKE_TIMEOUT).revoke(self.lease_id) {
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
                c = self.shared.wake.wait(c).unwrap_or_else(|e| e.into_inner());
            } else if now < next {
                c = self.shared.wake.wait_timeout(c, next - now).unwrap_or_else(|e| e.into_inner()).0;
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
        let _ = Client::new(&self.spec, REVOKE_TIMEOUT).revoke(self.lease_id);
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
    /// etcd answered with an error.
    Rejected(String),
    /// The answer is not what etcd sends (bad HTTP, bad JSON, fields missing).
    BadReply(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Unreachable(m) => write!(f, "unreachable: {m}"),
            CallError::Rejected(m) => write!(f, "request refused: {m}"),
            CallError::BadReply(m) => write!(f, "malformed reply: {m}"),
        }
    }
}

pub(crate) struct Client {
    host: String,
    port: u16,
    timeout: Duration,
}

impl Client {
    pub(crate) fn new(spec: &EtcdSpec, timeout: Duration) -> Client {
        Client { host: spec.host.clone(), port: spec.port, timeout }
    }

    /// POSTs `body` to `path`; returns the first JSON value of a 200 reply (a streaming
    /// reply, like keepalive's, carries one message per request message).
    pub(crate) fn call(&self, path: &str, body: &Value) -> std::result::Result<Value, CallError> {
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let body = body.to_string();
        let (status, reply) = http::post(&self.host, self.port, &authority, path, body.as_bytes(), self.timeout)?;
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
        let key = base64::encode(key);
        let body = json!({
            "compare": [{ "key": key, "target": "CREATE", "create_revision": "0", "result": "EQUAL" }],
            "success": [{ "request_put": { "key": key, "value": base64::encode(value), "lease": lease.to_string() } }],
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
    fn range(&self, key: &[u8]) -> std::result::Result<Option<(i64, Vec<u8>)>, CallError> {
        let v = self.call("/v3/kv/range", &json!({ "key": base64::encode(key) }))?;
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

    fn delete(&self, key: &[u8]) -> std::result::Result<(), CallError> {
        self.call("/v3/kv/deleterange", &json!({ "key": base64::encode(key) })).map(|_| ())
    }
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
        Some(Value::String(s)) => base64::decode(s).map_err(|e| format!("value: {e}"))?,
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

// ---------------------------------------------------------------------------------------------
// HTTP/1.1, just enough: one POST per connection (Connection: close).

mod http {
    use super::*;

    /// The most a reply may hold; etcd's replies here are a few hundred bytes.
    const MAX_BODY: usize = 4 << 20;
    const MAX_LINE: u64 = 16 << 10;
    const MAX_HEADERS: usize = 100;

    /// POSTs a JSON body; the whole exchange (connect, write, read) must end within `timeout`.
    pub(super) fn post(
        host: &str,
        port: u16,
        authority: &str,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> std::result::Result<(u16, Vec<u8>), CallError> {
        let deadline = Instant::now() + timeout;
        let unreachable = |what: &str, e: std::io::Error| {
            let e = match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!("timed out after {} ms", timeout.as_millis())
                }
                _ => e.to_string(),
            };
            CallError::Unreachable(format!("{what} {authority}: {e}"))
        };
        // A host name is resolved by the system resolver, outside the timeout (use an address
        // where that matters).
        let addrs = (host, port).to_socket_addrs().map_err(|e| unreachable("resolve", e))?;
        let mut last = None;
        let mut stream = None;
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream
            .ok_or_else(|| unreachable("connect", last.unwrap_or_else(|| std::io::ErrorKind::TimedOut.into())))?;
        let _ = stream.set_nodelay(true);
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        let mut timed = Timed { stream: &stream, deadline };
        timed.write_all(&request).map_err(|e| unreachable("write to", e))?;
        read_response(&mut BufReader::new(timed)).map_err(|e| match e {
            ReadError::Io(e) => unreachable("read from", e),
            ReadError::Bad(m) => CallError::BadReply(format!("{path}: {m}")),
        })
    }

    /// A socket whose reads and writes share one deadline.
    struct Timed<'a> {
        stream: &'a TcpStream,
        deadline: Instant,
    }

    impl Timed<'_> {
        fn left(&self) -> std::io::Result<Duration> {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            Ok(left)
        }
    }

    impl Read for Timed<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.stream.set_read_timeout(Some(self.left()?))?;
            self.stream.read(buf)
        }
    }

    impl Write for Timed<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.stream.set_write_timeout(Some(self.left()?))?;
            self.stream.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Debug)]
    pub(super) enum ReadError {
        Io(std::io::Error),
        Bad(String),
    }

    impl From<std::io::Error> for ReadError {
        fn from(e: std::io::Error) -> ReadError {
            ReadError::Io(e)
        }
    }

    fn bad<T>(m: impl Into<String>) -> std::result::Result<T, ReadError> {
        Err(ReadError::Bad(m.into()))
    }

    /// One CRLF (or LF) terminated line, without the terminator.
    fn line(r: &mut impl BufRead) -> std::result::Result<String, ReadError> {
        let mut buf = Vec::new();
        r.take(MAX_LINE).read_until(b'\n', &mut buf)?;
        if buf.last() != Some(&b'\n') {
            return if buf.len() as u64 >= MAX_LINE {
                bad("line too long")
            } else {
                bad("connection closed in the middle of the reply")
            };
        }
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        String::from_utf8(buf).or_else(|_| bad("a line that is not UTF-8"))
    }

    /// Reads one response: status and body (Content-Length, chunked, or up to the close).
    pub(super) fn read_response(r: &mut impl BufRead) -> std::result::Result<(u16, Vec<u8>), ReadError> {
        loop {
            let status_line = line(r)?;
            let mut parts = status_line.splitn(3, ' ');
            let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if !version.starts_with("HTTP/1.") {
                return bad(format!("not an HTTP/1.x status line: {status_line:?}"));
            }
            let status: u16 = match code.parse() {
                Ok(s) if (100..600).contains(&s) => s,
                _ => return bad(format!("bad status in {status_line:?}")),
            };
            let mut length = None;
            let mut chunked = false;
            let mut headers = 0;
            loop {
                let h = line(r)?;
                if h.is_empty() {
                    break;
                }
                headers += 1;
                if headers > MAX_HEADERS {
                    return bad("too many headers");
                }
                let Some((name, value)) = h.split_once(':') else {
                    return bad(format!("bad header line {h:?}"));
                };
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    match value.parse::<usize>() {
                        Ok(n) if n <= MAX_BODY => length = Some(n),
                        Ok(n) => return bad(format!("body too large ({n} bytes)")),
                        Err(_) => return bad(format!("bad Content-Length {value:?}")),
                    }
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    let last = value.rsplit(',').next().unwrap_or("").trim();
                    if !last.eq_ignore_ascii_case("chunked") {
                        return bad(format!("unsupported Transfer-Encoding {value:?}"));
                    }
                    chunked = true;
                }
            }
            if (100..200).contains(&status) {
                continue; // an interim response (100 Continue): the real one follows
            }
            let body = if chunked {
                read_chunked(r)?
            } else if let Some(n) = length {
                let mut body = vec![0; n];
                r.read_exact(&mut body).map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => ReadError::Bad("connection closed in the body".into()),
                    _ => ReadError::Io(e),
                })?;
                body
            } else {
                let mut body = Vec::new();
                r.take(MAX_BODY as u64 + 1).read_to_end(&mut body)?;
                if body.len() > MAX_BODY {
                    return bad("body too large");
                }
                body
            };
            return Ok((status, body));
        }
    }

    fn read_chunked(r: &mut impl BufRead) -> std::result::Result<Vec<u8>, ReadError> {
        let mut body = Vec::new();
        loop {
            let size_line = line(r)?;
            let size = size_line.split(';').next().unwrap_or("").trim();
            let Ok(size) = usize::from_str_radix(size, 16) else {
                return bad(format!("bad chunk size {size_line:?}"));
            };
            if size == 0 {
                // Trailers (etcd sends some), up to the empty line; a close instead is fine.
                loop {
                    match line(r) {
                        Ok(t) if t.is_empty() => return Ok(body),
                        Ok(_) => {}
                        Err(ReadError::Bad(_)) => return Ok(body),
                        Err(e) => return Err(e),
                    }
                }
            }
            if body.len().saturating_add(size) > MAX_BODY {
                return bad("body too large");
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..]).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => ReadError::Bad("connection closed in a chunk".into()),
                _ => ReadError::Io(e),
            })?;
            if !line(r)?.is_empty() {
                return bad("no CRLF after a chunk");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Base64 (RFC 4648, standard alphabet, padded), for keys and values.

mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub(super) fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub(super) fn decode(s: &str) -> Result<Vec<u8>, String> {
        let data = s.trim_end_matches('=');
        if s.len() - data.len() > 2 || data.len() % 4 == 1 {
            return Err(format!("bad base64 length: {s:?}"));
        }
        let mut out = Vec::with_capacity(data.len() * 3 / 4);
        let (mut acc, mut bits) = (0u32, 0u32);
        for c in data.bytes() {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return Err(format!("bad base64 character {:?}", char::from(c))),
            };
            acc = (acc << 6) | u32::from(v);
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------

/// A throwaway single-member etcd for tests (this crate's and others'): fresh ports and data
/// directory; killed and removed on drop.
#[doc(hidden)]
pub mod testing {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use super::{Client, EtcdSpec, DEFAULT_TTL_SECS};
    use crate::arbiter::ArbiterSpec;

    /// A running test etcd.
    pub struct TestEtcd {
        child: Option<Child>,
        dir: PathBuf,
        port: u16,
        /// The address it serves on (127.0.0.1, or one in a network namespace).
        host: String,
    }

    impl TestEtcd {
        /// `HOST:PORT`, its client address.
        pub fn endpoint(&self) -> String {
            format!("{}:{}", self.host, self.port)
        }

        pub fn port(&self) -> u16 {
            self.port
        }

        /// An etcd arbiter on this etcd (default TTL).
        pub fn spec(&self, key: &str) -> ArbiterSpec {
            ArbiterSpec::Etcd(self.etcd_spec(key))
        }

        pub fn etcd_spec(&self, key: &str) -> EtcdSpec {
            EtcdSpec { host: self.host.clone(), port: self.port, key: key.into(), ttl_secs: DEFAULT_TTL_SECS }
        }

        /// `etcd://HOST:PORT/KEY`, for a command line.
        pub fn url(&self, key: &str) -> String {
            self.etcd_spec(key).to_string()
        }

        /// Deletes a key behind its holder's back.
        pub fn delete_key(&self, key: &str) -> std::io::Result<()> {
            Client::new(&self.etcd_spec(key), Duration::from_secs(2))
                .delete(key.as_bytes())
                .map_err(|e| std::io::Error::other(e.to_string()))
        }

        /// Kills etcd now (the data directory goes on drop): it becomes unreachable.
        pub fn kill(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        /// The directory holding the data and `etcd.log`.
        pub fn dir(&self) -> &Path {
            &self.dir
        }
    }

    impl Drop for TestEtcd {
        fn drop(&mut self) {
            self.kill();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The etcd binary: /usr/bin/etcd, or `etcd` on the PATH.
    pub fn etcd_binary() -> Option<PathBuf> {
        let usr = PathBuf::from("/usr/bin/etcd");
        if usr.is_file() {
            return Some(usr);
        }
        std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join("etcd")).find(|p| p.is_file())
    }

    fn free_port() -> std::io::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
    }

    /// Starts an etcd and waits until it serves requests. `NotFound` if etcd is not installed.
    pub fn start_test_etcd() -> std::io::Result<TestEtcd> {
        let Some(bin) = etcd_binary() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "etcd is not installed (no /usr/bin/etcd, none on the PATH): run scripts/deps.sh",
            ));
        };
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let mut last_err = None;
        // Ports are picked free, then given to etcd: another process may take one in between.
        for _ in 0..3 {
            let n = COUNTER.fetch_add(1, Ordering::SeqCst);
            let dir = std::env::temp_dir().join(format!("ftvm-test-etcd-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            let (client, peer) = (free_port()?, free_port()?);
            let log = std::fs::File::create(dir.join("etcd.log"))?;
            let c = format!("http://127.0.0.1:{client}");
            let p = format!("http://127.0.0.1:{peer}");
            let child = Command::new(&bin)
                .arg("--name=default")
                .arg(format!("--data-dir={}", dir.join("data").display()))
                .arg(format!("--listen-client-urls={c}"))
                .arg(format!("--advertise-client-urls={c}"))
                .arg(format!("--listen-peer-urls={p}"))
                .arg(format!("--initial-advertise-peer-urls={p}"))
                .arg(format!("--initial-cluster=default={p}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {}: {e}", bin.display())))?;
            let mut etcd = TestEtcd { child: Some(child), dir, port: client, host: "127.0.0.1".into() };
            match wait_ready(&mut etcd) {
                Ok(()) => return Ok(etcd),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other("etcd did not start")))
    }

    /// Starts an etcd inside network namespace `netns`, serving on `ip` (an address of that
    /// namespace), for tests whose sides run in other namespaces that reach it. This process
    /// cannot reach it: it waits for etcd's log to say it serves.
    pub fn start_test_etcd_in_netns(netns: &str, ip: &str) -> std::io::Result<TestEtcd> {
        let Some(bin) = etcd_binary() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "etcd is not installed (no /usr/bin/etcd, none on the PATH): run scripts/deps.sh",
            ));
        };
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ftvm-test-etcd-ns-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // A fresh namespace has every port free.
        let (client, peer) = (2379, 2380);
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let c = format!("http://{ip}:{client}");
        let p = format!("http://{ip}:{peer}");
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(&bin)
            .arg("--name=default")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={c}"))
            .arg(format!("--advertise-client-urls={c}"))
            .arg(format!("--listen-peer-urls={p}"))
            .arg(format!("--initial-advertise-peer-urls={p}"))
            .arg(format!("--initial-cluster=default={p}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {} in {netns}: {e}", bin.display())))?;
        let mut etcd = TestEtcd { child: Some(child), dir, port: client, host: ip.into() };
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default();
            if log.contains("ready to serve client requests") {
                return Ok(etcd);
            }
            let exited = etcd.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || start.elapsed() > Duration::from_secs(30) {
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(std::io::Error::other(format!(
                    "test etcd in {netns} did not start; its log ends:\n{}",
                    tail.join("\n")
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_ready(etcd: &mut TestEtcd) -> std::io::Result<()> {
        let client = Client::new(&etcd.etcd_spec("ftvm-test-etcd-ready"), Duration::from_millis(500));
        let start = Instant::now();
        loop {
            if client.range(b"ftvm-test-etcd-ready").is_ok() {
                return Ok(());
            }
            let exited = etcd.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || start.elapsed() > Duration::from_secs(30) {
                let log = std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                let what = match exited {
                    Some(status) => format!("exited ({status})"),
                    None => "did not answer within 30 s".into(),
                };
                return Err(std::io::Error::other(format!("test etcd {what}; its log ends:\n{}", tail.join("\n"))));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// For tests: a started etcd, or `None` (after printing "SKIPPED") when etcd is not
    /// installed and FTVM_ALLOW_NO_KVM=1. Panics otherwise, saying to run scripts/deps.sh.
    pub fn test_etcd_or_skip() -> Option<TestEtcd> {
        match start_test_etcd() {
            Ok(etcd) => Some(etcd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && etcd_binary().is_none() => {
                if std::env::var("FTVM_ALLOW_NO_KVM").as_deref() == Ok("1") {
                    eprintln!("SKIPPED: etcd is not installed and FTVM_ALLOW_NO_KVM=1");
                    return None;
                }
                panic!("{e} (set FTVM_ALLOW_NO_KVM=1 to skip the etcd tests)");
            }
            Err(e) => panic!("cannot start a test etcd: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::http::read_response;
    use super::*;

    fn parse(reply: &[u8]) -> (u16, Vec<u8>) {
        read_response(&mut &reply[..]).unwrap()
    }

    fn parse_err(reply: &[u8]) -> String {
        match read_response(&mut &reply[..]) {
            Err(http::ReadError::Bad(m)) => m,
            other => panic!("expected a bad reply, got {other:?}"),
        }
    }

    #[test]
    fn http_content_length() {
        let (status, body) =
            parse(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}trailing");
        assert_eq!(status, 200);
        assert_eq!(body, b"{\"a\":1}");
    }

    #[test]
    fn http_chunked_with_trailers() {
        let reply =
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nTrailer: Grpc-Trailer-Content-Type\r\n\r\n\
                      5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nGrpc-Trailer-Content-Type: application/grpc\r\n\r\n";
        let (status, body) = parse(reply);
        assert_eq!(status, 404);
        assert_eq!(body, b"hello, world");
        // The body may also end with a close right after the last chunk.
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n").1, b"abc");
    }

    #[test]
    fn http_until_close_and_interim() {
        let (status, body) = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\nServer: x\n\nall of it");
        assert_eq!(status, 200);
        assert_eq!(body, b"all of it");
    }

    #[test]
    fn http_bad_replies_are_errors() {
        assert!(parse_err(b"SSH-2.0-OpenSSH\r\n").contains("not an HTTP"));
        assert!(parse_err(b"HTTP/1.1 abc OK\r\n\r\n").contains("bad status"));
        assert!(parse_err(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").contains("Content-Length"));
        assert!(parse_err(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort").contains("closed"));
        assert!(parse_err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").contains("chunk size"));
        assert!(parse_err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n").contains("CRLF"));
        assert!(parse_err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffff\r\n").contains("too large"));
        assert!(parse_err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").contains("Transfer-Encoding"));
        assert!(parse_err(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n").contains("header"));
        assert!(parse_err(b"HTTP/1.1 200 OK\r\n").contains("closed"));
        assert!(parse_err(b"").contains("closed"));
    }

    #[test]
    fn base64_round_trip() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("ftvm/vm1", "ZnR2bS92bTE="),
        ] {
            assert_eq!(base64::encode(plain.as_bytes()), coded);
            assert_eq!(base64::decode(coded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64::decode(&base64::encode(&all)).unwrap(), all);
        assert!(base64::decode("Zm9v!").is_err());
        assert!(base64::decode("Z").is_err());
        assert!(base64::decode("Zg===").is_err());
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
