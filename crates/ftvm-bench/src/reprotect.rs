//! The `reprotect` suite: how long re-protection takes and what the guest and its clients see
//! of it. A protected kvstore pair (`ftvm primary` on host 1, `ftvm backup` on host 2 of a
//! 2-host topology) loses its backup (SIGKILL: the primary continues unprotected); a new
//! backup is started on host 2 and `ftvm ctl PRIMARY protect ADDR --json` brings the VM back
//! under protection by a live state transfer. Its report gives the time to protected
//! (`protected_after_ms`), the guest's pause at the cut (`snapshot.pause_ms`), the state
//! shipped and the pre-copy rounds; the new backup is then killed and the VM protected again,
//! `--runs` times per case. Cases: each `--mem` size, idle (no client) and under load (the
//! guest first filled with 1 KiB values, then redis-benchmark SETs running through the
//! protect, their throughput per 250 ms tick before and during it, and the longest gap of a
//! 10 ms PING loop on its own connection), and resync (the `kvstore-rdtsc` guest, whose every
//! PING makes the backup diverge: the primary resyncs it by a state transfer; its `protected`
//! event with reason `resync`, followed on GET /events, gives the time, the bytes and the pause). Side by side: the same VM's local
//! `ftvm ctl snapshot` pause, and the published figures of ../shared/anchors.md. Writes
//! reprotect.{json,svg}.
//!
//! The pair machinery here (starting sides, `ftvm ctl` status and protect, the PING loop,
//! redis-benchmark with timestamped progress) is shared with the `soak` suite.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftvm_api::{CopyRound, ProtectPhase, ProtectProgress, SnapshotPhase, SnapshotProgress};
use serde::Serialize;

use crate::common::{self, Common, Machine, Prepared, Ratio, Running, Series};
use crate::kvstore::{Topology, GUEST_IP, READY};
use crate::plot;
use crate::table::{self, Table};

// ---------------------------------------------------------------------------------------
// Shared with the soak suite: the pair's sides, `ftvm ctl`, clients.
// ---------------------------------------------------------------------------------------

/// What every side of the pair is started with, and where its files go.
pub(crate) struct PairEnv {
    pub ftvm: PathBuf,
    pub kernel: PathBuf,
    pub cmdline: String,
    /// `--mem`, as ftvm takes it (`256M`, `1G`).
    pub mem: String,
    pub work: PathBuf,
    pub arbiter: PathBuf,
    pub key: PathBuf,
    pub disk_mib: u64,
    /// `--timeout MS` for both sides (None: ftvm's default).
    pub timeout_ms: Option<u64>,
    next_id: std::cell::Cell<usize>,
}

/// One ftvm process of the pair.
pub(crate) struct Vm {
    pub id: usize,
    /// 1 or 2: the topology host (namespace P-hN, replication address 10.99.0.N).
    pub host: u32,
    /// How it was started: "primary" or "backup".
    pub verb: &'static str,
    /// A backup's listen address.
    pub listen: Option<String>,
    pub sock: PathBuf,
    pub proc: Running,
    /// Its events (GET /events on `sock`).
    pub events: common::Events,
}

impl Vm {
    pub fn label(&self) -> String {
        format!("{} #{} on h{}", self.verb, self.id, self.host)
    }
}

/// The replication address of host `n`.
pub(crate) fn rep_addr(host: u32, port: u16) -> String {
    format!("10.99.0.{host}:{port}")
}

impl PairEnv {
    /// Writes the pair's key (random, mode 600) and names the arbiter under `work`.
    pub fn new(
        ftvm: PathBuf,
        kernel: PathBuf,
        cmdline: String,
        mem: String,
        work: PathBuf,
        disk_mib: u64,
        timeout_ms: Option<u64>,
    ) -> Result<PairEnv> {
        let key = work.join("pair.key");
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .context("reading /dev/urandom for the pair's key")?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&key, format!("{hex}\n")).with_context(|| format!("writing {}", key.display()))?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        let arbiter = work.join("arbiter.lock");
        let _ = std::fs::remove_file(&arbiter);
        Ok(PairEnv {
            ftvm,
            kernel,
            cmdline,
            mem,
            work,
            arbiter,
            key,
            disk_mib,
            timeout_ms,
            next_id: std::cell::Cell::new(0),
        })
    }

    /// Host `n`'s disk image name (each host keeps its own; a new backup's is overwritten
    /// with the live VM's by the transfer).
    fn disk_name(host: u32) -> String {
        format!("disk-h{host}.img")
    }

    /// Host `n`'s disk image.
    pub fn disk(&self, host: u32) -> PathBuf {
        self.work.join(Self::disk_name(host))
    }

    /// A fresh blank disk for host `n`.
    pub fn blank_disk(&self, host: u32) -> Result<PathBuf> {
        common::fresh_disk(&self.work, &Self::disk_name(host), self.disk_mib)
    }

    fn command(&self, topo: &Topology, host: u32, verb: &str, peer: (&str, &str), sock: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topo.host_n(host)]).arg(&self.ftvm).arg(verb);
        cmd.args([peer.0, peer.1]);
        // Both "hosts" are namespaces of this machine: the lock file is on storage both see.
        cmd.arg("--arbiter").arg(&self.arbiter).arg("--shared-lock").arg("--key-file").arg(&self.key);
        cmd.arg("--api-socket").arg(sock);
        if let Some(t) = self.timeout_ms {
            cmd.args(["--timeout", &t.to_string()]);
        }
        cmd.args(["--log-level", "info", "--mem", &self.mem, "--net", "tap=tap0", "--rng", "--disk"]);
        cmd.arg(self.disk(host));
        cmd.arg("--kernel").arg(&self.kernel).arg("--cmdline").arg(&self.cmdline);
        cmd
    }

    /// Removes the API sockets the sides left behind (a SIGKILLed ftvm cannot).
    pub fn remove_sockets(&self) {
        let Ok(dir) = std::fs::read_dir(&self.work) else { return };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("vm") && name.ends_with(".sock") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    fn next_id(&self) -> usize {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// `ftvm backup --listen 10.99.0.HOST:PORT` on host `host`, once it listens.
    pub fn start_backup(&self, topo: &Topology, host: u32, port: u16) -> Result<Vm> {
        let id = self.next_id();
        let listen = rep_addr(host, port);
        let sock = self.work.join(format!("vm{id}-h{host}.sock"));
        let _ = std::fs::remove_file(&sock);
        let label = format!("backup #{id} on h{host}");
        let mut proc = Running::spawn(&label, &mut self.command(topo, host, "backup", ("--listen", &listen), &sock))?;
        proc.wait_for_stderr("backup listening", Duration::from_secs(30))?;
        let events = common::Events::follow(&sock);
        Ok(Vm { id, host, verb: "backup", listen: Some(listen), sock, proc, events })
    }

    /// `ftvm primary --backup ADDR` on host `host`, once the guest is up (`kvstore: listening`).
    pub fn start_primary(&self, topo: &Topology, host: u32, backup: &str) -> Result<Vm> {
        let id = self.next_id();
        let sock = self.work.join(format!("vm{id}-h{host}.sock"));
        let _ = std::fs::remove_file(&sock);
        let label = format!("primary #{id} on h{host}");
        let mut proc = Running::spawn(&label, &mut self.command(topo, host, "primary", ("--backup", backup), &sock))?;
        proc.wait_for_output(READY, Duration::from_secs(120))?;
        let events = common::Events::follow(&sock);
        Ok(Vm { id, host, verb: "primary", listen: None, sock, proc, events })
    }
}

/// `pair.protected` of a side's status (false when it does not answer).
pub(crate) fn is_protected(ftvm: &Path, sock: &Path) -> bool {
    common::ctl_status(ftvm, sock).is_ok_and(|s| s.pair.is_some_and(|p| p.protected))
}

/// The outcome of `ftvm ctl SOCKET protect ADDR --json`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Protect {
    pub backup: String,
    /// Exit status 0 and phase "protected".
    pub ok: bool,
    pub exit_code: Option<i32>,
    pub phase: String,
    /// The bench's wall time of the ctl command (it polls every 20 ms).
    pub wall_ms: f64,
    /// From the request to the backup having caught up.
    pub protected_after_ms: Option<f64>,
    pub elapsed_ms: f64,
    /// The guest's pause at the cut.
    pub pause_ms: Option<f64>,
    pub shipped_bytes: u64,
    /// The live copy of the state, its pre-copy rounds (the last: the paused one).
    pub rounds: Vec<CopyRound>,
    pub snapshot_elapsed_ms: Option<f64>,
    pub error: Option<String>,
}

impl Protect {
    fn failed(backup: &str, wall_ms: f64, error: String) -> Protect {
        Protect {
            backup: backup.into(),
            ok: false,
            exit_code: None,
            phase: "failed".into(),
            wall_ms,
            protected_after_ms: None,
            elapsed_ms: f64::NAN,
            pause_ms: None,
            shipped_bytes: 0,
            rounds: Vec::new(),
            snapshot_elapsed_ms: None,
            error: Some(error),
        }
    }

    /// Time to protected (the ctl report's `protected_after_ms`, else its `elapsed_ms`).
    pub fn time_ms(&self) -> f64 {
        self.protected_after_ms.unwrap_or(self.elapsed_ms)
    }

    /// Pages: round 0 / re-sent in later live rounds / in the paused round.
    pub fn pages(&self) -> (u64, u64, u64) {
        let n = self.rounds.len();
        let first = self.rounds.first().map_or(0, |r| r.pages);
        let last = if n > 1 { self.rounds[n - 1].pages } else { 0 };
        let mid = if n > 2 { self.rounds[1..n - 1].iter().map(|r| r.pages).sum() } else { 0 };
        (first, mid, last)
    }

    pub fn describe(&self) -> String {
        if self.ok {
            let (a, b, c) = self.pages();
            format!(
                "protected after {:.0} ms, guest paused {:.2} ms, {:.1} MiB shipped, {} rounds (pages {a}/{b}/{c})",
                self.time_ms(),
                self.pause_ms.unwrap_or(f64::NAN),
                self.shipped_bytes as f64 / 1048576.0,
                self.rounds.len()
            )
        } else {
            format!(
                "FAILED (phase {}, exit {:?}): {}",
                self.phase,
                self.exit_code,
                self.error.as_deref().unwrap_or("no error given")
            )
        }
    }
}

/// `ftvm ctl LIVE_SOCKET protect ADDR --json`. A failed re-protection is an `ok: false`
/// outcome, not an error (only an interrupt is).
pub(crate) fn protect(ftvm: &Path, sock: &Path, backup: &str) -> Result<Protect> {
    let mut cmd = Command::new(ftvm);
    cmd.arg("ctl").arg(sock).args(["protect", backup, "--json"]);
    let t0 = Instant::now();
    let f = match common::run("ftvm ctl protect", &mut cmd, Duration::from_secs(300)) {
        Ok(f) => f,
        Err(e) => {
            common::check_interrupted()?;
            return Ok(Protect::failed(backup, t0.elapsed().as_secs_f64() * 1e3, format!("{e:#}")));
        }
    };
    let wall_ms = f.wall_s() * 1e3;
    let p: ProtectProgress = match serde_json::from_str(f.stdout.trim()) {
        Ok(p) => p,
        Err(_) => {
            return Ok(Protect {
                exit_code: f.status.code(),
                ..Protect::failed(
                    backup,
                    wall_ms,
                    format!("no progress JSON ({}): {} {}", f.status, f.stdout.trim(), f.stderr.trim()),
                )
            })
        }
    };
    let mut error = p.error.clone();
    if error.is_none() && !f.status.success() {
        error = Some(f.stderr.trim().to_string());
    }
    Ok(Protect {
        backup: backup.into(),
        ok: f.status.success() && p.phase == ProtectPhase::Protected,
        exit_code: f.status.code(),
        // The phase as the JSON names it ("protected", "catching-up", ...).
        phase: serde_json::to_value(p.phase).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
        wall_ms,
        protected_after_ms: p.protected_after_ms,
        elapsed_ms: p.elapsed_ms,
        pause_ms: p.pause_ms(),
        shipped_bytes: p.shipped_bytes,
        rounds: p.snapshot.as_ref().map_or_else(Vec::new, |s| s.rounds.clone()),
        snapshot_elapsed_ms: p.snapshot.as_ref().map(|s| s.elapsed_ms),
        error,
    })
}

/// Waits until the guest answers PING from the client namespace. The client's neighbour
/// cache is flushed first: after a failover the LAN bridge still sends the guest's MAC to
/// host 2 until the guest on host 1 transmits, which a broadcast ARP makes it do (without
/// this, the first PING after a failover session waited about 70 s).
pub(crate) fn wait_ping(topo: &Topology, timeout: Duration) -> Result<()> {
    let _ = Command::new("ip").args(["-n", &topo.client(), "neigh", "flush", "all"]).output();
    let deadline = Instant::now() + timeout;
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &topo.client(), "timeout", "2", "redis-cli", "-h", GUEST_IP, "-p", "6379"])
            .arg("PING")
            .output()?;
        if String::from_utf8_lossy(&out.stdout).contains("PONG") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the guest did not answer PING within {} s", timeout.as_secs());
        }
        common::sleep(Duration::from_millis(200))?;
    }
}

/// Waits until `f` holds (polled every `every`), or `timeout`; returns when it held.
pub(crate) fn wait_until(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<Option<Instant>> {
    let deadline = Instant::now() + timeout;
    loop {
        common::check_interrupted()?;
        if f()? {
            return Ok(Some(Instant::now()));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(every);
    }
}

fn guest_addr() -> SocketAddr {
    let ip: Ipv4Addr = GUEST_IP.parse().expect("GUEST_IP is an IPv4 address");
    SocketAddr::from((ip, 6379))
}

/// One PING on a new connection from the client namespace; returns the time to `+PONG`.
pub(crate) fn ping_once(topo: &Topology, timeout: Duration) -> Result<Duration> {
    let ns = topo.client();
    std::thread::spawn(move || -> Result<Duration> {
        common::enter_netns(&ns)?;
        let mut s = TcpStream::connect_timeout(&guest_addr(), timeout).context("connecting to the guest")?;
        s.set_read_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        let t0 = Instant::now();
        s.write_all(b"PING\r\n")?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 64];
        while !buf.ends_with(b"\r\n") {
            let n = s.read(&mut chunk).context("reading the PING reply")?;
            if n == 0 {
                bail!("the guest closed the connection");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        if !buf.starts_with(b"+PONG") {
            bail!("PING answered {:?}", String::from_utf8_lossy(&buf));
        }
        Ok(t0.elapsed())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the PING thread panicked"))?
}

/// A PING every `interval` on ONE connection from the client namespace, in a thread of its
/// own: the times of the replies give the longest time the guest did not answer. A broken
/// connection is recorded (the pair must never reset a client's connection) and replaced.
pub(crate) struct Pinger {
    stop: Arc<AtomicBool>,
    replies: Arc<Mutex<Vec<Instant>>>,
    errors: Arc<Mutex<Vec<(Instant, String)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Pinger {
    pub fn start(topo: &Topology, interval: Duration) -> Result<Pinger> {
        Self::start_with(topo, interval, b"PING\r\n", b"+PONG")
    }

    /// The same loop with another inline command and the start of its expected reply.
    pub fn start_with(
        topo: &Topology,
        interval: Duration,
        command: &'static [u8],
        reply: &'static [u8],
    ) -> Result<Pinger> {
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let (s, r, e, ns) = (stop.clone(), replies.clone(), errors.clone(), topo.client());
        let thread = std::thread::spawn(move || {
            let first = common::enter_netns(&ns).and_then(|()| {
                TcpStream::connect_timeout(&guest_addr(), Duration::from_secs(5)).context("connecting to the guest")
            });
            let stream = match first {
                Ok(stream) => {
                    let _ = tx.send(Ok(()));
                    stream
                }
                Err(err) => {
                    let _ = tx.send(Err(err));
                    return;
                }
            };
            ping_loop(stream, interval, (command, reply), &s, &r, &e);
        });
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e.context("starting the PING loop"));
            }
            Err(_) => bail!("the PING thread ended at once"),
        }
        Ok(Pinger { stop, replies, errors, thread: Some(thread) })
    }

    /// The longest time between two consecutive replies, over the replies around
    /// [`from`, `to`] (the pair that straddles `from`, every pair inside, the one that
    /// straddles `to`), in ms; NaN when there are none. A gap that began before `from`
    /// counts whole: for the outage of an event at `from`.
    pub fn max_gap_ms(&self, from: Instant, to: Instant) -> f64 {
        self.gap(from, to, false)
    }

    /// The same, counting only the part of each gap inside [`from`, `to`]: what a window
    /// (a protect) itself added, not an outage that began before it.
    pub fn max_gap_within_ms(&self, from: Instant, to: Instant) -> f64 {
        self.gap(from, to, true)
    }

    fn gap(&self, from: Instant, to: Instant, clamp: bool) -> f64 {
        let r = self.replies.lock().unwrap();
        let now = Instant::now();
        let mut gap = f64::NAN;
        let mut consider = |a: Instant, b: Instant| {
            let (a, b) = if clamp { (a.max(from), b.min(to)) } else { (a, b) };
            let g = b.saturating_duration_since(a).as_secs_f64() * 1e3;
            if gap.is_nan() || g > gap {
                gap = g;
            }
        };
        for w in r.windows(2) {
            if w[1] >= from && w[0] <= to {
                consider(w[0], w[1]);
            }
        }
        // Still no reply since before `to`: the gap so far counts too.
        if let Some(&last) = r.last() {
            if last <= to {
                consider(last, now);
            }
        }
        gap
    }

    pub fn replies(&self) -> usize {
        self.replies.lock().unwrap().len()
    }

    pub fn errors(&self) -> Vec<(Instant, String)> {
        self.errors.lock().unwrap().clone()
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ping_loop(
    mut stream: TcpStream,
    interval: Duration,
    (command, reply): (&[u8], &[u8]),
    stop: &AtomicBool,
    replies: &Mutex<Vec<Instant>>,
    errors: &Mutex<Vec<(Instant, String)>>,
) {
    let stopped = || stop.load(Ordering::SeqCst) || common::check_interrupted().is_err();
    let setup = |s: &TcpStream| {
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    };
    setup(&stream);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    'outer: while !stopped() {
        let result: std::io::Result<()> = (|| {
            stream.write_all(command)?;
            buf.clear();
            loop {
                match stream.read(&mut chunk) {
                    Ok(0) => return Err(std::io::Error::other("the guest closed the connection")),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        if stopped() {
                            return Ok(());
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                if buf.ends_with(b"\r\n") {
                    break;
                }
            }
            if !buf.starts_with(reply) {
                return Err(std::io::Error::other(format!(
                    "{:?} answered {:?}",
                    String::from_utf8_lossy(command).trim(),
                    String::from_utf8_lossy(&buf)
                )));
            }
            replies.lock().unwrap().push(Instant::now());
            Ok(())
        })();
        if let Err(e) = result {
            errors.lock().unwrap().push((
                Instant::now(),
                format!("the {} connection failed: {e}", String::from_utf8_lossy(command).trim()),
            ));
            // A new connection, to go on measuring.
            loop {
                if stopped() {
                    break 'outer;
                }
                if let Ok(s) = TcpStream::connect_timeout(&guest_addr(), Duration::from_secs(1)) {
                    setup(&s);
                    stream = s;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        std::thread::sleep(interval);
    }
}

/// redis-benchmark from the client namespace, with its output timestamped as it comes (the
/// progress line, `SET: rps=... (overall: ...)`, every 250 ms). Killed when dropped.
pub(crate) struct RedisBench {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    readers: Vec<JoinHandle<()>>,
    pub started: Instant,
    status: Option<ExitStatus>,
}

impl RedisBench {
    /// `ip netns exec CLIENT_NS redis-benchmark -h GUEST -p 6379 ARGS...`.
    pub fn spawn(redis_benchmark: &Path, client_ns: &str, args: &[&str]) -> Result<RedisBench> {
        common::check_interrupted()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", client_ns]).arg(redis_benchmark);
        cmd.args(["-h", GUEST_IP, "-p", "6379"]).args(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("cannot start redis-benchmark: {cmd:?}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().context("no stdout")?);
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().context("no stderr")?);
        for mut pipe in [out, err] {
            let l = lines.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut carry = Vec::new();
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    let now = Instant::now();
                    for &b in &buf[..n] {
                        if b == b'\r' || b == b'\n' {
                            let s = String::from_utf8_lossy(&carry).trim().to_string();
                            if !s.is_empty() {
                                l.lock().unwrap().push((now, s));
                            }
                            carry.clear();
                        } else {
                            carry.push(b);
                        }
                    }
                }
                let s = String::from_utf8_lossy(&carry).trim().to_string();
                if !s.is_empty() {
                    l.lock().unwrap().push((Instant::now(), s));
                }
            }));
        }
        Ok(RedisBench { child, lines, readers, started, status: None })
    }

    /// Its exit status once it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
            if self.status.is_some() {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
            }
        }
        Ok(self.status)
    }

    /// The instantaneous throughput of each progress tick (requests/s over the last ~250 ms).
    pub fn ticks(&self) -> Vec<(Instant, f64)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(t, l)| {
                let rest = l.split_once(": rps=")?.1;
                let v: f64 = rest.split_whitespace().next()?.parse().ok()?;
                Some((*t, v))
            })
            .collect()
    }

    /// Everything but the progress lines (results and errors).
    pub fn summary(&self) -> Vec<String> {
        self.lines.lock().unwrap().iter().filter(|(_, l)| !l.contains(": rps=")).map(|(_, l)| l.clone()).collect()
    }
}

impl Drop for RedisBench {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

pub(crate) fn mem_label(mib: u64) -> String {
    if mib >= 1024 && mib % 1024 == 0 {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// The largest value of a series (NaN when empty).
pub(crate) fn max_of(s: &Series) -> f64 {
    s.samples.iter().copied().filter(|v| !v.is_nan()).fold(f64::NAN, f64::max)
}

// ---------------------------------------------------------------------------------------
// The reprotect suite.
// ---------------------------------------------------------------------------------------

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Guest memory sizes, on all sides (256M, 1G), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G")]
    mem: Vec<String>,
    /// Cases, comma-separated: idle (no client), load (redis-benchmark SETs through the
    /// protect, after filling the guest), resync (the kvstore-rdtsc guest, one PING a run).
    #[arg(long, value_delimiter = ',', default_value = "idle,load,resync")]
    scenarios: Vec<Scenario>,
    /// redis-benchmark clients of the fill and of the load.
    #[arg(long, default_value_t = 20)]
    clients: u32,
    /// SETs of 1 KiB values (random keys out of --keyspace) written before the load case, so
    /// that the guest has data to copy.
    #[arg(long, default_value_t = 50_000)]
    fill_requests: u64,
    /// Value size of the fill, bytes.
    #[arg(long, default_value_t = 1024)]
    fill_size: u64,
    /// Random keys of the fill and the load (redis-benchmark -r).
    #[arg(long, default_value_t = 100_000)]
    keyspace: u64,
    /// Seconds the load runs before the protect starts (its throughput then is the "before").
    #[arg(long, default_value_t = 2.0)]
    settle_s: f64,
    /// Seconds the load goes on after the VM is protected again.
    #[arg(long, default_value_t = 1.0)]
    after_s: f64,
    /// Size of each host's sparse raw disk, MiB: large enough for the fill and the load (the
    /// guest's log grows with every SET and refuses writes once the disk is full), but the
    /// time to protected grows with it (the whole image goes through the transfer).
    #[arg(long, default_value_t = 128)]
    disk_mib: u64,
    /// `--timeout MS` for both sides of the pair (default: ftvm's).
    #[arg(long)]
    timeout: Option<u64>,
    /// Resync case: leave the guest idle after the diverging PING. By default SETs on one
    /// connection, 1 ms apart (SETs do not read the TSC), drive the guest's exits to the sync
    /// points where the backup finds the divergence (every 4096 exits; idle, ~20 s apart).
    #[arg(long)]
    resync_idle: bool,
    /// Skip the local `ftvm ctl snapshot` of each VM (the pause it is compared with).
    #[arg(long)]
    no_snapshot: bool,
    #[command(flatten)]
    net: common::NetArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    Idle,
    Load,
    Resync,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Load => "load",
            Scenario::Resync => "resync",
        }
    }
}

/// The load's throughput around one protect.
#[derive(Debug, Clone, Serialize)]
struct LoadWindow {
    /// Median of the 250 ms ticks in the `--settle-s` before the protect (the first dropped).
    rps_before: f64,
    /// Mean of the ticks that end during the protect (or within 250 ms after it).
    rps_during: f64,
    /// The lowest of those ticks.
    rps_during_min: f64,
    ticks_during: usize,
    /// Median of the ticks after it.
    rps_after: f64,
    /// The longest time the 10 ms PING loop went unanswered during the protect.
    ping_gap_ms: f64,
    /// The same over the `--settle-s` before it (the loop's own baseline under load).
    ping_gap_before_ms: f64,
    /// redis-benchmark's own lines (results, errors).
    redis_benchmark: Vec<String>,
}

/// One resync of the backup (the resync case).
#[derive(Debug, Clone, Serialize)]
struct Resync {
    /// The primary's `protected` event of the resync: `after_ms` (from the divergence report
    /// to caught up).
    ms: f64,
    pause_ms: Option<f64>,
    shipped_bytes: Option<u64>,
    /// The PING that caused it: time to its reply.
    ping_reply_ms: f64,
    /// The PING sent to the resync reported (mostly the wait for the sync point that found
    /// the divergence).
    ping_to_protected_ms: f64,
    /// The backup's report: the divergence was found at this exit (counted from the last
    /// state transfer; sync points come every 4096 exits).
    detected_at_exit: Option<u64>,
    line: String,
}

#[derive(Debug, Clone, Serialize)]
struct Run {
    index: usize,
    backup: String,
    /// From starting `ftvm backup` to "backup listening".
    backup_start_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    protect: Option<Protect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    load: Option<LoadWindow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resync: Option<Resync>,
    /// The live VM's status said protected afterwards.
    protected_verified: bool,
    /// After the new backup was killed, the VM said it was unprotected (ms after the kill).
    #[serde(skip_serializing_if = "Option::is_none")]
    unprotected_after_ms: Option<f64>,
}

/// The same VM's local `ftvm ctl snapshot`, for its pause.
#[derive(Debug, Clone, Serialize)]
struct LocalSnapshot {
    ok: bool,
    pause_ms: Option<f64>,
    elapsed_ms: Option<f64>,
    pages: Vec<u64>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Case {
    mem: String,
    mem_mib: u64,
    scenario: Scenario,
    guest: String,
    boot_to_ready_s: f64,
    /// The fill (load case): redis-benchmark's result line.
    #[serde(skip_serializing_if = "Option::is_none")]
    fill: Option<String>,
    runs: Vec<Run>,
    #[serde(skip_serializing_if = "Option::is_none")]
    local_snapshot: Option<LocalSnapshot>,
    /// Time to protected (resync: the resync's time), ms.
    protect_ms: Series,
    pause_ms: Series,
    shipped_mib: Series,
    precopy_rounds: Series,
    ctl_wall_ms: Series,
    /// The live copy of the state (its pre-copy rounds and the paused cut), ms.
    copy_ms: Series,
    rps_before: Series,
    rps_during: Series,
    rps_during_min: Series,
    rps_after: Series,
    ping_gap_ms: Series,
    failures: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Anchor {
    system: &'static str,
    published: &'static str,
    ftvm: String,
}

#[derive(Debug, Serialize)]
struct Report {
    suite: &'static str,
    machine: Machine,
    runs: usize,
    redis_benchmark: String,
    disk_mib: u64,
    clients: u32,
    keyspace: u64,
    resync_idle: bool,
    cases: Vec<Case>,
    ratios: Vec<Ratio>,
    anchors: Vec<Anchor>,
    failures: usize,
}

struct Ctx<'a> {
    args: &'a Args,
    redis_benchmark: PathBuf,
    ftvm: PathBuf,
    images: std::collections::BTreeMap<String, PathBuf>,
    work: PathBuf,
    runs: usize,
}

pub fn run(common: &Common, args: &Args) -> Result<()> {
    let redis_benchmark = common::kvstore_network_suite(common, "reprotect", &args.net)?;
    common::which(Path::new("redis-cli"), "install Debian's redis-tools (apt-get install redis-tools)")?;
    let mems: Vec<u64> =
        args.mem.iter().map(|m| ftvm_api::parse_mem_mib(m).map_err(anyhow::Error::msg)).collect::<Result<_>>()?;
    let mut guests = vec!["kvstore"];
    if args.scenarios.contains(&Scenario::Resync) {
        guests.push("kvstore-rdtsc");
    }
    let Prepared { common, machine, images, work } = common.prepare("reprotect", &guests, false)?;
    let common = &common;
    let ctx = Ctx {
        args,
        redis_benchmark,
        ftvm: std::fs::canonicalize(&common.ftvm)?,
        images,
        work,
        runs: common.runs_or(3),
    };
    let rb_version = common::version_of(&ctx.redis_benchmark)?;

    let topo = Topology::up(&args.net.topology, 2)?;
    let mut cases = Vec::new();
    let mut port = 7000u16;
    for (&mib, mem) in mems.iter().zip(&args.mem) {
        for &scenario in &args.scenarios {
            eprintln!("== {} {} ({} runs)", mem_label(mib), scenario.label(), ctx.runs);
            cases.push(case(&ctx, &topo, mem, mib, scenario, &mut port)?);
        }
    }
    drop(topo);

    let ratios = ratios(&cases);
    let anchors = anchors(&cases);
    let failures = cases.iter().map(|c| c.failures.len()).sum();
    let report = Report {
        suite: "reprotect",
        machine,
        runs: ctx.runs,
        redis_benchmark: rb_version,
        disk_mib: args.disk_mib,
        clients: args.clients,
        keyspace: args.keyspace,
        resync_idle: args.resync_idle,
        cases,
        ratios,
        anchors,
        failures,
    };
    let labels: Vec<String> = report
        .cases
        .iter()
        .map(|c| format!("{} {}: {} s", mem_label(c.mem_mib), c.scenario.label(), "protect"))
        .collect();
    let bars: Vec<plot::Bar> = report
        .cases
        .iter()
        .zip(&labels)
        .map(|(c, l)| plot::Bar { label: l, value: c.protect_ms.median / 1e3, goal: None })
        .collect();
    let svg = plot::bars("ftvm re-protection: time to protected again, seconds (median; resync: the resync)", &bars);
    let json = common::publish(&common.out, "reprotect", &report, &svg, print_table)?;
    if report.failures > 0 {
        bail!("{} failure(s) (see above and {})", report.failures, json.display());
    }
    Ok(())
}

fn new_case(mem: &str, mib: u64, scenario: Scenario, guest: &str) -> Case {
    Case {
        mem: mem.into(),
        mem_mib: mib,
        scenario,
        guest: guest.into(),
        boot_to_ready_s: 0.0,
        fill: None,
        runs: Vec::new(),
        local_snapshot: None,
        protect_ms: Series::default(),
        pause_ms: Series::default(),
        shipped_mib: Series::default(),
        precopy_rounds: Series::default(),
        ctl_wall_ms: Series::default(),
        copy_ms: Series::default(),
        rps_before: Series::default(),
        rps_during: Series::default(),
        rps_during_min: Series::default(),
        rps_after: Series::default(),
        ping_gap_ms: Series::default(),
        failures: Vec::new(),
    }
}

fn case(ctx: &Ctx, topo: &Topology, mem: &str, mib: u64, scenario: Scenario, port: &mut u16) -> Result<Case> {
    let resync = scenario == Scenario::Resync;
    let guest = if resync { "kvstore-rdtsc" } else { "kvstore" };
    let cmdline = if resync { format!("ip={GUEST_IP}/24 kvstore.rdtsc=1") } else { format!("ip={GUEST_IP}/24") };
    let dir = ctx.work.join(format!("{}-{}", mem.to_lowercase(), scenario.label()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let env = PairEnv::new(
        ctx.ftvm.clone(),
        ctx.images[guest].clone(),
        cmdline,
        mem.to_string(),
        dir.clone(),
        ctx.args.disk_mib,
        ctx.args.timeout,
    )?;
    let mut c = new_case(mem, mib, scenario, guest);
    env.blank_disk(1)?;
    env.blank_disk(2)?;
    let t0 = Instant::now();
    *port += 1;
    // Declared before the primary, so that on an error the primary is killed first.
    let first_backup = env.start_backup(topo, 2, *port)?;
    let mut primary = env.start_primary(topo, 1, first_backup.listen.as_deref().unwrap_or_default())?;
    wait_ping(topo, Duration::from_secs(30))?;
    c.boot_to_ready_s = t0.elapsed().as_secs_f64();
    eprintln!("  pair up in {:.1} s", c.boot_to_ready_s);

    if resync {
        resync_runs(ctx, topo, &env, &primary, &first_backup, &mut c)?;
        let label = first_backup.label();
        if let Ok(f) = first_backup.proc.terminate(Duration::from_secs(10)) {
            save_log(&dir, &label, &f.stderr);
        }
    } else {
        if scenario == Scenario::Load {
            let f = fill(ctx, topo)?;
            eprintln!("  fill: {f}");
            c.fill = Some(f);
        }
        kill_backup(&env, &primary, first_backup, &mut c, "the first backup")?;
        for i in 0..ctx.runs {
            *port += 1;
            let run = protect_run(ctx, topo, &env, &primary, scenario, i, *port, &mut c)?;
            c.runs.push(run);
        }
        if !ctx.args.no_snapshot {
            c.local_snapshot = Some(local_snapshot(ctx, topo, &env, &primary, scenario, &dir)?);
        }
    }
    if primary.proc.has_exited()? {
        c.failures.push(format!("{} exited during the case: {}", primary.label(), primary.proc.stderr_text()));
    }
    let label = primary.label();
    if let Ok(f) = primary.proc.terminate(Duration::from_secs(10)) {
        save_log(&dir, &label, &f.stderr);
    }
    for run in &c.runs {
        if let Some(p) = &run.protect {
            c.protect_ms.push(p.time_ms());
            c.pause_ms.push(p.pause_ms.unwrap_or(f64::NAN));
            c.shipped_mib.push(p.shipped_bytes as f64 / 1048576.0);
            c.precopy_rounds.push(p.rounds.len() as f64);
            c.ctl_wall_ms.push(p.wall_ms);
            c.copy_ms.push(p.snapshot_elapsed_ms.unwrap_or(f64::NAN));
        }
        if let Some(r) = &run.resync {
            c.protect_ms.push(r.ms);
            c.pause_ms.push(r.pause_ms.unwrap_or(f64::NAN));
            c.shipped_mib.push(r.shipped_bytes.map_or(f64::NAN, |b| b as f64 / 1048576.0));
        }
        if let Some(l) = &run.load {
            c.rps_before.push(l.rps_before);
            c.rps_during.push(l.rps_during);
            c.rps_during_min.push(l.rps_during_min);
            c.rps_after.push(l.rps_after);
            c.ping_gap_ms.push(l.ping_gap_ms);
        }
    }
    env.remove_sockets();
    if c.failures.is_empty() {
        let _ = std::fs::remove_file(env.disk(1));
        let _ = std::fs::remove_file(env.disk(2));
    }
    Ok(c)
}

/// Keeps a process's standard error beside the case's files.
fn save_log(dir: &Path, label: &str, stderr: &str) {
    let _ = std::fs::write(dir.join(format!("{}.stderr.txt", label.replace([' ', '#'], "_"))), stderr);
}

/// The fill: SETs of `--fill-size` bytes with random keys, so the guest has data to copy.
fn fill(ctx: &Ctx, topo: &Topology) -> Result<String> {
    let a = ctx.args;
    let (c, d, r, n) =
        (a.clients.to_string(), a.fill_size.to_string(), a.keyspace.to_string(), a.fill_requests.to_string());
    let mut rb = RedisBench::spawn(
        &ctx.redis_benchmark,
        &topo.client(),
        &["-t", "set", "-c", &c, "-d", &d, "-r", &r, "-n", &n, "-q"],
    )?;
    let deadline = Instant::now() + Duration::from_secs(120 + a.fill_requests / 500);
    let status = loop {
        if let Some(s) = rb.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            bail!("the fill's redis-benchmark ran past {} s", (deadline - rb.started).as_secs());
        }
        common::sleep(Duration::from_millis(50))?;
    };
    let summary = rb.summary().join("; ");
    if !status.success() || summary.contains("rror") {
        bail!("the fill's redis-benchmark failed ({status}): {summary}");
    }
    Ok(summary)
}

/// SIGKILLs a backup and waits until the primary says it is unprotected; returns the time.
fn kill_backup(env: &PairEnv, primary: &Vm, backup: Vm, c: &mut Case, what: &str) -> Result<Option<f64>> {
    let t = Instant::now();
    let label = backup.label();
    let f = backup.proc.kill()?;
    save_log(&env.work, &label, &f.stderr);
    let seen =
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || Ok(!is_protected(&env.ftvm, &primary.sock)))?;
    match seen {
        Some(at) => Ok(Some((at - t).as_secs_f64() * 1e3)),
        None => {
            c.failures.push(format!("after SIGKILL of {what}, the primary still says it is protected"));
            Ok(None)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn protect_run(
    ctx: &Ctx,
    topo: &Topology,
    env: &PairEnv,
    primary: &Vm,
    scenario: Scenario,
    index: usize,
    port: u16,
    c: &mut Case,
) -> Result<Run> {
    let t0 = Instant::now();
    let backup = env.start_backup(topo, 2, port)?;
    let backup_start_ms = t0.elapsed().as_secs_f64() * 1e3;
    let addr = backup.listen.clone().unwrap_or_default();
    let mut run = Run {
        index,
        backup: addr.clone(),
        backup_start_ms,
        protect: None,
        load: None,
        resync: None,
        protected_verified: false,
        unprotected_after_ms: None,
    };
    let load = if scenario == Scenario::Load {
        let pinger = Pinger::start(topo, Duration::from_millis(10))?;
        let a = ctx.args;
        let (cl, r) = (a.clients.to_string(), a.keyspace.to_string());
        let rb = RedisBench::spawn(
            &ctx.redis_benchmark,
            &topo.client(),
            &["-t", "set", "-c", &cl, "-r", &r, "-n", "100000000", "-q"],
        )?;
        common::sleep(Duration::from_secs_f64(a.settle_s))?;
        Some((pinger, rb))
    } else {
        None
    };
    let p0 = Instant::now();
    let p = protect(&env.ftvm, &primary.sock, &addr)?;
    let p1 = Instant::now();
    eprintln!("  run {}: {}", index + 1, p.describe());
    if !p.ok {
        c.failures.push(format!("run {}: re-protection by {addr} {}", index + 1, p.describe()));
    }
    if let Some((pinger, mut rb)) = load {
        common::sleep(Duration::from_secs_f64(ctx.args.after_s))?;
        let ended_early = rb.try_wait()?.is_some();
        let ticks = rb.ticks();
        let before: Vec<f64> = ticks
            .iter()
            .filter(|(t, _)| *t < p0 && *t > rb.started + Duration::from_millis(300))
            .map(|&(_, v)| v)
            .collect();
        let tick = Duration::from_millis(250);
        let during: Vec<f64> = ticks.iter().filter(|(t, _)| *t > p0 && *t <= p1 + tick).map(|&(_, v)| v).collect();
        let after: Vec<f64> = ticks.iter().filter(|(t, _)| *t > p1 + tick).map(|&(_, v)| v).collect();
        let mean = |v: &[f64]| if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 };
        let w = LoadWindow {
            rps_before: common::median(&before),
            rps_during: mean(&during),
            rps_during_min: during.iter().copied().fold(f64::NAN, f64::min),
            ticks_during: during.len(),
            rps_after: common::median(&after),
            ping_gap_ms: pinger.max_gap_within_ms(p0, p1),
            ping_gap_before_ms: pinger.max_gap_within_ms(rb.started + Duration::from_millis(300), p0),
            redis_benchmark: rb.summary(),
        };
        eprintln!(
            "    load: {:.0} SET/s before, {:.0} during (lowest tick {:.0}), {:.0} after; longest PING gap {:.1} ms during, {:.1} ms before",
            w.rps_before, w.rps_during, w.rps_during_min, w.rps_after, w.ping_gap_ms, w.ping_gap_before_ms
        );
        if ended_early {
            c.failures.push(format!(
                "run {}: the load's redis-benchmark ended early: {:?}",
                index + 1,
                w.redis_benchmark
            ));
        }
        if w.redis_benchmark.iter().any(|l| l.contains("rror")) {
            c.failures.push(format!("run {}: redis-benchmark: {:?}", index + 1, w.redis_benchmark));
        }
        for (_, e) in pinger.errors() {
            c.failures.push(format!("run {}: {e}", index + 1));
        }
        run.load = Some(w);
        drop(rb);
        drop(pinger);
    }
    run.protected_verified = p.ok && is_protected(&env.ftvm, &primary.sock);
    if p.ok && !run.protected_verified {
        c.failures.push(format!("run {}: protect said protected, the status does not", index + 1));
    }
    run.protect = Some(p);
    run.unprotected_after_ms = kill_backup(env, primary, backup, c, &format!("the backup at {addr}"))?;
    Ok(run)
}

/// The resync case: each run, one PING makes the backup diverge; the primary resyncs it.
fn resync_runs(ctx: &Ctx, topo: &Topology, env: &PairEnv, primary: &Vm, backup: &Vm, c: &mut Case) -> Result<()> {
    let resynced = |e: &common::SideEvent| e.str("reason") == Some("resync");
    let resyncs = || primary.events.of("protected", resynced).len();
    // wait_ping's PING already made the backup diverge: wait for that resync first.
    let settled = wait_until(Duration::from_secs(60), Duration::from_millis(50), || Ok(resyncs() >= 1))?;
    if settled.is_none() {
        c.failures.push("the first PING did not lead to a resync within 60 s".into());
        return Ok(());
    }
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || Ok(is_protected(&env.ftvm, &primary.sock)))?;
    common::sleep(Duration::from_millis(500))?;
    let limit = Duration::from_secs(if ctx.args.resync_idle { 300 } else { 120 });
    for i in 0..ctx.runs {
        let n0 = resyncs();
        let t0_wall = std::time::SystemTime::now();
        let reply = ping_once(topo, Duration::from_secs(10));
        let ping_reply_ms = reply.as_ref().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        if let Err(e) = &reply {
            c.failures.push(format!("run {}: the PING failed: {e:#}", i + 1));
        }
        let nudge = if ctx.args.resync_idle {
            None
        } else {
            Some(Pinger::start_with(topo, Duration::from_millis(1), b"SET resync:nudge 1\r\n", b"+OK")?)
        };
        let seen = primary.events.wait_for("protected", n0, limit, resynced, || Ok(false))?;
        if let Some(n) = nudge {
            for (_, e) in n.errors() {
                c.failures.push(format!("run {}: {e}", i + 1));
            }
        }
        let Some(protected) = seen else {
            c.failures.push(format!("run {}: no resync within {} s of the PING", i + 1, limit.as_secs()));
            continue;
        };
        let mut r = Resync {
            ms: protected.f64("after_ms").unwrap_or(f64::NAN),
            pause_ms: protected.f64("pause_ms"),
            shipped_bytes: protected.f64("sent_bytes").map(|b| b as u64),
            ping_reply_ms,
            ping_to_protected_ms: protected.ms_after(t0_wall),
            detected_at_exit: None,
            line: protected.message(),
        };
        // The backup's diverged event of this resync ("replay diverged at exit N"): which sync point.
        r.detected_at_exit = backup
            .events
            .of("diverged", |_| true)
            .get(n0)
            .and_then(|e| e.str("why").and_then(|w| w.split("diverged at exit ").nth(1)).map(str::to_string))
            .as_deref()
            .and_then(|t| {
                t.trim_end_matches(|ch: char| !ch.is_ascii_digit()).split(|ch: char| !ch.is_ascii_digit()).next()
            })
            .and_then(|n| n.parse().ok());
        eprintln!(
            "  run {}: resync in {:.0} ms, guest paused {:.2} ms, {:.1} MiB sent; the PING answered in {:.1} ms; found at exit {} ({:.1} s after the PING)",
            i + 1,
            r.ms,
            r.pause_ms.unwrap_or(f64::NAN),
            r.shipped_bytes.map_or(f64::NAN, |b| b as f64 / 1048576.0),
            r.ping_reply_ms,
            r.detected_at_exit.map_or("?".into(), |e| e.to_string()),
            r.ping_to_protected_ms / 1e3
        );
        let verified = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            Ok(is_protected(&env.ftvm, &primary.sock))
        })?
        .is_some();
        if !verified {
            c.failures.push(format!("run {}: not protected after the resync", i + 1));
        }
        c.runs.push(Run {
            index: i,
            backup: protected.str("backup").unwrap_or_default().to_string(),
            backup_start_ms: f64::NAN,
            protect: None,
            load: None,
            resync: Some(r),
            protected_verified: verified,
            unprotected_after_ms: None,
        });
        common::sleep(Duration::from_millis(500))?;
    }
    let s = common::ctl_status(&env.ftvm, &primary.sock)?;
    eprintln!("  primary status: resyncs {}", s.pair.map_or(0, |p| p.resyncs));
    Ok(())
}

/// The same VM's local snapshot (under the same load for the load case), for its pause.
fn local_snapshot(
    ctx: &Ctx,
    topo: &Topology,
    env: &PairEnv,
    primary: &Vm,
    scenario: Scenario,
    dir: &Path,
) -> Result<LocalSnapshot> {
    let snap = dir.join("snapshot");
    let _ = std::fs::remove_dir_all(&snap);
    let load = if scenario == Scenario::Load {
        let a = ctx.args;
        let (cl, r) = (a.clients.to_string(), a.keyspace.to_string());
        let rb = RedisBench::spawn(
            &ctx.redis_benchmark,
            &topo.client(),
            &["-t", "set", "-c", &cl, "-r", &r, "-n", "100000000", "-q"],
        )?;
        common::sleep(Duration::from_secs_f64(a.settle_s))?;
        Some(rb)
    } else {
        None
    };
    let mut cmd = Command::new(&env.ftvm);
    cmd.arg("ctl").arg(&primary.sock).arg("snapshot").arg(&snap).arg("--json");
    let r = common::run("ftvm ctl snapshot", &mut cmd, Duration::from_secs(300));
    drop(load);
    let _ = std::fs::remove_dir_all(&snap);
    let f = r?;
    let p: Option<SnapshotProgress> = serde_json::from_str(f.stdout.trim()).ok();
    let ok = f.status.success() && p.as_ref().is_some_and(|p| p.phase == SnapshotPhase::Done);
    let s = LocalSnapshot {
        ok,
        pause_ms: p.as_ref().and_then(|p| p.pause_ms),
        elapsed_ms: p.as_ref().map(|p| p.elapsed_ms),
        pages: p.as_ref().map_or_else(Vec::new, |p| p.rounds.iter().map(|r| r.pages).collect()),
        error: if ok { None } else { Some(format!("{}: {} {}", f.status, f.stdout.trim(), f.stderr.trim())) },
    };
    match &s.error {
        None => eprintln!(
            "  local snapshot: paused {:.2} ms, {:.0} ms in all",
            s.pause_ms.unwrap_or(f64::NAN),
            s.elapsed_ms.unwrap_or(f64::NAN)
        ),
        Some(e) => eprintln!("  local snapshot failed: {e}"),
    }
    Ok(s)
}

fn ratios(cases: &[Case]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for c in cases {
        let name = format!("{} {}", mem_label(c.mem_mib), c.scenario.label());
        if let Some(s) = c.local_snapshot.as_ref().and_then(|s| s.pause_ms) {
            out.push(
                Ratio::new(format!("{name}: protect pause / local snapshot pause"), c.pause_ms.median / s)
                    .note("the re-protection's cut against `ftvm ctl snapshot` of the same VM"),
            );
        }
        if c.scenario == Scenario::Load {
            let r = common::median(
                &c.runs.iter().filter_map(|r| r.load.as_ref()).map(|l| l.rps_during / l.rps_before).collect::<Vec<_>>(),
            );
            out.push(
                Ratio::new(format!("{name}: SET/s during the protect / before"), r)
                    .note("250 ms ticks; before: unprotected"),
            );
            let r = common::median(
                &c.runs.iter().filter_map(|r| r.load.as_ref()).map(|l| l.rps_during / l.rps_after).collect::<Vec<_>>(),
            );
            out.push(
                Ratio::new(format!("{name}: SET/s during the protect / after"), r)
                    .note("250 ms ticks; after: protected again"),
            );
        }
        // VMware FT: "within minutes"; taken as 60 s, the most favourable reading for it.
        out.push(
            Ratio::new(format!("{name}: time to protected / 60 s"), c.protect_ms.median / 60e3)
                .note("VMware FT re-protects 'within minutes' (Scales et al. 2010); 60 s is the shortest reading"),
        );
    }
    out
}

fn anchors(cases: &[Case]) -> Vec<Anchor> {
    let span = |sc: Scenario, f: &dyn Fn(&Case) -> f64| {
        let v: Vec<f64> = cases.iter().filter(|c| c.scenario == sc).map(f).filter(|v| !v.is_nan()).collect();
        if v.is_empty() {
            "not measured".to_string()
        } else {
            let (lo, hi) = (v.iter().copied().fold(f64::MAX, f64::min), v.iter().copied().fold(f64::MIN, f64::max));
            format!("{lo:.1}-{hi:.1}")
        }
    };
    vec![
        Anchor {
            system: "VMware FT (vSphere 4, Scales et al., SIGOPS OSR 2010)",
            published: "re-protection \"within minutes\" (a new backup started on another host)",
            ftvm: format!(
                "time to protected again, medians: idle {} ms, under load {} ms",
                span(Scenario::Idle, &|c| c.protect_ms.median),
                span(Scenario::Load, &|c| c.protect_ms.median)
            ),
        },
        Anchor {
            system: "COLO (SoCC 2013; QEMU)",
            published: "checkpoint on output mismatch; checkpoint memory transfer 4.5 ms idle, 24 ms under load (mean)",
            ftvm: format!(
                "resync of a diverged backup (the same idea: a state transfer on mismatch): {} ms to protected, guest paused {} ms (medians)",
                span(Scenario::Resync, &|c| c.protect_ms.median),
                span(Scenario::Resync, &|c| c.pause_ms.median)
            ),
        },
        Anchor {
            system: "Remus (NSDI 2008)",
            published: "whole-VM checkpoints every 25 ms, failover ~1 s",
            ftvm: format!(
                "one state transfer per re-protection, guest paused {} ms idle, {} ms under load (medians)",
                span(Scenario::Idle, &|c| c.pause_ms.median),
                span(Scenario::Load, &|c| c.pause_ms.median)
            ),
        },
    ]
}

fn print_table(r: &Report) {
    r.machine.print(&format!("{} re-protections per case, medians (max)", r.runs));
    println!("{} ; sparse {} MiB disks\n", r.redis_benchmark, r.disk_mib);
    let f = |s: &Series, p: usize| {
        if s.samples.is_empty() {
            "-".to_string()
        } else {
            format!("{:.*} ({:.*})", p, s.median, p, max_of(s))
        }
    };
    let m = |s: &Series, p: usize| if s.samples.is_empty() { "-".to_string() } else { format!("{:.*}", p, s.median) };
    let mut t = Table::new().left("memory", 8).left("case", 7).right("protected ms", 15).right("copy ms", 9);
    t = t.right("pause ms", 13).right("shipped MiB", 11).right("rounds", 6).right("pages r0/live/cut", 19);
    t = t.right("snapshot pause", 14);
    for c in r.cases.iter().filter(|c| c.scenario != Scenario::Resync) {
        let pages = c
            .runs
            .iter()
            .rev()
            .find_map(|r| r.protect.as_ref().filter(|p| p.ok))
            .map(|p| {
                let (a, b, c) = p.pages();
                format!("{a}/{b}/{c}")
            })
            .unwrap_or_else(|| "-".into());
        let snap = c.local_snapshot.as_ref().and_then(|s| s.pause_ms).map_or("-".into(), |p| format!("{p:.2} ms"));
        t.row([
            mem_label(c.mem_mib),
            c.scenario.label().to_string(),
            f(&c.protect_ms, 0),
            m(&c.copy_ms, 0),
            f(&c.pause_ms, 2),
            m(&c.shipped_mib, 1),
            m(&c.precopy_rounds, 0),
            pages,
            snap,
        ]);
    }
    t.print();
    println!("(protected: `protected_after_ms`, request to caught up; copy: the live copy of the state, `snapshot.elapsed_ms`;");
    println!(" pages: of the last run; snapshot pause: `ftvm ctl snapshot` of the same VM, the same load)");

    if r.cases.iter().any(|c| c.scenario == Scenario::Load) {
        println!();
        let mut t = Table::new().left("memory", 8).right("SET/s before", 15).right("SET/s during", 15);
        t = t.right("lowest tick", 13).right("SET/s after", 15).right("during/before", 14).right("during/after", 14);
        t = t.right("PING gap: protect", 19).right("PING gap: before", 17);
        for c in r.cases.iter().filter(|c| c.scenario == Scenario::Load) {
            let loads: Vec<&LoadWindow> = c.runs.iter().filter_map(|r| r.load.as_ref()).collect();
            let before_gap = common::median(&loads.iter().map(|l| l.ping_gap_before_ms).collect::<Vec<_>>());
            t.row([
                mem_label(c.mem_mib),
                m(&c.rps_before, 0),
                m(&c.rps_during, 0),
                m(&c.rps_during_min, 0),
                m(&c.rps_after, 0),
                format!("{:.2}", c.rps_during.median / c.rps_before.median),
                format!("{:.2}", c.rps_during.median / c.rps_after.median),
                f(&c.ping_gap_ms, 1),
                format!("{before_gap:.1}"),
            ]);
        }
        t.print();
        println!(
            "(redis-benchmark -t set -c {} -r {}: 250 ms ticks; before: unprotected, the backup just killed;",
            r.clients, r.keyspace
        );
        println!(" after: protected again; PING gap: longest time a 10 ms PING loop on its own connection went unanswered, ms)");
    }

    if r.cases.iter().any(|c| c.scenario == Scenario::Resync) {
        println!();
        let mut t = Table::new().left("memory", 8).right("resync ms", 15).right("pause ms", 13).right("sent MiB", 11);
        t = t.right("diverging PING: reply", 22).right("PING to protected (max)", 24);
        t = t.right("found at exit (per run)", 26);
        for c in r.cases.iter().filter(|c| c.scenario == Scenario::Resync) {
            let rs: Vec<&Resync> = c.runs.iter().filter_map(|r| r.resync.as_ref()).collect();
            let reply = common::median(&rs.iter().map(|r| r.ping_reply_ms).collect::<Vec<_>>());
            let mut to = Series::default();
            for r in &rs {
                to.push(r.ping_to_protected_ms / 1e3);
            }
            let exits: Vec<String> =
                rs.iter().map(|r| r.detected_at_exit.map_or("?".into(), |e| e.to_string())).collect();
            t.row([
                mem_label(c.mem_mib),
                f(&c.protect_ms, 0),
                f(&c.pause_ms, 2),
                m(&c.shipped_mib, 1),
                format!("{reply:.1} ms"),
                format!("{} s", f(&to, 1)),
                exits.join(", "),
            ]);
        }
        t.print();
        println!(
            "(kvstore-rdtsc, one PING a run{}; from the primary's `protected` event (reason resync): after_ms, sent_bytes, pause_ms)",
            if r.resync_idle { ", the guest idle after it" } else { ", then SETs 1 ms apart on one connection to reach the sync points" }
        );
        println!(" (found at exit: the sync point, counted from the last state transfer, where the backup saw the divergence)");
    }
    println!();
    table::ratios("", &r.ratios, 4).print();
    println!("\nRead against the published figures (../shared/anchors.md):");
    for a in &r.anchors {
        println!("- {}: {}\n    ftvm here: {}", a.system, a.published, a.ftvm);
    }
    for c in &r.cases {
        for f in &c.failures {
            println!("FAILURE ({} {}): {f}", mem_label(c.mem_mib), c.scenario.label());
        }
    }
}
