//! The pair on the namespaced test network with real clients: SIGKILL of the primary while
//! redis-benchmark runs and a checker holds one TCP connection; SIGKILL of the backup; a cut
//! replication link. Needs root, /dev/kvm, redis-tools and python3.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;

fn blank_disk(path: &Path) {
    std::fs::File::create(path).unwrap().set_len(64 << 20).unwrap();
}

fn start_side(net: &Topology, role: &str, dir: &Path) -> Child {
    let (ns, peer_arg, disk) = if role == "primary" {
        ("h1", ["--backup", "10.99.0.2:7000"], dir.join("a.img"))
    } else {
        ("h2", ["--listen", "10.99.0.2:7000"], dir.join("b.img"))
    };
    net.cmd(ns, env!("CARGO_BIN_EXE_ftvm"))
        .arg(role)
        .args(peer_arg)
        .args(["--timeout", "1200"])
        .arg("--arbiter")
        .arg(dir.join("arbiter.lock"))
        .arg("--kernel")
        .arg(guest("kvstore"))
        .args(["--cmdline", "ip=10.0.0.2/24", "--net", "tap=tap0", "--rng", "--disk"])
        .arg(disk)
        .arg("--console")
        .arg(format!("file:{}", dir.join(format!("{role}.txt")).display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn pair(tag: &str) -> (Topology, std::path::PathBuf, Child, Child) {
    let dir = scratch(tag);
    let net = Topology::up(tag, 2);
    blank_disk(&dir.join("a.img"));
    blank_disk(&dir.join("b.img"));
    let backup = start_side(&net, "backup", &dir);
    std::thread::sleep(Duration::from_millis(400));
    let primary = start_side(&net, "primary", &dir);
    net.wait_ping("the protected kvstore");
    (net, dir, primary, backup)
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
    assert_ne!(bcode, Some(0), "{berr}");
    assert!(berr.contains("halting"), "{berr}");
    assert!(!berr.contains("TAKEOVER"), "{berr}");
    let perr = stop(primary);
    assert!(perr.contains("UNPROTECTED"), "{perr}");
}
