//! The pair on the namespaced test network with real clients: SIGKILL of the primary while
//! redis-benchmark runs and a checker holds one TCP connection; SIGKILL of the backup; a cut
//! replication link; re-protection after a failover and a second failover; a guest that
//! breaks the determinism contract, resynced; the lag bound. Needs root, /dev/kvm,
//! redis-tools and python3.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;

fn blank_disk(path: &Path) {
    std::fs::File::create(path).unwrap().set_len(64 << 20).unwrap();
}

/// One side of a pair: `role` on host `ns` ("h1" at 10.99.0.1, "h2" at 10.99.0.2), talking
/// to `peer` (the backup's address); its API socket is `DIR/NS-ROLE.sock`.
struct Side<'a> {
    ns: &'a str,
    role: &'a str,
    peer: &'a str,
    guest: &'a str,
    extra: Vec<String>,
    env: Vec<(&'a str, &'a str)>,
    /// `--arbiter`; by default the lock file `DIR/arbiter.lock`, on storage both "hosts" see
    /// (they are namespaces of one machine), said with `--shared-lock`.
    arbiter: Option<String>,
}

impl<'a> Side<'a> {
    fn new(ns: &'a str, role: &'a str, peer: &'a str) -> Self {
        Side { ns, role, peer, guest: "kvstore", extra: Vec::new(), env: Vec::new(), arbiter: None }
    }

    fn args(mut self, a: &[&str]) -> Self {
        self.extra.extend(a.iter().map(|s| s.to_string()));
        self
    }

    fn env(mut self, k: &'a str, v: &'a str) -> Self {
        self.env.push((k, v));
        self
    }

    fn arbiter(mut self, a: &str) -> Self {
        self.arbiter = Some(a.into());
        self
    }

    fn guest(mut self, g: &'a str) -> Self {
        self.guest = g;
        self
    }

    fn start(&self, net: &Topology, dir: &Path) -> Child {
        let disk = dir.join(if self.ns == "h1" { "a.img" } else { "b.img" });
        let peer_flag = if self.role == "primary" { "--backup" } else { "--listen" };
        let mut c = net.cmd(self.ns, env!("CARGO_BIN_EXE_ftvm"));
        c.arg(self.role).args([peer_flag, self.peer]).args(["--timeout", "1200"]);
        match &self.arbiter {
            Some(a) => c.args(["--arbiter", a]),
            None => c.arg("--arbiter").arg(dir.join("arbiter.lock")).arg("--shared-lock"),
        };
        c.arg("--key-file")
            .arg(dir.join("pair.key"))
            .arg("--api-socket")
            .arg(api(dir, self.ns, self.role))
            .arg("--kernel")
            .arg(guest(self.guest))
            .arg("--cmdline")
            .arg(if self.guest == "kvstore-rdtsc" { "ip=10.0.0.2/24 kvstore.rdtsc=1" } else { "ip=10.0.0.2/24" })
            .args(["--net", "tap=tap0", "--rng", "--disk"])
            .arg(disk)
            .arg("--console")
            .arg(format!("file:{}", dir.join(format!("{}-{}.txt", self.ns, self.role)).display()))
            .args(&self.extra)
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.spawn().unwrap()
    }
}

fn api(dir: &Path, ns: &str, role: &str) -> std::path::PathBuf {
    dir.join(format!("{ns}-{role}.sock"))
}

fn start_side(net: &Topology, role: &str, dir: &Path) -> Child {
    let ns = if role == "primary" { "h1" } else { "h2" };
    Side::new(ns, role, "10.99.0.2:7000").start(net, dir)
}

/// The network, a scratch directory with blank disks and the pair's key.
fn setup(tag: &str) -> (Topology, Scratch) {
    let dir = scratch(tag);
    let net = Topology::up(tag, 2);
    blank_disk(&dir.join("a.img"));
    blank_disk(&dir.join("b.img"));
    std::fs::write(dir.join("pair.key"), "5ec2e7005ec2e7005ec2e7005ec2e7005ec2e7005ec2e7005ec2e7005ec2e700\n").unwrap();
    (net, dir)
}

fn pair(tag: &str) -> (Topology, Scratch, Child, Child) {
    let (net, dir) = setup(tag);
    let backup = start_side(&net, "backup", &dir);
    std::thread::sleep(Duration::from_millis(400));
    let primary = start_side(&net, "primary", &dir);
    net.wait_ping("the protected kvstore");
    (net, dir, primary, backup)
}

/// `ftvm ctl SOCKET ARGS...`: exit status and output.
fn ctl(socket: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = ftvm().arg("ctl").arg(socket).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// The pair part of `ftvm ctl SOCKET status --json`.
fn pair_status(socket: &Path) -> Option<serde_json::Value> {
    let (code, out) = ctl(socket, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| code == Some(0))?;
    v.get("pair").cloned()
}

/// Waits until the VM behind `socket` says it is protected.
fn wait_protected(socket: &Path, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if pair_status(socket).is_some_and(|p| p["protected"] == true) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn checker(net: &Topology, seconds: u32) -> Child {
    net.cmd("c", "python3")
        .arg(repo_root().join("scripts/kv-checker.py"))
        .args(["10.0.0.2", "6379", &seconds.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> (Option<i32>, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn stop(mut child: Child) -> String {
    let _ = child.kill();
    finish(child).2
}

#[test]
fn sigkill_of_the_primary_keeps_the_client_connection_and_every_acknowledged_write() {
    if !kvm_available() {
        return;
    }
    let (net, _dir, mut primary, backup) = pair("pf");
    let check = checker(&net, 10);
    let bench = net
        .cmd("c", "redis-benchmark")
        .args(["-h", "10.0.0.2", "-t", "set,get", "-n", "20000", "-c", "20", "-q"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    primary.kill().unwrap(); // SIGKILL
    let (code, report, err) = finish(check);
    eprintln!("checker: {report}");
    assert_eq!(code, Some(0), "invariants broken: {report} {err}");
    assert!(report.contains("\"reset\": false"), "{report}");
    let (_, bench_out, _) = finish(bench);
    assert!(
        bench_out.replace('\r', "\n").lines().any(|l| l.starts_with("GET: ")),
        "redis-benchmark finished: {bench_out}"
    );
    let backup_err = stop(backup);
    assert!(backup_err.contains("TAKEOVER"), "{backup_err}");
    let _ = primary.wait();
}

#[test]
fn sigkill_of_the_backup_goes_unnoticed_by_clients() {
    if !kvm_available() {
        return;
    }
    let (net, _dir, primary, mut backup) = pair("bk");
    let check = checker(&net, 5);
    std::thread::sleep(Duration::from_secs(2));
    backup.kill().unwrap();
    let (code, report, err) = finish(check);
    assert_eq!(code, Some(0), "{report} {err}");
    let primary_err = stop(primary);
    assert!(primary_err.contains("UNPROTECTED"), "{primary_err}");
    let _ = backup.wait();
}

#[test]
fn a_cut_replication_link_leaves_exactly_one_live_side() {
    if !kvm_available() {
        return;
    }
    let (net, _dir, primary, backup) = pair("cut");
    let check = checker(&net, 5);
    std::thread::sleep(Duration::from_secs(2));
    let out = std::process::Command::new("ip")
        .args(["-n", &format!("{}-h1", net.0), "link", "set", "rep0", "down"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let (code, report, err) = finish(check);
    assert_eq!(code, Some(0), "clients are served by the primary: {report} {err}");
    // The backup could not win the arbiter (the primary lives and holds it): it halted.
    let (bcode, _, berr) = finish(backup);
    assert_eq!(bcode, Some(ftvm_exit::ExitStatus::Fenced.code().into()), "{berr}");
    assert!(berr.contains("halting"), "{berr}");
    assert!(!berr.contains("TAKEOVER"), "{berr}");
    let perr = stop(primary);
    assert!(perr.contains("UNPROTECTED"), "{perr}");
}

#[test]
fn failover_then_reprotection_under_load_then_a_second_failover_keep_the_client_connection() {
    if !kvm_available() {
        return;
    }
    let (net, dir, mut primary, backup) = pair("rp");
    let check = checker(&net, 24);
    let bench = net
        .cmd("c", "redis-benchmark")
        .args(["-h", "10.0.0.2", "-t", "set,get", "-n", "60000", "-c", "20", "-q"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    primary.kill().unwrap(); // the first failover: h2's backup goes live
    let _ = primary.wait();
    let live = api(&dir, "h2", "backup");
    let start = std::time::Instant::now();
    while pair_status(&live).is_none_or(|p| p["failovers"] != 1) {
        assert!(start.elapsed() < Duration::from_secs(10), "the backup did not take over");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A new backup on h1 (its disk is the dead primary's, stale: the transfer replaces it).
    let new_backup = Side::new("h1", "backup", "10.99.0.1:7001").start(&net, &dir);
    std::thread::sleep(Duration::from_millis(500));
    let (code, out) = ctl(&live, &["protect", "10.99.0.1:7001", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let progress: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    assert_eq!(progress["phase"], "protected", "{out}");
    eprintln!("re-protection: {out}");
    let paused = progress["snapshot"]["pause_ms"].as_f64().unwrap();
    assert!(paused < 200.0, "the guest paused {paused} ms");
    let p = pair_status(&live).unwrap();
    assert_eq!((p["protected"].as_bool(), p["failovers"].as_u64()), (Some(true), Some(1)), "{p}");
    std::thread::sleep(Duration::from_secs(2));
    let old_live_err = stop(backup); // the second failover: h1's new backup goes live
    let (code, report, err) = finish(check);
    eprintln!("checker: {report}");
    assert_eq!(code, Some(0), "invariants broken: {report} {err}");
    assert!(report.contains("\"reset\": false"), "{report}");
    let (_, bench_out, _) = finish(bench);
    assert!(bench_out.replace('\r', "\n").lines().any(|l| l.starts_with("GET: ")), "{bench_out}");
    let new_err = stop(new_backup);
    assert!(new_err.contains("restored the primary's state") && new_err.contains("TAKEOVER"), "{new_err}");
    assert!(old_live_err.contains("TAKEOVER") && old_live_err.contains("PROTECTED"), "{old_live_err}");
}

/// A pair running the guest that reads the TSC in ring 3 on every PING.
fn rdtsc_pair(tag: &str, primary_env: Option<(&str, &str)>) -> (Topology, Scratch, Child, Child) {
    let (net, dir) = setup(tag);
    let backup = Side::new("h2", "backup", "10.99.0.2:7000").guest("kvstore-rdtsc").start(&net, &dir);
    std::thread::sleep(Duration::from_millis(400));
    let mut p = Side::new("h1", "primary", "10.99.0.2:7000").guest("kvstore-rdtsc");
    if let Some((k, v)) = primary_env {
        p = p.env(k, v);
    }
    let primary = p.start(&net, &dir);
    net.wait_ping("the protected kvstore");
    (net, dir, primary, backup)
}

#[test]
fn a_guest_that_reads_rdtsc_diverges_is_resynced_and_clients_see_correct_answers() {
    if !kvm_available() {
        return;
    }
    let (net, dir, mut primary, backup) = rdtsc_pair("rs", None);
    let check = checker(&net, 14);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(net.cli(&["PING"]), "PONG");
    }
    let papi = api(&dir, "h1", "primary");
    if !wait_protected(&papi, Duration::from_secs(20)) {
        let status = pair_status(&papi);
        panic!("not resynced and protected again: {status:?}\nprimary:\n{}\nbackup:\n{}", stop(primary), stop(backup));
    }
    let p = pair_status(&papi).unwrap();
    let resyncs = p["resyncs"].as_u64().unwrap();
    assert!(resyncs >= 1, "{p}");
    std::thread::sleep(Duration::from_secs(1));
    // The resynced backup is a good one: it takes over with the clients' data.
    primary.kill().unwrap();
    let _ = primary.wait();
    let (code, report, err) = finish(check);
    eprintln!("checker: {report}; resyncs: {resyncs}");
    assert_eq!(code, Some(0), "invariants broken: {report} {err}");
    assert_eq!(net.cli(&["PING"]), "PONG");
    let berr = stop(backup);
    assert!(berr.contains("DIVERGED") && berr.contains("restored the primary's state"), "{berr}");
    assert!(berr.contains("TAKEOVER"), "{berr}");
}

#[test]
fn a_diverged_backup_whose_primary_dies_halts_instead_of_going_live() {
    if !kvm_available() {
        return;
    }
    // This primary does not resync its backup: the backup stays diverged.
    let (net, _dir, mut primary, backup) = rdtsc_pair("dh", Some(("FTVM_TEST_IGNORE_RESYNC", "1")));
    let check = checker(&net, 3);
    let _ = finish(check);
    std::thread::sleep(Duration::from_secs(1));
    primary.kill().unwrap();
    let _ = primary.wait();
    let (code, _, berr) = finish(backup);
    assert_eq!(code, Some(ftvm_exit::ExitStatus::Fenced.code().into()), "{berr}");
    assert!(berr.contains("DIVERGED") && berr.contains("halting"), "{berr}");
    assert!(!berr.contains("TAKEOVER"), "{berr}");
}

#[test]
fn a_lagging_backup_slows_the_primary_down_and_the_lag_stays_bounded() {
    if !kvm_available() {
        return;
    }
    let (net, dir) = setup("lag");
    // Each record the backup replays costs it 100 µs more: it cannot keep up under load.
    let backup = Side::new("h2", "backup", "10.99.0.2:7000").env("FTVM_TEST_REPLAY_DELAY_US", "100").start(&net, &dir);
    std::thread::sleep(Duration::from_millis(400));
    let primary = Side::new("h1", "primary", "10.99.0.2:7000").args(&["--max-lag", "100"]).start(&net, &dir);
    net.wait_ping("the protected kvstore");
    let bench = net
        .cmd("c", "redis-benchmark")
        .args(["-h", "10.0.0.2", "-t", "set", "-n", "20000", "-c", "20", "-q"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let papi = api(&dir, "h1", "primary");
    let mut worst = 0;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        if let Some(p) = pair_status(&papi) {
            worst = worst.max(p["replay_lag_ms"].as_u64().unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let p = pair_status(&papi).unwrap();
    let _ = finish(bench);
    let throttled = p["throttled_ms"].as_u64().unwrap();
    eprintln!("worst replay lag {worst} ms, vCPU slowed {throttled} ms");
    assert!(throttled > 0, "the primary was slowed down: {p}");
    // The bound plus what heartbeats (every 50 ms), throttling steps and a machine busy with
    // the other tests let through; unbounded, the lag grows by seconds in this time.
    assert!(worst <= 1000, "the lag stayed near its 100 ms bound: worst {worst} ms");
    assert_eq!(p["protected"], true, "{p}");
    stop(primary);
    stop(backup);
}

#[test]
fn across_hosts_a_side_refuses_to_start_without_an_arbiter_both_hosts_see() {
    if !kvm_available() {
        return;
    }
    let (net, dir) = setup("narb");
    for (ns, role) in [("h1", "primary"), ("h2", "backup")] {
        for arbiter in [None, Some(dir.join("arbiter.lock"))] {
            let mut c = net.cmd(ns, env!("CARGO_BIN_EXE_ftvm"));
            c.arg(role).args([if role == "primary" { "--backup" } else { "--listen" }, "10.99.0.2:7000"]);
            c.arg("--key-file").arg(dir.join("pair.key")).arg("--kernel").arg(guest("kvstore"));
            if let Some(a) = &arbiter {
                c.arg("--arbiter").arg(a);
            }
            let (out, in_time) = finish_within(c.stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(10));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(in_time, "{role} in {ns} with {arbiter:?} started: {err}");
            assert_eq!(out.status.code(), Some(2), "{role} in {ns} with {arbiter:?}: {err}");
            assert!(err.contains("not on this host") && err.contains("etcd://"), "{err}");
        }
    }
}

#[test]
fn with_etcd_a_cut_replication_link_between_two_hosts_leaves_exactly_one_live_side() {
    if !kvm_available() {
        return;
    }
    let (net, dir) = setup("ecut");
    // Both hosts reach etcd (on the LAN, in the client's namespace) over their uplinks, not
    // over the replication link.
    for (i, ns) in ["h1", "h2"].iter().enumerate() {
        let out = std::process::Command::new("ip")
            .args(["-n", &format!("{}-{ns}", net.0), "addr", "add", &format!("10.0.0.{}/24", 201 + i), "dev", "br0"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let etcd = ftvm_replication::test_etcd::start_test_etcd_in_netns(&format!("{}-c", net.0), "10.0.0.100")
        .expect("etcd (scripts/deps.sh installs it)");
    let url = etcd.url("ftvm/ecut");
    let backup = Side::new("h2", "backup", "10.99.0.2:7000").arbiter(&url).start(&net, &dir);
    std::thread::sleep(Duration::from_millis(400));
    let primary = Side::new("h1", "primary", "10.99.0.2:7000").arbiter(&url).start(&net, &dir);
    net.wait_ping("the protected kvstore");
    let check = checker(&net, 8);
    std::thread::sleep(Duration::from_secs(2));
    let out = std::process::Command::new("ip")
        .args(["-n", &format!("{}-h1", net.0), "link", "set", "rep0", "down"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let (code, report, err) = finish(check);
    assert_eq!(code, Some(0), "clients are served by the primary throughout: {report} {err}");
    // The primary holds the lease (it renews it over the LAN): the backup cannot win it and
    // halts; it never went live.
    let (bcode, _, berr) = finish(backup);
    assert_ne!(bcode, Some(0), "{berr}");
    assert!(berr.contains("the arbiter is held") && berr.contains("halting"), "{berr}");
    assert!(!berr.contains("TAKEOVER"), "{berr}");
    let b_console = std::fs::read_to_string(dir.join("h2-backup.txt")).unwrap_or_default();
    assert_eq!(b_console, "", "the backup performed nothing");
    assert_eq!(net.cli(&["PING"]), "PONG", "the primary still serves");
    let perr = stop(primary);
    assert!(perr.contains("UNPROTECTED") && !perr.contains("HALT"), "{perr}");
}
