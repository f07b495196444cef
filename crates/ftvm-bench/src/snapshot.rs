//! The `snapshot` suite (live snapshots, benchmarks): the kvstore guest snapshotted while it
//! runs and restored, under ftvm (`ftvm ctl PATH snapshot DIR --json`, then `ftvm run
//! --restore DIR`) and, side by side, QEMU microvm (KVM) migrating to a file (QMP `migrate` to
//! `exec:cat > FILE` with block migration, then `-incoming "exec:cat FILE"`), for each guest
//! memory size, idle and under a redis-benchmark SET load with random keys, on the namespaced
//! test network (scripts/topology.sh). Writes snapshot.{json,svg}.
//!
//! One session is one engine, one memory size, one scenario: boot on a fresh blank disk, wait
//! for PING, write marker keys, then (`load`) start redis-benchmark, wait `--settle-s`, take
//! the snapshot (the VM goes on running), write a key that must not be in it, let the load
//! finish, stop the VM; restore it and time the restore until the guest answers PING; check
//! the restored guest's keys (the markers there, the later key not), write to it, stop it and
//! cold-boot its disk: the guest recovers its keys from the log on the disk, which must give
//! the key count the restored guest had in memory (the disk copy and the memory image were
//! taken at the same instant). Engines alternate within each round, the order reversed every
//! other round.
//!
//! The guest-side numbers come from the engines: ftvm's snapshot JSON (`elapsed_ms`,
//! `pause_ms`, `rounds`), QEMU's `query-migrate` (`total-time`, `downtime`) and its STOP and
//! RESUME events; the restore time is the bench's own, from starting the process to the first
//! `+PONG` (a client in the client namespace connecting every ~6 ms; the client's neighbour
//! entry for the guest is made permanent so that ARP is not part of it).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use ftvm_api::{SnapshotPhase, SnapshotProgress};

use crate::common::{self, Common, Machine, Prepared, Ratio, Running, Series};
use crate::kvstore::{Topology, GUEST_IP, READY};
use crate::plot;
use crate::redis_bench::Csv;
use crate::table::Table;

/// The guest's MAC under both engines (ftvm's default, QEMU's first NIC).
const GUEST_MAC: &str = "52:54:00:12:34:56";
/// Marker keys written before the snapshot (besides `snap:before`).
const MARKERS: usize = 100;
/// QEMU's migration bandwidth cap, lifted (its default is 128 MiB/s; ftvm's copy has none).
const QEMU_MAX_BANDWIDTH: u64 = 10 << 30;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Guest memory sizes: MiB, or with a unit (256M, 1G), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G", value_parser = ftvm_api::parse_mem_mib)]
    mem: Vec<u64>,
    /// Scenarios, comma-separated: idle (no client during the snapshot), load (redis-benchmark
    /// SETs with random keys running through it).
    #[arg(long, value_delimiter = ',', default_value = "idle,load")]
    scenarios: Vec<Scenario>,
    /// redis-benchmark clients of the load.
    #[arg(long, default_value_t = 20)]
    clients: u32,
    /// SETs of the load (it must outlast the snapshot: a session where it ended first says so).
    #[arg(long, default_value_t = 60_000)]
    load_requests: u64,
    /// Seconds between writing the markers (and starting the load) and the snapshot.
    #[arg(long, default_value_t = 1.0)]
    settle_s: f64,
    /// Size of each VM's fresh blank raw disk, MiB.
    #[arg(long, default_value_t = 64)]
    disk_mib: u64,
    /// Leave QEMU out.
    #[arg(long)]
    no_qemu: bool,
    /// Skip the cold boot of the restored guest's disk.
    #[arg(long)]
    no_reboot_check: bool,
    /// Skip the baseline: the same load without a snapshot, on the same VM just before.
    #[arg(long)]
    no_baseline: bool,
    #[command(flatten)]
    net: common::NetArgs,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// The kvstore guest with no client during the snapshot.
    Idle,
    /// redis-benchmark SETs with random keys during the snapshot.
    Load,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Load => "load",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Engine {
    Ftvm,
    /// QEMU microvm with KVM, the same TAP and virtio-mmio net, blk and rng.
    Qemu,
}

impl Engine {
    fn label(self) -> &'static str {
        match self {
            Engine::Ftvm => "ftvm",
            Engine::Qemu => "QEMU",
        }
    }
}

/// One snapshot as measured.
#[derive(Debug, Clone, Serialize)]
struct Snap {
    /// ftvm: `elapsed_ms` (start to manifest written, files synced); QEMU: `total-time`.
    total_ms: f64,
    /// ftvm: `pause_ms` (the paused round on the vCPU thread); QEMU: `downtime`.
    pause_ms: f64,
    /// Guest pages written in all rounds (QEMU: `ram.normal`, pages sent in full; zero pages
    /// are skipped by ftvm and sent as a flag by QEMU).
    pages_sent: u64,
    /// ftvm: copy rounds, the paused one included; QEMU: `dirty-sync-count`.
    rounds: u64,
    /// The bench's own wall time: ftvm's ctl command (it polls every 100 ms); QEMU's
    /// `migrate` until its MIGRATION completed event.
    wall_ms: f64,
    /// ftvm's rounds (round 0: every non-zero page; then what the guest dirtied; last: paused).
    #[serde(skip_serializing_if = "Option::is_none")]
    ftvm: Option<SnapshotProgress>,
    /// QEMU: STOP to RESUME event (the bench sends `cont` on the completed event): what the
    /// guest is stopped when the VM is to go on after a migration to a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_to_resume_ms: Option<f64>,
    /// QEMU: fsync of the migration file after completion (not in `total-time`; ftvm's
    /// `elapsed_ms` includes syncing its files).
    #[serde(skip_serializing_if = "Option::is_none")]
    fsync_ms: Option<f64>,
    /// QEMU: the `query-migrate` answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    query_migrate: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize)]
struct FileSize {
    name: String,
    logical: u64,
    allocated: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Size {
    /// Sum of the file sizes.
    logical_bytes: u64,
    /// Sum of the allocated blocks (st_blocks x 512): the files are sparse.
    allocated_bytes: u64,
    files: Vec<FileSize>,
}

/// redis-benchmark's result for the load (the whole run, the snapshot inside it).
#[derive(Debug, Clone, Serialize)]
struct Load {
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// The load was still running when the snapshot was complete (none: the baseline run).
    #[serde(skip_serializing_if = "Option::is_none")]
    covered_snapshot: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
struct Restore {
    /// Process start to the first `+PONG`.
    ready_ms: f64,
    /// ftvm's own "restored DIR ... in N ms" (manifest, disks, memory loaded and checked).
    #[serde(skip_serializing_if = "Option::is_none")]
    engine_ms: Option<f64>,
    /// DBSIZE of the restored guest after the checks (the markers, the load's keys, snap:post).
    keys: Option<u64>,
    /// The keys a cold boot of the restored guest's disk recovered from its log.
    #[serde(skip_serializing_if = "Option::is_none")]
    reboot_recovered: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Session {
    engine: Engine,
    mem_mib: u64,
    scenario: Scenario,
    rep: usize,
    boot_to_ready_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<Snap>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<Size>,
    /// The same load without a snapshot, on the same VM just before (`load` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<Load>,
    #[serde(skip_serializing_if = "Option::is_none")]
    load: Option<Load>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restore: Option<Restore>,
    /// What went wrong: a failed snapshot or restore, a wrong or missing key, a disk that
    /// disagrees. Empty: the restored guest answered and held exactly the snapshot's data.
    failures: Vec<String>,
}

/// Medians over the sessions of one (memory, scenario, engine).
#[derive(Debug, Serialize)]
struct Cell {
    mem_mib: u64,
    scenario: Scenario,
    engine: Engine,
    sessions: usize,
    /// Sessions with a failure (snapshot, restore or a check).
    failed: usize,
    total_ms: Series,
    pause_ms: Series,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_to_resume_ms: Option<Series>,
    pages_sent: Series,
    rounds: Series,
    /// ftvm: pages of round 0, re-sent in the later live rounds, in the paused round.
    #[serde(skip_serializing_if = "Option::is_none")]
    first_round_pages: Option<Series>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resent_pages: Option<Series>,
    #[serde(skip_serializing_if = "Option::is_none")]
    paused_pages: Option<Series>,
    allocated_mib: Series,
    logical_mib: Series,
    restore_ms: Series,
    #[serde(skip_serializing_if = "Option::is_none")]
    restore_engine_ms: Option<Series>,
    /// A cold boot on a blank disk, process start to the first PONG, for comparison.
    boot_ms: Series,
    #[serde(skip_serializing_if = "Option::is_none")]
    load_rps: Option<Series>,
    #[serde(skip_serializing_if = "Option::is_none")]
    load_max_ms: Option<Series>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_rps: Option<Series>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_max_ms: Option<Series>,
}

#[derive(Debug, Serialize)]
struct Report {
    suite: &'static str,
    machine: Machine,
    runs: usize,
    redis_benchmark: String,
    guest_cmdline: String,
    disk_mib: u64,
    load: String,
    qemu_migration: String,
    definitions: BTreeMap<&'static str, &'static str>,
    cells: Vec<Cell>,
    ratios: Vec<Ratio>,
    failed_sessions: usize,
    sessions: Vec<Session>,
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

pub fn run(common: &Common, args: &Args) -> Result<()> {
    if args.mem.is_empty() || args.scenarios.is_empty() {
        bail!("nothing to measure: give at least one --mem and one --scenarios");
    }
    let redis_benchmark = common::kvstore_network_suite(common, "snapshot", &args.net)?;
    let Prepared { common, machine, images, work } = common.prepare("snapshot", &["kvstore"], true)?;
    let common = &common;
    let runs = common.runs_or(3);
    let ctx = Ctx {
        common,
        args,
        redis_benchmark,
        ftvm: std::fs::canonicalize(&common.ftvm)?,
        kernel: images["kvstore"].clone(),
        work,
        cmdline: format!("ip={GUEST_IP}/24"),
    };
    let rb_version = common::version_of(&ctx.redis_benchmark)?;
    let mut engines = vec![Engine::Ftvm];
    if !args.no_qemu {
        engines.push(Engine::Qemu);
    }

    let topo = Topology::up(&args.net.topology, 1)?;
    // The guest's MAC is the same under both engines and after a restore: a permanent entry
    // keeps ARP out of the restore time (an entry that failed while the VM was down costs
    // a second or more of resolution).
    let out = Command::new("ip")
        .args(["-n", &topo.client(), "neigh", "replace", GUEST_IP, "lladdr", GUEST_MAC, "dev", "lan0"])
        .args(["nud", "permanent"])
        .output()?;
    if !out.status.success() {
        bail!("cannot set the client's neighbour entry: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut sessions = Vec::new();
    let total = runs * args.mem.len() * args.scenarios.len() * engines.len();
    for rep in 0..runs {
        for &mem in &args.mem {
            for &scenario in &args.scenarios {
                for k in 0..engines.len() {
                    let engine = if rep % 2 == 0 { engines[k] } else { engines[engines.len() - 1 - k] };
                    eprintln!(
                        "session {}/{total} (round {}/{runs}): {} {} MiB {}",
                        sessions.len() + 1,
                        rep + 1,
                        engine.label(),
                        mem,
                        scenario.label()
                    );
                    let s = session(&ctx, &topo, engine, mem, scenario, rep)?;
                    for f in &s.failures {
                        eprintln!("  FAILURE: {f}");
                    }
                    sessions.push(s);
                }
            }
        }
    }
    drop(topo);

    let mut cells = Vec::new();
    for &mem in &args.mem {
        for &scenario in &args.scenarios {
            for &engine in &engines {
                cells.push(cell(&sessions, mem, scenario, engine));
            }
        }
    }
    let mut ratios = Vec::new();
    if !args.no_qemu {
        for &mem in &args.mem {
            for &scenario in &args.scenarios {
                let find =
                    |e: Engine| cells.iter().find(|c| c.mem_mib == mem && c.scenario == scenario && c.engine == e);
                let (Some(f), Some(q)) = (find(Engine::Ftvm), find(Engine::Qemu)) else { continue };
                let name = |what: &str| format!("{} {} {what}", mem_label(mem), scenario.label());
                let ratio = |a: &Series, b: &Series| med(a) / med(b);
                ratios.push(
                    Ratio::new(name("total"), ratio(&f.total_ms, &q.total_ms))
                        .note("ftvm elapsed_ms / QEMU total-time"),
                );
                ratios.push(
                    Ratio::new(name("pause"), ratio(&f.pause_ms, &q.pause_ms)).note("ftvm pause_ms / QEMU downtime"),
                );
                ratios.push(
                    Ratio::new(name("restore"), ratio(&f.restore_ms, &q.restore_ms))
                        .note("process start to the first PONG"),
                );
            }
        }
    }
    let failed_sessions = sessions.iter().filter(|s| !s.failures.is_empty()).count();
    let report = Report {
        suite: "snapshot",
        machine,
        runs,
        redis_benchmark: rb_version,
        guest_cmdline: ctx.cmdline.clone(),
        disk_mib: args.disk_mib,
        load: format!(
            "redis-benchmark -c {} -n {} -t set -r 1000000 --csv, started {} s before the snapshot",
            args.clients, args.load_requests, args.settle_s
        ),
        qemu_migration: format!(
            "migrate-set-capabilities events, zero-blocks; migrate-set-parameters max-bandwidth {} (downtime-limit left at its default); migrate uri exec:cat > FILE, blk true; cont on the MIGRATION completed event; restore: -incoming \"exec:cat FILE\" with a blank disk",
            QEMU_MAX_BANDWIDTH
        ),
        definitions: definitions(),
        cells,
        ratios,
        failed_sessions,
        sessions,
    };
    let bars = plot::ratio_bars(&report.ratios);
    let svg = plot::bars("live snapshot: ftvm / QEMU migration to a file (medians; lower is faster)", &bars);
    common::publish(&common.out, "snapshot", &report, &svg, print_table)?;
    // ftvm's failures fail the suite; QEMU's are findings about the peer, reported above.
    let failed = |e: Engine| report.sessions.iter().filter(|s| s.engine == e && !s.failures.is_empty()).count();
    let of = |e: Engine| report.sessions.iter().filter(|s| s.engine == e).count();
    if failed(Engine::Qemu) > 0 {
        println!(
            "note: {} of {} QEMU sessions failed (see FAILURE above and the JSON); their snapshots are kept",
            failed(Engine::Qemu),
            of(Engine::Qemu)
        );
    }
    if failed(Engine::Ftvm) > 0 {
        bail!("{} of {} ftvm sessions failed (see FAILURE above and the JSON)", failed(Engine::Ftvm), of(Engine::Ftvm));
    }
    Ok(())
}

fn definitions() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("total_ms", "ftvm: elapsed_ms of the snapshot JSON (start to manifest written, files fsynced); QEMU: query-migrate total-time (not fsynced; fsync_ms is the fsync after)"),
        ("pause_ms", "ftvm: pause_ms (the paused round on the vCPU thread: last dirty pages and blocks, vCPU and device state); QEMU: query-migrate downtime"),
        ("stop_to_resume_ms", "QEMU: STOP to RESUME event; the bench sends cont on the MIGRATION completed event"),
        ("pages_sent", "ftvm: sum of pages over the rounds (zero pages skipped); QEMU: ram.normal (zero pages go as flags, ram.duplicate)"),
        ("rounds", "ftvm: copy rounds, the paused one included; QEMU: ram.dirty-sync-count"),
        ("size", "logical: file sizes; allocated: st_blocks x 512 (ftvm's memory.bin and disk copy are sparse)"),
        ("restore_ms", "process start (ftvm run --restore / qemu -incoming) to the first +PONG from the client namespace"),
        ("boot_ms", "a cold boot on a blank disk, process start to the first +PONG (what a restore saves)"),
        ("baseline", "load only: the same redis-benchmark run on the same VM just before, without a snapshot"),
        ("load", "redis-benchmark's result for the run the snapshot was taken in (rps and latencies over the whole run)"),
        ("restore_engine_ms", "ftvm's own log line: restored DIR in N ms (manifest, disk copies, memory loaded and checksummed)"),
        ("failures", "a failed snapshot or restore; a marker key written before the snapshot missing or wrong; the key written after it present; a write to the restored guest failing; a cold boot of its disk recovering another key count than it had"),
    ])
}

/// The median, NaN without samples (a Series starts at 0).
fn med(s: &Series) -> f64 {
    if s.samples.is_empty() {
        f64::NAN
    } else {
        s.median
    }
}

fn mem_label(mib: u64) -> String {
    if mib >= 1024 && mib % 1024 == 0 {
        format!("{}G", mib / 1024)
    } else {
        format!("{mib}M")
    }
}

fn cell(sessions: &[Session], mem: u64, scenario: Scenario, engine: Engine) -> Cell {
    let ss: Vec<&Session> =
        sessions.iter().filter(|s| s.mem_mib == mem && s.scenario == scenario && s.engine == engine).collect();
    let mut c = Cell {
        mem_mib: mem,
        scenario,
        engine,
        sessions: ss.len(),
        failed: ss.iter().filter(|s| !s.failures.is_empty()).count(),
        total_ms: Series::default(),
        pause_ms: Series::default(),
        stop_to_resume_ms: None,
        pages_sent: Series::default(),
        rounds: Series::default(),
        first_round_pages: None,
        resent_pages: None,
        paused_pages: None,
        allocated_mib: Series::default(),
        logical_mib: Series::default(),
        restore_ms: Series::default(),
        restore_engine_ms: None,
        boot_ms: Series::default(),
        load_rps: None,
        load_max_ms: None,
        baseline_rps: None,
        baseline_max_ms: None,
    };
    let opt_push = |o: &mut Option<Series>, v: f64| o.get_or_insert_with(Series::default).push(v);
    for s in ss {
        c.boot_ms.push(s.boot_to_ready_s * 1e3);
        if let Some(snap) = &s.snapshot {
            c.total_ms.push(snap.total_ms);
            c.pause_ms.push(snap.pause_ms);
            c.pages_sent.push(snap.pages_sent as f64);
            c.rounds.push(snap.rounds as f64);
            if let Some(v) = snap.stop_to_resume_ms {
                opt_push(&mut c.stop_to_resume_ms, v);
            }
            if let Some(p) = &snap.ftvm {
                let n = p.rounds.len();
                if n >= 2 {
                    opt_push(&mut c.first_round_pages, p.rounds[0].pages as f64);
                    opt_push(&mut c.resent_pages, p.rounds[1..n - 1].iter().map(|r| r.pages).sum::<u64>() as f64);
                    opt_push(&mut c.paused_pages, p.rounds[n - 1].pages as f64);
                }
            }
        }
        if let Some(size) = &s.size {
            c.allocated_mib.push(size.allocated_bytes as f64 / (1 << 20) as f64);
            c.logical_mib.push(size.logical_bytes as f64 / (1 << 20) as f64);
        }
        if let Some(r) = &s.restore {
            c.restore_ms.push(r.ready_ms);
            if let Some(v) = r.engine_ms {
                opt_push(&mut c.restore_engine_ms, v);
            }
        }
        if let Some(l) = &s.load {
            opt_push(&mut c.load_rps, l.rps);
            opt_push(&mut c.load_max_ms, l.max_ms);
        }
        if let Some(l) = &s.baseline {
            opt_push(&mut c.baseline_rps, l.rps);
            opt_push(&mut c.baseline_max_ms, l.max_ms);
        }
    }
    c
}

fn fresh_disk(ctx: &Ctx, name: &str) -> Result<PathBuf> {
    common::fresh_disk(&ctx.work, name, ctx.args.disk_mib)
}

/// How a VM starts: booting (with or without a control socket) or restoring.
enum Start<'a> {
    Boot {
        disk: &'a Path,
        control: Option<&'a Path>,
    },
    /// ftvm: the snapshot directory; QEMU: the migration file. `disk` gets the restored disk.
    Restore {
        from: &'a Path,
        disk: &'a Path,
    },
}

/// `ip netns exec P-h1 <engine> ...`: the same VM under both engines (memory, kvstore on
/// virtio net, blk and rng, the guest's command line).
fn vm_command(ctx: &Ctx, topo: &Topology, engine: Engine, mem: u64, start: &Start) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &topo.host_n(1)]);
    match engine {
        Engine::Ftvm => {
            cmd.arg(&ctx.ftvm).arg("run");
            match start {
                Start::Boot { disk, control } => {
                    if let Some(sock) = control {
                        cmd.arg("--api-socket").arg(sock);
                    }
                    cmd.args(["--mem", &format!("{mem}M"), "--net", "tap=tap0", "--rng", "--disk"]).arg(disk);
                    cmd.arg("--kernel").arg(&ctx.kernel).arg("--cmdline").arg(&ctx.cmdline);
                }
                Start::Restore { from, disk } => {
                    // info: for the "restored ... in N ms" line.
                    cmd.args(["--log-level", "info", "--restore"]).arg(from);
                    cmd.args(["--net", "tap=tap0", "--disk"]).arg(disk);
                }
            }
        }
        Engine::Qemu => {
            // As in the kvstore suite: acpi=off lists the virtio-mmio devices on the command
            // line with IRQs the guest can route; force-legacy=false gives virtio 1.x.
            cmd.arg(&ctx.common.qemu);
            cmd.args(["-M", "microvm,rtc=on,acpi=off", "-enable-kvm", "-m", &mem.to_string(), "-display", "none"]);
            cmd.args(["-serial", "stdio", "-monitor", "none", "-no-reboot"]);
            cmd.args(["-global", "virtio-mmio.force-legacy=false"]);
            cmd.arg("-kernel").arg(&ctx.kernel).arg("-append").arg(&ctx.cmdline);
            cmd.args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]);
            cmd.args(["-device", "virtio-net-device,netdev=n0"]);
            let disk = match start {
                Start::Boot { disk, .. } | Start::Restore { disk, .. } => disk,
            };
            cmd.arg("-drive").arg(format!("id=d0,file={},format=raw,if=none", disk.display()));
            cmd.args(["-device", "virtio-blk-device,drive=d0"]);
            cmd.args(["-object", "rng-random,id=r0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=r0"]);
            match start {
                Start::Boot { control: Some(sock), .. } => {
                    cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", sock.display()));
                }
                Start::Boot { control: None, .. } => {}
                Start::Restore { from, .. } => {
                    cmd.arg("-incoming").arg(format!("exec:cat '{}'", from.display()));
                }
            }
        }
    }
    cmd
}

fn session(ctx: &Ctx, topo: &Topology, engine: Engine, mem: u64, scenario: Scenario, rep: usize) -> Result<Session> {
    let tag = format!("{}-{}-{}-{rep}", engine.label().to_lowercase(), mem_label(mem), scenario.label());
    let disk = fresh_disk(ctx, "disk.img")?;
    let sock = ctx.work.join(match engine {
        Engine::Ftvm => "api.sock",
        Engine::Qemu => "qmp.sock",
    });
    let _ = std::fs::remove_file(&sock);
    let snap_path = ctx.work.join(format!("snap-{tag}"));
    let _ = std::fs::remove_dir_all(&snap_path);
    let _ = std::fs::remove_file(&snap_path);
    let mut s = Session {
        engine,
        mem_mib: mem,
        scenario,
        rep,
        boot_to_ready_s: 0.0,
        snapshot: None,
        size: None,
        baseline: None,
        load: None,
        restore: None,
        failures: Vec::new(),
    };

    let label = format!("{} ({} MiB)", engine.label(), mem);
    let t0 = Instant::now();
    let mut vm = Running::spawn(
        &label,
        &mut vm_command(ctx, topo, engine, mem, &Start::Boot { disk: &disk, control: Some(&sock) }),
    )?;
    vm.wait_for_output(READY, Duration::from_secs(120))?;
    wait_pong(topo, t0, Duration::from_secs(60)).with_context(|| format!("{label}: {}", vm.stdout_text()))?;
    s.boot_to_ready_s = t0.elapsed().as_secs_f64();
    if scenario == Scenario::Load && !ctx.args.no_baseline {
        let l = Running::spawn("redis-benchmark (baseline)", &mut load_command(ctx, topo))?;
        let l = finish_load(ctx, l, None)?;
        eprintln!("  baseline: {:.0} SET/s, p99 {:.3} ms, max {:.3} ms (no snapshot)", l.rps, l.p99_ms, l.max_ms);
        s.baseline = Some(l);
        common::sleep(Duration::from_millis(500))?;
    }
    let token = format!("{tag}-{}", unix_ns());
    set_markers(topo, &token)?;
    let mut qmp = match engine {
        Engine::Qemu => Some(Qmp::connect(&sock)?),
        Engine::Ftvm => None,
    };
    let mut load = match scenario {
        Scenario::Idle => None,
        Scenario::Load => Some(Running::spawn("redis-benchmark (load)", &mut load_command(ctx, topo))?),
    };
    common::sleep(Duration::from_secs_f64(ctx.args.settle_s))?;
    let snap = match engine {
        Engine::Ftvm => ftvm_snapshot(ctx, &sock, &snap_path),
        Engine::Qemu => qemu_snapshot(qmp.as_mut().context("no QMP")?, &snap_path),
    };
    let covered = match load.as_mut() {
        Some(l) => Some(!l.has_exited()?),
        None => None,
    };
    let snapshot_ok = match snap {
        Ok(snap) => {
            eprintln!(
                "  snapshot: {:.1} ms in all, paused {:.2} ms, {} pages in {} rounds{}",
                snap.total_ms,
                snap.pause_ms,
                snap.pages_sent,
                snap.rounds,
                snap.ftvm.as_ref().map_or(String::new(), |p| format!(
                    " ({})",
                    p.rounds.iter().map(|r| r.pages.to_string()).collect::<Vec<_>>().join(" + ")
                ))
            );
            s.snapshot = Some(snap);
            true
        }
        Err(e) => {
            s.failures.push(format!("snapshot: {e:#}"));
            false
        }
    };
    // Written after the snapshot: must not be in the restored guest.
    if let Err(e) = kv(topo, vec![cmd(&["SET", "snap:after", &token])]) {
        s.failures.push(format!("the VM did not take a write after the snapshot: {e:#}"));
    }
    if let Some(l) = load.take() {
        match finish_load(ctx, l, covered) {
            Ok(l) => {
                eprintln!(
                    "  load: {:.0} SET/s, p99 {:.3} ms, max {:.3} ms{}",
                    l.rps,
                    l.p99_ms,
                    l.max_ms,
                    if l.covered_snapshot == Some(false) { " (ENDED BEFORE THE SNAPSHOT WAS COMPLETE)" } else { "" }
                );
                s.load = Some(l);
            }
            Err(e) => s.failures.push(format!("{e:#}")),
        }
    }
    drop(qmp);
    vm.terminate(Duration::from_secs(10))?;
    if !snapshot_ok {
        return Ok(s);
    }
    s.size = Some(measure_size(&snap_path)?);
    restore_and_check(ctx, topo, &mut s, &snap_path, &token)?;
    if s.failures.is_empty() {
        let _ = std::fs::remove_dir_all(&snap_path);
        let _ = std::fs::remove_file(&snap_path);
    } else {
        s.failures.push(format!("the snapshot is kept in {}", snap_path.display()));
    }
    for d in ["disk.img", "restored.img"] {
        let _ = std::fs::remove_file(ctx.work.join(d));
    }
    Ok(s)
}

/// `ip netns exec P-c redis-benchmark ...`: the load, SETs with random keys.
fn load_command(ctx: &Ctx, topo: &Topology) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &topo.client()]).arg(&ctx.redis_benchmark);
    cmd.args(["-h", GUEST_IP, "-p", "6379", "-c", &ctx.args.clients.to_string()]);
    cmd.args(["-n", &ctx.args.load_requests.to_string(), "-t", "set", "-r", "1000000", "--csv"]);
    cmd
}

/// Waits for the load to end and reads its result.
fn finish_load(ctx: &Ctx, load: Running, covered_snapshot: Option<bool>) -> Result<Load> {
    let f = load.finish(Duration::from_secs(120 + ctx.args.load_requests / 1000))?;
    let row = Csv::parse(&f.stdout, "SET")
        .with_context(|| format!("the load's redis-benchmark gave no result: {}", f.describe()))?;
    Ok(Load {
        requests: ctx.args.load_requests,
        rps: row.rps,
        p50_ms: row.p50_ms,
        p99_ms: row.p99_ms,
        max_ms: row.max_ms,
        covered_snapshot,
    })
}

/// Restores the snapshot, times it until the guest answers, checks its keys, writes to it,
/// and cold-boots its disk to compare the recovered key count.
fn restore_and_check(ctx: &Ctx, topo: &Topology, s: &mut Session, snap: &Path, token: &str) -> Result<()> {
    let (engine, mem) = (s.engine, s.mem_mib);
    let disk = match engine {
        // QEMU's block migration writes the disk into the one the destination has.
        Engine::Qemu => fresh_disk(ctx, "restored.img")?,
        Engine::Ftvm => {
            let d = ctx.work.join("restored.img");
            let _ = std::fs::remove_file(&d);
            d
        }
    };
    let label = format!("{} restore ({} MiB)", engine.label(), mem);
    let t0 = Instant::now();
    let vm =
        Running::spawn(&label, &mut vm_command(ctx, topo, engine, mem, &Start::Restore { from: snap, disk: &disk }))?;
    let ready = match wait_pong(topo, t0, Duration::from_secs(30)) {
        Ok(d) => d,
        Err(e) => {
            let f = vm.terminate(Duration::from_secs(10))?;
            s.failures.push(format!("restore: {e:#}: {}", f.describe()));
            return Ok(());
        }
    };
    let engine_ms = parse_restored_ms(&vm.stderr_text());
    let mut r = Restore { ready_ms: ready.as_secs_f64() * 1e3, engine_ms, keys: None, reboot_recovered: None };
    eprintln!(
        "  restore: answered PING {:.1} ms after start{}",
        r.ready_ms,
        engine_ms.map_or(String::new(), |m| format!(" (ftvm: restored in {m:.0} ms)"))
    );
    s.failures.extend(check_markers(topo, token));
    match kv(topo, vec![cmd(&["SET", "snap:post", token]), cmd(&["GET", "snap:post"]), cmd(&["DBSIZE"])]) {
        Ok(replies) => {
            if replies[0] != Reply::Status("OK".into()) || replies[1] != Reply::Bulk(Some(token.as_bytes().to_vec())) {
                s.failures.push(format!("the restored guest did not take a write: {replies:?}"));
            }
            match replies[2] {
                Reply::Int(n) => r.keys = Some(n as u64),
                ref other => s.failures.push(format!("DBSIZE answered {other:?}")),
            }
        }
        Err(e) => s.failures.push(format!("the restored guest did not take a write: {e:#}")),
    }
    let f = vm.terminate(Duration::from_secs(10))?;
    if engine == Engine::Ftvm && !f.stderr.contains("restored ") {
        s.failures.push(format!("ftvm's restore did not log its restore line: {}", f.describe()));
    }
    if !ctx.args.no_reboot_check {
        if let Some(keys) = r.keys {
            let mut vm = Running::spawn(
                format!("{} cold boot of the restored disk", engine.label()),
                &mut vm_command(ctx, topo, engine, mem, &Start::Boot { disk: &disk, control: None }),
            )?;
            vm.wait_for_output(READY, Duration::from_secs(120))?;
            let console = vm.stdout_text();
            vm.terminate(Duration::from_secs(10))?;
            match parse_recovered(&console) {
                Some(n) => {
                    r.reboot_recovered = Some(n);
                    if n != keys {
                        s.failures.push(format!(
                            "a cold boot of the restored guest's disk recovered {n} keys; the restored guest held {keys}"
                        ));
                    }
                }
                None => s.failures.push(format!("the cold boot printed no recovered line: {console}")),
            }
        }
    }
    s.restore = Some(r);
    Ok(())
}

/// "kvstore: recovered N keys from ..."
fn parse_recovered(console: &str) -> Option<u64> {
    let line = console.lines().find(|l| l.contains("kvstore: recovered "))?;
    line.split("kvstore: recovered ").nth(1)?.split_whitespace().next()?.parse().ok()
}

/// ftvm's "restored DIR (guest time T s) in N ms".
fn parse_restored_ms(stderr: &str) -> Option<f64> {
    let line = stderr.lines().find(|l| l.contains(" restored ") && l.trim_end().ends_with(" ms"))?;
    line.trim_end().strip_suffix(" ms")?.rsplit(" in ").next()?.trim().parse().ok()
}

fn ftvm_snapshot(ctx: &Ctx, sock: &Path, dir: &Path) -> Result<Snap> {
    let mut cmd = Command::new(&ctx.ftvm);
    cmd.arg("ctl").arg(sock).arg("snapshot").arg(dir).arg("--json");
    let f = common::run("ftvm ctl snapshot", &mut cmd, Duration::from_secs(600))?;
    let p: SnapshotProgress = serde_json::from_str(&f.stdout)
        .with_context(|| format!("ftvm ctl snapshot printed no progress JSON: {}", f.describe()))?;
    if p.phase != SnapshotPhase::Done || !f.status.success() {
        bail!("phase {:?}: {} ({})", p.phase, p.error.as_deref().unwrap_or("no error given"), f.status);
    }
    Ok(Snap {
        total_ms: p.elapsed_ms,
        pause_ms: p.pause_ms.unwrap_or(f64::NAN),
        pages_sent: p.rounds.iter().map(|r| r.pages).sum(),
        rounds: p.rounds.len() as u64,
        wall_ms: f.wall_s() * 1e3,
        ftvm: Some(p),
        stop_to_resume_ms: None,
        fsync_ms: None,
        query_migrate: None,
    })
}

fn qemu_snapshot(qmp: &mut Qmp, file: &Path) -> Result<Snap> {
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "zero-blocks", "state": true},
        ]}),
    )?;
    qmp.execute("migrate-set-parameters", json!({"max-bandwidth": QEMU_MAX_BANDWIDTH}))?;
    qmp.events.clear();
    let t0 = Instant::now();
    qmp.execute("migrate", json!({"uri": format!("exec:cat > '{}'", file.display()), "blk": true}))?;
    let done = qmp.wait_event(Duration::from_secs(600), |e| {
        e.event == "MIGRATION" && matches!(e.data["status"].as_str(), Some("completed" | "failed" | "cancelled"))
    })?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let status = done.data["status"].as_str().unwrap_or_default().to_string();
    if status != "completed" {
        let info = qmp.execute("query-migrate", json!({})).unwrap_or_default();
        // Let the guest go on either way.
        let _ = cont(qmp);
        bail!("QEMU migration {status}: {info}");
    }
    cont(qmp)?;
    let info = qmp.execute("query-migrate", json!({}))?;
    let resume = qmp.wait_event(Duration::from_secs(10), |e| e.event == "RESUME")?;
    let stop = qmp.events.iter().find(|e| e.event == "STOP").map(|e| e.at_us);
    let t = Instant::now();
    std::fs::File::open(file).and_then(|f| f.sync_all()).with_context(|| format!("fsync {}", file.display()))?;
    let fsync_ms = t.elapsed().as_secs_f64() * 1e3;
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    Ok(Snap {
        total_ms: num(&info["total-time"]),
        pause_ms: num(&info["downtime"]),
        pages_sent: info["ram"]["normal"].as_u64().unwrap_or(0),
        rounds: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
        wall_ms,
        ftvm: None,
        stop_to_resume_ms: stop.map(|s| resume.at_us.saturating_sub(s) as f64 / 1e3),
        fsync_ms: Some(fsync_ms),
        query_migrate: Some(info),
    })
}

/// `cont` as soon as QEMU takes it: the MIGRATION completed event comes while the run state
/// is still finish-migrate ("Migration is not finalized yet") until the migration's cleanup ran.
fn cont(qmp: &mut Qmp) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match qmp.execute("cont", json!({})) {
            Ok(_) => return Ok(()),
            Err(e) if format!("{e}").contains("not finalized") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_micros(500));
            }
            Err(e) => return Err(e),
        }
    }
}

fn measure_size(path: &Path) -> Result<Size> {
    let mut size = Size::default();
    let mut add = |p: &Path| -> Result<()> {
        let m = std::fs::metadata(p).with_context(|| format!("stat {}", p.display()))?;
        let f = FileSize {
            name: p.file_name().unwrap_or_default().to_string_lossy().into_owned(),
            logical: m.len(),
            allocated: m.blocks() * 512,
        };
        size.logical_bytes += f.logical;
        size.allocated_bytes += f.allocated;
        size.files.push(f);
        Ok(())
    };
    if path.is_dir() {
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(path)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
        entries.sort();
        for p in entries {
            add(&p)?;
        }
    } else {
        add(path)?;
    }
    Ok(size)
}

fn unix_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

// ---- A client in the client namespace ----

/// Runs `f` on a thread of its own moved into the network namespace `ns` (`ip netns`'
/// /run/netns/NS), from where the guest is reachable; returns what `f` returns.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: setns(2) with a namespace file we hold open; it moves only this thread,
        // which ends with `f`.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns({}): {}", path.display(), std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow!("the client thread panicked"))?
}

#[derive(Debug, Clone, PartialEq)]
enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
}

fn cmd(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// A RESP connection to the guest.
struct Kv {
    stream: BufReader<TcpStream>,
}

impl Kv {
    fn connect(timeout: Duration) -> std::io::Result<Kv> {
        let ip: Ipv4Addr = GUEST_IP.parse().expect("GUEST_IP is an IPv4 address");
        let s = TcpStream::connect_timeout(&SocketAddr::from((ip, 6379)), timeout)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        s.set_nodelay(true)?;
        Ok(Kv { stream: BufReader::new(s) })
    }

    /// Sends the commands in one write (a pipeline) and reads one reply each.
    fn send(&mut self, cmds: &[Vec<String>]) -> Result<Vec<Reply>> {
        let mut out = Vec::new();
        for c in cmds {
            write!(out, "*{}\r\n", c.len())?;
            for a in c {
                write!(out, "${}\r\n{a}\r\n", a.len())?;
            }
        }
        self.stream.get_mut().write_all(&out)?;
        cmds.iter().map(|_| self.reply()).collect()
    }

    fn reply(&mut self) -> Result<Reply> {
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            bail!("the guest closed the connection");
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let (kind, rest) = line.split_at(line.len().min(1));
        Ok(match kind {
            "+" => Reply::Status(rest.into()),
            "-" => Reply::Error(rest.into()),
            ":" => Reply::Int(rest.parse().with_context(|| format!("bad integer reply {line:?}"))?),
            "$" => {
                let n: i64 = rest.parse().with_context(|| format!("bad bulk reply {line:?}"))?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut buf = vec![0u8; n as usize + 2];
                    self.stream.read_exact(&mut buf)?;
                    buf.truncate(n as usize);
                    Reply::Bulk(Some(buf))
                }
            }
            _ => bail!("unexpected reply {line:?}"),
        })
    }
}

/// One connection from the client namespace, the commands pipelined, their replies.
fn kv(topo: &Topology, cmds: Vec<Vec<String>>) -> Result<Vec<Reply>> {
    in_netns(&topo.client(), move || {
        let mut kv = Kv::connect(Duration::from_secs(5)).context("cannot connect to the guest")?;
        kv.send(&cmds)
    })
}

/// Connects every ~6 ms from the client namespace until the guest answers PING; returns the
/// time from `since` to the first `+PONG`. (A SYN sent before the VM reads its TAP is lost,
/// and TCP would send it again only after a second: hence new connections, not one waiting.)
fn wait_pong(topo: &Topology, since: Instant, timeout: Duration) -> Result<Duration> {
    in_netns(&topo.client(), move || {
        let ping = [cmd(&["PING"])];
        loop {
            common::check_interrupted()?;
            if let Ok(mut kv) = Kv::connect(Duration::from_millis(5)) {
                if let Ok(r) = kv.send(&ping) {
                    if r[0] == Reply::Status("PONG".into()) {
                        return Ok(since.elapsed());
                    }
                }
            }
            if since.elapsed() >= timeout {
                bail!("the guest did not answer PING within {} s", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}

fn marker_key(i: usize) -> String {
    format!("snap:k:{i}")
}

fn marker_value(token: &str, i: usize) -> String {
    format!("{token}-{i}")
}

/// `snap:before` and MARKERS more keys, all written before the snapshot.
fn set_markers(topo: &Topology, token: &str) -> Result<()> {
    let mut cmds = vec![cmd(&["SET", "snap:before", token])];
    cmds.extend((0..MARKERS).map(|i| vec!["SET".into(), marker_key(i), marker_value(token, i)]));
    let replies = kv(topo, cmds)?;
    if let Some(bad) = replies.iter().find(|r| **r != Reply::Status("OK".into())) {
        bail!("writing the marker keys: the guest answered {bad:?}");
    }
    Ok(())
}

/// The failures of the restored guest's keys: every marker there with its value, the key
/// written after the snapshot not there.
fn check_markers(topo: &Topology, token: &str) -> Vec<String> {
    let mut cmds = vec![cmd(&["GET", "snap:before"]), cmd(&["GET", "snap:after"])];
    cmds.extend((0..MARKERS).map(|i| vec!["GET".into(), marker_key(i)]));
    let replies = match kv(topo, cmds) {
        Ok(r) => r,
        Err(e) => return vec![format!("reading the markers from the restored guest: {e:#}")],
    };
    let bulk = |s: &str| Reply::Bulk(Some(s.as_bytes().to_vec()));
    let mut failures = Vec::new();
    if replies[0] != bulk(token) {
        failures.push(format!("snap:before (written before the snapshot) is {:?} after the restore", replies[0]));
    }
    if replies[1] != Reply::Bulk(None) {
        failures.push(format!("snap:after (written after the snapshot) is {:?} after the restore", replies[1]));
    }
    let wrong = (0..MARKERS).filter(|&i| replies[i + 2] != bulk(&marker_value(token, i))).count();
    if wrong > 0 {
        failures.push(format!("{wrong} of {MARKERS} marker keys are missing or wrong after the restore"));
    }
    failures
}

// ---- QMP ----

#[derive(Debug, Clone, Serialize)]
struct QmpEvent {
    event: String,
    /// QEMU's timestamp, microseconds since 1970.
    at_us: u64,
    data: Value,
}

/// A QMP connection (one JSON object a line; events are kept as they come).
struct Qmp {
    stream: UnixStream,
    buf: Vec<u8>,
    events: Vec<QmpEvent>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let stream =
            UnixStream::connect(path).with_context(|| format!("cannot connect to QMP at {}", path.display()))?;
        // Short reads, so that a wait can notice Ctrl-C and its deadline.
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut q = Qmp { stream, buf: Vec::new(), events: Vec::new() };
        let greeting = q.read(Instant::now() + Duration::from_secs(10))?;
        if greeting.get("QMP").is_none() {
            bail!("no QMP greeting: {greeting}");
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// The next message; an event is also stored.
    fn read(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let v: Value = serde_json::from_slice(&line).context("QMP sent a line that is not JSON")?;
                if let Some(event) = v.get("event").and_then(|e| e.as_str()) {
                    let ts = &v["timestamp"];
                    let at_us =
                        ts["seconds"].as_u64().unwrap_or(0) * 1_000_000 + ts["microseconds"].as_u64().unwrap_or(0);
                    self.events.push(QmpEvent { event: event.into(), at_us, data: v["data"].clone() });
                }
                return Ok(v);
            }
            common::check_interrupted()?;
            if Instant::now() >= deadline {
                bail!("QMP: nothing from QEMU in time (events so far: {:?})", self.events);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("QEMU closed its QMP socket"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) => return Err(e).context("reading QMP"),
            }
        }
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let msg = if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            json!({"execute": command, "arguments": arguments})
        } else {
            json!({"execute": command})
        };
        writeln!(self.stream, "{msg}").context("writing to QMP")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let r = loop {
            let v = self.read(deadline)?;
            if v.get("event").is_none() {
                break v;
            }
        };
        if let Some(e) = r.get("error") {
            bail!("QMP {command}: {e}");
        }
        Ok(r.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Waits for an event (among those already come, or coming).
    fn wait_event(&mut self, timeout: Duration, pred: impl Fn(&QmpEvent) -> bool) -> Result<QmpEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events.iter().find(|e| pred(e)) {
                return Ok(e.clone());
            }
            let v = self.read(deadline).context("waiting for a QMP event")?;
            if v.get("event").is_none() {
                bail!("QMP: an answer nobody asked for: {v}");
            }
        }
    }
}

// ---- Output ----

fn print_table(r: &Report) {
    r.machine.print(&format!(
        "{} sessions per engine, memory size and scenario; engines alternate, the order reversed every other round",
        r.runs
    ));
    println!("kvstore ({}), {} MiB disk; load: {}", r.guest_cmdline, r.disk_mib, r.load);
    println!("QEMU: {}\n", r.qemu_migration);
    let mut t = Table::new().left("mem", 5).left("load", 5).left("eng", 5).right("total ms", 9).right("pause ms", 9);
    t = t.right("stop→run", 9).right("rounds", 7).right("pages r0/resent/paused", 22).right("alloc/logical MiB", 17);
    t = t.right("restore", 9).right("(own ms)", 9).right("boot", 6).right("SET/s snap/base", 15);
    t = t.right("max ms snap/base", 16).right("failed", 7);
    let n = |v: f64, p: usize| if v.is_nan() { "-".to_string() } else { format!("{v:.p$}") };
    let m = |s: &Option<Series>, p: usize| s.as_ref().map_or("-".to_string(), |s| n(med(s), p));
    for c in &r.cells {
        let pages = match (&c.first_round_pages, &c.resent_pages, &c.paused_pages) {
            (Some(a), Some(b), Some(p)) => format!("{}/{}/{}", n(med(a), 0), n(med(b), 0), n(med(p), 0)),
            _ => format!("{} in all", n(med(&c.pages_sent), 0)),
        };
        t.row([
            mem_label(c.mem_mib),
            c.scenario.label().to_string(),
            c.engine.label().to_string(),
            n(med(&c.total_ms), 1),
            n(med(&c.pause_ms), 2),
            m(&c.stop_to_resume_ms, 1),
            n(med(&c.rounds), 0),
            pages,
            format!("{}/{}", n(med(&c.allocated_mib), 1), n(med(&c.logical_mib), 0)),
            n(med(&c.restore_ms), 1),
            m(&c.restore_engine_ms, 0),
            n(med(&c.boot_ms), 0),
            format!("{}/{}", m(&c.load_rps, 0), m(&c.baseline_rps, 0)),
            format!("{}/{}", m(&c.load_max_ms, 1), m(&c.baseline_max_ms, 1)),
            format!("{}/{}", c.failed, c.sessions),
        ]);
    }
    t.print();
    if !r.ratios.is_empty() {
        println!("\nftvm / QEMU (medians; below 1: ftvm is faster)");
        crate::table::ratios("  ", &r.ratios, 3).print();
    }
    println!("\nsessions:");
    for s in &r.sessions {
        let snap = s.snapshot.as_ref().map_or("snapshot FAILED".to_string(), |p| {
            let rounds = p.ftvm.as_ref().map_or_else(
                || {
                    format!(
                        "{} pages, {} syncs, stop→resume {:.1} ms",
                        p.pages_sent,
                        p.rounds,
                        p.stop_to_resume_ms.unwrap_or(f64::NAN)
                    )
                },
                |f| format!("pages {}", f.rounds.iter().map(|r| r.pages.to_string()).collect::<Vec<_>>().join("+")),
            );
            format!("total {:.1} ms, pause {:.2} ms, {rounds}", p.total_ms, p.pause_ms)
        });
        let restore = s.restore.as_ref().map_or(String::new(), |r| {
            format!(
                "; restore {:.1} ms, {} keys, cold boot recovered {}",
                r.ready_ms,
                r.keys.map_or("?".into(), |k| k.to_string()),
                r.reboot_recovered.map_or("-".into(), |k| k.to_string())
            )
        });
        let load = s.load.as_ref().map_or(String::new(), |l| {
            format!(
                "; load {:.0}/s max {:.1} ms{}",
                l.rps,
                l.max_ms,
                if l.covered_snapshot == Some(false) { " (ended early)" } else { "" }
            )
        });
        let status =
            if s.failures.is_empty() { "ok".to_string() } else { format!("FAILED: {}", s.failures.join("; ")) };
        println!(
            "  {} {:<5} {:<4} {}: {snap}{restore}{load}: {status}",
            s.rep + 1,
            mem_label(s.mem_mib),
            s.scenario.label(),
            s.engine.label()
        );
    }
}
