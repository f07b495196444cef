//! The redis-benchmark driver the kvstore and redis suites share (pair and snapshot use its
//! pieces): one redis-benchmark run and its `--csv` row, the benchmarks of a session (every
//! client count, SET then GET), the engine rounds, the cells (medians per test, client count
//! and engine) and their table, and the exits and log bytes per request read from a
//! recording's log.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::common::{self, ExitSummary, Finished, Running, Series};
use crate::kvstore::{Topology, GUEST_IP};
use crate::table::Table;

/// The tests every session runs, in this order, in separate invocations (each has its own
/// time window in a recording's log, and a pause lets the last test's connections close).
pub(crate) const TESTS: [&str; 2] = ["SET", "GET"];

/// What a suite compares: an engine (ftvm run, ftvm record, QEMU, natively, ...).
pub(crate) trait Engine: Copy + PartialEq + Serialize {
    fn label(self) -> &'static str;
}

pub(crate) fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// The row of one test in redis-benchmark's `--csv` output (a header line starting with
/// "test", then a row per test); latencies in ms, NaN where an older redis-benchmark prints
/// only "test","rps".
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Csv {
    pub(crate) rps: f64,
    pub(crate) avg_ms: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

impl Csv {
    /// The row of `test` ("SET", "GET"); an error without that row or a positive throughput.
    pub(crate) fn parse(out: &str, test: &str) -> Result<Csv> {
        let fields = |l: &str| l.split(',').map(|f| f.trim().trim_matches('"').to_string()).collect::<Vec<_>>();
        let header = out.lines().find(|l| l.starts_with("\"test\"")).map(fields);
        let row = out.lines().map(fields).find(|f| f.first().map(String::as_str) == Some(test));
        let (Some(header), Some(row)) = (header, row) else {
            bail!("no {test} row in redis-benchmark's output:\n{out}");
        };
        let map: BTreeMap<String, f64> =
            header.into_iter().zip(row).filter_map(|(h, v)| v.parse::<f64>().ok().map(|v| (h, v))).collect();
        let get = |name: &str| map.get(name).copied().unwrap_or(f64::NAN);
        let rps = get("rps");
        if rps.is_nan() || rps <= 0.0 {
            bail!("no throughput in redis-benchmark's output:\n{out}");
        }
        Ok(Csv {
            rps,
            avg_ms: get("avg_latency_ms"),
            p50_ms: get("p50_latency_ms"),
            p99_ms: get("p99_latency_ms"),
            max_ms: get("max_latency_ms"),
        })
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
    /// From the recording's log (ftvm record), or a primary's status (the pair).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) exits_per_request: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) log_bytes_per_request: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    net_rx_bytes_per_request: Option<f64>,
    /// The guest's system calls per request, where the guest counts them (the Linux
    /// personality's `linux.counts`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) syscalls_per_request: Option<f64>,
    /// Of those, the ones that came through a real `syscall` instruction (trapped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) real_syscalls_per_request: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct LogTotals {
    pub(crate) bytes: u64,
    guest_s: f64,
    by_kind: BTreeMap<String, crate::rr::KindCount>,
}

/// The pause before each redis-benchmark run, to let the last run's connections close in the
/// guest first.
const PAUSE: Duration = Duration::from_millis(500);

/// One redis-benchmark run after [`PAUSE`] (retried once, after 3 s, if it fails or hangs).
pub(crate) fn bench(redis_benchmark: &Path, topo: &Topology, test: &str, clients: u32, requests: u64) -> Result<Bench> {
    bench_after(PAUSE, redis_benchmark, topo, test, clients, requests)
}

/// [`bench`] with `pause` before the first attempt.
fn bench_after(
    pause: Duration,
    redis_benchmark: &Path,
    topo: &Topology,
    test: &str,
    clients: u32,
    requests: u64,
) -> Result<Bench> {
    let mut last_error = None;
    for attempt in 0..2 {
        common::sleep(if attempt == 0 { pause } else { Duration::from_secs(3) })?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topo.client()]).arg(redis_benchmark);
        cmd.args(["-h", GUEST_IP, "-p", "6379", "-c", &clients.to_string(), "-n", &requests.to_string()]);
        cmd.args(["-t", &test.to_lowercase(), "--csv"]);
        let t0 = unix_ns();
        let timeout = Duration::from_secs(60 + requests / 100);
        let label = format!("redis-benchmark {test} -c {clients}");
        match common::run(&label, &mut cmd, timeout).and_then(|f| Csv::parse(&f.stdout, test).context(f.describe())) {
            Ok(row) => {
                let t1 = unix_ns();
                let (rps, p50, p99) = (row.rps, row.p50_ms, row.p99_ms);
                eprintln!("  {test:<3} c={clients:<3} {rps:>10.0} req/s  p50 {p50:.3} ms  p99 {p99:.3} ms");
                return Ok(Bench {
                    test: test.into(),
                    clients,
                    requests,
                    rps,
                    avg_ms: row.avg_ms,
                    p50_ms: p50,
                    p99_ms: p99,
                    retried: attempt > 0,
                    window_unix_ns: (t0, t1),
                    exits_per_request: None,
                    log_bytes_per_request: None,
                    net_rx_bytes_per_request: None,
                    syscalls_per_request: None,
                    real_syscalls_per_request: None,
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

/// The redis-benchmark runs of a session: `requests` each, `requests_single` with one client
/// (one request in flight, so far fewer per second).
pub(crate) struct Load<'a> {
    pub(crate) redis_benchmark: &'a Path,
    pub(crate) clients: &'a [u32],
    pub(crate) requests: u64,
    pub(crate) requests_single: u64,
}

impl Load<'_> {
    /// `redis-benchmark --version`, for the report.
    pub(crate) fn version(&self) -> Result<String> {
        common::version_of(self.redis_benchmark)
    }

    /// One session: starts `cmd` (the VM, or Redis natively), waits up to `ready_within`
    /// for `ready` on its console, runs the benchmarks against it, then stops it (SIGTERM).
    pub(crate) fn measure(
        &self,
        topo: &Topology,
        cmd: &mut Command,
        session: (&str, usize),
        ready: &str,
        ready_within: Duration,
    ) -> Result<Measured> {
        self.measure_each(topo, cmd, session, (ready, ready_within), |_| Ok(()), |_, (), _| Ok(()))
    }

    /// [`Load::measure`], with [`Load::run_each`]'s hooks around each benchmark.
    pub(crate) fn measure_each<T>(
        &self,
        topo: &Topology,
        cmd: &mut Command,
        (label, rep): (&str, usize),
        (ready, ready_within): (&str, Duration),
        before: impl FnMut(&Running) -> Result<T>,
        after: impl FnMut(&Running, T, &mut Bench) -> Result<()>,
    ) -> Result<Measured> {
        let start_ns = unix_ns();
        let mut vm = Running::spawn(label, cmd)?;
        vm.wait_for_output(ready, ready_within)?;
        let boot_to_ready_s = (unix_ns() - start_ns) as f64 / 1e9;
        let benches = self.run_each(topo, &vm, (label, rep), before, after)?;
        let finished = vm.terminate(Duration::from_secs(10))?;
        let counts = ExitSummary::parse(&finished.stderr);
        Ok(Measured { benches, boot_to_ready_s, counts, finished })
    }

    /// Runs every (client count, test) against the VM (its console goes into the error of
    /// a benchmark that fails twice), with `before` called before each benchmark (after its
    /// pause, so that what it and `after` read spans redis-benchmark's run, and a retry's
    /// pause if there is one) and `after` given what it returned and the benchmark (to read
    /// a VM's counters, or its console).
    pub(crate) fn run_each<T>(
        &self,
        topo: &Topology,
        vm: &Running,
        (label, rep): (&str, usize),
        mut before: impl FnMut(&Running) -> Result<T>,
        mut after: impl FnMut(&Running, T, &mut Bench) -> Result<()>,
    ) -> Result<Vec<Bench>> {
        let mut benches = Vec::new();
        for &c in self.clients {
            for test in TESTS {
                let n = if c == 1 { self.requests_single } else { self.requests };
                common::sleep(PAUSE)?;
                let t = before(vm)?;
                let mut b = bench_after(Duration::ZERO, self.redis_benchmark, topo, test, c, n)
                    .with_context(|| format!("{label} (round {}): console so far:\n{}", rep + 1, vm.stdout_text()))?;
                after(vm, t, &mut b)?;
                benches.push(b);
            }
        }
        Ok(benches)
    }
}

/// What [`Load::measure`] saw of one session.
pub(crate) struct Measured {
    pub(crate) benches: Vec<Bench>,
    /// Start to the ready line.
    pub(crate) boot_to_ready_s: f64,
    /// ftvm's exit summary (none for a program that prints none).
    pub(crate) counts: Option<ExitSummary>,
    pub(crate) finished: Finished,
}

/// A suite's record of one session, as [`sessions`] reads it.
pub(crate) trait Session<E> {
    fn engine(&self) -> E;
    fn benches(&self) -> &[Bench];
}

/// Brings up a test network of `hosts` hosts (1; 2 for a pair), runs the sessions on it
/// ([`rounds`]), tears it down, and returns the sessions with their cells.
pub(crate) fn sessions<E: Engine, S: Session<E>>(
    (topology, hosts): (&Path, u32),
    runs: usize,
    clients: &[u32],
    engines: &[E],
    mut session: impl FnMut(&Topology, E, usize) -> Result<S>,
) -> Result<(Vec<S>, Vec<Cell<E>>)> {
    let topo = Topology::up(topology, hosts)?;
    let sessions = rounds(runs, engines, |engine, rep| session(&topo, engine, rep))?;
    drop(topo);
    let benches = sessions.iter().flat_map(|s| s.benches().iter().map(move |b| (s.engine(), b)));
    let cells = cells(clients, engines, benches);
    Ok((sessions, cells))
}

/// A session per engine and round, the order rotated from one round to the next so that
/// machine noise hits all alike.
pub(crate) fn rounds<E: Engine, S>(
    runs: usize,
    engines: &[E],
    mut session: impl FnMut(E, usize) -> Result<S>,
) -> Result<Vec<S>> {
    let mut sessions = Vec::new();
    for rep in 0..runs {
        for k in 0..engines.len() {
            let engine = engines[(k + rep) % engines.len()];
            eprintln!("round {}/{runs}: {}", rep + 1, engine.label());
            sessions.push(session(engine, rep)?);
        }
    }
    Ok(sessions)
}

/// Medians over sessions for one (test, clients, engine).
#[derive(Debug, Serialize)]
pub(crate) struct Cell<E> {
    pub(crate) test: String,
    pub(crate) clients: u32,
    pub(crate) engine: E,
    pub(crate) rps: Series,
    pub(crate) p50_ms: Series,
    pub(crate) p99_ms: Series,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) exits_per_request: Option<Series>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) log_bytes_per_request: Option<Series>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) syscalls_per_request: Option<Series>,
}

/// The cells of every client count, test and engine (in that order), from each engine's
/// benchmarks.
pub(crate) fn cells<'a, E: Engine>(
    clients: &[u32],
    engines: &[E],
    benches: impl Iterator<Item = (E, &'a Bench)> + Clone,
) -> Vec<Cell<E>> {
    let mut cells = Vec::new();
    for &c in clients {
        for test in TESTS {
            for &engine in engines {
                let mut cell = Cell {
                    test: test.into(),
                    clients: c,
                    engine,
                    rps: Series::default(),
                    p50_ms: Series::default(),
                    p99_ms: Series::default(),
                    exits_per_request: None,
                    log_bytes_per_request: None,
                    syscalls_per_request: None,
                };
                for (_, b) in benches.clone().filter(|(e, b)| *e == engine && b.test == test && b.clients == c) {
                    cell.rps.push(b.rps);
                    cell.p50_ms.push(b.p50_ms);
                    cell.p99_ms.push(b.p99_ms);
                    if let Some(e) = b.exits_per_request {
                        cell.exits_per_request.get_or_insert_with(Series::default).push(e);
                    }
                    if let Some(e) = b.log_bytes_per_request {
                        cell.log_bytes_per_request.get_or_insert_with(Series::default).push(e);
                    }
                    if let Some(e) = b.syscalls_per_request {
                        cell.syscalls_per_request.get_or_insert_with(Series::default).push(e);
                    }
                }
                cells.push(cell);
            }
        }
    }
    cells
}

/// The median throughput of one cell (NaN if there is none).
pub(crate) fn median_rps<E: Engine>(cells: &[Cell<E>], test: &str, clients: u32, engine: E) -> f64 {
    cells
        .iter()
        .find(|x| x.test == test && x.clients == clients && x.engine == engine)
        .map_or(f64::NAN, |x| x.rps.median)
}

/// The cells as a table: throughput, latencies, what a recording's log (or a primary) says
/// per request, and the guest's system calls per request where some cell has them.
pub(crate) fn cells_table<E: Engine>(cells: &[Cell<E>]) -> Table {
    let syscalls = cells.iter().any(|c| c.syscalls_per_request.is_some());
    let mut t = Table::new().left("test", 4).right("c", 3).gap(2).left("engine", 13).right("req/s", 10);
    t = t.right("p50 ms", 9).right("p99 ms", 9).right("exits/req", 11).right("log B/req", 11);
    if syscalls {
        t = t.right("syscalls/req", 13);
    }
    let opt = |s: &Option<Series>, prec: usize| s.as_ref().map_or("-".into(), |s| format!("{:.*}", prec, s.median));
    for cell in cells {
        let mut row = vec![
            cell.test.clone(),
            cell.clients.to_string(),
            cell.engine.label().to_string(),
            format!("{:.0}", cell.rps.median),
            format!("{:.3}", cell.p50_ms.median),
            format!("{:.3}", cell.p99_ms.median),
            opt(&cell.exits_per_request, 2),
            opt(&cell.log_bytes_per_request, 1),
        ];
        if syscalls {
            row.push(opt(&cell.syscalls_per_request, 2));
        }
        t.row(row);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"SET\",\"81234.57\",\"0.590\",\"0.120\",\"0.567\",\"0.911\",\"1.231\",\"4.015\"\n\"GET\",\"90000.00\",\"0.5\",\"0.1\",\"0.4\",\"0.8\",\"1.0\",\"3.0\"\n";

    #[test]
    fn reads_the_row_of_a_test_by_column_name() {
        let set = Csv::parse(CSV, "SET").unwrap();
        assert_eq!(set, Csv { rps: 81234.57, avg_ms: 0.59, p50_ms: 0.567, p99_ms: 1.231, max_ms: 4.015 });
        assert_eq!(Csv::parse(CSV, "GET").unwrap().rps, 90000.0);
    }

    #[test]
    fn an_old_redis_benchmark_gives_the_throughput_only() {
        let row = Csv::parse("\"test\",\"rps\"\n\"SET\",\"1234.5\"\n", "SET").unwrap();
        assert_eq!(row.rps, 1234.5);
        assert!(row.p50_ms.is_nan() && row.p99_ms.is_nan() && row.avg_ms.is_nan());
    }

    #[test]
    fn refuses_a_missing_row_or_throughput() {
        assert!(Csv::parse(CSV, "INCR").is_err());
        assert!(Csv::parse("", "SET").is_err());
        assert!(Csv::parse("\"test\",\"rps\"\n\"SET\",\"0\"\n", "SET").is_err());
        assert!(Csv::parse("\"SET\",\"100\"\n", "SET").is_err());
    }

    #[derive(Debug, Clone, Copy, PartialEq, Serialize)]
    enum E {
        A,
        B,
    }

    impl Engine for E {
        fn label(self) -> &'static str {
            match self {
                E::A => "engine a",
                E::B => "engine b",
            }
        }
    }

    fn b(test: &str, clients: u32, rps: f64) -> Bench {
        Bench {
            test: test.into(),
            clients,
            requests: 10,
            rps,
            avg_ms: 1.0,
            p50_ms: 1.0,
            p99_ms: 2.0,
            retried: false,
            window_unix_ns: (0, 0),
            exits_per_request: None,
            log_bytes_per_request: None,
            net_rx_bytes_per_request: None,
            syscalls_per_request: None,
            real_syscalls_per_request: None,
        }
    }

    #[test]
    fn rotates_the_engines_from_round_to_round() {
        let mut order = Vec::new();
        let s = rounds(3, &[E::A, E::B], |e, rep| {
            order.push((e, rep));
            Ok(rep)
        })
        .unwrap();
        assert_eq!(s, vec![0, 0, 1, 1, 2, 2]);
        assert_eq!(order, vec![(E::A, 0), (E::B, 0), (E::B, 1), (E::A, 1), (E::A, 2), (E::B, 2)]);
    }

    #[test]
    fn cells_take_the_medians_of_their_engine_test_and_clients() {
        let benches =
            [(E::A, b("SET", 1, 10.0)), (E::A, b("SET", 1, 30.0)), (E::B, b("SET", 1, 5.0)), (E::A, b("GET", 1, 7.0))];
        let cells = cells(&[1], &[E::A, E::B], benches.iter().map(|(e, b)| (*e, b)));
        assert_eq!(cells.len(), 4);
        assert_eq!(median_rps(&cells, "SET", 1, E::A), 20.0);
        assert_eq!(median_rps(&cells, "SET", 1, E::B), 5.0);
        assert_eq!(median_rps(&cells, "GET", 1, E::A), 7.0);
        // A cell no session filled has the empty series' median (0), a missing cell NaN.
        assert_eq!(median_rps(&cells, "GET", 1, E::B), 0.0);
        assert!(median_rps(&cells, "SET", 50, E::A).is_nan());
        let table = cells_table(&cells).render();
        assert!(
            table.starts_with("test   c  engine             req/s    p50 ms    p99 ms   exits/req   log B/req\n"),
            "{table}"
        );
        assert!(
            table.contains("SET    1  engine a              20     1.000     2.000           -           -\n"),
            "{table}"
        );
    }
}
