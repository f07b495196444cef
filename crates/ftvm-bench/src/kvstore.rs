//! The `kvstore` suite (issues "virtio and the key-value guest" and "record and replay",
//! benchmarks): redis-benchmark SET and GET against the `kvstore` guest on the namespaced
//! test network (scripts/topology.sh), under `ftvm run`, `ftvm record` and QEMU microvm
//! (KVM, TAP, virtio-mmio). Writes kvstore.{json,svg}.
//!
//! Every VM session boots on a fresh blank disk, waits for `kvstore: listening`, then runs
//! one redis-benchmark per (clients, test), SET and GET in separate invocations (so each has
//! its own time window in the log, and a pause lets the last test's connections close).
//! Sessions rotate engines so that machine noise hits all alike. A recording's log gives exits and log bytes per request: each
//! benchmark's host-time window is mapped to guest time through the log's CLOCK records.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::common::{self, Common, ExitSummary, Machine, Ratio, Running, Series};
use crate::plot;

pub(crate) const GUEST_IP: &str = "10.0.0.2";
pub(crate) const READY: &str = "kvstore: listening";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Client counts (redis-benchmark -c), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,20,50")]
    clients: Vec<u32>,
    /// Requests per redis-benchmark run (one test, SET or GET) with several clients.
    #[arg(long, default_value_t = 50_000)]
    requests: u64,
    /// Requests per run with one client (one request in flight, so far fewer per second).
    #[arg(long, default_value_t = 5_000)]
    requests_single: u64,
    /// The redis-benchmark binary (Debian's redis-tools).
    #[arg(long, default_value = "redis-benchmark")]
    redis_benchmark: PathBuf,
    /// The topology script (run from the repository root, or give its path).
    #[arg(long, default_value = "scripts/topology.sh")]
    topology: PathBuf,
    /// Size of each VM's fresh blank raw disk, MiB.
    #[arg(long, default_value_t = 64)]
    disk_mib: u64,
    /// More guest command-line words (after `ip=10.0.0.2/24`), for every engine.
    #[arg(long, default_value = "")]
    guest_args: String,
    /// Leave QEMU out.
    #[arg(long)]
    no_qemu: bool,
    /// Do not replay the recordings.
    #[arg(long)]
    no_replay: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Engine {
    FtvmRun,
    FtvmRecord,
    /// QEMU microvm with KVM, the same TAP and virtio-mmio net, blk and rng.
    Qemu,
}

impl Engine {
    fn label(self) -> &'static str {
        match self {
            Engine::FtvmRun => "ftvm run",
            Engine::FtvmRecord => "ftvm record",
            Engine::Qemu => "QEMU microvm",
        }
    }
}

/// One redis-benchmark run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Bench {
    pub(crate) test: String,
    pub(crate) clients: u32,
    pub(crate) requests: u64,
    pub(crate) rps: f64,
    avg_ms: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    retried: bool,
    #[serde(skip)]
    pub(crate) window_unix_ns: (u64, u64),
    /// From the recording's log (ftvm record only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) exits_per_request: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) log_bytes_per_request: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    net_rx_bytes_per_request: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Session {
    engine: Engine,
    rep: usize,
    /// Process start to exit (boot, the benchmarks, the pauses between them, stop).
    wall_s: f64,
    boot_to_ready_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    counts: Option<ExitSummary>,
    benches: Vec<Bench>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<LogTotals>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replay_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct LogTotals {
    pub(crate) bytes: u64,
    guest_s: f64,
    by_kind: BTreeMap<String, crate::rr::KindCount>,
}

/// Medians over sessions for one (test, clients, engine).
#[derive(Debug, Serialize)]
struct Cell {
    test: String,
    clients: u32,
    engine: Engine,
    rps: Series,
    p50_ms: Series,
    p99_ms: Series,
    #[serde(skip_serializing_if = "Option::is_none")]
    exits_per_request: Option<Series>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_bytes_per_request: Option<Series>,
}

#[derive(Debug, Serialize)]
struct Report {
    suite: &'static str,
    machine: Machine,
    runs: usize,
    redis_benchmark: String,
    guest_cmdline: String,
    disk_mib: u64,
    cells: Vec<Cell>,
    ratios: Vec<Ratio>,
    sessions: Vec<Session>,
}

/// The test network; torn down when dropped, so also on errors and interrupts.
pub(crate) struct Topology {
    script: PathBuf,
    prefix: String,
}

impl Topology {
    /// `scripts/topology.sh up PREFIX HOSTS` under a free prefix.
    pub(crate) fn up(script: &Path, hosts: u32) -> Result<Topology> {
        let existing = common::capture(Command::new("ip").args(["netns", "list"]))?;
        let pid = std::process::id();
        let prefix = (0..100)
            .map(|i| format!("kb{}", (pid + i) % 1_000_000))
            .find(|p| !existing.contains(&format!("{p}-lan")))
            .context("no free topology prefix")?;
        let out = Command::new(script).args(["up", &prefix, &hosts.to_string()]).output()?;
        // From here on, Drop removes whatever `up` built, even when it failed half-way.
        let topo = Topology { script: script.to_path_buf(), prefix };
        if !out.status.success() {
            bail!("{} up {} failed: {}", script.display(), topo.prefix, String::from_utf8_lossy(&out.stderr));
        }
        eprintln!("topology {} up", topo.prefix);
        Ok(topo)
    }

    pub(crate) fn host(&self) -> String {
        self.host_n(1)
    }

    /// The namespace of host `n` (1-based).
    pub(crate) fn host_n(&self, n: u32) -> String {
        format!("{}-h{n}", self.prefix)
    }

    pub(crate) fn client(&self) -> String {
        format!("{}-c", self.prefix)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        match Command::new(&self.script).args(["down", &self.prefix]).output() {
            Ok(o) if o.status.success() => eprintln!("topology {} down", self.prefix),
            _ => eprintln!(
                "could not tear down topology {}: run {} down {}",
                self.prefix,
                self.script.display(),
                self.prefix
            ),
        }
    }
}

struct Ctx<'a> {
    common: &'a Common,
    args: &'a Args,
    redis_benchmark: PathBuf,
    ftvm: PathBuf,
    kernel: PathBuf,
    work: PathBuf,
    cmdline: String,
}

fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

pub fn run(common: &Common, args: &Args) -> Result<()> {
    let redis_benchmark = common::kvstore_network_suite(common, "kvstore", &args.redis_benchmark, &args.topology)?;
    let work = common.out.join("kvstore");
    let common = &common.with_ftvm_copy(&work)?;
    let machine = Machine::describe(common)?;
    let runs = common.runs.unwrap_or(3).max(1);
    let images = common::snapshot_images(&common.guests, &["kvstore"], &work)?;
    let work = std::fs::canonicalize(&work)?;
    let cmdline = format!("ip={GUEST_IP}/24 {}", args.guest_args).trim().to_string();
    let ctx = Ctx {
        common,
        args,
        redis_benchmark,
        ftvm: std::fs::canonicalize(&common.ftvm)?,
        kernel: images["kvstore"].clone(),
        work,
        cmdline,
    };
    let rb_version = common::capture(Command::new(&ctx.redis_benchmark).arg("--version"))?.trim().to_string();

    let mut engines = vec![Engine::FtvmRun, Engine::FtvmRecord];
    if !args.no_qemu {
        engines.push(Engine::Qemu);
    }
    let topo = Topology::up(&args.topology, 1)?;
    let mut sessions = Vec::new();
    for rep in 0..runs {
        for k in 0..engines.len() {
            // Rotate the order from one round to the next.
            let engine = engines[(k + rep) % engines.len()];
            eprintln!("round {}/{runs}: {}", rep + 1, engine.label());
            sessions.push(session(&ctx, &topo, engine, rep)?);
        }
    }
    drop(topo);

    let mut cells = Vec::new();
    for &c in &args.clients {
        for test in ["SET", "GET"] {
            for &engine in &engines {
                let mut cell = Cell {
                    test: test.into(),
                    clients: c,
                    engine,
                    rps: Series::default(),
                    p50_ms: Series::default(),
                    p99_ms: Series::default(),
                    exits_per_request: None,
                    log_bytes_per_request: None,
                };
                for b in sessions.iter().filter(|s| s.engine == engine).flat_map(|s| &s.benches) {
                    if b.test != test || b.clients != c {
                        continue;
                    }
                    cell.rps.push(b.rps);
                    cell.p50_ms.push(b.p50_ms);
                    cell.p99_ms.push(b.p99_ms);
                    if let Some(e) = b.exits_per_request {
                        cell.exits_per_request.get_or_insert_with(Series::default).push(e);
                    }
                    if let Some(e) = b.log_bytes_per_request {
                        cell.log_bytes_per_request.get_or_insert_with(Series::default).push(e);
                    }
                }
                cells.push(cell);
            }
        }
    }
    let rps = |test: &str, c: u32, e: Engine| {
        cells.iter().find(|x| x.test == test && x.clients == c && x.engine == e).map_or(f64::NAN, |x| x.rps.median)
    };
    let mut ratios = Vec::new();
    for &c in &args.clients {
        for test in ["SET", "GET"] {
            let run = rps(test, c, Engine::FtvmRun);
            ratios.push(
                Ratio::new(format!("{test} c={c} record/run"), rps(test, c, Engine::FtvmRecord) / run).at_least(0.95),
            );
            if !args.no_qemu {
                let q = rps(test, c, Engine::Qemu);
                ratios.push(Ratio::new(format!("{test} c={c} ftvm run/QEMU"), run / q));
                ratios.push(Ratio::new(format!("{test} c={c} ftvm record/QEMU"), rps(test, c, Engine::FtvmRecord) / q));
            }
        }
    }
    let replays: Vec<f64> = sessions.iter().filter_map(|s| s.replay_s.map(|r| r / s.wall_s)).collect();
    if !replays.is_empty() {
        ratios.push(
            Ratio::new("replay/record time", common::median(&replays))
                .at_most(1.0)
                .note("replay wall time / recording session wall time (boot, benchmarks, pauses)"),
        );
    }
    let report = Report {
        suite: "kvstore",
        machine,
        runs,
        redis_benchmark: rb_version,
        guest_cmdline: ctx.cmdline.clone(),
        disk_mib: args.disk_mib,
        cells,
        ratios,
        sessions,
    };
    let bars: Vec<plot::Bar> =
        report.ratios.iter().map(|r| plot::Bar { label: &r.name, value: r.value, goal: r.bound }).collect();
    let svg = plot::bars("kvstore under redis-benchmark: throughput ratios (medians)", &bars);
    let (json, svg) = common::write_results(&common.out, "kvstore", &report, &svg)?;
    print_table(&report);
    println!("\nwrote {} and {}", json.display(), svg.display());
    Ok(())
}

fn session(ctx: &Ctx, topo: &Topology, engine: Engine, rep: usize) -> Result<Session> {
    let disk = ctx.work.join(format!("disk-{}-{rep}.img", engine_tag(engine)));
    let _ = std::fs::remove_file(&disk);
    std::fs::File::create(&disk)?.set_len(ctx.args.disk_mib << 20)?;
    let log = ctx.work.join(format!("kvstore-{rep}.ftvmlog"));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &topo.host()]);
    match engine {
        Engine::FtvmRun | Engine::FtvmRecord => {
            cmd.arg(&ctx.ftvm);
            if engine == Engine::FtvmRun {
                cmd.arg("run");
            } else {
                let _ = std::fs::remove_file(&log);
                cmd.arg("record").arg("--log").arg(&log);
            }
            cmd.args(["--log-level", "info", "--net", "tap=tap0", "--rng", "--disk"]).arg(&disk);
            cmd.arg("--kernel").arg(&ctx.kernel).arg("--cmdline").arg(&ctx.cmdline);
        }
        Engine::Qemu => {
            // acpi=off: QEMU then lists the virtio-mmio devices on the command line
            // (virtio_mmio.device=...) with ISA IRQs the guest's 8259 can take; with ACPI
            // the guest finds no routable IRQ and polls. force-legacy=false: virtio 1.x.
            cmd.arg(&ctx.common.qemu);
            cmd.args(["-M", "microvm,rtc=on,acpi=off", "-enable-kvm", "-m", "256", "-display", "none"]);
            cmd.args(["-serial", "stdio", "-monitor", "none", "-no-reboot"]);
            cmd.args(["-global", "virtio-mmio.force-legacy=false"]);
            cmd.arg("-kernel").arg(&ctx.kernel).arg("-append").arg(&ctx.cmdline);
            cmd.args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]);
            cmd.args(["-device", "virtio-net-device,netdev=n0"]);
            cmd.arg("-drive").arg(format!("id=d0,file={},format=raw,if=none", disk.display()));
            cmd.args(["-device", "virtio-blk-device,drive=d0"]);
            cmd.args(["-object", "rng-random,id=r0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=r0"]);
        }
    }
    let start_ns = unix_ns();
    let mut vm = Running::spawn(engine.label(), &mut cmd)?;
    vm.wait_for_output(READY, Duration::from_secs(120))?;
    let boot_to_ready_s = (unix_ns() - start_ns) as f64 / 1e9;
    let mut benches = Vec::new();
    for &c in &ctx.args.clients {
        for test in ["SET", "GET"] {
            let n = if c == 1 { ctx.args.requests_single } else { ctx.args.requests };
            benches.push(bench(&ctx.redis_benchmark, topo, test, c, n).with_context(|| {
                format!("{} (round {}): console so far:\n{}", engine.label(), rep + 1, vm.stdout_text())
            })?);
        }
    }
    let f = vm.terminate(Duration::from_secs(10))?;
    let counts = ExitSummary::parse(&f.stderr);
    let mut s =
        Session { engine, rep, wall_s: f.wall_s(), boot_to_ready_s, counts, benches, log: None, replay_s: None };
    if engine == Engine::FtvmRecord {
        if !log.is_file() {
            bail!("ftvm record wrote no log at {}: {}", log.display(), f.describe());
        }
        s.log = Some(per_request(&ctx.ftvm, &log, &mut s.benches)?);
        if !ctx.args.no_replay {
            eprintln!("  replaying {}", log.display());
            let mut cmd = Command::new(&ctx.ftvm);
            cmd.arg("replay").arg(&log);
            let r = common::run("ftvm replay", &mut cmd, Duration::from_secs(1800))?;
            if !r.status.success() || !r.stderr.contains("replayed exactly") {
                bail!("ftvm replay {} did not replay exactly: {}", log.display(), r.describe());
            }
            s.replay_s = Some(r.wall_s());
        }
        let _ = std::fs::remove_file(log.with_extension("ftvmlog.disk0"));
    }
    // (A recording's replay needs the blank base image too.)
    let _ = std::fs::remove_file(&disk);
    Ok(s)
}

fn engine_tag(e: Engine) -> &'static str {
    match e {
        Engine::FtvmRun => "run",
        Engine::FtvmRecord => "record",
        Engine::Qemu => "qemu",
    }
}

/// One redis-benchmark run (retried once if it fails or hangs).
pub(crate) fn bench(redis_benchmark: &Path, topo: &Topology, test: &str, clients: u32, requests: u64) -> Result<Bench> {
    let mut last_error = None;
    for attempt in 0..2 {
        // Let the last run's connections close in the guest first.
        common::sleep(Duration::from_millis(if attempt == 0 { 500 } else { 3000 }))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topo.client()]).arg(redis_benchmark);
        cmd.args(["-h", GUEST_IP, "-p", "6379", "-c", &clients.to_string(), "-n", &requests.to_string()]);
        cmd.args(["-t", &test.to_lowercase(), "--csv"]);
        let t0 = unix_ns();
        let timeout = Duration::from_secs(60 + requests / 100);
        let label = format!("redis-benchmark {test} -c {clients}");
        match common::run(&label, &mut cmd, timeout).and_then(|f| parse_csv(&f.stdout, test).context(f.describe())) {
            Ok((rps, avg, p50, p99)) => {
                let t1 = unix_ns();
                eprintln!("  {test:<3} c={clients:<3} {rps:>10.0} req/s  p50 {p50:.3} ms  p99 {p99:.3} ms");
                return Ok(Bench {
                    test: test.into(),
                    clients,
                    requests,
                    rps,
                    avg_ms: avg,
                    p50_ms: p50,
                    p99_ms: p99,
                    retried: attempt > 0,
                    window_unix_ns: (t0, t1),
                    exits_per_request: None,
                    log_bytes_per_request: None,
                    net_rx_bytes_per_request: None,
                });
            }
            Err(e) => {
                common::check_interrupted()?;
                eprintln!("  {label} failed (attempt {}): {e:#}", attempt + 1);
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap()).context(format!("redis-benchmark {test} with {clients} clients failed twice"))
}

/// (rps, mean, p50, p99 latency in ms) of `test` in redis-benchmark's --csv output; latencies
/// are NaN where an older redis-benchmark prints only "test","rps".
fn parse_csv(out: &str, test: &str) -> Result<(f64, f64, f64, f64)> {
    let row = common::redis_benchmark_row(out, test)
        .with_context(|| format!("no {test} row with a throughput in redis-benchmark's output:\n{out}"))?;
    let get = |name: &str| row.get(name).copied().unwrap_or(f64::NAN);
    let rps = get("rps");
    if rps.is_nan() || rps <= 0.0 {
        bail!("no throughput in redis-benchmark's output:\n{out}");
    }
    Ok((rps, get("avg_latency_ms"), get("p50_latency_ms"), get("p99_latency_ms")))
}

#[derive(Deserialize)]
struct Inspect {
    summary: Summary,
    events: Vec<Event>,
}

#[derive(Deserialize)]
struct Summary {
    header: Header,
    valid_bytes: u64,
    guest_duration_ns: u64,
    by_kind: BTreeMap<String, crate::rr::KindCount>,
}

#[derive(Deserialize)]
struct Header {
    record_start_unix_ns: u64,
}

#[derive(Deserialize)]
struct Event {
    offset: u64,
    bytes: u64,
    kind: String,
    #[serde(default)]
    exit: Option<u64>,
    text: String,
}

/// Maps each benchmark's host-time window to guest time (the log's header has the host wall
/// time at record start; CLOCK records carry guest time, exit index and their offset) and
/// counts the exits and log bytes inside it.
pub(crate) fn per_request(ftvm: &Path, log: &Path, benches: &mut [Bench]) -> Result<LogTotals> {
    let out = Command::new(ftvm).args(["log", "inspect", "--json", "--events"]).arg(log).output()?;
    if !out.status.success() {
        bail!("ftvm log inspect {} failed: {}", log.display(), String::from_utf8_lossy(&out.stderr));
    }
    let i: Inspect = serde_json::from_slice(&out.stdout).context("parsing `ftvm log inspect --json --events`")?;
    // (guest ns, exit, offset) of every CLOCK record.
    let clocks: Vec<(u64, u64, u64)> = i
        .events
        .iter()
        .filter(|e| e.kind == "CLOCK")
        .filter_map(|e| {
            let t = e.text.split_whitespace().find_map(|w| w.strip_prefix("t="))?.strip_suffix('s')?;
            Some(((t.parse::<f64>().ok()? * 1e9) as u64, e.exit?, e.offset))
        })
        .collect();
    let start = i.summary.header.record_start_unix_ns;
    for b in benches.iter_mut() {
        let (g0, g1) = (b.window_unix_ns.0.saturating_sub(start), b.window_unix_ns.1.saturating_sub(start));
        let first = clocks.iter().find(|c| c.0 >= g0);
        let last = clocks.iter().rev().find(|c| c.0 <= g1);
        if let (Some(a), Some(z)) = (first, last) {
            if z.1 > a.1 {
                let n = b.requests as f64;
                b.exits_per_request = Some((z.1 - a.1) as f64 / n);
                b.log_bytes_per_request = Some((z.2 - a.2) as f64 / n);
                let rx: u64 = i
                    .events
                    .iter()
                    .filter(|e| e.kind == "NET_RX" && e.offset >= a.2 && e.offset < z.2)
                    .map(|e| e.bytes)
                    .sum();
                b.net_rx_bytes_per_request = Some(rx as f64 / n);
            }
        }
    }
    Ok(LogTotals {
        bytes: i.summary.valid_bytes,
        guest_s: i.summary.guest_duration_ns as f64 / 1e9,
        by_kind: i.summary.by_kind,
    })
}

fn print_table(r: &Report) {
    r.machine.print(&format!(
        "{} VM sessions per engine, one redis-benchmark run per test and client count in each",
        r.runs
    ));
    println!("{} against kvstore ({}), {} MiB disk\n", r.redis_benchmark, r.guest_cmdline, r.disk_mib);
    println!(
        "{:<4} {:>3}  {:<13} {:>10} {:>9} {:>9} {:>11} {:>11}",
        "test", "c", "engine", "req/s", "p50 ms", "p99 ms", "exits/req", "log B/req"
    );
    for cell in &r.cells {
        let opt = |s: &Option<Series>, prec: usize| s.as_ref().map_or("-".into(), |s| format!("{:.*}", prec, s.median));
        println!(
            "{:<4} {:>3}  {:<13} {:>10.0} {:>9.3} {:>9.3} {:>11} {:>11}",
            cell.test,
            cell.clients,
            cell.engine.label(),
            cell.rps.median,
            cell.p50_ms.median,
            cell.p99_ms.median,
            opt(&cell.exits_per_request, 2),
            opt(&cell.log_bytes_per_request, 1)
        );
    }
    println!();
    for ratio in &r.ratios {
        println!("{:<28} {:>8.3}  {}", ratio.name, ratio.value, ratio.goal_text());
    }
    for s in &r.sessions {
        let counts = s.counts.as_ref().map_or(String::new(), |c| {
            format!(
                "{} exits ({} port I/O, {} MMIO, {} HLT), {} interrupts, {} kicks",
                c.exits, c.port_io, c.mmio, c.hlt, c.interrupts, c.kicks
            )
        });
        let replay = s.replay_s.map_or(String::new(), |r| format!(", replay {r:.2} s"));
        println!("session {} {:<13} {:>7.2} s{replay}  {counts}", s.rep + 1, s.engine.label(), s.wall_s);
    }
}
