//! The `soak` suite (outside CI): many random failovers and re-protections of one protected
//! kvstore VM under client load, checking the pair's invariants all along.
//!
//! A 2-host topology; the backup on host 2 (10.99.0.2:7000), the primary on host 1. Then, for
//! the whole soak: ONE kv-checker connection (INCR and SET of unique keys, every acknowledged
//! SET read back at the end), a 10 ms PING loop on another connection (the longest gap around
//! each event), and redis-benchmark (`-t set,get`) restarted whenever it ends. Then the
//! events, each after a random gap (`--min-gap-ms`..`--max-gap-ms`, from `--seed`):
//! - **failover** (`--failovers` of them): SIGKILL of the live side; the backup must go live
//!   (its `takeover` event on GET /events; its status `failovers`), timed from the kill;
//! - **backup kill** (before a failover with probability `--backup-kill-percent`, at least one
//!   per soak): SIGKILL of the backup; the live side must say it is unprotected, and clients
//!   must notice nothing;
//!
//! and after each, a new backup on the host that has none (a new port each time: 7000 + n, so
//! that no address is reused while a socket of the last one may be in TIME_WAIT), brought in
//! by `ftvm ctl LIVE protect ADDR --json` (its time, pause and state shipped are recorded),
//! and the live side's status must say protected.
//!
//! Invariant violations are counted: a checker result with a reset, a counter gap, a lost SET
//! or an error; a broken PING or redis-benchmark connection; a takeover that did not happen; a
//! backup kill the live side did not notice; a failed re-protection; a status that does not
//! say protected; a process that exited unexpectedly; a backup that went live or halted while
//! its primary lived; a divergence reported by any side. Writes soak.{json,svg}; exits
//! non-zero when there was any violation. Every process's standard error is kept under
//! target/bench/soak/logs/.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use ftvm_api::Role;
use serde::Serialize;
use serde_json::Value;

use crate::common::{self, Common, Machine, Prepared, Running, Series};
use crate::kvstore::{Topology, GUEST_IP};
use crate::plot;
use crate::reprotect::{is_protected, max_of, mem_label, protect, wait_ping, PairEnv, Pinger, Protect, RedisBench, Vm};
use crate::table::Table;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Failovers (SIGKILL of the live side), each followed by a re-protection.
    #[arg(long, default_value_t = 10)]
    failovers: usize,
    /// Seed of the random gaps and choices (default: the time; printed, to replay a soak).
    #[arg(long)]
    seed: Option<u64>,
    /// Shortest random time between two events, ms.
    #[arg(long, default_value_t = 1500)]
    min_gap_ms: u64,
    /// Longest random time between two events, ms.
    #[arg(long, default_value_t = 4000)]
    max_gap_ms: u64,
    /// Chance, in percent, that a failover is preceded by a SIGKILL of the backup (and its
    /// re-protection); above 0, a soak has at least one.
    #[arg(long, default_value_t = 30)]
    backup_kill_percent: u64,
    /// Guest memory on every side.
    #[arg(long, default_value = "256M")]
    mem: String,
    /// Seconds the checker's connection runs (default: events x (max gap + 3 s) + 10 s; if
    /// the events take longer, a new checker follows it).
    #[arg(long)]
    checker_s: Option<u64>,
    /// `--timeout MS` for every side of the pair (default: ftvm's).
    #[arg(long)]
    timeout: Option<u64>,
    /// redis-benchmark clients of the background load.
    #[arg(long, default_value_t = 20)]
    clients: u32,
    /// Requests of each redis-benchmark run of the background load (restarted when it ends).
    #[arg(long, default_value_t = 20_000)]
    load_requests: u64,
    /// No background redis-benchmark load (the checker and the PING loop still run).
    #[arg(long)]
    no_load: bool,
    /// Size of each host's sparse raw disk, MiB (default: 128 + 8 per event). The guest's log
    /// grows with every SET (~0.4 MB/s under the default load) and refuses writes once the
    /// disk is full.
    #[arg(long)]
    disk_mib: Option<u64>,
    #[command(flatten)]
    net: common::NetArgs,
    /// The invariant checker (run from the repository root, or give its path).
    #[arg(long, default_value = "scripts/kv-checker.py")]
    checker: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    /// SIGKILL of the live side: a failover.
    Failover,
    /// SIGKILL of the backup: must go unnoticed by clients.
    BackupKill,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Failover => "failover",
            Kind::BackupKill => "backup kill",
        }
    }
}

/// splitmix64: small, seedable, good enough for gaps and coin flips.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in lo..=hi.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[derive(Debug, Serialize)]
struct Event {
    index: usize,
    kind: Kind,
    gap_ms: u64,
    /// Seconds since the pair was up, at the kill.
    at_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    killed: Option<String>,
    /// Failover: the VM that went live.
    #[serde(skip_serializing_if = "Option::is_none")]
    took_over: Option<String>,
    /// Failover: SIGKILL to the backup's `takeover` event.
    #[serde(skip_serializing_if = "Option::is_none")]
    takeover_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    takeover_line: Option<String>,
    /// Backup kill: SIGKILL to the live side saying it is unprotected.
    #[serde(skip_serializing_if = "Option::is_none")]
    unprotected_ms: Option<f64>,
    /// The longest time the PING loop went unanswered, from the kill to protected again.
    #[serde(skip_serializing_if = "Option::is_none")]
    ping_gap_ms: Option<f64>,
    /// The same during the `ftvm ctl protect` command alone (only the part of a gap inside it:
    /// an outage that began with the kill and lasted into it counts from the protect's start).
    #[serde(skip_serializing_if = "Option::is_none")]
    protect_ping_gap_ms: Option<f64>,
    /// When the successful `ftvm ctl protect` ran.
    #[serde(skip)]
    protect_span: Option<(Instant, Instant)>,
    /// The new backup's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    new_backup: Option<String>,
    /// Re-protection attempts (the last is the one that counted).
    protects: Vec<Protect>,
    protected_verified: bool,
    violations: Vec<String>,
}

impl Event {
    fn protect(&self) -> Option<&Protect> {
        self.protects.last().filter(|p| p.ok)
    }
}

#[derive(Debug, Serialize)]
struct CheckerSegment {
    started_s: f64,
    seconds: u64,
    ok: bool,
    result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct LoadStats {
    runs_completed: u64,
    /// The last result lines of each completed run ("SET: N requests per second, ...").
    results: Vec<String>,
    failures: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    suite: &'static str,
    machine: Machine,
    seed: u64,
    mem: String,
    disk_mib: u64,
    failovers_planned: usize,
    min_gap_ms: u64,
    max_gap_ms: u64,
    backup_kill_percent: u64,
    timeout_ms: Option<u64>,
    duration_s: f64,
    failovers_done: usize,
    backup_kills: usize,
    reprotections: usize,
    reprotect_attempts: usize,
    violations: Vec<String>,
    violation_count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    aborted: Option<String>,
    checker: Vec<CheckerSegment>,
    /// The longest time without a reply the checker saw (all segments).
    client_outage_ms: f64,
    ping_replies: usize,
    takeover_ms: Series,
    failover_ping_gap_ms: Series,
    backup_kill_ping_gap_ms: Series,
    protect_ms: Series,
    pause_ms: Series,
    shipped_mib: Series,
    protect_ping_gap_ms: Series,
    load: LoadStats,
    events: Vec<Event>,
}

struct Ctx<'a> {
    args: &'a Args,
    redis_benchmark: PathBuf,
    checker: PathBuf,
}

/// redis-benchmark `-t set,get`, restarted whenever it ends, in a thread; stopped on drop.
struct LoadLoop {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<LoadStats>>,
    thread: Option<JoinHandle<()>>,
}

impl LoadLoop {
    fn start(ctx: &Ctx, topo: &Topology) -> LoadLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let (s, st) = (stop.clone(), stats.clone());
        let rb = ctx.redis_benchmark.clone();
        let (c, n) = (ctx.args.clients.to_string(), ctx.args.load_requests.to_string());
        let client = topo.client();
        let limit = Duration::from_secs(120 + ctx.args.load_requests / 200);
        let thread = std::thread::spawn(move || {
            let stopped = || s.load(Ordering::SeqCst) || common::check_interrupted().is_err();
            while !stopped() {
                let mut bench = match RedisBench::spawn(&rb, &client, &["-t", "set,get", "-c", &c, "-n", &n, "-q"]) {
                    Ok(b) => b,
                    Err(e) => {
                        if !stopped() {
                            st.lock().unwrap().failures.push(format!("cannot start redis-benchmark: {e:#}"));
                        }
                        return;
                    }
                };
                loop {
                    std::thread::sleep(Duration::from_millis(50));
                    if stopped() {
                        return; // dropping `bench` kills it: not a failure
                    }
                    match bench.try_wait() {
                        Ok(Some(status)) => {
                            let summary = bench.summary();
                            let mut st = st.lock().unwrap();
                            if !status.success() || summary.iter().any(|l| l.contains("rror")) {
                                st.failures.push(format!("redis-benchmark ({status}): {}", summary.join("; ")));
                            } else {
                                st.runs_completed += 1;
                                st.results = summary;
                            }
                            break;
                        }
                        Ok(None) if bench.started.elapsed() > limit => {
                            st.lock().unwrap().failures.push(format!(
                                "a redis-benchmark run hung (more than {} s): {}",
                                limit.as_secs(),
                                bench.summary().join("; ")
                            ));
                            break;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            st.lock().unwrap().failures.push(format!("waiting for redis-benchmark: {e:#}"));
                            break;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        LoadLoop { stop, stats, thread: Some(thread) }
    }

    fn stop(mut self) -> LoadStats {
        self.halt();
        std::mem::take(&mut *self.stats.lock().unwrap())
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LoadLoop {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Where the soak stands: the live VM, its backup, what was found.
struct State<'a> {
    ctx: &'a Ctx<'a>,
    env: &'a PairEnv,
    topo: &'a Topology,
    /// Declared before `live`: on an error the backup is killed first (a backup that
    /// outlived its primary would go live).
    backup: Option<Vm>,
    live: Option<Vm>,
    next_port: u16,
    /// The standard error of every process that ended, by label.
    logs: Vec<(String, String)>,
    soak_start: Instant,
}

impl State<'_> {
    fn ftvm(&self) -> &Path {
        &self.env.ftvm
    }

    fn keep_log(&mut self, label: String, stderr: String) {
        self.logs.push((label, stderr));
    }

    /// A new backup on the host the live VM is not on, brought in by `ftvm ctl protect`
    /// (two attempts, each failure a violation).
    fn reprotect(&mut self, ev: &mut Event) -> Result<()> {
        let (live_host, live_sock) = {
            let live = self.live.as_ref().context("no live VM")?;
            (live.host, live.sock.clone())
        };
        let host = 3 - live_host;
        for attempt in 1..=2 {
            let port = self.next_port;
            self.next_port += 1;
            let b = match self.env.start_backup(self.topo, host, port) {
                Ok(b) => b,
                Err(e) => {
                    common::check_interrupted()?;
                    violation(ev, format!("a new backup on h{host} (port {port}) did not start: {e:#}"));
                    continue;
                }
            };
            let addr = b.listen.clone().unwrap_or_default();
            ev.new_backup = Some(addr.clone());
            let t0 = Instant::now();
            let p = protect(self.ftvm(), &live_sock, &addr)?;
            let t1 = Instant::now();
            if !p.ok {
                violation(ev, format!("re-protection by {addr} (attempt {attempt}): {}", p.describe()));
                ev.protects.push(p);
                let f = b.proc.kill()?;
                self.keep_log(format!("backup #{} on h{host} (failed protect)", b.id), f.stderr);
                continue;
            }
            ev.protects.push(p);
            ev.protect_span = Some((t0, t1));
            ev.protected_verified = is_protected(self.ftvm(), &live_sock);
            if !ev.protected_verified {
                violation(ev, format!("after protect by {addr}, the live VM's status does not say protected"));
            }
            self.backup = Some(b);
            return Ok(());
        }
        Ok(())
    }
}

fn violation(ev: &mut Event, what: String) {
    eprintln!("  VIOLATION (event {}): {what}", ev.index);
    ev.violations.push(what);
}

pub fn run(common: &Common, args: &Args) -> Result<()> {
    let redis_benchmark = common::kvstore_network_suite(common, "soak", &args.net)?;
    common::which(Path::new("redis-cli"), "install Debian's redis-tools (apt-get install redis-tools)")?;
    common::which(Path::new("python3"), "install python3")?;
    common::require_file(&args.checker, "kv-checker.py", "run from the repository root or pass --checker")?;
    if args.failovers == 0 {
        bail!("--failovers must be at least 1");
    }
    if args.min_gap_ms > args.max_gap_ms {
        bail!("--min-gap-ms ({}) is above --max-gap-ms ({})", args.min_gap_ms, args.max_gap_ms);
    }
    let mib = ftvm_api::parse_mem_mib(&args.mem).map_err(anyhow::Error::msg)?;
    let seed = args
        .seed
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    let mut rng = Rng(seed);
    let mut plan = Vec::new();
    for _ in 0..args.failovers {
        if rng.range(0, 99) < args.backup_kill_percent {
            plan.push((Kind::BackupKill, rng.range(args.min_gap_ms, args.max_gap_ms)));
        }
        plan.push((Kind::Failover, rng.range(args.min_gap_ms, args.max_gap_ms)));
    }
    // A short soak may draw no backup kill at all: then one goes before a random failover.
    if args.backup_kill_percent > 0 && !plan.iter().any(|(k, _)| *k == Kind::BackupKill) {
        let at = rng.range(0, plan.len() as u64 - 1) as usize;
        plan.insert(at, (Kind::BackupKill, rng.range(args.min_gap_ms, args.max_gap_ms)));
    }

    let Prepared { common, machine, images, work } = common.prepare("soak", &["kvstore"], false)?;
    let common = &common;
    let logs_dir = work.join("logs");
    let _ = std::fs::remove_dir_all(&logs_dir);
    std::fs::create_dir_all(&logs_dir)?;
    let ctx = Ctx { args, redis_benchmark, checker: std::fs::canonicalize(&args.checker)? };
    let backup_kills = plan.iter().filter(|(k, _)| *k == Kind::BackupKill).count();
    eprintln!(
        "soak: seed {seed} (rerun with --seed {seed}): {} failovers and {backup_kills} backup kills, {}..{} ms apart, {} guests",
        args.failovers,
        args.min_gap_ms,
        args.max_gap_ms,
        mem_label(mib)
    );

    let disk_mib = args.disk_mib.unwrap_or(128 + 8 * plan.len() as u64);
    // Declared first, so that it is dropped (the topology torn down) after every VM.
    let topo = Topology::up(&args.net.topology, 2)?;
    let env = PairEnv::new(
        std::fs::canonicalize(&common.ftvm)?,
        images["kvstore"].clone(),
        format!("ip={GUEST_IP}/24"),
        args.mem.clone(),
        work.clone(),
        disk_mib,
        args.timeout,
    )?;
    let mut state = State {
        ctx: &ctx,
        env: &env,
        topo: &topo,
        backup: None,
        live: None,
        next_port: 7001,
        logs: Vec::new(),
        soak_start: Instant::now(),
    };
    let outcome = soak(&mut state, &plan);
    // Whatever happened: stop the VMs (the backup first), keep their logs.
    if let Some(b) = state.backup.take() {
        let label = b.label();
        if let Ok(f) = b.proc.terminate(Duration::from_secs(10)) {
            state.keep_log(label, f.stderr);
        }
    }
    if let Some(l) = state.live.take() {
        let label = l.label();
        if let Ok(f) = l.proc.terminate(Duration::from_secs(10)) {
            state.keep_log(label, f.stderr);
        }
    }
    env.remove_sockets();
    for (i, (label, text)) in state.logs.iter().enumerate() {
        let name = format!("{i:02}-{}.stderr.txt", label.replace([' ', '#'], "_"));
        let _ = std::fs::write(logs_dir.join(name), text);
    }
    let mut outcome = outcome?;

    // Divergences reported by any side: the kvstore guest is deterministic, so each one is a bug.
    for (label, text) in &state.logs {
        for line in text.lines().filter(|l| l.to_lowercase().contains("diverge")) {
            outcome.violations.push(format!("{label}: {}", line.trim()));
        }
    }
    let events = std::mem::take(&mut outcome.events);
    let mut violations = std::mem::take(&mut outcome.violations);
    for ev in &events {
        for v in &ev.violations {
            violations.push(format!("event {} ({}): {v}", ev.index, ev.kind.label()));
        }
    }
    let mut takeover = Series::default();
    let mut fo_gap = Series::default();
    let mut bk_gap = Series::default();
    let mut protect_ms = Series::default();
    let mut pause = Series::default();
    let mut shipped = Series::default();
    let mut p_gap = Series::default();
    for ev in &events {
        if let Some(t) = ev.takeover_ms {
            takeover.push(t);
        }
        if let Some(g) = ev.ping_gap_ms {
            match ev.kind {
                Kind::Failover => fo_gap.push(g),
                Kind::BackupKill => bk_gap.push(g),
            }
        }
        if let Some(p) = ev.protect() {
            protect_ms.push(p.time_ms());
            pause.push(p.pause_ms.unwrap_or(f64::NAN));
            shipped.push(p.shipped_bytes as f64 / 1048576.0);
        }
        if let Some(g) = ev.protect_ping_gap_ms {
            p_gap.push(g);
        }
    }
    let client_outage_ms = outcome
        .checker
        .iter()
        .filter_map(|s| s.result.as_ref().and_then(|r| r["outage_ms"].as_f64()))
        .fold(f64::NAN, f64::max);
    let report = Report {
        suite: "soak",
        machine,
        seed,
        mem: args.mem.clone(),
        disk_mib,
        failovers_planned: args.failovers,
        min_gap_ms: args.min_gap_ms,
        max_gap_ms: args.max_gap_ms,
        backup_kill_percent: args.backup_kill_percent,
        timeout_ms: args.timeout,
        duration_s: outcome.duration_s,
        failovers_done: events.iter().filter(|e| e.kind == Kind::Failover && e.takeover_ms.is_some()).count(),
        backup_kills: events.iter().filter(|e| e.kind == Kind::BackupKill && e.killed.is_some()).count(),
        reprotections: events.iter().filter(|e| e.protect().is_some()).count(),
        reprotect_attempts: events.iter().map(|e| e.protects.len()).sum(),
        violation_count: violations.len(),
        violations,
        aborted: outcome.aborted,
        checker: outcome.checker,
        client_outage_ms,
        ping_replies: outcome.ping_replies,
        takeover_ms: takeover,
        failover_ping_gap_ms: fo_gap,
        backup_kill_ping_gap_ms: bk_gap,
        protect_ms,
        pause_ms: pause,
        shipped_mib: shipped,
        protect_ping_gap_ms: p_gap,
        load: outcome.load,
        events,
    };
    let labels: Vec<(String, f64)> = report
        .events
        .iter()
        .flat_map(|e| {
            let mut v = Vec::new();
            if let Some(g) = e.ping_gap_ms {
                v.push((format!("#{} {}: longest PING gap, s", e.index, e.kind.label()), g / 1e3));
            }
            if let Some(p) = e.protect() {
                v.push((format!("#{} re-protection, s", e.index), p.time_ms() / 1e3));
            }
            v
        })
        .collect();
    let bars: Vec<plot::Bar> = labels.iter().map(|(l, v)| plot::Bar { label: l, value: *v, goal: None }).collect();
    let svg = plot::bars("ftvm soak: per event, the clients' longest PING gap and the re-protection time (s)", &bars);
    let json = common::publish(&common.out, "soak", &report, &svg, print_table)?;
    println!("process logs in {}", logs_dir.display());
    if report.violation_count > 0 {
        bail!(
            "{} invariant violation(s) (goal: 0); see above and {} (the disks are kept in {})",
            report.violation_count,
            json.display(),
            work.display()
        );
    }
    let _ = std::fs::remove_file(env.disk(1));
    let _ = std::fs::remove_file(env.disk(2));
    Ok(())
}

/// What the soak found, before the report.
struct Outcome {
    events: Vec<Event>,
    violations: Vec<String>,
    aborted: Option<String>,
    checker: Vec<CheckerSegment>,
    ping_replies: usize,
    load: LoadStats,
    duration_s: f64,
}

/// The checker's run for `events` events: events x (max gap + 3 s) + 10 s.
fn checker_estimate(args: &Args, events: usize) -> u64 {
    events as u64 * (args.max_gap_ms + 3000).div_ceil(1000) + 10
}

fn spawn_checker(ctx: &Ctx, topo: &Topology, seconds: u64) -> Result<Running> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &topo.client(), "python3"]).arg(&ctx.checker);
    cmd.args([GUEST_IP, "6379", &seconds.to_string()]);
    Running::spawn("kv-checker", &mut cmd)
}

fn checker_segment(f: &common::Finished, started_s: f64, seconds: u64) -> CheckerSegment {
    let line = f.stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or_default();
    let result: Option<Value> = serde_json::from_str(line).ok();
    CheckerSegment {
        started_s,
        seconds,
        ok: f.status.success() && result.is_some(),
        output: if result.is_some() { None } else { Some(f.describe()) },
        result,
    }
}

/// The checker's verdict on one segment, as violations.
fn checker_violations(s: &CheckerSegment) -> Vec<String> {
    let mut v = Vec::new();
    let Some(r) = &s.result else {
        return vec![format!("the checker printed no result: {}", s.output.as_deref().unwrap_or_default())];
    };
    if r["reset"] == true {
        v.push(format!("the checker's connection was reset: {}", r["errors"]));
    }
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    if n("counter_gaps") > 0 {
        v.push(format!("the checker saw {} counter gap(s)", n("counter_gaps")));
    }
    if n("lost_sets") > 0 {
        v.push(format!("the checker lost {} acknowledged SET(s)", n("lost_sets")));
    }
    if r["reset"] != true && r["errors"].as_array().is_some_and(|a| !a.is_empty()) {
        v.push(format!("the checker saw errors: {}", r["errors"]));
    }
    if v.is_empty() && !s.ok {
        v.push(format!("the checker exited non-zero: {r}"));
    }
    v
}

fn soak(st: &mut State, plan: &[(Kind, u64)]) -> Result<Outcome> {
    let ctx = st.ctx;
    let args = ctx.args;
    st.env.blank_disk(1)?;
    st.env.blank_disk(2)?;
    let backup = st.env.start_backup(st.topo, 2, 7000)?;
    let addr = backup.listen.clone().unwrap_or_default();
    st.backup = Some(backup);
    st.live = Some(st.env.start_primary(st.topo, 1, &addr)?);
    wait_ping(st.topo, Duration::from_secs(30))?;
    eprintln!("pair up: primary on h1, backup on h2 ({addr})");
    st.soak_start = Instant::now();

    let checker_s = args.checker_s.unwrap_or_else(|| checker_estimate(args, plan.len()));
    let mut checker = Some((spawn_checker(ctx, st.topo, checker_s)?, 0.0, checker_s));
    let mut segments = Vec::new();
    let mut violations = Vec::new();
    common::sleep(Duration::from_millis(300))?;
    let pinger = Pinger::start(st.topo, Duration::from_millis(10))?;
    let load = if args.no_load { None } else { Some(LoadLoop::start(ctx, st.topo)) };
    let mut events = Vec::new();
    let mut aborted = None;

    for (i, &(kind, gap_ms)) in plan.iter().enumerate() {
        let mut ev = Event {
            index: i + 1,
            kind,
            gap_ms,
            at_s: 0.0,
            killed: None,
            took_over: None,
            takeover_ms: None,
            takeover_line: None,
            unprotected_ms: None,
            ping_gap_ms: None,
            protect_ping_gap_ms: None,
            protect_span: None,
            new_backup: None,
            protects: Vec::new(),
            protected_verified: false,
            violations: Vec::new(),
        };
        let r = event(st, &mut ev, &pinger, &mut checker, &mut segments, plan.len() - i);
        let stop = match r {
            Ok(go_on) => !go_on,
            Err(e) => {
                common::check_interrupted()?;
                violation(&mut ev, format!("soak stopped: {e:#}"));
                true
            }
        };
        progress(&ev);
        events.push(ev);
        if stop {
            aborted = Some(format!("stopped after event {} of {}", i + 1, plan.len()));
            break;
        }
    }

    // The end: the load stops, the checker finishes its run and reads back every SET.
    let load = load.map(LoadLoop::stop).unwrap_or_default();
    for f in &load.failures {
        violations.push(format!("load: {f}"));
    }
    if let Some((c, started_s, secs)) = checker.take() {
        let left = (started_s + secs as f64 - st.soak_start.elapsed().as_secs_f64()).max(0.0);
        eprintln!("waiting for the checker ({left:.0} s of its run left, then it reads back every SET)");
        match c.finish(Duration::from_secs_f64(left + 600.0)) {
            Ok(f) => segments.push(checker_segment(&f, started_s, secs)),
            Err(e) => {
                common::check_interrupted()?;
                violations.push(format!("the checker: {e:#}"));
            }
        }
    }
    for s in &segments {
        violations.extend(checker_violations(s));
    }
    for (_, e) in pinger.errors() {
        violations.push(e);
    }
    let ping_replies = pinger.replies();
    drop(pinger);
    // Both sides must still run, and the VM be protected.
    if let Some(live) = st.live.as_mut() {
        if live.proc.has_exited()? {
            violations.push(format!("{} exited unexpectedly: {}", live.label(), tail(&live.proc.stderr_text())));
        } else if st.backup.is_some() && !is_protected(&st.env.ftvm, &live.sock) {
            violations.push(format!("at the end, {} does not say protected", live.label()));
        }
    }
    if let Some(b) = st.backup.as_mut() {
        if b.proc.has_exited()? {
            violations.push(format!("{} exited unexpectedly: {}", b.label(), tail(&b.proc.stderr_text())));
        }
    }
    Ok(Outcome {
        events,
        violations,
        aborted,
        checker: segments,
        ping_replies,
        load,
        duration_s: st.soak_start.elapsed().as_secs_f64(),
    })
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(6)..].join(" | ")
}

/// Sleeps `d`, watching both sides: returns early if one of them exits.
fn sleep_watching(st: &mut State, d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        common::sleep((end - Instant::now()).min(Duration::from_millis(50)))?;
        for vm in [st.live.as_mut(), st.backup.as_mut()].into_iter().flatten() {
            if vm.proc.has_exited()? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// One event and the re-protection after it. Returns whether the soak can go on.
fn event(
    st: &mut State,
    ev: &mut Event,
    pinger: &Pinger,
    checker: &mut Option<(Running, f64, u64)>,
    segments: &mut Vec<CheckerSegment>,
    remaining: usize,
) -> Result<bool> {
    sleep_watching(st, Duration::from_millis(ev.gap_ms))?;

    // A checker whose run ended before the events did: keep its result, start another.
    if let Some((c, _, _)) = checker.as_mut() {
        if c.has_exited()? {
            let (c, started_s, secs) = checker.take().unwrap_or_else(|| unreachable!());
            let f = c.finish(Duration::from_secs(5))?;
            segments.push(checker_segment(&f, started_s, secs));
            let now = st.soak_start.elapsed().as_secs_f64();
            let secs = st.ctx.args.checker_s.unwrap_or_else(|| checker_estimate(st.ctx.args, remaining));
            eprintln!("  the checker's run ended; a new checker for {secs} s");
            *checker = Some((spawn_checker(st.ctx, st.topo, secs)?, now, secs));
        }
    }

    // Check the sides before touching them.
    let live_exited = match st.live.as_mut() {
        Some(l) => l.proc.has_exited()?,
        None => true,
    };
    if let Some(b) = st.backup.as_mut() {
        if !live_exited && b.events.count("takeover") > 0 {
            violation(ev, format!("{} went live while its primary lived (two live sides?)", b.label()));
        }
        if let Some(halt) = b.events.of("halt", |_| true).first() {
            violation(ev, format!("{} halted: {}", b.label(), halt.message()));
        }
        if b.proc.has_exited()? {
            let b = st.backup.take().unwrap_or_else(|| unreachable!());
            violation(ev, format!("{} exited unexpectedly: {}", b.label(), tail(&b.proc.stderr_text())));
            let label = b.label();
            let f = b.proc.kill()?;
            st.keep_log(label, f.stderr);
        }
    }
    if live_exited {
        let l = st.live.take().context("no live VM")?;
        violation(ev, format!("{} (live) exited unexpectedly: {}", l.label(), tail(&l.proc.stderr_text())));
        let label = l.label();
        let f = l.proc.kill()?;
        st.keep_log(label, f.stderr);
        let mut survivor = st.backup.take();
        let took_over = match survivor.as_mut() {
            Some(b) => wait_takeover(b, Duration::from_secs(15))?.is_some(),
            None => false,
        };
        if !took_over {
            st.backup = survivor;
            violation(ev, "no live VM left".into());
            return Ok(false);
        }
        st.live = survivor;
    }
    if st.backup.is_none() {
        violation(ev, "no backup before the event (the last re-protection failed); re-protecting first".into());
        st.reprotect(ev)?;
        if st.backup.is_none() {
            violation(ev, "no backup to fail over to".into());
            return Ok(false);
        }
    }
    let (live_sock, live_label) = {
        let l = st.live.as_ref().context("no live VM")?;
        (l.sock.clone(), l.label())
    };
    if !is_protected(&st.env.ftvm, &live_sock) {
        violation(ev, format!("{live_label} was not protected before the event"));
    }

    let t_kill = Instant::now();
    let t_kill_wall = SystemTime::now();
    ev.at_s = st.soak_start.elapsed().as_secs_f64();
    match ev.kind {
        Kind::Failover => {
            let mut survivor = st.backup.take().context("no backup")?;
            let dead = st.live.take().context("no live VM")?;
            ev.killed = Some(format!("live #{} on h{}", dead.id, dead.host));
            let f = dead.proc.kill()?;
            st.keep_log(ev.killed.clone().unwrap_or_default(), f.stderr);
            let Some(takeover) = wait_takeover(&mut survivor, Duration::from_secs(15))? else {
                let label = survivor.label();
                let err = survivor.proc.stderr_text();
                violation(ev, format!("{label} did not take over within 15 s: {}", tail(&err)));
                let f = survivor.proc.kill()?;
                st.keep_log(label, f.stderr);
                return Ok(false);
            };
            ev.takeover_ms = Some(takeover.ms_after(t_kill_wall));
            ev.takeover_line = Some(takeover.message());
            ev.took_over = Some(survivor.label());
            match common::ctl_status(&st.env.ftvm, &survivor.sock) {
                Ok(s) => {
                    let (role, failovers) = (s.role.as_str(), s.pair.map(|p| p.failovers));
                    if s.role != Role::BackupLive || failovers.unwrap_or(0) < 1 {
                        violation(
                            ev,
                            format!("after TAKEOVER, {} says role {role}, failovers {failovers:?}", survivor.label()),
                        );
                    }
                }
                Err(e) => {
                    violation(ev, format!("{} does not answer its status after TAKEOVER: {e:#}", survivor.label()))
                }
            }
            st.live = Some(survivor);
        }
        Kind::BackupKill => {
            let b = st.backup.take().context("no backup")?;
            let n0 = st.live.as_ref().context("no live VM")?.events.count("backup_lost");
            ev.killed = Some(b.label());
            let f = b.proc.kill()?;
            st.keep_log(ev.killed.clone().unwrap_or_default(), f.stderr);
            let ftvm = st.env.ftvm.clone();
            let live = st.live.as_ref().context("no live VM")?;
            let seen = live.events.wait_for("backup_lost", n0, Duration::from_secs(10), |_| true, || Ok(false))?;
            match seen {
                Some(lost) => ev.unprotected_ms = Some(lost.ms_after(t_kill_wall)),
                None => violation(
                    ev,
                    format!("{live_label} reported no backup_lost event within 10 s of the backup's SIGKILL"),
                ),
            }
            if is_protected(&ftvm, &live.sock) {
                violation(ev, format!("{live_label}'s status still says protected after the backup's SIGKILL"));
            }
        }
    }

    st.reprotect(ev)?;
    let p1 = Instant::now();
    if let (Some(_), Some((a, b))) = (ev.protect(), ev.protect_span) {
        ev.protect_ping_gap_ms = Some(pinger.max_gap_within_ms(a, b));
    }
    ev.ping_gap_ms = Some(pinger.max_gap_ms(t_kill, p1));
    Ok(true)
}

/// Waits for the takeover event of `vm`; None if it exits first or `timeout` passes.
fn wait_takeover(vm: &mut Vm, timeout: Duration) -> Result<Option<common::SideEvent>> {
    let Vm { events, proc, .. } = vm;
    events.wait_for("takeover", 0, timeout, |_| true, || proc.has_exited())
}

fn progress(ev: &Event) {
    let mut s = format!("event {:>2} {:<11} after {:>4} ms:", ev.index, ev.kind.label(), ev.gap_ms);
    if let Some(k) = &ev.killed {
        s += &format!(" SIGKILL {k};");
    }
    if let (Some(t), Some(who)) = (ev.takeover_ms, &ev.took_over) {
        s += &format!(" {who} live {t:.0} ms after;");
    }
    if let Some(u) = ev.unprotected_ms {
        s += &format!(" unprotected noticed {u:.0} ms after;");
    }
    if let Some(g) = ev.ping_gap_ms {
        s += &format!(" longest PING gap {g:.0} ms;");
    }
    match (ev.protect(), &ev.new_backup) {
        (Some(p), Some(b)) => s += &format!(" {b}: {}", p.describe()),
        _ => s += " NOT re-protected",
    }
    if !ev.violations.is_empty() {
        s += &format!(" [{} violation(s)]", ev.violations.len());
    }
    eprintln!("{s}");
}

fn print_table(r: &Report) {
    r.machine.print(&format!(
        "{} failovers planned, seed {}, {}..{} ms apart, backup kills {}%",
        r.failovers_planned, r.seed, r.min_gap_ms, r.max_gap_ms, r.backup_kill_percent
    ));
    let mut t = Table::new().right("#", 3).left("event", 11).left("SIGKILL", 18).left("went live", 18);
    t = t.right("live ms", 9).right("gap ms", 9).left("new backup", 17).right("protect ms", 10);
    t = t.right("pause ms", 9).right("MiB", 8).right("p.gap ms", 9).right("viol.", 5);
    let o = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
    for e in &r.events {
        let p = e.protect();
        t.row([
            e.index.to_string(),
            e.kind.label().to_string(),
            e.killed.as_deref().unwrap_or("-").to_string(),
            e.took_over
                .as_deref()
                .unwrap_or(if e.kind == Kind::BackupKill { "(no failover)" } else { "NONE" })
                .to_string(),
            o(e.takeover_ms.or(e.unprotected_ms), 0),
            o(e.ping_gap_ms, 0),
            e.new_backup.as_deref().unwrap_or("-").to_string(),
            o(p.map(|p| p.time_ms()), 0),
            o(p.and_then(|p| p.pause_ms), 2),
            o(p.map(|p| p.shipped_bytes as f64 / 1048576.0), 1),
            o(e.protect_ping_gap_ms, 0),
            e.violations.len().to_string(),
        ]);
    }
    t.print();
    println!(
        "(live ms: SIGKILL to the backup's takeover event; for a backup kill, to the live side's backup_lost event)"
    );
    println!("(gap ms: the longest time a 10 ms PING loop on its own connection went unanswered, kill to protected again; p.gap: during the protect)\n");
    let mm = |s: &Series, p: usize| {
        if s.samples.is_empty() {
            "-".to_string()
        } else {
            format!("median {:.p$}, max {:.p$}", s.median, max_of(s))
        }
    };
    println!("soak: {:.0} s, {} guests, {} MiB sparse disks", r.duration_s, r.mem, r.disk_mib);
    println!("failovers done:     {} of {}", r.failovers_done, r.failovers_planned);
    println!("backup kills:       {}", r.backup_kills);
    println!("re-protections:     {} ({} attempts)", r.reprotections, r.reprotect_attempts);
    println!("violations:         {} (goal: 0)", r.violation_count);
    if let Some(a) = &r.aborted {
        println!("ABORTED:            {a}");
    }
    for (i, s) in r.checker.iter().enumerate() {
        let res = s.result.as_ref().map_or("no result".to_string(), |v| v.to_string());
        println!("checker {} ({} s from {:.0} s, one connection): {res}", i + 1, s.seconds, s.started_s);
    }
    println!("client outage (kv-checker's outage_ms): {:.0} ms", r.client_outage_ms);
    println!("PING gap, failovers:    {} ms", mm(&r.failover_ping_gap_ms, 0));
    println!("PING gap, backup kills: {} ms", mm(&r.backup_kill_ping_gap_ms, 0));
    println!("kill to TAKEOVER:       {} ms", mm(&r.takeover_ms, 0));
    println!("time to protected:      {} ms", mm(&r.protect_ms, 0));
    println!("guest pause at the cut: {} ms", mm(&r.pause_ms, 2));
    println!("state shipped:          {} MiB", mm(&r.shipped_mib, 1));
    println!("PING gap during protect: {} ms", mm(&r.protect_ping_gap_ms, 0));
    println!(
        "load: {} redis-benchmark runs completed, {} failed{}",
        r.load.runs_completed,
        r.load.failures.len(),
        if r.load.results.is_empty() { String::new() } else { format!("; last: {}", r.load.results.join("; ")) }
    );
    println!("PING loop: {} replies", r.ping_replies);
    for v in &r.violations {
        println!("VIOLATION: {v}");
    }
}
