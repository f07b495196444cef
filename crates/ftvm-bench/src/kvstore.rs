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

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::common::{self, Common, ExitSummary, Machine, Prepared, Ratio};
use crate::plot;
use crate::redis_bench::{self, median_rps, per_request, Bench, Cell, Engine as _, Load, LogTotals, Measured, TESTS};
use crate::table;

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
    #[command(flatten)]
    net: common::NetArgs,
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

impl redis_bench::Engine for Engine {
    fn label(self) -> &'static str {
        match self {
            Engine::FtvmRun => "ftvm run",
            Engine::FtvmRecord => "ftvm record",
            Engine::Qemu => "QEMU microvm",
        }
    }
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

#[derive(Debug, Serialize)]
struct Report {
    suite: &'static str,
    machine: Machine,
    runs: usize,
    redis_benchmark: String,
    guest_cmdline: String,
    disk_mib: u64,
    cells: Vec<Cell<Engine>>,
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

impl redis_bench::Session<Engine> for Session {
    fn engine(&self) -> Engine {
        self.engine
    }
    fn benches(&self) -> &[Bench] {
        &self.benches
    }
}

struct Ctx<'a> {
    common: &'a Common,
    args: &'a Args,
    load: Load<'a>,
    ftvm: PathBuf,
    kernel: PathBuf,
    work: PathBuf,
    cmdline: String,
}

pub fn run(common: &Common, args: &Args) -> Result<()> {
    let redis_benchmark = common::kvstore_network_suite(common, "kvstore", &args.net)?;
    let Prepared { common, machine, images, work } = common.prepare("kvstore", &["kvstore"], true)?;
    let common = &common;
    let runs = common.runs_or(3);
    let cmdline = format!("ip={GUEST_IP}/24 {}", args.guest_args).trim().to_string();
    let ctx = Ctx {
        common,
        args,
        load: Load {
            redis_benchmark: &redis_benchmark,
            clients: &args.clients,
            requests: args.requests,
            requests_single: args.requests_single,
        },
        ftvm: std::fs::canonicalize(&common.ftvm)?,
        kernel: images["kvstore"].clone(),
        work,
        cmdline,
    };
    let rb_version = ctx.load.version()?;

    let mut engines = vec![Engine::FtvmRun, Engine::FtvmRecord];
    if !args.no_qemu {
        engines.push(Engine::Qemu);
    }
    let (sessions, cells) =
        redis_bench::sessions((&args.net.topology, 1), runs, &args.clients, &engines, |topo, engine, rep| {
            session(&ctx, topo, engine, rep)
        })?;
    let rps = |test: &str, c: u32, e: Engine| median_rps(&cells, test, c, e);
    let mut ratios = Vec::new();
    for &c in &args.clients {
        for test in TESTS {
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
    let bars = plot::ratio_bars(&report.ratios);
    let svg = plot::bars("kvstore under redis-benchmark: throughput ratios (medians)", &bars);
    common::publish(&common.out, "kvstore", &report, &svg, print_table)?;
    Ok(())
}

fn session(ctx: &Ctx, topo: &Topology, engine: Engine, rep: usize) -> Result<Session> {
    let disk = common::fresh_disk(&ctx.work, &format!("disk-{}-{rep}.img", engine_tag(engine)), ctx.args.disk_mib)?;
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
        Engine::Qemu => qemu_command(&mut cmd, &ctx.common.qemu, "256", (&ctx.kernel, None), &ctx.cmdline, Some(&disk)),
    }
    let Measured { benches, boot_to_ready_s, counts, finished: f } =
        ctx.load.measure(topo, &mut cmd, (engine.label(), rep), READY, Duration::from_secs(120))?;
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

/// QEMU microvm's options for a guest on the test network: `-m MEM`, the image (`-kernel`,
/// `-initrd`), its command line, the TAP as virtio-net, virtio-rng and, given a disk,
/// virtio-blk; the console on standard output. Added to `cmd` (`ip netns exec NS`).
pub(crate) fn qemu_command(
    cmd: &mut Command,
    qemu: &Path,
    mem: &str,
    (kernel, initrd): (&Path, Option<&Path>),
    cmdline: &str,
    disk: Option<&Path>,
) {
    // acpi=off: QEMU then lists the virtio-mmio devices on the command line
    // (virtio_mmio.device=...) with ISA IRQs the guest's 8259 can take; with ACPI
    // the guest finds no routable IRQ and polls. force-legacy=false: virtio 1.x.
    cmd.arg(qemu);
    cmd.args(["-M", "microvm,rtc=on,acpi=off", "-enable-kvm", "-m", mem, "-display", "none"]);
    cmd.args(["-serial", "stdio", "-monitor", "none", "-no-reboot"]);
    cmd.args(["-global", "virtio-mmio.force-legacy=false"]);
    cmd.arg("-kernel").arg(kernel);
    if let Some(initrd) = initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    cmd.arg("-append").arg(cmdline);
    cmd.args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]);
    cmd.args(["-device", "virtio-net-device,netdev=n0"]);
    if let Some(disk) = disk {
        cmd.arg("-drive").arg(format!("id=d0,file={},format=raw,if=none", disk.display()));
        cmd.args(["-device", "virtio-blk-device,drive=d0"]);
    }
    cmd.args(["-object", "rng-random,id=r0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=r0"]);
}

fn engine_tag(e: Engine) -> &'static str {
    match e {
        Engine::FtvmRun => "run",
        Engine::FtvmRecord => "record",
        Engine::Qemu => "qemu",
    }
}

fn print_table(r: &Report) {
    r.machine.print(&format!(
        "{} VM sessions per engine, one redis-benchmark run per test and client count in each",
        r.runs
    ));
    println!("{} against kvstore ({}), {} MiB disk\n", r.redis_benchmark, r.guest_cmdline, r.disk_mib);
    redis_bench::cells_table(&r.cells).print();
    println!();
    table::ratios("", &r.ratios, 3).print();
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
