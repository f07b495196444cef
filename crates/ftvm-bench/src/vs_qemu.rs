//! The `run-vs-qemu` suite (the default; issue "ftvm run", benchmarks): `ftvm run` and QEMU
//! microvm (KVM) alternate on the same images. Writes results.{json,svg}.
//!
//! - `hello-first-output`: process start to the first console byte (boot time);
//! - `hello-poweroff`: process start to exit, `hello.wait_ms=0`;
//! - `compute`: wall time of the CPU-bound ring-3 guest (ring-3 speed must match: ratio ~1.0);
//! - `port-io-exit`: the cost of one port-I/O exit from ring 3, from `iobench` runs with
//!   N and 0 writes: (t(N) - t(0)) / N, set against the raw KVM figure in platform.md.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::common::{self, median, Common, Finished, Machine, Prepared};
use crate::plot;
use crate::table::Table;

/// Raw KVM cost of a userspace exit from CPL3 on this platform (platform.md, measured by
/// reference/kvm-probe): the floor ftvm's port-I/O path is compared with.
const RAW_KVM_CPL3_EXIT_US: f64 = 25.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Engine {
    Ftvm,
    Qemu,
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
    suite: &'static str,
    machine: Machine,
    runs: usize,
    scenarios: Vec<Scenario>,
}

pub fn run(common: &Common, io_count: u64) -> Result<()> {
    let Prepared { common, machine, images, .. } = common.prepare("vs-qemu", &["hello", "compute", "iobench"], true)?;
    let common = &common;
    let runs = common.runs_or(10);
    let g = |name: &str| images[name].clone();
    let mut scenarios = Vec::new();

    eprintln!("hello: {runs} runs per engine");
    let (mut first, mut total) = (pair(), pair());
    for i in 0..runs * 2 {
        let engine = if i % 2 == 0 { Engine::Ftvm } else { Engine::Qemu };
        let s = run_guest(common, engine, &g("hello"), "hello.wait_ms=0")?;
        push(&mut first, engine, s.first_output.unwrap_or(s.wall).as_secs_f64());
        push(&mut total, engine, s.wall_s());
    }
    scenarios.push(scenario("hello-first-output", "s", "process start to the first console byte", first, None));
    scenarios.push(scenario("hello-poweroff", "s", "process start to exit (hello.wait_ms=0)", total, None));

    let compute_runs = (runs / 3).max(2);
    eprintln!("compute: {compute_runs} runs per engine");
    let mut wall = pair();
    for i in 0..compute_runs * 2 {
        let engine = if i % 2 == 0 { Engine::Ftvm } else { Engine::Qemu };
        let s = run_guest(common, engine, &g("compute"), "")?;
        push(&mut wall, engine, s.wall_s());
    }
    scenarios.push(scenario("compute", "s", "wall time of the CPU-bound ring-3 guest", wall, None));

    eprintln!("iobench: {compute_runs} runs per engine with {io_count} and with 0 writes");
    let mut per_exit = pair();
    for i in 0..compute_runs * 2 {
        let engine = if i % 2 == 0 { Engine::Ftvm } else { Engine::Qemu };
        let with = run_guest(common, engine, &g("iobench"), &format!("iobench.count={io_count}"))?;
        let without = run_guest(common, engine, &g("iobench"), "iobench.count=0")?;
        push(&mut per_exit, engine, (with.wall_s() - without.wall_s()) / io_count as f64 * 1e6);
    }
    let mut io = scenario("port-io-exit", "us", "one ring-3 port-I/O exit through the device bus", per_exit, None);
    io.note = Some(format!(
        "raw KVM userspace exit from CPL3 on this platform: {RAW_KVM_CPL3_EXIT_US} us (platform.md); ftvm median / raw KVM = {:.2}",
        io.ftvm_median / RAW_KVM_CPL3_EXIT_US
    ));
    scenarios.push(io);

    let report = Report { suite: "run-vs-qemu", machine, runs, scenarios };
    let bars: Vec<plot::Bar> =
        report.scenarios.iter().map(|s| plot::Bar { label: &s.name, value: s.ratio, goal: None }).collect();
    let svg = plot::bars("ftvm run / QEMU microvm (KVM), medians; lower is faster", &bars);
    common::publish(&common.out, "results", &report, &svg, print_table)?;
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
    r.machine.print(&format!("{} per engine and scenario (compute, iobench: a third, at least 2)", r.runs));
    let mut t = Table::new().left("scenario", 20).right("ftvm", 12).right("qemu", 12).right("ratio", 8);
    t = t.gap(2).left("what", 0);
    for s in &r.scenarios {
        let unit = &s.unit[..1];
        t.row([
            s.name.clone(),
            format!("{:.4} {unit}", s.ftvm_median),
            format!("{:.4} {unit}", s.qemu_median),
            format!("{:.3}", s.ratio),
            s.what.clone(),
        ]);
        if let Some(n) = &s.note {
            t.line(format!("{:<20} {n}", ""));
        }
    }
    t.print();
}

/// Runs one guest to completion under `ftvm run` or QEMU microvm with KVM.
fn run_guest(common: &Common, engine: Engine, kernel: &Path, cmdline: &str) -> Result<Finished> {
    let mut cmd = match engine {
        Engine::Ftvm => {
            let mut c = Command::new(&common.ftvm);
            c.arg("run").arg("--kernel").arg(kernel).arg("--cmdline").arg(cmdline);
            c
        }
        Engine::Qemu => {
            let mut c = Command::new(&common.qemu);
            c.args(["-M", "microvm", "-enable-kvm", "-m", "256", "-display", "none", "-serial", "stdio"]);
            c.args(["-monitor", "none", "-no-reboot", "-kernel"]).arg(kernel).arg("-append").arg(cmdline);
            c
        }
    };
    let f = common::run(&format!("{engine:?} on {}", kernel.display()), &mut cmd, Duration::from_secs(120))?;
    if f.digest().is_none() {
        bail!("{engine:?} on {} printed no digest line: {}", kernel.display(), f.describe());
    }
    Ok(f)
}
