//! The `redis` suite (issue 15, benchmarks): redis-benchmark SET and GET against the real,
//! unmodified Redis 7.0.15 (target/test-assets/redis-server, static musl) under the Linux
//! personality, side by side in one run, sessions rotating engines so that machine noise hits
//! all alike:
//! - `ftvm run` and `ftvm record` of redis.elf + redis.cpio (1 GiB);
//! - the **same binary natively** in the host namespace of the same test network
//!   (scripts/topology.sh; the address 10.0.0.2 is put on that namespace's bridge for the
//!   native sessions, so the clients' path differs only by the VM's TAP);
//! - the `kvstore` guest under `ftvm run`;
//! - `ftvm run` with the personality's load-time syscall rewrite turned off
//!   (`linux.rewrite=off`, unless `--no-rewrite-off`), so that its effect is measured;
//! - the same image under QEMU microvm with KVM, the same TAP as virtio-net, virtio-rng
//!   (unless `--no-qemu`);
//! - the same image **protected**: `ftvm primary` on host 1, `ftvm backup` on host 2 of a
//!   2-host topology, the log over their own link (unless `--no-pair`);
//! - `ftvm run` with the personality counting system calls (`linux.counts=N`, unless
//!   `--no-syscall-counts`): its console lines in each benchmark's window give the system
//!   calls per request (its own throughput is not compared: the lines cost exits).
//!
//! Writes redis.{json,svg}.
//!
//! Redis runs with `--appendonly no` by default (`--redis-args`) on every engine: with the
//! image's `appendfsync always` the native figure would measure the host's disk, the VM's
//! a RAM file (no `--disk` unless `--disk-mib`). Per request: exits and log bytes from a
//! recording's log (each benchmark's window, as the kvstore suite does) and from the
//! primary's status (exits, log bytes sent, read through its API socket before and after each
//! benchmark); for `ftvm run` the session's exit count (boot included) over its requests.
//! QEMU's exits are not counted (KVM's per-VM statistics in debugfs are not readable here).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::common::{self, Common, ExitSummary, Machine, Prepared, Ratio};
use crate::kvstore::{Topology, GUEST_IP};
use crate::pair::{self, Pair, PairSpec};
use crate::plot;
use crate::redis_bench::{self, median_rps, per_request, Bench, Cell, Engine as _, Load, Measured, TESTS};
use crate::table;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Client counts (redis-benchmark -c), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,20,50")]
    clients: Vec<u32>,
    /// Requests per redis-benchmark run (one test) with several clients.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Requests per run with one client.
    #[arg(long, default_value_t = 3_000)]
    requests_single: u64,
    /// Arguments for redis-server after its configuration file, on every engine.
    #[arg(long, default_value = "--appendonly no")]
    redis_args: String,
    /// The static redis-server (scripts/fetch-redis.sh).
    #[arg(long, default_value = "target/test-assets/redis-server")]
    redis_server: PathBuf,
    #[command(flatten)]
    net: common::NetArgs,
    /// Leave out the recording (and its log-derived counts).
    #[arg(long)]
    no_record: bool,
    /// Leave out the `ftvm run` sessions with the personality's syscall rewrite turned off
    /// (`linux.rewrite=off`: every system call through a real `syscall`).
    #[arg(long)]
    no_rewrite_off: bool,
    /// Leave out the `ftvm run` sessions that count the guest's system calls
    /// (`linux.counts=N`, see --syscall-every).
    #[arg(long)]
    no_syscall_counts: bool,
    /// In the counting sessions, the personality prints a line every this many system calls;
    /// the count of a benchmark is within this many, twice, of the truth (its two ends), and
    /// the lines cost console exits (so those sessions' throughput is not compared).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    syscall_every: u64,
    /// Leave out QEMU microvm (KVM) running the same image.
    #[arg(long)]
    no_qemu: bool,
    /// Leave out the protected sessions (`ftvm primary` on host 1, `ftvm backup` on host 2).
    #[arg(long)]
    no_pair: bool,
    /// Give every VM a fresh blank data disk of this many MiB (Redis's /data is then
    /// journaled there; kvstore logs its writes there); default: none (all in RAM).
    #[arg(long)]
    disk_mib: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Engine {
    RedisFtvmRun,
    RedisFtvmRunRewriteOff,
    RedisFtvmRecord,
    RedisNative,
    KvstoreFtvmRun,
    /// `ftvm run` with the personality counting system calls (`linux.counts=N`): a console
    /// line every N, counted in each benchmark's window.
    RedisFtvmRunCounted,
    /// The same image under QEMU microvm with KVM (the same TAP, virtio-net and virtio-rng).
    RedisQemu,
    /// The same image under the pair: `ftvm primary` on host 1, `ftvm backup` on host 2.
    RedisProtected,
}

impl redis_bench::Engine for Engine {
    fn label(self) -> &'static str {
        match self {
            Engine::RedisFtvmRun => "Redis, ftvm run",
            Engine::RedisFtvmRunRewriteOff => "Redis, run rw=off",
            Engine::RedisFtvmRecord => "Redis, ftvm record",
            Engine::RedisNative => "Redis, native",
            Engine::KvstoreFtvmRun => "kvstore, ftvm run",
            Engine::RedisFtvmRunCounted => "Redis, run +counts",
            Engine::RedisQemu => "Redis, QEMU microvm",
            Engine::RedisProtected => "Redis, protected",
        }
    }
}

#[derive(Debug, Serialize)]
struct Session {
    engine: Engine,
    rep: usize,
    wall_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    counts: Option<ExitSummary>,
    /// The session's exits (boot included) over all its requests (ftvm engines).
    #[serde(skip_serializing_if = "Option::is_none")]
    session_exits_per_request: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_bytes: Option<u64>,
    benches: Vec<Bench>,
}

#[derive(Debug, Serialize)]
struct Report {
    suite: &'static str,
    machine: Machine,
    runs: usize,
    redis_benchmark: String,
    redis_args: String,
    cells: Vec<Cell<Engine>>,
    ratios: Vec<Ratio>,
    sessions: Vec<Session>,
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
    args: &'a Args,
    qemu: PathBuf,
    load: Load<'a>,
    ftvm: PathBuf,
    redis_server: PathBuf,
    redis_elf: PathBuf,
    redis_cpio: PathBuf,
    kvstore: PathBuf,
    work: PathBuf,
}

pub fn run(common: &Common, args: &Args) -> Result<()> {
    let redis_benchmark = common::kvstore_network_suite(common, "redis", &args.net)?;
    common::require_file(&args.redis_server, "redis-server", "build it with scripts/fetch-redis.sh")?;
    let cpio = common.guests.join("redis.cpio");
    common::require_file(
        &cpio,
        "redis.cpio",
        "build the guests with `cargo xtask guests` after scripts/fetch-redis.sh",
    )?;
    let Prepared { common, machine, images, work } = common.prepare("redis", &["redis", "kvstore"], !args.no_qemu)?;
    let common = &common;
    let runs = common.runs_or(3);
    let redis_cpio = work.join("redis.cpio");
    std::fs::copy(&cpio, &redis_cpio)?;
    let redis_server = work.join("redis-server");
    std::fs::copy(&args.redis_server, &redis_server)?;
    let ctx = Ctx {
        args,
        qemu: common.qemu.clone(),
        load: Load {
            redis_benchmark: &redis_benchmark,
            clients: &args.clients,
            requests: args.requests,
            requests_single: args.requests_single,
        },
        ftvm: std::fs::canonicalize(&common.ftvm)?,
        redis_server,
        redis_elf: images["redis"].clone(),
        redis_cpio,
        kvstore: images["kvstore"].clone(),
        work,
    };
    let rb_version = ctx.load.version()?;
    let mut engines = vec![Engine::RedisFtvmRun, Engine::RedisNative, Engine::KvstoreFtvmRun];
    if !args.no_record {
        engines.push(Engine::RedisFtvmRecord);
    }
    if !args.no_rewrite_off {
        engines.push(Engine::RedisFtvmRunRewriteOff);
    }
    if !args.no_syscall_counts {
        engines.push(Engine::RedisFtvmRunCounted);
    }
    if !args.no_qemu {
        engines.push(Engine::RedisQemu);
    }
    if !args.no_pair {
        engines.push(Engine::RedisProtected);
    }
    // A second host for the backup when there is a pair (host 1 runs every other engine).
    let hosts = if args.no_pair { 1 } else { 2 };
    let (sessions, cells) =
        redis_bench::sessions((&args.net.topology, hosts), runs, &args.clients, &engines, |topo, engine, rep| {
            session(&ctx, topo, engine, rep)
        })?;
    let rps = |test: &str, c: u32, e: Engine| median_rps(&cells, test, c, e);
    let mut ratios = Vec::new();
    for &c in &args.clients {
        for test in TESTS {
            let run = rps(test, c, Engine::RedisFtvmRun);
            let mut native =
                Ratio::new(format!("{test} c={c} ftvm run/native"), run / rps(test, c, Engine::RedisNative));
            if c >= 50 {
                native = native.at_least(0.9);
            }
            ratios.push(native);
            if !args.no_rewrite_off {
                let off = rps(test, c, Engine::RedisFtvmRunRewriteOff);
                ratios.push(Ratio::new(
                    format!("{test} c={c} rw=off: run/native"),
                    off / rps(test, c, Engine::RedisNative),
                ));
                ratios.push(Ratio::new(format!("{test} c={c} rewrite on/off (run)"), run / off));
            }
            ratios.push(Ratio::new(
                format!("{test} c={c} Redis/kvstore (ftvm run)"),
                run / rps(test, c, Engine::KvstoreFtvmRun),
            ));
            if !args.no_record {
                ratios.push(
                    Ratio::new(format!("{test} c={c} record/run"), rps(test, c, Engine::RedisFtvmRecord) / run)
                        .at_least(0.95),
                );
            }
            if !args.no_qemu {
                let q = rps(test, c, Engine::RedisQemu);
                ratios.push(Ratio::new(format!("{test} c={c} QEMU/native"), q / rps(test, c, Engine::RedisNative)));
                ratios.push(Ratio::new(format!("{test} c={c} ftvm run/QEMU"), run / q));
            }
            if !args.no_pair {
                let p = Ratio::new(format!("{test} c={c} protected/run"), rps(test, c, Engine::RedisProtected) / run);
                // The pair suite's goal for kvstore, with several clients.
                ratios.push(if c >= 20 { p.at_least(0.97) } else { p });
            }
        }
    }
    let report = Report {
        suite: "redis",
        machine,
        runs,
        redis_benchmark: rb_version,
        redis_args: args.redis_args.clone(),
        cells,
        ratios,
        sessions,
    };
    let bars = plot::ratio_bars(&report.ratios);
    let svg = plot::bars("Redis 7.0.15 under redis-benchmark: throughput ratios (medians)", &bars);
    common::publish(&common.out, "redis", &report, &svg, print_table)?;
    Ok(())
}

/// What Redis prints once it serves.
const READY: &str = "Ready to accept connections";

/// The guest's command line: the address, `extra` words for the personality, then Redis's
/// arguments (its configuration file, `--redis-args`).
fn redis_cmdline(ctx: &Ctx, extra: &str) -> String {
    format!("ip={GUEST_IP}/24{extra} -- /redis.conf {}", ctx.args.redis_args)
}

/// ftvm's options for the Redis VM (`run`, `record`, `primary`, `backup`): 1 GiB, the TAP,
/// virtio-rng, the disk if any, the image and its command line (`extra` as for
/// [`redis_cmdline`]).
fn redis_vm(ctx: &Ctx, cmd: &mut Command, disk: Option<&Path>, extra: &str) {
    cmd.args(["--log-level", "info", "--mem", "1G", "--net", "tap=tap0", "--rng"]);
    if let Some(d) = disk {
        cmd.arg("--disk").arg(d);
    }
    cmd.arg("--kernel").arg(&ctx.redis_elf).arg("--initrd").arg(&ctx.redis_cpio);
    cmd.arg("--cmdline").arg(redis_cmdline(ctx, extra));
}

/// A protected session: the pair's backup on host 2, its primary on host 1 (the VM the
/// clients reach), the benchmarks against it; the primary's status (API socket) read before
/// and after each gives its exits and the log bytes it sent per request.
fn protected(ctx: &Ctx, topo: &Topology, rep: usize) -> Result<Session> {
    let engine = Engine::RedisProtected;
    ip(&["-n", &topo.client(), "neigh", "flush", "all"])?;
    let (sock, bsock) = (ctx.work.join("p.sock"), ctx.work.join("b.sock"));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&bsock);
    let mut disks = Vec::new();
    // A fresh port per pair (one pair per round), so that no socket of the last one is in the way.
    let port = 7001 + u16::try_from(rep).unwrap_or(0) % 1000;
    let spec = PairSpec {
        ftvm: &ctx.ftvm,
        work: &ctx.work,
        port,
        sockets: (&sock, &bsock),
        pin: false,
        primary_args: &[],
        env: &[],
    };
    let result = (|| {
        // Not taken apart: on an error, the fields drop in order, the primary first.
        let mut pair: Pair = spec.start(topo, |cmd, side| {
            let disk = match ctx.args.disk_mib {
                Some(mib) => Some(common::fresh_disk(&ctx.work, &format!("disk-{side:?}-{rep}.img"), mib)?),
                None => None,
            };
            redis_vm(ctx, cmd, disk.as_deref(), "");
            disks.extend(disk);
            Ok(())
        })?;
        pair.primary.wait_for_output(READY, Duration::from_secs(180))?;
        let benches = ctx.load.run_each(
            topo,
            &pair.primary,
            (engine.label(), rep),
            |_| pair::counters(&ctx.ftvm, &sock),
            |_, before, b| {
                let after = pair::counters(&ctx.ftvm, &sock)?;
                b.exits_per_request = growth_per_request((before.exits, after.exits), b.requests);
                b.log_bytes_per_request = growth_per_request((before.log_bytes, after.log_bytes), b.requests);
                Ok(())
            },
        )?;
        let log_bytes = pair::counters(&ctx.ftvm, &sock)?.log_bytes;
        let f = pair.primary.terminate(Duration::from_secs(10))?;
        pair.backup.terminate(Duration::from_secs(10))?;
        let counts = ExitSummary::parse(&f.stderr);
        let requests: u64 = benches.iter().map(|b| b.requests).sum();
        let session_exits_per_request = counts.as_ref().map(|c| c.exits as f64 / requests as f64);
        Ok(Session {
            engine,
            rep,
            wall_s: f.wall_s(),
            counts,
            session_exits_per_request,
            log_bytes: Some(log_bytes),
            benches,
        })
    })();
    for d in disks {
        let _ = std::fs::remove_file(d);
    }
    result
}

/// Runs `ip ARGS` and fails loudly if it fails.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    anyhow::ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn session(ctx: &Ctx, topo: &Topology, engine: Engine, rep: usize) -> Result<Session> {
    if engine == Engine::RedisProtected {
        return protected(ctx, topo, rep);
    }
    let host = topo.host();
    // 10.0.0.2 moves between the VM's MAC and the host bridge's: forget the old neighbour.
    ip(&["-n", &topo.client(), "neigh", "flush", "all"])?;
    let log = ctx.work.join(format!("redis-{rep}.ftvmlog"));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &host]);
    let disk = match ctx.args.disk_mib {
        Some(mib) => Some(common::fresh_disk(&ctx.work, &format!("disk-{rep}.img"), mib)?),
        None => None,
    };
    let ready = match engine {
        Engine::RedisNative => {
            ip(&["-n", &host, "addr", "add", &format!("{GUEST_IP}/24"), "dev", "br0"])?;
            cmd.arg(&ctx.redis_server);
            cmd.args(["--bind", GUEST_IP, "--port", "6379", "--protected-mode", "no", "--save", ""]);
            cmd.arg("--dir").arg(&ctx.work).args(ctx.args.redis_args.split_whitespace());
            READY
        }
        Engine::KvstoreFtvmRun => {
            cmd.arg(&ctx.ftvm).args(["run", "--log-level", "info", "--net", "tap=tap0", "--rng"]);
            if let Some(d) = &disk {
                cmd.arg("--disk").arg(d);
            }
            cmd.arg("--kernel").arg(&ctx.kvstore).args(["--cmdline", &format!("ip={GUEST_IP}/24")]);
            crate::kvstore::READY
        }
        Engine::RedisFtvmRun
        | Engine::RedisFtvmRunRewriteOff
        | Engine::RedisFtvmRecord
        | Engine::RedisFtvmRunCounted => {
            cmd.arg(&ctx.ftvm);
            if engine != Engine::RedisFtvmRecord {
                cmd.arg("run");
            } else {
                let _ = std::fs::remove_file(&log);
                cmd.arg("record").arg("--log").arg(&log);
            }
            let extra = match engine {
                Engine::RedisFtvmRunRewriteOff => " linux.rewrite=off".to_string(),
                Engine::RedisFtvmRunCounted => format!(" linux.counts={}", ctx.args.syscall_every),
                _ => String::new(),
            };
            redis_vm(ctx, &mut cmd, disk.as_deref(), &extra);
            READY
        }
        Engine::RedisQemu => {
            let image = (ctx.redis_elf.as_path(), Some(ctx.redis_cpio.as_path()));
            crate::kvstore::qemu_command(&mut cmd, &ctx.qemu, "1G", image, &redis_cmdline(ctx, ""), disk.as_deref());
            READY
        }
        Engine::RedisProtected => anyhow::bail!("a protected session starts in `protected`"),
    };
    // `ftvm run`'s exits in each benchmark's window, from its status (a recording's come
    // from its log).
    let run = matches!(
        engine,
        Engine::RedisFtvmRun | Engine::RedisFtvmRunRewriteOff | Engine::RedisFtvmRunCounted | Engine::KvstoreFtvmRun
    );
    let api = run.then(|| ctx.work.join("run.sock"));
    if let Some(sock) = &api {
        let _ = std::fs::remove_file(sock);
        cmd.arg("--api-socket").arg(sock);
    }
    let result = measure(ctx, topo, (engine, rep), &mut cmd, (ready, api.as_deref()), &log);
    if engine == Engine::RedisNative {
        let _ = ip(&["-n", &host, "addr", "del", &format!("{GUEST_IP}/24"), "dev", "br0"]);
    }
    if let Some(d) = disk {
        let _ = std::fs::remove_file(d);
    }
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(log.with_extension("ftvmlog.disk0"));
    result
}

/// One session of `cmd`, ready when it prints `ready`; with `api`, its exits in each
/// benchmark's window from its status there.
fn measure(
    ctx: &Ctx,
    topo: &Topology,
    (engine, rep): (Engine, usize),
    cmd: &mut Command,
    (ready, api): (&str, Option<&Path>),
    log: &std::path::Path,
) -> Result<Session> {
    // The counting sessions: the personality's lines in each benchmark's window.
    let counted = engine == Engine::RedisFtvmRunCounted;
    let exits = |sock: &Path| common::ctl_status(&ctx.ftvm, sock).map(|s| s.exits.total);
    let Measured { mut benches, counts, finished: f, .. } = ctx.load.measure_each(
        topo,
        cmd,
        (engine.label(), rep),
        (ready, Duration::from_secs(180)),
        |vm| {
            let syscalls = counted.then(|| SyscallCounts::parse(&vm.stdout_text()));
            Ok((syscalls, api.map(exits).transpose()?))
        },
        |vm, (syscalls, exits0), b| {
            if let Some(before) = syscalls {
                let after = SyscallCounts::parse(&vm.stdout_text());
                b.syscalls_per_request = growth_per_request((before.calls, after.calls), b.requests);
                b.real_syscalls_per_request = growth_per_request((before.real, after.real), b.requests);
            }
            if let (Some(sock), Some(e0)) = (api, exits0) {
                b.exits_per_request = growth_per_request((e0, exits(sock)?), b.requests);
            }
            Ok(())
        },
    )?;
    let requests: u64 = benches.iter().map(|b| b.requests).sum();
    let session_exits_per_request = counts.as_ref().map(|c| c.exits as f64 / requests as f64);
    let mut log_bytes = None;
    if engine == Engine::RedisFtvmRecord {
        anyhow::ensure!(log.is_file(), "ftvm record wrote no log at {}: {}", log.display(), f.describe());
        log_bytes = Some(per_request(&ctx.ftvm, log, &mut benches)?.bytes);
    }
    Ok(Session { engine, rep, wall_s: f.wall_s(), counts, session_exits_per_request, log_bytes, benches })
}

/// What a counter read before and after a benchmark grew by, per request; none for a counter
/// that went back (a restarted VM) or a benchmark of no requests.
fn growth_per_request((before, after): (u64, u64), requests: u64) -> Option<f64> {
    (after >= before && requests > 0).then(|| (after - before) as f64 / requests as f64)
}

/// What the personality's `linux.counts=N` lines on a console add up to: system calls, and
/// those of them that came through a real `syscall` instruction (not a rewritten site).
/// Each line reads "linux: N system calls at tick T (R through a real syscall): NR:COUNT ...",
/// R counted since the line before; only complete lines count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SyscallCounts {
    calls: u64,
    real: u64,
}

impl SyscallCounts {
    fn parse(console: &str) -> SyscallCounts {
        let complete = console.rfind('\n').map_or("", |end| &console[..end]);
        let mut total = SyscallCounts::default();
        for line in complete.lines() {
            let Some(rest) = line.trim_start().strip_prefix("linux: ") else { continue };
            let Some((n, rest)) = rest.split_once(" system calls at tick ") else { continue };
            let Ok(n) = n.parse::<u64>() else { continue };
            let real = rest
                .split_once(" (")
                .and_then(|(_, r)| r.split_once(" through a real syscall)"))
                .and_then(|(r, _)| r.parse::<u64>().ok());
            total.calls += n;
            total.real += real.unwrap_or(0);
        }
        total
    }
}

fn print_table(r: &Report) {
    r.machine
        .print(&format!("{} sessions per engine, one redis-benchmark run per test and client count in each", r.runs));
    println!("{}; redis-server arguments: {}\n", r.redis_benchmark, r.redis_args);
    redis_bench::cells_table(&r.cells).print();
    println!();
    table::ratios("", &r.ratios, 3).print();
    for s in &r.sessions {
        let per =
            s.session_exits_per_request.map_or(String::new(), |e| format!(", {e:.2} exits/request over the session"));
        let counts = s.counts.as_ref().map_or(String::new(), |c| {
            format!(
                "  {} exits ({} port I/O, {} MMIO, {} HLT), {} interrupts{per}",
                c.exits, c.port_io, c.mmio, c.hlt, c.interrupts
            )
        });
        println!("session {} {:<19} {:>7.2} s{counts}", s.rep + 1, s.engine.label(), s.wall_s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_up_the_personalitys_count_lines() {
        let console = "1:M 07 Dec 2026 13:38:41.560 * Ready to accept connections\n\
                       linux: 1000 system calls at tick 812 (3 through a real syscall): 0:497 1:497 232:6\n\
                       linux: 1000 system calls at tick 840 (0 through a real syscall): 1:500 0:500\r\n\
                       linux: 1000 system calls at tick 866 (0 thro";
        assert_eq!(SyscallCounts::parse(console), SyscallCounts { calls: 2000, real: 3 });
        // A line not yet ended does not count; nothing at all is zero.
        assert_eq!(
            SyscallCounts::parse("linux: 1000 system calls at tick 1 (0 through a real syscall): 0:1000"),
            SyscallCounts::default()
        );
        assert_eq!(SyscallCounts::parse(""), SyscallCounts::default());
    }

    #[test]
    fn a_counters_growth_per_request() {
        assert_eq!(growth_per_request((1000, 5100), 20_000), Some(0.205));
        assert_eq!(growth_per_request((7, 7), 3000), Some(0.0));
        assert_eq!(growth_per_request((5100, 1000), 20_000), None);
        assert_eq!(growth_per_request((0, 10), 0), None);
    }

    #[test]
    fn ignores_other_lines_and_damaged_counts() {
        let console = "linux: rewrote 215 of 215 syscall sites into jumps\n\
                       linux: many system calls at tick 3 (0 through a real syscall): x\n\
                       linux: 500 system calls at tick 9 (a lot through a real syscall): 0:500\n";
        // The damaged real count still gives the calls.
        assert_eq!(SyscallCounts::parse(console), SyscallCounts { calls: 500, real: 0 });
    }
}
