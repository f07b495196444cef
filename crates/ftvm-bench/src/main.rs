//! `ftvm-bench`: runs the same guest images under ftvm and under QEMU microvm (KVM), side by
//! side in one run, alternating the two so that machine noise hits both alike, and reports
//! medians and ratios as text, JSON and an SVG chart.
//!
//! Scenarios (issue "ftvm run", benchmarks):
//! - `hello-first-output`: process start to the first console byte (boot time);
//! - `hello-poweroff`: process start to exit, `hello.wait_ms=0`;
//! - `compute`: wall time of the CPU-bound ring-3 guest (ring-3 speed must match: ratio ~1.0);
//! - `port-io-exit`: the cost of one port-I/O exit from ring 3, from `iobench` runs with
//!   N and 0 writes: (t(N) - t(0)) / N, set against the raw KVM figure in platform.md.

mod plot;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

/// Raw KVM cost of a userspace exit from CPL3 on this platform (platform.md, measured by
/// reference/kvm-probe): the floor ftvm's port-I/O path is compared with.
const RAW_KVM_CPL3_EXIT_US: f64 = 25.0;

#[derive(Parser, Debug)]
#[command(name = "ftvm-bench", about = "ftvm vs QEMU microvm on the same guest images")]
struct Args {
    /// Runs per engine and scenario (compute uses a third of this, at least 2).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// The ftvm binary (build it with `cargo build --release -p ftvm`).
    #[arg(long, default_value = "target/release/ftvm")]
    ftvm: PathBuf,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Directory of the guest images (`cargo xtask guests`).
    #[arg(long, default_value = "target/guests")]
    guests: PathBuf,
    /// Where results.json and results.svg go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Writes per iobench run for the port-I/O scenario.
    #[arg(long, default_value_t = 50_000)]
    io_count: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Engine {
    Ftvm,
    Qemu,
}

#[derive(Debug, Serialize)]
struct Sample {
    first_output_s: f64,
    total_s: f64,
    exit_ok: bool,
}

#[derive(Debug, Serialize)]
struct Scenario {
    name: String,
    unit: String,
    what: String,
    ftvm: Vec<f64>,
    qemu: Vec<f64>,
    ftvm_median: f64,
    qemu_median: f64,
    /// ftvm / QEMU (for times: below 1 means ftvm is faster).
    ratio: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    kvm: String,
    ftvm_version: String,
    qemu_version: String,
    runs: usize,
    scenarios: Vec<Scenario>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    for (what, path) in [("ftvm", &args.ftvm), ("hello guest", &args.guests.join("hello.elf"))] {
        if !path.exists() {
            bail!("{what} not found at {}; build it first (see README: Benchmarks)", path.display());
        }
    }
    let ftvm_version = capture(Command::new(&args.ftvm).arg("--version"))?.trim().to_string();
    let qemu_version = capture(Command::new(&args.qemu).arg("--version"))
        .with_context(|| format!("cannot run {}; install Debian's qemu-system-x86", args.qemu.display()))?
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let runs = args.runs.max(1);
    let g = |name: &str| args.guests.join(format!("{name}.elf"));
    let mut scenarios = Vec::new();

    eprintln!("hello: {runs} runs per engine");
    let (mut first, mut total) = (pair(), pair());
    for i in 0..runs * 2 {
        let engine = if i % 2 == 0 { Engine::Ftvm } else { Engine::Qemu };
        let s = run_guest(&args, engine, &g("hello"), "hello.wait_ms=0")?;
        push(&mut first, engine, s.first_output_s);
        push(&mut total, engine, s.total_s);
    }
    scenarios.push(scenario("hello-first-output", "s", "process start to the first console byte", first, None));
    scenarios.push(scenario("hello-poweroff", "s", "process start to exit (hello.wait_ms=0)", total, None));

    let compute_runs = (runs / 3).max(2);
    eprintln!("compute: {compute_runs} runs per engine");
    let mut wall = pair();
    for i in 0..compute_runs * 2 {
        let engine = if i % 2 == 0 { Engine::Ftvm } else { Engine::Qemu };
        let s = run_guest(&args, engine, &g("compute"), "")?;
        push(&mut wall, engine, s.total_s);
    }
    scenarios.push(scenario("compute", "s", "wall time of the CPU-bound ring-3 guest", wall, None));

    eprintln!("iobench: {compute_runs} runs per engine with {} and with 0 writes", args.io_count);
    let mut per_exit = pair();
    for i in 0..compute_runs * 2 {
        let engine = if i % 2 == 0 { Engine::Ftvm } else { Engine::Qemu };
        let with = run_guest(&args, engine, &g("iobench"), &format!("iobench.count={}", args.io_count))?;
        let without = run_guest(&args, engine, &g("iobench"), "iobench.count=0")?;
        push(&mut per_exit, engine, (with.total_s - without.total_s) / args.io_count as f64 * 1e6);
    }
    let note = format!("raw KVM userspace exit from CPL3 on this platform: {RAW_KVM_CPL3_EXIT_US} us (platform.md)");
    let mut io =
        scenario("port-io-exit", "us", "one ring-3 port-I/O exit through the device bus", per_exit, Some(note));
    io.note = Some(format!(
        "{}; ftvm median / raw KVM = {:.2}",
        io.note.take().unwrap_or_default(),
        io.ftvm_median / RAW_KVM_CPL3_EXIT_US
    ));
    scenarios.push(io);

    let report = Report {
        machine: format!("{} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)),
        kvm: ftvm_version
            .split_once('(')
            .map(|(_, k)| k.strip_suffix(')').unwrap_or(k).to_string())
            .unwrap_or_default(),
        ftvm_version,
        qemu_version,
        runs,
        scenarios,
    };
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    let svg = args.out.join("results.svg");
    std::fs::write(&svg, plot::bars(&report.scenarios.iter().map(|s| (s.name.as_str(), s.ratio)).collect::<Vec<_>>()))?;
    print_table(&report);
    println!("\nwrote {} and {}", json.display(), svg.display());
    Ok(())
}

fn pair() -> (Vec<f64>, Vec<f64>) {
    (Vec::new(), Vec::new())
}

fn push(p: &mut (Vec<f64>, Vec<f64>), engine: Engine, v: f64) {
    match engine {
        Engine::Ftvm => p.0.push(v),
        Engine::Qemu => p.1.push(v),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn scenario(name: &str, unit: &str, what: &str, (ftvm, qemu): (Vec<f64>, Vec<f64>), note: Option<String>) -> Scenario {
    let (fm, qm) = (median(&ftvm), median(&qemu));
    Scenario {
        name: name.into(),
        unit: unit.into(),
        what: what.into(),
        ftvm,
        qemu,
        ftvm_median: fm,
        qemu_median: qm,
        ratio: fm / qm,
        note,
    }
}

fn print_table(r: &Report) {
    println!("ftvm: {}\nqemu: {}\nruns per engine: {}\n", r.ftvm_version, r.qemu_version, r.runs);
    println!("{:<20} {:>12} {:>12} {:>8}  what", "scenario", "ftvm", "qemu", "ratio");
    for s in &r.scenarios {
        println!(
            "{:<20} {:>10.4} {:<1} {:>10.4} {:<1} {:>8.3}  {}",
            s.name,
            s.ftvm_median,
            &s.unit[..1],
            s.qemu_median,
            &s.unit[..1],
            s.ratio,
            s.what
        );
        if let Some(n) = &s.note {
            println!("{:<20} {n}", "");
        }
    }
}

fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs one guest to completion, timing the first console byte and the exit.
fn run_guest(args: &Args, engine: Engine, kernel: &Path, cmdline: &str) -> Result<Sample> {
    let mut cmd = match engine {
        Engine::Ftvm => {
            let mut c = Command::new(&args.ftvm);
            c.arg("run").arg("--kernel").arg(kernel).arg("--cmdline").arg(cmdline);
            c
        }
        Engine::Qemu => {
            let mut c = Command::new(&args.qemu);
            c.args(["-M", "microvm", "-enable-kvm", "-m", "256", "-display", "none", "-serial", "stdio"]);
            c.args(["-monitor", "none", "-no-reboot", "-kernel"]).arg(kernel).arg("-append").arg(cmdline);
            c
        }
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot start {engine:?}"))?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let mut first = None;
    let mut buf = [0u8; 4096];
    let mut text = Vec::new();
    loop {
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                first.get_or_insert_with(|| start.elapsed());
                text.extend_from_slice(&buf[..n]);
            }
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            bail!("{engine:?} on {} ran for more than 120 s", kernel.display());
        }
    }
    let status = child.wait()?;
    let total = start.elapsed();
    let text = String::from_utf8_lossy(&text);
    if !text.contains("digest:") {
        bail!("{engine:?} on {} printed no digest line:\n{text}", kernel.display());
    }
    Ok(Sample {
        first_output_s: first.unwrap_or(total).as_secs_f64(),
        total_s: total.as_secs_f64(),
        exit_ok: status.success() || engine == Engine::Qemu,
    })
}
