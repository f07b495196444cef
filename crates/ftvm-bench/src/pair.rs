//! The `pair` suite (issue 5, benchmarks): the kvstore guest under redis-benchmark, protected
//! by a fault-tolerant pair (`ftvm primary` on host 1, `ftvm backup` on host 2 of a 2-host
//! topology, log over rep0) against the same VM unprotected (`ftvm run` on host 1), sessions
//! alternating. Also the log bandwidth of the protected runs (from the primary's control API,
//! `log.bytes` before and after each benchmark) and the client-observed outage when the
//! primary is SIGKILLed under `scripts/kv-checker.py`. Writes pair.{json,svg}.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::common::{self, Common, Machine, Prepared, Ratio, Running, Series};
use crate::kvstore::{Topology, GUEST_IP, READY};
use crate::pingpong::{self, Rtt};
use crate::plot;
use crate::redis_bench::{self, Bench};
use crate::table::{self, Table};

/// The backup's address on the replication link (host 2's rep0).
const BACKUP_IP: &str = "10.99.0.2";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Client counts (redis-benchmark -c), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,20,50")]
    clients: Vec<u32>,
    /// Requests per redis-benchmark run (one test, SET or GET) with several clients.
    #[arg(long, default_value_t = 10_000)]
    requests: u64,
    /// Requests per run with one client.
    #[arg(long, default_value_t = 5_000)]
    requests_single: u64,
    #[command(flatten)]
    net: common::NetArgs,
    /// The failover checker (run from the repository root, or give its path).
    #[arg(long, default_value = "scripts/kv-checker.py")]
    checker: PathBuf,
    /// Size of each VM's fresh blank raw disk, MiB.
    #[arg(long, default_value_t = 64)]
    disk_mib: u64,
    /// Seconds the checker runs; the primary is killed `--kill-after` seconds in.
    #[arg(long, default_value_t = 8)]
    checker_s: u64,
    /// Seconds into the checker's run at which the primary gets SIGKILL.
    #[arg(long, default_value_t = 3.0)]
    kill_after: f64,
    /// Seconds of idle time over which the idle log bandwidth is measured.
    #[arg(long, default_value_t = 2.0)]
    idle_s: f64,
    /// Skip the failover measurement.
    #[arg(long)]
    no_failover: bool,
    /// Pin the VMs to CPUs, as two hosts would give each side its own: the unprotected VM and
    /// the primary on CPU 0, the backup and the clients (this bench and what it starts) on
    /// CPU 1. The primary then has exactly the unprotected VM's CPU, and the backup competes
    /// with the clients instead of with the primary.
    #[arg(long)]
    pin: bool,
    /// Also run a third mode, the pair with the backup's replay paused while each benchmark
    /// runs (resumed, and caught up, between them; the primary's lag bound off). The backup
    /// still receives, verifies and acknowledges the log, and would go live after replaying
    /// what it holds: what the pair costs when the backup's replay does not compete for this
    /// machine's CPUs, as it would not on a host of its own.
    #[arg(long)]
    paused_replay: bool,
    /// With `--paused-replay`, a fourth mode, paused-untimed: the same with the stage timing
    /// of the output's path off (`FTVM_STAGE_TIMES=0` on both sides), side by side, to show
    /// what measuring the stages costs.
    #[arg(long)]
    untimed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    /// `ftvm run` on host 1.
    Unprotected,
    /// `ftvm primary` on host 1, `ftvm backup` on host 2.
    Protected,
    /// The same, with the backup's replay paused during each benchmark (`--paused-replay`).
    PausedReplay,
    /// Paused-replay with the stages of the hold not timed (`--untimed`).
    PausedUntimed,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Unprotected => "unprotected",
            Mode::Protected => "protected",
            Mode::PausedReplay => "paused-replay",
            Mode::PausedUntimed => "paused-untimed",
        }
    }

    fn paused(self) -> bool {
        matches!(self, Mode::PausedReplay | Mode::PausedUntimed)
    }

    fn protected(self) -> bool {
        self != Mode::Unprotected
    }
}

/// One redis-benchmark run and, protected, the log the primary sent meanwhile.
#[derive(Debug, Serialize)]
struct PairBench {
    #[serde(flatten)]
    bench: Bench,
    /// CPU time (user + system) the VM process used per 1000 requests: `ftvm run`, or the
    /// primary.
    vm_cpu_ms_per_1k: f64,
    /// The same for the backup (protected).
    #[serde(skip_serializing_if = "Option::is_none")]
    backup_cpu_ms_per_1k: Option<f64>,
    /// The same by thread of the backup (by thread name; `/proc/PID/task`, 10 ms ticks).
    #[serde(skip_serializing_if = "Option::is_none")]
    backup_threads_ms_per_1k: Option<std::collections::BTreeMap<String, f64>>,
    /// CPU time the whole machine used per 1000 requests (every CPU's non-idle time from
    /// `/proc/stat`: the VMs, the clients, the network in the kernel).
    machine_cpu_ms_per_1k: f64,
    /// Share of the machine's CPU time left idle during redis-benchmark's run.
    machine_idle: f64,
    /// Protected: the mean time an output was held for its acknowledgement, in µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    hold_us: Option<f64>,
    /// Protected: the hold of the outputs of this run, stage by stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    stages: Option<ftvm_api::OutputStages>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_mbit_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_bytes_per_request: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Failover {
    /// The checker's JSON line (ops, errors, reset, counter_gaps, lost_sets, outage_ms).
    checker: serde_json::Value,
    outage_ms: f64,
    /// The checker exited 0: no reset, no counter gap, no lost SET.
    invariants_held: bool,
    /// The backup's TAKEOVER line.
    #[serde(skip_serializing_if = "Option::is_none")]
    takeover: Option<String>,
}

#[derive(Debug, Serialize)]
struct Session {
    mode: Mode,
    rep: usize,
    boot_to_ready_s: f64,
    benches: Vec<PairBench>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_log_mbit_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failover: Option<Failover>,
}

/// Medians over sessions for one (test, clients, mode).
#[derive(Debug, Serialize)]
struct Cell {
    test: String,
    clients: u32,
    mode: Mode,
    rps: Series,
    p50_ms: Series,
    p99_ms: Series,
    vm_cpu_ms_per_1k: Series,
    #[serde(skip_serializing_if = "Option::is_none")]
    backup_cpu_ms_per_1k: Option<Series>,
    machine_cpu_ms_per_1k: Series,
    machine_idle: Series,
    #[serde(skip_serializing_if = "Option::is_none")]
    hold_us: Option<Series>,
    /// The whole hold, then each stage (medians over sessions of each run's figures).
    stages: Vec<StageCell>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_mbit_s: Option<Series>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_bytes_per_request: Option<Series>,
}

/// One stage of the hold (or the whole hold) over a cell's sessions.
#[derive(Debug, Serialize)]
struct StageCell {
    name: String,
    /// Outputs counted per session.
    count: Series,
    mean_us: Series,
    p50_us: Series,
    p99_us: Series,
}

#[derive(Debug, Serialize)]
struct Report {
    suite: &'static str,
    machine: Machine,
    runs: usize,
    redis_benchmark: String,
    guest_cmdline: String,
    disk_mib: u64,
    pinned: bool,
    cells: Vec<Cell>,
    ratios: Vec<Ratio>,
    /// The replication link's round trip (the ping-pong of `pingpong.rs`), before and after
    /// the pair's runs.
    link_rtt: Vec<Rtt>,
    /// Each protected cell's hold against the link's round trip: mean hold / p50 RTT (goal
    /// <= 1.5) and p99 hold / p99 RTT (goal <= 3), the RTT the median of the measurements.
    hold_ratios: Vec<Ratio>,
    idle_log_mbit_s: Series,
    outage_ms: Series,
    invariants_held: Vec<bool>,
    sessions: Vec<Session>,
}

struct Ctx<'a> {
    args: &'a Args,
    redis_benchmark: PathBuf,
    checker: PathBuf,
    ftvm: PathBuf,
    kernel: PathBuf,
    work: PathBuf,
    cmdline: String,
    /// The machine's CPUs.
    cores: f64,
}

pub fn run(common: &Common, args: &Args) -> Result<()> {
    let redis_benchmark = common::kvstore_network_suite(common, "pair", &args.net)?;
    common::which(Path::new("redis-cli"), "install Debian's redis-tools (apt-get install redis-tools)")?;
    common::which(Path::new("python3"), "install python3")?;
    common::require_file(&args.checker, "kv-checker.py", "run from the repository root or pass --checker")?;
    let Prepared { common, machine, images, work } = common.prepare("pair", &["kvstore"], true)?;
    let common = &common;
    let runs = common.runs_or(1);
    let ctx = Ctx {
        args,
        redis_benchmark,
        checker: std::fs::canonicalize(&args.checker)?,
        ftvm: std::fs::canonicalize(&common.ftvm)?,
        kernel: images["kvstore"].clone(),
        work,
        cmdline: format!("ip={GUEST_IP}/24"),
        cores: machine.cores.max(1) as f64,
    };
    let rb_version = common::version_of(&ctx.redis_benchmark)?;

    if args.pin {
        pin_self(1)?;
    }
    let topo = Topology::up(&args.net.topology, 2)?;
    let floor = |when: &str| -> Result<Rtt> {
        let r = pingpong::measure(&topo.host_n(1), &topo.host_n(2), &format!("{BACKUP_IP}:6999"))?;
        eprintln!(
            "link round trip {when} ({} B out, {} B back): min {:.0} µs, mean {:.0}, p50 {:.0}, p99 {:.0}",
            pingpong::PING_BYTES,
            pingpong::PONG_BYTES,
            r.min_us,
            r.mean_us,
            r.p50_us,
            r.p99_us
        );
        Ok(r)
    };
    let mut link_rtt = vec![floor("before")?];
    let mut sessions = Vec::new();
    let mut port = 7000;
    for rep in 0..runs {
        let mut order = vec![Mode::Unprotected, Mode::Protected];
        if args.paused_replay {
            order.push(Mode::PausedReplay);
            if args.untimed {
                order.push(Mode::PausedUntimed);
            }
        }
        if rep % 2 == 1 {
            order.reverse();
        }
        for mode in order {
            eprintln!("round {}/{runs}: {}", rep + 1, mode.label());
            // A fresh port per pair, so that no socket of the last one can be in the way.
            port += 1;
            sessions.push(session(&ctx, &topo, mode, rep, port)?);
        }
    }
    link_rtt.push(floor("after")?);
    drop(topo);

    let mut cells = Vec::new();
    for &c in &args.clients {
        for test in ["SET", "GET"] {
            for mode in modes(args) {
                let mut cell = Cell {
                    test: test.into(),
                    clients: c,
                    mode,
                    rps: Series::default(),
                    p50_ms: Series::default(),
                    p99_ms: Series::default(),
                    vm_cpu_ms_per_1k: Series::default(),
                    backup_cpu_ms_per_1k: None,
                    machine_cpu_ms_per_1k: Series::default(),
                    machine_idle: Series::default(),
                    hold_us: None,
                    stages: Vec::new(),
                    log_mbit_s: None,
                    log_bytes_per_request: None,
                };
                for b in sessions.iter().filter(|s| s.mode == mode).flat_map(|s| &s.benches) {
                    if b.bench.test != test || b.bench.clients != c {
                        continue;
                    }
                    cell.rps.push(b.bench.rps);
                    cell.p50_ms.push(b.bench.p50_ms);
                    cell.p99_ms.push(b.bench.p99_ms);
                    cell.vm_cpu_ms_per_1k.push(b.vm_cpu_ms_per_1k);
                    if let Some(v) = b.backup_cpu_ms_per_1k {
                        cell.backup_cpu_ms_per_1k.get_or_insert_with(Series::default).push(v);
                    }
                    cell.machine_cpu_ms_per_1k.push(b.machine_cpu_ms_per_1k);
                    cell.machine_idle.push(b.machine_idle);
                    if let Some(v) = b.hold_us {
                        cell.hold_us.get_or_insert_with(Series::default).push(v);
                    }
                    for f in b.stages.iter().flat_map(|st| std::iter::once(&st.hold).chain(&st.stages).chain(&st.parts))
                    {
                        if f.count == 0 {
                            continue;
                        }
                        let i = match cell.stages.iter().position(|c| c.name == f.name) {
                            Some(i) => i,
                            None => {
                                cell.stages.push(StageCell {
                                    name: f.name.clone(),
                                    count: Series::default(),
                                    mean_us: Series::default(),
                                    p50_us: Series::default(),
                                    p99_us: Series::default(),
                                });
                                cell.stages.len() - 1
                            }
                        };
                        cell.stages[i].count.push(f.count as f64);
                        cell.stages[i].mean_us.push(f.mean_us);
                        cell.stages[i].p50_us.push(f.p50_us);
                        cell.stages[i].p99_us.push(f.p99_us);
                    }
                    if let Some(v) = b.log_mbit_s {
                        cell.log_mbit_s.get_or_insert_with(Series::default).push(v);
                    }
                    if let Some(v) = b.log_bytes_per_request {
                        cell.log_bytes_per_request.get_or_insert_with(Series::default).push(v);
                    }
                }
                cells.push(cell);
            }
        }
    }
    let cell = |test: &str, c: u32, m: Mode| cells.iter().find(|x| x.test == test && x.clients == c && x.mode == m);
    let mut ratios = Vec::new();
    let cores = machine.cores.max(1) as f64;
    for &c in &args.clients {
        for test in ["SET", "GET"] {
            let Some(u) = cell(test, c, Mode::Unprotected) else { continue };
            for mode in modes(args).into_iter().filter(|m| m.protected()) {
                let Some(p) = cell(test, c, mode) else { continue };
                let name = match mode {
                    Mode::PausedReplay => format!("{test} c={c} paused-replay/unprotected"),
                    Mode::PausedUntimed => format!("{test} c={c} paused-untimed/unprotected"),
                    _ => format!("{test} c={c} protected/unprotected"),
                };
                let r = Ratio::new(name, p.rps.median / u.rps.median);
                // The most this machine's CPUs allow: the protected mode's CPU time per
                // request, all processes and the kernel, against the unprotected rate.
                let ceiling = (cores * 1000.0 / (p.machine_cpu_ms_per_1k.median / 1000.0) / u.rps.median).min(1.0);
                let added = format!(
                    "p50 {:+.3} ms, p99 {:+.3} ms; CPU ceiling here {ceiling:.2}",
                    p.p50_ms.median - u.p50_ms.median,
                    p.p99_ms.median - u.p99_ms.median
                );
                ratios.push(match (mode, c >= 20) {
                    (Mode::Protected, true) => r.at_least(0.97).note(added),
                    (Mode::Protected, false) => r.note(format!("no bar; added {added}")),
                    _ => r.note(format!("diagnostic; {added}")),
                });
            }
        }
    }
    // What timing the stages costs: the same mode with it on and off, side by side.
    for &c in &args.clients {
        for test in ["SET", "GET"] {
            if let (Some(t), Some(u)) = (cell(test, c, Mode::PausedReplay), cell(test, c, Mode::PausedUntimed)) {
                ratios.push(Ratio::new(format!("{test} c={c} timed/untimed"), t.rps.median / u.rps.median).note(
                    format!(
                        "the stage timing's cost (1.00: none); mean hold {} against {} µs",
                        t.hold_us.as_ref().map_or("-".into(), |s| format!("{:.0}", s.median)),
                        u.hold_us.as_ref().map_or("-".into(), |s| format!("{:.0}", s.median))
                    ),
                ));
            }
        }
    }
    let mut rtt_p50 = Series::default();
    let mut rtt_p99 = Series::default();
    for r in &link_rtt {
        rtt_p50.push(r.p50_us);
        rtt_p99.push(r.p99_us);
    }
    let mut hold_ratios = Vec::new();
    for cell in cells.iter().filter(|c| c.mode.protected() && c.clients >= 20) {
        let Some(hold) = cell.stages.iter().find(|s| s.name == "hold") else { continue };
        let name = format!("{} c={} {}", cell.test, cell.clients, cell.mode.label());
        hold_ratios.push(
            Ratio::new(format!("{name} mean hold/p50 RTT"), hold.mean_us.median / rtt_p50.median)
                .at_most(1.5)
                .note(format!("{:.0} / {:.0} µs", hold.mean_us.median, rtt_p50.median)),
        );
        hold_ratios.push(
            Ratio::new(format!("{name} p99 hold/p99 RTT"), hold.p99_us.median / rtt_p99.median)
                .at_most(3.0)
                .note(format!("{:.0} / {:.0} µs", hold.p99_us.median, rtt_p99.median)),
        );
    }
    let mut idle = Series::default();
    let mut outage = Series::default();
    let mut held = Vec::new();
    for s in &sessions {
        if let Some(v) = s.idle_log_mbit_s {
            idle.push(v);
        }
        if let Some(f) = &s.failover {
            outage.push(f.outage_ms);
            held.push(f.invariants_held);
        }
    }
    let report = Report {
        suite: "pair",
        machine,
        runs,
        redis_benchmark: rb_version,
        guest_cmdline: ctx.cmdline.clone(),
        disk_mib: args.disk_mib,
        pinned: args.pin,
        cells,
        ratios,
        link_rtt,
        hold_ratios,
        idle_log_mbit_s: idle,
        outage_ms: outage,
        invariants_held: held,
        sessions,
    };
    let bars = plot::ratio_bars(&report.ratios);
    let svg = plot::bars("kvstore protected (ftvm primary + backup) / unprotected (ftvm run): throughput", &bars);
    common::publish(&common.out, "pair", &report, &svg, print_table)?;
    Ok(())
}

fn modes(args: &Args) -> Vec<Mode> {
    let mut modes = vec![Mode::Unprotected, Mode::Protected];
    if args.paused_replay {
        modes.push(Mode::PausedReplay);
        if args.untimed {
            modes.push(Mode::PausedUntimed);
        }
    }
    modes
}

fn fresh_disk(ctx: &Ctx, name: &str) -> Result<PathBuf> {
    common::fresh_disk(&ctx.work, name, ctx.args.disk_mib)
}

/// The kvstore VM's options: a fresh disk, the TAP, virtio-rng.
fn vm_args(ctx: &Ctx, cmd: &mut Command, disk: &Path) {
    cmd.args(["--log-level", "info", "--net", "tap=tap0", "--rng", "--disk"]).arg(disk);
    cmd.arg("--kernel").arg(&ctx.kernel).arg("--cmdline").arg(&ctx.cmdline);
}

/// `[taskset -c CPU] ip netns exec NS FTVM VERB` (the VM on `cpu` where given), for the VM's
/// options to follow. Every program of the chain execs the next, so the child's pid is ftvm's.
pub(crate) fn side_command(ftvm: &Path, cpu: Option<u32>, ns: &str, verb: &[&str]) -> Command {
    let mut cmd = match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string(), "ip"]);
            c
        }
        None => Command::new("ip"),
    };
    cmd.args(["netns", "exec", ns]).arg(ftvm).args(verb);
    cmd
}

/// A side of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Primary,
    Backup,
}

/// How a suite starts a protected pair on a 2-host topology: `ftvm backup` on host 2,
/// listening on the replication link (rep0), then `ftvm primary` on host 1, without a key
/// (`--insecure`), the arbiter a lock file in `work` both namespaces see.
pub(crate) struct PairSpec<'a> {
    pub(crate) ftvm: &'a Path,
    /// Where the arbiter's lock file goes.
    pub(crate) work: &'a Path,
    /// The backup's port on 10.99.0.2 (a fresh one per pair, so that no socket of the last
    /// one can be in the way).
    pub(crate) port: u16,
    /// The API sockets of the primary and the backup.
    pub(crate) sockets: (&'a Path, &'a Path),
    /// The primary on CPU 0, the backup on CPU 1.
    pub(crate) pin: bool,
    /// More options for the primary (`--max-lag 0`).
    pub(crate) primary_args: &'a [&'a str],
    /// Environment for both sides.
    pub(crate) env: &'a [(&'a str, &'a str)],
}

/// A started pair. The primary is declared first so that, dropped on an error, it dies
/// before its backup.
pub(crate) struct Pair {
    pub(crate) primary: Running,
    pub(crate) backup: Running,
}

impl PairSpec<'_> {
    /// Starts the backup, waits until it listens, then starts the primary; `vm` adds the
    /// VM's options (image, disk, ...) of each side. Does not wait for the guest.
    pub(crate) fn start(&self, topo: &Topology, mut vm: impl FnMut(&mut Command, Side) -> Result<()>) -> Result<Pair> {
        let arbiter = self.work.join("arbiter.lock");
        let listen = format!("{BACKUP_IP}:{}", self.port);
        let pin = |cpu| self.pin.then_some(cpu);
        let mut cmd = side_command(self.ftvm, pin(1), &topo.host_n(2), &["backup", "--listen", &listen, "--insecure"]);
        vm(&mut cmd, Side::Backup)?;
        // Both "hosts" are namespaces of this machine: the lock file is on storage both see.
        cmd.arg("--arbiter").arg(&arbiter).arg("--shared-lock").arg("--api-socket").arg(self.sockets.1);
        cmd.envs(self.env.iter().copied());
        let mut backup = Running::spawn("ftvm backup", &mut cmd)?;
        backup.wait_for_stderr("backup listening", Duration::from_secs(30))?;
        let mut cmd = side_command(self.ftvm, pin(0), &topo.host_n(1), &["primary", "--backup", &listen, "--insecure"]);
        vm(&mut cmd, Side::Primary)?;
        cmd.arg("--arbiter").arg(&arbiter).arg("--shared-lock").arg("--api-socket").arg(self.sockets.0);
        cmd.args(self.primary_args).envs(self.env.iter().copied());
        let primary = Running::spawn("ftvm primary", &mut cmd)?;
        Ok(Pair { primary, backup })
    }
}

/// `ftvm ctl SOCKET status --json`, with the time it was read.
fn status(ftvm: &Path, sock: &Path) -> Result<(ftvm_api::Status, Instant)> {
    let s = common::ctl_status(ftvm, sock)?;
    Ok((s, Instant::now()))
}

/// `log.bytes` from the status, with the time it was read.
fn log_bytes(ctx: &Ctx, sock: &Path) -> Result<(u64, Instant)> {
    status(&ctx.ftvm, sock).map(|(s, at)| (s.log.map_or(0, |l| l.bytes), at))
}

/// A primary's counters at one moment: log bytes sent, exits, outputs performed after being
/// held, and their total hold time in µs (from the mean the status gives).
pub(crate) struct Counters {
    pub(crate) log_bytes: u64,
    at: Instant,
    pub(crate) exits: u64,
    held: u64,
    hold_us: f64,
    stages: Option<ftvm_api::OutputStages>,
}

/// The primary's counters, from one status read of its API socket.
pub(crate) fn counters(ftvm: &Path, sock: &Path) -> Result<Counters> {
    let (s, at) = status(ftvm, sock)?;
    let p = s.pair.context("a primary's status without pair figures")?;
    let hold_us = p.outputs_done as f64 * p.output_hold_us.unwrap_or(0) as f64;
    Ok(Counters {
        log_bytes: s.log.map_or(0, |l| l.bytes),
        at,
        exits: s.exits.total,
        held: p.outputs_done,
        hold_us,
        stages: p.output_stages,
    })
}

/// `ftvm ctl SOCKET pause|resume` on the backup.
fn ctl(ctx: &Ctx, sock: &Path, verb: &str) -> Result<()> {
    let out = Command::new(&ctx.ftvm).arg("ctl").arg(sock).arg(verb).output()?;
    if !out.status.success() {
        bail!("ftvm ctl {} {verb} failed: {}", sock.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Waits until the backup's replay has caught up (the primary's `replay_lag_ms` small).
fn wait_caught_up(ctx: &Ctx, sock: &Path) -> Result<()> {
    let start = Instant::now();
    loop {
        let (s, _) = status(&ctx.ftvm, sock)?;
        let lag = s.pair.and_then(|p| p.replay_lag_ms).unwrap_or(0);
        if lag <= 50 {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("the backup's replay still lags by {lag} ms after 120 s");
        }
        common::sleep(Duration::from_millis(100))?;
    }
}

/// Non-idle time of all CPUs so far, in ms (`/proc/stat`'s first line; iowait counts as
/// idle).
fn machine_cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let f = |i: usize| v.get(i).copied().unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // user nice system idle iowait irq softirq steal
    (f(0) + f(1) + f(2) + f(5) + f(6) + f(7)) * 1000.0 / hz
}

/// User plus system CPU time of a process so far, in ms (`/proc/PID/stat`; 0 if it is gone).
/// CPU time (user + system) of each of a process's threads, in ms, summed by thread name.
fn thread_cpu_ms(pid: i32) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else { continue };
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let name = head.split_once('(').map_or("?", |(_, n)| n).to_string();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        *out.entry(name).or_insert(0.0) += (ticks(11) + ticks(12)) * 1000.0 / hz;
    }
    out
}

fn cpu_ms(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // The command name may hold spaces: the fields after it start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the name.
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) * 1000.0 / hz
}

/// Pins this process (and so what it starts, unless told otherwise) to one CPU.
fn pin_self(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // touch the set we pass, for the calling process.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("cannot pin the bench to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn mbit_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e6
}

fn session(ctx: &Ctx, topo: &Topology, mode: Mode, rep: usize, port: u16) -> Result<Session> {
    let sock = ctx.work.join("p.sock");
    let bsock = ctx.work.join("b.sock");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&bsock);
    let start = Instant::now();
    // Declared before the primary so that, on an error, the primary dies first.
    let mut backup = None;
    let mut vm = match mode {
        Mode::Unprotected => {
            let disk = fresh_disk(ctx, "disk-run.img")?;
            let mut cmd = side_command(&ctx.ftvm, ctx.args.pin.then_some(0), &topo.host_n(1), &["run"]);
            vm_args(ctx, &mut cmd, &disk);
            Running::spawn("ftvm run", &mut cmd)?
        }
        Mode::Protected | Mode::PausedReplay | Mode::PausedUntimed => {
            // The paused replay lags on purpose: no slowing down for it.
            let primary_args: &[&str] = if mode.paused() { &["--max-lag", "0"] } else { &[] };
            let env: &[(&str, &str)] = if mode == Mode::PausedUntimed { &[("FTVM_STAGE_TIMES", "0")] } else { &[] };
            let spec = PairSpec {
                ftvm: &ctx.ftvm,
                work: &ctx.work,
                port,
                sockets: (&sock, &bsock),
                pin: ctx.args.pin,
                primary_args,
                env,
            };
            let pair = spec.start(topo, |cmd, side| {
                let disk = fresh_disk(ctx, if side == Side::Primary { "disk-primary.img" } else { "disk-backup.img" })?;
                vm_args(ctx, cmd, &disk);
                Ok(())
            })?;
            backup = Some(pair.backup);
            pair.primary
        }
    };
    vm.wait_for_output(READY, Duration::from_secs(120))?;
    crate::reprotect::wait_ping(topo, Duration::from_secs(30))?;
    let boot_to_ready_s = start.elapsed().as_secs_f64();
    let protected = mode.protected();

    let idle_log_mbit_s = if protected {
        let (b0, t0) = log_bytes(ctx, &sock)?;
        common::sleep(Duration::from_secs_f64(ctx.args.idle_s))?;
        let (b1, t1) = log_bytes(ctx, &sock)?;
        Some(mbit_s(b1 - b0, t1 - t0))
    } else {
        None
    };

    let mut benches = Vec::new();
    for &c in &ctx.args.clients {
        for test in ["SET", "GET"] {
            let n = if c == 1 { ctx.args.requests_single } else { ctx.args.requests };
            let before = if protected { Some(counters(&ctx.ftvm, &sock)?) } else { None };
            if mode.paused() {
                // Seen once (issue 17): no API socket of the backup here. Say what it printed.
                ctl(ctx, &bsock, "pause").with_context(|| {
                    let err = backup.as_ref().map(|b| b.stderr_text()).unwrap_or_default();
                    let tail: Vec<&str> = err.lines().rev().take(20).collect();
                    format!(
                        "{} (round {}): the backup's last lines:\n{}",
                        mode.label(),
                        rep + 1,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                })?;
            }
            let cpu0 = (cpu_ms(vm.pid()), backup.as_ref().map(|b| cpu_ms(b.pid())));
            let threads0 = backup.as_ref().map(|b| thread_cpu_ms(b.pid()));
            let machine0 = machine_cpu_ms();
            let bench = redis_bench::bench(&ctx.redis_benchmark, topo, test, c, n).with_context(|| {
                format!("{} (round {}): console so far:\n{}", mode.label(), rep + 1, vm.stdout_text())
            })?;
            let per_1k = |before: f64, after: f64| (after - before) * 1000.0 / n as f64;
            let vm_cpu_ms_per_1k = per_1k(cpu0.0, cpu_ms(vm.pid()));
            let backup_cpu_ms_per_1k = backup.as_ref().zip(cpu0.1).map(|(b, c0)| per_1k(c0, cpu_ms(b.pid())));
            let backup_threads_ms_per_1k = backup.as_ref().zip(threads0).map(|(b, t0)| {
                thread_cpu_ms(b.pid())
                    .into_iter()
                    .map(|(name, ms)| {
                        let before = t0.get(&name).copied().unwrap_or(0.0);
                        (name, per_1k(before, ms))
                    })
                    .filter(|(_, v)| *v > 0.0)
                    .collect::<std::collections::BTreeMap<_, _>>()
            });
            if let Some(t) = &backup_threads_ms_per_1k {
                let parts: Vec<String> = t.iter().map(|(n, v)| format!("{n} {v:.1}")).collect();
                eprintln!("      backup CPU per 1000 requests by thread (ms): {}", parts.join(", "));
            }
            let machine1 = machine_cpu_ms();
            let machine_cpu_ms_per_1k = per_1k(machine0, machine1);
            // Idle over redis-benchmark's own run (the CPU time outside it is small): what
            // the CPUs could have given and did not.
            let (w0, w1) = bench.window_unix_ns;
            let window_ms = w1.saturating_sub(w0) as f64 / 1e6;
            let machine_idle = if window_ms > 0.0 {
                (1.0 - (machine1 - machine0) / (ctx.cores * window_ms)).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let after = if protected { Some(counters(&ctx.ftvm, &sock)?) } else { None };
            let hold_us = before
                .as_ref()
                .zip(after.as_ref())
                .and_then(|(b, a)| (a.held > b.held).then(|| (a.hold_us - b.hold_us) / (a.held - b.held) as f64));
            if mode.paused() {
                ctl(ctx, &bsock, "resume")?;
                wait_caught_up(ctx, &sock)?;
            }
            eprintln!(
                "      CPU per 1000 requests: VM {vm_cpu_ms_per_1k:.0} ms{}, machine {machine_cpu_ms_per_1k:.0} ms ({:.0}% idle){}",
                backup_cpu_ms_per_1k.map_or(String::new(), |b| format!(", backup {b:.0} ms")),
                machine_idle * 100.0,
                hold_us.map_or(String::new(), |h| format!("; outputs held {h:.0} µs on average"))
            );
            let mut pb = PairBench {
                bench,
                vm_cpu_ms_per_1k,
                backup_cpu_ms_per_1k,
                backup_threads_ms_per_1k,
                machine_cpu_ms_per_1k,
                machine_idle,
                hold_us,
                stages: before.as_ref().zip(after.as_ref()).and_then(|(b, a)| match (&b.stages, &a.stages) {
                    (Some(b), Some(a)) => Some(a.since(b)),
                    _ => None,
                }),
                log_bytes: None,
                log_mbit_s: None,
                log_bytes_per_request: None,
            };
            if let Some((b, a)) = before.zip(after) {
                let (b0, t0, b1, t1) = (b.log_bytes, b.at, a.log_bytes, a.at);
                // The window includes the pause before redis-benchmark starts; rate it over
                // redis-benchmark's own run time instead.
                let (w0, w1) = pb.bench.window_unix_ns;
                let window = Duration::from_nanos(w1.saturating_sub(w0)).min(t1 - t0);
                pb.log_bytes = Some(b1 - b0);
                pb.log_mbit_s = Some(mbit_s(b1 - b0, window));
                pb.log_bytes_per_request = Some((b1 - b0) as f64 / n as f64);
                eprintln!(
                    "      log {:.2} Mbit/s, {:.0} B/request",
                    mbit_s(b1 - b0, window),
                    (b1 - b0) as f64 / n as f64
                );
            }
            benches.push(pb);
        }
    }
    // What the sides printed, kept beside the results (a backup that halted or was lost in
    // a session says why there).
    if let Some(b) = backup.as_ref() {
        let name = |side: &str| ctx.work.join(format!("{}-{}-{side}.stderr", mode.label(), rep + 1));
        let _ = std::fs::write(name("backup"), b.stderr_text());
        let _ = std::fs::write(name("primary"), vm.stderr_text());
    }

    let failover = if mode == Mode::Protected && !ctx.args.no_failover {
        Some(failover(ctx, topo, vm, backup.take().context("no backup")?)?)
    } else {
        vm.terminate(Duration::from_secs(10))?;
        if let Some(b) = backup.take() {
            b.terminate(Duration::from_secs(10))?;
        }
        None
    };
    for d in ["disk-run.img", "disk-backup.img", "disk-primary.img"] {
        let _ = std::fs::remove_file(ctx.work.join(d));
    }
    Ok(Session { mode, rep, boot_to_ready_s, benches, idle_log_mbit_s, failover })
}

/// Runs the checker against the pair, SIGKILLs the primary `kill_after` s in, and reports
/// what the checker saw.
fn failover(ctx: &Ctx, topo: &Topology, primary: Running, backup: Running) -> Result<Failover> {
    common::sleep(Duration::from_millis(500))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &topo.client(), "python3"]).arg(&ctx.checker);
    cmd.args([GUEST_IP, "6379", &ctx.args.checker_s.to_string()]);
    let checker = Running::spawn("kv-checker", &mut cmd)?;
    common::sleep(Duration::from_secs_f64(ctx.args.kill_after))?;
    eprintln!("  SIGKILL to the primary");
    let _ = primary.kill()?;
    let c = checker.finish(Duration::from_secs(ctx.args.checker_s + 60))?;
    let line = c.stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or_default();
    let value: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("kv-checker printed no JSON line: {}", c.describe()))?;
    let outage_ms = value.get("outage_ms").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
    let takeover = backup.stderr_text().lines().find(|l| l.contains("TAKEOVER")).map(|l| l.trim().to_string());
    let b = backup.terminate(Duration::from_secs(10))?;
    let takeover = takeover.or_else(|| b.stderr.lines().find(|l| l.contains("TAKEOVER")).map(|l| l.trim().to_string()));
    let invariants_held = c.status.success();
    eprintln!("  failover: outage {outage_ms:.0} ms, invariants held: {invariants_held}; checker: {line}");
    Ok(Failover { checker: value, outage_ms, invariants_held, takeover })
}

fn print_table(r: &Report) {
    r.machine.print(&format!(
        "{} sessions per mode (unprotected: ftvm run; protected: ftvm primary + ftvm backup), alternating",
        r.runs
    ));
    println!("{} against kvstore ({}), {} MiB disks\n", r.redis_benchmark, r.guest_cmdline, r.disk_mib);
    if r.pinned {
        println!("pinned: the unprotected VM and the primary on CPU 0, the backup and the clients on CPU 1\n");
    }
    let mut t = Table::new().left("test", 4).right("c", 3).gap(2).left("mode", 14).right("req/s", 8);
    t = t.right("p50 ms", 7).right("p99 ms", 7).right("log Mbit/s", 10).right("log B/req", 9);
    t = t.right("CPU ms/1k req", 13).right("machine ms/1k", 15).right("hold µs", 7);
    for cell in &r.cells {
        let opt = |s: &Option<Series>, prec: usize| s.as_ref().map_or("-".into(), |s| format!("{:.*}", prec, s.median));
        let cpu = match &cell.backup_cpu_ms_per_1k {
            Some(b) => format!("{:.0} + {:.0}", cell.vm_cpu_ms_per_1k.median, b.median),
            None => format!("{:.0}", cell.vm_cpu_ms_per_1k.median),
        };
        t.row([
            cell.test.clone(),
            cell.clients.to_string(),
            cell.mode.label().to_string(),
            format!("{:.0}", cell.rps.median),
            format!("{:.3}", cell.p50_ms.median),
            format!("{:.3}", cell.p99_ms.median),
            opt(&cell.log_mbit_s, 2),
            opt(&cell.log_bytes_per_request, 0),
            cpu,
            format!("{:.0} ({:.0}% idle)", cell.machine_cpu_ms_per_1k.median, cell.machine_idle.median * 100.0),
            opt(&cell.hold_us, 0),
        ]);
    }
    t.print();
    println!("\nthe hold by stage, µs, mean / p50 / p99 (medians over sessions; the stages add up to the hold; after them, `release` more closely: the output's own write, and the stage by performer, vCPU or thread):");
    let mut stages = Table::headless().left("test", 4).right("c", 3).gap(2).left("mode", 14).left("stages", 0);
    for cell in r.cells.iter().filter(|c| !c.stages.is_empty()) {
        let parts: Vec<String> = cell
            .stages
            .iter()
            .map(|s| {
                let share = match s.name.as_str() {
                    "release_vcpu" | "release_thread" => format!(" ({:.0} outputs)", s.count.median),
                    _ => String::new(),
                };
                format!("{} {:.0}/{:.0}/{:.0}{share}", s.name, s.mean_us.median, s.p50_us.median, s.p99_us.median)
            })
            .collect();
        stages.row([cell.test.clone(), cell.clients.to_string(), cell.mode.label().to_string(), parts.join("  ")]);
    }
    stages.print();
    println!();
    table::ratios("", &r.ratios, 3).print();
    println!();
    for r in &r.link_rtt {
        println!(
            "link round trip ({} B out, {} B back, {} times): min {:.0} µs, mean {:.0}, p50 {:.0}, p99 {:.0}",
            pingpong::PING_BYTES,
            pingpong::PONG_BYTES,
            r.count,
            r.min_us,
            r.mean_us,
            r.p50_us,
            r.p99_us
        );
    }
    table::ratios("", &r.hold_ratios, 2).print();
    println!("\nidle log bandwidth: {:.3} Mbit/s (median)", r.idle_log_mbit_s.median);
    for s in &r.sessions {
        if let Some(f) = &s.failover {
            println!(
                "failover (round {}): client-observed outage {:.0} ms, invariants {}; {}",
                s.rep + 1,
                f.outage_ms,
                if f.invariants_held { "held" } else { "VIOLATED" },
                f.takeover.as_deref().unwrap_or("no TAKEOVER line")
            );
        }
    }
}
