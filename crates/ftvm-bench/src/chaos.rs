//! The `chaos` suite (outside CI): the hostile and careless uses of issue 18, each run for
//! real against the ftvm binary and reported `held` or `NOT HELD` with what was seen.
//!
//! - **split brain**, each host of the pair a network namespace with a private /tmp of its
//!   own (what two real hosts look like): a pair across hosts without an arbiter both hosts
//!   see must refuse to start; with etcd (in the LAN's client namespace, reached over each
//!   host's uplink), a cut replication link must leave exactly one live side, and a primary
//!   SIGSTOPped past its lease must emit nothing after SIGCONT while the backup went live;
//! - **locks**: the default lock file must be one another user (nobody) cannot open, and a
//!   lock file others can open must be refused;
//! - **hostile peers** of a backup (no key: anyone can complete the handshake): three
//!   connections stalled in the handshake, a peer that authenticates and then stalls, closes,
//!   or sends a bad transfer header, a bad log header or a huge frame length: the real
//!   primary must pair afterwards and the pair end normally;
//! - **damaged logs**: flipped bytes and truncations of a recording with sync points must end
//!   their replay promptly with a non-zero status;
//! - **a crafted snapshot**: a manifest whose disk source names another file must be refused
//!   and the file left as it was;
//! - **bad inputs**: `--initrd /dev/zero`, a FIFO as `--kernel`, SIGTERM to a backup that
//!   waits for its primary must each end ftvm promptly.
//!
//! Needs root (namespaces, another user), /dev/kvm, etcd-server, setpriv (util-linux).
//! Exits non-zero when a case did not hold; `--json FILE` writes every outcome.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use crate::common::{self, Common, Running};
use crate::kvstore::Topology;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run only the cases whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Write the outcomes as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The topology script (run from the repository root, or give its path).
    #[arg(long, default_value = "scripts/topology.sh")]
    topology: PathBuf,
}

#[derive(Debug, Serialize)]
struct Outcome {
    case: &'static str,
    held: bool,
    detail: String,
    seconds: f64,
}

struct Ctx {
    ftvm: PathBuf,
    hello: PathBuf,
    work: PathBuf,
    topology: PathBuf,
}

type Case = fn(&Ctx) -> Result<String>;

const CASES: &[(&str, Case)] = &[
    ("split-brain: a pair across hosts without a shared arbiter is refused", across_hosts_refused),
    ("split-brain: a cut replication link with etcd leaves one live side", link_cut_etcd),
    ("split-brain: a SIGSTOPped primary with etcd emits nothing after SIGCONT", sigstop_etcd),
    ("locks: the default lock file cannot be opened by another user", default_lock_private),
    ("locks: a lock file others can open is refused", open_lock_refused),
    ("peers: three connections stalled in the handshake", |c| peer_case(c, Hostile::Stalled)),
    ("peers: authenticated, then stalled", |c| peer_case(c, Hostile::AuthStall)),
    ("peers: authenticated, then closed", |c| peer_case(c, Hostile::AuthClose)),
    ("peers: a bad transfer header", |c| peer_case(c, Hostile::BadTransferHeader)),
    ("peers: a bad log header", |c| peer_case(c, Hostile::BadLogHeader)),
    ("peers: a huge frame length", |c| peer_case(c, Hostile::HugeFrame)),
    ("logs: damaged logs end their replay promptly", damaged_logs),
    ("snapshot: a crafted disk source cannot overwrite another file", crafted_snapshot),
    ("inputs: --initrd /dev/zero ends promptly", initrd_zero),
    ("inputs: a FIFO as --kernel ends promptly", fifo_kernel),
    ("inputs: SIGTERM ends a backup waiting for its primary", sigterm_waiting_backup),
];

pub fn run(common: &Common, args: &Args) -> Result<()> {
    ensure!(common::is_root(), "chaos needs root (network namespaces, another user, TAP)");
    common::require_file(&common.ftvm, "ftvm", "build it with `cargo build --release -p ftvm`")?;
    let hello = common.guests.join("hello.elf");
    common::require_file(&hello, "the hello guest", "build it with `cargo xtask guests`")?;
    let work = common.out.join("chaos");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // The hosts of the split-brain cases each see a private /tmp: their files go elsewhere.
    let canonical = std::fs::canonicalize(&work)?;
    ensure!(
        !canonical.starts_with("/tmp"),
        "--out {} is under /tmp, which each host of the pair sees private and empty: give another directory",
        common.out.display()
    );
    let ctx = Ctx {
        ftvm: std::fs::canonicalize(&common.ftvm)?,
        hello: std::fs::canonicalize(&hello)?,
        work: canonical,
        topology: std::fs::canonicalize(&args.topology)
            .with_context(|| format!("the topology script {}", args.topology.display()))?,
    };
    let mut outcomes = Vec::new();
    for (name, case) in CASES {
        if args.only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        common::check_interrupted()?;
        let start = Instant::now();
        let (held, detail) = match case(&ctx) {
            Ok(d) => (true, d),
            Err(e) => (false, format!("{e:#}")),
        };
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "{:<9} {name} ({seconds:.1} s): {}",
            if held { "held" } else { "NOT HELD" },
            detail.replace('\n', " | ")
        );
        outcomes.push(Outcome { case: name, held, detail, seconds });
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&outcomes)?)?;
    }
    let failed = outcomes.iter().filter(|o| !o.held).count();
    println!("chaos: {} of {} cases held", outcomes.len() - failed, outcomes.len());
    if failed > 0 {
        bail!("{failed} case(s) did not hold");
    }
    Ok(())
}

impl Ctx {
    /// A fresh directory for one case.
    fn dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.work.join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    fn ftvm(&self) -> Command {
        Command::new(&self.ftvm)
    }

    /// ftvm in host namespace `ns` with a private, empty /tmp (another host's).
    fn ftvm_on_host(&self, ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "unshare", "-m", "sh", "-c"]);
        c.arg("mount -t tmpfs -o mode=1777 tmpfs /tmp && exec \"$@\"").arg("sh").arg(&self.ftvm);
        c
    }

    /// The options of one side of a hello pair.
    fn side_args(&self, c: &mut Command, role: &str, addr: &str, console: &Path, wait_ms: u64) {
        c.arg(role).args([if role == "backup" { "--listen" } else { "--backup" }, addr, "--insecure"]);
        c.arg("--kernel").arg(&self.hello).args(["--cmdline", &format!("hello.wait_ms={wait_ms}")]);
        c.arg("--console").arg(format!("file:{}", console.display()));
    }
}

fn code(f: &common::Finished) -> Option<i32> {
    f.status.code()
}

/// A topology whose two hosts also reach the LAN (10.0.0.201, .202 on their bridges), with
/// an etcd in the client's namespace at 10.0.0.100: the hosts reach it when their
/// replication link is cut.
fn net_with_etcd(ctx: &Ctx) -> Result<(Topology, ftvm_replication::test_etcd::TestEtcd)> {
    let net = Topology::up(&ctx.topology, 2)?;
    for n in 1..=2u32 {
        let ip = format!("10.0.0.{}/24", 200 + n);
        common::capture(Command::new("ip").args(["-n", &net.host_n(n), "addr", "add", &ip, "dev", "br0"]))?;
    }
    let etcd = ftvm_replication::test_etcd::start_test_etcd_in_netns(&net.client(), "10.0.0.100")
        .context("etcd in the LAN (scripts/deps.sh installs etcd-server)")?;
    Ok((net, etcd))
}

fn across_hosts_refused(ctx: &Ctx) -> Result<String> {
    let net = Topology::up(&ctx.topology, 2)?;
    let dir = ctx.dir("across")?;
    let mut seen = Vec::new();
    for (n, role) in [(1, "primary"), (2, "backup")] {
        for lock in [None, Some("/tmp/ftvm-arbiter.lock")] {
            let mut c = ctx.ftvm_on_host(&net.host_n(n));
            ctx.side_args(&mut c, role, "10.99.0.2:7000", &dir.join("console.txt"), 100);
            if let Some(l) = lock {
                c.args(["--arbiter", l]);
            }
            let f = common::run(role, &mut c, Duration::from_secs(10)).context("it started instead of refusing")?;
            ensure!(code(&f) == Some(2), "{role} with {lock:?}: exit {:?}: {}", code(&f), f.stderr);
            ensure!(f.stderr.contains("etcd://"), "{role}: does not say what to give: {}", f.stderr);
            seen.push(format!("{role} {}: refused", lock.unwrap_or("(default)")));
        }
    }
    Ok(seen.join(", "))
}

/// A pair across the two hosts with an etcd arbiter in the LAN, paired and running.
struct EtcdPair {
    net: Topology,
    _etcd: ftvm_replication::test_etcd::TestEtcd,
    dir: PathBuf,
    backup: Running,
    primary: Running,
}

/// Starts the backup on host 2, then the primary on host 1 (the hello guest waiting
/// `wait_ms`), arbitrated by etcd key `key`, and returns once they paired and ran a moment.
fn etcd_pair(ctx: &Ctx, name: &str, key: &str, wait_ms: u64) -> Result<EtcdPair> {
    let (net, etcd) = net_with_etcd(ctx)?;
    let dir = ctx.dir(name)?;
    let url = etcd.url(key);
    let side = |n: u32, role: &str| -> Result<Running> {
        let mut c = ctx.ftvm_on_host(&net.host_n(n));
        ctx.side_args(&mut c, role, "10.99.0.2:7000", &dir.join(format!("{role}.txt")), wait_ms);
        c.args(["--arbiter", &url]);
        Running::spawn(role, &mut c)
    };
    let mut backup = side(2, "backup")?;
    backup.wait_for_stderr("backup listening", Duration::from_secs(20))?;
    let primary = side(1, "primary")?;
    backup.wait_for_stderr("paired with primary", Duration::from_secs(20))?;
    common::sleep(Duration::from_millis(800))?;
    Ok(EtcdPair { net, _etcd: etcd, dir, backup, primary })
}

fn link_cut_etcd(ctx: &Ctx) -> Result<String> {
    let EtcdPair { net, _etcd, dir, backup, primary } = etcd_pair(ctx, "cut", "ftvm/chaos-cut", 6000)?;
    common::capture(Command::new("ip").args(["-n", &net.host_n(1), "link", "set", "rep0", "down"]))?;
    let b = backup.finish(Duration::from_secs(20))?;
    let p = primary.finish(Duration::from_secs(30))?;
    let b_console = std::fs::read_to_string(dir.join("backup.txt")).unwrap_or_default();
    let p_console = std::fs::read_to_string(dir.join("primary.txt")).unwrap_or_default();
    ensure!(!b.stderr.contains("TAKEOVER") && b_console.is_empty(), "the backup went live too: {}", b.stderr);
    ensure!(code(&b) != Some(0) && b.stderr.contains("halting"), "the backup did not halt: {}", b.stderr);
    ensure!(code(&p) == Some(0) && p_console.contains("digest:"), "the primary did not finish: {}", p.stderr);
    Ok(format!(
        "primary finished unprotected (exit 0); backup halted (exit {}) without going live",
        code(&b).unwrap_or(-1)
    ))
}

fn sigstop_etcd(ctx: &Ctx) -> Result<String> {
    let EtcdPair { net: _net, _etcd, dir, backup, primary } = etcd_pair(ctx, "sigstop", "ftvm/chaos-stop", 4000)?;
    // The pid is ftvm's: ip netns exec, unshare and sh each exec the next.
    let pid = primary.pid().to_string();
    common::capture(Command::new("kill").args(["-STOP", &pid]))?;
    let b = backup.finish(Duration::from_secs(20))?;
    let before = std::fs::read(dir.join("primary.txt")).unwrap_or_default();
    common::capture(Command::new("kill").args(["-CONT", &pid]))?;
    let p = primary.finish(Duration::from_secs(15))?;
    let after = std::fs::read(dir.join("primary.txt")).unwrap_or_default();
    ensure!(code(&b) == Some(0) && b.stderr.contains("TAKEOVER"), "the backup did not go live: {}", b.stderr);
    ensure!(before == after, "the resumed primary emitted {} bytes after SIGCONT", after.len() - before.len());
    ensure!(p.stderr.contains("HALT") && code(&p) != Some(0), "the resumed primary did not halt: {}", p.stderr);
    Ok(format!("backup live (TAKEOVER); resumed primary halted (exit {}) and emitted nothing", code(&p).unwrap_or(-1)))
}

fn default_lock_private(ctx: &Ctx) -> Result<String> {
    let dir = ctx.dir("lock")?;
    let id = format!("chaos-{}", std::process::id());
    let addr = "127.0.0.1:7391";
    let side = |role: &str| -> Result<Running> {
        let mut c = ctx.ftvm();
        ctx.side_args(&mut c, role, addr, &dir.join(format!("{role}.txt")), 3000);
        c.args(["--id", &id]);
        Running::spawn(role, &mut c)
    };
    let mut backup = side("backup")?;
    backup.wait_for_stderr("backup listening", Duration::from_secs(20))?;
    let primary = side("primary")?;
    backup.wait_for_stderr("paired with primary", Duration::from_secs(20))?;
    let lock = PathBuf::from("/run/ftvm").join(format!("{id}.lock"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&lock).with_context(|| format!("{}", lock.display()))?.permissions().mode() & 0o777;
    let dmode = std::fs::metadata("/run/ftvm")?.permissions().mode() & 0o777;
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "flock", "-n", "-s"])
        .arg(&lock)
        .arg("true")
        .output()
        .context("setpriv (util-linux)")?;
    let p = primary.finish(Duration::from_secs(30))?;
    let _ = backup.finish(Duration::from_secs(10));
    let _ = std::fs::remove_file(&lock);
    ensure!(code(&p) == Some(0), "the same-host pair with the default lock failed: {}", p.stderr);
    ensure!(mode == 0o600 && dmode == 0o700, "modes: {} {mode:o}, /run/ftvm {dmode:o}", lock.display());
    ensure!(!out.status.success(), "nobody could hold {} through a read-only descriptor", lock.display());
    Ok(format!(
        "{} mode {mode:o} in a {dmode:o} directory; nobody: {}",
        lock.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

fn open_lock_refused(ctx: &Ctx) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = ctx.dir("open-lock")?;
    let lock = dir.join("open.lock");
    std::fs::write(&lock, "")?;
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644))?;
    let mut c = ctx.ftvm();
    ctx.side_args(&mut c, "primary", "127.0.0.1:7392", &dir.join("p.txt"), 100);
    c.arg("--arbiter").arg(&lock);
    let f = common::run("primary", &mut c, Duration::from_secs(10)).context("it started with the lock")?;
    ensure!(code(&f) != Some(0) && f.stderr.contains("chmod 600"), "exit {:?}: {}", code(&f), f.stderr);
    Ok(f.stderr.lines().last().unwrap_or_default().to_string())
}

#[derive(Clone, Copy)]
enum Hostile {
    Stalled,
    AuthStall,
    AuthClose,
    BadTransferHeader,
    BadLogHeader,
    HugeFrame,
}

/// Completes the handshake as a primary would (no key: anyone can), then sends the mode
/// byte and `bytes` on the encrypted stream.
fn authenticated(addr: SocketAddr, mode: u8, bytes: &[u8]) -> Result<Box<dyn std::any::Any>> {
    use ftvm_replication::secure::{handshake, Key};
    let stream = TcpStream::connect(addr).context("the backup does not listen (it exited?)")?;
    let (mut w, _r, _keys) = handshake(stream.try_clone()?, &Key::unauthenticated(), true, Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!("the backup does not complete a handshake: {e}"))?;
    w.write_all(&[mode])?;
    w.write_all(bytes)?;
    w.flush()?;
    Ok(Box::new((stream, w)))
}

/// A log's preamble (magic, format version 3), then `frame`.
fn log_start(frame: &[u8]) -> Vec<u8> {
    let mut b = b"FTVMLOG\0".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(frame);
    b
}

fn peer_case(ctx: &Ctx, hostile: Hostile) -> Result<String> {
    use ftvm_replication::protocol::{MODE_BOOT, MODE_TRANSFER};
    let dir = ctx.dir("peers")?;
    let addr: SocketAddr = "127.0.0.1:7393".parse()?;
    let side = |role: &str| -> Result<Running> {
        let mut c = ctx.ftvm();
        ctx.side_args(&mut c, role, &addr.to_string(), &dir.join(format!("{role}.txt")), 200);
        c.arg("--arbiter").arg(dir.join("arbiter.lock"));
        Running::spawn(role, &mut c)
    };
    let mut backup = side("backup")?;
    backup.wait_for_stderr("backup listening", Duration::from_secs(20))?;
    let mut held: Vec<Box<dyn std::any::Any>> = Vec::new();
    match hostile {
        Hostile::Stalled => {
            for _ in 0..3 {
                held.push(Box::new(TcpStream::connect(addr)?));
            }
        }
        Hostile::AuthStall => held.push(authenticated(addr, MODE_BOOT, &[])?),
        Hostile::AuthClose => drop(authenticated(addr, MODE_BOOT, &[])?),
        Hostile::BadTransferHeader => {
            let mut b = 9u32.to_le_bytes().to_vec();
            b.extend_from_slice(b"not json!");
            drop(authenticated(addr, MODE_TRANSFER, &b)?);
            drop(authenticated(addr, MODE_TRANSFER, &u32::MAX.to_le_bytes())?);
        }
        Hostile::BadLogHeader => drop(authenticated(addr, MODE_BOOT, &log_start(&[0xff; 16]))?),
        Hostile::HugeFrame => {
            // A header frame of the largest length the format allows (its CRC-6 right), never sent.
            let len: u32 = (1 << 26) - 1;
            let mut r = len << 6;
            for bit in (6..32).rev() {
                if r & (1 << bit) != 0 {
                    r ^= 0x43 << (bit - 6);
                }
            }
            let word = len | (r & 0x3f) << 26;
            let mut frame = word.to_le_bytes().to_vec();
            frame.extend_from_slice(&[0; 4]);
            drop(authenticated(addr, MODE_BOOT, &log_start(&frame))?);
            held.push(authenticated(addr, MODE_BOOT, &log_start(&frame))?);
        }
    }
    common::sleep(Duration::from_millis(300))?;
    ensure!(!backup.has_exited()?, "the backup exited because of the peer: {}", backup.stderr_text());
    let start = Instant::now();
    let primary = side("primary")?;
    let p = primary.finish(Duration::from_secs(40)).context("the real primary did not finish")?;
    let b = backup.finish(Duration::from_secs(20))?;
    drop(held);
    ensure!(
        code(&p) == Some(0) && code(&b) == Some(0),
        "primary {:?}: {}\nbackup {:?}: {}",
        code(&p),
        p.stderr,
        code(&b),
        b.stderr
    );
    let refused: Vec<&str> = b.stderr.lines().filter(|l| l.contains("refused")).collect();
    Ok(format!("paired after {:.1} s; {}", start.elapsed().as_secs_f64(), refused.join("; ")))
}

fn damaged_logs(ctx: &Ctx) -> Result<String> {
    let dir = ctx.dir("damaged")?;
    let log = dir.join("spin.log");
    let mut c = ctx.ftvm();
    c.args(["record", "--log"]).arg(&log).arg("--kernel").arg(&ctx.hello);
    c.args(["--cmdline", "hello.spin_ms=500", "--console"]).arg(format!("file:{}", dir.join("console.txt").display()));
    let f = common::run("record", &mut c, Duration::from_secs(60))?;
    ensure!(code(&f) == Some(0), "the recording failed: {}", f.stderr);
    let bytes = std::fs::read(&log)?;
    let len = bytes.len();
    let damaged = dir.join("damaged.log");
    let (mut cases, mut slowest) = (0, 0.0f64);
    let mut codes = std::collections::BTreeMap::<i32, usize>::new();
    for i in 0..32usize {
        let mut b = bytes.clone();
        let what = if i < 24 {
            let at = (i * len / 24 + i * 7) % len;
            b[at] ^= 0x55;
            format!("a flip at {at}")
        } else {
            let at = (i - 23) * len / 9 + i;
            b.truncate(at.min(len - 1));
            format!("a cut at {at}")
        };
        std::fs::write(&damaged, &b)?;
        let f = common::run("replay", ctx.ftvm().arg("replay").arg(&damaged), Duration::from_secs(15))
            .with_context(|| format!("{what} of {len} bytes: the replay did not end within 15 s"))?;
        let code = code(&f).with_context(|| format!("{what}: the replay died of a signal"))?;
        ensure!(code != 0, "{what}: the damaged log replayed as if whole");
        *codes.entry(code).or_default() += 1;
        slowest = slowest.max(f.wall.as_secs_f64());
        cases += 1;
    }
    Ok(format!("{cases} damaged logs of {len} bytes, slowest {slowest:.1} s, exit statuses {codes:?}"))
}

fn crafted_snapshot(ctx: &Ctx) -> Result<String> {
    let dir = ctx.dir("snapshot")?;
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![7u8; 1 << 20])?;
    let socket = dir.join("vm.sock");
    let mut c = ctx.ftvm();
    c.arg("run").arg("--kernel").arg(&ctx.hello).args(["--mem", "64M", "--cmdline", "hello.wait_ms=60000", "--disk"]);
    c.arg(&disk).arg("--console").arg(format!("file:{}", dir.join("console.txt").display()));
    c.arg("--api-socket").arg(&socket);
    let vm = Running::spawn("run", &mut c)?;
    let start = Instant::now();
    while !ctx.ftvm().arg("ctl").arg(&socket).arg("status").output()?.status.success() {
        ensure!(start.elapsed() < Duration::from_secs(30), "no API after 30 s");
        common::sleep(Duration::from_millis(50))?;
    }
    let snap = dir.join("snap");
    let f = common::run(
        "ctl snapshot",
        ctx.ftvm().arg("ctl").arg(&socket).arg("snapshot").arg(&snap),
        Duration::from_secs(60),
    )?;
    drop(vm);
    ensure!(code(&f) == Some(0), "ctl snapshot: {}", f.stderr);
    let victim = dir.join("victim.img");
    let content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&victim, &content)?;
    let manifest = snap.join("snapshot.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest)?)?;
    m["disks"][0]["source"] = serde_json::Value::String(victim.display().to_string());
    std::fs::write(&manifest, serde_json::to_vec_pretty(&m)?)?;
    let mut c = ctx.ftvm();
    c.arg("run").arg("--restore").arg(&snap).arg("--console").arg(format!("file:{}", dir.join("r.txt").display()));
    let f = common::run("run --restore", &mut c, Duration::from_secs(30))?;
    let after = std::fs::read(&victim)?;
    ensure!(after == content, "the victim file was overwritten (exit {:?})", code(&f));
    ensure!(code(&f) != Some(0), "the crafted snapshot was restored: {}", f.stderr);
    Ok(f.stderr.lines().find(|l| l.contains("error")).unwrap_or_default().to_string())
}

fn initrd_zero(ctx: &Ctx) -> Result<String> {
    let mut c = ctx.ftvm();
    c.arg("run").arg("--kernel").arg(&ctx.hello).args(["--initrd", "/dev/zero"]);
    let f = common::run("run", &mut c, Duration::from_secs(10)).context("still running after 10 s")?;
    ensure!(code(&f) != Some(0), "accepted: {}", f.stderr);
    Ok(f.stderr.lines().last().unwrap_or_default().to_string())
}

fn fifo_kernel(ctx: &Ctx) -> Result<String> {
    let dir = ctx.dir("fifo")?;
    let fifo = dir.join("kernel.fifo");
    common::capture(Command::new("mkfifo").arg(&fifo))?;
    let f = common::run("run", ctx.ftvm().arg("run").arg("--kernel").arg(&fifo), Duration::from_secs(10))
        .context("still running after 10 s (blocked on the FIFO?)")?;
    ensure!(code(&f) != Some(0), "accepted: {}", f.stderr);
    Ok(f.stderr.lines().last().unwrap_or_default().to_string())
}

fn sigterm_waiting_backup(ctx: &Ctx) -> Result<String> {
    let dir = ctx.dir("sigterm")?;
    let mut c = ctx.ftvm();
    ctx.side_args(&mut c, "backup", "127.0.0.1:7394", &dir.join("b.txt"), 100);
    let mut b = Running::spawn("backup", &mut c)?;
    b.wait_for_stderr("backup listening", Duration::from_secs(20))?;
    let f = b.terminate(Duration::from_secs(5))?;
    ensure!(f.status.code().is_some(), "SIGTERM did not end it within 5 s (it was killed)");
    Ok(format!("ended with status {:?} in {:.1} s", code(&f), f.wall.as_secs_f64()))
}
