//! Recording never starves the guest (issue 13): sync points stay within their budget for a
//! guest that rewrites megabytes between exits, the log never fills a disk unasked, and a
//! protected guest of that kind runs, replays and fails over.
//!
//! Each test gives the recording a deadline far beyond what it needs now (a few seconds):
//! before the budget, `compute` recorded 140-260 times slower than it ran, so these tests
//! failed by their deadline and by their counts.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn record_cmd(log: &Path, kernel: &Path, cmdline: &str) -> Command {
    let mut c = ftvm();
    c.args(["record", "--log"]).arg(log).arg("--kernel").arg(kernel).args(["--cmdline", cmdline]);
    c.arg("--console").arg(format!("file:{}", log.with_extension("console").display()));
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn inspect(log: &Path) -> serde_json::Value {
    let out = ftvm().args(["log", "inspect", "--json"]).arg(log).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("inspect --json: {e}: {}", stderr(&out)))
}

#[test]
fn a_guest_that_rewrites_megabytes_records_within_the_sync_budget_and_replays_exactly() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("budget-compute");
    let log = dir.join("compute.log");
    // 150 rounds, each rewriting 8 MiB: about a second of guest time with default settings.
    let child = record_cmd(&log, &guest("compute"), "compute.rounds=150").spawn().unwrap();
    let (out, in_time) = finish_within(child, Duration::from_secs(90));
    let err = stderr(&out);
    assert!(in_time, "the recording must not crawl (it took 140-260x the run before): {err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("at most") && err.contains("free on"), "the default log limit is said at start: {err}");

    let summary = &inspect(&log)["summary"];
    let guest_s = summary["guest_duration_ns"].as_u64().unwrap() as f64 / 1e9;
    let syncs = summary["sync_points"]["count"].as_u64().unwrap();
    let log_bytes = summary["valid_bytes"].as_u64().unwrap();
    assert!(guest_s > 0.2, "{summary}");
    // One sync point per 10 ms tick is what starved the guest; the budget spaces them to
    // about 9x their cost (tens of ms each here): a handful per second.
    assert!((syncs as f64) <= 2.0 + 15.0 * guest_s, "{syncs} sync points in {guest_s:.2} s of guest time: {summary}");
    // Before: 55 MB of log per second of guest time, without end.
    let rate = log_bytes as f64 / guest_s;
    assert!(rate < 25e6, "{rate:.0} log bytes per second of guest time: {summary}");
    // Their lateness is on record: each waited at least the bound.
    if syncs > 0 {
        assert!(summary["sync_points"]["mean_wait_us"].as_u64().unwrap() >= 9_000, "{summary}");
    }

    let out_dir = dir.join("replay");
    let out = ftvm().arg("replay").arg(&log).arg("--output-dir").arg(&out_dir).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let recorded = std::fs::read_to_string(log.with_extension("console")).unwrap();
    let replayed = std::fs::read_to_string(out_dir.join("console.txt")).unwrap();
    assert_eq!(replayed, recorded, "the replay prints what the recording printed");
    let (run, alone) = run_guest(&guest("compute"), &["--cmdline", "compute.rounds=150"], &dir);
    assert_eq!(run.status.code(), Some(0));
    assert_eq!(digest_lines(&recorded), digest_lines(&alone), "recorded or not, the same result");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tmpfs of `size` mounted for one test, unmounted when it ends.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(name: &str, size: &str) -> Option<SmallFs> {
        let dir = scratch(name).join("fs");
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok || std::env::var("FTVM_ALLOW_NO_KVM").is_ok(),
            "mounting a tmpfs needs root (FTVM_ALLOW_NO_KVM=1 skips)"
        );
        ok.then_some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_recording_onto_a_small_file_system_ends_cleanly_and_replays_to_its_end() {
    if !kvm_available() {
        return;
    }
    let Some(fs) = SmallFs::mount("budget-tmpfs", "8m") else { return };
    // Without --max-size: half the free space, then END(size limit), exit 7.
    let log = fs.0.join("default.log");
    let (out, in_time) = finish_within(
        record_cmd(&log, &guest("compute"), "compute.rounds=400").spawn().unwrap(),
        Duration::from_secs(60),
    );
    let err = stderr(&out);
    assert!(in_time, "{err}");
    assert!(err.contains("at most 4.0 MiB (half of the 8.0 MiB free on"), "{err}");
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("log reached its size limit") && err.contains("replays exactly up to there"), "{err}");
    assert!(std::fs::metadata(&log).unwrap().len() <= 4 << 20);
    assert_eq!(inspect(&log)["summary"]["end"]["state"], "complete");
    let out = ftvm().arg("replay").arg(&log).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("reached the end of the recording"), "{}", stderr(&out));
    std::fs::remove_file(&log).unwrap();
    let _ = std::fs::remove_file(log.with_extension("console"));

    // A limit beyond the disk: the disk fills. The recording stops with a message naming
    // the log and the error, no panic, and the log replays exactly up to its torn end.
    let log = fs.0.join("full.log");
    let mut cmd = record_cmd(&log, &guest("compute"), "compute.rounds=400");
    cmd.args(["--max-size", "1G"]);
    let (out, in_time) = finish_within(cmd.spawn().unwrap(), Duration::from_secs(60));
    let err = stderr(&out);
    assert!(in_time, "{err}");
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("No space left on device") && err.contains(&log.display().to_string()), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let out = ftvm().arg("replay").arg(&log).output().unwrap();
    let rerr = stderr(&out);
    assert_eq!(out.status.code(), Some(9), "the log ends early, and replays exactly up to there: {rerr}");
    assert!(rerr.contains("replayed exactly up to exit"), "{rerr}");
}

fn port(offset: u16) -> u16 {
    21000 + (std::process::id() % 20000) as u16 + offset
}

fn compute_side(role: &str, addr: &str, arbiter: &Path, console: &Path, rounds: u32) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ftvm"));
    c.arg(role);
    c.args(if role == "backup" { ["--listen", addr] } else { ["--backup", addr] });
    c.args(["--timeout", "1000", "--insecure"]).arg("--arbiter").arg(arbiter);
    c.arg("--kernel").arg(guest("compute")).args(["--cmdline", &format!("compute.rounds={rounds}")]);
    c.arg("--console").arg(format!("file:{}", console.display()));
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c.spawn().unwrap()
}

#[test]
fn a_protected_guest_that_rewrites_megabytes_completes_and_fails_over_mid_run() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("budget-pair");
    let rounds = 300; // about 2 s of guest time
    let (run, alone) = run_guest(&guest("compute"), &["--cmdline", &format!("compute.rounds={rounds}")], &dir);
    assert_eq!(run.status.code(), Some(0));
    let expected = digest_lines(&alone);
    assert_eq!(expected.len(), 1, "{alone}");

    // A normal end: the primary prints the result, the backup replayed it and performs nothing.
    let addr = format!("127.0.0.1:{}", port(0));
    let arbiter = dir.join("arbiter.lock");
    let b = compute_side("backup", &addr, &arbiter, &dir.join("b.txt"), rounds);
    std::thread::sleep(Duration::from_millis(300));
    let p = compute_side("primary", &addr, &arbiter, &dir.join("p.txt"), rounds);
    let (pout, p_in_time) = finish_within(p, Duration::from_secs(90));
    let (bout, b_in_time) = finish_within(b, Duration::from_secs(30));
    assert!(p_in_time && b_in_time, "primary: {}\nbackup: {}", stderr(&pout), stderr(&bout));
    assert_eq!(pout.status.code(), Some(0), "primary: {}", stderr(&pout));
    assert_eq!(bout.status.code(), Some(0), "backup: {}", stderr(&bout));
    assert_eq!(digest_lines(&std::fs::read_to_string(dir.join("p.txt")).unwrap()), expected);
    assert_eq!(std::fs::read_to_string(dir.join("b.txt")).unwrap_or_default(), "");

    // SIGKILL of the primary mid-run: the backup takes over from its replay and finishes
    // with the same result; together they print it once.
    let addr = format!("127.0.0.1:{}", port(1));
    let arbiter = dir.join("arbiter2.lock");
    let b = compute_side("backup", &addr, &arbiter, &dir.join("b2.txt"), rounds);
    std::thread::sleep(Duration::from_millis(300));
    let mut p = compute_side("primary", &addr, &arbiter, &dir.join("p2.txt"), rounds);
    std::thread::sleep(Duration::from_millis(1200));
    let killed_mid_run = p.try_wait().unwrap().is_none();
    p.kill().unwrap();
    let _ = p.wait();
    let (bout, in_time) = finish_within(b, Duration::from_secs(60));
    let berr = stderr(&bout);
    assert!(killed_mid_run, "the primary had finished before the kill: make the run longer");
    assert!(in_time, "{berr}");
    assert_eq!(bout.status.code(), Some(0), "the backup takes over and finishes: {berr}");
    assert!(berr.contains("TAKEOVER"), "{berr}");
    let both = format!(
        "{}{}",
        std::fs::read_to_string(dir.join("p2.txt")).unwrap(),
        std::fs::read_to_string(dir.join("b2.txt")).unwrap()
    );
    assert_eq!(digest_lines(&both), expected, "primary then backup: {both}");
    let _ = std::fs::remove_dir_all(&dir);
}
