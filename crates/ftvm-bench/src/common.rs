//! What the suites share: command-line options, running and timing child processes,
//! medians, the machine description, parsing ftvm's summary line, writing results.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Options every suite takes (global: they go before or after the suite's name).
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Runs per engine and scenario (default: run-vs-qemu 10, record-replay 3, kvstore 3, snapshot 3).
    #[arg(long, global = true)]
    pub runs: Option<usize>,
    /// The ftvm binary (build it with `cargo build --release -p ftvm`).
    #[arg(long, global = true, default_value = "target/release/ftvm")]
    pub ftvm: PathBuf,
    /// The QEMU binary.
    #[arg(long, global = true, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Directory of the guest images (`cargo xtask guests`).
    #[arg(long, global = true, default_value = "target/guests")]
    pub guests: PathBuf,
    /// Where the results (one JSON and one SVG per suite) and the suites' scratch files go.
    #[arg(long, global = true, default_value = "target/bench")]
    pub out: PathBuf,
}

impl Common {
    /// A suite's start: its scratch directory `--out`/`dir`, with ftvm and the named guest
    /// images copied into it (so that a rebuild while the suite runs changes nothing it
    /// measures), and the machine described (QEMU's version too where `qemu`).
    pub fn prepare(&self, dir: &str, guests: &[&str], qemu: bool) -> Result<Prepared> {
        let work = self.out.join(dir);
        let common = self.with_ftvm_copy(&work)?;
        let machine = Machine::describe(&common, qemu)?;
        let images = snapshot_images(&common.guests, guests, &work)?;
        let work = std::fs::canonicalize(&work)?;
        Ok(Prepared { common, machine, images, work })
    }

    /// `--runs`, or the suite's default; at least 1.
    pub fn runs_or(&self, default: usize) -> usize {
        self.runs.unwrap_or(default).max(1)
    }

    /// The same options with `ftvm` replaced by a copy in `dir`, so that a rebuild while a
    /// suite runs (others share target/) cannot change what is measured.
    fn with_ftvm_copy(&self, dir: &Path) -> Result<Common> {
        require_file(&self.ftvm, "ftvm", "build it with `cargo build --release -p ftvm`")?;
        std::fs::create_dir_all(dir)?;
        let copy = dir.join("ftvm");
        let _ = std::fs::remove_file(&copy);
        std::fs::copy(&self.ftvm, &copy).with_context(|| format!("copying {}", self.ftvm.display()))?;
        Ok(Common { ftvm: std::fs::canonicalize(copy)?, ..self.clone() })
    }
}

/// What [`Common::prepare`] gives a suite.
pub struct Prepared {
    /// The options, `ftvm` replaced by its copy in `work`.
    pub common: Common,
    pub machine: Machine,
    /// The guest images copied into `work`, by name (`kvstore` -> work/kvstore.elf).
    pub images: BTreeMap<String, PathBuf>,
    /// The suite's scratch directory (canonical).
    pub work: PathBuf,
}

/// Set by SIGINT/SIGTERM: waits give up, guards clean up (VMs, topology), the suite fails.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to the flag above, so that a stopped benchmark still tears down
/// what it built. Children get the default handlers back at exec.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, but gives up early when interrupted.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    check_interrupted()
}

pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Samples and their median.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Series {
    pub samples: Vec<f64>,
    pub median: f64,
}

impl Series {
    pub fn push(&mut self, v: f64) {
        self.samples.push(v);
        self.median = median(&self.samples);
    }
}

/// A ratio of medians, with the goal it is held to (if any).
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub name: String,
    pub value: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The goal's bound, for charts.
    #[serde(skip)]
    pub bound: Option<f64>,
}

impl Ratio {
    pub fn new(name: impl Into<String>, value: f64) -> Ratio {
        Ratio { name: name.into(), value, goal: None, met: None, note: None, bound: None }
    }
    /// Goal `value <= max`.
    pub fn at_most(mut self, max: f64) -> Ratio {
        self.goal = Some(format!("<= {max}"));
        self.met = Some(self.value <= max);
        self.bound = Some(max);
        self
    }
    /// Goal `value >= min`.
    pub fn at_least(mut self, min: f64) -> Ratio {
        self.goal = Some(format!(">= {min}"));
        self.met = Some(self.value >= min);
        self.bound = Some(min);
        self
    }
    pub fn note(mut self, note: impl Into<String>) -> Ratio {
        self.note = Some(note.into());
        self
    }
    pub fn goal_text(&self) -> String {
        match (&self.goal, self.met) {
            (Some(g), Some(true)) => format!("goal {g}: met"),
            (Some(g), Some(false)) => format!("goal {g}: NOT met"),
            _ => String::new(),
        }
    }
}

/// The machine and the programs compared, for every report.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kvm: String,
    pub ftvm_version: String,
    pub qemu_version: String,
    pub unix_time: u64,
}

impl Machine {
    /// This machine, ftvm's version, and QEMU's where `qemu` (else "not used").
    fn describe(common: &Common, qemu: bool) -> Result<Machine> {
        require_file(&common.ftvm, "ftvm", "build it with `cargo build --release -p ftvm`")?;
        let ftvm_version = version_of(&common.ftvm)?;
        let qemu_version = if !qemu {
            "not used".to_string()
        } else {
            capture(Command::new(&common.qemu).arg("--version"))
                .with_context(|| {
                    format!("cannot run {}; install Debian's qemu-system-x86 (scripts/deps.sh)", common.qemu.display())
                })?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        };
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.to_string()))
            .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
            .unwrap_or_default();
        Ok(Machine {
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu,
            kvm: ftvm_version
                .split_once('(')
                .map(|(_, k)| k.strip_suffix(')').unwrap_or(k).to_string())
                .unwrap_or_default(),
            ftvm_version,
            qemu_version,
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }

    pub fn print(&self, runs: &str) {
        println!("machine: {} cores, {} ({})", self.cores, self.cpu, self.kvm);
        println!("ftvm: {}\nqemu: {}\nruns: {runs}\n", self.ftvm_version, self.qemu_version);
    }
}

/// `PROGRAM --version`, trimmed.
pub fn version_of(program: &Path) -> Result<String> {
    Ok(capture(Command::new(program).arg("--version"))?.trim().to_string())
}

pub fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The options of every suite that drives redis-benchmark on the test network.
#[derive(clap::Args, Debug, Clone)]
pub struct NetArgs {
    /// The redis-benchmark binary (Debian's redis-tools).
    #[arg(long, default_value = "redis-benchmark")]
    pub redis_benchmark: PathBuf,
    /// The topology script (run from the repository root, or give its path).
    #[arg(long, default_value = "scripts/topology.sh")]
    pub topology: PathBuf,
}

/// What every suite that runs the kvstore guest on the test network needs: the guest image,
/// root, redis-benchmark, the topology script and iproute2. Returns redis-benchmark's path.
pub fn kvstore_network_suite(common: &Common, suite: &str, net: &NetArgs) -> Result<PathBuf> {
    let (redis_benchmark, topology) = (&net.redis_benchmark, &net.topology);
    if !common.guests.join("kvstore.elf").is_file() {
        bail!(
            "guest image kvstore.elf not found in {}; build the guests with `cargo xtask guests`",
            common.guests.display()
        );
    }
    if !is_root() {
        bail!("the {suite} suite needs root (network namespaces, TAP devices): run it as root");
    }
    let redis_benchmark = which(redis_benchmark, "install Debian's redis-tools (apt-get install redis-tools)")?;
    require_file(topology, "the topology script", "run from the repository root or pass --topology")?;
    which(Path::new("ip"), "install iproute2")?;
    Ok(redis_benchmark)
}

/// Moves the calling thread into the network namespace `ns` (`ip netns`' /run/netns/NS), for
/// a client thread that talks to the guest from the client namespace. Only this thread moves.
pub fn enter_netns(ns: &str) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    let path = Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: setns(2) with a namespace file we hold open; it affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns({}): {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

/// A fresh blank (sparse) raw disk of `mib` MiB at `dir/name`, replacing one left there.
pub fn fresh_disk(dir: &Path, name: &str, mib: u64) -> Result<PathBuf> {
    let disk = dir.join(name);
    let _ = std::fs::remove_file(&disk);
    std::fs::File::create(&disk)?.set_len(mib << 20)?;
    Ok(disk)
}

pub fn require_file(path: &Path, what: &str, hint: &str) -> Result<()> {
    if !path.is_file() {
        bail!("{what} not found at {}; {hint}", path.display());
    }
    Ok(())
}

/// `ftvm ctl SOCKET status --json`, read as the API's own [`ftvm_api::Status`].
pub fn ctl_status(ftvm: &Path, sock: &Path) -> Result<ftvm_api::Status> {
    let mut cmd = Command::new(ftvm);
    cmd.arg("ctl").arg(sock).args(["status", "--json"]);
    let f = run("ftvm ctl status", &mut cmd, Duration::from_secs(10))?;
    if !f.status.success() {
        bail!("ftvm ctl {} status failed: {}", sock.display(), f.stderr.trim());
    }
    serde_json::from_str(&f.stdout).with_context(|| format!("parsing `ftvm ctl status --json`: {}", f.stdout))
}

/// Finds a program the way the shell would (a name with a slash is a path).
pub fn which(prog: &Path, hint: &str) -> Result<PathBuf> {
    if prog.components().count() > 1 {
        return if prog.is_file() { Ok(prog.to_path_buf()) } else { bail!("{} not found; {hint}", prog.display()) };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
        .with_context(|| format!("{} not found in PATH; {hint}", prog.display()))
}

/// Effective user id 0 (from /proc, so no unsafe call is needed).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        .unwrap_or(false)
}

/// Copies the named guest images into `dir`, so that a guest rebuilt while a suite runs
/// cannot change what is measured (and replay finds the image it recorded).
pub fn snapshot_images(guests: &Path, names: &[&str], dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = BTreeMap::new();
    for name in names {
        let src = guests.join(format!("{name}.elf"));
        require_file(&src, &format!("guest image {name}.elf"), "build the guests with `cargo xtask guests`")?;
        let dst = dir.join(format!("{name}.elf"));
        std::fs::copy(&src, &dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        out.insert(name.to_string(), std::fs::canonicalize(&dst)?);
    }
    Ok(out)
}

/// The end of every suite: writes `NAME.json` and `NAME.svg` under `out`, prints the
/// report's table (`print`), then where the files went. Returns the JSON's path.
pub fn publish<T: Serialize>(out: &Path, name: &str, report: &T, svg: &str, print: impl FnOnce(&T)) -> Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let json = out.join(format!("{name}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(report)?)?;
    let svg_path = out.join(format!("{name}.svg"));
    std::fs::write(&svg_path, svg)?;
    print(report);
    println!("\nwrote {} and {}", json.display(), svg_path.display());
    Ok(json)
}

/// The counts in ftvm's summary line, e.g. "... after 3.021 s (546 exits: 544 port I/O,
/// 2 MMIO, 0 HLT, 0 MSR; 141 interrupts, 0 kicks) ...".
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExitSummary {
    pub seconds: f64,
    pub exits: u64,
    pub port_io: u64,
    pub mmio: u64,
    pub hlt: u64,
    pub msr: u64,
    pub interrupts: u64,
    pub kicks: u64,
}

impl ExitSummary {
    /// Parses the last summary line found in ftvm's standard error.
    pub fn parse(stderr: &str) -> Option<ExitSummary> {
        let line = stderr.lines().rev().find(|l| l.contains(" exits: ") && l.contains(" after "))?;
        let mut s = ExitSummary::default();
        let after = &line[line.find(" after ")? + 7..];
        s.seconds = after.split_whitespace().next()?.parse().ok()?;
        let open = line.find(" exits: ").and_then(|i| line[..i].rfind('('))?;
        let close = open + line[open..].find(')')?;
        for part in line[open + 1..close].split([',', ';', ':']) {
            let mut words = part.split_whitespace();
            let Some(n) = words.next().and_then(|n| n.parse::<u64>().ok()) else { continue };
            match words.collect::<Vec<_>>().join(" ").as_str() {
                "exits" => s.exits = n,
                "port I/O" => s.port_io = n,
                "MMIO" => s.mmio = n,
                "HLT" => s.hlt = n,
                "MSR" => s.msr = n,
                "interrupts" => s.interrupts = n,
                "kicks" => s.kicks = n,
                _ => {}
            }
        }
        Some(s)
    }
}

/// The outcome of a child process.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub wall: Duration,
    pub first_output: Option<Duration>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn wall_s(&self) -> f64 {
        self.wall.as_secs_f64()
    }
    /// The guest's `digest:` line, if it printed one.
    pub fn digest(&self) -> Option<&str> {
        self.stdout.lines().find(|l| l.starts_with("digest:")).map(str::trim)
    }
    /// A short account of what went wrong, for error messages.
    pub fn describe(&self) -> String {
        let tail =
            |s: &str| s.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        format!("{}; console:\n{}\nstderr:\n{}", self.status, tail(&self.stdout), tail(&self.stderr))
    }
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    first: Option<Instant>,
}

/// A running child whose output is collected by threads and whose exit is timed by a
/// waiter thread (so the wall time is exact, not rounded to a polling period). Dropping it
/// kills the child.
pub struct Running {
    label: String,
    pid: i32,
    start: Instant,
    out: Arc<(Mutex<Captured>, Condvar)>,
    err: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<(std::io::Result<ExitStatus>, Instant)>,
    threads: Vec<JoinHandle<()>>,
    exited: Option<(ExitStatus, Instant)>,
}

impl Running {
    /// The process's id (a command that execs another keeps it).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn spawn(label: impl Into<String>, cmd: &mut Command) -> Result<Running> {
        let label = label.into();
        check_interrupted()?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let start = Instant::now();
        let mut child: Child = cmd.spawn().with_context(|| format!("cannot start {label}: {cmd:?}"))?;
        let pid = child.id() as i32;
        let mut stdout = child.stdout.take().context("no stdout")?;
        let mut stderr = child.stderr.take().context("no stderr")?;
        let out = Arc::new((Mutex::new(Captured::default()), Condvar::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel();
        let o = out.clone();
        let e = err.clone();
        let threads = vec![
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n @ 1..) = stdout.read(&mut buf) {
                    let (m, cv) = &*o;
                    let mut c = m.lock().unwrap();
                    c.first.get_or_insert_with(Instant::now);
                    c.bytes.extend_from_slice(&buf[..n]);
                    cv.notify_all();
                }
            }),
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n @ 1..) = stderr.read(&mut buf) {
                    e.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }),
            std::thread::spawn(move || {
                let r = child.wait();
                let _ = tx.send((r, Instant::now()));
            }),
        ];
        Ok(Running { label, pid, start, out, err, done, threads, exited: None })
    }

    fn poll_exit(&mut self, timeout: Duration) -> Result<bool> {
        if self.exited.is_some() {
            return Ok(true);
        }
        match self.done.recv_timeout(timeout) {
            Ok((Ok(status), at)) => {
                self.exited = Some((status, at));
                Ok(true)
            }
            Ok((Err(e), _)) => Err(e).with_context(|| format!("waiting for {}", self.label)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(false),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("lost the waiter of {}", self.label),
        }
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.out.0.lock().unwrap().bytes).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Waits until the child prints `text` on standard error.
    pub fn wait_for_stderr(&mut self, text: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.stderr_text().contains(text) {
            check_interrupted()?;
            if self.poll_exit(Duration::from_millis(20))? {
                let f = self.collect()?;
                bail!("{} exited before printing {text:?}: {}", self.label, f.describe());
            }
            if Instant::now() >= deadline {
                bail!("{} did not print {text:?} within {} s", self.label, timeout.as_secs());
            }
        }
        Ok(())
    }

    /// Whether the child has exited (without waiting).
    pub fn has_exited(&mut self) -> Result<bool> {
        self.poll_exit(Duration::ZERO)
    }

    /// SIGKILL now; returns how it ended.
    pub fn kill(mut self) -> Result<Finished> {
        self.signal(libc::SIGKILL);
        self.poll_exit(Duration::from_secs(10))?;
        self.collect()
    }

    /// Waits until the child prints `text` on standard output.
    pub fn wait_for_output(&mut self, text: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let (m, cv) = &*self.out;
                let c = m.lock().unwrap();
                if String::from_utf8_lossy(&c.bytes).contains(text) {
                    return Ok(());
                }
                let _ = cv.wait_timeout(c, Duration::from_millis(50)).unwrap();
            }
            check_interrupted()?;
            if self.poll_exit(Duration::ZERO)? {
                let f = self.collect()?;
                bail!("{} exited before printing {text:?}: {}", self.label, f.describe());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {text:?} within {} s; console so far:\n{}",
                    self.label,
                    timeout.as_secs(),
                    self.stdout_text()
                );
            }
        }
    }

    /// Waits for the child to exit; kills it after `timeout` (an error).
    pub fn finish(mut self, timeout: Duration) -> Result<Finished> {
        let deadline = Instant::now() + timeout;
        while !self.poll_exit(Duration::from_millis(50))? {
            check_interrupted()?;
            if Instant::now() >= deadline {
                self.signal(libc::SIGKILL);
                bail!("{} ran for more than {} s (killed)", self.label, timeout.as_secs());
            }
        }
        self.collect()
    }

    /// SIGTERM, then SIGKILL after `grace`; returns how it ended.
    pub fn terminate(mut self, grace: Duration) -> Result<Finished> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while !self.poll_exit(Duration::from_millis(50))? {
            if Instant::now() >= deadline {
                self.signal(libc::SIGKILL);
                self.poll_exit(Duration::from_secs(10))?;
                break;
            }
        }
        self.collect()
    }

    fn signal(&self, sig: libc::c_int) {
        if self.exited.is_none() {
            // SAFETY: kill(2) on our own child's pid, which is not reaped until `exited` is set.
            unsafe { libc::kill(self.pid, sig) };
        }
    }

    fn collect(&mut self) -> Result<Finished> {
        let (status, at) = self.exited.with_context(|| format!("{} has not exited", self.label))?;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let out = self.out.0.lock().unwrap();
        Ok(Finished {
            status,
            wall: at - self.start,
            first_output: out.first.map(|f| f - self.start),
            stdout: String::from_utf8_lossy(&out.bytes).into_owned(),
            stderr: String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned(),
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.exited.is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.poll_exit(Duration::from_secs(5));
        }
    }
}

/// Runs a command to completion.
pub fn run(label: &str, cmd: &mut Command, timeout: Duration) -> Result<Finished> {
    Running::spawn(label, cmd)?.finish(timeout)
}

/// One event a side reported on `GET /events`: its kind, its fields, and when it happened
/// (the event's own Unix time, so that a late follower times it right).
#[derive(Debug, Clone)]
pub struct SideEvent {
    pub fields: serde_json::Value,
    pub at: std::time::SystemTime,
}

impl SideEvent {
    pub fn message(&self) -> String {
        self.fields["message"].as_str().unwrap_or_default().to_string()
    }

    pub fn f64(&self, field: &str) -> Option<f64> {
        self.fields[field].as_f64()
    }

    pub fn str(&self, field: &str) -> Option<&str> {
        self.fields[field].as_str()
    }

    /// Milliseconds from `since` to this event (negative if it came first).
    pub fn ms_after(&self, since: std::time::SystemTime) -> f64 {
        match self.at.duration_since(since) {
            Ok(d) => d.as_secs_f64() * 1e3,
            Err(e) => -e.duration().as_secs_f64() * 1e3,
        }
    }
}

/// A side's events, followed on a thread of its own through its API socket (the same events
/// it writes to standard error, as JSON: nothing here parses text).
pub struct Events {
    seen: Arc<Mutex<Vec<SideEvent>>>,
}

impl Events {
    /// Follows the VM answering on `socket` until it ends (waiting up to 60 s for the socket).
    pub fn follow(socket: &Path) -> Events {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (into, name, socket) = (seen.clone(), socket.display().to_string(), socket.to_path_buf());
        let spawned = std::thread::Builder::new().name("bench-events".into()).spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut last_seq = None;
            // Reconnects if the stream breaks early; `seq` drops what was seen already.
            while Instant::now() < deadline {
                let followed = ftvm_api::client::follow_events(&socket, |line| {
                    let Ok(fields) = serde_json::from_str::<serde_json::Value>(line) else { return true };
                    let seq = fields["seq"].as_u64();
                    if seq.is_some() && seq <= last_seq {
                        return true;
                    }
                    last_seq = seq;
                    let at = fields["time"]
                        .as_f64()
                        .map(|t| std::time::UNIX_EPOCH + Duration::from_secs_f64(t))
                        .unwrap_or_else(std::time::SystemTime::now);
                    ftvm_sync::lock(&into).push(SideEvent { fields, at });
                    true
                });
                if followed.is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        if let Err(e) = spawned {
            eprintln!("warning: cannot follow the events of {name}: {e}");
        }
        Events { seen }
    }

    /// Events of `kind` (`takeover`, `backup_lost`, ...) seen so far that `keep` accepts.
    pub fn of(&self, kind: &str, keep: impl Fn(&SideEvent) -> bool) -> Vec<SideEvent> {
        ftvm_sync::lock(&self.seen).iter().filter(|e| e.fields["event"] == kind && keep(e)).cloned().collect()
    }

    pub fn count(&self, kind: &str) -> usize {
        self.of(kind, |_| true).len()
    }

    /// Waits up to `timeout` for the `n`th (from 0) event of `kind` that `keep` accepts, or
    /// until `gone` says the side has ended.
    pub fn wait_for(
        &self,
        kind: &str,
        n: usize,
        timeout: Duration,
        keep: impl Fn(&SideEvent) -> bool,
        mut gone: impl FnMut() -> Result<bool>,
    ) -> Result<Option<SideEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            if let Some(e) = self.of(kind, &keep).into_iter().nth(n) {
                return Ok(Some(e));
            }
            if Instant::now() >= deadline || gone()? {
                // One last look: the event may have come with the end.
                std::thread::sleep(Duration::from_millis(50));
                return Ok(self.of(kind, &keep).into_iter().nth(n));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
